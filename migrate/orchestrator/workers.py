"""The agent's side of `worker.py`: start job runners, keep one warm, talk
JSON lines with them."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from migrate import errors

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
LINE_LIMIT = 1 << 24


class WorkerLost(errors.MigrateError):
    """A job runner died or broke the protocol."""


def _env() -> dict:
    # The worker imports this very package, whatever the install.
    top = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (top, env.get("PYTHONPATH")) if x)
    return env


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    @classmethod
    async def start(cls) -> "Worker":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "migrate.orchestrator.worker", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=_env(), cwd="/", limit=LINE_LIMIT,
            start_new_session=True)
        w = cls(proc)
        try:
            hello = await w.recv(START_TIMEOUT_S)
        except BaseException:
            await w.close()
            raise
        if hello.get("event") != "ready":
            await w.close()
            raise WorkerLost(f"worker {w.pid}: unexpected first line {hello!r}")
        return w

    async def send(self, msg: dict) -> None:
        if self.proc.stdin is None or self.proc.stdin.is_closing():
            raise WorkerLost(f"worker {self.pid}: gone")
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise WorkerLost(f"worker {self.pid}: exited (status "
                             f"{self.proc.returncode})") from None

    async def recv(self, timeout: float | None = None) -> dict:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except asyncio.TimeoutError:
            raise WorkerLost(f"worker {self.pid}: no answer in {timeout:.0f} s") from None
        if not line:
            rc = await self.proc.wait()
            raise WorkerLost(f"worker {self.pid}: exited (status {rc}) in the middle of "
                             "a job")
        try:
            return json.loads(line)
        except ValueError:
            raise WorkerLost(f"worker {self.pid}: not a JSON line: {line[:80]!r}") from None

    async def call(self, job: dict, timeout: float | None = None) -> dict:
        await self.send(job)
        return await self.recv(timeout)

    async def close(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("worker %d: still running %.0f s after its input closed, "
                            "killing it", self.pid, timeout)
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self.proc.wait()


class Pool:
    """One warm worker ready; ``take()`` hands it out and starts the next."""

    def __init__(self) -> None:
        self._next: asyncio.Task | None = None

    def _spawn(self) -> None:
        self._next = asyncio.ensure_future(Worker.start())

    async def take(self) -> Worker:
        if self._next is None:
            self._spawn()
        t = self._next
        self._spawn()
        try:
            return await t
        except WorkerLost:
            return await Worker.start()

    async def close(self) -> None:
        if self._next is not None:
            t, self._next = self._next, None
            try:
                w = await t
            except (WorkerLost, OSError):
                return
            await w.close()
