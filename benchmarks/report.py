"""Summarise pytest-benchmark JSON: per group, each contender's median and its speed vs saferring.

    .venv/bin/python -m pytest benchmarks --benchmark-json=run1.json
    .venv/bin/python benchmarks/report.py run1.json [run2.json ...] [--markdown]

For every benchmark group it prints, per contender and per JSON file (one column block per run),
the median time of one round, the median time per operation (round / ``ops_per_round``, which the
benchmarks record in ``extra_info``), and the throughput ratio to the group's reference contender
(the one whose benchmark set ``extra_info["reference"]``, marked "(ref)"; failing that, the first
test whose name contains "saferring"): ``per_op(ref) / per_op(contender)`` (the median round's
time divided by its ``ops_per_round``), so 2.00x means that
contender completes twice as many operations per second as the reference does.  The reference is
saferring's batch API in the synchronous groups and a plain synchronous ``os.pread``/``os.preadv``
loop in the asyncio groups (``aio-*``).  "vs saferring" is the same ratio against saferring's own
contender in the group (marked "*" when several saferring APIs compete).  The machine description
stored by conftest.py heads the output.

Contenders that time themselves.  A benchmark may set ``extra_info["round_seconds"]``: its own
measurement of the median time of one round (a C program that runs the group's rounds
internally, fio's IOPS turned into the time of one round).  That value replaces
pytest-benchmark's median, which for such a contender times a whole process, start-up included.
These contenders are listed under the table ("own timing").

Cost of safety.  A benchmark may set ``extra_info["pair"]`` to a label, and ``extra_info["raw"]``
on the raw-cffi contender (liburing through cffi: no registry, no pins): within a group, each
label's saferring contender is compared with that label's raw one, one line per label, e.g.
"cost of safety (batched): saferring_batch takes +40.0% the time of raw_cffi_batch".  The labels
in use are "one call per op" (one Python call per request, one submission per round) and
"batched" (one call queues the whole round).  A group with no pairs falls back to comparing
saferring's contender with the first contender named "raw...".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, NamedTuple

REFERENCE = "saferring"


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            value = seconds / scale
            return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"
    return f"{seconds * 1e9:.0f} ns"


def _fmt_ratio(ratio: float) -> str:
    """2.00x, 0.15x; below 0.1 with two significant digits (0.012x), so a slow contender's
    ratio does not print as 0.00x."""
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def machine(path: str) -> dict[str, str]:
    """The machine description benchmarks/conftest.py stored in the JSON (empty for older files)."""
    with open(path) as f:
        data = json.load(f)
    info = data.get("machine_info", {}).get("saferring", {})
    return {str(k): str(v) for k, v in info.items()}


class Entry(NamedTuple):
    """One contender's result in one JSON file."""

    median: float  # seconds per round: extra_info["round_seconds"] if set, else the stats median
    ops: int  # operations per round
    pair: str | None = None  # cost-of-safety label (extra_info["pair"])
    raw: bool = False  # the raw-cffi side of its pair (extra_info["raw"])
    own_timing: bool = False  # median is the contender's own measurement (round_seconds)

    @property
    def per_op(self) -> float:
        """Seconds per operation: what every ratio compares (rounds of fixed-duration contenders,
        wrk's say, hold different numbers of operations)."""
        return self.median / self.ops


def load(path: str) -> dict[str, dict[str, Entry]]:
    """{group: {contender: Entry}} from one JSON file.

    A contender whose benchmark set ``extra_info["reference"]`` gets " (ref)" after its name, and
    one that set ``extra_info["saferring"]`` (saferring's own entry in a group where several
    saferring APIs compete) gets " *"."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, Entry]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        name = bench["name"].removeprefix("test_")
        ops = int(info.get("ops_per_round", 1))
        if info.get("reference"):
            name = f"{name} (ref)"
        if info.get("saferring"):
            name = f"{name} *"
        own = info.get("round_seconds")
        median = float(own) if own is not None else float(bench["stats"]["median"])
        pair = info.get("pair")
        groups.setdefault(bench.get("group") or "(no group)", {})[name] = Entry(
            median, ops, str(pair) if pair else None, bool(info.get("raw")), own is not None)
    return groups


def _reference(contenders: dict[str, Any]) -> str | None:
    """The contender a benchmark marked with extra_info["reference"], else the first saferring."""
    marked = [n for n in contenders if " (ref)" in n]
    names = marked or [n for n in contenders if REFERENCE in n]
    return names[0] if names else None


def _saferring(contenders: list[str]) -> str | None:
    """The contender that speaks for saferring: the one marked " *", else the first (in the order
    the JSON lists them) whose name contains "saferring"."""
    marked = [n for n in contenders if n.endswith(" *")]
    names = marked or [n for n in contenders if REFERENCE in n]
    return names[0] if names else None


def _raw(contenders: list[str]) -> str | None:
    """The raw-cffi baseline (no registry, no pins): the first contender named "raw..."."""
    names = [n for n in contenders if "raw" in n]
    return names[0] if names else None


def _safety_notes(got: dict[str, Entry], ours: str | None, raw: str | None, tag: str) -> list[str]:
    """The cost-of-safety lines of one group in one run: one per pair label (saferring's
    contender vs the raw one with the same label), else saferring's vs the first "raw..."."""
    labels: list[str] = []
    for entry in got.values():
        if entry.pair and entry.pair not in labels:
            labels.append(entry.pair)
    notes = []
    for label in labels:
        raws = [n for n, e in got.items() if e.pair == label and e.raw]
        safe = [n for n, e in got.items() if e.pair == label and not e.raw]
        if len(raws) == 1 and len(safe) == 1:
            cost = got[safe[0]].per_op / got[raws[0]].per_op - 1
            notes.append(f"cost of safety ({label}){tag}: {safe[0]} takes {cost:+.1%} the time "
                         f"of {raws[0]}")
    if not labels and ours and raw and ours in got and raw in got:
        cost = got[ours].per_op / got[raw].per_op - 1
        notes.append(f"cost of safety{tag}: {ours} takes {cost:+.1%} the time of {raw}")
    return notes


