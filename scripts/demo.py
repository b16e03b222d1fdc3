#!/usr/bin/env python3
"""`make demo`: live-migrate a busy service between two hosts.

Brings up the rig (hosts A, B and a client host C on one machine:
deploy/rig), starts on A a service holding 512 MiB of state it keeps
rewriting (tests/programs/memservice.c, 20 MB/s) at a service address, and
on C a client that asks it something every millisecond over TCP
(pinger.c).  Then, with live progress:

    migrate run --src A --dst B --pid N --tcp-established --move-address IP

and shows that the client never saw an error (its longest wait is the
downtime it felt), that the service goes on on B with every page of its
state intact, and the downtime measured.  Tears the rig down.

    MIGRATE_DEMO_MIB=128 make demo      # a smaller service
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from tests.integration.rigtest import Rig, RigWorkload  # noqa: E402

MIB = os.environ.get("MIGRATE_DEMO_MIB", "512")
SERVICE_IP = "10.232.0.100"
PORT = "7100"


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (namespaces, ptrace)", file=sys.stderr)
        return 2
    logdir = tempfile.mkdtemp(prefix="migrate-demo-")
    os.environ.setdefault("MIGRATE_RIG_PREFIX", "migdemo")
    r = Rig(os.path.join(logdir, "rig"))
    r.env["MIGRATE_RIG_PREFIX"] = os.environ["MIGRATE_RIG_PREFIX"]
    service = client = None
    rc = 1
    try:
        say("bringing up the rig: hosts A and B, client C, an agent on each (mutual TLS)")
        r.up()
        r.run("A", "ip", "addr", "add", f"{SERVICE_IP}/32", "dev", "eth0")
        say(f"on A: a service with {MIB} MiB of state, rewriting 20 MB/s of it, at "
            f"{SERVICE_IP}:{PORT}")
        service = RigWorkload.program(r, "A", logdir, "memservice", PORT, MIB, "20",
                                      daemon=True)
        service.wait_for("READY", timeout=120)
        say(f"on C: a client asking it something every millisecond")
        client = RigWorkload.program(r, "C", logdir, "pinger", SERVICE_IP, PORT, "1000")
        client.wait_ready()
        time.sleep(2)
        say(f"migrate run --src A --dst B --pid {service.pid} --tcp-established "
            f"--move-address {SERVICE_IP}")
        cmd = r.run_argv("C", sys.executable, "-m", "migrate", "run", "--inventory",
                         r.inventory, "--src", "A", "--dst", "B", "--pid", str(service.pid),
                         "--tcp-established", "--move-address", SERVICE_IP)
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            say("the migration failed: the service still runs on A")
            return 1
        service.moved("B")
        time.sleep(2)
        say("the service answers from B; the client's verdict:")
        out = client.verdict()
        print("   " + "\n   ".join(line for line in out.splitlines() if "GAP" not in line))
        gap = re.search(r"longest gap ([0-9.]+) ms", out)
        say(f"the service's own check of its {MIB} MiB on B:")
        sout = service.verdict()
        print("   " + "\n   ".join(sout.splitlines()))
        rec = json.loads(r.run("C", sys.executable, "-m", "migrate", "status",
                               "--inventory", r.inventory, "--json", "--host", "A").stdout)
        last = [m for m in rec if m["role"] == "source"][-1]
        ok = "PASS" in out and "PASS" in sout and "FAIL" not in out + sout
        say(f"downtime: {last['downtime'] * 1e3:.0f} ms measured by the orchestrator, "
            f"{gap.group(1) if gap else '?'} ms the longest the client waited for an "
            f"answer; the client saw {'no error' if ok else 'an ERROR'}")
        rc = 0 if ok else 1
    finally:
        for w in (client, service):
            if w is not None:
                try:
                    w.kill()
                except Exception:      # noqa: BLE001 - tearing down
                    pass
        say("tearing the rig down")
        r.down()
        shutil.rmtree(logdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
