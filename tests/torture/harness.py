"""The torture harness: each scenario runs alone in a fresh interpreter (``run.py NAME``), so a
crash is one failed test, not a lost run.

A scenario is a function ``scenario(ctx)`` registered with :func:`scenario`.  Around it the harness
checks what the safety promise says must hold whatever the scenario did:

* **unrelated memory is unchanged**: before the scenario, the harness fills a spread of
  ``bytearray`` canaries (sizes from 1 byte to 1 MiB) with a known pattern; scenarios add their
  own with :meth:`Context.spray`, right after dropping a buffer, so that freed memory is likely to
  be reused by a canary.  A kernel write into freed-and-reused memory shows up as a changed canary.
* **nothing leaked**: after the scenario (and a garbage collection) every ring it made is idle
  (no operation in flight, nothing pinned) and closed, no ring is left alive at all, and the
  process has exactly the file descriptors it had before.
* **the documented exception**: :meth:`Context.raises` fails unless the call raises exactly the
  named exception type (or a subclass).

Exit status: 0 and a last line ``TORTURE-OK NAME`` when every check passed; 77 with the reason
on stdout when the kernel lacks what the scenario needs (the test is then skipped); anything else
is a failure (a signal, an assertion, an unexpected exception).
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import saferring
from saferring.ring import _live_rings

SKIP_STATUS = 77

ScenarioFn = Callable[["Context"], None]
SCENARIOS: dict[str, tuple[ScenarioFn, tuple[str, ...]]] = {}


def scenario(*needs: str) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register the decorated function as a scenario named after it.

    ``needs`` are kernel requirements in the form ``tests/_helpers.py`` ``kernel_lacks`` takes
    (``"op:RECV"``, ``"feat:NODROP"``, ``"can:MULTISHOT_ACCEPT"``...): the scenario is skipped,
    saying why, when the running kernel lacks one.
    """
    def register(fn: ScenarioFn) -> ScenarioFn:
        if fn.__name__ in SCENARIOS:
            raise RuntimeError(f"two torture scenarios are named {fn.__name__}")
        SCENARIOS[fn.__name__] = (fn, needs)
        return fn
    return register


class ScenarioSkipped(Exception):
    """Raised by :meth:`Context.skip`: the scenario cannot run here (the message says why)."""


