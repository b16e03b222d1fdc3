#!/usr/bin/env python3
"""Page-server figures (printed, never asserted).

For a warmed-up process of MIB MiB (tests/programs/bin/memhog, 1024 by
default): throughput of `migrate dump -R --page-server` into a page-server on
loopback (tmpfs under /dev/shm), with mutual TLS and without; measured in the
same run, the ceilings: raw loopback TCP throughput (one stream, 8 MiB
sends) and single-core AES-128-GCM / AES-256-GCM throughput through
`cryptography`, and writing fresh pages into tmpfs (the server's part that
no protocol saves); and the server's peak RSS with 8 concurrent sessions.
Each mode runs plain, then with 2 TCP streams (`--ps-streams 2`), and TLS
also with zstd (`--compress`; memhog's pages are a pattern, so they
compress far better than real memory: that figure is an upper bound).
``*_client_library_only_GiB_s``: the same server fed by PageServerSink in a
process of its own, from one 8 MiB buffer (no dump: no freezing, no reading
of the task's memory).

Two figures per mode: ``*_GiB_s`` is the whole `migrate dump` command (wall,
with interpreter start, freezing and the other files), ``*_memory_phase_GiB_s``
the dump's own memory phase (read from the task, hash, send, as recorded in
its stats-dump.img).  The same dump into a local tmpfs directory is printed
as ``local_dump_*``: the page-server cannot beat the dump that feeds it.

    python3 bench/pageserver.py [--mib 1024] [--sessions 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from migrate.images.imgfile import ImageDir  # noqa: E402
from migrate.pageserver import certs  # noqa: E402

BIN = os.path.join(ROOT, "tests", "programs", "bin")
MiB, GiB = 1 << 20, 1 << 30


def start_memhog(mib: int, log: str) -> subprocess.Popen:
    f = open(log, "wb")
    p = subprocess.Popen([os.path.join(BIN, "memhog"), str(mib)], stdin=subprocess.DEVNULL,
                         stdout=f, stderr=f, start_new_session=True)
    end = time.monotonic() + 120
    while "READY" not in open(log).read():
        if time.monotonic() > end or p.poll() is not None:
            raise SystemExit(f"memhog not ready: {open(log).read()}")
        time.sleep(0.05)
    return p


class Server:
    def __init__(self, root: str, log: str, args: list[str]) -> None:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "page-server", "-D", root, "--serve",
             "--ps-socket", str(self.lsock.fileno()), "--status-fd", str(w), "-v2",
             "-o", log, *args], cwd=ROOT, pass_fds=(self.lsock.fileno(), w))
        os.close(w)
        if os.read(r, 1) != b"\0":
            raise SystemExit("page-server did not start")
        os.close(r)
        self.lsock.close()

    def hwm_mib(self) -> float:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def dump(pid: int, port: int, session: str, logs: str, tls: list[str],
         extra: tuple = ()) -> float:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "migrate", "dump", "-t", str(pid), "-R",
                        "-D", logs, "--page-server", "--address", "127.0.0.1", "--port",
                        str(port), "--session", session, "-v1", *tls, *extra],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"dump failed: {p.stderr}")
    return time.perf_counter() - t


def memdump_s(image: str) -> float:
    """The dump's own time for its memory phase (read, hash, send), from the
    stats-dump.img it sent: the wall time above also holds interpreter start,
    freezing and the other files."""
    (stats,) = ImageDir.open(image).read_image("stats-dump.img")
    return stats.memdump_us / 1e6


def local_dump(pid: int, image: str) -> tuple[float, float]:
    """The same dump into a local directory (tmpfs): wall and memory phase."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "migrate", "dump", "-t", str(pid), "-R",
                        "-D", image, "-v1"], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"local dump failed: {p.stderr}")
    wall = time.perf_counter() - t
    m = memdump_s(image)
    shutil.rmtree(image)
    return wall, m


