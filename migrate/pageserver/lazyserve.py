"""`migrate dump --lazy-pages`: serve the image just dumped to one lazy-pages
daemon (read sessions, GET), then exit once it has hung up.

Uses the page-server as it is (``PageServer`` with many sessions, rooted at
the image's parent directory, the session being the image's directory
name); the daemon opens two read connections (faults and prefetch) and
closes both when every page is in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from migrate.pageserver.server import PageServer

log = logging.getLogger(__name__)

POLL_S = 0.05


async def _serve(images_dir: str, address: str, port: int, ssl_context, lanes: int) -> int:
    d = os.path.abspath(images_dir)
    srv = PageServer(os.path.dirname(d), address, port, ssl_context=ssl_context, serve=True)
    await srv.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("lazy-pages: serving %s as session %r on %s:%d", d, os.path.basename(d),
             address, srv.port)
    while not stop.is_set():
        if srv.sessions_done >= lanes and not srv.tasks:
            break
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
        except asyncio.TimeoutError:
            pass
    await srv.shutdown()
    log.info("lazy-pages: %d read sessions served, done", srv.sessions_done)
    return 0 if not stop.is_set() else 1


def serve(images_dir: str, address: str, port: int, ssl_context, lanes: int = 2) -> int:
    return asyncio.run(_serve(images_dir, address, port, ssl_context, lanes))
