"""Ring-level registrations: the fixed file table, eventfd, personalities, io-wq limits, the
ring's own descriptor, and the opcode probe.

These are synchronous ``io_uring_register`` calls, not SQEs.  Every one runs under the ring's
owner-thread guard, and every kernel error is raised as the matching ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import Any

from . import _pinning
from ._binding import ffi, lib
from ._guard import _exclusive
from ._ops_base import OpsBase
from .errors import OperationStateError, os_error
from .features import OP
from .fixed import FileTable, FixedFile
from .operation import CloseOperation
from .operation import new_operation as _new_op

_MAX_FILES = 1 << 20  # the kernel's default limit is RLIMIT_NOFILE; this is only a sanity bound



_c_int = _pinning.c_int


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise os_error(-rc, what)
    return rc


def _fd_array(fds: Any) -> tuple[Any, list[int]]:
    values: list[int] = []
    try:
        items = list(fds)
    except TypeError:
        raise TypeError(f"expected a sequence of file descriptors, got {type(fds).__name__}") from None
    for item in items:
        if isinstance(item, FixedFile):
            raise TypeError("register a descriptor, not a FixedFile")
        fileno = getattr(item, "fileno", None)
        value = fileno() if fileno is not None and not isinstance(item, int) else item
        value = _pinning.index(value, "fd")
        if not -1 <= value < 1 << 31:
            raise ValueError(f"file descriptors are >= 0 (-1 leaves a slot empty), got {value}")
        values.append(value)
    return ffi.new("int[]", values), values


class Registration(OpsBase):
    """Registered files and other ring-level registrations (a part of :class:`~saferring.Ring`)."""

    __slots__ = ()

    @_exclusive
    def register_files(self, fds: Any) -> list[FixedFile | None]:
        """Register a file table: a sequence of descriptors (``-1`` leaves a slot empty), or an
        int for a sparse table of that many empty slots (Linux 5.19).

        Returns one :class:`~saferring.FixedFile` per slot that holds a file (``None`` for empty
        ones).  The kernel keeps its own reference to each file: the descriptors may be closed
        afterwards.  Raises :class:`~saferring.OperationStateError` if a table is already
        registered.
        """
        if self._files is not None:
            raise OperationStateError("a file table is already registered: unregister_files() "
                                      "first, or change slots with update_files()")
        if isinstance(fds, int) and not isinstance(fds, bool):
            if not 1 <= fds <= _MAX_FILES:
                raise ValueError(f"a sparse table has 1 to {_MAX_FILES} slots, got {fds}")
            _check(lib.sr_register_files_sparse(self._c, fds), "register_files (sparse)")
            self._files = FileTable(fds)
            return [None] * fds
        array, values = _fd_array(fds)
        if not values:
            raise ValueError("register_files() needs at least one descriptor (or a count)")
        _check(lib.sr_register_files(self._c, array, len(values)), "register_files")
        table = self._files = FileTable(len(values))
        return [None if fd < 0 else FixedFile._make(self, table, i)  # type: ignore[arg-type]
                for i, fd in enumerate(values)]

    def _before_table_change(self) -> None:
        """Hand every queued SQE to the kernel before slots change under them (a queued
        request that names a slot must get the file that was there when it was queued)."""
        if self._chain is not None:
            raise OperationStateError("a chain is open: close it before changing the file table")
        self._submit()

    @_exclusive
    def update_files(self, offset: int, fds: Any) -> list[FixedFile | None]:
        """Replace slots ``offset, offset+1, ...`` of the registered table with ``fds`` (``-1``
        empties a slot).  Handles to the replaced slots become stale.  Returns the new handles.

        Queued requests are submitted first, so each uses the file that was in its slot when it
        was queued.  A request that starts later than its submission (linked behind another,
        after a drain, or forced async) resolves its slot when it starts, and may see the new
        file: do not change slots that such requests use."""
        table = self._registered()
        offset = _pinning.index(offset, "offset")
        array, values = _fd_array(fds)
        if not offset >= 0 or offset + len(values) > len(table.generations):
            raise ValueError(f"slots {offset}..{offset + len(values) - 1} are outside the table "
                             f"of {len(table.generations)}")
        self._before_table_change()
        for i in range(len(values)):
            table.bump(offset + i)  # before the call: even a failed update may have changed some
        done = _check(lib.sr_update_files(self._c, offset, array, len(values)), "update_files")
        return [None if fd < 0 or i >= done else FixedFile._make(self, table, offset + i)  # type: ignore[arg-type]
                for i, fd in enumerate(values)]

    @_exclusive
    def unregister_files(self) -> None:
        """Unregister the file table; every :class:`~saferring.FixedFile` of it becomes stale.

        Requests in flight on registered files keep their files open until they end; queued
        ones are submitted first (see :meth:`update_files`).  Some kernels (seen on 6.1) make
        this call wait until every request using the table has ended; a signal then interrupts
        it with ``InterruptedError`` and the table stays registered, its handles valid.
        """
        table = self._registered()
        self._before_table_change()
        self._files = None  # first: whatever the kernel says, the old handles must not be used
        rc = lib.sr_unregister_files(self._c)
        if rc == -errno.EINTR:
            # Interrupted while the kernel waited for the table's users: it is still
            # registered, so the handles to it are still right.
            self._files = table
        _check(rc, "unregister_files")

    def _registered(self) -> FileTable:
        table = self._files
        if table is None:
            raise OperationStateError("no file table is registered (ring.register_files())")
        return table

    @_exclusive
    def fixed_file(self, slot: int) -> FixedFile:
        """A handle to ``slot`` of the registered table as it is now (for slots filled by a
        request whose handle you no longer have)."""
        table = self._registered()
        slot = _pinning.index(slot, "slot")
        if not 0 <= slot < len(table.generations):
            raise ValueError(f"slot must be between 0 and {len(table.generations) - 1}, got {slot}")
        return FixedFile._make(self, table, slot)  # type: ignore[arg-type]

    @_exclusive
    def close_direct(self, fixed: FixedFile) -> CloseOperation:
        """Queue a ``close`` of a registered file's slot (Linux 5.15); ``fixed`` and every other
        handle to that slot become stale at once."""
        self._require(OP["CLOSE"])
        if not isinstance(fixed, FixedFile):
            raise TypeError(f"close_direct() takes a FixedFile, got {type(fixed).__name__}")
        slot, _ = self._fd(fixed)
        self._registered().bump(slot)
        op = _new_op(CloseOperation, self, None, self._take_ud())
        return self._queue_ext(op, OP["CLOSE"], 0, file_index=slot + 1)  # type: ignore[no-any-return]

    # -- other registrations ---------------------------------------------------------------

    @_exclusive
    def register_eventfd(self, fd: int, *, async_only: bool = False) -> None:
        """Have the kernel signal eventfd ``fd`` on every CQE.  ``async_only``: only for CQEs of
        requests that completed out of line, in an io-wq worker (not those completed inline or
        through poll wake-ups).  The eventfd stays the caller's to close."""
        fd = _c_int(fd, "fd")
        _check(lib.sr_register_eventfd(self._c, fd, 1 if async_only else 0), "register_eventfd")

    @_exclusive
    def unregister_eventfd(self) -> None:
        """Stop signalling the registered eventfd."""
        _check(lib.sr_unregister_eventfd(self._c), "unregister_eventfd")

    @_exclusive
    def register_personality(self) -> int:
        """Register the calling thread's credentials; returns the personality id (Linux 5.6)."""
        return _check(lib.sr_register_personality(self._c), "register_personality")

    @_exclusive
    def unregister_personality(self, personality: int) -> None:
        """Unregister a personality id (refused while a ``with ring.personality(id):`` block
        uses it)."""
        personality = _c_int(personality, "personality")
        if personality and int(self._c.personality) == personality:
            raise OperationStateError(f"personality {personality} is in use by a "
                                      "`with ring.personality()` block")
        _check(lib.sr_unregister_personality(self._c, personality), "unregister_personality")

    @contextlib.contextmanager
    def personality(self, personality: int) -> Iterator[None]:
        """A context manager: the requests queued inside run with the credentials registered as
        ``personality`` (:meth:`register_personality`), not the caller's.  An id the kernel does
        not know makes each of them fail with ``EINVAL``.  Blocks do not nest."""
        personality = _pinning.index(personality, "personality")
        if not 1 <= personality <= 0xFFFF:
            raise ValueError(f"a personality id is between 1 and 65535, got {personality}")
        self._set_personality(personality)
        try:
            yield
        finally:
            if not self._closed:
                self._set_personality(0)

    @_exclusive
    def _set_personality(self, personality: int) -> None:
        if personality and int(self._c.personality):
            raise OperationStateError("a `with ring.personality()` block is already open")
        self._c.personality = personality

    @_exclusive
    def iowq_max_workers(self, bounded: int = 0, unbounded: int = 0) -> tuple[int, int]:
        """Limit io-wq's bounded and unbounded worker threads (0 leaves a limit as it is;
        Linux 5.15).  Returns the previous limits."""
        limits = [_pinning.index(bounded, "bounded"), _pinning.index(unbounded, "unbounded")]
        if not all(0 <= limit <= 0xFFFF_FFFF for limit in limits):
            raise ValueError(f"worker limits are between 0 and 2**32-1, got {limits}")
        values = ffi.new("unsigned int[2]", limits)
        _check(lib.sr_iowq_max_workers(self._c, values), "iowq_max_workers")
        return int(values[0]), int(values[1])

    @_exclusive
    def register_ring_fd(self) -> None:
        """Register the ring's own descriptor, which saves a file lookup on every
        ``io_uring_enter`` (Linux 5.18).  The registration belongs to the calling (owner)
        thread.  A second call raises :class:`~saferring.OperationStateError`; the kernel's
        refusal, ``OSError``."""
        # Tracked here because liburing does not: a second registration would take another
        # slot of the thread's table that nothing ever releases, and a second unregister would
        # release whatever registration sits at that offset, possibly another ring's.
        if getattr(self, "_ring_fd_registered", False):
            raise OperationStateError("the ring's descriptor is already registered")
        rc = lib.sr_register_ring_fd(self._c)
        if rc == 0:
            raise OSError(0, "register_ring_fd: the kernel registered nothing")
        _check(rc, "register_ring_fd")
        self._ring_fd_registered = True

    @_exclusive
    def unregister_ring_fd(self) -> None:
        """Undo :meth:`register_ring_fd` (:class:`~saferring.OperationStateError` if the
        descriptor is not registered)."""
        if not getattr(self, "_ring_fd_registered", False):
            raise OperationStateError("the ring's descriptor is not registered")
        rc = lib.sr_unregister_ring_fd(self._c)
        _check(rc, "unregister_ring_fd")
        self._ring_fd_registered = False

    def probe(self) -> frozenset[str]:
        """The names of the opcodes this ring's kernel supports (``ring.features.opcodes``)."""
        return frozenset(self.features.opcodes)  # type: ignore[attr-defined]
