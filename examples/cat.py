"""Print files to standard output, reading them through io_uring in batches of blocks.

    python examples/cat.py FILE [FILE ...]

Each file is opened and stat'ed through the ring, then read 32 blocks at a time with one
``read_many`` batch per 32 blocks (one system call per batch).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import saferring

BLOCK = 64 * 1024
DEPTH = 32


def cat(ring: saferring.Ring, path: str, out: int) -> int:
    """Copy one file to the descriptor ``out``; return the number of bytes copied."""
    fd = ring.run(ring.openat(path))
    try:
        size = ring.run(ring.statx(fd)).st_size
        buf = bytearray(BLOCK * DEPTH)
        view = memoryview(buf)
        done = 0
        while done < size:
            offsets = list(range(done, min(size, done + BLOCK * DEPTH), BLOCK))
            counts = ring.run(ring.read_many(fd, buf, offsets, BLOCK))
            for i, n in enumerate(counts):
                os.write(out, view[i * BLOCK:i * BLOCK + n])
            done += sum(counts)
            if sum(counts) < len(offsets) * BLOCK:
                break  # the file shrank while we read it
        return done
    finally:
        ring.run(ring.close_fd(fd))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description="Print files through io_uring.")
    parser.add_argument("files", nargs="+", help="files to print")
    args = parser.parse_args(argv)
    status = 0
    with saferring.Ring(64) as ring:
        for path in args.files:
            try:
                cat(ring, path, sys.stdout.fileno())
            except OSError as exc:
                print(f"cat.py: {path}: {exc.strerror}", file=sys.stderr)
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
