"""Per-process attributes: comm, personality, umask, rlimits, creds and
capabilities, prctl bits."""

from __future__ import annotations

import errno
import logging
import os
import struct

from migrate import errors
from migrate.images._pb import core_pb2
from migrate.kernel import proc, syscalls, sysno
from migrate.resources import timers
from migrate.resources.taskctl import CallBatch

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


CRED_FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
               "NoNewPrivs")


def check_thread_creds(pid: int, tids: list[int], status: dict[str, str],
                       thread_status: dict[int, dict[str, str]] | None = None) -> None:
    """Credentials are per thread, the image holds one set: refuse threads
    whose credentials differ from the leader's (a capset(2) in one thread)."""
    for tid in tids:
        if tid == pid:
            continue
        st = thread_status[tid] if thread_status is not None else \
            proc.parse_status(proc.read_text(pid, f"task/{tid}/status"))
        for k in CRED_FIELDS:
            if st.get(k) != status.get(k):
                raise errors.UnsupportedResource(
                    pid, "credentials", f"thread {tid} has {k} {st.get(k)}, the leader "
                    f"{status.get(k)}: per-thread credentials are not kept")


# include/uapi/linux/capability.h, prctl.h, securebits.h
CAP_VERSION_3 = 0x20080522
CAP_HEADER = struct.Struct("<Ii")
CAP_DATA = struct.Struct("<III")          # effective, permitted, inheritable; two of them
PR_CAPBSET_DROP, PR_SET_KEEPCAPS = 24, 8
PR_GET_SECUREBITS, PR_SET_SECUREBITS = 27, 28
PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
PR_SET_NO_NEW_PRIVS = 38
SECBIT_KEEP_CAPS = 1 << 4
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
PR_GET_CHILD_SUBREAPER = 37
PR_SET_MDWE, PR_GET_MDWE = 65, 66


def _capset(q: CallBatch, eff: int, prm: int, inh: int) -> None:
    hdr = q.put(CAP_HEADER.pack(CAP_VERSION_3, 0) +
                CAP_DATA.pack(eff & 0xFFFFFFFF, prm & 0xFFFFFFFF, inh & 0xFFFFFFFF) +
                CAP_DATA.pack(eff >> 32, prm >> 32, inh >> 32))
    q.add(sysno.capset, hdr, hdr + CAP_HEADER.size,
          what=f"capset(eff {eff:#x}, prm {prm:#x}, inh {inh:#x})")


def _set_fsids(q: CallBatch, c) -> None:
    """setresuid/setresgid made fsuid/fsgid the effective ids; put back
    others.  setfsuid(2) never fails, it returns the previous id: ask again
    with -1 to see whether the change took."""
    tid = q.ctl.pid
    for nr, ids, what in ((sysno.setfsgid, c.gid, "fsgid"), (sysno.setfsuid, c.uid, "fsuid")):
        if len(ids) < 4 or ids[3] == ids[1]:
            continue

        def check(got, want=ids[3], what=what):
            if got != want:
                raise errors.RestoreError(f"thread {tid}: {what} is {got}, cannot set {want}")
        q.add(nr, ids[3], check=False)
        q.add(nr, 0xFFFFFFFF, check=False, then=check)


GROUPS_IN_BATCH = 1024      # bytes of supplementary groups that go in a CallBatch


