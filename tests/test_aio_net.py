"""saferring.aio TCP transports, servers and streams on the real kernel (127.0.0.1 only), on stock
asyncio and on uvloop.  Each behavioural test runs against saferring's create_server/
create_connection/start_server/open_connection and against the loop's own (asyncio's, or uvloop's
on uvloop), which saferring must match; a few tests pair a saferring end with an asyncio end.

After every test (``_checked``): every connection the test made has ended, every server and stream
writer is closed, no protocol saw a callback out of order, nothing was reported to the loop's
exception handler, and nothing is in flight or pinned on the loop's shared ring."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import random
import socket
import struct
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from _aio import (
    IN_KERNEL_GUEST,
    LOOP_KINDS,
    assert_idle,
    cancel_and_wait,
    hang_guard,
    listener,
    run,
    settle,
    until,
)
from saferring import aio

T = TypeVar("T")
Run = Callable[..., Any]

HOST = "127.0.0.1"
IMPLS = ("saferring", "asyncio")
MIXED = [("saferring", "asyncio"), ("asyncio", "saferring")]
LIMIT = 10.0  # seconds any one wait may take (the emulated guest is slow); a hang fails instead
HIGH = 64 * 1024  # asyncio's default high-water mark

# What the running test opened, for _checked to verify (and, after a failure, to undo).
_protocols: list[Recording] = []
_servers: list[Any] = []
_writers: list[asyncio.StreamWriter] = []
_reported: list[dict[str, Any]] = []  # what reached the loop's exception handler


# -- the two implementations ---------------------------------------------------------------------

class Net:
    """One implementation's factories: saferring.aio's, or the running loop's own (asyncio's)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    async def create_server(self, factory: Callable[[], asyncio.BaseProtocol], host: Any = HOST,
                            port: int | None = 0, **kwargs: Any) -> Any:
        if self.name == "saferring":
            server: Any = await aio.create_server(factory, host, port, **kwargs)
        else:
            server = await asyncio.get_running_loop().create_server(factory, host, port, **kwargs)
        _servers.append(server)
        return server

    async def create_connection(self, factory: Callable[[], Any], host: str | None = HOST,
                                port: int | None = None, **kwargs: Any) -> tuple[Any, Any]:
        if self.name == "saferring":
            return await aio.create_connection(factory, host, port, **kwargs)
        return await asyncio.get_running_loop().create_connection(factory, host, port, **kwargs)

    async def start_server(self, callback: Callable[..., Any], host: Any = HOST,
                           port: int | None = 0, **kwargs: Any) -> Any:
        start = aio.start_server if self.name == "saferring" else asyncio.start_server
        server = await start(callback, host, port, **kwargs)
        _servers.append(server)
        return server

    async def open_connection(self, host: str | None = HOST, port: int | None = None,
                              **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        open_ = aio.open_connection if self.name == "saferring" else asyncio.open_connection
        reader, writer = await bounded(open_(host, port, **kwargs))
        _writers.append(writer)
        return reader, writer


@pytest.fixture(params=LOOP_KINDS, ids=lambda kind: f"loop={kind}")
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=IMPLS, ids=lambda name: f"net={name}")
def net(request: pytest.FixtureRequest) -> Net:
    return Net(str(request.param))


def _impls(saferring_marks: Any = ()) -> Any:
    """Parameters for ``net`` (indirect) with ``saferring_marks`` on the saferring one."""
    impls = [pytest.param("saferring", marks=saferring_marks, id="net=saferring")]
    if not IN_KERNEL_GUEST:  # (the loops' own transports are compared on the host)
        impls.append(pytest.param("asyncio", id="net=asyncio"))
    return pytest.mark.parametrize("net", impls, indirect=True)


@pytest.fixture
def arun(loop_kind: str) -> Run:
    """``arun(coro_fn, *args)``: run ``coro_fn(*args)`` on a fresh loop of the test's kind, then
    check that it left nothing open or in flight (``_checked``)."""
    def go(coro_fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        with hang_guard(120):
            return run(loop_kind, _checked, coro_fn, args)
    return go


async def _checked(coro_fn: Callable[..., Coroutine[Any, Any, T]], args: tuple[Any, ...]) -> T:
    for registry in (_protocols, _servers, _writers, _reported):
        registry.clear()
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: _reported.append(context))
    try:
        result = await coro_fn(*args)
    except BaseException:
        await _wrap_up(ok=False)
        raise
    await _wrap_up(ok=True)
    return result


def _open(p: Recording) -> bool:
    return p.transport is not None and not p.lost and not p.detached


async def _wrap_up(ok: bool) -> None:
    """Check that the test closed everything (when it passed), then close what is left, then
    check that the shared ring has nothing in flight or pinned."""
    problems: list[str] = []
    if ok:
        try:
            await until(lambda: not any(_open(p) for p in _protocols), LIMIT)
        except AssertionError:
            problems.append(f"connections never closed: {[p for p in _protocols if _open(p)]}")
        problems += [f"stream writer left open: {w!r}" for w in _writers if not w.is_closing()]
    for p in _protocols:
        if _open(p):
            p.transport.abort()
    for w in _writers:
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), LIMIT)
        except Exception:  # (a reset connection: its error is not what is checked here)
            pass
    for server in _servers:
        server.close()
        try:
            await asyncio.wait_for(server.wait_closed(), LIMIT)
        except Exception as exc:
            if ok:
                raise
            problems.append(f"{server!r}.wait_closed(): {exc!r}")  # (the test's error wins)
    for _ in range(5):
        await asyncio.sleep(0)
    aring = aio.get_ring()
    await settle(aring, LIMIT)
    if not ok:
        return
    problems += [f"{p!r}: {error}" for p in _protocols for error in p.errors]
    problems += [f"reported to the loop: {context}" for context in _reported]
    assert not problems, "\n".join(problems)
    assert_idle(aring)


# -- helpers -------------------------------------------------------------------------------------

async def bounded(aw: Awaitable[T]) -> T:
    """``await aw``, failing instead of hanging."""
    return await asyncio.wait_for(aw, LIMIT)


def port_of(server: Any) -> int:
    return int(server.sockets[0].getsockname()[1])


def pattern(seed: int, size: int) -> bytes:
    """``size`` pseudo-random bytes of their own for ``seed`` (any reordering shows)."""
    return random.Random(seed).randbytes(size)


def numbered(count: int) -> bytes:
    """Lines "00000000\\n", "00000001\\n", ...: a stream whose every byte has its place."""
    return b"".join(b"%08d\n" % i for i in range(count))


@contextlib.contextmanager
def raw_listener(rcvbuf: int = 0) -> Iterator[socket.socket]:
    """A plain non-blocking listening socket on 127.0.0.1 (a peer outside both implementations);
    ``rcvbuf`` shrinks the receive buffer of the connections it accepts."""
    with listener() as sock:
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        yield sock


