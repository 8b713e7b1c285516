"""examples/http_server.py: a static-file HTTP/1.1 server on a saferring Ring, run as a subprocess
and spoken to with http.client and raw sockets over 127.0.0.1."""

from __future__ import annotations

import email.utils
import http.client
import importlib.util
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "http_server.py"
GUEST = bool(os.environ.get("SAFERRING_KERNEL_GUEST"))  # the emulated kernel: everything is slower
TIMEOUT = 60.0 if GUEST else 10.0  # any one socket operation; a hang fails instead of blocking
SECRET = b"TOP-SECRET-OUTSIDE-THE-ROOT\n"
BIG = 3 * 1024 * 1024 + 17  # above the splice threshold, and more than one pipe-full

# Run as root, the server would read a mode-000 file anyway (CAP_DAC_OVERRIDE): started through
# this launcher, it runs without the two capabilities that bypass file permissions.  Dropping
# them from the bounding set before exec leaves root's new process without them.
_DROP_DAC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        sys.exit(3)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def load_example() -> ModuleType:
    """examples/http_server.py as a module, for the in-process tests of main()."""
    spec = importlib.util.spec_from_file_location("http_server_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Server:
    """The example running in a subprocess; ``stop()`` sends a signal and returns its outcome."""

    def __init__(self, root: Path, log: Path, *args: str, drop_dac: bool = False) -> None:
        cmd = [sys.executable, str(EXAMPLE), "--port", "0", "--directory", str(root), *args]
        if drop_dac:
            cmd = [sys.executable, "-c", _DROP_DAC, *cmd[1:]]
        self.log = log
        self.kind = "default"
        self.denies = True  # file permissions apply to it (False: root with CAP_DAC_OVERRIDE)
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("serving "):
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            pytest.fail(f"the server did not start: {line!r}, {log.read_text()!r}")
        assert line == f"serving {root} on http://127.0.0.1:{line.rsplit(':', 1)[1]}"
        self.port = int(line.rsplit(":", 1)[1].rstrip("/\n"))

    def stop(self, signum: int = signal.SIGINT) -> tuple[int, str]:
        """Send ``signum``, wait for the exit; (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = -9
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code, self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A served tree: text and binary files of several sizes, a subdirectory with an index, one
    without, an unreadable file, a FIFO, symlinks inside and out of the root; and a secret
    file next to the root that must never be served."""
    top = tmp_path_factory.mktemp("http")
    (top / "outside.txt").write_bytes(SECRET)
    root = top / "www"
    root.mkdir()
    content = {
        "text.txt": b"hello, world\n" * 100,
        "empty.txt": b"",
        "small.bin": os.urandom(1000),
        "big.bin": os.urandom(BIG),
        "page.html": b"<p>page</p>\n",
        "sub/index.html": b"<h1>index of sub</h1>\n",
        "sub/deeper/data.json": b'{"a": 1}\n',
        "nodir/readme.txt": b"no index here\n",
        "name with space.txt": b"spaced\n",
    }
    for name, data in content.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "secret.txt").write_bytes(b"unreadable\n")
    os.chmod(root / "secret.txt", 0)
    os.mkfifo(root / "fifo")
    os.symlink(top / "outside.txt", root / "escape")  # absolute, out of the root
    os.symlink("../outside.txt", root / "escape-relative")
    os.symlink("text.txt", root / "inside-link")
    return {"root": root, "content": content}


