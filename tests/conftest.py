"""Shared fixtures.  After every test: no ring left open, no operation in flight, nothing pinned,
no file descriptor leaked.  Scenarios that could crash the interpreter run in a subprocess
(``run_isolated``), so a crash fails one test instead of killing the run."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

import saferring
from saferring.ring import _live_rings

from _helpers import kernel_lacks


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    leftovers = [r for r in list(_live_rings) if not r.closed]
    for r in leftovers:
        r.close()
    assert not leftovers, f"test left {len(leftovers)} ring(s) open"
    leaked = open_fds() - before
    # os.listdir itself opened (and closed) one descriptor: compare what is still open.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"file descriptors leaked: {sorted(leaked)}"


@pytest.fixture
def ring() -> Iterator[saferring.Ring]:
    r = saferring.Ring(64)
    yield r
    if not r.closed:
        stats = r.stats()
        assert stats.in_flight == 0, f"operations still in flight at the end of the test: {stats}"
        assert stats.pinned_bytes == 0, f"memory still pinned at the end of the test: {stats}"
        r.close()


def _pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    yield from _pipe()


@pytest.fixture
def pipe2() -> Iterator[tuple[int, int]]:
    """A second pipe, for tests that need two."""
    yield from _pipe()


@pytest.fixture
def datafile(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, bytes]]:
    data = os.urandom(64 * 1024)
    path = os.path.join(os.fspath(tmp_path), "data.bin")
    with open(path, "wb") as f:
        f.write(data)
    yield path, data


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "needs(*requirements): what the test needs from the kernel, e.g. 'op:FUTEX_WAIT', "
        "'feat:NODROP', 'setup:DEFER_TASKRUN', 'can:SOCKET_COMMANDS' (tests/_helpers.py "
        "kernel_lacks); the test is skipped with the kernel's answer when one is missing")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in item.iter_markers("needs"):
        for requirement in marker.args:
            reason = kernel_lacks(requirement)
            if reason is not None:
                pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under the emulated 6.1 kernel (make test-kernel-6.1) the example programs' end-to-end
    tests are skipped: each runs whole programs and load generators in subprocesses, which under
    full emulation took most of the guest's time budget, and the library paths they use are
    tested in the guest by the other suites.  They run on the host in every CI run."""
    if not os.environ.get("SAFERRING_KERNEL_GUEST"):
        return
    skip = pytest.mark.skip(reason="example programs run end to end on the host only (emulated "
                                   "kernel: too slow); their library paths are tested here")
    for item in items:
        if item.path.name.startswith("test_example"):
            item.add_marker(skip)
