"""Signals: dispositions, mask, pending queues, sigaltstack, interval timers."""

from __future__ import annotations

import struct

from migrate import errors
from migrate.images._pb import core_pb2
from migrate.kernel import ptrace, sysno
from migrate.resources.taskctl import TaskCtl

NSIG = 64
SIGKILL, SIGSTOP = 9, 19
KSIGACTION = struct.Struct("<QQQQ")   # handler, flags, restorer, mask (kernel layout)
SIGACTIONS_AT = 8448                  # scratch offset: after a batch table (taskctl.BATCH_MAX)
STACK_T = struct.Struct("<QiiQ")      # ss_sp, ss_flags, pad, ss_size
ITIMERVAL = struct.Struct("<qqqq")    # it_interval {sec, usec}, it_value {sec, usec}
SS_DISABLE = 2
ITIMER_REAL = 0


def _set_in(status: dict, key: str) -> int:
    return int(status.get(key, "0"), 16)


def dump_sigactions(ctl: TaskCtl, status: dict | None = None) -> list:
    """Every signal's action.  With /proc/PID/status: only the signals it
    shows caught or ignored are read by remote rt_sigaction; the others
    are SIG_DFL (their sa_flags, meaningless for SIG_DFL, are not kept)."""
    out = []
    asked = ~0 if status is None else _set_in(status, "SigIgn") | _set_in(status, "SigCgt")
    for sig in range(1, NSIG + 1):
        if sig in (SIGKILL, SIGSTOP):
            continue
        if not asked >> (sig - 1) & 1:
            out.append(core_pb2.sigaction_entry(sig=sig))
            continue
        ctl.call(sysno.rt_sigaction, sig, 0, ctl.scratch, 8)
        h, fl, rest, mask = KSIGACTION.unpack(ctl.get(KSIGACTION.size))
        out.append(core_pb2.sigaction_entry(sig=sig, handler=h, flags=fl, restorer=rest,
                                            mask=mask))
    return out


def restore_sigactions(ctl: TaskCtl, entries, status: dict | None = None) -> None:
    """Set every action; with the new task's /proc/PID/status, a SIG_DFL
    action is only set where the task has another one now."""
    now = ~0 if status is None else _set_in(status, "SigIgn") | _set_in(status, "SigCgt")
    todo = [e for e in entries
            if e.handler or e.flags or e.mask or e.restorer or now >> (e.sig - 1) & 1]
    # One buffer with every sigaction (after the batch table), then one batch.
    blob = b"".join(KSIGACTION.pack(e.handler, e.flags, e.restorer, e.mask) for e in todo)
    base = ctl.put(blob, SIGACTIONS_AT) if blob else 0
    got = ctl.batch([(sysno.rt_sigaction, (e.sig, base + i * KSIGACTION.size, 0, 8))
                     for i, e in enumerate(todo)])
    for e, res in zip(todo, got):
        if res < 0:
            raise errors.from_errno(f"remote rt_sigaction({e.sig})", -res, ctl.pid)


def dump_sigaltstack(ctl: TaskCtl):
    ctl.call(sysno.sigaltstack, 0, ctl.scratch)
    sp, flags, _, size = STACK_T.unpack(ctl.get(STACK_T.size))
    return core_pb2.sigaltstack_entry(ss_sp=sp, ss_flags=flags, ss_size=size)


def restore_sigaltstack(ctl: TaskCtl, e) -> None:
    flags = e.ss_flags & ~1  # SS_ONSTACK is a state, not a setting
    if flags & SS_DISABLE:
        addr = ctl.put(STACK_T.pack(0, SS_DISABLE, 0, 0))
    else:
        addr = ctl.put(STACK_T.pack(e.ss_sp, flags, 0, e.ss_size))
    ctl.call(sysno.sigaltstack, addr, 0)


def dump_itimers(ctl: TaskCtl) -> list:
    out = []
    for which in range(3):  # ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF
        ctl.call(sysno.getitimer, which, ctl.scratch)
        isec, iusec, vsec, vusec = ITIMERVAL.unpack(ctl.get(ITIMERVAL.size))
        out.append(core_pb2.itimer_entry(interval_sec=isec, interval_usec=iusec,
                                         value_sec=vsec, value_usec=vusec))
    return out


def restore_itimers(ctl: TaskCtl, entries, elapsed_ns: int = 0) -> None:
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
        addr = ctl.put(ITIMERVAL.pack(e.interval_sec, e.interval_usec,
                                      value // 1_000_000, value % 1_000_000))
        ctl.call(sysno.setitimer, which, addr, 0)


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
