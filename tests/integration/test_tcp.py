"""Established TCP connections, listeners, UDP and the network lock, in
network namespaces made by the test (veth pairs, addresses inside them
only), all deleted at the end; the test checks nothing is left.

Processes and the `migrate` command enter a namespace with `nsenter --net`
(not `ip netns exec`, which also makes a mount namespace: the tool refuses
a process in another mount namespace than its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.harness import BIN, ENV, ROOT, Workload, _tail, alive, reap_pids

PREFIX = f"mgt{os.getpid() % 100000}"
NET4 = "10.231.{}.{}"
NET6 = "fd00:231:{}::{}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _ours_left() -> list[str]:
    """Namespaces and links of ours, and locks in the root namespace."""
    left = [n.split()[0] for n in _ip("netns", "list").stdout.splitlines()
            if n.startswith(PREFIX)]
    left += [line.split(":")[1].strip() for line in _ip("-o", "link").stdout.splitlines()
             if f" {PREFIX}" in line]
    p = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
    left += [t for t in p.stdout.splitlines() if "migrate-" in t]
    return left


class Net:
    """Namespaces by name: each `link(a, b, subnet)` joins two with a veth
    pair, a.1 and b.2 in 10.231.SUBNET.0/24 and fd00:231:SUBNET::/64."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def ns(self, tag: str) -> str:
        name = f"{PREFIX}{tag}"
        _ip("netns", "add", name)
        self.names.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, a: str, b: str, subnet: int) -> tuple[str, str]:
        va, vb = f"{a[-8:]}v{subnet}a", f"{b[-8:]}v{subnet}b"
        va, vb = va[-15:], vb[-15:]
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        for ns, dev, host in ((a, va, 1), (b, vb, 2)):
            self.address(ns, dev, subnet, host)
        return va, vb

    @staticmethod
    def address(ns: str, dev: str, subnet: int, host: int) -> None:
        _ip("-n", ns, "addr", "add", f"{NET4.format(subnet, host)}/24", "dev", dev)
        _ip("-n", ns, "addr", "add", f"{NET6.format(subnet, host)}/64", "dev", dev, "nodad")
        _ip("-n", ns, "link", "set", dev, "up")

    @staticmethod
    def enter(ns: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{ns}", *argv]

    def migrate(self, ns: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.enter(ns, [sys.executable, "-m", "migrate", *args]),
                              cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=timeout)

    def tables(self, ns: str) -> list[str]:
        p = subprocess.run(self.enter(ns, ["nft", "list", "tables"]), capture_output=True,
                           text=True)
        return [t for t in p.stdout.splitlines() if "migrate-" in t]

    def delete(self) -> None:
        for name in reversed(self.names):
            _ip("netns", "del", name, check=False)
        self.names = []


@pytest.fixture
def net():
    n = Net()
    try:
        yield n
    finally:
        n.delete()
        # veth ends go with their namespace; give the kernel a moment
        end = time.monotonic() + 10
        while _ours_left() and time.monotonic() < end:
            time.sleep(0.1)
        assert _ours_left() == [], f"left behind: {_ours_left()}"


def start(net: Net, ns: str, workdir: str, workloads: list, name: str, *args: str,
          ready: bool = True) -> Workload:
    w = Workload(net.enter(ns, [os.path.join(BIN, name), *args]), workdir, name)
    workloads.append(w)
    if ready:
        w.wait_ready()
    return w


def dump(net: Net, ns: str, w: Workload, images: str, *extra: str) -> None:
    p = net.migrate(ns, "dump", "-t", str(w.pid), "-D", images, "-v4", "-o", "dump.log",
                    *extra)
    assert p.returncode == 0, f"dump failed:\n{p.stderr}\n{_tail(images + '/dump.log')}"
    if not {"-R", "--leave-running"} & set(extra):
        w.reap_dumped()


def restore(net: Net, ns: str, w: Workload, images: str, *extra: str) -> None:
    p = net.migrate(ns, "restore", "-D", images, "-d", "-v4", "-o", "restore.log", *extra)
    assert p.returncode == 0, f"restore failed:\n{p.stderr}\n{_tail(images + '/restore.log')}"
    assert alive(w.pid), f"{w.name} is not running after restore:\n{w.log()}"


def _progress(w: Workload) -> None:
    """Let the connections carry data for a moment."""
    time.sleep(0.3)


def test_client_local_cycles(net, workdir, workloads):
    """Three connections streaming both ways; the client dumped and restored
    in its namespace while the server keeps running."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 1)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(1, 2), "7000", "3")
    for i in range(3):
        _progress(client)
        images = os.path.join(workdir, f"img{i}")
        dump(net, c, client, images, "--tcp-established")
        assert net.tables(c) == [f"table inet migrate-{client.pid}"]   # held till restore
        restore(net, c, client, images)
        assert net.tables(c) == []
    _progress(client)
    client.assert_pass()
    assert "3 connections" in client.log()
    server.assert_pass()


def test_client_ipv6_iptables(net, workdir, workloads):
    """IPv6, and the iptables lock."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 2)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET6.format(2, 2), "7000", "2")
    _progress(client)
    images = os.path.join(workdir, "img")
    dump(net, c, client, images, "--tcp-established", "--network-lock", "iptables")
    chains = subprocess.run(net.enter(c, ["ip6tables", "-S"]), capture_output=True,
                            text=True).stdout
    assert f"-N MIGRATE-{client.pid}" in chains
    restore(net, c, client, images, "--network-lock", "iptables")
    for tool in ("iptables", "ip6tables"):
        chains = subprocess.run(net.enter(c, [tool, "-S"]), capture_output=True,
                                text=True).stdout
        assert "MIGRATE-" not in chains, chains
    _progress(client)
    client.assert_pass()
    server.assert_pass()


def test_client_moves_to_another_namespace(net, workdir, workloads):
    """Restored in another namespace that has taken over the client's
    address (the veth end moves there, after `migrate network-lock` there);
    the source's lock is lifted with `migrate network-unlock`."""
    c, s, d = net.ns("c"), net.ns("s"), net.ns("d")
    vc, _ = net.link(c, s, 3)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(3, 2), "7000", "2")
    _progress(client)
    images = os.path.join(workdir, "img")
    dump(net, c, client, images, "--tcp-established")
    # The destination locks first, then takes the address: the packets the
    # server retransmits meanwhile must not meet a host without the socket.
    p = net.migrate(d, "network-lock", "-D", images)
    assert p.returncode == 0, p.stderr
    assert net.tables(d) == [f"table inet migrate-{client.pid}"]
    _ip("-n", c, "link", "set", vc, "netns", d)
    net.address(d, vc, 3, 1)
    restore(net, d, client, images)
    assert net.tables(d) == []
    assert net.tables(c) == [f"table inet migrate-{client.pid}"]
    p = net.migrate(c, "network-unlock", "-t", str(client.pid))
    assert p.returncode == 0, p.stderr
    assert net.tables(c) == []
    _progress(client)
    client.assert_pass()
    server.assert_pass()


