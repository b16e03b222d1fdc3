"""Sockets whose other end is outside the dump."""

from __future__ import annotations

import os
import socket

from tests.integration.harness import Workload


def test_dgram_client_of_outside_server(workdir, workloads):
    """A datagram socket connected to a bound socket that is not dumped (the
    syslog case) is connected to that name again at restore."""
    path = os.path.join(workdir, "dg.srv")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(path)
    srv.settimeout(10)
    try:
        w = Workload.program("dgclient", workdir, path)
        workloads.append(w)
        w.wait_ready()
        assert srv.recv(64) == b"before"
        for i in range(3):
            images = os.path.join(workdir, f"img-{i}")
            w.dump(images)
            w.restore(images)
        w.assert_pass()
        assert srv.recv(64) == b"after"
    finally:
        srv.close()
