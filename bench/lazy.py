#!/usr/bin/env python3
"""Post-copy figures (printed, never asserted).

For an anonymous process of SIZE MiB (1024 by default), warmed up first
(tests/programs/memhog writes every page), image on tmpfs:
- the time from the start of `restore --lazy-pages` to the process running
  (the restore's own restore_us, and the command's wall time), next to a
  full restore's;
- the time until every page is in (prefetch, the process idle), from the
  launch of the restore command, next to the full restore's wall time;
- fault service latency p50/p99 (every page by fault: --no-prefetch, on a
  FAULT_MIB process that then reads all its pages), locally and remotely
  over TLS on loopback (dump --lazy-pages serving GETs);
- the ceiling, measured in the same run: a bare UFFDIO_COPY of one page.

The daemon times a fault from the moment it reads the fault message to the
end of its UFFDIO_COPY: the kernel's side (the fault itself, the wake-up,
the thread running again) is not in it.  memhog, restored, also times its
first read of each page ("as the faulting thread sees it"): that one has
everything.

    python3 bench/lazy.py [--mib 1024] [--fault-mib 64]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from migrate.kernel import syscalls, sysno, userfaultfd  # noqa: E402

BIN = os.path.join(ROOT, "tests", "programs", "bin")
PAGE = 4096


def start(argv: list[str], log: str) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                start_new_session=True)


def wait_for(path: str, text: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if text in open(path).read():
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"no {text!r} in {path}")


def cli(*args: str, stats: bool = True) -> tuple[dict, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "migrate", *args] +
                       (["--display-stats"] if stats else []), cwd=ROOT, capture_output=True,
                       text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"migrate {' '.join(args)} failed: {p.stderr}")
    return (json.loads(p.stdout) if stats else {}), wall


def reap(pid: int, timeout: float = 300) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got, st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            if not os.path.exists(f"/proc/{pid}"):
                return 0
            got = 0
        if got == pid:
            return st
        time.sleep(0.01)
    raise SystemExit(f"pid {pid} did not exit")


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap(pid)


class Daemon:
    def __init__(self, images: str, *args: str) -> None:
        r, w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrate", "lazy-pages", "-D", images, "--display-stats",
             "--status-fd", str(w), "-v2", "-o", "lazy.log", *args], cwd=ROOT, pass_fds=(w,),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(w)
        if os.read(r, 1) != b"\0":
            raise SystemExit(f"lazy-pages did not start: {self.proc.communicate()[1]}")
        os.close(r)

    def finish(self) -> dict:
        out, err = self.proc.communicate(timeout=900)
        if self.proc.returncode:
            raise SystemExit(f"lazy-pages failed: {err}")
        return json.loads(out)


def make_image(tmp: str, name: str, mib: int, *extra: str) -> tuple[str, int]:
    log = os.path.join(tmp, f"{name}.log")
    p = start([os.path.join(BIN, "memhog"), str(mib), *extra], log)
    wait_for(log, "READY")
    images = os.path.join(tmp, name)
    cli("dump", "-t", str(p.pid), "-D", images, stats=False)
    p.wait()
    return images, p.pid


def touch_times(log: str) -> dict:
    """memhog's "TOUCH_US p50 X p99 Y max Z": first reads of its pages, as
    the faulting thread saw them (the kernel's part of a fault included)."""
    for line in open(log):
        if line.startswith("TOUCH_US"):
            w = line.split()
            return {w[i]: float(w[i + 1]) for i in range(1, len(w) - 1, 2)}
    raise SystemExit(f"no TOUCH_US line in {log}")


def bare_copy_latency(n: int = 20000) -> tuple[float, float]:
    """p50/p99 µs of UFFDIO_COPY of one page into a registered missing area."""
    fd = syscalls.call(sysno.userfaultfd, os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        userfaultfd.api(fd, 0)
        area = mmap.mmap(-1, n * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(area))
        userfaultfd.register(fd, addr, n * PAGE, userfaultfd.UFFDIO_REGISTER_MODE_MISSING)
        src = mmap.mmap(-1, PAGE)
        src.write(b"x" * PAGE)
        lat = []
        for i in range(n):
            t = time.perf_counter_ns()
            done, err = userfaultfd.copy(fd, addr + i * PAGE, src, PAGE)
            lat.append((time.perf_counter_ns() - t) / 1000)
            if err:
                raise SystemExit(f"UFFDIO_COPY: errno {err}")
        lat.sort()
        return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]
    finally:
        os.close(fd)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--fault-mib", type=int, default=64)
    a = ap.parse_args()
    syscalls.set_child_subreaper()
    tmp = tempfile.mkdtemp(prefix="bench-lazy-", dir="/dev/shm")
    out: dict = {}
    try:
        images, pid = make_image(tmp, "big", a.mib)
        # A full restore, for comparison.
        st, wall = cli("restore", "-D", images, "-d")
        out["full_restore_ms"] = int(st["restore_us"]) / 1000
        out["full_restore_wall_ms"] = wall * 1000
        kill(pid)
        # Lazy, local, with prefetch: running, then all in.
        d = Daemon(images)
        t0 = time.monotonic()
        st, wall = cli("restore", "-D", images, "-d", "--lazy-pages")
        out["lazy_restore_ms"] = int(st["restore_us"]) / 1000
        out["lazy_restore_wall_ms"] = wall * 1000
        ds = d.finish()
        out["lazy_all_in_wall_ms"] = (ds["done_monotonic"] - t0) * 1000
        out["lazy_local_prefetch"] = ds
        kill(pid)

        # Every page by fault, local then remote (TLS, loopback).
        fimages, fpid = make_image(tmp, "faults", a.fault_mib, "timed")
        d = Daemon(fimages, "--no-prefetch")
        cli("restore", "-D", fimages, "-d", "--lazy-pages")
        os.kill(fpid, signal.SIGTERM)       # memhog reads every page, then exits
        reap(fpid)
        out["fault_local"] = d.finish()
        out["fault_local"]["touch_us"] = touch_times(os.path.join(tmp, "faults.log"))

        pki = os.path.join(tmp, "pki")
        cli("certs", "init", pki, stats=False)
        cli("certs", "issue", pki, "127.0.0.1", stats=False)
        tls = ["--tls-cacert", f"{pki}/cacert.pem", "--tls-cert",
               f"{pki}/127.0.0.1/cert.pem", "--tls-key", f"{pki}/127.0.0.1/private/key.pem"]
        for name, extra in (("fault_remote_tls", ["--no-prefetch"]), ("remote_tls_prefetch", [])):
            mib = a.fault_mib if extra else a.mib
            log = os.path.join(tmp, f"{name}.log")
            p = start([os.path.join(BIN, "memhog"), str(mib), *(["timed"] if extra else [])],
                      log)
            wait_for(log, "READY")
            rimages = os.path.join(tmp, name)
            os.makedirs(rimages)
            port = free_port()
            src = subprocess.Popen([sys.executable, "-m", "migrate", "dump", "-t", str(p.pid),
                                    "-D", rimages, "-v3", "-o", "dump.log", "--lazy-pages",
                                    "--address", "127.0.0.1", "--port", str(port), *tls],
                                   cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            wait_for(os.path.join(rimages, "dump.log"), "lazy-pages: serving")
            p.wait()
            d = Daemon(rimages, "--page-server", "--address", "127.0.0.1", "--port",
                       str(port), *tls, *extra)
            t0 = time.monotonic()
            st, _ = cli("restore", "-D", rimages, "-d", "--lazy-pages")
            if extra:
                os.kill(p.pid, signal.SIGTERM)
                reap(p.pid)
            ds = d.finish()
            ds["restore_ms"] = int(st["restore_us"]) / 1000
            if extra:
                ds["touch_us"] = touch_times(log)
            else:
                ds["all_in_wall_ms"] = (ds["done_monotonic"] - t0) * 1000
                kill(p.pid)
            out[name] = ds
            src.wait(60)

        out["bare_uffdio_copy_p50_us"], out["bare_uffdio_copy_p99_us"] = bare_copy_latency()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    fl, fr = out["fault_local"], out["fault_remote_tls"]
    print(f"process: {a.mib} MiB, warmed up; image on tmpfs; faults on a {a.fault_mib} MiB "
          "process, every page by fault")
    print(f"restore --lazy-pages to running: {out['lazy_restore_ms']:8.1f} ms  "
          f"(command wall {out['lazy_restore_wall_ms']:.0f} ms; target <= 50 ms)")
    print(f"full restore to running:         {out['full_restore_ms']:8.1f} ms  "
          f"(command wall {out['full_restore_wall_ms']:.0f} ms)")
    print(f"every page in (local, prefetch): {out['lazy_all_in_wall_ms']:8.0f} ms from the "
          f"restore command's start; full restore {out['full_restore_wall_ms']:.0f} ms "
          f"(ratio {out['lazy_all_in_wall_ms'] / out['full_restore_wall_ms']:.2f}, "
          "target <= 1.5)")
    print(f"every page in (TLS, prefetch):   {out['remote_tls_prefetch']['all_in_wall_ms']:8.0f}"
          " ms")
    print(f"fault latency local:  p50 {fl['fault_latency_p50_us']:7.1f} us  p99 "
          f"{fl['fault_latency_p99_us']:8.1f} us  ({fl['faults']} faults; target p50 <= 50)")
    print(f"fault latency TLS:    p50 {fr['fault_latency_p50_us']:7.1f} us  p99 "
          f"{fr['fault_latency_p99_us']:8.1f} us  ({fr['faults']} faults; target p50 <= 250)")
    print(f"as the faulting thread sees it (memhog's first read of each page): local p50 "
          f"{fl['touch_us']['p50']:.1f} us p99 {fl['touch_us']['p99']:.1f} us; TLS p50 "
          f"{fr['touch_us']['p50']:.1f} us p99 {fr['touch_us']['p99']:.1f} us")
    print(f"blocktime local: total {fl['blocktime_total_us'] / 1000:.0f} ms, max "
          f"{fl['blocktime_max_us'] / 1000:.1f} ms; TLS: total "
          f"{fr['blocktime_total_us'] / 1000:.0f} ms, max {fr['blocktime_max_us'] / 1000:.1f} ms")
    print(f"ceiling: bare UFFDIO_COPY of one page p50 {out['bare_uffdio_copy_p50_us']:.1f} us, "
          f"p99 {out['bare_uffdio_copy_p99_us']:.1f} us")
    print(json.dumps(out, indent=1, default=str), file=sys.stderr)


if __name__ == "__main__":
    main()
