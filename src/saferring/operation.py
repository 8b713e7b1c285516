"""Operations: one submitted io_uring request each, with the memory it pins and its outcome.

An :class:`Operation` is created by a :class:`~saferring.Ring` method (``ring.read(...)``) and is
recorded in that ring's registry under its user_data until its final CQE.  While it is there it
holds, in ``_pins``, every object the kernel may read or write for it: the exported user buffer
(a cffi ``from_buffer`` view, which keeps a buffer export open so a ``bytearray`` cannot be resized
and an ``mmap`` cannot be closed), iovec arrays, C copies of paths, timespecs.  The ring drops
``_pins`` only when it has copied that final CQE out of the completion queue.

The life cycle is the table in ``_state.py``; the completion path lives in ``Ring._reap``/``Ring._consume``
because it is the hottest loop in the library.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from ._binding import ffi, lib
from ._state import ALLOWED, CANCELLED, COMPLETED, FAILED, QUEUED, SUBMITTED, Action, OpState
from .errors import OperationStateError, cancelled_error, os_error

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .buffers import Buffer
    from .fixed import FixedFile
    from .ring import Ring

T = TypeVar("T")

#: user_data tag of operations that receive several CQEs (read with their flags; see uring.c).
UD_FLAGGED = 1 << 61
#: user_data tag of values posted to a ring with ``msg_ring``.
UD_MESSAGE = 1 << 62
#: The counter part of a user_data (without tags).
SEQUENCE_MASK = UD_FLAGGED - 1
_F_MORE = 1 << 1


class Operation(Generic[T]):
    """One io_uring request.  Created by :class:`~saferring.Ring` methods, never directly.

    ``state`` tells where it is (:class:`~saferring.OpState`), ``done()`` whether its final CQE
    arrived, ``result()`` returns the outcome or raises it, ``cancel()`` asks the kernel to cancel.
    ``user_data`` is the 64-bit tag the kernel echoes back; it is unique for the ring's lifetime.
    """

    # Kept small: one is created per operation, on the hottest path of the library.
    # "_cancel" is deliberately left unset until cancel() is asked for (read with getattr).
    # "_mark" (the ring's ready-list generation it was last put in) is only set on the slow paths
    # that may list an operation twice (multishot values, recovered completions).
    __slots__ = ("__weakref__", "_cancel", "_mark", "_pins", "_res", "_ring", "_state", "_ud")

    _cancel: bool  # set (True) by cancel(); unset until then
    _mark: int  # see __slots__

    #: The operation's name in messages (the kernel opcode, lower case).
    kind: ClassVar[str] = "nop"
    #: Negative results that mean success for this kind (e.g. ``ETIME`` for a timeout).
    _ok_errnos: ClassVar[frozenset[int]] = frozenset()
    #: The completion loop keeps each CQE's flags with its value (provided-buffer ids).
    _wants_flags: ClassVar[bool] = False
    #: A final CQE may re-arm the request instead of ending it (``_rearm``).
    _rearms: ClassVar[bool] = False
    #: The completion loop calls ``_arrived()`` after each value (multishot kinds).
    _on_arrival: ClassVar[bool] = False

    #: The final CQE needs nothing but recording (no ``_settle``, no re-arm): the completion
    #: loops record it inline instead of calling ``Ring._finish``.  Derived per subclass.
    _plain_final: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_final = cls._settle is Operation._settle and not cls._rearms

    def _rearm(self, ring: Any) -> bool:
        """For kinds with ``_rearms``: called by ``Ring._finish`` on a final CQE; True if the
        request goes on (armed again, or waiting to be) instead of ending."""
        return False

    _ring: Ring
    _res: int | None
    _pins: object
    _state: OpState
    _ud: int

    @property
    def user_data(self) -> int:
        """The 64-bit tag the kernel echoes back in the CQE; unique for the ring's lifetime."""
        return self._ud

    def __copy__(self) -> Operation[T]:
        raise TypeError("operations cannot be copied: each one stands for one kernel request")

    def __deepcopy__(self, memo: object) -> Operation[T]:
        raise TypeError("operations cannot be copied: each one stands for one kernel request")

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("operations cannot be pickled or copied")

    def __init__(self, *args: object, **kwargs: object) -> None:
        # Re-running __init__ on a live operation would drop its pins under the kernel, so
        # operations are built only by the ring, through new_operation().
        raise TypeError("operations are created by Ring methods (ring.read(...), ...), not directly")

    # -- what the ring calls ---------------------------------------------------------------

    def _final_state(self, res: int) -> OpState:
        """The terminal state for a final CQE with ``res < 0`` (the ``res >= 0`` case is inlined)."""
        code = -res
        if code in self._ok_errnos:
            return COMPLETED
        if code == errno.ECANCELED or (code == errno.EINTR and self.cancel_requested):
            return CANCELLED
        return FAILED

    def _value(self, res: int) -> T:
        """Turn a successful ``res`` into the value ``result()`` returns."""
        return res  # type: ignore[return-value]  # subclasses with other T override this

    def _what(self) -> str:
        return f"{self.kind}, user_data={self.user_data}"

    def _filename(self) -> Any:
        return None

    def _filename2(self) -> Any:
        return None

    def _settle(self) -> None:
        """Called once the final CQE is recorded in ``_res``, before the state is derived from
        it (operations with several CQEs adjust ``_res`` here).  Only on the flagged path."""

    # -- public ----------------------------------------------------------------------------

    @property
    def state(self) -> OpState:
        """The operation's :class:`~saferring.OpState`."""
        state = self._state
        if state is QUEUED and self._ud & SEQUENCE_MASK <= self._ring._submitted_watermark():
            self._state = state = SUBMITTED
        return state

    def done(self) -> bool:
        """True once the final CQE has arrived (the operation is completed, failed or cancelled)."""
        # The state, not _res: the completion loop stores _res first (the record that recovery
        # finds) and the terminal state next.  On CPython 3.10 a signal handler can raise
        # between the two; until the ring's next call applies the state, the operation is not
        # done yet (result() would refuse), and its pins are still held.  (A terminal state
        # is only ever set after _res.)
        state = self._state
        return state is not QUEUED and state is not SUBMITTED

    @property
    def cancel_requested(self) -> bool:
        """True if :meth:`cancel` was called (or ``Ring.close()`` cancelled it)."""
        return getattr(self, "_cancel", False)

    def result(self) -> T:
        """Return the operation's value, or raise its error.

        Raises :class:`OSError` (Python picks the subclass from the errno: ``FileNotFoundError``...)
        if the kernel reported an error, :class:`~saferring.OperationCancelledError` if it was
        cancelled, and :class:`~saferring.OperationStateError` if it has not finished yet.
        """
        state = self._state
        if state is COMPLETED:
            return self._value(self._res)  # type: ignore[arg-type]  # set with the state
        if state not in ALLOWED[Action.RESULT]:
            raise OperationStateError(
                f"result() needs a finished operation, but {self._what()} is "
                f"{self.state.value}; wait for it with ring.wait() or ring.run(op)"
            )
        code = -self._res  # type: ignore[operator]  # terminal states always carry res
        if state is CANCELLED:
            raise cancelled_error(code, self._what())
        filename = self._filename()
        if filename is not None:
            # Like os.open's errors: the plain strerror, with the path as ``filename``.
            filename2 = self._filename2()
            if filename2 is not None:
                raise OSError(code, os.strerror(code), filename, None, filename2)
            raise OSError(code, os.strerror(code), filename)
        raise os_error(code, self._what())

    def cancel(self) -> None:
        """Ask the kernel to cancel this operation (an ``IORING_OP_ASYNC_CANCEL`` request).

        Returns at once.  The operation still ends with its own final CQE: ``CANCELLED`` if the
        cancel won, or ``COMPLETED``/``FAILED`` if the kernel finished it first.  Its buffers stay
        pinned until then.  Raises :class:`~saferring.OperationStateError` if it already finished
        or was already asked to cancel, :class:`~saferring.RingClosedError` after ``ring.close()``.
        """
        self._ring._cancel(self)

    def __repr__(self) -> str:
        res = "" if self._res is None else f" res={self._res}"
        name = self._what().split(",", 1)[0]
        return f"<{type(self).__name__} {name} user_data={self.user_data} {self.state.value}{res}>"


