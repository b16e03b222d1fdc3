#!/usr/bin/env python3
"""TCP connections and the network lock (printed, never asserted).

Two network namespaces of our own joined by a veth pair (deleted at the
end); `tests/programs/tcpecho` serves in one, `tcpstream ADDR PORT N 65536`
streams over N connections with up to 64 KiB in flight on each, in the
other.  The client is dumped (`--tcp-established`) and restored with N = 1
and N = 100; the time added per connection is (T(100) - T(1)) / 99, for the
dump's frozen time and wall time and for the restore's wall time.  The lock:
the time `nft` takes to set (dump) and lift (restore) it, from the stats.
Targets (issue 8): <= 0.5 ms per connection; <= 20 ms to set or lift the lock.

    python3 bench/tcp.py [--conns 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BIN = os.path.join(ROOT, "tests", "programs", "bin")
TAG = f"mgb{os.getpid() % 100000}"
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True)


def enter(ns: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{ns}", *argv]


def migrate(ns: str, *args: str) -> dict:
    p = subprocess.run(enter(ns, [sys.executable, "-m", "migrate", *args, "--display-stats"]),
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"migrate {args[0]} failed: {p.stderr}")
    return json.loads(p.stdout)


def wait_ready(path: str) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with open(path) as f:
            if "READY" in f.read():
                return
        time.sleep(0.02)
    raise SystemExit(f"{path}: no READY")


def round_trip(cns: str, n: int, work: str, i: int) -> dict:
    log = os.path.join(work, f"client-{n}-{i}.log")
    with open(log, "wb") as f:
        p = subprocess.Popen(enter(cns, [os.path.join(BIN, "tcpstream"), "10.232.0.2", "7000",
                                         str(n), "65536"]), stdout=f, stderr=f,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    wait_ready(log)
    time.sleep(0.3)
    images = os.path.join(work, f"img-{n}-{i}")
    t0 = time.perf_counter()
    d = migrate(cns, "dump", "-t", str(p.pid), "-D", images, "--tcp-established")
    dump_wall = time.perf_counter() - t0
    p.wait()
    t0 = time.perf_counter()
    r = migrate(cns, "restore", "-D", images, "-d")
    restore_wall = time.perf_counter() - t0
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGTERM)
    end = time.monotonic() + 60
    while os.path.exists(f"/proc/{p.pid}") and time.monotonic() < end:
        try:
            os.waitpid(p.pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    with open(log) as f:
        verdict = f.read()
    if "PASS" not in verdict:
        raise SystemExit(f"tcpstream with {n} connections: {verdict}")
    return {"dump_ms": dump_wall * 1e3, "frozen_ms": int(d.get("frozen_us", 0)) / 1e3,
            "restore_ms": restore_wall * 1e3, "lock_ms": int(d.get("netlock_us", 0)) / 1e3,
            "unlock_ms": int(r.get("netunlock_us", 0)) / 1e3,
            "conns": int(d.get("tcp_connections", 0))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from migrate.kernel import syscalls
    syscalls.set_child_subreaper()      # restored clients come back to us
    cns, sns = TAG + "c", TAG + "s"
    work = tempfile.mkdtemp(prefix="bench-tcp-", dir="/dev/shm")
    server = None
    try:
        for ns in (cns, sns):
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", TAG + "a", "type", "veth", "peer", "name", TAG + "b")
        ip("link", "set", TAG + "a", "netns", cns)
        ip("link", "set", TAG + "b", "netns", sns)
        ip("-n", cns, "addr", "add", "10.232.0.1/24", "dev", TAG + "a")
        ip("-n", sns, "addr", "add", "10.232.0.2/24", "dev", TAG + "b")
        ip("-n", cns, "link", "set", TAG + "a", "up")
        ip("-n", sns, "link", "set", TAG + "b", "up")
        slog = os.path.join(work, "server.log")
        with open(slog, "wb") as f:
            server = subprocess.Popen(enter(sns, [os.path.join(BIN, "tcpecho"), "7000"]),
                                      stdout=f, stderr=f, stdin=subprocess.DEVNULL)
        wait_ready(slog)
        rows: dict[int, list[dict]] = {1: [], args.conns: []}
        round_trip(cns, 1, work, -1)                      # warm-up
        for i in range(args.repeat):
            for n in rows:
                rows[n].append(round_trip(cns, n, work, i))
        med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
               for n, rs in rows.items()}
        one, many = med[1], med[args.conns]
        k = args.conns - 1
        print(f"TCP connections: {args.conns} with up to 64 KiB in flight each, "
              f"median of {args.repeat}")
        for n in rows:
            m = med[n]
            print(f"  {n:4d} conn: dump {m['dump_ms']:7.1f} ms (frozen {m['frozen_ms']:6.1f}),"
                  f" restore {m['restore_ms']:7.1f} ms")
        print(f"  added per connection: dump {(many['dump_ms'] - one['dump_ms']) / k:.3f} ms "
              f"(frozen {(many['frozen_ms'] - one['frozen_ms']) / k:.3f}), restore "
              f"{(many['restore_ms'] - one['restore_ms']) / k:.3f} ms  (target <= 0.5)")
        print(f"  network lock: set {one['lock_ms']:.1f} ms (1 conn), {many['lock_ms']:.1f} ms "
              f"({args.conns}); lifted {one['unlock_ms']:.1f} / {many['unlock_ms']:.1f} ms "
              "(target <= 20)")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (cns, sns):
            ip("netns", "del", ns, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
