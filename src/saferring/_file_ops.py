"""File and filesystem operations beyond the core read/write/open/close/statx.

Each method pins what its SQE points to (paths, ``open_how``, attribute names and values) in the
operation and queues one SQE through ``Ring._queue_ext``.  Field placement follows the kernel ABI
(``io_uring_prep_*`` in liburing says the same); ops newer than the installed liburing need
nothing from it.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from . import _pinning
from ._binding import ffi
from ._guard import _exclusive
from ._ops_base import OpsBase, addr_of
from .constants import SPLICE_F_MORE, SPLICE_F_MOVE, SPLICE_F_NONBLOCK
from .features import OP, OPCODES
from .fixed import FixedFile
from .operation import (
    DirectOperation,
    FdOperation,
    IntOperation,
    OpenOperation,
    PathOperation,
    XattrOperation,
)
from .operation import new_operation as _new_op

_AT_FDCWD = -100
_AT_REMOVEDIR = 0x200
_AT_SYMLINK_FOLLOW = 0x400
_FILE_INDEX_ALLOC = 0xFFFF_FFFF  # IORING_FILE_INDEX_ALLOC: the kernel picks a free slot
_SPLICE_F_FD_IN_FIXED = 1 << 31
_SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE
_MAX_U32 = 0xFFFF_FFFF
_XATTR_SIZE_MAX = 65536  # the kernel's limit on an attribute value
#: madvise() advice that only changes how the kernel treats the pages, never which memory a
#: Python object's pointer leads to.  Refused: MADV_DONTFORK (the child's mmap object would
#: point at nothing), MADV_HWPOISON/SOFT_OFFLINE (kill or migrate), MADV_REMOVE and others.
_SAFE_ADVICE = frozenset(
    getattr(mmap, name) for name in (
        "MADV_NORMAL", "MADV_RANDOM", "MADV_SEQUENTIAL", "MADV_WILLNEED", "MADV_DONTNEED",
        "MADV_FREE", "MADV_COLD", "MADV_PAGEOUT", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE",
        "MADV_DONTDUMP", "MADV_DODUMP", "MADV_MERGEABLE", "MADV_UNMERGEABLE",
    ) if hasattr(mmap, name)
)


_u32 = _pinning.u32


def _dir_fd(dir_fd: int | None) -> int:
    if dir_fd is None:
        return _AT_FDCWD
    if isinstance(dir_fd, FixedFile):
        raise TypeError("dir_fd must be a descriptor, not a FixedFile")
    return _pinning.c_int(dir_fd, "dir_fd")



def _u64(value: Any, name: str) -> int:
    number = _pinning.index(value, name)
    if not 0 <= number < 1 << 63:
        raise ValueError(f"{name} must be between 0 and 2**63-1, got {number}")
    return number


def _name(value: Any) -> Any:
    """An extended attribute name as a pinned C string."""
    raw = os.fsencode(value)
    if not raw or b"\0" in raw:
        raise ValueError("an attribute name must be non-empty and contain no NUL byte")
    if len(raw) > 255:
        raise ValueError(f"an attribute name is at most 255 bytes (XATTR_NAME_MAX), got {len(raw)}")
    return ffi.new("char[]", raw)


class FileOps(OpsBase):
    """File and filesystem operations (a part of :class:`~saferring.Ring`)."""

    __slots__ = ()

    @_exclusive
    def sync_file_range(self, fd: Any, offset: int, nbytes: int,
                        flags: int = 2) -> IntOperation:
        """Queue a ``sync_file_range`` of ``nbytes`` from ``offset`` (0: to the end of file).

        ``flags`` are ``SYNC_FILE_RANGE_*`` from :mod:`saferring.constants` (default: WRITE).
        """
        self._require(OP["SYNC_FILE_RANGE"])
        fd, sqe_flags = self._fd(fd)
        op = self._plain_op("sync_file_range", None)
        return self._queue_ext(op, OP["SYNC_FILE_RANGE"], fd, 0, _u32(nbytes, "nbytes"),  # type: ignore[no-any-return]
                               _u64(offset, "offset"), _u32(flags, "flags"), sqe_flags)

    @_exclusive
    def fallocate(self, fd: Any, offset: int, length: int, mode: int = 0) -> IntOperation:
        """Queue a ``fallocate(fd, mode, offset, length)`` (``FALLOC_FL_*`` modes)."""
        self._require(OP["FALLOCATE"])
        fd, sqe_flags = self._fd(fd)
        op = self._plain_op("fallocate", None)
        # The ABI puts the length in addr and the mode in len.
        return self._queue_ext(op, OP["FALLOCATE"], fd, _u64(length, "length"),  # type: ignore[no-any-return]
                               _u32(mode, "mode"), _u64(offset, "offset"), sqe_flags=sqe_flags)

    @_exclusive
    def fadvise(self, fd: Any, offset: int, length: int, advice: int) -> IntOperation:
        """Queue a ``posix_fadvise`` (``os.POSIX_FADV_*``); ``length`` 0 means to the end.

        ``length`` is at most 2**32-1: the SQE carries it in 32 bits.
        """
        self._require(OP["FADVISE"])
        fd, sqe_flags = self._fd(fd)
        op = self._plain_op("fadvise", None)
        return self._queue_ext(op, OP["FADVISE"], fd, 0, _u32(length, "length"),  # type: ignore[no-any-return]
                               _u64(offset, "offset"), _u32(advice, "advice"), sqe_flags)

    @_exclusive
    def madvise(self, buffer: mmap.mmap, offset: int, length: int, advice: int) -> IntOperation:
        """Queue a ``madvise`` on pages of an :class:`mmap.mmap` (``mmap.MADV_*``).

        Only mmap objects are taken: their memory is whole pages that belong to them alone.
        ``offset`` must be a multiple of the page size and the range must lie inside the map.
        Advice that could leave a Python object pointing at missing memory (``MADV_DONTFORK``,
        ``MADV_HWPOISON``, ``MADV_REMOVE``...) raises ``ValueError``.
        """
        self._require(OP["MADVISE"])
        if not isinstance(buffer, mmap.mmap):
            raise TypeError(f"madvise() takes an mmap.mmap, got {type(buffer).__name__}")
        advice = _pinning.index(advice, "advice")
        if advice not in _SAFE_ADVICE:
            raise ValueError(f"madvise advice {advice} is not one saferring allows (it could "
                             "leave Python objects pointing at missing memory)")
        offset = _pinning.index(offset, "offset")
        length = _pinning.index(length, "length")
        if buffer.closed:
            raise ValueError("madvise() on a closed mmap")
        pin = _pinning.readable(buffer)  # read-only maps too: madvise writes no data
        if offset % mmap.PAGESIZE or not offset >= 0 or length < 0 or offset + length > len(pin):
            raise ValueError(f"offset must be page-aligned and offset+length within the map "
                             f"({len(pin)} bytes); got offset={offset}, length={length}")
        address = addr_of(pin) + offset
        if address % mmap.PAGESIZE:
            # The kernel rounds the range out to whole pages: they must all be the map's own.
            raise ValueError("the mmap's memory does not start on a page boundary")
        op = self._plain_op("madvise", pin)
        return self._queue_ext(op, OP["MADVISE"], -1, address,  # type: ignore[no-any-return]
                               _u32(length, "length"), 0, advice)

    def _open_how(self, flags: int, mode: int, resolve: int) -> Any:
        how = ffi.new("sr_open_how *")
        how.flags = _u64(flags, "flags")
        how.mode = _u64(mode, "mode")
        how.resolve = _u64(resolve, "resolve")
        return how

    @_exclusive
    def openat2(self, path: Any, flags: int = os.O_RDONLY, mode: int = 0, *, resolve: int = 0,
                dir_fd: int | None = None) -> OpenOperation:
        """Queue an ``openat2`` (``RESOLVE_*`` from :mod:`saferring.constants` in ``resolve``).

        Like :meth:`openat`, the descriptor is non-inheritable and is the caller's to close;
        unlike it, ``mode`` must be 0 unless ``flags`` create a file (the kernel checks).
        """
        self._require(OP["OPENAT2"])
        cpath = _pinning.path(path)
        flags = _pinning.index(flags, "flags") | os.O_CLOEXEC
        how = self._open_how(flags, mode, resolve)
        op = _new_op(OpenOperation, self, (cpath, how), self._take_ud())
        op._path = path
        return self._queue_ext(op, OP["OPENAT2"], _dir_fd(dir_fd), addr_of(cpath),  # type: ignore[no-any-return]
                               ffi.sizeof("sr_open_how"), addr_of(how))

    @_exclusive
    def openat_direct(self, path: Any, flags: int = os.O_RDONLY, mode: int = 0o644, *,
                      dir_fd: int | None = None, slot: int | None = None) -> DirectOperation:
        """Queue an ``openat`` whose file goes straight into the registered file table.

        The result is a :class:`~saferring.FixedFile`.  ``slot=None`` lets the kernel pick a free
        slot (Linux 5.19); a given slot is replaced, which makes older handles to it stale.
        Needs :meth:`register_files` first.
        """
        self._require(OP["OPENAT"])
        cpath = _pinning.path(path)
        flags = _pinning.index(flags, "flags")
        if flags & os.O_CLOEXEC:
            raise ValueError("O_CLOEXEC does not apply to a registered file (the kernel refuses it)")
        dfd, mode = _dir_fd(dir_fd), _u32(mode, "mode")
        op = _new_op(DirectOperation, self, cpath, self._take_flagged_ud())
        op._path = path
        op._slot, file_index = self._direct_slot(slot, op)  # last: it may bump the slot
        return self._queue_ext(op, OP["OPENAT"], dfd, addr_of(cpath), mode, 0, flags,  # type: ignore[no-any-return]
                               file_index=file_index)

    def _direct_slot(self, slot: int | None, op: Any = None) -> tuple[int, int]:
        """(slot to report, SQE file_index) for a direct-descriptor request.  Call it after
        every other argument is checked: an explicit slot is bumped here.  ``op`` records the
        table and its version, against which its result's handle is checked."""
        from .errors import OperationStateError

        table = self._files
        if table is None:
            raise OperationStateError("no file table is registered: call ring.register_files() "
                                      "(a count makes a sparse table) first")
        if slot is None:
            reported, file_index = -1, _FILE_INDEX_ALLOC
        else:
            reported = _pinning.index(slot, "slot")
            if not 0 <= reported < len(table.generations):
                raise ValueError(f"slot must be between 0 and {len(table.generations) - 1}, "
                                 f"got {reported}")
            table.bump(reported)  # whatever was there is replaced: older handles are stale now
            file_index = reported + 1
        if op is not None:
            op._table, op._since = table, table.version
        return reported, file_index

    @_exclusive
    def unlinkat(self, path: Any, *, dir_fd: int | None = None, rmdir: bool = False) -> PathOperation:
        """Queue an ``unlinkat`` (``rmdir=True``: remove a directory, as ``os.rmdir``)."""
        self._require(OP["UNLINKAT"])
        cpath = _pinning.path(path)
        op = self._plain_op("unlinkat", cpath, path)
        return self._queue_ext(op, OP["UNLINKAT"], _dir_fd(dir_fd), addr_of(cpath),  # type: ignore[no-any-return]
                               op_flags=_AT_REMOVEDIR if rmdir else 0)

    @_exclusive
    def renameat(self, src: Any, dst: Any, *, src_dir_fd: int | None = None,
                 dst_dir_fd: int | None = None, flags: int = 0) -> PathOperation:
        """Queue a ``renameat2`` (``RENAME_*`` flags from :mod:`saferring.constants`)."""
        self._require(OP["RENAMEAT"])
        csrc, cdst = _pinning.path(src), _pinning.path(dst)
        op = self._plain_op("renameat", (csrc, cdst), src, dst)
        return self._queue_ext(op, OP["RENAMEAT"], _dir_fd(src_dir_fd), addr_of(csrc),  # type: ignore[no-any-return]
                               _dir_fd(dst_dir_fd) & _MAX_U32, addr_of(cdst),
                               _u32(flags, "flags"))

    @_exclusive
    def mkdirat(self, path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> PathOperation:
        """Queue a ``mkdirat``."""
        self._require(OP["MKDIRAT"])
        cpath = _pinning.path(path)
        op = self._plain_op("mkdirat", cpath, path)
        return self._queue_ext(op, OP["MKDIRAT"], _dir_fd(dir_fd), addr_of(cpath),  # type: ignore[no-any-return]
                               _u32(mode, "mode"))

    @_exclusive
    def symlinkat(self, target: Any, linkpath: Any, *, dir_fd: int | None = None) -> PathOperation:
        """Queue a ``symlinkat``: ``linkpath`` (relative to ``dir_fd``) will point to ``target``."""
        self._require(OP["SYMLINKAT"])
        ctarget, clink = _pinning.path(target), _pinning.path(linkpath)
        op = self._plain_op("symlinkat", (ctarget, clink), target, linkpath)
        return self._queue_ext(op, OP["SYMLINKAT"], _dir_fd(dir_fd), addr_of(ctarget),  # type: ignore[no-any-return]
                               0, addr_of(clink))

    @_exclusive
    def linkat(self, src: Any, dst: Any, *, src_dir_fd: int | None = None,
               dst_dir_fd: int | None = None, follow_symlinks: bool = False) -> PathOperation:
        """Queue a ``linkat``: a new hard link ``dst`` to ``src``."""
        self._require(OP["LINKAT"])
        csrc, cdst = _pinning.path(src), _pinning.path(dst)
        op = self._plain_op("linkat", (csrc, cdst), src, dst)
        return self._queue_ext(op, OP["LINKAT"], _dir_fd(src_dir_fd), addr_of(csrc),  # type: ignore[no-any-return]
                               _dir_fd(dst_dir_fd) & _MAX_U32, addr_of(cdst),
                               _AT_SYMLINK_FOLLOW if follow_symlinks else 0)

    @_exclusive
    def ftruncate(self, fd: Any, length: int) -> IntOperation:
        """Queue an ``ftruncate`` of ``fd`` to ``length`` bytes (Linux 6.9)."""
        self._require(OP["FTRUNCATE"])
        fd, sqe_flags = self._fd(fd)
        op = self._plain_op("ftruncate", None)
        return self._queue_ext(op, OP["FTRUNCATE"], fd, 0, 0, _u64(length, "length"),  # type: ignore[no-any-return]
                               sqe_flags=sqe_flags)

    # -- extended attributes ---------------------------------------------------------------

    @_exclusive
    def fgetxattr(self, fd: Any, name: Any, size: int = _XATTR_SIZE_MAX) -> XattrOperation:
        """Queue an ``fgetxattr``; the result is the value (``bytes``, at most ``size``).

        A value longer than ``size`` fails with ``ERANGE``.
        """
        self._require(OP["FGETXATTR"])
        fd, sqe_flags = self._fd(fd)
        cname = _name(name)
        # size 0 would ask the kernel for the value's length only: not what the result is.
        size = _xattr_size(size, 1)
        out = ffi.new("char[]", size)
        op = _new_op(XattrOperation, self, (cname, out), self._take_ud())
        op._out, op._path = out, None
        return self._queue_ext(op, OP["FGETXATTR"], fd, addr_of(cname), size,  # type: ignore[no-any-return]
                               addr_of(out), sqe_flags=sqe_flags)

    @_exclusive
    def getxattr(self, path: Any, name: Any, size: int = _XATTR_SIZE_MAX) -> XattrOperation:
        """Queue a ``getxattr`` of ``path``; the result is the value (``bytes``)."""
        self._require(OP["GETXATTR"])
        cpath, cname = _pinning.path(path), _name(name)
        # size 0 would ask the kernel for the value's length only: not what the result is.
        size = _xattr_size(size, 1)
        out = ffi.new("char[]", size)
        op = _new_op(XattrOperation, self, (cpath, cname, out), self._take_ud())
        op._out, op._path = out, path
        return self._queue_ext(op, OP["GETXATTR"], 0, addr_of(cname), size,  # type: ignore[no-any-return]
                               addr_of(out), addr3=addr_of(cpath))

    @_exclusive
    def fsetxattr(self, fd: Any, name: Any, value: Any, flags: int = 0) -> IntOperation:
        """Queue an ``fsetxattr`` (``XATTR_CREATE``/``XATTR_REPLACE`` in ``flags``)."""
        self._require(OP["FSETXATTR"])
        fd, sqe_flags = self._fd(fd)
        cname, pin = _name(name), _pinning.readable(value)
        op = self._plain_op("fsetxattr", (cname, pin))
        return self._queue_ext(op, OP["FSETXATTR"], fd, addr_of(cname), _xattr_size(len(pin)),  # type: ignore[no-any-return]
                               addr_of(pin), _u32(flags, "flags"), sqe_flags)

    @_exclusive
    def setxattr(self, path: Any, name: Any, value: Any, flags: int = 0) -> PathOperation:
        """Queue a ``setxattr`` of ``path``."""
        self._require(OP["SETXATTR"])
        cpath, cname, pin = _pinning.path(path), _name(name), _pinning.readable(value)
        op = self._plain_op("setxattr", (cpath, cname, pin), path)
        return self._queue_ext(op, OP["SETXATTR"], 0, addr_of(cname), _xattr_size(len(pin)),  # type: ignore[no-any-return]
                               addr_of(pin), _u32(flags, "flags"), addr3=addr_of(cpath))

    # -- pipes ---------------------------------------------------------------------------

    @_exclusive
    def splice(self, fd_in: Any, fd_out: Any, nbytes: int, *, offset_in: int = -1,
               offset_out: int = -1, flags: int = 0) -> IntOperation:
        """Queue a ``splice`` of up to ``nbytes`` from ``fd_in`` to ``fd_out`` (one of them a pipe).

        ``offset_*=-1`` uses (and advances) the file position; pipes take no offset.  The
        result is the number of bytes moved.  ``flags``: ``SPLICE_F_*``.
        """
        self._require(OP["SPLICE"])
        return self._splice(OP["SPLICE"], fd_in, fd_out, nbytes, offset_in, offset_out, flags)

    @_exclusive
    def tee(self, fd_in: Any, fd_out: Any, nbytes: int, *, flags: int = 0) -> IntOperation:
        """Queue a ``tee``: duplicate up to ``nbytes`` from pipe ``fd_in`` into pipe ``fd_out``."""
        self._require(OP["TEE"])
        return self._splice(OP["TEE"], fd_in, fd_out, nbytes, 0, 0, flags)

    def _splice(self, opcode: int, fd_in: Any, fd_out: Any, nbytes: int, offset_in: int,
                offset_out: int, flags: int) -> IntOperation:
        flags = _u32(flags, "flags")
        if flags & ~_SPLICE_FLAGS:
            raise ValueError(f"flags must be SPLICE_F_* values, got {flags:#x}")
        in_fd, in_fixed = self._fd(fd_in)
        out_fd, sqe_flags = self._fd(fd_out)
        if in_fixed:
            flags |= _SPLICE_F_FD_IN_FIXED
        for name, value in (("offset_in", offset_in), ("offset_out", offset_out)):
            if not -1 <= _pinning.index(value, name) < 1 << 63:
                raise ValueError(f"{name} must be >= 0, or -1 for none/the file position")
        op = self._plain_op(OPCODES[opcode].name.lower(), None)
        # splice_off_in shares the addr field; splice_fd_in the file_index field.
        return self._queue_ext(op, opcode, out_fd, offset_in & 0xFFFF_FFFF_FFFF_FFFF,  # type: ignore[no-any-return]
                               _u32(nbytes, "nbytes"), offset_out, flags, sqe_flags,
                               file_index=in_fd & _MAX_U32)

    @_exclusive
    def fixed_fd_install(self, fixed: FixedFile, *, cloexec: bool = True) -> FdOperation:
        """Queue a ``fixed_fd_install``: a regular descriptor for a registered file (Linux 6.8).

        The result is the new descriptor (the caller's to close; closed if never claimed).
        """
        self._require(OP["FIXED_FD_INSTALL"])
        if not isinstance(fixed, FixedFile):
            raise TypeError(f"fixed_fd_install() takes a FixedFile, got {type(fixed).__name__}")
        slot, sqe_flags = self._fd(fixed)
        from .operation import FixedFdInstallOperation

        op = _new_op(FixedFdInstallOperation, self, None, self._take_ud())
        no_cloexec = 0 if cloexec else 1  # IORING_FIXED_FD_NO_CLOEXEC
        return self._queue_ext(op, OP["FIXED_FD_INSTALL"], slot, op_flags=no_cloexec,  # type: ignore[no-any-return]
                               sqe_flags=sqe_flags)


def _xattr_size(size: Any, minimum: int = 0) -> int:
    number = _pinning.index(size, "size")
    if not minimum <= number <= _XATTR_SIZE_MAX:
        raise ValueError(f"size must be between {minimum} and {_XATTR_SIZE_MAX} bytes, got {number}")
    return number

