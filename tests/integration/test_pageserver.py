"""The page-server end to end: the real `migrate page-server` (started here on
127.0.0.1 through --ps-socket, certificates made by `migrate certs`), real
dumps through it, restores from its directory, and every failure case of
issue 4: disconnects, garbage, lying lengths, huge counts, foreign, expired
and missing certificates, plaintext to TLS, disk full, a fuzz of 10,000
malformed messages while a good session completes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import os
import random
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest

from migrate import errors
from migrate.images._pb import inventory_pb2, pstree_pb2
from migrate.pageserver import certs, tls
from migrate.pageserver import protocol as P
from migrate.images import imgfile
from migrate.pageserver.client import PageServerReader, PageServerSink
from tests.integration.harness import ROOT, Workload, alive, migrate
from tests.unit.test_protocol import malformed_frames


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    good = os.path.join(d, "ca")
    migrate("certs", "init", good, check=True)
    p = migrate("certs", "issue", good, "localhost", check=True)
    assert "--tls-cert" in p.stdout
    other = os.path.join(d, "other")
    certs.init(other, name="another CA")
    certs.issue(other, "localhost")
    now = datetime.datetime.now(datetime.timezone.utc)
    # signed by the good CA, but expired yesterday
    certs.issue(good, "127.0.0.1", not_before=now - datetime.timedelta(days=10),
                not_after=now - datetime.timedelta(days=1))
    return {"good": good, "other": other}


def tls_args(d: str, host: str = "localhost") -> list[str]:
    p = certs.paths(d, host)
    return ["--tls-cacert", p["cacert"], "--tls-cert", p["cert"], "--tls-key", p["key"]]


def client_ctx(d: str, host: str = "localhost") -> ssl.SSLContext:
    p = certs.paths(d, host)
    return tls.client_context(p["cacert"], p["cert"], p["key"])


class Server:
    """`migrate page-server` on a socket we bound (no port race), ready when
    it writes \\0 on --status-fd."""

    def __init__(self, root: str, log: str, *args: str) -> None:
        self.root, self.log_path = root, log
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(1024)
        self.port = self.lsock.getsockname()[1]
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "page-server", "-D", root,
             "--ps-socket", str(self.lsock.fileno()), "--status-fd", str(w), "-v4",
             "-o", log, *args],
            cwd=ROOT, pass_fds=(self.lsock.fileno(), w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(w)
        ok = os.read(r, 1)
        os.close(r)
        self.lsock.close()
        assert ok == b"\0", f"page-server did not start:\n{self.log()}"

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return self.proc.stderr.read().decode() if self.proc.poll() is not None else ""

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def servers():
    started: list[Server] = []
    yield started
    for s in started:
        s.stop()


def start(name, workdir, workloads, *args):
    w = Workload.program(name, workdir, *args)
    workloads.append(w)
    w.wait_ready()
    return w


def dump_via(w: Workload, workdir: str, srv: Server, session: str, *extra: str):
    logs = os.path.join(workdir, f"logs-{session.replace('/', '_')}")
    return w.dump(logs, "--page-server", "--address", "127.0.0.1", "--port", str(srv.port),
                  "--session", session, *extra)


# ------------------------------------------------------------------ good paths

def test_dump_restore_through_tls_server(tmp_path, workdir, workloads, pki, servers):
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    for prog in ("mem_vmas", "signals"):
        w = start(prog, workdir, workloads)
        dump_via(w, workdir, srv, f"host1/{prog}", *tls_args(pki["good"]))
        img = os.path.join(root, "host1", prog)
        assert os.path.exists(os.path.join(img, "inventory.img"))
        migrate("show", img, "--verify", check=True)
        w.restore(img)
        w.assert_pass()
    assert "client certificate CN=localhost" in srv.log()
    assert srv.stop() == 0
    assert "stopped after 2 sessions" in srv.log()


def test_single_session_then_exit_plaintext(tmp_path, workdir, workloads, servers):
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--no-tls")
    servers.append(srv)
    w = start("counter", workdir, workloads)
    dump_via(w, workdir, srv, "whatever", "--no-tls")
    with open(os.path.join(workdir, "logs-whatever", "dump.log")) as f:
        assert "--no-tls: the image crosses the network in plaintext" in f.read()
    assert srv.proc.wait(30) == 0          # one session, then exit, like criu
    w.restore(root)
    w.assert_pass()


def test_eight_concurrent_sessions(tmp_path, workdir, workloads, pki, servers):
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    ws = [start("mem_vmas", workdir, workloads) for _ in range(8)]
    # Half of them on 3 streams (and some compressed): 20 connections share
    # the server's 6 receive buffers.
    extra = [(), ("--ps-streams", "3"), (), ("--ps-streams", "3", "--compress")] * 2
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda iw: dump_via(iw[1], workdir, srv, f"c{iw[0]}", *extra[iw[0]],
                                        *tls_args(pki["good"])), enumerate(ws)))
    for i, w in enumerate(ws):
        w.restore(os.path.join(root, f"c{i}"))
    for w in ws:
        w.assert_pass()
    print(f"\npage-server peak RSS with 8 concurrent sessions: {srv.rss_kib() // 1024} MiB")


def _runs(image: str, pid: int):
    """(vaddr, nr_pages, flags) of every pagemap entry of pid in ``image``."""
    d = imgfile.ImageDir.open(image)
    return [(e.vaddr, e.nr_pages, e.flags) for e in d.read_image(f"pagemap-{pid}.img")[1:]]


def _gets(runs, limit=P.MAX_GET_PAGES):
    """GET requests covering ``runs``, cut at ``limit`` pages (and odd sizes)."""
    out = []
    for vaddr, nr, _ in runs:
        done = 0
        while done < nr:
            n = min(nr - done, limit, 1 + (done * 7) % 613)
            out.append((vaddr + done * P.PAGE_SIZE, n))
            done += n
    return out


def _local_pages(image: str, pid: int, runs) -> dict[int, bytes]:
    """Page by page, what the image on disk holds (read without the server)."""
    d = imgfile.ImageDir.open(image)
    pages = {}
    with open(os.path.join(image, f"pages-{pid}.img"), "rb") as f:
        at = imgfile.PAGES_DATA_OFFSET
        for vaddr, nr, flags in runs:
            if flags & imgfile.PE_PRESENT:
                f.seek(at)
                data = f.read(nr * P.PAGE_SIZE)
                at += nr * P.PAGE_SIZE
                for i in range(nr):
                    pages[vaddr + i * P.PAGE_SIZE] = data[i * P.PAGE_SIZE:(i + 1) * P.PAGE_SIZE]
    d.verify_all()
    return pages


def test_streams_and_zstd_then_get_matches_the_image(tmp_path, workdir, workloads, pki,
                                                     servers):
    """A dump over 3 TLS streams with zstd; then a read session GETs every
    page of it back and compares with the image read from disk; then the
    image restores and the program checks itself."""
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    w = start("mem_vmas", workdir, workloads)
    dump_via(w, workdir, srv, "multi", "--ps-streams", "3", "--compress",
             *tls_args(pki["good"]))
    img = os.path.join(root, "multi")
    log = srv.log()
    assert "3 streams, zstd" in log and "as stream 2 of 3" in log, log[-3000:]
    runs = _runs(img, w.pid)
    local = _local_pages(img, w.pid, runs)
    assert local
    reqs = [(vaddr, n) for vaddr, n in _gets(runs)
            if all(vaddr + i * P.PAGE_SIZE in local for i in range(n))]
    r = PageServerReader("127.0.0.1", srv.port, "multi", ssl_context=client_ctx(pki["good"]))
    got = r.get_many([(w.pid, vaddr, n) for vaddr, n in reqs])
    r.close()
    assert len(reqs) > 10
    for (vaddr, n), data in zip(reqs, got):
        want = b"".join(local[vaddr + i * P.PAGE_SIZE] for i in range(n))
        assert data == want, f"pages at {vaddr:#x} +{n} differ"
    # A page that is not in the image ends the read session with NOT_FOUND.
    r = PageServerReader("127.0.0.1", srv.port, "multi", ssl_context=client_ctx(pki["good"]))
    with pytest.raises(errors.PageServerError, match="NOT_FOUND"):
        r.get(w.pid, 0x1000, 1)
    r.close()
    w.restore(img)
    w.assert_pass()


def _biggest_anon(pid: int) -> tuple[int, int]:
    best = (0, 0)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) == 5 and "rw" in fields[1]:
                a, b = (int(x, 16) for x in fields[0].split("-"))
                if b - a > best[1] - best[0]:
                    best = (a, b)
    return best


def test_read_session_follows_the_parent_chain(tmp_path, workdir, workloads, servers):
    """pre-dump, dirty 1% of the pages, dump on top of it through the server;
    GETs of the dump then hold pages from both images, and equal the
    process's memory (it is left running, unchanged)."""
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", "--no-tls")
    servers.append(srv)
    w = start("memhog", workdir, workloads, "32")
    chain = os.path.join(root, "chain")
    # The client's -D keeps the log and a copy of the metadata (no pages):
    # --prev-images-dir ../pre0 finds the parent's pagemaps there.
    local = str(tmp_path / "src")
    p = migrate("pre-dump", "-t", str(w.pid), "-D", os.path.join(local, "pre0"),
                "--page-server", "--address", "127.0.0.1", "--port", str(srv.port),
                "--session", "chain/pre0", "--no-tls")
    assert p.returncode == 0, p.stderr
    _dirty(w)
    assert not any(n.startswith("pages-") for n in os.listdir(os.path.join(local, "pre0")))
    w.dump(os.path.join(local, "d1"), "-R", "--prev-images-dir", "../pre0",
           "--page-server", "--address", "127.0.0.1", "--port", str(srv.port),
           "--session", "chain/d1", "--no-tls")
    runs = _runs(os.path.join(chain, "d1"), w.pid)
    assert any(f & imgfile.PE_IN_PARENT for _, _, f in runs)
    assert any(f & imgfile.PE_PRESENT for _, _, f in runs)
    lo, hi = _biggest_anon(w.pid)
    assert hi - lo >= 32 << 20
    inside = [(max(v, lo), (min(v + n * P.PAGE_SIZE, hi) - max(v, lo)) // P.PAGE_SIZE, f)
              for v, n, f in runs if v < hi and v + n * P.PAGE_SIZE > lo]
    reqs = _gets(inside)
    r = PageServerReader("127.0.0.1", srv.port, "chain/d1")
    got = r.get_many([(w.pid, v, n) for v, n in reqs])
    r.close()
    with open(f"/proc/{w.pid}/mem", "rb", buffering=0) as mem:
        for (v, n), data in zip(reqs, got):
            mem.seek(v)
            assert data == mem.read(n * P.PAGE_SIZE), f"pages at {v:#x} +{n} differ"
    assert sum(n for _, n in reqs) >= (32 << 20) // P.PAGE_SIZE
    w.assert_pass()


def test_revoked_certificate_is_refused(tmp_path, workdir, workloads, pki, servers):
    ca = str(tmp_path / "ca")
    migrate("certs", "init", ca, check=True)
    migrate("certs", "issue", ca, "localhost", check=True)
    migrate("certs", "issue", ca, "client2", check=True)
    crl = migrate("certs", "revoke", ca, "client2", check=True).stdout.strip()
    assert os.path.isfile(crl)
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(ca),
                 "--tls-cacrl", crl)
    servers.append(srv)
    p = certs.paths(ca, "client2")
    revoked = tls.client_context(p["cacert"], p["cert"], p["key"])
    with pytest.raises(errors.PageServerError):
        PageServerSink("127.0.0.1", srv.port, "revoked", ssl_context=revoked)
    # The server still takes a client whose certificate is not revoked.
    w = start("signals", workdir, workloads)
    dump_via(w, workdir, srv, "good", *tls_args(ca), "--tls-cacrl", crl)
    w.restore(os.path.join(root, "good"))
    w.assert_pass()
    time.sleep(0.5)
    assert "certificate revoked" in srv.log(), srv.log()[-3000:]
    assert not os.path.exists(os.path.join(root, "revoked", "inventory.img"))


