"""The restore pipeline: "restore by swap" (DESIGN.md §3).

1. Read and check the whole image, and that everything it needs is here,
   before any process exists.
2. Fork this tool with clone3(set_tid) at the dumped PID.  The child sets up
   what is easiest from inside (session, fds, cwd), reports, and blocks in
   read(2).
3. Seize it (EXITKILL: if we die, it dies) and replace its address space by
   remote syscalls: a private gadget area, rseq off, unmap everything, vdso,
   mm fields and exe, every VMA, the pages, protections.
4. Per-task state by remote syscalls, rlimits from outside, then unmap the
   gadget; at that syscall-exit stop set registers, xstate and mask, detach.
A failure at any step kills the child: no stray process is left.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal
import struct
import time

from migrate import errors
from migrate.images import ImageDir
from migrate.images import pagemap
from migrate.images._pb import inventory_pb2, mm_pb2, stats_pb2
from migrate.kernel import memory as kmem
from migrate.kernel import proc, ptrace, remote, syscalls, sysno
from migrate.resources import files, fs, memory, regs, seccomp, signals, task, timers
from migrate.resources.taskctl import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE,
                                       O_CLOEXEC, O_RDONLY, PROT_EXEC, PROT_READ,
                                       PROT_WRITE, TaskCtl)

log = logging.getLogger(__name__)

PAGE = kmem.PAGE_SIZE
GADGET_PAGES = 5             # one code page, four data pages
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


@dataclasses.dataclass
class RestoreStats:
    forking_us: int = 0
    restore_us: int = 0
    pages_restored: int = 0
    remote_syscalls: int = 0
    peak_rss_kb: int = 0

    def to_pb(self):
        return stats_pb2.stats_entry(kind="restore", peak_rss_kb=self.peak_rss_kb, forking_us=self.forking_us,
                                     restore_us=self.restore_us,
                                     pages_restored=self.pages_restored,
                                     remote_syscalls=self.remote_syscalls,
                                     total_us=self.restore_us)


@dataclasses.dataclass
class Image:
    """Everything read from an image directory, checked."""
    dir: ImageDir
    pid: int
    pstree: object
    core: object
    mm: object
    pagemap_head: object
    pagemap: list
    files: list
    fdinfos: list
    fs: object
    chain: list[ImageDir]                       # this image, then its parents
    parts: list[list[tuple[int, int, int]]]     # pages each level writes (overlay)
    pipes: list                                 # data in flight of each pipe

MAX_CHAIN = 256


def load_chain(d: ImageDir, pid: int) -> tuple[list[ImageDir], list[list]]:
    """The image and its parents (``parent`` symlinks) with their pagemaps."""
    chain, maps = [d], [d.read_image(f"pagemap-{pid}.img")[1:]]
    start = d.inventory.root_start_time
    while chain[-1].inventory.parent:
        cur = chain[-1]
        if len(chain) >= MAX_CHAIN:
            raise errors.ImageError(cur.path, None, f"parent chain longer than {MAX_CHAIN}")
        link = os.path.join(cur.path, "parent")
        if not os.path.exists(link):
            raise errors.ImageError(link, None, f"missing: the image has parent "
                                                f"{cur.inventory.parent!r}")
        p = ImageDir.open(link)
        if p.inventory.root_pid != pid or (start and p.inventory.root_start_time not in
                                            (0, start)):
            raise errors.ImageError(link, None, f"parent is of pid {p.inventory.root_pid}, "
                                                f"not of this process (pid {pid})")
        chain.append(p)
        maps.append(p.read_image(f"pagemap-{pid}.img")[1:])
    return chain, maps


def load(images_dir: str) -> Image:
    d = ImageDir.open(images_dir)
    inv = d.inventory
    if inv.kind != inventory_pb2.DUMP:
        raise errors.RestoreError(f"{images_dir} is a pre-dump: restore needs a full dump")
    tree = d.read_image("pstree.img")
    if len(tree) != 1:
        raise errors.RestoreError(f"{images_dir}: process trees are not supported yet")
    pid = tree[0].pid
    pmap = d.read_image(f"pagemap-{pid}.img")
    chain, maps = load_chain(d, pid)
    parts = pagemap.overlay(maps, [c.path for c in chain])
    return Image(d, pid, tree[0], d.read_one(f"core-{pid}.img"), d.read_one(f"mm-{pid}.img"),
                 pmap[0], pmap[1:], d.read_image("files.img"),
                 d.read_image(f"fdinfo-{pid}.img"), d.read_one(f"fs-{pid}.img"), chain, parts,
                 d.read_image("pipes.img") if d.has("pipes.img") else [])


def preflight(img: Image) -> None:
    """Everything the restore needs, checked before a process exists."""
    memory.check_files(img.mm.vmas)
    files.check_files(img.files)
    fs.check(img.fs)
    if not os.path.exists(img.mm.exe):
        raise errors.RestoreError(f"executable {img.mm.exe} is missing")
    _check_pid_free(img.pid)


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


def restore(opts: RestoreOptions) -> tuple[int, RestoreStats]:
    """Bring the image back; return (pid, stats).  The process runs (or is
    stopped with --leave-stopped) and is our child."""
    t0 = time.perf_counter()
    img = load(opts.images_dir)
    preflight(img)
    stats = RestoreStats()
    pages = [level.pages_reader(img.pid) for level in img.chain]
    tty = _own_tty() if opts.shell_job else None
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    tf = time.perf_counter()
    try:
        child = syscalls.clone3_with_pid(img.pid, **task.root_clone_args(img.core, opts.detach))
    except errors.KernelError as e:
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        if e.errno == errno.EEXIST:
            raise errors.RestoreError(f"pid {img.pid} is taken by another process") from None
        raise errors.RestoreError(f"cannot create pid {img.pid}: {e}") from None
    if child == 0:
        _child(img, opts, ready_r, ready_w, go_r, go_w, tty)  # never returns
    stats.forking_us = int((time.perf_counter() - tf) * 1e6)
    os.close(ready_w)
    os.close(go_r)
    pid = child
    created: list[int] = []
    try:
        ctl_fds = _wait_ready(ready_r, pid)
        _take_over(img, opts, pid, pages, ctl_fds, stats, created)
    except BaseException as exc:
        _kill_child(pid, created)
        if isinstance(exc, errors.MigrateError) and not isinstance(exc, errors.RestoreError):
            raise errors.RestoreError(f"restore of pid {img.pid} failed, nothing was left "
                                      f"running: {exc}") from exc
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
        for r in pages:
            r.close()
    stats.restore_us = int((time.perf_counter() - t0) * 1e6)
    stats.peak_rss_kb = proc.peak_rss_kb()
    if opts.pidfile:
        with open(opts.pidfile, "w") as f:
            f.write(f"{pid}\n")
    log.info("pid %d: restored from %s in %.1f ms (%d pages, %d remote syscalls)", pid,
             opts.images_dir, stats.restore_us / 1000, stats.pages_restored,
             stats.remote_syscalls)
    return pid, stats


def _own_tty() -> str | None:
    for fd in (0, 1, 2):
        try:
            return os.ttyname(fd)
        except OSError:
            continue
    raise errors.RestoreError("--shell-job: migrate restore has no terminal to give the job")


def _kill_child(pid: int, threads: list[int] = ()) -> None:
    """Kill the half-built process; as tracer, collect its threads' exits
    too, or the leader cannot be reaped."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for tid in [*threads, pid]:
        try:
            os.waitpid(tid, ptrace.WALL)
        except ChildProcessError:
            pass


