"""A TCP echo server: every byte a client sends comes back to it, in order.

    python examples/echo_server.py [--host 127.0.0.1] [--port 8007] [--backend saferring]
                                   [--stats] [--duration SECONDS] [--buffers N --buffer-size B]

Backends:

* ``saferring`` (default): one thread, one :class:`saferring.Ring`, driven synchronously.  One
  multishot accept takes every connection; each connection has one multishot receive that takes
  its buffers from a shared :class:`saferring.BufferRing`; each received buffer is sent back
  as it is (no copy) and released to the kernel once its send has completed.
* ``asyncio``: an :class:`asyncio.Protocol` server on the stock event loop, for comparison.
* ``saferring-aio``: the same protocol on ``saferring.aio.create_server`` (io_uring under asyncio).

``--port 0`` picks a free port.  The first line on standard output is always
``listening on HOST:PORT``.  ``--stats`` adds one line per second::

    stats: conns=10 msgs/s=31022 bytes/s=31766528 in_flight=21 pinned=40960

(msgs/s counts received chunks: for a request-response client, its messages; ``in_flight`` and
``pinned`` are the ring's ``stats()``, ``-`` for the asyncio backend).  SIGINT or SIGTERM (or the
end of ``--duration``) cancels what is in flight, closes every connection, prints a ``summary:``
line and exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import math
import os
import resource
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import saferring

PROG = "echo_server.py"
BACKENDS = ("saferring", "asyncio", "saferring-aio")
BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
# A connection whose echo is not being read back stops being read once this many bytes wait to
# be sent, and what arrives beyond it is copied out of the shared buffers (RingServer.on_recv).
HIGH_WATER = 64 * 1024


def why(exc: BaseException) -> str:
    """The reason to print for an error: the plain errno message (saferring's errors add the
    operation to it), else the exception's text."""
    if isinstance(exc, OSError):
        if isinstance(exc.errno, int) and exc.errno > 0:
            return os.strerror(exc.errno)
        if exc.strerror:  # getaddrinfo's errors (socket.gaierror) have negative codes
            return exc.strerror
    return str(exc)


class Counters:
    """What every backend counts; read once a second by the stats line and at exit."""

    __slots__ = ("bytes", "msgs", "open", "total")

    def __init__(self) -> None:
        self.open = 0  # connections open now
        self.total = 0  # connections accepted since start
        self.msgs = 0  # chunks received
        self.bytes = 0  # bytes received (and echoed)


class StatsLine:
    """Prints ``stats:`` once per second from the change in the counters."""

    def __init__(self, counters: Counters, extra: Callable[[], tuple[str, str]]) -> None:
        self.counters = counters
        self.extra = extra  # () -> (in_flight, pinned), as text
        self.last = time.monotonic()
        self.next = self.last + 1.0
        self.msgs = 0
        self.bytes = 0

    def tick(self, now: float) -> None:
        """Print a line if a second has passed since the last one."""
        if now < self.next:
            return
        c = self.counters
        span = now - self.last
        in_flight, pinned = self.extra()
        print(f"stats: conns={c.open} msgs/s={round((c.msgs - self.msgs) / span)} "
              f"bytes/s={round((c.bytes - self.bytes) / span)} in_flight={in_flight} "
              f"pinned={pinned}", flush=True)
        self.last, self.msgs, self.bytes = now, c.msgs, c.bytes
        self.next = max(self.next + 1.0, now + 0.5)


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port``; raises OSError (gaierror for a bad host)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR lets a restarted server bind while old connections sit in TIME_WAIT; on
        # Linux it still refuses a port another socket is listening on (EADDRINUSE).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each connection uses two descriptors
    (its own and the duplicate its multishot receive holds), and 1024 is a common default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (OSError, ValueError):
            pass  # keep the limit we have: accept reports EMFILE if it is reached


def summary(backend: str, counters: Counters, seconds: float) -> str:
    """The last line printed: what the server did."""
    return (f"summary: backend={backend} connections={counters.total} messages={counters.msgs} "
            f"bytes={counters.bytes} seconds={seconds:.2f}")


# -- the saferring backend ------------------------------------------------------------------