def restore_creds(q: CallBatch, c, now: dict[str, str]) -> None:
    """Last of the privileged steps, in each thread (credentials are per
    thread; queued in ``q``, of that thread): bounding set, groups, gids,
    uids, then the capability sets, ambient set and securebits, then
    no_new_privs.  ``now``: the thread's /proc status before the change
    (the threads of a new process have the creds of the tool that forked it).

    man 7 capabilities: setresuid from uid 0 to non-zero uids clears the
    permitted and effective sets unless SECBIT_KEEP_CAPS is set, so keep_caps
    is set first; effective comes back with a capset of the whole permitted
    set, which also gives CAP_SETPCAP for the securebits; ambient caps are
    raised while they are in permitted and inheritable and before
    SECBIT_NO_CAP_AMBIENT_RAISE may be set; the final capset lowers
    everything to the image.  Caps this tool lacks (here CAP_SYS_RESOURCE)
    cannot be given: they are left out with a warning.  A failed step raises
    when ``q`` runs (the steps after it ran too: the restore kills the
    process)."""
    tid = q.ctl.pid
    have_prm = int(now["CapPrm"], 16)
    have_bnd = int(now["CapBnd"], 16)
    missing = (c.cap_prm | c.cap_eff | c.cap_amb) & ~have_prm
    if missing:
        log.warning("thread %d: capabilities %#x cannot be given back (this tool lacks them)",
                    tid, missing)
    eff, prm, amb = c.cap_eff & have_prm, c.cap_prm & have_prm, c.cap_amb & have_prm
    inh = c.cap_inh
    bnd = c.cap_bnd
    for cap in range(64):
        if have_bnd >> cap & 1 and not bnd >> cap & 1:
            q.add(sysno.prctl, PR_CAPBSET_DROP, cap, 0, 0, 0, what=f"CAPBSET_DROP({cap})")
    nonroot = any(c.uid[:3])
    # Anything but "root with all our caps" needs the caps back after the uid change.
    caps_work = ((eff, prm, inh, amb, c.securebits) !=
                 (have_prm, have_prm, int(now["CapInh"], 16), 0, 0))
    if nonroot and caps_work:
        q.add(sysno.prctl, PR_SET_KEEPCAPS, 1, 0, 0, 0, what="prctl(PR_SET_KEEPCAPS)")

    blob = struct.pack(f"<{len(c.groups)}I", *c.groups)
    if len(blob) <= GROUPS_IN_BATCH:
        q.add(sysno.setgroups, len(c.groups), q.put(blob) if blob else 0)
    else:       # more than the batch's room: on its own, in the whole scratch area
        q.run()
        q.ctl.call(sysno.setgroups, len(c.groups), q.ctl.put(blob))
    if any(c.gid[:3]):
        q.add(sysno.setresgid, c.gid[0], c.gid[1], c.gid[2])
    if nonroot:
        q.add(sysno.setresuid, c.uid[0], c.uid[1], c.uid[2])

    if caps_work:
        _capset(q, have_prm, have_prm, inh)          # effective back: CAP_SETPCAP
        _set_fsids(q, c)
        for cap in range(64):
            if amb >> cap & 1:
                q.add(sysno.prctl, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0,
                      what=f"PR_CAP_AMBIENT_RAISE({cap})")
        bits: list[int] = []
        q.add(sysno.prctl, PR_GET_SECUREBITS, 0, 0, 0, 0, then=bits.append)
        q.run()
        if bits[0] != c.securebits:
            q.add(sysno.prctl, PR_SET_SECUREBITS, c.securebits, 0, 0, 0,
                  what=f"PR_SET_SECUREBITS({c.securebits:#x})")
        _capset(q, eff, prm, inh)
    else:
        _set_fsids(q, c)
    if c.no_new_privs:
        q.add(sysno.prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, what="prctl(PR_SET_NO_NEW_PRIVS)")


def dump_task(q: CallBatch, pid: int, status: dict[str, str],
              st: proc.Stat | None = None) -> core_pb2.task_core_entry:
    """The process's attributes; the prctl queries go in ``q`` (the entry
    is complete once it ran).  ``st``: /proc/PID/stat, if read already."""
    st = st or proc.read_stat(pid)
    t = core_pb2.task_core_entry(pid=pid, comm=st.comm, state=st.state)
    t.personality = int(proc.read_text(pid, "personality").strip(), 16)
    t.umask = int(status.get("Umask", "0022"), 8)
    t.rlimits.extend(dump_rlimits(pid))
    t.creds.CopyFrom(dump_creds(status))
    pdeath, subreaper = q.out(4), q.out(4)

    def set_(field):
        return lambda res: setattr(t, field, res)
    q.add(sysno.prctl, syscalls.PR_GET_PDEATHSIG, pdeath, 0, 0, 0, then=lambda _: setattr(
        t, "pdeath_sig", struct.unpack("<i", q.read(pdeath, 4))[0]))
    q.add(sysno.prctl, syscalls.PR_GET_DUMPABLE, 0, 0, 0, 0, then=set_("dumpable"))
    q.add(sysno.prctl, syscalls.PR_GET_THP_DISABLE, 0, 0, 0, 0, then=set_("thp_disabled"))
    q.add(sysno.prctl, PR_GET_SECUREBITS, 0, 0, 0, 0,
          then=lambda res: setattr(t.creds, "securebits", res))
    q.add(sysno.prctl, PR_GET_CHILD_SUBREAPER, subreaper, 0, 0, 0, then=lambda _: setattr(
        t, "child_subreaper", struct.unpack("<i", q.read(subreaper, 4))[0] != 0))
    q.add(sysno.prctl, PR_GET_TIMERSLACK, 0, 0, 0, 0, then=set_("timerslack_ns"))
    # -EINVAL: a kernel without MDWE
    q.add(sysno.prctl, PR_GET_MDWE, 0, 0, 0, 0, check=False,
          then=lambda res: setattr(t, "mdwe_flags", max(res, 0)))
    try:
        t.oom_score_adj = int(proc.read_text(pid, "oom_score_adj").strip())
    except errors.KernelError:
        pass
    return t


