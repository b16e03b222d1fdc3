"""A job runner process for an agent: dumps and restores, out of the agent's
event loop.

Dumps ptrace the target (every ptrace call must come from the thread that
seized it) and restores fork the new processes: neither belongs in a
multi-threaded aiohttp process.  An agent keeps one of these started and
warm (everything imported), hands it jobs as JSON lines on stdin and reads
JSON lines back on stdout:

    -> {"op": "pre-dump", "pid": N, "images_dir": D, "prev": REL|null, "sink": {...}}
    <- {"ok": true, "stats": {...}, "bytes": B}
    -> {"op": "dump", ... same, "tcp_established": bool, "network_lock": ...}
    <- {"event": "lazy-listening", "port": P}   (post-copy: before the freeze)
    <- {"event": "frozen", "stats": {...}, "bytes": B}     (image committed, tree frozen)
    -> {"op": "release", "action": "kill" | "rollback", "reason": "..."}
    <- {"ok": true, "stats": ...} | {"ok": false, "error": "...", "running": true}
    -> {"op": "standby", "socket": S, "stats": F, "log": L, "tls": {...}|null}
    <- {"ok": true, "pid": N}    (a lazy-pages daemon listening on S, for
       the restore to come; gone if none comes)
    -> {"op": "restore", "images_dir": D, ...}
    <- {"ok": true, "pid": N, "stats": {...}}   (then the worker exits: the
       restored tree is handed to the host's init, as `restore -d` does)
    -> {"op": "unlock", "pid": N}                (the source's network lock)

stdout carries only these lines; logging goes to the job's log file.

    python -m migrate.orchestrator.worker
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import time

from migrate import errors

log = logging.getLogger(__name__)


class Released(errors.DumpError):
    """The orchestrator asked for a rollback while the tree was frozen."""


def _out(msg: dict) -> None:
    _OUT.write(json.dumps(msg) + "\n")
    _OUT.flush()


def _in() -> dict | None:
    line = sys.stdin.readline()
    if not line:
        return None
    return json.loads(line)


def _log_to(path: str | None, level: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        h = logging.FileHandler(path)
        h.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: "
                                         "%(message)s", "%H:%M:%S"))
        root.addHandler(h)
    root.setLevel(level)


# A live migration notices a broken link in seconds, not minutes: a stream
# that moves nothing for this long fails the round (and the migration
# rolls back).
IO_TIMEOUT_S = 15.0
COMMIT_TIMEOUT_S = 120.0


def _sink(job: dict):
    from migrate.pageserver import client, tls
    from migrate.pageserver.client import PageServerSink
    client.IO_TIMEOUT_S = IO_TIMEOUT_S
    client.COMMIT_TIMEOUT_S = COMMIT_TIMEOUT_S
    s = job["sink"]
    ctx = None
    if s.get("tls"):
        t = s["tls"]
        ctx = tls.client_context(t["cacert"], t["cert"], t["key"], t.get("cacrl"))
    kw = {}
    if s.get("max_bandwidth"):
        kw["max_bandwidth"] = s["max_bandwidth"]
    # sync=False: a migration's images are read back at once (from the page
    # cache) and deleted after; if the destination host dies before the
    # resume, the source rolls back (docs/protocol.md, "Durability").  The
    # mirror is for the next round's dump: the last dump has none.
    return PageServerSink(s["address"], s["port"], s["session"], ssl_context=ctx,
                          streams=s.get("streams", 1), compress=s.get("compress", False),
                          mirror=None if job.get("op") == "dump" else job["images_dir"],
                          sync=False, **kw)


def _options(job: dict, **extra):
    from migrate.source.dump import DumpOptions
    return DumpOptions(pid=job["pid"], images_dir=job["images_dir"],
                       prev_images_dir=job.get("prev"), track_mem=True, **extra)


def _run_sink(fn, opts, sink):
    try:
        return fn(opts, sink=sink)
    finally:
        if sink.inventory is None:
            sink.discard()


def pre_dump(job: dict) -> dict:
    from migrate.source.dump import pre_dump as run
    sink = _sink(job)
    t0 = time.monotonic()
    st = _run_sink(run, _options(job), sink)
    return {"ok": True, "stats": dataclasses.asdict(st), "bytes": sink.bytes_sent,
            "seconds": time.monotonic() - t0}


def dump(job: dict) -> dict:
    """The last dump: the image committed with the tree frozen; then the
    orchestrator says kill (the destination runs) or rollback."""
    from migrate.source.dump import dump as run
    sink = _sink(job)
    t0 = time.monotonic()
    answer: dict = {}
    frozen = [t0]
    post = job.get("post_copy")
    lazy: list = []
    maps: list = []
    peer = _open_peer(job.get("resume"))
    # Post-copy: the server of the pages left at the source listens before
    # the freeze (its start is no part of the downtime).
    source = _LazySource(job["pid"], post) if post else None
    if source is not None:
        _out({"event": "lazy-listening", "port": source.server.bound_port})

    def on_freeze() -> None:
        frozen[0] = time.monotonic()

    def before_release(stats) -> None:
        if source is not None:
            source.serve(lazy, maps)
        now = time.monotonic()
        _out({"event": "frozen", "stats": dataclasses.asdict(stats),
              "bytes": sink.bytes_sent, "seconds": now - t0, "frozen_for": now - frozen[0],
              "lazy": None if source is None else {
                  "port": source.server.bound_port,
                  "pages": sum(e - s for s, e in lazy) // 4096}})
        msg = _in()
        answer.update(msg or {"action": "rollback", "reason": "the agent went away"})
        if answer.get("action") == "resume":
            # From here on this worker decides, even if its agent dies: the
            # tree is killed here only once the destination runs it.
            if not _resume_there(answer["resume"], peer):
                if source is not None:
                    source.stop("the destination did not resume")
                raise Released(answer.get("reason") or "the destination did not resume")
            if source is not None:
                source.resumed.set()
                # Post-copy: the frozen tree is the page source until the
                # destination has every page it left here.
                t = time.monotonic()
                source.server.thread.join()
                _out({"event": "served", "seconds": time.monotonic() - t,
                      "rc": source.server.rc, "error": source.server.error,
                      "map_seconds": source.map_seconds,
                      "bytes": source.keeper.pages_served * 4096})
            return
        if source is not None:
            source.stop(answer.get("reason") or "rollback")
        if answer.get("action") != "kill":
            raise Released(answer.get("reason") or "rollback asked")

    opts = _options(job, tcp_established=job.get("tcp_established", False),
                    network_lock=job.get("network_lock"), before_release=before_release,
                    on_freeze=on_freeze, leave_lazy=bool(post), lazy_out=lazy,
                    defer_lazy=bool(post), lazy_map_out=maps)
    try:
        st = _run_sink(run, opts, sink)
    except errors.MigrateError as e:
        # The dump rolled back: the tree runs on here, lock lifted.
        return {"ok": False, "error": str(e), "running": True,
                "released": bool(answer)}
    finally:
        if peer is not None:
            peer.close()
        if source is not None and source.server.thread.is_alive():
            source.stop("the dump ended")
    res = {"ok": True, "stats": dataclasses.asdict(st), "bytes": sink.bytes_sent}
    if job.get("unlock_after"):
        # Killed here, running there: our lock goes (the destination lifted
        # its own), whether or not our agent is still there to ask.
        try:
            unlock(job)
        except errors.MigrateError as e:
            log.error("network unlock: %s", e)
            res["unlock_error"] = str(e)
    return res


class _LazySource:
    """Post-copy: the server of the root's pages left at the source (GETs of
    the destination's lazy-pages daemon, read from the frozen root) and of
    their map (GET_MAP: which the destination's image holds already, which
    are zero), on threads of its own.  Listening from the start of the job;
    serving once the image is committed (``serve``)."""

    def __init__(self, pid: int, post: dict) -> None:
        import threading
        from migrate.pageserver import lazyserve, tls
        from migrate.source import lazy as srclazy
        self.keeper = srclazy.Keeper(pid, pid, [])    # the frozen root is its own keeper
        self.maps: dict[int, list] = {}
        self.map_error: BaseException | None = None
        self.map_seconds: float | None = None
        self.mapped = threading.Event()
        # The map goes out once the destination runs the process: encoding
        # tens of thousands of runs holds the GIL for milliseconds at a
        # time, which the resume request on our main thread waited for.
        self.resumed = threading.Event()
        ctx = None
        if post.get("tls"):
            t = post["tls"]
            ctx = tls.server_context(t["cacert"], t["cert"], t["key"], t.get("cacrl"))
        server = lazyserve.LazyServer(self.keeper.read, post["session"], post["address"], 0,
                                      ctx, map_of=self.map_of, read_runs=self.keeper.read_runs)
        server.rc, server.error = None, None
        self.server = server
        listening = threading.Event()

        def run() -> None:
            import asyncio
            try:
                server.rc = asyncio.run(server.run(on_listen=lambda port: listening.set(),
                                                   signals=False))
            except Exception as e:     # noqa: BLE001 - reported in the "served" event
                server.error = str(e)
                log.exception("lazy pages server")
            finally:
                listening.set()
        server.thread = threading.Thread(target=run, name="lazy-serve", daemon=True)
        server.thread.start()
        listening.wait(30)
        if server.bound_port is None:
            raise errors.DumpError(f"post-copy: cannot serve the lazy pages: {server.error}")

    def serve(self, lazy: list, maps: list) -> None:
        """The image is committed: serve ``lazy`` (ranges of the root), and
        compute the maps (``dump.LazyMap``) in a thread meanwhile."""
        import threading
        self.keeper.serve(lazy)
        if not maps:
            self.mapped.set()
            return

        def compute() -> None:
            t = time.monotonic()
            try:
                for m in maps:
                    self.maps[m.pid] = m.compute()
            except BaseException as e:   # noqa: BLE001 - the GET_MAP answers it
                log.exception("post-copy: the lazy map")
                self.map_error = e
            finally:
                self.map_seconds = time.monotonic() - t
                self.mapped.set()
        threading.Thread(target=compute, name="lazy-map", daemon=True).start()

    def map_of(self, pid: int) -> list:
        """(vaddr, nr_pages, kind) runs of ``pid``'s lazy area, once known
        (called on a connection's thread: it waits)."""
        if not self.mapped.wait(120):
            raise LookupError(f"pid {pid}: the lazy map is not ready after 120 s")
        self.resumed.wait(RESUME_TIMEOUT_S)
        if self.map_error is not None:
            raise LookupError(f"pid {pid}: the lazy map failed: {self.map_error}")
        runs = self.maps.get(pid)
        if runs is None:
            raise LookupError(f"pid {pid}: no lazy map here")
        return runs

    def stop(self, why: str) -> None:
        self.resumed.set()
        self.server.stop(why)
        self.server.thread.join(10)


RESUME_TIMEOUT_S = 120.0
ASK_EVERY_S = 2.0


_contexts: dict = {}


def _context(tls: dict | None):
    """The client TLS context for these certificate paths (made once: loading
    the certificates costs milliseconds, and the resume is in the downtime)."""
    if not tls:
        return None
    key = (tls["cacert"], tls["cert"], tls["key"], tls.get("cacrl"))
    ctx = _contexts.get(key)
    if ctx is None:
        from migrate.pageserver import tls as T
        ctx = _contexts[key] = T.client_context(*key)
    return ctx


class _Peer:
    """A connection to the destination's agent opened before the freeze, so
    that the resume request, in the downtime, costs one round trip and no
    TLS handshake.  Any trouble with it: the caller makes a new one."""

    def __init__(self, url: str, tls: dict | None) -> None:
        import http.client
        import urllib.parse
        u = urllib.parse.urlsplit(url)
        self.netloc = u.netloc
        if u.scheme == "https":
            self.conn = http.client.HTTPSConnection(u.hostname, u.port or 443,
                                                    context=_context(tls),
                                                    timeout=RESUME_TIMEOUT_S)
        else:
            self.conn = http.client.HTTPConnection(u.hostname, u.port or 80,
                                                   timeout=RESUME_TIMEOUT_S)
        self.conn.connect()

    def post(self, url: str, body: dict) -> dict:
        import http.client
        import urllib.parse
        u = urllib.parse.urlsplit(url)
        if u.netloc != self.netloc:
            raise ConnectionError(f"{url}: not {self.netloc}")
        try:
            self.conn.request("POST", u.path, json.dumps(body).encode(),
                              {"Content-Type": "application/json"})
            r = self.conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException) as e:
            raise ConnectionError(str(e) or type(e).__name__) from None
        try:
            out = json.loads(data or b"{}")
        except ValueError as e:
            raise ConnectionError(f"{url}: {e}") from None
        if r.status >= 400:
            return {"ok": False, "http": r.status, **out}
        return out

    def close(self) -> None:
        self.conn.close()


