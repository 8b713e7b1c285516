"""Torture scenarios: rings closed, dropped or abandoned at exit with hundreds of operations in
flight, and descriptors (plain and registered) closed, replaced or reused under requests that
are still using them.

What must hold, whatever the scenario did: every operation ends exactly once with its documented
outcome (``CANCELLED`` after ``close()``, or ``COMPLETED``/``FAILED`` if it finished first), the
data the kernel moved is where it should be (in the pinned buffer, in the file the request
started on) and nowhere else, and memory the caller let go of is never written (canaries).
"""

from __future__ import annotations

import collections
import errno
import gc
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from harness import Context, byte_pattern, collect_until, scenario

import saferring
from saferring import OpState
from saferring.ring import _graveyard

from _helpers import fill_peer_window

FINAL = {OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED}


class _Buf(bytearray):
    """A bytearray that can be weakly referenced: shows when the library lets go of it."""


def _drain_fd(fd: int) -> bytes:
    """Everything readable from ``fd`` right now, without blocking."""
    was_blocking = os.get_blocking(fd)
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.set_blocking(fd, was_blocking)
    return b"".join(chunks)


def _drain_sock(sock: socket.socket) -> bytes:
    """Everything the socket has queued right now, without blocking."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _drain_while_pending(ring: saferring.Ring, ops: list[Any], drain: Callable[[], bytes]) -> bytes:
    """What ``drain()`` reads while any of ``ops`` is unfinished (reaping in between, 10 s at
    most), and once more after: the peer side of writes or sends that need room to finish."""
    got = bytearray()
    deadline = time.monotonic() + 10
    while not all(op.done() for op in ops) and time.monotonic() < deadline:
        got += drain()
        ring.wait(0, timeout=0.01)
    return bytes(got + drain())


def _fill_pipe(w: int) -> int:
    """Fill the pipe behind ``w`` to the brim (so a write on it blocks); return the bytes put in.
    The descriptor is left blocking: io_uring then waits for room instead of failing EAGAIN."""
    os.set_blocking(w, False)
    total = 0
    try:
        while True:
            try:
                total += os.write(w, b"\0" * 4096)
            except BlockingIOError:
                break
    finally:
        os.set_blocking(w, True)
    return total


def _check_outcomes(ops: Iterable[saferring.Operation[Any]],
                    allowed: set[OpState] | None = None) -> collections.Counter[OpState]:
    """Every operation has ended, in one of ``allowed`` (default: any terminal state), and
    ``result()`` agrees with the state (a cancelled one raises OperationCancelledError)."""
    allowed = FINAL if allowed is None else allowed
    states: collections.Counter[OpState] = collections.Counter()
    for op in ops:
        state = op.state
        assert op.done() and state in allowed, f"{op!r} ended {state}, expected one of {allowed}"
        states[state] += 1
        if state is OpState.CANCELLED:
            try:
                op.result()
            except saferring.OperationCancelledError:
                pass
            else:
                raise AssertionError(f"{op!r} is CANCELLED but result() did not raise")
        elif state is OpState.FAILED:
            try:
                op.result()
            except saferring.OperationCancelledError as exc:
                raise AssertionError(f"{op!r} is FAILED but raised a cancellation") from exc
            except OSError:
                pass
            else:
                raise AssertionError(f"{op!r} is FAILED but result() did not raise")
    return states


def _closed_ring_refuses(ctx: Context, ring: saferring.Ring, op: saferring.Operation[Any],
                         fd: int) -> None:
    """After close(): every call raises RingClosedError, close() again is a quiet no-op, and
    what needs no ring (stats, features, a finished operation's state) still reads."""
    assert ring.closed
    ring.close()
    ring.close(timeout=0)
    ctx.raises(saferring.RingClosedError, ring.nop)
    ctx.raises(saferring.RingClosedError, ring.read, fd, bytearray(8))
    ctx.raises(saferring.RingClosedError, ring.write, fd, b"x")
    ctx.raises(saferring.RingClosedError, ring.timeout, 1.0)
    ctx.raises(saferring.RingClosedError, ring.submit)
    ctx.raises(saferring.RingClosedError, ring.wait, 0)
    ctx.raises(saferring.RingClosedError, ring.run, op)
    ctx.raises(saferring.RingClosedError, op.cancel)
    ctx.raises(saferring.RingClosedError, ring.chain().__enter__)
    ctx.raises(saferring.RingClosedError, saferring.BufferRing, ring, 2, 64)
    stats = ring.stats()
    assert stats.in_flight == 0 and stats.pinned_bytes == 0, stats
    assert op.state in FINAL
    assert ring.features.supports("NOP")


def _tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client, server side); ``rcvbuf`` shrinks the server's
    receive buffer (set before the handshake, so the advertised window is small)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        if rcvbuf is not None:
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client = socket.create_connection(lst.getsockname(), timeout=5)
        server, _ = lst.accept()
    server.settimeout(5)
    return client, server