class _Conn:
    """One client connection of the saferring backend."""

    __slots__ = ("closed", "eof", "fd", "out", "paused", "queued", "recv", "send", "sending")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.recv: Any = None  # the multishot receive (None once it ended)
        self.send: Any = None  # the send in flight (one at a time, see RingServer)
        self.sending: saferring.Buffer | bytes | memoryview | None = None  # what it sends
        # Waiting to be sent, in order: received Buffers (sent as they are), or copies (the
        # unsent tail of a partial send; chunks that arrived while HIGH_WATER was passed).
        self.out: collections.deque[saferring.Buffer | bytes | memoryview] = collections.deque()
        self.queued = 0  # bytes in out and sending
        self.eof = False  # the client closed its side: close once everything is sent
        self.paused = False  # the receive was cancelled because `queued` passed HIGH_WATER
        self.closed = False


class RingServer:
    """The ``saferring`` backend: a synchronous loop over one Ring.

    Why the pieces are what they are:

    * One multishot accept (Linux 5.19) stays armed for every connection.  The kernel ends it on
      an error it cannot ride out (EMFILE when out of descriptors, say); it is then armed again
      after a short timeout on the same ring, instead of spinning.
    * One multishot receive per connection, picking buffers from one shared BufferRing: memory
      is only tied up by data that has arrived, not by every idle connection.  When all buffers
      are out the kernel ends the receive with ENOBUFS without consuming anything; saferring
      re-arms it as soon as a buffer comes back (it is handled here too, in case).
    * Each received Buffer is sent back as it is and released only after its send's completion:
      until then the kernel reads from it (the library keeps it IN_FLIGHT, and refuses a
      release).  Releasing it hands it straight back to the kernel's buffer ring.
    * One send in flight per connection: two sends on one stream socket can complete out of
      order once the first has to wait for room, which would reorder the echo.
    * A partial send (the socket took part of it) sends the rest next, before anything newer.
    * A client that does not read its echo stops being read (its receive is cancelled) once
      HIGH_WATER bytes wait for it, and what it sent beyond that is copied out of the shared
      buffers, so it cannot starve the other connections of buffers.
    * Signals only set a flag; the wake-up descriptor Python's C-level handler writes to is
      polled on the ring, so ``wait()`` returns at once and the loop stops between two steps.
    """

    def __init__(self, ring: saferring.Ring, listener: socket.socket,
                 buffers: saferring.BufferRing, counters: Counters, wake_fd: int) -> None:
        self.ring = ring
        self.listener = listener
        self.buffers = buffers
        self.counters = counters
        self.owners: dict[Any, _Conn] = {}  # operation -> its connection (receives and sends)
        self.conns: set[_Conn] = set()
        self.accept_op: Any = None
        self.retry_op: Any = None  # the timeout before arming the accept again
        self.accepted_any = False
        self.stopping = False
        self.stop_requested = False
        self.wake_fd = wake_fd
        self.wake_op: Any = ring.poll_add(wake_fd, select.POLLIN, multishot=True)

    # -- accept ------------------------------------------------------------------------------

    def arm_accept(self) -> None:
        """Arm the multishot accept."""
        self.retry_op = None
        self.accept_op = self.ring.accept_multishot(self.listener.fileno())

    def on_accept(self, op: Any) -> None:
        """New connections arrived, or the accept ended."""
        for fd in op.take():
            if self.stopping:
                os.close(fd)
            else:
                self.open_conn(fd)
        if not op.done():
            return
        self.accept_op = None
        if self.stopping:
            return
        if op.state is saferring.OpState.FAILED:
            try:
                op.result()
            except OSError as exc:
                if exc.errno == errno.EINVAL and not self.accepted_any:
                    raise OSError(errno.EINVAL, "the kernel refused a multishot accept "
                                  "(it needs Linux 5.19)") from None
                print(f"{PROG}: accept: {why(exc)}; accepting again in 0.1 s",
                      file=sys.stderr, flush=True)
        self.retry_op = self.ring.timeout(0.1)

    def open_conn(self, fd: int) -> None:
        """Start serving a new connection."""
        self.accepted_any = True
        try:
            # Small echoes go out at once rather than waiting for the previous ACK (Nagle).
            sock = socket.socket(fileno=fd)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            finally:
                sock.detach()
            conn = _Conn(fd)
            conn.recv = self.ring.recv_multishot(fd, self.buffers)
        except OSError as exc:  # EMFILE duplicating the descriptor for the receive, say
            print(f"{PROG}: connection dropped: {why(exc)}", file=sys.stderr, flush=True)
            os.close(fd)
            return
        self.owners[conn.recv] = conn
        self.conns.add(conn)
        self.counters.open += 1
        self.counters.total += 1

    # -- receive -----------------------------------------------------------------------------

    def on_recv(self, conn: _Conn, op: Any) -> None:
        """Chunks arrived on a connection's receive, or the receive ended."""
        bufs: list[saferring.Buffer] = op.take()
        if conn.closed:
            for buf in bufs:
                buf.release()
        elif bufs:
            counters = self.counters
            out = conn.out
            for buf in bufs:
                n = buf.nbytes
                counters.msgs += 1
                counters.bytes += n
                if conn.queued < HIGH_WATER:
                    out.append(buf)  # sent from the buffer itself, released once sent
                else:
                    # The client is not reading its echo fast enough.  The kernel may have
                    # filled many buffers for it before this loop saw them: copy them and give
                    # them back now, so that one slow reader cannot hold the buffers every
                    # connection shares.
                    out.append(buf.tobytes())
                    buf.release()
                conn.queued += n
            if conn.send is None:
                self.send_next(conn)
            if conn.queued > HIGH_WATER and not conn.paused and not op.done():
                # ...and stop reading from it (TCP then slows it down) until its echo has
                # drained.  What the receive took before the cancel lands still arrives, in
                # order, and is copied as above.
                conn.paused = True
                op.cancel()
        if not op.done():
            return
        del self.owners[op]
        conn.recv = None
        if conn.closed or self.stopping:
            return
        state = op.state
        if state is saferring.OpState.COMPLETED:  # end of stream: the client closed its side
            conn.eof = True
            if conn.send is None:
                self.close_conn(conn)
            return
        if state is saferring.OpState.CANCELLED:
            if conn.paused and conn.send is None:
                self.resume(conn)  # drained before the cancel's completion arrived
            return
        try:
            op.result()
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                # The buffer ring ran dry and the receive ended without consuming anything
                # (saferring normally re-arms it itself): receive again.
                self.resume(conn)
                return
            # ECONNRESET and the like: the connection is gone; so is what was to be echoed.
            self.close_conn(conn)

    def resume(self, conn: _Conn) -> None:
        """Arm a new receive on a connection whose receive ended (paused, or ENOBUFS)."""
        conn.paused = False
        try:
            conn.recv = self.ring.recv_multishot(conn.fd, self.buffers)
        except OSError:  # EMFILE duplicating the descriptor: this connection cannot go on
            self.close_conn(conn)
            return
        self.owners[conn.recv] = conn

    # -- send --------------------------------------------------------------------------------

    def send_next(self, conn: _Conn) -> None:
        """Send the oldest waiting item of a connection (none may be in flight)."""
        item = conn.out.popleft()
        op = self.ring.send(conn.fd, item)  # a Buffer stays IN_FLIGHT until the completion
        conn.send = op
        conn.sending = item
        self.owners[op] = conn

    def on_sent(self, conn: _Conn, op: Any) -> None:
        """A connection's send completed."""
        del self.owners[op]
        item = conn.sending
        conn.send = conn.sending = None
        try:
            n = op.result()
        except OSError:  # EPIPE, ECONNRESET, or cancelled by close_conn
            n = -1
        if isinstance(item, saferring.Buffer):
            size = item.nbytes
            if 0 <= n < size and not conn.closed:
                conn.out.appendleft(item.tobytes()[n:])  # the rest, before anything newer
            item.release()  # back to the kernel's buffer ring
        else:
            assert item is not None
            size = len(item)
            if 0 <= n < size and not conn.closed:
                conn.out.appendleft(memoryview(item)[n:])
        if conn.closed:
            return
        if n <= 0 and size:
            self.close_conn(conn)  # the peer is gone (or a send made no progress)
            return
        conn.queued -= n
        if conn.out:
            self.send_next(conn)
        elif conn.eof:
            self.close_conn(conn)
        elif conn.paused and conn.recv is None:
            self.resume(conn)

    # -- closing -----------------------------------------------------------------------------

    def close_conn(self, conn: _Conn) -> None:
        """Close a connection: cancel its requests, release its buffers, close its socket."""
        if conn.closed:
            return
        conn.closed = True
        self.conns.discard(conn)
        self.counters.open -= 1
        for op in (conn.recv, conn.send):
            if op is not None and not op.done() and not op.cancel_requested:
                op.cancel()
        for item in conn.out:
            if type(item) is saferring.Buffer:
                item.release()
        conn.out.clear()
        # Closed through the ring, behind every request already queued for this descriptor:
        # a send queued but not yet submitted finds its socket by number when the kernel takes
        # it, and a plain close() now could let a new connection get that number first.  (The
        # multishot receive holds a duplicate, closed with its final completion.)
        self.ring.close_fd(conn.fd)

    def stop(self) -> None:
        """Cancel everything in flight and close every connection (the ring closes after)."""
        self.stopping = True
        for op in (self.accept_op, self.retry_op, self.wake_op):
            if op is not None and not op.done() and not op.cancel_requested:
                op.cancel()
        for conn in list(self.conns):
            self.close_conn(conn)
        # Collect the cancelled requests' completions (their buffers come back); ring.close()
        # would do it too, but this also runs the closes queued above.
        deadline = time.monotonic() + 5.0
        while self.ring.stats().in_flight and time.monotonic() < deadline:
            for op in self.ring.wait(1, timeout=0.1):
                owner = self.owners.get(op)
                if owner is not None and op is owner.recv:
                    self.on_recv(owner, op)
                elif owner is not None:
                    self.on_sent(owner, op)
                elif op is self.accept_op:
                    self.on_accept(op)

    # -- the loop ----------------------------------------------------------------------------

    def on_wake(self, op: Any) -> None:
        """A signal handler wrote to the wake-up pipe."""
        op.take()
        try:
            while os.read(self.wake_fd, 512):
                pass
        except BlockingIOError:
            pass

    def serve(self, deadline: float, stats: StatsLine | None) -> None:
        """Serve until a signal asks to stop or ``deadline`` (time.monotonic()) passes."""
        owners = self.owners
        ring = self.ring
        self.arm_accept()
        while not self.stop_requested:
            now = time.monotonic()
            if now >= deadline:
                break
            if stats is not None:
                stats.tick(now)
                timeout = min(deadline, stats.next) - now
            else:
                timeout = deadline - now  # math.inf: no limit
            for op in ring.wait(1, timeout=timeout):
                conn = owners.get(op)
                if conn is not None:
                    if op is conn.recv:
                        self.on_recv(conn, op)
                    else:
                        self.on_sent(conn, op)
                elif op is self.accept_op:
                    self.on_accept(op)
                elif op is self.wake_op:
                    self.on_wake(op)
                elif op is self.retry_op:
                    self.arm_accept()
                # else: a close_fd completing; nothing to do


