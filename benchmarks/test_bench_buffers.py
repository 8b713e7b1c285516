"""Registered buffers and multishot receive, each side by side with the ways users would do it.

read128k-seq-cached-qd32 / read128k-seq-odirect-qd32
    32 reads of 128 KiB per round at consecutive offsets (cycling through the file), from the
    page-cached 64 MiB file or the 256 MiB O_DIRECT file.  Contenders: saferring's
    ``read_fixed_many`` into leased pool buffers (the reference), saferring's ``read_many`` into
    a plain mmap, raw liburing ``READ_FIXED`` through cffi (registered buffers, no registry),
    the same a round at a time (``raw_cffi_read_fixed_batch``: the 32 SQEs prepared once, offsets
    patched and copied into the SQ with one memmove per round; conftest.RawBatch), an
    ``os.preadv`` loop into preallocated buffers, and ``c`` (benchmarks/c/read_qd.c with
    registered buffers, timed by the program).  Cost of safety (report.py, pair "batched"):
    ``read_fixed_many`` against ``raw_cffi_read_fixed_batch``.  Every read is checked (byte count
    and first 8 bytes against the file); after timing, one more round is compared in full.

echo1k-recv
    An echo over 127.0.0.1 TCP, one 1 KiB message at a time, 32 per round: the client (plain
    blocking socket) sends, saferring's server side receives and sends the bytes back, the client
    checks every echoed byte.  Contenders: ``recv_multishot`` from a buffer ring, sending each
    received Buffer back (the reference), and one ``ring.recv`` into a bytearray per message.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import saferring
from machine import QUICK
from saferring.unsafe import ffi, lib

BLOCK = 128 << 10
QD = 32
CACHED = "read128k-seq-cached-qd32"
DIRECT = "read128k-seq-odirect-qd32"
ECHO = "echo1k-recv"
ROUNDS = {CACHED: 100, DIRECT: 20, ECHO: 60} if QUICK else {CACHED: 400, DIRECT: 60, ECHO: 300}
WARMUP = {CACHED: 5, DIRECT: 2, ECHO: 5} if QUICK else {CACHED: 20, DIRECT: 5, ECHO: 20}
MESSAGE = 1024
BATCHED = "batched"  # cost-of-safety pair of the 128 KiB groups (report.py)


class Rounds:
    """Each round's offsets (QD consecutive 128 KiB blocks, cycling) and expected prefixes."""

    def __init__(self, df: Any) -> None:
        self.df = df
        nblocks = df.size // BLOCK
        self.batches = []
        for start in range(0, nblocks, QD):
            offs = [((start + k) % nblocks) * BLOCK for k in range(QD)]
            self.batches.append((offs, [df.content[o:o + 8] for o in offs]))
        self.next = 0

    def setup(self) -> tuple[tuple[list[int], list[bytes]], dict[str, Any]]:
        batch = self.batches[self.next % len(self.batches)]
        self.next += 1
        return batch, {}

    def verify(self, offs: list[int], blocks: list[bytes], who: str) -> None:
        for off, blk in zip(offs, blocks, strict=True):
            if blk != self.df.content[off:off + BLOCK]:
                pytest.fail(f"{who}: the 128 KiB read at offset {off} differs from the file")


def _run(benchmark: Any, group: str, rounds: Rounds, one_round: Any, final: Any, who: str) -> None:
    offs, prefixes = rounds.batches[0]
    one_round(offs, prefixes)
    benchmark.group = group
    benchmark.extra_info["ops_per_round"] = QD
    benchmark.pedantic(one_round, setup=rounds.setup, rounds=ROUNDS[group],
                       warmup_rounds=WARMUP[group])
    offs, prefixes = rounds.batches[-1]
    rounds.verify(offs, final(offs, prefixes), who)


