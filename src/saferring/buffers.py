"""Library-owned memory for the kernel: :class:`Buffer`, :class:`BufferPool`, :class:`BufferRing`.

Every buffer is its own page-aligned anonymous ``mmap`` that only this module holds.  A
:class:`Buffer` handle is the only way in: its state machine (``FREE`` → ``IN_FLIGHT`` →
``FILLED``, and ``RELEASED`` once handed back) decides who may touch the memory.  While the
kernel owns a buffer every access raises :class:`~saferring.BufferBusyError`.

Views: :meth:`Buffer.view` returns a ``memoryview`` of the mapping.  A view keeps the mapping
alive on its own, so memory never dangles; and because each buffer has its own mapping, the
mapping's reference count says whether any view (or slice of one, or object built on one) is
still alive.  A buffer with a live view is never handed to the kernel or recycled: the call is
refused, so nobody can read bytes the kernel is writing.

* :class:`BufferPool`: registered (fixed) buffers for ``ring.read_fixed``/``write_fixed`` and
  zero-copy sends, leased with ``with pool.lease() as buf:``.
* :class:`BufferRing`: a provided-buffer group the kernel picks from (``recv``/``read`` with
  buffer selection, ``recv_multishot``, ``read_multishot``).  A kernel buffer ring (Linux 5.19)
  where the kernel has one, ``IORING_OP_PROVIDE_BUFFERS`` (5.7) otherwise.
"""

from __future__ import annotations

import array
import collections
import enum
import errno
import mmap
import platform
import sys
from typing import TYPE_CHECKING, Any

from ._binding import ffi, lib
from ._guard import _get_ident
from .errors import (
    RAISE_MEMLOCK,
    BufferBusyError,
    MemlockLimitError,
    OperationStateError,
    has_capability,
    os_error,
    process_status,
    rlimit_text,
)

if TYPE_CHECKING:
    from .ring import Ring

__all__ = ["Buffer", "BufferPool", "BufferRing", "BufferState"]

PAGE = mmap.PAGESIZE
MAX_BUFFER_SIZE = 1 << 30  # the kernel refuses registered buffers above 1 GiB
MAX_POOL_BUFFERS = 1 << 14  # IORING_MAX_REG_BUFFERS
MAX_RING_BUFFERS = 1 << 15  # a buffer ring has at most 32768 entries
_BUF_ENTRY = 16  # sizeof(struct io_uring_buf)
_F_BUFFER = 1  # IORING_CQE_F_BUFFER
_F_BUF_MORE = 1 << 4  # IORING_CQE_F_BUF_MORE: the kernel goes on filling this buffer (incremental)
_BUFFER_SHIFT = 16  # IORING_CQE_BUFFER_SHIFT


class BufferState(enum.Enum):
    """Where a :class:`Buffer` is in its life."""

    FREE = "free"  #: yours, no valid data (new, or a read into it failed)
    IN_FLIGHT = "in flight"  #: the kernel owns it: every access raises BufferBusyError
    FILLED = "filled"  #: yours, ``nbytes`` valid bytes
    RELEASED = "released"  #: handed back to its pool or ring: this handle is dead


FREE, IN_FLIGHT, FILLED, RELEASED = (BufferState.FREE, BufferState.IN_FLIGHT,
                                     BufferState.FILLED, BufferState.RELEASED)


def _positive(value: Any, name: str, limit: int) -> int:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= value <= limit:
        raise ValueError(f"{name} must be between 1 and {limit}, got {value}")
    return value


#: MADV_WIPEONFORK (Linux 4.14), which Python's mmap module does not name: 18 in the generic
#: <asm-generic/mman-common.h> that these architectures use.
_MADV_WIPEONFORK = 18
_GENERIC_MMAN = ("x86_64", "aarch64", "i686", "i386", "armv7l", "armv8l", "riscv64", "s390x",
                 "ppc64le", "ppc64", "loongarch64")


def _private_map(length: int) -> mmap.mmap:
    """Anonymous memory for buffers the kernel uses, private to this process and zero-filled in
    a forked child.

    Not shared (mmap's default): a forked child's writes would reach the parent's buffers, and
    its releases the parent's buffer ring, which the kernel reads to pick where to write.  Not
    plainly private either: fork would make the parent's pages copy-on-write, and kernels before
    5.9 resolve that against the parent (its next write moves it off the page the kernel has
    pinned).  Wiped on fork, the child gets fresh zero pages and the parent's stay as they are.
    """
    m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if platform.machine() in _GENERIC_MMAN:
        try:
            m.madvise(_MADV_WIPEONFORK)
        except OSError:
            pass  # (not on this kernel: the child gets a copy-on-write copy)
    return m