class _Reader:
    """A thread that reads ``sock`` until it is told to stop and the socket runs dry (the peer
    of zero-copy sends: over loopback their notifications come once the data was taken)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = bytearray()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.02)
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                if self.stop.is_set():
                    return
                continue
            except OSError:
                return
            if not chunk:
                return
            self.data += chunk

    def finish(self) -> bytes:
        self.stop.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the reader thread did not stop"
        return bytes(self.data)


# -- close() with hundreds of operations in flight, one kind at a time ---------------------------


@scenario()
def close_with_pipe_reads_in_flight(ctx: Context) -> None:
    """300 reads (and readvs) on 20 pipes; every other buffer is dropped and its size sprayed.
    Some pipes are fed and their reads reaped, then close().  Must hold: the reaped reads are
    COMPLETED with the written bytes in their (kept) buffers, every other read is CANCELLED,
    the dropped buffers are freed only by close(), and bytes written afterwards reach nothing
    (no canary changes)."""
    ring = ctx.ring(32)  # far fewer SQ entries than operations: the SQ is flushed as it fills
    pipes = [ctx.pipe() for _ in range(20)]
    ops: list[saferring.Operation[Any]] = []
    kept: dict[int, bytearray] = {}
    dropped: list[weakref.ref[_Buf]] = []
    for i in range(300):
        r, _ = pipes[i % 20]
        buf = _Buf(512)
        op = ring.readv(r, [buf]) if i % 7 == 0 else ring.read(r, buf)
        ops.append(op)
        if i % 2:
            dropped.append(weakref.ref(buf))
        else:
            kept[op.user_data] = buf
        del buf
    ring.submit()
    gc.collect()
    ctx.spray(512, 600)
    assert all(ref() is not None for ref in dropped), "an in-flight read's buffer was freed"
    # Pipes 0-4 get three reads' worth each (one atomic write, each read takes at most 512).
    for k in range(5):
        os.write(pipes[k][1], byte_pattern(k, 3 * 512))
    fed_ops = [op for i, op in enumerate(ops) if i % 20 < 5]
    collect_until(ring, lambda: sum(op.done() for op in fed_ops) >= 15)
    ring.close()
    states = _check_outcomes(ops, {OpState.COMPLETED, OpState.CANCELLED})
    assert states[OpState.COMPLETED] == 15, states
    for i, op in enumerate(ops):
        if op.state is OpState.COMPLETED:
            assert i % 20 < 5 and op.result() == 512, (i, op)
            if op.user_data in kept:
                assert kept[op.user_data] == byte_pattern(i % 20, 512)
    gc.collect()
    assert all(ref() is None for ref in dropped), "close() left a dropped buffer pinned"
    ctx.spray(512, 600)  # memory close() let go of: written only if a read outlived close()
    for _, w in pipes:
        os.write(w, b"\xee" * 2048)  # nobody reads these any more
    ctx.check_canaries()
    assert not any(b"\xee" in buf for buf in kept.values()), "a cancelled read got data"
    _closed_ring_refuses(ctx, ring, ops[0], pipes[0][0])


@scenario()
def close_with_socket_recvs_in_flight(ctx: Context) -> None:
    """200 recvs and 40 recvmsgs on 8 socketpairs (buffers dropped and sprayed); 4 sockets get
    data that is reaped, then close().  Must hold: no byte is lost or duplicated (what the
    completed receives report plus what is left in each socket is exactly what was sent),
    every receive ends COMPLETED or CANCELLED, and nothing sent after close() lands anywhere."""
    ring = ctx.ring(64)
    pairs = [ctx.socketpair() for _ in range(8)]
    ops: list[tuple[int, saferring.Operation[Any]]] = []
    for i in range(240):
        k = i % 8
        if i % 6 == 5:
            ops.append((k, ring.recvmsg(pairs[k][1], [_Buf(128), _Buf(128)])))
        else:
            ops.append((k, ring.recv(pairs[k][1], _Buf(256))))
    ring.submit()
    gc.collect()
    ctx.spray(256, 400)
    ctx.spray(128, 400)
    sent = {k: byte_pattern(k, 1000) for k in range(4)}
    for k, data in sent.items():
        pairs[k][0].sendall(data)

    def got(k: int) -> int:
        total = 0
        for kk, op in ops:
            if kk == k and op.state is OpState.COMPLETED:
                res = op.result()
                total += res if isinstance(res, int) else res.nbytes
        return total

    collect_until(ring, lambda: all(got(k) == 1000 for k in sent))
    ring.close()
    _check_outcomes([op for _, op in ops], {OpState.COMPLETED, OpState.CANCELLED})
    for k in range(8):
        left = _drain_sock(pairs[k][1])
        assert got(k) + len(left) == (1000 if k in sent else 0), (k, got(k), len(left))
    gc.collect()
    ctx.spray(256, 400)  # memory close() let go of: written only if a receive outlived close()
    for a, _ in pairs:
        a.sendall(b"\xee" * 512)
    ctx.check_canaries()
    _closed_ring_refuses(ctx, ring, ops[0][1], pairs[0][1].fileno())


@scenario()
def close_with_long_timeouts_in_flight(ctx: Context) -> None:
    """300 timeouts of an hour (relative, absolute on each clock, with a completion count), a
    few short ones that fire first, and timeout_remove/timeout_update requests still queued at
    close().  Must hold: the fired ones are COMPLETED (result None), every long one is
    CANCELLED, the queued requests end (any terminal state: they race the cancels), and no
    timespec outlives its timeout (nothing pinned)."""
    ring = ctx.ring(16)
    long_ops: list[saferring.Operation[Any]] = []
    now_mono, now_real = time.monotonic(), time.time()
    for i in range(300):
        kind = i % 5
        if kind == 0:
            long_ops.append(ring.timeout(3600))
        elif kind == 1:
            long_ops.append(ring.timeout(now_mono + 3600, absolute=True))
        elif kind == 2:
            long_ops.append(ring.timeout(now_real + 3600, absolute=True, clock="realtime"))
        elif kind == 3:
            long_ops.append(ring.timeout(3600, clock="boottime"))
        else:
            long_ops.append(ring.timeout(3600, count=1_000_000))
    short = [ring.timeout(0.001) for _ in range(10)]
    collect_until(ring, lambda: all(op.done() for op in short))
    assert [op.result() for op in short] == [None] * 10
    # Requests aimed at live timeouts, queued but not submitted when close() starts.
    requests = [ring.timeout_remove(long_ops[0]), ring.timeout_update(long_ops[1], 7200)]
    assert ring.stats().pinned_bytes > 0
    ring.close()
    _check_outcomes(long_ops[2:], {OpState.CANCELLED})
    _check_outcomes(long_ops[:2], {OpState.CANCELLED, OpState.COMPLETED})
    _check_outcomes(requests)
    _closed_ring_refuses(ctx, ring, long_ops[5], 0)


@scenario()
def close_with_multishot_ops_in_flight(ctx: Context) -> None:
    """Multishot receives on a BufferRing (16 sockets), multishot polls (16 pipes), multishot
    accepts on two 127.0.0.1 listeners and multishot timeouts, each having produced values, some
    operations dropped with values untaken; then close().  Must hold: every multishot operation
    ends CANCELLED (a counted timeout that finished: COMPLETED); values taken before stay valid
    (held buffers FILLED with the sent bytes, releasable after close); the bytes received plus
    those left in the sockets are exactly what was sent; every connection is either accepted
    once or still in the backlog; accepted descriptors nobody took are closed (no fd leaks)."""
    ring = ctx.ring(64)
    group = saferring.BufferRing(ring, 64, 256)
    pairs = [ctx.socketpair() for _ in range(16)]
    recvs = [ring.recv_multishot(b, group) for _, b in pairs]
    pipes = [ctx.pipe() for _ in range(16)]
    polls = [ring.poll_add(r, 1, multishot=True) for r, _ in pipes]
    listeners = []
    for _ in range(2):
        lst = socket.socket()
        ctx.sockets.append(lst)
        lst.bind(("127.0.0.1", 0))
        lst.listen(64)
        listeners.append(lst)
    accepts = [ring.accept(lst, multishot=True) for lst in listeners]
    ticks = [ring.timeout(0.002, multishot=True) for _ in range(4)]
    counted = ring.timeout(0.001, count=3, multishot=True)
    forever = [ring.timeout(3600, multishot=True) for _ in range(20)]
    ring.submit()
    for k, (a, _) in enumerate(pairs[:8]):
        a.sendall(byte_pattern(k, 300))  # two chunks each at most: 256 + 44, or one of 300 split
    for _, w in pipes[:8]:
        os.write(w, b"p")
    clients = []
    for i in range(12):
        c = socket.create_connection(listeners[i % 2].getsockname(), timeout=5)
        ctx.sockets.append(c)
        clients.append(c)
    held: dict[int, list[saferring.Buffer]] = collections.defaultdict(list)

    def received(k: int) -> int:
        return sum(b.nbytes for b in held[k])

    def progressed() -> bool:
        for k in range(8):
            held[k] += recvs[k].take()
        return (all(received(k) == 300 for k in range(8)) and all(p.pending() for p in polls[:8])
                and sum(a.pending() for a in accepts) >= 6 and counted.done())

    collect_until(ring, progressed)
    for k in range(8):
        assert b"".join(b.tobytes() for b in held[k]) == byte_pattern(k, 300)
    accepted: list[int] = accepts[0].take()  # accepts[1]'s stay untaken: closed when collected
    del recvs[12:]  # dropped with nothing taken
    for k in range(8, 12):
        pairs[k][0].sendall(b"late")  # may or may not be received before the cancel
    ring.close()
    _check_outcomes(recvs + polls + accepts + forever, {OpState.CANCELLED})
    # A repeating timeout whose period ends as the cancel arrives may end normally instead.
    _check_outcomes(ticks, {OpState.CANCELLED, OpState.COMPLETED})
    _check_outcomes([counted], {OpState.COMPLETED})
    assert counted.result() == [None, None, None]
    for k in range(8):
        assert all(b.state is saferring.BufferState.FILLED for b in held[k])
        assert b"".join(b.tobytes() for b in held[k]) == byte_pattern(k, 300)
        for b in held[k]:
            b.release()
            assert b.state is saferring.BufferState.RELEASED
    for k in range(8, 12):
        late = b"".join(b.tobytes() for b in recvs[k].take())
        assert late + _drain_sock(pairs[k][1]) == b"late", k
    accepted += accepts[0].take()
    for fd in accepted:
        ctx.track_fd(fd)
    assert len(set(accepted)) == len(accepted)
    untaken = accepts[1].pending()
    del accepts[1]
    gc.collect()  # the dropped accept closes what it accepted and nobody took
    backlog = 0
    for lst in listeners:
        lst.setblocking(False)
        while True:
            try:
                conn, _ = lst.accept()
            except BlockingIOError:
                break
            conn.close()
            backlog += 1
    assert len(accepted) + untaken + backlog == 12, (len(accepted), untaken, backlog)
    _closed_ring_refuses(ctx, ring, polls[0], pipes[0][0])


@scenario("op:SEND_ZC", "op:SENDMSG_ZC")
def close_with_zero_copy_sends_in_flight(ctx: Context) -> None:
    """200 send_zc/sendmsg_zc to a 127.0.0.1 TCP peer through a small send buffer, their
    bytearrays dropped and sprayed, a reader draining the peer while close() runs.  Must hold:
    close() returns once every send has its notification; each send ends COMPLETED (the peer
    received exactly its byte count of its own pattern) or CANCELLED/FAILED; the peer received
    no byte that is not some send's pattern (a send reading freed, sprayed memory would)."""
    ring = ctx.ring(64)
    # A small send buffer: most sends wait for room, so close() finds them in flight.  (Not a
    # small receive window: with loopback's large MSS a tiny window stalls TCP for seconds.)
    client, server = _tcp_pair()
    ctx.sockets += [client, server]
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    ops: list[tuple[int, saferring.Operation[Any]]] = []
    for i in range(200):
        if i % 4 == 3:
            ops.append((i, ring.sendmsg_zc(client, [bytearray(byte_pattern(i, 700)),
                                                    bytearray(byte_pattern(i, 300))])))
        else:
            ops.append((i, ring.send_zc(client, bytearray(byte_pattern(i, 1000)))))
    ring.submit()
    gc.collect()
    ctx.spray(1000, 300)
    ctx.spray(700, 300)
    ctx.spray(300, 300)
    reader = _Reader(server)
    collect_until(ring, lambda: sum(op.done() for _, op in ops) >= 5)
    ring.close()
    client.close()
    data = reader.finish()
    states = _check_outcomes([op for _, op in ops])
    assert states[OpState.COMPLETED] >= 5, states
    counts = collections.Counter(data)
    for i, op in ops:
        value = i % 250 + 1
        if op.state is OpState.COMPLETED:
            assert counts[value] == op.result(), (i, counts[value], op.result())
        else:
            assert counts[value] <= 1000, (i, counts[value])
    known = {i % 250 + 1 for i, _ in ops}
    assert set(counts) <= known, f"the peer received bytes no send held: {set(counts) - known}"
    ctx.check_canaries()
    _closed_ring_refuses(ctx, ring, ops[0][1], 0)


