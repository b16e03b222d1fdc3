"""The page-server client: an image sink (see images.ImageDir) that streams the
dump to a remote ``migrate page-server``.

Blocking sockets (with stdlib ssl): the dump's two worker threads call
``write_chunk`` at once; each hashes its chunk on its own core (and, with
``compress``, zstd-compresses it), then sends the frame straight from its
buffer (no copy): on a stream of its own when the server granted several,
else under the one stream's lock.  So at most two chunks (the workers' own
buffers) are in memory.  Before every frame it looks for an ERROR from the
server on that stream (disk full, checksum...) and raises it as a
PageServerError naming the server's reason.  With ``max_bandwidth`` every
byte sent on any of the session's streams first goes through one shared
token bucket (pacing.RateLimit), a slice at a time.
"""

from __future__ import annotations

import logging
import queue
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
from migrate.pageserver.pacing import RateLimit

try:
    import zstandard
except ImportError:           # optional: --compress then says so
    zstandard = None

log = logging.getLogger(__name__)

FILE_PART = 4 << 20
# Records files up to this much in all are held and sent in one write with
# the next frame: a dump's files, written one after the other at its end,
# go with the COMMIT (one write here, one read and one batch at the server).
HOLD_MAX = 256 << 10
CONNECT_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 120.0
COMMIT_TIMEOUT_S = 600.0   # the server syncs the whole image before it answers
DEAD_PEER_S = 30.0         # a blocking read session gives up on a silent peer
SOCKET_BUFFER = 4 << 20    # SO_SNDBUF: a chunk's worth in flight (net.core.wmem_max caps it)
ZSTD_LEVEL = 1             # fast: compression must cost less than the link it saves


class RawBuffer:
    """A raw image for the page server, gathered in memory (the caller's
    buffers are reused: each append is copied)."""

    def __init__(self, head: bytes) -> None:
        self.data = bytearray(head)
        self._head = len(head)

    def append(self, view) -> int:
        off = len(self.data) - self._head
        self.data += view
        return off

    def abort(self) -> None:
        self.data = bytearray()


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
        nr = len(view) // PAGE_SIZE
        data, compressed = self.sink._compress(view)
        self.sink._send_chunk(P.PageChunk(self.pid, index, nr, digest, data, compressed))
        return digest

    def account(self, nr_pages: int, digest: bytes) -> None:
        self.nr_pages += nr_pages
        self.digests.append(digest)

    def close(self) -> tuple[int, str]:
        return self.size, pages_digest(self.header_digest, self.digests)

    def abort(self) -> None:
        """Nothing to free here: the sink's discard() aborts the session."""


def _error_from(client, ev, when: str) -> errors.PageServerError:
    if isinstance(ev, P.Error):
        return errors.PageServerError(client.peer, ev.code_name,
                                      f"refused the session {client.session!r} ({when}): "
                                      f"{ev.code_name}: {ev.text}")
    return errors.PageServerError(client.peer, "CONNECTION",
                                  f"closed the connection ({when}) without a reason")


