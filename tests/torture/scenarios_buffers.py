"""Torture scenarios: buffers the kernel may write into, dropped, resized, closed or released
while an operation holds them; read-only and movable exporters offered as read targets; results
and cancels asked for at the wrong moment; and saferring's own buffers (``BufferPool``,
``BufferRing``, ``Buffer``) misused while the kernel holds them.

Conventions used throughout:

* Pipe writes are at most ``PIPE_BUF`` (4096) bytes, each sized to what the waiting reads take:
  a pipe write that size is atomic, so a woken read never sees half of one and results are
  exact.
* "Dropped" means no Python reference is left but the library's.  Right after the drop, garbage
  is collected and the freed sizes are sprayed with canaries; only then does the kernel touch
  the memory: the data arrives later, or, for what the kernel reads at submission (iovec
  arrays, msghdrs, paths, timespecs, data to write), the SQEs are submitted only after the
  spray.  A kernel access to memory Python freed then reads or changes a canary.  The
  harness's bytearray canaries cover what CPython allocates; ``ctx.c_canaries()`` covers the
  C objects cffi allocates with ``malloc``.
* Every wait is bounded (:data:`_DEADLINE`): a lost completion fails the scenario, it does not
  hang it.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import gc
import mmap
import os
import socket
import tempfile
import termios
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from harness import Context, scenario

import saferring
from saferring import (
    Buffer,
    BufferBusyError,
    BufferPool,
    BufferRing,
    BufferState,
    OperationCancelledError,
    OperationStateError,
    OpState,
)
from saferring.features import kernel_can

#: Upper bound on any wait for completions: far beyond what a scenario needs, so that only a
#: lost completion (or a hang) reaches it.
_DEADLINE = 10.0
PIPE_BUF = 4096

Op = saferring.Operation[Any]


# -- helpers -------------------------------------------------------------------------------------

def _pattern(n: int, seed: int) -> bytes:
    """``n`` bytes that differ from every other seed's (a rotation of 0..255 by the seed, with
    the seed's high bits mixed in)."""
    unit = bytes(((seed * 53) + i + (seed >> 8)) & 0xFF for i in range(256))
    return (unit * (n // 256 + 1))[:n]


def _settle(ring: saferring.Ring, timeout: float = _DEADLINE) -> list[Op]:
    """Reap until nothing is in flight on ``ring``; return the operations that finished
    meanwhile (those the caller dropped included: the ring hands them back)."""
    deadline = time.monotonic() + timeout
    done: list[Op] = []
    while ring.stats().in_flight:
        left = deadline - time.monotonic()
        assert left > 0, f"operations still in flight after {timeout} s: {ring.stats()}"
        done += ring.wait(1, timeout=left)
    done += ring.wait(0)
    return done


def _finish(ring: saferring.Ring, *ops: Op, timeout: float = _DEADLINE) -> None:
    """Reap until every one of ``ops`` has its final CQE."""
    deadline = time.monotonic() + timeout
    while not all(op.done() for op in ops):
        left = deadline - time.monotonic()
        assert left > 0, f"not finished after {timeout} s: {[op for op in ops if not op.done()]}"
        ring.wait(1, timeout=left)


def _values(ring: saferring.Ring, op: Any, n: int, timeout: float = _DEADLINE) -> list[Buffer]:
    """The next ``n`` values of a multishot receive (reaping as needed)."""
    deadline = time.monotonic() + timeout
    got: list[Buffer] = list(op.take())
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} values arrived within {timeout} s"
        ring.wait(1, timeout=left)
        got += op.take()
    return got


def _pipe_holds(fd: int) -> bytes:
    """Everything waiting in the pipe read end ``fd`` right now (read without blocking)."""
    os.set_blocking(fd, False)
    out = bytearray()
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.set_blocking(fd, True)
    return bytes(out)


def _socket_holds(sock: socket.socket) -> bytes:
    """Everything waiting in ``sock`` right now (a stream socket; read without blocking)."""
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


@contextlib.contextmanager
def _gc_pressure() -> Iterator[None]:
    """Run the cycle collector at (nearly) every allocation, so that collections, and the
    finalisers they run, also happen inside the library's own calls."""
    old = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def _buffer_ring_modes() -> list[str]:
    """The ``BufferRing`` modes this kernel has: ``"provide"`` always (5.7), ``"ring"`` where the
    kernel has buffer rings (5.19, asked of the kernel)."""
    return ["ring", "provide"] if kernel_can("BUF_RING") else ["provide"]


def _fill_pipe(w: int) -> int:
    """Shrink the pipe to one page and fill it: a write to it now waits for a reader."""
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BUF)
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"\xee" * PIPE_BUF)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(w, True)
    return filled


def _nothing_queued(ring: saferring.Ring, before: saferring.RingStats) -> None:
    """Assert that refused calls left nothing behind: nothing in flight or pinned, and no SQE
    handed to the kernel since ``before``."""
    now = ring.stats()
    assert now.in_flight == before.in_flight, f"a refused call queued something: {now}"
    assert now.pinned_bytes == before.pinned_bytes, f"a refused call pinned memory: {now}"
    assert ring.submit() == 0, "a refused call left an SQE behind"


# -- dropped buffers and operations ------------------------------------------------------------

@scenario()
def dropped_read_buffer_under_gc_pressure(ctx: Context) -> None:
    """Reads into bytearrays are submitted, then every reference to most of the buffers and to
    all the operations is dropped, with the collector running at every allocation; the freed
    size is sprayed before the data arrives.  Each chunk lands whole in a pinned buffer: the
    buffers still referenced hold distinct written chunks, the results add up, the pipe is
    drained, and no canary changed."""
    ring = ctx.ring(64)
    r, w = ctx.pipe()
    count, kept_every = 16, 4  # 16 x 4096: the whole default pipe, never a blocked write
    chunks = [_pattern(PIPE_BUF, i) for i in range(count)]
    with _gc_pressure():
        kept = []
        for i in range(count):
            buf = bytearray(PIPE_BUF)
            ring.read(r, buf)
            if i % kept_every == 0:
                kept.append(buf)
        del buf
        ring.submit()
        gc.collect()
        ctx.spray(PIPE_BUF, count=512)
        for chunk in chunks:
            os.write(w, chunk)
        done = _settle(ring)
    assert sorted(op.result() for op in done) == [PIPE_BUF] * count
    landed = [bytes(b) for b in kept]
    assert len(set(landed)) == len(kept) and set(landed) <= set(chunks), "a chunk went astray"
    assert _pipe_holds(r) == b""


@scenario("op:READV")
def dropped_readv_iovecs_sprayed_before_submit(ctx: Context) -> None:
    """Vectored reads are queued, then lose every reference (operations, buffers, and so the
    only Python handle on the C iovec arrays) before they are submitted; the kernel reads the
    iovec array at submission (or later, from io-wq), so the freed sizes of the arrays and the
    buffers are sprayed first.  Submitted afterwards, each readv fills its three pinned
    buffers with one whole chunk: results exact, the kept ones hold distinct chunks, the pipe
    is drained, no canary changed."""
    ring = ctx.ring(64)
    r, w = ctx.pipe()
    sizes = (100, 700, PIPE_BUF - 800)
    count = 12
    chunks = [_pattern(PIPE_BUF, 100 + i) for i in range(count)]
    with _gc_pressure():
        kept: list[list[bytearray]] = []
        for i in range(count):
            bufs = [bytearray(n) for n in sizes]
            ring.readv(r, bufs)
            if i % 3 == 0:
                kept.append(bufs)
        del bufs
        gc.collect()
        for n in sizes:
            ctx.spray(n, 256)
        c_canaries = ctx.c_canaries()
        c_canaries.spray("struct iovec[]", len(sizes))
        assert ring.submit() == count
        for chunk in chunks:
            os.write(w, chunk)
        done = _settle(ring)
    assert [op.result() for op in done] == [PIPE_BUF] * count
    landed = [b"".join(bufs) for bufs in kept]
    assert len(set(landed)) == len(kept) and set(landed) <= set(chunks), "a chunk went astray"
    assert _pipe_holds(r) == b""
    c_canaries.check()


@scenario("op:RECV", "op:RECVMSG")
def dropped_recv_and_recvmsg_on_socketpair(ctx: Context) -> None:
    """Receives and recvmsgs (the msghdr and iovec array the kernel reads at submission, the
    buffers, and the address and ancillary-data room it fills at completion) are queued, then
    every reference to them is dropped before submission; garbage is collected and the freed
    sizes sprayed; they are submitted and one datagram per request arrives.  Every datagram is
    received whole (the byte counts are exactly the lengths sent, no MSG_TRUNC, no stray
    ancillary data or address), nothing is left in the socket, and no canary changed."""
    ring = ctx.ring(64)
    a, b = ctx.socketpair(socket.SOCK_DGRAM)
    per_kind = 12
    with _gc_pressure():
        for _ in range(per_kind):
            ring.recv(a.fileno(), bytearray(1024))
            ring.recvmsg(a.fileno(), [bytearray(300), bytearray(724)],
                         ancbufsize=socket.CMSG_SPACE(4))
        gc.collect()
        for size in (1024, 300, 724):
            ctx.spray(size, 256)
        c_canaries = ctx.c_canaries()
        c_canaries.spray("char[]", socket.CMSG_SPACE(4))  # the ancillary-data room
        c_canaries.spray("char[]", 128)  # the sockaddr_storage room for the sender's address
        c_canaries.spray("struct msghdr *")
        c_canaries.spray("struct iovec[]", 2)
        assert ring.submit() == 2 * per_kind
        lengths = [1 + 41 * i for i in range(2 * per_kind)]  # all below 1024: nothing truncated
        for i, length in enumerate(lengths):
            b.send(_pattern(length, 200 + i))
        done = _settle(ring)
    got = []
    for op in done:
        res = op.result()
        if type(res) is int:
            got.append(res)
        else:
            # An unnamed socket pair: no sender address; nothing was cut; no ancillary data.
            assert (res.ancdata, res.msg_flags, res.address) == ([], 0, None), res
            got.append(res.nbytes)
    assert sorted(got) == lengths
    c_canaries.check()
    a.setblocking(False)
    ctx.raises(BlockingIOError, a.recv, 1)


