"""examples/file_copy.py: exact copies by every method, trees, metadata, verification, errors,
atomic replacement and Ctrl-C, on the real kernel and real files."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import saferring

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "file_copy.py"
SIZES = (0, 1, 4095, 4096, 4097, (1 << 20) + 17, 20 << 20)
METHODS = ("rw", "splice", "copy_file_range", "auto")
PROG = "file_copy.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("file_copy", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fc = _load()


def _method_missing(method: str, directory: Path) -> str | None:
    """Why the kernel cannot run ``method`` here, or None."""
    if method == "splice":
        with saferring.Ring(4) as ring:
            if not ring.features.supports("SPLICE"):
                return "the kernel's probe has no IORING_OP_SPLICE (Linux 5.7)"
    if method == "copy_file_range":
        a, b = directory / ".cfr-probe-a", directory / ".cfr-probe-b"
        a.write_bytes(b"x")
        fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.copy_file_range(fa, fb, 1)
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                return f"copy_file_range is refused on this kernel/filesystem: {exc}"
            raise
        finally:
            os.close(fa)
            os.close(fb)
            a.unlink()
            b.unlink()
    return None


@pytest.fixture(params=METHODS)
def method(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    reason = _method_missing(request.param, tmp_path)
    if reason:
        pytest.skip(reason)
    return str(request.param)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """One file of pseudo-random bytes per size, with distinct modes and old mtimes."""
    d = tmp_path_factory.mktemp("sources")
    out = {}
    for i, size in enumerate(SIZES):
        p = d / f"f{size}"
        p.write_bytes(os.urandom(size))
        os.chmod(p, (0o640, 0o755, 0o600, 0o444)[i % 4])
        os.utime(p, ns=(1_000_000_123_456_789 + i, 1_200_000_987_654_321 + i))
        out[size] = p
    return out


def _no_partials(*dirs: Path) -> None:
    for d in dirs:
        left = [p for p in d.rglob("*") if p.name.endswith(".part")]
        assert not left, f"temporary files left behind: {left}"


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith(f"{PROG}: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def _same_file_metadata(a: os.stat_result, b: os.stat_result) -> None:
    assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode)
    assert a.st_mtime_ns == b.st_mtime_ns
    assert a.st_atime_ns == b.st_atime_ns


# -- exact copies ---------------------------------------------------------------------------------


def test_every_size_is_copied_exactly_with_mode_and_times(method: str, sources: dict[int, Path],
                                                         tmp_path: Path) -> None:
    """Sizes around block and page boundaries, up to 20 MiB, byte for byte, mode and ns times."""
    out = tmp_path / "out"
    out.mkdir()
    before = {size: os.stat(src) for size, src in sources.items()}  # reading changes the atime
    status = fc.main(["-q", "--method", method, *map(str, sources.values()), str(out)])
    assert status == 0
    copied = {size: os.stat(out / src.name) for size, src in sources.items()}
    for size, src in sources.items():
        _same_file_metadata(before[size], copied[size])
        assert (out / src.name).read_bytes() == src.read_bytes(), f"{method}: {size} bytes differ"
    _no_partials(out)


@pytest.mark.parametrize("method", ["rw", "splice"])
@pytest.mark.parametrize("geometry", [["--block-size", "4K", "--depth", "1"],
                                      ["--block-size", "12K", "--depth", "3"],
                                      ["--block-size", "64K", "--depth", "64"]])
def test_block_size_and_depth_do_not_change_the_bytes(method: str, geometry: list[str],
                                                      sources: dict[int, Path], tmp_path: Path) -> None:
    """Many blocks in flight, blocks that do not divide the file, one block at a time."""
    reason = _method_missing(method, tmp_path)
    if reason:
        pytest.skip(reason)
    src = sources[(1 << 20) + 17]
    dst = tmp_path / "copy"
    assert fc.main(["-q", "--method", method, *geometry, str(src), str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("method", ["rw", "auto"])
def test_file_that_reports_size_zero_is_read_to_its_end(method: str, tmp_path: Path) -> None:
    """/proc files have st_size 0 but content: rw (and auto's choice) read until end of file."""
    src = "/proc/version"
    assert os.stat(src).st_size == 0
    dst = tmp_path / "version"
    assert fc.main(["-q", "--method", method, src, str(dst)]) == 0
    with open(src, "rb") as f:
        want = f.read()
    assert want and dst.read_bytes() == want


@pytest.mark.parametrize("method", ["rw", "splice", "auto"])
def test_fifo_source_is_read_until_writers_close(method: str, tmp_path: Path) -> None:
    """A FIFO on the command line is a stream: copied in order, to its end."""
    reason = _method_missing(method, tmp_path)
    if reason:
        pytest.skip(reason)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = os.urandom(3 * (1 << 20) + 5)

    def feed() -> None:
        fd = os.open(fifo, os.O_WRONLY)
        try:
            view = memoryview(data)
            for i in range(0, len(data), 100_000):  # uneven pieces: short reads on the other side
                os.write(fd, view[i:i + 100_000])
        finally:
            os.close(fd)

    writer = threading.Thread(target=feed)
    writer.start()
    try:
        assert fc.main(["-q", "--method", method, str(fifo), str(tmp_path / "copy")]) == 0
    finally:
        writer.join(timeout=30)
    assert (tmp_path / "copy").read_bytes() == data


def test_auto_falls_back_when_copy_file_range_refuses(tmp_path: Path) -> None:
    """Across filesystems (tmpfs -> the test directory) copy_file_range answers EXDEV; auto goes
    on with rw, while a forced copy_file_range reports the refusal."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is missing or on the same filesystem as the test directory")
    src = shm / f"file-copy-test-{os.getpid()}"
    data = os.urandom(2 * (1 << 20) + 3)
    src.write_bytes(data)
    try:
        fa = os.open(src, os.O_RDONLY)
        fb = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.copy_file_range(fa, fb, 1)
            pytest.skip("copy_file_range works across these filesystems here")
        except OSError as exc:
            if exc.errno not in fc.CFR_UNSUPPORTED:
                raise
        finally:
            os.close(fa)
            os.close(fb)
        assert fc.main(["-q", str(src), str(tmp_path / "auto")]) == 0
        assert (tmp_path / "auto").read_bytes() == data
        forced = tmp_path / "forced"
        assert fc.main(["-q", "--method", "copy_file_range", str(src), str(forced)]) == 1
        assert not forced.exists()
        _no_partials(tmp_path)
    finally:
        src.unlink()


# -- trees ----------------------------------------------------------------------------------------


def _make_tree(root: Path) -> None:
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "empty2" / "nested-empty").mkdir(parents=True)
    (root / "a" / "x.txt").write_bytes(b"hello\n")
    (root / "a" / "b" / "c" / "big.bin").write_bytes(os.urandom(300_001))
    (root / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    os.chmod(root / "a" / "x.txt", 0o640)
    os.symlink("a/x.txt", root / "rel-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.symlink("b", root / "a" / "dir-link")  # a link to a directory: recreated, not followed
    os.mkfifo(root / "a" / "pipe", 0o620)
    (root / "ro").mkdir()
    (root / "ro" / "inside").write_bytes(b"read-only dir content")
    os.chmod(root / "ro", 0o555)
    os.chmod(root / "a", 0o750)
    t = 1_300_000_000_000_000_000
    for i, p in enumerate(sorted(root.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(p, ns=(t + i * 1_000_003, t + i * 7_000_001), follow_symlinks=False)
    os.utime(root, ns=(t - 5, t - 7))


def _snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: type, mode, mtime (ns), link target or content."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            p = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, f.read())
    return out


@pytest.mark.parametrize("method", ["rw", "auto"])
def test_tree_copy_recreates_dirs_links_fifos_modes_and_times(method: str, tmp_path: Path) -> None:
    """-r: nested and empty directories, symlinks recreated (not followed), FIFOs, modes and ns
    mtimes of files and directories (set after their contents), a read-only directory."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _make_tree(src)
    want = _snapshot(src)
    try:
        assert fc.main(["-q", "-r", "--method", method, str(src), str(dst)]) == 0
        got = _snapshot(dst)
        assert got == want
        assert os.path.islink(dst / "a" / "dir-link")
        _no_partials(dst)
        # Into an existing directory: the tree goes inside it, as with cp -r.
        assert fc.main(["-q", "-r", str(src), str(dst)]) == 0
        assert _snapshot(dst / "src") == want
    finally:
        for root in (src, dst):  # let the fixture's cleanup remove the read-only directories
            for p in [root, *root.rglob("*")]:
                if p.is_dir() and not p.is_symlink():
                    os.chmod(p, 0o755)


def test_tree_into_itself_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    assert fc.main(["-q", "-r", str(src), str(src / "sub" / "copy")]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "into itself" in line
    assert not (src / "sub" / "copy").exists()


# -- verification ---------------------------------------------------------------------------------


def test_verify_passes_on_a_good_copy(method: str, sources: dict[int, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = sources[(1 << 20) + 17]
    dst = tmp_path / "copy"
    assert fc.main(["-q", "--verify", "--method", method, str(src), str(dst)]) == 0
    assert capsys.readouterr().err == ""
    assert dst.read_bytes() == src.read_bytes()


def test_verify_mismatch_exits_3_and_keeps_the_old_destination(
        sources: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The copy is corrupted after the data was written (in-process): --verify notices, the
    temporary file is removed and the existing destination stays as it was."""
    copy_data = fc.Copier.copy_data

    def corrupting(self: Any, src_fd: int, dst_fd: int, *args: Any) -> int:
        n = copy_data(self, src_fd, dst_fd, *args)
        first = os.pread(dst_fd, 1, 4096)
        os.pwrite(dst_fd, bytes([first[0] ^ 0xFF]), 4096)
        return int(n)

    monkeypatch.setattr(fc.Copier, "copy_data", corrupting)
    src = sources[(1 << 20) + 17]
    dst = tmp_path / "copy"
    dst.write_bytes(b"the old destination")
    assert fc.main(["-q", "--verify", str(src), str(dst)]) == 3
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"{PROG}: {dst}: verification failed")
    assert dst.read_bytes() == b"the old destination"
    _no_partials(tmp_path)
    # Without --verify the corruption goes unnoticed: the check above is what caught it.
    assert fc.main(["-q", str(src), str(dst)]) == 0
    assert dst.read_bytes() != src.read_bytes()


# -- bad inputs -----------------------------------------------------------------------------------


def _unreadable(tmp_path: Path) -> str:
    """A source whose open fails with EACCES, for root too (root bypasses file modes, but
    write-only sysctl files refuse reads to everyone)."""
    if os.geteuid() != 0:
        p = tmp_path / "secret"
        p.write_bytes(b"x")
        os.chmod(p, 0)
        return str(p)
    path = "/proc/sys/vm/drop_caches"
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        return path
    except OSError as exc:
        pytest.skip(f"running as root and {path} is not available to refuse a read: {exc}")
    pytest.skip(f"running as root and {path} can be read here")


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = tmp_path / "good"
    good.write_bytes(b"content")
    missing = tmp_path / "missing"
    a_dir = tmp_path / "dir"
    a_dir.mkdir(exist_ok=True)
    link = tmp_path / "link-to-good"
    if not link.exists():
        os.symlink(good, link)
    return [
        ([str(missing), str(tmp_path / "out1")], f"{missing}: No such file or directory"),
        ([_unreadable(tmp_path), str(tmp_path / "out2")], ": Permission denied"),
        ([str(good), str(tmp_path / "no-such-dir" / "out")],
         f"{tmp_path / 'no-such-dir' / 'out'}: No such file or directory"),
        ([str(good), str(good), str(tmp_path / "no-such-dir")],
         f"{tmp_path / 'no-such-dir'}: target directory does not exist"),
        ([str(a_dir), str(tmp_path / "out3")], f"{a_dir}: is a directory (use -r to copy it)"),
        ([str(good), str(good)], f"{good}: is the same file as {good}"),
        ([str(good), str(link)], f"{link}: is the same file as {good}"),
        ([str(good), "/dev/null"], "/dev/null: exists and is not a regular file"),
    ]


def test_bad_inputs_give_one_line_and_leave_nothing(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Missing source, permission denied, missing destination directory, a directory without
    -r, the same file twice, a destination that cannot be replaced: one line each, status 1,
    no temporary file, the source untouched."""
    for argv, expected in _bad_inputs(tmp_path):
        assert fc.main(["-q", *argv]) == 1, argv
        line = _one_error_line(capsys.readouterr().err)
        assert expected in line, (argv, line)
        _no_partials(tmp_path)
    assert (tmp_path / "good").read_bytes() == b"content"
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())


def test_errors_do_not_stop_the_other_files(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """As cp: the files that can be copied are, and the status says something failed."""
    (tmp_path / "one").write_bytes(b"1")
    (tmp_path / "two").write_bytes(b"22")
    out = tmp_path / "out"
    out.mkdir()
    argv = [str(tmp_path / "one"), str(tmp_path / "missing"), str(tmp_path / "two"), str(out)]
    assert fc.main(["-q", *argv]) == 1
    _one_error_line(capsys.readouterr().err)
    assert (out / "one").read_bytes() == b"1" and (out / "two").read_bytes() == b"22"


def test_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fc.main([str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as exc:
        fc.main(["--method", "carrier-pigeon", "a", "b"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        fc.main(["--block-size", "12Q", "a", "b"])
    capsys.readouterr()


# -- atomic replacement ---------------------------------------------------------------------------


def test_existing_destination_is_replaced_by_rename(sources: dict[int, Path], tmp_path: Path) -> None:
    """The new content arrives as a new inode renamed over the old name: a hard link to the old
    destination keeps the old bytes (nothing was written into the old file)."""
    src = sources[(1 << 20) + 17]
    dst = tmp_path / "dst"
    dst.write_bytes(b"old")
    os.link(dst, tmp_path / "old-link")
    assert fc.main(["-q", "--fsync", str(src), str(dst)]) == 0
    assert dst.read_bytes() == src.read_bytes()
    assert (tmp_path / "old-link").read_bytes() == b"old"
    assert os.stat(dst).st_ino != os.stat(tmp_path / "old-link").st_ino


@contextlib.contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process (its io_uring workers too): writes past it fail EFBIG."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills us
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_error_mid_copy_leaves_the_old_destination_intact(method: str, sources: dict[int, Path],
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A real write error after 2 MiB of a 20 MiB copy (the file size limit): status 1, one
    line naming the destination, the old destination unchanged, no temporary file."""
    src = sources[20 << 20]
    dst = tmp_path / "dst"
    dst.write_bytes(b"precious old content")
    with _file_size_limit(2 << 20):
        status = fc.main(["-q", "--method", method, str(src), str(dst)])
    assert status == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == f"{PROG}: {dst}: File too large"
    assert dst.read_bytes() == b"precious old content"
    _no_partials(tmp_path)


# -- progress -------------------------------------------------------------------------------------


def test_progress_bar_only_when_asked_or_on_a_terminal(sources: dict[int, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    src = sources[(1 << 20) + 17]
    assert fc.main([str(src), str(tmp_path / "a")]) == 0  # stdout is not a terminal here
    assert capsys.readouterr().out == ""
    assert fc.main(["--progress", str(src), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert src.name in out and "1.0/1.0 MB" in out
    with pytest.raises(SystemExit):
        fc.main(["--progress", "--quiet", str(src), str(tmp_path / "c")])
    capsys.readouterr()


# -- Ctrl-C ---------------------------------------------------------------------------------------


def _open_fifo_writer(fifo: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60  # generous: an emulated guest starts Python in seconds
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the reader opened
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.01)


def _wait_for_partial(directory: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60  # generous: an emulated guest starts Python in seconds
    while time.monotonic() < deadline and proc.poll() is None:
        parts = [p for p in directory.iterdir() if p.name.endswith(".part")]
        if parts and parts[0].stat().st_size > 0:
            return
        time.sleep(0.01)
    pytest.fail("the copy never started writing its temporary file")


@pytest.mark.parametrize("method, existing", [("rw", False), ("splice", True)])
def test_ctrl_c_mid_copy_exits_130_and_leaves_no_partial_file(method: str, existing: bool,
                                                             tmp_path: Path) -> None:
    """SIGINT while a read of a FIFO that is fed slowly is in flight: exit 130, no traceback,
    no temporary file, and the destination absent (or, if it existed, unchanged)."""
    reason = _method_missing(method, tmp_path)
    if reason:
        pytest.skip(reason)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "dst"
    if existing:
        dst.write_bytes(b"before")
    proc = subprocess.Popen([sys.executable, str(EXAMPLE), "--progress", "--method", method,
                             str(fifo), str(dst)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    writer = -1
    try:
        writer = _open_fifo_writer(fifo, proc)
        os.write(writer, os.urandom(60_000))
        _wait_for_partial(out, proc)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if writer >= 0:
            os.close(writer)
    assert proc.returncode == 130, stderr
    assert stderr.decode() == f"{PROG}: interrupted\n"
    assert sorted(p.name for p in out.iterdir()) == (["dst"] if existing else [])
    if existing:
        assert dst.read_bytes() == b"before"