@scenario("op:SEND_ZC")
def close_timeout_with_unread_zero_copy_sends(ctx: Context) -> None:
    """Zero-copy sends queued behind a full peer window: their notifications cannot come while
    the peer does not read.  close(timeout=0.3) must raise TimeoutError and leave the ring open,
    consistent and usable (new operations run, the sends' buffers stay pinned); once the peer
    reads, close() finishes and every send is COMPLETED with exactly its bytes delivered."""
    ring = ctx.ring(16)
    client, server = _tcp_pair(rcvbuf=4096)
    ctx.sockets += [client, server]
    # Fill the peer's window while the send buffer keeps room: later sends are queued in the
    # socket (their CQE comes, the notification waits for the data to leave).
    fill = fill_peer_window(client)
    sends = [ring.send_zc(client, bytearray(byte_pattern(i, 2000))) for i in range(20)]
    ring.submit()
    gc.collect()
    ctx.spray(2000, 200)
    try:
        ring.close(timeout=0.3)
    except TimeoutError:
        pass
    else:
        ctx.skip("the zero-copy notifications came without the peer reading (this kernel "
                 "copied the data at once): nothing is stuck")
    assert not ring.closed
    stats = ring.stats()
    assert stats.in_flight > 0 and stats.pinned_bytes >= 2000, stats
    assert ring.run(ring.nop()) == 0  # still usable
    r, w = ctx.pipe()
    rd = ring.read(r, bytearray(3))
    os.write(w, b"abc")
    assert ring.run(rd) == 3
    ctx.raises(TimeoutError, ring.close, timeout=0.05)
    assert not ring.closed
    # A wider window for the rest (a tiny one makes TCP wait for window probes, for seconds).
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    reader = _Reader(server)
    ring.close(timeout=30)
    assert ring.closed
    client.close()
    data = reader.finish()
    _check_outcomes(sends, {OpState.COMPLETED, OpState.CANCELLED})
    counts = collections.Counter(data)
    for i, op in enumerate(sends):
        if op.state is OpState.COMPLETED:
            assert counts[i % 250 + 1] == op.result() == 2000, (i, counts[i % 250 + 1])
    assert counts[0] == fill
    assert set(counts) <= {0} | {i % 250 + 1 for i in range(20)}
    ctx.check_canaries()


