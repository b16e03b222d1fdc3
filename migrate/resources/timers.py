"""POSIX timers (timer_create(2)) and "time goes on" for every kind of timer.

Dump: /proc/PID/timers gives each timer's id, clock, notification and
sigev_value; ``timer_gettime`` and ``timer_getoverrun`` run in the frozen
task give its setting.  Restore: the timers are created again at their ids
with ``prctl(PR_TIMER_CREATE_RESTORE_IDS)`` (Linux 6.17: timer_create then
takes the wanted id from ``*created_timer_id``), or, on kernels without it,
in id order with fillers created and deleted for the gaps.

Time goes on: the time a task spends dumped counts against its timers, as if
it had kept running.  The elapsed time is measured with CLOCK_REALTIME, the
only clock two hosts share (monotonic and boot time start at each host's
boot): ``elapsed = realtime(restore) - dump_realtime_ns``, never negative.  A
timer on a wall or boot clock is re-armed at the absolute time
``now(its clock) + remaining - elapsed`` (TIMER_ABSTIME): if that is already
past it fires at once and the kernel counts the periods missed as overruns,
as it would have.  CPU-time clocks do not advance while a task is frozen or
absent, so their remaining time is kept as is.
"""

from __future__ import annotations

import logging
import struct
import time

from migrate import errors
from migrate.kernel import proc, sysno
from migrate.resources.taskctl import CallBatch, TaskCtl

log = logging.getLogger(__name__)

ITIMERSPEC = struct.Struct("<qqqq")      # it_interval {sec, nsec}, it_value {sec, nsec}
SIGEVENT = struct.Struct("<Qiii44x")     # sigev_value, signo, notify, _tid; 64 bytes
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
NOTIFY = {"signal": SIGEV_SIGNAL, "none": SIGEV_NONE, "thread": SIGEV_THREAD}
TIMER_ABSTIME = 1
PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, RESTORE_IDS_ON = 77, 0, 1
MAX_FILLERS = 4096

# Clocks whose time runs while the task is frozen (or on its way to another
# host); the others are CPU-time clocks (negative ids, man 3 clock_getcpuclockid).
CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID = 0, 1, 2, 3
CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM, CLOCK_BOOTTIME_ALARM, CLOCK_TAI = 7, 8, 9, 11
RUNNING_CLOCKS = {CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME, CLOCK_REALTIME_ALARM,
                  CLOCK_BOOTTIME_ALARM, CLOCK_TAI}
BASE_CLOCK = {CLOCK_REALTIME_ALARM: CLOCK_REALTIME, CLOCK_BOOTTIME_ALARM: CLOCK_BOOTTIME}
CPUCLOCK_PERTHREAD = 4
NSEC = 1_000_000_000


def now_realtime_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_REALTIME)


def elapsed_ns(dump_realtime_ns: int) -> int:
    """Time since the dump, by the wall clock; 0 for an image without it."""
    if not dump_realtime_ns:
        return 0
    return max(0, now_realtime_ns() - dump_realtime_ns)


def cpu_clock_owner(clockid: int) -> tuple[int, bool]:
    """(pid or tid, per thread) of a CPU-time clock id; pid 0 means the caller
    (include/linux/posix-timers.h: CPUCLOCK_PID, CPUCLOCK_PERTHREAD_MASK)."""
    return ~(clockid >> 3), bool(clockid & CPUCLOCK_PERTHREAD)


def check(pid: int, tids: list[int]) -> list[proc.PosixTimer]:
    """The timers, refused if one cannot be created again the same way."""
    try:
        found = proc.read_timers(pid)
    except ValueError as e:
        raise errors.UnsupportedResource(pid, "posix timer", str(e)) from None
    for t in found:
        what = f"timer {t.id}"
        if t.notify_pid not in (tids if t.to_thread else [pid]):
            raise errors.UnsupportedResource(pid, "posix timer", f"{what} notifies "
                                             f"{t.notify_pid}, not a thread of this process")
        if t.clockid < 0:
            owner, per_thread = cpu_clock_owner(t.clockid)
            if owner == 0 and per_thread and len(tids) > 1:
                raise errors.UnsupportedResource(
                    pid, "posix timer", f"{what} measures the CPU time of the thread that "
                    "created it, which /proc does not tell in a multi-threaded process")
            if owner and owner not in (tids if per_thread else [pid]):
                raise errors.UnsupportedResource(
                    pid, "posix timer", f"{what} measures the CPU time of pid {owner}, "
                    "another process")
        elif t.clockid not in RUNNING_CLOCKS:
            raise errors.UnsupportedResource(pid, "posix timer", f"{what} on clock "
                                             f"{t.clockid}, unknown here")
    return found


def remaining(q: CallBatch, ids) -> dict[int, int]:
    """Each timer's time left (ns, 0: disarmed), as timer_gettime says:
    the dict is filled once ``q`` ran."""
    out: dict[int, int] = {}
    for i in ids:
        addr = q.out(ITIMERSPEC.size)

        def got(_, i=i, addr=addr):
            _, _, vsec, vnsec = ITIMERSPEC.unpack(q.read(addr, ITIMERSPEC.size))
            out[i] = vsec * NSEC + vnsec
        q.add(sysno.timer_gettime, i, addr, then=got, what=f"timer_gettime({i})")
    return out


