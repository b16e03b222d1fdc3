#!/usr/bin/env python3
"""The two-host rig: hosts A and B and a client host C on one machine.

Each host is a network, pid (with its own /proc), mount and uts namespace
around a small init (hostinit.py) that runs a migrate agent; the hosts' eth0
are veth pairs to a bridge in a network namespace of its own, so nothing of
the rig lives in the root network namespace.  The file system is shared, as
with shared storage between real hosts.  docs/rig.md tells how to use it.

    rig.py up [--hosts A,B,C] [--agent-cmd CMD] [--force]
    rig.py status                       # JSON
    rig.py exec HOST -- CMD...          # CMD inside HOST (this tree's migrate
                                        # first on PYTHONPATH); its exit status
    rig.py pid HOST                     # HOST's init, as seen from here
    rig.py health [HOST...]             # each agent's GET /api/v1/health
    rig.py down                         # idempotent; also after a crash

As a module (tests): ``up()``, ``down()``, ``status()``, ``exec_argv(host)``,
``pid(host)``, ``health()``.

Everything it makes carries the prefix (env MIGRATE_RIG_PREFIX, default
``migrig``) and is recorded under the state directory (env MIGRATE_RIG_DIR,
default /run/migrate-rig):

    netns PREFIX-sw         the "switch": bridge PREFIX-br, veth PREFIX-A ...
    netns PREFIX-A ...      a handle on each host's network namespace
    DIR/state.json          each host: init pid and start time, address, links
    DIR/pki/                CA, A B C and operator certificates (migrate certs)
    DIR/hosts.toml          the inventory `migrate run --inventory` reads
    DIR/etc-hosts           the hosts' /etc/hosts (A, migrig-A ... resolve there)
    DIR/A/agent.toml        A's agent config; DIR/A/work, A/agent.log, A/init.log

``down`` only signals processes it can prove are the rig's: the pids in
state.json whose start time still matches, and the pid-namespace inits
inside the host network namespaces it named; never a process by its name.

Stdlib only (Python 3.11), plus ip(8), nsenter(1) and unshare(1).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import time

log = logging.getLogger("rig")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

DEFAULT_PREFIX = "migrig"
DEFAULT_DIR = "/run/migrate-rig"
DEFAULT_HOSTS = ("A", "B", "C")
SUBNET = "10.232.0"          # 10.231.x belongs to other tests
PREFIXLEN = 24
FIXED_HOSTS = {"A": 1, "B": 2, "C": 3}
PIDS_PER_HOST = 10000        # host n's pids start at n * 10000 (hostinit --first-pid)
MAX_HOST_NUMBER = 99         # .100-.199 are service addresses (--move-address)
AGENT_PORT = 7443
PAGE_SERVER_PORT = 27027
INTERFACE = "eth0"
IFNAMSIZ = 16                # include/uapi/linux/if.h, with the NUL
HEALTH_PATH = "/api/v1/health"
HEALTH_TIMEOUT = 20.0
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
NETNS_DIR = "/run/netns"     # where `ip netns` keeps its handles
MARKER = ".migrate-rig"


class RigError(Exception):
    """The rig cannot do what was asked; the message says why and what to do."""


# -- settings ------------------------------------------------------------------

def prefix() -> str:
    p = os.environ.get("MIGRATE_RIG_PREFIX", DEFAULT_PREFIX)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,9}", p):
        raise RigError(f"MIGRATE_RIG_PREFIX={p!r}: 1 to 10 lower-case letters and digits")
    return p


def state_dir() -> str:
    d = os.path.abspath(os.environ.get("MIGRATE_RIG_DIR", DEFAULT_DIR))
    if d == "/":
        raise RigError("MIGRATE_RIG_DIR=/: refusing")
    return d


def sw_netns() -> str:
    return f"{prefix()}-sw"


def bridge() -> str:
    return f"{prefix()}-br"


def host_link(host: str) -> str:
    """The switch end of the host's veth pair, and the host's netns handle."""
    return f"{prefix()}-{host}"


def host_numbers(hosts) -> dict[str, int]:
    """A, B, C are .1, .2, .3 whatever the list; other names get .4 on, in order."""
    out, used = {}, set()
    for h in hosts:
        if h in FIXED_HOSTS:
            out[h] = FIXED_HOSTS[h]
            used.add(out[h])
    n = 1
    for h in hosts:
        if h not in out:
            while n in used or n in FIXED_HOSTS.values():
                n += 1
            if n > MAX_HOST_NUMBER:
                raise RigError(f"too many hosts: {SUBNET}.{n} would be a service address")
            out[h] = n
            used.add(n)
    return out


def _check_hosts(hosts) -> None:
    if not hosts:
        raise RigError("no hosts")
    if len(set(hosts)) != len(hosts):
        raise RigError(f"a host is named twice in {','.join(hosts)}")
    for h in hosts:
        if not re.fullmatch(r"[A-Za-z0-9]+", h) or h == "sw" or h == "br":
            raise RigError(f"host name {h!r}: letters and digits only (not sw, br)")
        if len(host_link(h)) >= IFNAMSIZ:
            raise RigError(f"interface name {host_link(h)!r} is over {IFNAMSIZ - 1} "
                           "characters: use a shorter MIGRATE_RIG_PREFIX or host name")


# -- processes -------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time): fields 3 and 22 of /proc/PID/stat (man 5 proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    """None if gone or a zombie."""
    st = _stat(pid)
    return None if st is None or st[0] in ("Z", "X") else st[1]


def same_process(pid, start) -> bool:
    return bool(pid) and start is not None and start_time(int(pid)) == int(start)


def _reap(pid: int) -> None:
    """Collect pid if it is our child (the unshare processes, when up() ran here)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def reap_recorded(pids) -> None:
    """Collect those of the recorded (pid, start time) that are our zombies."""
    for p, start in pids:
        st = _stat(int(p)) if p else None
        if st and st[0] == "Z" and st[1] == start:
            _reap(int(p))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _ns_inits(net_inode: int) -> list[int]:
    """Processes in that network namespace that are pid 1 of a pid namespace
    other than ours: the host inits, found without their names."""
    ours = _ns_inode("/proc/self/ns/pid")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if _ns_inode(f"/proc/{pid}/ns/net") != net_inode:
            continue
        if _ns_inode(f"/proc/{pid}/ns/pid") == ours:
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                nspid = next((ln.split()[1:] for ln in f if ln.startswith("NSpid:")), [])
        except OSError:
            continue
        if nspid and nspid[-1] == "1":
            found.append(pid)
    return found


