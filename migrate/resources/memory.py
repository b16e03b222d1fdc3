"""Memory: VMAs and pages, dump and restore side by side.

Dump: classify every VMA from smaps, find the pages that hold data with
PAGEMAP_SCAN (present or swapped; not the zero page; in private file
mappings only pages no longer backed by the file), copy them with
process_vm_readv in large batches (``/proc/PID/mem`` for unreadable areas,
the shmem object itself for shared anonymous memory) into the page store.

Restore: recreate every VMA with MAP_FIXED by remote mmap, fill the pages
(process_vm_writev, ``/proc/PID/mem`` for areas without write permission),
then set the final protections and madvise flags.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import errno
import itertools
import threading
import logging
import os
import stat as stat_mod

from migrate import errors
from migrate.images import PE_PRESENT
from migrate.images import pagemap as pm
from migrate.images.imgfile import CHUNK_PAGES, chunk_digest, chunk_hasher
from migrate.images._pb import mm_pb2
from migrate.images.pagemap import Entry
from migrate.kernel import memory as kmem
from migrate.kernel import syscalls, sysno
from migrate.kernel.proc import Vma
from migrate.resources.taskctl import (
    MAP_ANONYMOUS, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_GROWSDOWN, MAP_NORESERVE,
    MAP_PRIVATE, MAP_SHARED,
    O_CLOEXEC, O_RDONLY, O_RDWR, PROT_EXEC, PROT_READ, PROT_WRITE, TaskCtl)

log = logging.getLogger(__name__)

PAGE = kmem.PAGE_SIZE
K = mm_pb2
SPECIAL = {"[vdso]": K.VDSO, "[vvar]": K.VVAR, "[vvar_vclock]": K.VVAR_VCLOCK,
           "[vsyscall]": K.VSYSCALL}

# madvise(2) advice for smaps VmFlags (Documentation/filesystems/proc.rst)
MADV_FOR_FLAG = {"hg": 14, "nh": 15, "dc": 10, "dd": 16, "wf": 18, "mg": 12}


def prot_of(perms: str) -> int:
    return ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))


def perms_of(prot: int, shared: bool) -> str:
    return ("r" if prot & PROT_READ else "-") + ("w" if prot & PROT_WRITE else "-") + \
        ("x" if prot & PROT_EXEC else "-") + ("s" if shared else "p")


def classify(pid: int, v: Vma) -> int:
    """The vma_kind of a VMA, or UnsupportedResource."""
    return _classify(pid, v)[0]


def _classify(pid: int, v: Vma) -> tuple[int, os.stat_result | None]:
    """(vma_kind, the stat of its map_files entry for a file mapping)."""
    if v.path in SPECIAL:
        return SPECIAL[v.path], None
    if v.path == "[stack]":
        return K.STACK, None
    if v.path == "[heap]":
        return K.HEAP, None
    if v.path == "[uprobes]":
        raise errors.UnsupportedResource(pid, "vma", f"[uprobes] at {v.start:#x}")
    if v.path == "" or v.path.startswith("[anon:"):
        return (K.ANON_SHARED if v.shared else K.ANON_PRIVATE), None
    if v.path.startswith("[anon_shmem:"):
        return K.ANON_SHARED, None
    if v.path.startswith("["):
        raise errors.UnsupportedResource(pid, "vma", f"{v.path} at {v.start:#x}-{v.end:#x}")
    # shmem behind a shared anonymous mapping or a memfd: content is ours to keep
    if v.deleted and (v.path == "/dev/zero" or v.path.startswith("/memfd:")):
        return K.ANON_SHARED, None
    if v.path.startswith("/SYSV"):
        raise errors.UnsupportedResource(pid, "vma", f"System V shared memory {v.path} at "
                                                     f"{v.start:#x}")
    if v.deleted:
        raise errors.UnsupportedResource(
            pid, "vma", f"mapping of deleted file {v.path} at {v.start:#x}-{v.end:#x}")
    try:
        st = os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}")
    except OSError as e:
        raise errors.from_errno("stat map_files", e.errno, pid, f"vma {v.start:#x}") from e
    if not stat_mod.S_ISREG(st.st_mode):
        raise errors.UnsupportedResource(
            pid, "vma", f"mapping of non-regular file {v.path} at {v.start:#x}-{v.end:#x}")
    return (K.FILE_SHARED if v.shared else K.FILE_PRIVATE), st


def dump_vmas(pid: int, vmas: list[Vma], tolerant: bool = False) -> list:
    """vma_entry messages for every VMA (UnsupportedResource before any change).
    ``tolerant``: the task runs (pre-dump); a VMA that vanished is left out."""
    out = []
    for v in vmas:
        if "um" in v.vmflags:
            # A lazy restore's daemon still fills it: the pages it has not
            # copied yet look absent (zero), and would be dumped so.
            raise errors.UnsupportedResource(
                pid, "vma", f"{v.start:#x}-{v.end:#x} is registered with a userfaultfd in "
                            "missing mode: its pages may still be arriving (a lazy restore "
                            "in progress); dump it once they are all in")
        try:
            kind, st = _classify(pid, v)
        except (errors.KernelError, OSError) as e:
            if tolerant and e.errno == errno.ENOENT:
                continue
            raise
        e = K.vma_entry(start=v.start, end=v.end, pgoff=v.pgoff,
                        prot=prot_of(v.perms), kind=kind, path=v.path,
                        vmflags=list(v.vmflags), deleted=v.deleted)
        flags = MAP_SHARED if v.shared else MAP_PRIVATE
        if kind in (K.ANON_PRIVATE, K.ANON_SHARED, K.STACK, K.HEAP):
            flags |= MAP_ANONYMOUS
        if "gd" in v.vmflags:
            flags |= MAP_GROWSDOWN
        if "nr" in v.vmflags:
            flags |= MAP_NORESERVE
        e.flags = flags
        if kind in (K.FILE_PRIVATE, K.FILE_SHARED):
            e.file_size, e.file_ino, e.file_dev = st.st_size, st.st_ino, st.st_dev
            e.file_mtime_ns = st.st_mtime_ns
        elif kind == K.ANON_SHARED:
            # One shmem object may be mapped several times, by several
            # processes: the restore makes it once and maps it everywhere.
            try:
                sst = os.stat(f"/proc/{pid}/map_files/{v.start:x}-{v.end:x}")
            except OSError as err:
                if tolerant and err.errno == errno.ENOENT:
                    continue
                raise errors.from_errno("stat map_files", err.errno, pid,
                                        f"vma {v.start:#x}") from err
            e.shmid, e.shm_size = sst.st_ino, sst.st_size
        out.append(e)
    return out


@dataclasses.dataclass(slots=True)
class PageRun:
    """Pages [addr, addr + nr_pages * 4096) and where to read them from."""
    addr: int
    nr_pages: int
    source: str          # "vm" (process_vm_readv), "mem" (/proc/PID/mem), "shm"
    vma_start: int = 0
    vma_end: int = 0
    vma_pgoff: int = 0


@dataclasses.dataclass
class Scan:
    """What one pass over the VMAs found."""
    runs: list                                 # data pages, as PageRuns
    written: list[tuple[int, int]]             # tracked VMAs: pages written since
    failed: list[tuple[int, int]]              # VMAs the tracked scan refused


def scan_pages(pid: int, entries: list, tolerant: bool = False,
               tracked: set[int] | None = None, shared: set[int] = frozenset()) -> Scan:
    """Which pages of which VMAs hold data that must go into the image.

    ``tracked``: starts of VMAs registered with uffd-wp.  Their scan is the
    same pass that tells which pages were written since the last round and
    write-protects them again (PM_SCAN_WP_MATCHING): one page-table walk.

    ``shared``: starts of private VMAs with pages mapped more than once
    (``shared_starts``).  They are read through /proc/PID/mem: process_vm_readv
    pins the pages (FOLL_PIN), and pinning an anonymous page shared
    copy-on-write makes the kernel copy it first (gup_must_unshare(),
    mm/internal.h): the dump would undo every fork's sharing in the tree it
    leaves running (more memory), and a migration's pre-dumps would leave
    nothing shared for its final dump to find.  /proc/PID/mem reads without
    pinning (about 1.4x slower)."""
    out = Scan([], [], [])
    present = kmem.PAGE_IS_PRESENT | kmem.PAGE_IS_SWAPPED
    tracked = tracked or set()
    with kmem.PagemapScanner(pid) as sc:
        for e in entries:
            if e.kind in (K.VDSO, K.VVAR, K.VVAR_VCLOCK, K.VSYSCALL, K.FILE_SHARED):
                continue
            if e.kind == K.ANON_SHARED:
                try:
                    out.runs.extend(_shmem_runs(pid, e))
                except errors.KernelError as err:
                    if not tolerant or err.errno != errno.ENOENT:
                        raise
                continue
            exclude = kmem.PAGE_IS_PFNZERO
            if e.kind == K.FILE_PRIVATE:
                exclude |= kmem.PAGE_IS_FILE  # still the file's page: not ours to copy
            src = "vm" if e.prot & PROT_READ and e.start not in shared else "mem"
            if e.start in tracked:
                try:
                    regions = sc.scan(e.start, e.end, anyof=present,
                                      return_mask=present | kmem.PAGE_IS_FILE |
                                      kmem.PAGE_IS_PFNZERO | kmem.PAGE_IS_WRITTEN,
                                      flags=kmem.PM_SCAN_WP_MATCHING |
                                      kmem.PM_SCAN_CHECK_WPASYNC)
                except errors.KernelError as err:
                    log.info("pid %d: vma %#x-%#x: tracked scan failed (%s)", pid,
                             e.start, e.end, err)
                    out.failed.append((e.start, e.end))
                else:
                    for r in regions:
                        if r.categories & kmem.PAGE_IS_WRITTEN:
                            out.written.append((r.start, r.end))
                    _add_data(pid, out.runs, [r for r in regions
                                              if not r.categories & exclude], src)
                    continue
            _add_data(pid, out.runs, sc.scan(e.start, e.end, anyof=present,
                                             exclude=exclude), src)
    return out


def shared_starts(vmas: list[Vma]) -> set[int]:
    """Starts of the private VMAs (smaps) with written pages mapped more
    than once: anonymous pages shared since a fork.  Shared_Clean is left
    out: in a private file mapping it counts the page cache every process
    maps (a clean anonymous page shared after a fork, read back from swap,
    is missed: the dump unshares it)."""
    return {v.start for v in vmas if v.shared_dirty_kb and not v.shared}


def _add_data(pid: int, runs: list, regions, src: str) -> None:
    """Data runs from scan regions; neighbours are joined (a tracked scan
    splits regions wherever the written bit changes)."""
    start = end = -1
    for r in regions:
        if r.categories & kmem.PAGE_IS_PRESENT:
            if r.start == end:
                end = r.end
            else:
                if end > start:
                    runs.append(PageRun(start, (end - start) // PAGE, src))
                start, end = r.start, r.end
            continue
        if end > start:
            runs.append(PageRun(start, (end - start) // PAGE, src))
            start = end = -1
        # "swapped": real swap entries, or uffd-wp markers (no data)
        for s, t in kmem.non_marker_pages(pid, r.start, r.end):
            runs.append(PageRun(s, (t - s) // PAGE, src))
    if end > start:
        runs.append(PageRun(start, (end - start) // PAGE, src))


def _shmem_runs(pid: int, e) -> list[PageRun]:
    """Data ranges of the shmem object behind a shared anonymous VMA.

    SEEK_DATA on the object (through map_files) also finds pages that this
    process never faulted in, or dropped from its page table.
    """
    path = f"/proc/{pid}/map_files/{e.start:x}-{e.end:x}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise errors.from_errno("open map_files", err.errno, pid, f"vma {e.start:#x}") from err
    runs = []
    try:
        lo, hi = e.pgoff, e.pgoff + (e.end - e.start)
        off = lo
        while off < hi:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            if d >= hi:
                break
            h = min(os.lseek(fd, d, os.SEEK_HOLE), hi)
            runs.append(PageRun(e.start + (d - lo), (h - d) // PAGE, "shm",
                                e.start, e.end, e.pgoff))
            off = h
    finally:
        os.close(fd)
    return runs


# --------------------------------------------------------------------------
# copy-on-write sharing between a parent and its forked child

COW_KINDS = (K.ANON_PRIVATE, K.HEAP)
COW_GAP = 64 * PAGE        # pagemap reads: data ranges closer than this are read as one
# A child sharing fewer pages with its parent gets its own copy: the premap
# areas cost more time (dump, fork phase) than the memory they would save.
COW_MIN_PAGES = 64


def cow_capable(e) -> bool:
    """A VMA whose pages a restore can share with the parent's: private
    anonymous, and mapped by the premap's plain mmap the same way (no
    MAP_GROWSDOWN; accounted unless MAP_NORESERVE, as mmap(2) does it)."""
    return (e.kind in COW_KINDS and not e.flags & (MAP_SHARED | MAP_GROWSDOWN)
            and ("ac" in e.vmflags) == (not e.flags & MAP_NORESERVE))


def cow_candidates(entries: list, smaps: list[Vma]) -> list:
    """The VMAs (vma_entry) of a process worth comparing with its parent's:
    private anonymous with written pages mapped more than once (smaps
    Shared_Dirty); none if they hold fewer than COW_MIN_PAGES of those."""
    shared = {v.start: v.shared_dirty_kb for v in smaps if v.shared_dirty_kb and not v.shared}
    out = [e for e in entries if e.start in shared and cow_capable(e)]
    if sum(shared[e.start] for e in out) * 1024 < COW_MIN_PAGES * PAGE:
        return []
    return out


def shared_with_parent(pid: int, ppid: int, candidates: list, parent_entries: list,
                       data: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The data pages (``data``: normalized) of ``pid``'s VMAs ``candidates``
    (cow_candidates) that map the same physical page as ``ppid`` at the same
    address: still shared since the fork.  Both are frozen.  One pagemap
    read per stretch of data of each process, compared as whole buffers."""
    if not kmem.frames_visible():
        log.info("pid %d: pagemap shows no PFNs here: COW sharing is not recorded", pid)
        return []
    mine = pm.normalize((e.start, e.end) for e in candidates)
    theirs = pm.normalize((e.start, e.end) for e in parent_entries if cow_capable(e))
    want = pm.intersect(pm.intersect(mine, theirs), data)
    # Stretches of data, each with the data ranges it holds: the pages in
    # between are not data (not present, or the zero page, which two
    # processes do map at one PFN: dropped by the intersection).
    spans: list[tuple[int, int, list]] = []
    for s, e in want:
        if spans and s - spans[-1][1] <= COW_GAP:    # unmapped pages read as 0
            spans[-1] = (spans[-1][0], e, spans[-1][2] + [(s, e)])
        else:
            spans.append((s, e, [(s, e)]))
    out: list[tuple[int, int]] = []
    with kmem.Pagemap(pid) as a, kmem.Pagemap(ppid) as b:
        for s, e, parts in spans:
            got = kmem.shared_frames(a, b, s, e)
            if len(parts) > 1:
                got = pm.intersect(got, parts)
            if out and got and out[-1][1] == got[0][0]:
                out[-1] = (out[-1][0], got[0][1])
                got = got[1:]
            out += got
    return out


