"""`migrate lazy-pages`: serve the missing pages of restored processes.

The restore (dest/lazy.py) connects to our unix socket once per process and
sends its userfaultfd (SCM_RIGHTS) with the ranges whose pages we supply.
Then, on two threads:

* the fault thread polls every uffd (blocking, no event loop on the way)
  and passes its events to one handler each: ``on_pagefault``
  (UFFDIO_COPY of the page, UFFDIO_ZEROPAGE where nothing is stored),
  ``on_fork`` (the child's uffd arrives in the message: it inherits the
  parent's missing pages), ``on_remap`` (missing pages move with the area),
  ``on_remove`` and ``on_unmap`` (those pages are never fetched; a later
  touch of a MADV_DONTNEED'ed page gets the zero page);
* on the asyncio loop, a prefetch task copies the remaining pages in large
  batches, starting just after the latest fault, then in address order
  (wrapping around); the loop also takes the restore's hand-overs and
  watches the processes' exits;
* races: EEXIST (the page is already there) skips the page, EAGAIN (the mm
  is changing: an event is pending for us) retries once the events are
  read, ENOENT (the range is gone) drops it, ESRCH (the process is gone)
  drops the process.

Fault requests to a remote source have their own connection, so they never
wait behind prefetch traffic: the fault thread sends a fault's GET, waits
for its PAGE_DATA and copies it in (blocking I/O: each event-loop wake-up
on the way cost tens of microseconds).  Both threads change the processes'
page ranges (and call the uffd ioctls, whose argument structs are shared)
under one lock, ``mu``; the fault thread never holds it while it waits
for the network, and the prefetch holds it for one batch at a time.

When every page is in, the uffds are closed (the registrations go with
them) and the daemon reports pages by fault and by prefetch and the time
threads spent blocked on missing pages, then exits.

If the page source is lost (connection, protocol, checksum, image error),
every restored process is killed before its uffd is closed: with the uffd
gone its missing pages would read as zeros.  Known gap: if the daemon itself
is SIGKILLed, that cannot be done.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import errno
import gc
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

from migrate import errors
from migrate.images import pagemap as pm
from migrate.kernel import proc as kproc
from migrate.kernel import syscalls, userfaultfd as U
from migrate.lazypages.ranges import PAGE, RangeMap
from migrate.pageserver import protocol as P
from migrate.pageserver.protocol import MAP_LOCAL, MAP_ZERO

log = logging.getLogger(__name__)

HEADER = struct.Struct("<I")
MAX_MESSAGE = 64 << 20
FAULT_PAGES = 1              # pages copied per fault (the rest is prefetch's job)
LOCAL_BATCH = 256            # pages per UFFDIO_COPY when prefetching locally (1 MiB):
                             # the loop answers faults between two batches
REMOTE_BATCH = 512           # pages per prefetch GET (2 MiB)
REMOTE_DEPTH = 8             # prefetch GETs in flight
RETRY_S = 0.0005
WATCH_S = 0.5
FAULT_DEPTH = 32             # fault GETs sent at once (threads faulting together)
# A connection to the source that breaks (SourceLinkLost) is made again for
# this long, the faults held meanwhile, before the daemon gives up (QEMU's
# post-copy recovery, done by itself); the source waits for it (lazyserve).
RECOVER_S = 60.0
RECONNECT_S = 0.5            # between two attempts
# The fault thread, woken by a fault, takes the GIL from a busy loop (the
# prefetch's) after at most this long (sys.setswitchinterval; 5 ms by default).
SWITCH_INTERVAL_S = 0.0002


LATENCY_BUCKETS_US = (25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000)


@dataclasses.dataclass
class Stats:
    pages_fault: int = 0
    pages_prefetch: int = 0
    pages_zero: int = 0
    pages_dropped: int = 0       # unmapped or removed before we copied them
    pages_local: int = 0         # remote mode: taken from the local image chain
    pages_remote: int = 0        # remote mode: fetched by GET
    faults: int = 0
    blocktime_total_us: float = 0.0
    blocktime_max_us: float = 0.0
    latencies_us: list = dataclasses.field(default_factory=list)
    first_handover: float = 0.0
    map_s: float = 0.0           # remote mode: the source's map applied, after the hand-over
    pages_map_zero: int = 0      # remote mode: lazy pages the map says are zero
    all_in_s: float = 0.0
    done_monotonic: float = 0.0  # CLOCK_MONOTONIC when the last page was in (benches)
    processes: int = 0
    recoveries: int = 0          # remote mode: connections to the source made again
    recovery_s: float = 0.0      # ... and how long the faults were held for it

    def block(self, us: float) -> None:
        self.blocktime_total_us += us
        self.blocktime_max_us = max(self.blocktime_max_us, us)
        self.latencies_us.append(us)

    def as_dict(self) -> dict:
        lat = sorted(self.latencies_us)

        def pct(q: float) -> float:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else 0.0
        return {"pages_fault": self.pages_fault, "pages_prefetch": self.pages_prefetch,
                "pages_zero": self.pages_zero, "pages_dropped": self.pages_dropped,
                "pages_local": self.pages_local, "pages_remote": self.pages_remote,
                "faults": self.faults, "processes": self.processes,
                "map_s": round(self.map_s, 4), "pages_map_zero": self.pages_map_zero,
                "blocktime_total_us": round(self.blocktime_total_us, 1),
                "blocktime_max_us": round(self.blocktime_max_us, 1),
                "fault_latency_p50_us": pct(0.50), "fault_latency_p99_us": pct(0.99),
                # cumulative counts per bound (us), for a Prometheus histogram
                "fault_latency_buckets_us": [[b, bisect.bisect_right(lat, b)]
                                             for b in LATENCY_BUCKETS_US],
                "all_in_s": round(self.all_in_s, 4),
                "recoveries": self.recoveries, "recovery_s": round(self.recovery_s, 3),
                "done_monotonic": self.done_monotonic}


class Proc:
    """One process whose pages we supply (its uffd)."""

    def __init__(self, uffd: int, pid: int, image_pid: int, missing: RangeMap) -> None:
        self.uffd = uffd
        self.pid = pid                  # 0: a child we learnt of by UFFD_EVENT_FORK
        self.image_pid = image_pid      # whose pages (the GET's pid)
        self.missing = missing
        self.inflight = RangeMap()      # taken from missing, copy not done yet
        self.waiters: dict[int, list[float]] = {}   # page -> fault times
        self.cursor = 0                 # prefetch goes on from here
        self.pidfd = -1
        self.alive = True
        self.map_pending = False        # its source's map (GET_MAP) is not here yet

    def __repr__(self) -> str:
        return f"pid {self.pid}" if self.pid else f"child of pid {self.image_pid} (uffd {self.uffd})"

    @property
    def done(self) -> bool:
        return not self.missing and not self.inflight


class LazyPages:
    def __init__(self, source, sock_path: str, *, prefetch: bool = True,
                 prepare=None, listener: socket.socket | None = None,
                 recover: float = RECOVER_S) -> None:
        self.source = source
        # ``recover``: how long a broken connection to the source is made
        # again before the daemon gives up (0: never)
        self.recover_s = recover
        self.recovering = False          # under mu: the lanes are being made again
        self.reachable = asyncio.Event()  # (the prefetch waits while they are not)
        self.reachable.set()
        self._recovery: asyncio.Task | None = None
        self._fault_busy = False         # the fault thread waits on a lane
        # ``prepare``: run (in a thread) once listening, before the first
        # connection is taken: a restore may then load its image meanwhile.
        self.prepare = prepare
        self.sock_path = sock_path
        self.prefetch_on = prefetch
        self.procs: list[Proc] = []
        self.stats = Stats()
        self.failed: BaseException | None = None
        self.finished = asyncio.Event()
        self.work = asyncio.Event()      # something to prefetch
        self.loop: asyncio.AbstractEventLoop | None = None
        # ``listener``: already listening on ``sock_path`` (a daemon forked
        # before the restore was asked for: its hand-over may wait in the
        # backlog already)
        self.listener: socket.socket | None = listener
        self.tasks: set[asyncio.Task] = set()
        self.killed: list[int] = []
        self.error = ""
        self.last_seen = False           # the restore's last process was handed over
        # Shared by the loop and the fault thread (module doc).
        self.mu = threading.RLock()
        self.stopping = False            # the fault thread stops
        self._gen = 0                    # bumped when a uffd comes or goes
        self._later: list[tuple[float, object]] = []   # retries (EAGAIN), fault thread
        self._gets: list[tuple[Proc, int, int]] = []   # fault GETs sent, unanswered
        self._unsent: list[tuple[Proc, int, int]] = []  # and waiting for room
        self._poked = False
        self._maps: dict[int, list | None] = {}   # image pid -> zero ranges (None: asked)
        self._buffers: list[bytearray] = []       # prefetch windows, reused (fresh memory is slow)
        self._wakefd = -1
        self._loop_tid = 0
        self.fault_thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------
    async def run(self, ready=None) -> int:
        self.loop = asyncio.get_running_loop()
        self._loop_tid = threading.get_ident()
        # Listening is all the restore needs to start: the connections to
        # the source and the local index are made while it builds (its
        # hand-over waits in our backlog), not before (post-copy downtime).
        self._listen()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)
        if ready is not None:
            ready()
        work = []
        if self.source.remote:
            self.source.on_lost = self._lost
            work.append(self.source.open())
        if self.prepare is not None:
            work.append(self.loop.run_in_executor(None, self.prepare))
        results = await asyncio.gather(*work, return_exceptions=True)
        if self.source.remote and isinstance(results[0], errors.PageSourceError) and \
                self.prepare is not None and not isinstance(results[-1], BaseException):
            # Connected early (before the stop) and it failed: once more, now.
            log.warning("lazy-pages: %s; connecting again", results[0])
            self.source.reset()
            results[0] = (await asyncio.gather(self.source.open(),
                                               return_exceptions=True))[0]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._close()
            if self.source.remote:
                await self.source.close(str(failed[0]) or type(failed[0]).__name__)
            raise failed[0]
        self._ask_map_early()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL_S))
        # What exists by now (modules, the image's index) lives as long as we
        # do: out of the cyclic GC's sight, a full collection during a fault
        # walks only what the faults made.
        gc.freeze()
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fault_thread = threading.Thread(target=self._fault_loop, name="faults",
                                             daemon=True)
        self.fault_thread.start()
        accept = asyncio.create_task(self._accept_loop())
        watch = asyncio.create_task(self._watch_children())
        pre = asyncio.create_task(self._prefetch_loop()) if self.prefetch_on else None
        try:
            await self.finished.wait()
        finally:
            for t in (accept, watch, pre, self._recovery, *self.tasks):
                if t is not None:
                    t.cancel()
            for t in (accept, watch, pre, self._recovery, *self.tasks):
                if t is not None:
                    try:
                        await t
                    except (asyncio.CancelledError, errors.MigrateError):
                        pass
            self._stop_faults()
            with self.mu:
                missing = any(p.alive and not p.done for p in self.procs)
            self._close()
            if self.source.remote:
                # DONE only with every page in (or its process gone): the
                # source's frozen tree goes once it hears it
                await self.source.close(
                    str(self.failed) if self.failed is not None
                    else "stopped with pages still missing" if missing else None)
            sys.setswitchinterval(switch)
        return self._report()

    def _stop_faults(self) -> None:
        """The fault thread ends: woken from its poll, or from its wait for
        a page (the fault lane is shut down)."""
        with self.mu:
            self.stopping = True
        self._wake_thread()
        if self.source.remote:
            self.source.fault.shutdown()
        if self.fault_thread is not None:
            self.fault_thread.join(10)
        os.close(self._wakefd)
        self._wakefd = -1

    def _report(self) -> int:
        d = self.stats.as_dict()
        if self.failed is not None:
            why = f"lazy-pages: {self.failed}"
            if self.killed:
                why += (f"; killed pid {', '.join(map(str, self.killed))} so that it does "
                        "not run on with missing memory")
            self.error = why
            return 1
        log.info("lazy-pages: done: %d pages by fault, %d by prefetch, %d zero pages, "
                 "%d faults, blocked %.1f ms in total (at most %.1f ms), all in after %.3f s",
                 d["pages_fault"], d["pages_prefetch"], d["pages_zero"], d["faults"],
                 d["blocktime_total_us"] / 1000, d["blocktime_max_us"] / 1000, d["all_in_s"])
        return 0

    def _on_signal(self, sig) -> None:
        log.warning("lazy-pages: %s: stopping", signal.Signals(sig).name)
        with self.mu:
            missing = any(p.alive and not p.done for p in self.procs)
        if missing:
            self.fail(errors.MigrateError(f"stopped by {signal.Signals(sig).name} with pages "
                                          "still missing"))
        else:
            self.finished.set()

    def _listen(self) -> None:
        if self.listener is not None:
            self.listener.setblocking(False)
            log.info("lazy-pages: serving the restore on %s", self.sock_path)
            return
        s = listen_unix(self.sock_path)
        s.setblocking(False)
        self.listener = s
        log.info("lazy-pages: waiting for the restore on %s", self.sock_path)

    def _close(self) -> None:
        with self.mu:
            for p in self.procs:
                self._drop(p, None)
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.sock_path)
            except OSError:
                pass
        local = self.source.local if self.source.remote else self.source
        if local is not None:
            local.close()

    def _check_finished(self) -> None:
        # Done when every process handed over is done or gone, and the
        # restore has handed over its last one (or every process died: a
        # restore that failed half-way killed them).  On the loop.
        with self.mu:
            done = self._all_done() and (self.last_seen or
                                         all(not p.alive for p in self.procs))
            if done and not self.stats.all_in_s:
                self.stats.all_in_s = time.perf_counter() - self.stats.first_handover
                self.stats.done_monotonic = time.monotonic()
        if done:
            self.finished.set()

    def _all_done(self) -> bool:
        return bool(self.procs) and all(not p.alive or p.done for p in self.procs)

    def _in_loop(self) -> bool:
        return threading.get_ident() == self._loop_tid

    def fail(self, exc: BaseException) -> None:
        """The page source is lost: no process may run on with wrong memory."""
        if not self._in_loop():
            # From the fault thread: it stops serving at once, the loop kills.
            with self.mu:
                if self.stopping:
                    return              # closing: the lane was shut down by us
                self.stopping = True
            self.loop.call_soon_threadsafe(self.fail, exc)
            return
        with self.mu:
            if self.failed is not None:
                return
            self.failed = exc
            if any(p.alive and not p.done for p in self.procs):
                # Children known only by their uffd are in the trees below.
                for p in self.procs:
                    if p.alive and p.pid:
                        self._kill_tree(p.pid)
        self.finished.set()

    # -- a broken connection to the source -------------------------------------------
    def _lost(self, exc: BaseException) -> None:
        """From either thread: a lane to the source failed.  A broken
        connection (SourceLinkLost) is made again for ``recover_s`` while
        the faults wait (``_recover``); anything else fails the daemon."""
        if not (isinstance(exc, errors.SourceLinkLost) and self.recover_s > 0
                and self.source.remote):
            self.fail(exc)
            return
        with self.mu:
            if self.failed is not None or self.recovering or self.stopping:
                return
            self.recovering = True
        if self._in_loop():
            self._start_recovery(exc)
        else:
            self.loop.call_soon_threadsafe(self._start_recovery, exc)

    def _start_recovery(self, exc: BaseException) -> None:
        log.warning("lazy-pages: %s: the processes wait for their pages; connecting again "
                    "for up to %.0f s", exc, self.recover_s)
        self.reachable.clear()
        self._recovery = asyncio.create_task(self._recover(exc))

    async def _recover(self, exc: BaseException) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.recover_s
        # 1. What waits on the old lanes fails out: the prefetch's requests,
        #    the map's, the fault thread's (its lane is shut down under it).
        self.source.drop(exc)
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        end = time.monotonic() + 5
        while self._fault_busy and time.monotonic() < end:
            await asyncio.sleep(0.01)
        # 2. What was in flight is missing again (answers that still come
        #    for it find nothing in flight and are dropped).
        with self.mu:
            for p in self.procs:
                if p.alive:
                    for a, b, src in p.inflight.items():
                        p.missing.add(a, b, src)
                    p.inflight = RangeMap()
            self._gets, self._unsent = [], []
        # 3. New lanes, until the deadline.
        attempt = 0
        while True:
            if self.finished.is_set():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self.fail(errors.PageSourceError(
                    self.source.name, f"{getattr(exc, 'why', exc)}; not back after "
                                      f"{self.recover_s:.0f} s ({attempt} attempts)"))
                return
            attempt += 1
            self.source.reset()
            try:
                await asyncio.wait_for(self.source.open(), min(left, 10.0))
                break
            except (errors.PageSourceError, asyncio.TimeoutError) as e:
                log.info("lazy-pages: connecting again (attempt %d): %s", attempt,
                         e or "timed out")
                await asyncio.sleep(min(RECONNECT_S, max(left, 0)))
        # 4. The faults that wait are asked again (by the fault thread, on
        #    the new fault lane), then the map if it had not come, then the
        #    prefetch goes on.
        with self.mu:
            for p in self.procs:
                if not p.alive:
                    continue
                for addr in [a for a in p.waiters if p.missing.src_of(a) is not None]:
                    t0s = p.waiters.pop(addr)
                    self.stats.faults -= 1   # counted again
                    self.on_pagefault(p, U.UffdMsg(U.UFFD_EVENT_PAGEFAULT, address=addr),
                                      t0s[0])
                    p.waiters[addr] = t0s
            self.recovering = False
            self.stats.recoveries += 1
            self.stats.recovery_s += time.monotonic() - t0
        self._wake_thread()
        for pid, zero in list(self._maps.items()):
            if zero is None:
                t = asyncio.create_task(self._take_map(pid))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
        self.reachable.set()
        self.work.set()
        self._recovery = None
        log.warning("lazy-pages: the source is back after %.2f s (%d attempts)",
                    time.monotonic() - t0, attempt)

    def _kill_tree(self, pid: int) -> None:
        self.killed += kproc.kill_tree(pid)

    # -- the restore's hand-over ---------------------------------------------
    async def _accept_loop(self) -> None:
        while True:
            conn, _ = await self.loop.sock_accept(self.listener)
            try:
                await self._take(conn)
            except (OSError, ValueError, KeyError, asyncio.TimeoutError,
                    errors.MigrateError) as e:
                log.warning("lazy-pages: hand-over refused: %s", e)
                try:
                    await self.loop.sock_sendall(conn, f"ERROR {e}\n".encode())
                except OSError:
                    pass
            finally:
                conn.close()

    async def _readable(self, sock: socket.socket, timeout: float = 10) -> None:
        fut = self.loop.create_future()
        self.loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self.loop.remove_reader(sock.fileno())

    async def _take(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        await self._readable(conn)
        head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 1)
        if len(head) != HEADER.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError("a hand-over needs a length and one userfaultfd")
        uffd = fds[0]
        try:
            (n,) = HEADER.unpack(head)
            if n > MAX_MESSAGE:
                raise ValueError(f"hand-over message of {n} bytes")
            buf = bytearray()
            while len(buf) < n:
                chunk = await self.loop.sock_recv(conn, n - len(buf))
                if not chunk:
                    raise ValueError("hand-over message truncated")
                buf += chunk
            msg = json.loads(buf)
            pid, image_pid = int(msg["pid"]), int(msg["image_pid"])
            last = bool(msg.get("last", True))
            missing = RangeMap((int(s), int(e)) for s, e in msg["lazy"])
            os.set_blocking(uffd, False)
            p = Proc(uffd, pid, image_pid, missing)
            if msg.get("map"):
                if not self.source.remote:
                    raise ValueError(f"pid {pid}: its image leaves its lazy pages to their "
                                     "source: serve it with --page-server")
                p.map_pending = True
            if self.source.remote is False:
                with self.mu:
                    self.source.pieces(image_pid, 0, 0)      # load its index now
            p.pidfd = syscalls.pidfd_open(pid)
        except BaseException:
            os.close(uffd)
            raise
        with self.mu:
            if p.map_pending:
                if image_pid not in self._maps:
                    self.source.expect_map(image_pid)
                    self._maps[image_pid] = None
                    t = asyncio.create_task(self._take_map(image_pid))
                    self.tasks.add(t)
                    t.add_done_callback(self.tasks.discard)
                elif self._maps[image_pid] is not None:
                    self._apply_map(p, self._maps[image_pid])
            self._add(p)
            self.last_seen = self.last_seen or last
            if not self.stats.first_handover:
                self.stats.first_handover = time.perf_counter()
        self.loop.add_reader(p.pidfd, self._on_exit, p)
        await self.loop.sock_sendall(conn, b"OK\n")
        log.info("lazy-pages: pid %d: %d pages to supply over %d ranges", pid,
                 p.missing.pages, len(p.missing.items()))
        self._check_finished()

    def _ask_map_early(self) -> None:
        """A post-copy image (its root's lazy area left whole to the source,
        ``pagemap_head.lazy_map``): ask for the map now, not at the
        hand-over, so that it is here when the process starts."""
        local = self.source.local if self.source.remote else None
        if local is None:
            return
        root = local.chain[0].inventory.root_pid
        try:
            if not root or not local.lazy_map(root):
                return
        except errors.MigrateError:
            return          # the hand-over says what is wrong with the image
        with self.mu:
            self.source.expect_map(root)
            self._maps[root] = None
        t = asyncio.get_running_loop().create_task(self._take_map(root))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _take_map(self, image_pid: int) -> None:
        """GET_MAP: which of the lazy pages of ``image_pid`` the local chain
        holds as they are now, which are zero; the rest is the source's.
        Until it comes every fault is a GET (the frozen source holds every
        page) and the prefetch leaves these processes alone."""
        try:
            runs = await self.source.prefetch.get_map(image_pid)
        except errors.PageSourceError as e:
            self._lost(e)                # (asked again once the source is back)
            return
        if runs is None:
            log.warning("lazy-pages: the source does not answer GET_MAP: every lazy page of "
                        "pid %d comes from it", image_pid)
            runs = []
        local = [(a, a + n * PAGE) for a, n, kind in runs if kind == MAP_LOCAL]
        zero = [(a, a + n * PAGE) for a, n, kind in runs if kind == MAP_ZERO]
        with self.mu:
            try:
                self.source.set_local(image_pid, local)
            except errors.ImageError as e:
                self.fail(errors.PageSourceError(self.source.name, str(e)))
                return
            self._maps[image_pid] = zero
            for p in self.procs:
                if p.alive and p.image_pid == image_pid and p.map_pending:
                    self._apply_map(p, zero)
            if self.stats.first_handover:      # (else it came before the process)
                self.stats.map_s = time.perf_counter() - self.stats.first_handover
        log.info("lazy-pages: pid %d: the source's map: %d runs, %d pages local, %d zero, "
                 "%.1f ms after the first hand-over", image_pid, len(runs),
                 sum((b - a) // PAGE for a, b in local), sum((b - a) // PAGE for a, b in zero),
                 self.stats.map_s * 1e3)
        self.work.set()
        self._check_finished()

    def _apply_map(self, p: Proc, zero: list[tuple[int, int]]) -> None:
        """Under mu: ``p``'s zero pages are no longer missing (a touch maps
        the zero page); the prefetch may take the rest.  ``zero`` is in the
        source's addresses: the process may have moved its pages (mremap)
        since it runs here, so they are found by where they came from, not
        by where they are now."""
        n = sum(e - s for s, e, _ in p.missing.pop_src_ranges(pm.normalize(zero)))
        self.stats.pages_map_zero += n // PAGE
        p.map_pending = False

    async def _watch_children(self) -> None:
        """Forked children come without a pid (no pidfd): probe their mm."""
        while True:
            await asyncio.sleep(WATCH_S)
            with self.mu:
                for p in self.procs:
                    if p.alive and not p.pid and not U.mm_alive(p.uffd):
                        if not p.done:
                            log.info("lazy-pages: %r exited with %d pages still missing", p,
                                     p.missing.pages + p.inflight.pages)
                        self._drop(p, None)
                if log.isEnabledFor(logging.DEBUG):
                    st = self.stats
                    log.debug("lazy-pages: %d pages missing, %d in flight; %d by fault, %d by "
                              "prefetch (%d local, %d remote), %d faults blocked %.0f ms",
                              sum(p.missing.pages for p in self.procs if p.alive),
                              sum(p.inflight.pages for p in self.procs if p.alive),
                              st.pages_fault, st.pages_prefetch, st.pages_local,
                              st.pages_remote, st.faults, st.blocktime_total_us / 1e3)
            self._check_finished()

    def _add(self, p: Proc) -> None:
        """Under mu: the fault thread polls its uffd from now on."""
        self.procs.append(p)
        self.stats.processes += 1
        self._gen += 1
        self._wake_thread()
        if self._in_loop():
            self.work.set()
        else:
            self.loop.call_soon_threadsafe(self.work.set)

    def _on_exit(self, p: Proc) -> None:
        with self.mu:
            if p.alive and not p.done and self.failed is None:
                log.warning("lazy-pages: %r exited with %d pages still missing", p,
                            p.missing.pages + p.inflight.pages)
            self._drop(p, None)
        self._check_finished()

    def _drop(self, p: Proc, why: str | None) -> None:
        """Under mu, from either thread."""
        if why:
            log.info("lazy-pages: %r: %s", p, why)
        if p.uffd >= 0:
            os.close(p.uffd)         # (the fault thread's poll lets go of it when woken)
            p.uffd = -1
            self._gen += 1
            self._wake_thread()
        if p.pidfd >= 0:
            if self._in_loop():
                self._close_pidfd(p)
            else:
                self.loop.call_soon_threadsafe(self._close_pidfd, p)
        p.alive = False

    def _close_pidfd(self, p: Proc) -> None:
        if p.pidfd >= 0:
            self.loop.remove_reader(p.pidfd)
            os.close(p.pidfd)
            p.pidfd = -1

    # -- the fault thread --------------------------------------------------------
    def _wake_thread(self) -> None:
        if self._wakefd >= 0:
            try:
                os.eventfd_write(self._wakefd, 1)
            except OSError:
                pass

    def _fault_loop(self) -> None:
        """Poll the uffds; handle their events; send the faults' GETs (remote)
        and copy each page in as soon as it comes."""
        poller, fds, gen = None, {}, -1
        try:
            while True:
                with self.mu:
                    if self.stopping:
                        return
                    if gen != self._gen:
                        poller = select.poll()
                        poller.register(self._wakefd, select.POLLIN)
                        fds = {p.uffd: p for p in self.procs if p.alive and p.uffd >= 0}
                        for fd in fds:
                            poller.register(fd, select.POLLIN)
                        gen = self._gen
                    timeout = None
                    if self._later:
                        timeout = max(0.0, (self._later[0][0] - time.monotonic()) * 1000)
                ready = poller.poll(timeout)
                t0 = time.perf_counter()
                with self.mu:
                    if self.stopping:
                        return
                    for fd, _ in ready:
                        if fd == self._wakefd:
                            try:
                                os.eventfd_read(fd)
                            except BlockingIOError:
                                pass
                            continue
                        p = fds.get(fd)
                        if p is not None and p.alive and p.uffd == fd:
                            self._on_uffd(p, t0)
                    self._run_later()
                    gets, unsent = [], []
                    if not self.recovering:     # (else they wait for the new lane)
                        gets, unsent = self._gets, self._unsent
                        self._gets, self._unsent = [], []
                    stopping = self.stopping
                    self._fault_busy = bool(gets or unsent) and not stopping
                if self._fault_busy:
                    try:
                        self._fault_gets(gets, unsent)
                    finally:
                        self._fault_busy = False
                self._poke()
        except Exception as e:  # noqa: BLE001 -- a bug here must kill the process
            log.exception("lazy-pages: the fault thread failed")
            self.fail(e)

    def _fault_gets(self, gets: list[tuple[Proc, int, int]], unsent: list) -> None:
        """Remote faults: the answers to the GETs sent (``gets``), each page
        copied in as it comes (mu is not held while waiting); then the
        GETs that waited for room (``unsent``), FAULT_DEPTH at a time."""
        lane = self.source.fault
        try:
            while True:
                for p, a, b in gets:
                    data = lane.recv(p.image_pid, a, (b - a) // PAGE)
                    with self.mu:
                        if self.stopping:
                            return
                        self._place(p, [(a, data, 0, b - a)], "fault")
                if not unsent:
                    return
                gets, unsent = unsent[:FAULT_DEPTH], unsent[FAULT_DEPTH:]
                lane.send([(p.image_pid, a, (b - a) // PAGE) for p, a, b in gets])
        except errors.PageSourceError as e:
            # (what it waited for stays in flight: a recovery asks again;
            # a lane replaced meanwhile failed because it was shut down)
            if lane is self.source.fault:
                self._lost(e)

    def _poke(self) -> None:
        """Tell the loop when every page may be in (it checks, _check_finished,
        under mu: read without it here).  What the loop's prefetch completes,
        the loop checks itself."""
        done = self._all_done()
        if done and not self._poked:
            self.loop.call_soon_threadsafe(self._check_finished)
        self._poked = done

    def _later_call(self, fn) -> None:
        """Under mu: run ``fn`` on the fault thread in RETRY_S (EAGAIN: an
        event is pending, read it first)."""
        self._later.append((time.monotonic() + RETRY_S, fn))
        if not self._in_loop():
            return
        self._wake_thread()

    def _run_later(self) -> None:
        now = time.monotonic()
        due = [fn for t, fn in self._later if t <= now]
        if due:
            self._later = [(t, fn) for t, fn in self._later if t > now]
            for fn in due:
                fn()

    # -- uffd events: one handler each ------------------------------------------
    def _on_uffd(self, p: Proc, t0: float) -> None:
        """Under mu, on the fault thread."""
        try:
            msgs = U.read_msgs(p.uffd)
        except errors.KernelError as e:
            self._drop(p, f"reading its uffd failed: {e}")
            return
        try:
            for m in msgs:
                getattr(self, _HANDLERS.get(m.event, "on_unknown"))(p, m, t0)
                if not p.alive:
                    break
        except Exception as e:  # noqa: BLE001 -- a bug here must kill the process
            log.exception("lazy-pages: %r: handling its events failed", p)  # rather than
            self.fail(e)                                                     # let it run on

    def on_pagefault(self, p: Proc, m: U.UffdMsg, t0: float) -> None:
        self.stats.faults += 1
        addr = m.address & ~(PAGE - 1)
        if p.missing.src_of(addr) is not None:
            end = addr + FAULT_PAGES * PAGE
            parts = p.missing.pop(addr, end)
            here = []
            if self.source.remote:
                # The GETs go out first: the bookkeeping below overlaps their
                # round trip.  Pages of the local chain (pre-copy) are copied
                # from it once they are in flight.
                for s, e, src in parts:
                    h, there = self.source.split(p.image_pid, src, src + (e - s))
                    for a, b in there:
                        self._send_fault(p, a, b)
                    here += h
            for s, e, src in parts:
                p.inflight.add(s, e, src)
            p.waiters.setdefault(addr, []).append(t0)
            p.cursor = end                   # prefetch goes on from here
            if self.source.remote:
                for a, b in here:
                    self._place_local(p, a, b, "fault")
            else:
                for s, e, src in parts:
                    self._fetch(p, src, src + (e - s), "fault")
        elif p.inflight.src_of(addr) is not None:
            p.waiters.setdefault(addr, []).append(t0)   # its copy wakes it
        else:
            self._zero(p, addr, t0)

    def on_fork(self, p: Proc, m: U.UffdMsg, t0: float) -> None:
        # The child's page tables are a copy of the parent's: what the parent
        # misses (or has in flight), the child misses too.
        missing = p.missing.copy()
        missing.update(p.inflight)
        child = Proc(m.ufd, 0, p.image_pid, missing)
        child.map_pending = p.map_pending
        os.set_blocking(m.ufd, False)
        self._add(child)
        log.info("lazy-pages: %r forked (uffd %d): %d pages to supply", p, m.ufd,
                 missing.pages)

    def on_remap(self, p: Proc, m: U.UffdMsg, t0: float) -> None:
        p.missing.move(m.start, m.end, m.length)
        p.inflight.move(m.start, m.end, m.length)
        waiters = {a: t for a, t in p.waiters.items() if m.start <= a < m.start + m.length}
        for a, t in waiters.items():
            del p.waiters[a]
            p.waiters[a - m.start + m.end] = t
        log.debug("lazy-pages: %r: remap %#x -> %#x (%d bytes)", p, m.start, m.end, m.length)

    def on_remove(self, p: Proc, m: U.UffdMsg, t0: float) -> None:
        n = sum(e - s for s, e, _ in p.missing.pop(m.start, m.end))
        n += sum(e - s for s, e, _ in p.inflight.pop(m.start, m.end))
        self.stats.pages_dropped += n // PAGE
        log.debug("lazy-pages: %r: %s %#x-%#x (%d missing pages dropped)", p,
                  "unmap" if m.event == U.UFFD_EVENT_UNMAP else "remove", m.start, m.end,
                  n // PAGE)

    on_unmap = on_remove

    def on_unknown(self, p: Proc, m: U.UffdMsg, t0: float) -> None:
        log.warning("lazy-pages: %r: unexpected uffd event %#x", p, m.event)

    # -- copying (under mu) ----------------------------------------------------------
    def _zero(self, p: Proc, addr: int, t0: float) -> None:
        done, err = U.zeropage(p.uffd, addr, PAGE)
        if err == 0:
            self.stats.pages_zero += 1
        elif err == errno.EEXIST:
            self._wake(p, addr, PAGE)
        elif err == errno.EAGAIN:
            self._later_call(lambda: self._retry_zero(p, addr, t0))
            return
        elif err == errno.ESRCH:
            self._drop(p, "gone")
            return
        elif err != errno.ENOENT:
            self.fail(errors.KernelError("ioctl(UFFDIO_ZEROPAGE)", err, p.pid or None,
                                         f"page {addr:#x}"))
            return
        self.stats.block((time.perf_counter() - t0) * 1e6)

    def _retry_zero(self, p: Proc, addr: int, t0: float) -> None:
        if not p.alive:
            return
        if p.missing.src_of(addr) is not None or p.inflight.src_of(addr) is not None:
            self.stats.faults -= 1   # counted again
            self.on_pagefault(p, U.UffdMsg(U.UFFD_EVENT_PAGEFAULT, address=addr), t0)
        else:
            self._zero(p, addr, t0)

    def _wake(self, p: Proc, addr: int, length: int) -> None:
        try:
            U.wake(p.uffd, addr, length)
        except errors.KernelError:
            pass

    def _fetch(self, p: Proc, src: int, end: int, kind: str) -> None:
        """Get [src, end) of the image and copy it to wherever it is now.
        Remote faults go out on the fault lane (``_send_fault``), remote
        prefetch to a task on the loop."""
        if not self.source.remote:
            try:
                pieces = self.source.pieces(p.image_pid, src, end)
            except errors.MigrateError as e:
                self.fail(errors.PageSourceError(self.source.name, str(e)))
                return
            self._place(p, pieces, kind)
            return
        here, there = self.source.split(p.image_pid, src, end)
        if kind != "fault" and here and there:
            # prefetch of scattered pages between local ones: one GET_RUNS,
            # the window assembled in a buffer, one UFFDIO_COPY
            self.stats.pages_local += sum(b - a for a, b in here) // PAGE
            self.stats.pages_remote += sum(b - a for a, b in there) // PAGE
            t = asyncio.create_task(self._fetch_window(p, src, end, here, there, kind))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
            return
        for a, b in here:
            self._place_local(p, a, b, kind)
        if kind == "fault":
            for a, b in there:
                self._send_fault(p, a, b)
            return
        # prefetch: the scattered runs of a batch in one GET_RUNS
        group: list[tuple[int, int]] = []
        pages = 0
        for a, b in there:
            n = (b - a) // PAGE
            if group and (pages + n > P.MAX_GET_PAGES or len(group) >= P.MAX_GET_RUNS):
                self._fetch_runs(p, group, kind)
                group, pages = [], 0
            group.append((a, n))
            pages += n
        if group:
            self._fetch_runs(p, group, kind)

    def _fetch_runs(self, p: Proc, runs: list[tuple[int, int]], kind: str) -> None:
        self.stats.pages_remote += sum(n for _, n in runs)
        t = asyncio.create_task(self._fetch_remote(p, runs, kind))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    def _place_local(self, p: Proc, a: int, b: int, kind: str) -> None:
        """Remote mode: image pages [a, b) held by the local chain (pre-copy)."""
        try:
            pieces = self.source.local.pieces(p.image_pid, a, b)
        except errors.MigrateError as e:
            self.fail(errors.PageSourceError(self.source.local.name, str(e)))
            return
        self.stats.pages_local += (b - a) // PAGE
        self._place(p, pieces, kind)

    def _send_fault(self, p: Proc, a: int, b: int) -> None:
        """Under mu, on the fault thread: GET image pages [a, b) on the fault
        lane now (or once fewer GETs are unanswered); the thread copies them
        in when the answer comes (``_fault_gets``)."""
        self.stats.pages_remote += (b - a) // PAGE
        if self.recovering or len(self._gets) >= FAULT_DEPTH or self._unsent:
            self._unsent.append((p, a, b))
            return
        try:
            self.source.fault.send([(p.image_pid, a, (b - a) // PAGE)])
        except errors.PageSourceError as e:
            self._lost(e)
            return
        self._gets.append((p, a, b))

    async def _fetch_window(self, p: Proc, src: int, end: int, here: list, there: list,
                            kind: str) -> None:
        """Image pages [src, end): ``there`` by GET_RUNS, ``here`` from the
        local chain, put together and copied in at once (a few dozen
        scattered runs a window cost a few dozen ioctls and bookkeeping
        each, and the map leaves thousands of windows like that)."""
        runs = [(a, (b - a) // PAGE) for a, b in there]
        data = await self._get_runs(p, runs)
        if data is None:
            return
        size = end - src
        buf = self._buffers.pop() if self._buffers else bytearray(REMOTE_BATCH * PAGE)
        try:
            with memoryview(buf) as mv, memoryview(data) as dv:
                try:
                    self._fill_local(p, mv, src, end, here)
                except errors.MigrateError as e:
                    self.fail(errors.PageSourceError(self.source.local.name, str(e)))
                    return
                # the source's pages over whatever the chain had there
                off = 0
                for a, n in runs:
                    mv[a - src:a - src + n * PAGE] = dv[off:off + n * PAGE]
                    off += n * PAGE
            with self.mu:
                self._place(p, [(src, buf, 0, size)], kind)
        finally:
            if len(self._buffers) < REMOTE_DEPTH + 2 and len(buf) == REMOTE_BATCH * PAGE:
                self._buffers.append(buf)
        self._check_finished()

    def _fill_local(self, p: Proc, mv, src: int, end: int, here: list) -> None:
        """The chain's pages of [src, end) into ``mv``: the whole window at
        once where the chain stores all of it (after a full pre-copy pass
        it does: the pages the source sends are written over their old
        copies), else run by run (``here``)."""
        local = self.source.local
        try:
            pieces = local.pieces(p.image_pid, src, end)
        except errors.ImageError:
            pieces = [x for a, b in here for x in local.pieces(p.image_pid, a, b)]
        for s, m, o, ln in pieces:
            with memoryview(m) as lv:
                mv[s - src:s - src + ln] = lv[o:o + ln]

    async def _get_runs(self, p: Proc, runs: list[tuple[int, int]]):
        """The runs' pages from the source, or None (the source is lost)."""
        try:
            return await self.source.prefetch.get_runs(p.image_pid, runs)
        except errors.PageSourceError as e:
            self._lost(e)
            return None

    async def _fetch_remote(self, p: Proc, runs: list[tuple[int, int]], kind: str) -> None:
        data = await self._get_runs(p, runs)
        if data is None:
            return
        pieces, off = [], 0
        for a, n in runs:
            pieces.append((a, data, off, n * PAGE))
            off += n * PAGE
        with self.mu:
            self._place(p, pieces, kind)
        self._check_finished()

    def _place(self, p: Proc, pieces, kind: str) -> None:
        """UFFDIO_COPY the pieces (src, buffer, offset, length) to where
        their pages are now (in flight: they may have moved or gone)."""
        if not p.alive:
            return
        for src, buf, off, length in pieces:
            for a, b, s in p.inflight.pop_src(src, src + length):
                self._copy(p, a, b, s, buf, off + (s - src), kind)

    def _copy(self, p: Proc, a: int, b: int, src: int, buf, off: int, kind: str) -> None:
        """[a, b) of the process gets the pages of image address ``src``,
        found at ``off`` of ``buf``."""
        dst = a
        while dst < b and p.alive:
            done, err = U.copy(p.uffd, dst, buf, b - dst, off + (dst - a))
            n = done // PAGE
            if kind == "fault":
                self.stats.pages_fault += n
            else:
                self.stats.pages_prefetch += n
            dst += n * PAGE
            if err == 0:
                break
            if err == errno.EEXIST:          # already there (zero page, or a race)
                self._wake(p, dst, PAGE)
                dst += PAGE
            elif err == errno.EAGAIN:        # an event is pending: read it first
                self._defer(p, dst, b, src + (dst - a), buf, off + (dst - a), kind)
                break
            elif err == errno.ESRCH:
                self._drop(p, "gone")
                return
            elif err in (errno.ENOENT, errno.EFAULT, errno.EINVAL):
                self.stats.pages_dropped += (b - dst) // PAGE   # unregistered meanwhile
                self._wake(p, dst, b - dst)
                dst = b
            else:
                self.fail(errors.KernelError("ioctl(UFFDIO_COPY)", err, p.pid or None,
                                             f"pages {dst:#x}-{b:#x}"))
                return
        self._woken(p, a, dst)

    def _defer(self, p: Proc, a: int, b: int, src: int, buf, off: int, kind: str) -> None:
        """EAGAIN: keep [a, b) in flight (an event may move or drop it) and
        copy it once the pending events are read (by the fault thread)."""
        p.inflight.add(a, b, src)
        # our own copy: the buffer may be reused (prefetch windows) meanwhile
        with memoryview(buf) as v:
            data = bytes(v[off:off + (b - a)])

        def retry() -> None:
            if p.alive:
                self._place(p, [(src, data, 0, b - a)], kind)
        self._later_call(retry)

    def _woken(self, p: Proc, a: int, b: int) -> None:
        if not p.waiters:
            return
        now = time.perf_counter()
        for addr in [x for x in p.waiters if a <= x < b]:
            for t0 in p.waiters.pop(addr):
                self.stats.block((now - t0) * 1e6)

    # -- prefetch (on the loop) ------------------------------------------------------
    async def _prefetch_loop(self) -> None:
        try:
            await self._prefetch()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- see _on_uffd
            log.exception("lazy-pages: prefetch failed")
            self.fail(e)

    async def _prefetch(self) -> None:
        batch = (REMOTE_BATCH if self.source.remote else LOCAL_BATCH) * PAGE
        while True:
            await self.reachable.wait()
            if self.source.remote:
                while len(self.tasks) >= REMOTE_DEPTH:
                    await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)
                if not self.reachable.is_set():
                    continue             # lost meanwhile: wait for the new lanes
            with self.mu:
                p = next((q for q in self.procs if q.alive and q.missing and
                          not q.map_pending), None)
                if p is None:
                    self.work.clear()
                else:
                    s, e, src = p.missing.next_from(p.cursor, batch)
                    for a, b, sa in p.missing.pop(s, e):
                        p.inflight.add(a, b, sa)
                    p.cursor = e
                    self._fetch(p, src, src + (e - s), "prefetch")
            if p is None:
                await self.work.wait()
                continue
            if not self.source.remote:
                self._check_finished()
            await asyncio.sleep(0)        # let the fault thread in between two batches


