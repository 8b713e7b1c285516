"""``python -m saferring info`` (what this kernel and liburing offer) and ``demo`` (a short tour)."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
from collections.abc import Sequence

from . import __version__
from ._binding import LIBURING_VERSION, UNAVAILABLE_REASON
from .errors import SaferRingError
from .features import FEATURE_BITS, OPCODES
from .ring import Ring


def info() -> int:
    """Print a feature report of the running kernel's io_uring and the liburing build."""
    print(f"saferring {__version__}  (Python {platform.python_version()}, "
          f"built against liburing {LIBURING_VERSION})")
    print(f"kernel    {platform.system()} {platform.release()} {platform.machine()}")
    if UNAVAILABLE_REASON:
        print(f"io_uring  unavailable: {UNAVAILABLE_REASON}")
        return 1
    try:
        ring = Ring(8)
    except (OSError, SaferRingError) as exc:
        print(f"io_uring  unavailable: {exc}")
        return 1
    with ring:
        f = ring.features
    probe = "kernel probe" if f.probe_available else "no probe (kernel < 5.6): inferred"
    print(f"io_uring  available; {len(f.opcodes)} of {len(OPCODES)} known opcodes ({probe})")
    print()
    print("opcodes (Linux release that brought each; + supported here, - missing)")
    cells = [f"{'+' if op.name in f.opcodes else '-'} {op.name.lower():<17}{op.since:>5}"
             for op in OPCODES]
    for i in range(0, len(cells), 3):
        print("  " + "   ".join(cells[i:i + 3]))
    print()
    print("kernel features (IORING_FEAT_*)")
    cells = [f"{'+' if name in f.flags else '-'} {name.lower():<17}{rel:>5}"
             for name, _bit, rel in FEATURE_BITS]
    for i in range(0, len(cells), 3):
        print("  " + "   ".join(cells[i:i + 3]))
    return 0


def demo() -> int:
    """A short tour: a few operations, then the safety promise shown on a dropped buffer."""
    with Ring(64) as ring, tempfile.TemporaryDirectory() as tmp:
        print("1. A file written and read back through io_uring")
        path = os.path.join(tmp, "hello.txt")
        fd = ring.run(ring.openat(path, os.O_CREAT | os.O_RDWR, 0o600))
        n = ring.run(ring.write(fd, b"hello from io_uring\n", 0))
        buf = bytearray(64)
        got = ring.run(ring.read(fd, buf, 0))
        st = ring.run(ring.statx(path))
        ring.run(ring.close_fd(fd))
        print(f"   wrote {n} bytes, read {got}: {bytes(buf[:got])!r}; statx size {st.st_size}")

        print("2. 32 no-ops in one batch: one submit, one wait")
        for _ in range(32):
            ring.nop()
        done = ring.wait(32)
        print(f"   {len(done)} completed, results {sorted({op.result() for op in done})}")

        print("3. The safety promise: drop the buffer of a read that is still in flight")
        r, w = os.pipe()
        try:
            op = ring.read(r, bytearray(4096))
            ring.submit()
            del op
            gc.collect()
            stats = ring.stats()
            print(f"   every reference dropped, gc ran: in_flight={stats.in_flight}, "
                  f"pinned_bytes={stats.pinned_bytes} (the ring still holds the buffer)")
            try:
                pinned = bytearray(16)
                held = ring.read(r, pinned)
                pinned.extend(b"more")
            except BufferError as exc:
                print(f"   resizing a buffer the kernel may write into is refused: {exc}")
            os.write(w, b"late data")
            finished = ring.wait(1)
            print(f"   data arrived: {finished[0]!r}; pins released after the final CQE")
            held.cancel()
            ring.wait(1)
            print(f"   stats now: {ring.stats()}")
        finally:
            os.close(r)
            os.close(w)

        print("4. Misuse raises a documented exception")
        try:
            ring.read(0, b"read-only bytes")
        except TypeError as exc:
            print(f"   ring.read(fd, bytes) -> TypeError: {str(exc)[:60]}...")
        pending = ring.timeout(10)
        try:
            pending.result()
        except SaferRingError as exc:
            print(f"   result() before completion -> {type(exc).__name__}")
    print(f"5. Ring closed with an operation in flight: {pending.state.value}, nothing leaked")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m saferring``."""
    parser = argparse.ArgumentParser(prog="python -m saferring", description=__doc__)
    parser.add_argument("command", choices=["info", "demo"], help="what to show")
    args = parser.parse_args(argv)
    return info() if args.command == "info" else demo()


if __name__ == "__main__":
    sys.exit(main())