@scenario()
def dropped_read_many_batch_then_pipe_data(ctx: Context) -> None:
    """Batches of reads (one ``BatchOperation`` pinning one buffer for all its members) wait on
    a pipe; the batches and most of their buffers are dropped, the freed size is sprayed, then
    the data arrives.  Every member reads one whole 512-byte block, each batch's result lists
    the eight counts, the kept buffer holds eight distinct written blocks, the pipe is drained
    and no canary changed."""
    ring = ctx.ring(64)
    r, w = ctx.pipe()
    members, block, batches = 8, 512, 4
    blocks = [_pattern(block, 300 + i) for i in range(members * batches)]
    with _gc_pressure():
        kept = bytearray(members * block)
        # A pipe is a stream: the kernel ignores the offsets, each member takes the next bytes.
        ring.read_many(r, kept, [0] * members, block)
        for _ in range(batches - 1):
            ring.read_many(r, bytearray(members * block), [0] * members, block)
        ring.submit()
        gc.collect()
        ctx.spray(members * block, 512)
        for i in range(0, len(blocks), members):
            os.write(w, b"".join(blocks[i:i + members]))  # 4096 bytes: one atomic write
        done = _settle(ring)
    assert len(done) == batches
    assert all(op.result() == [block] * members for op in done)
    landed = [bytes(kept[i:i + block]) for i in range(0, len(kept), block)]
    assert len(set(landed)) == members and set(landed) <= set(blocks), "a block went astray"
    assert _pipe_holds(r) == b""


@scenario("op:OPENAT", "op:STATX")
def dropped_openat_statx_paths_behind_pipe_chain(ctx: Context) -> None:
    """Chains of read -> openat -> statx are queued behind an empty pipe; the path strings, the
    operations and the statx buffers lose every reference before submission (the kernel copies
    the paths at submission and fills ``struct statx`` when the chain reaches it), the freed
    sizes of the C path copies and of ``struct statx`` are sprayed, then the chains are
    submitted and only after that released by the pipe.  The kernel opens and stats the right
    file (inode and size match), the descriptors of the opens nobody claimed are closed when
    those operations are collected (the harness checks the descriptor table), and no canary
    changed."""
    ring = ctx.ring(64)
    r, w = ctx.pipe()
    chains = 4
    with tempfile.TemporaryDirectory() as tmp:
        name = "p" * 150  # a long path: its C copy is a size of its own to spray
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(b"x" * 12345)
        expect = os.stat(os.path.join(tmp, name))
        path_len = len(os.fsencode(os.path.join(tmp, name))) + 1
        with _gc_pressure():
            for _ in range(chains):
                # Hard links: the next request starts once the read ended, whatever it returned.
                with ring.chain(hard=True):
                    ring.read(r, bytearray(8))
                    ring.openat(os.path.join(tmp, name))  # a fresh str each time, dropped at once
                    ring.statx(os.path.join(tmp, name))
            gc.collect()
            c_canaries = ctx.c_canaries()
            c_canaries.spray("char[]", path_len)
            c_canaries.spray("struct statx *")
            assert ring.submit() == 3 * chains
            os.write(w, b"\0" * 8 * chains)
            done = _settle(ring)
        kinds = sorted(op.kind for op in done)
        assert kinds == sorted(["read", "openat", "statx"] * chains), kinds
        claimed = 0
        for op in done:
            if op.kind == "read":
                assert op.result() == 8
            elif op.kind == "statx":
                st = op.result()
                assert (st.st_ino, st.st_size) == (expect.st_ino, 12345)
            elif claimed < chains // 2:  # claim half; the library closes the others
                fd = op.result()
                try:
                    assert os.fstat(fd).st_ino == expect.st_ino
                finally:
                    os.close(fd)
                claimed += 1
        del done, op
        gc.collect()
        c_canaries.check()


@scenario("op:TIMEOUT", "op:LINK_TIMEOUT")
def dropped_timeout_timespecs_sprayed_before_submit(ctx: Context) -> None:
    """Timeouts and link timeouts (each pinning a ``__kernel_timespec`` the kernel reads at
    submission) are queued, then lose every reference before submission; the timespecs' size
    classes are sprayed, then the SQEs are submitted.  Had a timespec been freed, the kernel
    would read canary bytes (a wild expiry or EINVAL): instead every timeout expires
    (COMPLETED, result None), every linked pipe read is cancelled by its link timeout, and no
    canary changed."""
    ring = ctx.ring(128)
    r, _w = ctx.pipe()
    plain, linked = 32, 8
    with _gc_pressure():
        for i in range(plain):
            ring.timeout(0.001 * (1 + i % 20))
        for _ in range(linked):
            read = ring.read(r, bytearray(64))
            ring.link_timeout(read, 0.02)
        del read
        gc.collect()
        c_canaries = ctx.c_canaries()
        c_canaries.spray("struct __kernel_timespec *", count=256)
        ctx.spray(64, 256)
        ring.submit()
        done = _settle(ring)
    by_kind: dict[str, list[Op]] = {}
    for op in done:
        by_kind.setdefault(op.kind, []).append(op)
    assert len(by_kind["timeout"]) == plain and len(by_kind["link_timeout"]) == linked
    for op in by_kind["timeout"]:
        assert op.state is OpState.COMPLETED and op.result() is None
    for op in by_kind["read"]:
        assert op.state is OpState.CANCELLED, op
    for op in by_kind["link_timeout"]:
        assert op.result() is True, "the link timeout fired (the pipe never had data)"
    c_canaries.check()


_SOURCE = 3000  # bytes per write source: not a size the harness's own canaries use


def _queue_dropped_writes(ring: saferring.Ring, pipes: list[tuple[int, int]],
                          sock: socket.socket, path_fd: int) -> None:
    """Queue one write per kind of data source, each built here and dropped on return: only
    the ring holds them afterwards.  What each should deliver is :func:`_expected_writes`."""
    anon = mmap.mmap(-1, PIPE_BUF)
    anon.write(_pattern(PIPE_BUF, 3003))
    buf = Buffer(_SOURCE)
    buf.fill(_pattern(_SOURCE, 3005))
    sources: list[Any] = [
        bytearray(_pattern(_SOURCE, 3000)),
        _pattern(_SOURCE, 3001),  # a fresh bytes object
        memoryview(bytearray(_pattern(_SOURCE + 100, 3002)))[50:50 + _SOURCE],
        anon,
        array.array("B", _pattern(_SOURCE, 3004)),
        buf,
    ]
    for (_r, w), data in zip(pipes, sources, strict=False):
        ring.write(w, data)
    ring.writev(pipes[len(sources)][1], [bytearray(_pattern(100, 3006)), _pattern(900, 3007)])
    ring.sendmsg(sock.fileno(), [bytearray(_pattern(1000, 3008)), _pattern(24, 3009)])
    ring.write_many(path_fd, bytearray(_pattern(4 * 512, 3010)), [1536, 1024, 512, 0], 512)


def _expected_writes() -> tuple[list[bytes], bytes, bytes]:
    """What :func:`_queue_dropped_writes` delivers: per pipe, on the socket, in the file."""
    per_pipe = [
        _pattern(_SOURCE, 3000),
        _pattern(_SOURCE, 3001),
        _pattern(_SOURCE + 100, 3002)[50:50 + _SOURCE],
        _pattern(PIPE_BUF, 3003),
        _pattern(_SOURCE, 3004),
        _pattern(_SOURCE, 3005),
        _pattern(100, 3006) + _pattern(900, 3007),
    ]
    blocks = _pattern(4 * 512, 3010)
    in_file = b"".join(blocks[i * 512:(i + 1) * 512] for i in (3, 2, 1, 0))
    return per_pipe, _pattern(1000, 3008) + _pattern(24, 3009), in_file