def restore_task(q: CallBatch, t) -> None:
    """Per-process prctl state, by remote syscalls in the new task (queued in ``q``)."""
    q.add(sysno.personality, t.personality)
    q.add(sysno.prctl, syscalls.PR_SET_NAME, q.put_str(t.comm[:15]), 0, 0, 0,
          what="prctl(PR_SET_NAME)")
    q.add(sysno.umask, t.umask)
    if t.thp_disabled:
        # Linux 6.18: PR_GET_THP_DISABLE returns 1 | flags (PR_THP_DISABLE_EXCEPT_ADVISED 2)
        q.add(sysno.prctl, syscalls.PR_SET_THP_DISABLE, 1, t.thp_disabled & ~1, 0, 0,
              what="prctl(PR_SET_THP_DISABLE)")
    if t.child_subreaper:
        q.add(sysno.prctl, syscalls.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0,
              what="prctl(PR_SET_CHILD_SUBREAPER)")
    if t.timerslack_ns:
        q.add(sysno.prctl, PR_SET_TIMERSLACK, t.timerslack_ns, 0, 0, 0,
              what="prctl(PR_SET_TIMERSLACK)")


CLONE_PARENT = 0x8000


def root_clone_args(t, detach: bool) -> dict:
    """clone3 flags for the restored process itself.  With a pdeath_sig and
    ``-d`` (the tool exits once the process runs) the process is made the
    tool's sibling (CLONE_PARENT): as the tool's child it would get its
    pdeath_sig the moment the tool exits.  Its parent is then whoever ran
    `migrate restore`, the nearest thing to the parent it had at the dump.
    clone3 wants exit_signal 0 with CLONE_PARENT (the parent's is used)."""
    if detach and t.pdeath_sig:
        return {"flags": CLONE_PARENT, "exit_signal": 0}
    return {}


def restore_after_creds(q: CallBatch, t) -> None:
    """What a credential change resets (kernel/cred.c commit_creds: a new
    euid/egid/fsuid/fsgid or fewer caps set dumpable to suid_dumpable and
    clear pdeath_signal), so set after every thread's creds; and MDWE, which
    can never be cleared again, last.  In the leader (queued in its ``q``)."""
    if t.dumpable in (0, 1):     # set even where it did not change: it takes no privilege
        q.add(sysno.prctl, syscalls.PR_SET_DUMPABLE, t.dumpable, 0, 0, 0,
              what="prctl(PR_SET_DUMPABLE)")
    if t.pdeath_sig:
        q.add(sysno.prctl, syscalls.PR_SET_PDEATHSIG, t.pdeath_sig, 0, 0, 0,
              what="prctl(PR_SET_PDEATHSIG)")
    if t.mdwe_flags:
        q.add(sysno.prctl, PR_SET_MDWE, t.mdwe_flags, 0, 0, 0, what="prctl(PR_SET_MDWE)")


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


_OUR_NS: dict[str, int | None] = {}


def _our_ns(ns: str) -> int | None:
    if ns not in _OUR_NS:
        try:
            _OUR_NS[ns] = os.stat(f"/proc/self/ns/{ns}").st_ino
        except FileNotFoundError:
            _OUR_NS[ns] = None
    return _OUR_NS[ns]


def check_unsupported(pid: int, status: dict[str, str], tids: list[int] | None = None,
                      thread_status: dict[int, dict[str, str]] | None = None) -> list:
    """State this version cannot bring back, refused instead of lost silently.
    ``tids`` and each thread's parsed status, when the caller has them (a
    frozen process).  Returns the POSIX timers (timers.check)."""
    tids = proc.list_threads(pid) if tids is None else tids
    found = timers.check(pid, tids)
    check_thread_creds(pid, tids, status, thread_status)
    for ns in NAMESPACES:
        ours = _our_ns(ns)
        try:
            theirs = os.stat(f"/proc/{pid}/ns/{ns}").st_ino
        except FileNotFoundError:
            continue
        if ours is not None and theirs != ours:
            raise errors.UnsupportedResource(pid, "namespace", f"the process is in another "
                                                               f"{ns} namespace")
    return found
    # File locks: fdinfo shows every lock of each fd (resources/locks.py).
