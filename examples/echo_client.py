"""A load generator for TCP echo servers that checks every byte that comes back.

    python examples/echo_client.py [--host 127.0.0.1] [--port 8007] [--connections 10]
                                   [--size 1024] [--duration 5 | --messages N] [--pipeline 1]
                                   [--json]

Opens ``--connections`` connections and keeps ``--pipeline`` messages of ``--size`` bytes in
flight on each, sending a new message as soon as one has come back, for ``--duration`` seconds
or until each connection has had ``--messages`` messages echoed.  Every message is different
(it starts with its sequence number and connection number, and the bytes after follow a pattern
shifted by both), and every echoed byte is compared with what was sent at that point of the
stream: a reordered, lost, duplicated or corrupted echo ends the run with a one-line error that
names the connection and the byte offset, and exit status 2.

At the end it prints messages/s, bytes/s (echoed bytes), round-trip latency percentiles per
message and the number of connection errors; ``--json`` prints the same as one JSON object.

Everything runs on one thread and one :class:`saferring.Ring`: the connects go out together;
each connection always has one ``ring.read`` in flight into its own ``bytearray`` (saferring
pins it until the read's completion), and each ``ring.wait()`` collects whatever completed on
every connection and hands the kernel every new request in the same system call.  A message is
first offered to its socket with one non-blocking ``send()``, as asyncio's (and saferring.aio's)
transports do: on loopback the socket nearly always has room, and that costs less than a request
and its completion.  What the socket does not take goes through ``ring.send``.

(Why not ``recv_multishot`` on a ``BufferRing``, as the server does?  Here every chunk is
compared and dropped at once, and a plain read per chunk, which has the ring's fastest path,
measured at about half the Python time per message.  The client has to stay well ahead of the
servers it measures.)
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import saferring

PROG = "echo_client.py"
HEADER = 12  # sequence number (8 bytes) and connection number (4 bytes), little-endian


def why(exc: BaseException) -> str:
    """The reason to print for an error: the plain errno message (saferring's errors add the
    operation to it), else the exception's text."""
    if isinstance(exc, OSError):
        if isinstance(exc.errno, int) and exc.errno > 0:
            return os.strerror(exc.errno)
        if exc.strerror:  # getaddrinfo's errors (socket.gaierror) have negative codes
            return exc.strerror
    return str(exc)


class Mismatch(Exception):
    """An echoed byte differs from the byte sent at that offset of the stream."""


class Fatal(Exception):
    """A one-line error that ends the run with exit status 1."""


class _Conn:
    """One connection: what was sent and not yet echoed, and where the echo has got to."""

    __slots__ = ("connect", "done", "fd", "index", "off", "out", "pending", "rbuf", "recv",
                 "send", "sending", "sent", "sock", "stream")

    def __init__(self, index: int, sock: socket.socket, rbuf_size: int) -> None:
        self.index = index
        self.sock = sock
        self.fd = sock.fileno()
        self.connect: Any = None
        self.rbuf = bytearray(rbuf_size)  # what the read in flight reads into
        self.recv: Any = None  # the read in flight
        self.send: Any = None  # the ring send in flight (one at a time: see Client.flush)
        self.sending: bytes = b""
        self.out: list[bytes | memoryview] = []  # to send once the send in flight is done
        self.pending: collections.deque[tuple[bytes, float]] = collections.deque()  # (msg, t)
        self.off = 0  # bytes of pending[0] already echoed
        self.stream = 0  # bytes echoed (and verified) so far on this connection
        self.sent = 0  # messages made so far
        self.done = False