@pytest.fixture(scope="module")
def server(files: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module's requests (it logs each request to a file)."""
    log = tmp_path_factory.mktemp("http-log") / "stderr.txt"
    drop = os.geteuid() == 0 and subprocess.run(
        [sys.executable, "-c", _DROP_DAC, "-c", "pass"], timeout=TIMEOUT).returncode == 0
    srv = Server(files["root"], log, drop_dac=drop)
    srv.denies = os.geteuid() != 0 or drop
    yield srv
    code, err = srv.stop()
    assert code == 0, err
    assert "Traceback" not in err, err


@pytest.fixture(scope="module", params=["copy", "splice"])
def body_server(request: pytest.FixtureRequest, files: dict[str, Any],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that sends every body one way: through a buffer (``--splice-threshold`` above
    any size), or spliced (threshold 0).  Both close connections idle for a second."""
    log = tmp_path_factory.mktemp("http-log") / "stderr.txt"
    threshold = "1000000000" if request.param == "copy" else "0"
    srv = Server(files["root"], log, "--quiet", "--timeout", "1", "--splice-threshold", threshold)
    srv.kind = request.param
    yield srv
    code, err = srv.stop()
    assert (code, err) == (0, "")


def conn(server: Server) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)


def get(server: Server, path: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    c = conn(server)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def raw_socket(server: Server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
    return s


def raw(server: Server, data: bytes) -> bytes:
    """Send ``data`` as is, then read everything until the server closes the connection."""
    with raw_socket(server) as s:
        s.sendall(data)
        out = bytearray()
        while chunk := s.recv(65536):
            out += chunk
        return bytes(out)


def read_responses(s: socket.socket, methods: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse one response per entry of ``methods`` (HEAD answers have no body) from ``s``."""
    buf = bytearray()
    out = []
    for method in methods:
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {len(out)} responses"
            buf += chunk
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = 0 if method == "HEAD" or status == 304 else int(headers["content-length"])
        while len(rest) < length:
            chunk = s.recv(65536)
            assert chunk, "connection closed in the middle of a body"
            rest += chunk
        out.append((status, headers, rest[:length]))
        buf = bytearray(rest[length:])
    assert not buf, f"unexpected bytes after the responses: {bytes(buf[:100])!r}"
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# -- bodies and heads ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [
    ("text.txt", "text/plain"), ("empty.txt", "text/plain"), ("small.bin", "application/octet-stream"),
    ("big.bin", "application/octet-stream"), ("page.html", "text/html"),
    ("sub/deeper/data.json", "application/json"), ("name with space.txt", "text/plain"),
])
def test_get_returns_file_byte_for_byte(server: Server, files: dict[str, Any], name: str,
                                        kind: str) -> None:
    """GET answers 200 with the file's exact bytes, its size, its type and its mtime."""
    path = "/" + name.replace(" ", "%20")
    status, headers, body = get(server, path)
    data = files["content"][name]
    assert status == 200
    assert body == data
    assert headers["Content-Length"] == str(len(data))
    assert headers["Content-Type"] == kind
    mtime = int(os.stat(files["root"] / name).st_mtime)
    assert headers["Last-Modified"] == email.utils.formatdate(mtime, usegmt=True)
    assert headers["Accept-Ranges"] == "bytes"


def test_directory_serves_its_index(server: Server, files: dict[str, Any]) -> None:
    """A directory with index.html answers with it; without the slash, a redirect to it."""
    status, headers, body = get(server, "/sub/")
    assert (status, body) == (200, files["content"]["sub/index.html"])
    assert headers["Content-Type"] == "text/html"
    status, headers, _ = get(server, "/sub?x=1")
    assert status == 301
    assert headers["Location"] == "/sub/"


