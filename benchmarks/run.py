"""Run the benchmark suite and print one table per workload (``make bench``, ``make bench-full``).

    .venv/bin/python benchmarks/run.py                  # quick mode: every workload, small rounds
    .venv/bin/python benchmarks/run.py --full           # the full rounds and sizes (docs/benchmarks.md)
    .venv/bin/python benchmarks/run.py -k "nop or read" # a subset (pytest's -k)

The machine is described first (CPU, cores, kernel, liburing, Python), then pytest-benchmark runs
with ``SAFERRING_BENCH_MODE`` set to ``quick`` or ``full`` (each benchmark module reads it through
``conftest.MODE``), its JSON goes to ``benchmarks/results/<mode>-<date>.json`` (git-ignored), and
``report.py`` prints the tables from that JSON.  Any earlier JSON file can be re-printed, or
compared with a new one, with ``benchmarks/report.py A.json B.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402  (a sibling script, not a package)
from machine import describe  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite in the chosen mode, save its JSON and print the per-workload tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="small rounds: the whole suite in about two minutes (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full rounds and sizes, as quoted in docs/benchmarks.md")
    parser.add_argument("-k", dest="select", help="only the benchmarks matching this pytest -k expression")
    parser.add_argument("--json", help="where to write pytest-benchmark's JSON "
                                       "(default: benchmarks/results/<mode>-<date>.json)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    args = parser.parse_args(argv)
    chosen = args.mode or "quick"
    if args.json:
        out = Path(args.json)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = HERE / "results" / f"{chosen}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    print(f"saferring benchmarks, {chosen} mode")
    for key, value in describe().items():
        print(f"  {key:<10} {value}")
    print(flush=True)

    cmd = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out}", "--benchmark-columns=median"]
    if args.select:
        cmd += ["-k", args.select]
    env = dict(os.environ, SAFERRING_BENCH_MODE=chosen)
    status = subprocess.run(cmd, env=env, check=False).returncode
    if out.exists():
        print()
        print(report.report([str(out)], args.markdown))
        print(f"JSON: {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
