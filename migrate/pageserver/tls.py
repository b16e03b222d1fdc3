"""TLS contexts for the page-server and its clients, from criu(8)'s flags.

Mutual TLS: the server requires a client certificate signed by the CA, the
client requires a server certificate signed by the CA and, unless
``--tls-no-cn-verify``, naming the address it dialled.  Defaults follow criu
with our own directory (``migrate certs`` makes these files)::

    --tls-cacert  /etc/pki/CA/cacert.pem
    --tls-cacrl   /etc/pki/CA/cacrl.pem      (used when present)
    --tls-cert    /etc/pki/migrate/cert.pem
    --tls-key     /etc/pki/migrate/private/key.pem
"""

from __future__ import annotations

import os
import typing

from migrate import errors

if typing.TYPE_CHECKING:
    import ssl

DEFAULT_CACERT = "/etc/pki/CA/cacert.pem"
DEFAULT_CACRL = "/etc/pki/CA/cacrl.pem"
DEFAULT_CERT = "/etc/pki/migrate/cert.pem"
DEFAULT_KEY = "/etc/pki/migrate/private/key.pem"


class TLSConfigError(errors.MigrateError):
    """A certificate, key or CRL file is missing or unusable."""


def _need(path: str, flag: str) -> str:
    if not os.path.isfile(path):
        raise TLSConfigError(f"{flag} {path}: no such file (make one with `migrate certs "
                             "init DIR` and `migrate certs issue DIR HOSTNAME`, or run "
                             "with --no-tls)")
    return path


def _context(purpose: int, cacert, cert, key, cacrl) -> ssl.SSLContext:
    import ssl        # here: `migrate dump` without --page-server never needs it
    proto = ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT
    ctx = ssl.SSLContext(proto)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cacert = _need(cacert or DEFAULT_CACERT, "--tls-cacert")
    cert = _need(cert or DEFAULT_CERT, "--tls-cert")
    key = _need(key or DEFAULT_KEY, "--tls-key")
    try:
        ctx.load_verify_locations(cafile=cacert)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"--tls-cacert {cacert}: {e}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise TLSConfigError(f"--tls-cert {cert} / --tls-key {key}: {e}") from None
    crl = cacrl if cacrl else (DEFAULT_CACRL if os.path.isfile(DEFAULT_CACRL) else None)
    if crl:
        _need(crl, "--tls-cacrl")
        try:
            ctx.load_verify_locations(cafile=crl)
        except (ssl.SSLError, OSError) as e:
            raise TLSConfigError(f"--tls-cacrl {crl}: {e}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(cacert=None, cert=None, key=None, cacrl=None) -> ssl.SSLContext:
    """Requires a client certificate signed by the CA (mutual TLS)."""
    return _context(0, cacert, cert, key, cacrl)


def client_context(cacert=None, cert=None, key=None, cacrl=None,
                   verify_cn: bool = True) -> ssl.SSLContext:
    ctx = _context(1, cacert, cert, key, cacrl)
    ctx.check_hostname = verify_cn
    return ctx
