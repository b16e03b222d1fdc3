"""The restore pipeline: "restore by swap" (DESIGN.md §3).

1. Read and check the whole image, and that everything it needs is here,
   before any process exists.
2. Open every file description and make every shared memory object of the
   tree, once, in this tool.
3. Fork this tool with clone3(set_tid) at the root's PID; each new process
   forks its own children the same way (zombies exit at once with their
   status), sets up what is easiest from inside (session, group, fds, cwd),
   reports, and blocks in read(2).
4. Seize each one (EXITKILL: if we die, they die) and replace its address
   space by remote syscalls: a private gadget area, rseq off, unmap
   everything, vdso, mm fields and exe, every VMA, the pages, protections.
   Per-task state by remote syscalls, rlimits from outside, then unmap the
   gadget; the process waits at that syscall-exit stop.
5. When every process is built: registers, xstate and mask, detach.
A failure at any step kills every process made: no stray process is left.
"""

from __future__ import annotations

import dataclasses
import gc
import functools
import errno
import logging
import os
import signal
import struct
import time

from migrate import errors
from migrate.dest import lazy
from migrate.images import ImageDir
from migrate.images import pagemap
from migrate.images._pb import files_pb2, inventory_pb2, mm_pb2, stats_pb2
from migrate.kernel import memory as kmem
from migrate.kernel import proc, ptrace, remote, syscalls, sysno
from migrate.resources import (files, fs, inet, memory, netlock, regs, seccomp, signals,
                               task, tcp, timers)
from migrate.resources.phases import Phases
from migrate.resources.taskctl import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE,
                                       O_CLOEXEC, O_RDONLY, PROT_EXEC, PROT_READ,
                                       PROT_WRITE, TaskCtl)

log = logging.getLogger(__name__)

PAGE = kmem.PAGE_SIZE
GADGET_PAGES = 5             # one code page, four data pages
BATCH_AT = 64                # remote.BATCH_CODE, after the syscall instruction
TASK_SIZE = 0x7FFFFFFFF000   # 47-bit user address space
ARCH_MAP_VDSO_64 = 0x2003
RSEQ_FLAG_UNREGISTER = 1
ALL_SIGNALS = (1 << 64) - 1
PRCTL_MM_MAP = struct.Struct("<11QQII")


@dataclasses.dataclass
class RestoreOptions:
    images_dir: str
    detach: bool = False
    pidfile: str | None = None
    shell_job: bool = False
    leave_stopped: bool = False
    lazy_pages: bool = False            # post-copy: anonymous pages by a daemon (dest/lazy.py)
    lazy_socket: str | None = None      # the lazy-pages daemon's unix socket
    tcp_close: bool = False              # connections come back closed, no lock
    network_lock: str | None = None      # "nftables" (default), "iptables", "skip"
    # Live migration: called once the connections' packets are dropped here
    # (or at once without connections), before any socket is made: the
    # service address can arrive now without this host resetting them.
    after_lock: object = None
    # Live migration: called once every process is built, just before they
    # are released; if it raises, they are killed (nothing runs) and the
    # restore fails.  The orchestrator releases only once the source agrees.
    before_release: object = None


@dataclasses.dataclass
class RestoreStats:
    tcp_connections: int = 0
    netlock_us: int = 0
    netunlock_us: int = 0
    forking_us: int = 0
    restore_us: int = 0
    pages_restored: int = 0
    pages_shared: int = 0           # pages shared copy-on-write with the parent again
    remote_syscalls: int = 0
    peak_rss_kb: int = 0

    def to_pb(self):
        return stats_pb2.stats_entry(kind="restore", peak_rss_kb=self.peak_rss_kb, forking_us=self.forking_us,
                                     restore_us=self.restore_us,
                                     pages_restored=self.pages_restored,
                                     pages_shared=self.pages_shared,
                                     remote_syscalls=self.remote_syscalls,
                                     total_us=self.restore_us,
                                     tcp_connections=self.tcp_connections,
                                     netlock_us=self.netlock_us,
                                     netunlock_us=self.netunlock_us)


@dataclasses.dataclass
class ProcImage:
    """One live process of the image."""
    pid: int
    entry: object                               # pstree_entry
    core: object
    mm: object
    pagemap_head: object
    pagemap: list
    fdinfos: list
    fs: object
    chain: list[ImageDir]                       # this image, then its parents
    levels: list                                # their pagemaps (pagemap.Level)

    @functools.cached_property
    def parts(self) -> list[list[tuple[int, int, int]]]:
        """The pages each level writes (pagemap.overlay)."""
        return pagemap.overlay(self.levels, [c.path for c in self.chain])

    def parts_within(self, ranges) -> list[list[tuple[int, int, int]]]:
        """``parts`` inside ``ranges`` only (a lazy restore's eager pages)."""
        return pagemap.overlay_within(self.levels, ranges, [c.path for c in self.chain],
                                      check=False)      # load() checked it

    @property
    def stored(self) -> list[tuple[int, int]]:
        """The pages the chain holds for this process (checked at load)."""
        return self.levels[0].cover


@dataclasses.dataclass
class Image:
    """Everything read from an image directory, checked."""
    dir: ImageDir
    pid: int                                    # the root
    entries: list                               # pstree_entry of every process
    procs: list[ProcImage]                      # the live ones, parents first
    files: list
    pipes: list                                 # data in flight of each pipe
    queues: memoryview | None = None            # tcp-queues.img past its header

    def children(self, pid: int) -> list:
        return [e for e in self.entries if e.ppid == pid and e.pid != self.pid]

