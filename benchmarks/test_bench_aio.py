"""4 KiB reads from asyncio: saferring.aio against a synchronous loop, aiofiles and threads.

aio-read4k-cached-seq
    The page-cached 64 MiB file, one read at a time (each awaited before the next is issued),
    at random block-aligned offsets.  Reference: ``os_pread``, a plain synchronous ``os.pread``
    loop with no event loop at all.  The asyncio contenders: ``saferring_aring_read`` (``await
    aring.read(fd, buf, off)``, submit="inline"), ``saferring_aring_read_deferred``
    (submit="deferred"), ``saferring_file_pread`` (``await f.pread(4096, off)`` on a
    ``saferring.aio.open`` file: the preadv2(RWF_NOWAIT) fast path),
    ``saferring_file_pread_ring_only`` (``nowait=False``: every read through the ring),
    ``aiofiles`` (seek + read),
    ``run_in_executor`` (``os.pread`` in the default thread pool) and
    ``preadv2_nowait_loop_thread`` (``os.preadv(..., RWF_NOWAIT)`` on the loop thread, the
    executor only when the kernel refuses).  The saferring aring and file contenders also run on
    uvloop (``_uvloop``).  ``asyncio_floor`` is no I/O library but the ceiling of any
    completion-based one: each read suspends its task once (a future the next loop iteration
    resolves), then calls ``os.pread``.

aio-read4k-cached-gather32
    The same contenders, but each batch of 32 reads is issued at once with ``asyncio.gather``
    (the reference is still the plain synchronous loop of 32).

aio-read4k-odirect-gather32
    The 256 MiB O_DIRECT file, page-aligned buffers, 32 reads gathered.  Reference:
    ``os_preadv_qd1`` (synchronous loop, one read at a time).  Contenders: saferring_aring_read
    (inline and deferred), aiofiles (seek + readinto), run_in_executor (os.preadv), and
    preadv2_nowait_loop_thread, which shows that RWF_NOWAIT does not refuse a direct read (on
    ext4, at least; extra_info["executor_fallbacks"] counts refusals): it blocks the loop thread
    for it; saferring_file_pread (an AsyncFile over an O_DIRECT descriptor).

One round is BATCHES_PER_ROUND batches of 32 reads (the same precomputed offset batches for every
contender) run by one ``loop.run_until_complete`` on a loop created once per contender (with
``asyncio.Runner``), so the cost of entering the loop (about 10 us on asyncio, 30 us on uvloop,
measured on the development VM) is spread over 256 (cached) or 128 (O_DIRECT) reads.

Every contender checks every read of every round: the byte count, and the first 8 bytes against
the file's known content at that offset.  After timing, each runs one more batch (into zeroed
buffers, where it has buffers of its own) and all 32 x 4 KiB are compared with the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import mmap
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import saferring
import saferring.aio
from machine import QUICK

SEQ = "aio-read4k-cached-seq"
GATHER = "aio-read4k-cached-gather32"
DIRECT = "aio-read4k-odirect-gather32"
MODES = {"seq": SEQ, "gather32": GATHER}
BATCHES_PER_ROUND = {SEQ: 8, GATHER: 8, DIRECT: 4}
# (rounds, warmup rounds).  Contenders that hand every read to a thread take 20-200 us per cached
# read on a 2-vCPU VM (a round of 256 reads: 5-100 ms), so they get fewer rounds.
ROUNDS = ({SEQ: (40, 3), GATHER: (40, 3), DIRECT: (12, 2)} if QUICK
          else {SEQ: (150, 10), GATHER: (150, 10), DIRECT: (40, 3)})
THREADED_ROUNDS = ({SEQ: (5, 1), GATHER: (6, 1), DIRECT: (12, 2)} if QUICK
                   else {SEQ: (15, 2), GATHER: (20, 2), DIRECT: (40, 3)})
RING_ENTRIES = 256  # as the rings of conftest.py

Batch = Callable[[list[int], list[bytes]], Awaitable[list[Any]]]


class Slots:
    """QD block-sized views of one allocation: a bytearray, or a page-aligned anonymous mmap."""

    def __init__(self, df: Any, aligned: bool) -> None:
        size = df.block * df.qd
        self.mem: Any = mmap.mmap(-1, size) if aligned else bytearray(size)
        whole = memoryview(self.mem)
        self.views = [whole[k * df.block:(k + 1) * df.block] for k in range(df.qd)]
        whole.release()
        self.starts = [k * df.block for k in range(df.qd)]  # checks slice the object itself

    def zero(self) -> None:
        self.mem[:] = bytes(len(self.mem))


@dataclasses.dataclass
class Prepared:
    """What a contender's set-up (run inside its loop) hands to the harness."""

    batch: Batch  # batch(offsets, prefixes): one batch of reads, checked; returns the 32 blocks
    close: Callable[[], Awaitable[None]] | None = None
    zero: Callable[[], None] | None = None  # zero the contender's buffers before the final check
    info: Callable[[], dict[str, Any]] | None = None  # extra_info to record after the run


