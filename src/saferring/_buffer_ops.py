"""Ring operations on library-owned buffers: registered (fixed) buffers, provided buffer rings,
and the receives and reads that pick their buffer from one (multishot included).

Two rules carry the safety here, next to the registry's usual pins:

* a :class:`~saferring.Buffer` handed to the kernel is ``IN_FLIGHT`` until the operation's final
  CQE (its state is read from the operation, so no completion path can forget to update it),
  and the operation pins the handle, which holds the memory;
* a provided buffer goes back to the kernel only when its handle was released (or dropped) and no
  memoryview of it is alive, so the kernel never writes into bytes someone is reading.

Requests that pick buffers re-arm themselves: after ``-ENOBUFS`` (the group ran dry; the kernel
consumed nothing) and, where the kernel has no multishot form, after every completion.  A
re-armed request keeps its user_data, its registry entry and its pins; see :meth:`_rearm` for the
order of the steps, which a signal handler raising in between must not break.
"""

from __future__ import annotations

import array
import errno
import os
import socket as _socket
import sys
from typing import TYPE_CHECKING, Any

from . import _pinning
from ._binding import ffi, lib
from ._guard import _BUSY, _NO_OWNER, _exclusive, _get_ident
from ._net_ops import _MSG_RECV, _MSG_SEND, _msg_flags
from ._ops_base import OpsBase, addr_of
from .buffers import CLAIMED, RELEASED, Buffer, BufferPool, BufferRing, memlock_error
from .errors import BufferBusyError, OperationStateError, UnsupportedOperationError, os_error
from .features import OP, kernel_can
from .fixed import FixedFile
from .operation import (
    BufferIoOperation,
    BufferSendZcOperation,
    CancelRequest,
    CopiedRecvOperation,
    SelectedBufferOperation,
    SelectedBuffersOperation,
    TimeoutRepeatOperation,
    new_operation,
)

if TYPE_CHECKING:
    from .operation import BatchOperation, Operation

_new_op = new_operation
_BUFFER_SELECT = 1 << 5  # IOSQE_BUFFER_SELECT
_RECV_MULTISHOT = 1 << 1  # IORING_RECV_MULTISHOT (in the SQE's ioprio)
_RECVSEND_FIXED_BUF = 1 << 2  # IORING_RECVSEND_FIXED_BUF (in the SQE's ioprio)
_NEG_ENOBUFS = -errno.ENOBUFS


