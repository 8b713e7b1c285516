"""Provided buffer groups (``BufferRing``) and the receives/reads that pick from them, on the real
kernel: multishot recv over 127.0.0.1 TCP and AF_UNIX, read_multishot on pipes, single
recv/read with buffer selection, starvation (-ENOBUFS) and re-arming, cancellation in every
state, ring teardown, buffers dropped without release, misuse, and multishot accept."""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import saferring
from saferring import BufferState, OpState
from saferring.features import kernel_can
from saferring.operation import SelectedBufferOperation, SelectedBuffersOperation

from _helpers import kernel_lacks

LOCAL4 = "127.0.0.1"
STREAM = 8 << 20  # bytes pushed through the tiny rings
COUNT, SIZE = 4, 4096  # the tiny ring: four 4 KiB buffers

MODES = [pytest.param("ring", marks=pytest.mark.needs("can:BUF_RING")), "provide"]
SINGLE = [pytest.param(False, id="multishot"), pytest.param(True, id="single_shot")]


# -- helpers -------------------------------------------------------------------------------

def _finish(ring: saferring.Ring, op: saferring.Operation[Any], timeout: float = 5.0) -> None:
    """Reap until ``op`` has its final CQE, failing (not hanging) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not op.done():
        left = deadline - time.monotonic()
        assert left > 0, f"{op!r} did not finish within {timeout} s"
        ring.wait(1, timeout=min(left, 0.5))


def _run(ring: saferring.Ring, op: saferring.Operation[Any], timeout: float = 5.0) -> Any:
    """Like ring.run(op), but bounded."""
    _finish(ring, op, timeout)
    return op.result()


def _wait_for(ring: saferring.Ring, cond: Any, what: str, timeout: float = 5.0) -> None:
    """Reap until ``cond()`` holds, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    polls = 0
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        _poll(ring, polls)
        polls += 1


def _poll(ring: saferring.Ring, polls: int) -> None:
    """Submit and collect completions, blocking only a little.  A request that runs out of
    buffers is not "ready" for wait() (it produced nothing), so conditions about it are polled:
    a few non-blocking passes first, then short waits."""
    if polls < 20:
        ring.wait(0)
    else:
        ring.wait(1, timeout=0.005)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


@contextlib.contextmanager
def _tcp() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected 127.0.0.1 TCP pair (sender, receiver); the receiver stays blocking (the ring
    reads it), the sender has a timeout so a stuck test cannot block its thread forever."""
    with socket.socket() as lst:
        lst.bind((LOCAL4, 0))
        lst.listen(1)
        tx = socket.create_connection(lst.getsockname(), timeout=10)
        rx, _ = lst.accept()
    rx.settimeout(None)
    try:
        yield tx, rx
    finally:
        tx.close()
        rx.close()


@contextlib.contextmanager
def _unix() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected AF_UNIX stream socketpair (sender, receiver)."""
    tx, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    tx.settimeout(10)
    try:
        yield tx, rx
    finally:
        tx.close()
        rx.close()


