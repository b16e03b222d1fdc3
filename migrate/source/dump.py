"""The dump and pre-dump pipelines.

dump: freeze, collect, write the image, then kill or release.  Order matters
for the promise that a failed dump leaves the target as it was: everything
that can refuse (unsupported VMAs and fds, seccomp...) is checked before the
first remote syscall; the remote syscalls only read state and run with every
signal blocked; on any error the registers and mask are put back, the task is
detached, and the sink discards what was written.

pre-dump: memory only, while the task runs (DESIGN.md §3).  The first round
copies every page and starts a dirty tracker; each later round copies only
the pages written since the previous one and marks the others PE_IN_PARENT.
A dump with a parent does the same for its memory.  A page is left to the
parent only if the parent holds it, the tracker covered its VMA since then,
and the tracker says it was not written: anything else is copied.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import logging
import os
import signal
import time

from migrate import __version__, errors
from migrate.images import ImageDir
from migrate.images import lazy as imglazy
from migrate.images import pagemap as pm
from migrate.images._pb import inventory_pb2, mm_pb2, pagemap_pb2, pstree_pb2, stats_pb2
from migrate.kernel import memory as kmem
from migrate.kernel import proc, ptrace, remote, sysno
from migrate.resources import (files, fs, inet, memory, netlock, regs, seccomp, signals,
                               task, timers)
from migrate.resources.phases import Phases
from migrate.resources.taskctl import TaskCtl
from migrate.source import freeze as freezer
from migrate.source import lazy as srclazy
from migrate.source import tree as ptree
from migrate.source import tracker as trackers

log = logging.getLogger(__name__)

ALL_SIGNALS = (1 << 64) - 1
TIMER_READS = 5          # timers and pending signals read again while a timer fires


@dataclasses.dataclass
class DumpOptions:
    pid: int
    images_dir: str
    leave_running: bool = False
    leave_stopped: bool = False
    shell_job: bool = False
    prev_images_dir: str | None = None   # relative to images_dir, as in criu
    track_mem: bool = False
    tracker: str | None = None           # force "uffd" or "soft-dirty"
    # Post-copy (dump --lazy-pages): the root's lazy pages (images/lazy.py)
    # are left out of the page file, flagged PE_LAZY; once the image is
    # committed, their memory is kept by a clone of the root (source/lazy.py),
    # the tree is killed, and serve_lazy(keeper) returns once they are taken.
    serve_lazy: object = None
    tcp_established: bool = False        # dump established TCP connections (TCP_REPAIR)
    tcp_close: bool = False              # ... or keep them as closed sockets, no lock
    skip_in_flight: bool = False         # drop connections not accepted yet
    network_lock: str | None = None      # "nftables" (default), "iptables", "skip"
    # Live migration: called once the image is committed, the tree still
    # frozen (and locked).  If it returns, the dump goes on (kill, or -R/-s);
    # if it raises, the tree is put back running exactly as before and the
    # lock lifted: the destination failed, the source keeps the process.
    before_release: object = None
    on_freeze: object = None             # called right before the freeze (downtime starts)
    # Post-copy migration: the root's lazy pages are left out of the image
    # (PE_LAZY) like dump --lazy-pages, listed in ``lazy_out``; the caller
    # serves them from the frozen tree (in ``before_release``).
    leave_lazy: bool = False
    lazy_out: list | None = None
    # ... and with ``defer_lazy`` the root's lazy area is not even scanned
    # at the stop: all of it is flagged PE_LAZY (pagemap_head.lazy_map) and
    # a ``LazyMap`` is appended to ``lazy_map_out``, whose ``compute()``
    # (called later, the tree still frozen) says which of those pages are
    # new since the parent image, unchanged there, or zero (GET_MAP).
    defer_lazy: bool = False
    lazy_map_out: list | None = None

    def inet_opts(self) -> dict:
        return {"tcp_established": self.tcp_established, "tcp_close": self.tcp_close,
                "skip_in_flight": self.skip_in_flight}


@dataclasses.dataclass
class DumpStats:
    kind: str = "dump"
    freezing_us: int = 0
    frozen_us: int = 0
    memdump_us: int = 0
    scan_us: int = 0
    pages_written: int = 0
    pages_in_parent: int = 0
    remote_syscalls: int = 0
    total_us: int = 0
    peak_rss_kb: int = 0
    tracker: str = ""
    tcp_connections: int = 0
    netlock_us: int = 0
    pages_shared: int = 0        # pages children share copy-on-write with their parent

    def to_pb(self):
        return stats_pb2.stats_entry(**dataclasses.asdict(self))


def _us(t0: float, t1: float) -> int:
    return int((t1 - t0) * 1e6)


# --------------------------------------------------------------------------
# incremental memory


@dataclasses.dataclass
class Parent:
    rel: str
    cover: list[tuple[int, int]]     # pages the parent chain holds


def _open_parent(opts: DumpOptions, pid: int, start_time: int, root: int) -> Parent | None:
    """The parent image's pages of ``pid``: None without --prev-images-dir,
    or for a process the parent image does not have (new since: all copied)."""
    if not opts.prev_images_dir:
        return None
    path = os.path.normpath(os.path.join(opts.images_dir, opts.prev_images_dir))
    d = ImageDir.open(path)
    inv = d.inventory
    if pid == root:
        if inv.root_pid != pid or (inv.root_start_time and inv.root_start_time != start_time):
            raise errors.DumpError(f"parent image {path} is of another process (pid "
                                   f"{inv.root_pid}), not of pid {pid}")
    else:
        mine = [e for e in d.read_image("pstree.img") if e.pid == pid]
        if not mine or (mine[0].start_time and mine[0].start_time != start_time) or \
                not d.has(f"pagemap-{pid}.img"):
            return None          # not in the parent image, or another process then
    # (pm.Level: computed once per image where the caches are on, as in a
    # migration's worker, whose next round or last dump reads it again)
    level = pm.level_of(d.read_image(f"pagemap-{pid}.img"))
    return Parent(opts.prev_images_dir, level.cover)


def _get_tracker(opts: DumpOptions, pid: int, start_time: int, frozen_ctl: TaskCtl | None,
                 want: bool):
    """The tracker for this round: attached to a holder, or created (needs a
    frozen task: ``frozen_ctl``), or None (no tracking: copy everything)."""
    if not want:
        return None
    kind = trackers.choose(opts.tracker)
    if kind == "uffd":
        t = trackers.UffdTracker.attach(pid, start_time)
        if t is None and frozen_ctl is not None:
            t = trackers.UffdTracker.create(frozen_ctl, pid, start_time)
        return t
    if kind == "soft-dirty":
        return trackers.SoftDirtyTracker(pid, fresh=False)
    log.warning("pid %d: no dirty-page tracker on this kernel: every round copies all", pid)
    return None


def _plan_memory(pid: int, smaps: list, entries: list, parent: Parent | None, tracker,
                 stats: DumpStats, untracked: set[int] | None = None, tolerant: bool = False
                 ) -> tuple[list, list[tuple[int, int]]]:
    """(runs to copy, ranges left IN_PARENT) of this image.  ``untracked``:
    VMAs registered this round (None: register now; the task is frozen)."""
    shared = memory.shared_starts(smaps)        # read without unsharing them
    if tracker is None:
        return memory.scan_pages(pid, entries, tolerant, shared=shared).runs, []
    t0 = time.perf_counter()
    if untracked is None:
        untracked = {v.start for v in tracker.register(smaps)}
    trackable = [v for v in smaps if not v.is_special and trackers.trackable(v)]
    dirty: list[tuple[int, int]] = [(v.start, v.end) for v in smaps if not v.is_special
                                    and not trackers.trackable(v)]
    dirty += [(v.start, v.end) for v in trackable if v.start in untracked]
    if tracker.kind == "uffd":
        # Data pages and written pages in one walk, which also re-protects.
        scan = memory.scan_pages(pid, entries, tolerant, {v.start for v in trackable}, shared)
        dirty += scan.written + scan.failed
    else:
        scan = memory.scan_pages(pid, entries, tolerant, shared=shared)
        with kmem.PagemapScanner(pid) as sc:
            for v in trackable:
                w = tracker.written(sc, v)
                dirty.extend([(v.start, v.end)] if w is None else w)
    stats.scan_us = _us(t0, time.perf_counter())
    runs = scan.runs
    if parent is None or tracker.fresh:
        return runs, []
    data = pm.normalize((r.addr, r.addr + r.nr_pages * memory.PAGE) for r in runs)
    copy = pm.intersect(data, pm.union(pm.normalize(dirty), pm.subtract(data, parent.cover)))
    return memory.split_runs(runs, copy), pm.subtract(data, copy)


class LazyMap:
    """The root's lazy area as the final dump of a post-copy migration left
    it (whole, unscanned), and how to say later which of its pages are
    REMOTE (written since the parent image, or not in it), LOCAL (as the
    parent chain holds them) or ZERO: the scan ``_plan_memory`` does at a
    stop, done after the stop (the tree frozen until every page is taken).
    With a ``PreMap`` made just before the freeze, only what changed since
    is scanned for (a few regions, not tens of thousands)."""

    def __init__(self, pid: int, area: list[tuple[int, int]], smaps: list, entries: list,
                 parent: Parent | None, tracker, untracked: set[int],
                 pre: "PreMap | None" = None) -> None:
        self.pid = pid
        self.area = area
        self.smaps, self.entries = smaps, entries
        self.parent, self.tracker, self.untracked = parent, tracker, untracked
        self.pre = pre

    def compute(self) -> list[tuple[int, int, int]]:
        """(vaddr, nr_pages, kind) runs covering ``area`` in address order,
        kind MAP_REMOTE / MAP_LOCAL / MAP_ZERO (pageserver.protocol).

        What ``_plan_memory`` decides at a stop, in one pass over one
        PAGEMAP_SCAN per VMA (no re-protection: the tree dies after): a page
        with no data (not present nor swapped, or the shared zero page) is
        ZERO; one written since the parent image (or in a VMA not tracked
        before, or tracked but unscannable), or that the parent chain does
        not hold, is REMOTE; the rest LOCAL."""
        t0 = time.perf_counter()
        cover = self.parent.cover if self.parent is not None and self.tracker is not None \
            and not self.tracker.fresh else []
        tracked = {v.start for v in self.smaps if not v.is_special
                   and trackers.trackable(v) and v.start not in self.untracked} \
            if self.tracker is not None else set()
        uffd = self.tracker is not None and self.tracker.kind == "uffd"
        pre = self.pre
        how = "full"
        runs = None
        if pre is not None and uffd and pre.fits(self.entries, tracked, cover):
            runs = pre.finish(self.pid, self.entries)
            how = "since the pre-scan"
        if runs is None:
            out = _lazy_runs(self.pid, self.entries, tracked, uffd, cover,
                             pre.written if pre is not None else [], self._written)[0]
            runs = [(a, (b - a) // memory.PAGE, k) for a, b, k in out]
        # the area: the lazy VMAs but the eager pages
        drop = pm.subtract(pm.normalize((e.start, e.end) for e in self.entries), self.area)
        if drop:
            runs = _overlay(runs, [(a, b, None) for a, b in drop])
        n = {MAP_REMOTE: 0, MAP_LOCAL: 0, MAP_ZERO: 0}
        for _, c, k in runs:
            n[k] += c
        log.info("pid %d: lazy map (%s): %d pages remote, %d local, %d zero (%d runs) in "
                 "%.1f ms", self.pid, how, n[MAP_REMOTE], n[MAP_LOCAL], n[MAP_ZERO],
                 len(runs), (time.perf_counter() - t0) * 1e3)
        return runs

    def _written(self, sc, e) -> list[tuple[int, int]] | None:
        """Soft-dirty: the VMA's pages written since the last round."""
        if self.tracker is None or self.tracker.kind == "uffd":
            return None
        v = next(v for v in self.smaps if v.start == e.start)
        w = self.tracker.written(sc, v)
        return [(e.start, e.end)] if w is None else pm.normalize(w)


