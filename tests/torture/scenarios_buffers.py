"""Torture scenarios: buffers the kernel may write into, dropped, resized, closed or released
while an operation holds them."""

from __future__ import annotations

import gc

from harness import Context, scenario


@scenario()
def dropped_read_buffer_under_gc_pressure(ctx: Context) -> None:
    """Every reference to a read's buffer and operation is dropped while the read is in flight;
    garbage is collected and the freed-size memory is sprayed before the data arrives: the data
    lands in the (still pinned) buffer, never in a canary."""
    ring = ctx.ring(8)
    r, w = ctx.pipe()
    for _ in range(4):
        ring.read(r, bytearray(4096))
    ring.submit()
    gc.collect()
    canaries = ctx.spray(4096, count=512)
    import os

    os.write(w, b"\x55" * 4 * 4096)
    done = ring.wait(4)
    assert [op.result() for op in done] == [4096] * 4
    assert not canaries.changed()
