"""Who is on the other end of a TLS connection, read from the verified DER certificate.

Python's ``getpeercert()`` dict hides custom extensions, so mbsec parses the DER form with
``cryptography`` and reads the Modbus role (Modbus/TCP Security R-21..R-23) itself.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

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


# --- role extension: the one place that knows its encoding (parse_identity and mbsec.pki) ---

_UTF8STRING_TAG = 0x0C
#: Longest role mbsec-pki will put in a certificate; the parser accepts any definite DER length.
MAX_ROLE_LENGTH = 128


def encode_role(role: str) -> bytes:
    """DER-encode ``role`` as the UTF8String value of the role extension (R-21).

    Refuses what a strict peer would refuse: empty roles, surrounding whitespace, control
    characters.
    """
    if not role:
        raise ValueError("role must not be empty")
    if role != role.strip():
        raise ValueError(f"role {role!r} has leading or trailing whitespace")
    if any(unicodedata.category(ch).startswith("C") for ch in role):
        raise ValueError(f"role {role!r} contains control or unassigned characters")
    if len(role) > MAX_ROLE_LENGTH:
        raise ValueError(f"role is longer than {MAX_ROLE_LENGTH} characters")
    body = role.encode("utf-8")
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([_UTF8STRING_TAG]) + length + body


def decode_role(value: bytes) -> str:
    """Decode the extension value: one DER UTF8String, non-empty, valid UTF-8, nothing after.

    Parsed by hand because cryptography hands unknown extensions over as raw bytes.
    """
    if len(value) < 2:
        raise IdentityError("role extension is truncated", reason="role_malformed")
    tag = value[0]
    if tag != _UTF8STRING_TAG:
        raise IdentityError(
            f"role extension is not a UTF8String (DER tag 0x{tag:02x})",
            reason="role_not_utf8string",
        )
    first = value[1]
    pos = 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise IdentityError("role extension uses an indefinite length", reason="role_malformed")
    else:
        count = first & 0x7F
        if count > 4 or len(value) < pos + count:
            raise IdentityError("role extension has a bad length field", reason="role_malformed")
        raw = value[pos : pos + count]
        length = int.from_bytes(raw, "big")
        if raw[0] == 0 or length < 0x80:
            raise IdentityError("role extension length is not minimal DER", reason="role_malformed")
        pos += count
    end = pos + length
    if end > len(value):
        raise IdentityError("role extension is truncated", reason="role_malformed")
    if end < len(value):
        raise IdentityError("role extension has trailing bytes", reason="role_malformed")
    if length == 0:
        raise IdentityError("role extension is empty", reason="role_empty")
    try:
        return value[pos:end].decode("utf-8")
    except UnicodeDecodeError:
        raise IdentityError("role is not valid UTF-8", reason="role_invalid_utf8") from None


def role_extension(role: str) -> x509.UnrecognizedExtension:
    """The role extension object for a certificate builder (always add it NON-critical)."""
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(ROLE_OID), encode_role(role))


def read_role(cert: x509.Certificate) -> str | None:
    """The certificate's Modbus role, ``None`` when absent (the NULL role of R-23)."""
    try:
        extensions = cert.extensions
    except x509.DuplicateExtension as exc:
        if exc.oid.dotted_string == ROLE_OID:
            raise IdentityError("certificate carries more than one role extension",
                                reason="role_duplicated") from None
        raise IdentityError(f"certificate has a duplicated extension {exc.oid.dotted_string}",
                            reason="certificate_malformed") from None
    except ValueError as exc:
        raise IdentityError(f"certificate extensions cannot be parsed: {exc}",
                            reason="certificate_malformed") from None
    for ext in extensions:
        if ext.oid.dotted_string == ROLE_OID:
            value = ext.value
            if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - future-proof
                raise IdentityError("role extension has an unexpected form",
                                    reason="role_malformed")
            return decode_role(value.value)
    return None


def _attr_str(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def identity_from_certificate(cert: x509.Certificate) -> PeerIdentity:
    """Build a :class:`PeerIdentity` from a parsed certificate (see :func:`parse_identity`)."""
    role = read_role(cert)
    try:
        subject = cert.subject
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ous = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            dns, ips, uris = (), (), ()
        return PeerIdentity(
            subject=subject.rfc4514_string(),
            common_name=_attr_str(cns[0].value) if cns else None,
            organizational_units=tuple(_attr_str(a.value) for a in ous),
            san_dns=dns,
            san_ip=ips,
            san_uri=uris,
            issuer=cert.issuer.rfc4514_string(),
            serial=cert.serial_number,
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            role=role,
        )
    except (ValueError, TypeError) as exc:
        # cryptography parses names lazily and raises TypeError for an attribute type it
        # refuses (a BIT STRING that is not x500UniqueIdentifier; found by fuzzing)
        raise IdentityError(f"certificate cannot be parsed: {exc}",
                            reason="certificate_malformed") from None


def parse_identity(der: bytes) -> PeerIdentity:
    """Parse a DER certificate (``getpeercert(binary_form=True)``) into a :class:`PeerIdentity`.

    Raises :class:`IdentityError` when the certificate or its role extension is malformed; the
    caller rejects the connection. The critical flag is not checked here: OpenSSL refuses a critical
    unknown extension during the handshake, before this runs.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError (fuzzed)
        raise IdentityError(f"certificate cannot be parsed: {exc}",
                            reason="certificate_malformed") from None
    return identity_from_certificate(cert)


# --- verified peers: one parse per certificate, not per connection ---------------------------

#: certificates whose identity is kept; the oldest goes first when full
VERIFIED_CACHE_SIZE = 1024
_verified: dict[bytes, PeerIdentity] = {}


def parse_verified_identity(der: bytes) -> PeerIdentity:
    """:func:`parse_identity` for a certificate OpenSSL has just verified, remembering the
    result per DER certificate: a plant's masters reconnect with the same certificates, and
    the parse (names, SANs, fingerprint, role) is a measurable share of a handshake's Python
    work. Safe because the identity is a pure function of the DER bytes and nothing that can
    change over time is cached: revocation and expiry are checked by the caller on every
    connection. Only verified certificates enter (never what a rejected peer presented), and
    a certificate that fails to parse is never cached, so it fails the same way each time."""
    identity = _verified.get(der)
    if identity is None:
        identity = parse_identity(der)
        if len(_verified) >= VERIFIED_CACHE_SIZE:
            del _verified[next(iter(_verified))]
        _verified[der] = identity
    return identity
