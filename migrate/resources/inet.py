"""IPv4 and IPv6 sockets: established TCP connections (resources/tcp.py),
listening TCP sockets, bound or connected UDP sockets, unconnected sockets.

Dump: our own copy of the socket (pidfd_getfd); its family, type, names,
options (SO_REUSEADDR/PORT, SO_KEEPALIVE with TCP_KEEPIDLE/INTVL/CNT,
TCP_NODELAY, buffer sizes, IPV6_V6ONLY, IP_FREEBIND) and state (TCP_INFO).
Refused, with the connection named: established connections without
--tcp-established (or --tcp-close), TCP states other than ESTABLISHED,
LISTEN and CLOSE (half-closed, closing, connecting), a listener with
connections not accepted yet without --skip-in-flight.
Lost, with a warning: datagrams queued on a UDP socket (UDP may lose them
anyway; the sender's address could not be given back), connections dropped
by --skip-in-flight (their clients see a reset once the lock is lifted).
Restore (in the tool, files.open_all): Opener below.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from migrate import errors
from migrate.images._pb import files_pb2
from migrate.kernel import proc, sockdiag, syscalls
from migrate.kernel import tcprepair as tr
from migrate.resources import tcp

log = logging.getLogger(__name__)

FAMILIES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
SOCK_TYPE_MASK = 0xF


def _name(family: int, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"


def describe(e) -> str:
    """One socket in a message: "TCP 10.1.0.1:40000 -> 10.1.0.2:7000"."""
    kind = "TCP" if e.type == socket.SOCK_STREAM else "UDP"
    out = f"{kind} {_name(e.family, e.src_addr, e.src_port)}"
    if e.dst_addr:
        out += f" -> {_name(e.family, e.dst_addr, e.dst_port)}"
    return out


def tree_connections(pids: list[int]) -> list[tr.InetSock]:
    """The established (or half-closed) TCP connections the fds of ``pids``
    hold, each read from our copy of its socket (pidfd_getfd).  Not from a
    table of the namespace: /proc/PID/net/tcp and inet_diag both walk the
    host's whole established hash (262144 buckets here, 10 to 20 ms in the
    frozen time whatever the namespace holds); this costs ~10 us a socket."""
    out: dict[int, tr.InetSock] = {}
    seen: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        pidfd = None
        try:
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if not link.startswith("socket:["):
                    continue
                ino = int(link[8:-1])
                if ino in seen:
                    continue
                seen.add(ino)
                if pidfd is None:
                    pidfd = syscalls.pidfd_open(pid)
                try:
                    mine = syscalls.pidfd_getfd(pidfd, int(fd), pid)
                except errors.NoSuchProcess:
                    raise
                except errors.KernelError:
                    continue                  # closed since (EBADF)
                try:
                    s = socket.socket(fileno=mine)
                except OSError:
                    os.close(mine)
                    continue
                with s:
                    sk = tr.connection_of(s, ino)
                if sk is not None:
                    out[ino] = sk
        except errors.NoSuchProcess:
            continue                          # gone since: no connection of its
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return [out[i] for i in sorted(out)]


def _addr(name) -> tuple[str, int]:
    return name[0], name[1]


class Dumper:
    """The inet sockets of a dumped tree (one per files.FileTable).  Keeps
    the connections it put in repair mode until the dump ends: done() leaves
    them in repair mode (the program is killed: closing sends nothing),
    rollback() turns repair off (the program goes on)."""

    def __init__(self, tcp_established: bool = False, tcp_close: bool = False,
                 skip_in_flight: bool = False, sink=None) -> None:
        self.tcp_established = tcp_established
        self.tcp_close = tcp_close
        self.skip_in_flight = skip_in_flight
        # The image sink: the queues go to its tcp-queues.img as they are
        # read (without one, into the entries), through one reused buffer.
        self.sink = sink
        self.queues = None
        self._buf = bytearray()
        self.repaired: list[tuple[socket.socket, object]] = []
        self._backlogs: dict[int, tuple[int, int]] | None = None
        self._pidfd: tuple[int, int] | None = None     # (pid, pidfd): one per process
        # Where the time goes (bench/tcp.py): seconds per step, summed.
        self.steps = {"steal": 0.0, "options": 0.0, "repair state": 0.0}

    def connections(self) -> list:
        """inet_sk_entry of every connection dumped in repair mode."""
        return [e for _, e in self.repaired]

    def _take(self, pid: int, fd: int) -> int:
        """Our copy of ``pid``'s fd (pidfd_getfd), its pidfd opened once."""
        if self._pidfd is None or self._pidfd[0] != pid:
            self.close_pidfd()
            self._pidfd = (pid, syscalls.pidfd_open(pid))
        return syscalls.pidfd_getfd(self._pidfd[1], fd, pid)

    def close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd[1])
            self._pidfd = None

    def dump(self, pid: int, fd: int, fid: int, link: str, flags: int):
        t0 = time.perf_counter()
        mine = self._take(pid, fd)
        try:
            s = socket.socket(fileno=mine)
        except OSError as e:
            os.close(mine)
            raise errors.from_errno("socket(fileno)", e.errno or 0, pid, f"fd {fd}") from None
        t1 = time.perf_counter()
        self.steps["steal"] += t1 - t0
        keep = False
        try:
            if s.family not in FAMILIES:
                raise errors.UnsupportedResource(pid, "socket", f"{link} is neither a unix "
                                                 f"nor an inet socket (family {s.family})",
                                                 fd=fd)
            typ = s.type & SOCK_TYPE_MASK
            if (typ, s.proto) not in ((socket.SOCK_STREAM, socket.IPPROTO_TCP),
                                      (socket.SOCK_DGRAM, socket.IPPROTO_UDP)):
                raise errors.UnsupportedResource(pid, "socket", f"{link}: {FAMILIES[s.family]}"
                                                 f" socket of type {typ} protocol {s.proto}",
                                                 fd=fd)
            # Filled in place: a copy of the queues would cost a copy per entry.
            f = files_pb2.file_entry(id=fid, type=files_pb2.INET_SOCKET)
            e = f.inet
            e.ino, e.family, e.type = int(link[8:-1]), s.family, typ
            e.flags = flags & os.O_NONBLOCK
            e.src_addr, e.src_port = _addr(s.getsockname())
            self._options(s, e)
            self.steps["options"] += time.perf_counter() - t1
            if typ == socket.SOCK_STREAM:
                keep = self._tcp(pid, fd, s, e)
            else:
                self._udp(pid, fd, s, e)
            return f
        finally:
            if not keep:
                s.close()

    @staticmethod
    def _options(s: socket.socket, e) -> None:
        def sol(opt):
            return s.getsockopt(socket.SOL_SOCKET, opt)
        e.reuseaddr = bool(sol(socket.SO_REUSEADDR))
        e.reuseport = bool(sol(socket.SO_REUSEPORT))
        e.rcvbuf, e.sndbuf = sol(socket.SO_RCVBUF), sol(socket.SO_SNDBUF)
        if e.family == socket.AF_INET6:
            e.v6only = bool(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
            e.freebind = bool(s.getsockopt(socket.IPPROTO_IPV6, tr.IPV6_FREEBIND))
        else:
            e.freebind = bool(s.getsockopt(socket.IPPROTO_IP, tr.IP_FREEBIND))
        if e.type == socket.SOCK_STREAM:
            e.keepalive = bool(sol(socket.SO_KEEPALIVE))
            e.nodelay = bool(s.getsockopt(tr.SOL_TCP, socket.TCP_NODELAY))
            e.keepidle = s.getsockopt(tr.SOL_TCP, socket.TCP_KEEPIDLE)
            e.keepintvl = s.getsockopt(tr.SOL_TCP, socket.TCP_KEEPINTVL)
            e.keepcnt = s.getsockopt(tr.SOL_TCP, socket.TCP_KEEPCNT)

    def _tcp(self, pid: int, fd: int, s: socket.socket, e) -> bool:
        """Fill a TCP socket's state; True if it is kept (in repair mode)."""
        e.state = tr.tcp_info(s).tcpi_state
        state = tr.STATES.get(e.state, str(e.state))
        if e.state == tr.TCP_LISTEN:
            if self._backlogs is None:
                self._backlogs = sockdiag.tcp_listen_backlogs()
            waiting, e.backlog = self._backlogs.get(e.ino, (0, socket.SOMAXCONN))
            if waiting:
                if not self.skip_in_flight:
                    raise errors.UnsupportedResource(
                        pid, "socket", f"listener {describe(e)} has {waiting} connection(s) "
                        "not accepted yet (in flight): dump with --skip-in-flight to drop "
                        "them", fd=fd)
                log.warning("pid %d fd %d: listener %s: %d connection(s) not accepted yet "
                            "are dropped (--skip-in-flight)", pid, fd, describe(e), waiting)
            return False
        if e.state == tr.TCP_CLOSE:
            return False
        try:
            e.dst_addr, e.dst_port = _addr(s.getpeername())
        except OSError:
            pass                      # SYN_SENT: no peer yet (refused below)
        if self.tcp_close:
            e.closed = True           # --tcp-close: no state, no lock
            return False
        if e.state != tr.TCP_ESTABLISHED:
            raise errors.UnsupportedResource(pid, "socket", f"{describe(e)} is in state "
                                             f"{state}: only established TCP connections "
                                             "are supported (or --tcp-close)", fd=fd)
        if not self.tcp_established:
            raise errors.UnsupportedResource(pid, "socket", f"established connection "
                                             f"{describe(e)}: dump with --tcp-established "
                                             "(or --tcp-close)", fd=fd)
        t0 = time.perf_counter()
        tr.set_repair(s, tr.TCP_REPAIR_ON)
        try:
            lengths = None
            if self.sink is not None:
                lengths = tr.queue_lengths(s)
                if len(self._buf) < lengths[0] + lengths[1]:
                    self._buf = bytearray(max(lengths[0] + lengths[1], 2 * len(self._buf)))
                if self.queues is None:
                    self.queues = self.sink.raw_writer(tcp.QUEUES_IMG)
            lengths = tcp.dump_stream(s, e.tcp, self.queues, self._buf, lengths)
        except BaseException:
            try:
                _repair_off(s, e)      # before our copy is closed (dump's finally)
            except (errors.MigrateError, OSError) as err:
                log.error("%s: could not leave repair mode: %s", describe(e), err)
            raise
        self.repaired.append((s, e))
        self.steps["repair state"] += time.perf_counter() - t0
        if log.isEnabledFor(logging.DEBUG):
            log.debug("pid %d fd %d: %s: %d bytes to read, %d not acknowledged (%d not sent)",
                      pid, fd, describe(e), *lengths)
        return True

    def _udp(self, pid: int, fd: int, s: socket.socket, e) -> None:
        e.state = tr.TCP_CLOSE
        try:
            e.dst_addr, e.dst_port = _addr(s.getpeername())
            e.state = tr.TCP_ESTABLISHED
        except OSError:
            pass
        if tr.inq_length(s):
            log.warning("pid %d fd %d: %s: the datagrams queued on it are lost", pid, fd,
                        describe(e))

    def write_queues(self) -> None:
        """Every socket dumped: tcp-queues.img complete, listed by the sink."""
        if self.queues is not None:
            self.sink.add_raw(tcp.QUEUES_IMG, self.queues)
            self.queues = None

    def _abort_queues(self) -> None:
        if self.queues is not None:
            self.queues.abort()          # the sink's discard removes the file
            self.queues = None

    def done(self) -> None:
        """The dump succeeded and the programs are killed: the connections
        stay in repair mode, so that closing them sends nothing."""
        self._abort_queues()
        self.close_pidfd()
        for s, _ in self.repaired:
            s.close()
        self.repaired = []

    def rollback(self) -> None:
        """Repair off: the programs go on with their connections as before."""
        self._abort_queues()
        self.close_pidfd()
        for s, e in self.repaired:
            try:
                _repair_off(s, e)
            except errors.MigrateError as err:
                log.error("%s: could not leave repair mode: %s", describe(e), err)
            finally:
                s.close()
        self.repaired = []


def _repair_off(s: socket.socket, e) -> None:
    tr.set_repair(s, tr.TCP_REPAIR_OFF)
    # Leaving repair mode resets sk_reuse (net/ipv4/tcp.c do_tcp_setsockopt).
    if e.reuseaddr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


class Opener:
    """Restore side, in the tool: each inet socket made once (files.open_all).
    Established connections are kept (our own fd of each) until finish()
    takes them out of repair mode, once every process is built."""

    def __init__(self, tcp_close: bool = False, queues: memoryview | None = None) -> None:
        self.tcp_close = tcp_close
        self.queues = queues            # tcp-queues.img past its header (read_raw)
        # (our socket, inet_sk_entry, the send queue's bytes never sent)
        self.repaired: list[tuple[socket.socket, object, memoryview]] = []
        self.made: list[socket.socket] = []
        # bench/tcp.py: "open" is all of open() (the queues are in it)
        self.steps = {"open": 0.0, "queues": 0.0, "repair off": 0.0}

    def open(self, f) -> int:
        t0 = time.perf_counter()
        e = f.inet
        s = socket.socket(e.family, e.type)
        self.made.append(s)
        repair = (e.type == socket.SOCK_STREAM and e.state == tr.TCP_ESTABLISHED and
                  e.HasField("tcp") and not e.closed and not self.tcp_close)
        try:
            if e.family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(e.v6only))
            if e.reuseaddr:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if e.reuseport:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if repair:
                # After SO_REUSEADDR, which would replace the SK_FORCE_REUSE
                # repair mode sets: the connection binds to the port of a
                # listener (an accepted connection) or of another connection.
                tr.set_repair(s, tr.TCP_REPAIR_ON)
            if e.freebind or repair:
                # The connection's address may be moved here only later.
                if e.family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, tr.IPV6_FREEBIND, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IP, tr.IP_FREEBIND, 1)
            if e.type == socket.SOCK_STREAM:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(e.keepalive))
                s.setsockopt(tr.SOL_TCP, socket.TCP_NODELAY, int(e.nodelay))
                for opt, val in ((socket.TCP_KEEPIDLE, e.keepidle),
                                 (socket.TCP_KEEPINTVL, e.keepintvl),
                                 (socket.TCP_KEEPCNT, e.keepcnt)):
                    if val:
                        s.setsockopt(tr.SOL_TCP, opt, val)
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(e.rcvbuf // 2, 1))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(e.sndbuf // 2, 1))
            closed = e.closed or (self.tcp_close and e.type == socket.SOCK_STREAM and
                                  e.state == tr.TCP_ESTABLISHED)
            if (e.src_port or e.state == tr.TCP_LISTEN) and not closed:
                s.bind((e.src_addr, e.src_port))
            if e.state == tr.TCP_LISTEN:
                s.listen(e.backlog)
            elif repair:
                t0 = time.perf_counter()
                inq, outq = tcp.queue_views(e.tcp, self.queues, describe(e))
                self.repaired.append((s, e, tcp.restore_stream(s, e, e.tcp, inq, outq)))
                self.steps["queues"] += time.perf_counter() - t0
            elif e.type == socket.SOCK_DGRAM and e.state == tr.TCP_ESTABLISHED:
                s.connect((e.dst_addr, e.dst_port))
        except OSError as err:
            raise errors.RestoreError(f"{describe(e)} (file id {f.id}): "
                                      f"{os.strerror(err.errno) if err.errno else err}") \
                from None
        fd = os.dup(s.fileno())
        os.set_blocking(fd, not e.flags & os.O_NONBLOCK)
        self.steps["open"] += time.perf_counter() - t0
        return fd

    def finish(self) -> None:
        """Every process is built: the connections leave repair mode (each
        sends a window probe, which tells the peer our window again), and the
        bytes that were queued but never sent are sent."""
        t0 = time.perf_counter()
        try:
            for s, e, unsent in self.repaired:
                _repair_off(s, e)
                if unsent:
                    tcp.send_unsent(s, unsent, describe(e))
        finally:
            self.close()
            self.steps["repair off"] += time.perf_counter() - t0

    def forked(self) -> None:
        """The processes hold the sockets now: ours go, but for the
        connections still in repair mode (finish)."""
        keep = {id(r[0]) for r in self.repaired}
        for s in self.made:
            if id(s) not in keep:
                s.close()
        self.made = [r[0] for r in self.repaired]

    def close(self) -> None:
        """Our fds: the sockets live on in the processes' fds."""
        for s in self.made:
            s.close()
        self.made = []
        self.repaired = []
