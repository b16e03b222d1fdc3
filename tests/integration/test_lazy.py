"""Post-copy: `restore --lazy-pages` with the `migrate lazy-pages` daemon.

Real processes, the real kernel: self-checking programs are dumped, then
restored lazily, their pages supplied by the daemon from the local image or
from the source's `dump --lazy-pages` over TLS; then SIGTERM and their
verdict.  With --no-prefetch every page comes in by a fault, so forks,
mremap, munmap and MADV_DONTNEED happen while pages are still missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.harness import ROOT, Workload, alive, migrate, reap_pids

TLS_HOST = "127.0.0.1"


class Daemon:
    """`migrate lazy-pages`, ready once it writes \\0 on --status-fd."""

    def __init__(self, images: str, *args: str) -> None:
        self.log_path = os.path.join(images, "lazy.log")
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "lazy-pages", "-D", images, "-v4",
             "-o", "lazy.log", "--display-stats", "--status-fd", str(w), *args],
            cwd=ROOT, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        os.close(w)
        ok = os.read(r, 1)
        os.close(r)
        assert ok == b"\0", f"lazy-pages did not start:\n{self.log()}\n{self.finish()[2]}"

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def finish(self, timeout: float = 120) -> tuple[int, dict, str]:
        """Wait for it to exit: (status, stats, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        stats = json.loads(out) if out.strip() else {}
        return self.proc.returncode, stats, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def daemons():
    started: list = []
    yield started
    for d in started:
        d.kill()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    migrate("certs", "init", d, check=True)
    migrate("certs", "issue", d, TLS_HOST, check=True)
    return ["--tls-cacert", f"{d}/cacert.pem", "--tls-cert", f"{d}/{TLS_HOST}/cert.pem",
            "--tls-key", f"{d}/{TLS_HOST}/private/key.pem"]


def _start(name: str, workdir: str, workloads: list, *args: str) -> Workload:
    w = Workload.program(name, workdir, *args)
    workloads.append(w)
    w.wait_ready()
    return w


def _lazy_local(w: Workload, workdir: str, daemons: list, *daemon_args: str):
    images = os.path.join(workdir, "img")
    w.dump(images)
    d = Daemon(images, *daemon_args)
    daemons.append(d)
    w.restore(images, "--lazy-pages")
    return images, d


def _check_done(d: Daemon, processes: int = 1) -> dict:
    rc, stats, err = d.finish()
    assert rc == 0, f"lazy-pages exited {rc}:\n{err}\n{d.log()[-3000:]}"
    assert stats["processes"] >= processes, stats
    return stats


def test_dump_while_pages_still_arrive_is_refused(workdir, workloads, daemons):
    """A process restored lazily whose pages are not all in yet: a dump
    would take the missing pages for zeros, so it is refused (its memory is
    registered with the daemon's userfaultfd) and the process runs on; once
    it has every page it says PASS."""
    w = _start("lazymem", workdir, workloads, "16")
    images, d = _lazy_local(w, workdir, daemons, "--no-prefetch")
    p = migrate("dump", "-t", str(w.pid), "-D", os.path.join(workdir, "again"), "-v4",
                "-o", "dump.log")
    assert p.returncode != 0 and "userfaultfd in missing mode" in p.stderr, p.stderr
    assert alive(w.pid)
    w.assert_pass()
    _check_done(d)


def test_dirtier_local(workdir, workloads, daemons):
    """Faults and prefetch racing: the dirtier rewrites, unmaps, mremaps and
    drops pages from the first instruction; every page is checked."""
    w = _start("dirtier", workdir, workloads)
    time.sleep(0.5)
    _, d = _lazy_local(w, workdir, daemons)
    time.sleep(1)
    w.assert_pass()
    stats = _check_done(d)
    assert stats["pages_fault"] + stats["pages_prefetch"] > 0, stats


def test_lazymem_local_every_page_by_fault(workdir, workloads, daemons):
    """--no-prefetch: a fork, 8 threads faulting at once, mremap, munmap and
    MADV_DONTNEED, all on pages still missing."""
    w = _start("lazymem", workdir, workloads, "16")
    _, d = _lazy_local(w, workdir, daemons, "--no-prefetch")
    w.assert_pass()
    stats = _check_done(d, processes=2)       # the fork's child came by UFFD_EVENT_FORK
    assert stats["pages_fault"] > 0 and stats["pages_prefetch"] == 0, stats
    assert stats["pages_zero"] > 0 and stats["pages_dropped"] > 0, stats
    assert stats["blocktime_max_us"] > 0, stats


def test_cow_tree_local(workdir, workloads, daemons):
    """A tree whose children share pages with their parent: the lazy restore
    gives each process its own copy (COW sharing is not kept with
    --lazy-pages), with the right content in every page."""
    w = _start("cowtree", workdir, workloads, "8", "content")
    _, d = _lazy_local(w, workdir, daemons)
    w.assert_pass()
    _check_done(d, processes=4)


def test_threads_local(workdir, workloads, daemons):
    w = _start("threads", workdir, workloads)
    _, d = _lazy_local(w, workdir, daemons, "--no-prefetch")
    time.sleep(1)
    w.assert_pass()
    _check_done(d)


def test_python_interpreter_local(workdir, workloads, daemons):
    w = _start("pyloop.py", workdir, workloads)
    _, d = _lazy_local(w, workdir, daemons)
    w.assert_pass(timeout=120)
    _check_done(d)


def _free_port() -> int:
    s = socket.socket()
    s.bind((TLS_HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LazyDump:
    """`migrate dump --lazy-pages`: dumps, then serves the pages."""

    def __init__(self, w: Workload, images: str, port: int, tls: list[str],
                 *extra: str) -> None:
        os.makedirs(images, exist_ok=True)
        self.log_path = os.path.join(images, "dump.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "dump", "-t", str(w.pid), "-D", images, "-v4",
             "-o", "dump.log", "--lazy-pages", "--address", TLS_HOST, "--port", str(port),
             *tls, *extra], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 60
        while "lazy-pages: serving" not in self.log():
            assert self.proc.poll() is None, f"dump failed:\n{self.proc.stderr.read()}\n" \
                                             f"{self.log()[-3000:]}"
            assert time.monotonic() < end, "dump --lazy-pages is not serving"
            time.sleep(0.05)
        w.reap_dumped()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        # The keeper (a clone of the dumped process) is reparented to us, the
        # subreaper, when the process dies: reap it.
        import re
        keepers = [int(k) for k in re.findall(r"memory kept by task (\d+)", self.log())]
        for k in keepers:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap_pids(keepers, 10)


@pytest.fixture
def dumps():
    started: list = []
    yield started
    for d in started:
        d.kill()


def _lazy_remote(w, workdir, daemons, dumps, tls, *daemon_args):
    images = os.path.join(workdir, "img")
    port = _free_port()
    src = LazyDump(w, images, port, tls)
    dumps.append(src)
    d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port", str(port), *tls,
               *daemon_args)
    daemons.append(d)
    w.restore(images, "--lazy-pages")
    return src, d


def test_remote_through_tls(workdir, workloads, daemons, dumps, pki):
    """Pages by GET from the source's dump --lazy-pages (read from the dumped
    process's memory, kept by a clone: never written to the image), faults
    on their own connection, prefetch on the other; the source exits once
    all is taken.  Without --lazy-pages that image is refused."""
    w = _start("lazymem", workdir, workloads, "16")
    images = os.path.join(workdir, "img")
    port = _free_port()
    src = LazyDump(w, images, port, pki)
    dumps.append(src)
    pages = os.path.getsize(os.path.join(images, f"pages-{w.pid}.img")) // 4096
    assert pages < 100, f"{pages} pages written: the lazy ones should not be"
    p = migrate("restore", "-D", images, "-d")
    assert p.returncode == 1 and "--lazy-pages" in p.stderr, p.stderr
    assert not alive(w.pid)
    d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port", str(port), *pki)
    daemons.append(d)
    w.restore(images, "--lazy-pages")
    w.assert_pass()
    stats = _check_done(d, processes=1)
    assert stats["pages_fault"] + stats["pages_prefetch"] > 4000, stats
    assert src.proc.wait(60) == 0, src.log()[-3000:]
    assert "TLS" in d.log() and "memory keeper" in src.log()


def test_dirtier_remote_every_page_by_fault(workdir, workloads, daemons, dumps, pki):
    w = _start("dirtier", workdir, workloads)
    time.sleep(0.5)
    src, d = _lazy_remote(w, workdir, daemons, dumps, pki, "--no-prefetch")
    time.sleep(1)
    w.assert_pass()
    stats = _check_done(d)
    assert stats["pages_fault"] > 0 and stats["pages_prefetch"] == 0, stats


@pytest.mark.parametrize("reconnect", ["0", "2"])
def test_lost_source_kills_the_process(workdir, workloads, daemons, dumps, pki, reconnect):
    """The source dies while pages are missing: the restored process must
    not run on with wrong memory; once the daemon has tried to connect again
    for --reconnect-timeout (or at once with 0) it is killed and the daemon
    says why."""
    w = _start("lazymem", workdir, workloads, "16")
    src, d = _lazy_remote(w, workdir, daemons, dumps, pki, "--no-prefetch",
                          "--reconnect-timeout", reconnect)
    src.kill()                                      # SIGKILL: the source host is gone
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGTERM)                  # its check touches every page
    end = time.monotonic() + 30
    status = None
    while time.monotonic() < end:
        pid, st = os.waitpid(w.pid, os.WNOHANG)
        if pid == w.pid:
            status = st
            break
        time.sleep(0.02)
    w.reaped = True
    assert status is not None, "the restored process still runs without its page source"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
        f"status {status:#x}:\n{w.log()}"
    assert "PASS" not in w.log()
    assert time.monotonic() - t0 >= float(reconnect)
    rc, _, err = d.finish()
    assert rc == 1
    assert "page source" in err and f"killed pid {w.pid}" in err, err
    if reconnect != "0":
        assert "not back after 2 s" in err, err


def test_restore_without_daemon_leaves_nothing(workdir, workloads):
    w = _start("counter", workdir, workloads)
    images = os.path.join(workdir, "img")
    w.dump(images)
    p = migrate("restore", "-D", images, "-d", "--lazy-pages", "-v4", "-o", "restore.log")
    assert p.returncode == 1
    assert "lazy-pages daemon" in p.stderr + open(os.path.join(images, "restore.log")).read()
    reap_pids([w.pid], 5)
    assert not alive(w.pid)
    w.reaped = True


def _memhog_pre_dumped_then_dirtied(workdir: str, workloads: list) -> tuple[Workload, str]:
    """memhog 32, pre-dumped to WORKDIR/1, then 1% of its pages rewritten:
    (the workload, the pre-dump's directory)."""
    w = _start("memhog", workdir, workloads, "32")
    pre = os.path.join(workdir, "1")
    p = migrate("pre-dump", "-t", str(w.pid), "-D", pre, "-v4", "-o", "pre.log")
    assert p.returncode == 0, p.stderr
    os.kill(w.pid, signal.SIGUSR1)               # memhog rewrites 1% of its pages
    end = time.monotonic() + 30
    while "DIRTIED" not in w.log():
        assert time.monotonic() < end, w.log()
        time.sleep(0.02)
    return w, pre


def test_pre_copy_pages_are_never_fetched_again(workdir, workloads, daemons, dumps, pki):
    """pre-dump, 1% of the pages rewritten, dump --lazy-pages on top of it:
    the daemon takes what the pre-dump holds from the local chain and GETs
    only the pages written since."""
    w, pre = _memhog_pre_dumped_then_dirtied(workdir, workloads)
    images = os.path.join(workdir, "2")
    port = _free_port()
    src = LazyDump(w, images, port, pki, "--prev-images-dir", "../1")
    dumps.append(src)
    d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port", str(port), *pki)
    daemons.append(d)
    w.restore(images, "--lazy-pages")
    w.assert_pass()
    stats = _check_done(d)
    assert 0 < stats["pages_remote"] <= 200, stats        # 81 pages rewritten
    assert stats["pages_local"] >= 8000, stats
    assert src.proc.wait(60) == 0, src.log()[-3000:]


def test_lazy_source_ends_on_done_not_on_connections_closing(workdir, workloads, daemons,
                                                             dumps, pki):
    """The frozen source holds the only copy of the pages not taken yet: it
    ends when the daemon says DONE, not when connections close.  Two
    connections that are granted CAP_DONE and then dropped (as an early
    connection that failed and was made again) leave it serving; the real
    daemon then takes every page, and its DONE ends the dump (exit 0)."""
    import asyncio

    from migrate.lazypages.source import RemoteSource
    from migrate.pageserver import protocol as P
    from migrate.pageserver import tls

    w = _start("memhog", workdir, workloads, "16")
    images = os.path.join(workdir, "img")
    port = _free_port()
    src = LazyDump(w, images, port, pki)
    dumps.append(src)
    ctx = tls.client_context(*(pki[i] for i in (1, 3, 5)))

    async def connect_and_drop() -> int:
        rs = RemoteSource(TLS_HOST, port, os.path.basename(images), ctx)
        await rs.prefetch.open()
        caps = rs.prefetch.caps
        rs.prefetch.writer.transport.abort()     # no DONE, no close_notify
        return caps
    for _ in range(2):
        assert asyncio.run(connect_and_drop()) & P.CAP_DONE
    time.sleep(1)
    assert src.proc.poll() is None, f"the source ended without DONE:\n{src.log()[-2000:]}"
    d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port", str(port), *pki)
    daemons.append(d)
    w.restore(images, "--lazy-pages")
    _check_done(d)
    assert src.proc.wait(60) == 0, src.log()[-3000:]
    assert "DONE" in src.log()
    w.assert_pass()


def test_corrupt_image_is_refused_before_anything_runs(workdir, workloads):
    """A page file that fails its checksum: the daemon refuses to start, so
    the restore cannot hand its uffd over and leaves nothing running."""
    w = _start("memhog", workdir, workloads, "8")
    images = os.path.join(workdir, "img")
    w.dump(images)
    path = os.path.join(images, f"pages-{w.pid}.img")
    with open(path, "r+b") as f:
        f.seek(4096 + 1000 * 4096 + 8)
        f.write(b"\xff" * 8)
    p = subprocess.run([sys.executable, "-m", "migrate", "lazy-pages", "-D", images],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "checksum" in p.stderr, p.stderr
    p = migrate("restore", "-D", images, "-d", "--lazy-pages")
    assert p.returncode == 1 and "lazy-pages daemon" in p.stderr, p.stderr
    reap_pids([w.pid], 5)
    assert not alive(w.pid)
    w.reaped = True


class _FlipProxy:
    """A TCP relay that flips one byte of the first page the server sends
    on each connection (WELCOME is 36 bytes, then PAGE_DATA: an 8-byte
    header, 32 bytes of fields, the data).  ``stall``: instead, nothing
    the server sends after its WELCOME is passed on (a source that stopped
    answering while the connection stays up)."""

    WELCOME = 8 + 28
    FLIP_AT = WELCOME + 8 + 32 + 100

    def __init__(self, target_port: int, stall: bool = False) -> None:
        import threading
        self.target = target_port
        self.stall = stall
        self.lsock = socket.socket()
        self.lsock.bind((TLS_HOST, 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading
        while not self.stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            s = socket.create_connection((TLS_HOST, self.target))
            threading.Thread(target=self._pipe, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, True), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket, flip: bool) -> None:
        off = 0
        try:
            while True:
                data = bytearray(a.recv(65536))
                if not data:
                    break
                if flip and self.stall:
                    data = data[:max(0, self.WELCOME - off)]
                elif flip and off <= self.FLIP_AT < off + len(data):
                    data[self.FLIP_AT - off] ^= 0x01
                off += len(data)
                if data:
                    b.sendall(data)
        except OSError:
            pass
        finally:
            for x in (a, b):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop = True
        self.lsock.close()


class _CutProxy:
    """A TCP relay whose ``cut(seconds)`` resets every connection it relays
    and, for that long, resets the new ones too (a source host whose
    connections were torn down, that takes new ones again later)."""

    def __init__(self, target_port: int) -> None:
        import threading
        self.target = target_port
        self.lsock = socket.socket()
        self.lsock.bind((TLS_HOST, 0))
        self.lsock.listen(8)
        self.port = self.lsock.getsockname()[1]
        self.refuse_until = 0.0
        self.live: list[socket.socket] = []
        self.accepted = 0
        self.mu = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @staticmethod
    def _reset(x: socket.socket) -> None:
        import struct
        try:
            x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            x.shutdown(socket.SHUT_RDWR)     # (wakes the relay's recv on it)
        except OSError:
            pass
        x.close()

    def _accept(self) -> None:
        import threading
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            if time.monotonic() < self.refuse_until:
                self._reset(c)
                continue
            s = socket.create_connection((TLS_HOST, self.target))
            with self.mu:
                self.live += [c, s]
                self.accepted += 1
            threading.Thread(target=self._pipe, args=(c, s), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def cut(self, seconds: float) -> None:
        self.refuse_until = time.monotonic() + seconds
        with self.mu:
            live, self.live = self.live, []
        for x in live:
            self._reset(x)

    def close(self) -> None:
        self.lsock.close()
        self.cut(0)


@pytest.mark.parametrize("prefetch", [False, True], ids=["faults-only", "prefetch"])
def test_connections_to_the_source_reset_then_back(workdir, workloads, daemons, dumps, pki,
                                                   prefetch):
    """Post-copy, the connections to the source are reset while the process
    faults its pages in (or the prefetch brings them), and new ones refused
    for a second: the daemon holds the faults and connects again (QEMU's
    post-copy recovery); every page then comes, the process says PASS, and
    the source ends on DONE."""
    w = _start("memhog", workdir, workloads, "64")
    images = os.path.join(workdir, "img")
    port = _free_port()
    src = LazyDump(w, images, port, pki)
    dumps.append(src)
    proxy = _CutProxy(port)
    try:
        d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port", str(proxy.port),
                   *([] if prefetch else ["--no-prefetch"]), *pki)
        daemons.append(d)
        w.restore(images, "--lazy-pages")
        proxy.cut(1.0)                           # idle: the prefetch lane sees it
        end = time.monotonic() + 30
        while "the source is back" not in d.log():
            assert time.monotonic() < end, d.log()[-3000:]
            time.sleep(0.05)
        os.kill(w.pid, signal.SIGTERM)           # its check faults every page in
        time.sleep(0.3)
        proxy.cut(1.0)                           # faults waiting on the fault lane
        w.assert_pass()
        stats = _check_done(d)
    finally:
        proxy.close()
    # (with prefetch, every page may be in before the second cut)
    n = 1 if prefetch else 2
    assert stats["recoveries"] >= n and stats["recovery_s"] >= n * 0.8, stats
    assert proxy.accepted >= 2 * (n + 1), proxy.accepted   # two lanes each time
    assert src.proc.wait(60) == 0, src.log()[-3000:]


def test_corrupt_page_in_flight_kills_the_process(workdir, workloads, daemons, dumps):
    """A page whose xxh3-128 does not match (flipped on the way): the
    restored process is killed rather than run on with it."""
    w = _start("lazymem", workdir, workloads, "16")
    images = os.path.join(workdir, "img")
    port = _free_port()
    src = LazyDump(w, images, port, ["--no-tls"])
    dumps.append(src)
    proxy = _FlipProxy(port)
    try:
        d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port",
                   str(proxy.port), "--no-tls", "--no-prefetch")
        daemons.append(d)
        p = migrate("restore", "-D", images, "-d", "--lazy-pages")
        os.kill(w.pid, signal.SIGTERM)
        rc, _, err = d.finish()
    finally:
        proxy.close()
    assert rc == 1 and "checksum mismatch" in err and f"killed pid {w.pid}" in err, \
        f"{err}\n{p.stderr}"
    reap_pids([w.pid], 10)
    assert not alive(w.pid) and "PASS" not in w.log()
    w.reaped = True


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "faults-only"])
def test_tree_of_processes_local(workdir, workloads, daemons, prefetch):
    """Every process of a tree (20 processes, 3 threads each) is handed
    over; the daemon serves them all and ends after the last."""
    w = _start("forest", workdir, workloads, "20", "3")
    _, d = _lazy_local(w, workdir, daemons, *([] if prefetch else ["--no-prefetch"]))
    time.sleep(0.5)
    w.assert_pass()
    _check_done(d, processes=20)