class BufferOps(OpsBase):
    """Registered buffers, buffer rings and the operations that use them (mixed into Ring)."""

    __slots__ = ()

    if TYPE_CHECKING:
        _owner: Any
        _owner_ident: int
        _forked: bool
        _internal: dict[int, Any]

        def _finish(self, op: Operation[Any]) -> None: ...
        def _finish_orphans(self) -> None: ...
        _backlog: Any
        _cur: Any
        def _batch(self, count: int, kind: str, pins: Any, prep: Any, *args: Any) -> Any: ...
        def _list_ready(self, op: Operation[Any]) -> None: ...

    # -- registered buffers ------------------------------------------------------------------

    @_exclusive
    def _attach_pool(self, pool: BufferPool) -> None:
        if self._pool is not None and not self._pool.closed:
            raise OperationStateError("this ring already has a BufferPool (the kernel keeps one "
                                      "registered buffer table per ring); close it first")
        slab = pool._slab
        rc = lib.sr_register_buffers(self._c, slab.addrs, slab.size, slab.count)
        if rc == -errno.EBUSY:
            raise OperationStateError("this ring already has registered buffers")
        if rc < 0:
            raise memlock_error(-rc, slab.count * slab.stride)
        self._pool = pool

    @_exclusive
    def _detach_pool(self, pool: BufferPool) -> None:
        if self._pool is not pool:
            return
        def pinned(pins: Any) -> Any:
            # An operation pins one object, or a tuple/list of them; a batch of fixed-buffer
            # requests pins the list of its Buffers inside its tuple.
            if type(pins) is tuple or type(pins) is list:
                for pin in pins:
                    yield from pinned(pin)
            else:
                yield pins

        for op in list(self._registry.values()):
            for pin in pinned(op._pins):
                if type(pin) is Buffer and pin._owner is pool:
                    raise BufferBusyError("a buffer of this pool is still in flight; wait for it "
                                          "(or cancel it) first")
        rc = lib.sr_unregister_buffers(self._c)
        if rc < 0 and rc != -errno.ENXIO:
            raise os_error(-rc, "io_uring_unregister_buffers")
        self._pool = None

    # -- provided buffers ----------------------------------------------------------------------

    @_exclusive
    def _attach_buffer_ring(self, br: BufferRing, group: int | None) -> None:
        if self._chain is not None:
            raise OperationStateError("create buffer rings outside a chain")
        groups = self._groups
        if group is None:
            # Ids go round instead of reusing the lowest free one: Linux 6.1 keeps a buffer
            # ring's consumer head across unregistering it for ids below 64, so a new ring
            # registered under a recently used id starts "empty" (head == tail) and every
            # receive from it waits for ever (seen in the 6.1 guest).
            start = self._group_next
            group = next((start + i) & 0xFFFF for i in range(0x10000)
                         if (start + i) & 0xFFFF not in groups)
            self._group_next = (group + 1) & 0xFFFF
        elif group in groups:
            raise ValueError(f"buffer group {group} is already used on this ring")
        # The group is the ring's from now on, before the kernel hears of it: the ring keeps the
        # buffers' memory alive whatever interrupts this (the kernel may hold their addresses
        # as soon as a registration or a PROVIDE_BUFFERS request reached it).  Only a group the
        # kernel never took (registration refused) is given up again.
        br.group = group
        groups[group] = br
        try:
            self._register_group(br, group)
        except BaseException:
            if not br._kernel_took:
                del groups[group]
            raise

    def _register_group(self, br: BufferRing, group: int) -> None:
        mode = br.mode
        if mode in ("auto", "ring"):
            addr = br._map_ring()
            rc = -errno.EINVAL
            if br.want_incremental:
                # IOU_PBUF_RING_INC (6.12); an older kernel refuses the flag with EINVAL, and
                # then gets the plain ring (each chunk takes a whole buffer).
                rc = lib.sr_register_buf_ring(self._c, addr, br._entries, group, 2)
                br.incremental = rc >= 0
            if rc < 0:
                rc = lib.sr_register_buf_ring(self._c, addr, br._entries, group, 0)
            if rc >= 0:
                mode = "ring"
                br._kernel_took = True
            else:
                br._ring_map = br._ring_export = None
                # "auto" falls back to PROVIDE_BUFFERS when the kernel has no buffer rings
                # (EINVAL) and when it will not pin the ring of entries (ENOMEM: recent kernels
                # charge it to RLIMIT_MEMLOCK); provided buffers pin nothing.
                if mode == "ring" or rc not in (-errno.EINVAL, -errno.ENOMEM):
                    if rc == -errno.EINVAL:
                        raise UnsupportedOperationError(
                            "provided buffer rings (IORING_REGISTER_PBUF_RING) are not supported "
                            "by this kernel; they came in Linux 5.19 (mode='provide' works "
                            "from 5.7)")
                    if rc == -errno.ENOMEM:
                        raise memlock_error(-rc, br._entries * 16)
                    raise os_error(-rc, "io_uring_register_buf_ring")
                mode = "provide"  # the kernel has no buffer rings: provide them by SQE
        br.mode = mode
        bids = list(range(br.count))
        if mode == "ring":
            br._provide_ring(bids)
        else:
            self._require(OP["PROVIDE_BUFFERS"])
            br._kernel_took = True  # from the first SQE on, the kernel may list these buffers
            self._provide_by_sqe(br, bids)
            self._submit()

    def _provide_by_sqe(self, br: BufferRing, bids: list[int]) -> None:
        """Queue one ``IORING_OP_PROVIDE_BUFFERS`` per buffer (each is its own mapping).  They
        are the ring's own requests: their CQEs are consumed like its cancel requests'."""
        slab = br._slab
        for bid in bids:
            ud = self._take_ud()
            self._internal[ud] = CancelRequest(br)  # type: ignore[arg-type]  # a holder for res
            args = (OP["PROVIDE_BUFFERS"], 1, slab.addr(bid), slab.size, bid, 0, 0, 0,
                    br.group, 0, 0, 0)
            try:
                rc = lib.sr_prep_ext(self._c, ud, *args)
                if rc < 0:
                    self._prep_retry(ud, rc, lib.sr_prep_ext, self._c, ud, *args)
            except BaseException as exc:  # noqa: BLE001 - rolled back, then raised again
                raise self._unregister_if_unprepared(ud, exc) from None

    @_exclusive
    def _detach_buffer_ring(self, br: BufferRing) -> None:
        users = [op for op in list(self._registry.values())
                 if getattr(op, "_bufring", None) is br]
        if users:
            raise OperationStateError(f"{len(users)} operation(s) still pick buffers from this "
                                      f"ring (e.g. {users[0]!r}); cancel them first")
        if br.mode == "ring":
            rc = lib.sr_unregister_buf_ring(self._c, br.group)
            if rc < 0:
                raise os_error(-rc, "io_uring_unregister_buf_ring")
            del self._groups[br.group]
        # mode "provide": the kernel may still list buffers of the group; the ring keeps the
        # memory (and the group id) until it closes.

    def _recycle(self, br: BufferRing) -> None:
        """Buffers were given back: hand them to the kernel now if this thread owns the ring and
        is not inside one of its calls (a signal handler, a finaliser), else at the next
        ``wait()``/``submit()``."""
        self._buffer_work = True
        driver = self._driver() if self._driver is not None else None
        if driver is not None:
            driver._wake()  # an event loop drives the ring: it submits what this queues
        if self._closed or _get_ident() != self._owner or self._chain is not None:
            return
        self._owner = _BUSY
        try:
            self._service_buffers()
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    def _service_buffers(self) -> None:
        """Give returned buffers back to the kernel and re-arm requests that waited for one
        (called with the ring held, outside any chain)."""
        if self._chain is not None:
            return
        self._buffer_work = False
        while self._deferred:  # re-arms that waited for the caller's chain to close
            op = self._deferred.pop()
            if type(op) is TimeoutRepeatOperation:
                self._arm_repeat(op)
            else:
                self._arm_starved(op)
        for br in list(self._groups.values()):
            if br._closed:
                continue
            bids = br._reclaim()
            returned = br._returned
            while returned:
                bids.append(returned.popleft())
            if bids:
                if br.mode == "ring":
                    br._provide_ring(bids)
                else:
                    self._provide_by_sqe(br, bids)
                br._gen += 1
            if br._starved and bids:
                starved, br._starved = br._starved, []
                for op in starved:
                    self._arm_starved(op)
            if br._held:  # still in use (a view alive, an operation running): look again later
                self._buffer_work = True

    def _arm_starved(self, op: SelectedBuffersOperation) -> None:
        if op._res is not None or not op._starved:
            return
        br = op._bufring
        a = op._args
        op._starved = False
        op._armed_gen = br._gen
        rc = lib.sr_prep_ext(self._c, op._ud, a[0], a[1], 0, a[2], a[3], a[4], a[5], a[6],
                             br.group, 0, 0, 0)
        if rc < 0:  # the SQ could not take it now: try again at the next wait()
            op._starved = True
            br._starved.append(op)
            self._buffer_work = True

    def _rearm_select(self, op: SelectedBuffersOperation) -> bool:
        """Called by ``_finish`` for a final CQE of a request that picks buffers: True if the
        request goes on (re-armed, or waiting for a buffer), False if it really ends.

        Signal safety: ``_finish`` may be re-run for the same CQE (recovery after a handler
        raised).  ``_rstate`` says the CQE's data is already kept; the switch back to "in
        flight" (``_res = None``) and the SQE write follow each other with no Python call in
        between, so the request is armed at most once per CQE.
        """
        res = op._res
        assert res is not None
        br = op._bufring
        # Going on: after -ENOBUFS (nothing consumed), and after data without F_MORE from a
        # single-shot request of the fallback or from a multishot one the kernel stopped while
        # data still flows (its CQE did not fit the completion queue, for one).  End of stream
        # is res == 0.  A single recv/read (SelectedBufferOperation) ends with its data.
        if res != _NEG_ENOBUFS and (res <= 0 or type(op) is SelectedBufferOperation):
            return False
        if res > 0 and not op._rstate:
            self._list_ready(op)
            op._rstate = 1
            op._items.append((res, op._last_flags))
            op._arrived()
        if op.cancel_requested or br._closed or self._closed:
            if res == _NEG_ENOBUFS:
                op._res = -errno.ECANCELED if op.cancel_requested else res
            elif res > 0:
                # Data in the final CQE of a request that is not going on (the kernel ended it
                # because its CQE did not fit the CQ, say, just as it was cancelled): the data
                # is kept (above), but the stream did not end, so the outcome is CANCELLED, not
                # the COMPLETED that means end of stream.  Its buffer is now a value: _settle
                # must not also hand it back.
                op._last_flags = 0
                op._res = -errno.ECANCELED
            return False
        if res == _NEG_ENOBUFS and br._gen == op._armed_gen:
            # Nothing came back since the request was armed: wait for a buffer.
            op._res = None
            op._rstate = 0
            op._starved = True
            br._starved.append(op)
            return True
        if self._chain is not None:
            return self._defer_rearm(op)
        a = op._args
        op._res = None
        op._rstate = 0
        op._last_flags = 0
        op._armed_gen = br._gen
        rc = lib.sr_prep_ext(self._c, op._ud, a[0], a[1], 0, a[2], a[3], a[4], a[5], a[6],
                             br.group, 0, 0, 0)
        if rc < 0:
            op._starved = True
            br._starved.append(op)
            self._buffer_work = True
        return True

    def _defer_rearm(self, op: Any) -> bool:
        """An SQE written now would join the chain the caller has open (``wait(0)`` may reap
        inside one): the request goes on, armed once the chain is closed.  Returns True (the
        request goes on), for ``_rearm_*``."""
        op._res = None
        op._rstate = 0
        op._starved = True
        self._deferred.append(op)
        self._buffer_work = True
        return True

    def _arm_repeat(self, op: TimeoutRepeatOperation) -> None:
        """Arm a repeating timeout whose re-arm waited for the caller's chain to close."""
        if op._res is not None or not op._starved:
            return
        addr, flags = op._args
        op._starved = False
        rc = lib.sr_prep_ext(self._c, op._ud, OP["TIMEOUT"], -1, addr, 1, 0, flags, 0, 0, 0, 0,
                             0, 0)
        if rc < 0:
            op._starved = True
            self._deferred.append(op)
            self._buffer_work = True

    def _cancel_waiting(self, fd: int | None) -> None:
        """End the requests that wait for a buffer (or for a chain to close) and have nothing in
        the kernel, which a kernel cancel by descriptor or of everything cannot find: those on
        the file ``fd`` refers to, or all of them (``fd`` None)."""
        waiting = [op for br in self._groups.values() for op in br._starved]
        waiting += [op for op in self._deferred if op not in waiting]
        if fd is not None:
            # Such a request holds a duplicate of the caller's descriptor: compare files.
            try:
                st = os.fstat(fd)
            except OSError:
                return
            target = (st.st_dev, st.st_ino)

            def same_file(op: Any) -> bool:
                args = getattr(op, "_args", None)
                if not isinstance(op, SelectedBuffersOperation) or not args or args[1] < 0:
                    return False
                try:
                    other = os.fstat(args[1])
                except OSError:
                    return False
                return (other.st_dev, other.st_ino) == target

            waiting = [op for op in waiting if same_file(op)]
        for op in waiting:
            if op._res is None and getattr(op, "_starved", False):
                op._cancel = True
                self._cancelled.add(op._ud)
                self._finish_starved(op)

    def _finish_starved(self, op: Any) -> None:
        """Cancel a request that waits for a buffer: it has nothing in the kernel.

        Recorded like a completion loop records a CQE: as the operation being finished
        (``_cur``) with a pending (empty) backlog, so that if a signal handler raises inside
        ``_finish``, the next reap (or ``close()``) finishes it instead of leaving it in flight."""
        op._starved = False
        for waiting in (getattr(getattr(op, "_bufring", None), "_starved", []), self._deferred):
            try:
                waiting.remove(op)
            except ValueError:
                pass
        if self._cur is not None:
            # An interrupted completion loop left an operation half recorded: finish it first,
            # or taking _cur over here would lose the only pointer to it.
            self._finish_orphans()
        mine = self._backlog is None
        if mine:
            self._backlog = ()
        self._cur = op
        op._res = -errno.ECANCELED
        self._finish(op)
        self._cur = None
        if mine:
            self._backlog = None

    # -- operations --------------------------------------------------------------------------

    def _lend(self, op: Any, buf: Buffer, reading: bool, fixed: bool, member: int = -1) -> int:
        if fixed:
            pool = self._pool
            if buf._owner is not pool or pool is None or pool.closed:
                raise OperationStateError(
                    "read_fixed/write_fixed need a buffer leased from this ring's open "
                    "BufferPool (pool.lease())")
        return buf._lend(op, reading, member)

    def _buffer_io(self, label: str, opcode: int, fd: Any, buf: Buffer, reading: bool,
                   off: int, op_flags: int, length: int | None, fixed: bool,
                   ioprio: int = 0, zc: bool = False, address: Any = None) -> Any:
        self._require(opcode)
        fd, sqe_flags = self._fd(fd)
        state_len = buf._cap if reading else buf.nbytes
        if length is None:
            length = state_len
        elif type(length) is not int or not 0 <= length <= state_len:
            raise ValueError(f"length must be an int between 0 and {state_len}, got {length!r}")
        pins: Any = buf
        dest, dest_len = 0, 0
        if address is not None:  # send_zc to an address: the sockaddr is pinned too
            name, name_len = self._address(fd, sqe_flags, address)
            pins = (buf, name)
            dest, dest_len = addr_of(name), lib.sr_addr_len_word(name_len)
        if zc:
            op: Any = _new_op(BufferSendZcOperation, self, pins, self._take_flagged_ud())
            op._kind_name = label
        else:
            op = _new_op(BufferIoOperation, self, pins, self._take_ud())
            op._label = label
        addr = self._lend(op, buf, reading, fixed and not zc)
        try:
            self._queue_ext(op, opcode, fd, addr, length, dest if zc else off, op_flags,
                            sqe_flags, ioprio, buf._index if (fixed or ioprio) else 0,
                            dest_len)
        except BaseException:
            if op._ud not in self._registry:
                buf._unlend()
            raise
        return op

    @_exclusive
    def read_fixed(self, fd: Any, buffer: Buffer, offset: int = -1,
                   length: int | None = None) -> BufferIoOperation:
        """Queue a read into a registered buffer (``IORING_OP_READ_FIXED``): ``buffer`` is
        leased from this ring's :class:`~saferring.BufferPool`.  Up to ``length`` bytes (the
        buffer's size by default) at ``offset`` (-1: the file position).  The result is the
        byte count; the buffer is then ``FILLED`` with it."""
        off = _offset(offset)
        return self._buffer_io("read_fixed", OP["READ_FIXED"], fd, _buffer(buffer), True, off,  # type: ignore[no-any-return]
                               0, length, True)

    @_exclusive
    def write_fixed(self, fd: Any, buffer: Buffer, offset: int = -1,
                    length: int | None = None) -> BufferIoOperation:
        """Queue a write from a registered buffer (``IORING_OP_WRITE_FIXED``): its filled bytes
        (or the first ``length``) at ``offset`` (-1: the file position)."""
        off = _offset(offset)
        return self._buffer_io("write_fixed", OP["WRITE_FIXED"], fd, _buffer(buffer), False,  # type: ignore[no-any-return]
                               off, 0, length, True)

    @_exclusive
    def read_fixed_many(self, fd: Any, buffers: Any, offsets: Any,
                        length: int | None = None) -> BatchOperation:
        """Queue one ``read_fixed`` per buffer as one :class:`~saferring.BatchOperation` (one
        call into C): ``buffers[i]`` (leased from this ring's pool) reads ``length`` bytes
        (default: the pool's buffer size) at ``offsets[i]`` (>= 0).  Each buffer is
        ``IN_FLIGHT`` until the batch ends, then ``FILLED`` with its own read's byte count."""
        self._require(OP["READ_FIXED"])
        pool = self._pool
        if pool is None or pool._closed:
            raise OperationStateError("read_fixed_many needs this ring's open BufferPool")
        bufs = list(buffers)
        offs = _pinning.offsets_array(offsets)
        if not bufs or len(bufs) != len(offs):
            raise ValueError(f"need one offset per buffer (and at least one): got {len(bufs)} "
                             f"buffers, {len(offs)} offsets")
        slab = pool._slab
        size = slab.size
        if length is None:
            length = size
        elif type(length) is not int or not 0 <= length <= size:
            raise ValueError(f"length must be an int between 0 and {size}, got {length!r}")
        fd, sqe_flags = self._fd(fd)
        if sqe_flags:
            raise TypeError("read_fixed_many takes a descriptor, not a FixedFile")
        # The checks _lend makes, once per buffer, without a call per check (this is the
        # batch path: 32 buffers per call are common).  Each buffer is claimed (IN_FLIGHT) as
        # soon as it passed, with no call in between, so nothing can release or lend it while
        # the batch is being queued.
        index = array.array("H")
        maps, baseline, refs = slab.maps, slab._baseline, sys.getrefcount
        claimed: list[tuple[Buffer, Any]] = []
        try:
            for buf in bufs:
                if type(buf) is not Buffer or buf._owner is not pool:
                    raise OperationStateError("read_fixed_many needs buffers leased from this "
                                              "ring's BufferPool")
                i = buf._index
                if refs(maps[i]) > baseline:  # slab.views_alive(i), inlined
                    buf._no_views("hand it to the kernel")
                prev = buf._op
                if prev is CLAIMED:
                    raise ValueError("a buffer appears twice in buffers")
                if (prev is not None and prev._res is None) or buf._state is RELEASED:
                    buf._usable("hand it to the kernel")  # raises
                buf._op = CLAIMED
                claimed.append((buf, prev))
                index.append(i)
        except BaseException:
            for buf, prev in claimed:
                buf._op = prev  # an earlier operation's result stays readable
            raise
        table = slab.addrs
        addrs = array.array("Q", [table[i] for i in index])
        ud = self._next_ud
        try:
            op = self._batch(len(bufs), "read_fixed", bufs, lib.sr_prep_fixed_blocks,
                             OP["READ_FIXED"], fd, ffi.from_buffer("uint64_t[]", addrs),
                             ffi.from_buffer("uint16_t[]", index), length,
                             ffi.from_buffer("uint64_t[]", offs))
        except BaseException:
            # Members the kernel got run to their end: their buffers follow the batch (found by
            # its user_data); if nothing was queued, the buffers are free again.
            batch = self._registry.get(ud)
            for member, buf in enumerate(bufs):
                buf._op = batch
                buf._reading = True
                buf._member = member
            raise
        for member, buf in enumerate(bufs):
            buf._op = op
            buf._reading = True
            buf._member = member
        return op  # type: ignore[no-any-return]

    def _read_buffer(self, fd: Any, buffer: Any, offset: int) -> Any:
        """``ring.read`` with a :class:`Buffer` or a :class:`BufferRing` (called by read())."""
        if type(buffer) is BufferRing:
            return self._select(SelectedBufferOperation, "read", OP["READ"], fd, buffer,
                                _offset(offset), 0, False)
        return self._buffer_io("read", OP["READ"], fd, buffer, True, _offset(offset), 0, None,
                               False)

    def _write_buffer(self, fd: Any, buffer: Buffer, offset: int) -> Any:
        return self._buffer_io("write", OP["WRITE"], fd, buffer, False, _offset(offset), 0,
                               None, False)

    def _recv_buffer(self, fd: Any, buffer: Any, flags: int) -> Any:
        if type(buffer) is BufferRing:
            return self._select(SelectedBufferOperation, "recv", OP["RECV"], fd, buffer, 0,
                                _select_flags(flags), False)
        return self._buffer_io("recv", OP["RECV"], fd, buffer, True, 0, _recv_flags(flags),
                               None, False)

    def _send_buffer(self, fd: Any, buffer: Buffer, flags: int, zc: bool,
                     address: Any = None) -> Any:
        flags = _msg_flags(flags, _MSG_SEND, "send_zc()" if zc else "send()")
        if zc:
            self._require(OP["SEND_ZC"])
            pool = self._pool
            registered = buffer._owner is pool and pool is not None and not pool.closed
            return self._buffer_io("send_zc", OP["SEND_ZC"], fd, buffer, False, 0, flags, None,
                                   False, _RECVSEND_FIXED_BUF if registered else 0, zc=True,
                                   address=address)
        return self._buffer_io("send", OP["SEND"], fd, buffer, False, 0, flags, None, False)

    def _select(self, cls: Any, label: str, opcode: int, fd: Any, br: BufferRing, off: int,
                op_flags: int, multishot: bool, single: bool = False) -> Any:
        """Queue a request that picks its buffer from ``br`` (and re-arms itself)."""
        if not isinstance(br, BufferRing):
            raise TypeError(f"buffers must be a BufferRing, got {type(br).__name__}")
        if br._ring is not self:
            raise OperationStateError("this BufferRing belongs to another ring")
        if br._closed:
            raise OperationStateError("this BufferRing is closed")
        if isinstance(fd, FixedFile):
            raise TypeError(f"{label}() with a BufferRing takes a descriptor or a socket, not a "
                            "FixedFile (a re-armed request must reach the same file)")
        self._require(opcode)
        fd, _flags = self._fd(fd)
        owned = _pinning.OwnedFd(fd)
        ioprio = _RECV_MULTISHOT if multishot and opcode == OP["RECV"] else 0
        op: Any = _new_op(cls, self, (br, owned), self._take_flagged_ud())
        op._label = label
        op._bufring = br
        op._args = (opcode, owned.fd, 0, off, op_flags, _BUFFER_SELECT, ioprio)
        op._armed_gen = br._gen
        op._rstate = 0
        op._single = single
        op._starved = False
        op._last_flags = 0
        return self._queue_ext(op, opcode, owned.fd, 0, 0, off, op_flags, _BUFFER_SELECT,
                               ioprio, br.group)

    @_exclusive
    def recv_multishot(self, fd: Any, buffers: BufferRing, flags: int = 0, *,
                       single_shot: bool = False) -> SelectedBuffersOperation:
        """Receive on ``fd`` into buffers the kernel picks from ``buffers``, one value (a
        ``FILLED`` :class:`~saferring.Buffer`) per chunk, as they arrive: iterate over the
        operation, or collect with ``ring.wait()`` and ``op.take()``.  Release each buffer to
        give it back.  Ends at end of stream (COMPLETED), on an error, or when cancelled.

        Uses the kernel's multishot receive (Linux 6.0); before that, or with
        ``single_shot=True``, one receive at a time re-armed after each (same values).
        """
        multishot = not single_shot and kernel_can("RECV_MULTISHOT")
        return self._select(SelectedBuffersOperation, "recv", OP["RECV"], fd, buffers, 0,  # type: ignore[no-any-return]
                            _select_flags(flags), multishot, single=not multishot)

    @_exclusive
    def _recv_copied(self, fd: Any, buffers: BufferRing) -> CopiedRecvOperation:
        """``recv_multishot`` whose values are ``bytes`` copied out as they arrive (the buffer
        goes straight back to the kernel): the asyncio transports' receive."""
        multishot = kernel_can("RECV_MULTISHOT")
        return self._select(CopiedRecvOperation, "recv", OP["RECV"], fd, buffers, 0,  # type: ignore[no-any-return]
                            0, multishot, single=not multishot)

    @_exclusive
    def read_multishot(self, fd: Any, buffers: BufferRing, *,
                       single_shot: bool = False) -> SelectedBuffersOperation:
        """Read from ``fd`` (a pipe, socket or other pollable file) into buffers the kernel
        picks from ``buffers``, one value per chunk, until end of file: like
        :meth:`recv_multishot`.  Uses ``IORING_OP_READ_MULTISHOT`` (Linux 6.7); before that,
        or with ``single_shot=True``, one read at a time re-armed after each."""
        multishot = not single_shot and bool(self._sup[OP["READ_MULTISHOT"]])
        if multishot:
            return self._select(SelectedBuffersOperation, "read_multishot",  # type: ignore[no-any-return]
                                OP["READ_MULTISHOT"], fd, buffers, 0, 0, True)
        return self._select(SelectedBuffersOperation, "read", OP["READ"], fd, buffers,  # type: ignore[no-any-return]
                            -1 & 0xFFFF_FFFF_FFFF_FFFF, 0, False, single=True)


def _buffer(buffer: Any) -> Buffer:
    if type(buffer) is not Buffer:
        raise TypeError(f"buffer must be a saferring.Buffer leased from a BufferPool, got "
                        f"{type(buffer).__name__}")
    return buffer


def _offset(value: Any) -> int:
    offset: int = _pinning.index(value, "offset")
    _pinning.check_offset(offset)  # the same rule as ring.read's (no silent truncation)
    return offset & 0xFFFF_FFFF_FFFF_FFFF


def _recv_flags(flags: Any) -> int:
    return _msg_flags(flags, _MSG_RECV, "recv()")


def _select_flags(value: Any) -> int:
    # MSG_TRUNC makes a datagram receive report the datagram's length, not what the picked
    # buffer holds: refused here (a plain recv into a Buffer keeps only what fits).
    flags = _recv_flags(value)
    if flags & int(_socket.MSG_TRUNC | _socket.MSG_PEEK):
        # MSG_PEEK would hand out the same bytes again and again, each in a new buffer.
        raise ValueError("MSG_TRUNC and MSG_PEEK are not taken by a receive that picks from a "
                         "BufferRing")
    return flags
