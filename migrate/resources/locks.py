"""File locks: flock(2), OFD and POSIX record locks (fcntl(2)).

Dump: the `lock:` lines of /proc/PID/fdinfo/FD (fs/locks.c
lock_get_status): FLOCK and OFDLCK locks belong to the open file
description and are kept with it; POSIX locks belong to the process and
are kept with its first fd of that file.  Leases and delegations are
refused.  A process waiting for a lock (`->` lines) waits again after the
restore (its fcntl/flock restarts).
Restore: description locks are taken by the tool on the description it
opened (files.open_all); POSIX locks by the new process itself, once its
fds are in place (files.install_fds).  A lock someone else took meanwhile
fails the restore, saying which.
"""

from __future__ import annotations

import fcntl
import os
import struct

from migrate import errors
from migrate.images._pb import files_pb2

KINDS = ("FLOCK", "OFDLCK", "POSIX")
F_OFD_SETLK = 37
F_RDLCK, F_WRLCK = 0, 1
FLOCK = struct.Struct("hhqqi4x")     # struct flock: type, whence, start, len, pid


def parse(pid: int, fd: int, raw: str) -> list:
    """file_lock_entry list of the `lock:` lines of one fdinfo."""
    out = []
    for line in raw.splitlines():
        if not line.startswith("lock:"):
            continue
        f = line.split()
        # lock:  1: POSIX  ADVISORY  WRITE 1234 fe:00:2187404 5 14
        if len(f) < 9 or f[2] == "->":
            continue
        kind = f[2]
        if kind not in KINDS:
            raise errors.UnsupportedResource(pid, "file lock", f"a {kind} lock is not "
                                             "supported", fd=fd)
        if f[3] != "ADVISORY":
            raise errors.UnsupportedResource(pid, "file lock", f"a {f[3]} lock is not "
                                             "supported", fd=fd)
        eof = f[8] == "EOF"
        out.append(files_pb2.file_lock_entry(kind=kind, write=f[4] == "WRITE",
                                             start=int(f[7]), end=0 if eof else int(f[8]),
                                             to_eof=eof))
    return out


def _length(lk) -> int:
    return 0 if lk.to_eof else lk.end - lk.start + 1


def _held(lk, path: str, e: OSError) -> errors.RestoreError:
    return errors.RestoreError(f"cannot take the {lk.kind} {'write' if lk.write else 'read'} "
                               f"lock on {path} (bytes {lk.start}.."
                               f"{'EOF' if lk.to_eof else lk.end}): {os.strerror(e.errno)}"
                               " (held by another process?)")


def take_description_locks(fd: int, locks, path: str) -> None:
    """FLOCK and OFD locks, on the description (runs in the tool)."""
    for lk in locks:
        try:
            if lk.kind == "FLOCK":
                fcntl.flock(fd, (fcntl.LOCK_EX if lk.write else fcntl.LOCK_SH) |
                            fcntl.LOCK_NB)
            else:
                fcntl.fcntl(fd, F_OFD_SETLK, FLOCK.pack(F_WRLCK if lk.write else F_RDLCK,
                                                         os.SEEK_SET, lk.start, _length(lk), 0))
        except OSError as e:
            raise _held(lk, path, e) from None


def take_posix_locks(fd: int, locks) -> None:
    """The process's POSIX locks (runs in the new process)."""
    for lk in locks:
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if lk.write else fcntl.LOCK_SH) | fcntl.LOCK_NB,
                        _length(lk), lk.start, os.SEEK_SET)
        except OSError as e:
            raise _held(lk, f"fd {fd}", e) from None