@scenario()
def close_with_linked_chains_in_flight(ctx: Context) -> None:
    """60 chains read(pipe) -> write(other pipe) -> nop, 20 reads with a long link timeout,
    and a chain left open when close() is called inside its ``with`` block.  Six
    chains are fed and finish first.  Must hold: a fed chain is COMPLETED throughout and its
    write delivered exactly the bytes read; every other member is CANCELLED and its output
    pipe is empty (a cancelled head never lets its write run); the open chain is closed by
    close() and its members end too."""
    ring = ctx.ring(64)
    chains = []
    for _ in range(60):
        src_r, src_w = ctx.pipe()
        dst_r, dst_w = ctx.pipe()
        buf = bytearray(64)
        # A chain reaches the kernel whole: queued SQEs go first, so that it fits the SQ.
        ring.submit()
        with ring.chain():
            rd = ring.read(src_r, buf)
            wr = ring.write(dst_w, buf)  # the buffer is read when the write runs, after the read
            nop = ring.nop()
        chains.append((src_w, dst_r, (rd, wr, nop)))
    timed = []
    for _ in range(20):
        r, _ = ctx.pipe()
        op = ring.read(r, bytearray(16))
        timed.append((op, ring.link_timeout(op, 3600)))
    ring.submit()
    for k in range(6):
        os.write(chains[k][0], byte_pattern(k, 64))
    collect_until(ring, lambda: all(c[2][2].done() for c in chains[:6]))
    opened = ring.chain()
    opened.__enter__()
    r, _ = ctx.pipe()
    in_open = [ring.read(r, bytearray(8)), ring.nop()]
    ring.close()  # inside the open chain: documented to close it, then drain
    opened.__exit__(None, None, None)  # leaving the block after close() is quiet
    for k, (_, dst_r, members) in enumerate(chains):
        out = _drain_fd(dst_r)
        if k < 6:
            _check_outcomes(members, {OpState.COMPLETED})
            assert out == byte_pattern(k, 64) and members[1].result() == 64, k
        else:
            _check_outcomes(members, {OpState.CANCELLED})
            assert out == b"", f"chain {k}: a write behind a cancelled read ran"
    for op, lt in timed:
        _check_outcomes([op], {OpState.CANCELLED})
        _check_outcomes([lt], {OpState.COMPLETED, OpState.CANCELLED})
    _check_outcomes(in_open)
    _closed_ring_refuses(ctx, ring, chains[0][2][0], 0)


@scenario()
def close_with_hard_linked_chains_in_flight(ctx: Context) -> None:
    """20 hard-linked chains read(pipe) -> write(other pipe), the reads blocked, then close().
    A hard link is not severed by its head's failure, cancellation included (the kernel's
    IOSQE_IO_HARDLINK; documented on ``Ring.chain``): the reads end CANCELLED, each write then
    runs with the buffer as it was (pinned by both until both ended), and close() returns only
    after every write's CQE; canaries sprayed after the drops stay intact."""
    ring = ctx.ring(64)
    chains = []
    for _ in range(20):
        src_r, _src_w = ctx.pipe()
        dst_r, dst_w = ctx.pipe()
        buf = bytearray(b"Z" * 16)
        with ring.chain(hard=True):
            rd = ring.read(src_r, buf)
            wr = ring.write(dst_w, buf)
        chains.append((dst_r, rd, wr))
    del buf
    ring.submit()
    ctx.spray(16, count=256)
    ring.close()
    for dst_r, rd, wr in chains:
        _check_outcomes([rd], {OpState.CANCELLED})
        out = _drain_fd(dst_r)
        assert wr.done(), wr
        if wr.state is OpState.COMPLETED:
            assert wr.result() == 16 and out == b"Z" * 16, (wr, out)
        else:  # the write was reached by close()'s own cancel before it ran
            assert wr.state is OpState.CANCELLED and out == b"", (wr, out)


@scenario()
def close_with_fixed_file_ops_in_flight(ctx: Context) -> None:
    """200 reads and recvs through FixedFile handles of 8 pipes and 8 sockets whose own
    descriptors were closed right after registration (the table holds the files); 2 pipes are
    fed and reaped, then close().  Must hold: the fed reads COMPLETED with the bytes, the rest
    CANCELLED; the handles refuse (RingClosedError) after close()."""
    ring = ctx.ring(32)
    pipes = [os.pipe() for _ in range(8)]
    pairs = [ctx.socketpair() for _ in range(8)]
    fds = [r for r, _ in pipes] + [b.fileno() for _, b in pairs]
    handles = ring.register_files(fds)
    for r, _ in pipes:
        os.close(r)  # the registered table keeps each file open
    writers = [ctx.track_fd(w) for _, w in pipes]
    ops: list[tuple[int, saferring.Operation[Any]]] = []
    for i in range(200):
        k = i % 16
        h = handles[k]
        assert h is not None
        ops.append((k, ring.read(h, _Buf(128)) if k < 8 else ring.recv(h, _Buf(128))))
    ring.submit()
    gc.collect()
    ctx.spray(128, 400)
    os.write(writers[0], byte_pattern(0, 128 * 3))
    pairs[0][0].sendall(byte_pattern(8, 128 * 2))
    fed = [op for k, op in ops if k in (0, 8)]
    collect_until(ring, lambda: sum(op.result() for op in fed if op.done()) == 128 * 5)
    ring.close()
    states = _check_outcomes([op for _, op in ops], {OpState.COMPLETED, OpState.CANCELLED})
    assert states[OpState.COMPLETED] == 5, states
    h0 = handles[0]
    assert h0 is not None
    ctx.raises(saferring.RingClosedError, ring.read, h0, bytearray(1))
    ctx.raises(saferring.RingClosedError, ring.update_files, 0, [writers[0]])
    del ops
    gc.collect()
    ctx.spray(128, 400)
    for w in writers:
        try:
            os.write(w, b"\xee" * 64)
        except BrokenPipeError:
            pass  # the table was the last holder of the read end: it went with the ring
    ctx.check_canaries()


@scenario()
def close_with_every_kind_mixed(ctx: Context) -> None:
    """About 400 operations of every kind interleaved on one small ring: pipe reads, writes into
    a full pipe, socket recvs, timeouts, single and multishot polls, batches of pipe reads,
    readvs, fixed-file reads, nops, statx, an accept and a multishot receive; some finish
    first.  Must hold: close() returns, every operation ends once in a documented state, the
    writes into the full pipe delivered exactly what they report (none of the data of those
    cancelled), and dropped buffers are never written after close()."""
    ring = ctx.ring(16)
    group = saferring.BufferRing(ring, 8, 128)
    ops: list[saferring.Operation[Any]] = []
    pipes = [ctx.pipe() for _ in range(6)]
    full_r, full_w = ctx.pipe()
    filled = _fill_pipe(full_w)
    pairs = [ctx.socketpair() for _ in range(4)]
    lst = socket.socket()
    ctx.sockets.append(lst)
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)
    (fixed,) = ring.register_files([pipes[5][0]])
    assert fixed is not None
    writes: list[tuple[int, saferring.Operation[Any]]] = []
    for i in range(360):
        kind = i % 10
        r = pipes[i % 5][0]
        if kind == 0:
            ops.append(ring.read(r, _Buf(256)))
        elif kind == 1:
            op = ring.write(full_w, _Buf(byte_pattern(i, 100)))
            writes.append((i, op))
            ops.append(op)
        elif kind == 2:
            ops.append(ring.recv(pairs[i % 4][1], _Buf(256)))
        elif kind == 3:
            ops.append(ring.timeout(3600))
        elif kind == 4:
            ops.append(ring.poll_add(r, 1, multishot=bool(i % 2)))
        elif kind == 5:
            ops.append(ring.readv(r, [_Buf(64), _Buf(64)]))
        elif kind == 6:
            ops.append(ring.read(fixed, _Buf(256)))
        elif kind == 7:
            ops.append(ring.nop())
        elif kind == 8:
            ops.append(ring.read_many(r, _Buf(4 * 64), [0, 0, 0, 0], 64))
        else:
            ops.append(ring.statx("/"))
    ops.append(ring.accept(lst))
    ops.append(ring.recv_multishot(pairs[0][1], group))
    ring.submit()
    gc.collect()
    for size in (256, 100, 64):
        ctx.spray(size, 300)
    os.write(pipes[0][1], b"x" * 100)
    pairs[1][0].sendall(b"y" * 100)
    instant = [op for i, op in enumerate(ops[:360]) if i % 10 in (7, 9)]
    collect_until(ring, lambda ops=ops: all(op.done() for op in instant)  # type: ignore[misc]
                   and sum(op.done() for op in ops) > len(instant))
    ring.close()
    _check_outcomes(ops)
    _check_outcomes(instant, {OpState.COMPLETED})
    out = _drain_fd(full_r)
    assert out[:filled] == bytes(filled)
    counts = collections.Counter(out[filled:])
    for i, op in writes:
        expected = op.result() if op.state is OpState.COMPLETED else 0
        assert counts[i % 250 + 1] == expected, (i, op, counts[i % 250 + 1])
    del ops, writes
    gc.collect()
    for size in (256, 100, 64):
        ctx.spray(size, 300)
    for _, w in pipes:
        os.write(w, b"\xee" * 512)
    for a, _ in pairs:
        a.sendall(b"\xee" * 512)
    ctx.check_canaries()


