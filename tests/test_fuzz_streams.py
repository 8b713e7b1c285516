"""Stateful fuzzing of byte streams through a real ring: Hypothesis interleaves, at random,
peers sending into AF_UNIX stream socketpairs and a pipe, receives queued into bytearrays,
receives and multishot receives that pick buffers from a ``BufferRing``, sends from the ring,
cancels, dropped operations, dropped buffers, garbage collection, submits, bounded waits,
released and dropped ``Buffer`` handles, closing the ring (a new ring then takes over the same
sockets, and the model goes on), closing the ring's side of a socket, and end of stream.

The model, checked after every step and at the end of each run:

* every operation ends exactly once: ``wait()`` returns it finished at most once, its outcome
  (state and result) never changes once seen, and every operation still alive at the end is
  finished; ``ring.stats()`` counts exactly the live unfinished operations as in flight, and
  exactly their bytearrays and send payloads as pinned;
* a bytearray handed to the kernel is freed exactly once, never before its operation's final
  outcome, and as soon as that outcome is in and nobody else holds it (the bytearrays are a
  subclass whose ``__del__`` records the event and the final content: a weakref finaliser would
  not see the content, which the data check needs for buffers whose operation was dropped);
* no data is lost or duplicated: what the ring's receives delivered on a stream (bytes the
  kernel wrote into bytearrays, ``Buffer`` values), together with a final non-blocking drain of
  the socket, is exactly what the peer sent; what the peer reads is exactly what the ring's
  sends reported sent; descriptors the library duplicated are all closed at the end.

Stream bytes are never zero, and the bytearrays start zeroed, so the content of a bytearray
alone tells how much the kernel wrote into it, even when its operation was dropped unseen.

Ordering: io_uring does not complete concurrent receives on one socket in any promised order
(Linux 6.18 posts the CQEs of three receives armed on an empty socket in reverse submission
order, each holding the data of its submission slot; the kernel wakes the waiters newest
first).  So the check does not use completion order: the delivered chunks must tile the stream
(each lies at its own position, none overlaps, nothing is missing), with the order kept only
where the library promises it: a multishot receive's values arrive in stream order.

Data a dropped buffer-ring receive took while ``Ring.close()`` cancelled it is gone with the
operation (nobody can take its value); such a stream is checked again from its next drain on.

Run length: ``SAFERRING_FUZZ_EXAMPLES`` (default 30) and ``SAFERRING_FUZZ_STEPS`` (default 50)
set the long machine's examples and steps per example (about 15 s with the defaults on two
vCPUs), e.g. ``SAFERRING_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_streams.py`` for a soak.  The
long machine is marked slow; a short run of the same machine runs everywhere (the emulated 6.1
guest included, where the buffer-ring fallbacks differ).
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import os
import random
import socket
import time
import weakref
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import saferring
from saferring import (
    Buffer,
    BufferRing,
    BufferState,
    OperationCancelledError,
    OperationStateError,
    OpState,
)

TERMINAL = (OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED)
SOCKETS = 2  # socketpair slots; one pipe slot follows them
SLOTS = SOCKETS + 1
_NO_ZERO = bytes.maketrans(b"\0", b"\xff")
_SETTLE_SECONDS = 20.0  # bound on waiting for cancelled requests to end (a loaded machine)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{name}")}


# -- the model ---------------------------------------------------------------------------------

class Stream:
    """Bytes one side sent: ``sent`` is what the socket or pipe accepted, in order."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self.sent = bytearray()

    def fresh(self, n: int) -> bytes:
        """``n`` new stream bytes, never zero (a zeroed bytearray shows how far it was filled)."""
        return self._rng.randbytes(n).translate(_NO_ZERO)


