"""Process trees: many processes, failures that must leave the tree whole."""

from __future__ import annotations

import os

from migrate.images import ImageDir
from tests.integration.harness import Workload, alive, cycles, descendants, migrate


def _tree_pids(w: Workload) -> list[int]:
    return [w.pid, *descendants(w.pid)]


def test_forest_cycles(workdir, workloads):
    """20 processes of 3 threads with 10 fds each, through dump/restore cycles."""
    w = Workload.program("forest", workdir, "20", "3")
    workloads.append(w)
    w.wait_ready()
    for i in range(max(3, cycles() // 4)):
        images = os.path.join(workdir, f"img-{i}")
        w.dump(images)
        w.restore(images)
    w.assert_pass()


def test_tree_leave_running(workdir, workloads):
    w = Workload.program("tree", workdir)
    workloads.append(w)
    w.wait_ready()
    before = _tree_pids(w)
    for i in range(3):
        w.dump(os.path.join(workdir, f"img-{i}"), "--leave-running")
    assert _tree_pids(w) == before
    w.assert_pass()


def test_tree_dump_refused_leaves_tree(workdir, workloads):
    """An unsupported fd in one child fails the dump up front, naming the pid
    and fd; every process of the tree goes on as before (zombies still
    zombies, the stopped child still stopped) and passes its checks."""
    w = Workload.program("tree", workdir, "inotify")
    workloads.append(w)
    w.wait_ready()
    before = _tree_pids(w)
    d = migrate("dump", "-t", str(w.pid), "-D", os.path.join(workdir, "img"))
    assert d.returncode != 0
    assert "inotify" in d.stderr and "left running" in d.stderr, d.stderr
    assert "fd " in d.stderr and str(before[1]) in d.stderr, d.stderr
    assert _tree_pids(w) == before
    assert not os.path.exists(os.path.join(workdir, "img", "inventory.img"))
    w.assert_pass()


def test_tree_restore_failure_leaves_nothing(workdir, workloads):
    """A page file of the last process is corrupt: the restore fails after
    building the others and kills every process it made."""
    w = Workload.program("tree", workdir)
    workloads.append(w)
    w.wait_ready()
    pids = _tree_pids(w)
    images = os.path.join(workdir, "img")
    w.dump(images)
    good = os.path.join(workdir, "good")
    os.system(f"cp -a {images} {good}")
    d = ImageDir.open(images)
    tree = d.read_image("pstree.img")
    last = [e.pid for e in tree if not e.zombie][-1]
    path = os.path.join(images, f"pages-{last}.img")
    with open(path, "r+b") as f:
        f.seek(4096 + 100)
        b = f.read(1)
        f.seek(4096 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = migrate("restore", "-D", images, "-d")
    assert r.returncode != 0 and "nothing was left running" in r.stderr, r.stderr
    assert f"pages-{last}.img" in r.stderr, r.stderr
    for pid in pids:
        assert not alive(pid), f"pid {pid} of the failed restore is still running"
    w.restore(good)
    w.assert_pass()
