"""Fixtures shared by saferring's benchmarks: rings, data files with known content, offsets.

Every contender of a workload gets the same inputs from here: the same ring size, the same file,
the same sequence of offset batches (each contender starts from batch 0).  The data files hold
seeded pseudo-random bytes that stay in memory too, so every read can be checked against the
bytes that really are at its offset.

Environment:
  SAFERRING_BENCH_DIR  directory for the O_DIRECT file (default: /var/tmp, then benchmarks/.data;
                       it must be on a filesystem that supports O_DIRECT, i.e. not tmpfs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import mmap
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import saferring
from machine import MODE, QUICK, describe
from saferring.unsafe import ffi, lib

BLOCK = 4096  # bytes per read
QD = 32  # reads in flight per round
RING_ENTRIES = 256  # SQ size for both the safe and the raw ring (CQ: twice that)
N_BATCHES = 512  # distinct offset batches; a benchmark cycles through them
CACHED_SIZE = 64 << 20
DIRECT_SIZE = (64 if QUICK else 256) << 20
_CHUNK = 1 << 20
_HERE = Path(__file__).resolve().parent


@dataclasses.dataclass
class DataFile:
    """A file of known content, open read-only, plus the offset batches every contender reads.

    ``batches[i]`` is ``(offsets, prefixes)``: QD block-aligned offsets and, for each, the first
    8 bytes the file holds there (the per-round spot check; ``verify_full`` checks whole blocks).
    """

    path: str
    fd: int
    size: int
    content: bytes
    batches: list[tuple[list[int], list[bytes]]]
    block: int = BLOCK
    qd: int = QD

    def batch_source(self) -> Any:
        """A pedantic ``setup`` callable: each call hands the next batch to the round function."""
        it = itertools.cycle(self.batches)

        def setup() -> tuple[tuple[list[int], list[bytes]], dict[str, Any]]:
            return next(it), {}

        return setup

    def verify_full(self, offsets: list[int], blocks: list[Any], who: str) -> None:
        """Every byte of every block equals the file's content at its offset."""
        assert len(blocks) == len(offsets), who
        for off, blk in zip(offsets, blocks, strict=True):
            want = self.content[off:off + BLOCK]
            if bytes(blk) != want:
                pytest.fail(f"{who}: the {BLOCK} bytes read at offset {off} differ from the file")