class IntOperation(Operation[int]):
    """An operation whose result is the CQE's non-negative ``res`` (a byte count, 0...)."""

    __slots__ = ()


class NopOperation(IntOperation):
    """``IORING_OP_NOP``: completes with 0."""

    __slots__ = ()


class ReadOperation(IntOperation):
    """A read: the result is the number of bytes the kernel placed in the buffer."""

    __slots__ = ()
    kind = "read"


class ReadvOperation(IntOperation):
    """A vectored read: the result is the total number of bytes read."""

    __slots__ = ()
    kind = "readv"


class WriteOperation(IntOperation):
    """A write: the result is the number of bytes written."""

    __slots__ = ()
    kind = "write"


class WritevOperation(IntOperation):
    """A vectored write: the result is the total number of bytes written."""

    __slots__ = ()
    kind = "writev"


class FsyncOperation(IntOperation):
    """``fsync``/``fdatasync``: the result is 0."""

    __slots__ = ()
    kind = "fsync"


class CloseOperation(IntOperation):
    """``close``: the result is 0."""

    __slots__ = ()
    kind = "close"


class FdOperation(IntOperation):
    """An operation whose result is a new file descriptor, which the caller then owns.

    If the operation is garbage-collected with a successfully created descriptor that nobody
    asked for through :meth:`result`, that descriptor is closed, so an abandoned request (one
    whose cancel lost the race, say) does not leak it.
    """

    __slots__ = ("_claimed",)
    _claimed: bool

    def _value(self, res: int) -> int:
        self._claimed = True
        return res

    def __del__(self) -> None:
        if self._state is COMPLETED and not getattr(self, "_claimed", False) and self._res is not None:
            try:
                os.close(self._res)
            except OSError:
                pass


