"""The page-server: an asyncio (uvloop) loop over protocol.py.

Each connection is one session writing into its own directory (or reading a
committed one for post-copy).  File work runs in a thread pool: a chunk's
digest is checked on arrival, it is pwritten at its place in pages-PID.img,
and the bytes as written are hashed again through a shared mapping of the
file.  inventory.img is written last, after every file is checked against
it and synced (not synced for a client granted CAP_NOSYNC): no directory
looks complete before that.  A bad connection
is answered with ERROR, logged, and closed; the others keep going.
SIGTERM: stop accepting, let running sessions finish (bounded), then close.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import errno
import logging
import os
import secrets
import signal
import ssl
import threading
import time

import xxhash

try:
    import zstandard
except ImportError:          # optional: the server then never grants CAP_ZSTD
    zstandard = None

from migrate import errors
from migrate.images import imgfile
from migrate.images.imgfile import (CHUNK_PAGES, PAGE_SIZE, PAGES_DATA_OFFSET, ImageKind,
                                    chunk_digest, chunk_hasher, pages_digest)
from migrate.pageserver import protocol as P

log = logging.getLogger(__name__)

READ_AHEAD = 256 << 10     # bytes buffered outside a chunk before reading pauses
CHUNK_BUFFERS = 6           # receive buffers (8 MiB) shared by all sessions
# Chunks are written, read back and hashed in such pieces.  The piece, its
# copy read back and the source must stay in this core's L2 (512 KiB on the
# project's EPYC): with 256 KiB the read-back missed it and cost the server
# about 0.4 s of sys time per GiB more than with 64 KiB (bench/pageserver.py
# CPU split, interleaved runs).
VERIFY_WINDOW = 64 << 10
LINGER_S = 5.0              # after an ERROR, read and drop for this long before closing
LINGER_BYTES = 64 << 20
HANDSHAKE_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 60.0      # SIGTERM: how long running sessions may take to finish
JOIN_WAIT_S = 60.0          # COMMIT waits this long for the other streams to end
PAYLOAD_IDLE_S = 120.0      # a client silent this long in the middle of a chunk is dropped


class SessionError(errors.MigrateError):
    """A session failed on the server; ``code`` is the ERROR code to send."""

    def __init__(self, code: P.Code, why: str) -> None:
        self.code = code
        super().__init__(why)


def _os_error(path: str, what: str, e: OSError) -> SessionError:
    code = P.Code.NO_SPACE if e.errno in (errno.ENOSPC, errno.EDQUOT) else P.Code.IO
    return SessionError(code, f"{path}: {what} failed: {os.strerror(e.errno)}")


@dataclasses.dataclass
class _RecFile:
    fd: int
    size: int = 0
    hasher: object = dataclasses.field(default_factory=xxhash.xxh3_128)
    digest: str | None = None        # set once complete


@dataclasses.dataclass
class _PagesFile:
    fd: int
    header_digest: bytes
    chunks: dict = dataclasses.field(default_factory=dict)   # index -> (nr_pages, digest)


_local = threading.local()


def _verify_buffer() -> memoryview:
    """This I/O thread's buffer for reading back what it wrote."""
    v = getattr(_local, "view", None)
    if v is None:
        v = _local.view = memoryview(bytearray(VERIFY_WINDOW))
    return v


def _within(root: str, path: str) -> bool:
    root = os.path.realpath(root)
    path = os.path.realpath(path)
    return path == root or path.startswith(root + os.sep)


