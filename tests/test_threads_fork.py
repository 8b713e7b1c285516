"""A ring has one owner thread and belongs to one process: other threads and forked children
get a clear error, never a corrupted ring."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import saferring

from _helpers import run_isolated


def _in_thread(fn: Callable[[], Any]) -> BaseException | None:
    caught: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return caught[0] if caught else None


@pytest.mark.parametrize("call", ["nop", "submit", "wait", "close", "read", "cancel", "run"])
def test_other_thread_gets_wrong_thread_error(ring: saferring.Ring, call: str) -> None:
    """Every ring call from a non-owner thread raises WrongThreadError and changes nothing."""
    pending = ring.timeout(30)
    calls: dict[str, Callable[[], Any]] = {
        "nop": ring.nop, "submit": ring.submit, "wait": lambda: ring.wait(0),
        "close": ring.close, "read": lambda: ring.read(0, bytearray(1)),
        "cancel": pending.cancel, "run": lambda: ring.run(pending),
    }
    exc = _in_thread(calls[call])
    assert isinstance(exc, saferring.WrongThreadError), exc
    assert not ring.closed
    assert ring.stats().in_flight == 1
    pending.cancel()
    assert ring.wait(1) == [pending]


def test_results_readable_from_any_thread(ring: saferring.Ring) -> None:
    """Reading a finished operation's result needs no ring access, so any thread may do it."""
    op = ring.nop()
    ring.run(op)
    seen: list[int] = []
    assert _in_thread(lambda: seen.append(op.result())) is None
    assert seen == [0]


def test_one_ring_per_thread_runs_concurrently() -> None:
    """Rings owned by different threads work side by side."""
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with saferring.Ring(8) as r:
                for _ in range(200):
                    for _ in range(8):
                        r.nop()
                    assert len(r.wait(8)) == 8
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_ring_dropped_in_another_thread_is_drained_there() -> None:
    """A ring whose last reference dies in a foreign thread is drained by its finaliser there:
    the ring's fd is closed (which happens only after the drain) and nothing was kept back."""
    out = run_isolated("""
        import gc, os, threading, saferring
        from saferring.ring import _graveyard
        r, w = os.pipe()
        ring = saferring.Ring(8)
        fd = ring.fd
        ring.read(r, bytearray(8)); ring.submit()
        box = [ring]; del ring
        def drop():
            box.clear(); gc.collect()
        t = threading.Thread(target=drop); t.start(); t.join()
        assert _graveyard == []
        assert not os.path.exists(f"/proc/self/fd/{fd}"), "ring fd must be closed after the drain"
        junk = [bytearray(8) for _ in range(1000)]
        os.write(w, b"x" * 8)
        assert all(j == bytes(8) for j in junk)
        print("ok")
    """)
    assert "ok" in out


def test_single_issuer_ring_dropped_in_foreign_thread_is_kept_not_freed() -> None:
    """When the kernel refuses the finaliser's thread (single_issuer), the ring and its pins are
    kept alive for the life of the process rather than freed under the kernel: data that arrives
    later lands in the kept buffer, and unrelated memory is untouched."""
    out = run_isolated("""
        import gc, os, threading, time, saferring
        from saferring.ring import _graveyard
        from saferring.unsafe import ffi
        r, w = os.pipe()
        ring = saferring.Ring(8, single_issuer=True)
        fd = ring.fd
        ring.read(r, bytearray(8)); ring.submit()
        box = [ring]; del ring
        def drop():
            box.clear(); gc.collect()
        t = threading.Thread(target=drop); t.start(); t.join()
        gc.collect()
        assert len(_graveyard) == 1, _graveyard
        kept = _graveyard[0]
        assert os.path.exists(f"/proc/self/fd/{fd}"), "an undrained ring must not be torn down"
        (op,) = kept._registry.values()
        pin = op._pins
        junk = [bytearray(8) for _ in range(1000)]
        os.write(w, b"y" * 8)
        deadline = time.monotonic() + 5
        while bytes(ffi.buffer(pin)) != b"y" * 8 and time.monotonic() < deadline:
            time.sleep(0.01)   # the kernel completes the read in this thread's task work
        assert bytes(ffi.buffer(pin)) == b"y" * 8
        assert all(j == bytes(8) for j in junk)
        print("ok")
    """)
    assert "ok" in out


def test_forked_child_gets_forked_ring_error_and_parent_is_unaffected() -> None:
    """After fork() the child cannot use the parent's ring (ForkedRingError), may close its copy,
    and the parent's in-flight read still completes with the right data."""
    out = run_isolated("""
        import os, saferring
        r, w = os.pipe()
        ring = saferring.Ring(8)
        buf = bytearray(5)
        op = ring.read(r, buf)
        ring.submit()
        pid = os.fork()
        if pid == 0:
            code = 0
            for call in (ring.nop, ring.submit, ring.wait, op.cancel, lambda: ring.read(r, bytearray(1))):
                try:
                    call()
                    code = 3
                except saferring.ForkedRingError:
                    pass
                except BaseException:
                    code = 4
            ring.close()          # dropping the child's copy is allowed and quiet
            try:
                ring.nop()
                code = 5
            except saferring.RingClosedError:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        os.write(w, b"hello")
        assert ring.run(op) == 5 and buf == b"hello"
        assert ring.run(ring.nop()) == 0
        ring.close()
        print("ok")
    """)
    assert "ok" in out


def test_child_exit_without_close_leaves_parent_ring_working() -> None:
    """A child that exits normally (atexit hooks run) does not disturb the parent's ring."""
    out = run_isolated("""
        import os, sys, saferring
        r, w = os.pipe()
        ring = saferring.Ring(8)
        op = ring.read(r, bytearray(3))
        ring.submit()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)           # normal interpreter exit in the child
        os.waitpid(pid, 0)
        os.write(w, b"abc")
        assert ring.run(op) == 3
        ring.close()
        print("ok")
    """)
    assert "ok" in out