class OpenOperation(FdOperation):
    """``openat``/``openat2``: the result is the new file descriptor (closed if never claimed)."""

    __slots__ = ("_path",)
    kind = "openat"
    _path: Any

    def _filename(self) -> Any:
        return self._path


class SocketOperation(FdOperation):
    """``socket``: the result is the new socket's descriptor (closed if never claimed)."""

    __slots__ = ()
    kind = "socket"


class FixedFdInstallOperation(FdOperation):
    """``fixed_fd_install``: the result is a regular descriptor for a registered file."""

    __slots__ = ()
    kind = "fixed_fd_install"


class AcceptOperation(Operation[tuple[int, Any]]):
    """``accept``: the result is ``(fd, address)`` like :meth:`socket.socket.accept` (but a raw
    descriptor, not a socket object).  The descriptor is closed if never claimed."""

    __slots__ = ("_addr", "_addrlen", "_claimed")
    kind = "accept"
    _addr: Any
    _addrlen: Any
    _claimed: bool

    def _value(self, res: int) -> tuple[int, Any]:
        from ._sockaddr import decode

        self._claimed = True
        return res, decode(bytes(ffi.buffer(self._addr, min(int(self._addrlen[0]), len(self._addr)))))

    def __del__(self) -> None:
        if self._state is COMPLETED and not getattr(self, "_claimed", False) and self._res is not None:
            try:
                os.close(self._res)
            except OSError:
                pass


class PathOperation(IntOperation):
    """An operation whose result is the CQE's ``res`` (0, or a byte count), used by many opcodes
    (``unlinkat``, ``fallocate``, ``connect``, ``send``...).  Errors name the operation and, for
    filesystem operations, carry the path(s) as ``filename``/``filename2`` like the ``os``
    module's."""

    __slots__ = ("_label", "_path", "_path2")
    _path: Any
    _path2: Any
    _label: str  # the operation's name in messages (this class serves many opcodes)

    def _what(self) -> str:
        return f"{getattr(self, '_label', self.kind)}, user_data={self.user_data}"

    def _filename(self) -> Any:
        return self._path

    def _filename2(self) -> Any:
        return self._path2


class XattrOperation(Operation[bytes]):
    """``getxattr``/``fgetxattr``: the result is the attribute's value."""

    __slots__ = ("_out", "_path")
    kind = "getxattr"
    _out: Any
    _path: Any

    def _filename(self) -> Any:
        return self._path

    def _value(self, res: int) -> bytes:
        return bytes(ffi.buffer(self._out, min(res, len(self._out))))


class DirectOperation(Operation["FixedFile"]):
    """A ``*_direct`` request (``openat_direct``, ``accept_direct``, ``socket_direct``): the new
    file goes into the ring's registered file table; the result is its :class:`FixedFile`."""

    # Tagged (several-CQE path) so that _settle runs when the CQE arrives: the handle must carry
    # the slot's generation of that moment, not of whenever result() is called.
    __slots__ = ("_handle", "_items", "_path", "_since", "_slot", "_table")
    kind = "direct"
    _path: Any
    _slot: int  # the requested slot, or -1: the kernel picks one and returns it
    _handle: FixedFile
    _table: Any  # the FileTable, and its version, when the request was queued
    _since: int

    def _filename(self) -> Any:
        return getattr(self, "_path", None)

    def _settle(self) -> None:
        res = self._res
        if res is not None and res >= 0 and not hasattr(self, "_handle"):
            picked = self._slot < 0
            self._handle = self._ring._fixed_handle(res if picked else self._slot, picked,
                                                    self._table, self._since)

    def _value(self, res: int) -> FixedFile:
        return self._handle


