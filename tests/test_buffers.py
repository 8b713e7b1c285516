"""Library-owned buffers (``Buffer``, ``BufferPool``) on the real kernel: the buffer state machine,
views that block the kernel, reads/writes/sends from buffers, registered (fixed) buffers, the
RLIMIT_MEMLOCK error, zero-copy sends of buffers whose handle the caller dropped, and a GC-pressure
run in a subprocess."""

from __future__ import annotations

import copy
import ctypes
import errno
import gc
import os
import pickle
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import saferring
from saferring import (
    Buffer,
    BufferBusyError,
    BufferPool,
    BufferRing,
    BufferState,
    OperationStateError,
    OpState,
)

from _helpers import run_isolated

FREE, IN_FLIGHT, FILLED, RELEASED = (BufferState.FREE, BufferState.IN_FLIGHT, BufferState.FILLED,
                                     BufferState.RELEASED)
LOCAL4 = "127.0.0.1"


# -- helpers -------------------------------------------------------------------------------------

def _finish(ring: saferring.Ring, op: saferring.Operation[Any], timeout: float = 5.0) -> None:
    """Reap until ``op`` has its final CQE, failing (not hanging) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not op.done():
        left = deadline - time.monotonic()
        assert left > 0, f"{op!r} did not finish within {timeout} s"
        ring.wait(1, timeout=left)


def _run(ring: saferring.Ring, op: saferring.Operation[Any], timeout: float = 5.0) -> Any:
    """Like ring.run(op), but bounded."""
    _finish(ring, op, timeout)
    return op.result()


def _recv_exactly(sock: socket.socket, n: int, ring: saferring.Ring | None = None) -> bytes:
    """Receive exactly ``n`` bytes (reaping ``ring`` meanwhile), failing after 5 s."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + 5
    out = bytearray()
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {len(out)} of {n} bytes arrived"
        if ring is not None:
            ring.wait(0)
        try:
            chunk = sock.recv(n - len(out))
        except TimeoutError:
            continue
        assert chunk, f"peer closed after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def _in_flight(ring: saferring.Ring) -> int:
    return ring.stats().in_flight


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (client, server side)."""
    with socket.socket() as lst:
        lst.bind((LOCAL4, 0))
        lst.listen(1)
        client = socket.create_connection(lst.getsockname(), timeout=5)
        server, _ = lst.accept()
    client.settimeout(5)
    server.settimeout(5)
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def pool(ring: saferring.Ring) -> Iterator[BufferPool]:
    """A 4-buffer pool of 8 KiB; at the end every buffer must be back and the pool closable."""
    p = BufferPool(ring, 4, 8192)
    yield p
    if not p.closed:
        gc.collect()
        assert p.available() == p.count, f"buffers not back in the pool: {p!r}"
        p.close()


# Every way to touch a buffer: its own methods and every ring operation that takes one.
_OWN = ["view", "view_whole", "tobytes", "fill", "mark_filled", "release"]
_KERNEL = ["read", "write", "recv", "send", "send_zc"]
_FIXED = ["read_fixed", "write_fixed"]


def _access(name: str, ring: saferring.Ring, buf: Buffer, fds: tuple[int, int],
            sock: socket.socket) -> Any:
    """Touch ``buf`` the way ``name`` says (never blocks: every fd is a pipe or socket that the
    kernel call would only queue on)."""
    r, w = fds
    actions: dict[str, Callable[[], Any]] = {
        "view": lambda: buf.view(),
        "view_whole": lambda: buf.view(whole=True),
        "tobytes": lambda: buf.tobytes(),
        "fill": lambda: buf.fill(b"xyz"),
        "mark_filled": lambda: buf.mark_filled(0),
        "release": lambda: buf.release(),
        "read": lambda: ring.read(r, buf),
        "write": lambda: ring.write(w, buf),
        "recv": lambda: ring.recv(sock, buf),
        "send": lambda: ring.send(sock, buf),
        "send_zc": lambda: ring.send_zc(sock, buf),
        "read_fixed": lambda: ring.read_fixed(r, buf),
        "write_fixed": lambda: ring.write_fixed(w, buf),
    }
    return actions[name]()


# -- construction, sizes, copies --------------------------------------------------------------

def test_new_buffer_is_free_and_page_backed() -> None:
    """A new standalone Buffer is FREE with its requested capacity, no valid bytes, index 0."""
    buf = Buffer(5000)
    assert buf.state is FREE
    assert buf.size == 5000
    assert buf.nbytes == 0
    assert buf.index == 0
    assert buf.tobytes() == b""
    with buf.view() as v:
        assert len(v) == 0
    with buf.view(whole=True) as v:
        assert len(v) == 5000
        assert not v.readonly
        assert bytes(v) == bytes(5000)  # fresh anonymous memory is zeroed
    assert "free" in repr(buf)
    buf.release()
    assert buf.state is RELEASED


@pytest.mark.parametrize("size, exc", [
    (0, ValueError), (-1, ValueError), ((1 << 30) + 1, ValueError),
    (1.0, TypeError), ("64", TypeError), (True, TypeError), (None, TypeError),
])
def test_buffer_bad_size_refused(size: Any, exc: type[Exception]) -> None:
    """Buffer(size) refuses sizes outside 1..1 GiB (ValueError) and non-int sizes (TypeError)."""
    with pytest.raises(exc):
        Buffer(size)


def test_buffer_largest_and_smallest_sizes() -> None:
    """A 1-byte buffer holds exactly 1 byte; fill refuses more than the capacity (ValueError),
    leaving the state unchanged."""
    buf = Buffer(1)
    assert buf.fill(b"a") == 1
    with pytest.raises(ValueError):
        buf.fill(b"ab")
    assert buf.state is FILLED
    assert buf.tobytes() == b"a"
    buf.release()


def test_buffer_init_twice_refused() -> None:
    """Calling __init__ again on a live buffer raises OperationStateError and changes nothing."""
    buf = Buffer(64)
    buf.fill(b"keep")
    with pytest.raises(OperationStateError):
        buf.__init__(128)  # type: ignore[misc]
    assert buf.size == 64
    assert buf.tobytes() == b"keep"
    buf.release()


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle"])
def test_buffer_copy_and_pickle_refused(how: str) -> None:
    """A Buffer cannot be copied, deep-copied or pickled (TypeError), in any state."""
    buf = Buffer(16)
    buf.fill(b"data")
    fn: Callable[[Any], Any] = {"copy": copy.copy, "deepcopy": copy.deepcopy,
                                "pickle": pickle.dumps}[how]
    with pytest.raises(TypeError):
        fn(buf)
    buf.release()
    with pytest.raises(TypeError):
        fn(buf)


def test_pooled_buffer_copy_and_pickle_refused(pool: BufferPool) -> None:
    """A leased pool buffer cannot be copied or pickled either (a copy would be a second lease)."""
    with pool.lease() as buf:
        for fn in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError):
                fn(buf)
    assert pool.available() == pool.count


# -- fill / mark_filled / view round trips -----------------------------------------------------

def test_fill_view_tobytes_round_trip() -> None:
    """fill copies bytes-like data (bytes, bytearray, memoryview, array) and returns its length;
    view()/tobytes() give exactly those bytes; refilling replaces them."""
    import array

    buf = Buffer(4096)
    assert buf.fill(b"hello") == 5
    assert buf.state is FILLED and buf.nbytes == 5
    assert buf.tobytes() == b"hello"
    with buf.view() as v:
        assert bytes(v) == b"hello"
    assert buf.fill(bytearray(b"ab")) == 2
    assert buf.tobytes() == b"ab"
    arr = array.array("I", [1, 2, 3])
    assert buf.fill(arr) == 12
    assert buf.tobytes() == arr.tobytes()
    assert buf.fill(memoryview(b"0123456789")[2:6]) == 4
    assert buf.tobytes() == b"2345"
    assert buf.fill(b"") == 0
    assert buf.state is FILLED and buf.nbytes == 0
    buf.release()


def test_fill_bad_data_refused() -> None:
    """fill refuses non-bytes-like data (TypeError) and too much data (ValueError), and the
    previous contents and state survive."""
    buf = Buffer(8)
    buf.fill(b"old")
    with pytest.raises(TypeError):
        buf.fill("text")
    with pytest.raises(TypeError):
        buf.fill(12)
    with pytest.raises(ValueError):
        buf.fill(b"123456789")
    assert buf.state is FILLED
    assert buf.tobytes() == b"old"
    buf.release()


def test_view_whole_then_mark_filled_round_trip(ring: saferring.Ring,
                                                pipe: tuple[int, int]) -> None:
    """Bytes written in place through view(whole=True), then declared with mark_filled(n), are
    what tobytes() returns and what ring.write sends."""
    r, w = pipe
    buf = Buffer(100)
    with buf.view(whole=True) as v:
        v[:11] = b"in place!!!"
    assert buf.state is FREE
    buf.mark_filled(9)
    assert buf.state is FILLED and buf.nbytes == 9
    assert buf.tobytes() == b"in place!"
    assert _run(ring, ring.write(w, buf)) == 9
    assert os.read(r, 100) == b"in place!"
    buf.mark_filled(0)
    assert buf.state is FILLED and buf.tobytes() == b""
    buf.mark_filled(100)
    assert buf.nbytes == 100
    buf.release()


@pytest.mark.parametrize("n", [-1, 101, 1.5, "3", None, True])
def test_mark_filled_bad_count_refused(n: Any) -> None:
    """mark_filled refuses a count outside 0..size or not an int (ValueError), state unchanged."""
    buf = Buffer(100)
    buf.fill(b"abc")
    with pytest.raises(ValueError):
        buf.mark_filled(n)
    assert buf.state is FILLED and buf.tobytes() == b"abc"
    buf.release()


# -- IN_FLIGHT: every access refused ----------------------------------------------------------

@pytest.mark.parametrize("name", _OWN + _KERNEL)
def test_in_flight_standalone_refuses_every_access(ring: saferring.Ring, pipe: tuple[int, int],
                                                   pipe2: tuple[int, int],
                                                   unix_pair: tuple[socket.socket, socket.socket],
                                                   name: str) -> None:
    """While a read on an empty pipe owns a standalone buffer, every access (its own methods and
    every ring op) raises BufferBusyError, queues nothing, and the read then fills it."""
    r, w = pipe
    buf = Buffer(64)
    op = ring.read(r, buf)
    ring.submit()
    assert buf.state is IN_FLIGHT
    assert buf.nbytes == 0
    assert ring.stats().pinned_bytes >= 64
    before = _in_flight(ring)
    with pytest.raises(BufferBusyError, match="kernel owns"):
        _access(name, ring, buf, pipe2, unix_pair[0])
    assert _in_flight(ring) == before
    assert buf.state is IN_FLIGHT
    os.write(w, b"arrived")
    assert _run(ring, op) == 7
    assert buf.state is FILLED
    assert buf.tobytes() == b"arrived"
    buf.release()


@pytest.mark.parametrize("name", _OWN + _KERNEL + _FIXED)
def test_in_flight_pooled_refuses_every_access(ring: saferring.Ring, pool: BufferPool,
                                               pipe: tuple[int, int], pipe2: tuple[int, int],
                                               unix_pair: tuple[socket.socket, socket.socket],
                                               name: str) -> None:
    """While a read_fixed on an empty pipe owns a pool buffer, every access (fixed ops included)
    raises BufferBusyError and queues nothing; the read then fills it."""
    r, w = pipe
    buf = pool.lease()
    op = ring.read_fixed(r, buf)
    ring.submit()
    assert buf.state is IN_FLIGHT
    before = _in_flight(ring)
    with pytest.raises(BufferBusyError):
        _access(name, ring, buf, pipe2, unix_pair[0])
    assert _in_flight(ring) == before
    assert buf.state is IN_FLIGHT
    os.write(w, b"fixed")
    assert _run(ring, op) == 5
    assert buf.state is FILLED and buf.tobytes() == b"fixed"
    buf.release()


def test_in_flight_with_exit_refuses_and_keeps_lease(ring: saferring.Ring, pool: BufferPool,
                                                     pipe: tuple[int, int]) -> None:
    """Leaving ``with buf:`` normally while the buffer is in flight raises BufferBusyError and
    keeps the lease (the buffer is not back in the pool until released after the read)."""
    r, w = pipe
    with pytest.raises(BufferBusyError), pool.lease() as buf:
        op = ring.read_fixed(r, buf)
        ring.submit()
    assert buf.state is IN_FLIGHT
    assert pool.available() == pool.count - 1
    os.write(w, b"x")
    assert _run(ring, op) == 1
    assert buf.state is FILLED
    assert pool.available() == pool.count - 1
    buf.release()
    assert pool.available() == pool.count


def test_repr_while_in_flight_and_filled(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """repr() names the state (and the byte count once filled), never raising while in flight."""
    r, w = pipe
    buf = Buffer(32)
    op = ring.read(r, buf)
    ring.submit()
    assert "in flight" in repr(buf)
    os.write(w, b"1234")
    _run(ring, op)
    assert "filled" in repr(buf) and "nbytes=4" in repr(buf)
    buf.release()
    assert "released" in repr(buf)


# -- RELEASED: every access refused -----------------------------------------------------------

@pytest.mark.parametrize("name", _OWN + _KERNEL + _FIXED)
@pytest.mark.parametrize("kind", ["standalone", "pooled"])
def test_released_refuses_every_access(ring: saferring.Ring, pool: BufferPool,
                                       pipe: tuple[int, int],
                                       unix_pair: tuple[socket.socket, socket.socket],
                                       kind: str, name: str) -> None:
    """After release(), every access to the dead handle raises OperationStateError and queues
    nothing; a pooled buffer is back in the pool exactly once."""
    buf = Buffer(64) if kind == "standalone" else pool.lease()
    buf.fill(b"abc")
    buf.release()
    assert buf.state is RELEASED
    assert buf.nbytes == 0
    with pytest.raises(OperationStateError):
        _access(name, ring, buf, pipe, unix_pair[0])
    assert _in_flight(ring) == 0
    assert buf.state is RELEASED
    # Leaving a with block on a released buffer is a no-op, with or without an exception.
    with buf:
        pass
    with pytest.raises(KeyError), buf:
        raise KeyError
    assert pool.available() == pool.count


# -- views alive ------------------------------------------------------------------------------

def _make_view(kind: str, buf: Buffer) -> Any:
    """Something alive that reaches the buffer's memory through view(); the plain memoryview
    from view() itself is released (or dropped) whenever the holder does not need it."""
    if kind == "view":
        return buf.view()
    if kind == "view_whole":
        return buf.view(whole=True)
    if kind == "slice":
        v = buf.view(whole=True)
        s = v[3:10]
        v.release()
        return s
    if kind == "memoryview_of_memoryview":
        v = buf.view()
        mm = memoryview(v)
        v.release()
        return mm
    if kind == "memoryview_of_slice":
        v = buf.view(whole=True)
        mm = memoryview(v[1:][1:])
        v.release()
        return mm
    if kind == "cast":
        v = buf.view(whole=True)
        return v.cast("I")
    if kind == "readonly":
        return buf.view().toreadonly()
    if kind == "ctypes":
        return (ctypes.c_char * 8).from_buffer(buf.view(whole=True))
    if kind == "view_obj":
        v = buf.view()
        m = v.obj  # the mapping itself
        v.release()
        return m
    if kind == "numpy":
        np = pytest.importorskip("numpy")
        arr = np.frombuffer(buf.view(whole=True), dtype=np.uint8)
        return arr[2:]  # a numpy view of a numpy view of the memoryview
    raise AssertionError(kind)


_VIEW_KINDS = ["view", "view_whole", "slice", "memoryview_of_memoryview", "memoryview_of_slice",
               "cast", "readonly", "ctypes", "view_obj", "numpy"]


@pytest.mark.parametrize("view_kind", _VIEW_KINDS)
@pytest.mark.parametrize("kind", ["standalone", "pooled"])
def test_live_view_blocks_kernel_and_release(ring: saferring.Ring, pool: BufferPool,
                                             pipe: tuple[int, int],
                                             unix_pair: tuple[socket.socket, socket.socket],
                                             kind: str, view_kind: str) -> None:
    """While a view (or a slice, memoryview of a memoryview, cast, ctypes or numpy array built on
    one) is alive, handing the buffer to the kernel and release() raise BufferBusyError and
    queue nothing; once the object is gone the same calls work and the data is intact."""
    r, w = pipe
    buf = Buffer(256) if kind == "standalone" else pool.lease()
    buf.fill(b"0123456789abcdef")
    holder = _make_view(kind=view_kind, buf=buf)
    gc.collect()
    names = _KERNEL + ["release"] + (_FIXED if kind == "pooled" else [])
    for name in names:
        with pytest.raises(BufferBusyError, match="memoryview"):
            _access(name, ring, buf, pipe, unix_pair[0])
        assert _in_flight(ring) == 0, name
        assert buf.state is FILLED, name
    with pytest.raises(BufferBusyError), buf:
        pass
    # Reading and filling through the buffer's own methods stays allowed with a view alive.
    assert buf.tobytes() == b"0123456789abcdef"
    del holder
    gc.collect()
    assert _run(ring, ring.write(w, buf)) == 16
    assert os.read(r, 100) == b"0123456789abcdef"
    buf.release()
    assert buf.state is RELEASED


def test_mapping_reached_through_view_cannot_be_closed(ring: saferring.Ring,
                                                       pipe: tuple[int, int]) -> None:
    """The mapping reached through ``view().obj`` cannot be closed or resized under the buffer
    (BufferError), and while it is held the buffer is not handed to the kernel."""
    r, w = pipe
    buf = Buffer(64)
    buf.fill(b"mapped")
    v = buf.view()
    m = v.obj
    v.release()
    del v
    with pytest.raises(BufferError):
        m.close()
    with pytest.raises(BufferError):
        m.resize(1 << 20)
    with pytest.raises(BufferBusyError):
        ring.write(w, buf)
    del m
    gc.collect()
    assert _run(ring, ring.write(w, buf)) == 6
    assert os.read(r, 64) == b"mapped"
    buf.release()


def test_plain_read_into_view_pins_pooled_buffer(ring: saferring.Ring, pool: BufferPool,
                                                 pipe: tuple[int, int]) -> None:
    """A plain ring.read into a memoryview of a pool buffer keeps the buffer blocked while the
    read runs: release() and read_fixed are refused, and a dropped handle comes back to the pool
    only once the read has ended (the kernel never writes into a re-leased buffer)."""
    r, w = pipe
    buf = pool.lease()
    v = buf.view(whole=True)
    op = ring.read(r, v)
    ring.submit()
    del v
    gc.collect()
    with pytest.raises(BufferBusyError):
        buf.release()
    with pytest.raises(BufferBusyError):
        ring.read_fixed(r, buf)
    assert _in_flight(ring) == 1
    del buf
    gc.collect()
    assert pool.available() == pool.count - 1
    os.write(w, b"into the view")
    assert _run(ring, op) == 13
    gc.collect()
    assert pool.available() == pool.count


def test_fill_from_own_overlapping_view() -> None:
    """fill() from a view of the same buffer (overlapping, shifted by one byte) copies like
    memmove: the result is exactly the shifted data."""
    data = os.urandom(1 << 20)
    buf = Buffer(len(data))
    buf.fill(data)
    with buf.view() as v:
        assert buf.fill(v[1:]) == len(data) - 1
    assert buf.tobytes() == data[1:]
    buf.fill(data)
    with buf.view(whole=True) as v:
        buf.fill(v[:1000])
    assert buf.tobytes() == data[:1000]
    buf.release()


def test_view_released_with_context_manager_unblocks(ring: saferring.Ring,
                                                     pipe: tuple[int, int]) -> None:
    """``with buf.view() as v:`` releases the view at the end of the block, so the buffer can go
    to the kernel right after; a copy made from a view (bytes, bytearray) does not block."""
    r, w = pipe
    buf = Buffer(64)
    buf.fill(b"payload")
    with buf.view() as v:
        copied = bytearray(v)
        frozen = bytes(v)
    assert _run(ring, ring.write(w, buf)) == 7
    assert os.read(r, 64) == b"payload" == copied == frozen
    buf.release()


def test_pooled_view_keeps_buffer_out_of_pool_after_exception(pool: BufferPool) -> None:
    """Leaving ``with pool.lease()`` on an exception while a view is alive returns the buffer
    quietly, but only once the view is gone (it is never leased out while someone reads it)."""
    with pytest.raises(RuntimeError), pool.lease() as buf:
        buf.fill(b"seen")
        v = buf.view()
        raise RuntimeError("boom")
    assert pool.available() == pool.count - 1
    leased = [pool.lease() for _ in range(pool.count - 1)]
    with pytest.raises(BufferBusyError):
        pool.lease()
    assert bytes(v) == b"seen"  # nobody else got that memory
    v.release()
    assert pool.available() == 1
    leased.append(pool.lease())
    assert sorted(b.index for b in leased) == list(range(pool.count))
    for b in leased:
        b.release()


def test_dropped_pooled_handle_with_view_comes_back_after_view(pool: BufferPool) -> None:
    """A pool buffer whose handle is dropped (never released) goes back to the pool once the
    last view of it is gone, not before."""
    buf = pool.lease()
    v = buf.view(whole=True)
    del buf
    gc.collect()
    assert pool.available() == pool.count - 1
    del v
    gc.collect()
    assert pool.available() == pool.count


# -- Buffers with read / write / recv / send ------------------------------------------------------

def test_read_and_write_buffer_over_pipe(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """ring.write sends exactly a buffer's filled bytes (leaving it FILLED as it was), and
    ring.read fills a buffer (FILLED with the byte count, up to its capacity)."""
    r, w = pipe
    src = Buffer(4096)
    data = os.urandom(3000)
    src.fill(data)
    op = ring.write(w, src)
    assert src.state is IN_FLIGHT
    assert _run(ring, op) == 3000
    assert src.state is FILLED and src.tobytes() == data
    dst = Buffer(1000)
    op = ring.read(r, dst)
    assert _run(ring, op) == 1000
    assert dst.state is FILLED and dst.nbytes == 1000
    assert dst.tobytes() == data[:1000]
    # Reading into a FILLED buffer replaces its contents.
    assert _run(ring, ring.read(r, dst)) == 1000
    assert dst.tobytes() == data[1000:2000]
    src.release()
    dst.release()
    assert os.read(r, 4096) == data[2000:]


def test_write_of_free_buffer_writes_nothing(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A FREE buffer has no valid bytes: ring.write of it writes 0 bytes and it stays FREE."""
    _r, w = pipe
    buf = Buffer(64)
    assert _run(ring, ring.write(w, buf)) == 0
    assert buf.state is FREE
    buf.release()