def test_tree_sessions_zombies_shared_memory_local(workdir, workloads, daemons):
    """`tree`: sessions, groups, zombies, a stopped child, pipes, shared
    anonymous and memfd memory (not lazy) next to lazy private memory."""
    w = _start("tree", workdir, workloads)
    _, d = _lazy_local(w, workdir, daemons, "--no-prefetch")
    w.assert_pass()
    _check_done(d)


def test_daemon_stopped_while_a_fault_waits_on_a_silent_source(workdir, workloads, daemons,
                                                              dumps):
    """The source's connection stays up but its answers never come: the
    fault thread waits on the fault lane.  SIGTERM to the daemon still ends
    it (the lane is shut down under the waiting thread) and the process
    that waits on its page is killed, not left to run on with zero pages."""
    w = _start("lazymem", workdir, workloads, "16")
    images = os.path.join(workdir, "img")
    port = _free_port()
    src = LazyDump(w, images, port, ["--no-tls"])
    dumps.append(src)
    proxy = _FlipProxy(port, stall=True)
    try:
        d = Daemon(images, "--page-server", "--address", TLS_HOST, "--port",
                   str(proxy.port), "--no-tls", "--no-prefetch")
        daemons.append(d)
        p = migrate("restore", "-D", images, "-d", "--lazy-pages")
        assert p.returncode == 0, p.stderr
        os.kill(w.pid, signal.SIGTERM)          # its check faults on its first page
        end = time.monotonic() + 30
        while "GET" not in d.log() and "pages to supply" not in d.log():
            assert time.monotonic() < end, d.log()
            time.sleep(0.05)
        time.sleep(0.5)
        assert alive(w.pid) and "PASS" not in w.log()
        d.proc.send_signal(signal.SIGTERM)
        rc, _, err = d.finish(timeout=30)
    finally:
        proxy.close()
    assert rc == 1 and "SIGTERM" in err and f"killed pid {w.pid}" in err, \
        f"{rc}\n{err}\n{d.log()[-3000:]}"
    reap_pids([w.pid], 10)
    assert not alive(w.pid) and "PASS" not in w.log()
    w.reaped = True