class Session:
    """The files of one write session.  Methods block (run them in a thread);
    chunk writes of different indexes may run concurrently."""

    def __init__(self, root: str, path: str, name: str) -> None:
        self.root = root
        self.path = path
        self.name = name
        self.files: dict[str, _RecFile] = {}
        self.pages: dict[int, _PagesFile] = {}
        self.created: list[str] = []
        self.made_dir = False
        self.parent: str | None = None
        self.nbytes = 0
        self.ranges = {"zero": 0, "parent": 0}
        self.committed = False
        # False once CAP_NOSYNC is granted: nothing is fsynced (see commit).
        self.sync = True

    def _p(self, name: str) -> str:
        return os.path.join(self.path, name)

    def begin(self) -> None:
        # Checked before mkdir too (realpath resolves the components that
        # exist): a symlink planted under -D must not make us create
        # directories outside it; and again after, for one planted meanwhile.
        self._check_within()
        existed = os.path.isdir(self.path)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise _os_error(self.path, "mkdir", e) from e
        self.made_dir = not existed
        self._check_within()
        try:
            os.unlink(self._p("inventory.img"))   # an old image is incomplete from now on
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _os_error(self._p("inventory.img"), "unlink", e) from e

    def _check_within(self) -> None:
        if not _within(self.root, self.path):
            raise SessionError(P.Code.BAD_NAME, f"session {self.name!r}: {self.path} resolves "
                                                "outside the server's directory")

    def _create(self, name: str) -> int:
        path = self._p(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise _os_error(path, "create", e) from e
        self.created.append(name)
        return fd

    @staticmethod
    def _pwrite(fd: int, data, off: int, path: str) -> None:
        view = memoryview(data)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], off + done)
        except OSError as e:
            raise _os_error(path, f"write at offset {off + done}", e) from e

    def file_part(self, ev: P.FilePart) -> None:
        f = self.files.get(ev.name)
        if f is None:
            if imgfile.kind_of(ev.name) is None:
                raise SessionError(P.Code.BAD_NAME, f"{ev.name}: not an image file name")
            if ev.offset:
                raise SessionError(P.Code.PROTOCOL, f"{ev.name}: first part at offset "
                                                    f"{ev.offset}, expected 0")
            f = self.files[ev.name] = _RecFile(self._create(ev.name))
        if f.digest is not None:
            raise SessionError(P.Code.PROTOCOL, f"{ev.name}: part after the last one")
        if ev.offset != f.size:
            raise SessionError(P.Code.PROTOCOL, f"{ev.name}: part at offset {ev.offset}, "
                                                f"expected {f.size}")
        self._pwrite(f.fd, ev.data, ev.offset, self._p(ev.name))
        f.hasher.update(ev.data)
        f.size += len(ev.data)
        self.nbytes += len(ev.data)
        if ev.last:
            if self.sync:
                try:
                    os.fsync(f.fd)
                except OSError as e:
                    raise _os_error(self._p(ev.name), "fsync", e) from e
            os.close(f.fd)
            f.fd = -1
            f.digest = f.hasher.hexdigest()

    def file_parts(self, evs: list) -> None:
        for ev in evs:
            self.file_part(ev)

    def set_parent(self, target: str) -> None:
        link = self._p("parent")
        if not _within(self.root, os.path.join(self.path, target)):
            raise SessionError(P.Code.BAD_NAME, f"parent link {target!r} resolves outside "
                                                "the server's directory")
        try:
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(target, link)
        except OSError as e:
            raise _os_error(link, "symlink", e) from e
        self.parent = target
        self.created.append("parent")

    def pages_begin(self, pid: int) -> None:
        if pid in self.pages:
            raise SessionError(P.Code.PROTOCOL, f"pages-{pid}.img begun twice")
        name = f"pages-{pid}.img"
        fd = self._create(name)
        head = imgfile.header(ImageKind.PAGES).ljust(PAGES_DATA_OFFSET, b"\0")
        self._pwrite(fd, head, 0, self._p(name))
        self.pages[pid] = _PagesFile(fd, chunk_digest(head))

    def check_chunk(self, ev: P.PageChunk) -> _PagesFile:
        """Sequential part of a chunk write (on the loop): order checks."""
        pf = self.pages.get(ev.pid)
        if pf is None:
            raise SessionError(P.Code.PROTOCOL, f"chunk {ev.index} of pid {ev.pid} "
                                                "before PAGES_BEGIN")
        if ev.index in pf.chunks:
            raise SessionError(P.Code.PROTOCOL, f"chunk {ev.index} of pid {ev.pid} "
                                                "sent twice")
        pf.chunks[ev.index] = None      # reserved; filled when written
        return pf

    @staticmethod
    def _decompress(ev: P.PageChunk, name: str):
        size = ev.nr_pages * PAGE_SIZE
        what = f"{name} chunk {ev.index}: zstd frame"
        try:
            # The frame header must say the exact size before anything is
            # allocated for it (a bomb names a size, or none, and is refused).
            if zstandard.frame_content_size(ev.data) != size:
                raise SessionError(P.Code.PROTOCOL, f"{what} does not declare {size} bytes")
            data = zstandard.ZstdDecompressor().decompress(ev.data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise SessionError(P.Code.PROTOCOL, f"{what}: {e}") from None
        if len(data) != size:
            raise SessionError(P.Code.PROTOCOL, f"{what} gave {len(data)} bytes, not {size}")
        return data

    def write_chunk(self, pf: _PagesFile, ev: P.PageChunk) -> None:
        """Check the chunk as received, then write it piece by piece (64 KiB),
        reading each piece back from the page cache and hashing it while it
        is still in this core's cache (mapping the file instead costs as much
        in page-table work and TLB shootdowns, and RSS)."""
        name = f"pages-{ev.pid}.img"
        data = self._decompress(ev, name) if ev.compressed else ev.data
        got = chunk_digest(data)
        if got != ev.digest:
            raise SessionError(P.Code.CHECKSUM, f"{name} chunk {ev.index}: xxh3-128 "
                                                f"{got.hex()} on arrival, the client says "
                                                f"{ev.digest.hex()}")
        off = PAGES_DATA_OFFSET + ev.index * CHUNK_PAGES * PAGE_SIZE
        view = _verify_buffer()
        src = memoryview(data)
        h = chunk_hasher()
        for at in range(0, len(src), len(view)):
            piece = src[at:at + len(view)]
            self._pwrite(pf.fd, piece, off + at, self._p(name))
            back = view[:len(piece)]
            try:
                n = os.preadv(pf.fd, [back], off + at)
            except OSError as e:
                raise _os_error(self._p(name), f"read back at offset {off + at}", e) from e
            if n != len(piece):
                raise SessionError(P.Code.IO, f"{name}: short read at offset {off + at}")
            h.update(back)
        again = h.digest()
        if again != ev.digest:
            raise SessionError(P.Code.CHECKSUM, f"{name} chunk {ev.index}: the bytes "
                                                f"written at offset {off} hash to "
                                                f"{again.hex()}, expected {ev.digest.hex()}")
        pf.chunks[ev.index] = (ev.nr_pages, ev.digest)
        self.nbytes += len(data)

    def _pages_checksum(self, pid: int, pf: _PagesFile) -> tuple[int, str]:
        n = len(pf.chunks)
        nr = 0
        digests = []
        for i in range(n):
            c = pf.chunks.get(i)
            if c is None:
                raise SessionError(P.Code.CHECKSUM, f"pages-{pid}.img: chunk {i} missing "
                                                    f"({n} chunks received)")
            if c[0] != CHUNK_PAGES and i != n - 1:
                raise SessionError(P.Code.CHECKSUM, f"pages-{pid}.img: chunk {i} of "
                                                    f"{c[0]} pages is not the last")
            nr += c[0]
            digests.append(c[1])
        return PAGES_DATA_OFFSET + nr * PAGE_SIZE, pages_digest(pf.header_digest, digests)

    def commit(self, data: bytes) -> tuple[int, int]:
        inv_path = self._p("inventory.img")
        try:
            _, (inv,) = imgfile.decode_records(data, inv_path, ImageKind.INVENTORY)
        except errors.ImageError as e:
            raise SessionError(P.Code.PROTOCOL, f"COMMIT: {e}") from None
        have: dict[str, tuple[int, str]] = {}
        for name, f in self.files.items():
            if f.digest is None:
                raise SessionError(P.Code.CHECKSUM, f"{name}: incomplete (no last part)")
            have[name] = (f.size, f.digest)
        for pid, pf in self.pages.items():
            have[f"pages-{pid}.img"] = self._pages_checksum(pid, pf)
        listed = {f.name: (f.size, f.xxh3_128) for f in inv.files}
        for name, (size, digest) in listed.items():
            if name not in have:
                raise SessionError(P.Code.CHECKSUM, f"{name}: listed in the inventory but "
                                                    "not received")
            if have[name] != (size, digest):
                raise SessionError(P.Code.CHECKSUM,
                                   f"{name}: received {have[name][0]} bytes, xxh3-128 "
                                   f"{have[name][1]}; the inventory says {size} bytes, "
                                   f"{digest}")
        extra = sorted(set(have) - set(listed))
        if extra:
            raise SessionError(P.Code.CHECKSUM, f"received but not in the inventory: "
                                                f"{', '.join(extra)}")
        # Without sync (CAP_NOSYNC) the inventory is still written last, so
        # a session cut short never looks complete; only a crash of this host
        # may leave files torn under an inventory, which the checksums of
        # any reader then refuse (docs/protocol.md, "Durability").
        if self.sync:
            for pid, pf in self.pages.items():
                try:
                    os.fsync(pf.fd)
                except OSError as e:
                    raise _os_error(self._p(f"pages-{pid}.img"), "fsync", e) from e
        fd = self._create("inventory.img")
        try:
            self._pwrite(fd, data, 0, inv_path)
            if self.sync:
                os.fsync(fd)
        except OSError as e:
            raise _os_error(inv_path, "fsync", e) from e
        finally:
            os.close(fd)
        if self.sync:
            try:
                imgfile.fsync_dir(self.path)
            except OSError as e:
                raise _os_error(self.path, "fsync of the directory", e) from e
        self.committed = True
        self.close()
        return len(listed), self.nbytes

    def close(self) -> None:
        for f in self.files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1
        for pf in self.pages.values():
            if pf.fd >= 0:
                os.close(pf.fd)
                pf.fd = -1

    def discard(self) -> None:
        """Remove what this session wrote; no inventory means incomplete."""
        self.close()
        for name in ["inventory.img", *reversed(self.created)]:
            try:
                os.unlink(self._p(name))
            except OSError:
                pass
        if self.made_dir:
            try:
                os.rmdir(self.path)
            except OSError:
                pass


class ReadSession:
    """A committed image served to GET requests (post-copy).  Pages marked
    IN_PARENT are read from the image its ``parent`` link names, and so on
    down the chain (at most ``MAX_CHAIN`` images, each inside the server's
    directory and committed)."""

    MAX_CHAIN = 64

    def __init__(self, path: str, root: str | None = None, depth: int = 0) -> None:
        self.path = path
        self.root = root or path
        self.depth = depth
        try:
            self.images = imgfile.ImageDir.open(path)
        except errors.ImageError as e:
            raise SessionError(P.Code.NOT_FOUND, str(e)) from None
        self.maps: dict[int, tuple[list, list, object]] = {}
        self._parent: ReadSession | None = None

    def parent(self) -> "ReadSession":
        if self._parent is None:
            link = os.path.join(self.path, "parent")
            if not os.path.islink(link):
                raise SessionError(P.Code.NOT_FOUND, f"{self.path}: pages in the parent "
                                                     "image, but no parent link")
            if self.depth + 1 >= self.MAX_CHAIN:
                raise SessionError(P.Code.NOT_FOUND, f"{self.path}: parent chain longer "
                                                     f"than {self.MAX_CHAIN}")
            target = os.path.join(self.path, os.readlink(link))
            if not _within(self.root, target):
                raise SessionError(P.Code.NOT_FOUND, f"{link}: resolves outside the "
                                                     "server's directory")
            self._parent = ReadSession(target, self.root, self.depth + 1)
        return self._parent

    def _map(self, pid: int):
        m = self.maps.get(pid)
        if m is None:
            name = f"pagemap-{pid}.img"
            if not self.images.has(name):
                raise SessionError(P.Code.NOT_FOUND, f"pid {pid}: no {name} in {self.path}")
            try:
                entries = self.images.read_image(name)[1:]
                reader = (self.images.pages_reader(pid)
                          if self.images.has(f"pages-{pid}.img") else None)
            except errors.ImageError as e:
                raise SessionError(P.Code.IO, str(e)) from None
            runs, off = [], 0
            for e in entries:
                runs.append((e.vaddr, e.nr_pages, e.flags, off))
                if e.flags & imgfile.PE_PRESENT:
                    off += e.nr_pages
            runs.sort()
            m = self.maps[pid] = ([r[0] for r in runs], runs, reader)
        return m

    def _fill(self, pid: int, vaddr: int, out: memoryview) -> None:
        """Pages [vaddr, vaddr + len(out)) of pid into ``out``."""
        starts, runs, reader = self._map(pid)
        addr, end = vaddr, vaddr + len(out)
        while addr < end:
            i = bisect.bisect_right(starts, addr) - 1
            if i < 0 or addr >= runs[i][0] + runs[i][1] * PAGE_SIZE:
                raise SessionError(P.Code.NOT_FOUND, f"pid {pid}: page {addr:#x} is not "
                                                     f"in the image {self.path}")
            start, nr, flags, first = runs[i]
            stop = min(end, start + nr * PAGE_SIZE)
            view = out[addr - vaddr:stop - vaddr]
            if flags & imgfile.PE_PRESENT:
                off = PAGES_DATA_OFFSET + (first + (addr - start) // PAGE_SIZE) * PAGE_SIZE
                if reader is None or os.preadv(reader.fd, [view], off) != len(view):
                    raise SessionError(P.Code.IO, f"pages-{pid}.img: short read at {off}")
            elif flags & imgfile.PE_IN_PARENT:
                self.parent()._fill(pid, addr, view)
            elif flags & imgfile.PE_ZERO:
                view[:] = bytes(len(view))
            else:
                raise SessionError(P.Code.NOT_FOUND, f"pid {pid}: page {addr:#x} has no "
                                                     "data in the image")
            addr = stop

    def get(self, ev: P.Get) -> P.PageData:
        out = bytearray(ev.nr_pages * PAGE_SIZE)
        self._fill(ev.pid, ev.vaddr, memoryview(out))
        return P.PageData(ev.req_id, ev.vaddr, ev.nr_pages, chunk_digest(out), out)

    def close(self) -> None:
        for _, _, reader in self.maps.values():
            if reader is not None:
                reader.close()
        if self._parent is not None:
            self._parent.close()


def _log_loop_exception(loop, context: dict) -> None:
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError, asyncio.TimeoutError)):
        peer = "?"
        tr = context.get("transport")
        if tr is not None:
            pn = tr.get_extra_info("peername")
            peer = f"{pn[0]}:{pn[1]}" if pn else "?"
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        log.warning("%s: TLS handshake failed: %s (%s)", peer, why,
                    context.get("message", ""))
        return
    loop.default_exception_handler(context)