MAX_CHAIN = 256


def load_chain(d: ImageDir, pid: int, start: int = 0) -> tuple[list[ImageDir], list[list]]:
    """The image and the parents (``parent`` symlinks) that hold pages of
    ``pid`` (started at ``start``, when known), with their pagemaps.  A level
    whose pagemap leaves nothing to its parent ends the chain."""
    chain, maps = [d], [pagemap.level_of(d.read_image(f"pagemap-{pid}.img"))]
    while chain[-1].inventory.parent and any(e.flags & pagemap.PE_IN_PARENT
                                             for e in maps[-1].entries):
        cur = chain[-1]
        if len(chain) >= MAX_CHAIN:
            raise errors.ImageError(cur.path, None, f"parent chain longer than {MAX_CHAIN}")
        link = os.path.join(cur.path, "parent")
        if not os.path.exists(link):
            raise errors.ImageError(link, None, f"missing: the image has parent "
                                                f"{cur.inventory.parent!r}")
        p = ImageDir.open(link)
        if p.inventory.root_pid == pid:
            then = p.inventory.root_start_time
        else:
            mine = [e for e in p.read_image("pstree.img") if e.pid == pid]
            then = mine[0].start_time if mine else None
        if then is None or not p.has(f"pagemap-{pid}.img") or (start and then not in
                                                                 (0, start)):
            raise errors.ImageError(link, None, f"the parent image has no pages of pid "
                                                f"{pid} (started at {start}), which "
                                                f"{cur.path} leaves to it")
        chain.append(p)
        maps.append(pagemap.level_of(p.read_image(f"pagemap-{pid}.img")))
    return chain, maps


def _check_tree(path: str, root: int, entries: list) -> None:
    """A pstree the restore can walk: the root first, unique pids, every
    parent listed before its children."""
    seen: set[int] = set()
    for i, e in enumerate(entries):
        where = f"pstree entry {i} (pid {e.pid})"
        if e.pid <= 0 or e.pid in seen:
            raise errors.ImageError(path, None, f"{where}: pid missing or repeated")
        if i == 0 and (e.pid != root or e.zombie):
            raise errors.ImageError(path, None, f"{where}: the root must come first, "
                                                f"alive (inventory root {root})")
        if i > 0 and e.ppid not in seen:
            raise errors.ImageError(path, None, f"{where}: parent {e.ppid} is not listed "
                                                "before it")
        if not e.zombie and e.pid not in e.threads:
            raise errors.ImageError(path, None, f"{where}: its own pid is not among its "
                                                "threads")
        seen.add(e.pid)


def load(images_dir: str) -> Image:
    d = ImageDir.open(images_dir)
    inv = d.inventory
    if inv.kind != inventory_pb2.DUMP:
        raise errors.RestoreError(f"{images_dir} is a pre-dump: restore needs a full dump")
    tree = d.read_image("pstree.img")
    if not tree:
        raise errors.ImageError(os.path.join(d.path, "pstree.img"), None, "no process")
    _check_tree(os.path.join(d.path, "pstree.img"), inv.root_pid or tree[0].pid, tree)
    procs = []
    for e in tree:
        if e.zombie:
            continue
        pid = e.pid
        pmap = d.read_image(f"pagemap-{pid}.img")
        chain, maps = load_chain(d, pid, e.start_time or
                                 (inv.root_start_time if pid == inv.root_pid else 0))
        pagemap.check_chain(maps, [c.path for c in chain])
        procs.append(ProcImage(pid, e, d.read_one(f"core-{pid}.img"),
                               d.read_one(f"mm-{pid}.img"), pmap[0], pmap[1:],
                               d.read_image(f"fdinfo-{pid}.img"),
                               d.read_one(f"fs-{pid}.img"), chain, maps))
    files_ = d.read_image("files.img")
    ids = {f.id for f in files_}
    for p in procs:
        for fi in p.fdinfos:
            if fi.id not in ids:
                raise errors.ImageError(os.path.join(d.path, f"fdinfo-{p.pid}.img"), None,
                                        f"fd {fi.fd} refers to file id {fi.id}, which "
                                        "files.img does not have")
    return Image(d, tree[0].pid, tree, procs, files_,
                 d.read_image("pipes.img") if d.has("pipes.img") else [],
                 d.read_raw(tcp.QUEUES_IMG) if d.has(tcp.QUEUES_IMG) else None)


def preflight(img: Image) -> None:
    """Everything the restore needs, checked before a process exists."""
    files.check_files(img.files, {e.pid for e in img.entries})
    for p in img.procs:
        memory.check_files(p.mm.vmas)
        fs.check(p.fs)
        if not os.path.exists(p.mm.exe):
            raise errors.RestoreError(f"executable {p.mm.exe} of pid {p.pid} is missing")
    for e in img.entries:
        _check_pid_free(e.pid)


ZOMBIE_WAIT = 3.0


