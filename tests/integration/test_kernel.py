"""The kernel layer on a real task: ptrace wrappers agree with each other."""

from __future__ import annotations

import subprocess
import time

from migrate.kernel import ptrace, remote, proc, sysno


def test_regsets_sigmask_syscall_info_and_remote_syscall():
    p = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.1)
        ptrace.seize(p.pid, ptrace.PTRACE_O_TRACESYSGOOD)
        ptrace.interrupt_and_wait(p.pid)
        regs = ptrace.getregs(p.pid)
        assert ptrace.get_prstatus(p.pid) == regs
        ptrace.set_prstatus(p.pid, regs)
        assert ptrace.getregs(p.pid) == regs
        assert len(ptrace.get_xstate(p.pid)) >= 576          # legacy area + header
        mask = ptrace.get_sigmask(p.pid)
        ptrace.set_sigmask(p.pid, mask | 1 << 9)             # SIGUSR1 (bit 10 - 1)
        assert ptrace.get_sigmask(p.pid) == mask | 1 << 9
        ptrace.set_sigmask(p.pid, mask)
        assert ptrace.get_syscall_info(p.pid)                # some ptrace_syscall_info
        rt = remote.RemoteTask(p.pid, remote.find_syscall_insn(p.pid, proc.read_maps(p.pid)))
        assert rt.call(sysno.getpid) == p.pid
        rt.finish()
        assert ptrace.getregs(p.pid) == regs                 # put back as it was
        ptrace.detach(p.pid)
        assert p.poll() is None                              # still sleeping
    finally:
        p.kill()
        p.wait()
