"""Registered ("fixed") files and the other ring-level registrations, on the real kernel: the file
table and its FixedFile handles, the direct-descriptor operations (openat/socket/accept_direct,
close_direct, fixed_fd_install), splice from a registered file, eventfd, personalities, io-wq
limits, the registered ring descriptor, and the misuse each of them must refuse."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import saferring
from saferring import OperationStateError, OpState, UnsupportedOperationError
from saferring.features import OP, OPCODES, opcode_name, since
from saferring.fixed import FixedFile

from _helpers import run_isolated


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def _wait_done(ring: saferring.Ring, op: saferring.Operation[Any], seconds: float = 5) -> None:
    """Reap until ``op`` has its final CQE (bounded: at most ``seconds`` per wait, 50 waits)."""
    for _ in range(50):
        if op.done():
            return
        ring.wait(1, timeout=seconds / 50)
    assert op.done(), f"{op!r} did not finish"


def _write_file(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


def _refused_before_submission(ring: saferring.Ring, exc_type: type[BaseException],
                               call: Callable[[], object], match: str | None = None) -> None:
    """``call()`` raises ``exc_type`` and queues nothing."""
    before = ring.stats().in_flight
    with pytest.raises(exc_type, match=match):
        call()
    assert ring.stats().in_flight == before


# -- register_files, FixedFile I/O ------------------------------------------------------------

def test_register_files_returns_handles_and_none_for_empty_slots(
        ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """register_files gives one valid FixedFile per descriptor (slot = index) and None for -1."""
    r, w = pipe
    handles = ring.register_files([r, -1, w])
    assert handles[1] is None
    assert isinstance(handles[0], FixedFile) and isinstance(handles[2], FixedFile)
    assert [h.slot for h in handles if h is not None] == [0, 2]
    assert all(h.valid for h in handles if h is not None)
    assert "stale" not in repr(handles[0])


def test_fixed_file_io_works_after_the_original_fd_is_closed(
        ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """The table holds its own reference: read, write, readv, writev and fsync through a FixedFile
    work after os.close() of the registered descriptor."""
    path, data = datafile
    fd = os.open(path, os.O_RDWR)
    (ff,) = ring.register_files([fd])
    os.close(fd)
    assert ff is not None
    buf = bytearray(64)
    op = ring.read(ff, buf, 100)
    assert ring.run(op) == 64 and buf == data[100:164]
    assert op.state is OpState.COMPLETED
    assert ring.run(ring.write(ff, b"fixed!", 10)) == 6
    assert ring.run(ring.writev(ff, [b"ab", bytearray(b"cd")], 200)) == 4
    parts = [bytearray(3), bytearray(5)]
    assert ring.run(ring.readv(ff, parts, 8)) == 8
    assert bytes(parts[0] + parts[1]) == data[8:10] + b"fixed!"
    assert ring.run(ring.fsync(ff)) == 0
    assert ring.run(ring.fsync(ff, datasync=True)) == 0
    with open(path, "rb") as f:
        content = f.read()
    assert content[10:16] == b"fixed!" and content[200:204] == b"abcd"
    assert content[:10] == data[:10] and content[204:] == data[204:]


def test_fixed_file_pipe_round_trip(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A registered pipe's both ends carry bytes through ring.write/ring.read."""
    r, w = pipe
    fr, fw = ring.register_files([r, w])
    assert fr is not None and fw is not None
    assert ring.run(ring.write(fw, b"through the table")) == 17
    buf = bytearray(32)
    assert ring.run(ring.read(fr, buf)) == 17
    assert bytes(buf[:17]) == b"through the table"


def test_register_files_accepts_objects_with_fileno(ring: saferring.Ring,
                                                    datafile: tuple[str, bytes]) -> None:
    """A file object is registered through its fileno()."""
    path, data = datafile
    with open(path, "rb") as f:
        (ff,) = ring.register_files([f])
    assert ff is not None
    buf = bytearray(16)
    assert ring.run(ring.read(ff, buf, 0)) == 16 and buf == data[:16]


