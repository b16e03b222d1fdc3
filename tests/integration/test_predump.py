"""Pre-dump chains: memory copied while the process runs, only dirty pages
after the first round, restored from the chain and checked by the program."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from migrate.source import tracker as trackers
from tests.integration.harness import Workload, descendants, migrate, reap_pids


def _start(name, workdir, workloads, *args):
    w = Workload.program(name, workdir, *args)
    workloads.append(w)
    w.wait_ready()
    return w


def _pre_dump(w, workdir, i, *extra):
    args = ["pre-dump", "-t", str(w.pid), "-D", os.path.join(workdir, f"pre{i}"),
            "--display-stats", *extra]
    if i:
        args += ["--prev-images-dir", f"../pre{i - 1}"]
    p = migrate(*args)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _final(w, workdir, parent, *extra):
    images = os.path.join(workdir, "final")
    below = descendants(w.pid)
    p = migrate("dump", "-t", str(w.pid), "-D", images, "--prev-images-dir", f"../{parent}",
                "--display-stats", *extra)
    assert p.returncode == 0, p.stderr
    w.reap_dumped()
    reap_pids(below)          # a tree's other processes, orphaned to us
    return images, json.loads(p.stdout)


def _holders(pid: int) -> list[int]:
    """The tracking holder of ``pid``, found by its command line."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"migrate.source.holder" in argv and str(pid).encode() in argv:
            out.append(int(d))
    return out


@pytest.mark.parametrize("tracker", ["uffd", "soft-dirty"])
def test_dirtier_through_five_pre_dumps(tracker, workdir, workloads):
    available = (trackers.uffd_available() if tracker == "uffd"
                 else trackers.soft_dirty_available())
    if not available:
        pytest.skip(f"this kernel has no {tracker} tracking (CONFIG_MEM_SOFT_DIRTY is "
                    "unset here); the test runs where the kernel has it")
    w = _start("dirtier", workdir, workloads)
    for i in range(5):
        st = _pre_dump(w, workdir, i, "--tracker", tracker)
        assert st["tracker"] == tracker
        time.sleep(0.2)
    images, st = _final(w, workdir, "pre4", "--tracker", tracker)
    assert st["tracker"] == tracker
    w.restore(images)
    w.assert_pass()


@pytest.mark.parametrize("name", ["mem_vmas", "signals", "fds", "threads", "seccomp",
                                  "timers", "tree", "forest", "cowtree"])
def test_other_workloads_through_pre_dumps(name, workdir, workloads):
    w = _start(name, workdir, workloads)
    for i in range(3):
        _pre_dump(w, workdir, i)
    images, st = _final(w, workdir, "pre2")
    assert int(st.get("pages_in_parent", 0)) > 0, st
    w.restore(images)
    w.assert_pass()


def test_rounds_copy_only_what_was_written(workdir, workloads):
    """A process that writes nothing between rounds: the second round copies
    (almost) nothing and leaves every page to its parent."""
    w = _start("memhog", workdir, workloads, "64")
    first = _pre_dump(w, workdir, 0)
    assert int(first["pages_written"]) >= 64 * 256
    second = _pre_dump(w, workdir, 1)
    assert int(second["pages_in_parent"]) >= 64 * 256
    assert int(second["pages_written"]) < 64, second     # its stack, libc data...
    images, st = _final(w, workdir, "pre1")
    assert int(st["pages_written"]) < 64, st
    w.restore(images)
    w.assert_pass()


def test_lost_tracker_means_a_full_copy(workdir, workloads):
    w = _start("memhog", workdir, workloads, "64")
    _pre_dump(w, workdir, 0)
    holders = _holders(w.pid)
    assert len(holders) == 1, holders
    os.kill(holders[0], signal.SIGKILL)        # tracking is lost with it
    time.sleep(0.2)
    st = _pre_dump(w, workdir, 1)
    assert int(st.get("pages_in_parent", 0)) == 0, st
    assert int(st["pages_written"]) >= 64 * 256, "everything is copied again"
    images, _ = _final(w, workdir, "pre1")
    w.restore(images)
    w.assert_pass()


def test_holder_exits_with_the_process(workdir, workloads):
    w = _start("counter", workdir, workloads)
    _pre_dump(w, workdir, 0)
    holders = _holders(w.pid)
    assert len(holders) == 1
    w.kill()
    end = time.monotonic() + 10
    while time.monotonic() < end and os.path.exists(f"/proc/{holders[0]}/cmdline") \
            and _holders(w.pid):
        time.sleep(0.05)
    assert not _holders(w.pid), "the holder must not outlive the task"


def test_restore_of_a_pre_dump_is_refused(workdir, workloads):
    w = _start("counter", workdir, workloads)
    _pre_dump(w, workdir, 0)
    p = migrate("restore", "-D", os.path.join(workdir, "pre0"), "-d")
    assert p.returncode != 0 and "pre-dump" in p.stderr
    w.assert_pass()


def test_parent_of_another_process_is_refused(workdir, workloads):
    a = _start("counter", workdir, workloads)
    _pre_dump(a, workdir, 0)
    b = Workload.program("sleeper", workdir)
    workloads.append(b)
    b.wait_ready()
    p = migrate("pre-dump", "-t", str(b.pid), "-D", os.path.join(workdir, "b"),
                "--prev-images-dir", "../pre0")
    assert p.returncode != 0 and "another process" in p.stderr
    time.sleep(1)   # sleeper wants a few sleeps before its verdict
    b.assert_pass()
    a.assert_pass()


def test_show_displays_the_chain(workdir, workloads):
    w = _start("memhog", workdir, workloads, "16")
    _pre_dump(w, workdir, 0)
    _pre_dump(w, workdir, 1)
    images, _ = _final(w, workdir, "pre1")
    out = json.loads(migrate("show", images, check=True).stdout)
    chain = out["chain"]
    assert [c["kind"] for c in chain] == ["DUMP", "PRE_DUMP", "PRE_DUMP"]
    assert chain[-1]["present"] >= 16 * 256 and chain[0]["in_parent"] >= 16 * 256
    w.restore(images)
    w.assert_pass()


def test_failed_first_pre_dump_leaves_no_tracking(workdir, workloads, mounts):
    """A first pre-dump that fails (disk full) must not leave the task tracked."""
    w = _start("memhog", workdir, workloads, "16")
    tiny = mounts(os.path.join(workdir, "tiny"), "size=64k")
    p = migrate("pre-dump", "-t", str(w.pid), "-D", tiny)
    assert p.returncode != 0 and "No space left" in p.stderr, p.stderr
    end = time.monotonic() + 5
    while _holders(w.pid) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _holders(w.pid)
    smaps = open(f"/proc/{w.pid}/smaps").read()
    assert " uw" not in smaps, "uffd-wp registration left behind"
    w.assert_pass()
