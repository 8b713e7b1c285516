"""Copy files and directory trees through io_uring, the way ``cp -p`` does, never leaving a
half-written destination.

    python examples/file_copy.py SRC DST             # DST may be an existing directory
    python examples/file_copy.py SRC1 SRC2 ... DIR   # into an existing directory
    python examples/file_copy.py -r SRCDIR DSTDIR    # a whole tree

Options: ``--method {auto,rw,splice,copy_file_range}``, ``--block-size`` (default 1M),
``--depth`` (blocks in flight, default 8), ``--verify`` (BLAKE2b of source and copy, both read
through the ring; exit status 3 on a mismatch), ``--fsync``, ``--quiet`` / ``--progress`` (the
progress bar is drawn only when standard output is a terminal, unless forced).

Methods
-------
``rw``
    ``read_fixed`` into registered buffers (a :class:`saferring.BufferPool` of ``depth`` blocks),
    then ``write_fixed`` from the same buffer: the bytes never pass through a Python object.  Each
    buffer cycles on its own (read, write, read the next free block), so up to ``depth`` reads
    and writes are in flight at once and the reads of later blocks overlap the writes of
    earlier ones.  Non-seekable sources (pipes, FIFOs, character devices) are read one block at
    a time, in order, while the writes of earlier blocks go on.
``splice``
    ``depth`` pipes (each enlarged to the block size where the kernel allows it): per block,
    ``splice(src -> pipe)``, then ``splice(pipe -> dst)`` of what arrived.  The source's
    page-cache pages go into the pipe by reference, so the kernel copies the data once (into
    the destination's pages) instead of twice.  Reads of all pipes run ahead; at most two
    writes are in flight (``Copier._splice`` says why).
``copy_file_range``
    :func:`os.copy_file_range` in 64 MiB calls (not an io_uring operation): the filesystem may
    share the blocks (a reflink on btrfs or XFS) or copy inside the kernel.
``auto`` (the default)
    Regular files are copied with ``copy_file_range``; if the kernel or filesystem refuses it
    (``EXDEV``, ``EINVAL``, ``ENOSYS``, ``EOPNOTSUPP``: different filesystems, a filesystem
    without it), the copy goes on from where it stopped with ``rw``.  FIFOs are copied with
    ``splice`` (their pages move into our pipe without a copy), when the kernel has
    ``IORING_OP_SPLICE``.  Regular files that report size 0 (``/proc`` and ``/sys`` files,
    whose size is not known before they are read) and other streams are copied with ``rw``,
    which reads until end of file.

Why this choice.  Six runs of ``benchmarks/test_bench_copy.py`` on the development machine
(2 vCPUs shared with other jobs, Linux 6.18, ext4 on a virtio disk; a 1 GiB file in the page
cache copied to a new file that also stays in the page cache; median of 3 timed rounds after a
warm-up round; ratio = ``cp``'s median / the contender's in the same run, higher is better;
``splice``: the last three runs, with the write scheduling described in ``Copier._splice``):

    ======================  ===========  ===========  ================
    contender               GiB/s        vs cp        vs cp, median
    ======================  ===========  ===========  ================
    cp (coreutils 9.1)      2.1-2.8      1.00x        1.00x
    ``copy_file_range``     2.2-3.1      0.83-1.40x   0.99x
    ``auto``                1.9-3.1      0.89-1.11x   0.97x
    ``rw``                  1.2-3.5      0.51-1.64x   0.87x
    ``splice``              2.1-2.8      0.79-1.19x   1.02x
    ``shutil.copyfile``     2.2-3.1      0.91-1.18x   1.09x
    ======================  ===========  ===========  ================

Every method is bound by the same work: writing 1 GiB into newly allocated page-cache pages of
the destination (``perf``: 70-90% of the samples are that ``memcpy``).  ``copy_file_range`` does
it once, in the calling thread, without a trip back to user space; it is also what ``cp`` (and,
through ``sendfile``, ``shutil.copyfile``) end up doing, so they are level within this machine's
noise, and it can share blocks instead of copying where the filesystem reflinks.  ``rw``
copies twice (into the registered buffers, then out of them): the second copy runs in an io-wq
worker while this thread reads ahead on the other CPU, so it can even lead when a CPU is free,
and falls behind the most when the CPUs are busy.  ``splice`` copies once, but every block costs
two trips through io-wq.  The spread between runs is the VM's: a round whose destination lands
in memory the hypervisor has to fault back in (free page reporting) takes up to ten times as
long, whatever the method.

What is copied
--------------
Mode bits and access/modification times (in nanoseconds) of files and directories, like
``cp -p``; ownership too when running as root.  A directory's mode and times are set after its
contents were copied (copying into it changes its modification time).  Set-user-ID and
set-group-ID bits are dropped when the owner could not be preserved, as ``cp -p`` does.

With ``-r``, symbolic links are recreated as links with the same target (never followed; also a
link named on the command line), FIFOs are recreated as FIFOs, and device and socket files are
reported and skipped.  Hard links are copied as separate files.  Without ``-r``, a symbolic link
on the command line is followed and a FIFO given as the source is read until its writers close
it.

An existing destination is replaced atomically: every file is written to
``.NAME.XXXXXX.part`` in the destination's directory (created with ``O_EXCL``), its mode and
times are set, and it is renamed over the destination only when complete (and verified, with
``--verify``).  On an error or on Ctrl-C the temporary file is removed, so the destination is
either the old file or the complete new one.  A destination that exists and is not a regular
file or a directory (``/dev/null``, a FIFO) is refused: it cannot be replaced that way.  A
destination that is a symbolic link to a file is followed: the file it points to is replaced.

Exit status: 0 on success, 1 if any file could not be copied (the others still are, as ``cp``
does), 2 for bad options, 3 if a verification failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import saferring

PROG = "file_copy.py"
METHODS = ("auto", "rw", "splice", "copy_file_range")
DEFAULT_BLOCK = 1 << 20
DEFAULT_DEPTH = 8
MAX_DEPTH = 256
SPLICE_WRITES = 2  # splices into the destination in flight at once (Copier._splice says why)
CFR_CHUNK = 64 << 20  # bytes per copy_file_range call: small enough for a lively progress bar
# copy_file_range errors that mean "not here" rather than "failed": another filesystem (EXDEV),
# a filesystem or file type without it (EINVAL, EOPNOTSUPP), a kernel without the call (ENOSYS).
CFR_UNSUPPORTED = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                             errno.ENOTSUP})
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


class CopyError(Exception):
    """One file could not be copied: ``what`` (usually a path) and ``why``, printed on one line."""

    status = 1

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")
        self.what = what
        self.why = why


class VerifyError(CopyError):
    """The copy's checksum differs from the source's (exit status 3)."""

    status = 3


class _Unsupported(Exception):
    """copy_file_range refused this pair of files after ``done`` bytes (auto mode falls back)."""

    def __init__(self, done: int, exc: OSError) -> None:
        super().__init__(str(exc))
        self.done = done
        self.exc = exc


def _why(exc: OSError) -> str:
    """The reason, without the operation details saferring adds to its messages."""
    return os.strerror(exc.errno) if exc.errno else str(exc)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Hold SIGINT back for the block (it is delivered, as KeyboardInterrupt, when it ends).

    Used where an interruption would lose track of something on disk: between creating a
    temporary file and recording its name, and while cleaning up.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- progress -----------------------------------------------------------------------------------


class Meter:
    """Counts copied bytes; the base class draws nothing (``--quiet``, or no terminal)."""

    def start(self, total: int) -> None:
        """Begin, with ``total`` bytes expected (more may come: sources can grow)."""

    def file(self, name: str) -> None:
        """The file now being copied."""

    def advance(self, nbytes: int) -> None:
        """``nbytes`` more were copied."""

    def stop(self) -> None:
        """Stop drawing."""

    def say(self, line: str) -> None:
        """Print one line on stderr."""
        print(line, file=sys.stderr, flush=True)


class RichMeter(Meter):
    """A ``rich`` progress bar: bytes copied, total, rate and time left."""

    def __init__(self, force: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        console = Console(file=sys.stdout, force_terminal=True if force else None)
        self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                                  console=console, transient=False,
                                  redirect_stdout=False, redirect_stderr=False)
        # Where stderr is the terminal the bar is drawn on, messages go through the console,
        # which prints them above the bar instead of through it.
        try:
            out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
            self._shared = sys.stderr.isatty() and os.path.samestat(out, err)
        except (OSError, ValueError):  # no descriptor behind them (an in-memory stream)
            self._shared = False
        self._task: Any = None
        self._total = 0
        self._done = 0

    def start(self, total: int) -> None:
        self._total = total
        self._task = self._progress.add_task("copying", total=total or None)
        self._progress.start()

    def file(self, name: str) -> None:
        self._progress.update(self._task, description=os.path.basename(name) or name)

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        if self._done > self._total:  # a source larger than announced (a pipe, a growing file)
            self._total = self._done
            self._progress.update(self._task, total=self._total, advance=nbytes)
        else:
            self._progress.advance(self._task, nbytes)

    def stop(self) -> None:
        self._progress.stop()

    def say(self, line: str) -> None:
        if self._shared and self._progress.live.is_started:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            super().say(line)


# -- the copier ---------------------------------------------------------------------------------


class Copier:
    """Copies files through one ring; reports errors and keeps the exit status."""

    def __init__(self, ring: saferring.Ring, *, method: str, block: int, depth: int,
                 verify: bool, fsync: bool, recursive: bool, meter: Meter) -> None:
        self.ring = ring
        self.method = method
        self.block = block
        self.depth = depth
        self.verify = verify
        self.fsync = fsync
        self.recursive = recursive
        self.meter = meter
        self.status = 0
        self.partials: set[str] = set()  # temporary files that exist and are ours
        self._pool: saferring.BufferPool | None = None
        self._bufs: list[saferring.Buffer] = []
        self._pipes: list[tuple[int, int, int]] = []  # (read end, write end, capacity)
        self._splice_ok = ring.features.supports("SPLICE")
        self._root = os.geteuid() == 0

    # -- reporting --

    def report(self, exc: CopyError) -> None:
        """Print ``exc`` as one line on stderr and raise the exit status to its own."""
        self.meter.say(f"{PROG}: {exc.what}: {exc.why}")
        self.status = max(self.status, exc.status)

    # -- resources, made on first use and kept for the whole run --

    def buffers(self) -> list[saferring.Buffer]:
        """The registered buffers, leased once.  If RLIMIT_MEMLOCK is too low for
        ``depth`` x ``block``, fewer (then smaller) buffers are tried before giving up."""
        if self._bufs:
            return self._bufs
        depth, block = self.depth, self.block
        while True:
            try:
                self._pool = saferring.BufferPool(self.ring, depth, block)
                break
            except saferring.MemlockLimitError as exc:
                if depth > 2:
                    depth //= 2
                elif block > 64 * 1024:
                    block //= 2
                else:
                    raise CopyError("registered buffers", str(exc)) from None
        self.block, self.depth = block, depth
        self._bufs = [self._pool.lease() for _ in range(depth)]
        return self._bufs

    def pipes(self) -> list[tuple[int, int, int]]:
        """``depth`` pipes for splice, each enlarged to the block size if the kernel lets us."""
        while len(self._pipes) < self.depth:
            r, w = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, self.block)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size (or the per-user total): keep the default
            self._pipes.append((r, w, min(self.block, fcntl.fcntl(w, _F_GETPIPE_SZ))))
        return self._pipes

    def discard_pipes(self) -> None:
        """Close the pipes (after an error they may still hold bytes of the failed file)."""
        for r, w, _ in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()

    def close(self) -> None:
        """Release the pipes; the ring's close releases the buffers."""
        self.discard_pipes()

    # -- waiting --

    def _drain(self, ops: Sequence[saferring.Operation[Any]]) -> None:
        """Cancel ``ops`` and wait until each has ended (after an error, before the buffers and
        pipes are used again).  On Ctrl-C this is not done: Ring.close() does the same."""
        pending = [op for op in ops if not op.done()]
        for op in pending:
            with contextlib.suppress(saferring.OperationStateError):
                op.cancel()  # refused only if it has just finished
        while any(not op.done() for op in pending):
            self.ring.wait(1)

    # -- one file -------------------------------------------------------------------------------

    def copy_file(self, src: str, dst: str, st: os.stat_result) -> None:
        """Copy the regular file (or stream) ``src``, whose stat is ``st``, to ``dst``:
        written under a temporary name, renamed over ``dst`` when complete."""
        dst = self._check_destination(src, dst, st)
        self.meter.file(src)
        src_fd = self._open_source(src, st)
        try:
            tmp, dst_fd = self._create_temp(dst)
            try:
                self.copy_data(src_fd, dst_fd, st, src, dst)
                if self.verify:
                    self._verify(src_fd, dst_fd, st, src, dst)
                if self.fsync:
                    self._sync(dst_fd, dst)
                self._set_metadata(dst_fd, st, dst)
                try:
                    os.replace(tmp, dst)
                except OSError as exc:
                    raise CopyError(dst, _why(exc)) from None
                self.partials.discard(tmp)
                if self.fsync:
                    self._sync_dir(os.path.dirname(dst) or ".")
            finally:
                os.close(dst_fd)
                self.remove_partial(tmp)
        finally:
            os.close(src_fd)

    def _check_destination(self, src: str, dst: str, st: os.stat_result) -> str:
        """The path to replace: ``dst``, or the file a symlink ``dst`` points to."""
        try:
            dst_st = os.stat(dst)
        except FileNotFoundError:
            if os.path.islink(dst):
                raise CopyError(dst, "not writing through a dangling symbolic link") from None
            return dst
        except OSError as exc:
            raise CopyError(dst, _why(exc)) from None
        if (dst_st.st_dev, dst_st.st_ino) == (st.st_dev, st.st_ino):
            raise CopyError(dst, f"is the same file as {src}")
        if stat.S_ISDIR(dst_st.st_mode):
            raise CopyError(dst, "cannot overwrite a directory with a non-directory")
        if not stat.S_ISREG(dst_st.st_mode):
            raise CopyError(dst, "exists and is not a regular file (it cannot be replaced "
                            "atomically)")
        return os.path.realpath(dst) if os.path.islink(dst) else dst

    def _open_source(self, src: str, st: os.stat_result) -> int:
        try:
            if stat.S_ISREG(st.st_mode):
                return int(self.ring.run(self.ring.openat(src, os.O_RDONLY)))
            # A FIFO's open waits for a writer; os.open waits in this thread, where Ctrl-C
            # interrupts it, instead of in one of the kernel's io-wq workers.
            return os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CopyError(src, _why(exc)) from None

    def _create_temp(self, dst: str) -> tuple[str, int]:
        """Create ``.NAME.XXXXXX.part`` next to ``dst`` (O_EXCL: never someone else's file)."""
        head, name = os.path.split(dst)
        for _ in range(100):
            tmp = os.path.join(head, f".{name[:200]}.{secrets.token_hex(3)}.part")
            try:
                # Created and recorded with Ctrl-C held back, so an interruption cannot leave
                # a file behind that the cleanup does not know about.
                with _sigint_blocked():
                    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    self.partials.add(tmp)
                return tmp, fd
            except FileExistsError:
                continue
            except OSError as exc:
                raise CopyError(dst, _why(exc)) from None
        raise CopyError(dst, "could not create a temporary file next to it")

    def remove_partial(self, tmp: str) -> None:
        """Unlink the temporary file ``tmp`` if it is still ours."""
        if tmp in self.partials:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            self.partials.discard(tmp)

    def _sync(self, fd: int, what: str) -> None:
        try:
            self.ring.run(self.ring.fsync(fd))
        except OSError as exc:
            raise CopyError(what, f"fsync: {_why(exc)}") from None

    def _sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._sync(fd, path)
        finally:
            os.close(fd)

    def _set_metadata(self, fd: int, st: os.stat_result, what: str) -> None:
        """Mode, times (and as root, owner) of ``st`` onto the open file ``fd``."""
        mode = stat.S_IMODE(st.st_mode)
        try:
            if self._root:
                os.fchown(fd, st.st_uid, st.st_gid)  # before fchmod: chown clears set-ID bits
            own = os.fstat(fd)
            if (own.st_uid, own.st_gid) != (st.st_uid, st.st_gid):
                mode &= ~(stat.S_ISUID | stat.S_ISGID)
            os.fchmod(fd, mode)
            # Last: every write has completed by now, and a write would change the mtime.
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        except OSError as exc:
            raise CopyError(what, f"cannot set mode and times: {_why(exc)}") from None

    # -- the data -------------------------------------------------------------------------------

    def copy_data(self, src_fd: int, dst_fd: int, st: os.stat_result, src: str, dst: str) -> int:
        """Copy every byte of ``src_fd`` to ``dst_fd`` (an empty file) with the chosen method;
        return the number of bytes."""
        regular = stat.S_ISREG(st.st_mode)
        method = self.method
        if method == "auto":
            if regular and st.st_size > 0:
                method = "copy_file_range"
            elif stat.S_ISFIFO(st.st_mode) and self._splice_ok:
                method = "splice"  # the FIFO's pages move into our pipe without a copy
            else:
                method = "rw"  # reads until end of file: /proc and /sys files report size 0
        if method == "copy_file_range":
            try:
                return self._copy_file_range(src_fd, dst_fd, src, dst)
            except _Unsupported as exc:
                if self.method != "auto":
                    raise CopyError(dst, f"copy_file_range: {_why(exc.exc)}") from None
                # Another filesystem, or one without it: go on from where it stopped.
                return exc.done + self._rw(src_fd, dst_fd, exc.done, st.st_size, True, src, dst)
        seekable = regular
        if method == "splice":
            if not self._splice_ok:
                raise CopyError(dst, "splice: the kernel has no IORING_OP_SPLICE (Linux 5.7)")
            return self._splice(src_fd, dst_fd, 0, st.st_size, seekable, src, dst)
        return self._rw(src_fd, dst_fd, 0, st.st_size, seekable, src, dst)

    def _copy_file_range(self, src_fd: int, dst_fd: int, src: str, dst: str) -> int:
        off = 0
        advance = self.meter.advance
        while True:
            try:
                n = os.copy_file_range(src_fd, dst_fd, CFR_CHUNK, off, off)
            except OSError as exc:
                if exc.errno in CFR_UNSUPPORTED:
                    raise _Unsupported(off, exc) from None
                # The call does not say which side failed; the destination is the likelier.
                raise CopyError(dst if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
                                else src, _why(exc)) from None
            if n == 0:
                return off
            off += n
            advance(n)

    def _rw(self, src_fd: int, dst_fd: int, start: int, hint: int, seekable: bool,
            src: str, dst: str) -> int:
        """read_fixed / write_fixed through the registered buffers, ``depth`` blocks in flight.

        Each buffer goes round on its own: read a block, write it at the same offset, take the
        next block.  Reads are issued up to the size the file had when it was stat'ed (the
        ``hint``); past it, one read at a time finds the real end (a read that returns 0).  A
        short read (the file ended, or shrank) leaves a *hole* that is read again from where it
        stopped; for a regular file that read returns 0 and marks the end.  On a non-seekable
        source one read is in flight at a time (reads at "the current position" could complete
        out of order), and each block is written where the previous one ended.
        """
        ring = self.ring
        bufs = self.buffers()
        block = self.block
        idle = list(bufs)
        reads: dict[saferring.Operation[Any], tuple[saferring.Buffer, int, int]] = {}
        writes: dict[saferring.Operation[Any], tuple[saferring.Buffer, int, int]] = {}
        holes: list[tuple[int, int]] = []
        front = start  # next block to read (seekable), or where the next block goes (stream)
        eof = False
        copied = 0
        advance = self.meter.advance
        read_fixed, write_fixed, wait = ring.read_fixed, ring.write_fixed, ring.wait
        try:
            while True:
                while idle:
                    if holes:
                        off, length = holes.pop()
                    elif eof or (reads and (not seekable or front >= hint)):
                        break
                    else:
                        off, length = front, block
                        if seekable:
                            front += block
                    buf = idle.pop()
                    reads[read_fixed(src_fd, buf, off if seekable else -1, length)] = (buf, off, length)
                if not reads and not writes:
                    return copied
                for op in wait(1):
                    entry = reads.pop(op, None)
                    if entry is not None:
                        buf, off, length = entry
                        try:
                            n = op.result()
                        except OSError as exc:
                            raise CopyError(src, _why(exc)) from None
                        if n == 0:
                            eof = True
                            idle.append(buf)
                            continue
                        if not seekable:
                            off = front
                            front += n
                        elif n < length:
                            holes.append((off + n, length - n))
                        writes[write_fixed(dst_fd, buf, off, n)] = (buf, off, n)
                        continue
                    entry = writes.pop(op, None)
                    if entry is None:
                        continue
                    buf, off, n = entry
                    try:
                        written = op.result()
                    except OSError as exc:
                        raise CopyError(dst, _why(exc)) from None
                    if written < n:
                        self._write_rest(dst_fd, buf, off, written, n, dst)
                    copied += n
                    advance(n)
                    idle.append(buf)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                self._drain([*reads, *writes])
            raise

    @staticmethod
    def _write_rest(fd: int, buf: saferring.Buffer, off: int, done: int, n: int, dst: str) -> None:
        """Finish a short write (rare: usually the next write reports why, e.g. ENOSPC)."""
        with buf.view() as view:
            while done < n:
                try:
                    k = os.pwrite(fd, view[done:n], off + done)
                except OSError as exc:
                    raise CopyError(dst, _why(exc)) from None
                if k == 0:
                    raise CopyError(dst, os.strerror(errno.ENOSPC))
                done += k

    def _splice(self, src_fd: int, dst_fd: int, start: int, hint: int, seekable: bool,
                src: str, dst: str) -> int:
        """file -> pipe -> file through ``depth`` pipes, each carrying one block at a time.

        ``splice(src, pipe, L, offset_in=off)``; when it has completed with ``n`` bytes,
        ``splice(pipe, dst, n, offset_out=off)`` (again for the rest if it moved fewer).  The
        reads follow the schedule of :meth:`_rw`: up to the stat'ed size, then one at a time to
        the end; a short read leaves a hole that is read again; a non-seekable source has one
        read in flight.

        The kernel runs every splice in an io-wq worker (a splice cannot be tried without
        blocking).  Reading into a pipe only takes references to the source's pages, so the
        reads of all pipes go ahead at once.  Writes are different: each one copies into the
        destination's pages under its inode lock.  With every pipe's write in flight (linked to
        its read, or not), up to ``depth`` workers wrote the destination at once and spent
        14-20% of their time spinning on that lock (perf, Linux 6.18, 1 GiB copy; medians of
        0.8-1.3 GiB/s against ``rw``'s 1.1-2.2 in the same runs).  So at most
        :data:`SPLICE_WRITES` (2) writes are in flight, in file order: one running and the next
        queued behind it, so the destination does not wait for a round trip through Python
        between two blocks (one write at a time measured about 8% slower than two).
        """
        ring = self.ring
        idle = list(self.pipes())
        # op -> (pipe, offset, bytes asked / bytes still in the pipe, is a read)
        busy: dict[saferring.Operation[Any], tuple[tuple[int, int, int], int, int, bool]] = {}
        ins = 0  # reads in flight
        outs: collections.deque[tuple[tuple[int, int, int], int, int]] = collections.deque()
        writing = 0  # writes in flight: at most SPLICE_WRITES (see above)
        holes: list[tuple[int, int]] = []
        front = start
        eof = False
        copied = 0
        advance = self.meter.advance
        splice, wait = ring.splice, ring.wait
        try:
            while True:
                while idle:
                    cap = idle[-1][2]
                    if holes:
                        off, length = holes.pop()
                        if length > cap:
                            holes.append((off + cap, length - cap))
                            length = cap
                    elif eof or (ins and (not seekable or front >= hint)):
                        break
                    else:
                        off, length = front, min(self.block, cap)
                        if seekable:
                            front += length
                    pipe = idle.pop()
                    busy[splice(src_fd, pipe[1], length, offset_in=off if seekable else -1)] = (
                        pipe, off, length, True)
                    ins += 1
                while outs and writing < SPLICE_WRITES:
                    pipe, off, n = outs.popleft()
                    busy[splice(pipe[0], dst_fd, n, offset_out=off)] = (pipe, off, n, False)
                    writing += 1
                if not busy:
                    return copied
                for op in wait(1):
                    entry = busy.pop(op, None)
                    if entry is None:
                        continue
                    pipe, off, length, reading = entry
                    if reading:
                        ins -= 1
                        try:
                            n = op.result()
                        except OSError as exc:
                            raise CopyError(src, _why(exc)) from None
                        if n == 0:
                            eof = True
                            idle.append(pipe)
                            continue
                        if not seekable:
                            off = front
                            front += n
                        elif n < length:
                            holes.append((off + n, length - n))
                        outs.append((pipe, off, n))
                        continue
                    writing -= 1
                    try:
                        n = op.result()
                    except OSError as exc:
                        raise CopyError(dst, _why(exc)) from None
                    copied += n
                    advance(n)
                    if n < length:  # the rest is still in the pipe: it goes next
                        outs.appendleft((pipe, off + n, length - n))
                    else:
                        idle.append(pipe)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                self._drain(list(busy))
                self.discard_pipes()  # they may hold bytes of this file
            raise

    # -- verification ---------------------------------------------------------------------------

    def digest(self, fd: int, what: str) -> bytes:
        """BLAKE2b of the whole file ``fd``, read through the ring (``depth`` reads in flight,
        hashed in file order)."""
        ring = self.ring
        block = self.block
        h = hashlib.blake2b(digest_size=32)
        idle = list(self.buffers())
        queue: collections.deque[tuple[saferring.Operation[Any], saferring.Buffer, int]]
        queue = collections.deque()
        front = 0
        try:
            while True:
                while idle:
                    buf = idle.pop()
                    queue.append((ring.read_fixed(fd, buf, front, block), buf, front))
                    front += block
                op, buf, off = queue[0]
                while not op.done():
                    ring.wait(1)
                queue.popleft()
                try:
                    n = op.result()
                except OSError as exc:
                    raise CopyError(what, _why(exc)) from None
                if n:
                    with buf.view() as view:
                        h.update(view)
                idle.append(buf)
                if n < block:
                    # The end of the file (or a short read): what was read ahead is not needed.
                    self._drain([o for o, _, _ in queue])
                    if n == 0:
                        return h.digest()
                    idle.extend(b for _, b, _ in queue)
                    queue.clear()
                    front = off + n
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                self._drain([o for o, _, _ in queue])
            raise

    def _verify(self, src_fd: int, dst_fd: int, st: os.stat_result, src: str, dst: str) -> None:
        if not stat.S_ISREG(st.st_mode):
            self.meter.say(f"{PROG}: {src}: not verified: a stream cannot be read twice")
            return
        if self.digest(src_fd, src) != self.digest(dst_fd, dst):
            raise VerifyError(dst, f"verification failed: the copy differs from {src} "
                              "(BLAKE2b); the destination was left unchanged")

    # -- trees ----------------------------------------------------------------------------------

    def copy_symlink(self, src: str, dst: str, st: os.stat_result) -> None:
        """Recreate the symbolic link ``src`` at ``dst`` (same target; replaces ``dst``)."""
        try:
            target = os.readlink(src)
        except OSError as exc:
            raise CopyError(src, _why(exc)) from None
        self._make_and_replace(dst, st, lambda tmp: os.symlink(target, tmp), symlink=True)

    def copy_fifo(self, dst: str, st: os.stat_result) -> None:
        """Create a FIFO at ``dst`` with the mode and times of ``st``."""
        self._make_and_replace(dst, st, lambda tmp: os.mkfifo(tmp, 0o600), symlink=False)

    def _make_and_replace(self, dst: str, st: os.stat_result, make: Callable[[str], None], *,
                          symlink: bool) -> None:
        head, name = os.path.split(dst)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(dst).st_mode):
                raise CopyError(dst, "cannot overwrite a directory with a non-directory")
        for _ in range(100):
            tmp = os.path.join(head, f".{name[:200]}.{secrets.token_hex(3)}.part")
            try:
                with _sigint_blocked():
                    make(tmp)
                    self.partials.add(tmp)
                break
            except FileExistsError:
                continue
            except OSError as exc:
                raise CopyError(dst, _why(exc)) from None
        else:
            raise CopyError(dst, "could not create a temporary name next to it")
        try:
            try:
                if not symlink:
                    os.chmod(tmp, stat.S_IMODE(st.st_mode))
                os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
                os.replace(tmp, dst)
            except OSError as exc:
                raise CopyError(dst, _why(exc)) from None
            self.partials.discard(tmp)
        finally:
            self.remove_partial(tmp)

    def copy_tree(self, src: str, dst: str, st: os.stat_result) -> None:
        """Copy the directory ``src`` to ``dst`` (created, or merged into if it is a directory).

        Errors are reported per entry and the rest is copied.  Directory modes and times are
        set at the end, deepest first, once nothing more is written into them.
        """
        real_src = os.path.realpath(src)
        real_dst = os.path.realpath(dst)
        if real_dst == real_src or real_dst.startswith(real_src.rstrip(os.sep) + os.sep):
            raise CopyError(dst, f"cannot copy a directory, {src}, into itself")
        made: list[tuple[str, os.stat_result]] = []
        stack = [(src, dst, st)]
        while stack:
            s, d, s_st = stack.pop()
            try:
                self._make_dir(d)
                with os.scandir(s) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except CopyError as exc:
                self.report(exc)
                continue
            except OSError as exc:
                self.report(CopyError(s, _why(exc)))
                continue
            made.append((d, s_st))
            for entry in entries:
                target = os.path.join(d, entry.name)
                try:
                    e_st = entry.stat(follow_symlinks=False)
                    mode = e_st.st_mode
                    if stat.S_ISDIR(mode):
                        stack.append((entry.path, target, e_st))
                    elif stat.S_ISLNK(mode):
                        self.copy_symlink(entry.path, target, e_st)
                    elif stat.S_ISREG(mode):
                        self.copy_file(entry.path, target, e_st)
                    elif stat.S_ISFIFO(mode):
                        self.copy_fifo(target, e_st)
                    else:
                        raise CopyError(entry.path, "special file not copied (device or socket)")
                except CopyError as exc:
                    self.report(exc)
                except OSError as exc:
                    self.report(CopyError(entry.path, _why(exc)))
        for d, s_st in reversed(made):
            try:
                os.chmod(d, stat.S_IMODE(s_st.st_mode))
                os.utime(d, ns=(s_st.st_atime_ns, s_st.st_mtime_ns))
            except OSError as exc:
                self.report(CopyError(d, f"cannot set mode and times: {_why(exc)}"))

    @staticmethod
    def _make_dir(path: str) -> None:
        try:
            # Owner-writable until its contents are in; the source's mode is set at the end.
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not os.path.isdir(path) or os.path.islink(path):
                raise CopyError(path, "cannot overwrite a non-directory with a directory") from None
        except OSError as exc:
            raise CopyError(path, _why(exc)) from None