def test_head_has_headers_and_no_body(server: Server, files: dict[str, Any]) -> None:
    """HEAD gives GET's headers (the full Content-Length) and not one byte of body."""
    status, headers, body = get(server, "/big.bin", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(BIG)
    # On the wire: the head and nothing after it before the server closes.
    response = raw(server, b"HEAD /text.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.endswith(b"\r\n\r\n")
    assert response.count(b"\r\n\r\n") == 1
    assert b"Content-Length: %d\r\n" % len(files["content"]["text.txt"]) in response


def test_keep_alive_many_requests_on_one_connection(server: Server, files: dict[str, Any]) -> None:
    """HTTP/1.1 keeps the connection: many requests in a row, one socket, every body exact."""
    c = conn(server)
    try:
        names = ["text.txt", "small.bin", "empty.txt", "page.html", "missing.txt"]
        first = None
        for i in range(20 if GUEST else 100):
            name = names[i % len(names)]
            c.request("HEAD" if i % 7 == 3 else "GET", "/" + name)
            r = c.getresponse()
            body = r.read()
            if first is None:
                first = c.sock
            assert c.sock is first, "http.client had to reconnect: the server closed the connection"
            if name == "missing.txt":
                assert r.status == 404
            else:
                assert r.status == 200
                assert body == (b"" if i % 7 == 3 else files["content"][name])
        c.request("GET", "/big.bin")
        assert c.getresponse().read() == files["content"]["big.bin"]
        assert c.sock is first
    finally:
        c.close()


def test_pipelined_requests_answered_in_order(server: Server, files: dict[str, Any]) -> None:
    """Requests sent together in one write get their answers one after the other, in order."""
    content = files["content"]
    requests = [
        ("GET", "/text.txt", ""), ("HEAD", "/small.bin", ""), ("GET", "/big.bin", "Range: bytes=5-70000\r\n"),
        ("GET", "/nothing-here", ""), ("GET", "/small.bin", ""), ("GET", "/big.bin", ""),
        ("GET", "/empty.txt", ""),
    ]
    wire = b"".join(f"{m} {p} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode() for m, p, extra in requests)
    with raw_socket(server) as s:
        s.sendall(wire)
        got = read_responses(s, [m for m, _, _ in requests])
        s.sendall(b"GET /page.html HTTP/1.1\r\nHost: x\r\n\r\n")  # still open afterwards
        assert read_responses(s, ["GET"])[0][2] == content["page.html"]
    assert [g[0] for g in got] == [200, 200, 206, 404, 200, 200, 200]
    assert got[0][2] == content["text.txt"]
    assert got[1][1]["content-length"] == "1000"
    assert got[2][2] == content["big.bin"][5:70001]
    assert got[4][2] == content["small.bin"]
    assert got[5][2] == content["big.bin"]
    assert got[6][2] == b""


def test_requests_beyond_the_buffer_limit_pause_reading(server: Server) -> None:
    """More than 1 MiB of requests sent at once: the server stops reading while it answers them
    (nothing is lost or reordered) and reads on afterwards."""
    pad = b"X-Pad: " + b"p" * 15000 + b"\r\n"
    count = 80  # 80 * 15 KB: past the 1 MiB the server keeps unanswered
    wire = b"".join(b"HEAD /text.txt?%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (i, pad) for i in range(count))
    with raw_socket(server) as s:
        s.sendall(wire)
        got = read_responses(s, ["HEAD"] * count)
        s.sendall(b"GET /empty.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(s, ["GET"])[0][0] == 200
    assert [g[0] for g in got] == [200] * count


def test_request_split_across_writes(server: Server, files: dict[str, Any]) -> None:
    """A request that arrives a few bytes at a time is answered once it is complete."""
    with raw_socket(server) as s:
        wire = b"GET /text.txt HTTP/1.1\r\nHost: x\r\n\r\n"
        for i in range(0, len(wire), 5):
            s.sendall(wire[i:i + 5])
        assert read_responses(s, ["GET"])[0][2] == files["content"]["text.txt"]


# -- ranges and conditions ----------------------------------------------------------------------


@pytest.mark.parametrize("name, value, start, end", [
    ("text.txt", "bytes=0-9", 0, 9),
    ("text.txt", "bytes=10-", 10, 1299),
    ("text.txt", "bytes=-5", 1295, 1299),
    ("text.txt", "bytes=1290-99999", 1290, 1299),
    ("text.txt", "bytes=-100000", 0, 1299),
    ("text.txt", "bytes=7-7", 7, 7),
    ("big.bin", "bytes=4095-2100000", 4095, 2100000),
    ("big.bin", "bytes=-1048577", BIG - 1048577, BIG - 1),
    ("big.bin", "bytes=1-", 1, BIG - 1),
])
def test_single_range_is_206(server: Server, files: dict[str, Any], name: str, value: str,
                             start: int, end: int) -> None:
    """bytes=a-b, a- and -n give 206 with Content-Range and exactly those bytes."""
    data = files["content"][name]
    status, headers, body = get(server, "/" + name, headers={"Range": value})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
    assert headers["Content-Length"] == str(end - start + 1)
    assert body == data[start:end + 1]


@pytest.mark.parametrize("value", ["bytes=0-1,5-6", "bytes=abc", "items=0-5", "bytes=9-2", "bytes=-"])
def test_ignored_range_gives_whole_file(server: Server, files: dict[str, Any], value: str) -> None:
    """Several ranges, another unit or bad syntax: the whole file, 200 (RFC 9110 allows it)."""
    status, headers, body = get(server, "/text.txt", headers={"Range": value})
    assert (status, body) == (200, files["content"]["text.txt"])
    assert "Content-Range" not in headers


@pytest.mark.parametrize("name, value", [
    ("text.txt", "bytes=1300-"), ("text.txt", "bytes=5000-6000"), ("text.txt", "bytes=-0"),
    ("empty.txt", "bytes=0-"), ("empty.txt", "bytes=-5"),
])
def test_unsatisfiable_range_is_416(server: Server, files: dict[str, Any], name: str, value: str) -> None:
    """A range that starts past the end: 416 with Content-Range: bytes */size."""
    status, headers, _ = get(server, "/" + name, headers={"Range": value})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{len(files['content'][name])}"


def test_range_on_head_has_no_body(server: Server) -> None:
    status, headers, body = get(server, "/big.bin", "HEAD", {"Range": "bytes=100-199"})
    assert (status, body) == (206, b"")
    assert headers["Content-Length"] == "100"


def test_if_modified_since_and_if_range(server: Server, files: dict[str, Any]) -> None:
    """If-Modified-Since at or after the mtime: 304 without body; before it: 200.  If-Range with
    the current date honours Range, with another date sends the whole file."""
    _, headers, _ = get(server, "/text.txt")
    stamp = headers["Last-Modified"]
    status, headers304, body = get(server, "/text.txt", headers={"If-Modified-Since": stamp})
    assert (status, body) == (304, b"")
    assert headers304["Last-Modified"] == stamp
    old = email.utils.formatdate(0, usegmt=True)
    assert get(server, "/text.txt", headers={"If-Modified-Since": old})[0] == 200
    assert get(server, "/text.txt", headers={"If-Modified-Since": "not a date"})[0] == 200
    status, _, body = get(server, "/text.txt", headers={"Range": "bytes=0-3", "If-Range": stamp})
    assert (status, body) == (206, files["content"]["text.txt"][:4])
    status, _, body = get(server, "/text.txt", headers={"Range": "bytes=0-3", "If-Range": old})
    assert (status, body) == (200, files["content"]["text.txt"])


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, code", [
    ("/missing.txt", 404), ("/sub/missing/deeper.txt", 404), ("/text.txt/", 404),
    ("/nodir/", 403), ("/fifo", 403),
])
def test_missing_and_refused_paths(server: Server, path: str, code: int) -> None:
    """404 for what does not exist, 403 for a directory without index and for a FIFO."""
    status, headers, body = get(server, path)
    assert status == code
    assert body == f"{code} {http.client.responses[code]}\n".encode()
    assert headers["Content-Type"] == "text/plain; charset=utf-8"


def test_unreadable_file_is_403(server: Server, files: dict[str, Any]) -> None:
    """A file the server may not read (mode 000; as root, the server runs without the
    capabilities that bypass permissions) is 403."""
    if not server.denies:
        pytest.skip("running as root, and CAP_DAC_OVERRIDE could not be dropped (no CAP_SETPCAP?)")
    assert stat.S_IMODE(os.stat(files["root"] / "secret.txt").st_mode) == 0
    assert get(server, "/secret.txt")[0] == 403


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "get"])
def test_other_methods_are_405(server: Server, method: str) -> None:
    """Anything but GET and HEAD (methods are case-sensitive) is 405 with Allow: GET, HEAD."""
    status, headers, _ = get(server, "/text.txt", method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_405_with_a_body_then_the_connection_closes(server: Server) -> None:
    response = raw(server, b"POST /text.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert status_of(response) == 405
    assert b"Connection: close\r\n" in response


@pytest.mark.parametrize("wire", [
    b"GARBAGE\r\n\r\n",
    b"GET /text.txt\r\n\r\n",
    b"GET  /text.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /text.txt HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GET text.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /text.txt HTTP/x.y\r\nHost: x\r\n\r\n",
    b"GET /text.txt HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET /text.txt HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /text.txt HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"GET /text.txt HTTP/1.1\r\n\r\n",
    b"GET /text.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET /a%00b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_requests_are_400_and_close(server: Server, wire: bytes) -> None:
    """A bad request line or header (including a 1.1 request without Host) is 400, and the
    server closes the connection after saying so."""
    response = raw(server, wire)
    assert status_of(response) == 400
    assert b"Connection: close\r\n" in response


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/3.0"])
def test_other_versions_are_505(server: Server, version: bytes) -> None:
    response = raw(server, b"GET /text.txt " + version + b"\r\nHost: x\r\n\r\n")
    assert status_of(response) == 505


def test_oversized_head_is_431(server: Server) -> None:
    """A request head over 16 KiB is refused with 431, whether or not it has ended yet."""
    big = b"GET /text.txt HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"
    assert status_of(raw(server, big)) == 431
    with raw_socket(server) as s:  # never-ending header: refused once past the limit
        s.sendall(b"GET /text.txt HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000)
        assert status_of(s.recv(65536)) == 431


# -- what must never be served ---------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    b"/../outside.txt", b"/%2e%2e/outside.txt", b"/%2E%2E/outside.txt", b"/sub/../../outside.txt",
    b"/./../outside.txt", b"/..%2foutside.txt", b"/sub%2f..%2f..%2foutside.txt", b"/escape",
    b"/escape-relative", b"//etc/passwd", b"/../../../../etc/passwd", b"/%2e%2e/%2e%2e/etc/passwd",
    b"http://x/../outside.txt", b"/sub/..", b"/..",
])
def test_traversal_is_refused(server: Server, target: bytes) -> None:
    """Paths that would leave the root (``..``, encoded ``..``, symlinks pointing out, absolute
    paths) are refused with 403 or 404, and no byte of a file outside the root comes back."""
    response = raw(server, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) in (403, 404)
    assert SECRET.strip() not in response
    assert b"root:" not in response


def test_symlink_inside_the_root_is_followed(server: Server, files: dict[str, Any]) -> None:
    assert get(server, "/inside-link")[2] == files["content"]["text.txt"]


# -- connections ------------------------------------------------------------------------------------


def test_connection_close_is_honoured(server: Server, files: dict[str, Any]) -> None:
    """Connection: close gets the answer, the header back, then the end of the stream."""
    response = raw(server, b"GET /small.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 200
    assert b"\r\nConnection: close\r\n" in response
    assert response.endswith(files["content"]["small.bin"])


def test_http10_closes_unless_keep_alive(server: Server, files: dict[str, Any]) -> None:
    """HTTP/1.0 closes after the answer, unless it asked for keep-alive."""
    response = raw(server, b"GET /text.txt HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200
    assert response.endswith(files["content"]["text.txt"])
    with raw_socket(server) as s:
        for _ in range(3):
            s.sendall(b"GET /small.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = read_responses(s, ["GET"])[0]
            assert (status, body) == (200, files["content"]["small.bin"])
            assert headers["connection"] == "keep-alive"


def test_client_gone_mid_body_does_not_hurt(server: Server, files: dict[str, Any]) -> None:
    """Clients that vanish in the middle of a large body (closing, or resetting the connection)
    leave the server serving: the next request is answered in full."""
    for reset in (False, True):
        for _ in range(3):
            s = raw_socket(server)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200 OK")
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        status, _, body = get(server, "/big.bin")
        assert (status, body) == (200, files["content"]["big.bin"])
    assert server.proc.poll() is None


@pytest.mark.parametrize("path, value", [
    ("/big.bin", None), ("/small.bin", None), ("/text.txt", "bytes=3-1000"),
    ("/big.bin", "bytes=4095-2100000"), ("/big.bin", "bytes=-300000"), ("/big.bin", "bytes=1048575-1048577"),
])
def test_both_body_paths(body_server: Server, files: dict[str, Any], path: str, value: str | None) -> None:
    """Bodies come out the same through a buffer (in 256 KiB steps) and spliced (file -> pipe
    -> socket, a pipe-full at a time, from any offset)."""
    data = files["content"][path[1:]]
    status, headers, body = get(body_server, path, headers={"Range": value} if value else None)
    if value is None:
        assert (status, body) == (200, data)
    else:
        first, _, last = value.removeprefix("bytes=").partition("-")
        start = len(data) - int(last) if not first else int(first)
        end = min(int(last), len(data) - 1) if first else len(data) - 1
        assert (status, body) == (206, data[start:end + 1])
        assert headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"


def test_file_not_in_page_cache(body_server: Server, files: dict[str, Any]) -> None:
    """A file dropped from the page cache (where the file system can: not tmpfs) is read by
    the ring instead of preadv2(RWF_NOWAIT), or spliced from the disk, and arrives whole."""
    data = os.urandom(700_000)
    path = files["root"] / f"cold-{body_server.kind}.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    status, _, body = get(body_server, "/" + path.name)
    assert (status, body) == (200, data)


def test_idle_connection_is_closed(body_server: Server, files: dict[str, Any]) -> None:
    """With --timeout 1 a connection that stays silent after an answer is closed by the server
    (end of stream), within a few seconds."""
    with raw_socket(body_server) as s:
        s.sendall(b"GET /small.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(s, ["GET"])[0][2] == files["content"]["small.bin"]
        assert s.recv(100) == b""  # the socket's timeout (TIMEOUT) bounds the wait


def test_access_log_has_one_line_per_request(server: Server) -> None:
    """Without --quiet, each answered request gets a line on stderr."""
    get(server, "/page.html?logged=1")
    deadline = time.monotonic() + TIMEOUT  # the line is written once the answer has been sent
    while b'"GET /page.html?logged=1 HTTP/1.1" 200 12\n' not in server.log.read_bytes():
        assert time.monotonic() < deadline, server.log.read_text(errors="replace")
        time.sleep(0.01)


# -- the program ------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly(files: dict[str, Any], tmp_path: Path, signum: int) -> None:
    """SIGINT or SIGTERM with connections open and a body in flight: exit status 0, no
    traceback, nothing more on stderr."""
    srv = Server(files["root"], tmp_path / "stderr.txt", "--quiet")
    idle = raw_socket(srv)
    busy = raw_socket(srv)
    try:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        busy.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        assert busy.recv(100).startswith(b"HTTP/1.1 200")  # the body is on its way, unread
        code, err = srv.stop(signum)
    finally:
        idle.close()
        busy.close()
    assert code == 0
    assert err == ""


def test_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A port another socket holds: one line on stderr, exit status 1."""
    module = load_example()
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code = module.main(["--port", str(port), "--directory", str(tmp_path)])
    assert code == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"http_server.py: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_bad_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """A directory that does not exist (or is a file): one line on stderr, exit status 1."""
    module = load_example()
    path = tmp_path / "nope"
    if kind == "file":
        path.write_bytes(b"x")
    assert module.main(["--port", "0", "--directory", str(path)]) == 1
    why = "No such file or directory" if kind == "missing" else "Not a directory"
    assert capsys.readouterr().err == f"http_server.py: {path}: {why}\n"


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example()
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--directory", "--backend", "--quiet"):
        assert option in out


def test_bad_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example()
    with pytest.raises(SystemExit) as exc:
        module.main(["--port", "70000"])
    assert exc.value.code == 2
    assert "--port must be between 0 and 65535" in capsys.readouterr().err


@pytest.mark.parametrize("value, expected", [
    ("bytes=0-0", (0, 1)), ("bytes=3-", (3, 7)), ("bytes=-3", (7, 3)), ("bytes=5-100", (5, 5)),
    ("bytes=10-", False), ("bytes=-0", False), ("bytes=2-1", None), ("bytes=0-1,3-4", None),
    ("bytes = 1 - 2", (1, 2)), ("pages=1-2", None),
])
def test_parse_range(value: str, expected: object) -> None:
    """The range parser on a 10-byte file: (start, length), False (416) or None (ignored)."""
    assert load_example().parse_range(value, 10) == expected