class CancelOperation(IntOperation):
    """An ``ASYNC_CANCEL`` (or ``TIMEOUT_REMOVE``/``POLL_REMOVE``) request made by the caller.

    The result is how many requests it found: 1 (or, with ``all=True``, the count) when it found
    and cancelled them, 0 when it found nothing (``-ENOENT``: they had already completed, or never
    existed).  ``already_running`` is True when the kernel answered ``-EALREADY``: the target was
    running and could only be signalled, so it may still complete normally.  Either way each
    target ends with its own final CQE, which is what releases its buffers.
    """

    __slots__ = ("_counting",)
    kind = "async_cancel"
    _ok_errnos = frozenset({errno.ENOENT, errno.EALREADY})
    _counting: bool  # IORING_ASYNC_CANCEL_ALL: the kernel's res is the count itself

    @property
    def already_running(self) -> bool:
        """True if the kernel reported ``-EALREADY`` (the target was already executing)."""
        return self._res == -errno.EALREADY

    def _value(self, res: int) -> int:
        if res == -errno.ENOENT:
            return 0
        if res == -errno.EALREADY:
            return 1
        return res if getattr(self, "_counting", False) else 1


class PollOperation(IntOperation):
    """``poll_add``: the result is the mask of ready events."""

    __slots__ = ()
    kind = "poll_add"


class TimeoutRemoveOperation(CancelOperation):
    """``timeout_remove``/``timeout_update``: the result is 1 if the timeout was found, else 0."""

    __slots__ = ()
    kind = "timeout_remove"


class PollRemoveOperation(CancelOperation):
    """``poll_remove``/``poll_update``: the result is 1 if the poll was found, else 0."""

    __slots__ = ()
    kind = "poll_remove"


class LinkTimeoutOperation(Operation[bool]):
    """``link_timeout``: the result is True if the timeout fired (the linked operation was
    cancelled), False if the linked operation finished first."""

    __slots__ = ()
    kind = "link_timeout"
    _ok_errnos = frozenset({errno.ETIME, errno.ECANCELED})

    def _value(self, res: int) -> bool:
        return res == -errno.ETIME


class SendZcOperation(IntOperation):
    """A zero-copy send (``send_zc``/``sendmsg_zc``): the result is the number of bytes sent.

    The kernel posts two CQEs: the send's result (with ``IORING_CQE_F_MORE``), then a
    notification once the network stack no longer reads the buffer.  The operation ends, and
    releases the buffer, only with the notification.
    """

    __slots__ = ("_items", "_kind_name")
    kind = "send_zc"
    _items: collections.deque[int]  # the send's result, from its CQE with F_MORE
    _kind_name: str  # "sendmsg_zc" for those

    def _what(self) -> str:
        return f"{getattr(self, '_kind_name', self.kind)}, user_data={self.user_data}"

    def _settle(self) -> None:
        if self._items:  # idempotent: recovery may settle twice
            self._res = self._items[-1]  # the notification's own res is 0: the send's is the outcome


@dataclasses.dataclass(frozen=True)
class RecvmsgResult:
    """What ``recvmsg`` returned: like :meth:`socket.socket.recvmsg_into`'s tuple, by name."""

    nbytes: int
    ancdata: list[tuple[int, int, bytes]]
    msg_flags: int
    address: Any


class RecvmsgOperation(Operation[RecvmsgResult]):
    """``recvmsg``: the result is a :class:`RecvmsgResult`."""

    # The name and control buffers are kept (and read) directly, with the lengths the kernel
    # wrote capped at their sizes: the decoder never follows a pointer read back from memory the
    # kernel may have written.
    __slots__ = ("_control", "_msg", "_name")
    kind = "recvmsg"
    _msg: Any
    _name: Any
    _control: Any

    def _value(self, res: int) -> RecvmsgResult:
        from ._sockaddr import decode, decode_cmsgs

        msg = self._msg
        namelen = min(int(msg.msg_namelen), len(self._name))
        address = decode(bytes(ffi.buffer(self._name, namelen))) if namelen else None
        anc: list[tuple[int, int, bytes]] = []
        control = self._control
        if control is not None:
            size = min(int(msg.msg_controllen), len(control))
            anc = decode_cmsgs(bytes(ffi.buffer(control, size)))
        return RecvmsgResult(res, anc, int(msg.msg_flags), address)


@dataclasses.dataclass(frozen=True)
class WaitidResult:
    """What ``waitid`` reported, with the names of :func:`os.waitid`'s result."""

    si_pid: int
    si_uid: int
    si_signo: int
    si_status: int
    si_code: int


class WaitidOperation(Operation[WaitidResult]):
    """``waitid``: the result is a :class:`WaitidResult`."""

    __slots__ = ("_out",)
    kind = "waitid"
    _out: Any

    def _value(self, res: int) -> WaitidResult:
        fields = ffi.new("int[5]")
        lib.sr_read_siginfo(self._out, fields)
        signo, code, pid, uid, status = list(fields)
        return WaitidResult(si_pid=pid, si_uid=uid, si_signo=signo, si_status=status, si_code=code)


