"""`migrate certs`: a CA and host certificates with `cryptography`, so that
mutual TLS needs no openssl by hand.

Layout of DIR (the flags of `migrate page-server` and `migrate dump` that
take each file in brackets)::

    DIR/cacert.pem              the CA certificate        [--tls-cacert]
    DIR/private/cakey.pem       the CA key (0600)
    DIR/cacrl.pem               revocations (certs revoke) [--tls-cacrl]
    DIR/HOST/cert.pem           HOST's certificate         [--tls-cert]
    DIR/HOST/private/key.pem    HOST's key (0600)          [--tls-key]

A host certificate is good as a server and as a client certificate (both
extended key usages), names HOST in its CN and subjectAltName, and
``localhost`` also gets 127.0.0.1 and ::1; ``ips`` (``certs issue --ip``)
adds addresses, for a host dialled by address under a name (the rig's
``https://10.232.0.1:7443`` for host ``A``).  Keys are ECDSA P-256.
"""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from migrate import errors


class CertError(errors.MigrateError):
    """A CA or certificate could not be made."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write(path: str, data: bytes, private: bool = False) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700 if private else 0o755, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def paths(d: str, host: str | None = None) -> dict[str, str]:
    out = {"cacert": os.path.join(d, "cacert.pem"),
           "cakey": os.path.join(d, "private", "cakey.pem"),
           "cacrl": os.path.join(d, "cacrl.pem")}
    if host is not None:
        out["cert"] = os.path.join(d, host, "cert.pem")
        out["key"] = os.path.join(d, host, "private", "key.pem")
    return out


def init(d: str, name: str = "migrate CA", days: int = 3650, force: bool = False) -> str:
    """Make a CA in ``d``; returns the CA certificate's path."""
    p = paths(d)
    if os.path.exists(p["cacert"]) and not force:
        raise CertError(f"{p['cacert']} exists: remove it (or use --force) to make a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(p["cakey"], _key_pem(key), private=True)
    _write(p["cacert"], cert.public_bytes(serialization.Encoding.PEM))
    return p["cacert"]


def _load_ca(d: str):
    p = paths(d)
    try:
        with open(p["cacert"], "rb") as f:
            ca = x509.load_pem_x509_certificate(f.read())
        with open(p["cakey"], "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
    except FileNotFoundError as e:
        raise CertError(f"{e.filename}: no CA here (run `migrate certs init {d}` "
                        "first)") from None
    except ValueError as e:
        raise CertError(f"{d}: unusable CA: {e}") from None
    return ca, key


def issue(d: str, host: str, days: int = 825,
          not_before: datetime.datetime | None = None,
          not_after: datetime.datetime | None = None,
          ips: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """A certificate for ``host`` (server and client use) signed by the CA in ``d``;
    ``ips`` are more addresses for its subjectAltName."""
    if not host or "/" in host or host in (".", "..") or "\0" in host:
        raise CertError(f"bad host name {host!r}")
    extra = []
    for ip in ips:
        try:
            extra.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise CertError(f"{host}: bad IP address {ip!r}") from None
    ca, ca_key = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list = []
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        sans.append(x509.DNSName(host))
        if host == "localhost":
            sans += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                     x509.IPAddress(ipaddress.ip_address("::1"))]
    sans += [a for a in extra if a not in sans]
    now = _now()
    nb = not_before or now - datetime.timedelta(minutes=5)
    na = not_after or now + datetime.timedelta(days=days)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb).not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    p = paths(d, host)
    _write(p["key"], _key_pem(key), private=True)
    _write(p["cert"], cert.public_bytes(serialization.Encoding.PEM))
    return p


def revoke(d: str, host: str) -> str:
    """Add ``host``'s certificate to DIR/cacrl.pem; returns the CRL's path."""
    ca, ca_key = _load_ca(d)
    p = paths(d, host)
    try:
        with open(p["cert"], "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except FileNotFoundError:
        raise CertError(f"{p['cert']}: no certificate for {host}") from None
    revoked = []
    if os.path.exists(p["cacrl"]):
        with open(p["cacrl"], "rb") as f:
            revoked = list(x509.load_pem_x509_crl(f.read()))
    now = _now()
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
         .last_update(now - datetime.timedelta(minutes=5))
         .next_update(now + datetime.timedelta(days=365)))
    for r in revoked:
        if r.serial_number != cert.serial_number:
            b = b.add_revoked_certificate(r)
    b = b.add_revoked_certificate(x509.RevokedCertificateBuilder()
                                  .serial_number(cert.serial_number)
                                  .revocation_date(now - datetime.timedelta(minutes=1))
                                  .build())
    crl = b.sign(ca_key, hashes.SHA256())
    _write(p["cacrl"], crl.public_bytes(serialization.Encoding.PEM))
    return p["cacrl"]
