"""`migrate dump --lazy-pages`: answer the lazy-pages daemon's GETs from the
frozen process (read sessions of docs/protocol.md, served by ``read``).

A small server of its own next to ``server.py`` (which serves committed
images): one session name (the image's directory name), read mode only,
each GET answered in order with PAGE_DATA and its xxh3-128.  It returns
once the daemon has opened and closed its lanes (faults and prefetch), or
on SIGTERM/SIGINT (then with pages maybe still untaken: status 1).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from migrate import errors
from migrate.images.imgfile import chunk_digest
from migrate.pageserver import protocol as P

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20


class _Lane:
    def __init__(self, srv: "LazyServer", reader, writer) -> None:
        self.srv = srv
        self.reader, self.writer = reader, writer
        self.conn = P.Connection(P.Role.SERVER)
        pn = writer.get_extra_info("peername")
        self.peer = f"{pn[0]}:{pn[1]}" if pn else "?"

    async def run(self) -> None:
        try:
            while True:
                ev = self.conn.next_event()
                if ev is P.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(READ_SIZE))
                    continue
                if isinstance(ev, P.ConnectionClosed):
                    return
                await getattr(self, "on_" + type(ev).__name__, self.on_other)(ev)
                if isinstance(ev, P.Error):
                    return
        except P.RemoteProtocolError as e:
            log.warning("lazy-pages source: %s: %s", self.peer, e)
            self._error(getattr(e, "code", P.Code.PROTOCOL), str(e))
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.warning("lazy-pages source: %s: connection lost: %s", self.peer, e)
        finally:
            self.writer.close()

    def _error(self, code, text: str) -> None:
        try:
            self.writer.write(self.conn.send(P.Error(code, text[:P.MAX_ERROR_TEXT])))
        except (P.ProtocolError, OSError):
            pass

    async def on_Hello(self, ev: P.Hello) -> None:
        if ev.version not in P.SUPPORTED_VERSIONS or ev.mode != P.MODE_READ \
                or ev.name != self.srv.session:
            self._error(P.Code.NOT_FOUND, f"this source serves read session "
                                          f"{self.srv.session!r} only")
            raise ConnectionError(f"refused session {ev.name!r} mode {ev.mode}")
        self.writer.write(self.conn.send(P.Welcome(P.VERSION, P.CAP_GET)))
        log.info("lazy-pages source: %s: read session %r", self.peer, ev.name)

    async def on_Get(self, ev: P.Get) -> None:
        try:
            data = self.srv.read(ev.pid, ev.vaddr, ev.nr_pages)
        except (LookupError, errors.MigrateError) as e:
            self._error(P.Code.NOT_FOUND, str(e))
            raise ConnectionError(str(e)) from None
        self.writer.write(b"".join(bytes(p) for p in self.conn.send_parts(
            P.PageData(ev.req_id, ev.vaddr, ev.nr_pages, chunk_digest(data), data))))
        await self.writer.drain()

    async def on_Error(self, ev: P.Error) -> None:
        log.warning("lazy-pages source: %s: %s: %s", self.peer, ev.code_name, ev.text)

    async def on_other(self, ev) -> None:
        self._error(P.Code.PROTOCOL, f"unexpected {type(ev).__name__}")
        raise ConnectionError(f"unexpected {type(ev).__name__}")


class LazyServer:
    def __init__(self, read, session: str, address: str, port: int, ssl_context,
                 lanes: int = 2) -> None:
        self.read, self.session = read, session
        self.address, self.port, self.ssl = address, port, ssl_context
        self.lanes = lanes
        self.opened = self.closed = 0
        self.done = asyncio.Event()
        self.loop = None
        self.bound_port = None
        self.cancelled = None

    def stop(self, why: str) -> None:
        """From another thread: stop serving (a migration rolled back)."""
        self.cancelled = why
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.done.set)

    async def _accept(self, reader, writer) -> None:
        self.opened += 1
        try:
            await _Lane(self, reader, writer).run()
        finally:
            self.closed += 1
            if self.closed >= self.lanes:
                self.done.set()

    async def run(self, on_listen=None, signals: bool = True) -> int:
        """Serve until the daemon's lanes are done.  ``on_listen(port)`` once
        listening; ``signals``: SIGTERM/SIGINT stop it (main thread only)."""
        try:
            srv = await asyncio.start_server(self._accept, self.address, self.port,
                                             ssl=self.ssl, reuse_address=True,
                                             limit=READ_SIZE)
        except OSError as e:
            raise errors.MigrateError(f"lazy-pages: cannot listen on {self.address}:"
                                      f"{self.port}: {e.strerror or e}") from None
        loop = asyncio.get_running_loop()
        self.loop = loop
        stopped = []
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda s=sig: (stopped.append(s),
                                                            self.done.set()))
        self.bound_port = srv.sockets[0].getsockname()[1]
        if on_listen is not None:
            on_listen(self.bound_port)
        log.info("lazy-pages: serving session %r on %s:%d (%s)", self.session, self.address,
                 srv.sockets[0].getsockname()[1], "TLS" if self.ssl else "plaintext")
        await self.done.wait()
        srv.close()
        await srv.wait_closed()
        if self.cancelled:
            log.info("lazy-pages: stopped (%s)", self.cancelled)
            return 1
        if stopped:
            log.warning("lazy-pages: stopped by %s with the destination connected %d times",
                        signal.Signals(stopped[0]).name, self.opened)
            return 1
        log.info("lazy-pages: the destination took every page it wanted, done")
        return 0


def serve(read, session: str, address: str, port: int, ssl_context) -> int:
    """Serve ``read(pid, vaddr, nr_pages) -> bytes`` until the daemon is done."""
    return asyncio.run(LazyServer(read, session, address, port, ssl_context).run())