def test_bad_joins_bad_zstd_and_a_bad_chunk_on_a_joined_stream(tmp_path, pki, servers):
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    good = client_ctx(pki["good"])
    # A JOIN with a token no session has.
    s = _raw_tls(srv, good)
    s.sendall(P.Connection(P.Role.CLIENT).send(P.Join(b"x" * 16, 1)))
    conn = P.Connection(P.Role.CLIENT)
    conn.state = P.State.AWAIT_WELCOME_JOIN
    s.settimeout(10)
    data = b""
    while chunk := s.recv(1 << 16):
        data += chunk
    s.close()
    conn.receive_data(data)
    ev = conn.next_event()
    assert isinstance(ev, P.Error) and ev.code == P.Code.NOT_FOUND
    # A JOIN for a stream number the session was not granted.
    s = _raw_tls(srv, good)
    conn = P.Connection(P.Role.CLIENT)
    s.sendall(conn.send(P.Hello("granted3", streams=3, caps=P.CAP_STREAMS)))
    s.settimeout(10)
    while (welcome := conn.next_event()) is P.NEED_DATA:
        conn.receive_data(s.recv(1 << 16))
    assert isinstance(welcome, P.Welcome) and welcome.streams == 3
    s2 = _raw_tls(srv, good)
    s2.sendall(P.Connection(P.Role.CLIENT).send(P.Join(welcome.token, 5)))
    joined = P.Connection(P.Role.CLIENT)
    joined.state = P.State.AWAIT_WELCOME_JOIN
    s2.settimeout(10)
    data = b""
    while chunk := s2.recv(1 << 16):
        data += chunk
    joined.receive_data(data)
    ev = joined.next_event()
    assert isinstance(ev, P.Error) and ev.code == P.Code.BUSY, ev
    s2.close()
    s.close()
    # A chunk whose digest is wrong, on the second of two streams: the whole
    # session fails and leaves nothing that looks complete.
    sink = PageServerSink("127.0.0.1", srv.port, "twostreams", ssl_context=good, streams=2)
    assert len(sink.extra) == 1
    sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=1)])
    sink.pages_writer(1)
    with pytest.raises(errors.PageServerError, match="CHECKSUM"):
        sink.extra[0].send(P.PageChunk(1, 0, 1, bytes(16), b"x" * 4096))
        sink.commit(inventory_pb2.inventory_entry(root_pid=1))
    sink.close()
    # zstd frames that lie: garbage, a declared size other than the chunk's.
    import zstandard
    for data, why in [(b"\x28\xb5\x2f\xfd" + os.urandom(200), "zstd frame"),
                      (zstandard.ZstdCompressor().compress(bytes(8192)), "does not declare")]:
        sink = PageServerSink("127.0.0.1", srv.port, "zbad", ssl_context=good, compress=True)
        assert sink.compress
        sink.pages_writer(1)
        with pytest.raises(errors.PageServerError, match="PROTOCOL"):
            sink._send_chunk(P.PageChunk(1, 0, 1, bytes(16), data, compressed=True))
            sink.commit(inventory_pb2.inventory_entry(root_pid=1))
        sink.close()
        time.sleep(0.2)
        assert why in srv.log()
    time.sleep(0.5)
    log = srv.log()
    assert "no open session has this token" in log
    assert "stream 1" in log and "on arrival" in log
    assert not os.path.exists(os.path.join(root, "twostreams", "inventory.img"))
    assert srv.proc.poll() is None


