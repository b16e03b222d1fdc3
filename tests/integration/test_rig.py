"""The two-host rig (deploy/rig): hosts A, B, C come up in their own
namespaces, reach each other over the bridge, run an agent each (the real
`migrate agent` when this tree has it, else the stand-in), and `down` leaves
nothing behind, also after kill -9 and lost state.

The rig here uses the prefix ``migrt`` and a state directory under tmp_path,
so it never touches a rig (``migrig``, /run/migrate-rig) a human brought up.
"""

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib

import pytest
from cryptography import x509

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RIG_DIR = os.path.join(REPO, "deploy", "rig")
RIG = os.path.join(RIG_DIR, "rig.py")
sys.path.insert(0, RIG_DIR)
import rig

PREFIX = "migrt"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, veth)"),
    pytest.mark.skipif(not all(shutil.which(c) for c in ("ip", "nsenter", "unshare")),
                       reason="needs ip, nsenter and unshare"),
]


@pytest.fixture
def rigenv(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATE_RIG_PREFIX", PREFIX)
    monkeypatch.setenv("MIGRATE_RIG_DIR", str(tmp_path / "rig"))
    monkeypatch.delenv("MIGRATE_RIG_AGENT", raising=False)
    # the hosts' inits and agents import this tree's migrate
    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rig.down(quiet=True)
    yield str(tmp_path / "rig")
    rig.down(quiet=True)


def run_in(host, *cmd, check=True):
    r = subprocess.run(rig.exec_argv(host) + list(cmd), capture_output=True, text=True,
                       timeout=30, check=False)
    if check:
        assert r.returncode == 0, (cmd, r.stderr)
    return r


def ours_left(pids=()):
    """What of a `migrt` rig still exists: netns, root links, live processes."""
    rig.reap_recorded(pids)      # pytest's zombies, whose record down() lost
    left = [n for n in rig.netns_names() if n.startswith(PREFIX + "-")]
    left += rig.root_links()
    left += [f"pid {p}" for p, start in pids if rig.same_process(p, start)]
    return left


def recorded(st):
    return [(h[f"{k}_pid"], h[f"{k}_start"]) for h in st["hosts"].values()
            for k in ("init", "unshare")]


def reachable(src, dst_addr):
    """ping if there is one, else a TCP connect to the agent's port."""
    if shutil.which("ping"):
        return run_in(src, "ping", "-c1", "-W1", dst_addr, check=False).returncode == 0
    code = ("import socket, sys; "
            f"socket.create_connection((sys.argv[1], {rig.AGENT_PORT}), timeout=2)")
    return run_in(src, sys.executable, "-c", code, dst_addr, check=False).returncode == 0


def test_up_hosts_network_agents_down(rigenv):
    st = rig.up()
    assert st["up"] and set(st["hosts"]) == {"A", "B", "C"}
    addrs = {"A": "10.232.0.1", "B": "10.232.0.2", "C": "10.232.0.3"}
    raw = rig.read_state()
    pidns = set()
    for name, h in st["hosts"].items():
        assert h["address"] == addrs[name]
        assert rig.pid(name) == h["pid"]
        # its own hostname
        assert run_in(name, "hostname").stdout.strip() == f"{PREFIX}-{name}"
        # its own pid 1 (the host init) and /proc: a command run there sees
        # itself in the host's pid range (A 10000, B 20000 ...) and only the
        # host's processes
        out = run_in(name, "sh", "-c", 'echo $$; cat /proc/1/cmdline | tr "\\0" " "; echo; '
                                       'readlink /proc/self/ns/pid; ls /proc').stdout.split("\n")
        first = rig.FIXED_HOSTS[name] * rig.PIDS_PER_HOST
        assert h["first_pid"] == first
        assert first <= int(out[0]) < first + 100
        assert "hostinit.py" in out[1] and f"--name {name}" in out[1]
        pidns.add(out[2])
        procs = [int(p) for p in out[3:] if p.isdigit()]
        assert 1 in procs and len(procs) < 20
        # its own address, on eth0, and nothing else but lo
        links = json.loads(run_in(name, "ip", "-j", "addr", "show").stdout)
        assert sorted(ln["ifname"] for ln in links) == ["eth0", "lo"]
        eth0 = next(ln for ln in links if ln["ifname"] == "eth0")
        assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == \
            [addrs[name]]
    assert len(pidns) == 3 and os.readlink("/proc/self/ns/pid") not in pidns
    # the hosts know each other by name; the root's /etc/hosts is untouched
    resolve = "import socket, sys; print(*(socket.gethostbyname(h) for h in sys.argv[1:]))"
    assert run_in("C", sys.executable, "-c", resolve, "A", f"{PREFIX}-B").stdout.split() == \
        [addrs["A"], addrs["B"]]
    with open("/etc/hosts") as f:
        assert f"{PREFIX}-B" not in f.read()
    # nothing of the rig in the root network namespace
    assert rig.root_links() == []
    assert not any(a.get("local", "").startswith("10.232.") for ln in
                   json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True,
                                             text=True, check=True).stdout)
                   for a in ln.get("addr_info", []))
    # over the bridge, both ways
    for src in addrs:
        for dst, a in addrs.items():
            if src != dst:
                assert reachable(src, a), f"{src} -> {dst} ({a})"
    # every agent answers its health endpoint, over mutual TLS to its address
    for name, r in rig.health().items():
        assert r.get("host") == name, r
    # the CLI: exec passes the exit status through, status is JSON
    env = dict(os.environ)
    assert subprocess.run([sys.executable, RIG, "exec", "B", "--", "sh", "-c", "exit 7"],
                          env=env, check=False).returncode == 7
    s = json.loads(subprocess.run([sys.executable, RIG, "status"], env=env,
                                  capture_output=True, text=True, check=True).stdout)
    assert s["up"] and not s["stale"] and s["hosts"]["C"]["pid"] == st["hosts"]["C"]["pid"]
    # exec runs this tree's migrate
    r = subprocess.run([sys.executable, RIG, "exec", "A", "--", sys.executable, "-c",
                        "import migrate, socket; print(migrate.__file__, socket.gethostname())"],
                       env=env, capture_output=True, text=True, check=True)
    assert r.stdout.split() == [os.path.join(REPO, "migrate", "__init__.py"), f"{PREFIX}-A"]
    # a second up is refused
    with pytest.raises(rig.RigError, match="already up"):
        rig.up()

    pids = recorded(raw)
    rig.down()
    assert ours_left(pids) == []
    assert not os.path.exists(rigenv)
    rig.down()                           # idempotent


