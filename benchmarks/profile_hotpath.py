"""Where a saferring round spends its time, next to the same parts of the raw cffi round.

    .venv/bin/python benchmarks/profile_hotpath.py [--reps N]

Not a pytest module (pytest collects only test_*.py).  It times, in isolation, the parts of the
two rounds the benchmarks measure (nop-batch32 and read4k-random-cached-qd32) and prints the
median cost per operation in nanoseconds.  To split saferring's path it calls private pieces
(``Ring._dispatch``, ``lib.sr_reap``, ``lib.sr_prep_nop``, ``_pinning.writable``) the way
``Ring`` itself does; it only reads saferring, it changes nothing.  Each measurement runs a whole
round so the ring returns to empty, and times only the part named.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import saferring
from saferring import _pinning
from saferring.operation import NopOperation, ReadOperation
from saferring.ring import _OP_READ
from saferring.unsafe import ffi, lib

N = 32
BLOCK = 4096
_clock = time.perf_counter_ns


def measure(part: Callable[[], int], reps: int) -> float:
    """``part()`` runs one round and returns the nanoseconds of the piece it timed; median/op."""
    for _ in range(reps // 10):
        part()
    return statistics.median(part() for _ in range(reps)) / N


def nop_parts(reps: int) -> list[tuple[str, float]]:
    ring = saferring.Ring(256)
    c, cap = ring._c, ring._cq_size
    nop, wait = ring.nop, ring.wait
    span = range(N)
    rows: list[tuple[str, float]] = []

    def whole() -> int:
        t = _clock()
        [nop() for _ in span]
        done = wait(N)
        for op in done:
            if op.result() != 0:
                raise AssertionError
        return _clock() - t

    def queue() -> int:
        t = _clock()
        [nop() for _ in span]
        t = _clock() - t
        wait(N)
        return t

    def construct() -> int:  # NopOperation objects alone (what ring.nop() builds)
        t = _clock()
        [NopOperation(ring, None, 0) for _ in span]
        return _clock() - t

    def prep_call() -> int:  # the cffi call sr_prep_nop alone, user_data outside the registry
        base = 1 << 60
        t = _clock()
        for i in span:
            lib.sr_prep_nop(c, base + i)
        t = _clock() - t
        got = 0
        while got < N:
            got += lib.sr_reap(c, N - got, -1, cap, ring._cq_ud, ring._cq_res, ring._cq_flags)
        return t

    prep_nop_local = lib.sr_prep_nop

    def prep_call_local() -> int:  # the same, the function bound to a local first
        base = 1 << 60
        t = _clock()
        for i in span:
            prep_nop_local(c, base + i)
        t = _clock() - t
        got = 0
        while got < N:
            got += lib.sr_reap(c, N - got, -1, cap, ring._cq_ud, ring._cq_res, ring._cq_flags)
        return t

    def empty_loop() -> int:  # what the timing loop itself costs
        t = _clock()
        for _ in span:
            pass
        return _clock() - t

    def wait_all() -> int:
        [nop() for _ in span]
        t = _clock()
        wait(N)
        return _clock() - t

    def reap_call() -> int:  # lib.sr_reap alone (submit + io_uring_enter + copy of 32 CQEs)
        [nop() for _ in span]
        t = _clock()
        n = lib.sr_reap(c, N, -1, cap, ring._cq_ud, ring._cq_res, ring._cq_flags)
        t = _clock() - t
        ring._dispatch(n)
        ring._ready = []
        return t

    def dispatch() -> int:  # Ring._dispatch(32) alone
        [nop() for _ in span]
        n = lib.sr_reap(c, N, -1, cap, ring._cq_ud, ring._cq_res, ring._cq_flags)
        t = _clock()
        ring._dispatch(n)
        t = _clock() - t
        ring._ready = []
        return t

    def check() -> int:
        [nop() for _ in span]
        done = wait(N)
        t = _clock()
        for op in done:
            if op.result() != 0:
                raise AssertionError
        return _clock() - t

    rows.append(("saferring nop round (whole)", measure(whole, reps)))
    gc.disable()
    rows.append(("  same, gc disabled", measure(whole, reps)))
    gc.enable()
    rows.append(("  ring.nop() x32", measure(queue, reps)))
    rows.append(("    NopOperation(...) alone", measure(construct, reps)))
    rows.append(("    lib.sr_prep_nop call alone", measure(prep_call, reps)))
    rows.append(("      same, sr_prep_nop bound to a local", measure(prep_call_local, reps)))
    rows.append(("    (empty loop of 32, for reference)", measure(empty_loop, reps)))
    rows.append(("  ring.wait(32)", measure(wait_all, reps)))
    rows.append(("    lib.sr_reap call alone", measure(reap_call, reps)))
    rows.append(("    Ring._dispatch(32) alone", measure(dispatch, reps)))
    rows.append(("  op.result() checks", measure(check, reps)))
    ring.close()

    r = ffi.new("struct io_uring *")
    if lib.io_uring_queue_init(256, r, 0) < 0:
        raise OSError("io_uring_queue_init failed")
    get_sqe, prep_nop = lib.io_uring_get_sqe, lib.io_uring_prep_nop
    submit_and_wait, peek = lib.io_uring_submit_and_wait, lib.io_uring_peek_batch_cqe
    advance = lib.io_uring_cq_advance
    cqes = ffi.new("struct io_uring_cqe *[]", N)

    def raw_queue() -> None:
        for i in span:
            sqe = get_sqe(r)
            prep_nop(sqe)
            sqe.user_data = i

    def raw_whole() -> int:
        t = _clock()
        raw_queue()
        submit_and_wait(r, N)
        got = peek(r, cqes, N)
        for j in range(got):
            cqe = cqes[j]
            if cqe.res != 0:
                raise AssertionError
            cqe.user_data  # noqa: B018 - read, as the benchmark does
        advance(r, got)
        return _clock() - t

    def raw_queue_t() -> int:
        t = _clock()
        raw_queue()
        t = _clock() - t
        submit_and_wait(r, N)
        advance(r, peek(r, cqes, N))
        return t

    def raw_enter() -> int:
        raw_queue()
        t = _clock()
        submit_and_wait(r, N)
        t = _clock() - t
        advance(r, peek(r, cqes, N))
        return t

    def raw_reap() -> int:
        raw_queue()
        submit_and_wait(r, N)
        t = _clock()
        got = peek(r, cqes, N)
        for j in range(got):
            cqe = cqes[j]
            if cqe.res != 0:
                raise AssertionError
            cqe.user_data  # noqa: B018
        advance(r, got)
        return _clock() - t

    rows.append(("raw cffi nop round (whole)", measure(raw_whole, reps)))
    rows.append(("  get_sqe+prep_nop+user_data x32", measure(raw_queue_t, reps)))
    rows.append(("  io_uring_submit_and_wait", measure(raw_enter, reps)))
    rows.append(("  peek_batch + read 32 CQEs + advance", measure(raw_reap, reps)))
    lib.io_uring_queue_exit(r)
    return rows


def read_parts(reps: int) -> list[tuple[str, float]]:
    size = 64 << 20
    with tempfile.NamedTemporaryFile(dir="/var/tmp" if os.path.isdir("/var/tmp") else None) as f:
        f.write(os.urandom(size))
        f.flush()
        fd = f.fileno()
        os.pread(fd, size, 0)  # into the page cache
        import random

        rng = random.Random(1)
        batches = [[rng.randrange(size // BLOCK) * BLOCK for _ in range(N)] for _ in range(256)]
        mem = bytearray(N * BLOCK)
        whole_view = memoryview(mem)
        views = [whole_view[k * BLOCK:(k + 1) * BLOCK] for k in range(N)]
        ring = saferring.Ring(256)
        c = ring._c
        read, wait = ring.read, ring.wait
        span = range(N)
        it = iter(batches * (reps * 20 // len(batches) + 10))
        rows: list[tuple[str, float]] = []

        def whole() -> int:
            offs = next(it)
            t = _clock()
            ops = [read(fd, v, o) for v, o in zip(views, offs, strict=True)]
            wait(N)
            for op in ops:
                if op.result() != BLOCK:
                    raise AssertionError
            return _clock() - t

        def queue() -> int:
            offs = next(it)
            t = _clock()
            [read(fd, v, o) for v, o in zip(views, offs, strict=True)]
            t = _clock() - t
            wait(N)
            return t

        def pin() -> int:
            t = _clock()
            [_pinning.writable(v) for v in views]
            return _clock() - t

        def construct() -> int:
            t = _clock()
            [ReadOperation(ring, v, BLOCK) for v in views]
            return _clock() - t

        ptrs = [ffi.from_buffer(v, require_writable=True) for v in views]

        def prep_call() -> int:  # lib.sr_prep alone (9 arguments), user_data outside the registry
            offs = next(it)
            base = 1 << 60
            t = _clock()
            for k in span:
                lib.sr_prep(c, base + k, _OP_READ, fd, ptrs[k], BLOCK, offs[k], 0, 0)
            t = _clock() - t
            got = 0
            while got < N:
                got += lib.sr_reap(c, N - got, -1, ring._cq_size, ring._cq_ud, ring._cq_res,
                                   ring._cq_flags)
            return t

        def wait_all() -> int:
            offs = next(it)
            [read(fd, v, o) for v, o in zip(views, offs, strict=True)]
            t = _clock()
            wait(N)
            return _clock() - t

        def reap_call() -> int:
            offs = next(it)
            [read(fd, v, o) for v, o in zip(views, offs, strict=True)]
            got = 0
            t = 0
            while got < N:
                s = _clock()
                n = lib.sr_reap(c, N - got, -1, ring._cq_size, ring._cq_ud, ring._cq_res,
                                ring._cq_flags)
                t += _clock() - s
                ring._dispatch(n)
                got += n
            ring._ready = []
            return t

        def dispatch() -> int:
            offs = next(it)
            [read(fd, v, o) for v, o in zip(views, offs, strict=True)]
            got = 0
            t = 0
            while got < N:
                n = lib.sr_reap(c, N - got, -1, ring._cq_size, ring._cq_ud, ring._cq_res,
                                ring._cq_flags)
                s = _clock()
                ring._dispatch(n)
                t += _clock() - s
                got += n
            ring._ready = []
            return t

        rows.append(("saferring read round (whole, no data check)", measure(whole, reps)))
        rows.append(("  ring.read() x32", measure(queue, reps)))
        rows.append(("    _pinning.writable (ffi.from_buffer)", measure(pin, reps)))
        rows.append(("    ReadOperation(...) alone", measure(construct, reps)))
        rows.append(("    lib.sr_prep call alone", measure(prep_call, reps)))
        rows.append(("  ring.wait(32) (syscall + 32 x 4 KiB copies)", measure(wait_all, reps)))
        rows.append(("    lib.sr_reap call(s) alone", measure(reap_call, reps)))
        rows.append(("    Ring._dispatch alone", measure(dispatch, reps)))

        r = ffi.new("struct io_uring *")
        if lib.io_uring_queue_init(256, r, 0) < 0:
            raise OSError("io_uring_queue_init failed")
        get_sqe, prep_read = lib.io_uring_get_sqe, lib.io_uring_prep_read
        submit_and_wait, peek = lib.io_uring_submit_and_wait, lib.io_uring_peek_batch_cqe
        advance = lib.io_uring_cq_advance
        cqes = ffi.new("struct io_uring_cqe *[]", N)

        def raw_queue(offs: list[int]) -> None:
            for k in span:
                sqe = get_sqe(r)
                prep_read(sqe, fd, ptrs[k], BLOCK, offs[k])
                sqe.user_data = k

        def raw_whole() -> int:
            offs = next(it)
            t = _clock()
            raw_queue(offs)
            submit_and_wait(r, N)
            got = peek(r, cqes, N)
            for j in range(got):
                cqe = cqes[j]
                if cqe.res != BLOCK:
                    raise AssertionError
                cqe.user_data  # noqa: B018
            advance(r, got)
            return _clock() - t

        def raw_queue_t() -> int:
            offs = next(it)
            t = _clock()
            raw_queue(offs)
            t = _clock() - t
            submit_and_wait(r, N)
            advance(r, peek(r, cqes, N))
            return t

        def raw_enter() -> int:
            raw_queue(next(it))
            t = _clock()
            submit_and_wait(r, N)
            t = _clock() - t
            advance(r, peek(r, cqes, N))
            return t

        rows.append(("raw cffi read round (whole, no data check)", measure(raw_whole, reps)))
        rows.append(("  get_sqe+prep_read+user_data x32", measure(raw_queue_t, reps)))
        rows.append(("  io_uring_submit_and_wait (32 x 4 KiB copies)", measure(raw_enter, reps)))
        lib.io_uring_queue_exit(r)
        ring.close()
        views.clear()
        whole_view.release()
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3000, help="rounds per measurement")
    args = parser.parse_args()
    for title, rows in (("nop-batch32", nop_parts(args.reps)),
                        ("read4k-random-cached-qd32", read_parts(args.reps))):
        print(f"\n{title}: median ns per operation (rounds of {N})")
        for name, ns in rows:
            print(f"  {name:<52} {ns:8.0f}")


if __name__ == "__main__":
    main()
