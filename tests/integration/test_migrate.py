"""Live migration on the rig (deploy/rig): hosts A and B, the client host C,
an agent in each, mutual TLS.  Real programs move A -> B and back while they
run; each checks its own state after the last move.  The failure cases end
with the program running on exactly one host, its pages verified, and no
lock or image left behind."""

import json
import os
import subprocess
import threading
import time

import pytest

from tests.integration.rigtest import Rig, RigWorkload, available, start

pytestmark = pytest.mark.skipif(not available(), reason="needs root, ip, nsenter, unshare")

CYCLES = int(os.environ.get("MIGRATE_RIG_CYCLES", "20"))
SERVICE_IP = "10.232.0.150"


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(str(tmp_path_factory.mktemp("rig") / "state"))
    r.up()
    yield r
    r.down()


@pytest.fixture
def logdir(tmp_path):
    return str(tmp_path)


def move(rig, w, src, dst, *extra):
    rc, rec = rig.migrate(src, dst, w.pid, *extra)
    assert rc == 0 and rec["status"] == "completed", rec
    assert rec["downtime"] is not None and rec["downtime"] > 0
    assert rec["restored_pid"] == w.pid
    w.moved(dst)
    assert w.where() == [dst], (w.where(), w.log()[-2000:])
    return rec


def nothing_left(rig):
    """No lock on any host, no incoming images (the destination removes them
    once its memory is filled: wait for that)."""
    end = time.monotonic() + 20
    while time.monotonic() < end:
        left = {h: rig.incoming_left(h) for h in ("A", "B") if rig.incoming_left(h)}
        if not left:
            break
        time.sleep(0.2)
    assert not left, left
    for h in ("A", "B"):
        assert rig.locks_left(h) == [], (h, rig.locks_left(h))


# -- programs, there and back ------------------------------------------------------

def test_dirtier_there_and_back(rig, logdir, workloads):
    w = start(rig, "A", logdir, workloads, "dirtier", "11")
    rec = move(rig, w, "A", "B")
    assert rec["rounds"], rec
    assert rec["bytes_transferred"] > 0 and rec["bytes_total"] > 0
    move(rig, w, "B", "A")
    w.assert_pass()
    nothing_left(rig)


def test_threads_and_tree(rig, logdir, workloads):
    t = start(rig, "A", logdir, workloads, "threads")
    # a service's tree: its root a child of the host's init on every host
    tr = start(rig, "A", logdir, workloads, "tree", daemon=True)
    move(rig, t, "A", "B")
    move(rig, tr, "A", "B")
    move(rig, tr, "B", "A")
    t.assert_pass()
    tr.assert_pass()
    nothing_left(rig)


def test_pre_copy_off_and_eager_fill(rig, logdir, workloads):
    w = start(rig, "A", logdir, workloads, "memhog", "48")
    rec = move(rig, w, "A", "B", "--no-pre-copy")
    assert rec["rounds"] == [] and rec["options"]["pre_copy"] is False, rec
    rec = move(rig, w, "B", "A", "--restore-fill", "eager")
    assert rec["options"]["restore_fill"] == "eager"
    w.assert_pass()
    nothing_left(rig)


def test_post_copy(rig, logdir, workloads):
    """--post-copy on: one pre-copy pass, then the process resumes on B and
    the pages it dirtied since come from A's frozen copy as it touches them
    (or by prefetch); and back with pure post-copy (no pre-copy)."""
    w = start(rig, "A", logdir, workloads, "dirtier", "13")
    rec = move(rig, w, "A", "B", "--post-copy", "on")
    assert len(rec["rounds"]) == 1 and rec["stop"]["lazy_pages"] > 0, rec
    assert rec["stop"]["post_copy_seconds"] is not None
    rec = move(rig, w, "B", "A", "--post-copy", "on", "--no-pre-copy")
    assert rec["rounds"] == [] and rec["stop"]["lazy_pages"] > 0, rec
    w.assert_pass()
    nothing_left(rig)


def test_post_copy_of_memory_that_moves(rig, logdir, workloads):
    """The process moves its memory about (mremap onto areas that were zero
    at the source) from the moment it runs on the destination, before the
    source's map has come: the daemon must place and drop pages by where
    they were at the source, not by where they are now.  Pure post-copy,
    and post-copy after a pre-copy pass (LOCAL pages then move too)."""
    w = start(rig, "A", logdir, workloads, "mover")
    for src, dst, extra in (("A", "B", ("--no-pre-copy",)), ("B", "A", ()),
                            ("A", "B", ()), ("B", "A", ("--no-pre-copy",))):
        rec = move(rig, w, src, dst, "--post-copy", "on", *extra)
        assert rec["stop"]["lazy_pages"] > 0, rec
        time.sleep(0.3)
    w.assert_pass()
    nothing_left(rig)


def test_post_copy_threads_and_tree(rig, logdir, workloads):
    """Post-copy of a threaded program (every thread's stack page and rseq
    area eager, the rest of its memory lazy) and of a process tree (the
    root's lazy area left at the source, its children dumped whole), there
    and back, each checking itself at the end."""
    t = start(rig, "A", logdir, workloads, "threads")
    tr = start(rig, "A", logdir, workloads, "tree", daemon=True)
    for w in (t, tr):
        rec = move(rig, w, "A", "B", "--post-copy", "on")
        assert rec["stop"]["lazy_pages"] > 0, rec
        rec = move(rig, w, "B", "A", "--post-copy", "on")
        assert rec["stop"]["post_copy_seconds"] is not None, rec
    t.assert_pass()
    tr.assert_pass()
    nothing_left(rig)