@dataclasses.dataclass(eq=False)
class Rec:
    """What the model knows of one operation (its object may be gone: ``ref`` is weak)."""

    key: tuple[int, int]  # (ring generation, user_data)
    chan: Channel
    kind: str  # "recv" (bytearray), "recv_br" (one Buffer), "multi" (Buffers), "send"
    ref: weakref.ref[saferring.Operation[Any]]
    pinned: int  # bytes the op pins (its bytearray or payload); 0 for buffer-ring ops
    log: list[str]
    tracked: bool = False  # its bytearray is a Tracked whose end is recorded below
    outcome: OpState | None = None
    value: Any = None  # recv/send: the byte count; a failure: the errno
    chunks: list[bytes] = dataclasses.field(default_factory=list)
    frees: int = 0  # Tracked.__del__ calls
    content: bytes | None = None  # the bytearray's content when it was freed
    final_returns: int = 0  # times wait() returned it finished
    payload: bytes = b""  # send: what it was asked to send
    unseen: bool = False  # ended without the test seeing its outcome (read from its bytearray)
    bufring: BufferRing | None = None  # the buffer ring it picks from

    def finished(self) -> bool:
        op = self.ref()
        return op is None or op.done()


class Tracked(bytearray):
    """A bytearray whose end the model sees: ``__del__`` records that it ran, the content the
    kernel left, and whether its operation had ended (the kernel may write into it until then)."""

    rec: Rec

    def __del__(self) -> None:
        rec = self.rec
        rec.frees += 1
        rec.content = bytes(self)
        op = rec.ref()
        if op is not None and not op.done():
            rec.log.append(f"the bytearray of {rec.kind} {rec.key} was freed while the "
                           f"operation is {op.state.value}")


@dataclasses.dataclass(eq=False)
class Channel:
    """One stream: the ring's side (a socket, or a pipe's read end) and its peer."""

    slot: int
    kind: str  # "socket" or "pipe"
    rfd: int  # the ring's side
    sock: socket.socket | None  # owns rfd (sockets)
    peer: socket.socket | None  # the other end (sockets)
    wfd: int  # the pipe's write end (-1 once closed)
    inbound: Stream  # peer -> ring side
    outbound: Stream  # ring side -> peer (sockets)
    base: int = 0  # inbound bytes accounted for by the last check
    out_model: bytearray = dataclasses.field(default_factory=bytearray)  # what sends reported
    peer_got: bytearray = dataclasses.field(default_factory=bytearray)  # what the peer read
    peer_eof: bool = False  # the peer stopped writing
    open: bool = True  # the ring's side is open
    recs: list[Rec] = dataclasses.field(default_factory=list)  # receives since the last check
    sending: Rec | None = None  # the ring's send in flight (one at a time: stream order)
    tainted: bool = False  # data may have gone with a dropped op (see the module docstring)


def new_channel(slot: int, generation: int) -> Channel:
    seed = slot * 1_000_003 + generation
    if slot < SOCKETS:
        ring_side, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # The ring's side stays blocking: io_uring answers -EAGAIN instead of waiting for data
        # on an O_NONBLOCK file.  The peer is only used by plain calls, which must not block.
        peer.setblocking(False)
        return Channel(slot, "socket", ring_side.fileno(), ring_side, peer, -1, Stream(seed),
                       Stream(seed + 500_000))
    r, w = os.pipe()
    os.set_blocking(w, False)
    return Channel(slot, "pipe", r, None, None, w, Stream(seed), Stream(seed + 500_000))


def tiles(segment: bytes, groups: list[list[bytes]], exact: bool) -> bool:
    """True if the chunks can be laid end to end from the start of ``segment``, each group's
    chunks in their order (one group per operation), covering all of it (``exact``) or a
    prefix of it.  A depth-first search: with random stream bytes a chunk rarely fits at more
    than one place, and failed states are remembered."""
    groups = [g for g in ([c for c in group if c] for group in groups) if g]
    total = sum(len(c) for g in groups for c in g)
    if total > len(segment) or (exact and total != len(segment)):
        return False
    nxt = [0] * len(groups)

    def candidates(pos: int) -> list[int]:
        return [i for i, g in enumerate(groups)
                if nxt[i] < len(g) and segment.startswith(g[nxt[i]], pos)]

    failed: set[tuple[int, tuple[int, ...]]] = set()
    stack: list[list[Any]] = [[0, candidates(0), 0]]
    taken: list[int] = []
    while stack:
        frame = stack[-1]
        pos, cands, k = frame
        if pos == total:
            return True
        if k == len(cands):
            stack.pop()
            failed.add((pos, tuple(nxt)))
            if taken:
                nxt[taken.pop()] -= 1
            continue
        frame[2] = k + 1
        i = cands[k]
        end = pos + len(groups[i][nxt[i]])
        nxt[i] += 1
        if (end, tuple(nxt)) in failed:
            nxt[i] -= 1
            continue
        taken.append(i)
        stack.append([end, candidates(end), 0])
    return False