# ------------------------------------------------------------------ bad input

def _raw_tls(srv: Server, ctx: ssl.SSLContext | None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    return ctx.wrap_socket(s, server_hostname="localhost") if ctx else s


def _read_events(sock: socket.socket, timeout: float = 10) -> list:
    conn = P.Connection(P.Role.CLIENT)
    conn.state = P.State.AWAIT_WELCOME_WRITE   # we sent HELLO by hand
    sock.settimeout(timeout)
    out = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        conn.receive_data(data)
        while True:
            ev = conn.next_event()
            if ev is P.NEED_DATA:
                break
            if isinstance(ev, P.ConnectionClosed):
                return out
            out.append(ev)
            if isinstance(ev, P.Error):
                return out


def _hello(name: str) -> bytes:
    return P.Connection(P.Role.CLIENT).send(P.Hello(name))


def test_bad_clients_are_closed_and_others_keep_going(tmp_path, workdir, workloads, pki,
                                                      servers):
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    good = client_ctx(pki["good"])

    # A client that disconnects mid-session: nothing that looks complete.
    sink = PageServerSink("127.0.0.1", srv.port, "cut", ssl_context=good)
    sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=1)])
    pw = sink.pages_writer(1)
    pw.write_chunk(0, memoryview(bytes(8 << 20)))
    sink.sock.close()

    # Garbage, a lying length, a huge count, an escaping name.
    cases = {
        # random bytes after a type byte no message has (random alone may start
        # with a valid type and be refused for another reason)
        "garbage": bytes([0xEE]) + os.urandom(3999),
        "lying length": _hello("lie") + struct.pack("<BBHI", 6, 0, 0, 0x7FFFFFFF),
        "huge count": _hello("huge") + struct.pack("<BBHI", 6, 0, 0, 4128) +
        struct.pack("<IIII16s", 7, 0, 0xFFFFFFFF, 0, bytes(16)) + bytes(4096),
        "escaping name": struct.pack("<BBHI", 1, 0, 0, 17) +
        struct.pack("<4sHBBI", b"MGPS", 1, 1, 0, 0) + b"../..",
    }
    answers = {}
    for what, data in cases.items():
        s = _raw_tls(srv, good)
        s.sendall(data)
        answers[what] = [e for e in _read_events(s) if isinstance(e, P.Error)]
        s.close()
    assert answers["lying length"][0].code == P.Code.PROTOCOL
    assert "payload length 2147483647" in answers["lying length"][0].text
    assert "nr_pages 4294967295" in answers["huge count"][0].text
    assert answers["escaping name"][0].code == P.Code.BAD_NAME

    # A chunk whose data does not match its digest.
    sink = PageServerSink("127.0.0.1", srv.port, "digest", ssl_context=good)
    sink.pages_writer(1)
    with pytest.raises(errors.PageServerError, match="CHECKSUM"):
        sink._send(P.PageChunk(1, 0, 1, bytes(16), b"x" * 4096))
        sink.commit(inventory_pb2.inventory_entry(root_pid=1))
    sink.close()

    # Certificates: another CA, expired; plaintext to a TLS server.
    with pytest.raises(errors.PageServerError, match="TLS handshake failed"):
        PageServerSink("127.0.0.1", srv.port, "x", ssl_context=client_ctx(pki["other"]))
    p = certs.paths(pki["good"], "127.0.0.1")
    expired = tls.client_context(p["cacert"], p["cert"], p["key"])
    with pytest.raises(errors.PageServerError):
        PageServerSink("127.0.0.1", srv.port, "x", ssl_context=expired)
    with pytest.raises(errors.PageServerError):
        PageServerSink("127.0.0.1", srv.port, "x")

    # A second session with the name of a live one is refused.
    a = PageServerSink("127.0.0.1", srv.port, "busy", ssl_context=good)
    with pytest.raises(errors.PageServerError, match="BUSY"):
        PageServerSink("127.0.0.1", srv.port, "busy", ssl_context=good)
    a.discard()

    # The server still serves a real dump.
    w = start("signals", workdir, workloads)
    dump_via(w, workdir, srv, "after", *tls_args(pki["good"]))
    w.restore(os.path.join(root, "after"))
    w.assert_pass()

    time.sleep(0.5)
    log = srv.log()
    for line in ("session 'cut': ended before its commit", "unknown message type",
                 "payload length 2147483647", "nr_pages 4294967295",
                 "'..' component", "on arrival",
                 "TLS handshake failed", "is in use by another connection"):
        assert line in log, f"{line!r} not in the server log:\n{log[-4000:]}"
    assert "(certificate has expired)" in log
    assert "WRONG_VERSION_NUMBER" in log          # plaintext to a TLS server
    for dirpath, _, files in os.walk(root):
        if os.path.basename(dirpath) != "after":
            assert "inventory.img" not in files, dirpath
    assert not os.path.exists(os.path.join(root, "cut"))
    assert srv.proc.poll() is None


