#!/bin/sh
# Install what migrate needs on a fresh Debian machine: a C compiler for the
# test programs, then the Python package with its test dependencies.
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
missing=""
command -v gcc >/dev/null 2>&1 || missing="$missing gcc libc6-dev"
command -v make >/dev/null 2>&1 || missing="$missing make"
# a real program the tests dump and restore (tests/integration/test_real.py)
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
# the network lock and the namespaced TCP tests (tests/integration/test_tcp.py)
command -v nft >/dev/null 2>&1 || missing="$missing nftables"
# the lock drives nftables in-process (migrate/kernel/nftables.py): libnftables1
# comes with nftables, but a machine may have the library's package removed
ldconfig -p 2>/dev/null | grep -q 'libnftables\.so\.1 ' || missing="$missing libnftables1"
command -v iptables >/dev/null 2>&1 || missing="$missing iptables"
command -v ip >/dev/null 2>&1 || missing="$missing iproute2"
command -v nsenter >/dev/null 2>&1 || missing="$missing util-linux"
# the dashboard test drives Debian's Chromium with Playwright (never
# `playwright install`: tests/integration/test_api_rig.py)
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q $missing
fi
# The dependencies (prometheus-client among them) and the test ones: pytest,
# hypothesis, schemathesis (the OpenAPI run), playwright (its Python driver
# only), jsonschema: pyproject.toml.
$PYTHON -m pip install -q --disable-pip-version-check -e '.[dev]'
