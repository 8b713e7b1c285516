"""TCP transports, servers and streams on io_uring, with asyncio's interfaces.

``create_server``/``create_connection`` take an :class:`asyncio.Protocol` (or
:class:`asyncio.BufferedProtocol`) factory, as the loop methods of the same names do;
``start_server``/``open_connection`` give asyncio's own ``StreamReader``/``StreamWriter`` on top.

How a connection runs
---------------------
No task and no selector callback per connection: the transport's requests are watched by the
ring's completion path (``AsyncRing._watch``), which calls the transport as their CQEs are
dispatched.

* Receiving is one multishot ``recv`` (Linux 6.0; re-armed single-shot receives before) that
  picks buffers from a :class:`~saferring.BufferRing` shared by every transport on the ring.
  Each chunk is copied out as it is reaped (``BufferRing._copy_out``: ``data_received`` gets
  ``bytes``; a ``BufferedProtocol`` gets it in its own buffer) and the buffers a poll used go
  back to the kernel together at its end, so one slow protocol cannot hold the shared ring's
  buffers.  ``pause_reading()`` cancels
  the receive; chunks it had already taken are delivered after ``resume_reading()``, before the
  new receive's, so nothing is lost or reordered.
* Sending: a ``write()`` with nothing queued before it is first offered to the socket with one
  non-blocking ``send()`` on the loop thread (what asyncio's and uvloop's transports do; it is
  cheaper than a request and its completion when the socket has room, which is most of the
  time).  What the socket does not take goes to the ring: one ``send`` in flight per
  connection (two sends on one stream socket may complete out of order once one of them has to
  wait), the rest buffered and sent as one when it completes.  Sends queued while the loop
  runs callbacks reach the kernel together, in one ``io_uring_enter`` at the end of the
  iteration.  The write buffer counts bytes not yet sent;
  ``pause_writing()``/``resume_writing()`` follow the high and low water marks as in asyncio.

Every buffer the kernel may touch is pinned by the ring's registry until its request's final
CQE, as everywhere in saferring; closing or aborting a transport cancels its requests, and the
socket is closed only after they have ended.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .._state import COMPLETED
from ..buffers import BufferRing
from ..errors import SaferRingError
from ..operation import Operation
from ._ring import cancel_quietly

if TYPE_CHECKING:

    from ._ring import AsyncRing

# Buffers in each ring's shared transport BufferRing (16 MiB at most, touched as the kernel
# goes round them).  A receive that finds it empty is ended by the kernel (-ENOBUFS) and
# re-armed: with 512, 1,000 busy connections (tests/soak/soakload.py) made three times as many
# of those as with 1024, at about 0.8x the messages per second.
_RECV_BUFFERS = 1024
_RECV_BUFFER_SIZE = 16 * 1024
_HIGH_WATER = 64 * 1024  # asyncio's defaults
_CANCELLED = (errno.ECANCELED, errno.EINTR)
_MSG_DONTWAIT = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def _get_ring(ring: AsyncRing | None) -> AsyncRing:
    """``ring``, checked to belong to the running loop (WrongLoopError otherwise), or the
    running loop's shared ring."""
    if ring is not None:
        ring._check_loop()
        return ring
    from . import get_ring

    return get_ring()


def _buffers(aring: AsyncRing) -> BufferRing:
    """The BufferRing every transport on ``aring`` receives into (created on first use)."""
    br = aring._transport_buffers
    if br is None or br.closed:
        br = aring._transport_buffers = BufferRing(aring.ring, _RECV_BUFFERS, _RECV_BUFFER_SIZE)
    return br  # type: ignore[no-any-return]