def test_read_at_eof_fills_zero_bytes(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A read at end of file succeeds with 0: the buffer is FILLED with 0 bytes."""
    r, w = pipe
    os.close(w)
    buf = Buffer(64)
    buf.fill(b"stale")
    assert _run(ring, ring.read(r, buf)) == 0
    assert buf.state is FILLED and buf.nbytes == 0 and buf.tobytes() == b""
    buf.release()


def test_read_and_write_buffer_at_file_offsets(ring: saferring.Ring,
                                               datafile: tuple[str, bytes]) -> None:
    """ring.read/write with a Buffer honour explicit offsets on a regular file."""
    path, data = datafile
    fd = os.open(path, os.O_RDWR)
    try:
        buf = Buffer(100)
        assert _run(ring, ring.read(fd, buf, 5000)) == 100
        assert buf.tobytes() == data[5000:5100]
        buf.fill(b"OVERWRITE")
        assert _run(ring, ring.write(fd, buf, 7)) == 9
        assert os.pread(fd, 20, 0) == data[:7] + b"OVERWRITE" + data[16:20]
        assert _run(ring, ring.read(fd, buf, len(data) - 10)) == 10
        assert buf.tobytes() == data[-10:]
        with pytest.raises(ValueError):
            ring.read(fd, buf, -2)
        assert buf.state is FILLED and _in_flight(ring) == 0
        buf.release()
    finally:
        os.close(fd)


def test_send_and_recv_buffer_over_socketpair(ring: saferring.Ring,
                                              unix_pair: tuple[socket.socket, socket.socket]
                                              ) -> None:
    """ring.send of a Buffer sends its filled bytes; ring.recv into a Buffer fills it; both
    results are byte counts, and recv returns 0 (FILLED, empty) once the peer closes."""
    a, b = unix_pair
    out = Buffer(1 << 16)
    data = os.urandom(50_000)
    out.fill(data)
    assert _run(ring, ring.send(a, out)) == len(data)
    assert out.state is FILLED and out.nbytes == len(data)
    got = bytearray()
    inbuf = Buffer(1 << 16)
    while len(got) < len(data):
        n = _run(ring, ring.recv(b, inbuf))
        assert n > 0
        assert inbuf.nbytes == n
        got += inbuf.tobytes()
    assert bytes(got) == data
    # recv in flight until data arrives, then the peer's close gives 0.
    op = ring.recv(b, inbuf)
    ring.submit()
    assert inbuf.state is IN_FLIGHT
    a.sendall(b"last")
    assert _run(ring, op) == 4 and inbuf.tobytes() == b"last"
    a.shutdown(socket.SHUT_WR)
    assert _run(ring, ring.recv(b, inbuf)) == 0
    assert inbuf.state is FILLED and inbuf.nbytes == 0
    out.release()
    inbuf.release()


def test_pooled_buffer_with_plain_ops(ring: saferring.Ring, pool: BufferPool,
                                      unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """A pool buffer works with ring.send/recv too (not only the fixed ops)."""
    a, b = unix_pair
    with pool.lease() as out, pool.lease() as inbuf:
        out.fill(b"pooled bytes")
        assert _run(ring, ring.send(a, out)) == 12
        assert _run(ring, ring.recv(b, inbuf)) == 12
        assert inbuf.tobytes() == b"pooled bytes"
    assert pool.available() == pool.count


def test_failed_read_leaves_buffer_free(ring: saferring.Ring) -> None:
    """A read on a closed descriptor fails with EBADF from the CQE; the buffer (FILLED before)
    is then FREE with no valid bytes, and usable again."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    buf = Buffer(64)
    buf.fill(b"previous")
    op = ring.read(r, buf)
    _finish(ring, op)
    assert op.state is OpState.FAILED
    with pytest.raises(OSError) as info:
        op.result()
    assert info.value.errno == errno.EBADF
    assert buf.state is FREE and buf.nbytes == 0 and buf.tobytes() == b""
    assert buf.fill(b"again") == 5
    buf.release()


def test_failed_send_leaves_buffer_as_it_was(ring: saferring.Ring) -> None:
    """A send on a closed socket fails (EBADF/ENOTSOCK) and the buffer keeps its bytes."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    buf = Buffer(64)
    buf.fill(b"kept")
    op = ring.send(w, buf)
    _finish(ring, op)
    assert op.state is OpState.FAILED
    with pytest.raises(OSError):
        op.result()
    assert buf.state is FILLED and buf.tobytes() == b"kept"
    buf.release()


def test_cancelled_read_leaves_buffer_free_and_reusable(ring: saferring.Ring,
                                                        pipe: tuple[int, int]) -> None:
    """A cancelled read ends CANCELLED with the buffer FREE (no bytes), and the same buffer then
    takes a new read normally."""
    r, w = pipe
    buf = Buffer(64)
    buf.fill(b"old contents")
    op = ring.read(r, buf)
    ring.submit()
    op.cancel()
    assert buf.state is IN_FLIGHT  # still the kernel's until the final CQE
    _finish(ring, op)
    assert op.state is OpState.CANCELLED
    with pytest.raises(saferring.OperationCancelledError):
        op.result()
    assert buf.state is FREE and buf.nbytes == 0
    os.write(w, b"fresh")
    assert _run(ring, ring.read(r, buf)) == 5
    assert buf.tobytes() == b"fresh"
    buf.release()


def test_cancelled_fixed_read_returns_pool_buffer(ring: saferring.Ring, pool: BufferPool,
                                                  pipe: tuple[int, int]) -> None:
    """A cancelled read_fixed leaves the pool buffer FREE and releasable."""
    r, _w = pipe
    buf = pool.lease()
    op = ring.read_fixed(r, buf)
    ring.submit()
    op.cancel()
    _finish(ring, op)
    assert op.state is OpState.CANCELLED
    assert buf.state is FREE
    buf.release()
    assert pool.available() == pool.count


def test_buffer_refused_on_closed_ring(pipe: tuple[int, int]) -> None:
    """A closed ring refuses a Buffer (RingClosedError) and leaves it untouched."""
    r, _w = pipe
    ring = saferring.Ring(4)
    ring.close()
    buf = Buffer(16)
    with pytest.raises(saferring.RingClosedError):
        ring.read(r, buf)
    assert buf.state is FREE
    buf.release()


def test_ring_close_cancels_buffer_read(pipe: tuple[int, int]) -> None:
    """ring.close() with a read into a standalone buffer in flight cancels it: FREE after."""
    r, _w = pipe
    ring = saferring.Ring(4)
    buf = Buffer(16)
    op = ring.read(r, buf)
    ring.submit()
    ring.close(timeout=5)
    assert op.state is OpState.CANCELLED
    assert buf.state is FREE
    buf.release()


# -- BufferPool ----------------------------------------------------------------------------------

def test_pool_lease_with_and_release(ring: saferring.Ring, pool: BufferPool) -> None:
    """Leases come out FREE with distinct indexes, go back at the end of ``with`` or on
    release(), and the pool reports count/size/available."""
    assert (pool.count, pool.size, pool.closed) == (4, 8192, False)
    assert pool.available() == 4
    with pool.lease() as a:
        assert a.state is FREE and a.size == 8192 and a.nbytes == 0
        assert pool.available() == 3
        b = pool.lease()
        assert b.index != a.index and {a.index, b.index} <= set(range(4))
        assert pool.available() == 2
        b.release()
        assert pool.available() == 3
        with pytest.raises(OperationStateError):
            b.release()
        assert pool.available() == 3
    assert a.state is RELEASED
    assert pool.available() == 4
    assert "available=4" in repr(pool)


def test_pool_exhaustion(pool: BufferPool) -> None:
    """Leasing more buffers than the pool has raises BufferBusyError; one release makes room."""
    leased = [pool.lease() for _ in range(pool.count)]
    assert pool.available() == 0
    with pytest.raises(BufferBusyError):
        pool.lease()
    leased.pop().release()
    again = pool.lease()
    with pytest.raises(BufferBusyError):
        pool.lease()
    for b in [*leased, again]:
        b.release()


def test_pool_dropped_handle_returns(pool: BufferPool) -> None:
    """A leased buffer dropped without release() goes back to the pool by itself."""
    buf = pool.lease()
    buf.fill(b"x")
    del buf
    gc.collect()
    assert pool.available() == pool.count


def test_pool_exception_inside_with_returns_buffer(pool: BufferPool) -> None:
    """An exception inside ``with pool.lease()`` propagates unchanged and returns the buffer."""
    with pytest.raises(ZeroDivisionError), pool.lease() as buf:
        buf.fill(b"abc")
        1 / 0  # noqa: B018
    assert pool.available() == pool.count


def test_pool_exception_while_read_in_flight(ring: saferring.Ring, pool: BufferPool,
                                             pipe: tuple[int, int]) -> None:
    """An exception inside ``with pool.lease()`` while a read into it is in flight propagates
    (no BufferBusyError over it); the buffer comes back to the pool only after the read ends,
    and the read's bytes land in pool memory, not in memory reused by another lease."""
    r, w = pipe
    with pytest.raises(RuntimeError, match="user error"), pool.lease() as buf:
        op = ring.read_fixed(r, buf)
        ring.submit()
        raise RuntimeError("user error")
    index = buf.index
    del buf
    gc.collect()
    assert pool.available() == pool.count - 1
    others = [pool.lease() for _ in range(pool.count - 1)]
    assert index not in {b.index for b in others}
    with pytest.raises(BufferBusyError):
        pool.lease()
    assert ring.stats().in_flight == 1
    os.write(w, b"late data")
    assert _run(ring, op) == 9
    gc.collect()
    assert pool.available() == 1
    last = pool.lease()
    assert last.index == index
    for b in [*others, last]:
        b.release()


def test_abandoned_handle_stays_released_after_read_ends(ring: saferring.Ring, pool: BufferPool,
                                                         pipe: tuple[int, int]) -> None:
    """A handle released by leaving ``with`` on an exception while its read was in flight stays
    RELEASED after the read ends: it cannot read the memory or release it a second time, and
    the pool never holds more free buffers than it has."""
    r, w = pipe
    with pytest.raises(RuntimeError), pool.lease() as buf:
        op = ring.read_fixed(r, buf)
        ring.submit()
        raise RuntimeError
    try:
        # While the read runs the dead handle may say IN_FLIGHT (the kernel still owns it).
        assert buf.state in (RELEASED, IN_FLIGHT)
        os.write(w, b"data")
        _run(ring, op)
        assert buf.state is RELEASED, f"dead handle came back as {buf.state}"
        with pytest.raises(OperationStateError):
            buf.tobytes()
        with pytest.raises(OperationStateError):
            buf.release()
    finally:
        available = pool.available()
        leased = []
        for _ in range(2 * pool.count):  # bounded: count leases, plus any duplicates
            try:
                leased.append(pool.lease())
            except BufferBusyError:
                break
        indexes = [b.index for b in leased]
        for b in leased:
            b.release()
        # Put the pool back in a consistent state for the fixture's check (and make the dead
        # handle's finaliser a no-op, as it is when the state machine holds).
        buf._op = None
        buf._state = RELEASED
        pool._held.clear()
        pool._free.clear()
        pool._free.extend(range(pool.count))
    assert available <= pool.count, f"pool reports {available} free of {pool.count}"
    assert len(indexes) == len(set(indexes)), f"pool leased a buffer twice: {indexes}"


def test_second_pool_refused(ring: saferring.Ring) -> None:
    """A ring has one open pool: a second BufferPool raises OperationStateError (the first keeps
    working); after the first is closed (here by its ``with``) a new one is accepted."""
    with BufferPool(ring, 2, 4096) as first:
        with pytest.raises(OperationStateError):
            BufferPool(ring, 2, 4096)
        assert not first.closed
        with first.lease() as buf:
            assert buf.state is FREE
    assert first.closed
    with pytest.raises(OperationStateError):
        first.lease()
    second = BufferPool(ring, 1, 4096)
    assert not second.closed
    second.close()
    second.close()  # idempotent
    assert second.closed


@pytest.mark.parametrize("count, size, exc", [
    (0, 4096, ValueError), (-1, 4096, ValueError), ((1 << 14) + 1, 4096, ValueError),
    (1, 0, ValueError), (1, (1 << 30) + 1, ValueError),
    (1.0, 4096, TypeError), ("2", 4096, TypeError), (2, True, TypeError), (None, 1, TypeError),
])
def test_pool_bad_sizes_refused(ring: saferring.Ring, count: Any, size: Any,
                                exc: type[Exception]) -> None:
    """BufferPool refuses bad counts/sizes (ValueError/TypeError) without registering anything:
    a valid pool can be created right after."""
    with pytest.raises(exc):
        BufferPool(ring, count, size)
    with BufferPool(ring, 1, 4096) as p:
        assert p.available() == 1


def test_pool_on_closed_ring_refused() -> None:
    """A BufferPool cannot be created on a closed ring (RingClosedError)."""
    ring = saferring.Ring(4)
    ring.close()
    with pytest.raises(saferring.RingClosedError):
        BufferPool(ring, 1, 4096)


def test_read_fixed_write_fixed_with_offsets_and_length(ring: saferring.Ring, pool: BufferPool,
                                                        tmp_path: os.PathLike[str]) -> None:
    """write_fixed writes a pool buffer's filled bytes (or its first ``length``) at an offset or
    the file position; read_fixed reads up to the capacity (or ``length``) at an offset."""
    path = os.path.join(os.fspath(tmp_path), "fixed.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        data = os.urandom(8192)
        with pool.lease() as out, pool.lease() as inb:
            out.fill(data)
            assert _run(ring, ring.write_fixed(fd, out, 100)) == 8192
            assert out.state is FILLED and out.nbytes == 8192
            assert os.pread(fd, 9000, 0) == bytes(100) + data
            assert _run(ring, ring.write_fixed(fd, out, 0, length=10)) == 10
            assert os.pread(fd, 10, 0) == data[:10]
            # offset -1: the file position, which advances.
            os.lseek(fd, 0, os.SEEK_END)
            assert _run(ring, ring.write_fixed(fd, out, -1, length=3)) == 3
            assert _run(ring, ring.write_fixed(fd, out, length=2)) == 2
            assert os.fstat(fd).st_size == 8292 + 5
            assert os.pread(fd, 5, 8292) == data[:3] + data[:2]
            assert _run(ring, ring.read_fixed(fd, inb, 100)) == 8192
            assert inb.tobytes() == data
            assert _run(ring, ring.read_fixed(fd, inb, 200, length=50)) == 50
            assert inb.nbytes == 50 and inb.tobytes() == data[100:150]
            assert _run(ring, ring.read_fixed(fd, inb, 8290)) == 7  # short read at EOF
            assert inb.tobytes() == data[8190:] + data[:3] + data[:2]
            os.lseek(fd, 100, os.SEEK_SET)
            assert _run(ring, ring.read_fixed(fd, inb, length=4)) == 4
            assert _run(ring, ring.read_fixed(fd, inb, -1, length=4)) == 4
            assert inb.tobytes() == data[4:8]
            assert _run(ring, ring.read_fixed(fd, inb, length=0)) == 0
            assert inb.state is FILLED and inb.nbytes == 0
    finally:
        os.close(fd)


def _o_direct_fd(directory: str) -> int:
    path = os.path.join(directory, "direct.bin")
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("os.O_DIRECT is not available on this platform")
    try:
        return os.open(path, flags, 0o600)
    except OSError as exc:
        pytest.skip(f"the temporary filesystem refuses O_DIRECT ({exc.strerror})")


def test_fixed_io_with_o_direct(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """read_fixed/write_fixed work with O_DIRECT (pool buffers are page-aligned): aligned
    offsets and lengths round-trip; a misaligned offset fails with EINVAL and leaves the read
    buffer FREE."""
    fd = _o_direct_fd(os.fspath(tmp_path))
    try:
        with BufferPool(ring, 2, 16384) as pool:
            data = os.urandom(16384)
            with pool.lease() as out, pool.lease() as inb:
                out.fill(data)
                assert _run(ring, ring.write_fixed(fd, out, 4096, length=8192)) == 8192
                assert os.fstat(fd).st_size == 4096 + 8192
                assert _run(ring, ring.read_fixed(fd, inb, 4096)) == 8192
                assert inb.tobytes() == data[:8192]
                assert _run(ring, ring.read_fixed(fd, inb, 8192, length=4096)) == 4096
                assert inb.tobytes() == data[4096:8192]
                op = ring.read_fixed(fd, inb, 100, length=4096)
                _finish(ring, op)
                if op.state is OpState.FAILED:
                    with pytest.raises(OSError) as info:
                        op.result()
                    assert info.value.errno == errno.EINVAL
                    assert inb.state is FREE
                else:  # some filesystems fall back to buffered I/O for misaligned requests
                    assert inb.tobytes() == (bytes(4096) + data[:8192])[100:4196]
            assert pool.available() == 2
    finally:
        os.close(fd)


@pytest.mark.parametrize("length_kind", ["read_over", "write_over", "negative", "float", "bool"])
def test_fixed_bad_length_refused(ring: saferring.Ring, pool: BufferPool, pipe: tuple[int, int],
                                  length_kind: str) -> None:
    """read_fixed refuses a length above the capacity, write_fixed one above nbytes, and both a
    negative or non-int length (ValueError), queuing nothing and leaving the buffer as it was."""
    r, w = pipe
    with pool.lease() as buf:
        buf.fill(b"12345")
        call: Callable[[], Any] = {
            "read_over": lambda: ring.read_fixed(r, buf, length=buf.size + 1),
            "write_over": lambda: ring.write_fixed(w, buf, length=6),
            "negative": lambda: ring.read_fixed(r, buf, length=-1),
            "float": lambda: ring.write_fixed(w, buf, length=2.0),
            "bool": lambda: ring.write_fixed(w, buf, length=True),
        }[length_kind]
        with pytest.raises(ValueError):
            call()
        assert _in_flight(ring) == 0
        assert buf.state is FILLED and buf.tobytes() == b"12345"


def test_fixed_bad_offset_refused(ring: saferring.Ring, pool: BufferPool,
                                  pipe: tuple[int, int]) -> None:
    """read_fixed/write_fixed refuse an offset below -1 or beyond a file offset's range
    (ValueError: 2**64 must not wrap round to 0) and a non-int (TypeError)."""
    r, w = pipe
    with pool.lease() as buf:
        with pytest.raises(ValueError):
            ring.read_fixed(r, buf, -2)
        for too_far in (1 << 63, 1 << 64):
            with pytest.raises(ValueError):
                ring.read_fixed(r, buf, too_far)
            with pytest.raises(ValueError):
                ring.write_fixed(w, buf, too_far)
        with pytest.raises(TypeError):
            ring.write_fixed(w, buf, "0")
        assert _in_flight(ring) == 0 and buf.state is FREE


def test_fixed_refuses_foreign_buffers(ring: saferring.Ring, pool: BufferPool,
                                       pipe: tuple[int, int],
                                       unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """read_fixed/write_fixed refuse (OperationStateError) a standalone Buffer, a buffer leased
    from another ring's pool, and a buffer picked from a BufferRing; non-Buffers raise TypeError.
    Nothing is queued and each buffer keeps its state."""
    r, w = pipe
    standalone = Buffer(64)
    standalone.fill(b"s")
    with saferring.Ring(4) as other, BufferPool(other, 1, 4096) as other_pool:
        foreign = other_pool.lease()
        foreign.fill(b"f")
        br = BufferRing(ring, 2, 64)
        a, b = unix_pair
        a.sendall(b"picked")
        picked = _run(ring, ring.recv(b, br))
        assert isinstance(picked, Buffer) and picked.tobytes() == b"picked"
        for victim in (standalone, foreign, picked):
            with pytest.raises(OperationStateError):
                ring.read_fixed(r, victim)
            with pytest.raises(OperationStateError):
                ring.write_fixed(w, victim)
            assert victim.state is FILLED
        assert _in_flight(ring) == 0
        for bad in (bytearray(64), b"bytes", memoryview(bytearray(8)), None, br, pool):
            with pytest.raises(TypeError):
                ring.read_fixed(r, bad)  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                ring.write_fixed(w, bad)  # type: ignore[arg-type]
        assert _in_flight(ring) == 0
        # The foreign buffer still works with its own ring.
        assert _run(other, other.write_fixed(w, foreign)) == 1
        assert os.read(r, 10) == b"f"
        foreign.release()
        picked.release()
        br.close()
    standalone.release()


def test_fixed_refused_after_pool_closed(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A buffer leased before its pool was closed is still valid memory (plain read works) but
    read_fixed refuses it (OperationStateError), also once a new pool is open on the ring;
    lease() on the closed pool is refused too."""
    r, w = pipe
    pool = BufferPool(ring, 2, 4096)
    buf = pool.lease()
    pool.close()
    assert pool.closed
    with pytest.raises(OperationStateError):
        ring.read_fixed(r, buf)
    with pytest.raises(OperationStateError):
        pool.lease()
    os.write(w, b"plain")
    assert _run(ring, ring.read(r, buf)) == 5
    assert buf.tobytes() == b"plain"
    with BufferPool(ring, 2, 4096) as new_pool:
        with pytest.raises(OperationStateError):
            ring.write_fixed(w, buf)
        assert _in_flight(ring) == 0
        with new_pool.lease() as fresh:
            os.write(w, b"new")
            assert _run(ring, ring.read_fixed(r, fresh)) == 3
            assert fresh.tobytes() == b"new"
        assert new_pool.available() == 2
    buf.release()
    assert buf.state is RELEASED


def test_pool_close_refused_while_buffer_in_flight(ring: saferring.Ring, pipe: tuple[int, int]
                                                   ) -> None:
    """pool.close() while a leased buffer's read_fixed is in flight is refused (the kernel would
    lose the registered buffer under the read); after the read ends it closes."""
    r, w = pipe
    pool = BufferPool(ring, 2, 4096)
    buf = pool.lease()
    op = ring.read_fixed(r, buf)
    ring.submit()
    with pytest.raises(BufferBusyError):
        pool.close()
    assert not pool.closed
    os.write(w, b"ok")
    assert _run(ring, op) == 2
    assert buf.tobytes() == b"ok"
    pool.close()
    assert pool.closed
    buf.release()


def test_pool_close_refused_while_abandoned_buffer_in_flight(ring: saferring.Ring,
                                                             pipe: tuple[int, int]) -> None:
    """pool.close() is refused also while a buffer whose handle was abandoned (exception in
    ``with``) is still in flight; it closes once that read ends."""
    r, w = pipe
    pool = BufferPool(ring, 2, 4096)
    with pytest.raises(LookupError), pool.lease() as buf:
        op = ring.read_fixed(r, buf)
        ring.submit()
        raise LookupError
    del buf
    with pytest.raises(BufferBusyError):
        pool.close()
    assert not pool.closed
    os.write(w, b"z")
    _run(ring, op)
    pool.close()
    assert pool.closed


def test_ring_close_closes_pool(pipe: tuple[int, int]) -> None:
    """ring.close() with a read_fixed in flight cancels it (buffer FREE) and closes the pool:
    lease() is then refused, a held lease can still be released, and its memory is readable."""
    r, _w = pipe
    ring = saferring.Ring(8)
    pool = BufferPool(ring, 2, 4096)
    held = pool.lease()
    held.fill(b"mine")
    buf = pool.lease()
    op = ring.read_fixed(r, buf)
    ring.submit()
    ring.close(timeout=5)
    assert op.state is OpState.CANCELLED
    assert pool.closed
    assert "closed" in repr(pool)
    assert buf.state is FREE
    with pytest.raises(OperationStateError):
        pool.lease()
    with pytest.raises(saferring.RingClosedError):
        ring.read_fixed(r, held)
    assert held.tobytes() == b"mine"
    pool.close()  # already closed: no-op
    held.release()
    buf.release()


@pytest.mark.slow
def test_memlock_limit_error_in_subprocess() -> None:
    """Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, a 64 MiB pool raises
    MemlockLimitError (a MemoryError) naming RLIMIT_MEMLOCK and the current limit; the ring
    stays usable and a small pool still registers."""
    out = run_isolated("""
        import os, resource
        import saferring
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
        if os.geteuid() == 0:
            os.setuid(65534)  # drop CAP_IPC_LOCK: registered pages count against the limit
        ring = saferring.Ring(8)
        try:
            saferring.BufferPool(ring, 64, 1 << 20)
        except saferring.MemlockLimitError as exc:
            assert isinstance(exc, MemoryError), type(exc).__mro__
            assert isinstance(exc, saferring.SaferRingError)
            msg = str(exc)
            assert "RLIMIT_MEMLOCK" in msg, msg
            assert "65536" in msg, msg
        else:
            raise AssertionError("a 64 MiB pool registered under a 64 KiB memlock limit")
        with saferring.BufferPool(ring, 1, 4096) as pool:
            r, w = os.pipe()
            with pool.lease() as buf:
                os.write(w, b"ok")
                assert ring.run(ring.read_fixed(r, buf)) == 2
            os.close(r)
            os.close(w)
        s = ring.stats()
        assert s.in_flight == 0 and s.pinned_bytes == 0, s
        ring.close()
        print("memlock ok")
    """)
    assert "memlock ok" in out


# -- zero-copy sends -----------------------------------------------------------------------------

@pytest.mark.needs("op:SEND_ZC")
def test_send_zc_pooled_buffer_over_tcp(ring: saferring.Ring, pool: BufferPool,
                                        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """send_zc of a pool buffer over 127.0.0.1 TCP delivers its exact bytes and reports the byte
    count; the buffer is IN_FLIGHT (and the pool cannot close) until the notification, then
    FILLED as it was."""
    client, server = tcp_pair
    data = os.urandom(pool.size)
    buf = pool.lease()
    buf.fill(data)
    op = ring.send_zc(client, buf)
    ring.submit()
    assert isinstance(op, saferring.operation.BufferSendZcOperation)
    assert buf.state is IN_FLIGHT
    with pytest.raises(BufferBusyError):
        buf.view()
    with pytest.raises(BufferBusyError):
        pool.close()
    assert _recv_exactly(server, len(data), ring) == data
    assert _run(ring, op) == len(data)
    assert op.state is OpState.COMPLETED
    assert buf.state is FILLED and buf.tobytes() == data
    buf.release()


@pytest.mark.needs("op:SEND_ZC")
def test_send_zc_dropped_standalone_buffer(ring: saferring.Ring,
                                           tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A standalone Buffer sent with send_zc whose only Python reference is dropped (del +
    gc.collect) right after submission stays alive until the notification: the receiver gets
    exactly its bytes and the op reports the byte count."""
    client, server = tcp_pair
    data = os.urandom(256 * 1024)
    buf = Buffer(len(data))
    buf.fill(data)
    op = ring.send_zc(client, buf)
    ring.submit()
    del buf
    gc.collect()
    # Churn the allocator: fresh buffers and objects that could reuse freed memory.
    noise = [Buffer(len(data)) for _ in range(4)]
    for n in noise:
        n.fill(b"\xee" * len(data))
    assert ring.stats().pinned_bytes >= len(data)
    assert _recv_exactly(server, len(data), ring) == data
    assert _run(ring, op) == len(data)
    for n in noise:
        assert n.tobytes() == b"\xee" * len(data)
        n.release()


@pytest.mark.needs("op:SEND_ZC")
def test_send_zc_dropped_pooled_buffer(ring: saferring.Ring, pool: BufferPool,
                                       tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A pool buffer sent with send_zc and dropped before the notification is not leased again
    until the notification; the receiver gets exactly its bytes."""
    client, server = tcp_pair
    data = os.urandom(pool.size)
    buf = pool.lease()
    buf.fill(data)
    op = ring.send_zc(client, buf)
    ring.submit()
    del buf
    gc.collect()
    assert pool.available() == pool.count - 1
    assert _recv_exactly(server, len(data), ring) == data
    assert _run(ring, op) == len(data)
    gc.collect()
    assert pool.available() == pool.count


@pytest.mark.needs("op:SEND_ZC")
def test_send_zc_unsupported_socket_fails_from_cqe(ring: saferring.Ring,
                                                   unix_pair: tuple[socket.socket, socket.socket]
                                                   ) -> None:
    """send_zc of a Buffer on an AF_UNIX socket (no zero-copy support) fails with an OSError
    (EOPNOTSUPP) from the CQE; the buffer keeps its bytes and nothing stays pinned."""
    a, _b = unix_pair
    buf = Buffer(64)
    buf.fill(b"not sent")
    op = ring.send_zc(a, buf)
    _finish(ring, op)
    assert op.state is OpState.FAILED
    with pytest.raises(OSError) as info:
        op.result()
    assert info.value.errno == errno.EOPNOTSUPP
    assert buf.state is FILLED and buf.tobytes() == b"not sent"
    buf.release()


@pytest.mark.needs("op:SEND_ZC")
def test_send_zc_buffer_to_address(ring: saferring.Ring) -> None:
    """send_zc of a Buffer with ``address`` sends the datagram to that address, as it does for
    bytes (or refuses the argument up front)."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((LOCAL4, 0))
        rx.settimeout(5)
        buf = Buffer(64)
        buf.fill(b"datagram")
        op = ring.send_zc(tx, buf, address=rx.getsockname())
        _finish(ring, op)
        assert op.result() == 8
        assert rx.recv(64) == b"datagram"
        buf.release()
    finally:
        rx.close()
        tx.close()


# -- GC pressure ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_gc_pressure_dropped_buffers_with_reads_in_flight() -> None:
    """In a subprocess with an aggressive GC: rounds of reads into standalone and pool buffers,
    most handles dropped while the reads are in flight (gc.collect() each round), some reads
    cancelled; every read reports its byte count, kept buffers hold exactly their pipe's data,
    fresh allocations are never overwritten, and every pool buffer comes back."""
    out = run_isolated("""
        import gc, os, time
        import saferring
        from saferring import Buffer, BufferPool, OperationCancelledError

        gc.set_threshold(50, 5, 5)
        ring = saferring.Ring(256)
        pool = BufferPool(ring, 32, 4096)
        N = 16
        for rnd in range(30):
            pipes = [os.pipe() for _ in range(N)]
            ops, kept = [], []
            for i, (r, w) in enumerate(pipes):
                buf = pool.lease() if i % 2 else Buffer(4096 + 512 * (i % 3))
                ops.append(ring.read(r, buf) if i % 4 != 1 else ring.read_fixed(r, buf))
                if i % 3 == 0:
                    kept.append((i, buf))
                del buf
            ring.submit()
            gc.collect()
            canaries = [Buffer(4096) for _ in range(8)]
            for c in canaries:
                c.fill(b"\\xaa" * 4096)
            blobs = [bytearray(b"\\x55" * 4096) for _ in range(8)]
            payload = [os.urandom(1 + (rnd * 37 + j * 101) % 4096) for j in range(N)]
            cancelled = set()
            for j, ((r, w), p) in enumerate(zip(pipes, payload)):
                if j % 5 == 4:
                    ops[j].cancel()
                    cancelled.add(j)
                else:
                    os.write(w, p)
                gc.collect()
            deadline = time.monotonic() + 10
            while not all(op.done() for op in ops):
                assert time.monotonic() < deadline, [op for op in ops if not op.done()]
                ring.wait(1, timeout=1)
            gc.collect()
            for j, op in enumerate(ops):
                if j in cancelled:
                    try:
                        op.result()
                    except OperationCancelledError:
                        pass
                    else:
                        raise AssertionError(f"round {rnd}: read {j} was not cancelled")
                else:
                    assert op.result() == len(payload[j]), (rnd, j, op)
            for i, buf in kept:
                if i in cancelled:
                    assert buf.state is saferring.BufferState.FREE, (rnd, i, buf)
                else:
                    assert buf.tobytes() == payload[i], (rnd, i)
                buf.release()
            for c in canaries:
                assert c.tobytes() == b"\\xaa" * 4096, rnd
                c.release()
            for bl in blobs:
                assert bl == b"\\x55" * 4096, rnd
            for r, w in pipes:
                os.close(r)
                os.close(w)
            del ops, kept, canaries, blobs
            gc.collect()
            assert pool.available() == pool.count, (rnd, pool.available())
        s = ring.stats()
        assert s.in_flight == 0 and s.pinned_bytes == 0, s
        pool.close()
        ring.close()
        print("gc ok")
    """)
    assert "gc ok" in out


# -- read_fixed_many ---------------------------------------------------------------------------


def test_read_fixed_many_places_each_block(ring: saferring.Ring, pool: BufferPool,
                                           tmp_path: Any) -> None:
    """read_fixed_many reads offsets[i] into buffers[i] in one batch: every buffer is IN_FLIGHT
    until the batch ends, then FILLED with its own count (a short read at end of file too)."""
    data = os.urandom(4 * 8192 + 100)
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        bufs = [pool.lease() for _ in range(4)]
        offsets = [3 * 8192, 0, 4 * 8192, 8192]
        batch = ring.read_fixed_many(fd, bufs, offsets)
        assert all(b.state is IN_FLIGHT for b in bufs)
        with pytest.raises(BufferBusyError):
            bufs[0].view()
        assert ring.run(batch) == [8192, 8192, 100, 8192]
        for buf, off in zip(bufs, offsets, strict=True):
            assert buf.state is FILLED
            assert buf.tobytes() == data[off:off + 8192]
        # Again, with a length: each buffer now holds that many bytes.
        ring.run(ring.read_fixed_many(fd, bufs, [0, 1, 2, 3], length=10))
        assert [b.tobytes() for b in bufs] == [data[i:i + 10] for i in range(4)]
        for buf in bufs:
            buf.release()
    finally:
        os.close(fd)


def test_read_fixed_many_failure_leaves_members_free(ring: saferring.Ring, pool: BufferPool,
                                                     tmp_path: Any) -> None:
    """A member that fails (EBADF on a write-only descriptor) leaves its buffer FREE and the
    batch raises; the buffers are usable again."""
    fd = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        bufs = [pool.lease() for _ in range(2)]
        batch = ring.read_fixed_many(fd, bufs, [0, 0])
        with pytest.raises(OSError) as info:
            ring.run(batch)
        assert info.value.errno == errno.EBADF
        assert [b.state for b in bufs] == [FREE, FREE]
        for buf in bufs:
            buf.fill(b"ok")
            buf.release()
    finally:
        os.close(fd)


def test_read_fixed_many_bad_input(ring: saferring.Ring, pool: BufferPool, pipe: tuple[int, int],
                                   tmp_path: Any) -> None:
    """Mismatched lengths, an empty batch, a buffer twice, a negative offset, a length over the
    buffer size, a buffer of no pool, a buffer with a live view and one in flight are refused
    before anything is queued."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    a, b = pool.lease(), pool.lease()
    try:
        cases: list[tuple[type[Exception], Callable[[], object]]] = [
            (ValueError, lambda: ring.read_fixed_many(fd, [a, b], [0])),
            (ValueError, lambda: ring.read_fixed_many(fd, [], [])),
            (ValueError, lambda: ring.read_fixed_many(fd, [a, a], [0, 0])),
            (ValueError, lambda: ring.read_fixed_many(fd, [a], [-1])),
            (ValueError, lambda: ring.read_fixed_many(fd, [a], [0], length=8193)),
            (OperationStateError, lambda: ring.read_fixed_many(fd, [Buffer(10)], [0])),
            (TypeError, lambda: ring.read_fixed_many(fd, [a], ["0"])),
        ]
        for exc, call in cases:
            with pytest.raises(exc):
                call()
            assert ring.stats().in_flight == 0
        view = a.view(whole=True)
        with pytest.raises(BufferBusyError):
            ring.read_fixed_many(fd, [b, a], [0, 0])
        del view
        blocked = ring.read_fixed(pipe[0], b)
        with pytest.raises(BufferBusyError):
            ring.read_fixed_many(fd, [a, b], [0, 0])
        assert ring.stats().in_flight == 1
        os.write(pipe[1], b"z")
        assert ring.run(blocked) == 1
        assert ring.run(ring.read_fixed_many(fd, [a, b], [0, 50])) == [100, 50]
    finally:
        os.close(fd)
        a.release()
        b.release()


def test_racing_releases_give_a_buffer_back_once() -> None:
    """Two threads (and a signal handler) releasing the same buffer at once: exactly one
    release succeeds each time, so no pool slot or ring buffer id goes back twice (which would
    let two holders, or a holder and the kernel, share one buffer)."""
    out = run_isolated("""
        import random, signal, socket, sys, threading, saferring
        sys.setswitchinterval(1e-6)
        ring = saferring.Ring(16)
        pool = saferring.BufferPool(ring, 4, 4096)
        br = saferring.BufferRing(ring, 4, 4096)
        tx, rx = socket.socketpair()
        op = ring.recv_multishot(rx, br)
        doubles = 0
        for attempt in range(1500):
            if attempt % 2:
                buf = pool.lease()
            else:
                tx.sendall(b"x" * 4096)
                got = []
                while not got:
                    ring.wait(1, timeout=1)
                    got = op.take()
                buf = got[0]
                for extra in got[1:]:
                    extra.release()
            ok = []
            bar = threading.Barrier(2)
            def other():
                bar.wait()
                try:
                    buf.release(); ok.append(1)
                except saferring.SaferRingError:
                    pass
            t = threading.Thread(target=other); t.start()
            bar.wait()
            try:
                buf.release(); ok.append(1)
            except saferring.SaferRingError:
                pass
            t.join()
            doubles += len(ok) != 1
        sys.setswitchinterval(0.005)
        assert doubles == 0, doubles
        assert pool.available() == 4
        held = [pool.lease() for _ in range(4)]
        assert sorted(b.index for b in held) == [0, 1, 2, 3]
        # Every ring buffer comes back once: 4 chunks held at once use 4 distinct buffers.
        for i in range(4):
            tx.sendall(bytes([i]) * 4096)
        chunks = []
        while sum(c.nbytes for c in chunks) < 4 * 4096:
            ring.wait(1, timeout=1)
            chunks += op.take()
        assert len({c.index for c in chunks}) == len(chunks), [c.index for c in chunks]
        for c in chunks + held:
            c.release()
        op.cancel(); ring.close(timeout=10)
        print("ok")
    """, timeout=300)
    assert out.startswith("ok")


def test_msg_trunc_recv_keeps_only_what_fits(ring: saferring.Ring) -> None:
    """recv(..., MSG_TRUNC) of a datagram larger than the Buffer reports the datagram's length,
    but the buffer holds (nbytes) only what fits, so sending it back reads nothing beyond it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        for s in (b, c):
            s.bind((LOCAL4, 0))
        b.connect(c.getsockname())
        buf = Buffer(64)
        c.sendto(b"x" * 20000, b.getsockname())
        assert ring.run(ring.recv(b, buf, socket.MSG_TRUNC)) == 20000
        assert buf.nbytes == 64 and buf.tobytes() == b"x" * 64
        assert ring.run(ring.send(b, buf)) == 64
        c.settimeout(5)
        assert c.recv(65536) == b"x" * 64
