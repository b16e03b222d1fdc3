"""sock_diag for unix sockets (man 7 sock_diag): peers, names, queues.

One NETLINK_SOCK_DIAG dump of every unix socket of this network namespace,
keyed by inode: enough to pair the two ends of a socketpair and to refuse
what is not handled yet.
"""

from __future__ import annotations

import dataclasses
import socket
import struct

from migrate import errors

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
UDIAG_SHOW_NAME, UDIAG_SHOW_VFS, UDIAG_SHOW_PEER, UDIAG_SHOW_ICONS = 0x1, 0x2, 0x4, 0x8
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_NAME, UNIX_DIAG_VFS, UNIX_DIAG_PEER, UNIX_DIAG_ICONS = 0, 1, 2, 3
UNIX_DIAG_RQLEN, UNIX_DIAG_SHUTDOWN = 4, 6
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10
NLMSGHDR = struct.Struct("=IHHII")
UNIX_DIAG_REQ = struct.Struct("=BBHIIII")
UNIX_DIAG_MSG = struct.Struct("=BBBBIII")
RTA = struct.Struct("=HH")


@dataclasses.dataclass(frozen=True, slots=True)
class UnixSock:
    """struct unix_diag_msg with the attributes we ask for."""
    ino: int
    type: int
    state: int
    peer: int = 0
    name: bytes = b""
    rqueue: int = 0          # a listener: connections waiting; else bytes queued
    wqueue: int = 0          # a listener: its backlog
    shutdown: int = 0
    vfs_ino: int = 0         # the inode of the bound file (a path name)
    vfs_dev: int = 0
    icons: tuple[int, ...] = ()   # a listener: the connections in its queue


def _align(n: int) -> int:
    return (n + 3) & ~3


def parse(data: bytes) -> tuple[list[UnixSock], bool]:
    """Sockets in a netlink reply, and whether the dump is done."""
    out, off = [], 0
    while off + NLMSGHDR.size <= len(data):
        length, mtype, _, _, _ = NLMSGHDR.unpack_from(data, off)
        if length < NLMSGHDR.size or off + length > len(data):
            raise ValueError(f"netlink message of {length} bytes at {off}")
        body = data[off + NLMSGHDR.size:off + length]
        off += _align(length)
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            err = -struct.unpack_from("=i", body)[0]
            raise errors.from_errno("sock_diag", err)
        if mtype != SOCK_DIAG_BY_FAMILY or len(body) < UNIX_DIAG_MSG.size:
            continue
        _fam, typ, state, _pad, ino, _c0, _c1 = UNIX_DIAG_MSG.unpack_from(body)
        attrs = {"ino": ino, "type": typ, "state": state}
        a = UNIX_DIAG_MSG.size
        while a + RTA.size <= len(body):
            alen, atype = RTA.unpack_from(body, a)
            if alen < RTA.size:
                break
            val = body[a + RTA.size:a + alen]
            if atype == UNIX_DIAG_PEER:
                attrs["peer"] = struct.unpack_from("=I", val)[0]
            elif atype == UNIX_DIAG_NAME:
                attrs["name"] = val
            elif atype == UNIX_DIAG_RQLEN:
                attrs["rqueue"], attrs["wqueue"] = struct.unpack_from("=II", val)
            elif atype == UNIX_DIAG_SHUTDOWN:
                attrs["shutdown"] = val[0]
            elif atype == UNIX_DIAG_VFS and len(val) >= 8:
                attrs["vfs_ino"], attrs["vfs_dev"] = struct.unpack_from("=II", val)
            elif atype == UNIX_DIAG_ICONS:
                attrs["icons"] = struct.unpack_from(f"={len(val) // 4}I", val)
            a += _align(alen)
        out.append(UnixSock(**attrs))
    return out, False


def unix_sockets() -> dict[int, UnixSock]:
    """Every unix socket of our network namespace, by inode."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    except OSError as e:
        raise errors.from_errno("socket(NETLINK_SOCK_DIAG)", e.errno) from e
    try:
        show = (UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS |
                UDIAG_SHOW_RQLEN | 0x40)  # SHUTDOWN
        req = UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, show, 0) + \
            struct.pack("=I", 0)
        hdr = NLMSGHDR.pack(NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY,
                            NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.send(hdr + req)
        socks: dict[int, UnixSock] = {}
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            got, done = parse(data)
            for u in got:
                socks[u.ino] = u
            if done:
                break
        return socks
    finally:
        s.close()


# inet_diag (include/uapi/linux/inet_diag.h): a listener's backlog is only
# shown here (idiag_wqueue = sk_max_ack_backlog).
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48s")
INET_DIAG_MSG = struct.Struct("=BBBB48sIIIII")


def tcp_listen_backlogs() -> dict[int, tuple[int, int]]:
    """Every listening TCP socket of our network namespace: inode ->
    (connections waiting to be accepted, listen(2) backlog)."""
    out: dict[int, tuple[int, int]] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        except OSError as e:
            raise errors.from_errno("socket(NETLINK_SOCK_DIAG)", e.errno) from e
        try:
            req = INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN,
                                        b"\0" * 48)
            hdr = NLMSGHDR.pack(NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
            s.send(hdr + req)
            done = False
            while not done:
                data = s.recv(1 << 16)
                if not data:
                    break
                off = 0
                while off + NLMSGHDR.size <= len(data):
                    length, mtype, _, _, _ = NLMSGHDR.unpack_from(data, off)
                    if length < NLMSGHDR.size or off + length > len(data):
                        raise errors.KernelError("inet_diag", 5, None,
                                                 f"netlink message of {length} bytes")
                    body = data[off + NLMSGHDR.size:off + length]
                    off += _align(length)
                    if mtype == NLMSG_DONE:
                        done = True
                        break
                    if mtype == NLMSG_ERROR:
                        raise errors.from_errno("inet_diag", -struct.unpack_from("=i", body)[0])
                    if mtype == SOCK_DIAG_BY_FAMILY and len(body) >= INET_DIAG_MSG.size:
                        *_, rq, wq, _uid, ino = INET_DIAG_MSG.unpack_from(body)
                        out[ino] = (rq, wq)
        finally:
            s.close()
    return out
