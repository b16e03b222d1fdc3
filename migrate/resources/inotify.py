"""inotify instances: every watch at its watch descriptor, by path and mask.

Dump: /proc/PID/fdinfo/FD lists each watch (fs/notify/fdinfo.c): wd,
inode, device, mask, ignored mask and the kernel's file handle of the
watched inode; the handle is opened with open_by_handle_at(2) on the
filesystem's mount to learn the path (a watched inode that is gone is
refused).  Events waiting in the queue are not kept (as CRIU).
Restore (in the tool): inotify_init1, then each watch added by path; the
kernel hands out watch descriptors in increasing order, so a gap in the
dumped wds is filled with a watch added and removed again (its IN_IGNORED
event is read off before the instance is handed over).
"""

from __future__ import annotations

import logging
import os
import re
import struct

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import syscalls

log = logging.getLogger(__name__)

LINK = "anon_inode:inotify"
IN_CLOEXEC, IN_NONBLOCK = 0o2000000, os.O_NONBLOCK
IN_IGNORED, IN_MASK_CREATE = 0x8000, 0x10000000
_WD = re.compile(r"inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+) "
                 r"ignored_mask:([0-9a-f]+) fhandle-bytes:([0-9a-f]+) fhandle-type:([0-9a-f]+) "
                 r"f_handle:([0-9a-f]+)")
EVENT = struct.Struct("iIII")          # struct inotify_event: wd, mask, cookie, len


def _mount_of(sdev: int) -> str:
    """A mount point of the filesystem with the kernel dev_t ``sdev``."""
    major, minor = sdev >> 20, sdev & 0xFFFFF
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[2] == f"{major}:{minor}":
                return fields[4].replace("\\040", " ")
    raise FileNotFoundError(f"no mount of device {major}:{minor}")


def _path_of(pid: int, fd: int, sdev: int, htype: int, handle: bytes) -> str:
    try:
        mnt = os.open(_mount_of(sdev), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise errors.UnsupportedResource(pid, "inotify", f"a watch on device {sdev:#x}: "
                                         f"{e}", fd=fd) from None
    try:
        try:
            got = syscalls.open_by_handle_at(mnt, htype, handle, os.O_PATH | os.O_CLOEXEC)
        except errors.KernelError as e:
            raise errors.UnsupportedResource(pid, "inotify", "a watched file is gone "
                                             f"({os.strerror(e.errno)})", fd=fd) from None
        try:
            return os.readlink(f"/proc/self/fd/{got}")
        finally:
            os.close(got)
    finally:
        os.close(mnt)


def dump(pid: int, fd: int, fid: int, flags: int, raw: str):
    e = files_pb2.inotify_entry(flags=flags & os.O_NONBLOCK)
    for m in _WD.finditer(raw):
        wd, ino, sdev, mask, ign, nbytes, htype, handle = m.groups()
        path = _path_of(pid, fd, int(sdev, 16), int(htype, 16),
                        bytes.fromhex(handle)[:int(nbytes, 16)])
        if path.endswith(" (deleted)"):
            raise errors.UnsupportedResource(pid, "inotify", f"a watch on the removed "
                                             f"{path}", fd=fd)
        e.wds.add(wd=int(wd, 16), mask=int(mask, 16), ignored_mask=int(ign, 16), path=path,
                  ino=int(ino, 16), sdev=int(sdev, 16))
    return files_pb2.file_entry(id=fid, type=files_pb2.INOTIFY, inotify=e)


def open_object(f) -> int:
    """The instance with every watch at its wd (runs in the tool)."""
    e = f.inotify
    fd = syscalls.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
    try:
        fillers = []
        for w in sorted(e.wds, key=lambda w: w.wd):
            while True:
                got = syscalls.inotify_add_watch(fd, w.path, w.mask & ~IN_MASK_CREATE)
                if got == w.wd:
                    break
                if got > w.wd or got in [x.wd for x in e.wds]:
                    raise errors.RestoreError(
                        f"inotify watch on {w.path}: got wd {got}, the image has {w.wd} "
                        "(the same file watched twice?)")
                # a gap: this wd was removed before the dump; use it up
                syscalls.inotify_rm_watch(fd, got)
                fillers.append(got)
        if fillers:
            _drain_ignored(fd, set(fillers))
        if not e.flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _drain_ignored(fd: int, wds: set[int]) -> None:
    try:
        data = os.read(fd, 1 << 16)
    except BlockingIOError:
        return
    off = 0
    while off + EVENT.size <= len(data):
        wd, mask, _, n = EVENT.unpack_from(data, off)
        if not (wd in wds and mask & IN_IGNORED):
            log.warning("inotify: an event (wd %d, mask %#x) came during the restore and "
                        "is dropped", wd, mask)
        off += EVENT.size + n
