"""A stand-in for `migrate agent`, until the real one exists: reads the same
agent.toml and serves only ``GET /api/v1/health`` over mutual TLS, so the rig
and its certificates can be checked end to end.  Every other request gets
501.  Stdlib only.

    python3 deploy/rig/standin_agent.py --config /run/migrate-rig/A/agent.toml
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import signal
import socket
import ssl
import sys
import tomllib

log = logging.getLogger("standin-agent")


def server_context(tls: dict) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=tls["cacert"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    ctx.verify_mode = ssl.CERT_REQUIRED          # mutual TLS, as the real agent
    return ctx


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "migrate-standin-agent"

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode() + b"\n"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/api/v1/health":
            cfg = self.server.config
            peer = self.connection.getpeercert() or {}
            client = dict(x[0] for x in peer.get("subject", ())).get("commonName")
            self._reply(200, {"host": cfg["name"], "address": cfg["address"],
                              "hostname": socket.gethostname(), "pid": os.getpid(),
                              "agent": "standin", "client": client})
        else:
            self._reply(501, {"error": "stand-in agent: only /api/v1/health"})

    do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, fmt, *args):
        log.info("%s %s", self.client_address[0], fmt % args)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, config: dict):
        self.config = config
        self.tls = server_context(config["tls"])
        super().__init__((config["address"], int(config["port"])), Handler)

    def finish_request(self, request, client_address):
        # the handshake in the connection's thread, not in accept()
        request.settimeout(10)
        try:
            request = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.warning("%s: TLS handshake failed: %s", client_address[0], e)
            return
        super().finish_request(request, client_address)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    with open(args.config, "rb") as f:
        config = tomllib.load(f)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s standin-agent[{config['name']}] "
                               "%(levelname)s %(message)s")
    srv = Server(config)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
    log.info("%s: https://%s:%s/api/v1/health", config["name"], config["address"],
             config["port"])
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
