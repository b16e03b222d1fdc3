"""Unix sockets: connected pairs, listeners with their queues, bound and
unconnected sockets.

Dump: sock_diag gives each socket's state, name, peer, the bound file's
inode, a listener's backlog and the clients waiting in its queue, and the
shutdown state; each socket is taken with pidfd_getfd and its receive queue
is read without being consumed: MSG_PEEK walked message by message with
SO_PEEK_OFF (put back as it was).  Options: SO_PASSCRED and the buffer
sizes.  Files in flight (SCM_RIGHTS) are dumped from the copies the peek
gives us, and sent again with their message.  The other end of every
connection must be in the dump (a peer, the listener a client waits on, the
clients waiting on a listener), except for a datagram socket connected to
a bound one (/dev/log), which is connected to that name again; refused:
data sent on a connection not accepted yet.
Restore (in the tool, see files.open_all): Pairs below.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import socket

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import sockdiag, syscalls

log = logging.getLogger(__name__)

SO_PEEK_OFF = 42
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2
SHUTDOWN_MASK = 3            # both: what a stream end shows once its peer is closed
MAX_MSG = 1 << 20
SCM_MAX_FD = 253
TYPES = {socket.SOCK_STREAM: "stream", socket.SOCK_DGRAM: "dgram",
         socket.SOCK_SEQPACKET: "seqpacket"}


def sock_ino(link: str) -> int:
    return int(link[len("socket:["):-1])


class Dumper:
    """Socket fds of one process: pairs them, reads their queues."""

    def __init__(self, pid: int, table) -> None:
        self.pid = pid
        self.table = table           # files.FileTable: holds the sock_diag dump

    def diag(self) -> dict[int, sockdiag.UnixSock]:
        return self.table.unix_diag()

    def dump(self, fd: int, fid: int, link: str, flags: int):
        ino = sock_ino(link)
        u = self.diag().get(ino)
        if u is None:
            raise errors.UnsupportedResource(self.pid, "socket",
                                             f"{link} is not a unix socket (not supported yet)",
                                             fd=fd)
        if u.type not in TYPES:
            raise errors.UnsupportedResource(self.pid, "socket", f"unix socket type {u.type}",
                                             fd=fd)
        e = files_pb2.unix_sk_entry(ino=ino, peer=u.peer, type=u.type, state=u.state,
                                    flags=flags & os.O_NONBLOCK, shutdown=u.shutdown,
                                    name=u.name)
        if u.state == sockdiag.TCP_LISTEN:
            e.backlog, e.pending[:] = u.wqueue, [c for c in u.icons if c]
            if len(e.pending) != len(u.icons):
                raise errors.UnsupportedResource(self.pid, "socket", f"listener {u.name!r} "
                                                 "has a connection whose client is gone in "
                                                 "its queue", fd=fd)
        elif u.type == socket.SOCK_DGRAM:
            # connect(2) marks both datagram sockets ESTABLISHED: what counts
            # is the peer, which may be a bound socket outside the dump
            # (/dev/log): its name is kept to connect to it again.
            peer = self.diag().get(u.peer) if u.peer else None
            if peer is not None:
                e.peer_name = peer.name
        elif u.state == sockdiag.TCP_ESTABLISHED and not u.peer and u.wqueue:
            raise errors.UnsupportedResource(self.pid, "socket", "data sent on a connection "
                                             "not accepted yet", fd=fd)
        elif u.state not in (sockdiag.TCP_ESTABLISHED, sockdiag.TCP_CLOSE):
            raise errors.UnsupportedResource(self.pid, "socket", f"unix socket in state "
                                             f"{u.state}", fd=fd)
        if u.name and not u.name.startswith(b"\0"):
            self._bound_file(e, u, fd)
        mine = syscalls.take_fd(self.pid, fd)
        try:
            s = socket.socket(fileno=mine)
            try:
                e.passcred = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED))
                e.rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                e.sndbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                if u.state == sockdiag.TCP_ESTABLISHED or u.type == socket.SOCK_DGRAM:
                    self._peek_queue(s, fd, u, e)
            finally:
                s.detach()
        finally:
            os.close(mine)
        return files_pb2.file_entry(id=fid, type=files_pb2.UNIX_SOCKET, unix=e)

    def _bound_file(self, e, u, fd: int) -> None:
        """The file a path-bound socket made: still naming it (mode, owner) or
        unlinked (the restore binds then unlinks)."""
        path = os.fsdecode(u.name.rstrip(b"\0"))
        if not path.startswith("/"):
            raise errors.UnsupportedResource(self.pid, "socket", f"socket bound to the "
                                             f"relative path {path!r}", fd=fd)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            e.unlinked = True
            return
        if st.st_ino != u.vfs_ino:
            e.unlinked = True
            return
        e.file_mode, e.file_uid, e.file_gid = st.st_mode & 0o7777, st.st_uid, st.st_gid

    def _peek_queue(self, s: socket.socket, fd: int, u, e) -> None:
        """Fill e.queue (and e.scm for files in flight) from the receive
        queue, without consuming it."""
        old = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        msgs: list[tuple[bytes, list[int]]] = []
        try:
            while True:
                try:
                    data, anc, _, _ = s.recvmsg(MAX_MSG, socket.CMSG_SPACE(SCM_MAX_FD * 4),
                                                socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                fids: list[int] = []
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[:len(payload) - len(payload) % 4])
                        # Peeking gave us copies: the table keeps them open
                        # until the end of the dump, then closes them.
                        for i, f in enumerate(fds):
                            try:
                                fids.append(self.table.dump_in_flight(f))
                            except BaseException:
                                for rest in fds[i + 1:]:
                                    os.close(rest)
                                raise
                if not data and not fids:
                    if u.type == socket.SOCK_STREAM:
                        break                  # EOF: the peer shut down its writes
                    # the peek offset cannot step over an empty datagram
                    raise errors.UnsupportedResource(
                        self.pid, "socket", "an empty datagram in flight", fd=fd)
                msgs.append((data, fids))
        finally:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
        if u.type == socket.SOCK_STREAM:
            # One message for each run of bytes; a run ends with files in flight.
            joined: list[tuple[bytes, list[int]]] = []
            for data, fids in msgs:
                if joined and not joined[-1][1]:
                    joined[-1] = (joined[-1][0] + data, fids)
                else:
                    joined.append((data, fids))
            msgs = joined
        for i, (data, fids) in enumerate(msgs):
            e.queue.append(data)
            if fids:
                e.scm.add(index=i, fids=fids)


def check_pairs(entries: list, fd_of: dict[int, tuple[int, int]]) -> None:
    """The other end of every connection must be in the dump: the peer of
    a connected socket, the listener of a connection not accepted yet, the
    client of every connection in a listener's queue."""
    socks = {f.unix.ino: f for f in entries if f.type == files_pb2.UNIX_SOCKET}
    waiting = {c: f.unix.ino for f in socks.values() for c in f.unix.pending}
    for f in socks.values():
        u = f.unix
        pid, fd = fd_of[f.id]
        if u.state == sockdiag.TCP_LISTEN:
            for c in u.pending:
                if c not in socks:
                    raise errors.UnsupportedResource(
                        pid, "socket", f"a client outside the dump (socket:[{c}]) waits in "
                                       f"the queue of listener {u.name!r}", fd=fd)
        elif u.type == socket.SOCK_DGRAM:
            if u.peer and u.peer not in socks and not u.peer_name:
                raise errors.UnsupportedResource(
                    pid, "socket", f"datagram socket:[{u.ino}] is connected to an unnamed "
                                   "socket outside the dump", fd=fd)
        elif u.state == sockdiag.TCP_ESTABLISHED:
            if u.peer and u.peer not in socks:
                raise errors.UnsupportedResource(
                    pid, "socket", f"the peer of socket:[{u.ino}] belongs to a process "
                                   "outside the dump", fd=fd)
            if not u.peer and u.ino not in waiting and u.shutdown != SHUTDOWN_MASK:
                raise errors.UnsupportedResource(
                    pid, "socket", f"socket:[{u.ino}] waits to be accepted by a listener "
                                   "outside the dump", fd=fd)