class _Wire:
    """One TCP (TLS) connection of the session and its protocol state."""

    def __init__(self, sink: "PageServerSink", number: int) -> None:
        self.sink = sink
        self.peer = sink.peer
        self.number = number
        self.conn = P.Connection(P.Role.CLIENT)
        self.lock = threading.Lock()
        self.failed: errors.PageServerError | None = None
        self.tls = sink.ssl_context is not None
        self.bytes_sent = 0
        self.held: list[bytes] = []      # encoded frames not sent yet (hold)
        self.held_bytes = 0
        self.pacing: RateLimit | None = getattr(sink, "pacing", None)
        try:
            raw = socket.create_connection((sink.address, sink.port),
                                           timeout=CONNECT_TIMEOUT_S)
        except OSError as e:
            raise errors.PageServerError(self.peer, "CONNECTION",
                                         f"cannot connect: {e.strerror or e}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        except OSError:
            pass
        try:
            if self.tls:
                self.sock = sink.ssl_context.wrap_socket(
                    raw, server_hostname=sink.server_hostname or sink.address)
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

    def open(self, first) -> P.Welcome:
        """Send HELLO or JOIN; return the WELCOME (or raise the server's reason)."""
        what = type(first).__name__.upper()
        try:
            self.sendall(self.conn.send_parts(first))
            ev = self.recv_event(CONNECT_TIMEOUT_S)
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
            raise _error_from(self.sink, ev, what)
        return ev

    def sendall(self, parts) -> None:
        for p in parts:
            if self.pacing is None:
                self.sock.sendall(p)
            else:
                view, step = memoryview(p), self.pacing.slice
                for off in range(0, len(view), step):
                    piece = view[off:off + step]
                    self.pacing.take(len(piece))
                    self.sock.sendall(piece)
            self.bytes_sent += len(p)

    def recv_event(self, timeout: float):
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

    def incoming(self) -> bool:
        if self.tls and self.sock.pending():
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def raise_server_error(self, cause: BaseException | None, when: str):
        """The server said something (or hung up): read its ERROR if any."""
        try:
            ev = self.recv_event(5.0)
        except errors.PageServerError as e:
            if cause is None:
                err = e
            else:
                err = errors.PageServerError(self.peer, "CONNECTION",
                                             f"connection lost while sending {when}: {cause}")
        else:
            err = _error_from(self.sink, ev, when)
        self.failed = err
        raise err from None

    def _encode(self, ev) -> list:
        try:
            return self.conn.send_parts(ev)
        except P.LocalProtocolError as e:
            raise errors.PageServerError(self.peer, "PROTOCOL", str(e)) from None

    def hold(self, ev) -> None:
        """Encode ``ev`` now (its place in the stream) and send it with the
        next frame, or at ``flush``."""
        with self.lock:
            if self.failed is not None:
                raise self.failed
            frame = b"".join(self._encode(ev))
            self.held.append(frame)
            self.held_bytes += len(frame)

    def send(self, ev, look: bool = True) -> None:
        """Under the lock: look for an ERROR first (``look``: a write session,
        where the server sends nothing else), then send the frames held and
        this one."""
        with self.lock:
            if self.failed is not None:
                raise self.failed
            what = type(ev).__name__
            if look and self.incoming():
                self.raise_server_error(None, what)
            parts = self._encode(ev)
            if self.held:
                small = sum(len(p) for p in parts) < HOLD_MAX
                held = b"".join(self.held + (parts if small else []))
                parts = [held] if small else [held, *parts]
                self.held, self.held_bytes = [], 0
            try:
                self.sendall(parts)
            except (OSError, ssl.SSLError) as e:
                self.raise_server_error(e, what)

    def flush(self) -> None:
        """Send the frames held, if any."""
        with self.lock:
            if not self.held:
                return
            if self.failed is not None:
                raise self.failed
            if self.incoming():
                self.raise_server_error(None, "FILE_PART")
            data = b"".join(self.held)
            self.held, self.held_bytes = [], 0
            try:
                self.sendall([data])
            except (OSError, ssl.SSLError) as e:
                self.raise_server_error(e, "FILE_PART")

    def end(self) -> None:
        """A joined stream is done: end it (TLS close_notify, or FIN) without
        waiting for the server's own end, which ``close`` reads later, and
        report an ERROR the server sent on it meanwhile."""
        with self.lock:
            if self.failed is not None:
                raise self.failed
            if self.incoming():
                self.raise_server_error(None, "the end of the stream")
            self.half_close()

    def half_close(self) -> None:
        """Send our end of the stream, and do not wait for the server's."""
        try:
            if self.tls:
                # Non-blocking: SSL_shutdown sends our close_notify, then
                # would wait for the server's (SSLWantReadError).
                self.sock.settimeout(0)
                try:
                    self.sock.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            else:
                self.sock.shutdown(socket.SHUT_WR)
        except (OSError, ssl.SSLError, ValueError):
            self.close()

    def close(self) -> None:
        try:
            if self.tls:
                self.sock.settimeout(2)
                try:
                    self.sock.unwrap()
                except (OSError, ssl.SSLError, ValueError):
                    pass
            else:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self.sock.close()
        except OSError:
            pass


class PageServerSink:
    """Streams an image to ``address:port`` as session ``session``.

    ``streams``: TCP streams to ask for (the server may grant fewer);
    ``compress``: zstd-compress chunks if the server takes them;
    ``max_bandwidth``: bytes/s for the whole session, all streams together
    (bytes handed to the sockets: after compression, framing included);
    ``sync=False``: ask for CAP_NOSYNC, a commit without fsync (for images
    read back at once and deleted after: a live migration's), and write
    the mirror without fsync either.
    """

    def __init__(self, address: str, port: int, session: str, *,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, streams: int = 1,
                 compress: bool = False, mirror: str | None = None,
                 max_bandwidth: float | None = None, sync: bool = True) -> None:
        try:
            P.check_session_name(session)
        except ValueError as e:
            raise errors.PageServerError(f"{address}:{port}", "BAD_NAME", str(e)) from None
        if not 1 <= streams <= P.MAX_STREAMS:
            raise errors.PageServerError(f"{address}:{port}", "BAD_STREAMS",
                                         f"{streams} streams (1..{P.MAX_STREAMS})")
        if compress and zstandard is None:
            raise errors.PageServerError(f"{address}:{port}", "ZSTD",
                                         "--compress needs the zstandard package")
        # ``mirror``: a local directory that also gets every records image,
        # the parent link and the inventory (no pages), so that the next
        # incremental dump finds its parent's pagemaps here (--prev-images-dir
        # means the same chain on both sides).
        self.mirror = imgfile.ImageDir.create(mirror) if mirror else None
        if self.mirror is not None and not sync:
            # Only this host's next dump reads it, and nothing survives a
            # crash of this host that would need it.
            self.mirror.durable = False
        self.address, self.port = address, port
        self.peer = f"{address}:{port}"
        self.session = session
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.checksums: dict[str, tuple[int, str]] = {}
        self._mirror_later: list = []     # (name, data) of files held
        self.inventory = None
        self._closed = False
        self.pacing = RateLimit(max_bandwidth) if max_bandwidth else None
        self.t0 = time.monotonic()
        self.tls = ssl_context is not None
        caps = (P.CAP_STREAMS if streams > 1 else 0) | (P.CAP_ZSTD if compress else 0) \
            | (0 if sync else P.CAP_NOSYNC)
        self.main = _Wire(self, 0)
        ev = self.main.open(P.Hello(session, P.MODE_WRITE, caps, streams=streams))
        self.caps = ev.caps
        self.compress = bool(ev.caps & P.CAP_ZSTD)
        self.synced = not ev.caps & P.CAP_NOSYNC     # the commit is durable
        self._zstd = threading.local()
        self.extra: list[_Wire] = []
        try:
            for n in range(1, ev.streams if ev.caps & P.CAP_STREAMS else 1):
                w = _Wire(self, n)
                self.extra.append(w)
                w.open(P.Join(ev.token, n))
        except errors.PageServerError:
            self._close_all()
            raise
        # A worker sends its chunk on a free stream, so with two streams the
        # two workers send (and encrypt) at once.
        self._free: queue.Queue = queue.Queue()
        for w in [self.main, *self.extra]:
            self._free.put(w)
        log.info("page-server %s: session %r open (%s, version %d, %d stream%s%s%s%s)",
                 self.peer, session, self.main.sock.version() if self.tls else "plaintext",
                 ev.version, 1 + len(self.extra), "s" if self.extra else "",
                 ", zstd" if self.compress else "", "" if self.synced else ", no fsync",
                 f", at most {max_bandwidth / 2**20:.1f} MiB/s" if self.pacing else "")

    @property
    def conn(self) -> P.Connection:
        return self.main.conn

    @property
    def sock(self):
        return self.main.sock

    @property
    def bytes_sent(self) -> int:
        return self.main.bytes_sent + sum(w.bytes_sent for w in self.extra)

    # -- the wire ------------------------------------------------------------
    def _send(self, ev) -> None:
        self.main.send(ev)

    def _compress(self, view):
        """(data, compressed): zstd level 1 on this thread's compressor, kept
        only when it is smaller than the pages."""
        if not self.compress:
            return view, False
        c = getattr(self._zstd, "c", None)
        if c is None:
            c = self._zstd.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL,
                                                        write_content_size=True)
        z = c.compress(view)
        return (z, True) if len(z) < len(view) else (view, False)

    def _send_chunk(self, ev: P.PageChunk) -> None:
        w = self._free.get()
        try:
            w.send(ev)
        finally:
            self._free.put(w)

    # -- the image sink ------------------------------------------------------
    def write_image(self, name: str, msgs) -> None:
        kind = imgfile.kind_of(name)
        if kind is None or kind in (ImageKind.PAGES, ImageKind.INVENTORY):
            raise ValueError(f"{name}: not a records image name")
        self._send_file(name, imgfile.encode_records(kind, msgs))

    def _send_file(self, name: str, data) -> None:
        self.checksums[name] = (len(data), xxhash.xxh3_128_hexdigest(data))
        if self.mirror is not None:
            self.mirror.checksums[name] = self.checksums[name]
        if len(data) and self.main.held_bytes + len(data) <= HOLD_MAX:
            # Held, sent with the next frame; its mirror copy is written
            # while the server writes it (commit).
            self.main.hold(P.FilePart(name, 0, data, True))
            if self.mirror is not None:
                self._mirror_later.append((name, data))
            return
        self._write_mirror()
        if self.mirror is not None:
            self.mirror._write_file(name, data)
        view = memoryview(data)
        for off in range(0, len(data), FILE_PART):
            part = view[off:off + FILE_PART]
            self._send(P.FilePart(name, off, part, off + FILE_PART >= len(data)))

    def _write_mirror(self) -> None:
        todo, self._mirror_later = self._mirror_later, []
        for name, data in todo:
            self.mirror._write_file(name, data)

    def raw_writer(self, name: str) -> "RawBuffer":
        """tcp-queues.img: gathered here, sent by add_raw like a records image."""
        kind = imgfile.kind_of(name)
        if kind != ImageKind.QUEUES:
            raise ValueError(f"{name}: not a raw image name")
        return RawBuffer(imgfile.header(kind))

    def add_raw(self, name: str, writer: "RawBuffer") -> None:
        self._send_file(name, writer.data)

    def pages_writer(self, pid: int) -> RemotePages:
        self._send(P.PagesBegin(pid))
        return RemotePages(self, pid)

    def add_pages(self, pid: int, writer: RemotePages) -> None:
        self.checksums[f"pages-{pid}.img"] = writer.close()

    def set_parent(self, rel: str) -> None:
        self.main.hold(P.SetParent(rel))
        if self.mirror is not None:
            self.mirror.set_parent(rel)
        if self.mirror is not None:
            self.mirror.set_parent(rel)

    def commit(self, inv) -> None:
        """Send the inventory; return once the server has everything synced."""
        # The server commits only once every stream has ended.
        for w in self.extra:
            try:
                w.end()
            except errors.PageServerError:
                # The server also fails the first stream: prefer its reason.
                if self.main.incoming():
                    self.main.raise_server_error(None, "COMMIT")
                raise
        # The files held go first; the mirror is written while the server
        # writes them, and before the COMMIT: a mirror that cannot be
        # written fails the dump before the destination has an image.
        self.main.flush()
        self._write_mirror()
        del inv.files[:]
        for name in sorted(self.checksums):
            size, digest = self.checksums[name]
            inv.files.add(name=name, size=size, xxh3_128=digest)
        inv.format_version = imgfile.FORMAT_VERSION
        if not inv.created_ns:
            inv.created_ns = time.time_ns()
        self._send(P.Commit(imgfile.encode_records(ImageKind.INVENTORY, [inv])))
        ev = self.main.recv_event(COMMIT_TIMEOUT_S)
        if not isinstance(ev, P.Committed):
            self.main.failed = _error_from(self, ev, "COMMIT")
            raise self.main.failed
        self.inventory = inv
        if self.mirror is not None:
            local = type(inv)()
            local.CopyFrom(inv)
            self.mirror.commit(local)
        dt = time.monotonic() - self.t0
        log.info("page-server %s: session %r committed, %d files, %.1f MiB in %.2f s%s",
                 self.peer, self.session, ev.nr_files, ev.nbytes / 2**20, dt,
                 f" ({self.pacing.waited:.2f} s paced)" if self.pacing else "")
        self.close()

    def discard(self) -> None:
        """Abort the session: the server removes what it wrote."""
        self._mirror_later = []
        if self.mirror is not None and self.inventory is None:
            self.mirror.discard()
        if self._closed:
            return
        if self.main.failed is None and self.conn.state is P.State.WRITE:
            try:
                with self.main.lock:
                    self.main.sendall(self.conn.send_parts(P.Abort("the dump failed")))
            except (OSError, ssl.SSLError, P.ProtocolError):
                pass
        self.close()

    def _close_all(self) -> None:
        # Every stream's end sent first, so that the server's answers to
        # them are on their way at once.
        for w in [self.main, *self.extra]:
            w.half_close()
        for w in self.extra:
            w.close()
        self.main.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_all()


