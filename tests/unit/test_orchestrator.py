"""The orchestrator's parsers and records: inventory and agent configs,
migration options, the ARP announcement, the status record."""

import socket
import struct

import pytest

from migrate.orchestrator import address, inventory as inv, migration as mig


def _write(tmp_path, text, name="hosts.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_inventory_reads_hosts_and_tls(tmp_path):
    path = _write(tmp_path, """
[tls]
cacert = "/pki/cacert.pem"
cert = "/pki/op/cert.pem"
key = "/pki/op/private/key.pem"

[hosts.A]
agent = "https://10.0.0.1:7443/"
address = "10.0.0.1"

[hosts.B]
agent = "https://10.0.0.2:7443"
page_server_port = 27028
""")
    i = inv.load_inventory(path)
    assert i.host("A") == inv.Host("A", "https://10.0.0.1:7443", "10.0.0.1", 27027)
    assert i.host("B").address == "10.0.0.2"         # from the agent URL
    assert i.host("B").page_server_port == 27028
    assert i.tls.cert == "/pki/op/cert.pem" and i.tls.cacrl is None
    with pytest.raises(inv.ConfigError, match=r"unknown host 'C' \(known: A, B\)"):
        i.host("C")


@pytest.mark.parametrize("text, why", [
    ("[hosts.A]\nagent = 'ftp://x'\n", "not an https:// URL"),
    ("[hosts.A]\naddress = '1.2.3.4'\n", r"\[hosts.A\]: agent is missing"),
    ("[hosts.A]\nagent = 'https://a:1'\npage_server_port = 70000\n", "port number"),
    ("[hosts.A]\nagent = 'https://a:1'\npage_server_port = true\n", "port number"),
    ("hosts = 3\n", "must be a table"),
    ("[tls]\ncacert = 'x'\n", r"\[tls\]: cert is missing"),
    ("[hosts\n", "not valid TOML"),
])
def test_inventory_errors_say_what_and_where(tmp_path, text, why):
    path = _write(tmp_path, text)
    with pytest.raises(inv.ConfigError, match=why) as e:
        inv.load_inventory(path)
    assert path in str(e.value)


def test_inventory_missing_file(tmp_path):
    with pytest.raises(inv.ConfigError, match="no such file"):
        inv.load_inventory(str(tmp_path / "nope.toml"))


def test_inventory_path_precedence(monkeypatch):
    monkeypatch.setenv("MIGRATE_INVENTORY", "/env/hosts.toml")
    assert inv.inventory_path("/given.toml") == "/given.toml"
    assert inv.inventory_path(None) == "/env/hosts.toml"
    monkeypatch.delenv("MIGRATE_INVENTORY")
    assert inv.inventory_path(None) == inv.DEFAULT_INVENTORY


def test_agent_config(tmp_path):
    path = _write(tmp_path, 'name = "A"\naddress = "10.0.0.1"\nwork_dir = "/w"\n'
                            'interface = "eth0"\n', "agent.toml")
    c = inv.load_agent_config(path)
    assert (c.name, c.address, c.port, c.page_server_port, c.work_dir, c.interface,
            c.tls) == ("A", "10.0.0.1", 7443, 27027, "/w", "eth0", None)
    with pytest.raises(inv.ConfigError, match="name is missing"):
        inv.load_agent_config(_write(tmp_path, 'address = "x"\n', "bad.toml"))


def test_options_defaults_and_checks():
    o = mig.Options.from_json({})
    assert o.downtime_limit == 0.3 and o.max_rounds == 30 and o.restore_fill == "auto"
    assert mig.Options.from_json({"move_address": "10.1.2.3", "max_bandwidth": 1 << 20})
    for bad, why in [({"bogus": 1}, "unknown option: bogus"),
                     ({"downtime_limit": 0}, "downtime_limit"),
                     ({"downtime_limit": "1"}, "downtime_limit"),
                     ({"max_rounds": -1}, "max_rounds"),
                     ({"max_bandwidth": 0}, "max_bandwidth"),
                     ({"post_copy": "maybe"}, "post_copy"),
                     ({"restore_fill": "x"}, "restore_fill"),
                     ({"streams": 9}, "streams"),
                     ({"move_address": "10.1.2"}, "not an IP address")]:
        with pytest.raises(ValueError, match=why):
            mig.Options.from_json(bad)


def test_arp_announcement_layout():
    mac = bytes.fromhex("020000000001")
    f = address.arp_announcement("10.232.0.100", mac)
    assert len(f) == 42
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac
    assert struct.unpack("!H", f[12:14])[0] == address.ETH_P_ARP
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1)
    # RFC 5227 announcement: sender and target protocol address are the same
    assert f[22:28] == mac and f[28:32] == socket.inet_aton("10.232.0.100")
    assert f[32:38] == b"\0" * 6 and f[38:42] == f[28:32]


