"""Freeze and thaw a process with PTRACE_SEIZE + PTRACE_INTERRUPT (never ATTACH)."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal

from migrate import errors
from migrate.kernel import proc, ptrace

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Frozen:
    """A seized process: every thread sits in a ptrace event stop."""
    pid: int
    tids: list[int]
    regs: dict[int, ptrace.Regs]
    stopped: bool = False       # was in group stop (SIGSTOP) before we came


def _ancestors() -> set[int]:
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            pid = proc.read_stat(pid).ppid
        except errors.MigrateError:
            break
    return out


def check_target(pid: int) -> proc.Stat:
    """Refuse what must never be touched, before touching anything."""
    if pid <= 0:
        raise errors.ProcessStateError(pid, "not a valid pid")
    try:
        st = proc.read_stat(pid)
    except errors.NoSuchProcess:
        raise errors.NoSuchProcess("dump", errno.ESRCH, pid, "no such process") from None
    if pid == 1:
        raise errors.ProcessStateError(pid, "is init")
    if st.flags & proc.PF_KTHREAD:
        raise errors.ProcessStateError(pid, "is a kernel thread")
    if pid in _ancestors():
        raise errors.ProcessStateError(pid, "is migrate itself or one of its ancestors")
    if st.state in ("Z", "X"):
        raise errors.ProcessStateError(pid, "is a zombie")
    status = proc.read_status(pid)
    tracer = int(status.get("TracerPid", "0"))
    if tracer:
        raise errors.ProcessStateError(pid, f"is already traced by pid {tracer}")
    return st


STOP_SIGNALS = (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)


def _leave_group_stop(pid: int, tids: list[int]) -> None:
    """A task in group stop cannot run remote syscalls: a restart from the
    stop traps straight back into it.  SIGCONT ends the group stop (the
    signal itself is suppressed at its delivery stop, no handler runs), and
    each thread is interrupted again; thaw() and restore stop it again.  The
    SIGCONT stays queued (a traced task queues even ignored signals): the
    dump leaves it out, and the SIGSTOP of thaw() flushes it."""
    os.kill(pid, signal.SIGCONT)
    for tid in tids:
        ptrace.interrupt(tid)
        ptrace.cont(tid, 0)   # out of the (traced) group stop, into the interrupt
        while True:
            st = ptrace.wait(tid)
            if st.exited:
                raise errors.NoSuchProcess("freeze", errno.ESRCH, tid, st.describe())
            if st.is_event_stop and st.sig == signal.SIGTRAP:
                break
            if st.is_event_stop or st.event:
                ptrace.cont(tid, 0)
            else:  # signal-delivery stop: drop our SIGCONT, re-inject others
                ptrace.cont(tid, 0 if st.sig == signal.SIGCONT else st.sig)
    log.info("pid %d: was stopped; continued for the dump, will be stopped again", pid)


def freeze(pid: int) -> Frozen:
    """Seize every thread and stop it; repeat until no new thread appears."""
    seized: list[int] = []
    unwaited: list[int] = []      # interrupted, not yet seen in their stop
    stopped_before = proc.read_stat(pid).state == "T"
    try:
        while True:
            tids = proc.list_threads(pid)
            new = [t for t in tids if t not in seized]
            if not new:
                break
            # Every new thread is seized and interrupted before any is
            # waited for: they stop together, not one scheduling delay
            # after another (17 threads on 2 loaded cores: 4-17 ms -> ~1).
            for tid in new:
                try:
                    ptrace.seize(tid, ptrace.PTRACE_O_TRACESYSGOOD)
                except errors.AccessDenied as e:
                    raise errors.ProcessStateError(
                        pid, f"cannot trace thread {tid}: {e} (traced already, or "
                             "ptrace is restricted)") from None
                except errors.NoSuchProcess:
                    continue  # the thread exited meanwhile
                seized.append(tid)
                unwaited.append(tid)
                ptrace.interrupt(tid)
            while unwaited:
                st = ptrace.wait_interrupted(unwaited[0])
                unwaited.pop(0)
                if st.sig in STOP_SIGNALS:
                    stopped_before = True
        if stopped_before:
            _leave_group_stop(pid, seized)
        seized.sort(key=lambda t: (t != pid, t))     # the leader first
        regs = {tid: ptrace.getregs(tid) for tid in seized}
    except BaseException:
        for tid in seized:
            try:
                if tid in unwaited:      # PTRACE_DETACH needs it in its stop
                    ptrace.wait_interrupted(tid)
                ptrace.detach(tid)
            except errors.KernelError:
                pass
        raise
    log.info("pid %d: frozen (%d thread%s)", pid, len(seized), "s" if len(seized) > 1 else "")
    return Frozen(pid, seized, regs, stopped_before)


def thaw(fr: Frozen, leave_stopped: bool = False) -> None:
    """Let every thread go, as it was (or stopped, for --leave-stopped)."""
    if leave_stopped or fr.stopped:
        os.kill(fr.pid, signal.SIGSTOP)
    for tid in fr.tids:
        try:
            ptrace.detach(tid)
        except errors.NoSuchProcess:
            pass
    log.info("pid %d: released", fr.pid)


def kill(fr: Frozen) -> None:
    """Kill a frozen process after a complete dump (it never runs again)."""
    try:
        os.kill(fr.pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def reap_killed(fr: Frozen) -> None:
    """As tracer we see the exit first; collect it so the real parent can
    reap.  Tearing down a big address space takes a while: this is after
    the frozen time, which ended with the SIGKILL."""
    # Other threads first: the leader's exit is reported only after theirs.
    for tid in sorted(fr.tids, key=lambda t: t == fr.pid):
        try:
            while not ptrace.wait(tid).exited:
                pass
        except errors.KernelError:
            pass
    log.info("pid %d: killed after dump", fr.pid)
