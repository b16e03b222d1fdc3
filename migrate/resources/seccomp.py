"""seccomp: strict mode and filters, per thread.

A thread under seccomp could refuse or die of the remote syscalls the dump
and the restore run in it.  Both sides therefore trace such threads with
PTRACE_O_SUSPEND_SECCOMP (needs CAP_SYS_ADMIN; kernel/seccomp.c
__secure_computing returns early for a tracee with PT_SUSPEND_SECCOMP),
which lasts until the detach.

Dump: /proc/PID/task/TID/status `Seccomp` gives the mode; the filters are
read from outside with PTRACE_SECCOMP_GET_FILTER (classic BPF, index 0 the
oldest) and their flags with PTRACE_SECCOMP_GET_METADATA.  Restore: after
the threads exist and before the credentials (root can install a filter
without no_new_privs; the target may have had CAP_SYS_ADMIN when it
installed it), each thread installs its own chain, oldest first, with
seccomp(SECCOMP_SET_MODE_FILTER) or SECCOMP_SET_MODE_STRICT.  Every remote
syscall after that, the final munmap of the gadget included, runs with the
filters suspended; the detach after the swap turns them on.

Refused: filters that return SECCOMP_RET_USER_NOTIF (their listener, a
supervisor's fd, cannot come along).  Lost: the sharing of filters between
threads (each thread gets its own copy of the same programs: same verdicts),
SECCOMP_FILTER_FLAG_SPEC_ALLOW (the kernel does not report it).
"""

from __future__ import annotations

import logging
import struct

from migrate import errors
from migrate.images._pb import core_pb2
from migrate.kernel import proc, ptrace, sysno
from migrate.resources.taskctl import MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, TaskCtl

log = logging.getLogger(__name__)

SECCOMP_MODE_STRICT, SECCOMP_MODE_FILTER = 1, 2
SECCOMP_SET_MODE_STRICT, SECCOMP_SET_MODE_FILTER = 0, 1
SOCK_FILTER = struct.Struct("<HBBI")     # code, jt, jf, k
SOCK_FPROG = struct.Struct("<H6xQ")      # len, filter pointer
BPF_RET_K = 0x06                         # BPF_RET | BPF_K
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000


def _mode(pid: int, tid: int, statuses: dict | None = None) -> int:
    """``statuses``: each thread's parsed /proc status, if read already."""
    st = statuses[tid] if statuses is not None else \
        proc.parse_status(proc.read_text(pid, f"task/{tid}/status"))
    return int(st.get("Seccomp", "0"))


def returns_user_notif(prog: bytes) -> bool:
    """Does a classic BPF program return SECCOMP_RET_USER_NOTIF anywhere
    (a constant return; returns of the accumulator cannot be told)?"""
    for code, _jt, _jf, k in SOCK_FILTER.iter_unpack(prog):
        if code == BPF_RET_K and k & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_USER_NOTIF:
            return True
    return False


def suspend(pid: int, tids: list[int], seize_options: int,
            statuses: dict | None = None) -> None:
    """Suspend seccomp in every thread that has it, before any remote
    syscall.  ``seize_options``: the options the threads were seized with
    (PTRACE_SETOPTIONS replaces them all)."""
    for tid in tids:
        if _mode(pid, tid, statuses):
            ptrace.set_options(tid, seize_options | ptrace.PTRACE_O_SUSPEND_SECCOMP)


def dump(pid: int, tids: list[int], seize_options: int, statuses: dict | None = None) -> list:
    """Read every thread's seccomp state, then suspend it (``suspend``).
    ``statuses``: each thread's parsed /proc status, if read already."""
    out = []
    for tid in tids:
        mode = _mode(pid, tid, statuses)
        if not mode:
            continue
        e = core_pb2.seccomp_entry(tid=tid, mode=mode)
        if mode == SECCOMP_MODE_FILTER:
            i = 0
            while True:
                try:
                    prog = ptrace.seccomp_get_filter(tid, i)
                except errors.KernelError as err:
                    if err.errno == 2:       # ENOENT: past the newest
                        break
                    raise
                if returns_user_notif(prog):
                    raise errors.UnsupportedResource(
                        pid, "seccomp", f"thread {tid}: filter {i} hands syscalls to a "
                        "user-space supervisor (SECCOMP_RET_USER_NOTIF), which cannot "
                        "come along")
                e.filters.append(prog)
                e.flags.append(ptrace.seccomp_get_flags(tid, i))
                i += 1
        elif mode != SECCOMP_MODE_STRICT:
            raise errors.UnsupportedResource(pid, "seccomp", f"thread {tid}: seccomp mode "
                                             f"{mode} is unknown here")
        out.append(e)
        log.debug("pid %d: thread %d in seccomp mode %d, %d filters", pid, tid, mode,
                  len(e.filters))
    suspend(pid, [e.tid for e in out], seize_options, statuses)
    return out


def restore(leader: TaskCtl, threads: list[TaskCtl], entries, seize_options: int) -> None:
    """Install each thread's seccomp state by remote syscalls in that
    thread, seccomp suspended for the rest of the restore."""
    if not entries:
        return
    by_tid = {c.pid: c for c in [leader, *threads]}
    for e in entries:
        ctl = by_tid.get(e.tid)
        if ctl is None:
            raise errors.RestoreError(f"pid {leader.pid}: seccomp state of thread {e.tid}, "
                                      "which the image does not have")
        ptrace.set_options(e.tid, seize_options | ptrace.PTRACE_O_SUSPEND_SECCOMP)
    for e in entries:
        ctl = by_tid[e.tid]
        if e.mode == SECCOMP_MODE_STRICT:
            ctl.call(sysno.seccomp, SECCOMP_SET_MODE_STRICT, 0, 0, what="seccomp(STRICT)")
            continue
        size = max(len(p) for p in e.filters) + SOCK_FPROG.size   # one filter at a time
        area = ctl.call(sysno.mmap, 0, size, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        try:
            for i, (prog, flags) in enumerate(zip(e.filters, e.flags)):
                fprog = area
                ctl.write(fprog + SOCK_FPROG.size, prog)
                ctl.write(fprog, SOCK_FPROG.pack(len(prog) // SOCK_FILTER.size,
                                                  fprog + SOCK_FPROG.size))
                ctl.call(sysno.seccomp, SECCOMP_SET_MODE_FILTER, flags, fprog,
                         what=f"seccomp(SET_MODE_FILTER) thread {e.tid} filter {i}")
        finally:
            ctl.call(sysno.munmap, area, size)
        log.debug("thread %d: %d seccomp filters installed", e.tid, len(e.filters))