def _open_peer(resume: dict | None) -> _Peer | None:
    if not resume:
        return None
    try:
        return _Peer(resume["resume_url"], resume.get("tls"))
    except (OSError, ValueError) as e:
        log.info("no early connection to %s (%s): the resume makes its own",
                 resume["resume_url"], e)
        return None


def _http(url: str, tls: dict | None, body: dict | None, timeout: float) -> dict:
    """One JSON request to an agent (urllib: this process has no loop)."""
    import ssl
    import urllib.error
    import urllib.request
    ctx = _context(tls)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return {"ok": False, "http": e.code, **json.loads(e.read() or b"{}")}
        except ValueError:
            return {"ok": False, "http": e.code, "error": str(e)}
    except (urllib.error.URLError, OSError, ssl.SSLError, ValueError) as e:
        raise ConnectionError(str(e)) from None


def _resume_there(r: dict, peer: _Peer | None = None) -> bool:
    """Ask the destination to release the tree it built.  True once it runs
    there; False when it says it does not.  Unanswered: ask again until it
    answers (our tree stays frozen: running it here on a guess could run
    the process twice, killing it could lose it); a line on stdin from the
    agent (``migrate cancel``) rolls back instead."""
    import select
    try:
        res = None
        if peer is not None:
            try:
                log.debug("resume asked")
                res = peer.post(r["resume_url"], {})
                log.debug("resume answered")
            except ConnectionError as e:
                # Closed while we dumped, or never answered: asking again is
                # safe (a tree already released answers ok).
                log.info("early connection to the destination: %s; a new one", e)
        if res is None:
            res = _http(r["resume_url"], r.get("tls"), {}, RESUME_TIMEOUT_S)
        _out({"event": "resumed" if res.get("ok") else "not-resumed", "result": res})
        return bool(res.get("ok"))
    except ConnectionError as e:
        log.warning("resume unanswered (%s): asking %s until it answers", e,
                    r["status_url"])
        _out({"event": "undecided", "error": str(e)})
    stdin_open = True
    while True:
        try:
            d = _http(r["status_url"], r.get("tls"), None, 10)
        except ConnectionError:
            d = None
        if d is not None:
            running = d.get("phase") in ("resume", "cleanup") or d.get("status") == "completed"
            _out({"event": "resumed" if running else "not-resumed", "result": d})
            return running
        if stdin_open:
            ready, _, _ = select.select([sys.stdin], [], [], ASK_EVERY_S)
            if ready:
                msg = _in()
                if msg is None:
                    stdin_open = False          # the agent died: go on asking
                elif msg.get("action") == "rollback":
                    return False
        else:
            time.sleep(ASK_EVERY_S)


