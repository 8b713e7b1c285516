"""saferring.aio.AsyncRing on the real kernel, on stock asyncio and on uvloop: every awaited
operation, multishot iteration, and cancellation that loses no byte, connection or descriptor."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

import saferring
from _aio import (
    LOOP_KINDS,
    assert_idle,
    cancel_and_wait,
    checked_ring,
    listener,
    new_loop,
    reap_without_yielding,
    run,
    settle,
    socketpair,
    until,
)
from saferring import OpState, aio
from saferring.aio import AsyncMultishot, AsyncRing

SUBMIT = ["inline", "deferred"]
Run = Callable[..., Any]


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def arun(loop_kind: str) -> Run:
    """``arun(coro_fn, *args)``: run ``coro_fn(*args)`` on a fresh loop of the test's kind."""
    def go(coro_fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        return run(loop_kind, coro_fn, *args)
    return go


async def _recv_exactly(aring: AsyncRing, fd: int, size: int, chunk: int = 4096) -> bytes:
    """Receive until ``size`` bytes arrived (bounded: fails instead of hanging)."""
    out = bytearray()
    while len(out) < size:
        buf = bytearray(min(chunk, size - len(out)))
        n = await asyncio.wait_for(aring.recv(fd, buf), 5)
        assert n > 0, f"end of stream after {len(out)} of {size} bytes"
        out += buf[:n]
    return bytes(out)


def _free_fd_number() -> int:
    """A descriptor number that is not open (opened, then closed)."""
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)
    return fd


# -- construction and misuse -------------------------------------------------------------------

def test_construct_outside_running_loop_raises(arun: Run) -> None:
    """AsyncRing() and get_ring() with no running loop raise WrongLoopError (a RuntimeError),
    and work inside one."""
    with pytest.raises(saferring.WrongLoopError):
        AsyncRing()
    with pytest.raises(RuntimeError):
        AsyncRing()
    with pytest.raises(saferring.WrongLoopError):
        aio.get_ring()

    async def inside() -> None:
        async with checked_ring() as aring:
            assert aring.loop is asyncio.get_running_loop()
            assert not aring.closed
            assert await aring.nop() == 0

    arun(inside)


def test_bad_options_raise_value_error(arun: Run) -> None:
    """submit= other than inline/deferred and defer_taskrun=True (whose completions a loop asleep
    in epoll would never see) are refused with ValueError, leaving no ring open (the fixture
    checks)."""
    async def main() -> None:
        for kwargs in ({"submit": "later"}, {"submit": None}, {"submit": "INLINE"},
                       {"single_issuer": True, "defer_taskrun": True}):
            with pytest.raises(ValueError):
                AsyncRing(8, **kwargs)

    arun(main)


def test_completion_queue_size(arun: Run) -> None:
    """AsyncRing asks for a completion queue of 8192 entries unless told otherwise (multishot
    requests end when their CQE finds the queue full); cq_entries= and a ring whose plain queue
    is as big or bigger are left as asked; bad sizes raise Ring's errors.  (The fallback under
    RLIMIT_MEMLOCK: tests/test_faults.py.)"""
    try:
        saferring.Ring(256, cq_entries=8192).close()
    except OSError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        pytest.skip(f"RLIMIT_MEMLOCK holds no 8192-entry completion queue here: {exc}")

    async def main() -> None:
        async with checked_ring() as aring:
            assert aring.ring.features.cq_entries == 8192
        async with checked_ring(8, cq_entries=64) as aring:
            assert aring.ring.features.cq_entries == 64
        async with checked_ring(4096) as aring:
            assert aring.ring.features.cq_entries == 8192  # the plain size: twice the SQ
        async with checked_ring(8192) as aring:
            assert aring.ring.features.cq_entries == 16384
        with pytest.raises(ValueError):
            AsyncRing(0)
        with pytest.raises(TypeError):
            AsyncRing("8")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            AsyncRing(8, cq_entries=4)  # smaller than the SQ

    arun(main)


@pytest.mark.needs("setup:SQPOLL")
def test_sqpoll_ring(arun: Run, tmp_path: Any) -> None:
    """AsyncRing(sqpoll=True) works: the kernel refuses COOP_TASKRUN beside SQPOLL, so it is
    not added there (before, this raised OSError(EINVAL))."""
    path = os.path.join(str(tmp_path), "f")
    with open(path, "wb") as f:
        f.write(b"through the SQ thread")

    async def main() -> None:
        async with checked_ring(sqpoll=True) as aring:
            assert "SQPOLL" in aring.ring.features.setup_flags
            fd = os.open(path, os.O_RDONLY)
            try:
                buf = bytearray(32)
                n = await aring.read(fd, buf, 0)
                assert bytes(buf[:n]) == b"through the SQ thread"
            finally:
                os.close(fd)

    arun(main)


@pytest.mark.parametrize("coop_taskrun", [False, True])
def test_completion_from_another_thread_wakes_the_loop(arun: Run, coop_taskrun: bool) -> None:
    """With coop_taskrun off or on, a recv completed by data another thread sends while the loop
    sleeps in its selector wakes the loop and returns the data."""
    async def main() -> None:
        async with checked_ring(coop_taskrun=coop_taskrun) as aring:
            with socketpair() as (a, b):
                buf = bytearray(32)
                task = asyncio.ensure_future(aring.recv(b.fileno(), buf))
                await until(lambda: aring.in_flight() == 1)
                sender = threading.Thread(target=lambda: (time.sleep(0.02), a.send(b"from a thread")))
                sender.start()
                try:
                    n = await asyncio.wait_for(task, 5)
                finally:
                    sender.join()
                assert bytes(buf[:n]) == b"from a thread"

    arun(main)