class Canaries:
    """``count`` bytearrays of ``size`` bytes, each filled with its own pattern."""

    def __init__(self, size: int, count: int, seed: int) -> None:
        self.blocks = [bytearray(self._pattern(size, seed + i)) for i in range(count)]
        self.digests = [hashlib.blake2b(b, digest_size=16).digest() for b in self.blocks]
        self.size = size

    @staticmethod
    def _pattern(size: int, seed: int) -> bytes:
        unit = hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=64).digest()
        return (unit * (size // 64 + 1))[:size]

    def changed(self) -> list[int]:
        """Indexes of the canaries whose contents are not what they were filled with."""
        return [i for i, (b, d) in enumerate(zip(self.blocks, self.digests, strict=True))
                if len(b) != self.size or hashlib.blake2b(b, digest_size=16).digest() != d]


class CCanaries:
    """Canaries for memory cffi owns (C copies of paths, timespecs, iovec arrays, msghdrs,
    ``struct statx``...): cffi takes it from C ``malloc``, which bytearray canaries (CPython's
    small-object allocator) never reuse.  :meth:`spray` makes objects of the very C type and
    length of a dropped pin, so ``malloc`` hands them its memory if the pin was wrongly freed,
    and fills them with a pattern; :meth:`changed` counts those that changed."""

    def __init__(self, seed: int) -> None:
        self.objs: list[Any] = []
        self.want: list[bytes] = []
        self.seed = seed

    def spray(self, ctype: str, length: int | None = None, count: int = 128) -> None:
        """Allocate ``count`` C objects of ``ctype`` (``length`` items for arrays), patterned."""
        from saferring.unsafe import ffi

        for _ in range(count):
            obj = ffi.new(ctype) if length is None else ffi.new(ctype, length)
            raw = ffi.buffer(obj)
            raw[:] = Canaries._pattern(len(raw), self.seed + len(self.objs))
            self.objs.append(obj)
            self.want.append(raw[:])

    def changed(self) -> int:
        """How many of the C canaries no longer hold their pattern."""
        from saferring.unsafe import ffi

        return sum(1 for obj, want in zip(self.objs, self.want, strict=True)
                   if ffi.buffer(obj)[:] != want)

    def check(self) -> None:
        """Fail now if a C canary changed (a late kernel write into freed memory)."""
        bad = self.changed()
        assert not bad, f"{bad} C canar{'y' if bad == 1 else 'ies'} changed: freed memory was written"


class Context:
    """What a scenario gets: tracked rings and descriptors, canaries, and exception checks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rings: list[saferring.Ring] = []
        self.fds: list[int] = []
        self.sockets: list[socket.socket] = []
        self.canaries: list[Canaries] = []
        self.c_canary_sets: list[CCanaries] = []
        self._seed = 1000

    # -- resources the harness checks and cleans up ----------------------------------------

    def ring(self, entries: int = 64, **kwargs: Any) -> saferring.Ring:
        """A new Ring; at the end it must be idle (nothing in flight, nothing pinned) and is
        closed by the harness if the scenario did not close it."""
        r = saferring.Ring(entries, **kwargs)
        self.rings.append(r)
        return r

    def pipe(self) -> tuple[int, int]:
        """An ``os.pipe()`` whose ends the harness closes (closing them first is fine)."""
        r, w = os.pipe()
        self.fds += [r, w]
        return r, w

    def socketpair(self, kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
        """A connected AF_UNIX socket pair the harness closes."""
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        self.sockets += [a, b]
        return a, b

    def track_fd(self, fd: int) -> int:
        """Have the harness close ``fd`` at the end (if it is still open)."""
        self.fds.append(fd)
        return fd

    # -- memory checks ---------------------------------------------------------------------

    def spray(self, size: int, count: int = 256) -> Canaries:
        """Allocate ``count`` canaries of ``size`` bytes now (typically right after dropping a
        buffer of that size, to reuse its memory if it was wrongly freed); checked at the end
        and by :meth:`check_canaries`."""
        c = Canaries(size, count, self._seed)
        self._seed += count
        self.canaries.append(c)
        return c

    def c_canaries(self) -> CCanaries:
        """A new set of C canaries (:class:`CCanaries`), also checked at the end."""
        c = CCanaries(self._seed)
        self._seed += 100_000
        self.c_canary_sets.append(c)
        return c

    def check_canaries(self) -> None:
        """Fail now if any canary made so far has changed."""
        for cc in self.c_canary_sets:
            cc.check()
        for c in self.canaries:
            bad = c.changed()
            assert not bad, (f"{len(bad)} canar{'y' if len(bad) == 1 else 'ies'} of {c.size} "
                             f"bytes changed: unrelated memory was written")

    # -- exceptions ------------------------------------------------------------------------

    def raises(self, exc_type: type[BaseException] | tuple[type[BaseException], ...],
               fn: Callable[..., Any], *args: Any, **kwargs: Any) -> BaseException:
        """Call ``fn``; fail unless it raises ``exc_type``; return the exception."""
        try:
            fn(*args, **kwargs)
        except exc_type as exc:
            return exc
        except BaseException as exc:
            raise AssertionError(f"{getattr(fn, '__qualname__', fn)} raised {exc!r}, "
                                 f"expected {exc_type}") from exc
        raise AssertionError(f"{getattr(fn, '__qualname__', fn)} returned, expected {exc_type}")

    @contextmanager
    def expect(self, exc_type: type[BaseException] | tuple[type[BaseException], ...]
               ) -> Iterator[None]:
        """``with ctx.expect(BufferBusyError): ...``: the block must raise ``exc_type``."""
        try:
            yield
        except exc_type:
            return
        except BaseException as exc:
            raise AssertionError(f"raised {exc!r}, expected {exc_type}") from exc
        raise AssertionError(f"nothing raised, expected {exc_type}")

    def skip(self, why: str) -> None:
        """Stop here: the scenario cannot run on this machine (the test is skipped)."""
        raise ScenarioSkipped(why)

    # -- the end-of-scenario checks --------------------------------------------------------

    def finish(self) -> None:
        gc.collect()
        for r in self.rings:
            if not r.closed:
                stats = r.stats()
                assert stats.in_flight == 0, f"a ring still has operations in flight: {stats}"
                assert stats.pinned_bytes == 0, f"a ring still pins memory: {stats}"
                r.close()
        self.rings.clear()
        for s in self.sockets:
            s.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.sockets.clear()
        self.fds.clear()
        gc.collect()
        open_rings = [r for r in list(_live_rings) if not r.closed]
        assert not open_rings, f"{len(open_rings)} ring(s) left open"
        self.check_canaries()


def collect_until(ring: saferring.Ring, done: Callable[[], bool], seconds: float = 10.0
                  ) -> list[saferring.Operation[Any]]:
    """Wait on ``ring`` in short slices until ``done()``; fail after ``seconds`` (a lost
    completion fails the scenario instead of hanging it).  Returns what the waits returned."""
    got: list[saferring.Operation[Any]] = []
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, "operations did not complete in time"
        got += ring.wait(1, timeout=0.05)
    return got


def byte_pattern(i: int, size: int) -> bytes:
    """``size`` bytes of value ``i % 250 + 1``: each operation's data is told apart by its byte."""
    return bytes([i % 250 + 1]) * size


def open_fds() -> set[int]:
    """The descriptors this process has open now."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)  # the directory listing's own descriptor is closed by now
        except OSError:
            continue
        fds.add(fd)
    return fds


def _load_scenarios() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    tests_dir = os.path.dirname(here)
    if tests_dir not in sys.path:  # scenarios use tests/_helpers.py and tests/_aio.py
        sys.path.insert(0, tests_dir)
    for name in sorted(os.listdir(here)):
        if name.startswith("scenarios_") and name.endswith(".py"):
            __import__(name[:-3])


def all_scenarios() -> dict[str, tuple[ScenarioFn, tuple[str, ...]]]:
    """Every registered scenario, by name (importing the ``scenarios_*.py`` modules)."""
    _load_scenarios()
    return dict(SCENARIOS)


def run(name: str) -> int:
    """Run scenario ``name`` with every check; the process's exit status."""
    scenarios = all_scenarios()
    fn, needs = scenarios[name]
    from _helpers import kernel_lacks

    for requirement in needs:
        reason = kernel_lacks(requirement)
        if reason is not None:
            print(f"skipped: {reason}")
            return SKIP_STATUS
    gc.collect()
    fds_before = open_fds()
    ctx = Context(name)
    # A spread of canaries made before the scenario: whatever the scenario frees, reuses or
    # corrupts, memory it never owned must read back exactly as written.
    for size in (1, 16, 64, 256, 1024, 4096, 65536, 1 << 20):
        ctx.spray(size, count=8)
    try:
        fn(ctx)
    except ScenarioSkipped as exc:
        print(f"skipped: {exc}")
        ctx.finish()
        return SKIP_STATUS
    except BaseException:
        traceback.print_exc()
        return 1
    try:
        ctx.finish()
        gc.collect()
        leaked = open_fds() - fds_before
        assert not leaked, f"file descriptors leaked: {sorted(leaked)} " + ", ".join(
            f"{fd}->{_describe(fd)}" for fd in sorted(leaked))
    except BaseException:
        traceback.print_exc()
        return 1
    print(f"TORTURE-OK {name}")
    return 0


def _describe(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"