def _start_lazy_daemon(images: str, sock: str, stats_path: str, log_path: str,
                       remote: dict | None = None) -> int:
    """Fork the lazy-pages daemon (everything is imported: it serves at
    once) with pages from the local image; return its pid once it listens.
    It outlives this worker (the host's init reaps it) and exits when every
    page is in, writing its figures to ``stats_path``."""
    from migrate.lazypages import daemon
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            _daemon_child(log_path, stats_path)
            src = None
            if remote:
                src = (remote["address"], remote["port"], remote["session"],
                       _client_context(remote))
            # The page-server checked every range's checksum as it wrote it.
            rc = daemon.run(images, sock, status_fd=w, stats_out=_saver(stats_path),
                            verify=False, early=True, remote=src)
        except BaseException:        # noqa: BLE001 - the child must never return
            log.exception("lazy-pages daemon")
            rc = 1
        os._exit(rc)
    os.close(w)
    try:
        ok = os.read(r, 1) == b"\0"
    finally:
        os.close(r)
    if not ok:
        os.waitpid(pid, 0)
        raise errors.RestoreError(f"the lazy-pages daemon (pid {pid}) did not start: see "
                                  f"{log_path}")
    return pid


class _Standby:
    """A lazy-pages daemon forked before the stop (``standby`` job), already
    listening on its socket, its TLS context made, waiting on a pipe for
    the image and the page source: at the restore the worker sends them
    and starts at once (the hand-over waits in the daemon's backlog).
    Forking and waiting until it listened took 12-13 ms of the downtime on
    the rig.  If the worker goes away first, the pipe's end makes it go."""

    def __init__(self, job: dict, pid: int, go: int) -> None:
        self.job, self.pid, self.go = job, pid, go
        self.sock = job["socket"]
        self.remote: dict | None = None      # told early (``connect``)

    def connect(self, remote: dict) -> bool:
        """Post-copy: the page source, as the stop begins; the daemon connects
        to it at once (its TLS handshakes then cost nothing at the restore)."""
        if self.go < 0 or self.remote is not None:
            return False
        try:
            os.write(self.go, (json.dumps({"remote": remote}) + "\n").encode())
        except OSError:
            return False
        self.remote = remote
        return True

    def start(self, images: str, remote: dict | None) -> bool:
        """Hand it the image and page source; False if it is not there
        (EPIPE: the caller forks a daemon of its own)."""
        if self.remote is not None and remote is not None and remote != self.remote:
            log.warning("the standby lazy-pages daemon (pid %d) connected to another page "
                        "source (%s) than the restore's (%s): forking one", self.pid,
                        self.remote, remote)
            self.dismiss()
            return False
        try:
            os.write(self.go, (json.dumps({"images": images, "remote": remote}) +
                               "\n").encode())
            ok = True
        except OSError:
            ok = False
        self.close()
        if not ok:
            log.warning("the standby lazy-pages daemon (pid %d) is gone: forking one", self.pid)
            _reap(self.pid)
        return ok

    def close(self) -> None:
        """Without a start, it unlinks its socket and exits."""
        if self.go >= 0:
            os.close(self.go)
            self.go = -1

    def dismiss(self, timeout: float = 5.0) -> None:
        """Closed, and gone (its socket with it) before this returns."""
        self.close()
        end = time.monotonic() + timeout
        try:
            while os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                if time.monotonic() > end:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.001)
        except (ProcessLookupError, ChildProcessError):
            pass


