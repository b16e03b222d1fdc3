"""x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl).

python-ptrace has the full table for names in logs; these are the calls
migrate issues itself, locally or as remote syscalls.
"""

from __future__ import annotations

read = 0
write = 1
open = 2
close = 3
poll = 7
lseek = 8
mmap = 9
mprotect = 10
munmap = 11
brk = 12
rt_sigaction = 13
rt_sigprocmask = 14
ioctl = 16
pread64 = 17
pwrite64 = 18
select = 23
mremap = 25
madvise = 28
pause = 34
nanosleep = 35
dup2 = 33
getitimer = 36
setitimer = 38
getpid = 39
connect = 42
accept = 43
sendto = 44
recvfrom = 45
clone = 56
exit = 60
wait4 = 61
kill = 62
fcntl = 72
chdir = 80
fchdir = 81
umask = 95
ptrace = 101
setpgid = 109
setsid = 112
setgroups = 116
setresuid = 117
setresgid = 119
setfsuid = 122
setfsgid = 123
getpgid = 121
getsid = 124
capget = 125
capset = 126
rt_sigqueueinfo = 129
sigaltstack = 131
personality = 135
prctl = 157
arch_prctl = 158
setrlimit = 160
chroot = 161
gettid = 186
futex = 202
timer_create = 222
timer_settime = 223
timer_gettime = 224
timer_getoverrun = 225
timer_delete = 226
clock_nanosleep = 230
set_tid_address = 218
exit_group = 231
epoll_wait = 232
tgkill = 234
openat = 257
pselect6 = 270
ppoll = 271
set_robust_list = 273
get_robust_list = 274
rt_tgsigqueueinfo = 297
prlimit64 = 302
process_vm_readv = 310
process_vm_writev = 311
seccomp = 317
memfd_create = 319
userfaultfd = 323
rseq = 334
pidfd_send_signal = 424
pidfd_open = 434
clone3 = 435
close_range = 436
pidfd_getfd = 438
process_madvise = 440


_OURS = {v: k for k, v in dict(globals()).items() if isinstance(v, int) and not k.startswith("_")}


def name(nr: int) -> str:
    """Name of a syscall number, for logs (ours first, then python-ptrace's table)."""
    n = _OURS.get(nr)
    if n is not None:
        return n
    try:
        from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES
        return SYSCALL_NAMES.get(nr, f"syscall_{nr}")
    except ImportError:  # pragma: no cover - python-ptrace is a dependency
        return f"syscall_{nr}"
