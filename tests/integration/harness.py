"""Run real workloads, dump and restore them with the real `migrate` command.

The test process is a subreaper (PR_SET_CHILD_SUBREAPER), so a restored
process, whose parent `migrate restore -d` exits, is reparented to us and we
reap it ourselves.  Everything started here is killed by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAMS = os.path.join(ROOT, "tests", "programs")
BIN = os.path.join(PROGRAMS, "bin")


# Bytecode caches (git-ignored) spare every `migrate` command ~0.4 s of compiling.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def cycles() -> int:
    return int(os.environ.get("MIGRATE_CYCLES", "20"))


def migrate(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "migrate", *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"migrate {' '.join(args)} failed ({p.returncode}):\n"
                             f"{p.stdout}\n{p.stderr}")
    return p


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (by /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except FileNotFoundError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def reap_pids(pids: list[int], timeout: float = 10) -> None:
    """Wait for processes that die reparented to us (we are a subreaper)."""
    end = time.monotonic() + timeout
    left = set(pids)
    while left and time.monotonic() < end:
        for p in list(left):
            try:
                if os.waitpid(p, os.WNOHANG)[0] == p:
                    left.discard(p)
            except ChildProcessError:
                if not os.path.exists(f"/proc/{p}"):
                    left.discard(p)
        if left:
            time.sleep(0.01)


class Workload:
    """A self-checking program: READY after set-up, PASS/FAIL after SIGTERM."""

    def __init__(self, argv: list[str], workdir: str, name: str = "") -> None:
        self.name = name or os.path.basename(argv[0])
        self.log_path = os.path.join(workdir, f"{self.name}.log")
        self.workdir = workdir
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                     stderr=logf, cwd=workdir, start_new_session=True)
        logf.close()
        self.pid = self.proc.pid
        self.ours = True      # still the Popen child (not yet restored)
        self.reaped = False

    @classmethod
    def program(cls, name: str, workdir: str, *args: str) -> "Workload":
        if name.endswith(".py"):
            return cls([sys.executable, os.path.join(PROGRAMS, name), *args], workdir,
                       name[:-3])
        return cls([os.path.join(BIN, name), *args], workdir, name)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if "READY" in self.log():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited before READY:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no READY in {timeout} s:\n{self.log()}")

    def reap_dumped(self, timeout: float = 10) -> None:
        """After a dump without --leave-running the process is killed: reap it."""
        if self.ours:
            self.proc.wait(timeout=timeout)
            self.ours = False
        else:
            _waitpid_timeout(self.pid, timeout)

    def dump(self, images: str, *extra: str) -> subprocess.CompletedProcess:
        below = descendants(self.pid)
        p = migrate("dump", "-t", str(self.pid), "-D", images, "-v4", "-o", "dump.log",
                    *extra)
        if p.returncode != 0:
            raise AssertionError(f"dump of {self.name} failed:\n{p.stderr}\n"
                                 f"{_tail(os.path.join(images, 'dump.log'))}")
        if not {"--leave-running", "-R", "--leave-stopped", "-s"} & set(extra):
            self.reap_dumped()
            reap_pids(below)    # the tree's other processes, orphaned to us
        return p

    def restore(self, images: str, *extra: str) -> subprocess.CompletedProcess:
        p = migrate("restore", "-D", images, "-d", "-v4", "-o", "restore.log", *extra)
        if p.returncode != 0:
            raise AssertionError(f"restore of {self.name} failed:\n{p.stderr}\n"
                                 f"{_tail(os.path.join(images, 'restore.log'))}")
        if not alive(self.pid):
            raise AssertionError(f"{self.name} (pid {self.pid}) is not running after "
                                 f"restore:\n{self.log()}")
        return p

    def stop(self, timeout: float = 60) -> tuple[int, str]:
        """SIGTERM, wait for the verdict: (exit status, log)."""
        os.kill(self.pid, signal.SIGTERM)
        if self.ours:
            status = self.proc.wait(timeout=timeout)
        else:
            status = _waitpid_timeout(self.pid, timeout)
        self.reaped = True
        return status, self.log()

    def usr1(self, word: str, timeout: float = 30) -> None:
        """SIGUSR1 (memhog rewrites pages, mover moves its memory), then
        wait until its log has one more ``word`` (what it says when done)."""
        before = self.log().count(word)
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.log().count(word) == before:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.005)

    def assert_pass(self, timeout: float = 60) -> None:
        status, log = self.stop(timeout)
        assert status == 0 and "PASS" in log, f"{self.name}: exit {status}\n{log[-3000:]}"

    def kill(self) -> None:
        below = descendants(self.pid)
        for p in below:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap_pids(below)
        if self.reaped:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            if self.ours:
                self.proc.wait(timeout=10)
            else:
                _waitpid_timeout(self.pid, 10)
        except (ChildProcessError, subprocess.TimeoutExpired, TimeoutError):
            pass
        self.reaped = True


def _waitpid_timeout(pid: int, timeout: float) -> int:
    end = time.monotonic() + timeout
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            raise TimeoutError(f"pid {pid} did not exit in {timeout} s")
        time.sleep(0.01)


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return "(no log)"
