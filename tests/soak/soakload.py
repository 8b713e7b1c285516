"""The soak test's load generator: many TCP connections to an echo server on one epoll loop,
every echoed byte checked against what was sent at that offset of the connection's stream.

Theory of operation
-------------------

* **Streams.** Connection number ``k`` (counted over the whole run, reopened connections get
  new numbers) sends the bytes of one pseudo-random block ``DATA`` starting at an offset derived
  from ``k``, wrapping round after ``PERIOD`` bytes.  So every connection's stream differs from
  every other's: an echo that carries bytes from another connection, from a stale buffer, from
  the wrong point of its own stream, or duplicated or reordered, differs from what is expected at
  that offset and is reported with the connection and offset.  ``PERIOD`` is not a multiple of any
  buffer size (4 MiB + 1021), so a buffer's old contents cannot line up with the stream by
  accident.  The block is ``PERIOD + MAX_CHUNK`` long so that every slice of at most ``MAX_CHUNK``
  bytes is contiguous in it: sends and comparisons never copy or wrap.
* **Messages.** Each connection keeps up to ``pipeline`` messages in flight; a message's size is
  log-uniform between 1 byte and 64 KiB (as many 1-16 byte messages as 4-64 KiB ones), so the
  server sees single bytes, chunks that span many of its buffers, and everything between.  A
  message counts as exchanged once its last byte has come back.
* **Persistent and churn connections.** ``persistent`` connections stay open from
  :meth:`Load.open_all` to :meth:`Load.close_all`.  ``churn`` more slots each hold a connection
  that exchanges 1-6 messages and then ends in one of three ways, after which the slot opens a
  new connection:

  - ``close``: everything echoed, then ``close()`` (a FIN; the server sees end of stream);
  - ``half``: one more message, then ``shutdown(SHUT_WR)`` once it is all sent; the server must
    echo every byte *and then* close (end of stream on our side only after the whole echo);
  - ``reset``: one more message (at least 16 KiB, so the server is in the middle of echoing
    it), then ``SO_LINGER`` 0 and ``close()``: an RST.  The server's receive or send fails
    while its buffers are in flight.  The bytes sent and not yet echoed are counted as
    ``bytes_abandoned``: an RST discards them by design.

* **Quiescing.** :meth:`Load.quiesce` stops making messages, closes the churn connections as
  soon as their echo is complete, and waits until every persistent connection has had every
  byte back: the server is then idle with exactly ``persistent`` connections open, the state in
  which the soak test samples its memory.
* **Bounded.** Every phase has a deadline; a connection with bytes outstanding and no progress
  for ``stall`` seconds fails the run with its numbers (a lost byte shows up as exactly that).

Everything is counted: bytes sent (taken by ``send()``), bytes verified, bytes abandoned by
resets; ``bytes_sent == bytes_verified + bytes_abandoned`` once quiesced.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

PERIOD = (1 << 22) + 1021
MAX_CHUNK = 64 * 1024
RECV_SIZE = MAX_CHUNK
# Linger on, timeout 0: close() sends an RST and discards what is queued (socket(7)).
LINGER_RESET = struct.pack("ii", 1, 0)
FATES = ("close", "half", "reset")

# Connection states.
CONNECTING = "connecting"
ACTIVE = "active"  # exchanging messages
SHUTTING = "shutting"  # "half": shutdown(SHUT_WR) once everything queued is sent
HALF_CLOSED = "half-closed"  # write side shut: reading the rest of the echo, then EOF
CLOSED = "closed"


class SoakFailure(AssertionError):
    """The server lost, corrupted, reordered or duplicated bytes, closed a connection it should
    have kept, refused one, or stalled."""


@dataclass
class Totals:
    """What the load generator did, for the test's assertions and its report."""

    opened: int = 0  # connections established
    closes: int = 0  # churn connections closed with a FIN after a complete echo
    half_closes: int = 0  # churn connections that half-closed and got the whole echo, then EOF
    resets: int = 0  # churn connections reset (SO_LINGER 0) with echo outstanding
    messages: int = 0  # messages whose every byte came back
    bytes_sent: int = 0  # bytes taken by send()
    bytes_verified: int = 0  # bytes echoed and equal to what was sent at that offset
    bytes_abandoned: int = 0  # sent, then discarded by our own RST
    # The longest a connection with bytes outstanding went without an echoed byte (seconds):
    # the server's fairness, as this one loop sees it (reported, never asserted).
    longest_wait: float = 0.0