def _round_source(df: Any, per_round: int) -> Any:
    """A pedantic ``setup``: each call hands the next ``per_round`` batches to the round."""
    starts = itertools.cycle(range(0, len(df.batches) - per_round + 1, per_round))

    def setup() -> tuple[tuple[list[tuple[list[int], list[bytes]]]], dict[str, Any]]:
        i = next(starts)
        return (df.batches[i:i + per_round],), {}

    return setup


def _time(benchmark: Any, df: Any, group: str, one_round: Callable[[Any], None],
          rounds: dict[str, tuple[int, int]], reference: bool = False) -> None:
    per = BATCHES_PER_ROUND[group]
    one_round(df.batches[:per])  # one checked round before timing
    benchmark.group = group
    benchmark.extra_info["ops_per_round"] = per * df.qd
    if reference:
        benchmark.extra_info["reference"] = True
    n, warmup = rounds[group]
    benchmark.pedantic(one_round, setup=_round_source(df, per), rounds=n, warmup_rounds=warmup)


def _fail_read(who: str, n: int, off: int) -> None:
    pytest.fail(f"{who}: the read at offset {off} returned {n} bytes / wrong data")


# -- batches: one read at a time, or 32 gathered ----------------------------------------------------


def _bytes_batch(read_one: Callable[[int], Awaitable[bytes]], df: Any, mode: str, who: str) -> Batch:
    """A batch over ``read_one(offset) -> bytes`` (the contender allocates the result)."""
    block = df.block
    gather = asyncio.gather

    if mode == "seq":
        async def batch(offs: list[int], prefixes: list[bytes]) -> list[Any]:
            out = []
            for off, want in zip(offs, prefixes, strict=True):
                data = await read_one(off)
                if len(data) != block or data[:8] != want:
                    _fail_read(who, len(data), off)
                out.append(data)
            return out
    else:
        async def batch(offs: list[int], prefixes: list[bytes]) -> list[Any]:
            out = await gather(*[read_one(off) for off in offs])
            for data, off, want in zip(out, offs, prefixes, strict=True):
                if len(data) != block or data[:8] != want:
                    _fail_read(who, len(data), off)
            return out

    return batch


def _buffer_batch(read_one: Callable[[Any, int], Awaitable[int]], slots: Slots, df: Any, mode: str,
                  who: str) -> Batch:
    """A batch over ``read_one(view, offset) -> byte count``: read k of a batch lands in slot k."""
    block = df.block
    views, starts, mem = slots.views, slots.starts, slots.mem
    gather = asyncio.gather

    if mode == "seq":
        async def batch(offs: list[int], prefixes: list[bytes]) -> list[Any]:
            for view, start, off, want in zip(views, starts, offs, prefixes, strict=True):
                n = await read_one(view, off)
                if n != block or mem[start:start + 8] != want:
                    _fail_read(who, n, off)
            return views
    else:
        async def batch(offs: list[int], prefixes: list[bytes]) -> list[Any]:
            counts = await gather(*[read_one(v, off) for v, off in zip(views, offs, strict=True)])
            for n, start, off, want in zip(counts, starts, offs, prefixes, strict=True):
                if n != block or mem[start:start + 8] != want:
                    _fail_read(who, n, off)
            return views

    return batch


# -- harnesses --------------------------------------------------------------------------------------