class Client:
    """Drives every connection on one ring and keeps the tallies."""

    def __init__(self, ring: saferring.Ring, args: argparse.Namespace) -> None:
        self.ring = ring
        self.where = f"{args.host}:{args.port}"  # for messages
        self.rbuf_size = min(65536, max(4096, args.size * args.pipeline))
        self.size: int = args.size
        self.pipeline: int = args.pipeline
        self.limit: float = args.messages if args.messages is not None else float("inf")
        self.duration: float = args.duration if args.duration is not None else float("inf")
        self.timeout: float = args.timeout
        self.conns: list[_Conn] = []
        self.owners: dict[Any, _Conn] = {}  # operation -> connection
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.active = 0
        self.sending_allowed = True
        self.now = time.perf_counter()
        self.progress = self.now  # when bytes last came back
        # The bytes after a message's header: a slice of this, at an offset that depends on the
        # message's sequence number and connection.
        self.pattern = bytes(range(256)) * (self.size // 256 + 2)

    # -- messages ----------------------------------------------------------------------------

    def message(self, conn: _Conn) -> bytes:
        """The next message of ``conn``: distinct from every other message of the run (down to
        sizes that leave room for the header)."""
        seq = conn.sent
        conn.sent = seq + 1
        start = (seq * 13 + conn.index * 7) & 0xFF
        head = seq.to_bytes(8, "little") + (conn.index & 0xFFFFFFFF).to_bytes(4, "little")
        msg: bytes = head + self.pattern[start:start + self.size - HEADER]
        return msg[:self.size]

    def queue(self, conn: _Conn) -> None:
        """Make the next message of ``conn`` and send it: straight into the socket if it has
        room, else (the rest) through the ring, after the ring send in flight if there is one."""
        msg = self.message(conn)
        conn.pending.append((msg, self.now))
        if conn.send is None:  # nothing waits to go before this message
            try:
                n = conn.sock.send(msg, socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.fail(conn, why(exc))
                return
            if n == len(msg):
                return
            conn.out.append(msg[n:])
            self.flush(conn)
        else:
            conn.out.append(msg)

    def flush(self, conn: _Conn) -> None:
        """Send everything queued for ``conn`` as one request.  One send at a time per
        connection: two sends on a stream socket can complete out of order once the first has
        to wait for room, and the server would then see (and echo) the bytes reordered."""
        out = conn.out
        data = bytes(out[0]) if len(out) == 1 else b"".join(out)
        out.clear()
        conn.sending = data
        conn.send = self.ring.send(conn.fd, data)
        self.owners[conn.send] = conn

    def on_sent(self, conn: _Conn, op: Any) -> None:
        """A send completed: send the rest of a partial send, and what queued up meanwhile."""
        del self.owners[op]
        conn.send = None
        data = conn.sending
        conn.sending = b""
        try:
            n = op.result()
        except OSError as exc:
            self.fail(conn, why(exc))
            return
        if n < len(data):
            conn.out.insert(0, memoryview(data)[n:])
        if conn.out and not conn.done:
            self.flush(conn)

    # -- echoes ------------------------------------------------------------------------------

    def arm_read(self, conn: _Conn) -> None:
        """Queue the connection's next read.  Its bytearray is pinned (it cannot be resized or
        freed) until the read's completion; the bytes are only looked at after it."""
        conn.recv = self.ring.read(conn.fd, conn.rbuf)
        self.owners[conn.recv] = conn

    def on_recv(self, conn: _Conn, op: Any) -> None:
        """A read completed: check what it brought against what was sent, and read again."""
        del self.owners[op]
        conn.recv = None
        try:
            n = op.result()
        except OSError as exc:  # ECONNRESET...
            self.fail(conn, why(exc))
            return
        if conn.done:
            return
        if n == 0:
            self.fail(conn, f"the server closed the connection with {len(conn.pending)} "
                      "message(s) not echoed")
            return
        self.check(conn, conn.rbuf, n)
        if not conn.done:
            self.arm_read(conn)

    def check(self, conn: _Conn, data: bytearray, end: int) -> None:
        """Compare ``data[:end]`` with the next bytes of ``conn``'s messages; retire the
        messages it completes and send new ones."""
        self.progress = self.now
        pending = conn.pending
        pos = 0
        while pos < end:
            if not pending:
                raise Mismatch(f"connection {conn.index}: {end - pos} unexpected byte(s) at offset "
                               f"{conn.stream} (nothing more was sent)")
            msg, sent_at = pending[0]
            off = conn.off
            take = min(len(msg) - off, end - pos)
            if off == 0 and take == len(msg):  # a whole message: compared in place
                same = data.startswith(msg, pos, pos + take)
            else:
                same = data[pos:pos + take] == msg[off:off + take]
            if not same:
                bad = next(i for i in range(take) if data[pos + i] != msg[off + i])
                seq = int.from_bytes(msg[:8], "little")
                raise Mismatch(
                    f"connection {conn.index}: echoed byte at offset {conn.stream + bad} "
                    f"(message {seq}, byte {off + bad}) is 0x{data[pos + bad]:02x}, "
                    f"expected 0x{msg[off + bad]:02x}")
            pos += take
            conn.stream += take
            off += take
            if off == len(msg):
                pending.popleft()
                off = 0
                self.latencies.append(self.now - sent_at)
                if self.sending_allowed and conn.sent < self.limit:
                    self.queue(conn)
                elif not pending:
                    self.finish(conn)
            conn.off = off

    # -- connections -------------------------------------------------------------------------

    def finish(self, conn: _Conn) -> None:
        """``conn`` has nothing more to send or wait for."""
        if not conn.done:
            conn.done = True
            self.active -= 1

    def fail(self, conn: _Conn, why: str) -> None:
        """``conn`` broke: count it, and stop using it."""
        if not conn.done:
            self.errors.append(f"connection {conn.index}: {why}")
            self.finish(conn)

    def dispatch(self, ops: list[Any]) -> None:
        """Hand each finished operation to its connection."""
        owners = self.owners
        for op in ops:
            conn = owners.get(op)
            if conn is None:
                continue
            if op is conn.recv:
                self.on_recv(conn, op)
            elif op is conn.send:
                self.on_sent(conn, op)
            elif op is conn.connect:
                del owners[op]
                conn.connect = None
                try:
                    op.result()
                except OSError as exc:
                    raise Fatal(f"cannot connect to {self.where}: {why(exc)}") from None

    def connect_all(self, family: int, address: Any, count: int) -> None:
        """Open ``count`` connections at once (all connects in flight together)."""
        for index in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            conn = _Conn(index, sock, self.rbuf_size)
            self.conns.append(conn)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.connect = self.ring.connect(conn.fd, address)
            self.owners[conn.connect] = conn
        deadline = time.monotonic() + self.timeout
        while any(conn.connect is not None for conn in self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fatal(f"cannot connect to {self.where}: timed out after {self.timeout} s")
            self.dispatch(self.ring.wait(1, timeout=left))

    def run(self) -> float:
        """Send and check until done; return the seconds the measured part took."""
        ring = self.ring
        self.now = start = time.perf_counter()
        self.progress = start
        deadline = start + self.duration
        for conn in self.conns:
            self.arm_read(conn)
            self.active += 1
            for _ in range(self.pipeline):
                if conn.sent < self.limit:
                    self.queue(conn)
        while self.active:
            wait = min(deadline - self.now, self.timeout) if self.sending_allowed else 0.5
            self.dispatch(ring.wait(1, timeout=max(wait, 0.0)))
            self.now = now = time.perf_counter()
            if self.sending_allowed and now >= deadline:
                # Time is up: no new messages; connections end once their last echo is back.
                self.sending_allowed = False
                for conn in self.conns:
                    if not conn.pending:
                        self.finish(conn)
            if now - self.progress > self.timeout:
                waiting = sum(len(c.pending) for c in self.conns if not c.done)
                raise Fatal(f"no echo for {self.timeout} s ({waiting} message(s) not echoed)")
        return self.now - start


def make_ring(entries: int) -> saferring.Ring:
    """A Ring with IORING_SETUP_COOP_TASKRUN where the kernel has it (5.19), a plain one before:
    completions wait for this thread's next io_uring_enter (which the loop makes at once)
    instead of interrupting it, which costs the kernel about half as much per message."""
    try:
        return saferring.Ring(entries, coop_taskrun=True)
    except saferring.UnsupportedOperationError:
        return saferring.Ring(entries)


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (0.0 if there are none)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def report(client: Client, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """The run's figures."""
    lat = sorted(client.latencies)
    messages = len(lat)
    seconds = max(seconds, 1e-9)
    return {
        "connections": args.connections,
        "size": args.size,
        "pipeline": args.pipeline,
        "messages": messages,
        "bytes": messages * args.size,
        "seconds": round(seconds, 6),
        "messages_per_s": round(messages / seconds, 1),
        "bytes_per_s": round(messages * args.size / seconds, 1),
        "latency_ms": {name: round(percentile(lat, q) * 1000, 3)
                       for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0))},
        "errors": len(client.errors),
    }


def print_report(figures: dict[str, Any]) -> None:
    """The summary, for people."""
    lat = figures["latency_ms"]
    print(f"{figures['connections']} connections, {figures['size']}-byte messages, pipeline "
          f"{figures['pipeline']}: {figures['messages']} messages echoed and verified in "
          f"{figures['seconds']:.2f} s")
    print(f"messages/s: {figures['messages_per_s']:.0f}   bytes/s: {figures['bytes_per_s']:.0f} "
          f"({figures['bytes_per_s'] / 2**20:.1f} MiB/s)")
    print(f"latency: p50 {lat['p50']:.3f} ms   p90 {lat['p90']:.3f} ms   p99 {lat['p99']:.3f} ms"
          f"   max {lat['max']:.3f} ms")
    print(f"errors: {figures['errors']}")


def raise_fd_limit(need: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one if ``need`` descriptors would not fit
    (one per connection, and 1024 is a common default)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (OSError, ValueError):
        pass  # socket() then fails with EMFILE, reported as an error


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {value}")
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
    """Entry point; returns the exit status (0, 1 on errors, 2 on a wrong echo, 130 on Ctrl-C)."""
    parser = argparse.ArgumentParser(prog=PROG, description="Load a TCP echo server and verify "
                                     "every echoed byte.")
    parser.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8007, help="server port (default: %(default)s)")
    parser.add_argument("--connections", type=_positive, default=10,
                        help="connections to open (default: %(default)s)")
    parser.add_argument("--size", type=_positive, default=1024,
                        help="message size in bytes (default: %(default)s)")
    parser.add_argument("--duration", type=_seconds, metavar="SECONDS",
                        help="how long to send new messages (default: 5, unless --messages)")
    parser.add_argument("--messages", type=_positive, metavar="N",
                        help="messages per connection; stop once all are echoed")
    parser.add_argument("--pipeline", type=_positive, default=1,
                        help="messages in flight per connection (default: %(default)s)")
    parser.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="give up after this long without an echo, or connecting "
                        "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the summary as a JSON object")
    args = parser.parse_args(argv)
    if args.duration is None and args.messages is None:
        args.duration = 5.0

    try:
        infos = socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (OSError, OverflowError) as exc:
        print(f"{PROG}: cannot resolve {args.host}:{args.port}: "
              f"{why(exc)}", file=sys.stderr)
        return 1
    family, _kind, _proto, _name, address = infos[0]
    raise_fd_limit(args.connections + 64)
    client: Client | None = None
    try:
        with make_ring(1024) as ring:
            client = Client(ring, args)
            try:
                client.connect_all(family, address, args.connections)
                seconds = client.run()
            finally:
                conns = client.conns
                ring.close()  # cancels the receives and waits until the kernel let go
                for conn in conns:
                    conn.sock.close()
    except Mismatch as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except Fatal as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: {why(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    assert client is not None
    figures = report(client, args, seconds)
    if args.json:
        print(json.dumps(figures))
    else:
        print_report(figures)
    for line in client.errors[:10]:
        print(f"{PROG}: {line}", file=sys.stderr)
    if len(client.errors) > 10:
        print(f"{PROG}: ... and {len(client.errors) - 10} more connection errors", file=sys.stderr)
    return 1 if client.errors else 0


if __name__ == "__main__":
    sys.exit(main())
