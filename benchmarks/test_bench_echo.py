"""1 KiB TCP echo over 127.0.0.1: servers on io_uring (saferring.aio) against asyncio, uvloop and C.

echo1k-c1, echo1k-c10, echo1k-c100
    A closed-loop load generator in C (``benchmarks/c/echo_load.c``) keeps one 1 KiB message in
    flight on each of 1, 10 or 100 connections and checks every byte that comes back.  Each
    server runs in its own process pinned to CPU 0; the generator runs pinned to CPU 1.  A round
    is a fixed number of round trips, so the time per round compares throughput directly
    (``msgs_per_s`` in each result's extra_info is the generator's own count).
    Contenders (``benchmarks/echo_servers.py``): asyncio and uvloop servers written with streams
    (``start_server``) and with a ``Protocol`` (``create_server``), saferring.aio's streams and
    protocol servers on stock asyncio and on uvloop, and ``c_epoll`` (``benchmarks/c/echo_epoll.c``:
    no interpreter at all, the limit of the machine).

The C programs are compiled into a temporary directory by the session fixture (``gcc``).  The
machine needs two CPUs for the pinning; with one, both share it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from machine import QUICK

HERE = Path(__file__).resolve().parent
MESSAGES = {1: 2_000, 10: 10_000, 100: 10_000} if QUICK else {1: 10_000, 10: 50_000, 100: 50_000}
ROUNDS = 2 if QUICK else 3
SERVERS = [
    "asyncio-streams", "uvloop-streams", "asyncio-protocol", "uvloop-protocol",
    "saferring-streams", "saferring-streams-uvloop", "saferring-protocol",
    "saferring-protocol-uvloop", "c_epoll",
]
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = str(_CPUS[0])
CLIENT_CPU = str(_CPUS[1] if len(_CPUS) > 1 else _CPUS[0])


@pytest.fixture(scope="session")
def c_programs() -> Iterator[dict[str, str]]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the C load generator")
    out = tempfile.mkdtemp(prefix="saferring-echo-")
    built = {}
    for name in ("echo_load", "echo_epoll"):
        exe = os.path.join(out, name)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, str(HERE / "c" / f"{name}.c")],
                       check=True)
        built[name] = exe
    yield built
    shutil.rmtree(out, ignore_errors=True)


class EchoServer:
    """One server process, pinned; stopped by closing its standard input."""

    def __init__(self, kind: str, programs: dict[str, str]) -> None:
        if kind == "c_epoll":
            cmd = [programs["echo_epoll"]]
        else:
            cmd = [sys.executable, str(HERE / "echo_servers.py"), kind]
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            pytest.fail(f"echo server {kind} did not start (said {line!r})")
        self.port = int(line)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _load(programs: dict[str, str], port: int, conns: int, messages: int) -> dict[str, float]:
    proc = subprocess.run(
        ["taskset", "-c", CLIENT_CPU, programs["echo_load"], "127.0.0.1", str(port), str(conns),
         "1024", str(messages)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"load generator failed: {proc.stdout}{proc.stderr}")
    fields = dict(item.split("=") for item in proc.stdout.split())
    assert int(fields["messages"]) == messages  # every round trip completed and was checked
    return {k: float(v) for k, v in fields.items()}


@pytest.mark.parametrize("conns", [1, 10, 100])
@pytest.mark.parametrize("kind", SERVERS)
def test_echo(benchmark: Any, c_programs: dict[str, str], kind: str, conns: int) -> None:
    """Round trips of 1 KiB messages on ``conns`` connections, every byte verified."""
    if "uvloop" in kind:
        pytest.importorskip("uvloop")
    server = EchoServer(kind, c_programs)
    try:
        messages = MESSAGES[conns]
        _load(c_programs, server.port, conns, messages // 10)  # warm-up (and a correctness check)
        rates: list[float] = []

        def one_round() -> None:
            result = _load(c_programs, server.port, conns, messages)
            rates.append(result["msgs_per_s"])
            benchmark.extra_info.setdefault("p99_us", []).append(result["p99_us"])

        benchmark.group = f"echo1k-c{conns}"
        if kind == "uvloop-protocol":
            benchmark.extra_info["reference"] = True  # the yardstick
        benchmark.extra_info["messages_per_round"] = messages
        benchmark.extra_info["ops_per_round"] = messages  # report.py: per message, msgs/s
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
        benchmark.extra_info["msgs_per_s"] = sorted(rates)[len(rates) // 2]
    finally:
        server.stop()
