"""Signals: dispositions, mask, pending queues, sigaltstack, interval timers."""

from __future__ import annotations

import struct

from migrate.images._pb import core_pb2
from migrate.kernel import ptrace, sysno
from migrate.resources.taskctl import CallBatch, TaskCtl

NSIG = 64
SIGKILL, SIGSTOP = 9, 19
KSIGACTION = struct.Struct("<QQQQ")   # handler, flags, restorer, mask (kernel layout)
STACK_T = struct.Struct("<QiiQ")      # ss_sp, ss_flags, pad, ss_size
ITIMERVAL = struct.Struct("<qqqq")    # it_interval {sec, usec}, it_value {sec, usec}
SS_DISABLE = 2
ITIMER_REAL = 0


def _set_in(status: dict, key: str) -> int:
    return int(status.get(key, "0"), 16)


def dump_sigactions(q: CallBatch, status: dict | None = None) -> list:
    """Every signal's action, complete once ``q`` ran.  With
    /proc/PID/status: only the signals it shows caught or ignored are read
    by remote rt_sigaction; the others are SIG_DFL (their sa_flags,
    meaningless for SIG_DFL, are not kept)."""
    out = []
    asked = ~0 if status is None else _set_in(status, "SigIgn") | _set_in(status, "SigCgt")
    for sig in range(1, NSIG + 1):
        if sig in (SIGKILL, SIGSTOP):
            continue
        e = core_pb2.sigaction_entry(sig=sig)
        out.append(e)
        if not asked >> (sig - 1) & 1:
            continue
        addr = q.out(KSIGACTION.size)

        def fill(_, e=e, addr=addr):
            e.handler, e.flags, e.restorer, e.mask = KSIGACTION.unpack(
                q.read(addr, KSIGACTION.size))
        q.add(sysno.rt_sigaction, sig, 0, addr, 8, then=fill)
    return out


def restore_sigactions(q: CallBatch, entries, status: dict | None = None) -> None:
    """Set every action (queued in ``q``); with the new task's
    /proc/PID/status, a SIG_DFL action is only set where the task has
    another one now."""
    now = ~0 if status is None else _set_in(status, "SigIgn") | _set_in(status, "SigCgt")
    todo = [e for e in entries
            if e.handler or e.flags or e.mask or e.restorer or now >> (e.sig - 1) & 1]
    # One buffer with every sigaction.
    blob = b"".join(KSIGACTION.pack(e.handler, e.flags, e.restorer, e.mask) for e in todo)
    base = q.put(blob) if blob else 0
    for i, e in enumerate(todo):
        q.add(sysno.rt_sigaction, e.sig, base + i * KSIGACTION.size, 0, 8,
              what=f"rt_sigaction({e.sig})")


def dump_sigaltstack(q: CallBatch, t) -> None:
    """``t.sigaltstack`` (a thread_core_entry), once ``q`` (in that thread) ran."""
    addr = q.out(STACK_T.size)

    def fill(_):
        sp, flags, _pad, size = STACK_T.unpack(q.read(addr, STACK_T.size))
        t.sigaltstack.CopyFrom(core_pb2.sigaltstack_entry(ss_sp=sp, ss_flags=flags,
                                                          ss_size=size))
    q.add(sysno.sigaltstack, 0, addr, then=fill)


def restore_sigaltstack(q: CallBatch, e) -> None:
    flags = e.ss_flags & ~1  # SS_ONSTACK is a state, not a setting
    if flags & SS_DISABLE:
        addr = q.put(STACK_T.pack(0, SS_DISABLE, 0, 0))
    else:
        addr = q.put(STACK_T.pack(e.ss_sp, flags, 0, e.ss_size))
    q.add(sysno.sigaltstack, addr, 0)


def dump_itimers(q: CallBatch) -> list:
    """ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF, complete once ``q`` ran."""
    out = []
    for which in range(3):
        e = core_pb2.itimer_entry()
        out.append(e)
        addr = q.out(ITIMERVAL.size)

        def fill(_, e=e, addr=addr):
            e.interval_sec, e.interval_usec, e.value_sec, e.value_usec = ITIMERVAL.unpack(
                q.read(addr, ITIMERVAL.size))
        q.add(sysno.getitimer, which, addr, then=fill)
    return out


def restore_itimers(q: CallBatch, entries, elapsed_ns: int = 0) -> None:
    """``elapsed_ns``: time since the dump (resources/timers.py), taken off
    ITIMER_REAL, which counts wall time; VIRTUAL and PROF count the task's
    CPU time, which did not run meanwhile.  A timer whose time has passed
    fires as soon as the task runs (1 us)."""
    for which, e in enumerate(entries):
        value = e.value_sec * 1_000_000 + e.value_usec
        if not value:
            continue  # disarmed: nothing to set in a fresh task
        if which == ITIMER_REAL:
            value = max(1, value - elapsed_ns // 1000)
        addr = q.put(ITIMERVAL.pack(e.interval_sec, e.interval_usec,
                                    value // 1_000_000, value % 1_000_000))
        q.add(sysno.setitimer, which, addr, 0)


SIGCONT = 18
SI_USER = 0


def dump_pending(pid: int, shared: bool, drop_sigcont_from: int | None = None) -> list[bytes]:
    """Queued signals (siginfo_t each).  ``drop_sigcont_from``: a SIGCONT that
    pid sent (freezing a stopped task) is ours, not the task's."""
    out = ptrace.peek_siginfo(pid, shared)
    if drop_sigcont_from is not None:
        for i, info in enumerate(out):
            signo, _errno, code, si_pid = struct.unpack_from("<iii4xi", info)
            if signo == SIGCONT and code == SI_USER and si_pid == drop_sigcont_from:
                del out[i]
                break
    return out


def restore_pending(ctl: TaskCtl, tgid: int, tid: int, private: list[bytes],
                    shared: list[bytes]) -> None:
    """Queue the signals again; the task sends them to itself, so any si_code is allowed
    (kernel/signal.c: do_rt_sigqueueinfo checks si_code only for other tasks)."""
    for info in shared:
        sig = struct.unpack_from("<i", info)[0]
        addr = ctl.put(info)
        ctl.call(sysno.rt_sigqueueinfo, tgid, sig, addr, what=f"rt_sigqueueinfo({sig})")
    for info in private:
        sig = struct.unpack_from("<i", info)[0]
        addr = ctl.put(info)
        ctl.call(sysno.rt_tgsigqueueinfo, tgid, tid, sig, addr,
                 what=f"rt_tgsigqueueinfo({sig})")
