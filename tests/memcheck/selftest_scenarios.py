"""Scenarios that make saferring's compiled code misbehave on purpose, through the raw layer
(``saferring.unsafe``), for test_memcheck_selftest.py: run under memcheck.py they must be reported,
each with the right kind and a stack through our extension, and the clean ones must not be.

Only for valgrind.  Natively the bad ones read freed memory and write a few bytes past the end
of a heap block, which may go unnoticed or may corrupt the allocator; under valgrind the accesses
land in its red zones and freed-block quarantine, are reported, and harm nothing.  They are not in
tests/torture (which the normal suite runs natively); memcheck.py loads them with
``--scenario-module`` only.
"""

from __future__ import annotations

import ctypes
import gc
import os

from harness import Context, scenario

import saferring
from saferring.unsafe import ffi, lib


@scenario()
def selftest_use_after_free_read(ctx: Context) -> None:
    """Our C (sr_read_siginfo) reads an ffi.new block that has been freed: InvalidRead."""
    block = ffi.new("char[]", lib.SR_SIGINFO_SIZE)
    address = int(ffi.cast("uintptr_t", block))
    del block
    gc.collect()
    out = ffi.new("int[5]")
    lib.sr_read_siginfo(ffi.cast("void *", address), out)


@scenario()
def selftest_overflow_write(ctx: Context) -> None:
    """Our C (sr_fill_epoll_event) writes a whole epoll_event into a 4-byte block: InvalidWrite."""
    small = ffi.new("char[]", 4)
    lib.sr_fill_epoll_event(small, 1, 2)


@scenario()
def selftest_uninit_syscall_param(ctx: Context) -> None:
    """liburing hands io_uring_setup a params struct nobody initialised: SyscallParam.  (Also shows
    that valgrind checks io_uring_setup's argument.)"""
    alloc = ffi.new_allocator(should_clear_after_alloc=False)
    params = alloc("struct io_uring_params *")
    ring = ffi.new("struct io_uring *")
    if lib.io_uring_queue_init_params(4, ring, params) == 0:
        lib.io_uring_queue_exit(ring)  # the garbage happened to be valid setup parameters


@scenario()
def selftest_uninit_branch(ctx: Context) -> None:
    """Our C copies an uninitialised siginfo into ints, which Python then branches on: the
    uninitialised use is reported with cffi's conversion on the stack."""
    alloc = ffi.new_allocator(should_clear_after_alloc=False)
    raw = alloc("char[]", lib.SR_SIGINFO_SIZE)
    out = ffi.new("int[5]")
    lib.sr_read_siginfo(raw, out)
    if out[0] == 12345:
        print("improbable signal number")


@scenario()
def selftest_clean_ring_traffic(ctx: Context) -> None:
    """Real io_uring traffic through the safe layer (setup, enter with and without a timeout,
    registered buffers, a provided buffer ring, the opcode probe): no error at all, so valgrind
    understands io_uring_setup/enter/register and the shared rings."""
    ring = ctx.ring(8)
    r, w = ctx.pipe()
    buf = bytearray(16)
    op = ring.read(r, buf)
    os.write(w, b"0123456789abcdef")
    assert ring.run(op) == 16 and buf == b"0123456789abcdef"
    assert ring.wait(0, timeout=0.01) == []
    assert "READ" in ring.features.opcodes
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python.supp")
    fd = ctx.track_fd(os.open(path, os.O_RDONLY))
    with saferring.BufferPool(ring, 2, 4096) as pool, pool.lease() as leased:
        n = ring.run(ring.read_fixed(fd, leased, 0))
        assert n > 0
        with open(path, "rb") as f:
            assert bytes(leased.view()[:n]) == f.read(n)
    a, b = ctx.socketpair()
    with saferring.BufferRing(ring, 4, 64) as buffers:
        b.send(b"ping")
        got = ring.run(ring.recv(a.fileno(), buffers))
        assert got is not None
        with got:
            assert bytes(got.view()) == b"ping"


@scenario()
def selftest_error_outside_saferring(ctx: Context) -> None:
    """ctypes (not saferring) reads a freed block: reported, but outside our code, so not counted."""
    block = ctypes.create_string_buffer(256)
    address = ctypes.addressof(block)
    del block
    gc.collect()
    ctypes.string_at(address, 16)

