"""Every operation of the core API, on the real kernel, with good and bad input."""

from __future__ import annotations

import array
import errno
import mmap
import os
import stat
import time

import pytest

import saferring
from saferring import OpState


def test_nop_completes_with_zero(ring: saferring.Ring) -> None:
    """A no-op's result is 0 and it ends COMPLETED."""
    op = ring.nop()
    assert op.state is OpState.QUEUED
    assert ring.run(op) == 0
    assert op.state is OpState.COMPLETED and op.done()


def test_write_then_read_file_at_offsets(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """Positional reads return the file's bytes; a positional write changes exactly those bytes."""
    path, data = datafile
    fd = os.open(path, os.O_RDWR)
    try:
        buf = bytearray(100)
        assert ring.run(ring.read(fd, buf, 1000)) == 100
        assert buf == data[1000:1100]
        assert ring.run(ring.write(fd, b"saferring", 5)) == 9
        assert os.pread(fd, 20, 0) == data[:5] + b"saferring" + data[14:20]
    finally:
        os.close(fd)


def test_offset_minus_one_uses_and_advances_file_position(
        ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """offset=-1 reads at the file position and moves it, like os.read."""
    path, data = datafile
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 10, os.SEEK_SET)
        buf = bytearray(5)
        assert ring.run(ring.read(fd, buf)) == 5
        assert buf == data[10:15]
        assert os.lseek(fd, 0, os.SEEK_CUR) == 15
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "mmap", "array"])
def test_read_accepts_every_writable_buffer_kind(ring: saferring.Ring, pipe: tuple[int, int],
                                                 kind: str) -> None:
    """bytearray, memoryview slices, mmap and array.array are all valid read targets."""
    r, w = pipe
    backing: object
    if kind == "bytearray":
        backing = target = bytearray(8)
    elif kind == "memoryview":
        backing = bytearray(16)
        target = memoryview(backing)[4:12]
    elif kind == "mmap":
        backing = target = mmap.mmap(-1, 8)
    else:
        backing = target = array.array("B", bytes(8))
    os.write(w, b"ABCDEFGH")
    assert ring.run(ring.read(r, target)) == 8
    assert bytes(target) == b"ABCDEFGH"
    if kind == "memoryview":
        assert backing == bytes(4) + b"ABCDEFGH" + bytes(4)
    if isinstance(backing, mmap.mmap):
        backing.close()


@pytest.mark.parametrize("bad", [b"bytes", "str", 42, None, memoryview(b"ro")])
def test_read_refuses_read_only_or_non_buffers(ring: saferring.Ring, bad: object) -> None:
    """A read target that the kernel could not legally write raises TypeError, queuing nothing."""
    with pytest.raises(TypeError):
        ring.read(0, bad)
    assert ring.stats().in_flight == 0


def test_read_refuses_non_contiguous_view(ring: saferring.Ring) -> None:
    """A strided memoryview is not one memory range: TypeError."""
    with pytest.raises(TypeError, match="contiguous"):
        ring.read(0, memoryview(bytearray(16))[::2])


def test_read_refuses_released_view_and_closed_mmap(ring: saferring.Ring) -> None:
    """A released memoryview or closed mmap raises ValueError, as Python's own I/O does."""
    view = memoryview(bytearray(8))
    view.release()
    with pytest.raises(ValueError):
        ring.read(0, view)
    m = mmap.mmap(-1, 4096)
    m.close()
    with pytest.raises(ValueError):
        ring.read(0, m)


@pytest.mark.parametrize("bad", ["text", 3.5, None])
def test_write_refuses_non_bytes(ring: saferring.Ring, bad: object) -> None:
    """Writing a str (or a non-buffer) raises TypeError."""
    with pytest.raises(TypeError):
        ring.write(1, bad)


def test_negative_offset_refused(ring: saferring.Ring) -> None:
    """Offsets below -1 are refused before anything is queued."""
    with pytest.raises(ValueError, match="offset"):
        ring.read(0, bytearray(1), -2)
    with pytest.raises(ValueError, match="offset"):
        ring.write(1, b"x", -5)
    assert ring.stats().in_flight == 0


