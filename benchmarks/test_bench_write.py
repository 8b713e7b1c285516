"""4 KiB writes at random aligned offsets, 32 per round, without and with a flush per round.

write4k-random-qd32
    A 64 MiB file on a real disk (the O_DIRECT benchmarks' directory: ``$SAFERRING_BENCH_DIR``,
    else ``/var/tmp``), opened without O_DIRECT.  One round: 32 writes of 4 KiB at distinct
    block-aligned random offsets (a precomputed list of 512 batches, the same for every
    contender), all 32 in flight at once for the io_uring contenders.  The writes land in the
    page cache (the kernel writes them back later), so this is the per-write software cost.

write4k-qd32-fsync
    The same rounds, each made durable before the round ends: ``fdatasync`` after the 32 writes
    completed (``[fdatasync]``), or the file opened with ``O_DSYNC`` so that every write is
    durable when it completes (``[odsync]``).  The device's flush dominates.

Contenders (``[nosync]`` in the first group; ``[fdatasync]``/``[odsync]`` in the second):
  saferring_batch        ``ring.write_many(fd, data, offsets, 4096)``, ``ring.wait(1)``,
                         ``batch.result()``; then ``ring.run(ring.fsync(fd, datasync=True))``
                         (reference)
  saferring_batch_drained_fsync  [fdatasync] the fsync queued with the batch in one submission,
                         ``with ring.chain(drain=True): ring.fsync(...)``: IOSQE_IO_DRAIN makes
                         the kernel start it only after the 32 writes have completed
  saferring_single_ops   32 ``ring.write`` + ``ring.wait(32)``, then the fsync as above
  raw_cffi               liburing through cffi, one cffi call per liburing function (get_sqe,
                         prep_write, user_data per write; submit_and_wait; peek_batch_cqe); then
                         prep_fsync(IORING_FSYNC_DATASYNC), submit_and_wait(1)
  raw_cffi_batch         liburing through cffi a round at a time (conftest.RawBatch): the SQEs
                         of each data buffer prepared once, offsets patched, one memmove per round
  os_pwrite              32 ``os.pwrite`` calls, then ``os.fdatasync``
  c                      benchmarks/c/write_qd.c: the same rounds in C with liburing, timed by the
                         program
Cost-of-safety pairs (report.py): "one call per op" is saferring_single_ops against raw_cffi,
"batched" is saferring_batch against raw_cffi_batch.

Checks: every write's byte count (and every fsync's result) in every round.  Each contender
writes its own data (a pool of 4 x 32 blocks of pseudo-random bytes seeded by its name; round j
writes pool entry j % 4 at batch j % 512), so what a contender wrote differs from what the
previous one left.  After timing, the contender's rounds (the check round and the warm-up
included) are replayed into an in-memory copy of the file, and the whole file is read back and
compared with it: a lost, misplaced or torn write fails the contender.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
import zlib
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import saferring
from machine import QUICK
from saferring.unsafe import ffi, lib

RANDOM = "write4k-random-qd32"
FSYNC = "write4k-qd32-fsync"
BLOCK = 4096
QD = 32
FILE_SIZE = 64 << 20
N_BATCHES = 512
N_POOL = 4  # data buffers per contender; round j writes entry j % N_POOL
RING_ENTRIES = 256  # as conftest's rings
PER_OP, BATCHED = "one call per op", "batched"  # cost-of-safety pairs (report.py)
# mode -> (group, rounds, warm-up rounds).  A flushed round costs a few ms on a virtio disk.
MODES = {
    "nosync": (RANDOM, 300, 20) if QUICK else (RANDOM, 1000, 50),
    "fdatasync": (FSYNC, 30, 3) if QUICK else (FSYNC, 150, 10),
    "odsync": (FSYNC, 30, 3) if QUICK else (FSYNC, 150, 10),
}
# An os.pwrite loop on an O_DSYNC descriptor waits for 32 flushes one after the other.
PWRITE_ODSYNC_ROUNDS = (6, 1) if QUICK else (25, 2)
SYNCED = ["nosync", "fdatasync"]
ALL = ["nosync", "fdatasync", "odsync"]


class WriteFile:
    """The 64 MiB file, its offset batches, and an in-memory copy of what it should hold."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.mirror = bytearray(FILE_SIZE)  # the file starts as zeros, written out (not sparse)
        with open(path, "wb") as f:
            f.write(self.mirror)
            f.flush()
            os.fsync(f.fileno())
        self.fd = os.open(path, os.O_RDWR)
        self.dsync_fd = os.open(path, os.O_RDWR | os.O_DSYNC)
        rng = random.Random(0x3717E)
        nblocks = FILE_SIZE // BLOCK
        # Distinct offsets within a batch: two writes in flight to the same block would land in
        # an order nobody chose, and the check could not know which one won.
        self.batches = [[b * BLOCK for b in rng.sample(range(nblocks), QD)] for _ in range(N_BATCHES)]

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.dsync_fd)

    def fd_for(self, mode: str) -> int:
        return self.dsync_fd if mode == "odsync" else self.fd

    def verify(self, rounds: Rounds, done: int, who: str) -> None:
        """Replay ``done`` rounds of ``rounds`` into the copy, then compare the whole file with it."""
        for j in range(done):
            data = rounds.pool[j % N_POOL]
            for k, off in enumerate(self.batches[j % N_BATCHES]):
                self.mirror[off:off + BLOCK] = data[k * BLOCK:(k + 1) * BLOCK]
        chunk = 8 << 20
        for start in range(0, FILE_SIZE, chunk):
            got = os.pread(self.fd, chunk, start)
            if got != self.mirror[start:start + chunk]:
                for off in range(start, start + chunk, BLOCK):
                    if got[off - start:off - start + BLOCK] != self.mirror[off:off + BLOCK]:
                        pytest.fail(f"{who}: the file's block at offset {off} is not what the last "
                                    "write there put")
                pytest.fail(f"{who}: the file differs from what was written near offset {start}")


