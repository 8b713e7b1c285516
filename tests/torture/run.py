"""Run one torture scenario in this interpreter: ``python tests/torture/run.py NAME``
(``--list`` prints the names).  tests/torture/test_torture.py runs each one this way, in a
subprocess of its own; see harness.py for the checks and the exit statuses."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        print("\n".join(sorted(harness.all_scenarios())))
        sys.exit(0)
    if len(sys.argv) != 2:
        sys.exit("usage: run.py NAME | --list")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.exit(harness.run(sys.argv[1]))
