"""Every torture scenario (tests/torture/scenarios_*.py), each in a fresh interpreter: a crash,
a changed canary, a leaked descriptor, pin or ring, or a wrong exception fails that scenario
alone.  See harness.py for what is checked around each one."""

from __future__ import annotations

import os
import subprocess
import sys

import harness
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "run.py")
NAMES = sorted(harness.all_scenarios())


def scenario_command(name: str) -> list[str]:
    """The command that runs scenario ``name`` in a fresh interpreter."""
    return [sys.executable, "-X", "faulthandler", RUNNER, name]


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name: str) -> None:
    proc = subprocess.run(scenario_command(name), capture_output=True, text=True, timeout=300)
    if proc.returncode == harness.SKIP_STATUS:
        pytest.skip(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "skipped")
    how = (f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}")
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith(f"TORTURE-OK {name}"), (
        f"scenario {name} failed ({how})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")


def test_there_are_at_least_forty_scenarios() -> None:
    assert len(NAMES) >= 40, f"only {len(NAMES)} torture scenarios"
