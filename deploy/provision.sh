#!/bin/sh
# Provision one migrate host (Debian 12): the packages, the migrate package in
# a venv, /etc/migrate/agent.toml, its certificates, the systemd unit.
# A Vagrantfile runs it on each VM; the one-machine rig (deploy/rig/) does
# the same inside namespaces and does not call it.
#
#   provision.sh NAME ADDRESS [CA_DIR]
#
#   NAME     the host's name in the inventory and its certificate (A, B ...)
#   ADDRESS  where its agent listens: API on 7443, page-server on 27027
#   CA_DIR   a CA directory shared by the hosts (e.g. /vagrant/pki): made with
#            `migrate certs init` if it has none, then NAME's certificate
#            (naming ADDRESS too) and an `operator` one are issued into it and
#            copied to /etc/migrate/pki. Without it, put those files there
#            yourself.
#
# Environment:
#   HOSTS="A=192.168.56.11,B=192.168.56.12"   write /etc/migrate/hosts.toml,
#                                              the inventory `migrate run` reads
#   INTERFACE=eth1     where --move-address puts service addresses (default:
#                      the interface holding ADDRESS, else eth0)
#   MIGRATE_SRC=DIR    the source tree to install (default: this checkout)
#   ROOT=DIR           write the files under DIR instead of / (for tests; the
#                      config then names them under DIR too)
#   NO_APT=1 NO_PIP=1 NO_SYSTEMD=1   skip that step (NO_APT and NO_PIP are
#                      implied when the packages, or the venv, are there)
#   FORCE_APT=1 FORCE_PIP=1          do that step anyway
#   MIGRATE="cmd"      how to run migrate (default: the venv's)
#   STATUS_ADDRESS=127.0.0.1 STATUS_PORT=7444   the agent's read-only listener
#                      (status, events, metrics, dashboard); STATUS_PORT=0: none
#   STATUS_TOKEN=...   a bearer token that listener then requires
#   START_AGENT=1      without systemd: start the agent in the background
#                      (log $ROOT/var/log/migrate-agent.log, pid in
#                      $ROOT/run/migrate-agent.pid) and wait for its health
set -eu

usage() { echo "usage: $0 NAME ADDRESS [CA_DIR]" >&2; exit 2; }
[ $# -ge 2 ] && [ $# -le 3 ] || usage
NAME=$1
ADDRESS=$2
CA_DIR=${3:-}
case $NAME in *[!A-Za-z0-9]*|'') echo "$0: NAME: letters and digits only" >&2; exit 2;; esac

SRC=${MIGRATE_SRC:-$(cd "$(dirname "$0")/.." && pwd)}
ROOT=${ROOT:-}
VENV=/opt/migrate
ETC=$ROOT/etc/migrate
PKI=$ROOT/etc/migrate/pki            # as written in agent.toml
WORK=$ROOT/var/lib/migrate/work
PORT=7443
PAGE_SERVER_PORT=27027
STATUS_ADDRESS=${STATUS_ADDRESS:-127.0.0.1}
STATUS_PORT=${STATUS_PORT:-7444}
case $STATUS_PORT in *[!0-9]*|'') echo "$0: STATUS_PORT: a port number" >&2; exit 2;; esac

if [ -z "${INTERFACE:-}" ]; then
    INTERFACE=$(ip -o -4 addr show 2>/dev/null | awk -v a="$ADDRESS" \
        '{ split($4, p, "/"); if (p[1] == a) { print $2; exit } }')
    INTERFACE=${INTERFACE:-eth0}
fi

# 1. Debian packages: Python, a compiler for cffi and the test programs, the
#    network lock (nftables, iptables), ip and nsenter.
have_packages() {
    for c in python3 gcc make nft iptables ip nsenter; do
        command -v $c >/dev/null 2>&1 || return 1
    done
    python3 -c 'import venv, ensurepip' 2>/dev/null
}
if [ -z "${NO_APT:-}" ] && { [ -n "${FORCE_APT:-}" ] || ! have_packages; }; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q python3 python3-venv python3-pip gcc libc6-dev make \
        nftables iptables iproute2 util-linux ca-certificates
fi

