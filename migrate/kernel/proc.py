"""/proc parsers: maps, smaps, status, stat, fdinfo, auxv, timers.

Each ``parse_*`` takes the file's text (or bytes) and does no I/O, so the
unit tests feed canned contents; ``read_*`` open the real file and turn
errno into migrate errors naming the pid.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct

from migrate import errors


def _read(pid: int, name: str, binary: bool = False):
    path = f"/proc/{pid}/{name}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as e:
        raise errors.NoSuchProcess(f"read {path}", errno.ESRCH, pid) from e
    except ProcessLookupError as e:
        raise errors.NoSuchProcess(f"read {path}", errno.ESRCH, pid) from e
    except OSError as e:
        raise errors.from_errno(f"read {path}", e.errno, pid) from e
    return data if binary else data.decode("utf-8", "surrogateescape")


@dataclasses.dataclass(slots=True)
class Vma:
    """One line of /proc/PID/maps (plus VmFlags and sizes from smaps)."""
    start: int
    end: int
    perms: str          # "rwxp" / "r--s"
    pgoff: int
    dev: tuple[int, int]
    inode: int
    path: str           # "" for anonymous, "[heap]", "/usr/lib/..." ...
    deleted: bool = False
    vmflags: tuple[str, ...] = ()
    rss_kb: int = 0
    anon_kb: int = 0
    anon_huge_kb: int = 0
    shared_dirty_kb: int = 0  # Shared_Dirty: written pages mapped more than once

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def is_file(self) -> bool:
        return self.inode != 0 and not self.path.startswith("[")

    @property
    def is_special(self) -> bool:
        return self.path in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[uprobes]")


def parse_maps_line(line: str) -> Vma:
    parts = line.split(None, 5)
    if len(parts) < 5:
        raise ValueError(f"bad maps line: {line!r}")
    lo, hi = parts[0].split("-")
    major, minor = parts[3].split(":")
    path = parts[5].rstrip("\n") if len(parts) > 5 else ""
    deleted = False
    if path.endswith(" (deleted)"):
        deleted = True
        path = path[: -len(" (deleted)")]
    return Vma(int(lo, 16), int(hi, 16), parts[1], int(parts[2], 16),
               (int(major, 16), int(minor, 16)), int(parts[4]), path, deleted)


def parse_maps(text: str) -> list[Vma]:
    return [parse_maps_line(l) for l in text.splitlines() if l.strip()]


def parse_smaps(text: str) -> list[Vma]:
    """smaps: a maps line per VMA followed by "Key: value" lines."""
    out: list[Vma] = []
    cur: Vma | None = None
    for line in text.splitlines():
        if not line:
            continue
        head = line.split(None, 1)[0]
        if "-" in head and not head.endswith(":"):
            cur = parse_maps_line(line)
            out.append(cur)
            continue
        if cur is None:
            raise ValueError(f"smaps: field before first VMA: {line!r}")
        key, _, val = line.partition(":")
        if key == "VmFlags":
            cur.vmflags = tuple(val.split())
        elif key == "Rss":
            cur.rss_kb = int(val.split()[0])
        elif key == "Anonymous":
            cur.anon_kb = int(val.split()[0])
        elif key == "AnonHugePages":
            cur.anon_huge_kb = int(val.split()[0])
        elif key == "Shared_Dirty":
            cur.shared_dirty_kb = int(val.split()[0])
    return out


def read_maps(pid: int) -> list[Vma]:
    return parse_maps(_read(pid, "maps"))


def read_smaps(pid: int) -> list[Vma]:
    return parse_smaps(_read(pid, "smaps"))


def parse_status(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k] = v.strip()
    return out


def read_status(pid: int) -> dict[str, str]:
    return parse_status(_read(pid, "status"))


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """Fields of /proc/PID/stat we use (man 5 proc_pid_stat, 1-based numbers)."""
    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    flags: int
    num_threads: int
    start_time: int
    start_code: int
    end_code: int
    start_stack: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int


PF_KTHREAD = 0x00200000


def parse_stat(text: str) -> Stat:
    # comm may hold spaces and parentheses: split at the last ')'
    lpar = text.index("(")
    rpar = text.rindex(")")
    pid = int(text[:lpar])
    comm = text[lpar + 1:rpar]
    f = text[rpar + 2:].split()
    # f[0] is field 3 (state)
    def fld(n: int) -> int:
        return int(f[n - 3])
    return Stat(pid, comm, f[0], fld(4), fld(5), fld(6), fld(7), fld(9), fld(20),
                fld(22), fld(26), fld(27), fld(28), fld(45), fld(46), fld(47),
                fld(48), fld(49), fld(50), fld(51), fld(52))


def read_stat(pid: int, tid: int | None = None) -> Stat:
    name = f"task/{tid}/stat" if tid is not None else "stat"
    return parse_stat(_read(pid, name))


@dataclasses.dataclass(frozen=True, slots=True)
class PosixTimer:
    """One entry of /proc/PID/timers (fs/proc/base.c show_timer)."""
    id: int
    signo: int
    sival: int            # sigev_value, printed as a pointer
    notify: str           # "signal", "none" or "thread" (sigev_notify without the flag)
    to_thread: bool       # "tid.N": SIGEV_THREAD_ID, the signal goes to thread N
    notify_pid: int       # the N of "pid.N" or "tid.N"
    clockid: int


def parse_timers(text: str) -> list[PosixTimer]:
    """Entries come newest first; returned sorted by id."""
    out = []
    cur: dict[str, str] = {}

    def flush() -> None:
        if not cur:
            return
        try:
            signo, _, sival = cur["signal"].partition("/")
            how, _, who = cur["notify"].partition("/")
            kind, _, num = who.partition(".")
            if how not in ("signal", "none", "thread") or kind not in ("pid", "tid"):
                raise ValueError(f"notify {cur['notify']!r}")
            out.append(PosixTimer(int(cur["ID"]), int(signo), int(sival or "0", 16), how,
                                  kind == "tid", int(num), int(cur["ClockID"])))
        except (KeyError, ValueError) as e:
            raise ValueError(f"timer entry not understood: {cur!r} ({e})") from None
        cur.clear()

    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if not sep:
            continue
        if k == "ID":
            flush()
        cur[k.strip()] = v.strip()
    flush()
    return sorted(out, key=lambda t: t.id)


def read_timers(pid: int) -> list[PosixTimer]:
    return parse_timers(_read(pid, "timers"))


def parse_fdinfo(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip()] = v.strip()
    return out


def read_fdinfo(pid: int, fd: int) -> dict[str, str]:
    return parse_fdinfo(_read(pid, f"fdinfo/{fd}"))


def parse_auxv(data: bytes) -> list[tuple[int, int]]:
    """auxv: (type, value) u64 pairs up to and including AT_NULL."""
    if len(data) % 16:
        raise ValueError(f"auxv length {len(data)} is not a multiple of 16")
    out = []
    for i in range(0, len(data), 16):
        t, v = struct.unpack_from("<QQ", data, i)
        out.append((t, v))
        if t == 0:
            break
    return out


def read_auxv(pid: int) -> list[tuple[int, int]]:
    return parse_auxv(_read(pid, "auxv", binary=True))


def readlink(pid: int, name: str) -> str:
    path = f"/proc/{pid}/{name}"
    try:
        return os.readlink(path)
    except FileNotFoundError as e:
        raise errors.NoSuchProcess(f"readlink {path}", errno.ESRCH, pid) from e
    except OSError as e:
        raise errors.from_errno(f"readlink {path}", e.errno, pid) from e


def list_fds(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError as e:
        raise errors.NoSuchProcess("listdir fd", errno.ESRCH, pid) from e


def list_threads(pid: int) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(f"/proc/{pid}/task"))
    except FileNotFoundError as e:
        raise errors.NoSuchProcess("listdir task", errno.ESRCH, pid) from e


def list_children(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (/proc/PID/task/TID/children)."""
    out: list[int] = []
    for tid in list_threads(pid):
        try:
            text = _read(pid, f"task/{tid}/children")
        except errors.NoSuchProcess:
            continue
        out.extend(int(x) for x in text.split())
    return sorted(set(out))