WINDOW_PAGES = CHUNK_PAGES  # 8 MiB: one checksum chunk of the page file
IN_FLIGHT = 3              # windows being copied at once: bounds the tool's RSS
WORKERS = 2                # process_vm_* and pread/pwrite run without the GIL


def _windows(runs) -> list[tuple[int, int, list]]:
    """Split runs (in page-file order) into windows of the page file's chunks:
    (chunk index, nr pages, [(addr, nr pages, run)])."""
    out, cur, cur_n = [], [], 0
    for r in runs:
        addr, left = r.addr, r.nr_pages
        while left:
            n = min(left, WINDOW_PAGES - cur_n)
            cur.append((addr, n, r))
            cur_n += n
            addr += n * PAGE
            left -= n
            if cur_n == WINDOW_PAGES:
                out.append((len(out), cur_n, cur))
                cur, cur_n = [], 0
    if cur:
        out.append((len(out), cur_n, cur))
    return out


PIECE = 1 << 20            # bytes copied per step inside a window: small, reused
                           # buffers (fresh memory is slow to touch the first time)


class _Buffers(threading.local):
    """One reusable buffer per worker thread."""

    def get(self, size: int) -> bytearray:
        buf = getattr(self, "buf", None)
        if buf is None or len(buf) < size:
            buf = self.buf = bytearray(size)
        return buf


