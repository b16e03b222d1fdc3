#!/usr/bin/env python3
"""The latency of a small image's commit at a page-server (printed, never
asserted): what the last dump of a post-copy migration pays, frozen, for
its image files.

A page-server as an agent runs it (``--serve``, mutual TLS, in a process of
its own) writes into ``--dir`` (default: under /tmp, a disk here, as on the
rig).  The client opens a session as a migration's worker does (2 streams,
opened before the timed part; see ``modes`` for fsync and the local
mirror directory), then, timed: ten
records files of the sizes of a final dump's, a pages file of 3 pages, and
the commit, until COMMITTED.  Each mode runs ``--reps`` times, interleaved;
best and median in ms, with the load average.

    python3 bench/pscommit.py [--reps 30] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from migrate.images._pb import inventory_pb2  # noqa: E402
from migrate.pageserver import certs, client, tls  # noqa: E402
from migrate.pageserver import protocol as P  # noqa: E402

PID = 4242
# name -> size: a one-process, one-connection final dump (bench/migrate.py's memservice)
FILES = {f"mm-{PID}.img": 1900, f"core-{PID}.img": 900, f"fdinfo-{PID}.img": 120,
         f"fs-{PID}.img": 40, "files.img": 700, "pipes.img": 12, "pstree.img": 40,
         "stats-dump.img": 80, f"pagemap-{PID}.img": 400, "tcp-queues.img": 64}


def _serve(root: str, paths: dict, q) -> None:
    import asyncio
    from migrate.pageserver.server import PageServer

    async def main():
        ctx = tls.server_context(paths["cacert"], paths["cert"], paths["key"])
        kw = {"allow_nosync": True} if "allow_nosync" in PageServer.__init__.__code__.co_varnames else {}
        srv = PageServer(root, "127.0.0.1", 0, ssl_context=ctx, serve=True, **kw)
        await srv.start()
        q.put(srv.port)
        await srv.done.wait()
    asyncio.run(main())


def one(port: int, paths: dict, session: str, mirror: str | None,
        nosync: bool) -> tuple[float, float]:
    """(open ms, write + commit ms)."""
    ctx = tls.client_context(paths["cacert"], paths["cert"], paths["key"])
    t0 = time.perf_counter()
    kw = {"sync": False} if nosync else {}
    sink = client.PageServerSink("127.0.0.1", port, session, ssl_context=ctx,
                                 server_hostname="localhost", streams=2, mirror=mirror, **kw)
    t1 = time.perf_counter()
    pw = sink.pages_writer(PID)
    d = pw.write_chunk(0, memoryview(os.urandom(3 * P.PAGE_SIZE)))
    pw.account(3, d)
    sink.add_pages(PID, pw)
    for name, size in FILES.items():
        sink._send_file(name, os.urandom(size))
    sink.commit(inventory_pb2.inventory_entry(tool_version="bench", root_pid=PID))
    t2 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-pscommit-", dir=args.dir)
    srv = None
    try:
        pki = os.path.join(tmp, "pki")
        certs.init(pki)
        certs.issue(pki, "localhost")
        paths = certs.paths(pki, "localhost")
        q = multiprocessing.Queue()
        srv = multiprocessing.Process(target=_serve, args=(os.path.join(tmp, "srv"), paths, q))
        srv.start()
        port = q.get(timeout=30)
        # durable: synced, with a mirror (the CLI; a worker's final dump
        # before CAP_NOSYNC); migration_final: a worker's final dump now
        # (no fsync, no mirror); migration_round: a pre-copy round's.
        modes = {"durable": (False, True)}
        if "sync" in client.PageServerSink.__init__.__code__.co_varnames:
            modes["migration_final"] = (True, False)
            modes["migration_round"] = (True, True)
        res: dict = {m: ([], []) for m in modes}
        for i in range(args.reps + 2):
            for m, (nosync, mirrored) in modes.items():
                mirror = os.path.join(tmp, "mirror", f"{m}{i}") if mirrored else None
                o, c = one(port, paths, f"{m}{i}", mirror, nosync)
                if i >= 2:          # warm-up
                    res[m][0].append(o)
                    res[m][1].append(c)
                shutil.rmtree(os.path.join(tmp, "srv", f"{m}{i}"), ignore_errors=True)
                if mirror:
                    shutil.rmtree(mirror, ignore_errors=True)
        out = {"dir": args.dir, "reps": args.reps, "load_average": os.getloadavg()}
        for m, (opens, commits) in res.items():
            out[f"{m}_open_ms"] = {"best": round(min(opens), 2),
                                   "median": round(statistics.median(opens), 2)}
            out[f"{m}_files_and_commit_ms"] = {"best": round(min(commits), 2),
                                               "median": round(statistics.median(commits), 2)}
        print(json.dumps(out, indent=1))
    finally:
        if srv is not None:
            srv.terminate()
            srv.join(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
