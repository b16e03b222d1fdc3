"""The process tree of a dump: found, frozen and released as a whole.

`-t PID` takes PID and every descendant.  The tree is frozen top-down: a
process's children are listed only once it is frozen (a frozen process
cannot fork), so when the walk ends no process of the tree can add one.
Zombies are kept as they are (never seized): the dump records their exit
status and the restore makes them again.

The sessions and process groups must be ones the restore can rebuild by
forking the tree again: a process is a session leader or in its parent's
session, and its group is its own, one led by a process of the tree, or
(in the root's session) the root's group from outside the tree.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import signal

from migrate import errors
from migrate.images._pb import pstree_pb2
from migrate.kernel import proc
from migrate.source import freeze as freezer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Proc:
    pid: int
    ppid: int                        # 0 for the root
    pgid: int
    sid: int
    frozen: freezer.Frozen | None    # None for a zombie
    exit_status: int = 0             # a zombie's wait status
    comm: str = ""
    start_time: int = 0

    @property
    def zombie(self) -> bool:
        return self.frozen is None

    def entry(self):
        return pstree_pb2.pstree_entry(
            pid=self.pid, ppid=self.ppid, pgid=self.pgid, sid=self.sid,
            threads=self.frozen.tids if self.frozen else [self.pid], zombie=self.zombie,
            exit_status=self.exit_status, comm=self.comm if self.zombie else "",
            start_time=self.start_time)


@dataclasses.dataclass
class Tree:
    procs: list[Proc]                # parents before their children, the root first

    @property
    def root(self) -> Proc:
        return self.procs[0]

    @property
    def live(self) -> list[Proc]:
        return [p for p in self.procs if not p.zombie]

    def entries(self) -> list:
        return [p.entry() for p in self.procs]


def pids(root: int) -> list[int]:
    """``root`` and its descendants as they are now (zombies too; the tasks
    run: one that comes or goes meanwhile is seen or not), sorted."""
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo.extend(proc.list_children(p))
        except errors.NoSuchProcess:
            pass
    return sorted(out)


def freeze_tree(root: int, whole: bool = True) -> Tree:
    """Freeze ``root`` and (``whole``) all its descendants."""
    procs: list[Proc] = []
    try:
        st = proc.read_stat(root)
        procs.append(Proc(root, 0, st.pgrp, st.session, freezer.freeze(root),
                          start_time=st.start_time))
        i = 0
        while whole and i < len(procs):
            p = procs[i]
            i += 1
            if p.zombie:
                continue
            for child in proc.list_children(p.pid):
                procs.append(_take(child, p.pid))
        check_sessions(procs)
    except BaseException:
        for p in procs:
            if p.frozen is not None:
                freezer.thaw(p.frozen)
        raise
    if len(procs) > 1:
        log.info("pid %d: tree of %d processes frozen (%d zombies)", root, len(procs),
                 sum(p.zombie for p in procs))
    return Tree(procs)


def _take(pid: int, ppid: int) -> Proc:
    st = proc.read_stat(pid)
    if st.state not in ("Z", "X"):
        try:
            return Proc(pid, ppid, st.pgrp, st.session, freezer.freeze(pid),
                        start_time=st.start_time)
        except errors.MigrateError:
            st = proc.read_stat(pid)      # exited meanwhile: now a zombie?
            if st.state not in ("Z", "X"):
                raise
        except errors.KernelError as e:
            if e.errno != errno.ESRCH:
                raise
            st = proc.read_stat(pid)
    return Proc(pid, ppid, st.pgrp, st.session, None, st.exit_code, st.comm, st.start_time)


def check_sessions(procs: list[Proc]) -> None:
    """Refuse sessions and groups a fork of the tree cannot make again."""
    by_pid = {p.pid: p for p in procs}
    root = procs[0]
    for p in procs[1:]:
        parent = by_pid[p.ppid]
        if p.sid != p.pid and p.sid != parent.sid:
            raise errors.UnsupportedResource(
                p.pid, "session", f"session {p.sid} is neither its own nor its parent's "
                                  f"(pid {parent.pid}, session {parent.sid})")
        if p.pgid == p.pid:
            continue
        leader = by_pid.get(p.pgid)
        if leader is not None:
            if leader.sid != p.sid:
                raise errors.UnsupportedResource(
                    p.pid, "process group", f"group {p.pgid} is in another session")
        elif not (p.pgid == root.pgid and p.sid == root.sid):
            raise errors.UnsupportedResource(
                p.pid, "process group", f"group {p.pgid} has no leader in the dumped tree")


def thaw(tree: Tree, leave_stopped: bool = False) -> None:
    for p in reversed(tree.live):
        freezer.thaw(p.frozen, leave_stopped=leave_stopped)


def kill(tree: Tree) -> None:
    """SIGKILL every process of the tree (after a complete dump)."""
    for p in tree.live:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reap_killed(tree: Tree) -> None:
    for p in reversed(tree.live):
        freezer.reap_killed(p.frozen)
