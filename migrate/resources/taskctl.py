"""A seized task driven by remote syscalls, with a scratch area in it.

On the dump side the scratch area is a temporary anonymous mapping that is
removed before the task is let go; on the restore side it is the data page
of the bootstrap gadget.  Resource modules use ``put``/``get`` to pass
structures to and from the remote calls.
"""

from __future__ import annotations

import logging

from migrate import errors
from migrate.kernel import memory, sysno
from migrate.kernel.remote import BATCH_CODE, RemoteTask

log = logging.getLogger(__name__)

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
O_RDONLY, O_WRONLY, O_RDWR, O_CLOEXEC = 0, 1, 2, 0o2000000


BATCH_MAX = 128            # 129 table entries of 64 bytes: 8 KiB of the scratch area
ARENA_AT = 8448            # CallBatch arguments and results: after the batch table
PAGE = 4096


class TaskCtl:
    """Remote syscalls plus a scratch buffer in the task's memory."""

    def __init__(self, remote: RemoteTask, scratch: int = 0, scratch_size: int = 0,
                 tgid: int = 0) -> None:
        self.remote = remote
        self.pid = remote.pid
        self.tgid = tgid or remote.pid      # another thread's ctl: its leader's pid
        self.scratch = scratch
        self.scratch_size = scratch_size
        self._mapped_scratch = 0          # bytes mapped by map_scratch
        self.batch_code = 0      # where remote.BATCH_CODE is in the task, if it is

    def call(self, nr: int, *args: int, check: bool = True, what: str = "") -> int:
        return self.remote.call(nr, *args, check=check, what=what)

    def batch(self, calls: list[tuple[int, tuple]]) -> list[int]:
        """Results of ``calls`` [(nr, args)], run in order, a failure not
        stopping the next ones: in runs of BATCH_MAX through the batch code
        when the task has it (the table at the start of the scratch area),
        else one by one."""
        if not self.batch_code:
            return [self.call(nr, *args, check=False) for nr, args in calls]
        out: list[int] = []
        tgid = self.tgid if self.tgid != self.pid else None
        for i in range(0, len(calls), BATCH_MAX):
            out += self.remote.batch(self.batch_code, self.scratch, calls[i:i + BATCH_MAX],
                                     tgid)
        return out

    def thread(self, remote: RemoteTask) -> "TaskCtl":
        """The ctl of another thread of this task: same scratch area and
        batch code (one address space)."""
        ctl = TaskCtl(remote, self.scratch, self.scratch_size, self.tgid)
        ctl.batch_code = self.batch_code
        return ctl

    def queue(self) -> "CallBatch":
        return CallBatch(self)

    # -- scratch area ----------------------------------------------------
    def map_scratch(self, size: int = 64 * 1024, code: bool = False) -> None:
        """mmap a temporary scratch area in the task (dump side).  ``code``:
        one more page, executable, with remote.BATCH_CODE for ``batch``; a
        task that may not map writable code (MDWE, an LSM) gets none and its
        batches run one call at a time."""
        if code:
            addr = self.call(sysno.mmap, 0, size + PAGE, PROT_READ | PROT_WRITE | PROT_EXEC,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0, check=False)
            if -4096 < addr < 0:
                log.debug("pid %d: no executable scratch page (errno %d): one call at a "
                          "time", self.pid, -addr)
            else:
                self.scratch, self.scratch_size = addr, size
                self._mapped_scratch = size + PAGE
                memory.write_bytes(self.pid, addr + size, BATCH_CODE)
                self.batch_code = addr + size
                return
        self.scratch = self.call(sysno.mmap, 0, size, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        self.scratch_size = size
        self._mapped_scratch = size

    def unmap_scratch(self) -> None:
        if self._mapped_scratch:
            self.call(sysno.munmap, self.scratch, self._mapped_scratch)
            self._mapped_scratch = 0
            self.batch_code = 0

    def put(self, data: bytes, offset: int = 0) -> int:
        """Copy ``data`` into the scratch area; return its remote address."""
        if offset + len(data) > self.scratch_size:
            raise ValueError(f"{len(data)} bytes at {offset} do not fit the scratch area")
        addr = self.scratch + offset
        memory.write_bytes(self.pid, addr, data)
        return addr

    def write(self, addr: int, data: bytes) -> None:
        """Copy ``data`` to any writable address of the task."""
        memory.write_bytes(self.pid, addr, data)

    def get(self, size: int, offset: int = 0) -> bytes:
        return memory.read_bytes(self.pid, self.scratch + offset, size)

    def put_str(self, s: str, offset: int = 0) -> int:
        return self.put(s.encode("utf-8", "surrogateescape") + b"\0", offset)

    def open(self, path: str, flags: int, mode: int = 0) -> int:
        addr = self.put_str(path, self.scratch_size - 4096)
        return self.call(sysno.open, addr, flags, mode, what=f"open({path!r})")

    def close(self, fd: int) -> None:
        self.call(sysno.close, fd)


class CallBatch:
    """Remote syscalls queued by several resource modules, then run in one
    go (``TaskCtl.batch``: one stop of the task instead of one a call).

    ``put`` and ``out`` hand out room in the scratch area (after the batch
    table) for a call's input and output; ``add`` queues a call and what to
    do with its result, which runs after ``run``, when the outputs are
    read back (``read``).  A failed call raises at ``run`` (the calls after
    it ran too: a dump puts the task back, a restore kills it), unless it
    was added with check=False.  A queue whose arena is full runs what it
    holds first: a call takes its room in one ``put`` or ``out``, right
    before its ``add``."""

    def __init__(self, ctl: TaskCtl) -> None:
        self.ctl = ctl
        self.calls: list[tuple[int, tuple]] = []
        self._then: list = []
        self._inputs: list[tuple[int, bytes]] = []
        self._at = ctl.scratch + ARENA_AT
        self._end = ctl.scratch + ctl.scratch_size - PAGE     # TaskCtl.open's page
        self._out = b""
        self._out_at = self._at

    def _room(self, size: int) -> int:
        size = (size + 7) & ~7
        if self._at + size > self._end:
            if size > self._end - self.ctl.scratch - ARENA_AT:
                raise ValueError(f"{size} bytes do not fit the scratch area")
            self.run()
        addr = self._at
        self._at += size
        return addr

    def put(self, data: bytes) -> int:
        """Remote address of a copy of ``data``, written before the calls run."""
        addr = self._room(len(data))
        self._inputs.append((addr, data))
        return addr

    def put_str(self, s: str) -> int:
        return self.put(s.encode("utf-8", "surrogateescape") + b"\0")

    def out(self, size: int) -> int:
        """Remote address of ``size`` bytes for a call to fill."""
        return self._room(size)

    def read(self, addr: int, size: int) -> bytes:
        """What the calls left at ``addr`` (an ``out`` area), once run."""
        off = addr - self._out_at
        return self._out[off:off + size]

    def add(self, nr: int, *args: int, then=None, check: bool = True,
            what: str = "") -> None:
        """Queue ``nr(*args)``; ``then(result)`` is called after the run."""
        self.calls.append((nr, args))
        self._then.append((then, check, what or sysno.name(nr)))

    def run(self) -> None:
        calls, thens, inputs = self.calls, self._then, self._inputs
        start, used = self.ctl.scratch + ARENA_AT, self._at - self.ctl.scratch - ARENA_AT
        self.calls, self._then, self._inputs = [], [], []
        self._at = start
        if not calls:
            return
        if inputs:
            lo = min(a for a, _ in inputs)
            hi = max(a + len(d) for a, d in inputs)
            buf = bytearray(hi - lo)
            for a, d in inputs:
                buf[a - lo:a - lo + len(d)] = d
            memory.write_bytes(self.ctl.pid, lo, bytes(buf))
        results = self.ctl.batch(calls)
        self._out_at = start
        self._out = memory.read_bytes(self.ctl.pid, start, used) if used else b""
        for res, (_, check, what) in zip(results, thens, strict=True):
            if check and -4096 < res < 0:
                raise errors.from_errno(f"remote {what}", -res, self.ctl.pid)
        for res, (then, _, _) in zip(results, thens, strict=True):
            if then is not None:
                then(res)
