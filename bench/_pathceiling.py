"""The ceiling of the page-server's whole path with none of migrate's code
in it (bench/pageserver.py runs it next to our figures).

``send``: reads the task's largest writable mapping with process_vm_readv,
8 MiB at a time on two threads (as the dump does), and sends each window
with a 16-byte header (offset, length) on a free stream.  ``recv``: accepts
the streams, receives each window (``recv_into`` an 8 MiB buffer, or
``splice`` socket -> pipe -> file, plaintext only), writes it at its offset
of one new file in the given directory, fsyncs and answers one byte on
prints when that was done (CLOCK_MONOTONIC; the sender prints when it
began).  No hashing, no framing beyond the header, no asyncio: what any
implementation of "take these pages over TCP (TLS) into a file" must pay.
Both print their own CPU time (user, sys) as JSON on stdout.

    python3 bench/_pathceiling.py recv DIR STREAMS MODE [CACERT CERT KEY]
    python3 bench/_pathceiling.py send PID PORT STREAMS [CACERT CERT KEY]
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import queue
import resource
import socket
import struct
import sys
import threading
import time

WINDOW = 8 << 20
HDR = struct.Struct("<QQ")
F_SETPIPE_SZ = 1031


def _ctx(server: bool, cacert: str, cert: str, key: str):
    import ssl
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from migrate.pageserver import tls     # the same settings as ours
    if server:
        return tls.server_context(cacert, cert, key)
    ctx = tls.client_context(cacert, cert, key)
    ctx.check_hostname = False
    return ctx


def _cpu() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": round(r.ru_utime, 3), "sys_s": round(r.ru_stime, 3)}


def _exact(sock, view) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n


def recv(directory: str, streams: int, mode: str, tls_files) -> None:
    ctx = _ctx(True, *tls_files) if tls_files else None
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    print(ls.getsockname()[1], flush=True)
    conns = []
    for _ in range(streams):
        c, _ = ls.accept()
        conns.append(ctx.wrap_socket(c, server_side=True) if ctx else c)
    path = os.path.join(directory, "ceiling.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    total = [0]

    def one(c) -> None:
        hdr = bytearray(HDR.size)
        buf = memoryview(bytearray(WINDOW))
        if mode == "splice":
            r, w = os.pipe()
            fcntl.fcntl(r, F_SETPIPE_SZ, 1 << 20)
        while True:
            try:
                _exact(c, memoryview(hdr))
            except EOFError:
                break
            off, n = HDR.unpack(hdr)
            if mode == "splice":
                done = 0
                while done < n:
                    k = os.splice(c.fileno(), w, min(n - done, 1 << 20))
                    if not k:
                        raise EOFError
                    while k:
                        m = os.splice(r, fd, k, offset_dst=off + done)
                        k -= m
                        done += m
            else:
                _exact(c, buf[:n])
                done = 0
                while done < n:
                    done += os.pwrite(fd, buf[done:n], off + done)
            total[0] += n

    th = [threading.Thread(target=one, args=(c,)) for c in conns]
    for t in th:
        t.start()
    for t in th:
        t.join()
    os.fsync(fd)
    end = time.monotonic()
    os.close(fd)
    for c in conns:
        c.close()
    os.unlink(path)
    print(json.dumps({"bytes": total[0], "end": end, **_cpu()}), flush=True)


def _largest_rw(pid: int) -> tuple[int, int]:
    best = (0, 0)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            a, b = (int(x, 16) for x in line.split()[0].split("-"))
            if line.split()[1].startswith("rw") and b - a > best[1] - best[0]:
                best = (a, b)
    return best


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def send(pid: int, port: int, streams: int, tls_files) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    ctx = _ctx(False, *tls_files) if tls_files else None
    lo, hi = _largest_rw(pid)
    free: queue.Queue = queue.Queue()
    socks = []
    for _ in range(streams):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(s, server_hostname="localhost") if ctx else s
        socks.append(s)
        free.put(s)
    windows = iter(range(lo, hi, WINDOW))
    lock = threading.Lock()

    def worker() -> None:
        buf = (ctypes.c_char * WINDOW)()
        view = memoryview(buf).cast("B")
        local, remote = _iovec(ctypes.addressof(buf), 0), _iovec(0, 0)
        while True:
            with lock:
                addr = next(windows, None)
            if addr is None:
                return
            n = min(WINDOW, hi - addr)
            local.len, remote.base, remote.len = n, addr, n
            got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote),
                                        1, 0)
            if got != n:
                raise OSError(ctypes.get_errno(), f"process_vm_readv {got} of {n}")
            s = free.get()
            try:
                s.sendall(HDR.pack(addr - lo, n))
                s.sendall(view[:n])
            finally:
                free.put(s)

    t0 = time.monotonic()
    th = [threading.Thread(target=worker) for _ in range(2)]
    for t in th:
        t.start()
    for t in th:
        t.join()
    # End every stream with a FIN (no close_notify: the receiver takes a
    # ragged EOF between windows as the end), then wait for the receiver to
    # close: closing with unread bytes (TLS session tickets) would reset.
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    for s in socks:
        while s.recv(1 << 16):
            pass
        s.close()
    print(json.dumps({"bytes": hi - lo, "start": t0, **_cpu()}), flush=True)


if __name__ == "__main__":
    cmd, *a = sys.argv[1:]
    if cmd == "recv":
        recv(a[0], int(a[1]), a[2], a[3:6])
    else:
        send(int(a[0]), int(a[1]), int(a[2]), a[3:6])
