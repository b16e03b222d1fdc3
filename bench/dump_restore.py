#!/usr/bin/env python3
"""Dump and restore figures (printed, never asserted).

For an anonymous process of SIZE MiB (1024 by default), warmed up first:
frozen time of a dump to tmpfs, restore time from tmpfs, peak RSS of the
tool while dumping and restoring; the round trip of a small process; and,
measured in the same run, the ceilings: process_vm_readv throughput and
memory copy bandwidth on this machine.

    python3 bench/dump_restore.py [--mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from migrate.kernel import memory, proc, syscalls  # noqa: E402

BIN = os.path.join(ROOT, "tests", "programs", "bin")
GiB = 1 << 30


def start(argv: list[str], log: str) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                start_new_session=True)


def wait_ready(log: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if "READY" in open(log).read():
            return
        time.sleep(0.05)
    raise SystemExit(f"no READY in {log}")


def run_migrate(*args: str) -> tuple[dict, float, int]:
    """Run the CLI; return (its --display-stats JSON, wall seconds, its peak RSS KiB)."""
    t = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    p = subprocess.Popen([sys.executable, "-m", "migrate", *args, "--display-stats"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"migrate {' '.join(args)} failed: {err.decode()}")
    st = json.loads(out)
    return st, wall, int(st.get("peak_rss_kb", 0))


def biggest_anon(pid: int) -> tuple[int, int]:
    v = max((v for v in proc.read_maps(pid) if v.path == ""), key=lambda v: v.size)
    return v.start, v.size


def ceiling_vm_readv(pid: int) -> float:
    start, size = biggest_anon(pid)
    chunk = 8 << 20
    buf = bytearray(chunk)
    memory.vm_read(pid, buf, [(start, chunk, 0)])  # warm the buffer
    t = time.perf_counter()
    for off in range(0, size - chunk + 1, chunk):
        memory.vm_read(pid, buf, [(start + off, chunk, 0)])
    return size / (time.perf_counter() - t) / GiB


def ceiling_memcpy(size: int = 256 << 20) -> float:
    a = ctypes.create_string_buffer(size)
    b = ctypes.create_string_buffer(size)
    ctypes.memset(a, 1, size)
    ctypes.memmove(b, a, size)   # first touch of both
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        ctypes.memmove(b, a, size)
        best = max(best, size / (time.perf_counter() - t) / GiB)
    return best


def warm_machine(size: int) -> float:
    """Touch and free ``size`` bytes once: in this VM the first touch of a guest
    page is slow (~3 s/GiB), later allocations reuse warm pages (tmpfs too)."""
    t = time.perf_counter()
    chunk = 256 << 20
    bufs = []
    for _ in range(0, size, chunk):
        b = ctypes.create_string_buffer(chunk)
        ctypes.memset(b, 1, chunk)
        bufs.append(b)
    del bufs
    return time.perf_counter() - t


def ceiling_tmpfs_write(size: int, where: str) -> float:
    """write(2) of ``size`` bytes into a new tmpfs file from a warm buffer."""
    buf = bytearray(8 << 20)
    path = os.path.join(where, "ceiling.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t = time.perf_counter()
        for _ in range(size // len(buf)):
            os.write(fd, buf)
        return size / (time.perf_counter() - t) / GiB
    finally:
        os.close(fd)
        os.unlink(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(BIN, "memhog")):
        raise SystemExit("tests/programs/bin/memhog is missing: run `make build` first")
    syscalls.set_child_subreaper()
    work = tempfile.mkdtemp(prefix="migrate-bench-", dir="/dev/shm")
    rows = []
    try:
        warm = 4 * args.mib << 20
        print(f"warm-up: touched {warm >> 20} MiB in {warm_machine(warm):.2f} s")
        print(f"tmpfs write ({args.mib} MiB new file, warm source): "
              f"{ceiling_tmpfs_write(args.mib << 20, work):.2f} GiB/s")
        print(f"memory copy bandwidth (memmove, 256 MiB): {ceiling_memcpy():.2f} GiB/s")
        for rep in range(args.repeat):
            log = os.path.join(work, f"memhog-{rep}.log")
            p = start([os.path.join(BIN, "memhog"), str(args.mib)], log)
            wait_ready(log)
            if rep == 0:
                print(f"process_vm_readv ({args.mib} MiB, 8 MiB batches): "
                      f"{ceiling_vm_readv(p.pid):.2f} GiB/s")
            img = os.path.join(work, f"img-{rep}")
            d, dwall, drss = run_migrate("dump", "-t", str(p.pid), "-D", img)
            p.wait()
            r, rwall, rrss = run_migrate("restore", "-D", img, "-d")
            os.kill(p.pid, signal.SIGTERM)
            _, status = os.waitpid(p.pid, 0)
            verdict = "PASS" if os.waitstatus_to_exitcode(status) == 0 else "FAIL"
            rows.append((int(d["frozen_us"]) / 1e6, dwall, drss, int(r["restore_us"]) / 1e6,
                         rwall, rrss, verdict, int(d["pages_written"])))
            shutil.rmtree(img)
        gib = args.mib / 1024
        print(f"\n{args.mib} MiB anonymous process, images on tmpfs (/dev/shm):")
        print(f"{'run':>3} {'dump frozen':>12} {'dump wall':>10} {'dump RSS':>9} "
              f"{'restore':>8} {'rest wall':>10} {'rest RSS':>9} {'pages':>8}  check")
        for i, (fz, dw, dr, rs, rw, rr, v, pg) in enumerate(rows):
            print(f"{i:>3} {fz:>10.3f} s {dw:>8.3f} s {dr / 1024:>6.1f} MiB "
                  f"{rs:>6.3f} s {rw:>8.3f} s {rr / 1024:>6.1f} MiB {pg:>8}  {v}")
        best_f = min(r[0] for r in rows)
        best_r = min(r[3] for r in rows)
        print(f"best: dump frozen {best_f / gib:.3f} s/GiB (target <= 1.0), "
              f"restore {best_r / gib:.3f} s/GiB (target <= 0.7), "
              f"peak RSS {max(max(r[2], r[5]) for r in rows) / 1024:.1f} MiB (target <= 64)")

        # small process round trip
        trips = []
        for rep in range(5):
            log = os.path.join(work, f"counter-{rep}.log")
            p = start([os.path.join(BIN, "counter")], log)
            wait_ready(log)
            img = os.path.join(work, f"small-{rep}")
            t = time.perf_counter()
            d, _, _ = run_migrate("dump", "-t", str(p.pid), "-D", img)
            p.wait()
            r, _, _ = run_migrate("restore", "-D", img, "-d")
            wall = time.perf_counter() - t
            os.kill(p.pid, signal.SIGTERM)
            os.waitpid(p.pid, 0)
            trips.append((int(d["total_us"]) / 1e6 + int(r["restore_us"]) / 1e6, wall))
        work_s = min(t[0] for t in trips)
        wall_s = min(t[1] for t in trips)
        print(f"\nsmall process (counter) round trip: {work_s * 1000:.1f} ms dump+restore "
              f"(target <= 150 ms); {wall_s * 1000:.1f} ms wall with two CLI start-ups")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