def ceiling_tcp(total: int = 2 * GiB) -> float:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)

    def sink():
        c, _ = ls.accept()
        buf = bytearray(4 * MiB)
        while c.recv_into(buf):
            pass
        c.close()
    th = threading.Thread(target=sink)
    th.start()
    s = socket.create_connection(ls.getsockname())
    data = bytes(8 * MiB)
    t = time.perf_counter()
    for _ in range(total // len(data)):
        s.sendall(data)
    s.close()
    th.join()
    return total / (time.perf_counter() - t) / GiB


SYNTHETIC = r"""
import os, sys, time
from migrate.images._pb import inventory_pb2
from migrate.pageserver import tls
from migrate.pageserver.client import PageServerSink
port, total, streams, cacert, cert, key = sys.argv[1:7]
ctx = tls.client_context(cacert, cert, key) if cacert else None
buf = memoryview(bytearray(os.urandom(8 << 20)))
sink = PageServerSink("127.0.0.1", int(port), "synthetic", ssl_context=ctx,
                      server_hostname="localhost", streams=int(streams))
pw = sink.pages_writer(1)
t = time.perf_counter()
for i in range(int(total) // len(buf)):
    pw.account(2048, pw.write_chunk(i, buf))
sink.add_pages(1, pw)
sink.commit(inventory_pb2.inventory_entry(root_pid=1))
print(time.perf_counter() - t)
"""


def synthetic(port: int, total: int, streams: int, tls_files: tuple) -> float:
    """The client library alone (no dump): ``total`` bytes of 8 MiB chunks
    from one buffer, hashed and sent; seconds from the first chunk to
    COMMITTED."""
    p = subprocess.run([sys.executable, "-c", SYNTHETIC, str(port), str(total), str(streams),
                        *tls_files], cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"synthetic client failed: {p.stderr}")
    return float(p.stdout.strip().splitlines()[-1])


def ceiling_tmpfs_write(total: int = GiB) -> float:
    """pwrite of 8 MiB chunks into a new file under /dev/shm: what the server
    must do with every page, before any network or hashing."""
    buf = os.urandom(8 * MiB)
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="bench-ps-w")
    try:
        t = time.perf_counter()
        for i in range(total // len(buf)):
            os.pwrite(fd, buf, 4096 + i * len(buf))
        return total / (time.perf_counter() - t) / GiB
    finally:
        os.close(fd)
        os.unlink(path)


def ceiling_aesgcm(bits: int, total: int = GiB) -> float:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    a = AESGCM(AESGCM.generate_key(bits))
    rec = bytes(16384)     # one TLS record
    nonce = bytes(12)
    t = time.perf_counter()
    for _ in range(total // len(rec)):
        a.encrypt(nonce, rec, None)
    return total / (time.perf_counter() - t) / GiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--session-mib", type=int, default=128)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-ps-", dir="/dev/shm")
    procs: list[subprocess.Popen] = []
    servers: list[Server] = []
    out: dict = {"mib": args.mib}
    try:
        pki = os.path.join(tmp, "pki")
        certs.init(pki)
        p = certs.issue(pki, "localhost")
        tls = ["--tls-cacert", p["cacert"] if "cacert" in p else certs.paths(pki)["cacert"],
               "--tls-cert", p["cert"], "--tls-key", p["key"]]
        hog = start_memhog(args.mib, os.path.join(tmp, "memhog.log"))
        procs.append(hog)
        data = args.mib * MiB
        local_dump(hog.pid, os.path.join(tmp, "local"))       # warm up
        wall, mem = local_dump(hog.pid, os.path.join(tmp, "local"))
        out["local_dump_wall_s"] = round(wall, 2)
        out["local_dump_memory_phase_GiB_s"] = round(data / mem / GiB, 2)
        modes = (("plaintext", ["--no-tls"], ()), ("tls", tls, ()),
                 ("plaintext_2streams", ["--no-tls"], ("--ps-streams", "2")),
                 ("tls_2streams", tls, ("--ps-streams", "2")),
                 ("tls_2streams_zstd", tls, ("--ps-streams", "2", "--compress")))
        for name, targs, extra in modes:
            root = os.path.join(tmp, f"srv-{name}")
            srv = Server(root, os.path.join(tmp, f"ps-{name}.log"), targs)
            servers.append(srv)
            dump(hog.pid, srv.port, "warm", os.path.join(tmp, "logs"), targs, extra)
            shutil.rmtree(os.path.join(root, "warm"))
            walls, mems = [], []
            for i in range(2):
                walls.append(dump(hog.pid, srv.port, f"run{i}", os.path.join(tmp, "logs"),
                                  targs, extra))
                mems.append(memdump_s(os.path.join(root, f"run{i}")))
                shutil.rmtree(os.path.join(root, f"run{i}"), ignore_errors=True)
            best = min(walls)
            out[f"{name}_GiB_s"] = round(data / best / GiB, 2)
            out[f"{name}_wall_s"] = round(best, 2)
            out[f"{name}_memory_phase_GiB_s"] = round(data / min(mems) / GiB, 2)
            out[f"{name}_server_rss_MiB"] = round(srv.hwm_mib(), 1)
            if not extra:
                # The same server fed by the client library alone: what the
                # page-server path takes without the dump's own work.
                files = (certs.paths(pki)["cacert"], p["cert"], p["key"]) if targs is tls \
                    else ("", "", "")
                runs = []
                for _ in range(2):
                    runs.append(synthetic(srv.port, data, 1, files))
                    shutil.rmtree(os.path.join(root, "synthetic"))
                secs = min(runs)
                out[f"{name}_client_library_only_GiB_s"] = round(data / secs / GiB, 2)
            srv.stop()
            servers.remove(srv)
        os.kill(hog.pid, signal.SIGKILL)
        hog.wait()
        procs.remove(hog)

        # 8 concurrent sessions into one TLS server
        root = os.path.join(tmp, "srv-many")
        srv = Server(root, os.path.join(tmp, "ps-many.log"), tls)
        servers.append(srv)
        hogs = [start_memhog(args.session_mib, os.path.join(tmp, f"h{i}.log"))
                for i in range(args.sessions)]
        procs.extend(hogs)
        th = [threading.Thread(target=dump, args=(h.pid, srv.port, f"s{i}",
                                                  os.path.join(tmp, f"logs{i}"), tls))
              for i, h in enumerate(hogs)]
        t = time.perf_counter()
        for x in th:
            x.start()
        for x in th:
            x.join()
        dt = time.perf_counter() - t
        out[f"{args.sessions}_sessions_x_{args.session_mib}MiB_tls_GiB_s"] = round(
            args.sessions * args.session_mib * MiB / dt / GiB, 2)
        out[f"server_peak_rss_MiB_{args.sessions}_sessions"] = round(srv.hwm_mib(), 1)

        out["ceiling_loopback_tcp_GiB_s"] = round(ceiling_tcp(), 2)
        out["ceiling_tmpfs_write_GiB_s"] = round(ceiling_tmpfs_write(), 2)
        out["ceiling_aes128gcm_1core_GiB_s"] = round(ceiling_aesgcm(128), 2)
        out["ceiling_aes256gcm_1core_GiB_s"] = round(ceiling_aesgcm(256), 2)
        out["tls_vs_aes_ceiling"] = round(out["tls_GiB_s"] / out["ceiling_aes256gcm_1core_GiB_s"], 2)
        out["plaintext_vs_tcp_ceiling"] = round(out["plaintext_GiB_s"] /
                                                out["ceiling_loopback_tcp_GiB_s"], 2)
        out["tls_memory_phase_vs_aes_ceiling"] = round(
            out["tls_memory_phase_GiB_s"] / out["ceiling_aes256gcm_1core_GiB_s"], 2)
        out["plaintext_memory_phase_vs_tcp_ceiling"] = round(
            out["plaintext_memory_phase_GiB_s"] / out["ceiling_loopback_tcp_GiB_s"], 2)
    finally:
        for s in servers:
            s.stop()
        for p in procs:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