class _Sender:
    """Sends ``data`` on ``sock`` from a thread, then shuts down the write side (EOF)."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.error: BaseException | None = None
        self._sock = sock
        self._data = data
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._sock.sendall(self._data)
            self._sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive(), "the sender thread is stuck"
        assert self.error is None, f"the sender failed: {self.error!r}"


class _PipeWriter:
    """Writes ``data`` into pipe end ``wfd`` from a thread, then closes it (EOF).  The thread
    owns ``wfd``: the test never closes it."""

    def __init__(self, wfd: int, data: bytes) -> None:
        self.error: BaseException | None = None
        self._wfd = wfd
        self._data = data
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            view = memoryview(self._data)
            while view:
                view = view[os.write(self._wfd, view[:65536]):]
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            os.close(self._wfd)

    def join(self) -> None:
        self._thread.join(10)
        assert not self._thread.is_alive(), "the writer thread is stuck"
        assert self.error is None, f"the writer failed: {self.error!r}"


def _consume(ring: saferring.Ring, op: SelectedBuffersOperation, hold: int,
             timeout: float = 15.0) -> tuple[bytes, int]:
    """Collect every byte ``op`` delivers until it ends, holding buffers until ``hold`` are out
    (all of a ring of ``hold``: the request must then wait for one) before releasing them.
    Returns the bytes and how many times the request was seen waiting for a buffer."""
    deadline = time.monotonic() + timeout
    got = bytearray()
    held: list[saferring.Buffer] = []
    starved = 0
    try:
        while True:
            assert time.monotonic() < deadline, f"stream not finished within {timeout} s: {op!r}"
            for buf in op.take():
                assert buf.state is BufferState.FILLED and 0 < buf.nbytes <= buf.size
                held.append(buf)
            if op.done() and not op.pending():
                break
            if len(held) >= hold:
                # Every buffer is ours: the request can only wait (-ENOBUFS, re-armed later).
                polls = 0
                while not op._starved and not op.done():
                    assert time.monotonic() < deadline, f"never starved: {op!r}"
                    _poll(ring, polls)
                    polls += 1
                if op._starved:
                    starved += 1
                    assert op.state is OpState.SUBMITTED and not op.done()
                    assert op.pending() == 0  # nothing can arrive without a buffer
                for buf in held:
                    got += buf.tobytes()
                    buf.release()
                held = []
            else:
                ring.wait(1, timeout=0.2)
    finally:
        for buf in held:
            got += buf.tobytes()
            buf.release()
    return bytes(got), starved


def _recv_all_buffers(ring: saferring.Ring, br: saferring.BufferRing) -> None:
    """Prove all of ``br``'s buffers are with the kernel: ``br.count`` single recvs, each held
    until the end, must all complete with a full buffer (a missing one would starve the last)."""
    with _unix() as (tx, rx):
        pattern = bytes(range(256)) * (br.size // 256 + 1)
        tx.sendall(pattern[:br.size] * br.count)
        held: list[saferring.Buffer] = []
        try:
            for _ in range(br.count):
                op = ring.recv(rx, br)
                assert type(op) is SelectedBufferOperation
                buf = _run(ring, op)
                assert buf is not None and buf.nbytes == br.size, f"got {buf!r}"
                assert buf.tobytes() == pattern[:br.size]
                held.append(buf)
            assert len({b.index for b in held}) == br.count
        finally:
            for buf in held:
                buf.release()


def _starve(ring: saferring.Ring, op: SelectedBuffersOperation,
            tx: socket.socket, br: saferring.BufferRing) -> list[saferring.Buffer]:
    """Send more than ``br`` can hold, take every buffer and keep them until ``op`` waits for
    one (starved).  Returns the held buffers."""
    tx.sendall(os.urandom(br.size * (br.count + 2)))
    held: list[saferring.Buffer] = []

    def starved() -> bool:
        held.extend(op.take())
        return bool(op._starved)

    _wait_for(ring, starved, "the request to run out of buffers")
    held.extend(op.take())
    assert len(held) == br.count
    assert op.state is OpState.SUBMITTED and not op.done()
    return held


# -- streams through a tiny ring -------------------------------------------------------------

@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_recv_multishot_tcp_stream_through_tiny_ring(ring: saferring.Ring, mode: str,
                                                     single_shot: bool) -> None:
    """8 MiB over 127.0.0.1 TCP through four 4 KiB buffers, all held at times (the request
    starves and is re-armed): every byte arrives in order and the op ends COMPLETED at EOF."""
    data = os.urandom(STREAM)
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    assert br.mode == mode and br.count == COUNT and br.size == SIZE and not br.closed
    with _tcp() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        assert type(op) is SelectedBuffersOperation
        assert op.single_shot is (single_shot or not kernel_can("RECV_MULTISHOT"))
        sender = _Sender(tx, data)
        got, starved = _consume(ring, op, COUNT)
        sender.join()
    assert len(got) == len(data)
    assert got == data
    assert starved > 0
    assert op.state is OpState.COMPLETED
    assert op.result() == [] and op.take() == []
    br.close()
    assert br.closed


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_recv_multishot_socketpair_stream_through_tiny_ring(ring: saferring.Ring, mode: str,
                                                            single_shot: bool) -> None:
    """The same 8 MiB stream over an AF_UNIX socketpair: complete, in order, COMPLETED at EOF,
    with the buffers all back in the kernel afterwards."""
    data = os.urandom(STREAM)
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        sender = _Sender(tx, data)
        got, starved = _consume(ring, op, COUNT)
        sender.join()
    assert got == data
    assert starved > 0
    assert op.state is OpState.COMPLETED
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_recv_multishot_iteration_releasing_each(ring: saferring.Ring, mode: str) -> None:
    """``for buf in op`` yields every chunk in order and stops at EOF (COMPLETED)."""
    data = os.urandom(1 << 20)
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        sender = _Sender(tx, data)
        # A watchdog: if the stream stalls, EOF ends the loop (and the comparison fails).
        watchdog = threading.Timer(10, lambda: tx.shutdown(socket.SHUT_RDWR))
        watchdog.start()
        got = bytearray()
        try:
            for buf in op:
                with buf:
                    got += buf.view()
        finally:
            watchdog.cancel()
        sender.join()
    assert got == data
    assert op.state is OpState.COMPLETED
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_read_multishot_pipe_stream_ends_at_eof(ring: saferring.Ring, mode: str,
                                                single_shot: bool) -> None:
    """read_multishot on a pipe: 2 MiB through four 4 KiB buffers, all held at times, arrive
    in order; closing the write end (EOF) ends the op COMPLETED."""
    data = os.urandom(2 << 20)
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    rfd, wfd = os.pipe()
    try:
        op = ring.read_multishot(rfd, br, single_shot=single_shot)
        assert type(op) is SelectedBuffersOperation
        assert op.single_shot is (single_shot or not ring.features.supports("READ_MULTISHOT"))
        writer = _PipeWriter(wfd, data)
        got, starved = _consume(ring, op, COUNT)
        writer.join()
    finally:
        os.close(rfd)
    assert got == data
    assert starved > 0
    assert op.state is OpState.COMPLETED
    br.close()


@pytest.mark.needs("can:RECV_MULTISHOT")
def test_recv_multishot_uses_kernel_multishot_unless_forced(ring: saferring.Ring) -> None:
    """Where the kernel has multishot recv, the op is one multishot request (single_shot False);
    single_shot=True forces the re-armed single-shot form; both receive the same bytes."""
    br = saferring.BufferRing(ring, COUNT, SIZE)
    for forced in (False, True):
        with _unix() as (tx, rx):
            op = ring.recv_multishot(rx, br, single_shot=forced)
            assert op.single_shot is forced
            tx.sendall(b"abc")
            tx.shutdown(socket.SHUT_WR)
            got, _ = _consume(ring, op, COUNT)
        assert got == b"abc"
        assert op.state is OpState.COMPLETED
    br.close()


@pytest.mark.needs("op:READ_MULTISHOT")
def test_read_multishot_uses_kernel_multishot_unless_forced(ring: saferring.Ring) -> None:
    """Where the kernel has IORING_OP_READ_MULTISHOT the op uses it (single_shot False);
    single_shot=True forces re-armed single reads; both read the same bytes to EOF."""
    br = saferring.BufferRing(ring, COUNT, SIZE)
    for forced in (False, True):
        rfd, wfd = os.pipe()
        try:
            op = ring.read_multishot(rfd, br, single_shot=forced)
            assert op.single_shot is forced
            os.write(wfd, b"xyz")
            os.close(wfd)
            got, _ = _consume(ring, op, COUNT)
        finally:
            os.close(rfd)
        assert got == b"xyz"
        assert op.state is OpState.COMPLETED
    br.close()


@pytest.mark.needs("can:BUF_RING")
def test_auto_mode_picks_kernel_buffer_ring(ring: saferring.Ring) -> None:
    """mode='auto' resolves to a kernel buffer ring where the kernel has one; 'provide' stays
    'provide'; groups are distinct."""
    a = saferring.BufferRing(ring, 2, 64)
    b = saferring.BufferRing(ring, 2, 64, mode="provide")
    assert a.mode == "ring" and b.mode == "provide"
    assert a.group != b.group
    a.close()
    b.close()


# -- single recv / read picking a buffer --------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_single_recv_returns_buffer_then_none_at_eof(ring: saferring.Ring, mode: str) -> None:
    """ring.recv(sock, bufring) completes with a FILLED Buffer holding the bytes, and with None
    once the peer shut down; the buffer goes back on release."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _tcp() as (tx, rx):
        tx.sendall(b"hello ring")
        op = ring.recv(rx, br)
        assert type(op) is SelectedBufferOperation
        buf = _run(ring, op)
        assert isinstance(buf, saferring.Buffer)
        assert buf.state is BufferState.FILLED
        assert buf.tobytes() == b"hello ring" and buf.nbytes == 10 and buf.size == SIZE
        assert 0 <= buf.index < COUNT
        assert op.result() is buf  # the same value again
        with pytest.raises(TypeError):
            iter(op)
        buf.release()
        assert buf.state is BufferState.RELEASED
        with pytest.raises(saferring.OperationStateError):
            buf.tobytes()
        tx.shutdown(socket.SHUT_WR)
        op = ring.recv(rx, br)
        assert _run(ring, op) is None
        assert op.state is OpState.COMPLETED
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_single_read_pipe_returns_buffer_then_none_at_eof(ring: saferring.Ring, mode: str) -> None:
    """ring.read(pipe, bufring) returns a FILLED Buffer with the written bytes, then None at EOF."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"pipe bytes")
        buf = _run(ring, ring.read(rfd, br))
        assert buf is not None and buf.tobytes() == b"pipe bytes"
        buf.release()
        os.close(wfd)
        wfd = -1
        op = ring.read(rfd, br)
        assert _run(ring, op) is None
        assert op.state is OpState.COMPLETED
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_single_recv_waits_for_a_buffer_then_completes(ring: saferring.Ring, mode: str) -> None:
    """With every buffer held, a single recv waits (starved, not failed with ENOBUFS) and
    completes with the next bytes once one buffer is released."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        chunks = [bytes([i]) * SIZE for i in range(COUNT + 1)]
        tx.sendall(b"".join(chunks))
        held = [_run(ring, ring.recv(rx, br)) for _ in range(COUNT)]
        assert [b.tobytes() for b in held] == chunks[:COUNT]
        op = ring.recv(rx, br)
        _wait_for(ring, lambda: op._starved or op.done(), "the recv to find no buffer")
        assert op._starved and not op.done()
        ring.wait(1, timeout=0.1)
        assert not op.done() and op.state is OpState.SUBMITTED
        held.pop(2).release()
        buf = _run(ring, op)
        assert buf is not None and buf.tobytes() == chunks[COUNT]
        buf.release()
        for b in held:
            b.release()
    _recv_all_buffers(ring, br)
    br.close()