@scenario()
def close_with_blocked_worker_requests_in_flight(ctx: Context) -> None:
    """splice and tee from empty pipes: requests the kernel runs in an io-wq worker, where they
    block.  close() (and op.cancel()) must interrupt them, and each must end CANCELLED, as
    documented for every operation close() cancels, never FAILED with an errno Python cannot
    name; nothing may reach the output pipe."""
    ring = ctx.ring(16)
    src_r, _src_w = ctx.pipe()
    dst_r, dst_w = ctx.pipe()
    ops = [ring.splice(src_r, dst_w, 64) if i % 2 else ring.tee(src_r, dst_w, 64)
           for i in range(8)]
    ring.submit()
    time.sleep(0.05)  # let the workers block
    ring.wait(0)
    assert not any(op.done() for op in ops)
    first = ops[0]
    first.cancel()
    collect_until(ring, first.done)
    ring.close()
    for op in ops:
        assert op.state is OpState.CANCELLED, (
            f"{op!r} ended {op.state.value} ({op._res}) after a cancel: expected CANCELLED")
    assert _drain_fd(dst_r) == b""


@scenario()
def close_with_tiny_timeout_then_retry(ctx: Context) -> None:
    """close(timeout=0) and close(timeout=1e-4) with 300 reads and timeouts in flight: each
    may give up with TimeoutError, and then the ring must be open and usable (a new operation
    runs, cancelled operations are handed out by wait() exactly once); a final close()
    finishes, and every operation ends exactly once."""
    ring = ctx.ring(32)
    pipes = [ctx.pipe() for _ in range(10)]
    ops = [ring.read(pipes[i % 10][0], bytearray(64)) if i % 2 else ring.timeout(3600)
           for i in range(300)]
    ring.submit()
    ctx.raises(TimeoutError, ring.close, timeout=0)
    assert not ring.closed
    seen: collections.Counter[int] = collections.Counter()
    for _ in range(20):
        try:
            ring.close(timeout=1e-4)
            break
        except TimeoutError:
            assert not ring.closed
            for op in ring.wait(0):
                seen[op.user_data] += 1
            nop = ring.nop()
            assert ring.run(nop) == 0
    if not ring.closed:
        for op in ring.wait(0):
            seen[op.user_data] += 1
        ring.close()
    assert all(count == 1 for count in seen.values()), "an operation was handed out twice"
    _check_outcomes(ops, {OpState.CANCELLED})
    ctx.raises(saferring.RingClosedError, ring.wait, 0)


@scenario()
def close_called_from_inside_ring_calls(ctx: Context) -> None:
    """close() called from code that runs inside a call on the same ring: a writev buffers
    iterator, a fileno() of an fd argument, a buffer's __del__ and a weakref callback fired
    while completions are processed, a signal handler during wait().  Each must raise
    OperationStateError there and leave the ring open and working; closing *another* ring (with
    reads in flight) from inside a completion must work, draining it."""
    ring = ctx.ring(16)
    other = ctx.ring(8)
    r, w = ctx.pipe()
    refused: list[str] = []

    def try_close(where: str) -> None:
        try:
            ring.close()
        except saferring.OperationStateError:
            refused.append(where)

    def buffers() -> Iterator[bytes]:
        yield b"ab"
        try_close("iterator")
        yield b"cd"

    assert ring.run(ring.writev(w, buffers())) == 4
    assert os.read(r, 4) == b"abcd"

    class Sneaky:
        def fileno(self) -> int:
            try_close("fileno")
            return w

    assert ring.run(ring.write(Sneaky(), b"ef")) == 2  # type: ignore[arg-type]
    assert os.read(r, 2) == b"ef"

    other_r, _other_w = ctx.pipe()
    other_reads = [other.read(other_r, bytearray(32)) for _ in range(20)]
    other.submit()

    class Closer(bytearray):
        def __del__(self) -> None:
            try_close("__del__")
            other.close()  # another ring: allowed, drains its reads right here

    def callback(_: object) -> None:
        try_close("weakref callback")

    target = _Buf(3)
    guard = weakref.ref(target, callback)
    op1 = ring.read(r, Closer(3))
    op2 = ring.read(r, target)
    del target
    ring.submit()
    os.write(w, b"ghijkl")
    collect_until(ring, lambda: op1.done() and op2.done())
    gc.collect()
    assert guard() is None
    assert other.closed
    _check_outcomes(other_reads, {OpState.CANCELLED})

    def handler(signum: int, frame: Any) -> None:
        if frame is None or "saferring" not in frame.f_code.co_filename:
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # not inside the ring's wait() yet
            return
        try_close("signal handler")
        os.write(w, b"z")  # wakes the wait

    old = signal.signal(signal.SIGALRM, handler)
    try:
        op3 = ring.read(r, bytearray(1))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        assert ring.wait(1, timeout=10) == [op3]
        assert op3.result() == 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert sorted(refused) == sorted(["iterator", "fileno", "__del__", "weakref callback",
                                      "signal handler"]), refused
    assert not ring.closed
    assert ring.run(ring.nop()) == 0


# -- rings nobody closes --------------------------------------------------------------------------


