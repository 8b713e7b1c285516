"""Summarise pytest-benchmark JSON: per group, each contender's median and its speed vs saferring.

    .venv/bin/python -m pytest benchmarks --benchmark-json=run1.json
    .venv/bin/python benchmarks/report.py run1.json [run2.json ...] [--markdown]

For every benchmark group it prints, per contender and per JSON file (one column block per run),
the median time of one round, the median time per operation (round / ``ops_per_round``, which the
benchmarks record in ``extra_info``), and the throughput ratio to the group's reference contender
(the one whose benchmark set ``extra_info["reference"]``, marked "(ref)"; failing that, the first
test whose name contains "saferring"): ``median(ref) / median(contender)``, so 2.00x means that
contender completes twice as many operations per second as the reference does.  The reference is
saferring's batch API in the synchronous groups and a plain synchronous ``os.pread``/``os.preadv``
loop in the asyncio groups (``aio-*``).  "vs saferring" is the same ratio against saferring's own
contender in the group (marked "*" when several saferring APIs compete), and where the group has a
raw-cffi baseline (a contender named "raw..."), a "cost of safety" line gives how much longer
saferring's round takes than the raw one.  The machine description stored by conftest.py heads
the output.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

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


def load(path: str) -> dict[str, dict[str, tuple[float, int]]]:
    """{group: {contender: (median seconds per round, ops per round)}} from one JSON file.

    A contender whose benchmark set ``extra_info["reference"]`` gets " (ref)" after its name, and
    one that set ``extra_info["saferring"]`` (saferring's own entry in a group where several
    saferring APIs compete) gets " *"."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, tuple[float, int]]] = {}
    for bench in data.get("benchmarks", []):
        name = bench["name"].removeprefix("test_")
        ops = int(bench.get("extra_info", {}).get("ops_per_round", 1))
        if bench.get("extra_info", {}).get("reference"):
            name = f"{name} (ref)"
        if bench.get("extra_info", {}).get("saferring"):
            name = f"{name} *"
        groups.setdefault(bench.get("group") or "(no group)", {})[name] = (
            float(bench["stats"]["median"]), ops)
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


def _natural(text: str) -> list[Any]:
    """Sort key that puts nop-batch32 before nop-batch128."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _first_median(runs: list[dict[str, dict[str, tuple[float, int]]]], group: str, name: str) -> float:
    for run in runs:
        if name in run.get(group, {}):
            return run[group][name][0]
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
        contenders.sort(key=lambda n, g=group: (n != ref, _first_median(runs, g, n)))
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
                median, ops = got
                base = run.get(group, {}).get(ref) if ref else None
                ratio = _fmt_ratio(base[0] / median) if base else "n/a"
                mine = run.get(group, {}).get(ours) if ours else None
                versus = _fmt_ratio(mine[0] / median) if mine else "n/a"
                row += [_fmt_time(median), _fmt_time(median / ops), f"{ops / median:,.0f}", ratio,
                        versus]
            rows.append(row)
        notes = []
        for i, run in enumerate(runs):
            got = run.get(group, {})
            if ours and raw and ours in got and raw in got:
                cost = got[ours][0] / got[raw][0] - 1
                tag = f" (run{i + 1})" if len(runs) > 1 else ""
                notes.append(f"cost of safety{tag}: {ours} takes {cost:+.1%} the time of {raw}")
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