_PRESENT = kmem.PAGE_IS_PRESENT | kmem.PAGE_IS_SWAPPED


def _lazy_runs(pid: int, entries: list, tracked: set[int], uffd: bool, cover: list,
               pre: list[tuple[int, int]], written_of=None, flags: int = 0
               ) -> tuple[list[list[int]], list[tuple[int, int]], list[tuple[int, int]]]:
    """([vaddr, end, kind] runs over ``entries``, the data ranges, the ranges
    seen written): one PAGEMAP_SCAN per VMA and one pass over its regions.
    ``pre``: pages known written before (a pre-scan re-protected them);
    ``flags``: PM_SCAN_WP_MATCHING for a pre-scan of a running process;
    ``written_of(scanner, entry)``: soft-dirty's written ranges."""
    out: list[list[int]] = []
    data: list[tuple[int, int]] = []
    seen: list[tuple[int, int]] = []

    def put(a: int, b: int, kind: int) -> None:
        if out and out[-1][1] == a and out[-1][2] == kind:
            out[-1][1] = b
        else:
            out.append([a, b, kind])

    ci = wi = 0
    with kmem.PagemapScanner(pid) as sc:
        for e in entries:
            lo, hi = e.start, e.end
            mine = e.start in tracked
            written_known = mine and uffd
            try:
                regions = sc.scan(lo, hi, anyof=_PRESENT,
                                  return_mask=_PRESENT | kmem.PAGE_IS_PFNZERO |
                                  kmem.PAGE_IS_WRITTEN,
                                  flags=(kmem.PM_SCAN_CHECK_WPASYNC | flags) if written_known
                                  else 0)
            except errors.KernelError as err:
                log.info("pid %d: vma %#x-%#x: lazy map scan failed (%s): all remote",
                         pid, lo, hi, err)
                put(lo, hi, MAP_REMOTE)
                seen.append((lo, hi))          # (what it re-protected is not known)
                continue
            written = written_of(sc, e) if mine and not uffd and written_of else None
            pos = lo
            for r in regions:
                a, b = r.start, r.end
                if a > pos:
                    put(pos, a, MAP_ZERO)
                if r.categories & kmem.PAGE_IS_PFNZERO:
                    put(a, b, MAP_ZERO)
                    pos = b
                    continue
                if data and data[-1][1] == a:
                    data[-1] = (data[-1][0], b)
                else:
                    data.append((a, b))
                if written_known and r.categories & kmem.PAGE_IS_WRITTEN:
                    seen.append((a, b))
                    put(a, b, MAP_REMOTE)
                elif not mine:
                    put(a, b, MAP_REMOTE)
                else:
                    # LOCAL where the chain holds it and it is clean (not
                    # written before the pre-scan either; soft-dirty: clean)
                    while ci < len(cover) and cover[ci][1] <= a:
                        ci += 1
                    j = ci
                    keep = []
                    while j < len(cover) and cover[j][0] < b:
                        keep.append((max(a, cover[j][0]), min(b, cover[j][1])))
                        j += 1
                    if written is not None:
                        keep = pm.subtract(keep, written)
                    if pre:
                        while wi < len(pre) and pre[wi][1] <= a:
                            wi += 1
                        j = wi
                        while j < len(pre) and pre[j][0] < b:
                            j += 1
                        if j > wi:
                            keep = pm.subtract(keep, pre[wi:j])
                    x = a
                    for s, t in keep:
                        if s > x:
                            put(x, s, MAP_REMOTE)
                        put(s, t, MAP_LOCAL)
                        x = t
                    if x < b:
                        put(x, b, MAP_REMOTE)
                pos = b
            if pos < hi:
                put(pos, hi, MAP_ZERO)
    return out, data, seen