def _check_pid_free(pid: int) -> None:
    """The PID must be free.  Right after a dump its zombie may still wait for
    a parent that reaps late (init does here): give it a moment."""
    end = time.monotonic() + ZOMBIE_WAIT
    while True:
        try:
            st = proc.read_stat(pid)
        except errors.NoSuchProcess:
            return
        if st.state not in ("Z", "X"):
            raise errors.RestoreError(f"pid {pid} is taken by another process ({st.comm})")
        if time.monotonic() > end:
            raise errors.RestoreError(
                f"pid {pid} is still held by a zombie ({st.comm}) that its parent (pid "
                f"{st.ppid}) has not reaped")
        time.sleep(0.01)


CTL_READY, CTL_GO = "ready", "go"
READY_TIMEOUT = 60.0


def restore(opts: RestoreOptions) -> tuple[int, RestoreStats]:
    """Bring the image back; return (root pid, stats).  The processes run
    (or are stopped with --leave-stopped); the root is our child."""
    # No cyclic GC while the processes are built (a migration's downtime):
    # a full collection walks every object the image made.
    was = gc.isenabled()
    gc.disable()
    try:
        return _restore_image(opts)
    finally:
        if was:
            gc.enable()


def _restore_image(opts: RestoreOptions) -> tuple[int, RestoreStats]:
    t0 = time.perf_counter()
    img = load(opts.images_dir)
    phase = Phases(img.pid)
    phase.t = t0
    phase("load image", f"{len(img.procs)} processes")
    preflight(img)
    lazy.check_image(img.procs, opts.lazy_pages)
    phase("preflight")
    # Orphans of a failed restore come to us to be reaped.
    was_subreaper = syscalls.get_child_subreaper()
    if not was_subreaper:
        syscalls.set_child_subreaper()
    try:
        return _restore(opts, img, t0)
    finally:
        if not was_subreaper:
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 0)


def _restore(opts: RestoreOptions, img: Image, t0: float) -> tuple[int, RestoreStats]:
    stats = RestoreStats()
    tty = _own_tty() if opts.shell_job else None
    base = max([fi.fd for p in img.procs for fi in p.fdinfos] + [2]) + 1
    phase = Phases(img.pid)
    conns = [] if opts.tcp_close else _connections(img.files)
    stats.tcp_connections = len(conns)
    # The connections' packets are dropped until every process runs (on the
    # host of the dump, or after `migrate network-lock`, this takes over the
    # lock of the same name).
    lock = netlock.lock(img.pid, conns, opts.network_lock)
    stats.netlock_us = lock.set_us if lock else 0
    phase("network lock", f"{len(conns)} connections")
    if opts.after_lock is not None:
        try:
            opts.after_lock()
        except BaseException:
            if lock is not None:
                lock.unlock()
            raise
        phase("after lock")
    inets = inet.Opener(tcp_close=opts.tcp_close, queues=img.queues)
    shared = memory.SharedObjects((p.mm.vmas for p in img.procs),
                                  [f for f in img.files
                                   if f.type == files_pb2.REG and f.reg.memfd])
    try:
        opened = files.open_all(img.files, tty, img.pipes, base, shared,
                                {e.pid for e in img.entries}, inets)
    except BaseException:
        shared.close()
        if lock is not None:
            lock.unlock()
        raise
    phase("open files", f"{len(img.files)} files")
    ready_r = ready_w = go_r = go_w = -1
    pid = 0
    try:
        import fcntl
        top = max(list(opened.values()) + [base]) + 1
        r, w = os.pipe()
        ready_r, ready_w = r, fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, top)
        os.close(w)
        r, go_w = os.pipe()
        go_r = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, top)
        os.close(r)
        plan = _Plan(img, opts, opened, tty, ready_w, go_r, _cow_plan(img, opts))
        tf = time.perf_counter()
        try:
            pid = syscalls.clone3_with_pid(
                img.pid, **task.root_clone_args(img.procs[0].core, opts.detach))
        except errors.KernelError as e:
            if e.errno == errno.EEXIST:
                raise errors.RestoreError(f"pid {img.pid} is taken by another process") \
                    from None
            raise errors.RestoreError(f"cannot create pid {img.pid}: {e}") from None
        if pid == 0:
            _child(plan, img.entries[0])  # never returns
        stats.forking_us = int((time.perf_counter() - tf) * 1e6)
    except BaseException:
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        shared.close()
        files.close_all(opened)
        inets.close()
        if lock is not None:
            lock.unlock()
        raise
    # The new processes hold what they need: ours go.
    files.close_all(opened)
    inets.forked()
    os.close(ready_w)
    os.close(go_r)
    created: list[int] = []
    try:
        _wait_ready(ready_r, img, pid)
        phase("fork and fds", f"{len(img.entries)} processes")
        def all_built() -> None:
            shared.seal()
            files.restore_fown(img.files, {fi.id: (p.pid, fi.fd) for p in reversed(img.procs)
                                           for fi in p.fdinfos})
            inets.finish()                   # TCP connections out of repair mode
            if opts.before_release is not None:
                opts.before_release(pid)

        _build_all(img, opts, plan.keep, shared, stats, created, all_built, plan.cow)
    except BaseException as exc:
        inets.close()
        _kill_tree(pid, [e.pid for e in img.entries], created)
        if lock is not None:
            lock.unlock()
        if isinstance(exc, errors.MigrateError) and not isinstance(exc, errors.RestoreError):
            raise errors.RestoreError(f"restore of pid {img.pid} failed, nothing was left "
                                      f"running: {exc}") from exc
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
        shared.close()
    if lock is not None:     # the processes run: a failure here must not kill them
        try:
            lock.unlock()
        except errors.NetworkLockError as e:
            log.error("%s: remove it by hand", e)
        stats.netunlock_us = lock.unset_us
    if inets.steps["open"]:
        phase = Phases(img.pid)
        for name, sec in inets.steps.items():
            phase.step(f"tcp {name}", sec, f"{len(conns)} connections")
        phase.step("network unlock", stats.netunlock_us / 1e6)
    stats.restore_us = int((time.perf_counter() - t0) * 1e6)
    stats.peak_rss_kb = proc.peak_rss_kb()
    if opts.pidfile:
        with open(opts.pidfile, "w") as f:
            f.write(f"{pid}\n")
    log.info("pid %d: restored from %s in %.1f ms (%d process%s, %d pages, %d shared "
             "with the parent, %d remote syscalls)", pid, opts.images_dir,
             stats.restore_us / 1000, len(img.entries), "es" if len(img.entries) > 1 else "",
             stats.pages_restored, stats.pages_shared, stats.remote_syscalls)
    return pid, stats


