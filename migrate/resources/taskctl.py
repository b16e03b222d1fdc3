"""A seized task driven by remote syscalls, with a scratch area in it.

On the dump side the scratch area is a temporary anonymous mapping that is
removed before the task is let go; on the restore side it is the data page
of the bootstrap gadget.  Resource modules use ``put``/``get`` to pass
structures to and from the remote calls.
"""

from __future__ import annotations

import logging

from migrate.kernel import memory, sysno
from migrate.kernel.remote import RemoteTask

log = logging.getLogger(__name__)

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_GROWSDOWN, MAP_NORESERVE, MAP_FIXED_NOREPLACE = 0x100, 0x4000, 0x100000
O_RDONLY, O_WRONLY, O_RDWR, O_CLOEXEC = 0, 1, 2, 0o2000000


BATCH_MAX = 128            # 129 table entries of 64 bytes: 8 KiB of the scratch area


class TaskCtl:
    """Remote syscalls plus a scratch buffer in the task's memory."""

    def __init__(self, remote: RemoteTask, scratch: int = 0, scratch_size: int = 0) -> None:
        self.remote = remote
        self.pid = remote.pid
        self.scratch = scratch
        self.scratch_size = scratch_size
        self._mapped_scratch = False
        self.batch_code = 0      # where remote.BATCH_CODE is in the task, if it is

    def call(self, nr: int, *args: int, check: bool = True, what: str = "") -> int:
        return self.remote.call(nr, *args, check=check, what=what)

    def batch(self, calls: list[tuple[int, tuple]]) -> list[int]:
        """Results of ``calls`` [(nr, args)], independent of each other: in
        runs of BATCH_MAX through the batch code when the task has it (the
        table at the start of the scratch area), else one by one."""
        if not self.batch_code:
            return [self.call(nr, *args, check=False) for nr, args in calls]
        out: list[int] = []
        for i in range(0, len(calls), BATCH_MAX):
            out += self.remote.batch(self.batch_code, self.scratch, calls[i:i + BATCH_MAX])
        return out

    # -- scratch area ----------------------------------------------------
    def map_scratch(self, size: int = 64 * 1024) -> None:
        """mmap a temporary scratch area in the task (dump side)."""
        self.scratch = self.call(sysno.mmap, 0, size, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        self.scratch_size = size
        self._mapped_scratch = True

    def unmap_scratch(self) -> None:
        if self._mapped_scratch:
            self.call(sysno.munmap, self.scratch, self.scratch_size)
            self._mapped_scratch = False

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
