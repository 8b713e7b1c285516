"""Socket operations (``_net_ops``) on the real kernel, over 127.0.0.1, ::1 and AF_UNIX."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import gc
import os
import select
import socket
import stat
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import saferring
from saferring import OpState

from _helpers import fill_peer_window, kernel_lacks

LOCAL4 = "127.0.0.1"
LOCAL6 = "::1"


# -- helpers -------------------------------------------------------------------------------

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


def _ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind((LOCAL6, 0))
    except OSError:
        return False
    return True


def _listener(family: int = socket.AF_INET, address: Any = None) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.bind(address if address is not None else ((LOCAL6 if family == socket.AF_INET6 else LOCAL4), 0))
    s.listen(16)
    return s


def _closed_port() -> int:
    """A loopback TCP port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind((LOCAL4, 0))
        return int(s.getsockname()[1])


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def _readable(sock: socket.socket, timeout: float = 5.0) -> None:
    ready, _, _ = select.select([sock], [], [], timeout)
    assert ready, "no data arrived within the timeout"


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(5)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"peer closed after {len(out)} of {n} bytes"
        out += chunk
    return out


@contextlib.contextmanager
def _receiving(sock: socket.socket, n: int) -> Iterator[list[bytes]]:
    """Receive n bytes from sock on a thread while the block runs; the list holds them after."""
    received: list[bytes] = []
    thread = threading.Thread(target=lambda: received.append(_recv_exactly(sock, n)))
    thread.start()
    try:
        yield received
    finally:
        thread.join(10)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected loopback TCP pair (client, server side)."""
    with _listener() as lst:
        client = socket.create_connection(lst.getsockname(), timeout=5)
        server, _ = lst.accept()
    client.settimeout(5)
    server.settimeout(5)
    yield client, server
    client.close()
    server.close()


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def udp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two unconnected UDP sockets bound to loopback (sender, receiver)."""
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind((LOCAL4, 0))
    rx.bind((LOCAL4, 0))
    rx.settimeout(5)
    yield tx, rx
    tx.close()
    rx.close()


# -- socket ------------------------------------------------------------------------------

@pytest.mark.parametrize(("family", "kind"), [(socket.AF_INET, socket.SOCK_STREAM),
                                              (socket.AF_INET, socket.SOCK_DGRAM),
                                              (socket.AF_UNIX, socket.SOCK_STREAM)])
def test_socket_creates_non_inheritable_socket(ring: saferring.Ring, family: int, kind: int) -> None:
    """socket() returns a CLOEXEC descriptor of the asked family and type, usable as a socket."""
    op = ring.socket(family, kind)
    fd = _run(ring, op)
    assert op.state is OpState.COMPLETED
    sock = socket.socket(fileno=fd)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.get_inheritable(fd) is False
        assert sock.family == family and sock.type == kind
    finally:
        sock.close()


def test_socket_bad_family_fails_from_cqe(ring: saferring.Ring) -> None:
    """An unknown address family is the kernel's EAFNOSUPPORT, raised from the CQE."""
    op = ring.socket(4242, socket.SOCK_STREAM)
    with pytest.raises(OSError) as info:
        _run(ring, op)
    assert info.value.errno == errno.EAFNOSUPPORT
    assert op.state is OpState.FAILED


def test_socket_result_not_claimed_is_closed_when_dropped(ring: saferring.Ring) -> None:
    """A socket descriptor nobody asked for through result() is closed with the operation."""
    op = ring.socket()
    (done,) = ring.wait(1, timeout=5)
    fd = done._res
    assert fd is not None and fd >= 0 and _fd_open(fd)
    del op, done
    gc.collect()
    assert not _fd_open(fd)


# -- connect / accept --------------------------------------------------------------------

def test_connect_and_accept_ipv4(ring: saferring.Ring) -> None:
    """connect() reaches a listener; accept() returns (fd, the client's address); bytes flow."""
    with _listener() as lst, socket.socket() as client:
        acc = ring.accept(lst)
        con = ring.connect(client.fileno(), lst.getsockname())
        assert _run(ring, con) == 0
        fd, address = _run(ring, acc)
        assert con.state is OpState.COMPLETED and acc.state is OpState.COMPLETED
        assert address == client.getsockname()
        assert client.getpeername() == lst.getsockname()
        with socket.socket(fileno=fd) as server:
            assert os.get_inheritable(fd) is False
            assert server.getpeername() == client.getsockname()
            client.sendall(b"ping")
            server.settimeout(5)
            assert server.recv(10) == b"ping"


def test_connect_and_accept_ipv6(ring: saferring.Ring) -> None:
    """Over ::1, accept() reports the peer as a 4-tuple like socket.accept()."""
    if not _ipv6_available():
        pytest.skip("IPv6 loopback unavailable")
    with _listener(socket.AF_INET6) as lst, socket.socket(socket.AF_INET6) as client:
        acc = ring.accept(lst.fileno())
        assert _run(ring, ring.connect(client, lst.getsockname()[:2])) == 0
        fd, address = _run(ring, acc)
        with socket.socket(fileno=fd) as server:
            assert address == client.getsockname()
            assert len(address) == 4 and address[0] == LOCAL6
            assert server.getpeername() == client.getsockname()