# -- cancellation --------------------------------------------------------------------------

@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_cancel_armed_multishot_recv(ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """Cancelling a recv_multishot that waits in the kernel for data ends it CANCELLED; values
    received before stay takeable, iteration raises OperationCancelledError, nothing leaks."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        tx.sendall(b"before cancel")
        _wait_for(ring, lambda: op.pending() > 0, "the first chunk")
        ring.wait(0, timeout=0.05)  # let a single-shot request re-arm and wait for data
        assert not op.done()
        op.cancel()
        assert op.cancel_requested
        with pytest.raises(saferring.OperationStateError):
            op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        with pytest.raises(saferring.OperationCancelledError):
            op.result()
        bufs = op.take()
        assert b"".join(b.tobytes() for b in bufs) == b"before cancel"
        for b in bufs:
            b.release()
        with pytest.raises(saferring.OperationCancelledError):
            list(op)
        with pytest.raises(saferring.OperationStateError):
            op.cancel()
    assert ring.stats().in_flight == 0
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_cancel_starved_multishot_recv(ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """Cancelling a recv_multishot that waits for a buffer (all held) ends it CANCELLED at
    once, without any byte delivered past the held buffers; every buffer comes back."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        held = _starve(ring, op, tx, br)
        op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        assert op.take() == []
        assert ring.stats().in_flight == 0
        # Releasing after the end hands the buffers back, and re-arms nothing.
        for b in held:
            b.release()
        ring.wait(0, timeout=0.05)
        assert op.state is OpState.CANCELLED and op.take() == []
        # The unread bytes are still in the socket: nothing was consumed for the cancelled op.
        rx.settimeout(5)
        assert len(rx.recv(SIZE * 4)) > 0
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_cancel_right_after_a_value(ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """cancel() called as soon as a value arrived (a single-shot request's re-arm is then still
    unsubmitted) ends the op CANCELLED; the value stays takeable."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        tx.sendall(b"v" * 100)
        deadline = time.monotonic() + 5
        while not op.pending():
            assert time.monotonic() < deadline, "no value arrived"
            ring.wait(1, timeout=0.1)
        op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        bufs = op.take()
        assert b"".join(b.tobytes() for b in bufs) == b"v" * 100
        for b in bufs:
            b.release()
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_cancel_single_recv_armed_and_starved(ring: saferring.Ring, mode: str) -> None:
    """A single recv with a BufferRing ends CANCELLED when cancelled while armed (no data) and
    while starved (all buffers held); its result() raises OperationCancelledError."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        armed = ring.recv(rx, br)
        ring.submit()
        ring.wait(0, timeout=0.05)
        assert not armed.done()
        armed.cancel()
        _finish(ring, armed)
        assert armed.state is OpState.CANCELLED
        with pytest.raises(saferring.OperationCancelledError):
            armed.result()
        tx.sendall(b"z" * SIZE * (COUNT + 1))
        held = [_run(ring, ring.recv(rx, br)) for _ in range(COUNT)]
        starved = ring.recv(rx, br)
        _wait_for(ring, lambda: starved._starved, "the recv to find no buffer")
        starved.cancel()
        assert starved.done() and starved.state is OpState.CANCELLED
        with pytest.raises(saferring.OperationCancelledError):
            starved.result()
        for b in held:
            b.release()
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_cancel_read_multishot_on_pipe(ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """read_multishot on an idle pipe and on a starved one: cancel ends it CANCELLED, the
    pipe's write end still works and nothing stays in flight."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    rfd, wfd = os.pipe()
    try:
        op = ring.read_multishot(rfd, br, single_shot=single_shot)
        ring.submit()
        ring.wait(0, timeout=0.05)
        op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        op = ring.read_multishot(rfd, br, single_shot=single_shot)
        os.write(wfd, b"p" * SIZE * (COUNT + 2))
        held: list[saferring.Buffer] = []

        def starved() -> bool:
            held.extend(op.take())
            return bool(op._starved)

        _wait_for(ring, starved, "read_multishot to run out of buffers")
        op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        held.extend(op.take())
        assert sum(b.nbytes for b in held) == SIZE * COUNT
        for b in held:
            b.release()
        assert os.read(rfd, SIZE * 4) == b"p" * SIZE * 2  # the rest was left in the pipe
    finally:
        os.close(rfd)
        os.close(wfd)
    assert ring.stats().in_flight == 0
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_eof_while_starved(ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """The peer shuts down while the request waits for a buffer: once buffers come back, the
    rest of the bytes arrive, then EOF ends the op COMPLETED."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        data = os.urandom(SIZE * (COUNT + 2))
        tx.sendall(data)
        held: list[saferring.Buffer] = []

        def starved() -> bool:
            held.extend(op.take())
            return bool(op._starved)

        _wait_for(ring, starved, "the request to run out of buffers")
        tx.shutdown(socket.SHUT_WR)
        got = bytearray()
        for b in held:
            got += b.tobytes()
            b.release()
        rest, _ = _consume(ring, op, COUNT)
        got += rest
    assert got == data
    assert op.state is OpState.COMPLETED
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_connection_reset_while_starved(ring: saferring.Ring, mode: str,
                                        single_shot: bool) -> None:
    """The TCP peer resets the connection while the request waits for a buffer: after the
    buffers come back the op ends FAILED with ECONNRESET (result() and iteration raise it),
    whatever it delivered is a prefix of the stream, and every buffer returns to the kernel."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _tcp() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        data = os.urandom(SIZE * (COUNT + 2))
        tx.sendall(data)
        held: list[saferring.Buffer] = []

        def starved() -> bool:
            held.extend(op.take())
            return bool(op._starved)

        _wait_for(ring, starved, "the request to run out of buffers")
        tx.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tx.close()  # RST
        got = bytearray()
        for b in held:
            got += b.tobytes()
            b.release()
        deadline = time.monotonic() + 5
        while not op.done():
            assert time.monotonic() < deadline, f"{op!r} did not end"
            ring.wait(1, timeout=0.1)
            for b in op.take():
                got += b.tobytes()
                b.release()
        for b in op.take():
            got += b.tobytes()
            b.release()
        assert op.state is OpState.FAILED
        with pytest.raises(ConnectionResetError):
            op.result()
        with pytest.raises(ConnectionResetError):
            list(op)
        assert len(got) >= SIZE * COUNT
        assert got == data[:len(got)]
    _recv_all_buffers(ring, br)
    br.close()


# -- BufferRing.close ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_bufring_close_refused_while_picked_from(ring: saferring.Ring, mode: str) -> None:
    """BufferRing.close() raises OperationStateError while an op picks from it (armed or
    starved) and leaves it usable; after the op ends it closes, and held buffers stay
    readable and releasable."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        ring.submit()
        with pytest.raises(saferring.OperationStateError):
            br.close()
        assert not br.closed
        held = _starve(ring, op, tx, br)
        with pytest.raises(saferring.OperationStateError):
            br.close()
        assert not br.closed
        # Still working after the refusal: one buffer back, more data comes.
        first = held.pop(0)
        first_bytes = first.tobytes()
        first.release()
        _wait_for(ring, lambda: op.pending() > 0, "data after the refused close")
        held.extend(op.take())
        op.cancel()
        _finish(ring, op)
        held.extend(op.take())
        br.close()
        assert br.closed
        br.close()  # idempotent
        assert len(first_bytes) == SIZE
        for b in held:
            assert b.state is BufferState.FILLED and len(b.tobytes()) == b.nbytes > 0
            b.release()
            assert b.state is BufferState.RELEASED
        with pytest.raises(saferring.OperationStateError):
            ring.recv_multishot(rx, br)
    assert ring.stats().in_flight == 0


@pytest.mark.needs("can:BUF_RING")
def test_bufring_close_then_group_free_again(ring: saferring.Ring) -> None:
    """A closed kernel buffer ring gives its group id back: a new BufferRing may use it."""
    br = saferring.BufferRing(ring, 2, 64, group=7, mode="ring")
    assert br.group == 7
    with pytest.raises(ValueError):
        saferring.BufferRing(ring, 2, 64, group=7, mode="ring")
    br.close()
    again = saferring.BufferRing(ring, 2, 64, group=7, mode="ring")
    _recv_all_buffers(ring, again)
    again.close()


# -- buffers that are dropped instead of released ---------------------------------------------

@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_dropped_buffers_come_back(ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """Buffers the user drops without release() go back to the kernel, whether freed by their
    reference count (del) or only by the cycle collector (gc.collect): a 512 KiB stream still
    completes, in order, through a 2-buffer ring."""
    data = os.urandom(512 * 1024)
    br = saferring.BufferRing(ring, 2, SIZE, mode=mode)
    deadline = time.monotonic() + 15
    got = bytearray()
    rounds = 0
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        sender = _Sender(tx, data)
        while not op.done() or op.pending():
            assert time.monotonic() < deadline, f"stream stalled: {op!r}, {len(got)} bytes"
            rounds += 1
            if op._starved or rounds % 16 == 0:
                gc.collect()  # frees the buffers kept alive by reference cycles
            _poll(ring, 0 if op.pending() else 99)
            for buf in op.take():
                got += buf.tobytes()
                if buf.index == 0:
                    cycle: list[Any] = [buf]
                    cycle.append(cycle)  # only the cycle collector frees this one
                    del cycle
                del buf  # never released
        sender.join()
    assert got == data
    assert op.state is OpState.COMPLETED
    gc.collect()
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_dropped_buffer_in_flight_elsewhere_is_not_reused(ring: saferring.Ring, mode: str,
                                                          pipe: tuple[int, int]) -> None:
    """A buffer of the ring that the user lent to a plain ring.read (still waiting) and then
    dropped is not handed back to the kernel's group until that read ends; then it is."""
    rfd, wfd = pipe
    br = saferring.BufferRing(ring, 2, SIZE, mode=mode)
    with _unix() as (tx, rx):
        tx.sendall(b"1" * SIZE)
        first = _run(ring, ring.recv(rx, br))
        index = first.index
        read = ring.read(rfd, first)  # the buffer as a plain read target
        ring.submit()
        assert first.state is BufferState.IN_FLIGHT
        with pytest.raises(saferring.BufferBusyError):
            first.release()
        del first
        gc.collect()
        for i in range(10):
            tx.sendall(bytes([i]) * SIZE)
            buf = _run(ring, ring.recv(rx, br))
            assert buf.index != index, "a buffer in flight in a read was given to the kernel"
            assert buf.tobytes() == bytes([i]) * SIZE
            buf.release()
        assert not read.done()
        os.write(wfd, b"read target")
        assert _run(ring, read) == len(b"read target")
        seen = set()
        for i in range(6):
            tx.sendall(bytes([i]) * SIZE)
            buf = _run(ring, ring.recv(rx, br))
            seen.add(buf.index)
            buf.release()
        assert index in seen
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_dropped_buffer_with_live_view_is_not_reused(ring: saferring.Ring, mode: str) -> None:
    """A dropped buffer whose memoryview is still alive is not handed back to the kernel (its
    bytes never change under the view); once the view dies, the buffer is used again."""
    br = saferring.BufferRing(ring, 2, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        tx.sendall(b"A" * SIZE)
        _wait_for(ring, lambda: op.pending() > 0, "the first chunk")
        (first,) = op.take()
        index = first.index
        view = first.view()
        snapshot = bytes(view)
        del first
        gc.collect()
        seen: set[int] = set()
        for i in range(20):
            tx.sendall(bytes([i]) * SIZE)
            got = b""
            while len(got) < SIZE:
                _wait_for(ring, lambda: op.pending() > 0, "the next chunk")
                for b in op.take():
                    seen.add(b.index)
                    got += b.tobytes()
                    b.release()
            assert got == bytes([i]) * SIZE
        assert index not in seen
        assert bytes(view) == snapshot
        view.release()
        del view
        seen.clear()
        for _ in range(20):
            tx.sendall(b"B" * SIZE)
            got = b""
            while len(got) < SIZE:
                _wait_for(ring, lambda: op.pending() > 0, "the next chunk")
                for b in op.take():
                    seen.add(b.index)
                    got += b.tobytes()
                    b.release()
        assert index in seen
        op.cancel()
        _finish(ring, op)
        for b in op.take():
            b.release()
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_untaken_values_of_dropped_op_come_back(ring: saferring.Ring, mode: str,
                                                single_shot: bool) -> None:
    """Buffers filled for a recv_multishot that nobody took go back to the kernel when the
    ended operation is dropped."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        tx.sendall(os.urandom(SIZE * (COUNT + 1)))
        _wait_for(ring, lambda o=op: o._starved, "the ring to run dry")
        assert op.pending() == COUNT
        op.cancel()
        _finish(ring, op)
        assert op.state is OpState.CANCELLED
        del op
        gc.collect()
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_unclaimed_single_recv_result_comes_back(ring: saferring.Ring, mode: str) -> None:
    """A single recv's buffer comes back when the op is dropped, whether its result was never
    asked for or was asked for and then dropped with it."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        tx.sendall(b"q" * SIZE * 2)
        op = ring.recv(rx, br)
        _finish(ring, op)
        assert op.state is OpState.COMPLETED
        del op
        op = ring.recv(rx, br)
        buf = _run(ring, op)
        assert buf.nbytes == SIZE
        del op, buf
        gc.collect()
    _recv_all_buffers(ring, br)
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_buffers_released_on_another_thread(ring: saferring.Ring, mode: str) -> None:
    """Buffers released on a thread that does not own the ring go back to the kernel at the
    owner's next wait(): a starved recv_multishot then receives again."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        held = _starve(ring, op, tx, br)
        errors: list[BaseException] = []

        def release_all() -> None:
            try:
                for b in held:
                    b.release()
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=release_all)
        thread.start()
        thread.join(10)
        assert not thread.is_alive() and not errors, errors
        assert all(b.state is BufferState.RELEASED for b in held)
        got: list[saferring.Buffer] = []
        deadline = time.monotonic() + 5
        while sum(b.nbytes for b in got) < 2 * SIZE:
            assert time.monotonic() < deadline, f"the starved op never resumed: {op!r}"
            ring.wait(1, timeout=0.1)
            got += op.take()
        for b in got:
            b.release()
        op.cancel()
        _finish(ring, op)
        for b in op.take():
            b.release()
    _recv_all_buffers(ring, br)
    br.close()


# -- ring.close() with ops picking buffers ---------------------------------------------------

@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_ring_close_with_armed_and_starved_ops(mode: str, single_shot: bool) -> None:
    """ring.close() returns with one recv_multishot waiting for data and another waiting for a
    buffer: both end CANCELLED, the BufferRing is closed, held buffers stay readable and can
    still be released; the duplicated descriptors are closed (the leak check)."""
    ring = saferring.Ring(32)
    try:
        br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
        with _unix() as (_tx1, rx1), _unix() as (tx2, rx2):
            armed = ring.recv_multishot(rx1, br, single_shot=single_shot)
            starved = ring.recv_multishot(rx2, br, single_shot=single_shot)
            held = _starve(ring, starved, tx2, br)
            contents = [b.tobytes() for b in held]
            assert not armed.done()
            ring.close(timeout=5)
            assert ring.closed and br.closed
            assert armed.state is OpState.CANCELLED
            assert starved.state is OpState.CANCELLED
            assert [b.tobytes() for b in held] == contents
            with held[0].view() as v:
                assert bytes(v) == contents[0]
            for b in held:
                b.release()
                assert b.state is BufferState.RELEASED
            with pytest.raises(saferring.RingClosedError):
                ring.recv_multishot(rx1, br)
    finally:
        ring.close()


@pytest.mark.parametrize("mode", MODES)
def test_ring_close_with_single_recv_starved(mode: str) -> None:
    """ring.close() returns with a single recv waiting for a buffer; it ends CANCELLED."""
    ring = saferring.Ring(16)
    try:
        br = saferring.BufferRing(ring, 2, SIZE, mode=mode)
        with _unix() as (tx, rx):
            tx.sendall(b"s" * SIZE * 3)
            held = [_run(ring, ring.recv(rx, br)) for _ in range(2)]
            op = ring.recv(rx, br)
            _wait_for(ring, lambda: op._starved, "the recv to find no buffer")
            ring.close(timeout=5)
            assert op.state is OpState.CANCELLED
            assert [b.tobytes() for b in held] == [b"s" * SIZE] * 2
            for b in held:
                b.release()
    finally:
        ring.close()


# -- the descriptor is the library's own --------------------------------------------------------

@pytest.mark.parametrize("single_shot", SINGLE)
@pytest.mark.parametrize("mode", MODES)
def test_closed_and_reused_fd_number_does_not_redirect_starved_op(
        ring: saferring.Ring, mode: str, single_shot: bool) -> None:
    """The caller closes the descriptor of a starved recv_multishot and a new socket gets the
    same number: after buffers are released the op still reads the ORIGINAL connection (the
    library holds a dup), never a byte from the new socket, and ends at its EOF."""
    data = os.urandom(256 * 1024)
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    with _tcp() as (tx, rx):
        head = SIZE * (COUNT + 2)
        tx.sendall(data[:head])
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        held: list[saferring.Buffer] = []

        def starved() -> bool:
            held.extend(op.take())
            return bool(op._starved)

        _wait_for(ring, starved, "the request to run out of buffers")
        number = rx.fileno()
        rx.close()
        assert not _fd_open(number)
        # A new socket takes the number (dup2: whatever other holes the table has).
        intruder, feeder = socket.socketpair()
        if intruder.fileno() != number:
            os.dup2(intruder.fileno(), number, inheritable=False)
            intruder.close()
            intruder = socket.socket(fileno=number)
        try:
            assert intruder.fileno() == number
            feeder.sendall(b"\xee" * 65536)  # readable on the reused number
            got = bytearray()
            for b in held:
                got += b.tobytes()
                b.release()
            sender = _Sender(tx, data[head:])
            rest, _ = _consume(ring, op, COUNT)
            sender.join()
            got += rest
            assert op.state is OpState.COMPLETED
            assert len(got) == len(data)
            assert got == data
            intruder.settimeout(5)
            assert intruder.recv(1 << 20) == b"\xee" * 65536  # none of it was taken
        finally:
            intruder.close()
            feeder.close()
    _recv_all_buffers(ring, br)
    br.close()


# -- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "kwargs", "exc"), [
    ((0, 4096), {}, ValueError),
    ((32769, 4096), {}, ValueError),
    ((-1, 4096), {}, ValueError),
    ((4, 0), {}, ValueError),
    ((4, -4096), {}, ValueError),
    (("4", 4096), {}, TypeError),
    ((4, 4096.0), {}, TypeError),
    ((4, 4096), {"mode": "x"}, ValueError),
    ((4, 4096), {"mode": None}, ValueError),
    ((4, 4096, 70000), {}, ValueError),
    ((4, 4096, -1), {}, ValueError),
    ((4, 4096, "1"), {}, (ValueError, TypeError)),
])
def test_bufring_bad_arguments(ring: saferring.Ring, args: tuple[Any, ...],
                               kwargs: dict[str, Any], exc: Any) -> None:
    """Bad count, size, group or mode raise ValueError/TypeError and take nothing: the group
    stays free and nothing is queued."""
    before = ring.stats()
    with pytest.raises(exc):
        saferring.BufferRing(ring, *args, **kwargs)
    assert ring.stats().in_flight == before.in_flight
    br = saferring.BufferRing(ring, 2, 64, group=1)  # the group was not taken
    br.close()


def test_bufring_count_limits_accepted(ring: saferring.Ring) -> None:
    """count 1 and the maximum 32768 are accepted; group 65535 too."""
    small = saferring.BufferRing(ring, 1, 64, group=65535)
    assert small.group == 65535 and small.count == 1
    big = saferring.BufferRing(ring, 32768, 16)
    assert big.count == 32768
    _recv_all_buffers(ring, small)
    small.close()
    big.close()


@pytest.mark.parametrize("mode", MODES)
def test_bufring_group_reuse_refused(ring: saferring.Ring, mode: str) -> None:
    """A group id already used on the ring raises ValueError; the first ring keeps working."""
    br = saferring.BufferRing(ring, COUNT, SIZE, group=3, mode=mode)
    for other in ("provide", "auto"):
        with pytest.raises(ValueError):
            saferring.BufferRing(ring, COUNT, SIZE, group=3, mode=other)
    assert br.group == 3
    _recv_all_buffers(ring, br)
    br.close()


def test_bufring_of_another_ring_refused(ring: saferring.Ring) -> None:
    """recv_multishot/read_multishot/recv/read with a BufferRing of another ring raise
    OperationStateError before anything is queued (and no descriptor is duplicated)."""
    other = saferring.Ring(8)
    try:
        foreign = saferring.BufferRing(other, 2, 64)
        with _unix() as (_tx, rx):
            before = ring.stats().in_flight
            with pytest.raises(saferring.OperationStateError):
                ring.recv_multishot(rx, foreign)
            with pytest.raises(saferring.OperationStateError):
                ring.read_multishot(rx.fileno(), foreign)
            with pytest.raises(saferring.OperationStateError):
                ring.recv(rx, foreign)
            with pytest.raises(saferring.OperationStateError):
                ring.read(rx.fileno(), foreign)
            assert ring.stats().in_flight == before
            assert other.stats().in_flight == 0
        foreign.close()
    finally:
        other.close()


def test_fixed_file_refused(ring: saferring.Ring) -> None:
    """A FixedFile passed as the descriptor of a buffer-picking request raises TypeError."""
    br = saferring.BufferRing(ring, 2, 64)
    with _unix() as (_tx, rx):
        (fixed,) = ring.register_files([rx.fileno()])
        try:
            for call in (ring.recv_multishot, ring.read_multishot, ring.recv, ring.read):
                with pytest.raises(TypeError):
                    call(fixed, br)
            assert ring.stats().in_flight == 0
        finally:
            ring.unregister_files()
    br.close()


def test_closed_bufring_refused(ring: saferring.Ring) -> None:
    """A closed BufferRing raises OperationStateError in every request that picks from it."""
    br = saferring.BufferRing(ring, 2, 64)
    br.close()
    with _unix() as (_tx, rx):
        for call in (ring.recv_multishot, ring.read_multishot):
            with pytest.raises(saferring.OperationStateError):
                call(rx, br)
        with pytest.raises(saferring.OperationStateError):
            ring.recv(rx, br)
        with pytest.raises(saferring.OperationStateError):
            ring.read(rx.fileno(), br)
    assert ring.stats().in_flight == 0


def test_not_a_bufring_refused(ring: saferring.Ring) -> None:
    """recv_multishot/read_multishot with something other than a BufferRing raise TypeError."""
    with _unix() as (_tx, rx):
        for bad in (bytearray(64), None, 4, saferring.Buffer(64)):
            with pytest.raises(TypeError):
                ring.recv_multishot(rx, bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                ring.read_multishot(rx, bad)  # type: ignore[arg-type]
    assert ring.stats().in_flight == 0


@contextlib.contextmanager
def _unraisable() -> Iterator[list[Any]]:
    """Collect what finalisers raise ("Exception ignored in ...") while the block runs."""
    seen: list[Any] = []
    old = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        yield seen
        gc.collect()
    finally:
        sys.unraisablehook = old


def _closed_descriptor_calls(ring: saferring.Ring, br: saferring.BufferRing) -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    for call in (ring.recv_multishot, ring.read_multishot, ring.recv, ring.read):
        # Not pytest.raises: its ExceptionInfo would keep the failed call's frames (and what
        # they hold) alive past the check for finaliser noise.
        code = None
        try:
            call(r, br)
        except OSError as exc:
            code = exc.errno
        assert code == errno.EBADF, f"{call.__name__}: expected OSError(EBADF)"


def test_closed_descriptor_refused(ring: saferring.Ring) -> None:
    """A buffer-picking request on a closed descriptor raises OSError(EBADF) before anything is
    queued."""
    br = saferring.BufferRing(ring, 2, 64)
    with _unraisable():
        _closed_descriptor_calls(ring, br)
    assert ring.stats().in_flight == 0
    _recv_all_buffers(ring, br)
    br.close()


def test_closed_descriptor_refused_quietly(ring: saferring.Ring) -> None:
    """The EBADF refusal leaves no 'Exception ignored' noise from a finaliser behind."""
    br = saferring.BufferRing(ring, 2, 64)
    try:
        with _unraisable() as seen:
            _closed_descriptor_calls(ring, br)
    finally:
        br.close()
    assert not seen, [f"{s.exc_type.__name__}: {s.exc_value} in {s.object!r}" for s in seen]


@pytest.mark.parametrize(("flags", "exc"), [("x", TypeError), (-1, ValueError),
                                            (1 << 40, ValueError), (None, TypeError)])
def test_bad_recv_flags_refused(ring: saferring.Ring, flags: Any, exc: Any) -> None:
    """recv_multishot and recv with a BufferRing validate flags before anything is queued (and
    without duplicating the descriptor: the leak check)."""
    br = saferring.BufferRing(ring, 2, 64)
    with _unix() as (_tx, rx):
        with pytest.raises(exc):
            ring.recv_multishot(rx, br, flags)
        with pytest.raises(exc):
            ring.recv(rx, br, flags)
    assert ring.stats().in_flight == 0
    br.close()


@pytest.mark.parametrize("mode", MODES)
def test_stats_while_buffer_ring_op_in_flight(ring: saferring.Ring, mode: str) -> None:
    """ring.stats() works while a recv_multishot (armed or starved) and a single recv picking
    from a BufferRing are in flight, and counts them."""
    br = saferring.BufferRing(ring, COUNT, SIZE, mode=mode)
    held: list[saferring.Buffer] = []
    single: Any = None
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        ring.submit()
        try:
            stats = ring.stats()
            assert stats.in_flight == 1
            held = _starve(ring, op, tx, br)
            assert ring.stats().in_flight == 1
            single = ring.recv(rx, br)
            ring.submit()
            assert ring.stats().in_flight == 2
        finally:
            op.cancel()
            _finish(ring, op)
            if single is not None:
                with contextlib.suppress(saferring.OperationStateError):
                    single.cancel()
                _finish(ring, single)
            for b in held + op.take():
                b.release()
    br.close()


@pytest.mark.parametrize("single_shot", SINGLE)
def test_recv_multishot_on_pipe_fails(ring: saferring.Ring, single_shot: bool) -> None:
    """recv_multishot on a pipe (not a socket) ends FAILED with ENOTSOCK; iteration raises it;
    every buffer stays with the kernel."""
    br = saferring.BufferRing(ring, COUNT, SIZE)
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"data")
        op = ring.recv_multishot(rfd, br, single_shot=single_shot)
        _finish(ring, op)
        assert op.state is OpState.FAILED
        with pytest.raises(OSError) as info:
            op.result()
        assert info.value.errno == errno.ENOTSOCK
        with pytest.raises(OSError):
            list(op)
    finally:
        os.close(rfd)
        os.close(wfd)
    _recv_all_buffers(ring, br)
    br.close()


# -- multishot accept ------------------------------------------------------------------------

def test_accept_multishot_200_connections(ring: saferring.Ring) -> None:
    """One multishot accept reports each of 200 connections exactly once (distinct open
    descriptors whose peers are exactly the clients); the test closes them all."""
    clients: list[socket.socket] = []
    fds: list[int] = []
    with socket.socket() as lst:
        lst.bind((LOCAL4, 0))
        lst.listen(256)
        op = ring.accept(lst, multishot=True)
        ring.submit()
        try:
            deadline = time.monotonic() + 10
            for i in range(200):
                clients.append(socket.create_connection(lst.getsockname(), timeout=5))
                if i % 25 == 24:
                    ring.wait(0, timeout=0)
                    fds += op.take()
            while len(fds) < 200 and time.monotonic() < deadline:
                ring.wait(1, timeout=0.2)
                fds += op.take()
            ring.wait(0, timeout=0.05)
            fds += op.take()
            assert len(fds) == 200
            assert len(set(fds)) == 200
            assert op.state is OpState.SUBMITTED and not op.done()
            peers = set()
            for fd in fds:
                assert _fd_open(fd)
                with socket.socket(fileno=os.dup(fd)) as s:
                    peers.add(s.getpeername())
            assert peers == {c.getsockname() for c in clients}
            op.cancel()
            _finish(ring, op)
            assert op.state is OpState.CANCELLED
            assert op.take() == []
        finally:
            for fd in fds:
                os.close(fd)
            for c in clients:
                c.close()


# -- incremental consumption (IOU_PBUF_RING_INC, Linux 6.12) -----------------------------------


@pytest.mark.needs("can:BUF_RING_INC")
def test_incremental_pieces_share_a_buffer_in_order(ring: saferring.Ring) -> None:
    """With incremental consumption, small chunks are pieces of one buffer at growing offsets;
    a released piece does not send the buffer back while the kernel still fills it (the next
    piece continues in the same buffer), and the buffer comes back once the kernel moved on and
    every piece was released.  Every byte arrives in order."""
    br = saferring.BufferRing(ring, 2, 4096, incremental=True)
    assert br.incremental
    sent, got = bytearray(), bytearray()
    seen: list[tuple[int, int, int]] = []
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        for i in range(12):  # 12 x 1000 bytes through 2 x 4096: each buffer is reused
            msg = os.urandom(1000)
            tx.sendall(msg)
            sent += msg
            pieces: list[saferring.Buffer] = []
            _wait_for(ring, lambda: op.pending() or False, f"chunk {i}")
            pieces += op.take()
            for piece in pieces:
                seen.append((piece.index, piece.offset, piece.nbytes))
                got += piece.tobytes()
                piece.release()
        op.cancel()
        _finish(ring, op)
        for piece in op.take():
            got += piece.tobytes()
            piece.release()
    assert bytes(got) == bytes(sent)
    # Pieces of one buffer follow each other: each starts where the previous one ended.
    for (ia, oa, na), (ib, ob, _nb) in itertools.pairwise(seen):
        if ia == ib and ob != 0:
            assert ob == oa + na
    assert any(off > 0 for _i, off, _n in seen), "no chunk continued inside a buffer"
    assert {i for i, _o, _n in seen} == {0, 1}, "the buffers were not reused in turn"
    br.close()


@pytest.mark.needs("can:BUF_RING_INC")
def test_incremental_buffer_not_recycled_while_a_piece_is_held(ring: saferring.Ring) -> None:
    """A buffer whose earlier piece is still held (or viewed) is not handed back even after the
    kernel moved on from it: the held piece's bytes stay intact while more data streams
    through the other buffers."""
    br = saferring.BufferRing(ring, 2, 2048, incremental=True)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        first = os.urandom(2048)  # fills buffer A exactly: the kernel moves on from it
        tx.sendall(first)
        _wait_for(ring, lambda: op.pending() > 0, "the first chunk")
        held = op.take()
        assert b"".join(p.tobytes() for p in held) == first[:sum(p.nbytes for p in held)]
        view = held[0].view()
        stream = bytearray()
        for _ in range(8):  # more data: only the other buffer can take it
            msg = os.urandom(1024)
            tx.sendall(msg)
            want = len(stream) + len(msg)
            while len(stream) < want:
                _wait_for(ring, lambda: op.pending() > 0, "a chunk")
                for piece in op.take():
                    assert piece.index != held[0].index
                    stream += piece.tobytes()
                    piece.release()
            assert bytes(view[:16]) == first[:16]
        del view
        for piece in held:
            piece.release()
        op.cancel()
        _finish(ring, op)
        for piece in op.take():
            piece.release()
    br.close()


@pytest.mark.parametrize("single_shot", [False, True])
def test_incremental_stream_through_tiny_ring(ring: saferring.Ring, single_shot: bool) -> None:
    """A 2 MiB stream of small writes through 2 incremental buffers of 16 KiB, holding pieces at
    times until the ring starves: every byte arrives in order (on kernels without incremental
    rings the same code takes whole buffers)."""
    br = saferring.BufferRing(ring, 2, 16384, incremental=True)
    assert br.incremental == (kernel_lacks("can:BUF_RING_INC") is None and br.mode == "ring")
    data = os.urandom(2 << 20)
    got = bytearray()
    with _tcp() as (tx, rx):
        def send() -> None:
            view = memoryview(data)
            for i in range(0, len(data), 3000):
                tx.sendall(view[i:i + 3000])
            tx.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        op = ring.recv_multishot(rx, br, single_shot=single_shot)
        held: list[saferring.Buffer] = []
        deadline = time.monotonic() + 60
        polls = 0
        while not op.done() or op.pending():
            assert time.monotonic() < deadline
            new = op.take()
            held += new
            if op._starved or len(held) > 8 or op.done():
                for piece in held:
                    got += piece.tobytes()
                    piece.release()
                held = []
            if not new:
                _poll(ring, polls)
                polls += 1
        for piece in held:
            got += piece.tobytes()
            piece.release()
        sender.join(30)
    assert op.state is OpState.COMPLETED
    assert bytes(got) == data
    br.close()


# -- found by review: the kernel's own ways of ending or oversizing a receive -----------------


@pytest.mark.parametrize("kind", ["recv", "read"])
def test_multishot_stopped_by_a_full_completion_queue_goes_on(ring: saferring.Ring,
                                                              kind: str) -> None:
    """When the completion queue is full the kernel stops a multishot request with a final CQE
    that still carries data (no F_MORE): that is not end of stream, so the library arms it again
    and every chunk arrives, in order, with the operation still running."""
    small = saferring.Ring(4, cq_entries=8)
    try:
        br = saferring.BufferRing(small, 128, 256)
        if kind == "recv":
            tx, rx = socket.socketpair()
            op = small.recv_multishot(rx, br)
            send = tx.send
        else:
            rfd, wfd = os.pipe()
            op = small.read_multishot(rfd, br)

            def send(data: bytes) -> int:
                return os.write(wfd, data)
        small.submit()
        sent = b""
        for i in range(48):  # more chunks than the CQ holds, none reaped meanwhile
            chunk = bytes([i]) * 64
            send(chunk)
            sent += chunk
            time.sleep(0.001)
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < len(sent):
            assert time.monotonic() < deadline, f"{len(got)} of {len(sent)} bytes"
            assert not op.done(), f"{op!r} ended while the stream is open"
            small.wait(1, timeout=0.1)
            for buf in op.take():
                got += buf.tobytes()
                buf.release()
        assert got == sent
        op.cancel()
        _finish(small, op)
        for buf in op.take():
            buf.release()
        if kind == "recv":
            tx.close()
            rx.close()
        else:
            os.close(rfd)
            os.close(wfd)
        br.close()
    finally:
        small.close()


def test_msg_trunc_refused_for_buffer_ring_receives(ring: saferring.Ring) -> None:
    """MSG_TRUNC (a datagram's full length, which can exceed the picked buffer) is refused for
    receives that pick from a BufferRing, before anything is queued."""
    br = saferring.BufferRing(ring, 2, 64)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with pytest.raises(ValueError, match="MSG_TRUNC"):
            ring.recv(s, br, socket.MSG_TRUNC)
        with pytest.raises(ValueError, match="MSG_TRUNC"):
            ring.recv_multishot(s, br, socket.MSG_TRUNC)
    assert ring.stats().in_flight == 0
    br.close()


def test_breaking_out_of_iteration_loses_nothing(ring: saferring.Ring) -> None:
    """Leaving ``for buf in op`` early leaves the values not yet handed out in the operation:
    a second loop gets every remaining chunk, in order."""
    br = saferring.BufferRing(ring, 16, 16)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br)
        ring.submit()
        for i in range(6):
            tx.send(bytes([65 + i]) * 16)
        _wait_for(ring, lambda: op.pending() >= 6, "six chunks")
        got = []
        for buf in op:
            got.append(buf.tobytes())
            buf.release()
            break
        tx.send(b"G" * 16)
        tx.shutdown(socket.SHUT_WR)
        for buf in op:
            got.append(buf.tobytes())
            buf.release()
    assert b"".join(got) == b"".join(bytes([65 + i]) * 16 for i in range(7))
    assert op.state is OpState.COMPLETED
    br.close()


@pytest.mark.needs("can:BUF_RING_INC")
def test_incremental_ring_shared_by_two_receives(ring: saferring.Ring) -> None:
    """Two receives picking from one incremental ring: each gets its own connection's bytes,
    whatever order their results are read in (offsets follow the kernel's order)."""
    br = saferring.BufferRing(ring, 2, 65536, incremental=True)
    with _unix() as (tx0, rx0), _unix() as (tx1, rx1):
        ops = [ring.recv(rx0, br), ring.recv(rx1, br)]
        ring.submit()
        tx1.send(b"second-connection" * 10)  # completes first
        _wait_for(ring, lambda: ops[1].done(), "the second receive")
        tx0.send(b"first-connection!")
        _wait_for(ring, lambda: ops[0].done(), "the first receive")
        first, second = ops[0].result(), ops[1].result()
        assert first.tobytes() == b"first-connection!"
        assert second.tobytes() == b"second-connection" * 10
        first.release()
        second.release()
    br.close()


def test_run_gives_dropped_buffers_back_before_blocking(ring: saferring.Ring) -> None:
    """With a one-buffer ring, dropping the first result's handle and running a second receive
    works: ring.run() hands the dropped buffer back to the kernel before it blocks."""
    br = saferring.BufferRing(ring, 1, 64)
    with _unix() as (tx, rx):
        tx.send(b"first")
        buf = _run(ring, ring.recv(rx, br))
        assert buf.tobytes() == b"first"
        del buf
        gc.collect()
        tx.send(b"second")
        again = ring.run(ring.recv(rx, br))
        assert again.tobytes() == b"second"
        again.release()
    br.close()


def test_rearm_waits_for_an_open_chain(ring: saferring.Ring) -> None:
    """A re-arm that falls due while the caller has a chain open (wait(0) may reap inside one)
    is written after the chain closes, not into it: the chain's members all complete."""
    br = saferring.BufferRing(ring, 2, 64)
    with _unix() as (tx, rx):
        op = ring.recv_multishot(rx, br, single_shot=True)  # re-armed after every chunk
        ring.submit()
        tx.send(b"x" * 10)
        time.sleep(0.05)
        with ring.chain():
            a = ring.nop()
            ring.wait(0)  # reaps the chunk: its re-arm must not join this chain
            b = ring.nop()
        _run(ring, a)
        _run(ring, b)
        assert a.state is OpState.COMPLETED and b.state is OpState.COMPLETED
        tx.send(b"y" * 10)
        _wait_for(ring, lambda: op.pending() >= 2, "both chunks")
        assert b"".join(buf.tobytes() for buf in op.take()) == b"x" * 10 + b"y" * 10
        op.cancel()
        _finish(ring, op)
    br.close()
