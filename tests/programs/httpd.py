"""httpd: an aiohttp server on a unix socket with a client connected.

The server (this process) listens on $PWD/httpd.sock and starts the client
as its child (the same file with --client): one keep-alive connection, a
request every 10 ms, each answer checked.  READY once 20 requests were
served.  After SIGTERM the server waits for 20 more requests on the same
connection (it must still work after a restore), stops the client, which
reports how many requests it made and whether any answer was wrong, and
prints the verdict.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from aiohttp import ClientSession, UnixConnector, web


def answer(n: int) -> str:
    return f"echo {n} {n * n}"


async def server(path: str) -> int:
    served = 0
    peers: set[int] = set()
    more = asyncio.Event()
    want = [20]

    async def handle(req: web.Request) -> web.Response:
        nonlocal served
        served += 1
        peers.add(id(req.transport))
        if served >= want[0]:
            more.set()
        return web.Response(text=answer(int(req.query["n"])))

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if os.path.exists(path):
        os.unlink(path)
    await web.UnixSite(runner, path).start()
    client = subprocess.Popen([sys.executable, __file__, "--client", path])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await more.wait()
    os.write(1, b"READY\n")
    await stop.wait()
    want[0], verdict = served + 20, ""
    more.clear()
    try:
        await asyncio.wait_for(more.wait(), 20)
    except asyncio.TimeoutError:
        verdict = f"FAIL: no requests after SIGTERM ({served} served)"
    client.send_signal(signal.SIGTERM)
    rc = await loop.run_in_executor(None, client.wait)
    if not verdict and rc != 0:
        verdict = f"FAIL: the client exited with {rc}"
    if not verdict and len(peers) != 1:
        verdict = f"FAIL: {len(peers)} connections, expected one kept alive"
    await runner.cleanup()
    os.write(1, ((verdict or f"PASS ({served} requests)") + "\n").encode())
    return 1 if verdict else 0


async def client(path: str) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    wrong: list[str] = []
    n = 0
    async with ClientSession(connector=UnixConnector(path=path, limit=1)) as s:
        while not stop.is_set():
            n += 1
            async with s.get(f"http://httpd/?n={n}") as r:
                text = await r.text()
            if r.status != 200 or text != answer(n):
                wrong.append(f"{n}: {r.status} {text!r}")
            try:
                await asyncio.wait_for(stop.wait(), 0.01)
            except asyncio.TimeoutError:
                pass
    os.write(1, f"client: {n} requests, {len(wrong)} wrong {wrong[:3]}\n".encode())
    return 1 if wrong else 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--client":
        sys.exit(asyncio.run(client(sys.argv[2])))
    sys.exit(asyncio.run(server(os.path.abspath("httpd.sock"))))
