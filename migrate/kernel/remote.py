"""Remote system calls in a stopped task, no parasite (DESIGN.md §3).

The task is seized and sits in a ptrace stop.  For each call we point rip at
a ``syscall`` instruction (0f 05) that already exists in the task (its vdso
has several), load rax and the arguments, set orig_rax = -1 so that the
kernel does no syscall-restart processing, and step with PTRACE_SYSCALL to the
syscall-exit stop, where rax holds the result.  No breakpoint is written and
no signal is raised, so the task's memory, handlers and mask are untouched:
a forced SIGTRAP would reset a handler the task set to SIG_IGN.

``finish()`` puts the saved registers back from a fresh PTRACE_INTERRUPT
stop, where the kernel's syscall-restart logic still runs on them when the
task resumes: a task frozen in clock_nanosleep restarts it as if nothing
happened.
"""

from __future__ import annotations

import errno
import logging
import struct

from migrate import errors
from migrate.kernel import memory, ptrace, sysno
from migrate.kernel._ffi import ffi, libc
from migrate.kernel.proc import Vma

log = logging.getLogger(__name__)

SYSCALL_INSN = b"\x0f\x05"
# A batch of syscalls in one run (RemoteTask.batch): r12 points at a table
# of 64-byte entries {nr, six args, result}, ended by nr = -1; each result
# is stored back; then tgkill(r13, r14, SIGSTOP) hands the task back to us
# (a SIGSTOP cannot be blocked or caught and we drop it at its
# signal-delivery stop: nothing of the task changes, unlike a forced trap).
#   loop: mov rax,[r12]; cmp rax,-1; je done; mov rdi,[r12+8]; mov rsi,[r12+16]
#         mov rdx,[r12+24]; mov r10,[r12+32]; mov r8,[r12+40]; mov r9,[r12+48]
#         syscall; mov [r12+56],rax; add r12,64; jmp loop
#   done: mov eax,234; mov rdi,r13; mov rsi,r14; mov edx,19; syscall; jmp done
BATCH_CODE = bytes.fromhex(
    "498b04244883f8ff742b498b7c2408498b742410498b5424184d8b5424204d8b4424284d8b4c2430"
    "0f0549894424384983c440ebcbb8ea0000004c89ef4c89f6ba130000000f05ebec")
BATCH_ENTRY = 64
_ENTRY = struct.Struct("<8Q")      # nr, six arguments, result
_END = struct.Struct("<Q")
_RESULT = struct.Struct("<Q")
SIGSTOP = 19
_MASK64 = (1 << 64) - 1
MAX_ERRNO = 4095
_CLONE_EVENTS = (1, 2, 3)   # PTRACE_EVENT_FORK, VFORK, CLONE


class RemoteSyscallError(errors.KernelError):
    """A remote syscall could not be run at all (not: it returned -errno)."""


def find_syscall_insn(pid: int, vmas: list[Vma]) -> int:
    """Address of a ``syscall`` instruction in an executable area of ``pid``.

    The vdso comes first: every x86_64 vdso has syscall fallbacks and it is
    never written, so nothing of the task changes.
    """
    cands = sorted((v for v in vmas if v.executable and v.path != "[vsyscall]"),
                   key=lambda v: (v.path != "[vdso]", v.start))
    with memory.ProcMem(pid) as mem:
        for v in cands:
            size = min(v.size, 1 << 20)
            try:
                data = mem.read(v.start, size)
            except errors.KernelError:
                continue
            i = data.find(SYSCALL_INSN)
            if i >= 0:
                return v.start + i
    raise RemoteSyscallError("find syscall instruction", errno.ENOEXEC, pid,
                             "no executable area holds a syscall instruction")