def _pipeline(windows, job, consume) -> None:
    """Run ``job`` over windows on WORKERS threads, at most IN_FLIGHT ahead,
    and ``consume`` the results in order (chunk digests are combined in order)."""
    pending: collections.deque = collections.deque()
    it = iter(windows)
    with concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="pages") as ex:
        try:
            for w in itertools.islice(it, IN_FLIGHT):
                pending.append(ex.submit(job, w))
            while pending:
                consume(*pending.popleft().result())
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(ex.submit(job, nxt))
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _close_window(win) -> None:
    """Unmap a page file's chunk window."""
    try:
        win.close()
    except BufferError:
        pass     # a slice still held by an exception's traceback: GC closes it


def split_runs(runs: list[PageRun], keep: list[tuple[int, int]]) -> list[PageRun]:
    """The parts of ``runs`` inside the normalized byte ranges ``keep``."""
    out = []
    j = 0
    for r in runs:
        s, e = r.addr, r.addr + r.nr_pages * PAGE
        while j < len(keep) and keep[j][1] <= s:
            j += 1
        k = j
        while k < len(keep) and keep[k][0] < e:
            a, b = max(s, keep[k][0]), min(e, keep[k][1])
            if a < b:
                out.append(PageRun(a, (b - a) // PAGE, r.source, r.vma_start, r.vma_end,
                                   r.vma_pgoff))
            k += 1
    return out