def _natural(text: str) -> list[Any]:
    """Sort key that puts nop-batch32 before nop-batch128."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _first_median(runs: list[dict[str, dict[str, Entry]]], group: str, name: str) -> float:
    for run in runs:
        if name in run.get(group, {}):
            return run[group][name].median
    return float("inf")


def report(paths: list[str], markdown: bool) -> str:
    runs = [load(p) for p in paths]
    lines: list[str] = []
    for i, path in enumerate(paths):
        info = machine(path)
        if info:
            tag = f"run{i + 1}: " if len(paths) > 1 else ""
            lines.append(tag + ", ".join(f"{k} {v}" for k, v in info.items()))
    if lines:
        lines.append("")
    group_names: list[str] = []
    for run in runs:
        group_names += [g for g in run if g not in group_names]
    for group in sorted(group_names, key=_natural):
        contenders: list[str] = []
        for run in runs:
            contenders += [c for c in run.get(group, {}) if c not in contenders]
        ref = _reference(dict.fromkeys(contenders))
        ours = _saferring(contenders)
        raw = _raw(contenders)
        # the reference first, then the others fastest first (by the first run that has them)
        order = {n: (n != ref, _first_median(runs, group, n)) for n in contenders}
        contenders.sort(key=order.__getitem__)
        header = ["contender"]
        for i in range(len(runs)):
            tag = f"run{i + 1} " if len(runs) > 1 else ""
            header += [f"{tag}median/round", f"{tag}per op", f"{tag}ops/s", f"{tag}vs ref",
                       f"{tag}vs saferring"]
        rows = []
        for name in contenders:
            row = [name]
            for run in runs:
                got = run.get(group, {}).get(name)
                if got is None:
                    row += ["-"] * 5
                    continue
                median, ops = got.median, got.ops
                base = run.get(group, {}).get(ref) if ref else None
                ratio = _fmt_ratio(base.per_op / got.per_op) if base else "n/a"
                mine = run.get(group, {}).get(ours) if ours else None
                versus = _fmt_ratio(mine.per_op / got.per_op) if mine else "n/a"
                row += [_fmt_time(median), _fmt_time(median / ops), f"{ops / median:,.0f}", ratio,
                        versus]
            rows.append(row)
        notes = []
        for i, run in enumerate(runs):
            tag = f" (run{i + 1})" if len(runs) > 1 else ""
            notes += _safety_notes(run.get(group, {}), ours, raw, tag)
        own = [n for n in contenders if any(n in run.get(group, {}) and run[group][n].own_timing
                                            for run in runs)]
        if own:
            notes.append("own timing (the program's median round, not pytest-benchmark's): "
                         + ", ".join(own))
        title = f"{group}" + ("" if ref else f"  (no contender named *{REFERENCE}*: no ratios)")
        if markdown:
            lines.append(f"**{title}**\n")
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
            lines += ["| " + " | ".join(r) + " |" for r in rows]
        else:
            widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
            lines.append(title)
            for r in [header, *rows]:
                cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                                  strict=True)]
                lines.append("  " + "  ".join(cells))
        if markdown and notes:
            lines.append("")  # GitHub's Markdown would read a line right after a table as a row
        for note in notes:
            lines.append(("" if markdown else "  ") + note + ("  " if markdown else ""))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="files written by pytest --benchmark-json=FILE")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = parser.parse_args(argv)
    print(report(args.json, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