def expired_between(before: dict[int, int], after: dict[int, int]) -> list[int]:
    """Timers that expired between two ``remaining`` reads: a periodic one
    was reloaded (more time left than before), a one-shot one disarmed."""
    return [i for i, v in before.items()
            if v and (after.get(i, 0) > v or after.get(i, 0) == 0)]


def dump(q: CallBatch, core, tids: list[int],
         found: list[proc.PosixTimer] | None = None) -> dict[int, int]:
    """Fill ``core.posix_timers`` and ``core.dump_realtime_ns``, once ``q``
    ran: remote timer_gettime/timer_getoverrun in the frozen task (they
    change nothing).  ``found``: ``check``'s list, if it ran.  Returns each
    timer's time left as read (``remaining``'s form; filled by the run)."""
    core.dump_realtime_ns = now_realtime_ns()
    raw: dict[int, int] = {}
    for t in (check(q.ctl.pid, tids) if found is None else found):
        addr = q.out(ITIMERSPEC.size)
        setting: list[int] = []

        def got(_, t=t, addr=addr, setting=setting):
            isec, insec, vsec, vnsec = ITIMERSPEC.unpack(q.read(addr, ITIMERSPEC.size))
            value = vsec * NSEC + vnsec
            raw[t.id] = value
            if value and t.clockid in RUNNING_CLOCKS:
                # Read after dump_realtime_ns: count the time since, or the
                # restored timer would fire early by it (never fire early).
                value += now_realtime_ns() - core.dump_realtime_ns
                vsec, vnsec = divmod(value, NSEC)
            setting[:] = [isec, insec, vsec, vnsec]

        def add(overrun, t=t, setting=setting):
            isec, insec, vsec, vnsec = setting
            notify = NOTIFY[t.notify] | (SIGEV_THREAD_ID if t.to_thread else 0)
            core.posix_timers.add(id=t.id, clockid=t.clockid, notify=notify, signo=t.signo,
                                  sival=t.sival, notify_tid=t.notify_pid, interval_sec=isec,
                                  interval_nsec=insec, value_sec=vsec, value_nsec=vnsec,
                                  overrun=overrun)
        q.add(sysno.timer_gettime, t.id, addr, then=got, what=f"timer_gettime({t.id})")
        q.add(sysno.timer_getoverrun, t.id, then=add, what=f"timer_getoverrun({t.id})")
    return raw


def rearm(clockid: int, value_ns: int, elapsed: int) -> tuple[int, int]:
    """(flags, it_value in ns) to set a timer that had ``value_ns`` left at
    the dump, ``elapsed`` ns ago."""
    if clockid in RUNNING_CLOCKS:
        # An alarm clock reads as its base clock (and clock_gettime of it
        # fails on machines without an RTC alarm).
        base = BASE_CLOCK.get(clockid, clockid)
        at = time.clock_gettime_ns(base) + value_ns - elapsed
        return TIMER_ABSTIME, max(at, 1)
    return 0, value_ns


def _create(ctl: TaskCtl, e, restore_ids: bool) -> int:
    sev = ctl.put(SIGEVENT.pack(e.sival, e.signo, e.notify, e.notify_tid), 0)
    idp = ctl.put(struct.pack("<i", e.id if restore_ids else 0), SIGEVENT.size)
    ctl.call(sysno.timer_create, e.clockid, sev, idp, what=f"timer_create(id {e.id})")
    return struct.unpack("<i", ctl.get(4, SIGEVENT.size))[0]


def restore(ctl: TaskCtl, core) -> None:
    """Create every timer at its id, then arm them ("time goes on").  Runs in
    the leader once every thread exists (SIGEV_THREAD_ID needs its thread)."""
    entries = sorted(core.posix_timers, key=lambda e: e.id)
    if not entries:
        return
    pid = ctl.pid
    restore_ids = ctl.call(sysno.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_ON, 0, 0, 0,
                           check=False) == 0
    fillers = []
    try:
        for e in entries:
            got = _create(ctl, e, restore_ids)
            while got < e.id and not restore_ids and len(fillers) < MAX_FILLERS:
                fillers.append(got)
                got = _create(ctl, e, False)
            if got != e.id:
                raise errors.RestoreError(f"pid {pid}: posix timer {e.id} was created as {got}")
    finally:
        if restore_ids:
            ctl.call(sysno.prctl, PR_TIMER_CREATE_RESTORE_IDS, RESTORE_IDS_OFF, 0, 0, 0)
        for f in fillers:
            ctl.call(sysno.timer_delete, f)
    elapsed = elapsed_ns(core.dump_realtime_ns)
    for e in entries:
        value = e.value_sec * NSEC + e.value_nsec
        if not value:
            continue                     # disarmed
        flags, at = rearm(e.clockid, value, elapsed)
        its = ctl.put(ITIMERSPEC.pack(e.interval_sec, e.interval_nsec, at // NSEC, at % NSEC))
        ctl.call(sysno.timer_settime, e.id, flags, its, 0, what=f"timer_settime({e.id})")
    log.debug("pid %d: %d posix timers created (%s), %.3f s elapsed since the dump", pid,
              len(entries), "at their ids" if restore_ids else f"{len(fillers)} fillers",
              elapsed / NSEC)