def write_pages(pid: int, runs: list[PageRun], writer, tolerant: bool = False) -> list:
    """Copy the runs into the page file; return pagemap entries.

    Two worker threads each copy an 8 MiB window from the task with
    process_vm_readv into their own buffer and pwrite it at its place in the
    page file, hashing it there; the digests are combined in order.

    ``tolerant`` (a pre-dump of a running task): an area that changed under
    us is read through /proc/PID/mem, and a page that is gone is stored as
    zeros; it belongs to no VMA any more, so no later image refers to it.
    """
    entries = [Entry(r.addr, r.nr_pages, PE_PRESENT) for r in runs]
    bufs = _Buffers()
    streaming = hasattr(writer, "write_at")

    def job(w):
        index, n, parts = w
        if not streaming:      # a sink that takes whole chunks (the page-server)
            view = memoryview(bufs.get(n * PAGE))[:n * PAGE]
            _copy_from_task(pid, view, parts, tolerant)
            return n, writer.write_chunk(index, view)
        # Copy the window piece by piece through one small buffer.
        buf = memoryview(bufs.get(PIECE))
        hasher = chunk_hasher()
        page = index * WINDOW_PAGES
        piece: list = []
        fill = 0
        for part in _pieces(parts):
            k = part[1] * PAGE
            if fill + k > PIECE:
                _copy_from_task(pid, buf[:fill], piece, tolerant)
                writer.write_at(page, buf[:fill])
                hasher.update(buf[:fill])
                page += fill // PAGE
                piece, fill = [], 0
            piece.append(part)
            fill += k
        if piece:
            _copy_from_task(pid, buf[:fill], piece, tolerant)
            writer.write_at(page, buf[:fill])
            hasher.update(buf[:fill])
        return n, hasher.digest()

    windows = _windows(runs)
    if len(windows) <= 1:
        # One window (a stop's few pages): no threads to start for it.
        for w in windows:
            writer.account(*job(w))
        return entries
    _pipeline(windows, job, writer.account)
    return entries


def _pieces(parts):
    """Parts cut to at most PIECE bytes each."""
    step = PIECE // PAGE
    for addr, n, r in parts:
        while n > step:
            yield addr, step, r
            addr += PIECE
            n -= step
        yield addr, n, r


def _copy_from_task(pid: int, view: memoryview, parts, tolerant: bool = False) -> None:
    vm, off = [], 0
    mem = None
    try:
        for addr, n, r in parts:
            length = n * PAGE
            try:
                if r.source == "vm":
                    vm.append((addr, length, off))
                elif r.source == "mem":
                    if mem is None:
                        mem = kmem.ProcMem(pid)
                    mem.readinto(addr, view[off:off + length])
                else:
                    _read_shmem(pid, r, addr, view[off:off + length])
            except OSError:
                if not tolerant:
                    raise
                _salvage(pid, addr, view[off:off + length])
            off += length
    finally:
        if mem is not None:
            mem.close()
    if not vm:
        return
    try:
        kmem.vm_read(pid, view, vm)
    except errors.KernelError as e:
        if not tolerant or e.errno not in (errno.EFAULT, errno.ENOMEM):
            raise
        for addr, length, off in vm:
            _salvage(pid, addr, view[off:off + length])


def _read_shmem(pid: int, r: PageRun, addr: int, view: memoryview) -> None:
    path = f"/proc/{pid}/map_files/{r.vma_start:x}-{r.vma_end:x}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.from_errno("open map_files", e.errno, pid, f"vma {r.vma_start:#x}") from e
    try:
        _pread_full(fd, view, r.vma_pgoff + addr - r.vma_start, pid)
    finally:
        os.close(fd)


def _salvage(pid: int, addr: int, view: memoryview) -> None:
    """A pre-dump of a running task: the area changed under us.  Read what is
    still there through /proc/PID/mem, page by page; a page that is gone is
    stored as zeros: it belongs to no VMA any more, and a VMA mapped there
    later is new, untracked, and copied whole by the next image."""
    gone = 0
    with kmem.ProcMem(pid) as mem:
        try:
            mem.readinto(addr, view)
            return
        except errors.KernelError:
            pass
        for p in range(0, len(view), PAGE):
            try:
                mem.readinto(addr + p, view[p:p + PAGE])
            except errors.KernelError:
                view[p:p + PAGE] = bytes(PAGE)
                gone += 1
    if gone:
        log.debug("pid %d: %d pages at %#x vanished during the pre-dump", pid, gone, addr)


def _pread_full(fd: int, view: memoryview, off: int, pid: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], off + got)
        if n <= 0:
            raise errors.KernelError("pread shmem", errno.EIO, pid, f"offset {off + got:#x}")
        got += n


