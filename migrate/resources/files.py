"""File descriptors: regular files, directories, character devices, the tty,
pipes (resources/pipes.py), eventfd/signalfd/timerfd/epoll (resources/eventobjs.py).

Dump reads /proc/PID/fd and fdinfo; fds that share one open file description
(dup) get one file id (kcmp(KCMP_FILE)).  Restore runs inside the new task
before it is taken over: it opens every file once with its flags, seeks it,
dups it to each of its fd numbers and sets FD_CLOEXEC per fd.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import proc
from migrate.kernel.kcmp import same_file
from migrate.resources import eventobjs, pipes, unix

log = logging.getLogger(__name__)

O_ACCMODE = 0o3
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC = 0o100, 0o200, 0o400, 0o1000
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
O_LARGEFILE = 0o100000
TTY_MAJORS = {4, 5, 136, 137, 138, 139, 140, 141, 142, 143}


def _kind_of_link(link: str) -> str:
    if link.startswith("pipe:"):
        return "pipe"
    if link.startswith("socket:"):
        return "socket"
    if link.startswith("anon_inode:"):
        return link
    return "file"


def dump_fds(pid: int, shell_job: bool) -> tuple[list, list, list]:
    """(file_entry list, fdinfo_entry list, pipe_data_entry list) of ``pid``;
    UnsupportedResource if an fd is of a kind this version does not handle."""
    files: list = []
    fdinfos: list = []
    seen: list[tuple[int, int]] = []   # (fd, file id) of earlier fds, for kcmp
    fd_of: dict[int, int] = {}
    socks = unix.Dumper(pid)
    for fd in proc.list_fds(pid):
        link = proc.readlink(pid, f"fd/{fd}")
        kind = _kind_of_link(link)
        if kind not in ("file", "pipe", "socket") and kind not in eventobjs.KINDS:
            raise errors.UnsupportedResource(pid, kind, f"{link} is not supported yet", fd=fd)
        raw = proc.read_text(pid, f"fdinfo/{fd}")
        info = proc.parse_fdinfo(raw)
        flags = int(info["flags"], 8)
        cloexec = bool(flags & O_CLOEXEC)
        # Same open file description as an earlier fd (dup)? Then share its id.
        shared = next((fid for ofd, fid in seen if same_file(pid, ofd, fd)), None)
        if shared is not None:
            fdinfos.append(files_pb2.fdinfo_entry(fd=fd, id=shared, cloexec=cloexec))
            seen.append((fd, shared))
            continue
        fid = len(files) + 1
        fd_of[fid] = fd
        if kind == "pipe":
            files.append(pipes.dump_end(fid, link, flags))
        elif kind in eventobjs.KINDS:
            files.append(eventobjs.dump(pid, fd, fid, kind, flags, info, raw))
        elif kind == "socket":
            files.append(socks.dump(fd, fid, link, flags))
        else:
            files.append(_dump_file(pid, fd, fid, link, flags, int(info.get("pos", "0")),
                                    shell_job))
        fdinfos.append(files_pb2.fdinfo_entry(fd=fd, id=fid, cloexec=cloexec))
        seen.append((fd, fid))
    unix.check_pairs(pid, files, fd_of)
    return files, fdinfos, pipes.dump_data(pid, files, fd_of)


def _dump_file(pid: int, fd: int, fid: int, link: str, flags: int, pos: int,
               shell_job: bool):
    oflags = flags & ~(O_CLOEXEC | O_CREAT | O_EXCL | O_TRUNC | O_NOCTTY | O_LARGEFILE)
    if link.endswith(" (deleted)"):
        raise errors.UnsupportedResource(pid, "file", f"unlinked file {link} is not "
                                                      "supported yet", fd=fd)
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError as e:
        raise errors.from_errno("stat", e.errno, pid, f"fd {fd}") from e
    if stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISDIR(st.st_mode):
        reg = files_pb2.reg_file_entry(path=link, flags=oflags, pos=pos, size=st.st_size,
                                       mode=st.st_mode, ino=st.st_ino, dev=st.st_dev,
                                       mtime_ns=st.st_mtime_ns)
        typ = files_pb2.REG if stat_mod.S_ISREG(st.st_mode) else files_pb2.DIR
        return files_pb2.file_entry(id=fid, type=typ, reg=reg)
    if stat_mod.S_ISCHR(st.st_mode):
        chr_ = files_pb2.chr_file_entry(path=link, flags=oflags, rdev=st.st_rdev)
        if os.major(st.st_rdev) in TTY_MAJORS:
            if not shell_job:
                raise errors.UnsupportedResource(
                    pid, "tty", f"{link} is a terminal: dump with --shell-job", fd=fd)
            return files_pb2.file_entry(id=fid, type=files_pb2.TTY, chr=chr_)
        return files_pb2.file_entry(id=fid, type=files_pb2.CHR, chr=chr_)
    raise errors.UnsupportedResource(pid, "file", f"{link} (mode {st.st_mode:o}) is not "
                                                  "supported yet", fd=fd)


# --------------------------------------------------------------------------
# restore


def check_files(files) -> None:
    """Before any process is created: every file must be there."""
    for f in files:
        if f.type in (files_pb2.REG, files_pb2.DIR):
            try:
                st = os.stat(f.reg.path)
            except OSError as e:
                raise errors.RestoreError(f"file {f.reg.path} (file id {f.id}): "
                                          f"{os.strerror(e.errno)}") from None
            if f.type == files_pb2.REG and st.st_size < f.reg.pos and \
                    not f.reg.flags & O_PATH:
                log.warning("file %s is now %d bytes, its offset was %d", f.reg.path,
                            st.st_size, f.reg.pos)
            elif f.type == files_pb2.REG and st.st_size != f.reg.size:
                log.info("file %s changed size since the dump (%d -> %d)", f.reg.path,
                         f.reg.size, st.st_size)
        elif f.type == files_pb2.CHR:
            if not os.path.exists(f.chr.path):
                raise errors.RestoreError(f"device {f.chr.path} (file id {f.id}) is missing")


def open_file(f, tty_path: str | None) -> int:
    """Open one file description as it was (runs in the new task)."""
    if f.type in (files_pb2.REG, files_pb2.DIR):
        fd = os.open(f.reg.path, f.reg.flags | O_CLOEXEC)
        if f.reg.pos and not f.reg.flags & O_PATH:
            os.lseek(fd, f.reg.pos, os.SEEK_SET)
        return fd
    if f.type == files_pb2.TTY:
        path = tty_path or f.chr.path
        return os.open(path, (f.chr.flags | O_CLOEXEC | O_NOCTTY) & ~O_PATH)
    return os.open(f.chr.path, f.chr.flags | O_CLOEXEC)


def install_fds(files, fdinfos, keep: set[int], tty_path: str | None,
                pipe_data: list = ()) -> None:
    """Make the calling process's fd table the dumped one (runs in the new task).

    ``keep`` are control fds of the restore that must survive, all above
    every dumped fd number.  Every other fd the process had is closed.
    """
    import fcntl
    by_id = {f.id: f for f in files}
    wanted = {fi.fd for fi in fdinfos}
    base = max(wanted | keep | {2}) + 1
    opened: dict[int, int] = {}
    made = pipes.Pipes(pipe_data)
    pairs = unix.Pairs(files)
    for fi in fdinfos:
        if fi.id not in opened:
            f = by_id[fi.id]
            if f.type == files_pb2.PIPE:
                fd = made.open_end(f)
            elif f.type == files_pb2.UNIX_SOCKET:
                fd = pairs.open_end(f)
            elif f.type in eventobjs.KINDS.values():
                fd = eventobjs.open_object(f)
            else:
                fd = open_file(f, tty_path)
            opened[fi.id] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
            os.close(fd)
    made.close()
    pairs.close()
    temps = set(opened.values())
    for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
        if fd not in keep and fd not in temps:
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
    for fi in fdinfos:
        os.dup2(opened[fi.id], fi.fd, inheritable=not fi.cloexec)
    for tmp in temps:
        os.close(tmp)
    eventobjs.add_watches(files, fdinfos)
