"""TCP repair mode (include/uapi/linux/tcp.h, man 7 tcp) and the inet socket
tables of /proc/PID/net/tcp{,6}.

Typed wrappers over setsockopt/getsockopt/ioctl on an fd the tool owns
(usually a copy taken with pidfd_getfd).  Repair mode needs CAP_NET_ADMIN in
the socket's network namespace; it is a property of the socket, not of the
fd: every fd of it sees it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import socket
import struct

from migrate import errors

SOL_TCP = socket.IPPROTO_TCP
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
# struct tcp_repair_opt codes (TCPOPT_* of include/net/tcp.h)
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
# tcp_info.tcpi_options
TCPI_OPT_TIMESTAMPS, TCPI_OPT_SACK, TCPI_OPT_WSCALE = 1, 2, 4
SIOCINQ, SIOCOUTQ, SIOCOUTQNSD = 0x541B, 0x5411, 0x894B
IP_FREEBIND, IPV6_FREEBIND = 15, 78
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

# include/net/tcp_states.h
STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
          6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
          11: "CLOSING"}
TCP_ESTABLISHED, TCP_CLOSE, TCP_LISTEN = 1, 7, 10

TCP_REPAIR_WINDOW_S = struct.Struct("=5I")
_INT = struct.Struct("=i")
_INT0 = bytes(4)
_INFO_HEAD = struct.Struct("=7B")


@dataclasses.dataclass(frozen=True, slots=True)
class TcpRepairWindow:
    """struct tcp_repair_window (include/uapi/linux/tcp.h)."""
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int


@dataclasses.dataclass(frozen=True, slots=True)
class TcpInfoHead:
    """The first bytes of struct tcp_info we use."""
    tcpi_state: int
    tcpi_options: int
    tcpi_snd_wscale: int
    tcpi_rcv_wscale: int


def _err(what: str, e: OSError, fd: int) -> errors.KernelError:
    return errors.from_errno(what, e.errno or 0, None, f"socket fd {fd}")


def setopt(s: socket.socket, level: int, opt: int, val, what: str) -> None:
    try:
        s.setsockopt(level, opt, val)
    except OSError as e:
        raise _err(f"setsockopt({what})", e, s.fileno()) from None


def getopt(s: socket.socket, level: int, opt: int, what: str, buflen: int = 0):
    try:
        if buflen:
            return s.getsockopt(level, opt, buflen)
        return s.getsockopt(level, opt)
    except OSError as e:
        raise _err(f"getsockopt({what})", e, s.fileno()) from None


def set_repair(s: socket.socket, mode: int) -> None:
    setopt(s, SOL_TCP, TCP_REPAIR, mode, "TCP_REPAIR")


def set_queue(s: socket.socket, queue: int) -> None:
    setopt(s, SOL_TCP, TCP_REPAIR_QUEUE, queue, "TCP_REPAIR_QUEUE")


def get_queue_seq(s: socket.socket) -> int:
    return getopt(s, SOL_TCP, TCP_QUEUE_SEQ, "TCP_QUEUE_SEQ") & 0xFFFFFFFF


def set_queue_seq(s: socket.socket, seq: int) -> None:
    setopt(s, SOL_TCP, TCP_QUEUE_SEQ, struct.pack("=I", seq & 0xFFFFFFFF), "TCP_QUEUE_SEQ")


def tcp_info(s: socket.socket) -> TcpInfoHead:
    raw = getopt(s, SOL_TCP, socket.TCP_INFO, "TCP_INFO", 104)
    state, _ca, _retr, _probes, _backoff, options, wscale = struct.unpack_from("=7B", raw)
    return TcpInfoHead(state, options, wscale & 0xF, wscale >> 4)


def get_window(s: socket.socket) -> TcpRepairWindow:
    raw = getopt(s, SOL_TCP, TCP_REPAIR_WINDOW, "TCP_REPAIR_WINDOW", TCP_REPAIR_WINDOW_S.size)
    return TcpRepairWindow(*TCP_REPAIR_WINDOW_S.unpack(raw))


def set_window(s: socket.socket, w: TcpRepairWindow) -> None:
    setopt(s, SOL_TCP, TCP_REPAIR_WINDOW,
           TCP_REPAIR_WINDOW_S.pack(w.snd_wl1, w.snd_wnd, w.max_window, w.rcv_wnd, w.rcv_wup),
           "TCP_REPAIR_WINDOW")


def set_options(s: socket.socket, opts: list[tuple[int, int]]) -> None:
    """TCP_REPAIR_OPTIONS: an array of struct tcp_repair_opt {opt_code, opt_val}."""
    if opts:
        setopt(s, SOL_TCP, TCP_REPAIR_OPTIONS,
               b"".join(struct.pack("=II", c, v) for c, v in opts), "TCP_REPAIR_OPTIONS")


def get_timestamp(s: socket.socket) -> int:
    return getopt(s, SOL_TCP, TCP_TIMESTAMP, "TCP_TIMESTAMP") & 0xFFFFFFFF


def set_timestamp(s: socket.socket, ts: int) -> None:
    setopt(s, SOL_TCP, TCP_TIMESTAMP, struct.pack("=I", ts & 0xFFFFFFFF), "TCP_TIMESTAMP")


def _ioctl_int(s: socket.socket, req: int, what: str) -> int:
    try:
        return struct.unpack("=i", fcntl.ioctl(s.fileno(), req, b"\0" * 4))[0]
    except OSError as e:
        raise _err(f"ioctl({what})", e, s.fileno()) from None


def inq_length(s: socket.socket) -> int:
    """Bytes (TCP) or the next datagram's size (UDP) waiting to be read."""
    return _ioctl_int(s, SIOCINQ, "SIOCINQ")


