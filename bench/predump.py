#!/usr/bin/env python3
"""Pre-dump figures (printed, never asserted).

A warmed-up SIZE MiB process (1024 by default) dirties 1% of its pages
between rounds.  Prints per pre-dump round: the time the process was frozen,
the dirty scan time, the pages written against the pages dirtied; then the
final dump's frozen time after 3 rounds against a full dump's, and the
tool's peak RSS.

    python3 bench/predump.py [--mib 1024] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.dump_restore import BIN, run_migrate, start, wait_ready, warm_machine  # noqa: E402
from migrate.kernel import syscalls  # noqa: E402


def dirty(pid: int, log: str, count: int) -> int:
    """Ask the process to rewrite 1% of its pages; wait until it has."""
    os.kill(pid, signal.SIGUSR1)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        lines = [l for l in open(log).read().splitlines() if l.startswith("DIRTIED ")]
        if len(lines) >= count:
            return int(lines[-1].split()[1])
        time.sleep(0.01)
    raise SystemExit("the process did not dirty its pages")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(os.path.join(BIN, "memhog")):
        raise SystemExit("tests/programs/bin/memhog is missing: run `make build` first")
    syscalls.set_child_subreaper()
    work = tempfile.mkdtemp(prefix="migrate-predump-", dir="/dev/shm")
    try:
        warm = 3 * args.mib << 20
        print(f"warm-up: touched {warm >> 20} MiB in {warm_machine(warm):.2f} s")
        log = os.path.join(work, "memhog.log")
        p = start([os.path.join(BIN, "memhog"), str(args.mib)], log)
        wait_ready(log)
        full, _, full_rss = run_migrate("dump", "-t", str(p.pid), "-D",
                                        os.path.join(work, "full"), "-R")
        full_frozen = int(full["frozen_us"]) / 1e6
        print(f"full dump (-R, reference): frozen {full_frozen * 1000:.1f} ms, "
              f"{full['pages_written']} pages")
        shutil.rmtree(os.path.join(work, "full"))
        rss = [full_rss]
        print(f"\n{'round':>5} {'frozen':>10} {'scan':>9} {'written':>8} {'dirtied':>8} "
              f"{'in parent':>9} {'extra':>7}")
        dirtied = 0
        for r in range(args.rounds + 1):
            extra = ["--prev-images-dir", f"../pre{r - 1}"] if r else []
            st, _, peak = run_migrate("pre-dump", "-t", str(p.pid), "-D",
                                      os.path.join(work, f"pre{r}"), *extra)
            rss.append(peak)
            written = int(st["pages_written"])
            ex = f"{(written - dirtied) / dirtied * 100:+.1f}%" if r else ""
            print(f"{r:>5} {int(st['frozen_us']) / 1000:>7.2f} ms {int(st['scan_us']) / 1000:>6.2f}"
                  f" ms {written:>8} {dirtied if r else '-':>8} {st['pages_in_parent']:>9} {ex:>7}")
            dirtied = dirty(p.pid, log, r + 1)
        st, _, peak = run_migrate("dump", "-t", str(p.pid), "-D", os.path.join(work, "final"),
                                  "--prev-images-dir", f"../pre{args.rounds}")
        rss.append(peak)
        p.wait()
        final = int(st["frozen_us"]) / 1e6
        print(f"\nfinal dump after {args.rounds} rounds: frozen {final * 1000:.1f} ms, "
              f"{st['pages_written']} pages written ({dirtied} dirtied), "
              f"{final / full_frozen * 100:.1f}% of the full dump's frozen time (target <= 5%)")
        r, _, peak = run_migrate("restore", "-D", os.path.join(work, "final"), "-d")
        rss.append(peak)
        os.kill(p.pid, signal.SIGTERM)
        _, status = os.waitpid(p.pid, 0)
        print(f"restored from the chain in {int(r['restore_us']) / 1000:.1f} ms: "
              f"{'PASS' if os.waitstatus_to_exitcode(status) == 0 else 'FAIL'}")
        print(f"peak RSS of the tool: {max(rss) / 1024:.1f} MiB (target <= 64)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
