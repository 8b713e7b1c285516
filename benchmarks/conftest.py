"""Fixtures shared by saferring's benchmarks: rings, data files with known content, offsets.

Every contender of a workload gets the same inputs from here: the same ring size, the same file,
the same sequence of offset batches (each contender starts from batch 0).  The data files hold
seeded pseudo-random bytes that stay in memory too, so every read can be checked against the
bytes that really are at its offset.

Also here: ``c_build``, which compiles the C contenders of ``benchmarks/c/`` on demand and runs
them, and ``RawBatch``, the raw-cffi contenders' way of queueing a whole round with one copy.

Environment:
  SAFERRING_BENCH_DIR  directory for the O_DIRECT file and the write benchmarks' file (default:
                       /var/tmp, then benchmarks/.data; it must be on a filesystem that supports
                       O_DIRECT and has a block device behind it, i.e. not tmpfs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import mmap
import os
import random
import shutil
import subprocess
import tempfile
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cffi  # type: ignore[import-untyped]  # cffi ships no type stubs
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
def disk_dir() -> Iterator[str]:
    """A fresh directory on a filesystem with a block device behind it, where O_DIRECT works.

    The first of ``$SAFERRING_BENCH_DIR``, or ``/var/tmp`` then ``benchmarks/.data``, that passes
    the check; removed (with everything in it) at the end of the session.
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
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(_HERE / ".data")  # only if this run created it and left it empty


@pytest.fixture(scope="session")
def direct_file(disk_dir: str) -> Iterator[DataFile]:
    """256 MiB (quick mode: 64) of known content on a filesystem that takes O_DIRECT, opened with O_DIRECT.

    The file is written, fsynced and dropped from the page cache, so every read reaches the
    block device.  Deleted at the end of the session.
    """
    path = os.path.join(disk_dir, "direct.bin")
    fd = -1
    try:
        content = _content(DIRECT_SIZE, seed=0xD1EC7)
        try:
            _write(path, content)
        except OSError as exc:
            pytest.skip(f"cannot write the {DIRECT_SIZE >> 20} MiB O_DIRECT file in {disk_dir}: {exc}")
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        yield DataFile(path, fd, DIRECT_SIZE, content, _batches(content, DIRECT_SIZE, seed=2))
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)


# -- C contenders -------------------------------------------------------------------------------