# -- the machine -------------------------------------------------------------------------------

ENTRIES = st.sampled_from([4, 8, 32])
BR_COUNT = st.sampled_from([1, 2, 8])
BR_SIZE = st.sampled_from([64, 512, 4096])
BR_MODE = st.sampled_from(["auto", "provide"])
INDEX = st.integers(0, 1000)
SLOT = st.integers(0, SLOTS - 1)
SEND_AFTER = st.integers(0, 3000)


class StreamFuzz(RuleBasedStateMachine):
    """Random interleavings of stream I/O, cancellation, dropping and ring turnover."""

    def __init__(self) -> None:
        super().__init__()
        gc.collect()
        self.fds_before = _open_fds()
        self.log: list[str] = []
        self.gen = 0
        self.ring: saferring.Ring | None = None
        self.bufring: BufferRing | None = None
        self.channels = [new_channel(slot, 0) for slot in range(SLOTS)]
        self.retired = 0
        self.recs: dict[tuple[int, int], Rec] = {}
        self.ops: dict[Rec, saferring.Operation[Any]] = {}  # operations the test holds
        self.bufs: dict[Rec, Tracked] = {}  # bytearrays the test holds
        self.held: list[Buffer] = []  # Buffer values not yet released

    # -- set-up and ring turnover ------------------------------------------------------------

    def _open_ring(self, entries: int, count: int, size: int, mode: str, incremental: bool) -> None:
        self.gen += 1
        self.ring = saferring.Ring(entries)
        self.bufring = BufferRing(self.ring, count, size, mode=mode, incremental=incremental)

    @initialize(entries=ENTRIES, count=BR_COUNT, size=BR_SIZE, mode=BR_MODE, incremental=st.booleans())
    def start(self, entries: int, count: int, size: int, mode: str, incremental: bool) -> None:
        self._open_ring(entries, count, size, mode, incremental)

    @rule(resurrect=st.booleans(), entries=ENTRIES, count=BR_COUNT, size=BR_SIZE, mode=BR_MODE,
          incremental=st.booleans())
    def close_ring_and_reopen(self, resurrect: bool, entries: int, count: int, size: int,
                              mode: str, incremental: bool) -> None:
        """Close the ring with whatever is in flight (it cancels and waits for every final
        CQE), check every operation ended, then carry on with a new ring on the same streams."""
        ring = self.ring
        assert ring is not None
        self._sweep()
        live = [(rec, op) for rec in self.recs.values() if rec.key[0] == self.gen
                and (op := rec.ref()) is not None]
        # With resurrect, the test holds every live operation across close() and reads what
        # they got afterwards.  Without it, an operation the test dropped dies in close(), and
        # a Buffer value it got while being cancelled there goes with it (see the docstring).
        kept = [op for _rec, op in live] if resurrect else []
        unseen = [rec for rec, op in live if not op.done() and rec not in self.ops]
        del live
        ring.close(timeout=_SETTLE_SECONDS)
        assert ring.closed and ring.stats().in_flight == 0
        self._after_close()
        del kept
        for rec in unseen:
            if rec.outcome is None and rec.kind in ("recv_br", "multi"):
                rec.chan.tainted = True  # died unseen in close(): what it got went with it
        self._open_ring(entries, count, size, mode, incremental)

    def _after_close(self) -> None:
        """Every operation of the closed ring ended: read what each got."""
        for rec in self.recs.values():
            if rec.key[0] != self.gen:
                continue
            op = rec.ref()
            if op is not None:
                assert op.done(), f"{op!r} outlived ring.close() unfinished"
                self._harvest(rec, op)
            elif rec.outcome is None:
                self._resolve_unseen(rec)

    @rule(count=BR_COUNT, size=BR_SIZE, mode=BR_MODE, incremental=st.booleans())
    def replace_buffer_ring(self, count: int, size: int, mode: str, incremental: bool) -> None:
        """Close the buffer ring and use a new one: refused while a receive picks from it;
        Buffers already handed out stay valid (and are released later) either way."""
        ring, br = self.ring, self.bufring
        assert ring is not None and br is not None
        users = [rec for rec in self.recs.values() if rec.bufring is br and not rec.finished()]
        if users:
            with pytest.raises(OperationStateError):
                br.close()
            return
        br.close()
        assert br.closed
        with pytest.raises(OperationStateError):
            ring.recv_multishot(self.channels[0].rfd, br)
        self.bufring = BufferRing(ring, count, size, mode=mode, incremental=incremental)

    # -- the peers ---------------------------------------------------------------------------

    @rule(slot=SLOT, n=st.integers(1, 3000))
    def peer_sends(self, slot: int, n: int) -> None:
        chan = self.channels[slot]
        if chan.peer_eof:
            return
        data = chan.inbound.fresh(n)
        try:
            sent = chan.peer.send(data) if chan.peer is not None else os.write(chan.wfd, data)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            sent = 0  # full, or the ring's side is gone (closed and no request holds it)
        chan.inbound.sent += data[:sent]

    @rule(slot=SLOT, n=st.integers(1, 3000), timeout=st.sampled_from([0.0, 0.001]))
    def traffic(self, slot: int, n: int, timeout: float) -> None:
        """The common case, more often: the peer sends, the ring collects what completed."""
        self.peer_sends(slot, n)
        self.wait(0, timeout)

    @rule(slot=SLOT)
    def peer_ends_stream(self, slot: int) -> None:
        """End of stream: the ring's receives get 0 (or None) once the data is read."""
        chan = self.channels[slot]
        if chan.peer_eof:
            return
        chan.peer_eof = True
        if chan.peer is not None:
            chan.peer.shutdown(socket.SHUT_WR)
        else:
            os.close(chan.wfd)
            chan.wfd = -1

    @rule(slot=st.integers(0, SOCKETS - 1))
    def peer_reads(self, slot: int) -> None:
        chan = self.channels[slot]
        self._peer_read(chan)
        # A send in flight may have put its bytes in the socket before its CQE was reaped.
        inflight = chan.sending.payload if chan.sending is not None else b""
        expect = bytes(chan.out_model) + inflight
        assert bytes(chan.peer_got) == expect[:len(chan.peer_got)], \
            "the peer read bytes the ring's sends did not send, or out of order"

    def _peer_read(self, chan: Channel) -> None:
        assert chan.peer is not None
        while True:
            try:
                data = chan.peer.recv(65536)
            except BlockingIOError:
                return
            except ConnectionResetError:
                # AF_UNIX: closing a socket with unread data resets its peer.
                assert not chan.open
                return
            if not data:
                return
            chan.peer_got += data

    # -- queueing ----------------------------------------------------------------------------

    def _track(self, op: saferring.Operation[Any], chan: Channel, kind: str, pinned: int) -> Rec:
        key = (self.gen, op.user_data)
        assert key not in self.recs, f"user_data {op.user_data} reused on one ring"
        rec = Rec(key, chan, kind, weakref.ref(op), pinned, self.log)
        self.recs[key] = rec
        self.ops[rec] = op
        if kind != "send":
            chan.recs.append(rec)
        return rec

    # Each receive rule may also have the peer send right after queueing (``then`` bytes, 0 for
    # none): receives then meet data often, instead of mostly being cancelled at the checks.

    @rule(slot=SLOT, size=st.integers(1, 2048), then=SEND_AFTER)
    def queue_recv_bytearray(self, slot: int, size: int, then: int) -> None:
        chan = self.channels[slot]
        if not chan.open:
            return
        ring = self.ring
        assert ring is not None
        buf = Tracked(size)
        op = ring.recv(chan.rfd, buf) if chan.kind == "socket" else ring.read(chan.rfd, buf)
        rec = self._track(op, chan, "recv", size)
        rec.tracked = True
        buf.rec = rec
        self.bufs[rec] = buf
        self._then(chan, then)

    def _then(self, chan: Channel, n: int) -> None:
        if n:
            self.peer_sends(chan.slot, n)

    @rule(slot=SLOT, then=SEND_AFTER)
    def queue_recv_buffer_ring(self, slot: int, then: int) -> None:
        chan = self.channels[slot]
        if not chan.open:
            return
        ring, br = self.ring, self.bufring
        assert ring is not None and br is not None
        op = ring.recv(chan.rfd, br) if chan.kind == "socket" else ring.read(chan.rfd, br)
        self._track(op, chan, "recv_br", 0).bufring = br
        self._then(chan, then)

    @rule(slot=SLOT, single_shot=st.booleans(), then=SEND_AFTER)
    def queue_multishot(self, slot: int, single_shot: bool, then: int) -> None:
        chan = self.channels[slot]
        if not chan.open:
            return
        ring, br = self.ring, self.bufring
        assert ring is not None and br is not None
        if chan.kind == "socket":
            op: Any = ring.recv_multishot(chan.rfd, br, single_shot=single_shot)
        else:
            op = ring.read_multishot(chan.rfd, br, single_shot=single_shot)
        self._track(op, chan, "multi", 0).bufring = br
        self._then(chan, then)

    @rule(slot=st.integers(0, SOCKETS - 1), n=st.integers(1, 3000))
    def queue_send(self, slot: int, n: int) -> None:
        """A send from the ring's side; one at a time per socket, as two sends in flight on a
        stream socket may complete out of order once one of them has to wait."""
        chan = self.channels[slot]
        if not chan.open or chan.sending is not None:
            return
        ring = self.ring
        assert ring is not None
        data = chan.outbound.fresh(n)
        payload = Tracked(data)
        op = ring.send(chan.rfd, payload)
        rec = self._track(op, chan, "send", n)
        rec.tracked = True
        rec.payload = data
        payload.rec = rec
        chan.sending = rec
        del payload  # the ring pins it; its __del__ tells when the pin went

    # -- cancelling, dropping, collecting ----------------------------------------------------

    def _live(self) -> list[tuple[Rec, saferring.Operation[Any]]]:
        return [(rec, op) for rec in self.recs.values() if (op := rec.ref()) is not None]

    @rule(index=INDEX)
    def cancel(self, index: int) -> None:
        live = [op for rec, op in self._live() if rec.key[0] == self.gen]
        if not live:
            return
        op = live[index % len(live)]
        if op.done() or op.cancel_requested:
            with pytest.raises(OperationStateError):
                op.cancel()
            return
        op.cancel()
        assert op.cancel_requested

    @precondition(lambda self: any(rec.kind != "send" for rec in self.ops))
    @rule(index=INDEX)
    def drop_operation(self, index: int) -> None:
        """Drop the test's reference to an operation (sends excepted: the model needs each
        send's byte count to know the outbound stream)."""
        recs = [rec for rec in self.ops if rec.kind != "send"]
        del self.ops[recs[index % len(recs)]]

    @precondition(lambda self: self.bufs)
    @rule(index=INDEX)
    def drop_bytearray(self, index: int) -> None:
        recs = list(self.bufs)
        rec = recs[index % len(recs)]
        if rec.outcome is None and rec.finished() and rec.ref() is not None:
            self._harvest(rec, rec.ref())  # type: ignore[arg-type]  # read it while we can
        del self.bufs[rec]

    @precondition(lambda self: self.held)
    @rule(index=INDEX, drop=st.booleans())
    def give_back_buffer(self, index: int, drop: bool) -> None:
        """Release a received Buffer, or drop its handle (it goes back once collected)."""
        buf = self.held.pop(index % len(self.held))
        if drop:
            return
        assert buf.state is BufferState.FILLED
        buf.release()
        assert buf.state is BufferState.RELEASED
        with pytest.raises(OperationStateError):
            buf.release()

    @rule()
    def collect_garbage(self) -> None:
        gc.collect()

    # -- submitting, waiting -----------------------------------------------------------------

    @rule()
    def submit(self) -> None:
        assert self.ring is not None
        assert self.ring.submit() >= 0

    @rule(min_complete=st.sampled_from([0, 1]), timeout=st.sampled_from([0.0, 0.001, 0.01]))
    def wait(self, min_complete: int, timeout: float) -> None:
        assert self.ring is not None
        self._collect(self.ring.wait(min_complete, timeout=timeout))

    def _collect(self, done: list[saferring.Operation[Any]]) -> None:
        for op in done:
            rec = self.recs[(self.gen, op.user_data)]
            if op.done():
                rec.final_returns += 1
                assert rec.final_returns == 1, f"wait() returned finished {op!r} twice"
            else:
                assert rec.kind == "multi", f"wait() returned unfinished {op!r}"
            self._harvest(rec, op)

    def _sweep(self) -> None:
        """Read every live operation's news (the test may not hold it, but may still reach it)."""
        for rec, op in self._live():
            self._harvest(rec, op)

    # -- reading outcomes --------------------------------------------------------------------

    def _harvest(self, rec: Rec, op: saferring.Operation[Any]) -> None:
        if rec.kind == "multi":
            if op.done() and rec.outcome is None:
                rec.outcome = op.state
                if op.state is OpState.COMPLETED:
                    self._keep(rec, op.result())  # the values not yet taken
                else:
                    self._expect_error(rec, op)
            self._keep(rec, op.take())  # type: ignore[attr-defined]
            return
        if not op.done():
            return
        if rec.outcome is not None:
            assert op.state is rec.outcome, f"{op!r} changed its outcome from {rec.outcome}"
            if rec.outcome is OpState.COMPLETED and rec.kind != "recv_br":
                assert op.result() == rec.value
            return
        rec.outcome = state = op.state
        assert state in TERMINAL, op
        if rec.kind == "recv":
            n = op.result() if state is OpState.COMPLETED else 0
            if state is not OpState.COMPLETED:
                self._expect_error(rec, op)
            rec.value = n
            assert 0 <= n <= rec.pinned
            self._bytearray_data(rec, n)
        elif rec.kind == "recv_br":
            if state is OpState.COMPLETED:
                buf = op.result()
                if buf is not None:
                    assert buf.state is BufferState.FILLED and buf.nbytes > 0
                    self._keep(rec, [buf])
            else:
                self._expect_error(rec, op)
        else:  # send
            sent = op.result() if state is OpState.COMPLETED else 0
            if state is not OpState.COMPLETED:
                self._expect_error(rec, op)
            assert 0 <= sent <= len(rec.payload)
            rec.value = sent
            rec.chan.out_model += rec.payload[:sent]
            if rec.chan.sending is rec:
                rec.chan.sending = None
            self.ops.pop(rec, None)  # seen: the test need not hold it any more

    def _expect_error(self, rec: Rec, op: saferring.Operation[Any]) -> None:
        try:
            op.result()
        except OperationCancelledError:
            assert op.state is OpState.CANCELLED
        except OSError as exc:
            assert op.state is OpState.FAILED
            rec.value = exc.errno
            # No receive here may fail (blocking descriptors, open files); a send may only
            # fail once the peer is gone.
            assert rec.kind == "send" and exc.errno in (errno.EPIPE, errno.ECONNRESET), op
        else:
            raise AssertionError(f"{op!r} ended {op.state} but result() did not raise")

    def _keep(self, rec: Rec, buffers: list[Buffer]) -> None:
        for buf in buffers:
            assert buf.state is BufferState.FILLED
            data = buf.tobytes()
            assert data and len(data) == buf.nbytes
            rec.chunks.append(data)
            self.held.append(buf)

    def _bytearray_data(self, rec: Rec, n: int) -> None:
        """The bytes the kernel wrote into a receive's bytearray: its first ``n`` (the rest
        must be untouched zeros)."""
        buf = self.bufs.get(rec)
        content = bytes(buf) if buf is not None else rec.content
        if content is None:
            self.log.append(f"the bytearray of {rec.key} is still alive after the operation "
                            "ended, though only the operation held it")
            return
        assert len(content) == rec.pinned
        assert b"\0" not in content[:n], f"recv {rec.key} reported {n} bytes, wrote fewer"
        assert not any(content[n:]), f"recv {rec.key} wrote past the {n} bytes it reported"
        rec.chunks = [content[:n]]

    def _resolve_unseen(self, rec: Rec) -> None:
        """A receive into a bytearray that ended unseen (dropped, or finished inside close()):
        what its bytearray shows is what it got."""
        assert rec.ref() is None
        if rec.kind != "recv" or rec.unseen:
            return
        rec.unseen = True
        buf = self.bufs.get(rec)
        content = bytes(buf) if buf is not None else rec.content
        assert content is not None, f"the bytearray of {rec.key} outlived its operation"
        rec.value = _filled(content)
        self._bytearray_data(rec, rec.value)

    # -- stream checks -----------------------------------------------------------------------

    def _settle(self, chan: Channel) -> None:
        """Cancel what is in flight on ``chan`` and wait (bounded) until all of it ended."""
        assert self.ring is not None
        deadline = time.monotonic() + _SETTLE_SECONDS
        while True:
            pending = [(rec, op) for rec in [*chan.recs, chan.sending] if rec is not None
                       and (op := rec.ref()) is not None and not op.done()]
            if not pending:
                break
            for _rec, op in pending:
                if not op.cancel_requested:
                    op.cancel()
            del pending
            assert time.monotonic() < deadline, f"slot {chan.slot}: requests did not end"
            self._collect(self.ring.wait(1, timeout=0.05))
        self._sweep()
        for rec in chan.recs:
            if rec.outcome is None and rec.ref() is None:
                self._resolve_unseen(rec)

    def _delivered(self, chan: Channel) -> list[list[bytes]]:
        groups = []
        for rec in chan.recs:
            if rec.outcome is None:
                self._resolve_unseen(rec)
            groups.append(rec.chunks)
        return groups

    def _drain(self, chan: Channel) -> None:
        """No request left on ``chan``: read what is left, and check that the receives plus
        this read are exactly what the peer sent (and the peer got what the sends sent)."""
        self._settle(chan)
        rest = bytearray()
        if chan.sock is not None:
            while True:
                try:
                    data = chan.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if not data:
                    break
                rest += data
            self._peer_read(chan)
            assert chan.peer_got == chan.out_model, \
                f"slot {chan.slot}: the peer read {len(chan.peer_got)} bytes, the sends " \
                f"reported {len(chan.out_model)}"
        else:
            os.set_blocking(chan.rfd, False)
            try:
                while True:
                    try:
                        data = os.read(chan.rfd, 65536)
                    except BlockingIOError:
                        break
                    if not data:
                        break
                    rest += data
            finally:
                os.set_blocking(chan.rfd, True)
        stream = bytes(chan.inbound.sent)
        assert stream.endswith(rest) and len(rest) <= len(stream) - chan.base, \
            f"slot {chan.slot}: the final read is not the end of the stream"
        if not chan.tainted:
            self._check_tiling(chan, stream[chan.base:len(stream) - len(rest)], exact=True)
        self._reset(chan)

    def _check_tiling(self, chan: Channel, segment: bytes, exact: bool) -> None:
        groups = self._delivered(chan)
        if not tiles(segment, groups, exact):
            got = sum(len(c) for g in groups for c in g)
            sizes = [[len(c) for c in g] for g in groups]
            raise AssertionError(
                f"slot {chan.slot} ({chan.kind}): the receives delivered {got} bytes that do "
                f"not {'tile' if exact else 'tile a prefix of'} the {len(segment)} bytes sent "
                f"(chunk sizes per operation: {sizes})")

    def _reset(self, chan: Channel) -> None:
        chan.base = len(chan.inbound.sent)
        chan.recs = []
        chan.tainted = False

    @rule(slot=SLOT)
    def drain(self, slot: int) -> None:
        chan = self.channels[slot]
        if chan.open:
            self._drain(chan)

    @rule(slot=SLOT)
    def close_ring_side(self, slot: int) -> None:
        """Close the ring's side of a stream while requests may be in flight on it.  They were
        submitted first: the kernel resolves a descriptor number at submission, and holds the
        file from then on (requests still queued would reach whatever reuses the number)."""
        chan = self.channels[slot]
        if not chan.open:
            return
        assert self.ring is not None
        self.ring.submit()
        for rec in chan.recs:
            op = rec.ref()
            if op is not None and op.state is OpState.QUEUED:
                return  # the kernel did not take everything (a full CQ): not now
        chan.open = False
        if chan.sock is not None:
            chan.sock.close()
        else:
            os.close(chan.rfd)

    @rule(slot=SLOT)
    def retire_closed(self, slot: int) -> None:
        """A stream whose ring side was closed: once its requests ended, what they delivered
        must be the start of what was sent (the rest went with the socket); then a fresh
        stream takes the slot."""
        chan = self.channels[slot]
        if chan.open:
            return
        self._retire(chan)
        self.retired += 1
        self.channels[slot] = new_channel(slot, self.retired)

    def _retire(self, chan: Channel) -> None:
        self._settle(chan)
        if not chan.tainted:
            self._check_tiling(chan, bytes(chan.inbound.sent[chan.base:]), exact=False)
        self._reset(chan)
        self._close_channel(chan)

    def _close_channel(self, chan: Channel) -> None:
        if chan.open:
            chan.open = False
            if chan.sock is not None:
                chan.sock.close()
            else:
                os.close(chan.rfd)
        if chan.peer is not None:
            chan.peer.close()
        elif chan.wfd >= 0:
            os.close(chan.wfd)
            chan.wfd = -1

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def ring_counts_match_model(self) -> None:
        ring = self.ring
        assert ring is not None
        live = [rec for rec in self.recs.values()
                if rec.key[0] == self.gen and not rec.finished()]
        stats = ring.stats()
        assert stats.in_flight == len(live), (stats, [rec.key for rec in live])
        assert stats.pinned_bytes == sum(rec.pinned for rec in live), stats

    @invariant()
    def pins_released_once_after_the_end(self) -> None:
        assert not self.log, self.log
        for rec in self.recs.values():
            assert rec.frees <= 1
            if rec.tracked and rec not in self.bufs and rec.finished():
                # Ended, and nobody but the operation held it: its pin must be gone.
                assert rec.frees == 1, f"the bytearray of {rec.kind} {rec.key} outlived its pin"

    @invariant()
    def outcomes_are_sticky(self) -> None:
        for rec, op in self.ops.items():
            if rec.outcome is not None:
                assert op.done() and op.state is rec.outcome

    # -- the end -----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            if self.ring is not None and not self.ring.closed:
                for chan in self.channels:
                    if chan.open:
                        self._drain(chan)
                    else:
                        self._retire(chan)
                self._sweep()
                self.ring.close(timeout=_SETTLE_SECONDS)
                self._after_close()
            for buf in self.held:
                buf.release()
            self.held.clear()
            self.ops.clear()
            self.bufs.clear()
            gc.collect()
            for rec in self.recs.values():
                assert rec.finished(), f"{rec.kind} {rec.key} never ended"
                if rec.tracked:
                    assert rec.frees == 1, f"the bytearray of {rec.kind} {rec.key} was never freed"
            assert not self.log, self.log
        finally:
            if self.ring is not None and not self.ring.closed:
                self.ring.close(timeout=_SETTLE_SECONDS)
            for chan in self.channels:
                self._close_channel(chan)
        self.held.clear()
        gc.collect()
        leaked = _open_fds() - self.fds_before
        assert not leaked, f"descriptors left open: {sorted(leaked)}"


def _filled(content: bytes) -> int:
    """How many bytes the kernel wrote into a zeroed bytearray (stream bytes are never zero)."""
    zero = content.find(0)
    return len(content) if zero < 0 else zero


_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

StreamFuzz.TestCase.settings = settings(
    max_examples=_env_int("SAFERRING_FUZZ_EXAMPLES", 30),
    stateful_step_count=_env_int("SAFERRING_FUZZ_STEPS", 50),
    deadline=None, suppress_health_check=_HEALTH,
)
TestStreamFuzz = pytest.mark.slow(StreamFuzz.TestCase)


class StreamFuzzShort(StreamFuzz):
    """The same machine, a few short runs: fast enough for every run (the 6.1 guest too)."""


StreamFuzzShort.TestCase.settings = settings(
    max_examples=3 if os.environ.get("SAFERRING_KERNEL_GUEST") else 6,
    stateful_step_count=25, deadline=None, suppress_health_check=_HEALTH,
)
TestStreamFuzzShort = StreamFuzzShort.TestCase
