"""The memory-checking pipeline itself (memcheck.py): it must report real memory errors in
saferring's compiled code, name where they came from, stay quiet on clean io_uring traffic, and
not count errors that are entirely outside saferring.  The valgrind runs are slow (tens of
seconds) and skipped where valgrind is not installed; `make memcheck` runs the real thing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

import memcheck

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "memcheck.py")
SELFTEST_MODULE = os.path.join(HERE, "selftest_scenarios.py")

needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None,
                                    reason="valgrind is not installed")

#: scenario -> (valgrind's error kind, a function that must be on its stack)
BAD = {
    "selftest_use_after_free_read": ("InvalidRead", "sr_read_siginfo"),
    "selftest_overflow_write": ("InvalidWrite", "sr_fill_epoll_event"),
    "selftest_uninit_syscall_param": ("SyscallParam", "io_uring_queue_init_params"),
    "selftest_uninit_branch": ("UninitCondition", "convert_to_object"),  # cffi reading out[0]
}
CLEAN = ("selftest_clean_ring_traffic", "selftest_error_outside_saferring")


def a_torture_scenario() -> str:
    """One real torture scenario (the quick buffer one when it is there)."""
    names = memcheck.torture_names([])
    return "dropped_read_buffer_under_gc_pressure" if "dropped_read_buffer_under_gc_pressure" in names \
        else names[0]


def _xml(pid: int, ppid: int, errors: str, finished: bool = True) -> str:
    head = (f'<?xml version="1.0"?>\n<valgrindoutput>\n<protocolversion>4</protocolversion>\n'
            f"<pid>{pid}</pid>\n<ppid>{ppid}</ppid>\n")
    return head + errors + ("\n</valgrindoutput>\n" if finished else "\n")


def _error(kind: str, *objs_and_fns: tuple[str, str], freed_in: tuple[str, str] | None = None) -> str:
    def stack(frames: tuple[tuple[str, str], ...]) -> str:
        return "<stack>" + "".join(f"<frame><obj>{o}</obj><fn>{f}</fn></frame>"
                                   for o, f in frames) + "</stack>"
    aux = ""
    if freed_in is not None:
        aux = "<auxwhat>Address 0x1 is 0 bytes inside a block of size 8 free'd</auxwhat>" + stack(
            (("/usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so", "free"), freed_in))
    return (f"<error><unique>0x1</unique><tid>1</tid><kind>{kind}</kind><what>{kind}</what>"
            f"{stack(objs_and_fns)}{aux}</error>")


PY = "/usr/lib/libpython3.11.so.1.0"
EXT = "/work/main/src/saferring/_uring.abi3.so"
CFFI = "/venv/lib/python3.11/site-packages/_cffi_backend.cpython-311-x86_64-linux-gnu.so"


def test_parser_counts_only_errors_touching_our_code(tmp_path: os.PathLike[str]) -> None:
    """Three documents in one file (a parent, then two forked children, the last cut short):
    an invalid read in our extension, an uninitialised use under cffi, and a read of a block our
    code freed are counted; an error entirely inside the interpreter and a leak record are not."""
    parent = _xml(100, 1, _error("UninitValue", (PY, "Py_INCREF"), (PY, "_PyEval_EvalFrameDefault")))
    child = _xml(101, 100, _error("InvalidRead", (EXT, "sr_read_siginfo"), (PY, "cfunction_call"))
                 + _error("Leak_DefinitelyLost", (EXT, "malloc"))
                 + _error("UninitCondition", (PY, "PyLong_FromLong"), (CFFI, "cdata_item")))
    cut = _xml(102, 100, _error("InvalidRead", (PY, "memcpy"), (PY, "PyBytes_FromStringAndSize"),
                                freed_in=(EXT, "sr_unregister_buffers"))
               + "<error><unique>0x9</unique><kind>InvalidWrite", finished=False)
    path = os.path.join(os.fspath(tmp_path), "job.100.xml")
    with open(path, "w") as f:
        f.write(parent + child + cut)
    procs, unhandled = memcheck.judge(os.path.join(os.fspath(tmp_path), "job"))
    assert unhandled == []
    assert [(p.pid, p.ppid, p.finished) for p in procs] == [(100, 1, True), (101, 100, True),
                                                            (102, 100, False)]
    counted = [(e.pid, e.kind) for e in memcheck.counted_errors(procs)]
    assert counted == [(101, "InvalidRead"), (101, "UninitCondition"), (102, "InvalidRead")]


def test_uninitialised_values_from_cpythons_zero_ints_are_not_counted(
        tmp_path: os.PathLike[str]) -> None:
    """With origins (--track-origins), an uninitialised use in cffi's conversion that comes from
    a digit-less CPython int (allocated in _PyLong_New) is not counted; one that comes from memory
    our side allocated is; without an origin it is counted (the driver then asks again)."""
    def with_origin(*origin: tuple[str, str]) -> str:
        frames = "".join(f"<frame><obj>{o}</obj><fn>{f}</fn></frame>" for o, f in origin)
        return (_error("UninitCondition", (CFFI, "_cffi_to_c_u32"), (EXT, "_cffi_f_sr_poll_mask"))
                [:-len("</error>")]
                + "<auxwhat>Uninitialised value was created by a heap allocation</auxwhat>"
                + f"<stack>{frames}</stack></error>")
    malloc = ("/usr/libexec/valgrind/vgpreload_memcheck-amd64-linux.so", "malloc")
    errors = (with_origin(malloc, (PY, "_PyLong_New"), (PY, "_PyLong_FromByteArray"))
              + with_origin(malloc, (CFFI, "allocate_with_allocator"))
              + _error("UninitCondition", (CFFI, "_cffi_to_c_u32")))
    with open(os.path.join(os.fspath(tmp_path), "job.7.xml"), "w") as f:
        f.write(_xml(7, 1, errors))
    procs, _ = memcheck.judge(os.path.join(os.fspath(tmp_path), "job"))
    assert [e.cpython_zero_int() for e in procs[0].errors] == [True, False, False]
    assert [e.counted() for e in procs[0].errors] == [False, True, True]


def test_fork_server_runs_each_scenario_in_a_child_of_its_own() -> None:
    """torture_forks.py (natively, no valgrind): each scenario runs in a different child, passes,
    and is reported with that child's pid, which is how memcheck.py attributes valgrind's files."""
    names = ["selftest_clean_ring_traffic", a_torture_scenario()]
    proc = subprocess.run([sys.executable, memcheck.FORK_RUNNER, "--module", SELFTEST_MODULE, *names],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = re.findall(r"^MEMCHECK-SCENARIO (\S+) pid=(\d+) status=(-?\d+|timeout) cpu=[\d.]+ wall=[\d.]+$",
                       proc.stdout, re.M)
    assert [(n, s) for n, _, s in lines] == [(n, "0") for n in names]
    pids = {int(p) for _, p, _ in lines}
    assert len(pids) == 2 and os.getpid() not in pids
    for name in names:
        assert f"TORTURE-OK {name}" in proc.stdout


@pytest.fixture(scope="module")
def selftest_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, str]]:
    """memcheck.py over the self-test scenarios, once: (exit status, its output, the files)."""
    out = os.fspath(tmp_path_factory.mktemp("memcheck"))
    args = [sys.executable, DRIVER, "--only", "torture", "--jobs", "1", "--torture-parts", "1",
            "--out", out, "--scenario-module", SELFTEST_MODULE]
    for name in [*BAD, *CLEAN]:
        args += ["--scenario", name]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    yield proc.returncode, proc.stdout + proc.stderr, out


@pytest.mark.slow
@needs_valgrind
@pytest.mark.parametrize("name", sorted(BAD))
def test_memcheck_reports_a_real_error_in_our_code(selftest_run: tuple[int, str, str],
                                                   name: str) -> None:
    """Each deliberate error is reported, with its kind, our function (or cffi's conversion) on
    its stack, and the scenario that made it; and the run fails.  The uninitialised ones come from
    the driver's --track-origins rerun, which must confirm them."""
    status, output, _ = selftest_run
    kind, function = BAD[name]
    assert status == 1, output
    reports = [block for block in output.split("\n\n[") if f"scenario {name}," in block]
    assert reports, f"nothing reported for {name}:\n{output}"
    assert any(block.split("]", 1)[-1].lstrip().startswith(f"{kind}:") and function in block
               for block in reports), f"no {kind} through {function} for {name}:\n{output}"


@pytest.mark.slow
@needs_valgrind
def test_memcheck_counts_nothing_in_clean_runs_or_outside_our_code(
        selftest_run: tuple[int, str, str]) -> None:
    """Real io_uring traffic (setup, enter, register, buffer rings) raises no error and no
    unhandled-syscall warning, ctypes reading freed memory is listed but not counted, and nothing
    but the deliberate errors counts (no failure either)."""
    _, output, out = selftest_run
    for name in CLEAN:
        assert f"scenario {name}," not in output, output
    assert "unhandled" not in output
    assert re.search(r"error report\(s\) outside saferring's code", output), output
    procs, unhandled = memcheck.judge(os.path.join(out, "torture-1of1"))
    assert unhandled == []
    outside = [e for p in procs for e in p.errors if e.kind == "InvalidRead" and not e.counted()]
    assert any(f.fn == "_ctypes_callproc" for e in outside for _, frames in e.stacks for f in frames)
    counted = re.findall(r"^\[\d+\] \w+: .*\[scenario (\w+), pid", output, re.M)
    assert set(counted) == set(BAD), output
    assert re.search(r" error\(s\) in saferring's code, 0 failure\(s\)", output), output


@pytest.mark.slow
@needs_valgrind
def test_memcheck_passes_a_clean_scenario(tmp_path: os.PathLike[str]) -> None:
    """A torture scenario and the clean self-test scenarios: exit 0."""
    args = [sys.executable, DRIVER, "--only", "torture", "--jobs", "1", "--out", os.fspath(tmp_path),
            "--scenario-module", SELFTEST_MODULE, "--scenario", a_torture_scenario(),
            *[a for name in CLEAN for a in ("--scenario", name)]]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 torture scenario(s) (0 skipped)" in proc.stdout
    assert "0 error(s) in saferring's code, 0 failure(s)" in proc.stdout
