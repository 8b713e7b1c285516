"""Every torture scenario (tests/torture/scenarios_*.py), each in a fresh interpreter: a crash,
a changed canary, a leaked descriptor, pin or ring, or a wrong exception fails that scenario
alone.  See harness.py for what is checked around each one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import harness
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER = os.path.join(HERE, "run.py")
NAMES = sorted(harness.all_scenarios())


def scenario_command(name: str) -> list[str]:
    """The command that runs scenario ``name`` in a fresh interpreter.

    With SAFERRING_MEMCHECK=1 in the environment the interpreter runs under valgrind memcheck as
    tests/memcheck/memcheck.py runs it (valgrind's files: ``memcheck_stem(name)``); test_scenario
    then also fails on a memory error in saferring's code.  ``make memcheck`` is the quicker way
    to check them all (one valgrind start-up per CPU, not per scenario)."""
    command = [sys.executable, "-X", "faulthandler", RUNNER, name]
    if not os.environ.get("SAFERRING_MEMCHECK"):
        return command
    return _memcheck().wrap(command, memcheck_stem(name))


def memcheck_stem(name: str) -> str:
    """Where valgrind writes scenario ``name``'s files: SAFERRING_MEMCHECK_DIR, else a directory
    in the temporary directory."""
    directory = os.environ.get("SAFERRING_MEMCHECK_DIR") or os.path.join(
        tempfile.gettempdir(), "saferring-memcheck")
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)


def _memcheck() -> Any:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "memcheck"))
    import memcheck

    return memcheck


#: Under the emulated kernel guest (make test-kernel-6.1) a new interpreter takes tens of seconds
#: to start: the scenarios run in children forked from one interpreter instead (run.py --each),
#: still a process each.  Even so a scenario takes 15-60 s there, so the guest runs the modules
#: whose outcome depends on the kernel (cancellation, buffer rings, registered files, what
#: close() meets in flight); the asyncio and concurrency scenarios exercise the library's own
#: logic on top of those, and run on the host in every CI run (the asyncio suites also run in
#: the guest).
IN_KERNEL_GUEST = bool(os.environ.get("SAFERRING_KERNEL_GUEST"))
GUEST_MODULES = ("scenarios_buffers", "scenarios_rings")
GUEST_NAMES = [n for n in NAMES if harness.SCENARIOS[n][0].__module__ in GUEST_MODULES]


@pytest.fixture(scope="module")
def forked_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """Every scenario run once, each in a forked child: name -> (status, its output)."""
    directory = tmp_path_factory.mktemp("torture")
    proc = subprocess.run([sys.executable, "-X", "faulthandler", RUNNER, "--each",
                           str(directory), *GUEST_NAMES], capture_output=True, text=True,
                          timeout=5400)
    runs = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, status = line.split()
            log = directory / f"{name}.log"
            runs[name] = (status, log.read_text(errors="replace") if log.exists() else "")
    assert runs, f"run.py --each ran nothing\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return runs


@pytest.mark.parametrize("name", NAMES)
def test_scenario(name: str, request: pytest.FixtureRequest) -> None:
    if IN_KERNEL_GUEST:
        if name not in GUEST_NAMES:
            pytest.skip("runs on the host only: the library's own logic, and the emulated kernel "
                        "makes each scenario take about a minute")
        status, output = request.getfixturevalue("forked_runs").get(name, ("missing", ""))
        _check(name, int(status) if status.lstrip("-").isdigit() else None, output, "", status)
        return
    memchecked = bool(os.environ.get("SAFERRING_MEMCHECK"))
    proc = subprocess.run(scenario_command(name), capture_output=True, text=True,
                          timeout=1800 if memchecked else 300)
    if memchecked:
        errors = _memcheck().errors_in_our_code(memcheck_stem(name))
        assert not errors, f"memcheck: scenario {name}:\n" + "\n\n".join(errors)
    _check(name, proc.returncode, proc.stdout, proc.stderr, None)


def _check(name: str, code: int | None, stdout: str, stderr: str, status: str | None) -> None:
    """Skip on the skip status; otherwise fail unless the scenario passed every check."""
    if code == harness.SKIP_STATUS:
        pytest.skip(stdout.strip().splitlines()[-1] if stdout.strip() else "skipped")
    how = (status if code is None else f"signal {-code}" if code < 0 else f"exit {code}")
    assert code == 0 and stdout.rstrip().endswith(f"TORTURE-OK {name}"), (
        f"scenario {name} failed ({how})\nstdout:\n{stdout}\nstderr:\n{stderr}")


def test_there_are_at_least_forty_scenarios() -> None:
    assert len(NAMES) >= 40, f"only {len(NAMES)} torture scenarios"