def _child(img: Image, opts: RestoreOptions, ready_r: int, ready_w: int, go_r: int,
           go_w: int, tty: str | None) -> None:
    """Runs in the clone at the dumped PID, until the tool takes it over."""
    w = ready_w
    try:
        os.close(ready_r)
        os.close(go_w)
        wanted = [fi.fd for fi in img.fdinfos]
        base = max(wanted + [2] + [int(x) for x in os.listdir("/proc/self/fd")]) + 1
        import fcntl
        r = fcntl.fcntl(go_r, fcntl.F_DUPFD_CLOEXEC, base)
        w = fcntl.fcntl(ready_w, fcntl.F_DUPFD_CLOEXEC, base)
        os.close(go_r)
        os.close(ready_w)
        tree = img.pstree
        if not opts.shell_job:
            if tree.sid == img.pid:
                os.setsid()
            elif tree.pgid == img.pid:
                os.setpgid(0, 0)
        elif tree.pgid == img.pid:
            os.setpgid(0, 0)
        files.install_fds(img.files, img.fdinfos, {r, w}, tty, img.pipes)
        fs.restore_cwd(img.fs)
        os.write(w, f"ok {r} {w}".encode())
        os.read(r, 1)   # the tool takes over here, in this read(2)
    except BaseException as e:  # report anything, then vanish
        try:
            os.write(w, f"error {e}".encode()[:4000])
        except BaseException:
            pass
    os._exit(1)


