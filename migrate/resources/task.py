"""Per-process attributes: comm, personality, umask, rlimits, creds, prctl bits."""

from __future__ import annotations

import errno
import logging
import os
import struct

from migrate import errors
from migrate.images._pb import core_pb2
from migrate.kernel import proc, syscalls, sysno
from migrate.resources import timers
from migrate.resources.taskctl import TaskCtl

log = logging.getLogger(__name__)

RLIM_NLIMITS = 16
RLIMIT_NAMES = ("CPU", "FSIZE", "DATA", "STACK", "CORE", "RSS", "NPROC", "NOFILE",
                "MEMLOCK", "AS", "LOCKS", "SIGPENDING", "MSGQUEUE", "NICE", "RTPRIO", "RTTIME")


def dump_rlimits(pid: int) -> list:
    return [core_pb2.rlimit_entry(resource=res, cur=cur, max=mx)
            for res, (cur, mx) in enumerate(proc.read_limits(pid))]


def restore_rlimits(pid: int, entries) -> None:
    """Set rlimits of the new task from outside (prlimit).  Raising a hard limit
    needs CAP_SYS_RESOURCE; without it the hard limit stays and the soft one is
    capped by it, with a warning (not a failure)."""
    for e in entries:
        cur_now, max_now = syscalls.prlimit(pid, e.resource)
        if (cur_now, max_now) == (e.cur, e.max):
            continue
        try:
            syscalls.set_prlimit(pid, e.resource, e.cur, e.max)
        except errors.AccessDenied:
            soft = min(e.cur, max_now)
            log.warning("pid %d: cannot raise hard RLIMIT_%s to %d (no CAP_SYS_RESOURCE); "
                        "keeping %d, soft %d", pid, RLIMIT_NAMES[e.resource], e.max,
                        max_now, soft)
            syscalls.set_prlimit(pid, e.resource, soft, max_now)


def dump_sched(tid: int) -> tuple[int, int, int]:
    """(policy with SCHED_RESET_ON_FORK, rt priority, nice) of one thread."""
    try:
        policy = os.sched_getscheduler(tid)
        prio = os.sched_getparam(tid).sched_priority
        nice = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError as e:
        raise errors.from_errno("sched_getscheduler", e.errno, tid) from e
    return policy, prio, nice


def restore_sched(tid: int, policy: int, prio: int, nice: int) -> None:
    try:
        if (policy, prio) != (os.sched_getscheduler(tid), os.sched_getparam(tid).sched_priority):
            os.sched_setscheduler(tid, policy, os.sched_param(prio))
        if os.getpriority(os.PRIO_PROCESS, tid) != nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except OSError as e:
        log.warning("thread %d: cannot restore scheduling (policy %d, priority %d, nice %d): %s",
                    tid, policy, prio, nice, os.strerror(e.errno))


def dump_creds(status: dict[str, str]) -> core_pb2.creds_entry:
    c = core_pb2.creds_entry(uid=[int(x) for x in status["Uid"].split()],
                             gid=[int(x) for x in status["Gid"].split()],
                             groups=[int(x) for x in status.get("Groups", "").split()])
    for k, f in (("CapInh", "cap_inh"), ("CapPrm", "cap_prm"), ("CapEff", "cap_eff"),
                 ("CapBnd", "cap_bnd"), ("CapAmb", "cap_amb")):
        if k in status:
            setattr(c, f, int(status[k], 16))
    c.no_new_privs = int(status.get("NoNewPrivs", "0"))
    c.seccomp_mode = int(status.get("Seccomp", "0"))
    return c


def check_creds(pid: int, c) -> None:
    if c.seccomp_mode:
        raise errors.UnsupportedResource(pid, "seccomp", f"seccomp mode {c.seccomp_mode}")


