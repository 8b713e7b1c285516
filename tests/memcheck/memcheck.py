#!/usr/bin/env python3
"""Memory checking: the torture scenarios and the safety tests under valgrind memcheck.

    python tests/memcheck/memcheck.py              # make memcheck; exit 0 when clean
    python tests/memcheck/memcheck.py --full       # also the test files left out for time
    python tests/memcheck/memcheck.py --list       # what would run
    python tests/memcheck/memcheck.py --only torture --scenario NAME [--scenario NAME...]
    python tests/memcheck/memcheck.py --script FILE [ARGS...]   # one program, same checks

What memcheck covers.  Every load, store, allocation and free the CPU makes in user space in the
checked processes and the Python processes they start: saferring's C code (``_uring*.so``: the
``sr_*`` functions and the cffi-generated wrappers), liburing, cffi's conversion of arguments
and results, and the interpreter.  With ``PYTHONMALLOC=malloc`` every Python object is a heap
block of its own, so a read or write by our C code into a freed or too-small block (a dropped
``bytearray``, an ``ffi.new`` array, an iovec, sockaddr or registration copy) is reported, as
are double or mismatched frees, branches on uninitialised memory, and system call arguments that
point to uninitialised bytes.  valgrind 3.19 knows io_uring_setup (it checks that the parameters
are initialised and marks the ring offsets the kernel writes), io_uring_enter and
io_uring_register (it checks the iovec and descriptor arrays of buffer and file registration);
the rings are shared mappings, defined memory to valgrind, so ring traffic raises no false
errors.  The run fails (exit 1) on an error of those kinds with a frame in the extension,
liburing or cffi on its stack or on its "freed at"/"allocated at"/origin stacks.  Errors entirely
inside the interpreter are listed and not counted; CPython 3.11's own noise (a zero int with no
digits, see python.supp) is suppressed, and an uninitialised value seen in our code is traced
back with ``--track-origins`` (a second run of just that scenario or file) before it counts.
Leak checking is off: the interpreter keeps most of its memory until exit.

What it does not cover.  The kernel's own accesses: after a submission the kernel reads and
writes the buffers an SQE names, from kernel context, until the request's last completion, and
valgrind sees none of it (its io_uring wrappers look at the system call arguments, never at the
SQEs or the memory they name).  A kernel write into freed or reused memory is invisible here;
that is what the torture suite's canaries check.  Memory the kernel fills (a read's buffer, the
opcode probe) is not marked as written either, which is harmless because saferring hands the
kernel only memory that was initialised first.  Only the paths the tests take are checked, and
timing is not the normal suite's: threads take turns under valgrind, 20-50 times slower, and
before valgrind 3.23 (bug 428364) a thread blocked in io_uring_enter keeps valgrind's thread
lock, so no other thread of that process runs and no signal is delivered until the wait returns.
Tests that need another thread to feed the ring they wait on therefore cannot pass here; they
are deselected (PYTEST_DESELECT), and a scenario or test that fails or times out under valgrind
is listed as a note, not counted: behaviour is the normal suite's to check.

How it runs.  The torture scenarios run in a few fork servers (torture_forks.py), which import
everything once and fork a child per scenario: a fresh interpreter per scenario would cost
seconds of valgrind start-up each.  Each test file runs in one pytest process.  Children are
traced (``--trace-children=yes``): the tests' isolated subprocesses run under valgrind too.
Jobs run ``--jobs`` at a time (default: one per CPU), longest first.  By default: every torture
scenario and tests/test_misuse.py, about 500 CPU-seconds, 5-6 minutes on 2 vCPUs; ``--full``
adds the lifetime, buffer, buffer-ring and state-machine test files (about 960 CPU-seconds,
10 minutes).  Exit status: 0 clean, 1 an error in our code or a check that could not run (a job
that crashed, timed out or collected no test), 2 valgrind missing.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)
TORTURE_RUNNER = os.path.join(TESTS, "torture", "run.py")
FORK_RUNNER = os.path.join(HERE, "torture_forks.py")
SUPPRESSIONS = os.path.join(HERE, "python.supp")

SKIP_STATUS = 77  # tests/torture/harness.py: the kernel lacks what the scenario needs

#: The safety test files run by default, each in one pytest process: with the torture scenarios
#: they fill the time budget (about 5 minutes on 2 vCPUs, about 500 CPU-seconds).
DEFAULT_PYTEST_FILES = ("tests/test_misuse.py",)
#: Added by --full (about 450 CPU-seconds more: about 10 minutes on 2 vCPUs all told).
EXTRA_PYTEST_FILES = (
    "tests/test_lifetimes.py",
    "tests/test_buffers.py",
    "tests/test_buffer_rings.py",
    "tests/test_state_machine.py",
)
#: The `slow` stress tests are left out: they repeat the same paths many times over.
PYTEST_MARKS = "not slow"

#: Before valgrind 3.23 (bug 428364) a thread blocked in io_uring_enter keeps valgrind's thread
#: lock: no other thread of the process runs and no signal is delivered until the wait returns.
#: What needs either while the ring's owner waits cannot pass under such a valgrind; the tests
#: below are left out there (they would only wait out their timeouts, or forever), each for that
#: reason.  ``--scenario NAME`` runs a scenario all the same.
VALGRIND_THREADS_FIXED = (3, 23)
PYTEST_DESELECT: dict[str, tuple[str, ...]] = {
    "test_buffer_rings.py": (  # a thread feeds the socket or pipe the ring waits on
        "test_recv_multishot_socketpair_stream_through_tiny_ring",
        "test_recv_multishot_tcp_stream_through_tiny_ring",
        "test_recv_multishot_iteration_releasing_each",
        "test_read_multishot_pipe_stream_ends_at_eof",
        "test_closed_and_reused_fd_number_does_not_redirect_starved_op",
    ),
}
TORTURE_DESELECT = (
    "keyboard_interrupt_during_wait_loses_nothing",         # SIGINT must interrupt the wait
    "keyboard_interrupt_during_run_iteration_and_close",    # the same, inside run() and close()
    "interpreter_exit_with_thread_blocked_in_wait",         # the exit must run while it waits
)
#: CPU seconds under valgrind (2 vCPUs, ``-m "not slow"``), for scheduling longest first.
PYTEST_COST = {"test_misuse.py": 170, "test_buffers.py": 165, "test_buffer_rings.py": 135,
               "test_lifetimes.py": 110, "test_state_machine.py": 85}

#: Error kinds that fail the run when our code is on the stack (valgrind's XML names;
#: "SyscallParam" covers every "Syscall param ... points to uninitialised byte(s)").
COUNTED_KINDS = frozenset({
    "InvalidRead", "InvalidWrite", "InvalidFree", "MismatchedFree", "InvalidJump", "Overlap",
    "UninitCondition", "UninitValue", "SyscallParam", "FishyValue", "ClientCheck",
    "InvalidMemPool", "ReallocSizeZero",
})

#: Kinds about uninitialised values: those are checked again with --track-origins before they
#: count (see CPYTHON_ZERO_INT).
UNINIT_KINDS = frozenset({"UninitCondition", "UninitValue", "SyscallParam"})

#: CPython 3.11 builds a zero-valued int with no digits (int.from_bytes of zero bytes, int("0"),
#: then arithmetic on such ints) and reads its unset first digit times its size, 0; memcheck
#: cannot see that the product is 0, so the "small int" pointer it picks and every value computed
#: from it count as uninitialised.  Passed to one of our calls, such a 0 shows up in cffi's
#: conversion.  With --track-origins the error names the int's allocation in _PyLong_New:
#: that origin is CPython's, and the error is not counted.
CPYTHON_ZERO_INT = "_PyLong_New"

#: Objects whose frames make an error ours: the extension, liburing, cffi's backend (only
#: saferring uses cffi in these processes).
OUR_OBJECTS = re.compile(r"(^|/)(_uring[^/]*\.so|liburing[^/]*\.so[^/]*|_cffi_backend[^/]*\.so)$")
#: Functions that are ours even when valgrind cannot name the object (inlined, stripped).
OUR_FUNCTIONS = re.compile(r"^(sr_|_cffi_f_sr_|_cffi_f_io_uring_|io_uring_|__io_uring_)")


# -- valgrind's command line ---------------------------------------------------------------------

def valgrind_path() -> str | None:
    """The valgrind executable on PATH, or None."""
    return shutil.which("valgrind")


def valgrind_version() -> str:
    out = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def valgrind_runs_threads_while_io_uring_waits() -> bool:
    """Whether this valgrind lets other threads run (and signals arrive) while a thread blocks in
    io_uring_enter (3.23 and later)."""
    m = re.search(r"(\d+)\.(\d+)", valgrind_version())
    return bool(m) and (int(m.group(1)), int(m.group(2))) >= VALGRIND_THREADS_FIXED


def valgrind_command(stem: str, *, trace_children: bool = True, track_origins: bool = False
                     ) -> list[str]:
    """valgrind's argv prefix; each process writes ``STEM.PID.xml`` and ``STEM.PID.log``.

    ``%p`` in the file names is what keeps processes apart: a forked child (the torture fork
    server's scenarios, ``os.fork`` in tests) and a traced exec each get files of their own.
    """
    return [
        "valgrind", "--tool=memcheck",
        "--xml=yes", f"--xml-file={stem}.%p.xml", f"--log-file={stem}.%p.log",
        # Leak checking off.  valgrind 3.19 still writes leak records in XML mode unless the kinds
        # shown are also none.
        "--leak-check=no", "--show-leak-kinds=none", "--errors-for-leak-kinds=none",
        "--error-limit=no", "--num-callers=40", "--vgdb=no",
        f"--suppressions={SUPPRESSIONS}",
        f"--trace-children={'yes' if trace_children else 'no'}",
        f"--track-origins={'yes' if track_origins else 'no'}",
    ]


def checked_env() -> dict[str, str]:
    """The environment for checked processes: CPython's own allocator off, so that every object is
    a malloc block valgrind tracks (pymalloc's arenas would hide use-after-free inside them)."""
    return {**os.environ, "PYTHONMALLOC": "malloc"}


def wrap(command: Sequence[str], stem: str) -> list[str]:
    """``command`` run under valgrind as this driver runs it, writing ``STEM.*.xml``: for callers
    that start the process themselves (tests/torture/test_torture.py with SAFERRING_MEMCHECK=1).
    Files left by an earlier run with the same stem are removed first."""
    for stale in glob.glob(glob.escape(stem) + ".*.xml") + glob.glob(glob.escape(stem) + ".*.log"):
        os.unlink(stale)
    return ["env", "PYTHONMALLOC=malloc", *valgrind_command(stem), *command]


def errors_in_our_code(stem: str) -> list[str]:
    """The counted errors of the run that wrote ``STEM.*.xml`` (and unhandled io_uring system
    calls), rendered for an assertion message; empty when clean."""
    procs, unhandled = judge(stem)
    found = [e.render() for e in counted_errors(procs)]
    return found + [u for u in unhandled if re.search(r"syscall: 42[5-7]\b", u)]


# -- reading valgrind's XML ----------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    fn: str
    obj: str
    file: str
    line: str

    def ours(self) -> bool:
        return bool(OUR_OBJECTS.search(self.obj) or OUR_FUNCTIONS.match(self.fn))

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.file else os.path.basename(self.obj) or "?"
        return f"{self.fn or '???'} ({where})"


@dataclass
class VgError:
    kind: str
    what: str
    stacks: list[tuple[str, list[Frame]]]  # (heading, frames); the first heading is ""
    count: int = 1
    pid: int = 0
    where: str = ""  # the job, scenario or test process it came from

    def ours(self) -> bool:
        return any(f.ours() for _, frames in self.stacks for f in frames)

    def counted(self) -> bool:
        return self.kind in COUNTED_KINDS and self.ours() and not self.cpython_zero_int()

    def cpython_zero_int(self) -> bool:
        """Whether every origin valgrind gave is CPython's digit-less zero int (needs
        --track-origins; False without origins)."""
        origins = [frames for heading, frames in self.stacks
                   if heading.startswith("Uninitialised value was created")]
        return bool(origins) and all(
            any(f.fn == CPYTHON_ZERO_INT for f in frames[:3]) for frames in origins)

    def signature(self) -> tuple[str, tuple[str, ...]]:
        return self.kind, tuple(f.fn for f in self.stacks[0][1][:6]) if self.stacks else ()

    def render(self, max_frames: int = 18) -> str:
        lines = [f"{self.kind}: {self.what}  [{self.where}, pid {self.pid}, x{self.count}]"]
        for heading, frames in self.stacks:
            if heading:
                lines.append(f"  {heading}")
            for i, f in enumerate(frames[:max_frames]):
                lines.append(f"    {'at' if i == 0 else 'by'} {f}")
            if len(frames) > max_frames:
                lines.append(f"    ... {len(frames) - max_frames} more")
        return "\n".join(lines)


@dataclass
class VgProcess:
    pid: int
    ppid: int
    argv: list[str]
    errors: list[VgError]
    finished: bool


def _text(elem: ET.Element | None, tag: str) -> str:
    if elem is None:
        return ""
    found = elem.find(tag)
    return (found.text or "") if found is not None else ""


def _frames(stack: ET.Element) -> list[Frame]:
    return [Frame(_text(f, "fn"), _text(f, "obj"), _text(f, "file"), _text(f, "line"))
            for f in stack.findall("frame")]


def parse_xml(path: str) -> list[VgProcess]:
    """The processes in one valgrind XML file.

    valgrind 3.19 gives a traced exec a file of its own (``%p``) but a forked child keeps writing
    to its parent's file: the child's document (with its own ``<pid>``) follows the parent's.  A
    document cut short (a timeout's SIGKILL) or mixed with another process's writes still yields
    the complete ``<error>`` elements in it.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [_parse_document(doc) for doc in re.split(r"(?=<\?xml )", text) if doc.strip()]


_ERROR_ELEMENT = re.compile(r"<error>.*?</error>", re.S)


def _parse_document(text: str) -> VgProcess:
    finished = "</valgrindoutput>" in text
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        # Unfinished or interleaved: keep the header fields and every whole <error>.
        pid = re.search(r"<pid>(\d+)</pid>", text)
        ppid = re.search(r"<ppid>(\d+)</ppid>", text)
        root = ET.fromstring(
            "<valgrindoutput>"
            + (f"<pid>{pid.group(1)}</pid>" if pid else "")
            + (f"<ppid>{ppid.group(1)}</ppid>" if ppid else "")
            + "".join(m.group(0) for m in _ERROR_ELEMENT.finditer(text))
            + "</valgrindoutput>")
        finished = False
    counts: dict[str, int] = {}
    for pair in root.iterfind("errorcounts/pair"):
        counts[_text(pair, "unique")] = int(_text(pair, "count") or 1)
    pid = int(_text(root, "pid") or 0)
    errors = []
    for e in root.iterfind("error"):
        what = _text(e, "what") or _text(e.find("xwhat"), "text")
        stacks: list[tuple[str, list[Frame]]] = []
        heading = ""
        for child in e:
            if child.tag == "auxwhat":
                heading = child.text or ""
            elif child.tag == "xauxwhat":
                heading = _text(child, "text")
            elif child.tag == "origin":
                st = child.find("stack")
                if st is not None:
                    stacks.append((_text(child, "what"), _frames(st)))
            elif child.tag == "stack":
                stacks.append((heading, _frames(child)))
                heading = ""
        errors.append(VgError(_text(e, "kind"), what, stacks,
                              counts.get(_text(e, "unique"), 1), pid))
    argv = [_text(root.find("args/argv"), "exe")]
    argv += [a.text or "" for a in root.iterfind("args/argv/arg")]
    return VgProcess(pid, int(_text(root, "ppid") or 0), argv, errors, finished)


def unhandled_syscalls(log_paths: Iterable[str]) -> list[str]:
    """valgrind's "unhandled syscall" warnings: such a call fails with ENOSYS under valgrind."""
    found = []
    for path in log_paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            found += [line.strip() for line in f if "unhandled" in line and "syscall" in line]
    return found


def judge(stem: str) -> tuple[list[VgProcess], list[str]]:
    """Every process of one valgrind run (``STEM.*.xml``), and its unhandled-syscall warnings."""
    procs = [proc for path in sorted(glob.glob(glob.escape(stem) + ".*.xml"))
             for proc in parse_xml(path)]
    return procs, unhandled_syscalls(sorted(glob.glob(glob.escape(stem) + ".*.log")))


def counted_errors(procs: Iterable[VgProcess]) -> list[VgError]:
    return [e for p in procs for e in p.errors if e.counted()]


# -- jobs ----------------------------------------------------------------------------------------

@dataclass
class Job:
    label: str
    argv: list[str]  # the Python command; valgrind's is put in front
    cost: float      # estimated CPU seconds under valgrind, for scheduling longest first
    timeout: float
    scenarios: list[str] = field(default_factory=list)
    rerun: bool = False  # a --track-origins rerun (see confirm_uninitialised)
    # results
    returncode: int | None = None
    stdout: str = ""  # with stderr
    seconds: float = 0.0
    cpu: float = 0.0
    stem: str = ""
    procs: list[VgProcess] = field(default_factory=list)
    unhandled: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # the check itself did not run: counted
    notes: list[str] = field(default_factory=list)     # tests failing under valgrind: not counted
    skipped: int = 0


def torture_names(selected: Sequence[str]) -> list[str]:
    out = subprocess.run([sys.executable, TORTURE_RUNNER, "--list"], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    names = out.stdout.split()
    if selected:
        unknown = sorted(set(selected) - set(names))
        if unknown:
            sys.exit(f"memcheck: no such torture scenario: {', '.join(unknown)}")
        names = [n for n in names if n in selected]
    return names


def torture_jobs(names: Sequence[str], parts: int, timeout: float, time_limit: float,
                 modules: Sequence[str] = ()) -> list[Job]:
    """The scenarios dealt round-robin into ``parts`` fork-server processes (``modules``: extra
    scenario files for the fork servers to import; ``time_limit``: seconds per scenario)."""
    parts = max(1, min(parts, len(names)))
    extra = [arg for path in modules for arg in ("--module", os.path.abspath(path))]
    jobs = []
    for i in range(parts):
        chunk = list(names[i::parts])
        argv = [sys.executable, FORK_RUNNER, "--time-limit", str(time_limit), *extra, *chunk]
        jobs.append(Job(f"torture-{i + 1}of{parts}", argv, cost=20 + 4.0 * len(chunk),
                        timeout=timeout, scenarios=chunk))
    return jobs


def pytest_jobs(files: Sequence[str], marks: str, timeout: float, deselect: bool) -> list[Job]:
    """One job per test file (``deselect``: leave out PYTEST_DESELECT's tests)."""
    jobs = []
    for path in files:
        argv = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "-o", "addopts=-ra --strict-markers"]
        if marks:
            argv += ["-m", marks]
        name = os.path.basename(path)
        for test in PYTEST_DESELECT.get(name, ()) if deselect else ():
            argv += ["--deselect", f"{path}::{test}"]
        argv.append(path)
        label = f"pytest-{name[:-3] if name.endswith('.py') else name}"
        jobs.append(Job(label, argv, cost=PYTEST_COST.get(name, 150), timeout=timeout))
    return jobs


def run_job(job: Job, outdir: str, trace_children: bool, track_origins: bool) -> None:
    """Run one job under valgrind and read what it left."""
    job.stem = os.path.join(outdir, job.label)
    cmd = valgrind_command(job.stem, trace_children=trace_children,
                           track_origins=track_origins) + job.argv
    start = time.monotonic()
    # A session of its own: on a timeout the whole tree goes (the fork server's children and the
    # tests' subprocesses are valgrind processes too).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", env=checked_env(), cwd=ROOT, start_new_session=True)
    output: dict[str, str] = {}

    def drain(key: str, stream: IO[str]) -> None:
        output[key] = stream.read()

    assert proc.stdout is not None
    # One stream: a scenario's traceback (stderr) stays between its MEMCHECK- lines.
    reader = threading.Thread(target=drain, args=("out", proc.stdout))
    reader.start()
    # os.wait4, not Popen.wait: it also says how much CPU the job used (its waited-for
    # descendants included), the measure that does not depend on how loaded the machine is.
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - start > job.timeout:
            _kill_group(proc.pid)
            job.failures.append(f"{job.label}: timed out after {job.timeout:.0f} s")
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    proc.returncode = job.returncode = os.waitstatus_to_exitcode(status)
    _kill_group(proc.pid)  # anything the job left behind would keep the pipes open
    reader.join()
    job.stdout = output.get("out", "")
    with open(job.stem + ".out", "w") as f:  # kept with valgrind's files (--out)
        f.write(job.stdout)
    job.seconds, job.cpu = time.monotonic() - start, usage.ru_utime + usage.ru_stime
    job.procs, job.unhandled = judge(job.stem)
    if job.scenarios:
        _check_torture(job)
    else:
        _check_pytest(job)
    _attribute(job)


def _kill_group(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the job's tree: the fork server puts each
    scenario in a process group of its own, inside the session)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            try:
                os.kill(int(entry), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


_SCENARIO_LINE = re.compile(
    r"^MEMCHECK-SCENARIO (\S+) pid=(\d+) status=(-?\d+|timeout) cpu=([\d.]+) wall=([\d.]+)$", re.M)
_BEGIN_LINE = re.compile(r"^MEMCHECK-BEGIN (\S+)$", re.M)


def _check_torture(job: Job) -> None:
    """Each scenario's status, as the fork server reported it: 0 passed, 77 skipped; a failure or
    the time limit is a note (the scenario's memory errors up to then are read all the same)."""
    seen = {m.group(1): m.group(3) for m in _SCENARIO_LINE.finditer(job.stdout)}
    for name in job.scenarios:
        status = seen.get(name)
        if status is None:
            if not job.failures:
                job.failures.append(f"{job.label}: scenario {name} did not run to the end "
                                    f"(fork server exit {job.returncode})\n{job.stdout[-3000:]}")
            continue
        if status == str(SKIP_STATUS):
            job.skipped += 1
        elif status == "timeout":
            job.notes.append(f"scenario {name}: stopped at the time limit under valgrind")
        elif status != "0":
            begin = job.stdout.find(f"MEMCHECK-BEGIN {name}\n")
            end = job.stdout.find(f"MEMCHECK-SCENARIO {name} ", begin)
            tail = "\n".join(job.stdout[begin:end].strip().splitlines()[-8:])
            job.notes.append(f"scenario {name}: exit {status} under valgrind\n{tail}")


def _check_pytest(job: Job) -> None:
    """pytest's status: 0 passed, 1 some tests failed (a note), anything else (interrupted,
    internal error, usage error, no tests) means the file was not checked: a failure."""
    if job.returncode == 0 or job.failures:
        return
    lines = job.stdout.strip().splitlines()
    if job.returncode == 1:
        failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
        job.notes.append(f"{job.label}: {len(failed)} test(s) failed under valgrind\n"
                         + "\n".join(failed[:20]))
    else:
        job.failures.append(f"{job.label}: pytest exit {job.returncode}\n" + "\n".join(lines[-40:]))


def _attribute(job: Job) -> None:
    """Name the source of each error: the scenario whose forked child (or its descendant) it came
    from, else the job."""
    by_pid = {int(m.group(2)): m.group(1) for m in _SCENARIO_LINE.finditer(job.stdout)}
    parent = {p.pid: p.ppid for p in job.procs}
    for p in job.procs:
        where, pid, hops = job.label, p.pid, 0
        while pid and hops < 20:
            if pid in by_pid:
                where = f"scenario {by_pid[pid]}"
                break
            pid, hops = parent.get(pid, 0), hops + 1
        if where == job.label and job.scenarios:
            where = f"{job.label} (fork server)"
        for e in p.errors:
            e.where = where


def run_all(jobs: list[Job], workers: int, outdir: str, trace_children: bool,
            track_origins: bool, progress: bool = True) -> None:
    """Run the jobs, ``workers`` at a time, longest first."""
    queue = sorted(jobs, key=lambda j: -j.cost)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            run_job(job, outdir, trace_children, track_origins)
            if progress:
                n = len(counted_errors(job.procs))
                with lock:
                    print(f"memcheck: {job.label}: {job.seconds:.0f} s, {job.cpu:.0f} CPU-s, "
                          f"{len(job.procs)} process(es), {n} error(s) in our code", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def confirm_uninitialised(jobs: list[Job], workers: int, outdir: str, trace_children: bool,
                          time_limit: float, modules: Sequence[str], progress: bool = True
                          ) -> list[Job]:
    """Run again, with --track-origins, what reported uninitialised values in our code (only the
    scenarios concerned; a test file whole): the second run's verdict replaces the first's for
    those kinds, so CPython's zero-int imprecision (CPYTHON_ZERO_INT) is not counted.  Returns
    the extra jobs."""
    again = []
    for job in jobs:
        suspects = [e for p in job.procs for e in p.errors if e.counted() and e.kind in UNINIT_KINDS]
        if not suspects:
            continue
        if job.scenarios:
            names = sorted({e.where.removeprefix("scenario ") for e in suspects
                            if e.where.startswith("scenario ")}) or job.scenarios
            rerun = torture_jobs(names, 1, job.timeout, time_limit, modules)[0]
        else:
            rerun = Job(job.label, job.argv, job.cost, job.timeout)
        rerun.label, rerun.rerun = f"{job.label}-origins", True
        for p in job.procs:
            p.errors = [e for e in p.errors if e.kind not in UNINIT_KINDS]
        again.append(rerun)
    if again and progress:
        print(f"memcheck: uninitialised values in our code: {', '.join(j.label for j in again)} "
              f"with --track-origins, to tell them from CPython's zero ints", flush=True)
    run_all(again, workers, outdir, trace_children, True, progress)
    for job in again:  # counted once, in the first run
        job.failures.clear()
        job.notes.clear()
        job.skipped = 0
    return again


# -- the report ----------------------------------------------------------------------------------

def report(jobs: list[Job], wall: float, left_out: Sequence[str] = ()) -> int:
    """Print what was found; the exit status (0 clean, 1 errors in our code or a check that did
    not run)."""
    procs = [p for j in jobs for p in j.procs]
    ours: dict[tuple[str, tuple[str, ...], str], VgError] = {}
    others: dict[tuple[str, tuple[str, ...]], list[VgError]] = {}
    zero_ints = 0
    for p in procs:
        for e in p.errors:
            if e.counted():
                key = (*e.signature(), e.where)
                if key in ours:
                    ours[key].count += e.count
                else:
                    ours[key] = e
            elif e.ours() and e.cpython_zero_int():
                zero_ints += 1
            else:
                others.setdefault(e.signature(), []).append(e)
    failures = [f for j in jobs for f in j.failures]
    notes = [n for j in jobs for n in j.notes]
    unhandled = sorted({u for j in jobs for u in j.unhandled})
    uring_unhandled = [u for u in unhandled if re.search(r"syscall: 42[5-7]\b", u)]
    first = [j for j in jobs if not j.rerun]
    scenarios = sum(len(j.scenarios) for j in first)
    skipped = sum(j.skipped for j in first)
    tests = sum(_pytest_passed(j.stdout) for j in first if not j.scenarios)
    cpu = sum(j.cpu for j in jobs)

    if others:
        print(f"\nmemcheck: {sum(len(v) for v in others.values())} error report(s) outside "
              f"saferring's code, or of kinds not checked (not counted):")
        for (kind, fns), errs in sorted(others.items(), key=lambda kv: -len(kv[1]))[:8]:
            print(f"  {kind} x{sum(e.count for e in errs)} in {len(errs)} report(s): "
                  f"{' < '.join(fn for fn in fns[:4] if fn)}")
    if zero_ints:
        print(f"memcheck: {zero_ints} uninitialised-value report(s) through our code came from "
              f"CPython's digit-less zero ints ({CPYTHON_ZERO_INT}): not counted")
    if notes:
        print("\nmemcheck: not counted (behaviour is the normal suite's to check; under valgrind "
              "threads take turns, and before valgrind 3.23 none runs while another waits in "
              "io_uring_enter):")
        for n in notes:
            print("  " + n.replace("\n", "\n    "))
    if left_out:
        print(f"memcheck: left out under valgrind < {'.'.join(map(str, VALGRIND_THREADS_FIXED))} "
              f"(they need a thread or a signal while the ring's owner waits): {', '.join(left_out)}")
    for u in unhandled:
        print(f"memcheck: valgrind warning: {u}")
    for f in failures:
        print(f"\nmemcheck: FAILED {f}")
    for i, e in enumerate(ours.values(), 1):
        print(f"\n[{i}] {e.render()}")
    print(f"\nmemcheck: {valgrind_version()}, {len(jobs)} job(s), {len(procs)} process(es) checked: "
          f"{scenarios} torture scenario(s) ({skipped} skipped), {tests} test(s) passed, "
          f"{len(notes)} note(s); {len(ours)} error(s) in saferring's code, "
          f"{len(failures)} failure(s); {wall:.0f} s, {cpu:.0f} CPU-s")
    return 1 if ours or failures or uring_unhandled else 0


def _pytest_passed(stdout: str) -> int:
    m = re.search(r"(\d+) passed", stdout)
    return int(m.group(1)) if m else 0


# -- command line --------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="valgrind processes at once (default: one per CPU)")
    ap.add_argument("--only", choices=("all", "torture", "pytest"), default="all")
    ap.add_argument("--full", action="store_true",
                    help=f"also {', '.join(EXTRA_PYTEST_FILES)} (slower: see the module docstring)")
    ap.add_argument("--scenario", action="append", default=[], metavar="NAME",
                    help="only these torture scenarios (repeatable)")
    ap.add_argument("--scenario-module", action="append", default=[], metavar="FILE",
                    help="also load the scenarios in FILE (needs --scenario; used by the self-test)")
    ap.add_argument("--pytest", action="append", default=[], metavar="FILE",
                    help=f"test files to run (default: {' '.join(DEFAULT_PYTEST_FILES)})")
    ap.add_argument("--marks", default=PYTEST_MARKS, help=f"pytest -m (default: {PYTEST_MARKS!r})")
    ap.add_argument("--torture-parts", type=int, default=0,
                    help="fork-server processes for the scenarios (default: twice --jobs when "
                         "fewer test files than --jobs run beside them, else --jobs)")
    ap.add_argument("--no-trace-children", action="store_true",
                    help="do not run the tests' subprocesses under valgrind")
    ap.add_argument("--track-origins", action="store_true",
                    help="say where uninitialised values came from (about twice as slow)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per job (default 3600)")
    ap.add_argument("--scenario-time-limit", type=float, default=240,
                    help="seconds per torture scenario (default 240)")
    ap.add_argument("--out", help="keep valgrind's files in this directory")
    ap.add_argument("--list", action="store_true", help="print the jobs and exit")
    ap.add_argument("--script", nargs=argparse.REMAINDER, metavar="FILE ARGS",
                    help="check one Python program instead (the rest of the command line)")
    args = ap.parse_args(argv)

    if valgrind_path() is None:
        print("memcheck: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    threads_ok = valgrind_runs_threads_while_io_uring_waits()
    left_out: list[str] = []
    if args.script is not None:
        if not args.script:
            ap.error("--script needs a file")
        jobs = [Job("script", [sys.executable, "-X", "faulthandler", *args.script], 1, args.timeout)]
    else:
        files: list[str] = []
        if args.only in ("all", "pytest"):
            files = args.pytest or [*DEFAULT_PYTEST_FILES, *(EXTRA_PYTEST_FILES if args.full else ())]
        jobs = []
        if args.only in ("all", "torture"):
            if args.scenario_module and not args.scenario:
                ap.error("--scenario-module needs --scenario")
            names = args.scenario if args.scenario_module else torture_names(args.scenario)
            if not args.scenario and not threads_ok:
                left_out = [n for n in names if n in TORTURE_DESELECT]
                names = [n for n in names if n not in TORTURE_DESELECT]
            # More fork servers than CPUs when few test files share the CPUs with them: the
            # longest-first schedule then ends with both CPUs busy.
            parts = args.torture_parts or (args.jobs * 2 if len(files) < args.jobs else args.jobs)
            jobs += torture_jobs(names, parts, args.timeout, args.scenario_time_limit,
                                 args.scenario_module)
        jobs += pytest_jobs(files, args.marks, args.timeout, deselect=not threads_ok)
    if args.list:
        for j in jobs:
            print(f"{j.label}: {' '.join(j.argv[1:])}")
        return 0

    outdir = args.out or tempfile.mkdtemp(prefix="saferring-memcheck-")
    os.makedirs(outdir, exist_ok=True)
    for stale in glob.glob(os.path.join(outdir, "*.[0-9]*.xml")) + glob.glob(
            os.path.join(outdir, "*.[0-9]*.log")):
        os.unlink(stale)
    start = time.monotonic()
    trace = not args.no_trace_children
    run_all(jobs, args.jobs, outdir, trace, args.track_origins, progress=args.script is None)
    if not args.track_origins:
        jobs += confirm_uninitialised(jobs, args.jobs, outdir, trace, args.scenario_time_limit,
                                      args.scenario_module, progress=args.script is None)
    status = report(jobs, time.monotonic() - start, left_out)
    if args.script is not None:
        sys.stdout.write(jobs[0].stdout)
    if args.out:
        print(f"memcheck: valgrind's output is in {outdir}")
    elif status == 0:
        shutil.rmtree(outdir, ignore_errors=True)
    else:
        print(f"memcheck: valgrind's output kept in {outdir}")
    return status


if __name__ == "__main__":
    sys.exit(main())