def _wait_ready(ready_r: int, pid: int) -> tuple[int, int]:
    msg = b""
    while True:
        chunk = os.read(ready_r, 4096)
        if not chunk:
            break
        msg += chunk
        if msg.startswith(b"ok ") and msg.count(b" ") == 2:
            break
    text = msg.decode("utf-8", "replace")
    if not text.startswith("ok "):
        raise errors.RestoreError(f"pid {pid}: setting up the new process failed: "
                                  f"{text[6:] if text.startswith('error ') else 'it exited'}")
    _, r, w = text.split()
    return int(r), int(w)


def _choose_gadget(*layouts: list[tuple[int, int]]) -> int:
    size = GADGET_PAGES * PAGE
    spans = sorted(s for lay in layouts for s in lay)
    cand = 0x10000000
    while cand + size < TASK_SIZE:
        if all(e <= cand - PAGE or s >= cand + size + PAGE for s, e in spans):
            return cand
        cand += 0x10000000
    raise errors.RestoreError("no free address for the restore gadget")


def _take_over(img: Image, opts: RestoreOptions, pid: int, pages, ctl_fds: tuple[int, int],
               stats: RestoreStats, created: list[int]) -> None:
    ptrace.seize(pid, ptrace.PTRACE_O_EXITKILL | ptrace.PTRACE_O_TRACESYSGOOD |
                 ptrace.PTRACE_O_TRACECLONE)
    ptrace.interrupt_and_wait(pid)
    ptrace.set_sigmask(pid, ALL_SIGNALS)
    child_maps = proc.read_maps(pid)
    rt = remote.RemoteTask(pid, remote.find_syscall_insn(pid, child_maps))
    mm = img.mm
    thread = next(t for t in img.core.threads if t.tid == pid)

    # Bootstrap: our own gadget area, free in both layouts.
    g = _choose_gadget([(v.start, v.end) for v in child_maps],
                       [(v.start, v.end) for v in mm.vmas])
    rt.call(sysno.mmap, g, GADGET_PAGES * PAGE, PROT_READ | PROT_WRITE | PROT_EXEC,
            MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    kmem.write_bytes(pid, g, remote.SYSCALL_INSN)
    rt.set_gadget(g)
    ctl = TaskCtl(rt, g + PAGE, (GADGET_PAGES - 1) * PAGE)

    # rseq off before anything is unmapped: the kernel writes cpu_id into it.
    cfg = ptrace.get_rseq_config(pid)
    if cfg.rseq_abi_pointer:
        rt.call(sysno.rseq, cfg.rseq_abi_pointer, cfg.rseq_abi_size, RSEQ_FLAG_UNREGISTER,
                cfg.signature)

    # Clear the address space but the gadget.
    end_g = g + GADGET_PAGES * PAGE
    rt.call(sysno.munmap, 0, g)
    rt.call(sysno.munmap, end_g, TASK_SIZE - end_g)

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
    memory.map_vmas(ctl, mm.vmas)
    # The deepest parent first: each image overwrites what its parents wrote.
    for reader, parts in reversed(list(zip(pages, img.parts))):
        stats.pages_restored += memory.fill_pages(pid, mm.vmas, parts, reader)
        reader.verify()
    memory.protect_vmas(ctl, mm.vmas)

    # Per-task state.
    core = img.core
    task.restore_task(ctl, core)
    signals.restore_sigactions(ctl, core.sigactions)
    signals.restore_itimers(ctl, core.itimers, timers.elapsed_ns(core.dump_realtime_ns))
    _restore_thread_state(ctl, thread)
    # The other threads: remote clone3 at their TIDs, from the leader.
    others = []
    for t in core.threads:
        if t.tid != pid:
            others.append((t, _clone_thread(ctl, pid, t.tid, created)))
            _restore_thread_state(others[-1][1], t)
    for t in core.threads:
        task.restore_sched(t.tid, t.sched_policy, t.sched_priority, t.nice)
        signals.restore_pending(ctl, pid, t.tid, list(t.pending),
                                list(core.shared_pending) if t.tid == pid else [])
    timers.restore(ctl, core)            # after the threads: SIGEV_THREAD_ID
    task.restore_rlimits(pid, core.rlimits)
    if core.oom_score_adj:
        task.restore_oom_score_adj(pid, core.oom_score_adj)
    for fd in ctl_fds:
        rt.call(sysno.close, fd)
    if img.fs.root != "/":
        rt.call(sysno.chroot, ctl.put_str(img.fs.root))
    seccomp.restore(ctl, [tctl for _, tctl in others], core.seccomp, ptrace.PTRACE_O_EXITKILL |
                    ptrace.PTRACE_O_TRACESYSGOOD | ptrace.PTRACE_O_TRACECLONE)  # as seized
    for _, tctl in others:                # credentials are per thread
        task.restore_creds(tctl, core.creds)
    task.restore_creds(ctl, core.creds)
    task.restore_after_creds(ctl, core)

    # The swap: unmap the gadget; at that syscall-exit stop the task gets its
    # registers and never runs another instruction of ours.
    rt.call(sysno.munmap, g, GADGET_PAGES * PAGE)
    stats.remote_syscalls = rt.calls + sum(tctl.remote.calls for _, tctl in others)
    for t, _ in others:
        regs.restore_thread(t.tid, t)
    regs.restore_thread(pid, thread)
    if opts.leave_stopped or core.stopped:
        os.kill(pid, signal.SIGSTOP)
    for t, _ in others:
        ptrace.detach(t.tid)
    ptrace.detach(pid)


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
    return TaskCtl(remote.RemoteTask(tid, ctl.remote.gadget), ctl.scratch, ctl.scratch_size)


def _restore_thread_state(ctl: TaskCtl, t) -> None:
    """What each thread has of its own, by remote syscalls in that thread."""
    signals.restore_sigaltstack(ctl, t.sigaltstack)
    ctl.call(sysno.set_tid_address, t.clear_child_tid)
    if t.robust_list:
        ctl.call(sysno.set_robust_list, t.robust_list, t.robust_list_len)
    if t.rseq.rseq_abi_pointer:
        ctl.call(sysno.rseq, t.rseq.rseq_abi_pointer, t.rseq.rseq_abi_size, 0,
                 t.rseq.signature)
    if t.comm:
        ctl.call(sysno.prctl, syscalls.PR_SET_NAME, ctl.put_str(t.comm[:15]), 0, 0, 0)
