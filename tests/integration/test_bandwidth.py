"""--max-bandwidth on the data path: a real pre-dump of a 64 MiB memhog
through a real `--no-tls` page-server, timed from the client's own log (sink
open to COMMITTED, so the command's start-up does not count).  A functional
check of the limit with a loose bound; the figures are printed."""

from __future__ import annotations

import os
import re

from tests.integration.harness import migrate
from tests.integration.test_pageserver import (Server, pki, servers,  # noqa: F401 (fixtures)
                                               start, tls_args)

COMMITTED = re.compile(r"committed, \d+ files, ([\d.]+) MiB in ([\d.]+) s")


def pre_dump(w, workdir: str, srv: Server, session: str, *extra: str) -> tuple[float, float]:
    """(MiB, seconds) of one pre-dump through ``srv`` (plaintext unless
    ``extra`` has TLS flags)."""
    logs = os.path.join(workdir, f"logs-{session}")
    tls = () if "--tls-cert" in extra else ("--no-tls",)
    p = migrate("pre-dump", "-t", str(w.pid), "-D", logs, "-v4", "-o", "pre-dump.log",
                "--page-server", "--address", "127.0.0.1", "--port", str(srv.port),
                "--session", session, *tls, *extra)
    with open(os.path.join(logs, "pre-dump.log")) as f:
        log = f.read()
    assert p.returncode == 0, f"{p.stderr}\n{log[-3000:]}"
    m = COMMITTED.search(log)
    assert m, log[-3000:]
    return float(m.group(1)), float(m.group(2))


def test_max_bandwidth_is_honoured(tmp_path, workdir, workloads, servers):  # noqa: F811
    srv = Server(str(tmp_path / "srv"), str(tmp_path / "ps.log"), "--serve", "--no-tls")
    servers.append(srv)
    w = start("memhog", workdir, workloads, "64")
    figures = {}
    for session, extra in [("free", ()), ("paced", ("--max-bandwidth", "64M")),
                           ("paced2", ("--max-bandwidth", "64M", "--ps-streams", "2"))]:
        mib, secs = pre_dump(w, workdir, srv, session, *extra)
        figures[session] = (mib, secs)
        assert mib >= 64, f"{session}: only {mib} MiB sent"
    print("\n" + ", ".join(f"{k}: {m:.1f} MiB in {s:.2f} s = {m / s:.1f} MiB/s"
                           for k, (m, s) in figures.items()))
    for session in ("paced", "paced2"):
        mib, secs = figures[session]
        # 64 MiB/s with a 3.2 MiB burst: >= ~0.95 s for 64 MiB
        assert secs >= 0.9, f"{session}: {mib} MiB in {secs} s: the limit is not honoured"
        assert mib / secs <= 64 * 1.1
    w.assert_pass()


def test_max_bandwidth_over_tls(tmp_path, workdir, workloads, servers, pki):  # noqa: F811
    srv = Server(str(tmp_path / "srv"), str(tmp_path / "ps.log"), "--serve",
                 *tls_args(pki["good"]))
    servers.append(srv)
    w = start("memhog", workdir, workloads, "32")
    mib, secs = pre_dump(w, workdir, srv, "tls", "--max-bandwidth", "32M", "--ps-streams",
                         "2", *tls_args(pki["good"]))
    print(f"\nTLS, 2 streams, --max-bandwidth 32M: {mib:.1f} MiB in {secs:.2f} s = "
          f"{mib / secs:.1f} MiB/s")
    assert mib >= 32 and secs >= 0.9
    w.assert_pass()