def kill_tree(pid: int, start_time: int | None = None) -> list[int]:
    """SIGKILL ``pid`` and every descendant (children first listed, then
    killed top-down: a killed parent's children are reparented, not lost
    from the list); the pids killed.  ``start_time``: only if ``pid`` is
    still the process that started then (not a reused pid)."""
    import signal
    if start_time is not None:
        try:
            if read_stat(pid).start_time != start_time:
                return []
        except errors.MigrateError:
            return []
    killed: list[int] = []
    todo = [pid]
    while todo:
        q = todo.pop()
        try:
            todo.extend(list_children(q))
        except errors.MigrateError:
            pass
        try:
            os.kill(q, signal.SIGKILL)
            killed.append(q)
        except ProcessLookupError:
            pass
    return killed


def read_text(pid: int, name: str) -> str:
    return _read(pid, name)


def peak_rss_kb() -> int:
    """VmHWM of this process: its peak RSS since exec (ru_maxrss would also
    count the parent's peak, inherited across fork and exec)."""
    for line in _read("self", "status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


# /proc/PID/limits rows, in RLIMIT_* order (fs/proc/base.c lnames[])
LIMIT_NAMES = ("Max cpu time", "Max file size", "Max data size", "Max stack size",
               "Max core file size", "Max resident set", "Max processes", "Max open files",
               "Max locked memory", "Max address space", "Max file locks",
               "Max pending signals", "Max msgqueue size", "Max nice priority",
               "Max realtime priority", "Max realtime timeout")
RLIM_INFINITY = (1 << 64) - 1


def parse_limits(text: str) -> list[tuple[int, int]]:
    """(soft, hard) per resource.  Readable by root for any process, unlike
    prlimit(2) on another user's process, which needs CAP_SYS_RESOURCE."""
    rows = {}
    for line in text.splitlines()[1:]:
        for i, name in enumerate(LIMIT_NAMES):
            if line.startswith(name):
                soft, hard = line[len(name):].split()[:2]
                rows[i] = tuple(RLIM_INFINITY if v == "unlimited" else int(v)
                                for v in (soft, hard))
                break
    if len(rows) != len(LIMIT_NAMES):
        raise ValueError(f"limits: {len(rows)} of {len(LIMIT_NAMES)} resources found")
    return [rows[i] for i in range(len(LIMIT_NAMES))]


def read_limits(pid: int) -> list[tuple[int, int]]:
    return parse_limits(_read(pid, "limits"))