def _deaf_init(pid: int) -> bool:
    """A pid namespace's init with no SIGTERM handler (yet): a host init
    still starting Python. SIGTERM from here would be dropped (man 7
    pid_namespaces: only signals it handles reach an init from an ancestor
    namespace), so it gets SIGKILL at once rather than after the timeout."""
    try:
        with open(f"/proc/{pid}/status") as f:
            st = dict(ln.rstrip("\n").split(":\t", 1) for ln in f if ":\t" in ln)
    except OSError:
        return False
    nspid = st.get("NSpid", "").split()
    caught = int(st.get("SigCgt", "0"), 16) & (1 << (signal.SIGTERM - 1))
    return len(nspid) > 1 and nspid[-1] == "1" and not caught


def _stop(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM (SIGKILL to a deaf init), then SIGKILL what is left after
    timeout; pids come with their start time checked by the caller, and are
    checked again before SIGKILL. unshare blocks SIGTERM: it leaves when its
    child, the host init, does."""
    starts = {p: start_time(p) for p in pids}
    live = [p for p in pids if starts[p] is not None]
    for p in live:
        sig = signal.SIGKILL if _deaf_init(p) else signal.SIGTERM
        log.info("%s %d", sig.name, p)
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        for p in live:
            _reap(p)
        live = [p for p in live if start_time(p) == starts[p]]
        if live:
            time.sleep(0.05)
    for p in live:
        log.warning("%d still running after %.0f s: SIGKILL", p, timeout)
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2
    while live and time.monotonic() < deadline:
        for p in live:
            _reap(p)
        live = [p for p in live if start_time(p) == starts[p]]
        if live:
            time.sleep(0.05)
    if live:
        log.error("still alive after SIGKILL: %s", " ".join(map(str, live)))


# -- ip(8) ---------------------------------------------------------------------------

def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, check=False)
    if check and r.returncode != 0:
        why = r.stderr.strip() or f"exit {r.returncode}"
        raise RigError(f"ip {' '.join(args)}: {why}")
    return r


def netns_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def our_netns() -> list[str]:
    p = prefix() + "-"
    return [n for n in netns_names() if n.startswith(p)]


def root_links() -> list[str]:
    p = prefix() + "-"
    out = ip("-j", "link", "show").stdout
    return [ln["ifname"] for ln in json.loads(out or "[]") if ln["ifname"].startswith(p)]


# -- state ----------------------------------------------------------------------------

def _path(*parts: str) -> str:
    return os.path.join(state_dir(), *parts)


def read_state() -> dict:
    """state.json, or {} if missing or unreadable (a crash may leave either)."""
    try:
        with open(_path("state.json")) as f:
            st = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); going on without it", _path("state.json"), e)
        return {}
    return st if isinstance(st, dict) else {}


def _write_state(st: dict) -> None:
    tmp = _path("state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(st, f, indent=2)
        f.write("\n")
    os.replace(tmp, _path("state.json"))


def _recorded_pids(st: dict) -> list[int]:
    """The rig's processes that are still the ones recorded (start time checked)."""
    out = []
    for h in (st.get("hosts") or {}).values():
        if not isinstance(h, dict):
            continue
        for k in ("init", "unshare"):
            if same_process(h.get(f"{k}_pid"), h.get(f"{k}_start")):
                out.append(int(h[f"{k}_pid"]))
    return out


def _host(host: str) -> dict:
    h = (read_state().get("hosts") or {}).get(host)
    if not h:
        raise RigError(f"no host {host!r} in {_path('state.json')} (is the rig up? "
                       "`rig.py up`)")
    if not same_process(h.get("init_pid"), h.get("init_start")):
        raise RigError(f"host {host}: its init (pid {h.get('init_pid')}) is gone; "
                       "`rig.py down` then `rig.py up`")
    return h


# -- files --------------------------------------------------------------------------

def _toml_str(s: str) -> str:
    return json.dumps(s)     # a JSON string of printable ASCII is a TOML basic string


def _inventory(hosts: dict[str, dict]) -> str:
    pki = _path("pki")
    out = ["# The rig's inventory (rig.py up); `migrate run --inventory` reads it.",
           "[tls]",
           f"cacert = {_toml_str(os.path.join(pki, 'cacert.pem'))}",
           f"cert = {_toml_str(os.path.join(pki, 'operator', 'cert.pem'))}",
           f"key = {_toml_str(os.path.join(pki, 'operator', 'private', 'key.pem'))}"]
    for name, h in hosts.items():
        out += ["", f"[hosts.{name}]",
                f"agent = {_toml_str(h['agent'])}",
                f"address = {_toml_str(h['address'])}",
                f"page_server_port = {PAGE_SERVER_PORT}"]
    return "\n".join(out) + "\n"


def _etc_hosts(hosts: dict[str, dict]) -> str:
    """Each host's /etc/hosts: the hosts by short name too (their
    certificates name them so: https://A:7443 verifies as well)."""
    out = ["# rig.py up: bind-mounted on /etc/hosts inside each rig host",
           "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    out += [f"{h['address']}\t{h['hostname']} {name}" for name, h in hosts.items()]
    return "\n".join(out) + "\n"


def _agent_config(name: str, h: dict) -> str:
    pki = _path("pki")
    return "\n".join([
        f"# Agent of rig host {name} (rig.py up)",
        f"name = {_toml_str(name)}",
        f"address = {_toml_str(h['address'])}",
        f"port = {AGENT_PORT}",
        f"page_server_port = {PAGE_SERVER_PORT}",
        f"work_dir = {_toml_str(_path(name, 'work'))}",
        f"inventory = {_toml_str(_path('hosts.toml'))}",
        f"interface = {_toml_str(INTERFACE)}",
        "[tls]",
        f"cacert = {_toml_str(os.path.join(pki, 'cacert.pem'))}",
        f"cert = {_toml_str(os.path.join(pki, name, 'cert.pem'))}",
        f"key = {_toml_str(os.path.join(pki, name, 'private', 'key.pem'))}",
    ]) + "\n"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def child_env() -> dict[str, str]:
    """Our environment, with this tree's migrate first on PYTHONPATH: the rig
    runs the migrate it ships with (certs, agent)."""
    env = dict(os.environ)
    if os.path.isdir(os.path.join(REPO, "migrate")):
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = REPO + (os.pathsep + old if old else "")
    return env


def _migrate(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "migrate", *args], env=child_env(),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       check=False)
    if r.returncode != 0:
        raise RigError(f"migrate {' '.join(args)}: {r.stderr.strip()}")


def _make_pki(hosts: dict[str, dict]) -> None:
    pki = _path("pki")
    _migrate("certs", "init", pki)
    for name, h in hosts.items():
        # named by host and by address: agents are dialled at https://ADDR:7443
        _migrate("certs", "issue", pki, name, "--ip", h["address"])
    _migrate("certs", "issue", pki, "operator")


# -- agent ------------------------------------------------------------------------

def real_agent_available() -> bool:
    r = subprocess.run([sys.executable, "-m", "migrate", "agent", "--help"],
                       env=child_env(), stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return r.returncode == 0


def resolve_agent(spec: str | None) -> tuple[str, list[str]]:
    """(kind, argv without --config): kind is migrate, standin, custom or none.

    spec (--agent-cmd, else env MIGRATE_RIG_AGENT, else auto): ``auto`` is
    `migrate agent` if this tree has it, else the stand-in; ``migrate``,
    ``standin``, ``none``, or a command line to which ``--config FILE`` is
    appended."""
    spec = spec or os.environ.get("MIGRATE_RIG_AGENT") or "auto"
    migrate_argv = [sys.executable, "-m", "migrate", "agent"]
    standin_argv = [sys.executable, os.path.join(HERE, "standin_agent.py")]
    if spec == "auto":
        if real_agent_available():
            return "migrate", migrate_argv
        log.warning("`migrate agent` is not there yet: hosts run the stand-in agent "
                    "(deploy/rig/standin_agent.py, health endpoint only)")
        return "standin", standin_argv
    if spec == "migrate":
        return "migrate", migrate_argv
    if spec == "standin":
        return "standin", standin_argv
    if spec == "none":
        return "none", []
    argv = shlex.split(spec)
    if not argv:
        raise RigError("empty agent command")
    return "custom", argv


# -- up -------------------------------------------------------------------------------

def is_up() -> bool:
    if _recorded_pids(read_state()):
        return True
    for n in our_netns():
        if n != sw_netns():
            ino = _ns_inode(os.path.join(NETNS_DIR, n))
            if ino and _ns_inits(ino):
                return True
    return False


def up(hosts=DEFAULT_HOSTS, agent: str | None = None, force: bool = False,
       health_timeout: float = HEALTH_TIMEOUT) -> dict:
    """Bring the rig up; returns its state (as `status`).  Any failure takes
    down whatever was made, then raises RigError."""
    hosts = list(hosts)
    _check_hosts(hosts)
    if is_up():
        if not force:
            raise RigError(f"a rig ({prefix()}, {state_dir()}) is already up: "
                           "`rig.py down` first, or `rig.py up --force`")
        log.info("--force: taking the running rig down first")
    down(quiet=True)          # also clears what a crash left
    try:
        return _up(hosts, agent, health_timeout)
    except BaseException:
        log.error("rig up failed: taking down what was made")
        down(quiet=True)
        raise


def _up(hosts: list[str], agent: str | None, health_timeout: float) -> dict:
    d = state_dir()
    os.makedirs(d, mode=0o755, exist_ok=True)
    _write(os.path.join(d, MARKER), "made by deploy/rig/rig.py; `rig.py down` removes it\n")
    numbers = host_numbers(hosts)
    kind, agent_argv = resolve_agent(agent)
    st = {"prefix": prefix(), "dir": d, "netns": sw_netns(), "bridge": bridge(),
          "agent": kind, "up": False, "hosts": {}}
    for name in hosts:
        addr = f"{SUBNET}.{numbers[name]}"
        st["hosts"][name] = {
            "hostname": host_link(name), "address": addr,
            "cidr": f"{addr}/{PREFIXLEN}", "interface": INTERFACE,
            "veth": host_link(name), "netns": host_link(name),
            "agent": f"https://{addr}:{AGENT_PORT}",
            "page_server_port": PAGE_SERVER_PORT,
            "config": os.path.join(d, name, "agent.toml"),
            "agent_log": os.path.join(d, name, "agent.log"),
            "init_log": os.path.join(d, name, "init.log"),
            "first_pid": numbers[name] * PIDS_PER_HOST,
            "init_pid": None, "init_start": None,
            "unshare_pid": None, "unshare_start": None}
    _write_state(st)

    _make_pki(st["hosts"])
    _write(os.path.join(d, "hosts.toml"), _inventory(st["hosts"]))
    _write(os.path.join(d, "etc-hosts"), _etc_hosts(st["hosts"]))
    for name, h in st["hosts"].items():
        os.makedirs(os.path.join(d, name, "work"), exist_ok=True)
        _write(h["config"], _agent_config(name, h))

    ip("netns", "add", sw_netns())
    ip("-n", sw_netns(), "link", "set", "lo", "up")
    ip("-n", sw_netns(), "link", "add", bridge(), "type", "bridge")
    ip("-n", sw_netns(), "link", "set", bridge(), "up")

    ready = {}
    try:
        for name, h in st["hosts"].items():
            ready[name] = _start_host(st, name, h, kind, agent_argv)
        _wait_ready(st, ready)
    finally:
        for fd in ready.values():
            os.close(fd)
    log.info("hosts %s up on %s (bridge %s in netns %s)", ",".join(hosts),
             f"{SUBNET}.0/{PREFIXLEN}", bridge(), sw_netns())

    if kind != "none" and health_timeout > 0:
        res = health(timeout=health_timeout)
        bad = {n: r for n, r in res.items() if "error" in r}
        if bad:
            why = "; ".join(f"{n}: {r['error']} (agent log: "
                            f"{_tail(st['hosts'][n]['agent_log'])})" for n, r in bad.items())
            raise RigError(f"agents not healthy after {health_timeout:.0f} s: {why}")
        for n, r in res.items():
            if r.get("host") not in (n, st["hosts"][n]["hostname"]):
                log.warning("host %s: its agent says it is %r", n, r.get("host"))
        log.info("agents (%s) answer on %s", kind, HEALTH_PATH)
    st["up"] = True
    _write_state(st)
    return status()


def _start_host(st: dict, name: str, h: dict, kind: str, agent_argv: list[str]) -> int:
    """Start NAME's init in new namespaces and wire its eth0; returns the read
    end of its ready pipe."""
    r, w = os.pipe()
    # --kill-child: the init gets SIGTERM if its unshare parent dies, so a host
    # whose init was never recorded cannot outlive a killed rig.
    argv = ["unshare", "--fork", "--kill-child=SIGTERM", "--pid", "--mount", "--uts",
            "--net", "--mount-proc", "--propagation", "private",
            sys.executable, os.path.join(HERE, "hostinit.py"),
            "--name", name, "--hostname", h["hostname"], "--address", h["cidr"],
            "--interface", INTERFACE, "--ready-fd", str(w),
            "--agent-log", h["agent_log"], "--etc-hosts", _path("etc-hosts"),
            "--first-pid", str(h["first_pid"]), "--"]
    if kind != "none":
        argv += agent_argv + ["--config", h["config"]]
    # posix_spawn rather than Popen: unshare outlives us when run from the
    # command line, and down() reaps it by pid when it is our child (tests).
    out = os.open(h["init_log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                  0o644)
    os.set_inheritable(w, True)    # the only one: each host's w is closed below
    try:
        upid = os.posix_spawnp(argv[0], argv, child_env(), setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)])
    except OSError as e:
        os.close(r)
        raise RigError(f"host {name}: cannot run unshare: {e}") from None
    finally:
        os.close(out)
        os.close(w)
    h["unshare_pid"], h["unshare_start"] = upid, start_time(upid)
    _write_state(st)
    try:
        _wire_host(st, name, h, upid)
    except BaseException:
        os.close(r)
        raise
    return r


def _wire_host(st: dict, name: str, h: dict, upid: int) -> None:
    # unshare --fork: its only child is the init, pid 1 of the new namespace
    deadline = time.monotonic() + 5
    while not (kids := _children(upid)):
        if start_time(upid) is None or time.monotonic() > deadline:
            _reap(upid)
            raise RigError(f"host {name}: unshare did not start its init "
                           f"(see {h['init_log']}: {_tail(h['init_log'])})")
        time.sleep(0.005)
    h["init_pid"], h["init_start"] = kids[0], start_time(kids[0])
    _write_state(st)
    pid = str(h["init_pid"])
    ip("netns", "attach", host_link(name), pid)
    # Both ends made where they belong: none is ever left in the root netns.
    ip("link", "add", h["veth"], "netns", sw_netns(), "type", "veth",
       "peer", "name", INTERFACE, "netns", pid)
    ip("-n", sw_netns(), "link", "set", h["veth"], "master", bridge(), "up")
    log.info("host %s: init pid %s, %s on %s <-> %s", name, pid, h["cidr"], INTERFACE,
             h["veth"])


def _wait_ready(st: dict, ready: dict[str, int]) -> None:
    """Each init writes "ready" once its eth0 has its address; EOF means it died."""
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = dict(ready)
    while waiting:
        left = deadline - time.monotonic()
        fds = select.select(list(waiting.values()), [], [], max(left, 0))[0]
        if not fds:
            raise RigError(f"hosts {','.join(waiting)} not ready after "
                           f"{READY_TIMEOUT:.0f} s")
        for name, fd in list(waiting.items()):
            if fd in fds:
                if os.read(fd, 64) != b"ready\n":
                    raise RigError(f"host {name}: its init died while setting up: "
                                   f"{_tail(st['hosts'][name]['init_log'])}")
                del waiting[name]


def _tail(path: str, n: int = 3) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-n:]) or "(empty log)"
    except OSError:
        return f"({path} unreadable)"


