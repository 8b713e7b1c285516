"""Helpers for the asyncio suites: run a coroutine on stock asyncio or on uvloop, an AsyncRing
that is checked at the end of the test, and bounded waits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import uvloop

from saferring.aio import AsyncRing

T = TypeVar("T")

# Under the emulated 6.1 kernel (make test-kernel-6.1) the suites run on stock asyncio only, and
# the comparisons with the loops' own transports are left to the host: what the guest checks is
# the kernel, and emulation makes every run 20-50x slower.
IN_KERNEL_GUEST = bool(os.environ.get("SAFERRING_KERNEL_GUEST"))
LOOP_KINDS = ("asyncio",) if IN_KERNEL_GUEST else ("asyncio", "uvloop")

# libuv opens a process-wide pipe with the first loop ever created (and keeps it): open it now,
# so that the per-test descriptor check (conftest.no_leaks) does not count it as a leak.
uvloop.new_event_loop().close()


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A new event loop of ``kind`` ("asyncio" or "uvloop"), not set as the current loop."""
    if kind == "uvloop":
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(kind: str, coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """``coro_fn(*args)`` run to its end on a fresh loop of ``kind`` (asyncio.run semantics:
    remaining tasks cancelled, async generators shut down, loop closed).  uvloop.run is
    asyncio.Runner(loop_factory=uvloop.new_event_loop) where Python has it (3.11+)."""
    if kind == "asyncio":
        return asyncio.run(coro_fn(*args))
    return uvloop.run(coro_fn(*args))


async def settle(aring: AsyncRing, limit: float = 5.0) -> None:
    """Let the loop run until nothing is in flight on ``aring`` (bounded)."""
    deadline = time.monotonic() + limit
    while aring.in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(0.001)


def assert_idle(aring: AsyncRing) -> None:
    """Nothing in flight and nothing pinned on ``aring``."""
    stats = aring.stats()
    assert aring.in_flight() == 0, f"operations still in flight: {stats}"
    assert stats.in_flight == 0, f"operations still in flight: {stats}"
    assert stats.pinned_bytes == 0, f"memory still pinned: {stats}"


@contextlib.asynccontextmanager
async def checked_ring(entries: int = 64, **options: Any) -> AsyncIterator[AsyncRing]:
    """An AsyncRing for one test: at the end, once cancelled requests have ended, nothing may
    be in flight or pinned; then it is closed (and must say so)."""
    aring = AsyncRing(entries, **options)
    try:
        yield aring
    except BaseException:
        aring.close()
        raise
    try:
        await settle(aring)
        assert_idle(aring)
    finally:
        await aring.aclose()
    assert aring.closed


async def until(pred: Callable[[], bool], limit: float = 5.0) -> None:
    """Yield to the loop until ``pred()`` holds; fail if it does not within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


async def reap_without_yielding(aring: AsyncRing, pred: Callable[[], bool],
                                poke: Callable[[], None] | None = None,
                                limit: float = 10.0) -> None:
    """Collect completions on ``aring`` until ``pred()`` holds, without letting any other task
    run: a task whose request completed is then woken but has not resumed yet (cancelling it
    now is the "completion and cancel in the same loop iteration" case).  ``poke()`` runs between
    reaps (to drain a peer, say).  It drives the ring's poll itself: an awaited ``nop`` would
    not do, since inline submission defers the rest of a loop iteration after a request that
    did not complete at once."""
    deadline = time.monotonic() + limit
    while True:
        if poke is not None:
            poke()
        aring._poll()
        if pred():
            return
        assert time.monotonic() < deadline, "completion not collected in time"
        time.sleep(0.001)  # blocking on purpose: no other task may run meanwhile


async def cancel_and_wait(task: asyncio.Task[Any]) -> BaseException | Any:
    """Cancel ``task`` and return what it ended with (its result or its exception)."""
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
        return asyncio.CancelledError()
    except BaseException as exc:  # handed back to the test
        return exc


@contextlib.contextmanager
def socketpair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected AF_UNIX stream pair, closed at the end."""
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    """A TCP socket listening on 127.0.0.1 (an ephemeral port), closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def hang_guard(seconds: float = 10.0) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds``: turns a loop that spins without
    ever yielding (which no asyncio timeout can interrupt) into a failure instead of a hang."""
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"still running after {seconds} s: spinning or blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
