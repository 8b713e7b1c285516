"""Creating, configuring and closing rings; features; the platform and build checks."""

from __future__ import annotations

import os

import pytest

import saferring
from saferring import RingClosedError
from saferring.features import OPCODES, kernel_can

from _helpers import run_isolated


def test_context_manager_closes_and_close_is_idempotent() -> None:
    """Leaving the with-block closes the ring; close() again is a no-op."""
    with saferring.Ring(8) as ring:
        fd = ring.fd
        assert os.path.exists(f"/proc/self/fd/{fd}")
        assert not ring.closed
    assert ring.closed
    ring.close()
    assert ring.closed
    link = f"/proc/self/fd/{fd}"
    assert not os.path.exists(link) or os.readlink(link) != "anon_inode:[io_uring]"


def test_closed_ring_refuses_everything() -> None:
    """Every call on a closed ring raises RingClosedError."""
    ring = saferring.Ring(8)
    ring.close()
    calls = [ring.nop, lambda: ring.read(0, bytearray(1)), lambda: ring.write(1, b"x"),
             lambda: ring.readv(0, [bytearray(1)]), lambda: ring.writev(1, [b"x"]),
             lambda: ring.fsync(0), lambda: ring.openat("x"), lambda: ring.close_fd(0),
             lambda: ring.statx("x"), lambda: ring.timeout(1), ring.submit, ring.wait,
             lambda: ring.fd]
    for call in calls:
        with pytest.raises(RingClosedError):
            call()
    assert ring.stats().in_flight == 0  # stats stay readable


@pytest.mark.parametrize("kwargs", [
    {"sqpoll": True}, {"sqpoll": True, "sq_thread_idle": 50}, {"single_issuer": True},
    {"coop_taskrun": True}, {"single_issuer": True, "defer_taskrun": True},
    {"cq_entries": 1024},
])
def test_setup_flags_work(kwargs: dict[str, object]) -> None:
    """Each supported setup flag gives a ring that runs reads, writes and cancels correctly."""
    with saferring.Ring(16, **kwargs) as ring:  # type: ignore[arg-type]
        r, w = os.pipe()
        try:
            pending = ring.read(r, bytearray(8))
            ops = [ring.nop() for _ in range(40)]
            done = ring.wait(40)
            assert {op.user_data for op in ops} <= {op.user_data for op in done} | {pending.user_data}
            os.write(w, b"12345678")
            assert ring.run(pending) == 8
            ring.timeout(30).cancel()
            assert ring.wait(1)[0].state is saferring.OpState.CANCELLED
        finally:
            os.close(r)
            os.close(w)
        if "cq_entries" in kwargs:
            assert ring.features.cq_entries == 1024
        if kwargs.get("sqpoll"):
            assert "SQPOLL" in ring.features.setup_flags


@pytest.mark.parametrize(("kwargs", "exc"), [
    ({"entries": 0}, ValueError), ({"entries": 65536}, ValueError), ({"entries": "8"}, TypeError),
    ({"entries": 8, "cq_entries": 4}, ValueError), ({"entries": 8, "sq_thread_idle": 10}, ValueError),
    ({"entries": 8, "defer_taskrun": True}, ValueError),
    ({"entries": 8, "sqpoll": True, "single_issuer": True, "defer_taskrun": True}, ValueError),
])
def test_bad_ring_arguments(kwargs: dict[str, object], exc: type[Exception]) -> None:
    """Invalid Ring() arguments raise before any kernel call, leaking nothing."""
    with pytest.raises(exc):
        saferring.Ring(**kwargs)  # type: ignore[arg-type]


def test_features_report_kernel_truth() -> None:
    """features lists the probe's opcodes and the setup feature bits under readable names."""
    with saferring.Ring(8) as ring:
        f = ring.features
        assert f.supports("nop") and f.supports("READ") and f.supports("statx")
        assert f.has("nodrop")
        assert f.probe_available
        assert f.sq_entries == 8 and f.cq_entries == 16
        assert f.liburing_version.startswith("2.")
        assert not f.supports("no_such_op")


def test_unsupported_operation_names_op_and_kernel() -> None:
    """An opcode missing from the probe raises UnsupportedOperationError naming it and its release."""
    with saferring.Ring(8) as ring:
        ring._sup[saferring.features.OP["STATX"]] = 0  # what a 5.5 kernel's table looks like
        with pytest.raises(saferring.UnsupportedOperationError, match=r"STATX.*5\.6"):
            ring.statx("/")
        assert ring.stats().in_flight == 0