# --------------------------------------------------------------------------
# restore


def check_files(entries: list) -> None:
    """Every mapped file must still be there, the same size (before any fork)."""
    for e in entries:
        if e.kind not in (K.FILE_PRIVATE, K.FILE_SHARED):
            continue
        try:
            st = os.stat(e.path)
        except OSError as err:
            raise errors.RestoreError(
                f"mapped file {e.path} (vma {e.start:#x}-{e.end:#x}): "
                f"{os.strerror(err.errno)}") from None
        if st.st_size != e.file_size:
            raise errors.RestoreError(
                f"mapped file {e.path} (vma {e.start:#x}-{e.end:#x}) changed size: "
                f"{st.st_size} bytes, {e.file_size} at dump")
        if st.st_mtime_ns != e.file_mtime_ns:
            log.warning("mapped file %s was modified after the dump", e.path)


def initial_prot(e) -> int:
    """Protection to map with so that VM_ACCOUNT matches the dumped VMA.

    A private VMA that was writable once keeps VM_ACCOUNT ("ac") after an
    mprotect to read-only; mapping it writable first and mprotecting later
    reproduces that, and keeps it from merging with neighbours that differ.
    """
    prot = e.prot
    if not (e.flags & MAP_SHARED) and "ac" in e.vmflags:
        prot |= PROT_WRITE
    if e.kind == K.ANON_SHARED:
        # /proc/PID/mem cannot force a write into a read-only shared mapping:
        # map it writable, fill it, then mprotect (shared memory is not
        # accounted, so nothing else changes).
        prot |= PROT_WRITE
    return prot


MFD_ALLOW_SEALING = 2
F_ADD_SEALS, F_SEAL_SEAL = 1033, 1


class SharedObjects:
    """The shmem objects behind shared anonymous and memfd mappings, made
    once by the tool for the whole tree; each process maps them by opening
    /proc/TOOL/fd/N, so every mapping of one object (in one process or in
    several) is the same memory again."""

    def __init__(self, vma_lists, memfds=()) -> None:
        """``memfds``: file_entry of open memfds (their content and seals)."""
        sizes: dict[int, int] = {}
        names: dict[int, str] = {}
        self.content: dict[int, bytes] = {}
        self.seals: dict[int, int] = {}
        for f in memfds:
            sizes[f.reg.ino] = max(sizes.get(f.reg.ino, 0), len(f.reg.content), f.reg.size)
            names[f.reg.ino] = f.reg.path
            self.content[f.reg.ino] = f.reg.content
            self.seals[f.reg.ino] = f.reg.seals
        for vmas in vma_lists:
            for e in vmas:
                if e.kind == K.ANON_SHARED and e.shmid:
                    need = max(e.shm_size, e.pgoff + e.end - e.start)
                    sizes[e.shmid] = max(sizes.get(e.shmid, 0), need)
                    names.setdefault(e.shmid, e.path)
        self.fds: dict[int, int] = {}
        try:
            for shmid, size in sizes.items():
                path = names[shmid]
                if path.startswith("/memfd:"):
                    name = path[len("/memfd:"):]
                    if name.endswith(" (deleted)"):
                        name = name[:-len(" (deleted)")]
                    fd = os.memfd_create(name, os.MFD_CLOEXEC | MFD_ALLOW_SEALING)
                    os.ftruncate(fd, size)
                    data = memoryview(self.content.get(shmid, b""))
                    off = 0
                    while off < len(data):
                        off += os.pwrite(fd, data[off:], off)
                else:
                    fd = syscalls.anon_shmem(size)
                self.fds[shmid] = fd
        except BaseException:
            self.close()
            raise
        self.owner = os.getpid()

    def open_memfd(self, f) -> int:
        """A description of an open memfd: the object reopened with its flags."""
        r = f.reg
        fd = os.open(f"/proc/self/fd/{self.fds[r.ino]}", r.flags | O_CLOEXEC)
        if r.pos:
            os.lseek(fd, r.pos, os.SEEK_SET)
        return fd

    def seal(self) -> None:
        """The memfds' seals, once every process has mapped and filled them."""
        import fcntl
        for shmid, seals in self.seals.items():
            if seals & ~F_SEAL_SEAL:
                fcntl.fcntl(self.fds[shmid], F_ADD_SEALS, seals & ~F_SEAL_SEAL)
            if seals & F_SEAL_SEAL:
                fcntl.fcntl(self.fds[shmid], F_ADD_SEALS, F_SEAL_SEAL)

    def path(self, shmid: int) -> str | None:
        fd = self.fds.get(shmid)
        return None if fd is None else f"/proc/{self.owner}/fd/{fd}"

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


# -- copy-on-write sharing, restore side --------------------------------
#
# Only fork shares private pages.  Before a new process forks its children,
# it maps each of its private anonymous VMAs whose pages a child shares
# (mm_entry.shared_with_parent) as a "premap" area at a free address and
# reads its own content of those pages into it; the children inherit the
# areas.  Every builder then moves its areas in place (mremap keeps the
# pages and their sharing) instead of mapping those VMAs, and writes only
# the pages not already right.  A child that forks children of its own
# passes them the part of the area it inherited (three generations share
# one page); the pages it inherited but does not share are dropped
# (MADV_DONTNEED) before it forks.  Sharing between siblings, or with a
# grandparent past a parent that wrote the page, is not kept (each gets a
# copy); nor in a VMA that does not lie inside one VMA of the parent.

