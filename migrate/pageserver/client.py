"""The page-server client: an image sink (see images.ImageDir) that streams the
dump to a remote ``migrate page-server``.

Blocking sockets (with stdlib ssl): the dump's two worker threads call
``write_chunk`` at once; each hashes its chunk on its own core, then sends
the frame under one lock straight from its buffer (no copy), so at most two
chunks (the workers' own buffers) are in memory.  Before every frame it looks
for an ERROR from the server (disk full, checksum...) and raises it as a
PageServerError naming the server's reason.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time

import xxhash

from migrate import errors
from migrate.images import imgfile
from migrate.images.imgfile import (CHUNK_PAGES, PAGE_SIZE, PAGES_DATA_OFFSET, ImageKind,
                                    chunk_digest, pages_digest)
from migrate.pageserver import protocol as P

log = logging.getLogger(__name__)

FILE_PART = 4 << 20
CONNECT_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 120.0
COMMIT_TIMEOUT_S = 600.0   # the server syncs the whole image before it answers


class RemotePages:
    """pages_writer() of the sink: the PagesWriter interface over the wire."""

    def __init__(self, sink: "PageServerSink", pid: int) -> None:
        self.sink = sink
        self.pid = pid
        head = imgfile.header(ImageKind.PAGES).ljust(PAGES_DATA_OFFSET, b"\0")
        self.header_digest = chunk_digest(head)
        self.digests: list[bytes] = []
        self.nr_pages = 0

    @property
    def size(self) -> int:
        return PAGES_DATA_OFFSET + self.nr_pages * PAGE_SIZE

    def write_chunk(self, index: int, view) -> bytes:
        """Hash chunk ``index`` and send it; thread-safe; returns its digest."""
        if len(view) % PAGE_SIZE or not 0 < len(view) <= CHUNK_PAGES * PAGE_SIZE:
            raise ValueError(f"chunk of {len(view)} bytes")
        digest = chunk_digest(view)
        self.sink._send(P.PageChunk(self.pid, index, len(view) // PAGE_SIZE, digest, view))
        return digest

    def account(self, nr_pages: int, digest: bytes) -> None:
        self.nr_pages += nr_pages
        self.digests.append(digest)

    def close(self) -> tuple[int, str]:
        return self.size, pages_digest(self.header_digest, self.digests)

    def abort(self) -> None:
        """Nothing to free here: the sink's discard() aborts the session."""


