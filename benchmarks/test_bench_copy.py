"""Copying one large file: examples/file_copy.py's methods side by side with cp and shutil.

copy
    A file of ``$SAFERRING_BENCH_COPY_MB`` MiB (default 1024; 256 in quick mode) of seeded
    pseudo-random bytes on a real disk (conftest's ``disk_dir``: ``$SAFERRING_BENCH_DIR``, else
    ``/var/tmp``), written, fsynced and read once so that it sits in the page cache.  One round
    copies it to a fresh destination in the same directory; the copy lands in the page cache
    (nothing waits for the disk), so this measures the CPU and memory cost of moving the bytes:
    mostly copying them into the destination's newly allocated pages.

Contenders:
  cp                     ``cp SRC DST`` in a subprocess (GNU coreutils uses copy_file_range)
                         (reference)
  shutil_copyfile        ``shutil.copyfile`` (``os.sendfile`` on Linux)
  file_copy_auto         ``file_copy.main(["-q", SRC, DST])``: the program's default choice *
  file_copy_rw           ``--method rw``: read_fixed/write_fixed through 8 registered 1 MiB
                         buffers, pipelined
  file_copy_splice       ``--method splice``: file -> pipe -> file through 8 pipes of 1 MiB
  file_copy_copy_file_range  ``--method copy_file_range``
file_copy's contenders run ``main()`` in-process (a ring is created and closed per round, as a
run of the program does).

``ops_per_round`` is the size in MiB, so report.py's "ops/s" column reads as MiB/s.

Rounds: one warm-up round, then 3 timed rounds per contender (pedantic), each to a fresh
destination; the previous round's destination is checked and deleted (untimed) just before the
next round starts.  The warm-up matters on a VM with free page reporting: memory freed for a
while goes back to the hypervisor, and the first copy that lands in it runs up to ten times
slower, whichever contender it is.  Even so, expect the medians to move by 10-30% between runs
on a shared 2-vCPU machine; compare contenders within a run, over several runs.

Checks: after every round, the destination's size and 64 blocks of 4 KiB (the first, the last
and 62 spread over the file, each stamped with its own offset when the file was made) against
the source's content; after the last round, the whole destination is compared with the source.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import saferring
from machine import QUICK

GROUP = "copy"
MIB = 1 << 20
SIZE_MB = int(os.environ.get("SAFERRING_BENCH_COPY_MB", "256" if QUICK else "1024"))
ROUNDS = 3
SAMPLE = 4096
N_SAMPLES = 64
_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "file_copy.py"


def _load_file_copy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("file_copy", _EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Source:
    """The source file, the bytes of each sampled block, and where to put destinations."""

    def __init__(self, directory: str, size: int) -> None:
        self.directory = directory
        self.path = os.path.join(directory, "copy-source.bin")
        self.size = size
        rng = random.Random(0xC0B1)
        pattern = rng.randbytes(8 * MIB)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, size, MIB):
                # Every 4 KiB block starts with its own offset, so a block copied to the wrong
                # place cannot pass for the right one.
                chunk = bytearray(pattern[off % (8 * MIB):off % (8 * MIB) + MIB])
                for k in range(0, MIB, SAMPLE):
                    chunk[k:k + 8] = (off + k).to_bytes(8, "little")
                os.pwrite(fd, chunk, off)
            os.fsync(fd)
        finally:
            os.close(fd)
        blocks = size // SAMPLE
        picks = {0, blocks - 1, *rng.sample(range(blocks), min(blocks, N_SAMPLES - 2))}
        self.samples = {b * SAMPLE: self._pread(self.path, b * SAMPLE, SAMPLE) for b in sorted(picks)}
        self.compare_whole(self.path, "the source (read back)")  # also puts it in the page cache

    @staticmethod
    def _pread(path: str, off: int, n: int) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, n, off)
        finally:
            os.close(fd)

    def check(self, dst: str, who: str) -> None:
        """Size and sampled blocks of the copy ``dst``."""
        got = os.stat(dst).st_size
        if got != self.size:
            pytest.fail(f"{who}: the copy has {got} bytes, the source {self.size}")
        fd = os.open(dst, os.O_RDONLY)
        try:
            for off, want in self.samples.items():
                if os.pread(fd, SAMPLE, off) != want:
                    pytest.fail(f"{who}: the copy's 4 KiB at offset {off} differ from the source")
        finally:
            os.close(fd)

    def compare_whole(self, dst: str, who: str) -> None:
        """Every byte of ``dst`` against the source (and each block's offset stamp)."""
        a = os.open(self.path, os.O_RDONLY)
        b = os.open(dst, os.O_RDONLY)
        try:
            for off in range(0, self.size, 8 * MIB):
                want, got = os.pread(a, 8 * MIB, off), os.pread(b, 8 * MIB, off)
                if got != want:
                    pytest.fail(f"{who}: the copy differs from the source in the 8 MiB at {off}")
                if int.from_bytes(want[:8], "little") != off:
                    pytest.fail(f"{who}: the source's block at {off} lost its stamp")
            if os.pread(b, 1, self.size):
                pytest.fail(f"{who}: the copy is longer than the source")
        finally:
            os.close(a)
            os.close(b)


@pytest.fixture(scope="module")
def source(disk_dir: str) -> Iterator[Source]:
    """The source file (deleted at the end of the module)."""
    size = SIZE_MB * MIB
    if SIZE_MB < 1:
        pytest.skip(f"SAFERRING_BENCH_COPY_MB must be at least 1, got {SIZE_MB}")
    free = shutil.disk_usage(disk_dir).free
    if free < 3 * size:
        pytest.skip(f"{disk_dir} has {free >> 20} MiB free; the copy benchmark needs "
                    f"{3 * SIZE_MB} MiB (source and a copy, with room to spare)")
    try:
        src = Source(disk_dir, size)
    except OSError as exc:
        pytest.skip(f"cannot write the {SIZE_MB} MiB source file in {disk_dir}: {exc}")
    yield src
    with contextlib.suppress(OSError):
        os.unlink(src.path)


@pytest.fixture(scope="module")
def file_copy() -> ModuleType:
    """examples/file_copy.py, imported by path."""
    try:
        saferring.Ring(8).close()
    except (saferring.UnsupportedPlatformError, OSError) as exc:
        pytest.skip(f"io_uring is not available here: {exc}")
    return _load_file_copy()


def _bench(benchmark: Any, src: Source, who: str, copy: Callable[[str, str], None]) -> None:
    """Time ROUNDS copies, each to a fresh destination, checking each; compare the last in full."""
    dst = os.path.join(src.directory, f"copy-{who}.bin")
    rounds = 0

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        nonlocal rounds
        if rounds:
            src.check(dst, who)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        rounds += 1
        return (), {}

    benchmark.group = GROUP
    benchmark.extra_info["ops_per_round"] = SIZE_MB
    benchmark.extra_info["file_mib"] = SIZE_MB
    try:
        benchmark.pedantic(lambda: copy(src.path, dst), setup=setup, rounds=ROUNDS,
                           warmup_rounds=1)
        src.check(dst, who)
        src.compare_whole(dst, who)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)


