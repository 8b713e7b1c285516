"""What the running kernel's io_uring offers, read from the kernel itself, with readable names.

Three sources, all asked at runtime, never guessed from ``uname``:

* the feature bits ``io_uring_setup`` returns (``IORING_FEAT_*``);
* the opcode probe (``IORING_REGISTER_PROBE``).  The probe itself arrived in Linux 5.6; a kernel
  without it is older than 5.6, so only the opcodes that 5.5 had can exist there;
* behaviour probes (:data:`CAPABILITIES`) for flags and sub-commands the opcode probe cannot
  show: the smallest real request, tried once per process on a private ring.

The version column of :data:`OPCODES` is the mainline release that brought each opcode.  It is
used for messages ("needs Linux 6.7") and docs, never to decide what is supported.
"""

from __future__ import annotations

import dataclasses
import errno
import platform
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class Opcode:
    """One io_uring opcode: its ABI number, its name, and the Linux release that brought it."""

    code: int
    name: str
    since: str


def _table(rows: Iterable[tuple[str, str]]) -> tuple[Opcode, ...]:
    return tuple(Opcode(code, name, since) for code, (name, since) in enumerate(rows))


#: Every opcode of the kernel ABI, by number (``enum io_uring_op`` in ``linux/io_uring.h``).
OPCODES: tuple[Opcode, ...] = _table([
    ("NOP", "5.1"), ("READV", "5.1"), ("WRITEV", "5.1"), ("FSYNC", "5.1"),
    ("READ_FIXED", "5.1"), ("WRITE_FIXED", "5.1"), ("POLL_ADD", "5.1"), ("POLL_REMOVE", "5.1"),
    ("SYNC_FILE_RANGE", "5.2"), ("SENDMSG", "5.3"), ("RECVMSG", "5.3"), ("TIMEOUT", "5.4"),
    ("TIMEOUT_REMOVE", "5.5"), ("ACCEPT", "5.5"), ("ASYNC_CANCEL", "5.5"),
    ("LINK_TIMEOUT", "5.5"), ("CONNECT", "5.5"), ("FALLOCATE", "5.6"), ("OPENAT", "5.6"),
    ("CLOSE", "5.6"), ("FILES_UPDATE", "5.6"), ("STATX", "5.6"), ("READ", "5.6"),
    ("WRITE", "5.6"), ("FADVISE", "5.6"), ("MADVISE", "5.6"), ("SEND", "5.6"), ("RECV", "5.6"),
    ("OPENAT2", "5.6"), ("EPOLL_CTL", "5.6"), ("SPLICE", "5.7"), ("PROVIDE_BUFFERS", "5.7"),
    ("REMOVE_BUFFERS", "5.7"), ("TEE", "5.8"), ("SHUTDOWN", "5.11"), ("RENAMEAT", "5.11"),
    ("UNLINKAT", "5.11"), ("MKDIRAT", "5.15"), ("SYMLINKAT", "5.15"), ("LINKAT", "5.15"),
    ("MSG_RING", "5.18"), ("FSETXATTR", "5.19"), ("SETXATTR", "5.19"), ("FGETXATTR", "5.19"),
    ("GETXATTR", "5.19"), ("SOCKET", "5.19"), ("URING_CMD", "5.19"), ("SEND_ZC", "6.0"),
    ("SENDMSG_ZC", "6.1"), ("READ_MULTISHOT", "6.7"), ("WAITID", "6.7"), ("FUTEX_WAIT", "6.7"),
    ("FUTEX_WAKE", "6.7"), ("FUTEX_WAITV", "6.7"), ("FIXED_FD_INSTALL", "6.8"),
    ("FTRUNCATE", "6.9"), ("BIND", "6.11"), ("LISTEN", "6.11"), ("RECV_ZC", "6.15"),
    ("EPOLL_WAIT", "6.15"), ("READV_FIXED", "6.15"), ("WRITEV_FIXED", "6.15"), ("PIPE", "6.16"),
])

#: Opcode numbers by name, e.g. ``OP["READ"] == 22``.
OP: dict[str, int] = {op.name: op.code for op in OPCODES}

#: ``IORING_FEAT_*`` bits returned by io_uring_setup, with the release that brought each.
FEATURE_BITS: tuple[tuple[str, int, str], ...] = (
    ("SINGLE_MMAP", 1 << 0, "5.4"), ("NODROP", 1 << 1, "5.5"), ("SUBMIT_STABLE", 1 << 2, "5.5"),
    ("RW_CUR_POS", 1 << 3, "5.6"), ("CUR_PERSONALITY", 1 << 4, "5.6"),
    ("FAST_POLL", 1 << 5, "5.7"), ("POLL_32BITS", 1 << 6, "5.9"),
    ("SQPOLL_NONFIXED", 1 << 7, "5.11"), ("EXT_ARG", 1 << 8, "5.11"),
    ("NATIVE_WORKERS", 1 << 9, "5.12"), ("RSRC_TAGS", 1 << 10, "5.13"),
    ("CQE_SKIP", 1 << 11, "5.17"), ("LINKED_FILE", 1 << 12, "5.17"),
    ("REG_REG_RING", 1 << 13, "6.3"), ("RECVSEND_BUNDLE", 1 << 14, "6.10"),
    ("MIN_TIMEOUT", 1 << 15, "6.12"), ("RW_ATTR", 1 << 16, "6.14"), ("NO_IOWAIT", 1 << 17, "6.15"),
)