def test_address_refuses_garbage():
    with pytest.raises(address.AddressError, match="not an IP address"):
        address.add("10.0.0", "eth0")


def test_migration_record_and_events():
    m = mig.Migration("source", 1234, "A", "B", mig.Options())
    seen = []

    class Q:
        def put_nowait(self, ev):
            seen.append(ev)
    m.listeners.add(Q())
    m.set_phase("prepare")
    m.set_phase("pre-copy")
    m.rounds.append(mig.Round(1, 10, 40960, 0.5, 10))
    m.finish(mig.FAILED, mig.MigrationFailed("stop", "the link broke"))
    d = m.as_dict()
    assert d["status"] == "failed" and d["phase"] == "pre-copy"
    assert d["error"] == {"phase": "stop", "message": "the link broke"}
    assert d["rounds"] == [{"round": 1, "pages": 10, "bytes": 40960, "seconds": 0.5,
                            "dirty_pages": 10}]
    assert d["setup_time"] is not None and d["total_time"] >= 0
    assert [e["type"] for e in seen] == ["phase", "phase", "status"]


def test_address_netlink_request():
    """RTM_NEWADDR for a /32 as `ip addr add A/32 dev IF` sends it: header,
    ifaddrmsg, IFA_LOCAL and IFA_ADDRESS (man 7 rtnetlink)."""
    import ipaddress
    msg = address.address_message("add", ipaddress.ip_address("10.232.0.120"), 7, seq=3)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (len(msg), address.RTM_NEWADDR, 3, 0)
    assert flags == 0x1 | 0x4 | 0x200 | 0x400        # REQUEST, ACK, EXCL, CREATE
    assert struct.unpack_from("=BBBBI", msg, 16) == (socket.AF_INET, 32, 0, 0, 7)
    assert msg[24:32] == struct.pack("=HH", 8, address.IFA_LOCAL) + bytes([10, 232, 0, 120])
    assert msg[32:40] == struct.pack("=HH", 8, address.IFA_ADDRESS) + bytes([10, 232, 0, 120])
    assert len(msg) == 40
    v6 = address.address_message("del", ipaddress.ip_address("fd00::5"), 2)
    assert struct.unpack_from("=IH", v6) == (len(v6), address.RTM_DELADDR)
    assert struct.unpack_from("=BB", v6, 16) == (socket.AF_INET6, 128)
    assert len(v6) == 16 + 8 + 2 * 20


def test_address_netlink_answer():
    ack = struct.pack("=IHHII", 36, address.NLMSG_ERROR, 0, 1, 99) + struct.pack("=i", 0)
    assert address.ack_errno(ack + bytes(16)) == 0
    nak = struct.pack("=IHHII", 36, address.NLMSG_ERROR, 0, 1, 99) + struct.pack("=i", -17)
    assert address.ack_errno(nak + bytes(16)) == 17
    with pytest.raises(address.AddressError, match="short answer"):
        address.ack_errno(b"\0" * 8)
    with pytest.raises(address.AddressError, match="seq 5"):
        address.ack_errno(struct.pack("=IHHII", 36, address.NLMSG_ERROR, 0, 5, 0) + bytes(20))
