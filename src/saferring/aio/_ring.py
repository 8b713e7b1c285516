"""AsyncRing: a :class:`~saferring.Ring` driven by an asyncio event loop.

How a completion reaches the awaiting task
------------------------------------------
The ring's file descriptor is pollable: the kernel reports it readable while the completion
queue holds CQEs.  The loop watches it with ``add_reader``, and the callback collects every
completion with one C call (``Ring._collect``: submit what is queued, copy the CQEs out,
record each operation's end) and resolves the future of each operation a task awaits.

An awaited operation is submitted at once, in the same step that queued it (``submit="inline"``,
the default): io_uring performs what it can without blocking inside that ``io_uring_enter``
(a read of cached pages, a send into a socket buffer with room), so the CQE is often there when
the call returns and the task goes on without suspending at all.  ``submit="deferred"`` queues
the SQE and submits once per loop iteration instead (one ``io_uring_enter`` for every operation
the iteration's tasks queued), which saves system calls when many tasks queue at once but costs
every operation a trip through the loop.  ``benchmarks/test_bench_aio.py`` measures both.

Cancellation never frees what the kernel may still use
-------------------------------------------------------
Cancelling a task that awaits an operation asks the kernel to cancel it (``ASYNC_CANCEL``) and
raises :class:`asyncio.CancelledError` in the task at once.  The operation stays in the ring's
registry, with everything it pins, until its own final CQE, exactly as in the synchronous API:
a cancel is a request, and the kernel may finish the operation first (liburing#733).

Nothing is lost either
----------------------
When the kernel finishes an operation whose task was cancelled, what it did is handed on
instead of dropped (``_salvage_*``):

* a receive (``recv``, or ``read`` at the file position, which consumes a stream) that got data:
  the bytes (or the :class:`~saferring.Buffer` a buffer-ring receive picked) go to the next
  ``recv``/``read`` of the same descriptor on this ring;
* an ``accept`` that got a connection: the next ``accept`` on that listener returns it;
  ``close_fd(listener)`` or closing the ring closes connections nobody took;
* an ``openat``/``socket`` that created a descriptor: it is closed;
* a ``read`` at an explicit offset consumed nothing, and a write or send that went through stays
  done (the task was cancelled, not the effect: as with asyncio's own ``sock_sendall``).

Kept data is tied to the file it came from (``st_dev``, ``st_ino``): if the descriptor number
is closed and reused for another file, the data is dropped instead of delivered there.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import threading
import weakref
from asyncio import CancelledError
from asyncio.events import _get_running_loop
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .._binding import lib
from .._state import COMPLETED, QUEUED, SUBMITTED
from ..buffers import Buffer
from ..errors import (
    OperationStateError,
    SaferRingError,
    UnsupportedOperationError,
    WrongLoopError,
)
from ..operation import AcceptOperation, FdOperation, MultishotOperation, Operation
from ..ring import Ring, RingStats

if TYPE_CHECKING:
    from types import TracebackType

V = TypeVar("V")
_Salvage = Callable[..., None]

# Ring methods offered as coroutines by the generic wrapper (each awaits the operation's result);
# the hot ones are written out below.  A method whose operation is multishot (accept or poll with
# multishot=True, a multishot timeout) returns an AsyncMultishot when awaited.
_GENERIC = (
    "accept_direct", "async_cancel", "bind", "cancel_all", "cancel_fd", "close_direct",
    "epoll_ctl", "fadvise", "fallocate", "fgetxattr", "fixed_fd_install", "fsetxattr",
    "ftruncate", "futex_wait", "futex_wake", "getsockopt", "getxattr", "link_timeout", "linkat",
    "listen", "madvise", "mkdirat", "msg_ring", "nop_many", "openat2", "openat_direct",
    "poll_add", "poll_remove", "poll_update", "read_fixed", "read_fixed_many", "read_many",
    "recvmsg", "renameat", "sendmsg", "sendmsg_zc", "send_zc", "sendto", "setsockopt",
    "setxattr", "shutdown", "siocinq", "siocoutq", "socket_direct", "splice", "statx",
    "symlinkat", "sync_file_range", "tee", "timeout", "timeout_remove", "timeout_update",
    "unlinkat", "waitid", "write_fixed", "write_many", "fsync", "nop", "readv", "writev",
)


def cancel_quietly(op: Operation[Any] | None) -> bool:
    """Ask the kernel to cancel ``op`` if it is still running and nobody asked yet; True if a
    cancel was requested.  A refusal (the ring is closing, and its drain cancels everything
    anyway; a chain is open) is not an error here."""
    if op is None or op._res is not None or op.cancel_requested:
        return False
    try:
        op.cancel()
    except SaferRingError:
        return False
    return True


#: The completion queue an AsyncRing asks for unless told otherwise (see _new_ring).
_CQ_ENTRIES = 8192


def _new_ring(entries: int, options: dict[str, Any]) -> Ring:
    """The ring an AsyncRing drives: with ``IORING_SETUP_COOP_TASKRUN`` and a completion queue
    of 8192 entries, unless told otherwise.

    Without COOP_TASKRUN the kernel interrupts the loop thread (an inter-processor interrupt)
    each time a request completes from another context (a receive whose data arrived, say) to
    post its CQE at once; with it, completions wait for the thread's next system call, which in
    an event loop comes soon (the loop's epoll_wait or the next submission), and a thread
    asleep in epoll_wait is still woken (the notification only skips the interrupt for a
    running thread).  Measured on the echo benchmark: 1.3x the messages per second.

    The big completion queue is for multishot requests: the kernel does not let their CQEs
    overflow, it ends a request whose CQE finds the queue full.  With the default (twice the
    SQ) a server with 1,000 busy connections had its transports' receives ended by the
    hundred at every burst, each re-armed with a new SQE, and the connections re-armed last
    waited seconds for their data (tests/soak/soakload.py with 1,000 connections: longest wait
    5-15 s, against 0.1-0.3 s with 8192 entries, and 1.1-2x the messages per second).  It costs
    128 KiB.  Kernels without a flag or a big queue (before 5.19 and 5.5, or a small
    RLIMIT_MEMLOCK) get what they can."""
    # (Linux refuses COOP_TASKRUN beside SQPOLL: the SQ thread is what runs the task work.)
    coop: dict[str, Any] = ({} if "coop_taskrun" in options or options.get("sqpoll")
                            else {"coop_taskrun": True})
    big_cq: dict[str, Any] = ({"cq_entries": _CQ_ENTRIES} if "cq_entries" not in options
                              and type(entries) is int and 0 < entries * 2 < _CQ_ENTRIES else {})
    tried: list[dict[str, Any]] = []
    for extra in ({**coop, **big_cq}, big_cq, coop):
        if not extra or extra in tried:
            continue
        tried.append(extra)
        try:
            return Ring(entries, **options, **extra)
        except UnsupportedOperationError:
            pass
        except OSError as exc:
            if exc.errno != errno.ENOMEM or "cq_entries" not in extra:
                raise
    return Ring(entries, **options)


def _ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Kept:
    """What cancelled operations on one descriptor left for the next caller."""

    __slots__ = ("ident", "items")

    def __init__(self, ident: tuple[int, int]) -> None:
        self.ident = ident
        self.items: collections.deque[Any] = collections.deque()


def _discard(item: Any) -> None:
    """Let go of one kept item nobody will take: close a connection, return a Buffer."""
    try:
        if type(item) is tuple:
            os.close(item[0])
        elif type(item) is Buffer:
            item.release()
    except (OSError, SaferRingError):
        pass


class AsyncRing:
    """A :class:`~saferring.Ring` whose operations are awaited on an asyncio event loop.

    Create it inside a running loop (stock asyncio or uvloop); it belongs to that loop and its
    thread, and raises :class:`~saferring.WrongLoopError` when used from another loop.
    ``entries`` and the keyword ``options`` are :class:`~saferring.Ring`'s.  ``submit`` is
    ``"inline"`` (hand each operation to the kernel as it is awaited; one that completes at once
    costs no trip through the loop; after one that did not, the rest of that loop iteration's
    operations reach the kernel together at its end) or ``"deferred"`` (one submission per loop
    iteration).

    Every operation method of :class:`~saferring.Ring` is a coroutine here that returns the
    operation's result or raises its error (``n = await aring.read(fd, buf, 0)``).  Operations
    that yield many values (``accept_multishot``, ``recv_multishot``, ``read_multishot``, and
    ``accept``/``poll_add``/``timeout`` with ``multishot=True``) give an :class:`AsyncMultishot`
    to iterate with ``async for``.  For what has no coroutine (chains, registrations, buffer
    pools), use :attr:`ring` and await the operation with :meth:`run`.

    Cancelling an awaiting task cancels the kernel request and raises
    :class:`asyncio.CancelledError` at once; memory stays pinned until the request's final CQE,
    and what the request did is handed on (see the module documentation and docs/asyncio.md).
    Close with ``await aring.aclose()`` or ``async with``; :meth:`close` does the same
    synchronously.
    """

    __slots__ = ("__weakref__", "_closer", "_closing", "_dispatching", "_fd", "_futures", "_idle",
                 "_inline", "_inline_now", "_kept", "_loop", "_more_waiters", "_nowait_buf",
                 "_orphans", "_ring", "_scheduled",
                 "_settle_waiters", "_thread", "_transport_buffers", "_unsettled", "_watchers")

    def __init__(self, entries: int = 256, *, submit: str = "inline", **options: Any) -> None:
        if submit not in ("inline", "deferred"):
            raise ValueError(f"submit must be 'inline' or 'deferred', got {submit!r}")
        loop = _get_running_loop()
        if loop is None:
            raise WrongLoopError("AsyncRing() needs a running event loop: create it in a "
                                 "coroutine (or use saferring.aio.get_ring())")
        self._loop = loop
        self._inline = submit == "inline"
        self._inline_now = self._inline  # False after an inline miss, until the iteration ends
        self._futures: dict[int, asyncio.Future[None]] = {}
        # Tasks beyond the first awaiting the same operation (two tasks in aring.run(op), an
        # AsyncMultishot's aclose() while another task iterates): each has a future of its own,
        # so cancelling one task never cancels what another waits on.  Rarely non-empty.
        self._more_waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._orphans: dict[int, tuple[_Salvage | None, tuple[Any, ...]]] = {}
        self._kept: dict[int, _Kept] = {}
        # A cancelled receive or accept still in the kernel, by descriptor: the next receive
        # (accept) of that descriptor waits for it, so it cannot overtake it and reorder the
        # stream.  Its end resolves the shared future in _settle_waiters (by user_data).
        self._unsettled: dict[int, Operation[Any]] = {}
        self._settle_waiters: dict[int, asyncio.Future[None]] = {}
        self._thread = threading.get_ident()
        self._scheduled = False
        self._closing = False  # aclose()/close() began: consumers must not re-arm requests
        self._idle: asyncio.Future[None] | None = None  # aclose() waits on it for the drain
        self._closer: Any = None  # get_ring()'s hook that closes the ring with its loop
        self._nowait_buf: Any = None  # the file layer's scratch buffer (aio._files._scratch)
        self._transport_buffers: Any = None  # the BufferRing transports receive into (aio._net)
        self._watchers: dict[int, tuple[Operation[Any], Callable[[Operation[Any]], None]]] = {}
        self._dispatching = False
        if options.get("defer_taskrun"):
            raise ValueError(
                "AsyncRing does not take defer_taskrun=True: the loop learns of completions by "
                "polling the ring's descriptor, and deferred task work only runs when the ring "
                "is entered to wait, so a loop asleep in epoll would never see them")
        ring = _new_ring(entries, options)
        self._ring = ring
        self._fd = ring.fd
        ring._driver = weakref.ref(self)
        try:
            loop.add_reader(self._fd, self._poll)
        except BaseException:
            ring._driver = None
            ring.close()
            raise

    # -- driving the ring ----------------------------------------------------------------------

    def _poll(self) -> None:
        """Submit what is queued, collect what completed, wake the tasks that awaited it."""
        ring = self._ring
        ready = ring._collect()
        if self._dispatching:
            return
        if ready:
            self._dispatch(ready)
            if ring.closed:  # a completion callback closed the ring: nothing left to do
                return
        if self._scheduled or ring._buffer_work or lib.sr_sq_pending(ring._c):
            # Requests were queued while completions were handled: replies a transport's
            # protocol wrote, receives re-armed after running out of buffers (written from
            # inside the completion loop, after this call's submission).  Hand them over now
            # rather than in another loop iteration, and take what completed.
            ready = ring._collect()
            if ready:
                self._dispatch(ready)
        # (During a dispatch, what was collected joins the list being dispatched: the loop
        # there goes on to the entries appended behind it.)

    def _dispatch(self, ready: list[Operation[Any]]) -> None:
        # The ready list is emptied only after every entry was handled: an exception in the
        # middle (a KeyboardInterrupt) leaves it for the next poll, and handling an entry twice
        # does nothing (its future or orphan entry was popped the first time; a watcher sees
        # no new values).  Watchers run protocol code, which may queue and submit more
        # operations: their completions are appended to this same list and handled here.
        futures = self._futures
        orphans = self._orphans
        watchers = self._watchers
        more = self._more_waiters
        self._dispatching = True
        try:
            for op in ready:
                fut = futures.pop(op._ud, None)
                if more:
                    for other in more.pop(op._ud, ()):
                        if not other.done():
                            other.set_result(None)
                if fut is not None:
                    if not fut.done():
                        fut.set_result(None)
                elif watchers:
                    watch = watchers.get(op._ud)
                    if watch is not None:
                        if op._res is not None:
                            del watchers[op._ud]
                        watch[1](op)
                if orphans and op._res is not None:
                    orphan = orphans.pop(op._ud, None)
                    if orphan is not None:
                        if orphan[0] is not None:
                            orphan[0](self, op, *orphan[1])
                        if self._unsettled:
                            self._settled(op, orphan[1])
            ready.clear()
        finally:
            self._dispatching = False
        self._ring._ready_gen += 1
        if self._idle is not None and not self._ring._registry and not self._idle.done():
            self._idle.set_result(None)

    def _watch(self, op: Operation[Any], callback: Callable[[Operation[Any]], None]) -> None:
        """Call ``callback(op)`` from the completion path each time ``op`` produced values, and
        once more at its end (the transports' way: no task per connection)."""
        self._watchers[op._ud] = (op, callback)
        self._schedule()

    def _report(self, exc: BaseException, message: str) -> None:
        try:
            self._loop.call_exception_handler({"message": message, "exception": exc})
        except Exception:  # noqa: BLE001 - the loop is closed: nowhere to report
            pass

    def _flush(self) -> None:
        self._scheduled = False
        self._inline_now = self._inline
        if not self._ring.closed:
            self._poll()

    def _schedule(self) -> None:
        """Submit at the end of this loop iteration (once, however many operations were queued)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _check_loop(self) -> None:
        if _get_running_loop() is not self._loop:
            raise WrongLoopError("this AsyncRing belongs to another event loop (or none is "
                                 "running): create one AsyncRing per loop")

    async def _complete(self, op: Operation[Any], salvage: _Salvage | None = None,
                        *args: Any) -> Any:
        """Submit ``op`` (unless it is already done), wait for its final CQE, return its result."""
        self._submit_soon(op)
        if op._state is QUEUED or op._state is SUBMITTED:  # not done() (inlined)
            await self._until_done(op, salvage, args)
        return op.result()

    async def _until_done(self, op: Operation[Any], salvage: _Salvage | None,
                          args: tuple[Any, ...], cancel: bool = True) -> None:
        """Suspend until ``op``'s final CQE (the slow path: it did not complete at submission).

        If the task is cancelled meanwhile, ``salvage(self, op, *args)`` runs once the operation
        has ended (at once if it already has); ``cancel=False`` lets the request run to its end
        instead of asking the kernel to cancel it."""
        while op._state is QUEUED or op._state is SUBMITTED:  # not done()
            if op._res is not None:
                # Its final CQE was being recorded when an exception (a signal handler's)
                # interrupted the completion loop: the next poll finishes it, then wakes us.
                self._schedule()
            fut = self._add_waiter(op)
            try:
                await fut
            except CancelledError:
                if self._drop_waiter(op, fut):
                    # Another task still awaits this operation: it goes on for that task,
                    # which gets its result; nothing is cancelled or handed on.
                    raise
                self._abandon(op, salvage, args, cancel)
                raise

    def _add_waiter(self, op: Operation[Any]) -> asyncio.Future[None]:
        """A future the completion path resolves when ``op`` produces a value or ends."""
        fut = self._loop.create_future()
        first = self._futures.get(op._ud)
        if first is None or first.done():
            self._futures[op._ud] = fut
        else:
            self._more_waiters.setdefault(op._ud, []).append(fut)
        return fut

    def _drop_waiter(self, op: Operation[Any], fut: asyncio.Future[None]) -> bool:
        """Forget ``fut`` (its task was cancelled); True if another task still awaits ``op``."""
        ud = op._ud
        if self._futures.get(ud) is fut:
            del self._futures[ud]
        others = self._more_waiters.get(ud)
        if others is not None:
            others[:] = [f for f in others if f is not fut and not f.done()]
            if not others:
                del self._more_waiters[ud]
        first = self._futures.get(ud)
        return (first is not None and not first.done()) or ud in self._more_waiters

    def _submit_soon(self, op: Operation[Any]) -> None:
        """Hand what is queued (``op`` last) to the kernel: now (inline) or at the end of this
        iteration."""
        if self._inline_now:
            self._poll()
            if op._res is None:
                self._inline_missed()
        else:
            self._schedule()

    def _inline_missed(self) -> None:
        """An operation submitted inline did not complete at submission: it waits for a device
        or a peer.  Submitting the ones queued after it in this loop iteration with one
        ``io_uring_enter`` each would then cost a system call apiece for nothing (and split
        ``O_DIRECT`` reads into one device batch apiece), so they wait for the end of the
        iteration and reach the kernel together; the next iteration starts inline again."""
        self._inline_now = False
        self._schedule()

    def _abandon(self, op: Operation[Any], salvage: _Salvage | None, args: tuple[Any, ...],
                 cancel: bool = True) -> None:
        """The awaiting task was cancelled: cancel the kernel request (its pins stay until its
        final CQE) and hand on what it did once it ends."""
        if op._res is not None:  # it finished before the task could resume
            if salvage is not None:
                salvage(self, op, *args)
            return
        self._orphans[op._ud] = (salvage, args)
        if (salvage is _salvage_stream or salvage is _salvage_accept) and type(args[0]) is int:
            self._unsettled[args[0]] = op
        if cancel:
            cancel_quietly(op)
            if op._res is not None:
                # It ended inside cancel() (a receive waiting for a buffer has nothing in the
                # kernel, so no CQE will come): have the next poll hand on what it did.
                self._schedule()

    def _settled(self, op: Operation[Any], args: tuple[Any, ...]) -> None:
        """An orphaned receive or accept ended (and handed on what it did): wake the calls on
        its descriptor that waited for it."""
        fd = args[0] if args else None
        if type(fd) is int and self._unsettled.get(fd) is op:
            del self._unsettled[fd]
        fut = self._settle_waiters.pop(op._ud, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _settle(self, fd: int) -> None:
        """Wait until no cancelled receive or accept of ``fd`` is still in the kernel."""
        while True:
            op = self._unsettled.get(fd)
            if op is None:
                return
            if op._ud not in self._orphans:  # ended and handed on already
                del self._unsettled[fd]
                continue
            fut = self._settle_waiters.get(op._ud)
            if fut is None:
                fut = self._settle_waiters[op._ud] = self._loop.create_future()
            # Shielded: this task being cancelled must not cancel what other callers wait on.
            await asyncio.shield(fut)

    def _wake(self) -> None:
        """Have the loop submit and collect soon: from any thread (a buffer released by
        another thread re-arms a starved receive, say)."""
        try:
            if threading.get_ident() == self._thread:
                self._schedule()
            else:
                self._loop.call_soon_threadsafe(self._schedule)
        except RuntimeError:
            pass  # the loop is closed: nothing will run on this ring any more

    def _ring_closed(self) -> None:
        """Called by ``Ring.close()``: every operation has ended; wake whoever awaited one."""
        futures, self._futures = self._futures, {}
        more, self._more_waiters = self._more_waiters, {}
        for fut in [*futures.values(), *(f for fs in more.values() for f in fs)]:
            if not fut.done():
                try:
                    fut.set_result(None)
                except RuntimeError:
                    pass  # the loop is closed: nobody can be waiting any more
        self._orphans.clear()
        self._unsettled.clear()
        waiters, self._settle_waiters = self._settle_waiters, {}
        for fut in waiters.values():
            if not fut.done():
                try:
                    fut.set_result(None)
                except RuntimeError:
                    pass
        watchers, self._watchers = self._watchers, {}
        for op, watch in watchers.values():
            try:
                watch(op)  # the drain ended it: the watcher sees its end
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                self._report(exc, "a completion callback failed while the ring closed")
        kept, self._kept = self._kept, {}
        for entry in kept.values():
            for item in entry.items:
                _discard(item)

    # -- kept results of cancelled operations --------------------------------------------------

    def _keep(self, fd: int, item: Any, front: bool = False) -> None:
        entry = self._kept.get(fd)
        try:
            ident = _ident(fd)
        except OSError:
            _discard(item)  # the descriptor is gone: nobody can receive this any more
            return
        if entry is None or entry.ident != ident:
            if entry is not None:
                self._drop_kept(fd)
            entry = self._kept[fd] = _Kept(ident)
        if front:
            entry.items.appendleft(item)
        else:
            entry.items.append(item)

    def _take_kept(self, fd: int, conn: bool) -> Any:
        """The oldest item kept for ``fd`` (a connection if ``conn``, else data), or None."""
        entry = self._kept.get(fd)
        if entry is None:
            return None
        try:
            same = _ident(fd) == entry.ident
        except OSError:
            same = False
        if not same:
            self._drop_kept(fd)
            return None
        item = entry.items[0]
        if (type(item) is tuple) is not conn:
            return None
        entry.items.popleft()
        if not entry.items:
            del self._kept[fd]
        return item

    def _drop_kept(self, fd: int) -> None:
        entry = self._kept.pop(fd, None)
        if entry is not None:
            for item in entry.items:
                _discard(item)

    def _deliver(self, fd: int, buffer: Any) -> int | None:
        """Copy data a cancelled receive left for ``fd`` into ``buffer``; None if there is none."""
        if fd not in self._kept:
            return None
        # The target first: if it cannot take the data (read-only, busy), that raises before
        # anything is taken off the kept queue, so nothing is lost.
        target = buffer.view() if type(buffer) is Buffer else memoryview(buffer).cast("B")
        with target:
            if target.readonly:
                raise TypeError(f"recv()/read() needs a writable buffer, not {type(buffer).__name__}")
            item = self._take_kept(fd, conn=False)
            if item is None:
                return None
            data = item.tobytes() if type(item) is Buffer else item
            if type(item) is Buffer:
                _discard(item)
            n = min(len(target), len(data))
            target[:n] = data[:n]
        if type(buffer) is Buffer:
            buffer.mark_filled(n)
        if n < len(data):
            self._keep(fd, data[n:], front=True)
        return n

    # -- public: life cycle --------------------------------------------------------------------

    @property
    def ring(self) -> Ring:
        """The underlying :class:`~saferring.Ring`, for what has no coroutine here (chains,
        registered files, :class:`~saferring.BufferPool`, :class:`~saferring.BufferRing`).
        Its ``wait()``/``run()`` refuse: the loop collects its completions."""
        return self._ring

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this ring belongs to."""
        return self._loop

    @property
    def closed(self) -> bool:
        """True once the ring is closed."""
        return self._ring.closed

    def stats(self) -> RingStats:
        """The ring's counters (in-flight operations, pinned bytes, SQEs, CQEs)."""
        return self._ring.stats()

    def in_flight(self) -> int:
        """Operations whose final CQE has not arrived (awaited, cancelled or multishot)."""
        return len(self._ring._registry)

    def _stop_watching(self) -> None:
        try:
            self._loop.remove_reader(self._fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the loop is closed already: it watches nothing any more

    def close(self) -> None:
        """Cancel everything in flight, wait (blocking the loop) until the kernel has let go of
        every buffer, and close the ring.  Tasks awaiting an operation then get its outcome,
        usually :class:`~saferring.OperationCancelledError`.  Idempotent."""
        if self._ring.closed:
            return
        self._closing = True
        self._stop_watching()
        self._ring.close()

    async def aclose(self) -> None:
        """Like :meth:`close`, but waits for the cancelled operations without blocking the loop."""
        ring = self._ring
        if ring.closed:
            return
        self._check_loop()
        self._closing = True
        for op in list(ring._registry.values()):
            cancel_quietly(op)  # (a chain left open: close() deals with it)
        # Wait for the cancelled operations' final CQEs through the loop; whatever still runs
        # after a while (a zero-copy send the peer never reads) is left to close(), which
        # blocks until the kernel lets go.
        self._poll()
        if ring._registry:
            self._idle = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._idle), 5.0)
            except asyncio.TimeoutError:
                pass
            finally:
                self._idle = None
        self.close()

    async def __aenter__(self) -> AsyncRing:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"in_flight={self.in_flight()}"
        return f"<AsyncRing fd={self._fd} {state}>"

    # -- public: awaiting operations -----------------------------------------------------------

    async def run(self, op: Operation[Any]) -> Any:
        """Await an operation queued on :attr:`ring` (``aring.ring.xxx(...)``) and return its
        result.  Cancelling the task cancels the operation."""
        if op._ring is not self._ring:
            raise OperationStateError("the operation belongs to another ring")
        self._check_loop()
        if isinstance(op, MultishotOperation):
            raise OperationStateError("a multishot operation has many values: iterate over "
                                      "aring.multishot(op) instead")
        return await self._complete(op, _SALVAGE.get(type(op)))

    def multishot(self, op: MultishotOperation[V]) -> AsyncMultishot[V]:
        """An async iterator over the values of a multishot operation queued on :attr:`ring`."""
        if op._ring is not self._ring:
            raise OperationStateError("the operation belongs to another ring")
        self._check_loop()
        self._schedule()
        return AsyncMultishot(self, op)

    # The hot operations, written out: each avoids the generic wrapper's extra call.

    async def read(self, fd: Any, buffer: Any, offset: int = -1) -> Any:
        """Read into ``buffer`` (see :meth:`Ring.read <saferring.Ring.read>`); the result is the
        byte count (a :class:`~saferring.Buffer`, or None at end of stream, when ``buffer`` is a
        :class:`~saferring.BufferRing`).  At ``offset=-1`` data a cancelled read took from the
        stream is returned first."""
        if _get_running_loop() is not self._loop:
            self._check_loop()
        if self._unsettled and offset == -1 and fd in self._unsettled:
            await self._settle(fd)
        if self._kept and offset == -1 and type(fd) is int:
            n = self._deliver_or_buffer(fd, buffer)
            if n is not None:
                return n
        op = self._ring.read(fd, buffer, offset)
        if self._inline_now:
            self._poll()
            if op._res is None:
                self._inline_missed()
        else:
            self._schedule()
        if op._state is QUEUED or op._state is SUBMITTED:  # not done() (inlined)
            await self._until_done(op, _salvage_stream if offset == -1 else None, (fd, buffer))
        return op.result()

    async def recv(self, fd: Any, buffer: Any, flags: int = 0) -> Any:
        """Receive into ``buffer`` (see :meth:`Ring.recv <saferring.Ring.recv>`); data a
        cancelled receive on ``fd`` already took is returned first."""
        if _get_running_loop() is not self._loop:
            self._check_loop()
        if self._unsettled and fd in self._unsettled:
            await self._settle(fd)
        if self._kept and type(fd) is int:
            n = self._deliver_or_buffer(fd, buffer)
            if n is not None:
                return n
        op = self._ring.recv(fd, buffer, flags)
        if self._inline_now:
            self._poll()
            if op._res is None:
                self._inline_missed()
        else:
            self._schedule()
        if op._state is QUEUED or op._state is SUBMITTED:  # not done() (inlined)
            await self._until_done(op, _salvage_stream, (fd, buffer))
        return op.result()

    def _deliver_or_buffer(self, fd: int, buffer: Any) -> Any:
        from ..buffers import BufferRing

        if type(buffer) is BufferRing:
            item = self._take_kept(fd, conn=False)
            if item is None or type(item) is Buffer:
                return item
            self._keep(fd, item, front=True)
            raise OperationStateError(
                "data a cancelled receive into your own buffer took is waiting for this "
                "descriptor: receive it into a buffer of yours (not a BufferRing) first")
        return self._deliver(fd, buffer)

    async def write(self, fd: Any, data: Any, offset: int = -1) -> int:
        """Write ``data`` (see :meth:`Ring.write <saferring.Ring.write>`); the byte count."""
        if _get_running_loop() is not self._loop:
            self._check_loop()
        op = self._ring.write(fd, data, offset)
        if self._inline_now:
            self._poll()
            if op._res is None:
                self._inline_missed()
        else:
            self._schedule()
        if op._state is QUEUED or op._state is SUBMITTED:  # not done() (inlined)
            await self._until_done(op, None, ())
        return op.result()

    async def send(self, fd: Any, data: Any, flags: int = 0) -> int:
        """Send ``data`` (see :meth:`Ring.send <saferring.Ring.send>`); the byte count."""
        if _get_running_loop() is not self._loop:
            self._check_loop()
        op = self._ring.send(fd, data, flags)
        if self._inline_now:
            self._poll()
            if op._res is None:
                self._inline_missed()
        else:
            self._schedule()
        if op._state is QUEUED or op._state is SUBMITTED:  # not done() (inlined)
            await self._until_done(op, None, ())
        return op.result()

    async def accept(self, fd: Any, *, multishot: bool = False, **kwargs: Any) -> Any:
        """Accept a connection on listening socket ``fd``: ``(conn_fd, address)``, yours to
        close.  A connection a cancelled accept took is returned first.  With
        ``multishot=True``: an :class:`AsyncMultishot` of descriptors."""
        self._check_loop()
        if multishot:
            return self.multishot(self._ring.accept(fd, multishot=True, **kwargs))
        if self._unsettled and fd in self._unsettled:
            await self._settle(fd)
        if self._kept and type(fd) is int:
            conn = self._take_kept(fd, conn=True)
            if conn is not None:
                return conn
        return await self._complete(self._ring.accept(fd, **kwargs), _salvage_accept, fd)

    def accept_multishot(self, fd: Any, **kwargs: Any) -> AsyncMultishot[int]:
        """Accept connection after connection (:meth:`Ring.accept_multishot
        <saferring.Ring.accept_multishot>`): iterate with ``async for``."""
        self._check_loop()
        return self.multishot(self._ring.accept_multishot(fd, **kwargs))

    def recv_multishot(self, fd: Any, buffers: Any, flags: int = 0,
                       **kwargs: Any) -> AsyncMultishot[Buffer]:
        """Receive chunk after chunk into a :class:`~saferring.BufferRing`
        (:meth:`Ring.recv_multishot <saferring.Ring.recv_multishot>`): iterate with
        ``async for``; each value is a :class:`~saferring.Buffer` to release."""
        self._check_loop()
        return self.multishot(self._ring.recv_multishot(fd, buffers, flags, **kwargs))

    def read_multishot(self, fd: Any, buffers: Any, **kwargs: Any) -> AsyncMultishot[Buffer]:
        """Like :meth:`recv_multishot`, for ``read`` (pipes, character devices...)."""
        self._check_loop()
        return self.multishot(self._ring.read_multishot(fd, buffers, **kwargs))

    async def openat(self, path: Any, flags: int = os.O_RDONLY, mode: int = 0o644,
                     **kwargs: Any) -> int:
        """Open ``path`` (see :meth:`Ring.openat <saferring.Ring.openat>`); the new descriptor.
        If the task is cancelled and the open still succeeds, the descriptor is closed."""
        self._check_loop()
        return await self._complete(  # type: ignore[no-any-return]
            self._ring.openat(path, flags, mode, **kwargs), _salvage_fd)

    async def socket(self, *args: Any, **kwargs: Any) -> int:
        """Create a socket (see :meth:`Ring.socket <saferring.Ring.socket>`); the descriptor."""
        self._check_loop()
        return await self._complete(  # type: ignore[no-any-return]
            self._ring.socket(*args, **kwargs), _salvage_fd)

    async def connect(self, fd: Any, address: Any) -> int:
        """Connect socket ``fd`` to ``address``."""
        self._check_loop()
        return await self._complete(self._ring.connect(fd, address))  # type: ignore[no-any-return]

    async def close_fd(self, fd: Any) -> int:
        """Close ``fd`` through the ring.  Data or connections that cancelled operations left
        for it are dropped (connections closed)."""
        self._check_loop()
        if self._kept and type(fd) is int:
            self._drop_kept(fd)
        return await self._complete(self._ring.close_fd(fd))  # type: ignore[no-any-return]

    if TYPE_CHECKING:
        # The rest of Ring's operations, installed below by _generic().
        def __getattr__(self, name: str) -> Callable[..., Coroutine[Any, Any, Any]]: ...


class AsyncMultishot(Generic[V]):
    """The values of a multishot operation, as an async iterator (``async for v in it``).

    Values are taken one at a time as the loop body asks for them: breaking out of the loop, or
    cancelling the task while it waits, loses none (the next iteration, or :meth:`take`,
    returns them).  Iteration ends when the operation ends: normally (``StopAsyncIteration``) or
    with its error (the cancellation, after :meth:`cancel`, raises
    :class:`~saferring.OperationCancelledError`).  :meth:`aclose` cancels it and waits for its
    end; ``async with`` does that on exit.
    """

    __slots__ = ("_aring", "_op")

    def __init__(self, aring: AsyncRing, op: MultishotOperation[V]) -> None:
        self._aring = aring
        self._op = op

    @property
    def operation(self) -> MultishotOperation[V]:
        """The underlying :class:`~saferring.MultishotOperation`."""
        return self._op

    def __aiter__(self) -> AsyncMultishot[V]:
        return self

    async def __anext__(self) -> V:
        op = self._op
        aring = self._aring
        while True:
            items = getattr(op, "_items", None)
            if items:
                value = op._convert(items[0])
                items.popleft()
                if value is not None or not op._wants_flags:  # (a chunk that held no data)
                    return value
                continue
            if op.done():  # (not _res alone: see Operation.done())
                if op._state is not COMPLETED:
                    op.result()  # raises the error (or the cancellation)
                raise StopAsyncIteration
            aring._check_loop()
            if op._res is not None:  # an interrupted record: the next poll finishes it
                aring._schedule()
            fut = aring._add_waiter(op)
            try:
                await fut
            except CancelledError:
                aring._drop_waiter(op, fut)  # the values stay with the operation
                raise

    def take(self) -> list[V]:
        """The values that arrived and were not yet iterated over (oldest first)."""
        return self._op.take()

    def cancel(self) -> None:
        """Ask the kernel to stop the operation; iteration then ends with its cancellation."""
        if self._op._res is None and not self._op.cancel_requested:
            self._op.cancel()

    async def aclose(self) -> None:
        """Cancel the operation (if it still runs) and wait for its end; values not taken stay
        available through :meth:`take`."""
        op = self._op
        if op._res is None and not op._ring.closed:
            self.cancel()
            aring = self._aring
            aring._check_loop()
            while op._res is None:
                fut = aring._add_waiter(op)
                try:
                    await fut
                except CancelledError:
                    aring._drop_waiter(op, fut)
                    raise

    async def __aenter__(self) -> AsyncMultishot[V]:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


# -- what a cancelled operation hands on ---------------------------------------------------------


def _salvage_stream(aring: AsyncRing, op: Operation[Any], fd: Any, buffer: Any) -> None:
    """A receive (or a read at the file position) whose task was cancelled: data it took from
    the stream goes to the next receive of that descriptor."""
    if op._state is not COMPLETED or type(fd) is not int:
        return
    value = op.result()
    if type(value) is Buffer:  # picked from a BufferRing
        aring._keep(fd, value)
        return
    if value is None or value <= 0:
        return
    if type(buffer) is Buffer:
        data = buffer.tobytes()
    else:
        with memoryview(buffer) as view, view.cast("B") as flat:
            data = flat[:value].tobytes()
    aring._keep(fd, data)


def _salvage_accept(aring: AsyncRing, op: Operation[Any], fd: Any) -> None:
    """An accept whose task was cancelled: the connection goes to the next accept."""
    if op._state is not COMPLETED:
        return
    conn = op.result()
    if type(fd) is int:
        aring._keep(fd, conn)
    else:
        _discard(conn)


def _salvage_fd(aring: AsyncRing, op: Operation[Any]) -> None:
    """An open or socket whose task was cancelled: the new descriptor is closed."""
    if op._state is COMPLETED:
        try:
            os.close(op.result())
        except OSError:
            pass


_SALVAGE: dict[type[Any], _Salvage] = {AcceptOperation: _salvage_accept}
for _cls in FdOperation.__subclasses__():
    _SALVAGE[_cls] = _salvage_fd
_SALVAGE[FdOperation] = _salvage_fd


def _generic(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    method = getattr(Ring, name)

    async def call(self: AsyncRing, *args: Any, **kwargs: Any) -> Any:
        if _get_running_loop() is not self._loop:
            self._check_loop()
        op = method(self._ring, *args, **kwargs)
        if isinstance(op, MultishotOperation):
            self._schedule()
            return AsyncMultishot(self, op)
        return await self._complete(op, _SALVAGE.get(type(op)))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = (f"Await :meth:`Ring.{name} <saferring.Ring.{name}>` and return its result "
                    "(an :class:`AsyncMultishot` for a multishot operation).")
    return call


for _name in _GENERIC:
    setattr(AsyncRing, _name, _generic(_name))

__all__ = ["AsyncMultishot", "AsyncRing"]