class Pairs:
    """Restore side, in the tool: every unix socket, each made once.

    Connected ends come from socketpair(); an end whose peer was closed
    from a socketpair whose other end is closed at once; listeners and
    bound sockets are bound again (a stale socket file of the dead process
    is replaced; an unlinked one is bound, then unlinked), and the clients
    waiting in a listener's queue connect to it again.  Names of connected
    ends (getsockname of an accepted connection) are not kept.
    """

    def __init__(self, entries: list, opened: dict[int, int] | None = None) -> None:
        self.opened = opened if opened is not None else {}   # file id -> fd (files.open_all)
        self.by_ino = {f.unix.ino: f.unix for f in entries if f.type == files_pb2.UNIX_SOCKET}
        self.listener_of = {c: u.ino for u in self.by_ino.values() for c in u.pending}
        self.made: dict[int, socket.socket] = {}

    def needs(self, f) -> set[int]:
        """File ids that must be open before ``f`` can be made: the files in
        flight in its queue and in its peer's (both are filled at once)."""
        u = f.unix
        out = {fid for m in u.scm for fid in m.fids}
        peer = self.by_ino.get(u.peer)
        if peer is not None:
            out |= {fid for m in peer.scm for fid in m.fids}
        return out - {f.id}

    def open_end(self, f) -> int:
        u = f.unix
        if u.ino not in self.made:
            if u.type == socket.SOCK_DGRAM:
                self._dgram(u)
            elif u.state == sockdiag.TCP_LISTEN:
                self._listener(u)
            elif u.state == sockdiag.TCP_ESTABLISHED and u.peer:
                self._pair(u, self.by_ino[u.peer])
            elif u.state == sockdiag.TCP_ESTABLISHED and u.ino in self.listener_of:
                self._listener(self.by_ino[self.listener_of[u.ino]])
            elif u.state == sockdiag.TCP_ESTABLISHED:
                self._orphan(u)
            else:
                self._unconnected(u)
        fd = os.dup(self.made[u.ino].fileno())
        os.set_blocking(fd, not u.flags & os.O_NONBLOCK)
        return fd

    @staticmethod
    def _options(sock: socket.socket, e) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, int(e.passcred))
        if e.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(e.rcvbuf // 2, 1))
        if e.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(e.sndbuf // 2, 1))

    def _send_all(self, sock: socket.socket, e, to=None) -> None:
        """Send e's queue again from ``sock``, with the files in flight."""
        scm = {m.index: list(m.fids) for m in e.scm}
        for i, msg in enumerate(e.queue):
            anc = []
            if i in scm:
                missing = [fid for fid in scm[i] if fid not in self.opened]
                if missing:
                    raise errors.RestoreError(f"socket:[{e.ino}]: files {missing} in flight "
                                              "are not open yet (a cycle of sockets sent "
                                              "over each other?)")
                fds = array.array("i", [self.opened[fid] for fid in scm[i]])
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
            if to is not None:
                sock.sendmsg([msg], anc, 0, to)
            elif e.type == socket.SOCK_STREAM and not anc:
                sock.sendall(msg)
            else:
                sent = sock.sendmsg([msg], anc)
                if sent < len(msg):
                    sock.sendall(msg[sent:])

    def _pair(self, u, peer) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, u.type)
        self.made[u.ino], self.made[peer.ino] = a, b
        for end, e in ((a, u), (b, peer)):
            self._options(end, e)
        self._send_all(b, u)        # what a reads, b sends; and back
        self._send_all(a, peer)
        for end, e, other in ((a, u, peer), (b, peer, u)):
            if e.shutdown & SEND_SHUTDOWN:
                end.shutdown(socket.SHUT_WR)
            if e.shutdown & RCV_SHUTDOWN and not other.shutdown & SEND_SHUTDOWN:
                end.shutdown(socket.SHUT_RD)

    def _orphan(self, u) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, u.type)
        self._options(a, u)
        self._send_all(b, u)
        b.close()                                   # the peer is gone
        self.made[u.ino] = a

    def _bind(self, sock: socket.socket, u) -> None:
        name = u.name
        path = None if name.startswith(b"\0") else os.fsdecode(name.rstrip(b"\0"))
        try:
            sock.bind(name if path is None else path)
        except OSError as e:
            if path is None or e.errno != errno.EADDRINUSE or not _stale(path, u.type):
                raise errors.RestoreError(f"cannot bind unix socket to {name!r}: "
                                          f"{os.strerror(e.errno)}") from None
            os.unlink(path)            # the socket file of the dumped process
            sock.bind(path)
        if path is not None and not u.unlinked and u.file_mode:
            os.chmod(path, u.file_mode)
            os.chown(path, u.file_uid, u.file_gid)

    def _listener(self, u) -> None:
        sock = socket.socket(socket.AF_UNIX, u.type)
        self.made[u.ino] = sock
        self._options(sock, u)
        self._bind(sock, u)
        sock.listen(u.backlog)
        addr = sock.getsockname()
        for c in u.pending:           # the clients waiting in its queue, in order
            ce = self.by_ino[c]
            client = socket.socket(socket.AF_UNIX, ce.type)
            self.made[c] = client
            self._options(client, ce)
            client.connect(addr)
        if u.unlinked:
            os.unlink(os.fsdecode(u.name.rstrip(b"\0")))

    def _dgram(self, u) -> None:
        """A datagram socket: a pair if it and its peer are connected to each
        other; else bound (if it was) and connected to its peer by name."""
        peer = self.by_ino.get(u.peer) if u.peer else None
        if peer is not None and peer.peer == u.ino:
            self._pair(u, peer)
            return
        self._unconnected(u)
        if not u.peer:
            return
        if peer is not None and peer.ino not in self.made:
            self._dgram(peer)            # bound first, so there is a name to connect to
        name = u.peer_name
        addr = name if name.startswith(b"\0") else os.fsdecode(name.rstrip(b"\0"))
        try:
            self.made[u.ino].connect(addr)
        except OSError as e:
            raise errors.RestoreError(f"cannot connect datagram socket:[{u.ino}] to "
                                      f"{name!r} again: {os.strerror(e.errno)}") from None

    def _unconnected(self, u) -> None:
        sock = socket.socket(socket.AF_UNIX, u.type)
        self.made[u.ino] = sock
        self._options(sock, u)
        if u.name:
            self._bind(sock, u)
            if u.queue:                 # datagrams waiting: sent again, sender unnamed
                tmp = socket.socket(socket.AF_UNIX, u.type)
                try:
                    self._send_all(tmp, u, sock.getsockname())
                finally:
                    tmp.close()
            if u.unlinked:
                os.unlink(os.fsdecode(u.name.rstrip(b"\0")))
        elif u.queue:
            log.warning("socket:[%d]: %d datagrams queued on an unbound socket are lost",
                        u.ino, len(u.queue))

    def close(self) -> None:
        for s in self.made.values():
            s.close()


def _stale(path: str, typ: int) -> bool:
    """Is the socket file at ``path`` left by a dead socket (nobody behind it)?"""
    import stat as stat_mod
    try:
        if not stat_mod.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    probe = socket.socket(socket.AF_UNIX, typ)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False
