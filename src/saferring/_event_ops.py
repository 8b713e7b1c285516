"""Polling, timeouts, cancellation, chains, messages between rings, waitid, futexes, epoll_ctl.

Requests that *target* other requests (``timeout_remove``, ``poll_remove``, ``async_cancel``...)
name them by user_data.  saferring fills that in from the Operation object, so a caller can only
ever target an operation of this ring, never forge a user_data; and no request that would
*change* a user_data (``IORING_POLL_UPDATE_USER_DATA``) is offered, because the registry is keyed
by it.  Values sent with ``msg_ring`` land in a user_data range of their own (``UD_MESSAGE``),
so a message can never be mistaken for the final CQE of an operation in flight.
"""

from __future__ import annotations

import errno
from typing import Any

from . import _pinning
from ._binding import ffi, lib
from ._chain import Chain
from ._guard import _exclusive
from ._ops_base import OpsBase, addr_of
from .constants import FUTEX2_PRIVATE, FUTEX2_SIZE_U32, FUTEX_BITSET_MATCH_ANY
from .errors import ForkedRingError, OperationStateError, UnsupportedOperationError, os_error
from .features import OP, OPCODES, kernel_can
from .fixed import FixedFile
from .operation import (
    SEQUENCE_MASK,
    UD_MESSAGE,
    CancelOperation,
    IntOperation,
    LinkTimeoutOperation,
    MultishotOperation,
    Operation,
    PollMultishotOperation,
    PollOperation,
    PollRemoveOperation,
    TimeoutMultishotOperation,
    TimeoutOperation,
    TimeoutRemoveOperation,
    TimeoutRepeatOperation,
    WaitidOperation,
)
from .operation import new_operation as _new_op

_POLL_ADD_MULTI = 1 << 0
_POLL_UPDATE_EVENTS = 1 << 1
_TIMEOUT_ABS = 1 << 0
_TIMEOUT_UPDATE = 1 << 1
_TIMEOUT_BOOTTIME = 1 << 2
_TIMEOUT_REALTIME = 1 << 3
_LINK_TIMEOUT_UPDATE = 1 << 4
_TIMEOUT_MULTISHOT = 1 << 6
_CLOCKS = {"monotonic": 0, "boottime": _TIMEOUT_BOOTTIME, "realtime": _TIMEOUT_REALTIME}
_CANCEL_ALL = 1 << 0
_CANCEL_FD = 1 << 1
_CANCEL_ANY = 1 << 2
_CANCEL_FD_FIXED = 1 << 3
_MAX_U32 = 0xFFFF_FFFF
_MAX_MESSAGE = SEQUENCE_MASK  # values ride in the user_data below both tags
_FUTEX_SIZES = {1: 0, 2: 1, 4: FUTEX2_SIZE_U32, 8: 3}
_u32 = _pinning.u32