def _map_matches_memory(pid: int, runs: list, lazy: list, pre: str) -> None:
    """The runs (vaddr, nr_pages, kind) of a post-copy stop's map, the
    process frozen: in order, covering the lazy area; every ZERO page reads
    as zeros, every LOCAL page is in the pre-dump chain ``pre`` as it is in
    the process now."""
    from migrate.images import pagemap
    from migrate.kernel import memory as kmem
    from migrate.lazypages.source import LocalSource
    from migrate.source import dump as dumpmod

    covered = pagemap.normalize((a, a + n * 4096) for a, n, _ in runs)
    assert covered == pagemap.normalize(lazy), "the map does not cover the lazy area"
    assert all(a + n * 4096 <= b for (a, n, _), (b, _, _) in zip(runs, runs[1:]))
    chain = LocalSource(pre)
    try:
        with kmem.ProcMem(pid) as mem:
            for a, n, kind in runs:
                now = mem.read(a, n * 4096)
                if kind == dumpmod.MAP_ZERO:
                    assert now == bytes(n * 4096), f"zero run {a:#x} holds data"
                elif kind == dumpmod.MAP_LOCAL:
                    got = b"".join(bytes(memoryview(buf)[off:off + ln])
                                   for _, buf, off, ln in chain.pieces(pid, a, a + n * 4096))
                    assert got == now, f"local run {a:#x} ({n} pages) changed since the pre-dump"
    finally:
        chain.close()


