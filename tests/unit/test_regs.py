"""Syscall-restart fixups of dumped registers (DESIGN.md §3)."""

import errno

from migrate.kernel.ptrace import Regs
from migrate.resources import regs

M = (1 << 64) - 1


def _r(orig, rax, rip=0x1000):
    return Regs(orig_rax=orig & M, rax=rax & M, rip=rip)


def test_erestartsys_rewinds_to_the_syscall():
    for code in (512, 513, 514):
        r = regs.fix_syscall_restart(_r(0, -code), 1)   # read()
        assert r.rax == 0 and r.rip == 0x1000 - 2 and r.orig_rax == M


def test_restart_block_sleep_restarts_with_same_args():
    r = regs.fix_syscall_restart(_r(230, -516), 1)     # clock_nanosleep
    assert r.rax == 230 and r.rip == 0x1000 - 2


def test_restart_block_other_returns_eintr():
    r = regs.fix_syscall_restart(_r(1000, -516), 1)
    assert r.rax == (-errno.EINTR) & M and r.rip == 0x1000


def test_not_in_syscall_untouched():
    r = regs.fix_syscall_restart(_r(-1, 5), 1)
    assert r.rax == 5 and r.rip == 0x1000
    r = regs.fix_syscall_restart(_r(0, 17), 1)          # completed read(): keep result
    assert r.rax == 17 and r.rip == 0x1000
