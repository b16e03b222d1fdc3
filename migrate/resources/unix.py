"""Unix socketpairs whose two ends are both in the dump.

Dump: sock_diag pairs the ends (peer inodes) and gives the shutdown state;
each end is taken with pidfd_getfd and its receive queue is read without
being consumed: MSG_PEEK walked message by message with SO_PEEK_OFF (put
back as it was).  Options: SO_PASSCRED and the buffer sizes.  Bound,
listening or unconnected sockets, a peer outside the dump, and fds in flight
(SCM_RIGHTS) are refused with a message saying which.
Restore (inside the new task): socketpair, options, each queue sent again
from the other end, then the shutdowns.
"""

from __future__ import annotations

import array
import logging
import os
import socket

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import sockdiag, syscalls

log = logging.getLogger(__name__)

SO_PEEK_OFF = 42
RCV_SHUTDOWN, SEND_SHUTDOWN = 1, 2
MAX_MSG = 1 << 20
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
        if u.name:
            raise errors.UnsupportedResource(self.pid, "socket", f"bound unix socket "
                                             f"{u.name!r} is not supported yet", fd=fd)
        if not u.peer:
            raise errors.UnsupportedResource(self.pid, "socket", "unconnected or listening "
                                             "unix socket is not supported yet", fd=fd)
        e = files_pb2.unix_sk_entry(ino=ino, peer=u.peer, type=u.type,
                                    flags=flags & os.O_NONBLOCK, shutdown=u.shutdown)
        pidfd = syscalls.pidfd_open(self.pid)
        try:
            mine = syscalls.pidfd_getfd(pidfd, fd, self.pid)
        finally:
            os.close(pidfd)
        try:
            s = socket.socket(fileno=mine)
            try:
                e.passcred = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED))
                e.rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                e.sndbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                e.queue.extend(self._peek_queue(s, fd, u))
            finally:
                s.detach()
        finally:
            os.close(mine)
        return files_pb2.file_entry(id=fid, type=files_pb2.UNIX_SOCKET, unix=e)

    def _peek_queue(self, s: socket.socket, fd: int, u) -> list[bytes]:
        old = s.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        out: list[bytes] = []
        try:
            while True:
                try:
                    data, anc, _, _ = s.recvmsg(MAX_MSG, socket.CMSG_SPACE(64 * 4),
                                                socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[:len(payload) - len(payload) % 4])
                        for f in fds:          # peeking gave us copies: drop them
                            os.close(f)
                        raise errors.UnsupportedResource(
                            self.pid, "socket", "file descriptors in flight (SCM_RIGHTS) "
                                                "are not supported yet", fd=fd)
                if not data:
                    if u.type == socket.SOCK_STREAM:
                        break                  # EOF: the peer shut down its writes
                    # the peek offset cannot step over an empty datagram
                    raise errors.UnsupportedResource(
                        self.pid, "socket", "an empty datagram in flight", fd=fd)
                out.append(data)
        finally:
            s.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, old)
        if u.type == socket.SOCK_STREAM and out:
            out = [b"".join(out)]
        return out


def check_pairs(entries: list, fd_of: dict[int, tuple[int, int]]) -> None:
    """Both ends of every pair must be in the dump."""
    inos = {f.unix.ino for f in entries if f.type == files_pb2.UNIX_SOCKET}
    for f in entries:
        if f.type == files_pb2.UNIX_SOCKET and f.unix.peer not in inos:
            pid, fd = fd_of[f.id]
            raise errors.UnsupportedResource(
                pid, "socket", f"the peer of socket:[{f.unix.ino}] belongs to a process "
                               "outside the dump", fd=fd)


class Pairs:
    """Restore side, in the new task: each pair made once, on first use."""

    def __init__(self, entries: list) -> None:
        self.by_ino = {f.unix.ino: f.unix for f in entries if f.type == files_pb2.UNIX_SOCKET}
        self.made: dict[int, socket.socket] = {}

    def open_end(self, f) -> int:
        u = f.unix
        if u.ino not in self.made:
            a, b = socket.socketpair(socket.AF_UNIX, u.type)
            self.made[u.ino], self.made[u.peer] = a, b
            peer = self.by_ino[u.peer]
            for end, e in ((a, u), (b, peer)):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, int(e.passcred))
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(e.rcvbuf // 2, 1))
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(e.sndbuf // 2, 1))
            for msg in u.queue:        # what a reads, b sends; and back
                b.sendall(msg) if u.type == socket.SOCK_STREAM else b.send(msg)
            for msg in peer.queue:
                a.sendall(msg) if u.type == socket.SOCK_STREAM else a.send(msg)
            for end, e, other in ((a, u, peer), (b, peer, u)):
                if e.shutdown & SEND_SHUTDOWN:
                    end.shutdown(socket.SHUT_WR)
                if e.shutdown & RCV_SHUTDOWN and not other.shutdown & SEND_SHUTDOWN:
                    end.shutdown(socket.SHUT_RD)
        fd = os.dup(self.made[u.ino].fileno())
        os.set_blocking(fd, not u.flags & os.O_NONBLOCK)
        return fd

    def close(self) -> None:
        for s in self.made.values():
            s.close()
