"""The inventory of hosts (`hosts.toml`) and an agent's own config.

The inventory, found by ``--inventory``, ``$MIGRATE_INVENTORY`` or
``/etc/migrate/hosts.toml``::

    [tls]                    # the client certificate `migrate run` uses
    cacert = "/etc/migrate/pki/cacert.pem"
    cert = "/etc/migrate/pki/operator/cert.pem"
    key = "/etc/migrate/pki/operator/private/key.pem"

    [hosts.A]
    agent = "https://10.232.0.1:7443"     # the agent's HTTPS API
    address = "10.232.0.1"                # its page-server's address
    page_server_port = 27027

An agent's config (`migrate agent --config FILE`)::

    name = "A"
    address = "10.232.0.1"    # the API (port) and the page-server listen here
    port = 7443
    page_server_port = 27027
    work_dir = "/var/lib/migrate"
    inventory = "/etc/migrate/hosts.toml"   # to find the other agents
    interface = "eth0"        # where --move-address puts a service address
    status_address = "127.0.0.1"   # the read-only listener (api.py); port 0: none
    status_port = 7444
    status_token = "..."      # optional: then required there as a bearer token
    [tls]
    cacert = ...; cert = ...; key = ...; cacrl = ... (optional)
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tomllib
from urllib.parse import urlsplit

from migrate import errors

DEFAULT_INVENTORY = "/etc/migrate/hosts.toml"
DEFAULT_PORT = 7443
DEFAULT_PS_PORT = 27027
DEFAULT_STATUS_PORT = 7444


class ConfigError(errors.MigrateError):
    """An inventory or agent config that cannot be used."""


@dataclasses.dataclass(frozen=True)
class TLS:
    cacert: str
    cert: str
    key: str
    cacrl: str | None = None

    def client_context(self) -> ssl.SSLContext:
        from migrate.pageserver import tls
        # Agents are named by address in the inventory; their certificates
        # carry it (certs issue --ip), so the name is checked.
        return tls.client_context(self.cacert, self.cert, self.key, self.cacrl)

    def server_context(self) -> ssl.SSLContext:
        from migrate.pageserver import tls
        return tls.server_context(self.cacert, self.cert, self.key, self.cacrl)


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    agent: str              # https://ADDR:PORT
    address: str            # page-server address
    page_server_port: int = DEFAULT_PS_PORT


@dataclasses.dataclass(frozen=True)
class Inventory:
    path: str
    hosts: dict[str, Host]
    tls: TLS | None

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError:
            known = ", ".join(sorted(self.hosts)) or "none"
            raise ConfigError(f"{self.path}: unknown host {name!r} (known: {known})") \
                from None


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    path: str
    name: str
    address: str
    port: int
    page_server_port: int
    work_dir: str
    tls: TLS | None
    inventory: str | None = None
    interface: str | None = None
    # the read-only listener (status, events, metrics, dashboard): plaintext,
    # on localhost by default; port 0 turns it off; a token, when set, is
    # required there as "Authorization: Bearer TOKEN"
    status_address: str = "127.0.0.1"
    status_port: int = DEFAULT_STATUS_PORT
    status_token: str | None = None


def _load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _str(path: str, table: dict, key: str, where: str, default=None) -> str:
    v = table.get(key, default)
    if v is None:
        raise ConfigError(f"{path}: {where}: {key} is missing")
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{path}: {where}: {key} must be a non-empty string")
    return v


def _port(path: str, table: dict, key: str, where: str, default: int) -> int:
    v = table.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise ConfigError(f"{path}: {where}: {key} must be a port number (1..65535)")
    return v


def _tls(path: str, doc: dict) -> TLS | None:
    t = doc.get("tls")
    if t is None:
        return None
    if not isinstance(t, dict):
        raise ConfigError(f"{path}: [tls] must be a table")
    return TLS(_str(path, t, "cacert", "[tls]"), _str(path, t, "cert", "[tls]"),
               _str(path, t, "key", "[tls]"),
               _str(path, t, "cacrl", "[tls]") if "cacrl" in t else None)


def inventory_path(given: str | None) -> str:
    return given or os.environ.get("MIGRATE_INVENTORY") or DEFAULT_INVENTORY


def load_inventory(given: str | None = None) -> Inventory:
    path = inventory_path(given)
    doc = _load(path)
    hosts = {}
    table = doc.get("hosts", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [hosts] must be a table of hosts")
    for name, h in table.items():
        where = f"[hosts.{name}]"
        if not isinstance(h, dict):
            raise ConfigError(f"{path}: {where} must be a table")
        agent = _str(path, h, "agent", where)
        u = urlsplit(agent)
        if u.scheme not in ("https", "http") or not u.hostname:
            raise ConfigError(f"{path}: {where}: agent {agent!r} is not an https:// URL")
        hosts[name] = Host(name, agent.rstrip("/"), _str(path, h, "address", where,
                                                          u.hostname),
                           _port(path, h, "page_server_port", where, DEFAULT_PS_PORT))
    return Inventory(path, hosts, _tls(path, doc))


def load_agent_config(path: str) -> AgentConfig:
    doc = _load(path)
    return AgentConfig(
        path=path, name=_str(path, doc, "name", "top level"),
        address=_str(path, doc, "address", "top level"),
        port=_port(path, doc, "port", "top level", DEFAULT_PORT),
        page_server_port=_port(path, doc, "page_server_port", "top level", DEFAULT_PS_PORT),
        work_dir=_str(path, doc, "work_dir", "top level", "/var/lib/migrate"),
        tls=_tls(path, doc), inventory=doc.get("inventory"),
        interface=doc.get("interface"),
        status_address=_str(path, doc, "status_address", "top level", "127.0.0.1"),
        status_port=_status_port(path, doc),
        status_token=_str(path, doc, "status_token", "top level") if "status_token" in doc
        else None)


def _status_port(path: str, doc: dict) -> int:
    if doc.get("status_port") == 0:
        return 0
    return _port(path, doc, "status_port", "top level", DEFAULT_STATUS_PORT)
