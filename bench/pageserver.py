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

``path_ceiling_*``: the ceiling of the whole path with none of migrate's
code in it (bench/_pathceiling.py), measured in the same run, interleaved
with our runs, into the same directory as the server writes to: a sender
that reads the same warmed-up memhog with process_vm_readv (8 MiB, two
threads) and sends it over loopback TCP (TLS: the same ssl contexts as
ours), a receiver that writes it at its offset of one new file (recv_into +
pwrite, or splice socket -> pipe -> file; the faster is kept) and fsyncs.
Each is printed as best and median of ``--reps`` runs with the ratio
ours / ceiling (our wall, and our memory phase), and with the CPU time of
each side (user, sys) so that a reader sees where the two cores go:
``*_cpu`` is ours (client = the `migrate dump` process, server = the
page-server during that dump), ``path_ceiling_*_cpu`` the sender's and the
receiver's.

Two figures per mode: ``*_GiB_s`` is the whole `migrate dump` command (wall,
with interpreter start, freezing and the other files), ``*_memory_phase_GiB_s``
the dump's own memory phase (read from the task, hash, send, as recorded in
its stats-dump.img).  The same dump into a local tmpfs directory is printed
as ``local_dump_*``: the page-server cannot beat the dump that feeds it.

    python3 bench/pageserver.py [--mib 1024] [--sessions 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
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

    def cpu(self) -> tuple[float, float]:
        """(user, sys) seconds of every thread of the server so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        hz = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / hz, int(fields[12]) / hz

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def _children_cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime


LAST_CPU: dict = {}


def dump(pid: int, port: int, session: str, logs: str, tls: list[str],
         extra: tuple = (), srv: "Server | None" = None) -> float:
    """Seconds of one `migrate dump` through the server; its CPU time and the
    server's during it go to LAST_CPU (only when run alone: ``srv``)."""
    c0, s0 = _children_cpu(), srv.cpu() if srv else None
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "migrate", "dump", "-t", str(pid), "-R",
                        "-D", logs, "--page-server", "--address", "127.0.0.1", "--port",
                        str(port), "--session", session, "-v1", *tls, *extra],
                       cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"dump failed: {p.stderr}")
    dt = time.perf_counter() - t
    if srv is not None:
        c1, s1 = _children_cpu(), srv.cpu()
        LAST_CPU.clear()
        LAST_CPU.update(client_user_s=round(c1[0] - c0[0], 2), client_sys_s=round(c1[1] - c0[1], 2),
                        server_user_s=round(s1[0] - s0[0], 2), server_sys_s=round(s1[1] - s0[1], 2))
    return dt


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