def _saferring_fixed(benchmark: Any, ring: saferring.Ring, df: Any, group: str) -> None:
    rounds = Rounds(df)
    with saferring.BufferPool(ring, QD, BLOCK) as pool:
        bufs = [pool.lease() for _ in range(QD)]
        fd, read_fixed_many, wait = df.fd, ring.read_fixed_many, ring.wait
        full = [BLOCK] * QD

        def one_round(offs: list[int], prefixes: list[bytes]) -> None:
            batch = read_fixed_many(fd, bufs, offs)
            if wait(1) != [batch] or batch.result() != full:
                pytest.fail("saferring: read_fixed_many failed")
            for buf, want in zip(bufs, prefixes, strict=True):
                with buf.view() as view:
                    if view[:8] != want:
                        pytest.fail("saferring: read_fixed placed wrong data")

        def final(offs: list[int], prefixes: list[bytes]) -> list[bytes]:
            one_round(offs, prefixes)
            return [buf.tobytes() for buf in bufs]

        benchmark.extra_info["reference"] = True
        benchmark.extra_info["pair"] = BATCHED
        _run(benchmark, group, rounds, one_round, final, "saferring read_fixed_many")
        for buf in bufs:
            buf.release()


def _saferring_read_many(benchmark: Any, ring: saferring.Ring, df: Any, group: str) -> None:
    rounds = Rounds(df)
    mem = mmap.mmap(-1, QD * BLOCK)
    fd, read_many, wait = df.fd, ring.read_many, ring.wait
    starts = [k * BLOCK for k in range(QD)]
    full = [BLOCK] * QD

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        batch = read_many(fd, mem, offs, BLOCK)
        if wait(1) != [batch] or batch.result() != full:
            pytest.fail("saferring: read_many failed")
        for start, want in zip(starts, prefixes, strict=True):
            if mem[start:start + 8] != want:
                pytest.fail("saferring: read_many placed wrong data")

    def final(offs: list[int], prefixes: list[bytes]) -> list[bytes]:
        one_round(offs, prefixes)
        return [mem[s:s + BLOCK] for s in starts]

    _run(benchmark, group, rounds, one_round, final, "saferring read_many")


def _raw_fixed(benchmark: Any, r: Any, df: Any, group: str) -> None:
    rounds = Rounds(df)
    mem = mmap.mmap(-1, QD * BLOCK)
    base = ffi.from_buffer(mem)
    vecs = ffi.new("struct iovec[]", QD)
    for k in range(QD):
        vecs[k].iov_base = base + k * BLOCK
        vecs[k].iov_len = BLOCK
    rc = lib.io_uring_register_buffers(r, vecs, QD)
    if rc < 0:
        pytest.skip(f"io_uring_register_buffers failed: {os.strerror(-rc)}")
    ptrs = [base + k * BLOCK for k in range(QD)]
    starts = [k * BLOCK for k in range(QD)]
    get_sqe, prep = lib.io_uring_get_sqe, lib.io_uring_prep_read_fixed
    submit_and_wait, peek_batch = lib.io_uring_submit_and_wait, lib.io_uring_peek_batch_cqe
    cq_advance, fd = lib.io_uring_cq_advance, df.fd
    cqes = ffi.new("struct io_uring_cqe *[]", QD)
    span = range(QD)

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        for k in span:
            sqe = get_sqe(r)
            prep(sqe, fd, ptrs[k], BLOCK, offs[k], k)
            sqe.user_data = k
        if submit_and_wait(r, QD) < 0:
            pytest.fail("raw: submit failed")
        done = 0
        while done < QD:
            got = peek_batch(r, cqes, QD)
            for j in range(got):
                cqe = cqes[j]
                k = cqe.user_data
                if cqe.res != BLOCK or mem[starts[k]:starts[k] + 8] != prefixes[k]:
                    pytest.fail(f"raw: read_fixed {k} returned {cqe.res} / wrong data")
            cq_advance(r, got)
            done += got
            if done < QD and submit_and_wait(r, QD - done) < 0:
                pytest.fail("raw: wait failed")

    def final(offs: list[int], prefixes: list[bytes]) -> list[bytes]:
        one_round(offs, prefixes)
        return [mem[s:s + BLOCK] for s in starts]

    try:
        _run(benchmark, group, rounds, one_round, final, "raw READ_FIXED")
    finally:
        lib.io_uring_unregister_buffers(r)


