"""The dump pipeline: freeze, collect, write the image, then kill or release.

Order matters for the promise that a failed dump leaves the target as it was:
everything that can refuse (unsupported VMAs and fds, seccomp...) is checked
before the first remote syscall; the remote syscalls only read state and run
with every signal blocked; on any error the registers and mask are put back
and the task is detached, and the files written so far are removed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time

from migrate import __version__, errors
from migrate.images import ImageDir
from migrate.images._pb import core_pb2, inventory_pb2, mm_pb2, pagemap_pb2, pstree_pb2, stats_pb2
from migrate.kernel import proc, ptrace, remote, sysno
from migrate.resources import files, fs, memory, regs, signals, task
from migrate.resources.taskctl import TaskCtl
from migrate.source import freeze as freezer

log = logging.getLogger(__name__)

ALL_SIGNALS = (1 << 64) - 1


@dataclasses.dataclass
class DumpOptions:
    pid: int
    images_dir: str
    leave_running: bool = False
    leave_stopped: bool = False
    shell_job: bool = False


@dataclasses.dataclass
class DumpStats:
    freezing_us: int = 0
    frozen_us: int = 0
    memdump_us: int = 0
    pages_written: int = 0
    remote_syscalls: int = 0
    total_us: int = 0
    peak_rss_kb: int = 0

    def to_pb(self):
        return stats_pb2.stats_entry(kind="dump", peak_rss_kb=self.peak_rss_kb, freezing_us=self.freezing_us,
                                     frozen_us=self.frozen_us, memdump_us=self.memdump_us,
                                     pages_written=self.pages_written,
                                     remote_syscalls=self.remote_syscalls,
                                     total_us=self.total_us)


def _us(t0: float, t1: float) -> int:
    return int((t1 - t0) * 1e6)


def dump(opts: DumpOptions, sink=None) -> DumpStats:
    """Dump ``opts.pid``.  ``sink`` receives the image (an ImageDir by default,
    or a page-server client; see images.ImageDir for the interface)."""
    t_start = time.perf_counter()
    stats = DumpStats()
    pid = opts.pid
    freezer.check_target(pid)
    status = proc.read_status(pid)
    if int(status.get("Threads", "1")) > 1:
        raise errors.UnsupportedResource(pid, "threads",
                                         f"{status['Threads']} threads: multi-threaded "
                                         "processes are not supported yet")
    if proc.list_children(pid):
        raise errors.UnsupportedResource(pid, "children", "process trees are not "
                                                          "supported yet")
    images = sink if sink is not None else ImageDir.create(opts.images_dir)
    t0 = time.perf_counter()
    fr = freezer.freeze(pid)
    t_frozen = time.perf_counter()
    stats.freezing_us = _us(t0, t_frozen)
    ctl = None
    try:
        if len(fr.tids) > 1 or proc.list_children(pid):
            raise errors.UnsupportedResource(pid, "threads", "the process started threads "
                                                             "or children while freezing")
        ctl = _collect_and_write(opts, fr, images, stats)
    except BaseException as exc:
        _rollback(fr, ctl, images)
        if isinstance(exc, errors.MigrateError) and not isinstance(exc, errors.DumpError):
            raise errors.DumpError(f"dump of pid {pid} failed, the process was left running "
                                   f"as it was: {exc}") from exc
        raise
    if opts.leave_running or opts.leave_stopped:
        freezer.thaw(fr, leave_stopped=opts.leave_stopped)
    else:
        freezer.kill(fr)
    t_end = time.perf_counter()
    stats.frozen_us = _us(t_frozen, t_end)
    stats.total_us = _us(t_start, t_end)
    stats.peak_rss_kb = proc.peak_rss_kb()
    log.info("pid %d: dumped to %s, %d pages, frozen %.1f ms", pid, opts.images_dir,
             stats.pages_written, stats.frozen_us / 1000)
    return stats


def _rollback(fr: freezer.Frozen, ctl: TaskCtl | None, images) -> None:
    """Leave the target exactly as it was: scratch unmapped, regs, mask, detached."""
    try:
        if ctl is not None:
            try:
                ctl.unmap_scratch()
            finally:
                ctl.remote.finish()
                ptrace.set_sigmask(fr.pid, ctl.saved_mask)
    finally:
        freezer.thaw(fr)
        images.discard()


def _collect_and_write(opts: DumpOptions, fr: freezer.Frozen, images,
                       stats: DumpStats) -> TaskCtl:
    pid = fr.pid
    # 1. Everything that can refuse, before any change to the task.
    vmas = proc.read_smaps(pid)
    vma_entries = memory.dump_vmas(pid, vmas)
    file_entries, fdinfos = files.dump_fds(pid, opts.shell_job)
    fs_entry = fs.dump(pid)
    exe = proc.readlink(pid, "exe")
    if exe.endswith(" (deleted)"):
        raise errors.UnsupportedResource(pid, "exe", f"executable {exe} was removed")
    st = proc.read_stat(pid)
    thread = regs.dump_thread(pid, pid, fr.regs[pid])
    status = proc.read_status(pid)
    shared_pending = signals.dump_pending(pid, shared=True,
                                          drop_sigcont_from=os.getpid() if fr.stopped else None)
    thread.pending.extend(signals.dump_pending(pid, shared=False))

    # 2. Remote syscalls: read-only queries, every signal blocked meanwhile.
    gadget = remote.find_syscall_insn(pid, vmas)
    rt = remote.RemoteTask(pid, gadget)
    ctl = TaskCtl(rt)
    ctl.saved_mask = thread.blocked
    ptrace.set_sigmask(pid, ALL_SIGNALS)
    ctl.map_scratch()
    core = task.dump_task(ctl, pid, status)
    core.sigactions.extend(signals.dump_sigactions(ctl))
    core.itimers.extend(signals.dump_itimers(ctl))
    thread.sigaltstack.CopyFrom(signals.dump_sigaltstack(ctl))
    ctl.call(sysno.prctl, 40, ctl.scratch, 0, 0, 0)  # PR_GET_TID_ADDRESS
    thread.clear_child_tid = int.from_bytes(ctl.get(8), "little")
    brk = ctl.call(sysno.brk, 0)
    ctl.unmap_scratch()
    rt.finish()
    ptrace.set_sigmask(pid, thread.blocked)
    stats.remote_syscalls = rt.calls
    thread.robust_list, thread.robust_list_len = _robust_list(pid)
    thread.comm = st.comm
    core.shared_pending.extend(shared_pending)
    core.threads.append(thread)
    core.stopped = fr.stopped

    mm = mm_pb2.mm_entry(start_code=st.start_code, end_code=st.end_code,
                         start_data=st.start_data, end_data=st.end_data,
                         start_brk=st.start_brk, brk=brk, start_stack=st.start_stack,
                         arg_start=st.arg_start, arg_end=st.arg_end,
                         env_start=st.env_start, env_end=st.env_end, exe=exe)
    for t, v in proc.read_auxv(pid):
        mm.auxv.extend([t, v])
    mm.vmas.extend(vma_entries)

    # 3. Memory: present pages only, streamed to the page store.
    t0 = time.perf_counter()
    runs, _ = memory.scan_pages(pid, vma_entries)
    pw = images.pages_writer(pid)
    try:
        pagemap = memory.write_pages(pid, runs, pw)
    except BaseException:
        pw.abort()
        raise
    stats.pages_written = pw.nr_pages
    images.add_pages(pid, pw)
    stats.memdump_us = _us(t0, time.perf_counter())

    # 4. The other image files, then the inventory last.
    def put(name, msgs):
        images.write_image(name, msgs)

    put(f"pagemap-{pid}.img", [pagemap_pb2.pagemap_head(pid=pid, nr_pages=stats.pages_written),
                               *pagemap])
    put(f"mm-{pid}.img", [mm])
    put(f"core-{pid}.img", [core])
    put(f"fdinfo-{pid}.img", fdinfos or [])
    put("files.img", file_entries or [])
    put(f"fs-{pid}.img", [fs_entry])
    put("pstree.img", [pstree_pb2.pstree_entry(pid=pid, ppid=0, pgid=st.pgrp, sid=st.session,
                                               threads=fr.tids)])
    put("stats-dump.img", [stats.to_pb()])
    inv = inventory_pb2.inventory_entry(tool_version=__version__,
                                        kernel=platform.release(), arch=platform.machine(),
                                        kind=inventory_pb2.DUMP, root_pid=pid,
                                        shell_job=opts.shell_job)
    images.commit(inv)
    return ctl


def _robust_list(pid: int) -> tuple[int, int]:
    from migrate.kernel.syscalls import get_robust_list
    return get_robust_list(pid)
