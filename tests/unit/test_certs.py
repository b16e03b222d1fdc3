"""`certs issue --ip`: a host certificate that names its address too, so a
client dialling https://10.232.0.1 verifies host A (the rig's agents)."""

import ipaddress
import socket
import ssl
import threading

import pytest
from cryptography import x509

from migrate import cli
from migrate.pageserver import certs, tls


def _sans(path):
    with open(path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName), ext.get_values_for_type(x509.IPAddress)


def test_issue_with_ips(tmp_path):
    d = str(tmp_path)
    certs.init(d)
    p = certs.issue(d, "A", ips=["10.232.0.1", "fd00::1"])
    dns, ips = _sans(p["cert"])
    assert dns == ["A"]
    assert ips == [ipaddress.ip_address("10.232.0.1"), ipaddress.ip_address("fd00::1")]


def test_issue_without_ips_unchanged(tmp_path):
    d = str(tmp_path)
    certs.init(d)
    assert _sans(certs.issue(d, "A")["cert"]) == (["A"], [])
    # an address given both as the host and in ips is named once
    assert _sans(certs.issue(d, "10.0.0.9", ips=["10.0.0.9"])["cert"]) == \
        ([], [ipaddress.ip_address("10.0.0.9")])


def test_issue_bad_ip(tmp_path):
    d = str(tmp_path)
    certs.init(d)
    with pytest.raises(certs.CertError, match="bad IP address 'A.B'"):
        certs.issue(d, "A", ips=["A.B"])


def test_cli_ip_flag(tmp_path, capsys):
    d = str(tmp_path)
    assert cli.main(["certs", "init", d]) == 0
    assert cli.main(["certs", "issue", d, "B", "--ip", "10.232.0.2", "--ip", "10.232.0.3"]) == 0
    dns, ips = _sans(certs.paths(d, "B")["cert"])
    assert dns == ["B"]
    assert [str(i) for i in ips] == ["10.232.0.2", "10.232.0.3"]


def _handshake(d, server_host, client_host, dialled):
    p = certs.paths(d, server_host)
    c = certs.paths(d, client_host)
    sctx = tls.server_context(p["cacert"], p["cert"], p["key"])
    cctx = tls.client_context(c["cacert"], c["cert"], c["key"])
    a, b = socket.socketpair()
    errs = []

    def serve():
        try:
            with sctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errs.append(e)
    t = threading.Thread(target=serve)
    t.start()
    try:
        with cctx.wrap_socket(b, server_hostname=dialled) as s:
            s.sendall(b"x")
    finally:
        b.close()
        t.join(5)


def test_tls_verifies_the_address(tmp_path):
    """Mutual TLS to an address: verified with --ip, refused without."""
    d = str(tmp_path)
    certs.init(d)
    certs.issue(d, "A", ips=["10.232.0.1"])
    certs.issue(d, "B")
    certs.issue(d, "operator")
    _handshake(d, "A", "operator", "10.232.0.1")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(d, "B", "operator", "10.232.0.2")