def test_disk_full_on_server(tmp_path, workdir, workloads, pki, servers, mounts):
    root = mounts(str(tmp_path / "tiny"), "size=2m")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    w = start("mem_vmas", workdir, workloads)
    logs = os.path.join(workdir, "logs")
    p = migrate("dump", "-t", str(w.pid), "-D", logs, "--page-server", "--address",
                "127.0.0.1", "--port", str(srv.port), "--session", "full",
                *tls_args(pki["good"]))
    assert p.returncode == 1
    assert "NO_SPACE" in p.stderr and "No space left on device" in p.stderr, p.stderr
    assert "left running" in p.stderr
    assert alive(w.pid)
    assert not os.path.exists(os.path.join(root, "full", "inventory.img"))
    w.assert_pass()
    assert srv.proc.poll() is None


# ------------------------------------------------------------------ fuzz

async def _fuzz(port: int, frames, concurrency: int = 48) -> dict:
    sem = asyncio.Semaphore(concurrency)
    result = {"refused": 0, "closed": 0, "other": 0}

    async def one(i: int, frame: bytes) -> None:
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(_hello(f"fz/{i}") + frame)
            await w.drain()
            w.write_eof()
            data = await asyncio.wait_for(r.read(), 30)
            w.close()
            conn = P.Connection(P.Role.CLIENT)
            conn.state = P.State.AWAIT_WELCOME_WRITE
            conn.receive_data(data)
            conn.receive_data(b"")
            evs = []
            while not isinstance(ev := conn.next_event(), P.ConnectionClosed):
                evs.append(ev)
            if evs and isinstance(evs[-1], P.Error):
                result["refused"] += 1
            elif not data:
                result["closed"] += 1
            else:
                result["other"] += 1

    await asyncio.gather(*(one(i, f) for i, (_, f) in enumerate(frames)))
    return result


