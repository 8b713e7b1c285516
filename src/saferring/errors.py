"""saferring's exceptions, and the one path that turns a kernel error code into an exception.

Two families:

* **Kernel outcomes** are plain :class:`OSError` built from the errno, so Python's own subclasses
  apply (``FileNotFoundError``, ``BlockingIOError``, ``ConnectionResetError``...).  A failed CQE and
  a failed ``io_uring_setup`` both go through :func:`os_error`.
* **Library misuse or limits** are subclasses of :class:`SaferRingError`, which is never raised
  itself: catch it to catch "saferring refused to do that".
"""

from __future__ import annotations

import os


class SaferRingError(Exception):
    """Base class of every exception saferring raises for misuse or missing support.

    Never raised directly.
    """


class UnsupportedPlatformError(SaferRingError):
    """io_uring cannot be used here: not Linux, or the compiled extension is missing."""


class UnsupportedOperationError(SaferRingError):
    """The running kernel (or the liburing saferring was built with) lacks an operation or flag.

    The message names the operation and the kernel version that brought it.
    """


class RingClosedError(SaferRingError):
    """The ring was closed; nothing more can be submitted, waited for or cancelled on it."""


class ForkedRingError(SaferRingError):
    """The ring belongs to the parent process: a forked child may not touch it.

    io_uring's queues are shared memory with the kernel; a child writing to them would corrupt
    the parent's ring.  Create a new :class:`~saferring.Ring` in the child instead.
    """


class WrongThreadError(SaferRingError):
    """The ring was used from a thread other than the one that created it.

    liburing's queues are single-producer, single-consumer and saferring does not lock them; see
    ``docs/design.md`` ("Threads") for why a ring has one owner thread.
    """


class WrongLoopError(SaferRingError, RuntimeError):
    """An :class:`~saferring.aio.AsyncRing` was used outside the event loop it is bound to (no
    loop running, or another one): its completions are collected by that loop alone."""


class OperationStateError(SaferRingError):
    """The operation is not in a state that allows what was asked (see :class:`~saferring.OpState`)."""


class BufferBusyError(SaferRingError, BufferError):
    """A buffer is owned by the kernel (an operation using it is in flight) and cannot be touched."""


class MemlockLimitError(SaferRingError, MemoryError):
    """The kernel could not pin registered buffers: ``RLIMIT_MEMLOCK`` is too low (the message
    says what it is and how to raise it)."""


class OperationCancelledError(SaferRingError, OSError):
    """The operation ended because it was cancelled (its CQE carried ``-ECANCELED``/``-EINTR``).

    Also an :class:`OSError` whose ``errno`` is the CQE's error code.
    """


def read_proc(name: str, proc: str = "/proc") -> str | None:
    """The text of ``proc/name`` (``"self/status"``, ``"sys/kernel/..."``), or None if unreadable.

    For error messages only.  Read as bytes and decoded by the interpreter's built-in UTF-8
    codec: a process that changed its uid may no longer be able to import a codec module, and
    an error path must not fail on that."""
    try:
        with open(os.path.join(proc, name), "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


def process_status(proc: str = "/proc") -> dict[str, str]:
    """``/proc/self/status`` as a dict (empty if unreadable)."""
    status: dict[str, str] = {}
    for line in (read_proc("self/status", proc) or "").splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    return status


def has_capability(status: dict[str, str], bit: int) -> bool | None:
    """Whether capability ``bit`` is effective, from :func:`process_status` (None: unknown)."""
    try:
        return bool(int(status["CapEff"], 16) >> bit & 1)
    except (KeyError, ValueError):
        return None


#: Where RLIMIT_MEMLOCK is raised, for the messages that name it.
RAISE_MEMLOCK = "ulimit -l, LimitMEMLOCK= in a systemd unit, memlock in /etc/security/limits.conf"


def rlimit_text(which: int) -> str | None:
    """``"now N bytes, hard limit M bytes"`` for the resource limit ``which`` (a
    ``resource.RLIMIT_*``), or None when its soft limit is unlimited."""
    import resource

    soft, hard = resource.getrlimit(which)
    if soft == resource.RLIM_INFINITY:
        return None
    top = "unlimited" if hard == resource.RLIM_INFINITY else f"{hard} bytes"
    return f"now {soft} bytes, hard limit {top}"


def os_error(code: int, what: str | None = None) -> OSError:
    """Return the :class:`OSError` (subclass chosen by Python from ``code``) for a positive errno."""
    message = os.strerror(code)
    if what:
        return OSError(code, f"{message} ({what})")
    return OSError(code, message)


def cancelled_error(code: int, what: str) -> OperationCancelledError:
    """Return the exception for an operation that ended with a cancellation errno."""
    return OperationCancelledError(code, f"{os.strerror(code)} ({what} was cancelled)")


__all__ = [
    "BufferBusyError",
    "ForkedRingError",
    "MemlockLimitError",
    "OperationCancelledError",
    "OperationStateError",
    "RingClosedError",
    "SaferRingError",
    "UnsupportedOperationError",
    "UnsupportedPlatformError",
    "WrongLoopError",
    "WrongThreadError",
    "cancelled_error",
    "os_error",
]
