"""Bad input and failure: a clear error, a non-zero exit, and nothing harmed.

A refused or failed dump leaves the target running exactly as it was (the
self-checking workload proves it with PASS afterwards); a failed restore
leaves no process behind and the image untouched.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from migrate import errors
from migrate.source import dump as dumpmod
from tests.integration.harness import BIN, Workload, alive, migrate


def _start(name, workdir, workloads, *args):
    w = Workload.program(name, workdir, *args)
    workloads.append(w)
    w.wait_ready()
    return w


def _snapshot(images: str) -> dict[str, str]:
    out = {}
    for n in sorted(os.listdir(images)):
        with open(os.path.join(images, n), "rb") as f:
            out[n] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---------------------------------------------------------------- dump: refused

def test_dump_missing_pid(workdir):
    # A pid above pid_max cannot exist.
    p = migrate("dump", "-t", "99999999", "-D", os.path.join(workdir, "img"))
    assert p.returncode != 0 and "no such process" in p.stderr


def test_dump_kernel_thread(workdir):
    kthreadd = 2
    assert open(f"/proc/{kthreadd}/comm").read().strip() == "kthreadd"
    p = migrate("dump", "-t", str(kthreadd), "-D", os.path.join(workdir, "img"))
    assert p.returncode != 0 and "kernel thread" in p.stderr


def test_dump_refuses_itself_and_ancestors(workdir):
    p = migrate("dump", "-t", str(os.getpid()), "-D", os.path.join(workdir, "img"))
    assert p.returncode != 0 and "ancestors" in p.stderr
    with pytest.raises(errors.ProcessStateError, match="migrate itself"):
        dumpmod.dump(dumpmod.DumpOptions(pid=os.getpid(), images_dir=workdir))


def test_dump_already_traced(workdir, workloads):
    w = _start("signals", workdir, workloads)
    tracer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from migrate.kernel import ptrace\n"
        f"ptrace.seize({w.pid}, 0)\n"
        "print('seized', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True,
        cwd=os.path.dirname(BIN) + "/../..")
    try:
        assert tracer.stdout.readline().strip() == "seized"
        p = migrate("dump", "-t", str(w.pid), "-D", os.path.join(workdir, "img"))
        assert p.returncode != 0 and f"already traced by pid {tracer.pid}" in p.stderr
    finally:
        tracer.kill()
        tracer.wait()
    w.assert_pass()


@pytest.mark.parametrize("mode", ["deleted-map", "socket", "timer", "lease", "seccomp-notify"])
def test_dump_unsupported_leaves_process_as_it_was(mode, workdir, workloads):
    w = _start("unsupported", workdir, workloads, mode)
    images = os.path.join(workdir, "img")
    p = migrate("dump", "-t", str(w.pid), "-D", images)
    assert p.returncode != 0
    assert {"deleted-map": "deleted file", "socket": "neither a unix nor an inet socket",
            "timer": "CPU time of pid", "lease": "LEASE lock",
            "seccomp-notify": "SECCOMP_RET_USER_NOTIF"}[mode] \
        in p.stderr, p.stderr
    assert alive(w.pid)
    assert not os.path.exists(os.path.join(images, "inventory.img"))
    w.assert_pass()


@pytest.mark.parametrize("kind", ["pipe", "socketpair"])
def test_dump_channel_to_outside_is_refused(kind, workdir):
    """stdin is a pipe or a socketpair end whose other end is ours: nobody could
    recreate it, so the dump is refused and the process goes on."""
    import socket
    if kind == "pipe":
        theirs, ours = os.pipe()
    else:
        a, b = socket.socketpair()
        theirs, ours = b.detach(), a.detach()
    try:
        with open(os.path.join(workdir, "c.log"), "ab") as log:
            p = subprocess.Popen([os.path.join(BIN, "counter")], stdin=theirs, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        os.close(theirs)
        time.sleep(0.3)
        d = migrate("dump", "-t", str(p.pid), "-D", os.path.join(workdir, "img"))
        assert d.returncode != 0 and "outside the dump" in d.stderr, d.stderr
        assert alive(p.pid)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0
    finally:
        os.close(ours)


# ------------------------------------------------------ dump: fails half-way

@pytest.mark.parametrize("name", ["signals", "fpu", "sleeper", "mem_vmas"])
def test_dump_disk_full_leaves_process_as_it_was(name, workdir, workloads, mounts):
    """The image does not fit: the dump fails after the remote syscalls and
    while writing pages; registers, signal state, syscall restart, memory and
    fds of the workload must be exactly as before."""
    w = _start(name, workdir, workloads)
    images = mounts(os.path.join(workdir, "tiny"), "size=48k")
    for _ in range(3):
        p = migrate("dump", "-t", str(w.pid), "-D", images)
        assert p.returncode != 0
        assert "No space left on device" in p.stderr, p.stderr
        assert "left running" in p.stderr
        assert alive(w.pid)
        assert os.listdir(images) == [], "a failed dump leaves no partial image"
    w.assert_pass()


def test_dump_unwritable_dir(workdir, workloads, mounts):
    w = _start("fds", workdir, workloads)
    ro = mounts(os.path.join(workdir, "ro"), "ro,size=1m")
    p = migrate("dump", "-t", str(w.pid), "-D", ro)
    assert p.returncode != 0 and ("not writable" in p.stderr or "Read-only" in p.stderr), \
        p.stderr
    w.assert_pass()


# --------------------------------------------------------------- restore fails

def _dumped(name, workdir, workloads):
    w = _start(name, workdir, workloads)
    images = os.path.join(workdir, "img")
    w.dump(images)
    return w, images


def _assert_no_stray(pid: int) -> None:
    assert not os.path.exists(f"/proc/{pid}"), f"pid {pid} exists after a failed restore"
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # and no zombie of it waits for us


def test_restore_pid_taken(workdir, workloads):
    w = _start("counter", workdir, workloads)
    images = os.path.join(workdir, "img")
    w.dump(images, "--leave-running")
    before = _snapshot(images)
    p = migrate("restore", "-D", images, "-d")
    assert p.returncode != 0 and f"pid {w.pid} is taken" in p.stderr
    assert _snapshot(images) == before
    w.assert_pass()


def test_restore_missing_file(workdir, workloads):
    w, images = _dumped("fds", workdir, workloads)
    files = migrate("show", os.path.join(images, "files.img"), check=True).stdout
    victim = next(line.split('"')[3] for line in files.splitlines()
                  if '"path"' in line and line.split('"')[3].endswith("a.dat"))
    os.rename(victim, victim + ".away")
    try:
        before = _snapshot(images)
        p = migrate("restore", "-D", images, "-d")
        assert p.returncode != 0 and victim in p.stderr, p.stderr
        _assert_no_stray(w.pid)
        assert _snapshot(images) == before
    finally:
        os.rename(victim + ".away", victim)
    w.restore(images)     # the image is whole: with the file back, it restores
    w.assert_pass()


def test_restore_missing_mapped_file(workdir, workloads):
    w, images = _dumped("mem_vmas", workdir, workloads)
    mm = migrate("show", os.path.join(images, f"mm-{w.pid}.img"), check=True).stdout
    victim = next(line.split('"')[3] for line in mm.splitlines()
                  if '"path"' in line and line.split('"')[3].endswith("priv.dat"))
    os.rename(victim, victim + ".away")
    try:
        p = migrate("restore", "-D", images, "-d")
        assert p.returncode != 0 and victim in p.stderr, p.stderr
        _assert_no_stray(w.pid)
    finally:
        os.rename(victim + ".away", victim)
    w.restore(images)
    w.assert_pass()


@pytest.mark.parametrize("target,offset,expect", [
    ("pages-{pid}.img", 4096 * 7 + 5, "checksum mismatch"),    # found late: after the fork
    ("core-{pid}.img", -2, "core-{pid}.img"),
    ("mm-{pid}.img", "truncate", "mm-{pid}.img"),
    ("inventory.img", 4, "format version"),
])
def test_restore_corrupt_image(target, offset, expect, workdir, workloads):
    w, images = _dumped("mem_vmas", workdir, workloads)
    path = os.path.join(images, target.format(pid=w.pid))
    original = open(path, "rb").read()
    if offset == "truncate":
        open(path, "wb").write(original[:len(original) // 2])
    else:
        data = bytearray(original)
        data[offset] ^= 0x5A
        open(path, "wb").write(bytes(data))
    before = _snapshot(images)
    p = migrate("restore", "-D", images, "-d")
    assert p.returncode != 0 and expect.format(pid=w.pid) in p.stderr, p.stderr
    _assert_no_stray(w.pid)
    assert _snapshot(images) == before, "a failed restore must not touch the image"
    open(path, "wb").write(original)
    w.restore(images)
    w.assert_pass()


def test_restore_not_an_image(workdir):
    p = migrate("restore", "-D", workdir, "-d")
    assert p.returncode != 0 and "inventory.img" in p.stderr and "incomplete" in p.stderr
