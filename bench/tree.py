#!/usr/bin/env python3
"""Dump and restore of a process tree (printed, never asserted).

`tests/programs/forest NPROC NTHREADS`: NPROC processes (50) with NTHREADS
threads (4) and 10 fds of mixed kinds each (file, directory, /dev/null,
pipe ends, eventfd, timerfd, epoll, socketpair ends), plus one exited
watcher left as a zombie.  Images on tmpfs.  After a warm-up round trip,
REPEAT round trips: dump (wall, frozen) and restore (wall), and where the
time goes, summed over the processes by phase (the `phase ... took` lines
of -v4 logs).  Target (issue 6): round trip <= 1.5 s.  The workload checks
itself at the end (PASS).

    python3 bench/tree.py [--procs 50] [--threads 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.dump_restore import BIN, run_migrate, start, wait_ready  # noqa: E402
from migrate.kernel import syscalls  # noqa: E402
from tests.integration.harness import descendants, reap_pids as reap  # noqa: E402

PHASE = re.compile(r"phase (.+?) took ([\d.]+) ms")


def phases(log: str) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    with open(log) as f:
        for m in PHASE.finditer(f.read()):
            out[m.group(1)] += float(m.group(2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    syscalls.set_child_subreaper()
    work = tempfile.mkdtemp(prefix="bench-tree-", dir="/dev/shm")
    wlog = os.path.join(work, "forest.log")
    os.chdir(work)
    p = start([os.path.join(BIN, "forest"), str(a.procs), str(a.threads)], wlog)
    root = p.pid
    rows = []
    try:
        wait_ready(wlog)
        for i in range(a.repeat + 1):
            img = os.path.join(work, f"img-{i}")
            below = descendants(root)
            dst, dwall, _ = run_migrate("dump", "-t", str(root), "-D", img, "-v4",
                                        "-o", "dump.log")
            reap([root, *below])
            rst, rwall, rrss = run_migrate("restore", "-D", img, "-d", "-v4", "-o",
                                           "restore.log")
            if i == 0:
                continue     # warm-up
            rows.append((dwall, float(dst["frozen_us"]) / 1e6, rwall, float(rst["restore_us"]) / 1e6,
                         phases(os.path.join(img, "dump.log")),
                         phases(os.path.join(img, "restore.log")), rrss))
        os.kill(root, signal.SIGTERM)
        reap([root], 60)
        verdict = open(wlog).read().strip().splitlines()[-1]
    finally:
        for q in [*descendants(root), root]:
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)

    nproc = a.procs + 1
    print(f"tree: {a.procs} processes x {a.threads} threads x 10 fds (+1 zombie), "
          f"{a.repeat} round trips, images on tmpfs")
    trips = [d + r for d, _, r, _, _, _, _ in rows]
    best = min(range(len(rows)), key=lambda i: trips[i])
    for name, idx in (("dump wall", 0), ("dump frozen", 1), ("restore wall", 2),
                      ("restore (in tool)", 3)):
        vals = [r[idx] for r in rows]
        print(f"  {name:<18} best {min(vals):.3f} s  median {statistics.median(vals):.3f} s")
    print(f"  round trip (wall)  best {min(trips):.3f} s  median "
          f"{statistics.median(trips):.3f} s   target <= 1.5 s")
    print(f"  restore peak RSS   {rows[best][6] / 1024:.1f} MiB")
    for title, ph in (("dump", rows[best][4]), ("restore", rows[best][5])):
        total = sum(ph.values())
        print(f"  where the {title} time goes (best run, summed over {nproc} processes, "
              f"{total:.0f} ms in phases):")
        for name, ms in sorted(ph.items(), key=lambda kv: -kv[1]):
            print(f"    {name:<28} {ms:8.1f} ms")
    print(f"  python3 interpreter start + imports are in the wall times; workload: {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