def make_ring(entries: int) -> saferring.Ring:
    """A Ring with IORING_SETUP_COOP_TASKRUN where the kernel has it (5.19), a plain one before.

    Without the flag the kernel interrupts this thread whenever a request completes in another
    context (data arrived for a receive) to post its completion at once; with it, the work
    waits for the thread's next io_uring_enter, which a loop that always goes back to wait()
    makes soon, and a thread asleep in wait() is still woken.  It halves the kernel time per
    echoed message here."""
    try:
        return saferring.Ring(entries, coop_taskrun=True)
    except saferring.UnsupportedOperationError:
        return saferring.Ring(entries)


def _ring_stats(ring: saferring.Ring) -> tuple[str, str]:
    stats = ring.stats()
    return str(stats.in_flight), str(stats.pinned_bytes)


def run_saferring(listener: socket.socket, args: argparse.Namespace, counters: Counters,
                  deadline: float) -> None:
    """Serve with the synchronous Ring API until stopped."""
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    server: RingServer | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler runs between two bytecodes of the loop, and raising there
        # (KeyboardInterrupt) could interrupt the library's bookkeeping of a buffer.  The C-level
        # handler has already written to the wake-up pipe, which the ring polls: wait() returns.
        if server is not None:
            server.stop_requested = True

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
    try:
        with make_ring(1024) as ring:
            buffers = saferring.BufferRing(ring, args.buffers, args.buffer_size)
            server = RingServer(ring, listener, buffers, counters, rfd)
            stats = StatsLine(counters, lambda: _ring_stats(ring)) if args.stats else None
            try:
                server.serve(deadline, stats)
            finally:
                server.stop()
    finally:
        signal.set_wakeup_fd(old_wakeup)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        os.close(rfd)
        os.close(wfd)


