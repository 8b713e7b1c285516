"""Loads the compiled extension, checks that it belongs to this package version, and says why
io_uring is unavailable when it is.

On Linux a missing or stale ``saferring._uring`` is a broken install and fails loudly at import.
Elsewhere the package imports without it, and creating a ring raises
:class:`~saferring.errors.UnsupportedPlatformError`.
"""

from __future__ import annotations

import sys
from typing import Any

from ._version import __version__

ffi: Any
lib: Any
UNAVAILABLE_REASON: str | None = None

if sys.platform.startswith("linux"):
    try:
        from ._uring import ffi as _ffi
        from ._uring import lib as _lib
    except ImportError as exc:  # pragma: no cover - depends on a broken install
        raise ImportError(
            "saferring's compiled extension (saferring._uring) is missing or cannot load: "
            f"{exc}. Reinstall saferring (pip install --force-reinstall saferring, or "
            "'make test' in a checkout); building needs liburing-dev."
        ) from exc
    ffi = _ffi
    lib = _lib
    _stamp = ffi.string(lib.sr_build_stamp()).decode()
    if _stamp != __version__:
        raise ImportError(
            f"saferring._uring was built for saferring {_stamp}, but this is saferring "
            f"{__version__}: the compiled module is stale. Rebuild it (pip install -e . or "
            "python build_ffi.py in a checkout)."
        )
    LIBURING_VERSION = (
        f"{lib.SR_LIBURING_MAJOR}.{lib.SR_LIBURING_MINOR}" if lib.SR_LIBURING_MAJOR else "unknown"
    )
else:
    ffi = None
    lib = None
    UNAVAILABLE_REASON = f"io_uring is a Linux interface; this is {sys.platform}"
    LIBURING_VERSION = "none"