class SockoptOperation(Operation[Any]):
    """A socket command (``getsockopt``, ``setsockopt``, ``siocinq``, ``siocoutq``)."""

    __slots__ = ("_out",)
    kind = "uring_cmd"
    _out: Any

    def _value(self, res: int) -> Any:
        out = getattr(self, "_out", None)
        if out is None:
            return res  # setsockopt: 0; SIOCINQ/SIOCOUTQ: the byte count
        return bytes(ffi.buffer(out, min(res, len(out))))


class ReceivedMessage(Operation[int]):
    """A value another ring posted to this one with :meth:`~saferring.Ring.msg_ring`.

    It appears among the operations :meth:`~saferring.Ring.wait` returns, already COMPLETED:
    ``value`` is the 61-bit value the sender chose, ``result()`` the 32-bit ``res`` it sent.
    """

    __slots__ = ()
    kind = "message"

    @property
    def value(self) -> int:
        """The value the sender passed as ``value``."""
        return self._ud & SEQUENCE_MASK


V = TypeVar("V")


class MultishotOperation(Operation[list[V]]):
    """A request that keeps producing results until it ends (multishot accept, poll, timeout).

    Each result arrives in its own CQE while the operation stays SUBMITTED; :meth:`take` returns
    (and forgets) the values that arrived since the last call.  ``Ring.wait()`` returns the
    operation whenever new values arrived.  The operation ends with a final CQE: after a
    cancel (CANCELLED), an error (FAILED: the kernel could not keep it armed, e.g. it ran out of
    resources), or normally (COMPLETED; a multishot timeout with a count does that).
    ``result()`` then returns the values not yet taken, or raises the error that ended it (the
    values stay available through :meth:`take`).
    """

    __slots__ = ("_items", "_last_added")
    _items: collections.deque[Any]
    _plain_values: ClassVar[bool] = True  # take() returns the raw values (no _convert)

    def _more(self, res: Any, flags: int) -> None:
        try:
            items = self._items
        except AttributeError:
            items = self._items = collections.deque()
        items.append(res)

    def _settle(self) -> None:
        # A final CQE can still carry a result (the kernel could not re-arm after it).
        res = self._res
        if res is not None and res >= 0 and not getattr(self, "_last_added", False):
            self._last_added = True
            self._more(res, 0)

    def _arrived(self) -> None:
        """Called after a value was appended to ``_items`` (may be skipped if interrupted)."""

    def _convert(self, res: Any) -> V:
        return res  # type: ignore[no-any-return]

    def take(self) -> list[V]:
        """The values that arrived since the last call (oldest first), and forget them."""
        items = getattr(self, "_items", None)
        if not items:
            return []
        # Not destructive (may be interrupted); one builtin call unless values need converting,
        # so a signal storm cannot keep interrupting a long Python loop here.
        out = list(items) if self._plain_values else [self._convert(value) for value in items]
        # The new deque is made by a call (where a signal handler may raise, losing nothing);
        # the swap and the return involve none, so values are either still here or returned.
        self._items = collections.deque()
        return out

    def __iter__(self) -> Iterator[V]:
        """Yield the values as they arrive, waiting on the ring, until the operation ends; then
        raise its error if it failed or was cancelled.  Other operations that finish meanwhile
        stay in the ring's ready list for your next ``wait()``."""
        ring = self._ring
        while True:
            # One value at a time, taken off only as it is handed out: breaking out of the
            # loop (or an exception in its body) leaves the rest for take() or the next loop.
            items = getattr(self, "_items", None)
            if items:
                value = self._convert(items[0])
                items.popleft()
                if value is not None or not self._wants_flags:  # (a chunk that held no data)
                    yield value
                continue
            if self.done():  # (not _res alone: see done())
                if self._state is not COMPLETED:
                    self.result()  # raises the error (or the cancellation)
                return
            ring._pump(1_000_000_000)

    def pending(self) -> int:
        """How many values are waiting to be taken."""
        return len(getattr(self, "_items", ()))

    def _value(self, res: int) -> list[V]:
        return self.take()


class PollMultishotOperation(MultishotOperation[int]):
    """Multishot ``poll_add``: each value is the mask of events that became ready."""

    __slots__ = ()
    kind = "poll_add"


class TimeoutMultishotOperation(MultishotOperation[None]):
    """Multishot timeout: one value (``None``) per expiry."""

    __slots__ = ()
    kind = "timeout"
    _ok_errnos = frozenset({errno.ETIME})

    @property
    def single_shot(self) -> bool:
        """False: the kernel's own multishot timeout (Linux 6.4) fires it."""
        return False

    def _more(self, res: int, flags: int) -> None:
        super()._more(0, flags)

    def _settle(self) -> None:
        # The last expiry of a counted multishot timeout ends it with -ETIME.
        if self._res == -errno.ETIME and not getattr(self, "_last_added", False):
            self._last_added = True
            self._more(0, 0)
            self._res = 0

    _plain_values = False

    def _convert(self, res: int) -> None:
        return None