def test_files(rigenv):
    st = rig.up(hosts=["A", "B"], agent="none")
    assert set(st["hosts"]) == {"A", "B"}
    with open(os.path.join(rigenv, "hosts.toml"), "rb") as f:
        inv = tomllib.load(f)
    pki = os.path.join(rigenv, "pki")
    assert inv["tls"] == {"cacert": f"{pki}/cacert.pem",
                          "cert": f"{pki}/operator/cert.pem",
                          "key": f"{pki}/operator/private/key.pem"}
    assert inv["hosts"]["B"] == {"agent": "https://10.232.0.2:7443",
                                 "address": "10.232.0.2", "page_server_port": 27027}
    with open(os.path.join(rigenv, "A", "agent.toml"), "rb") as f:
        cfg = tomllib.load(f)
    assert cfg == {"name": "A", "address": "10.232.0.1", "port": 7443,
                   "page_server_port": 27027, "work_dir": f"{rigenv}/A/work",
                   "inventory": f"{rigenv}/hosts.toml", "interface": "eth0",
                   "tls": {"cacert": f"{pki}/cacert.pem", "cert": f"{pki}/A/cert.pem",
                           "key": f"{pki}/A/private/key.pem"}}
    assert os.path.isdir(cfg["work_dir"])
    for name, addr in (("A", "10.232.0.1"), ("B", "10.232.0.2")):
        with open(os.path.join(pki, name, "cert.pem"), "rb") as f:
            san = x509.load_pem_x509_certificate(f.read()).extensions \
                .get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [name]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(addr)]
    assert os.path.isfile(os.path.join(pki, "operator", "private", "key.pem"))
    # a host of its own: a file written there is on the shared file system
    run_in("A", "sh", "-c", f"hostname > {rigenv}/A/work/from-A")
    with open(f"{rigenv}/A/work/from-A") as f:
        assert f.read().strip() == f"{PREFIX}-A"


