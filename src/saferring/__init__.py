"""saferring: Linux io_uring for Python, through liburing, without memory-safety foot-guns.

No sequence of calls to this public API can crash the interpreter or let the kernel write into
memory Python has freed or reused: every operation pins what the kernel may touch until its final
completion, and misuse raises a documented exception.  The raw liburing binding, which promises
nothing, lives apart in :mod:`saferring.unsafe`.

>>> import saferring
>>> with saferring.Ring() as ring:
...     ring.run(ring.nop())
0
"""

from typing import TYPE_CHECKING, Any

from . import constants
from ._chain import Chain
from ._state import OpState
from ._version import __version__
from .buffers import Buffer, BufferPool, BufferRing, BufferState
from .errors import (
    BufferBusyError,
    ForkedRingError,
    MemlockLimitError,
    OperationCancelledError,
    OperationStateError,
    RingClosedError,
    SaferRingError,
    UnsupportedOperationError,
    UnsupportedPlatformError,
    WrongLoopError,
    WrongThreadError,
)
from .features import Features
from .fixed import FixedFile
from .operation import (
    BatchOperation,
    CancelOperation,
    MultishotOperation,
    Operation,
    ReceivedMessage,
    RecvmsgResult,
    SelectedBufferOperation,
    SelectedBuffersOperation,
    StatxResult,
    WaitidResult,
)
from .ring import Ring, RingStats

if TYPE_CHECKING:
    from . import aio
    from .aio import AsyncRing


def __getattr__(name: str) -> Any:
    # The asyncio layer is imported on first use: ``import saferring`` stays free of asyncio.
    if name in ("aio", "AsyncRing"):
        import importlib

        aio = importlib.import_module(".aio", __name__)
        return aio if name == "aio" else aio.AsyncRing
    raise AttributeError(f"module 'saferring' has no attribute {name!r}")


__all__ = [
    "AsyncRing",
    "BatchOperation",
    "Buffer",
    "BufferBusyError",
    "BufferPool",
    "BufferRing",
    "BufferState",
    "CancelOperation",
    "Chain",
    "Features",
    "FixedFile",
    "ForkedRingError",
    "MemlockLimitError",
    "MultishotOperation",
    "OpState",
    "Operation",
    "OperationCancelledError",
    "OperationStateError",
    "ReceivedMessage",
    "RecvmsgResult",
    "Ring",
    "RingClosedError",
    "RingStats",
    "SaferRingError",
    "SelectedBufferOperation",
    "SelectedBuffersOperation",
    "StatxResult",
    "UnsupportedOperationError",
    "UnsupportedPlatformError",
    "WaitidResult",
    "WrongLoopError",
    "WrongThreadError",
    "__version__",
    "aio",
    "constants",
]