def _connections(files_) -> list:
    return [netlock.Conn.of(e.family, e.src_addr, e.src_port, e.dst_addr, e.dst_port)
            for e in (f.inet for f in files_ if f.type == files_pb2.INET_SOCKET)
            if e.HasField("tcp") and not e.closed]


def lock_network(images_dir: str, backend: str | None) -> int:
    """Set the image's network lock here, ahead of the restore (which
    takes it over and lifts it): on a destination that gets the
    connections' addresses before the restore.  Returns the number of
    connections locked."""
    d = ImageDir.open(images_dir)
    conns = _connections(d.read_image("files.img"))
    netlock.lock(d.inventory.root_pid, conns, backend)
    return len(conns)


def unlock_network(images_dir: str, backend: str | None) -> None:
    """Lift a lock ``lock_network`` set (a migration rolled back before
    its restore)."""
    d = ImageDir.open(images_dir)
    netlock.unlock_tree(d.inventory.root_pid, backend)


def _own_tty() -> str | None:
    for fd in (0, 1, 2):
        try:
            return os.ttyname(fd)
        except OSError:
            continue
    raise errors.RestoreError("--shell-job: migrate restore has no terminal to give the job")


KILL_WAIT = 5.0


def _kill_tree(root: int, pids: list[int], threads: list[int] = ()) -> None:
    """Kill every process this restore made, and reap them.  Ours are the
    root (our child), its descendants, and the orphans of the tree that came
    to us (we are their subreaper during a restore): found by walking down
    from us, so an unrelated process that took one of the image's pids is
    never hit."""
    wanted = set(pids)
    me = os.getpid()
    end = time.monotonic() + KILL_WAIT
    seen: set[int] = set()
    while True:
        mine: list[int] = []
        todo = [c for c in proc.list_children(me) if c in wanted or c == root]
        while todo:
            p = todo.pop()
            mine.append(p)
            try:
                todo.extend(c for c in proc.list_children(p) if c in wanted)
            except errors.MigrateError:
                pass
        for p in mine:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        seen |= set(mine)
        for p in list(seen) + list(threads):
            try:
                os.waitpid(p, os.WNOHANG | ptrace.WALL)
            except ChildProcessError:
                pass
        left = [p for p in seen | set(threads) if os.path.exists(f"/proc/{p}")]
        if not left and not mine:
            return
        if time.monotonic() > end:
            log.warning("processes %s of the failed restore are not reaped yet", sorted(left))
            return
        time.sleep(0.002)


def _cow_plan(img: Image, opts: RestoreOptions) -> memory.CowPlan:
    """The premap areas that keep COW sharing (resources/memory.py).  Not
    with --lazy-pages: the lazy-pages daemon fills each process on its own
    (each gets its own copy, as before)."""
    if opts.lazy_pages:
        return memory.CowPlan([])
    procs = [memory.CowProc(p.pid, p.entry.ppid, p.mm.vmas, p.stored,
                            pagemap.normalize((c.vaddr, c.vaddr + c.nr_pages * PAGE)
                                              for c in p.mm.shared_with_parent))
             for p in img.procs]
    return memory.CowPlan(procs, [(v.start, v.end) for v in proc.read_maps(os.getpid())])


@dataclasses.dataclass
class _Plan:
    """What every new process needs before it is taken over (inherited by fork)."""
    img: Image
    opts: RestoreOptions
    opened: dict[int, int]
    tty: str | None
    ready_w: int
    go_r: int
    cow: memory.CowPlan

    def __post_init__(self) -> None:
        self.keep = (self.go_r, self.ready_w)
        self.pids = {e.pid for e in self.img.entries}
        self.procs = {p.pid: p for p in self.img.procs}
        self.epolls: dict[int, set[int]] = {}        # pid -> epoll ids it fills
        done: set[int] = set()
        by_id = {f.id: f for f in self.img.files}
        for p in self.img.procs:
            mine = {fi.id for fi in p.fdinfos if by_id[fi.id].type == files_pb2.EPOLL
                    and fi.id not in done}
            done |= mine
            self.epolls[p.pid] = mine
        self.root_pgid = 0