def detect_dead_peer(sock: socket.socket) -> None:
    """A connection that may wait long for its peer: TCP gives up on a peer
    that stops acknowledging (TCP_USER_TIMEOUT) or, idle, stops answering
    keepalives, after about DEAD_PEER_S (a pulled cable shorter than that
    only stalls it)."""
    for level, opt, val in ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10),
                            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
                            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
                            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                             int(DEAD_PEER_S * 1000))):
        sock.setsockopt(level, opt, val)


class PageServerReader:
    """A read session (post-copy): pages of a committed image by GET, each
    checked against the digest the server computed from what it read."""

    def __init__(self, address: str, port: int, session: str, *,
                 ssl_context: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, blocking: bool = False) -> None:
        try:
            P.check_session_name(session)
        except ValueError as e:
            raise errors.PageServerError(f"{address}:{port}", "BAD_NAME", str(e)) from None
        self.address, self.port = address, port
        self.peer = f"{address}:{port}"
        self.session = session
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.wire = _Wire(self, 0)
        ev = self.wire.open(P.Hello(session, P.MODE_READ, P.CAP_GET))
        if not ev.caps & P.CAP_GET:
            self.close()
            raise errors.PageServerError(self.peer, "NOT_FOUND", "the server does not "
                                                                 "serve read sessions")
        self._next_id = 0
        # ``blocking``: no timeout on each recv (a poll and a failed read
        # fewer per answer), but TCP gives up on a peer that stops
        # acknowledging (TCP_USER_TIMEOUT) or, idle, stops answering
        # keepalives; shutdown() ends a wait from another thread.
        self.timeout: float | None = IO_TIMEOUT_S
        if blocking:
            self.timeout = None
            sock = self.wire.sock
            sock.settimeout(None)
            detect_dead_peer(sock)

    def get_many(self, requests) -> list[bytes]:
        """The pages of each ``(pid, vaddr, nr_pages)``, in order; up to
        MAX_OUTSTANDING_GETS requests are in flight at once."""
        requests = list(requests)
        out: list[bytes] = []
        for i in range(0, len(requests), P.MAX_OUTSTANDING_GETS):
            batch = requests[i:i + P.MAX_OUTSTANDING_GETS]
            self.send_gets(batch)
            out.extend(bytes(self.recv_pages(*r)) for r in batch)
        return out

    def send_gets(self, requests) -> None:
        """Send a GET for each ``(pid, vaddr, nr_pages)`` (at most
        MAX_OUTSTANDING_GETS unanswered), all in one write; answer them
        in order with ``recv_pages``.  One thread at a time."""
        w = self.wire
        if w.failed is not None:
            raise w.failed
        try:
            frames = []
            for pid, vaddr, nr in requests:
                self._next_id = (self._next_id + 1) & 0xFFFFFFFF
                frames += w.conn.send_parts(P.Get(self._next_id, pid, vaddr, nr))
        except P.LocalProtocolError as e:
            raise errors.PageServerError(self.peer, "PROTOCOL", str(e)) from None
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        try:
            w.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            w.raise_server_error(e, "GET")
        w.bytes_sent += len(data)

    def recv_pages(self, pid: int, vaddr: int, nr_pages: int):
        """The answer to the oldest GET sent, which asked for these pages:
        their data (a buffer), checked against the server's xxh3-128."""
        w = self.wire
        if self.timeout is not None:
            ev = w.recv_event(self.timeout)
        else:
            conn, sock = w.conn, w.sock
            try:
                ev = conn.next_event()
                while ev is P.NEED_DATA:
                    conn.receive_data(sock.recv(1 << 16))
                    ev = conn.next_event()
            except P.ProtocolError as e:
                raise errors.PageServerError(self.peer, "PROTOCOL", str(e)) from None
            except (OSError, ssl.SSLError) as e:
                raise errors.PageServerError(self.peer, "CONNECTION",
                                             f"connection lost: {e}") from None
        if not isinstance(ev, P.PageData):
            w.failed = _error_from(self, ev, "GET")
            raise w.failed
        if ev.vaddr != vaddr or ev.nr_pages != nr_pages:
            raise errors.PageServerError(self.peer, "PROTOCOL",
                                         f"asked pages {vaddr:#x} +{nr_pages}, got "
                                         f"{ev.vaddr:#x} +{ev.nr_pages}")
        if chunk_digest(ev.data) != ev.digest:
            raise errors.PageServerError(self.peer, "CHECKSUM",
                                         f"pid {pid} pages {vaddr:#x} +{nr_pages}: xxh3-128 "
                                         "does not match the server's")
        return ev.data

    def get(self, pid: int, vaddr: int, nr_pages: int) -> bytes:
        return self.get_many([(pid, vaddr, nr_pages)])[0]

    def shutdown(self) -> None:
        """From another thread: make a blocked ``recv_pages`` fail at once."""
        try:
            self.wire.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.wire.close()
