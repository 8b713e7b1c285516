"""Async file objects on io_uring, with the API of aiofiles (so switching is a one-line change).

``await saferring.aio.open(path, "rb")`` (or ``async with saferring.aio.open(...) as f``)
returns an :class:`AsyncFile` (binary) or :class:`AsyncTextFile` (text).  Reads and writes are
io_uring requests on the loop's ring; nothing runs in a thread pool.

Where the bytes are
-------------------
A binary file keeps a read-ahead buffer (bytes at the current position that were read but not
yet returned) and a write buffer (bytes written but not yet handed to the kernel); only one of
them holds anything at a time.  The file's position is saferring's own: every request names its
offset (``pread``/``pwrite`` semantics), except on files that have no position (pipes, FIFOs,
character devices) and in append mode, where the kernel's position is used.

Page-cache hits
---------------
On regular files a read is first tried with ``preadv2(RWF_NOWAIT)`` on the loop thread
(``nowait.c``): the kernel copies what the page cache holds and refuses, instead of sleeping,
when it would have to wait for the device; only then is the read queued on the ring.  For a
cached 4 KiB read that is one system call instead of an ``io_uring_enter`` plus the ring's
bookkeeping (``benchmarks/test_bench_aio.py``); ``open(..., nowait=False)`` turns it off.

Cancellation
------------
A task cancelled while its file request is in flight gets :class:`asyncio.CancelledError` at
once; the request itself is not cancelled (the kernel finishes it) and its outcome is applied to
the file when it ends: data a read brought in joins the read-ahead buffer, so the next read
returns it, and the position counts what a write wrote (the rest stays buffered).  The file's
next call waits for that first, so the file never sees two requests at once.
"""

from __future__ import annotations

import asyncio
import codecs
import fcntl
import io
import mmap
import os
import stat as _stat
import warnings
from asyncio.events import _get_running_loop
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable
from typing import TYPE_CHECKING, Any, AnyStr, Generic

from .._binding import ffi, lib
from .._state import COMPLETED
from ..operation import Operation, StatxResult

if TYPE_CHECKING:
    from types import TracebackType

    from ._ring import AsyncRing

_CHUNK = 64 * 1024  # read-ahead and write-behind size unless buffering= says otherwise
_SCRATCH = 256 * 1024  # the largest read served through the per-ring non-blocking scratch buffer
_NEG_EAGAIN = -11
_SPARE_ALIGNED = 64  # O_DIRECT read buffers an AsyncFile keeps for reuse
_pread_nowait: Any = lib.sr_pread_nowait if lib is not None else None
_unpack: Any = ffi.unpack if ffi is not None else None