def _set_group(plan: _Plan, e) -> None:
    """Session and process group of a new process, before its children exist."""
    root = e.pid == plan.img.pid
    if root:
        if not plan.opts.shell_job and e.sid == e.pid:
            os.setsid()
        elif e.pgid == e.pid:
            os.setpgid(0, 0)
        plan.root_pgid = os.getpgid(0)    # the group the root's outside group maps to
        return
    if e.sid == e.pid:
        os.setsid()
    if e.pgid == e.pid:
        if os.getpgid(0) != e.pid:
            os.setpgid(0, 0)
        return
    want = e.pgid if e.pgid in plan.pids else plan.root_pgid
    if os.getpgid(0) != want:
        try:
            os.setpgid(0, want)
        except OSError:
            pass        # its leader comes later: set by the take-over


def _child(plan: _Plan, e) -> None:
    """Runs in a new process at its PID, until the tool takes it over."""
    w = plan.ready_w
    try:
        _set_group(plan, e)
        _premap(plan, plan.procs[e.pid])
        for c in plan.img.children(e.pid):
            try:
                got = syscalls.clone3_with_pid(c.pid)
            except errors.KernelError as err:
                raise errors.RestoreError(f"cannot create pid {c.pid}: {err}") from None
            if got == 0:
                if c.zombie:
                    _zombie(plan, c)
                _child(plan, c)
        p = plan.procs[e.pid]
        files.install_fds(plan.img.files, p.fdinfos, plan.opened, set(plan.keep),
                          plan.epolls[e.pid])
        fs.restore_cwd(p.fs)
        os.write(w, f"{CTL_READY} {e.pid}\n".encode())
        os.read(plan.go_r, 1)   # the tool takes over here, in this read(2)
    except BaseException as err:  # report anything, then vanish
        try:
            os.write(w, f"error {e.pid} {err}".replace("\n", " ").encode()[:3000] + b"\n")
        except BaseException:
            pass
    os._exit(1)


def _premap(plan: _Plan, p: ProcImage) -> None:
    """This new process's premap areas, before it forks its children."""
    if p.pid not in plan.cow.areas and p.pid not in plan.cow.drop:
        return
    phase = Phases(p.pid)
    readers: list = []

    def parts(within):
        if not readers:
            readers.extend(level.pages_reader(p.pid) for level in p.chain)
        # The deepest parent first: each image overwrites what its parents wrote.
        return list(reversed(list(zip(readers, p.parts_within(within)))))

    try:
        memory.premap(plan.cow, p.pid, parts)
    finally:
        for r in readers:
            r.close()
    phase("premap", f"{plan.cow.pages_filled(p.pid)} pages read in, "
                    f"{len(plan.cow.areas.get(p.pid, []))} areas")


def _zombie(plan: _Plan, e) -> None:
    """A dead child its parent has not reaped: die now the way it died."""
    try:
        for fd in plan.opened.values():
            os.close(fd)
        _set_group(plan, e)
        if e.comm:
            syscalls.set_name(e.comm)
        status = e.exit_status
        if os.WIFSIGNALED(status):
            import resource
            sig = os.WTERMSIG(status)
            resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(
                resource.RLIMIT_CORE)[1]))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        os._exit(os.WEXITSTATUS(status))
    finally:
        os._exit(1)


def _wait_ready(ready_r: int, img: Image, root: int) -> None:
    """Every live process reports ready (or why it failed)."""
    import select
    want = {p.pid for p in img.procs}
    buf = b""
    end = time.monotonic() + READY_TIMEOUT
    while want:
        left = end - time.monotonic()
        if left <= 0:
            raise errors.RestoreError(f"processes {sorted(want)} did not get ready in "
                                      f"{READY_TIMEOUT:.0f} s")
        r, _, _ = select.select([ready_r], [], [], min(left, 0.5))
        if not r:
            try:
                gone = os.waitpid(root, os.WNOHANG)[0] == root
            except ChildProcessError:     # made our sibling (CLONE_PARENT)
                try:
                    gone = proc.read_stat(root).state in ("Z", "X")
                except errors.NoSuchProcess:
                    gone = True
            if gone:
                raise errors.RestoreError(f"pid {root}: the new process exited while "
                                          "setting up")
            continue
        chunk = os.read(ready_r, 4096)
        if not chunk:
            raise errors.RestoreError("the new processes exited while setting up")
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode("utf-8", "replace")
            kind, _, rest = text.partition(" ")
            who, _, why = rest.partition(" ")
            if kind == CTL_READY and who.isdigit():
                want.discard(int(who))
            else:
                raise errors.RestoreError(f"pid {who}: setting up the new process failed: "
                                          f"{why or text}")


def _gadget_candidates(*layouts: list[tuple[int, int]]):
    size = GADGET_PAGES * PAGE
    spans = sorted(s for lay in layouts for s in lay)
    cand = 0x10000000
    while cand + size < TASK_SIZE:
        if all(e <= cand - PAGE or s >= cand + size + PAGE for s, e in spans):
            yield cand
        cand += 0x10000000


GADGET_TRIES = 64


