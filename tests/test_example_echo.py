"""examples/echo_server.py and examples/echo_client.py, end to end over 127.0.0.1.

The server runs as a subprocess (it needs signals and its own process); the client runs
in-process through its ``main()``.  The server exits with status 0 on SIGINT and SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
SERVER = os.path.join(EXAMPLES, "echo_server.py")
STATS = re.compile(r"stats: conns=(\d+) msgs/s=(\d+) bytes/s=(\d+) in_flight=(\d+|-) pinned=(\d+|-)")
SUMMARY = re.compile(r"summary: backend=(\S+) connections=(\d+) messages=(\d+) bytes=(\d+) "
                     r"seconds=[0-9.]+")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = _load("echo_client")
server_module = _load("echo_server")


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """The server's next stdout line, or "" if none came within ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


@contextmanager
def _server(*args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start echo_server.py on a free port; yield the process and the port.  The process is
    killed on the way out if the test did not end it."""
    with subprocess.Popen([sys.executable, SERVER, "--port", "0", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            first = _readline(proc, 20)
            match = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", first)
            assert match, f"unexpected first line {first!r}"
            yield proc, int(match.group(1))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[str, str]:
    """Signal the server and return the rest of its stdout and its stderr, checking that it
    exited with status 0."""
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    return out, err


def _run_client(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = client.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The stock-asyncio server does not use io_uring (only the client does): not worth its time in the
# emulated-kernel run.
@pytest.mark.parametrize("backend", ["saferring", pytest.param("asyncio", marks=pytest.mark.slow),
                                     "saferring-aio"])
def test_every_echo_verified_and_counted(backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each backend echoes 4 x 60 pipelined messages of 3000 bytes (several buffers each) exactly;
    --stats prints parseable lines (ring counters, or '-' for asyncio); SIGINT ends the server
    with status 0, a summary counting every byte, and nothing on stderr."""
    with _server("--backend", backend, "--stats") as (proc, port):
        status, out, err = _run_client(capsys, "--port", str(port), "--connections", "4",
                                       "--messages", "60", "--size", "3000", "--pipeline", "3",
                                       "--json")
        assert status == 0, err
        assert err == ""
        figures = json.loads(out)
        assert figures["messages"] == 240
        assert figures["bytes"] == 240 * 3000
        assert figures["errors"] == 0
        assert figures["connections"] == 4
        lat = figures["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        line = ""
        deadline = time.monotonic() + 5
        while not line.startswith("stats:") and time.monotonic() < deadline:
            line = _readline(proc, 1)
        stats = STATS.fullmatch(line.rstrip("\n"))
        assert stats, f"no stats line: {line!r}"
        if backend == "asyncio":
            assert stats.group(4) == stats.group(5) == "-"
        else:
            assert stats.group(4).isdigit() and stats.group(5).isdigit()
            assert int(stats.group(4)) >= 1  # the accept (at least) is in flight
        out, err = _stop(proc)
    assert err == ""
    summary = SUMMARY.search(out)
    assert summary, out
    assert summary.group(1) == backend
    assert int(summary.group(2)) == 4
    assert int(summary.group(4)) == 240 * 3000
    assert all(STATS.fullmatch(s) for s in out.splitlines()[:-1])


def test_200_connections_at_once_saferring(capsys: pytest.CaptureFixture[str]) -> None:
    """The saferring backend serves 200 connections together, 2 messages in flight on each."""
    with _server() as (proc, port):
        status, out, err = _run_client(capsys, "--port", str(port), "--connections", "200",
                                       "--messages", "20", "--size", "512", "--pipeline", "2",
                                       "--json")
        assert status == 0, err
        figures = json.loads(out)
        assert (figures["messages"], figures["bytes"], figures["errors"]) == (4000, 4000 * 512, 0)
        out, err = _stop(proc, signal.SIGTERM)
    summary = SUMMARY.search(out)
    assert summary and int(summary.group(2)) == 200 and int(summary.group(4)) == 4000 * 512
    assert err == ""


def test_sigterm_closes_open_connections() -> None:
    """SIGTERM with connections open (idle, and one whose echo is never read) closes every one
    of them, and the server exits 0 with its summary."""
    with _server() as (proc, port):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        try:
            hog = socks[0]
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.settimeout(0.05)
            try:
                for _ in range(400):  # until the echo fills both sides' socket buffers
                    hog.send(b"x" * 65536)
            except (TimeoutError, BlockingIOError):
                pass
            socks[1].sendall(b"ping")
            assert socks[1].recv(4) == b"ping"  # served although one client hogs its buffers
            out, err = _stop(proc, signal.SIGTERM)
            assert err == "" and SUMMARY.search(out)
            for s in socks[1:]:
                s.settimeout(5)
                try:
                    assert s.recv(1) == b""
                except ConnectionResetError:
                    pass
        finally:
            for s in socks:
                s.close()


def test_half_close_and_reset() -> None:
    """A client that sends 200 KiB and shuts down its side gets all of it back, then EOF; a
    client that resets mid-echo is dropped; both are counted closed and others are served."""
    with _server("--stats") as (proc, port):
        data = os.urandom(200 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as half, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as reset, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as other:
            reset.sendall(os.urandom(300 * 1024))
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()  # SO_LINGER 0: an RST, with the echo unread
            got = bytearray()
            half.sendall(data)
            half.shutdown(socket.SHUT_WR)
            while chunk := half.recv(65536):
                got += chunk
            assert got == data  # everything came back before the server closed its side
            other.sendall(b"ping")
            assert other.recv(4) == b"ping"
            conns = ""
            deadline = time.monotonic() + 5
            while conns != "1" and time.monotonic() < deadline:
                stats = STATS.fullmatch(_readline(proc, 1).rstrip("\n"))
                conns = stats.group(1) if stats else conns
            assert conns == "1"  # only `other` is still open
        out, err = _stop(proc)
    assert err == ""
    summary = SUMMARY.search(out)
    assert summary and int(summary.group(2)) == 3


def test_server_port_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    """A port another socket listens on: one line naming host, port and reason; exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server_module.main(["--port", str(port)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"echo_server.py: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert captured.out == ""


def test_server_address_not_local(capsys: pytest.CaptureFixture[str]) -> None:
    """An address this machine does not have (TEST-NET-1): one line, exit 1."""
    assert server_module.main(["--host", "192.0.2.1", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err == "echo_server.py: cannot listen on 192.0.2.1:0: Cannot assign requested address\n"


def test_client_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listening: one line, exit 1."""
    port = _free_port()
    status, out, err = _run_client(capsys, "--port", str(port), "--connections", "3",
                                   "--messages", "1")
    assert status == 1
    assert err == f"echo_client.py: cannot connect to 127.0.0.1:{port}: Connection refused\n"
    assert out == ""


def _corrupting_server(listener: socket.socket, flip_at: int) -> None:
    """Echo one connection, with the byte at stream offset ``flip_at`` inverted."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        pos = 0
        try:
            while data := conn.recv(65536):
                chunk = bytearray(data)
                if pos <= flip_at < pos + len(chunk):
                    chunk[flip_at - pos] ^= 0xFF
                pos += len(chunk)
                conn.sendall(chunk)
        except OSError:
            pass  # the client hung up after the mismatch


def test_client_detects_a_corrupted_byte(capsys: pytest.CaptureFixture[str]) -> None:
    """A server that flips one byte (the 3rd of the 2nd message): exit 2 and one line naming
    the connection and the offset."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(10)
        thread = threading.Thread(target=_corrupting_server, args=(listener, 64 + 2))
        thread.start()
        try:
            status, out, err = _run_client(capsys, "--port", str(listener.getsockname()[1]),
                                           "--connections", "1", "--messages", "5", "--size",
                                           "64", "--timeout", "5")
        finally:
            thread.join(15)
    assert status == 2
    assert re.fullmatch(r"echo_client\.py: connection 0: echoed byte at offset 66 \(message 1, "
                        r"byte 2\) is 0x[0-9a-f]{2}, expected 0x[0-9a-f]{2}\n", err), err
    assert out == ""


def test_help() -> None:
    """Both programs answer --help with status 0."""
    for module in (client, server_module):
        with pytest.raises(SystemExit) as exc:
            module.main(["--help"])
        assert exc.value.code == 0
