"""The certificate authority: a directory with the root (and optional intermediate), an index of
every certificate it issued, and the CRL.

Layout of a CA directory (see pki/README.md)::

    ca.json               settings written by init (key type, intermediate or not)
    ca.crt                the root certificate = the trust bundle verifiers load
    intermediate.crt      only with an intermediate; it then signs leaves and the leaf CRL
    private/ (0700)       ca.key, intermediate.key (0600, optionally passphrase-encrypted)
    index.json            every issued certificate, its status and the CRL number
    certs/SERIAL.pem      a copy of each issued certificate
    crl.pem               the latest CRL(s)
    issued/               default output directory of issue

Every mutation runs under an exclusive lock on ``.lock`` and rewrites ``index.json`` atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mbsec.identity import (
    ROLE_OID,
    IdentityError,
    decode_role,
    encode_role,
    read_role,
    role_extension,
)
from mbsec.pki.files import (
    DEFAULT_KEY_TYPE,
    PKIError,
    PrivateKey,
    cert_pem,
    ensure_dir,
    generate_key,
    key_type_of,
    load_certificate,
    load_key,
    read_bytes,
    write_file,
    write_key,
)

__all__ = [
    "DEFAULT_DAYS",
    "DEFAULT_RENEW_THRESHOLD",
    "REVOCATION_REASONS",
    "CertificateAuthority",
    "IssuedFiles",
    "PKIError",
    "RenewResult",
    "SignedFiles",
    "create_csr",
    "renewal_due",
    "renewal_time",
]

Kind: TypeAlias = Literal["server", "client"]
RawExtension: TypeAlias = tuple[str | x509.ObjectIdentifier, bytes]
ExtraExtension: TypeAlias = tuple[x509.ExtensionType | RawExtension, bool]

#: default leaf lifetimes in days (server certificates follow the 397-day browser limit)
DEFAULT_DAYS: dict[str, int] = {"server": 397, "client": 365}
#: renew once this fraction of the lifetime has passed (step-ca's default)
DEFAULT_RENEW_THRESHOLD = 2 / 3
#: leaves are backdated a little so a peer whose clock is slightly behind still accepts them
BACKDATE = dt.timedelta(minutes=5)
REVOCATION_REASONS: tuple[str, ...] = (
    "unspecified", "key_compromise", "ca_compromise", "affiliation_changed", "superseded",
    "cessation_of_operation", "certificate_hold", "privilege_withdrawn",
)
_EKU: dict[str, x509.ObjectIdentifier] = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class IssuedFiles:
    """Where issue() put the certificate, its key and the chain (leaf up to the root, R-46)."""

    cert: Path
    key: Path
    chain: Path
    serial: int


@dataclass(frozen=True, slots=True)
class SignedFiles:
    """Result of signing a CSR: the key stayed on the device, so there is no key file."""

    cert: Path
    chain: Path
    serial: int


@dataclass(frozen=True, slots=True)
class RenewResult:
    """A renewal that happened: the files were replaced in place."""

    cert: Path
    key: Path
    chain: Path
    serial: int
    old_serial: int
    new_key: bool


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def renewal_time(cert: x509.Certificate, threshold: float = DEFAULT_RENEW_THRESHOLD) -> dt.datetime:
    """The instant from which ``cert`` is due for renewal."""
    if not 0.0 < threshold <= 1.0:
        raise PKIError(f"renewal threshold must be in (0, 1], got {threshold}")
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_before_utc + lifetime * threshold


def renewal_due(cert: x509.Certificate, *, now: dt.datetime | None = None,
                threshold: float = DEFAULT_RENEW_THRESHOLD) -> bool:
    """True once ``threshold`` of the lifetime has passed (also true for an expired certificate)."""
    return _aware(now or utcnow()) >= renewal_time(cert, threshold)


def serial_hex(serial: int) -> str:
    """Serials are shown and stored the way openssl prints them: uppercase hex."""
    return f"{serial:X}"


def parse_serial(text: str) -> int:
    """A serial as `list` shows it (hex, optional 0x prefix or colons)."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    if not cleaned or not re.fullmatch(r"[0-9a-f]+", cleaned):
        raise PKIError(f"{text!r} is neither a certificate file nor a hex serial number")
    return int(cleaned, 16)


