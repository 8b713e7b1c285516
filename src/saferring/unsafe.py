"""The raw layer: liburing through cffi, with none of saferring's guarantees.

``ffi`` and ``lib`` are the compiled module's objects.  ``lib.io_uring_*`` are liburing's own
functions, one cffi call each; nothing records what you submit and nothing keeps your buffers
alive, so a buffer freed before its completion arrives is written into by the kernel anyway.
This layer exists for measuring what the safe layer costs (see ``benchmarks/``) and for experts
who take that responsibility.  ``None`` on platforms without the extension.
"""

from ._binding import ffi, lib

__all__ = ["ffi", "lib"]