# -- down -----------------------------------------------------------------------------

def down(quiet: bool = False) -> None:
    """Remove everything of the rig: idempotent, and good after any crash
    (no state, stale state, processes killed)."""
    st = read_state()
    victims = _recorded_pids(st)
    records = [(h.get(f"{k}_pid"), h.get(f"{k}_start"))
               for h in (st.get("hosts") or {}).values() if isinstance(h, dict)
               for k in ("init", "unshare")]
    # Inits whose record is lost: found through the host netns handles we named.
    for n in our_netns():
        if n == sw_netns():
            continue
        ino = _ns_inode(os.path.join(NETNS_DIR, n))
        if ino:
            victims += [p for p in _ns_inits(ino) if p not in victims]
    # inits first, so hostinit stops its agent before its unshare parent goes
    inits = {h.get("init_pid") for h in (st.get("hosts") or {}).values()
             if isinstance(h, dict)}
    victims.sort(key=lambda p: p not in inits)
    if victims:
        _stop(victims)
    reap_recorded(records)
    for n in our_netns():
        r = ip("netns", "del", n, check=False)
        if r.returncode != 0:
            log.error("ip netns del %s: %s", n, r.stderr.strip())
        elif not quiet:
            log.info("deleted netns %s", n)
    for link in root_links():
        # a veth half-made by an older rig, or made here by hand
        r = ip("link", "del", link, check=False)
        if r.returncode != 0 and link in root_links():
            log.error("ip link del %s: %s", link, r.stderr.strip())
        elif not quiet:
            log.info("deleted link %s", link)
    _remove_dir()
    if not quiet:
        log.info("rig %s down", prefix())


