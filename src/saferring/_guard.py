"""The one-owner-thread, no-re-entry guard every Ring call runs under (see ring.py's docstring)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

_get_ident = threading.get_ident
_NO_OWNER = -1  # _owner of a ring that is closed or belongs to a parent process
_BUSY = -2  # _owner while a call is running on the ring: re-entry is refused

P = ParamSpec("P")
R = TypeVar("R")


def _exclusive(method: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[Any, P], R]:
    """Run a Ring method only on the owner thread, and mark the ring busy while it runs.

    Marking it busy is what refuses re-entry: user code can run in the middle of a call (an
    iterator being consumed, ``__index__`` of an argument, a finaliser run by the garbage
    collector, a pin's ``__del__`` when the kernel is done with it, a signal handler), and such
    code must not close or drive the ring underneath the call.
    """

    def exclusive(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if _get_ident() != self._owner:
            self._refuse()
        self._owner = _BUSY
        try:
            return method(self, *args, **kwargs)
        finally:
            self._owner = (self._owner_ident, _NO_OWNER)[self._forked]  # no jump: see close()

    functools.update_wrapper(exclusive, method)
    return exclusive
