"""CPU throttling of a process tree through a cgroup of ours (auto-converge).

QEMU's auto-converge takes a percentage of the vCPUs' time away
(cpu-throttle-initial, -increment, max-cpu-throttle); a process tree has no
vCPUs, so ``apply(percent)`` moves every task of the tree into a cgroup of
ours, ``migrate-throttle-<rootpid>-<random>``, and gives it a CFS bandwidth
quota of ``(100 - percent)%`` of the most CPU time the tree could get: one
period per CPU it may run on (``sched_getaffinity`` of the root) or per
thread, whichever is fewer.  So 80 % leaves a single-threaded busy loop 20 %
of one core, and a 4-thread tree on 2 CPUs 40 % of one core (20 % of two).
A tree that used less than that capacity feels the throttle only once the
quota falls below what it uses (a known gap: we do not sample its usage).

Two interfaces (Documentation/admin-guide/cgroup-v2.rst "cpu.max",
Documentation/scheduler/sched-bwc.rst for v1):
- cgroup v2 where its cpu controller is available (``cgroup.controllers`` of
  the v2 mount lists ``cpu``): our cgroup is made at the top of the v2
  hierarchy (``+cpu`` written to its ``cgroup.subtree_control`` if missing),
  processes go in by ``cgroup.procs`` and the quota is ``cpu.max``.  Known
  gap: a tree in a cgroup with a tighter cpu.max of its own escapes it while
  throttled, and a hierarchy whose visible top holds processes (a delegated
  container) cannot enable ``+cpu``: ThrottleError.
- else cgroup v1's cpu controller (this project's hybrid machine): our cgroup
  is made inside the root process's own cpu cgroup, so limits above it still
  apply; every thread goes in by ``tasks`` and the quota is
  ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``.

Each task's cgroup is recorded from /proc/PID/task/TID/cgroup before it is
moved; ``release()`` moves each back (tasks that appeared meanwhile, children
forked inside our cgroup, go to the root's original cgroup), then removes our
cgroup.  Tasks that exit meanwhile are skipped.  ``release()`` is safe to
call twice and runs when ``apply()`` fails half-way.  ``remove_stale()``
cleans up after an orchestrator that died while throttling.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import time

from migrate import errors

log = logging.getLogger(__name__)

PERIOD_US = 100_000          # the kernel's default cfs period
MIN_QUOTA_US = 1_000         # the kernel refuses less (sched-bwc.rst)
RMDIR_WAIT_S = 2.0           # exiting tasks leave the cgroup asynchronously
NAME_PREFIX = "migrate-throttle-"


class _Hierarchy:
    """Where the cpu controller is mounted: ``version`` 1 or 2, the mount point
    and the cgroup path the mount shows at its top (/ unless namespaced)."""

    def __init__(self, version: int, mountpoint: str, mount_root: str) -> None:
        self.version = version
        self.mountpoint = mountpoint
        self.mount_root = mount_root

    def fs_path(self, cgroup: str) -> str:
        """The directory of cgroup ``cgroup`` (as /proc/PID/cgroup names it)."""
        root = self.mount_root.rstrip("/")
        if cgroup != root and not cgroup.startswith(root + "/"):
            raise errors.ThrottleError(cgroup, f"outside the mount at {self.mountpoint}")
        return os.path.join(self.mountpoint, cgroup[len(root):].lstrip("/"))


def _mounts(mountinfo: str = "/proc/self/mountinfo"):
    """(mount root, mount point, fs type, super options) of every mount (man 5 proc)."""
    with open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            a, b = left.split(), right.split()
            if len(a) >= 5 and len(b) >= 3:
                yield a[3], a[4].replace("\\040", " "), b[0], b[2]


def find_hierarchy(mountinfo: str = "/proc/self/mountinfo") -> _Hierarchy:
    """cgroup v2 if its cpu controller is available, else v1's cpu hierarchy."""
    mounts = list(_mounts(mountinfo))
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2":
            try:
                with open(os.path.join(point, "cgroup.controllers")) as f:
                    if "cpu" in f.read().split():
                        return _Hierarchy(2, point, root)
            except OSError:
                pass
    for root, point, fstype, opts in mounts:
        if fstype == "cgroup" and "cpu" in opts.split(","):
            return _Hierarchy(1, point, root)
    raise errors.ThrottleError("/sys/fs/cgroup", "no cgroup cpu controller (neither "
                               "cgroup v2 with cpu in cgroup.controllers nor a v1 cpu "
                               "hierarchy)")