def _post_copy_stop_rolled_back(pid: int, workdir: str, lazy: list, maps: list,
                                check) -> None:
    """A post-copy stop of ``pid`` on top of the pre-dump WORKDIR/1 (as a
    migration's worker makes it: dump.defer_lazy), ``check(stats)`` called
    with the tree frozen; it raises "rolled back by the test", and the
    process runs on."""
    from migrate.source import dump as dumpmod

    opts = dumpmod.DumpOptions(pid=pid, images_dir=os.path.join(workdir, "2"),
                               prev_images_dir="../1", track_mem=True, leave_lazy=True,
                               lazy_out=lazy, defer_lazy=True, lazy_map_out=maps,
                               before_release=check)
    with pytest.raises(RuntimeError, match="rolled back by the test"):
        dumpmod.dump(opts)


def test_post_copy_stop_map_matches_the_frozen_process(workdir, workloads):
    """A post-copy stop (dump.defer_lazy, as a migration's worker does it)
    leaves the root's lazy area unscanned and whole in the image; the map
    computed afterwards, the process still frozen, must be exact: every
    LOCAL page is in the pre-dump image as it is in the process now, every
    ZERO page reads as zeros, the pages written since the pre-dump are
    REMOTE, and together they cover the area.  Then the stop is rolled back:
    the process runs on as before (its own check says PASS)."""
    from migrate import errors
    from migrate.images import ImageDir, pagemap
    from migrate.lazypages.source import LocalSource
    from migrate.source import dump as dumpmod

    w, pre = _memhog_pre_dumped_then_dirtied(workdir, workloads)
    lazy: list = []
    maps: list = []
    seen: dict = {}

    def by_kind(runs):
        return {k: pagemap.normalize((a, a + n * 4096) for a, n, kk in runs if kk == k)
                for k in (dumpmod.MAP_REMOTE, dumpmod.MAP_LOCAL, dumpmod.MAP_ZERO)}

    def check(stats) -> None:
        m = maps[0]
        assert m.pre is not None
        runs = m.compute()                # what changed since the pre-scan only
        seen["runs"] = runs
        # the whole walk (as when the VMAs changed since the pre-scan) agrees
        premap = m.pre

        class NoFit:
            written = premap.written

            def fits(self, *args):
                return False
        m.pre = NoFit()
        assert by_kind(m.compute()) == by_kind(runs)
        m.pre = premap
        _map_matches_memory(w.pid, runs, lazy, pre)
        # the image flags the whole area lazy and says its map comes later
        rec = ImageDir.open(os.path.join(workdir, "2")).read_image(f"pagemap-{w.pid}.img")
        seen["head"] = rec[0]
        seen["flagged"] = pagemap.ranges_of(rec[1:], pagemap.PE_LAZY)
        raise RuntimeError("rolled back by the test")

    _post_copy_stop_rolled_back(w.pid, workdir, lazy, maps, check)
    runs = seen["runs"]
    remote = sum(n for _, n, k in runs if k == dumpmod.MAP_REMOTE)
    local = sum(n for _, n, k in runs if k == dumpmod.MAP_LOCAL)
    dirtied = int(w.log().split("DIRTIED")[1].split()[0])
    assert dirtied <= remote <= dirtied + 200, (dirtied, remote)   # + stack, heap, ...
    assert local >= 8000, local
    assert seen["head"].lazy_map and seen["flagged"] == pagemap.normalize(lazy)
    w.assert_pass()
    # A map that says LOCAL where the daemon's chain stores nothing is
    # refused (never zeros instead); one within it is taken.
    from migrate.lazypages.source import RemoteSource
    src = RemoteSource(TLS_HOST, 1, "s", None, local=LocalSource(pre))
    src.expect_map(w.pid)
    assert src.split(w.pid, 0x10000, 0x12000) == ([], [(0x10000, 0x12000)])
    held = src.local.held(w.pid)
    with pytest.raises(errors.ImageError, match="does not store them"):
        src.set_local(w.pid, [(held[-1][1], held[-1][1] + 4096)])
    a = held[0][0]
    src.set_local(w.pid, [(a, a + 8192)])
    assert src.split(w.pid, a, a + 12288) == ([(a, a + 8192)], [(a + 8192, a + 12288)])
    src.local.close()