def test_fuzz_live_server_10000_malformed(tmp_path, workdir, workloads, servers, capsys,
                                         record_property):
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", "--no-tls", "-v2")
    servers.append(srv)
    frames = list(malformed_frames(random.Random(44), 10_000))
    w = start("mem_vmas", workdir, workloads)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        good = ex.submit(dump_via, w, workdir, srv, "good", "--no-tls")
        t = time.monotonic()
        res = asyncio.run(_fuzz(srv.port, frames))
        dt = time.monotonic() - t
        good.result()
    w.restore(os.path.join(root, "good"))
    w.assert_pass()
    # still serving at the end
    sink = PageServerSink("127.0.0.1", srv.port, "end")
    sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=1)])
    sink.commit(inventory_pb2.inventory_entry(root_pid=1))
    rss = srv.rss_kib() // 1024
    record_property("live_fuzz", res)
    with capsys.disabled():
        print(f"\nlive page-server fuzz: {res['refused']} of {len(frames)} malformed "
              f"messages refused with ERROR ({res}), {dt:.1f} s; a concurrent dump "
              f"committed and restored (PASS); server still serving; peak RSS {rss} MiB")
    assert res["refused"] == len(frames) == 10_000
    for dirpath, _, files in os.walk(os.path.join(root, "fz")):
        assert "inventory.img" not in files
    assert srv.proc.poll() is None