class PageServerSink:
    """Streams an image to ``address:port`` as session ``session``."""

    def __init__(self, address: str, port: int, session: str, *,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None) -> None:
        try:
            P.check_session_name(session)
        except ValueError as e:
            raise errors.PageServerError(f"{address}:{port}", "BAD_NAME", str(e)) from None
        self.peer = f"{address}:{port}"
        self.session = session
        self.checksums: dict[str, tuple[int, str]] = {}
        self.inventory = None
        self.conn = P.Connection(P.Role.CLIENT)
        self._lock = threading.Lock()
        self._failed: errors.PageServerError | None = None
        self._closed = False
        self.bytes_sent = 0
        self.t0 = time.monotonic()
        try:
            raw = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            raise errors.PageServerError(self.peer, "CONNECTION",
                                         f"cannot connect: {e.strerror or e}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tls = ssl_context is not None
        try:
            if ssl_context is not None:
                self.sock = ssl_context.wrap_socket(raw, server_hostname=server_hostname or address)
            else:
                self.sock = raw
        except ssl.SSLError as e:
            raw.close()
            raise errors.PageServerError(self.peer, "TLS", f"TLS handshake failed: "
                                                           f"{e.reason or e}") from None
        except OSError as e:
            raw.close()
            raise errors.PageServerError(self.peer, "TLS", f"TLS handshake failed: {e}") \
                from None
        self.sock.settimeout(IO_TIMEOUT_S)
        try:
            self._sendall(self.conn.send_parts(P.Hello(session, P.MODE_WRITE)))
            ev = self._recv_event(CONNECT_TIMEOUT_S)
        except errors.PageServerError:
            self.sock.close()
            raise
        except (OSError, ssl.SSLError) as e:
            # TLS 1.3: the server checks our certificate after our handshake
            # completed; its alert arrives here.
            self.sock.close()
            why = getattr(e, "reason", None) or str(e)
            raise errors.PageServerError(self.peer, "TLS", f"the server closed the "
                                                           f"connection: {why}") from None
        if not isinstance(ev, P.Welcome):
            self.sock.close()
            raise self._error_from(ev, "HELLO")
        log.info("page-server %s: session %r open (%s, version %d)", self.peer, session,
                 self.sock.version() if self.tls else "plaintext", ev.version)

    # -- the wire ------------------------------------------------------------
    def _error_from(self, ev, when: str) -> errors.PageServerError:
        if isinstance(ev, P.Error):
            return errors.PageServerError(self.peer, ev.code_name,
                                          f"refused the session {self.session!r} ({when}): "
                                          f"{ev.code_name}: {ev.text}")
        return errors.PageServerError(self.peer, "CONNECTION",
                                      f"closed the connection ({when}) without a reason")

    def _sendall(self, parts) -> None:
        for p in parts:
            self.sock.sendall(p)
            self.bytes_sent += len(p)

    def _recv_event(self, timeout: float):
        """Block for the next event from the server (ERROR, WELCOME, COMMITTED)."""
        end = time.monotonic() + timeout
        while True:
            try:
                ev = self.conn.next_event()
            except P.ProtocolError as e:
                raise errors.PageServerError(self.peer, "PROTOCOL", str(e)) from None
            if ev is not P.NEED_DATA:
                return ev
            left = end - time.monotonic()
            if left <= 0:
                raise errors.PageServerError(self.peer, "CONNECTION",
                                             f"no answer in {timeout:.0f} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except (socket.timeout, TimeoutError):
                continue
            except (OSError, ssl.SSLError) as e:
                raise errors.PageServerError(self.peer, "CONNECTION",
                                             f"connection lost: {e}") from None
            finally:
                self.sock.settimeout(IO_TIMEOUT_S)
            self.conn.receive_data(data)

    def _incoming(self) -> bool:
        if self.tls and self.sock.pending():
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def _raise_server_error(self, cause: BaseException | None, when: str):
        """The server said something (or hung up): read its ERROR if any."""
        try:
            ev = self._recv_event(5.0)
        except errors.PageServerError as e:
            if cause is None:
                err = e
            else:
                err = errors.PageServerError(self.peer, "CONNECTION",
                                             f"connection lost while sending {when}: {cause}")
        else:
            err = self._error_from(ev, when)
        self._failed = err
        raise err from None

    def _send(self, ev) -> None:
        if self._failed is not None:
            raise self._failed
        with self._lock:
            if self._failed is not None:
                raise self._failed
            what = type(ev).__name__
            if self._incoming():
                self._raise_server_error(None, what)
            try:
                parts = self.conn.send_parts(ev)
            except P.LocalProtocolError as e:
                raise errors.PageServerError(self.peer, "PROTOCOL", str(e)) from None
            try:
                self._sendall(parts)
            except (OSError, ssl.SSLError) as e:
                self._raise_server_error(e, what)

    # -- the image sink ------------------------------------------------------
    def write_image(self, name: str, msgs) -> None:
        kind = imgfile.kind_of(name)
        if kind is None or kind in (ImageKind.PAGES, ImageKind.INVENTORY):
            raise ValueError(f"{name}: not a records image name")
        data = imgfile.encode_records(kind, msgs)
        self.checksums[name] = (len(data), xxhash.xxh3_128_hexdigest(data))
        view = memoryview(data)
        for off in range(0, len(data), FILE_PART):
            part = view[off:off + FILE_PART]
            self._send(P.FilePart(name, off, part, off + FILE_PART >= len(data)))

    def pages_writer(self, pid: int) -> RemotePages:
        self._send(P.PagesBegin(pid))
        return RemotePages(self, pid)

    def add_pages(self, pid: int, writer: RemotePages) -> None:
        self.checksums[f"pages-{pid}.img"] = writer.close()

    def set_parent(self, rel: str) -> None:
        self._send(P.SetParent(rel))

    def commit(self, inv) -> None:
        """Send the inventory; return once the server has everything synced."""
        del inv.files[:]
        for name in sorted(self.checksums):
            size, digest = self.checksums[name]
            inv.files.add(name=name, size=size, xxh3_128=digest)
        inv.format_version = imgfile.FORMAT_VERSION
        if not inv.created_ns:
            inv.created_ns = time.time_ns()
        self._send(P.Commit(imgfile.encode_records(ImageKind.INVENTORY, [inv])))
        ev = self._recv_event(COMMIT_TIMEOUT_S)
        if not isinstance(ev, P.Committed):
            self._failed = self._error_from(ev, "COMMIT")
            raise self._failed
        self.inventory = inv
        dt = time.monotonic() - self.t0
        log.info("page-server %s: session %r committed, %d files, %.1f MiB in %.2f s",
                 self.peer, self.session, ev.nr_files, ev.nbytes / 2**20, dt)
        self.close()

    def discard(self) -> None:
        """Abort the session: the server removes what it wrote."""
        if self._closed:
            return
        if self._failed is None and self.conn.state is P.State.WRITE:
            try:
                with self._lock:
                    self._sendall(self.conn.send_parts(P.Abort("the dump failed")))
            except (OSError, ssl.SSLError, P.ProtocolError):
                pass
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.tls:
                self.sock.settimeout(2)
                try:
                    self.sock.unwrap()
                except (OSError, ssl.SSLError, ValueError):
                    pass
            self.sock.close()
        except OSError:
            pass
