"""Where the lazy pages come from: the local image, or the source host's
page-server (GET in read sessions, docs/protocol.md).

Both answer ``pieces(pid, src, end)`` / ``get(...)`` with buffers that
UFFDIO_COPY reads from directly: the local source maps the page files
(read-only, shared: the page cache, no copy), the remote one hands out the
payload of the PAGE_DATA frame after checking its digest.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import mmap
import os
import ssl

from migrate import errors
from migrate.images import ImageDir
from migrate.images import pagemap
from migrate.images.imgfile import PAGES_DATA_OFFSET, chunk_digest
from migrate.pageserver import client
from migrate.pageserver import protocol as P

log = logging.getLogger(__name__)

PAGE = 4096
MAX_CHAIN = 256


class LocalSource:
    """Pages from an image directory and its parent chain.  Every file of
    every level is checked against its inventory (``verify``) before a page
    is served: a corrupt image must not reach the process."""

    remote = False

    def __init__(self, images_dir: str) -> None:
        self.name = images_dir
        self.chain = [ImageDir.open(images_dir)]
        while self.chain[-1].inventory.parent:
            if len(self.chain) >= MAX_CHAIN:
                raise errors.ImageError(self.chain[-1].path, None, "parent chain too long")
            self.chain.append(ImageDir.open(os.path.join(self.chain[-1].path, "parent")))
        self._index: dict[int, tuple[list[int], list[tuple[int, int, int, int]]]] = {}
        self._maps: list[dict[int, mmap.mmap]] = [{} for _ in self.chain]

    def verify(self, whole: bool = True) -> None:
        """Check every file (``whole``), and index the root's pages (before
        the restore comes: its hand-over waits for us)."""
        if whole:
            for level in self.chain:
                level.verify_all()
        root = self.chain[0].inventory.root_pid
        if root:
            self._open(root)

    def _open(self, pid: int):
        """Per level, its stored pages (sorted), the page files mapped.  No
        resolution of the whole chain up front: a lookup takes the first
        level, from the top, that stores the address (``pieces``)."""
        ix = self._index.get(pid)
        if ix is not None:
            return ix
        maps, names = [], []
        for level in self.chain:
            name = f"pagemap-{pid}.img"
            if not level.has(name):
                raise errors.ImageError(os.path.join(level.path, name), None,
                                        f"no pagemap of pid {pid}")
            maps.append(pagemap.level_of(level.read_image(name)))
            names.append(level.path)
        pagemap.check_chain(maps, names)
        levels = []
        for lvl, lv in enumerate(maps):
            present = lv.present
            if present:
                r = self.chain[lvl].pages_reader(pid)
                try:
                    if r.nr_pages:
                        self._maps[lvl][pid] = mmap.mmap(r.fd, 0, mmap.MAP_SHARED,
                                                         mmap.PROT_READ)
                finally:
                    r.close()
            levels.append(([p[0] for p in present], present))
        needed = maps[0].cover
        ix = self._index[pid] = (levels, needed)
        return ix

    def stored(self, pid: int) -> list[tuple[int, int]]:
        """The pages of ``pid`` the image needs from the chain (normalized)."""
        return self._open(pid)[1]

    def lazy_map(self, pid: int) -> bool:
        """The image leaves ``pid``'s whole lazy area to its source, which
        says which pages are whose (GET_MAP)."""
        return bool(self.chain[0].read_image(f"pagemap-{pid}.img")[0].lazy_map)

    def held(self, pid: int) -> list[tuple[int, int]]:
        """Every page of ``pid`` some level of the chain stores (normalized)."""
        levels, _ = self._open(pid)
        out: list[tuple[int, int]] = []
        for _, present in levels:
            out = pagemap.union(out, pagemap.normalize((s, e) for s, e, _ in present))
        return out

    def pieces(self, pid: int, src: int, end: int) -> list[tuple[int, object, int, int]]:
        """(src address, buffer, offset in buffer, length) covering [src, end)."""
        levels, _ = self._open(pid)
        out = []
        a = src
        while a < end:
            bound = end
            found = None
            for lvl, (starts, present) in enumerate(levels):
                i = bisect.bisect_right(starts, a) - 1
                if i >= 0 and a < present[i][1]:
                    found = (lvl, present[i])
                    bound = min(bound, present[i][1])
                    break
                # a level above the one that has it takes over where it stores
                if i + 1 < len(starts):
                    bound = min(bound, starts[i + 1])
            if found is None:
                raise errors.ImageError(self.name, None, f"pid {pid}: page {a:#x} is not "
                                                         "stored in the image")
            lvl, (s, _, idx) = found
            off = PAGES_DATA_OFFSET + (idx + (a - s) // PAGE) * PAGE
            out.append((a, self._maps[lvl][pid], off, bound - a))
            a = bound
        return out

    def close(self) -> None:
        for m in self._maps:
            for mm in m.values():
                try:
                    mm.close()
                except BufferError:
                    pass
        self._maps = [{} for _ in self.chain]


READ_SIZE = 1 << 20


class _Lane:
    """One connection in a read session: GETs answered in order."""

    def __init__(self, src: "RemoteSource", name: str) -> None:
        self.src = src
        self.name = name
        self.conn = P.Connection(P.Role.CLIENT)
        self.waiting: collections.deque = collections.deque()
        self.req = 0
        self.reader = self.writer = None
        self.task: asyncio.Task | None = None
        self.slots = asyncio.Semaphore(P.MAX_OUTSTANDING_GETS)
        self.caps = 0

    async def open(self) -> None:
        s = self.src
        try:
            self.reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
                s.address, s.port, ssl=s.ssl, server_hostname=s.address if s.ssl else None,
                limit=READ_SIZE), 30)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as e:
            raise errors.PageSourceError(s.name, f"cannot connect: {e}") from None
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            client.detect_dead_peer(sock)
        self.writer.write(self.conn.send(P.Hello(s.session, P.MODE_READ, P.CAP_GET | P.CAP_MAP |
                                                 P.CAP_RUNS | P.CAP_DONE)))
        ev = await self._next()
        if not isinstance(ev, P.Welcome):
            raise self._error(ev, "HELLO")
        self.caps = ev.caps
        self.task = asyncio.create_task(self._read_loop())

    def _error(self, ev, when: str) -> errors.PageSourceError:
        if isinstance(ev, P.Error):
            return errors.PageSourceError(self.src.name, f"{when}: {ev.code_name}: {ev.text}")
        return errors.SourceLinkLost(self.src.name, f"{when}: the page-server closed the "
                                                    "connection")

    async def _next(self):
        while True:
            try:
                ev = self.conn.next_event()
            except P.ProtocolError as e:
                raise errors.PageSourceError(self.src.name, str(e)) from None
            if ev is not P.NEED_DATA:
                return ev
            try:
                data = await self.reader.read(READ_SIZE)
            except (OSError, ssl.SSLError) as e:
                raise errors.SourceLinkLost(self.src.name, f"connection lost: {e}") from None
            self.conn.receive_data(data)

    async def _read_loop(self) -> None:
        try:
            while True:
                ev = await self._next()
                if isinstance(ev, P.PageMap):
                    fut, runs = self.waiting[0]
                    runs.extend(ev.runs)
                    if ev.last:
                        self.waiting.popleft()
                        if not fut.done():
                            fut.set_result(runs)
                    continue
                if isinstance(ev, P.PageData):
                    fut, want = self.waiting.popleft()
                    if chunk_digest(ev.data) != ev.digest:
                        raise errors.PageSourceError(
                            self.src.name, f"checksum mismatch in the pages at "
                                           f"{ev.vaddr:#x} ({ev.nr_pages} pages)")
                    if not fut.done():
                        fut.set_result(ev.data)
                    continue
                raise self._error(ev, "GET")
        except errors.PageSourceError as e:
            self._fail(e)
        except asyncio.CancelledError:
            self._fail(errors.PageSourceError(self.src.name, "closed"))
            raise

    def _fail(self, e: errors.PageSourceError) -> None:
        if self.src.closing:
            return
        if self.src.prefetch is not self:
            # a lane made before the source's last reset: only its own
            # requests fail, the source's state is the new lanes'
            self._fail_waiting(e)
            return
        first = self.src.failed is None
        self.src.failed = self.src.failed or e
        if first and self.src.on_lost is not None:
            self.src.on_lost(e)
        self._fail_waiting(e)

    def _fail_waiting(self, e: errors.PageSourceError) -> None:
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(e)

    async def _ask(self, ev, want):
        """Send a GET-like request; its answer (``waiting`` entry ``want``)."""
        if self.src.failed:
            raise self.src.failed
        if self.task is None or self.src.prefetch is not self:
            raise errors.SourceLinkLost(self.src.name, f"{self.name} lane not connected")
        async with self.slots:
            self.req = (self.req + 1) & 0xFFFFFFFF
            fut = asyncio.get_running_loop().create_future()
            try:
                data = self.conn.send_parts(ev(self.req))
            except P.ProtocolError as e:
                raise errors.PageSourceError(self.src.name, str(e)) from None
            self.waiting.append((fut, want))
            self.writer.write(b"".join(bytes(d) for d in data))
            return await fut

    async def get(self, pid: int, src: int, nr_pages: int):
        return await self._ask(lambda req: P.Get(req, pid, src, nr_pages), nr_pages)

    async def get_runs(self, pid: int, runs: list[tuple[int, int]]):
        """The pages of ``runs`` (vaddr, nr_pages), one after the other: one
        GET_RUNS where the server answers it (CAP_RUNS), else a GET each."""
        if len(runs) == 1:
            return await self.get(pid, *runs[0])
        if not self.caps & P.CAP_RUNS:
            parts = [await self.get(pid, a, n) for a, n in runs]
            return b"".join(bytes(x) for x in parts)
        return await self._ask(lambda req: P.GetRuns(req, pid, tuple(runs)),
                               sum(n for _, n in runs))

    async def get_map(self, pid: int) -> list[tuple[int, int, int]] | None:
        """The (vaddr, nr_pages, kind) runs of pid's lazy area (GET_MAP), or
        None if the server does not answer GET_MAP (no CAP_MAP)."""
        if not self.caps & P.CAP_MAP:
            return None
        return await self._ask(lambda req: P.GetMap(req, pid), [])

    async def close(self, failure: str | None = None) -> None:
        """``failure``: why the daemon gave up (an ERROR to the source), or
        None: every page is in (DONE, where the source takes it)."""
        if self.writer is not None and self.src.failed is None and \
                self.conn.state is P.State.READ and not self.writer.is_closing():
            word = P.Error(P.Code.ABORTED, failure[:P.MAX_ERROR_TEXT]) if failure else \
                P.Done() if self.caps & P.CAP_DONE else None
            if word is not None:
                try:
                    self.writer.write(self.conn.send(word))
                    await asyncio.wait_for(self.writer.drain(), 2)
                except (P.ProtocolError, OSError, ssl.SSLError, asyncio.TimeoutError):
                    pass
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, errors.MigrateError):
                pass
        if self.writer is not None:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 2)
            except (OSError, ssl.SSLError, asyncio.TimeoutError):
                pass


class FaultLane:
    """The fault connection: blocking I/O, used only by the daemon's fault
    thread, which sends a fault's GET and waits for its PAGE_DATA without
    an event loop on the way (the faulting thread is blocked meanwhile).
    Every answer is checked against its xxh3-128 (client.PageServerReader)."""

    def __init__(self, src: "RemoteSource") -> None:
        self.src = src
        self.reader: client.PageServerReader | None = None

    def open(self) -> None:
        s = self.src
        try:
            self.reader = client.PageServerReader(
                s.address, s.port, s.session, ssl_context=s.ssl,
                server_hostname=s.address if s.ssl else None, blocking=True)
        except errors.PageServerError as e:
            raise errors.PageSourceError(s.name, f"cannot connect: {e}") from None

    def send(self, requests: list[tuple[int, int, int]]) -> None:
        """GETs ``(pid, vaddr, nr_pages)``, at most MAX_OUTSTANDING_GETS."""
        try:
            self.reader.send_gets(requests)
        except errors.PageServerError as e:
            raise self._lost(e) from None

    def recv(self, pid: int, vaddr: int, nr_pages: int):
        """The data answering the oldest GET sent (these pages)."""
        try:
            return self.reader.recv_pages(pid, vaddr, nr_pages)
        except errors.PageServerError as e:
            if e.code == "CHECKSUM":
                raise errors.PageSourceError(
                    self.src.name, f"checksum mismatch in the pages at {vaddr:#x} "
                                   f"({nr_pages} pages)") from None
            raise self._lost(e) from None

    def _lost(self, e: errors.PageServerError) -> errors.PageSourceError:
        if self.src.closing:
            return errors.PageSourceError(self.src.name, "closed")
        if e.code == "CONNECTION":      # (not a refusal, an ERROR or a checksum)
            return errors.SourceLinkLost(self.src.name, f"fault lane: {e}")
        return errors.PageSourceError(self.src.name, f"fault lane: {e}")

    def shutdown(self) -> None:
        if self.reader is not None:
            self.reader.shutdown()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


class RemoteSource:
    """Pages from the source host's page-server (read session ``session``).
    Two connections: faults have their own (``FaultLane``, blocking, served
    by the daemon's fault thread), so they never queue behind prefetch
    traffic (``_Lane``, on the event loop)."""

    remote = True

    def __init__(self, address: str, port: int, session: str,
                 ssl_context: ssl.SSLContext | None, local: LocalSource | None = None) -> None:
        self.address, self.port, self.session = address, port, session
        self.ssl = ssl_context
        self.name = f"{address}:{port} session {session!r}"
        self.failed: errors.PageSourceError | None = None
        self.on_lost = None            # called once when the source is lost
        self.closing = False
        self.fault = FaultLane(self)
        self.prefetch = _Lane(self, "prefetch")
        # Pages the local image chain holds (pre-copy rounds) are taken from
        # it, never fetched again: only the dump's PE_LAZY pages come by GET.
        self.local = local
        self._stored: dict[int, list[tuple[int, int]]] = {}
        self._starts: dict[int, list[int]] = {}

    def expect_map(self, pid: int) -> None:
        """``pid``'s image leaves its whole lazy area to the source, which
        says later (GET_MAP) which pages the local chain holds as they are:
        until ``set_local``, every page is fetched."""
        self._stored[pid], self._starts[pid] = [], []

    def set_local(self, pid: int, local: list[tuple[int, int]]) -> None:
        """The map came: these pages of ``pid`` are taken from the local chain
        (ImageError if it does not store them all: never zeros instead)."""
        local = pagemap.normalize(local)
        if self.local is None:
            if local:
                raise errors.ImageError(self.name, None, f"pid {pid}: the source says "
                                        f"{pagemap.pages(local)} pages are in the local "
                                        "image, and there is none")
            return
        missing = pagemap.subtract(local, self.local.held(pid))
        if missing:
            raise errors.ImageError(self.local.name, None, f"pid {pid}: the source says pages "
                                    f"{missing[0][0]:#x}-{missing[0][1]:#x} are in the local "
                                    f"image chain, which does not store them "
                                    f"({pagemap.pages(missing)} pages)")
        self._stored[pid], self._starts[pid] = local, [a for a, _ in local]

    def split(self, pid: int, src: int, end: int
              ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """[src, end) as (ranges held locally, ranges to GET)."""
        if self.local is None:
            return [], [(src, end)]
        st = self._stored.get(pid)
        if st is None:
            try:
                st = self.local.stored(pid)
            except errors.ImageError:
                st = []
            self._stored[pid] = st
            self._starts[pid] = [a for a, _ in st]
        # bisect to the stored ranges around [src, end): the list is long
        # (it has a hole at every page the dump left lazy)
        starts = self._starts[pid]
        i = bisect.bisect_right(starts, src) - 1
        j = bisect.bisect_left(starts, end)
        if (i < 0 or st[i][1] <= src) and j == i + 1:
            return [], [(src, end)]     # nothing stored there (a fault's usual case)
        i = max(i, 0)
        here = pagemap.intersect([(src, end)], st[i:j + 1])
        return here, pagemap.subtract([(src, end)], here)

    def reset(self) -> None:
        """New lanes, for another ``open`` after one failed."""
        self.fault.close()
        self.fault = FaultLane(self)
        old, self.prefetch = self.prefetch, _Lane(self, "prefetch")
        if old.writer is not None:
            old.writer.transport.abort()
        self.failed = None

    def drop(self, exc: errors.PageSourceError) -> None:
        """The lanes broke (``exc``): what waits on them fails out now, the
        fault thread's wait included, without ``on_lost`` again."""
        self.failed = self.failed or exc
        self.fault.shutdown()
        lane = self.prefetch
        if lane.writer is not None:
            lane.writer.transport.abort()
        lane._fail(exc)
        if lane.task is not None:
            lane.task.cancel()

    async def open(self) -> None:
        # The fault lane connects with blocking I/O: in a thread, while the
        # prefetch lane connects on the loop.
        await asyncio.gather(asyncio.get_running_loop().run_in_executor(None, self.fault.open),
                             self.prefetch.open())
        log.info("lazy-pages: page source %s (%s)", self.name,
                 "TLS" if self.ssl else "plaintext")

    async def close(self, failure: str | None = None) -> None:
        """The lanes closed; the source is told DONE (``failure`` None: every
        page is in) or ERROR ``failure`` (the daemon gave up)."""
        self.closing = True
        self.fault.close()
        await self.prefetch.close(failure)