def test_connect_and_accept_unix(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """AF_UNIX: connect() by path; accept() names a bound peer by its path, an unbound one ''."""
    path = os.path.join(os.fspath(tmp_path), "srv.sock")
    client_path = os.path.join(os.fspath(tmp_path), "cli.sock")
    with _listener(socket.AF_UNIX, path) as lst, \
            socket.socket(socket.AF_UNIX) as anon, socket.socket(socket.AF_UNIX) as named:
        named.bind(client_path)
        acc = ring.accept(lst)
        assert _run(ring, ring.connect(anon, path)) == 0
        fd, address = _run(ring, acc)
        os.close(fd)
        assert address == ""
        acc = ring.accept(lst)
        assert _run(ring, ring.connect(named, os.fsencode(path))) == 0
        fd, address = _run(ring, acc)
        with socket.socket(fileno=fd) as server:
            assert address == client_path == server.getpeername()
            named.sendall(b"over unix")
            server.settimeout(5)
            assert server.recv(64) == b"over unix"


def test_accept_unix_abstract_address(ring: saferring.Ring) -> None:
    """A peer bound to an abstract address is reported as bytes with the leading NUL."""
    name = b"\0saferring-test-%d-%d" % (os.getpid(), time.monotonic_ns())
    with _listener(socket.AF_UNIX, name + b"-srv") as lst, socket.socket(socket.AF_UNIX) as client:
        client.bind(name)
        acc = ring.accept(lst)
        assert _run(ring, ring.connect(client, name + b"-srv")) == 0
        fd, address = _run(ring, acc)
        os.close(fd)
        assert address == name


def test_connect_refused(ring: saferring.Ring) -> None:
    """Connecting to a closed loopback port fails with ConnectionRefusedError from the CQE."""
    port = _closed_port()
    with socket.socket() as client:
        op = ring.connect(client, (LOCAL4, port))
        with pytest.raises(ConnectionRefusedError) as info:
            _run(ring, op)
        assert info.value.errno == errno.ECONNREFUSED
        assert op.state is OpState.FAILED


def test_cqe_errors_name_the_operation(ring: saferring.Ring) -> None:
    """A failed connect or send says which operation failed (Operation.kind), not another's name."""
    with socket.socket() as client, pytest.raises(ConnectionRefusedError, match="connect"):
        _run(ring, ring.connect(client, (LOCAL4, _closed_port())))
    with socket.socket() as unconnected, pytest.raises(OSError, match="send"):
        _run(ring, ring.send(unconnected, b"x"))


def test_accept_flags_nonblock(ring: saferring.Ring) -> None:
    """accept(flags=SOCK_NONBLOCK) makes a non-blocking descriptor (without CLOEXEC if not asked)."""
    with _listener() as lst, socket.create_connection(lst.getsockname(), timeout=5):
        fd, _ = _run(ring, ring.accept(lst, flags=socket.SOCK_NONBLOCK))
        try:
            assert os.get_blocking(fd) is False
            assert os.get_inheritable(fd) is True
        finally:
            os.close(fd)


def test_accept_on_non_listening_socket_fails(ring: saferring.Ring) -> None:
    """accept() on a socket that is not listening raises EINVAL from the CQE."""
    with socket.socket() as s:
        s.bind((LOCAL4, 0))
        op = ring.accept(s)
        with pytest.raises(OSError) as info:
            _run(ring, op)
        assert info.value.errno == errno.EINVAL
        assert op.state is OpState.FAILED


def test_accept_result_not_claimed_is_closed_when_dropped(ring: saferring.Ring) -> None:
    """An accepted connection whose result is never claimed is closed when the op is dropped."""
    with _listener() as lst, socket.create_connection(lst.getsockname(), timeout=5) as client:
        op = ring.accept(lst)
        (done,) = ring.wait(1, timeout=5)
        assert done is op and op.state is OpState.COMPLETED
        fd = op._res
        assert fd is not None and _fd_open(fd)
        del op, done
        gc.collect()
        assert not _fd_open(fd)
        client.settimeout(5)
        assert client.recv(1) == b""  # the server side really went away


def test_stats_while_accept_in_flight(ring: saferring.Ring) -> None:
    """A pending accept pins its address buffer and length: stats() counts them, then releases."""
    with _listener() as lst:
        op = ring.accept(lst)
        ring.submit()
        stats = ring.stats()
        assert stats.in_flight == 1
        assert stats.pinned_bytes >= 128 + 4  # sockaddr_storage + socklen_t
        with socket.create_connection(lst.getsockname(), timeout=5):
            fd, _ = _run(ring, op)
            os.close(fd)
    assert ring.stats().pinned_bytes == 0


def test_accept_dropped_while_in_flight_closes_its_connection(ring: saferring.Ring) -> None:
    """An accept dropped before it completed still completes; nobody claims it, so its fd is closed."""
    with _listener() as lst:
        op = ring.accept(lst)
        ring.submit()
        del op
        gc.collect()
        with socket.create_connection(lst.getsockname(), timeout=5) as client:
            done = ring.wait(1, timeout=5)
            assert len(done) == 1 and done[0].state is OpState.COMPLETED
            fd = done[0]._res
            assert fd is not None and _fd_open(fd)
            del done
            gc.collect()
            assert not _fd_open(fd)
            assert client.recv(1) == b""


def test_accept_claimed_result_stays_open(ring: saferring.Ring) -> None:
    """Once result() handed the descriptor out, dropping the operation leaves it open."""
    with _listener() as lst, socket.create_connection(lst.getsockname(), timeout=5):
        op = ring.accept(lst)
        fd, _ = _run(ring, op)
        del op
        gc.collect()
        assert _fd_open(fd)
        os.close(fd)


def test_accept_multishot_many_clients_then_cancel(ring: saferring.Ring) -> None:
    """One multishot accept yields a descriptor per client; cancel ends it CANCELLED."""
    with _listener() as lst:
        op = ring.accept(lst, multishot=True)
        ring.submit()
        clients = [socket.create_connection(lst.getsockname(), timeout=5) for _ in range(3)]
        fds: list[int] = []
        try:
            deadline = time.monotonic() + 5
            while len(fds) < 3 and time.monotonic() < deadline:
                ring.wait(1, timeout=0.5)
                fds += op.take()
            assert len(fds) == 3
            assert op.state is OpState.SUBMITTED and not op.done()
            assert ring.stats().in_flight == 1
            peers = set()
            for fd in fds:
                assert os.get_inheritable(fd) is False
                with socket.socket(fileno=os.dup(fd)) as s:
                    peers.add(s.getpeername())
            assert peers == {c.getsockname() for c in clients}
            op.cancel()
            _finish(ring, op)
            assert op.state is OpState.CANCELLED  # type: ignore[comparison-overlap]
            with pytest.raises(saferring.OperationCancelledError):
                op.result()
            assert op.take() == []
        finally:
            for fd in fds:
                os.close(fd)
            for c in clients:
                c.close()


def test_accept_multishot_untaken_fds_closed_on_collection(ring: saferring.Ring) -> None:
    """Descriptors a multishot accept received but nobody took are closed when it is collected."""
    with _listener() as lst:
        op = ring.accept(lst, multishot=True)
        ring.submit()
        before = {int(n) for n in os.listdir("/proc/self/fd")}
        clients = [socket.create_connection(lst.getsockname(), timeout=5) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while op.pending() < 2 and time.monotonic() < deadline:
                ring.wait(1, timeout=0.5)
            assert op.pending() == 2
            op.cancel()
            _finish(ring, op)
            assert op.state is OpState.CANCELLED
            now = {int(n) for n in os.listdir("/proc/self/fd")}
            accepted = now - before - {c.fileno() for c in clients}
            accepted = {fd for fd in accepted if _fd_open(fd)}
            assert len(accepted) == 2
            del op
            gc.collect()
            for fd in accepted:
                assert not _fd_open(fd)
            for c in clients:
                assert c.recv(1) == b""
        finally:
            for c in clients:
                c.close()


# -- bind / listen (Linux 6.11) ------------------------------------------------------------

def test_bind_and_listen(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """bind() names the socket and listen() lets clients in; without them: refused, nothing queued."""
    if not (ring.features.supports("BIND") and ring.features.supports("LISTEN")):
        with socket.socket() as s:
            before = ring.stats().in_flight
            with pytest.raises(saferring.UnsupportedOperationError):
                ring.bind(s, (LOCAL4, 0))
            with pytest.raises(saferring.UnsupportedOperationError):
                ring.listen(s)
            assert ring.stats().in_flight == before
        return
    with socket.socket() as s:
        assert _run(ring, ring.bind(s, (LOCAL4, 0))) == 0
        host, port = s.getsockname()
        assert host == LOCAL4 and port != 0
        assert _run(ring, ring.listen(s.fileno(), 4)) == 0
        with socket.create_connection((host, port), timeout=5) as client:
            s.settimeout(5)
            conn, peer = s.accept()
            conn.close()
            assert peer == client.getsockname()
        with socket.socket() as other:
            op = ring.bind(other, (host, port))
            with pytest.raises(OSError) as info:
                _run(ring, op)
            assert info.value.errno == errno.EADDRINUSE
            assert op.state is OpState.FAILED
    path = os.path.join(os.fspath(tmp_path), "bound.sock")
    with socket.socket(socket.AF_UNIX) as u:
        assert _run(ring, ring.bind(u, path)) == 0
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert u.getsockname() == path


# -- send / recv ---------------------------------------------------------------------------

def test_send_recv_both_ways(ring: saferring.Ring, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """send() puts bytes on the wire, recv() takes them, in both directions; the ops end COMPLETED."""
    client, server = tcp_pair
    op = ring.send(client, b"hello server")
    assert _run(ring, op) == 12
    assert op.state is OpState.COMPLETED
    assert _recv_exactly(server, 12) == b"hello server"
    buf = bytearray(64)
    rop = ring.recv(client.fileno(), buf)
    ring.submit()
    server.sendall(b"hello client")
    n = _run(ring, rop)
    assert bytes(buf[:n]) == b"hello client"[:n] and n > 0
    view = memoryview(bytearray(8))[2:6]
    server.sendall(b"ABCD")
    assert _run(ring, ring.recv(client, view)) == 4
    assert bytes(view) == b"ABCD"


def test_recv_returns_zero_after_peer_close(ring: saferring.Ring,
                                            tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """recv() completes with 0 once the peer has closed its end."""
    client, server = tcp_pair
    op = ring.recv(client, bytearray(16))
    ring.submit()
    server.close()
    assert _run(ring, op) == 0
    assert op.state is OpState.COMPLETED


def test_recv_peek_flag(ring: saferring.Ring, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """MSG_PEEK flags reach the kernel: the bytes stay queued for the next read."""
    client, server = tcp_pair
    server.sendall(b"peekaboo")
    _readable(client)
    buf = bytearray(8)
    assert _run(ring, ring.recv(client, buf, socket.MSG_PEEK)) == 8
    assert buf == b"peekaboo"
    assert client.recv(8) == b"peekaboo"


def test_send_recv_pins_buffer(ring: saferring.Ring, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A pending recv pins its bytearray (BufferError on resize) until its CQE, then lets go."""
    client, server = tcp_pair
    buf = bytearray(32)
    op = ring.recv(client, buf)
    ring.submit()
    assert ring.stats().pinned_bytes >= 32
    with pytest.raises(BufferError):
        buf.append(0)
    server.sendall(b"z")
    assert _run(ring, op) == 1
    assert ring.stats().pinned_bytes == 0
    buf.append(0)


def test_shutdown_write_side(ring: saferring.Ring, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """shutdown(SHUT_WR) sends FIN: the peer reads EOF, while the other direction still works."""
    client, server = tcp_pair
    op = ring.shutdown(client, socket.SHUT_WR)
    assert _run(ring, op) == 0
    assert op.state is OpState.COMPLETED
    assert server.recv(1) == b""
    server.sendall(b"still open")
    assert _recv_exactly(client, 10) == b"still open"
    with pytest.raises(BrokenPipeError):
        client.send(b"x")


def test_shutdown_unconnected_fails(ring: saferring.Ring) -> None:
    """shutdown() of a socket that never connected raises ENOTCONN from the CQE."""
    with socket.socket() as s:
        op = ring.shutdown(s, socket.SHUT_RDWR)
        with pytest.raises(OSError) as info:
            _run(ring, op)
        assert info.value.errno == errno.ENOTCONN
        assert op.state is OpState.FAILED


# -- sendmsg / recvmsg / sendto ------------------------------------------------------------

def test_sendmsg_recvmsg_iovecs(ring: saferring.Ring,
                                unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """sendmsg() sends its buffers in order; recvmsg() fills its buffers in order."""
    a, b = unix_pair
    sent = _run(ring, ring.sendmsg(a, [b"abc", bytearray(b"defg"), memoryview(b"hij")]))
    assert sent == 10
    assert _recv_exactly(b, 10) == b"abcdefghij"
    a.sendall(b"0123456789")
    _readable(b)
    x, y, z = bytearray(3), bytearray(4), bytearray(10)
    op = ring.recvmsg(b, [x, y, z])
    res = _run(ring, op)
    assert isinstance(res, saferring.operation.RecvmsgResult)
    assert res.nbytes == 10 and res.ancdata == [] and res.msg_flags == 0
    assert (bytes(x), bytes(y), bytes(z[:3])) == (b"012", b"3456", b"789")
    assert op.state is OpState.COMPLETED


def test_sendmsg_passes_fd_with_scm_rights(ring: saferring.Ring,
                                           unix_pair: tuple[socket.socket, socket.socket],
                                           pipe: tuple[int, int]) -> None:
    """An fd sent with SCM_RIGHTS arrives in recvmsg's ancdata and refers to the same pipe."""
    a, b = unix_pair
    r, w = pipe
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())]
    assert _run(ring, ring.sendmsg(a, [b"F"], anc)) == 1
    buf = bytearray(4)
    res = _run(ring, ring.recvmsg(b, [buf], socket.CMSG_SPACE(struct.calcsize("i"))))
    assert res.nbytes == 1 and buf[:1] == b"F"
    assert res.msg_flags & socket.MSG_CTRUNC == 0
    assert len(res.ancdata) == 1
    level, kind, data = res.ancdata[0]
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    (received,) = array.array("i", data)
    try:
        assert received != w
        assert os.fstat(received).st_ino == os.fstat(w).st_ino
        os.write(received, b"via passed fd")
        assert os.read(r, 64) == b"via passed fd"
    finally:
        os.close(received)


def test_recvmsg_without_room_for_fd_truncates_control(ring: saferring.Ring,
                                                       unix_pair: tuple[socket.socket, socket.socket],
                                                       pipe: tuple[int, int]) -> None:
    """With ancbufsize=0 a passed fd is dropped by the kernel (MSG_CTRUNC), nothing leaks."""
    a, b = unix_pair
    _r, w = pipe
    a.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [w]).tobytes())])
    res = _run(ring, ring.recvmsg(b, [bytearray(4)]))
    assert res.nbytes == 1 and res.ancdata == []
    assert res.msg_flags & socket.MSG_CTRUNC


def test_recvmsg_reports_udp_sender(ring: saferring.Ring,
                                    udp_pair: tuple[socket.socket, socket.socket]) -> None:
    """recvmsg() on UDP returns the datagram's source address; a short buffer sets MSG_TRUNC."""
    tx, rx = udp_pair
    tx.sendto(b"datagram", rx.getsockname())
    _readable(rx)
    buf = bytearray(16)
    res = _run(ring, ring.recvmsg(rx, [buf]))
    assert res.nbytes == 8 and buf[:8] == b"datagram"
    assert res.address == tx.getsockname()
    tx.sendto(b"longer than four", rx.getsockname())
    _readable(rx)
    small = bytearray(4)
    res = _run(ring, ring.recvmsg(rx, [small]))
    assert small == b"long" and res.msg_flags & socket.MSG_TRUNC


def test_sendto_udp(ring: saferring.Ring, udp_pair: tuple[socket.socket, socket.socket]) -> None:
    """sendto() delivers one datagram to the address, from the sending socket's address."""
    tx, rx = udp_pair
    op = ring.sendto(tx, b"to you", rx.getsockname())
    assert _run(ring, op) == 6
    assert op.state is OpState.COMPLETED
    data, source = rx.recvfrom(64)
    assert data == b"to you" and source == tx.getsockname()


def test_sendto_udp_ipv6(ring: saferring.Ring) -> None:
    """sendto() with an IPv6 address reaches a socket on ::1."""
    if not _ipv6_available():
        pytest.skip("IPv6 loopback unavailable")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as rx:
        tx.bind((LOCAL6, 0))
        rx.bind((LOCAL6, 0))
        rx.settimeout(5)
        assert _run(ring, ring.sendto(tx, b"six", rx.getsockname()[:2])) == 3
        data, source = rx.recvfrom(16)
        assert data == b"six" and source == tx.getsockname()


def test_sendmsg_with_address(ring: saferring.Ring, udp_pair: tuple[socket.socket, socket.socket]) -> None:
    """sendmsg(address=...) sends several buffers as one datagram to that address."""
    tx, rx = udp_pair
    assert _run(ring, ring.sendmsg(tx, [b"one ", b"datagram"], address=rx.getsockname())) == 12
    data, source = rx.recvfrom(64)
    assert data == b"one datagram" and source == tx.getsockname()


# -- zero-copy sends -----------------------------------------------------------------------

def _zc_supported(ring: saferring.Ring, name: str) -> bool:
    return ring.features.supports(name)


def _check_zc_pins_until_final(ring: saferring.Ring, op: saferring.Operation[Any],
                               buffers: list[bytearray]) -> None:
    """While the zero-copy op has no final CQE its buffers are pinned; after it, they are not."""
    assert ring.stats().pinned_bytes >= sum(len(b) for b in buffers)
    for buf in buffers:
        with pytest.raises(BufferError):
            buf.append(0)
    ring.submit()
    assert op.state is OpState.SUBMITTED
    assert ring.stats().pinned_bytes >= sum(len(b) for b in buffers)
    deadline = time.monotonic() + 5
    while not op.done():
        assert time.monotonic() < deadline, "zero-copy send never got its notification"
        ring.wait(1, timeout=1)
        if not op.done():  # the send's CQE came, the notification not yet: still pinned
            assert ring.stats().pinned_bytes >= sum(len(b) for b in buffers)
            with pytest.raises(BufferError):
                buffers[0].append(0)
    assert ring.stats().pinned_bytes == 0
    assert ring.stats().in_flight == 0
    for buf in buffers:
        buf.append(0)


def test_send_zc_delivers_and_pins_until_notification(
        ring: saferring.Ring, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """send_zc(): the bytes arrive, the result is the byte count, the buffer is pinned until the end."""
    if not _zc_supported(ring, "SEND_ZC"):
        before = ring.stats().in_flight
        with pytest.raises(saferring.UnsupportedOperationError):
            ring.send_zc(tcp_pair[0], b"x")
        assert ring.stats().in_flight == before
        return
    client, server = tcp_pair
    payload = os.urandom(100_000)
    buf = bytearray(payload)
    op = ring.send_zc(client, buf)
    # Read concurrently: over loopback the notification may wait until the data was consumed.
    with _receiving(server, len(payload)) as received:
        _check_zc_pins_until_final(ring, op, [buf])
    assert op.state is OpState.COMPLETED
    assert op.result() == len(payload)
    assert received == [payload]


def test_sendmsg_zc_delivers_and_pins_until_notification(
        ring: saferring.Ring, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """sendmsg_zc(): several buffers arrive in order; all stay pinned until the final CQE."""
    if not _zc_supported(ring, "SENDMSG_ZC"):
        before = ring.stats().in_flight
        with pytest.raises(saferring.UnsupportedOperationError):
            ring.sendmsg_zc(tcp_pair[0], [b"x"])
        assert ring.stats().in_flight == before
        return
    client, server = tcp_pair
    parts = [bytearray(os.urandom(n)) for n in (1000, 20_000, 7)]
    expected = b"".join(parts)
    op = ring.sendmsg_zc(client, parts)
    with _receiving(server, len(expected)) as received:
        _check_zc_pins_until_final(ring, op, parts)
    assert op.state is OpState.COMPLETED
    assert op.result() == len(expected)
    assert received == [expected]


def test_send_zc_udp_with_address(ring: saferring.Ring,
                                  udp_pair: tuple[socket.socket, socket.socket]) -> None:
    """send_zc(address=...) sends a datagram to that address on an unconnected UDP socket."""
    if not _zc_supported(ring, "SEND_ZC"):
        pytest.skip("no SEND_ZC (checked in the TCP test)")
    tx, rx = udp_pair
    assert _run(ring, ring.send_zc(tx, b"zero copy", address=rx.getsockname())) == 9
    data, source = rx.recvfrom(64)
    assert data == b"zero copy" and source == tx.getsockname()
    if _zc_supported(ring, "SENDMSG_ZC"):
        assert _run(ring, ring.sendmsg_zc(tx, [b"zc", b"msg"], address=rx.getsockname())) == 5
        data, source = rx.recvfrom(64)
        assert data == b"zcmsg" and source == tx.getsockname()


def test_send_zc_errors_end_the_operation(ring: saferring.Ring,
                                          unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """A zero-copy send that fails (AF_UNIX lacks zero-copy; unconnected TCP) ends FAILED, unpinned."""
    if not _zc_supported(ring, "SEND_ZC"):
        pytest.skip("no SEND_ZC (checked in the TCP test)")
    op = ring.send_zc(unix_pair[0], bytearray(b"nope"))
    with pytest.raises(OSError) as info:
        _run(ring, op)
    assert info.value.errno == errno.EOPNOTSUPP
    assert op.state is OpState.FAILED
    with socket.socket() as unconnected:
        op = ring.send_zc(unconnected, b"x")
        with pytest.raises(BrokenPipeError):
            _run(ring, op)
        assert op.state is OpState.FAILED
    assert ring.stats().pinned_bytes == 0 and ring.stats().in_flight == 0


# -- socket commands (Linux 6.7) -----------------------------------------------------------


def test_socket_commands_unsupported_queue_nothing(ring: saferring.Ring,
                                                   tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """Before 6.7 every socket command raises UnsupportedOperationError and queues nothing."""
    if kernel_lacks("can:SOCKET_COMMANDS") is None:
        pytest.skip("socket commands supported (covered by the other tests)")
    client, _ = tcp_pair
    before = ring.stats().in_flight
    calls: list[Callable[[], object]] = [
        lambda: ring.getsockopt(client, socket.SOL_SOCKET, socket.SO_TYPE),
        lambda: ring.setsockopt(client, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        lambda: ring.siocinq(client),
        lambda: ring.siocoutq(client),
    ]
    for call in calls:
        with pytest.raises(saferring.UnsupportedOperationError, match=r"6\.7"):
            call()
    assert ring.stats().in_flight == before


needs_sockcmds = pytest.mark.needs("can:SOCKET_COMMANDS")


@needs_sockcmds
def test_getsockopt_matches_socket_module(ring: saferring.Ring,
                                          tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """getsockopt() returns the option's bytes, the same value socket.getsockopt reads."""
    client, _ = tcp_pair
    for name in (socket.SO_TYPE, socket.SO_RCVBUF, socket.SO_KEEPALIVE, socket.SO_ERROR):
        op = ring.getsockopt(client, socket.SOL_SOCKET, name)
        raw = _run(ring, op)
        assert op.state is OpState.COMPLETED
        assert len(raw) == 4
        assert int.from_bytes(raw, sys.byteorder) == client.getsockopt(socket.SOL_SOCKET, name)
    linger = _run(ring, ring.getsockopt(client, socket.SOL_SOCKET, socket.SO_LINGER, 64))
    assert linger == client.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 64)


@needs_sockcmds
def test_setsockopt_int_takes_effect(ring: saferring.Ring,
                                     tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """setsockopt() with an int changes the option as the socket module then reads it."""
    client, _ = tcp_pair
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    op = ring.setsockopt(client, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    assert _run(ring, op) == 0
    assert op.state is OpState.COMPLETED
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert _run(ring, ring.setsockopt(client, socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)) == 0
    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@needs_sockcmds
def test_stats_while_setsockopt_queued(ring: saferring.Ring,
                                       tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A queued setsockopt pins its int value: stats() counts it and drops it after the CQE."""
    client, _ = tcp_pair
    op = ring.setsockopt(client, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    stats = ring.stats()
    assert stats.in_flight == 1 and stats.pinned_bytes >= 4
    assert _run(ring, op) == 0
    assert ring.stats().pinned_bytes == 0


@needs_sockcmds
def test_setsockopt_bytes_value(ring: saferring.Ring,
                                tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """setsockopt() with a bytes-like value (a struct linger) sets it like socket.setsockopt."""
    client, _ = tcp_pair
    value = struct.pack("ii", 1, 7)
    assert _run(ring, ring.setsockopt(client, socket.SOL_SOCKET, socket.SO_LINGER, value)) == 0
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(value)) == value
    assert _run(ring, ring.setsockopt(client, socket.SOL_SOCKET, socket.SO_LINGER,
                                      bytearray(struct.pack("ii", 1, 3)))) == 0
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, len(value)) == struct.pack("ii", 1, 3)


@needs_sockcmds
def test_setsockopt_bytes_passes_exact_length(ring: saferring.Ring) -> None:
    """setsockopt() hands the kernel exactly len(value) bytes: IP_OPTIONS reads back the same."""
    options = b"\x01\x01\x01\x01"  # four IPOPT_NOOPs
    with socket.socket() as ref, socket.socket() as s:
        ref.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, options)
        assert ref.getsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, 40) == options
        assert _run(ring, ring.setsockopt(s, socket.IPPROTO_IP, socket.IP_OPTIONS, options)) == 0
        assert s.getsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, 40) == options


@needs_sockcmds
def test_siocinq_counts_waiting_bytes(ring: saferring.Ring,
                                      tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """siocinq() is 0 on an idle socket and the unread byte count once data arrived."""
    client, server = tcp_pair
    op = ring.siocinq(server)
    assert _run(ring, op) == 0
    assert op.state is OpState.COMPLETED
    client.sendall(b"12345")
    _readable(server)
    assert _run(ring, ring.siocinq(server)) == 5
    buf = array.array("i", [0])
    fcntl.ioctl(server, termios.FIONREAD, buf)
    assert buf[0] == 5


@needs_sockcmds
def test_siocoutq_counts_unsent_bytes(ring: saferring.Ring) -> None:
    """siocoutq() is 0 when everything was sent, and > 0 when the peer's window is full."""
    with _listener() as lst:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            client.connect(lst.getsockname())
            server, _ = lst.accept()
            with server:
                assert _run(ring, ring.siocoutq(client)) == 0
                client.setblocking(False)
                sent = 0
                for _ in range(10_000):
                    try:
                        sent += client.send(bytes(4096))
                    except BlockingIOError:
                        break
                assert sent > 0
                outq = _run(ring, ring.siocoutq(client))
                assert 0 < outq <= sent


@needs_sockcmds
def test_socket_command_errors(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """Socket commands on a closed fd or on a non-socket raise OSError from the CQE."""
    r, _w = pipe
    with pytest.raises(OSError):
        _run(ring, ring.siocinq(r))
    s = socket.socket()
    fd = s.detach()
    os.close(fd)
    op = ring.getsockopt(fd, socket.SOL_SOCKET, socket.SO_TYPE)
    with pytest.raises(OSError) as info:
        _run(ring, op)
    assert info.value.errno == errno.EBADF
    assert op.state is OpState.FAILED
    for bad in (0, -1, 70_000):
        with pytest.raises(ValueError, match="buflen"):
            ring.getsockopt(r, socket.SOL_SOCKET, socket.SO_TYPE, bad)
    with pytest.raises(TypeError):
        ring.setsockopt(r, socket.SOL_SOCKET, socket.SO_KEEPALIVE, "1")
    assert ring.stats().in_flight == 0


# -- registered (fixed) files --------------------------------------------------------------

def test_send_recv_through_fixed_files(ring: saferring.Ring,
                                       tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """A socket registered with register_files() works through its FixedFile for send and recv."""
    client, server = tcp_pair
    fc, fs = ring.register_files([client.fileno(), server])
    assert fc is not None and fs is not None
    try:
        assert _run(ring, ring.send(fc, b"fixed!")) == 6
        buf = bytearray(6)
        assert _run(ring, ring.recv(fs, buf)) == 6
        assert buf == b"fixed!"
        assert _run(ring, ring.sendmsg(fs, [b"back", b"wards"])) == 9
        assert _recv_exactly(client, 9) == b"backwards"
    finally:
        ring.unregister_files()
    with pytest.raises(saferring.OperationStateError):
        ring.send(fc, b"stale")
    assert ring.stats().in_flight == 0


def test_socket_direct_accept_direct(ring: saferring.Ring) -> None:
    """socket_direct/accept_direct fill table slots; connect/send/recv work through the handles."""
    ring.register_files(4)
    try:
        with _listener() as lst:
            sock_op = ring.socket_direct()
            fc = _run(ring, sock_op)
            assert isinstance(fc, saferring.fixed.FixedFile) and fc.valid
            acc = ring.accept_direct(lst)
            assert _run(ring, ring.connect(fc, lst.getsockname())) == 0
            fs = _run(ring, acc)
            assert fs.slot != fc.slot
            assert _run(ring, ring.send(fc, b"direct")) == 6
            buf = bytearray(6)
            assert _run(ring, ring.recv(fs, buf)) == 6
            assert buf == b"direct"
            with pytest.raises(ValueError):
                ring.socket_direct(type=socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            with pytest.raises(ValueError):
                ring.accept_direct(lst, multishot=True, slot=1)
    finally:
        ring.unregister_files()


def test_accept_direct_multishot(ring: saferring.Ring) -> None:
    """A multishot accept_direct puts each connection in a free slot; recv works through them."""
    ring.register_files(4)
    clients: list[socket.socket] = []
    try:
        with _listener() as lst:
            op = ring.accept_direct(lst, multishot=True)
            ring.submit()
            clients = [socket.create_connection(lst.getsockname(), timeout=5) for _ in range(2)]
            got: list[Any] = []
            deadline = time.monotonic() + 5
            while len(got) < 2 and time.monotonic() < deadline:
                ring.wait(1, timeout=0.5)
                got += op.take()
            assert sorted(f.slot for f in got) == [0, 1]
            for i, client in enumerate(clients):
                client.sendall(b"c%d" % i)
            received = set()
            for fixed in got:
                buf = bytearray(2)
                assert _run(ring, ring.recv(fixed, buf)) == 2
                received.add(bytes(buf))
            assert received == {b"c0", b"c1"}
            op.cancel()
            _finish(ring, op)
            assert op.state is OpState.CANCELLED
    finally:
        ring.unregister_files()
        for c in clients:
            c.close()


def test_fixed_file_connect_with_wrong_family_fails_in_kernel(ring: saferring.Ring) -> None:
    """Through a FixedFile the family cannot be checked up front: the kernel refuses from the CQE."""
    with socket.socket() as s:
        (fixed,) = ring.register_files([s])
        try:
            op = ring.connect(fixed, ("::1", 9))
            with pytest.raises(OSError) as info:
                _run(ring, op)
            assert info.value.errno in (errno.EAFNOSUPPORT, errno.EINVAL)
            assert op.state is OpState.FAILED
        finally:
            ring.unregister_files()


# -- bad input -------------------------------------------------------------------------------

def test_non_numeric_host_refused_before_submission(ring: saferring.Ring) -> None:
    """A host name ("localhost") is refused with ValueError: names are not resolved."""
    with socket.socket() as s, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        before = ring.stats()
        with pytest.raises(ValueError, match="numeric"):
            ring.connect(s, ("localhost", 80))
        with pytest.raises(ValueError, match="numeric"):
            ring.sendto(u, b"x", ("localhost", 80))
        with pytest.raises(ValueError, match="numeric"):
            ring.sendto(u, b"x", ("127.0.0.256", 80))
        after = ring.stats()
        assert after.in_flight == before.in_flight == 0
        assert after.submitted == before.submitted


def test_wrong_family_address_refused(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """An address of another family than the socket's raises ValueError naming both families."""
    with socket.socket() as s, socket.socket(socket.AF_UNIX) as u:
        with pytest.raises(ValueError, match=r"AF_INET6.*AF_INET"):
            ring.connect(s, (LOCAL6, 80))
        with pytest.raises(ValueError, match=r"AF_UNIX.*AF_INET"):
            ring.connect(s, os.path.join(os.fspath(tmp_path), "x.sock"))
        with pytest.raises(ValueError, match=r"AF_INET.*AF_UNIX"):
            ring.connect(u, (LOCAL4, 80))
        if ring.features.supports("SEND_ZC"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d, \
                    pytest.raises(ValueError, match="AF_INET6"):
                ring.send_zc(d, b"x", address=(LOCAL6, 80))
        assert ring.stats().in_flight == 0


@pytest.mark.parametrize("port", [-1, 65536, 70000, "80", 8.0, True])
def test_port_out_of_range_refused(ring: saferring.Ring, port: object) -> None:
    """A port that is not an int in 0..65535 raises ValueError before submission."""
    with socket.socket() as s, pytest.raises(ValueError, match="port"):
        ring.connect(s, (LOCAL4, port))
    assert ring.stats().in_flight == 0


@pytest.mark.parametrize("address", [42, None, ("127.0.0.1",), (1, 2), ["127.0.0.1", 80]])
def test_malformed_address_refused(ring: saferring.Ring, address: object) -> None:
    """Something that is no address at all raises TypeError before submission."""
    with socket.socket() as s, pytest.raises(TypeError):
        ring.connect(s, address)
    assert ring.stats().in_flight == 0


def test_address_details_validated(ring: saferring.Ring) -> None:
    """Extra AF_INET fields, bad IPv6 flowinfo/scope and over-long AF_UNIX paths: ValueError."""
    with socket.socket() as s, socket.socket(socket.AF_UNIX) as u:
        with pytest.raises(ValueError):
            ring.connect(s, (LOCAL4, 80, 0))
        with pytest.raises(ValueError, match="too long"):
            ring.connect(u, "/tmp/" + "x" * 200)
        if _ipv6_available():
            with socket.socket(socket.AF_INET6) as s6:
                with pytest.raises(ValueError, match="flowinfo"):
                    ring.connect(s6, (LOCAL6, 80, -1, 0))
                with pytest.raises(ValueError, match="scope_id"):
                    ring.connect(s6, (LOCAL6, 80, 0, 1 << 32))
    assert ring.stats().in_flight == 0


def test_connect_non_socket_fd_refused_before_submission(ring: saferring.Ring,
                                                         pipe: tuple[int, int]) -> None:
    """connect() on a pipe raises OSError(ENOTSOCK) before anything is queued."""
    r, _w = pipe
    before = ring.stats()
    with pytest.raises(OSError) as info:
        ring.connect(r, (LOCAL4, 80))
    assert info.value.errno == errno.ENOTSOCK
    assert ring.stats().in_flight == before.in_flight == 0
    assert ring.stats().submitted == before.submitted


def test_closed_fd_for_addressed_ops_refused_before_submission(ring: saferring.Ring) -> None:
    """connect()/sendto() on a closed fd must read the socket's family first: OSError(EBADF) then."""
    s = socket.socket()
    fd = s.detach()
    os.close(fd)
    with pytest.raises(OSError) as info:
        ring.connect(fd, (LOCAL4, 80))
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        ring.sendto(fd, b"x", (LOCAL4, 80))
    assert info.value.errno == errno.EBADF
    assert ring.stats().in_flight == 0


@pytest.mark.parametrize("call", ["send", "recv", "accept", "shutdown", "sendmsg", "recvmsg"])
def test_closed_fd_fails_from_cqe(ring: saferring.Ring, call: str) -> None:
    """Socket ops on a closed descriptor fail in the kernel with OSError(EBADF) and end FAILED."""
    s = socket.socket()
    fd = s.detach()
    os.close(fd)
    op: saferring.Operation[Any]
    if call == "send":
        op = ring.send(fd, b"x")
    elif call == "recv":
        op = ring.recv(fd, bytearray(4))
    elif call == "accept":
        op = ring.accept(fd)
    elif call == "shutdown":
        op = ring.shutdown(fd, socket.SHUT_RDWR)
    elif call == "sendmsg":
        op = ring.sendmsg(fd, [b"x"])
    else:
        op = ring.recvmsg(fd, [bytearray(4)])
    with pytest.raises(OSError) as info:
        _run(ring, op)
    assert info.value.errno == errno.EBADF
    assert op.state is OpState.FAILED


def test_send_on_non_socket_fails_with_enotsock(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """send()/recv() on a pipe (no family check needed) fail from the CQE with ENOTSOCK."""
    r, w = pipe
    for op in (ring.send(w, b"x"), ring.recv(r, bytearray(1))):
        with pytest.raises(OSError) as info:
            _run(ring, op)
        assert info.value.errno == errno.ENOTSOCK
        assert op.state is OpState.FAILED


def test_buffer_and_flag_arguments_validated(ring: saferring.Ring,
                                             unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """Read-only recv targets, non-buffers, bad ancillary data and out-of-range flags are refused."""
    a, _b = unix_pair
    with pytest.raises(TypeError):
        ring.recv(a, b"read-only")
    with pytest.raises(TypeError):
        ring.send(a, "text")
    with pytest.raises(TypeError):
        ring.recvmsg(a, [bytearray(2), b"read-only"])
    with pytest.raises(TypeError):
        ring.sendmsg(a, [b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS)])
    with pytest.raises(TypeError):
        ring.sendmsg(a, [b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, 5)])
    with pytest.raises(ValueError, match="flags"):
        ring.send(a, b"x", -1)
    with pytest.raises(ValueError, match="flags"):
        ring.recv(a, bytearray(1), 1 << 32)
    with pytest.raises(ValueError, match="ancbufsize"):
        ring.recvmsg(a, [bytearray(1)], -1)
    with pytest.raises(ValueError, match="ancbufsize"):
        ring.recvmsg(a, [bytearray(1)], (1 << 20) + 1)
    with pytest.raises(TypeError):
        ring.accept(a, flags="nonblock")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.socket("inet")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.sendmsg(a, 5)
    assert ring.stats().in_flight == 0


def test_unsent_ops_pin_their_memory(ring: saferring.Ring,
                                     unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """A pending recvmsg pins its buffers, msghdr, name and control space until its CQE."""
    a, b = unix_pair
    buf = bytearray(100)
    op = ring.recvmsg(b, [buf], socket.CMSG_SPACE(4))
    ring.submit()
    assert ring.stats().pinned_bytes >= 100 + socket.CMSG_SPACE(4)
    with pytest.raises(BufferError):
        buf.extend(b"x")
    a.sendall(b"done")
    res = _run(ring, op)
    assert res.nbytes == 4 and buf[:4] == b"done"
    assert ring.stats().pinned_bytes == 0
    buf.extend(b"x")


_MSG_ZEROCOPY = 0x4000000
_MSG_CMSG_COMPAT = 0x80000000


def test_memory_changing_msg_flags_refused(ring: saferring.Ring,
                                           tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    """Flags that change how the kernel uses memory are refused before submission: MSG_ZEROCOPY
    on plain sends (the buffer would be read after its only CQE; send_zc is the safe form) and
    MSG_CMSG_COMPAT on recvmsg (the kernel would write a 32-bit msghdr over the 64-bit one)."""
    client, server = tcp_pair
    client.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_ZEROCOPY", 60), 1)
    data = bytearray(b"A" * 4096)
    attempts: list[Callable[[], object]] = [
        lambda: ring.send(client, data, _MSG_ZEROCOPY),
        lambda: ring.sendmsg(client, [data], flags=_MSG_ZEROCOPY),
        lambda: ring.send_zc(client, data, _MSG_ZEROCOPY),
        lambda: ring.recvmsg(server, [bytearray(8)], flags=_MSG_CMSG_COMPAT),
        lambda: ring.recv(server, bytearray(8), _MSG_CMSG_COMPAT),
    ]
    if ring.features.supports("SENDMSG_ZC"):
        attempts.append(lambda: ring.sendmsg_zc(client, [data], flags=_MSG_ZEROCOPY))
    for attempt in attempts:
        with pytest.raises(ValueError, match="flags"):
            attempt()
    assert ring.stats().in_flight == 0 and ring.submit() == 0
    data.extend(b"x")  # nothing holds an export of it


def test_recvmsg_keeps_allowed_flags(ring: saferring.Ring,
                                     unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """recvmsg still takes the flags it should (MSG_PEEK, MSG_CMSG_CLOEXEC): the data is peeked."""
    a, b = unix_pair
    a.sendall(b"peek")
    buf = bytearray(4)
    res = _run(ring, ring.recvmsg(b, [buf], flags=socket.MSG_PEEK | socket.MSG_CMSG_CLOEXEC))
    assert res.nbytes == 4 and buf == b"peek"
    assert b.recv(4) == b"peek"


def test_stats_with_empty_message(ring: saferring.Ring,
                                  unix_pair: tuple[socket.socket, socket.socket]) -> None:
    """A sendmsg/recvmsg with no data buffers can be queued and counted by stats() (it pins the
    msghdr, name and control buffers only), and ends normally."""
    a, b = unix_pair
    recv = ring.recvmsg(b, [], 64)
    send = ring.sendmsg(a, [])
    stats = ring.stats()
    assert stats.in_flight == 2 and stats.pinned_bytes > 0
    assert _run(ring, send) == 0
    a.sendall(b"x")  # wakes the empty recvmsg (it takes nothing)
    assert _run(ring, recv).nbytes == 0
    assert b.recv(1) == b"x"


def test_close_timeout_with_stuck_zero_copy_send() -> None:
    """A zero-copy send whose data the peer never reads keeps its buffer until the socket goes:
    close(timeout) raises TimeoutError and leaves the ring open and consistent; after the socket
    is closed, close() finishes and releases the buffer."""
    ring = saferring.Ring(8)
    if not ring.features.supports("SEND_ZC"):
        ring.close()
        pytest.skip("no SEND_ZC on this kernel")
    with _listener() as lst:
        rx = socket.socket()
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        rx.connect(lst.getsockname())
        tx, _ = lst.accept()
    try:
        fill_peer_window(tx, b"f")
        data = bytearray(65536)
        op = ring.send_zc(tx, data)
        ring.submit()
        with pytest.raises(TimeoutError):
            ring.close(timeout=0.3)
        assert not ring.closed and not op.done()
        assert ring.stats().pinned_bytes >= 65536
        with pytest.raises(BufferError):
            data.extend(b"x")
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rx.close()
        tx.close()
        ring.close(timeout=10)
        assert ring.closed and op.done()
        data.extend(b"x")
    finally:
        for s in (rx, tx):
            s.close()
        ring.close()


def test_close_timeout_validated(ring: saferring.Ring) -> None:
    """close(timeout) takes a non-negative number; a huge one means no limit."""
    with pytest.raises(ValueError):
        ring.close(timeout=-1)
    assert not ring.closed
    ring.run(ring.nop())
    ring.close(timeout=1e300)
    assert ring.closed
