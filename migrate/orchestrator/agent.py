"""`migrate agent --config FILE`: the per-host agent (DESIGN.md §5).

One asyncio loop (uvloop) holds: the HTTPS API (aiohttp, mutual TLS), this
host's page-server (every session under WORK/images/<migration>/...), a
warm job runner (worker.py) for dumps and restores, and the migrations this
host takes part in, as source (it coordinates them: they go on if the CLI
that started them goes away) or destination.

API (JSON; errors are {"error": message} with a 4xx/5xx status):
    GET  /api/v1/health
    GET  /api/v1/migrations                 list
    POST /api/v1/migrations                 start one (this host is the source)
    GET  /api/v1/migrations/{id}
    POST /api/v1/migrations/{id}/cancel
    POST /api/v1/incoming                   (agent to agent) prepare as destination
    POST /api/v1/incoming/{id}/restore      restore the committed image
    POST /api/v1/incoming/{id}/address      add/del the moved service address
    POST /api/v1/incoming/{id}/abort        roll back: nothing of it left here
    POST /api/v1/incoming/{id}/finish       the migration is done: images go
    GET  /api/v1/events, /api/v1/openapi.json, /metrics, /   (api.py)

api.py also serves the GET ones on a read-only listener (status_port).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time

import aiohttp
from aiohttp import web

from migrate import __version__, errors
from migrate.lazypages import daemon as lazyd
from migrate.orchestrator import api
from migrate.orchestrator import inventory as inv
from migrate.orchestrator import migration as mig
from migrate.orchestrator.workers import Pool

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
SHUTDOWN_TIMEOUT_S = 30.0
STOP_COST_DEFAULT = 0.25          # s: the stop phase's fixed cost before one is measured
# an incoming migration whose source is silent this long is aborted
INCOMING_IDLE_S = float(os.environ.get("MIGRATE_INCOMING_IDLE_S", "30"))
INCOMING_CHECK_S = 2.0


FAULT_FILE = "fault"


def fault(agent: "Agent", point: str) -> None:
    """Fault injection for the failure tests (like CRIU_FAULT): a file
    WORK/fault naming ``point`` makes this agent die there, at once, as if
    killed (SIGKILL).  It is removed first, so the agent that restarts goes
    on."""
    path = os.path.join(agent.work_dir, FAULT_FILE)
    try:
        with open(path) as f:
            want = f.read().strip()
    except OSError:
        return
    if want == point:
        os.unlink(path)
        log.error("agent %s: fault injected at %s: dying", agent.name, point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid) -> bool:
    return lazyd.running(pid)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class PeerClient:
    """Another agent's API, with our certificate."""

    def __init__(self, session: aiohttp.ClientSession, host: inv.Host, ssl_ctx) -> None:
        self.session = session
        self.host = host
        self.ssl = ssl_ctx if host.agent.startswith("https:") else None

    async def post(self, path: str, body: dict, phase: str, timeout: float = 60) -> dict:
        return await self.request("POST", path, body, phase, timeout)

    async def get(self, path: str, phase: str, timeout: float = 30) -> dict:
        return await self.request("GET", path, None, phase, timeout)

    async def request(self, method: str, path: str, body, phase: str,
                      timeout: float) -> dict:
        url = self.host.agent + path
        try:
            async with self.session.request(
                    method, url, json=body, ssl=self.ssl,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                try:
                    data = await r.json(content_type=None)
                except (ValueError, aiohttp.ContentTypeError):
                    data = {"error": (await r.text())[:200]}
                if r.status >= 400:
                    raise mig.MigrationFailed(phase, f"agent {self.host.name}: {method} "
                                              f"{path}: {r.status}: {data.get('error')}")
                return data
        except asyncio.TimeoutError:
            raise mig.MigrationFailed(phase, f"agent {self.host.name} ({url}): no answer "
                                      f"in {timeout:.0f} s") from None
        except aiohttp.ClientError as e:
            raise mig.MigrationFailed(phase, f"agent {self.host.name} ({url}): {e}") from None


class Agent:
    def __init__(self, cfg: inv.AgentConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.work_dir = cfg.work_dir
        self.tls = cfg.tls
        self.interface = cfg.interface
        self.pool = Pool()
        self.migrations: dict[str, mig.Migration] = {}
        self.incoming: dict[str, dict] = {}
        self._restored_start: dict[str, int] = {}   # migration id -> its tree's start time
        self.stop_cost = STOP_COST_DEFAULT
        self.pageserver = None
        self.client: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self._inventory: inv.Inventory | None = None
        self._tasks: set[asyncio.Task] = set()
        # every migration's events, for the event streams (api.py)
        self.listeners: set[asyncio.Queue] = set()
        self.status_runner: web.AppRunner | None = None

    # -- peers -------------------------------------------------------------
    def inventory(self) -> inv.Inventory:
        if self._inventory is None:
            if not self.cfg.inventory:
                raise inv.ConfigError(f"{self.cfg.path}: no inventory: the agent cannot "
                                      "find other hosts")
            self._inventory = inv.load_inventory(self.cfg.inventory)
        return self._inventory

    def dst_host(self, name: str) -> inv.Host:
        return self.inventory().host(name)

    def peer(self, host: inv.Host) -> PeerClient:
        ctx = self.tls.client_context() if self.tls else None
        assert self.client is not None
        return PeerClient(self.client, host, ctx)

    def fault(self, point: str) -> None:
        fault(self, point)

    def register(self, m: mig.Migration) -> None:
        """A migration this agent takes part in: its events go to every
        event stream (api.py)."""
        m.listeners = self.listeners
        self.migrations[m.id] = m
        m.event("created", role=m.role, pid=m.pid, src=m.src, dst=m.dst)

    def _background(self, coro) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def observe_stop_cost(self, seconds: float) -> None:
        """The stop phase's fixed cost, learnt from each migration."""
        if seconds > 0:
            self.stop_cost = 0.5 * self.stop_cost + 0.5 * seconds

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        from migrate.pageserver.server import PageServer
        os.makedirs(self.work_dir, exist_ok=True)
        ssl_server = self.tls.server_context() if self.tls else None
        if ssl_server is None:
            log.warning("agent %s: no [tls] in %s: the API and page-server are plaintext "
                        "and unauthenticated", self.name, self.cfg.path)
        self.pageserver = PageServer(os.path.join(self.work_dir, "images"), self.cfg.address,
                                     self.cfg.page_server_port,
                                     ssl_context=self.tls.server_context() if self.tls
                                     else None, serve=True, allow_nosync=True)
        self._clean_stale()
        from migrate.orchestrator import address  # noqa: F401
        await self.pageserver.start()
        self.client = aiohttp.ClientSession()
        self._background(self._watchdog())
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors_as_json])
        app["agent"] = self
        app.add_routes(ROUTES)
        api.add_routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.address, self.cfg.port,
                           ssl_context=ssl_server, reuse_address=True)
        await site.start()
        self.pool._spawn()
        await api.start_status(self)
        log.info("agent %s: API on %s://%s:%d, page-server on %d, work dir %s", self.name,
                 "https" if ssl_server else "http", self.cfg.address, self.cfg.port,
                 self.pageserver.port, self.work_dir)

    def _clean_stale(self) -> None:
        """Images of incoming migrations an earlier run of this agent left
        (it was killed): no source will finish them.  A lazy-pages daemon
        still filling from one has its files open already."""
        root = os.path.join(self.work_dir, "images")
        for name in os.listdir(root) if os.path.isdir(root) else []:
            log.warning("agent %s: removing the images of migration %s, left by an earlier "
                        "run", self.name, name)
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

    async def _watchdog(self) -> None:
        """An incoming migration whose source went silent (its agent died,
        the link broke) is aborted here: nothing of it stays."""
        while not self.stopping.is_set():
            await asyncio.sleep(INCOMING_CHECK_S)
            now = time.monotonic()
            for mid, st in list(self.incoming.items()):
                if st["state"] in ("prepared", "built") and \
                        now - st["seen"] > INCOMING_IDLE_S:
                    m = self.migrations[mid]
                    log.warning("migration %s: nothing from %s for %.0f s: aborting it here",
                                mid, m.src, now - st["seen"])
                    try:
                        await self.abort_incoming(m, st, {"reason": f"the source {m.src} "
                                                          "went silent"})
                    except (errors.MigrateError, OSError) as e:
                        log.error("migration %s: abort: %s", mid, e)

    async def shutdown(self) -> None:
        """Stop accepting, let running migrations end (bounded), then close."""
        log.info("agent %s: stopping", self.name)
        if self.runner is not None:
            await self.runner.shutdown()
        await api.stop_status(self)
        active = [m.task for m in self.migrations.values() if m.task and not m.task.done()]
        if active:
            _, pending = await asyncio.wait(active, timeout=SHUTDOWN_TIMEOUT_S)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=30)
        if self.runner is not None:
            await self.runner.cleanup()
        if self.pageserver is not None:
            await self.pageserver.shutdown()
        if self.client is not None:
            await self.client.close()
        await self.pool.close()

    async def run(self, ready=None) -> int:
        loop = asyncio.get_running_loop()
        await self.start()
        # What start-up made lives as long as the agent: out of the cyclic
        # GC's sight (its full collections would walk it during a stop).
        import gc
        gc.collect()
        gc.freeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if ready is not None:
            ready()
        await self.stopping.wait()
        await self.shutdown()
        return 0

    # -- source side ---------------------------------------------------------
    def start_migration(self, body: dict) -> mig.Migration:
        pid = body.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
            raise web.HTTPBadRequest(reason="pid must be an integer > 1")
        dst = body.get("dst")
        if not isinstance(dst, str) or not dst:
            raise web.HTTPBadRequest(reason="dst must be a host name")
        if dst == self.name:
            raise web.HTTPBadRequest(reason=f"dst {dst} is this host")
        try:
            opts = mig.Options.from_json(body.get("options") or {})
        except (TypeError, ValueError) as e:
            raise web.HTTPBadRequest(reason=f"options: {e}") from None
        try:
            self.dst_host(dst)
        except inv.ConfigError as e:
            raise web.HTTPBadRequest(reason=str(e)) from None
        for m in self.migrations.values():
            if m.role == "source" and m.pid == pid and not m.done:
                raise web.HTTPConflict(reason=f"pid {pid} is already being migrated "
                                              f"({m.id})")
        if not os.path.exists(f"/proc/{pid}"):
            raise web.HTTPNotFound(reason=f"no process {pid} on {self.name}")
        m = mig.Migration("source", pid, self.name, dst, opts)
        self.register(m)
        m.task = asyncio.ensure_future(mig.Coordinator(self, m).run())
        return m

    async def wait_filled(self, pid: int, timeout: float = 60) -> None:
        """``pid`` was restored here by post-copy: until every page is in and
        the lazy-pages daemon is gone (its userfaultfd registration with
        it), a dump would take the pages not yet copied for zeros.  Wait
        for that (MigrationFailed after ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            m = next((x for x in self.migrations.values() if x.role == "destination"
                      and x.restored_pid == pid and x.fill is not None
                      and (not x.fill.get("done") or _alive(x.fill.get("daemon")))), None)
            if m is None:
                return
            if time.monotonic() > end:
                raise mig.MigrationFailed("prepare", f"pid {pid}: its memory is still arriving "
                                          f"from {m.src} (post-copy of migration {m.id})")
            await asyncio.sleep(0.05)

    # -- destination side ----------------------------------------------------
    def images_dir(self, mid: str) -> str:
        return os.path.join(self.work_dir, "images", mid)

    async def prepare_incoming(self, body: dict) -> dict:
        from migrate.dest import check
        mid = body.get("id")
        if not isinstance(mid, str) or not mid.isalnum() or len(mid) > 64:
            raise web.HTTPBadRequest(reason="id must be alphanumeric (at most 64)")
        if mid in self.incoming:
            raise web.HTTPConflict(reason=f"migration {mid} is already known here")
        req = body.get("requirements")
        if not isinstance(req, dict):
            raise web.HTTPBadRequest(reason="requirements must be an object")
        loop = asyncio.get_running_loop()
        problems = await loop.run_in_executor(None, check.problems, req,
                                              os.path.join(self.work_dir, "images"))
        reserved = {p for i in self.incoming.values() if i["state"] == "prepared"
                    for p in i["pids"]}
        clash = sorted(set(req.get("pids", [])) & reserved)
        if clash:
            problems.append(f"pids {clash} are reserved by another incoming migration")
        try:
            opts = mig.Options.from_json(body.get("options") or {})
        except (TypeError, ValueError) as e:
            raise web.HTTPBadRequest(reason=f"options: {e}") from None
        m = mig.Migration("destination", int(body.get("pid", 0)), str(body.get("src")),
                          self.name, opts, mid=mid)
        m.bytes_total = int(req.get("rss", 0))
        self.register(m)
        m.set_phase("prepare")
        self.incoming[mid] = {"state": "prepared" if not problems else "refused",
                              "pids": list(req.get("pids", [])), "address": None,
                              "restored": None, "worker": None, "lock": asyncio.Lock(),
                              "seen": time.monotonic()}
        if problems:
            m.finish(mig.FAILED, mig.MigrationFailed("prepare", "; ".join(problems)))
        else:
            m.set_phase("pre-copy")
            # This migration's restore runs in a worker that reads each
            # pre-copy round as it arrives (only the last dump is new then).
            self.incoming[mid]["worker"] = asyncio.ensure_future(self.pool.take())
            if self._maybe_lazy(m, m.options.post_copy != "off"):
                self._background(self._standby(m, self.incoming[mid]))
        return {"problems": problems}

    @staticmethod
    def _maybe_lazy(m: mig.Migration, post_copy: bool = False) -> bool:
        fill = m.options.restore_fill
        return post_copy or fill == "lazy" or (fill == "auto" and
                                               m.bytes_total >= mig.LAZY_FILL_MIN)

    def _lazy_paths(self, m: mig.Migration) -> dict:
        logs = os.path.join(self.work_dir, "logs", m.id)
        return {"socket": os.path.join(logs, "lazy-pages.socket"),
                "stats": os.path.join(logs, "fill.json"),
                "log": os.path.join(logs, "lazy-pages.log")}

    def _tls_paths(self) -> dict | None:
        t = self.tls
        return None if t is None else {"cacert": t.cacert, "cert": t.cert, "key": t.key,
                                       "cacrl": t.cacrl}

    async def _standby(self, m: mig.Migration, st: dict) -> None:
        """The restore's lazy-pages daemon forked now, listening, so that at
        the stop the restore need not wait for it (worker.py _Standby)."""
        async with st["lock"]:
            w = await self._worker_of(st)
            if w is None:
                return
            try:
                r = await w.call({"op": "standby", **self._lazy_paths(m),
                                  "tls": self._tls_paths(),
                                  "lock_pid": m.pid if m.options.tcp_established else None,
                                  "network_lock": m.options.network_lock})
            except errors.MigrateError as e:
                log.warning("migration %s: standby lazy-pages daemon: %s", m.id, e)
                self._drop_worker(st)
                return
            if not r.get("ok"):
                log.warning("migration %s: standby lazy-pages daemon: %s", m.id,
                            r.get("error"))

    async def _worker_of(self, st: dict):
        t = st.get("worker")
        if t is None:
            return None
        try:
            return await t
        except (errors.MigrateError, OSError) as e:
            log.warning("worker for an incoming migration: %s", e)
            st["worker"] = None
            return None

    def _drop_worker(self, st: dict) -> None:
        t, st["worker"] = st.get("worker"), None
        if t is not None:
            async def close():
                try:
                    w = await t
                except (errors.MigrateError, OSError):
                    return
                await w.close()
            self._background(close())

    async def source_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        """Post-copy, as the stop begins: where the source serves the pages
        it will keep; the standby lazy-pages daemon connects now, not in
        the downtime (a hint: the restore request says it again)."""
        if not (isinstance(body.get("address"), str) and isinstance(body.get("port"), int)
                and isinstance(body.get("session"), str)):
            raise web.HTTPBadRequest(reason="source: address, port and session")
        if st["state"] != "prepared":
            raise web.HTTPConflict(reason=f"migration {m.id} is {st['state']}")
        w = await self._worker_of(st)
        if w is None:
            return {"ok": False, "error": "no worker"}
        remote = {"address": body["address"], "port": body["port"],
                  "session": body["session"], "tls": self._tls_paths()}
        async with st["lock"]:
            if st["state"] != "prepared":
                raise web.HTTPConflict(reason=f"migration {m.id} is {st['state']}")
            try:
                return await w.call({"op": "standby-source", "remote": remote})
            except errors.MigrateError as e:
                return {"ok": False, "error": str(e)}

    async def alive_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        """The source's heartbeat (``_incoming`` noted the time)."""
        return {"ok": True, "state": st["state"]}

    async def round_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        """A pre-copy round committed here: its worker reads it meanwhile."""
        fault(self, "dst-round")
        images = self._session_dir(m, body.get("session"))
        if st["state"] != "prepared":
            raise web.HTTPConflict(reason=f"migration {m.id} is {st['state']}")

        async def preload() -> None:
            async with st["lock"]:
                w = await self._worker_of(st)
                if w is None:
                    return
                try:
                    r = await w.call({"op": "preload", "images_dir": images})
                except errors.MigrateError as e:
                    log.warning("migration %s: preload of %s: %s", m.id, images, e)
                    self._drop_worker(st)
                    return
                if not r.get("ok"):
                    log.warning("migration %s: preload of %s: %s", m.id, images,
                                r.get("error"))
        self._background(preload())
        return {"ok": True}

    def _incoming(self, request) -> tuple[mig.Migration, dict]:
        mid = request.match_info["id"]
        if mid not in self.incoming:
            raise web.HTTPNotFound(reason=f"no incoming migration {mid}")
        self.incoming[mid]["seen"] = time.monotonic()
        return self.migrations[mid], self.incoming[mid]

    async def restore_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        images = self._session_dir(m, body.get("session"))
        log.debug("migration %s: restore asked", m.id)
        if st["state"] != "prepared":
            raise web.HTTPConflict(reason=f"migration {m.id} is {st['state']}")
        m.set_phase("restore")
        st["state"] = "restoring"
        logs = os.path.join(self.work_dir, "logs", m.id)
        post = body.get("post_copy")
        if post is not None and not (isinstance(post, dict) and
                                     isinstance(post.get("address"), str) and
                                     isinstance(post.get("port"), int) and
                                     isinstance(post.get("session"), str)):
            raise web.HTTPBadRequest(reason="post_copy: address, port and session")
        lazy = self._maybe_lazy(m, post is not None)
        job = {"op": "restore", "images_dir": images, "network_lock": m.options.network_lock,
               "log": os.path.join(logs, "restore.log"), "lazy_pages": lazy,
               "level": logging.DEBUG}
        if lazy:
            job["lazy"] = self._lazy_paths(m)
            if post is not None:
                # post-copy: what the image left lazy comes from the source
                job["lazy"]["remote"] = {**post, "tls": self._tls_paths()}
        ip = body.get("address")
        if ip is not None:
            if not isinstance(ip, str) or not self.interface:
                raise web.HTTPBadRequest(reason="address: an IP, and an interface in the "
                                                "agent's config")
            # Added by the restore once the connections are locked here.
            job["address"] = {"ip": ip, "interface": self.interface}
            st["address"] = ip
        fault(self, "dst-restore")
        job["two_phase"] = True
        job["resumed"] = os.path.join(logs, "resumed")
        t0 = time.monotonic()
        async with st["lock"]:
            w = await self._worker_of(st)
            st["worker"] = None
            if w is None:
                w = await self.pool.take()
            try:
                log.debug("migration %s: restore job to worker %d", m.id, w.pid)
                first = await w.call(job)
                log.debug("migration %s: restore job answered: %s", m.id, first.get("event"))
            except BaseException:
                self._background(w.close())
                raise
        if first.get("event") != "built":
            # It failed: nothing of it runs (the worker exits by itself).
            self._background(w.close())
            st["state"] = "prepared"        # the source rolls back (abort)
            first["seconds"] = time.monotonic() - t0
            return first
        # Built, held before its release: the source says resume or abort.
        st["state"] = "built"
        st["held"] = w
        st["job"] = job
        st["restored"] = first.get("pid")
        fault(self, "dst-built")
        return {"ok": True, "built": True, "pid": first.get("pid"),
                "seconds": time.monotonic() - t0}

    async def resume_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        """The source agrees: the restored tree runs from here on."""
        if st["state"] != "built" or st.get("held") is None:
            raise web.HTTPConflict(reason=f"migration {m.id} is {st['state']}, not built")
        w, st["held"] = st["held"], None
        job = st["job"]
        t0 = time.monotonic()
        log.debug("migration %s: resume asked", m.id)
        try:
            await w.send({"op": "release"})
            res = await w.recv(60)
            log.debug("migration %s: released", m.id)
        finally:
            self._background(w.close())   # it exits by itself after a restore
        res["seconds"] = time.monotonic() - t0
        if not res.get("ok"):
            st["state"] = "prepared"
            return res
        fault(self, "dst-resumed")
        st["state"] = "running"
        st["restored"] = res.get("pid")
        m.restored_pid = res.get("pid")
        m.set_phase("resume")
        # The images go once nothing reads them, whether or not the source
        # says finish (its agent may be gone by now).
        st["delete_after_fill"] = not m.options.keep_images
        if job.get("lazy_pages"):
            m.fill = {"mode": "post-copy" if job["lazy"].get("remote") else "lazy",
                      "daemon": res.get("lazy_daemon"), "done": False}
            if m.restored_pid:    # (to tell its tree from a later process of that pid)
                self._restored_start[m.id] = lazyd.start_time(m.restored_pid)
            asyncio.ensure_future(self._watch_fill(m, job["lazy"]["stats"]))
        else:
            m.fill = {"mode": "eager", "done": True}
            if st["delete_after_fill"]:
                self._background(asyncio.get_running_loop().run_in_executor(
                    None, shutil.rmtree, self.images_dir(m.id), True))
        m.finish(mig.COMPLETED)
        return res

    async def address_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        from migrate.orchestrator import address
        ip, action = body.get("ip"), body.get("action")
        if action not in ("add", "del") or not isinstance(ip, str):
            raise web.HTTPBadRequest(reason="action must be add or del, ip an address")
        if action == "add" and not self.interface:
            raise web.HTTPConflict(reason=f"{self.cfg.path}: no interface for moved "
                                          "addresses")
        loop = asyncio.get_running_loop()
        try:
            if action == "add":
                lock = body.get("lock_session")
                if lock is not None:
                    # The connections' packets are dropped here before the
                    # address arrives: until the restore, this host would
                    # answer them with resets.
                    images = self._session_dir(m, lock)
                    await loop.run_in_executor(None, self._lock, images, m.options)
                    st["locked"] = images
                await loop.run_in_executor(None, address.add_now, ip, self.interface)
                st["address"] = ip
            else:
                await loop.run_in_executor(None, address.remove, ip)
                st["address"] = None
        except (ValueError, errors.MigrateError) as e:
            raise web.HTTPBadRequest(reason=str(e)) from None
        return {"ok": True}

    async def _watch_fill(self, m: mig.Migration, path: str, limit: float = 3600) -> None:
        """The background fill's figures once the daemon is done."""
        end = time.monotonic() + limit
        try:
            while time.monotonic() < end and not self.stopping.is_set():
                try:
                    with open(path) as f:
                        m.fill.update(json.load(f), done=True)
                except (FileNotFoundError, ValueError):
                    if not _alive(m.fill.get("daemon")):
                        # It died (killed, crashed): the pages it had not
                        # copied now read as zeros.  The process must not
                        # run on with them (the daemon's own rule).
                        killed = []
                        start = self._restored_start.get(m.id)
                        if m.restored_pid and start is not None:
                            killed = lazyd.kill_served(m.restored_pid, start)
                        m.fill.update(done=True, error="the lazy-pages daemon ended without "
                                      "its figures (see lazy-pages.log)" +
                                      (f"; killed pid {', '.join(map(str, killed))} so that it "
                                       "does not run on with missing memory" if killed else ""))
                        log.error("migration %s: %s", m.id, m.fill["error"])
                        return
                    await asyncio.sleep(0.2)
                    continue
                m.event("filled", **m.fill)
                log.info("migration %s: memory filled: %s", m.id, m.fill)
                return
        finally:
            st = self.incoming.get(m.id, {})
            if st.get("delete_after_fill"):
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, shutil.rmtree, self.images_dir(m.id), True)

    def _session_dir(self, m: mig.Migration, session) -> str:
        if not isinstance(session, str) or not session.startswith(m.id + "/") or \
                ".." in session:
            raise web.HTTPBadRequest(reason="session must name an image of this migration")
        return os.path.join(self.work_dir, "images", session)

    @staticmethod
    def _lock(images: str, options: mig.Options) -> None:
        from migrate.dest import restore
        restore.lock_network(images, options.network_lock)

    @staticmethod
    def _unlock(images: str, options: mig.Options) -> None:
        from migrate.dest import restore
        restore.unlock_network(images, options.network_lock)

    async def abort_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        """Nothing of this migration left here: a restored tree killed (it
        must not run twice), the moved address given back, the images gone."""
        from migrate.orchestrator import address
        loop = asyncio.get_running_loop()
        held, st["held"] = st.get("held"), None
        if held is not None:
            # Built and never released: the restore kills what it made.
            try:
                await held.send({"op": "abort", "reason": str(body.get("reason") or
                                                              "aborted by the source")})
                await held.recv(60)
            except errors.MigrateError as e:
                log.warning("migration %s: abort of the held restore: %s", m.id, e)
            finally:
                await held.close()
        elif st["state"] in ("running", "restoring") and st["restored"]:
            for pid in st["pids"]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if st["address"]:
            try:
                await loop.run_in_executor(None, address.remove, st["address"])
            except errors.MigrateError as e:
                log.error("migration %s: %s", m.id, e)
        if st.get("locked") and st["state"] != "running":
            try:
                await loop.run_in_executor(None, self._unlock, st["locked"], m.options)
            except errors.MigrateError as e:
                log.error("migration %s: network unlock: %s", m.id, e)
        self._drop_worker(st)
        await loop.run_in_executor(None, shutil.rmtree, self.images_dir(m.id), True)
        st["state"] = "aborted"
        if not m.done:
            m.finish(mig.FAILED, mig.MigrationFailed(
                m.phase, str(body.get("reason") or "aborted by the source")))
        return {"ok": True}

    async def finish_incoming(self, m: mig.Migration, st: dict, body: dict) -> dict:
        self._drop_worker(st)
        if m.fill is not None and not m.fill.get("done"):
            # The lazy-pages daemon still reads them: they go once it is done.
            st["delete_after_fill"] = not body.get("keep_images")
        elif not body.get("keep_images"):
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, shutil.rmtree, self.images_dir(m.id), True)
        st["state"] = "completed"
        if not m.done:
            m.finish(mig.COMPLETED)
        return {"ok": True}


