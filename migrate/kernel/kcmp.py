"""kcmp(2): are two fds the same open file description?"""

from __future__ import annotations

from migrate.kernel.syscalls import raw

SYS_kcmp = 312
KCMP_FILE = 0


def same_file(pid: int, fd1: int, fd2: int, pid2: int | None = None) -> bool:
    """Is fd1 of ``pid`` the same open file description as fd2 of ``pid2``
    (default: the same process)?"""
    r, _err = raw(SYS_kcmp, pid, pid if pid2 is None else pid2, KCMP_FILE, fd1, fd2)
    return r == 0