def _remove_dir() -> None:
    """Remove the state directory: only what the rig writes there, so a
    mistaken MIGRATE_RIG_DIR costs nothing else."""
    d = state_dir()
    if not os.path.isdir(d):
        return
    for e in os.listdir(d):
        p = os.path.join(d, e)
        if e in (MARKER, "state.json", "state.json.tmp", "hosts.toml", "etc-hosts"):
            os.unlink(p)
        elif e == "pki" or (os.path.isdir(p) and not os.path.islink(p) and
                            re.fullmatch(r"[A-Za-z0-9]+", e) and
                            set(os.listdir(p)) & {"agent.toml", "work", "agent.log",
                                                  "init.log"}):
            shutil.rmtree(p)
    try:
        os.rmdir(d)
    except OSError as e:
        log.warning("%s: left in place: %s", d, e.strerror)


# -- status, exec, health -------------------------------------------------------------

def pid(host: str) -> int:
    """HOST's init, in our pid namespace."""
    return int(_host(host)["init_pid"])


def exec_argv(host: str, cwd: str | None = None) -> list[str]:
    """The argv prefix that runs a command inside HOST's net, pid, mount and
    uts namespaces, in cwd (default: ours; nsenter -m would otherwise start
    in /)."""
    return ["nsenter", "-t", str(pid(host)), "-n", "-p", "-m", "-u",
            f"--wd={cwd or os.getcwd()}", "--"]