def _raw_fixed_batch(benchmark: Any, rb: Any, df: Any, group: str) -> None:
    rounds = Rounds(df)
    r = rb.r
    mem = mmap.mmap(-1, QD * BLOCK)
    base = ffi.from_buffer(mem)
    vecs = ffi.new("struct iovec[]", QD)
    for k in range(QD):
        vecs[k].iov_base = base + k * BLOCK
        vecs[k].iov_len = BLOCK
    rc = lib.io_uring_register_buffers(r, vecs, QD)
    if rc < 0:
        pytest.skip(f"io_uring_register_buffers failed: {os.strerror(-rc)}")
    words, sqes = rb.templates(QD)
    for k in range(QD):
        lib.io_uring_prep_read_fixed(sqes + k, df.fd, base + k * BLOCK, BLOCK, 0, k)
        sqes[k].user_data = k
    queue, reap = rb.queuer(QD), rb.reaper(QD)
    submit_and_wait = lib.io_uring_submit_and_wait
    starts = [k * BLOCK for k in range(QD)]
    full = array("i", [BLOCK] * QD)
    want_sum = sum(range(QD))

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        words[1::8] = array("Q", offs)  # word 1 of each 64-byte SQE is its file offset
        queue(words)
        if submit_and_wait(r, QD) < 0:
            pytest.fail("raw batch: submit failed")
        cqes = reap()  # int32 words, 4 per CQE: user_data low, high, res, flags
        if cqes[2::4] != full or sum(cqes[0::4]) != want_sum:
            pytest.fail(f"raw batch: results {cqes[2::4].tolist()}, user_data {cqes[0::4].tolist()}")
        for start, want in zip(starts, prefixes, strict=True):
            if mem[start:start + 8] != want:
                pytest.fail("raw batch: read_fixed placed wrong data")

    def final(offs: list[int], prefixes: list[bytes]) -> list[bytes]:
        mem[:] = bytes(len(mem))
        one_round(offs, prefixes)
        return [mem[s:s + BLOCK] for s in starts]

    benchmark.extra_info.update(pair=BATCHED, raw=True)
    try:
        _run(benchmark, group, rounds, one_round, final, "raw READ_FIXED batch")
    finally:
        lib.io_uring_unregister_buffers(r)


def _c(benchmark: Any, c_build: Any, tmp: Path, df: Any, group: str, direct: bool) -> None:
    benchmark.group = group
    c_build.bench_reads(benchmark, tmp, df, Rounds(df).batches, BLOCK, direct=direct, fixed=True,
                        rounds=ROUNDS[group], warmup=WARMUP[group])


def _os_preadv(benchmark: Any, df: Any, group: str) -> None:
    rounds = Rounds(df)
    mem = mmap.mmap(-1, QD * BLOCK)
    whole = memoryview(mem)
    vecs = [[whole[k * BLOCK:(k + 1) * BLOCK]] for k in range(QD)]
    starts = [k * BLOCK for k in range(QD)]
    fd, preadv = df.fd, os.preadv

    def one_round(offs: list[int], prefixes: list[bytes]) -> None:
        for vec, start, off, want in zip(vecs, starts, offs, prefixes, strict=True):
            if preadv(fd, vec, off) != BLOCK or mem[start:start + 8] != want:
                pytest.fail(f"os.preadv: short read / wrong data at {off}")

    def final(offs: list[int], prefixes: list[bytes]) -> list[bytes]:
        one_round(offs, prefixes)
        return [mem[s:s + BLOCK] for s in starts]

    _run(benchmark, group, rounds, one_round, final, "os.preadv")


# -- read128k-seq-cached-qd32 ----------------------------------------------------------------------


def test_cached128k_saferring_read_fixed(benchmark: Any, ring: saferring.Ring,
                                         cached_file: Any) -> None:
    _saferring_fixed(benchmark, ring, cached_file, CACHED)


def test_cached128k_saferring_read_many(benchmark: Any, ring: saferring.Ring,
                                        cached_file: Any) -> None:
    _saferring_read_many(benchmark, ring, cached_file, CACHED)


def test_cached128k_raw_cffi_read_fixed(benchmark: Any, raw_ring: Any, cached_file: Any) -> None:
    _raw_fixed(benchmark, raw_ring, cached_file, CACHED)


def test_cached128k_raw_cffi_read_fixed_batch(benchmark: Any, raw_batch: Any,
                                              cached_file: Any) -> None:
    _raw_fixed_batch(benchmark, raw_batch, cached_file, CACHED)