# --------------------------------------------------------------------------
# HTTP

@web.middleware
async def _errors_as_json(request, handler):
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except (errors.MigrateError, OSError) as e:
        log.exception("agent: %s %s", request.method, request.path)
        return _error(500, str(e))


async def _body(request) -> dict:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise web.HTTPBadRequest(reason="the body is not JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(reason="the body must be a JSON object")
    return data


ROUTES = web.RouteTableDef()


@ROUTES.get("/api/v1/health")
async def health(request):
    a: Agent = request.app["agent"]
    return web.json_response({"host": a.name, "version": __version__, "pid": os.getpid(),
                              "page_server_port": a.pageserver.port})


@ROUTES.get("/api/v1/migrations")
async def list_migrations(request):
    a: Agent = request.app["agent"]
    return web.json_response({"migrations": [m.as_dict() for m in a.migrations.values()]})


@ROUTES.post("/api/v1/migrations")
async def start_migration(request):
    a: Agent = request.app["agent"]
    m = a.start_migration(await _body(request))
    return web.json_response(m.as_dict(), status=202)


def _migration(request) -> mig.Migration:
    a: Agent = request.app["agent"]
    mid = request.match_info["id"]
    m = a.migrations.get(mid)
    if m is None:
        raise web.HTTPNotFound(reason=f"no migration {mid} on {a.name}")
    return m


@ROUTES.get("/api/v1/migrations/{id}")
async def get_migration(request):
    a: Agent = request.app["agent"]
    mid = request.match_info["id"]
    if mid not in a.migrations and mid.isalnum():
        # Restarted since: a restore it released left its mark.
        try:
            with open(os.path.join(a.work_dir, "logs", mid, "resumed")) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            pid = None
        if pid is not None:
            return web.json_response({"id": mid, "role": "destination", "status": "completed",
                                      "phase": "resume", "restored_pid": pid,
                                      "error": None, "note": "from before this agent "
                                      "restarted"})
    return web.json_response(_migration(request).as_dict())


@ROUTES.post("/api/v1/migrations/{id}/cancel")
async def cancel_migration(request):
    a: Agent = request.app["agent"]
    m = _migration(request)
    if m.role != "source":
        raise web.HTTPConflict(reason=f"migration {m.id} is coordinated by {m.src}: "
                                      "cancel it there")
    if m.done:
        raise web.HTTPConflict(reason=f"migration {m.id} is already {m.status}")
    if m.phase in ("resume", "post-copy", "cleanup"):
        raise web.HTTPConflict(reason=f"migration {m.id}: the process already runs on "
                                      f"{m.dst}")
    m.cancel_requested = True
    m.event("cancel-requested")
    return web.json_response(m.as_dict(), status=202)



@ROUTES.post("/api/v1/incoming")
async def incoming(request):
    a: Agent = request.app["agent"]
    return web.json_response(await a.prepare_incoming(await _body(request)))


@ROUTES.post("/api/v1/incoming/{id}/{action}")
async def incoming_action(request):
    a: Agent = request.app["agent"]
    action = request.match_info["action"]
    fn = {"restore": a.restore_incoming, "address": a.address_incoming,
          "round": a.round_incoming, "resume": a.resume_incoming,
          "alive": a.alive_incoming, "source": a.source_incoming,
          "abort": a.abort_incoming, "finish": a.finish_incoming}.get(action)
    if fn is None:
        raise web.HTTPNotFound(reason=f"no action {action!r}")
    m, st = a._incoming(request)
    return web.json_response(await fn(m, st, await _body(request)))


def run(config_path: str) -> int:
    cfg = inv.load_agent_config(config_path)
    if cfg.tls is None:
        # uvloop's start_tls stalls a handshake whose ClientHello came while
        # the transport was paused (the page-server's own TLS accept): with
        # TLS, the asyncio loop (see pageserver/server.py run()).
        from migrate.pageserver.server import install_uvloop
        install_uvloop()
    agent = Agent(cfg)
    try:
        return asyncio.run(agent.run())
    except OSError as e:
        raise errors.MigrateError(f"agent {cfg.name}: {e}") from None


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
