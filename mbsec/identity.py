"""Who is on the other end of a TLS connection, read from the verified DER certificate.

Python's ``getpeercert()`` dict hides custom extensions, so mbsec parses the DER form with
``cryptography`` and reads the Modbus role (Modbus/TCP Security R-21..R-23) itself.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

#: Modbus/TCP Security role extension (DER UTF8String, at most one, non-critical).
ROLE_OID = "1.3.6.1.4.1.50316.802.1"


class IdentityError(Exception):
    """The certificate cannot yield an identity; the connection must be rejected.

    ``reason`` is a short slug for events (``role_not_utf8string``, ``role_duplicated``...).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Facts about a verified peer certificate (leaf)."""

    subject: str  # RFC 4514 string
    common_name: str | None
    organizational_units: tuple[str, ...]
    san_dns: tuple[str, ...]
    san_ip: tuple[str, ...]
    san_uri: tuple[str, ...]
    issuer: str  # RFC 4514 string
    serial: int
    fingerprint_sha256: str  # lowercase hex, no colons
    not_before: dt.datetime  # timezone-aware UTC
    not_after: dt.datetime  # timezone-aware UTC
    role: str | None  # None is the NULL role of R-23
