"""Another process's memory: process_vm_readv/writev, /proc/PID/mem, PAGEMAP_SCAN."""

from __future__ import annotations

import errno
import os
import threading
from typing import NamedTuple

from migrate import errors
from migrate.kernel._ffi import ffi, libc

PAGE_SIZE = 4096
IOV_MAX = 1024

# include/uapi/linux/fs.h, Documentation/admin-guide/mm/pagemap.rst
PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1


class PageRegion(NamedTuple):
    """struct page_region: [start, end) with the categories all its pages share.
    (A tuple: a scan of scattered dirty pages returns tens of thousands.)"""
    start: int
    end: int
    categories: int

    @property
    def nr_pages(self) -> int:
        return (self.end - self.start) // PAGE_SIZE


_REGION = ffi.sizeof("struct page_region")
assert _REGION == 24


class _PagemapFile:
    """/proc/PID/pagemap, opened once; closed by close() or ``with``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise errors.from_errno("open pagemap", e.errno, pid) from e

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PagemapScanner(_PagemapFile):
    """ioctl(PAGEMAP_SCAN) on /proc/PID/pagemap: page ranges, not a u64 per page."""

    VEC_LEN = 16384

    def __init__(self, pid: int) -> None:
        super().__init__(pid)
        self._vec = ffi.new("struct page_region[]", self.VEC_LEN)
        self._arg = ffi.new("struct pm_scan_arg *")

    def scan(self, start: int, end: int, *, require: int = 0, exclude: int = 0,
             anyof: int = 0, return_mask: int | None = None,
             flags: int = 0) -> list[PageRegion]:
        """Regions in [start, end) whose pages have every category in
        ``require``, none in ``exclude`` and at least one in ``anyof``."""
        a = self._arg
        out: list[PageRegion] = []
        pos = start
        while pos < end:
            a.size = ffi.sizeof("struct pm_scan_arg")
            a.flags = flags
            a.start = pos
            a.end = end
            a.walk_end = 0
            a.vec = int(ffi.cast("uintptr_t", self._vec))
            a.vec_len = self.VEC_LEN
            a.max_pages = 0
            a.category_inverted = exclude
            a.category_mask = require | exclude
            a.category_anyof_mask = anyof
            a.return_mask = (return_mask if return_mask is not None
                             else require | exclude | anyof)
            n = libc.ioctl(self.fd, ffi.cast("unsigned long", PAGEMAP_SCAN), a)
            if n < 0:
                raise errors.from_errno("ioctl(PAGEMAP_SCAN)", ffi.errno, self.pid,
                                        f"range {pos:#x}-{end:#x}")
            if n > 0:
                # struct page_region is three u64: read the array at once
                words = memoryview(ffi.buffer(self._vec, n * _REGION)).cast("Q")
                out.extend(map(PageRegion._make, zip(words[0::3], words[1::3],
                                                     words[2::3])))
            walk_end = int(a.walk_end)
            if n:
                # Seen on 6.18: walk_end short of regions this call returned.
                # The walk went at least as far as its last region: go on
                # from there (else the next call reports them again).
                walk_end = max(walk_end, out[-1].end)
            if walk_end <= pos:  # no progress: should not happen, never loop
                break
            pos = walk_end
        return _merge(out)


def _merge(regions: list[PageRegion]) -> list[PageRegion]:
    """Sorted, non-overlapping regions.  Seen on 6.18: an ioctl can return
    regions past the walk_end it reports, and the next call (from walk_end)
    returns them again, maybe split differently and, with
    PM_SCAN_WP_MATCHING, no longer written (the first report re-protected
    them).  None may be dropped: each page gets the union of the categories
    reported for it (a sweep over the region boundaries)."""
    if all(a.end <= b.start for a, b in zip(regions, regions[1:])):
        return regions
    events: dict[int, list[int]] = {}
    for r in regions:
        events.setdefault(r.start, []).append(r.categories)
        events.setdefault(r.end, []).append(~r.categories)   # ~c marks an end
    active: dict[int, int] = {}        # categories -> how many regions cover here
    out: list[PageRegion] = []
    points = sorted(events)
    for a, b in zip(points, points[1:]):
        for c in events[a]:
            if c >= 0:
                active[c] = active.get(c, 0) + 1
            else:
                active[~c] -= 1
                if not active[~c]:
                    del active[~c]
        if not active:
            continue
        cats = 0
        for c in active:
            cats |= c
        if out and out[-1].end == a and out[-1].categories == cats:
            out[-1] = PageRegion(out[-1].start, b, cats)
        else:
            out.append(PageRegion(a, b, cats))
    return out


# Documentation/admin-guide/mm/pagemap.rst: the u64 per page
PM_PRESENT = 1 << 63
PM_SWAP = 1 << 62
PM_UFFD_WP = 1 << 57
SWP_TYPE_BITS = 5
SWP_PTE_MARKER = (1 << SWP_TYPE_BITS) - 1   # include/linux/swapops.h: the last type


def non_marker_pages(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """Within [start, end) (pages PAGEMAP_SCAN called "swapped"), the ranges
    that are real swap or migration entries, not uffd-wp PTE markers.

    The kernel installs markers in the holes of uffd-wp ranges, and
    PAGEMAP_SCAN reports them as PAGE_IS_SWAPPED; they hold no data.  The
    classic pagemap tells them apart: a swap entry of type SWP_PTE_MARKER.
    """
    import array
    n = (end - start) // PAGE_SIZE
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.from_errno("open pagemap", e.errno, pid) from e
    try:
        raw = os.pread(fd, n * 8, start // PAGE_SIZE * 8)
    except OSError as e:
        raise errors.from_errno("pread pagemap", e.errno, pid, f"at {start:#x}") from e
    finally:
        os.close(fd)
    ents = array.array("Q", raw)
    out: list[tuple[int, int]] = []
    mask = (1 << SWP_TYPE_BITS) - 1
    for i, e in enumerate(ents):
        if (e & PM_SWAP) and (e & mask) == SWP_PTE_MARKER:
            continue
        a = start + i * PAGE_SIZE
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], a + PAGE_SIZE)
        else:
            out.append((a, a + PAGE_SIZE))
    return out


# Same-frame comparison of two pagemaps (shared_frames): each entry is
# reduced to what says "this physical page": the PFN (bits 0-54) and the
# present/swap/file bits (61-63); soft-dirty (55), exclusively mapped (56)
# and uffd-wp (57) differ between two mappings of one page.  An entry of the
# first process that is not present gets a value no reduced entry of the
# second can have (bit 56 alone): it never matches.
_BYTE6 = bytes(b & 0x7F for b in range(256))
_BYTE7_A = bytes((b & 0xFC) if b & 0x80 else 0x01 for b in range(256))
_BYTE7_B = bytes(b & 0xFC for b in range(256))
PFN_MASK = (1 << 55) - 1


class Pagemap(_PagemapFile):
    """/proc/PID/pagemap, read in ranges (Documentation/admin-guide/mm/pagemap.rst).
    PFNs read as zero without CAP_SYS_ADMIN (``frames_visible``)."""

    def read(self, start: int, end: int) -> bytes:
        """The raw u64 entries of the pages in [start, end)."""
        want = (end - start) // PAGE_SIZE * 8
        try:
            raw = os.pread(self.fd, want, start // PAGE_SIZE * 8)
        except OSError as e:
            raise errors.from_errno("pread pagemap", e.errno, self.pid, f"at {start:#x}") from e
        if len(raw) != want:
            raise errors.KernelError("pread pagemap", errno.EIO, self.pid,
                                     f"short read at {start:#x}")
        return raw


def _reduced(raw: bytes, byte7: bytes) -> bytearray:
    b = bytearray(raw)
    b[6::8] = b[6::8].translate(_BYTE6)
    b[7::8] = b[7::8].translate(byte7)
    return b


def same_frames(raw_a: bytes, raw_b: bytes, start: int) -> list[tuple[int, int]]:
    """The ranges, from ``start``, where two pagemap reads (raw u64 entries)
    show the same present physical page.  Whole-buffer work only (no Python
    loop per page): ~4 ms for 64 MiB."""
    import operator
    import re
    ra, rb = _reduced(raw_a, _BYTE7_A), _reduced(raw_b, _BYTE7_B)
    if ra == rb:                           # all shared: one memcmp
        return [(start, start + len(ra) // 8 * PAGE_SIZE)] if ra else []
    same = bytes(map(operator.eq, memoryview(ra).cast("Q"), memoryview(rb).cast("Q")))
    return [(start + m.start() * PAGE_SIZE, start + m.end() * PAGE_SIZE)
            for m in re.finditer(b"\x01+", same)]


def shared_frames(a: Pagemap, b: Pagemap, start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of [start, end) where ``a`` and ``b`` map the same
    present physical page at the same address."""
    return same_frames(a.read(start, end), b.read(start, end), start)


