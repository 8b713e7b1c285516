"""Socket operations: addresses, message headers and zero-copy sends, all pinned.

What the kernel may read *after* submission is what makes these easy to get wrong: a ``msghdr``
and everything it points to (name, iovecs, control data) is read when the request runs, which can
be long after ``submit()`` returned (a recvmsg waits for data; a request punted to io-wq runs on
another thread).  So the msghdr, its iovec array, its name and control buffers and every data
buffer are pinned in the operation until its final CQE.  A zero-copy send goes one step further:
the network stack keeps reading the buffer after the send's own CQE, until the *notification*
CQE; the operation only ends, and unpins, with that notification.
"""

from __future__ import annotations

import socket as _socket
from typing import Any

from . import _pinning, _sockaddr
from ._binding import ffi, lib
from ._guard import _exclusive
from ._ops_base import OpsBase, addr_of
from .buffers import Buffer, BufferRing
from .errors import UnsupportedOperationError
from .features import OP, OPCODES, kernel_can
from .operation import (
    AcceptDirectMultishotOperation,
    AcceptMultishotOperation,
    AcceptOperation,
    DirectOperation,
    IntOperation,
    PathOperation,
    RecvmsgOperation,
    SendZcOperation,
    SocketOperation,
    SockoptOperation,
)
from .operation import new_operation as _new_op

_ACCEPT_MULTISHOT = 1 << 0  # IORING_ACCEPT_MULTISHOT (in ioprio)
_FILE_INDEX_ALLOC = 0xFFFF_FFFF
_MAX_U32 = 0xFFFF_FFFF
_SOCKET_URING_OP_SIOCINQ = 0
_SOCKET_URING_OP_SIOCOUTQ = 1
_SOCKET_URING_OP_GETSOCKOPT = 2
_SOCKET_URING_OP_SETSOCKOPT = 3


# MSG_* flags each call takes.  An allow-list, because some flags change what the kernel does
# with memory: MSG_ZEROCOPY makes a plain send keep reading the buffer after its only CQE (the
# pin would be gone: use send_zc), and MSG_CMSG_COMPAT makes recvmsg write the msghdr in the
# 32-bit layout, over the pointers saferring later reads.
# (Plain ints: socket.MSG_* are IntFlag members, whose ~ only spans the flags Python knows.)
_MSG_SEND = int(_socket.MSG_OOB | _socket.MSG_DONTROUTE | _socket.MSG_DONTWAIT | _socket.MSG_EOR
                | _socket.MSG_NOSIGNAL | _socket.MSG_MORE | _socket.MSG_CONFIRM)
_MSG_SENDMSG = _MSG_SEND | int(getattr(_socket, "MSG_FASTOPEN", 0x20000000))
_MSG_RECV = int(_socket.MSG_OOB | _socket.MSG_PEEK | _socket.MSG_DONTWAIT | _socket.MSG_WAITALL
                | _socket.MSG_TRUNC)
_MSG_RECVMSG = _MSG_RECV | int(_socket.MSG_ERRQUEUE | _socket.MSG_CMSG_CLOEXEC)


_flags = _pinning.u32


def _msg_flags(value: Any, allowed: int, what: str) -> int:
    flags = _flags(value)
    if flags & ~allowed:
        raise ValueError(f"{what} does not take the flags {flags & ~allowed:#x} (allowed: the "
                         f"MSG_* flags {allowed:#x}; for MSG_ZEROCOPY use send_zc/sendmsg_zc)")
    return flags



