"""The client certificate as it crossed the wire in a TLS 1.2 handshake (pure: no I/O).

Python's ``ssl`` has no verify callback, and after a failed handshake ``getpeercert()`` is
empty, so a handshake OpenSSL rejects (revoked, expired, not yet valid, unknown CA...) would name
no certificate. Under TLS 1.2 the client's Certificate handshake message travels in clear before
the ChangeCipherSpec: :class:`HandshakeTap` is fed the raw bytes the client sent during the
handshake and reads the first certificate of that message (the leaf) out of them.

Under TLS 1.3 the client's Certificate is encrypted (it follows the server's Finished, under the
handshake traffic keys), so the tap finds nothing and returns ``None``: those rejections cannot
name the certificate without a verify callback.

Nothing here trusts the bytes: every length is checked, garbage yields ``None``, nothing raises.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from mbsec.identity import IdentityError, PeerIdentity, parse_identity

__all__ = ["MAX_RECORDED", "HandshakeTap", "presented_identity"]

#: Bytes recorded at most per handshake; a client's first flights (ClientHello, then
#: Certificate, ClientKeyExchange, CertificateVerify) take 2-8 KiB with a chain of a few
#: certificates. Kept small: every handshake in flight, a peer without a certificate's too,
#: holds this much (x max_connections); a larger chain just goes unnamed in the event.
MAX_RECORDED = 16 * 1024

_HANDSHAKE = 22
_CHANGE_CIPHER_SPEC = 20
_CERTIFICATE = 11
#: TLSPlaintext.length may not exceed 2^14; allow TLSCompressed/Ciphertext's slack for leniency
_MAX_RECORD = (1 << 14) + 2048


class HandshakeTap:
    """Records what the client sent during the handshake (bounded) and finds its certificate."""

    __slots__ = ("_buf", "_limit", "_stopped")

    def __init__(self, limit: int = MAX_RECORDED) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._stopped = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Record ``data`` (bytes received from the client, in order) up to the bound."""
        if self._stopped:
            return
        room = self._limit - len(self._buf)
        if room <= 0:
            self._stopped = True
            return
        self._buf += bytes(data[:room])

    def stop(self) -> None:
        """Record nothing more (the handshake is over)."""
        self._stopped = True

    @property
    def recorded(self) -> int:
        return len(self._buf)

    def _handshake_bytes(self) -> bytes:
        """The payload of the leading handshake records, concatenated (up to the first other
        record, a record that is not TLS, or the end of what was recorded)."""
        buf = self._buf
        out = bytearray()
        pos = 0
        while pos + 5 <= len(buf):
            ctype = buf[pos]
            major = buf[pos + 1]
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if ctype != _HANDSHAKE or major != 3 or length == 0 or length > _MAX_RECORD:
                break  # ChangeCipherSpec, alert, application data, or not TLS at all
            end = pos + 5 + length
            if end > len(buf):
                out += buf[pos + 5 :]  # a partial record: keep what is there
                break
            out += buf[pos + 5 : end]
            pos = end
        return bytes(out)

    def client_certificate(self) -> bytes | None:
        """The DER of the first certificate in the client's Certificate message (TLS 1.2
        layout), or ``None`` when there is none in clear (TLS 1.3, empty list, truncated,
        garbage)."""
        try:
            return self._client_certificate()
        except Exception:  # pragma: no cover - every length is checked; belt and braces
            return None

    def _client_certificate(self) -> bytes | None:
        hs = self._handshake_bytes()
        pos = 0
        while pos + 4 <= len(hs):
            mtype = hs[pos]
            length = int.from_bytes(hs[pos + 1 : pos + 4], "big")
            body_start = pos + 4
            end = body_start + length
            if end > len(hs):
                return None  # truncated message
            if mtype == _CERTIFICATE:
                return _first_certificate(hs[body_start:end])
            pos = end
        return None


def _first_certificate(body: bytes) -> bytes | None:
    """TLS 1.2 Certificate: a 3-byte list length, then (3-byte length, DER) entries."""
    if len(body) < 3:
        return None
    list_len = int.from_bytes(body[0:3], "big")
    if list_len == 0 or list_len + 3 != len(body) or list_len < 3:
        return None
    cert_len = int.from_bytes(body[3:6], "big")
    if cert_len == 0 or 6 + cert_len > len(body):
        return None
    der = body[6 : 6 + cert_len]
    if der[0] != 0x30:  # a DER SEQUENCE, or this is not a certificate
        return None
    return der


def _name_str(cert: x509.Certificate) -> tuple[str, str | None, str]:
    subject = cert.subject
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    common_name = cn if isinstance(cn, str) or cn is None else cn.decode("utf-8", "replace")
    return subject.rfc4514_string(), common_name, cert.issuer.rfc4514_string()


def presented_identity(der: bytes) -> PeerIdentity | None:
    """The facts of a certificate a client presented (not verified: only for the rejection
    event). :func:`mbsec.identity.parse_identity` first; when that refuses the certificate
    (a malformed role or extension), the plain fields without a role; ``None`` when
    ``cryptography`` cannot read it at all."""
    try:
        return parse_identity(der)
    except IdentityError:
        pass
    try:
        cert = x509.load_der_x509_certificate(der)
        subject, common_name, issuer = _name_str(cert)
        return PeerIdentity(
            subject=subject, common_name=common_name, organizational_units=(),
            san_dns=(), san_ip=(), san_uri=(), issuer=issuer, serial=cert.serial_number,
            fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
            not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
            role=None,
        )
    except Exception:
        return None
