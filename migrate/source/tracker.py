"""Dirty-page trackers: which pages a task wrote since the last round.

Two implementations behind one interface (DESIGN.md §3):

* ``UffdTracker`` (preferred): a userfaultfd created inside the task (remote
  syscall), stolen with pidfd_getfd, registered in WP mode with
  UFFD_FEATURE_WP_ASYNC over every private writable-capable VMA.  Each round,
  PAGEMAP_SCAN with PM_SCAN_WP_MATCHING returns the pages written since the
  previous round and write-protects them again, atomically, without stopping
  the task.  The registration lives as long as the uffd is open: the holder
  process (source/holder.py) keeps it between commands.
* ``SoftDirtyTracker`` (fallback where CONFIG_MEM_SOFT_DIRTY is set): the
  soft-dirty bit (PAGE_IS_SOFT_DIRTY) and clear_refs 4.  Scan and clear are
  not atomic, so its rounds run with the task frozen.

Never miss a page: a VMA the tracker does not cover (new since the last
round, mremap'ed, or tracking lost: no ``uw`` VmFlag) is copied whole, and
the dump pipeline copies every page the parent image does not hold.
"""

from __future__ import annotations

import functools
import logging
import os

from migrate import errors
from migrate.kernel import memory as kmem
from migrate.kernel import proc, syscalls, sysno, userfaultfd
from migrate.kernel.proc import Vma
from migrate.source import holder

log = logging.getLogger(__name__)

PAGE_IS_SOFT_DIRTY = 1 << 7
UFFD_FEATURES = userfaultfd.UFFD_FEATURE_WP_ASYNC | userfaultfd.UFFD_FEATURE_WP_UNPOPULATED


def trackable(v: Vma) -> bool:
    """Private areas that can hold written data: anonymous, stack, heap,
    private file mappings that may become writable."""
    return (not v.shared and not v.is_special and "mw" in v.vmflags
            and v.path not in ("[vsyscall]",))


@functools.cache
def uffd_available() -> bool:
    """Once per process (a userfaultfd and a PAGEMAP_SCAN probe, which the
    last dump of a migration made frozen): the kernel's features do not
    change under us."""
    try:
        f = userfaultfd.supported_features()
    except errors.KernelError:
        return False
    return f & UFFD_FEATURES == UFFD_FEATURES and kmem.supports_pagemap_scan()


def soft_dirty_available() -> bool:
    from migrate.kernel import features
    return features.soft_dirty()[0]


def choose(forced: str | None) -> str:
    """The tracker this host uses: 'uffd' or 'soft-dirty' ('' if none)."""
    if forced:
        ok = uffd_available() if forced == "uffd" else soft_dirty_available()
        if not ok:
            raise errors.MigrateError(f"tracker {forced} is not available on this kernel")
        return forced
    if uffd_available():
        return "uffd"
    if soft_dirty_available():
        return "soft-dirty"
    return ""


class UffdTracker:
    kind = "uffd"
    needs_freeze = False

    def __init__(self, pid: int, start_time: int, uffd: int, fresh: bool) -> None:
        self.pid = pid
        self.start_time = start_time
        self.uffd = uffd
        self.fresh = fresh        # just created: nothing was tracked before

    @classmethod
    def attach(cls, pid: int, start_time: int) -> "UffdTracker | None":
        fd = holder.fetch(pid, start_time)
        if fd is None:
            return None
        return cls(pid, start_time, fd, fresh=False)

    @classmethod
    def create(cls, ctl, pid: int, start_time: int) -> "UffdTracker":
        """Make the uffd inside the frozen task (``ctl``: its TaskCtl), take it,
        and hand a copy to a holder process."""
        flags = os.O_CLOEXEC | os.O_NONBLOCK
        r = ctl.call(sysno.userfaultfd, flags, check=False)
        if r == -1 or r == -13:   # EPERM/EACCES: unprivileged task, user faults only
            r = ctl.call(sysno.userfaultfd, flags | userfaultfd.UFFD_USER_MODE_ONLY)
        elif r < 0:
            raise errors.from_errno("remote userfaultfd", -r, pid)
        try:
            uffd = syscalls.take_fd(pid, r)
        finally:
            ctl.call(sysno.close, r)
        try:
            userfaultfd.api(uffd, UFFD_FEATURES)
        except BaseException:
            os.close(uffd)
            raise
        return cls(pid, start_time, uffd, fresh=True)

    def hold(self) -> None:
        """Hand a copy of the uffd to a holder process, so that tracking
        outlives this command (starting it takes a process start: do it
        with the task running)."""
        holder.spawn(self.pid, self.start_time, self.uffd)
        log.info("pid %d: uffd-wp tracking started (held by a holder process)", self.pid)

    def register(self, vmas: list[Vma]) -> list[Vma]:
        """Register what is not tracked yet; return the VMAs that were not
        tracked before this round (their pages must all be copied)."""
        untracked = []
        for v in vmas:
            if not trackable(v) or "uw" in v.vmflags:
                continue
            untracked.append(v)
            try:
                userfaultfd.register(self.uffd, v.start, v.size,
                                     userfaultfd.UFFDIO_REGISTER_MODE_WP)
            except errors.KernelError as e:
                log.info("pid %d: vma %#x-%#x not tracked: %s", self.pid, v.start, v.end, e)
        return untracked

    def stop(self) -> None:
        holder.stop(self.pid, self.start_time)

    def close(self) -> None:
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1


class SoftDirtyTracker:
    """Soft-dirty bits; the round must run frozen (scan, then clear_refs)."""
    kind = "soft-dirty"
    needs_freeze = True

    def __init__(self, pid: int, fresh: bool) -> None:
        self.pid = pid
        self.fresh = fresh

    def register(self, vmas: list[Vma]) -> list[Vma]:
        # New VMAs carry VM_SOFTDIRTY: every page of them reads soft-dirty.
        return []

    def written(self, scanner: kmem.PagemapScanner, v: Vma) -> list[tuple[int, int]] | None:
        regions = scanner.scan(v.start, v.end, require=PAGE_IS_SOFT_DIRTY)
        return [(r.start, r.end) for r in regions]

    def clear(self) -> None:
        """clear_refs 4: start the next round (Documentation/admin-guide/mm/soft-dirty.rst)."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("4")
        except OSError as e:
            raise errors.from_errno("write clear_refs", e.errno, self.pid) from e

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


def start_time(pid: int) -> int:
    return proc.read_stat(pid).start_time