def _direct_buffer(size: int) -> mmap.mmap:
    """Page-aligned memory for an O_DIRECT request of ``size`` bytes (whole pages)."""
    return mmap.mmap(-1, max(-(-size // mmap.PAGESIZE), 1) * mmap.PAGESIZE)


def _filled(buf: bytearray | mmap.mmap, n: int) -> bytes:
    """The first ``n`` bytes a read left in ``buf``, as ``bytes``."""
    if isinstance(buf, mmap.mmap):
        return buf[:n]  # an mmap's slice is bytes already
    del buf[n:]  # (the request has ended: nothing exports it any more)
    return bytes(buf)


def _get_ring(ring: AsyncRing | None) -> AsyncRing:
    if ring is not None:
        return ring
    from . import get_ring

    return get_ring()


def _scratch(aring: AsyncRing) -> Any:
    """The ring's buffer for non-blocking reads: C memory, used only during one synchronous
    call (never while a request is in flight), so one per ring (one loop thread) is enough."""
    buf = aring._nowait_buf
    if buf is None:
        buf = aring._nowait_buf = ffi.new("char[]", _SCRATCH)
    return buf


class _Lines(Generic[AnyStr]):
    """What both kinds of file build on ``readline()`` and ``write()``."""

    if TYPE_CHECKING:
        async def readline(self, size: int | None = -1) -> AnyStr: ...
        async def write(self, data: AnyStr) -> int: ...

    async def readlines(self, hint: int = -1) -> list[AnyStr]:
        """Read lines until end of file (or until ``hint`` bytes or characters were read)."""
        lines: list[AnyStr] = []
        total = 0
        while True:
            line = await self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    async def writelines(self, lines: Iterable[AnyStr]) -> None:
        """Write every item of ``lines`` (no separators are added)."""
        for line in lines:
            await self.write(line)

    def __aiter__(self) -> AsyncIterator[AnyStr]:
        return self

    async def __anext__(self) -> AnyStr:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class AsyncFile(_Lines[bytes]):
    """A binary file on io_uring: the ``aiofiles`` binary file API as coroutines.

    Created by :func:`saferring.aio.open`.  Calls on one file run one at a time (a second task
    waits for the first).  ``read``, ``read1``, ``readinto``, ``readline``, ``readlines``,
    ``readall``, ``write``, ``writelines``, ``seek``, ``tell``, ``flush``, ``truncate`` and
    ``close`` are coroutines; ``pread(size, offset)`` and ``pwrite(data, offset)`` read and write
    at an offset without moving the position; ``async for line in f`` iterates over lines.
    """

    def __init__(self, aring: AsyncRing, fd: int, name: Any, mode: str, *, readable: bool,
                 writable: bool, append: bool, closefd: bool, buffer_size: int,
                 nowait: bool) -> None:
        st = os.fstat(fd)
        self._aring = aring
        self._fd = fd
        self.name = name
        self.mode = mode
        self._readable = readable
        self._writable = writable
        self._append = append
        self._closefd = closefd
        self._regular = _stat.S_ISREG(st.st_mode)
        # Regular files and block devices have offsets; pipes, sockets, ttys do not.
        self._seekable = self._regular or _stat.S_ISBLK(st.st_mode)
        self._chunk = max(buffer_size, 1)
        self._unbuffered = buffer_size == 0
        # O_DIRECT: requests need page-aligned memory, and preadv2(RWF_NOWAIT) would read from
        # the device synchronously on the loop thread (it does not refuse direct reads).
        self._direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
        self._nowait = nowait and self._regular and not self._direct and readable
        self._loop = aring._loop
        self._scratch = _scratch(aring) if self._nowait else None
        self._spare: list[mmap.mmap] = []  # O_DIRECT: aligned memory of ended reads, reusable
        # The offset of the next raw read (-1: the kernel's position, for files without offsets).
        self._raw = (st.st_size if append else 0) if self._seekable else -1
        self._rbuf = b""  # read-ahead: bytes at [tell(), tell() + len - rpos)
        self._rpos = 0
        self._wbuf = bytearray()  # write-behind: bytes at [_raw, _raw + len)
        self._closed = False
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._pending: Operation[Any] | None = None  # a request whose task was cancelled

    # -- one call at a time ---------------------------------------------------------------------

    async def _enter(self) -> None:
        """Wait for the calls before this one, and for a request a cancelled call left."""
        aring = self._aring
        aring._check_loop()  # before any request is queued: the ring's futures are its loop's
        if self._busy:
            fut = aring._loop.create_future()
            self._waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._leave()  # it was our turn: pass it on
                else:
                    self._waiters.remove(fut)
                raise
        self._busy = True
        try:
            while self._pending is not None:
                op = self._pending
                aring._check_loop()
                if op._res is not None:
                    # It ended without its salvage (the ring was closed): nothing to apply,
                    # and waiting again would return at once, forever.
                    self._pending = None
                    break
                # Not _until_done(): if this task is cancelled, its _abandon() would replace
                # the cancelled call's salvage (which applies the result and clears _pending).
                fut = aring._add_waiter(op)
                try:
                    await fut
                except asyncio.CancelledError:
                    aring._drop_waiter(op, fut)
                    raise
        except BaseException:
            self._leave()
            raise

    def _leave(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the busy flag passes to that task
                return
        self._busy = False

    def _check(self, reading: bool | None) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed file")
        if reading is True and not self._readable:
            raise io.UnsupportedOperation("not readable")
        if reading is False and not self._writable:
            raise io.UnsupportedOperation("not writable")

    async def _await(self, op: Operation[Any], salvage: Any, *args: Any) -> Any:
        """Submit ``op`` and return its result; a cancelled task leaves it to ``salvage``."""
        aring = self._aring
        aring._submit_soon(op)
        if op._res is None:
            self._pending = op
            await aring._until_done(op, salvage, (self, *args), cancel=False)
            self._pending = None
        return op.result()

    # -- raw requests ---------------------------------------------------------------------------

    async def _raw_read(self, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (-1: the kernel's position), b"" at end of file."""
        if self._nowait and size <= _SCRATCH and offset >= 0:
            scratch = self._scratch
            n = lib.sr_pread_nowait(self._fd, scratch, size, offset)
            if n >= 0:
                return ffi.buffer(scratch, n)[:]  # type: ignore[no-any-return]
            if n != _NEG_EAGAIN:
                self._nowait = False  # the file system cannot tell without blocking
        buf = _direct_buffer(size) if self._direct else bytearray(size)
        op = self._aring._ring.read(self._fd, buf, offset)
        n = await self._await(op, _salvage_read, buf, offset)
        return _filled(buf, n)

    async def _fill(self, want: int) -> bool:
        """Read at least one more chunk into the read-ahead buffer; False at end of file."""
        size = want if self._unbuffered else max(want, self._chunk)
        offset = self._raw
        data = await self._raw_read(size, offset)
        if not data:
            return False
        self._absorb(data, offset)
        return True

    def _absorb(self, data: bytes, offset: int) -> None:
        """Append what a read at ``offset`` returned to the read-ahead buffer."""
        rest = self._rbuf[self._rpos:]
        self._rbuf = rest + data if rest else data
        self._rpos = 0
        if offset >= 0:
            self._raw = offset + len(data)

    async def _flush_writes(self) -> None:
        while self._wbuf:
            data, self._wbuf = self._wbuf, bytearray()
            offset = -1 if self._append else self._raw
            target: Any = data
            if self._direct:  # O_DIRECT: the kernel reads straight from page-aligned memory
                target = _direct_buffer(len(data))
                target[:len(data)] = data
                target = memoryview(target)[:len(data)]
            op = self._aring._ring.write(self._fd, target, offset)
            n = await self._await(op, _salvage_write, data, offset)
            _wrote(self, data, offset, n)

    def _drop_read_ahead(self) -> None:
        avail = len(self._rbuf) - self._rpos
        if avail and self._raw >= 0:
            self._raw -= avail
        self._rbuf = b""
        self._rpos = 0

    # -- reading --------------------------------------------------------------------------------

    async def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all that is left if negative or None); b"" at end of file."""
        self._check(True)
        if size is None:
            size = -1
        # The hot case first: the read-ahead buffer holds enough, and nobody else is here.
        if not self._busy and self._pending is None and size >= 0:
            rpos = self._rpos
            if len(self._rbuf) - rpos >= size:
                self._rpos = rpos + size
                return self._rbuf[rpos:rpos + size]
        await self._enter()
        try:
            if self._wbuf:
                await self._flush_writes()
            if size < 0:
                return await self._read_all()
            while len(self._rbuf) - self._rpos < size:
                if not await self._fill(size - (len(self._rbuf) - self._rpos)):
                    break
            rpos = self._rpos
            out = self._rbuf[rpos:rpos + size]
            self._rpos = rpos + len(out)
            return out
        finally:
            self._leave()

    async def _read_all(self) -> bytes:
        # Everything read is kept in the read-ahead buffer until the end: a cancelled task
        # leaves it there for the next read instead of losing it.
        want = self._chunk
        if self._regular and self._raw >= 0:
            # The whole rest at once, plus one byte to see the end without another request.
            want = max(os.fstat(self._fd).st_size - self._raw, 0) + 1
        while await self._fill(want):
            want = self._chunk
        out = self._rbuf[self._rpos:]
        self._rbuf, self._rpos = b"", 0
        return out

    readall = read

    async def read1(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes with at most one request (what the buffer holds, if any)."""
        self._check(True)
        await self._enter()
        try:
            if self._wbuf:
                await self._flush_writes()
            if len(self._rbuf) == self._rpos:
                await self._fill(size if size > 0 else self._chunk)
            rpos = self._rpos
            end = len(self._rbuf) if size < 0 else rpos + size
            out = self._rbuf[rpos:end]
            self._rpos = rpos + len(out)
            return out
        finally:
            self._leave()

    async def readinto(self, buffer: Any) -> int:
        """Read into a writable buffer; the number of bytes read (0 at end of file)."""
        with memoryview(buffer) as view, view.cast("B") as target:
            want = len(target)
            data = await self.read(want)
            target[:len(data)] = data
            return len(data)

    async def readline(self, size: int | None = -1) -> bytes:
        """Read one line (up to and including b"\\n"), at most ``size`` bytes if given."""
        self._check(True)
        limit = -1 if size is None else size
        if limit == 0:
            return b""  # (below, an end at offset 0 would read as "no line end yet": to EOF)
        await self._enter()
        try:
            if self._wbuf:
                await self._flush_writes()
            scanned = 0  # bytes after the position already searched for b"\n"
            while True:
                rbuf, rpos = self._rbuf, self._rpos
                end = rbuf.find(b"\n", rpos + scanned) + 1
                if limit >= 0 and (end == 0 or end - rpos > limit) and len(rbuf) - rpos >= limit:
                    end = rpos + limit
                if end > 0:
                    break
                scanned = len(rbuf) - rpos
                if not await self._fill(self._chunk):  # moves the unread bytes to the front
                    end = len(self._rbuf)
                    break
            out = self._rbuf[self._rpos:end]
            self._rpos = end
            return out
        finally:
            self._leave()

    async def pread(self, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` without moving the position.  Calls may run
        concurrently (``gather``)."""
        # The hot case, kept short: a page-cache hit is one non-blocking read into the ring's
        # scratch buffer (no request, no trip through the loop).  A closed file has _nowait off.
        if self._nowait and 0 <= size <= _SCRATCH and offset >= 0 and not self._wbuf \
                and self._pending is None and _get_running_loop() is self._loop:
            scratch = self._scratch
            n = _pread_nowait(self._fd, scratch, size, offset)
            if n == size or n == 0:
                return _unpack(scratch, n)  # type: ignore[no-any-return]
            if n < 0 and n != _NEG_EAGAIN:
                self._nowait = False  # the file system cannot tell without blocking
        return await self._pread_ring(size, offset)

    async def _pread_ring(self, size: int, offset: int) -> bytes:
        self._check(True)
        if not self._seekable:
            raise io.UnsupportedOperation("pread() needs a file with offsets")
        if size < 0 or offset < 0:
            raise ValueError("pread() needs size >= 0 and offset >= 0")
        aring = self._aring
        aring._check_loop()  # (as _enter: WrongLoopError, not a request left behind)
        if self._wbuf or self._pending is not None:
            await self.flush()
        buf = self._aligned(size) if self._direct else bytearray(size)
        op = aring._ring.read(self._fd, buf, offset)
        aring._submit_soon(op)
        if op._res is None:
            await aring._until_done(op, None, ())
        n = op.result()
        data = _filled(buf, n)
        if self._direct and len(self._spare) < _SPARE_ALIGNED:
            self._spare.append(buf)  # type: ignore[arg-type]  # the request has ended: reusable
        return data

    def _aligned(self, size: int) -> mmap.mmap:
        """Page-aligned memory for an O_DIRECT read of ``size`` bytes: a spare one when its
        size fits (mapping a new one per read would cost more than the read's CPU time)."""
        spare = self._spare
        pages = max(-(-size // mmap.PAGESIZE), 1) * mmap.PAGESIZE
        for i in range(len(spare) - 1, -1, -1):
            if len(spare[i]) == pages:
                return spare.pop(i)
        return _direct_buffer(size)

    # -- writing --------------------------------------------------------------------------------

    async def write(self, data: Any) -> int:
        """Buffer ``data`` (bytes-like) for writing; the number of bytes taken (all of them)."""
        self._check(False)
        with memoryview(data) as view:
            n = view.nbytes
            if not self._busy and self._pending is None and not self._rbuf and \
                    len(self._wbuf) + n < self._chunk and not self._unbuffered:
                self._wbuf += view.cast("B") if view.ndim != 1 or view.format != "B" else view
                return n
            chunk = bytes(view.cast("B")) if view.ndim != 1 or view.format != "B" else bytes(view)
        await self._enter()
        try:
            self._drop_read_ahead()
            self._wbuf += chunk
            if self._unbuffered or len(self._wbuf) >= self._chunk:
                await self._flush_writes()
            return n
        finally:
            self._leave()

    async def pwrite(self, data: Any, offset: int) -> int:
        """Write ``data`` at ``offset`` without moving the position; the bytes written."""
        self._check(False)
        if not self._seekable:
            raise io.UnsupportedOperation("pwrite() needs a file with offsets")
        if offset < 0:
            raise ValueError("pwrite() needs offset >= 0")
        if self._wbuf or self._pending is not None:
            await self.flush()
        return await self._aring.write(self._fd, data, offset)

    async def flush(self) -> None:
        """Hand buffered writes to the kernel (not ``fsync``: see :meth:`fsync`)."""
        if self._closed:
            raise ValueError("I/O operation on closed file")
        await self._enter()
        try:
            await self._flush_writes()
        finally:
            self._leave()

    async def fsync(self) -> None:
        """Flush, then ``fsync`` the file (data and metadata on stable storage)."""
        await self.flush()
        await self._aring.fsync(self._fd)

    # -- position -------------------------------------------------------------------------------

    def _tell(self) -> int:
        if not self._seekable:
            raise io.UnsupportedOperation("the file has no position (a pipe, socket or tty)")
        if self._append and self._wbuf:
            return os.fstat(self._fd).st_size + len(self._wbuf)
        return self._raw - (len(self._rbuf) - self._rpos) + len(self._wbuf)

    async def tell(self) -> int:
        """The current position."""
        self._check(None)
        await self._enter()
        try:
            return self._tell()
        finally:
            self._leave()

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move the position (``whence`` as :func:`os.lseek`); the new position."""
        self._check(None)
        if not self._seekable:
            raise io.UnsupportedOperation("the file has no position (a pipe, socket or tty)")
        await self._enter()
        try:
            await self._flush_writes()
            if whence == os.SEEK_SET:
                target = offset
            elif whence == os.SEEK_CUR:
                target = self._tell() + offset
            elif whence == os.SEEK_END:
                target = os.fstat(self._fd).st_size + offset
            else:
                raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
            if target < 0:
                raise OSError(22, f"negative seek position {target}")
            self._drop_read_ahead()
            self._raw = target  # (in append mode writes still go to the end)
            return target
        finally:
            self._leave()

    async def truncate(self, size: int | None = None) -> int:
        """Cut (or extend) the file to ``size`` bytes (the current position if None)."""
        self._check(False)
        await self._enter()
        try:
            await self._flush_writes()
            if size is None:
                size = self._tell()
            if size < 0:
                raise ValueError(f"negative size value {size}")
            os.ftruncate(self._fd, size)  # no blocking I/O: changes the inode's size only
            return size
        finally:
            self._leave()

    # -- life cycle -----------------------------------------------------------------------------

    def fileno(self) -> int:
        """The file descriptor."""
        self._check(None)
        return self._fd

    def readable(self) -> bool:
        """True if opened for reading."""
        return self._readable

    def writable(self) -> bool:
        """True if opened for writing."""
        return self._writable

    def seekable(self) -> bool:
        """True if the file has offsets (a regular file or block device)."""
        return self._seekable

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    async def stat(self) -> StatxResult:
        """``statx`` of the open file."""
        self._check(None)
        return await self._aring.statx(self._fd)  # type: ignore[no-any-return]

    async def close(self) -> None:
        """Flush buffered writes, then close the descriptor (if the file owns it).  Idempotent."""
        if self._closed:
            return
        pending = self._pending
        if pending is not None and not self._busy and not self._seekable and \
                pending._res is None and not pending.cancel_requested and not self._aring.closed:
            # A read a cancelled call left on a pipe or socket may never end (a silent writer):
            # cancel it rather than wait for it (what it did is still applied when it ends).
            pending.cancel()
        await self._enter()
        try:
            try:
                await self._flush_writes()
            finally:
                self._closed = True
                self._nowait = False  # (the pread fast path checks only this)
                self._rbuf = b""
                if self._closefd:
                    if self._aring.closed:
                        os.close(self._fd)  # the ring is gone: close_fd() would raise, leaking it
                    else:
                        await self._aring.close_fd(self._fd)
        finally:
            self._leave()

    def __del__(self) -> None:
        # A file dropped unclosed: as Python's own files, warn, write what is buffered (here
        # with a plain blocking write: a finaliser cannot await) and close the descriptor.
        if getattr(self, "_closed", True) or not getattr(self, "_closefd", False):
            return
        self._closed = True
        warnings.warn(f"unclosed file {self!r}", ResourceWarning, stacklevel=2, source=self)
        try:
            if self._wbuf and self._pending is None:
                if self._raw >= 0 and not self._append:
                    os.pwrite(self._fd, self._wbuf, self._raw)
                else:
                    os.write(self._fd, self._wbuf)
        except OSError:
            pass
        finally:
            try:
                os.close(self._fd)
            except OSError:
                pass

    async def __aenter__(self) -> AsyncFile:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<saferring.aio.AsyncFile name={self.name!r} mode={self.mode!r}" + \
            (" closed>" if self._closed else ">")


def _wrote(file: AsyncFile, data: bytearray, offset: int, n: int) -> None:
    """Account for a write of ``n`` bytes of ``data`` at ``offset``; the rest is buffered again."""
    if offset >= 0:
        file._raw = offset + n
    elif file._append and file._seekable:
        file._raw = os.lseek(file._fd, 0, os.SEEK_END)  # appended: the position is the end
    if n < len(data):
        file._wbuf = data[n:] + file._wbuf


def _salvage_read(aring: AsyncRing, op: Operation[Any], file: AsyncFile, buf: bytearray,
                  offset: int) -> None:
    """A file read whose task was cancelled: what it read joins the read-ahead buffer."""
    file._pending = None
    if op._state is COMPLETED and op._res:
        file._absorb(bytes(buf[:op._res]), offset)


def _salvage_write(aring: AsyncRing, op: Operation[Any], file: AsyncFile, data: bytearray,
                   offset: int) -> None:
    """A flush whose task was cancelled: the position counts what was written; the rest (all of
    it, if the write failed) stays buffered for the next flush."""
    file._pending = None
    _wrote(file, data, offset, op._res if op._state is COMPLETED and op._res else 0)


class AsyncTextFile(_Lines[str]):
    """A text file: :class:`AsyncFile` underneath, decoded and encoded like :class:`io.TextIOWrapper`.

    ``read``, ``readline``, ``readlines``, ``write``, ``writelines``, ``flush``, ``seek``,
    ``tell``, ``truncate``, ``close`` and ``async for line in f``.  ``newline`` works as in
    :func:`open` (``None``: universal newlines, translated to ``"\\n"``).  ``tell()`` is only
    available when no decoded text is waiting to be read (at the start, after a seek or a
    write, at the end of the file); otherwise it raises :class:`io.UnsupportedOperation`.
    """

    def __init__(self, binary: AsyncFile, encoding: str, errors: str, newline: str | None,
                 line_buffering: bool) -> None:
        if newline not in (None, "", "\n", "\r", "\r\n"):
            raise ValueError(f"illegal newline value: {newline!r}")
        self.buffer = binary
        self.encoding = encoding
        self.errors = errors
        self._newline = newline
        self._line_buffering = line_buffering
        codecs.lookup(encoding)  # LookupError for an unknown encoding, as open() raises
        self._encoder = codecs.getincrementalencoder(encoding)(errors)
        self._reset_decoder()
        if binary._seekable and binary._writable and binary._raw > 0:
            self._encoder.setstate(0)  # as io.TextIOWrapper: no BOM written past the start (append)

    def _reset_decoder(self) -> None:
        decoder: Any = codecs.getincrementaldecoder(self.encoding)(self.errors)
        if self._newline is None or self._newline == "":
            decoder = io.IncrementalNewlineDecoder(decoder, translate=self._newline is None)
        self._decoder = decoder
        self._text = ""
        self._eof = False

    @property
    def name(self) -> Any:
        """The file's name (the path it was opened with)."""
        return self.buffer.name

    @property
    def mode(self) -> str:
        """The mode it was opened with."""
        return self.buffer.mode

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self.buffer.closed

    def fileno(self) -> int:
        """The file descriptor."""
        return self.buffer.fileno()

    async def _more(self) -> bool:
        """Decode another chunk into the text buffer; False at end of file."""
        if self._eof:
            return False
        data = await self.buffer.read1(self.buffer._chunk)
        if not data:
            self._eof = True
            self._text += self._decoder.decode(b"", final=True)
            return bool(self._text)
        self._text += self._decoder.decode(data)
        return True

    async def read(self, size: int | None = -1) -> str:
        """Read up to ``size`` characters (all that is left if negative or None)."""
        self.buffer._check(True)
        if size is None or size < 0:
            while await self._more():
                pass
            out, self._text = self._text, ""
            return out
        while len(self._text) < size and await self._more():
            pass
        out, self._text = self._text[:size], self._text[size:]
        return out

    def _line_end(self, start: int) -> int:
        text = self._text
        nl = self._newline
        if nl is None or nl == "\n":
            i = text.find("\n", start)
            return -1 if i < 0 else i + 1
        if nl == "\r\n":
            i = text.find("\r\n", start)
            return -1 if i < 0 else i + 2
        if nl == "\r":
            i = text.find("\r", start)
            return -1 if i < 0 else i + 1
        # newline="": any of \r, \n, \r\n ends a line, untranslated (the decoder holds back a
        # final \r until it knows whether \n follows).
        i, j = text.find("\r", start), text.find("\n", start)
        if i < 0:
            return -1 if j < 0 else j + 1
        if j == i + 1:
            return j + 1
        if j >= 0 and j < i:
            return j + 1
        return i + 1

    async def readline(self, size: int | None = -1) -> str:
        """Read one line (with its line ending), at most ``size`` characters if given."""
        self.buffer._check(True)
        limit = -1 if size is None else size
        start = 0
        while True:
            end = self._line_end(start)
            if end >= 0:
                break
            if 0 <= limit <= len(self._text):
                end = limit
                break
            start = max(len(self._text) - 1, 0)
            if not await self._more():
                end = len(self._text)
                break
        if 0 <= limit < end:
            end = limit
        out, self._text = self._text[:end], self._text[end:]
        return out

    async def write(self, text: str) -> int:
        """Write ``text``; the number of characters taken (all of them)."""
        self.buffer._check(False)
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self._text or self._decoder.getstate()[0]:
            await self._discard_read_ahead()
        out = text
        if self._newline not in (None, "", "\n") and "\n" in text:
            out = text.replace("\n", self._newline)
        await self.buffer.write(self._encoder.encode(out))
        if self._line_buffering and ("\n" in text or "\r" in text):
            await self.buffer.flush()
        return len(text)

    async def _discard_read_ahead(self) -> None:
        if self._text:
            raise io.UnsupportedOperation(
                f"cannot write after reading ahead ({len(self._text)} decoded characters are "
                "still unread): seek() first")
        self._reset_decoder()

    async def flush(self) -> None:
        """Hand buffered writes to the kernel."""
        await self.buffer.flush()

    async def tell(self) -> int:
        """The byte position, when no decoded text is waiting (see the class documentation)."""
        self.buffer._check(None)
        if self._text or self._decoder.getstate()[0]:
            raise io.UnsupportedOperation(
                "tell() while decoded text is buffered: saferring's text files give positions "
                "only at the start, after seek() or write(), and at the end of the file")
        return await self.buffer.tell()

    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move to a byte position: ``seek(n)`` (a value :meth:`tell` gave), ``seek(0, 2)``."""
        self.buffer._check(None)
        if whence != os.SEEK_SET and offset != 0:
            raise io.UnsupportedOperation("can't do nonzero cur-relative or end-relative seeks")
        pos = await self.buffer.seek(offset, whence)
        self._reset_decoder()
        # As io.TextIOWrapper: past the start, no BOM is written, and none is expected (utf-16
        # and utf-32 decoders would otherwise raise "stream does not start with BOM").
        if pos:
            self._encoder.setstate(0)
            self._decoder.setstate((b"", 0))
        else:
            self._encoder.reset()
        return pos

    async def truncate(self, size: int | None = None) -> int:
        """Cut the file to ``size`` bytes (the current position if None)."""
        if size is None:
            size = await self.tell()
        return await self.buffer.truncate(size)

    async def close(self) -> None:
        """Flush and close.  Idempotent."""
        await self.buffer.close()

    async def __aenter__(self) -> AsyncTextFile:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def readable(self) -> bool:
        """True if opened for reading."""
        return self.buffer.readable()

    def writable(self) -> bool:
        """True if opened for writing."""
        return self.buffer.writable()

    def seekable(self) -> bool:
        """True if the file has offsets."""
        return self.buffer.seekable()

    def __repr__(self) -> str:
        return f"<saferring.aio.AsyncTextFile name={self.name!r} mode={self.mode!r} " \
            f"encoding={self.encoding!r}>"


def _parse_mode(mode: str) -> tuple[int, bool, bool, bool, bool]:
    """(open flags, readable, writable, append, text) for an :func:`open` mode string."""
    if not isinstance(mode, str):
        raise TypeError(f"open() argument 'mode' must be str, not {type(mode).__name__}")
    modes = set(mode)
    if modes - set("rwxabt+") or len(mode) > len(modes):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = sum(c in modes for c in "rwxa")
    if kinds != 1 or ("b" in modes and "t" in modes):
        raise ValueError(f"invalid mode: {mode!r}: must have exactly one of r/w/x/a, and not "
                         "both b and t")
    plus = "+" in modes
    if "r" in modes:
        flags, readable, writable = os.O_RDONLY, True, plus
    elif "w" in modes:
        flags, readable, writable = os.O_WRONLY | os.O_CREAT | os.O_TRUNC, plus, True
    elif "x" in modes:
        flags, readable, writable = os.O_WRONLY | os.O_CREAT | os.O_EXCL, plus, True
    else:
        flags, readable, writable = os.O_WRONLY | os.O_CREAT | os.O_APPEND, plus, True
    if plus:
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    return flags | os.O_CLOEXEC, readable, writable, "a" in modes, "b" not in modes


class _Opening:
    """What :func:`open` returns: await it, or use it with ``async with`` (as aiofiles does)."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self._file: AsyncFile | AsyncTextFile | None = None

    def __await__(self) -> Generator[Any, None, AsyncFile | AsyncTextFile]:
        return self._coro.__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> Any:
        self._file = await self._coro
        return self._file

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._file is not None:
            await self._file.close()


def open(
    file: Any, mode: str = "r", buffering: int = -1, encoding: str | None = None,
    errors: str | None = None, newline: str | None = None, closefd: bool = True, *,
    ring: AsyncRing | None = None, nowait: bool = True,
) -> Any:
    """Open a file on io_uring; await the result, or use it with ``async with``.

    The arguments are :func:`open`'s (``file`` is a path or a descriptor); binary modes give an
    :class:`AsyncFile`, text modes an :class:`AsyncTextFile`.  ``ring`` is the
    :class:`~saferring.aio.AsyncRing` to use (default: :func:`~saferring.aio.get_ring`).
    ``nowait=False`` sends every read through the ring instead of trying the page cache first
    (see the module documentation).  Errors are :func:`open`'s: ``FileNotFoundError``,
    ``IsADirectoryError``, ``ValueError`` for a bad mode...
    """
    flags, readable, writable, append, text = _parse_mode(mode)
    if not text and (encoding is not None or errors is not None or newline is not None):
        raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
    if buffering == 0 and text:
        raise ValueError("can't have unbuffered text I/O")
    if buffering == 1 and not text:
        buffering = -1  # line buffering means nothing for bytes (as open() treats it)
    return _Opening(_open(file, mode, flags, readable, writable, append, text, buffering,
                          encoding, errors, newline, closefd, ring, nowait))


async def _open(file: Any, mode: str, flags: int, readable: bool, writable: bool, append: bool,
                text: bool, buffering: int, encoding: str | None, errors: str | None,
                newline: str | None, closefd: bool, ring: AsyncRing | None,
                nowait: bool) -> AsyncFile | AsyncTextFile:
    aring = _get_ring(ring)
    if isinstance(file, int) and not isinstance(file, bool):
        if file < 0:
            raise ValueError(f"negative file descriptor: {file}")
        fd = file
    else:
        if not closefd:
            raise ValueError("Cannot use closefd=False with file name")
        fd = await aring.openat(os.fspath(file), flags, 0o666)
    binary = None
    try:
        if _stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(21, "Is a directory", file)
        size = _CHUNK if buffering in (-1, 1) else buffering
        binary = AsyncFile(aring, fd, file, mode, readable=readable, writable=writable,
                           append=append, closefd=closefd, buffer_size=size, nowait=nowait)
        if not text:
            return binary
        return AsyncTextFile(binary, encoding or "utf-8", errors or "strict", newline,
                             buffering == 1)
    except BaseException:
        if binary is not None:
            binary._closed = True  # (closed below: not a file dropped unclosed)
        if closefd or not isinstance(file, int):
            try:
                os.close(fd)
            except OSError:
                pass
        raise