class TimeoutRepeatOperation(TimeoutMultishotOperation):
    """A multishot timeout on a kernel without ``IORING_TIMEOUT_MULTISHOT`` (before 6.4): the
    library arms a single-shot timeout again each time one fires, under the same user_data
    (so ``timeout_remove``/``cancel`` find it).  Each period starts when the previous expiry
    was reaped, so the ticks drift by the reaping delay."""

    __slots__ = ("_args", "_left", "_rstate", "_starved")
    _rearms = True
    _starved: bool  # its re-arm waits for the caller's chain to close
    _args: tuple[int, int]  # (timespec address, timeout flags)
    _left: int  # expiries still to come (-1: until cancelled)
    _rstate: int  # 1 once the current expiry's value is kept

    @property
    def single_shot(self) -> bool:
        """Always True: the library re-arms a single-shot timeout after each expiry."""
        return True

    def _settle(self) -> None:
        # Every expiry's value was kept by _rearm; the last one ends the request normally.
        if self._res == -errno.ETIME:
            self._res = 0

    def _rearm(self, ring: Any) -> bool:
        return ring._rearm_timeout(self)  # type: ignore[no-any-return]


class AcceptMultishotOperation(MultishotOperation[int]):
    """Multishot ``accept``: each value is a new connection's descriptor (yours to close).

    Descriptors that were never taken are closed when the operation is garbage-collected.
    """

    __slots__ = ()
    kind = "accept"

    def __del__(self) -> None:
        for fd in getattr(self, "_items", ()):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


class AcceptDirectMultishotOperation(MultishotOperation["FixedFile"]):
    """Multishot ``accept_direct``: each value is a new connection's :class:`FixedFile`
    (stale if its slot was touched by ``update_files``/``close_direct``... after the request
    was queued: the file there may not be the connection any more)."""

    __slots__ = ("_since", "_table")
    _plain_values = False
    _on_arrival = True
    kind = "accept"

    _table: Any
    _since: int

    def _arrived(self) -> None:
        # Turn the newest value into its handle now, while the slot is surely the connection's.
        items = self._items
        if items and type(items[-1]) is int and items[-1] >= 0:
            items[-1] = self._ring._fixed_handle(items[-1], True)

    def _convert(self, res: Any) -> FixedFile:
        if isinstance(res, int):
            # Arrived while a signal interrupted the completion loop: made now, stale if the
            # slot was touched since the request was queued (it may hold another file).
            return self._ring._fixed_handle(res, True, self._table, self._since)
        return res  # type: ignore[no-any-return]


class BufferIoOperation(IntOperation):
    """A read, write, recv, send (or their fixed-buffer forms) on a :class:`~saferring.Buffer`:
    the result is the byte count, and the buffer is ``IN_FLIGHT`` until the final CQE."""

    __slots__ = ("_label",)
    _label: str

    def _what(self) -> str:
        return f"{getattr(self, '_label', self.kind)}, user_data={self.user_data}"


class BufferSendZcOperation(SendZcOperation):
    """A zero-copy send from a :class:`~saferring.Buffer` (a registered one where it can): the
    buffer stays ``IN_FLIGHT`` until the kernel's notification."""

    __slots__ = ()