def cgroup_of(path: str, version: int) -> str | None:
    """The cpu cgroup in a /proc/PID[/task/TID]/cgroup file (man 7 cgroups:
    "hierarchy-ID:controller-list:cgroup-path"); None if the task is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, cgroup = rest.partition(":")
        if version == 2 and hid == "0" and controllers == "":
            return cgroup
        if version == 1 and "cpu" in controllers.split(","):
            return cgroup
    return None


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _move(procs_file: str, task: int) -> bool:
    """Write ``task`` into ``procs_file``; False if it has exited."""
    try:
        _write(procs_file, str(task))
    except ProcessLookupError:
        return False
    except OSError as e:
        raise errors.ThrottleError(procs_file, f"cannot move task {task}: "
                                               f"{e.strerror or e}") from None
    return True


class Throttle:
    """``with Throttle(pids) as t: t.apply(20); ...; t.apply(30)``; the tree is
    back in its cgroups when the block ends (or at ``release()``)."""

    def __init__(self, pids, *, mountinfo: str = "/proc/self/mountinfo") -> None:
        self.pids = list(pids)
        if not self.pids:
            raise ValueError("Throttle needs at least one pid")
        self.hier = find_hierarchy(mountinfo)
        self.name = f"{NAME_PREFIX}{self.pids[0]}-{secrets.token_hex(4)}"
        self.path: str | None = None          # our cgroup's directory, once made
        self.percent: int | None = None
        self.original: dict[int, str] = {}    # task (tid in v1, pid in v2) -> its cgroup
        self.root_cgroup: str | None = None   # where tasks we never saw go back

    def __enter__(self) -> "Throttle":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def procs_file(self) -> str:
        return "cgroup.procs" if self.hier.version == 2 else "tasks"

    def _tasks(self) -> list[tuple[int, int]]:
        """(pid, task) pairs: each thread in v1, each process in v2."""
        out = []
        for pid in self.pids:
            if self.hier.version == 2:
                out.append((pid, pid))
                continue
            try:
                out.extend((pid, int(t)) for t in os.listdir(f"/proc/{pid}/task"))
            except FileNotFoundError:
                pass
        return out

    def _cgroup_file(self, pid: int, task: int) -> str:
        if self.hier.version == 2:
            return f"/proc/{pid}/cgroup"
        return f"/proc/{pid}/task/{task}/cgroup"

    def _make(self) -> None:
        root = cgroup_of(self._cgroup_file(self.pids[0], self.pids[0]), self.hier.version)
        if root is None:
            raise errors.ThrottleError(f"/proc/{self.pids[0]}", "the root process is gone")
        self.root_cgroup = root
        if self.hier.version == 2:
            parent = self.hier.mountpoint
            control = os.path.join(parent, "cgroup.subtree_control")
            with open(control) as f:
                enabled = f.read().split()
            if "cpu" not in enabled:
                try:
                    _write(control, "+cpu")
                except OSError as e:
                    raise errors.ThrottleError(control, f"cannot enable cpu: "
                                                        f"{e.strerror or e}") from None
        else:
            parent = self.hier.fs_path(root)
        path = os.path.join(parent, self.name)
        try:
            os.mkdir(path)
        except OSError as e:
            raise errors.ThrottleError(path, f"mkdir: {e.strerror or e}") from None
        self.path = path

    def _capacity(self, nr_threads: int) -> int:
        try:
            cpus = len(os.sched_getaffinity(self.pids[0]))
        except OSError:
            cpus = os.cpu_count() or 1
        return max(1, min(cpus, nr_threads))

    def _parent_quota(self) -> int:
        """v1 refuses a quota over the parent's (EINVAL, sched-bwc.rst
        "hierarchical considerations"): the parent's, scaled to our period."""
        if self.hier.version == 2:
            return 1 << 62
        parent = os.path.dirname(self.path)
        try:
            with open(os.path.join(parent, "cpu.cfs_quota_us")) as f:
                quota = int(f.read())
            with open(os.path.join(parent, "cpu.cfs_period_us")) as f:
                period = int(f.read())
        except (OSError, ValueError):
            return 1 << 62
        return 1 << 62 if quota < 0 else max(MIN_QUOTA_US, quota * PERIOD_US // period)

    def _set_quota(self, quota: int) -> None:
        if self.hier.version == 2:
            files = [("cpu.max", f"{quota} {PERIOD_US}")]
        else:
            files = [("cpu.cfs_period_us", str(PERIOD_US)), ("cpu.cfs_quota_us", str(quota))]
        for name, value in files:
            f = os.path.join(self.path, name)
            try:
                _write(f, value)
            except OSError as e:
                raise errors.ThrottleError(f, f"writing {value!r}: {e.strerror or e}") \
                    from None

    def apply(self, percent: int) -> None:
        """Take ``percent`` (0..99) of the tree's CPU time away; again with a
        new percentage to change it.  Threads born since the last call are
        moved too."""
        if not 0 <= percent <= 99:
            raise ValueError(f"throttle {percent}%: 0..99")
        try:
            if self.path is None:
                self._make()
            tasks = self._tasks()
            for pid, task in tasks:
                if task not in self.original:
                    cg = cgroup_of(self._cgroup_file(pid, task), self.hier.version)
                    # born in ours (a thread since the last call): release()
                    # sends it where the root came from
                    if cg is not None and os.path.basename(cg) != self.name:
                        self.original[task] = cg
            nthreads = len(tasks) if self.hier.version == 1 else sum(
                _threads(pid) for pid in self.pids)
            capacity = self._capacity(nthreads)
            quota = max(MIN_QUOTA_US, PERIOD_US * capacity * (100 - percent) // 100)
            quota = min(quota, self._parent_quota())
            self._set_quota(quota)
            procs = os.path.join(self.path, self.procs_file)
            moved = sum(_move(procs, task) for _, task in tasks if task in self.original)
        except BaseException:
            self.release()
            raise
        self.percent = percent
        log.info("throttle %s: %d%% taken, quota %d us per %d us (%d CPU%s), %d task%s in",
                 self.path, percent, quota, PERIOD_US, capacity, "s" if capacity > 1 else "",
                 moved, "s" if moved != 1 else "")

    def release(self) -> None:
        """Move every task back where it was and remove our cgroup; a second
        call does nothing."""
        if self.path is None:
            return
        path, self.path = self.path, None
        v = self.hier.version
        procs = self.procs_file
        for task, cg in self.original.items():
            self._move_back(task, cg)
        # tasks we never saw: children forked inside our cgroup
        deadline = time.monotonic() + RMDIR_WAIT_S
        while True:
            try:
                with open(os.path.join(path, procs)) as f:
                    left = [int(x) for x in f.read().split()]
            except FileNotFoundError:
                left = []
            for task in left:
                self._move_back(task, self.root_cgroup or self.hier.mount_root)
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    self.path = path            # a later release() tries again
                    raise errors.ThrottleError(path, f"rmdir: {e.strerror or e}") from None
                time.sleep(0.02)
        log.info("throttle %s: released %d task%s (cgroup v%d)", path, len(self.original),
                 "s" if len(self.original) != 1 else "", v)
        self.original.clear()
        self.percent = None

    def _move_back(self, task: int, cgroup: str) -> None:
        """Into ``cgroup``; into the hierarchy's top if that cgroup is gone."""
        for cg in (cgroup, self.hier.mount_root):
            try:
                _move(os.path.join(self.hier.fs_path(cg), self.procs_file), task)
                return
            except errors.ThrottleError as e:
                err = e
        log.warning("throttle: task %d stays in our cgroup: %s", task, err)


def remove_stale(pid: int | None = None,
                 mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Remove the throttle cgroups a dead orchestrator left (of root ``pid``,
    or all: only when no migration runs here, e.g. when an agent starts).
    Their tasks go to the parent cgroup, which in v1 is where the root came
    from (the other tasks' own cgroups were only in the dead one's memory).
    Returns the directories removed."""
    hier = find_hierarchy(mountinfo)
    prefix = NAME_PREFIX + (f"{pid}-" if pid is not None else "")
    procs = "cgroup.procs" if hier.version == 2 else "tasks"
    removed = []
    for dirpath, dirnames, _ in os.walk(hier.mountpoint):
        for name in [d for d in dirnames if d.startswith(prefix)]:
            path = os.path.join(dirpath, name)
            try:
                with open(os.path.join(path, procs)) as f:
                    tasks = [int(x) for x in f.read().split()]
                for task in tasks:
                    _move(os.path.join(dirpath, procs), task)
                os.rmdir(path)
            except OSError as e:
                raise errors.ThrottleError(path, f"removing a stale throttle: "
                                                 f"{e.strerror or e}") from None
            log.warning("throttle: removed the stale %s (%d task%s back in %s)", path,
                        len(tasks), "s" if len(tasks) != 1 else "", dirpath)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not d.startswith(NAME_PREFIX)]
    return removed


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError:
        return 0