def test_server_side(net, workdir, workloads):
    """The server (a dual-stack listener, its accepted connections, a UDP
    socket) dumped and restored while two clients stream to it."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 4)
    server = start(net, s, workdir, workloads, "tcpecho", "7000", "7001")
    c4 = start(net, c, workdir, workloads, "tcpstream", NET4.format(4, 2), "7000", "2")
    c6 = start(net, c, workdir, workloads, "tcpstream", NET6.format(4, 2), "7000", "1")
    for i in range(2):
        _progress(c4)
        images = os.path.join(workdir, f"img{i}")
        dump(net, s, server, images, "--tcp-established")
        restore(net, s, server, images)
    _progress(c4)
    # The UDP socket answers; the listener takes a new client.
    probe = subprocess.run(net.enter(c, [sys.executable, "-c", f"""
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
u.sendto(b"ping", ("{NET4.format(4, 2)}", 7001)); assert u.recvfrom(100)[0] == b"ping"
t = socket.create_connection(("{NET4.format(4, 2)}", 7000), timeout=10)
t.sendall(b"hello"); assert t.recv(100) == b"hello"; t.shutdown(socket.SHUT_WR)
assert t.recv(100) == b""
print("ok")
"""]), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "ok", probe.stderr
    c4.assert_pass()
    c6.assert_pass()
    server.assert_pass()
    assert "3 clients served" in server.log() or "clients served" in server.log()


def test_refused_without_tcp_established(net, workdir, workloads):
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 5)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(5, 2), "7000")
    p = net.migrate(c, "dump", "-t", str(client.pid), "-D", os.path.join(workdir, "img"))
    assert p.returncode == 1
    assert f"{NET4.format(5, 1)}:" in p.stderr and f"-> {NET4.format(5, 2)}:7000" in p.stderr
    assert "--tcp-established" in p.stderr
    assert net.tables(c) == []
    _progress(client)
    client.assert_pass()
    server.assert_pass()


def test_lock_removed_after_failed_dump(net, workdir, workloads, mounts):
    """A dump that fails half-way (disk full, after the lock and the repair
    mode) removes the lock and leaves the connections working."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 6)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(6, 2), "7000", "2")
    small = mounts(os.path.join(workdir, "small"), "size=48k")
    p = net.migrate(c, "dump", "-t", str(client.pid), "-D", os.path.join(small, "img"),
                    "--tcp-established", "-v4")
    assert p.returncode == 1, p.stderr
    assert "network lock migrate-" in p.stderr and "lifted" in p.stderr, p.stderr[-3000:]
    assert net.tables(c) == []
    assert alive(client.pid)
    _progress(client)
    client.assert_pass()
    server.assert_pass()