class Rounds:
    """One contender's data (N_POOL entries of QD blocks, seeded by its name) and round counter."""

    def __init__(self, wf: WriteFile, who: str) -> None:
        rng = random.Random(zlib.crc32(who.encode()))
        self.mem = mmap.mmap(-1, N_POOL * QD * BLOCK)  # page-aligned, as the C program's
        self.mem[:] = rng.randbytes(len(self.mem))
        whole = memoryview(self.mem)
        self.pool = [whole[p * QD * BLOCK:(p + 1) * QD * BLOCK] for p in range(N_POOL)]
        self.views = [[entry[k * BLOCK:(k + 1) * BLOCK] for k in range(QD)] for entry in self.pool]
        self.batches = wf.batches
        self.done = 0

    def setup(self) -> tuple[tuple[list[int], int], dict[str, Any]]:
        """A pedantic ``setup``: the next round's (offsets, pool index)."""
        j = self.done
        self.done += 1
        return (self.batches[j % N_BATCHES], j % N_POOL), {}


@pytest.fixture(scope="module")
def write_file(disk_dir: str) -> Iterator[WriteFile]:
    """The 64 MiB file of the write groups, on the O_DIRECT benchmarks' disk; deleted after."""
    path = os.path.join(disk_dir, "write.bin")
    try:
        wf = WriteFile(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(path)
        pytest.skip(f"cannot create the {FILE_SIZE >> 20} MiB write file in {disk_dir}: {exc}")
    try:
        yield wf
    finally:
        wf.close()
        with contextlib.suppress(OSError):
            os.unlink(path)


def _run(benchmark: Any, wf: WriteFile, mode: str, who: str, make_round: Any,
         rounds_warmup: tuple[int, int] | None = None) -> None:
    """Check one round, time the mode's rounds, then verify the whole file."""
    group, nrounds, warmup = MODES[mode]
    if rounds_warmup is not None:
        nrounds, warmup = rounds_warmup
    rounds = Rounds(wf, f"{who}[{mode}]")
    one_round = make_round(rounds)
    os.fsync(wf.fd)  # what earlier contenders left dirty is not this one's flush to pay
    args, _ = rounds.setup()
    one_round(*args)
    benchmark.group = group
    benchmark.extra_info["ops_per_round"] = QD
    benchmark.pedantic(one_round, setup=rounds.setup, rounds=nrounds, warmup_rounds=warmup)
    wf.verify(rounds, rounds.done, who)


def _fsyncer(ring: saferring.Ring, fd: int, mode: str) -> Any:
    """The round's closing fdatasync through the ring, or None when the mode needs none."""
    if mode != "fdatasync":
        return None
    fsync, run = ring.fsync, ring.run

    def flush() -> None:
        if run(fsync(fd, datasync=True)) != 0:
            pytest.fail("saferring: fdatasync failed")

    return flush


# -- contenders -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ALL)
def test_write_saferring_batch(benchmark: Any, ring: saferring.Ring, write_file: WriteFile,
                               mode: str) -> None:
    fd = write_file.fd_for(mode)
    write_many, wait, flush = ring.write_many, ring.wait, _fsyncer(ring, fd, mode)
    full = [BLOCK] * QD

    def make_round(rounds: Rounds) -> Any:
        pool = rounds.pool

        def one_round(offs: list[int], p: int) -> None:
            batch = write_many(fd, pool[p], offs, BLOCK)
            if wait(1) != [batch] or batch.result() != full:
                pytest.fail(f"saferring: write_many returned {batch.results_or_errors()}")
            if flush is not None:
                flush()

        return one_round

    if mode != "odsync":  # the [odsync] variant is compared with the group's reference
        benchmark.extra_info["reference"] = True
        benchmark.extra_info["pair"] = BATCHED
    _run(benchmark, write_file, mode, "saferring_batch", make_round)


def test_write_saferring_batch_drained_fsync(benchmark: Any, ring: saferring.Ring,
                                             write_file: WriteFile) -> None:
    fd = write_file.fd
    write_many, wait, fsync, chain = ring.write_many, ring.wait, ring.fsync, ring.chain
    full = [BLOCK] * QD
    try:
        with chain(drain=True):
            probe = fsync(fd, datasync=True)
        ring.run(probe)
    except saferring.UnsupportedOperationError as exc:
        pytest.skip(f"a drained chain is refused here: {exc}")

    def make_round(rounds: Rounds) -> Any:
        pool = rounds.pool

        def one_round(offs: list[int], p: int) -> None:
            batch = write_many(fd, pool[p], offs, BLOCK)
            with chain(drain=True):  # IOSQE_IO_DRAIN: starts once every earlier request is done
                flush = fsync(fd, datasync=True)
            wait(2)  # the batch and the fsync: both have ended when this returns
            if batch.result() != full or flush.result() != 0:
                pytest.fail(f"saferring: write_many returned {batch.results_or_errors()}, "
                            f"fdatasync {flush.result()}")

        return one_round

    _run(benchmark, write_file, "fdatasync", "saferring_batch_drained_fsync", make_round)


@pytest.mark.parametrize("mode", SYNCED)
def test_write_saferring_single_ops(benchmark: Any, ring: saferring.Ring, write_file: WriteFile,
                                    mode: str) -> None:
    fd = write_file.fd
    write, wait, flush = ring.write, ring.wait, _fsyncer(ring, fd, mode)

    def make_round(rounds: Rounds) -> Any:
        views = rounds.views

        def one_round(offs: list[int], p: int) -> None:
            ops = [write(fd, v, off) for v, off in zip(views[p], offs, strict=True)]
            if len(wait(QD)) != QD:
                pytest.fail(f"saferring: wait({QD}) returned too few operations")
            for op in ops:
                if op.result() != BLOCK:
                    pytest.fail(f"saferring: a write returned {op.result()}")
            if flush is not None:
                flush()

        return one_round

    benchmark.extra_info["pair"] = PER_OP
    _run(benchmark, write_file, mode, "saferring_single_ops", make_round)


def _raw_reap(r: Any, cqes: Any, count: int, want: int) -> None:
    """Wait for ``count`` CQEs (user_data 0..count-1, once each) whose results are ``want``."""
    done = seen = 0
    while done < count:
        got = lib.io_uring_peek_batch_cqe(r, cqes, count - done)
        for j in range(got):
            cqe = cqes[j]
            if cqe.res != want:
                pytest.fail(f"raw: request {cqe.user_data} returned {cqe.res}")
            seen |= 1 << cqe.user_data
        lib.io_uring_cq_advance(r, got)
        done += got
        if done < count and lib.io_uring_submit_and_wait(r, count - done) < 0:
            pytest.fail("raw: io_uring_submit_and_wait failed")
    if seen != (1 << count) - 1:
        pytest.fail(f"raw: not every request completed exactly once ({seen:#x})")


def _raw_fsync(r: Any, fd: int, cqes: Any) -> None:
    sqe = lib.io_uring_get_sqe(r)
    lib.io_uring_prep_fsync(sqe, fd, lib.IORING_FSYNC_DATASYNC)
    sqe.user_data = 0
    if lib.io_uring_submit_and_wait(r, 1) < 0:
        pytest.fail("raw: io_uring_submit_and_wait failed")
    _raw_reap(r, cqes, 1, 0)


@pytest.mark.parametrize("mode", SYNCED)
def test_write_raw_cffi(benchmark: Any, raw_ring: Any, write_file: WriteFile, mode: str) -> None:
    r, fd, flush = raw_ring, write_file.fd, mode == "fdatasync"
    get_sqe, prep_write = lib.io_uring_get_sqe, lib.io_uring_prep_write
    submit_and_wait, peek_batch = lib.io_uring_submit_and_wait, lib.io_uring_peek_batch_cqe
    cq_advance = lib.io_uring_cq_advance
    cqes = ffi.new("struct io_uring_cqe *[]", QD)
    span = range(QD)
    all_seen = (1 << QD) - 1

    def make_round(rounds: Rounds) -> Any:
        ptrs = [[ffi.from_buffer(v) for v in entry] for entry in rounds.views]

        def one_round(offs: list[int], p: int) -> None:
            src = ptrs[p]
            for k in span:
                sqe = get_sqe(r)
                if not sqe:
                    pytest.fail("raw: the SQ is full")
                prep_write(sqe, fd, src[k], BLOCK, offs[k])
                sqe.user_data = k
            if submit_and_wait(r, QD) < 0:
                pytest.fail("raw: io_uring_submit_and_wait failed")
            done = seen = 0
            while True:
                got = peek_batch(r, cqes, QD)
                for j in range(got):
                    cqe = cqes[j]
                    if cqe.res != BLOCK:
                        pytest.fail(f"raw: write {cqe.user_data} returned {cqe.res}")
                    seen |= 1 << cqe.user_data
                cq_advance(r, got)
                done += got
                if done >= QD:
                    break
                if submit_and_wait(r, QD - done) < 0:
                    pytest.fail("raw: io_uring_submit_and_wait failed")
            if seen != all_seen:
                pytest.fail(f"raw: not every write completed exactly once ({seen:#x})")
            if flush:
                _raw_fsync(r, fd, cqes)

        return one_round

    benchmark.extra_info.update(pair=PER_OP, raw=True)
    _run(benchmark, write_file, mode, "raw_cffi", make_round)


@pytest.mark.parametrize("mode", SYNCED)
def test_write_raw_cffi_batch(benchmark: Any, raw_batch: Any, write_file: WriteFile,
                              mode: str) -> None:
    r, fd, flush = raw_batch.r, write_file.fd, mode == "fdatasync"
    queue, reap = raw_batch.queuer(QD), raw_batch.reaper(QD)
    submit_and_wait = lib.io_uring_submit_and_wait
    cqes = ffi.new("struct io_uring_cqe *[]", 1)
    full = array("i", [BLOCK] * QD)
    want_sum = sum(range(QD))

    def make_round(rounds: Rounds) -> Any:
        templates = []
        for entry in rounds.views:  # one template per data buffer: addresses fixed, offsets patched
            words, sqes = raw_batch.templates(QD)
            for k, view in enumerate(entry):
                lib.io_uring_prep_write(sqes + k, fd, ffi.from_buffer(view), BLOCK, 0)
                sqes[k].user_data = k
            templates.append(words)

        def one_round(offs: list[int], p: int) -> None:
            words = templates[p]
            words[1::8] = array("Q", offs)  # word 1 of each 64-byte SQE is its file offset
            queue(words)
            if submit_and_wait(r, QD) < 0:
                pytest.fail("raw batch: io_uring_submit_and_wait failed")
            got = reap()  # int32 words, 4 per CQE: user_data low, high, res, flags
            if got[2::4] != full or sum(got[0::4]) != want_sum:
                pytest.fail(f"raw batch: results {got[2::4].tolist()}, user_data {got[0::4].tolist()}")
            if flush:
                _raw_fsync(r, fd, cqes)

        return one_round

    benchmark.extra_info.update(pair=BATCHED, raw=True)
    _run(benchmark, write_file, mode, "raw_cffi_batch", make_round)


@pytest.mark.parametrize("mode", ALL)
def test_write_os_pwrite(benchmark: Any, write_file: WriteFile, mode: str) -> None:
    fd, flush = write_file.fd_for(mode), mode == "fdatasync"
    pwrite, fdatasync = os.pwrite, os.fdatasync

    def make_round(rounds: Rounds) -> Any:
        views = rounds.views

        def one_round(offs: list[int], p: int) -> None:
            for v, off in zip(views[p], offs, strict=True):
                n = pwrite(fd, v, off)
                if n != BLOCK:
                    pytest.fail(f"os.pwrite wrote {n} bytes at {off}")
            if flush:
                fdatasync(fd)

        return one_round

    _run(benchmark, write_file, mode, "os_pwrite", make_round,
         PWRITE_ODSYNC_ROUNDS if mode == "odsync" else None)


@pytest.mark.parametrize("mode", ALL)
def test_write_c(benchmark: Any, c_build: Any, tmp_path: Path, write_file: WriteFile,
                 mode: str) -> None:
    """benchmarks/c/write_qd.c on the same batches with its own data, timed by the program."""
    group, nrounds, warmup = MODES[mode]
    rounds = Rounds(write_file, f"c[{mode}]")
    offsets, pool = tmp_path / "offsets.bin", tmp_path / "pool.bin"
    offsets.write_bytes(array("Q", [o for offs in write_file.batches for o in offs]).tobytes())
    pool.write_bytes(rounds.mem[:])
    os.fsync(write_file.fd)
    benchmark.group = group
    fields = c_build.bench(benchmark, "write_qd", write_file.path, "none" if mode == "nosync" else mode,
                           BLOCK, QD, N_BATCHES, offsets, N_POOL, pool, nrounds, warmup, RING_ENTRIES)
    write_file.verify(rounds, int(fields["rounds_done"]), "c")
