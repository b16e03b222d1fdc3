"""Every self-checking workload survives many dump/restore cycles in a row.

Each cycle dumps the running process (killing it), restores it at the same
PID, and goes on with the restored one; only at the end does the program get
SIGTERM, check all of its state and print its verdict.
"""

from __future__ import annotations

import os

import pytest

from tests.integration.harness import Workload, cycles

PROGRAMS = ["counter", "mem_vmas", "fpu", "signals", "fds", "fsstate", "sleeper",
            "busyloop", "vdso_clock", "creds", "threads", "pipes", "eventobjs", "socks",
            "dirtier", "pyloop.py", "timers", "caps", "seccomp",
            "seccomp_strict", "tree", "usocks", "locks", "oddfiles", "inotify", "scm", "fanotify", "halfpipe.py", "cowtree"]


@pytest.mark.parametrize("name", PROGRAMS)
def test_dump_restore_cycles(name, workdir, workloads):
    w = Workload.program(name, workdir)
    workloads.append(w)
    w.wait_ready()
    for i in range(cycles()):
        images = os.path.join(workdir, f"img-{i}")
        w.dump(images)
        w.restore(images)
    w.assert_pass()


@pytest.mark.parametrize("name", ["signals", "fpu", "sleeper", "timers", "caps", "seccomp"])
def test_leave_running(name, workdir, workloads):
    """--leave-running: the image is taken and the process goes on untouched."""
    w = Workload.program(name, workdir)
    workloads.append(w)
    w.wait_ready()
    for i in range(3):
        w.dump(os.path.join(workdir, f"img-{i}"), "--leave-running")
    w.assert_pass()