def restore_creds(ctl: TaskCtl, c) -> None:
    """Last of the privileged steps: groups, gids, then uids."""
    blob = struct.pack(f"<{len(c.groups)}I", *c.groups)
    ctl.call(sysno.setgroups, len(c.groups), ctl.put(blob) if blob else 0)
    if any(c.gid[:3]):
        ctl.call(sysno.setresgid, c.gid[0], c.gid[1], c.gid[2])
    if any(c.uid[:3]):
        ctl.call(sysno.setresuid, c.uid[0], c.uid[1], c.uid[2])
    if c.no_new_privs:
        ctl.call(sysno.prctl, 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS


def dump_task(ctl: TaskCtl, pid: int, status: dict[str, str]) -> core_pb2.task_core_entry:
    st = proc.read_stat(pid)
    t = core_pb2.task_core_entry(pid=pid, comm=st.comm, state=st.state)
    t.personality = int(proc.read_text(pid, "personality").strip(), 16)
    t.umask = int(status.get("Umask", "0022"), 8)
    t.rlimits.extend(dump_rlimits(pid))
    t.creds.CopyFrom(dump_creds(status))
    check_creds(pid, t.creds)
    ctl.call(sysno.prctl, syscalls.PR_GET_PDEATHSIG, ctl.scratch, 0, 0, 0)
    t.pdeath_sig = struct.unpack("<i", ctl.get(4))[0]
    t.dumpable = ctl.call(sysno.prctl, syscalls.PR_GET_DUMPABLE, 0, 0, 0, 0)
    t.thp_disabled = ctl.call(sysno.prctl, syscalls.PR_GET_THP_DISABLE, 0, 0, 0, 0)
    try:
        t.oom_score_adj = int(proc.read_text(pid, "oom_score_adj").strip())
    except errors.KernelError:
        pass
    return t


def restore_task(ctl: TaskCtl, t) -> None:
    """Per-process prctl state, by remote syscalls in the new task."""
    ctl.call(sysno.personality, t.personality)
    ctl.call(sysno.prctl, syscalls.PR_SET_NAME, ctl.put_str(t.comm[:15]), 0, 0, 0)
    ctl.call(sysno.umask, t.umask)
    if t.pdeath_sig:
        ctl.call(sysno.prctl, syscalls.PR_SET_PDEATHSIG, t.pdeath_sig, 0, 0, 0)
    if t.dumpable != 1:
        ctl.call(sysno.prctl, syscalls.PR_SET_DUMPABLE, t.dumpable, 0, 0, 0)
    if t.thp_disabled:
        ctl.call(sysno.prctl, syscalls.PR_SET_THP_DISABLE, 1, 0, 0, 0)


def restore_oom_score_adj(pid: int, value: int) -> None:
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        log.warning("pid %d: cannot set oom_score_adj %d: %s", pid, value,
                    os.strerror(e.errno))


NAMESPACES = ("mnt", "net", "pid", "ipc", "uts", "user", "cgroup", "time")


def check_unsupported(pid: int, status: dict[str, str]) -> None:
    """State this version cannot bring back, refused instead of lost silently."""
    timers.check(pid, proc.list_threads(pid))
    for ns in NAMESPACES:
        try:
            theirs = os.stat(f"/proc/{pid}/ns/{ns}").st_ino
            ours = os.stat(f"/proc/self/ns/{ns}").st_ino
        except FileNotFoundError:
            continue
        if theirs != ours:
            raise errors.UnsupportedResource(pid, "namespace", f"the process is in another "
                                                               f"{ns} namespace")
    uids = [int(x) for x in status["Uid"].split()]
    if any(uids) and int(status.get("CapPrm", "0"), 16):
        raise errors.UnsupportedResource(pid, "capabilities", "a non-root process with "
                                         "capabilities (they are not restored yet)")
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4] == str(pid):
                    raise errors.UnsupportedResource(pid, "file lock", f"{parts[1]} lock "
                                                     f"on inode {parts[5]} is not supported yet")
    except OSError:
        pass