# ------------------------------------------------------------------ chains, flags

def _dirty(w: Workload) -> None:
    """memhog rewrites 1% of its pages on SIGUSR1 and says DIRTIED."""
    w.usr1("DIRTIED")


def test_pre_dump_chain_through_tls_server_restores(tmp_path, workdir, workloads, pki,
                                                     servers):
    """pre-dump, pre-dump, dump, all through a TLS page-server, the memory
    dirtied in between; the server's last image (parent -> parent) restores
    and the program checks every page of its own."""
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    w = start("memhog", workdir, workloads, "48")
    local = str(tmp_path / "src")
    ps = ["--page-server", "--address", "127.0.0.1", "--port", str(srv.port),
          *tls_args(pki["good"])]
    for i in range(2):
        prev = ["--prev-images-dir", f"../pre{i - 1}"] if i else []
        p = migrate("pre-dump", "-t", str(w.pid), "-D", os.path.join(local, f"pre{i}"),
                    "--session", f"chain/pre{i}", *prev, *ps)
        assert p.returncode == 0, p.stderr
        _dirty(w)
    w.dump(os.path.join(local, "final"), "--prev-images-dir", "../pre1",
           "--session", "chain/final", *ps)
    chain = os.path.join(root, "chain")
    assert os.readlink(os.path.join(chain, "final", "parent")) == "../pre1"
    assert os.readlink(os.path.join(chain, "pre1", "parent")) == "../pre0"
    for d in ("pre0", "pre1", "final"):
        migrate("show", os.path.join(chain, d), "--verify", check=True)
        # the client's -D holds the metadata and the log, never the pages
        assert not any(n.startswith("pages-") for n in os.listdir(os.path.join(local, d)))
    runs = _runs(os.path.join(chain, "final"), w.pid)
    assert any(f & imgfile.PE_IN_PARENT for _, _, f in runs)
    w.restore(os.path.join(chain, "final"))
    w.assert_pass()
    assert srv.log().count("committed") >= 3


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_daemon_pidfile_address_port(tmp_path, workdir, workloads):
    """criu's flags: -d returns once the server listens on --address/--port,
    --pidfile names the daemon (relative to -D); the daemon serves a dump
    and stops on SIGTERM."""
    root = str(tmp_path / "srv")
    port = _free_port()
    log = str(tmp_path / "ps.log")
    p = migrate("page-server", "-D", root, "--address", "127.0.0.1", "--port", str(port),
                "-d", "--pidfile", "ps.pid", "--serve", "--no-tls", "-v3", "-o", log)
    assert p.returncode == 0, p.stderr
    with open(os.path.join(root, "ps.pid")) as f:
        pid = int(f.read())
    try:
        assert alive(pid)
        with open(f"/proc/{pid}/stat") as f:     # its own session, parent gone
            assert int(f.read().rsplit(")", 1)[1].split()[3]) != os.getpid()
        w = start("signals", workdir, workloads)
        w.dump(os.path.join(workdir, "logs"), "--page-server", "--address", "127.0.0.1",
               "--port", str(port), "--session", "d1", "--no-tls")
        w.restore(os.path.join(root, "d1"))
        w.assert_pass()
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not alive(pid)
    with open(log) as f:
        text = f.read()
    assert f"listening on 127.0.0.1:{port}" in text and "stopped after 1 session" in text, \
        text[-3000:]