def test_copy_cp(benchmark: Any, source: Source) -> None:
    cp = shutil.which("cp")
    if cp is None:
        pytest.skip("no cp command on PATH")

    def copy(s: str, d: str) -> None:
        proc = subprocess.run([cp, s, d], capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode:
            pytest.fail(f"cp exited with {proc.returncode}: {proc.stderr.strip()}")

    benchmark.extra_info["reference"] = True
    _bench(benchmark, source, "cp", copy)


def test_copy_shutil_copyfile(benchmark: Any, source: Source) -> None:
    def copy(s: str, d: str) -> None:
        shutil.copyfile(s, d)

    _bench(benchmark, source, "shutil", copy)


def _file_copy(benchmark: Any, source: Source, module: ModuleType, method: str) -> None:
    main = module.main

    def copy(s: str, d: str) -> None:
        status = main(["-q", "--method", method, s, d])
        if status != 0:
            pytest.fail(f"file_copy.py --method {method} exited with {status}")

    _bench(benchmark, source, f"file_copy-{method}", copy)


def test_copy_file_copy_auto(benchmark: Any, source: Source, file_copy: ModuleType) -> None:
    benchmark.extra_info["saferring"] = True
    _file_copy(benchmark, source, file_copy, "auto")


def test_copy_file_copy_rw(benchmark: Any, source: Source, file_copy: ModuleType) -> None:
    _file_copy(benchmark, source, file_copy, "rw")


def test_copy_file_copy_splice(benchmark: Any, source: Source, file_copy: ModuleType) -> None:
    with saferring.Ring(8) as ring:
        if not ring.features.supports("SPLICE"):
            pytest.skip("the kernel's probe has no IORING_OP_SPLICE (Linux 5.7)")
    _file_copy(benchmark, source, file_copy, "splice")


def test_copy_file_copy_copy_file_range(benchmark: Any, source: Source, file_copy: ModuleType) -> None:
    if not hasattr(os, "copy_file_range"):
        pytest.skip(f"os.copy_file_range does not exist on Python {sys.version.split()[0]} here")
    _file_copy(benchmark, source, file_copy, "copy_file_range")
