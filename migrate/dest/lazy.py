"""Lazy restore (post-copy), the restore's side (DESIGN.md §3 "Lazy pages").

With ``restore --lazy-pages`` the private anonymous VMAs (anonymous, heap,
stack) of the root process are mapped but their stored pages are not
written, except the pages that hold a thread's stack pointer (and the red
zone below it) and each thread's rseq area (the kernel writes it on the way
back to user space, which the restore's own remote syscalls already do).
Then, before any other remote syscall:

1. a userfaultfd is created inside the process by a remote syscall, taken
   with pidfd_getfd, and closed in the process (its fd table stays the
   image's);
2. UFFDIO_API with the non-cooperative events (FORK, REMAP, REMOVE, UNMAP)
   and the faulting thread's id;
3. every lazy VMA is registered in MISSING mode, whole (a partial
   registration would split the VMA);
4. the uffd goes to the lazy-pages daemon (``migrate lazy-pages``) over its
   unix socket with SCM_RIGHTS, with the ranges whose pages it must supply;
   the daemon answers ``OK`` once it serves them.  The restore reads that
   answer once every process is built, before it releases any (it goes on
   meanwhile: a page its remote syscalls touch waits for the daemon).

From then on a touch of a missing page, by the process or by the kernel on
its behalf (the rest of the restore included), blocks until the daemon
copies the page in.  A page that is registered but not in the ranges (never
written before the dump) is mapped as the zero page on its first touch.

Every process of a tree is handed over, one connection each, the last one
saying so (the daemon does not finish before it).  Processes forked later
are followed by the daemon (UFFD_EVENT_FORK).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct

from migrate import errors
from migrate.images import lazy as imglazy
from migrate.images import pagemap
from migrate.images.imgfile import PAGES_DATA_OFFSET
from migrate.kernel import memory as kmem
from migrate.kernel import syscalls, sysno, userfaultfd
from migrate.resources import memory
from migrate.resources.taskctl import PROT_WRITE, TaskCtl

log = logging.getLogger(__name__)

PAGE = kmem.PAGE_SIZE
SOCKET_NAME = "lazy-pages.socket"
HANDOVER_TIMEOUT_S = 30.0
UFFD_FEATURES = (userfaultfd.UFFD_FEATURE_EVENT_FORK | userfaultfd.UFFD_FEATURE_EVENT_REMAP |
                 userfaultfd.UFFD_FEATURE_EVENT_REMOVE | userfaultfd.UFFD_FEATURE_EVENT_UNMAP |
                 userfaultfd.UFFD_FEATURE_THREAD_ID)
HEADER = struct.Struct("<I")
MAX_MESSAGE = 64 << 20


class LazyPlan:
    """Which VMAs are registered and which pages the daemon supplies: the
    stored pages that may be lazy (images/lazy.py), and the pages the dump
    left out (PE_LAZY, served by the source)."""

    def __init__(self, vmas: list, threads: list, stored: list[pagemap.Range],
                 flagged: list[pagemap.Range] = (), lazy_map: bool = False) -> None:
        self.lazy_map = lazy_map        # the source says later which flagged pages it has
        self.vmas = imglazy.lazy_vmas(vmas)
        self.eager = imglazy.eager_ranges(threads)
        self.flagged = pagemap.normalize(flagged)
        self.lazy = pagemap.union(
            imglazy.lazy_ranges(pagemap.normalize(stored), vmas, threads), self.flagged)
        bad = pagemap.subtract(self.flagged, pagemap.subtract(self.vmas, self.eager))
        if bad:
            raise errors.ImageError("pagemap", None, f"pages {bad[0][0]:#x}-{bad[0][1]:#x} "
                                                     "are flagged lazy but cannot be")

    def eager_parts(self, parts: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """The (file index, vaddr, nr_pages) parts the restore writes itself:
        everything but the lazy pages."""
        out = []
        for idx, addr, n in parts:
            for s, e in pagemap.subtract([(addr, addr + n * PAGE)], self.lazy):
                out.append((idx + (s - addr) // PAGE, s, (e - s) // PAGE))
        return out


def plan(p) -> LazyPlan:
    """The plan for a ProcImage (dest.restore)."""
    return LazyPlan(p.mm.vmas, list(p.core.threads), p.stored, flagged(p.pagemap),
                    p.pagemap_head.lazy_map)


def flagged(entries) -> list[pagemap.Range]:
    """Pages the dump left out for the source to serve (PE_LAZY)."""
    return pagemap.ranges_of(entries, pagemap.PE_LAZY)


def check_image(procs, lazy_pages: bool) -> None:
    """An image whose dump left pages to its source restores only lazily."""
    if lazy_pages:
        return
    for p in procs:
        f = flagged(p.pagemap)
        if f:
            raise errors.RestoreError(
                f"pid {p.pid}: {pagemap.pages(f)} pages of the image are left with its "
                "source (dump --lazy-pages): restore it with --lazy-pages and a "
                "`migrate lazy-pages --page-server`")


FILL_STEP = 8 << 20


def fill_eager(pid: int, vmas: list, parts: list[tuple[int, int, int]], reader) -> int:
    """Write ``parts`` of ``reader``'s page file into the task: pread and
    process_vm_writev (``/proc/PID/mem`` where the area is not writable).
    Unlike memory.fill_pages it reads only these pages; the page file's
    checksum is checked by the lazy-pages daemon, which reads it whole."""
    writable = pagemap.normalize((e.start, e.end) for e in vmas
                                 if memory.initial_prot(e) & PROT_WRITE)
    # Fresh memory is slow to touch: a buffer no bigger than the largest part.
    buf = bytearray(min(FILL_STEP, max((n * PAGE for _, _, n in parts), default=0)))
    total = 0
    for idx, addr, n in parts:
        total += n
        while n:
            k = min(n, FILL_STEP // PAGE)
            view = memoryview(buf)[:k * PAGE]
            off = PAGES_DATA_OFFSET + idx * PAGE
            got = os.preadv(reader.fd, [view], off)
            if got != len(view):
                raise errors.ImageError(reader.path, off, f"short read: {got} of {len(view)}")
            if pagemap.subtract([(addr, addr + k * PAGE)], writable):
                with kmem.ProcMem(pid, write=True) as mem:
                    mem.write(addr, view)
            else:
                kmem.vm_write(pid, buf, [(addr, k * PAGE, 0)])
            idx, addr, n = idx + k, addr + k * PAGE, n - k
    return total


def hand_over(ctl: TaskCtl, image_pid: int, lp: LazyPlan, sock_path: str,
              last: bool = True, wait: bool = True) -> "HandOver":
    """Steps 1-4 of the module doc.  RestoreError if the daemon is not there
    or refuses (the caller kills the half-built process).  ``wait=False``:
    the daemon's answer is read by ``HandOver.wait()`` later (the restore
    goes on meanwhile; it must wait before it releases the process)."""
    pid = ctl.pid
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    r = ctl.call(sysno.userfaultfd, flags, what="userfaultfd")
    try:
        uffd = syscalls.take_fd(pid, r)
    finally:
        ctl.call(sysno.close, r)
    try:
        got = userfaultfd.api(uffd, UFFD_FEATURES)
        if got & UFFD_FEATURES != UFFD_FEATURES:
            raise errors.RestoreError(f"pid {pid}: userfaultfd lacks features "
                                      f"{UFFD_FEATURES & ~got:#x} needed for lazy pages")
        for s, e in lp.vmas:
            userfaultfd.register(uffd, s, e - s, userfaultfd.UFFDIO_REGISTER_MODE_MISSING)
        msg = json.dumps({"pid": pid, "image_pid": image_pid, "vmas": lp.vmas,
                          "lazy": lp.lazy, "last": last, "map": lp.lazy_map}).encode()
        h = HandOver(sock_path, msg, uffd, pid)
    finally:
        os.close(uffd)
    if wait:
        try:
            h.wait()
        finally:
            h.close()
    log.info("pid %d: %d lazy VMAs registered, %d pages handed to the lazy-pages daemon "
             "(%d eager ranges)", pid, len(lp.vmas), pagemap.pages(lp.lazy), len(lp.eager))
    return h


class HandOver:
    """One process's uffd sent to the daemon (SCM_RIGHTS) with its ranges;
    ``wait()`` reads the answer (RestoreError unless ``OK``)."""

    def __init__(self, sock_path: str, msg: bytes, uffd: int, pid: int) -> None:
        self.sock_path, self.pid = sock_path, pid
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.s.settimeout(HANDOVER_TIMEOUT_S)
            self.s.connect(sock_path)
            socket.send_fds(self.s, [HEADER.pack(len(msg))], [uffd])
            self.s.sendall(msg)
        except OSError as e:
            self.s.close()
            raise self._unreachable(e) from None

    def _unreachable(self, e: OSError) -> errors.RestoreError:
        return errors.RestoreError(
            f"pid {self.pid}: cannot hand the userfaultfd to the lazy-pages daemon at "
            f"{self.sock_path}: {e.strerror or e} (is `migrate lazy-pages` running?)")

    def wait(self) -> None:
        answer = b""
        try:
            while not answer.endswith(b"\n"):
                chunk = self.s.recv(1024)
                if not chunk:
                    break
                answer += chunk
        except OSError as e:
            raise self._unreachable(e) from None
        text = answer.decode("utf-8", "replace").strip()
        if text != "OK":
            raise errors.RestoreError(f"pid {self.pid}: the lazy-pages daemon refused: "
                                      f"{text or 'no answer'}")

    def close(self) -> None:
        self.s.close()