#: ``IORING_SETUP_*`` flags, with the release that brought each.
SETUP_FLAGS: tuple[tuple[str, int, str], ...] = (
    ("IOPOLL", 1 << 0, "5.1"), ("SQPOLL", 1 << 1, "5.1"), ("SQ_AFF", 1 << 2, "5.1"),
    ("CQSIZE", 1 << 3, "5.5"), ("CLAMP", 1 << 4, "5.6"), ("ATTACH_WQ", 1 << 5, "5.6"),
    ("R_DISABLED", 1 << 6, "5.10"), ("SUBMIT_ALL", 1 << 7, "5.18"),
    ("COOP_TASKRUN", 1 << 8, "5.19"), ("TASKRUN_FLAG", 1 << 9, "5.19"),
    ("SQE128", 1 << 10, "5.19"), ("CQE32", 1 << 11, "5.19"), ("SINGLE_ISSUER", 1 << 12, "6.0"),
    ("DEFER_TASKRUN", 1 << 13, "6.1"),
)

_PRE_PROBE_LAST = OP["CONNECT"]  # the newest opcode of 5.5, the last kernel without a probe


def since(opcode: int) -> str:
    """Return the Linux release that brought ``opcode`` ("?" for numbers newer than this table)."""
    return OPCODES[opcode].since if 0 <= opcode < len(OPCODES) else "?"


def opcode_name(opcode: int) -> str:
    """Return the ABI name of ``opcode`` (``"OP_<n>"`` for numbers newer than this table)."""
    return OPCODES[opcode].name if 0 <= opcode < len(OPCODES) else f"OP_{opcode}"


@dataclasses.dataclass(frozen=True)
class Features:
    """What one ring's kernel offers.  Read it as ``ring.features``.

    ``opcodes`` holds the names of the supported opcodes (``"READ"``, ``"STATX"``...), ``flags``
    the ``IORING_FEAT_*`` names the kernel reported, ``setup_flags`` the ``IORING_SETUP_*`` flags
    this ring was created with.  ``probe_available`` is False on kernels before 5.6, where the
    opcode set is inferred as "what 5.5 had".
    """

    opcodes: frozenset[str]
    flags: frozenset[str]
    setup_flags: frozenset[str]
    probe_available: bool
    kernel_opcode_count: int
    feature_bits: int
    sq_entries: int
    cq_entries: int
    liburing_version: str
    kernel_release: str

    def supports(self, name: str) -> bool:
        """True if the kernel supports the opcode ``name`` (case-insensitive, e.g. ``"statx"``)."""
        return name.upper() in self.opcodes

    def has(self, feature: str) -> bool:
        """True if the kernel reported ``IORING_FEAT_<feature>`` (e.g. ``"NODROP"``)."""
        return feature.upper() in self.flags

    def can(self, capability: str) -> bool:
        """True if the kernel has the behaviour ``capability`` (see :data:`CAPABILITIES`, e.g.
        ``"TIMEOUT_MULTISHOT"``), asked of the kernel by trying it once per process."""
        return kernel_can(capability)

    def report(self) -> list[tuple[str, str, str]]:
        """Rows of (kind, name, since-release and yes/no) describing everything known."""
        rows: list[tuple[str, str, str]] = []
        for op in OPCODES:
            rows.append(("opcode", op.name, f"{op.since:>5}  {'yes' if op.name in self.opcodes else 'no'}"))
        for name, _bit, rel in FEATURE_BITS:
            rows.append(("feature", name, f"{rel:>5}  {'yes' if name in self.flags else 'no'}"))
        for name, _const, rel in CAPABILITIES:
            rows.append(("behaviour", name, f"{rel:>5}  {'yes' if kernel_can(name) else 'no'}"))
        return rows


def build_features(
    supported: bytes | None,
    kernel_opcode_count: int,
    feature_bits: int,
    setup_flags: int,
    sq_entries: int,
    cq_entries: int,
    liburing_version: str,
) -> Features:
    """Turn the raw probe answer into a :class:`Features` (``supported[op]`` is 1 when usable)."""
    if supported is None:
        names = frozenset(op.name for op in OPCODES[: _PRE_PROBE_LAST + 1])
    else:
        names = frozenset(opcode_name(i) for i, ok in enumerate(supported) if ok)
    return Features(
        opcodes=names,
        flags=frozenset(name for name, bit, _ in FEATURE_BITS if feature_bits & bit),
        setup_flags=frozenset(name for name, bit, _ in SETUP_FLAGS if setup_flags & bit),
        probe_available=supported is not None,
        kernel_opcode_count=kernel_opcode_count,
        feature_bits=feature_bits,
        sq_entries=sq_entries,
        cq_entries=cq_entries,
        liburing_version=liburing_version,
        kernel_release=platform.release(),
    )