@scenario("op:SENDMSG", "op:WRITEV")
def dropped_write_sources_sprayed_before_submit(ctx: Context) -> None:
    """Writes whose data (a bytearray, bytes, a memoryview slice, an mmap, an array, a filled
    ``Buffer``, a writev vector, a sendmsg vector, a write_many block buffer) lose every
    reference before submission; garbage is collected and the freed sizes are sprayed (a freed
    source would now hold canary bytes), then the SQEs are submitted.  Every reader receives
    exactly the original bytes: the pipes, the socket, and the file at the batch's offsets."""
    ring = ctx.ring(64)
    pipes = [ctx.pipe() for _ in range(7)]
    a, b = ctx.socketpair()
    with tempfile.TemporaryFile() as f, _gc_pressure():
        _queue_dropped_writes(ring, pipes, a, f.fileno())
        gc.collect()
        for size in (_SOURCE, _SOURCE + 100, 100, 900, 1000, 24, 4 * 512):
            ctx.spray(size, 256)
        c_canaries = ctx.c_canaries()
        c_canaries.spray("struct iovec[]", 2)
        c_canaries.spray("struct msghdr *")
        ring.submit()
        done = _settle(ring)
        assert len(done) == 9 and all(op.state is OpState.COMPLETED for op in done), done
        per_pipe, on_socket, in_file = _expected_writes()
        for (r, _w), data in zip(pipes, per_pipe, strict=True):
            assert _pipe_holds(r) == data
        assert _socket_holds(b) == on_socket
        assert os.pread(f.fileno(), 4 * 512, 0) == in_file
    c_canaries.check()


@scenario("op:SEND_ZC")
def dropped_send_zc_sources_sprayed_before_submit(ctx: Context) -> None:
    """Zero-copy sends over 127.0.0.1 TCP (the kernel reads the pages during the send and keeps
    them until its notification) of a bytearray, bytes, an array and a filled ``Buffer``, each
    dropped before submission; the freed sizes are sprayed, then the sends are submitted.  Each
    peer receives exactly the original bytes, each send ends (notification included) with the
    full count, and no canary changed."""
    ring = ctx.ring(32)
    size = 20000
    datas = [_pattern(size, 3100 + i) for i in range(4)]
    listener = socket.socket()
    conns: list[socket.socket] = [listener]
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        pairs = []
        for _ in datas:
            client = socket.create_connection(listener.getsockname(), timeout=_DEADLINE)
            conns.append(client)
            server, _addr = listener.accept()
            conns.append(server)
            server.settimeout(_DEADLINE)
            pairs.append((client, server))
        with _gc_pressure():
            buf = Buffer(size)
            buf.fill(datas[3])
            sources: list[Any] = [bytearray(datas[0]), bytes(bytearray(datas[1])),
                                  array.array("B", datas[2]), buf]
            for (client, _server), data in zip(pairs, sources, strict=True):
                ring.send_zc(client, data)
            del sources, data, buf
            gc.collect()
            ctx.spray(size, 64)
            ring.submit()
            for (_client, server), data in zip(pairs, datas, strict=True):
                got = bytearray()
                while len(got) < size:
                    chunk = server.recv(size - len(got))
                    assert chunk, "the peer closed early"
                    got += chunk
                assert got == data, "a zero-copy send delivered other bytes than its source's"
            done = _settle(ring)
        assert sorted(op.result() for op in done) == [size] * 4
    finally:
        for sock in conns:
            sock.close()


class _Plain:
    """An object in a reference cycle (it refers to itself) holding an operation and its
    buffer (``offset``: where in the buffer the read was aimed); no finaliser."""

    def __init__(self, op: Op, buf: bytearray, offset: int) -> None:
        self.me = self
        self.op = op
        self.buf = buf
        self.offset = offset


class _Resurrecting(_Plain):
    """Like :class:`_Plain`, but its finaliser (run by the cycle collector) hands the buffer to
    ``survivors``: a buffer collected with its cycle comes back to life mid-flight."""

    survivors: list[tuple[bytearray, int]] = []

    def __del__(self) -> None:
        self.survivors.append((self.buf, self.offset))


@scenario()
def reference_cycle_holds_read_and_buffer(ctx: Context) -> None:
    """Reads whose operation and buffer (a bytearray, or a memoryview slice of a larger one)
    are only reachable from reference cycles; the cycles are collected while the reads are in
    flight, a third of them by a finaliser that resurrects the buffer.  The freed sizes are
    sprayed, then the data arrives.  The resurrected buffers cannot be resized while the kernel
    holds them, each received one whole chunk exactly where its read was aimed, each can be
    resized once its final CQE arrived, and no canary changed."""
    ring = ctx.ring(64)
    r, w = ctx.pipe()
    count, margin = 12, 32
    chunks = [_pattern(PIPE_BUF, 400 + i) for i in range(count)]
    survivors = _Resurrecting.survivors
    with _gc_pressure():
        for i in range(count):
            if i % 2:
                backing = bytearray(PIPE_BUF + 2 * margin)
                target: Any = memoryview(backing)[margin:margin + PIPE_BUF]
                offset = margin
            else:
                backing = target = bytearray(PIPE_BUF)
                offset = 0
            holder = _Resurrecting if i % 3 == 0 else _Plain
            holder(ring.read(r, target), backing, offset)
        del backing, target, holder
        ring.submit()
        gc.collect()
        assert len(survivors) == len(range(0, count, 3)), "the cycles were not collected"
        ctx.spray(PIPE_BUF, 512)
        ctx.spray(PIPE_BUF + 2 * margin, 256)
        for buf, _offset in survivors:
            ctx.raises(BufferError, buf.extend, b"!")  # still pinned by its unreachable read
        for chunk in chunks:
            os.write(w, chunk)
        done = _settle(ring)
    assert [op.result() for op in done] == [PIPE_BUF] * count
    landed = []
    for buf, offset in survivors:
        landed.append(bytes(buf[offset:offset + PIPE_BUF]))
        assert buf[:offset] == bytes(offset) and buf[offset + PIPE_BUF:] == bytes(offset)
        buf.extend(b"!")  # the pin went with the final CQE
    assert len(set(landed)) == len(landed) and set(landed) <= set(chunks), "a chunk went astray"
    survivors.clear()
    assert _pipe_holds(r) == b""


@scenario()
def weakref_only_read_and_buffer_live_until_cqe(ctx: Context) -> None:
    """Reads into an ``array.array``, an ``mmap`` and a standalone ``Buffer`` whose operations
    and buffers are then reachable only through weak references.  While the reads are in
    flight every weak reference stays alive (the ring holds them); the freed sizes are sprayed
    and the data arrives; the ring hands back exactly those operations with the right counts;
    the buffers die with the final CQE (their weak references go dead while the finished
    operations are still held), and the operations die once the caller lets go of them."""
    ring = ctx.ring(16)
    pipes = [ctx.pipe() for _ in range(3)]
    arr = array.array("B", bytes(PIPE_BUF))
    anon = mmap.mmap(-1, PIPE_BUF)
    lib_buf = Buffer(PIPE_BUF)
    buffers: list[Any] = [arr, anon, lib_buf]
    buf_refs = [weakref.ref(b) for b in buffers]
    op_refs = [weakref.ref(ring.read(r, b)) for (r, _w), b in zip(pipes, buffers, strict=True)]
    ring.submit()
    del arr, anon, lib_buf, buffers
    gc.collect()
    assert all(ref() is not None for ref in buf_refs + op_refs), "freed while in flight"
    assert all(ref().state is OpState.SUBMITTED for ref in op_refs)  # type: ignore[union-attr]
    ctx.spray(PIPE_BUF, 512)
    for i, (_r, w) in enumerate(pipes):
        os.write(w, _pattern(PIPE_BUF, 500 + i))
    done = _settle(ring)
    assert {id(op) for op in done} == {id(ref()) for ref in op_refs}
    assert [op.result() for op in done] == [PIPE_BUF] * 3
    gc.collect()
    assert all(ref() is None for ref in buf_refs), "a buffer outlived its operation's final CQE"
    del done
    gc.collect()
    assert all(ref() is None for ref in op_refs), "the ring kept a finished operation"


# -- resizing, closing, releasing pinned exporters ---------------------------------------------

@scenario()
def pinned_bytearray_resize_refused(ctx: Context) -> None:
    """Every way Python has to resize a bytearray (extend, append, insert, pop, remove, clear,
    ``del`` of a slice, a slice assignment of another length, ``+=``, ``*=``, ``__init__``) is
    attempted while a read into it is in flight: each raises ``BufferError`` and leaves the
    length unchanged; same-size writes are allowed (the data race is the caller's).  The data
    then lands in the buffer, and once the final CQE has arrived the bytearray resizes."""
    ring = ctx.ring(8)
    r, w = ctx.pipe()
    buf = bytearray(PIPE_BUF)
    buf[0] = 1  # remove(1) below has something to find
    op = ring.read(r, buf)
    ring.submit()
    attempts: dict[str, Callable[[], Any]] = {
        "extend": lambda: buf.extend(b"x"),
        "append": lambda: buf.append(1),
        "insert": lambda: buf.insert(0, 1),
        "pop": buf.pop,
        "remove": lambda: buf.remove(1),
        "clear": buf.clear,
        "del slice": lambda: buf.__delitem__(slice(0, 10)),
        "shrinking slice assignment": lambda: buf.__setitem__(slice(0, 10), b""),
        "growing slice assignment": lambda: buf.__setitem__(slice(0, 1), b"abc"),
        "+=": lambda: buf.__iadd__(b"xy"),
        "*=": lambda: buf.__imul__(2),
        "__init__": lambda: buf.__init__(10),  # type: ignore[misc]
        "__init__ same size": lambda: buf.__init__(PIPE_BUF),  # type: ignore[misc]
    }
    for what, attempt in attempts.items():
        ctx.raises(BufferError, attempt)
        assert len(buf) == PIPE_BUF, f"{what} changed the length of a pinned bytearray"
    buf[0:4] = b"abcd"
    buf += b""
    buf *= 1
    assert op.state is OpState.SUBMITTED
    data = _pattern(PIPE_BUF, 600)
    os.write(w, data)
    _finish(ring, op)
    assert op.result() == PIPE_BUF and buf == data
    buf.extend(b"!")
    assert len(buf) == PIPE_BUF + 1


