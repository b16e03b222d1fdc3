"""kcmp(2): are two fds the same open file description, and in what order?"""

from __future__ import annotations

from migrate.kernel.syscalls import raw

SYS_kcmp = 312
KCMP_FILE = 0


def compare_files(pid1: int, fd1: int, pid2: int, fd2: int) -> int:
    """kcmp(KCMP_FILE) as an order of open file descriptions: 0 the same,
    -1 or 1 (the kernel orders them consistently), so a sorted list can be
    searched with it."""
    r, err = raw(SYS_kcmp, pid1, pid2, KCMP_FILE, fd1, fd2)
    if r == 0:
        return 0
    if r == 1:
        return -1
    if r == 2:
        return 1
    from migrate import errors
    raise errors.from_errno("kcmp", err or 22, pid1, f"fd {fd1} vs pid {pid2} fd {fd2}")