def test_use_from_another_loop_raises(loop_kind: str) -> None:
    """Every way of using an AsyncRing from a loop other than its own raises WrongLoopError,
    and the ring still works on its own loop afterwards."""
    loop1, loop2 = new_loop(loop_kind), new_loop(loop_kind)
    a, b = socket.socketpair()
    try:
        async def make() -> AsyncRing:
            return AsyncRing(16)

        aring = loop1.run_until_complete(make())
        buf = bytearray(8)
        attempts: list[Callable[[], Any]] = [
            lambda: aring.nop(),
            lambda: aring.recv(b.fileno(), buf),
            lambda: aring.send(a.fileno(), b"x"),
            lambda: aring.read(b.fileno(), buf),
            lambda: aring.write(a.fileno(), b"x"),
            lambda: aring.accept(b.fileno()),
            lambda: aring.openat(os.devnull),
            lambda: aring.close_fd(10**6),
            lambda: aring.aclose(),
        ]
        for attempt in attempts:
            with pytest.raises(saferring.WrongLoopError):
                loop2.run_until_complete(attempt())

        async def multishot_elsewhere() -> None:
            aring.accept_multishot(b.fileno())

        with pytest.raises(saferring.WrongLoopError):
            loop2.run_until_complete(multishot_elsewhere())
        assert aring.in_flight() == 0

        async def home() -> bytes:
            await aring.send(a.fileno(), b"home")
            n = await aring.recv(b.fileno(), buf)
            assert_idle(aring)
            await aring.aclose()
            return bytes(buf[:n])

        assert loop1.run_until_complete(home()) == b"home"
        assert aring.closed
    finally:
        a.close()
        b.close()
        loop1.close()
        loop2.close()


def test_driven_ring_refuses_wait_and_run(arun: Run) -> None:
    """aring.ring.wait() and aring.ring.run(op) raise OperationStateError while the loop drives
    the ring; `await aring.run(op)` returns the result instead."""
    async def main() -> None:
        async with checked_ring() as aring:
            op = aring.ring.nop()
            with pytest.raises(saferring.OperationStateError):
                aring.ring.wait()
            with pytest.raises(saferring.OperationStateError):
                aring.ring.wait(0, timeout=0)
            with pytest.raises(saferring.OperationStateError):
                aring.ring.run(op)
            assert await aring.run(op) == 0
            assert op.state is OpState.COMPLETED

    arun(main)


def test_run_refuses_foreign_and_multishot_operations(arun: Run) -> None:
    """aring.run() refuses an operation of another ring and a multishot operation (which has
    many values: aring.multishot() iterates over it)."""
    async def main() -> None:
        other = saferring.Ring(4)
        try:
            op = other.nop()
            async with checked_ring() as aring:
                with pytest.raises(saferring.OperationStateError):
                    await aring.run(op)
                with pytest.raises(saferring.OperationStateError):
                    aring.multishot(op)  # type: ignore[arg-type]
                with listener() as lsock:
                    ms = aring.ring.accept_multishot(lsock.fileno())
                    with pytest.raises(saferring.OperationStateError):
                        await aring.run(ms)
                    it = aring.multishot(ms)
                    it.cancel()
                    with pytest.raises(saferring.OperationCancelledError):
                        async for _ in it:
                            pass
            assert other.run(op) == 0
        finally:
            other.close()

    arun(main)