@scenario()
def pinned_memoryview_slice_release_refused(ctx: Context) -> None:
    """Reads into a nested memoryview slice and into a cast view of one bytearray, and into a
    memoryview opened with ``with``: releasing a view the kernel writes through raises
    ``BufferError`` (so does leaving the ``with`` block), while releasing the parent views is
    allowed and leaves the memory in place (the slices hold the export); the bytearray cannot be
    resized.  Each read's data lands in exactly its slice, and afterwards the views release
    and the bytearray resizes."""
    ring = ctx.ring(8)
    (r1, w1), (r2, w2), (r3, w3) = ctx.pipe(), ctx.pipe(), ctx.pipe()
    backing = bytearray(PIPE_BUF)
    parent = memoryview(backing)
    middle = parent[100:1100]
    inner = middle[10:510]  # backing[110:610]
    words = parent[2048:].cast("I")  # backing[2048:], as 512 unsigned ints
    op1 = ring.read(r1, inner)
    op2 = ring.read(r2, words)
    ctx.raises(BufferError, inner.release)
    ctx.raises(BufferError, words.release)
    middle.release()
    parent.release()
    ctx.raises(BufferError, backing.extend, b"x")

    other = bytearray(PIPE_BUF)
    opened: list[memoryview] = []

    def read_inside_with() -> None:
        with memoryview(other) as view:
            opened.append(view)
            ring.read(r3, view)

    ctx.raises(BufferError, read_inside_with)  # the with block's release is refused
    ring.submit()
    data1, data2, data3 = _pattern(500, 700), _pattern(2048, 701), _pattern(PIPE_BUF, 702)
    os.write(w1, data1)
    os.write(w2, data2)
    os.write(w3, data3)
    done = _settle(ring)
    assert sorted(op.result() for op in done) == [500, 2048, PIPE_BUF]
    assert backing[110:610] == data1 and backing[2048:] == data2
    assert backing[:110] == bytes(110) and backing[610:2048] == bytes(2048 - 610)
    assert other == data3
    inner.release()
    words.release()
    opened[0].release()
    backing.extend(b"x")
    other.extend(b"x")
    del op1, op2


@scenario()
def pinned_mmap_close_resize_refused(ctx: Context) -> None:
    """Reads into an anonymous mmap and into a slice of a file-backed shared mmap: ``close()``
    and ``resize()`` (to another size or the same) raise ``BufferError`` while they are in
    flight, and the anonymous mapping is then dropped entirely.  The data lands (in the file
    too, through the shared mapping), and afterwards the file mapping closes."""
    ring = ctx.ring(8)
    (r1, w1), (r2, w2) = ctx.pipe(), ctx.pipe()
    anon = mmap.mmap(-1, PIPE_BUF)
    op1 = ring.read(r1, anon)
    with tempfile.TemporaryFile() as f:
        f.truncate(PIPE_BUF)
        shared = mmap.mmap(f.fileno(), PIPE_BUF)
        op2 = ring.read(r2, memoryview(shared)[1024:3072])
        ring.submit()
        for m in (anon, shared):
            ctx.raises(BufferError, m.close)
            ctx.raises(BufferError, m.resize, 2 * PIPE_BUF)
            ctx.raises(BufferError, m.resize, PIPE_BUF)
            assert not m.closed and len(m) == PIPE_BUF
        del anon
        gc.collect()
        ctx.spray(PIPE_BUF, 256)
        data1, data2 = _pattern(PIPE_BUF, 800), _pattern(2048, 801)
        os.write(w1, data1)
        os.write(w2, data2)
        _finish(ring, op1, op2)
        assert op1.result() == PIPE_BUF and op2.result() == 2048
        assert shared[1024:3072] == data2
        shared.flush()
        assert os.pread(f.fileno(), 2048, 1024) == data2
        shared.close()