class EventOps(OpsBase):
    """Polling, timeouts, cancellation, chains and events (a part of :class:`~saferring.Ring`)."""

    __slots__ = ()

    def _target(self, op: Any, cls: type[Any] | tuple[type[Any], ...], what: str) -> int:
        """The user_data of ``op``, an operation of this ring of the right kind still in flight."""
        if not isinstance(op, cls):
            raise TypeError(f"{what} takes an operation returned by this ring, got "
                            f"{type(op).__name__}")
        if op._ring is not self:
            raise OperationStateError("the operation belongs to another ring")
        if op._res is not None or op._ud not in self._registry:
            raise OperationStateError(f"{op._what()} is not in flight ({op.state.value})")
        return op._ud  # type: ignore[no-any-return]

    # -- polling -----------------------------------------------------------------------------

    @_exclusive
    def poll_add(self, fd: Any, events: int, *, multishot: bool = False) -> Any:
        """Queue a ``poll`` for ``events`` (``select.POLLIN``...) on ``fd``.

        The result is the mask of ready events.  ``multishot=True`` (Linux 5.13) keeps the poll
        armed: a :class:`~saferring.operation.PollMultishotOperation` whose values are the masks.
        """
        self._require(OP["POLL_ADD"])
        fd, fixed = self._fd(fd)
        mask = lib.sr_poll_mask(_u32(events, "events"))
        if multishot:
            op: Any = _new_op(PollMultishotOperation, self, None, self._take_flagged_ud())
            return self._queue_ext(op, OP["POLL_ADD"], fd, 0, _POLL_ADD_MULTI, 0, mask, fixed)
        op = _new_op(PollOperation, self, None, self._take_ud())
        return self._queue_ext(op, OP["POLL_ADD"], fd, 0, 0, 0, mask, fixed)

    @_exclusive
    def poll_remove(self, op: Operation[Any]) -> PollRemoveOperation:
        """Queue removal of a poll (``poll_add``'s operation), which then ends CANCELLED.

        The result is 1 if the poll was found, 0 if it had already completed.
        """
        self._require(OP["POLL_REMOVE"])
        target = self._target(op, (PollOperation, PollMultishotOperation), "poll_remove()")
        req = _new_op(PollRemoveOperation, self, None, self._take_ud())
        return self._queue_ext(req, OP["POLL_REMOVE"], -1, target)  # type: ignore[no-any-return]

    @_exclusive
    def poll_update(self, op: Operation[Any], events: int) -> PollRemoveOperation:
        """Queue a change of the events an armed poll waits for (Linux 5.13).

        The result is 1 if the poll was found and updated, 0 if it had already completed.
        """
        self._require(OP["POLL_REMOVE"])
        target = self._target(op, (PollOperation, PollMultishotOperation), "poll_update()")
        mask = lib.sr_poll_mask(_u32(events, "events"))
        flags = _POLL_UPDATE_EVENTS
        if isinstance(op, PollMultishotOperation):
            flags |= _POLL_ADD_MULTI  # keep it multishot (the update re-arms it as asked)
        req = _new_op(PollRemoveOperation, self, None, self._take_ud())
        return self._queue_ext(req, OP["POLL_REMOVE"], -1, target, flags, 0, mask)  # type: ignore[no-any-return]

    # -- timeouts ----------------------------------------------------------------------------

    @_exclusive
    def timeout(self, seconds: float, *, count: int = 0, absolute: bool = False,
                clock: str = "monotonic", multishot: bool = False) -> Any:
        """Queue a timeout; it completes (result ``None``) once ``seconds`` have passed.

        ``count=n`` also completes it once ``n`` other operations have completed, whichever
        comes first.  ``absolute=True`` reads ``seconds`` as a time on ``clock``
        (``"monotonic"``, as :func:`time.monotonic`; ``"boottime"``; ``"realtime"``, as
        :func:`time.time`).  ``multishot=True`` (Linux 6.4) fires every ``seconds``, ``count``
        times (0: until cancelled): a :class:`~saferring.operation.TimeoutMultishotOperation`.
        Before 6.4 the library re-arms a single-shot timeout at each expiry instead
        (``op.single_shot`` is True; the ticks then drift by the reaping delay).
        """
        self._require(OP["TIMEOUT"])
        ts = _pinning.timespec(seconds)
        count = _u32(count, "count")
        try:
            flags = _CLOCKS[clock]
        except (KeyError, TypeError):
            raise ValueError(f"clock must be one of {sorted(_CLOCKS)}, got {clock!r}") from None
        if absolute:
            flags |= _TIMEOUT_ABS
        if multishot:
            if absolute:
                raise ValueError("a multishot timeout is relative (absolute=False)")
            if not kernel_can("TIMEOUT_MULTISHOT"):
                # Before 6.4: a single-shot timeout, armed again by the library at each expiry.
                rep: Any = _new_op(TimeoutRepeatOperation, self, ts, self._take_flagged_ud())
                rep._args = (addr_of(ts), flags)
                rep._left = count if count else -1
                rep._rstate = 0
                rep._starved = False
                return self._queue_ext(rep, OP["TIMEOUT"], -1, addr_of(ts), 1, 0, flags)
            op: Any = _new_op(TimeoutMultishotOperation, self, ts, self._take_flagged_ud())
            return self._queue_ext(op, OP["TIMEOUT"], -1, addr_of(ts), 1, count,
                                   flags | _TIMEOUT_MULTISHOT)
        op = _new_op(TimeoutOperation, self, ts, self._take_ud())
        return self._queue_ext(op, OP["TIMEOUT"], -1, addr_of(ts), 1, count, flags)

    def _rearm_timeout(self, op: TimeoutRepeatOperation) -> bool:
        """A single-shot expiry of a repeating timeout (see ``BufferOps._rearm_select`` for why
        the steps are in this order: recovery may run this twice for one CQE)."""
        if op._res != -errno.ETIME or op.cancel_requested or self._closed:
            return False
        if not op._rstate:
            self._list_ready(op)
            op._rstate = 1
            op._left -= op._left > 0
            op._items.append(0)
        if op._left == 0:
            return False  # that was the last expiry: _settle ends it COMPLETED
        if self._chain is not None:  # an SQE now would join the caller's open chain
            return self._defer_rearm(op)
        addr, flags = op._args
        op._res = None
        op._rstate = 0
        rc = lib.sr_prep_ext(self._c, op._ud, OP["TIMEOUT"], -1, addr, 1, 0, flags, 0, 0, 0, 0,
                             0, 0)
        if rc < 0:
            op._res = rc  # the SQ would not take it (the ring is going away): end with that
            return False
        return True

    @_exclusive
    def timeout_remove(self, op: Operation[Any]) -> TimeoutRemoveOperation:
        """Queue removal of a pending timeout, which then ends CANCELLED.

        The result is 1 if it was found, 0 if it had already fired (``already_running`` is True
        when it was firing at that moment).
        """
        self._require(OP["TIMEOUT_REMOVE"])
        target = self._target(op, (TimeoutOperation, TimeoutMultishotOperation),
                              "timeout_remove()")
        req = _new_op(TimeoutRemoveOperation, self, None, self._take_ud())
        return self._queue_ext(req, OP["TIMEOUT_REMOVE"], -1, target)  # type: ignore[no-any-return]

    @_exclusive
    def timeout_update(self, op: Operation[Any], seconds: float, *,
                       absolute: bool = False) -> TimeoutRemoveOperation:
        """Queue a new expiry for a pending timeout or link timeout (Linux 5.11).

        The result is 1 if it was found and updated, 0 if it had already fired.
        """
        self._require(OP["TIMEOUT_REMOVE"])
        target = self._target(op, (TimeoutOperation, TimeoutMultishotOperation,
                                   LinkTimeoutOperation), "timeout_update()")
        ts = _pinning.timespec(seconds)
        # The kernel takes the update path only with IORING_TIMEOUT_UPDATE; the link flag then
        # says which kind of timeout to look for.
        flags = _TIMEOUT_UPDATE | (_LINK_TIMEOUT_UPDATE if isinstance(op, LinkTimeoutOperation) else 0)
        if absolute:
            flags |= _TIMEOUT_ABS
        req = _new_op(TimeoutRemoveOperation, self, ts, self._take_ud())
        return self._queue_ext(req, OP["TIMEOUT_REMOVE"], -1, target, 0, addr_of(ts),  # type: ignore[no-any-return]
                               flags)

    @_exclusive
    def link_timeout(self, op: Operation[Any], seconds: float, *,
                     absolute: bool = False) -> LinkTimeoutOperation:
        """Queue a timeout that cancels ``op`` if it has not finished within ``seconds``.

        ``op`` must be the operation queued just before, not yet submitted (call this right
        after creating it, inside or outside a chain).  ``op`` then ends CANCELLED if the timeout
        fired.  The result is True if the timeout fired, False if ``op`` finished first.
        Inside a chain, older kernels may not arm it: Linux 6.1 ignores a link timeout on a
        member that a completed read started (docs/operations.md).
        """
        self._require(OP["LINK_TIMEOUT"])
        target = self._target(op, Operation, "link_timeout()")
        if isinstance(op, MultishotOperation):
            raise TypeError("link_timeout() cannot time a multishot operation (the kernel does "
                            "not arm it); cancel it instead")
        ts = _pinning.timespec(seconds)
        req = _new_op(LinkTimeoutOperation, self, ts, self._take_ud())
        ud = req._ud
        self._registry[ud] = req
        try:
            rc = lib.sr_prep_link_timeout(self._c, ud, target, ts,
                                          _TIMEOUT_ABS if absolute else 0)
        except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
            raise self._unregister_if_unprepared(ud, exc) from None
        if rc < 0:
            del self._registry[ud]
            if rc == -errno.ESRCH:
                raise OperationStateError(
                    f"link_timeout() must follow its operation directly: {op._what()} is not the "
                    "newest queued operation, or it was already submitted")
            if rc == -errno.ENOSPC:
                raise OperationStateError(
                    "the submission queue is full right behind the operation; submitting it "
                    "would send it without its timeout. Use a larger ring or submit earlier")
            raise os_error(-rc, "link_timeout")
        return req

    # -- cancellation --------------------------------------------------------------------------

    def _cancel_request(self, target: int, flags: int, fd: int = -1,
                        counting: bool = False) -> CancelOperation:
        self._require(OP["ASYNC_CANCEL"])
        if self._chain is not None:
            raise OperationStateError("a chain is open: close it before cancelling")
        req = _new_op(CancelOperation, self, None, self._take_ud())
        req._counting = counting
        return self._queue_ext(req, OP["ASYNC_CANCEL"], fd, target, 0, 0, flags)  # type: ignore[no-any-return]

    @_exclusive
    def async_cancel(self, op: Operation[Any]) -> CancelOperation:
        """Queue a cancel request for ``op`` and return it, to see how the kernel answered.

        Unlike ``op.cancel()``, the request is an operation of its own: its result is 1 if the
        kernel found ``op`` (it ends CANCELLED), 0 if not (``-ENOENT``: it had completed), and
        ``already_running`` tells of ``-EALREADY`` (``op`` was executing: it may still finish
        normally).  ``op`` keeps its buffers until its own final CQE either way.
        """
        target = self._target(op, Operation, "async_cancel()")
        if getattr(op, "member_kind", None) is not None:
            raise TypeError("async_cancel() targets one request; cancel a batch with op.cancel()")
        if op.cancel_requested:
            raise OperationStateError(f"cancel() was already requested for {op._what()}")
        request = self._cancel_request(target, 0)  # checks (chain, support) before marking
        op._cancel = True
        self._cancelled.add(target)
        return request

    @_exclusive
    def cancel_fd(self, fd: Any, *, all: bool = True) -> CancelOperation:
        """Queue a cancel of the requests on ``fd`` (Linux 5.19); ``all=False``: only the first.

        The result is how many were found (0 if none).  Each ends with its own final CQE.  With
        ``all=True``, receives on ``fd`` that wait for a buffer to come back (nothing of them is
        in the kernel) end at once, CANCELLED, and are not counted.
        """
        fd, fixed = self._fd(fd)
        flags = _CANCEL_FD | (_CANCEL_ALL if all else 0) | (_CANCEL_FD_FIXED if fixed else 0)
        request = self._cancel_request(0, flags, fd, counting=all)
        if all and not fixed:
            self._cancel_waiting(fd)
        return request

    @_exclusive
    def cancel_all(self) -> CancelOperation:
        """Queue a cancel of every request in flight (Linux 5.19); the result is how many.

        (This is the kernel's ``IORING_ASYNC_CANCEL_ANY``, which matches every request; there
        is no "cancel just one of them".)  Requests that wait for a buffer to come back (a
        receive whose buffer ring ran dry: nothing of it is in the kernel) end at once, CANCELLED,
        and are not counted."""
        request = self._cancel_request(0, _CANCEL_ANY | _CANCEL_ALL, counting=True)
        self._cancel_waiting(None)
        return request

    # -- chains ----------------------------------------------------------------------------

    def chain(self, *, hard: bool = False, drain: bool = False) -> Chain:
        """A context manager: the operations queued inside ``with ring.chain():`` are linked.

        Each starts only once the previous one has completed; if one fails, the rest end
        CANCELLED (``-ECANCELED``).  For the kernel a short read, write, send or recv (fewer
        bytes than asked) is a failure too.  ``hard=True`` links with ``IOSQE_IO_HARDLINK``: the chain
        goes on after failures, a cancelled request's included (``cancel()`` and ``close()``
        stop the request they reach, not the ones linked behind it; those still run, their
        memory pinned as usual).  ``drain=True`` makes the chain
        wait for every request submitted before it (``IOSQE_IO_DRAIN``).  Nothing can be
        submitted or waited for while the chain is open.  The chain must fit in the submission
        queue: requests queued before it are handed to the kernel when it needs their room, and
        a chain longer than the queue raises ``ValueError``.  See :mod:`saferring._chain`.
        """
        return Chain(self, hard, drain)  # type: ignore[arg-type]

    @_exclusive
    def _open_chain(self, chain: Chain) -> None:
        if self._chain is not None:
            raise OperationStateError("a chain is already open on this ring (chains do not nest)")
        if chain.drain and not kernel_can("SYNC_CANCEL"):
            # Everything queued after a drained request waits for everything before it, cancel
            # requests included; without IORING_REGISTER_SYNC_CANCEL (6.0) close() could wait
            # forever for an earlier request that never ends on its own.
            raise UnsupportedOperationError(
                "chain(drain=True) needs Linux 6.0 (IORING_REGISTER_SYNC_CANCEL), so that "
                "close() and cancel() can reach requests queued before the drain")
        flag = lib.IOSQE_IO_HARDLINK if chain.hard else lib.IOSQE_IO_LINK
        rc = lib.sr_chain_begin(self._c, flag, 1 if chain.drain else 0)
        if rc < 0:
            raise os_error(-rc, "chain")
        chain._first_ud = self._next_ud
        chain._state = "open"
        self._chain = chain
        if chain.drain:
            self._use_sync_cancel()  # from now on cancel() and close() cancel synchronously

    @_exclusive
    def _close_chain(self, chain: Chain) -> None:
        if self._chain is chain:
            self._chain = None
            chain._closed_by_ring()
            lib.sr_chain_end(self._c)

    # -- messages between rings ------------------------------------------------------------

    @_exclusive
    def msg_ring(self, target: Any, value: int, res: int = 0) -> IntOperation:
        """Queue a ``MSG_RING``: post a completion carrying ``value`` and ``res`` to ``target``
        (a :class:`~saferring.Ring` of this process, or its ``fd``; Linux 5.18).  Any other
        descriptor raises ``ValueError``: a ring saferring does not own might read the posted
        user_data as a pointer.

        The target's :meth:`~saferring.Ring.wait` returns it as a
        :class:`~saferring.operation.ReceivedMessage`.  ``value`` is 0 to 2**61-1 (it travels in
        a user_data range saferring reserves for messages), ``res`` a 32-bit signed int.  This
        operation's result is 0.  A target ring that is closed raises
        :class:`~saferring.OperationStateError`; one closed after the request was queued loses
        the message (it never reaches a ring that reuses the descriptor number).  A forked
        parent's ring raises :class:`~saferring.ForkedRingError`.
        """
        self._require(OP["MSG_RING"])
        # Only saferring rings of this process: another io_uring user might take the posted
        # user_data for a pointer of its own.
        from .ring import Ring, _live_rings

        if isinstance(target, FixedFile):
            raise TypeError("msg_ring() targets a Ring or a ring's descriptor, not a FixedFile")
        if not isinstance(target, Ring):
            fd = _pinning.index(target, "target")
            found = [r for r in list(_live_rings) if not r._closed and r._c.ring.ring_fd == fd]
            if not found:
                raise ValueError(f"descriptor {fd} is not an open saferring Ring of this process")
            target = found[0]
        if target._closed:
            raise OperationStateError("the target ring is closed")
        if target._forked:
            # The parent's ring: a child posting into it would hand the parent completions it
            # never asked for (only close() is allowed on a forked ring).
            raise ForkedRingError("the target ring belongs to the parent process; a forked "
                                  "child must not post to it")
        fd = int(target._c.ring.ring_fd)
        value = _pinning.index(value, "value")
        if not 0 <= value <= _MAX_MESSAGE:
            raise ValueError(f"value must be between 0 and 2**61-1, got {value}")
        res = _pinning.index(res, "res")
        if not -(1 << 31) <= res < 1 << 31:
            raise ValueError(f"res must be a 32-bit signed int, got {res}")
        # The request names the target by descriptor, resolved when the kernel runs it: hold a
        # duplicate, so that if the target is closed meanwhile and its number reused by another
        # ring, the message still goes to the ring it was meant for (which nobody reads).
        owned = _pinning.OwnedFd(fd)
        op = self._plain_op("msg_ring", owned)
        # addr = IORING_MSG_DATA (0); len carries res, off the target's user_data.
        return self._queue_ext(op, OP["MSG_RING"], owned.fd, 0, res & _MAX_U32,  # type: ignore[no-any-return]
                               UD_MESSAGE | value)

    # -- processes, futexes, epoll ---------------------------------------------------------

    @_exclusive
    def waitid(self, idtype: int, id: int, options: int) -> WaitidOperation:
        """Queue a ``waitid`` (Linux 6.7; ``os.P_PID``..., ``os.WEXITED``...).

        The result is a :class:`~saferring.operation.WaitidResult`, like :func:`os.waitid`'s.
        """
        self._require(OP["WAITID"])
        out = ffi.new("char[]", lib.SR_SIGINFO_SIZE)
        op = _new_op(WaitidOperation, self, out, self._take_ud())
        op._out = out
        return self._queue_ext(op, OP["WAITID"], _pinning.index(id, "id"), 0,  # type: ignore[no-any-return]
                               _u32(idtype, "idtype"), addr_of(out),
                               file_index=_u32(options, "options"))

    def _futex_word(self, buffer: Any, offset: int, size: int) -> tuple[Any, int]:
        pin = _pinning.writable(buffer)
        offset = _pinning.index(offset, "offset")
        if offset % size or not 0 <= offset <= len(pin) - size:
            raise ValueError(f"offset must be a multiple of {size} inside the buffer "
                             f"({len(pin)} bytes), got {offset}")
        address = addr_of(pin) + offset
        if address % size:
            raise ValueError("the futex word is not aligned in memory (use array.array or mmap)")
        return pin, address

    @_exclusive
    def futex_wait(self, buffer: Any, offset: int, expected: int, *,
                   mask: int = FUTEX_BITSET_MATCH_ANY, size: int = 4,
                   private: bool = True) -> IntOperation:
        """Queue a futex wait on the ``size``-byte word at ``buffer[offset:]`` (Linux 6.7).

        Completes (result 0) when woken; fails with ``BlockingIOError`` (``EAGAIN``) if the word
        did not hold ``expected``.  ``buffer`` (an ``array.array``, ``bytearray`` or ``mmap``)
        stays pinned meanwhile.
        """
        self._require(OP["FUTEX_WAIT"])
        return self._futex(OP["FUTEX_WAIT"], buffer, offset, expected, mask, size, private)

    @_exclusive
    def futex_wake(self, buffer: Any, offset: int, count: int = 1, *,
                   mask: int = FUTEX_BITSET_MATCH_ANY, size: int = 4,
                   private: bool = True) -> IntOperation:
        """Queue a futex wake of up to ``count`` waiters (Linux 6.7); the result is how many."""
        self._require(OP["FUTEX_WAKE"])
        return self._futex(OP["FUTEX_WAKE"], buffer, offset, count, mask, size, private)

    def _futex(self, opcode: int, buffer: Any, offset: int, value: int, mask: int, size: int,
               private: bool) -> IntOperation:
        if size not in _FUTEX_SIZES:
            raise ValueError(f"size must be 1, 2, 4 or 8, got {size!r}")
        pin, address = self._futex_word(buffer, offset, size)
        value = _pinning.index(value, "value")
        if not 0 <= value < 1 << (8 * size) and not (size == 8 and 0 <= value < 1 << 64):
            raise ValueError(f"value must fit {size} unsigned bytes, got {value}")
        mask = _pinning.index(mask, "mask")
        if not 0 < mask < 1 << 64:
            raise ValueError(f"mask must be a non-zero 64-bit value, got {mask}")
        flags = _FUTEX_SIZES[size] | (FUTEX2_PRIVATE if private else 0)
        op = self._plain_op(OPCODES[opcode].name.lower(), pin)
        return self._queue_ext(op, opcode, flags, address, 0, value, 0, addr3=mask)  # type: ignore[no-any-return]

    @_exclusive
    def epoll_ctl(self, epfd: int, op: int, fd: int, events: int = 0, data: int = 0) -> IntOperation:
        """Queue an ``epoll_ctl(epfd, op, fd, {events, data})`` (``EPOLL_CTL_*`` from
        :mod:`saferring.constants`; ``data`` defaults to 0, not the fd)."""
        self._require(OP["EPOLL_CTL"])
        if isinstance(epfd, FixedFile) or isinstance(fd, FixedFile):
            raise TypeError("epoll_ctl() takes descriptors, not FixedFile handles (the kernel "
                            "has no registered-file form of it)")
        epfd, _ = self._fd(epfd)
        fd, _ = self._fd(fd)
        event = ffi.new("char[]", lib.SR_EPOLL_EVENT_SIZE)
        data = _pinning.index(data, "data")
        if not 0 <= data < 1 << 64:
            raise ValueError(f"data must be a 64-bit unsigned int, got {data}")
        lib.sr_fill_epoll_event(event, _u32(events, "events"), data)
        req = self._plain_op("epoll_ctl", event)
        return self._queue_ext(req, OP["EPOLL_CTL"], epfd, addr_of(event),  # type: ignore[no-any-return]
                               _u32(op, "op"), fd)