def queue_lengths(s: socket.socket) -> tuple[int, int, int]:
    """(bytes to read, bytes not yet acknowledged, of which not yet sent)."""
    fd, ioctl, unpack = s.fileno(), fcntl.ioctl, _INT.unpack
    what = "SIOCINQ"
    try:
        inq = unpack(ioctl(fd, SIOCINQ, _INT0))[0]
        what = "SIOCOUTQ"
        outq = unpack(ioctl(fd, SIOCOUTQ, _INT0))[0]
        what = "SIOCOUTQNSD"
        return inq, outq, unpack(ioctl(fd, SIOCOUTQNSD, _INT0))[0]
    except OSError as e:
        raise _err(f"ioctl({what})", e, fd) from None


def peek(s: socket.socket, n: int, what: str) -> bytes:
    """The whole selected repair queue, not consumed (MSG_PEEK)."""
    if n == 0:
        return b""
    try:
        data = s.recv(n, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError as e:
        raise _err(f"recv(MSG_PEEK, {what})", e, s.fileno()) from None
    if len(data) != n:
        raise errors.KernelError(f"recv(MSG_PEEK, {what})", 5, None,
                                 f"socket fd {s.fileno()}: {len(data)} bytes of {n}")
    return data


@dataclasses.dataclass(frozen=True, slots=True)
class RepairState:
    """An established connection as repair mode shows it: TCP_QUEUE_SEQ of
    each queue (the sequence number after it), the queues (the send queue
    holds every byte not acknowledged, of which the last ``unsq_len`` were
    never sent: SIOCOUTQNSD), TCP_MAXSEG (mss_clamp in repair mode),
    TCP_INFO, TCP_TIMESTAMP and TCP_REPAIR_WINDOW."""
    rcv_seq: int
    inq: bytes | memoryview
    snd_seq: int
    outq: bytes | memoryview
    unsq_len: int
    mss: int
    info: TcpInfoHead
    timestamp: int
    window: TcpRepairWindow




def read_repair_state(s: socket.socket, lengths: tuple[int, int, int],
                      buf: bytearray | None = None) -> RepairState:
    """Read everything of ``s`` (in repair mode already) a restore needs, in
    as few calls as the kernel allows (a dozen syscalls, each queue copied
    once, by MSG_PEEK).  ``lengths``: queue_lengths(s).  With ``buf`` (at
    least as long as both queues) the queues are peeked into it and given
    as views of it (no fresh memory for them: the caller writes them out
    before the next read); else as bytes.  Leaves no queue selected."""
    fd = s.fileno()
    gso, sso = s.getsockopt, s.setsockopt
    inq_len, outq_len, unsq_len = lengths
    peek = socket.MSG_PEEK | socket.MSG_DONTWAIT
    if buf is not None:
        view = memoryview(buf)
        inq, outq = view[:inq_len], view[inq_len:inq_len + outq_len]
        view.release()
        got_in = got_out = 0
    what = "setsockopt(TCP_REPAIR_QUEUE)"
    try:
        sso(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        what = "getsockopt(TCP_QUEUE_SEQ)"
        rcv_seq = gso(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        what = "recv(MSG_PEEK, receive queue)"
        if buf is None:
            inq = s.recv(inq_len, peek) if inq_len else b""
        elif inq_len:
            got_in = s.recv_into(inq, inq_len, peek)
        what = "setsockopt(TCP_REPAIR_QUEUE)"
        sso(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        what = "getsockopt(TCP_QUEUE_SEQ)"
        snd_seq = gso(SOL_TCP, TCP_QUEUE_SEQ) & 0xFFFFFFFF
        what = "recv(MSG_PEEK, send queue)"
        if buf is None:
            outq = s.recv(outq_len, peek) if outq_len else b""
        elif outq_len:
            got_out = s.recv_into(outq, outq_len, peek)
        what = "setsockopt(TCP_REPAIR_QUEUE)"
        sso(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        what = "getsockopt(TCP_MAXSEG)"
        mss = gso(SOL_TCP, socket.TCP_MAXSEG)
        what = "getsockopt(TCP_INFO)"
        raw = gso(SOL_TCP, socket.TCP_INFO, 104)
        what = "getsockopt(TCP_TIMESTAMP)"
        ts = gso(SOL_TCP, TCP_TIMESTAMP) & 0xFFFFFFFF
        what = "getsockopt(TCP_REPAIR_WINDOW)"
        win = TcpRepairWindow(*TCP_REPAIR_WINDOW_S.unpack(
            gso(SOL_TCP, TCP_REPAIR_WINDOW, TCP_REPAIR_WINDOW_S.size)))
    except OSError as e:
        raise _err(what, e, fd) from None
    if buf is not None:
        short = [(name, got, n) for name, got, n in (("receive", got_in, inq_len),
                                                     ("send", got_out, outq_len)) if got != n]
    else:
        short = [(name, len(data), n) for name, data, n in (("receive", inq, inq_len),
                                                            ("send", outq, outq_len))
                 if len(data) != n]
    for name, got, n in short:
        raise errors.KernelError(f"recv(MSG_PEEK, {name} queue)", 5, None,
                                 f"socket fd {fd}: {got} bytes of {n}")
    state, _ca, _retr, _probes, _backoff, options, wscale = _INFO_HEAD.unpack_from(raw)
    return RepairState(rcv_seq, inq, snd_seq, outq, unsq_len, mss,
                       TcpInfoHead(state, options, wscale & 0xF, wscale >> 4), ts, win)


# --------------------------------------------------------------------------
# /proc/PID/net/tcp, tcp6, udp, udp6 (net/ipv4/tcp_ipv4.c get_tcp4_sock)


@dataclasses.dataclass(frozen=True, slots=True)
class InetSock:
    """One line of /proc/PID/net/{tcp,udp}{,6}."""
    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    inode: int
    tx_queue: int = 0
    rx_queue: int = 0        # a listener: connections waiting to be accepted

    def describe(self) -> str:
        def a(x):
            return f"[{x[0]}]:{x[1]}" if self.family == socket.AF_INET6 else f"{x[0]}:{x[1]}"
        return f"{a(self.local)} -> {a(self.remote)} ({STATES.get(self.state, self.state)})"


def connection_of(s: socket.socket, inode: int) -> InetSock | None:
    """``s`` (our copy of a socket) as /proc/net/tcp would list it, if it is
    a TCP connection (not a listener, not closed); None otherwise.  The
    peer of a connection still being made (SYN_SENT) is not known here."""
    if s.family not in (socket.AF_INET, socket.AF_INET6) or \
            s.type & 0xF != socket.SOCK_STREAM or s.proto != socket.IPPROTO_TCP:
        return None
    try:
        state = s.getsockopt(SOL_TCP, socket.TCP_INFO, 8)[0]
        if state in (TCP_LISTEN, TCP_CLOSE):
            return None
        local = s.getsockname()[:2]
        try:
            remote = s.getpeername()[:2]
        except OSError:
            remote = ("?", 0)
    except OSError as e:
        raise _err("getsockopt(TCP_INFO)/getsockname", e, s.fileno()) from None
    return InetSock(s.family, local, remote, state, inode)


def _addr(field: str, family: int) -> tuple[str, int]:
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    if family == socket.AF_INET:
        packed = raw[::-1]
    else:    # four host-order u32 words
        packed = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(family, packed), int(port, 16)


def parse_inet(text: str, family: int) -> list[InetSock]:
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        tx, rx = (int(x, 16) for x in f[4].split(":"))
        out.append(InetSock(family, _addr(f[1], family), _addr(f[2], family), int(f[3], 16),
                            int(f[9]), tx, rx))
    return out


def inet_sockets(pid: int, proto: str = "tcp") -> dict[int, InetSock]:
    """Every ``proto`` socket of ``pid``'s network namespace, by inode."""
    out: dict[int, InetSock] = {}
    for name, fam in ((proto, socket.AF_INET), (proto + "6", socket.AF_INET6)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                text = f.read()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise errors.from_errno(f"read /proc/{pid}/net/{name}", e.errno or 0, pid) from None
        for s in parse_inet(text, fam):
            out[s.inode] = s
    return out
