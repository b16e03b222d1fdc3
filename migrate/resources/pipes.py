"""Pipes: both ends, their flags, their size, and the data in flight.

Dump: each end is a file description (``pipe:[INODE]``); the data in flight
is copied without being consumed: the tool takes the read end with
pidfd_getfd and tee(2)s it into a pipe of its own, then reads that.  Both
ends must belong to the dumped process (a pipe to a process outside the
dump has nobody to recreate the other end: refused).
Restore (inside the new task, like regular files): pipe2, F_SETPIPE_SZ, the
data written back, then each end placed at its fd numbers.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import syscalls

log = logging.getLogger(__name__)

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
O_ACCMODE = 0o3
SETFL_MASK = os.O_NONBLOCK | os.O_APPEND | getattr(os, "O_DIRECT", 0) | os.O_ASYNC


def pipe_id(link: str) -> int:
    return int(link[len("pipe:["):-1])


def dump_end(fid: int, link: str, flags: int):
    return files_pb2.file_entry(id=fid, type=files_pb2.PIPE, pipe=files_pb2.pipe_entry(
        pipe_id=pipe_id(link), read_end=(flags & O_ACCMODE) == os.O_RDONLY,
        flags=flags & SETFL_MASK))


def dump_data(entries: list, fd_of: dict[int, tuple[int, int]]) -> list:
    """pipe_data_entry per pipe.  ``fd_of``: file id -> (pid, fd) holding it.
    Both ends of every pipe must be in the dump, or the missing one closed
    everywhere."""
    ends: dict[int, dict[bool, tuple[int, int]]] = {}
    for f in entries:
        if f.type == files_pb2.PIPE:
            ends.setdefault(f.pipe.pipe_id, {})[f.pipe.read_end] = fd_of[f.id]
    out = []
    for pid_, sides in ends.items():
        if len(sides) != 2:
            read = True in sides
            pid, fd = next(iter(sides.values()))
            if not _other_end_gone(pid, fd, read):
                raise errors.UnsupportedResource(
                    pid, "pipe", f"pipe:[{pid_}] has only its {'read' if read else 'write'} "
                                 "end in the dump: the other end belongs to a process "
                                 "outside the dump", fd=fd)
            # The other end is closed everywhere: the restore makes the pipe
            # and closes that end again (the tool's copy is the last one).
            if not read:
                continue        # nobody can read what is in flight
        pid, fd = sides[True]
        out.append(_copy_in_flight(pid, pid_, syscalls.take_fd(pid, fd)))
    # FIFOs: through a read end of the dump, else through the FIFO's path
    fifos: dict[int, tuple] = {}
    for f in entries:
        if f.type == files_pb2.FIFO:
            if f.pipe.read_end or f.pipe.pipe_id not in fifos:
                fifos[f.pipe.pipe_id] = (f, fd_of[f.id])
    for pid_, (f, (pid, fd)) in fifos.items():
        src = syscalls.take_fd(pid, fd) if f.pipe.read_end else \
            os.open(f.reg.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        out.append(_copy_in_flight(pid, pid_, src))
    return out


def _other_end_gone(pid: int, fd: int, read: bool) -> bool:
    """Is the other end of this pipe end closed in every process?  poll(2)
    says so: POLLHUP on a read end with no writer left, POLLERR on a write
    end with no reader left."""
    import select
    mine = syscalls.take_fd(pid, fd)
    try:
        p = select.poll()
        p.register(mine, select.POLLIN if read else select.POLLOUT)
        ev = sum(e for _, e in p.poll(0))
        return bool(ev & (select.POLLHUP if read else select.POLLERR))
    finally:
        os.close(mine)


def _copy_in_flight(pid: int, pid_: int, fd: int):
    """The bytes in the pipe ``fd`` (ours; closed here), copied with tee(2)."""
    try:
        size = fcntl.fcntl(fd, F_GETPIPE_SZ)
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, size)
            n = 0
            try:
                n = syscalls.tee(fd, w, size)
            except errors.KernelError as e:
                if e.errno != errno.EAGAIN:       # EAGAIN: the pipe is empty
                    raise
            data = b""
            while len(data) < n:
                data += os.read(r, n - len(data))
        finally:
            os.close(r)
            os.close(w)
    finally:
        os.close(fd)
    log.debug("pid %d: pipe:[%d] size %d, %d bytes in flight", pid, pid_, size, len(data))
    return files_pb2.pipe_data_entry(pipe_id=pid_, size=size, data=data)


class Pipes:
    """Restore side, in the new task: each pipe made once, on first use."""

    def __init__(self, data: list) -> None:
        self.data = {d.pipe_id: d for d in data}
        self.made: dict[int, tuple[int, int]] = {}
        self.used: set[tuple[int, bool]] = set()

    def open_end(self, f) -> int:
        if f.type == files_pb2.FIFO:
            return self._fifo_end(f)
        p = f.pipe
        if p.pipe_id not in self.made:
            r, w = os.pipe2(os.O_CLOEXEC)
            self._fill(w, p.pipe_id)
            self.made[p.pipe_id] = (r, w)
        base = self.made[p.pipe_id][0 if p.read_end else 1]
        key = (p.pipe_id, p.read_end)
        if key in self.used:
            # Another open file description of the same end.
            fd = os.open(f"/proc/self/fd/{base}",
                         (os.O_RDONLY if p.read_end else os.O_WRONLY) | os.O_CLOEXEC)
        else:
            fd = os.dup(base)
            self.used.add(key)
        fcntl.fcntl(fd, fcntl.F_SETFL, p.flags & ~os.O_ASYNC)  # O_ASYNC: files.install_fds
        return fd

    def _fill(self, w: int, pipe_id: int) -> None:
        """The pipe's size and the data it had in flight, through ``w``."""
        d = self.data.get(pipe_id)
        if d is None:
            return
        if d.size:
            fcntl.fcntl(w, F_SETPIPE_SZ, d.size)
        view = memoryview(d.data)
        while view:
            view = view[os.write(w, view):]

    def _fifo_end(self, f) -> int:
        """A FIFO end: the FIFO held open read-write first (so no open
        blocks), filled, then each end opened through it with its mode."""
        p = f.pipe
        if p.pipe_id not in self.made:
            path = f.reg.path
            if not os.path.exists(path):
                os.mkfifo(path, f.reg.mode & 0o7777)
            h = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self.made[p.pipe_id] = (h, os.dup(h))
            self._fill(h, p.pipe_id)
        fd = os.open(f"/proc/self/fd/{self.made[p.pipe_id][0]}",
                     (f.reg.flags & O_ACCMODE) | os.O_CLOEXEC)
        fcntl.fcntl(fd, fcntl.F_SETFL, p.flags & ~os.O_ASYNC)  # O_ASYNC: files.install_fds
        return fd

    def close(self) -> None:
        for r, w in self.made.values():
            os.close(r)
            os.close(w)
