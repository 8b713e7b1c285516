"""Polling, timeouts, cancellation, chains, msg_ring, waitid, futexes and epoll_ctl on the real
kernel (src/saferring/_event_ops.py and _chain.py)."""

from __future__ import annotations

import array
import contextlib
import errno
import os
import select
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

import saferring
from saferring import OperationCancelledError, OperationStateError, OpState
from saferring.constants import EPOLL_CTL_ADD, EPOLL_CTL_DEL
from saferring.operation import ReceivedMessage

from _helpers import kernel_lacks


def _wait_done(ring: saferring.Ring, *ops: Any, limit: float = 5.0) -> list[Any]:
    """Reap until every op in ``ops`` has its final CQE (bounded); return everything reaped."""
    deadline = time.monotonic() + limit
    seen: list[Any] = []
    while not all(op.done() for op in ops):
        left = deadline - time.monotonic()
        assert left > 0, f"operations did not finish in {limit} s: {ops}"
        seen.extend(ring.wait(1, timeout=left))
    return seen


def _assert_cancelled(op: Any) -> None:
    """``op`` ended CANCELLED and result() raises OperationCancelledError(ECANCELED)."""
    assert op.state is OpState.CANCELLED
    with pytest.raises(OperationCancelledError) as info:
        op.result()
    assert info.value.errno == errno.ECANCELED


@contextlib.contextmanager
def _drained(*rings: saferring.Ring) -> Iterator[None]:
    """On leaving (even by a failed assertion): cancel what is still in flight and reap it, so a
    failing test reports its own failure rather than a leak at teardown."""
    try:
        yield
    finally:
        for ring in rings:
            if ring.closed:
                continue
            pending = [op for op in list(ring._registry.values()) if not op.done()]
            for op in pending:
                if not op.cancel_requested:
                    op.cancel()
            _wait_done(ring, *pending)


# -- polling ----------------------------------------------------------------------------------