def test_cached128k_c(benchmark: Any, c_build: Any, tmp_path: Path, cached_file: Any) -> None:
    _c(benchmark, c_build, tmp_path, cached_file, CACHED, direct=False)


def test_cached128k_os_preadv(benchmark: Any, cached_file: Any) -> None:
    _os_preadv(benchmark, cached_file, CACHED)


# -- read128k-seq-odirect-qd32 ---------------------------------------------------------------------


def test_odirect128k_saferring_read_fixed(benchmark: Any, ring: saferring.Ring,
                                          direct_file: Any) -> None:
    _saferring_fixed(benchmark, ring, direct_file, DIRECT)


def test_odirect128k_saferring_read_many(benchmark: Any, ring: saferring.Ring,
                                         direct_file: Any) -> None:
    _saferring_read_many(benchmark, ring, direct_file, DIRECT)


def test_odirect128k_raw_cffi_read_fixed(benchmark: Any, raw_ring: Any, direct_file: Any) -> None:
    _raw_fixed(benchmark, raw_ring, direct_file, DIRECT)


def test_odirect128k_raw_cffi_read_fixed_batch(benchmark: Any, raw_batch: Any,
                                               direct_file: Any) -> None:
    _raw_fixed_batch(benchmark, raw_batch, direct_file, DIRECT)


def test_odirect128k_c(benchmark: Any, c_build: Any, tmp_path: Path, direct_file: Any) -> None:
    _c(benchmark, c_build, tmp_path, direct_file, DIRECT, direct=True)


def test_odirect128k_os_preadv_qd1(benchmark: Any, direct_file: Any) -> None:
    _os_preadv(benchmark, direct_file, DIRECT)


# -- echo1k-recv --------------------------------------------------------------------------------


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server side) of one TCP connection over 127.0.0.1, Nagle off both ways."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        client = socket.create_connection(ls.getsockname())
        server, _ = ls.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    yield client, server
    client.close()
    server.close()


def _echo(benchmark: Any, serve_one: Any, client: socket.socket, who: str) -> None:
    rng = random.Random(7)
    messages = [rng.randbytes(MESSAGE) for _ in range(QD)]
    back = bytearray(MESSAGE)
    view = memoryview(back)

    def one_round() -> None:
        for msg in messages:
            client.sendall(msg)
            serve_one()
            got = 0
            while got < MESSAGE:
                n = client.recv_into(view[got:])
                if n == 0:
                    pytest.fail(f"{who}: the connection closed")
                got += n
            if back != msg:
                pytest.fail(f"{who}: the echo differs from the message")

    one_round()
    benchmark.group = ECHO
    benchmark.extra_info["ops_per_round"] = QD
    benchmark.pedantic(one_round, rounds=ROUNDS[ECHO], warmup_rounds=WARMUP[ECHO])


def test_echo_saferring_recv_multishot(benchmark: Any, ring: saferring.Ring,
                                       tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    with saferring.BufferRing(ring, 64, 4096) as buffers:
        op = ring.recv_multishot(server, buffers)
        wait, send, run = ring.wait, ring.send, ring.run

        def serve_one() -> None:
            got = 0
            while got < MESSAGE:
                wait(1)
                for buf in op.take():
                    got += buf.nbytes
                    if run(send(server, buf)) != buf.nbytes:
                        pytest.fail("saferring: short send")
                    buf.release()

        benchmark.extra_info["reference"] = True
        _echo(benchmark, serve_one, client, "saferring recv_multishot")
        op.cancel()
        ring.wait(1, timeout=5)
        for buf in op.take():
            buf.release()


def test_echo_saferring_recv_per_message(benchmark: Any, ring: saferring.Ring,
                                         tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    data = bytearray(4096)
    view = memoryview(data)
    recv, send, run = ring.recv, ring.send, ring.run

    def serve_one() -> None:
        got = 0
        while got < MESSAGE:
            n = run(recv(server, data))
            if n <= 0:
                pytest.fail("saferring: the connection closed")
            got += n
            if run(send(server, view[:n])) != n:
                pytest.fail("saferring: short send")

    _echo(benchmark, serve_one, client, "saferring recv per message")
