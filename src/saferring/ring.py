"""The safe ring: submission, completion and the registry that keeps kernel-visible memory alive.

How the registry keeps the promise
----------------------------------
io_uring is asynchronous in the strongest sense: once an SQE is handed over, the kernel may read
or write the memory it points to at any later moment, from another context (an io-wq worker, task
work, a softirq completing a socket read), until it posts that request's *final* CQE.  Nothing in
between is a safe point: not a successful ``ASYNC_CANCEL`` (it only means the target's own CQE is
coming, liburing#733), not closing the file descriptor, not even closing the ring (the kernel
tears requests down in a workqueue after ``close(ring_fd)`` returns).

So every operation is stored in ``Ring._registry`` under its user_data *before* its SQE is
written, together with every object that owns memory the kernel may touch.  The only code that
removes an entry is the completion path (``_reap``/``_consume``), and only for a final CQE (one without
``IORING_CQE_F_MORE``).  Everything else follows from that one rule:

* a caller dropping the operation or the buffer changes nothing: the registry still holds them;
* an exception or a cancelled task between submit and completion changes nothing either;
* ``close()`` cancels whatever is in flight and reaps until the registry is empty, and only then
  unmaps the ring;
* a ring that is garbage-collected unclosed does the same from its finaliser; if it cannot (the
  kernel refuses a foreign thread on a single-issuer ring), the ring and everything it pins are
  kept alive deliberately, forever, rather than freed under the kernel.

Threads and fork
----------------
liburing's queues are single-producer/single-consumer memory shared with the kernel, and every
cffi call releases the GIL, so two threads inside the same ring would corrupt it.  Rather than take
a lock on every operation (and block submitters behind a sleeping ``wait()``), a ring belongs to
the thread that created it; any other thread gets :class:`WrongThreadError`.  A forked child gets
:class:`ForkedRingError`: the queues are shared with the parent, so the child may only drop its
copy (``close()``, which touches nothing shared).
"""

from __future__ import annotations

import atexit
import collections
import errno
import math
import os
import sys
import time
import weakref
from types import FrameType, TracebackType
from typing import Any, NamedTuple

from . import _pinning
from ._binding import LIBURING_VERSION, UNAVAILABLE_REASON, ffi, lib
from ._buffer_ops import BufferOps
from ._chain import Chain
from ._event_ops import EventOps
from ._file_ops import FileOps
from ._guard import _BUSY, _NO_OWNER, _exclusive, _get_ident
from ._net_ops import NetOps
from ._registration import Registration
from ._state import CANCELLED as _CANCELLED
from ._state import COMPLETED as _COMPLETED
from ._state import FAILED as _FAILED
from ._state import QUEUED as _QUEUED
from ._state import SUBMITTED as _SUBMITTED
from .buffers import Buffer, BufferRing
from .errors import (
    RAISE_MEMLOCK,
    ForkedRingError,
    OperationStateError,
    RingClosedError,
    UnsupportedOperationError,
    UnsupportedPlatformError,
    WrongThreadError,
    has_capability,
    os_error,
    process_status,
    read_proc,
    rlimit_text,
)
from .features import OP, Features, build_features, opcode_name, since, supported_table
from .fixed import FileTable, FixedFile
from .operation import UD_FLAGGED as _UD_FLAGGED
from .operation import UD_MESSAGE as _UD_MESSAGE
from .operation import (
    BatchOperation,
    CancelRequest,
    CloseOperation,
    FsyncOperation,
    IntOperation,
    NopOperation,
    OpenOperation,
    Operation,
    PathOperation,
    ReadOperation,
    ReadvOperation,
    ReceivedMessage,
    StatxOperation,
    StatxResult,
    WriteOperation,
    WritevOperation,
)
from .operation import new_operation as _new_op

_unpack: Any = ffi.unpack if ffi is not None else None
_from_buffer: Any = ffi.from_buffer if ffi is not None else None
_MAX_LEN = _pinning.MAX_LEN
_MAX_BATCH = lib.SR_BATCH_MAX_MEMBERS if lib is not None else 0
_M64 = (1 << 64) - 1
_RETRYABLE = frozenset({errno.EBUSY, errno.EAGAIN, errno.EINTR, errno.ETIME})
_MAX_ENTRIES = 32768  # IORING_MAX_ENTRIES
_MAX_CQ_ENTRIES = 2 * _MAX_ENTRIES  # IORING_MAX_CQ_ENTRIES
_RECANCEL_SECONDS = 1.0  # close(): how often to repeat cancels for ops that have not ended
# How long the finaliser and the exit hook wait for in-flight operations before they keep the
# ring (and everything it pins) alive forever instead (_bury).
_FINALISER_DRAIN_SECONDS = 10.0

_OP_READ, _OP_WRITE = OP["READ"], OP["WRITE"]
_OP_READV, _OP_WRITEV = OP["READV"], OP["WRITEV"]
_OP_FSYNC, _OP_OPENAT, _OP_CLOSE = OP["FSYNC"], OP["OPENAT"], OP["CLOSE"]
_OP_STATX, _OP_TIMEOUT, _OP_CANCEL = OP["STATX"], OP["TIMEOUT"], OP["ASYNC_CANCEL"]
_OP_SEND = OP["SEND"]

# Every ring alive in this process: the fork hook and the exit hook visit them.
_live_rings: weakref.WeakSet[Ring] = weakref.WeakSet()
# Rings that could not be drained (see module docstring): never freed.
_graveyard: list[Ring] = []

_EEXIST_MESSAGE = (
    "the kernel refuses this thread (EEXIST): the ring was created with single_issuer or "
    "defer_taskrun by another thread, and only that thread may submit to it")
_BATCH_TABLE = 4096  # SR_BATCH_TABLE in uring.c
_NEG_ECANCELED = -errno.ECANCELED
_NEG_EINTR = -errno.EINTR
_F_MORE = 1 << 1  # IORING_CQE_F_MORE
_LIBRARY_BUFFERS = (Buffer, BufferRing)  # read() targets that are not caller memory


def _addr(cdata: Any) -> int:
    """The address of a pinned C object, for an SQE field."""
    return int(ffi.cast("uintptr_t", cdata))
_MIN_FD, _MAX_FD = -(1 << 31), (1 << 31) - 1



def _enter_error(code: int, what: str) -> Exception:
    """The exception for a failed C entry point: the fork and thread refusals get their own."""
    if code == errno.EINPROGRESS:
        return OperationStateError("a chain is open (with ring.chain(): ...): nothing can be "
                                   "submitted, waited for or cancelled until it is closed")
    if code == errno.ECHILD:
        return ForkedRingError("this Ring belongs to the parent process (the process forked "
                               "during the call); a forked child must not use it")
    if code == errno.EEXIST:
        return WrongThreadError(_EEXIST_MESSAGE)
    return os_error(code, what)


_check_offset = _pinning.check_offset


def _deadline(timeout: float | None) -> tuple[int, float]:
    """(timeout in ns for the kernel, -1 for none; monotonic deadline) for wait()."""
    if timeout is None or timeout == math.inf:
        return -1, 0.0
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    if timeout * 1e9 >= _MAX_WAIT_NS:
        return -1, 0.0  # longer than anyone waits: as good as none
    timeout_ns = int(timeout * 1e9)
    return timeout_ns, time.monotonic() + timeout_ns / 1e9


_MAX_WAIT_NS = 1 << 62  # about 146 years: longer timeouts are as good as none


class RingStats(NamedTuple):
    """Counters of one ring, from :meth:`Ring.stats`."""

    in_flight: int
    """Operations submitted or queued whose final CQE has not arrived."""
    pinned_bytes: int
    """Bytes of memory (buffers, iovecs, paths, ...) held for the kernel right now."""
    submitted: int
    """SQEs handed to the kernel since the ring was created (including saferring's cancels)."""
    completed: int
    """CQEs reaped since the ring was created."""