def status() -> dict:
    st = read_state()
    hosts = {}
    for name, h in (st.get("hosts") or {}).items():
        if not isinstance(h, dict):
            continue
        alive = same_process(h.get("init_pid"), h.get("init_start"))
        hosts[name] = {k: h.get(k) for k in ("hostname", "address", "interface", "veth",
                                             "netns", "agent", "page_server_port", "first_pid",
                                             "config", "agent_log", "init_log")}
        hosts[name].update(pid=h.get("init_pid"), alive=alive)
    ns = our_netns()
    ok = bool(st.get("up")) and bool(hosts) and all(h["alive"] for h in hosts.values())
    return {"prefix": prefix(), "dir": state_dir(), "up": ok,
            # something of a rig, not all working: `rig.py down` clears it
            "stale": not ok and bool(ns or st or os.path.exists(state_dir())),
            "agent": st.get("agent"),
            "netns": ns, "switch": sw_netns() if sw_netns() in ns else None,
            "bridge": st.get("bridge"),
            "inventory": _path("hosts.toml") if os.path.exists(_path("hosts.toml")) else None,
            "hosts": hosts}


def health(hosts=None, timeout: float = 0.0) -> dict[str, dict]:
    """Each agent's GET /api/v1/health (mutual TLS, the operator certificate),
    asked from inside its own host, retried for up to timeout seconds; a
    host whose agent did not answer gets {"error": ...}."""
    st = read_state()
    names = list(hosts or (st.get("hosts") or {}))
    procs = {}
    for name in names:
        try:
            argv = ["nsenter", "-t", str(pid(name)), "-n", "--",
                    sys.executable, os.path.abspath(__file__), "_probe", name,
                    "--timeout", str(timeout)]
        except RigError as e:
            procs[name] = e
            continue
        procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=child_env())
    out = {}
    for name, p in procs.items():
        if isinstance(p, RigError):
            out[name] = {"error": str(p)}
            continue
        so, se = p.communicate()
        try:
            out[name] = json.loads(so)
        except ValueError:
            out[name] = {"error": se.strip() or f"probe exit {p.returncode}"}
    return out


