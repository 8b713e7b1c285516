"""The torture scenarios named on the command line, each in a child forked from this process:
``python tests/memcheck/torture_forks.py [--time-limit SECONDS] [--module FILE.py]... NAME...``.

memcheck.py runs this under valgrind.  The scenario modules (and saferring) are imported once,
here, before any ring exists, with tests/_helpers.py (which harness.run imports for its kernel
checks: it brings pytest); each child then starts from that state, as ``run.py NAME`` would in a
fresh interpreter, without paying valgrind's start-up and the imports again (seconds per scenario
under valgrind).  valgrind keeps each forked child's errors apart (its own document in
the XML output, with its pid); the lines printed here map each child's pid to its scenario:

    MEMCHECK-BEGIN NAME
    ... the scenario's own output ...
    MEMCHECK-SCENARIO NAME pid=PID status=STATUS cpu=SECONDS wall=SECONDS

STATUS is harness.run's exit status (0 passed, 77 skipped, else failed; negative: killed by
that signal), or ``timeout`` when the child was killed at the time limit.
"""

from __future__ import annotations

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "torture"))

import harness

# harness.run imports _helpers in every scenario, and with it pytest: seconds under valgrind.
import _helpers  # noqa: F401


def load_module(path: str) -> None:
    """Import a scenario module from outside tests/torture (the memcheck self-test's)."""
    directory, filename = os.path.split(os.path.abspath(path))
    sys.path.insert(0, directory)
    __import__(os.path.splitext(filename)[0])


def run_forked(name: str, time_limit: float) -> tuple[int, str, float, float]:
    """Run ``name`` in a forked child, in a process group of its own; its pid, status, and the CPU
    seconds it (and what it waited for) used and the wall seconds it took.  Past ``time_limit``
    the group is killed."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.setpgid(0, 0)
            status = harness.run(name)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            # os._exit: the child must not run the parent's atexit handlers or unwind into the
            # loop below (it would go on to run the next scenario itself).
            os._exit(status)
    start = time.monotonic()
    deadline = start + time_limit
    timed_out = False
    while True:
        done, wait_status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if not timed_out and time.monotonic() > deadline:
            timed_out = True
            for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
                try:
                    target()
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    status = "timeout" if timed_out else str(os.waitstatus_to_exitcode(wait_status))
    return pid, status, usage.ru_utime + usage.ru_stime, time.monotonic() - start


def main(args: list[str]) -> int:
    names = []
    time_limit = float("inf")
    while args:
        arg = args.pop(0)
        if arg == "--module":
            load_module(args.pop(0))
        elif arg == "--time-limit":
            time_limit = float(args.pop(0))
        else:
            names.append(arg)
    scenarios = harness.all_scenarios()
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        print(f"no such scenario: {', '.join(unknown)}", file=sys.stderr)
        return 2
    for name in names:
        print(f"MEMCHECK-BEGIN {name}", flush=True)
        pid, status, cpu, wall = run_forked(name, time_limit)
        print(f"MEMCHECK-SCENARIO {name} pid={pid} status={status} cpu={cpu:.2f} wall={wall:.2f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