def test_register_twice_is_refused(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A second register_files while a table is registered raises OperationStateError; the first
    table's handles stay valid."""
    r, w = pipe
    (fr,) = ring.register_files([r])
    with pytest.raises(OperationStateError, match="already registered"):
        ring.register_files([w])
    with pytest.raises(OperationStateError):
        ring.register_files(4)
    assert fr is not None and fr.valid
    os.write(w, b"x")
    assert ring.run(ring.read(fr, bytearray(1))) == 1


@pytest.mark.parametrize(("bad", "exc"), [
    ([], ValueError), (0, ValueError), (-3, ValueError), ((1 << 20) + 1, ValueError),
    ([-2], ValueError), ([1 << 31], ValueError), ("12", TypeError), ([1.5], TypeError),
    (None, TypeError),
])
def test_register_files_bad_input(ring: saferring.Ring, bad: Any, exc: type[Exception]) -> None:
    """An empty list, a non-positive or huge count, descriptors below -1 or above 2**31-1 raise
    ValueError; non-int items and non-sequences raise TypeError; nothing stays registered."""
    with pytest.raises(exc):
        ring.register_files(bad)
    with pytest.raises(OperationStateError):
        ring.fixed_file(0)  # still no table


def test_register_files_refuses_a_fixed_file(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A FixedFile is not a descriptor: update_files([handle]) raises TypeError."""
    r, _ = pipe
    (fr,) = ring.register_files([r])
    with pytest.raises(TypeError, match="FixedFile"):
        ring.update_files(0, [fr])
    assert fr is not None and fr.valid


def test_register_a_closed_descriptor_fails_with_ebadf(ring: saferring.Ring,
                                                       pipe: tuple[int, int]) -> None:
    """Registering a descriptor that is not open fails with the kernel's EBADF, nothing kept."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as info:
        ring.register_files([r])
    assert info.value.errno == errno.EBADF
    # No table was kept: registering now works.
    (ff,) = ring.register_files([pipe[0]])
    assert ff is not None and ff.valid


def test_sparse_table_has_only_empty_slots(ring: saferring.Ring) -> None:
    """register_files(8) returns eight Nones; a handle to an empty slot fails with EBADF."""
    assert ring.register_files(8) == [None] * 8
    empty = ring.fixed_file(7)
    assert empty.slot == 7 and empty.valid
    op = ring.read(empty, bytearray(4), 0)
    with pytest.raises(OSError) as info:
        ring.run(op)
    assert info.value.errno == errno.EBADF
    assert op.state is OpState.FAILED


# -- update_files, stale handles ---------------------------------------------------------------

def test_update_files_replaces_slots_and_stales_old_handles(
        ring: saferring.Ring, tmp_path: Any) -> None:
    """update_files puts new files in the slots; the old handles become stale, the new ones read
    the new files, and a stale handle is refused before submission."""
    a = _write_file(str(tmp_path / "a"), b"AAAA")
    b = _write_file(str(tmp_path / "b"), b"BBBB")
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        old = ring.register_files([fa, fa])
        new = ring.update_files(1, [fb])
    finally:
        os.close(fa)
        os.close(fb)
    assert old[0] is not None and old[1] is not None and new[0] is not None
    assert old[0].valid and not old[1].valid and new[0].valid
    assert new[0].slot == 1 and "stale" in repr(old[1])
    buf = bytearray(4)
    assert ring.run(ring.read(new[0], buf, 0)) == 4 and buf == b"BBBB"
    assert ring.run(ring.read(old[0], buf, 0)) == 4 and buf == b"AAAA"
    stale = old[1]
    _refused_before_submission(ring, OperationStateError, lambda: ring.read(stale, buf, 0), "stale")
    _refused_before_submission(ring, OperationStateError, lambda: ring.write(stale, b"x", 0))
    _refused_before_submission(ring, OperationStateError, lambda: ring.readv(stale, [buf], 0))
    _refused_before_submission(ring, OperationStateError, lambda: ring.fsync(stale))
    _refused_before_submission(ring, OperationStateError, lambda: ring.close_direct(stale))


def test_update_files_with_minus_one_empties_the_slot(ring: saferring.Ring,
                                                      pipe: tuple[int, int]) -> None:
    """update_files(slot, [-1]) returns [None] and empties the slot (reads there get EBADF)."""
    r, _ = pipe
    (fr,) = ring.register_files([r])
    assert ring.update_files(0, [-1]) == [None]
    assert fr is not None and not fr.valid
    with pytest.raises(OSError) as info:
        ring.run(ring.read(ring.fixed_file(0), bytearray(1)))
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize(("offset", "count"), [(2, 1), (1, 2), (-1, 1), (100, 1)])
def test_update_files_out_of_range(ring: saferring.Ring, pipe: tuple[int, int], offset: int,
                                   count: int) -> None:
    """Slots outside the table raise ValueError and leave every handle valid."""
    r, _ = pipe
    handles = ring.register_files([r, r])
    with pytest.raises(ValueError, match="outside the table"):
        ring.update_files(offset, [r] * count)
    assert all(h is not None and h.valid for h in handles)


def test_update_files_without_a_table(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """update_files before register_files raises OperationStateError."""
    with pytest.raises(OperationStateError, match="no file table"):
        ring.update_files(0, [pipe[0]])


def test_update_files_bad_descriptor_types(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """update_files takes a sequence of ints: an int alone or a str item raises TypeError."""
    ring.register_files(2)
    with pytest.raises(TypeError):
        ring.update_files(0, pipe[0])
    with pytest.raises(TypeError):
        ring.update_files(0, ["3"])
    with pytest.raises(TypeError):
        ring.update_files("0", [pipe[0]])


# -- unregister_files, foreign rings -------------------------------------------------------------

def test_unregister_files_stales_every_handle(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """After unregister_files every handle is stale (also against a new table with the same
    slots), and a second unregister raises OperationStateError."""
    r, w = pipe
    handles = ring.register_files([r, w])
    extra = ring.fixed_file(1)
    ring.unregister_files()
    assert not any(h is not None and h.valid for h in [*handles, extra])
    with pytest.raises(OperationStateError):
        ring.unregister_files()
    with pytest.raises(OperationStateError):
        ring.fixed_file(0)
    fresh = ring.register_files([r, w])
    assert all(h is not None and h.valid for h in fresh)
    assert not any(h is not None and h.valid for h in handles)
    old_w = handles[1]
    _refused_before_submission(ring, OperationStateError, lambda: ring.write(old_w, b"x"))
    assert fresh[1] is not None
    assert ring.run(ring.write(fresh[1], b"ok")) == 2
    assert os.read(r, 10) == b"ok"


def test_handle_of_another_ring_is_refused(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """A FixedFile of ring A used on ring B raises OperationStateError, even when B has a table
    with that slot; nothing is queued on B."""
    r, w = pipe
    (fw,) = ring.register_files([w])
    assert fw is not None
    with saferring.Ring(8) as other:
        other.register_files([r])
        _refused_before_submission(other, OperationStateError,
                                   lambda: other.write(fw, b"x"), "another ring")
        _refused_before_submission(other, OperationStateError,
                                   lambda: other.close_direct(fw), "another ring")
    assert fw.valid


# -- fixed_file ------------------------------------------------------------------------------------

def test_fixed_file_returns_a_working_handle(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """ring.fixed_file(slot) is a valid handle to what the slot holds now."""
    r, w = pipe
    ring.register_files([r, w])
    fw = ring.fixed_file(1)
    assert fw.slot == 1 and fw.valid
    assert ring.run(ring.write(fw, b"hi")) == 2
    assert os.read(r, 10) == b"hi"


@pytest.mark.parametrize("slot", [-1, 2, 1 << 40])
def test_fixed_file_out_of_range(ring: saferring.Ring, pipe: tuple[int, int], slot: int) -> None:
    """A slot outside the table raises ValueError; a non-int raises TypeError."""
    ring.register_files([pipe[0], pipe[1]])
    with pytest.raises(ValueError, match="slot must be between"):
        ring.fixed_file(slot)
    with pytest.raises(TypeError):
        ring.fixed_file("1")  # type: ignore[arg-type]


# -- openat_direct, close_direct -----------------------------------------------------------------

def test_openat_direct_kernel_picks_a_slot(ring: saferring.Ring,
                                           datafile: tuple[str, bytes]) -> None:
    """openat_direct(slot=None) puts the file in a free slot of a sparse table; no descriptor is
    created in the process, and reads through the handle return the file's bytes."""
    path, data = datafile
    ring.register_files(4)
    fds_before = set(os.listdir("/proc/self/fd"))
    op = ring.openat_direct(path)
    ff = ring.run(op)
    assert op.state is OpState.COMPLETED
    assert isinstance(ff, FixedFile) and ff.valid and 0 <= ff.slot < 4
    assert set(os.listdir("/proc/self/fd")) == fds_before
    buf = bytearray(32)
    assert ring.run(ring.read(ff, buf, 500)) == 32 and buf == data[500:532]
    second = ring.run(ring.openat_direct(path))
    assert second.slot != ff.slot and second.valid and ff.valid


def test_openat_direct_explicit_slot_replaces(ring: saferring.Ring, tmp_path: Any) -> None:
    """openat_direct(slot=k) replaces slot k: older handles to it are stale at once, the new one
    reads the new file."""
    a = _write_file(str(tmp_path / "a"), b"first")
    b = _write_file(str(tmp_path / "b"), b"second")
    ring.register_files(2)
    fa = ring.run(ring.openat_direct(a, slot=1))
    assert fa.slot == 1
    op = ring.openat_direct(b, slot=1)
    assert not fa.valid  # stale as soon as the replacement is queued
    fb = ring.run(op)
    assert fb.slot == 1 and fb.valid and not fa.valid
    buf = bytearray(6)
    assert ring.run(ring.read(fb, buf, 0)) == 6 and buf == b"second"
    _refused_before_submission(ring, OperationStateError, lambda: ring.read(fa, buf, 0))


def test_openat_direct_can_create_and_write(ring: saferring.Ring, tmp_path: Any) -> None:
    """openat_direct with O_CREAT|O_WRONLY creates the file (mode honoured) and writes reach it."""
    path = str(tmp_path / "new.bin")
    ring.register_files(1)
    ff = ring.run(ring.openat_direct(path, os.O_CREAT | os.O_WRONLY, 0o600))
    assert ring.run(ring.write(ff, b"created", 0)) == 7
    assert ring.run(ring.fsync(ff)) == 0
    with open(path, "rb") as f:
        assert f.read() == b"created"
    assert os.stat(path).st_mode & 0o777 == 0o600 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_openat_direct_refusals(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """Without a table: OperationStateError; O_CLOEXEC, a slot outside the table or a path with a
    NUL byte: ValueError; a FixedFile dir_fd: TypeError -- all before submission."""
    path, _ = datafile
    _refused_before_submission(ring, OperationStateError, lambda: ring.openat_direct(path),
                               "no file table")
    ring.register_files(2)
    _refused_before_submission(ring, ValueError,
                               lambda: ring.openat_direct(path, os.O_RDONLY | os.O_CLOEXEC),
                               "O_CLOEXEC")
    _refused_before_submission(ring, ValueError, lambda: ring.openat_direct(path, slot=2))
    _refused_before_submission(ring, ValueError, lambda: ring.openat_direct(path, slot=-1))
    _refused_before_submission(ring, ValueError, lambda: ring.openat_direct("a\0b"))
    handle = ring.fixed_file(0)
    _refused_before_submission(ring, TypeError,
                               lambda: ring.openat_direct("x", dir_fd=handle))  # type: ignore[arg-type]


def test_openat_direct_missing_file_names_the_path(ring: saferring.Ring, tmp_path: Any) -> None:
    """A missing path fails from the CQE with FileNotFoundError carrying the filename."""
    ring.register_files(1)
    missing = str(tmp_path / "missing")
    op = ring.openat_direct(missing)
    with pytest.raises(FileNotFoundError) as info:
        ring.run(op)
    assert info.value.filename == missing
    assert op.state is OpState.FAILED


def test_openat_direct_into_a_full_table_fails(ring: saferring.Ring,
                                               datafile: tuple[str, bytes]) -> None:
    """When no slot is free, a kernel-picked openat_direct fails with ENFILE."""
    path, _ = datafile
    ring.register_files(1)
    ring.run(ring.openat_direct(path))
    with pytest.raises(OSError) as info:
        ring.run(ring.openat_direct(path))
    assert info.value.errno == errno.ENFILE


def test_close_direct_stales_at_once_and_frees_the_slot(
        ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """close_direct makes the handle (and every other to the slot) stale before it runs; once it
    completed, openat_direct(slot=None) reuses the slot of a one-slot table."""
    path, data = datafile
    ring.register_files(1)
    ff = ring.run(ring.openat_direct(path))
    other = ring.fixed_file(ff.slot)
    op = ring.close_direct(ff)
    assert not ff.valid and not other.valid
    assert ring.run(op) == 0 and op.state is OpState.COMPLETED
    _refused_before_submission(ring, OperationStateError, lambda: ring.close_direct(ff))
    _refused_before_submission(ring, OperationStateError, lambda: ring.read(other, bytearray(1)))
    again = ring.run(ring.openat_direct(path))
    assert again.slot == ff.slot and again.valid and not ff.valid
    buf = bytearray(8)
    assert ring.run(ring.read(again, buf, 0)) == 8 and buf == data[:8]


def test_close_direct_of_an_empty_slot_fails_with_ebadf(ring: saferring.Ring) -> None:
    """Closing an empty slot is the kernel's EBADF, from the CQE."""
    ring.register_files(2)
    op = ring.close_direct(ring.fixed_file(1))
    with pytest.raises(OSError) as info:
        ring.run(op)
    assert info.value.errno == errno.EBADF


def test_close_direct_and_close_fd_type_checks(ring: saferring.Ring,
                                               pipe: tuple[int, int]) -> None:
    """close_direct takes only a FixedFile, close_fd only a descriptor (TypeError otherwise)."""
    r, _ = pipe
    (fr,) = ring.register_files([r])
    _refused_before_submission(ring, TypeError, lambda: ring.close_direct(r))  # type: ignore[arg-type]
    _refused_before_submission(ring, TypeError, lambda: ring.close_fd(fr), "close_direct")  # type: ignore[arg-type]
    assert fr is not None and fr.valid


# -- socket_direct, accept_direct ------------------------------------------------------------------

def test_socket_direct_connects_and_sends(ring: saferring.Ring, listener: socket.socket) -> None:
    """socket_direct makes a registered TCP socket; connect and send through its FixedFile reach
    a listener on 127.0.0.1."""
    ring.register_files(2)
    op = ring.socket_direct(socket.AF_INET, socket.SOCK_STREAM)
    ff = ring.run(op)
    assert isinstance(ff, FixedFile) and ff.valid
    assert ring.run(ring.connect(ff, listener.getsockname())) == 0
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        assert ring.run(ring.send(ff, b"from a fixed socket")) == 19
        assert conn.recv(64) == b"from a fixed socket"
        conn.sendall(b"back")
        buf = bytearray(16)
        assert ring.run(ring.recv(ff, buf)) == 4 and buf[:4] == b"back"
    assert ring.run(ring.close_direct(ff)) == 0


def test_socket_direct_refusals(ring: saferring.Ring) -> None:
    """socket_direct without a table raises OperationStateError, with SOCK_CLOEXEC ValueError."""
    _refused_before_submission(ring, OperationStateError, lambda: ring.socket_direct())
    ring.register_files(1)
    _refused_before_submission(
        ring, ValueError,
        lambda: ring.socket_direct(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC))


def test_accept_direct_over_loopback(ring: saferring.Ring, listener: socket.socket) -> None:
    """accept_direct puts the connection in the table; bytes flow both ways through the handle."""
    ring.register_files(4)
    op = ring.accept_direct(listener)
    ring.submit()
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        _wait_done(ring, op)
        ff = op.result()
        assert isinstance(ff, FixedFile) and ff.valid
        client.sendall(b"hello")
        buf = bytearray(16)
        assert ring.run(ring.recv(ff, buf)) == 5 and buf[:5] == b"hello"
        assert ring.run(ring.send(ff, b"world")) == 5
        assert client.recv(16) == b"world"
        assert ring.run(ring.close_direct(ff)) == 0
        assert client.recv(16) == b""  # the server side is really closed


def test_accept_direct_explicit_slot(ring: saferring.Ring, listener: socket.socket,
                                     pipe: tuple[int, int]) -> None:
    """accept_direct(slot=k) replaces slot k (old handles stale) with the connection."""
    handles = ring.register_files([pipe[0], pipe[1]])
    op = ring.accept_direct(listener, slot=1)
    assert handles[1] is not None and not handles[1].valid
    assert handles[0] is not None and handles[0].valid
    ring.submit()
    with socket.create_connection(listener.getsockname(), timeout=5) as client:
        _wait_done(ring, op)
        ff = op.result()
        assert ff.slot == 1 and ff.valid
        assert ring.run(ring.send(ff, b"slot1")) == 5
        assert client.recv(16) == b"slot1"


def test_accept_direct_multishot_yields_fixed_files(ring: saferring.Ring,
                                                    listener: socket.socket) -> None:
    """A multishot accept_direct produces one FixedFile per connection until cancelled."""
    ring.register_files(8)
    op = ring.accept_direct(listener, multishot=True)
    ring.submit()
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(3)]
    try:
        got: list[FixedFile] = []
        for _ in range(50):
            if len(got) >= 3:
                break
            ring.wait(1, timeout=0.1)
            got.extend(op.take())
        assert len(got) == 3
        assert all(isinstance(h, FixedFile) and h.valid for h in got)
        assert len({h.slot for h in got}) == 3
        assert op.state is OpState.SUBMITTED and not op.done()
        for i, client in enumerate(clients):
            client.sendall(b"c%d" % i)
        received = set()
        for h in got:
            buf = bytearray(8)
            n = ring.run(ring.recv(h, buf))
            received.add(bytes(buf[:n]))
        assert received == {b"c0", b"c1", b"c2"}
    finally:
        for client in clients:
            client.close()
        if not op.done():
            op.cancel()
        _wait_done(ring, op)
    assert op.state is OpState.CANCELLED


def test_accept_direct_refusals(ring: saferring.Ring, listener: socket.socket) -> None:
    """accept_direct without a table raises OperationStateError (also multishot); multishot with
    a slot raises ValueError."""
    _refused_before_submission(ring, OperationStateError, lambda: ring.accept_direct(listener))
    _refused_before_submission(ring, OperationStateError,
                               lambda: ring.accept_direct(listener, multishot=True))
    ring.register_files(2)
    _refused_before_submission(ring, ValueError,
                               lambda: ring.accept_direct(listener, multishot=True, slot=0))
    _refused_before_submission(ring, ValueError, lambda: ring.accept_direct(listener, slot=5))


# -- fixed_fd_install, splice ------------------------------------------------------------------------

def test_fixed_fd_install(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """fixed_fd_install (Linux 6.8) returns a normal descriptor to the registered file, CLOEXEC
    unless cloexec=False; on older kernels it raises UnsupportedOperationError, queuing nothing."""
    path, data = datafile
    ring.register_files(2)
    ff = ring.run(ring.openat_direct(path))
    if not ring.features.supports("FIXED_FD_INSTALL"):
        _refused_before_submission(ring, UnsupportedOperationError,
                                   lambda: ring.fixed_fd_install(ff), "FIXED_FD_INSTALL.*6.8")
        return
    op = ring.fixed_fd_install(ff)
    fd = ring.run(op)
    try:
        assert op.state is OpState.COMPLETED
        assert os.pread(fd, 16, 0) == data[:16]
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.path.samefile(f"/proc/self/fd/{fd}", path)
    finally:
        os.close(fd)
    fd2 = ring.run(ring.fixed_fd_install(ff, cloexec=False))
    try:
        assert not fcntl.fcntl(fd2, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.pread(fd2, 4, 100) == data[100:104]
    finally:
        os.close(fd2)
    assert ff.valid  # installing a descriptor leaves the slot as it is


@pytest.mark.needs("op:FIXED_FD_INSTALL")
def test_fixed_fd_install_refusals(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """fixed_fd_install takes only a live FixedFile of this ring (TypeError, OperationStateError),
    and of an empty slot fails with EBADF from the CQE."""
    (fr, _) = ring.register_files([pipe[0], -1])
    _refused_before_submission(ring, TypeError, lambda: ring.fixed_fd_install(pipe[0]))  # type: ignore[arg-type]
    assert fr is not None
    ring.update_files(0, [pipe[1]])
    _refused_before_submission(ring, OperationStateError, lambda: ring.fixed_fd_install(fr))
    op = ring.fixed_fd_install(ring.fixed_file(1))
    with pytest.raises(OSError) as info:
        ring.run(op)
    assert info.value.errno == errno.EBADF


def test_ftruncate_through_a_fixed_file(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """ftruncate (Linux 6.9) on a FixedFile shortens the file; older kernels raise
    UnsupportedOperationError naming FTRUNCATE and 6.9, queuing nothing."""
    path, data = datafile
    fd = os.open(path, os.O_RDWR)
    (ff,) = ring.register_files([fd])
    os.close(fd)
    if not ring.features.supports("FTRUNCATE"):
        _refused_before_submission(ring, UnsupportedOperationError,
                                   lambda: ring.ftruncate(ff, 10), "FTRUNCATE.*6.9")
        return
    assert ring.run(ring.ftruncate(ff, 1000)) == 0
    assert os.path.getsize(path) == 1000
    with open(path, "rb") as f:
        assert f.read() == data[:1000]


def test_splice_from_a_fixed_file_into_a_pipe(ring: saferring.Ring, datafile: tuple[str, bytes],
                                              pipe: tuple[int, int]) -> None:
    """splice with a FixedFile as fd_in (SPLICE_F_FD_IN_FIXED) moves the file's bytes into a pipe;
    with a FixedFile as fd_out too, the pipe's bytes reach another file."""
    path, data = datafile
    r, w = pipe
    fd = os.open(path, os.O_RDONLY)
    fin, fout = ring.register_files([fd, w])
    os.close(fd)
    assert fin is not None and fout is not None
    op = ring.splice(fin, w, 4096, offset_in=1000)
    assert ring.run(op) == 4096 and op.state is OpState.COMPLETED
    assert os.read(r, 8192) == data[1000:5096]
    # Both ends registered: the pipe's write end is fd_out through IOSQE_FIXED_FILE.
    assert ring.run(ring.splice(fin, fout, 100, offset_in=0)) == 100
    assert os.read(r, 200) == data[:100]


def test_splice_with_a_stale_fixed_fd_in_is_refused(ring: saferring.Ring,
                                                    datafile: tuple[str, bytes],
                                                    pipe: tuple[int, int]) -> None:
    """A stale FixedFile as splice's fd_in raises OperationStateError before submission."""
    path, _ = datafile
    ring.register_files(1)
    fin = ring.run(ring.openat_direct(path))
    ring.run(ring.close_direct(fin))
    _refused_before_submission(ring, OperationStateError,
                               lambda: ring.splice(fin, pipe[1], 10, offset_in=0))


# -- eventfd, personality, io-wq, ring fd, probe -----------------------------------------------------

def test_register_eventfd_is_signalled_by_completions(ring: saferring.Ring) -> None:
    """A registered eventfd counts completions; after unregister_eventfd it stays silent."""
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ring.register_eventfd(efd)
        with pytest.raises(OSError) as info:
            ring.register_eventfd(efd)  # one eventfd per ring
        assert info.value.errno == errno.EBUSY
        ring.run(ring.nop())
        assert os.eventfd_read(efd) >= 1
        ring.unregister_eventfd()
        ring.run(ring.nop())
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        with pytest.raises(OSError) as info:
            ring.unregister_eventfd()
        assert info.value.errno == errno.ENXIO
    finally:
        os.close(efd)


def test_register_eventfd_async_only(ring: saferring.Ring, datafile: tuple[str, bytes]) -> None:
    """With async_only=True an inline nop does not signal the eventfd; an fsync (which always runs
    in an io-wq worker, i.e. completes asynchronously) does."""
    path, _ = datafile
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    fd = os.open(path, os.O_RDWR)
    try:
        ring.register_eventfd(efd, async_only=True)
        ring.run(ring.nop())
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        assert ring.run(ring.fsync(fd)) == 0
        assert os.eventfd_read(efd) >= 1
        ring.unregister_eventfd()
    finally:
        os.close(fd)
        os.close(efd)


@pytest.mark.parametrize("bad", [-1, 1 << 20])
def test_register_eventfd_bad_descriptor(ring: saferring.Ring, bad: int) -> None:
    """A descriptor that is no eventfd fails with the kernel's EBADF."""
    with pytest.raises(OSError) as info:
        ring.register_eventfd(bad)
    assert info.value.errno == errno.EBADF


def test_register_eventfd_refuses_non_eventfd(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """An open descriptor that is not an eventfd is refused by the kernel (OSError)."""
    with pytest.raises(OSError):
        ring.register_eventfd(pipe[0])
    with pytest.raises(TypeError):
        ring.register_eventfd("3")  # type: ignore[arg-type]


def test_personality_register_unregister(ring: saferring.Ring) -> None:
    """register_personality returns a positive id; unregistering it twice fails with EINVAL."""
    first = ring.register_personality()
    second = ring.register_personality()
    assert first >= 1 and second >= 1 and first != second
    ring.unregister_personality(first)
    ring.unregister_personality(second)
    with pytest.raises(OSError) as info:
        ring.unregister_personality(first)
    assert info.value.errno == errno.EINVAL
    assert ring.run(ring.nop()) == 0


def test_iowq_max_workers_returns_previous_limits(ring: saferring.Ring) -> None:
    """iowq_max_workers sets the limits and returns the previous ones; (0, 0) only reads them."""
    original = ring.iowq_max_workers(3, 5)
    try:
        assert all(isinstance(v, int) and v >= 0 for v in original)
        assert ring.iowq_max_workers(0, 0) == (3, 5)
        assert ring.iowq_max_workers(7, 0) == (3, 5)
        assert ring.iowq_max_workers(0, 0) == (7, 5)
    finally:
        ring.iowq_max_workers(*[v or 1 for v in original])  # io-wq limits are per thread
    with pytest.raises(TypeError):
        ring.iowq_max_workers("1", 1)  # type: ignore[arg-type]
    with pytest.raises((ValueError, OverflowError)):
        ring.iowq_max_workers(-1, 1)


def test_register_ring_fd_then_ops_still_work(ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """With the ring descriptor registered, and after unregistering it, operations still run."""
    r, w = pipe
    ring.register_ring_fd()
    try:
        assert ring.run(ring.nop()) == 0
        assert ring.run(ring.write(w, b"rr")) == 2
        buf = bytearray(2)
        assert ring.run(ring.read(r, buf)) == 2 and buf == b"rr"
    finally:
        ring.unregister_ring_fd()
    assert ring.run(ring.nop()) == 0


def test_register_ring_fd_twice_is_refused_and_leaks_nothing() -> None:
    """A second register_ring_fd raises OperationStateError instead of taking a second
    registered-ring slot that unregister/close never release (which keeps the closed ring, and
    the files of its table, alive until the thread exits)."""
    out = run_isolated("""
        import os, saferring
        r, w = os.pipe()
        ring = saferring.Ring(8)
        ring.register_files([w]); os.close(w)
        ring.register_ring_fd()
        try:
            ring.register_ring_fd()
            print("second registration accepted")
        except saferring.OperationStateError:
            print("refused")
        ring.close()
        # The kernel frees a closed ring's file table in a workqueue, shortly after close().
        import select
        if select.select([r], [], [], 5)[0]:
            print("eof" if os.read(r, 1) == b"" else "data")
        else:
            print("closed ring's table still open")
    """, timeout=60)
    assert "refused" in out, out
    assert "eof" in out, out


def test_unregister_ring_fd_twice_does_not_touch_another_ring() -> None:
    """A second unregister_ring_fd must not unregister another ring's registration (liburing then
    passes the ring's plain fd as the registered offset)."""
    out = run_isolated("""
        import saferring
        a = saferring.Ring(8)
        b = saferring.Ring(8)
        fillers = []
        for _ in range(a.fd):  # take offsets 0..a.fd-1 so b's registration lands at a.fd
            f = saferring.Ring(8); f.register_ring_fd(); fillers.append(f)
        b.register_ring_fd()
        a.register_ring_fd()
        a.unregister_ring_fd()
        try:
            a.unregister_ring_fd()
            print("second unregister accepted")
        except saferring.OperationStateError:
            print("refused")
        try:
            print("b still works", b.run(b.nop()))
        except OSError as exc:
            print("b broken", exc)
    """, timeout=60)
    assert "refused" in out, out
    assert "b still works 0" in out, out


def test_probe_lists_opcodes(ring: saferring.Ring) -> None:
    """ring.probe() is the supported opcode names, the same set as ring.features.opcodes."""
    names = ring.probe()
    assert "READ" in names and "NOP" in names
    assert names == ring.features.opcodes
    assert names <= {op.name for op in OPCODES} | {f"OP_{i}" for i in range(256)}


# -- misuse: constructor, closed ring, other thread ------------------------------------------------

def test_fixed_file_cannot_be_constructed() -> None:
    """FixedFile() raises TypeError: handles come from the ring only."""
    with pytest.raises(TypeError, match="register_files"):
        FixedFile()


def test_result_of_openat_direct_after_the_slot_was_replaced_is_stale(
        ring: saferring.Ring, tmp_path: Any) -> None:
    """The FixedFile an openat_direct returns names the file it opened: once that slot was
    replaced (update_files), asking op.result() again must not hand out a valid handle to the
    replacement."""
    a = _write_file(str(tmp_path / "a"), b"AAAA")
    b = _write_file(str(tmp_path / "b"), b"BBBB")
    ring.register_files(1)
    op = ring.openat_direct(a)
    first = ring.run(op)
    fd = os.open(b, os.O_RDONLY)
    try:
        ring.update_files(first.slot, [fd])
    finally:
        os.close(fd)
    assert not first.valid
    assert not op.result().valid


def test_result_of_openat_direct_after_reregistration_is_stale(
        ring: saferring.Ring, tmp_path: Any, pipe: tuple[int, int]) -> None:
    """An openat_direct completed against one table must not yield a valid handle into a table
    registered later (its slot holds another file there)."""
    a = _write_file(str(tmp_path / "a"), b"AAAA")
    ring.register_files(1)
    op = ring.openat_direct(a)
    _wait_done(ring, op)
    ring.unregister_files()
    ring.register_files([pipe[1]])
    handle = op.result()
    assert not handle.valid


_REGISTRATION_CALLS: list[tuple[str, Callable[[saferring.Ring, int], object]]] = [
    ("register_files", lambda r, fd: r.register_files([fd])),
    ("register_files_sparse", lambda r, fd: r.register_files(4)),
    ("update_files", lambda r, fd: r.update_files(0, [fd])),
    ("unregister_files", lambda r, fd: r.unregister_files()),
    ("fixed_file", lambda r, fd: r.fixed_file(0)),
    ("openat_direct", lambda r, fd: r.openat_direct("/dev/null")),
    ("register_eventfd", lambda r, fd: r.register_eventfd(fd)),
    ("unregister_eventfd", lambda r, fd: r.unregister_eventfd()),
    ("register_personality", lambda r, fd: r.register_personality()),
    ("unregister_personality", lambda r, fd: r.unregister_personality(1)),
    ("iowq_max_workers", lambda r, fd: r.iowq_max_workers(0, 0)),
    ("register_ring_fd", lambda r, fd: r.register_ring_fd()),
    ("unregister_ring_fd", lambda r, fd: r.unregister_ring_fd()),
]


@pytest.mark.parametrize(("name", "call"), _REGISTRATION_CALLS, ids=[n for n, _ in _REGISTRATION_CALLS])
def test_registrations_on_a_closed_ring(name: str, call: Callable[[saferring.Ring, int], object],
                                        pipe: tuple[int, int]) -> None:
    """Every registration call on a closed ring raises RingClosedError."""
    r = saferring.Ring(8)
    r.register_files([pipe[0]])
    r.close()
    with pytest.raises(saferring.RingClosedError):
        call(r, pipe[0])


@pytest.mark.parametrize(("name", "call"), _REGISTRATION_CALLS, ids=[n for n, _ in _REGISTRATION_CALLS])
def test_registrations_from_another_thread(name: str,
                                           call: Callable[[saferring.Ring, int], object],
                                           ring: saferring.Ring, pipe: tuple[int, int]) -> None:
    """Every registration call from a thread that does not own the ring raises WrongThreadError,
    and the table is unchanged."""
    handles = ring.register_files([pipe[0]])
    caught: list[BaseException] = []

    def target() -> None:
        try:
            call(ring, pipe[1])
        except BaseException as exc:  # reported to the main thread
            caught.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join(10)
    assert len(caught) == 1 and isinstance(caught[0], saferring.WrongThreadError), caught
    assert handles[0] is not None and handles[0].valid
    assert ring.stats().in_flight == 0


def test_fixed_file_from_a_closed_ring_is_refused(pipe: tuple[int, int]) -> None:
    """A handle outlives its ring harmlessly: using it on a new ring raises OperationStateError."""
    with saferring.Ring(8) as first:
        (fr,) = first.register_files([pipe[0]])
    assert fr is not None and "FixedFile" in repr(fr)
    with saferring.Ring(8) as second:
        second.register_files([pipe[0]])
        _refused_before_submission(second, OperationStateError, lambda: second.read(fr, bytearray(1)))
    with pytest.raises(saferring.RingClosedError):
        first.read(fr, bytearray(1))


# -- kernel gating ------------------------------------------------------------------------------------

_GATED = [("FIXED_FD_INSTALL", "6.8"), ("FTRUNCATE", "6.9"), ("SOCKET", "5.19"),
          ("SPLICE", "5.7"), ("CLOSE", "5.6"), ("OPENAT", "5.6"), ("ACCEPT", "5.5")]


@pytest.mark.parametrize(("name", "version"), _GATED, ids=[n for n, _ in _GATED])
def test_opcode_table_names_and_versions(name: str, version: str) -> None:
    """The opcode table gives each op used here its ABI number, name and first Linux release,
    which the UnsupportedOperationError messages quote."""
    code = OP[name]
    assert OPCODES[code].name == name and OPCODES[code].since == version
    assert opcode_name(code) == name and since(code) == version


def test_unsupported_opcodes_of_this_kernel_raise_naming_op_and_version(
        ring: saferring.Ring, pipe: tuple[int, int], datafile: tuple[str, bytes]) -> None:
    """For each registered-file op the running kernel lacks (per ring.features), the call raises
    UnsupportedOperationError naming the op and its Linux release, queuing nothing.  On a kernel
    that has them all there is nothing to check (the kernel is not faked)."""
    path, _ = datafile
    ring.register_files([pipe[0], pipe[1]])
    ff = ring.fixed_file(0)
    calls: dict[str, Callable[[], object]] = {
        "FIXED_FD_INSTALL": lambda: ring.fixed_fd_install(ff),
        "FTRUNCATE": lambda: ring.ftruncate(ff, 0),
        "SOCKET": lambda: ring.socket_direct(),
        "SPLICE": lambda: ring.splice(ff, pipe[1], 1),
        "CLOSE": lambda: ring.close_direct(ff),
        "OPENAT": lambda: ring.openat_direct(path),
        "ACCEPT": lambda: ring.accept_direct(pipe[0]),
    }
    missing = [(n, v) for n, v in _GATED if not ring.features.supports(n)]
    for name, version in missing:
        _refused_before_submission(ring, UnsupportedOperationError, calls[name],
                                   rf"{name}.*Linux {version}")
    if not missing:
        pytest.skip(f"kernel {ring.features.kernel_release} supports every op used here")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop and regain credentials")
def test_personality_block_runs_requests_with_registered_credentials(tmp_path: Any) -> None:
    """Inside `with ring.personality(id):` requests run with the credentials registered as id: after
    dropping to nobody, a root-only file opens only inside the block; an unknown id fails EINVAL,
    and the id in use cannot be unregistered."""
    os.chmod(tmp_path, 0o755)
    secret = os.path.join(tmp_path, "secret")
    with open(secret, "w") as f:
        f.write("root only")
    os.chmod(secret, 0o600)
    out = run_isolated(f"""
        import os, saferring
        with saferring.Ring() as ring:
            pid = ring.register_personality()
            os.setresuid(65534, 65534, 0)
            try:
                try:
                    ring.run(ring.openat({secret!r}))
                    print("opened without personality")
                except PermissionError:
                    print("denied without personality")
                with ring.personality(pid):
                    op = ring.openat({secret!r})
                fd = ring.run(op)
                print("read", os.read(fd, 20).decode()); os.close(fd)
                with ring.personality(pid):
                    try:
                        ring.unregister_personality(pid)
                    except saferring.OperationStateError:
                        print("in use: refused")
                    try:
                        with ring.personality(pid):
                            pass
                    except saferring.OperationStateError:
                        print("no nesting")
                with ring.personality(4242):
                    nop = ring.nop()
                try:
                    ring.run(nop)
                except OSError as exc:
                    print("unknown id errno", exc.errno)
                ring.unregister_personality(pid)
            finally:
                os.setresuid(0, 0, 0)
    """, timeout=60)
    assert out.split("\n")[:5] == ["denied without personality", "read root only", "in use: refused",
                                   "no nesting", f"unknown id errno {errno.EINVAL}"], out


def test_personality_bad_ids(ring: saferring.Ring) -> None:
    """personality() takes ids 1..65535 (TypeError for a non-int), and nothing is queued."""
    for bad in (0, -1, 1 << 16):
        with pytest.raises(ValueError), ring.personality(bad):
            pass
    with pytest.raises(TypeError), ring.personality("1"):  # type: ignore[arg-type]
        pass
    assert ring.stats().in_flight == 0


def test_ring_with_registered_fd_finalised_on_another_thread_leaves_others_alone() -> None:
    """A ring whose descriptor was registered by thread T1 and which is garbage-collected on
    thread T2 must not enter or unregister through T2's registered-ring table (where T2's own
    ring sits at the same offset): T2's ring keeps working."""
    out = run_isolated("""
        import gc, queue, threading, saferring
        q = queue.Queue()
        def t1():
            r1 = saferring.Ring()
            r1.register_ring_fd()
            r1.nop()  # in flight: the finaliser must drain it
            q.put(r1)
        th = threading.Thread(target=t1); th.start(); th.join()
        r1 = q.get()
        r2 = saferring.Ring()
        r2.register_ring_fd()
        print("before", r2.run(r2.nop()))
        del r1; gc.collect()
        print("after", r2.run(r2.nop()))
        r2.close()
    """, timeout=60)
    assert out.split() == ["before", "0", "after", "0"], out


def test_update_files_submits_queued_requests_first(ring: saferring.Ring, tmp_path: Any) -> None:
    """A write queued through a handle goes to the file that was in the slot when it was queued,
    even if update_files() replaces the slot before the next submit."""
    a = os.open(_write_file(str(tmp_path / "a"), b"original"), os.O_RDWR)
    b = os.open(_write_file(str(tmp_path / "b"), b"precious"), os.O_RDWR)
    try:
        (fa,) = ring.register_files([a])
        write = ring.write(fa, b"OVERWRIT", 0)
        ring.update_files(0, [b])
        assert not fa.valid
        assert ring.run(write) == 8
        assert os.pread(a, 8, 0) == b"OVERWRIT" and os.pread(b, 8, 0) == b"precious"
        with ring.chain():
            nop = ring.nop()
            with pytest.raises(OperationStateError, match="chain"):
                ring.update_files(0, [a])
        assert ring.run(nop) == 0
        ring.unregister_files()
    finally:
        os.close(a)
        os.close(b)


def test_direct_result_is_stale_if_slot_changed_before_reaping(ring: saferring.Ring,
                                                                tmp_path: Any) -> None:
    """The handle an openat_direct returns is stale if its slot was replaced after the request was
    queued (the slot may hold another file by the time the CQE is reaped)."""
    path_a = _write_file(str(tmp_path / "a"), b"AAAA")
    b = os.open(_write_file(str(tmp_path / "b"), b"BBBB"), os.O_RDONLY)
    try:
        ring.register_files(1)
        op = ring.openat_direct(path_a, slot=0)
        ring.submit()
        time.sleep(0.05)  # the kernel has installed A; its CQE is not reaped yet
        ring.update_files(0, [b])
        handle = ring.run(op)
        assert not handle.valid
        with pytest.raises(OperationStateError):
            ring.read(handle, bytearray(4), 0)
        ring.unregister_files()
    finally:
        os.close(b)