_HANDLERS = {U.UFFD_EVENT_PAGEFAULT: "on_pagefault", U.UFFD_EVENT_FORK: "on_fork",
             U.UFFD_EVENT_REMAP: "on_remap", U.UFFD_EVENT_REMOVE: "on_remove",
             U.UFFD_EVENT_UNMAP: "on_unmap"}


def listen_unix(path: str) -> socket.socket:
    """The daemon's unix socket, listening (a stale one replaced; only its
    owner may connect)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.bind(path)
        os.chmod(path, 0o600)
        s.listen(16)
    except OSError as e:
        s.close()
        raise errors.MigrateError(f"lazy-pages: cannot listen on {path}: "
                                  f"{e.strerror or e}") from None
    return s


class NoImage(Exception):
    """A daemon started before its image (``images_later``) got none."""


# -- for the agent that started a daemon (it watches it) ------------------------------
def start_time(pid: int) -> int | None:
    """``pid``'s start time (to tell it from a later process of that pid)."""
    try:
        return kproc.read_stat(pid).start_time
    except errors.MigrateError:
        return None


def running(pid: int | None) -> bool:
    """``pid`` runs (a zombie does not: a daemon forked by a worker is reaped
    by the host's init, which may take its time)."""
    if not pid:
        return False
    try:
        return kproc.read_stat(pid).state != "Z"
    except errors.MigrateError:
        return False


