"""The init of one rig host: pid 1 of the host's pid namespace.

``rig.py up`` starts it with ``unshare --fork --pid --mount --uts --net
--mount-proc --propagation private``, so it begins in an empty network
namespace with its own /proc.  It

1. sets the host name (``migrig-A``) and brings ``lo`` up;
2. waits for ``eth0``: the rig makes the veth pair with this end created
   straight in our network namespace (``ip link add ... peer name eth0
   netns PID``);
3. gives ``eth0`` its address, brings it up, bind-mounts ``--etc-hosts``
   on /etc/hosts (so ``A``, ``migrig-B`` resolve), moves the namespace's
   next pid to ``--first-pid`` (A 10000, B 20000, C 30000: a process from A
   finds its pid free on B and back, since restore needs the same pid) and
   writes ``ready`` to ``--ready-fd`` (the rig reads EOF instead if we die
   first);
4. starts the agent (the command after ``--``) with stdout and stderr to
   ``--agent-log``;
5. reaps every child forever: as pid 1 of the namespace it inherits every
   orphan, restored processes included (man 2 PR_SET_CHILD_SUBREAPER, man 7
   pid_namespaces).

SIGTERM (or SIGINT, SIGHUP): SIGTERM to the agent, SIGKILL after
``--stop-timeout`` seconds, then exit; the kernel then kills whatever is left
in the pid namespace (man 7 pid_namespaces: "If the init process of a PID
namespace terminates, the kernel terminates all of the processes in the
namespace via a SIGKILL signal").

Stdlib only: it runs before, and independently of, the migrate package.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time

log = logging.getLogger("hostinit")


def wait_interface(name: str, timeout: float) -> int:
    """The interface's index, once it exists in our network namespace."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            # an ioctl on a socket of this namespace, unlike /sys/class/net,
            # which shows the namespace of whoever mounted /sys
            return socket.if_nametoindex(name)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not appear in {timeout:.0f} s") from None
            time.sleep(0.02)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, stdin=subprocess.DEVNULL)


def configure(args) -> None:
    socket.sethostname(args.hostname)
    ip("link", "set", "lo", "up")
    wait_interface(args.interface, args.wait)
    ip("addr", "add", args.address, "dev", args.interface)
    ip("link", "set", args.interface, "up")
    log.info("%s: hostname %s, %s on %s", args.name, args.hostname, args.address,
             args.interface)
    if args.etc_hosts:
        # our mount namespace is private: the root's /etc/hosts is untouched
        r = subprocess.run(["mount", "--bind", args.etc_hosts, "/etc/hosts"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           check=False)
        if r.returncode != 0:
            log.warning("%s: /etc/hosts not replaced: %s", args.name, r.stderr.strip())


PID_MARGIN = 1000     # room left below pid_max for the last host's processes


def set_first_pid(first: int) -> int:
    """The next pid of our pid namespace becomes ``first`` (clamped below
    pid_max); /proc is this namespace's own (unshare --mount-proc).  man 7
    pid_namespaces, /proc/sys/kernel/ns_last_pid: the last pid allocated."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    first = max(2, min(first, pid_max - PID_MARGIN))
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(first - 1))
    return first


def start_agent(argv: list[str], log_path: str) -> int | None:
    if not argv:
        log.info("no agent")
        return None
    # posix_spawn, not Popen: our loop reaps every child, the agent included
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        pid = os.posix_spawnp(argv[0], argv, os.environ, setsigmask=(), file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)])
    finally:
        os.close(out)
    log.info("agent pid %d: %s (log %s)", pid, " ".join(argv), log_path)
    return pid


def stop(agent: int | None, timeout: float) -> None:
    if agent is None:
        return
    try:
        os.kill(agent, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == agent:
            log.info("agent %d stopped", agent)
            return
        if pid == 0:
            time.sleep(0.05)
    log.warning("agent %d still running after %.0f s: SIGKILL", agent, timeout)
    try:
        os.kill(agent, signal.SIGKILL)
    except ProcessLookupError:
        pass


RESTART_DELAY = 1.0      # an agent that died is started again, like systemd's
                         # Restart=on-failure (deploy/migrate-agent.service)


def reap_forever(state: dict) -> None:
    """SIGCHLD stays blocked, so one arriving between a reap and the wait
    stays pending: an orphan is collected as soon as it exits.  state["agent"]
    is cleared when the agent goes, so a SIGTERM later never signals a
    process that reused its pid."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    while True:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == state["agent"]:
                state["agent"] = None
                if state.get("argv") and not (os.WIFEXITED(status) and
                                              os.WEXITSTATUS(status) == 0):
                    log.error("agent %d exited (%s): starting it again in %.0f s", pid,
                              _describe(status), RESTART_DELAY)
                    state["restart_at"] = time.monotonic() + RESTART_DELAY
                else:
                    log.error("agent %d exited (%s); the host stays up without it", pid,
                              _describe(status))
            else:
                log.debug("reaped %d (%s)", pid, _describe(status))
        at = state.get("restart_at")
        if at is not None and time.monotonic() >= at:
            state["restart_at"] = None
            try:
                state["agent"] = start_agent(state["argv"], state["log"])
            except OSError as e:
                log.error("cannot start the agent again: %s", e)
        signal.sigtimedwait({signal.SIGCHLD}, 0.2 if state.get("restart_at") else 60)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--hostname", required=True)
    ap.add_argument("--address", required=True, help="ADDR/PREFIXLEN for the interface")
    ap.add_argument("--interface", default="eth0")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for it")
    ap.add_argument("--ready-fd", type=int)
    ap.add_argument("--agent-log", default="/dev/null")
    ap.add_argument("--etc-hosts", help="bind-mounted on /etc/hosts: the hosts by name")
    ap.add_argument("--stop-timeout", type=float, default=5.0)
    ap.add_argument("--first-pid", type=int, help="where this host's pids start")
    ap.add_argument("agent", nargs=argparse.REMAINDER, help="-- AGENT COMMAND...")
    args = ap.parse_args(argv)
    agent_argv = args.agent[1:] if args.agent[:1] == ["--"] else args.agent
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s hostinit[{args.name}] %(levelname)s %(message)s")

    state = {"agent": None}

    def on_term(signum, frame):
        log.info("signal %d: stopping", signum)
        stop(state["agent"], args.stop_timeout)
        os._exit(0)   # pid 1 leaving takes the rest of the namespace with it

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_term)

    try:
        configure(args)
    except (OSError, subprocess.CalledProcessError, TimeoutError) as e:
        log.error("%s: cannot set up the host: %s", args.name, e)
        return 1
    if args.first_pid:
        try:
            log.info("%s: pids from %d on", args.name, set_first_pid(args.first_pid))
        except OSError as e:
            log.error("%s: cannot set the first pid: %s", args.name, e)
            return 1
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    state["argv"], state["log"] = agent_argv, args.agent_log
    try:
        state["agent"] = start_agent(agent_argv, args.agent_log)
    except OSError as e:
        log.error("%s: cannot start the agent %s: %s", args.name, agent_argv[0], e)
    reap_forever(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
