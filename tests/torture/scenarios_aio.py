"""Torture scenarios for saferring.aio: asyncio tasks cancelled at every await point (before the
request is submitted, while it is in the kernel, after its completion arrived but before the task
resumed), loops and rings closed under requests in flight, protocol and callback code that raises
or closes the ring from inside the completion path, wrong-loop use, and hundreds of gathered
operations with a random subset cancelled.

Each scenario runs on stock asyncio and on uvloop (stock asyncio only in the emulated-kernel
guest, as tests/_aio.py LOOP_KINDS), makes and closes its own AsyncRings, and checks the data
outcome: no byte, connection or file position lost or duplicated.  The harness then checks that
no ring is left open, no descriptor leaked and no canary changed."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import os
import random
import socket
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from harness import Context, scenario

import saferring
from _aio import LOOP_KINDS, hang_guard, new_loop, reap_without_yielding
from _aio import run as run_loop
from saferring import aio
from saferring.aio import AsyncRing

T = TypeVar("T")

LIMIT = 10.0  # seconds any one wait may take before the scenario fails instead of hanging
# Loop iterations a cancelled task may take to end.  Cancelling wakes the task in the next
# iteration; it must not wait for any I/O (a completion, a cancel landing in the kernel).
PROMPT_TURNS = 3
HOST = "127.0.0.1"

# -- running on both loops (tests/_aio.py: LOOP_KINDS, new_loop, run, hang_guard) -------------------

#: A scenario's loop may run this long before hang_guard fails it (each runs many cases).
GUARD = 60.0


def run_on(kind: str, coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """``coro_fn(*args)`` to its end on a fresh loop of ``kind``, with asyncio.run's semantics
    (remaining tasks cancelled, async generators shut down, the loop closed)."""
    with hang_guard(GUARD):
        return run_loop(kind, coro_fn, *args)


def on_each_loop(coro_fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    """Run ``coro_fn(kind, *args)`` once on each loop kind."""
    for kind in LOOP_KINDS:
        run_on(kind, coro_fn, kind, *args)


# -- waiting, bounded -----------------------------------------------------------------------------

async def bounded(aw: Awaitable[T], limit: float = LIMIT) -> T:
    """``await aw``, failing (TimeoutError) after ``limit`` seconds instead of hanging."""
    return await asyncio.wait_for(aw, limit)


async def until(pred: Callable[[], bool], what: str = "condition", limit: float = LIMIT) -> None:
    """Let the loop run until ``pred()`` holds (bounded)."""
    deadline = time.monotonic() + limit
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not reached within {limit} s"
        await asyncio.sleep(0.001)


async def in_kernel(aring: AsyncRing, task: asyncio.Task[Any], what: str = "request") -> None:
    """Let the loop run until ``task`` waits for a request in the kernel (bounded)."""
    await until(lambda: aring.in_flight() >= 1 and not task.done(), f"{what} in flight")


async def settle(aring: AsyncRing) -> None:
    """Let the loop run until nothing is in flight on ``aring`` (cancelled requests ended)."""
    await until(lambda: aring.in_flight() == 0, "requests still in flight")


def assert_idle(aring: AsyncRing) -> None:
    stats = aring.stats()
    assert aring.in_flight() == 0 and stats.in_flight == 0, f"still in flight: {stats}"
    assert stats.pinned_bytes == 0, f"still pinned: {stats}"


@contextlib.asynccontextmanager
async def checked_ring(entries: int = 64, **options: Any) -> AsyncIterator[AsyncRing]:
    """An AsyncRing that must end idle (once cancelled requests ended), then closed."""
    aring = AsyncRing(entries, **options)
    try:
        yield aring
        await settle(aring)
        assert_idle(aring)
    finally:
        await aring.aclose()
    assert aring.closed


def _assert_closed(fd: int, what: str) -> None:
    """``fd`` names no open file any more (``what`` says whose it was)."""
    try:
        os.fstat(fd)
    except OSError:
        return
    raise AssertionError(f"{what} was left open")


async def cancel_promptly(task: asyncio.Task[Any]) -> tuple[bool, Any]:
    """Cancel ``task``; it must end within PROMPT_TURNS loop iterations, with no I/O needed.
    Returns ``(True, None)`` if it ended cancelled, ``(False, result)`` if it had already
    finished (an exception other than CancelledError is raised here)."""
    task.cancel()
    for _ in range(PROMPT_TURNS):
        if task.done():
            break
        await asyncio.sleep(0)
    assert task.done(), f"a cancelled task did not end within {PROMPT_TURNS} loop iterations"
    if task.cancelled():
        return True, None
    return False, task.result()


async def must_cancel(task: asyncio.Task[Any]) -> None:
    """Cancel ``task``: it must end with CancelledError, promptly."""
    cancelled, result = await cancel_promptly(task)
    assert cancelled, f"the task was cancelled but returned {result!r}"


def capture_loop_errors() -> list[dict[str, Any]]:
    """Route what the running loop reports to its exception handler into a list."""
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
    return reported


def listening_socket(backlog: int = 64) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    sock.listen(backlog)
    return sock


@functools.cache
def _unit(seed: int) -> bytes:
    return bytes((seed * 131 + i * 7) % 251 for i in range(251))


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ with ``seed`` (so misplaced or repeated data shows)."""
    return (_unit(seed % 251) * (size // 251 + 1))[:size]


# -- cancelling receives: recv on a socket, read on a pipe --------------------------------------

STREAM_PHASES = ("before_run", "first_step", "in_flight", "after_cqe")


async def _cancelled_stream_rounds(ctx: Context, aring: AsyncRing, inline: bool, what: str,
                                   rounds: int) -> None:
    """Receive rounds on one stream (``what``: "recv" on a socket pair, "read" on a pipe at the
    file position), each cancelled at one of STREAM_PHASES; in the end the bytes received are
    exactly the bytes sent, in order."""
    if what == "recv":
        a, b = ctx.socketpair()
        fd = b.fileno()

        def send(data: bytes) -> None:
            a.sendall(data)

        def receive(buf: bytearray) -> Coroutine[Any, Any, int]:
            return aring.recv(fd, buf)
    else:
        fd, w = ctx.pipe()

        def send(data: bytes) -> None:
            assert os.write(w, data) == len(data)

        def receive(buf: bytearray) -> Coroutine[Any, Any, int]:
            return aring.read(fd, buf)

    sent = bytearray()
    got = bytearray()

    async def catch_up() -> None:
        # Receive until every byte sent so far arrived (kept bytes come first, then the
        # socket's): the stream is then empty, so the next receive has to wait in the kernel.
        while len(got) < len(sent):
            buf = bytearray(4096)
            n = await bounded(receive(buf))
            assert n > 0, "end of stream before every byte sent was received"
            got.extend(buf[:n])

    sizes = (1, 3, 8, 64, 4096)
    phases = {p: 0 for p in STREAM_PHASES}
    for i in range(rounds):
        await settle(aring)  # each round starts with nothing in the kernel
        phase = STREAM_PHASES[i % len(STREAM_PHASES)]
        if phase in ("in_flight", "after_cqe"):
            await catch_up()
        size = sizes[(i // len(STREAM_PHASES)) % len(sizes)]
        msg = b"<%d:%s>" % (i, b"." * (i % 11))
        early = phase in ("before_run", "first_step") and (i // 2) % 2 == 0
        if early:  # the data is there before the receive starts
            send(msg)
            sent += msg
        buf = bytearray(size)
        task = asyncio.ensure_future(receive(buf))
        if phase == "before_run":
            # Cancelled before its first step: nothing was queued, nothing may be consumed.
            await must_cancel(task)
            assert aring.in_flight() == 0
        elif phase == "first_step":
            # The task ran once: its request was submitted (inline: and may have completed at
            # submission, the task then returned without suspending) or queued (deferred: it
            # is submitted with its cancel, and may still take the data first).
            await asyncio.sleep(0)
            cancelled, n = await cancel_promptly(task)
            if not cancelled:
                got += buf[:n]
        elif phase == "in_flight":
            await in_kernel(aring, task, "receive")
            await must_cancel(task)
            # The buffer is now referenced by the ring's registry alone (until the request's
            # final CQE): drop ours and reuse the memory before any data arrives.
            del buf, task  # (freed by reference counting, unless the ring still pins it)
            ctx.spray(size, 32)
        elif inline:
            # after_cqe: the data arrives and its CQE is reaped (the task is woken), then the
            # task is cancelled before it resumed: CancelledError, and the bytes are kept.
            await in_kernel(aring, task, "receive")
            send(msg)
            sent += msg
            await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
            assert not task.done()
            await must_cancel(task)
            del buf, task  # (freed by reference counting, unless the ring still pins it)
            ctx.spray(size, 32)
        else:
            # after_cqe on a deferred ring: the data and the cancel race through the same
            # iteration (the completion is collected at the end of it); either outcome is fine,
            # the bytes are not lost.
            await in_kernel(aring, task, "receive")
            send(msg)
            sent += msg
            await asyncio.sleep(0)
            cancelled, n = await cancel_promptly(task)
            if not cancelled:
                got += buf[:n]
        phases[phase] += 1
        if not early and phase != "after_cqe":
            send(msg)  # after the cancel: must reach the next receive
            sent += msg
        # Sometimes read a little right away: kept bytes come first, then newer ones.
        if i % 5 == 4 and len(got) < len(sent):
            small = bytearray(2)
            n = await bounded(receive(small))
            got += small[:n]
    await catch_up()
    assert bytes(got) == bytes(sent), "bytes lost, repeated or reordered across cancellations"
    assert min(phases.values()) > 0


async def _stream_scenario(kind: str, ctx: Context, what: str) -> None:
    for submit in ("inline", "deferred"):
        async with checked_ring(64, submit=submit) as aring:
            await _cancelled_stream_rounds(ctx, aring, submit == "inline", what, 40)


@scenario()
def aio_recv_cancelled_at_every_await_point(ctx: Context) -> None:
    """AsyncRing.recv tasks on a socket pair cancelled before their first step, right after it
    (submitted, or queued on a deferred ring), while in the kernel (buffer then dropped and
    sprayed), and after the completion was reaped but before the task resumed, on inline and
    deferred rings: every cancel gives CancelledError within a few loop iterations, and the
    bytes received, including what cancelled receives handed on, are exactly the bytes sent."""
    on_each_loop(_stream_scenario, ctx, "recv")


async def _explicit_offset_keeps_nothing(kind: str, ctx: Context) -> None:
    """A read at an explicit offset whose task was cancelled after it completed consumed
    nothing: the next read at the file position is not handed its data."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f")
        data = pattern(7, 8192)
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            async with checked_ring(16, submit="deferred") as aring:
                for turns in range(4):
                    buf = bytearray(100)
                    task = asyncio.ensure_future(aring.read(fd, buf, 4000))
                    for _ in range(turns):
                        await asyncio.sleep(0)
                    cancelled, n = await cancel_promptly(task)
                    if not cancelled:
                        assert bytes(buf[:n]) == data[4000:4000 + n]
                    await settle(aring)
                    out = bytearray(50)
                    n = await bounded(aring.read(fd, out))  # the file position: 50 * turns
                    assert bytes(out[:n]) == data[50 * turns:50 * turns + 50], (
                        "a cancelled explicit-offset read's data was handed to a positional read")
        finally:
            os.close(fd)


async def _pipe_read_scenario(kind: str, ctx: Context) -> None:
    await _stream_scenario(kind, ctx, "read")
    await _explicit_offset_keeps_nothing(kind, ctx)


@scenario()
def aio_pipe_read_cancelled_at_every_await_point(ctx: Context) -> None:
    """AsyncRing.read at the file position of a pipe, cancelled at the same points as the recv
    scenario: CancelledError promptly, and no byte lost, repeated or reordered; a read at an
    explicit offset of a regular file, cancelled after it completed, hands nothing on (the next
    positional read returns the file's bytes at the position, not the cancelled read's)."""
    on_each_loop(_pipe_read_scenario, ctx)


# -- cancelling accepts ---------------------------------------------------------------------------

async def _accept_rounds(aring: AsyncRing, inline: bool, rounds: int) -> None:
    """Accept rounds on one listener, each cancelled at one of STREAM_PHASES; every client is
    accepted exactly once, in the order it connected; a connection a cancelled accept kept is
    closed by close_fd(listener)."""
    lsock = listening_socket()
    address = lsock.getsockname()
    lfd = lsock.detach()  # closed through the ring at the end
    clients: list[socket.socket] = []
    conns: list[socket.socket] = []
    accepted: list[int] = []

    def connect(send_id: bool = True) -> None:
        client = socket.create_connection(address, timeout=LIMIT)
        clients.append(client)
        if send_id:
            client.sendall(b"%04d" % (len(clients) - 1))

    def take(result: tuple[int, Any]) -> None:
        fd, peer = result
        conn = socket.socket(fileno=fd)
        conns.append(conn)
        conn.settimeout(LIMIT)  # its client sent its number right after connecting
        ident = int(conn.recv(4))
        assert peer == clients[ident].getsockname(), "accept returned the wrong peer address"
        accepted.append(ident)

    async def catch_up() -> None:
        while len(accepted) < len(clients):
            take(await bounded(aring.accept(lfd)))

    try:
        for i in range(rounds):
            await settle(aring)
            phase = STREAM_PHASES[i % len(STREAM_PHASES)]
            if phase in ("in_flight", "after_cqe"):
                await catch_up()  # the backlog is empty: the next accept waits in the kernel
            early = phase in ("before_run", "first_step") and (i // 2) % 2 == 0
            if early:
                connect()
            task = asyncio.ensure_future(aring.accept(lfd))
            if phase == "before_run":
                await must_cancel(task)
            elif phase == "first_step":
                await asyncio.sleep(0)
                cancelled, result = await cancel_promptly(task)
                if not cancelled:
                    take(result)
            elif phase == "in_flight":
                await in_kernel(aring, task, "accept")
                await must_cancel(task)
                connect()  # after the cancel: for the next accept
            elif inline:
                await in_kernel(aring, task, "accept")
                connect()
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert not task.done()
                await must_cancel(task)  # the connection it took is kept for the next accept
            else:
                await in_kernel(aring, task, "accept")
                connect()
                await asyncio.sleep(0)
                cancelled, result = await cancel_promptly(task)
                if not cancelled:
                    take(result)
            if i % 5 == 4:
                await catch_up()
        await catch_up()
        assert accepted == list(range(len(clients))), (
            f"connections lost, repeated or reordered: accepted {accepted}")
        if inline:
            # A connection kept by a cancelled accept nobody follows up: close_fd(listener)
            # on the ring closes it (its client sees the end of the stream).
            await settle(aring)
            task = asyncio.ensure_future(aring.accept(lfd))
            await in_kernel(aring, task, "accept")
            connect(send_id=False)
            await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
            await must_cancel(task)
        assert await bounded(aring.close_fd(lfd)) == 0
        lfd = -1
        if inline:
            clients[-1].settimeout(LIMIT)
            assert clients[-1].recv(16) == b"", "the kept connection was not closed"
    finally:
        if lfd >= 0:
            os.close(lfd)
        for s in clients + conns:
            s.close()


async def _accept_scenario(kind: str) -> None:
    for submit in ("inline", "deferred"):
        async with checked_ring(64, submit=submit) as aring:
            await _accept_rounds(aring, submit == "inline", 32)


@scenario()
def aio_accept_cancelled_at_every_await_point(ctx: Context) -> None:
    """AsyncRing.accept tasks cancelled before their first step, right after it, while waiting
    in the kernel, and after the kernel handed them a connection but before they resumed, on
    inline and deferred rings: CancelledError promptly each time, every client is accepted
    exactly once and in connection order (a kept connection goes to the next accept), and
    close_fd(listener) closes a kept connection nobody took."""
    on_each_loop(_accept_scenario)


# -- cancelling file reads (saferring.aio.open) ---------------------------------------------------

def _file_call(f: Any, i: int, size: int, target: bytearray) -> Coroutine[Any, Any, Any]:
    kind = i % 4
    if kind == 0:
        return f.read(size)  # type: ignore[no-any-return]
    if kind == 1:
        return f.readline()  # type: ignore[no-any-return]
    if kind == 2:
        return f.read1(size)  # type: ignore[no-any-return]
    return f.readinto(target)  # type: ignore[no-any-return]


async def _regular_file_rounds(aring: AsyncRing, path: str, data: bytes, nowait: bool,
                               buffering: int, rounds: int) -> int:
    """read/readline/read1/readinto calls cancelled after 0-3 loop iterations, or from a
    callback queued right behind the request's own completion: a cancelled call returns
    nothing and leaves tell() where it was (what its request read joins the read-ahead); a
    finished one returns the file's next bytes and moves tell() by their length.  Returns how
    many calls ended cancelled."""
    loop = asyncio.get_running_loop()
    cancelled_calls = 0
    async with aio.open(path, "rb", buffering=buffering, nowait=nowait, ring=aring) as f:
        got = bytearray()
        for i in range(rounds):
            before = await f.tell()
            assert before == len(got)
            size = 1 + (i * 37) % 700
            target = bytearray(size)
            task = asyncio.ensure_future(_file_call(f, i, size, target))
            turns = (i // 4) % 5
            if turns == 4:
                # The deferred ring submits at the end of this iteration and collects the
                # completion there; the cancel queued behind it lands before the task resumes.
                await asyncio.sleep(0)
                loop.call_soon(task.cancel)
                await asyncio.sleep(0)
            for _ in range(turns % 4):
                await asyncio.sleep(0)
            cancelled, result = await cancel_promptly(task)
            if cancelled:
                cancelled_calls += 1
                assert await f.tell() == before, "a cancelled read moved the position"
                continue
            chunk = bytes(target[:result]) if i % 4 == 3 else result
            assert chunk == data[before:before + len(chunk)], "a read returned the wrong bytes"
            if i % 4 == 1:
                assert chunk.endswith(b"\n") or before + len(chunk) == len(data)
            got += chunk
            assert await f.tell() == len(got)
        got += await bounded(f.read())
        assert bytes(got) == data, "file bytes lost or repeated across cancelled reads"
    return cancelled_calls


async def _pipe_file_rounds(ctx: Context, aring: AsyncRing) -> None:
    """An AsyncFile on a pipe: a call cancelled while its read waits for data (the request is
    not cancelled; its buffer dropped and sprayed), after the data was reaped but before the
    task resumed, and while waiting behind another cancelled call's request: CancelledError
    promptly, and the next reads return every byte in order; close() with a pending read does
    not hang."""
    r, w = ctx.pipe()
    f = await aio.open(os.dup(r), "rb", buffering=4096, ring=aring)
    try:
        task = asyncio.ensure_future(f.read(6))
        await until(lambda: aring.in_flight() == 1 and not task.done(), "file read in flight")
        await must_cancel(task)
        assert aring.in_flight() == 1, "a file request was cancelled (documented: it runs on)"
        del task
        gc.collect()
        ctx.spray(4096, 128)  # the request's 4096-byte buffer is the registry's alone
        os.write(w, b"first!second")
        assert await bounded(f.read(6)) == b"first!"
        assert await bounded(f.read(6)) == b"second"

        task = asyncio.ensure_future(f.read(5))
        await until(lambda: aring.in_flight() == 1 and not task.done(), "file read in flight")
        os.write(w, b"abcde")
        await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
        assert not task.done()
        await must_cancel(task)
        assert await bounded(f.read(5)) == b"abcde", "a completed cancelled read lost its data"

        first = asyncio.ensure_future(f.read(3))
        await until(lambda: aring.in_flight() == 1 and not first.done(), "file read in flight")
        await must_cancel(first)
        second = asyncio.ensure_future(f.read(3))  # waits for the first call's request
        await asyncio.sleep(0)
        await must_cancel(second)
        os.write(w, b"xyz")
        assert await bounded(f.read(3)) == b"xyz"

        task = asyncio.ensure_future(f.read(3))
        await until(lambda: aring.in_flight() == 1 and not task.done(), "file read in flight")
        await must_cancel(task)
        await bounded(f.close())  # cancels the pending pipe read instead of waiting for data
        await settle(aring)
    finally:
        await f.close()


async def _file_scenario(kind: str, ctx: Context) -> None:
    data = b"".join(b"%05d:" % i + pattern(i, i % 29) + b"\n" for i in range(2500))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data")
        with open(path, "wb") as out:
            out.write(data)
        cancelled = 0
        for submit, nowait, buffering in (("inline", True, 512), ("inline", False, 4096),
                                          ("deferred", False, 512), ("deferred", True, 4096)):
            async with checked_ring(64, submit=submit) as aring:
                cancelled += await _regular_file_rounds(aring, path, data, nowait, buffering, 60)
        assert cancelled > 0
    async with checked_ring(64) as aring:
        await _pipe_file_rounds(ctx, aring)


@scenario()
def aio_file_read_cancelled_at_every_await_point(ctx: Context) -> None:
    """saferring.aio.open reads (read, readline, read1, readinto) cancelled before their first
    step, while their request is queued or in the kernel, and with the completion collected in
    the same iteration as the cancel, on inline and deferred rings, with and without the
    page-cache fast path: a cancelled call leaves tell() unchanged and loses nothing (the file
    reads back whole); on a pipe the request is not cancelled, its dropped buffer still gets the
    data, and the next read returns it; close() does not wait for a silent writer."""
    on_each_loop(_file_scenario, ctx)


# -- cancelling stream reads and drain() ----------------------------------------------------------

class CountingReader(asyncio.StreamReader):
    """A StreamReader that counts the bytes its transport fed it."""

    fed = 0

    def feed_data(self, data: Any) -> None:
        self.fed += len(data)
        super().feed_data(data)


async def _stream_client(aring: AsyncRing, address: tuple[str, int]
                         ) -> tuple[CountingReader, asyncio.StreamWriter]:
    """What saferring.aio.open_connection builds, with a CountingReader."""
    loop = asyncio.get_running_loop()
    reader = CountingReader(loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await bounded(aio.create_connection(lambda: protocol, *address, ring=aring))
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def _stream_read_rounds(aring: AsyncRing, rounds: int) -> None:
    """readexactly()/readline() on a saferring stream whose peer is a plain socket the scenario
    drives: cancelled before the first step, while waiting with part of the data there, and
    after the rest arrived (reaped and fed) but before the task resumed.  The reader keeps what
    a cancelled call did not return (asyncio's semantics), so the bytes read are the bytes sent."""
    lsock = listening_socket()
    try:
        reader, writer = await _stream_client(aring, lsock.getsockname())
        peer, _ = lsock.accept()
    finally:
        lsock.close()
    try:
        sent = bytearray()
        got = bytearray()

        def send(data: bytes) -> None:
            peer.sendall(data)
            sent.extend(data)

        async def fed_all() -> None:
            await until(lambda: reader.fed == len(sent), "data fed to the reader")

        for i in range(rounds):
            record = b"%04d|%s\n" % (i, pattern(i, 20 + i % 50).replace(b"\n", b"."))
            line = i % 2 == 1
            call: Callable[[], Coroutine[Any, Any, bytes]] = (
                reader.readline if line else functools.partial(reader.readexactly, len(record)))
            phase = i % 4
            if phase == 0:
                send(record)
                await fed_all()
                await must_cancel(asyncio.ensure_future(call()))
            else:
                split = 1 + i % (len(record) - 1)
                send(record[:split])
                await fed_all()
                task = asyncio.ensure_future(call())
                await asyncio.sleep(0)
                assert not task.done(), "returned before its data arrived"
                if phase == 1:
                    await must_cancel(task)  # waiting, part of the record there
                    send(record[split:])
                elif phase == 2:
                    send(record[split:])
                    # The rest is reaped and fed (the task is woken), then the task is
                    # cancelled before it resumed.
                    await reap_without_yielding(aring, lambda: reader.fed == len(sent))
                    assert not task.done()
                    await must_cancel(task)
                else:
                    send(record[split:])
                    got += await bounded(task)
                    continue
            # What the cancelled call did not return is still there, whole.
            got += await bounded(call())
        assert bytes(got) == bytes(sent), "stream bytes lost or repeated across cancellations"
        writer.close()
        await bounded(writer.wait_closed())
    finally:
        peer.close()


async def _drain_rounds(aring: AsyncRing, rounds: int) -> None:
    """drain() under back-pressure (the peer does not read; small socket buffers, small water
    marks) cancelled before its first step, while waiting, and after resume_writing() woke it
    but before it resumed: CancelledError promptly; every byte written arrives once, in order."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # inherited by the peer
    lsock.bind((HOST, 0))
    lsock.listen(1)
    try:
        _, writer = await _stream_client(aring, lsock.getsockname())
        peer, _ = lsock.accept()
    finally:
        lsock.close()
    peer.setblocking(False)
    received = bytearray()

    def drain_peer() -> None:
        while True:
            try:
                data = peer.recv(65536)
            except BlockingIOError:
                return
            if not data:
                return
            received.extend(data)

    try:
        transport = writer.transport
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        transport.set_write_buffer_limits(high=16384, low=4096)
        written = bytearray()
        for i in range(rounds):
            chunk = pattern(100 + i, 60_000 + 1000 * i)
            writer.write(chunk)
            written += chunk
            task = asyncio.ensure_future(writer.drain())
            phase = i % 3
            if phase == 0:
                await must_cancel(task)  # before its first step
            elif phase == 1:
                await asyncio.sleep(0)
                assert not task.done(), "drain() returned with the peer not reading"
                await must_cancel(task)
            else:
                await asyncio.sleep(0)
                assert not task.done(), "drain() returned with the peer not reading"
                # The peer reads; the sends complete and are reaped; resume_writing() wakes the
                # drain, which is then cancelled before it resumed.
                low = transport.get_write_buffer_limits()[0]
                await reap_without_yielding(
                    aring, lambda low=low: transport.get_write_buffer_size() <= low, drain_peer)
                await must_cancel(task)
            drain_peer()
        writer.write_eof()
        deadline = time.monotonic() + LIMIT
        while len(received) < len(written):
            assert time.monotonic() < deadline, "written bytes did not all arrive"
            drain_peer()
            await asyncio.sleep(0.001)
        assert bytes(received) == bytes(written), "bytes lost or repeated across drain cancels"
        writer.close()
        await bounded(writer.wait_closed())
    finally:
        peer.close()


async def _streams_scenario(kind: str) -> None:
    async with checked_ring(64) as aring:
        await _stream_read_rounds(aring, 40)
        await _drain_rounds(aring, 12)


@scenario()
def aio_stream_reads_and_drain_cancelled_at_every_await_point(ctx: Context) -> None:
    """asyncio StreamReader/StreamWriter over saferring transports: readexactly() and readline()
    cancelled before their first step, while waiting with part of the data there, and after
    the rest was reaped and fed but before the task resumed; drain() cancelled before its first
    step, while the peer does not read, and after resume_writing() woke it: CancelledError
    promptly each time, and every byte sent arrives exactly once, in order, both ways."""
    on_each_loop(_streams_scenario)


# -- rings and loops closed with requests in flight -----------------------------------------------

class InFlight:
    """Requests of every kind left in flight on one AsyncRing: tasks awaiting recv, pipe reads,
    accepts, timeouts, a multishot timeout and a multishot receive, an AsyncFile read on a pipe;
    and requests queued on ``aring.ring`` whose buffers nobody but the ring references ("orphans").
    :meth:`feed` then makes the kernel complete some of them into those buffers."""

    def __init__(self, ctx: Context, aring: AsyncRing) -> None:
        self.ctx = ctx
        self.aring = aring
        self.task_pair = ctx.socketpair()   # task receives: data only after the ring closed
        self.orphan_pair = ctx.socketpair()  # orphan receives: data while the ring is open
        self.multi_pair = ctx.socketpair()   # a multishot receive into a BufferRing
        self.task_pipe = ctx.pipe()
        self.orphan_pipe = ctx.pipe()
        self.file_pipe = ctx.pipe()
        self.listener = listening_socket()
        ctx.sockets.append(self.listener)
        self.clients: list[socket.socket] = []
        self.tasks: dict[str, list[asyncio.Task[Any]]] = {}
        self.file: Any = None
        self.buffers: saferring.BufferRing | None = None
        self.expected = 0  # requests in flight once everything started

    def _spawn(self, what: str, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.setdefault(what, []).append(asyncio.ensure_future(coro))
        self.expected += 1

    async def start(self) -> None:
        aring = self.aring
        ring = aring.ring
        for _ in range(3):
            self._spawn("recv", aring.recv(self.task_pair[1].fileno(), bytearray(4096)))
        for _ in range(2):
            self._spawn("read", aring.read(self.task_pipe[0], bytearray(4096)))
            self._spawn("accept", aring.accept(self.listener.fileno()))
            self._spawn("timeout", aring.timeout(30))
        ticks = await aring.timeout(5, multishot=True)
        self.tasks["ticks"] = [asyncio.ensure_future(self._iterate(ticks))]
        self.expected += 1
        self.buffers = saferring.BufferRing(ring, 4, 4096)
        chunks = aring.recv_multishot(self.multi_pair[1].fileno(), self.buffers)
        self.tasks["multishot"] = [asyncio.ensure_future(self._iterate(chunks))]
        self.expected += 1
        self.file = await aio.open(os.dup(self.file_pipe[0]), "rb", buffering=4096, ring=aring)
        self._spawn("file", self.file.read(10))
        # Orphans: queued on the Ring itself, their buffers (and the operations) dropped at once.
        for _ in range(3):
            ring.recv(self.orphan_pair[1].fileno(), bytearray(4096))
        for _ in range(2):
            ring.read(self.orphan_pipe[0], bytearray(4096))
        ring.timeout(30)
        self.expected += 6
        await aring.nop()  # (inline: submits the orphans too)
        await until(lambda: aring.in_flight() >= self.expected, "every request in flight")
        gc.collect()
        self.ctx.spray(4096, 256)

    @staticmethod
    async def _iterate(it: Any) -> int:
        count = 0
        async for value in it:
            if isinstance(value, saferring.Buffer):
                value.release()
            count += 1
        return count

    def feed(self) -> None:
        """Complete orphans into their dropped buffers, and one accept."""
        self.orphan_pair[0].sendall(pattern(1, 3 * 4096))
        os.write(self.orphan_pipe[1], pattern(2, 2 * 4096))
        self.clients.append(socket.create_connection(self.listener.getsockname(), timeout=LIMIT))
        self.ctx.sockets.append(self.clients[-1])

    def check_outcomes(self) -> None:
        """Every task ended with its result or OperationCancelledError (the drain cancelled it);
        connections accepted are closed here."""
        for what, tasks in self.tasks.items():
            for task in tasks:
                assert task.done(), f"a {what} task was left waiting by the ring's close"
                if task.cancelled():
                    continue
                exc = task.exception()
                if exc is not None:
                    assert isinstance(exc, saferring.OperationCancelledError), (
                        f"{what} ended with {exc!r}, documented: OperationCancelledError")
                    assert exc.errno == errno.ECANCELED
                elif what == "accept":
                    os.close(task.result()[0])

    def check_streams_untouched(self) -> None:
        """Data sent once the ring is closed reaches plain reads whole: no cancelled request is
        left in the kernel to take it."""
        a, b = self.task_pair
        a.sendall(b"after the close")
        b.settimeout(LIMIT)
        assert b.recv(64) == b"after the close"
        os.write(self.task_pipe[1], b"pipe after")
        assert os.read(self.task_pipe[0], 64) == b"pipe after"

    async def close_file(self) -> None:
        if self.file is not None:
            await self.file.close()
        if self.buffers is not None:
            assert self.buffers.closed  # closed with its ring
            self.buffers.close()


async def _ring_closed_in_loop(kind: str, ctx: Context) -> None:
    for how in ("aclose", "close", "async with"):
        aring = AsyncRing(64)
        try:
            work = InFlight(ctx, aring)
            await work.start()
            work.feed()
            await asyncio.sleep(0.005)  # some of the orphans complete into dropped buffers
            ctx.check_canaries()
            if how == "aclose":
                await bounded(aring.aclose())
            elif how == "close":
                aring.close()
            else:
                async with aring:
                    pass
            assert aring.closed and aring.in_flight() == 0
            await until(lambda w=work: all(t.done() for ts in w.tasks.values() for t in ts),
                        "tasks woken by the close")
            work.check_outcomes()
            try:
                await aring.nop()
            except saferring.RingClosedError:
                pass
            else:
                raise AssertionError("an operation on a closed AsyncRing did not raise")
            work.check_streams_untouched()
            await work.close_file()
        finally:
            aring.close()


@scenario()
def aio_ring_closed_with_everything_in_flight(ctx: Context) -> None:
    """An AsyncRing closed by aclose(), close() and leaving ``async with`` while tasks await
    recv, pipe reads, accepts, timeouts, a multishot timeout, a multishot receive and a file
    read, and while requests queued on its Ring with dropped (and sprayed) buffers are completed
    by incoming data: no canary changes, every task ends with its result or
    OperationCancelledError, the ring is closed with nothing in flight, later calls raise
    RingClosedError, and data sent afterwards is read whole by plain reads."""
    on_each_loop(_ring_closed_in_loop, ctx)


def _loop_closed_by_hand(ctx: Context, kind: str, how: str) -> None:
    loop = new_loop(kind)

    async def setup() -> tuple[AsyncRing, InFlight]:
        aring = AsyncRing(64)
        work = InFlight(ctx, aring)
        await work.start()
        return aring, work

    with hang_guard(GUARD):
        aring, work = loop.run_until_complete(setup())
    ring_ref = weakref.ref(aring.ring)
    # The tasks left pending report "destroyed but pending" when collected: expected here.
    # (Messages only: a context holds the task, which would keep the ring alive.)
    destroyed: list[str] = []
    loop.set_exception_handler(lambda loop, context: destroyed.append(context["message"]))
    loop.close()  # without closing the ring: every request still in the kernel
    work.feed()   # the kernel completes orphans into their dropped buffers now
    time.sleep(0.005)
    ctx.check_canaries()
    if how == "close the ring afterwards":
        # No loop runs any more: close() still cancels, waits for every final CQE, and closes.
        with hang_guard(GUARD):
            aring.close()
        assert aring.closed and aring.in_flight() == 0
        work.check_streams_untouched()
    assert not any(t.done() for ts in work.tasks.values() for t in ts)  # nothing runs them now
    # Then drop everything (tasks, file, ring, loop): the garbage collector finalises the
    # ring, which waits for the kernel before freeing a buffer.
    file_fd = work.file.fileno()
    work.file = None
    work.tasks.clear()
    work.buffers = None
    del aring, work, loop
    with hang_guard(GUARD):
        # Several passes: the tasks' finalisers (which report "destroyed but pending") run in
        # the first, and the cycle they were part of is freed in a later one.
        for _ in range(4):
            gc.collect()
    assert ring_ref() is None, "the ring of a closed loop was never freed"
    assert destroyed and all("destroyed but it is pending" in m for m in destroyed), destroyed
    _assert_closed(file_fd, "the dropped AsyncFile's descriptor")


@scenario()
def aio_loop_closed_by_hand_with_requests_in_flight(ctx: Context) -> None:
    """A loop closed (loop.close(), no aclose) while an AsyncRing on it has requests of every
    kind in flight, some with dropped and sprayed buffers that the kernel then fills: canaries
    intact; the ring can still be closed synchronously with no loop (and data sent afterwards
    is intact), or, dropped with its tasks and loop, is drained and freed by the garbage
    collector; no descriptor or ring is left behind."""
    for kind in LOOP_KINDS:
        for how in ("close the ring afterwards", "drop everything"):
            _loop_closed_by_hand(ctx, kind, how)


class Ending:
    """The end of a connection, recorded: ``eof`` and ``lost`` events, and the exception."""

    events: list[str]
    lost: list[BaseException | None]

    def eof_received(self) -> bool | None:
        self.events.append("eof")
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.append(exc)


class Tracked(Ending, asyncio.Protocol):
    """Records its callbacks; writes ``greeting`` on connection, and keeps writing what it gets."""

    def __init__(self, registry: list[Tracked], greeting: bytes = b"") -> None:
        registry.append(self)
        self.greeting = greeting
        self.transport: Any = None
        self.events: list[str] = []
        self.received = bytearray()
        self.lost: list[BaseException | None] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.events.append("made")
        if self.greeting:
            self.transport.write(self.greeting)

    def data_received(self, data: bytes) -> None:
        if self.events[-1] != "data":
            self.events.append("data")
        self.received += data


async def _shared_ring_left_busy(kind: str, ctx: Context, state: dict[str, Any]) -> None:
    """The main coroutine of asyncio.run/uvloop.run: starts everything, then returns."""
    aring = aio.get_ring()
    state["ring"] = aring
    work = InFlight(ctx, aring)
    state["work"] = work
    await work.start()
    served: list[Tracked] = []
    clients: list[Tracked] = []
    state["protocols"] = (served, clients)
    server = await aio.create_server(lambda: Tracked(served), HOST, 0)
    state["server"] = server
    state["listeners"] = server.sockets
    port = server.sockets[0].getsockname()[1]
    for i in range(3):
        # Each client writes 1 MB at once, which the server never reads: sends stay in flight.
        await aio.create_connection(lambda i=i: Tracked(clients, pattern(i, 1 << 20)), HOST, port)
    await until(lambda: len(served) == 3 and all(p.transport for p in served), "connections")
    work.feed()
    await asyncio.sleep(0.005)
    ctx.check_canaries()
    # Return with all of it in flight: asyncio.run cancels the tasks, then shutdown_asyncgens()
    # closes the shared ring while the loop still runs.


@scenario()
def aio_shared_ring_closed_with_its_loop_mid_flight(ctx: Context) -> None:
    """asyncio.run / uvloop.run returning while the loop's shared ring (get_ring()) has tasks
    awaiting every kind of request, requests with dropped and sprayed buffers being completed,
    a server and three connections each with a 1 MB send in flight: the run ends, the shared
    ring is closed with nothing in flight, every task ended, every protocol saw connection_made
    then connection_lost exactly once, canaries are intact, data sent afterwards is whole, and
    the next run gets a new ring."""
    for kind in LOOP_KINDS:
        state: dict[str, Any] = {}
        run_on(kind, _shared_ring_left_busy, kind, ctx, state)
        aring, work = state["ring"], state["work"]
        assert aring.closed and aring.in_flight() == 0
        assert all(t.done() for ts in work.tasks.values() for t in ts)
        work.check_outcomes()
        work.check_streams_untouched()
        served, clients = state["protocols"]
        for p in served + clients:
            assert p.events[0] == "made" and p.events[-1] == "lost" and len(p.lost) == 1, p.events
            assert p.transport.is_closing()
        assert not state["server"].is_serving()
        assert all(s.fileno() == -1 for s in state["listeners"]), "a listener was left open"
        file_fd = work.file.fileno()
        work.file = None  # its ring is gone with the loop: dropped, it closes its descriptor
        del work, state
        for _ in range(3):
            gc.collect()
        _assert_closed(file_fd, "the dropped AsyncFile's descriptor")

        async def fresh(old: AsyncRing = aring) -> None:
            assert aio.get_ring() is not old and await aio.get_ring().nop() == 0

        run_on(kind, fresh)


# -- exceptions inside completion callbacks -------------------------------------------------------

class Boom(Exception):
    """What the misbehaving callbacks raise."""


class Raising(Tracked):
    """Raises Boom from the callback named ``where`` (after recording it)."""

    def __init__(self, registry: list[Tracked], where: str) -> None:
        super().__init__(registry)
        self.where = where

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.where == "connection_made":
            raise Boom(self.where)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.where == "data_received":
            raise Boom(self.where)

    def eof_received(self) -> bool | None:
        super().eof_received()
        if self.where == "eof_received":
            raise Boom(self.where)
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        if self.where == "connection_lost":
            raise Boom(self.where)


class BadBuffers(Ending, asyncio.BufferedProtocol):
    """A BufferedProtocol whose get_buffer() raises, or returns an empty, read-only, non-buffer
    or one-byte buffer (``how``)."""

    def __init__(self, registry: list[Any], how: str) -> None:
        registry.append(self)
        self.how = how
        self.events: list[str] = []
        self.lost: list[BaseException | None] = []
        self.received = bytearray()
        self.buf = bytearray(64)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.events.append("made")

    def get_buffer(self, sizehint: int) -> Any:
        if self.how == "raises":
            raise Boom("get_buffer")
        if self.how == "empty":
            return bytearray()
        if self.how == "read-only":
            return b"\0" * 64
        if self.how == "not a buffer":
            return None
        return memoryview(self.buf)[:1]  # "one byte": legal, the data comes a byte at a time

    def buffer_updated(self, nbytes: int) -> None:
        self.received += self.buf[:nbytes]


async def _callbacks_raising(kind: str) -> None:
    reported = capture_loop_errors()
    loop = asyncio.get_running_loop()
    async with checked_ring(64) as aring:
        # A done-callback of a task awaiting an AsyncRing receive raises: asyncio reports it,
        # and the ring goes on serving the other receives on the same descriptor.
        a, b = socket.socketpair()
        try:
            bufs = [bytearray(4) for _ in range(4)]
            tasks = [asyncio.ensure_future(aring.recv(b.fileno(), buf)) for buf in bufs]
            def raise_boom(task: asyncio.Task[Any]) -> None:
                raise Boom("done callback")

            for task in tasks[::2]:
                task.add_done_callback(raise_boom)
            await until(lambda: aring.in_flight() == 4, "receives in flight")
            a.sendall(b"0123456789abcdef")
            counts = await bounded(asyncio.gather(*tasks))
            assert sorted(bytes(buf[:n]) for buf, n in zip(bufs, counts, strict=True)) == \
                [b"0123", b"4567", b"89ab", b"cdef"]
            await until(lambda: len(reported) == 2, "done-callback errors reported")
            assert all(isinstance(c.get("exception"), Boom) for c in reported)
            reported.clear()
        finally:
            a.close()
            b.close()

        echo: list[Tracked] = []
        echo_server = await aio.create_server(lambda: Tracked(echo), HOST, 0, ring=aring)
        cases: list[tuple[str, Callable[[list[Any]], Any], bool]] = [
            # (what, protocol factory, reported to the loop's exception handler)
            ("connection_made", lambda reg: Raising(reg, "connection_made"), True),
            ("data_received", lambda reg: Raising(reg, "data_received"), True),
            ("eof_received", lambda reg: Raising(reg, "eof_received"), True),
            ("connection_lost", lambda reg: Raising(reg, "connection_lost"), True),
            ("get_buffer raises", lambda reg: BadBuffers(reg, "raises"), True),
            ("get_buffer empty", lambda reg: BadBuffers(reg, "empty"), True),
            ("get_buffer read-only", lambda reg: BadBuffers(reg, "read-only"), True),
            ("get_buffer not a buffer", lambda reg: BadBuffers(reg, "not a buffer"), True),
            ("get_buffer one byte", lambda reg: BadBuffers(reg, "one byte"), False),
        ]
        for what, factory, reports in cases:
            registry: list[Any] = []
            server = await aio.create_server(lambda f=factory, r=registry: f(r), HOST, 0, ring=aring)
            port = server.sockets[0].getsockname()[1]
            client = socket.create_connection((HOST, port), timeout=LIMIT)
            client.setblocking(False)
            try:
                await until(lambda r=registry: bool(r) and bool(r[0].events), f"{what}: made")
                protocol = registry[0]
                payload = pattern(len(what), 3000)
                try:
                    await bounded(loop.sock_sendall(client, payload))
                    client.shutdown(socket.SHUT_WR)
                except OSError:
                    assert what == "connection_made"  # the server end is gone already
                await until(lambda p=protocol: p.events[-1] == "lost", f"{what}: connection_lost")
                assert protocol.events.count("lost") == 1, f"{what}: {protocol.events}"
                # The peer sees the connection end (an error closes the server end now).
                while True:
                    try:
                        if not await bounded(loop.sock_recv(client, 65536)):
                            break
                    except ConnectionError:
                        break
                if reports:
                    await until(lambda: bool(reported), f"{what}: nothing reported to the loop")
                    assert len(reported) == 1, f"{what}: {reported}"
                    error = reported[0].get("exception")
                    assert isinstance(error, (Boom, TypeError, RuntimeError, ValueError)), reported
                    if what in ("data_received", "eof_received", "get_buffer raises"):
                        assert isinstance(protocol.lost[0], Boom), protocol.lost  # as asyncio
                else:
                    assert reported == [] and protocol.received == payload
                    assert protocol.lost == [None]
                reported.clear()
            finally:
                client.close()
            server.close()
            await bounded(server.wait_closed())
            # The loop and the ring go on: an echo round on another server of the same ring.
            echo_client = await bounded(loop.create_connection(
                lambda: Tracked([]), HOST, echo_server.sockets[0].getsockname()[1]))
            await until(lambda: len(echo) > 0 and echo[-1].transport is not None, "echo conn")
            echo_client[0].write(b"ping " + what.encode())
            await until(lambda w=what: bytes(echo[-1].received) == b"ping " + w.encode(), "echo")
            echo_client[0].close()
            echo[-1].transport.close()
        echo_server.close()
        await bounded(echo_server.wait_closed())
        await until(lambda: all(p.events[-1] == "lost" for p in echo), "echo connections ended")
    assert reported == [], reported


@scenario()
def aio_protocol_and_done_callbacks_raising(ctx: Context) -> None:
    """Completion-path code that raises: a done-callback of a task awaiting an AsyncRing recv;
    Protocol.connection_made, data_received, eof_received and connection_lost; and a
    BufferedProtocol whose get_buffer() raises or returns an empty, read-only or non-buffer
    object (and, legal, a one-byte buffer): each error reaches the loop's exception handler
    once, the connection ends with connection_lost exactly once (the exception for a failed
    data_received, as asyncio), the peer sees it end, and the loop and ring go on serving."""
    on_each_loop(_callbacks_raising)


class Interrupting(Tracked):
    """Raises KeyboardInterrupt from data_received() once ``armed[0]`` is set (then disarms)."""

    def __init__(self, registry: list[Tracked], armed: list[bool]) -> None:
        super().__init__(registry)
        self.armed = armed

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.armed[0]:
            self.armed[0] = False
            raise KeyboardInterrupt("from data_received")


def _interrupted_mid_dispatch(kind: str) -> None:
    loop = new_loop(kind)
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda loop, context: reported.append(context))
    served: list[Tracked] = []
    armed = [False]
    clients: list[socket.socket] = []
    holder: list[Any] = []

    async def setup() -> None:
        aring = AsyncRing(64)
        holder.append(aring)
        server = await aio.create_server(lambda: Interrupting(served, armed), HOST, 0, ring=aring)
        holder.append(server)
        port = server.sockets[0].getsockname()[1]
        for i in range(6):
            clients.append(socket.create_connection((HOST, port), timeout=LIMIT))
            await until(lambda i=i: len(served) > i and served[i].transport is not None, "made")

    async def burst() -> None:
        armed[0] = True
        for i, client in enumerate(clients):
            client.sendall(b"message %d" % i)  # all arrive before the loop polls the ring
        await until(lambda: all(len(p.received) == 9 for p in served), "every message")

    try:
        with hang_guard(GUARD):
            loop.run_until_complete(setup())
            task = loop.create_task(burst())
            try:
                loop.run_until_complete(task)
            except KeyboardInterrupt:
                pass
            else:
                raise AssertionError("the KeyboardInterrupt did not reach run_until_complete")
            # The loop runs again: what the interrupted dispatch had not handed on yet arrives,
            # every other connection gets its message, whole and once.
            loop.run_until_complete(bounded(task))
        victims = [p for p in served if p.lost]
        assert len(victims) == 1 and victims[0].lost == [None], [p.lost for p in served]
        assert sorted(bytes(p.received) for p in served) == sorted(b"message %d" % i for i in range(6))
        assert len(reported) == 1 and isinstance(reported[0].get("exception"), KeyboardInterrupt)
        aring, server = holder

        async def wind_up() -> None:
            server.close()
            for p in served:
                p.transport.close()
            await bounded(server.wait_closed())
            await bounded(aring.aclose())

        with hang_guard(GUARD):
            loop.run_until_complete(wind_up())
        assert all(p.events[-1] == "lost" and len(p.lost) == 1 for p in served)
    finally:
        for client in clients:
            client.close()
        if holder:
            holder[0].close()
        loop.close()


@scenario()
def aio_keyboard_interrupt_in_data_received_mid_dispatch(ctx: Context) -> None:
    """Six connections' data reaped in one poll, and the first protocol's data_received raises
    KeyboardInterrupt: it propagates out of run_until_complete (the loop stops, as for any
    callback), that connection ends with connection_lost(None), and once the loop runs again
    the other five get their messages whole, nothing lost or repeated; the ring then closes
    cleanly."""
    for kind in LOOP_KINDS:
        _interrupted_mid_dispatch(kind)


class ClosesTheRing(Tracked):
    """Closes the AsyncRing it runs on from inside data_received() (a completion callback)."""

    def __init__(self, registry: list[Tracked], aring: AsyncRing) -> None:
        super().__init__(registry)
        self.aring = aring

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.aring.close()


async def _ring_closed_from_callbacks(kind: str) -> None:
    reported = capture_loop_errors()
    loop = asyncio.get_running_loop()
    for where in ("done callback", "data_received"):
        aring = AsyncRing(64)
        try:
            a, b = socket.socketpair()
            try:
                waiting = asyncio.ensure_future(aring.recv(b.fileno(), bytearray(64)))
                served: list[Tracked] = []
                if where == "data_received":
                    server = await aio.create_server(
                        lambda r=aring, s=served: ClosesTheRing(s, r), HOST, 0, ring=aring)
                    port = server.sockets[0].getsockname()[1]
                    reader, writer = await bounded(asyncio.open_connection(HOST, port))
                    await until(lambda r=aring: r.in_flight() >= 3, "receives in flight")
                    writer.write(b"close it")
                    assert await bounded(reader.read()) == b""  # the connection ended
                    writer.close()
                    await bounded(server.wait_closed())
                    assert served[0].events == ["made", "data", "lost"]
                else:
                    await until(lambda r=aring: r.in_flight() >= 1, "receive in flight")
                    tick = asyncio.ensure_future(aring.timeout(0.001))
                    tick.add_done_callback(lambda t, r=aring: r.close())
                    await bounded(tick)
                    await until(lambda r=aring: r.closed, "closed from the done callback")
                assert aring.closed and aring.in_flight() == 0
                outcome = await bounded(asyncio.gather(waiting, return_exceptions=True))
                assert isinstance(outcome[0], saferring.OperationCancelledError), outcome
                # A few more iterations: nothing may reach the exception handler afterwards.
                for _ in range(5):
                    await asyncio.sleep(0.001)
                a.sendall(b"intact")
                b.settimeout(LIMIT)
                assert b.recv(16) == b"intact"
                assert reported == [], [(c.get("message"), c.get("exception")) for c in reported]
            finally:
                a.close()
                b.close()
        finally:
            aring.close()
    assert loop.is_running()


@scenario()
def aio_ring_closed_from_inside_completion_callbacks(ctx: Context) -> None:
    """AsyncRing.close() called from inside the completion path (a protocol's data_received())
    and from a done-callback, with another task awaiting a recv on the ring: the ring closes,
    the connection ends with connection_lost, the waiting task gets OperationCancelledError,
    data sent afterwards is intact, and nothing is reported to the loop's exception handler
    (close() is a documented call, not an error)."""
    on_each_loop(_ring_closed_from_callbacks)


# -- wrong loop, no loop, awaited twice -----------------------------------------------------------

def _drive_without_loop(aw: Awaitable[Any]) -> None:
    """Step an awaitable with no event loop running (as a foreign scheduler would); it must raise
    WrongLoopError at its first step."""
    gen = aw.__await__()
    try:
        gen.send(None)
    except saferring.WrongLoopError:
        return
    except StopIteration as stop:
        raise AssertionError(f"returned {stop.value!r} with no loop running") from None
    gen.close()
    raise AssertionError("suspended with no loop running, expected WrongLoopError")


def _wrong_loop(kind: str, ctx: Context) -> None:
    home, other = new_loop(kind), new_loop(kind)
    a, b = ctx.socketpair()
    r, w = ctx.pipe()
    lsock = listening_socket()
    ctx.sockets.append(lsock)
    holder: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f")
        with open(path, "wb") as out:
            out.write(b"some bytes\n" * 100)

        async def make() -> None:
            aring = AsyncRing(16)
            holder.append(aring)
            holder.append(await aio.open(path, "rb", ring=aring))

        try:
            with hang_guard(GUARD):
                home.run_until_complete(make())
            aring, f = holder
            buf = bytearray(16)
            attempts: dict[str, Callable[[], Awaitable[Any]]] = {
                "nop": lambda: aring.nop(),
                "recv": lambda: aring.recv(b.fileno(), buf),
                "send": lambda: aring.send(a.fileno(), b"x"),
                "read": lambda: aring.read(r, buf),
                "write": lambda: aring.write(w, b"x"),
                "accept": lambda: aring.accept(lsock.fileno()),
                "openat": lambda: aring.openat(path),
                "timeout": lambda: aring.timeout(0.001),
                "statx": lambda: aring.statx(path),
                "close_fd": lambda: aring.close_fd(10 ** 6),
                "aclose": lambda: aring.aclose(),
                "aio.open": lambda: aio.open(path, "rb", ring=aring),
                "aio.stat": lambda: aio.stat(path, ring=aring),
                "file.read": lambda: f.read(5),
                "file.readline": lambda: f.readline(),
                "file.pread": lambda: f.pread(5, 3),
                "file.seek": lambda: f.seek(0),
                "file.close": lambda: f.close(),
            }
            for what, attempt in attempts.items():
                # From another loop, running in this thread...
                try:
                    with hang_guard(GUARD):
                        other.run_until_complete(attempt())
                except saferring.WrongLoopError:
                    pass
                else:
                    raise AssertionError(f"{what} from another loop did not raise WrongLoopError")
                # ...and with no loop running at all.
                _drive_without_loop(attempt())
                assert aring.in_flight() == 0, f"{what} left a request behind"
            for what, make_it in (("accept_multishot", lambda: aring.accept_multishot(lsock.fileno())),
                                  ("recv_multishot", lambda: aring.recv_multishot(b.fileno(), None))):
                async def sync_call(fn: Callable[[], Any] = make_it) -> None:
                    fn()
                try:
                    other.run_until_complete(sync_call())
                except saferring.WrongLoopError:
                    pass
                else:
                    raise AssertionError(f"{what} from another loop did not raise WrongLoopError")
                ctx.raises(saferring.WrongLoopError, make_it)
            ctx.raises(saferring.WrongLoopError, AsyncRing)
            ctx.raises(saferring.WrongLoopError, aio.get_ring)
            assert aring.in_flight() == 0

            async def at_home() -> bytes:
                await aring.send(a.fileno(), b"home")
                n = await aring.recv(b.fileno(), buf)
                data: bytes = await f.read(11)
                await f.close()
                assert_idle(aring)
                await aring.aclose()
                return bytes(buf[:n]) + data

            with hang_guard(GUARD):
                assert home.run_until_complete(at_home()) == b"homesome bytes\n"
        finally:
            if holder:
                holder[0].close()
            home.close()
            other.close()


@scenario()
def aio_used_from_another_loop_or_none(ctx: Context) -> None:
    """Every AsyncRing coroutine, AsyncMultishot factory, file call and aio helper, used from a
    loop other than the ring's (run in the same thread) and stepped with no loop running, raises
    WrongLoopError before queuing anything; AsyncRing() and get_ring() without a loop raise it
    too; the ring and the file then still work on their own loop."""
    for kind in LOOP_KINDS:
        _wrong_loop(kind, ctx)


def _foreign_servers(kind: str, ctx: Context) -> None:
    home, other = new_loop(kind), new_loop(kind)
    holder: list[AsyncRing] = []
    lsock = listening_socket()
    ctx.sockets.append(lsock)
    port = lsock.getsockname()[1]

    async def make() -> None:
        holder.append(AsyncRing(16))

    async def noop_cb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    def unbound() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ctx.sockets.append(sock)
        sock.bind((HOST, 0))
        return sock

    problems: list[str] = []
    try:
        with hang_guard(GUARD):
            home.run_until_complete(make())
        aring = holder[0]
        attempts: dict[str, Callable[[], Awaitable[Any]]] = {
            "create_server(sock=...)": lambda: aio.create_server(
                asyncio.Protocol, sock=unbound(), ring=aring),
            "create_server(host, port)": lambda: aio.create_server(
                asyncio.Protocol, HOST, 0, ring=aring),
            "start_server": lambda: aio.start_server(noop_cb, HOST, 0, ring=aring),
            "create_connection": lambda: aio.create_connection(
                asyncio.Protocol, HOST, port, ring=aring),
            "open_connection": lambda: aio.open_connection(HOST, port, ring=aring),
        }
        for what, attempt in attempts.items():
            before = aring.in_flight()
            try:
                with hang_guard(GUARD):
                    result = other.run_until_complete(attempt())
            except saferring.WrongLoopError:
                pass
            except BaseException as exc:  # recorded: the scenario reports every case at once
                problems.append(f"{what} from another loop raised {exc!r}")
            else:
                problems.append(f"{what} from another loop returned {result!r}")
                if isinstance(result, aio.Server):
                    result.close()
            if aring.in_flight() > before:
                problems.append(f"{what} from another loop left a request queued on the ring")
            before = aring.in_flight()
            try:
                _drive_without_loop(attempt())
            except BaseException as exc:  # recorded, as above
                problems.append(f"{what} with no loop running: {exc!r}")
            if aring.in_flight() > before:
                problems.append(f"{what} with no loop running left a request queued on the ring")
        assert not problems, "\n".join(problems)
    finally:
        if holder:
            with hang_guard(GUARD):
                home.run_until_complete(holder[0].aclose())
        home.close()
        other.close()
        while lsock.fileno() >= 0:  # connections the attempts made are in its backlog
            lsock.close()


@scenario()
def aio_servers_and_connections_on_a_foreign_ring(ctx: Context) -> None:
    """create_server (with sock= or host/port), start_server, create_connection and
    open_connection given ``ring=`` an AsyncRing of another loop, or called with no loop running:
    WrongLoopError (documented for an AsyncRing used from another loop or none), with no request
    left queued on the ring and no server left listening."""
    for kind in LOOP_KINDS:
        _foreign_servers(kind, ctx)


async def _awaited_twice(kind: str, ctx: Context) -> None:
    a, b = ctx.socketpair()
    async with checked_ring(16) as aring:
        # A coroutine awaited a second time: Python refuses (nothing is queued twice).
        coro = aring.nop()
        assert await coro == 0
        with ctx.expect(RuntimeError):
            await coro
        # A task awaited twice gives the same outcome twice.
        buf = bytearray(8)
        task = asyncio.ensure_future(aring.recv(b.fileno(), buf))
        await until(lambda: aring.in_flight() == 1, "receive in flight")
        a.sendall(b"once")
        assert await bounded(task) == 4 and await task == 4 and bytes(buf[:4]) == b"once"
        # run(op) again once the operation ended returns its result again (op.result()).
        op = aring.ring.recv(b.fileno(), bytearray(8))
        a.sendall(b"op")
        assert await bounded(aring.run(op)) == 2 and await aring.run(op) == 2
        # run(op) on an operation cancelled directly: OperationCancelledError, every time.
        op = aring.ring.recv(b.fileno(), bytearray(8))
        waiting = asyncio.ensure_future(aring.run(op))
        await until(lambda: aring.in_flight() == 1, "receive in flight")
        op.cancel()
        outcome = await bounded(asyncio.gather(waiting, return_exceptions=True))
        assert isinstance(outcome[0], saferring.OperationCancelledError), outcome
        with ctx.expect(saferring.OperationCancelledError):
            await aring.run(op)
        with ctx.expect(saferring.OperationStateError):
            op.cancel()  # documented: a second cancel (or one after the end) is refused
        # Operations run() refuses: another ring's, a multishot one.
        other = ctx.ring(4)
        foreign = other.nop()
        with ctx.expect(saferring.OperationStateError):
            await aring.run(foreign)
        other.submit()
        other.wait(1)
        multi = aring.ring.timeout(5, multishot=True)
        with ctx.expect(saferring.OperationStateError):
            await aring.run(multi)
        multi.cancel()
        await settle(aring)
        a.sendall(b"still in order")
        assert await bounded(aring.recv(b.fileno(), buf)) == 8 and bytes(buf) == b"still in"


@scenario()
def aio_operation_awaited_twice(ctx: Context) -> None:
    """Awaiting the same thing twice, one after the other: a coroutine (Python's RuntimeError),
    a task (the same result), aring.run(op) after the operation ended (its result again), run()
    of an operation cancelled directly (OperationCancelledError each time, then a second
    cancel is OperationStateError), run() of another ring's or a multishot operation
    (OperationStateError); the stream stays in order."""
    on_each_loop(_awaited_twice, ctx)


async def _awaited_by_two_tasks(kind: str, ctx: Context) -> None:
    a, b = ctx.socketpair()
    lsock = listening_socket()
    ctx.sockets.append(lsock)
    problems: list[str] = []

    async def both_end(tasks: list[asyncio.Task[Any]], what: str) -> list[Any]:
        _, pending = await asyncio.wait(tasks, timeout=3.0)  # (they end at once when right)
        if pending:
            problems.append(f"{what}: {len(pending)} of {len(tasks)} tasks never ended")
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=LIMIT)
        return [t.exception() if not t.cancelled() and t.exception() else
                (None if t.cancelled() else t.result()) for t in tasks]

    async with checked_ring(16) as aring:
        # Two tasks await aring.run(op) of one receive; the data arrives.
        buf = bytearray(8)
        op = aring.ring.recv(b.fileno(), buf)
        tasks = [asyncio.ensure_future(aring.run(op)) for _ in range(2)]
        await until(lambda: aring.in_flight() == 1, "receive in flight")
        await asyncio.sleep(0.001)
        a.sendall(b"shared")
        outcomes = await both_end(tasks, "run(op) from two tasks, completed")
        for outcome in outcomes:
            if outcome is not None and outcome != 6 and \
                    not isinstance(outcome, saferring.OperationStateError):
                problems.append(f"run(op) from two tasks: {outcome!r}")
        # Two tasks await one receive; the first is cancelled: the receive goes on for the
        # second task (docs/asyncio.md), which gets the data.
        op = aring.ring.recv(b.fileno(), bytearray(8))
        tasks = [asyncio.ensure_future(aring.run(op)) for _ in range(2)]
        await until(lambda: aring.in_flight() == 1, "receive in flight")
        await asyncio.sleep(0.001)
        tasks[0].cancel()
        await asyncio.sleep(0.01)
        if not tasks[0].cancelled() or tasks[1].done() or op.done() or op.cancel_requested:
            problems.append("run(op) from two tasks, one cancelled: the other task's receive "
                            "did not go on")
        a.sendall(b"second")
        outcomes = await both_end(tasks[1:], "run(op) from two tasks, one cancelled")
        if outcomes != [6]:
            problems.append(f"run(op) from two tasks, one cancelled: the other got {outcomes!r}")
        # Both cancelled: now the receive is cancelled, and what it took is handed on.
        op = aring.ring.recv(b.fileno(), bytearray(8))
        tasks = [asyncio.ensure_future(aring.run(op)) for _ in range(2)]
        await asyncio.sleep(0.001)  # both tasks are in run(op), awaiting the receive
        for task in tasks:
            task.cancel()
        await both_end(tasks, "run(op) from two tasks, both cancelled")
        await settle(aring)
        if not op.done():
            problems.append("run(op) from two tasks, both cancelled: the receive never ended")
        # Two tasks take the next value of one AsyncMultishot; two connections arrive.
        accepts = aring.accept_multishot(lsock.fileno())
        tasks = [asyncio.ensure_future(accepts.__anext__()) for _ in range(2)]
        await asyncio.sleep(0.001)
        clients = [socket.create_connection(lsock.getsockname(), timeout=LIMIT) for _ in range(2)]
        try:
            outcomes = await both_end(tasks, "one AsyncMultishot iterated by two tasks")
            for fd in [o for o in outcomes if isinstance(o, int)] + accepts.take():
                os.close(fd)
            await bounded(accepts.aclose())
            for fd in accepts.take():
                os.close(fd)
        finally:
            for client in clients:
                client.close()
    assert not problems, "\n".join(problems)


@scenario()
def aio_operation_awaited_by_two_tasks_at_once(ctx: Context) -> None:
    """Two tasks awaiting one operation at the same time (``aring.run(op)`` twice, or one
    AsyncMultishot's ``__anext__`` from two tasks): when it completes, or when one of the tasks
    is cancelled, every task must end (with the outcome, or a refusal such as
    OperationStateError), none may be left waiting forever for a completion that already came."""
    on_each_loop(_awaited_by_two_tasks, ctx)


# -- hundreds of operations gathered, a random subset cancelled -----------------------------------

MSG = 8  # every message on the gathered streams is 8 bytes, and every receive asks for 8
CLIENTS = 28  # connections made to the listener 24 accepts wait on


async def _gathered(kind: str, ctx: Context, seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    pairs = [ctx.socketpair() for _ in range(16)]
    pipes = [ctx.pipe() for _ in range(8)]
    lsock = listening_socket(128)
    ctx.sockets.append(lsock)
    sent: dict[int, set[bytes]] = {}  # stream index -> messages sent on it
    clients: list[socket.socket] = []
    accepted: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f")
        data = pattern(seed, 64 * 1024)
        with open(path, "wb") as out:
            out.write(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            async with checked_ring(256, submit=rng.choice(("inline", "deferred"))) as aring:
                def send(stream: int) -> None:
                    # Whole 8-byte messages on every stream, and 8-byte receives: a receive
                    # (or data handed on by a cancelled one) always holds whole messages.
                    msg = b"%02d:%05d" % (stream, len(sent.setdefault(stream, set())))
                    sent[stream].add(msg)
                    if stream < len(pairs):
                        pairs[stream][0].sendall(msg)
                    else:
                        assert os.write(pipes[stream - len(pairs)][1], msg) == MSG

                async def receive(stream: int) -> bytes:
                    buf = bytearray(MSG)
                    if stream < len(pairs):
                        n = await aring.recv(pairs[stream][1].fileno(), buf)
                    else:
                        n = await aring.read(pipes[stream - len(pairs)][0], buf)
                    return bytes(buf[:n])

                async def accept() -> int:
                    conn, _ = await aring.accept(lsock.fileno())
                    return conn  # type: ignore[no-any-return]

                async def file_read(offset: int, size: int) -> tuple[int, bytes]:
                    buf = bytearray(size)
                    n = await aring.read(fd, buf, offset)
                    return offset, bytes(buf[:n])

                async def opened() -> int:
                    return await aring.openat(path)

                kinds: list[tuple[str, Callable[[], Coroutine[Any, Any, Any]]]] = []
                streams = len(pairs) + len(pipes)
                for i in range(160):
                    kinds.append(("receive", lambda s=i % streams: receive(s)))
                for _ in range(24):
                    kinds.append(("accept", accept))
                for i in range(48):
                    kinds.append(("file", lambda i=i: file_read(i * 1000, 500 + i)))
                for _ in range(16):
                    kinds.append(("open", opened))
                for _ in range(40):
                    kinds.append(("nop", aring.nop))
                for _ in range(24):
                    kinds.append(("timeout", lambda: aring.timeout(rng.random() * 0.01)))
                rng.shuffle(kinds)
                tasks = [asyncio.ensure_future(make()) for _, make in kinds]
                # Data, connections and cancellations arrive at random points of the next
                # few milliseconds, interleaved.
                # At least as many messages and clients as receives and accepts: every task
                # not cancelled gets one.
                for stream in range(streams):
                    receives = sum(1 for i in range(160) if i % streams == stream)
                    for _ in range(receives + rng.randrange(0, 4)):
                        loop.call_later(rng.random() * 0.01, send, stream)
                for _ in range(CLIENTS):
                    loop.call_later(rng.random() * 0.01, lambda: clients.append(
                        socket.create_connection(lsock.getsockname(), timeout=LIMIT)))
                cancelled_by_us = set()
                for index in rng.sample(range(len(tasks)), len(tasks) * 2 // 5):
                    cancelled_by_us.add(index)
                    when = rng.choice((0.0, 0.0, rng.random() * 0.012))
                    if when == 0.0:
                        tasks[index].cancel()  # before its first step
                    else:
                        loop.call_later(when, tasks[index].cancel)
                await asyncio.sleep(0.015)
                outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True))
                got: dict[int, list[bytes]] = {}
                for index, ((what, _), outcome) in enumerate(zip(kinds, outcomes, strict=True)):
                    if isinstance(outcome, asyncio.CancelledError):
                        assert index in cancelled_by_us, f"{what} cancelled by nobody"
                        continue
                    assert not isinstance(outcome, BaseException), f"{what}: {outcome!r}"
                    if what == "receive":
                        assert len(outcome) == MSG, f"a receive got {outcome!r}"
                        got.setdefault(int(outcome[:2]), []).append(outcome)
                    elif what == "accept":
                        accepted.append(outcome)
                    elif what == "open":
                        os.close(outcome)
                    elif what == "file":
                        offset, chunk = outcome
                        assert chunk == data[offset:offset + len(chunk)] and chunk
                    else:
                        assert outcome in (0, None), f"{what}: {outcome!r}"
                # Nothing lost: every message not received yet comes now (kept ones first),
                # every client not accepted yet is accepted now.
                for stream in range(streams):
                    mine = got.setdefault(stream, [])
                    while len(mine) < len(sent.get(stream, ())):
                        chunk = await bounded(receive(stream))
                        assert len(chunk) == MSG and int(chunk[:2]) == stream, chunk
                        mine.append(chunk)
                    # (In any order: concurrent receives on one stream complete in the
                    # kernel's order, not in the order they were queued.)
                    assert sorted(mine) == sorted(sent.get(stream, ())), (
                        f"stream {stream}: messages lost or repeated")
                await until(lambda: len(clients) == CLIENTS, "clients connected")
                while len(accepted) < len(clients):
                    conn, _ = await bounded(aring.accept(lsock.fileno()))
                    accepted.append(conn)
                conns = [socket.socket(fileno=accepted.pop()) for _ in range(len(accepted))]
                peers = {conn.getpeername() for conn in conns}
                for conn in conns:
                    conn.close()
                assert peers == {c.getsockname() for c in clients}, "connections lost"
        finally:
            os.close(fd)
            for c in clients:
                c.close()
            for number in accepted:
                os.close(number)


@scenario()
def aio_gather_hundreds_with_random_cancels(ctx: Context) -> None:
    """300+ tasks gathered on one AsyncRing (receives on 16 socket pairs and 8 pipes, accepts,
    reads at offsets of a file, opens, nops, timeouts), with data, connections and the
    cancellation of a random 40% arriving at random points over a few milliseconds: only the
    cancelled tasks end cancelled, every other returns its right result, and afterwards every
    message sent is received exactly once and every client accepted exactly once (what
    cancelled requests took is handed on); no descriptor leaks."""
    for kind in LOOP_KINDS:
        for seed in (1, 2, 3):
            run_on(kind, _gathered, kind, ctx, seed)


# -- transports torn down while their sends are in the kernel -------------------------------------

class Streamer(Tracked):
    """Writes ``payload`` (then a bytearray it changes right after writing it) on connection,
    through a small socket send buffer, so most of it waits in the ring's send request."""

    def __init__(self, registry: list[Tracked], payload: bytes) -> None:
        super().__init__(registry)
        self.payload = payload

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.transport.write(self.payload)
        mutable = bytearray(b"tail of the stream")
        self.transport.write(mutable)
        mutable[:] = b"X" * len(mutable)  # documented: write() copied what it did not send


async def _torn_down_mid_send(kind: str, ctx: Context) -> None:
    loop = asyncio.get_running_loop()
    for how in ("close", "abort", "close the ring"):
        for size in (60_000, 400_000):
            payload = pattern(size % 251, size)
            expected = payload + b"tail of the stream"
            aring = AsyncRing(64)
            try:
                served: list[Tracked] = []
                server = await aio.create_server(lambda p=payload, s=served: Streamer(s, p),
                                                 HOST, 0, ring=aring)
                peer = socket.socket()
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                peer.setblocking(False)
                try:
                    await bounded(loop.sock_connect(peer, server.sockets[0].getsockname()))
                    await until(lambda s=served: bool(s) and s[0].transport is not None, "made")
                    transport = served[0].transport
                    await until(lambda t=transport: t.get_write_buffer_size() > 0, "send queued")
                    pending = transport.get_write_buffer_size()
                    if how == "close":
                        transport.close()
                    elif how == "abort":
                        transport.abort()
                    else:
                        aring.close()
                    # Only the ring holds what is being sent now: drop the rest and reuse it.
                    del transport, served[:]
                    gc.collect()
                    ctx.spray(pending, 4)
                    received = bytearray()
                    while True:
                        try:
                            chunk = await bounded(loop.sock_recv(peer, 65536))
                        except ConnectionError:
                            break
                        if not chunk:
                            break
                        received += chunk
                    if how == "close":
                        assert received == expected, "close() did not send everything written"
                    else:
                        assert received == expected[:len(received)], (
                            f"{how}: the peer got bytes that were never written")
                finally:
                    peer.close()
                server.close()
                await bounded(server.wait_closed())
                if not aring.closed:
                    await settle(aring)
                    assert_idle(aring)
            finally:
                await aring.aclose()


@scenario()
def aio_transport_torn_down_mid_send(ctx: Context) -> None:
    """A saferring transport whose sends (60 KB and 400 KB, through a 4 KB socket buffer to a
    peer that has not read yet) are in the kernel, closed, aborted, or cut off by closing its
    ring, with every reference to the transport and protocol dropped and the freed size
    sprayed: close() delivers every byte written (including a bytearray changed right after
    write()); abort() and closing the ring deliver a prefix of it, never other bytes."""
    on_each_loop(_torn_down_mid_send, ctx)
