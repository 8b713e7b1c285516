"""A static-file HTTP/1.1 server on one io_uring ring.

    python examples/http_server.py [--directory DIR] [--host 127.0.0.1] [--port 8000] [--quiet]

It serves the files under DIR (default: the working directory) for ``GET`` and ``HEAD``, with
keep-alive, pipelining, single byte ranges, ``Last-Modified``/``If-Modified-Since`` and a line
per request on stderr (``--quiet`` turns the log off).  With ``--port 0`` the kernel picks a free
port; the first line on stdout always says where the server listens.  Ctrl-C or SIGTERM stops
it: every request in flight is cancelled, every descriptor closed, exit status 0.

Why the synchronous ``Ring`` and not ``saferring.aio``
------------------------------------------------------
The server is one loop around ``ring.wait()``: a multishot ``accept`` on the listener, one
multishot ``recv`` per connection into a shared ``BufferRing``, and per request an ``openat2``
and the body, as *linked* requests where the kernel must not start the second before the first
is done (``splice`` file -> pipe then pipe -> socket; ``read`` then ``send`` of the same
buffer).  A link starts the second request the moment the first completes, without a trip
through Python, and a short first one cancels the second instead of letting stale bytes out.
On ``saferring.aio`` the same server would answer from protocol callbacks and await its
``openat2`` in a task per request, and the transport owns the socket's write queue (its
``write()`` first tries a plain ``send()``), so a splice into that socket would have to wait for
the queue to empty.  A prototype of the 1 KiB path on ``aio.create_server`` served a median
0.6x the requests per second of this loop over eight alternating ``wrk`` runs, using about
1.5x the CPU time per request: every completion costs an asyncio callback or task step on top
of the ring's own work.  Figures against ``http.server``, asyncio and uvloop:
benchmarks/test_bench_http.py.

How a request is answered
-------------------------
* The path is percent-decoded and split into segments; a ``..`` segment is refused (403), empty
  and ``.`` segments are dropped (so ``//etc/passwd`` is ``etc/passwd`` under the root).  The
  file is opened with ``openat2(..., resolve=RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``
  relative to the root's descriptor: the kernel refuses (``EXDEV``, answered 403) any
  resolution that leaves the root, through ``..`` or through a symlink, at the moment of the
  open, so a symlink swapped in between a check and the open cannot escape either.
* A directory answers with its ``index.html`` if it has one, else 403 (no listings: they would
  show names the operator may not mean to publish).  A directory asked for without the trailing
  slash is redirected (301) to the slash form, so relative links in its index work.
* Anything but a regular file (FIFO, device, socket) is 403; a file the server may not read is
  403; a missing one 404.
* ``Range: bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` give 206 with ``Content-Range``; a range
  that starts past the end gives 416 with ``Content-Range: bytes */SIZE``.  Several ranges in
  one header are answered with the whole file (200), which RFC 9110 allows, and so is a
  ``Range`` header the server cannot parse.  ``If-Range`` is honoured for dates (there are no
  ETags).  ``If-Modified-Since`` at or after the file's mtime gives 304.
* Bodies of ``--splice-threshold`` bytes (128 KiB) and more go file -> pipe -> socket, two
  linked ``splice`` requests per pipe-full, and never enter Python (one pipe per connection,
  enlarged to 1 MiB where the system allows; the response head is written into the pipe first
  and leaves with the first chunk).  Smaller ones are copied behind the head in one buffer and
  sent with it: ``preadv2(RWF_NOWAIT)`` takes what the page cache holds without blocking, and
  what it could not get is read by a ``read`` linked to the ``send``.  The kernel runs every
  splice in a worker thread, which costs more than copying a few pages.  Measured with
  ``wrk -t1 -c10 -d2s`` (server and wrk pinned to a CPU each, median of five alternating runs;
  requests/s and the server's CPU time per request), copy against splice: 16 KiB 13,400
  (71 us) against 10,200 (94 us); 64 KiB 12,500 (79 us) against 11,600 (85 us); 128 KiB 8,600
  (117 us) against 9,600 (104 us); 256 KiB 3,400 (286 us) against 6,200 (154 us); 1 MiB 1,380
  (630 us) against 1,770 (475 us).  Where ``splice`` is missing or the file system refuses it
  (``EINVAL``), large bodies go the copy way too, 256 KiB at a time.
* A malformed request line or header is 400, a head over 16 KiB (or over 100 lines) 431, a
  version other than HTTP/1.0 and 1.1 505: the connection is closed after these answers.  A
  method other than GET and HEAD is 405 with ``Allow: GET, HEAD`` (closing only if the request
  had a body).
* HTTP/1.1 connections stay open unless the request says ``Connection: close``; HTTP/1.0 ones
  close unless it says ``Connection: keep-alive``.  Requests that arrive together are answered
  one after the other, in order; reading pauses while more than 1 MiB of them waits.  A
  connection is closed after ``--timeout`` seconds without a request; one being closed is first
  shut down for writing, then read (and the bytes dropped) for up to two seconds until the
  client closes it, so that the last answer is not lost to a reset.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import fcntl
import http
import mimetypes
import os
import re
import select
import signal
import socket
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any
from urllib.parse import unquote_to_bytes

import saferring
from saferring.constants import RESOLVE_BENEATH, RESOLVE_NO_MAGICLINKS

PROG = "http_server.py"
SERVER = f"saferring-http/{saferring.__version__}".encode()
HEAD_LIMIT = 16 * 1024  # request line + headers
MAX_HEADER_LINES = 100
MAX_BUFFERED = 1 << 20  # unanswered request bytes kept per connection before reading pauses
RECV_BUFFERS = 128  # shared by every connection's multishot recv
RECV_BUFFER_SIZE = 8192
COPY_CHUNK = 256 * 1024  # read + send fallback for large bodies
SPLICE_THRESHOLD = 128 * 1024  # bodies this large and larger are spliced (see the docstring)
PIPE_SIZE = 1 << 20  # asked of F_SETPIPE_SZ (the default pipe-max-size for unprivileged users)
PAGE = os.sysconf("SC_PAGE_SIZE")
LINGER_SECONDS = 2.0
RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no spaces, controls or raw 8-bit bytes
_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_CANCELLED = saferring.OpState.CANCELLED

# errno of a failed open -> status.  EXDEV: the path left the root (RESOLVE_BENEATH); ELOOP: a
# symlink loop, or a magic link (RESOLVE_NO_MAGICLINKS).
_OPEN_STATUS = {
    errno.ENOENT: 404, errno.ENOTDIR: 404, errno.ENAMETOOLONG: 404,
    errno.EACCES: 403, errno.EPERM: 403, errno.EXDEV: 403, errno.ELOOP: 403,
    errno.EMFILE: 503, errno.ENFILE: 503, errno.ENOMEM: 503,
}


class Request:
    """What the answer to one request needs from it."""

    __slots__ = ("dev", "head", "headers", "index", "keep_alive", "line", "path", "slash",
                 "status", "target", "version")

    def __init__(self, line: bytes, head: bool, version: bytes, keep_alive: bool,
                 headers: dict[str, str]) -> None:
        self.line = line  # the request line, for the log
        self.head = head  # HEAD: the answer has no body
        self.version = version
        self.keep_alive = keep_alive
        self.headers = headers
        self.target = b""  # the path as asked (for a redirect's Location)
        self.path = b""  # the path to open, relative to the root
        self.slash = False  # the path ended with "/"
        self.index = False  # path is a directory's index.html
        self.status = 0
        self.dev = 0  # st_dev of the file


class Conn:
    """One client connection and the answer in progress on it."""

    __slots__ = (
        "body_left",
        "body_off",
        "buf",
        "busy",
        "chunk",
        "close_after",
        "closing",
        "eof",
        "error",
        "fd",
        "file_fd",
        "inbuf",
        "inflight",
        "last",
        "linger_since",
        "out",
        "paused",
        "peer",
        "pipe_fill",
        "pipe_r",
        "pipe_size",
        "pipe_w",
        "read_n",
        "recv",
        "req",
        "sent",
        "skip",
        "sock",
        "step",
    )

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()
        self.recv: saferring.Operation[Any] | None = None
        self.inflight = 0  # this connection's requests in the ring (its fds stay open until 0)
        self.busy = False  # an answer is being sent (later requests wait in inbuf)
        self.eof = False  # the client sent its last byte
        self.paused = False  # recv cancelled: too many unanswered bytes
        self.closing = False  # aborted: close as soon as nothing of ours is in the ring
        self.close_after = False  # close once the current answer is out
        self.linger_since = 0.0  # shut down for writing at this time, waiting for the client
        self.last = time.monotonic()
        self.skip = 0  # request body bytes still to discard
        self.req: Request | None = None
        self.file_fd = -1
        self.pipe_r = self.pipe_w = -1
        self.pipe_size = 0
        self.pipe_fill = 0  # bytes in the pipe, not yet spliced to the socket
        self.body_off = 0  # file offset of the next body byte to move
        self.body_left = 0  # body bytes still to move out of the file
        self.buf: bytearray | None = None  # the copy path's buffer
        self.out = memoryview(b"")  # what the current plain send is sending
        self.chunk = 0  # bytes of buf the current send is to send
        self.read_n = 0  # bytes the current read was asked for
        self.sent = 0  # body bytes sent (for the log)
        self.step = 0  # requests of the current body step still in the ring
        self.error = 0  # errno of a failed splice in the current step


# handler(conn, op): conn is None for the server's own requests (accept, the signal poll).
Handler = Callable[[Any, "saferring.Operation[Any]"], None]


class _Date:
    """The Date header's value, formatted once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def now(self) -> bytes:
        t = int(time.time())
        if t != self.second:
            self.second = t
            self.value = email.utils.formatdate(t, usegmt=True).encode()
        return self.value