def test_cn_verify_and_tls_no_cn_verify(tmp_path, workdir, workloads, servers):
    """A server whose certificate names another host: the client refuses it
    unless --tls-no-cn-verify (the CA is still checked)."""
    ca = str(tmp_path / "ca")
    migrate("certs", "init", ca, check=True)
    migrate("certs", "issue", ca, "elsewhere.example", check=True)
    migrate("certs", "issue", ca, "localhost", check=True)
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve",
                 *tls_args(ca, "elsewhere.example"))
    servers.append(srv)
    w = start("signals", workdir, workloads)
    p = migrate("dump", "-t", str(w.pid), "-D", str(tmp_path / "logs"), "--page-server",
                "--address", "127.0.0.1", "--port", str(srv.port), "--session", "cn",
                *tls_args(ca))
    assert p.returncode == 1
    assert "TLS" in p.stderr and "127.0.0.1" in p.stderr, p.stderr
    assert alive(w.pid)
    w.dump(str(tmp_path / "logs2"), "--page-server", "--address", "127.0.0.1",
           "--port", str(srv.port), "--session", "cn", "--tls-no-cn-verify", *tls_args(ca))
    w.restore(os.path.join(root, "cn"))
    w.assert_pass()


def test_incomplete_session_is_not_restorable(tmp_path, workdir, workloads, pki, servers):
    """A session cut before its commit, into the directory of an image
    committed earlier: the old inventory is gone from its start, so the
    restore refuses what is left; and a directory with files but no
    inventory (what a crash of the server would leave) is refused too."""
    root = str(tmp_path / "srv")
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", *tls_args(pki["good"]))
    servers.append(srv)
    w = start("signals", workdir, workloads)
    dump_via(w, workdir, srv, "again", "-R", *tls_args(pki["good"]))
    img = os.path.join(root, "again")
    migrate("show", img, "--verify", check=True)
    sink = PageServerSink("127.0.0.1", srv.port, "again", ssl_context=client_ctx(pki["good"]))
    pw = sink.pages_writer(w.pid)
    pw.write_chunk(0, memoryview(bytes(1 << 20)))
    sink.sock.close()
    deadline = time.monotonic() + 30
    while "session 'again': ended before its commit" not in srv.log():
        assert time.monotonic() < deadline, srv.log()[-3000:]
        time.sleep(0.05)
    assert os.path.isdir(img) and not os.path.exists(os.path.join(img, "inventory.img"))
    half = os.path.join(root, "half")
    os.makedirs(half)
    with open(os.path.join(half, "pstree.img"), "wb") as f:
        f.write(b"\0" * 64)
    for d in (img, half):
        p = migrate("restore", "-D", d, "-d")
        assert p.returncode != 0
        assert "inventory" in p.stderr, p.stderr
    assert alive(w.pid)       # dumped with -R: still running, as before
    w.assert_pass()


def test_version_names_and_the_session_checksum(tmp_path, servers):
    """What the server checks beyond the framing: the protocol version, a
    session directory or parent link that resolves outside -D (a symlink
    planted there), and at COMMIT the session checksum: every file listed
    in the inventory received whole with its size and xxh3-128, nothing
    received that is not listed. Each refusal leaves no inventory."""
    root = str(tmp_path / "srv")
    os.makedirs(root)
    os.symlink(str(tmp_path), os.path.join(root, "planted"))
    srv = Server(root, str(tmp_path / "ps.log"), "--serve", "--no-tls")
    servers.append(srv)

    s = _raw_tls(srv, None)
    s.sendall(P.Connection(P.Role.CLIENT).send(P.Hello("v99", version=99)))
    (err,) = _read_events(s)
    s.close()
    assert err.code == P.Code.VERSION and "speaks" in err.text, err

    with pytest.raises(errors.PageServerError, match="BAD_NAME.*outside"):
        PageServerSink("127.0.0.1", srv.port, "planted/a/b")
    assert not os.path.exists(str(tmp_path / "a"))     # nothing made outside -D
    sink = PageServerSink("127.0.0.1", srv.port, "link")
    with pytest.raises(errors.PageServerError, match="BAD_NAME.*outside"):
        sink.set_parent("../../../..")
        sink.commit(inventory_pb2.inventory_entry(root_pid=1))
    sink.close()

    def commit(name, tamper, why):
        sink = PageServerSink("127.0.0.1", srv.port, name)
        sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=1)])
        pw = sink.pages_writer(1)
        pw.account(1, pw.write_chunk(0, memoryview(bytes(4096))))
        sink.add_pages(1, pw)
        tamper(sink.checksums)
        with pytest.raises(errors.PageServerError, match="CHECKSUM") as ei:
            sink.commit(inventory_pb2.inventory_entry(root_pid=1))
        sink.close()
        assert why in str(ei.value), ei.value
        assert not os.path.exists(os.path.join(root, name, "inventory.img"))

    commit("digest", lambda c: c.update({"pstree.img": (c["pstree.img"][0], "0" * 32)}),
           "the inventory says")
    commit("pages", lambda c: c.update({"pages-1.img": (c["pages-1.img"][0] + 4096,
                                                         c["pages-1.img"][1])}),
           "pages-1.img: received")
    commit("missing", lambda c: c.update({"fs-1.img": (10, "0" * 32)}),
           "listed in the inventory but not received")
    commit("extra", lambda c: c.pop("pstree.img"), "received but not in the inventory")
    # and a good one still commits
    sink = PageServerSink("127.0.0.1", srv.port, "good")
    sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=1)])
    sink.commit(inventory_pb2.inventory_entry(root_pid=1))
    assert os.path.exists(os.path.join(root, "good", "inventory.img"))
    assert srv.proc.poll() is None


