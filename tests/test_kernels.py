"""What users of other kernels and locked-down systems get.  The system-wide knobs are only
turned inside the throwaway kernel guest of ``make test-kernel-6.1`` (SAFERRING_KERNEL_GUEST=1)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

import saferring

IN_GUEST = os.environ.get("SAFERRING_KERNEL_GUEST") == "1"
DISABLED = "/proc/sys/kernel/io_uring_disabled"


@pytest.fixture
def io_uring_disabled_knob() -> Iterator[str]:
    if not IN_GUEST:
        pytest.skip("changes a system-wide sysctl: only inside the kernel guest (make test-kernel-6.1)")
    if not os.path.exists(DISABLED):
        pytest.skip("this kernel has no kernel.io_uring_disabled sysctl")
    with open(DISABLED) as f:
        old = f.read().strip()
    yield DISABLED
    with open(DISABLED, "w") as f:
        f.write(old)


def test_io_uring_disabled_system_wide_is_explained(io_uring_disabled_knob: str) -> None:
    """With kernel.io_uring_disabled=2, Ring() raises PermissionError (EPERM) naming the sysctl,
    and works again once it is 0."""
    with open(io_uring_disabled_knob, "w") as f:
        f.write("2")
    with pytest.raises(PermissionError, match="io_uring_disabled") as info:
        saferring.Ring(8)
    assert info.value.errno == errno.EPERM
    with open(io_uring_disabled_knob, "w") as f:
        f.write("0")
    with saferring.Ring(8) as ring:
        assert ring.run(ring.nop()) == 0


def test_missing_opcodes_are_refused_with_their_release() -> None:
    """Every opcode the running kernel's probe does not report is refused by the methods that
    need it with UnsupportedOperationError naming the opcode and the release that brought it
    (on a kernel that has them all, the ones it has are accepted)."""
    with saferring.Ring(8) as ring:
        missing = [op for op in ("FTRUNCATE", "WAITID", "FUTEX_WAIT", "BIND", "LISTEN",
                                 "FIXED_FD_INSTALL") if not ring.features.supports(op)]
        calls = {
            "FTRUNCATE": lambda: ring.ftruncate(0, 0),
            "WAITID": lambda: ring.waitid(0, 0, 4),
            "FUTEX_WAIT": lambda: ring.futex_wait(bytearray(4), 0, 0),
            "BIND": lambda: ring.bind(0, ("127.0.0.1", 0)),
            "LISTEN": lambda: ring.listen(0),
        }
        for name in missing:
            if name not in calls:
                continue
            with pytest.raises(saferring.UnsupportedOperationError, match=name) as info:
                calls[name]()
            release = saferring.features.since(saferring.features.OP[name])
            assert f"Linux {release}" in str(info.value)
            assert ring.stats().in_flight == 0
        if not missing:
            pytest.skip("this kernel has every opcode these calls need (make test-kernel-6.1 "
                        "checks the refusals on 6.1)")
