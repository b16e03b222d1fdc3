"""Raw system calls through libc's syscall(2), with errno turned into errors."""

from __future__ import annotations

from migrate import errors
from migrate.kernel import sysno
from migrate.kernel._ffi import ffi, libc

_long = ffi.typeof("long")


def _arg(a):
    if isinstance(a, int):
        return ffi.cast(_long, a)
    return ffi.cast(_long, a)  # cdata pointer


def raw(nr: int, *args) -> tuple[int, int]:
    """Issue syscall ``nr``; return (result, errno) without raising."""
    r = libc.syscall(ffi.cast(_long, nr), *[_arg(a) for a in args])
    return r, (ffi.errno if r == -1 else 0)


def call(nr: int, *args, pid: int | None = None, detail: str = "") -> int:
    """Issue syscall ``nr`` and raise a KernelError subclass on failure."""
    r = libc.syscall(ffi.cast(_long, nr), *[_arg(a) for a in args])
    if r == -1:
        raise errors.from_errno(sysno.name(nr), ffi.errno, pid, detail)
    return r


def ioctl(fd: int, request: int, arg) -> int:
    r = libc.ioctl(fd, ffi.cast("unsigned long", request), arg)
    if r == -1:
        raise errors.from_errno("ioctl", ffi.errno, None, f"fd {fd} request {request:#x}")
    return r


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return call(sysno.prctl, option, a2, a3, a4, a5)


PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_MM = 35
PR_SET_MM_MAP = 14
PR_GET_TID_ADDRESS = 40
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_GET_THP_DISABLE = 42
PR_SET_THP_DISABLE = 41
PR_GET_PDEATHSIG = 2


def set_name(name: str) -> None:
    """prctl(PR_SET_NAME) of the calling thread (15 bytes at most)."""
    prctl(PR_SET_NAME, ffi.new("char[16]", name.encode()[:15]))


def get_child_subreaper() -> bool:
    v = ffi.new("int *")
    prctl(37, v)             # PR_GET_CHILD_SUBREAPER
    return bool(v[0])