def test_tcp_pair_moves_with_its_address(rig, logdir, workloads):
    """An echo server on A at a service address, a client on C streaming
    both ways: the server goes to B and back with its connections and its
    address; neither side sees an error or a lost byte."""
    rig.run("A", "ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "eth0")
    try:
        server = start(rig, "A", logdir, workloads, "tcpecho", "7300")
        client = start(rig, "C", logdir, workloads, "tcpstream", SERVICE_IP, "7300", "3")
        for src, dst in (("A", "B"), ("B", "A")):
            rec = move(rig, server, src, dst, "--tcp-established", "--move-address",
                       SERVICE_IP)
            assert rec["options"]["move_address"] == SERVICE_IP
            time.sleep(0.5)
        client.assert_pass()
        server.assert_pass()
        nothing_left(rig)
    finally:
        for h in ("A", "B"):
            rig.run(h, "ip", "addr", "del", f"{SERVICE_IP}/32", "dev", "eth0", check=False)


def test_auto_converge(rig, logdir, workloads):
    """A service dirtying faster than the (capped) link: pre-copy cannot
    converge until --auto-converge throttles its CPU; it still ends with
    every page right, and the throttle is gone afterwards."""
    w = start(rig, "A", logdir, workloads, "memservice", "7400", "64", "200", daemon=True)
    rec = move(rig, w, "A", "B", "--auto-converge", "--max-bandwidth", "24M",
               "--max-rounds", "12")
    assert (rec["throttle_max"] or 0) >= 20, rec
    assert rec["throttle"] is None
    w.assert_pass()
    nothing_left(rig)


def test_back_and_forth(rig, logdir, workloads):
    """CYCLES migrations in a row (20 in `make test`), nothing lost."""
    w = start(rig, "A", logdir, workloads, "dirtier", "5")
    where = "A"
    downtimes = []
    for _ in range(CYCLES):
        to = "B" if where == "A" else "A"
        downtimes.append(move(rig, w, where, to)["downtime"])
        where = to
    w.assert_pass()
    print(f"\n{CYCLES} migrations: downtime min {min(downtimes) * 1e3:.0f} ms, max "
          f"{max(downtimes) * 1e3:.0f} ms")
    nothing_left(rig)


# -- failures: the process runs on exactly one host, nothing left ------------------

def _failed(rig, w, rc, rec, on="A", where=True):
    assert rc == 1 and rec["status"] in ("failed", "cancelled"), rec
    assert rec["error"] and rec["error"]["message"], rec
    if where:
        assert w.where() == [on], w.where()
    else:
        assert w.alive_on(on)


def test_pid_taken_on_destination(rig, logdir, workloads):
    w = start(rig, "A", logdir, workloads, "dirtier", "3")
    # a process of B's at the same pid
    rig.run("B", "sh", "-c", f"echo {w.pid - 1} > /proc/sys/kernel/ns_last_pid")
    squatter = RigWorkload(rig, "B", ["sleep", "1000"], logdir, "squatter")
    try:
        assert squatter.pid == w.pid, "could not take the pid on B"
        rc, rec = rig.migrate("A", "B", w.pid)
        _failed(rig, w, rc, rec, where=False)      # (B's pid is the squatter)
        assert rec["error"]["phase"] == "prepare" and "in use" in rec["error"]["message"]
    finally:
        rig.run("B", "kill", "-KILL", str(squatter.pid), check=False)
        squatter.reap()
    w.assert_pass()
    nothing_left(rig)


def test_file_missing_on_destination(rig, logdir, workloads, tmp_path):
    """A file only A has (a tmpfs mounted in A's mount namespace)."""
    only = tmp_path / "only-on-A"
    only.mkdir()
    rig.run("A", "mount", "-t", "tmpfs", "-o", "size=1m", "none", str(only))
    try:
        w = RigWorkload(rig, "A", ["sh", "-c", f"exec 3>{only}/held; echo READY; "
                                   "exec sleep 1000"], logdir, "holder")
        workloads.append(w)
        w.wait_ready()
        rc, rec = rig.migrate("A", "B", w.pid)
        _failed(rig, w, rc, rec)
        assert "missing" in rec["error"]["message"] and "held" in rec["error"]["message"]
    finally:
        for x in list(workloads):
            x.kill()
        rig.run("A", "umount", str(only), check=False)
    nothing_left(rig)


def test_disk_full_on_destination(rig, logdir, workloads):
    """B's image directory is a 24 MiB tmpfs: a 64 MiB process does not fit."""
    images = os.path.join(rig.work("B"), "images")
    os.makedirs(images, exist_ok=True)
    rig.run("B", "mount", "-t", "tmpfs", "-o", "size=24m", "none", images)
    try:
        w = start(rig, "A", logdir, workloads, "memhog", "64")
        rc, rec = rig.migrate("A", "B", w.pid)
        _failed(rig, w, rc, rec)
        w.assert_pass()
    finally:
        rig.run("B", "umount", images, check=False)
    nothing_left(rig)


def _kill_agent_at(rig, host, point):
    with open(os.path.join(rig.work(host), "fault"), "w") as f:
        f.write(point)


@pytest.mark.parametrize("host, point", [
    ("B", "dst-round"),        # destination agent dies during pre-copy
    ("B", "dst-restore"),      # ... when asked to restore (source frozen)
    ("B", "dst-built"),        # ... with the tree built there, not released
    ("A", "src-round"),        # source agent dies during pre-copy
    ("A", "src-frozen"),       # ... with the tree frozen, the image committed
])
def test_agent_dies(rig, logdir, workloads, host, point):
    """Each agent killed at each phase before the destination runs the
    process: it goes on on A, with its memory intact; nothing is left on B
    (the restarted agent, or its watchdog, removes what was there)."""
    w = start(rig, "A", logdir, workloads, "dirtier", "7")
    _kill_agent_at(rig, host, point)
    rc, rec = None, None
    try:
        rc, rec = rig.migrate("A", "B", w.pid, timeout=120)
    except AssertionError:
        assert host == "A"       # the CLI lost its source agent: no record
    rig.wait_agent(host)
    if rec is not None and host == "B":
        _failed(rig, w, rc, rec)
    end = time.monotonic() + 30
    while w.where() != ["A"] and time.monotonic() < end:
        time.sleep(0.2)
    assert w.where() == ["A"], w.where()
    w.assert_pass()
    nothing_left(rig)


@pytest.mark.parametrize("host, point", [
    ("B", "dst-resumed"),      # destination agent dies right after the release
    ("A", "src-resumed"),      # source agent dies once the destination runs it
])
def test_agent_dies_after_the_resume(rig, logdir, workloads, host, point):
    """Past the resume the process must run on B only: the source's worker
    kills its copy once B says it runs, even if its own agent died, and asks
    a restarted destination agent what happened."""
    w = start(rig, "A", logdir, workloads, "dirtier", "8")
    _kill_agent_at(rig, host, point)
    try:
        rig.migrate("A", "B", w.pid, timeout=150)
    except AssertionError:
        assert host == "A"
    rig.wait_agent(host)
    end = time.monotonic() + 60
    while w.where() != ["B"] and time.monotonic() < end:
        time.sleep(0.2)
    assert w.where() == ["B"], w.where()
    w.moved("B")
    w.assert_pass()
    nothing_left(rig)


def _migrate_with_link_cut(rig, w, after: float, *extra):
    """Migrate ``w`` A -> B with B's cable pulled ``after`` seconds in, and
    plugged back 20 s later (once the migration gave up); the record.  B's
    own agent must then drop what it had (its watchdog)."""
    sw = f"{rig.env['MIGRATE_RIG_PREFIX']}-sw"
    link = f"{rig.env['MIGRATE_RIG_PREFIX']}-B"

    def cut():
        time.sleep(after)
        subprocess.run(["ip", "-n", sw, "link", "set", link, "down"], check=True)
        time.sleep(20)
        subprocess.run(["ip", "-n", sw, "link", "set", link, "up"], check=True)
    t = threading.Thread(target=cut)
    t.start()
    try:
        rc, rec = rig.migrate("A", "B", w.pid, *extra, timeout=150)
    finally:
        t.join()
    _failed(rig, w, rc, rec)
    w.assert_pass()
    rig.wait_agent("B")
    end = time.monotonic() + 30
    while rig.incoming_left("B") and time.monotonic() < end:
        time.sleep(0.5)
    nothing_left(rig)
    return rec


def test_link_cut_during_pre_copy(rig, logdir, workloads):
    """B's cable pulled during pre-copy (the round stalls, times out), then
    plugged back: the process goes on on A; B drops what it had."""
    w = start(rig, "A", logdir, workloads, "memhog", "96")
    _migrate_with_link_cut(rig, w, 0.6, "--max-bandwidth", "32M")


def test_link_cut_during_the_stop(rig, logdir, workloads):
    """The cable pulled while the last dump streams (no pre-copy: the stop
    copies everything): the dump times out, the tree is thawed on A as it
    was; B drops what it had."""
    w = start(rig, "A", logdir, workloads, "memhog", "256")
    rec = _migrate_with_link_cut(rig, w, 0.8, "--no-pre-copy", "--max-bandwidth", "64M")
    assert rec["error"]["phase"] in ("stop", "restore"), rec["error"]


def _post_copy_detached(rig, w, *extra) -> tuple[object, int]:
    """`migrate run --detach --post-copy on` of ``w`` A -> B, once B runs
    it and pulls its pages (B's lazy-pages daemon has the source's map,
    which comes after the resume; read from its log on the shared file
    system, at once): (a function giving a host's record of the migration,
    the daemon's pid on B)."""
    r = rig.run("C", "python3", "-m", "migrate", "run", "--inventory", rig.inventory,
                "--src", "A", "--dst", "B", "--pid", str(w.pid), "--detach",
                "--post-copy", "on", *extra)
    mid = r.stdout.strip()

    def record(host: str = "A") -> dict:
        r = rig.run("C", "python3", "-m", "migrate", "status", "--inventory", rig.inventory,
                    "--host", host, "--json", mid, check=False)
        out = json.loads(r.stdout) if r.returncode == 0 else {}
        return (out[0] if out else {}) if isinstance(out, list) else out
    path = os.path.join(rig.dir, "B", "work", "logs", mid, "lazy-pages.log")
    end = time.monotonic() + 120
    text = ""
    while "the source's map" not in text:
        assert time.monotonic() < end, (record(), text)
        time.sleep(0.01)
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            pass
    daemon = int(text.split("lazy-pages daemon ", 1)[1].split()[0])
    return record, daemon


def test_lazy_daemon_killed_during_post_copy(rig, logdir, workloads):
    """The destination's lazy-pages daemon is SIGKILLed while B runs the
    process with pages still at A: those pages would now read as zeros, so
    B's agent kills the process rather than let it run on with them; A's
    frozen copy goes once the daemon has not come back for the grace period.
    (Past the resume the process is lost with its destination, as in QEMU's
    post-copy; what must never happen is a process running on zeros.)"""
    w = start(rig, "A", logdir, workloads, "memhog", "1024")
    record, daemon = _post_copy_detached(rig, w, "--no-pre-copy")
    rig.run("B", "kill", "-KILL", str(daemon))
    w.moved("B")
    end = time.monotonic() + 30
    while w.where():
        assert time.monotonic() < end, (w.where(), record("B"))
        time.sleep(0.1)
    while record().get("status") in (None, "active"):
        assert time.monotonic() < end + 30, record()
        time.sleep(0.2)
    fill = record("B").get("fill") or {}
    assert f"killed pid {w.pid}" in (fill.get("error") or ""), fill
    assert "PASS" not in w.log() and "FAIL" not in w.log(), w.log()
    w.reap()
    nothing_left(rig)


def test_link_cut_during_post_copy(rig, logdir, workloads):
    """B's cable pulled for 3 s while B runs the process and pulls its
    pages from A (pure post-copy of 1 GiB): the faults wait, nothing gives
    up, and once the cable is back every page comes; the process ends on B
    with its memory intact (memhog checks every page)."""
    sw = f"{rig.env['MIGRATE_RIG_PREFIX']}-sw"
    link = f"{rig.env['MIGRATE_RIG_PREFIX']}-B"
    w = start(rig, "A", logdir, workloads, "memhog", "1024")
    record, _ = _post_copy_detached(rig, w, "--no-pre-copy")
    end = time.monotonic() + 120
    subprocess.run(["ip", "-n", sw, "link", "set", link, "down"], check=True)
    try:
        time.sleep(3)
        assert record().get("phase") == "post-copy", "post-copy ended with the cable out"
    finally:
        subprocess.run(["ip", "-n", sw, "link", "set", link, "up"], check=True)
    while record().get("status") in (None, "active"):
        assert time.monotonic() < end, record()
        time.sleep(0.2)
    rec = record()
    assert rec["status"] == "completed", rec
    assert rec["stop"]["post_copy_seconds"] >= 3, rec
    w.moved("B")
    assert w.where() == ["B"], (w.where(), w.log()[-2000:])
    w.assert_pass()
    nothing_left(rig)


def test_cancel_during_pre_copy(rig, logdir, workloads):
    w = start(rig, "A", logdir, workloads, "memhog", "64")
    r = rig.run("C", "python3", "-m", "migrate", "run", "--inventory", rig.inventory,
                "--src", "A", "--dst", "B", "--pid", str(w.pid), "--detach",
                "--max-bandwidth", "8M")
    mid = r.stdout.strip()
    time.sleep(1.5)
    r = rig.run("C", "python3", "-m", "migrate", "cancel", "--inventory", rig.inventory,
                mid, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cancelled" in r.stdout
    assert w.where() == ["A"]
    w.assert_pass()
    nothing_left(rig)
