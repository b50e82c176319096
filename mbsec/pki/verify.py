"""``verify``: our own checks of a certificate the way a Modbus/TCP Security peer will judge it.

OpenSSL stays the reference (the tests run ``openssl verify`` too); this adds what OpenSSL does not
say clearly: which EKU is missing, whether the role extension is well-formed and non-critical, and
when the CRL lapses.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from mbsec.identity import ROLE_OID, IdentityError, PeerIdentity, identity_from_certificate
from mbsec.pki.files import PKIError, load_certificates, read_bytes

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)
_PURPOSE = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
#: extensions OpenSSL understands; any other one marked critical makes it reject the chain
_KNOWN_CRITICAL = {
    x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid,
    x509.SubjectAlternativeName.oid, x509.NameConstraints.oid, x509.PolicyConstraints.oid,
    x509.CertificatePolicies.oid, x509.InhibitAnyPolicy.oid,
}


@dataclass(slots=True)
class VerifyReport:
    """Outcome of :func:`verify_certificate`: ``problems`` is empty when the certificate is good."""

    leaf: x509.Certificate
    chain: list[x509.Certificate] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    identity: PeerIdentity | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def parse_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL of PEM data (mbsec-pki writes the issuing CA's and the root's) or one DER CRL.

    Raises ValueError when the data holds no readable CRL.
    """
    if b"-----BEGIN" in data:
        crls = [x509.load_pem_x509_crl(m.group(0)) for m in _PEM_CRL.finditer(data)]
    else:
        crls = [x509.load_der_x509_crl(data)]
    if not crls:
        raise ValueError("contains no CRL")
    return crls


def load_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """:func:`parse_crls` on a file, with the error a CLI user can act on."""
    data = read_bytes(path, "CRL")
    try:
        return parse_crls(data)
    except ValueError as exc:
        raise PKIError(f"{path}: not a readable CRL ({exc})") from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _crl_signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    return crl.is_signature_valid(key)


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def verify_certificate(cert_path: Path, trust_path: Path, *, chain_path: Path | None = None,
                       crl_paths: Sequence[Path] = (), purpose: str | None = None,
                       now: dt.datetime | None = None) -> VerifyReport:
    """Check chain, validity, EKU, role extension and (with CRLs) revocation of ``cert_path``.

    ``cert_path`` may be a chain file (leaf first); ``trust_path`` a PEM bundle or a CA directory.
    """
    now = now or dt.datetime.now(dt.UTC)
    if trust_path.is_dir():
        trust_path = trust_path / "ca.crt"
    certs = load_certificates(cert_path)
    anchors = load_certificates(trust_path, "CA certificate")
    pool = certs[1:] + (load_certificates(chain_path, "chain") if chain_path else [])
    crls = [crl for p in crl_paths for crl in load_crls(p)]
    report = VerifyReport(leaf=certs[0], chain=[certs[0]])

    # 1. chain up to a trust anchor
    current = certs[0]
    anchored = False
    for _ in range(8):
        anchor = next((a for a in anchors if _issued_by(current, a)), None)
        if anchor is not None:
            if anchor is not current:
                report.chain.append(anchor)
            anchored = True
            break
        nxt = next((c for c in pool if c is not current and _issued_by(current, c)), None)
        if nxt is None:
            break
        report.chain.append(nxt)
        current = nxt
    if not anchored:
        report.problems.append(
            f"no chain to the trusted CA: issuer '{current.issuer.rfc4514_string()}' of "
            f"'{_name(current)}' is not in {trust_path}"
            + ("" if chain_path or len(certs) > 1 else " (pass the chain file or --chain)"))

    # 2. validity and CA flags along the chain
    for i, cert in enumerate(report.chain):
        if now < cert.not_valid_before_utc:
            report.problems.append(f"'{_name(cert)}' is not valid before "
                                   f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
        if now > cert.not_valid_after_utc:
            report.problems.append(f"'{_name(cert)}' expired on "
                                   f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
        if i > 0:
            try:
                bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
                is_ca = bc.ca
            except x509.ExtensionNotFound:
                is_ca = False
            if not is_ca:
                report.problems.append(f"'{_name(cert)}' signs certificates but is not a CA")

    # 3. the leaf: EKU, critical extensions, role
    leaf = certs[0]
    try:
        extensions = list(leaf.extensions)
        readable = True
    except (x509.DuplicateExtension, ValueError):
        extensions, readable = [], False  # identity_from_certificate below names the problem
    ekus: list[x509.ObjectIdentifier] = []
    for ext in extensions:
        if isinstance(ext.value, x509.ExtendedKeyUsage):
            ekus = list(ext.value)
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            report.problems.append("the certificate is a CA certificate, not a leaf")
        if ext.oid.dotted_string == ROLE_OID and ext.critical:
            report.problems.append("the role extension is critical: OpenSSL peers reject the chain"
                                   " (it must be non-critical)")
        elif ext.critical and ext.oid not in _KNOWN_CRITICAL:
            report.problems.append(f"unknown critical extension {ext.oid.dotted_string}")
    if not readable:
        pass
    elif purpose is not None:
        if _PURPOSE[purpose] not in ekus:
            report.problems.append(f"extended key usage lacks {purpose}Auth")
    elif not any(p in ekus for p in _PURPOSE.values()):
        report.problems.append("extended key usage has neither serverAuth nor clientAuth")
    try:
        report.identity = identity_from_certificate(leaf)
    except IdentityError as exc:
        report.problems.append(f"{exc.message} ({exc.reason})")

    # 4. revocation, for every certificate whose issuer we found
    if crl_paths:
        for i, cert in enumerate(report.chain[:-1] if anchored else report.chain):
            if i + 1 >= len(report.chain):
                break
            issuer = report.chain[i + 1]
            mine = [c for c in crls if c.issuer == issuer.subject]
            valid = [c for c in mine if _crl_signed_by(c, issuer)]
            if mine and not valid:
                report.problems.append(f"CRL of '{_name(issuer)}' has a bad signature")
            if not valid:
                if i == 0:
                    report.problems.append(f"no CRL from '{_name(issuer)}' in the given --crl")
                continue
            crl = max(valid, key=lambda c: c.last_update_utc)
            nxt_update = crl.next_update_utc
            if nxt_update is not None and now > nxt_update:
                report.problems.append(f"CRL of '{_name(issuer)}' expired on "
                                       f"{nxt_update:%Y-%m-%d %H:%M} UTC: publish a new one")
            elif nxt_update is not None and nxt_update - now < dt.timedelta(days=2):
                report.warnings.append(f"CRL of '{_name(issuer)}' expires on "
                                       f"{nxt_update:%Y-%m-%d %H:%M} UTC")
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                try:
                    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
                    why = f", reason {reason.name}"
                except x509.ExtensionNotFound:
                    why = ""
                report.problems.append(
                    f"'{_name(cert)}' was revoked on {entry.revocation_date_utc:%Y-%m-%d}{why}")
    return report