# -- the command line ---------------------------------------------------------------------------


def _size(text: str) -> int:
    """``1048576``, ``64K``, ``1M``, ``2G`` (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(digits) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 65536, 64K, 1M)") from None
    if not 4096 <= value <= 1 << 30:
        raise argparse.ArgumentTypeError(f"must be between 4K and 1G, got {text!r}")
    return value


def _depth(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_DEPTH}, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Copy files and directory trees through io_uring (like cp -p); "
        "each file is written under a temporary name and renamed into place when complete.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="SRC DST, or SRC... DIR (DIR must exist)")
    parser.add_argument("-r", "-R", "--recursive", action="store_true",
                        help="copy directories recursively (symbolic links are recreated)")
    parser.add_argument("--method", choices=METHODS, default="auto",
                        help="how to move the data (default: auto, see the module docstring)")
    parser.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK, metavar="SIZE",
                        help="bytes per read/write or splice (default: 1M)")
    parser.add_argument("--depth", type=_depth, default=DEFAULT_DEPTH, metavar="N",
                        help=f"blocks in flight (default: {DEFAULT_DEPTH})")
    parser.add_argument("--verify", action="store_true",
                        help="compare BLAKE2b checksums of source and copy (exit 3 if they differ)")
    parser.add_argument("--fsync", action="store_true",
                        help="fsync each file (and its directory) before reporting success")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    shown.add_argument("--progress", action="store_true",
                       help="draw the progress bar even when stdout is not a terminal")
    return parser


def _plan(paths: list[str], recursive: bool) -> list[tuple[str, str]] | CopyError:
    """(source, destination) pairs with cp's rules, or the error that stops everything."""
    *sources, target = paths
    if os.path.isdir(target):
        return [(s, os.path.join(target, os.path.basename(os.path.normpath(s)))) for s in sources]
    if len(sources) > 1:
        return CopyError(target, "target is not a directory" if os.path.lexists(target)
                         else "target directory does not exist")
    if target.endswith(os.sep):
        return CopyError(target, "not a directory")
    return [(sources[0], target)]