def make_data(seed: int) -> bytes:
    """The pseudo-random block every stream is cut from (deterministic: a failure reproduces),
    with its first MAX_CHUNK bytes repeated at the end, so that the stream wraps seamlessly."""
    block = random.Random(seed).randbytes(PERIOD)
    return block + block[:MAX_CHUNK]


class Conn:
    """One connection and where its stream has got to.  Offsets count bytes of this connection's
    stream: ``queued`` (made into messages) >= ``sent`` (taken by send()) >= ``verified``."""

    __slots__ = ("base", "budget", "ends", "fate", "fd", "ident", "last_progress", "mask", "queued",
                 "sent", "slot", "sock", "state", "verified")

    def __init__(self, slot: int, ident: int, sock: socket.socket, now: float) -> None:
        self.slot = slot  # index in Load.slots
        self.ident = ident  # connection number over the whole run
        self.sock = sock
        self.fd = sock.fileno()
        # Where the stream starts in DATA (a multiplicative hash spreads neighbours apart).
        self.base = (ident * 2654435761) % PERIOD
        self.state = CONNECTING
        self.queued = 0
        self.sent = 0
        self.verified = 0
        self.ends: deque[int] = deque()  # stream offsets at which the messages in flight end
        self.mask = 0  # the epoll events registered
        self.last_progress = now
        self.fate = ""  # churn connections: how this one ends
        self.budget = -1  # churn connections: messages to exchange before the fate; -1: persistent

    def describe(self) -> str:
        """What a failure message says about the connection (its local port is what the
        server's side shows as the peer's)."""
        try:
            port = self.sock.getsockname()[1]
        except OSError:
            port = "?"
        return (f"connection #{self.ident} (slot {self.slot}, port {port}, {self.state}): "
                f"queued={self.queued} sent={self.sent} verified={self.verified}")