PREMAP_FROM = 0x100000000000        # first premap address tried (16 TiB)
PREMAP_STEP = 0x10000000000
HUGE = 2 << 20
PROT_RW = PROT_READ | PROT_WRITE
MADV_DONTNEED = 4
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def premap_flags(e) -> int:
    """mmap flags of the premap area of VMA ``e``."""
    return MAP_PRIVATE | MAP_ANONYMOUS | (e.flags & MAP_NORESERVE)


@dataclasses.dataclass
class CowArea:
    """A VMA's pages as they wait in a new process, until its builder
    moves them in place.  Ranges are target addresses, normalized."""
    addr: int                # where the area is in the new process
    start: int               # the target VMA
    end: int
    flags: int               # premap_flags
    advice: list[int]        # madvise hints of the VMA (THP) for an area made here
    valid: list              # pages already holding this process's content when built
    fill: list               # pages this process reads in before it forks
    clear: list              # inherited pages not its own: dropped before it forks
    inherited: bool

    def at(self, vaddr: int) -> int:
        return self.addr + vaddr - self.start


@dataclasses.dataclass
class CowProc:
    """What the plan needs of one live process of the image."""
    pid: int
    ppid: int
    vmas: list                # vma_entry
    stored: list              # pages its image chain holds (normalized)
    shared: list              # pages shared with its parent at dump (normalized)


def _by_vma(ranges: list, vmas: list) -> dict[int, list]:
    """Normalized ``ranges`` split by the VMAs (sorted, disjoint) they fall in."""
    out: dict[int, list] = {}
    j = 0
    for v in vmas:
        while j < len(ranges) and ranges[j][1] <= v.start:
            j += 1
        k = j
        got = []
        while k < len(ranges) and ranges[k][0] < v.end:
            a, b = max(ranges[k][0], v.start), min(ranges[k][1], v.end)
            if a < b:
                got.append((a, b))
            k += 1
        if got:
            out[v.start] = got
    return out


def _container(vmas: list, starts: list[int], w, flags: int):
    """The VMA of ``vmas`` (sorted by start) that holds all of ``w``."""
    i = bisect.bisect_right(starts, w.start) - 1
    if i >= 0 and vmas[i].end >= w.end and premap_flags(vmas[i]) == flags:
        return vmas[i]
    return None


class CowPlan:
    """Which premap areas each new process holds (see above), made once by
    the tool before the first fork, so every process and every builder
    knows them.  Empty if nothing is shared."""

    def __init__(self, procs: list[CowProc], taken: list[tuple[int, int]] = (),
                 min_pages: int = COW_MIN_PAGES) -> None:
        """``procs``: parents first.  ``taken``: address ranges the areas
        must avoid besides every process's VMAs (the tool's own mappings).
        A child sharing fewer than ``min_pages`` with its parent is left out."""
        self.areas: dict[int, list[CowArea]] = {}
        self.drop: dict[int, list] = {}        # inherited areas to unmap before forking
        self.shared: dict[int, int] = {}       # pages shared with the parent, per pid
        by_pid = {p.pid: p for p in procs}
        kids: dict[int, list[CowProc]] = collections.defaultdict(list)
        for p in procs:
            if p.ppid in by_pid and pm.pages(p.shared) >= max(min_pages, 1):
                kids[p.ppid].append(p)
            else:
                p.shared = []
        if not kids:
            return
        size = 0                    # areas are placed from 0, then moved to a free base
        for p in procs:
            capable = sorted((v for v in p.vmas if cow_capable(v)), key=lambda v: v.start)
            pareas = self.areas.get(p.ppid, [])
            mine = self._inherit(p, capable, pareas) if pareas else {}
            # What the children need from this process.
            need: dict[int, list] = collections.defaultdict(list)
            starts = [v.start for v in capable]
            for c in kids.get(p.pid, []):
                cap = sorted((v for v in c.vmas if cow_capable(v)), key=lambda v: v.start)
                want = _by_vma(pm.intersect(pm.intersect(c.shared, c.stored), p.stored), cap)
                for w in cap:
                    if w.start in want:
                        v = _container(capable, starts, w, premap_flags(w))
                        if v is not None:
                            need[v.start] += want[w.start]
            for v in capable:
                if v.start not in need:
                    continue
                u = pm.normalize(need[v.start])
                a = mine.get(v.start)
                if a is not None:
                    a.fill = pm.subtract(u, a.valid)
                    a.valid = pm.union(a.valid, a.fill)
                    continue
                # Same offset in a huge page as the VMA: THPs move whole.
                size = (size + HUGE - 1) // HUGE * HUGE + v.start % HUGE
                mine[v.start] = CowArea(size, v.start, v.end, premap_flags(v),
                                        [MADV_FOR_FLAG[f] for f in ("hg", "nh")
                                         if f in v.vmflags], u, u, [], False)
                size += v.end - v.start + PAGE        # a guard page: no merging
            if mine:
                self.areas[p.pid] = list(mine.values())
        base = self._base(size, [(v.start, v.end) for p in procs for v in p.vmas]
                          + list(taken))
        for areas in self.areas.values():
            for a in areas:
                a.addr += base
        for pid, ranges in self.drop.items():
            self.drop[pid] = [(s + base, e + base) for s, e in ranges]

    def _inherit(self, p: CowProc, capable: list, pareas: list[CowArea]) -> dict:
        """The parts of the parent's areas ``p`` keeps: each of its VMAs that
        lies in one area gets the pages it shares with the parent and the
        parent holds.  The rest of the parent's areas is dropped."""
        out: dict[int, CowArea] = {}
        pareas = sorted(pareas, key=lambda a: a.start)
        starts = [a.start for a in pareas]
        per = _by_vma(pm.intersect(p.shared, p.stored), capable)
        for w in capable:
            got = per.get(w.start)
            if not got:
                continue
            i = bisect.bisect_right(starts, w.start) - 1
            if i < 0 or pareas[i].end < w.end or pareas[i].flags != premap_flags(w):
                continue
            pa = pareas[i]
            mine = pm.intersect(got, pa.valid)
            if not mine:
                continue
            theirs = pm.intersect(pa.valid, [(w.start, w.end)])
            out[w.start] = CowArea(pa.at(w.start), w.start, w.end, pa.flags, [], mine, [],
                                   pm.subtract(theirs, mine), True)
            self.shared[p.pid] = self.shared.get(p.pid, 0) + pm.pages(mine)
        drop = pm.subtract(
            pm.normalize((a.addr, a.addr + a.end - a.start) for a in pareas),
            pm.normalize((a.addr, a.addr + a.end - a.start) for a in out.values()))
        if drop:
            self.drop[p.pid] = drop
        return out

    @staticmethod
    def _base(size: int, taken: list[tuple[int, int]]) -> int:
        spans = pm.normalize(taken)
        base = PREMAP_FROM
        while pm.intersect(spans, [(base - PAGE, base + size + PAGE)]):
            base += PREMAP_STEP
            if base + size > TASK_SIZE:
                raise errors.RestoreError("no free address range for the COW premap areas "
                                          f"({size >> 20} MiB)")
        return base

    def pages_shared(self, pid: int) -> int:
        return self.shared.get(pid, 0)

    def pages_filled(self, pid: int) -> int:
        """Pages ``pid`` reads into its areas before it forks."""
        return sum(pm.pages(a.fill) for a in self.areas.get(pid, []))

    def kept(self, pid: int) -> list[tuple[int, int]]:
        """Address ranges of ``pid``'s areas (kept by the clear of its builder)."""
        return sorted((a.addr, a.addr + a.end - a.start) for a in self.areas.get(pid, []))

    def moves(self, pid: int) -> dict[int, "CowArea"]:
        """``pid``'s areas by the start of their target VMA."""
        return {a.start: a for a in self.areas.get(pid, [])}

    def valid(self, pid: int) -> list:
        """Target pages of ``pid`` already right once its areas are moved."""
        return pm.normalize(r for a in self.areas.get(pid, []) for r in a.valid)


