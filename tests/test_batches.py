"""Batch operations: many SQEs as one operation, their members prepared and reaped in C."""

from __future__ import annotations

import gc
import mmap
import os

import pytest

import saferring
from saferring import OperationStateError, OpState

from _helpers import run_isolated


def test_nop_many_completes_once_with_every_result(ring: saferring.Ring) -> None:
    """nop_many(n) is one operation that finishes once, with n zero results."""
    batch = ring.nop_many(40)
    assert isinstance(batch, saferring.BatchOperation)
    assert batch.count == 40 and batch.state is OpState.QUEUED
    assert ring.wait(1) == [batch]
    assert batch.result() == [0] * 40
    assert batch.state is OpState.COMPLETED
    assert ring.stats().completed == 40
    big = ring.nop_many(1000)  # more members than the SQ holds: flushed as it fills
    assert ring.wait(1) == [big] and big.result() == [0] * 1000


def test_read_many_places_each_block(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """Read i lands at buffer[i*block:(i+1)*block] from offsets[i]."""
    path, data = datafile
    fd = os.open(path, os.O_RDONLY)
    try:
        offsets = [4096 * 7, 0, 123, 4096 * 3]
        buf = bytearray(4 * 512)
        assert ring.run(ring.read_many(fd, buf, offsets, 512)) == [512] * 4
        for i, off in enumerate(offsets):
            assert buf[i * 512:(i + 1) * 512] == data[off:off + 512]
    finally:
        os.close(fd)


def test_write_many_then_read_back(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """write_many writes each block at its offset; a short final read shows in the results."""
    path = os.path.join(os.fspath(tmp_path), "w.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        data = bytes(range(256)) * 4
        assert ring.run(ring.write_many(fd, data, [768, 0, 512, 256], 256)) == [256] * 4
        with open(path, "rb") as f:
            assert f.read() == data[256:512] + data[768:] + data[512:768] + data[:256]
        buf = bytearray(2 * 256)
        assert ring.run(ring.read_many(fd, buf, [0, 1000], 256)) == [256, 24]
    finally:
        os.close(fd)


def test_a_failing_member_fails_the_batch_with_its_error(ring: saferring.Ring) -> None:
    """A batch fails with the first failing member's errno; every raw result stays readable."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    batch = ring.read_many(r, bytearray(64), [0, 0], 32)
    with pytest.raises(OSError) as info:
        ring.run(batch)
    assert info.value.errno == 9 and "member" in str(info.value)
    assert batch.state is OpState.FAILED
    assert batch.results_or_errors() == [-9, -9]


def test_batch_bad_input(ring: saferring.Ring) -> None:
    """Bad batch arguments raise before anything is queued."""
    with pytest.raises(ValueError):
        ring.nop_many(0)
    with pytest.raises(TypeError):
        ring.nop_many(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most"):
        ring.nop_many(70000)
    with pytest.raises(TypeError):
        ring.read_many(0, b"bytes", [0], 1)
    with pytest.raises(ValueError, match="holds"):
        ring.read_many(0, bytearray(10), [0, 8], 8)
    with pytest.raises(ValueError, match=">= 0"):
        ring.read_many(0, bytearray(10), [-1], 8)
    with pytest.raises(ValueError, match="block_size"):
        ring.read_many(0, bytearray(10), [0], 0)
    with pytest.raises(ValueError, match="empty"):
        ring.read_many(0, bytearray(10), [], 8)
    with pytest.raises(TypeError):
        ring.read_many(0, bytearray(10), ["a"], 8)
    assert ring.stats().in_flight == 0


def test_batch_buffer_is_pinned_until_the_last_member(ring: saferring.Ring) -> None:
    """The shared buffer cannot be resized until every member's CQE has arrived."""
    r, w = os.pipe()
    try:
        buf = bytearray(8)
        batch = ring.read_many(r, buf, [0, 0], 4)  # pipes ignore offsets: two 4-byte reads
        ring.submit()
        os.write(w, b"abcd")
        ring.wait(0)
        assert ring.stats().pinned_bytes >= 8
        with pytest.raises(BufferError):
            buf.append(0)
        os.write(w, b"efgh")
        assert ring.run(batch) == [4, 4]
        assert sorted([bytes(buf[:4]), bytes(buf[4:])]) == [b"abcd", b"efgh"]
        buf.append(0)
    finally:
        os.close(r)
        os.close(w)


def test_cancel_batch_cancels_pending_members(ring: saferring.Ring) -> None:
    """cancel() on a batch cancels the members still pending; the batch ends CANCELLED."""
    r, w = os.pipe()
    try:
        batch = ring.read_many(r, bytearray(30), [0, 0, 0], 10)
        ring.submit()
        batch.cancel()
        with pytest.raises(OperationStateError):
            batch.cancel()
        assert ring.wait(1) == [batch]
        assert batch.state is OpState.CANCELLED
        assert batch.results_or_errors() == [-125, -125, -125]
    finally:
        os.close(r)
        os.close(w)


def test_result_before_completion_refused(ring: saferring.Ring) -> None:
    """A batch's results are not readable before it finished."""
    batch = ring.nop_many(3)
    with pytest.raises(OperationStateError):
        batch.result()
    with pytest.raises(OperationStateError):
        batch.results_or_errors()
    ring.wait(1)


def test_many_batches_in_flight_on_a_tiny_ring() -> None:
    """Hundreds of batches through a 4-entry ring (SQ full, CQ overflow): each ends once."""
    with saferring.Ring(4) as ring:
        batches = [ring.nop_many(17) for _ in range(300)]
        seen: list[saferring.Operation[object]] = []
        while len(seen) < len(batches):
            seen += ring.wait(1)
        assert sorted(b.user_data for b in seen) == sorted(b.user_data for b in batches)
        assert all(b.result() == [0] * 17 for b in batches)


def test_more_batches_than_the_batch_table_holds() -> None:
    """More batches in flight than the C table has slots: saferring reaps and carries on."""
    with saferring.Ring(64) as ring:
        r, w = os.pipe()
        try:
            pending = [ring.read_many(r, bytearray(1), [0], 1) for _ in range(10)]
            nops = [ring.nop_many(1) for _ in range(5000)]  # the table has 4096 slots
            for b in pending:
                b.cancel()
            ring.wait(len(ring._registry) + len(ring._ready))
            assert all(b.state is OpState.CANCELLED for b in pending)
            assert all(b.result() == [0] for b in nops)
        finally:
            os.close(r)
            os.close(w)


def test_forged_member_user_data_is_ignored(ring: saferring.Ring) -> None:
    """A CQE whose user_data merely looks like a batch member (never issued) changes nothing."""
    batch = ring.nop_many(2)
    ring.run(batch)
    forged = 1 << 63 | 12345 << 16 | 1
    from saferring.unsafe import ffi, lib
    sqe = lib.io_uring_get_sqe(ffi.addressof(ring._c.ring))
    lib.io_uring_prep_nop(sqe)
    sqe.user_data = forged
    ring.submit()
    ring.wait(0)
    assert ring.stats().in_flight == 0
    assert batch.result() == [0, 0]


def test_close_with_batches_in_flight() -> None:
    """close() cancels and drains batches; the buffer is released after the last member."""
    out = run_isolated("""
        import gc, os, saferring
        from saferring.ring import _graveyard
        r, w = os.pipe()
        ring = saferring.Ring(8)
        m = __import__("mmap").mmap(-1, 4096)
        batch = ring.read_many(r, m, [0] * 8, 512)
        ring.submit()
        try:
            m.close()
            raise SystemExit("pinned mmap closed")
        except BufferError:
            pass
        ring.close()
        assert batch.state is saferring.OpState.CANCELLED, batch
        del batch
        gc.collect()
        m.close()   # the export is gone once the batch ended
        os.write(w, b"x" * 4096)
        print("ok")
    """)
    assert "ok" in out
    gc.collect()


def test_batch_with_mmap_target(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """read_many accepts an mmap as the target buffer."""
    path, data = datafile
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(-1, 8192)
    try:
        assert ring.run(ring.read_many(fd, m, [0, 4096], 4096)) == [4096, 4096]
        assert m[:] == data[:8192]
    finally:
        os.close(fd)
        m.close()