def test_leave_running_and_tcp_close(net, workdir, workloads):
    """-R: the connections go on (repair off, lock lifted); the image
    restored with --tcp-close in place of the original gives a closed
    socket: the client sees it and fails cleanly, nothing hangs."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 7)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(7, 2), "7000")
    images = os.path.join(workdir, "img")
    dump(net, c, client, images, "--tcp-established", "-R")
    assert net.tables(c) == []
    _progress(client)
    client.assert_pass()
    # --tcp-close at dump: no lock, no state; the restored socket is closed.
    client2 = start(net, c, workdir, workloads, "tcpstream", NET4.format(7, 2), "7000")
    images2 = os.path.join(workdir, "img2")
    dump(net, c, client2, images2, "--tcp-close")
    assert net.tables(c) == []
    p = net.migrate(c, "restore", "-D", images2, "-d")
    assert p.returncode == 0, p.stderr
    end = time.monotonic() + 30
    while alive(client2.pid) and time.monotonic() < end:
        time.sleep(0.05)
    reap_pids([client2.pid])
    assert "FAIL: conn 0:" in client2.log(), client2.log()
    client2.reaped = True
    # The server saw that connection go: as a reset (its usual end: the
    # killed client had unread data), or as an EOF it answered.
    status, log = server.stop()
    assert (status == 1 and "error (reset?)" in log) or (status == 0 and "PASS" in log), log


def test_listener_with_pending_connection(net, workdir, workloads):
    """A connection not accepted yet: refused without --skip-in-flight;
    with it, dropped (the listener itself comes back and serves)."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 8)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    os.kill(server.pid, signal.SIGSTOP)
    pending = subprocess.Popen(net.enter(c, [sys.executable, "-c", f"""
import socket, time
t = socket.create_connection(("{NET4.format(8, 2)}", 7000), timeout=10)
time.sleep(120)
"""]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        p = net.migrate(s, "dump", "-t", str(server.pid), "-D", os.path.join(workdir, "i1"),
                        "--tcp-established")
        assert p.returncode == 1 and "--skip-in-flight" in p.stderr, p.stderr
        images = os.path.join(workdir, "i2")
        p = net.migrate(s, "dump", "-t", str(server.pid), "-D", images, "-v4", "-o",
                        "dump.log", "--tcp-established", "--skip-in-flight")
        assert p.returncode == 0, p.stderr + _tail(images + "/dump.log")
        server.reap_dumped()
        restore(net, s, server, images)
        os.kill(server.pid, signal.SIGCONT)
        client = start(net, c, workdir, workloads, "tcpstream", NET4.format(8, 2), "7000")
        _progress(client)
        client.assert_pass()
        server.assert_pass()
    finally:
        pending.kill()
        pending.wait()


REDIS_CLIENT = r'''
import socket, sys

def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)

class Conn:
    def __init__(self, addr):
        self.s = socket.create_connection((addr, 6379), timeout=60)
        self.buf = b""
    def line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise SystemExit("FAIL: redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line
    def reply(self):
        line = self.line()
        if line[:1] == b"$":
            n = int(line[1:])
            while len(self.buf) < n + 2:
                self.buf += self.s.recv(1 << 16)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if line[:1] == b"*":
            return [self.reply() for _ in range(int(line[1:]))]
        return line

c = Conn(sys.argv[1])
N = 20000
for base in range(0, N, 1000):
    args = [b"MSET"]
    for i in range(base, base + 1000):
        args += [b"k%d" % i, b"v%d" % (i * 7)]
    c.s.sendall(resp(*args))
    assert c.reply() == b"+OK"
# A pipeline still in flight while the server is dumped: answers queued.
c.s.sendall(b"".join(resp(b"GET", b"k%d" % i) for i in range(100)))
print("loaded", flush=True)
sys.stdin.readline()
for i in range(100):
    got = c.reply()
    assert got == b"v%d" % (i * 7), (i, got)
for base in range(0, N, 1000):
    c.s.sendall(resp(b"MGET", *[b"k%d" % i for i in range(base, base + 1000)]))
    got = c.reply()
    assert got == [b"v%d" % (i * 7) for i in range(base, base + 1000)], base
c.s.sendall(resp(b"SET", b"after", b"restore"))
assert c.reply() == b"+OK"
print("PASS", flush=True)
'''


def test_redis_keeps_its_tcp_client(net, workdir, workloads):
    """redis-server with a client connected over TCP (from another
    namespace) and a pipeline of requests in flight: dumped and restored
    twice, the same connection then reads every answer and every key."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 9)
    w = Workload(net.enter(s, ["redis-server", "--port", "6379", "--bind", NET4.format(9, 2),
                               "--save", "", "--appendonly", "no", "--protected-mode", "no",
                               "--dir", workdir]), workdir, "redis")
    workloads.append(w)
    end = time.monotonic() + 30
    while "Ready to accept connections" not in w.log() and time.monotonic() < end:
        time.sleep(0.05)
    client = subprocess.Popen(net.enter(c, [sys.executable, "-c", REDIS_CLIENT,
                                            NET4.format(9, 2)]),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "loaded", client.stderr.read()
        for i in range(2):
            images = os.path.join(workdir, f"img{i}")
            dump(net, s, w, images, "--tcp-established")
            restore(net, s, w, images)
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=120)
        assert "PASS" in out, f"{out}\n{err}"
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()


def test_client_with_unacknowledged_data(net, workdir, workloads):
    """The server's ACKs are dropped for a moment (a table of the test's
    own in the server's namespace), so the client's send queue holds bytes
    sent but never acknowledged when it is dumped: they come back as sent
    and are retransmitted once the drop is gone."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 10)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    # a window the echo never fills: the client keeps sending while the ACKs
    # are dropped (with the default window it may have stopped, everything
    # acknowledged, waiting for echoes the drop holds back)
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(10, 2), "7000", "2",
                   str(1 << 30))
    drop = (f"table ip {PREFIX}test {{\n chain out {{\n type filter hook output priority 0;"
            f" policy accept;\n ip daddr {NET4.format(10, 1)} drop\n }}\n}}\n")
    subprocess.run(net.enter(s, ["nft", "-f", "-"]), input=drop, text=True, check=True)
    time.sleep(0.5)
    images = os.path.join(workdir, "img")
    dump(net, c, client, images, "--tcp-established")
    subprocess.run(net.enter(s, ["nft", "delete", "table", "ip", f"{PREFIX}test"]), check=True)
    with open(os.path.join(images, "dump.log")) as f:
        lines = [line for line in f if "not acknowledged" in line]
    sent_unacked = [line for line in lines
                    if int(line.split(" not acknowledged")[0].rsplit(" ", 1)[1]) >
                    int(line.split("(")[-1].split(" ")[0])]
    assert sent_unacked, "".join(lines)
    restore(net, c, client, images)
    _progress(client)
    client.assert_pass()
    server.assert_pass()


def test_connecting_socket_refused(net, workdir, workloads):
    """A connection still being made (SYN_SENT, to an address nobody has)
    is refused by name, and the process goes on."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 11)
    w = Workload(net.enter(c, [sys.executable, "-c", f"""
import socket, time
s = socket.socket(); s.setblocking(False)
s.connect_ex(("{NET4.format(11, 3)}", 9))
print("READY", flush=True)
time.sleep(120)
"""]), workdir, "connecting")
    workloads.append(w)
    w.wait_ready()
    p = net.migrate(c, "dump", "-t", str(w.pid), "-D", os.path.join(workdir, "img"),
                    "--tcp-established")
    assert p.returncode == 1 and "SYN_SENT" in p.stderr, p.stderr
    assert f"{NET4.format(11, 1)}:" in p.stderr, p.stderr
    assert net.tables(c) == []
    assert alive(w.pid)


def test_lock_by_nft_without_libnftables(net):
    """Where libnftables.so.1 cannot be loaded the lock is set and lifted by
    running `nft` (the same table); in-process otherwise (every other test)."""
    c = net.ns("c")
    prog = """
import socket, sys
from migrate.kernel import nftables
nftables.LIBRARY = "libnftables-missing.so.1"
from migrate.resources import netlock
assert not nftables.available()
conns = [netlock.Conn(socket.AF_INET, "10.231.12.1", 4000 + i, "10.231.12.2", 7000)
         for i in range(3)] + [netlock.Conn(socket.AF_INET6, "fd00::1", 1, "fd00::2", 2)]
lk = netlock.lock(4242, conns, None)
assert lk.backend == "nftables"
print("SET", netlock.exists(4242), flush=True)
sys.stdin.readline()
lk.unlock()
print("LIFTED", netlock.exists(4242), flush=True)
"""
    p = subprocess.Popen(net.enter(c, [sys.executable, "-c", prog]), cwd=ROOT, env=ENV,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "SET ['nft table inet migrate-4242']"
        listed = subprocess.run(net.enter(c, ["nft", "list", "table", "inet", "migrate-4242"]),
                                capture_output=True, text=True, check=True).stdout
        assert "10.231.12.2 . 7000 . 10.231.12.1 . 4001" in listed, listed
        out, err = p.communicate("\n", timeout=30)
        assert p.returncode == 0, err
        assert out.strip() == "LIFTED []"
        assert net.tables(c) == []
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_armed_lock_is_taken_or_removed(net):
    """netlock.arm (before a freeze, or a migration's restore): the table
    hooked with its sets empty; lock() takes it and only adds the
    connections (no rule twice); an armed table nobody took is removed by
    disarm (and lock() with no connection removes it too)."""
    c = net.ns("c")
    prog = """
import socket, subprocess, sys
from migrate.resources import netlock
def listed():
    return subprocess.run(["nft", "list", "table", "inet", "migrate-4244"],
                          capture_output=True, text=True).stdout
netlock.arm(4244, None)
armed = listed()
assert "hook input" in armed and "conns4" in armed and "elements" not in armed, armed
lk = netlock.lock(4244, [netlock.Conn(socket.AF_INET, "10.231.12.1", 4000, "10.231.12.2",
                                      7000)], None)
held = listed()
assert "10.231.12.2 . 7000 . 10.231.12.1 . 4000" in held, held
assert held.count("@conns4 drop") == 2 and held.count("@conns6 drop") == 2, held
lk.unlock()
assert netlock.exists(4244) == []
netlock.arm(4244, None)
netlock.disarm(4244)
assert netlock.exists(4244) == []
netlock.arm(4244, None)
assert netlock.lock(4244, [], None) is None and netlock.exists(4244) == []
print("OK", flush=True)
"""
    p = subprocess.run(net.enter(c, [sys.executable, "-c", prog]), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout, p.stdout


def test_lock_sets_only_the_families_locked(net):
    """The lock makes the set and rules of a family only once it locks one
    of its connections (each costs the frozen time): IPv4 only at first,
    then an IPv6 connection the first look missed adds its own."""
    c = net.ns("c")
    prog = """
import socket, subprocess, sys
from migrate.resources import netlock
def listed():
    return subprocess.run(["nft", "list", "table", "inet", "migrate-4243"],
                          capture_output=True, text=True, check=True).stdout
lk = netlock.lock(4243, [netlock.Conn(socket.AF_INET, "10.231.12.1", 4000, "10.231.12.2",
                                      7000)], None)
first = listed()
assert "conns4" in first and "conns6" not in first, first
lk.add([netlock.Conn(socket.AF_INET6, "fd00::1", 1, "fd00::2", 2)])
both = listed()
assert "10.231.12.2 . 7000 . 10.231.12.1 . 4000" in both, both
assert "fd00::2 . 2 . fd00::1 . 1" in both and "@conns6 drop" in both, both
assert both.count("@conns4 drop") == 2 and both.count("@conns6 drop") == 2, both
lk.unlock()
print("OK", netlock.exists(4243), flush=True)
"""
    p = subprocess.run(net.enter(c, [sys.executable, "-c", prog]), cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "OK []"
    assert net.tables(c) == []


def test_client_through_page_server(net, workdir, workloads):
    """The queues cross to a page server (tcp-queues.img sent like any
    image file, checked by the inventory there) and come back from it."""
    c, s = net.ns("c"), net.ns("s")
    net.link(c, s, 13)
    server = start(net, s, workdir, workloads, "tcpecho", "7000")
    client = start(net, c, workdir, workloads, "tcpstream", NET4.format(13, 2), "7000", "2")
    _progress(client)
    root = os.path.join(workdir, "srv")
    r, w = os.pipe()
    ps = subprocess.Popen(net.enter(c, [sys.executable, "-m", "migrate", "page-server", "-D",
                                        root, "--address", "127.0.0.1", "--port", "7100",
                                        "--no-tls", "--status-fd", str(w), "-v4", "-o",
                                        os.path.join(workdir, "ps.log")]),
                          cwd=ROOT, env=ENV, pass_fds=(w,), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        assert os.read(r, 1) == b"\0", ps.stderr.read()
        os.close(r)
        images = os.path.join(workdir, "img")
        dump(net, c, client, images, "--tcp-established", "--page-server", "--address",
             "127.0.0.1", "--port", "7100", "--no-tls")
        assert ps.wait(60) == 0          # one session, then exit
    finally:
        if ps.poll() is None:
            ps.kill()
            ps.wait()
    assert os.path.getsize(os.path.join(root, "tcp-queues.img")) > 16
    p = net.migrate(c, "show", root, "--verify")
    assert p.returncode == 0, p.stderr
    restore(net, c, client, root)
    _progress(client)
    client.assert_pass()
    server.assert_pass()