def _bench_async(benchmark: Any, df: Any, group: str, who: str,
                 prepare: Callable[[], Awaitable[Prepared]], *, loop_factory: Any = None,
                 rounds: dict[str, tuple[int, int]] = ROUNDS) -> None:
    """Time ``prepare()``'s batches on one loop (created once), then check a final batch in full."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        loop = runner.get_loop()
        run = loop.run_until_complete
        p = run(prepare())
        batch = p.batch

        async def many(batches: list[tuple[list[int], list[bytes]]]) -> None:
            for offs, prefixes in batches:
                await batch(offs, prefixes)

        def one_round(batches: list[tuple[list[int], list[bytes]]]) -> None:
            run(many(batches))

        try:
            benchmark.extra_info["loop"] = type(loop).__module__.split(".")[0]
            _time(benchmark, df, group, one_round, rounds)
            offs, prefixes = df.batches[-1]
            if p.zero is not None:
                p.zero()
            df.verify_full(offs, run(batch(offs, prefixes)), who)
            if p.info is not None:
                benchmark.extra_info.update(p.info())
        finally:
            if p.close is not None:
                run(p.close())


def _sync_reference(benchmark: Any, df: Any, group: str, aligned: bool) -> None:
    """The reference: a plain synchronous loop, no event loop (os.pread, or os.preadv into
    page-aligned buffers for O_DIRECT)."""
    fd, block = df.fd, df.block
    if not aligned:
        pread = os.pread

        def one_round(batches: list[tuple[list[int], list[bytes]]]) -> None:
            for offs, prefixes in batches:
                for off, want in zip(offs, prefixes, strict=True):
                    data = pread(fd, block, off)
                    if len(data) != block or data[:8] != want:
                        _fail_read("os.pread", len(data), off)

        _time(benchmark, df, group, one_round, ROUNDS, reference=True)
        offs, prefixes = df.batches[-1]
        df.verify_full(offs, [pread(fd, block, off) for off in offs], "os.pread")
        return
    slots = Slots(df, aligned=True)
    vec_lists = [[v] for v in slots.views]
    mem, starts = slots.mem, slots.starts
    preadv = os.preadv

    def one_round_v(batches: list[tuple[list[int], list[bytes]]]) -> None:
        for offs, prefixes in batches:
            for vec, start, off, want in zip(vec_lists, starts, offs, prefixes, strict=True):
                n = preadv(fd, vec, off)
                if n != block or mem[start:start + 8] != want:
                    _fail_read("os.preadv", n, off)

    _time(benchmark, df, group, one_round_v, ROUNDS, reference=True)
    offs, prefixes = df.batches[-1]
    slots.zero()
    one_round_v([(offs, prefixes)])
    df.verify_full(offs, slots.views, "os.preadv")


# -- contenders (each a prepare() coroutine run inside the contender's loop) -----------------------


def _async_ring(submit: str = "inline") -> saferring.aio.AsyncRing:
    try:
        return saferring.aio.AsyncRing(RING_ENTRIES, submit=submit)
    except (saferring.UnsupportedPlatformError, OSError) as exc:
        pytest.skip(f"io_uring is not available here: {exc}")


def _aring_read(df: Any, mode: str, who: str, submit: str, aligned: bool) -> Any:
    async def prepare() -> Prepared:
        aring = _async_ring(submit)
        slots = Slots(df, aligned)
        read_one = functools.partial(aring.read, df.fd)

        async def close() -> None:
            assert aring.in_flight() == 0, f"{who} left operations in flight"
            await aring.aclose()

        return Prepared(_buffer_batch(read_one, slots, df, mode, who), close, slots.zero)

    return prepare


def _file_pread(df: Any, mode: str, who: str, nowait: bool, direct: bool = False) -> Any:
    async def prepare() -> Prepared:
        try:
            saferring.aio.get_ring()  # the loop's shared ring, which the file uses
        except (saferring.UnsupportedPlatformError, OSError) as exc:
            pytest.skip(f"io_uring is not available here: {exc}")
        if direct:  # the file object sees O_DIRECT and reads into page-aligned memory
            fd = os.open(df.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            f = await saferring.aio.open(fd, "rb", nowait=nowait)
        else:
            f = await saferring.aio.open(df.path, "rb", nowait=nowait)
        read_one = functools.partial(f.pread, df.block)

        def info() -> dict[str, Any]:
            # False if the file system refused RWF_NOWAIT and the file fell back to the ring.
            return {"nowait_path_on": getattr(f, "_nowait", None)}

        return Prepared(_bytes_batch(read_one, df, mode, who), f.close, None, info)

    return prepare


def _aiofiles(df: Any, mode: str, who: str, aligned: bool) -> Any:
    """aiofiles (25.1 has no pread): ``await f.seek(off)`` then ``await f.read(4096)``, two trips
    through the default executor.  Seek-then-read on one file object is not atomic, so gathered
    reads each borrow a file object of their own from a pool of 32 (seq: one file object).  For
    O_DIRECT: unbuffered (``buffering=0``), opened with O_DIRECT through ``opener=``, and
    ``readinto`` a page-aligned slot (a ``read`` into a new bytes object fails with EINVAL)."""
    aiofiles = pytest.importorskip("aiofiles")

    async def prepare() -> Prepared:
        count = 1 if mode == "seq" else df.qd
        if aligned:
            def opener(path: str, flags: int) -> int:
                return os.open(path, flags | os.O_DIRECT)

            handles = [await aiofiles.open(df.path, "rb", buffering=0, opener=opener)
                       for _ in range(count)]
        else:
            handles = [await aiofiles.open(df.path, "rb") for _ in range(count)]
        free = list(handles)
        block = df.block

        async def close() -> None:
            for h in handles:
                await h.close()

        if not aligned:
            async def read_bytes(off: int) -> bytes:
                h = free.pop()
                try:
                    await h.seek(off)
                    return await h.read(block)  # type: ignore[no-any-return]
                finally:
                    free.append(h)

            return Prepared(_bytes_batch(read_bytes, df, mode, who), close)

        slots = Slots(df, aligned)

        async def read_into(view: Any, off: int) -> int:
            h = free.pop()
            try:
                await h.seek(off)
                return await h.readinto(view)  # type: ignore[no-any-return]
            finally:
                free.append(h)

        return Prepared(_buffer_batch(read_into, slots, df, mode, who), close, slots.zero)

    return prepare


def _run_in_executor(df: Any, mode: str, who: str, aligned: bool) -> Any:
    """``loop.run_in_executor(None, os.pread, fd, 4096, off)`` (O_DIRECT: ``os.preadv`` into a
    page-aligned slot); gathered, the futures go to ``gather`` as they are (no tasks)."""
    async def prepare() -> Prepared:
        loop = asyncio.get_running_loop()
        if not aligned:
            read_one = functools.partial(loop.run_in_executor, None, os.pread, df.fd, df.block)
            return Prepared(_bytes_batch(read_one, df, mode, who))
        slots = Slots(df, aligned)
        fd, preadv, run_in_executor = df.fd, os.preadv, loop.run_in_executor

        def read_into(view: Any, off: int) -> Awaitable[int]:
            return run_in_executor(None, preadv, fd, [view], off)

        return Prepared(_buffer_batch(read_into, slots, df, mode, who), None, slots.zero)

    return prepare


def _preadv2_nowait(df: Any, mode: str, who: str, aligned: bool) -> Any:
    """``os.preadv(fd, [buf], off, os.RWF_NOWAIT)`` on the loop thread; when the kernel refuses
    (BlockingIOError: the pages are not cached) or reads short, the whole read is redone with
    ``run_in_executor``.  This is how the fastest existing asyncio file library serves
    page-cache hits without a thread."""
    async def prepare() -> Prepared:
        loop = asyncio.get_running_loop()
        slots = Slots(df, aligned)
        fd, block = df.fd, df.block
        preadv, nowait, run_in_executor = os.preadv, os.RWF_NOWAIT, loop.run_in_executor
        fallbacks = [0]

        async def read_one(view: Any, off: int) -> int:
            try:
                n = preadv(fd, [view], off, nowait)
                if n == block:
                    return n
            except BlockingIOError:
                pass
            fallbacks[0] += 1
            return await run_in_executor(None, preadv, fd, [view], off)

        def info() -> dict[str, Any]:
            return {"executor_fallbacks": fallbacks[0]}

        return Prepared(_buffer_batch(read_one, slots, df, mode, who), None, slots.zero, info)

    return prepare


def _asyncio_floor(df: Any, mode: str, who: str) -> Any:
    """Not an I/O library: each read suspends its task once on a future that the next loop
    iteration resolves, then reads with ``os.pread``.  That suspension is the least any
    completion-based asyncio API pays for a read that does not finish at once (a future, a
    trip through the loop, the task's wake-up), so this contender is the ceiling for such
    reads on this machine's asyncio; in gathered batches it adds the 32 tasks that ``gather``
    wraps the coroutines in."""
    async def prepare() -> Prepared:
        loop = asyncio.get_running_loop()
        fd, block, pread = df.fd, df.block, os.pread
        waiting: list[asyncio.Future[None]] = []

        def resolve() -> None:
            for fut in waiting:
                fut.set_result(None)
            waiting.clear()

        async def read_one(off: int) -> bytes:
            fut = loop.create_future()
            waiting.append(fut)
            if len(waiting) == 1:
                loop.call_soon(resolve)
            await fut
            return pread(fd, block, off)

        return Prepared(_bytes_batch(read_one, df, mode, who))

    return prepare


def _uvloop() -> Any:
    return pytest.importorskip("uvloop").new_event_loop


# -- aio-read4k-cached-seq and aio-read4k-cached-gather32 ------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_os_pread(benchmark: Any, cached_file: Any, mode: str) -> None:
    _sync_reference(benchmark, cached_file, MODES[mode], aligned=False)


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_saferring_aring_read(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "saferring_aring_read"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _aring_read(cached_file, mode, who, "inline", aligned=False))


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_saferring_aring_read_deferred(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "saferring_aring_read_deferred"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _aring_read(cached_file, mode, who, "deferred", aligned=False))


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_saferring_aring_read_uvloop(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "saferring_aring_read_uvloop"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _aring_read(cached_file, mode, who, "inline", aligned=False),
                 loop_factory=_uvloop())


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_saferring_file_pread(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "saferring_file_pread"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _file_pread(cached_file, mode, who, nowait=True))


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_saferring_file_pread_ring_only(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "saferring_file_pread_ring_only"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _file_pread(cached_file, mode, who, nowait=False))


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_saferring_file_pread_uvloop(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "saferring_file_pread_uvloop"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _file_pread(cached_file, mode, who, nowait=True), loop_factory=_uvloop())


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_aiofiles(benchmark: Any, cached_file: Any, mode: str) -> None:
    _bench_async(benchmark, cached_file, MODES[mode], "aiofiles",
                 _aiofiles(cached_file, mode, "aiofiles", aligned=False), rounds=THREADED_ROUNDS)


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_run_in_executor(benchmark: Any, cached_file: Any, mode: str) -> None:
    _bench_async(benchmark, cached_file, MODES[mode], "run_in_executor",
                 _run_in_executor(cached_file, mode, "run_in_executor", aligned=False),
                 rounds=THREADED_ROUNDS)


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_preadv2_nowait_loop_thread(benchmark: Any, cached_file: Any, mode: str) -> None:
    who = "preadv2_nowait_loop_thread"
    _bench_async(benchmark, cached_file, MODES[mode], who,
                 _preadv2_nowait(cached_file, mode, who, aligned=False))


@pytest.mark.parametrize("mode", list(MODES))
def test_aio_asyncio_floor(benchmark: Any, cached_file: Any, mode: str) -> None:
    _bench_async(benchmark, cached_file, MODES[mode], "asyncio_floor",
                 _asyncio_floor(cached_file, mode, "asyncio_floor"))


# -- aio-read4k-odirect-gather32 --------------------------------------------------------------------


def test_aio_odirect_os_preadv_qd1(benchmark: Any, direct_file: Any) -> None:
    _sync_reference(benchmark, direct_file, DIRECT, aligned=True)


def test_aio_odirect_saferring_aring_read(benchmark: Any, direct_file: Any) -> None:
    who = "odirect_saferring_aring_read"
    _bench_async(benchmark, direct_file, DIRECT, who,
                 _aring_read(direct_file, "gather32", who, "inline", aligned=True))


def test_aio_odirect_saferring_file_pread(benchmark: Any, direct_file: Any) -> None:
    """``await f.pread(4096, off)`` on an AsyncFile over an O_DIRECT descriptor (it reads into
    page-aligned memory of its own and never tries RWF_NOWAIT there)."""
    who = "odirect_saferring_file_pread"
    _bench_async(benchmark, direct_file, DIRECT, who,
                 _file_pread(direct_file, "gather32", who, nowait=True, direct=True))


def test_aio_odirect_saferring_aring_read_deferred(benchmark: Any, direct_file: Any) -> None:
    who = "odirect_saferring_aring_read_deferred"
    _bench_async(benchmark, direct_file, DIRECT, who,
                 _aring_read(direct_file, "gather32", who, "deferred", aligned=True))


def test_aio_odirect_aiofiles(benchmark: Any, direct_file: Any) -> None:
    _bench_async(benchmark, direct_file, DIRECT, "odirect_aiofiles",
                 _aiofiles(direct_file, "gather32", "odirect_aiofiles", aligned=True),
                 rounds=THREADED_ROUNDS)


def test_aio_odirect_run_in_executor(benchmark: Any, direct_file: Any) -> None:
    _bench_async(benchmark, direct_file, DIRECT, "odirect_run_in_executor",
                 _run_in_executor(direct_file, "gather32", "odirect_run_in_executor", aligned=True),
                 rounds=THREADED_ROUNDS)


def test_aio_odirect_preadv2_nowait_loop_thread(benchmark: Any, direct_file: Any) -> None:
    """What the RWF_NOWAIT technique does on O_DIRECT: the kernel (ext4 here) does not refuse
    a direct read, it performs it synchronously, so the 'non-blocking' call blocks the loop
    thread for the device's latency (queue depth 1).  extra_info["executor_fallbacks"] counts
    the reads it did refuse."""
    who = "odirect_preadv2_nowait_loop_thread"
    _bench_async(benchmark, direct_file, DIRECT, who,
                 _preadv2_nowait(direct_file, "gather32", who, aligned=True))