class Load:
    """Drives the connections; see the module docstring.  Use as a context manager: leaving it
    closes every socket and the epoll descriptor, whatever happened."""

    def __init__(self, host: str, port: int, *, persistent: int, churn: int, seed: int = 8,
                 pipeline: int = 2, stall: float = 30.0) -> None:
        self.address = (host, port)
        self.persistent = persistent
        self.churn = churn
        self.pipeline = pipeline
        self.stall = stall
        self.rng = random.Random(seed)
        self.data = make_data(seed)
        self.view = memoryview(self.data)
        self.epoll = select.epoll()
        self.slots: list[Conn | None] = [None] * (persistent + churn)
        self.by_fd: dict[int, Conn] = {}
        self.reopen: list[int] = []  # churn slots waiting for a new connection
        self.generating = False  # make new messages (False while quiescing)
        self.totals = Totals()
        self.idents = 0
        self.busy_seconds = 0.0  # time spent in run() and quiesce(), for rates

    # -- lifetime ----------------------------------------------------------------------------

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every socket and the epoll object (idempotent)."""
        for conn in list(self.by_fd.values()):
            self._drop(conn)
        self.view.release()
        self.epoll.close()

    def open_count(self) -> int:
        return len(self.by_fd)

    # -- opening and closing -----------------------------------------------------------------

    def _open(self, slot: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            # Small messages go out at once: with Nagle a 1-byte message behind an unacknowledged
            # one waits for the delayed ACK (40 ms), which would starve the loop.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(self.address)
            if err not in (0, errno.EINPROGRESS):
                raise SoakFailure(f"connect to {self.address}: {errno.errorcode.get(err, err)}")
        except BaseException:
            sock.close()
            raise
        self.idents += 1
        conn = Conn(slot, self.idents, sock, time.monotonic())
        if slot >= self.persistent:
            conn.fate = self.rng.choice(FATES)
            conn.budget = self.rng.randint(1, 6)
        self.slots[slot] = conn
        self.by_fd[conn.fd] = conn
        conn.mask = select.EPOLLOUT  # writable once connected
        self.epoll.register(conn.fd, conn.mask)

    def _drop(self, conn: Conn, reset: bool = False) -> None:
        """Unregister and close a connection (an RST with ``reset``)."""
        if conn.state is CLOSED:
            return
        if reset:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        del self.by_fd[conn.fd]
        self.epoll.unregister(conn.fd)
        conn.sock.close()
        conn.state = CLOSED
        self.slots[conn.slot] = None

    def _retire(self, conn: Conn, reset: bool = False) -> None:
        """A churn connection has met its fate: close it; its slot reopens while generating."""
        self._drop(conn, reset)
        self.reopen.append(conn.slot)

    def open_all(self) -> None:
        """Start a connection in every slot (they connect in the following loop rounds)."""
        for slot in range(len(self.slots)):
            if self.slots[slot] is None:
                self._open(slot)

    # -- sending -----------------------------------------------------------------------------

    def _set_mask(self, conn: Conn, mask: int) -> None:
        if mask != conn.mask:
            conn.mask = mask
            self.epoll.modify(conn.fd, mask)

    def _new_message(self, conn: Conn, size: int = 0) -> None:
        if not size:
            # Log-uniform between 1 and 64 KiB.
            size = min(MAX_CHUNK, int(2.0 ** self.rng.uniform(0.0, 16.0)))
        if conn.verified == conn.queued:
            conn.last_progress = time.monotonic()  # idle until now: the stall clock starts here
        conn.queued += size
        conn.ends.append(conn.queued)

    def _flush(self, conn: Conn) -> None:
        """Send what is queued until the socket is full; ask for EPOLLOUT if anything is left."""
        view = self.view
        while conn.sent < conn.queued:
            start = (conn.base + conn.sent) % PERIOD
            n = min(conn.queued - conn.sent, MAX_CHUNK)
            try:
                done = conn.sock.send(view[start:start + n])
            except BlockingIOError:
                break
            except OSError as exc:
                raise SoakFailure(f"{conn.describe()}: send: {exc}") from None
            conn.sent += done
            self.totals.bytes_sent += done
        if conn.sent < conn.queued:
            self._set_mask(conn, select.EPOLLIN | select.EPOLLOUT)
            return
        self._set_mask(conn, select.EPOLLIN)
        if conn.state is SHUTTING:
            # Everything of the last message is in the socket: end our side.  The server reads
            # end of stream after those bytes, and must still echo all of them before closing.
            conn.sock.shutdown(socket.SHUT_WR)
            conn.state = HALF_CLOSED

    def _top_up(self, conn: Conn) -> None:
        """Keep ``pipeline`` messages in flight, or carry out a churn connection's fate."""
        if conn.state is not ACTIVE:
            return
        if conn.budget == 0:  # a churn connection whose exchanges are over
            if not conn.ends:
                if conn.fate == "close" or not self.generating:
                    self._retire(conn)
                    if self.generating:
                        self.totals.closes += 1
                elif conn.fate == "half":
                    self._new_message(conn)
                    conn.state = SHUTTING
                    self._flush(conn)
                else:  # reset, with a large message half-way through its echo
                    self._new_message(conn, self.rng.randint(16 * 1024, MAX_CHUNK))
                    self._flush(conn)
                    self._reset(conn)
            return
        if not self.generating:
            if conn.budget > 0 and not conn.ends:
                self._retire(conn)  # quiescing: churn connections go away once idle
            return
        grew = False
        while len(conn.ends) < self.pipeline and conn.budget != 0:
            self._new_message(conn)
            if conn.budget > 0:
                conn.budget -= 1
            grew = True
        if grew:
            self._flush(conn)

    def _reset(self, conn: Conn) -> None:
        """Reset the connection with bytes outstanding: those are abandoned, not lost."""
        # Read what has already arrived first, so that only bytes still on their way count
        # as abandoned (they cannot be checked once the RST has discarded them).
        self._read(conn, drain_only=True)
        if conn.state is CLOSED:
            return
        self.totals.bytes_abandoned += conn.sent - conn.verified
        self.totals.resets += 1
        self._retire(conn, reset=True)

    # -- receiving ---------------------------------------------------------------------------

    def _verify(self, conn: Conn, chunk: bytes) -> None:
        n = len(chunk)
        if conn.verified + n > conn.sent:
            raise SoakFailure(f"{conn.describe()}: {n} bytes echoed, more than were sent "
                              "(duplicated or foreign bytes)")
        start = (conn.base + conn.verified) % PERIOD
        expected = self.data[start:start + n]
        if chunk != expected:
            bad = next(i for i in range(n) if chunk[i] != expected[i])
            raise SoakFailure(
                f"{conn.describe()}: echoed byte at stream offset {conn.verified + bad} is "
                f"{chunk[bad]:#04x}, {expected[bad]:#04x} was sent (chunk of {n} bytes)")
        conn.verified += n
        self.totals.bytes_verified += n
        ends = conn.ends
        while ends and ends[0] <= conn.verified:
            ends.popleft()
            self.totals.messages += 1

    def _read(self, conn: Conn, drain_only: bool = False) -> None:
        """One receive (all that has arrived, with ``drain_only``, and never wait)."""
        while True:
            try:
                chunk = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:
                return
            except OSError as exc:
                raise SoakFailure(f"{conn.describe()}: recv: {exc} (the server reset a connection "
                                  "it should have served)") from None
            if not chunk:
                self._on_eof(conn)
                return
            self._verify(conn, chunk)
            now = time.monotonic()
            if now - conn.last_progress > self.totals.longest_wait:
                self.totals.longest_wait = now - conn.last_progress
            conn.last_progress = now
            if not drain_only:
                return

    def _on_eof(self, conn: Conn) -> None:
        if conn.state is HALF_CLOSED and conn.verified == conn.sent:
            self.totals.half_closes += 1
            self._retire(conn)
            return
        raise SoakFailure(f"{conn.describe()}: the server closed the connection with "
                          f"{conn.sent - conn.verified} bytes not echoed")

    # -- the loop ----------------------------------------------------------------------------

    def _on_event(self, conn: Conn, events: int) -> None:
        if conn.state is CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise SoakFailure(f"{conn.describe()}: connect: {errno.errorcode.get(err, err)}")
            conn.state = ACTIVE
            self.totals.opened += 1
            conn.last_progress = time.monotonic()
            self._set_mask(conn, select.EPOLLIN)
            self._top_up(conn)
            return
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self._read(conn)
            if conn.state is CLOSED:
                return
        if events & select.EPOLLOUT:
            self._flush(conn)
        if conn.state is ACTIVE and len(conn.ends) < self.pipeline:
            self._top_up(conn)

    def _step(self, timeout: float) -> None:
        for fd, events in self.epoll.poll(timeout):
            conn = self.by_fd.get(fd)
            if conn is not None:
                self._on_event(conn, events)
        # Reopened after the batch, so a new socket never takes a number that has an event
        # still to be handled in it.
        if self.reopen and self.generating:
            slots, self.reopen = self.reopen, []
            for slot in slots:
                self._open(slot)

    def _check_stalls(self, now: float) -> None:
        for conn in self.by_fd.values():
            waiting = conn.state is CONNECTING or conn.sent > conn.verified or conn.queued > conn.sent
            if waiting and now - conn.last_progress > self.stall:
                raise SoakFailure(f"{conn.describe()}: no progress for {self.stall:.0f} s "
                                  "(bytes lost, or the server stopped serving it)")

    def run(self, seconds: float, until: Callable[[], bool] | None = None,
            limit: float = 0.0) -> float:
        """Exchange messages for ``seconds``; with ``until``, go on past that (to at most
        ``limit`` seconds in all) until it returns true.  Returns the time taken."""
        self.generating = True
        start = time.monotonic()
        end = start + seconds
        hard_end = start + max(seconds, limit)
        check = start + 1.0
        if self.reopen:
            slots, self.reopen = self.reopen, []
            for slot in slots:
                self._open(slot)
        for conn in list(self.by_fd.values()):
            if conn.state is ACTIVE and not conn.ends:
                self._top_up(conn)  # idle since the last quiesce
        while True:
            self._step(0.2)
            now = time.monotonic()
            if now >= check:
                self._check_stalls(now)
                check = now + 1.0
            if now >= end and (until is None or until()):
                break
            if now >= hard_end:
                raise SoakFailure(f"the warm-up condition was not met within {limit:.0f} s: "
                                  f"{self.totals}")
        taken = time.monotonic() - start
        self.busy_seconds += taken
        return taken

    def quiesce(self, timeout: float = 60.0) -> None:
        """Stop making messages; wait until every byte sent has come back and only the persistent
        connections are open."""
        self.generating = False
        start = time.monotonic()
        deadline = start + timeout
        for conn in list(self.by_fd.values()):
            self._top_up(conn)  # idle churn connections close now
        while True:
            pending = [c for c in self.by_fd.values()
                       if c.state is not ACTIVE or c.verified < c.queued or c.budget >= 0]
            if not pending:
                break
            now = time.monotonic()
            if now >= deadline:
                raise SoakFailure(f"not quiet after {timeout:.0f} s; {len(pending)} connections "
                                  f"still busy, e.g. {pending[0].describe()}")
            self._check_stalls(now)
            self._step(0.2)
        self.busy_seconds += time.monotonic() - start

    def close_all(self) -> None:
        """Close every connection with a FIN (call after :meth:`quiesce`: nothing outstanding)."""
        for conn in list(self.by_fd.values()):
            self._drop(conn)
        self.reopen.clear()

    def all_exchanged(self) -> bool:
        """Every connection open now has had at least one message echoed."""
        return all(c.state is ACTIVE and c.verified > 0 for c in self.by_fd.values()
                   if c.budget < 0)
