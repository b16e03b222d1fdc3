"""File descriptors: regular files, directories, character devices, the tty,
pipes (resources/pipes.py), eventfd/signalfd/timerfd/epoll (resources/eventobjs.py).

Dump reads /proc/PID/fd and fdinfo; fds that share one open file description
(dup, fork: in one process or several) get one file id (kcmp(KCMP_FILE)).
Restore: the tool opens every file description of the tree once (open_all),
before forking; each new process inherits them all and, before it is taken
over, dups the ones it uses to their fd numbers with their FD_CLOEXEC and
closes the rest (install_fds).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat as stat_mod

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import proc, sockdiag, syscalls
from migrate.kernel.kcmp import compare_files
from migrate.resources import eventobjs, fanotify, inet, inotify, locks, pipes, unix

log = logging.getLogger(__name__)

O_ACCMODE = 0o3
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC = 0o100, 0o200, 0o400, 0o1000
O_CLOEXEC = 0o2000000
O_PATH = 0o10000000
O_LARGEFILE = 0o100000
O_ASYNC = 0o20000
F_SETSIG, F_GETSIG, F_SETOWN_EX, F_GETOWN_EX = 10, 11, 15, 16
TTY_MAJORS = {4, 5, 136, 137, 138, 139, 140, 141, 142, 143}


def _kind_of_link(link: str) -> str:
    if link.startswith("pipe:"):
        return "pipe"
    if link.startswith("socket:"):
        return "socket"
    if link.startswith("anon_inode:"):
        return link
    return "file"


class FileTable:
    """The open file descriptions of a whole dumped tree.

    One file id per description, shared by every fd of every process that
    refers to it (dup, fork, SCM_RIGHTS): fds of the same inode are compared
    with kcmp(KCMP_FILE), which works across processes.
    """

    def __init__(self, shell_job: bool, inet_opts: dict | None = None) -> None:
        self.shell_job = shell_job
        # IPv4/IPv6 sockets; inet_opts: tcp_established, tcp_close, skip_in_flight,
        # sink (the image sink that gets tcp-queues.img)
        self.inet = inet.Dumper(**(inet_opts or {}))
        self.files: list = []
        self.fd_of: dict[int, tuple[int, int]] = {}     # file id -> (pid, fd)
        self._by_inode: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        self._socks: dict | None = None
        self._posix_done: set = set()     # (pid, inode): its POSIX locks are kept
        self._next_id = 0
        self._held: list[int] = []        # our copies of files in flight

    def _search(self, key, pid: int, fd: int) -> tuple[int | None, int]:
        """(file id of the same description, or None; where it would go).
        Each inode's descriptions are kept in kcmp order (anonymous inodes,
        one for every eventfd, epoll... of the tree, can be many)."""
        row = self._by_inode.get(key, [])
        lo, hi = 0, len(row)
        while lo < hi:
            mid = (lo + hi) // 2
            opid, ofd, fid = row[mid]
            c = compare_files(pid, fd, opid, ofd)
            if c == 0:
                return fid, mid
            if c < 0:
                hi = mid
            else:
                lo = mid + 1
        return None, lo

    def _same(self, key, pid: int, fd: int) -> int | None:
        return self._search(key, pid, fd)[0]

    def _insert(self, key, pid: int, fd: int, fid: int) -> None:
        _, at = self._search(key, pid, fd)
        self._by_inode.setdefault(key, []).insert(at, (pid, fd, fid))

    def dump_fds(self, pid: int) -> list:
        """fdinfo_entry list of ``pid``, adding its files to the table;
        UnsupportedResource if an fd is of a kind this version does not handle."""
        socks = unix.Dumper(pid, self)
        out = []
        for fd in proc.list_fds(pid):
            fid, cloexec, posix = self._dump_one(pid, fd, socks)
            out.append(files_pb2.fdinfo_entry(fd=fd, id=fid, cloexec=cloexec,
                                              posix_locks=posix))
        return out

    def dump_in_flight(self, fd: int) -> int:
        """The file id of ``fd``, our copy of a file in flight in a unix
        socket queue (SCM_RIGHTS); kept open until finish()."""
        self._held.append(fd)
        me = os.getpid()
        return self._dump_one(me, fd, unix.Dumper(me, self))[0]

    def _dump_one(self, pid: int, fd: int, socks) -> tuple[int, bool, list]:
        link = proc.readlink(pid, f"fd/{fd}")
        kind = _kind_of_link(link)
        if kind not in ("file", "pipe", "socket", inotify.LINK, fanotify.LINK) and \
                kind not in eventobjs.KINDS:
            raise errors.UnsupportedResource(pid, kind, f"{link} is not supported yet", fd=fd)
        raw = proc.read_text(pid, f"fdinfo/{fd}")
        info = proc.parse_fdinfo(raw)
        flags = int(info["flags"], 8)
        cloexec = bool(flags & O_CLOEXEC)
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError as e:
            raise errors.from_errno("stat", e.errno, pid, f"fd {fd}") from e
        key = (st.st_dev, st.st_ino)
        held = locks.parse(pid, fd, raw) if "lock:" in raw else []
        posix = [lk for lk in held if lk.kind == "POSIX" and (pid, key) not in
                 self._posix_done]
        if posix:
            self._posix_done.add((pid, key))
        # The same open file description as an earlier fd?  Then its id.
        shared = self._same(key, pid, fd)
        if shared is not None:
            return shared, cloexec, posix
        self._next_id += 1
        fid = self._next_id
        # Known before its own dump: a socket may carry itself in flight.
        self._insert(key, pid, fd, fid)
        self.fd_of[fid] = (pid, fd)
        if kind == "pipe":
            f = pipes.dump_end(fid, link, flags)
        elif kind in eventobjs.KINDS:
            f = eventobjs.dump(pid, fd, fid, kind, flags, info, raw)
        elif kind == inotify.LINK:
            f = inotify.dump(pid, fd, fid, flags, raw)
        elif kind == fanotify.LINK:
            f = fanotify.dump(pid, fd, fid, flags, raw)
        elif kind == "socket" and not self._is_unix(pid, fd, link):
            f = self.inet.dump(pid, fd, fid, link, flags)
        elif kind == "socket":
            f = socks.dump(fd, fid, link, flags)
        else:
            f = _dump_file(pid, fd, fid, link, flags, int(info.get("pos", "0")),
                           self.shell_job, st)
        desc_locks = [lk for lk in held if lk.kind != "POSIX"]
        if desc_locks:
            if f.type != files_pb2.REG:
                raise errors.UnsupportedResource(pid, "file lock", f"a lock on {link}", fd=fd)
            f.reg.locks.extend(desc_locks)
        if flags & O_ASYNC:
            f.fown.CopyFrom(_dump_fown(pid, fd))
        self.files.append(f)        # after the files it carries in flight, if a socket
        return fid, cloexec, posix

    def _is_unix(self, pid: int, fd: int, link: str) -> bool:
        """Is this socket a unix one?  From its protocol name (sockfs's
        system.sockprotoname xattr: one syscall) rather than a sock_diag
        dump of every unix socket of the namespace, made only once a unix
        socket is to be dumped (~0.1 ms, in the frozen time)."""
        try:
            name = os.getxattr(f"/proc/{pid}/fd/{fd}", "system.sockprotoname")
        except OSError:
            return unix.sock_ino(link) in self.unix_diag()
        return name.startswith(b"UNIX")

    def unix_diag(self) -> dict:
        if self._socks is None:
            self._socks = sockdiag.unix_sockets()
        return self._socks

    def finish(self) -> list:
        """After every process: checks that need the whole tree; returns the
        pipe_data_entry list (data in flight of every pipe)."""
        try:
            unix.check_pairs(self.files, self.fd_of)
            return pipes.dump_data(self.files, self.fd_of)
        finally:
            self.close()

    def close(self) -> None:
        self.inet.close_pidfd()
        for fd in self._held:
            os.close(fd)
        self._held = []

    def abort(self) -> None:
        """The dump failed: our copies closed, TCP connections out of repair
        mode (the programs go on as before)."""
        try:
            self.close()
        finally:
            self.inet.rollback()


def dump_fds(pid: int, shell_job: bool) -> tuple[list, list, list]:
    """(file_entry list, fdinfo_entry list, pipe_data_entry list) of one process."""
    table = FileTable(shell_job)
    fdinfos = table.dump_fds(pid)
    return table.files, fdinfos, table.finish()


MAX_CONTENT = 32 << 20       # unlinked files and memfds keep their content in files.img
F_GET_SEALS = 1034


def _content(pid: int, fd: int, link: str, size: int) -> bytes:
    """The whole content of an unlinked file or memfd, read through our own
    copy of the fd (pidfd_getfd): nothing moves its offset."""
    if size > MAX_CONTENT:
        raise errors.UnsupportedResource(pid, "file", f"{link} holds {size} bytes: "
                                         f"unlinked files and memfds over "
                                         f"{MAX_CONTENT >> 20} MiB are not supported", fd=fd)
    mine = syscalls.take_fd(pid, fd)
    try:
        if os.fstat(mine).st_size != size:
            raise errors.DumpError(f"pid {pid} fd {fd}: {link} changed size while dumped")
        out = bytearray(size)
        view, off = memoryview(out), 0
        while off < size:
            n = os.preadv(mine, [view[off:]], off)
            if n <= 0:
                break
            off += n
        return bytes(out)
    finally:
        os.close(mine)


def _seals(pid: int, fd: int) -> int:
    mine = syscalls.take_fd(pid, fd)
    try:
        return fcntl.fcntl(mine, F_GET_SEALS)
    finally:
        os.close(mine)


def _dump_fown(pid: int, fd: int):
    """Owner and signal of a description with O_ASYNC (not in fdinfo: asked
    with fcntl on our copy of the fd)."""
    import struct
    mine = syscalls.take_fd(pid, fd)
    try:
        typ, owner = struct.unpack("ii", fcntl.fcntl(mine, F_GETOWN_EX, b"\0" * 8))
        return files_pb2.fown_entry(type=typ, pid=owner, signum=fcntl.fcntl(mine, F_GETSIG))
    finally:
        os.close(mine)


def restore_fown(files, fd_in: dict[int, tuple[int, int]]) -> None:
    """Owners and signals of O_ASYNC descriptions, once every process
    exists (an owner is usually one of them).  ``fd_in``: file id ->
    (pid, fd) of a restored process holding it."""
    import struct
    for f in files:
        if not f.HasField("fown") or f.id not in fd_in:
            continue
        pid, fd = fd_in[f.id]
        mine = syscalls.take_fd(pid, fd)
        try:
            if f.fown.pid:
                fcntl.fcntl(mine, F_SETOWN_EX, struct.pack("ii", f.fown.type, f.fown.pid))
            fcntl.fcntl(mine, F_SETSIG, f.fown.signum)
        except OSError as e:
            raise errors.RestoreError(f"pid {pid} fd {fd}: cannot set its owner "
                                      f"{f.fown.pid}: {os.strerror(e.errno)}") from None
        finally:
            os.close(mine)


def _dump_file(pid: int, fd: int, fid: int, link: str, flags: int, pos: int,
               shell_job: bool, st: os.stat_result):
    oflags = flags & ~(O_CLOEXEC | O_CREAT | O_EXCL | O_TRUNC | O_NOCTTY | O_LARGEFILE)
    deleted = link.endswith(" (deleted)")
    path = link[:-len(" (deleted)")] if deleted else link
    if stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISDIR(st.st_mode):
        reg = files_pb2.reg_file_entry(path=path, flags=oflags, pos=pos, size=st.st_size,
                                       mode=st.st_mode, ino=st.st_ino, dev=st.st_dev,
                                       mtime_ns=st.st_mtime_ns)
        typ = files_pb2.REG if stat_mod.S_ISREG(st.st_mode) else files_pb2.DIR
        if path.startswith("/memfd:") and typ == files_pb2.REG and st.st_nlink == 0:
            reg.memfd = True
            reg.content = _content(pid, fd, link, st.st_size)
            reg.seals = _seals(pid, fd)
        elif deleted:
            if typ != files_pb2.REG or st.st_nlink:
                raise errors.UnsupportedResource(
                    pid, "file", f"{link}: a removed directory, or a file still linked "
                                 "elsewhere, is not supported yet", fd=fd)
            if oflags & O_PATH:
                raise errors.UnsupportedResource(pid, "file", f"{link}: an O_PATH fd of an "
                                                 "unlinked file is not supported yet", fd=fd)
            reg.unlinked = True
            reg.content = _content(pid, fd, link, st.st_size)
        return files_pb2.file_entry(id=fid, type=typ, reg=reg)
    if deleted:
        raise errors.UnsupportedResource(pid, "file", f"unlinked {link} (mode "
                                                      f"{st.st_mode:o}) is not supported yet",
                                         fd=fd)
    if stat_mod.S_ISFIFO(st.st_mode):
        reg = files_pb2.reg_file_entry(path=link, flags=oflags, mode=st.st_mode,
                                       ino=st.st_ino, dev=st.st_dev)
        return files_pb2.file_entry(id=fid, type=files_pb2.FIFO, reg=reg, pipe=files_pb2.pipe_entry(
            pipe_id=st.st_ino, read_end=(flags & O_ACCMODE) != os.O_WRONLY,
            flags=oflags & pipes.SETFL_MASK))
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


def of_tree(f, pids: set[int]) -> bool:
    """A file under /proc/PID/ of a process of the tree: it exists only once
    that process does, so the process opens it itself (install_fds)."""
    if f.type not in (files_pb2.REG, files_pb2.DIR) or not f.reg.path.startswith("/proc/"):
        return False
    part = f.reg.path.split("/")[2]
    return part.isdigit() and int(part) in pids


def check_files(files, pids: set[int] = frozenset()) -> None:
    """Before any process is created: every file must be there."""
    for f in files:
        if f.type == files_pb2.REG and f.reg.memfd or of_tree(f, pids):
            continue
        if f.type == files_pb2.REG and f.reg.unlinked:
            where = os.path.dirname(f.reg.path)
            if not os.path.isdir(where):
                raise errors.RestoreError(f"unlinked file {f.reg.path} (file id {f.id}): "
                                          f"its directory {where} is missing")
            continue
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
        # O_ASYNC is armed by the process itself (install_fds): open() ignores it
        fd = os.open(f.reg.path, (f.reg.flags & ~O_ASYNC) | O_CLOEXEC)
        if f.reg.pos and not f.reg.flags & O_PATH:
            os.lseek(fd, f.reg.pos, os.SEEK_SET)
        return fd
    if f.type == files_pb2.TTY:
        path = tty_path or f.chr.path
        return os.open(path, (f.chr.flags | O_CLOEXEC | O_NOCTTY) & ~O_PATH)
    return os.open(f.chr.path, f.chr.flags | O_CLOEXEC)


class Ghosts:
    """Unlinked files (restore side, in the tool): each inode made once,
    next to where it was, with its content and mode, opened, then unlinked;
    every other description of it opened through the first."""

    def __init__(self) -> None:
        self.made: dict[tuple[int, int], int] = {}

    def open(self, f) -> int:
        r = f.reg
        key = (r.dev, r.ino)
        if key not in self.made:
            import tempfile
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(r.path)[:40] + ".",
                                       suffix=".migrate-unlinked",
                                       dir=os.path.dirname(r.path))
            try:
                view = memoryview(r.content)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, r.mode & 0o7777)
            finally:
                os.unlink(tmp)
            self.made[key] = fd
        fd = os.open(f"/proc/self/fd/{self.made[key]}", (r.flags & ~O_PATH) | O_CLOEXEC)
        if r.pos:
            os.lseek(fd, r.pos, os.SEEK_SET)
        return fd

    def close(self) -> None:
        for fd in self.made.values():
            os.close(fd)


def open_all(files, tty_path: str | None, pipe_data: list, base: int,
             shared=None, pids: set[int] = frozenset(),
             inets: inet.Opener | None = None) -> dict[int, int]:
    """Open every file description of the tree once, in the tool, at fd
    numbers from ``base`` up (above every fd number a restored process
    uses); returns file id -> fd.  The processes forked afterwards inherit
    them all, so a description shared by several processes is one
    description again (one offset, one pipe, one socket).  ``inets`` keeps
    the TCP connections made in repair mode until inets.finish(); without
    it they leave repair mode here."""
    own_inets = inets is None
    inets = inet.Opener() if own_inets else inets
    opened: dict[int, int] = {}
    made = pipes.Pipes(pipe_data)
    pairs = unix.Pairs(files, opened)
    ghosts = Ghosts()
    # Unix sockets last, each once the files in flight in its queue are open.
    socks = [f for f in files if f.type == files_pb2.UNIX_SOCKET]
    order = [f for f in files if f.type != files_pb2.UNIX_SOCKET and not of_tree(f, pids)]
    have = {f.id for f in order}
    while socks:
        ready = [f for f in socks if pairs.needs(f) <= have]
        if not ready:
            raise errors.RestoreError("unix sockets carry each other in flight in a cycle: "
                                      f"socket file ids {[f.id for f in socks]}")
        order += ready
        have |= {f.id for f in ready}
        socks = [f for f in socks if f.id not in have]
    try:
        for f in order:
            if f.type in (files_pb2.PIPE, files_pb2.FIFO):
                fd = made.open_end(f)
            elif f.type == files_pb2.REG and f.reg.memfd:
                fd = shared.open_memfd(f)
            elif f.type == files_pb2.REG and f.reg.unlinked:
                fd = ghosts.open(f)
            elif f.type == files_pb2.UNIX_SOCKET:
                fd = pairs.open_end(f)
            elif f.type in eventobjs.KINDS.values():
                fd = eventobjs.open_object(f)
            elif f.type == files_pb2.INOTIFY:
                fd = inotify.open_object(f)
            elif f.type == files_pb2.FANOTIFY:
                fd = fanotify.open_object(f)
            elif f.type == files_pb2.INET_SOCKET:
                fd = inets.open(f)
            else:
                fd = open_file(f, tty_path)
            try:
                opened[f.id] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)
            finally:
                os.close(fd)
            if f.type == files_pb2.REG and f.reg.locks:
                locks.take_description_locks(opened[f.id], f.reg.locks, f.reg.path)
        if own_inets:
            inets.finish()
    except BaseException:
        close_all(opened)
        inets.close()
        raise
    finally:
        made.close()
        pairs.close()
        ghosts.close()
    return opened


def close_all(opened: dict[int, int]) -> None:
    for fd in opened.values():
        try:
            os.close(fd)
        except OSError:
            pass


def install_fds(files, fdinfos, opened: dict[int, int], keep: set[int],
                epolls: set[int] = frozenset()) -> None:
    """Make the calling process's fd table the dumped one (runs in the new
    task, before it is taken over).

    ``opened`` are the tree's file descriptions (open_all), inherited;
    ``keep`` are control fds of the restore that must survive; both lie
    above every dumped fd number.  Every other fd is closed.  ``epolls``:
    the epoll file ids whose watches this process adds (each epoll once,
    in the process whose fd numbers its watches name).
    """
    keep_all = keep | set(opened.values())
    for fd in [int(x) for x in os.listdir("/proc/self/fd")]:
        if fd not in keep_all:
            try:
                os.close(fd)
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise
    by_id = {f.id: f for f in files}
    late: dict[int, int] = {}          # /proc/PID/ files of the tree, opened here
    for fi in fdinfos:
        if fi.id not in opened and fi.id not in late:
            fd = open_file(by_id[fi.id], None)
            late[fi.id] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(keep_all | {fi.fd}) + 1)
            os.close(fd)
    for fi in fdinfos:
        os.dup2(opened.get(fi.id, late.get(fi.id)), fi.fd, inheritable=not fi.cloexec)
    for fd in [*opened.values(), *late.values()]:
        os.close(fd)
    for fi in fdinfos:
        if fi.posix_locks:
            locks.take_posix_locks(fi.fd, fi.posix_locks)
    # O_ASYNC armed from here, so SIGIO names the fd number the process knows
    # (the kernel keeps the number F_SETFL was called with).
    armed: set[int] = set()
    for fi in fdinfos:
        if by_id[fi.id].HasField("fown") and fi.id not in armed:
            armed.add(fi.id)
            fcntl.fcntl(fi.fd, fcntl.F_SETFL, fcntl.fcntl(fi.fd, fcntl.F_GETFL) | O_ASYNC)
    eventobjs.add_watches(files, [fi for fi in fdinfos if fi.id in epolls])