class RemoteTask:
    """Issue system calls inside a seized task that is in a ptrace stop."""

    def __init__(self, pid: int, gadget: int, saved: ptrace.Regs | None = None) -> None:
        """``saved``: the task's registers in this stop, if the caller has
        them (they are put back by ``finish``)."""
        self.pid = pid
        self.gadget = gadget
        self.saved = saved.copy() if saved is not None else ptrace.getregs(pid)
        self.calls = 0
        self.at_syscall_exit = False
        self._work = ffi.new("struct user_regs_struct *")
        for n in ptrace.REG_NAMES:
            setattr(self._work, n, getattr(self.saved, n) & _MASK64)
        self._work.orig_rax = _MASK64  # -1: no restart processing on the way out
        self._work.rip = gadget
        self._rax = ffi.new("unsigned long *")
        self._status = ffi.new("int *")
        self._long = ffi.typeof("long")
        self._debug = log.isEnabledFor(logging.DEBUG)
        self._batch_regs = None

    def set_gadget(self, gadget: int) -> None:
        """Use another ``syscall`` instruction from now on."""
        self.gadget = gadget
        self._work.rip = gadget

    def _pt(self, req: int, addr, data) -> None:
        L = self._long
        r = libc.syscall(ffi.cast(L, sysno.ptrace), ffi.cast(L, req), ffi.cast(L, self.pid),
                         ffi.cast(L, addr), ffi.cast(L, data))
        if r == -1:
            raise errors.from_errno(f"ptrace({req:#x})", ffi.errno, self.pid)

    def call(self, nr: int, *args: int, check: bool = True, what: str = "") -> int:
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        w = self._work
        w.rax = nr
        a = list(args) + [0] * (6 - len(args))
        w.rdi = a[0] & _MASK64
        w.rsi = a[1] & _MASK64
        w.rdx = a[2] & _MASK64
        w.r10 = a[3] & _MASK64
        w.r8 = a[4] & _MASK64
        w.r9 = a[5] & _MASK64
        pid = self.pid
        self._pt(ptrace.PTRACE_SETREGS, 0, w)
        for phase in ("entry", "exit"):
            while True:
                self._pt(ptrace.PTRACE_SYSCALL, 0, 0)
                st = ptrace.wait(pid)
                if st.is_syscall_stop:
                    break
                if phase == "exit" and st.stopped and st.event in _CLONE_EVENTS:
                    continue      # a remote clone3 (threads): its exit stop follows
                raise RemoteSyscallError(
                    f"remote {sysno.name(nr)}", errno.EFAULT, pid,
                    f"expected syscall-{phase} stop at {self.gadget:#x}, "
                    f"task {st.describe()}")
        self.at_syscall_exit = True
        self.calls += 1
        # PTRACE_PEEKUSER of offsetof(struct user_regs_struct, rax)
        self._pt(3, 10 * 8, self._rax)
        res = int(self._rax[0])
        if res > _MASK64 >> 1:
            res -= 1 << 64
        if check and -MAX_ERRNO <= res < 0:
            raise errors.from_errno(f"remote {what or sysno.name(nr)}", -res, pid)
        if self._debug:
            log.debug("pid %d: remote %s%s = %#x", pid, sysno.name(nr),
                      tuple(hex(x) for x in args), res & _MASK64)
        return res

    def batch(self, code: int, table: int, calls: list[tuple[int, tuple]],
              tgid: int | None = None) -> list[int]:
        """Run ``calls`` [(nr, args)] in one go, in order: BATCH_CODE is at
        ``code`` in the task, ``table`` has room for len(calls) + 1 entries;
        returns the results (-errno on failure: a failed call does not stop
        the next ones).  ``tgid``: the thread group of this task, when it is
        not its leader (the closing tgkill names both).  Calls must not fork
        or clone.  The closing SIGSTOP drops any SIGCONT queued in the
        thread group (kernel/signal.c prepare_signal): the caller makes sure
        there is none to lose."""
        if not calls:
            return []
        rows = bytearray(BATCH_ENTRY * len(calls) + 8)
        for i, (nr, args) in enumerate(calls):
            a = [x & _MASK64 for x in args] + [0] * (6 - len(args))
            _ENTRY.pack_into(rows, i * BATCH_ENTRY, nr, *a, 0)
        _END.pack_into(rows, BATCH_ENTRY * len(calls), _MASK64)
        memory.write_bytes(self.pid, table, bytes(rows))
        w = self._batch_regs
        if w is None:
            w = self._batch_regs = ffi.new("struct user_regs_struct *")
            ffi.memmove(w, self._work, ffi.sizeof(w[0]))
            w.orig_rax = _MASK64
        w.rip = code
        w.r12 = table
        w.r13 = self.pid if tgid is None else tgid
        w.r14 = self.pid
        self._pt(ptrace.PTRACE_SETREGS, 0, w)
        self._pt(ptrace.PTRACE_CONT, 0, 0)
        while True:
            st = ptrace.wait(self.pid)
            if st.exited:
                raise RemoteSyscallError("remote batch", errno.ESRCH, self.pid,
                                         f"task {st.describe()}")
            if st.stopped and not st.event and st.sig == SIGSTOP:
                break           # our SIGSTOP: dropped by the next resume
            raise RemoteSyscallError("remote batch", errno.EFAULT, self.pid,
                                     f"expected our SIGSTOP, task {st.describe()}")
        self.at_syscall_exit = False     # in the signal-delivery stop of our SIGSTOP
        self.calls += len(calls)
        data = memory.read_bytes(self.pid, table, BATCH_ENTRY * len(calls))
        out = []
        for i in range(len(calls)):
            res = _RESULT.unpack_from(data, i * BATCH_ENTRY + 56)[0]
            out.append(res - (1 << 64) if res > _MASK64 >> 1 else res)
        if self._debug:     # one line per batch
            log.debug("pid %d: remote batch of %d: %s", self.pid, len(calls), ", ".join(
                f"{sysno.name(nr)}{tuple(hex(x) for x in args)}={res & _MASK64:#x}"
                for (nr, args), res in zip(calls, out)))
        return out

    def finish(self) -> None:
        """Put the saved registers back from an interrupt stop (see module
        doc).  After a batch the task sits in the signal-delivery stop of its
        closing SIGSTOP, inside get_signal(), where the restart logic runs on
        the registers as well when it resumes: they are put back there."""
        if self.at_syscall_exit:
            ptrace.interrupt_and_wait_from_stop(self.pid)
            self.at_syscall_exit = False
        ptrace.setregs(self.pid, self.saved)
