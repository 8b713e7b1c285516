"""Helpers shared by the tests."""

from __future__ import annotations

import fcntl
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import time

import pytest

import saferring


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


# -- what the running kernel offers, asked of the kernel (never of uname) ----------------------

_features: list[saferring.Features] = []
_setup_answers: dict[str, bool] = {}
_SETUP_KWARGS = {
    "SQPOLL": {"sqpoll": True},
    "COOP_TASKRUN": {"coop_taskrun": True},
    "SINGLE_ISSUER": {"single_issuer": True},
    "DEFER_TASKRUN": {"single_issuer": True, "defer_taskrun": True},
}


def kernel_features() -> saferring.Features:
    """The running kernel's features (probe and feature bits), read once from a scratch ring."""
    if not _features:
        ring = saferring.Ring(2)
        _features.append(ring.features)
        ring.close()
    return _features[0]


def _setup_supported(name: str) -> bool:
    if name not in _setup_answers:
        try:
            ring = saferring.Ring(2, **_SETUP_KWARGS[name])  # type: ignore[arg-type]
        except (saferring.UnsupportedOperationError, OSError):
            _setup_answers[name] = False
        else:
            _setup_answers[name] = name in ring.features.setup_flags
            ring.close()
    return _setup_answers[name]


def kernel_lacks(requirement: str) -> str | None:
    """Why the running kernel cannot run what ``requirement`` names, or None if it can.

    A requirement is ``"op:NAME"`` (an opcode, from the kernel's probe), ``"feat:NAME"`` (an
    ``IORING_FEAT_*`` bit from io_uring_setup), ``"setup:NAME"`` (an ``IORING_SETUP_*`` flag the
    kernel accepts) or ``"can:NAME"`` (a behaviour of :data:`saferring.features.CAPABILITIES`,
    tried on the kernel).
    """
    from saferring import features as f

    kind, _, name = requirement.partition(":")
    name = name.upper()
    if kind == "op":
        if kernel_features().supports(name):
            return None
        return f"the kernel's probe has no IORING_OP_{name} (Linux {f.since(f.OP[name])})"
    if kind == "feat":
        if kernel_features().has(name):
            return None
        release = next(rel for n, _bit, rel in f.FEATURE_BITS if n == name)
        return f"the kernel does not report IORING_FEAT_{name} (Linux {release})"
    if kind == "setup":
        if _setup_supported(name):
            return None
        release = next(rel for n, _bit, rel in f.SETUP_FLAGS if n == name)
        return f"the kernel refuses IORING_SETUP_{name} (Linux {release})"
    if kind == "can":
        if f.kernel_can(name):
            return None
        return f"the kernel lacks {name} (tried; Linux {f.capability_since(name)})"
    raise ValueError(f"unknown requirement kind in {requirement!r}")


def fill_peer_window(tx: socket.socket, byte: bytes = b"\0") -> int:
    """Send ``byte`` in 4 KiB pieces until the peer's receive window is full while ``tx``'s
    (enlarged) send buffer still has room, so that a later send is queued in the socket, neither
    sent nor blocked.  Returns how many bytes were sent."""
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    tx.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 5
    try:
        while time.monotonic() < deadline:
            try:
                sent += tx.send(byte * 4096)
            except BlockingIOError:
                break
            unsent = struct.unpack("i", fcntl.ioctl(tx.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            if unsent > 0:
                time.sleep(0.05)
                break
    finally:
        tx.setblocking(True)
    return sent
