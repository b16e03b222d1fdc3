"""schemathesis against a live agent's OpenAPI document: no request it
makes from the document (valid or not) gets a 5xx.

The agent runs plaintext in a network namespace of its own (unshare -n):
the document's POST /incoming/{id}/address adds and removes addresses, which
must never touch this machine's.  It has no inventory, so no migration can
start.  /api/v1/events is left out: the stream never ends (the unit and rig
tests cover it)."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import schemathesis.cli  # noqa: F401
    HAVE = True
except ImportError:
    HAVE = False
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not HAVE,
    reason="needs root, unshare and schemathesis")
ST = f'"{sys.executable}" -m schemathesis.cli'     # `st`, wherever pip put it

EXAMPLES = os.environ.get("MIGRATE_SCHEMATHESIS_EXAMPLES", "25")


def test_no_server_errors(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'name = "T"\naddress = "127.0.0.1"\nport = 7443\n'
                   f'page_server_port = 27027\nwork_dir = "{tmp_path}/work"\n'
                   'status_port = 7444\n')
    log = tmp_path / "agent.log"
    script = (
        "ip link set lo up\n"
        f'"{sys.executable}" -m migrate agent --config "{cfg}" > "{log}" 2>&1 &\n'
        "A=$!\n"
        f"{ST} run http://127.0.0.1:7443/api/v1/openapi.json --wait-for-schema 30 "
        f"-c not_a_server_error -n {EXAMPLES} --exclude-path /api/v1/events "
        "--request-timeout 10 --no-color -w 2\n"
        "rc=$?\n"
        # the read-only listener's own document: GET only, same answers
        f"{ST} run http://127.0.0.1:7444/api/v1/openapi.json --url http://127.0.0.1:7444 "
        f"-c not_a_server_error -n 5 --exclude-path /api/v1/events --include-method GET "
        "--request-timeout 10 --no-color -w 1 || rc=$?\n"
        "kill $A; wait $A\n"
        "exit $rc\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MIGRATE_INCOMING_IDLE_S="3")
    r = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True,
                       timeout=240, env=env, cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:] + "\n--- agent log:\n" + log.read_text()[-3000:]
    assert "Server error" not in out