class SelectedBuffersOperation(MultishotOperation["Buffer"]):
    """Receives or reads whose buffers the kernel picks from a :class:`~saferring.BufferRing`
    (``recv_multishot``, ``read_multishot``): each value is a ``FILLED``
    :class:`~saferring.Buffer`, yours until you release it.

    The operation ends at end of stream (COMPLETED), on an error (FAILED) or when cancelled.
    When the ring runs out of buffers the kernel stops the request (``-ENOBUFS``) without
    consuming data; the library arms it again as soon as a buffer comes back, so no byte is lost
    and the order is kept.  Where the kernel has no multishot form of the request, the library
    re-arms a single-shot one after each completion instead (``single_shot``).
    """

    __slots__ = ("_args", "_armed_gen", "_bufring", "_label", "_last_flags", "_rstate", "_single",
                 "_starved")
    _wants_flags = True
    _rearms = True
    _plain_values = False
    _on_arrival = True

    def _arrived(self) -> None:
        # Each chunk becomes its Buffer as it is reaped, in the kernel's order: an incremental
        # ring's pieces take their offsets from that order, whichever request they came from.
        items = self._items
        if items and type(items[-1]) is tuple:
            items[-1] = self._bufring._take(*items[-1])

    _args: tuple[Any, ...]  # what re-arming needs: (opcode, fd, len, off, op_flags, sqe_flags, ioprio)
    _armed_gen: int  # the buffer ring's generation when the request was last armed
    _bufring: Any
    _label: str
    _last_flags: int  # flags of the final CQE (its buffer id)
    _rstate: int  # 1 while a re-arm that already kept its CQE's data is under way
    _single: bool  # re-arm after every completion (no multishot form)
    _starved: bool  # waiting for a buffer to come back (no request in the kernel)

    @property
    def single_shot(self) -> bool:
        """True if the library re-arms a single-shot request after each completion (what
        kernels without the multishot form get)."""
        return self._single

    def _rearm(self, ring: Any) -> bool:
        return ring._rearm_select(self)  # type: ignore[no-any-return]

    def _what(self) -> str:
        return f"{getattr(self, '_label', self.kind)}, user_data={self.user_data}"

    def _settle(self) -> None:
        # The final CQE can carry data (and a buffer) too: keep it once (recovery may re-run).
        res = self._res
        if res is not None and res > 0 and not getattr(self, "_last_added", False):
            self._last_added = True
            self._items.append((res, getattr(self, "_last_flags", 0)))
            self._arrived()
        elif res is not None and res <= 0 and getattr(self, "_last_flags", 0) & 1:
            # A buffer picked for a request that then got no data: straight back to the ring.
            flags = self._last_flags
            self._last_flags = 0
            self._bufring._take(0, flags)

    def _convert(self, item: Any) -> Any:
        if type(item) is tuple:  # not converted on arrival (a signal interrupted)
            res, flags = item
            return self._bufring._take(res, flags)
        return item

    def take(self) -> list[Buffer]:
        """The buffers filled since the last call (oldest first), each ``FILLED`` and yours to
        release."""
        items = getattr(self, "_items", None)
        if not items:
            return []
        out = []
        while items:
            buf = self._convert(items[0])
            items.popleft()
            if buf is not None:
                out.append(buf)
        return out

    def __del__(self) -> None:
        # Values never taken hold buffer ids: hand them back to the kernel.
        for item in getattr(self, "_items", ()):
            try:
                buf = self._convert(item)  # the buffer (or piece) the value holds...
                if buf is not None:
                    buf._abandon()  # ...goes back once nothing uses it
            except Exception:  # noqa: BLE001 - a finaliser must not raise
                pass


class CopiedRecvOperation(SelectedBuffersOperation):
    """A multishot receive whose chunks are copied out as they are reaped: each value is
    ``bytes`` and its buffer goes back to the kernel at once (the asyncio transports' receive;
    ``BufferRing._copy_out``)."""

    __slots__ = ()

    def _arrived(self) -> None:
        items = self._items
        if items and type(items[-1]) is tuple:
            items[-1] = self._bufring._copy_out(*items[-1])

    def _convert(self, item: Any) -> Any:
        if type(item) is tuple:  # not converted on arrival (a signal interrupted)
            return self._bufring._copy_out(*item)
        return item

    def __del__(self) -> None:
        for item in getattr(self, "_items", ()):
            if type(item) is tuple:  # a buffer id never copied out: give it back
                try:
                    self._bufring._copy_out(*item)
                except Exception:  # noqa: BLE001 - a finaliser must not raise
                    pass


class SelectedBufferOperation(SelectedBuffersOperation):
    """One ``recv``/``read`` into a buffer the kernel picks from a
    :class:`~saferring.BufferRing`: the result is that ``FILLED`` :class:`~saferring.Buffer`,
    or ``None`` at end of stream.  It waits for a buffer if the ring is empty."""

    __slots__ = ("_result",)
    _result: Any

    def _value(self, res: int) -> Any:
        try:
            return self._result
        except AttributeError:
            got = self.take()
            self._result = got[0] if got else None
            return self._result

    def __iter__(self) -> Iterator[Buffer]:
        raise TypeError("a single recv/read has one result: use ring.run(op) or op.result()")


class TimeoutOperation(Operation[None]):
    """``IORING_OP_TIMEOUT``: completes (result ``None``) when the time has passed."""

    __slots__ = ()
    kind = "timeout"
    _ok_errnos = frozenset({errno.ETIME})

    def _value(self, res: int) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class StatxResult:
    """What ``statx`` reported, with the field names of :func:`os.stat_result`.

    ``st_birthtime``/``st_birthtime_ns`` are ``None`` when the filesystem does not record
    creation time.  ``stx_mask`` is the kernel's mask of which fields are valid.
    """

    st_mode: int
    st_ino: int
    st_dev: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_size: int
    st_atime: float
    st_mtime: float
    st_ctime: float
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_birthtime: float | None
    st_birthtime_ns: int | None
    st_blocks: int
    st_blksize: int
    st_rdev: int
    st_attributes: int
    stx_mask: int


_STATX_BTIME = 0x800


def _ns(ts: Any) -> int:
    return int(ts.tv_sec) * 1_000_000_000 + int(ts.tv_nsec)