def test_poll_add_pollin_after_write(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """poll_add(POLLIN) completes with a mask holding POLLIN once the pipe has data."""
    r, w = pipe
    op = ring.poll_add(r, select.POLLIN)
    ring.submit()
    assert ring.wait(1, timeout=0.02) == []
    assert not op.done()
    os.write(w, b"x")
    mask = ring.run(op)
    assert mask & select.POLLIN
    assert op.state is OpState.COMPLETED


def test_poll_add_pollout_on_write_end(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """poll_add(POLLOUT) on an empty pipe's write end completes at once with POLLOUT."""
    _r, w = pipe
    mask = ring.run(ring.poll_add(w, select.POLLOUT))
    assert mask & select.POLLOUT
    assert not mask & select.POLLIN


def test_poll_add_bad_input(ring: saferring.Ring) -> None:
    """Events outside 32 bits, non-int events and bool fds are refused before queuing."""
    with pytest.raises(ValueError):
        ring.poll_add(0, 1 << 32)
    with pytest.raises(ValueError):
        ring.poll_add(0, -1)
    with pytest.raises(TypeError):
        ring.poll_add(0, "POLLIN")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.poll_add(True, select.POLLIN)
    assert ring.stats().in_flight == 0


def test_poll_add_closed_fd_is_ebadf(ring: saferring.Ring) -> None:
    """Polling a closed descriptor fails in the kernel with EBADF."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    op = ring.poll_add(r, select.POLLIN)
    with pytest.raises(OSError) as info:
        ring.run(op)
    assert info.value.errno == errno.EBADF
    assert op.state is OpState.FAILED


def test_poll_multishot_yields_several_masks(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A multishot poll stays armed across several writes, one mask each; poll_remove ends it
    CANCELLED."""
    r, w = pipe
    op = ring.poll_add(r, select.POLLIN, multishot=True)
    ring.submit()
    masks: list[int] = []
    for i in range(3):
        os.write(w, b"%d" % i)
        deadline = time.monotonic() + 5
        while op.pending() == 0:
            assert time.monotonic() < deadline, "no poll event arrived"
            ring.wait(1, timeout=1)
        got = op.take()
        assert got and all(m & select.POLLIN for m in got)
        masks.extend(got)
        assert os.read(r, 10) == b"%d" % i
        assert op.state is OpState.SUBMITTED and not op.done()
    assert len(masks) >= 3
    rm = ring.poll_remove(op)
    _wait_done(ring, rm, op)
    assert rm.result() == 1
    assert op.state is OpState.CANCELLED
    with pytest.raises(OperationCancelledError):
        op.result()


def test_poll_remove_found_and_not_found(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """poll_remove answers 1 for an armed poll (which ends CANCELLED) and 0 for one that already
    fired (a poll on a ready fd completes as it is submitted, before the remove runs)."""
    r, w = pipe
    armed = ring.poll_add(r, select.POLLIN)
    ring.submit()
    rm = ring.poll_remove(armed)
    _wait_done(ring, rm, armed)
    assert rm.result() == 1
    assert rm.state is OpState.COMPLETED
    _assert_cancelled(armed)

    fired = ring.poll_add(w, select.POLLOUT)  # ready now: completes at issue
    rm = ring.poll_remove(fired)
    _wait_done(ring, rm, fired)
    assert rm.result() == 0
    assert fired.result() & select.POLLOUT


def test_poll_remove_refuses_wrong_targets(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """poll_remove/poll_update take only this ring's polls still in flight."""
    r, _w = pipe
    nop = ring.nop()
    with pytest.raises(TypeError):
        ring.poll_remove(nop)
    with pytest.raises(TypeError):
        ring.poll_update(nop, select.POLLIN)
    ring.run(nop)
    done = ring.poll_add(_w, select.POLLOUT)
    ring.run(done)
    with pytest.raises(OperationStateError):
        ring.poll_remove(done)
    with saferring.Ring(4) as other:
        foreign = other.poll_add(r, select.POLLIN)
        with pytest.raises(OperationStateError):
            ring.poll_remove(foreign)
        assert ring.stats().in_flight == 0
    assert foreign.state is OpState.CANCELLED


def test_poll_update_changes_events(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """poll_update turns a never-firing POLLIN on a pipe's write end into POLLOUT, which fires."""
    _r, w = pipe
    op = ring.poll_add(w, select.POLLIN)
    ring.submit()
    assert ring.wait(1, timeout=0.02) == []
    upd = ring.poll_update(op, select.POLLOUT)
    _wait_done(ring, upd, op)
    assert upd.result() == 1
    assert op.result() & select.POLLOUT


# -- timeouts ---------------------------------------------------------------------------------


def test_timeout_relative_lower_bound(ring: saferring.Ring) -> None:
    """A relative timeout completes (None) no earlier than its duration."""
    start = time.monotonic()
    op = ring.timeout(0.03)
    assert ring.run(op) is None
    assert time.monotonic() - start >= 0.025
    assert op.state is OpState.COMPLETED


def test_timeout_count_completes_after_n_ops(ring: saferring.Ring) -> None:
    """timeout(count=2) completes (not times out) once two other operations completed."""
    start = time.monotonic()
    t = ring.timeout(10, count=2)
    nops = [ring.nop(), ring.nop()]
    _wait_done(ring, t, *nops)
    assert t.result() is None and t.state is OpState.COMPLETED
    assert t._res == 0  # the count, not the clock (-ETIME), ended it
    assert time.monotonic() - start < 5
    assert [n.result() for n in nops] == [0, 0]


def test_timeout_absolute_monotonic(ring: saferring.Ring) -> None:
    """absolute=True reads seconds as a time.monotonic() instant."""
    start = time.monotonic()
    assert ring.run(ring.timeout(start + 0.05, absolute=True)) is None
    assert time.monotonic() - start >= 0.045


def test_timeout_absolute_realtime(ring: saferring.Ring) -> None:
    """clock="realtime" with absolute=True reads seconds as a time.time() instant."""
    start = time.monotonic()
    assert ring.run(ring.timeout(time.time() + 0.05, absolute=True, clock="realtime")) is None
    assert time.monotonic() - start >= 0.04


def test_timeout_boottime_relative(ring: saferring.Ring) -> None:
    """clock="boottime" is accepted for a relative timeout."""
    start = time.monotonic()
    assert ring.run(ring.timeout(0.02, clock="boottime")) is None
    assert time.monotonic() - start >= 0.015


@pytest.mark.parametrize("clock", ["utc", "MONOTONIC", None, 0])
def test_timeout_bad_clock(ring: saferring.Ring, clock: object) -> None:
    """An unknown clock raises ValueError before anything is queued."""
    with pytest.raises(ValueError, match="clock"):
        ring.timeout(1, clock=clock)  # type: ignore[arg-type]
    assert ring.stats().in_flight == 0


@pytest.mark.parametrize("bad", [-0.001, -5, float("nan"), float("-inf")])
def test_timeout_bad_seconds(ring: saferring.Ring, bad: float) -> None:
    """Negative and NaN durations raise ValueError for timeout, timeout_update and link_timeout."""
    with pytest.raises(ValueError):
        ring.timeout(bad)
    with pytest.raises(ValueError):
        ring.timeout(bad, absolute=True)
    assert ring.stats().in_flight == 0
    t = ring.timeout(5)
    with pytest.raises(ValueError):
        ring.timeout_update(t, bad)
    n = ring.nop()
    with pytest.raises(ValueError):
        ring.link_timeout(n, bad)
    assert ring.stats().in_flight == 2
    t.cancel()
    _wait_done(ring, t, n)


def test_timeout_bad_count(ring: saferring.Ring) -> None:
    """count must fit an unsigned 32-bit int."""
    with pytest.raises(ValueError):
        ring.timeout(1, count=-1)
    with pytest.raises(ValueError):
        ring.timeout(1, count=1 << 32)
    assert ring.stats().in_flight == 0


@pytest.fixture(params=["kernel", "fallback"])
def multishot_timeouts(request: pytest.FixtureRequest,
                       monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """Run a test with the kernel's multishot timeouts (where it has them, 6.4) and with the
    library's fallback (a single-shot timeout re-armed at each expiry), which older kernels
    get.  Yields whether the fallback is in use."""
    from saferring import features

    if request.param == "kernel":
        if kernel_lacks("can:TIMEOUT_MULTISHOT"):
            pytest.skip(kernel_lacks("can:TIMEOUT_MULTISHOT"))
        yield False
    else:
        monkeypatch.setitem(features._capability_answers, "TIMEOUT_MULTISHOT", False)
        yield True


def test_timeout_multishot(ring: saferring.Ring, multishot_timeouts: bool) -> None:
    """A multishot timeout fires count times, one None each, then ends COMPLETED, with the
    kernel's multishot form or (before 6.4) the library's re-armed single-shot timeouts."""
    start = time.monotonic()
    op = ring.timeout(0.01, count=3, multishot=True)
    assert op.single_shot is multishot_timeouts
    _wait_done(ring, op)
    assert op.state is OpState.COMPLETED
    assert op.result() == [None, None, None]
    assert time.monotonic() - start >= 0.025


def test_timeout_multishot_removed_and_cancelled(ring: saferring.Ring,
                                                 multishot_timeouts: bool) -> None:
    """count=0 keeps firing until timeout_remove (or cancel) ends it CANCELLED; the values that
    fired are kept, iteration ends with the cancellation, and nothing stays in flight."""
    op = ring.timeout(0.005, multishot=True)
    fired = []
    with pytest.raises(OperationCancelledError):
        for value in op:
            fired.append(value)
            if len(fired) == 3:
                rm = ring.timeout_remove(op)
    assert fired[:3] == [None, None, None]
    _wait_done(ring, rm)
    assert rm.result() == 1
    assert op.state is OpState.CANCELLED
    op2 = ring.timeout(0.005, multishot=True)
    while op2.pending() < 2:
        ring.wait(1, timeout=1)
    op2.cancel()
    _wait_done(ring, op2)
    assert op2.state is OpState.CANCELLED
    assert ring.stats().in_flight == 0


@pytest.mark.needs("can:TIMEOUT_MULTISHOT")
def test_timeout_multishot_until_removed(ring: saferring.Ring) -> None:
    """count=0 keeps a multishot timeout firing until timeout_remove ends it CANCELLED."""
    op = ring.timeout(0.01, multishot=True)
    deadline = time.monotonic() + 5
    fired: list[None] = []
    while len(fired) < 2:
        assert time.monotonic() < deadline
        ring.wait(1, timeout=1)
        fired.extend(op.take())
    assert not op.done()
    rm = ring.timeout_remove(op)
    _wait_done(ring, rm, op)
    assert rm.result() == 1
    assert op.state is OpState.CANCELLED


def test_timeout_multishot_refuses_absolute(ring: saferring.Ring) -> None:
    """A multishot timeout is relative: absolute=True raises ValueError."""
    with pytest.raises(ValueError):
        ring.timeout(time.monotonic() + 1, absolute=True, multishot=True)
    assert ring.stats().in_flight == 0


def test_timeout_remove_pending_and_fired(ring: saferring.Ring) -> None:
    """timeout_remove answers 1 and cancels a pending timeout; 0 for one that already fired."""
    t = ring.timeout(5)
    ring.submit()
    rm = ring.timeout_remove(t)
    _wait_done(ring, rm, t)
    assert rm.result() == 1 and not rm.already_running
    _assert_cancelled(t)

    t = ring.timeout(0.01)
    ring.submit()
    time.sleep(0.05)  # the kernel fires it; its CQE is not reaped yet, so it is still in flight
    assert not t.done()
    rm = ring.timeout_remove(t)
    _wait_done(ring, rm, t)
    assert rm.result() == 0
    assert t.state is OpState.COMPLETED


def test_timeout_remove_refuses_non_timeouts(ring: saferring.Ring) -> None:
    """timeout_remove/timeout_update take a timeout of this ring still in flight."""
    n = ring.nop()
    with pytest.raises(TypeError):
        ring.timeout_remove(n)
    with pytest.raises(TypeError):
        ring.timeout_update(n, 1)
    ring.run(n)
    t = ring.timeout(0)
    ring.run(t)
    with pytest.raises(OperationStateError):
        ring.timeout_remove(t)
    with pytest.raises(OperationStateError):
        ring.timeout_update(t, 1)
    assert ring.stats().in_flight == 0


def test_timeout_update_extends(ring: saferring.Ring) -> None:
    """timeout_update to a longer expiry answers 1 and the timeout fires no earlier than that."""
    start = time.monotonic()
    t = ring.timeout(0.02)
    upd = ring.timeout_update(t, 0.1)
    _wait_done(ring, upd, t)
    assert upd.result() == 1
    assert t.state is OpState.COMPLETED
    assert time.monotonic() - start >= 0.09


def test_timeout_update_shortens(ring: saferring.Ring) -> None:
    """timeout_update of a 10 s timeout to 20 ms answers 1 and the timeout fires soon."""
    start = time.monotonic()
    t = ring.timeout(10)
    ring.submit()
    upd = ring.timeout_update(t, 0.02)
    _wait_done(ring, upd, t)
    assert upd.result() == 1
    assert t.state is OpState.COMPLETED
    elapsed = time.monotonic() - start
    assert 0.015 <= elapsed < 5


def test_link_timeout_fires_on_blocked_read(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A link timeout cancels a read that blocks: read CANCELLED, link_timeout result True."""
    r, _w = pipe
    buf = bytearray(16)
    start = time.monotonic()
    rd = ring.read(r, buf)
    lt = ring.link_timeout(rd, 0.03)
    _wait_done(ring, rd, lt)
    assert lt.result() is True
    assert lt.state is OpState.COMPLETED
    _assert_cancelled(rd)
    assert time.monotonic() - start >= 0.025
    buf.extend(b"x")  # unpinned: resizable again


def test_link_timeout_does_not_fire_when_op_completes(ring: saferring.Ring,
                                                      pipe: tuple[int, int]) -> None:
    """When the read completes first, the read has its bytes and link_timeout's result is False."""
    r, w = pipe
    os.write(w, b"data")
    buf = bytearray(16)
    rd = ring.read(r, buf)
    lt = ring.link_timeout(rd, 5)
    _wait_done(ring, rd, lt)
    assert rd.result() == 4 and buf[:4] == b"data"
    assert lt.result() is False
    assert lt.state is OpState.COMPLETED


def test_link_timeout_absolute(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """link_timeout(absolute=True) fires at a time.monotonic() instant."""
    r, _w = pipe
    start = time.monotonic()
    rd = ring.read(r, bytearray(4))
    lt = ring.link_timeout(rd, start + 0.03, absolute=True)
    _wait_done(ring, rd, lt)
    assert lt.result() is True
    _assert_cancelled(rd)
    assert time.monotonic() - start >= 0.025


def test_link_timeout_must_follow_its_op(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """link_timeout on an op that is not the newest queued one, or already submitted, raises
    OperationStateError and queues nothing."""
    r, _w = pipe
    first = ring.nop()
    rd = ring.read(r, bytearray(4))
    before = ring.stats().in_flight
    with pytest.raises(OperationStateError):
        ring.link_timeout(first, 1)
    assert ring.stats().in_flight == before
    ring.submit()
    with pytest.raises(OperationStateError):
        ring.link_timeout(rd, 1)
    assert ring.stats().in_flight == before
    rd.cancel()
    _wait_done(ring, first, rd)
    assert first.result() == 0
    _assert_cancelled(rd)


def test_link_timeout_update(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """timeout_update on a link timeout answers 1 and moves its expiry (here: sooner)."""
    r, _w = pipe
    start = time.monotonic()
    rd = ring.read(r, bytearray(4))
    lt = ring.link_timeout(rd, 10)
    ring.submit()
    with _drained(ring):
        upd = ring.timeout_update(lt, 0.02)
        _wait_done(ring, upd)
        assert upd.result() == 1
        _wait_done(ring, rd, lt)
        assert lt.result() is True
        _assert_cancelled(rd)
        assert time.monotonic() - start < 5


# -- cancellation -----------------------------------------------------------------------------


def test_op_cancel_blocked_read(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """op.cancel() ends a blocked read CANCELLED; a second cancel() or one after the end raises."""
    r, _w = pipe
    buf = bytearray(64)
    rd = ring.read(r, buf)
    ring.submit()
    rd.cancel()
    assert rd.cancel_requested
    with pytest.raises(OperationStateError):
        rd.cancel()
    assert ring.stats().pinned_bytes >= 64
    _wait_done(ring, rd)
    _assert_cancelled(rd)
    with pytest.raises(OperationStateError):
        rd.cancel()


def test_async_cancel_found(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """async_cancel of a blocked read answers 1 and the read ends CANCELLED."""
    r, _w = pipe
    rd = ring.read(r, bytearray(8))
    ring.submit()
    c = ring.async_cancel(rd)
    assert rd.cancel_requested
    _wait_done(ring, c, rd)
    assert c.result() == 1 and not c.already_running
    assert c.state is OpState.COMPLETED
    _assert_cancelled(rd)
    with pytest.raises(OperationStateError):
        ring.async_cancel(rd)
    assert ring.stats().in_flight == 0


def test_async_cancel_of_op_completing_first_is_zero(ring: saferring.Ring) -> None:
    """A cancel queued right behind a nop finds nothing (the nop completes as it is issued): 0."""
    n = ring.nop()
    c = ring.async_cancel(n)
    _wait_done(ring, c, n)
    assert n.state is OpState.COMPLETED and n.result() == 0
    assert c.result() == 0
    assert c.state is OpState.COMPLETED


def test_async_cancel_refuses_bad_targets(ring: saferring.Ring) -> None:
    """async_cancel takes one operation of this ring in flight: a finished one, a foreign one, a
    batch or a non-operation is refused."""
    n = ring.nop()
    ring.run(n)
    with pytest.raises(OperationStateError):
        ring.async_cancel(n)
    with pytest.raises(TypeError):
        ring.async_cancel(42)  # type: ignore[arg-type]
    batch = ring.nop_many(2)
    with pytest.raises(TypeError):
        ring.async_cancel(batch)
    with saferring.Ring(4) as other:
        foreign = other.nop()
        with pytest.raises(OperationStateError):
            ring.async_cancel(foreign)
    assert ring.stats().in_flight == 1
    ring.run(batch)


def test_cancel_fd_cancels_every_read_on_it(ring: saferring.Ring, pipe: tuple[int, int],
                                            pipe2: tuple[int, int]) -> None:
    """cancel_fd(fd) cancels all requests on fd (result: how many) and leaves other fds alone."""
    r, _w = pipe
    r2, w2 = pipe2
    reads = [ring.read(r, bytearray(4)) for _ in range(3)]
    other = ring.read(r2, bytearray(4))
    ring.submit()
    c = ring.cancel_fd(r)
    _wait_done(ring, c, *reads)
    assert c.result() == 3
    for rd in reads:
        _assert_cancelled(rd)
    assert not other.done()
    os.write(w2, b"ok")
    assert ring.run(other) == 2
    c = ring.cancel_fd(r)
    assert ring.run(c) == 0


def test_cancel_fd_first_only(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """cancel_fd(fd, all=False) cancels exactly one request on fd."""
    r, _w = pipe
    reads = [ring.read(r, bytearray(4)) for _ in range(2)]
    ring.submit()
    c = ring.cancel_fd(r, all=False)
    assert ring.run(c) == 1
    deadline = time.monotonic() + 5
    while sum(rd.done() for rd in reads) < 1:
        assert time.monotonic() < deadline
        ring.wait(1, timeout=1)
    time.sleep(0.02)
    ring.wait(0)
    assert sum(rd.done() for rd in reads) == 1
    left = next(rd for rd in reads if not rd.done())
    left.cancel()
    _wait_done(ring, *reads)
    for rd in reads:
        _assert_cancelled(rd)


def test_cancel_all_with_one_in_flight(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """cancel_all answers 1 with one request in flight (it ends CANCELLED), then 0 with none."""
    r, _w = pipe
    rd = ring.read(r, bytearray(4))
    ring.submit()
    c = ring.cancel_all()
    _wait_done(ring, c, rd)
    assert c.result() == 1
    _assert_cancelled(rd)
    assert ring.run(ring.cancel_all()) == 0  # nothing left in flight: found none


def test_cancel_all_keeps_pins_until_each_cqe(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """cancel_all cancels everything (result: the count); the buffers stay pinned until each op's
    own CQE is reaped."""
    r, _w = pipe
    bufs = [bytearray(100) for _ in range(3)]
    reads = [ring.read(r, b) for b in bufs]
    t = ring.timeout(10)
    ring.submit()
    c = ring.cancel_all()
    ring.submit()
    time.sleep(0.02)  # the kernel has cancelled them; nothing is reaped yet
    assert ring.stats().pinned_bytes >= 300
    with pytest.raises(BufferError):
        bufs[0].extend(b"x")
    _wait_done(ring, c, t, *reads)
    assert c.result() == 4
    for op in (*reads, t):
        _assert_cancelled(op)
    assert ring.stats().pinned_bytes == 0
    bufs[0].extend(b"x")


def test_cancel_all_with_nothing_in_flight_is_zero(ring: saferring.Ring) -> None:
    """cancel_all with nothing to cancel answers 0 (it found none)."""
    c = ring.cancel_all()
    assert ring.run(c) == 0
    assert c.state is OpState.COMPLETED


def test_cancel_requests_refused_inside_chain(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """No cancel request can be queued into an open chain."""
    r, _w = pipe
    rd = ring.read(r, bytearray(4))
    ring.submit()
    with ring.chain():
        for call in (ring.cancel_all, lambda: ring.cancel_fd(r),
                     lambda: ring.async_cancel(rd), rd.cancel):
            with pytest.raises(OperationStateError):
                call()
    assert not rd.cancel_requested or not rd.done()
    assert ring.stats().in_flight == 1
    c = ring.cancel_fd(r)
    _wait_done(ring, c, rd)
    _assert_cancelled(rd)


# -- chains -----------------------------------------------------------------------------------


def test_chain_runs_in_order(ring: saferring.Ring, pipe: tuple[int, int],
                             pipe2: tuple[int, int]) -> None:
    """In a chain, the write to pipe B waits for the read of pipe A; ch.ops lists both."""
    ra, wa = pipe
    rb, wb = pipe2
    os.set_blocking(rb, False)
    buf = bytearray(2)  # exactly what will arrive: a short read would break the chain
    with ring.chain() as ch:
        rd = ring.read(ra, buf)
        wr = ring.write(wb, b"out")
        assert ch.ops == [rd, wr]
        assert rd.state is OpState.QUEUED and wr.state is OpState.QUEUED
    assert ch.ops == [rd, wr]
    ring.submit()
    assert ring.wait(1, timeout=0.03) == []
    with pytest.raises(BlockingIOError):
        os.read(rb, 8)  # the write has not run: it waits for the read
    os.write(wa, b"in")
    _wait_done(ring, rd, wr)
    assert rd.result() == 2 and buf == b"in"
    assert wr.result() == 3
    assert os.read(rb, 8) == b"out"


def test_chain_write_then_read(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A chained write then read on one pipe moves the bytes through it."""
    r, w = pipe
    buf = bytearray(5)
    with ring.chain() as ch:
        wr = ring.write(w, b"hello")
        rd = ring.read(r, buf)
    assert ch.ops == [wr, rd]
    _wait_done(ring, wr, rd)
    assert (wr.result(), rd.result(), bytes(buf)) == (5, 5, b"hello")


def test_chain_failure_cancels_the_rest(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A failing first op (read on fd -1) ends the rest CANCELLED with ECANCELED; nothing of the
    rest runs."""
    r, w = pipe
    os.set_blocking(r, False)
    with ring.chain() as ch:
        bad = ring.read(-1, bytearray(4))
        wr = ring.write(w, b"x")
        n = ring.nop()
    assert ch.ops == [bad, wr, n]
    _wait_done(ring, *ch.ops)
    with pytest.raises(OSError) as info:
        bad.result()
    assert info.value.errno == errno.EBADF
    assert bad.state is OpState.FAILED
    _assert_cancelled(wr)
    _assert_cancelled(n)
    with pytest.raises(BlockingIOError):
        os.read(r, 4)


def test_hard_chain_continues_after_failure(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """hard=True: the op after a failing one still runs."""
    r, w = pipe
    with ring.chain(hard=True) as ch:
        bad = ring.read(-1, bytearray(4))
        wr = ring.write(w, b"x")
    assert ch.hard
    _wait_done(ring, bad, wr)
    assert bad.state is OpState.FAILED
    assert wr.result() == 1
    assert os.read(r, 4) == b"x"


def test_short_read_breaks_soft_chain_not_hard(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A short read counts as a failure in a soft chain (the next op ends CANCELLED) but not in
    a hard one."""
    r, w = pipe
    os.write(w, b"ab")
    with ring.chain():
        rd = ring.read(r, bytearray(8))
        n = ring.nop()
    _wait_done(ring, rd, n)
    assert rd.result() == 2
    _assert_cancelled(n)
    os.write(w, b"ab")
    with ring.chain(hard=True):
        rd = ring.read(r, bytearray(8))
        n = ring.nop()
    _wait_done(ring, rd, n)
    assert (rd.result(), n.result()) == (2, 0)


def test_hard_chain_waits_for_timeout(ring: saferring.Ring) -> None:
    """hard=True: a nop chained after a timeout (which ends with -ETIME) runs only after it."""
    start = time.monotonic()
    with ring.chain(hard=True):
        t = ring.timeout(0.03)
        n = ring.nop()
    _wait_done(ring, t, n)
    assert n.result() == 0
    assert t.state is OpState.COMPLETED
    assert time.monotonic() - start >= 0.025


def test_chain_drain_waits_for_earlier_requests(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """drain=True: the chain starts only after everything submitted before it has completed."""
    r, w = pipe
    rd = ring.read(r, bytearray(4))
    ring.submit()
    with ring.chain(drain=True) as ch:
        n1 = ring.nop()
        n2 = ring.nop()
    assert ch.drain
    ring.submit()
    assert ring.wait(1, timeout=0.03) == []
    assert not n1.done() and not n2.done()
    os.write(w, b"go")
    _wait_done(ring, rd, n1, n2)
    assert rd.result() == 2
    assert (n1.result(), n2.result()) == (0, 0)


def test_chain_refuses_submit_wait_run_cancel(ring: saferring.Ring) -> None:
    """Inside an open chain submit/wait/run/op.cancel raise OperationStateError, and nothing
    reaches the kernel until the block ends."""
    submitted = ring.stats().submitted
    with ring.chain():
        n = ring.nop()
        with pytest.raises(OperationStateError):
            ring.submit()
        with pytest.raises(OperationStateError):
            ring.wait(1)
        with pytest.raises(OperationStateError):
            ring.wait(1, timeout=0.01)
        with pytest.raises(OperationStateError):
            ring.run(n)
        with pytest.raises(OperationStateError):
            n.cancel()
        assert ring.wait(0) == []
        assert ring.stats().submitted == submitted
        assert n.state is OpState.QUEUED and not n.cancel_requested
    assert ring.stats().submitted == submitted
    assert ring.run(n) == 0


def test_chains_do_not_nest(ring: saferring.Ring) -> None:
    """Opening a chain inside another, or entering a Chain twice, raises OperationStateError."""
    with ring.chain() as outer:
        a = ring.nop()
        with pytest.raises(OperationStateError), ring.chain():
            pass
        b = ring.nop()
    assert outer.ops == [a, b]
    with pytest.raises(OperationStateError), outer:
        pass
    _wait_done(ring, a, b)
    assert (a.result(), b.result()) == (0, 0)


def test_chain_longer_than_sq(pipe: tuple[int, int]) -> None:
    """A chain that outgrows the SQ raises ValueError; what was queued runs after the block."""
    with saferring.Ring(4) as r:
        sq = r.features.sq_entries
        ops: list[Any] = []
        with pytest.raises(ValueError, match="chain"), r.chain() as ch:
            for _ in range(10):
                ops.append(r.nop())
        assert 0 < len(ops) <= sq < 10
        assert ch.ops == ops
        assert r.stats().in_flight == len(ops)
        _wait_done(r, *ops)
        assert [op.result() for op in ops] == [0] * len(ops)
        assert r.stats().in_flight == 0
        assert r.run(r.nop()) == 0  # the ring is usable again


@pytest.mark.parametrize("kwargs", [
    pytest.param({}, id="plain"),
    pytest.param({"sqpoll": True}, id="sqpoll", marks=pytest.mark.needs("setup:SQPOLL")),
    pytest.param({"single_issuer": True, "defer_taskrun": True}, id="defer_taskrun",
                 marks=pytest.mark.needs("setup:DEFER_TASKRUN")),
])
def test_chain_behind_queued_requests_that_fill_the_sq(pipe: tuple[int, int],
                                                       pipe2: tuple[int, int],
                                                       kwargs: dict[str, bool]) -> None:
    """Requests queued before a chain go to the kernel on their own when the chain needs their
    room in the SQ (before, the chain raised ValueError although it fitted); the chain stays
    whole and unsubmitted: its write still waits for its read.  With an SQ thread too, which
    takes the requests in its own time."""
    ra, wa = pipe
    rb, wb = pipe2
    os.set_blocking(rb, False)
    with saferring.Ring(4, **kwargs) as r:  # type: ignore[arg-type]
        before = [r.nop() for _ in range(r.features.sq_entries - 1)]
        buf = bytearray(2)
        with r.chain() as ch:
            rd = r.read(ra, buf)
            wr = r.write(wb, b"out")  # no free SQE: the nops are handed over first
        assert ch.ops == [rd, wr]
        assert [op.state for op in before] == [OpState.SUBMITTED] * len(before)
        assert rd.state is OpState.QUEUED and wr.state is OpState.QUEUED
        assert sorted(map(id, r.wait(len(before), timeout=30))) == sorted(map(id, before))
        assert r.wait(1, timeout=0.03) == []
        with pytest.raises(BlockingIOError):
            os.read(rb, 8)  # the write has not run: it waits for the read
        os.write(wa, b"in")
        _wait_done(r, rd, wr)
        assert (rd.result(), bytes(buf), wr.result()) == (2, b"in", 3)
        assert os.read(rb, 8) == b"out"
        assert r.stats().in_flight == 0


def test_exception_in_chain_block_keeps_the_chain(ring: saferring.Ring) -> None:
    """If the block raises, the ops queued in it still run, linked (a failure cancels the rest)."""
    with pytest.raises(RuntimeError, match="boom"), ring.chain() as ch:
        bad = ring.read(-1, bytearray(4))
        n = ring.nop()
        raise RuntimeError("boom")
    assert ch.ops == [bad, n]
    _wait_done(ring, bad, n)
    assert bad.state is OpState.FAILED
    _assert_cancelled(n)
    assert ring.run(ring.nop()) == 0


def test_close_inside_open_chain(pipe: tuple[int, int]) -> None:
    """ring.close() inside an open chain runs what was queued, cancels what blocks, and drains."""
    r, _w = pipe
    buf = bytearray(8)
    ring = saferring.Ring(8)
    with ring.chain() as ch:
        n = ring.nop()
        rd = ring.read(r, buf)
        ring.close()
    assert ring.closed
    assert ch.ops == [n, rd]
    assert n.state is OpState.COMPLETED
    assert rd.done()
    _assert_cancelled(rd)
    buf.extend(b"x")  # no longer pinned


def test_link_timeout_inside_chain(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """In a chain, a link timeout on a blocked read cancels it and what follows in the chain.

    Linux 6.1 does not arm a link timeout on a member that a completed read started (a nop
    before it works; docs/operations.md): there the read stays blocked, and cancel() still ends
    the read, the timeout and the rest of the chain with every pin released."""
    r, w = pipe
    os.write(w, b"ab")
    first = bytearray(2)
    with ring.chain() as ch:
        rd1 = ring.read(r, first)
        rd2 = ring.read(r, bytearray(4))
        lt = ring.link_timeout(rd2, 0.03)
        n = ring.nop()
    assert ch.ops == [rd1, rd2, lt, n]
    deadline = time.monotonic() + 2  # far beyond the 30 ms timeout
    while not rd2.done() and time.monotonic() < deadline:
        ring.wait(1, timeout=0.1)
    assert rd1.result() == 2 and first == b"ab"
    if rd2.done():  # the kernel armed the timeout
        _wait_done(ring, *ch.ops)
        _assert_cancelled(rd2)
        assert lt.result() is True
        _assert_cancelled(n)
        return
    # The 6.1 behaviour: nothing fired; cancelling the read ends it and what follows.
    assert not lt.done() and not n.done()
    rd2.cancel()
    _wait_done(ring, rd2, lt, n)
    assert rd2.state is OpState.CANCELLED  # 6.1 interrupts the blocked read: EINTR, cancelled
    with pytest.raises(OperationCancelledError) as info:
        rd2.result()
    assert info.value.errno in (errno.ECANCELED, errno.EINTR)
    _assert_cancelled(n)
    assert lt.done()


def test_link_timeout_inside_chain_not_firing(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """In a chain, a link timeout whose read completes does not break the chain."""
    r, w = pipe
    with ring.chain():
        wr = ring.write(w, b"abc")
        rd = ring.read(r, bytearray(3))
        lt = ring.link_timeout(rd, 5)
        n = ring.nop()
    _wait_done(ring, wr, rd, lt, n)
    assert (wr.result(), rd.result(), lt.result(), n.result()) == (3, 3, False, 0)


def test_chain_repr_and_empty_chain(ring: saferring.Ring) -> None:
    """An empty chain is harmless; repr tells soft/hard and state."""
    ch = ring.chain(hard=True)
    assert "hard" in repr(ch) and "new" in repr(ch)
    with ch:
        assert "open" in repr(ch)
    assert "closed" in repr(ch)
    assert ch.ops == []
    assert ring.run(ring.nop()) == 0


# -- msg_ring ---------------------------------------------------------------------------------


def _needs_msg_ring(ring: saferring.Ring) -> None:
    if not ring.features.supports("MSG_RING"):
        pytest.skip("MSG_RING came in Linux 5.18")


def test_msg_ring_between_rings(ring: saferring.Ring) -> None:
    """A message posted to another ring arrives there as a COMPLETED ReceivedMessage."""
    _needs_msg_ring(ring)
    with saferring.Ring(8) as other:
        m = ring.msg_ring(other, 42, 7)
        assert ring.run(m) == 0
        got = other.wait(1, timeout=5)
        assert len(got) == 1
        (msg,) = got
        assert isinstance(msg, ReceivedMessage)
        assert msg.value == 42 and msg.result() == 7
        assert msg.state is OpState.COMPLETED
        assert other.stats().in_flight == 0


def test_msg_ring_to_fd_and_extremes(ring: saferring.Ring) -> None:
    """A ring's fd is a valid target; the largest value and negative res travel intact."""
    _needs_msg_ring(ring)
    with saferring.Ring(8) as other:
        ring.run(ring.msg_ring(other.fd, (1 << 61) - 1, -5))
        ring.run(ring.msg_ring(other.fd, 0, (1 << 31) - 1))
        got: list[Any] = []
        deadline = time.monotonic() + 5
        while len(got) < 2:
            assert time.monotonic() < deadline
            got.extend(other.wait(1, timeout=1))
        assert sorted((m.value, m.result()) for m in got) == [(0, (1 << 31) - 1),
                                                              ((1 << 61) - 1, -5)]


def test_msg_ring_to_self(ring: saferring.Ring) -> None:
    """A ring may post a message to itself: both the request and the message come back."""
    _needs_msg_ring(ring)
    m = ring.msg_ring(ring, 9, 1)
    got = _wait_done(ring, m)
    deadline = time.monotonic() + 5
    while not any(isinstance(x, ReceivedMessage) for x in got):
        assert time.monotonic() < deadline
        got.extend(ring.wait(1, timeout=1))
    (msg,) = [x for x in got if isinstance(x, ReceivedMessage)]
    assert (msg.value, msg.result()) == (9, 1)


def test_msg_ring_bad_input(ring: saferring.Ring) -> None:
    """Out-of-range value/res, a closed target ring and wrong types are refused before queuing."""
    _needs_msg_ring(ring)
    other = saferring.Ring(4)
    with _drained(ring), contextlib.closing(other):
        for bad in (-1, 1 << 61, 1 << 62, 1 << 64):
            with pytest.raises(ValueError, match="value"):
                ring.msg_ring(other, bad)
        for bad in (1 << 31, -(1 << 31) - 1):
            with pytest.raises(ValueError, match="res"):
                ring.msg_ring(other, 1, bad)
        with pytest.raises(TypeError):
            ring.msg_ring(other, 1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            ring.msg_ring("ring", 1)
        assert ring.stats().in_flight == 0
    with pytest.raises(OperationStateError):
        ring.msg_ring(other, 1)
    assert ring.stats().in_flight == 0


def test_msg_ring_to_non_ring_fd_fails(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A target descriptor that is not an open saferring ring of this process (a pipe, an
    io_uring saferring does not own) raises ValueError before anything is queued."""
    _needs_msg_ring(ring)
    _r, w = pipe
    with pytest.raises(ValueError, match="not an open saferring Ring"):
        ring.msg_ring(w, 1)
    from saferring.unsafe import ffi, lib

    foreign = ffi.new("struct io_uring *")
    assert lib.io_uring_queue_init(4, foreign, 0) == 0
    try:
        with pytest.raises(ValueError, match="not an open saferring Ring"):
            ring.msg_ring(foreign.ring_fd, 1)
    finally:
        lib.io_uring_queue_exit(foreign)
    assert ring.stats().in_flight == 0


def test_msg_value_equal_to_user_data_does_not_complete_op(ring: saferring.Ring,
                                                          pipe: tuple[int, int]) -> None:
    """A message whose value equals an in-flight op's user_data in the target leaves that op in
    flight: the message arrives on its own."""
    _needs_msg_ring(ring)
    r, _w = pipe
    with saferring.Ring(8) as other:
        buf = bytearray(16)
        rd = other.read(r, buf)
        other.submit()
        ring.run(ring.msg_ring(other, rd.user_data, 5))
        got = other.wait(1, timeout=5)
        assert len(got) == 1 and isinstance(got[0], ReceivedMessage)
        assert got[0].value == rd.user_data and got[0].result() == 5
        assert not rd.done() and rd.state is OpState.SUBMITTED
        assert other.stats().in_flight == 1
        assert other.stats().pinned_bytes >= 16
        rd.cancel()
        _wait_done(other, rd)
        _assert_cancelled(rd)


# -- waitid, futexes, epoll -------------------------------------------------------------------


def test_waitid_reports_child_exit(ring: saferring.Ring) -> None:
    """waitid(P_PID, WEXITED) reports a child's exit status 7 and pid (6.5+), or refuses."""
    if not ring.features.supports("WAITID"):
        with pytest.raises(saferring.UnsupportedOperationError):
            ring.waitid(os.P_PID, os.getpid(), os.WEXITED)
        assert ring.stats().in_flight == 0
        return
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    try:
        op = ring.waitid(os.P_PID, pid, os.WEXITED)
        res = ring.run(op)
    except BaseException:
        os.waitpid(pid, 0)
        raise
    assert res.si_pid == pid
    assert res.si_status == 7
    assert res.si_code == os.CLD_EXITED
    assert res.si_signo == signal.SIGCHLD
    assert op.state is OpState.COMPLETED
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped by the kernel's waitid


@pytest.mark.needs("op:WAITID")
def test_waitid_no_such_child(ring: saferring.Ring) -> None:
    """waitid on a pid that is not our child fails with ECHILD."""
    with pytest.raises(ChildProcessError):
        ring.run(ring.waitid(os.P_PID, 1, os.WEXITED))


@pytest.mark.needs("op:WAITID")
def test_waitid_bad_input(ring: saferring.Ring) -> None:
    """Negative idtype/options are refused before queuing."""
    with pytest.raises(ValueError):
        ring.waitid(-1, 1, os.WEXITED)
    with pytest.raises(ValueError):
        ring.waitid(os.P_PID, 1, -1)
    assert ring.stats().in_flight == 0


def test_futex_wait_and_wake(ring: saferring.Ring) -> None:
    """futex_wake wakes a futex_wait on the same word: wake answers 1, the wait completes 0;
    the word stays pinned meanwhile (6.7+), or both refuse."""
    word = array.array("I", [0, 0])
    if not ring.features.supports("FUTEX_WAIT"):
        with pytest.raises(saferring.UnsupportedOperationError):
            ring.futex_wait(word, 0, 0)
        with pytest.raises(saferring.UnsupportedOperationError):
            ring.futex_wake(word, 0)
        assert ring.stats().in_flight == 0
        return
    w = ring.futex_wait(word, 0, 0)
    ring.submit()
    assert ring.wait(1, timeout=0.02) == []
    assert ring.stats().pinned_bytes >= 8
    with pytest.raises(BufferError):
        word.append(1)
    wake = ring.futex_wake(word, 0, 1)
    _wait_done(ring, w, wake)
    assert wake.result() == 1
    assert w.result() == 0
    word.append(1)  # unpinned
    assert ring.run(ring.futex_wake(word, 4, 1)) == 0  # nobody waits on the second word


@pytest.mark.needs("op:FUTEX_WAIT")
def test_futex_wait_wrong_value_is_eagain(ring: saferring.Ring) -> None:
    """futex_wait with an expected value the word does not hold fails with EAGAIN."""
    word = array.array("I", [3])
    op = ring.futex_wait(word, 0, 5)
    with pytest.raises(BlockingIOError) as info:
        ring.run(op)
    assert info.value.errno == errno.EAGAIN
    assert op.state is OpState.FAILED


@pytest.mark.needs("op:FUTEX_WAIT")
def test_futex_cancel(ring: saferring.Ring) -> None:
    """A futex wait can be cancelled: it ends CANCELLED and releases the word."""
    word = array.array("I", [0])
    w = ring.futex_wait(word, 0, 0)
    ring.submit()
    c = ring.async_cancel(w)
    _wait_done(ring, c, w)
    assert c.result() == 1
    _assert_cancelled(w)
    word.append(0)


@pytest.mark.needs("op:FUTEX_WAIT")
def test_futex_bad_input(ring: saferring.Ring) -> None:
    """Misaligned or out-of-range offsets, size 3, read-only buffers, a zero mask and values
    wider than the word raise before queuing."""
    word = array.array("I", [0, 0])
    with pytest.raises(ValueError, match="offset"):
        ring.futex_wait(word, 2, 0)
    with pytest.raises(ValueError, match="offset"):
        ring.futex_wait(word, 8, 0)
    with pytest.raises(ValueError, match="offset"):
        ring.futex_wait(word, -4, 0)
    with pytest.raises(ValueError, match="size"):
        ring.futex_wait(word, 0, 0, size=3)
    with pytest.raises(ValueError, match="size"):
        ring.futex_wake(word, 0, size=3)
    with pytest.raises(ValueError):
        ring.futex_wait(word, 0, 1 << 32)
    with pytest.raises(ValueError):
        ring.futex_wait(word, 0, 0, mask=0)
    with pytest.raises(TypeError):
        ring.futex_wait(b"\0\0\0\0", 0, 0)
    with pytest.raises(ValueError, match="offset"):
        ring.futex_wake(word, 1)
    assert ring.stats().in_flight == 0


def test_epoll_ctl_add_and_del(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """EPOLL_CTL_ADD registers the fd with our data value (select.epoll.poll reports it);
    adding twice is EEXIST; EPOLL_CTL_DEL removes it."""
    r, w = pipe
    ep = select.epoll()
    try:
        assert ring.run(ring.epoll_ctl(ep.fileno(), EPOLL_CTL_ADD, r, select.EPOLLIN, 4242)) == 0
        assert ep.poll(0) == []
        os.write(w, b"x")
        assert ep.poll(1) == [(4242, select.EPOLLIN)]
        with pytest.raises(FileExistsError):
            ring.run(ring.epoll_ctl(ep, EPOLL_CTL_ADD, r, select.EPOLLIN, 1))
        assert ring.run(ring.epoll_ctl(ep, EPOLL_CTL_DEL, r)) == 0
        assert ep.poll(0) == []
        with pytest.raises(FileNotFoundError):
            ring.run(ring.epoll_ctl(ep, EPOLL_CTL_DEL, r))
    finally:
        ep.close()


def test_epoll_ctl_bad_input(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """Out-of-range data/events are refused before queuing; a non-epoll epfd fails with EINVAL."""
    r, w = pipe
    with pytest.raises(ValueError):
        ring.epoll_ctl(r, EPOLL_CTL_ADD, w, select.EPOLLIN, -1)
    with pytest.raises(ValueError):
        ring.epoll_ctl(r, EPOLL_CTL_ADD, w, select.EPOLLIN, 1 << 64)
    with pytest.raises(ValueError):
        ring.epoll_ctl(r, EPOLL_CTL_ADD, w, -1)
    assert ring.stats().in_flight == 0
    with pytest.raises(OSError) as info:
        ring.run(ring.epoll_ctl(r, EPOLL_CTL_ADD, w, select.EPOLLIN))
    assert info.value.errno == errno.EINVAL



def test_epoll_ctl_refuses_fixed_files(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """epoll_ctl has no registered-file form: a FixedFile is refused (TypeError), not taken for
    the descriptor with its slot number."""
    r, _w = pipe
    (fixed,) = ring.register_files([r])
    ep = select.epoll()
    try:
        with pytest.raises(TypeError, match="FixedFile"):
            ring.epoll_ctl(ep.fileno(), EPOLL_CTL_ADD, fixed, select.EPOLLIN)
        assert ring.stats().in_flight == 0
    finally:
        ep.close()
        ring.unregister_files()


def test_drained_chain_does_not_block_cancel_or_close(pipe: tuple[int, int]) -> None:
    """A drained chain waits for every earlier request, and so would cancel requests queued after
    it: op.cancel() and close() go around the SQ (IORING_REGISTER_SYNC_CANCEL), so a blocked
    earlier read is cancelled and close() returns; on kernels before 6.0 drain is refused."""
    r, _w = pipe
    ring = saferring.Ring(16)
    try:
        blocked = ring.read(r, bytearray(1))
        ring.submit()
        if kernel_lacks("can:SYNC_CANCEL"):
            with pytest.raises(saferring.UnsupportedOperationError, match=r"6\.0"), \
                    ring.chain(drain=True):
                pass
            return
        with ring.chain(drain=True):
            after = ring.nop()
        ring.submit()
        assert not ring.wait(1, timeout=0.05)  # the drained nop waits for the blocked read
        blocked.cancel()
        _wait_done(ring, blocked, after)
        _assert_cancelled(blocked)
        assert after.result() == 0
        again = ring.read(r, bytearray(1))
        ring.submit()
        ring.close(timeout=5)  # cancels it through the register path too
        _assert_cancelled(again)
    finally:
        ring.close()


def test_refused_async_cancel_does_not_mark_the_op(ring: saferring.Ring,
                                                   pipe: tuple[int, int]) -> None:
    """An async_cancel refused inside an open chain leaves the op as it was: cancel() still works."""
    r, _w = pipe
    op = ring.read(r, bytearray(1))
    ring.submit()
    with ring.chain():
        ring.nop()
        with pytest.raises(OperationStateError):
            ring.async_cancel(op)
    assert not op.cancel_requested
    op.cancel()
    _wait_done(ring, op)
    _assert_cancelled(op)


def test_oversized_descriptors_refused(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A descriptor number beyond 32 bits is refused (ValueError), never wrapped to a real one."""
    r, w = pipe
    ep = select.epoll()
    try:
        with pytest.raises(ValueError):
            ring.epoll_ctl(ep.fileno(), EPOLL_CTL_ADD, (1 << 64) + r, select.EPOLLIN)
        with pytest.raises(ValueError):
            ring.splice((1 << 32) + r, w, 1)
        with pytest.raises(ValueError):
            ring.poll_add((1 << 32) + r, select.POLLIN)
        assert ring.stats().in_flight == 0 and ring.submit() == 0
    finally:
        ep.close()


def test_wait_counts_messages_already_reaped(ring: saferring.Ring) -> None:
    """wait(1) with nothing in flight but a message already posted returns the message instead
    of refusing (it could return)."""
    _needs_msg_ring(ring)
    with saferring.Ring(8) as sender:
        sender.run(sender.msg_ring(ring, 9))
    got = ring.wait(1)
    assert [(m.value, m.result()) for m in got] == [(9, 0)]
    with pytest.raises(ValueError, match="could never return"):
        ring.wait(1)


def test_link_timeout_refuses_multishot(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A multishot poll cannot get a link timeout (the kernel never arms it): TypeError."""
    r, _w = pipe
    poll = ring.poll_add(r, select.POLLIN, multishot=True)
    with pytest.raises(TypeError, match="multishot"):
        ring.link_timeout(poll, 0.01)
    poll.cancel()
    _wait_done(ring, poll)