def _map_gadget(rt, image: list[tuple[int, int]]) -> int:
    """Map the gadget area at an address free in the image's layout and in
    the new process's: the first candidate MAP_FIXED_NOREPLACE takes (the
    process's layout, a copy of ours, is not read: parsing its maps cost
    1.5-2.5 ms of every restore)."""
    for i, cand in enumerate(_gadget_candidates(image)):
        if i == GADGET_TRIES:
            break
        got = rt.call(sysno.mmap, cand, GADGET_PAGES * PAGE, PROT_READ | PROT_WRITE | PROT_EXEC,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0, check=False)
        if got == cand:
            return cand
        if got != -errno.EEXIST:
            raise errors.from_errno("remote mmap (restore gadget)", -got if got < 0 else
                                    errno.EINVAL, rt.pid)
    raise errors.RestoreError(f"pid {rt.pid}: no free address for the restore gadget")


_insn: dict[int, int] = {}


def _syscall_insn() -> int:
    """A ``syscall`` instruction in our own vdso (or code): every process a
    restore makes is a fork of this one, or of such a fork, and has it at
    the same address (no exec in between).  Found once per process."""
    me = os.getpid()
    if me not in _insn:
        _insn[me] = remote.find_syscall_insn(me, proc.read_maps(me))
    return _insn[me]


WORKERS = 2          # processes built at once (this machine has two cores)


def _build_all(img: Image, opts: RestoreOptions, ctl_fds: tuple[int, int], shared,
               stats: RestoreStats, created: list[int], all_built,
               cow: memory.CowPlan) -> None:
    """Take every process over, then (``all_built``) release them all.

    With several processes, WORKERS threads build them side by side (the
    remote syscalls wait on the tasks and on the kernel, not on Python).
    ptrace binds a tracee to the thread that seized it, so each thread also
    releases its own processes; a thread that fails makes the others stop,
    and its tracees die with it (PTRACE_O_EXITKILL)."""
    # Lazy pages: processes are handed to the daemon in order, the last one
    # saying so, so they are built one after the other.
    n = 1 if opts.lazy_pages else min(WORKERS, len(img.procs))
    if n <= 1:
        rels: list[_Release] = []
        try:
            for p in img.procs:
                rels.append(_take_over(img, p, opts, ctl_fds, shared, stats, created, cow))
            # the lazy-pages daemon's answers, read once everything is built
            # (it takes each hand-over while the restore goes on)
            for rel in rels:
                if rel.handover is not None:
                    rel.handover.wait()
        finally:
            for rel in rels:
                if rel.handover is not None:
                    rel.handover.close()
        all_built()
        phase = Phases(img.pid)
        for rel in reversed(rels):          # the leaves first
            rel.release(opts)
        phase("release")
        return
    import threading
    buckets = [img.procs[i::n] for i in range(n)]
    part = [RestoreStats() for _ in range(n)]
    failed: list[BaseException] = []
    built = threading.Barrier(n + 1)
    go = threading.Barrier(n + 1)

    def work(i: int) -> None:
        rels = []
        try:
            for p in buckets[i]:
                rels.append(_take_over(img, p, opts, ctl_fds, shared, part[i], created,
                                       cow))
        except BaseException as e:
            failed.append(e)
            built.abort()
            go.abort()
            return
        try:
            built.wait()
            go.wait()
        except threading.BrokenBarrierError:
            return
        try:
            for rel in reversed(rels):
                rel.release(opts)
        except BaseException as e:
            failed.append(e)

    threads = [threading.Thread(target=work, args=(i,), name=f"restore-{i}")
               for i in range(n)]
    for t in threads:
        t.start()
    try:
        try:
            built.wait()
        except threading.BrokenBarrierError:
            pass
        if not failed:
            all_built()
            go.wait()
    except BaseException:
        built.abort()
        go.abort()
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    for st in part:
        stats.pages_restored += st.pages_restored
        stats.pages_shared += st.pages_shared
        stats.remote_syscalls += st.remote_syscalls
    if failed:
        raise failed[0]


@dataclasses.dataclass
class _Release:
    """A built process waiting at its last syscall-exit stop."""
    pid: int
    thread: object
    others: list
    stopped: bool
    handover: object = None          # lazy.HandOver: the daemon's answer, awaited

    def release(self, opts: RestoreOptions) -> None:
        for t, _ in self.others:
            regs.restore_thread(t.tid, t)
        regs.restore_thread(self.pid, self.thread)
        if opts.leave_stopped or self.stopped:
            os.kill(self.pid, signal.SIGSTOP)
        for t, _ in self.others:
            ptrace.detach(t.tid)
        ptrace.detach(self.pid)


def _take_over(img: Image, p: ProcImage, opts: RestoreOptions, ctl_fds: tuple[int, int],
               shared, stats: RestoreStats, created: list[int],
               cow: memory.CowPlan) -> _Release:
    pages = [level.pages_reader(p.pid) for level in p.chain]
    try:
        return _build(img, p, opts, ctl_fds, shared, stats, created, pages, cow)
    finally:
        for r in pages:
            r.close()