_TYPES: dict[bytes, bytes] = {}  # extension -> Content-Type
_DATES: dict[int, bytes] = {}  # mtime -> Last-Modified


def content_type(name: bytes) -> bytes:
    """The Content-Type for a file name (by extension, ``mimetypes``), cached per extension."""
    ext = name[name.rfind(b"."):] if b"." in name.rpartition(b"/")[2] else b""
    got = _TYPES.get(ext)
    if got is None:
        kind, encoding = mimetypes.guess_type("f" + ext.decode("utf-8", "surrogateescape"))
        if encoding is not None:  # foo.tar.gz is a gzip file, whatever is inside
            kind = {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                    "xz": "application/x-xz"}.get(encoding, "application/octet-stream")
        got = _TYPES[ext] = (kind or "application/octet-stream").encode()
    return got


def parse_range(value: str, size: int) -> tuple[int, int] | bool | None:
    """One ``bytes=`` range against a file of ``size`` bytes.

    Returns ``(start, length)`` for a satisfiable range, ``False`` for an unsatisfiable one (416),
    ``None`` when the header is to be ignored (several ranges, another unit, bad syntax:
    the whole file is sent).
    """
    m = _RANGE.fullmatch(value)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        end = int(last) if last else size - 1
        if last and end < start:
            return None  # invalid: RFC 9110 says to ignore the header
        if start >= size:
            return False
        end = min(end, size - 1)
        return start, end - start + 1
    if not last:
        return None  # "bytes=-"
    n = int(last)
    if n == 0 or size == 0:
        return False
    n = min(n, size)
    return size - n, n


