"""What users of other kernels and locked-down systems get.  The system-wide knobs are only
turned inside the throwaway kernel guest of ``make test-kernel-6.1`` (SAFERRING_KERNEL_GUEST=1)."""

from __future__ import annotations

import errno
import os
import socket
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


_SECCOMP_RUNNER = """
import ctypes, errno, platform, sys
import saferring
code = int(sys.argv[1])
# seccomp: make io_uring_setup (x86-64 syscall 425) fail with `code`, as a container's filter does.
class Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]
insns = (Filter * 4)(Filter(0x20, 0, 0, 0),             # load the syscall number
                     Filter(0x15, 0, 1, 425),           # io_uring_setup?
                     Filter(0x06, 0, 0, 0x00050000 | code),  # -> errno
                     Filter(0x06, 0, 0, 0x7FFF0000))    # everything else: allow
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                  # PR_SET_NO_NEW_PRIVS
prog = Prog(4, insns)
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0  # PR_SET_SECCOMP, FILTER
try:
    saferring.Ring(8)
except Exception as exc:
    print(type(exc).__name__, getattr(exc, "errno", None), exc)
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter is written for x86-64")
@pytest.mark.parametrize(("code", "kind", "says"), [
    (errno.EPERM, "PermissionError", "io_uring_disabled"),
    (errno.ENOSYS, "UnsupportedPlatformError", "CONFIG_IO_URING"),
])
def test_io_uring_refused_by_the_system_is_explained(code: int, kind: str, says: str) -> None:
    """When the system refuses io_uring_setup (a seccomp filter, as container runtimes install,
    returning EPERM or ENOSYS), Ring() raises an error that says why and what to change."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _SECCOMP_RUNNER, str(code)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(kind), proc.stdout
    assert says in proc.stdout
    if code == errno.EPERM:
        assert "seccomp" in proc.stdout


def test_capabilities_are_asked_of_the_kernel(ring: saferring.Ring) -> None:
    """Behaviour the opcode probe cannot show is found by trying it: each answer is a bool that
    agrees with what the ring then does, the report lists it, and an unknown name is refused."""
    from saferring.features import CAPABILITIES, kernel_can

    for name, _const, release in CAPABILITIES:
        assert isinstance(kernel_can(name), bool)
        assert ring.features.can(name.lower()) == kernel_can(name)
        row = ("behaviour", name, f"{release:>5}  {'yes' if kernel_can(name) else 'no'}")
        assert row in ring.features.report()
    with pytest.raises(ValueError, match="unknown capability"):
        kernel_can("TELEPORT")
    # The answers agree with the kernel's own behaviour.
    op = ring.timeout(0.001, count=2, multishot=True)
    assert op.single_shot is not kernel_can("TIMEOUT_MULTISHOT")  # the fallback before 6.4
    assert ring.run(op) == [None, None]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        if kernel_can("SOCKET_COMMANDS"):
            assert ring.run(ring.siocinq(udp)) == 0
        else:
            with pytest.raises(saferring.UnsupportedOperationError, match=r"6\.7"):
                ring.siocinq(udp)
    assert ring.stats().in_flight == 0