def _build(img: Image, p: ProcImage, opts: RestoreOptions, ctl_fds: tuple[int, int],
           shared, stats: RestoreStats, created: list[int], pages,
           cow: memory.CowPlan) -> _Release:
    pid = p.pid
    phase = Phases(pid)
    ptrace.seize(pid, ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD |
                 ptrace.PTRACE_O_TRACECLONE)
    ptrace.interrupt_and_wait(pid)
    ptrace.set_sigmask(pid, ALL_SIGNALS)
    rt = remote.RemoteTask(pid, _syscall_insn())
    mm = p.mm
    thread = next(t for t in p.core.threads if t.tid == pid)

    # Bootstrap: our own gadget area, free in both layouts.
    g = _map_gadget(rt, [(v.start, v.end) for v in mm.vmas])
    kmem.write_bytes(pid, g, remote.SYSCALL_INSN)
    kmem.write_bytes(pid, g + BATCH_AT, remote.BATCH_CODE)
    rt.set_gadget(g)
    ctl = TaskCtl(rt, g + PAGE, (GADGET_PAGES - 1) * PAGE)
    ctl.batch_code = g + BATCH_AT

    # rseq off before anything is unmapped: the kernel writes cpu_id into it.
    cfg = ptrace.get_rseq_config(pid)
    if cfg.rseq_abi_pointer:
        rt.call(sysno.rseq, cfg.rseq_abi_pointer, cfg.rseq_abi_size, RSEQ_FLAG_UNREGISTER,
                cfg.signature)

    # Clear the address space but the gadget and the premap areas (COW).
    end_g = g + GADGET_PAGES * PAGE
    keep = sorted([(g, end_g)] + cow.kept(pid))
    for s, e in pagemap.subtract([(0, TASK_SIZE)], keep):
        rt.call(sysno.munmap, s, e - s)

    # vdso/vvar at their dumped place.
    specials = [v for v in mm.vmas if v.kind in (mm_pb2.VVAR, mm_pb2.VVAR_VCLOCK, mm_pb2.VDSO)]
    if specials:
        want = min(v.start for v in specials)
        rt.call(sysno.arch_prctl, ARCH_MAP_VDSO_64, want)
        got = {v.path: v.start for v in proc.read_maps(pid) if v.is_special}
        for v in specials:
            if got.get(v.path) != v.start:
                raise errors.RestoreError(
                    f"pid {pid}: {v.path} landed at {got.get(v.path, 0):#x}, "
                    f"the image has it at {v.start:#x}")

    # mm fields and exe first: PR_SET_MM_MAP refuses to change the exe while
    # the old one (ours) is mapped, and the target may map the same file.
    exe_fd = ctl.open(mm.exe, O_RDONLY | O_CLOEXEC)
    auxv = struct.pack(f"<{len(mm.auxv)}Q", *mm.auxv)
    auxv_addr = ctl.put(auxv, 1024)
    mm_map = PRCTL_MM_MAP.pack(mm.start_code, mm.end_code, mm.start_data, mm.end_data,
                               mm.start_brk, mm.brk, mm.start_stack, mm.arg_start,
                               mm.arg_end, mm.env_start, mm.env_end, auxv_addr, len(auxv),
                               exe_fd)
    rt.call(sysno.prctl, syscalls.PR_SET_MM, syscalls.PR_SET_MM_MAP, ctl.put(mm_map),
            PRCTL_MM_MAP.size, 0, what="prctl(PR_SET_MM_MAP)")
    ctl.close(exe_fd)

    # The address space.
    phase("seize and clear")
    memory.map_vmas(ctl, mm.vmas, shared, cow.moves(pid))
    phase("map VMAs", f"{len(mm.vmas)} VMAs")
    done = cow.valid(pid)
    handover = None
    if opts.lazy_pages:
        handover = _fill_lazy(ctl, p, opts, pages, stats, last=p is img.procs[-1])
    else:
        # The deepest parent first: each image overwrites what its parents
        # wrote.  Pages already in the premap areas (COW) are right.
        for reader, parts in reversed(list(zip(pages, p.parts))):
            stats.pages_restored += memory.fill_pages(pid, mm.vmas,
                                                      pagemap.parts_outside(parts, done),
                                                      reader)
            reader.verify()
        memory.protect_vmas(ctl, mm.vmas)
        stats.pages_shared += cow.pages_shared(pid)
        stats.pages_restored += cow.pages_filled(pid)
    phase("pages", f"{cow.pages_shared(pid)} shared with the parent" if done else "")

    # Per-task state, in one batch (TaskCtl.batch; nothing queued in the
    # task yet, no SIGCONT its closing SIGSTOP could drop).
    core = p.core
    status = proc.read_status(pid)       # the tool's creds and actions, inherited
    q = ctl.queue()
    task.restore_task(q, core)
    signals.restore_sigactions(q, core.sigactions, status)
    signals.restore_itimers(q, core.itimers, timers.elapsed_ns(core.dump_realtime_ns))
    _restore_thread_state(q, thread)
    for fd in ctl_fds:
        q.add(sysno.close, fd)
    want = p.entry.pgid if p.entry.pgid in {e.pid for e in img.entries} else 0
    if want and proc.read_stat(pid).pgrp != want:
        q.add(sysno.setpgid, 0, want, what=f"setpgid(0, {want})")
    if p.fs.root != "/":                 # after every open by path (VMAs, exe)
        q.add(sysno.chroot, q.put_str(p.fs.root), what=f"chroot({p.fs.root!r})")
    q.run()
    phase("task state")
    # The other threads: remote clone3 at their TIDs, from the leader, each
    # then set up by one batch of its own; with no seccomp state to install
    # first (below), that batch gives it its credentials too.
    others = []
    creds_now = not core.seccomp
    for t in core.threads:
        if t.tid != pid:
            tctl = _clone_thread(ctl, pid, t.tid, created)
            others.append((t, tctl))
            tq = tctl.queue()
            _restore_thread_state(tq, t, new_thread_of=thread)
            if creds_now:
                task.restore_creds(tq, core.creds, status)
            tq.run()
    for t in core.threads:
        task.restore_sched(t.tid, t.sched_policy, t.sched_priority, t.nice)
    phase("threads", f"{len(core.threads)} threads")
    task.restore_rlimits(pid, core.rlimits)
    if core.oom_score_adj:
        task.restore_oom_score_adj(pid, core.oom_score_adj)
    seccomp.restore(ctl, [tctl for _, tctl in others], core.seccomp, ptrace.PTRACE_O_EXITKILL |
                    ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACECLONE)  # as seized
    if not creds_now:
        for _, tctl in others:            # credentials are per thread
            tq = tctl.queue()
            task.restore_creds(tq, core.creds, status)
            tq.run()
    task.restore_creds(q, core.creds, status)
    task.restore_after_creds(q, core)
    q.run()
    # Queued signals and POSIX timers last, one call at a time: the closing
    # SIGSTOP of a batch would drop a SIGCONT among them.
    for t in core.threads:
        signals.restore_pending(ctl, pid, t.tid, list(t.pending),
                                list(core.shared_pending) if t.tid == pid else [])
    timers.restore(ctl, core)            # after the threads: SIGEV_THREAD_ID

    # The swap: unmap the gadget; at that syscall-exit stop the task gets its
    # registers and never runs another instruction of ours.
    rt.call(sysno.munmap, g, GADGET_PAGES * PAGE)
    phase("creds and swap")
    stats.remote_syscalls += rt.calls + sum(tctl.remote.calls for _, tctl in others)
    return _Release(pid, thread, others, core.stopped, handover)