class StatxOperation(Operation[StatxResult]):
    """``statx``: the result is a :class:`StatxResult`."""

    __slots__ = ("_out", "_path")
    kind = "statx"
    _out: Any
    _path: Any

    def _filename(self) -> Any:
        return self._path

    def _value(self, res: int) -> StatxResult:
        s = self._out
        atime, mtime, ctime = _ns(s.stx_atime), _ns(s.stx_mtime), _ns(s.stx_ctime)
        btime = _ns(s.stx_btime) if s.stx_mask & _STATX_BTIME else None
        return StatxResult(
            st_mode=int(s.stx_mode),
            st_ino=int(s.stx_ino),
            st_dev=os.makedev(s.stx_dev_major, s.stx_dev_minor),
            st_nlink=int(s.stx_nlink),
            st_uid=int(s.stx_uid),
            st_gid=int(s.stx_gid),
            st_size=int(s.stx_size),
            st_atime=atime / 1e9,
            st_mtime=mtime / 1e9,
            st_ctime=ctime / 1e9,
            st_atime_ns=atime,
            st_mtime_ns=mtime,
            st_ctime_ns=ctime,
            st_birthtime=None if btime is None else btime / 1e9,
            st_birthtime_ns=btime,
            st_blocks=int(s.stx_blocks),
            st_blksize=int(s.stx_blksize),
            st_rdev=os.makedev(s.stx_rdev_major, s.stx_rdev_minor),
            st_attributes=int(s.stx_attributes),
            stx_mask=int(s.stx_mask),
        )


class BatchOperation(Operation[list[int]]):
    """Many SQEs of one kind, tracked as one operation (``Ring.nop_many``, ``read_many``...).

    The members' CQEs are collected in C; the batch finishes when the last member's final CQE
    has arrived, and only then releases what it pins.  ``result()`` returns the members' results
    in order (bytes moved, for reads and writes), or raises the first failing member's error
    (``OSError``; its message names the member).  ``results_or_errors()`` gives every member's
    raw result, negative errno included, without raising.
    """

    __slots__ = ("_out", "member_kind")
    kind = "batch"

    _out: Any

    @property
    def count(self) -> int:
        """How many SQEs the batch is made of (read from the C batch: it sizes the results)."""
        return int(self._out.n)
    #: What each member does ("nop", "read", "write").
    member_kind: str

    def results_or_errors(self) -> list[int]:
        """Every member's raw result in order: >= 0 on success, ``-errno`` on failure."""
        if self._res is None:
            raise OperationStateError(f"{self._what()} has not finished")
        return ffi.unpack(self._out.res, self.count)  # type: ignore[no-any-return]

    def _value(self, res: int) -> list[int]:
        return self.results_or_errors()

    def _what(self) -> str:
        out = getattr(self, "_out", None)
        if self._res is not None and self._res < 0 and out is not None:
            return (f"{self.member_kind} batch of {self.count}, member {out.first_error_index} "
                    f"failed, user_data={self.user_data}")
        return f"{self.member_kind} batch of {self.count}, user_data={self.user_data}"

    def _member_user_data(self) -> list[int]:
        """user_data of the members still waiting for their CQE (for cancellation)."""
        batch = self._out
        pending = lib.SR_RES_PENDING
        return [lib.sr_batch_member_ud(batch, i)
                for i, r in enumerate(ffi.unpack(batch.res, self.count)) if r == pending]


_object_new = object.__new__

OpT = TypeVar("OpT", bound=Operation[Any])


def new_operation(cls: type[OpT], ring: Any, pins: object, user_data: int) -> OpT:
    """Build an operation (the only way: ``__init__`` refuses, so a live one cannot be reset).

    The statx buffer of a StatxOperation and the sr_batch struct of a BatchOperation are kept
    in ``_out`` by the caller; they are pinned through ``_pins`` like everything else while in
    flight, and ``_out`` keeps them readable after the pins are released.
    """
    op = _object_new(cls)
    op._ring = ring
    op._pins = pins
    op._res = None
    op._state = QUEUED
    op._ud = user_data
    if user_data & UD_FLAGGED:
        # Where the completion loop puts the values of CQEs with F_MORE (a builtin append).
        op._items = collections.deque()  # type: ignore[attr-defined]
    return op


class CancelRequest:
    """The ring's own ``ASYNC_CANCEL`` request for one target operation (never returned to users).

    Its CQE says how the request went: 0 (found and cancelled), ``-EALREADY`` (already running,
    the kernel will try to interrupt it) or ``-ENOENT`` (not found: it completed, or never started).
    Either way the target's own final CQE is what releases the target's pins.
    """

    __slots__ = ("res", "target")

    def __init__(self, target: Operation[Any]) -> None:
        self.target = target
        self.res: int | None = None