def test_post_copy_stop_map_when_memory_moved_after_the_pre_scan(workdir, workloads,
                                                                  monkeypatch):
    """Between the pre-scan (just before the freeze) and the freeze, the
    process moves a data area with mremap onto an area the pre-scan saw
    zero, maps a fresh zero area where it was, and maps a new page: the map
    must still be exact (the moved pages are not taken for zero, nor for
    the pre-dump's), and the memory that did not move stays LOCAL."""
    from migrate.source import dump as dumpmod

    pages = 1024
    w = _start("mover", workdir, workloads, str(pages), "signal")
    pre = os.path.join(workdir, "1")
    p = migrate("pre-dump", "-t", str(w.pid), "-D", pre, "-v4", "-o", "pre.log")
    assert p.returncode == 0, p.stderr
    lazy: list = []
    maps: list = []
    seen: dict = {}
    init = dumpmod.PreMap.__init__

    def pre_scan_then_move(self, *args, **kwargs):
        init(self, *args, **kwargs)
        w.usr1("MOVED", 10)
    monkeypatch.setattr(dumpmod.PreMap, "__init__", pre_scan_then_move)

    def check(stats) -> None:
        m = maps[0]
        runs = m.compute()
        _map_matches_memory(w.pid, runs, lazy, pre)
        seen["local"] = sum(n for _, n, k in runs if k == dumpmod.MAP_LOCAL)
        seen["moved"] = m.pre.key != [(e.start, e.end) for e in m.entries]
        raise RuntimeError("rolled back by the test")

    _post_copy_stop_rolled_back(w.pid, workdir, lazy, maps, check)
    assert seen["moved"], "the lazy VMAs did not change after the pre-scan"
    assert seen["local"] >= pages, seen          # the still area at least
    w.usr1("MOVED", 10)                          # and it moves on, its memory intact
    w.assert_pass()