class RingTransport(asyncio.Transport):
    """A TCP connection whose receives and sends are io_uring requests.

    Implements :class:`asyncio.Transport`: ``write``, ``writelines``, ``write_eof``,
    ``can_write_eof``, ``close``, ``abort``, ``is_closing``, ``pause_reading``,
    ``resume_reading``, ``is_reading``, ``set_write_buffer_limits``,
    ``get_write_buffer_size``, ``get_write_buffer_limits``, ``get_extra_info`` (``socket``,
    ``sockname``, ``peername``), ``set_protocol``, ``get_protocol``.
    """

    def __init__(self, aring: AsyncRing, sock: socket.socket, protocol: asyncio.BaseProtocol,
                 server: Server | None = None) -> None:
        super().__init__()
        self._aring = aring
        self._loop = aring.loop
        self._sock = sock
        self._sock_send = sock.send
        self._fd = sock.fileno()
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._server = server
        self._extra: dict[str, Any] = {"socket": sock}
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            pass
        try:
            self._extra["peername"] = sock.getpeername()
        except OSError:
            pass
        self._recv: Operation[Any] | None = None  # the multishot receive, while reading
        self._held: collections.deque[bytes] = collections.deque()  # chunks taken while paused
        self._paused = False
        self._send: Operation[Any] | None = None  # the one send in flight
        self._sending = b""  # what that send carries
        self._wbuf: list[bytes] = []  # written, not yet handed to a send
        self._wsize = 0  # bytes in _wbuf plus the unsent part of the send in flight
        self._high = _HIGH_WATER
        self._low = _HIGH_WATER // 4
        self._writing_paused = False
        self._eof_wanted = False  # write_eof() asked; shut down once the buffer is empty
        self._eof_done = False
        self._closing = False
        self._aborted = False
        self._lost = False
        self._conn_lost = 0
        if server is not None:
            server._attach(self)
        self._loop.call_soon(self._start)

    def _callback_failed(self, exc: BaseException, what: str) -> None:
        """A protocol callback raised: the connection fails with ``exc`` (reported as asyncio's
        transports do), and what is not an ``Exception`` (KeyboardInterrupt, SystemExit) goes
        on up to the loop."""
        self._fatal(exc, f"{what} failed")
        if not isinstance(exc, Exception):
            raise exc

    def _start(self) -> None:
        if self._closing:
            return
        try:
            self._protocol.connection_made(self)
        except BaseException as exc:  # noqa: BLE001 - re-raised there unless an Exception
            self._callback_failed(exc, "connection_made()")
            return
        if not self._closing and not self._paused:
            self._arm_recv()

    # -- receiving --------------------------------------------------------------------------

    def _arm_recv(self) -> None:
        aring = self._aring
        try:
            op = aring.ring._recv_copied(self._fd, _buffers(aring))
        except (OSError, SaferRingError) as exc:
            self._fatal(exc, "could not start receiving")
            return
        self._recv = op
        aring._watch(op, self._on_recv)

    def _on_recv(self, op: Operation[Any]) -> None:
        items = op._items  # type: ignore[attr-defined]
        if op._res is None and len(items) == 1 and type(items[0]) is bytes and not (
                self._paused or self._held or self._closing or self._buffered):
            # The usual case, written out: one chunk for a plain Protocol that is reading, of
            # a receive that goes on.
            data = items.popleft()
            try:
                self._protocol.data_received(data)  # type: ignore[attr-defined]
            except BaseException as exc:  # noqa: BLE001 - re-raised there unless an Exception
                self._callback_failed(exc, "data_received()")
            return
        # The usual case, one chunk, without take()'s loop.
        one = len(items) == 1 and type(items[0]) is bytes
        chunks = [items.popleft()] if one else op.take()  # type: ignore[attr-defined]
        ended = op._res is not None
        if ended and self._recv is op:
            self._recv = None
        if chunks:
            if self._paused or self._held:
                self._held.extend(chunks)
            else:
                self._deliver(chunks)
        if not ended or self._lost:
            return
        if op._state is COMPLETED:
            if self._paused or self._held:
                self._held.append(b"")  # end of stream, told after what is held, on resume
            else:
                self._eof()
        elif -op._res not in _CANCELLED:  # type: ignore[operator]
            self._fatal(_error(op), "receive failed")
        elif self._aring._closing or self._aring.closed:
            self._finish(None)  # the ring is closing under the connection: it ends here
        elif self._paused is False and not self._closing:
            self._arm_recv()  # cancelled by pause_reading(), then resumed before it ended

    def _deliver(self, chunks: list[bytes]) -> None:
        protocol = self._protocol
        try:
            for i, data in enumerate(chunks):
                if self._paused or self._closing:
                    # pause_reading() (or close()) from inside the protocol: the rest waits
                    # for resume_reading(), as with asyncio's transports.
                    if not self._closing:
                        self._held.extend(chunks[i:])
                    return
                if self._buffered:
                    self._feed(data)
                else:
                    protocol.data_received(data)  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - re-raised there unless an Exception
            self._callback_failed(exc, "data_received()")

    def _feed(self, data: Any) -> None:
        """Hand ``data`` to a BufferedProtocol through as many of its buffers as it takes (what
        is left when it pauses reading in between waits for resume_reading())."""
        protocol: Any = self._protocol
        done = 0
        total = len(data)
        while done < total:
            if self._paused:
                self._held.appendleft(data[done:])
                return
            with memoryview(protocol.get_buffer(total - done)) as view, view.cast("B") as dst:
                if not len(dst):
                    raise RuntimeError("get_buffer() returned an empty buffer")
                n = min(len(dst), total - done)
                dst[:n] = data[done:done + n]
            done += n
            protocol.buffer_updated(n)

    def _eof(self) -> None:
        try:
            keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - re-raised there unless an Exception
            self._callback_failed(exc, "eof_received()")
            return
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading` (the receive request is
        cancelled; what it already took is kept and delivered first on resume)."""
        if self._closing or self._paused:
            return
        self._paused = True
        cancel_quietly(self._recv)

    def resume_reading(self) -> None:
        """Resume calling ``data_received``: first with what was held, then new data."""
        if self._closing or not self._paused:
            return
        self._paused = False
        if self._held:
            # Later, as asyncio would: the caller (a StreamReader in the middle of read(),
            # say) does not expect data_received() from inside resume_reading().
            self._loop.call_soon(self._resume_held)
        elif self._recv is None:
            self._arm_recv()
        # (A receive still being cancelled re-arms itself when it ends: see _on_recv.)

    def _resume_held(self) -> None:
        held = self._held
        while held and not self._paused and not self._closing:
            data = held.popleft()
            if not data:
                self._eof()
                return
            try:
                if self._buffered:
                    self._feed(data)
                else:
                    self._protocol.data_received(data)  # type: ignore[attr-defined]
            except BaseException as exc:  # noqa: BLE001 - re-raised there unless an Exception
                self._callback_failed(exc, "data_received()")
                return
        if not self._paused and not self._closing and self._recv is None:
            self._arm_recv()

    def is_reading(self) -> bool:
        """True unless reading is paused or the transport is closing."""
        return not self._paused and not self._closing

    # -- sending ----------------------------------------------------------------------------

    def write(self, data: Any) -> None:
        """Send ``data`` (bytes-like), in order, without blocking.  What the socket does not take
        at once is copied (unless it is ``bytes``) and sent by the ring."""
        if type(data) is not bytes and type(data) is not bytearray:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(
                    f"data argument must be a bytes-like object, not {type(data).__name__!r}")
            data = bytes(data)
        if self._eof_wanted:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or self._lost:
            self._conn_lost += 1
            return
        if not data:
            return
        if self._send is None and not self._wbuf:
            # Nothing queued: most writes fit in the socket's buffer, so try one non-blocking
            # send() on the loop thread first, as asyncio's and uvloop's transports do.  The
            # ring gets only what the socket could not take at once (it waits for room without
            # the loop's help): per message that saves a request, its completion and the
            # bookkeeping of both, which cost more than the system call.
            try:
                n = self._sock_send(data, _MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._fatal(exc, "send failed")
                return
            if n == len(data):
                return
            data = data[n:]
        if type(data) is not bytes:
            data = bytes(data)  # the caller may change theirs as soon as write() returns
        self._wsize += len(data)
        if self._send is None:
            self._start_send(data)
        else:
            self._wbuf.append(data)
        if self._wsize > self._high and not self._writing_paused:
            self._writing_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:  # noqa: BLE001 - reported, as asyncio does
                self._aring._report(exc, "protocol.pause_writing() failed")

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        """Write each item of ``list_of_data``, as one send where possible."""
        self.write(b"".join(list_of_data))

    def _start_send(self, data: bytes) -> None:
        aring = self._aring
        try:
            op = aring.ring.send(self._fd, data)
        except (OSError, SaferRingError) as exc:
            self._fatal(exc, "could not send")
            return
        self._send = op
        self._sending = data
        # Submitted at the end of this loop iteration (or of the dispatch that called us).
        aring._watchers[op._ud] = (op, self._on_sent)
        if not aring._scheduled:
            aring._schedule()

    def _on_sent(self, op: Operation[Any]) -> None:
        self._send = None
        data = self._sending
        self._sending = b""
        n = op._res
        if n == len(data) and not self._wbuf and not self._writing_paused and not self._closing \
                and not self._eof_wanted:
            self._wsize -= n  # the usual case: all of it went, nothing else to do
            return
        if op._state is not COMPLETED or self._aborted:
            if not self._lost:
                if self._closing and (self._aborted or -n in _CANCELLED):  # type: ignore[operator]
                    self._finish(None)  # abort() cancelled it (or it finished first)
                elif self._aring._closing or self._aring.closed:
                    self._fatal(None, "")  # the ring closed under the connection
                else:
                    self._fatal(_error(op), "send failed")
            return
        n = n or 0
        self._wsize -= n
        rest = data[n:]
        if rest or self._wbuf:
            if self._wbuf:
                self._wbuf.insert(0, rest)
                rest = b"".join(self._wbuf)
                self._wbuf.clear()
            self._start_send(rest)
        if self._writing_paused and self._wsize <= self._low:
            self._writing_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:  # noqa: BLE001 - reported, as asyncio does
                self._aring._report(exc, "protocol.resume_writing() failed")
        if self._send is None:
            self._drained()

    def _drained(self) -> None:
        """Everything written has been sent: do what waited for that."""
        if self._eof_wanted and not self._eof_done:
            self._eof_done = True
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self._closing:
            self._finish(None)

    def can_write_eof(self) -> bool:
        """True: TCP can close its sending half."""
        return True

    def write_eof(self) -> None:
        """Close the sending half once everything written has been sent."""
        if self._closing or self._eof_wanted:
            return
        self._eof_wanted = True
        if self._send is None:
            self._drained()

    def get_write_buffer_size(self) -> int:
        """Bytes written but not yet sent."""
        return self._wsize

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """``(low, high)`` water marks."""
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the water marks for ``pause_writing``/``resume_writing`` (asyncio's defaults:
        64 KiB high, a quarter of it low)."""
        if high is None:
            high = _HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low

    # -- closing ----------------------------------------------------------------------------

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called (or the connection failed)."""
        return self._closing

    def close(self) -> None:
        """Close after everything written has been sent; ``connection_lost(None)`` follows."""
        if self._closing:
            return
        self._closing = True
        self._stop_receiving()
        if self._send is None:
            self._finish(None)

    def abort(self) -> None:
        """Close now: unsent data is dropped; ``connection_lost(None)`` follows."""
        self._closing = True
        self._aborted = True
        self._wbuf.clear()
        self._stop_receiving()
        op = self._send
        if cancel_quietly(op):
            return  # _on_sent finishes once the kernel has let go of the data
        if op is None or op._res is not None:
            self._finish(None)

    def _stop_receiving(self) -> None:
        cancel_quietly(self._recv)
        self._held.clear()

    def _fatal(self, exc: BaseException | None, message: str) -> None:
        """End the connection now (an error, or ``exc=None``: the ring closed under it)."""
        if self._aring._closing or self._aring.closed:
            exc = None  # whatever failed, it failed because the ring is going away
        if exc is not None and (not isinstance(exc, (OSError, SaferRingError))
                                or self._loop.get_debug()):
            self._aring._report(exc, f"saferring transport: {message}")
        self._closing = True
        self._wbuf.clear()
        self._stop_receiving()
        cancel_quietly(self._send)
        self._finish(exc if isinstance(exc, Exception) else None)

    def _finish(self, exc: Exception | None) -> None:
        """The end: close the socket, tell the protocol (once)."""
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self._wsize = 0
        # The receive request holds a duplicate of the descriptor until it ends (cancelled
        # above), so closing ours cannot redirect it; the kernel finishes the socket then.
        try:
            self._sock.close()
        except OSError:
            pass
        if self._server is not None:
            self._server._detach(self)
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Exception | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = None  # type: ignore[assignment]
            self._server = None

    # -- the rest of the interface ----------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``socket``, ``sockname`` or ``peername`` (else ``default``)."""
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Switch the protocol data goes to."""
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The current protocol."""
        return self._protocol

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        return f"<saferring.aio.RingTransport fd={self._fd} {state}>"


def _error(op: Operation[Any]) -> OSError:
    code = -op._res if op._res is not None else errno.EIO
    return OSError(code, os.strerror(code))


class Server(asyncio.AbstractServer):
    """A listening TCP server on io_uring (what :func:`create_server` returns).

    ``close()``, ``await wait_closed()``, ``await serve_forever()``, ``await start_serving()``,
    ``is_serving()``, ``get_loop()``, ``sockets`` and ``async with`` behave as in asyncio.
    """

    def __init__(self, aring: AsyncRing, sockets: list[socket.socket],
                 protocol_factory: Callable[[], asyncio.BaseProtocol], backlog: int) -> None:
        self._aring = aring
        self._backlog = backlog
        self._loop = aring.loop
        self._sockets = sockets
        self._factory = protocol_factory
        self._accepts: dict[int, Any] = {}  # listening fd -> its multishot accept
        self._serving = False
        self._closed = False
        self._transports: set[RingTransport] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._forever: asyncio.Future[None] | None = None

    def _attach(self, transport: RingTransport) -> None:
        self._transports.add(transport)

    def _detach(self, transport: RingTransport) -> None:
        self._transports.discard(transport)
        self._wake_if_done()

    def _start(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        for sock in self._sockets:
            sock.listen(self._backlog)  # only now, as asyncio: before, connections are refused
            self._arm_accept(sock)

    def _arm_accept(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        op = self._aring.ring.accept_multishot(fd)
        self._accepts[fd] = op
        self._aring._watch(op, lambda op: self._on_accept(sock, fd, op))

    def _on_accept(self, listener: socket.socket, fd: int, op: Any) -> None:
        for conn in op.take():
            if self._closed:
                os.close(conn)
                continue
            try:
                sock = socket.socket(fileno=conn)
            except OSError:
                os.close(conn)
                continue
            try:
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                protocol = self._factory()
            except BaseException as exc:
                sock.close()
                self._aring._report(exc, "saferring server: could not set up a connection")
                if not isinstance(exc, Exception):
                    raise
                continue
            RingTransport(self._aring, sock, protocol, self)
        if op._res is None:
            return
        if self._accepts.get(fd) is op:
            del self._accepts[fd]
        if self._aring._closing or self._aring.closed:
            self.close()  # the ring is closing: so is the server
        elif self._serving and not self._closed:
            # The kernel ended the multishot accept (out of descriptors, say): report it, and
            # accept again a little later rather than spin.
            if op._state is not COMPLETED and -op._res not in _CANCELLED:
                self._aring._report(_error(op), "saferring server: accept failed; retrying")
            self._loop.call_later(0.1, self._rearm, listener, fd)
        self._wake_if_done()

    def _rearm(self, sock: socket.socket, fd: int) -> None:
        if self._aring._closing or self._aring.closed:
            self.close()
        elif self._serving and not self._closed and fd not in self._accepts:
            self._arm_accept(sock)

    def _wake_if_done(self) -> None:
        if self._closed and not self._accepts and not self._transports:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay open)."""
        if self._closed:
            return
        self._closed = True
        self._serving = False
        for op in list(self._accepts.values()):
            cancel_quietly(op)
        for sock in self._sockets:
            sock.close()
        if self._forever is not None and not self._forever.done():
            self._forever.cancel()
        self._wake_if_done()

    def close_clients(self) -> None:
        """Close every connection this server accepted (as asyncio 3.13's)."""
        for transport in list(self._transports):
            transport.close()

    def abort_clients(self) -> None:
        """Abort every connection this server accepted (as asyncio 3.13's)."""
        for transport in list(self._transports):
            transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the server is closed, its accepts have ended and every connection it
        accepted has closed."""
        if self._closed and not self._accepts and not self._transports:
            return
        fut = self._loop.create_future()
        self._waiters.append(fut)
        await fut

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """True while accepting connections."""
        return self._serving

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets."""
        return () if self._closed else tuple(self._sockets)

    async def start_serving(self) -> None:
        """Start accepting connections (``create_server(..., start_serving=False)``)."""
        self._start()

    async def serve_forever(self) -> None:
        """Accept connections until cancelled; closes the server on the way out."""
        if self._forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        self._start()
        self._forever = self._loop.create_future()
        try:
            await self._forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._forever = None

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        return f"<saferring.aio.Server sockets={self.sockets!r}>"


async def create_server(protocol_factory: Callable[[], asyncio.BaseProtocol],
                        host: str | list[str] | None = None, port: int | None = None, *,
                        family: int = socket.AF_UNSPEC, flags: int = socket.AI_PASSIVE,
                        sock: socket.socket | None = None, backlog: int = 100,
                        reuse_address: bool | None = None, reuse_port: bool | None = None,
                        start_serving: bool = True, ring: AsyncRing | None = None) -> Server:
    """Listen on ``host``:``port`` (or on ``sock``) and serve each connection with a protocol
    from ``protocol_factory``, as :meth:`asyncio.loop.create_server` does, on io_uring.

    Raises what asyncio raises: ``OSError`` (``EADDRINUSE``...) when binding fails,
    ``ValueError`` for ``sock`` together with ``host``/``port``.
    """
    aring = _get_ring(ring)
    loop = aring.loop
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        sockets = [sock]
    else:
        if reuse_address is None:
            reuse_address = True
        hosts: list[str | None] = [host] if host is None or isinstance(host, str) else list(host)
        infos = []
        for h in hosts:
            infos += await loop.getaddrinfo(h, port, family=family, type=socket.SOCK_STREAM,
                                            flags=flags)
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        sockets = []
        try:
            seen = set()
            for af, kind, proto, _name, address in infos:
                if (af, address) in seen:
                    continue
                seen.add((af, address))
                try:
                    s = socket.socket(af, kind, proto)
                except OSError:
                    continue  # a family this machine lacks (IPv6 turned off): as asyncio does
                sockets.append(s)
                if reuse_address:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if af == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, True)
                try:
                    s.bind(address)
                except OSError as err:
                    raise OSError(err.errno, f"error while attempting to bind on address "
                                  f"{address!r}: {(err.strerror or '').lower()}") from None
        except BaseException:
            for s in sockets:
                s.close()
            raise
    server = Server(aring, sockets, protocol_factory, backlog)
    if start_serving:
        server._start()
    return server


async def create_connection(protocol_factory: Callable[[], asyncio.BaseProtocol],
                            host: str | None = None, port: int | None = None, *,
                            family: int = 0, proto: int = 0, flags: int = 0,
                            sock: socket.socket | None = None,
                            local_addr: tuple[str, int] | None = None,
                            ring: AsyncRing | None = None) -> tuple[RingTransport, Any]:
    """Connect to ``host``:``port`` (or use the connected ``sock``) and return
    ``(transport, protocol)``, as :meth:`asyncio.loop.create_connection` does, on io_uring.
    ``ConnectionRefusedError`` and the other connect errors are raised as asyncio raises them."""
    aring = _get_ring(ring)
    loop = aring.loop
    if sock is None:
        if host is None and port is None:
            raise ValueError("host and port was not specified and no sock specified")
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM,
                                       proto=proto, flags=flags)
        if not infos:
            raise OSError(f"getaddrinfo({host!r}) returned empty list")
        errors: list[OSError] = []
        for af, kind, pr, _name, address in infos:
            s = socket.socket(af, kind, pr)
            try:
                if local_addr is not None:
                    s.bind(local_addr)
                await aring.connect(s.fileno(), address)
            except OSError as exc:
                s.close()
                errors.append(exc)
                continue
            except BaseException:
                s.close()
                raise
            sock = s
            break
        else:
            if len(errors) == 1:
                raise errors[0]
            raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")
    elif host is not None or port is not None:
        raise ValueError("host/port and sock can not be specified at the same time")
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    protocol = protocol_factory()
    transport = RingTransport(aring, sock, protocol)
    # connection_made() runs in the next loop iteration, as in asyncio: wait for it.
    fut = loop.create_future()
    loop.call_soon(fut.set_result, None)
    await fut
    return transport, protocol


# -- streams: asyncio's StreamReader/StreamWriter over these transports ----------------------


class _StreamReader(asyncio.StreamReader):
    """asyncio's StreamReader, whose ``read(n)`` takes a chunk straight from the transport when
    it was waiting with an empty buffer and the chunk fits in ``n``: no copy into the buffer and
    out of it again, no slicing (the common case of a server that reads what arrives).
    Everything else (``readline``, ``readexactly``, data that arrives while nobody waits) is
    asyncio's own code, on the same buffer, in the same order."""

    _want = 0  # while read(n) waits for a chunk to hand over: n; otherwise 0

    async def read(self, n: int = -1) -> bytes:
        this: Any = self  # asyncio's private attributes, which typeshed does not declare
        if n > 0 and not this._buffer and this._waiter is None and not this._eof \
                and this._exception is None:
            if this._paused:  # waiting while paused would wait forever (as asyncio does)
                this._paused = False
                this._transport.resume_reading()
            fut = this._waiter = this._loop.create_future()
            self._want = n
            try:
                got = await fut
            except asyncio.CancelledError:
                # Cancelled after a chunk was handed over: it goes back in front of the
                # buffer, for the next read, so nothing is lost.
                if fut.done() and not fut.cancelled() and fut.exception() is None \
                        and type(fut.result()) is bytes:
                    this._buffer[0:0] = fut.result()
                raise
            finally:
                if this._waiter is fut:
                    this._waiter = None
                self._want = 0
            if type(got) is bytes:
                return got
        return await super().read(n)

    def feed_data(self, data: Any) -> None:
        """Hand ``data`` to a ``read(n)`` that waits for it, else buffer it as asyncio does."""
        want = self._want
        if want and type(data) is bytes and 0 < len(data) <= want:
            this: Any = self
            waiter = this._waiter
            if waiter is not None and not waiter.done() and not this._buffer:
                # As asyncio's _wakeup_waiter: the waiter is dropped once woken, so what
                # arrives before the task resumes is buffered behind this chunk.
                this._waiter = None
                self._want = 0
                waiter.set_result(data)
                return
        super().feed_data(data)


async def open_connection(host: str | None = None, port: int | None = None, *,
                          limit: int = 2 ** 16, ring: AsyncRing | None = None,
                          **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``(reader, writer)`` for a connection to ``host``:``port``, as
    :func:`asyncio.open_connection` returns, over a :class:`RingTransport`."""
    ring = _get_ring(ring)  # WrongLoopError before anything is made
    loop = asyncio.get_running_loop()
    reader = _StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, ring=ring, **kwargs)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer


async def start_server(client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                     Any],
                       host: str | list[str] | None = None, port: int | None = None, *,
                       limit: int = 2 ** 16, ring: AsyncRing | None = None,
                       **kwargs: Any) -> Server:
    """Serve ``client_connected_cb(reader, writer)`` for each connection, as
    :func:`asyncio.start_server` does, over :class:`RingTransport` connections."""
    ring = _get_ring(ring)  # WrongLoopError before anything is made
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = _StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, ring=ring, **kwargs)


__all__ = ["RingTransport", "Server", "create_connection", "create_server", "open_connection",
           "start_server"]
