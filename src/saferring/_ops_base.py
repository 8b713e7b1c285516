"""What the operation families (``_file_ops``, ``_net_ops``, ``_event_ops``, ``_registration``)
need from :class:`~saferring.Ring`: the core lives in ``ring.py``, each family in its own mixin,
and this base spells out the contract between them for the type checker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._binding import ffi
from .operation import PathOperation, new_operation

if TYPE_CHECKING:
    from ._chain import Chain
    from .buffers import BufferPool, BufferRing
    from .fixed import FileTable, FixedFile
    from .operation import Operation


def addr_of(cdata: Any) -> int:
    """The address of a pinned C object, for an SQE field (0 for ``None``)."""
    if cdata is None:
        return 0
    return int(ffi.cast("uintptr_t", cdata))


class OpsBase:
    """The parts of Ring the operation families build on (implemented in ring.py)."""

    # The state the families share lives here (the rest of Ring's slots are in ring.py).
    __slots__ = ("_buffer_work", "_chain", "_deferred", "_files", "_group_next", "_groups", "_pool",
                 "_ring_fd_registered")

    _chain: Chain | None
    _files: FileTable | None
    _ring_fd_registered: bool
    _pool: BufferPool | None  # the registered buffer table's pool
    _groups: dict[int, BufferRing]  # provided buffer groups by id
    _group_next: int  # where the search for a free group id starts (ids are not reused early)
    _buffer_work: bool  # buffers came back, or requests wait for one: see _service_buffers
    _deferred: list[Any]  # requests to arm again once the caller's chain is closed
    _driver: Any  # weakref to the AsyncRing driving the ring, or None

    if TYPE_CHECKING:
        _c: Any
        _sup: Any
        _registry: dict[int, Operation[Any]]
        _next_ud: int
        _cancelled: set[int]
        _closed: bool

        def _require(self, opcode: int) -> None: ...
        def _take_ud(self) -> int: ...
        def _take_flagged_ud(self) -> int: ...
        def _fd(self, fd: Any) -> tuple[int, int]: ...
        def _fixed_handle(self, slot: int, picked: bool = False, table: Any = None,
                          since: int = -1) -> FixedFile: ...
        def _submit(self) -> int: ...
        def _use_sync_cancel(self) -> None: ...
        def _queue_ext(self, op: Any, opcode: int, fd: int = -1, addr: int = 0, length: int = 0,
                       off: int = 0, op_flags: int = 0, sqe_flags: int = 0, ioprio: int = 0,
                       buf_index: int = 0, file_index: int = 0, addr3: int = 0) -> Any: ...
        def _unregister_if_unprepared(self, ud: int, exc: BaseException) -> BaseException: ...
        def _queue_with(self, op: Any, prep: Any, *args: Any) -> Any: ...
        def _prep_retry(self, ud: int, rc: int, prep: Any, *args: Any) -> None: ...
        def _direct_slot(self, slot: int | None, op: Any = None) -> tuple[int, int]: ...
        def _read_buffer(self, fd: Any, buffer: Any, offset: int) -> Any: ...
        def _write_buffer(self, fd: Any, buffer: Any, offset: int) -> Any: ...
        def _recv_buffer(self, fd: Any, buffer: Any, flags: int) -> Any: ...
        def _send_buffer(self, fd: Any, buffer: Any, flags: int, zc: bool,
                         address: Any = None) -> Any: ...
        def _service_buffers(self) -> None: ...
        def _address(self, fd: int, fixed: int, address: Any) -> tuple[Any, int]: ...
        def _finish_starved(self, op: Any) -> None: ...
        def _cancel_waiting(self, fd: int | None) -> None: ...
        def _list_ready(self, op: Any) -> None: ...
        def _defer_rearm(self, op: Any) -> bool: ...

    def _plain_op(self, label: str, pins: Any, path: Any = None, path2: Any = None) -> PathOperation:
        """A new operation whose result is the CQE's ``res`` and whose errors name ``label``
        (and the paths, like the ``os`` module's), registered under a fresh user_data."""
        op = new_operation(PathOperation, self, pins, self._take_ud())
        op._label = label
        op._path = path
        op._path2 = path2
        return op