def kill_served(pid: int, start: int) -> list[int]:
    """A daemon died without its figures: the pages it had not copied read
    as zeros from now on.  Kill the tree it served (``pid``, if it is still
    the process that started at ``start``), as the daemon itself would
    have: the pids killed."""
    return kproc.kill_tree(pid, start)


def run(images_dir: str | None, sock_path: str, *, remote: tuple | None = None,
        prefetch: bool = True, status_fd: int | None = None,
        stats_out=None, verify: bool = True, early: bool = False,
        listener: socket.socket | None = None, images_later=None,
        recover: float = RECOVER_S) -> int:
    """`migrate lazy-pages`: pages from ``images_dir`` or, with ``remote``
    = (address, port, session, ssl context), from the source's page-server.
    ``verify``: check the local image's checksums whole before serving
    (False for images our page-server wrote: it checked every range's
    checksum as it wrote it).  ``early``: ready once listening, the image
    read meanwhile (the restore loads its own image in parallel).
    ``listener``: a socket already listening on ``sock_path``.
    ``images_later``: with ``remote`` and no ``images_dir``, a blocking call
    that returns the image directory once there is one (or raises NoImage):
    the connections to the source are made meanwhile (a migration's
    destination, before the stop)."""
    from migrate.lazypages import source as S
    prepare = None
    if remote is None:
        src = S.LocalSource(images_dir)

        def prepare() -> None:
            t0 = time.perf_counter()
            src.verify(whole=verify)
            log.info("lazy-pages: image %s %s in %.0f ms", images_dir,
                     "checked" if verify else "indexed", (time.perf_counter() - t0) * 1e3)
        if not early:
            prepare()
            prepare = None
    elif images_later is not None:
        src = S.RemoteSource(*remote)

        def prepare() -> None:
            d = images_later()
            if os.path.exists(os.path.join(d, "inventory.img")):
                src.local = S.LocalSource(d)
                src.local.verify(whole=verify)
    else:
        local = None
        if os.path.exists(os.path.join(images_dir, "inventory.img")):
            local = S.LocalSource(images_dir)      # pre-copy pages, the eager ones

            def prepare() -> None:
                local.verify(whole=verify)
            if not early:
                prepare()
                prepare = None
        src = S.RemoteSource(*remote, local=local)

    def ready() -> None:
        if status_fd is not None:
            os.write(status_fd, b"\0")       # criu(8) --status-fd
            os.close(status_fd)

    lp = LazyPages(src, sock_path, prefetch=prefetch, prepare=prepare, listener=listener,
                   recover=recover)
    rc = asyncio.run(lp.run(ready))
    if stats_out is not None:
        stats_out(lp.stats.as_dict())
    if rc:
        raise errors.MigrateError(lp.error)     # logged, and on stderr with -o
    return rc
