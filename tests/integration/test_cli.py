"""The command line as a user meets it: show, check, restore without -d,
--pidfile, --leave-stopped, --shell-job."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from tests.integration.harness import BIN, ROOT, Workload, alive, migrate


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait_state(pid: int, want: str, timeout: float = 5) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s = _state(pid)
        if s == want:
            return s
        time.sleep(0.02)
    return _state(pid)


def test_show_and_verify(workdir, workloads):
    w = Workload.program("mem_vmas", workdir)
    workloads.append(w)
    w.wait_ready()
    images = os.path.join(workdir, "img")
    w.dump(images, "--leave-running")
    out = json.loads(migrate("show", images, "--verify", check=True).stdout)
    kinds = {f["magic"] for f in out["files"]}
    assert {"INVENTORY", "PSTREE", "CORE", "MM", "PAGEMAP", "PAGES", "FILES", "FDINFO",
            "FS"} <= kinds and out["verified"]
    core = json.loads(migrate("show", os.path.join(images, f"core-{w.pid}.img"),
                              check=True).stdout)
    assert core["entries"][0]["pid"] == w.pid
    p = migrate("show", os.path.join(images, "nope.img"))
    assert p.returncode == 1 and "no such file" in p.stderr
    w.assert_pass()


def test_check():
    p = migrate("check", "--json", check=True)
    names = {r["name"]: r["ok"] for r in json.loads(p.stdout)}
    for n in ("pagemap_scan", "uffd_wp_async", "soft_dirty", "pidfd_getfd",
              "clone3_set_tid", "tcp_repair", "nftables", "tracker", "timer_ids",
              "suspend_seccomp"):
        assert n in names
    assert migrate("check", "--feature", "clone3_set_tid").returncode == 0
    p = migrate("check", "--feature", "warp_drive")
    assert p.returncode == 1 and "unknown feature" in p.stdout


def test_restore_waits_and_exits_with_status(workdir, workloads):
    """Without -d, migrate restore stays the parent and returns the exit code."""
    w = Workload.program("counter", workdir)
    workloads.append(w)
    w.wait_ready()
    images = os.path.join(workdir, "img")
    w.dump(images)
    pidfile = os.path.join(workdir, "restored.pid")
    r = subprocess.Popen([sys.executable, "-m", "migrate", "restore", "-D", images,
                          "--pidfile", pidfile], cwd=ROOT)
    try:
        end = time.monotonic() + 10
        while not os.path.exists(pidfile) and time.monotonic() < end:
            time.sleep(0.02)
        assert int(open(pidfile).read()) == w.pid
        assert alive(w.pid)
        time.sleep(0.3)
        os.kill(w.pid, signal.SIGTERM)
        assert r.wait(timeout=30) == 0
        w.reaped = True
        assert "PASS" in w.log()
    finally:
        if r.poll() is None:
            r.kill()
            r.wait()


def test_leave_stopped(workdir, workloads):
    w = Workload.program("signals", workdir)
    workloads.append(w)
    w.wait_ready()
    images = os.path.join(workdir, "img")
    w.dump(images, "--leave-stopped")
    assert _wait_state(w.pid, "T") == "T"
    os.kill(w.pid, signal.SIGKILL)
    w.reap_dumped()
    w.restore(images, "--leave-stopped")
    assert _wait_state(w.pid, "T") == "T"
    os.kill(w.pid, signal.SIGCONT)
    assert _wait_state(w.pid, "S") != "T"
    w.assert_pass()


def test_dump_of_stopped_process_stays_stopped(workdir, workloads):
    w = Workload.program("counter", workdir)
    workloads.append(w)
    w.wait_ready()
    os.kill(w.pid, signal.SIGSTOP)
    assert _wait_state(w.pid, "T") == "T"
    images = os.path.join(workdir, "img")
    w.dump(images)
    w.restore(images)
    assert _wait_state(w.pid, "T") == "T", "a stopped process comes back stopped"
    os.kill(w.pid, signal.SIGCONT)
    w.assert_pass()


def _read_until(fd: int, needle: bytes, timeout: float = 10) -> bytes:
    out = b""
    end = time.monotonic() + timeout
    while needle not in out and time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_shell_job(workdir, workloads):
    """A job on a terminal: refused without --shell-job; with it, restored
    onto the restoring shell's terminal."""
    master, slave = os.openpty()
    w = Workload([os.path.join(BIN, "counter")], workdir)
    w.kill()          # replace the default (file) workload by one on the pty
    p = subprocess.Popen([os.path.join(BIN, "counter")], stdin=slave, stdout=slave,
                         stderr=slave, start_new_session=True)
    w.proc, w.pid, w.ours, w.reaped = p, p.pid, True, False
    workloads.append(w)
    try:
        assert b"READY" in _read_until(master, b"READY")
        images = os.path.join(workdir, "img")
        r = migrate("dump", "-t", str(w.pid), "-D", images)
        assert r.returncode != 0 and "--shell-job" in r.stderr
        assert alive(w.pid)
        w.dump(images, "--shell-job")
        master2, slave2 = os.openpty()
        try:
            r = subprocess.run([sys.executable, "-m", "migrate", "restore", "-D", images,
                                "-d", "--shell-job"], cwd=ROOT, stdin=slave2,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert r.returncode == 0, r.stderr
            assert b"count" in _read_until(master2, b"count"), "counts on the new terminal"
            os.kill(w.pid, signal.SIGTERM)
            assert b"PASS" in _read_until(master2, b"PASS")
            status = os.waitpid(w.pid, 0)[1]
            w.reaped = True
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(master2)
            os.close(slave2)
    finally:
        os.close(master)
        os.close(slave)
