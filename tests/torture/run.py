"""Run torture scenarios.

``python tests/torture/run.py NAME`` runs one in this interpreter (``--list`` prints the names).
``python tests/torture/run.py --each DIR NAME...`` runs each named scenario in a child forked from
this interpreter, after saferring and asyncio were imported once: each child is still a process of
its own (a crash is that scenario's failure), but none pays for a new interpreter's start-up,
which under the emulated kernel guest costs tens of seconds.  Each child's output goes to
``DIR/NAME.log``; a line ``RESULT NAME STATUS`` per scenario is printed as it ends (STATUS: the
exit status, or ``-N`` for signal N, or ``timeout``).

tests/torture/test_torture.py uses the first form on the host and the second in the guest; see
harness.py for the checks and the exit statuses.
"""

from __future__ import annotations

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness

#: A scenario takes seconds; in the emulated guest a few minutes at most.
EACH_TIMEOUT = 600.0


def run_each(directory: str, names: list[str]) -> int:
    """Run every scenario of ``names`` in a forked child, one after the other."""
    import asyncio  # noqa: F401 - imported once here, before the children fork

    import saferring  # noqa: F401

    os.makedirs(directory, exist_ok=True)
    for name in names:
        log = os.path.join(directory, f"{name}.log")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            status = 1
            try:
                status = harness.run(name)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            # A normal interpreter exit (atexit hooks, finalisers), as for a fresh interpreter.
            raise SystemExit(status)
        deadline = time.monotonic() + EACH_TIMEOUT
        while True:
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(wstatus)
                print(f"RESULT {name} {code}", flush=True)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                print(f"RESULT {name} timeout", flush=True)
                break
            time.sleep(0.02)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--list"]:
        print("\n".join(sorted(harness.all_scenarios())))
        sys.exit(0)
    if len(args) >= 2 and args[0] == "--each":
        sys.exit(run_each(args[1], args[2:]))
    if len(args) != 1:
        sys.exit("usage: run.py NAME | --list | --each DIR NAME...")
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.exit(harness.run(args[0]))