@scenario()
def unclosed_ring_drained_by_garbage_collector(ctx: Context) -> None:
    """Two rings dropped without close(), with reads (buffers dropped), recvs, timeouts,
    multishot polls and a multishot accept that took a connection in flight; one of them in the
    middle of an open chain.  After gc.collect(): each ring was drained and torn down (its fd
    is closed, nothing went to the graveyard), the dropped buffers are freed, the accepted
    descriptor nobody took is closed, and data written later touches no canary."""
    graveyard = len(_graveyard)
    ring = saferring.Ring(16)
    chained = saferring.Ring(8)
    ring_fds = [ring.fd, chained.fd]
    pipes = [ctx.pipe() for _ in range(5)]
    a, b = ctx.socketpair()
    lst = socket.socket()
    ctx.sockets.append(lst)
    lst.bind(("127.0.0.1", 0))
    lst.listen(4)
    refs = []
    for i in range(100):
        buf = _Buf(300)
        refs.append(weakref.ref(buf))
        ring.read(pipes[i % 5][0], buf)
    del buf
    for _ in range(20):
        ring.recv(b, bytearray(300))
        ring.timeout(3600)
    ring.poll_add(pipes[0][0], 1, multishot=True)
    accepts = ring.accept(lst, multishot=True)
    client = socket.create_connection(lst.getsockname(), timeout=5)
    ctx.sockets.append(client)
    collect_until(ring, lambda acc=accepts: acc.pending() > 0)  # type: ignore[misc]
    chain = chained.chain()
    chain.__enter__()
    chained.read(pipes[1][0], _Buf(300))
    chained.nop()
    alive = weakref.ref(ring), weakref.ref(chained)
    del ring, chained, chain, accepts
    gc.collect()
    ctx.spray(300, 400)
    assert alive[0]() is None and alive[1]() is None, "a dropped ring is still alive"
    assert len(_graveyard) == graveyard, "a ring could not be drained"
    for fd in ring_fds:  # the finaliser closes the ring's descriptor only after the drain
        assert not os.path.exists(f"/proc/self/fd/{fd}"), "a dropped ring was not torn down"
    assert all(ref() is None for ref in refs), "a drained ring kept a buffer"
    for _, w in pipes:
        os.write(w, b"\xee" * 1024)
    a.sendall(b"\xee" * 1024)
    ctx.check_canaries()


