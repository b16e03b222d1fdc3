"""ptrace(2): seize, interrupt, registers, xstate, signal state.

Only PTRACE_SEIZE is used, never PTRACE_ATTACH (DESIGN.md §3): ATTACH sends
SIGSTOP and changes the task's visible state.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal

from migrate import errors
from migrate.kernel import sysno
from migrate.kernel._ffi import ffi
from migrate.kernel.syscalls import raw

PTRACE_PEEKDATA = 2
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_GETREGSET = 0x4204
PTRACE_SETREGSET = 0x4205
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_LISTEN = 0x4208
PTRACE_PEEKSIGINFO = 0x4209
PTRACE_GETSIGMASK = 0x420A
PTRACE_SETSIGMASK = 0x420B
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_GET_RSEQ_CONFIGURATION = 0x420F
PTRACE_SETOPTIONS = 0x4200
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_SECCOMP_GET_METADATA = 0x420D

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 1 << 20
PTRACE_O_SUSPEND_SECCOMP = 1 << 21   # needs CAP_SYS_ADMIN; seccomp off while traced

PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128
PTRACE_PEEKSIGINFO_SHARED = 1

NT_PRSTATUS = 1
NT_X86_XSTATE = 0x202

WALL = 0x40000000  # __WALL: wait for clones too

REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
             "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
             "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
XSTATE_MAX = 64 * 1024  # far above any CPU's XSAVE area (AVX-512 is ~2.7 KiB)
SIGINFO_SIZE = 128


@dataclasses.dataclass(slots=True)
class Regs:
    """struct user_regs_struct (arch/x86/include/asm/user_64.h), field order kept."""
    r15: int = 0; r14: int = 0; r13: int = 0; r12: int = 0; rbp: int = 0
    rbx: int = 0; r11: int = 0; r10: int = 0; r9: int = 0; r8: int = 0
    rax: int = 0; rcx: int = 0; rdx: int = 0; rsi: int = 0; rdi: int = 0
    orig_rax: int = 0; rip: int = 0; cs: int = 0; eflags: int = 0; rsp: int = 0
    ss: int = 0; fs_base: int = 0; gs_base: int = 0; ds: int = 0; es: int = 0
    fs: int = 0; gs: int = 0

    def copy(self) -> "Regs":
        return dataclasses.replace(self)

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in REG_NAMES}     # asdict deep-copies: slow


@dataclasses.dataclass(frozen=True, slots=True)
class RseqConfig:
    """struct ptrace_rseq_configuration (include/uapi/linux/ptrace.h)."""
    rseq_abi_pointer: int
    rseq_abi_size: int
    signature: int
    flags: int


def _pt(req: int, pid: int, addr=0, data=0, what: str = "") -> int:
    r, err = raw(sysno.ptrace, req, pid, addr, data)
    if r == -1:
        raise errors.from_errno(f"ptrace({what or hex(req)})", err, pid)
    return r


def seize(pid: int, options: int = 0) -> None:
    _pt(PTRACE_SEIZE, pid, 0, options, "SEIZE")


def interrupt(pid: int) -> None:
    _pt(PTRACE_INTERRUPT, pid, 0, 0, "INTERRUPT")


def cont(pid: int, sig: int = 0) -> None:
    _pt(PTRACE_CONT, pid, 0, sig, "CONT")


def syscall(pid: int, sig: int = 0) -> None:
    _pt(PTRACE_SYSCALL, pid, 0, sig, "SYSCALL")


def detach(pid: int, sig: int = 0) -> None:
    _pt(PTRACE_DETACH, pid, 0, sig, "DETACH")


def listen(pid: int) -> None:
    _pt(PTRACE_LISTEN, pid, 0, 0, "LISTEN")


def getregs(pid: int) -> Regs:
    buf = ffi.new("struct user_regs_struct *")
    _pt(PTRACE_GETREGS, pid, 0, buf, "GETREGS")
    return Regs(*[int(getattr(buf, n)) for n in REG_NAMES])


def setregs(pid: int, regs: Regs) -> None:
    buf = ffi.new("struct user_regs_struct *")
    for n in REG_NAMES:
        setattr(buf, n, getattr(regs, n) & 0xFFFFFFFFFFFFFFFF)
    _pt(PTRACE_SETREGS, pid, 0, buf, "SETREGS")


def get_prstatus(pid: int) -> Regs:
    """GETREGSET NT_PRSTATUS: the general registers as a core dump has them."""
    buf = ffi.new("struct user_regs_struct *")
    iov = ffi.new("struct iovec *")
    iov.iov_base = buf
    iov.iov_len = ffi.sizeof(buf[0])
    _pt(PTRACE_GETREGSET, pid, NT_PRSTATUS, iov, "GETREGSET NT_PRSTATUS")
    return Regs(*[int(getattr(buf, n)) for n in REG_NAMES])


def set_prstatus(pid: int, regs: Regs) -> None:
    buf = ffi.new("struct user_regs_struct *")
    for n in REG_NAMES:
        setattr(buf, n, getattr(regs, n) & 0xFFFFFFFFFFFFFFFF)
    iov = ffi.new("struct iovec *")
    iov.iov_base = buf
    iov.iov_len = ffi.sizeof(buf[0])
    _pt(PTRACE_SETREGSET, pid, NT_PRSTATUS, iov, "SETREGSET NT_PRSTATUS")


_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)


def get_xstate(pid: int) -> bytes:
    """The full XSAVE area (x87, SSE, AVX, AVX-512...) as the kernel sizes it."""
    buf = _new_uncleared("char[]", XSTATE_MAX)   # only what the kernel filled is read
    iov = ffi.new("struct iovec *")
    iov.iov_base = buf
    iov.iov_len = XSTATE_MAX
    _pt(PTRACE_GETREGSET, pid, NT_X86_XSTATE, iov, "GETREGSET NT_X86_XSTATE")
    return ffi.buffer(buf, iov.iov_len)[:]


def set_xstate(pid: int, xstate: bytes) -> None:
    buf = ffi.from_buffer(xstate)
    iov = ffi.new("struct iovec *")
    iov.iov_base = ffi.cast("void *", buf)
    iov.iov_len = len(xstate)
    _pt(PTRACE_SETREGSET, pid, NT_X86_XSTATE, iov, "SETREGSET NT_X86_XSTATE")


def get_sigmask(pid: int) -> int:
    m = ffi.new("uint64_t *")
    _pt(PTRACE_GETSIGMASK, pid, 8, m, "GETSIGMASK")
    return int(m[0])


def set_sigmask(pid: int, mask: int) -> None:
    m = ffi.new("uint64_t *", mask)
    _pt(PTRACE_SETSIGMASK, pid, 8, m, "SETSIGMASK")


def peek_siginfo(pid: int, shared: bool) -> list[bytes]:
    """Queued signals without dequeuing them: 128-byte siginfo_t each."""
    out: list[bytes] = []
    nr = 32
    buf = ffi.new("char[]", SIGINFO_SIZE * nr)
    args = ffi.new("struct ptrace_peeksiginfo_args *")
    args.flags = PTRACE_PEEKSIGINFO_SHARED if shared else 0
    args.nr = nr
    while True:
        args.off = len(out)
        n = _pt(PTRACE_PEEKSIGINFO, pid, args, buf, "PEEKSIGINFO")
        for i in range(n):
            out.append(ffi.buffer(buf + i * SIGINFO_SIZE, SIGINFO_SIZE)[:])
        if n < nr:
            return out


def get_rseq_config(pid: int) -> RseqConfig:
    c = ffi.new("struct ptrace_rseq_configuration *")
    _pt(PTRACE_GET_RSEQ_CONFIGURATION, pid, ffi.sizeof(c[0]), c, "GET_RSEQ_CONFIGURATION")
    return RseqConfig(int(c.rseq_abi_pointer), int(c.rseq_abi_size), int(c.signature),
                      int(c.flags))


def set_options(pid: int, options: int) -> None:
    """PTRACE_SETOPTIONS: replaces every option (there is no GETOPTIONS)."""
    _pt(PTRACE_SETOPTIONS, pid, 0, options, "SETOPTIONS")


SOCK_FILTER_SIZE = 8       # struct sock_filter (include/uapi/linux/filter.h)


def seccomp_get_filter(pid: int, index: int) -> bytes:
    """The classic BPF program of seccomp filter ``index`` (0: the oldest,
    kernel/seccomp.c get_nth_filter); ENOENT past the newest."""
    n = _pt(PTRACE_SECCOMP_GET_FILTER, pid, index, 0, f"SECCOMP_GET_FILTER {index}")
    buf = ffi.new("char[]", n * SOCK_FILTER_SIZE)
    n = _pt(PTRACE_SECCOMP_GET_FILTER, pid, index, buf, f"SECCOMP_GET_FILTER {index}")
    return ffi.buffer(buf, n * SOCK_FILTER_SIZE)[:]


def seccomp_get_flags(pid: int, index: int) -> int:
    """SECCOMP_FILTER_FLAG_* of filter ``index`` (struct seccomp_metadata: only LOG is told)."""
    md = ffi.new("uint64_t[2]", [index, 0])
    _pt(PTRACE_SECCOMP_GET_METADATA, pid, 16, md, f"SECCOMP_GET_METADATA {index}")
    return int(md[1])


def get_syscall_info(pid: int) -> bytes:
    """struct ptrace_syscall_info, raw (op tells entry/exit/seccomp)."""
    buf = ffi.new("char[]", 88)
    n = _pt(PTRACE_GET_SYSCALL_INFO, pid, 88, buf, "GET_SYSCALL_INFO")
    return ffi.buffer(buf, min(n, 88))[:]


@dataclasses.dataclass(frozen=True, slots=True)
class Stop:
    """One waitpid(2) result for a traced task."""
    pid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def stopped(self) -> bool:
        return os.WIFSTOPPED(self.status)

    @property
    def sig(self) -> int:
        return os.WSTOPSIG(self.status) if self.stopped else 0

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFFFF

    @property
    def is_syscall_stop(self) -> bool:
        return self.stopped and self.sig == (signal.SIGTRAP | 0x80)

    @property
    def is_event_stop(self) -> bool:
        return self.stopped and self.event == PTRACE_EVENT_STOP

    def describe(self) -> str:
        if os.WIFEXITED(self.status):
            return f"exited with {os.WEXITSTATUS(self.status)}"
        if os.WIFSIGNALED(self.status):
            return f"killed by signal {os.WTERMSIG(self.status)}"
        if self.is_event_stop:
            return f"ptrace event stop (sig {self.sig})"
        if self.event:
            return f"ptrace event {self.event}"
        return f"stopped by signal {self.sig}"


def wait(pid: int, flags: int = 0) -> Stop:
    while True:
        try:
            wpid, status = os.waitpid(pid, WALL | flags)
        except ChildProcessError as e:
            raise errors.from_errno("waitpid", errno.ECHILD, pid) from e
        except InterruptedError:
            continue
        return Stop(wpid, status)


def interrupt_and_wait(pid: int) -> Stop:
    """INTERRUPT a seized task and wait until it sits in a ptrace event stop.

    A signal-delivery-stop seen on the way belongs to the task: it is
    re-injected (the task would have received it anyway), and we wait on.
    """
    interrupt(pid)
    return wait_interrupted(pid)


def wait_interrupted(pid: int) -> Stop:
    """Wait until a task INTERRUPTed already sits in a ptrace event stop
    (see interrupt_and_wait): interrupt many tasks first, then wait for
    each, and they stop at the same time."""
    while True:
        st = wait(pid)
        if st.exited:
            raise errors.NoSuchProcess("ptrace(INTERRUPT)", errno.ESRCH, pid,
                                       f"task {st.describe()} while freezing")
        if st.is_event_stop:
            return st
        if st.event:  # another ptrace event (clone, exec...): just go on
            cont(pid, 0)
            continue
        # signal-delivery-stop: give the signal back, the interrupt stays pending
        cont(pid, st.sig)


def interrupt_and_wait_from_stop(pid: int) -> Stop:
    """From a syscall stop, go to an interrupt stop without running user code.

    The pending trap is taken on the way back to user mode, inside
    get_signal(), where the syscall-restart logic still sees the registers.
    """
    interrupt(pid)
    cont(pid, 0)
    while True:
        st = wait(pid)
        if st.exited:
            raise errors.NoSuchProcess("ptrace(INTERRUPT)", errno.ESRCH, pid,
                                       f"task {st.describe()}")
        if st.is_event_stop:
            return st
        cont(pid, st.sig if not st.event else 0)