class _Slab:
    """``count`` buffers of ``size`` bytes, each its own page-aligned anonymous mapping.

    ``addrs`` is a C array of their addresses (indexed by buffer id) for the C helpers.  The
    ``from_buffer`` exports held in ``_exports`` keep the mappings from being closed or resized.
    """

    __slots__ = ("_baseline", "_exports", "addrs", "count", "maps", "size", "stride")

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.stride = -(-size // PAGE) * PAGE
        try:
            self.maps = [_private_map(self.stride) for _ in range(count)]
        except OSError as exc:
            raise MemoryError(f"could not map {count} buffer(s) of {size} bytes: {exc}") from None
        self._exports = [ffi.from_buffer(m) for m in self.maps]
        self.addrs = ffi.new("uint64_t[]", [int(ffi.cast("uintptr_t", e)) for e in self._exports])
        # What the library itself holds on a mapping, counted the way views_alive counts: any
        # reference beyond this is a view (or a slice of one, or an object built on one).
        self._baseline = self._refs(0)

    def _refs(self, index: int) -> int:
        return sys.getrefcount(self.maps[index])

    def views_alive(self, index: int) -> bool:
        """True if a memoryview of buffer ``index`` (or anything built on one) is alive."""
        return self._refs(index) > self._baseline

    def addr(self, index: int) -> int:
        return int(self.addrs[index])


class Buffer:
    """Library-owned memory (page-aligned, anonymous mmap) with a state machine.

    ``Buffer(size)`` makes a standalone buffer; pools and buffer rings hand out their own
    (:meth:`BufferPool.lease`, the values of ``recv_multishot``...).  Pass a buffer to
    ``ring.read``/``write``/``recv``/``send``/``send_zc`` (any buffer) or
    ``ring.read_fixed``/``write_fixed`` (a leased pool buffer): it is ``IN_FLIGHT`` until the
    operation's final CQE, then ``FILLED`` with what was read (a failed read leaves it
    ``FREE``; a write leaves it as it was).  While in flight, :meth:`view`, :meth:`fill`,
    :meth:`tobytes` and :meth:`release` raise :class:`~saferring.BufferBusyError`.

    ``release()`` (or leaving ``with``) hands the buffer back to its pool or ring; the handle is
    then dead (``RELEASED``).  It is refused while a memoryview from :meth:`view` is alive.
    """

    __slots__ = ("__weakref__", "_cap", "_index", "_member", "_n", "_off", "_op", "_owner",
                 "_reading", "_slab", "_state")

    _slab: _Slab
    _index: int
    _owner: Any  # BufferPool, BufferRing or None (standalone)
    _state: BufferState
    _n: int
    _op: Any  # the operation using the buffer while in flight
    _reading: bool  # that operation fills the buffer (else it only reads it)
    _member: int  # the buffer's member index when that operation is a batch (else -1)
    _off: int  # where this handle's bytes start in the mapping (a piece of an incremental ring)
    _cap: int  # how many bytes from _off this handle may use

    def __init__(self, size: int) -> None:
        if hasattr(self, "_slab"):
            raise OperationStateError("Buffer.__init__ was called on a buffer that already exists")
        size = _positive(size, "size", MAX_BUFFER_SIZE)
        self._setup(_Slab(1, size), 0, None, FREE, 0)

    def _setup(self, slab: _Slab, index: int, owner: Any, state: BufferState, n: int,
               off: int = 0, cap: int = -1) -> None:
        self._slab = slab
        self._off = off
        self._cap = slab.size if cap < 0 else cap
        self._index = index
        self._owner = owner
        self._state = state
        self._n = n
        self._op = None
        self._reading = False
        self._member = -1

    @classmethod
    def _make(cls, slab: _Slab, index: int, owner: Any, state: BufferState, n: int,
              off: int = 0, cap: int = -1) -> Buffer:
        buf = cls.__new__(cls)
        buf._setup(slab, index, owner, state, n, off, cap)
        return buf

    def __copy__(self) -> Buffer:
        raise TypeError("a Buffer cannot be copied: it is one piece of memory with one owner")

    def __deepcopy__(self, memo: object) -> Buffer:
        raise TypeError("a Buffer cannot be copied: it is one piece of memory with one owner")

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError("a Buffer cannot be pickled; copy its bytes with tobytes()")

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> BufferState:
        """The :class:`BufferState`."""
        if self._state is RELEASED:  # a dead handle stays dead, whatever its operation did
            return RELEASED
        op = self._op
        if op is not None:
            res = op._res
            if res is None:
                return IN_FLIGHT
            self._op = None
            if self._member >= 0:  # a batch member: its own result, from the C batch
                res = int(op._out.res[self._member])
            if self._reading:
                # The final CQE decides: what was read, or nothing valid after a failure.  A
                # recv with MSG_TRUNC reports the datagram's full length, which can exceed the
                # buffer: only what fits is valid (a later send must not read past the end).
                if res >= 0:
                    self._state, self._n = FILLED, (res if res <= self._cap else self._cap)
                else:
                    self._state, self._n = FREE, 0
        return self._state

    @property
    def size(self) -> int:
        """The buffer's capacity in bytes (for a piece of an incremental buffer ring: the bytes
        the kernel put there)."""
        return self._cap

    @property
    def nbytes(self) -> int:
        """How many bytes are valid (0 unless ``FILLED``)."""
        return self._n if self.state is FILLED else 0

    @property
    def offset(self) -> int:
        """Where this buffer's bytes start in its memory: 0, except for a piece of an
        incremental :class:`BufferRing` buffer (the kernel put it after the earlier pieces)."""
        return self._off

    @property
    def index(self) -> int:
        """The buffer's index in its pool (the registered-buffer index) or ring (buffer id)."""
        return self._index

    def _usable(self, action: str) -> None:
        state = self.state
        if state is IN_FLIGHT:
            raise BufferBusyError(f"cannot {action}: the kernel owns this buffer until "
                                  f"{self._op!r} ends")
        if state is RELEASED:
            raise OperationStateError(f"cannot {action}: this buffer was released to its "
                                      f"{'pool' if isinstance(self._owner, BufferPool) else 'ring'}")

    def _no_views(self, action: str) -> None:
        if self._slab.views_alive(self._index):
            raise BufferBusyError(
                f"cannot {action}: a memoryview of this buffer (from view(), or a slice or "
                "object built on one) is still alive; release it (view.release(), del, or "
                "'with buf.view() as v:') first")

    def _lend(self, op: Any, reading: bool, member: int = -1) -> int:
        """Hand the buffer to the kernel for ``op`` (called by the ring before queuing);
        returns its address.  Refused while in flight, released, or viewed."""
        self._usable("hand it to the kernel")
        self._no_views("hand it to the kernel")
        prev = self._op  # checked again and set with no call in between (see release)
        if self._state is RELEASED or (prev is not None and prev._res is None):
            self._usable("hand it to the kernel")
        self._op = op
        # In flight from here (view() refuses); a view taken just before the change is caught
        # now, while nothing is queued yet.
        if self._slab.views_alive(self._index):
            self._op = prev
            self._no_views("hand it to the kernel")
        self._reading = reading
        self._member = member
        return int(self._slab.addrs[self._index]) + self._off

    def _unlend(self) -> None:
        """Undo :meth:`_lend` when the operation was never queued."""
        self._op = None

    # -- access ------------------------------------------------------------------------------

    def view(self, whole: bool = False) -> memoryview:
        """A writable memoryview of the filled bytes (``whole=True``: of the full capacity, to
        fill in place, then :meth:`mark_filled`).  Use ``with buf.view() as v:`` or release it
        before handing the buffer back to the kernel or its owner."""
        if self._op is not None or self._state is RELEASED:
            self._usable("view it")  # raises, unless the operation has just ended
        off = self._off
        end = off + (self._cap if whole else (self._n if self._state is FILLED else 0))
        return memoryview(self._slab.maps[self._index])[off:end]

    def tobytes(self) -> bytes:
        """A copy of the filled bytes."""
        self._usable("read it")
        return self._slab.maps[self._index][self._off:self._off + self.nbytes]

    def fill(self, data: Any) -> int:
        """Copy ``data`` (bytes-like) to the start of the buffer; it becomes ``FILLED`` with
        ``len(data)`` bytes.  Returns that length."""
        self._usable("fill it")
        with memoryview(data) as src:
            n = src.nbytes
            if n > self._cap:
                raise ValueError(f"{n} bytes do not fit a buffer of {self._cap}")
            flat = src if src.format == "B" and src.ndim == 1 else src.cast("B")
            self._slab.maps[self._index][self._off:self._off + n] = flat
        self._state, self._n = FILLED, n
        return n

    def mark_filled(self, nbytes: int) -> None:
        """Declare the first ``nbytes`` valid (after writing through ``view(whole=True)``)."""
        self._usable("mark it filled")
        if type(nbytes) is not int or not 0 <= nbytes <= self._cap:
            raise ValueError(f"nbytes must be an int between 0 and {self._cap}, got {nbytes!r}")
        self._state, self._n = (FILLED, nbytes)

    def release(self) -> None:
        """Hand the buffer back to its pool or ring (a standalone buffer's memory is freed once
        nothing uses it).  Refused while in flight or while a view is alive."""
        self._usable("release it")
        self._no_views("release it")
        # Checked again and set with no call in between (a call is where another thread or a
        # signal handler can run): two release() calls, or a release() racing a ring call that
        # lends the buffer, cannot both succeed, so an index never goes back twice.
        prev = self._op
        if self._state is RELEASED or (prev is not None and prev._res is None):
            self._usable("release it")
        self._state = RELEASED
        owner = self._owner
        if owner is None:
            return
        # From here no view can be taken (view() refuses a released buffer); one taken between
        # the check above and the state change (a signal handler, another thread) keeps the
        # buffer back until it is gone.
        if self._slab.views_alive(self._index):
            owner._quarantine(self._index, None)
        else:
            owner._give_back(self._index)

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state is RELEASED:
            return
        if exc_type is None:
            self.release()  # refused (raised) if still in flight or viewed: the lease stays
        else:
            self._abandon()  # leaving on an exception: never raise over it

    def _abandon(self) -> None:
        """The handle is dropped (or left on an exception): the buffer goes back once nothing
        uses it any more (its operation ended, no view alive)."""
        op = self._op
        if self._state is RELEASED:  # checked and set with no call in between (see release)
            return
        self._state = RELEASED
        owner = self._owner
        if owner is not None:
            owner._quarantine(self._index, op)

    def __del__(self) -> None:
        try:
            self._abandon()
        except Exception:  # noqa: BLE001 - a finaliser must not raise; nothing is freed early
            pass

    def __repr__(self) -> str:
        state = self.state
        filled = f" nbytes={self._n}" if state is FILLED else ""
        return f"<Buffer index={self._index} size={self._cap} {state.value}{filled}>"

    @classmethod
    def _pinned_size(cls, buf: Buffer) -> int:
        return buf._cap


class _Claim:
    """Marks buffers taken for a batch that is being queued (in flight until the batch is
    known): ``_res`` None reads as IN_FLIGHT."""

    __slots__ = ()
    _res = None

    def __repr__(self) -> str:
        return "<a batch being queued>"


CLAIMED = _Claim()


class _Owner:
    """What pools and buffer rings share: a slab, the ring, free and quarantined buffers."""

    _slab: _Slab
    _ring: Any
    _closed: bool
    _held: collections.deque[tuple[int, Any]]  # (index, operation) waiting to come back

    def _quarantine(self, index: int, op: Any) -> None:
        # Called from finalisers too: one builtin append, processed by the owner later.
        self._held.append((index, op))
        self._ring._buffer_work = True

    def _reclaim(self) -> list[int]:
        """Indexes of quarantined buffers that are now unused (their operation ended and no
        view of them is alive), taken off the quarantine."""
        out: list[int] = []
        held = self._held
        for _ in range(len(held)):
            index, op = held.popleft()
            if (op is not None and op._res is None) or self._slab.views_alive(index):
                held.append((index, op))
            else:
                out.append(index)
        return out

    def _give_back(self, index: int) -> None:
        raise NotImplementedError

    @property
    def count(self) -> int:
        """How many buffers there are."""
        return self._slab.count

    @property
    def size(self) -> int:
        """Each buffer's size in bytes."""
        return self._slab.size

    @property
    def closed(self) -> bool:
        """True after ``close()`` (or once the ring closed)."""
        return self._closed

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BufferPool(_Owner):
    """``count`` registered buffers of ``size`` bytes for one ring (``io_uring_register_buffers``).

    ``with pool.lease() as buf:`` lends one (returned when the block ends); pass it to
    ``ring.read_fixed``/``ring.write_fixed`` or ``ring.send_zc``.  The kernel pins the pages;
    without ``CAP_IPC_LOCK`` they count against ``RLIMIT_MEMLOCK``, and a pool over the limit
    raises :class:`~saferring.MemlockLimitError` saying which limit to raise.  A ring has one
    registered buffer table, so one open pool at a time.
    """

    def __init__(self, ring: Ring, count: int, size: int) -> None:
        count = _positive(count, "count", MAX_POOL_BUFFERS)
        size = _positive(size, "size", MAX_BUFFER_SIZE)
        self._ring = ring
        self._closed = True
        self._held = collections.deque()
        self._slab = _Slab(count, size)
        self._free = collections.deque(range(count))
        ring._attach_pool(self)  # registers with the kernel, or raises
        self._closed = False

    def available(self) -> int:
        """How many buffers :meth:`lease` can hand out now."""
        self._free.extend(self._reclaim())
        return len(self._free)

    def lease(self) -> Buffer:
        """Lend a ``FREE`` buffer: use it as a context manager (``with pool.lease() as buf:``)
        or call ``buf.release()``.  :class:`~saferring.BufferBusyError` if every buffer is
        leased or still in flight."""
        if self._closed:
            raise OperationStateError("this BufferPool is closed")
        free = self._free
        if not free:
            free.extend(self._reclaim())
            if not free:
                raise BufferBusyError(f"all {self.count} buffers of this pool are leased (or "
                                      "still used by the kernel); release one first")
        return Buffer._make(self._slab, free.popleft(), self, FREE, 0)

    def _give_back(self, index: int) -> None:
        self._free.append(index)

    def close(self) -> None:
        """Unregister the buffers from the kernel.  Refused (BufferBusyError) while one is in
        flight; leased buffers stay valid memory, but no longer work with ``read_fixed``."""
        if self._closed:
            return
        if any(op is not None and op._res is None for _i, op in self._held):
            raise BufferBusyError("a buffer of this pool is still in flight; wait for it first")
        self._ring._detach_pool(self)
        self._closed = True

    def _ring_closed(self) -> None:
        self._closed = True


    def __repr__(self) -> str:
        state = "closed" if self._closed else f"available={len(self._free)}"
        return f"<BufferPool count={self.count} size={self.size} {state}>"


def memlock_error(code: int, nbytes: int) -> Exception:
    """The error for a failed buffer registration: ENOMEM says which limit to raise.

    Without ``CAP_IPC_LOCK`` (checked when the ring was created), the kernel counts every page
    it pins for io_uring (registered buffers; on recent kernels also buffer rings and the
    ring's own queues) against ``RLIMIT_MEMLOCK``, per user: the pages of all of that user's processes
    add up.  The message gives the limit and where it is raised."""
    if code != errno.ENOMEM:
        return os_error(code, "io_uring_register_buffers")
    import resource

    limit = rlimit_text(resource.RLIMIT_MEMLOCK)
    pages = -(-nbytes // PAGE)
    if limit is None:
        return MemlockLimitError(
            f"the kernel could not pin {nbytes} bytes ({pages} page(s)) for a buffer "
            "registration (ENOMEM), and RLIMIT_MEMLOCK is unlimited: the system (or its memory "
            "cgroup) is short of memory; use fewer or smaller buffers.")
    has_ipc_lock = has_capability(process_status(), 14)  # CAP_IPC_LOCK
    who = {True: "this process has CAP_IPC_LOCK, which exempts rings created with it: if this "
                 "one was, the system is short of memory instead",
           False: "this process lacks CAP_IPC_LOCK",
           None: "for processes without CAP_IPC_LOCK"}[has_ipc_lock]
    return MemlockLimitError(
        f"the kernel could not pin {nbytes} bytes ({pages} page(s)) for a buffer registration "
        f"(ENOMEM): RLIMIT_MEMLOCK ({limit}) is too low. Pinned io_uring memory counts against "
        f"it ({who}), per user: the pages of every ring and registration of this user's "
        f"processes add up. Raise it ({RAISE_MEMLOCK}), run with CAP_IPC_LOCK, or use fewer "
        "or smaller buffers.")


class BufferRing(_Owner):
    """A group of ``count`` provided buffers of ``size`` bytes that the kernel picks from.

    Pass it where an operation takes ``buffers`` (``ring.recv(sock, buffers)``,
    ``ring.recv_multishot``, ``ring.read_multishot``...): the kernel chooses a buffer when data
    arrives, and the operation's value is that :class:`Buffer`, ``FILLED``.  Release it
    (``buf.release()`` or ``with``) to give it back to the kernel.  When every buffer is out,
    receives wait (they are re-armed when one comes back; no byte is lost).

    ``mode``: ``"ring"`` (a kernel buffer ring, Linux 5.19), ``"provide"``
    (``IORING_OP_PROVIDE_BUFFERS``, what older kernels have) or ``"auto"`` (the ring where the
    kernel has it).  ``group`` is the buffer group id (chosen for you by default).

    ``incremental=True`` (a kernel buffer ring on Linux 6.12+, ``IOU_PBUF_RING_INC``): a chunk
    uses only the part of a buffer it needs, and the next chunk continues in the same buffer, so
    large buffers are not spent on small messages.  Each value is then a piece of a buffer; the
    buffer goes back to the kernel once the kernel has moved on from it and every piece was
    released.  Where the kernel lacks it, each chunk takes a whole buffer (``buffers.incremental``
    says which).
    """

    def __init__(self, ring: Ring, count: int, size: int, group: int | None = None, *,
                 mode: str = "auto", incremental: bool = False) -> None:
        count = _positive(count, "count", MAX_RING_BUFFERS)
        size = _positive(size, "size", MAX_BUFFER_SIZE)
        if mode not in ("auto", "ring", "provide"):
            raise ValueError(f"mode must be 'auto', 'ring' or 'provide', got {mode!r}")
        if group is not None and (type(group) is not int or not 0 <= group <= 0xFFFF):
            raise ValueError(f"group must be an int between 0 and 65535, got {group!r}")
        self._ring = ring
        self._closed = True
        self._held = collections.deque()
        self._slab = _Slab(count, size)
        self._starved: list[Any] = []  # operations waiting for a buffer to come back
        self._gen = 0  # bumped whenever buffers go back to the kernel
        # Given back (released, dropped, or never filled), not yet handed to the kernel.
        self._returned: collections.deque[int] = collections.deque()
        entries = 1
        while entries < count:
            entries <<= 1
        self._entries = entries
        self._ring_map: mmap.mmap | None = None
        self._ring_export: Any = None
        self._ring_addr = 0
        self.group = -1
        self.mode = mode
        self._kernel_took = False  # the kernel may hold these buffers' addresses
        self.want_incremental = bool(incremental)
        #: True if the kernel consumes the buffers incrementally (set at registration).
        self.incremental = False
        self._next_off = [0] * count  # incremental: where the kernel's next chunk starts
        self._pieces = [0] * count  # incremental: pieces handed out and not yet back
        self._kernel_has = bytearray(count)  # incremental: the kernel may still write there
        ring._attach_buffer_ring(self, group)  # sets group and mode, hands out every buffer
        self._closed = False

    def _map_ring(self) -> int:
        """Map the kernel-shared ring of entries (page-aligned, zeroed: tail 0)."""
        length = -(-self._entries * _BUF_ENTRY // PAGE) * PAGE
        self._ring_map = _private_map(length)
        self._ring_export = ffi.from_buffer(self._ring_map)
        self._ring_addr = int(ffi.cast("uintptr_t", self._ring_export))
        return self._ring_addr

    def _provide_ring(self, bids: list[int]) -> None:
        """Publish ``bids`` on the kernel buffer ring (mode "ring")."""
        if self.incremental:
            for bid in bids:
                self._next_off[bid] = 0
                self._kernel_has[bid] = 1
        table = array.array("H", bids)
        lib.sr_buf_ring_provide(self._ring_addr, self._entries - 1, self._slab.addrs,
                                self._slab.size, ffi.from_buffer("uint16_t[]", table), len(bids))

    def _take(self, res: int, flags: int) -> Buffer | None:
        """The Buffer a CQE filled (None if it carried no buffer, or no data: such a buffer
        goes straight back)."""
        if not flags & _F_BUFFER:
            return None
        bid = flags >> _BUFFER_SHIFT
        if self.incremental and bid < self._slab.count:
            return self._take_piece(bid, res, flags)
        if res <= 0 or bid >= self._slab.count:
            if bid < self._slab.count:
                self._give_back_later(bid)
            return None
        size = self._slab.size
        return Buffer._make(self._slab, bid, self, FILLED, res if res <= size else size)

    def _copy_out(self, res: int, flags: int) -> bytes | None:
        """The bytes a CQE brought, copied out, its buffer returned at once: for consumers
        that copy every chunk anyway (the asyncio transports), no :class:`Buffer` is made.
        None if the CQE carried no data.  Runs inside the completion path, so the buffer is
        handed to the kernel by the ring's next call (``_service_buffers``), not from here."""
        if not flags & _F_BUFFER:
            return None
        bid = flags >> _BUFFER_SHIFT
        if bid >= self._slab.count:
            return None
        if self.incremental:  # pieces share buffers: keep the general path
            buf = self._take(res, flags)
            if buf is None:
                return None
            whole = buf.tobytes()
            buf._abandon()
            return whole
        size = self._slab.size
        data = self._slab.maps[bid][:res if res <= size else size] if res > 0 else None
        # Back through the ring's next call (which it makes before waiting, and which the
        # asyncio driver makes at the end of the same poll): one C call hands back every
        # buffer a batch of CQEs used, instead of one call per chunk.
        self._returned.append(bid)
        self._ring._buffer_work = True
        return data

    def _take_piece(self, bid: int, res: int, flags: int) -> Buffer | None:
        # The kernel writes each chunk right after the previous one in the same buffer, and
        # says with F_BUF_MORE that it will go on; without it, it has moved to the next buffer.
        off = self._next_off[bid]
        if not flags & _F_BUF_MORE:
            self._kernel_has[bid] = 0
        if res <= 0:
            if not self._kernel_has[bid] and not self._pieces[bid]:
                self._give_back_later(bid)
            return None
        room = self._slab.size - off
        n = res if res <= room else room  # never past the buffer (see Buffer.state)
        self._next_off[bid] = off + n
        self._pieces[bid] += 1
        return Buffer._make(self._slab, bid, self, FILLED, n, off, n)

    def _piece_back(self, index: int) -> bool:
        """A piece of buffer ``index`` came back: True if the whole buffer can now go back."""
        if not self.incremental:
            return True
        self._pieces[index] -= 1
        return not self._pieces[index] and not self._kernel_has[index]

    def _reclaim(self) -> list[int]:
        return [index for index in super()._reclaim() if self._piece_back(index)]

    def _give_back(self, index: int) -> None:
        if not self._piece_back(index):
            return  # other pieces are out, or the kernel is still filling the buffer
        ring = self._ring
        if (self.mode == "ring" and not self._starved and not self._closed
                and ring._owner == _get_ident() and ring._chain is None):
            # The common case, kept short: released by the thread that owns the ring, outside
            # any of its calls (_owner would be the busy mark), nobody waiting for a buffer.
            # One C call publishes it; a signal handler can only run before or after it.
            if self.incremental:
                self._next_off[index] = 0
                self._kernel_has[index] = 1
            lib.sr_buf_ring_provide_one(self._ring_addr, self._entries - 1,
                                        self._slab.addrs[index], self._slab.size, index)
            self._gen += 1
            return
        self._returned.append(index)
        ring._recycle(self)

    def _give_back_later(self, index: int) -> None:
        # From the completion path: no SQE may be written there.
        self._returned.append(index)
        self._ring._buffer_work = True

    def close(self) -> None:
        """Take the group away from the kernel.  Refused (OperationStateError) while operations
        that pick from it are in flight; buffers you still hold stay valid until released."""
        if self._closed:
            return
        self._ring._detach_buffer_ring(self)
        self._closed = True

    def _ring_closed(self) -> None:
        self._closed = True
        self._starved.clear()

    @classmethod
    def _pinned_size(cls, obj: object) -> int:
        return 0  # library memory, counted by the buffers handed out (ring.stats())


    def __repr__(self) -> str:
        state = "closed" if self._closed else self.mode + (" incremental" if self.incremental else "")
        return f"<BufferRing group={self.group} count={self.count} size={self.size} {state}>"