def _total_bytes(plan: list[tuple[str, str]], recursive: bool) -> int:
    """What the progress bar expects: the sizes of the regular files to copy."""
    total = 0
    for src, _ in plan:
        try:
            st = os.lstat(src) if recursive else os.stat(src)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and recursive:
            for root, _dirs, files in os.walk(src):
                for name in files:
                    with contextlib.suppress(OSError):
                        f_st = os.lstat(os.path.join(root, name))
                        if stat.S_ISREG(f_st.st_mode):
                            total += f_st.st_size
        elif stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def _copy_one(copier: Copier, src: str, dst: str) -> None:
    try:
        # With -r, a symlink named on the command line is copied as a link (cp -r does too).
        st = os.lstat(src) if copier.recursive else os.stat(src)
    except OSError as exc:
        raise CopyError(src, _why(exc)) from None
    if stat.S_ISDIR(st.st_mode):
        if not copier.recursive:
            raise CopyError(src, "is a directory (use -r to copy it)")
        if os.path.lexists(dst) and not os.path.isdir(dst):
            raise CopyError(dst, "cannot overwrite a non-directory with a directory")
        copier.copy_tree(src, dst, st)
    elif stat.S_ISLNK(st.st_mode):
        copier.copy_symlink(src, dst, st)
    elif stat.S_ISFIFO(st.st_mode) and copier.recursive:
        copier.copy_fifo(dst, st)
    elif stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        copier.copy_file(src, dst, st)
    else:
        raise CopyError(src, "not a regular file, directory, FIFO or symbolic link")


