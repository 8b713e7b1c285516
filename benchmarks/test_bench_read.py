"""4 KiB reads at random aligned offsets, 32 per round, from a cached file and with O_DIRECT.

read4k-random-cached-qd32
    A 64 MiB file already in the page cache.  The kernel copies 4 KiB per read, so this measures
    the per-read software cost of each way of issuing reads (the "device" is memcpy).
    Contenders: saferring (32 ``ring.read`` + ``ring.wait(32)``), raw_cffi (liburing through
    cffi, buffer pointers precomputed), os_pread (32 ``os.pread`` calls, a new bytes object
    each), os_preadv (32 ``os.preadv`` calls into the same preallocated buffers).

read4k-random-odirect-qd32
    A 256 MiB file opened with O_DIRECT, page-aligned buffers: every read goes to the block
    device.  saferring and raw_cffi keep 32 reads in flight; os_preadv_qd1 issues them one at a
    time, which is what a synchronous loop can do.  The gap is the device's parallelism.

Both groups also have raw_cffi_batch (liburing through cffi a round at a time: the 32 SQEs
prepared once into a template whose offsets each round patches, one memmove into the SQ, the
CQEs copied out at once; conftest.RawBatch) and c (benchmarks/c/read_qd.c, the same batches
read in C with liburing and timed by the program; fio's contender is in test_bench_fio.py).
Cost-of-safety pairs (report.py): "one call per op" is saferring_single_ops against raw_cffi,
"batched" is saferring_batch against raw_cffi_batch.

Every contender checks every read of every round: the byte count, and the first 8 bytes against
the file's known content at that offset.  After timing, each runs one more round into zeroed
buffers and compares all 32 x 4 KiB with the file.  Every contender reads the same sequence of
offset batches.
"""

from __future__ import annotations

import mmap
import os
from array import array
from pathlib import Path
from typing import Any

import pytest

import saferring
from machine import QUICK
from saferring.unsafe import ffi, lib

CACHED = "read4k-random-cached-qd32"
DIRECT = "read4k-random-odirect-qd32"
BLOCK = 4096  # as conftest.BLOCK
ROUNDS = {CACHED: 1000, DIRECT: 100} if QUICK else {CACHED: 5000, DIRECT: 400}
WARMUP = {CACHED: 50, DIRECT: 5} if QUICK else {CACHED: 200, DIRECT: 20}
PER_OP, BATCHED = "one call per op", "batched"  # cost-of-safety pairs (report.py)


class Buffers:
    """QD block-sized views of one allocation: a bytearray, or an anonymous (page-aligned) mmap."""

    def __init__(self, df: Any, aligned: bool) -> None:
        size = df.block * df.qd
        self.mem: Any = mmap.mmap(-1, size) if aligned else bytearray(size)
        whole = memoryview(self.mem)
        self.views = [whole[k * df.block:(k + 1) * df.block] for k in range(df.qd)]
        whole.release()
        # Every contender checks the first 8 bytes of each block the same way: by slicing the
        # underlying object (a memoryview slice would cost the io_uring contenders ~100 ns more
        # per block than os.pread's slice of its bytes).
        self.starts = [k * df.block for k in range(df.qd)]

    def zero(self) -> None:
        self.mem[:] = bytes(len(self.mem))


def _run(benchmark: Any, df: Any, group: str, one_round: Any, final_blocks: Any, who: str) -> None:
    """Check one round, time ROUNDS rounds, then verify a round into zeroed buffers in full."""
    offs, prefixes = df.batches[0]
    one_round(offs, prefixes)
    benchmark.group = group
    benchmark.extra_info["ops_per_round"] = df.qd
    benchmark.pedantic(one_round, setup=df.batch_source(), rounds=ROUNDS[group],
                       warmup_rounds=WARMUP[group])
    offs, prefixes = df.batches[-1]
    df.verify_full(offs, final_blocks(offs, prefixes), who)


# -- contenders, shared by both groups --------------------------------------------------------------


def _saferring(benchmark: Any, ring: saferring.Ring, df: Any, group: str, aligned: bool) -> None:
    bufs = Buffers(df, aligned)
    views, fd, block, qd = bufs.views, df.fd, df.block, df.qd
    read, wait, mem, starts = ring.read, ring.wait, bufs.mem, bufs.starts

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        ops = [read(fd, v, off) for v, off in zip(views, offs, strict=True)]
        done = wait(qd)
        if len(done) != qd:
            pytest.fail(f"saferring: wait({qd}) returned {len(done)} operations")
        for op, start, want in zip(ops, starts, prefixes, strict=True):
            if op.result() != block or mem[start:start + 8] != want:
                pytest.fail(f"saferring: read returned {op.result()} / wrong data")

    def final(offs: list[int], prefixes: list[bytes]) -> list[Any]:
        bufs.zero()
        one_round(offs, prefixes)
        return views

    benchmark.extra_info["pair"] = PER_OP
    _run(benchmark, df, group, one_round, final, "saferring")