class Ring(FileOps, NetOps, EventOps, Registration, BufferOps):
    """A safe io_uring instance.

    ``entries`` is the submission queue size (rounded up to a power of two by the kernel); the
    completion queue is twice that unless ``cq_entries`` says otherwise.  ``sqpoll`` starts a
    kernel thread that polls the SQ (``sq_thread_idle`` milliseconds before it sleeps);
    ``single_issuer``, ``coop_taskrun`` and ``defer_taskrun`` pass the matching
    ``IORING_SETUP_*`` flags (``defer_taskrun`` needs ``single_issuer``).  A flag the kernel lacks
    raises :class:`UnsupportedOperationError` naming it.

    Every method that prepares an operation returns an :class:`Operation` whose SQE is queued;
    :meth:`submit`, :meth:`wait` and :meth:`run` hand queued SQEs to the kernel.  Use the ring as
    a context manager, or call :meth:`close`.  A ring belongs to the thread that created it;
    ``stats()``, ``features`` and ``closed`` may be read from any thread.
    """

    __slots__ = (
        "__weakref__",
        "_abandoned",
        "_backlog",
        "_backlog_flagged",
        "_c",
        "_cancel_round",
        "_cancelled",
        "_closed",
        "_cq_flags",
        "_cq_res",
        "_cq_size",
        "_cq_ud",
        "_cur",
        "_drained",
        "_driver",
        "_features",
        "_forked",
        "_internal",
        "_last_cancel",
        "_next_ud",
        "_others",
        "_owner",
        "_owner_ident",
        "_ready",
        "_ready_gen",
        "_registry",
        "_sup",
    )

    def __init__(
        self,
        entries: int = 256,
        *,
        sqpoll: bool = False,
        sq_thread_idle: int | None = None,
        single_issuer: bool = False,
        coop_taskrun: bool = False,
        defer_taskrun: bool = False,
        cq_entries: int | None = None,
    ) -> None:
        if hasattr(self, "_owner"):
            # Re-running __init__ on a live ring would replace its registry (and its pins).
            raise OperationStateError("Ring.__init__ was called on a ring that already exists")
        # Safe defaults first: if anything below raises, __del__ finds a closed ring.
        self._owner = _NO_OWNER
        self._closed = True
        self._forked = False
        self._registry: dict[int, Operation[Any]] = {}
        self._internal: dict[int, CancelRequest] = {}
        self._ready: list[Operation[Any]] = []
        self._cancelled: set[int] = set()
        self._backlog: Any = None
        self._backlog_flagged = False
        self._abandoned: list[BatchOperation] = []  # batches settled in C without a batch CQE
        self._cur: Operation[Any] | None = None  # the op a completion loop is recording
        self._others: collections.deque[Any] = collections.deque()  # (ud, res), or a message
        self._ready_gen = 0  # bumped each time wait() hands the ready list out
        self._cancel_round: set[int] = set()  # close(): ops cancelled in the current round
        self._last_cancel = -math.inf
        self._drained = False  # a drained chain was queued: cancel through the register path
        self._driver: Any = None  # weakref to the AsyncRing that drives this ring, if any
        self._chain: Chain | None = None
        self._files: FileTable | None = None
        self._pool = None
        self._groups = {}
        self._group_next = 0
        self._buffer_work = False
        self._deferred = []
        if lib is None:
            raise UnsupportedPlatformError(f"saferring cannot create a Ring: {UNAVAILABLE_REASON}")

        requested = _setup_flags(entries, sqpoll, sq_thread_idle, single_issuer, coop_taskrun,
                                 defer_taskrun, cq_entries)
        flags = 0
        for _name, bit in requested:
            flags |= bit
        c = ffi.new("sr_ring *")
        rc = lib.sr_ring_init(c, entries, flags, sq_thread_idle or 0, cq_entries or 0)
        if rc < 0:
            raise _setup_error(-rc, entries, requested, sq_thread_idle, cq_entries)
        self._c = c
        self._next_ud = 1
        self._cq_size = int(c.cq_entries)
        self._cq_ud = ffi.new("uint64_t[]", self._cq_size)
        self._cq_res = ffi.new("int32_t[]", self._cq_size)
        self._cq_flags = ffi.new("uint32_t[]", self._cq_size)

        probe = ffi.new("uint8_t[]", 256)
        known = lib.sr_probe(c, probe, 256)
        supported = bytes(ffi.buffer(probe, 256)) if known >= 0 else None
        self._sup = supported_table(supported)
        self._features = build_features(
            supported, max(known, 0), int(c.features), int(c.setup_flags),
            int(c.sq_entries), self._cq_size, LIBURING_VERSION,
        )
        self._owner_ident = _get_ident()
        self._closed = False
        self._owner = self._owner_ident
        _live_rings.add(self)

    # -- life cycle ------------------------------------------------------------------------

    def __copy__(self) -> Ring:
        raise TypeError("a Ring cannot be copied: create another Ring")

    def __deepcopy__(self, memo: object) -> Ring:
        raise TypeError("a Ring cannot be copied: create another Ring")

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("a Ring cannot be pickled or copied")

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` finished (or in a forked child, once it dropped its copy)."""
        return self._closed

    @property
    def fd(self) -> int:
        """The ring's file descriptor (for ``poll``/``epoll``-style readiness, not for I/O)."""
        if _get_ident() != self._owner:
            self._refuse()
        return int(self._c.ring.ring_fd)

    @property
    def features(self) -> Features:
        """What this ring's kernel supports: opcodes, ``IORING_FEAT_*`` bits, setup flags."""
        return self._features

    def close(self, timeout: float | None = None) -> None:
        """Cancel everything in flight, wait for every final CQE, then tear the ring down.

        Idempotent.  Returns only when the kernel holds no reference to any memory an operation
        pinned; operations end ``CANCELLED`` (or ``COMPLETED``/``FAILED`` if they finished
        first).  Some requests cannot end on their own: a zero-copy send whose data the peer
        never reads keeps the buffer until the socket is closed.  With ``timeout`` (seconds),
        ``close()`` raises :class:`TimeoutError` once that long has passed, and the ring stays
        open and usable (close the sockets, then call ``close()`` again).  In a forked child it
        only drops the child's copy of the ring.  Raises :class:`WrongThreadError` from a thread
        that does not own the ring, and :class:`OperationStateError` from code running inside
        another call on the ring.
        """
        deadline = None
        if timeout is not None:
            timeout_ns, end = _deadline(timeout)  # validates; -1: too long to matter
            deadline = None if timeout_ns < 0 else end
        if self._closed:
            return
        if self._forked:
            self._drop_forked_copy()
            return
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            self._abandon_chain()
            self._drain(deadline)
            self._teardown()
            driver = self._driver() if self._driver is not None else None
            if driver is not None:
                driver._ring_closed()  # wakes the tasks that awaited the drained operations
        except BaseException:
            # Still open (interrupted, or the kernel refused): the caller may retry.  Written
            # without a jump, like every owner restore: on CPython 3.10 a conditional jump is
            # where a signal handler can raise.  (Entering this handler is such a place too on
            # 3.10; a busy mark left behind that way is found stale and cleared by _refuse.)
            self._owner = (self._owner_ident, _NO_OWNER)[self._closed]
            raise

    def _teardown(self) -> None:
        # The flags and the C teardown with no call in between (a call is where a signal
        # handler can raise): the ring is never open in Python and torn down in C, nor the
        # other way round.
        self._closed = True
        self._owner = _NO_OWNER
        lib.sr_ring_exit(self._c)
        self._ready = []
        self._backlog = None
        self._internal.clear()
        for owner in [self._pool, *self._groups.values()]:
            if owner is not None:
                owner._ring_closed()

    def _drain(self, deadline: float | None = None) -> None:
        """Cancel all in-flight operations and reap until every one has its final CQE
        (``TimeoutError`` past ``deadline``, a ``time.monotonic()`` value)."""
        registry = self._registry
        while registry or self._backlog is not None or self._others:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"close(): {len(registry)} operation(s) still in flight "
                                   f"(e.g. {next(iter(registry.values()), None)!r})")
            # Collect what has already completed first: no cancel is needed for those.
            while self._reap(0, -1) > 0:
                pass
            self._finish_orphans()
            now = time.monotonic()
            if registry:
                if now - self._last_cancel >= _RECANCEL_SECONDS:
                    # Repeated because a cancel can miss: an op that was running when the
                    # first request arrived (-EALREADY) may block again later.
                    self._last_cancel = now
                    self._cancel_round = set()
                done = self._cancel_round  # kept on the ring: an interrupted round resumes
                for op in list(registry.values()):
                    if op._ud in done:
                        continue
                    op._cancel = True
                    self._cancelled.add(op._ud)
                    self._queue_cancel(op)
                    done.add(op._ud)
                self._reap(1, 100_000_000)

    def _abandon_chain(self) -> None:
        """Close a chain left open (the ring is being closed inside ``with ring.chain()``):
        what was queued in it runs as a complete chain, and is then drained like the rest."""
        chain = self._chain
        if chain is not None:
            self._chain = None
            chain._closed_by_ring()
            lib.sr_chain_end(self._c)

    def _drop_forked_copy(self) -> None:
        # The child's copy of the ring: unmapping it and closing the child's fd touches nothing
        # the parent's kernel requests use.  The pins are copy-on-write copies: safe to drop.
        self._registry.clear()
        self._teardown()

    def __del__(self) -> None:
        # First, atomically (no call, so no thread switch, in between): take the ring away from
        # its owner.  A finaliser can race a thread that resurrected the ring through a weakref;
        # from here on such a thread is refused, and if one is already inside a call
        # (_owner is _BUSY) the ring cannot be drained from here at all: it is buried (never
        # freed), and that call's exit gives it back to its owner thread, which may go on
        # using it through the weakref (safe: nothing it pins is ever released early).
        try:
            owner = self._owner
            self._owner = _NO_OWNER
        except AttributeError:
            return
        if self._closed:
            return
        if owner == _BUSY:
            _bury(self)
            return
        try:
            if self._forked:
                self._drop_forked_copy()
            else:
                # Nobody else can be inside the ring now: the finaliser may drain it from
                # whatever thread the garbage collector runs in (not through a ring descriptor
                # registered by the owner thread, though: see sr_forget_registered_ring_fd).
                if _get_ident() != self._owner_ident:
                    lib.sr_forget_registered_ring_fd(self._c)
                self._abandon_chain()
                self._drain(time.monotonic() + _FINALISER_DRAIN_SECONDS)
                self._teardown()
        except BaseException:  # noqa: BLE001 - any failure: never free what the kernel may use
            _bury(self)

    def _after_fork_in_child(self) -> None:
        self._forked = True
        self._owner = _NO_OWNER

    # -- checks ----------------------------------------------------------------------------

    def _refuse(self) -> None:
        """Raise the right error for a call from the wrong context (the hot paths' slow path)."""
        if self._forked and not self._closed:
            raise ForkedRingError(
                "this Ring was created by the parent process; a forked child must not use it. "
                "Create a new Ring in the child."
            )
        if self._closed:
            raise RingClosedError("the Ring is closed")
        if self._owner == _BUSY and _get_ident() == self._owner_ident:
            if not self._call_in_progress():
                # A stale mark: a signal handler raised while a ring call was unwinding, before
                # its finally block could clear the mark (possible on CPython 3.10).  No ring
                # call is running on this thread, so the ring is free: let this call proceed.
                self._owner = self._owner_ident
                return
            raise OperationStateError(
                "the ring was re-entered: a ring method was called from code that runs inside "
                "another call on the same ring (a finaliser, a signal handler, an iterator or "
                "__index__ of an argument)")
        raise WrongThreadError(self._thread_message())

    def _call_in_progress(self) -> bool:
        """True if a ring call on this ring is running on the current thread's stack."""
        # Skip this function, _refuse and the guarded function that called _refuse.
        frame: FrameType | None = sys._getframe(3)
        while frame is not None:
            if frame.f_code in _GUARDED_CODE and frame.f_locals.get("self") is self:
                return True
            frame = frame.f_back
        return False

    def _thread_message(self) -> str:
        return (f"this Ring belongs to thread {self._owner_ident}, not {_get_ident()}: a ring is "
                "used from the thread that created it (create one Ring per thread)")

    def _unsupported(self, opcode: int) -> None:
        raise UnsupportedOperationError(
            f"{opcode_name(opcode)} is not supported by this kernel (io_uring gained it in "
            f"Linux {since(opcode)}; ring.features lists what this kernel has)"
        )

    def _require(self, opcode: int) -> None:
        if not self._sup[opcode]:
            self._unsupported(opcode)

    def _submitted_watermark(self) -> int:
        return int(self._c.submitted_ud)

    # -- preparing operations ----------------------------------------------------------------
    #
    # The order is what keeps the promise: (1) everything the kernel will touch is pinned and
    # every argument checked, (2) the operation goes into the registry, (3) C writes the SQE.
    # If (3) raises (cffi could not convert an argument, or an asynchronous exception arrived
    # after the call), the registry entry is removed only if C never wrote the SQE, which C
    # records in prepared_ud.

    def _take_ud(self) -> int:
        ud = self._next_ud
        self._next_ud = ud + 1
        return ud

    def _unregister_if_unprepared(self, ud: int, exc: BaseException) -> BaseException:
        """Undo step (2) after step (3) raised, unless the SQE exists; return what to raise."""
        if int(self._c.prepared_ud) != ud:
            self._registry.pop(ud, None)
            self._internal.pop(ud, None)
        if isinstance(exc, OverflowError):
            return ValueError(f"an argument is out of range for the kernel ABI: {exc}")
        return exc

    def _queue(self, op: Any, opcode: int, fd: int, addr: Any, length: int, off: int,
               op_flags: int) -> Any:
        """Register ``op`` and write its SQE (the generic path: one C call)."""
        return self._queue_with(op, lib.sr_prep, opcode, fd, addr, length, off, op_flags, 0)

    def _queue_ext(self, op: Any, opcode: int, fd: int = -1, addr: int = 0, length: int = 0,
                   off: int = 0, op_flags: int = 0, sqe_flags: int = 0, ioprio: int = 0,
                   buf_index: int = 0, file_index: int = 0, addr3: int = 0) -> Any:
        """Register ``op`` and write its SQE with every field given (addresses as ints, which
        the caller keeps alive through the operation's pins)."""
        return self._queue_with(op, lib.sr_prep_ext, opcode, fd, addr, length, off & _M64,
                                op_flags, sqe_flags, ioprio, buf_index, file_index, addr3, 0)

    def _queue_with(self, op: Any, prep: Any, *args: Any) -> Any:
        """Register ``op``, then have ``prep(c, user_data, *args)`` write its SQE (retried
        after reaping while the SQ is full); undo the registration if no SQE was written."""
        ud = op._ud
        self._registry[ud] = op
        try:
            rc = prep(self._c, ud, *args)
            if rc < 0:
                self._prep_retry(ud, rc, prep, self._c, ud, *args)
        except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
            raise self._unregister_if_unprepared(ud, exc) from None
        return op

    def _use_sync_cancel(self) -> None:
        """Cancel through io_uring_register from now on (a drained chain was queued)."""
        self._drained = True

    def _take_flagged_ud(self) -> int:
        """A user_data for an operation with several CQEs (multishot, zero-copy)."""
        ud = self._next_ud
        self._next_ud = ud + 1
        return ud | _UD_FLAGGED

    def _fd(self, fd: Any) -> tuple[int, int]:
        """(descriptor or slot, SQE flags) for an ``fd`` argument: an int, a :class:`FixedFile`
        (``IOSQE_FIXED_FILE``), or an object with ``fileno()`` (a socket, a file)."""
        if type(fd) is int:
            if not _MIN_FD <= fd <= _MAX_FD:
                raise ValueError(f"fd must fit a 32-bit int, got {fd}")
            return fd, 0
        if isinstance(fd, FixedFile):
            return fd._check(self), lib.IOSQE_FIXED_FILE
        if isinstance(fd, bool):
            raise TypeError("fd must be an int, a FixedFile or an object with fileno(), got bool")
        fileno = getattr(fd, "fileno", None)
        if fileno is not None and not isinstance(fd, int):
            fd = fileno()
        fd = _pinning.index(fd, "fd")
        if not _MIN_FD <= fd <= _MAX_FD:
            raise ValueError(f"fd must fit a 32-bit int, got {fd}")
        return fd, 0

    def _fixed_handle(self, slot: int, picked: bool = False, table: Any = None,
                      since: int = -1) -> FixedFile:
        """A handle for a slot a ``*_direct`` request filled.

        ``table``/``since``: the file table and its version when the request was queued.  If
        the table was replaced, or the slot touched (updated, closed, reused by an explicit
        slot) after that, the file there may not be the request's: the handle is stale from
        birth.  ``picked``: the kernel chose the slot, so it was empty until now; its generation
        is bumped, which makes any handle taken to the empty slot earlier stale."""
        current = self._files
        if table is None:
            table, since = current, -1
        if (current is None or table is not current or not 0 <= slot < len(current.generations)
                or (since >= 0 and current.touched_since(slot, since))):
            return FixedFile._make(self, FileTable(slot + 1), slot)  # stale from birth
        if picked:
            current.bump(slot)
        return FixedFile._make(self, current, slot)

    def _make_room(self) -> None:
        """Reap whatever has completed (waiting briefly if anything is in flight), so that a
        full SQ or a kernel holding back (CQ backlog, the pre-5.5 CQ guard) can take more."""
        self._reap(1 if self._registry or self._internal else 0, 10_000_000)

    def _prep_retry(self, ud: int, rc: int, prep: Any, *args: Any) -> None:
        """The SQ is full and the kernel would not take more: reap, then retry."""
        for _ in range(1000):
            if -rc not in _RETRYABLE:
                break
            self._make_room()
            rc = prep(*args)
            if rc >= 0:
                return
        self._registry.pop(ud, None)
        self._internal.pop(ud, None)
        if rc == -errno.ENOSPC and self._chain is not None:
            raise ValueError(f"the chain does not fit in the submission queue "
                             f"({int(self._c.sq_entries)} entries, or the completion queue's "
                             "limit): create the Ring with more entries")
        if rc == -errno.EINPROGRESS:
            raise _enter_error(-rc, "")
        raise _enter_error(-rc, "no submission queue entry could be obtained")

    def nop(self) -> NopOperation:
        """Queue a no-op (``IORING_OP_NOP``); its result is 0."""
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            ud = self._next_ud
            self._next_ud = ud + 1
            op = _new_op(NopOperation, self, None, ud)
            self._registry[ud] = op
            try:
                rc = lib.sr_prep_nop(self._c, ud)
                if rc < 0:
                    self._prep_retry(ud, rc, lib.sr_prep_nop, self._c, ud)
            except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
                raise self._unregister_if_unprepared(ud, exc) from None
            return op
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    # read() and write() repeat each other's shape on purpose: they are the single-operation hot
    # path, and a shared helper costs one more Python call per operation.

    def read(self, fd: int, buffer: Any, offset: int = -1) -> ReadOperation:
        """Queue a read of up to ``len(buffer)`` bytes from ``fd`` into ``buffer``.

        ``buffer`` is a writable ``bytearray``, ``array.array``, ``mmap`` or a contiguous
        ``memoryview`` of one; it stays pinned (cannot be resized, closed or released) until
        the final CQE.  ``bytes``, other read-only objects and exporters that could move their
        memory anyway (ctypes arrays, ...) raise ``TypeError``.  ``offset=-1`` reads at the file
        position and advances it.  The result is the number of bytes read.
        """
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            if not self._sup[_OP_READ]:
                self._unsupported(_OP_READ)
            if offset < -1:
                raise ValueError(f"offset must be >= 0, or -1 for the file position; got {offset}")
            if type(buffer) is not bytearray:
                if type(buffer) in _LIBRARY_BUFFERS:
                    return self._read_buffer(fd, buffer, offset)  # type: ignore[no-any-return]
                _pinning.check_exporter(buffer, True)
            try:
                pin = _from_buffer("char[]", buffer, True)
            except (TypeError, BufferError) as exc:
                raise _pinning.not_writable(buffer, exc) from None
            n = len(pin)
            if n > _MAX_LEN:
                _pinning.check_len(n)
            sqe_flags = 0
            if type(fd) is not int:
                fd, sqe_flags = self._fd(fd)
            ud = self._next_ud
            self._next_ud = ud + 1
            op = _new_op(ReadOperation, self, pin, ud)
            self._registry[ud] = op
            try:
                rc = lib.sr_prep(self._c, ud, _OP_READ, fd, pin, n, offset, 0, sqe_flags)
                if rc < 0:
                    self._prep_retry(ud, rc, lib.sr_prep, self._c, ud, _OP_READ, fd, pin, n,
                                     offset, 0, sqe_flags)
            except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
                raise self._unregister_if_unprepared(ud, exc) from None
            return op
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    def write(self, fd: int, data: Any, offset: int = -1) -> WriteOperation:
        """Queue a write of ``data`` (``bytes``, ``bytearray``, ``array.array``, ``mmap`` or a
        contiguous ``memoryview`` of one) to ``fd``.

        ``offset=-1`` writes at the file position.  The result is the number of bytes written.
        """
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            if not self._sup[_OP_WRITE]:
                self._unsupported(_OP_WRITE)
            if offset < -1:
                raise ValueError(f"offset must be >= 0, or -1 for the file position; got {offset}")
            if type(data) is not bytes:
                if type(data) is Buffer:
                    return self._write_buffer(fd, data, offset)  # type: ignore[no-any-return]
                _pinning.check_exporter(data, False)
            try:
                pin = _from_buffer(data)
            except (TypeError, BufferError) as exc:
                raise _pinning.not_readable(data, exc) from None
            n = len(pin)
            if n > _MAX_LEN:
                _pinning.check_len(n)
            sqe_flags = 0
            if type(fd) is not int:
                fd, sqe_flags = self._fd(fd)
            ud = self._next_ud
            self._next_ud = ud + 1
            op = _new_op(WriteOperation, self, pin, ud)
            self._registry[ud] = op
            try:
                rc = lib.sr_prep(self._c, ud, _OP_WRITE, fd, pin, n, offset, 0, sqe_flags)
                if rc < 0:
                    self._prep_retry(ud, rc, lib.sr_prep, self._c, ud, _OP_WRITE, fd, pin, n,
                                     offset, 0, sqe_flags)
            except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
                raise self._unregister_if_unprepared(ud, exc) from None
            return op
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    def send(self, fd: Any, data: Any, flags: int = 0) -> IntOperation:
        """Queue a ``send`` of ``data`` (``MSG_*`` flags); the result is the bytes sent.

        ``data`` may be a :class:`~saferring.Buffer` (its filled bytes), ``IN_FLIGHT`` until
        the send ends."""
        if type(data) is not bytes or type(fd) is not int or flags:
            return NetOps.send(self, fd, data, flags)
        # The hot case written out, like read() and write(): bytes to a plain descriptor, which
        # is what the asyncio transports send for every write().
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            if not self._sup[_OP_SEND]:
                self._unsupported(_OP_SEND)
            if not _MIN_FD <= fd <= _MAX_FD:
                raise ValueError(f"fd must fit a 32-bit int, got {fd}")
            pin = _from_buffer(data)
            n = len(pin)
            if n > _MAX_LEN:
                _pinning.check_len(n)
            ud = self._next_ud
            self._next_ud = ud + 1
            op = _new_op(PathOperation, self, pin, ud)
            op._label = "send"
            op._path = op._path2 = None
            self._registry[ud] = op
            try:
                rc = lib.sr_prep(self._c, ud, _OP_SEND, fd, pin, n, 0, 0, 0)
                if rc < 0:
                    self._prep_retry(ud, rc, lib.sr_prep, self._c, ud, _OP_SEND, fd, pin, n, 0, 0, 0)
            except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
                raise self._unregister_if_unprepared(ud, exc) from None
            return op
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    # -- batches -----------------------------------------------------------------------------

    def _batch(self, count: int, kind: str, pins: Any, prep: Any, *args: Any) -> BatchOperation:
        """Register one BatchOperation for ``count`` SQEs and prepare them in C.

        ``prep(c, batch, n, *args)`` prepares up to n more members (C keeps the count in
        ``batch.prepared``); the rest are retried after reaping.  If preparing stops for good
        (the kernel refuses, or an exception arrives), the unprepared members are settled with
        an error and the prepared ones run to their CQEs as usual: the batch still ends exactly
        once, and never before the kernel is done with its memory.
        """
        if count > _MAX_BATCH:
            raise ValueError(f"a batch holds at most {_MAX_BATCH} operations, got {count}")
        batch = ffi.new("sr_batch *", {"res": count})  # results inline (flexible array member)
        ud = self._next_ud
        self._next_ud = ud + 1
        op = _new_op(BatchOperation, self, (pins, batch), ud)
        op._out = batch
        op.member_kind = kind
        c = self._c
        registry = self._registry
        registry[ud] = op
        try:
            rc = lib.sr_batch_begin(c, batch, ud, count)
            if rc == -errno.EBUSY:
                rc = self._wait_for_batch_slot(batch, ud, count)
            if rc < 0:
                raise _enter_error(-rc, f"no batch slot: {_BATCH_TABLE} batches are in flight")
            if prep(c, batch, count, *args) != count:
                self._prep_batch_rest(batch, count, prep, args)
        except BaseException as exc:
            # What to undo is read from C, not from Python variables: an exception can arrive
            # right after a C call returned, before Python recorded what it did.
            if batch.n == 0:
                registry.pop(ud, None)  # never entered the C batch table: nothing to undo
            else:
                # Settle the members that were never prepared.  If that ends the batch, it has
                # no CQE to come: the next reap finishes it (_recover), so no exception between
                # here and there can strand it in the registry.
                # No call before C settles the batch (a call is where a signal handler can raise
                # again): the empty backlog is a constant, and += extends the list in place
                # without a call instruction.  Once both are set, an interruption anywhere
                # leaves the batch where _recover finds it.
                if self._backlog is None:
                    self._backlog = ()
                self._abandoned += (op,)
                if lib.sr_batch_abandon(c, batch, -errno.ECANCELED) and op._res is None:
                    op._res = batch.first_error or count  # best effort; _recover otherwise
                    self._finish(op)
            if isinstance(exc, OverflowError):
                raise ValueError(f"an argument is out of range for the kernel ABI: {exc}") from None
            raise
        return op

    def _wait_for_batch_slot(self, batch: Any, ud: int, count: int) -> int:
        """Every slot of the C batch table is in flight: reap for up to about a second."""
        rc = -errno.EBUSY
        for _ in range(100):
            self._make_room()
            rc = lib.sr_batch_begin(self._c, batch, ud, count)
            if rc != -errno.EBUSY:
                break
        return int(rc)

    def _prep_batch_rest(self, batch: Any, count: int, prep: Any, args: Any) -> None:
        """The SQ (or the kernel) did not take the whole batch at once: reap and go on."""
        # Give up only after many reaps in a row that let no SQE in: a long batch on a tiny
        # ring (or one held to the CQ's size before 5.5) needs a reap per few SQEs, and that
        # is progress, not failure.
        failures = 0
        while batch.prepared < count:
            rc = prep(self._c, batch, count - batch.prepared, *args)
            if rc > 0:
                failures = 0
                continue
            failures += 1
            if -rc not in _RETRYABLE or failures > 1000:
                raise _enter_error(-rc, f"only {batch.prepared} of the batch's {count} SQEs "
                                        "could be queued (those complete as usual)")
            self._make_room()

    @_exclusive
    def nop_many(self, count: int) -> BatchOperation:
        """Queue ``count`` no-ops as one :class:`BatchOperation` (one call into C).

        Its result is a list of ``count`` zeros.
        """
        return self._batch(_count(count), "nop", None, lib.sr_prep_nops)

    @_exclusive
    def read_many(self, fd: int, buffer: Any, offsets: Any, block_size: int) -> BatchOperation:
        """Queue one read per offset as one :class:`BatchOperation` (one call into C).

        Read ``i`` fills ``buffer[i * block_size:(i + 1) * block_size]`` from file offset
        ``offsets[i]``, so ``buffer`` must hold ``len(offsets) * block_size`` bytes.  The whole
        buffer stays pinned until the last read's final CQE.  The result is the list of byte
        counts, in the order of ``offsets``.  ``offsets`` is a sequence of ints; an
        ``array.array("Q")`` is taken without conversion (the fastest form).
        """
        return self._rw_many(_OP_READ, fd, buffer, offsets, block_size, writable=True)

    @_exclusive
    def write_many(self, fd: int, data: Any, offsets: Any, block_size: int) -> BatchOperation:
        """Queue one write per offset as one :class:`BatchOperation` (one call into C).

        Write ``i`` writes ``data[i * block_size:(i + 1) * block_size]`` at file offset
        ``offsets[i]``.  The result is the list of byte counts.
        """
        return self._rw_many(_OP_WRITE, fd, data, offsets, block_size, writable=False)

    def _rw_many(self, opcode: int, fd: int, buffer: Any, offsets: Any, block_size: int,
                 writable: bool) -> BatchOperation:
        if not self._sup[opcode]:
            self._unsupported(opcode)
        if type(buffer) is bytearray and writable:
            try:
                pin = _from_buffer("char[]", buffer, True)
            except BufferError as exc:
                raise _pinning.not_writable(buffer, exc) from None
        else:
            pin = _pinning.writable(buffer) if writable else _pinning.readable(buffer)
        if type(fd) is not int:
            fd = _pinning.index(fd, "fd")
        if not _MIN_FD <= fd <= _MAX_FD:
            # Checked here, not by cffi: the batch is in C's table before the first prep call.
            raise ValueError(f"fd must fit a 32-bit int, got {fd}")
        if type(block_size) is not int:
            block_size = _pinning.index(block_size, "block_size")
        if not 1 <= block_size <= _MAX_LEN:
            raise ValueError(f"block_size must be between 1 and {_MAX_LEN}, got {block_size}")
        offsets = _pinning.offsets_array(offsets)
        # Read while the SQEs are prepared (they copy the values): needs no pin beyond this call.
        offs = _from_buffer("uint64_t[]", offsets)
        count = len(offs)
        if not count:
            raise ValueError("offsets is empty: a batch needs at least one operation")
        if count * block_size > len(pin):
            raise ValueError(f"{count} blocks of {block_size} bytes need {count * block_size} "
                             f"bytes, but the buffer holds {len(pin)}")
        return self._batch(count, "read" if writable else "write", pin, lib.sr_prep_rw_blocks,
                           opcode, fd, pin, block_size, offs)

    # -- the other operations ----------------------------------------------------------------

    @_exclusive
    def readv(self, fd: int, buffers: Any, offset: int = -1) -> ReadvOperation:
        """Queue a vectored read into a sequence of writable buffers (filled in order)."""
        self._require(_OP_READV)
        _check_offset(offset)
        fd, sqe_flags = self._fd(fd)
        vec, pins = _pinning.iovecs(buffers, _pinning.writable)
        op = _new_op(ReadvOperation, self, (vec, pins), self._take_ud())
        return self._queue_ext(op, _OP_READV, fd, _addr(vec), len(pins), offset,  # type: ignore[no-any-return]
                               sqe_flags=sqe_flags)

    @_exclusive
    def writev(self, fd: int, buffers: Any, offset: int = -1) -> WritevOperation:
        """Queue a vectored write of a sequence of bytes-like objects (written in order)."""
        self._require(_OP_WRITEV)
        _check_offset(offset)
        fd, sqe_flags = self._fd(fd)
        vec, pins = _pinning.iovecs(buffers, _pinning.readable)
        op = _new_op(WritevOperation, self, (vec, pins), self._take_ud())
        return self._queue_ext(op, _OP_WRITEV, fd, _addr(vec), len(pins), offset,  # type: ignore[no-any-return]
                               sqe_flags=sqe_flags)

    @_exclusive
    def fsync(self, fd: int, *, datasync: bool = False) -> FsyncOperation:
        """Queue an ``fsync`` (or ``fdatasync`` with ``datasync=True``) of ``fd``."""
        self._require(_OP_FSYNC)
        flags = lib.IORING_FSYNC_DATASYNC if datasync else 0
        fd, sqe_flags = self._fd(fd)
        op = _new_op(FsyncOperation, self, None, self._take_ud())
        return self._queue_ext(op, _OP_FSYNC, fd, op_flags=flags,  # type: ignore[no-any-return]
                               sqe_flags=sqe_flags)

    @_exclusive
    def openat(self, path: Any, flags: int = os.O_RDONLY, mode: int = 0o644, *,
               dir_fd: int | None = None) -> OpenOperation:
        """Queue an ``openat``; the result is the new file descriptor (yours to close).

        As with :func:`os.open`, the descriptor is non-inheritable (``O_CLOEXEC`` is added).
        ``path`` is str, bytes or path-like, relative to ``dir_fd`` (default: the working
        directory).  A failure raises the matching ``OSError`` with ``filename`` set.
        """
        self._require(_OP_OPENAT)
        cpath = _pinning.path(path)
        dfd = lib.AT_FDCWD if dir_fd is None else dir_fd
        flags = _pinning.index(flags, "flags") | os.O_CLOEXEC
        op = _new_op(OpenOperation, self, cpath, self._take_ud())
        op._path = path
        return self._queue(op, _OP_OPENAT, dfd, cpath, mode, 0, flags)  # type: ignore[no-any-return]

    @_exclusive
    def close_fd(self, fd: int) -> CloseOperation:
        """Queue a ``close`` of ``fd`` (for a registered file, see :meth:`close_direct`)."""
        self._require(_OP_CLOSE)
        if isinstance(fd, FixedFile):
            raise TypeError("close_fd() closes a descriptor; use close_direct() for a FixedFile")
        fd, _ = self._fd(fd)
        op = _new_op(CloseOperation, self, None, self._take_ud())
        return self._queue(op, _OP_CLOSE, fd, ffi.NULL, 0, 0, 0)  # type: ignore[no-any-return]

    @_exclusive
    def statx(self, path: Any, *, dir_fd: int | None = None,
              follow_symlinks: bool = True) -> StatxOperation:
        """Queue a ``statx``; the result is a :class:`StatxResult` (``os.stat_result`` names).

        ``path`` may also be an open file descriptor (an ``int``), which stats that file.
        """
        self._require(_OP_STATX)
        flags = 0 if follow_symlinks else lib.AT_SYMLINK_NOFOLLOW
        if isinstance(path, int) and not isinstance(path, bool):
            if dir_fd is not None:
                raise ValueError("statx(fd) takes no dir_fd")
            dfd, cpath = path, _pinning.path(b"")
            flags |= lib.AT_EMPTY_PATH
        else:
            dfd = lib.AT_FDCWD if dir_fd is None else dir_fd
            cpath = _pinning.path(path)
        out = ffi.new("struct statx *")
        op = _new_op(StatxOperation, self, (cpath, out), self._take_ud())
        op._out = out
        op._path = path
        mask = lib.STATX_BASIC_STATS | lib.STATX_BTIME
        addr = int(ffi.cast("uintptr_t", out))
        return self._queue(op, _OP_STATX, dfd, cpath, mask, addr, flags)  # type: ignore[no-any-return]

    # -- cancellation ------------------------------------------------------------------------

    @_exclusive
    def _cancel(self, op: Operation[Any]) -> None:
        if op._ring is not self:
            raise OperationStateError("the operation belongs to another ring")
        if op._res is not None:
            raise OperationStateError(f"cannot cancel {op._what()}: it already ended "
                                      f"({op.state.value})")
        if op.cancel_requested:
            raise OperationStateError(f"cancel() was already requested for {op._what()}")
        if op.user_data not in self._registry:
            raise OperationStateError(f"{op._what()} was never submitted on this ring")
        if self._chain is not None:
            raise _enter_error(errno.EINPROGRESS, "")
        self._require(_OP_CANCEL)
        op._cancel = True
        self._cancelled.add(op.user_data)
        self._queue_cancel(op)
        self._submit()

    def _queue_cancel(self, op: Operation[Any]) -> None:
        if getattr(op, "_starved", False):  # waiting for a buffer: nothing in the kernel
            self._finish_starved(op)
            return
        if isinstance(op, BatchOperation):
            for member in op._member_user_data():
                self._queue_cancel_ud(op, member)
            return
        self._queue_cancel_ud(op, op.user_data)

    def _queue_cancel_ud(self, op: Operation[Any], target: int) -> None:
        if self._drained:
            # A cancel SQE would wait behind the drained chain, which waits for the very
            # operations being cancelled: cancel through io_uring_register instead.
            rc = lib.sr_sync_cancel(self._c, target, -1, 0)
            if rc >= 0 or -rc in (errno.ENOENT, errno.EALREADY, errno.ETIME, errno.EINTR):
                return
            raise _enter_error(-rc, "IORING_REGISTER_SYNC_CANCEL")
        ud = self._next_ud
        self._next_ud = ud + 1
        self._internal[ud] = CancelRequest(op)
        try:
            rc = lib.sr_prep_cancel(self._c, ud, target, 0)
            if rc < 0:
                self._prep_retry(ud, rc, lib.sr_prep_cancel, self._c, ud, target, 0)
        except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
            raise self._unregister_if_unprepared(ud, exc) from None

    # -- submission and completion -----------------------------------------------------------

    @_exclusive
    def submit(self) -> int:
        """Hand every queued SQE to the kernel; return how many it took."""
        return self._submit()

    def _submit(self) -> int:
        if self._buffer_work:
            self._service_buffers()
        rc = lib.sr_submit(self._c)
        for _ in range(1000):
            if rc >= 0:
                return int(rc)
            if -rc not in _RETRYABLE:
                raise _enter_error(-rc, "io_uring_submit")
            # The kernel is holding back (CQ overflow backlog): make room, then try again.
            self._reap(0, -1)
            rc = lib.sr_submit(self._c)
        raise os_error(-rc, "io_uring_submit")

    def wait(self, min_complete: int = 1, timeout: float | None = None) -> list[Operation[Any]]:
        """Submit queued SQEs, wait for completions, and return the operations that finished.

        Returns once at least ``min_complete`` operations have finished since the last call
        (those already reaped by :meth:`run` or ``submit()`` count), or when ``timeout``
        seconds have passed (then possibly fewer, maybe none).  ``min_complete=0`` only
        collects what is already done.  Without a timeout, asking for more than could ever
        complete raises ``ValueError`` instead of blocking forever (messages from other rings
        cannot be foreseen: to block for them, pass a timeout, ``math.inf`` for none).

        The list also holds multishot operations that produced new values (they count towards
        ``min_complete``; see :meth:`MultishotOperation.take`) and :class:`ReceivedMessage`
        entries for values other rings sent with :meth:`msg_ring`.
        """
        # The guard is written out (not @_exclusive): the wrapper's call returns through a
        # point where a signal handler can raise, which would drop the returned list.
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            if self._driver is not None:
                raise self._driven("wait()")
            if type(min_complete) is not int:
                min_complete = _pinning.index(min_complete, "min_complete")
            if min_complete < 0:
                raise ValueError(f"min_complete must be >= 0, got {min_complete}")
            if timeout is None and min_complete > len(self._ready) + len(self._registry):
                self._reap(0, -1)  # messages from other rings already in the CQ count too
            if timeout is None and min_complete > len(self._ready) + len(self._registry):
                raise ValueError(
                    f"wait(min_complete={min_complete}) could never return: only "
                    f"{len(self._registry)} operations are in flight and {len(self._ready)} finished"
                )
            if timeout is None:
                timeout_ns, deadline = -1, 0.0
            else:
                timeout_ns, deadline = _deadline(timeout)
            if self._buffer_work:
                self._service_buffers()
            cap = self._cq_size
            while True:
                need = min_complete - len(self._ready)
                if need > cap:
                    need = cap
                self._reap(need if need > 0 else 0, timeout_ns)
                if len(self._ready) >= min_complete:
                    break
                if timeout_ns >= 0:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    timeout_ns = int(left * 1e9)
            ready = self._ready
            self._ready = []
            self._ready_gen += 1
            return ready
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    @_exclusive
    def _pump(self, timeout_ns: int) -> None:
        """Submit and wait for at least one CQE (or ``timeout_ns``), keeping what finished in
        the ready list for the caller's next ``wait()`` (used by iterating over a multishot
        operation, which must not take other operations' completions away)."""
        if self._driver is not None:
            raise self._driven("iterating over a multishot operation")
        if self._buffer_work:
            self._service_buffers()
        self._reap(1, timeout_ns)

    def _collect(self) -> list[Operation[Any]]:
        """Hand queued SQEs to the kernel and collect what has completed, without waiting: the
        one call an :class:`~saferring.aio.AsyncRing` drives the ring with.  Returns the ready
        list itself (the driver empties it in place, so an interrupted dispatch loses nothing)."""
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            if self._buffer_work:
                self._service_buffers()
            self._reap(0, 0)
            return self._ready
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    def _driven(self, what: str) -> OperationStateError:
        return OperationStateError(
            f"{what} on a ring driven by an AsyncRing: the event loop collects its completions; "
            "await the AsyncRing's methods (or aring.run(op)) instead")

    @_exclusive
    def run(self, op: Operation[Any]) -> Any:
        """Submit, wait until ``op`` has finished, and return ``op.result()`` (or raise it).

        Other operations that finish meanwhile are kept for the next :meth:`wait`.  A multishot
        operation finishes only when it is cancelled or fails: to collect its values as they
        come, use :meth:`wait` and ``op.take()``.
        """
        if op._ring is not self:
            raise OperationStateError("the operation belongs to another ring")
        if op._res is None and op.user_data not in self._registry:
            raise OperationStateError(f"{op._what()} was never submitted on this ring")
        if self._driver is not None and (op._state is _QUEUED or op._state is _SUBMITTED):
            raise self._driven("run()")
        while op._state is _QUEUED or op._state is _SUBMITTED:  # not op.done() (inlined)
            # (_res set without a terminal state: its recording was interrupted.  That leaves a
            # backlog, and the next _reap finishes it without waiting; without one, it is
            # finished here rather than waited for.)
            if op._res is not None and self._backlog is None:
                self._finish(op)
                continue
            if self._buffer_work:  # buffers came back: hand them over before blocking
                self._service_buffers()
            self._reap(1, -1)
        ready = self._ready
        if ready and ready[-1] is op:
            ready.pop()
        elif op in ready:
            ready.remove(op)
        return op.result()

    def _reap(self, wait_nr: int, timeout_ns: int) -> int:
        """Finish an interrupted dispatch if there is one; otherwise submit, wait for up to
        ``wait_nr`` CQEs (``timeout_ns`` < 0: no limit) and dispatch what arrived.  Returns
        how many CQEs were dispatched (1 for a finished backlog).

        Dispatching is the only place that removes the registry entry of an operation whose SQE
        reached the kernel, and so the only place its pins are released.  The CQEs were already
        taken off the CQ, so they must not be lost if an exception (a signal handler's)
        interrupts: the results are parked in ``_backlog`` before C is told it may reuse its
        arrays, and the next reap resumes them (``_recover``).  For the same reason the loop in
        ``_consume`` calls nothing before an operation is fully recorded (a call is where
        Python runs signal handlers).
        """
        if self._backlog is not None:
            self._recover()
            return 1
        c = self._c
        n = lib.sr_reap(c, wait_nr, timeout_ns, self._cq_size, self._cq_ud, self._cq_res,
                        self._cq_flags)
        if n > 0:
            if c.n_flagged:
                return self._reap_flagged(n)
            items = zip(_unpack(self._cq_ud, n), _unpack(self._cq_res, n))  # noqa: B905
            # Two stores, no call between them: from here on Python holds these CQEs.
            self._backlog = items
            c.unacked = 0
            self._consume(items)
            return int(n)
        if n < 0 and -n not in _RETRYABLE:
            raise _enter_error(-n, "io_uring_enter")
        return 0

    def _reap_flagged(self, n: int) -> int:
        """The slow path of ``_reap``: the copied CQEs include some of operations that get
        several CQEs (multishot, zero-copy), which need their flags."""
        items = zip(_unpack(self._cq_ud, n), _unpack(self._cq_res, n),  # noqa: B905
                    _unpack(self._cq_flags, n))
        self._backlog_flagged = True
        self._backlog = items
        self._c.unacked = 0
        self._consume_flagged(items)
        return n

    def _consume_flagged(self, items: Any) -> None:
        registry = self._registry
        messages = self._others
        cancelled = self._cancelled
        append = self._ready.append
        gen = self._ready_gen  # (only wait() and the asyncio driver move it, never this loop)
        # Shaped like _consume: no call before a final CQE is recorded in _res (a call is where
        # a signal handler can raise; recovery then finds the op by its _res).
        for ud, res, flags in items:
            if ud in registry:
                op = registry[ud]
                if flags & _F_MORE and ud & _UD_FLAGGED:
                    # Recorded by a builtin (deque.append) before any Python call: a signal
                    # cannot lose the value (an accepted descriptor, a send's byte count).
                    op._items.append((res, flags) if op._wants_flags else res)  # type: ignore[attr-defined]  # flagged kinds have it
                    if getattr(op, "_mark", -1) != gen:  # _list_ready, written out (hot)
                        op._mark = gen
                        append(op)
                    if op._on_arrival:  # values turned into objects while the moment is right
                        op._arrived()  # type: ignore[attr-defined]
                elif op._plain_final and not ud & _UD_FLAGGED:
                    # A one-CQE operation among multishot ones (a transport's send beside its
                    # receive): recorded inline, exactly as _consume does.
                    self._cur = op
                    op._res = res
                    if res >= 0 or -res in op._ok_errnos:
                        op._state = _COMPLETED
                    elif res == _NEG_ECANCELED or (res == _NEG_EINTR and ud in cancelled):
                        op._state = _CANCELLED
                    else:
                        op._state = _FAILED
                    del registry[ud]
                    op._pins = None
                    append(op)
                    if cancelled:
                        cancelled.discard(ud)
                else:
                    self._cur = op
                    if op._wants_flags:  # the final CQE's buffer id
                        op._last_flags = flags  # type: ignore[attr-defined]
                    op._res = res
                    self._finish(op)
            else:
                messages.append((ud, res))
                self._other_cqes()
        self._cur = None
        self._backlog = None
        self._backlog_flagged = False

    def _other_cqes(self) -> None:
        """CQEs that are no operation's: saferring's own cancel requests, and messages.

        The completion loops park them in ``_others`` with a builtin call first, so a signal
        cannot lose a message; this takes them off one at a time (each either recorded or still
        parked when an exception interrupts)."""
        others = self._others
        while others:
            item = others[0]
            if type(item) is tuple:
                ud, res = item
                request = self._internal.pop(ud, None)
                if request is not None:
                    request.res = res
                    others.popleft()
                    continue
                if not ud & _UD_MESSAGE:
                    others.popleft()  # not ours (a stale or foreign user_data): ignored
                    continue
                item = _new_op(ReceivedMessage, self, None, ud)
                item._res = res
                item._state = _COMPLETED
                others[0] = item  # from here on, a resumed loop finds the message itself
            if getattr(item, "_mark", None) is None:
                # The mark and the append have no check between them (a signal handler runs
                # only after a call returns): a marked message has been listed, exactly once.
                item._mark = self._ready_gen
                self._ready.append(item)
            others.popleft()

    def _recover(self) -> None:
        """Finish a dispatch that an exception (a signal handler's) interrupted.

        First the operation that was being recorded: an operation still in the registry whose
        ``_res`` is set has had its final CQE (``_res`` is the first thing the loop stores, and
        nothing before that store can run a handler).  Then the rest of the batch.
        """
        self._finish_orphans()
        self._other_cqes()
        if self._backlog_flagged:
            self._consume_flagged(self._backlog)
        else:
            self._consume(self._backlog)

    def _finish_orphans(self) -> None:
        """Finish operations whose end was recorded but not yet applied: ``_res`` set by an
        interrupted completion loop, or a batch whose members have all ended in C (an abandoned
        batch gets no batch CQE).  Both have nothing left in the kernel.

        Only two places can leave one: the operation a completion loop was recording when an
        exception interrupted it (``_cur``), and batches settled in C (``_abandoned``).  Both
        are checked directly: a scan of the registry could take longer than the interval
        between signals in a storm, and then never finish."""
        registry = self._registry
        op = self._cur
        if op is not None and op._res is not None and registry.get(op._ud) is op:
            self._finish(op)
        self._cur = None
        abandoned = self._abandoned
        i = len(abandoned)
        while i:
            # Every entry is looked at: one whose members are still in flight (its batch CQE
            # will come) must not hide an earlier one that C settled, which gets no CQE at all
            # and would otherwise wait for the next interruption (seen in the signal storm
            # under the emulated 6.1 kernel: two batches abandoned before a reap).
            i -= 1
            batch = abandoned[i]
            if registry.get(batch._ud) is batch:
                if batch._res is None and batch._out.remaining == 0:
                    batch._res = batch._out.first_error or batch.count
                if batch._res is None:
                    continue  # members still in flight: their CQEs end it as usual
                self._finish(batch)
            del abandoned[i]

    def _list_ready(self, op: Operation[Any]) -> None:
        """Put ``op`` in the ready list once per ``wait()`` (slow paths that may see it twice)."""
        if getattr(op, "_mark", -1) != self._ready_gen:
            op._mark = self._ready_gen
            self._ready.append(op)

    def _finish(self, op: Operation[Any]) -> None:
        """Record the end of ``op`` (its ``_res`` is set) outside the hot loop.  Listed as ready
        before it leaves the registry: if a signal interrupts in between, _finish_orphans
        finds it again, and the ready list still has it once."""
        if op._rearms and op._rearm(self):
            return  # the request goes on (re-armed, or waiting for a buffer)
        op._settle()
        res = op._res if op._res is not None else 0
        op._state = op._final_state(res) if res < 0 else _COMPLETED
        self._list_ready(op)
        if self._registry.get(op._ud) is op:
            del self._registry[op._ud]
        self._cancelled.discard(op._ud)
        op._pins = None

    def _consume(self, items: Any) -> None:
        registry = self._registry
        cancelled = self._cancelled
        append = self._ready.append
        for ud, res in items:
            if ud in registry:
                op = registry[ud]
                self._cur = op  # what _finish_orphans checks if a signal interrupts from here
                op._res = res
                # The terminal state, inline (Operation._final_state says the same).
                if res >= 0 or -res in op._ok_errnos:
                    op._state = _COMPLETED
                elif res == _NEG_ECANCELED or (res == _NEG_EINTR and ud in cancelled):
                    op._state = _CANCELLED
                else:
                    op._state = _FAILED
                del registry[ud]
                op._pins = None  # releases the buffer exports: the kernel is done with them
                append(op)
                if cancelled:
                    cancelled.discard(ud)
            else:
                self._others.append((ud, res))
                self._other_cqes()
        self._cur = None  # no reference kept: a dropped operation is freed (and its fd closed)
        self._backlog = None

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> RingStats:
        """Counters: in-flight operations, pinned bytes, SQEs submitted, CQEs reaped."""
        registry = self._registry
        return RingStats(
            in_flight=len(registry),
            pinned_bytes=_pinning.pinned_bytes(op._pins for op in list(registry.values())),
            submitted=int(self._c.n_submitted) if hasattr(self, "_c") else 0,
            completed=int(self._c.n_consumed) if hasattr(self, "_c") else 0,
        )

    def __repr__(self) -> str:
        if self._closed:
            return "<Ring closed>"
        return (f"<Ring fd={int(self._c.ring.ring_fd)} sq={int(self._c.sq_entries)} "
                f"cq={self._cq_size} in_flight={len(self._registry)}>")


# The code objects of every function that marks a ring busy: the _exclusive wrapper (shared
# by all decorated methods) and the methods that inline the same guard.
_GUARDED_CODE = frozenset({
    Ring.nop.__code__, Ring.read.__code__, Ring.write.__code__, Ring.send.__code__,
    Ring.close.__code__, Ring.wait.__code__, Ring._collect.__code__,
    Ring.submit.__code__,  # the wrapper: every @_exclusive method shares this code object
})
assert Ring.nop_many.__code__ is Ring.submit.__code__ is Ring.recv.__code__


def _count(count: int) -> int:
    count = _pinning.index(count, "count")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return count


def _setup_flags(entries: int, sqpoll: bool, sq_thread_idle: int | None, single_issuer: bool,
                 coop_taskrun: bool, defer_taskrun: bool,
                 cq_entries: int | None) -> list[tuple[str, int]]:
    """Validate Ring() arguments and return the requested IORING_SETUP_* flags, by name."""
    if isinstance(entries, bool) or not isinstance(entries, int):
        raise TypeError(f"entries must be an int, got {type(entries).__name__}")
    if not 1 <= entries <= _MAX_ENTRIES:
        raise ValueError(f"entries must be between 1 and {_MAX_ENTRIES}, got {entries}")
    if cq_entries is not None and not entries <= cq_entries <= _MAX_CQ_ENTRIES:
        raise ValueError(f"cq_entries must be between entries ({entries}) and "
                         f"{_MAX_CQ_ENTRIES}, got {cq_entries}")
    if sq_thread_idle is not None:
        if not sqpoll:
            raise ValueError("sq_thread_idle only applies with sqpoll=True")
        if not 0 <= sq_thread_idle <= 0xFFFF_FFFF:
            raise ValueError(f"sq_thread_idle is milliseconds >= 0, got {sq_thread_idle}")
    if defer_taskrun and not single_issuer:
        raise ValueError("defer_taskrun=True needs single_issuer=True (the kernel requires it)")
    if defer_taskrun and sqpoll:
        raise ValueError("defer_taskrun cannot be combined with sqpoll")
    flags: list[tuple[str, int]] = []
    if sqpoll:
        flags.append(("SQPOLL", lib.IORING_SETUP_SQPOLL))
    if single_issuer:
        flags.append(("SINGLE_ISSUER", lib.SR_SETUP_SINGLE_ISSUER))
    if coop_taskrun:
        flags.append(("COOP_TASKRUN", lib.SR_SETUP_COOP_TASKRUN))
    if defer_taskrun:
        flags.append(("DEFER_TASKRUN", lib.SR_SETUP_DEFER_TASKRUN))
    if coop_taskrun or defer_taskrun:
        # Lets the kernel flag pending task work in the SQ ring, so a non-blocking reap knows
        # when it must enter the kernel to see completions.
        flags.append(("TASKRUN_FLAG", lib.SR_SETUP_TASKRUN_FLAG))
    return flags


_FLAG_SINCE = {"SQPOLL": "5.1", "SINGLE_ISSUER": "6.0", "COOP_TASKRUN": "5.19",
               "DEFER_TASKRUN": "6.1", "TASKRUN_FLAG": "5.19", "CQSIZE": "5.5"}


def _setup_error(code: int, entries: int, requested: list[tuple[str, int]],
                 sq_thread_idle: int | None, cq_entries: int | None, *,
                 proc: str = "/proc") -> Exception:
    """The exception for a failed io_uring_setup, saying why and what to change.

    EPERM, ENOSYS and ENOMEM have several possible causes, told apart by what the system shows
    under ``proc`` (tests point it at a copy): the io_uring sysctls, this process's seccomp mode
    and capabilities, and its resource limits.  Nothing read there is trusted beyond choosing
    the words of the message; anything unreadable is left out of it.
    """
    if code == errno.EINVAL:
        if requested or cq_entries:
            return _unsupported_setup_flag(entries, requested, sq_thread_idle, cq_entries)
        return os_error(code, "io_uring_setup")
    if code not in (errno.ENOSYS, errno.EPERM, errno.ENOMEM):
        return os_error(code, "io_uring_setup")
    status = process_status(proc)
    filters = status.get("Seccomp_filters", "1")
    seccomp = (f"this process runs under {filters} seccomp filter(s) (/proc/self/status)"
               if status.get("Seccomp") == "2" else None)
    if code == errno.ENOSYS:
        return _no_io_uring_error(seccomp)
    if code == errno.EPERM:
        return _refused_error(status, seccomp, requested, proc)
    return _no_memory_error(status, entries)


def _no_io_uring_error(seccomp: str | None) -> Exception:
    """ENOSYS: no io_uring in this kernel, or a seccomp filter that pretends so."""
    if seccomp is not None:
        # A filter may answer ENOSYS for a syscall the kernel has (some container runtimes
        # do, so that programs fall back as they would on an old kernel).
        return UnsupportedPlatformError(
            f"io_uring_setup answered ENOSYS, and {seccomp}: a filter that refuses "
            "io_uring with ENOSYS is the likely cause (allow io_uring_setup, io_uring_enter "
            "and io_uring_register in its profile); otherwise this kernel has no io_uring "
            "(saferring needs Linux 5.1+ built with CONFIG_IO_URING)")
    return UnsupportedPlatformError(
        "this kernel has no io_uring (io_uring_setup: ENOSYS); saferring needs Linux 5.1+ "
        "built with CONFIG_IO_URING")


def _refused_error(status: dict[str, str], seccomp: str | None,
                   requested: list[tuple[str, int]], proc: str) -> Exception:
    """EPERM: the io_uring sysctls, a seccomp filter or a security module refused the ring."""
    # The kernel's rule (io_uring_allowed()): disabled=2 refuses everyone; disabled=1
    # admits CAP_SYS_ADMIN and members of kernel.io_uring_group (-1: no group).  A seccomp
    # filter refuses the call before the kernel looks at the sysctl, and a security module
    # can refuse it as well.
    disabled = read_proc("sys/kernel/io_uring_disabled", proc)
    group = read_proc("sys/kernel/io_uring_group", proc)
    elsewhere = (f"{seccomp}, which most likely refused it (container runtimes often block "
                 "io_uring: allow io_uring_setup, io_uring_enter and io_uring_register in the "
                 "profile)" if seccomp is not None else
                 "no seccomp filter is active, so a security module (SELinux, AppArmor...) or "
                 "another policy refused it")
    if disabled is None:
        why = ("this kernel has no sysctl kernel.io_uring_disabled (it came in Linux 6.6), "
               f"so that is not the cause; {elsewhere}")
    elif disabled == "2":
        why = ("the sysctl kernel.io_uring_disabled is 2: io_uring is disabled for every "
               "process on this system (0 allows it, 1 allows CAP_SYS_ADMIN and members of "
               "kernel.io_uring_group)")
    elif disabled == "1":
        try:
            gid = int(group) if group is not None else -1
        except ValueError:
            gid = -1
        member = gid >= 0 and (gid == os.getegid() or gid in os.getgroups())
        if has_capability(status, 21) or member:  # CAP_SYS_ADMIN
            why = ("the sysctl kernel.io_uring_disabled is 1, which admits this process "
                   f"(CAP_SYS_ADMIN, or member of kernel.io_uring_group {gid}); {elsewhere}")
        else:
            named = (f"the group kernel.io_uring_group ({gid})" if gid >= 0 else
                     "kernel.io_uring_group, which is -1 (no group)")
            why = ("the sysctl kernel.io_uring_disabled is 1: io_uring is only for processes "
                   f"with CAP_SYS_ADMIN or in {named}, and this process is neither (join "
                   "that group, or set the sysctl to 0)")
    elif disabled == "0":
        why = ("the sysctl kernel.io_uring_disabled is 0 (io_uring allowed), so that is not "
               f"the cause; {elsewhere}")
    else:
        why = f"the sysctl kernel.io_uring_disabled is {disabled!r}; {elsewhere}"
    if any(name == "SQPOLL" for name, _bit in requested):
        why += "; sqpoll on kernels before 5.11 also needs root (CAP_SYS_ADMIN)"
    return PermissionError(errno.EPERM, f"io_uring_setup was refused (EPERM): {why}")


def _no_memory_error(status: dict[str, str], entries: int) -> Exception:
    """ENOMEM: a resource limit of this process, or the system, has no memory for the ring."""
    import resource

    causes = []
    memlock = rlimit_text(resource.RLIMIT_MEMLOCK)
    if memlock is not None and has_capability(status, 14) is not True:  # CAP_IPC_LOCK
        # For processes without CAP_IPC_LOCK, kernels before 5.12 charge a ring's memory
        # to RLIMIT_MEMLOCK, and so do recent ones (6.18 refuses Ring(8) under a zero
        # limit; 6.1 does not).  The count is per user.
        causes.append(
            f"RLIMIT_MEMLOCK ({memlock}): this process lacks CAP_IPC_LOCK, and the kernel "
            "may charge the ring's memory to that limit, counted for all of this user's "
            f"processes (raise it: {RAISE_MEMLOCK})")
    address_space = rlimit_text(resource.RLIMIT_AS)
    if address_space is not None:
        causes.append(f"RLIMIT_AS ({address_space}): mapping the queues into this process "
                      "counts against it (raise it: ulimit -v)")
    what = f"io_uring_setup: no memory for a ring of {entries} entries (ENOMEM)"
    if not causes:
        return OSError(errno.ENOMEM, f"{what}: no resource limit of this process applies, "
                                     "so the system (or its memory cgroup) is short of "
                                     "memory; ask for fewer entries")
    return OSError(errno.ENOMEM, f"{what}. Limits that can refuse it here: "
                                 f"{'; '.join(causes)}. Or ask for fewer entries")


def _unsupported_setup_flag(entries: int, requested: list[tuple[str, int]],
                            sq_thread_idle: int | None, cq_entries: int | None) -> Exception:
    """EINVAL with setup flags: find which one the kernel rejects by trying each alone."""
    trial = ffi.new("sr_ring *")
    for name, bit in requested:
        extra = lib.SR_SETUP_SINGLE_ISSUER if name == "DEFER_TASKRUN" else 0
        extra |= lib.SR_SETUP_TASKRUN_FLAG if name in ("COOP_TASKRUN", "DEFER_TASKRUN") else 0
        if name == "TASKRUN_FLAG":
            continue
        rc = lib.sr_ring_init(trial, entries, bit | extra,
                              (sq_thread_idle or 0) if name == "SQPOLL" else 0, 0)
        if rc >= 0:
            lib.sr_ring_exit(trial)
            continue
        if -rc == errno.EINVAL:
            return UnsupportedOperationError(
                f"this kernel does not support IORING_SETUP_{name} (Ring({name.lower()}="
                f"True)); it came in Linux {_FLAG_SINCE.get(name, '?')}")
    if cq_entries:
        rc = lib.sr_ring_init(trial, entries, 0, 0, cq_entries)
        if rc >= 0:
            lib.sr_ring_exit(trial)
        elif -rc == errno.EINVAL:
            return UnsupportedOperationError(
                "this kernel does not support IORING_SETUP_CQSIZE (cq_entries); it came in "
                "Linux 5.5")
    return os_error(errno.EINVAL, "io_uring_setup")


def _bury(ring: Ring) -> None:
    """Keep a ring that could not be drained alive until the process ends.

    Reached only when the kernel refused to let saferring reap (e.g. a single-issuer ring
    finalised on another thread).  Freeing its pins would let the kernel write into reused
    memory, so they are leaked on purpose, and an extra reference keeps even interpreter
    shutdown from freeing them.
    """
    _graveyard.append(ring)
    import ctypes

    ctypes.pythonapi.Py_IncRef(ctypes.py_object(ring))


def _after_fork_in_child() -> None:
    for ring in list(_live_rings):
        ring._after_fork_in_child()


def _close_all_at_exit() -> None:
    me = _get_ident()
    for ring in list(_live_rings):
        if ring._closed or ring._forked:
            continue
        if ring._owner == me:
            try:
                ring.close(_FINALISER_DRAIN_SECONDS)
                continue
            except BaseException:  # noqa: BLE001 - could not drain: keep its memory
                pass
        _bury(ring)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)

__all__ = ["Ring", "RingStats", "StatxResult"]