@scenario()
def interpreter_exit_with_ops_in_flight(ctx: Context) -> None:
    """A fresh interpreter exits with rings open and every kind of request in flight: pipe reads
    with dropped buffers, recvs, long timeouts, multishot polls, a multishot accept holding an
    untaken connection, a multishot receive on a BufferRing, a pending chain, fixed-file reads,
    and a ring owned by a thread that has ended.  Must hold: exit status 0, no crash; the exit
    hook drained the main thread's rings (checked by an atexit hook registered before saferring,
    which runs after it: rings closed, every operation ended) and kept the dead thread's ring
    (graveyard) instead of freeing what it pins."""
    code = textwrap.dedent("""
        import atexit, gc, os, socket, sys, threading
        state = {}

        def check():
            from saferring import OpState
            from saferring.ring import _graveyard
            ring, ops, orphan = state["ring"], state["ops"], state["orphan"]
            assert ring.closed, "the exit hook did not close the ring"
            bad = [op for op in ops if op.state not in (OpState.CANCELLED, OpState.COMPLETED)]
            assert not bad, bad[:3]
            assert orphan in _graveyard and not orphan.closed
            print("EXIT-CHECKED", flush=True)

        atexit.register(check)  # before saferring's hook, so it runs after it
        import saferring
        ring = saferring.Ring(16)
        ops = []
        pipes = [os.pipe() for _ in range(4)]
        for i in range(100):
            ops.append(ring.read(pipes[i % 4][0], bytearray(4096)))
        a, b = socket.socketpair()
        ops += [ring.recv(b, bytearray(100)) for _ in range(20)]
        ops += [ring.timeout(3600) for _ in range(20)]
        ops.append(ring.poll_add(pipes[0][0], 1, multishot=True))
        lst = socket.socket(); lst.bind(("127.0.0.1", 0)); lst.listen(4)
        acc = ring.accept(lst, multishot=True); ops.append(acc)
        c = socket.create_connection(lst.getsockname())
        while not acc.pending():
            ring.wait(1, timeout=1)
        group = saferring.BufferRing(ring, 4, 256)
        ops.append(ring.recv_multishot(a, group))
        with ring.chain():
            ops.append(ring.read(pipes[1][0], bytearray(10)))
            ops.append(ring.nop())
        fixed = ring.register_files([pipes[2][0]])
        ops += [ring.read(fixed[0], bytearray(64)) for _ in range(10)]
        ring.submit()
        box = []

        def owner():
            r = saferring.Ring(8)
            r.read(pipes[3][0], bytearray(64))
            r.submit()
            box.append(r)

        t = threading.Thread(target=owner); t.start(); t.join()
        state.update(ring=ring, ops=ops, orphan=box[0])
        print("EXITING", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout.split() == ["EXITING", "EXIT-CHECKED"], (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr


# -- registered files: slots changed under requests in flight -------------------------------------


def _slot_setup(ctx: Context, ring: saferring.Ring
                ) -> tuple[tuple[int, int], tuple[int, int], int, list[saferring.Operation[Any]],
                           list[saferring.Operation[Any]], list[saferring.FixedFile | None]]:
    """Register [read end of pipe A, write end of full pipe F]; submit 10 reads on slot 0 and
    5 writes (patterns 1-5) on slot 1, then queue 3 more reads without submitting them (the
    slot changes that follow are documented to submit them first, to the old file).  Returns
    (A, F, bytes in F, reads, writes, handles)."""
    pa = ctx.pipe()
    pf = ctx.pipe()
    filled = _fill_pipe(pf[1])
    handles = ring.register_files([pa[0], pf[1]])
    h0, h1 = handles
    assert h0 is not None and h1 is not None
    reads = [ring.read(h0, bytearray(64)) for _ in range(10)]
    writes = [ring.write(h1, bytearray(byte_pattern(i, 100))) for i in range(5)]
    ring.submit()
    reads += [ring.read(h0, bytearray(64)) for _ in range(3)]
    return pa, pf, filled, reads, writes, handles


def _slot_outcome(ctx: Context, ring: saferring.Ring, pa: tuple[int, int], pf: tuple[int, int],
                  filled: int, reads: list[saferring.Operation[Any]],
                  writes: list[saferring.Operation[Any]], pb: tuple[int, int],
                  pg: tuple[int, int]) -> None:
    """Feed the old pipe A and drain the old pipe F: the old requests complete on them, and the
    files now in the slots (pipes B and G) see none of their data."""
    os.write(pb[1], b"B" * 640)  # the new file in slot 0: the old reads must not take this
    os.write(pa[1], byte_pattern(7, 64 * len(reads)))
    out = _drain_fd(pf[0])  # room in F: the old writes go on
    collect_until(ring, lambda: all(op.done() for op in reads + writes))
    out += _drain_fd(pf[0])
    assert [op.result() for op in reads] == [64] * len(reads)
    assert [op.result() for op in writes] == [100] * 5
    assert out[:filled] == bytes(filled)
    assert collections.Counter(out[filled:]) == {i % 250 + 1: 100 for i in range(5)}
    assert _drain_fd(pg[0]) == b"", "a write on the old slot landed in the slot's new file"
    assert _drain_fd(pb[0]) == b"B" * 640, "a read on the old slot took the new file's data"


@scenario()
def fixed_slot_replaced_while_ops_in_flight(ctx: Context) -> None:
    """update_files() replaces two slots while 10 reads and 5 blocked writes use them.  Must
    hold: the old handles are refused (OperationStateError) before anything is queued, the new
    ones work, and the requests in flight stay on the files they started on: the reads get
    the old pipe's bytes, the writes land in the old pipe, the new files get nothing of theirs."""
    ring = ctx.ring(32)
    pa, pf, filled, reads, writes, (old0, old1) = _slot_setup(ctx, ring)
    assert old0 is not None and old1 is not None
    pb, pg = ctx.pipe(), ctx.pipe()
    new0, new1 = ring.update_files(0, [pb[0], pg[1]])
    assert not old0.valid and not old1.valid
    in_flight = ring.stats().in_flight
    ctx.raises(saferring.OperationStateError, ring.read, old0, bytearray(1))
    ctx.raises(saferring.OperationStateError, ring.write, old1, b"x")
    assert ring.stats().in_flight == in_flight
    assert new0 is not None and new1 is not None
    assert ring.run(ring.write(new1, b"G" * 10)) == 10
    assert _drain_fd(pg[0]) == b"G" * 10
    _slot_outcome(ctx, ring, pa, pf, filled, reads, writes, pb, pg)
    os.write(pb[1], b"next")
    buf = bytearray(4)
    assert ring.run(ring.read(new0, buf)) == 4 and buf == b"next"


@scenario()
def fixed_table_unregistered_while_ops_in_flight(ctx: Context) -> None:
    """unregister_files() while reads and blocked writes use the table, then a new table with
    other files at the same slot numbers.  Must hold: every old handle is refused, new handles
    to the same slot numbers reach the new files, and the requests in flight finish on the old
    files (no byte of theirs in the new files, none of the new files' bytes in them)."""
    ring = ctx.ring(32)
    pa, pf, filled, reads, writes, (old0, old1) = _slot_setup(ctx, ring)
    assert old0 is not None and old1 is not None
    # Some kernels (6.1) make the unregistration wait until every request using the table has
    # ended, which here would be forever: a timer interrupts it, and then the table must still
    # be registered, its handles valid (documented); the requests are let finish, and the
    # unregistration is done again.
    old_handler = signal.signal(signal.SIGALRM, lambda signum, frame: None)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        ring.unregister_files()
    except InterruptedError:
        assert old0.valid and old1.valid, "an interrupted unregister_files() staled the handles"
        pb, pg = ctx.pipe(), ctx.pipe()
        _slot_outcome(ctx, ring, pa, pf, filled, reads, writes, pb, pg)
        ring.unregister_files()  # nothing uses the table now
        assert not old0.valid and not old1.valid
        new0, _new1 = ring.register_files([pb[0], pg[1]])
        assert new0 is not None and new0.slot == old0.slot and new0.valid
        return
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
    ctx.raises(saferring.OperationStateError, ring.read, old0, bytearray(1))
    ctx.raises(saferring.OperationStateError, ring.update_files, 0, [pa[0]])
    pb, pg = ctx.pipe(), ctx.pipe()
    new0, new1 = ring.register_files([pb[0], pg[1]])
    assert new0 is not None and new1 is not None and new0.slot == old0.slot
    assert not old0.valid and not old1.valid and new0.valid
    ctx.raises(saferring.OperationStateError, ring.write, old1, b"x")
    _slot_outcome(ctx, ring, pa, pf, filled, reads, writes, pb, pg)


@scenario("op:CLOSE")
def fixed_slot_closed_direct_and_reused_while_ops_in_flight(ctx: Context) -> None:
    """close_direct() empties slots that in-flight reads and writes use; the slots are then
    filled with other files (update_files).  Must hold: close_direct stales the handles at once
    (OperationStateError on use), the in-flight requests keep their files (the kernel holds
    them) and finish there, and the files that took the slots get none of their data."""
    ring = ctx.ring(32)
    pa, pf, filled, reads, writes, (old0, old1) = _slot_setup(ctx, ring)
    assert old0 is not None and old1 is not None
    closes = [ring.close_direct(old0), ring.close_direct(old1)]
    assert not old0.valid and not old1.valid
    ctx.raises(saferring.OperationStateError, ring.read, old0, bytearray(1))
    ctx.raises(saferring.OperationStateError, ring.close_direct, old1)
    assert [ring.run(op) for op in closes] == [0, 0]
    pb, pg = ctx.pipe(), ctx.pipe()
    new0, new1 = ring.update_files(0, [pb[0], pg[1]])
    assert new0 is not None and new1 is not None and new0.valid and new1.valid
    _slot_outcome(ctx, ring, pa, pf, filled, reads, writes, pb, pg)


# -- plain descriptors closed and reused --------------------------------------------------------


@scenario()
def ops_on_closed_descriptors_fail_with_ebadf(ctx: Context) -> None:
    """Every kind of request on a descriptor number that is closed.  Must hold: each fails with
    an OSError whose errno is EBADF, either at once (when the library must look at the
    descriptor first: an address family check, a dup for a re-armed receive, a registration)
    or from its CQE (state FAILED, not a cancellation), and leaves nothing in flight."""
    ring = ctx.ring(16)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    bad = r  # closed, and nothing in this scenario opens a descriptor until the end
    group = saferring.BufferRing(ring, 2, 64)
    attempts: dict[str, Callable[[], saferring.Operation[Any]]] = {
        "read": lambda: ring.read(bad, bytearray(8)),
        "write": lambda: ring.write(bad, b"x"),
        "readv": lambda: ring.readv(bad, [bytearray(8)]),
        "writev": lambda: ring.writev(bad, [b"x"]),
        "recv": lambda: ring.recv(bad, bytearray(8)),
        "send": lambda: ring.send(bad, b"x"),
        "send with flags": lambda: ring.send(bad, b"x", socket.MSG_NOSIGNAL),
        "sendmsg": lambda: ring.sendmsg(bad, [b"x"]),
        "recvmsg": lambda: ring.recvmsg(bad, [bytearray(8)]),
        "poll_add": lambda: ring.poll_add(bad, 1),
        "fsync": lambda: ring.fsync(bad),
        "accept": lambda: ring.accept(bad),
        "accept multishot": lambda: ring.accept(bad, multishot=True),
        "shutdown": lambda: ring.shutdown(bad, socket.SHUT_RDWR),
        "close_fd": lambda: ring.close_fd(bad),
        "statx(fd)": lambda: ring.statx(bad),
        "read_many": lambda: ring.read_many(bad, bytearray(16), [0, 8], 8),
        "recv on a BufferRing": lambda: ring.recv(bad, group),
        "recv_multishot": lambda: ring.recv_multishot(bad, group),
        "connect": lambda: ring.connect(bad, ("127.0.0.1", 9)),
        "splice": lambda: ring.splice(bad, bad, 8),
        "register_files": lambda: ring.register_files([bad]),  # type: ignore[dict-item, return-value]
    }
    if ring.features.supports("SEND_ZC"):
        attempts["send_zc"] = lambda: ring.send_zc(bad, b"x")
    where: dict[str, str] = {}
    for name, attempt in attempts.items():
        try:
            op = attempt()
        except OSError as exc:
            assert not isinstance(exc, saferring.SaferRingError), (name, exc)
            assert exc.errno == errno.EBADF, (name, exc)
            where[name] = "at once"
            continue
        assert isinstance(op, saferring.Operation), (name, op)
        collect_until(ring, op.done)
        assert op.state is OpState.FAILED, (name, op)
        try:
            op.result()
        except saferring.OperationCancelledError as exc:
            raise AssertionError(f"{name}: a cancellation, not EBADF") from exc
        except OSError as exc:
            assert exc.errno == errno.EBADF, (name, exc)
        where[name] = "from its CQE"
    assert ring.stats().in_flight == 0
    assert where["read"] == where["write"] == "from its CQE"
    assert os.fstat(0) is not None  # descriptors that are open were never touched


@scenario()
def fd_number_reused_while_read_in_flight(ctx: Context) -> None:
    """Reads, a recv and a multishot receive are in flight on descriptor numbers that are then
    closed and made to name other files (dup2 onto the same numbers).  Must hold: the requests
    keep the files they started on (data written to the old files completes them, byte for
    byte), and the new files' data stays in the new files, untouched."""
    ring = ctx.ring(16)
    ra, wa = ctx.pipe()
    rb, wb = ctx.pipe()
    sa, sb = ctx.socketpair()
    ma, mb = ctx.socketpair()
    sc, sd = ctx.socketpair()
    group = saferring.BufferRing(ring, 8, 128)
    read_bufs = [bytearray(50) for _ in range(8)]
    reads = [ring.read(ra, buf) for buf in read_bufs]
    recv_buf = bytearray(50)
    recv = ring.recv(sb, recv_buf)
    multi = ring.recv_multishot(mb, group)
    ring.submit()
    # Each number now names another file.  Pipe A's read end and socket B stay open only
    # through the requests in flight (the kernel holds the file a request uses); the multishot
    # receive holds a duplicate of its descriptor as well.
    os.dup2(rb, ra)
    os.dup2(sd.fileno(), sb.fileno())
    os.dup2(sd.fileno(), mb.fileno())
    sc.sendall(b"D" * 40)  # to socket D: only its own reader may take it
    os.write(wb, b"B" * 120)
    time.sleep(0.05)  # a wrongly redirected request would take it now
    ring.wait(0)
    assert not any(op.done() for op in reads) and not recv.done() and not multi.pending()
    os.write(wa, byte_pattern(1, 400))
    sa.sendall(byte_pattern(2, 50))
    ma.sendall(byte_pattern(3, 300))
    held: list[saferring.Buffer] = []

    def settled() -> bool:
        held.extend(multi.take())
        return (all(op.done() for op in reads) and recv.done()
                and sum(b.nbytes for b in held) >= 300)

    collect_until(ring, settled)
    assert [op.result() for op in reads] == [50] * 8
    assert b"".join(read_bufs) == byte_pattern(1, 400)
    assert recv.result() == 50 and recv_buf == byte_pattern(2, 50)
    assert b"".join(b.tobytes() for b in held) == byte_pattern(3, 300)
    for b in held:
        b.release()
    assert _drain_fd(ra) == b"B" * 120, "a read on the old number took the new file's data"
    assert _drain_fd(sb.fileno()) == b"D" * 40, "a receive on the old number took D's data"
    multi.cancel()
    collect_until(ring, multi.done)


@scenario()
def fd_number_reused_while_write_in_flight(ctx: Context) -> None:
    """Writes blocked on a full pipe, and sends blocked on a full socket, when their descriptor
    numbers are closed and dup2'd to other files.  Must hold: once room is made in the old
    pipe and socket, every write lands there, complete and in the old file only; the files now
    behind the numbers receive nothing."""
    ring = ctx.ring(16)
    rf, wf = ctx.pipe()
    filled = _fill_pipe(wf)
    rn, wn = ctx.pipe()
    writes = [ring.write(wf, bytearray(byte_pattern(i, 200))) for i in range(6)]
    sa, sb = ctx.socketpair()
    sc, sd = ctx.socketpair()
    sa.setblocking(False)
    sock_fill = 0
    try:
        while True:
            sock_fill += sa.send(b"\0" * 4096)
    except BlockingIOError:
        pass
    sa.setblocking(True)
    sends = [ring.send(sa, bytearray(byte_pattern(10 + i, 300))) for i in range(4)]
    ring.submit()
    ring.wait(0)
    assert not any(op.done() for op in writes + sends)
    os.dup2(wn, wf)  # the old number now names pipe N's write end; pipe F's only writer is
    os.dup2(sc.fileno(), sa.fileno())  # ...the requests' reference; same for socket A -> C
    got = _drain_while_pending(ring, writes, lambda: _drain_fd(rf))
    assert [op.result() for op in writes] == [200] * 6
    assert got[:filled] == bytes(filled)
    assert collections.Counter(got[filled:]) == {i % 250 + 1: 200 for i in range(6)}
    received = _drain_while_pending(ring, sends, lambda: _drain_sock(sb))
    assert [op.result() for op in sends] == [300] * 4
    counts = collections.Counter(received)
    assert counts[0] == sock_fill and all(counts[(10 + i) % 250 + 1] == 300 for i in range(4))
    assert _drain_fd(rn) == b"", "a write on the old number landed in the new pipe"
    assert _drain_sock(sd) == b"", "a send on the old number reached the new socket's peer"


@scenario()
def close_fd_with_ops_in_flight(ctx: Context) -> None:
    """ring.close_fd() of a pipe and a socket while reads and recvs on them are in flight, then
    the numbers are taken by new pipes.  Must hold: the close completes (0), the in-flight
    requests still end on their own files with their data (the kernel held the files), the new
    files behind the numbers keep their bytes, and a request queued on the closed number
    before anyone reuses it fails with EBADF."""
    ring = ctx.ring(16)
    ra, wa = os.pipe()
    ctx.track_fd(wa)
    sa, sb = ctx.socketpair()
    reads = [ring.read(ra, bytearray(32)) for _ in range(4)]
    recvs = [ring.recv(sb, bytearray(32)) for _ in range(4)]
    ring.submit()
    assert ring.run(ring.close_fd(ra)) == 0
    sock_number = sb.fileno()
    sb.detach()  # the number is the ring's to close now
    assert ring.run(ring.close_fd(sock_number)) == 0
    late = ring.read(ra, bytearray(8))  # the number is closed and not yet reused
    collect_until(ring, late.done)
    assert late.state is OpState.FAILED
    exc = ctx.raises(OSError, late.result)
    assert isinstance(exc, OSError) and exc.errno == errno.EBADF, exc
    new_pipes = [ctx.pipe(), ctx.pipe()]
    for p in new_pipes:
        os.write(p[1], b"N" * 16)
    os.write(wa, byte_pattern(4, 128))
    sa.sendall(byte_pattern(5, 128))
    collect_until(ring, lambda: all(op.done() for op in reads + recvs))
    assert [op.result() for op in reads] == [32] * 4
    assert [op.result() for op in recvs] == [32] * 4
    for p in new_pipes:
        assert _drain_fd(p[0]) == b"N" * 16


@scenario("op:MSG_RING")
def msg_ring_target_closed_and_fd_reused(ctx: Context) -> None:
    """A message queued to ring B (by the Ring object), then B is closed and a new ring C gets
    B's descriptor number before the message is submitted.  The message names ring B, not a
    number: it must not be delivered to C (the send fails, or goes nowhere)."""
    sender = ctx.ring(8)
    target = ctx.ring(8)
    number = target.fd
    msg = sender.msg_ring(target, 7)
    target.close()
    bystander = ctx.ring(8)
    if bystander.fd != number:
        ctx.skip("the new ring did not get the closed ring's descriptor number")
    collect_until(sender, msg.done)
    arrived = bystander.wait(0, timeout=0.2)
    assert arrived == [], f"a message for a closed ring reached another ring: {arrived}"