def _saferring_batch(benchmark: Any, ring: saferring.Ring, df: Any, group: str,
                     aligned: bool) -> None:
    bufs = Buffers(df, aligned)
    views, fd, block, qd = bufs.views, df.fd, df.block, df.qd
    read_many, wait, mem, starts = ring.read_many, ring.wait, bufs.mem, bufs.starts
    full = [block] * qd

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        batch = read_many(fd, mem, offs, block)
        done = wait(1)
        if done != [batch] or batch.result() != full:
            pytest.fail(f"saferring: read_many returned {batch.results_or_errors()}")
        for start, want in zip(starts, prefixes, strict=True):
            if mem[start:start + 8] != want:
                pytest.fail("saferring: read_many placed wrong data")

    def final(offs: list[int], prefixes: list[bytes]) -> list[Any]:
        bufs.zero()
        one_round(offs, prefixes)
        return views

    benchmark.extra_info["reference"] = True
    benchmark.extra_info["pair"] = BATCHED
    _run(benchmark, df, group, one_round, final, "saferring_batch")


def _raw_cffi(benchmark: Any, r: Any, df: Any, group: str, aligned: bool) -> None:
    bufs = Buffers(df, aligned)
    views, fd, block, qd = bufs.views, df.fd, df.block, df.qd
    mem, starts = bufs.mem, bufs.starts
    ptrs = [ffi.from_buffer(v, require_writable=True) for v in views]
    get_sqe, prep_read = lib.io_uring_get_sqe, lib.io_uring_prep_read
    submit_and_wait, peek_batch = lib.io_uring_submit_and_wait, lib.io_uring_peek_batch_cqe
    cq_advance = lib.io_uring_cq_advance
    cqes = ffi.new("struct io_uring_cqe *[]", qd)
    span = range(qd)
    all_seen = (1 << qd) - 1

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        for k in span:
            sqe = get_sqe(r)
            if not sqe:
                pytest.fail("raw: the SQ is full")
            prep_read(sqe, fd, ptrs[k], block, offs[k])
            sqe.user_data = k
        ret = submit_and_wait(r, qd)
        if ret < 0:
            pytest.fail(f"raw: io_uring_submit_and_wait returned {ret}")
        done = 0
        seen = 0
        while True:
            got = peek_batch(r, cqes, qd)
            for j in range(got):
                cqe = cqes[j]
                k = cqe.user_data
                if cqe.res != block or mem[starts[k]:starts[k] + 8] != prefixes[k]:
                    pytest.fail(f"raw: read {k} returned {cqe.res} / wrong data")
                seen |= 1 << k
            cq_advance(r, got)
            done += got
            if done >= qd:
                break
            ret = submit_and_wait(r, qd - done)
            if ret < 0:
                pytest.fail(f"raw: io_uring_submit_and_wait returned {ret}")
        if seen != all_seen:
            pytest.fail(f"raw: not every read completed exactly once ({seen:#x})")

    def final(offs: list[int], prefixes: list[bytes]) -> list[Any]:
        bufs.zero()
        one_round(offs, prefixes)
        return views

    benchmark.extra_info.update(pair=PER_OP, raw=True)
    _run(benchmark, df, group, one_round, final, "raw_cffi")


def _raw_cffi_batch(benchmark: Any, rb: Any, df: Any, group: str, aligned: bool) -> None:
    bufs = Buffers(df, aligned)
    views, fd, block, qd = bufs.views, df.fd, df.block, df.qd
    mem, starts = bufs.mem, bufs.starts
    ptrs = [ffi.from_buffer(v, require_writable=True) for v in views]  # kept alive with the test
    words, sqes = rb.templates(qd)
    for k in range(qd):
        lib.io_uring_prep_read(sqes + k, fd, ptrs[k], block, 0)  # the offset is patched per round
        sqes[k].user_data = k
    queue, reap = rb.queuer(qd), rb.reaper(qd)
    r, submit_and_wait = rb.r, lib.io_uring_submit_and_wait
    full = array("i", [block] * qd)
    want_sum = sum(range(qd))

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        words[1::8] = array("Q", offs)  # word 1 of each 64-byte SQE is its file offset
        queue(words)
        ret = submit_and_wait(r, qd)
        if ret < 0:
            pytest.fail(f"raw batch: io_uring_submit_and_wait returned {ret}")
        cqes = reap()  # int32 words, 4 per CQE: user_data low, high, res, flags
        if cqes[2::4] != full or sum(cqes[0::4]) != want_sum:
            pytest.fail(f"raw batch: results {cqes[2::4].tolist()}, user_data {cqes[0::4].tolist()}")
        for start, want in zip(starts, prefixes, strict=True):
            if mem[start:start + 8] != want:
                pytest.fail("raw batch: a read placed wrong data")

    def final(offs: list[int], prefixes: list[bytes]) -> list[Any]:
        bufs.zero()
        one_round(offs, prefixes)
        return views

    benchmark.extra_info.update(pair=BATCHED, raw=True)
    _run(benchmark, df, group, one_round, final, "raw_cffi_batch")


