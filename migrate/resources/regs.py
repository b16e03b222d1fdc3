"""CPU state of a thread: general registers, xstate, rseq; restart fixups."""

from __future__ import annotations

import errno
import logging
import struct

from migrate.images._pb import core_pb2
from migrate.kernel import memory, ptrace
from migrate.kernel import sysno

log = logging.getLogger(__name__)

ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
# Syscalls whose -ERESTART_RESTARTBLOCK we turn into a restart with the same
# arguments instead of -EINTR: re-running them is always correct, at worst
# they wait longer (a relative timeout starts again).  The kernel's own
# restart_block (remaining time) does not survive a restore.
RESTART_SAME_ARGS = {35: "nanosleep", 230: "clock_nanosleep", 7: "poll", 202: "futex"}
_M = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def regs_to_pb(r: ptrace.Regs) -> core_pb2.user_x86_regs_entry:
    return core_pb2.user_x86_regs_entry(**r.as_dict())


def regs_from_pb(e) -> ptrace.Regs:
    return ptrace.Regs(**{n: getattr(e, n) for n in ptrace.REG_NAMES})


def fix_syscall_restart(r: ptrace.Regs, pid: int) -> ptrace.Regs:
    """Registers as the task will resume them on a fresh kernel (DESIGN.md §3).

    A task frozen inside an interrupted syscall carries -ERESTART* in rax; the
    kernel would rewind it on the way out of the stop, but the restored task
    never passes that code, so the rewind is done here.
    """
    r = r.copy()
    nr, rax = _signed(r.orig_rax), _signed(r.rax)
    if nr < 0:
        return r
    if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND) or (
            rax == -ERESTART_RESTARTBLOCK and nr in RESTART_SAME_ARGS):
        r.rax = nr
        r.rip = (r.rip - 2) & _M
        if log.isEnabledFor(logging.DEBUG):
            log.debug("pid %d: %s will restart", pid, sysno.name(nr))
    elif rax == -ERESTART_RESTARTBLOCK:
        r.rax = (-errno.EINTR) & _M
        log.warning("pid %d: interrupted %s will return EINTR", pid, sysno.name(nr))
    r.orig_rax = _M
    return r


def fix_rseq(r: ptrace.Regs, pid: int, rseq: ptrace.RseqConfig) -> ptrace.Regs:
    """Inside an rseq critical section, resume at its abort handler (man 2 rseq)."""
    if not rseq.rseq_abi_pointer:
        return r
    try:
        cs_ptr = struct.unpack("<Q", memory.read_bytes(pid, rseq.rseq_abi_pointer + 8, 8))[0]
        if not cs_ptr:
            return r
        _ver, _fl, start, post_commit, abort = struct.unpack(
            "<IIQQQ", memory.read_bytes(pid, cs_ptr, 32))
    except OSError:
        return r
    if start <= r.rip < start + post_commit:
        log.info("pid %d: rip %#x inside an rseq critical section, resuming at abort %#x",
                 pid, r.rip, abort)
        r = r.copy()
        r.rip = abort
    return r


def dump_thread(pid: int, tid: int, regs: ptrace.Regs) -> core_pb2.thread_core_entry:
    rseq = ptrace.get_rseq_config(tid)
    fixed = fix_rseq(fix_syscall_restart(regs, tid), tid, rseq)
    t = core_pb2.thread_core_entry(tid=tid, regs=regs_to_pb(fixed),
                                   frozen_regs=regs_to_pb(regs),
                                   xstate=ptrace.get_xstate(tid),
                                   blocked=ptrace.get_sigmask(tid))
    t.rseq.CopyFrom(core_pb2.rseq_entry(rseq_abi_pointer=rseq.rseq_abi_pointer,
                                        rseq_abi_size=rseq.rseq_abi_size,
                                        signature=rseq.signature, flags=rseq.flags))
    return t


def restore_thread(tid: int, t) -> None:
    """Last step of a restore: registers, xstate and mask of a stopped thread."""
    ptrace.setregs(tid, regs_from_pb(t.regs))
    if t.xstate:
        ptrace.set_xstate(tid, t.xstate)
    ptrace.set_sigmask(tid, t.blocked)
