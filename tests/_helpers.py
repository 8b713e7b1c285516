"""Helpers shared by the tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest


def run_isolated(code: str, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter; fail (with its output) unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        pytest.fail(f"subprocess failed ({how})\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc.stdout