def run(args: argparse.Namespace) -> int:
    """Copy what ``args`` names; returns the exit status (Ctrl-C raises KeyboardInterrupt)."""
    plan = _plan(args.paths, args.recursive)
    if isinstance(plan, CopyError):
        print(f"{PROG}: {plan.what}: {plan.why}", file=sys.stderr)
        return 1
    show = not args.quiet and (args.progress or sys.stdout.isatty())
    meter: Meter = RichMeter(force=args.progress) if show else Meter()
    try:
        ring = saferring.Ring(max(32, 2 * args.depth))
    except (OSError, saferring.SaferRingError) as exc:
        print(f"{PROG}: io_uring: {exc}", file=sys.stderr)
        return 1
    copier = Copier(ring, method=args.method, block=args.block_size, depth=args.depth,
                    verify=args.verify, fsync=args.fsync, recursive=args.recursive, meter=meter)
    try:
        meter.start(_total_bytes(plan, args.recursive) if show else 0)
        for src, dst in plan:
            try:
                _copy_one(copier, src, dst)
            except CopyError as exc:
                copier.report(exc)
        return copier.status
    finally:
        # Held back from Ctrl-C: a second one must not leave a temporary file or the ring half
        # closed.  Ring.close() cancels what is still in flight (after a Ctrl-C) and returns once
        # the kernel has finished with every buffer.
        with _sigint_blocked():
            meter.stop()
            for tmp in list(copier.partials):
                copier.remove_partial(tmp)
            ring.close()
            copier.close()  # the pipes, once no splice can be using them


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    if len(args.paths) < 2:
        print(f"{PROG}: missing destination after {args.paths[0]}", file=sys.stderr)
        return 2
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