def test_bad_fd_fails_with_ebadf(ring: saferring.Ring) -> None:
    """A closed descriptor fails in the kernel and raises OSError(EBADF)."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    op = ring.read(r, bytearray(4))
    with pytest.raises(OSError) as info:
        ring.run(op)
    assert info.value.errno == errno.EBADF
    assert op.state is OpState.FAILED


def test_read_from_write_end_is_an_os_error(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """Errors keep Python's errno mapping: reading a pipe's write end is EBADF."""
    _r, w = pipe
    with pytest.raises(OSError) as info:
        ring.run(ring.read(w, bytearray(4)))
    assert info.value.errno == errno.EBADF


def test_readv_writev_round_trip(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """writev writes the buffers in order; readv fills them in order."""
    path = os.path.join(os.fspath(tmp_path), "v.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert ring.run(ring.writev(fd, [b"abc", bytearray(b"defg"), memoryview(b"hi")], 0)) == 9
        a, b, c = bytearray(2), bytearray(3), bytearray(10)
        assert ring.run(ring.readv(fd, [a, b, c], 0)) == 9
        assert (a, b, bytes(c[:4])) == (b"ab", b"cde", b"fghi")
    finally:
        os.close(fd)


def test_readv_bad_input(ring: saferring.Ring) -> None:
    """readv needs a non-empty sequence of writable buffers, at most IOV_MAX of them."""
    with pytest.raises(ValueError):
        ring.readv(0, [])
    with pytest.raises(TypeError):
        ring.readv(0, [bytearray(1), b"read-only"])
    with pytest.raises(TypeError):
        ring.readv(0, 5)
    with pytest.raises(ValueError, match="IOV_MAX"):
        ring.readv(0, [bytearray(1)] * (os.sysconf("SC_IOV_MAX") + 1))
    assert ring.stats().in_flight == 0


def test_fsync_and_fdatasync(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """fsync and fdatasync complete with 0 on a regular file and fail with EBADF on a bad fd."""
    path, _ = datafile
    fd = os.open(path, os.O_RDWR)
    try:
        assert ring.run(ring.fsync(fd)) == 0
        assert ring.run(ring.fsync(fd, datasync=True)) == 0
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        ring.run(ring.fsync(fd))
    assert info.value.errno == errno.EBADF


def test_openat_creates_reads_and_is_non_inheritable(ring: saferring.Ring,
                                                     tmp_path: os.PathLike[str]) -> None:
    """openat returns a working, non-inheritable descriptor; dir_fd makes paths relative."""
    d = os.fspath(tmp_path)
    fd = ring.run(ring.openat(os.path.join(d, "new.txt"), os.O_CREAT | os.O_WRONLY, 0o640))
    try:
        assert os.get_inheritable(fd) is False
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640 & ~_umask()
        os.write(fd, b"hi")
    finally:
        os.close(fd)
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = ring.run(ring.openat("new.txt", dir_fd=dfd))
        assert os.read(fd, 10) == b"hi"
        os.close(fd)
    finally:
        os.close(dfd)


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_openat_missing_file_raises_filenotfound_with_filename(ring: saferring.Ring,
                                                                tmp_path: os.PathLike[str]) -> None:
    """A failed open raises FileNotFoundError carrying the path, like os.open."""
    missing = os.path.join(os.fspath(tmp_path), "nope")
    with pytest.raises(FileNotFoundError) as info:
        ring.run(ring.openat(missing))
    assert info.value.filename == missing


def test_path_arguments_validated(ring: saferring.Ring) -> None:
    """Paths with NUL bytes or of the wrong type are refused before submission."""
    with pytest.raises(ValueError, match="null"):
        ring.openat("a\0b")
    with pytest.raises(TypeError):
        ring.openat(12.5)
    with pytest.raises(ValueError, match="null"):
        ring.statx(b"x\0")
    assert ring.stats().in_flight == 0


def test_openat_result_not_claimed_is_closed_when_dropped(ring: saferring.Ring,
                                                           datafile: tuple[str, bytes]) -> None:
    """An opened descriptor nobody asked for (result() never called) is closed with the op."""
    path, _ = datafile
    op = ring.openat(path)
    (done,) = ring.wait(1)
    fd = done._res
    assert fd is not None and fd >= 0
    assert os.path.exists(f"/proc/self/fd/{fd}")
    del op, done
    assert not os.path.exists(f"/proc/self/fd/{fd}")


def test_close_fd(ring: saferring.Ring) -> None:
    """close_fd closes the descriptor; closing it again fails with EBADF."""
    r, w = os.pipe()
    os.close(w)
    assert ring.run(ring.close_fd(r)) == 0
    with pytest.raises(OSError) as info:
        os.fstat(r)
    assert info.value.errno == errno.EBADF
    with pytest.raises(OSError) as info:
        ring.run(ring.close_fd(r))
    assert info.value.errno == errno.EBADF


def test_statx_matches_os_stat(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """statx reports what os.stat reports, under the same field names."""
    path, data = datafile
    st = ring.run(ring.statx(path))
    ref = os.stat(path)
    assert isinstance(st, saferring.StatxResult)
    for name in ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
                 "st_mtime_ns", "st_ctime_ns", "st_blocks", "st_blksize"):
        assert getattr(st, name) == getattr(ref, name), name
    assert st.st_size == len(data)
    assert abs(st.st_mtime - ref.st_mtime) < 1e-6


def test_statx_of_fd_and_symlink(ring: saferring.Ring, datafile: tuple[str, bytes],
                                 tmp_path: os.PathLike[str]) -> None:
    """statx(fd) stats the open file; follow_symlinks=False stats the link itself."""
    path, data = datafile
    fd = os.open(path, os.O_RDONLY)
    try:
        assert ring.run(ring.statx(fd)).st_ino == os.fstat(fd).st_ino
        with pytest.raises(ValueError):
            ring.statx(fd, dir_fd=fd)
    finally:
        os.close(fd)
    link = os.path.join(os.fspath(tmp_path), "link")
    os.symlink(path, link)
    assert ring.run(ring.statx(link)).st_size == len(data)
    assert stat.S_ISLNK(ring.run(ring.statx(link, follow_symlinks=False)).st_mode)


def test_statx_missing_path(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """statx of a missing path raises FileNotFoundError with the filename."""
    missing = os.path.join(os.fspath(tmp_path), "missing")
    with pytest.raises(FileNotFoundError) as info:
        ring.run(ring.statx(missing))
    assert info.value.filename == missing


def test_timeout_completes_after_the_time(ring: saferring.Ring) -> None:
    """timeout(s) completes (result None) no earlier than s seconds after submission."""
    start = time.monotonic()
    op = ring.timeout(0.05)
    assert ring.run(op) is None
    assert time.monotonic() - start >= 0.045
    assert op.state is OpState.COMPLETED


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf")])
def test_timeout_refuses_bad_durations(ring: saferring.Ring, bad: float) -> None:
    """Negative, NaN and infinite durations raise ValueError; non-numbers TypeError."""
    with pytest.raises(ValueError):
        ring.timeout(bad)
    with pytest.raises(TypeError):
        ring.timeout("soon")  # type: ignore[arg-type]


def test_wait_timeout_returns_early_with_nothing(ring: saferring.Ring) -> None:
    """wait(timeout=...) returns an empty list when nothing finished in time."""
    op = ring.timeout(5)
    start = time.monotonic()
    assert ring.wait(1, timeout=0.05) == []
    assert time.monotonic() - start < 2
    op.cancel()
    assert ring.wait(1) == [op]
    assert op.state is OpState.CANCELLED


def test_wait_collects_without_blocking_and_refuses_impossible(ring: saferring.Ring) -> None:
    """wait(0) only collects; waiting for more than could ever finish raises ValueError."""
    assert ring.wait(0) == []
    with pytest.raises(ValueError, match="never"):
        ring.wait(1)
    ops = [ring.nop() for _ in range(3)]
    with pytest.raises(ValueError):
        ring.wait(4)
    with pytest.raises(ValueError):
        ring.wait(-1)
    with pytest.raises(ValueError):
        ring.wait(1, timeout=-1)
    done = ring.wait(3)
    assert sorted(op.user_data for op in done) == sorted(op.user_data for op in ops)


def test_run_keeps_other_completions_for_wait(ring: saferring.Ring) -> None:
    """Operations that finish while run() waits for another are returned by the next wait()."""
    first = ring.nop()
    second = ring.nop()
    assert ring.run(second) == 0
    assert ring.wait(1) == [first]
    assert ring.wait(0) == []


def test_submit_returns_number_handed_to_kernel(ring: saferring.Ring) -> None:
    """submit() hands over every queued SQE and says how many; the ops become SUBMITTED."""
    ops = [ring.nop() for _ in range(5)]
    assert all(op.state is OpState.QUEUED for op in ops)
    assert ring.submit() == 5
    assert ring.submit() == 0
    assert {op.state for op in ops} == {OpState.SUBMITTED}
    assert len(ring.wait(5)) == 5


def test_stats_count_pins_and_traffic(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """stats() reports in-flight operations, pinned bytes, submitted SQEs and reaped CQEs."""
    r, w = pipe
    base = ring.stats()
    op = ring.read(r, bytearray(1000))
    ring.submit()
    s = ring.stats()
    assert (s.in_flight, s.pinned_bytes) == (1, 1000)
    assert s.submitted == base.submitted + 1
    os.write(w, b"x")
    assert ring.run(op) == 1
    s = ring.stats()
    assert (s.in_flight, s.pinned_bytes) == (0, 0)
    assert s.completed == base.completed + 1


def test_os_error_subclasses_apply(ring: saferring.Ring, tmp_path: os.PathLike[str]) -> None:
    """CQE errors become Python's own OSError subclasses (IsADirectoryError here)."""
    with pytest.raises(IsADirectoryError):
        ring.run(ring.openat(os.fspath(tmp_path), os.O_WRONLY))