class _TLSPending(asyncio.Protocol):
    """A new TCP connection of a TLS server: reading paused until start_tls,
    so no byte of the ClientHello is lost."""

    def __init__(self, server: "PageServer") -> None:
        self.srv = server

    def connection_made(self, transport) -> None:
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.srv._tls_accept(transport))
        self.srv.handshakes.add(task)
        task.add_done_callback(self.srv.handshakes.discard)

    def data_received(self, data) -> None:     # never: reading is paused
        pass


class _Stream(asyncio.BufferedProtocol):
    """One connection's transport, reading where its ``Connection`` says: a
    page chunk lands in place in a shared chunk buffer, never copied in
    Python (with TLS, asyncio decrypts straight into it).  The handler task
    pulls events with ``next_event()``; reading pauses when unparsed bytes
    pile up or the connection waits for a buffer."""

    def __init__(self, server: "PageServer") -> None:
        self.srv = server
        self.conn = P.Connection(P.Role.SERVER, server.buffers)
        self.transport = None
        self.peer = "?"
        self._waiter: asyncio.Future | None = None
        self._drained: asyncio.Future | None = None
        self._read_paused = False
        self._write_paused = False
        self.eof = False                             # the client's FIN (or close_notify)
        self.lost = False                            # the connection is gone
        self.lost_exc: BaseException | None = None
        self.failure: BaseException | None = None    # set by another stream of the session
        self.discarding = False                      # after our ERROR: drop what comes
        self.dropped = 0
        self._drop = memoryview(bytearray(64 << 10))

    # -- asyncio callbacks ---------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        pn = transport.get_extra_info("peername")
        self.peer = f"{pn[0]}:{pn[1]}" if pn else "?"
        task = asyncio.get_running_loop().create_task(self.srv._accept(self))
        self.srv.handshakes.add(task)
        task.add_done_callback(self.srv.handshakes.discard)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.discarding:
            return self._drop
        return self.conn.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.discarding:
            self.dropped += nbytes
            if self.dropped >= LINGER_BYTES:
                self._wake()
            return
        try:
            self.conn.buffer_updated(nbytes)
        except P.LocalProtocolError as e:       # cannot happen: reading pauses first
            self.fail(e)
            return
        if not self.conn.in_payload:
            self._wake()
            if self.conn.buffered >= READ_AHEAD:
                self._pause()

    def eof_received(self) -> bool:
        if not self.discarding and not self.eof:
            self.conn.receive_data(b"")
        self.eof = True
        self._wake()
        # Keep the transport to answer after the client's FIN (plain TCP; a
        # TLS transport closes after close_notify whatever we say).
        return self.srv.ssl is None

    def connection_lost(self, exc) -> None:
        if not self.eof and exc is None and not self.discarding:
            self.conn.receive_data(b"")
            self.eof = True
        self.lost = True
        self.lost_exc = exc
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- for the handler -----------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause(self) -> None:
        if not self._read_paused and not self.lost and not self.eof:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._read_paused and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def fail(self, exc: BaseException) -> None:
        """Make the handler's next wait raise ``exc`` (another stream failed)."""
        self.failure = exc
        self._wake()

    async def wait_data(self) -> None:
        """Until more bytes, the end of the stream, or a failure."""
        if self.failure is not None:
            raise self.failure
        if self.lost and self.lost_exc is not None:
            raise ConnectionResetError(str(self.lost_exc))
        self._resume()
        self._waiter = asyncio.get_running_loop().create_future()
        # Silence is fine between frames (a read session may idle for long),
        # not while the connection holds one of the shared receive buffers.
        holding = self.conn.in_payload
        try:
            await asyncio.wait_for(self._waiter, PAYLOAD_IDLE_S if holding else None)
        except asyncio.TimeoutError:
            raise SessionError(P.Code.PROTOCOL, f"no byte for {PAYLOAD_IDLE_S:.0f} s in "
                                                "the middle of a frame") from None
        finally:
            self._waiter = None
        if self.failure is not None:
            raise self.failure

    def write(self, data) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("connection lost")
        if self._write_paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
            if self.lost:
                raise ConnectionResetError("connection lost")

    async def linger(self) -> None:
        """Read and drop what the client still sends (bounded), so that it
        reads our ERROR instead of a reset."""
        self.discarding = True
        self.conn.release_all()
        deadline = time.monotonic() + LINGER_S
        while not self.lost and not self.eof and self.dropped < LINGER_BYTES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._resume()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, left)
            except asyncio.TimeoutError:
                break
            finally:
                self._waiter = None

    async def close(self) -> None:
        self.conn.release_all()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


