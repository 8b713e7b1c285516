"""Turning caller objects into memory the kernel may use, and keeping that memory alive.

Every helper returns a cffi object that *is* the pin: a ``from_buffer`` cdata holds a buffer export
of the caller's object for as long as it lives (so a ``bytearray`` cannot be resized, an ``mmap``
cannot be closed or resized, an ``array`` cannot grow, and a ``memoryview`` cannot be released),
and an ``ffi.new`` cdata owns its C memory.  The ring keeps these objects in the operation's
``_pins`` until the final CQE, then drops them, which releases the export or frees the memory.
"""

from __future__ import annotations

import array
import math
import mmap
import operator
import os
from typing import Any

from ._binding import ffi

_from_buffer = ffi.from_buffer if ffi is not None else None
MAX_LEN = 0xFFFF_FFFF  # the SQE's len field is 32 bits
MAX_SECONDS = 1e15  # ~31 million years: fits a 64-bit timespec with room to spare


def not_writable(obj: Any, exc: Exception) -> TypeError:
    return TypeError(
        "a read target must be a writable, C-contiguous buffer (bytearray, memoryview of one, "
        f"mmap, array.array...); got {type(obj).__name__}: {exc}"
    )


def not_readable(obj: Any, exc: Exception) -> TypeError:
    return TypeError(
        "data to write must be a C-contiguous bytes-like object (bytes, bytearray, memoryview, "
        f"mmap, array.array...); got {type(obj).__name__}: {exc}"
    )


#: Exporters that refuse to move or free their memory while a buffer export is held (they raise
#: BufferError instead).  Others may not: ``ctypes.resize`` reallocates an array under a live
#: export, which would leave the kernel writing into freed memory.  So only these are accepted,
#: directly or through (possibly nested) memoryviews of them.
LOCKING_EXPORTERS = (bytearray, bytes, array.array, mmap.mmap)


_type_mro = type.__dict__["__mro__"].__get__
_type_dict = type.__dict__["__dict__"].__get__


def _locks_memory(obj: Any) -> bool:
    # type(), not isinstance(): isinstance honours a spoofed __class__.  A subclass counts only
    # if no class between it and the whitelisted base defines its own buffer protocol (Python
    # 3.12's __buffer__, which could hand out another object's memory).  The MRO and the class
    # dicts are read through type's own descriptors, so a metaclass cannot disguise them.
    cls = type(obj)
    if cls in LOCKING_EXPORTERS:
        return True
    for klass in _type_mro(cls):
        if klass in LOCKING_EXPORTERS:
            return True
        if "__buffer__" in _type_dict(klass) or "__release_buffer__" in _type_dict(klass):
            return False
    return False


def check_exporter(obj: Any, writable: bool) -> None:
    """``TypeError`` unless ``obj`` is (a memoryview of) an exporter that locks its memory."""
    base = obj
    while type(base) is memoryview:  # memoryview cannot be subclassed
        base = base.obj  # ValueError for a released view, as Python's own I/O raises
    if not _locks_memory(base):
        what = "a read target" if writable else "data to write"
        raise TypeError(
            f"{what} must be a bytearray, array.array, mmap or memoryview of one"
            f"{'' if writable else ' (or bytes)'}, whose memory cannot move while the kernel "
            f"uses it; got {type(base).__name__}. Copy other buffers into a bytearray first."
        )


def index(value: Any, name: str) -> int:
    """``value`` as an int (``operator.index``), or ``TypeError`` naming the argument."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def u32(value: Any, name: str = "flags") -> int:
    """``value`` as an int for a 32-bit unsigned SQE field; ``ValueError`` outside 0..2**32-1."""
    number = index(value, name)
    if not 0 <= number <= 0xFFFF_FFFF:
        raise ValueError(f"{name} must be between 0 and 2**32-1, got {number}")
    return number


def c_int(value: Any, name: str) -> int:
    """``value`` as an int for a C ``int`` (a descriptor, an id); ``ValueError`` if it does not
    fit, rather than cffi's ``OverflowError``."""
    number = index(value, name)
    if not -(1 << 31) <= number < 1 << 31:
        raise ValueError(f"{name} must fit a 32-bit int, got {number}")
    return number


def writable(obj: Any) -> Any:
    """Pin a buffer the kernel will write into; ``TypeError`` unless it is writable and contiguous."""
    check_exporter(obj, True)
    try:
        # Positional require_writable: cffi parses keyword arguments slowly (~2x the call).
        return _from_buffer("char[]", obj, True)  # type: ignore[misc]
    except (TypeError, BufferError) as exc:
        raise not_writable(obj, exc) from None


def readable(obj: Any) -> Any:
    """Pin a buffer the kernel will read from; ``TypeError`` unless it is a contiguous bytes-like."""
    check_exporter(obj, False)
    try:
        return _from_buffer(obj)  # type: ignore[misc]
    except (TypeError, BufferError) as exc:
        raise not_readable(obj, exc) from None