_visible: list[bool] = []


def frames_visible() -> bool:
    """Whether pagemap shows PFNs to us (CAP_SYS_ADMIN): one page of our
    own, touched, must show a non-zero PFN."""
    if not _visible:
        buf = ffi.new("char[]", 2 * PAGE_SIZE)      # zeroed: touched
        addr = (int(ffi.cast("uintptr_t", buf)) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        with Pagemap(os.getpid()) as pm:
            ent = int.from_bytes(pm.read(addr, addr + PAGE_SIZE), "little")
        _visible.append(bool(ent & PM_PRESENT) and bool(ent & PFN_MASK))
    return _visible[0]


def supports_pagemap_scan() -> bool:
    try:
        with PagemapScanner(os.getpid()) as s:
            s.scan(0, PAGE_SIZE, anyof=PAGE_IS_PRESENT)
        return True
    except errors.KernelError:
        return False


class _IovBatch(threading.local):
    """Reusable iovec arrays for process_vm_* calls, one pair per thread
    (cffi releases the GIL around the call, so threads copy in parallel)."""

    def __init__(self) -> None:
        self.local = ffi.new("struct iovec[]", IOV_MAX)
        self.remote = ffi.new("struct iovec[]", IOV_MAX)


_batch = _IovBatch()


def _vm_rw(fn, name: str, pid: int, buf, ranges: list[tuple[int, int, int]]) -> int:
    """ranges: (remote_addr, length, offset in buf).  Returns bytes moved."""
    total = 0
    keep = ffi.from_buffer(buf) if not isinstance(buf, ffi.CData) else buf
    base = ffi.cast("char *", keep)
    for i0 in range(0, len(ranges), IOV_MAX):
        chunk = ranges[i0:i0 + IOV_MAX]
        want = 0
        for j, (addr, ln, off) in enumerate(chunk):
            _batch.local[j].iov_base = base + off
            _batch.local[j].iov_len = ln
            _batch.remote[j].iov_base = ffi.cast("void *", addr)
            _batch.remote[j].iov_len = ln
            want += ln
        n = fn(pid, _batch.local, len(chunk), _batch.remote, len(chunk), 0)
        if n < 0:
            err = ffi.errno
            raise errors.from_errno(name, err, pid, f"at {chunk[0][0]:#x}, {want} bytes")
        if n != want:
            # Short transfer: find the first address that failed.
            done = n
            for addr, ln, _ in chunk:
                if done < ln:
                    raise errors.KernelError(name, errno.EFAULT, pid,
                                             f"short transfer at {addr + done:#x}")
                done -= ln
        total += n
    return total


def vm_read(pid: int, buf, ranges: list[tuple[int, int, int]]) -> int:
    """process_vm_readv in large iovec batches into ``buf``."""
    return _vm_rw(libc.process_vm_readv, "process_vm_readv", pid, buf, ranges)


def vm_read_into(pid: int, buf, addr: int) -> None:
    """process_vm_readv of ``len(buf)`` bytes at ``addr`` into ``buf``, all
    or KernelError: one range, for a hot loop (a page-server's answer to a
    fault)."""
    n = len(buf)
    b = _batch
    b.local[0].iov_base = ffi.from_buffer(buf)
    b.local[0].iov_len = n
    b.remote[0].iov_base = ffi.cast("void *", addr)
    b.remote[0].iov_len = n
    got = libc.process_vm_readv(pid, b.local, 1, b.remote, 1, 0)
    if got != n:
        err = ffi.errno if got < 0 else errno.EFAULT
        raise errors.from_errno("process_vm_readv", err, pid,
                                f"at {addr:#x}, {n} bytes ({got} read)")


def vm_write(pid: int, buf, ranges: list[tuple[int, int, int]]) -> int:
    """process_vm_writev in large iovec batches from ``buf``."""
    return _vm_rw(libc.process_vm_writev, "process_vm_writev", pid, buf, ranges)


def madvise_own(ranges: list[tuple[int, int]], advice: int) -> None:
    """madvise(2) of ranges [start, end) of our own memory, IOV_MAX at a
    time by process_madvise(2) (any advice on the caller itself since Linux
    6.13), else one call per range."""
    from migrate.kernel import syscalls, sysno
    pidfd = -1
    try:
        pidfd = os.pidfd_open(os.getpid())
        iov = _batch.local
        for i0 in range(0, len(ranges), IOV_MAX):
            chunk = ranges[i0:i0 + IOV_MAX]
            for j, (s, e) in enumerate(chunk):
                iov[j].iov_base = ffi.cast("void *", s)
                iov[j].iov_len = e - s
            want = sum(e - s for s, e in chunk)
            got, err = syscalls.raw(sysno.process_madvise, pidfd, iov, len(chunk), advice, 0)
            if got == -1 and err == errno.EINVAL and i0 == 0:
                break                       # an older kernel: one by one
            if got != want:
                raise errors.from_errno("process_madvise", err or errno.EIO, os.getpid(),
                                        f"at {chunk[0][0]:#x}, {got} of {want} bytes")
        else:
            return
    finally:
        if pidfd >= 0:
            os.close(pidfd)
    for s, e in ranges:
        syscalls.call(sysno.madvise, s, e - s, advice, detail=f"at {s:#x}")


def read_bytes(pid: int, addr: int, size: int) -> bytes:
    buf = bytearray(size)
    vm_read(pid, buf, [(addr, size, 0)])
    return bytes(buf)


def write_bytes(pid: int, addr: int, data: bytes) -> None:
    vm_write(pid, data, [(addr, len(data), 0)])


class ProcMem:
    """/proc/PID/mem: reaches PROT_NONE and read-only areas (FOLL_FORCE)."""

    def __init__(self, pid: int, write: bool = False) -> None:
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/mem",
                              (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as e:
            raise errors.from_errno("open /proc/PID/mem", e.errno, pid) from e

    def read(self, addr: int, size: int) -> bytes:
        try:
            data = os.pread(self.fd, size, addr)
        except OSError as e:
            raise errors.from_errno("pread /proc/PID/mem", e.errno, self.pid,
                                    f"at {addr:#x}") from e
        if len(data) != size:
            raise errors.KernelError("pread /proc/PID/mem", errno.EFAULT, self.pid,
                                     f"short read at {addr + len(data):#x}")
        return data

    def readinto(self, addr: int, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = os.preadv(self.fd, [view[got:]], addr + got)
            except OSError as e:
                raise errors.from_errno("pread /proc/PID/mem", e.errno, self.pid,
                                        f"at {addr + got:#x}") from e
            if n <= 0:
                raise errors.KernelError("pread /proc/PID/mem", errno.EFAULT, self.pid,
                                         f"short read at {addr + got:#x}")
            got += n

    def write(self, addr: int, data) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(self.fd, view[done:], addr + done)
            except OSError as e:
                raise errors.from_errno("pwrite /proc/PID/mem", e.errno, self.pid,
                                        f"at {addr + done:#x}") from e
            if n <= 0:
                raise errors.KernelError("pwrite /proc/PID/mem", errno.EFAULT, self.pid,
                                         f"short write at {addr + done:#x}")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ProcMem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
