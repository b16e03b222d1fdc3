"""deploy/provision.sh, the script the Vagrantfile runs on each VM, run
inside two rig hosts that have no agent of their own (VMs cannot run here):
it writes the config, certificates and inventory, starts the agent (no
systemd in a rig host: START_AGENT=1), and the two agents it made move a
process between them over mutual TLS."""

import json
import os
import sys

import pytest

from tests.integration.rigtest import REPO, Rig, RigWorkload, available, rig as rigmod

pytestmark = pytest.mark.skipif(not available(), reason="needs root, ip, nsenter, unshare")

PREFIX = "migprov"
PROVISION = os.path.join(REPO, "deploy", "provision.sh")
ADDR = {"A": "10.232.0.1", "B": "10.232.0.2"}

_GET = r"""
import json, ssl, sys, urllib.request, urllib.error
url, pki, token = sys.argv[1:4]
ctx = None
if url.startswith("https:"):
    ctx = ssl.create_default_context(cafile=pki + "/cacert.pem")
    ctx.load_cert_chain(pki + "/operator/cert.pem", pki + "/operator/private/key.pem")
req = urllib.request.Request(url)
if token:
    req.add_header("Authorization", "Bearer " + token)
try:
    with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
        print(json.dumps({"status": r.status, "body": json.load(r)}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": json.load(e)}))
"""


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(str(tmp_path_factory.mktemp("rig") / "state"))
    r.env["MIGRATE_RIG_PREFIX"] = PREFIX
    os.environ.update(r.env)
    rigmod.down(quiet=True)
    rigmod.up(hosts=["A", "B"], agent="none", force=True)
    r.inventory = None
    yield r
    r.down()


def provision(rig, host, root, ca):
    env = {"ROOT": root, "NO_APT": "1", "NO_PIP": "1", "NO_SYSTEMD": "1",
           "START_AGENT": "1", "MIGRATE": f"{sys.executable} -m migrate",
           "HOSTS": ",".join(f"{h}={a}" for h, a in ADDR.items()),
           "INTERFACE": "eth0", "STATUS_TOKEN": "pr0v"}
    cmd = ["env"] + [f"{k}={v}" for k, v in env.items()] + ["sh", PROVISION, host,
                                                            ADDR[host], ca]
    r = rig.run(host, *cmd, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "agent started" in r.stdout, r.stdout
    return r


def get(rig, host, url, pki, token=""):
    r = rig.run(host, sys.executable, "-c", _GET, url, pki, token)
    return json.loads(r.stdout)


def test_provisioned_agents_come_up_and_migrate(rig, tmp_path):
    ca = str(tmp_path / "pki")
    roots = {h: str(tmp_path / f"root-{h}") for h in ADDR}
    for h in ("A", "B"):
        provision(rig, h, roots[h], ca)
    pki = os.path.join(roots["A"], "etc", "migrate", "pki")
    assert os.stat(os.path.join(roots["A"], "etc", "migrate", "agent.toml")).st_mode & 0o077 \
        == 0                             # it holds the token
    for h in ("A", "B"):
        r = get(rig, "A", f"https://{ADDR[h]}:7443/api/v1/health", pki)
        assert r["status"] == 200 and r["body"]["host"] == h, r
        # the read-only listener is on the host's own localhost, behind the token
        r = get(rig, h, "http://127.0.0.1:7444/api/v1/health", pki)
        assert r["status"] == 401, r
        r = get(rig, h, "http://127.0.0.1:7444/api/v1/migrations", pki, "pr0v")
        assert r["status"] == 200 and r["body"] == {"migrations": []}, r
    # the inventory it wrote works: a process moves between the two
    inventory = os.path.join(roots["A"], "etc", "migrate", "hosts.toml")
    w = RigWorkload.program(rig, "A", str(tmp_path), "counter")
    try:
        w.wait_ready()
        r = rig.run("A", sys.executable, "-m", "migrate", "run", "--inventory", inventory,
                    "--src", "A", "--dst", "B", "--pid", str(w.pid), "--json",
                    timeout=120, check=False)
        rec = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
        assert r.returncode == 0 and rec.get("status") == "completed", r.stdout + r.stderr
        w.moved("B")
        w.assert_pass()
    finally:
        w.kill()