def check_len(n: int) -> int:
    if n > MAX_LEN:
        raise ValueError(f"a single io_uring request moves at most {MAX_LEN} bytes; got {n}")
    return n


def iovecs(buffers: Any, pin: Any) -> tuple[Any, list[Any]]:
    """Pin each buffer with ``pin`` and build a C iovec array over them.

    Returns (iovec array, the buffer pins).  Both the array and the buffer pins
    must stay alive until the final CQE: the kernel reads the array itself after submission
    (asynchronously for requests punted to io-wq, before 5.5 even in the inline path).
    """
    try:
        items = list(buffers)
    except TypeError:
        raise TypeError(f"expected a sequence of buffers, got {type(buffers).__name__}") from None
    if not items:
        raise ValueError("readv/writev need at least one buffer")
    limit = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
    if len(items) > limit:
        raise ValueError(f"at most {limit} buffers per request (IOV_MAX); got {len(items)}")
    pins = [pin(b) for b in items]
    vec = ffi.new("struct iovec[]", len(pins))
    for i, p in enumerate(pins):
        vec[i].iov_base = p
        vec[i].iov_len = len(p)
    return vec, pins


def path(value: Any) -> Any:
    """A NUL-terminated C copy of a path (str, bytes or os.PathLike), like the ``os`` module takes."""
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError("embedded null byte in path")
    return ffi.new("char[]", raw)


def timespec(seconds: float) -> Any:
    """A ``struct __kernel_timespec`` for a non-negative, finite number of seconds."""
    if isinstance(seconds, (str, bytes, bytearray, bool)):
        raise TypeError(f"seconds must be a number, got {type(seconds).__name__}")
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        raise TypeError(f"seconds must be a number, got {type(seconds).__name__}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise ValueError(f"seconds must be finite, >= 0 and at most {MAX_SECONDS:g}; "
                         f"got {seconds!r}")
    ts = ffi.new("struct __kernel_timespec *")
    whole = int(value)
    ts.tv_sec = whole
    ts.tv_nsec = min(round((value - whole) * 1e9), 999_999_999)
    return ts


def pinned_bytes(pins: Any) -> int:
    """Bytes of memory held by a collection of pins, each object counted once (a buffer shared
    by several operations, as with ``read_many``, is pinned once)."""
    seen: set[int] = set()
    total = 0
    stack = list(pins)
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (tuple, list)):
            stack.extend(item)
            continue
        sizer = getattr(type(item), "_pinned_size", None)
        if sizer is not None:  # library objects (a Buffer, a duplicated descriptor...)
            total += sizer(item)
            continue
        # A pointer owns what it points to (a struct, var-sized ones included); arrays and
        # from_buffer views know their own size.
        ctype = ffi.typeof(item)
        if item == ffi.NULL:
            continue
        if ctype.kind != "pointer":
            total += ffi.sizeof(item)
        elif ctype.item.kind == "struct":
            total += ffi.sizeof(item[0])  # knows a var-sized struct's real length
        else:
            total += ffi.sizeof(ctype.item)  # item[0] of an int * is a Python int
    return total


def offsets_array(offsets: Any) -> array.array[int]:
    """``offsets`` (a sequence of ints >= 0) as an ``array('Q')``; one passed in is used as is
    (array('Q') converts a list twice as fast as cffi does)."""
    if type(offsets) is array.array and offsets.typecode == "Q":
        return offsets
    if isinstance(offsets, (int, str, bytes, bytearray, memoryview)):
        raise TypeError(f"offsets must be a sequence of ints, got {type(offsets).__name__}")
    try:
        return array.array("Q", offsets)
    except OverflowError:
        raise ValueError("offsets must be >= 0 (and below 2**64)") from None
    except TypeError:
        raise TypeError("offsets must be a sequence of ints") from None


MAX_OFFSET = (1 << 63) - 1  # file offsets are signed 64-bit in the kernel (loff_t)


def check_offset(offset: int) -> None:
    """``ValueError`` unless ``offset`` is a file offset, or -1 for the file position."""
    if not -1 <= offset <= MAX_OFFSET:
        raise ValueError(f"offset must be between 0 and 2**63-1, or -1 for the file position; "
                         f"got {offset}")


class OwnedFd:
    """A duplicate of the caller's descriptor, pinned by the operation that names a file by
    number when the kernel runs it (a re-armed receive, ``msg_ring``'s target) and closed when
    that operation ends: the request reaches the same file even if the caller's number is
    closed and reused meanwhile (the kernel holds the file the same way for a request in
    flight)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = -1
        self.fd = os.dup(fd)

    def __del__(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass

    @classmethod
    def _pinned_size(cls, obj: object) -> int:
        return 0
