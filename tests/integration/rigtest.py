"""Helpers for tests on the two-host rig (deploy/rig): workloads started in
a host, their pid there, their verdict wherever they ended up, `migrate
run` from the client host."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RIG_DIR = os.path.join(REPO, "deploy", "rig")
BIN = os.path.join(REPO, "tests", "programs", "bin")
sys.path.insert(0, RIG_DIR)
import rig  # noqa: E402

# never the rig a human brought up (migrig); set it to run these tests next to
# another checkout's (two runs with one prefix take each other's rig down)
PREFIX = os.environ.get("MIGRATE_TEST_RIG_PREFIX", "migmt")


def available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(c) for c in ("ip", "nsenter", "unshare",
                                                                "setsid"))


class Rig:
    """A rig of our own for a test module: up at the start, down at the end."""

    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self.env = {"MIGRATE_RIG_PREFIX": PREFIX, "MIGRATE_RIG_DIR": state_dir,
                    "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "MIGRATE_INCOMING_IDLE_S": "8", "MIGRATE_LAZY_GRACE_S": "5"}
        self._saved = {k: os.environ.get(k) for k in self.env}

    def up(self) -> "Rig":
        os.environ.update(self.env)
        os.environ.pop("MIGRATE_RIG_AGENT", None)
        rig.down(quiet=True)
        rig.up(force=True)
        self.inventory = os.path.join(self.dir, "hosts.toml")
        return self

    def down(self) -> None:
        try:
            rig.down(quiet=True)
        finally:
            for k, v in self._saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def run_argv(self, host: str, *cmd: str) -> list[str]:
        return rig.exec_argv(host) + list(cmd)

    def run(self, host: str, *cmd: str, timeout: float = 60,
            check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(rig.exec_argv(host) + list(cmd), capture_output=True, text=True,
                           timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"{host}: {cmd}: {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def migrate(self, src: str, dst: str, pid: int, *extra: str,
                timeout: float = 180) -> tuple[int, dict]:
        """`migrate run` from host C; (exit status, the final record)."""
        r = self.run("C", sys.executable, "-m", "migrate", "run", "--inventory",
                     self.inventory, "--src", src, "--dst", dst, "--pid", str(pid), "--json",
                     *extra, timeout=timeout, check=False)
        try:
            rec = json.loads(r.stdout)
        except ValueError:
            raise AssertionError(f"migrate run: {r.returncode}\n{r.stdout}\n{r.stderr}") \
                from None
        return r.returncode, rec

    def agent_pid(self, host: str) -> int | None:
        """The agent's pid (as seen from here): the host init's child."""
        init = rig.pid(host)
        for tid in os.listdir(f"/proc/{init}/task"):
            with open(f"/proc/{init}/task/{tid}/children") as f:
                for c in f.read().split():
                    try:
                        with open(f"/proc/{c}/cmdline", "rb") as g:
                            if b"migrate\0agent" in g.read():
                                return int(c)
                    except OSError:
                        pass
        return None

    def work(self, host: str) -> str:
        return os.path.join(self.dir, host, "work")

    def incoming_left(self, host: str) -> list[str]:
        d = os.path.join(self.work(host), "images")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def wait_agent(self, host: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if rig.health([host], timeout=2).get(host, {}).get("host"):
                    return
            except Exception:     # noqa: BLE001 - not up yet
                pass
            time.sleep(0.3)
        raise AssertionError(f"agent {host} did not come back in {timeout} s")

    def locks_left(self, host: str) -> list[str]:
        r = self.run(host, "nft", "list", "tables", check=False)
        return [line for line in r.stdout.splitlines() if "migrate" in line]


def _ns_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


class RigWorkload:
    """A self-checking program started in a rig host (a session leader
    there, stdout to a log file on the shared file system)."""

    def __init__(self, r: Rig, host: str, argv: list[str], logdir: str, name: str,
                 daemon: bool = False) -> None:
        """``daemon``: a child of the host's init from the start (setsid -f),
        as a service is: its parent is then the same on every host."""
        self.rig = r
        self.host = host
        self.name = name
        self.log_path = os.path.join(logdir, f"{name}.log")
        logf = open(self.log_path, "ab")
        if daemon:
            before = set(self._init_children())
            subprocess.run(rig.exec_argv(host, logdir) + ["setsid", "-f"] + argv,
                           stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=logdir,
                           check=True)
            logf.close()
            self.proc = None
            self.pid = self._find_daemon(before, argv[0])
            return
        self.proc = subprocess.Popen(rig.exec_argv(host, logdir) + ["setsid"] + argv,
                                     stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                     cwd=logdir)
        logf.close()
        self.pid = self._find_pid()

    def _init_children(self) -> list[int]:
        init = rig.pid(self.host)
        out = []
        for tid in os.listdir(f"/proc/{init}/task"):
            with open(f"/proc/{init}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        return out

    def _find_daemon(self, before: set, exe: str, timeout: float = 10) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for c in self._init_children():
                if c in before:
                    continue
                try:
                    if os.readlink(f"/proc/{c}/exe") == os.path.realpath(exe):
                        return _ns_pid(c)
                except OSError:
                    pass
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: not started in {self.host}")

    @classmethod
    def program(cls, r: Rig, host: str, logdir: str, name: str, *args: str,
                tag: str = "", daemon: bool = False) -> "RigWorkload":
        return cls(r, host, [os.path.join(BIN, name), *args], logdir, name + tag, daemon)

    def _find_pid(self, timeout: float = 10) -> int:
        """nsenter forks the program inside the host: its pid there."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            kids = []
            try:
                for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                    with open(f"/proc/{self.proc.pid}/task/{tid}/children") as f:
                        kids += [int(x) for x in f.read().split()]
            except OSError:
                pass
            if kids:
                return _ns_pid(kids[0])
            time.sleep(0.01)
        raise AssertionError(f"{self.name}: not started in {self.host}")

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def wait_for(self, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in self.log():
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no {text!r} in {timeout} s:\n{self.log()}")

    def wait_ready(self) -> None:
        self.wait_for("READY")

    def alive_on(self, host: str) -> bool:
        r = self.rig.run(host, "sh", "-c", f"test -d /proc/{self.pid} && "
                         f"grep -q '^State:' /proc/{self.pid}/status && "
                         f"! grep -q '^State:.*Z' /proc/{self.pid}/status", check=False)
        return r.returncode == 0

    def where(self) -> list[str]:
        return [h for h in ("A", "B") if self.alive_on(h)]

    def moved(self, host: str) -> None:
        self.host = host
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)      # the original, killed on its host
            except subprocess.TimeoutExpired:
                pass

    def verdict(self, timeout: float = 90) -> str:
        """SIGTERM where it runs; its PASS or FAIL line."""
        self.rig.run(self.host, "kill", "-TERM", str(self.pid))
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.log()
            if "\nPASS" in "\n" + out or "FAIL" in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: no verdict in {timeout} s:\n{self.log()}")

    def assert_pass(self) -> None:
        out = self.verdict()
        assert "FAIL" not in out and "PASS" in out, f"{self.name}:\n{out}"
        self.reap()

    def kill(self) -> None:
        for h in ("A", "B"):
            self.rig.run(h, "kill", "-KILL", str(self.pid), check=False)
        self.reap()

    def reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(r: Rig, host: str, logdir, workloads: list, name: str, *args: str,
          tag: str = "", daemon: bool = False) -> RigWorkload:
    """A test program on ``host``, READY, listed in ``workloads`` (killed at
    the end of the test)."""
    w = RigWorkload.program(r, host, str(logdir), name, *args, tag=tag, daemon=daemon)
    workloads.append(w)
    w.wait_ready()
    return w