def _fill_lazy(ctl: TaskCtl, p: ProcImage, opts: RestoreOptions, pages,
               stats: RestoreStats, last: bool) -> "lazy.HandOver":
    """--lazy-pages: write all but the lazy pages, then hand the process's
    userfaultfd to the lazy-pages daemon before any other remote syscall
    (dest/lazy.py); its answer is read later (``HandOver.wait``)."""
    phase = Phases(p.pid)
    lp = lazy.plan(p)
    eager = pagemap.subtract(p.stored, lp.lazy)
    for reader, parts in reversed(list(zip(pages, p.parts_within(eager)))):
        stats.pages_restored += lazy.fill_eager(p.pid, p.mm.vmas, lp.eager_parts(parts),
                                                reader)
    phase("eager pages")
    memory.protect_vmas(ctl, p.mm.vmas)
    sock = opts.lazy_socket or os.path.join(opts.images_dir, lazy.SOCKET_NAME)
    h = lazy.hand_over(ctl, p.pid, lp, sock, last, wait=False)
    phase("lazy hand-over")
    return h


CLONE_THREAD_FLAGS = (0x100 | 0x200 | 0x400 | 0x800 | 0x10000 | 0x40000)
# CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
CLONE_ARGS = struct.Struct("<11Q")


def _clone_thread(ctl: TaskCtl, pid: int, tid: int, created: list[int]) -> TaskCtl:
    """A thread at ``tid`` by a remote clone3 in the leader.  Traced from
    birth (PTRACE_O_TRACECLONE): it stops before running anything, with the
    leader's registers and every signal blocked, until we set its own."""
    tid_addr = ctl.put(struct.pack("<q", tid), 2048)
    args = ctl.put(CLONE_ARGS.pack(CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, tid_addr, 1, 0),
                   2112)
    got = ctl.call(sysno.clone3, args, CLONE_ARGS.size, what=f"clone3(thread {tid})")
    created.append(got)
    if got != tid:
        raise errors.RestoreError(f"pid {pid}: thread {tid} was created as {got}")
    while True:
        st = ptrace.wait(tid)
        if st.exited:
            raise errors.RestoreError(f"pid {pid}: new thread {tid} {st.describe()}")
        if st.is_event_stop:
            break
        ptrace.cont(tid, 0)
    ptrace.set_sigmask(tid, ALL_SIGNALS)
    return ctl.thread(remote.RemoteTask(tid, ctl.remote.gadget))


def _restore_thread_state(q, t, new_thread_of=None) -> None:
    """What each thread has of its own, by remote syscalls in that thread
    (queued in its ``q``).  A thread just made by our clone3
    (``new_thread_of``: the leader's entry) starts with no altstack (CLONE_VM
    clears it), no tid address, and the leader's name: what already matches
    is not set again."""
    fresh = new_thread_of is not None
    if not (fresh and t.sigaltstack.ss_flags & signals.SS_DISABLE):
        signals.restore_sigaltstack(q, t.sigaltstack)
    if not (fresh and t.clear_child_tid == 0):
        q.add(sysno.set_tid_address, t.clear_child_tid)
    if t.robust_list:
        q.add(sysno.set_robust_list, t.robust_list, t.robust_list_len)
    if t.rseq.rseq_abi_pointer:
        q.add(sysno.rseq, t.rseq.rseq_abi_pointer, t.rseq.rseq_abi_size, 0,
              t.rseq.signature)
    if t.comm and not (fresh and t.comm[:15] == new_thread_of.comm[:15]):
        q.add(sysno.prctl, syscalls.PR_SET_NAME, q.put_str(t.comm[:15]), 0, 0, 0,
              what="prctl(PR_SET_NAME)")
