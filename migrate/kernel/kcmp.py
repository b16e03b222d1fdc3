"""kcmp(2): are two fds the same open file description?"""

from __future__ import annotations

from migrate.kernel.syscalls import raw

SYS_kcmp = 312
KCMP_FILE = 0


def same_file(pid: int, fd1: int, fd2: int) -> bool:
    r, _err = raw(SYS_kcmp, pid, pid, KCMP_FILE, fd1, fd2)
    return r == 0
