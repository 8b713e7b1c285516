"""Kernel constants the operations take that Python's ``os``/``socket``/``select`` lack.

Values are the kernel ABI's (stable once released); names are the kernel's.
"""

from __future__ import annotations

# openat2(): struct open_how.resolve (linux/openat2.h, Linux 5.6)
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20

# renameat2() flags (linux/fs.h)
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

# setxattr() flags (linux/xattr.h)
XATTR_CREATE = 0x1
XATTR_REPLACE = 0x2

# splice()/tee() flags (linux/splice.h)
SPLICE_F_MOVE = 0x01
SPLICE_F_NONBLOCK = 0x02
SPLICE_F_MORE = 0x04

# sync_file_range() flags (linux/fs.h)
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4

# fallocate() modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# futex2 flags for futex_wait()/futex_wake() (linux/futex.h, Linux 6.7)
FUTEX2_SIZE_U8 = 0x00
FUTEX2_SIZE_U16 = 0x01
FUTEX2_SIZE_U32 = 0x02
FUTEX2_SIZE_U64 = 0x03
FUTEX2_PRIVATE = 128
FUTEX_BITSET_MATCH_ANY = 0xFFFF_FFFF

# waitid() id types (linux/wait.h)
P_ALL = 0
P_PID = 1
P_PGID = 2
P_PIDFD = 3

# epoll_ctl() operations (sys/epoll.h)
EPOLL_CTL_ADD = 1
EPOLL_CTL_DEL = 2
EPOLL_CTL_MOD = 3

__all__ = [name for name in dir() if name.isupper()]
