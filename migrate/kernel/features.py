"""Probes for the kernel features migrate depends on (`migrate check`)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess

from migrate.kernel import memory, syscalls, sysno
from migrate.kernel._ffi import ffi, libc

UFFDIO_API = 0xC018AA3F
UFFD_API = 0xAA
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_USER_MODE_ONLY = 1
TCP_REPAIR = 19
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
CAP_CHECKPOINT_RESTORE = 40


def uffd_features() -> tuple[int | None, str]:
    """Features of userfaultfd(2) offered here, or (None, why not)."""
    r, err = syscalls.raw(sysno.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    if r < 0:
        return None, f"userfaultfd: {os.strerror(err)}"
    try:
        api = ffi.new("struct uffdio_api *")
        api.api = UFFD_API
        api.features = 0
        if libc.ioctl(r, ffi.cast("unsigned long", UFFDIO_API), api) < 0:
            return None, f"UFFDIO_API: {os.strerror(ffi.errno)}"
        return int(api.features), ""
    finally:
        os.close(r)


def uffd_wp_async() -> tuple[bool, str]:
    feats, why = uffd_features()
    if feats is None:
        return False, why
    need = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED
    if feats & need != need:
        return False, f"features {feats:#x} lack WP_ASYNC/WP_UNPOPULATED"
    return True, f"features {feats:#x}"


def pagemap_scan() -> tuple[bool, str]:
    ok = memory.supports_pagemap_scan()
    return ok, "ioctl(PAGEMAP_SCAN) on /proc/self/pagemap" + ("" if ok else " failed")


def soft_dirty() -> tuple[bool, str]:
    # With CONFIG_MEM_SOFT_DIRTY every new VMA carries VM_SOFTDIRTY ("sd").
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:") and " sd" in line:
                return True, "VmFlags show sd"
    return False, "no VMA carries the sd flag (CONFIG_MEM_SOFT_DIRTY unset)"


def pidfd_getfd() -> tuple[bool, str]:
    try:
        pfd = syscalls.pidfd_open(os.getpid())
    except OSError as e:
        return False, f"pidfd_open: {e}"
    try:
        fd = syscalls.pidfd_getfd(pfd, pfd)
        os.close(fd)
        return True, "pidfd_open + pidfd_getfd"
    except OSError as e:
        return False, f"pidfd_getfd: {e}"
    finally:
        os.close(pfd)


def clone3_set_tid() -> tuple[bool, str]:
    # Ask for our own pid: EEXIST means set_tid works (and nothing is created).
    try:
        pid = syscalls.clone3_with_pid(os.getpid())
    except OSError as e:
        if e.errno == errno.EEXIST:
            return True, "clone3 with set_tid"
        return False, f"clone3 set_tid: {errno.errorcode.get(e.errno, e.errno)}"
    if pid == 0:  # cannot happen: our pid is taken
        os._exit(0)
    os.waitpid(pid, 0)
    return True, "clone3 with set_tid"


def tcp_repair() -> tuple[bool, str]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        return True, "setsockopt(TCP_REPAIR)"
    except OSError as e:
        return False, f"setsockopt(TCP_REPAIR): {os.strerror(e.errno)}"
    finally:
        s.close()


def nftables() -> tuple[bool, str]:
    from migrate.kernel import nftables as lib
    if lib.available():
        r = lib.run("list tables")
        if not r.ok:
            return False, f"{lib.LIBRARY}: list tables: {r.error}"
        return True, f"{lib.LIBRARY} (in-process)"
    nft = shutil.which("nft")
    if not nft:
        return False, f"neither {lib.LIBRARY} nor nft installed"
    p = subprocess.run([nft, "list", "tables"], capture_output=True, text=True)
    if p.returncode:
        return False, f"nft list tables: {p.stderr.strip()}"
    return True, f"{nft} ({lib.LIBRARY} missing: each lock change starts nft)"


def _cap(bit: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    return False


def set_mm_map() -> tuple[bool, str]:
    if _cap(CAP_SYS_RESOURCE) or _cap(CAP_CHECKPOINT_RESTORE):
        return True, "CAP_CHECKPOINT_RESTORE" if _cap(CAP_CHECKPOINT_RESTORE) \
            else "CAP_SYS_RESOURCE"
    return False, "neither CAP_SYS_RESOURCE nor CAP_CHECKPOINT_RESTORE"


def sys_resource() -> tuple[bool, str]:
    ok = _cap(CAP_SYS_RESOURCE)
    return ok, "CAP_SYS_RESOURCE" + (" present" if ok else " missing")


def ptrace_scope() -> tuple[bool, str]:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            v = int(f.read())
    except OSError:
        return True, "no Yama"
    return v < 3, f"yama ptrace_scope {v}"


PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_GET = 77, 2


def timer_restore_ids() -> tuple[bool, str]:
    """prctl(PR_TIMER_CREATE_RESTORE_IDS, GET): Linux 6.17+."""
    r, err = syscalls.raw(sysno.prctl, PR_TIMER_CREATE_RESTORE_IDS,
                          PR_TIMER_CREATE_RESTORE_IDS_GET, 0, 0, 0)
    if r < 0:
        return False, f"prctl(PR_TIMER_CREATE_RESTORE_IDS): {os.strerror(err)}"
    return True, "prctl(PR_TIMER_CREATE_RESTORE_IDS)"


def suspend_seccomp() -> tuple[bool, str]:
    """PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN and a tracer not itself
    under seccomp (kernel/ptrace.c check_ptrace_options)."""
    with open("/proc/self/status") as f:
        st = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
    if int(st.get("Seccomp", "0")):
        return False, "this tool runs under seccomp"
    if not int(st.get("CapEff", "0"), 16) >> CAP_SYS_ADMIN & 1:
        return False, "no CAP_SYS_ADMIN"
    return True, "CAP_SYS_ADMIN, not under seccomp"


def cpu_flags() -> list[str]:
    """The CPU feature flags of this host (/proc/cpuinfo, first CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []
