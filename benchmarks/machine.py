"""What the benchmarks ran on: CPU, cores, kernel, liburing, Python (printed and stored in the JSON)."""

from __future__ import annotations

import os
import platform
import subprocess

#: ``quick`` (``make bench``: the whole suite in about two minutes, fewer rounds and smaller
#: sizes) or ``full`` (``make bench-full``, the figures docs/benchmarks.md quotes).  Running
#: pytest directly gives ``full``.
MODE = os.environ.get("SAFERRING_BENCH_MODE", "full")
if MODE not in ("quick", "full"):
    raise SystemExit(f"SAFERRING_BENCH_MODE must be quick or full, not {MODE!r}")
QUICK = MODE == "quick"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "not installed"


def describe() -> dict[str, str]:
    """A short, ordered description of this machine and software, for tables and JSON."""
    import saferring
    from saferring._binding import LIBURING_VERSION

    try:
        import uvloop
        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    usable = len(os.sched_getaffinity(0))
    return {
        "cpu": _cpu_model(),
        "cores": f"{usable} usable of {os.cpu_count()}",
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "liburing": f"{LIBURING_VERSION} headers; Debian package {_package_version('liburing-dev')}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "saferring": saferring.__version__,
        "uvloop": uvloop_version,
    }
