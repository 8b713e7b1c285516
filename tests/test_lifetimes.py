"""The registry's promise: memory the kernel may touch stays alive and unmovable until the final
CQE, whatever the caller does meanwhile.  Scenarios that would corrupt memory if the promise broke
run in a subprocess, so a crash is a failed test."""

from __future__ import annotations

import gc
import mmap
import os
import weakref

import pytest

import saferring
from saferring import OpState

from _helpers import run_isolated


class Buf(bytearray):
    """A bytearray that can be weakly referenced."""


def test_pinned_bytearray_cannot_be_resized(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """While a read is in flight its bytearray cannot change size; afterwards it can."""
    r, w = pipe
    buf = bytearray(8)
    op = ring.read(r, buf)
    ring.submit()
    with pytest.raises(BufferError):
        buf.extend(b"more")
    with pytest.raises(BufferError):
        del buf[:4]
    os.write(w, b"abcdefgh")
    assert ring.run(op) == 8
    buf.extend(b"!")
    assert buf == b"abcdefgh!"


def test_pinned_mmap_cannot_be_closed_or_resized(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A pinned mmap refuses close() and resize() until the final CQE."""
    r, w = pipe
    m = mmap.mmap(-1, 4096)
    op = ring.read(r, m)
    ring.submit()
    with pytest.raises(BufferError):
        m.close()
    with pytest.raises(BufferError):
        m.resize(8192)
    os.write(w, b"data")
    assert ring.run(op) == 4
    assert m[:4] == b"data"
    m.close()


def test_pinned_memoryview_cannot_be_released(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A memoryview handed to a read cannot be released while the read is in flight."""
    r, w = pipe
    backing = bytearray(8)
    view = memoryview(backing)[2:6]
    op = ring.read(r, view)
    ring.submit()
    with pytest.raises(BufferError):
        view.release()
    with pytest.raises(BufferError):
        backing.append(1)
    os.write(w, b"wxyz")
    assert ring.run(op) == 4
    view.release()
    assert backing == b"\0\0wxyz\0\0"


def test_write_data_pinned_until_completion(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A write's source buffer is pinned too: the kernel reads it after submission."""
    r, w = pipe
    data = bytearray(b"payload")
    op = ring.write(w, data)
    with pytest.raises(BufferError):
        data.clear()
    assert ring.run(op) == 7
    assert os.read(r, 100) == b"payload"
    data.clear()


def test_dropped_buffer_and_op_stay_alive_until_final_cqe(ring: saferring.Ring,
                                                          pipe: tuple[int, int]) -> None:
    """Dropping every reference to the op and its buffer does not free the buffer."""
    r, w = pipe
    buf = Buf(16)
    alive = weakref.ref(buf)
    ring.read(r, buf)
    ring.submit()
    del buf
    gc.collect()
    assert alive() is not None
    assert ring.stats().pinned_bytes == 16
    os.write(w, b"z" * 16)
    (op,) = ring.wait(1)
    assert op.result() == 16
    gc.collect()
    assert alive() is None, "pins must be released after the final CQE"
    assert ring.stats().pinned_bytes == 0


def test_exception_between_submit_and_completion_keeps_pins(ring: saferring.Ring,
                                                            pipe: tuple[int, int]) -> None:
    """An exception unwinding the caller leaves the in-flight read and its buffer intact."""
    r, w = pipe

    def start_and_fail() -> None:
        buf = Buf(4)
        start_and_fail.alive = weakref.ref(buf)  # type: ignore[attr-defined]
        ring.read(r, buf)
        ring.submit()
        raise RuntimeError("caller failed")

    with pytest.raises(RuntimeError):
        start_and_fail()
    gc.collect()
    assert start_and_fail.alive() is not None  # type: ignore[attr-defined]
    os.write(w, b"late")
    (op,) = ring.wait(1)
    assert op.result() == 4


def test_data_lands_in_pinned_buffer_after_every_reference_is_dropped() -> None:
    """The issue's scenario: read from a pipe into a bytearray, drop every reference, collect,
    make thousands of same-size allocations, then let the data arrive.  The data lands in the
    pinned buffer (seen as it is freed after the final CQE) and nothing else changes."""
    out = run_isolated("""
        import gc, os, saferring
        landed = []
        class Buf(bytearray):
            def __del__(self):
                landed.append(bytes(self))
        r, w = os.pipe()
        ring = saferring.Ring(8)
        buf = Buf(b"\\xAA" * 4096)
        op = ring.read(r, buf)
        ring.submit()
        del buf, op
        gc.collect()
        assert landed == [], "buffer freed while the kernel may still write into it"
        others = [bytearray(b"\\x55" * 4096) for _ in range(5000)]
        payload = os.urandom(4096)
        os.write(w, payload)
        (done,) = ring.wait(1)
        assert done.result() == 4096, done
        gc.collect()
        assert landed == [payload], "the data must land in the pinned buffer"
        assert all(o == b"\\x55" * 4096 for o in others), "unrelated memory changed"
        assert ring.stats().pinned_bytes == 0
        ring.close()
        print("ok")
    """)
    assert "ok" in out


def test_close_with_operations_in_flight_waits_for_every_final_cqe() -> None:
    """close() cancels in-flight reads and timeouts, reaps every CQE, then frees the pins;
    data written afterwards goes nowhere and nothing crashes."""
    out = run_isolated("""
        import gc, os, weakref, saferring
        class Buf(bytearray): pass
        pipes = [os.pipe() for _ in range(50)]
        ring = saferring.Ring(16)
        refs, ops = [], []
        for r, w in pipes:
            b = Buf(64)
            refs.append(weakref.ref(b))
            ops.append(ring.read(r, b))
        del b
        ops += [ring.timeout(3600) for _ in range(20)]
        ring.submit()
        gc.collect()
        assert all(ref() is not None for ref in refs)
        ring.close()
        assert ring.closed
        assert {op.state for op in ops} == {saferring.OpState.CANCELLED}, {op.state for op in ops}
        for op in ops:
            try:
                op.result()
            except saferring.OperationCancelledError:
                pass
        del ops
        gc.collect()
        assert all(ref() is None for ref in refs), "pins must be gone after close()"
        junk = [bytearray(64) for _ in range(2000)]
        for r, w in pipes:
            os.write(w, b"x" * 64)
        assert all(j == bytes(64) for j in junk)
        print("ok")
    """)
    assert "ok" in out


def test_unclosed_ring_is_drained_by_the_garbage_collector() -> None:
    """A ring dropped with operations in flight drains itself when collected: no fd, no pin left."""
    out = run_isolated("""
        import gc, os, weakref, saferring
        class Buf(bytearray): pass
        r, w = os.pipe()
        ring = saferring.Ring(8)
        fd = ring.fd
        b = Buf(32)
        ref = weakref.ref(b)
        op = ring.read(r, b)
        ring.submit()
        del b, ring
        gc.collect()
        assert ref() is not None  # the op still references its ring: a cycle, kept by op
        del op
        gc.collect()
        from saferring.ring import _graveyard
        assert _graveyard == []
        # The finaliser exits the ring only after the drain: a closed fd proves both happened.
        assert not os.path.exists(f"/proc/self/fd/{fd}")
        os.write(w, b"x" * 32)
        print("ok")
    """)
    assert "ok" in out


def test_interpreter_exit_with_operations_in_flight() -> None:
    """Exiting with a ring open and reads in flight drains it at exit, without a crash."""
    out = run_isolated("""
        import os, saferring
        r, w = os.pipe()
        ring = saferring.Ring(8)
        for _ in range(5):
            ring.read(r, bytearray(4096))
        ring.submit()
        print("exiting")
    """)
    assert "exiting" in out


def test_cancel_keeps_pins_until_the_targets_own_cqe(ring: saferring.Ring,
                                                    pipe: tuple[int, int]) -> None:
    """A successful cancel does not release the buffer: only the target's final CQE does."""
    r, _w = pipe
    buf = Buf(8)
    alive = weakref.ref(buf)
    op = ring.read(r, buf)
    ring.submit()
    del buf
    op.cancel()
    assert op.cancel_requested
    gc.collect()
    if not op.done():
        assert alive() is not None
    done = ring.wait(1)
    assert done == [op] and op.state is OpState.CANCELLED
    gc.collect()
    assert alive() is None
