"""Real programs nobody here wrote, dumped and restored mid-work, then checked
by a client."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.integration.harness import Workload, alive

NKEYS = 100_000


def _resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Redis:
    """A minimal RESP client over the unix socket."""

    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(path)
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b":"):
            return rest
        if kind == b"-":
            raise AssertionError(f"redis error: {rest!r}")
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise AssertionError(f"bad reply {line!r}")

    def call(self, *args: bytes):
        self.s.sendall(_resp(*args))
        return self.reply()

    def close(self) -> None:
        self.s.close()


def _value(i: int) -> bytes:
    return b"value-%d-%x" % (i, i * 2654435761 % (1 << 32))


def test_redis_100k_keys(workdir, workloads):
    sock = os.path.join(workdir, "redis.sock")
    w = Workload(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                  "--appendonly", "no", "--dir", workdir], workdir, "redis")
    workloads.append(w)
    for _ in range(500):
        if os.path.exists(sock):
            break
        time.sleep(0.02)
    r = Redis(sock)
    for base in range(0, NKEYS, 1000):
        args = [b"MSET"]
        for i in range(base, base + 1000):
            args += [b"key:%d" % i, _value(i)]
        assert r.call(*args) == b"OK"
    assert r.call(b"DBSIZE") == b"%d" % NKEYS
    r.close()
    time.sleep(0.2)              # the server sees the client go
    for i in range(2):
        images = os.path.join(workdir, f"img-{i}")
        w.dump(images)
        assert not alive(w.pid)
        w.restore(images)
    r = Redis(sock)
    assert r.call(b"DBSIZE") == b"%d" % NKEYS
    for base in range(0, NKEYS, 1000):
        keys = [b"key:%d" % i for i in range(base, base + 1000)]
        got = r.call(b"MGET", *keys)
        want = [_value(i) for i in range(base, base + 1000)]
        assert got == want, f"keys {base}..{base + 999} differ after restore"
    assert r.call(b"SET", b"after", b"restore") == b"OK"
    assert r.call(b"GET", b"after") == b"restore"
    r.close()


def test_aiohttp_server_with_client(workdir, workloads):
    """An aiohttp server on a unix socket and its client (a child process with
    a keep-alive connection, requesting all the time), dumped and restored as
    one tree mid-work; the connection goes on and every answer is right."""
    w = Workload.program("httpd.py", workdir)
    workloads.append(w)
    w.wait_ready()
    for i in range(3):
        images = os.path.join(workdir, f"img-{i}")
        w.dump(images)
        w.restore(images)
    w.assert_pass()
