"""``python -m saferring info`` (what this kernel and liburing offer) and ``demo`` (a short tour)."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import sys
import tempfile
from collections.abc import Sequence

from . import __version__
from ._binding import LIBURING_VERSION, UNAVAILABLE_REASON
from ._state import OpState
from .errors import SaferRingError
from .features import FEATURE_BITS, OPCODES, kernel_can
from .ring import Ring

#: What the library does differently depending on the kernel: (what, how it is asked of the
#: kernel, the release that brought it, what saferring does without it).  ``op:`` names an opcode
#: of the probe, ``cap:`` a behaviour of :data:`saferring.features.CAPABILITIES` (tried once),
#: ``setup:`` a ring setup flag (tried by creating a small ring with it).
_HIGHLIGHTS: tuple[tuple[str, str, str, str], ...] = (
    ("buffer rings (BufferRing)", "cap:BUF_RING", "5.19", "PROVIDE_BUFFERS requests (5.7)"),
    ("incremental buffer rings", "cap:BUF_RING_INC", "6.12", "incremental=True refused"),
    ("multishot accept", "try:accept_multishot", "5.19", "the accept fails with EINVAL"),
    ("multishot receive", "cap:RECV_MULTISHOT", "6.0", "single-shot receives, re-armed"),
    ("multishot read", "op:READ_MULTISHOT", "6.7", "single-shot reads, re-armed"),
    ("multishot timeout", "cap:TIMEOUT_MULTISHOT", "6.4", "single-shot timeouts, re-armed"),
    ("zero-copy send (send_zc)", "op:SEND_ZC", "6.0", "UnsupportedOperationError"),
    ("synchronous cancel", "cap:SYNC_CANCEL", "6.0", "chain(drain=True) refused"),
    ("socket commands (getsockopt...)", "cap:SOCKET_COMMANDS", "6.7", "UnsupportedOperationError"),
    ("cooperative task running", "setup:coop_taskrun", "5.19", "AsyncRing takes an IPI per CQE"),
)


def _grid(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Rows aligned under their headers, with a rule under the header line."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
             indent + "  ".join("-" * w for w in widths)]
    lines += [indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    return lines


def _by_release(items: Sequence[tuple[str, str]], present: frozenset[str] | set[str],
                width: int = 96) -> list[tuple[str, str]]:
    """(release, names) rows: names grouped under the release that brought them, a missing one
    written as ``-name``, long groups wrapped onto continuation rows."""
    groups: dict[str, list[str]] = {}
    for name, release in items:
        groups.setdefault(release, []).append(name.lower() if name in present else f"-{name.lower()}")
    rows: list[tuple[str, str]] = []
    for release in sorted(groups, key=lambda r: tuple(int(x) for x in r.split("."))):
        lines = [""]
        for word in groups[release]:
            if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
                lines.append(word)
            else:
                lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
        rows += [(release if i == 0 else "", line) for i, line in enumerate(lines)]
    return rows


def _kernel_has(how: str, opcodes: frozenset[str]) -> bool:
    kind, name = how.split(":")
    if kind == "op":
        return name in opcodes
    if kind == "cap":
        return kernel_can(name)
    if kind == "try":  # multishot accept: arm one on a listening socket; an old kernel says EINVAL
        with socket.socket() as listener, Ring(4) as ring:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            try:
                op = ring.accept_multishot(listener.fileno())
            except SaferRingError:
                return False
            ring.wait(0, timeout=0.05)  # a refused flag completes at submission
            if op.done():
                return op.state is not OpState.FAILED
            op.cancel()
            while not op.done():
                ring.wait(1, timeout=1)
            return True
    try:
        Ring(2, **{name: True}).close()
    except (OSError, SaferRingError):
        return False
    return True


def info() -> int:
    """Print a feature report of the running kernel's io_uring and the liburing build."""
    head = [("saferring", __version__),
            ("Python", f"{platform.python_version()} ({platform.python_implementation()})"),
            ("liburing", f"{LIBURING_VERSION} (the headers the extension was built against)"),
            ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}")]
    ring = None
    if UNAVAILABLE_REASON:
        head.append(("io_uring", f"unavailable: {UNAVAILABLE_REASON}"))
    else:
        try:
            ring = Ring(8)
        except (OSError, SaferRingError) as exc:
            head.append(("io_uring", f"unavailable: {exc}"))
    if ring is None:
        for key, value in head:
            print(f"{key:<10}{value}")
        return 1
    with ring:
        f = ring.features
    probe = "from the kernel's probe" if f.probe_available else "no probe (kernel < 5.6): inferred"
    head.append(("io_uring", f"available; {len(f.opcodes)} of the {len(OPCODES)} opcodes saferring "
                             f"knows ({probe})"))
    for key, value in head:
        print(f"{key:<10}{value}")
    print()
    print("What saferring does with this kernel")
    rows = [(what, release, "yes" if _kernel_has(how, f.opcodes) else "no", fallback)
            for what, how, release, fallback in _HIGHLIGHTS]
    for line in _grid(("feature", "Linux", "here", "without it"), rows):
        print(line)
    print()
    print("io_uring opcodes, by the Linux release that brought them (-name: missing here)")
    for line in _grid(("Linux", "opcodes"), _by_release([(op.name, op.since) for op in OPCODES],
                                                        f.opcodes)):
        print(line)
    print()
    print("Kernel features reported at setup (IORING_FEAT_*; -name: not reported)")
    for line in _grid(("Linux", "features"), _by_release([(n, rel) for n, _b, rel in FEATURE_BITS],
                                                         f.flags)):
        print(line)
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
