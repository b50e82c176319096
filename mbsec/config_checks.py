"""What ``mbsec config check`` refuses or warns about beyond loading: a configuration that
loads but cannot work (every client would fail) is an error, with the fix on the same line.

* A server certificate without serverAuth (e.g. a client certificate): every TLS client
  refuses it, so no client ever gets through; the proxy would log each one as a rejection of
  the client.
* An expired CRL: OpenSSL rejects every client of that CA until a fresh one is loaded.
* ``crl = []``: revocation is not checked at all (a warning: it works, but a revoked
  certificate keeps working).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from mbsec.settings import TlsSettings
from mbsec.tls import CrlInfo


def server_usage_problems(cert_path: Path, *, what: str = "tls") -> list[str]:
    """The leaf of ``tls.cert`` must be usable as a TLS server certificate."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return []  # unreadable or broken: loading the TLS material reports it
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return []  # no EKU: valid for every purpose
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return []
    kind = "a client certificate" if ExtendedKeyUsageOID.CLIENT_AUTH in eku else "not one"
    return [f"{what}.cert: {cert_path}: {leaf.subject.rfc4514_string()} has no serverAuth in "
            f"its extended key usage ({kind}): every client would refuse it; issue a server "
            "certificate: mbsec-pki issue server NAME --profile proxy-server --dns NAME"]


def expired_crl_problems(crls: tuple[CrlInfo, ...], *, what: str = "tls",
                         now: dt.datetime | None = None) -> list[str]:
    """CRLs past their nextUpdate: OpenSSL then rejects every client of their CA."""
    now = now or dt.datetime.now(dt.UTC)
    return [
        f"{what}.crl: {c.path}: the CRL of {c.issuer} expired at {c.next_update.isoformat()}: "
        "OpenSSL would reject every client of this CA; publish a fresh one (mbsec-pki crl "
        f"--dir CA_DIR --out {c.path}) and check again"
        for c in crls if c.next_update is not None and c.next_update <= now
    ]


def no_crl_warnings(tls: TlsSettings, *, what: str = "tls") -> list[str]:
    if tls.crl:
        return []
    return [f"{what}.crl = []: revocation is not checked, a revoked certificate keeps working; "
            "publish a CRL (mbsec-pki crl --dir CA_DIR --out tls/crl.pem) and list it in "
            f"{what}.crl"]
