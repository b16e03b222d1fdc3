"""The tracking holder: keeps a task's userfaultfd open between commands.

A UFFD-WP registration lives only while some fd of its userfaultfd is open.
The first pre-dump starts this small process with the stolen uffd; later
commands find it by an abstract unix socket named after the task's pid and
start time, and get a copy of the fd with SCM_RIGHTS.  It exits when the task
exits (its pidfd becomes readable), when asked (``STOP``), or after an idle
timeout; then the registration is gone and the next dump copies everything.

    python -m migrate.source.holder PID START_TIME FD [IDLE_SECONDS]
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 3600.0
MAX_REQUEST = 16


def socket_name(pid: int, start_time: int) -> str:
    return f"\0migrate-tracker/{pid}/{start_time}"


def serve(pid: int, start_time: int, uffd: int, idle: float = IDLE_TIMEOUT) -> None:
    from migrate.kernel import syscalls
    try:
        pidfd = syscalls.pidfd_open(pid)
    except OSError:
        return  # the task is already gone
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(socket_name(pid, start_time))
    except OSError:
        return  # another holder serves this task
    srv.listen(8)
    last = time.monotonic()
    while True:
        left = idle - (time.monotonic() - last)
        if left <= 0:
            log.info("tracker for pid %d: idle for %.0f s, exiting", pid, idle)
            return
        ready, _, _ = select.select([srv, pidfd], [], [], left)
        if pidfd in ready:
            return  # the task exited: nothing left to track
        if srv in ready:
            conn, _ = srv.accept()
            last = time.monotonic()
            with conn:
                conn.settimeout(5)
                try:
                    req = conn.recv(MAX_REQUEST)
                    if req == b"GET":
                        socket.send_fds(conn, [b"OK"], [uffd])
                    elif req == b"STOP":
                        conn.sendall(b"OK")
                        return
                except OSError:
                    continue


def _request(pid: int, start_time: int, what: bytes) -> tuple[bytes, list[int]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(socket_name(pid, start_time))
        s.sendall(what)
        msg, fds, _, _ = socket.recv_fds(s, 16, 1)
        return msg, fds
    finally:
        s.close()


def fetch(pid: int, start_time: int) -> int | None:
    """A copy of the held uffd, or None if no holder serves this task."""
    try:
        msg, fds = _request(pid, start_time, b"GET")
    except OSError:
        return None
    if msg != b"OK" or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        return None
    return fds[0]


def stop(pid: int, start_time: int) -> bool:
    try:
        return _request(pid, start_time, b"STOP")[0] == b"OK"
    except OSError:
        return False


def spawn(pid: int, start_time: int, uffd: int) -> int:
    """Start a holder for ``uffd``; return its pid once it serves."""
    import subprocess
    # The holder imports this very package, wherever it was imported from
    # (an install, a checkout on PYTHONPATH), whatever the cwd.
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (top, env.get("PYTHONPATH")) if x)
    p = subprocess.Popen([sys.executable, "-m", "migrate.source.holder", str(pid),
                          str(start_time), str(uffd)], pass_fds=(uffd,),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True,
                         cwd="/", env=env)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if p.poll() is not None:
            raise OSError(f"tracking holder exited at once (status {p.returncode})")
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(socket_name(pid, start_time))
            s.close()
            return p.pid
        except OSError:
            time.sleep(0.005)
    p.kill()
    raise OSError("tracking holder did not come up in 5 s")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pid, start_time, fd = int(argv[0]), int(argv[1]), int(argv[2])
    idle = float(argv[3]) if len(argv) > 3 else IDLE_TIMEOUT
    serve(pid, start_time, fd, idle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