def _reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


_standby: _Standby | None = None
STANDBY_TIMEOUT_S = 10.0


def _client_context(remote: dict | None):
    if not remote or not remote.get("tls"):
        return None
    from migrate.pageserver import tls
    t = remote["tls"]
    return tls.client_context(t["cacert"], t["cert"], t["key"], t.get("cacrl"))


def _daemon_child(log_path: str, stats_path: str) -> None:
    """In a forked daemon: off the worker's stdio, in a session of its own
    (it outlives the worker: the host's init reaps it)."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    _OUT.close()
    os.setsid()
    _log_to(log_path, logging.INFO)


def _saver(stats_path: str):
    def save(d: dict) -> None:
        with open(stats_path + ".tmp", "w") as f:
            json.dump(d, f)
        os.rename(stats_path + ".tmp", stats_path)
    return save


def standby(job: dict) -> dict:
    """Fork the lazy-pages daemon of a restore to come (see _Standby)."""
    global _standby
    from migrate.lazypages import daemon
    if _standby is not None:
        _standby.dismiss()
        _standby = None
    sock = job["socket"]
    go_r, go_w = os.pipe()
    st_r, st_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            os.close(go_w)
            os.close(st_r)
            _daemon_child(job["log"], job["stats"])
            ctx = _client_context(job)
            os.makedirs(os.path.dirname(sock), exist_ok=True)
            lsn = daemon.listen_unix(sock)
            os.write(st_w, b"\0")
            os.close(st_w)
            f = os.fdopen(go_r)
            line = f.readline()
            if not line:
                lsn.close()
                try:
                    os.unlink(sock)
                except FileNotFoundError:
                    pass
                os._exit(0)            # no restore came (aborted, or eager)
            go = json.loads(line)
            src = None
            if go.get("remote"):
                r = go["remote"]
                src = (r["address"], r["port"], r["session"], ctx)
            later = None
            if go.get("images") is None and src is not None:
                # Told the page source first (post-copy, as the stop begins):
                # connect now, the image comes with the restore.
                def later() -> str:
                    nxt = f.readline()
                    if not nxt:
                        raise daemon.NoImage("no restore came")
                    return json.loads(nxt)["images"]
            try:
                rc = daemon.run(go.get("images"), sock, stats_out=_saver(job["stats"]),
                                verify=False, early=True, remote=src, listener=lsn,
                                images_later=later)
            except daemon.NoImage:
                log.info("lazy-pages: no restore came")
                rc = 0
        except BaseException:        # noqa: BLE001 - the child must never return
            log.exception("lazy-pages daemon")
        os._exit(rc)
    os.close(go_r)
    os.close(st_w)
    sb = _Standby(job, pid, go_w)
    try:
        import select
        ready, _, _ = select.select([st_r], [], [], STANDBY_TIMEOUT_S)
        ok = bool(ready) and os.read(st_r, 1) == b"\0"
    finally:
        os.close(st_r)
    if not ok:
        sb.dismiss()
        return {"ok": False, "error": f"the lazy-pages daemon (pid {pid}) did not start: "
                                      f"see {job['log']}"}
    _standby = sb
    log.info("lazy-pages daemon %d standing by on %s", pid, sock)
    if job.get("lock_pid"):
        # The restore's network lock, its table hooked now (netlock.arm):
        # at the stop, locking is adding the connections.  Removed at our
        # exit if no restore takes it.
        from migrate.resources import netlock
        try:
            netlock.arm(job["lock_pid"], job.get("network_lock"))
        except errors.MigrateError as e:
            log.warning("network lock not armed: %s", e)
    return {"ok": True, "pid": pid}


def standby_source(job: dict) -> dict:
    """Post-copy, as the stop begins: the standby daemon connects to the
    source's page server now (``_Standby.connect``)."""
    if _standby is None:
        return {"ok": False, "error": "no lazy-pages daemon standing by"}
    return {"ok": _standby.connect(job["remote"])}


