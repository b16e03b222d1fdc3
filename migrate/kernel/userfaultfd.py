"""userfaultfd(2): API handshake, registration, write-protect (man 2 userfaultfd,
Documentation/admin-guide/mm/userfaultfd.rst)."""

from __future__ import annotations

import dataclasses
import os
import struct

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


# --- post-copy: MISSING faults, events, UFFDIO_COPY / ZEROPAGE (man 2 userfaultfd,
# man 2 UFFDIO_COPY, include/uapi/linux/userfaultfd.h)
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFDIO_WAKE = 0x8010AA02       # _IOR(0xAA, 0x02, struct uffdio_range)
UFFDIO_COPY = 0xC028AA03       # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_ZEROPAGE = 0xC020AA04   # _IOWR(0xAA, 0x04, struct uffdio_zeropage)
UFFDIO_COPY_MODE_DONTWAKE = 1

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16
UFFD_PAGEFAULT_FLAG_WRITE = 1

MSG_SIZE = 32                  # sizeof(struct uffd_msg)
_MSG = struct.Struct("<BBHI3Q")


@dataclasses.dataclass(frozen=True, slots=True)
class UffdMsg:
    """struct uffd_msg (include/uapi/linux/userfaultfd.h), one event.

    ``event`` is UFFD_EVENT_*; the union's fields by event:
    PAGEFAULT: ``address`` (the faulting address), ``flags``, ``ptid``
    (with UFFD_FEATURE_THREAD_ID); FORK: ``ufd`` (the child's uffd, now an
    fd of the reader); REMAP: ``start`` (from), ``end`` (to), ``length``;
    REMOVE and UNMAP: ``start``, ``end``."""
    event: int
    address: int = 0
    flags: int = 0
    ptid: int = 0
    ufd: int = -1
    start: int = 0
    end: int = 0
    length: int = 0


def _decode(raw: bytes, off: int) -> UffdMsg:
    ev, _, _, _, a, b, c = _MSG.unpack_from(raw, off)
    if ev == UFFD_EVENT_PAGEFAULT:       # pagefault: flags u64, address u64, ptid u32
        return UffdMsg(ev, address=b, flags=a, ptid=c & 0xFFFFFFFF)
    if ev == UFFD_EVENT_FORK:
        return UffdMsg(ev, ufd=a & 0xFFFFFFFF)
    if ev == UFFD_EVENT_REMAP:           # from, to, len
        return UffdMsg(ev, start=a, end=b, length=c)
    if ev in (UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP):
        return UffdMsg(ev, start=a, end=b)
    return UffdMsg(ev)


def read_msgs(fd: int, max_msgs: int = 64) -> list[UffdMsg]:
    """The events queued on a non-blocking uffd ([] if none)."""
    try:
        raw = os.read(fd, MSG_SIZE * max_msgs)
    except BlockingIOError:
        return []
    except OSError as e:
        raise errors.from_errno("read(userfaultfd)", e.errno, None, f"uffd fd {fd}") from None
    return [_decode(raw, off) for off in range(0, len(raw) - MSG_SIZE + 1, MSG_SIZE)]


_copy = ffi.new("struct uffdio_copy *")
_zero = ffi.new("struct uffdio_zeropage *")
_range = ffi.new("struct uffdio_range *")


def copy(fd: int, dst: int, buf, length: int, offset: int = 0, wake: bool = True
         ) -> tuple[int, int]:
    """UFFDIO_COPY ``length`` bytes of ``buf`` (any buffer: bytes, mmap...)
    from ``offset`` to ``dst`` of the uffd's mm.  Returns (bytes copied,
    errno): errno 0 when all was copied; EEXIST (a page is already there),
    EAGAIN (the mm is changing: retry later), ENOENT (the range is no longer
    registered), ESRCH (the process is gone) leave bytes copied before it.
    Not thread-safe (one shared argument struct)."""
    c = _copy
    c.dst = dst
    c.src = int(ffi.cast("uintptr_t", ffi.from_buffer(buf))) + offset
    c.len = length
    c.mode = 0 if wake else UFFDIO_COPY_MODE_DONTWAKE
    c.copy = 0
    if libc.ioctl(fd, ffi.cast("unsigned long", UFFDIO_COPY), c) == 0:
        return length, 0
    err = ffi.errno
    return max(int(c.copy), 0), err


def zeropage(fd: int, start: int, length: int) -> tuple[int, int]:
    """UFFDIO_ZEROPAGE: map the zero page over [start, start+length); as ``copy``."""
    z = _zero
    z.range.start = start
    z.range.len = length
    z.mode = 0
    z.zeropage = 0
    if libc.ioctl(fd, ffi.cast("unsigned long", UFFDIO_ZEROPAGE), z) == 0:
        return length, 0
    err = ffi.errno
    return max(int(z.zeropage), 0), err


def wake(fd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE: wake threads blocked on faults in the range."""
    _range.start = start
    _range.len = length
    if libc.ioctl(fd, ffi.cast("unsigned long", UFFDIO_WAKE), _range) < 0:
        raise errors.from_errno("ioctl(UFFDIO_WAKE)", ffi.errno, None,
                                f"range {start:#x}-{start + length:#x}")


PROBE_ADDR = 0x10000           # the default vm.mmap_min_addr: nothing is mapped there


def mm_alive(fd: int) -> bool:
    """Whether the uffd's process still has its memory: UFFDIO_REGISTER takes
    a reference on the mm before it looks for VMAs, and fails with ENOMEM
    once the mm is gone (checked on 6.18; ESRCH taken too).  The range
    probed (one page at PROBE_ADDR) holds no VMA, so nothing is registered
    (EINVAL while the process lives).  For processes known only by their uffd
    (UFFD_EVENT_FORK gives no pid)."""
    r = ffi.new("struct uffdio_register *")
    r.range.start = PROBE_ADDR
    r.range.len = 4096
    r.mode = UFFDIO_REGISTER_MODE_MISSING
    if libc.ioctl(fd, ffi.cast("unsigned long", UFFDIO_REGISTER), r) == 0:
        return True
    return ffi.errno not in (3, 12)      # ESRCH, ENOMEM