def split_path(target: bytes) -> tuple[bytes, bool] | int:
    """The request target -> (path relative to the root, ends with "/"), or an error status.

    ``..`` segments are refused (403) before the kernel sees the path; ``openat2`` with
    ``RESOLVE_BENEATH`` refuses every other way out (symlinks) when the file is opened.
    """
    if target.startswith((b"http://", b"https://")):  # absolute-form: keep the path only
        slash = target.find(b"/", target.index(b"//") + 2)
        target = target[slash:] if slash >= 0 else b"/"
    if not target.startswith(b"/"):
        return 400
    path = target.partition(b"?")[0].partition(b"#")[0]
    if b"%" not in path and b"/." not in path and b"//" not in path:
        return path[1:].rstrip(b"/"), path.endswith(b"/")  # nothing to decode or drop
    decoded = unquote_to_bytes(path)
    if b"\0" in decoded:
        return 400
    parts = []
    for seg in decoded.split(b"/"):
        if seg == b"..":
            return 403
        if seg and seg != b".":
            parts.append(seg)
    return b"/".join(parts), decoded.endswith(b"/")


class Server:
    """The listener, the ring, the connections, and the loop that dispatches completions."""

    def __init__(self, root_fd: int, quiet: bool, timeout: float, splice_threshold: int) -> None:
        self.root_fd = root_fd  # the served directory, owned (closed by close())
        self.quiet = quiet
        self.timeout = timeout
        self.splice_threshold = splice_threshold
        self.listener: socket.socket | None = None
        self.ring: saferring.Ring | None = None
        self.buffers: saferring.BufferRing | None = None
        self.handlers: dict[saferring.Operation[Any], tuple[Handler, Conn | None]] = {}
        self.conns: set[Conn] = set()
        self.accept_op: saferring.Operation[Any] | None = None
        self.stopping = False
        self.signal_r = self.signal_w = -1
        self.date = _Date()
        self.can_splice = True
        self.no_splice: set[int] = set()  # devices whose file system refused a splice

    # -- life cycle ------------------------------------------------------------------------

    def listen(self, host: str, port: int) -> None:
        """A listening TCP socket on host:port (IPv4 or IPv6, numeric or a name)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        self.listener = socket.socket(family, kind, proto)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(address)
        self.listener.listen(1024)

    def url(self) -> str:
        """Where the server listens, as a URL (the port the kernel picked for port 0)."""
        assert self.listener is not None
        host, port = self.listener.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def open(self) -> None:
        """Create the ring and the shared receive buffers, start accepting."""
        self.ring = ring = _new_ring()
        self.can_splice = ring.features.supports("SPLICE")
        self.buffers = saferring.BufferRing(ring, RECV_BUFFERS, RECV_BUFFER_SIZE)
        self._arm_accept()

    def watch_signals(self) -> None:
        """SIGINT and SIGTERM end the loop: Python writes the signal number to a pipe (its
        wakeup fd) and a ``poll`` on the ring completes, instead of an exception being raised
        at whatever point the loop was."""
        assert self.ring is not None
        self.signal_r, self.signal_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.signal_w, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT in a "cmd &" job
                signal.signal(signum, _no_op)
        # A poll, not a read: the pipe is non-blocking (set_wakeup_fd wants it so), and io_uring
        # completes a read of an empty O_NONBLOCK pipe at once with -EAGAIN.
        self._track(self.ring.poll_add(self.signal_r, select.POLLIN), self._on_signal, None)

    def close(self) -> None:
        """Cancel everything in flight, wait for the kernel to let go, close every descriptor."""
        for conn in self.conns:
            _shutdown(conn.sock, socket.SHUT_RDWR)  # ends blocked splices and sends at once
        if self.ring is not None:
            try:
                self.ring.close(timeout=10)  # cancels what is in flight, reaps every completion
            finally:
                self.handlers.clear()  # unclaimed accepted/opened descriptors close with them
                self.accept_op = None
                for conn in self.conns:
                    _close_conn_fds(conn)
                self.conns.clear()
        if self.listener is not None:
            self.listener.close()
        for fd in (self.root_fd, self.signal_r, self.signal_w):
            if fd >= 0:
                os.close(fd)
        self.root_fd = self.signal_r = self.signal_w = -1

    def _arm_accept(self) -> None:
        assert self.ring is not None and self.listener is not None
        self.accept_op = self.ring.accept(self.listener, multishot=True)
        self._track(self.accept_op, self._on_accept, None)

    def _track(self, op: saferring.Operation[Any], handler: Handler, conn: Conn | None) -> None:
        """Call ``handler(conn, op)`` when ``op`` completes (or, multishot, yields values)."""
        self.handlers[op] = (handler, conn)
        if conn is not None:
            conn.inflight += 1

    def serve(self) -> None:
        """Dispatch completions until a signal asks to stop."""
        assert self.ring is not None
        wait = self.ring.wait
        handlers = self.handlers
        next_sweep = time.monotonic() + 1.0
        while not self.stopping:
            for op in wait(1, 1.0):
                entry = handlers.get(op)
                if entry is None:
                    continue
                handler, conn = entry
                if op.done():
                    del handlers[op]
                    if conn is not None:
                        conn.inflight -= 1
                if conn is None:
                    handler(conn, op)
                    continue
                try:
                    handler(conn, op)
                except Exception:  # noqa: BLE001 - a bug here loses the connection, not the server
                    traceback.print_exc()
                    self._abort(conn)
                if conn.closing and conn.inflight == 0:
                    self._forget(conn)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 1.0
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Once a second: close idle connections and give up on lingering ones; re-arm the
        accept if it ended (e.g. EMFILE)."""
        for conn in list(self.conns):
            if conn.closing:
                continue
            if conn.linger_since and now - conn.linger_since > LINGER_SECONDS:
                self._abort(conn)
            elif not conn.busy and not conn.linger_since and now - conn.last > self.timeout:
                self._linger(conn)
        if self.accept_op is None and not self.stopping:
            self._arm_accept()

    # -- server-wide completions -------------------------------------------------------------

    def _on_signal(self, _conn: Conn | None, _op: saferring.Operation[Any]) -> None:
        # The wakeup fd receives the number of every signal that has a Python handler: stop
        # for ours, keep watching for anything else (a SIGCHLD handler someone installed).
        try:
            got = os.read(self.signal_r, 512)
        except BlockingIOError:
            got = b""
        if signal.SIGINT in got or signal.SIGTERM in got:
            self.stopping = True
        else:
            assert self.ring is not None
            self._track(self.ring.poll_add(self.signal_r, select.POLLIN), self._on_signal, None)

    def _on_accept(self, _conn: Conn | None, op: saferring.Operation[Any]) -> None:
        for fd in op.take():  # type: ignore[attr-defined]  # a multishot accept
            try:
                self._connect(fd)
            except OSError as exc:
                os.close(fd)
                self.log_error(f"new connection: {exc.strerror}")
        if op.done():
            self.accept_op = None
            try:
                op.result()
            except OSError as exc:
                self.log_error(f"accept: {exc.strerror}; trying again in a second")

    def _connect(self, fd: int) -> None:
        """Start serving a new connection (``fd`` is closed by the caller if this raises)."""
        sock = socket.socket(fileno=fd)
        try:
            # The last segment of an answer must not wait for the client's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = "-" if self.quiet else str(sock.getpeername()[0])
            conn = Conn(sock, peer)
            self._start_recv(conn)
        except BaseException:
            sock.detach()
            raise
        self.conns.add(conn)

    def _start_recv(self, conn: Conn) -> None:
        assert self.ring is not None and self.buffers is not None
        conn.paused = False
        conn.recv = self.ring.recv_multishot(conn.fd, self.buffers)
        self._track(conn.recv, self._on_recv, conn)

    # -- receiving and parsing ---------------------------------------------------------------

    def _on_recv(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        keep = not conn.closing and not conn.linger_since
        for buf in op.take():  # type: ignore[attr-defined]  # Buffers from the BufferRing
            if buf is None:
                continue
            if keep:
                conn.inbuf += buf.tobytes()
            buf.release()  # back to the kernel for the next chunk, of any connection
        if op.done():
            conn.recv = None
            if op.state is _CANCELLED and conn.paused:
                pass  # paused on purpose: resumed once the backlog is answered
            else:
                conn.eof = True  # end of stream, a reset, or our own shutdown
                conn.paused = False
                if conn.linger_since or op.state is not saferring.OpState.COMPLETED:
                    self._abort(conn)
                    return
        if keep:
            conn.last = time.monotonic()
            if len(conn.inbuf) > MAX_BUFFERED and conn.recv is not None and not conn.paused:
                conn.paused = True  # the client sends faster than it reads the answers
                conn.recv.cancel()
            if not conn.busy:
                self._next_request(conn)

    def _next_request(self, conn: Conn) -> None:
        """Start answering the next complete request in ``conn.inbuf``, if there is one."""
        while not conn.busy and not conn.closing and not conn.linger_since:
            inbuf = conn.inbuf
            if conn.skip:
                drop = min(conn.skip, len(inbuf))
                del inbuf[:drop]
                conn.skip -= drop
                if conn.skip:
                    break
            while inbuf[:2] == b"\r\n":  # RFC 9112: ignore empty lines before a request
                del inbuf[:2]
            m = _HEAD_END.search(inbuf)
            if m is None or m.end() > HEAD_LIMIT:
                if m is not None or len(inbuf) > HEAD_LIMIT:
                    self._error(conn, None, 431)
                elif conn.eof and inbuf:
                    self._linger(conn)  # half a request, then the end: nothing to answer
                elif conn.eof:
                    self._abort(conn)
                break
            head = bytes(inbuf[:m.start()])
            del inbuf[:m.end()]
            self._request(conn, head)
        if conn.paused and conn.recv is None and len(conn.inbuf) < MAX_BUFFERED // 2 \
                and not conn.closing and not conn.linger_since:
            self._start_recv(conn)

    def _request(self, conn: Conn, head: bytes) -> None:
        """Parse one request head and start its answer."""
        lines = head.split(b"\n")
        line = lines[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3:
            return self._error(conn, None, 400, line)
        method, target, version = parts
        if (method not in (b"GET", b"HEAD") and not _TOKEN.fullmatch(method)) \
                or not _TARGET.fullmatch(target):
            return self._error(conn, None, 400, line)
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            return self._error(conn, None, 505 if _VERSION.fullmatch(version) else 400, line)
        if len(lines) > MAX_HEADER_LINES:
            return self._error(conn, None, 431, line)
        headers: dict[str, str] = {}
        for raw in lines[1:]:
            raw = raw.rstrip(b"\r")
            name, colon, value = raw.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):  # also refuses obs-fold and "Name :"
                return self._error(conn, None, 400, line)
            key = name.decode("ascii").lower()
            text = value.strip(b" \t").decode("latin-1")
            if key in headers:
                if key in ("host", "content-length") and headers[key] != text:
                    return self._error(conn, None, 400, line)
                headers[key] = f"{headers[key]}, {text}"
            else:
                headers[key] = text
        connection = headers.get("connection")
        tokens = {t.strip().lower() for t in connection.split(",")} if connection else set()
        if version == b"HTTP/1.1":
            keep_alive = "close" not in tokens
            if "host" not in headers:  # RFC 9112 3.2: a 1.1 request without Host is a 400
                return self._error(conn, None, 400, line)
        else:
            keep_alive = "keep-alive" in tokens
        req = Request(line, method == b"HEAD", version, keep_alive, headers)
        if "transfer-encoding" in headers:
            req.keep_alive = False  # a body we will not decode: the connection ends with it
        elif "content-length" in headers:
            length = headers["content-length"].split(",")[0].strip()
            if not length.isdigit():
                return self._error(conn, req, 400)
            conn.skip = int(length)
        if method not in (b"GET", b"HEAD"):
            return self._error(conn, req, 405)
        split = split_path(target)
        if isinstance(split, int):
            return self._error(conn, req, split)
        req.target = target.partition(b"?")[0]
        req.path, req.slash = split
        # The trailing slash goes to the kernel too: "file.txt/" is then ENOTDIR (404).
        self._open(conn, req, self.root_fd, req.path + b"/" if req.slash and req.path else req.path or b".")

    # -- opening -----------------------------------------------------------------------------

    def _open(self, conn: Conn, req: Request, dir_fd: int, path: bytes) -> None:
        assert self.ring is not None
        conn.busy = True
        conn.req = req
        # O_NONBLOCK: opening a FIFO would otherwise wait for a writer.  It is cleared before
        # the file is read or spliced through the ring, where it could turn a wait for the disk
        # into EAGAIN: io_uring fails reads of O_NONBLOCK files on file systems that cannot
        # read without blocking, and splice() takes O_NONBLOCK on either end as SPLICE_F_NONBLOCK.
        op = self.ring.openat2(path, os.O_RDONLY | os.O_NONBLOCK, 0, resolve=RESOLVE, dir_fd=dir_fd)
        self._track(op, self._on_open, conn)

    def _on_open(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        req = conn.req
        assert req is not None
        try:
            fd: int = op.result()
        except OSError as exc:
            if req.index and conn.file_fd >= 0:  # the directory's index.html: done with it
                os.close(conn.file_fd)
                conn.file_fd = -1
            if conn.closing:
                return
            code = 403 if req.index and exc.errno == errno.ENOENT else \
                _OPEN_STATUS.get(exc.errno or 0, 500)
            return self._error(conn, req, code)
        if conn.file_fd >= 0:  # the directory whose index.html this is
            os.close(conn.file_fd)
        conn.file_fd = fd
        if conn.closing:
            return self._close_file(conn)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            if req.index:
                return self._error(conn, req, 403)  # index.html is a directory
            if not req.slash and req.path:
                return self._redirect(conn, req)
            req.index = True
            return self._open(conn, req, fd, b"index.html")
        if not stat.S_ISREG(st.st_mode):
            return self._error(conn, req, 403)
        self._answer(conn, req, st)

    # -- answering ---------------------------------------------------------------------------

    def _answer(self, conn: Conn, req: Request, st: os.stat_result) -> None:
        """The head and body for a regular file: 200, 206, 304 or 416."""
        size = st.st_size
        mtime = int(st.st_mtime)
        last_modified = _http_time(mtime)
        headers = req.headers
        since = headers.get("if-modified-since")
        if since is not None and "if-none-match" not in headers:
            when = _http_date(since)
            if when is not None and mtime <= when:
                self._close_file(conn)
                return self._send_head(conn, req, 304, [b"Last-Modified: " + last_modified])
        name = req.path + b"/index.html" if req.index else req.path
        extra = [b"Content-Type: " + content_type(name), b"Last-Modified: " + last_modified,
                 b"Accept-Ranges: bytes"]
        start, length, code = 0, size, 200
        wanted = headers.get("range")
        if wanted is not None:
            if_range = headers.get("if-range")
            if if_range is None or _http_date(if_range) == mtime:
                got = parse_range(wanted, size)
                if got is False:
                    self._close_file(conn)
                    return self._error(conn, req, 416, extra=[f"Content-Range: bytes */{size}".encode()])
                if got is not None:
                    start, length = got  # type: ignore[misc]  # a tuple here
                    code = 206
                    extra.append(f"Content-Range: bytes {start}-{start + length - 1}/{size}".encode())
        extra.append(b"Content-Length: %d" % length)
        head = self._head(req, code, extra)
        if req.head or length == 0:
            self._close_file(conn)
            return self._send(conn, head, code, 0)
        req.status = code
        conn.body_off, conn.body_left, conn.sent = start, length, 0
        req.dev = st.st_dev
        if self.can_splice and length >= self.splice_threshold and st.st_dev not in self.no_splice \
                and self._pipe(conn):
            fcntl.fcntl(conn.file_fd, fcntl.F_SETFL, 0)  # clears O_NONBLOCK (see _open)
            os.write(conn.pipe_w, head)  # an empty pipe takes a few hundred bytes at once
            conn.pipe_fill = len(head)
            self._splice_step(conn)
        else:
            self._copy_start(conn, head)

    def _head(self, req: Request | None, code: int, extra: Sequence[bytes]) -> bytes:
        lines = [b"HTTP/1.1 %d %s" % (code, _REASONS.get(code, b"Unknown")), b"Server: " + SERVER,
                 b"Date: " + self.date.now(), *extra]
        if req is None or not req.keep_alive:
            lines.append(b"Connection: close")
        elif req.version == b"HTTP/1.0":
            lines.append(b"Connection: keep-alive")
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

    def _send_head(self, conn: Conn, req: Request, code: int, extra: list[bytes]) -> None:
        self._send(conn, self._head(req, code, extra), code, 0)

    def _error(self, conn: Conn, req: Request | None, code: int, line: bytes = b"-",
               extra: Sequence[bytes] = ()) -> None:
        """Answer with ``code`` and a one-line text body.  A request that could not be parsed
        (``req`` None; ``line`` is its request line, for the log) ends the connection."""
        self._close_file(conn)
        if req is None:
            req = Request(line, False, b"HTTP/1.1", False, {})
        elif code in (400, 431, 505) or (code == 405 and ("transfer-encoding" in req.headers or conn.skip)):
            req.keep_alive = False  # a bad request, or a body we will not read: the end
            conn.skip = 0
        body = b"%d %s\n" % (code, _REASONS.get(code, b"Error"))
        extra = [*extra, b"Content-Type: text/plain; charset=utf-8", b"Content-Length: %d" % len(body)]
        if code == 405:
            extra.append(b"Allow: GET, HEAD")
        conn.busy = True
        conn.req = req
        head = self._head(req, code, extra)
        self._send(conn, head if req.head else head + body, code, 0 if req.head else len(body))

    def _redirect(self, conn: Conn, req: Request) -> None:
        self._close_file(conn)
        location = req.target + b"/"
        body = b"301 Moved Permanently\n"
        head = self._head(req, 301, [b"Location: " + location, b"Content-Type: text/plain; charset=utf-8",
                                     b"Content-Length: %d" % len(body)])
        self._send(conn, head if req.head else head + body, 301, 0 if req.head else len(body))

    def _send(self, conn: Conn, data: bytes, code: int, body: int) -> None:
        """Send a whole answer held in memory (heads, error pages)."""
        assert self.ring is not None and conn.req is not None
        conn.busy = True
        conn.req.status = code
        conn.sent = body
        conn.buf = None
        conn.out = memoryview(data)
        self._track(self.ring.send(conn.fd, data), self._on_sent, conn)

    def _on_sent(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        try:
            n: int = op.result()
        except OSError:
            return self._abort(conn)
        if n < len(conn.out) and not conn.closing:  # a short send: the rest follows
            assert self.ring is not None
            conn.out = conn.out[n:]
            self._track(self.ring.send(conn.fd, conn.out), self._on_sent, conn)
            return
        conn.out = memoryview(b"")
        self._done(conn)

    # -- bodies: read + send ------------------------------------------------------------------

    def _copy_start(self, conn: Conn, head: bytes) -> None:
        """Body through a buffer: the head in front of the first chunk, sent with it."""
        first = min(conn.body_left, COPY_CHUNK)
        conn.buf = bytearray(len(head) + first)
        conn.buf[:len(head)] = head
        self._copy_step(conn, len(head), first)

    def _copy_step(self, conn: Conn, at: int, n: int) -> None:
        """Fill ``buf[at:at + n]`` from the file, then send ``buf[:at + n]``."""
        assert self.ring is not None and conn.buf is not None
        ring = self.ring
        view = memoryview(conn.buf)
        # Pages already in the cache are copied at once by preadv2(RWF_NOWAIT), which refuses
        # (EAGAIN), instead of sleeping, when it would have to wait for the disk; a cached small
        # file then costs one system call instead of a ring request and its completion.
        try:
            got = os.preadv(conn.file_fd, [view[at:at + n]], conn.body_off, os.RWF_NOWAIT)
        except OSError:
            got = 0  # not cached (or an error, which the ring's read reports below)
        conn.body_off += got
        conn.body_left -= got
        conn.sent += got
        conn.chunk = at + n
        if got == n:
            conn.step = 1
            if not conn.body_left:
                self._close_file(conn)
            data = bytes(view[:at + n]) if at + n <= 65536 else view[:at + n]  # bytes: send()'s fast path
            self._track(ring.send(conn.fd, data), self._on_copy_sent, conn)
            return
        fcntl.fcntl(conn.file_fd, fcntl.F_SETFL, 0)  # the ring must be able to wait (see _open)
        rest = n - got
        conn.read_n, conn.step = rest, 2
        # Linked: the send starts when the read completes, and only if it read all it was asked
        # (a short read fails the link: the send ends -ECANCELED instead of sending stale bytes).
        with ring.chain():
            rd = ring.read(conn.file_fd, view[at + got:at + n], conn.body_off)
            sd = ring.send(conn.fd, view[:at + n])
        self._track(rd, self._on_copy_read, conn)
        self._track(sd, self._on_copy_sent, conn)

    def _on_copy_read(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        try:
            n: int = op.result()
        except OSError:
            n = -1
        if n != conn.read_n:  # the file shrank under us (or failed): the answer cannot be finished
            conn.error = errno.EIO
        else:
            conn.body_off += n
            conn.body_left -= n
            conn.sent += n
            if not conn.body_left:
                self._close_file(conn)
        self._copy_advance(conn)

    def _on_copy_sent(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        try:
            n: int = op.result()
        except OSError:
            conn.error = conn.error or errno.EPIPE
            return self._copy_advance(conn)
        if n < conn.chunk and not conn.closing:  # a short send: the rest follows
            assert self.ring is not None and conn.buf is not None
            rest = memoryview(conn.buf)[n:conn.chunk]
            conn.chunk = len(rest)
            conn.step += 1
            self._track(self.ring.send(conn.fd, rest), self._on_copy_sent, conn)
        self._copy_advance(conn)

    def _copy_advance(self, conn: Conn) -> None:
        conn.step -= 1
        if conn.step:
            return
        if conn.closing or conn.error:
            return self._abort(conn)
        if conn.body_left:
            return self._copy_step(conn, 0, min(conn.body_left, COPY_CHUNK))
        self._close_file(conn)
        self._done(conn)

    # -- bodies: splice ------------------------------------------------------------------------

    def _pipe(self, conn: Conn) -> bool:
        """The connection's pipe, created on first use and sized up if the system allows."""
        if conn.pipe_r < 0:
            try:
                conn.pipe_r, conn.pipe_w = os.pipe2(os.O_CLOEXEC)
            except OSError:
                return False
            try:
                fcntl.fcntl(conn.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # EPERM past /proc/sys/fs/pipe-max-size or the user's pipe quota: keep 64 KiB
            conn.pipe_size = fcntl.fcntl(conn.pipe_w, fcntl.F_GETPIPE_SZ)
        return True

    def _splice_step(self, conn: Conn) -> None:
        assert self.ring is not None
        ring = self.ring
        conn.error = 0
        if conn.pipe_fill and (conn.sent or not conn.body_left):
            # Body bytes left in the pipe (a short step): drain them before adding more, so
            # that a splice into the pipe never waits for room that only the splice linked
            # after it would make.
            conn.step = 1
            self._track(ring.splice(conn.pipe_r, conn.fd, conn.pipe_fill), self._on_splice_out, conn)
            return
        # A pipe holds pipe_size / PAGE pages; a chunk that does not start on a page boundary
        # touches one page more, and the head written into the pipe (only ever in an otherwise
        # empty pipe) takes a page of its own.
        room = conn.pipe_size - 2 * PAGE - (PAGE if conn.pipe_fill else 0)
        n = min(conn.body_left, max(room, PAGE))
        conn.read_n, conn.step = n, 2
        # Linked: the second splice starts when the first has filled the pipe; if the first
        # moves fewer bytes than asked (the file shrank, the pipe was fuller than counted), the
        # second ends -ECANCELED and the next step drains what did arrive.
        with ring.chain():
            sin = ring.splice(conn.file_fd, conn.pipe_w, n, offset_in=conn.body_off)
            sout = ring.splice(conn.pipe_r, conn.fd, conn.pipe_fill + n)
        self._track(sin, self._on_splice_in, conn)
        self._track(sout, self._on_splice_out, conn)

    def _on_splice_in(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        try:
            n: int = op.result()
        except OSError as exc:
            conn.error = exc.errno or errno.EIO
            n = 0
        else:
            if n == 0:
                conn.error = errno.EIO  # end of file before the end of the body
        conn.pipe_fill += n
        conn.body_off += n
        conn.body_left -= n
        conn.sent += n
        self._splice_advance(conn)

    def _on_splice_out(self, conn: Conn, op: saferring.Operation[Any]) -> None:
        try:
            n: int = op.result()
        except saferring.OperationCancelledError:
            n = 0  # the first splice of the pair was short: its bytes wait in the pipe
        except OSError:
            return self._abort(conn)
        conn.pipe_fill -= n
        self._splice_advance(conn)

    def _splice_advance(self, conn: Conn) -> None:
        conn.step -= 1
        if conn.step:
            return
        if conn.error == errno.EINVAL and conn.sent == 0 and not conn.closing:
            # This file's file system cannot splice: take the head back out of the pipe (the
            # second splice was cancelled with the first) and send the body through a buffer.
            if conn.req is not None:
                self.no_splice.add(conn.req.dev)
            head = os.read(conn.pipe_r, conn.pipe_fill)
            conn.pipe_fill = 0
            return self._copy_start(conn, head)
        if conn.closing or conn.error:
            return self._abort(conn)  # the promised Content-Length cannot be met any more
        if conn.pipe_fill or conn.body_left:
            return self._splice_step(conn)
        self._close_file(conn)
        self._done(conn)

    # -- the end of an answer, of a connection -------------------------------------------------

    def _done(self, conn: Conn) -> None:
        """The current answer is out: log it, then the next request (or the close)."""
        req = conn.req
        conn.busy = False
        conn.req = None
        conn.buf = None
        conn.last = time.monotonic()
        if req is not None:
            self.log_request(conn, req)
            if not req.keep_alive:
                conn.close_after = True
        if conn.close_after:
            return self._linger(conn)
        self._next_request(conn)

    def _close_file(self, conn: Conn) -> None:
        if conn.file_fd >= 0:
            os.close(conn.file_fd)
            conn.file_fd = -1

    def _linger(self, conn: Conn) -> None:
        """Close politely: FIN now, then read (and drop) until the client closes, for up to
        LINGER_SECONDS, so that data it still sends does not make the kernel reset the
        connection before the client has read the last answer."""
        if conn.closing or conn.linger_since:
            return
        conn.linger_since = time.monotonic()
        conn.inbuf.clear()
        _shutdown(conn.sock, socket.SHUT_WR)
        if conn.recv is None:
            self._abort(conn)

    def _abort(self, conn: Conn) -> None:
        """Drop the connection: shut it down (which ends its requests in the ring promptly)
        and close it once the kernel has finished them all."""
        if not conn.closing:
            conn.closing = True
            _shutdown(conn.sock, socket.SHUT_RDWR)
        if conn.inflight == 0:
            self._forget(conn)

    def _forget(self, conn: Conn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            _close_conn_fds(conn)

    # -- logging -------------------------------------------------------------------------------

    def log_request(self, conn: Conn, req: Request) -> None:
        """One access-log line on stderr (unless --quiet): client, time, request, status, bytes."""
        if self.quiet:
            return
        stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z")
        line = req.line.decode("latin-1")
        try:
            sys.stderr.write(f'{conn.peer} - - [{stamp}] "{line}" {req.status} {conn.sent}\n')
            sys.stderr.flush()
        except OSError:
            self.quiet = True  # stderr went away: stop logging rather than stop serving

    def log_error(self, message: str) -> None:
        """A one-line complaint on stderr that does not stop the server."""
        try:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)
        except OSError:
            pass


def _no_op(signum: int, frame: FrameType | None) -> None:
    """SIGINT/SIGTERM handler: the wakeup fd does the work (see Server.watch_signals)."""


def _shutdown(sock: socket.socket, how: int) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass  # not connected any more


def _close_conn_fds(conn: Conn) -> None:
    conn.sock.close()
    for name in ("file_fd", "pipe_r", "pipe_w"):
        fd = getattr(conn, name)
        if fd >= 0:
            os.close(fd)
            setattr(conn, name, -1)


def _http_time(when: int) -> bytes:
    """A Unix time as an HTTP date (``Last-Modified``), formatted once per distinct time."""
    got = _DATES.get(when)
    if got is None:
        if len(_DATES) > 4096:
            _DATES.clear()
        got = _DATES[when] = email.utils.formatdate(when, usegmt=True).encode()
    return got


def _http_date(value: str) -> int | None:
    """An HTTP date as a Unix time, or None if it is not one."""
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return int(when.timestamp())


def _new_ring() -> saferring.Ring:
    """A ring for one thread's event loop: ``single_issuer`` + ``defer_taskrun`` (Linux 6.1)
    where the kernel has them, so completions are posted only when the loop waits for them
    instead of interrupting it; ``coop_taskrun`` (5.19) otherwise."""
    for options in ({"single_issuer": True, "defer_taskrun": True}, {"coop_taskrun": True}):
        try:
            return saferring.Ring(512, **options)
        except (saferring.UnsupportedOperationError, OSError):
            continue
    return saferring.Ring(512)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Serve the files of a directory over HTTP/1.1, on io_uring.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port (default: %(default)s; 0: a free one, printed on stdout)")
    parser.add_argument("--directory", "-d", default=os.curdir,
                        help="directory to serve (default: the working directory)")
    parser.add_argument("--backend", choices=["saferring"], default="saferring",
                        help="I/O engine: a saferring Ring driven directly (the only one)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no access log on stderr")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="close connections idle for this many seconds (default: %(default)s)")
    parser.add_argument("--splice-threshold", type=int, default=SPLICE_THRESHOLD, metavar="BYTES",
                        help="bodies of at least BYTES go file -> pipe -> socket with splice, "
                             "smaller ones through a buffer (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    root = os.path.abspath(args.directory)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        print(f"{PROG}: {root}: {exc.strerror}", file=sys.stderr)
        return 1
    server = Server(root_fd, args.quiet, args.timeout, args.splice_threshold)
    in_main = threading.current_thread() is threading.main_thread()
    saved = [(s, signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM)] if in_main else []
    status = 0
    try:
        try:
            server.listen(args.host, args.port)
        except OSError as exc:
            print(f"{PROG}: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
            return 1
        try:
            server.open()
        except (OSError, saferring.SaferRingError) as exc:
            print(f"{PROG}: cannot use io_uring: {exc}", file=sys.stderr)
            return 1
        if in_main:
            server.watch_signals()
        print(f"serving {root} on {server.url()}", flush=True)
        server.serve()
    except KeyboardInterrupt:
        status = 130  # before the signal handlers were in place
    finally:
        try:
            server.close()
        except TimeoutError:
            print(f"{PROG}: some requests did not end within 10 seconds", file=sys.stderr)
            status = 1
        finally:
            if in_main:
                signal.set_wakeup_fd(-1)
                for signum, handler in saved:
                    signal.signal(signum, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
