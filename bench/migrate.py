#!/usr/bin/env python3
"""Live migration on the rig: a 1 GiB service dirtying 20 MB/s, a client
asking it something every millisecond over TCP, migrated A -> B and back.

For each mode it prints, per migration: total time, downtime measured two
ways (the orchestrator's: from the freeze to the destination's "it runs";
and the longest gap between two answers the client saw), bytes sent over
the process size, pre-copy rounds, and where the stop's time went.

Modes: pre-copy with the destination filling memory lazily from the
received image (the default), pre-copy with every page written before the
resume (--restore-fill eager), and post-copy (--post-copy on: one pre-copy
pass, then the process resumes on the destination and the pages dirtied
since come from the frozen source).

    python3 bench/migrate.py [--mib 1024] [--rate 20] [--runs 2] [--modes lazy,eager,post]
                              [--keep-logs]     (env MIGRATE_BENCH_RIG_PREFIX)

Targets (issue 9): downtime <= 300 ms with pre-copy only, <= 50 ms with
post-copy; bytes sent <= 1.3 x the process size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.integration.rigtest import Rig, RigWorkload  # noqa: E402

SERVICE_IP = "10.232.0.120"
PORT = "7200"


def waits(text: str) -> list[float]:
    """The client's waits over 50 ms, in order."""
    return [float(x) for x in re.findall(r"WAIT ms=([0-9.]+)", text)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", default="1024")
    ap.add_argument("--rate", default="20", help="MB/s the service rewrites")
    ap.add_argument("--runs", type=int, default=2, help="migrations per mode")
    ap.add_argument("--modes", default="lazy,eager,post",
                    help="which modes, comma-separated: lazy, eager, post")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the agents' logs (printed: where they are)")
    args = ap.parse_args()
    logdir = tempfile.mkdtemp(prefix="migrate-bench-")
    r = Rig(os.path.join(logdir, "rig"))
    r.env["MIGRATE_RIG_PREFIX"] = os.environ.get("MIGRATE_BENCH_RIG_PREFIX", "migbench")
    rows = []
    service = client = None
    try:
        r.up()
        r.run("A", "ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "eth0")
        service = RigWorkload.program(r, "A", logdir, "memservice", PORT, args.mib,
                                      args.rate, daemon=True)
        service.wait_for("READY", timeout=300)        # every page written: warm
        client = RigWorkload.program(r, "C", logdir, "pinger", SERVICE_IP, PORT, "1000")
        client.wait_ready()
        time.sleep(2)
        where = "A"
        modes = {"lazy": ("pre-copy, lazy fill", []),
                 "eager": ("pre-copy, eager fill", ["--restore-fill", "eager"]),
                 "post": ("post-copy", ["--post-copy", "on"])}
        want = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in want if m not in modes]
        if bad:
            ap.error(f"unknown mode(s): {', '.join(bad)} (lazy, eager, post)")
        for mode, extra in (modes[m] for m in want):
            for _ in range(args.runs):
                to = "B" if where == "A" else "A"
                before = len(waits(client.log()))
                rc, rec = r.migrate(where, to, service.pid, "--tcp-established",
                                    "--move-address", SERVICE_IP, *extra, timeout=600)
                if rc != 0:
                    print(json.dumps(rec, indent=2))
                    return 1
                service.moved(to)
                where = to
                time.sleep(3)
                new = waits(client.log())[before:]
                rows.append((mode, rec, max(new) if new else None))
        out = client.verdict()
        sout = service.verdict()
        ok = "PASS" in out and "PASS" in sout
    finally:
        for w in (client, service):
            if w is not None:
                try:
                    w.kill()
                except Exception:      # noqa: BLE001
                    pass
        if args.keep_logs:
            import shutil
            for h in ("A", "B"):
                for sub in ("agent.log", "work/logs"):
                    src = os.path.join(logdir, "rig", h, sub)
                    dst = os.path.join(logdir, "agents", h, sub)
                    if os.path.isdir(src):
                        shutil.copytree(src, dst, dirs_exist_ok=True)
                    elif os.path.exists(src):
                        os.makedirs(os.path.dirname(dst), exist_ok=True)
                        shutil.copy(src, dst)
            print(f"agents' logs: {os.path.join(logdir, 'agents')}")
        r.down()
    print(f"\nbench/migrate.py: a {args.mib} MiB service rewriting {args.rate} MB/s, a "
          f"client every 1 ms over TCP, --tcp-established --move-address, on the rig "
          f"(mutual TLS; load average {os.getloadavg()[0]:.1f})")
    print(f"{'mode':22} {'total s':>8} {'down ms':>8} {'client':>8} {'sent/size':>9} "
          f"{'rounds':>6}  stop: dump / address / restore / resume ms")
    for mode, m, gap in rows:
        s = m.get("stop") or {}
        ratio = m["bytes_transferred"] / max(m["bytes_total"], 1)
        print(f"{mode:22} {m['total_time']:8.2f} {m['downtime'] * 1e3:8.0f} "
              f"{(f'{gap:.0f}' if gap else '<50'):>8} {ratio:9.2f} {len(m['rounds']):6d}  "
              f"{s.get('frozen_for_dump', 0) * 1e3:.0f} / {s.get('address_seconds', 0) * 1e3:.0f}"
              f" / {s.get('build_seconds', 0) * 1e3:.0f} / {s.get('resume_seconds', 0) * 1e3:.0f}")
    print("client: the longest wait between two answers during that migration, ms")
    for mode, m, _ in rows:
        s = m.get("stop") or {}
        if s.get("post_copy_seconds") is not None:
            print(f"post-copy: {s.get('lazy_pages')} pages left at the source, all taken "
                  f"{s['post_copy_seconds']:.2f} s after the resume")
    print(f"client and service verdicts: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