def _probe(host: str, timeout: float) -> dict:
    """Run inside the host's network namespace, by health()."""
    import http.client
    h = (read_state().get("hosts") or {})[host]
    pki = _path("pki")
    ctx = ssl.create_default_context(cafile=os.path.join(pki, "cacert.pem"))
    ctx.load_cert_chain(os.path.join(pki, "operator", "cert.pem"),
                        os.path.join(pki, "operator", "private", "key.pem"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = http.client.HTTPSConnection(h["address"], AGENT_PORT, context=ctx,
                                            timeout=2)
            try:
                c.request("GET", HEALTH_PATH)
                resp = c.getresponse()
                body = resp.read()
            finally:
                c.close()
            if resp.status != 200:
                raise RigError(f"{h['agent']}{HEALTH_PATH}: HTTP {resp.status}")
            data = json.loads(body)
            if not isinstance(data, dict) or "host" not in data:
                raise RigError(f"{h['agent']}{HEALTH_PATH}: no \"host\" in {body[:200]!r}")
            return data
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError,
                RigError) as e:
            err = f"{h['agent']}{HEALTH_PATH}: {e}"
            if time.monotonic() >= deadline:
                return {"error": err}
            time.sleep(0.2)


# -- command line ---------------------------------------------------------------------

def _hosts_arg(s: str) -> list[str]:
    return [h.strip() for h in s.split(",") if h.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rig.py", description=__doc__.split("\n")[0],
                                 epilog="env: MIGRATE_RIG_DIR (default /run/migrate-rig), "
                                        "MIGRATE_RIG_PREFIX (default migrig), "
                                        "MIGRATE_RIG_AGENT (as --agent-cmd)")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    u = sub.add_parser("up", help="make the hosts, their network and their agents")
    u.add_argument("--hosts", type=_hosts_arg, default=list(DEFAULT_HOSTS),
                   help="comma-separated (default A,B,C)")
    u.add_argument("--agent-cmd", metavar="CMD",
                   help="auto (default), migrate, standin, none, or a command to which "
                        "--config FILE is appended")
    u.add_argument("--force", action="store_true", help="take a running rig down first")
    u.add_argument("--health-timeout", type=float, default=HEALTH_TIMEOUT, metavar="S",
                   help="seconds to wait for each agent's health endpoint (0: do not)")
    sub.add_parser("down", help="remove everything the rig made (idempotent)")
    sub.add_parser("status", help="JSON")
    e = sub.add_parser("exec", help="run CMD inside HOST (exit status passed through)")
    e.add_argument("host", metavar="HOST")
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    p = sub.add_parser("pid", help="HOST's init pid, as seen from here")
    p.add_argument("host", metavar="HOST")
    h = sub.add_parser("health", help="each agent's health answer (JSON)")
    h.add_argument("hosts", nargs="*", metavar="HOST")
    h.add_argument("--timeout", type=float, default=0.0)
    pr = sub.add_parser("_probe")     # health() runs it inside a host
    pr.add_argument("host")
    pr.add_argument("--timeout", type=float, default=0.0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a killed `up` still takes down what it made
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        stream=sys.stderr, format="rig: %(message)s")
    try:
        if args.command == "up":
            st = up(args.hosts, agent=args.agent_cmd, force=args.force,
                    health_timeout=args.health_timeout)
            for name, h in st["hosts"].items():
                log.info("%s: %s pid %s agent %s", name, h["hostname"], h["pid"], h["agent"])
            log.info("inventory %s; run commands in a host with `%s exec C -- CMD`",
                     st["inventory"], sys.argv[0])
        elif args.command == "down":
            down()
        elif args.command == "status":
            json.dump(status(), sys.stdout, indent=2)
            print()
        elif args.command == "pid":
            print(pid(args.host))
        elif args.command == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise RigError("exec HOST -- CMD...: no command")
            argv = exec_argv(args.host) + cmd
            sys.stdout.flush()
            # this tree's migrate, as the agents run it
            os.execvpe(argv[0], argv, child_env())
        elif args.command == "health":
            res = health(args.hosts or None, timeout=args.timeout)
            json.dump(res, sys.stdout, indent=2)
            print()
            return 1 if any("error" in r for r in res.values()) else 0
        elif args.command == "_probe":
            res = _probe(args.host, args.timeout)
            json.dump(res, sys.stdout)
            return 1 if "error" in res else 0
    except RigError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
