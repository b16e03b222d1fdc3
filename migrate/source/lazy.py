"""dump --lazy-pages: the source's pages, read from the dumped process's memory.

The dump leaves the root's lazy pages out of the image (PE_LAZY).  Before it
kills the process (whose PID the restore needs, on this host or another),
``keep_memory`` makes a *keeper*: a remote clone(CLONE_VM) of the frozen
root, traced from birth (PTRACE_O_TRACEFORK) so it never runs an
instruction; its fds are closed (close_range), it leaves the process's
session and group (setsid: the restore needs those ids free too), and it
shares the mm, which
therefore outlives the process.  The lazy pages are then read on request
from the keeper with process_vm_readv, without any copy to disk, and the
keeper is killed once the daemon has them all (or if this tool dies:
PTRACE_O_EXITKILL).  Only pages the dump left lazy are served.
"""

from __future__ import annotations

import bisect
import logging
import os
import signal
import threading

from migrate import errors
from migrate.images import pagemap
from migrate.kernel import memory as kmem
from migrate.kernel import proc, ptrace, remote, sysno

log = logging.getLogger(__name__)

PAGE = kmem.PAGE_SIZE


CLONE_VM = 0x100
CLOSE_RANGE_ALL = (0, 0xFFFFFFFF, 0)
# A clone() whose exit signal is SIGCHLD is a fork to ptrace: TRACEFORK
# makes it stop at birth (TRACECLONE alone would let it run).
KEEPER_OPTIONS = (ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACEFORK |
                  ptrace.PTRACE_O_TRACECLONE |
                  ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_SUSPEND_SECCOMP)


class Keeper:
    """A stopped task sharing the dumped process's mm (see module doc)."""

    def __init__(self, image_pid: int, pid: int, lazy: list[tuple[int, int]]) -> None:
        self.image_pid = image_pid
        self.pid = pid
        self._lock = threading.Lock()
        self.pages_served = 0
        self.serve(lazy)

    def serve(self, lazy: list[tuple[int, int]]) -> None:
        """Serve these ranges (a server started before the dump knew them)."""
        ranges = pagemap.normalize(lazy)
        self.lazy, self._starts = ranges, [s for s, _ in ranges]

    def read(self, pid: int, vaddr: int, nr_pages: int, into=None):
        """The pages (in ``into``, a writable buffer of their size, if given),
        or LookupError (not lazy here) / KernelError.  Thread-safe: the
        page-server's connections call it at once."""
        end = vaddr + nr_pages * PAGE
        # the lazy ranges are merged: the pages are all lazy if one holds them
        lazy, starts = self.lazy, self._starts
        i = bisect.bisect_right(starts, vaddr) - 1
        if pid != self.image_pid or i < 0 or end > lazy[i][1]:
            raise LookupError(f"pid {pid}: pages {vaddr:#x}-{end:#x} are not lazy pages "
                              f"of pid {self.image_pid}")
        buf = bytearray(end - vaddr) if into is None else into
        kmem.vm_read_into(self.pid, buf, vaddr)
        with self._lock:
            self.pages_served += nr_pages
        return buf

    def read_runs(self, pid: int, runs, into) -> None:
        """The pages of ``runs`` ((vaddr, nr_pages), in address order) one
        after the other in ``into``, by one process_vm_readv (GET_RUNS), or
        LookupError / KernelError as ``read``."""
        lazy, starts = self.lazy, self._starts
        ranges, off = [], 0
        for vaddr, nr in runs:
            end = vaddr + nr * PAGE
            i = bisect.bisect_right(starts, vaddr) - 1
            if pid != self.image_pid or i < 0 or end > lazy[i][1]:
                raise LookupError(f"pid {pid}: pages {vaddr:#x}-{end:#x} are not lazy pages "
                                  f"of pid {self.image_pid}")
            ranges.append((vaddr, nr * PAGE, off))
            off += nr * PAGE
        kmem.vm_read(self.pid, into, ranges)
        with self._lock:
            self.pages_served += off // PAGE

    def release(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        try:
            while not ptrace.wait(self.pid).exited:
                pass
        except errors.KernelError:
            pass
        log.info("pid %d: memory keeper %d gone (%d lazy pages served)", self.image_pid,
                 self.pid, self.pages_served)


def keep_memory(pid: int, lazy: list[tuple[int, int]]) -> Keeper:
    """The keeper of frozen (seized, in an interrupt stop) ``pid``'s memory."""
    ptrace.set_options(pid, KEEPER_OPTIONS)
    rt = remote.RemoteTask(pid, remote.find_syscall_insn(pid, proc.read_maps(pid)))
    try:
        # SIGCHLD as its exit signal: once the process is gone the keeper is
        # reparented (to a subreaper or init), which reaps it like any child.
        child = rt.call(sysno.clone, CLONE_VM | signal.SIGCHLD, 0, 0, 0, 0,
                        what="clone(CLONE_VM)")
    finally:
        rt.finish()
    try:
        while True:                       # auto-attached: it stops before running
            st = ptrace.wait(child)
            if st.exited:
                raise errors.DumpError(f"pid {pid}: memory keeper {child} "
                                       f"{st.describe()}")
            if st.is_event_stop:
                break
            ptrace.cont(child, 0)
        k = remote.RemoteTask(child, rt.gadget)
        k.call(sysno.close_range, *CLOSE_RANGE_ALL)
        # Out of the process's session and group: a PID still in use as a
        # pgid or sid cannot be taken again (clone3 set_tid: EEXIST).
        k.call(sysno.setsid)
    except BaseException:
        Keeper(pid, child, []).release()
        raise
    log.info("pid %d: memory kept by task %d for %d lazy pages", pid, child,
             pagemap.pages(lazy))
    return Keeper(pid, child, lazy)