@dataclasses.dataclass
class _Joinable:
    """A write session that granted more than one stream."""
    session: Session
    main: "Handler"
    caps: int
    streams: int
    joined: dict = dataclasses.field(default_factory=dict)   # stream number -> Handler
    ended: dict = dataclasses.field(default_factory=dict)    # stream number -> Future
    begun: dict = dataclasses.field(default_factory=dict)    # pid -> asyncio.Event


class PageServer:
    """``serve``: many sessions, each in ``root/<name>``; otherwise one session
    into ``root`` itself, then ``run()`` returns."""

    def __init__(self, root: str, host: str = "0.0.0.0", port: int = 0, *,
                 ssl_context: ssl.SSLContext | None = None, serve: bool = False,
                 sock=None, workers: int = 4, compress: bool = True,
                 max_streams: int = P.MAX_STREAMS, allow_nosync: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.host, self.port = host, port
        self.ssl = ssl_context
        self.serve = serve
        self.sock = sock
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="ps-io")
        self.buffers = P.PayloadBuffers(CHUNK_BUFFERS)
        self.buffers.on_free = self._buffer_freed
        self._buffer_waiters: list[asyncio.Future] = []
        self.caps = P.CAP_GET | P.CAP_STREAMS | (P.CAP_ZSTD if compress and zstandard else 0)
        # ``allow_nosync``: grant CAP_NOSYNC, commits without fsync, to the
        # clients that ask.  An agent's page-server does (a migration's
        # images are read back at once and deleted after); `migrate
        # page-server` does not: its images are kept, as criu's.
        if allow_nosync:
            self.caps |= P.CAP_NOSYNC
        self.max_streams = max_streams
        self.active: dict[str, asyncio.Task] = {}
        self.joinable: dict[bytes, _Joinable] = {}
        self.tasks: set[asyncio.Task] = set()
        self.server: asyncio.base_events.Server | None = None
        self.stopping = False
        self.done = asyncio.Event()
        self.outcome: bool | None = None      # single-session mode: committed?
        self.sessions_done = 0
        self.connections = 0
        self.handshakes: set[asyncio.Task] = set()

    def _buffer_freed(self) -> None:
        waiters, self._buffer_waiters = self._buffer_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    def buffer_freed(self) -> asyncio.Future:
        """Resolved when some connection gives a receive buffer back."""
        f = asyncio.get_running_loop().create_future()
        self._buffer_waiters.append(f)
        return f

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        # Handshake failures reach the loop's exception handler: log one line.
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_log_loop_exception)
        if self.ssl is None:
            factory = lambda: _Stream(self)  # noqa: E731
        else:
            # Our own handshake, so that a failure is logged with the peer and
            # the reason (asyncio logs an SSLError only in debug mode).
            factory = lambda: _TLSPending(self)  # noqa: E731
        if self.sock is not None:
            self.server = await loop.create_server(factory, sock=self.sock)
        else:
            self.server = await loop.create_server(factory, self.host, self.port,
                                                   reuse_address=True)
        addr = self.server.sockets[0].getsockname()
        self.port = addr[1]
        log.info("page-server: listening on %s:%d (%s, %s) for %s", addr[0], addr[1],
                 "TLS" if self.ssl else "plaintext", "many sessions" if self.serve
                 else "one session", self.root)

    async def run(self, ready=None) -> int:
        """Serve until SIGTERM/SIGINT (or, without ``serve``, one session)."""
        loop = asyncio.get_running_loop()
        await self.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        if ready is not None:
            ready()
        await self.done.wait()
        await self.shutdown()
        if self.serve:
            return 0
        return 0 if self.outcome else 1

    def request_stop(self, sig=None) -> None:
        if not self.stopping:
            log.info("page-server: %s, stopping: no new connections, draining %d",
                     signal.Signals(sig).name if sig else "stop", len(self.tasks))
        self.stopping = True
        self.done.set()

    async def shutdown(self) -> None:
        """Stop accepting, let sessions finish (bounded), then close."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=DRAIN_TIMEOUT_S)
            for t in pending:
                log.warning("page-server: session still running after %.0f s, closing it",
                            DRAIN_TIMEOUT_S)
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=10)
        if self.server is not None:
            await self.server.wait_closed()
        self.pool.shutdown(wait=True)
        log.info("page-server: stopped after %d sessions", self.sessions_done)

    # -- connections ---------------------------------------------------------
    async def _tls_accept(self, tr) -> None:
        loop = asyncio.get_running_loop()
        pn = tr.get_extra_info("peername")
        peer = f"{pn[0]}:{pn[1]}" if pn else "?"
        stream = _Stream(self)
        try:
            new = await loop.start_tls(tr, stream, self.ssl, server_side=True,
                                       ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (ssl.SSLError, OSError, asyncio.TimeoutError, ConnectionError) as e:
            why = getattr(e, "reason", None) or str(e) or type(e).__name__
            verify = getattr(e, "verify_message", None)
            log.warning("%s: TLS handshake failed: %s%s: closing", peer, why,
                        f" ({verify})" if verify else "")
            tr.close()
            return
        stream.connection_made(new)

    async def _accept(self, stream: _Stream) -> None:
        task = asyncio.current_task()
        if self.stopping:
            log.warning("%s: refused: stopping", stream.peer)
            await self._send_error_and_close(stream, P.Code.SHUTDOWN,
                                             "the page-server is not taking sessions")
            return
        self.tasks.add(task)
        h = Handler(self, stream)
        try:
            ok = await h.run()
        finally:
            self.tasks.discard(task)
            if h.counted:
                self.sessions_done += 1
        if not self.serve and h.counted:
            self.outcome = ok
            self.done.set()

    async def _send_error_and_close(self, stream: _Stream, code, text) -> None:
        try:
            stream.write(stream.conn.send(P.Error(code, text[:P.MAX_ERROR_TEXT])))
            await asyncio.wait_for(stream.drain(), LINGER_S)
            await stream.linger()
        except (OSError, ssl.SSLError, asyncio.TimeoutError, P.ProtocolError):
            pass
        finally:
            await stream.close()


class Handler:
    """One connection: handshake, then one small handler per event type.
    A write session may have more streams: each has its own Handler, sharing
    the main one's Session (HELLO opens it, JOIN adds a stream)."""

    def __init__(self, server: PageServer, stream: _Stream) -> None:
        self.srv = server
        self.stream = stream
        self.conn = stream.conn
        self.peer = stream.peer
        self.session: Session | None = None
        self.reads: ReadSession | None = None
        self.inflight: set[asyncio.Future] = set()
        self.loop = asyncio.get_running_loop()
        self.t0 = time.monotonic()
        self.key: str | None = None
        self.token: bytes | None = None
        self.join: _Joinable | None = None     # set on every stream of a joinable session
        self.number = 0                        # stream number (0: the HELLO stream)
        self.counted = False                   # a session (not a JOINed stream)
        self.clean_end = False                 # a JOINed stream ended after its chunks
        self.stashed = None                    # an event read ahead (on_FilePart)

    def _io(self, fn, *args) -> asyncio.Future:
        return self.loop.run_in_executor(self.srv.pool, fn, *args)

    async def run(self) -> bool:
        """Serve the connection; True if a write session committed."""
        if self.srv.ssl is not None:
            tr = self.stream.transport
            cert = tr.get_extra_info("peercert") or {}
            subj = dict(x[0] for x in cert.get("subject", ()))
            log.info("%s: TLS %s, client certificate CN=%s", self.peer,
                     tr.get_extra_info("ssl_object").version(),
                     subj.get("commonName", "?"))
        try:
            return await self._loop()
        except P.RemoteProtocolError as e:
            log.warning("%s: %s: closing", self._who(), e)
            await self._fail(getattr(e, "code", P.Code.PROTOCOL), str(e))
        except SessionError as e:
            log.warning("%s: %s: closing", self._who(), e)
            await self._fail(e.code, str(e))
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.warning("%s: connection lost: %s", self._who(), e)
        except asyncio.CancelledError:
            log.warning("%s: cancelled (shutdown)", self._who())
            await self._fail(P.Code.SHUTDOWN, "the page-server is shutting down")
        finally:
            await self._finish()
        return False

    def _who(self) -> str:
        if self.session is None:
            return self.peer
        if self.number:
            return f"{self.peer} session {self.session.name!r} stream {self.number}"
        return f"{self.peer} session {self.session.name!r}"

    async def _fail(self, code, text: str) -> None:
        await self._settle()
        if self.join is not None and self.number:
            # A broken stream fails its whole session: tell the main stream.
            self.join.main.stream.fail(SessionError(code, f"stream {self.number}: {text}"))
        if self.conn.state in (P.State.CLOSED, P.State.DONE):
            await self.stream.close()
            return
        await self.srv._send_error_and_close(self.stream, code, text)

    async def _settle(self) -> None:
        if self.inflight:
            await asyncio.wait(self.inflight)
            for f in self.inflight:
                f.exception()       # retrieved (raised by _settle_chunks, or moot)
            self.inflight.clear()

    async def _finish(self) -> None:
        await self._settle()
        if self.join is not None and not self.number:
            self.srv.joinable.pop(self.token, None)
            for h in self.join.joined.values():
                if not h.stream.lost:
                    h.stream.fail(SessionError(P.Code.ABORTED, "the session ended"))
            if self.join.ended:
                await asyncio.wait(list(self.join.ended.values()), timeout=10)
        if not self.number and self.session is not None and not self.session.committed:
            log.warning("%s: ended before its commit: removing what it wrote (%s)",
                        self._who(), self.session.path)
            await self._io(self.session.discard)
        if self.reads is not None:
            self.reads.close()
        if self.key is not None:
            self.srv.active.pop(self.key, None)
        await self.stream.close()
        if self.join is not None and self.number:
            fut = self.join.ended.get(self.number)
            if fut is not None and not fut.done():
                fut.set_result(self.clean_end)

    async def _next_event(self):
        if self.stashed is not None:
            ev, self.stashed = self.stashed, None
            return ev
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is not P.NEED_DATA:
                return ev
            if conn.stalled:
                # No receive buffer for the next chunk: ours lend their data
                # to chunks being written, or other sessions hold the rest.
                # Wait for one to come back (reading is paused meanwhile).
                freed = self.srv.buffer_freed()
                try:
                    await asyncio.wait({freed, *self.inflight},
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    freed.cancel()
                for f in [f for f in self.inflight if f.done()]:
                    self.inflight.discard(f)
                    f.result()      # raises SessionError (checksum, disk full)
                if self.stream.failure is not None:
                    raise self.stream.failure
                continue
            await self.stream.wait_data()

    async def _loop(self) -> bool:
        conn = self.conn
        while True:
            ev = await self._next_event()
            if isinstance(ev, P.ConnectionClosed):
                if conn.state is P.State.DONE:
                    return True
                if conn.state is P.State.STREAM:
                    await self._settle_chunks()
                    self.clean_end = True
                    return False
                if conn.state not in (P.State.READ, P.State.CLOSED):
                    log.warning("%s: client disconnected in state %s", self._who(),
                                conn.state.value)
                return False
            handler = getattr(self, "on_" + type(ev).__name__)
            await handler(ev)
            if isinstance(ev, (P.Abort, P.Error)):
                return False

    async def _settle_chunks(self) -> None:
        done = list(self.inflight)
        await self._settle()
        for f in done:
            f.result()

    # -- one handler per event -----------------------------------------------
    async def on_Hello(self, ev: P.Hello) -> None:
        self.counted = True
        if not self.srv.serve:
            self.srv.connections += 1
            if self.srv.connections > 1:
                raise SessionError(P.Code.BUSY, "this page-server takes one session "
                                                "(use --serve for more)")
        if ev.version not in P.SUPPORTED_VERSIONS:
            raise SessionError(P.Code.VERSION, f"protocol version {ev.version}; this server "
                                               f"speaks {P.SUPPORTED_VERSIONS}")
        path = os.path.join(self.srv.root, ev.name) if self.srv.serve else self.srv.root
        key = os.path.realpath(path)
        if key in self.srv.active:
            raise SessionError(P.Code.BUSY, f"session {ev.name!r} is in use by another "
                                            "connection")
        caps = ev.caps & self.srv.caps
        streams = 1
        if ev.mode == P.MODE_READ:
            caps &= P.CAP_GET
            self.reads = await self._io(ReadSession, path, self.srv.root)
        else:
            caps &= ~P.CAP_GET
            self.srv.active[key] = asyncio.current_task()
            self.key = key
            s = Session(self.srv.root, path, ev.name)
            s.sync = not caps & P.CAP_NOSYNC
            self.session = s
            await self._io(s.begin)
            if caps & P.CAP_STREAMS:
                streams = max(1, min(ev.streams, self.srv.max_streams))
        token = bytes(P.TOKEN_SIZE)
        if streams > 1:
            token = secrets.token_bytes(P.TOKEN_SIZE)
            self.token = token
            self.join = _Joinable(self.session, self, caps, streams)
            self.srv.joinable[token] = self.join
        self.stream.write(self.conn.send(P.Welcome(P.VERSION, caps, streams=streams,
                                                   token=token)))
        log.info("%s: %s session %r into %s (%d stream%s%s%s)", self.peer,
                 "read" if ev.mode == P.MODE_READ else "write", ev.name, path, streams,
                 "s" if streams > 1 else "", ", zstd" if caps & P.CAP_ZSTD else "",
                 ", no fsync" if caps & P.CAP_NOSYNC else "")

    async def on_Join(self, ev: P.Join) -> None:
        if ev.version not in P.SUPPORTED_VERSIONS:
            raise SessionError(P.Code.VERSION, f"protocol version {ev.version}; this server "
                                               f"speaks {P.SUPPORTED_VERSIONS}")
        j = self.srv.joinable.get(ev.token)
        if j is None:
            raise SessionError(P.Code.NOT_FOUND, "JOIN: no open session has this token")
        if ev.stream >= j.streams or ev.stream in j.joined:
            raise SessionError(P.Code.BUSY, f"JOIN: stream {ev.stream} of session "
                                            f"{j.session.name!r} (granted {j.streams}) "
                                            "is taken or not granted")
        self.join, self.number, self.session = j, ev.stream, j.session
        j.joined[ev.stream] = self
        j.ended[ev.stream] = self.loop.create_future()
        self.stream.write(self.conn.send(P.Welcome(P.VERSION, j.caps, streams=j.streams,
                                                   token=ev.token)))
        log.info("%s: joined session %r as stream %d of %d", self.peer, j.session.name,
                 ev.stream, j.streams)

    async def on_FilePart(self, ev: P.FilePart) -> None:
        # The parts that came with it (a client sends a dump's small files
        # in one write) go to the I/O thread together: one trip for all.
        batch = [ev]
        try:
            while True:
                nxt = self.conn.next_event()
                if not isinstance(nxt, P.FilePart):
                    if nxt is not P.NEED_DATA:
                        self.stashed = nxt      # handled next (_next_event)
                    break
                batch.append(nxt)
            await self._settle()
            await self._io(self.session.file_parts, batch)
        finally:
            for e in batch:
                self.conn.release(e)

    async def on_SetParent(self, ev: P.SetParent) -> None:
        await self._io(self.session.set_parent, ev.target)

    async def on_PagesBegin(self, ev: P.PagesBegin) -> None:
        await self._io(self.session.pages_begin, ev.pid)
        if self.join is not None:
            self.join.begun.setdefault(ev.pid, asyncio.Event()).set()

    async def on_PageChunk(self, ev: P.PageChunk) -> None:
        if self.number and ev.pid not in self.session.pages:
            # Streams are not ordered with each other: PAGES_BEGIN on the
            # main stream may still be on its way.
            began = self.join.begun.setdefault(ev.pid, asyncio.Event())
            try:
                await asyncio.wait_for(began.wait(), JOIN_WAIT_S)
            except asyncio.TimeoutError:
                pass
        pf = self.session.check_chunk(ev)
        fut = self._io(self.session.write_chunk, pf, ev)
        fut.add_done_callback(lambda _f, ev=ev: self.conn.release(ev))
        self.inflight.add(fut)
        for f in [f for f in self.inflight if f.done()]:
            self.inflight.discard(f)
            f.result()      # raises SessionError (checksum, disk full)

    async def on_ZeroRange(self, ev: P.ZeroRange) -> None:
        self.session.ranges["parent" if isinstance(ev, P.ParentRange) else "zero"] += \
            ev.nr_pages

    on_ParentRange = on_ZeroRange

    async def on_Commit(self, ev: P.Commit) -> None:
        await self._settle_chunks()
        if self.join is not None:
            await self._wait_streams()
        nr, nbytes = await self._io(self.session.commit, ev.inventory)
        self.stream.write(self.conn.send(P.Committed(nr, nbytes)))
        await self.stream.drain()
        dt = time.monotonic() - self.t0
        log.info("%s: committed %d files, %.1f MiB in %.2f s (%.0f MiB/s)", self._who(),
                 nr, nbytes / 2**20, dt, nbytes / 2**20 / max(dt, 1e-6))
        log.debug("%s: %.1f MiB received, %.1f MiB of it copied before it had a buffer",
                  self._who(), self.conn.bytes_received / 2**20,
                  self.conn.bytes_copied / 2**20)

    async def _wait_streams(self) -> None:
        """Every granted stream must have joined and ended cleanly before the
        commit (the client ends them before it sends COMMIT)."""
        j = self.join
        deadline = time.monotonic() + JOIN_WAIT_S
        while len(j.joined) < j.streams - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(j.joined) < j.streams - 1:
            raise SessionError(P.Code.PROTOCOL, f"COMMIT: {len(j.joined) + 1} of "
                                                f"{j.streams} streams joined")
        left = max(0.0, deadline - time.monotonic())
        _, pending = await asyncio.wait(list(j.ended.values()), timeout=left)
        if pending:
            raise SessionError(P.Code.PROTOCOL, f"COMMIT: {len(pending)} streams still "
                                                f"open after {JOIN_WAIT_S:.0f} s")
        if self.stream.failure is not None:      # the reason a stream gave
            raise self.stream.failure
        for n, fut in j.ended.items():
            if not fut.result():
                raise SessionError(P.Code.ABORTED, f"stream {n} failed")

    async def on_Abort(self, ev: P.Abort) -> None:
        log.warning("%s: aborted by the client: %s", self._who(), ev.reason or "no reason")

    async def on_Error(self, ev: P.Error) -> None:
        log.warning("%s: client error %s: %s", self._who(), ev.code_name, ev.text)

    async def on_Get(self, ev: P.Get) -> None:
        data = await self._io(self.reads.get, ev)
        for part in self.conn.send_parts(data):
            self.stream.write(part)
        await self.stream.drain()

    # events a server never receives (the state table refuses them first)
    async def _never(self, ev) -> None:
        raise SessionError(P.Code.PROTOCOL, f"unexpected {type(ev).__name__}")

    on_Welcome = on_Committed = on_PageData = _never


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: using the asyncio default loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(root: str, host: str, port: int, *, ssl_context=None, serve: bool = False,
        ps_socket: int | None = None, status_fd: int | None = None,
        pidfile: str | None = None, daemon: bool = False) -> int:
    """`migrate page-server`: listen, report readiness, serve, exit status."""
    import socket

    sock = None
    if ps_socket is not None:
        try:
            sock = socket.socket(fileno=ps_socket)
        except OSError as e:
            raise errors.MigrateError(f"--ps-socket {ps_socket}: {os.strerror(e.errno)}") \
                from None
        if sock.type != socket.SOCK_STREAM:
            raise errors.MigrateError(f"--ps-socket {ps_socket}: not a stream socket")
        try:
            sock.listen(128)
        except OSError as e:
            raise errors.MigrateError(f"--ps-socket {ps_socket}: listen failed: "
                                      f"{os.strerror(e.errno)}") from None
    notify = None
    if daemon:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid:
            os.close(wfd)
            ok = os.read(rfd, 1)
            os.close(rfd)
            return 0 if ok == b"\0" else 1
        os.close(rfd)
        os.setsid()
        # daemon(3): let go of the caller's terminal and pipes (a caller
        # reading our stderr until EOF would otherwise wait for our end);
        # the log is in a file (cli.cmd_page_server).
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        notify = wfd

    def ready() -> None:
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        for fd in (status_fd, notify):
            if fd is not None:
                os.write(fd, b"\0")       # criu(8) --status-fd: \0 once ready
                os.close(fd)

    if ssl_context is None:
        install_uvloop()
    else:
        # Known gap: uvloop 0.23's loop.start_tls() stalls the handshake when the
        # ClientHello arrived while the transport was paused (our own handshake,
        # needed to log why a handshake failed); asyncio's loop does not.  TLS
        # servers run on the asyncio loop until that is fixed or worked around.
        log.info("page-server: TLS: using the asyncio event loop (uvloop start_tls "
                 "stalls, see server.run)")
    srv = PageServer(root, host, port, ssl_context=ssl_context, serve=serve, sock=sock)
    if ssl_context is None:
        log.warning("page-server: --no-tls: pages and images cross the network in "
                    "plaintext, and anyone who can connect can write sessions")
    try:
        return asyncio.run(srv.run(ready))
    except OSError as e:
        raise errors.MigrateError(f"page-server on {host}:{port}: {e.strerror or e}") \
            from None