def supported_table(supported: bytes | None, size: int = 256) -> bytearray:
    """A lookup table indexed by opcode (1 = usable) for the ring's hot path."""
    table = bytearray(size)
    if supported is None:
        for code in range(_PRE_PROBE_LAST + 1):
            table[code] = 1
    else:
        table[: len(supported)] = supported
    return table


#: Kernel behaviour the opcode probe cannot show (a flag or sub-command of an opcode it reports),
#: with the release that brought it.  Each is asked of the kernel by running the smallest real
#: request on a private ring (``_cffi_src/kernel_probes.c``), once per process.
CAPABILITIES: tuple[tuple[str, str, str], ...] = (
    ("BUF_RING", "SR_CAP_BUF_RING", "5.19"),
    ("SYNC_CANCEL", "SR_CAP_SYNC_CANCEL", "6.0"),
    ("RECV_MULTISHOT", "SR_CAP_RECV_MULTISHOT", "6.0"),
    ("TIMEOUT_MULTISHOT", "SR_CAP_TIMEOUT_MULTISHOT", "6.4"),
    ("SOCKET_COMMANDS", "SR_CAP_SOCKET_COMMANDS", "6.7"),
    ("BUF_RING_INC", "SR_CAP_BUF_RING_INC", "6.12"),
)

_capability_answers: dict[str, bool] = {}


def kernel_can(name: str) -> bool:
    """True if the running kernel has the behaviour ``name`` of :data:`CAPABILITIES`
    (e.g. ``"SOCKET_COMMANDS"``), found by trying it once; False where io_uring is unavailable."""
    key = name.upper()
    answer = _capability_answers.get(key)
    if answer is None:
        constants = {cap: const for cap, const, _rel in CAPABILITIES}
        if key not in constants:
            raise ValueError(f"unknown capability {name!r}; known: {sorted(constants)}")
        try:
            from ._uring import lib
        except ImportError:  # not built for / not on Linux: nothing is supported
            return False
        rc = lib.sr_probe_capability(getattr(lib, constants[key]))
        answer = rc == 1
        # A negative rc means the probe's own ring could not be created: remember that only
        # when it cannot change (ENOSYS: no io_uring at all).  ENOMEM (a memlock limit raised
        # later) or EPERM (a sysctl changed later) say nothing lasting about the kernel.
        if rc >= 0 or rc == -errno.ENOSYS:
            _capability_answers[key] = answer  # a race computes the same answer twice: harmless
    return answer


def capability_since(name: str) -> str:
    """The Linux release that brought capability ``name`` of :data:`CAPABILITIES`."""
    for cap, _const, release in CAPABILITIES:
        if cap == name.upper():
            return release
    raise ValueError(f"unknown capability {name!r}")


#: The kernel releases the README's table is cut at (the last row takes everything newer).
KERNEL_TABLE_RELEASES = ("5.1", "5.6", "5.11", "5.19", "6.0", "6.1", "6.7", "6.11", "6.12+")


def _release_key(release: str) -> tuple[int, int]:
    major, minor = release.rstrip("+").split(".")
    return int(major), int(minor)


def kernel_table() -> str:
    """The README's table of kernel releases and what each adds, generated from :data:`OPCODES`,
    :data:`FEATURE_BITS`, :data:`SETUP_FLAGS` and :data:`CAPABILITIES` (``tests/test_docs.py``
    checks the README against it, so the two cannot drift)."""
    rows = ["| Linux | io_uring opcodes that arrive | setup flags, features and behaviours that arrive |",
            "|---|---|---|"]
    previous = (0, 0)
    releases = list(KERNEL_TABLE_RELEASES)
    for i, release in enumerate(releases):
        last = i == len(releases) - 1
        upto = (99, 99) if last else _release_key(release)

        def arrives(since_release: str, lo: tuple[int, int] = previous,
                    hi: tuple[int, int] = upto) -> bool:
            return lo < _release_key(since_release) <= hi

        ops = [op.name for op in OPCODES if arrives(op.since)]
        extras = [f"FEAT_{name}" for name, _bit, rel in FEATURE_BITS if arrives(rel)]
        extras += [f"SETUP_{name}" for name, _bit, rel in SETUP_FLAGS if arrives(rel)]
        extras += [f"{name} (tried)" for name, _const, rel in CAPABILITIES if arrives(rel)]
        rows.append(f"| {release} | {', '.join(ops) or '-'} | {', '.join(extras) or '-'} |")
        previous = upto
    return "\n".join(rows)
