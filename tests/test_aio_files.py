"""saferring.aio.open files and the filesystem helpers on the real kernel, on stock asyncio and on
uvloop, checked against the builtin open() and os.* doing the same thing."""

from __future__ import annotations

import asyncio
import errno
import io
import os
import random
import shutil
import stat
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import saferring
from _aio import (
    LOOP_KINDS,
    assert_idle,
    cancel_and_wait,
    checked_ring,
    hang_guard,
    new_loop,
    run,
    settle,
    until,
)
from saferring import aio
from saferring.aio import AsyncFile, AsyncRing, AsyncTextFile

Run = Callable[..., Any]

# Lines ending every way, multibyte UTF-8 (2, 3 and 4 bytes), no newline at the end.
TEXT = ("héllo wörld ✓\r\n日本語のテキスト\r🎉 emoji\n\nplain\r\r\nend\r" * 5) + "tail ∑"
BINARY = b"line one\nline two\r\nthird\rfourth\n\nlast no newline"
NEWLINES = [None, "", "\n", "\r", "\r\n"]


@pytest.fixture(params=LOOP_KINDS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def arun(loop_kind: str) -> Run:
    """``arun(coro_fn, *args)``: run ``coro_fn(*args)`` on a fresh loop of the test's kind."""
    def go(coro_fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> Any:
        return run(loop_kind, coro_fn, *args)
    return go


def _write(path: Any, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _read(path: Any) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- comparing with the builtin open() ---------------------------------------------------------

def _sync_step(f: Any, op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        if op == "readinto":
            buf = bytearray(args[0])
            return ("ok", f.readinto(buf), bytes(buf))
        return ("ok", getattr(f, op)(*args))
    except Exception as exc:  # (the outcome is compared)
        return ("error", type(exc))


async def _async_step(f: Any, op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    try:
        if op == "readinto":
            buf = bytearray(args[0])
            return ("ok", await f.readinto(buf), bytes(buf))
        if op in ("readable", "writable", "seekable"):
            return ("ok", getattr(f, op)())
        return ("ok", await getattr(f, op)(*args))
    except Exception as exc:  # (the outcome is compared)
        return ("error", type(exc))


async def _compare(tmp_path: Any, mode: str, init: bytes | None, script: list[tuple[Any, ...]],
                   ring: AsyncRing | None = None, **kwargs: Any) -> None:
    """Run ``script`` on a builtin file and on an aio file (same mode, same initial content):
    every step must give the same result (or raise the same exception type), and the files
    must end with the same bytes."""
    sync_path, async_path = tmp_path / "builtin", tmp_path / "aio"
    for path in (sync_path, async_path):
        if path.exists():
            path.unlink()
        if init is not None:
            _write(path, init)
    with open(sync_path, mode, **kwargs) as sf:
        af = await aio.open(async_path, mode, ring=ring, **kwargs)
        try:
            assert isinstance(af, AsyncTextFile if "b" not in mode else AsyncFile)
            for i, (op, *args) in enumerate(script):
                if not hasattr(sf, op):
                    continue  # (an unbuffered builtin file has no read1)
                expected = _sync_step(sf, op, tuple(args))
                got = await _async_step(af, op, tuple(args))
                assert got == expected, f"step {i} {op}{tuple(args)}: aio {got}, builtin {expected}"
        finally:
            await af.close()
    assert af.closed
    assert _read(async_path) == _read(sync_path)


BINARY_SCRIPTS: dict[str, list[tuple[Any, ...]]] = {
    "rb": [("read", 3), ("tell",), ("read1", 5), ("readline",), ("readline", 3), ("tell",),
           ("readinto", 7), ("seek", -4, 2), ("read",), ("tell",), ("read", 5), ("seek", 2),
           ("readlines",), ("seek", 3, 1), ("read", -1), ("seek", 0), ("read", 0),
           ("readline", 0), ("readline", None), ("read", None), ("seek", 5), ("readlines", 10),
           ("write", b"x"), ("truncate",), ("seek", -1), ("readable",),
           ("writable",), ("seekable",)],
    "r+b": [("read", 3), ("write", b"XY"), ("tell",), ("read", 4), ("tell",), ("seek", 0),
            ("read",), ("write", b"END"), ("tell",), ("truncate", 10), ("tell",), ("seek", 0, 2),
            ("tell",), ("seek", 0), ("readline",), ("write", b"Q"), ("flush",), ("tell",),
            ("read",), ("seek", 100), ("write", b"past the end"), ("tell",), ("seek", 0),
            ("read",), ("truncate", 200), ("seek", 0, 2), ("tell",)],
    "wb": [("write", b"hello"), ("tell",), ("seek", 2), ("write", b"ZZ"), ("tell",),
           ("seek", 0, 2), ("write", b"\nmore"), ("read", 1), ("truncate", 3), ("tell",),
           ("write", b"abc"), ("flush",), ("tell",), ("writelines", [b"x\n", b"y"]),
           ("tell",), ("write", "text")],
    "w+b": [("write", b"hello world"), ("seek", 0), ("read", 5), ("tell",), ("write", b"_"),
            ("read",), ("seek", 0), ("readlines",), ("truncate", 4), ("seek", 0, 2), ("tell",),
            ("write", b"!"), ("seek", 0), ("read",), ("seek", 0), ("readinto", 3)],
    "ab": [("tell",), ("write", b"appended"), ("flush",), ("tell",), ("seek", 0),
           ("write", b"again"), ("flush",), ("tell",), ("read",)],
    "a+b": [("tell",), ("seek", 0), ("read", 4), ("tell",), ("write", b"tail"), ("flush",),
            ("tell",), ("seek", 0), ("read",), ("seek", 3), ("read", 3), ("tell",)],
    "xb": [("write", b"new file"), ("tell",), ("seek", 0), ("read",), ("write", b"!"),
           ("seek", 0, 1), ("tell",)],
}

TEXT_SCRIPTS: dict[str, list[tuple[Any, ...]]] = {
    "r": [("read", 3), ("readline",), ("readline", 3), ("readline", 0), ("read", 0),
          ("readlines",), ("tell",), ("seek", 0), ("read",), ("tell",), ("seek", 0),
          ("readline",), ("seek", 0, 2), ("tell",), ("read",), ("seek", 0), ("read", None),
          ("write", "x"), ("readable",), ("writable",), ("seekable",)],
    "r+": [("read", 4), ("seek", 0), ("write", "LINE"), ("tell",), ("seek", 0), ("read",),
           ("write", "\nappended\n"), ("tell",), ("seek", 0), ("readlines",)],
    "w": [("write", "a\nb\r\nc"), ("tell",), ("writelines", ["x\n", "y"]), ("tell",),
          ("seek", 0), ("write", "Z"), ("tell",), ("seek", 0, 2), ("truncate", 3),
          ("write", b"bytes"), ("read",)],
    "w+": [("write", "héllo\nwörld\n"), ("tell",), ("seek", 0), ("read",), ("tell",),
           ("seek", 0), ("readline",), ("seek", 0), ("read", 3), ("seek", 0, 2),
           ("write", "end"), ("seek", 0), ("readlines",)],
    "a": [("tell",), ("write", "more\n"), ("flush",), ("tell",), ("read",)],
    "a+": [("tell",), ("seek", 0), ("read", 4), ("seek", 0, 2), ("write", "x\ny"), ("tell",),
           ("seek", 0), ("read",)],
    "x": [("write", "new\n"), ("tell",), ("seek", 0), ("read",)],
}


@pytest.mark.parametrize("mode", sorted(BINARY_SCRIPTS))
def test_binary_modes_match_builtin(arun: Run, tmp_path: Any, mode: str) -> None:
    """Every binary mode, buffered, with a tiny buffer and unbuffered: read, read1, readline(s),
    readinto, seek, tell, write(lines), flush and truncate give what the builtin file gives,
    and leave the same bytes."""
    async def main() -> None:
        async with checked_ring() as aring:
            init = None if "x" in mode else BINARY
            for buffering in (-1, 4, 0):
                await _compare(tmp_path, mode, init, BINARY_SCRIPTS[mode], aring,
                               buffering=buffering)

    arun(main)


@pytest.mark.parametrize("mode", sorted(TEXT_SCRIPTS))
def test_text_modes_match_builtin(arun: Run, tmp_path: Any, mode: str) -> None:
    """Every text mode, with newline None, "" and "\r\n": the same results, positions (where
    aio gives them) and file bytes as the builtin text file."""
    async def main() -> None:
        async with checked_ring() as aring:
            init = None if "x" in mode else TEXT.encode()
            for newline in (None, "", "\r\n"):
                await _compare(tmp_path, mode, init, TEXT_SCRIPTS[mode], aring,
                               newline=newline, encoding="utf-8")

    arun(main)


def test_append_position_is_end_of_file(arun: Run, tmp_path: Any) -> None:
    """In append modes writes go to the end whatever the position, and afterwards the position
    is the end of the file, as with the unbuffered builtin file (os.write with O_APPEND)."""
    script: list[tuple[Any, ...]] = [
        ("seek", 0), ("read", 2), ("write", b"Z"), ("tell",), ("read",), ("seek", 0),
        ("write", b"C"), ("tell",), ("seek", 1), ("read", 3), ("tell",)]

    async def main() -> None:
        async with checked_ring() as aring:
            await _compare(tmp_path, "a+b", BINARY, script, aring, buffering=0)
            path = tmp_path / "appended"
            _write(path, b"0123")
            async with aio.open(path, "ab", ring=aring) as f:
                assert await f.tell() == 4
                await f.write(b"45")
                assert await f.tell() == 6
                await f.seek(0)
                await f.write(b"6")
                assert await f.tell() == 7
            assert _read(path) == b"0123456"

    arun(main)


@pytest.mark.parametrize("newline", NEWLINES)
def test_text_reading_matches_builtin(arun: Run, tmp_path: Any, newline: str | None) -> None:
    """Reading text in every newline mode and several encodings, with chunks small enough to
    split multibyte characters and \\r\\n pairs: read(), read(n), readline(n), readlines()
    and async for give what the builtin file gives."""
    async def main() -> None:
        async with checked_ring() as aring:
            path = tmp_path / "t.txt"
            for encoding in ("utf-8", "utf-16", "utf-8-sig"):
                with open(path, "w", encoding=encoding, newline="") as f:
                    f.write(TEXT)
                for buffering in (16, 5, -1):
                    def builtin(encoding: str = encoding) -> Any:
                        return open(path, encoding=encoding, newline=newline)

                    def aiofile(encoding: str = encoding, buffering: int = buffering) -> Any:
                        return aio.open(path, encoding=encoding, newline=newline,
                                        buffering=buffering, ring=aring)

                    where = f"{encoding} buffering={buffering}"
                    with builtin() as f:
                        expected = f.readlines()
                    async with aiofile() as af:
                        assert await af.readlines() == expected, where
                    async with aiofile() as af:
                        assert [line async for line in af] == expected, where
                    with builtin() as f:
                        expected_all = f.read()
                    assert expected_all == "".join(expected)
                    async with aiofile() as af:
                        assert await af.read() == expected_all, where
                        assert await af.read() == ""
                    sizes = [random.Random(buffering).randint(0, 9) for _ in range(80)]
                    with builtin() as f:
                        expected = [f.read(n) for n in sizes]
                    async with aiofile() as af:
                        assert [await af.read(n) for n in sizes] == expected, where
                    with builtin() as f:
                        expected = [f.readline(n) for n in sizes]
                    async with aiofile() as af:
                        assert [await af.readline(n) for n in sizes] == expected, where

    arun(main)


@pytest.mark.parametrize("newline", NEWLINES)
def test_text_writing_matches_builtin(arun: Run, tmp_path: Any, newline: str | None) -> None:
    """Writing text in every newline mode (utf-8 and utf-16, a 16-byte buffer) puts the same
    bytes in the file as the builtin file, and reads back the same way."""
    async def main() -> None:
        async with checked_ring() as aring:
            for encoding in ("utf-8", "utf-16"):
                sync_path, async_path = tmp_path / "s.txt", tmp_path / "a.txt"
                with open(sync_path, "w", encoding=encoding, newline=newline) as f:
                    f.write(TEXT)
                    f.writelines(["a\n", "b\r\n", "c\r"])
                async with aio.open(async_path, "w", encoding=encoding, newline=newline,
                                    buffering=16, ring=aring) as af:
                    assert await af.write(TEXT) == len(TEXT)
                    await af.writelines(["a\n", "b\r\n", "c\r"])
                assert _read(async_path) == _read(sync_path), encoding
                with open(sync_path, encoding=encoding, newline=newline) as f:
                    expected = f.read()
                async with aio.open(async_path, encoding=encoding, newline=newline,
                                    ring=aring) as af:
                    assert await af.read() == expected

    arun(main)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_bom_written_once_like_builtin(arun: Run, tmp_path: Any, encoding: str) -> None:
    """Encodings with a BOM: appending, writing after seek(0, 2), and reading from a position
    tell() gave behave as the builtin text file (one BOM at the start, none in the middle)."""
    async def main() -> None:
        async with checked_ring() as aring:
            init = "init".encode(encoding)
            scripts: dict[str, list[tuple[Any, ...]]] = {
                "a": [("write", "ab"), ("flush",), ("tell",)],
                "r+": [("seek", 0, 2), ("write", "zz"), ("seek", 0), ("read",)],
                "w": [("write", "héllo"), ("seek", 0, 2), ("write", "x"), ("seek", 0),
                      ("write", "Y")],
                "w+": [("write", "abc"), ("seek", 0), ("read",), ("seek", 0, 2), ("write", "d"),
                       ("seek", 0), ("read",)],
            }
            for mode, script in scripts.items():
                await _compare(tmp_path, mode, init, script, aring, encoding=encoding)
            async with aio.open(tmp_path / "b.txt", "w+", encoding=encoding, ring=aring) as af:
                await af.write("abc")
                pos = await af.tell()
                await af.write("déf")
                assert await af.seek(pos) == pos
                assert await af.read() == "déf"
            with open(tmp_path / "b.txt", encoding=encoding) as f:
                assert f.read() == "abcdéf"

    arun(main)


# -- reading: offsets, the page-cache path ----------------------------------------------------

@pytest.mark.parametrize("nowait", [True, False])
def test_pread_pwrite(arun: Run, tmp_path: Any, nowait: bool) -> None:
    """pread/pwrite read and write at an offset without moving the position, see buffered
    writes first, and refuse negative offsets or sizes."""
    data = os.urandom(50_000)
    path = tmp_path / "p.bin"
    _write(path, data)

    async def main() -> None:
        async with checked_ring() as aring:
            async with aio.open(path, "r+b", nowait=nowait, ring=aring) as f:
                assert await f.read(10) == data[:10]
                assert await f.pread(100, 1000) == data[1000:1100]
                assert await f.pread(100, len(data) - 30) == data[-30:]
                assert await f.pread(10, len(data) + 5) == b""
                assert await f.pread(0, 5) == b""
                assert await f.tell() == 10
                await f.write(b"buffered")
                assert await f.pread(8, 10) == b"buffered"  # flushed first
                assert await f.pwrite(b"PWRITE", 40_000) == 6
                assert await f.tell() == 18
                assert await f.read(2) == data[18:20]
                assert await f.pread(10, 39_998) == data[39_998:40_000] + b"PWRITE" + \
                    data[40_006:40_008]
                with pytest.raises(ValueError):
                    await f.pread(-1, 0)
                with pytest.raises(ValueError):
                    await f.pread(1, -1)
                with pytest.raises(ValueError):
                    await f.pwrite(b"x", -1)
            expected = bytearray(data)
            expected[10:18] = b"buffered"
            expected[40_000:40_006] = b"PWRITE"
            assert _read(path) == expected

    arun(main)


@pytest.mark.parametrize("nowait", [True, False])
@pytest.mark.parametrize("submit", ["inline", "deferred"])
def test_gather_preads(arun: Run, tmp_path: Any, nowait: bool, submit: str) -> None:
    """32 concurrent preads (gather) on one file, at random offsets and sizes up to 300 KiB,
    each return exactly their slice."""
    data = os.urandom(1 << 20)
    path = tmp_path / "big.bin"
    _write(path, data)
    rnd = random.Random(7)
    spans = [(rnd.randint(0, 300_000), rnd.randint(0, len(data) + 10)) for _ in range(32)]

    async def main() -> None:
        async with checked_ring(submit=submit) as aring, \
                aio.open(path, "rb", nowait=nowait, ring=aring) as f:
            results = await asyncio.gather(*(f.pread(size, off) for size, off in spans))
            for (size, off), got in zip(spans, results, strict=True):
                assert got == data[off:off + size]
            assert await f.tell() == 0

    arun(main)


def test_nowait_and_ring_reads_agree(arun: Run, tmp_path: Any) -> None:
    """The same sequence of reads gives identical results with nowait=True (page cache first)
    and nowait=False (every read through the ring, as the ring's counters show)."""
    data = os.urandom(300_000) + b"\n".join(b"line %d" % i for i in range(2000))
    path = tmp_path / "n.bin"
    _write(path, data)

    async def reads(aring: AsyncRing, nowait: bool) -> list[Any]:
        out: list[Any] = []
        async with aio.open(path, "rb", buffering=8192, nowait=nowait, ring=aring) as f:
            out.append(await f.read(100))
            out.append(await f.read(70_000))
            out.append(await f.readline())
            out.append(await f.read1(5000))
            out.append(await f.seek(-5000, 2))
            out.append(await f.readlines())
            out.append(await f.seek(250_000))
            out.append(await f.read())
            out.append(await f.pread(300_000, 1))
            out.append(await f.tell())
        return out

    async def main() -> None:
        async with checked_ring() as aring:
            before = aring.stats().submitted
            through_ring = await reads(aring, False)
            reads_submitted = aring.stats().submitted - before
            assert reads_submitted >= 8  # openat, close and a read for every call at least
            assert await reads(aring, True) == through_ring
        assert through_ring[-1] == len(data)
        assert through_ring[1] == data[100:70_100]
        assert through_ring[7] == data[250_000:]

    arun(main)


@pytest.mark.parametrize("buffering", [-1, 5])
def test_binary_iteration_like_builtin(arun: Run, tmp_path: Any, buffering: int) -> None:
    """`async for` over a binary file yields the lines the builtin file yields (the last one
    without its newline), for lines longer and shorter than the buffer."""
    data = b"".join(b"x" * (i % 23) + b"\n" for i in range(200)) + b"no newline at the end"
    path = tmp_path / "lines.bin"
    _write(path, data)
    with open(path, "rb", buffering=buffering) as f:
        expected = list(f)

    async def main() -> None:
        async with checked_ring() as aring, \
                aio.open(path, "rb", buffering=buffering, ring=aring) as f:
            assert [line async for line in f] == expected
            assert await f.read() == b""

    arun(main)


def test_concurrent_calls_on_one_file_run_in_order(arun: Run, tmp_path: Any) -> None:
    """Calls on one file from several tasks run one at a time, in the order they were made:
    gather of 8 read(1000) returns 8 consecutive slices."""
    data = os.urandom(20_000)
    path = tmp_path / "c.bin"
    _write(path, data)

    async def main() -> None:
        async with checked_ring(submit="deferred") as aring, \
                aio.open(path, "rb", buffering=700, nowait=False, ring=aring) as f:
            got = await asyncio.gather(*(f.read(1000) for _ in range(8)))
            assert got == [data[i * 1000:(i + 1) * 1000] for i in range(8)]
            assert await f.tell() == 8000

    arun(main)


# -- bad input ---------------------------------------------------------------------------------

# (Not "U": Python 3.10's open() still takes it, with a DeprecationWarning; aio refuses it, as 3.11.)
MODES = ["", "z", "rw", "rr", "rb+t", "bt", "+", "r+", "+r", "br", "tb", "xt", "ab+x", "wa", "b",
         "t", "rbb", "w+b", "a+", "r ", "rq", 5, None, b"r"]


def test_mode_strings_like_builtin(arun: Run, tmp_path: Any) -> None:
    """A mode the builtin open() refuses is refused with the same exception type (ValueError,
    TypeError); one it accepts is accepted."""
    path = tmp_path / "m.txt"
    expected: dict[int, Any] = {}
    for i, mode in enumerate(MODES):
        _write(path, b"content")
        try:
            with open(path, mode):
                pass
            expected[i] = None
        except Exception as exc:  # (the outcome is compared)
            expected[i] = type(exc)
    assert set(expected.values()) == {None, ValueError, TypeError, FileExistsError}

    async def main() -> None:
        async with checked_ring() as aring:
            for i, mode in enumerate(MODES):
                _write(path, b"content")
                try:
                    f = await aio.open(path, mode, ring=aring)
                except Exception as exc:  # (the outcome is compared)
                    assert type(exc) is expected[i], (mode, exc)
                else:
                    await f.close()
                    assert expected[i] is None, mode

    arun(main)


def test_bad_arguments_raise_like_builtin(arun: Run, tmp_path: Any) -> None:
    """Binary mode with encoding/errors/newline, unbuffered text, a bad newline, an unknown
    encoding, closefd=False with a name, a negative descriptor, a missing file and a
    directory raise what open() raises, and leak no descriptor."""
    path = tmp_path / "f.txt"
    _write(path, b"data")
    cases: list[tuple[Any, dict[str, Any]]] = [
        (path, {"mode": "rb", "encoding": "utf-8"}),
        (path, {"mode": "rb", "errors": "strict"}),
        (path, {"mode": "wb", "newline": "\n"}),
        (path, {"mode": "r", "buffering": 0}),
        (path, {"mode": "r", "newline": "x"}),
        (path, {"mode": "r", "encoding": "no-such-codec"}),
        (path, {"mode": "r", "closefd": False}),
        (-1, {"mode": "rb"}),
        (tmp_path / "missing", {"mode": "rb"}),
        (tmp_path / "missing", {"mode": "r+"}),
        (tmp_path / "no" / "dir", {"mode": "w"}),
        (tmp_path, {"mode": "rb"}),
        (tmp_path, {"mode": "r"}),
        (tmp_path, {"mode": "w"}),
        (path, {"mode": "x"}),
    ]
    expected = []
    for file, kwargs in cases:
        with pytest.raises(Exception) as info, open(file, **kwargs):  # (type compared below)
            pass
        expected.append(info.value)

    async def main() -> None:
        async with checked_ring() as aring:
            for (file, kwargs), exc in zip(cases, expected, strict=True):
                with pytest.raises(type(exc)) as info:
                    await aio.open(file, ring=aring, **kwargs)
                assert type(info.value) is type(exc), (file, kwargs, info.value)
                if isinstance(exc, OSError):
                    assert info.value.errno == exc.errno
                    assert os.fspath(info.value.filename) == os.fspath(exc.filename)

    arun(main)
    assert _read(path) == b"data"


def test_wrong_direction_and_closed_file(arun: Run, tmp_path: Any) -> None:
    """Reading a write-only file or writing a read-only one raises io.UnsupportedOperation, and
    every call on a closed file raises ValueError, as with builtin files; close() is
    idempotent."""
    path = tmp_path / "d.bin"
    _write(path, b"abc\n")

    async def main() -> None:
        async with checked_ring() as aring:
            for mode in ("wb", "w", "ab"):
                async with aio.open(path, mode, ring=aring) as f:
                    for call in (f.read, f.readline, f.readlines):
                        with pytest.raises(io.UnsupportedOperation):
                            await call()
                    if "b" in mode:
                        for call2 in (lambda: f.read1(1), lambda: f.pread(1, 0),
                                      lambda: f.readinto(bytearray(1))):
                            with pytest.raises(io.UnsupportedOperation):
                                await call2()
                    assert not f.readable() and f.writable()
            _write(path, b"abc\n")
            for mode in ("rb", "r"):
                f = await aio.open(path, mode, ring=aring)
                with pytest.raises(ValueError):
                    await f.seek(0, 7)  # a bad whence (as buffered builtin files)
                with pytest.raises(OSError) as info:
                    await f.seek(-1)
                assert info.value.errno == errno.EINVAL
                x = b"x" if "b" in mode else "x"
                for call3 in (lambda f=f, x=x: f.write(x), lambda f=f, x=x: f.writelines([x]),
                              lambda f=f: f.truncate(0)):
                    with pytest.raises(io.UnsupportedOperation):
                        await call3()
                if "b" in mode:
                    with pytest.raises(io.UnsupportedOperation):
                        await f.pwrite(b"x", 0)
                assert f.readable() and not f.writable()
                await f.close()
                assert f.closed
                await f.close()
                calls = [f.read, f.readline, f.tell, f.flush, lambda f=f: f.seek(0),
                         lambda f=f, x=x: f.write(x), f.readlines, f.truncate, f.__anext__]
                if "b" in mode:
                    calls += [lambda f=f: f.pread(1, 0), lambda f=f: f.read1(1), f.stat]
                for call4 in calls:
                    with pytest.raises(ValueError):
                        await call4()
                with pytest.raises(ValueError):
                    f.fileno()
        assert _read(path) == b"abc\n"

    arun(main)
    with open(path, "rb") as f:
        f.close()
        for sync_call in (f.read, f.readline, f.tell, f.flush, f.fileno):
            with pytest.raises(ValueError):
                sync_call()


def test_errors_and_line_buffering_like_builtin(arun: Run, tmp_path: Any) -> None:
    """errors= decides what undecodable and unencodable text becomes, as in open(); strict
    raises the same Unicode errors; buffering=1 puts each line on disk at write()."""
    path = tmp_path / "bad.txt"
    raw = b"ok \xff\xfe bytes \xc3\n\xe2\x82 end"
    _write(path, raw)

    async def main() -> None:
        async with checked_ring() as aring:
            for errors in ("replace", "ignore", "surrogateescape", "backslashreplace"):
                with open(path, encoding="utf-8", errors=errors) as f:
                    expected = f.read()
                async with aio.open(path, encoding="utf-8", errors=errors, buffering=3,
                                    ring=aring) as af:
                    assert await af.read() == expected, errors
            async with aio.open(path, encoding="utf-8", ring=aring) as af:
                with pytest.raises(UnicodeDecodeError):
                    await af.read()
            out = tmp_path / "out.txt"
            async with aio.open(out, "w", encoding="ascii", errors="xmlcharrefreplace",
                                ring=aring) as af:
                await af.write("café ✓")
            assert _read(out) == b"caf&#233; &#10003;"
            async with aio.open(out, "w", encoding="ascii", ring=aring) as af:
                with pytest.raises(UnicodeEncodeError):
                    await af.write("é")
            async with aio.open(out, "w", buffering=1, ring=aring) as af:
                await af.write("first line\nsecond")
                assert _read(out) == b"first line\nsecond"  # a newline flushes (all of it)
                await af.write(" part")
                assert _read(out) == b"first line\nsecond"
            assert _read(out) == b"first line\nsecond part"

    arun(main)


def test_file_used_from_another_loop(loop_kind: str, tmp_path: Any) -> None:
    """A file (and the helpers) on a ring of another loop raise WrongLoopError and leave no
    request behind; the file still works on its own loop."""
    path = tmp_path / "x.bin"
    _write(path, b"0123456789")
    loop1, loop2 = new_loop(loop_kind), new_loop(loop_kind)
    r, w = os.pipe()
    try:
        async def make() -> tuple[AsyncRing, Any, Any]:
            aring = AsyncRing(16)
            return (aring, await aio.open(path, "r+b", ring=aring),
                    await aio.open(r, "rb", closefd=False, ring=aring))

        aring, f, pipe = loop1.run_until_complete(make())
        os.write(w, b"pipe")
        for attempt in (lambda: f.read(3), lambda: f.write(b"x" * 70_000), f.tell, f.flush,
                        lambda: f.seek(1), lambda: f.pread(2, 0), lambda: pipe.read(4),
                        lambda: aio.open(path, ring=aring), lambda: aio.stat(path, ring=aring),
                        lambda: aio.copyfile(path, tmp_path / "y", ring=aring)):
            with pytest.raises(saferring.WrongLoopError):
                loop2.run_until_complete(attempt())
        assert aring.in_flight() == 0

        async def home() -> tuple[bytes, bytes]:
            got = (await f.read(3), await pipe.read(4))
            await f.close()
            await pipe.close()
            assert_idle(aring)
            await aring.aclose()
            return got

        assert loop1.run_until_complete(home()) == (b"012", b"pipe")
    finally:
        os.close(r)
        os.close(w)
        loop1.close()
        loop2.close()


def test_file_attributes(arun: Run, tmp_path: Any) -> None:
    """name, mode, fileno, readable/writable/seekable, closed, stat(), fsync() and repr of
    binary and text files agree with the file (and os.fstat)."""
    path = tmp_path / "attr.txt"

    async def main() -> None:
        async with checked_ring() as aring:
            async with aio.open(path, "w+", encoding="latin-1", ring=aring) as f:
                assert isinstance(f, AsyncTextFile) and isinstance(f.buffer, AsyncFile)
                assert f.name == path and f.mode == "w+" and f.encoding == "latin-1"
                assert f.readable() and f.writable() and f.seekable() and not f.closed
                assert f.fileno() == f.buffer.fileno()
                assert os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
                await f.write("äbc")
                await f.buffer.fsync()
                st = await f.buffer.stat()
                assert st.st_size == 3 and st.st_ino == os.stat(path).st_ino
                assert "attr.txt" in repr(f) and "latin-1" in repr(f)
                fd = f.fileno()
            assert f.closed and "closed" in repr(f.buffer)
            with pytest.raises(OSError) as info:
                os.fstat(fd)
            assert info.value.errno == errno.EBADF
            assert _read(path) == "äbc".encode("latin-1")

    arun(main)


def test_open_as_awaitable_and_context_manager(arun: Run, tmp_path: Any) -> None:
    """`await aio.open()` and `async with aio.open()` both work on the loop's shared ring (the
    default); leaving `async with` on an exception still flushes and closes."""
    path = tmp_path / "ctx.bin"

    async def main() -> AsyncRing:
        f = await aio.open(path, "wb")
        await f.write(b"one ")
        await f.close()
        with pytest.raises(KeyError):
            async with aio.open(path, "ab") as g:
                await g.write(b"two")
                raise KeyError("boom")
        assert g.closed
        async with aio.open(path, "rb") as h:
            assert await h.read() == b"one two"
        aring = aio.get_ring()
        assert_idle(aring)
        return aring

    aring = arun(main)
    assert aring.closed


def test_pipe_without_positions(arun: Run) -> None:
    """An os.pipe() pair opened by descriptor (closefd=True) carries bytes and text both ways;
    seek, tell, pread, pwrite raise io.UnsupportedOperation; the writer's close is the end of
    file."""
    async def main() -> None:
        async with checked_ring() as aring:
            r, w = os.pipe()
            reader = await aio.open(r, "rb", ring=aring)
            writer = await aio.open(w, "wb", ring=aring)
            try:
                assert not reader.seekable() and not writer.seekable()
                for call in (reader.tell, lambda: reader.seek(0), lambda: reader.pread(1, 0),
                             lambda: writer.pwrite(b"x", 0), writer.tell):
                    with pytest.raises(io.UnsupportedOperation):
                        await call()
                await writer.write(b"first line\nsecond")
                await writer.flush()
                assert await reader.readline() == b"first line\n"
                assert await reader.read(3) == b"sec"
                await writer.write(b" part\n")
                await writer.close()
                assert await reader.read() == b"ond part\n"
                assert await reader.read() == b""
            finally:
                await writer.close()
                await reader.close()
            for fd in (r, w):
                with pytest.raises(OSError):
                    os.fstat(fd)

            r, w = os.pipe()
            async with aio.open(w, "w", encoding="utf-8", ring=aring) as tw:
                await tw.write("ünïcode\nlines\n")
            async with aio.open(r, "r", encoding="utf-8", ring=aring) as tr:
                assert [line async for line in tr] == ["ünïcode\n", "lines\n"]

    arun(main)


# -- cancellation ------------------------------------------------------------------------------

@pytest.mark.parametrize("nowait", [True, False])
@pytest.mark.parametrize("submit", ["inline", "deferred"])
def test_cancel_reads_at_many_points(arun: Run, tmp_path: Any, submit: str, nowait: bool) -> None:
    """read(n)/readline() tasks cancelled after 0-3 loop iterations: a cancelled call consumes
    nothing (tell() stays put), completed ones return the next bytes; all together they are the
    file, exactly."""
    data = b"".join(b"%05d:" % i + os.urandom(i % 13) + b"\n" for i in range(3000))
    path = tmp_path / "r.bin"
    _write(path, data)

    async def main() -> None:
        async with checked_ring(submit=submit) as aring, \
                aio.open(path, "rb", buffering=512, nowait=nowait, ring=aring) as f:
            got = bytearray()
            cancelled = 0
            for i in range(60):
                call = f.readline() if i % 3 == 0 else f.read(100 + i * 37)
                task = asyncio.ensure_future(call)
                for _ in range(i % 4):
                    await asyncio.sleep(0)
                outcome = await cancel_and_wait(task)
                if isinstance(outcome, bytes):
                    got += outcome
                else:
                    assert isinstance(outcome, asyncio.CancelledError)
                    cancelled += 1
                assert await f.tell() == len(got)
                assert got == data[:len(got)]
            got += await f.read()
            assert bytes(got) == data
            assert cancelled > 0

    arun(main)


@pytest.mark.parametrize("submit", ["inline", "deferred"])
def test_cancel_writes_and_flushes_at_many_points(arun: Run, tmp_path: Any, submit: str) -> None:
    """write()/flush() tasks cancelled after 0-3 loop iterations: a write counts exactly when
    tell() moved by its length; the file ends with exactly those writes, in order, nothing
    lost or duplicated."""
    path = tmp_path / "w.bin"

    async def main() -> None:
        async with checked_ring(submit=submit) as aring:
            async with aio.open(path, "wb", buffering=64, ring=aring) as f:
                expected = bytearray()
                for i in range(80):
                    before = await f.tell()
                    chunk = (b"<%04d>" % i) * (i % 7 + 1)
                    task = asyncio.ensure_future(f.flush() if i % 5 == 4 else f.write(chunk))
                    for _ in range(i % 4):
                        await asyncio.sleep(0)
                    await cancel_and_wait(task)
                    after = await f.tell()
                    if i % 5 == 4:
                        assert after == before
                    elif after != before:
                        assert after == before + len(chunk)
                        expected += chunk
                assert len(expected) > 0
            assert _read(path) == bytes(expected)

    arun(main)


def test_cancel_text_reads_at_many_points(arun: Run, tmp_path: Any) -> None:
    """Text read(n) tasks over multibyte UTF-8 with a 16-byte buffer, cancelled after 0-3 loop
    iterations: the characters returned are the text, in order, none lost or repeated."""
    path = tmp_path / "t.txt"
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(TEXT * 3)

    async def main() -> None:
        async with checked_ring(submit="deferred") as aring, \
                aio.open(path, encoding="utf-8", newline="", buffering=16, nowait=False,
                         ring=aring) as f:
            got = []
            for i in range(60):
                task = asyncio.ensure_future(f.read(i % 11))
                for _ in range(i % 4):
                    await asyncio.sleep(0)
                outcome = await cancel_and_wait(task)
                if isinstance(outcome, str):
                    got.append(outcome)
            got.append(await f.read())
            assert "".join(got) == TEXT * 3

    arun(main)


def test_cancelled_pipe_read_keeps_data_and_close_does_not_hang(arun: Run) -> None:
    """A read on a pipe cancelled while it waits for data leaves the request in the kernel; the
    data that then arrives is returned by the next read; a second cancelled read does not hold
    close() up although the writer stays silent."""
    async def main() -> None:
        async with checked_ring() as aring:
            r, w = os.pipe()
            try:
                f = await aio.open(r, "rb", ring=aring)
                task = asyncio.ensure_future(f.read(5))
                await until(lambda: aring.in_flight() == 1)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                assert aring.in_flight() == 1  # the file request was not cancelled
                os.write(w, b"abcdefgh")
                assert await asyncio.wait_for(f.read(5), 5) == b"abcde"
                assert await f.read(3) == b"fgh"
                task = asyncio.ensure_future(f.read(5))
                await until(lambda: aring.in_flight() == 1)
                assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
                await asyncio.wait_for(f.close(), 5)
                assert f.closed
                await settle(aring)
                assert_idle(aring)
            finally:
                os.close(w)

    arun(main)


def test_call_cancelled_while_waiting_for_a_cancelled_request(arun: Run) -> None:
    """A call cancelled while it waits for the request an earlier cancelled call left (a pipe
    read waiting for data) loses nothing: once data arrives, the next read returns it (and
    does not spin)."""
    async def main() -> None:
        async with checked_ring() as aring:
            r, w = os.pipe()
            try:
                f = await aio.open(r, "rb", ring=aring)
                first = asyncio.ensure_future(f.read(4))
                await until(lambda: aring.in_flight() == 1)
                assert isinstance(await cancel_and_wait(first), asyncio.CancelledError)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(f.read(4), 0.01)  # waits for the first request
                os.write(w, b"wxyz")
                with hang_guard():
                    assert await asyncio.wait_for(f.read(4), 5) == b"wxyz"
                    await f.close()
            finally:
                os.close(w)

    arun(main)


@pytest.mark.parametrize("how", ["aclose", "close"])
def test_file_after_its_ring_closed(loop_kind: str, tmp_path: Any, how: str) -> None:
    """A file whose ring was closed while a cancelled call's request was in flight: close()
    neither spins nor leaks the descriptor, and I/O raises RingClosedError."""
    async def main() -> None:
        aring = AsyncRing(16)
        r, w = os.pipe()
        try:
            f = await aio.open(r, "rb", ring=aring)
            task = asyncio.ensure_future(f.read(4))
            await until(lambda: aring.in_flight() == 1)
            assert isinstance(await cancel_and_wait(task), asyncio.CancelledError)
            if how == "aclose":
                await aring.aclose()
            else:
                aring.close()
            with hang_guard():
                with pytest.raises(saferring.RingClosedError):
                    await asyncio.wait_for(f.read(4), 5)
                await asyncio.wait_for(f.close(), 5)
            assert f.closed
            with pytest.raises(OSError):
                os.fstat(r)
        finally:
            os.close(w)
            aring.close()

    run(loop_kind, main)


# -- copyfile and the filesystem helpers -------------------------------------------------------

CHUNK = 4096


def test_copyfile_sizes(arun: Run, tmp_path: Any) -> None:
    """copyfile copies contents of every size around the chunk size exactly, truncating a
    longer existing destination, and returns dst."""
    sizes = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 5 * CHUNK + 17]
    datas = [os.urandom(size) for size in sizes]

    async def main() -> None:
        async with checked_ring() as aring:
            for size, data in zip(sizes, datas, strict=True):
                src, dst = tmp_path / f"src{size}", tmp_path / f"dst{size}"
                _write(src, data)
                _write(dst, b"x" * (size + 1000))
                assert await aio.copyfile(src, dst, chunk_size=CHUNK, ring=aring) == dst
                assert _read(dst) == data, size

    arun(main)


def test_copyfile_few_mib_small_chunks(arun: Run, tmp_path: Any) -> None:
    """A 3 MiB copy through 64 KiB chunks on the shared ring is exact."""
    data = os.urandom(3 << 20)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _write(src, data)

    async def main() -> None:
        await aio.copyfile(str(src), str(dst), chunk_size=64 * 1024)
        assert_idle(aio.get_ring())

    arun(main)
    assert _read(dst) == data


def test_copyfile_errors_like_shutil(arun: Run, tmp_path: Any) -> None:
    """copyfile raises what shutil.copyfile raises: FileNotFoundError for a missing source,
    SameFileError for the same file (path, hard link, symlink), IsADirectoryError for a
    directory on either side; and ValueError for chunk_size <= 0."""
    src = tmp_path / "src"
    _write(src, b"data")
    os.link(src, tmp_path / "hard")
    os.symlink(src, tmp_path / "soft")
    (tmp_path / "dir").mkdir()
    cases = [
        (tmp_path / "missing", tmp_path / "out"),
        (src, src),
        (src, tmp_path / "hard"),
        (src, tmp_path / "soft"),
        (src, tmp_path / "dir"),
        (tmp_path / "dir", tmp_path / "out2"),
    ]
    expected = []
    for a, b in cases:
        with pytest.raises(OSError) as info:
            shutil.copyfile(a, b)
        expected.append(type(info.value))
    assert expected[1] is shutil.SameFileError

    async def main() -> None:
        async with checked_ring() as aring:
            for (a, b), exc_type in zip(cases, expected, strict=True):
                with pytest.raises(exc_type) as info:
                    await aio.copyfile(a, b, ring=aring)
                assert type(info.value) is exc_type, (a, b)
            with pytest.raises(ValueError):
                await aio.copyfile(src, tmp_path / "out3", chunk_size=0, ring=aring)

    arun(main)
    assert _read(src) == b"data"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


async def _outcome(coro: Any) -> Any:
    try:
        return ("ok", await coro)
    except OSError as exc:
        return ("error", type(exc), exc.errno)


def _sync_outcome(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("error", type(exc), exc.errno)


def test_stat_like_os_stat(arun: Run, tmp_path: Any) -> None:
    """aio.stat of a file, a directory, a symlink (followed or not) and an open descriptor
    gives os.stat's fields; a missing path raises FileNotFoundError."""
    path = tmp_path / "s.bin"
    _write(path, b"x" * 1234)
    os.symlink(path, tmp_path / "link")
    fields = ("st_mode", "st_ino", "st_dev", "st_nlink", "st_uid", "st_gid", "st_size",
              "st_mtime_ns", "st_ctime_ns", "st_blocks")

    async def main() -> None:
        async with checked_ring() as aring:
            for target, follow in ((path, True), (tmp_path, True), (tmp_path / "link", True),
                                   (tmp_path / "link", False)):
                st = await aio.stat(target, follow_symlinks=follow, ring=aring)
                expected = os.stat(target, follow_symlinks=follow)
                for name in fields:
                    assert getattr(st, name) == getattr(expected, name), (target, name)
            st = await aio.stat(tmp_path / "link", follow_symlinks=False, ring=aring)
            assert stat.S_ISLNK(st.st_mode)
            fd = os.open(path, os.O_RDONLY)
            try:
                st = await aio.stat(fd, ring=aring)
                assert (st.st_ino, st.st_size) == (os.fstat(fd).st_ino, 1234)
            finally:
                os.close(fd)
            with pytest.raises(FileNotFoundError):
                await aio.stat(tmp_path / "missing", ring=aring)

    arun(main)


def test_remove_rmdir_rename_mkdir_like_os(arun: Run, tmp_path: Any) -> None:
    """remove/unlink, rmdir, rename and mkdir do what os.remove, os.rmdir, os.rename and
    os.mkdir do, in two twin trees, and fail with the same exceptions and errnos."""
    trees = [tmp_path / "os", tmp_path / "aio"]
    for root in trees:
        root.mkdir()
        _write(root / "file", b"f")
        _write(root / "other", b"o")
        (root / "full").mkdir()
        _write(root / "full" / "inside", b"i")
        (root / "empty").mkdir()

    def steps(root: Any) -> list[tuple[str, tuple[Any, ...]]]:
        return [
            ("mkdir", (root / "new", 0o750)), ("mkdir", (root / "new",)),
            ("mkdir", (root / "no" / "parent",)), ("mkdir", (root / "file",)),
            ("rename", (root / "other", root / "renamed")),
            ("rename", (root / "missing", root / "x")),
            ("rename", (root / "renamed", root / "file")),  # replaces it
            ("rename", (root / "empty", root / "full")),
            ("remove", (root / "file",)), ("remove", (root / "file",)),
            ("remove", (root / "full",)), ("unlink", (root / "full" / "inside",)),
            ("rmdir", (root / "full",)), ("rmdir", (root / "full",)),
            ("rmdir", (root / "empty",)), ("mkdir", (root / "empty",)),
            ("rmdir", (root / "new",)),
        ]

    os_steps = steps(trees[0])
    expected = [_sync_outcome(getattr(os, name), *args) for name, args in os_steps]

    async def main() -> None:
        async with checked_ring() as aring:
            for (name, args), want in zip(steps(trees[1]), expected, strict=True):
                got = await _outcome(getattr(aio, name)(*args, ring=aring))
                assert got == want, (name, args)

    arun(main)

    def listing(root: Any) -> list[tuple[str, int, bytes | None]]:
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                mode = os.lstat(full).st_mode
                out.append((os.path.relpath(full, root), mode,
                            _read(full) if stat.S_ISREG(mode) else None))
        return sorted(out)

    assert listing(trees[1]) == listing(trees[0])
    assert [e for e in expected if e[0] == "error"]  # the failures were compared too


def test_file_dropped_unclosed_warns_writes_and_closes(arun: Run, tmp_path: Any) -> None:
    """An AsyncFile garbage-collected unclosed raises ResourceWarning (as builtin files do),
    writes what it had buffered and closes its descriptor."""
    import gc
    import warnings

    path = tmp_path / "dropped.bin"

    async def main() -> int:
        f = await aio.open(path, "wb")
        await f.write(b"kept in the buffer")
        fd = f.fileno()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del f
            gc.collect()
        assert any(issubclass(w.category, ResourceWarning) for w in caught), caught
        return fd

    fd = arun(main)
    assert _read(path) == b"kept in the buffer"
    try:  # closed (the number may have been reused since, but not for this file)
        target = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        target = None
    assert target != str(path)
