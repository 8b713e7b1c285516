"""fio with ioengine=io_uring in the 4 KiB random read groups: a C tool's figure for the same work.

read4k-random-cached-qd32 / read4k-random-odirect-qd32
    ``fio`` reads 4 KiB blocks at random aligned offsets of the same file the other contenders
    read (the page-cached 64 MiB file; the O_DIRECT file with ``--direct=1``), 32 at a time, for
    a fixed time, and reports its own IOPS; ``extra_info["round_seconds"]`` is ``32 / IOPS``,
    the time of one round of 32 reads, which report.py puts in the table.

The options, and why:
  --ioengine=io_uring --rw=randread --bs=4k --iodepth=32   the groups' workload
  --iodepth_batch_submit=32 --iodepth_batch_complete_min=32
      rounds, like the other contenders: submit 32, wait for all 32, repeat (fio's default
      refills the queue as reads complete, a different pattern)
  --norandommap --randrepeat=0   random offsets with replacement, like the precomputed batches
  --invalidate=0   (cached group) keep the file in the page cache; fio drops it by default
  --direct=1       (O_DIRECT group)
  --readonly       fio refuses to write to the file whatever else is set
  --gtod_reduce=1  no clock reads per I/O (the C contender does none either); IOPS are still
                   counted
  --time_based --runtime --ramp_time   a fixed duration after a short untimed start
Left at fio's defaults: no registered buffers or files (``--fixedbufs``, ``--registerfiles``),
no SQ polling thread (``--sqthread_poll``): the other contenders use none of them.

Not verified: fio's randread does not check what it reads (``--verify`` checks only data fio
wrote itself in the same job).  The contender checks what fio can tell: no error, no short
read, some reads done.  Skipped when fio is missing (``make bench-deps`` installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from machine import QUICK

CACHED = "read4k-random-cached-qd32"
DIRECT = "read4k-random-odirect-qd32"
RUNTIME, RAMP = ("1s", "250ms") if QUICK else ("3s", "500ms")


def _fio(benchmark: Any, df: Any, group: str, direct: bool) -> None:
    fio = shutil.which("fio")
    if fio is None:
        pytest.skip("fio is not installed (make bench-deps installs it)")
    qd = df.qd
    cmd = [fio, "--name=saferring-bench", "--ioengine=io_uring", "--rw=randread", f"--bs={df.block}",
           f"--iodepth={qd}", f"--iodepth_batch_submit={qd}", f"--iodepth_batch_complete_min={qd}",
           "--filename=" + df.path.replace(":", "\\:"),  # fio splits file names on ':'
           "--readonly", "--norandommap", "--randrepeat=0", "--gtod_reduce=1", "--time_based",
           f"--runtime={RUNTIME}", f"--ramp_time={RAMP}", "--output-format=json"]
    cmd.append("--direct=1" if direct else "--invalidate=0")
    result: dict[str, Any] = {}

    def once() -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            pytest.fail(f"fio failed ({proc.returncode}): {proc.stderr.strip()}")
        # fio may print warnings before the JSON document
        result.update(json.loads(proc.stdout[proc.stdout.index("{"):]))

    benchmark.group = group
    benchmark.pedantic(once, rounds=1, iterations=1)
    job = result["jobs"][0]
    read = job["read"]
    if job["error"] != 0 or read["short_ios"] != 0 or read["total_ios"] <= 0 or read["iops"] <= 0:
        pytest.fail(f"fio: error {job['error']}, {read['total_ios']} reads, {read['short_ios']} short")
    benchmark.extra_info["round_seconds"] = qd / read["iops"]
    benchmark.extra_info["ops_per_round"] = qd
    benchmark.extra_info["fio_iops"] = read["iops"]
    benchmark.extra_info["fio_reads"] = read["total_ios"]
    benchmark.extra_info["verified"] = False
    benchmark.extra_info["fio_command"] = " ".join(cmd)


def test_cached_fio(benchmark: Any, cached_file: Any) -> None:
    _fio(benchmark, cached_file, CACHED, direct=False)


def test_odirect_fio(benchmark: Any, direct_file: Any) -> None:
    _fio(benchmark, direct_file, DIRECT, direct=True)
