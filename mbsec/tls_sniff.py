"""The client certificate as it crossed the wire in a TLS 1.2 handshake (pure: no I/O).

Python's ``ssl`` has no verify callback, and after a failed handshake ``getpeercert()`` is
empty, so a handshake OpenSSL rejects (revoked, expired, not yet valid, unknown CA...) would name
no certificate. Under TLS 1.2 the client's Certificate handshake message travels in clear before
the ChangeCipherSpec: :class:`HandshakeTap` is fed the raw bytes the client sent during the
handshake and reads the first certificate of that message (the leaf) out of them.

Under TLS 1.3 the client's Certificate is encrypted (it follows the server's Finished, under the
client handshake traffic keys). :meth:`HandshakeTap.client_certificate_tls13` decrypts it with
the client handshake traffic secret of that handshake, which OpenSSL hands out through the
public key-log hook (:mod:`mbsec.tls_keylog`): RFC 8446 section 7.3 derives the record key and
IV from it, and the records follow section 5.2. Only the client's own handshake flight is
decrypted, only after OpenSSL rejected it.

Nothing here trusts the bytes: every length is checked, garbage yields ``None``, nothing raises.
"""

from __future__ import annotations

import functools
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.x509.oid import NameOID

from mbsec.identity import IdentityError, PeerIdentity, parse_identity

__all__ = ["MAX_RECORDED", "HandshakeTap", "issuing_cas", "presented_identity"]

#: Bytes recorded at most per handshake; a client's first flights (ClientHello, then
#: Certificate, ClientKeyExchange, CertificateVerify) take 2-8 KiB with a chain of a few
#: certificates. Kept small: every handshake in flight, a peer without a certificate's too,
#: holds this much (x max_connections); a larger chain just goes unnamed in the event.
MAX_RECORDED = 16 * 1024

_HANDSHAKE = 22
_CHANGE_CIPHER_SPEC = 20
_APPLICATION_DATA = 23
_CLIENT_HELLO = 1
_CERTIFICATE = 11
#: encrypted records read at most for the Certificate message (it comes first in the client's
#: second flight; a large chain may span a few records)
_MAX_ENCRYPTED_RECORDS = 8
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

    def client_random(self) -> bytes | None:
        """ClientHello.random (32 bytes): the key log names each handshake's secrets by it."""
        hs = self._handshake_bytes()
        if len(hs) < 38 or hs[0] != _CLIENT_HELLO:
            return None
        return hs[6:38]

    def client_certificate_tls13(self, client_handshake_secret: bytes) -> bytes | None:
        """The DER of the leaf in the client's encrypted TLS 1.3 Certificate message, decrypted
        with that handshake's client handshake traffic secret; ``None`` when there is none,
        the bytes do not decrypt with it, or anything is malformed."""
        chain = self.client_chain_tls13(client_handshake_secret)
        return chain[0] if chain else None

    def client_chain_tls13(self, client_handshake_secret: bytes) -> list[bytes]:
        """Every certificate of the client's TLS 1.3 Certificate message (leaf first), as far
        as they are well formed; empty when none can be read."""
        try:
            return self._client_chain_tls13(client_handshake_secret)
        except Exception:  # pragma: no cover - every length is checked; belt and braces
            return []

    def _records(self) -> list[tuple[int, bytes, bytes]]:
        """(content type, 5-byte header, body) of every complete record recorded."""
        buf = self._buf
        out: list[tuple[int, bytes, bytes]] = []
        pos = 0
        while pos + 5 <= len(buf):
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if buf[pos + 1] != 3 or length > _MAX_RECORD or pos + 5 + length > len(buf):
                break
            end = pos + 5 + length
            out.append((buf[pos], bytes(buf[pos : pos + 5]), bytes(buf[pos + 5 : end])))
            pos = end
        return out

    def _client_chain_tls13(self, secret: bytes) -> list[bytes]:
        encrypted = [(h, b) for t, h, b in self._records() if t == _APPLICATION_DATA]
        if not encrypted:
            return []
        for aead in _record_protection(secret):
            hs = bytearray()
            try:
                for seq, (header, body) in enumerate(encrypted[:_MAX_ENCRYPTED_RECORDS]):
                    inner = aead(seq, header, body).rstrip(b"\0")
                    if inner and inner[-1] == _HANDSHAKE:
                        hs += inner[:-1]
                    found = _certificate_message(bytes(hs))
                    if found is not None:
                        return _certificate_list(found, tls13=True)
            except InvalidTag:
                continue  # another cipher suite with the same hash, or not this handshake's
            return []
        return []

    def client_certificate(self) -> bytes | None:
        """The DER of the first certificate in the client's Certificate message (TLS 1.2
        layout), or ``None`` when there is none in clear (TLS 1.3, empty list, truncated,
        garbage)."""
        chain = self.client_chain()
        return chain[0] if chain else None

    def client_chain(self) -> list[bytes]:
        """Every certificate of the client's TLS 1.2 Certificate message (leaf first), as far
        as they are well formed; empty when there is none in clear."""
        try:
            found = _certificate_message(self._handshake_bytes())
            return _certificate_list(found, tls13=False) if found is not None else []
        except Exception:  # pragma: no cover - every length is checked; belt and braces
            return []