def ceiling_tcp(total: int = 2 * GiB) -> tuple[float, float]:
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
    t, c = time.perf_counter(), time.process_time()
    for _ in range(total // len(data)):
        s.sendall(data)
    s.close()
    th.join()
    # (GiB/s, CPU seconds per GiB of both ends)
    return (total / (time.perf_counter() - t) / GiB,
            (time.process_time() - c) / (total / GiB))


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


CEILING = os.path.join(ROOT, "bench", "_pathceiling.py")


def ceiling_path(pid: int, directory: str, streams: int, mode: str, tls_files: tuple) -> dict:
    """One run of bench/_pathceiling.py: GiB/s from the sender's start to the
    receiver's fsync, and each side's CPU time."""
    r = subprocess.Popen([sys.executable, CEILING, "recv", directory, str(streams), mode,
                          *tls_files], stdout=subprocess.PIPE, text=True)
    try:
        port = r.stdout.readline().strip()
        snd = subprocess.run([sys.executable, CEILING, "send", str(pid), port, str(streams),
                              *tls_files], capture_output=True, text=True, timeout=300)
        if snd.returncode:
            raise SystemExit(f"path ceiling sender failed: {snd.stderr}")
        rcv = json.loads(r.stdout.read())
    finally:
        r.wait(60)
    s = json.loads(snd.stdout)
    if rcv["bytes"] != s["bytes"]:
        raise SystemExit(f"path ceiling: sent {s['bytes']} bytes, received {rcv['bytes']}")
    return {"GiB_s": s["bytes"] / (rcv["end"] - s["start"]) / GiB, "mode": mode,
            "cpu": {"sender_user_s": s["user_s"], "sender_sys_s": s["sys_s"],
                    "receiver_user_s": rcv["user_s"], "receiver_sys_s": rcv["sys_s"]}}


def _cpu_bound(cpu: dict, nbytes: int) -> dict:
    """CPU seconds per GiB, both sides together, and the throughput that
    this machine's cores could give at that cost if nothing else ran and
    the work spread perfectly over them: an upper bound, unlike the wall
    figures insensitive to other load (bar cache and memory contention)."""
    per_gib = sum(cpu.values()) / (nbytes / GiB)
    return {**cpu, "core_s_per_GiB": round(per_gib, 2),
            f"cpu_bound_GiB_s_{os.cpu_count()}_cores": round(os.cpu_count() / per_gib, 2)}


def _best_median(xs: list[float]) -> dict:
    return {"best": round(max(xs), 2), "median": round(statistics.median(xs), 2)}


def ceiling_tmpfs_write(total: int = GiB) -> tuple[float, float]:
    """pwrite of 8 MiB chunks into a new file under /dev/shm: what the server
    must do with every page, before any network or hashing."""
    buf = os.urandom(8 * MiB)
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="bench-ps-w")
    try:
        t, c = time.perf_counter(), time.thread_time()
        for i in range(total // len(buf)):
            os.pwrite(fd, buf, 4096 + i * len(buf))
        return (total / (time.perf_counter() - t) / GiB,
                total / (time.thread_time() - c) / GiB)
    finally:
        os.close(fd)
        os.unlink(path)


def ceiling_aesgcm(bits: int, total: int = GiB) -> tuple[float, float]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    a = AESGCM(AESGCM.generate_key(bits))
    rec = bytes(16384)     # one TLS record
    nonce = bytes(12)
    t, c = time.perf_counter(), time.thread_time()
    for _ in range(total // len(rec)):
        a.encrypt(nonce, rec, None)
    return (total / (time.perf_counter() - t) / GiB,
            total / (time.thread_time() - c) / GiB)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--session-mib", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-ps-", dir="/dev/shm")
    procs: list[subprocess.Popen] = []
    servers: list[Server] = []
    out: dict = {"mib": args.mib, "load_average_start": os.getloadavg()}
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
        tls_files = (certs.paths(pki)["cacert"], p["cert"], p["key"])
        for name, targs, extra in modes:
            root = os.path.join(tmp, f"srv-{name}")
            srv = Server(root, os.path.join(tmp, f"ps-{name}.log"), targs)
            servers.append(srv)
            dump(hog.pid, srv.port, "warm", os.path.join(tmp, "logs"), targs, extra)
            shutil.rmtree(os.path.join(root, "warm"))
            streams = 2 if "--ps-streams" in extra else 1
            files = tls_files if targs is tls else ()
            compressed = "--compress" in extra
            walls, mems, cpus, ceil = [], [], [], []
            for i in range(args.reps):
                # Ours and the ceiling in turn, so that both see the same load.
                walls.append(dump(hog.pid, srv.port, f"run{i}", os.path.join(tmp, "logs"),
                                  targs, extra, srv))
                cpus.append(dict(LAST_CPU))
                mems.append(memdump_s(os.path.join(root, f"run{i}")))
                shutil.rmtree(os.path.join(root, f"run{i}"), ignore_errors=True)
                if compressed:
                    continue      # no ceiling for compressed pages: fewer bytes cross
                runs = [ceiling_path(hog.pid, root, streams, m, files)
                        for m in (("recv", "splice") if not files else ("recv",))]
                ceil.append(max(runs, key=lambda c: c["GiB_s"]))
            best = min(walls)
            out[f"{name}_GiB_s"] = _best_median([data / w / GiB for w in walls])
            out[f"{name}_wall_s"] = round(best, 2)
            out[f"{name}_memory_phase_GiB_s"] = _best_median([data / m / GiB for m in mems])
            out[f"{name}_cpu"] = _cpu_bound(cpus[walls.index(best)], data)
            out[f"{name}_server_rss_MiB"] = round(srv.hwm_mib(), 1)
            if ceil:
                top = max(ceil, key=lambda c: c["GiB_s"])
                c = _best_median([x["GiB_s"] for x in ceil])
                out[f"path_ceiling_{name}_GiB_s"] = {**c, "best_by": top["mode"]}
                out[f"path_ceiling_{name}_cpu"] = _cpu_bound(top["cpu"], data)
                out[f"{name}_vs_path_ceiling"] = {
                    "wall_best": round(out[f"{name}_GiB_s"]["best"] / c["best"], 2),
                    "wall_median": round(out[f"{name}_GiB_s"]["median"] / c["median"], 2),
                    "memory_phase_best": round(out[f"{name}_memory_phase_GiB_s"]["best"] /
                                               c["best"], 2),
                    # the ceiling's CPU per GiB over ours (1.0: we cost no more)
                    "cpu_cost": round(out[f"path_ceiling_{name}_cpu"]["core_s_per_GiB"] /
                                      out[f"{name}_cpu"]["core_s_per_GiB"], 2)}
            if not extra:
                # The same server fed by the client library alone: what the
                # page-server path takes without the dump's own work.
                lib = tls_files if targs is tls else ("", "", "")
                runs = []
                for _ in range(2):
                    runs.append(synthetic(srv.port, data, 1, lib))
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

        # Each also per CPU second (the thread's, or both ends' for TCP): the
        # wall figure of a "1 core" ceiling is meaningless while other work
        # shares the core.
        tcp = [ceiling_tcp() for _ in range(2)]
        out["ceiling_loopback_tcp_GiB_s"] = round(max(x[0] for x in tcp), 2)
        out["ceiling_loopback_tcp_core_s_per_GiB"] = round(min(x[1] for x in tcp), 2)
        w = [ceiling_tmpfs_write() for _ in range(args.reps)]
        out["ceiling_tmpfs_write_GiB_s"] = _best_median([x[0] for x in w])
        out["ceiling_tmpfs_write_GiB_per_cpu_s"] = _best_median([x[1] for x in w])
        for bits in (128, 256):
            a = [ceiling_aesgcm(bits) for _ in range(2)]
            out[f"ceiling_aes{bits}gcm_1core_GiB_s"] = round(max(x[0] for x in a), 2)
            out[f"ceiling_aes{bits}gcm_GiB_per_cpu_s"] = round(max(x[1] for x in a), 2)
        # The issue's targets, against our best mode with and without TLS.
        best_tls = max(out[f"{m}_GiB_s"]["best"] for m in ("tls", "tls_2streams"))
        best_plain = max(out[f"{m}_GiB_s"]["best"] for m in ("plaintext", "plaintext_2streams"))
        out["target_tls_1GiB_s"] = best_tls
        out["target_tls_vs_aes128gcm_ceiling_0.5"] = round(
            best_tls / out["ceiling_aes128gcm_1core_GiB_s"], 2)
        aes = out["ceiling_aes128gcm_GiB_per_cpu_s"]
        summary_targets = [
            f"targets: TLS >= 1 GiB/s and >= 50% of AES-128-GCM ({aes} GiB per CPU second, "
            f"so >= {round(aes / 2, 2)} GiB/s): ours at best {best_tls} GiB/s on the wall; "
            f"the path ceiling's CPU cost allows at most "
            f"{max(out[f'path_ceiling_{m}_cpu'][f'cpu_bound_GiB_s_{os.cpu_count()}_cores'] for m in ('tls', 'tls_2streams'))}"
            f" GiB/s on {os.cpu_count()} idle cores",
            f"targets: plaintext >= 70% of loopback TCP ({out['ceiling_loopback_tcp_GiB_s']} "
            f"GiB/s, so >= {round(0.7 * out['ceiling_loopback_tcp_GiB_s'], 2)}): ours at best "
            f"{best_plain} GiB/s; the path ceiling's CPU cost allows at most "
            f"{max(out[f'path_ceiling_{m}_cpu'][f'cpu_bound_GiB_s_{os.cpu_count()}_cores'] for m in ('plaintext', 'plaintext_2streams'))}"
            f" GiB/s on {os.cpu_count()} idle cores"]
        out["target_plaintext_vs_tcp_ceiling_0.7"] = round(
            best_plain / out["ceiling_loopback_tcp_GiB_s"], 2)
        out["path_ceiling_tls_vs_aes128gcm_ceiling"] = round(
            max(out[f"path_ceiling_{m}_GiB_s"]["best"] for m in ("tls", "tls_2streams")) /
            out["ceiling_aes128gcm_1core_GiB_s"], 2)
        out["path_ceiling_plaintext_vs_tcp_ceiling"] = round(
            max(out[f"path_ceiling_{m}_GiB_s"]["best"]
                for m in ("plaintext", "plaintext_2streams")) /
            out["ceiling_loopback_tcp_GiB_s"], 2)
        out["load_average_end"] = os.getloadavg()
        cores = f"cpu_bound_GiB_s_{os.cpu_count()}_cores"
        summary = []
        for name in ("plaintext", "plaintext_2streams", "tls", "tls_2streams"):
            o, c = out[f"{name}_cpu"], out[f"path_ceiling_{name}_cpu"]
            summary.append(
                f"{name}: ours {out[f'{name}_GiB_s']['best']} GiB/s (memory phase "
                f"{out[f'{name}_memory_phase_GiB_s']['best']}), path ceiling "
                f"{out[f'path_ceiling_{name}_GiB_s']['best']}; CPU ours client "
                f"{o['client_user_s']}u+{o['client_sys_s']}s server {o['server_user_s']}u+"
                f"{o['server_sys_s']}s = {o['core_s_per_GiB']} core-s/GiB (at most "
                f"{o[cores]} GiB/s), ceiling sender {c['sender_user_s']}u+{c['sender_sys_s']}s "
                f"receiver {c['receiver_user_s']}u+{c['receiver_sys_s']}s = "
                f"{c['core_s_per_GiB']} core-s/GiB (at most {c[cores]} GiB/s)")
        out["summary"] = summary + summary_targets
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