class _InProcessServer:
    """A PageServer on its own loop in a thread of this process (as an agent
    runs one), for what `migrate page-server` does not offer: CAP_NOSYNC."""

    def __init__(self, root: str, **kw) -> None:
        import threading
        from migrate.pageserver.server import PageServer
        self.loop = asyncio.new_event_loop()
        self.srv = PageServer(root, "127.0.0.1", 0, serve=True, **kw)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(self.srv.start())
            ready.set()
            self.loop.run_until_complete(self.srv.done.wait())
            self.loop.run_until_complete(self.srv.shutdown())
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(30)
        self.port = self.srv.port

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.srv.request_stop)
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_nosync_commit_and_files_sent_with_the_commit(tmp_path, monkeypatch):
    """CAP_NOSYNC: granted only by a server that allows it, only to a client
    that asks; then neither the server nor the client's mirror fsyncs, and
    the image is as complete and checked as a synced one.  Small records
    files are held and go with the COMMIT in one write (a large one goes at
    once), and the server writes them in one batch: a bad part in the batch
    still fails the session with no inventory."""
    import threading
    from migrate.pageserver import client as pclient
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(threading.current_thread().name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    lenient = _InProcessServer(str(tmp_path / "lenient"), allow_nosync=True)
    strict = _InProcessServer(str(tmp_path / "strict"))
    try:
        def session(srv, name, sync, mirror=None):
            del synced[:]
            sink = PageServerSink("127.0.0.1", srv.port, name, streams=2, sync=sync,
                                  mirror=mirror)
            pw = sink.pages_writer(7)
            pw.account(2, pw.write_chunk(0, memoryview(os.urandom(2 * 4096))))
            sink.add_pages(7, pw)
            sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=7)])
            big = sink.raw_writer("tcp-queues.img")
            big.append(os.urandom(pclient.HOLD_MAX + 1))
            sink.add_raw("tcp-queues.img", big)             # sent at once, not held
            assert not sink.main.held
            sink.write_image("files.img", [])
            assert sink.main.held                           # held for the COMMIT
            sink.commit(inventory_pb2.inventory_entry(root_pid=7))
            imgfile.ImageDir.open(os.path.join(srv.srv.root, name)).verify_all()
            return sink.synced, [t for t in synced if t.startswith("ps-io")], \
                [t for t in synced if not t.startswith("ps-io")]

        mirror = str(tmp_path / "mirror")
        got, server_syncs, client_syncs = session(lenient, "fast", False, mirror)
        assert (got, server_syncs, client_syncs) == (False, [], [])
        mine = imgfile.ImageDir.open(mirror)
        assert set(mine.checksums) == {"pstree.img", "files.img", "tcp-queues.img"}
        mine.verify_all()
        got, server_syncs, client_syncs = session(lenient, "durable", True, mirror)
        assert got and server_syncs and client_syncs     # the default: synced
        got, server_syncs, _ = session(strict, "asked", False)
        assert got and server_syncs                      # not granted: synced

        sink = PageServerSink("127.0.0.1", lenient.port, "bad", sync=False)
        sink.write_image("pstree.img", [pstree_pb2.pstree_entry(pid=7)])
        sink.main.hold(P.FilePart("fs-7.img", 0, b"x" * 10))
        sink.main.hold(P.FilePart("fs-7.img", 20, b"y" * 10, True))
        sink.checksums["fs-7.img"] = (20, "0" * 32)
        with pytest.raises(errors.PageServerError, match="PROTOCOL.*offset 20, expected 10"):
            sink.commit(inventory_pb2.inventory_entry(root_pid=7))
        sink.close()
        bad = os.path.join(lenient.srv.root, "bad")
        deadline = time.monotonic() + 10
        while os.path.exists(os.path.join(bad, "pstree.img")):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not os.path.exists(os.path.join(bad, "inventory.img"))
    finally:
        lenient.stop()
        strict.stop()