# -- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("submit", SUBMIT)
def test_file_round_trip(arun: Run, tmp_path: Any, submit: str) -> None:
    """openat, write and read at offsets, statx and close_fd on a real file agree with os.*."""
    path = str(tmp_path / "f.bin")
    data = os.urandom(10_000)

    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            fd = await aring.openat(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            assert fd >= 0
            try:
                assert await aring.write(fd, data, 0) == len(data)
                assert await aring.write(fd, b"tail", len(data)) == 4
                st = await aring.statx(fd)
                assert st.st_size == len(data) + 4 == os.fstat(fd).st_size
                buf = bytearray(len(data) + 100)
                n = await aring.read(fd, buf, 0)
                assert bytes(buf[:n]) == data + b"tail"
                buf2 = bytearray(100)
                assert await aring.read(fd, buf2, 5000) == 100
                assert bytes(buf2) == data[5000:5100]
                assert await aring.read(fd, buf2, 10**6) == 0  # past the end
                st2 = await aring.statx(path)
                assert (st2.st_ino, st2.st_size) == (os.stat(path).st_ino, len(data) + 4)
            finally:
                assert await aring.close_fd(fd) == 0
            with pytest.raises(OSError) as info:
                os.fstat(fd)
            assert info.value.errno == errno.EBADF

    arun(main)
    with open(path, "rb") as f:
        assert f.read() == data + b"tail"


@pytest.mark.parametrize("submit", SUBMIT)
def test_read_write_at_file_position(arun: Run, tmp_path: Any, submit: str) -> None:
    """read/write with offset -1 use and advance the kernel's file position, like os.read/os.write."""
    path = str(tmp_path / "pos.bin")

    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                assert await aring.write(fd, b"hello ") == 6
                assert await aring.write(fd, b"world") == 5
                assert os.lseek(fd, 0, os.SEEK_CUR) == 11
                os.lseek(fd, 0, os.SEEK_SET)
                buf = bytearray(6)
                assert await aring.read(fd, buf) == 6 and buf == b"hello "
                assert await aring.read(fd, buf) == 5 and buf[:5] == b"world"
                assert await aring.read(fd, buf) == 0
            finally:
                os.close(fd)

    arun(main)


@pytest.mark.parametrize("submit", SUBMIT)
def test_send_recv_round_trip(arun: Run, submit: str) -> None:
    """send and recv on a socketpair, both directions, with a recv that has to wait for data."""
    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            with socketpair() as (a, b):
                assert await aring.send(a.fileno(), b"ping") == 4
                buf = bytearray(16)
                assert await aring.recv(b.fileno(), buf) == 4 and buf[:4] == b"ping"
                waiting = asyncio.ensure_future(aring.recv(a.fileno(), buf))
                await until(lambda: aring.in_flight() == 1)
                assert not waiting.done()
                assert await aring.send(b.fileno(), b"pong!") == 5
                assert await asyncio.wait_for(waiting, 5) == 5
                assert buf[:5] == b"pong!"
                b.shutdown(socket.SHUT_WR)
                assert await aring.recv(a.fileno(), buf) == 0  # end of stream

    arun(main)


def test_nop_timeout_and_generic_operations(arun: Run) -> None:
    """nop returns 0, timeout returns None after expiring, nop_many a list of zeros, and the
    generic wrappers carry Ring's names and docs."""
    async def main() -> None:
        async with checked_ring() as aring:
            assert await aring.nop() == 0
            assert await aring.timeout(0.005) is None
            assert await aring.nop_many(3) == [0, 0, 0]
            assert AsyncRing.fsync.__name__ == "fsync"
            assert "Ring.fsync" in (AsyncRing.fsync.__doc__ or "")

    arun(main)


@pytest.mark.parametrize("submit", SUBMIT)
def test_socket_connect_accept(arun: Run, submit: str) -> None:
    """socket + connect against a 127.0.0.1 listener while accept waits: the accepted peer's
    address is the client's, and data flows both ways."""
    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            with listener() as lsock:
                fd = await aring.socket(socket.AF_INET, socket.SOCK_STREAM)
                client = socket.socket(fileno=fd)
                try:
                    accepting = asyncio.ensure_future(aring.accept(lsock.fileno()))
                    assert await aring.connect(fd, lsock.getsockname()) == 0
                    conn_fd, address = await asyncio.wait_for(accepting, 5)
                    conn = socket.socket(fileno=conn_fd)
                    try:
                        assert address == client.getsockname()
                        assert conn.getpeername() == client.getsockname()
                        assert await aring.send(fd, b"abc") == 3
                        assert await _recv_exactly(aring, conn_fd, 3) == b"abc"
                        assert await aring.send(conn_fd, b"xyz") == 3
                        assert await _recv_exactly(aring, fd, 3) == b"xyz"
                    finally:
                        conn.close()
                finally:
                    client.close()

    arun(main)


def test_errors_raise_matching_oserror(arun: Run, tmp_path: Any) -> None:
    """A failed operation raises the OSError subclass of its errno: EBADF, FileNotFoundError
    with the path, IsADirectoryError, ENOTSOCK, ConnectionRefusedError, FileExistsError."""
    missing = str(tmp_path / "missing")

    async def main() -> None:
        async with checked_ring() as aring:
            buf = bytearray(8)
            with pytest.raises(OSError) as info:
                await aring.read(_free_fd_number(), buf, 0)
            assert info.value.errno == errno.EBADF
            with pytest.raises(FileNotFoundError) as missing_info:
                await aring.openat(missing)
            assert missing_info.value.errno == errno.ENOENT
            assert missing_info.value.filename == missing
            dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                with pytest.raises(IsADirectoryError):
                    await aring.read(dfd, buf, 0)
            finally:
                os.close(dfd)
            with pytest.raises(FileExistsError):
                await aring.openat(str(tmp_path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            ffd = os.open(str(tmp_path / "plain"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                with pytest.raises(OSError) as sock_info:
                    await aring.recv(ffd, buf)
                assert sock_info.value.errno == errno.ENOTSOCK
            finally:
                os.close(ffd)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            with socket.socket() as c, pytest.raises(ConnectionRefusedError):
                await aring.connect(c.fileno(), ("127.0.0.1", port))

    arun(main)


def test_run_awaits_operations_queued_on_the_ring(arun: Run, tmp_path: Any) -> None:
    """Operations queued on aring.ring (here a linked write-then-read chain) are awaited with
    aring.run(op) and give their results."""
    path = str(tmp_path / "chain.bin")

    async def main() -> None:
        async with checked_ring() as aring:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                buf = bytearray(5)
                with aring.ring.chain():
                    w = aring.ring.write(fd, b"chain", 0)
                    r = aring.ring.read(fd, buf, 0)
                assert await aring.run(r) == 5
                assert await aring.run(w) == 5
                assert buf == b"chain"
            finally:
                os.close(fd)

    arun(main)


@pytest.mark.parametrize("submit", SUBMIT)
def test_many_concurrent_recvs(arun: Run, submit: str) -> None:
    """32 tasks each wait in recv on its own socketpair; gather returns every one's own data."""
    count = 32

    async def main() -> None:
        pairs = [socket.socketpair() for _ in range(count)]
        try:
            async with checked_ring(128, submit=submit) as aring:
                bufs = [bytearray(64) for _ in range(count)]
                tasks = [asyncio.ensure_future(aring.recv(b.fileno(), buf))
                         for (_, b), buf in zip(pairs, bufs, strict=True)]
                await until(lambda: aring.in_flight() == count)
                for i, (a, _) in enumerate(pairs):
                    a.send(b"message %d" % i)
                results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
                for i, (n, buf) in enumerate(zip(results, bufs, strict=True)):
                    assert bytes(buf[:n]) == b"message %d" % i
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    arun(main)


def _first_step(coro: Coroutine[Any, Any, Any]) -> tuple[bool, Any]:
    """Run ``coro`` up to its first suspension: ``(False, result)`` if it finished without
    suspending, ``(True, future)`` with the future it waits on otherwise."""
    try:
        fut = coro.send(None)
    except StopIteration as stop:
        return False, stop.value
    return True, fut


async def _finish(coro: Coroutine[Any, Any, Any], fut: Any) -> Any:
    """Resume a coroutine that ``_first_step`` left waiting on ``fut`` until it returns."""
    while True:
        fut._asyncio_future_blocking = False  # what a Task does with the future it is handed
        await fut
        try:
            fut = coro.send(None)
        except StopIteration as stop:
            return stop.value


def test_inline_submission_batches_after_a_request_that_waits(arun: Run) -> None:
    """submit="inline": a request that completes at submission never suspends its task; after
    one that waits (a receive on an empty socket), the requests queued later in the same loop
    iteration are not entered one by one but wait for its end and reach the kernel in one
    submission; the next iteration is inline again."""
    async def main() -> None:
        a, b = socket.socketpair()
        try:
            async with checked_ring(submit="inline") as aring:
                stats = aring.ring.stats
                await asyncio.sleep(0)
                suspended, result = _first_step(aring.nop())
                assert (suspended, result) == (False, 0)  # completed inside the await
                buf = bytearray(16)
                recv = aring.recv(b.fileno(), buf)
                suspended, recv_fut = _first_step(recv)
                assert suspended  # nothing to receive: it waits for the peer
                submitted = stats().submitted
                nops = [aring.nop() for _ in range(3)]
                steps = [_first_step(c) for c in nops]
                assert all(s for s, _ in steps)  # queued for the end of the iteration...
                assert stats().submitted == submitted  # ...not entered one at a time
                assert stats().in_flight == 4
                results = [await _finish(c, f) for c, (_, f) in zip(nops, steps, strict=True)]
                assert results == [0, 0, 0]
                assert stats().submitted == submitted + 3
                await asyncio.sleep(0)
                assert _first_step(aring.nop()) == (False, 0)  # inline again
                a.send(b"after")
                assert await asyncio.wait_for(_finish(recv, recv_fut), 5) == 5
                assert bytes(buf[:5]) == b"after"
        finally:
            a.close()
            b.close()

    arun(main)


# -- multishot ---------------------------------------------------------------------------------

def test_accept_multishot_async_for(arun: Run) -> None:
    """`async for` over accept_multishot yields one descriptor per client, whose peers are the
    clients; after cancel() the iteration ends with OperationCancelledError."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                ms = aring.accept_multishot(lsock.fileno())
                assert isinstance(ms, AsyncMultishot)
                clients = [socket.create_connection(lsock.getsockname()) for _ in range(3)]
                conns: list[socket.socket] = []
                try:
                    async def take_three() -> None:
                        async for fd in ms:
                            conns.append(socket.socket(fileno=fd))
                            if len(conns) == 3:
                                break

                    await asyncio.wait_for(take_three(), 5)
                    assert {c.getpeername() for c in conns} == {c.getsockname() for c in clients}
                    assert ms.operation.state is OpState.SUBMITTED  # still accepting
                    ms.cancel()
                    with pytest.raises(saferring.OperationCancelledError):
                        async for fd in ms:
                            os.close(fd)
                    assert ms.operation.state is OpState.CANCELLED
                finally:
                    for s in clients + conns:
                        s.close()

    arun(main)


def test_multishot_values_survive_break_and_arrive_later(arun: Run) -> None:
    """Breaking out of `async for` loses nothing: a connection that arrives later comes from
    the next iteration, and one that arrives while nobody iterates from take()."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                addr = lsock.getsockname()
                socks: list[socket.socket] = []
                try:
                    ms = await aring.accept(lsock.fileno(), multishot=True)
                    assert isinstance(ms, AsyncMultishot)
                    async with ms:
                        socks.append(socket.create_connection(addr))
                        async for fd in ms:
                            socks.append(socket.socket(fileno=fd))
                            break
                        assert socks[1].getpeername() == socks[0].getsockname()
                        socks.append(socket.create_connection(addr))
                        fd = await asyncio.wait_for(ms.__anext__(), 5)
                        socks.append(socket.socket(fileno=fd))
                        assert socks[3].getpeername() == socks[2].getsockname()
                        socks.append(socket.create_connection(addr))
                        taken: list[int] = []

                        def arrived() -> bool:
                            taken.extend(ms.take())
                            return bool(taken)

                        await until(arrived)
                        assert len(taken) == 1
                        socks.append(socket.socket(fileno=taken[0]))
                        assert socks[5].getpeername() == socks[4].getsockname()
                    assert ms.operation.state is OpState.CANCELLED
                    assert ms.take() == []
                finally:
                    for s in socks:
                        s.close()

    arun(main)


def test_async_with_multishot_keeps_untaken_values(arun: Run) -> None:
    """Leaving `async with` cancels the multishot and waits for its end; a connection that
    arrived but was never iterated over is still there for take()."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                client = socket.create_connection(lsock.getsockname())
                try:
                    async with aring.accept_multishot(lsock.fileno()) as ms:
                        await until(lambda: bool(getattr(ms.operation, "_items", None)))
                    assert ms.operation.done()
                    assert aring.in_flight() == 0
                    fds = ms.take()
                    assert len(fds) == 1
                    with socket.socket(fileno=fds[0]) as conn:
                        assert conn.getpeername() == client.getsockname()
                    await ms.aclose()  # idempotent once ended
                finally:
                    client.close()

    arun(main)


def test_cancel_from_outside_ends_waiting_iteration(arun: Run) -> None:
    """A task blocked in `async for` over a multishot ends with OperationCancelledError when
    another task calls cancel()."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                ms = aring.accept_multishot(lsock.fileno())

                async def iterate() -> list[int]:
                    got = []
                    async for fd in ms:
                        got.append(fd)
                    return got

                task = asyncio.ensure_future(iterate())
                await until(lambda: aring.in_flight() == 1)
                await asyncio.sleep(0.01)
                assert not task.done()
                ms.cancel()
                with pytest.raises(saferring.OperationCancelledError):
                    await asyncio.wait_for(task, 5)

    arun(main)


def test_task_cancelled_in_multishot_iteration_loses_nothing(arun: Run) -> None:
    """Cancelling the task that waits in `async for` leaves the multishot running; a client that
    connects afterwards is returned by the next iteration."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                async with aring.accept_multishot(lsock.fileno()) as ms:
                    task = asyncio.ensure_future(ms.__anext__())
                    await until(lambda: aring.in_flight() == 1)
                    await asyncio.sleep(0.01)
                    assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                    assert ms.operation.state is OpState.SUBMITTED
                    with socket.create_connection(lsock.getsockname()) as client:
                        fd = await asyncio.wait_for(ms.__anext__(), 5)
                        with socket.socket(fileno=fd) as conn:
                            assert conn.getpeername() == client.getsockname()

    arun(main)


def test_recv_multishot_with_buffer_ring(arun: Run) -> None:
    """recv_multishot into a BufferRing: every chunk is a Buffer, the concatenation is what was
    sent in order, and the iteration ends at end of stream."""
    data = os.urandom(20_000)

    async def main() -> None:
        async with checked_ring() as aring:
            br = saferring.BufferRing(aring.ring, 16, 4096)
            with socketpair() as (a, b):
                got = bytearray()

                async def consume() -> None:
                    async for buf in aring.recv_multishot(b.fileno(), br):
                        assert type(buf) is saferring.Buffer
                        with buf:
                            got.extend(buf.tobytes())

                task = asyncio.ensure_future(consume())
                for i in range(0, len(data), 2500):
                    a.send(data[i:i + 2500])
                    await asyncio.sleep(0)
                a.shutdown(socket.SHUT_WR)
                await asyncio.wait_for(task, 5)
                assert bytes(got) == data
            br.close()

    arun(main)


def test_recv_multishot_starved_buffer_ring_rearms(arun: Run) -> None:
    """A recv_multishot through a BufferRing of 2 buffers, with more data waiting than they hold:
    releasing the buffers re-arms the receive and every byte arrives."""
    data = os.urandom(1000)

    async def main() -> None:
        async with checked_ring() as aring:
            br = saferring.BufferRing(aring.ring, 2, 64)
            with socketpair() as (a, b):
                a.sendall(data)
                got = bytearray()
                async with aring.recv_multishot(b.fileno(), br) as ms:
                    async def consume() -> None:
                        async for buf in ms:
                            with buf:
                                got.extend(buf.tobytes())
                            if len(got) == len(data):
                                return

                    try:
                        await asyncio.wait_for(consume(), 0.3)
                    finally:
                        for buf in ms.take():
                            buf.release()
                assert bytes(got) == data
            br.close()

    arun(main)


def test_recv_starved_of_buffers_completes_after_release(arun: Run) -> None:
    """A single recv into a BufferRing whose only buffer is held waits; once the buffer is
    released, the recv picks it and returns the data that arrived meanwhile."""
    async def main() -> None:
        async with checked_ring() as aring:
            br = saferring.BufferRing(aring.ring, 1, 64)
            with socketpair() as (a, b):
                a.send(b"one")
                first = await aring.recv(b.fileno(), br)
                task = asyncio.ensure_future(aring.recv(b.fileno(), br))
                await until(lambda: aring.in_flight() == 1)
                a.send(b"two")
                with first:
                    assert first.tobytes() == b"one"
                try:
                    await asyncio.wait_for(asyncio.shield(task), 0.3)
                finally:
                    if not task.done():
                        await aring.nop()  # (any submission hands the re-arm to the kernel)
                        await asyncio.wait_for(task, 5)
                    with task.result() as second:
                        assert second.tobytes() == b"two"
            br.close()

    arun(main)


# -- cancellation: receives --------------------------------------------------------------------

@pytest.mark.parametrize("submit", SUBMIT)
def test_cancel_blocked_recv_then_data_arrives_intact(arun: Run, submit: str) -> None:
    """Cancelling a task blocked in recv raises CancelledError, the request ends cancelled in the
    kernel, and data sent afterwards arrives whole at the next recv."""
    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            with socketpair() as (a, b):
                buf = bytearray(64)
                task = asyncio.ensure_future(aring.recv(b.fileno(), buf))
                await until(lambda: aring.in_flight() == 1)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                await settle(aring)
                assert_idle(aring)
                assert buf == bytearray(64)  # the cancelled request wrote nothing
                a.send(b"after the cancel")
                assert await _recv_exactly(aring, b.fileno(), 16) == b"after the cancel"

    arun(main)


@pytest.mark.parametrize("next_size", [64, 3])
def test_cancel_after_completion_keeps_the_data(arun: Run, next_size: int) -> None:
    """A recv that completed but whose task is cancelled before it resumes hands its bytes to
    the next recv (in pieces if that buffer is smaller), ahead of later data, in order."""
    async def main() -> None:
        async with checked_ring() as aring:
            with socketpair() as (a, b):
                buf = bytearray(64)
                task = asyncio.ensure_future(aring.recv(b.fileno(), buf))
                await until(lambda: aring.in_flight() == 1)
                a.send(b"first")
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert not task.done()  # woken, not resumed yet
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                a.send(b"second")
                assert await _recv_exactly(aring, b.fileno(), 11, next_size) == b"firstsecond"

    arun(main)


def test_cancel_after_completion_with_buffer_ring(arun: Run) -> None:
    """A buffer-ring recv whose task is cancelled after it picked a Buffer hands that Buffer to
    the next buffer-ring recv; kept bytes from a plain-buffer recv are refused to a BufferRing
    recv (OperationStateError) and go to the next plain recv."""
    async def main() -> None:
        async with checked_ring() as aring:
            br = saferring.BufferRing(aring.ring, 4, 64)
            with socketpair() as (a, b):
                task = asyncio.ensure_future(aring.recv(b.fileno(), br))
                await until(lambda: aring.in_flight() == 1)
                a.send(b"picked")
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                got = await aring.recv(b.fileno(), br)
                assert type(got) is saferring.Buffer
                with got:
                    assert got.tobytes() == b"picked"

                plain = bytearray(64)
                task = asyncio.ensure_future(aring.recv(b.fileno(), plain))
                await until(lambda: aring.in_flight() == 1)
                a.send(b"plain")
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                with pytest.raises(saferring.OperationStateError):
                    await aring.recv(b.fileno(), br)
                assert await _recv_exactly(aring, b.fileno(), 5) == b"plain"
            br.close()

    arun(main)


def test_cancel_read_of_stream_keeps_the_data(arun: Run) -> None:
    """read at the file position on a pipe is a receive too: a read cancelled after it took
    bytes hands them to the next read of that descriptor."""
    async def main() -> None:
        async with checked_ring() as aring:
            r, w = os.pipe()
            try:
                buf = bytearray(32)
                task = asyncio.ensure_future(aring.read(r, buf))
                await until(lambda: aring.in_flight() == 1)
                os.write(w, b"pipe data")
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                out = bytearray(32)
                n = await aring.read(r, out)
                assert bytes(out[:n]) == b"pipe data"
            finally:
                os.close(r)
                os.close(w)

    arun(main)


@pytest.mark.parametrize("submit", SUBMIT)
def test_wait_for_timeout_on_recv_loses_nothing(arun: Run, submit: str) -> None:
    """asyncio.wait_for timing out a recv leaves nothing in flight once the request ended; bytes
    sent before, around or after each timeout all arrive at the next recvs, in order."""
    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            with socketpair() as (a, b):
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(aring.recv(b.fileno(), bytearray(16)), 0.01)
                await settle(aring)
                assert_idle(aring)
                loop = asyncio.get_running_loop()
                sent = bytearray()
                got = bytearray()

                def send(msg: bytes) -> None:
                    a.send(msg)
                    sent.extend(msg)

                for i in range(12):
                    # The data arrives before, around or after the timeout.
                    loop.call_later(0.001 * (i % 4), send, b"<%d>" % i)
                    buf = bytearray(3)
                    try:
                        n = await asyncio.wait_for(aring.recv(b.fileno(), buf), 0.002)
                    except asyncio.TimeoutError:
                        # Until the timed-out request has ended, a new recv could overtake it
                        # (test_recv_overtaking_a_cancelled_recv_keeps_order).
                        await settle(aring)
                        continue
                    got += buf[:n]
                await until(lambda: len(sent) == len(b"".join(b"<%d>" % i for i in range(12))))
                got += await _recv_exactly(aring, b.fileno(), len(sent) - len(got))
                assert bytes(got) == bytes(sent)

    arun(main)


def test_recv_overtaking_a_cancelled_recv_keeps_order(arun: Run) -> None:
    """A recv cancelled just after the kernel gave it data, followed at once by a new recv of
    the same socket (no loop poll in between): the bytes still come out in order."""
    async def main() -> None:
        async with checked_ring() as aring:
            with socketpair() as (a, b):
                first = asyncio.ensure_future(aring.recv(b.fileno(), bytearray(3)))
                await until(lambda: aring.in_flight() == 1)
                # The data arrives in the callback that runs just before the cancellation is
                # delivered: the request completes, and its CQE is not reaped yet.
                asyncio.get_running_loop().call_soon(a.send, b"<1><2>")
                first.cancel()
                buf = bytearray(3)
                second = asyncio.ensure_future(aring.recv(b.fileno(), buf))
                n = await asyncio.wait_for(second, 5)
                assert first.cancelled()
                got = bytes(buf[:n]) + await _recv_exactly(aring, b.fileno(), 6 - n)
                assert got == b"<1><2>"

    arun(main)


@pytest.mark.parametrize("submit", SUBMIT)
def test_cancel_at_many_points_loses_no_byte(arun: Run, submit: str) -> None:
    """50 rounds of: maybe send a numbered message, start a recv into a small buffer, let the
    loop run 0-3 iterations, cancel; the bytes received (including what the next recvs
    deliver) are exactly the bytes sent, in order."""
    rounds = 50

    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            with socketpair() as (a, b):
                sent = bytearray()
                got = bytearray()
                for i in range(rounds):
                    if i % 3 != 2:
                        msg = b"[%03d]" % i
                        a.send(msg)
                        sent += msg
                    buf = bytearray(4)
                    task = asyncio.ensure_future(aring.recv(b.fileno(), buf))
                    for _ in range(i % 4):
                        await asyncio.sleep(0)
                    if i % 5 == 4:
                        await aring.nop()  # reap (inline) or queue (deferred) another request
                    outcome = await cancel_and_wait(task)
                    if isinstance(outcome, int):
                        got += buf[:outcome]
                    else:
                        assert isinstance(outcome, asyncio.CancelledError)
                got += await _recv_exactly(aring, b.fileno(), len(sent) - len(got), 7)
                assert bytes(got) == bytes(sent)

    arun(main)


def test_dropped_buffers_of_cancelled_recv_stay_valid(arun: Run) -> None:
    """A cancelled recv's buffer stays pinned while the request is in flight even when the task
    and every reference to it are gone and gc runs; later data arrives intact."""
    async def main() -> None:
        async with checked_ring() as aring:
            with socketpair() as (a, b):
                async def receive() -> int:
                    return await aring.recv(b.fileno(), bytearray(4096))

                tasks = [asyncio.ensure_future(receive()) for _ in range(4)]
                await until(lambda: aring.in_flight() == 4)
                for task in tasks:
                    task.cancel()
                await asyncio.sleep(0)
                assert all(task.cancelled() for task in tasks)
                # Until each request's final CQE is reaped its 4 KiB stay pinned.
                stats = aring.stats()
                assert stats.pinned_bytes == 4096 * stats.in_flight
                del tasks, task
                gc.collect()
                junk = [bytearray(4096) for _ in range(64)]  # reuse freed memory, if any was
                await settle(aring)
                assert_idle(aring)
                del junk
                payload = os.urandom(3000)
                a.send(payload)
                assert await _recv_exactly(aring, b.fileno(), len(payload)) == payload

    arun(main)


def test_dropped_buffer_of_completed_cancelled_recv(arun: Run) -> None:
    """A recv that got data, whose task is cancelled and dropped before it resumes, hands the
    data on even after gc: the bytes come from the dropped buffer, intact."""
    async def main() -> None:
        async with checked_ring() as aring:
            with socketpair() as (a, b):
                async def receive() -> int:
                    return await aring.recv(b.fileno(), bytearray(4096))

                task = asyncio.ensure_future(receive())
                await until(lambda: aring.in_flight() == 1)
                payload = os.urandom(2000)
                a.send(payload)
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                task.cancel()
                await asyncio.sleep(0)
                assert task.cancelled()
                del task
                gc.collect()
                assert await _recv_exactly(aring, b.fileno(), len(payload)) == payload

    arun(main)


def test_kept_data_not_delivered_to_reused_fd_number(arun: Run) -> None:
    """Data a cancelled recv kept for a descriptor is dropped, not delivered, once that number
    is closed (os.close) and reused by another socket."""
    async def main() -> None:
        async with checked_ring() as aring:
            with socketpair() as (a, b):
                number = os.dup(b.fileno())
                buf = bytearray(64)
                task = asyncio.ensure_future(aring.recv(number, buf))
                await until(lambda: aring.in_flight() == 1)
                a.send(b"old bytes")
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                os.close(number)
            with socketpair() as (c, d):
                # Another socket at the same number (the lowest free one, usually; else dup2).
                extra = -1
                if d.fileno() != number:
                    if c.fileno() == number:
                        c, d = d, c
                    else:
                        extra = os.dup2(d.fileno(), number)
                try:
                    c.send(b"new")
                    out = bytearray(64)
                    n = await aring.recv(number, out)
                    assert bytes(out[:n]) == b"new"
                finally:
                    if extra >= 0:
                        os.close(extra)

    arun(main)


def test_close_fd_drops_kept_data(arun: Run) -> None:
    """close_fd through the ring drops the data a cancelled recv kept for that descriptor: a new
    socket at the same number never sees it."""
    async def main() -> None:
        async with checked_ring() as aring:
            with socketpair() as (a, b):
                fd = os.dup(b.fileno())
                task = asyncio.ensure_future(aring.recv(fd, bytearray(64)))
                await until(lambda: aring.in_flight() == 1)
                a.send(b"stale")
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                assert await aring.close_fd(fd) == 0
                # The same socket (same inode) at the same number: the kept data is gone.
                assert os.dup2(b.fileno(), fd) == fd
                try:
                    a.send(b"fresh")
                    out = bytearray(64)
                    n = await aring.recv(fd, out)
                    assert bytes(out[:n]) == b"fresh"
                finally:
                    os.close(fd)

    arun(main)


# -- cancellation: accept, open ----------------------------------------------------------------

def test_cancel_blocked_accept_then_connection_arrives(arun: Run) -> None:
    """An accept cancelled while it waits ends in the kernel; a client that connects afterwards
    is returned by the next accept."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                task = asyncio.ensure_future(aring.accept(lsock.fileno()))
                await until(lambda: aring.in_flight() == 1)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                await settle(aring)
                assert_idle(aring)
                with socket.create_connection(lsock.getsockname()) as client:
                    fd, address = await asyncio.wait_for(aring.accept(lsock.fileno()), 5)
                    with socket.socket(fileno=fd) as conn:
                        assert address == client.getsockname() == conn.getpeername()

    arun(main)


def test_cancel_after_accept_completed_hands_on_connection(arun: Run) -> None:
    """An accept that got a connection but whose task was cancelled before resuming: the next
    accept on that listener returns that same connection."""
    async def main() -> None:
        async with checked_ring() as aring:
            with listener() as lsock:
                task = asyncio.ensure_future(aring.accept(lsock.fileno()))
                await until(lambda: aring.in_flight() == 1)
                with socket.create_connection(lsock.getsockname()) as client:
                    await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                    assert not task.done()
                    assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                    fd, address = await aring.accept(lsock.fileno())
                    with socket.socket(fileno=fd) as conn:
                        assert address == client.getsockname() == conn.getpeername()
                        client.sendall(b"hi")
                        assert conn.recv(2) == b"hi"

    arun(main)


@pytest.mark.parametrize("how", ["close_fd", "aclose", "close"])
def test_kept_connection_closed_with_listener_or_ring(loop_kind: str, how: str) -> None:
    """A connection a cancelled accept kept is closed (the client sees end of stream, no fd
    leaks) by close_fd(listener), aclose() or close() of the ring."""
    async def main() -> None:
        aring = AsyncRing(16)
        try:
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen()
            address = lsock.getsockname()
            lfd = lsock.detach()
            try:
                task = asyncio.ensure_future(aring.accept(lfd))
                await until(lambda: aring.in_flight() == 1)
                with socket.create_connection(address) as client:
                    await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                    assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                    if how == "close_fd":
                        assert await aring.close_fd(lfd) == 0
                        lfd = -1
                        assert_idle(aring)
                    elif how == "aclose":
                        await aring.aclose()
                    else:
                        aring.close()
                    client.settimeout(5)
                    assert client.recv(16) == b""  # the kept connection was closed
            finally:
                if lfd >= 0:
                    os.close(lfd)
        finally:
            await aring.aclose()
        assert aring.closed

    run(loop_kind, main)


@pytest.mark.parametrize("submit", SUBMIT)
def test_cancel_openat_at_many_points_leaks_no_fd(arun: Run, tmp_path: Any, submit: str) -> None:
    """openat with O_CREAT (done by a kernel worker) cancelled after 0-3 loop iterations: every
    descriptor is either returned (and closed here) or closed by the ring; none leaks."""
    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            for i in range(40):
                path = str(tmp_path / f"f{i % 4}")
                task = asyncio.ensure_future(aring.openat(path, os.O_CREAT | os.O_WRONLY, 0o600))
                for _ in range(i % 4):
                    await asyncio.sleep(0)
                if i % 8 == 7:
                    await asyncio.sleep(0.002)
                outcome = await cancel_and_wait(task)
                if isinstance(outcome, int):
                    os.close(outcome)
                else:
                    assert isinstance(outcome, asyncio.CancelledError)
            await settle(aring)
        # (the no_leaks fixture checks that no descriptor is left open)

    arun(main)


def test_cancel_openat_after_completion_closes_fd(arun: Run, tmp_path: Any) -> None:
    """An openat that completed but whose task was cancelled before resuming: the descriptor it
    opened is closed, not leaked."""
    async def main() -> None:
        async with checked_ring() as aring:
            before = set(os.listdir("/proc/self/fd"))
            # Creating a file usually goes to a kernel worker, but the kernel may finish it at
            # submission: then there is nothing to salvage, and the test tries another name.
            for attempt in range(20):
                path = tmp_path / f"new{attempt}"
                task = asyncio.ensure_future(aring.openat(str(path), os.O_CREAT | os.O_WRONLY,
                                                          0o600))
                await asyncio.sleep(0)  # the task submitted it
                await reap_without_yielding(aring, lambda: aring.in_flight() == 0)
                if not task.done():
                    break
                os.close(task.result())  # completed at submission
            else:
                pytest.skip("every openat(O_CREAT) completed at submission on this machine")
            assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
            assert set(os.listdir("/proc/self/fd")) == before
            assert os.path.exists(path)

    arun(main)


# -- closing with requests in flight -----------------------------------------------------------

@pytest.mark.parametrize("how", ["aclose", "close", "async with"])
def test_closing_ring_ends_waiting_tasks(loop_kind: str, how: str) -> None:
    """Closing the AsyncRing (aclose, close or leaving async with) while tasks wait in recv
    ends those tasks with OperationCancelledError, leaves nothing in flight, and later calls
    raise RingClosedError."""
    async def main() -> None:
        with socketpair() as (a, b):
            aring = AsyncRing(16)
            try:
                bufs = [bytearray(16) for _ in range(3)]
                tasks = [asyncio.ensure_future(aring.recv(b.fileno(), buf)) for buf in bufs]
                await until(lambda: aring.in_flight() == 3)
                if how == "aclose":
                    await aring.aclose()
                elif how == "close":
                    aring.close()
                else:
                    async with aring:
                        pass
                assert aring.closed
                assert aring.in_flight() == 0
                results = await asyncio.wait_for(
                    asyncio.gather(*tasks, return_exceptions=True), 5)
                for outcome in results:
                    assert isinstance(outcome, saferring.OperationCancelledError), outcome
                    assert outcome.errno == errno.ECANCELED
                with pytest.raises(saferring.RingClosedError):
                    await aring.nop()
                await aring.aclose()  # idempotent
                aring.close()
                a.send(b"still here")
                assert b.recv(64) == b"still here"  # no cancelled request took it
            finally:
                aring.close()
        assert "closed" in repr(aring)

    run(loop_kind, main)


# -- get_ring ----------------------------------------------------------------------------------

def test_get_ring_is_per_loop_and_closed_with_it(loop_kind: str) -> None:
    """get_ring() returns one ring per running loop, another for another loop, and the ring is
    closed when asyncio.run / uvloop.run / asyncio.Runner (3.11+) finishes."""
    async def twice() -> AsyncRing:
        first = aio.get_ring()
        assert aio.get_ring() is first
        assert first.loop is asyncio.get_running_loop()
        assert await first.nop() == 0

        async def in_task() -> AsyncRing:
            return aio.get_ring()

        assert await asyncio.ensure_future(in_task()) is first
        assert_idle(first)
        return first

    one = run(loop_kind, twice)
    assert one.closed
    two = run(loop_kind, twice)
    assert two.closed and two is not one
    if sys.version_info >= (3, 11):
        factory = uvloop.new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            three = runner.run(twice())
            assert not three.closed  # the loop is still open (between runner.run calls)
            assert runner.run(twice()) is three
        assert three.closed and three is not two


def test_get_ring_differs_between_coexisting_loops(loop_kind: str) -> None:
    """Two loops alive at once (driven in turn) get different rings; shutdown_asyncgens closes
    each loop's own."""
    loop1, loop2 = new_loop(loop_kind), new_loop(loop_kind)

    async def get() -> AsyncRing:
        return aio.get_ring()

    try:
        r1 = loop1.run_until_complete(get())
        r2 = loop2.run_until_complete(get())
        assert r1 is not r2
        assert loop1.run_until_complete(get()) is r1
        loop2.run_until_complete(loop2.shutdown_asyncgens())
        assert r2.closed and not r1.closed
        loop1.run_until_complete(loop1.shutdown_asyncgens())
        assert r1.closed
    finally:
        loop1.close()
        loop2.close()


def test_get_ring_closed_with_tasks_still_waiting(loop_kind: str) -> None:
    """A background task still waiting in recv on get_ring() when the main coroutine returns
    is cancelled by asyncio.run, and the shared ring is then closed with nothing in flight."""
    rings: list[AsyncRing] = []
    background: list[asyncio.Future[Any]] = []

    async def main(fd: int) -> None:
        aring = aio.get_ring()
        rings.append(aring)
        background.append(asyncio.ensure_future(aring.recv(fd, bytearray(64))))
        await until(lambda: aring.in_flight() == 1)

    with socketpair() as (a, b):
        run(loop_kind, main, b.fileno())
        assert rings[0].closed
        assert background[0].cancelled()
        a.send(b"kept for nobody")
        assert b.recv(64) == b"kept for nobody"