class NetOps(OpsBase):
    """Socket operations (a part of :class:`~saferring.Ring`)."""

    __slots__ = ()

    def _address(self, fd: int, fixed: int, address: Any) -> tuple[Any, int]:
        """A pinned sockaddr for ``address``, checked against the socket's family when the
        socket is a plain descriptor (a registered file cannot be asked)."""
        family = None
        if not fixed:
            try:
                family = _sockaddr.socket_family(fd)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror} (fd {fd} is not an open socket)") from None
        return _sockaddr.new_sockaddr(address, family)

    # -- creating, naming, connecting --------------------------------------------------------

    @_exclusive
    def socket(self, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM,
               proto: int = 0) -> SocketOperation:
        """Queue a ``socket`` (Linux 5.19); the result is the new descriptor.

        Like Python's sockets it is non-inheritable (``SOCK_CLOEXEC`` is added).  Wrap it with
        ``socket.socket(fileno=fd)`` to get a socket object.
        """
        self._require(OP["SOCKET"])
        op = _new_op(SocketOperation, self, None, self._take_ud())
        kind = _flags(type, "type") | _socket.SOCK_CLOEXEC
        return self._queue_ext(op, OP["SOCKET"], _pinning.index(family, "family"), 0,  # type: ignore[no-any-return]
                               _flags(proto, "proto"), kind)

    @_exclusive
    def socket_direct(self, family: int = _socket.AF_INET, type: int = _socket.SOCK_STREAM,
                      proto: int = 0, *, slot: int | None = None) -> DirectOperation:
        """Queue a ``socket`` whose file goes into the registered file table (Linux 5.19);
        the result is its :class:`~saferring.FixedFile`."""
        self._require(OP["SOCKET"])
        kind = _flags(type, "type")
        if kind & _socket.SOCK_CLOEXEC:
            raise ValueError("SOCK_CLOEXEC does not apply to a registered file")
        family, proto = _pinning.index(family, "family"), _flags(proto, "proto")
        op = _new_op(DirectOperation, self, None, self._take_flagged_ud())
        op._slot, file_index = self._direct_slot(slot, op)  # last: it may bump the slot
        return self._queue_ext(op, OP["SOCKET"], family, 0, proto, kind,  # type: ignore[no-any-return]
                               file_index=file_index)

    @_exclusive
    def connect(self, fd: Any, address: Any) -> IntOperation:
        """Queue a ``connect`` of socket ``fd`` to ``address`` (``(host, port)``, an IPv6 tuple or
        an AF_UNIX path, numeric hosts only).  The result is 0."""
        self._require(OP["CONNECT"])
        fd, fixed = self._fd(fd)
        addr, length = self._address(fd, fixed, address)
        op = self._plain_op("connect", addr)
        return self._queue_ext(op, OP["CONNECT"], fd, addr_of(addr), 0, length,  # type: ignore[no-any-return]
                               sqe_flags=fixed)

    @_exclusive
    def bind(self, fd: Any, address: Any) -> IntOperation:
        """Queue a ``bind`` (Linux 6.11)."""
        self._require(OP["BIND"])
        fd, fixed = self._fd(fd)
        addr, length = self._address(fd, fixed, address)
        op = self._plain_op("bind", addr)
        return self._queue_ext(op, OP["BIND"], fd, addr_of(addr), 0, length,  # type: ignore[no-any-return]
                               sqe_flags=fixed)

    @_exclusive
    def listen(self, fd: Any, backlog: int = _socket.SOMAXCONN) -> IntOperation:
        """Queue a ``listen`` (Linux 6.11)."""
        self._require(OP["LISTEN"])
        fd, fixed = self._fd(fd)
        op = self._plain_op("listen", None)
        return self._queue_ext(op, OP["LISTEN"], fd, 0, _flags(backlog, "backlog"),  # type: ignore[no-any-return]
                               sqe_flags=fixed)

    @_exclusive
    def accept(self, fd: Any, *, multishot: bool = False,
               flags: int = _socket.SOCK_CLOEXEC) -> Any:
        """Queue an ``accept`` on listening socket ``fd``.

        The result is ``(fd, address)``.  With ``multishot=True`` (Linux 5.19) one request
        accepts connection after connection: it returns an
        :class:`~saferring.operation.AcceptMultishotOperation` whose values are descriptors
        (use ``socket.socket(fileno=fd).getpeername()`` for addresses).  Every descriptor is the
        caller's to close; those never claimed are closed when the operation is collected.
        """
        self._require(OP["ACCEPT"])
        fd, fixed = self._fd(fd)
        flags = _flags(flags)
        if multishot:
            op: Any = _new_op(AcceptMultishotOperation, self, None, self._take_flagged_ud())
            return self._queue_ext(op, OP["ACCEPT"], fd, 0, 0, 0, flags, fixed,
                                   ioprio=_ACCEPT_MULTISHOT)
        addr = ffi.new("char[]", _sockaddr.SOCKADDR_STORAGE_SIZE)
        addrlen = ffi.new("unsigned int *", _sockaddr.SOCKADDR_STORAGE_SIZE)
        op = _new_op(AcceptOperation, self, (addr, addrlen), self._take_ud())
        op._addr, op._addrlen = addr, addrlen
        return self._queue_ext(op, OP["ACCEPT"], fd, addr_of(addr), 0, addr_of(addrlen), flags,
                               fixed)

    def accept_multishot(self, fd: Any, *, flags: int = _socket.SOCK_CLOEXEC) -> Any:
        """``accept(fd, multishot=True)``: one request accepting connection after connection
        (Linux 5.19); iterate over it, or collect with ``ring.wait()`` and ``op.take()``."""
        return self.accept(fd, multishot=True, flags=flags)

    @_exclusive
    def accept_direct(self, fd: Any, *, multishot: bool = False, slot: int | None = None,
                      flags: int = 0) -> Any:
        """Queue an ``accept`` whose connection goes into the registered file table.

        The result is a :class:`~saferring.FixedFile` (multishot: one per connection, taken with
        ``take()``; needs ``slot=None``).
        """
        self._require(OP["ACCEPT"])
        fd, fixed = self._fd(fd)
        if multishot and slot is not None:
            raise ValueError("a multishot accept_direct lets the kernel pick slots: slot=None")
        flags = _flags(flags)
        if multishot:
            op: Any = _new_op(AcceptDirectMultishotOperation, self, None, self._take_flagged_ud())
            self._direct_slot(None, op)  # checks a table exists
            return self._queue_ext(op, OP["ACCEPT"], fd, 0, 0, 0, flags, fixed,
                                   ioprio=_ACCEPT_MULTISHOT, file_index=_FILE_INDEX_ALLOC)
        op = _new_op(DirectOperation, self, None, self._take_flagged_ud())
        op._slot, file_index = self._direct_slot(slot, op)  # last: it may bump the slot
        return self._queue_ext(op, OP["ACCEPT"], fd, 0, 0, 0, flags, fixed,
                               file_index=file_index)

    @_exclusive
    def shutdown(self, fd: Any, how: int) -> IntOperation:
        """Queue a ``shutdown`` (``_socket.SHUT_RD``/``SHUT_WR``/``SHUT_RDWR``)."""
        self._require(OP["SHUTDOWN"])
        fd, fixed = self._fd(fd)
        op = self._plain_op("shutdown", None)
        return self._queue_ext(op, OP["SHUTDOWN"], fd, 0, _flags(how, "how"),  # type: ignore[no-any-return]
                               sqe_flags=fixed)

    # -- data ------------------------------------------------------------------------------

    @_exclusive
    def send(self, fd: Any, data: Any, flags: int = 0) -> IntOperation:
        """Queue a ``send`` of ``data`` (``MSG_*`` flags); the result is the bytes sent.

        ``data`` may be a :class:`~saferring.Buffer` (its filled bytes), ``IN_FLIGHT`` until
        the send ends."""
        if type(data) is Buffer:
            return self._send_buffer(fd, data, flags, False)  # type: ignore[no-any-return]
        self._require(OP["SEND"])
        fd, fixed = self._fd(fd)
        pin = _pinning.readable(data)
        flags = _msg_flags(flags, _MSG_SEND, "send()")
        op = self._plain_op("send", pin)
        return self._queue_ext(op, OP["SEND"], fd, addr_of(pin), _pinning.check_len(len(pin)),  # type: ignore[no-any-return]
                               0, flags, fixed)

    @_exclusive
    def recv(self, fd: Any, buffer: Any, flags: int = 0) -> IntOperation:
        """Queue a ``recv`` into ``buffer``; the result is the bytes received (0: peer closed).

        ``buffer`` may be a :class:`~saferring.Buffer`, or a :class:`~saferring.BufferRing` for
        the kernel to pick a buffer from when data arrives: the result is then that ``FILLED``
        Buffer, or ``None`` at end of stream."""
        if type(buffer) is Buffer or type(buffer) is BufferRing:
            return self._recv_buffer(fd, buffer, flags)  # type: ignore[no-any-return]
        self._require(OP["RECV"])
        fd, fixed = self._fd(fd)
        pin = _pinning.writable(buffer)
        flags = _msg_flags(flags, _MSG_RECV, "recv()")
        op = self._plain_op("recv", pin)
        return self._queue_ext(op, OP["RECV"], fd, addr_of(pin), _pinning.check_len(len(pin)),  # type: ignore[no-any-return]
                               0, flags, fixed)

    def _msghdr(self, fd: int, fixed: int, buffers: Any, pin: Any, address: Any,
                control: bytes | int) -> tuple[Any, list[Any]]:
        """A pinned msghdr and everything it points to (returned as the pin list)."""
        vec, bufs = _pinning.iovecs(buffers, pin) if buffers else (None, [])
        msg = ffi.new("struct msghdr *")
        pins: list[Any] = [msg, vec, bufs]
        if vec is not None:
            msg.msg_iov = vec
            msg.msg_iovlen = len(bufs)
        if isinstance(address, int):  # recvmsg: room for the sender's address
            name = ffi.new("char[]", address)
            msg.msg_name, msg.msg_namelen = name, address
            pins.append(name)
        elif address is not None:
            name, length = self._address(fd, fixed, address)
            msg.msg_name, msg.msg_namelen = name, length
            pins.append(name)
        if isinstance(control, int):
            if control:
                buf = ffi.new("char[]", control)
                msg.msg_control, msg.msg_controllen = buf, control
                pins.append(buf)
        elif control:
            buf = ffi.new("char[]", control)
            msg.msg_control, msg.msg_controllen = buf, len(control)
            pins.append(buf)
        return msg, pins

    @_exclusive
    def sendmsg(self, fd: Any, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> IntOperation:
        """Queue a ``sendmsg``: the bytes-like objects in ``buffers`` in order, ancillary data as
        :meth:`socket.socket.sendmsg` takes it (``[(level, type, data)]``), and an optional
        destination.  The result is the bytes sent."""
        self._require(OP["SENDMSG"])
        return self._sendmsg(OP["SENDMSG"], PathOperation, fd, buffers, ancdata, flags, address)  # type: ignore[no-any-return]

    @_exclusive
    def sendto(self, fd: Any, data: Any, address: Any, flags: int = 0) -> IntOperation:
        """Queue a ``sendto`` of ``data`` to ``address`` (prepared as a one-buffer sendmsg, which
        every io_uring kernel has)."""
        self._require(OP["SENDMSG"])
        return self._sendmsg(OP["SENDMSG"], PathOperation, fd, [data], (), flags, address)  # type: ignore[no-any-return]

    @_exclusive
    def sendmsg_zc(self, fd: Any, buffers: Any, ancdata: Any = (), flags: int = 0,
                   address: Any = None) -> SendZcOperation:
        """Queue a zero-copy ``sendmsg`` (Linux 6.1): like :meth:`sendmsg`, but the buffers stay
        pinned until the kernel's notification that the network stack is done with them."""
        self._require(OP["SENDMSG_ZC"])
        return self._sendmsg(OP["SENDMSG_ZC"], SendZcOperation, fd, buffers, ancdata, flags,  # type: ignore[no-any-return]
                             address)

    def _sendmsg(self, opcode: int, cls: Any, fd: Any, buffers: Any, ancdata: Any, flags: int,
                 address: Any) -> Any:
        fd, fixed = self._fd(fd)
        flags = _msg_flags(flags, _MSG_SENDMSG, f"{OPCODES[opcode].name.lower()}()")
        msg, pins = self._msghdr(fd, fixed, buffers, _pinning.readable, address,
                                 _sockaddr.encode_cmsgs(ancdata))
        ud = self._take_flagged_ud() if cls is SendZcOperation else self._take_ud()
        op = _new_op(cls, self, pins, ud)
        if cls is SendZcOperation:
            op._kind_name = OPCODES[opcode].name.lower()
        if cls is PathOperation:
            op._path = op._path2 = None
            op._label = OPCODES[opcode].name.lower()
        return self._queue_ext(op, opcode, fd, addr_of(msg), 1, 0, flags, fixed)

    @_exclusive
    def recvmsg(self, fd: Any, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> RecvmsgOperation:
        """Queue a ``recvmsg`` into the writable buffers in ``buffers`` (filled in order), with
        room for ``ancbufsize`` bytes of ancillary data (``socket.CMSG_SPACE`` sizes it).

        The result is a :class:`~saferring.operation.RecvmsgResult`: ``(nbytes, ancdata,
        msg_flags, address)``, like :meth:`socket.socket.recvmsg_into`.
        """
        self._require(OP["RECVMSG"])
        fd, fixed = self._fd(fd)
        ancbufsize = _pinning.index(ancbufsize, "ancbufsize")
        if not 0 <= ancbufsize <= 1 << 20:
            raise ValueError(f"ancbufsize must be between 0 and 1 MiB, got {ancbufsize}")
        msg, pins = self._msghdr(fd, fixed, buffers, _pinning.writable,
                                 _sockaddr.SOCKADDR_STORAGE_SIZE, ancbufsize)
        flags = _msg_flags(flags, _MSG_RECVMSG, "recvmsg()")
        op = _new_op(RecvmsgOperation, self, pins, self._take_ud())
        op._msg, op._name, op._control = msg, pins[3], pins[4] if ancbufsize else None
        return self._queue_ext(op, OP["RECVMSG"], fd, addr_of(msg), 1, 0, flags,  # type: ignore[no-any-return]
                               fixed)

    @_exclusive
    def send_zc(self, fd: Any, data: Any, flags: int = 0, address: Any = None) -> SendZcOperation:
        """Queue a zero-copy ``send`` (Linux 6.0), optionally to ``address``.

        The result is the bytes sent; ``data`` stays pinned until the kernel's notification that
        the network stack no longer reads it, which may come well after the bytes were sent.
        ``data`` may be a :class:`~saferring.Buffer`: one leased from this ring's
        :class:`~saferring.BufferPool` is sent from the registered buffer
        (``IORING_RECVSEND_FIXED_BUF``); it is ``IN_FLIGHT`` until the notification.
        """
        if type(data) is Buffer:
            return self._send_buffer(fd, data, flags, True, address)  # type: ignore[no-any-return]
        self._require(OP["SEND_ZC"])
        fd, fixed = self._fd(fd)
        pin = _pinning.readable(data)
        pins: list[Any] = [pin]
        dest, dest_len = 0, 0
        if address is not None:
            name, length = self._address(fd, fixed, address)
            pins.append(name)
            dest, dest_len = addr_of(name), lib.sr_addr_len_word(length)
        flags = _msg_flags(flags, _MSG_SEND, "send_zc()")
        op = _new_op(SendZcOperation, self, pins, self._take_flagged_ud())
        return self._queue_ext(op, OP["SEND_ZC"], fd, addr_of(pin),  # type: ignore[no-any-return]
                               _pinning.check_len(len(pin)), dest, flags, fixed,
                               file_index=dest_len)

    # -- socket commands (IORING_OP_URING_CMD on sockets, Linux 6.7) -------------------------

    def _cmd_sock(self, op: Any, cmd: int, fd: Any, level: int, optname: int, optval: Any,
                  optlen: int) -> Any:
        if not self._sup[OP["URING_CMD"]] or not kernel_can("SOCKET_COMMANDS"):
            raise UnsupportedOperationError(
                "socket commands (getsockopt/setsockopt/siocinq/siocoutq through io_uring) are "
                "not supported by this kernel; they came in Linux 6.7")
        fd, fixed = self._fd(fd)
        return self._queue_with(op, lib.sr_prep_cmd_sock, cmd, fd, _flags(level, "level"),
                                _flags(optname, "optname"), addr_of(optval), optlen, fixed)

    @_exclusive
    def getsockopt(self, fd: Any, level: int, optname: int, buflen: int = 4) -> SockoptOperation:
        """Queue a ``getsockopt`` (Linux 6.7); the result is the option's bytes (``buflen`` at
        most; an int option is ``int.from_bytes(value, sys.byteorder)``)."""
        buflen = _pinning.index(buflen, "buflen")
        if not 1 <= buflen <= 1 << 16:
            raise ValueError(f"buflen must be between 1 and 65536, got {buflen}")
        out = ffi.new("char[]", buflen)
        op = _new_op(SockoptOperation, self, out, self._take_ud())
        op._out = out
        return self._cmd_sock(op, _SOCKET_URING_OP_GETSOCKOPT, fd, level, optname, out,  # type: ignore[no-any-return]
                              buflen)

    @_exclusive
    def setsockopt(self, fd: Any, level: int, optname: int, value: Any) -> SockoptOperation:
        """Queue a ``setsockopt`` (Linux 6.7): ``value`` is an int or a bytes-like, as
        :meth:`socket.socket.setsockopt` takes it.  The result is 0."""
        if isinstance(value, int) and not isinstance(value, bool):
            if not -(1 << 31) <= value < 1 << 31:
                raise ValueError(f"an int option value is a 32-bit int, got {value}")
            buf = ffi.new("int *", value)
            size = ffi.sizeof("int")
        else:
            try:
                raw = bytes(memoryview(value))
            except TypeError:
                raise TypeError(f"value must be an int or a bytes-like object, got "
                                f"{type(value).__name__}") from None
            buf = ffi.new("char[]", raw or b"\0")  # a copy: the caller's object is not pinned
            size = len(raw)
        op = _new_op(SockoptOperation, self, buf, self._take_ud())
        return self._cmd_sock(op, _SOCKET_URING_OP_SETSOCKOPT, fd, level, optname, buf, size)  # type: ignore[no-any-return]

    @_exclusive
    def siocinq(self, fd: Any) -> SockoptOperation:
        """Queue a ``SIOCINQ`` (Linux 6.7): the result is the bytes waiting to be read."""
        op = _new_op(SockoptOperation, self, None, self._take_ud())
        return self._cmd_sock(op, _SOCKET_URING_OP_SIOCINQ, fd, 0, 0, None, 0)  # type: ignore[no-any-return]

    @_exclusive
    def siocoutq(self, fd: Any) -> SockoptOperation:
        """Queue a ``SIOCOUTQ`` (Linux 6.7): the result is the bytes not yet sent."""
        op = _new_op(SockoptOperation, self, None, self._take_ud())
        return self._cmd_sock(op, _SOCKET_URING_OP_SIOCOUTQ, fd, 0, 0, None, 0)  # type: ignore[no-any-return]