def _os_preadv(benchmark: Any, df: Any, group: str, aligned: bool) -> None:
    bufs = Buffers(df, aligned)
    views, fd, block, mem = bufs.views, df.fd, df.block, bufs.mem
    vec_lists = [[v] for v in views]
    preadv = os.preadv

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        for vec, start, off, want in zip(vec_lists, bufs.starts, offs, prefixes, strict=True):
            n = preadv(fd, vec, off)
            if n != block or mem[start:start + 8] != want:
                pytest.fail(f"os.preadv returned {n} / wrong data at {off}")

    def final(offs: list[int], prefixes: list[bytes]) -> list[Any]:
        bufs.zero()
        one_round(offs, prefixes)
        return views

    _run(benchmark, df, group, one_round, final, "os.preadv")


# -- read4k-random-cached-qd32 ---------------------------------------------------------------------


def test_cached_saferring_batch(benchmark: Any, ring: saferring.Ring, cached_file: Any) -> None:
    _saferring_batch(benchmark, ring, cached_file, CACHED, aligned=False)


def test_cached_saferring_single_ops(benchmark: Any, ring: saferring.Ring, cached_file: Any) -> None:
    _saferring(benchmark, ring, cached_file, CACHED, aligned=False)


def test_cached_raw_cffi(benchmark: Any, raw_ring: Any, cached_file: Any) -> None:
    _raw_cffi(benchmark, raw_ring, cached_file, CACHED, aligned=False)


def test_cached_raw_cffi_batch(benchmark: Any, raw_batch: Any, cached_file: Any) -> None:
    _raw_cffi_batch(benchmark, raw_batch, cached_file, CACHED, aligned=False)


def test_cached_c(benchmark: Any, c_build: Any, tmp_path: Path, cached_file: Any) -> None:
    benchmark.group = CACHED
    c_build.bench_reads(benchmark, tmp_path, cached_file, cached_file.batches, BLOCK, direct=False,
                        fixed=False, rounds=ROUNDS[CACHED], warmup=WARMUP[CACHED])


def test_cached_os_pread(benchmark: Any, cached_file: Any) -> None:
    df = cached_file
    fd, block = df.fd, df.block
    pread = os.pread

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        for off, want in zip(offs, prefixes, strict=True):
            data = pread(fd, block, off)
            if len(data) != block or data[:8] != want:
                pytest.fail(f"os.pread returned {len(data)} bytes / wrong data at {off}")

    def final(offs: list[int], prefixes: list[bytes]) -> list[bytes]:
        one_round(offs, prefixes)
        return [pread(fd, block, off) for off in offs]

    _run(benchmark, df, CACHED, one_round, final, "os.pread")


def test_cached_os_preadv(benchmark: Any, cached_file: Any) -> None:
    _os_preadv(benchmark, cached_file, CACHED, aligned=False)


# -- read4k-random-odirect-qd32 --------------------------------------------------------------------


def test_odirect_saferring_batch(benchmark: Any, ring: saferring.Ring, direct_file: Any) -> None:
    _saferring_batch(benchmark, ring, direct_file, DIRECT, aligned=True)


def test_odirect_saferring_single_ops(benchmark: Any, ring: saferring.Ring, direct_file: Any) -> None:
    _saferring(benchmark, ring, direct_file, DIRECT, aligned=True)


def test_odirect_raw_cffi(benchmark: Any, raw_ring: Any, direct_file: Any) -> None:
    _raw_cffi(benchmark, raw_ring, direct_file, DIRECT, aligned=True)


def test_odirect_raw_cffi_batch(benchmark: Any, raw_batch: Any, direct_file: Any) -> None:
    _raw_cffi_batch(benchmark, raw_batch, direct_file, DIRECT, aligned=True)


def test_odirect_c(benchmark: Any, c_build: Any, tmp_path: Path, direct_file: Any) -> None:
    benchmark.group = DIRECT
    c_build.bench_reads(benchmark, tmp_path, direct_file, direct_file.batches, BLOCK, direct=True,
                        fixed=False, rounds=ROUNDS[DIRECT], warmup=WARMUP[DIRECT])


def test_odirect_os_preadv_qd1(benchmark: Any, direct_file: Any) -> None:
    _os_preadv(benchmark, direct_file, DIRECT, aligned=True)
