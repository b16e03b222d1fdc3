"""orchestrator.throttle's parsers on canned /proc files (the cgroup work
itself is in tests/integration/test_throttle.py)."""

import pytest

from migrate import errors
from migrate.orchestrator import throttle as T

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
41 31 0:38 / {v2} rw,relatime - cgroup2 cgroup2 rw
"""
PURE_V2 = "30 23 0:26 /user.slice {v2} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
DEBIAN_V1 = "25 24 0:22 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"


def mountinfo(tmp_path, text, controllers):
    v2 = tmp_path / "unified"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text(controllers)
    f = tmp_path / "mountinfo"
    f.write_text(text.format(v2=v2))
    return str(f), str(v2)


def test_hybrid_without_v2_cpu_uses_v1(tmp_path):
    info, _ = mountinfo(tmp_path, HYBRID, "")
    h = T.find_hierarchy(info)
    assert (h.version, h.mountpoint, h.mount_root) == (1, "/sys/fs/cgroup/cpu", "/")
    assert h.fs_path("/a/b") == "/sys/fs/cgroup/cpu/a/b"
    assert h.fs_path("/") == "/sys/fs/cgroup/cpu/"


def test_v2_with_cpu_wins(tmp_path):
    info, v2 = mountinfo(tmp_path, HYBRID, "cpuset cpu io memory pids\n")
    h = T.find_hierarchy(info)
    assert (h.version, h.mountpoint) == (2, v2)


def test_v2_mounted_below_its_root(tmp_path):
    info, v2 = mountinfo(tmp_path, PURE_V2, "cpu memory\n")
    h = T.find_hierarchy(info)
    assert h.mount_root == "/user.slice"
    assert h.fs_path("/user.slice/x.scope") == f"{v2}/x.scope"
    with pytest.raises(errors.ThrottleError, match="outside the mount"):
        h.fs_path("/system.slice")
    with pytest.raises(errors.ThrottleError, match="outside the mount"):
        h.fs_path("/user.slice2")


def test_comounted_v1_cpu_cpuacct(tmp_path):
    info, _ = mountinfo(tmp_path, DEBIAN_V1, "")
    assert T.find_hierarchy(info).mountpoint == "/sys/fs/cgroup/cpu,cpuacct"


def test_no_cpu_controller(tmp_path):
    info, _ = mountinfo(tmp_path, HYBRID.replace("rw,cpu\n", "rw,blkio\n"), "memory")
    with pytest.raises(errors.ThrottleError, match="no cgroup cpu controller"):
        T.find_hierarchy(info)


def test_cgroup_of(tmp_path):
    f = tmp_path / "cgroup"
    f.write_text("9:name=systemd:/\n2:cpuacct:/acct\n1:cpu:/x/y\n0::/unified/z\n")
    assert T.cgroup_of(str(f), 1) == "/x/y"
    assert T.cgroup_of(str(f), 2) == "/unified/z"
    f.write_text("4:cpu,cpuacct:/docker/abc\n")
    assert T.cgroup_of(str(f), 1) == "/docker/abc"
    assert T.cgroup_of(str(f), 2) is None
    assert T.cgroup_of(str(tmp_path / "gone"), 1) is None
