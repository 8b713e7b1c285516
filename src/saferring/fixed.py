"""Registered ("fixed") files: handles to slots of a ring's file table.

A registered file is addressed by its slot number, not by a descriptor.  Slot numbers are
reused: after ``close_direct``, ``update_files`` or ``unregister_files`` the same number may
name another file, or none.  A raw int would silently address whatever is there now, so saferring
hands out :class:`FixedFile` handles instead.  Each remembers the slot's *generation*; the ring
bumps a slot's generation whenever its content may change, and refuses a handle whose
generation is stale with :class:`~saferring.OperationStateError`, before anything is submitted.

The kernel holds its own reference to every file a request uses, so a file replaced or
unregistered while a request on it is in flight stays open until that request ends: slots are
about naming, never about memory safety.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import OperationStateError

if TYPE_CHECKING:
    from .ring import Ring


class FileTable:
    """The Python side of one registration of a ring's file table."""

    __slots__ = ("generations", "touched", "version")

    def __init__(self, size: int) -> None:
        self.generations = [0] * size
        self.version = 0  # counts bumps
        self.touched = [0] * size  # the version of each slot's last bump

    def bump(self, slot: int) -> int:
        gen = self.generations[slot] + 1
        self.generations[slot] = gen
        self.version += 1
        self.touched[slot] = self.version
        return gen

    def touched_since(self, slot: int, version: int) -> bool:
        """True if ``slot`` was bumped after the table was at ``version``."""
        return self.touched[slot] > version


class FixedFile:
    """A handle to one slot of a ring's registered file table.

    Pass it wherever an operation takes a file descriptor (``ring.read(fixed, buf)``,
    ``ring.send(fixed, data)``...): the request then uses ``IOSQE_FIXED_FILE``, which saves the
    kernel a file-table lookup per request.  Created by ``Ring.register_files``,
    ``Ring.update_files``, the ``*_direct`` operations and ``Ring.fixed_file``; never directly.
    """

    __slots__ = ("_generation", "_ring", "_slot", "_table")

    _ring: Ring
    _table: FileTable
    _slot: int
    _generation: int

    def __init__(self) -> None:
        raise TypeError("FixedFile handles come from Ring.register_files(), Ring.update_files(), "
                        "the *_direct operations or Ring.fixed_file()")

    @classmethod
    def _make(cls, ring: Ring, table: FileTable, slot: int) -> FixedFile:
        handle = object.__new__(cls)
        handle._ring = ring
        handle._table = table
        handle._slot = slot
        handle._generation = table.generations[slot]
        return handle

    @property
    def slot(self) -> int:
        """The slot number in the ring's registered file table."""
        return self._slot

    @property
    def valid(self) -> bool:
        """False once the slot was closed, replaced or unregistered since this handle was made."""
        return (self._ring._files is self._table
                and self._table.generations[self._slot] == self._generation)

    def _check(self, ring: Ring) -> int:
        if ring is not self._ring:
            raise OperationStateError(f"{self!r} belongs to another ring")
        if not self.valid:
            raise OperationStateError(
                f"{self!r} is stale: its slot was closed, replaced or unregistered since the "
                "handle was made")
        return self._slot

    def __repr__(self) -> str:
        return f"<FixedFile slot={self._slot}{'' if self.valid else ' stale'}>"


__all__ = ["FixedFile"]