class CPrograms:
    """Builds ``benchmarks/c/NAME.c`` on first use (``gcc -O2``) and runs it.

    A C contender measures itself: it runs the group's rounds internally and prints one line of
    ``key=value`` fields, among them ``round_median_ns`` (the median time of one round, timed
    inside the program).  :meth:`bench` records that as ``extra_info["round_seconds"]``, which
    report.py uses instead of pytest-benchmark's time of the whole process (start-up included).
    """

    def __init__(self, out: str) -> None:
        self._out = out
        self._built: dict[str, str] = {}
        self._liburing_missing: str | None = None
        self._liburing_checked = False

    def _check_liburing(self, gcc: str) -> str | None:
        """Why a liburing program cannot be built here (headers or library missing), or None."""
        if not self._liburing_checked:
            self._liburing_checked = True
            src = os.path.join(self._out, "probe.c")
            with open(src, "w") as f:
                f.write("#include <liburing.h>\nint main(void) { struct io_uring r; "
                        "return io_uring_queue_init(1, &r, 0) < -4095; }\n")
            proc = subprocess.run([gcc, "-o", os.path.join(self._out, "probe"), src, "-luring"],
                                  capture_output=True, text=True, timeout=120, check=False)
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["?"])[0]
                self._liburing_missing = f"liburing's headers or library are missing (liburing-dev): {first}"
        return self._liburing_missing

    def __call__(self, name: str, liburing: bool = True) -> str:
        """The path of the executable built from ``benchmarks/c/{name}.c`` (skips the test if
        gcc, or liburing for a program that needs it, is missing)."""
        if name in self._built:
            return self._built[name]
        gcc = shutil.which("gcc")
        if gcc is None:
            pytest.skip(f"gcc is needed to build benchmarks/c/{name}.c")
        if liburing and (reason := self._check_liburing(gcc)):
            pytest.skip(reason)
        exe = os.path.join(self._out, name)
        cmd = [gcc, "-O2", "-Wall", "-o", exe, str(_HERE / "c" / f"{name}.c")]
        if liburing:
            cmd.append("-luring")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            pytest.fail(f"compiling benchmarks/c/{name}.c failed:\n{proc.stderr}")
        self._built[name] = exe
        return exe

    def run(self, name: str, *args: object, timeout: float = 300) -> dict[str, str]:
        """Run the program with ``args``; its ``key=value`` fields (fails on a non-zero exit,
        which is how a C contender reports a wrong result)."""
        proc = subprocess.run([self(name), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            pytest.fail(f"{name} failed ({proc.returncode}): {proc.stderr.strip()}{proc.stdout.strip()}")
        return dict(item.split("=", 1) for item in proc.stdout.split())

    def bench(self, benchmark: Any, name: str, *args: object) -> dict[str, str]:
        """Run the program once under ``benchmark`` and record its own median round time."""
        fields: dict[str, str] = {}

        def once() -> None:
            fields.update(self.run(name, *args))

        self(name)  # build (or skip) before timing
        benchmark.pedantic(once, rounds=1, iterations=1)
        record_own_timing(benchmark, float(fields["round_median_ns"]) * 1e-9,
                          int(fields["ops_per_round"]))
        benchmark.extra_info["rounds"] = int(fields["rounds"])
        benchmark.extra_info["round_mean_seconds"] = float(fields["round_mean_ns"]) * 1e-9
        return fields


    def bench_reads(self, benchmark: Any, tmp: Path, df: DataFile,
                    batches: list[tuple[list[int], list[bytes]]], block: int, *, direct: bool,
                    fixed: bool, rounds: int, warmup: int) -> None:
        """``benchmarks/c/read_qd.c`` on ``batches`` (offsets, 8-byte prefixes) of ``df``, timed by
        the program; its final round (the last batch, read into zeroed buffers) is compared in
        full with the file."""
        offsets, prefixes, final = tmp / "offsets.bin", tmp / "prefixes.bin", tmp / "final.bin"
        offsets.write_bytes(array("Q", [o for offs, _ in batches for o in offs]).tobytes())
        prefixes.write_bytes(b"".join(p for _, ps in batches for p in ps))
        qd = len(batches[0][0])
        self.bench(benchmark, "read_qd", df.path, int(direct), int(fixed), block, qd, len(batches),
                   offsets, prefixes, rounds, warmup, final, RING_ENTRIES)
        data = final.read_bytes()
        for k, off in enumerate(batches[-1][0]):
            if data[k * block:(k + 1) * block] != df.content[off:off + block]:
                pytest.fail(f"read_qd: the {block} bytes read at offset {off} differ from the file")


def record_own_timing(benchmark: Any, round_seconds: float, ops_per_round: int) -> None:
    """Record a contender's own measurement of one round (report.py prefers it to the stats)."""
    benchmark.extra_info["round_seconds"] = round_seconds
    benchmark.extra_info["ops_per_round"] = ops_per_round


@pytest.fixture(scope="session")
def c_build() -> Iterator[CPrograms]:
    """Compiles benchmarks/c/*.c programs on demand into a temporary directory (removed after)."""
    out = tempfile.mkdtemp(prefix="saferring-c-")
    try:
        yield CPrograms(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


# -- raw cffi, batched ------------------------------------------------------------------------------

# The first fields of liburing's public ``struct io_uring_sq`` (the first member of ``struct
# io_uring``), unchanged since liburing 0.1.  saferring's cdef keeps ``struct io_uring`` opaque, so
# a second, library-less FFI describes them: the raw batched contenders move ``sqe_tail`` the way
# io_uring_get_sqe() does, N slots at a time, and liburing's submit publishes them to the kernel.
_SQ_FFI = cffi.FFI()
_SQ_FFI.cdef("""
    struct bench_io_uring_sq {
        unsigned *khead; unsigned *ktail; unsigned *kring_mask; unsigned *kring_entries;
        unsigned *kflags; unsigned *kdropped; unsigned *array; void *sqes;
        unsigned sqe_head; unsigned sqe_tail;
    };
""")
SQE_WORDS = 8  # a 64-byte SQE as uint64 words; word 1 is ``off`` (the kernel ABI's layout)


class RawBatch:
    """Queue a whole round of SQEs on a raw liburing ring with one copy, and reap its CQEs with one.

    This is the raw-cffi counterpart of saferring's batch API: the round's SQEs are prepared once
    (by liburing's own ``io_uring_prep_*`` into a private template array), each round patches
    what changes (the offsets, one slice assignment) and copies the template into the SQ with one
    ``ffi.memmove``; the CQEs are copied out with one ``ffi.buffer`` read.  No registry, no pins:
    the caller keeps every buffer alive and unmoved.
    """

    def __init__(self, r: Any) -> None:
        if ffi.sizeof("struct io_uring_sqe") != SQE_WORDS * 8 or ffi.sizeof("struct io_uring_cqe") != 16:
            pytest.skip("the raw batched contender expects 64-byte SQEs and 16-byte CQEs")
        self.r = r
        self.sq = _SQ_FFI.cast("struct bench_io_uring_sq *", int(ffi.cast("uintptr_t", r)))
        self.sqes = ffi.cast("struct io_uring_sqe *", int(_SQ_FFI.cast("uintptr_t", self.sq.sqes)))
        self.mask = int(self.sq.kring_mask[0])
        self.entries = int(self.sq.kring_entries[0])

    @staticmethod
    def templates(n: int) -> tuple[array[int], Any]:
        """``n`` zeroed SQEs: as uint64 words (patched each round: ``words[1::8]`` are the
        offsets) and as ``struct io_uring_sqe[]`` over the same memory (for io_uring_prep_*)."""
        words = array("Q", bytes(n * SQE_WORDS * 8))
        return words, ffi.from_buffer("struct io_uring_sqe[]", words, require_writable=True)

    def queuer(self, n: int) -> Callable[[array[int]], None]:
        """A function that places the ``n`` SQEs of a template in the SQ (not yet submitted)."""
        sq, khead, mask, entries, sqes = self.sq, self.sq.khead, self.mask, self.entries, self.sqes
        memmove, size = ffi.memmove, n * SQE_WORDS * 8

        def queue(words: array[int]) -> None:
            tail = sq.sqe_tail
            if tail + n - khead[0] > entries:
                pytest.fail("raw batch: the SQ is full")
            idx = tail & mask
            if idx + n <= entries:
                memmove(sqes + idx, words, size)
            else:  # the round wraps around the end of the SQ array
                first = entries - idx
                memmove(sqes + idx, words, first * SQE_WORDS * 8)
                memmove(sqes, memoryview(words)[first * SQE_WORDS:], (n - first) * SQE_WORDS * 8)
            sq.sqe_tail = tail + n

        return queue

    def reaper(self, n: int) -> Callable[[], array[int]]:
        """A function that waits for ``n`` CQEs and returns them as int32 words, 4 per CQE:
        user_data (low, high), res, flags (``words[2::4]`` are the results)."""
        r, peek, advance = self.r, lib.io_uring_peek_batch_cqe, lib.io_uring_cq_advance
        wait, buf = lib.io_uring_submit_and_wait, ffi.buffer
        cqes = ffi.new("struct io_uring_cqe *[]", n)
        size = n * 16

        def reap() -> array[int]:
            words = array("i")
            got = peek(r, cqes, n)
            if got == n and cqes[n - 1] - cqes[0] == n - 1:  # all there, contiguous: one copy
                words.frombytes(buf(cqes[0], size))
                advance(r, n)
                return words
            done = 0
            while True:
                for j in range(got):
                    words.frombytes(buf(cqes[j], 16))
                advance(r, got)
                done += got
                if done == n:
                    return words
                if wait(r, n - done) < 0:
                    pytest.fail("raw batch: io_uring_submit_and_wait failed")
                got = peek(r, cqes, n - done)

        return reap


@pytest.fixture
def raw_batch(raw_ring: Any) -> RawBatch:
    """The raw ring of ``raw_ring``, driven a round at a time (see :class:`RawBatch`)."""
    return RawBatch(raw_ring)


# -- machine ------------------------------------------------------------------------------------


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """Store the machine description and the mode in the JSON, where report.py finds them."""
    machine_info["saferring"] = dict(describe(), mode=MODE)