class _Worker:
    """An orchestrator job runner (worker.py), as an agent drives it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "migrate.orchestrator.worker"],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert json.loads(self.proc.stdout.readline())["event"] == "ready"

    def call(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(30)


def _gone(pid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_worker_standby_daemon_serves_the_restore(workdir, workloads):
    """The lazy-pages daemon a destination's worker forks before the stop
    (``standby``) listens at once; the restore hands it the image and its
    process over without waiting for it, and the process gets every page."""
    w = _start("lazymem", workdir, workloads)
    images = os.path.join(workdir, "img")
    w.dump(images)
    logs = os.path.join(workdir, "logs")
    paths = {"socket": os.path.join(logs, "lazy.sock"), "stats": os.path.join(logs, "fill.json"),
             "log": os.path.join(logs, "lazy-pages.log")}
    wk = _Worker()
    try:
        sb = wk.call({"op": "standby", **paths, "tls": None})
        assert sb["ok"], sb
        res = wk.call({"op": "restore", "images_dir": images, "lazy_pages": True,
                       "lazy": paths, "log": os.path.join(logs, "restore.log"), "level": 10})
        assert res["ok"] and res["lazy_daemon"] == sb["pid"], res
    finally:
        wk.close()
    w.assert_pass()
    assert _gone(sb["pid"], 60), "the daemon did not end"
    with open(paths["stats"]) as f:
        stats = json.load(f)
    assert stats["pages_fault"] + stats["pages_prefetch"] > 0, stats
    assert not os.path.exists(paths["socket"])


def test_worker_standby_daemon_goes_with_its_worker(workdir):
    """No restore comes (the migration was aborted, or restores eagerly):
    the standby daemon leaves with its worker, its socket removed."""
    logs = os.path.join(workdir, "logs")
    paths = {"socket": os.path.join(logs, "lazy.sock"), "stats": os.path.join(logs, "fill.json"),
             "log": os.path.join(logs, "lazy-pages.log")}
    wk = _Worker()
    sb = wk.call({"op": "standby", **paths, "tls": None})
    assert sb["ok"], sb
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(paths["socket"])          # listening already
    finally:
        s.close()
    assert wk.close() == 0
    assert _gone(sb["pid"]), "the standby daemon outlived its worker"
    assert not os.path.exists(paths["socket"])