def _signing_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _check_name(dns: Sequence[str], ips: Sequence[str]) -> tuple[list[str], list[str]]:
    out_dns: list[str] = []
    for d in dns:
        if not _HOSTNAME.match(d):
            raise PKIError(f"{d!r} is not a valid DNS name")
        out_dns.append(d.lower())
    out_ips: list[str] = []
    for ip in ips:
        try:
            out_ips.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise PKIError(f"{ip!r} is not a valid IP address") from None
    return out_dns, out_ips


def _check_role(role: str | None, kind: str) -> str | None:
    if role is None:
        return None
    if kind != "client":
        raise PKIError("a role belongs in client certificates only (R-21); drop --role")
    try:
        encode_role(role)
    except ValueError as exc:
        raise PKIError(f"invalid role: {exc}") from None
    return role


def _subject(common_name: str, organization: str | None,
             organizational_units: Sequence[str]) -> x509.Name:
    if not common_name or common_name != common_name.strip():
        raise PKIError("common name must be non-empty without surrounding spaces")
    if len(common_name) > 64:
        raise PKIError("common name is longer than 64 characters (X.509 upper bound)")
    attrs = []
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attrs.extend(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)
                 for ou in organizational_units)
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def san_values(cert: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    """(DNS names, IP addresses, URIs) of the SAN extension; empty when absent or unreadable."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return [], [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            [str(i) for i in san.get_values_for_type(x509.IPAddress)],
            list(san.get_values_for_type(x509.UniformResourceIdentifier)))


def _kind_of(cert: x509.Certificate) -> Kind:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise PKIError("certificate has no extended key usage: not issued by mbsec-pki") from None
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        return "server"
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        return "client"
    raise PKIError("certificate is neither for TLS servers nor clients")


# --- DER surgery so tests can build certificates cryptography's builder refuses (two roles) ---

def _tlv(data: bytes, pos: int) -> tuple[int, int]:
    """(content start, element end) of the DER element at ``pos``."""
    first = data[pos + 1]
    if first < 0x80:
        return pos + 2, pos + 2 + first
    n = first & 0x7F
    length = int.from_bytes(data[pos + 2: pos + 2 + n], "big")
    return pos + 2 + n, pos + 2 + n + length


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _placeholder_oid(oid: x509.ObjectIdentifier, index: int) -> x509.ObjectIdentifier:
    arcs = oid.dotted_string.split(".")
    if int(arcs[-1]) >= 0x80:
        raise PKIError(f"cannot duplicate extension {oid.dotted_string} (last arc too large)")
    return x509.ObjectIdentifier(".".join([*arcs[:-1], str(0x7F - index)]))


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return bytes([0x06]) + _der_len(len(body)) + bytes(body)


def _resign(cert: x509.Certificate, key: PrivateKey,
            swaps: Sequence[tuple[x509.ObjectIdentifier, x509.ObjectIdentifier]],
            ) -> x509.Certificate:
    tbs = cert.tbs_certificate_bytes
    for placeholder, real in swaps:
        old, new = _oid_der(placeholder), _oid_der(real)
        if tbs.count(old) != 1:
            raise PKIError("internal error: placeholder extension not found exactly once")
        tbs = tbs.replace(old, new)
    der = cert.public_bytes(serialization.Encoding.DER)
    outer_start, _ = _tlv(der, 0)
    _, tbs_end = _tlv(der, outer_start)
    _, alg_end = _tlv(der, tbs_end)
    alg = der[tbs_end:alg_end]
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(tbs, padding.PKCS1v15(), _signing_hash(key))
    else:
        sig = key.sign(tbs, ec.ECDSA(_signing_hash(key)))
    bitstring = b"\x03" + _der_len(len(sig) + 1) + b"\x00" + sig
    body = tbs + alg + bitstring
    return x509.load_der_x509_certificate(b"\x30" + _der_len(len(body)) + body)


# --- CSR on the device side ---

def create_csr(common_name: str, *, key: PrivateKey, dns: Sequence[str] = (),
               ips: Sequence[str] = (), role: str | None = None,
               organization: str | None = None,
               organizational_units: Sequence[str] = ()) -> x509.CertificateSigningRequest:
    """A CSR for a key that never leaves the device. A requested role is only a hint to the CA."""
    dns_l, ips_l = _check_name(dns, ips)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        _subject(common_name, organization, organizational_units))
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_l]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips_l]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if role is not None:
        try:
            builder = builder.add_extension(role_extension(role), critical=False)
        except ValueError as exc:
            raise PKIError(f"invalid role: {exc}") from None
    return builder.sign(key, _signing_hash(key))


def csr_requested_role(csr: x509.CertificateSigningRequest) -> str | None:
    """The role a CSR asks for (reported to the operator, never copied into the certificate)."""
    for ext in csr.extensions:
        if ext.oid.dotted_string == ROLE_OID and isinstance(ext.value, x509.UnrecognizedExtension):
            try:
                return decode_role(ext.value.value)
            except IdentityError:
                return "<malformed>"
    return None


class CertificateAuthority:
    """An opened CA directory. Keys are loaded only when something must be signed."""

    def __init__(self, directory: Path, settings: dict[str, Any], *,
                 passphrase: bytes | None = None) -> None:
        self.directory = directory
        self.settings = settings
        self._passphrase = passphrase
        self.root = load_certificate(directory / "ca.crt", "CA certificate")
        self.intermediate: x509.Certificate | None = (
            load_certificate(directory / "intermediate.crt", "intermediate certificate")
            if settings.get("intermediate") else None
        )

    # -- creation and opening --

    @classmethod
    def init(cls, directory: Path | str, *, common_name: str = "mbsec CA",
             key_type: str = DEFAULT_KEY_TYPE, days: int = 3650, intermediate: bool = False,
             passphrase: bytes | None = None, organization: str | None = None,
             now: dt.datetime | None = None) -> CertificateAuthority:
        """Create a CA in ``directory`` (which must not hold one already)."""
        directory = Path(directory)
        if (directory / "ca.json").exists() or (directory / "ca.crt").exists():
            raise PKIError(f"{directory}: already contains a CA; refusing to overwrite it")
        if directory.exists() and not directory.is_dir():
            raise PKIError(f"{directory}: exists and is not a directory")
        if days < 1:
            raise PKIError("--days must be at least 1")
        now = _aware(now or utcnow())
        ensure_dir(directory)
        ensure_dir(directory / "private", 0o700)
        (directory / "private").chmod(0o700)
        ensure_dir(directory / "certs")
        root_key = generate_key(key_type)
        root_name = _subject(common_name, organization, ())
        root = _ca_certificate(root_name, root_key.public_key(), root_name, root_key,
                               now - BACKDATE, now + dt.timedelta(days=days),
                               path_length=1 if intermediate else 0)
        write_key(directory / "private" / "ca.key", root_key, passphrase=passphrase)
        write_file(directory / "ca.crt", cert_pem(root))
        if intermediate:
            int_key = generate_key(key_type)
            int_name = _subject(f"{common_name} Issuing", organization, ())
            inter = _ca_certificate(int_name, int_key.public_key(), root_name, root_key,
                                    now - BACKDATE, now + dt.timedelta(days=max(1, days - 1)),
                                    path_length=0)
            write_key(directory / "private" / "intermediate.key", int_key, passphrase=passphrase)
            write_file(directory / "intermediate.crt", cert_pem(inter))
        settings: dict[str, Any] = {
            "version": 1, "common_name": common_name, "key_type": key_type,
            "intermediate": intermediate, "encrypted_keys": passphrase is not None,
            "created": now.isoformat(),
        }
        write_file(directory / "index.json", _dump({"crl_number": 0, "certificates": []}))
        write_file(directory / "ca.json", _dump(settings))
        ca = cls(directory, settings, passphrase=passphrase)
        ca.write_crl(now=now)
        return ca

    @classmethod
    def open(cls, directory: Path | str, *,
             passphrase: bytes | None = None) -> CertificateAuthority:
        """Open an existing CA directory (created by :meth:`init`)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise PKIError(f"{directory}: no such CA directory (create one with 'mbsec-pki init')")
        settings_path = directory / "ca.json"
        if not settings_path.exists():
            raise PKIError(f"{directory}: not a CA directory (ca.json missing)")
        try:
            settings = json.loads(read_bytes(settings_path, "CA settings"))
        except ValueError as exc:
            raise PKIError(f"{settings_path}: corrupted ({exc})") from None
        if not isinstance(settings, dict) or settings.get("version") != 1:
            raise PKIError(f"{settings_path}: unknown format")
        return cls(directory, settings, passphrase=passphrase)

    # -- properties --

    @property
    def trust_bundle(self) -> Path:
        """PEM file with the root: what a verifier (the proxy, a client) trusts."""
        return self.directory / "ca.crt"

    @property
    def issuer_cert(self) -> x509.Certificate:
        """The certificate that signs leaves: the intermediate when there is one."""
        return self.intermediate or self.root

    @property
    def chain_certs(self) -> list[x509.Certificate]:
        """What goes after the leaf in a chain file: the intermediate (if any), then the root.
        R-46 (v36) asks every device to send its chain "down to the root CA"; a peer ignores
        the root it already trusts, so sending it costs a few hundred bytes per handshake."""
        return [self.intermediate, self.root] if self.intermediate is not None else [self.root]

    @property
    def keys_encrypted(self) -> bool:
        return bool(self.settings.get("encrypted_keys"))

    def _issuer_key(self) -> PrivateKey:
        name = "intermediate.key" if self.intermediate is not None else "ca.key"
        return load_key(self.directory / "private" / name, self._passphrase)

    def _root_key(self) -> PrivateKey:
        return load_key(self.directory / "private" / "ca.key", self._passphrase)

    # -- index --

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Exclusive lock + index; the index is written back atomically when the block succeeds."""
        lock_path = self.directory / ".lock"
        with lock_path.open("a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            index = self.index()
            yield index
            write_file(self.directory / "index.json", _dump(index), overwrite=True)

    def index(self) -> dict[str, Any]:
        """The parsed index (``crl_number`` and ``certificates``)."""
        path = self.directory / "index.json"
        try:
            data = json.loads(read_bytes(path, "index"))
        except ValueError as exc:
            raise PKIError(f"{path}: corrupted ({exc}); restore it from backup") from None
        if not isinstance(data, dict) or not isinstance(data.get("certificates"), list):
            raise PKIError(f"{path}: corrupted (no certificate list); restore it from backup")
        return data

    def entries(self) -> list[dict[str, Any]]:
        return list(self.index()["certificates"])

    def find(self, serial: int) -> dict[str, Any] | None:
        key = serial_hex(serial)
        return next((e for e in self.entries() if e.get("serial") == key), None)

    # -- issuing --

    def _build_leaf(self, kind: str, subject: x509.Name, public_key: Any, *,
                    role: str | None, dns: Sequence[str], ips: Sequence[str],
                    uris: Sequence[str] = (), not_before: dt.datetime, not_after: dt.datetime,
                    extra_extensions: Sequence[ExtraExtension] = ()) -> x509.Certificate:
        if kind not in _EKU:
            raise PKIError(f"unknown certificate kind {kind!r} (server or client)")
        if not_after <= not_before:
            raise PKIError("certificate would expire before it starts")
        issuer = self.issuer_cert
        issuer_key = self._issuer_key()
        is_rsa = isinstance(public_key, rsa.RSAPublicKey)
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise PKIError("unsupported public key algorithm (use ECDSA or RSA)")
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=is_rsa and kind == "server", data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([_EKU[kind]]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuer_key.public_key()), critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if role is not None:
            builder = builder.add_extension(role_extension(role), critical=False)
        seen = {e.oid for e in builder._extensions}  # spot deliberate duplicates
        swaps: list[tuple[x509.ObjectIdentifier, x509.ObjectIdentifier]] = []
        for value, critical in extra_extensions:
            ext: x509.ExtensionType
            if isinstance(value, tuple):
                oid = value[0] if isinstance(value[0], x509.ObjectIdentifier) \
                    else x509.ObjectIdentifier(value[0])
                ext = x509.UnrecognizedExtension(oid, value[1])
            else:
                ext = value
            if ext.oid in seen:  # only an UnrecognizedExtension can be duplicated this way
                if not isinstance(ext, x509.UnrecognizedExtension):
                    raise PKIError(f"cannot add a second {ext.oid.dotted_string} extension")
                placeholder = _placeholder_oid(ext.oid, len(swaps))
                swaps.append((placeholder, ext.oid))
                ext = x509.UnrecognizedExtension(placeholder, ext.value)
            seen.add(ext.oid)
            builder = builder.add_extension(ext, critical=critical)
        cert = builder.sign(issuer_key, _signing_hash(issuer_key))
        if swaps:
            cert = _resign(cert, issuer_key, swaps)
        return cert

    def _check_ca_alive(self, now: dt.datetime) -> None:
        if self.issuer_cert.not_valid_after_utc <= now:
            raise PKIError(f"the issuing CA expired on "
                           f"{self.issuer_cert.not_valid_after_utc:%Y-%m-%d}; create a new CA")

    def _validity(self, kind: str, days: int | None, not_before: dt.datetime | None,
                  not_after: dt.datetime | None,
                  now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        self._check_ca_alive(now)
        start = _aware(not_before) if not_before is not None else now - BACKDATE
        if not_after is not None:
            return start, _aware(not_after)
        lifetime = DEFAULT_DAYS.get(kind, 365) if days is None else days
        if lifetime < 1:
            raise PKIError("--days must be at least 1")
        end = now + dt.timedelta(days=lifetime)
        # a leaf must not outlive the CA that vouches for it
        return start, min(end, self.issuer_cert.not_valid_after_utc)

    def _record(self, index: dict[str, Any], cert: x509.Certificate, kind: str,
                cert_path: Path, **extra: Any) -> None:
        write_file(self.directory / "certs" / f"{serial_hex(cert.serial_number)}.pem",
                   cert_pem(cert), overwrite=True)
        role_error: str | None = None
        try:
            role = read_role(cert)
        except IdentityError as exc:  # deliberately broken test certificates are indexed too
            role, role_error = None, exc.reason
        if role_error is not None:
            extra = {**extra, "role_error": role_error}
        dns, ips, _ = san_values(cert)
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        index["certificates"].append({
            "serial": serial_hex(cert.serial_number),
            "kind": kind,
            "common_name": str(cns[0].value) if cns else None,
            "subject": cert.subject.rfc4514_string(),
            "role": role,
            "dns": dns,
            "ips": ips,
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
            "fingerprint_sha256": cert.fingerprint(hashes.SHA256()).hex(),
            "path": str(cert_path.resolve()),
            "status": "valid",
            **extra,
        })

    def issue(self, kind: str, common_name: str, *, role: str | None = None,
              dns: Sequence[str] = (), ips: Sequence[str] = (), days: int | None = None,
              out_dir: Path | str | None = None, name: str | None = None,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
              extra_extensions: Sequence[ExtraExtension] = (), key_type: str | None = None,
              organization: str | None = None, organizational_units: Sequence[str] = (),
              key_passphrase: bytes | None = None, force: bool = False,
              now: dt.datetime | None = None) -> IssuedFiles:
        """Issue a leaf with a fresh key; writes NAME.crt, NAME.key (0600) and NAME-chain.pem.

        A server certificate without --dns/--ip gets its CN as DNS name when that is a hostname,
        because TLS clients check the SAN, never the CN.
        """
        now = _aware(now or utcnow())
        role = _check_role(role, kind)
        dns_l, ips_l = _check_name(dns, ips)
        if kind == "server" and not dns_l and not ips_l:
            if not _HOSTNAME.match(common_name):
                raise PKIError("a server certificate needs --dns or --ip (clients check the name)")
            dns_l = [common_name.lower()]
        subject = _subject(common_name, organization, organizational_units)
        start, end = self._validity(kind, days, not_before, not_after, now)
        out = Path(out_dir) if out_dir is not None else self.directory / "issued"
        ensure_dir(out)
        base = _SAFE_NAME.sub("_", name or common_name).strip("._") or "cert"
        cert_path, key_path = out / f"{base}.crt", out / f"{base}.key"
        chain_path = out / f"{base}-chain.pem"
        if not force:
            for p in (cert_path, key_path, chain_path):
                if p.exists():
                    raise PKIError(f"{p}: already exists (use --force to overwrite)")
        key = generate_key(key_type or self.settings.get("key_type", DEFAULT_KEY_TYPE))
        cert = self._build_leaf(kind, subject, key.public_key(), role=role, dns=dns_l, ips=ips_l,
                                not_before=start, not_after=end,
                                extra_extensions=extra_extensions)
        with self._locked() as index:
            self._record(index, cert, kind, cert_path)
            write_key(key_path, key, passphrase=key_passphrase, overwrite=force)
            write_file(cert_path, cert_pem(cert), overwrite=force)
            write_file(chain_path, cert_pem(cert, *self.chain_certs), overwrite=force)
        return IssuedFiles(cert=cert_path, key=key_path, chain=chain_path,
                           serial=cert.serial_number)

    def sign_csr(self, csr_data: bytes, kind: str, *, out: Path | str,
                 role: str | None = None, days: int | None = None,
                 common_name: str | None = None, dns: Sequence[str] = (),
                 ips: Sequence[str] = (), use_csr_sans: bool = False,
                 organization: str | None = None, organizational_units: Sequence[str] = (),
                 force: bool = False, now: dt.datetime | None = None) -> SignedFiles:
        """Sign a device's CSR. Role, EKU and lifetime come from the caller, never from the CSR;
        only the CN (unless overridden) and, with ``use_csr_sans``, the DNS/IP names are taken."""
        now = _aware(now or utcnow())
        try:
            csr = (x509.load_pem_x509_csr(csr_data) if b"-----BEGIN" in csr_data
                   else x509.load_der_x509_csr(csr_data))
        except ValueError as exc:
            raise PKIError(f"not a readable certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise PKIError("CSR signature is invalid: it was not made with the matching key")
        if common_name is None:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if not cns:
                raise PKIError("CSR has no common name; give one with --cn")
            common_name = str(cns[0].value)
        role = _check_role(role, kind)
        if use_csr_sans and not dns and not ips:
            try:
                san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                dns = san.get_values_for_type(x509.DNSName)
                ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)]
            except x509.ExtensionNotFound:
                pass
        dns_l, ips_l = _check_name(dns, ips)
        if kind == "server" and not dns_l and not ips_l:
            raise PKIError("a server certificate needs --dns or --ip (or --use-csr-sans)")
        subject = _subject(common_name, organization, organizational_units)
        start, end = self._validity(kind, days, None, None, now)
        out_path = Path(out)
        chain_path = out_path.with_name(f"{out_path.stem}-chain.pem")
        if not force:
            for p in (out_path, chain_path):
                if p.exists():
                    raise PKIError(f"{p}: already exists (use --force to overwrite)")
        cert = self._build_leaf(kind, subject, csr.public_key(), role=role, dns=dns_l,
                                ips=ips_l, not_before=start, not_after=end)
        with self._locked() as index:
            self._record(index, cert, kind, out_path)
            write_file(out_path, cert_pem(cert), overwrite=force)
            write_file(chain_path, cert_pem(cert, *self.chain_certs), overwrite=force)
        return SignedFiles(cert=out_path, chain=chain_path, serial=cert.serial_number)

    # -- renewal --

    def renew(self, cert_path: Path | str, *, key_path: Path | str | None = None,
              chain_path: Path | str | None = None, now: dt.datetime | None = None,
              threshold: float = DEFAULT_RENEW_THRESHOLD, force: bool = False,
              reuse_key: bool = False, days: int | None = None,
              key_passphrase: bytes | None = None) -> RenewResult | None:
        """Re-issue ``cert_path`` in place with the same subject, SANs, role and other custom
        extensions, when due (``None`` when not due and not ``force``)."""
        now = _aware(now or utcnow())
        cert_path = Path(cert_path)
        old = load_certificate(cert_path)
        self._check_issued_here(old, cert_path)
        try:
            role = read_role(old)
        except IdentityError as exc:
            raise PKIError(f"{cert_path}: {exc.message}; issue a new certificate instead") from None
        if not force and not renewal_due(old, now=now, threshold=threshold):
            return None
        kind = _kind_of(old)
        key_p = Path(key_path) if key_path is not None else cert_path.with_suffix(".key")
        chain_p = (Path(chain_path) if chain_path is not None
                   else cert_path.with_name(f"{cert_path.stem}-chain.pem"))
        if reuse_key:
            key = load_key(key_p, key_passphrase)
            if key.public_key().public_bytes(*_SPKI) != old.public_key().public_bytes(*_SPKI):
                raise PKIError(f"{key_p}: does not match {cert_path}")
        else:
            if not key_p.parent.is_dir():
                raise PKIError(f"{key_p.parent}: directory does not exist")
            key = generate_key(key_type_of(old.public_key()))
        dns, ips, uris = san_values(old)
        # custom extensions survive renewal (easy-rsa's renew silently drops them)
        extras: list[ExtraExtension] = [
            ((e.oid, e.value.value), e.critical) for e in old.extensions
            if isinstance(e.value, x509.UnrecognizedExtension) and e.oid.dotted_string != ROLE_OID
        ]
        lifetime = old.not_valid_after_utc - old.not_valid_before_utc - BACKDATE
        end = now + (dt.timedelta(days=days) if days is not None else lifetime)
        self._check_ca_alive(now)
        end = min(end, self.issuer_cert.not_valid_after_utc)
        cert = self._build_leaf(kind, old.subject, key.public_key(), role=role, dns=dns, ips=ips,
                                uris=uris, not_before=now - BACKDATE, not_after=end,
                                extra_extensions=extras)
        with self._locked() as index:
            if not reuse_key:
                write_key(key_p, key, passphrase=key_passphrase, overwrite=True)
            write_file(cert_path, cert_pem(cert), overwrite=True)
            write_file(chain_p, cert_pem(cert, *self.chain_certs), overwrite=True)
            for e in index["certificates"]:
                if e.get("serial") == serial_hex(old.serial_number):
                    e["renewed_by"] = serial_hex(cert.serial_number)
            self._record(index, cert, kind, cert_path,
                         renewed_from=serial_hex(old.serial_number))
        return RenewResult(cert=cert_path, key=key_p, chain=chain_p, serial=cert.serial_number,
                           old_serial=old.serial_number, new_key=not reuse_key)

    def _check_issued_here(self, cert: x509.Certificate, path: Path) -> None:
        try:
            cert.verify_directly_issued_by(self.issuer_cert)
        except (ValueError, TypeError, InvalidSignature):
            raise PKIError(f"{path}: was not issued by the CA in {self.directory}") from None

    # -- revocation --

    def revoke(self, serial_or_cert_path: int | str | Path, reason: str = "key_compromise",
               *, now: dt.datetime | None = None) -> int:
        """Mark a certificate revoked in the index (write_crl publishes it); returns its serial."""
        now = _aware(now or utcnow())
        if reason not in REVOCATION_REASONS:
            raise PKIError(f"unknown reason {reason!r} "
                           f"(choose from {', '.join(REVOCATION_REASONS)})")
        target = serial_or_cert_path
        if isinstance(target, Path) or (isinstance(target, str) and Path(target).is_file()):
            cert = load_certificate(Path(target))
            self._check_issued_here(cert, Path(target))
            serial = cert.serial_number
        elif isinstance(target, int):
            serial = target
        else:
            serial = parse_serial(target)
        with self._locked() as index:
            wanted = serial_hex(serial)
            entry = next((e for e in index["certificates"] if e.get("serial") == wanted), None)
            if entry is None:
                raise PKIError(f"serial {serial_hex(serial)} is not in this CA's index")
            if entry.get("status") == "revoked":
                raise PKIError(f"serial {serial_hex(serial)} is already revoked")
            entry["status"] = "revoked"
            entry["revoked_at"] = now.isoformat()
            entry["revocation_reason"] = reason
        return serial

    def write_crl(self, path: Path | str | None = None, next_update_days: int = 7, *,
                  now: dt.datetime | None = None) -> Path:
        """Write the CRL of the issuing CA (plus the root's, with an intermediate) as PEM.

        An expired CRL makes OpenSSL reject every client, so renew it well before nextUpdate.
        """
        now = _aware(now or utcnow())
        if next_update_days < 1:
            raise PKIError("--next-update-days must be at least 1")
        out = Path(path) if path is not None else self.directory / "crl.pem"
        with self._locked() as index:
            number = int(index.get("crl_number", 0)) + 1
            index["crl_number"] = number
            revoked = [e for e in index["certificates"] if e.get("status") == "revoked"]
            pems = [self._crl(self.issuer_cert, self._issuer_key(), revoked, number,
                              now, next_update_days).public_bytes(serialization.Encoding.PEM)]
            if self.intermediate is not None:
                pems.append(self._crl(self.root, self._root_key(), [], number, now,
                                      next_update_days).public_bytes(serialization.Encoding.PEM))
            write_file(out, b"".join(pems), overwrite=True)
        return out

    @staticmethod
    def _crl(issuer: x509.Certificate, key: PrivateKey, revoked: Sequence[dict[str, Any]],
             number: int, now: dt.datetime, days: int) -> x509.CertificateRevocationList:
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.subject)
            .last_update(now - BACKDATE)
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                           critical=False)
        )
        for e in revoked:
            rb = (x509.RevokedCertificateBuilder()
                  .serial_number(int(e["serial"], 16))
                  .revocation_date(dt.datetime.fromisoformat(e["revoked_at"])))
            reason = e.get("revocation_reason", "unspecified")
            if reason != "unspecified":
                rb = rb.add_extension(x509.CRLReason(x509.ReasonFlags[reason]), critical=False)
            builder = builder.add_revoked_certificate(rb.build())
        return builder.sign(key, _signing_hash(key))



def _ca_certificate(subject: x509.Name, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
                    issuer: x509.Name, issuer_key: PrivateKey, not_before: dt.datetime,
                    not_after: dt.datetime, *, path_length: int) -> x509.Certificate:
    """A CA certificate (root when ``issuer_key`` is its own key, else an intermediate)."""
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(ski, critical=False)
    )
    if issuer_key.public_key() != public_key:  # an intermediate: name the root's key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    return builder.sign(issuer_key, _signing_hash(issuer_key))


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                         crl_sign=True, encipher_only=False, decipher_only=False)


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()

