"""Socket addresses and ancillary data in the forms Python's ``socket`` module uses.

Encoding happens before submission, into a C buffer the operation pins (``connect``, ``bind``,
``sendto``/``sendmsg``); decoding reads the buffer the kernel filled (``accept``, ``recvmsg``)
after the final CQE.  Only numeric hosts are taken: resolving a name would block the caller
(use ``socket.getaddrinfo`` or ``loop.getaddrinfo`` first).
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

from ._binding import ffi

#: Room for any address the kernel may return (``struct sockaddr_storage``).
SOCKADDR_STORAGE_SIZE = 128
_UNIX_PATH_MAX = 108  # sizeof(sun_path)
_HEADER = struct.Struct("=H")  # sa_family, native byte order
_PORT = struct.Struct("!H")
_IN6_TAIL = struct.Struct("=I16sI")  # after family and port: flowinfo, address, scope_id
_CMSG_HEADER = struct.Struct("@Nii")  # cmsg_len (size_t), cmsg_level, cmsg_type
_CMSG_ALIGN = struct.calcsize("@N")


def family_of(address: Any) -> int:
    """The address family an address in ``socket`` form belongs to (checked in :func:`encode`)."""
    if isinstance(address, (str, bytes, bytearray)):
        return socket.AF_UNIX
    if isinstance(address, tuple) and len(address) in (2, 3, 4) and isinstance(address[0], str):
        return socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    raise TypeError("an address is (host, port) for AF_INET, (host, port[, flowinfo[, scope_id]]) "
                    f"for AF_INET6, or a path for AF_UNIX; got {address!r}")


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"port must be an int between 0 and 65535, got {value!r}")
    return value


def encode(address: Any, family: int | None = None) -> bytes:
    """``struct sockaddr_*`` bytes for ``address``; ``family`` (the socket's) must match it."""
    found = family_of(address)
    if family is not None and family != found:
        raise ValueError(f"address {address!r} is {socket.AddressFamily(found).name}, but the "
                         f"socket is {_family_name(family)}")
    if found == socket.AF_UNIX:
        path = address.encode() if isinstance(address, str) else bytes(address)
        if len(path) > _UNIX_PATH_MAX - (0 if path[:1] == b"\0" else 1):
            raise ValueError(f"AF_UNIX path too long ({len(path)} bytes; at most "
                             f"{_UNIX_PATH_MAX - 1})")
        # An abstract address (leading NUL) is exactly as long as given; a path gets its NUL.
        return _HEADER.pack(socket.AF_UNIX) + path + (b"" if path[:1] == b"\0" else b"\0")
    host, port = address[0], _port(address[1])
    try:
        packed = socket.inet_pton(found, host)
    except OSError:
        raise ValueError(f"{host!r} is not a numeric {socket.AddressFamily(found).name} address; "
                         "resolve names first (socket.getaddrinfo)") from None
    if found == socket.AF_INET:
        if len(address) != 2:
            raise ValueError(f"an AF_INET address is (host, port), got {address!r}")
        return _HEADER.pack(socket.AF_INET) + _PORT.pack(port) + packed + bytes(8)
    flowinfo = address[2] if len(address) > 2 else 0
    scope_id = address[3] if len(address) > 3 else 0
    if not (isinstance(flowinfo, int) and 0 <= flowinfo <= 0xFFFFF):
        raise ValueError(f"flowinfo must be between 0 and 2**20-1, got {flowinfo!r}")
    if not (isinstance(scope_id, int) and 0 <= scope_id <= 0xFFFF_FFFF):
        raise ValueError(f"scope_id must be a 32-bit unsigned int, got {scope_id!r}")
    return (_HEADER.pack(socket.AF_INET6) + _PORT.pack(port)
            + struct.pack("!I", flowinfo) + packed + struct.pack("=I", scope_id))


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def decode(raw: bytes) -> Any:
    """The Python form of a ``struct sockaddr_*`` the kernel wrote (``raw`` is its used length)."""
    if len(raw) < 2:
        return None  # unnamed (an unbound AF_UNIX peer, say)
    family = _HEADER.unpack_from(raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), _PORT.unpack_from(raw, 2)[0]
    if family == socket.AF_INET6 and len(raw) >= 28:
        port = _PORT.unpack_from(raw, 2)[0]
        flowinfo = struct.unpack_from("!I", raw, 4)[0]
        scope_id = struct.unpack_from("=I", raw, 24)[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flowinfo, scope_id
    if family == socket.AF_UNIX:
        path = raw[2:]
        if path[:1] == b"\0":
            return path  # abstract: bytes, as the socket module returns them
        return path.split(b"\0", 1)[0].decode(sys.getfilesystemencoding(), "surrogateescape")
    return (family, raw[2:])


def socket_family(fd: int) -> int | None:
    """The address family of socket ``fd`` (``OSError`` if ``fd`` is not an open socket)."""
    sock = socket.socket(fileno=fd)
    try:
        return int(sock.family)
    finally:
        sock.detach()


def new_sockaddr(address: Any, family: int | None) -> tuple[Any, int]:
    """A pinned C copy of ``address`` and its length."""
    raw = encode(address, family)
    return ffi.new("char[]", raw), len(raw)


def encode_cmsgs(ancdata: Any) -> bytes:
    """Ancillary data (``[(level, type, data), ...]``, as ``socket.sendmsg`` takes) as the
    kernel's ``cmsghdr`` sequence."""
    out = bytearray()
    for item in ancdata:
        try:
            level, kind, data = item
            payload = bytes(memoryview(data))
        except (TypeError, ValueError):
            raise TypeError("ancillary data items are (level, type, bytes-like) tuples") from None
        length = socket.CMSG_LEN(len(payload))
        space = socket.CMSG_SPACE(len(payload))
        try:
            out += _CMSG_HEADER.pack(length, level, kind) + payload
        except struct.error:
            raise ValueError(f"ancillary level and type are 32-bit ints, got {level!r}, "
                             f"{kind!r}") from None
        out += bytes(space - _CMSG_HEADER.size - len(payload))
    return bytes(out)


def decode_cmsgs(raw: bytes) -> list[tuple[int, int, bytes]]:
    """The ``cmsghdr`` sequence the kernel wrote, as ``socket.recvmsg`` returns it."""
    items: list[tuple[int, int, bytes]] = []
    pos = 0
    header = _CMSG_HEADER.size
    while pos + header <= len(raw):
        length, level, kind = _CMSG_HEADER.unpack_from(raw, pos)
        if length < header:
            break
        items.append((level, kind, bytes(raw[pos + header:pos + min(length, len(raw) - pos)])))
        pos += (length + _CMSG_ALIGN - 1) & ~(_CMSG_ALIGN - 1)
    return items
