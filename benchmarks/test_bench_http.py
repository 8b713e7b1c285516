"""Static files over HTTP/1.1 on 127.0.0.1: examples/http_server.py (saferring) against asyncio,
uvloop and the standard library's ``http.server``, under ``wrk``.

http-1k-c10, http-1m-c10
    ``wrk -t1 -c10 -d5s`` (quick mode: ``-d2s``) fetches one file over and over on 10
    connections: a 1 KiB file (per-request cost: parsing, opening, answering) and a 1 MiB file
    (moving bytes).  Each server runs in its own process pinned to CPU 0 with ``taskset``; wrk
    runs pinned to CPU 1.  Contenders:

    ``saferring``    examples/http_server.py --quiet (one Ring; bodies of 128 KiB and more are
                     spliced file -> pipe -> socket, smaller ones read + sent).
    ``asyncio``      benchmarks/http_servers.py on the stock event loop (asyncio streams; 1 MiB
                     bodies through ``loop.sendfile``, i.e. ``os.sendfile``).
    ``uvloop``       the same server on uvloop (which has no ``loop.sendfile``: 256 KiB
                     ``os.pread`` + ``write`` steps).  The yardstick (``reference``).
    ``http.server``  ``python -m http.server``: threads, HTTP/1.0, so every request is a new
                     connection (wrk reconnects), and a log line per request on stderr.

Every contender is checked before it is measured: the file is fetched once with http.client and
compared byte for byte, and a one-second wrk run with a Lua ``response()`` hook counts every
status that is not 2xx (the run fails if there is one).  The measured runs leave that hook out
(wrk would copy each body into Lua, which costs it a quarter of its 1 MiB rate) and check what
wrk counts itself: no status >= 400, and bytes per response between the file's size and 1 KiB
more (wrk counts the bytes of the responses in flight when it stops, so up to 10 more
responses' worth).  saferring's server must also exit 0 on SIGINT afterwards.

pytest-benchmark's time for a round is wrk's fixed duration, so it compares nothing; the figures
are in each result's ``extra_info``: ``requests_per_s`` and ``transfer_MB_per_s`` (the median
round), ``server_cpu_us_per_request`` (user + system time of the server process, all its
threads, per request: steadier than the rates on a shared machine, where the server's CPU can
be taken away), ``requests_per_s_rounds``, ``socket_errors`` and ``command`` (the exact wrk
command).  ``ops_per_round`` holds the median round's request count and ``round_seconds`` its
duration by wrk's clock, so report.py's "per op", "ops/s" and ratio columns compare requests
per second.  At the
end of the module a table of the medians is printed, each rate also relative to saferring's.

With 1 MiB bodies one wrk thread is the limit on a small machine (it reads about 1.1 GB/s on
the 2-vCPU development VM, whichever server sends): there the servers' CPU time per request
is what differs.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from machine import QUICK

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "http_server.py"
SIZES = {"1k": 1024, "1m": 1024 * 1024}
SERVERS = ["saferring", "asyncio", "uvloop", "http.server"]
DURATION = "2s" if QUICK else "5s"
ROUNDS = 1 if QUICK else 3
CONNECTIONS = 10
_CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = str(_CPUS[0])
CLIENT_CPU = str(_CPUS[1] if len(_CPUS) > 1 else _CPUS[0])

# Per-thread counters of 2xx and other statuses, summed in done() (which runs in a Lua state of
# its own: the threads' globals are read with thread:get).
_CHECK_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0; good = 0 end
function response(status, headers, body)
  if status >= 200 and status < 300 then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local b, g = 0, 0
  for _, t in ipairs(threads) do b = b + t:get("bad"); g = g + t:get("good") end
  io.write(string.format("RESULT requests=%d duration_us=%d bytes=%d status=%d non2xx=%d ok=%d " ..
    "connect=%d read=%d write=%d timeout=%d\\n", summary.requests, summary.duration, summary.bytes,
    summary.errors.status, b, g, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
"""
_MEASURE_LUA = """
function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d bytes=%d status=%d connect=%d " ..
    "read=%d write=%d timeout=%d\\n", summary.requests, summary.duration, summary.bytes,
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout))
end
"""


@pytest.fixture(scope="module")
def site() -> Iterator[dict[str, Any]]:
    """The served directory (seeded pseudo-random 1k.bin and 1m.bin) and the wrk scripts."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is needed (make bench-deps installs it)")
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is needed to pin the processes")
    work = Path(tempfile.mkdtemp(prefix="saferring-http-"))
    www = work / "www"
    www.mkdir()
    rng = random.Random(0x5AFE)
    content = {}
    for name, size in SIZES.items():
        content[name] = rng.randbytes(size)
        (www / f"{name}.bin").write_bytes(content[name])
    (work / "check.lua").write_text(_CHECK_LUA)
    (work / "measure.lua").write_text(_MEASURE_LUA)
    yield {"www": www, "work": work, "content": content}
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[dict[tuple[str, str], dict[str, float]]]:
    """Collects each contender's medians; prints them as one table per group at the end."""
    results: dict[tuple[str, str], dict[str, float]] = {}
    yield results
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not results:
        return
    lines = [""]
    for group in sorted({g for g, _ in results}):
        ours = results.get((group, "saferring"), {}).get("requests_per_s")
        lines.append(f"{group}: wrk -t1 -c{CONNECTIONS} -d{DURATION}, server on CPU {SERVER_CPU}, "
                     f"wrk on CPU {CLIENT_CPU}, median of {ROUNDS} round(s)")
        lines.append(f"  {'contender':<12} {'requests/s':>11} {'MB/s':>9} {'vs saferring':>13} "
                     f"{'server CPU us/request':>22}")
        rows = sorted(((k, v) for (g, k), v in results.items() if g == group),
                      key=lambda kv: -kv[1]["requests_per_s"])
        for kind, got in rows:
            ratio = f"{got['requests_per_s'] / ours:.2f}x" if ours else "-"
            lines.append(f"  {kind:<12} {got['requests_per_s']:>11,.0f} "
                         f"{got['transfer_MB_per_s']:>9,.1f} {ratio:>13} {got['cpu_us']:>22,.1f}")
    with capture.global_and_fixture_disabled():  # past pytest's capture, like its own summary
        for line in lines:
            reporter.write_line(line)


