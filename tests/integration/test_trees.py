"""Process trees: many processes, failures that must leave the tree whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from migrate.images import ImageDir
from tests.integration.harness import (ROOT, Workload, alive, cycles, descendants, migrate,
                                       reap_pids)
from tests.integration.test_cli import _read_until


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
    """An unsupported fd (a netlink socket) in one child fails the dump up
    front, naming the pid and fd; every process of the tree goes on as before (zombies still
    zombies, the stopped child still stopped) and passes its checks."""
    w = Workload.program("tree", workdir, "netlink")
    workloads.append(w)
    w.wait_ready()
    before = _tree_pids(w)
    d = migrate("dump", "-t", str(w.pid), "-D", os.path.join(workdir, "img"))
    assert d.returncode != 0
    assert "neither a unix nor an inet socket" in d.stderr and "left running" in d.stderr, \
        d.stderr
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


# cowtree (64 MiB): pages shared parent -> child (R-C, R-D, C-G)
COWTREE_SHARED = 8960 + 10752 + 11264


def test_cow_sharing_survives_leave_running(workdir, workloads):
    """A dump --leave-running reads the pages a parent and its children
    share copy-on-write without unsharing them: the tree it leaves still
    shares them (checked by the program through its pagemap), and each
    dump records them (mm_entry.shared_with_parent)."""
    w = Workload.program("cowtree", workdir)
    workloads.append(w)
    w.wait_ready()
    for i in range(2):
        d = w.dump(os.path.join(workdir, f"img-{i}"), "--leave-running", "--display-stats")
        # Found again by each dump: the pages of R-C, R-D and C-G.
        assert int(json.loads(d.stdout)["pages_shared"]) >= COWTREE_SHARED, d.stdout
    w.assert_pass()


def test_cow_sharing_kept(workdir, workloads):
    """Private pages a parent and its forked children (and a grandchild)
    still share come back shared: one physical page, checked by the
    program through its pagemap, and counted by the restore."""
    w = Workload.program("cowtree", workdir)
    workloads.append(w)
    w.wait_ready()
    images = os.path.join(workdir, "img")
    w.dump(images)
    r = w.restore(images, "--display-stats")
    st = json.loads(r.stdout)
    assert int(st["pages_shared"]) >= COWTREE_SHARED, st
    w.assert_pass()


def test_shell_pipeline_shell_job(workdir, workloads):
    """`sh -c 'sleep 1000 | cat; echo ...'` on a terminal: three processes and
    a pipe between two of them, dumped with --shell-job and restored onto
    another terminal; sh, still waiting for its pipeline, finishes it there
    once sleep is killed."""
    master, slave = os.openpty()
    p = subprocess.Popen(["sh", "-c", "echo started; sleep 1000 | cat; echo pipeline-done $?"],
                         stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                         cwd=workdir)
    w = Workload.__new__(Workload)
    w.name, w.proc, w.pid, w.ours, w.reaped = "sh", p, p.pid, True, False
    w.log_path = os.devnull
    workloads.append(w)
    try:
        assert b"started" in _read_until(master, b"started")
        for _ in range(200):
            if len(descendants(w.pid)) == 2:
                break
            time.sleep(0.02)
        below = descendants(w.pid)
        assert len(below) == 2
        images = os.path.join(workdir, "img")
        r = migrate("dump", "-t", str(w.pid), "-D", images, "--shell-job")
        assert r.returncode == 0, r.stderr
        p.wait(10)
        w.ours = False
        reap_pids(below)
        master2, slave2 = os.openpty()
        try:
            r = subprocess.run([sys.executable, "-m", "migrate", "restore", "-D", images,
                                "-d", "--shell-job"], cwd=ROOT, stdin=slave2,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert r.returncode == 0, r.stderr
            kids = descendants(w.pid)
            assert sorted(kids) == sorted(below)
            sleep = next(k for k in kids if open(f"/proc/{k}/comm").read().strip() == "sleep")
            os.kill(sleep, 15)
            assert b"pipeline-done 0" in _read_until(master2, b"pipeline-done")
            status = os.waitpid(w.pid, 0)[1]
            w.reaped = True
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(master2)
            os.close(slave2)
    finally:
        os.close(master)
        os.close(slave)