def test_saferring_error_is_the_base_of_library_errors() -> None:
    """Every library exception derives from SaferRingError; cancellation is also an OSError."""
    for exc in (saferring.UnsupportedPlatformError, saferring.UnsupportedOperationError,
                saferring.RingClosedError, saferring.OperationStateError,
                saferring.BufferBusyError, saferring.ForkedRingError, saferring.WrongThreadError,
                saferring.OperationCancelledError):
        assert issubclass(exc, saferring.SaferRingError)
    assert issubclass(saferring.OperationCancelledError, OSError)
    assert issubclass(saferring.BufferBusyError, BufferError)


def test_other_platform_imports_and_refuses_ring() -> None:
    """Where io_uring cannot exist the package imports, and Ring() raises UnsupportedPlatformError."""
    out = run_isolated("""
        import sys
        sys.platform = "darwin"
        import saferring
        try:
            saferring.Ring()
        except saferring.UnsupportedPlatformError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("Ring() worked on a non-Linux platform")
        import saferring.unsafe
        assert saferring.unsafe.lib is None
    """)
    assert "refused: " in out and "darwin" in out


def test_stale_compiled_module_fails_loudly() -> None:
    """A compiled module stamped with another version makes the import fail with a clear message."""
    out = run_isolated("""
        import importlib, sys
        import saferring._version as v
        v.__version__ = "0.0.0-other"   # as if the Python files were upgraded, not the .so
        del sys.modules["saferring._binding"]
        try:
            importlib.import_module("saferring._binding")
        except ImportError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("stale module imported")
    """)
    assert "stale" in out and "0.0.0-other" in out


def test_io_uring_refused_by_the_system_says_why() -> None:
    """io_uring_setup returning EPERM (seccomp, io_uring_disabled) raises a clear PermissionError."""
    out = run_isolated("""
        import errno
        from saferring import ring as ring_mod
        exc = ring_mod._setup_error(errno.EPERM, 8, [], None, None)
        assert isinstance(exc, PermissionError), exc
        assert "io_uring_disabled" in str(exc)
        exc = ring_mod._setup_error(errno.ENOSYS, 8, [], None, None)
        import saferring
        assert isinstance(exc, saferring.UnsupportedPlatformError)
        print("ok")
    """)
    assert "ok" in out


def test_cli_info_and_demo_run() -> None:
    """python -m saferring info and demo run to the end."""
    import subprocess
    import sys
    info = subprocess.run([sys.executable, "-m", "saferring", "info"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert "io_uring  available" in info.stdout
    # The table's "here" column is the kernel's answer, row by row.
    rows = {line[:35].strip(): line[35:].split()[1] for line in info.stdout.splitlines()
            if line.startswith("  ") and line[35:].split()[1:2] in (["yes"], ["no"])}
    assert rows["buffer rings (BufferRing)"] == ("yes" if kernel_can("BUF_RING") else "no")
    assert rows["multishot receive"] == ("yes" if kernel_can("RECV_MULTISHOT") else "no")
    assert len(rows) == 10
    # Each opcode is listed once under its release, marked "-" where this kernel lacks it.
    with saferring.Ring(4) as probe_ring:
        have = probe_ring.features.opcodes
    words = {w for line in info.stdout.split("io_uring opcodes")[1].split("Kernel features")[0]
             .splitlines()[3:] for w in line.split()[1 if line[2:3].isdigit() else 0:]}
    for op in OPCODES:
        assert (op.name.lower() if op.name in have else f"-{op.name.lower()}") in words, op.name
    demo = subprocess.run([sys.executable, "-m", "saferring", "demo"], capture_output=True,
                          text=True, timeout=60, check=True)
    assert "nothing leaked" in demo.stdout


def test_unsafe_layer_is_raw_liburing() -> None:
    """saferring.unsafe exposes liburing itself: a raw NOP round trip works through it."""
    from saferring.unsafe import ffi, lib
    ring = ffi.new("struct io_uring *")
    assert lib.io_uring_queue_init(8, ring, 0) == 0
    try:
        sqe = lib.io_uring_get_sqe(ring)
        lib.io_uring_prep_nop(sqe)
        sqe.user_data = 77
        assert lib.io_uring_submit_and_wait(ring, 1) == 1
        cqe = ffi.new("struct io_uring_cqe **")
        assert lib.io_uring_peek_cqe(ring, cqe) == 0
        assert (cqe[0].user_data, cqe[0].res) == (77, 0)
        lib.io_uring_cqe_seen(ring, cqe[0])
    finally:
        lib.io_uring_queue_exit(ring)