def _certificate_message(hs: bytes) -> bytes | None:
    """The body of the first complete Certificate message in a run of handshake messages."""
    pos = 0
    while pos + 4 <= len(hs):
        length = int.from_bytes(hs[pos + 1 : pos + 4], "big")
        end = pos + 4 + length
        if end > len(hs):
            return None
        if hs[pos] == _CERTIFICATE:
            return hs[pos + 4 : end]
        pos = end
    return None


def _expand_label(secret: bytes, label: bytes, length: int, algorithm: hashes.HashAlgorithm
                  ) -> bytes:
    """HKDF-Expand-Label (RFC 8446 section 7.1) with an empty context."""
    full = b"tls13 " + label
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\0"
    return HKDFExpand(algorithm, length, info).derive(secret)


def _record_protection(secret: bytes) -> list[Any]:
    """One record decryptor ``(seq, header, body) -> inner plaintext`` per TLS 1.3 cipher suite
    whose hash matches the secret's length (the suite itself is not recorded: a wrong one
    fails the AEAD tag, and the next is tried)."""
    if len(secret) == 48:
        suites: list[tuple[hashes.HashAlgorithm, Any, int]] = [(hashes.SHA384(), AESGCM, 32)]
    elif len(secret) == 32:
        suites = [(hashes.SHA256(), AESGCM, 16), (hashes.SHA256(), ChaCha20Poly1305, 32)]
    else:
        return []
    out: list[Any] = []
    for algorithm, cipher, key_len in suites:
        aead = cipher(_expand_label(secret, b"key", key_len, algorithm))
        iv = int.from_bytes(_expand_label(secret, b"iv", 12, algorithm), "big")

        def decrypt(seq: int, header: bytes, body: bytes, aead: Any = aead, iv: int = iv
                    ) -> bytes:
            return bytes(aead.decrypt((iv ^ seq).to_bytes(12, "big"), body, header))

        out.append(decrypt)
    return out


def _certificate_list(body: bytes, *, tls13: bool) -> list[bytes]:
    """The DER certificates of a Certificate message body, leaf first, up to the first entry
    that is not well formed; empty when the list itself is not.

    TLS 1.2: a 3-byte list length, then (3-byte length, DER) entries. TLS 1.3: a request
    context (1-byte length) first, and each entry ends with 2-byte-length extensions."""
    pos = 0
    if tls13:
        if not body:
            return []
        pos = 1 + body[0]
    if pos + 3 > len(body):
        return []
    list_len = int.from_bytes(body[pos : pos + 3], "big")
    pos += 3
    if list_len < 3 or pos + list_len != len(body):
        return []
    out: list[bytes] = []
    while pos + 3 <= len(body):
        cert_len = int.from_bytes(body[pos : pos + 3], "big")
        end = pos + 3 + cert_len
        if cert_len == 0 or end > len(body) or body[pos + 3] != 0x30:  # a DER SEQUENCE
            break
        out.append(body[pos + 3 : end])
        pos = end
        if tls13:
            if pos + 2 > len(body):
                break
            pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    return out


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


#: certificates of a presented chain looked at, at most (a chain is 2-4 deep)
_MAX_CHAIN = 8


@functools.lru_cache(maxsize=256)
def _ca_entry(der: bytes) -> tuple[str, int] | None:
    """(RFC 4514 issuer, serial) of a presented CA certificate; ``None`` for a self-signed
    one or one that does not parse. Cached: every client of a CA presents the same bytes."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    if cert.subject == cert.issuer:
        return None
    return cert.issuer.rfc4514_string(), cert.serial_number


def issuing_cas(chain: list[bytes]) -> tuple[tuple[str, int], ...]:
    """(issuer, serial) of every certificate above the leaf in a chain the client presented,
    a self-signed root excepted (RFC 4514 issuer names, as the CRLs list them).

    Why: with only the root in ``tls.client_ca``, OpenSSL verified the leaf through the
    intermediates the client sent, and Python 3.11's ``ssl`` keeps none of them; a CRL reload
    that revokes one of those intermediates must still end its clients' open connections.
    Signatures are not checked (that cost ~0.5 ms per handshake): the CA that did sign is among
    what the client sent (OpenSSL found it there), so it is never missed, and anything extra a
    client sends can only get that client's own connection ended."""
    out: list[tuple[str, int]] = []
    for der in chain[1:_MAX_CHAIN]:
        entry = _ca_entry(bytes(der))
        if entry is not None and entry not in out:
            out.append(entry)
    return tuple(out)