TASK_SIZE = 0x7FFFFFFFF000          # 47-bit user address space


def premap(plan: CowPlan, pid: int, readers) -> None:
    """In new process ``pid`` (this process), before it forks: unmap the
    areas inherited but not used, drop the inherited pages that are not its
    own, make its own areas and read its content of the pages its children
    share into them.  ``readers(within)`` gives, deepest level first,
    (PagesReader, parts) of this process's pages inside ``within``."""
    for s, e in plan.drop.get(pid, []):
        syscalls.call(sysno.munmap, s, e - s, pid=pid, detail=f"premap at {s:#x}")
    clear = []
    for a in plan.areas.get(pid, []):
        if a.inherited:
            clear += [(a.at(s), a.at(e)) for s, e in a.clear]
            continue
        size = a.end - a.start
        got = syscalls.call(sysno.mmap, a.addr, size, PROT_RW, a.flags | MAP_FIXED_NOREPLACE,
                            -1, 0, pid=pid, detail=f"premap of vma {a.start:#x} at {a.addr:#x}")
        if got != a.addr:
            raise errors.RestoreError(f"pid {pid}: premap of vma {a.start:#x} landed at "
                                      f"{got:#x}, not {a.addr:#x}")
        for advice in a.advice:
            syscalls.call(sysno.madvise, a.addr, size, advice, pid=pid)
    if clear:
        kmem.madvise_own(clear, MADV_DONTNEED)
    for a in plan.areas.get(pid, []):
        if a.fill:
            for reader, parts in readers(a.fill):
                _read_in(reader, parts, a.at)


def _read_in(reader, parts: list[tuple[int, int, int]], dest) -> None:
    """Pages (file index, vaddr, nr_pages) of ``reader`` into our own memory
    at ``dest(vaddr)``: each chunk of the page file mapped, then copied by
    process_vm_writev to ourselves (IOV_MAX pieces a call).  The checksum
    is the builder's: it reads the whole file."""
    me = os.getpid()
    by_chunk: dict[int, list] = collections.defaultdict(list)
    for idx, vaddr, n in parts:
        reader.offset_of(idx, n)                       # in the file, or ImageError
        while n:
            c = idx // CHUNK_PAGES
            k = min(n, (c + 1) * CHUNK_PAGES - idx)
            by_chunk[c].append((dest(vaddr), k * PAGE, (idx - c * CHUNK_PAGES) * PAGE))
            idx, vaddr, n = idx + k, vaddr + k * PAGE, n - k
    for c, ranges in sorted(by_chunk.items()):
        win = reader.map_chunk(c, min(CHUNK_PAGES, reader.nr_pages - c * CHUNK_PAGES))
        try:
            kmem.vm_write(me, win, ranges)
        finally:
            _close_window(win)