def restore(job: dict) -> dict:
    global _standby
    from migrate.dest.restore import RestoreOptions, restore as run
    lazy = job.get("lazy_pages", False)
    daemon_pid = None
    log.debug("restore job")
    sb, _standby = _standby, None
    if lazy:
        d = job["lazy"]
        if sb is not None and sb.sock == d["socket"] and sb.start(job["images_dir"],
                                                                   d.get("remote")):
            daemon_pid = sb.pid
            log.debug("lazy-pages daemon %d started", daemon_pid)
        else:
            daemon_pid = _start_lazy_daemon(job["images_dir"], d["socket"], d["stats"],
                                            d["log"], d.get("remote"))
            log.debug("lazy-pages daemon %d listening", daemon_pid)
    elif sb is not None:
        sb.dismiss()                   # an eager restore: it goes
    after_lock = None
    if job.get("address"):
        from migrate.orchestrator import address

        def after_lock() -> None:
            address.add(job["address"]["ip"], job["address"]["interface"])
    resumed = job.get("resumed")

    def before_release(root: int) -> None:
        # Built, not running: the source decides (its tree is still frozen).
        _out({"event": "built", "pid": root})
        msg = _in()
        log.debug("release: %s", (msg or {}).get("op"))
        if not msg or msg.get("op") != "release":
            raise errors.RestoreError((msg or {}).get("reason") or
                                      "the agent went away before the release")
        if resumed:
            # Read by an agent that restarted and lost the migration.
            with open(resumed, "w") as f:
                f.write(f"{root}\n")
    try:
        pid, st = run(RestoreOptions(images_dir=job["images_dir"], detach=True,
                                     tcp_close=job.get("tcp_close", False),
                                     network_lock=job.get("network_lock"),
                                     lazy_pages=lazy,
                                     lazy_socket=job["lazy"]["socket"] if lazy else None,
                                     after_lock=after_lock,
                                     before_release=before_release
                                     if job.get("two_phase") else None))
    except BaseException:
        if daemon_pid is not None:
            try:
                os.kill(daemon_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise
    return {"ok": True, "pid": pid, "stats": dataclasses.asdict(st), "exit": True,
            "lazy_daemon": daemon_pid}


def preload(job: dict) -> dict:
    """Read (and keep, decoded) the pagemaps of a committed pre-copy round,
    so that the restore at the stop only reads what is new."""
    from migrate.images import ImageDir, pagemap
    d = ImageDir.open(job["images_dir"])
    n = 0
    for name in list(d.checksums):
        if name.startswith("pstree"):
            d.read_image(name)
        elif name.startswith("pagemap-"):
            lv = pagemap.level_of(d.read_image(name))
            lv.present_ranges, lv.inparent, lv.cover      # computed once, kept
            n += 1
            # and checked against its parent once, not at the stop
            parent = os.path.join(job["images_dir"], "parent", name)
            if os.path.exists(parent):
                try:
                    p = ImageDir.open(os.path.dirname(parent))
                    pagemap.check_chain([lv, pagemap.level_of(p.read_image(name))])
                except errors.ImageError:
                    pass          # the restore's own check says what is wrong
    if _standby is not None:
        # Forked again, with what was just read: the daemon's own index of
        # the image at the stop reads only the last dump (its parents come
        # from the caches it inherits).
        standby(_standby.job)
    return {"ok": True, "pagemaps": n}


def unlock(job: dict) -> dict:
    from migrate.resources import netlock
    netlock.unlock_tree(job["pid"], job.get("network_lock"))
    return {"ok": True}


def stop_tracking(job: dict) -> dict:
    """A migration that ends without its last dump: the tracking holders go."""
    from migrate.source import holder, tracker
    for pid in job.get("pids", []):
        try:
            holder.stop(pid, tracker.start_time(pid))
        except (errors.MigrateError, OSError):
            pass          # gone: its holder went with it
    return {"ok": True}


def inspect(job: dict) -> dict:
    from migrate.source import check
    return {"ok": True, "requirements": check.requirements(job["pid"])}


JOBS = {"inspect": inspect, "preload": preload, "pre-dump": pre_dump, "dump": dump,
        "restore": restore, "unlock": unlock, "stop-tracking": stop_tracking,
        "standby": standby, "standby-source": standby_source}


def _warm() -> None:
    """Import what the jobs need before the first one comes (start-up off the
    migration's critical path)."""
    import migrate.dest.restore  # noqa: F401
    import migrate.lazypages.daemon  # noqa: F401
    import migrate.lazypages.source  # noqa: F401
    import migrate.pageserver.client  # noqa: F401
    import migrate.resources.netlock  # noqa: F401
    import migrate.source.dump  # noqa: F401
    import migrate.orchestrator.address  # noqa: F401
    from migrate.resources import netlock
    try:
        # libnftables loaded and its context made (~1.5 ms): the restore's
        # network lock, in the downtime, is then only the command.
        netlock.prepare(None)
    except errors.MigrateError:
        pass               # no backend: the job that needs one says so


def main() -> int:
    global _OUT
    # Only our JSON lines on the real stdout; anything else printed goes to stderr.
    _OUT = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from migrate.images import imgfile, pagemap
    imgfile.enable_cache()
    pagemap.enable_cache()
    _warm()
    # What is here now (modules, warmed state) lives as long as we do: out
    # of the cyclic GC's sight, whose full collections in a job's downtime
    # then walk only what the job made.
    import gc
    gc.collect()
    gc.freeze()
    import atexit
    from migrate.resources import netlock
    atexit.register(netlock.disarm_all)      # an armed lock no job took
    _out({"event": "ready", "pid": os.getpid()})
    while True:
        job = _in()
        if job is None:
            return 0
        op = job.get("op")
        fn = JOBS.get(op)
        if fn is None:
            _out({"ok": False, "error": f"unknown job {op!r}"})
            continue
        _log_to(job.get("log"), job.get("level", logging.INFO))
        try:
            res = fn(job)
        except errors.MigrateError as e:
            log.error("%s: %s", op, e)
            res = {"ok": False, "error": str(e)}
        except Exception as e:        # noqa: BLE001 - reported, never lost
            log.exception("%s failed", op)
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        _out(res)
        if res.get("exit") or op == "restore":
            from migrate.orchestrator import address
            address.wait_announced()
            return 0


_OUT = sys.stdout

if __name__ == "__main__":
    sys.exit(main())
