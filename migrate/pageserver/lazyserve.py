"""`migrate dump --lazy-pages`: answer the lazy-pages daemon's GETs from the
frozen process (read sessions of docs/protocol.md, served by ``read``).

A small server of its own next to ``server.py`` (which serves committed
images): one session name (the image's directory name), read mode only,
each GET answered in order with PAGE_DATA and its xxh3-128.  It returns
once the daemon says DONE (CAP_DONE: it has every page), or gives up (an
ERROR from it: status 1), or once no connection of a daemon that was granted
CAP_DONE has been open for ``grace`` seconds (status 1); a daemon without
CAP_DONE ends it by closing its lanes (faults and prefetch).  SIGTERM/SIGINT
stop it too (then with pages maybe still untaken: status 1).  Connections
closing never end it on their own: the frozen process is the only copy of
the pages the destination has not taken yet.

Each connection is served by a thread of its own with blocking I/O: a
fault's GET is answered without an event loop's wake-ups on the way (the
daemon's fault lane waits for it with the faulting thread blocked).  The
pages are read (process_vm_readv) straight into the response buffer, after
the frame's header, hashed there and sent with one write.  The asyncio
loop only accepts connections and waits for the end.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
import sys
import threading

from migrate import errors
from migrate.images.imgfile import chunk_digest
from migrate.pageserver import client
from migrate.pageserver import protocol as P

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
HANDSHAKE_TIMEOUT_S = 30.0
PAGE = P.PAGE_SIZE
RESPONSE_HEAD = P.HEADER.size + 32    # PAGE_DATA's header and fields, before the data
# A thread woken for a fault takes the GIL from a busy one (the prefetch
# lane's) after at most this long (sys.setswitchinterval; 5 ms by default).
SWITCH_INTERVAL_S = 0.0002
# With CAP_DONE: how long the source waits for a connection again once
# every connection of its daemon has closed without DONE.
GRACE_S = float(os.environ.get("MIGRATE_LAZY_GRACE_S", "60"))
# Runs per PAGE_MAP frame: each is encoded in one C call holding the GIL
# (and decoded likewise by the daemon): small enough not to make a fault's
# answer wait for it.
MAP_FRAME_RUNS = 4096


class _Lane:
    """One connection, served on its own thread (see the module doc)."""

    def __init__(self, srv: "LazyServer", raw: socket.socket, peer) -> None:
        self.srv = srv
        self.raw = raw
        self.sock = raw
        self.conn = P.Connection(P.Role.SERVER)
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.out = bytearray()            # the response frame, reused
        self.handlers = {P.Hello: self.on_Hello, P.Get: self.on_Get, P.GetMap: self.on_GetMap,
                         P.GetRuns: self.on_GetRuns, P.Error: self.on_Error,
                         P.Done: self.on_Done}
        self.thread = threading.Thread(target=self.run, name=f"lazy-serve {self.peer}",
                                       daemon=True)

    def shutdown(self) -> None:
        """From the loop: make a blocked recv return (the server stops)."""
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        counted = False
        try:
            self.raw.setblocking(True)
            self.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.detect_dead_peer(self.raw)   # (then the grace period runs)
            if self.srv.ssl is not None:
                self.raw.settimeout(HANDSHAKE_TIMEOUT_S)
                self.sock = self.srv.ssl.wrap_socket(self.raw, server_side=True)
                self.sock.settimeout(None)
            self.srv._opened()
            counted = True
            self._serve()
        except P.RemoteProtocolError as e:
            log.warning("lazy-pages source: %s: %s", self.peer, e)
            self._error(getattr(e, "code", P.Code.PROTOCOL), str(e))
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.warning("lazy-pages source: %s: %s: %s", self.peer,
                        "connection lost" if counted else "refused", e)
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            if counted:
                self.srv._closed()

    def _serve(self) -> None:
        while True:
            data = self.sock.recv(READ_SIZE)
            self.conn.receive_data(data)
            while True:
                ev = self.conn.next_event()
                if ev is P.NEED_DATA:
                    break
                if isinstance(ev, P.ConnectionClosed):
                    return
                self.handlers.get(type(ev), self.on_other)(ev)
                if isinstance(ev, (P.Error, P.Done)):
                    return

    def _error(self, code, text: str) -> None:
        try:
            self.sock.sendall(self.conn.send(P.Error(code, text[:P.MAX_ERROR_TEXT])))
        except (P.ProtocolError, OSError, ValueError):
            pass

    def on_Hello(self, ev: P.Hello) -> None:
        if ev.version not in P.SUPPORTED_VERSIONS or ev.mode != P.MODE_READ \
                or ev.name != self.srv.session:
            self._error(P.Code.NOT_FOUND, f"this source serves read session "
                                          f"{self.srv.session!r} only")
            raise ConnectionError(f"refused session {ev.name!r} mode {ev.mode}")
        caps = P.CAP_GET | P.CAP_RUNS | P.CAP_DONE | \
            (P.CAP_MAP if self.srv.map_of is not None else 0)
        granted = caps & (ev.caps | P.CAP_GET)
        self.sock.sendall(self.conn.send(P.Welcome(P.VERSION, granted)))
        if granted & P.CAP_DONE:
            self.srv._says_done()
        log.info("lazy-pages source: %s: read session %r", self.peer, ev.name)

    def on_Get(self, ev: P.Get) -> None:
        self._answer(ev.req_id, ev.pid, ((ev.vaddr, ev.nr_pages),), ev.nr_pages)

    def on_GetRuns(self, ev: P.GetRuns) -> None:
        self._answer(ev.req_id, ev.pid, ev.runs, ev.nr_pages)

    def _answer(self, req_id: int, pid: int, runs, nr_pages: int) -> None:
        """One PAGE_DATA: the runs' pages one after the other."""
        n = nr_pages * PAGE
        if len(self.out) < RESPONSE_HEAD + n:
            self.out = bytearray(RESPONSE_HEAD + n)
        frame = memoryview(self.out)[:RESPONSE_HEAD + n]
        data = frame[RESPONSE_HEAD:]
        try:
            if len(runs) == 1 or self.srv.read_runs is None:
                off = 0
                for vaddr, nr in runs:
                    self.srv.read(pid, vaddr, nr, into=data[off:off + nr * PAGE])
                    off += nr * PAGE
            else:
                self.srv.read_runs(pid, runs, data)
        except (LookupError, errors.MigrateError) as e:
            self._error(P.Code.NOT_FOUND, str(e))
            raise ConnectionError(str(e)) from None
        head, body = self.conn.send_parts(
            P.PageData(req_id, runs[0][0], nr_pages, chunk_digest(data), data))
        assert len(head) == RESPONSE_HEAD and body is data
        frame[:RESPONSE_HEAD] = head
        self.sock.sendall(frame)          # one write: no Nagle/delayed-ACK stall

    def on_GetMap(self, ev: P.GetMap) -> None:
        """The map of pid's lazy area, once computed (this thread waits for
        it; the connection's GETs after it wait too: answers go in order)."""
        try:
            runs = self.srv.map_of(ev.pid)
        except LookupError as e:
            self._error(P.Code.NOT_FOUND, str(e))
            raise ConnectionError(str(e)) from None
        step = MAP_FRAME_RUNS
        for i in range(0, max(len(runs), 1), step):
            part = tuple(runs[i:i + step])
            self.sock.sendall(self.conn.send(P.PageMap(ev.req_id, ev.pid, part,
                                                       last=i + step >= len(runs))))
        log.info("lazy-pages source: %s: map of pid %d sent (%d runs)", self.peer, ev.pid,
                 len(runs))

    def on_Error(self, ev: P.Error) -> None:
        log.warning("lazy-pages source: %s: %s: %s", self.peer, ev.code_name, ev.text)
        self.srv._ended(f"the destination gave up: {ev.code_name}: {ev.text}")

    def on_Done(self, ev: P.Done) -> None:
        log.info("lazy-pages source: %s: DONE", self.peer)
        self.srv._ended(None)

    def on_other(self, ev) -> None:
        self._error(P.Code.PROTOCOL, f"unexpected {type(ev).__name__}")
        raise ConnectionError(f"unexpected {type(ev).__name__}")