@contextlib.asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[socket.socket]:
    """A plain non-blocking socket connected to 127.0.0.1:``port``, closed at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await bounded(asyncio.get_running_loop().sock_connect(sock, (HOST, port)))
        yield sock
    finally:
        sock.close()


@contextlib.asynccontextmanager
async def accepted(ls: socket.socket) -> AsyncIterator[socket.socket]:
    """The next connection on raw listener ``ls``, closed at the end."""
    conn, _ = await bounded(asyncio.get_running_loop().sock_accept(ls))
    try:
        conn.setblocking(False)
        yield conn
    finally:
        conn.close()


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < size:
        data = await bounded(loop.sock_recv(sock, min(size - len(out), 256 * 1024)))
        assert data, f"end of stream after {len(out)} of {size} bytes"
        out += data
    return bytes(out)


async def recv_to_end(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    """Everything until end of stream, and the error that ended it instead (a reset), if any."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while True:
        try:
            data = await bounded(loop.sock_recv(sock, 256 * 1024))
        except ConnectionError as exc:
            return bytes(out), exc
        if not data:
            return bytes(out), None
        out += data


def uvloop_own(net: Net) -> bool:
    """True when ``net`` is the running loop's own implementation and that loop is uvloop."""
    return net.name == "asyncio" and type(asyncio.get_running_loop()).__module__.startswith("uvloop")


def shrink_sndbuf(transport: asyncio.BaseTransport, size: int = 4096) -> None:
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


# -- protocols -----------------------------------------------------------------------------------

class Recording:
    """Records every protocol callback, and every callback that breaks the protocol contract
    (checked for every test by _checked); ``eof_result`` is what eof_received() returns."""

    eof_result: bool | None = None

    def __init__(self) -> None:
        self.transport: Any = None
        self.events: list[str] = []  # made, data (once per run of data), eof, lost
        self.received = bytearray()
        self.lost: list[BaseException | None] = []
        self.pauses = 0
        self.resumes = 0
        self.writing_paused = False
        self.reading_paused = False  # set by whoever calls pause_reading()
        self.detached = False  # its transport went to another protocol (set_protocol)
        self.errors: list[str] = []
        _protocols.append(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} events={self.events} received={len(self.received)}>"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.events:
            self.errors.append(f"connection_made() after {self.events}")
        self.events.append("made")
        self.transport = transport

    def _got(self, data: bytes) -> None:
        if self.events[-1:] not in (["made"], ["data"]):
            self.errors.append(f"data after {self.events}")
        if self.reading_paused:
            self.errors.append("data_received() while reading is paused")
        if not data:
            self.errors.append("empty data_received()")
        if self.events[-1:] != ["data"]:
            self.events.append("data")
        self.received += data

    def data_received(self, data: bytes) -> None:
        self._got(data)

    def eof_received(self) -> bool | None:
        if self.events[-1:] not in (["made"], ["data"]):
            self.errors.append(f"eof_received() after {self.events}")
        self.events.append("eof")
        return self.eof_result

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.lost:
            self.errors.append(f"connection_lost({exc!r}) after connection_lost({self.lost[0]!r})")
        self.events.append("lost")
        self.lost.append(exc)

    def pause_writing(self) -> None:
        if self.writing_paused:
            self.errors.append("pause_writing() twice")
        self.pauses += 1
        self.writing_paused = True

    def resume_writing(self) -> None:
        if not self.writing_paused:
            self.errors.append("resume_writing() without pause_writing()")
        self.resumes += 1
        self.writing_paused = False

    async def wait_bytes(self, size: int) -> None:
        await until(lambda: len(self.received) >= size or bool(self.lost), LIMIT)
        assert len(self.received) >= size, \
            f"{len(self.received)} of {size} bytes, then connection_lost({self.lost[0]!r})"

    async def wait_lost(self) -> None:
        await until(lambda: bool(self.lost), LIMIT)


class Recorder(Recording, asyncio.Protocol):
    """A Protocol that records its callbacks."""


class Echo(Recorder):
    """Sends back what it receives; closes at end of stream."""

    def data_received(self, data: bytes) -> None:
        self._got(data)
        self.transport.write(data)


class Greeter(Recorder):
    """Writes a greeting from connection_made()."""

    GREETING = b"hello from connection_made"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.write(self.GREETING)


class TinyBuffers(Recording, asyncio.BufferedProtocol):
    """A BufferedProtocol that offers 7-byte buffers (not a Protocol too: uvloop would take it
    for one)."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray(7)
        self.updates: list[int] = []

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buffer)

    def buffer_updated(self, nbytes: int) -> None:
        if not 0 < nbytes <= len(self.buffer):
            self.errors.append(f"buffer_updated({nbytes}) for a {len(self.buffer)}-byte buffer")
        self.updates.append(nbytes)
        self._got(bytes(self.buffer[:nbytes]))


def collect(cls: Callable[[], T], into: list[T]) -> Callable[[], T]:
    """A factory of ``cls`` instances that also lists them in ``into``."""
    def factory() -> T:
        protocol = cls()
        into.append(protocol)
        return protocol
    return factory


async def echo_round(net: Net, port: int, data: bytes = b"ping", host: str = HOST) -> None:
    """Connect, send ``data``, get it back from an echo server, close."""
    transport, client = await net.create_connection(Recorder, host, port)
    transport.write(data)
    await client.wait_bytes(len(data))
    assert client.received == data
    transport.close()
    await client.wait_lost()
    assert client.lost == [None]


async def echo_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stream server's callback: send back everything, close at end of stream."""
    _writers.append(writer)
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


# -- protocols: data ------------------------------------------------------------------------------