# -- the asyncio backends -------------------------------------------------------------------


class EchoProtocol(asyncio.Protocol):
    """Writes back every chunk it receives; stops reading while the transport's buffer is full."""

    def __init__(self, counters: Counters, transports: set[asyncio.Transport]) -> None:
        self.counters = counters
        self.transports = transports
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.transports.add(transport)
        self.counters.open += 1
        self.counters.total += 1

    def data_received(self, data: bytes) -> None:
        """Echo."""
        self.counters.msgs += 1
        self.counters.bytes += len(data)
        assert self.transport is not None
        self.transport.write(data)

    def pause_writing(self) -> None:
        """The client is not reading: stop reading from it."""
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The client caught up."""
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Uncount the connection."""
        if self.transport is not None:
            self.transports.discard(self.transport)
            self.counters.open -= 1
            self.transport = None


async def serve_asyncio(listener: socket.socket, args: argparse.Namespace, counters: Counters,
                        deadline: float) -> None:
    """Serve with an asyncio Protocol on the stock loop (``asyncio``) or on saferring.aio's
    transports (``saferring-aio``) until a signal or the deadline."""
    loop = asyncio.get_running_loop()
    stop = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, request_stop)
    transports: set[asyncio.Transport] = set()

    def factory() -> EchoProtocol:
        return EchoProtocol(counters, transports)

    extra: Callable[[], tuple[str, str]] = lambda: ("-", "-")  # noqa: E731
    server: Any
    if args.backend == "saferring-aio":
        from saferring import aio

        aring = aio.get_ring()
        server = await aio.create_server(factory, sock=listener, backlog=BACKLOG)
        extra = lambda: _ring_stats(aring.ring)  # noqa: E731
    else:
        server = await loop.create_server(factory, sock=listener, backlog=BACKLOG)
    stats = StatsLine(counters, extra) if args.stats else None
    try:
        while not stop.done():
            now = time.monotonic()
            if now >= deadline:
                break
            wake = deadline if stats is None else min(deadline, stats.next)
            await asyncio.wait([stop], timeout=None if wake == math.inf else wake - now)
            if stats is not None:
                stats.tick(time.monotonic())
    finally:
        server.close()
        for transport in list(transports):
            transport.abort()
        await server.wait_closed()
        for _ in range(100):  # let connection_lost run for the aborted transports
            if not transports:
                break
            await asyncio.sleep(0.01)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# -- command line ---------------------------------------------------------------------------


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog=PROG, description="A TCP echo server on io_uring.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8007,
                        help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="saferring",
                        help="how to serve (default: %(default)s)")
    parser.add_argument("--stats", action="store_true",
                        help="print a line of counters every second")
    parser.add_argument("--duration", type=_seconds, metavar="SECONDS",
                        help="stop after this long (default: run until SIGINT/SIGTERM)")
    parser.add_argument("--buffers", type=_positive, default=2048,
                        help="buffers in the receive buffer ring (saferring; default: %(default)s)")
    parser.add_argument("--buffer-size", type=_positive, default=4096,
                        help="size of each buffer in bytes (saferring; default: %(default)s)")
    args = parser.parse_args(argv)
    if args.buffers > 32768:
        parser.error("--buffers: a buffer ring holds at most 32768 buffers")

    try:
        listener = listen_socket(args.host, args.port)
    except OSError as exc:
        print(f"{PROG}: cannot listen on {args.host}:{args.port}: {why(exc)}",
              file=sys.stderr)
        return 1
    raise_fd_limit()
    counters = Counters()
    start = time.monotonic()
    deadline = math.inf if args.duration is None else start + args.duration
    try:
        host, port = listener.getsockname()[:2]
        print(f"listening on {host}:{port}", flush=True)
        if args.backend == "saferring":
            run_saferring(listener, args, counters, deadline)
        else:
            asyncio.run(serve_asyncio(listener, args, counters, deadline))
    except (OSError, saferring.SaferRingError) as exc:
        print(f"{PROG}: {args.backend}: {why(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass  # Ctrl-C before the handlers were installed: nothing was started yet
    finally:
        listener.close()
    print(summary(args.backend, counters, time.monotonic() - start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