def set_child_subreaper() -> None:
    """Become a subreaper: orphans below us are reparented to us, not init."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def anon_shmem(size: int) -> int:
    """A new shmem object like the one behind mmap(MAP_SHARED|MAP_ANONYMOUS)
    (it shows as "/dev/zero (deleted)" in maps), as an O_RDWR fd."""
    import os
    addr = call(sysno.mmap, 0, size, 3, 0x21, -1, 0)   # PROT_READ|WRITE, SHARED|ANONYMOUS
    try:
        return os.open(f"/proc/self/map_files/{addr:x}-{addr + size:x}",
                       os.O_RDWR | os.O_CLOEXEC)
    finally:
        call(sysno.munmap, addr, size)


def get_robust_list(pid: int) -> tuple[int, int]:
    head = ffi.new("uint64_t *")
    size = ffi.new("size_t *")
    call(sysno.get_robust_list, pid, head, size, pid=pid)
    return int(head[0]), int(size[0])


def prlimit(pid: int, resource: int) -> tuple[int, int]:
    old = ffi.new("uint64_t[2]")
    call(sysno.prlimit64, pid, resource, ffi.NULL, old, pid=pid,
         detail=f"resource {resource}")
    return int(old[0]), int(old[1])


def set_prlimit(pid: int, resource: int, soft: int, hard: int) -> None:
    new = ffi.new("uint64_t[2]", [soft, hard])
    call(sysno.prlimit64, pid, resource, new, ffi.NULL, pid=pid,
         detail=f"resource {resource}")


CLONE_PARENT = 0x8000


def clone3_with_pid(pid: int, *, flags: int = 0, exit_signal: int = 17) -> int:
    """Fork this process with raw clone3(2) at exactly ``pid`` (set_tid).

    Returns 0 in the child and the pid in the parent.  EEXIST: pid taken.
    Race-free, unlike writing ns_last_pid (DESIGN.md §3).
    """
    tid = ffi.new("int64_t[1]", [pid])
    args = ffi.new("struct clone_args *")
    args.flags = flags
    args.exit_signal = exit_signal
    args.set_tid = int(ffi.cast("uintptr_t", tid))
    args.set_tid_size = 1
    return call(sysno.clone3, args, ffi.sizeof("struct clone_args"),
                detail=f"set_tid {pid}")


def pidfd_open(pid: int) -> int:
    return call(sysno.pidfd_open, pid, 0, pid=pid)


def pidfd_getfd(pidfd: int, targetfd: int, pid: int | None = None) -> int:
    return call(sysno.pidfd_getfd, pidfd, targetfd, 0, pid=pid, detail=f"fd {targetfd}")


def take_fd(pid: int, fd: int) -> int:
    """Our own copy of fd ``fd`` of process ``pid`` (pidfd_getfd): the same
    open file description, to close when done."""
    import os
    pidfd = pidfd_open(pid)
    try:
        return pidfd_getfd(pidfd, fd, pid)
    finally:
        os.close(pidfd)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    call(sysno.tgkill, tgid, tid, sig, pid=tid)


SPLICE_F_NONBLOCK = 2
SYS_tee = 276


def tee(fd_in: int, fd_out: int, length: int, flags: int = SPLICE_F_NONBLOCK) -> int:
    """tee(2): duplicate up to ``length`` bytes of pipe fd_in into pipe fd_out
    without consuming them."""
    return call(SYS_tee, fd_in, fd_out, length, flags, detail=f"fd {fd_in} -> fd {fd_out}")


# --- the kernel's event objects (man 2 eventfd, signalfd, timerfd_create, epoll_ctl)
SYS_signalfd4 = 289
SYS_timerfd_create = 283
SYS_timerfd_settime = 286
SYS_epoll_ctl = 233
TFD_IOC_SET_TICKS = 0x40085400   # _IOW('T', 0, __u64), CONFIG_CHECKPOINT_RESTORE
EPOLL_CTL_ADD = 1


def signalfd(mask: int, flags: int) -> int:
    m = ffi.new("uint64_t *", mask)
    return call(SYS_signalfd4, -1, m, 8, flags, detail=f"mask {mask:#x}")


def timerfd_create(clockid: int, flags: int) -> int:
    return call(SYS_timerfd_create, clockid, flags, detail=f"clock {clockid}")


def timerfd_settime(fd: int, flags: int, value: tuple[int, int],
                    interval: tuple[int, int]) -> None:
    its = ffi.new("int64_t[4]", [interval[0], interval[1], value[0], value[1]])
    call(SYS_timerfd_settime, fd, flags, its, ffi.NULL, detail=f"fd {fd}")


def timerfd_set_ticks(fd: int, ticks: int) -> None:
    t = ffi.new("uint64_t *", ticks)
    ioctl(fd, TFD_IOC_SET_TICKS, t)


def epoll_add(epfd: int, fd: int, events: int, data: int) -> None:
    # struct epoll_event is packed on x86_64: u32 events, u64 data
    ev = ffi.new("char[12]", events.to_bytes(4, "little") + data.to_bytes(8, "little"))
    call(SYS_epoll_ctl, epfd, EPOLL_CTL_ADD, fd, ev, detail=f"epoll fd {epfd} add fd {fd}")


SYS_inotify_init1, SYS_inotify_add_watch, SYS_inotify_rm_watch = 294, 254, 255
SYS_open_by_handle_at = 304


def inotify_init1(flags: int) -> int:
    return call(SYS_inotify_init1, flags)


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return call(SYS_inotify_add_watch, fd, ffi.new("char[]", path.encode()), mask,
                detail=path)


def inotify_rm_watch(fd: int, wd: int) -> None:
    call(SYS_inotify_rm_watch, fd, wd, detail=f"wd {wd}")


def open_by_handle_at(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """open_by_handle_at(2): struct file_handle {u32 bytes; i32 type; u8 handle[]}."""
    buf = ffi.new("char[]", len(handle).to_bytes(4, "little") +
                  handle_type.to_bytes(4, "little", signed=True) + handle)
    return call(SYS_open_by_handle_at, mount_fd, buf, flags, detail="file handle")


SYS_fanotify_init, SYS_fanotify_mark = 300, 301
AT_FDCWD = -100


def fanotify_init(flags: int, event_f_flags: int) -> int:
    return call(SYS_fanotify_init, flags, event_f_flags)


def fanotify_mark(fd: int, flags: int, mask: int, path: str) -> None:
    call(SYS_fanotify_mark, fd, flags, mask, AT_FDCWD, ffi.new("char[]", path.encode()),
         detail=f"{path} mask {mask:#x}")
