"""When the loaded TLS material runs out: the server chain, each client CA, each CRL.

Built at start and on every successful reload (:class:`mbsec.server.Proxy`), from the same
files the running TLS context was just built from, and exposed by ``/metrics`` as
``mbsec_certificate_expiry_timestamp_seconds`` and ``mbsec_crl_next_update_timestamp_seconds``
(Unix times: an alert compares them with ``time()``, deploy/prometheus/mbsec-alerts.yml). An
expired server certificate stops every client; an expired CRL makes OpenSSL reject every
client of its CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from mbsec.settings import TlsSettings
from mbsec.tls import TlsMaterial


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    kind: str  # "server" (tls.cert's chain) | "client_ca" (tls.client_ca's certificates)
    subject: str  # RFC 4514
    serial: str  # hex, as events write it
    not_after: float  # Unix time


@dataclass(frozen=True, slots=True)
class CrlExpiry:
    issuer: str  # RFC 4514
    path: str
    next_update: float  # Unix time


@dataclass(frozen=True, slots=True)
class Expiry:
    certificates: tuple[CertificateExpiry, ...] = ()
    crls: tuple[CrlExpiry, ...] = ()


def _certificates(path: Path, kind: str) -> list[CertificateExpiry]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):  # replaced since it was loaded: the next reload tells
        return []
    return [CertificateExpiry(kind, c.subject.rfc4514_string(), format(c.serial_number, "X"),
                              c.not_valid_after_utc.timestamp()) for c in certs]


def tls_expiry(tls: TlsSettings, material: TlsMaterial) -> Expiry:
    """The expiry facts of ``material`` (CRLs as loaded) and of the certificate files named in
    ``tls``. One series per distinct certificate; per CRL issuer and file the earliest
    nextUpdate (a CRL without one is left out: it never lapses)."""
    certs = {(c.kind, c.subject, c.serial): c
             for c in [*_certificates(tls.cert, "server"),
                       *_certificates(tls.client_ca, "client_ca")]}
    crls: dict[tuple[str, str], float] = {}
    for info in material.crls:
        if info.next_update is None:
            continue
        key = (info.issuer, str(info.path))
        t = info.next_update.timestamp()
        crls[key] = min(t, crls.get(key, t))
    return Expiry(tuple(certs.values()),
                  tuple(CrlExpiry(i, p, t) for (i, p), t in sorted(crls.items())))
