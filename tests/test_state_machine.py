"""The operation life cycle (``_state.py``): table-driven steps asserting the whole state, every
illegal call, and full queues that must never lose an operation."""

from __future__ import annotations

import os

import pytest

import saferring
from saferring import OperationStateError, OpState, RingClosedError
from saferring._state import ALLOWED, TRANSITIONS, Action, Event, next_state


def snapshot(op: saferring.Operation[object]) -> tuple[OpState, bool, bool]:
    return op.state, op.done(), op.cancel_requested


def test_transition_table_shape() -> None:
    """Only in-flight states have outgoing moves; terminal states are sticky."""
    sources = {state for state, _event in TRANSITIONS}
    assert sources == {OpState.QUEUED, OpState.SUBMITTED}
    assert next_state(OpState.SUBMITTED, Event.CQE_CANCELLED) is OpState.CANCELLED
    for terminal in (OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED):
        for event in Event:
            with pytest.raises(KeyError):
                next_state(terminal, event)
    assert ALLOWED[Action.RESULT] == {OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED}


def test_life_cycle_success(ring: saferring.Ring) -> None:
    """queued -> submitted -> completed, with the whole observable state checked at each step."""
    op = ring.timeout(0.01)
    assert snapshot(op) == (OpState.QUEUED, False, False)
    with pytest.raises(OperationStateError, match="queued"):
        op.result()
    ring.submit()
    assert snapshot(op) == (OpState.SUBMITTED, False, False)
    with pytest.raises(OperationStateError, match="submitted"):
        op.result()
    assert ring.wait(1) == [op]
    assert snapshot(op) == (OpState.COMPLETED, True, False)
    assert op.result() is None
    assert op.result() is None  # sticky


def test_life_cycle_failure_is_sticky(ring: saferring.Ring) -> None:
    """A failed op raises the same OSError on every result() call and cannot be cancelled."""
    op = ring.close_fd(987654)
    ring.wait(1)
    assert snapshot(op) == (OpState.FAILED, True, False)
    for _ in range(2):
        with pytest.raises(OSError) as info:
            op.result()
        assert info.value.errno == 9
    with pytest.raises(OperationStateError, match="already ended"):
        op.cancel()


def test_life_cycle_cancelled(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """queued -> (cancel asked) -> cancelled; double cancel and cancel-after-end are refused."""
    r, _w = pipe
    op = ring.read(r, bytearray(4))
    op.cancel()  # cancelling a still-queued op works: the cancel SQE follows it
    assert op.cancel_requested and not op.done()
    with pytest.raises(OperationStateError, match="already requested"):
        op.cancel()
    assert ring.wait(1) == [op]
    assert snapshot(op) == (OpState.CANCELLED, True, True)
    with pytest.raises(saferring.OperationCancelledError) as info:
        op.result()
    assert info.value.errno == 125
    with pytest.raises(OperationStateError):
        op.cancel()


def test_cancel_that_loses_the_race_reports_completion(ring: saferring.Ring) -> None:
    """Cancelling an op the kernel already finished leaves it COMPLETED with its real result."""
    op = ring.nop()
    ring.submit()  # a NOP completes inline during submit
    op.cancel()
    assert ring.wait(1) == [op]
    assert op.state is OpState.COMPLETED and op.result() == 0


def test_calls_on_ops_of_a_closed_ring(pipe: tuple[int, int]) -> None:
    """After close: results stay readable, cancel and run raise RingClosedError."""
    ring = saferring.Ring(8)
    done = ring.nop()
    ring.run(done)
    r, _w = pipe
    pending = ring.read(r, bytearray(1))
    ring.close()
    assert done.result() == 0
    assert pending.state is OpState.CANCELLED
    with pytest.raises(RingClosedError):
        ring.nop()
    with pytest.raises(RingClosedError):
        ring.run(done)  # every ring call refuses once closed; the op itself still answers
    assert done.result() == 0
    fresh_ring = saferring.Ring(8)
    try:
        other = fresh_ring.timeout(10)
        with pytest.raises(RingClosedError):
            ring.run(other)
        other.cancel()
        fresh_ring.wait(1)
    finally:
        fresh_ring.close()


def test_run_refuses_an_operation_of_another_ring(ring: saferring.Ring) -> None:
    """Passing one ring's operation to another ring is refused, not mixed up."""
    with saferring.Ring(8) as other:
        foreign = other.timeout(10)
        with pytest.raises(OperationStateError, match="another ring"):
            ring.run(foreign)
        with pytest.raises(OperationStateError, match="another ring"):
            ring._cancel(foreign)
        foreign.cancel()
        other.wait(1)


@pytest.mark.slow
@pytest.mark.parametrize("entries", [1, 2, 8])
def test_sq_full_and_cq_overflow_lose_nothing(entries: int) -> None:
    """Thousands of ops on a tiny ring (the SQ fills, the CQ overflows): each ends exactly once."""
    with saferring.Ring(entries) as ring:
        ops = [ring.nop() for _ in range(5000)]
        seen: list[saferring.Operation[object]] = []
        while len(seen) < len(ops):
            seen += ring.wait(1)
        assert len(seen) == len(ops)
        assert {id(op) for op in seen} == {id(op) for op in ops}
        assert all(op.result() == 0 for op in ops)
        assert ring.stats().in_flight == 0


@pytest.mark.slow
def test_tiny_ring_reads_every_byte_right(datafile: tuple[str, bytes]) -> None:
    """3000 reads through a 2-entry ring each get their own file range."""
    path, data = datafile
    fd = os.open(path, os.O_RDONLY)
    try:
        with saferring.Ring(2) as ring:
            bufs = [(off, bytearray(16)) for off in range(0, 3000 * 16, 16)]
            ops = [ring.read(fd, b, off % (len(data) - 16)) for off, b in bufs]
            ring.wait(len(ops))
            for (off, b), op in zip(bufs, ops, strict=True):
                start = off % (len(data) - 16)
                assert op.result() == 16 and b == data[start:start + 16]
    finally:
        os.close(fd)


def test_kernels_without_nodrop_never_overflow_the_cq() -> None:
    """Where the kernel drops CQEs on overflow (< 5.5), in-flight requests are capped at the CQ
    size (the guard is switched on by hand here: this kernel has IORING_FEAT_NODROP)."""
    with saferring.Ring(2) as ring:
        c = ring._c
        c.cq_guard = 1
        cq = ring.features.cq_entries
        ops = []
        for _ in range(200):
            ops.append(ring.nop())
            assert c.n_prepared - c.n_consumed <= cq
        assert len(ring.wait(len(ops))) == len(ops)
        assert all(op.result() == 0 for op in ops)