class Server:
    """One contender's process, pinned to SERVER_CPU."""

    def __init__(self, kind: str, www: Path) -> None:
        self.kind = kind
        stdin: Any = subprocess.DEVNULL
        if kind == "saferring":
            cmd = [sys.executable, str(EXAMPLE), "--port", "0", "--directory", str(www), "--quiet"]
        elif kind == "http.server":
            cmd = [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1",
                   "--directory", str(www)]
        else:
            cmd = [sys.executable, str(HERE / "http_servers.py"), kind, str(www)]
            stdin = subprocess.PIPE  # it serves until its standard input closes
        self.proc = subprocess.Popen(["taskset", "-c", SERVER_CPU, *cmd], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"(?:127\.0\.0\.1:|port )(\d+)|^(\d+)$", line.strip())
        if m is None:
            self.stop()
            pytest.fail(f"{kind} did not start (said {line!r})")
        self.port = int(m.group(1) or m.group(2))

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process (all its threads) has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int:
        """Stop the server; its exit status."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        elif self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code


def _wrk(port: int, name: str, script: Path, duration: str) -> tuple[dict[str, int], str]:
    """One wrk run; the counters its Lua done() printed, and the command."""
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}",
           "-s", str(script), f"http://127.0.0.1:{port}/{name}.bin"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        pytest.fail(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    fields = {k: int(v) for k, v in (item.split("=") for item in line.split()[1:])}
    return fields, " ".join([*cmd[3:-3], cmd[-1]])  # without taskset and the script


def _verify(port: int, name: str, data: bytes) -> None:
    """The file through the server, byte for byte, before anything is measured."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", f"/{name}.bin")
        r = c.getresponse()
        body = r.read()
    finally:
        c.close()
    assert r.status == 200, f"GET /{name}.bin answered {r.status}"
    assert body == data, f"GET /{name}.bin returned {len(body)} bytes that differ from the file"


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("kind", SERVERS)
def test_http(benchmark: Any, site: dict[str, Any], table: dict[tuple[str, str], dict[str, float]],
              kind: str, size: str) -> None:
    """wrk against one server and one file; every response checked (see the module docstring)."""
    if kind == "uvloop":
        pytest.importorskip("uvloop")
    data = site["content"][size]
    server = Server(kind, site["www"])
    try:
        _verify(server.port, size, data)
        check, _ = _wrk(server.port, size, site["work"] / "check.lua", "1s")
        assert check["requests"] > 0, f"{kind}: wrk completed no request"
        assert check["non2xx"] == 0, f"{kind}: {check['non2xx']} responses were not 2xx: {check}"
        rounds: list[dict[str, int]] = []
        command = ""

        def one_round() -> None:
            nonlocal command
            before = server.cpu_seconds()
            got, command = _wrk(server.port, size, site["work"] / "measure.lua", DURATION)
            got["cpu_ns"] = int((server.cpu_seconds() - before) * 1e9)
            assert got["status"] == 0, f"{kind}: {got['status']} responses with a status >= 400"
            # wrk's byte count includes the responses still in flight when it stopped.
            low, high = len(data) * got["requests"], (len(data) + 1024) * (got["requests"] + CONNECTIONS)
            assert low <= got["bytes"] <= high, f"{kind}: {got['bytes']} bytes in {got['requests']} responses"
            rounds.append(got)

        benchmark.group = f"http-{size}-c{CONNECTIONS}"
        if kind == "uvloop":
            benchmark.extra_info["reference"] = True  # the yardstick, as in the echo groups
        if kind == "saferring":
            benchmark.extra_info["saferring"] = True
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        code = server.stop()
    if kind == "saferring":
        assert code == 0, f"examples/http_server.py exited {code} on SIGINT"
    rates = sorted((r["requests"] / (r["duration_us"] / 1e6), r) for r in rounds)
    rate, median = rates[len(rates) // 2]
    transfer = median["bytes"] / (median["duration_us"] / 1e6) / 1e6
    cpu = sorted(r["cpu_ns"] / 1e3 / max(r["requests"], 1) for _, r in rates)[len(rates) // 2]
    benchmark.extra_info.update({
        "requests_per_s": round(rate, 1),
        "transfer_MB_per_s": round(transfer, 1),
        "server_cpu_us_per_request": round(cpu, 1),
        "requests_per_s_rounds": [round(r, 1) for r, _ in rates],
        "ops_per_round": median["requests"],
        "round_seconds": median["duration_us"] / 1e6,  # wrk's own clock, not the process's
        "socket_errors": {k: median[k] for k in ("connect", "read", "write", "timeout")},
        "command": command,
    })
    table[(benchmark.group, kind)] = {"requests_per_s": rate, "transfer_MB_per_s": transfer,
                                      "cpu_us": cpu}