class LazyServer:
    """``read(pid, vaddr, nr_pages, into=view)`` fills ``view`` with the
    pages (LookupError if they are not served here); it is called from the
    connections' threads at once.  ``read_runs(pid, runs, into)``, if
    given, reads the runs of a GET_RUNS at once.  ``map_of(pid)``, if given,
    answers GET_MAP (CAP_MAP): (vaddr, nr_pages, kind) runs, or LookupError."""

    def __init__(self, read, session: str, address: str, port: int, ssl_context,
                 lanes: int = 2, map_of=None, read_runs=None, grace: float = GRACE_S
                 ) -> None:
        self.read, self.session = read, session
        self.read_runs = read_runs
        self.map_of = map_of
        self.address, self.port, self.ssl = address, port, ssl_context
        self.lanes = lanes
        self.opened = self.closed = 0
        self.grace = grace
        self.done_aware = False          # a client was granted CAP_DONE
        self.failure: str | None = None  # it gave up (ERROR), or never came back
        self._idle: asyncio.TimerHandle | None = None
        self.done = asyncio.Event()
        self.loop = None
        self.bound_port = None
        self.cancelled = None
        self._live: list[_Lane] = []

    def stop(self, why: str) -> None:
        """From another thread: stop serving (a migration rolled back)."""
        self.cancelled = why
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.done.set)

    # from the lanes' threads
    def _opened(self) -> None:
        self.loop.call_soon_threadsafe(self._count, 1)

    def _closed(self) -> None:
        self._soon(self._count, -1)

    def _says_done(self) -> None:
        self._soon(setattr, self, "done_aware", True)

    def _ended(self, failure: str | None) -> None:
        """DONE (None) or the client's ERROR: the session is over."""
        def end() -> None:
            if failure is not None and self.failure is None:
                self.failure = failure
            self.done.set()
        self._soon(end)

    def _soon(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:        # the loop is closed: the server is done anyway
            pass

    def _count(self, d: int) -> None:
        if d > 0:
            self.opened += 1
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            return
        self.closed += 1
        if not self.done_aware:
            if self.closed >= self.lanes:
                self.done.set()
        elif self.closed >= self.opened and self._idle is None:
            # every connection closed without DONE: wait for it to come back
            self._idle = self.loop.call_later(self.grace, self._gone)

    def _gone(self) -> None:
        self._idle = None
        if self.failure is None:
            self.failure = (f"the destination closed its connections without saying it had "
                            f"every page, and did not come back in {self.grace:.0f} s")
        self.done.set()

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            raw, peer = await self.loop.sock_accept(listener)
            lane = _Lane(self, raw, peer)
            self._live = [x for x in self._live if x.thread.is_alive()] + [lane]
            lane.thread.start()

    def _listen(self) -> socket.socket:
        try:
            infos = socket.getaddrinfo(self.address, self.port, type=socket.SOCK_STREAM)
            family = infos[0][0]
            s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:
            raise errors.MigrateError(f"lazy-pages: cannot listen on {self.address}:"
                                      f"{self.port}: {e.strerror or e}") from None
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
            s.listen(8)
        except OSError as e:
            s.close()
            raise errors.MigrateError(f"lazy-pages: cannot listen on {self.address}:"
                                      f"{self.port}: {e.strerror or e}") from None
        s.setblocking(False)
        return s

    async def run(self, on_listen=None, signals: bool = True) -> int:
        """Serve until the daemon says DONE (or gives up, or is gone; see the
        module doc).  ``on_listen(port)`` once listening; ``signals``:
        SIGTERM/SIGINT stop it (main thread only)."""
        listener = self._listen()
        loop = asyncio.get_running_loop()
        self.loop = loop
        stopped = []
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, lambda s=sig: (stopped.append(s),
                                                            self.done.set()))
        self.bound_port = listener.getsockname()[1]
        if on_listen is not None:
            on_listen(self.bound_port)
        log.info("lazy-pages: serving session %r on %s:%d (%s)", self.session, self.address,
                 self.bound_port, "TLS" if self.ssl else "plaintext")
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
        # The dump's objects stay out of the cyclic GC's full collections
        # while we serve (one could stall a fault's answer for milliseconds).
        gc.freeze()
        accept = asyncio.create_task(self._accept(listener))
        try:
            await self.done.wait()
        finally:
            accept.cancel()
            try:
                await accept
            except (asyncio.CancelledError, OSError):
                pass
            listener.close()
            for lane in self._live:
                lane.shutdown()
            for lane in self._live:
                lane.thread.join(5)
            sys.setswitchinterval(switch)
            gc.unfreeze()
        if self._idle is not None:
            self._idle.cancel()
        if self.cancelled:
            log.info("lazy-pages: stopped (%s)", self.cancelled)
            return 1
        if self.failure:
            log.error("lazy-pages: %s", self.failure)
            return 1
        if stopped:
            log.warning("lazy-pages: stopped by %s with the destination connected %d times",
                        signal.Signals(stopped[0]).name, self.opened)
            return 1
        log.info("lazy-pages: the destination took every page it wanted, done")
        return 0


def serve(read, session: str, address: str, port: int, ssl_context, read_runs=None) -> int:
    """Serve ``read(pid, vaddr, nr_pages, into)`` until the daemon is done."""
    return asyncio.run(LazyServer(read, session, address, port, ssl_context,
                                  read_runs=read_runs).run())
