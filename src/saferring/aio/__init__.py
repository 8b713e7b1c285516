"""saferring.aio: io_uring for asyncio (stock loop or uvloop).

* :class:`AsyncRing`: every :class:`~saferring.Ring` operation as a coroutine, with cancellation
  that frees nothing the kernel may use and loses nothing the kernel did;
* :func:`open`: async files with the API of aiofiles; :func:`copyfile`, :func:`stat`,
  :func:`remove`, :func:`rename`, :func:`mkdir`, ... as coroutines;
* :func:`create_server`, :func:`create_connection` (protocols and transports) and
  :func:`start_server`, :func:`open_connection` (asyncio streams) over TCP on io_uring;
* :func:`get_ring`: the ring shared by everything on the running loop, closed with the loop.

See docs/asyncio.md.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from typing import Any

from ..errors import WrongLoopError
from ..operation import StatxResult
from ._files import AsyncFile, AsyncTextFile, open
from ._net import (
    RingTransport,
    Server,
    create_connection,
    create_server,
    open_connection,
    start_server,
)
from ._ring import AsyncMultishot, AsyncRing

# One shared ring per running loop.  Keyed by id(loop) and checked by identity (a WeakKeyDictionary
# would keep the loop alive through the ring's own reference to it).
_shared: dict[int, AsyncRing] = {}


async def _close_with_loop(aring: AsyncRing) -> AsyncGenerator[None, None]:
    """An async generator that never finishes: the loop's ``shutdown_asyncgens()`` (which
    ``asyncio.run``, ``asyncio.Runner`` and ``uvloop.run`` call before closing the loop) closes
    it, and with it the shared ring, while the loop can still run the cancelled requests out."""
    try:
        yield
    finally:
        if _shared.get(id(aring.loop)) is aring:
            del _shared[id(aring.loop)]
        await aring.aclose()


def get_ring() -> AsyncRing:
    """The running loop's shared :class:`AsyncRing`, created on first use.

    It is closed when the loop shuts down through ``asyncio.run``/``asyncio.Runner``/
    ``uvloop.run`` (their ``shutdown_asyncgens()`` step); a loop driven by hand should
    ``await get_ring().aclose()`` (or ``loop.shutdown_asyncgens()``) before ``loop.close()``.
    Raises :class:`~saferring.WrongLoopError` when no loop is running.
    """
    loop = asyncio.events._get_running_loop()
    if loop is None:
        raise WrongLoopError("saferring.aio.get_ring() needs a running event loop")
    aring = _shared.get(id(loop))
    if aring is not None and aring.loop is loop and not aring.closed:
        return aring
    aring = AsyncRing()
    _shared[id(loop)] = aring
    closer = _close_with_loop(aring)
    step = closer.asend(None)  # the first step runs now: the loop's first-iteration hook
    try:                       # registers the generator for shutdown_asyncgens()
        step.send(None)
    except StopIteration:
        pass
    aring._closer = closer  # the loop holds its async generators weakly
    return aring


# -- filesystem helpers --------------------------------------------------------------------------


def _ring(ring: AsyncRing | None) -> AsyncRing:
    return ring if ring is not None else get_ring()


async def stat(path: Any, *, follow_symlinks: bool = True,
               ring: AsyncRing | None = None) -> StatxResult:
    """``statx`` of ``path`` (or of an open descriptor): a :class:`~saferring.StatxResult`,
    whose fields have :func:`os.stat`'s names."""
    return await _ring(ring).statx(path, follow_symlinks=follow_symlinks)  # type: ignore[no-any-return]


async def remove(path: Any, *, ring: AsyncRing | None = None) -> None:
    """Remove a file (as :func:`os.remove`)."""
    await _ring(ring).unlinkat(path)


unlink = remove


async def rmdir(path: Any, *, ring: AsyncRing | None = None) -> None:
    """Remove an empty directory (as :func:`os.rmdir`)."""
    await _ring(ring).unlinkat(path, rmdir=True)


async def rename(src: Any, dst: Any, *, ring: AsyncRing | None = None) -> None:
    """Rename ``src`` to ``dst`` (as :func:`os.rename`)."""
    await _ring(ring).renameat(src, dst)


async def mkdir(path: Any, mode: int = 0o777, *, ring: AsyncRing | None = None) -> None:
    """Create a directory (as :func:`os.mkdir`; ``mode`` is masked by the umask)."""
    await _ring(ring).mkdirat(path, mode)


async def copyfile(src: Any, dst: Any, *, chunk_size: int = 1 << 20,
                   ring: AsyncRing | None = None) -> Any:
    """Copy the contents of file ``src`` to ``dst`` (created or truncated), as
    :func:`shutil.copyfile`; returns ``dst``.

    Reads and writes are io_uring requests, two chunks in flight at a time (the next read
    overlaps the current write).  Raises what :func:`shutil.copyfile` raises for a missing
    source (``FileNotFoundError``), a directory (``IsADirectoryError``) or the same file twice
    (:class:`shutil.SameFileError`).
    """
    import shutil

    aring = _ring(ring)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    src_fd = await aring.openat(os.fspath(src), os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(src_fd)
        if os.path.isdir(dst):
            raise IsADirectoryError(21, "Is a directory", dst)
        try:
            dst_st = os.stat(dst)
        except FileNotFoundError:
            pass
        else:
            if (dst_st.st_dev, dst_st.st_ino) == (st.st_dev, st.st_ino):
                raise shutil.SameFileError(f"{src!r} and {dst!r} are the same file")
        import stat as _st

        if _st.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory", src)
        dst_fd = await aring.openat(os.fspath(dst),
                                    os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            await _copy_fds(aring, src_fd, dst_fd, chunk_size)
        finally:
            await aring.close_fd(dst_fd)
    finally:
        await aring.close_fd(src_fd)
    return dst


async def _copy_fds(aring: AsyncRing, src_fd: int, dst_fd: int, chunk_size: int) -> None:
    bufs = [bytearray(chunk_size), bytearray(chunk_size)]
    offset = 0
    n = await aring.read(src_fd, bufs[0], 0)
    i = 0
    while n > 0:
        view = memoryview(bufs[i])[:n]
        # The next read overlaps this chunk's write: both are in the kernel at once.
        reading = asyncio.ensure_future(aring.read(src_fd, bufs[1 - i], offset + n))
        try:
            done = 0
            while done < n:
                done += await aring.write(dst_fd, view[done:], offset + done)
        except BaseException:
            reading.cancel()
            try:
                await reading
            except BaseException:  # noqa: BLE001 - the write's error is the one to raise
                pass
            raise
        offset += n
        n = await reading
        i = 1 - i


__all__ = [
    "AsyncFile",
    "AsyncMultishot",
    "AsyncRing",
    "AsyncTextFile",
    "RingTransport",
    "Server",
    "copyfile",
    "create_connection",
    "create_server",
    "get_ring",
    "mkdir",
    "open",
    "open_connection",
    "remove",
    "rename",
    "rmdir",
    "start_server",
    "stat",
    "unlink",
]
