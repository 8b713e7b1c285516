"""Stateful fuzzing of ``saferring.aio`` streams with random task cancellation, on stock asyncio
and on uvloop: Hypothesis interleaves tasks receiving with ``AsyncRing.recv`` from AF_UNIX
socketpairs (into bytearrays, or picking from a ``BufferRing``), a TCP connection on 127.0.0.1
read through ``saferring.aio.open_connection``'s StreamReader (with a small limit, so the
transport pauses and resumes reading often) and written through its StreamWriter, peers
sending and reading with plain socket calls, task cancellations at any point, garbage
collection, short runs of the loop, and closing the ring (a new one takes over).

The promise under test (docs/asyncio.md): cancelling a task loses nothing the kernel did.  Bytes
a cancelled ``recv`` took come back from the next ``recv`` of that socket on the ring, so:

* on each socketpair, the data every successful ``recv`` returned, plus a final drain through
  the ring (which hands over what cancelled receives kept), is exactly what the peer sent:
  every byte once, none invented (checked at each drain and at the end);
* on the TCP stream, what the reads returned is, in order, the start of what the peer sent,
  and all of it at the end; what the peer reads is, in order, what the writer wrote.

The order of concurrent receives on one socket is not promised (see test_fuzz_streams), so the
socketpair check lets the chunks lie anywhere in the stream, each once; the StreamReader gives
one ordered stream.  Closing the ring drops what cancelled receives had kept (documented: the
ring's connections and kept data end with it): a socketpair with a cancelled receive since its
last drain is checked again from its next drain on, and the TCP connection ends there (what it
read must still be the start of what was sent).

Run length: ``SAFERRING_FUZZ_EXAMPLES`` (default 30) and ``SAFERRING_FUZZ_STEPS`` (default 40)
for the long machines (about 10 s per loop with the defaults), which are marked slow; a short
run of each runs everywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import test_fuzz_streams as model
from _aio import IN_KERNEL_GUEST, LOOP_KINDS, hang_guard, new_loop, run
from saferring import BufferRing, OperationCancelledError, OperationStateError, RingClosedError, aio
from saferring.aio import AsyncRing

PAIRS = 3  # two socketpairs and a pipe
HOST = "127.0.0.1"
LIMIT = 20.0  # seconds any one step may take (a loaded machine, the emulated guest)


# -- the model ---------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class RecvTask:
    """A task receiving once from a socketpair through the ring."""

    chan: Pair
    mode: str  # "bytearray" or "buffer_ring"
    size: int
    aring: AsyncRing
    bufring: BufferRing
    task: asyncio.Task[None] | None = None
    data: bytes | None = None  # what the recv returned (set by the task on success)
    seen: bool = False  # its end was recorded


@dataclasses.dataclass(eq=False)
class Pair:
    """A socketpair (the ring's side and a plain peer), or a pipe (read end on the ring)."""

    slot: int
    rfd: int  # the ring's side
    sock: socket.socket | None  # owns rfd (socketpairs)
    peer: socket.socket | None  # the peer (socketpairs)
    wfd: int  # the pipe's write end (pipes)
    inbound: model.Stream
    base: int = 0
    delivered: list[bytes] = dataclasses.field(default_factory=list)  # since the last check
    tasks: list[RecvTask] = dataclasses.field(default_factory=list)  # not yet seen ending
    cancelled: bool = False  # a receive task was cancelled since the last check
    tainted: bool = False  # the ring closed meanwhile: kept data went with it

    def send(self, data: bytes) -> int:
        if self.peer is None and self.wfd < 0:
            return 0
        try:
            return self.peer.send(data) if self.peer is not None else os.write(self.wfd, data)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.sock is not None and self.peer is not None:
            self.sock.close()
            self.peer.close()
            return
        os.close(self.rfd)
        if self.wfd >= 0:
            os.close(self.wfd)


def new_pair(slot: int, generation: int = 0) -> Pair:
    if slot < PAIRS - 1:
        a, b = socket.socketpair()
        b.setblocking(False)
        return Pair(slot, a.fileno(), a, b, -1, model.Stream(slot))
    r, w = os.pipe()
    os.set_blocking(w, False)
    return Pair(slot, r, None, None, w, model.Stream(slot + 100 * generation))


@dataclasses.dataclass(eq=False)
class Tcp:
    """A TCP connection: saferring's StreamReader/StreamWriter on the ring's side, a plain peer."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: socket.socket
    inbound: model.Stream
    outbound: model.Stream
    got: bytearray = dataclasses.field(default_factory=bytearray)  # what the reads returned
    written: bytearray = dataclasses.field(default_factory=bytearray)
    peer_got: bytearray = dataclasses.field(default_factory=bytearray)
    reading: asyncio.Task[None] | None = None
    draining: asyncio.Task[None] | None = None
    peer_eof: bool = False
    reader_eof: bool = False



ENTRIES = st.sampled_from([8, 64])
BR_COUNT = st.sampled_from([1, 4])
BR_SIZE = st.sampled_from([64, 4096])
LIMITS = st.sampled_from([16, 512, 65536])  # the StreamReader's limit: small ones pause reading
SUBMIT = st.sampled_from(["inline", "deferred"])


class AioFuzz(RuleBasedStateMachine):
    """Random interleavings of receives, cancellations and ring turnover on an event loop."""

    LOOP = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        gc.collect()
        self.fds_before = model._open_fds()
        self.loop = new_loop(self.LOOP)
        self.loop.set_exception_handler(self._loop_error)
        self.errors: list[str] = []
        self.generation = 0
        self.aring: AsyncRing | None = None
        self.bufring: BufferRing | None = None
        self.pairs = [new_pair(slot) for slot in range(PAIRS)]
        self.pipes = 0  # pipes replaced (each drain reads a pipe to its end)
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(4)
        self.listener.settimeout(LIMIT)
        self.tcp: Tcp | None = None
        self.connections = 0

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(repr(context.get("exception") or context.get("message")))

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run the loop until ``coro`` ends (bounded: a hang fails the step)."""
        with hang_guard(LIMIT + 10):
            return self.loop.run_until_complete(asyncio.wait_for(coro, LIMIT))

    # -- set-up and ring turnover ------------------------------------------------------------

    async def _open_ring(self, entries: int, count: int, size: int, limit: int,
                         submit: str) -> None:
        self.generation += 1
        self.aring = AsyncRing(entries, submit=submit)
        self.bufring = BufferRing(self.aring.ring, count, size)
        reader, writer = await aio.open_connection(HOST, self.listener.getsockname()[1],
                                                   ring=self.aring, limit=limit)
        peer, _addr = self.listener.accept()
        peer.setblocking(False)
        self.connections += 1
        seed = 1000 + self.connections
        self.tcp = Tcp(reader, writer, peer, model.Stream(seed), model.Stream(seed + 1))

    @initialize(entries=ENTRIES, count=BR_COUNT, size=BR_SIZE, limit=LIMITS, submit=SUBMIT)
    def start(self, entries: int, count: int, size: int, limit: int, submit: str) -> None:
        self._run(self._open_ring(entries, count, size, limit, submit))

    @rule(entries=ENTRIES, count=BR_COUNT, size=BR_SIZE, limit=LIMITS, submit=SUBMIT)
    def close_ring_and_reopen(self, entries: int, count: int, size: int, limit: int,
                              submit: str) -> None:
        """Close the ring under whatever runs: awaiting tasks get their operation's outcome
        (data, or OperationCancelledError); then a new ring and connection take over."""
        aring, tcp = self.aring, self.tcp
        assert aring is not None and tcp is not None
        self._run(aring.aclose())
        assert aring.closed
        stats = aring.stats()
        assert stats.in_flight == 0 and stats.pinned_bytes == 0, stats
        self._run(self._settle_tasks())
        for pair in self.pairs:
            if pair.cancelled:
                pair.tainted = True
        self._check_tcp_prefix(tcp)
        self._close_tcp(tcp)
        self._run(self._open_ring(entries, count, size, limit, submit))

    async def _settle_tasks(self) -> None:
        """Let every task whose operation ended run to its end (bounded)."""
        tasks = [t for t in self._tasks() if not t.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=LIMIT)
        self._record()

    def _tasks(self) -> list[asyncio.Task[Any]]:
        tasks = [rt.task for pair in self.pairs for rt in pair.tasks if rt.task is not None]
        if self.tcp is not None:
            tasks += [t for t in (self.tcp.reading, self.tcp.draining) if t is not None]
        return tasks

    # -- the socketpairs ---------------------------------------------------------------------

    @rule(slot=st.integers(0, PAIRS - 1), size=st.integers(1, 4096),
          mode=st.sampled_from(["bytearray", "buffer_ring"]), then=st.integers(0, 3000))
    def start_recv(self, slot: int, size: int, mode: str, then: int) -> None:
        pair = self.pairs[slot]
        if mode == "buffer_ring":
            assert self.bufring is not None
            size = self.bufring.size  # the kernel picks a buffer of the ring's size
        assert self.aring is not None
        assert self.bufring is not None
        rt = RecvTask(pair, mode, size, self.aring, self.bufring)
        pair.tasks.append(rt)

        async def start() -> None:
            rt.task = asyncio.get_running_loop().create_task(self._receive(rt))
            await asyncio.sleep(0)  # the task runs up to its first suspension

        self._run(start())
        if then:
            self.peer_sends(slot, then)

    async def _receive(self, rt: RecvTask) -> None:
        if rt.mode == "bytearray":
            buf = bytearray(rt.size)
            n = await self._recv(rt.chan, buf, aring=rt.aring)
            rt.data = bytes(buf[:n])  # no await since the recv returned: no cancellation point
            return
        got = await self._recv(rt.chan, rt.bufring, aring=rt.aring)
        if got is None:
            rt.data = b""
        else:
            rt.data = got.tobytes()
            got.release()

    def _recv(self, pair: Pair, buffer: Any, flags: int = 0,
              aring: AsyncRing | None = None) -> Coroutine[Any, Any, Any]:
        aring = aring if aring is not None else self.aring
        assert aring is not None
        # A pipe is read at the file position (offset -1): a stream, kept data included.
        return aring.recv(pair.rfd, buffer, flags) if pair.sock else aring.read(pair.rfd, buffer)

    @rule(slot=st.integers(0, PAIRS), n=st.integers(1, 3000))
    def peer_sends(self, slot: int, n: int) -> None:
        """The peer of pair ``slot`` (or of the TCP connection, slot PAIRS) sends."""
        if slot < PAIRS:
            pair = self.pairs[slot]
            data = pair.inbound.fresh(n)
            pair.inbound.sent += data[:pair.send(data)]
            return
        tcp = self.tcp
        assert tcp is not None
        if tcp.peer_eof:
            return
        data = tcp.inbound.fresh(n)
        try:
            sent = tcp.peer.send(data)
        except BlockingIOError:
            sent = 0
        tcp.inbound.sent += data[:sent]

    def _record(self) -> None:
        """Record the end of every receive task that ended, once."""
        for pair in self.pairs:
            for rt in list(pair.tasks):
                task = rt.task
                if task is None or not task.done():
                    continue
                pair.tasks.remove(rt)
                assert not rt.seen
                rt.seen = True
                if task.cancelled():
                    assert rt.data is None
                    pair.cancelled = True
                    continue
                exc = task.exception()
                if exc is None:
                    assert rt.data is not None and len(rt.data) <= rt.size
                    pair.delivered.append(rt.data)
                elif isinstance(exc, (OperationCancelledError, RingClosedError)):
                    # The ring closed under it: while it awaited its request, or while it
                    # waited for a cancelled predecessor on its descriptor to end.
                    assert rt.aring.closed and rt.data is None, exc
                elif isinstance(exc, OperationStateError) and rt.mode == "buffer_ring":
                    # Documented refusal: bytes a cancelled receive into a bytearray kept wait
                    # for a receive into a caller's buffer; a BufferRing receive may not take
                    # them, and takes nothing.
                    assert "cancelled receive" in str(exc)
                else:
                    raise AssertionError(f"a receive task failed: {exc!r}") from exc

    @rule(slot=st.integers(0, PAIRS - 1))
    def drain_pair(self, slot: int) -> None:
        self._run(self._drain(self.pairs[slot]))

    async def _drain(self, pair: Pair) -> None:
        """Cancel the pair's receive tasks, then receive through the ring until the socket is
        empty (or the pipe ends): kept data first, then what is left in the stream.  The tasks'
        data and this drain together must be exactly what the peer sent since the last check."""
        aring = self.aring
        assert aring is not None
        for rt in pair.tasks:
            if rt.task is not None:
                rt.task.cancel()
        tasks = [rt.task for rt in pair.tasks if rt.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=LIMIT)
        self._record()
        assert not pair.tasks, "receive tasks did not end after being cancelled"
        rest = bytearray()
        buf = bytearray(65536)
        deadline = time.monotonic() + LIMIT
        # A socket is read with MSG_DONTWAIT: the kernel answers EAGAIN at once when it is
        # empty.  A pipe is read to its end instead (io_uring waits for data on an empty pipe
        # even with O_NONBLOCK set: Linux 6.18 arms a poll), and a fresh pipe takes its slot.
        if pair.wfd >= 0:
            os.close(pair.wfd)
            pair.wfd = -1
        while True:
            assert time.monotonic() < deadline, "the drain did not end"
            try:
                n = await self._recv(pair, buf, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            if n == 0:
                break
            rest += buf[:n]
        stream = bytes(pair.inbound.sent)
        assert stream.endswith(rest), f"pair {pair.slot}: the drain is not the end of the stream"
        if not pair.tainted:
            segment = stream[pair.base:len(stream) - len(rest)]
            if not model.tiles(segment, [[chunk] for chunk in pair.delivered], exact=True):
                got = sum(len(c) for c in pair.delivered)
                raise AssertionError(
                    f"pair {pair.slot}: the receives returned {got} bytes (chunks "
                    f"{[len(c) for c in pair.delivered]}) and the drain {len(rest)}, which do "
                    f"not make up the {len(stream) - pair.base} bytes sent")
        pair.base = len(stream)
        pair.delivered = []
        pair.cancelled = pair.tainted = False
        if pair.sock is None:
            pair.close()
            self.pipes += 1
            self.pairs[pair.slot] = new_pair(pair.slot, self.pipes)

    # -- the TCP stream ----------------------------------------------------------------------

    @precondition(lambda self: self.tcp is not None and self.tcp.reading is None
                  and not self.tcp.reader_eof)
    @rule(n=st.integers(1, 4096), then=st.integers(0, 3000))
    def start_stream_read(self, n: int, then: int) -> None:
        tcp = self.tcp
        assert tcp is not None

        async def read() -> None:
            data = await tcp.reader.read(n)
            if not data:
                tcp.reader_eof = True
            tcp.got += data

        async def start() -> None:
            tcp.reading = asyncio.get_running_loop().create_task(read())
            await asyncio.sleep(0)

        self._run(start())
        if then:
            self.peer_sends(PAIRS, then)

    @precondition(lambda self: self.tcp is not None and not self.tcp.writer.is_closing())
    @rule(n=st.integers(1, 20000), drain=st.booleans())
    def stream_write(self, n: int, drain: bool) -> None:
        """Write from the ring's side; with ``drain``, a task awaits ``writer.drain()`` (and
        may be cancelled: the bytes stay written)."""
        tcp = self.tcp
        assert tcp is not None
        data = tcp.outbound.fresh(n)
        tcp.writer.write(data)
        tcp.written += data
        if drain and tcp.draining is None:

            async def start() -> None:
                tcp.draining = asyncio.get_running_loop().create_task(tcp.writer.drain())
                await asyncio.sleep(0)

            self._run(start())

    @rule()
    def stream_peer_reads(self) -> None:
        tcp = self.tcp
        assert tcp is not None
        self._peer_read(tcp)

    def _peer_read(self, tcp: Tcp) -> bool:
        """Read what the peer has; True at end of stream."""
        while True:
            try:
                data = tcp.peer.recv(65536)
            except BlockingIOError:
                return False
            if not data:
                return True
            tcp.peer_got += data
            assert tcp.written.startswith(tcp.peer_got), \
                "the peer read bytes the writer did not write, or out of order"

    async def _peer_read_to_end(self, tcp: Tcp) -> None:
        deadline = time.monotonic() + LIMIT
        while not self._peer_read(tcp):
            assert time.monotonic() < deadline, "the peer did not see the end of the stream"
            await asyncio.sleep(0.001)

    @rule()
    def stream_peer_ends(self) -> None:
        tcp = self.tcp
        assert tcp is not None
        if not tcp.peer_eof:
            tcp.peer_eof = True
            tcp.peer.shutdown(socket.SHUT_WR)

    def _record_tcp(self) -> None:
        tcp = self.tcp
        if tcp is None:
            return
        for name in ("reading", "draining"):
            task = getattr(tcp, name)
            if task is not None and task.done():
                setattr(tcp, name, None)
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    # Only the ring closing under them may end these tasks with an error.
                    assert isinstance(exc, (OperationCancelledError, ConnectionError)), exc

    def _check_tcp_prefix(self, tcp: Tcp) -> None:
        assert tcp.inbound.sent.startswith(tcp.got), \
            f"the StreamReader returned {len(tcp.got)} bytes that are not the start of the " \
            f"{len(tcp.inbound.sent)} the peer sent"

    def _close_tcp(self, tcp: Tcp) -> None:
        for task in (tcp.reading, tcp.draining):
            if task is not None and not task.done():
                task.cancel()
        tcp.writer.close()
        tcp.peer.close()

    # -- everything ---------------------------------------------------------------------------

    @precondition(lambda self: self._tasks())
    @rule(index=st.integers(0, 1000))
    def cancel_task(self, index: int) -> None:
        tasks = self._tasks()
        task = tasks[index % len(tasks)]
        task.cancel()

    @rule(seconds=st.sampled_from([0.0, 0.001, 0.005]))
    def tick(self, seconds: float) -> None:
        """Let the loop run a little: completions are collected, tasks resume."""
        self._run(asyncio.sleep(seconds))
        self._record()
        self._record_tcp()

    @rule()
    def collect_garbage(self) -> None:
        gc.collect()

    @invariant()
    def stream_reads_are_the_start_of_the_stream(self) -> None:
        assert not self.errors, self.errors
        self._record()
        self._record_tcp()
        if self.tcp is not None:
            self._check_tcp_prefix(self.tcp)

    # -- the end -----------------------------------------------------------------------------

    async def _finish(self) -> None:
        for pair in self.pairs:
            await self._drain(pair)
        tcp = self.tcp
        aring = self.aring
        assert tcp is not None and aring is not None
        for task in (tcp.reading, tcp.draining):
            if task is not None:
                task.cancel()
                await asyncio.wait([task], timeout=LIMIT)
        self._record_tcp()
        # Everything the peer sent reaches the reader; everything written reaches the peer.
        if not tcp.peer_eof:
            tcp.peer_eof = True
            tcp.peer.shutdown(socket.SHUT_WR)
        tcp.got += await tcp.reader.read()  # until end of stream
        assert tcp.got == tcp.inbound.sent, \
            f"the StreamReader returned {len(tcp.got)} bytes, the peer sent {len(tcp.inbound.sent)}"
        # The peer reads while the writer closes: what is still buffered may not fit the
        # socket buffers, and the close completes only once it was all sent.
        peer = asyncio.get_running_loop().create_task(self._peer_read_to_end(tcp))
        tcp.writer.close()
        await tcp.writer.wait_closed()
        await peer
        assert tcp.peer_got == tcp.written, \
            f"the peer read {len(tcp.peer_got)} bytes, the writer wrote {len(tcp.written)}"
        await aring.aclose()
        stats = aring.stats()
        assert stats.in_flight == 0 and stats.pinned_bytes == 0, stats

    def teardown(self) -> None:
        try:
            if self.aring is not None and not self.aring.closed:
                self._run(self._finish())
            assert not self.errors, self.errors
        finally:
            try:
                if self.aring is not None and not self.aring.closed:
                    self.aring.close()
                if self.tcp is not None:
                    self._close_tcp(self.tcp)
                pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.wait(pending, timeout=LIMIT))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()
                for pair in self.pairs:
                    pair.close()
                self.listener.close()
        gc.collect()
        leaked = model._open_fds() - self.fds_before
        assert not leaked, f"descriptors left open: {sorted(leaked)}"


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_cancel_of_starved_recv_hands_over(kind: str) -> None:
    """The minimal case the machine found: a receive from a one-buffer BufferRing waits for
    its buffer (held by the caller), its task is cancelled, and the next receive on the same
    socket must then run (it waits for the cancelled one to end first, and that has ended)."""

    async def scenario() -> bytes:
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        aring = AsyncRing(8)
        try:
            br = BufferRing(aring.ring, 1, 64)
            d.send(b"x")
            held = await aring.recv(c.fileno(), br)  # the only buffer, held
            task = asyncio.get_running_loop().create_task(aring.recv(a.fileno(), br))
            for _ in range(10):  # let it reach the kernel, get -ENOBUFS and wait for a buffer
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            b.send(b"hello")
            buf = bytearray(16)
            try:
                n = await asyncio.wait_for(aring.recv(a.fileno(), buf), 3.0)  # a hang: fail
            finally:
                held.release()
            return bytes(buf[:n])
        finally:
            await aring.aclose()
            for s in (a, b, c, d):
                s.close()

    with hang_guard(LIMIT + 10):
        assert run(kind, scenario) == b"hello"


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_LONG = settings(max_examples=model._env_int("SAFERRING_FUZZ_EXAMPLES", 30),
                 stateful_step_count=model._env_int("SAFERRING_FUZZ_STEPS", 40),
                 deadline=None, suppress_health_check=_HEALTH)
_SHORT = settings(max_examples=2 if IN_KERNEL_GUEST else 4, stateful_step_count=20,
                  deadline=None, suppress_health_check=_HEALTH)


def _machines() -> dict[str, Any]:
    """One long (slow) and one short test per loop kind."""
    tests: dict[str, Any] = {}
    for kind in LOOP_KINDS:
        for length, cfg in (("", _LONG), ("Short", _SHORT)):
            machine = type(f"AioFuzz{kind.title()}{length}", (AioFuzz,), {"LOOP": kind})
            case = machine.TestCase
            case.settings = cfg
            tests[f"TestAioFuzz{kind.title()}{length}"] = pytest.mark.slow(case) if not length else case
    return tests


globals().update(_machines())
