"""nop-batchN: queue N NOPs, submit, wait for all N, check every result.

This is pure per-operation overhead: the kernel does nothing for a NOP, so the numbers are the
cost of preparing SQEs, one io_uring_enter, and reaping/checking CQEs from Python.

Contenders (same ring size, same N, same checks):
  saferring_batch       the safe API's batch: ``ring.nop_many(N)`` (one BatchOperation, members
                        prepared and reaped in C), ``ring.wait(1)``, ``batch.result()``  (reference)
  saferring_single_ops  the safe API one operation at a time: ``[ring.nop() for _ in range(N)]``,
                        ``ring.wait(N)``, ``op.result()`` for each
  raw_cffi    liburing through cffi, one cffi call per liburing function, locals bound:
              get_sqe / prep_nop / user_data per op, submit_and_wait, peek_batch_cqe into a
              preallocated array, read user_data and res of each CQE, cq_advance
  raw_cffi_batch  liburing through cffi, a round at a time: the N SQEs prepared once into a
              template, copied into the SQ with one memmove per round, submit_and_wait, the N
              CQEs copied out with one buffer read and checked as an int array (conftest.RawBatch)
  c           benchmarks/c/nop_batch.c: the same rounds in C with liburing, timed by the program

Cost-of-safety pairs (``extra_info["pair"]``, report.py): "one call per op" is saferring_single_ops
against raw_cffi, "batched" is saferring_batch against raw_cffi_batch.
"""

from __future__ import annotations

from array import array
from typing import Any

import pytest

import saferring
from machine import QUICK
from saferring.unsafe import ffi, lib

BATCHES = [1, 32, 128]
# Calls of the round function per timed round, so that one timed round lasts a few ms.
ITERATIONS = {1: 2000, 32: 100, 128: 25}
ROUNDS = 40 if QUICK else 200
WARMUP = 3 if QUICK else 10
RING_ENTRIES = 256  # as conftest's rings
PER_OP, BATCHED = "one call per op", "batched"  # cost-of-safety pairs (report.py)


def _pedantic(benchmark: Any, fn: Any, n: int) -> None:
    benchmark.group = f"nop-batch{n}"
    benchmark.extra_info["ops_per_round"] = n
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS[n], warmup_rounds=WARMUP)


@pytest.mark.parametrize("n", BATCHES, ids=[f"batch{n}" for n in BATCHES])
def test_nop_saferring_batch(benchmark: Any, ring: saferring.Ring, n: int) -> None:
    nop_many, wait = ring.nop_many, ring.wait
    zeros = [0] * n

    def one_round() -> None:
        batch = nop_many(n)
        done = wait(1)
        if done != [batch] or batch.result() != zeros:
            pytest.fail(f"saferring: the batch returned {done} / {batch.results_or_errors()}")

    one_round()  # correctness before timing
    benchmark.extra_info["reference"] = True
    benchmark.extra_info["pair"] = BATCHED
    _pedantic(benchmark, one_round, n)
    stats = ring.stats()
    assert stats.in_flight == 0 and stats.submitted == stats.completed


@pytest.mark.parametrize("n", BATCHES, ids=[f"batch{n}" for n in BATCHES])
def test_nop_saferring_single_ops(benchmark: Any, ring: saferring.Ring, n: int) -> None:
    nop, wait = ring.nop, ring.wait
    span = range(n)

    def one_round() -> None:
        [nop() for _ in span]
        done = wait(n)
        if len(done) != n:
            pytest.fail(f"saferring: wait({n}) returned {len(done)} operations")
        for op in done:
            if op.result() != 0:
                pytest.fail(f"saferring: a NOP returned {op.result()}")

    one_round()  # correctness before timing
    benchmark.extra_info["pair"] = PER_OP
    _pedantic(benchmark, one_round, n)
    stats = ring.stats()
    assert stats.in_flight == 0 and stats.submitted == stats.completed


@pytest.mark.parametrize("n", BATCHES, ids=[f"batch{n}" for n in BATCHES])
def test_nop_raw_cffi(benchmark: Any, raw_ring: Any, n: int) -> None:
    r = raw_ring
    get_sqe, prep_nop = lib.io_uring_get_sqe, lib.io_uring_prep_nop
    submit_and_wait, peek_batch = lib.io_uring_submit_and_wait, lib.io_uring_peek_batch_cqe
    cq_advance = lib.io_uring_cq_advance
    cqes = ffi.new("struct io_uring_cqe *[]", n)
    span = range(n)
    want_sum = sum(span)

    def one_round() -> None:
        for i in span:
            sqe = get_sqe(r)
            if not sqe:
                pytest.fail("raw: the SQ is full")
            prep_nop(sqe)
            sqe.user_data = i
        ret = submit_and_wait(r, n)
        if ret < 0:
            pytest.fail(f"raw: io_uring_submit_and_wait returned {ret}")
        done = 0
        total = 0
        while True:
            got = peek_batch(r, cqes, n)
            for j in range(got):
                cqe = cqes[j]
                if cqe.res != 0:
                    pytest.fail(f"raw: a NOP returned {cqe.res}")
                total += cqe.user_data
            cq_advance(r, got)
            done += got
            if done >= n:
                break
            ret = submit_and_wait(r, n - done)  # not reached in practice: all N are ready
            if ret < 0:
                pytest.fail(f"raw: io_uring_submit_and_wait returned {ret}")
        if done != n or total != want_sum:
            pytest.fail(f"raw: reaped {done} CQEs (user_data sum {total}), expected {n}")

    one_round()
    benchmark.extra_info.update(pair=PER_OP, raw=True)
    _pedantic(benchmark, one_round, n)


@pytest.mark.parametrize("n", BATCHES, ids=[f"batch{n}" for n in BATCHES])
def test_nop_raw_cffi_batch(benchmark: Any, raw_batch: Any, n: int) -> None:
    words, sqes = raw_batch.templates(n)
    for i in range(n):
        lib.io_uring_prep_nop(sqes + i)
        sqes[i].user_data = i
    queue, reap = raw_batch.queuer(n), raw_batch.reaper(n)
    r, submit_and_wait = raw_batch.r, lib.io_uring_submit_and_wait
    zeros = array("i", bytes(4 * n))
    want_sum = sum(range(n))

    def one_round() -> None:
        queue(words)
        ret = submit_and_wait(r, n)
        if ret < 0:
            pytest.fail(f"raw batch: io_uring_submit_and_wait returned {ret}")
        cqes = reap()  # int32 words, 4 per CQE: user_data low, high, res, flags
        if cqes[2::4] != zeros or sum(cqes[0::4]) != want_sum:
            pytest.fail(f"raw batch: results {cqes[2::4].tolist()}, user_data {cqes[0::4].tolist()}")

    one_round()
    benchmark.extra_info.update(pair=BATCHED, raw=True)
    _pedantic(benchmark, one_round, n)


@pytest.mark.parametrize("n", BATCHES, ids=[f"batch{n}" for n in BATCHES])
def test_nop_c(benchmark: Any, c_build: Any, n: int) -> None:
    """benchmarks/c/nop_batch.c: ROUNDS rounds of ITERATIONS batches, timed by the program."""
    benchmark.group = f"nop-batch{n}"
    c_build.bench(benchmark, "nop_batch", n, ROUNDS, ITERATIONS[n], WARMUP, RING_ENTRIES)
