"""Linked requests: ``with ring.chain(): ...``.

io_uring runs a chain of linked SQEs (``IOSQE_IO_LINK``) one after the other, each starting only
when the previous one succeeded; if one fails, the rest end with ``-ECANCELED``.  With
``hard=True`` the chain goes on after a failure, a cancellation included.  The kernel reads
the chain from the SQ in one submission, and a chain cut in two by a submission boundary is
*two* chains.  So while a chain is open nothing
reaches the kernel: C writes each SQE with the link flag without flushing the SQ, ``submit``/
``wait``/``run``/``cancel`` refuse with :class:`~saferring.OperationStateError`, a chain that
outgrows the SQ raises ``ValueError``, and leaving the block removes the link flag from the last
SQE.  If the block raises, the operations already queued in it stay queued, as a complete chain
of what was queued (they own their buffers like any other operation).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any

from .errors import OperationStateError

if TYPE_CHECKING:
    from .operation import Operation
    from .ring import Ring


class Chain:
    """The chain ``Ring.chain()`` opens: a context manager.  After the block, :attr:`ops` lists
    the operations queued in it, in order."""

    __slots__ = ("_first_ud", "_ops", "_ring", "_state", "drain", "hard")

    def __init__(self, ring: Ring, hard: bool, drain: bool) -> None:
        self._ring = ring
        self.hard = hard
        self.drain = drain
        self._state = "new"
        self._first_ud = 0
        self._ops: list[Operation[Any]] = []

    def __enter__(self) -> Chain:
        if self._state != "new":
            raise OperationStateError("a Chain is entered once; call ring.chain() again")
        self._ring._open_chain(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._state == "open":
            self._ring._close_chain(self)

    def _members(self) -> list[Operation[Any]]:
        """The operations queued since the chain opened (nothing was submitted since, so all of
        them are in the registry, under their user_data, tagged or not)."""
        from .operation import UD_FLAGGED

        registry = self._ring._registry
        return [op for ud in range(self._first_ud, self._ring._next_ud)
                if (op := registry.get(ud) or registry.get(ud | UD_FLAGGED)) is not None]

    def _closed_by_ring(self) -> None:
        self._ops = self._members()
        self._state = "closed"

    @property
    def ops(self) -> list[Operation[Any]]:
        """The operations queued in the chain, in submission order (complete once it closed)."""
        return self._members() if self._state == "open" else list(self._ops)

    def __repr__(self) -> str:
        return f"<Chain {'hard' if self.hard else 'soft'} {self._state}>"