def _content(size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(_CHUNK) for _ in range(size // _CHUNK))


def _batches(content: bytes, size: int, seed: int) -> list[tuple[list[int], list[bytes]]]:
    rng = random.Random(seed)
    nblocks = size // BLOCK
    out = []
    for _ in range(N_BATCHES):
        offs = [rng.randrange(nblocks) * BLOCK for _ in range(QD)]
        out.append((offs, [content[o:o + 8] for o in offs]))
    return out


def _write(path: str, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(content)
        done = 0
        while done < len(content):
            done += os.write(fd, view[done:done + (8 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)


# -- rings -------------------------------------------------------------------------------------


@pytest.fixture
def ring() -> Iterator[saferring.Ring]:
    """A saferring Ring with RING_ENTRIES entries, closed (and checked empty) after the test."""
    try:
        r = saferring.Ring(entries=RING_ENTRIES)
    except (saferring.UnsupportedPlatformError, OSError) as exc:
        pytest.skip(f"io_uring is not available here: {exc}")
    yield r
    assert r.stats().in_flight == 0, "a saferring benchmark left operations in flight"
    r.close()


@pytest.fixture
def raw_ring() -> Iterator[Any]:
    """A plain liburing ``struct io_uring *`` with RING_ENTRIES entries (no flags)."""
    if lib is None:
        pytest.skip("saferring's compiled extension is not available on this platform")
    r = ffi.new("struct io_uring *")
    rc = lib.io_uring_queue_init(RING_ENTRIES, r, 0)
    if rc < 0:
        pytest.skip(f"io_uring_queue_init failed: {os.strerror(-rc)}")
    yield r
    lib.io_uring_queue_exit(r)


# -- data files --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cached_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DataFile]:
    """64 MiB of known content, read once so that it sits in the page cache."""
    content = _content(CACHED_SIZE, seed=0x5AFE)
    path = str(tmp_path_factory.mktemp("saferring-bench") / "cached.bin")
    _write(path, content)
    fd = os.open(path, os.O_RDONLY)
    try:
        # Warm the page cache (and check the file while at it).
        got = bytearray()
        while len(got) < CACHED_SIZE:
            chunk = os.pread(fd, 8 << 20, len(got))
            if not chunk:
                break
            got += chunk
        assert got == content, "the cached benchmark file does not read back as written"
        del got
        yield DataFile(path, fd, CACHED_SIZE, content, _batches(content, CACHED_SIZE, seed=1))
    finally:
        os.close(fd)
        os.unlink(path)


_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs", "devtmpfs", "hugetlbfs"})


def _fs_type(path: str) -> str:
    """The filesystem type of ``path`` (longest matching mount point in /proc/self/mounts)."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def _o_direct_reason(directory: str) -> str | None:
    """None if ``directory`` supports O_DIRECT reads of 4 KiB into page-aligned memory and is
    backed by a block device (tmpfs takes O_DIRECT on Linux 6.6+, but then there is no device)."""
    if not hasattr(os, "O_DIRECT"):
        return "os.O_DIRECT does not exist on this platform"
    fstype = _fs_type(directory)
    if fstype in _MEMORY_FILESYSTEMS:
        return f"{directory} is on {fstype}, which has no block device behind it"
    probe = os.path.join(directory, "odirect-probe.bin")
    try:
        _write(probe, b"\x5a" * (2 * BLOCK))
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return f"O_DIRECT open failed in {directory}: {exc}"
    try:
        buf = mmap.mmap(-1, BLOCK)
        try:
            n = os.preadv(fd, [buf], BLOCK)
            if n != BLOCK or buf[:] != b"\x5a" * BLOCK:
                return f"O_DIRECT read in {directory} returned wrong data ({n} bytes)"
        finally:
            buf.close()
    except OSError as exc:
        return f"O_DIRECT read failed in {directory}: {exc}"
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return None


def _direct_dir_candidates() -> list[tuple[str, bool]]:
    """(directory, may be created) pairs to try, in order."""
    env = os.environ.get("SAFERRING_BENCH_DIR")
    if env:
        return [(env, False)]
    return [("/var/tmp", False), (str(_HERE / ".data"), True)]


@pytest.fixture(scope="session")
def direct_file() -> Iterator[DataFile]:
    """256 MiB (quick mode: 64) of known content on a filesystem that takes O_DIRECT, opened with O_DIRECT.

    The file is written, fsynced and dropped from the page cache, so every read reaches the
    block device.  Deleted at the end of the session.
    """
    reasons = []
    workdir = None
    for base, create in _direct_dir_candidates():
        try:
            if create:
                os.makedirs(base, exist_ok=True)
            candidate = tempfile.mkdtemp(prefix="saferring-bench-", dir=base)
        except OSError as exc:
            reasons.append(f"{base}: {exc}")
            continue
        reason = _o_direct_reason(candidate)
        if reason is None:
            workdir = candidate
            break
        reasons.append(reason)
        shutil.rmtree(candidate, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(_HERE / ".data")
    if workdir is None:
        pytest.skip("no directory supports O_DIRECT (set SAFERRING_BENCH_DIR): " + "; ".join(reasons))
    path = os.path.join(workdir, "direct.bin")
    fd = -1
    try:
        content = _content(DIRECT_SIZE, seed=0xD1EC7)
        try:
            _write(path, content)
        except OSError as exc:
            pytest.skip(f"cannot write the {DIRECT_SIZE >> 20} MiB O_DIRECT file in {workdir}: {exc}")
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        yield DataFile(path, fd, DIRECT_SIZE, content, _batches(content, DIRECT_SIZE, seed=2))
    finally:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(_HERE / ".data")  # only if this run created it and left it empty


# -- machine ------------------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Store the machine description and the mode in the JSON, where report.py finds them."""
    machine_info["saferring"] = dict(describe(), mode=MODE)