@scenario()
def pinned_array_append_extend_refused(ctx: Context) -> None:
    """Every resizing method of ``array.array`` (append, extend, frombytes, fromlist, insert,
    pop, remove, ``del``, slice assignment of another length, ``+=``, ``*=``) is attempted while
    a read into the array is in flight: each raises ``BufferError`` and the length stays; the
    in-place ones (item assignment, byteswap, ``*= 1``) are allowed.  The data lands, and the
    array grows once the final CQE has arrived."""
    ring = ctx.ring(8)
    r, w = ctx.pipe()
    arr = array.array("I", [7] * (PIPE_BUF // 4))
    op = ring.read(r, arr)
    ring.submit()
    attempts: dict[str, Callable[[], Any]] = {
        "append": lambda: arr.append(1),
        "extend": lambda: arr.extend([1, 2]),
        "frombytes": lambda: arr.frombytes(b"\0" * 8),
        "fromlist": lambda: arr.fromlist([1]),
        "insert": lambda: arr.insert(0, 1),
        "pop": arr.pop,
        "remove": lambda: arr.remove(7),
        "del item": lambda: arr.__delitem__(0),
        "slice assignment": lambda: arr.__setitem__(slice(0, 2), array.array("I")),
        "+=": lambda: arr.__iadd__(array.array("I", [1])),
        "*=": lambda: arr.__imul__(2),
    }
    for what, attempt in attempts.items():
        ctx.raises(BufferError, attempt)
        assert len(arr) == PIPE_BUF // 4, f"{what} changed the length of a pinned array"
    arr[0] = 5
    arr.byteswap()
    arr *= 1
    data = _pattern(PIPE_BUF, 900)
    os.write(w, data)
    _finish(ring, op)
    assert op.result() == PIPE_BUF and arr.tobytes() == data
    arr.append(1)
    assert len(arr) == PIPE_BUF // 4 + 1


@scenario()
def numpy_arrays_refused_as_kernel_buffers(ctx: Context) -> None:
    """NumPy arrays (owning their memory, or views over a bytearray or an mmap, and memoryviews
    of them) are refused as read targets and as data to write by every buffer-taking operation,
    with ``TypeError`` and nothing queued: ``ndarray.resize(refcheck=False)`` reallocates under a
    live buffer export, so the kernel could be left writing into freed memory.  A refused
    ``readv`` leaves no export on the buffers before the NumPy one.  Reading into a bytearray
    that a NumPy view shares works: the view sees the kernel's data."""
    try:
        import numpy as np
    except ImportError:
        ctx.skip("numpy is not installed")
    ring = ctx.ring(16)
    r, w = ctx.pipe()
    a, _b = ctx.socketpair()
    before = ring.stats()
    owned = np.zeros(PIPE_BUF, np.uint8)
    backing = bytearray(PIPE_BUF)
    over_bytearray = np.frombuffer(backing, np.uint8)
    anon = mmap.mmap(-1, PIPE_BUF)
    over_mmap = np.frombuffer(anon, np.uint8)
    first = bytearray(16)
    for obj in (owned, owned.reshape(64, 64), over_bytearray, over_mmap, memoryview(owned),
                memoryview(over_bytearray)[16:]):
        ctx.raises(TypeError, ring.read, r, obj)
        ctx.raises(TypeError, ring.recv, a.fileno(), obj)
        ctx.raises(TypeError, ring.readv, r, [first, obj])
        ctx.raises(TypeError, ring.read_many, r, obj, [0], 64)
        ctx.raises(TypeError, ring.write, w, obj)
        ctx.raises(TypeError, ring.writev, w, [b"ok", obj])
    _nothing_queued(ring, before)
    first.extend(b"no export left")
    del over_bytearray, over_mmap, obj
    gc.collect()
    backing.extend(b"no export left")
    anon.close()

    target = bytearray(PIPE_BUF)
    view = np.frombuffer(target, np.uint8)
    op = ring.read(r, target)
    data = _pattern(PIPE_BUF, 1000)
    os.write(w, data)
    _finish(ring, op)
    assert op.result() == PIPE_BUF and view.tobytes() == data


@scenario()
def ctypes_arrays_refused_as_kernel_buffers(ctx: Context) -> None:
    """ctypes arrays (``ctypes.resize`` reallocates one under a live export), ctypes arrays laid
    over a bytearray with ``from_buffer``, and memoryviews of them are refused with
    ``TypeError`` by read, recv, readv, recvmsg, read_many, write and writev, with nothing
    queued and no export left on the other buffers of a refused vector."""
    ring = ctx.ring(16)
    r, w = ctx.pipe()
    a, _b = ctx.socketpair()
    before = ring.stats()
    plain = (ctypes.c_char * PIPE_BUF)()
    shared = bytearray(PIPE_BUF)
    overlay = (ctypes.c_uint8 * PIPE_BUF).from_buffer(shared)
    first = bytearray(16)
    for obj in (plain, overlay, memoryview(plain), memoryview(overlay)[8:]):
        ctx.raises(TypeError, ring.read, r, obj)
        ctx.raises(TypeError, ring.recv, a.fileno(), obj)
        ctx.raises(TypeError, ring.readv, r, [first, obj])
        ctx.raises(TypeError, ring.recvmsg, a.fileno(), [first, obj])
        ctx.raises(TypeError, ring.read_many, r, obj, [0], 64)
        ctx.raises(TypeError, ring.write, w, obj)
        ctx.raises(TypeError, ring.writev, w, [b"ok", obj])
    _nothing_queued(ring, before)
    first.extend(b"no export left")
    ctypes.resize(plain, 2 * PIPE_BUF)  # what the refusal protects against: it reallocates
    del obj, overlay
    gc.collect()
    shared.extend(b"no export left")


@scenario()
def bytearray_under_pinned_memoryview_resize_refused(ctx: Context) -> None:
    """A read into a memoryview of a bytearray: resizing the bytearray raises ``BufferError``
    (the view holds an export), and so does releasing the view.  Then the view and the
    bytearray are dropped (one pair), or only the view (another): the freed size is sprayed,
    the data arrives, the kept bytearray holds it and resizes after the final CQE, and no
    canary changed."""
    ring = ctx.ring(8)
    (r1, w1), (r2, w2) = ctx.pipe(), ctx.pipe()
    dropped, kept = bytearray(PIPE_BUF), bytearray(PIPE_BUF)
    views = [memoryview(dropped), memoryview(memoryview(kept))]
    ops = [ring.read(r1, views[0]), ring.read(r2, views[1])]
    ring.submit()
    for buf, view in zip((dropped, kept), views, strict=True):
        ctx.raises(BufferError, buf.extend, b"x")
        ctx.raises(BufferError, buf.clear)
        ctx.raises(BufferError, view.release)
    del dropped, views, view, buf
    gc.collect()
    ctx.spray(PIPE_BUF, 512)
    ctx.raises(BufferError, kept.extend, b"x")  # the dropped view, pinned by the read, holds on
    data1, data2 = _pattern(PIPE_BUF, 1100), _pattern(PIPE_BUF, 1101)
    os.write(w1, data1)
    os.write(w2, data2)
    _finish(ring, *ops)
    assert [op.result() for op in ops] == [PIPE_BUF, PIPE_BUF]
    assert kept == data2
    kept.extend(b"x")


@scenario()
def readonly_exporters_refused_as_read_targets(ctx: Context) -> None:
    """Read-only and unusable targets (``bytes``, a memoryview of bytes, a read-only view of a
    bytearray, a read-only anonymous mmap, a file mmap opened ``ACCESS_READ``, a non-contiguous
    view) are refused by read, recv, readv, recvmsg and read_many with ``TypeError``; a
    released memoryview with ``ValueError`` (as Python's own I/O does).  Nothing is queued or
    pinned, the writable buffers before the bad one in a vector keep no export, and the ring
    works normally afterwards."""
    ring = ctx.ring(16)
    r, w = ctx.pipe()
    a, _b = ctx.socketpair()
    before = ring.stats()
    released = memoryview(bytearray(64))
    released.release()
    ro_anon = mmap.mmap(-1, PIPE_BUF, prot=mmap.PROT_READ)
    first = bytearray(16)
    with tempfile.TemporaryFile() as f:
        f.write(b"r" * PIPE_BUF)
        f.flush()
        ro_file = mmap.mmap(f.fileno(), PIPE_BUF, access=mmap.ACCESS_READ)
        refused: list[tuple[Any, type[Exception]]] = [
            (b"immutable bytes" * 8, TypeError),
            (memoryview(b"immutable bytes" * 8), TypeError),
            (memoryview(bytearray(64)).toreadonly(), TypeError),
            (ro_anon, TypeError),
            (ro_file, TypeError),
            (memoryview(bytearray(64))[::2], TypeError),
            (released, ValueError),
        ]
        for obj, exc in refused:
            ctx.raises(exc, ring.read, r, obj)
            ctx.raises(exc, ring.recv, a.fileno(), obj)
            ctx.raises(exc, ring.readv, r, [first, obj])
            ctx.raises(exc, ring.recvmsg, a.fileno(), [first, obj])
            ctx.raises(exc, ring.read_many, r, obj, [0], 2)
        _nothing_queued(ring, before)
        first.extend(b"no export left")
        del refused, obj
        ro_file.close()
    ro_anon.close()
    assert ring.stats().pinned_bytes == 0
    target = bytearray(64)
    op = ring.read(r, target)
    os.write(w, b"still works".ljust(64, b"."))
    _finish(ring, op)
    assert op.result() == 64 and target.startswith(b"still works")


# -- results and cancels at the wrong moment ---------------------------------------------------

@scenario()
def pinned_read_result_before_completion_then_sticky(ctx: Context) -> None:
    """``result()`` (and a batch's ``results_or_errors()``) asked of reads still QUEUED, then
    SUBMITTED, raises ``OperationStateError`` without disturbing them; after the final CQE it
    gives the same answer every time: the byte count (data in the buffer), the same
    ``OSError`` for a failed read, ``OperationCancelledError`` for a cancelled one, the list of
    counts for a batch."""
    ring = ctx.ring(16)
    (r1, w1), (r2, w2), (r3, _w3) = ctx.pipe(), ctx.pipe(), ctx.pipe()
    buf = bytearray(64)
    op = ring.read(r1, buf)
    batch = ring.read_many(r2, bytearray(128), [0, 0], 64)
    assert op.state is OpState.QUEUED and batch.state is OpState.QUEUED
    ctx.raises(OperationStateError, op.result)
    ctx.raises(OperationStateError, batch.result)
    ctx.raises(OperationStateError, batch.results_or_errors)
    ring.submit()
    assert op.state is OpState.SUBMITTED and batch.state is OpState.SUBMITTED
    ctx.raises(OperationStateError, op.result)
    ctx.raises(OperationStateError, batch.result)
    ctx.raises(OperationStateError, batch.results_or_errors)
    assert op.state is OpState.SUBMITTED and not op.done()

    failed = ring.read(w1, bytearray(8))  # the write end of a pipe: EBADF from the kernel
    cancelled = ring.read(r3, bytearray(8))
    ring.submit()
    cancelled.cancel()
    data = _pattern(64, 1200)
    os.write(w1, data)
    os.write(w2, _pattern(128, 1201))
    _finish(ring, op, batch, failed, cancelled)
    for _ in range(2):
        assert op.result() == 64 and buf == data
        assert batch.result() == [64, 64] and batch.results_or_errors() == [64, 64]
        exc = ctx.raises(OSError, failed.result)
        assert isinstance(exc, OSError) and exc.errno == errno.EBADF, exc
        ctx.raises(OperationCancelledError, cancelled.result)
    assert (op.state, failed.state, cancelled.state) == (
        OpState.COMPLETED, OpState.FAILED, OpState.CANCELLED)


@scenario("op:ASYNC_CANCEL")
def double_cancel_of_pinned_read_and_cancel_after_completion(ctx: Context) -> None:
    """``cancel()`` twice (on a QUEUED read, a SUBMITTED read, a batch, a timeout) raises
    ``OperationStateError`` the second time; ``cancel()`` after the final CQE raises it too, and
    after ``ring.close()`` raises ``RingClosedError``.  A cancel that races data the kernel has
    already read (the CQE not reaped yet) ends either COMPLETED with the data in the buffer or
    CANCELLED with the data still in the pipe: no byte is lost either way."""
    ring = ctx.ring(16)
    (r1, _w1), (r2, w2), (r3, _w3) = ctx.pipe(), ctx.pipe(), ctx.pipe()
    queued = ring.read(r1, bytearray(64))
    queued.cancel()  # allowed on a QUEUED operation: the cancel request follows it in the SQ
    ctx.raises(OperationStateError, queued.cancel)
    submitted = ring.read(r1, bytearray(64))
    batch = ring.read_many(r3, bytearray(256), [0] * 4, 64)
    timer = ring.timeout(30.0)
    ring.submit()
    for op in (submitted, batch, timer):
        op.cancel()
        ctx.raises(OperationStateError, op.cancel)
    _finish(ring, queued, submitted, batch, timer)
    assert all(op.state is OpState.CANCELLED for op in (queued, submitted, batch, timer))
    for op in (queued, submitted, batch, timer):
        ctx.raises(OperationStateError, op.cancel)

    raced_buf = bytearray(64)
    raced = ring.read(r2, raced_buf)
    ring.submit()
    data = _pattern(64, 1300)
    os.write(w2, data)  # the kernel may complete the read now; its CQE is not reaped yet
    raced.cancel()
    _finish(ring, raced)
    if raced.state is OpState.COMPLETED:
        assert raced.result() == 64 and raced_buf == data and _pipe_holds(r2) == b""
    else:
        assert raced.state is OpState.CANCELLED and _pipe_holds(r2) == data
    ctx.raises(OperationStateError, raced.cancel)

    late = ring.read(r1, bytearray(64))
    ring.close()
    assert late.state is OpState.CANCELLED
    ctx.raises(saferring.RingClosedError, late.cancel)


@scenario("op:ASYNC_CANCEL")
def cancel_read_whose_buffer_was_dropped(ctx: Context) -> None:
    """Reads whose buffers were dropped at once (only the pins hold them) are cancelled, then
    half of the operations are dropped too; garbage is collected, the freed size sprayed, and
    data is written afterwards.  Every read ends CANCELLED (raising ``OperationCancelledError``,
    refusing a second cancel), none consumed a byte (the pipe holds exactly what was written),
    and no canary changed."""
    ring = ctx.ring(32)
    r, w = ctx.pipe()
    ops = [ring.read(r, bytearray(PIPE_BUF)) for _ in range(8)]
    ring.submit()
    gc.collect()
    for op in ops:
        op.cancel()
    kept = ops[::2]
    del ops, op
    gc.collect()
    ctx.spray(PIPE_BUF, 512)
    data = b"".join(_pattern(PIPE_BUF, 1400 + i) for i in range(4))
    for i in range(0, len(data), PIPE_BUF):
        os.write(w, data[i:i + PIPE_BUF])
    done = _settle(ring)
    reads = [op for op in done if op.kind == "read"]
    assert len(reads) == 8 and all(op.state is OpState.CANCELLED for op in reads)
    for op in kept:
        ctx.raises(OperationCancelledError, op.result)
        ctx.raises(OperationStateError, op.cancel)
    assert _pipe_holds(r) == data


# -- saferring's own buffers -----------------------------------------------------------------

@scenario("op:READ_FIXED")
def pool_buffer_release_refused_during_read_fixed(ctx: Context) -> None:
    """A leased pool buffer with a ``read_fixed`` in flight: ``release()``, leaving ``with buf:``
    normally, ``view()``, ``fill()``, ``pool.close()`` and handing it to a second read each
    raise ``BufferBusyError``, and nothing is queued.  The data then lands in the buffer
    (``FILLED`` with the count), after which it releases and the pool closes."""
    ring = ctx.ring(16)
    r, w = ctx.pipe()
    _r2, w2 = ctx.pipe()
    pool = BufferPool(ring, 2, PIPE_BUF)
    buf = pool.lease()
    op = ring.read_fixed(r, buf)
    ring.submit()
    before = ring.stats()

    def leave_with_normally() -> None:
        with buf:
            pass

    for attempt in (buf.release, leave_with_normally, buf.view, lambda: buf.fill(b"x"),
                    pool.close, lambda: ring.read_fixed(r, buf), lambda: ring.read(r, buf),
                    lambda: ring.write_fixed(w2, buf)):
        ctx.raises(BufferBusyError, attempt)
    _nothing_queued(ring, before)
    assert buf.state is BufferState.IN_FLIGHT and not pool.closed
    assert pool.available() == 1
    data = _pattern(1000, 1500)
    os.write(w, data)
    _finish(ring, op)
    assert op.result() == 1000
    assert buf.state is BufferState.FILLED and buf.tobytes() == data
    buf.release()
    assert pool.available() == 2
    pool.close()


@scenario("op:READ_FIXED")
def pool_buffer_dropped_during_read_fixed_returns_later(ctx: Context) -> None:
    """Every buffer of a pool is leased and read into with ``read_fixed``; the handles are
    dropped (or left by an exception inside ``with pool.lease()``) while the reads are in
    flight.  The pool hands none of them out again before the reads end (``lease()`` raises
    ``BufferBusyError``); after the data arrives every buffer is back, and re-leased buffers
    are ``FREE`` and read new data correctly."""
    ring = ctx.ring(16)
    pipes = [ctx.pipe() for _ in range(4)]
    pool = BufferPool(ring, 4, PIPE_BUF)
    with _gc_pressure():
        for r, _w in pipes[:3]:
            ring.read_fixed(r, pool.lease())  # the handle is dropped at once
        try:
            with pool.lease() as buf:
                ring.read_fixed(pipes[3][0], buf)
                raise KeyError("leave the block with the read in flight")
        except KeyError:
            pass
        del buf
        ring.submit()
        gc.collect()
        assert pool.available() == 0
        ctx.raises(BufferBusyError, pool.lease)
        ctx.raises(BufferBusyError, pool.close)
        for i, (_r, w) in enumerate(pipes):
            os.write(w, _pattern(100 + i, 1600 + i))
        done = _settle(ring)
    assert sorted(op.result() for op in done) == [100, 101, 102, 103]
    assert pool.available() == 4
    fresh = [pool.lease() for _ in range(4)]
    assert all(b.state is BufferState.FREE and b.nbytes == 0 for b in fresh)
    ops = [ring.read_fixed(r, b) for (r, _w), b in zip(pipes, fresh, strict=True)]
    for i, (_r, w) in enumerate(pipes):
        os.write(w, _pattern(200 + i, 1700 + i))
    _finish(ring, *ops)
    for i, b in enumerate(fresh):
        assert b.tobytes() == _pattern(200 + i, 1700 + i)
        b.release()
    pool.close()


@scenario("op:WRITE_FIXED")
def pool_close_refused_during_write_fixed(ctx: Context) -> None:
    """A ``write_fixed`` waits on a full pipe: ``pool.close()``, ``release()`` and ``fill()``
    raise ``BufferBusyError``.  Once the pipe drains the write completes with the buffer's exact
    bytes; the pool then closes with the buffer still leased, after which that buffer stays
    readable but ``read_fixed`` refuses it (``OperationStateError``).  A second write_fixed on a
    full pipe is then cut short by ``ring.close()``, which cancels it, waits for its CQE and
    closes the second pool: the pipe holds only what was there before."""
    ring = ctx.ring(16)
    r, w = ctx.pipe()
    filled = _fill_pipe(w)
    pool = BufferPool(ring, 2, PIPE_BUF)
    buf = pool.lease()
    data = _pattern(PIPE_BUF, 1800)
    buf.fill(data)
    op = ring.write_fixed(w, buf)
    ring.submit()
    for attempt in (pool.close, buf.release, lambda: buf.fill(b"x")):
        ctx.raises(BufferBusyError, attempt)
    assert op.state is OpState.SUBMITTED and not pool.closed
    # Make room: the write goes on (its data may follow at once, so read only the filler).
    assert os.read(r, filled) == b"\xee" * filled
    _finish(ring, op)
    assert op.result() == PIPE_BUF and _pipe_holds(r) == data
    pool.close()  # the buffer is leased but idle: allowed
    assert buf.tobytes() == data
    ctx.raises(OperationStateError, ring.read_fixed, r, buf)
    buf.release()

    second = BufferPool(ring, 1, PIPE_BUF)
    buf2 = second.lease()
    buf2.fill(b"never written")
    filled = _fill_pipe(w)
    blocked = ring.write_fixed(w, buf2)
    ring.submit()
    ring.close()
    assert blocked.state is OpState.CANCELLED and second.closed
    assert _pipe_holds(r) == b"\xee" * filled
    buf2.release()


@scenario("op:READ_FIXED")
def pool_close_refused_during_read_fixed_many(ctx: Context) -> None:
    """``read_fixed_many`` holds four leased pool buffers in flight on an empty pipe:
    ``pool.close()`` must raise ``BufferBusyError`` (docs/buffers.md: it "refuses while a buffer
    is in flight") and leave the pool open, exactly as it does for one ``read_fixed``.  The data
    then lands, one block per buffer, and the pool closes after the release.  (A helper thread
    writes the data after two seconds if the main thread is stuck: a kernel that waits for
    registered buffers to go idle on unregistration would otherwise never return.)"""
    ring = ctx.ring(16)
    r, w = ctx.pipe()
    pool = BufferPool(ring, 4, PIPE_BUF)
    bufs = [pool.lease() for _ in range(4)]
    blocks = [_pattern(1024, 1900 + i) for i in range(4)]
    batch = ring.read_fixed_many(r, bufs, [0] * 4, 1024)
    ring.submit()
    go = threading.Event()

    def feed() -> None:
        go.wait(2.0)
        os.write(w, b"".join(blocks))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert all(b.state is BufferState.IN_FLIGHT for b in bufs)
        ctx.raises(BufferBusyError, pool.close)
        assert not pool.closed
    finally:
        go.set()
        feeder.join(_DEADLINE)
    _finish(ring, batch)
    assert batch.result() == [1024] * 4
    assert sorted(b.tobytes() for b in bufs) == sorted(blocks)
    for b in bufs:
        b.release()
    pool.close()


@scenario("op:RECV")
def bufring_close_refused_during_multishot_recv(ctx: Context) -> None:
    """A multishot receive picks from a ``BufferRing`` and the caller holds the buffers it
    filled: ``close()`` on the buffer ring raises ``OperationStateError`` while the receive runs
    (and the receive goes on delivering).  After the receive is cancelled the buffer ring
    closes; the held buffers keep their bytes, release without error after the close, and data
    sent meanwhile reaches a receive on a new buffer ring, in order (for each mode the kernel
    has)."""
    ring = ctx.ring(32)
    a, b = ctx.socketpair()
    sent = bytearray()
    received = bytearray()
    for mode in _buffer_ring_modes():
        buffers = BufferRing(ring, 4, PIPE_BUF, mode=mode)
        op = ring.recv_multishot(a.fileno(), buffers)
        held: list[Buffer] = []
        for i in range(3):
            chunk = _pattern(200 + i, 2000 + i)
            b.sendall(chunk)
            sent += chunk
            held += _values(ring, op, 1)
        ctx.raises(OperationStateError, buffers.close)
        assert not buffers.closed
        chunk = _pattern(333, 2010)
        b.sendall(chunk)
        sent += chunk
        held += _values(ring, op, 1)
        op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        held += op.take()
        buffers.close()
        assert buffers.closed
        for buf in held:
            assert buf.state is BufferState.FILLED
            received += buf.tobytes()
            buf.release()
    late = _pattern(500, 2020)
    b.sendall(late)
    sent += late
    buffers = BufferRing(ring, 2, PIPE_BUF)
    last = ring.recv(a.fileno(), buffers)
    _finish(ring, last)
    with last.result() as buf:
        received += buf.tobytes()
    assert received == sent
    buffers.close()


@scenario("op:RECV")
def bufring_buffer_outlives_ring_close(ctx: Context) -> None:
    """Buffers a ``BufferRing`` handed out (one from a single receive with a live view, two taken
    from a multishot receive, and one value never taken) are kept while ``ring.close()`` cancels
    the multishot receive and tears the ring down.  Afterwards the held buffers still read back
    exactly what was received, the view stays valid, the untaken value is still there,
    releasing is refused while the view lives (``BufferBusyError``) and allowed after, and
    dropping everything frees it without a crash."""
    ring = ctx.ring(32)
    a, b = ctx.socketpair()
    c, d = ctx.socketpair()
    buffers = BufferRing(ring, 8, PIPE_BUF)
    one = _pattern(123, 2100)
    b.sendall(one)
    single = ring.recv(a.fileno(), buffers)
    _finish(ring, single)
    first = single.result()
    view = first.view()
    stream = ring.recv_multishot(c.fileno(), buffers)
    chunks = [_pattern(300 + i, 2110 + i) for i in range(3)]
    taken: list[Buffer] = []
    for chunk in chunks[:2]:
        d.sendall(chunk)
        taken += _values(ring, stream, 1)
    d.sendall(chunks[2])
    deadline = time.monotonic() + _DEADLINE
    while not stream.pending():  # the third value arrives but is not taken
        assert time.monotonic() < deadline, "the third chunk never arrived"
        ring.wait(1, timeout=0.1)
    ring.close()
    assert buffers.closed and stream.state is OpState.CANCELLED
    assert bytes(view) == one and first.tobytes() == one
    assert [t.tobytes() for t in taken] == chunks[:2]
    untaken = stream.take()
    assert [t.tobytes() for t in untaken] == chunks[2:]
    ctx.raises(BufferBusyError, first.release)
    view.release()
    for buf in [first, *taken, *untaken]:
        buf.release()
        assert buf.state is BufferState.RELEASED
    del first, taken, untaken, buf, single, stream, buffers
    gc.collect()


def _socket_waiting(sock: socket.socket) -> int:
    """How many bytes wait to be received on ``sock`` (``FIONREAD``)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(raw, "little", signed=True)


def _starve(ring: saferring.Ring, sock: socket.socket, waiting: int) -> None:
    """Reap until exactly ``waiting`` bytes are left in ``sock`` (a receive took the rest)."""
    deadline = time.monotonic() + _DEADLINE
    while _socket_waiting(sock) != waiting:
        assert time.monotonic() < deadline, (
            f"{_socket_waiting(sock)} bytes wait in the socket, expected {waiting}")
        ring.wait(1, timeout=0.05)


@scenario("op:RECV")
def dropped_multishot_recv_holds_every_buffer_until_close(ctx: Context) -> None:
    """A multishot receive and its ``BufferRing`` lose every reference (the collector running at
    every allocation) while a stream arrives: the receive fills every buffer, keeps the values
    nobody will take, and then waits for a buffer, consuming nothing more.  ``ring.close()``
    ends it; afterwards the socket still holds exactly the bytes after the last buffer's worth
    (no byte lost or taken twice), the operation is freed and no canary changed."""
    ring = ctx.ring(32)
    a, b = ctx.socketpair()
    count, size = 4, 1024
    data = _pattern(2 * count * size, 2900)
    with _gc_pressure():
        op_ref = weakref.ref(ring.recv_multishot(a.fileno(), BufferRing(ring, count, size)))
        ring.submit()
        gc.collect()
        ctx.spray(size, 256)
        b.sendall(data)
        _starve(ring, a, len(data) - count * size)
        assert op_ref() is not None and ring.stats().in_flight == 1
        ring.close()
    gc.collect()
    assert op_ref() is None, "a finished receive outlived the ring"
    assert _socket_holds(a) == data[count * size:]


@scenario("op:RECV", "op:ASYNC_CANCEL")
def bufring_starved_recv_cancelled_by_cancel_fd_and_cancel_all(ctx: Context) -> None:
    """A multishot receive that has used every buffer of its ``BufferRing`` waits for one to
    come back (still ``SUBMITTED``, counted in flight, but with no request in the kernel).
    ``cancel_fd`` on its descriptor, or ``cancel_all()`` ("a cancel of every request in
    flight"), must end it as they end the same receive while it is armed (``CANCELLED``):
    releasing the buffers afterwards must not bring it back to consume more of the stream."""
    ring = ctx.ring(32)
    for how in ("cancel_fd", "cancel_all"):
        a, b = ctx.socketpair()
        buffers = BufferRing(ring, 2, 1024)
        op = ring.recv_multishot(a.fileno(), buffers)
        data = _pattern(4096, 2950)
        b.sendall(data)
        _starve(ring, a, 2048)
        held = _values(ring, op, 2)
        cancel = ring.cancel_fd(a.fileno()) if how == "cancel_fd" else ring.cancel_all()
        _finish(ring, cancel)
        try:
            assert op.done() and op.state is OpState.CANCELLED, (
                f"{how} left a receive that waits for a buffer running: {op!r}")
        finally:
            for buf in held:
                buf.release()
            if not op.done():  # so that the ring can be checked and closed
                op.cancel()
                _finish(ring, op)
        assert _socket_holds(a) == data[2048:]
        buffers.close()


@scenario("op:RECV")
def buffer_view_outlives_release_attempt(ctx: Context) -> None:
    """A view taken from a filled ``Buffer`` blocks ``release()`` and every hand-over to the
    kernel (``BufferBusyError``) and stays valid.  Its handle is then dropped with the view
    alive: a pool does not lease that buffer again, and a buffer ring does not give it back to
    the kernel, so twenty more chunks streaming through a two-buffer ring all use the other
    buffer and the view's bytes never change.  Once the view is released the buffer returns
    (to the pool; to the kernel, which picks it again)."""
    ring = ctx.ring(32)
    r, w = ctx.pipe()
    pool = BufferPool(ring, 2, PIPE_BUF)
    leased = pool.lease()
    os.write(w, b"pool bytes")
    _finish(ring, ring.read_fixed(r, leased))
    pool_view = leased.view()
    ctx.raises(BufferBusyError, leased.release)
    ctx.raises(BufferBusyError, ring.read_fixed, r, leased)
    ctx.raises(BufferBusyError, ring.read, r, leased)
    del leased
    gc.collect()
    assert pool.available() == 1 and bytes(pool_view) == b"pool bytes"
    other = pool.lease()
    ctx.raises(BufferBusyError, pool.lease)
    other.release()
    pool_view.release()
    assert pool.available() == 2
    pool.close()

    a, b = ctx.socketpair()
    for mode in _buffer_ring_modes():
        buffers = BufferRing(ring, 2, PIPE_BUF, mode=mode)
        stream = ring.recv_multishot(a.fileno(), buffers)
        first_chunk = _pattern(100, 2200)
        b.sendall(first_chunk)
        (held,) = _values(ring, stream, 1)
        view = held.view()
        ctx.raises(BufferBusyError, held.release)
        kept_index = held.index
        del held
        gc.collect()
        for i in range(20):
            chunk = _pattern(150 + i, 2210 + i)
            b.sendall(chunk)
            (got,) = _values(ring, stream, 1)
            assert got.index != kept_index, "the kernel was given a buffer with a live view"
            assert got.tobytes() == chunk and bytes(view) == first_chunk
            got.release()
        view.release()
        seen = set()
        for i in range(8):
            chunk = _pattern(90 + i, 2240 + i)
            b.sendall(chunk)
            (got,) = _values(ring, stream, 1)
            assert got.tobytes() == chunk
            seen.add(got.index)
            got.release()
        assert kept_index in seen, "the buffer never came back after its view was released"
        stream.cancel()
        _finish(ring, stream)
        buffers.close()


@scenario("op:RECV")
def buffer_lent_to_two_operations_refused(ctx: Context) -> None:
    """A ``Buffer`` already in flight is refused (``BufferBusyError``, nothing queued) by a second
    read, write, recv, send, read_fixed and read_fixed_many; a buffer listed twice in one
    ``read_fixed_many`` raises ``ValueError`` and stays usable; a pool buffer whose whole view
    is the target of a plain read cannot be released or lent (the operation holds the view)
    until that read ends.  Each read's data lands in its own buffer."""
    ring = ctx.ring(32)
    (r1, w1), (r2, w2), (r3, w3), (r4, w4) = (ctx.pipe() for _ in range(4))
    a, _b = ctx.socketpair()
    standalone = Buffer(PIPE_BUF)
    pool = BufferPool(ring, 3, PIPE_BUF)
    pooled, twice, viewed = pool.lease(), pool.lease(), pool.lease()
    ops = [ring.read(r1, standalone), ring.read_fixed(r2, pooled)]
    ring.submit()
    before = ring.stats()
    for buf in (standalone, pooled):
        ctx.raises(BufferBusyError, ring.read, r3, buf)
        ctx.raises(BufferBusyError, ring.write, w3, buf)
        ctx.raises(BufferBusyError, ring.recv, a.fileno(), buf)
        ctx.raises(BufferBusyError, ring.send, a.fileno(), buf)
    ctx.raises(BufferBusyError, ring.read_fixed, r3, pooled)
    ctx.raises(BufferBusyError, ring.read_fixed_many, r3, [twice, pooled], [0, 0])
    ctx.raises(ValueError, ring.read_fixed_many, r3, [twice, twice], [0, 0])
    _nothing_queued(ring, before)
    assert twice.state is BufferState.FREE
    ops.append(ring.read_fixed(r3, twice))

    whole = viewed.view(whole=True)
    ops.append(ring.read(r4, whole[:PIPE_BUF]))  # a plain read into the mapping, via a view
    del whole
    ctx.raises(BufferBusyError, viewed.release)
    ctx.raises(BufferBusyError, ring.read_fixed, r4, viewed)
    data = [_pattern(64 * (i + 1), 2300 + i) for i in range(4)]
    for w, chunk in zip((w1, w2, w3, w4), data, strict=True):
        os.write(w, chunk)
    _finish(ring, *ops)
    assert [op.result() for op in ops] == [len(chunk) for chunk in data]
    assert standalone.tobytes() == data[0]
    assert pooled.tobytes() == data[1]
    assert twice.tobytes() == data[2]
    assert viewed.state is BufferState.FREE  # a plain read through a view does not mark it
    del ops
    gc.collect()
    with viewed.view(whole=True) as v:
        assert bytes(v[:len(data[3])]) == data[3]
    for buf in (standalone, pooled, twice, viewed):
        buf.release()
    pool.close()


@scenario()
def same_bytearray_target_of_two_reads(ctx: Context) -> None:
    """One bytearray is the target of two reads in flight at once (itself, and an overlapping
    memoryview slice of it); saferring does not refuse this (each read holds its own export;
    which bytes win is the caller's race).  The first read's final CQE must not unpin the
    buffer while the second is in flight (resizing still raises ``BufferError``); each read's
    bytes land where it was aimed, and once both ended the bytearray resizes."""
    ring = ctx.ring(8)
    (r1, w1), (r2, w2) = ctx.pipe(), ctx.pipe()
    buf = bytearray(PIPE_BUF)
    whole = ring.read(r1, buf)
    part = ring.read(r2, memoryview(buf)[1024:2048])
    ring.submit()
    first = _pattern(PIPE_BUF, 2400)
    os.write(w1, first)
    _finish(ring, whole)
    assert whole.result() == PIPE_BUF and buf == first
    ctx.raises(BufferError, buf.extend, b"x")  # the slice's read still holds an export
    gc.collect()
    ctx.raises(BufferError, buf.clear)
    second = _pattern(1024, 2401)
    os.write(w2, second)
    _finish(ring, part)
    assert part.result() == 1024
    assert buf[:1024] == first[:1024] and buf[1024:2048] == second and buf[2048:] == first[2048:]
    buf.extend(b"x")


@scenario("op:RECV", "op:READ_FIXED")
def ring_close_with_dropped_reads_in_flight(ctx: Context) -> None:
    """Reads of every buffer kind (bytearray, readv, recv, read_many, read_fixed into a pool
    buffer, a multishot receive on a buffer ring) are in flight with every reference dropped
    when ``ring.close()`` is called: it cancels them, waits for each final CQE and returns; the
    freed sizes are sprayed, then data is written.  Nothing was consumed (every byte is still
    in the pipe and the socket) and no canary changed."""
    ring = ctx.ring(64)
    r, w = ctx.pipe()
    a, b = ctx.socketpair()
    c, d = ctx.socketpair()
    pool = BufferPool(ring, 2, PIPE_BUF)
    buffers = BufferRing(ring, 4, PIPE_BUF)
    with _gc_pressure():
        ring.read(r, bytearray(PIPE_BUF))
        ring.readv(r, [bytearray(100), bytearray(PIPE_BUF - 100)])
        ring.read_many(r, bytearray(PIPE_BUF), [0] * 4, 1024)
        ring.read_fixed(r, pool.lease())
        ring.recv(a.fileno(), bytearray(PIPE_BUF))
        ring.recv_multishot(c.fileno(), buffers)
        ring.submit()
        del pool, buffers
        gc.collect()
        ring.close()
        ctx.spray(PIPE_BUF, 512)
        ctx.spray(100, 256)
    pipe_data, sock_data, stream_data = (_pattern(PIPE_BUF, 2500), _pattern(777, 2501),
                                         _pattern(555, 2502))
    os.write(w, pipe_data)
    b.sendall(sock_data)
    d.sendall(stream_data)
    assert _pipe_holds(r) == pipe_data
    assert _socket_holds(a) == sock_data and _socket_holds(c) == stream_data


class _Keeper:
    """Holds a library buffer in a reference cycle; its finaliser resurrects the handle into
    ``kept``."""

    kept: list[Buffer] = []

    def __init__(self, buf: Buffer) -> None:
        self.me = self
        self.buf = buf

    def __del__(self) -> None:
        self.kept.append(self.buf)



def _kept_reads(ring: saferring.Ring, pool: BufferPool, pipes: list[tuple[int, int]]) -> None:
    """A read per pipe into a pool buffer (``read_fixed``) or a standalone one, alternately,
    each buffer held only by a reference cycle (:class:`_Keeper`)."""
    for i, (r, _w) in enumerate(pipes):
        buf = pool.lease() if i % 2 else Buffer(PIPE_BUF)
        if i % 2:
            ring.read_fixed(r, buf)
        else:
            ring.read(r, buf)
        _Keeper(buf)

@scenario("op:READ_FIXED")
def library_buffers_in_collected_cycles(ctx: Context) -> None:
    """Standalone and pool ``Buffer``s are reachable only from reference cycles whose finaliser
    resurrects the handle.  Collected while their reads are in flight (collector at every
    allocation), the handles come back ``IN_FLIGHT`` (refusing ``view()``), receive their data
    and release normally.  Collected after their reads ended, the buffers' own finalisers run
    in the same collection: the resurrected handles are ``RELEASED`` and refuse every access
    (``OperationStateError``) while the pool leases their memory again, and the new leases
    read new data correctly."""
    ring = ctx.ring(32)
    pipes = [ctx.pipe() for _ in range(4)]
    pool = BufferPool(ring, 2, PIPE_BUF)
    kept = _Keeper.kept
    with _gc_pressure():
        _kept_reads(ring, pool, pipes)
        ring.submit()
        gc.collect()
        assert len(kept) == 4 and all(b.state is BufferState.IN_FLIGHT for b in kept)
        for b in kept:
            ctx.raises(BufferBusyError, b.view)
        for i, (_r, w) in enumerate(pipes):
            os.write(w, _pattern(500 + i, 2600 + i))
        done = _settle(ring)
    assert sorted(op.result() for op in done) == [500 + i for i in range(4)]
    datas = sorted(b.tobytes() for b in kept)
    assert datas == sorted(_pattern(500 + i, 2600 + i) for i in range(4))
    for b in kept:
        b.release()
    kept.clear()
    assert pool.available() == 2

    gc.disable()  # the cycles below must outlive their reads: collected only once those ended
    try:
        _kept_reads(ring, pool, pipes)
        for i, (_r, w) in enumerate(pipes):
            os.write(w, _pattern(600 + i, 2700 + i))
        done = _settle(ring)
        assert sorted(op.result() for op in done) == [600 + i for i in range(4)]
        assert not kept
    finally:
        gc.enable()
    gc.collect()
    assert len(kept) == 4
    for zombie in kept:
        assert zombie.state is BufferState.RELEASED
        ctx.raises(OperationStateError, zombie.view)
        ctx.raises(OperationStateError, zombie.tobytes)
        ctx.raises(OperationStateError, zombie.release)
        ctx.raises(OperationStateError, zombie.fill, b"x")
        ctx.raises(OperationStateError, ring.read, pipes[0][0], zombie)
    assert pool.available() == 2
    fresh = [pool.lease(), pool.lease()]
    ops = [ring.read_fixed(r, b) for (r, _w), b in zip(pipes, fresh, strict=False)]
    for i, (_r, w) in enumerate(pipes[:2]):
        os.write(w, _pattern(64 + i, 2800 + i))
    _finish(ring, *ops)
    for i, b in enumerate(fresh):
        assert b.tobytes() == _pattern(64 + i, 2800 + i)
        b.release()
    for zombie in kept:  # still dead after their memory was leased and filled again
        ctx.raises(OperationStateError, zombie.view)
    kept.clear()
    pool.close()
