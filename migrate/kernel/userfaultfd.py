"""userfaultfd(2): API handshake, registration, write-protect (man 2 userfaultfd,
Documentation/admin-guide/mm/userfaultfd.rst)."""

from __future__ import annotations

import os

from migrate import errors
from migrate.kernel import sysno
from migrate.kernel._ffi import ffi, libc

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F        # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00   # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_UNREGISTER = 0x8010AA01  # _IOR(0xAA, 0x01, struct uffdio_range)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_WP = 2
UFFD_USER_MODE_ONLY = 1

UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15


def api(fd: int, features: int) -> int:
    """UFFDIO_API handshake; returns the features the kernel offers."""
    a = ffi.new("struct uffdio_api *")
    a.api = UFFD_API
    a.features = features
    if libc.ioctl(fd, ffi.cast("unsigned long", UFFDIO_API), a) < 0:
        raise errors.from_errno("ioctl(UFFDIO_API)", ffi.errno, None,
                                f"uffd fd {fd}, features {features:#x}")
    return int(a.features)


def supported_features() -> int:
    """Features a fresh userfaultfd offers here (a throwaway local one)."""
    r = libc.syscall(ffi.cast("long", sysno.userfaultfd),
                     ffi.cast("long", os.O_CLOEXEC | os.O_NONBLOCK))
    if r < 0:
        raise errors.from_errno("userfaultfd", ffi.errno)
    try:
        return api(r, 0)
    finally:
        os.close(r)


def register(fd: int, start: int, length: int, mode: int) -> int:
    """UFFDIO_REGISTER [start, start+length); returns the ioctls allowed there.
    Works on the uffd's own mm, so the tool can register ranges of the task
    whose uffd it holds."""
    r = ffi.new("struct uffdio_register *")
    r.range.start = start
    r.range.len = length
    r.mode = mode
    if libc.ioctl(fd, ffi.cast("unsigned long", UFFDIO_REGISTER), r) < 0:
        raise errors.from_errno("ioctl(UFFDIO_REGISTER)", ffi.errno, None,
                                f"range {start:#x}-{start + length:#x} mode {mode}")
    return int(r.ioctls)
