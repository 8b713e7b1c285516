"""A short tour of saferring, run by ``make demo``: what this kernel offers, a verified file copy
with a progress bar, and an echo round trip with the server's per-second statistics.

    python examples/tour.py [--size MiB] [--seconds S] [--dir DIR]

Each step runs one of the example programs beside this file (``file_copy.py``,
``echo_server.py``, ``echo_client.py``) the way a user would, so the tour doubles as a smoke test
of the examples.  Nothing is left behind: the copy goes to a temporary directory that is removed
at the end, and the echo server stops on its own (``--duration``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = "tour.py"


def _step(title: str) -> None:
    print(f"\n== {title} ==", flush=True)


def _write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = min(left, 1 << 20)
            f.write(os.urandom(chunk))
            left -= chunk


def _run(args: list[str]) -> int:
    """One example program, in a child process with this interpreter, output passed through."""
    return subprocess.run([sys.executable, *args], check=False).returncode


def copy_step(size_mib: int, directory: str | None) -> int:
    """Copy a file of random bytes with file_copy.py --verify, then show that the copy is exact."""
    _step(f"file_copy.py: {size_mib} MiB, with progress and checksum verification")
    with tempfile.TemporaryDirectory(prefix="saferring-tour-", dir=directory) as tmp:
        src, dst = os.path.join(tmp, "source.bin"), os.path.join(tmp, "copy.bin")
        _write_random(src, size_mib << 20)
        started = time.perf_counter()
        status = _run([os.path.join(HERE, "file_copy.py"), "--verify", "--progress", src, dst])
        took = time.perf_counter() - started
        if status != 0:
            print(f"{PROG}: file_copy.py exited with status {status}", file=sys.stderr)
            return status
        a, b = os.stat(src), os.stat(dst)
        kept = a.st_mode == b.st_mode and a.st_mtime_ns == b.st_mtime_ns
        print(f"copied and verified {size_mib} MiB in {took:.2f} s; "
              f"mode and modification time kept: {'yes' if kept else 'NO'}")
        if not kept or a.st_size != b.st_size:
            print(f"{PROG}: the copy differs from its source in size, mode or mtime", file=sys.stderr)
            return 1
    return 0


def echo_step(seconds: float) -> int:
    """Start echo_server.py --stats, load it with echo_client.py, show both sides' figures."""
    _step(f"echo_server.py --stats with echo_client.py: 10 connections, 1 KiB, {seconds:g} s")
    server = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "echo_server.py"), "--port", "0", "--stats",
         "--duration", str(seconds + 2)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        first = server.stdout.readline().strip()
        if not first.startswith("listening on "):
            print(f"{PROG}: the echo server did not start (it said {first!r})", file=sys.stderr)
            return 1
        print(f"server: {first}", flush=True)
        port = first.rsplit(":", 1)[1]
        status = _run([os.path.join(HERE, "echo_client.py"), "--port", port, "--connections", "10",
                       "--size", "1024", "--duration", str(seconds)])
        rest, _ = server.communicate(timeout=seconds + 30)
        for line in rest.splitlines():
            print(f"server: {line}")
        if server.returncode != 0:
            print(f"{PROG}: the echo server exited with status {server.returncode}", file=sys.stderr)
            return server.returncode or 1
        return status
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the three steps; the exit status is the first failing step's, else 0."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, metavar="MiB",
                        help="size of the file to copy (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="how long the echo client runs (default: %(default)s)")
    parser.add_argument("--dir", help="where the copy step writes (default: the system's temporary "
                                      "directory)")
    args = parser.parse_args(argv)
    if args.size < 1 or args.seconds <= 0:
        parser.error("--size and --seconds must be positive")
    if args.dir is not None and not os.path.isdir(args.dir):
        print(f"{PROG}: {args.dir}: not a directory", file=sys.stderr)
        return 1
    try:
        _step("python -m saferring info")
        status = _run(["-m", "saferring", "info"])
        if status != 0:
            return status
        status = copy_step(args.size, args.dir)
        if status != 0:
            return status
        return echo_step(args.seconds)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