def test_echo_many_messages_in_order(arun: Run, net: Net) -> None:
    """Hundreds of messages of random sizes written one by one come back byte for byte in order,
    and each end sees made, data, (eof,) lost in that order."""
    async def main() -> None:
        rng = random.Random(1)
        messages = [rng.randbytes(rng.randint(1, 3000)) for _ in range(300)]
        expected = b"".join(messages)
        served: list[Echo] = []
        server = await net.create_server(collect(Echo, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        for i, message in enumerate(messages):
            transport.write(message)
            if i % 7 == 0:
                await asyncio.sleep(0)
        await client.wait_bytes(len(expected))
        assert client.received == expected
        transport.close()
        await client.wait_lost()
        await served[0].wait_lost()
        assert client.events == ["made", "data", "lost"] and client.lost == [None]
        assert served[0].events == ["made", "data", "eof", "lost"] and served[0].lost == [None]
        assert served[0].received == expected

    arun(main)


def test_concurrent_connections_each_get_their_own_bytes(arun: Run, net: Net) -> None:
    """20 connections at once, each writing its own pattern in pieces, each get back exactly
    their own bytes."""
    async def main() -> None:
        server = await net.create_server(Echo)
        port = port_of(server)
        size = 64 * 1024

        async def one(i: int) -> None:
            data = pattern(i, size)
            transport, client = await net.create_connection(Recorder, HOST, port)
            for offset in range(0, size, 4096):
                transport.write(data[offset:offset + 4096])
                if offset % 16384 == 0:
                    await asyncio.sleep(0)
            await client.wait_bytes(size)
            assert client.received == data, f"connection {i} got other bytes"
            transport.close()
            await client.wait_lost()

        await asyncio.gather(*(one(i) for i in range(20)))

    arun(main)


def test_large_payload_written_at_once(arun: Run, net: Net) -> None:
    """A 2 MiB payload handed to a single write() (sent in parts, the rest buffered) is echoed
    back intact; writing paused and resumed as often, and the write buffer ends empty."""
    async def main() -> None:
        data = pattern(7, 2 * 1024 * 1024 + 12345)
        server = await net.create_server(Echo)
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        transport.write(data)
        await client.wait_bytes(len(data))
        assert client.received == data
        await until(lambda: transport.get_write_buffer_size() == 0, LIMIT)
        assert client.pauses == client.resumes
        assert not client.writing_paused
        transport.close()
        await client.wait_lost()

    arun(main)


def test_writelines_and_mutable_buffers(arun: Run, net: Net) -> None:
    """writelines() of bytes, bytearray and memoryview items (a list or an iterator), interleaved
    with write(), arrives as the concatenation in order; a bytearray changed after write() is
    sent as it was."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        mutable = bytearray(b"<before>")
        transport.writelines([b"ab", bytearray(b"cd"), memoryview(b"wxyz")[1:3], b""])
        transport.write(b"|")
        transport.writelines([b"x" * 100_000, b"y"])
        transport.write(mutable)
        mutable[:] = b"<after!>"
        transport.writelines(iter([b"gen", b"erator"]))
        expected = b"abcdxy|" + b"x" * 100_000 + b"y<before>generator"
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_bytes(len(expected))
        assert served[0].received == expected
        transport.close()
        await client.wait_lost()

    arun(main)


def test_buffered_protocol_with_tiny_buffers(arun: Run, net: Net) -> None:
    """A BufferedProtocol offering 7-byte buffers gets every byte, in order, split across as many
    buffers as it takes, then end of stream."""
    async def main() -> None:
        served: list[TinyBuffers] = []
        server = await net.create_server(collect(TinyBuffers, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        data = pattern(3, 50_000)
        for offset in range(0, len(data), 10_000):
            transport.write(data[offset:offset + 10_000])
            await asyncio.sleep(0)
        transport.write_eof()
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_lost()
        assert served[0].received == data
        assert len(served[0].updates) >= -(-len(data) // 7)
        assert served[0].events == ["made", "data", "eof", "lost"]
        await client.wait_lost()

    arun(main)


def test_buffered_protocol_client_gets_echo(arun: Run, net: Net) -> None:
    """A BufferedProtocol client (7-byte buffers) gets an echo of 20 KB intact."""
    async def main() -> None:
        server = await net.create_server(Echo)
        transport, client = await net.create_connection(TinyBuffers, HOST, port_of(server))
        data = pattern(4, 20_000)
        transport.write(data)
        await client.wait_bytes(len(data))
        assert client.received == data
        transport.close()
        await client.wait_lost()

    arun(main)


# -- protocols: life cycle ------------------------------------------------------------------------

def test_connection_made_comes_first(arun: Run, net: Net) -> None:
    """connection_made() is each end's first callback (on the client, before create_connection()
    returns), and data written from it reaches the other end after its own connection_made()."""
    async def main() -> None:
        served: list[Greeter] = []
        server = await net.create_server(collect(Greeter, served))
        transport, client = await net.create_connection(Greeter, HOST, port_of(server))
        assert client.events[:1] == ["made"] and client.transport is transport
        await client.wait_bytes(len(Greeter.GREETING))
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_bytes(len(Greeter.GREETING))
        assert client.received == served[0].received == Greeter.GREETING
        assert served[0].events == ["made", "data"]
        transport.close()
        await client.wait_lost()

    arun(main)


class HalfCloser(Recorder):
    """Keeps the transport open at end of stream (eof_received() returns True), then answers
    with what it got and closes."""

    eof_result = True

    def eof_received(self) -> bool | None:
        result = super().eof_received()
        asyncio.get_running_loop().call_soon(self.answer)
        return result

    def answer(self) -> None:
        if self.transport.is_closing():
            self.errors.append("transport closing although eof_received() returned True")
        self.transport.write(b"reply to " + bytes(self.received))
        self.transport.close()


@pytest.mark.parametrize("how", ["write_eof", "shutdown"])
def test_eof_received_true_keeps_transport_writable(arun: Run, net: Net, how: str) -> None:
    """When the peer closes its sending half (write_eof(), or shutdown(SHUT_WR) on a plain socket)
    eof_received() is called; returning True keeps the transport open for writing, and the peer
    reads the answer sent after its end of stream."""
    async def main() -> None:
        served: list[HalfCloser] = []
        server = await net.create_server(collect(HalfCloser, served))
        if how == "write_eof":
            transport, client = await net.create_connection(Recorder, HOST, port_of(server))
            assert transport.can_write_eof()
            transport.write(b"question")
            transport.write_eof()
            assert not transport.is_closing()
            await client.wait_lost()
            assert client.received == b"reply to question"
            assert client.events == ["made", "data", "eof", "lost"] and client.lost == [None]
        else:
            async with raw_client(port_of(server)) as sock:
                await bounded(asyncio.get_running_loop().sock_sendall(sock, b"question"))
                sock.shutdown(socket.SHUT_WR)
                assert await recv_to_end(sock) == (b"reply to question", None)
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_lost()
        assert served[0].events == ["made", "data", "eof", "lost"] and served[0].lost == [None]

    arun(main)


@pytest.mark.parametrize("result", [None, False])
def test_eof_received_falsy_closes(arun: Run, net: Net, result: bool | None) -> None:
    """eof_received() returning None or False closes the transport: connection_lost(None)
    follows and the peer sees end of stream."""
    class Closer(Recorder):
        eof_result = result

    async def main() -> None:
        served: list[Closer] = []
        server = await net.create_server(collect(Closer, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        transport.write(b"bye")
        transport.write_eof()
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_lost()
        assert served[0].events == ["made", "data", "eof", "lost"] and served[0].lost == [None]
        assert served[0].transport.is_closing()
        assert served[0].received == b"bye"
        await client.wait_lost()
        assert client.events == ["made", "eof", "lost"] and client.lost == [None]

    arun(main)


def test_close_calls_connection_lost_once(arun: Run, net: Net) -> None:
    """close() sends what was written first; is_closing() turns True at once and connection_lost
    (None) comes later, exactly once, however often close() or abort() is called again."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        assert not transport.is_closing() and transport.is_reading()
        transport.write(b"last words")
        transport.close()
        assert transport.is_closing()
        assert not transport.is_reading()
        assert client.lost == []  # not from inside close()
        transport.close()
        transport.abort()
        await client.wait_lost()
        for _ in range(10):
            await asyncio.sleep(0)
        assert client.lost == [None]
        assert transport.is_closing()
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_lost()
        assert served[0].received == b"last words"
        assert served[0].events == ["made", "data", "eof", "lost"]

    arun(main)


def test_peer_reset_gives_connection_reset_error(arun: Run, net: Net) -> None:
    """When the peer resets the connection (close with SO_LINGER 0) connection_lost() gets a
    ConnectionResetError, without eof_received(), as on asyncio."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        async with raw_client(port_of(server)) as sock:
            await bounded(asyncio.get_running_loop().sock_sendall(sock, b"x"))
            await until(lambda: bool(served), LIMIT)
            await served[0].wait_bytes(1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await served[0].wait_lost()
        assert served[0].events == ["made", "data", "lost"]
        assert len(served[0].lost) == 1 and isinstance(served[0].lost[0], ConnectionResetError)
        assert served[0].transport.is_closing()

    arun(main)


def test_abort_drops_buffered_data(arun: Run, net: Net) -> None:
    """abort() with megabytes buffered for a peer that does not read drops them: the write buffer
    empties, connection_lost(None) follows, and the peer gets only part of the data."""
    async def main() -> None:
        with raw_listener(rcvbuf=4096) as ls:
            transport, client = await net.create_connection(Recorder, HOST, ls.getsockname()[1])
            async with accepted(ls) as peer:
                shrink_sndbuf(transport)
                total = 2 * 1024 * 1024
                transport.write(bytes(total))
                for _ in range(5):
                    await asyncio.sleep(0.001)
                assert transport.get_write_buffer_size() > total // 2
                assert client.pauses == 1
                transport.abort()
                assert transport.is_closing()
                await client.wait_lost()
                assert client.lost == [None]
                if not uvloop_own(net):  # (uvloop's own may still count what it dropped)
                    assert transport.get_write_buffer_size() == 0
                got, _ = await recv_to_end(peer)
                assert len(got) < total // 2
                assert got == bytes(len(got))

    arun(main)


def test_write_after_close_is_ignored(arun: Run, net: Net) -> None:
    """write() and writelines() after close() are silently ignored, as on asyncio: the peer gets
    only what was written before."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        transport.write(b"before")
        transport.close()
        transport.write(b"after")
        if net.name == "saferring" or sys.version_info < (3, 12):
            # (asyncio's own writelines() after close() fails on 3.12+'s sendmsg path)
            transport.writelines([b"after", b"too"])
        await client.wait_lost()
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_lost()
        assert served[0].received == b"before"

    arun(main)


def test_write_errors(arun: Run, net: Net) -> None:
    """write() of a str or an int raises TypeError and sends nothing; write() after write_eof()
    raises RuntimeError; write_eof() twice is harmless."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        for bad in ("text", 42):
            with pytest.raises(TypeError):
                transport.write(bad)
        transport.write(b"ok")
        transport.write_eof()
        transport.write_eof()
        with pytest.raises(RuntimeError):
            transport.write(b"late")
        await until(lambda: bool(served), LIMIT)
        await served[0].wait_lost()
        assert served[0].received == b"ok"
        assert served[0].events == ["made", "data", "eof", "lost"]
        await client.wait_lost()
        assert client.events == ["made", "eof", "lost"]

    arun(main)


def test_extra_info_matches_the_sockets(arun: Run, net: Net) -> None:
    """get_extra_info() gives each end's sockname and peername (mirror images of each other) and a
    socket with those addresses; an unknown name gives the default."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        port = port_of(server)
        transport, client = await net.create_connection(Recorder, HOST, port)
        await until(lambda: bool(served) and served[0].transport is not None, LIMIT)
        theirs = served[0].transport
        assert transport.get_extra_info("peername") == theirs.get_extra_info("sockname") == (HOST, port)
        assert transport.get_extra_info("sockname") == theirs.get_extra_info("peername")
        assert transport.get_extra_info("sockname")[1] != port
        for t in (transport, theirs):
            sock = t.get_extra_info("socket")
            assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            assert sock.fileno() >= 0
            assert sock.getsockname() == t.get_extra_info("sockname")
            assert sock.getpeername() == t.get_extra_info("peername")
        assert transport.get_extra_info("no such thing") is None
        assert transport.get_extra_info("no such thing", "default") == "default"
        transport.close()
        await client.wait_lost()

    arun(main)


def test_set_protocol_redirects_data(arun: Run, net: Net) -> None:
    """After set_protocol(), get_protocol() returns the new protocol, and later data, end of stream
    and connection_lost() go to it, not to the old one."""
    async def main() -> None:
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        transport.write(b"one")
        await until(lambda: bool(served), LIMIT)
        first = served[0]
        await first.wait_bytes(3)
        theirs = first.transport
        assert theirs.get_protocol() is first
        second = Recorder()
        second.events.append("made")
        second.transport = theirs
        first.detached = True
        theirs.set_protocol(second)
        assert theirs.get_protocol() is second
        transport.write(b"two")
        await second.wait_bytes(3)
        transport.close()
        await second.wait_lost()
        assert first.received == b"one" and first.events == ["made", "data"]
        assert second.received == b"two" and second.events == ["made", "data", "eof", "lost"]
        await client.wait_lost()

    arun(main)


# -- flow control ---------------------------------------------------------------------------------

def test_pause_and_resume_writing(arun: Run, net: Net) -> None:
    """Writing past the high-water mark to a peer that does not read calls pause_writing() once;
    when the peer drains it, resume_writing() follows, the buffer empties and every byte arrived
    in order."""
    async def main() -> None:
        with raw_listener(rcvbuf=4096) as ls:
            transport, client = await net.create_connection(Recorder, HOST, ls.getsockname()[1])
            async with accepted(ls) as peer:
                shrink_sndbuf(transport)
                assert transport.get_write_buffer_limits()[1] == HIGH
                chunks = []
                for i in range(512):  # 8 MiB at most
                    chunks.append(pattern(i, 16384))
                    transport.write(chunks[-1])
                    if client.pauses:
                        break
                    if i % 4 == 3:
                        await asyncio.sleep(0)
                assert client.pauses == 1 and client.resumes == 0
                assert transport.get_write_buffer_size() > HIGH
                expected = b"".join(chunks)
                assert await recv_exactly(peer, len(expected)) == expected
                await until(lambda: client.resumes == 1, LIMIT)
                assert client.pauses == 1
                await until(lambda: transport.get_write_buffer_size() == 0, LIMIT)
            # The peer closed: end of stream closes the client.
            await client.wait_lost()

    arun(main)


def test_write_buffer_limits(arun: Run, net: Net) -> None:
    """set_write_buffer_limits() derives a missing mark as asyncio does (low = high // 4,
    high = 4 * low) and raises ValueError for low > high or a negative mark."""
    async def main() -> None:
        server = await net.create_server(Echo)
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        # (uvloop's own transports start with a low mark of 16 bytes: a uvloop quirk.)
        assert transport.get_write_buffer_limits()[1] == 65536
        if not uvloop_own(net):
            assert transport.get_write_buffer_limits()[0] == 16384
        transport.set_write_buffer_limits(high=100)
        assert transport.get_write_buffer_limits() == (25, 100)
        transport.set_write_buffer_limits(low=8)
        assert transport.get_write_buffer_limits() == (8, 32)
        transport.set_write_buffer_limits(high=0)
        assert transport.get_write_buffer_limits() == (0, 0)
        for bad in ({"high": 10, "low": 20}, {"low": -1}, {"high": -1}):
            with pytest.raises(ValueError):
                transport.set_write_buffer_limits(**bad)
        assert transport.get_write_buffer_limits() == (0, 0)
        transport.set_write_buffer_limits()
        assert transport.get_write_buffer_limits() == (16384, 65536)
        transport.close()
        await client.wait_lost()

    arun(main)


def test_pause_reading_loses_and_reorders_nothing(arun: Run, net: Net) -> None:
    """pause_reading()/resume_reading() toggled many times (sometimes within one loop iteration)
    while a numbered stream flows: no data_received() while paused, is_reading() follows, and
    the bytes received are exactly the stream."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        expected = numbered(100_000)
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        async with raw_client(port_of(server)) as sock:
            sender = asyncio.ensure_future(loop.sock_sendall(sock, expected))
            await until(lambda: bool(served) and served[0].transport is not None, LIMIT)
            protocol = served[0]
            transport = protocol.transport
            toggles = 0
            while len(protocol.received) < len(expected):
                assert toggles < 5000, f"{len(protocol.received)} of {len(expected)} bytes"
                transport.pause_reading()
                protocol.reading_paused = True
                assert not transport.is_reading()
                if toggles % 3 == 1:
                    await asyncio.sleep(0)
                elif toggles % 3 == 2:
                    await asyncio.sleep(0.001)
                protocol.reading_paused = False
                transport.resume_reading()
                assert transport.is_reading()
                for _ in range(1 + toggles % 4):
                    await asyncio.sleep(0)
                toggles += 1
            await bounded(sender)
            assert protocol.received == expected
            # (asyncio's own transport may take the whole stream in one read on a fast run)
            assert toggles > 1 or net.name != "saferring"
            sock.shutdown(socket.SHUT_WR)
            await protocol.wait_lost()
            assert await recv_to_end(sock) == (b"", None)
        assert protocol.events == ["made", "data", "eof", "lost"]

    arun(main)


class PausingReader(Recorder):
    """Pauses reading in every data_received() and resumes a moment later (what a StreamReader
    with a full buffer does)."""

    def data_received(self, data: bytes) -> None:
        self._got(data)
        self.transport.pause_reading()
        self.reading_paused = True
        asyncio.get_running_loop().call_later(0.001, self.resume)

    def resume(self) -> None:
        if not self.transport.is_closing() and self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()


@_impls()
def test_pause_reading_from_data_received(arun: Run, net: Net) -> None:
    """pause_reading() called from inside data_received() stops further data_received() calls at
    once (none until resume_reading()), and the megabyte sent arrives intact."""
    async def main() -> None:
        data = pattern(11, 1024 * 1024)
        served: list[PausingReader] = []
        server = await net.create_server(collect(PausingReader, served))
        async with raw_client(port_of(server)) as sock:
            await bounded(asyncio.get_running_loop().sock_sendall(sock, data))
            await until(lambda: bool(served), LIMIT)
            await served[0].wait_bytes(len(data))
            assert served[0].received == data
            assert served[0].errors == []
        await served[0].wait_lost()

    arun(main)


# -- servers --------------------------------------------------------------------------------------

def test_server_sockets_and_is_serving(arun: Run, net: Net) -> None:
    """A server listens on one socket at the address asked and is_serving() until close(); then
    sockets is empty, is_serving() is False, and connecting is refused."""
    async def main() -> None:
        server = await net.create_server(Echo)
        assert server.is_serving()
        assert server.get_loop() is asyncio.get_running_loop()
        assert len(server.sockets) == 1
        sock = server.sockets[0]
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == HOST
        port = port_of(server)
        await echo_round(net, port)
        server.close()
        server.close()
        assert not server.is_serving()
        assert len(server.sockets) == 0
        await bounded(server.wait_closed())
        with pytest.raises(ConnectionRefusedError):
            await net.create_connection(Recorder, HOST, port)

    arun(main)


def test_server_close_keeps_accepted_connections(arun: Run, net: Net) -> None:
    """close() stops accepting, but connections already accepted keep working until they close."""
    async def main() -> None:
        served: list[Echo] = []
        server = await net.create_server(collect(Echo, served))
        port = port_of(server)
        transport, client = await net.create_connection(Recorder, HOST, port)
        transport.write(b"one")
        await client.wait_bytes(3)
        server.close()
        assert not server.is_serving()
        transport.write(b"two")
        await client.wait_bytes(6)
        assert client.received == b"onetwo"
        with pytest.raises(ConnectionRefusedError):
            await net.create_connection(Recorder, HOST, port)
        transport.close()
        await served[0].wait_lost()
        await bounded(server.wait_closed())

    arun(main)


def test_wait_closed_waits_for_accepted_connections(arun: Run) -> None:
    """saferring's Server.wait_closed() returns only once every connection the server accepted has
    closed (as documented, and as asyncio does from 3.12), and at once afterwards."""
    async def main() -> None:
        net = Net("saferring")
        served: list[Echo] = []
        server = await net.create_server(collect(Echo, served))
        transport, client = await net.create_connection(Recorder, HOST, port_of(server))
        await until(lambda: bool(served), LIMIT)
        server.close()
        waiter = asyncio.ensure_future(server.wait_closed())
        for _ in range(20):
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert not waiter.done()
        transport.write(b"still served")
        await client.wait_bytes(12)
        assert not waiter.done()
        transport.close()
        await bounded(waiter)
        assert served[0].lost == [None]
        await bounded(server.wait_closed())
        await client.wait_lost()

    arun(main)


def test_async_with_closes_server(arun: Run, net: Net) -> None:
    """`async with server` gives the server itself and closes it on exit."""
    async def main() -> None:
        server = await net.create_server(Echo)
        port = port_of(server)
        async with server as entered:
            assert entered is server
            assert server.is_serving()
            await echo_round(net, port)
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await net.create_connection(Recorder, HOST, port)

    arun(main)


def test_serve_forever_cancelled_closes_server(arun: Run, net: Net) -> None:
    """serve_forever() starts serving and serves until its task is cancelled, which closes the
    server; a second serve_forever() meanwhile raises RuntimeError."""
    async def main() -> None:
        server = await net.create_server(Echo, start_serving=False)
        port = port_of(server)
        task = asyncio.ensure_future(server.serve_forever())
        await until(server.is_serving, LIMIT)
        with pytest.raises(RuntimeError):
            await server.serve_forever()
        await echo_round(net, port)
        outcome = await bounded(cancel_and_wait(task))
        assert isinstance(outcome, asyncio.CancelledError) and task.cancelled()
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await net.create_connection(Recorder, HOST, port)

    arun(main)


def test_start_serving_false_then_start_serving(arun: Run, net: Net) -> None:
    """With start_serving=False the server is not serving until start_serving(), after which it
    accepts and serves (a second start_serving() changes nothing)."""
    async def main() -> None:
        server = await net.create_server(Echo, start_serving=False)
        assert not server.is_serving()
        assert len(server.sockets) == 1
        await server.start_serving()
        assert server.is_serving()
        await server.start_serving()
        await echo_round(net, port_of(server))

    arun(main)


def test_create_server_with_sock(arun: Run, net: Net) -> None:
    """create_server(sock=) serves on a socket bound and listening beforehand, shows its address in
    sockets, and closes it with the server."""
    async def main() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((HOST, 0))
            sock.listen(8)
            server = await net.create_server(Echo, None, None, sock=sock)
            assert server.sockets[0].getsockname() == sock.getsockname()
            await echo_round(net, sock.getsockname()[1])
            server.close()
            await bounded(server.wait_closed())
            assert sock.fileno() == -1
        finally:
            sock.close()

    arun(main)


def test_create_server_errors(arun: Run, net: Net) -> None:
    """Binding a port already in use raises OSError(EADDRINUSE), and sock= with host/port raises
    ValueError, as on asyncio, leaving no socket open."""
    async def main() -> None:
        with listener() as ls:
            port = ls.getsockname()[1]
            with pytest.raises(OSError) as info:
                await net.create_server(Echo, HOST, port)
            assert info.value.errno == errno.EADDRINUSE
            with pytest.raises(ValueError):
                await net.create_server(Echo, HOST, 0, sock=ls)
            with pytest.raises(ValueError):
                await net.create_server(Echo, None, port, sock=ls)
            assert ls.fileno() >= 0

    arun(main)


def _bindable(host: str, family: int = socket.AF_INET) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError:
        return False
    return True


def test_create_server_host_list_and_any_address(arun: Run, net: Net) -> None:
    """A host list binds one socket per address, each serving; host=None binds every passive
    address getaddrinfo gives (0.0.0.0, and :: where IPv6 is on)."""
    async def main() -> None:
        if not _bindable("127.0.0.2"):
            pytest.skip("127.0.0.2 cannot be bound here")
        server = await net.create_server(Echo, [HOST, "127.0.0.2"], 0)
        addresses = sorted(s.getsockname() for s in server.sockets)
        assert [host for host, _ in addresses] == [HOST, "127.0.0.2"]
        for host, port in addresses:
            await echo_round(net, port, host.encode(), host=host)
        server.close()
        infos = socket.getaddrinfo(None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        expected = {(info[0], info[4][0]) for info in infos}
        if not all(_bindable(host, family) for family, host in expected):
            pytest.skip(f"not every passive address can be bound here: {expected}")
        anywhere = await net.create_server(Echo, None, 0)
        assert {(s.family, s.getsockname()[0]) for s in anywhere.sockets} == expected
        ipv4 = [s for s in anywhere.sockets if s.family == socket.AF_INET]
        await echo_round(net, ipv4[0].getsockname()[1])

    arun(main)


def test_create_server_unavailable_address(arun: Run, net: Net) -> None:
    """A host list with an address this host does not have (EADDRNOTAVAIL) raises that OSError
    and leaves no socket open, as asyncio 3.11 does (later asyncio versions may skip the address
    and listen on the others, which is accepted from asyncio only)."""
    async def main() -> None:
        foreign = "192.0.2.1"  # TEST-NET-1: not an address of this host
        try:
            with socket.socket() as probe:
                probe.bind((foreign, 0))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
        else:
            pytest.skip("this host binds non-local addresses")
        try:
            server = await net.create_server(Echo, [HOST, foreign], 0)
        except OSError as exc:
            assert exc.errno == errno.EADDRNOTAVAIL
        else:
            assert net.name == "asyncio" and sys.version_info >= (3, 12)
            assert [s.getsockname()[0] for s in server.sockets] == [HOST]

    arun(main)


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
def test_close_and_abort_clients(arun: Run, how: str) -> None:
    """saferring's Server.close_clients() closes every accepted connection after sending what it
    buffered, abort_clients() drops it; either way each gets connection_lost(None) and
    wait_closed() returns (asyncio has these from 3.13)."""
    async def main() -> None:
        net = Net("saferring")
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        clients = [await net.create_connection(Recorder, HOST, port_of(server)) for _ in range(3)]
        await until(lambda: len(served) == 3 and all(p.transport for p in served), LIMIT)
        for p in served:
            p.transport.write(b"goodbye")
        server.close()
        getattr(server, how)()
        assert all(p.transport.is_closing() for p in served)
        await bounded(server.wait_closed())
        for p in served:
            await p.wait_lost()
            assert p.lost == [None]
        for _, client in clients:
            await client.wait_lost()
            if how == "close_clients":
                assert client.received == b"goodbye"
                assert client.events == ["made", "data", "eof", "lost"]
            else:
                assert b"goodbye".startswith(bytes(client.received))

    arun(main)


# -- connections ----------------------------------------------------------------------------------

def test_create_connection_refused(arun: Run, net: Net) -> None:
    """Connecting to a port nobody listens on raises ConnectionRefusedError, calls no
    connection_made() and leaves no socket open."""
    async def main() -> None:
        made: list[Recorder] = []
        with socket.socket() as bound:  # holds the port, without listening
            bound.bind((HOST, 0))
            with pytest.raises(ConnectionRefusedError):
                await net.create_connection(collect(Recorder, made), HOST, bound.getsockname()[1])
        # (uvloop creates the protocol before connecting; none may see connection_made.)
        assert all(p.events == [] for p in made)
        assert made == [] or uvloop_own(net)

    arun(main)


def test_create_connection_with_sock(arun: Run, net: Net) -> None:
    """create_connection(sock=) runs a transport over a socket connected beforehand, and closes
    that socket with the transport."""
    async def main() -> None:
        server = await net.create_server(Echo)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect((HOST, port_of(server)))
            transport, client = await net.create_connection(Recorder, None, None, sock=sock)
            assert transport.get_extra_info("peername") == (HOST, port_of(server))
            transport.write(b"over a given socket")
            await client.wait_bytes(19)
            assert client.received == b"over a given socket"
            transport.close()
            await client.wait_lost()
            assert sock.fileno() == -1
        finally:
            sock.close()

    arun(main)


def test_create_connection_value_errors(arun: Run, net: Net) -> None:
    """create_connection() with host/port and sock together, or with neither, raises ValueError."""
    async def main() -> None:
        with socket.socket() as sock:
            with pytest.raises(ValueError):
                await net.create_connection(Recorder, HOST, 1, sock=sock)
            with pytest.raises(ValueError):
                await net.create_connection(Recorder, None, None)
            assert sock.fileno() >= 0

    arun(main)


# -- streams --------------------------------------------------------------------------------------

def test_stream_read_methods(arun: Run, net: Net) -> None:
    """readline(), readexactly(), read(n), readuntil() and read() to end of stream over an echo
    server return exactly what was sent; then close() and wait_closed() complete."""
    async def main() -> None:
        server = await net.start_server(echo_handler)
        reader, writer = await net.open_connection(HOST, port_of(server))
        writer.write(b"line one\nline two\nABCDEFGHIJ|until here;rest of it")
        await bounded(writer.drain())
        assert await bounded(reader.readline()) == b"line one\n"
        assert await bounded(reader.readexactly(9)) == b"line two\n"
        head = await bounded(reader.read(4))
        assert 1 <= len(head) <= 4 and b"ABCD".startswith(head)
        assert await bounded(reader.readuntil(b";")) == b"ABCDEFGHIJ|until here;"[len(head):]
        writer.write_eof()
        assert await bounded(reader.read()) == b"rest of it"
        assert reader.at_eof()
        assert await bounded(reader.read()) == b""
        writer.close()
        assert writer.is_closing()
        await bounded(writer.wait_closed())

    arun(main)


def test_stream_read_n_chunk_handover_edges(arun: Run, net: Net) -> None:
    """read(n) of a waiting reader: a chunk longer than n is returned n bytes at a time, in
    order; a task cancelled after data reached its read but before it resumed loses nothing
    (the next read returns it, before what arrives later); feed_eof() and set_exception() wake
    a waiting read(n) as asyncio's reader does."""
    async def main() -> None:
        server = await net.start_server(echo_handler)
        reader, writer = await net.open_connection(HOST, port_of(server))
        writer.write(b"0123456789")
        got = b""
        while len(got) < 10:
            part = await bounded(reader.read(4))
            assert 1 <= len(part) <= 4, part
            got += part
        assert got == b"0123456789"

        for _ in range(3):  # a read waiting for data, handed a chunk, then cancelled
            task = asyncio.ensure_future(reader.read(100))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not task.done()
            reader.feed_data(b"abc")  # what the protocol calls when a chunk arrives
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            writer.write(b"xyz")
            got = b""
            while len(got) < 6:
                got += await bounded(reader.read(100))
            assert got == b"abcxyz"

        eof_reader = type(reader)(loop=asyncio.get_running_loop())
        task = asyncio.ensure_future(eof_reader.read(10))
        await asyncio.sleep(0)
        eof_reader.feed_eof()
        assert await bounded(task) == b""
        failing = type(reader)(loop=asyncio.get_running_loop())
        task = asyncio.ensure_future(failing.read(10))
        await asyncio.sleep(0)
        failing.set_exception(ConnectionResetError("from the test"))
        with pytest.raises(ConnectionResetError, match="from the test"):
            await bounded(task)
        writer.write_eof()  # the server's handler ends: its close is our end of stream
        assert await bounded(reader.read(100)) == b""
        writer.close()
        await bounded(writer.wait_closed())

    arun(main)


def test_stream_readexactly_at_eof(arun: Run, net: Net) -> None:
    """readexactly() past the end of stream raises IncompleteReadError with the partial bytes,
    after which at_eof() is true and read() returns b''."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _writers.append(writer)
        writer.write(b"short")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await net.start_server(handler)
        reader, writer = await net.open_connection(HOST, port_of(server))
        with pytest.raises(asyncio.IncompleteReadError) as info:
            await bounded(reader.readexactly(10))
        assert info.value.partial == b"short" and info.value.expected == 10
        assert reader.at_eof()
        assert await bounded(reader.read()) == b""
        writer.close()
        await bounded(writer.wait_closed())

    arun(main)


def test_stream_close_after_peer_closed(arun: Run, net: Net) -> None:
    """After the server writes and closes, the client reads the data, at_eof() turns true, its own
    writer is still open (eof_received() kept it), and close() plus wait_closed() complete."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _writers.append(writer)
        writer.write(b"bye")
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        server = await net.start_server(handler)
        reader, writer = await net.open_connection(HOST, port_of(server))
        assert not reader.at_eof()
        assert await bounded(reader.read()) == b"bye"
        assert reader.at_eof()
        assert not writer.is_closing()
        writer.close()
        assert writer.is_closing()
        await bounded(writer.wait_closed())

    arun(main)


def test_stream_drain_with_slow_reader(arun: Run, net: Net) -> None:
    """writer.drain() against a server that reads slowly waits while the write buffer is over
    the high-water mark, and the server gets every byte in order."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _writers.append(writer)
        digest = hashlib.sha256()
        while data := await reader.read(16384):
            digest.update(data)
            await asyncio.sleep(0.001)
        writer.write(digest.digest())
        writer.close()

    async def main() -> None:
        with raw_listener(rcvbuf=8192) as ls:
            server = await net.start_server(handler, None, None, sock=ls)
            reader, writer = await net.open_connection(HOST, ls.getsockname()[1])
            shrink_sndbuf(writer.transport, 8192)
            data = pattern(5, 1024 * 1024)
            over_high = 0
            for offset in range(0, len(data), 32768):
                writer.write(data[offset:offset + 32768])
                if writer.transport.get_write_buffer_size() > HIGH:
                    over_high += 1
                await bounded(writer.drain())
                assert writer.transport.get_write_buffer_size() <= HIGH
            writer.write_eof()
            assert await bounded(reader.read()) == hashlib.sha256(data).digest()
            assert over_high > 0
            writer.close()
            await bounded(writer.wait_closed())
            server.close()

    arun(main)


def test_many_stream_clients(arun: Run, net: Net) -> None:
    """20 stream clients at once each get their own pattern echoed back intact."""
    async def main() -> None:
        server = await net.start_server(echo_handler)
        port = port_of(server)

        async def one(i: int) -> None:
            data = pattern(100 + i, 32768)
            reader, writer = await net.open_connection(HOST, port)
            writer.write(data)
            await bounded(writer.drain())
            assert await bounded(reader.readexactly(len(data))) == data, f"client {i}"
            writer.close()
            await bounded(writer.wait_closed())

        await asyncio.gather(*(one(i) for i in range(20)))

    arun(main)


# -- saferring against asyncio ----------------------------------------------------------------

@pytest.mark.parametrize(("server_impl", "client_impl"), MIXED)
def test_mixed_protocol_echo(arun: Run, server_impl: str, client_impl: str) -> None:
    """A saferring server with an asyncio client, and the reverse, echo 256 KiB intact and both
    ends see the same life cycle."""
    async def main() -> None:
        served: list[Echo] = []
        server = await Net(server_impl).create_server(collect(Echo, served))
        transport, client = await Net(client_impl).create_connection(Recorder, HOST, port_of(server))
        data = pattern(21, 256 * 1024)
        for offset in range(0, len(data), 8192):
            transport.write(data[offset:offset + 8192])
        await client.wait_bytes(len(data))
        assert client.received == data
        transport.write_eof()
        await client.wait_lost()
        assert client.events == ["made", "data", "eof", "lost"]
        assert served[0].events == ["made", "data", "eof", "lost"]

    arun(main)


@pytest.mark.parametrize(("server_impl", "client_impl"), MIXED)
def test_mixed_stream_echo(arun: Run, server_impl: str, client_impl: str) -> None:
    """Streams across a saferring end and an asyncio end: 200 lines echoed and read back with
    readline(), then end of stream both ways."""
    async def main() -> None:
        server = await Net(server_impl).start_server(echo_handler)
        reader, writer = await Net(client_impl).open_connection(HOST, port_of(server))
        lines = [b"line %d %s\n" % (i, b"." * (i * 7 % 300)) for i in range(200)]
        for line in lines:
            writer.write(line)
        await bounded(writer.drain())
        for line in lines:
            assert await bounded(reader.readline()) == line
        writer.write_eof()
        assert await bounded(reader.read()) == b""
        writer.close()
        await bounded(writer.wait_closed())

    arun(main)


# -- cancellation and safety --------------------------------------------------------------------

def test_cancelled_stream_read_loses_nothing(arun: Run, net: Net) -> None:
    """A task blocked in reader.read() and cancelled (before or while the data arrives) loses no
    byte: what it did not return, later reads do, in order."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _writers.append(writer)
        i = 0
        while await reader.readline() == b"go\n":
            writer.write(pattern(1000 + i, 3000))
            i += 1
        writer.close()

    async def main() -> None:
        server = await net.start_server(handler)
        reader, writer = await net.open_connection(HOST, port_of(server))
        got = bytearray()
        rounds = 24
        for i in range(rounds):
            task = asyncio.ensure_future(reader.read(100_000))
            for _ in range(i % 4):
                await asyncio.sleep(0)
            if i % 2:
                writer.write(b"go\n")  # data on its way while the read is cancelled
                for _ in range(i % 3):
                    await asyncio.sleep(0)
            outcome = await cancel_and_wait(task)
            if not isinstance(outcome, asyncio.CancelledError):
                got += outcome
            if not i % 2:
                writer.write(b"go\n")
        writer.write(b"end\n")
        while data := await bounded(reader.read(100_000)):
            got += data
        assert got == b"".join(pattern(1000 + i, 3000) for i in range(rounds))
        writer.close()
        await bounded(writer.wait_closed())

    arun(main)


@pytest.mark.parametrize("how", ["close", "aclose"])
def test_closing_shared_ring_ends_connections(arun: Run, how: str) -> None:
    """Closing the shared ring (close() or aclose()) while saferring connections carry data ends
    every one of them (connection_lost() once on each end), the asyncio peer sees its connection
    end, and nothing is left in flight or open."""
    async def main() -> None:
        net = Net("saferring")
        served: list[Echo] = []
        server = await net.create_server(collect(Echo, served))
        port = port_of(server)
        clients = [await net.create_connection(Recorder, HOST, port) for _ in range(3)]
        reader, writer = await Net("asyncio").open_connection(HOST, port)
        await until(lambda: len(served) == 4, LIMIT)
        server.close()  # stop accepting; the connections stay
        running = True

        async def pump() -> None:
            while running:
                for transport, _ in clients:
                    transport.write(b"z" * 1000)
                if not writer.is_closing():
                    writer.write(b"y" * 1000)
                await asyncio.sleep(0)

        pumping = asyncio.ensure_future(pump())
        await until(lambda: all(len(c.received) > 10_000 for _, c in clients), LIMIT)
        aring = aio.get_ring()
        if how == "aclose":
            await bounded(aring.aclose())
        else:
            aring.close()
        assert aring.closed and aring.in_flight() == 0
        await until(lambda: all(p.lost for p in served) and all(c.lost for _, c in clients), LIMIT)
        for p in [*served, *(c for _, c in clients)]:
            assert len(p.lost) == 1 and p.events[-1] == "lost"
            assert p.transport.is_closing()
        while True:  # the asyncio peer: its connection ends (end of stream or reset)
            try:
                if not await bounded(reader.read(65536)):
                    break
            except ConnectionError:
                break
        running = False
        await bounded(pumping)
        await bounded(server.wait_closed())
        assert not aio.get_ring().closed  # a new shared ring for what comes next
        await echo_round(Net("asyncio"), port_of(await Net("saferring").create_server(Echo)))

    arun(main)


def test_aclose_under_open_connections_submits_nothing_new(arun: Run) -> None:
    """Closing the shared ring with aclose() under open, idle saferring connections cancels their
    receives, and the transports then submit no new request to the closing ring."""
    async def main() -> None:
        net = Net("saferring")
        served: list[Recorder] = []
        server = await net.create_server(collect(Recorder, served))
        _, client = await net.create_connection(Recorder, HOST, port_of(server))
        await until(lambda: bool(served) and served[0].transport is not None, LIMIT)
        server.close()
        aring = aio.get_ring()
        await until(lambda: aring.in_flight() == 2, LIMIT)  # the two receives (the accept ended)
        registry = aring.ring._registry
        before = set(registry)
        closing = asyncio.ensure_future(aring.aclose())
        await until(lambda: closing.done() or any(ud not in before for ud in list(registry)), LIMIT)
        new = [registry[ud] for ud in list(registry) if ud not in before]
        assert closing.done() or new == [], f"submitted while the ring closes: {new}"
        await bounded(closing)
        await client.wait_lost()
        await served[0].wait_lost()

    arun(main)


def test_closing_shared_ring_under_serving_server(arun: Run) -> None:
    """Closing the shared ring under a serving saferring server raises nothing in loop callbacks,
    and the server can then be closed."""
    async def main() -> None:
        server = await Net("saferring").create_server(Echo)
        await bounded(aio.get_ring().aclose())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.5  # well past the server's 0.1 s accept retry
        while not _reported and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert _reported == []
        server.close()
        await bounded(server.wait_closed())

    arun(main)


class PausedFromStart(Recorder):
    """Pauses reading in connection_made()."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport.pause_reading()
        self.reading_paused = True


def test_data_and_eof_arriving_while_paused_come_on_resume(arun: Run, net: Net, loop_kind: str) -> None:
    """A protocol that pauses reading in connection_made() gets nothing while paused; the data and
    the end of stream that arrived meanwhile come after resume_reading(), data first."""
    if loop_kind == "uvloop" and net.name == "asyncio":
        pytest.skip("uvloop's own transports start reading after connection_made() even when it "
                    "paused reading")
    if net.name == "asyncio" and sys.version_info < (3, 11):
        pytest.skip("asyncio's own transports before 3.11 start reading after connection_made() "
                    "even when it paused reading")

    async def main() -> None:
        served: list[PausedFromStart] = []
        server = await net.create_server(collect(PausedFromStart, served))
        async with raw_client(port_of(server)) as sock:
            await bounded(asyncio.get_running_loop().sock_sendall(sock, b"early data"))
            sock.shutdown(socket.SHUT_WR)
            await until(lambda: bool(served) and served[0].transport is not None, LIMIT)
            protocol = served[0]
            await asyncio.sleep(0.02)  # for the data and the end of stream to arrive
            assert protocol.events == ["made"] and not protocol.transport.is_reading()
            protocol.reading_paused = False
            protocol.transport.resume_reading()
            await protocol.wait_lost()
            assert protocol.received == b"early data"
            assert protocol.events == ["made", "data", "eof", "lost"]
            assert await recv_to_end(sock) == (b"", None)

    arun(main)


class SelfClosing(asyncio.Protocol):
    """Writes ``data`` on connection, closes once it got it back; held by nobody but the
    transport (results go to ``sink`` and ``done``)."""

    def __init__(self, data: bytes, sink: bytearray, done: asyncio.Future[Any],
                 refs: list[weakref.ref[Any]]) -> None:
        self.data = data
        self.sink = sink
        self.done = done
        self.transport: Any = None
        refs.append(weakref.ref(self))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        for offset in range(0, len(self.data), 10_000):
            self.transport.write(self.data[offset:offset + 10_000])

    def data_received(self, data: bytes) -> None:
        self.sink += data
        if len(self.sink) >= len(self.data):
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.done.set_result(exc)


class QuietEcho(asyncio.Protocol):
    """An echo protocol nobody but its transport references."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def test_dropped_references_mid_stream(arun: Run, net: Net) -> None:
    """Connections whose transports and protocols the program no longer references keep working
    through gc.collect() mid-stream: each echo comes back intact and the protocols are freed once
    the connections are closed."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await net.create_server(QuietEcho)
        port = port_of(server)
        refs: list[weakref.ref[Any]] = []
        runs = []
        for i in range(5):
            data, sink, done = pattern(50 + i, 200_000), bytearray(), loop.create_future()
            runs.append((data, sink, done))
            await net.create_connection(
                lambda d=data, s=sink, f=done: SelfClosing(d, s, f, refs), HOST, port)
        for _ in range(2000):
            gc.collect()
            await asyncio.sleep(0.001)
            if all(done.done() for _, _, done in runs):
                break
        for data, sink, done in runs:
            assert await bounded(done) is None
            assert sink == data
        server.close()
        await bounded(server.wait_closed())
        for _ in range(10):
            await asyncio.sleep(0)
        gc.collect()
        assert len(refs) == 5 and all(ref() is None for ref in refs)

    arun(main)