def map_vmas(ctl: TaskCtl, entries: list, shared: SharedObjects | None = None,
             moves: dict[int, CowArea] | None = None) -> None:
    """Recreate every VMA at its address (remote mmap with MAP_FIXED).  Each
    file is opened once in the task (a library has four or five VMAs); the
    mmaps and madvises then go in one batch (TaskCtl.batch).  ``moves``:
    VMAs whose premap area (CowPlan) is moved in place instead."""
    moves = moves or {}
    fds: dict[tuple[str, int], int] = {}

    def fd_of(path: str, oflags: int) -> int:
        key = (path, oflags)
        if key not in fds:
            fds[key] = ctl.open(path, oflags | O_CLOEXEC)
        return fds[key]

    try:
        calls: list[tuple[int, tuple]] = []
        wants: list[tuple[int, str]] = []       # (expected result, what) per call
        for e in entries:
            if e.kind in (K.VDSO, K.VVAR, K.VVAR_VCLOCK, K.VSYSCALL):
                continue
            length = e.end - e.start
            prot = initial_prot(e)
            flags = e.flags | MAP_FIXED
            obj = shared.path(e.shmid) if shared is not None and e.kind == K.ANON_SHARED \
                else None
            area = moves.get(e.start)
            if area is not None:
                calls.append((sysno.mremap, (area.addr, length, length,
                                             MREMAP_MAYMOVE | MREMAP_FIXED, e.start)))
                wants.append((e.start, f"mremap of the premap at {area.addr:#x} to "
                                       f"{e.start:#x}"))
                if prot != PROT_RW:
                    calls.append((sysno.mprotect, (e.start, length, prot)))
                    wants.append((0, f"mprotect at {e.start:#x}"))
            elif obj is not None:
                calls.append((sysno.mmap, (e.start, length, prot, flags & ~MAP_ANONYMOUS,
                                           fd_of(obj, O_RDWR), e.pgoff)))
                wants.append((e.start, f"mmap shared {e.path} at {e.start:#x}"))
            elif e.kind in (K.FILE_PRIVATE, K.FILE_SHARED):
                oflags = O_RDWR if (e.kind == K.FILE_SHARED and "mw" in e.vmflags) \
                    else O_RDONLY
                calls.append((sysno.mmap, (e.start, length, prot, flags & ~MAP_ANONYMOUS,
                                           fd_of(e.path, oflags), e.pgoff)))
                wants.append((e.start, f"mmap {e.path} at {e.start:#x}"))
            else:
                calls.append((sysno.mmap, (e.start, length, prot, flags | MAP_ANONYMOUS, -1,
                                           0)))
                wants.append((e.start, f"mmap at {e.start:#x}"))
            for fl, advice in MADV_FOR_FLAG.items():
                if fl in e.vmflags:
                    calls.append((sysno.madvise, (e.start, length, advice)))
                    wants.append((-1, ""))            # a hint: its result is not checked
        for (want, what), got in zip(wants, ctl.batch(calls)):
            if want == -1:
                continue
            if -4095 <= got < 0:
                raise errors.from_errno(f"remote {what}", -got, ctl.pid)
            if got != want:
                raise errors.RestoreError(f"pid {ctl.pid}: {what} landed at {got:#x}")
    finally:
        for fd in fds.values():
            ctl.close(fd)


def fill_pages(pid: int, entries: list, parts: list[tuple[int, int, int]], reader) -> int:
    """Copy stored pages into the mapped VMAs.

    ``parts`` are (file page index, vaddr, nr_pages) of ``reader``'s page
    file, sorted by index (images.pagemap.resolve).  Every chunk of the file
    is mapped read-only (no copy out of the page cache) and hashed, so the
    whole file's checksum is checked; the needed pages are written into the
    task with process_vm_writev (``/proc/PID/mem`` where the area is not
    writable), two chunks at a time on two cores.
    """
    writable = sorted((e.start, e.end) for e in entries if initial_prot(e) & PROT_WRITE)
    starts = [s for s, _ in writable]

    def is_writable(addr: int, end: int) -> bool:
        i = bisect.bisect_right(starts, addr) - 1
        return i >= 0 and writable[i][0] <= addr and end <= writable[i][1]

    nchunks = (reader.nr_pages + CHUNK_PAGES - 1) // CHUNK_PAGES
    by_chunk: list[list[tuple[int, int, int, bool]]] = [[] for _ in range(nchunks)]
    total = 0
    for idx, addr, n in parts:
        if idx + n > reader.nr_pages:
            raise errors.ImageError(reader.path, None, f"pages {idx}..{idx + n} needed, the "
                                                       f"file holds {reader.nr_pages}")
        total += n
        while n:
            c = idx // CHUNK_PAGES
            k = min(n, (c + 1) * CHUNK_PAGES - idx)
            by_chunk[c].append((idx - c * CHUNK_PAGES, addr, k,
                                is_writable(addr, addr + k * PAGE)))
            idx += k
            addr += k * PAGE
            n -= k
    windows = [(c, min(CHUNK_PAGES, reader.nr_pages - c * CHUNK_PAGES), by_chunk[c])
               for c in range(nchunks)]

    def job(w):
        index, n, chunk_parts = w
        win = reader.map_chunk(index, n)
        try:
            digest = chunk_digest(win)
            vm = []
            with memoryview(win) as view:
                for off, addr, k, direct in chunk_parts:
                    if direct:
                        vm.append((addr, k * PAGE, off * PAGE))
                    else:
                        with kmem.ProcMem(pid, write=True) as mem:
                            mem.write(addr, view[off * PAGE:(off + k) * PAGE])
            if vm:
                kmem.vm_write(pid, win, vm)
        finally:
            _close_window(win)
        return n, digest

    _pipeline(windows, job, reader.account)
    return total


def protect_vmas(ctl: TaskCtl, entries: list) -> None:
    todo = [e for e in entries if e.kind not in (K.VDSO, K.VVAR, K.VVAR_VCLOCK, K.VSYSCALL)
            and initial_prot(e) != e.prot]
    got = ctl.batch([(sysno.mprotect, (e.start, e.end - e.start, e.prot)) for e in todo])
    for e, res in zip(todo, got):
        if res < 0:
            raise errors.from_errno(f"remote mprotect at {e.start:#x}", -res, ctl.pid)
