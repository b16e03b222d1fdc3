"""fanotify groups: their init flags and every mark (inode, mount, filesystem).

Dump: /proc/PID/fdinfo/FD (fs/notify/fdinfo.c): the group's flags and event
flags, then each mark: an inode mark with the kernel's file handle (opened
with open_by_handle_at to learn its path, as for inotify), a mount mark
with its mount id, a filesystem mark with its device; each with its mark
flags, mask and ignored mask.  Events waiting in the queue and permission
events being answered are not kept.
Restore (in the tool): fanotify_init with the same flags, then
fanotify_mark for each mark on its path (a mount point of the mount or of
the filesystem for those marks).
"""

from __future__ import annotations

import os
import re

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import syscalls
from migrate.resources import inotify

LINK = "anon_inode:[fanotify]"
FAN_MARK_ADD, FAN_MARK_MOUNT, FAN_MARK_IGNORED_MASK = 0x1, 0x10, 0x20
FAN_MARK_IGNORED_SURV_MODIFY, FAN_MARK_FILESYSTEM = 0x40, 0x100
FAN_MARK_EVICTABLE, FAN_MARK_IGNORE = 0x200, 0x400
FAN_CLOEXEC, FAN_NONBLOCK = 0x1, 0x2
_HEAD = re.compile(r"fanotify flags:([0-9a-f]+) event-flags:([0-9a-f]+)")
_INODE = re.compile(r"fanotify ino:([0-9a-f]+) sdev:([0-9a-f]+) mflags:([0-9a-f]+) "
                    r"mask:([0-9a-f]+) ignored_mask:([0-9a-f]+) fhandle-bytes:([0-9a-f]+) "
                    r"fhandle-type:([0-9a-f]+) f_handle:([0-9a-f]+)")
_MOUNT = re.compile(r"fanotify mnt_id:([0-9a-f]+) mflags:([0-9a-f]+) mask:([0-9a-f]+) "
                    r"ignored_mask:([0-9a-f]+)")
_SB = re.compile(r"fanotify sdev:([0-9a-f]+) mflags:([0-9a-f]+) mask:([0-9a-f]+) "
                 r"ignored_mask:([0-9a-f]+)")


def _mount_point(mnt_id: int) -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if int(fields[0]) == mnt_id:
                return fields[4].replace("\\040", " ")
    raise FileNotFoundError(f"no mount with id {mnt_id}")


def dump(pid: int, fd: int, fid: int, flags: int, raw: str):
    head = _HEAD.search(raw)
    if head is None:
        raise errors.UnsupportedResource(pid, "fanotify", "fdinfo shows no group flags",
                                         fd=fd)
    e = files_pb2.fanotify_entry(flags=int(head.group(1), 16),
                                 event_flags=int(head.group(2), 16),
                                 fd_flags=flags & os.O_NONBLOCK)
    for line in raw.splitlines():
        if m := _INODE.match(line):
            _, sdev, mfl, mask, ign, nbytes, htype, handle = m.groups()
            path = inotify._path_of(pid, fd, int(sdev, 16), int(htype, 16),
                                    bytes.fromhex(handle)[:int(nbytes, 16)])
            e.marks.add(type=0, mflags=int(mfl, 16), mask=int(mask, 16),
                        ignored_mask=int(ign, 16), path=path)
        elif m := _MOUNT.match(line):
            mnt, mfl, mask, ign = m.groups()
            try:
                path = _mount_point(int(mnt, 16))
            except (OSError, ValueError) as err:
                raise errors.UnsupportedResource(pid, "fanotify", f"a mount mark: {err}",
                                                 fd=fd) from None
            e.marks.add(type=FAN_MARK_MOUNT, mflags=int(mfl, 16), mask=int(mask, 16),
                        ignored_mask=int(ign, 16), path=path)
        elif m := _SB.match(line):
            sdev, mfl, mask, ign = m.groups()
            try:
                path = inotify._mount_of(int(sdev, 16))
            except OSError as err:
                raise errors.UnsupportedResource(pid, "fanotify", f"a filesystem mark: "
                                                 f"{err}", fd=fd) from None
            e.marks.add(type=FAN_MARK_FILESYSTEM, mflags=int(mfl, 16), mask=int(mask, 16),
                        ignored_mask=int(ign, 16), path=path)
        elif line.startswith("fanotify") and not _HEAD.match(line):
            raise errors.UnsupportedResource(pid, "fanotify", f"a mark fdinfo shows as "
                                             f"{line!r}", fd=fd)
    return files_pb2.file_entry(id=fid, type=files_pb2.FANOTIFY, fanotify=e)


def open_object(f) -> int:
    """The group with every mark (runs in the tool)."""
    e = f.fanotify
    fd = syscalls.fanotify_init(e.flags | FAN_CLOEXEC |
                                (FAN_NONBLOCK if e.fd_flags & os.O_NONBLOCK else 0),
                                e.event_flags)
    try:
        for m in e.marks:
            keep = m.mflags & (FAN_MARK_EVICTABLE | FAN_MARK_IGNORED_SURV_MODIFY)
            if m.mask:
                syscalls.fanotify_mark(fd, FAN_MARK_ADD | m.type | (keep & FAN_MARK_EVICTABLE),
                                       m.mask, m.path)
            if m.ignored_mask:
                how = FAN_MARK_IGNORE if m.mflags & FAN_MARK_IGNORE else FAN_MARK_IGNORED_MASK
                syscalls.fanotify_mark(fd, FAN_MARK_ADD | m.type | how | keep, m.ignored_mask,
                                       m.path)
        return fd
    except BaseException:
        os.close(fd)
        raise