# 2. The package, in a venv (Debian's Python refuses system-wide pip, PEP 668).
#    The protobuf modules are generated first, as `make protos` does; cffi's
#    module on the first import.
if [ -z "${NO_PIP:-}" ] && { [ -n "${FORCE_PIP:-}" ] || [ ! -x $VENV/bin/migrate ]; }; then
    python3 -m venv $VENV
    $VENV/bin/pip install -q --disable-pip-version-check grpcio-tools
    $VENV/bin/python -m grpc_tools.protoc -I"$SRC/migrate/images/proto" \
        --python_out="$SRC/migrate/images" "$SRC"/migrate/images/proto/*.proto
    $VENV/bin/pip install -q --disable-pip-version-check "$SRC"
    $VENV/bin/python -c 'import migrate.kernel._ffi'
    ln -sf $VENV/bin/migrate /usr/local/bin/migrate
fi
MIGRATE=${MIGRATE:-$VENV/bin/migrate}

# 3. Certificates: NAME's (named by ADDRESS too: agents are dialled at
#    https://ADDRESS:7443) and the operator's, from the shared CA.
if [ -n "$CA_DIR" ]; then
    [ -f "$CA_DIR/cacert.pem" ] || $MIGRATE certs init "$CA_DIR"
    [ -f "$CA_DIR/$NAME/cert.pem" ] || $MIGRATE certs issue "$CA_DIR" "$NAME" --ip "$ADDRESS"
    [ -f "$CA_DIR/operator/cert.pem" ] || $MIGRATE certs issue "$CA_DIR" operator
    for h in "$NAME" operator; do
        install -d -m 755 "$PKI/$h"
        install -d -m 700 "$PKI/$h/private"
        install -m 644 "$CA_DIR/$h/cert.pem" "$PKI/$h/cert.pem"
        install -m 600 "$CA_DIR/$h/private/key.pem" "$PKI/$h/private/key.pem"
    done
    install -m 644 "$CA_DIR/cacert.pem" "$PKI/cacert.pem"
    [ ! -f "$CA_DIR/cacrl.pem" ] || install -m 644 "$CA_DIR/cacrl.pem" "$PKI/cacrl.pem"
fi

# 4. The agent's config (the rig writes the same format: deploy/rig/rig.py).
TOKEN_LINE=""
if [ -n "${STATUS_TOKEN:-}" ]; then
    case $STATUS_TOKEN in
        *[!A-Za-z0-9._~+/=-]*) echo "$0: STATUS_TOKEN: letters, digits and ._~+/=- only" >&2
                               exit 2;;
    esac
    TOKEN_LINE="status_token = \"$STATUS_TOKEN\""
fi
install -d -m 755 "$ETC" "$WORK"
umask 077                            # agent.toml may hold the status token
cat > "$ETC/agent.toml" <<EOF
# Agent of host $NAME (deploy/provision.sh)
name = "$NAME"
address = "$ADDRESS"
port = $PORT
page_server_port = $PAGE_SERVER_PORT
work_dir = "$WORK"
inventory = "$ETC/hosts.toml"
interface = "$INTERFACE"
status_address = "$STATUS_ADDRESS"
status_port = $STATUS_PORT
$TOKEN_LINE
[tls]
cacert = "$PKI/cacert.pem"
cert = "$PKI/$NAME/cert.pem"
key = "$PKI/$NAME/private/key.pem"
EOF

if [ -n "${HOSTS:-}" ]; then
    {
        echo "# Inventory (deploy/provision.sh); \`migrate run --inventory\` reads it."
        echo "[tls]"
        echo "cacert = \"$PKI/cacert.pem\""
        echo "cert = \"$PKI/operator/cert.pem\""
        echo "key = \"$PKI/operator/private/key.pem\""
        echo "$HOSTS" | tr ',' '\n' | while IFS='=' read -r h a; do
            [ -n "$h" ] || continue
            echo
            echo "[hosts.$h]"
            echo "agent = \"https://$a:$PORT\""
            echo "address = \"$a\""
            echo "page_server_port = $PAGE_SERVER_PORT"
        done
    } > "$ETC/hosts.toml"
    chmod 644 "$ETC/hosts.toml"
fi
umask 022

# 5. The unit, where systemd runs.
if [ -z "${NO_SYSTEMD:-}" ] && [ -d /run/systemd/system ]; then
    install -m 644 "$SRC/deploy/migrate-agent.service" /etc/systemd/system/migrate-agent.service
    systemctl daemon-reload
    systemctl enable --now migrate-agent.service
elif [ -n "${START_AGENT:-}" ]; then
    install -d -m 755 "$ROOT/var/log" "$ROOT/run"
    LOG=$ROOT/var/log/migrate-agent.log
    nohup $MIGRATE agent --config "$ETC/agent.toml" >> "$LOG" 2>&1 < /dev/null &
    echo $! > "$ROOT/run/migrate-agent.pid"
    # up when its read-only listener (or, without one, its API port) answers
    port=$PORT; addr=$ADDRESS
    [ "$STATUS_PORT" = 0 ] || { port=$STATUS_PORT; addr=$STATUS_ADDRESS; }
    i=0
    until python3 -c "import socket,sys; socket.create_connection(('$addr', $port), 1)" \
            2>/dev/null; do
        i=$((i + 1))
        if [ $i -ge 100 ] || ! kill -0 "$(cat "$ROOT/run/migrate-agent.pid")" 2>/dev/null
        then
            echo "$0: the agent did not come up: $LOG:" >&2
            tail -n 20 "$LOG" >&2
            exit 1
        fi
        sleep 0.2
    done
    echo "$0: agent started (pid $(cat "$ROOT/run/migrate-agent.pid"), log $LOG)"
fi
echo "$0: $NAME ($ADDRESS on $INTERFACE): $ETC/agent.toml"
