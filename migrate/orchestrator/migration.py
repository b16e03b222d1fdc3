"""One live migration, coordinated by the source host's agent (DESIGN.md §5).

Phases: prepare (both hosts checked) → pre-copy rounds (dirty pages to the
destination's page-server while the process runs, until the convergence
policy says stop) → stop (freeze, network lock, last dirty pages and all
other state, committed at the destination while the tree stays frozen here)
→ restore on the destination → resume (the tree here is killed, the lock
here lifted) → cleanup.

Rollback rule: until the destination runs the process, any failure (an
agent, the link, the page-server, the disk, the restore) leaves the process
running here with its memory intact and the network unlocked, and nothing
left on the destination.  The frozen tree is only killed once the
destination says it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
import uuid

from migrate import errors

log = logging.getLogger(__name__)

PAGE = 4096
LAZY_FILL_MIN = 32 << 20
RESTORE_TIMEOUT_S = 120.0       # the destination's restore answers within this
HEARTBEAT_S = 5.0               # the destination aborts after 30 s without one        # restore_fill auto: lazy for images at least this big
ACTIVE, COMPLETED, FAILED, CANCELLED = "active", "completed", "failed", "cancelled"
PHASES = ("setup", "prepare", "pre-copy", "stop", "restore", "resume", "post-copy",
          "cleanup")


class MigrationFailed(errors.MigrateError):
    def __init__(self, phase: str, message: str) -> None:
        super().__init__(f"{phase}: {message}")
        self.phase = phase
        self.message = message


class Cancelled(MigrationFailed):
    pass




@dataclasses.dataclass
class Options:
    downtime_limit: float = 0.3          # seconds, like QEMU's downtime-limit
    max_rounds: int = 30
    max_bandwidth: int | None = None     # bytes/s
    auto_converge: bool = False
    post_copy: str = "off"               # off | on | auto
    pre_copy: bool = True
    tcp_established: bool = False
    move_address: str | None = None
    keep_images: bool = False
    network_lock: str | None = None
    streams: int = 2                  # TCP streams to the page-server: TLS on two cores
    compress: bool = False
    # How the destination fills the memory it received: "lazy": the process
    # resumes at once and a local lazy-pages daemon (userfaultfd) fills it
    # from the received image in the background, faults first; "eager":
    # every page is written before it resumes (the downtime grows with the
    # size: ~2 s a GiB here); "auto": lazy from LAZY_FILL_MIN bytes.
    restore_fill: str = "auto"

    @classmethod
    def from_json(cls, d: dict) -> "Options":
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown option{'s' if len(bad) > 1 else ''}: {', '.join(bad)}")
        o = cls(**d)
        if not (isinstance(o.downtime_limit, (int, float)) and 0 < o.downtime_limit <= 3600):
            raise ValueError("downtime_limit must be a number of seconds in (0, 3600]")
        if not (isinstance(o.max_rounds, int) and 0 <= o.max_rounds <= 1000):
            raise ValueError("max_rounds must be an integer in 0..1000")
        if o.max_bandwidth is not None and not (isinstance(o.max_bandwidth, int) and
                                                o.max_bandwidth > 0):
            raise ValueError("max_bandwidth must be a positive number of bytes/s")
        if o.post_copy not in ("off", "on", "auto"):
            raise ValueError("post_copy must be off, on or auto")
        if o.restore_fill not in ("auto", "lazy", "eager"):
            raise ValueError("restore_fill must be auto, lazy or eager")
        if not (isinstance(o.streams, int) and 1 <= o.streams <= 8):
            raise ValueError("streams must be 1..8")
        if o.move_address is not None:
            import ipaddress
            try:
                ipaddress.ip_address(o.move_address)
            except ValueError:
                raise ValueError(f"move_address {o.move_address!r} is not an IP "
                                 "address") from None
        return o


@dataclasses.dataclass
class Round:
    round: int
    pages: int
    bytes: int
    seconds: float
    dirty_pages: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Migration:
    """The record of one migration, as the status API shows it."""

    def __init__(self, role: str, pid: int, src: str, dst: str, options: Options,
                 mid: str | None = None) -> None:
        self.id = mid or uuid.uuid4().hex[:12]
        self.role = role                 # "source" or "destination"
        self.pid = pid
        self.src, self.dst = src, dst
        self.options = options
        self.status = ACTIVE
        self.phase = "setup"
        self.started = time.time()
        self._t0 = time.monotonic()
        self.ended: float | None = None
        self.setup_time: float | None = None
        self.total_time: float | None = None
        self.downtime: float | None = None
        self.expected_downtime: float | None = None
        self.bytes_total = 0
        self.bytes_transferred = 0
        self.bytes_remaining: int | None = None
        self.dirty_rate: float | None = None
        self.throughput: float | None = None
        self.rounds: list[Round] = []
        self.throttle: int | None = None      # the CPU share taken now (auto-converge)
        self.throttle_max: int | None = None  # the most it took
        self.error: dict | None = None
        self.events: list[dict] = []
        self.restored_pid: int | None = None
        self.cancel_requested = False
        self.listeners: set[asyncio.Queue] = set()
        self.task: asyncio.Task | None = None
        self.decision: str | None = None
        self.stop_stats: dict = {}
        self.fill: dict | None = None    # destination: the background fill's figures
        # the timeline: each phase entered, when (epoch s) and for how long
        self.phases: list[dict] = []

    def set_phase(self, phase: str) -> None:
        if phase == "pre-copy" and self.setup_time is None:
            self.setup_time = time.monotonic() - self._t0
        self.phase = phase
        self._close_phase()
        self.phases.append({"phase": phase, "start": time.time(), "duration": None,
                            "_t": time.monotonic()})
        self.event("phase", phase=phase)
        log.info("migration %s: %s", self.id, phase)

    def _close_phase(self) -> None:
        if self.phases and self.phases[-1]["duration"] is None:
            self.phases[-1]["duration"] = time.monotonic() - self.phases[-1]["_t"]

    def event(self, kind: str, **data) -> None:
        ev = {"type": kind, "id": self.id, "time": time.time(), **data}
        self.events.append(ev)
        for q in list(self.listeners):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                pass

    def finish(self, status: str, error: MigrationFailed | None = None) -> None:
        self.status = status
        self.ended = time.time()
        self.total_time = time.monotonic() - self._t0
        self._close_phase()
        if error is not None:
            self.error = {"phase": error.phase, "message": error.message}
        self.event("status", status=status, error=self.error)
        log.info("migration %s: %s%s", self.id, status,
                 f" ({self.error['phase']}: {self.error['message']})" if self.error else "")

    @property
    def done(self) -> bool:
        return self.status != ACTIVE

    def as_dict(self) -> dict:
        now = time.monotonic()
        return {
            "id": self.id, "role": self.role, "pid": self.pid, "src": self.src,
            "dst": self.dst, "status": self.status, "phase": self.phase,
            "started": self.started, "ended": self.ended,
            "setup_time": self.setup_time,
            "total_time": self.total_time if self.total_time is not None else now - self._t0,
            "downtime": self.downtime, "expected_downtime": self.expected_downtime,
            "bytes_total": self.bytes_total, "bytes_transferred": self.bytes_transferred,
            "bytes_remaining": self.bytes_remaining, "dirty_rate": self.dirty_rate,
            "throughput": self.throughput, "throttle": self.throttle,
            "throttle_max": self.throttle_max,
            "rounds": [r.as_dict() for r in self.rounds], "decision": self.decision,
            "error": self.error, "restored_pid": self.restored_pid,
            "stop": self.stop_stats, "fill": self.fill,
            "options": dataclasses.asdict(self.options),
            "phases": [{k: v for k, v in p.items() if k != "_t"} for p in self.phases],
            # QEMU query-migrate's names for what the fields above hold
            "dirty_pages_rate": None if self.dirty_rate is None else self.dirty_rate / PAGE,
            "precopy_bytes": sum(r.bytes for r in self.rounds),
            "downtime_bytes": self.stop_stats.get("bytes"),
            "postcopy_bytes": self.stop_stats.get("post_copy_bytes"),
            "postcopy_faults": (self.fill or {}).get("pages_fault"),
            "postcopy_prefetched": (self.fill or {}).get("pages_prefetch"),
            "postcopy_blocktime": None if not (self.fill or {}).get("blocktime_total_us")
            else self.fill["blocktime_total_us"] / 1e6,
        }


# --------------------------------------------------------------------------
# the source's coordinator

class Coordinator:
    """Runs one migration from the source agent.  ``agent`` gives: ``pool``
    (workers), ``peer(host) -> client`` (the destination agent),
    ``dst_host(name)`` (inventory entry), ``work_dir``, ``tls``,
    ``interface``, ``wait_filled(pid)`` (a post-copy to this host done)."""

    def __init__(self, agent, m: Migration) -> None:
        self.agent = agent
        self.m = m
        self.worker = None
        self.dst = agent.dst_host(m.dst)
        self.peer = agent.peer(self.dst)
        self.dir = os.path.join(agent.work_dir, "source", m.id)
        self.logs = os.path.join(agent.work_dir, "logs", m.id)    # kept after it ends
        self.req: dict = {}
        self.throttle = None
        self.dst_prepared = False
        self.address_moved = False
        self.post_copy = m.options.post_copy == "on"

    def _log(self, name: str) -> str:
        return os.path.join(self.logs, name)

    def _check_cancel(self) -> None:
        if self.m.cancel_requested:
            raise Cancelled(self.m.phase, "cancelled by the operator")

    def _sink(self, session: str) -> dict:
        t = self.agent.tls
        return {"address": self.dst.address, "port": self.dst.page_server_port,
                "session": session, "streams": self.m.options.streams,
                "compress": self.m.options.compress,
                "max_bandwidth": self.m.options.max_bandwidth,
                "tls": None if t is None else {"cacert": t.cacert, "cert": t.cert,
                                               "key": t.key, "cacrl": t.cacrl}}

    async def _heartbeat(self) -> None:
        """Tell the destination we are alive while it waits for us (a long
        round sends pages to its page-server, not to its agent)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self.peer.post(f"/api/v1/incoming/{self.m.id}/alive", {},
                                     phase=self.m.phase, timeout=HEARTBEAT_S)
            except MigrationFailed as e:
                log.debug("migration %s: heartbeat: %s", self.m.id, e.message)

    async def run(self) -> None:
        m = self.m
        beat = asyncio.ensure_future(self._heartbeat())
        try:
            await self._run()
        finally:
            beat.cancel()

    async def _run(self) -> None:
        m = self.m
        try:
            await self._prepare()
            self._check_cancel()
            prev = await self._pre_copy()
            self._check_cancel()
            await self._stop_and_move(prev)
            m.finish(COMPLETED)
        except MigrationFailed as e:
            await self._rollback(e)
            m.finish(CANCELLED if isinstance(e, Cancelled) else FAILED, e)
        except (errors.MigrateError, OSError) as e:
            err = MigrationFailed(m.phase, str(e))
            await self._rollback(err)
            m.finish(FAILED, err)
        except asyncio.CancelledError:
            err = MigrationFailed(m.phase, "the agent is shutting down")
            await self._rollback(err)
            m.finish(FAILED, err)
            raise
        finally:
            if self.worker is not None:
                await self.worker.close()
                self.worker = None
            if m.status == COMPLETED and not m.options.keep_images:
                shutil.rmtree(self.dir, ignore_errors=True)

    # -- phases ------------------------------------------------------------
    async def _prepare(self) -> None:
        m = self.m
        m.set_phase("prepare")
        from migrate.source import check
        loop = asyncio.get_running_loop()
        await self.agent.wait_filled(m.pid)     # (a post-copy to here not done yet)
        try:
            self.req = await loop.run_in_executor(None, check.requirements, m.pid)
        except errors.NoSuchProcess:
            raise MigrationFailed("prepare", f"no process {m.pid} on {m.src}") from None
        m.bytes_total = self.req["rss"]
        m.bytes_remaining = self.req["rss"]
        os.makedirs(self.dir, exist_ok=True)
        self.worker = await self.agent.pool.take()
        r = await self.peer.post("/api/v1/incoming", {
            "id": m.id, "src": m.src, "pid": m.pid, "requirements": self.req,
            "options": dataclasses.asdict(m.options)}, phase="prepare")
        self.dst_prepared = True
        if r.get("problems"):
            raise MigrationFailed("prepare", f"{m.dst} cannot take pid {m.pid}: "
                                  + "; ".join(r["problems"]))
        m.event("prepared", requirements={k: self.req[k] for k in ("pids", "rss", "threads")})

    async def _pre_copy(self) -> str | None:
        m, o = self.m, self.m.options
        if not o.pre_copy or o.max_rounds == 0:
            return None
        m.set_phase("pre-copy")
        from migrate.orchestrator import policy as pol
        # --post-copy on: one pass over memory (the bulk), then post-copy, as
        # QEMU's post-copy is usually started after the first pass
        rounds = min(o.max_rounds, 1) if o.post_copy == "on" else o.max_rounds
        policy = pol.Policy(pol.PolicyConfig(
            downtime_limit=o.downtime_limit, max_rounds=rounds,
            auto_converge=o.auto_converge, post_copy=o.post_copy,
            max_bandwidth=o.max_bandwidth, stop_cost=self.agent.stop_cost))
        prev = None
        n = 0
        while True:
            n += 1
            name = f"pre{n}"
            t0 = time.monotonic()
            res = await self.worker.call({
                "op": "pre-dump", "pid": m.pid, "images_dir": os.path.join(self.dir, name),
                "prev": f"../{prev}" if prev else None, "sink": self._sink(f"{m.id}/{name}"),
                "log": self._log(f"{name}.log")})
            if not res.get("ok"):
                raise MigrationFailed("pre-copy", f"round {n}: {res.get('error')}")
            dt = time.monotonic() - t0
            await self.peer.post(f"/api/v1/incoming/{m.id}/round",
                                 {"session": f"{m.id}/{name}"}, phase="pre-copy")
            self.agent.fault("src-round")
            st = res["stats"]
            pages = st["pages_written"]
            rnd = Round(n, pages, res["bytes"], dt, pages)
            m.rounds.append(rnd)
            m.bytes_transferred += res["bytes"]
            prev = name
            d = policy.after_round(pol.RoundStats(
                round=n, bytes_sent=res["bytes"], pages_sent=pages, pages_dirty=pages,
                seconds=dt))
            m.throughput = d.bandwidth
            m.dirty_rate = d.dirty_rate
            m.expected_downtime = d.predicted_downtime
            if m.dirty_rate is not None and m.rounds:
                m.bytes_remaining = int(m.dirty_rate * dt)
            m.decision = d.reason
            m.event("round", round=rnd.as_dict(), decision=d.action, reason=d.reason,
                    predicted_downtime=d.predicted_downtime)
            log.info("migration %s: round %d: %d pages (%.1f MiB) in %.3f s: %s (%s)", m.id,
                     n, pages, res["bytes"] / 2**20, dt, d.action, d.reason)
            if d.throttle is not None and o.auto_converge:
                await self._throttle(d.throttle)
            self._check_cancel()
            if d.action != "continue":
                if d.action == "post-copy":
                    self.post_copy = True
                return prev

    async def _throttle(self, percent: int) -> None:
        from migrate.orchestrator import throttle
        loop = asyncio.get_running_loop()
        if self.throttle is None:
            self.throttle = throttle.Throttle(self.req["pids"])
        await loop.run_in_executor(None, self.throttle.apply, percent)
        self.m.throttle = percent
        self.m.throttle_max = max(self.m.throttle_max or 0, percent)
        self.m.event("throttle", percent=percent)

    async def _stop_and_move(self, prev: str | None) -> None:
        m, o = self.m, self.m.options
        m.set_phase("stop")
        t_stop = time.monotonic()
        await self.worker.send({
            "op": "dump", "pid": m.pid, "images_dir": os.path.join(self.dir, "final"),
            "prev": f"../{prev}" if prev else None, "sink": self._sink(f"{m.id}/final"),
            "log": self._log("final.log"), "tcp_established": o.tcp_established,
            "network_lock": o.network_lock, "unlock_after": o.tcp_established,
            "level": logging.DEBUG, "post_copy": self._post_copy_job(),
            "resume": self._resume_job()})
        msg = await self.worker.recv()
        told = None
        if msg.get("event") == "lazy-listening":
            # Post-copy: the destination's lazy-pages daemon connects to the
            # pages we keep while we freeze and dump, not in the downtime.
            told = asyncio.ensure_future(self._tell_source(msg["port"]))
            msg = await self.worker.recv()
        if msg.get("event") != "frozen":
            if told is not None:
                told.cancel()
            # The dump failed before it could commit: the tree runs on here.
            raise MigrationFailed("stop", msg.get("error") or f"unexpected {msg!r}")
        self.agent.fault("src-frozen")
        t_frozen = time.monotonic() - msg["frozen_for"]
        m.bytes_transferred += msg["bytes"]
        m.stop_stats = {"dump_seconds": msg["seconds"], "frozen_for_dump": msg["frozen_for"],
                        "pages": msg["stats"]["pages_written"], "bytes": msg["bytes"]}
        lazy = msg.get("lazy")
        if lazy:
            m.stop_stats["lazy_pages"] = lazy["pages"]
        m.event("frozen", **m.stop_stats)
        log.debug("migration %s: frozen event", m.id)
        try:
            self._check_cancel()
            if o.move_address:
                await self._move_address()
                log.debug("migration %s: address removed", m.id)
            if told is not None:
                await told          # (long done: it was sent before the freeze)
            m.set_phase("restore")
            t_r = time.monotonic()
            r = await self.peer.post(f"/api/v1/incoming/{m.id}/restore",
                                     {"session": f"{m.id}/final",
                                      "address": o.move_address,
                                      "post_copy": None if not lazy else {
                                          "address": self.agent.cfg.address,
                                          "port": lazy["port"],
                                          "session": f"{m.id}/final"}}, phase="restore",
                                     timeout=RESTORE_TIMEOUT_S)
            if not r.get("ok"):
                raise MigrationFailed("restore", f"on {m.dst}: {r.get('error')}")
            t_built = time.monotonic()
            log.debug("migration %s: built on %s", m.id, m.dst)
            m.stop_stats["address_seconds"] = t_r - t_frozen - msg["frozen_for"]
            m.stop_stats["build_seconds"] = t_built - t_r
            self._check_cancel()
        except BaseException as e:
            await self._release("rollback", str(e))
            raise
        # Built there, held before its release; ours frozen here.  From the
        # resume on the process must run on exactly one host: our worker
        # asks the destination to release it and kills ours only once it
        # runs there; it goes on deciding even if this agent dies.
        await self.worker.send({"op": "release", "action": "resume",
                                "resume": self._resume_job()})
        while True:
            ev = await self._next_from_worker()
            if ev.get("event") == "undecided":
                m.event("undecided", error=ev.get("error"))
                log.warning("migration %s: %s did not answer the resume (%s): ours stays "
                            "frozen until it answers (or `migrate cancel`)", m.id, m.dst,
                            ev.get("error"))
                continue
            break
        if ev.get("event") != "resumed":
            res = await self.worker.recv(120)        # the dump's end: rolled back
            raise MigrationFailed("restore", f"{m.dst} did not resume it: "
                                  f"{(ev.get('result') or {}).get('error')}; "
                                  f"{'it runs on ' + m.src if res.get('running') else res}")
        r = ev.get("result") or {}
        t_run = time.monotonic()
        log.debug("migration %s: resumed on %s", m.id, m.dst)
        m.restored_pid = r.get("pid")
        m.downtime = t_run - t_frozen
        m.stop_stats["restore_seconds"] = t_run - t_r
        m.stop_stats["resume_seconds"] = t_run - t_built
        self.agent.observe_stop_cost(t_run - t_frozen - msg["bytes"] / max(
            m.throughput or 1e9, 1.0))
        m.set_phase("resume")
        m.event("running", host=m.dst, pid=m.restored_pid, downtime=m.downtime)
        self.agent.fault("src-resumed")
        if lazy:
            # Post-copy: our frozen tree serves what is left until the
            # destination has it all; then it is killed.
            m.set_phase("post-copy")
            ev = await self.worker.recv()
            m.stop_stats["post_copy_seconds"] = ev.get("seconds")
            m.stop_stats["post_copy_bytes"] = ev.get("bytes") or 0
            m.bytes_transferred += ev.get("bytes") or 0      # QEMU counts these too
            m.event("served", **{k: ev.get(k) for k in ("seconds", "rc", "error", "bytes")})
            if ev.get("rc") != 0:
                log.error("migration %s: post-copy: the destination left before it had "
                          "every page (%s)", m.id, ev.get("error") or f"rc {ev.get('rc')}")
        try:
            res = await self.worker.recv(120)
        except errors.MigrateError as e:
            res = {"ok": False, "error": str(e)}
        if not res.get("ok"):
            # The destination runs it; our copy could not be killed cleanly.
            log.error("migration %s: the source tree after the move: %s", m.id,
                      res.get("error"))
        m.set_phase("cleanup")
        await self._release_throttle()
        try:
            await self.peer.post(f"/api/v1/incoming/{m.id}/finish",
                                 {"keep_images": o.keep_images}, phase="cleanup")
        except MigrationFailed as e:
            log.warning("migration %s: cleanup on %s: %s", m.id, m.dst, e.message)
        m.total_time = None
        log.info("migration %s: pid %d runs on %s; downtime %.1f ms (stop %.1f s after "
                 "the start)", m.id, m.pid, m.dst, m.downtime * 1e3, t_stop - m._t0)

    async def _tell_source(self, port: int) -> None:
        """Where our frozen tree's pages will be served (a hint: the restore
        request says it again)."""
        try:
            r = await self.peer.post(f"/api/v1/incoming/{self.m.id}/source",
                                     {"address": self.agent.cfg.address, "port": port,
                                      "session": f"{self.m.id}/final"}, phase="stop",
                                     timeout=10)
            if not r.get("ok"):
                log.info("migration %s: %s did not connect early to our pages: %s",
                         self.m.id, self.m.dst, r.get("error"))
        except Exception as e:      # noqa: BLE001 - a hint: the restore says it again
            log.info("migration %s: %s did not connect early to our pages: %s", self.m.id,
                     self.m.dst, getattr(e, "message", e))

    def _resume_job(self) -> dict:
        """Where the worker asks the destination to release the tree (it
        connects before the freeze, and asks at the resume)."""
        t = self.agent.tls
        m = self.m
        return {"resume_url": f"{self.dst.agent}/api/v1/incoming/{m.id}/resume",
                "status_url": f"{self.dst.agent}/api/v1/migrations/{m.id}",
                "tls": None if t is None else {"cacert": t.cacert, "cert": t.cert,
                                               "key": t.key, "cacrl": t.cacrl}}

    def _post_copy_job(self) -> dict | None:
        if not self.post_copy:
            return None
        t = self.agent.tls
        return {"address": self.agent.cfg.address, "session": f"{self.m.id}/final",
                "tls": None if t is None else {"cacert": t.cacert, "cert": t.cert,
                                               "key": t.key, "cacrl": t.cacrl}}

    async def _next_from_worker(self) -> dict:
        """The worker's next line; a cancel meanwhile is passed on to it
        (it rolls back only while undecided)."""
        read = asyncio.ensure_future(self.worker.recv())
        told = False
        while True:
            done, _ = await asyncio.wait({read}, timeout=0.5)
            if done:
                return read.result()
            if self.m.cancel_requested and not told:
                await self.worker.send({"op": "release", "action": "rollback",
                                        "reason": "cancelled by the operator"})
                told = True

    async def _release(self, action: str, reason: str) -> dict:
        try:
            await self.worker.send({"op": "release", "action": action, "reason": reason})
            return await self.worker.recv(120)
        except errors.MigrateError as e:
            return {"ok": False, "error": str(e)}

    async def _move_address(self) -> None:
        """The address leaves this host; the destination's restore adds it
        once it has locked the connections there."""
        from migrate.orchestrator import address
        ip = self.m.options.move_address
        if self.agent.interface:
            # One netlink request (~0.1 ms): no thread hop in the downtime.
            address.remove(ip, self.agent.interface)
        else:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, address.remove, ip, None)
        self.address_moved = True
        self.m.event("address", ip=ip, host=self.m.dst)

    async def _release_throttle(self) -> None:
        if self.throttle is not None:
            loop = asyncio.get_running_loop()
            t, self.throttle = self.throttle, None
            await loop.run_in_executor(None, t.release)
            self.m.throttle = None

    async def _rollback(self, why: MigrationFailed) -> None:
        """Everything back as before the migration, on both hosts."""
        m = self.m
        log.warning("migration %s: failed in %s: %s; rolling back", m.id, why.phase,
                    why.message)
        try:
            await self._release_throttle()
        except (OSError, errors.MigrateError) as e:
            log.error("migration %s: throttle release: %s", m.id, e)
        if self.address_moved:
            from migrate.orchestrator import address
            try:
                await self.peer.post(f"/api/v1/incoming/{m.id}/address",
                                     {"action": "del", "ip": m.options.move_address},
                                     phase="rollback", timeout=10)
            except MigrationFailed as e:
                log.error("migration %s: address back from %s: %s", m.id, m.dst, e.message)
            try:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, address.add_now, m.options.move_address,
                                           self.agent.interface)
            except (OSError, errors.MigrateError) as e:
                log.error("migration %s: address back here: %s", m.id, e)
        if self.dst_prepared:
            try:
                await self.peer.post(f"/api/v1/incoming/{m.id}/abort",
                                     {"reason": why.message}, phase="rollback", timeout=30)
            except MigrationFailed as e:
                log.error("migration %s: abort on %s: %s (its images may be left in its "
                          "work directory)", m.id, m.dst, e.message)
        if self.worker is not None and self.req:
            try:
                await self.worker.call({"op": "stop-tracking", "pids": self.req["pids"]},
                                       timeout=30)
            except errors.MigrateError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