def test_crash_then_down(rigenv):
    """kill -9 of a host init, state partly lost, a veth left half-made in the
    root namespace: down still removes everything."""
    st = rig.up()
    pids = recorded(rig.read_state())
    os.kill(st["hosts"]["A"]["pid"], signal.SIGKILL)
    os.unlink(os.path.join(rigenv, "state.json"))
    shutil.rmtree(os.path.join(rigenv, "pki"))
    # as if up() had died between making a veth pair and moving it
    subprocess.run(["ip", "link", "add", f"{PREFIX}-X", "type", "veth", "peer", "name",
                    f"{PREFIX}-Xp"], check=True)
    assert rig.is_up()                    # B and C live on, found by their netns
    with pytest.raises(rig.RigError, match="already up"):
        rig.up()
    rig.down()
    assert ours_left(pids) == []
    assert not os.path.exists(rigenv)


def test_stale_state_then_up(rigenv):
    """Every host killed (say, a reboot of the namespaces): the next up
    cleans the stale state by itself; --force replaces a running rig."""
    st = rig.up(hosts=["A", "B"], agent="none")
    for h in st["hosts"].values():
        os.kill(h["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while rig.is_up() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not rig.status()["up"] and rig.status()["stale"]
    st2 = rig.up(hosts=["A", "B"], agent="none")
    assert st2["up"] and st2["hosts"]["A"]["pid"] != st["hosts"]["A"]["pid"]
    old = recorded(rig.read_state())
    st3 = rig.up(hosts=["A"], agent="none", force=True)
    assert set(st3["hosts"]) == {"A"}
    assert not any(rig.same_process(p, s) for p, s in old)
    pids = recorded(rig.read_state())
    rig.down()
    assert ours_left(pids) == []


def test_failed_up_leaves_nothing(rigenv):
    """An agent that never answers: up fails, saying so, and cleans up."""
    with pytest.raises(rig.RigError, match=r"not healthy.*no agent here"):
        rig.up(hosts=["A", "B"], agent="sh -c 'echo no agent here; exit 3'",
               health_timeout=1)
    assert ours_left() == []
    assert not os.path.exists(rigenv)


def test_down_with_nothing(rigenv):
    rig.down()
    rig.down()
    assert ours_left() == []
    with pytest.raises(rig.RigError, match="is the rig up"):
        rig.exec_argv("A")


def test_names_checked(rigenv, monkeypatch):
    with pytest.raises(rig.RigError, match="over 15 characters"):
        rig.up(hosts=["A", "ABCDEFGHIJ"])
    with pytest.raises(rig.RigError, match="letters and digits"):
        rig.up(hosts=["A-1"])
    monkeypatch.setenv("MIGRATE_RIG_PREFIX", "Bad-Prefix")
    with pytest.raises(rig.RigError, match="MIGRATE_RIG_PREFIX"):
        rig.down()
    monkeypatch.setenv("MIGRATE_RIG_PREFIX", PREFIX)
    assert rig.host_numbers(["B", "D", "C", "E"]) == {"B": 2, "C": 3, "D": 4, "E": 5}


def test_provision_files(tmp_path):
    """deploy/provision.sh (the Vagrant path) writes the same agent.toml and
    certificates as the rig; packages, pip and systemd skipped here."""
    root, ca = tmp_path / "root", tmp_path / "ca"
    env = dict(os.environ, ROOT=str(root), NO_APT="1", NO_PIP="1", NO_SYSTEMD="1",
               INTERFACE="eth1", HOSTS="A=192.168.56.11,B=192.168.56.12",
               MIGRATE=f"env PYTHONPATH={REPO} {sys.executable} -m migrate")
    subprocess.run(["sh", os.path.join(REPO, "deploy", "provision.sh"), "B",
                    "192.168.56.12", str(ca)], env=env, check=True, capture_output=True)
    etc = root / "etc" / "migrate"
    with open(etc / "agent.toml", "rb") as f:
        cfg = tomllib.load(f)
    # (the paths in the files are under ROOT, where they are: ROOT is / on a host)
    r = str(root)
    assert {k: cfg[k] for k in ("name", "address", "port", "page_server_port", "work_dir",
                                "inventory", "interface", "tls")} == {
        "name": "B", "address": "192.168.56.12", "port": 7443,
        "page_server_port": 27027, "work_dir": f"{r}/var/lib/migrate/work",
        "inventory": f"{r}/etc/migrate/hosts.toml", "interface": "eth1",
        "tls": {"cacert": f"{r}/etc/migrate/pki/cacert.pem",
                "cert": f"{r}/etc/migrate/pki/B/cert.pem",
                "key": f"{r}/etc/migrate/pki/B/private/key.pem"}}
    with open(etc / "hosts.toml", "rb") as f:
        inv = tomllib.load(f)
    assert inv["hosts"]["A"] == {"agent": "https://192.168.56.11:7443",
                                 "address": "192.168.56.11", "page_server_port": 27027}
    assert inv["tls"]["cert"] == f"{r}/etc/migrate/pki/operator/cert.pem"
    with open(etc / "pki" / "B" / "cert.pem", "rb") as f:
        san = x509.load_pem_x509_certificate(f.read()).extensions \
            .get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.168.56.12")]
    assert oct(os.stat(etc / "pki" / "B" / "private" / "key.pem").st_mode & 0o777) == "0o600"
    assert (etc / "pki" / "operator" / "private" / "key.pem").is_file()
    assert (root / "var" / "lib" / "migrate" / "work").is_dir()


# The announcement --move-address sends (orchestrator/address.announce), run
# inside the host that took the address: its MAC must be that host's own.
ANNOUNCE = """
import sys
from migrate.orchestrator import address
address.announce(sys.argv[2], sys.argv[1])
"""


def _neigh(host, addr):
    out = json.loads(run_in(host, "ip", "-j", "neigh", "show", addr).stdout or "[]")
    return out[0].get("lladdr") if out else None


def _mac(host):
    return json.loads(run_in(host, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]


def test_moved_service_address(rigenv):
    """A service address moved from A to B (what --move-address does) is
    reached from C only once B announces it: `ip addr add` sends no
    gratuitous ARP, and C keeps A's MAC for as long as its entry is
    REACHABLE (base_reachable_time, ~30 s): connects time out meanwhile."""
    rig.up(agent="none")
    svc = "10.232.0.100"
    run_in("A", "ip", "addr", "add", f"{svc}/24", "dev", "eth0")
    probe = ("import socket, sys\ntry: socket.create_connection((sys.argv[1], 9), timeout=2)\n"
             "except ConnectionRefusedError: pass\n")
    run_in("C", sys.executable, "-c", probe, svc)          # refused by A: C learns A's MAC
    assert _neigh("C", svc) == _mac("A")
    run_in("A", "ip", "addr", "del", f"{svc}/24", "dev", "eth0")
    run_in("B", "ip", "addr", "add", f"{svc}/24", "dev", "eth0")
    assert _neigh("C", svc) == _mac("A")                   # stale: packets go to A
    run_in("B", sys.executable, "-c", ANNOUNCE, "eth0", svc)
    deadline = time.monotonic() + 2
    while _neigh("C", svc) != _mac("B") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _neigh("C", svc) == _mac("B")
    run_in("C", sys.executable, "-c", probe, svc)          # refused by B, at once


NETLINK = """
import sys
from migrate.orchestrator import address
ip = sys.argv[1]
address.add_now(ip, "eth0")
address.add_now(ip, "eth0")                 # there already: fine
print(address.has(ip))
address.remove(ip, "eth0")
address.remove(ip, "eth0")                  # gone already: fine
print(address.has(ip))
try:
    address.add(ip, "nosuchif0")
except address.AddressError as e:
    print(e)
"""


def test_address_by_netlink(rigenv):
    """The moved address's own rtnetlink requests (orchestrator/address.py):
    a /32 added and removed on a host's interface, twice each, and an
    interface that does not exist named in the error."""
    rig.up(hosts=["A"], agent="none")
    svc = "10.232.0.101"
    out = run_in("A", sys.executable, "-c", NETLINK, svc).stdout.splitlines()
    assert out == ["True", "False", "no interface nosuchif0"]
    assert svc not in run_in("A", "ip", "-j", "addr", "show").stdout


COUNTER = os.path.join(REPO, "tests", "programs", "bin", "counter")


@pytest.fixture
def counter():
    # `make test` builds the programs: missing, the set-up is broken (a skip
    # would hide it)
    assert os.path.exists(COUNTER), f"{COUNTER}: not built (make programs)"
    return COUNTER


def test_dump_on_A_restore_on_B(rigenv, tmp_path, counter):
    """The hosts are hosts for migrate: a process dumped on A comes back on B
    at its pid (A's range, 10000 on, is free on B, whose own processes, its
    agent first, start at 20000), counts on, and B's init reaps it when it
    exits."""
    rig.up(hosts=["A", "B"])
    img, out = str(tmp_path / "img"), str(tmp_path / "counter.out")
    start = ("import subprocess, sys\n"
             "p = subprocess.Popen([sys.argv[1]], stdin=subprocess.DEVNULL,"
             " stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT,"
             " start_new_session=True)\nprint(p.pid)\n")
    n = int(run_in("A", sys.executable, "-c", start, COUNTER, out).stdout)
    assert 10000 < n < 20000
    time.sleep(0.5)
    migrate = [sys.executable, "-m", "migrate"]
    run_in("A", *migrate, "dump", "-t", str(n), "-D", img)
    assert str(n) not in run_in("A", "ps", "-o", "pid=", "ax").stdout.split()
    run_in("B", *migrate, "restore", "-D", img, "-d")
    with open(out) as f:
        before = f.read().count("count")
    time.sleep(0.5)
    with open(out) as f:
        assert f.read().count("count") > before
    run_in("B", "kill", "-TERM", str(n))
    deadline = time.monotonic() + 5
    while str(n) in run_in("B", "ps", "-o", "pid=", "ax").stdout.split():
        assert time.monotonic() < deadline, "not reaped by B's init"
        time.sleep(0.05)
    with open(out) as f:
        assert f.read().split()[-1] == "PASS"


def test_dump_to_B_page_server_over_tls(rigenv, counter):
    """A dumps into B's page-server at 10.232.0.2 over mutual TLS with the
    rig's certificates (B's names its address, so hostname checking holds),
    and B restores from what arrived: the path the agents take."""
    st = rig.up(hosts=["A", "B"], agent="none")
    pki = os.path.join(rigenv, "pki")
    work = {h: os.path.join(rigenv, h, "work") for h in "AB"}

    def tls(host):
        return ["--tls-cacert", f"{pki}/cacert.pem", "--tls-cert", f"{pki}/{host}/cert.pem",
                "--tls-key", f"{pki}/{host}/private/key.pem"]
    out = os.path.join(work["A"], "counter.out")
    start = ("import subprocess, sys\n"
             "p = subprocess.Popen([sys.argv[1]], stdin=subprocess.DEVNULL,"
             " stdout=open(sys.argv[2], 'w'), stderr=subprocess.STDOUT,"
             " start_new_session=True)\nprint(p.pid)\n")
    n = int(run_in("A", sys.executable, "-c", start, COUNTER, out).stdout)
    migrate = [sys.executable, "-m", "migrate"]
    b = st["hosts"]["B"]["address"]
    ps = os.path.join(work["B"], "ps")
    # -d: it returns once listening; its daemon keeps stdout, so not a pipe
    with open(os.path.join(work["B"], "ps.log"), "w") as log:
        subprocess.run(rig.exec_argv("B") + migrate + [
            "page-server", "-D", ps, "--address", b, "--port", str(rig.PAGE_SERVER_PORT),
            "-d", "--pidfile", os.path.join(work["B"], "ps.pid"), *tls("B")],
            stdout=log, stderr=log, check=True, timeout=30)
    run_in("A", *migrate, "dump", "-t", str(n), "-D", os.path.join(work["A"], "dump"),
           "--page-server", "--address", b, "--port", str(rig.PAGE_SERVER_PORT), *tls("A"))
    assert os.path.exists(os.path.join(ps, "inventory.img"))
    run_in("B", *migrate, "restore", "-D", ps, "-d")
    time.sleep(0.3)
    run_in("B", "kill", "-TERM", str(n))
    deadline = time.monotonic() + 5
    while True:
        with open(out) as f:
            if f.read().split()[-1:] == ["PASS"]:
                break
        assert time.monotonic() < deadline, "no PASS from the counter on B"
        time.sleep(0.05)


def test_failure_half_way(rigenv, monkeypatch):
    """ip failing while host B is wired (A is up, B's init running): up
    raises, and down has taken A, B and the switch away; no fd is left open."""
    real_ip = rig.ip

    def failing_ip(*args, **kw):
        if args[:2] == ("netns", "attach") and args[2] == f"{PREFIX}-B":
            raise rig.RigError("ip netns attach: injected failure")
        return real_ip(*args, **kw)
    monkeypatch.setattr(rig, "ip", failing_ip)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(rig.RigError, match="injected failure"):
        rig.up(agent="none")
    assert set(os.listdir("/proc/self/fd")) <= fds
    assert ours_left() == []
    assert not os.path.exists(rigenv)