def _overlay(runs: list[tuple[int, int, int]], over: list[tuple[int, int, int | None]]
             ) -> list[tuple[int, int, int]]:
    """``runs`` ((vaddr, nr_pages, kind), sorted) with the ranges ``over``
    ((start, end, kind), sorted, disjoint) given that kind where runs
    are, or cut out (kind None).  Each range costs a bisect and a splice,
    not a pass over the runs: there are few, and the runs are many."""
    runs = list(runs)
    starts = [r[0] for r in runs]
    page = memory.PAGE
    for s, e, k in reversed(over):           # from the top: the indices below stay
        i = max(bisect.bisect_right(starts, s) - 1, 0)
        j = bisect.bisect_left(starts, e)
        new = []
        for a, n, kind in runs[i:j]:
            b = a + n * page
            if b <= s or a >= e:
                new.append((a, n, kind))
                continue
            if a < s:
                new.append((a, (s - a) // page, kind))
            x, y = max(a, s), min(b, e)
            if k is not None:
                new.append((x, (y - x) // page, k))
            if b > e:
                new.append((e, (b - e) // page, kind))
        # neighbours of one kind merged again
        merged = []
        for r in new:
            if merged and merged[-1][2] == r[2] and \
                    merged[-1][0] + merged[-1][1] * page == r[0]:
                merged[-1] = (merged[-1][0], merged[-1][1] + r[1], r[2])
            else:
                merged.append(r)
        runs[i:j] = merged
        starts[i:j] = [r[0] for r in merged]
    return runs


class PreMap:
    """Post-copy, just before the freeze: the lazy map as if the process
    were frozen now, its written pages write-protected again by the same
    walk.  After the freeze (``finish``), one walk that finds few regions
    says what changed since: pages written since are REMOTE, pages that
    came are REMOTE, pages that went are ZERO.  If the lazy VMAs or their
    tracking changed meanwhile, the map is made whole after the freeze, the
    pages this walk saw written (``written``) still dirty.  Pages that moved
    (mremap) are in a VMA the move unregistered: untracked, all REMOTE."""

    def __init__(self, pid: int, smaps: list, parent: Parent | None) -> None:
        self.pid = pid
        entries = memory.dump_vmas(pid, smaps, tolerant=True)
        lazy = imglazy.lazy_vmas(entries)
        self.entries = [e for e in entries if pm.intersect([(e.start, e.end)], lazy)]
        self.key = [(e.start, e.end) for e in self.entries]
        by_start = {v.start: v for v in smaps}
        self.tracked = {e.start for e in self.entries
                        if "uw" in by_start[e.start].vmflags}
        self.cover = parent.cover if parent is not None else []
        out, self.data, seen = _lazy_runs(pid, self.entries, self.tracked, True, self.cover,
                                          [], flags=kmem.PM_SCAN_WP_MATCHING)
        self.written = pm.normalize(seen)
        self.runs = [(a, (b - a) // memory.PAGE, k) for a, b, k in out]

    def fits(self, entries: list, tracked: set[int], cover: list) -> bool:
        return ([(e.start, e.end) for e in entries] == self.key and cover == self.cover
                and {e.start for e in entries} & tracked == self.tracked)

    def finish(self, pid: int, entries: list) -> list[tuple[int, int, int]] | None:
        """The map now (the process frozen), or None if a walk failed."""
        _, data, seen = _lazy_runs(pid, entries, self.tracked, True, [], [])
        data = pm.normalize(data)
        came = pm.subtract(data, self.data)
        went = pm.subtract(self.data, data)
        over = [(a, b, MAP_REMOTE) for a, b in pm.union(pm.normalize(seen), came)]
        over += [(a, b, MAP_ZERO) for a, b in went]
        over.sort()
        return _overlay(self.runs, over)


MAP_REMOTE, MAP_LOCAL, MAP_ZERO = 1, 2, 3       # = pageserver.protocol's run kinds


def _defer_lazy(d, parent: Parent | None, tracker, stats: DumpStats,
                pre: PreMap | None = None
                ) -> tuple[list, list[tuple[int, int]], list[tuple[int, int]], LazyMap]:
    """The root at a post-copy stop: (runs to copy, ranges IN_PARENT,
    lazy area, its LazyMap).  Only the VMAs outside the lazy area and the
    eager pages inside it are scanned now."""
    vmas = imglazy.lazy_vmas(d.vma_entries)
    eager = imglazy.eager_ranges(d.core.threads)
    area = pm.subtract(vmas, eager)
    inside = {e.start for e in d.vma_entries if pm.intersect([(e.start, e.end)], vmas)}
    entries = [e for e in d.vma_entries if e.start not in inside]
    lazy_entries = [e for e in d.vma_entries if e.start in inside]
    smaps = [v for v in d.vmas if v.start not in inside]
    # VMAs not tracked before this stop: every page of them is new.  The
    # pre-scan re-protected what it saw written, by address; pages that
    # moved since (mremap) are in a VMA the move unregistered (the tracker
    # takes no UFFD_FEATURE_EVENT_REMAP), so they are among these.
    untracked = {v.start for v in tracker.register(d.vmas)} if tracker else set()
    runs, in_parent = _plan_memory(d.pid, smaps, entries, parent if tracker else None,
                                   tracker, stats, untracked=untracked)
    # the eager pages inside the area: copied whole (a few pages)
    shared = memory.shared_starts(d.vmas)
    pieces, pieces_shared = [], set()
    for v in lazy_entries:
        for s, e in pm.intersect([(v.start, v.end)], eager):
            piece = mm_pb2.vma_entry()
            piece.CopyFrom(v)
            piece.start, piece.end = s, e
            pieces.append(piece)
            if v.start in shared:
                pieces_shared.add(s)
    if pieces:
        runs = sorted(runs + memory.scan_pages(d.pid, pieces, shared=pieces_shared).runs,
                      key=lambda r: r.addr)
    lazy_smaps = [v for v in d.vmas if v.start in inside]
    return runs, in_parent, area, LazyMap(d.pid, area, lazy_smaps, lazy_entries, parent,
                                          tracker, untracked, pre)


def _leave_lazy(d, runs) -> tuple[list, list[tuple[int, int]]]:
    """(runs still to copy, lazy ranges) for dump --lazy-pages."""
    data = pm.normalize((r.addr, r.addr + r.nr_pages * memory.PAGE) for r in runs)
    lazy = imglazy.lazy_ranges(data, d.vma_entries, d.core.threads)
    return memory.split_runs(runs, pm.subtract(data, lazy)), lazy


def _write_memory(pid: int, images, runs, in_parent, stats: DumpStats,
                  tolerant: bool, lazy: list[tuple[int, int]] = (),
                  lazy_map: bool = False) -> None:
    t0 = time.perf_counter()
    pw = images.pages_writer(pid)
    try:
        present = memory.write_pages(pid, runs, pw, tolerant=tolerant)
    except BaseException:
        pw.abort()
        raise
    images.add_pages(pid, pw)
    stats.pages_written += pw.nr_pages
    stats.pages_in_parent += pm.pages(in_parent)
    flags = [(e.vaddr, e.vaddr + e.nr_pages * memory.PAGE, pm.PE_PRESENT) for e in present]
    flags += [(s, e, pm.PE_IN_PARENT) for s, e in in_parent]
    flags += [(s, e, pm.PE_LAZY) for s, e in lazy]
    # PRESENT entries must stay in page-file order (address order here).
    entries = pm.to_entries(flags)
    images.write_image(f"pagemap-{pid}.img",
                       [pagemap_pb2.pagemap_head(pid=pid, nr_pages=pw.nr_pages,
                                                 lazy_map=lazy_map),
                        *entries])
    stats.memdump_us += _us(t0, time.perf_counter())


# --------------------------------------------------------------------------
# pre-dump


def _live_tree(root: int) -> list[tuple[int, int]]:
    """(pid, ppid) of ``root`` and its live descendants, parents first.  The
    tasks run: a process that comes or goes meanwhile is seen or not."""
    out = [(root, 0)]
    i = 0
    while i < len(out):
        pid = out[i][0]
        i += 1
        try:
            kids = proc.list_children(pid)
        except errors.NoSuchProcess:
            continue
        for c in kids:
            try:
                if proc.read_stat(c).state in ("Z", "X"):
                    continue
            except errors.NoSuchProcess:
                continue
            out.append((c, pid))
    return out


def pre_dump(opts: DumpOptions, sink=None) -> DumpStats:
    """Memory only, the tasks running; starts or continues dirty tracking,
    for ``opts.pid`` and each of its descendants."""
    t_start = time.perf_counter()
    stats = DumpStats(kind="pre-dump")
    root = opts.pid
    st = freezer.check_target(root)
    images = sink if sink is not None else ImageDir.create(opts.images_dir)
    started: list = []          # trackers this round started (stopped if it fails)
    entries = []
    kinds = set()
    try:
        for pid, ppid in _live_tree(root):
            try:
                pst = st if pid == root else freezer.check_target(pid)
                parent = _open_parent(opts, pid, pst.start_time, root)
                kinds.add(_pre_dump_one(opts, pid, pst, parent, images, stats, started))
            except (errors.NoSuchProcess, errors.ProcessStateError):
                if pid == root:
                    raise
                log.info("pid %d: gone during the pre-dump, left out", pid)
                continue
            entries.append(pstree_pb2.pstree_entry(
                pid=pid, ppid=ppid, pgid=pst.pgrp, sid=pst.session,
                threads=proc.list_threads(pid), start_time=pst.start_time))
        images.write_image("pstree.img", entries)
        stats.tracker = ",".join(sorted(k for k in kinds if k))
        stats.total_us = _us(t_start, time.perf_counter())
        stats.peak_rss_kb = proc.peak_rss_kb()
        images.write_image("stats-dump.img", [stats.to_pb()])
        if opts.prev_images_dir:
            images.set_parent(opts.prev_images_dir)
        images.commit(inventory_pb2.inventory_entry(
            tool_version=__version__, kernel=os.uname().release, arch=os.uname().machine,
            kind=inventory_pb2.PRE_DUMP, root_pid=root, root_start_time=st.start_time,
            shell_job=opts.shell_job, parent=opts.prev_images_dir or "",
            tracker=stats.tracker))
    except BaseException as exc:
        images.discard()
        for t in started:
            t.stop()        # tracking started by this failed round: end it too
        if isinstance(exc, errors.MigrateError) and not isinstance(exc, errors.DumpError):
            raise errors.DumpError(f"pre-dump of pid {root} failed, the processes were left "
                                   f"running as they were: {exc}") from exc
        raise
    log.info("pid %d: pre-dump of %d process%s to %s: %d pages written, %d in parent, "
             "frozen %.2f ms", root, len(entries), "es" if len(entries) > 1 else "",
             opts.images_dir, stats.pages_written, stats.pages_in_parent,
             stats.frozen_us / 1000)
    return stats


def _pre_dump_one(opts: DumpOptions, pid: int, st, parent: Parent | None, images,
                  stats: DumpStats, started: list) -> str:
    """One process's memory; returns the tracker kind used ("" for none)."""
    kind = trackers.choose(opts.tracker)
    tracker = trackers.UffdTracker.attach(pid, st.start_time) if kind == "uffd" else None
    fr = None
    ctl = None
    untracked: set[int] | None = set()
    try:
        smaps = proc.read_smaps(pid)
        # Freeze only to make the uffd inside the task, to register VMAs (a
        # registration racing with the task's own mmap/munmap could split one
        # of its mappings), or for a whole soft-dirty round (scan and clear
        # are not atomic).  The scan, the copy and the holder start run with
        # the task running.
        if kind == "soft-dirty" or (kind == "uffd" and (
                tracker is None or any(trackers.trackable(v) and "uw" not in v.vmflags
                                       for v in smaps))):
            t0 = time.perf_counter()
            fr = freezer.freeze(pid)
            t_frozen = time.perf_counter()
            stats.freezing_us += _us(t0, t_frozen)
            smaps = proc.read_smaps(pid)
            if kind == "uffd":
                if tracker is None:
                    seccomp.suspend(pid, fr.tids, ptrace.PTRACE_O_TRACESYSGOOD)  # as seized
                    ctl = _remote(pid, fr, smaps)
                    tracker = trackers.UffdTracker.create(ctl, pid, st.start_time)
                    _end_remote(pid, ctl)
                    ctl = None
                untracked = {v.start for v in tracker.register(smaps)}
                freezer.thaw(fr)
                stats.frozen_us += _us(t_frozen, time.perf_counter())
                fr = None
                if tracker.fresh:
                    started.append(tracker)
                    tracker.hold()
            else:
                tracker = trackers.SoftDirtyTracker(pid, fresh=parent is None)
                untracked = None
        entries = memory.dump_vmas(pid, smaps, tolerant=fr is None)
        runs, in_parent = _plan_memory(pid, smaps, entries, parent, tracker, stats,
                                       untracked, tolerant=fr is None)
        if fr is not None and kind == "soft-dirty":
            tracker.clear()
        if fr is None and tracker is None:
            log.warning("pid %d: no dirty-page tracker: this pre-dump copies all", pid)
        _write_memory(pid, images, runs, in_parent, stats, tolerant=fr is None)
        if fr is not None:
            freezer.thaw(fr)
            stats.frozen_us += _us(t_frozen, time.perf_counter())
            fr = None
        return tracker.kind if tracker else ""
    except BaseException:
        if fr is not None:
            try:
                if ctl is not None:
                    try:
                        ctl.unmap_scratch()
                    finally:
                        ctl.remote.finish()
                        ptrace.set_sigmask(pid, ctl.saved_mask)
            finally:
                freezer.thaw(fr)
        if tracker is not None and tracker.fresh and tracker not in started:
            tracker.stop()
        raise
    finally:
        if tracker is not None:
            tracker.close()


# --------------------------------------------------------------------------
# dump


@dataclasses.dataclass
class _Open:
    """The process whose remote-syscall session is open, for a rollback."""
    fr: freezer.Frozen | None = None
    ctl: TaskCtl | None = None


def dump(opts: DumpOptions, sink=None) -> DumpStats:
    """Dump ``opts.pid`` and its descendants.  ``sink`` receives the image
    (an ImageDir by default, or a page-server client; see images.ImageDir)."""
    t_start = time.perf_counter()
    stats = DumpStats()
    pid = opts.pid
    st = freezer.check_target(pid)
    parent = _open_parent(opts, pid, st.start_time, pid)
    images = sink if sink is not None else ImageDir.create(opts.images_dir)
    # An incremental dump is the short stop of a live migration: read the
    # VMAs with their flags before freezing (smaps walks every page table),
    # and only check the layout once frozen.
    early = proc.read_smaps(pid) if parent is not None else None
    try:
        _refuse_connections(opts, ptree.pids(pid))
        pre = None
        if opts.defer_lazy and early is not None:
            pre = PreMap(pid, early, parent)
    except BaseException:
        netlock.disarm(pid)
        images.discard()
        raise
    # No cyclic GC from the freeze to the commit: a full collection walks
    # every object (a PreMap holds tens of thousands) in the downtime.
    gc_was = gc.isenabled()
    if opts.before_release is not None:
        inner = opts.before_release

        def before_release(stats: DumpStats) -> None:
            if gc_was:
                gc.enable()
            inner(stats)
        opts = dataclasses.replace(opts, before_release=before_release)
    gc.disable()
    try:
        return _dump_frozen(opts, sink, stats, t_start, st, parent, images, early, pre)
    finally:
        netlock.disarm(pid)           # armed and never taken (no connection once frozen)
        if gc_was:
            gc.enable()


def _dump_frozen(opts: DumpOptions, sink, stats: DumpStats, t_start: float, st, parent,
                 images, early, pre) -> DumpStats:
    pid = opts.pid
    t0 = time.perf_counter()
    if opts.on_freeze is not None:
        opts.on_freeze()
    try:
        tr = ptree.freeze_tree(pid)
    except BaseException:
        images.discard()
        raise
    t_frozen = time.perf_counter()
    stats.freezing_us = _us(t0, t_frozen)
    opened = _Open()
    used: list = []
    lazy_out: list = opts.lazy_out if opts.lazy_out is not None else []
    lock = None
    try:
        if opts.serve_lazy is not None and (opts.leave_running or opts.leave_stopped
                                            or sink is not None):
            raise errors.DumpError("--lazy-pages: not with -R, -s or --page-server")
        lock = _lock_network(opts, tr, stats)
        used = _collect_and_write(opts, tr, images, stats, st.start_time, early, opened,
                                  lazy_out, lock, (st.start_time, parent), pre)
    except BaseException as exc:
        try:
            _rollback(tr, opened, images)
        finally:
            if lock is not None:
                lock.unlock()       # whatever failed, our table goes
        if isinstance(exc, errors.MigrateError) and not isinstance(exc, errors.DumpError):
            what = "process was" if len(tr.procs) == 1 else "processes were"
            raise errors.DumpError(f"dump of pid {pid} failed, the {what} left running "
                                   f"as before: {exc}") from exc
        raise
    keeper = None
    if opts.serve_lazy is not None:
        try:
            keeper = srclazy.keep_memory(tr.root.pid, lazy_out)
        except BaseException:
            ptree.kill(tr)
            ptree.reap_killed(tr)
            raise
        ptree.kill(tr)
    elif opts.leave_running or opts.leave_stopped:
        ptree.thaw(tr, leave_stopped=opts.leave_stopped)
        if lock is not None:
            lock.unlock()
        if not opts.track_mem and not parent:
            for t in used:
                t.stop()
    else:
        phase = Phases(pid)
        ptree.kill(tr)      # the holders, if any, exit with their tasks
        phase("kill")
        if lock is not None:
            log.info("network lock %s stays until the restore lifts it", lock.name)
    t_end = time.perf_counter()
    if not (opts.leave_running or opts.leave_stopped):
        ptree.reap_killed(tr)
    for t in used:
        t.close()
    stats.frozen_us = _us(t_frozen, t_end)
    stats.total_us = _us(t_start, t_end)
    stats.peak_rss_kb = proc.peak_rss_kb()
    log.info("pid %d: dumped to %s, %d process%s, %d pages (%d in parent), frozen %.1f ms",
             pid, opts.images_dir, len(tr.procs), "es" if len(tr.procs) > 1 else "",
             stats.pages_written, stats.pages_in_parent, stats.frozen_us / 1000)
    if keeper is not None:
        try:
            opts.serve_lazy(keeper)         # until the destination has every page
        finally:
            keeper.release()
    return stats


def _refuse_connections(opts: DumpOptions, pids: list[int]) -> None:
    """Before anything is touched: established TCP connections need
    --tcp-established (or --tcp-close); with it, the lock's backend is
    made ready (netlock.prepare) outside the frozen time."""
    if opts.tcp_established and not opts.tcp_close:
        netlock.prepare(opts.network_lock)
        if inet.tree_connections(pids):
            # its table hooked now: once frozen, locking is adding the
            # connections (the dump's end removes it whatever happens)
            netlock.arm(opts.pid, opts.network_lock)
    if opts.tcp_established or opts.tcp_close:
        return
    conns = inet.tree_connections(pids)
    if conns:
        raise errors.UnsupportedResource(
            opts.pid, "tcp", f"{len(conns)} TCP connection(s): "
            f"{', '.join(c.describe() for c in conns[:8])}"
            f"{' ...' if len(conns) > 8 else ''}: dump with --tcp-established "
            "(or --tcp-close)")


def _lock_network(opts: DumpOptions, tr: ptree.Tree, stats: DumpStats):
    """Once the tree is frozen, before any socket is read: drop the packets
    of its established connections (their queues then stay still)."""
    if not opts.tcp_established or opts.tcp_close:
        return None
    conns = [c for c in inet.tree_connections([p.pid for p in tr.live])
             if c.state == inet.tr.TCP_ESTABLISHED]
    lk = netlock.lock(tr.root.pid, [netlock.Conn.of(c.family, c.local[0], c.local[1],
                                                 c.remote[0], c.remote[1]) for c in conns],
                      opts.network_lock)
    if lk is not None:
        stats.netlock_us = lk.set_us
    return lk


def _remote(pid: int, fr: freezer.Frozen, vmas=None, batch: bool = False) -> TaskCtl:
    """Remote syscalls in the frozen task, every signal blocked meanwhile.
    ``batch``: with the batch code in the scratch area (TaskCtl.batch), for
    a task with no SIGCONT queued (``_sigcont_queued``)."""
    vmas = vmas if vmas is not None else proc.read_maps(pid)
    rt = remote.RemoteTask(pid, remote.find_syscall_insn(pid, vmas), fr.regs.get(pid))
    ctl = TaskCtl(rt)
    ctl.saved_mask = ptrace.get_sigmask(pid)
    ctl.open_threads = []
    ctl.thread_calls = 0
    ptrace.set_sigmask(pid, ALL_SIGNALS)
    try:
        ctl.map_scratch(code=batch)
    except BaseException:
        try:
            rt.finish()
        finally:
            ptrace.set_sigmask(pid, ctl.saved_mask)
        raise
    return ctl


def _remote_thread(leader: TaskCtl, tid: int, fr: freezer.Frozen, mask: int) -> TaskCtl:
    """Remote syscalls in another thread, sharing the leader's scratch area
    and batch code (one address space); ``mask``: its blocked signals now.
    The leader's ctl remembers it for a rollback."""
    ctl = leader.thread(remote.RemoteTask(tid, leader.remote.gadget, fr.regs.get(tid)))
    ctl.saved_mask = mask
    ptrace.set_sigmask(tid, ALL_SIGNALS)
    leader.open_threads.append(ctl)
    return ctl


SIGCONT_BIT = 1 << (signal.SIGCONT - 1)


def _sigcont_queued(statuses: dict[int, dict[str, str]]) -> bool:
    """Is a SIGCONT queued for the process or one of its threads?  The
    closing SIGSTOP of a remote batch would drop it (remote.RemoteTask.batch)."""
    return any((int(st.get("ShdPnd", "0"), 16) | int(st.get("SigPnd", "0"), 16))
               & SIGCONT_BIT for st in statuses.values())


def _dump_tid_address(q, t) -> None:
    """``t.clear_child_tid`` (set_tid_address(2)), once ``q`` (in that thread) ran."""
    addr = q.out(8)
    q.add(sysno.prctl, 40, addr, 0, 0, 0, what="prctl(PR_GET_TID_ADDRESS)",
          then=lambda _: setattr(t, "clear_child_tid",
                                 int.from_bytes(q.read(addr, 8), "little")))


def _end_remote_thread(leader: TaskCtl, ctl: TaskCtl) -> None:
    ctl.remote.finish()
    ptrace.set_sigmask(ctl.pid, ctl.saved_mask)
    leader.open_threads.remove(ctl)
    leader.thread_calls += ctl.remote.calls


def _end_remote(pid: int, ctl: TaskCtl) -> None:
    ctl.unmap_scratch()
    ctl.remote.finish()
    ptrace.set_sigmask(pid, ctl.saved_mask)


def _rollback(tr: ptree.Tree, opened: _Open, images) -> None:
    """Leave the tree exactly as it was: scratch unmapped, regs, mask, detached."""
    try:
        ctl, fr = opened.ctl, opened.fr
        if ctl is not None:
            try:
                for tctl in list(getattr(ctl, "open_threads", [])):
                    try:
                        _end_remote_thread(ctl, tctl)
                    except errors.KernelError as e:
                        log.error("pid %d: could not put thread %d back: %s", fr.pid,
                                  tctl.pid, e)
                ctl.unmap_scratch()
            finally:
                ctl.remote.finish()
                ptrace.set_sigmask(fr.pid, ctl.saved_mask)
    finally:
        ptree.thaw(tr)
        images.discard()


def _frozen_vmas(pid: int, early: list | None) -> list:
    """The VMAs of the frozen task.  ``early``: smaps read before the freeze,
    used if /proc/PID/maps shows the same layout.  VmFlags changed by a
    madvise() over a whole VMA in between would be missed (they are hints:
    THP, dump and fork behaviour); everything the pages depend on shows in
    the layout."""
    if early is None:
        return proc.read_smaps(pid)
    def key(v):
        return (v.start, v.end, v.perms, v.pgoff, v.dev, v.inode, v.path, v.deleted)
    if [key(v) for v in proc.read_maps(pid)] == [key(v) for v in early]:
        return early
    return proc.read_smaps(pid)


@dataclasses.dataclass
class _ProcDump:
    """What the dump collected of one live process."""
    pid: int
    vmas: list
    vma_entries: list
    core: object
    mm: object
    fdinfos: list
    fs: object
    remote_syscalls: int


def _collect(opts: DumpOptions, fr: freezer.Frozen, table: files.FileTable,
             opened: _Open, early: list | None, want_tracking: bool, st: proc.Stat):
    """Everything of one frozen process but its pages; (_ProcDump, tracker).
    ``st``: its /proc/PID/stat, read once frozen."""
    pid = fr.pid
    start_time = st.start_time
    phase = Phases(pid)
    # 1. Everything that can refuse, before any change to the task.
    vmas = _frozen_vmas(pid, early)
    vma_entries = memory.dump_vmas(pid, vmas)
    phase("vmas", f"{len(vmas)} VMAs")
    fdinfos = table.dump_fds(pid)
    phase("fds", f"{len(fdinfos)} fds")
    fs_entry = fs.dump(pid)
    exe = proc.readlink(pid, "exe")
    if exe.endswith(" (deleted)"):
        raise errors.UnsupportedResource(pid, "exe", f"executable {exe} was removed")
    # Each thread's status, read once: name, credentials, seccomp, queued signals.
    raw = {tid: proc.read_text(pid, "status" if tid == pid else f"task/{tid}/status")
           for tid in fr.tids}
    statuses = {tid: proc.parse_status(text) for tid, text in raw.items()}
    status = statuses[pid]
    found_timers = task.check_unsupported(pid, status, fr.tids, statuses)
    seccomp_state = seccomp.dump(pid, fr.tids, ptrace.PTRACE_O_TRACESYSGOOD,  # as seized
                                 statuses)
    threads = []
    for tid in fr.tids:                 # the leader first
        t = regs.dump_thread(pid, tid, fr.regs[tid])
        t.robust_list, t.robust_list_len = _robust_list(tid)
        # "Name:\t" and the comm, where only a \\ makes it differ (an escape)
        name = raw[tid].partition("\n")[0]
        t.comm = name[6:] if name.startswith("Name:\t") and "\\" not in name else \
            proc.read_text(pid, f"task/{tid}/comm").rstrip("\n")
        t.sched_policy, t.sched_priority, t.nice = task.dump_sched(tid)
        threads.append(t)
    phase("task and threads", f"{len(threads)} threads")

    # 2. Remote syscalls: read-only queries, every signal blocked meanwhile;
    # in one batch per thread (unless a SIGCONT is queued, see _remote).
    opened.fr = fr
    opened.ctl = ctl = _remote(pid, fr, vmas, batch=not _sigcont_queued(statuses))
    q = ctl.queue()
    core = task.dump_task(q, pid, status, st)
    sigactions = signals.dump_sigactions(q, status)
    itimers = signals.dump_itimers(q)
    brk: list[int] = []
    q.add(sysno.brk, 0, then=brk.append)
    signals.dump_sigaltstack(q, threads[0])      # per thread: its own altstack and
    _dump_tid_address(q, threads[0])             # tid address
    # Pending signals right after the timers: the timers run while the task
    # is frozen.  A timer that expires between the two reads would be lost
    # (read first as disarmed, its signal not yet queued) or counted twice
    # (its signal read, and the time left before it fired dumped too): the
    # timers are read again after the signals, and the pair is read again
    # until no timer expired in between.
    before = timers.dump(q, core, fr.tids, found_timers)
    q.run()
    core.sigactions.extend(sigactions)
    core.itimers.extend(itimers)
    for attempt in range(TIMER_READS):
        if attempt:
            del core.posix_timers[:]
            before = timers.dump(q, core, fr.tids, found_timers)
            q.run()
        shared_pending = signals.dump_pending(
            pid, shared=True, drop_sigcont_from=os.getpid() if fr.stopped else None)
        for t in threads:
            del t.pending[:]
            t.pending.extend(signals.dump_pending(t.tid, shared=False))
        if not before:
            break
        after = timers.remaining(q, before)
        q.run()
        fired = timers.expired_between(before, after)
        if not fired:
            break
        log.debug("pid %d: posix timer(s) %s expired while being read: again", pid, fired)
    core.seccomp.extend(seccomp_state)
    for t in threads[1:]:
        tctl = _remote_thread(ctl, t.tid, fr, t.blocked)
        tq = tctl.queue()
        signals.dump_sigaltstack(tq, t)
        _dump_tid_address(tq, t)
        tq.run()
        _end_remote_thread(ctl, tctl)
    keeps_running = opts.leave_running or opts.leave_stopped
    # A new tracker is only worth starting if the task lives on.
    tracker = _get_tracker(opts, pid, start_time, ctl if keeps_running else None,
                           want_tracking)
    try:
        _end_remote(pid, ctl)
    except BaseException:
        if tracker is not None:
            tracker.close()
        raise
    opened.ctl = opened.fr = None
    phase("remote syscalls", f"{ctl.remote.calls + ctl.thread_calls} calls")
    core.shared_pending.extend(shared_pending)
    core.threads.extend(threads)
    core.stopped = fr.stopped

    mm = mm_pb2.mm_entry(start_code=st.start_code, end_code=st.end_code,
                         start_data=st.start_data, end_data=st.end_data,
                         start_brk=st.start_brk, brk=brk[0], start_stack=st.start_stack,
                         arg_start=st.arg_start, arg_end=st.arg_end,
                         env_start=st.env_start, env_end=st.env_end, exe=exe)
    for t_, v in proc.read_auxv(pid):
        mm.auxv.extend([t_, v])
    mm.vmas.extend(vma_entries)
    return _ProcDump(pid, vmas, vma_entries, core, mm, fdinfos, fs_entry,
                     ctl.remote.calls + ctl.thread_calls), tracker


def _collect_and_write(opts: DumpOptions, tr: ptree.Tree, images, stats: DumpStats,
                       start_time: int, early: list | None, opened: _Open,
                       lazy_out: list | None = None, lock=None,
                       root_parent: tuple | None = None, pre: PreMap | None = None) -> list:
    """Collect every process, then write the pages and the image files.
    Returns the dirty trackers used (incremental dumps)."""
    keeps_running = opts.leave_running or opts.leave_stopped
    # TCP queues go straight to the sink's tcp-queues.img as they are read
    table = files.FileTable(opts.shell_job, {**opts.inet_opts(), "sink": images})
    dumps: list[_ProcDump] = []
    used: dict[int, object] = {}          # pid -> tracker
    parents: dict[int, Parent | None] = {}
    try:
        for p in tr.live:
            is_root = p is tr.root
            pst = proc.read_stat(p.pid)
            if is_root and root_parent is not None and root_parent[0] == pst.start_time:
                parents[p.pid] = root_parent[1]       # read before the freeze
            else:
                parents[p.pid] = _open_parent(opts, p.pid, pst.start_time, tr.root.pid)
            want = parents[p.pid] is not None or (opts.track_mem and keeps_running)
            d, t = _collect(opts, p.frozen, table, opened, early if is_root else None,
                            want, pst)
            dumps.append(d)
            stats.remote_syscalls += d.remote_syscalls
            if t is not None:
                used[p.pid] = t
        phase = Phases(tr.root.pid)
        pipe_data = table.finish()
        phase("pipe data and socket pairs")
        conns = table.inet.connections()
        stats.tcp_connections = len(conns)
        if conns:
            for name, sec in table.inet.steps.items():
                phase.step(f"tcp {name}", sec, f"{len(conns)} connections")
        if conns and lock is None and opts.network_lock != "skip":
            raise errors.DumpError(f"{len(conns)} TCP connection(s) would be dumped "
                                   "without the network lock")
        if lock is not None:        # a connection the first look missed
            lock.add([netlock.Conn.of(e.family, e.src_addr, e.src_port, e.dst_addr, e.dst_port)
                      for e in conns])
        for t in used.values():
            if t.fresh:
                t.hold()

        # 3. Memory: present pages only (or only those not in the parent chain).
        ppid = {p.pid: p.ppid for p in tr.live}
        by_pid = {d.pid: d for d in dumps}
        for d in dumps:
            phase = Phases(d.pid)
            t = used.get(d.pid)
            parent = parents[d.pid]
            if parent is not None and t is None:
                log.warning("pid %d: dirty tracking was lost: the dump copies every page",
                            d.pid)
            if t is not None and parent is None:
                t.fresh = True
            # The task is frozen: the VMAs read above are still the VMAs.
            deferred = None
            if opts.defer_lazy and d.pid == tr.root.pid:
                runs, in_parent, area, deferred = _defer_lazy(d, parent, t, stats, pre)
                if opts.lazy_map_out is not None:
                    opts.lazy_map_out.append(deferred)
            else:
                runs, in_parent = _plan_memory(d.pid, d.vmas, d.vma_entries,
                                               parent if t else None, t, stats)
            phase("memory scan")
            par = by_pid.get(ppid[d.pid])
            cand = memory.cow_candidates(d.vma_entries, d.vmas) if par is not None else []
            if cand:
                data = pm.union(pm.normalize((r.addr, r.addr + r.nr_pages * memory.PAGE)
                                             for r in runs), in_parent)
                cow = memory.shared_with_parent(d.pid, par.pid, cand, par.vma_entries, data)
                d.mm.shared_with_parent.extend(
                    mm_pb2.cow_entry(vaddr=a, nr_pages=(b - a) // memory.PAGE)
                    for a, b in cow)
                stats.pages_shared += pm.pages(cow)
                phase("COW with parent", f"{pm.pages(cow)} pages shared with pid {par.pid}")
            if isinstance(t, trackers.SoftDirtyTracker) and keeps_running:
                t.clear()       # the next round starts now
            lazy = []
            if deferred is not None:
                lazy = area
                if lazy_out is not None:
                    lazy_out.extend(lazy)
            elif (opts.serve_lazy is not None or opts.leave_lazy) and d.pid == tr.root.pid:
                runs, lazy = _leave_lazy(d, runs)
                if lazy_out is not None:
                    lazy_out.extend(lazy)
            _write_memory(d.pid, images, runs, in_parent, stats, tolerant=False, lazy=lazy,
                          lazy_map=deferred is not None)
            phase("memory copy")
        stats.tracker = ",".join(sorted({t.kind for t in used.values()}))

        # 4. The other image files, then the inventory last.
        phase = Phases(tr.root.pid)
        for d in dumps:
            images.write_image(f"mm-{d.pid}.img", [d.mm])
            images.write_image(f"core-{d.pid}.img", [d.core])
            images.write_image(f"fdinfo-{d.pid}.img", d.fdinfos or [])
            images.write_image(f"fs-{d.pid}.img", [d.fs])
        table.inet.write_queues()
        images.write_image("files.img", table.files or [])
        images.write_image("pipes.img", pipe_data or [])
        images.write_image("pstree.img", tr.entries())
        images.write_image("stats-dump.img", [stats.to_pb()])
        if opts.prev_images_dir:
            images.set_parent(opts.prev_images_dir)
        images.commit(inventory_pb2.inventory_entry(
            tool_version=__version__, kernel=os.uname().release, arch=os.uname().machine,
            kind=inventory_pb2.DUMP, root_pid=tr.root.pid, root_start_time=start_time,
            shell_job=opts.shell_job, parent=opts.prev_images_dir or "",
            tracker=stats.tracker))
        phase("image files")
        if opts.before_release is not None:
            opts.before_release(stats)      # raises: the tree goes on here
        if keeps_running:
            table.inet.rollback()       # repair off: the programs go on
        else:
            table.inet.done()           # killed in repair mode: no FIN, no RST
        phase("our socket copies closed")
    except BaseException:
        table.abort()
        for t in used.values():
            if t.fresh:
                t.stop()      # tracking this failed dump started: end it
            t.close()
        raise
    return list(used.values())


def _robust_list(pid: int) -> tuple[int, int]:
    from migrate.kernel.syscalls import get_robust_list
    return get_robust_list(pid)
