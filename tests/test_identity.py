"""parse_identity and the role extension codec, on real certificates (cryptography and openssl)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from pki_helpers import der_of, needs_openssl, openssl

from mbsec.identity import (
    ROLE_OID,
    IdentityError,
    PeerIdentity,
    decode_role,
    encode_role,
    parse_identity,
)
from mbsec.pki.ca import CertificateAuthority

KEY = ec.generate_private_key(ec.SECP256R1())
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def make_cert(*extensions: tuple[x509.ExtensionType, bool], san: bool = True) -> bytes:
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Plant 1"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "HMI"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Line 2"),
        x509.NameAttribute(NameOID.COMMON_NAME, "hmi-01"),
    ])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
         .public_key(KEY.public_key()).serial_number(0x1234ABCD)
         .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=30)))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("hmi-01.plant.example"),
            x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
            x509.IPAddress(ipaddress.ip_address("fd00::1")),
            x509.UniformResourceIdentifier("urn:plant1:hmi-01"),
        ]), critical=False)
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    return b.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def role_ext(value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(ROLE_OID), value)


def reason_of(der: bytes) -> str:
    with pytest.raises(IdentityError) as info:
        parse_identity(der)
    return info.value.reason


# --- the codec -------------------------------------------------------------------------------

def test_encode_role_is_der_utf8string() -> None:
    assert encode_role("operator") == b"\x0c\x08operator"
    long_role = "é" * 100  # 200 bytes: long-form length
    assert encode_role(long_role)[:3] == b"\x0c\x81\xc8"
    assert decode_role(encode_role(long_role)) == long_role


@pytest.mark.parametrize("bad", ["", " operator", "operator\n", "op\x00erator", "x" * 129])
def test_encode_role_refuses_what_peers_would_refuse(bad: str) -> None:
    with pytest.raises(ValueError):
        encode_role(bad)


@given(st.text(alphabet=st.characters(categories=["L", "N", "P", "S"]), min_size=1, max_size=128))
def test_role_round_trip(role: str) -> None:
    assert decode_role(encode_role(role)) == role


@pytest.mark.parametrize(("value", "reason"), [
    (b"", "role_malformed"),
    (b"\x0c", "role_malformed"),
    (b"\x13\x08operator", "role_not_utf8string"),  # PrintableString
    (b"\x16\x08operator", "role_not_utf8string"),  # IA5String
    (b"\x30\x0a\x0c\x08operator", "role_not_utf8string"),  # SEQUENCE around it
    (b"\x0c\x00", "role_empty"),
    (b"\x0c\x80operator\x00\x00", "role_malformed"),  # indefinite length
    (b"\x0c\x81\x08operator", "role_malformed"),  # non-minimal long form
    (b"\x0c\x82\x00\x08operator", "role_malformed"),  # leading zero length byte
    (b"\x0c\x85\x01\x00\x00\x00\x00", "role_malformed"),  # absurd length field
    (b"\x0c\x09operator", "role_malformed"),  # truncated
    (b"\x0c\x07operator", "role_malformed"),  # trailing byte
    (b"\x0c\x08operator\x0c\x01x", "role_malformed"),  # two strings in one value
    (b"\x0c\x02\xc3\x28", "role_invalid_utf8"),
    (b"\x0c\x01\xff", "role_invalid_utf8"),
])
def test_decode_role_rejects(value: bytes, reason: str) -> None:
    with pytest.raises(IdentityError) as info:
        decode_role(value)
    assert info.value.reason == reason


def test_decode_role_long_form_length() -> None:
    body = ("r" * 200).encode()
    assert decode_role(b"\x0c\x81\xc8" + body) == "r" * 200


# --- parse_identity on certificates built with cryptography ---------------------------------

def test_parse_identity_fields() -> None:
    der = make_cert((role_ext(b"\x0c\x08operator"), False))
    ident = parse_identity(der)
    assert isinstance(ident, PeerIdentity)
    assert ident.role == "operator"
    assert ident.common_name == "hmi-01"
    assert ident.organizational_units == ("HMI", "Line 2")
    assert ident.subject == "CN=hmi-01,OU=Line 2,OU=HMI,O=Plant 1"
    assert ident.issuer == "CN=Test CA"
    assert ident.san_dns == ("hmi-01.plant.example",)
    assert ident.san_ip == ("10.1.2.3", "fd00::1")
    assert ident.san_uri == ("urn:plant1:hmi-01",)
    assert ident.serial == 0x1234ABCD
    cert = x509.load_der_x509_certificate(der)
    assert ident.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert ident.fingerprint_sha256 == ident.fingerprint_sha256.lower()
    assert ":" not in ident.fingerprint_sha256
    assert ident.not_before == NOW and ident.not_before.tzinfo is not None
    assert ident.not_after == NOW + dt.timedelta(days=30)
    assert ident.not_after.utcoffset() == dt.timedelta(0)


def test_no_role_extension_is_the_null_role() -> None:
    ident = parse_identity(make_cert(san=False))
    assert ident.role is None
    assert ident.san_dns == () and ident.san_ip == () and ident.san_uri == ()


def test_critical_role_still_parses() -> None:
    # rejecting a critical unknown extension is OpenSSL's job during the handshake
    assert parse_identity(make_cert((role_ext(b"\x0c\x08engineer"), True))).role == "engineer"


@pytest.mark.parametrize(("value", "reason"), [
    (b"\x13\x08operator", "role_not_utf8string"),
    (b"\x0c\x00", "role_empty"),
    (b"\x0c\x02\xc3\x28", "role_invalid_utf8"),
    (b"\x0c\x08operator\x00", "role_malformed"),
])
def test_bad_role_in_certificate(value: bytes, reason: str) -> None:
    assert reason_of(make_cert((role_ext(value), False))) == reason


def test_two_role_extensions(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.issue("client", "twice", role="operator", out_dir=tmp_path,
                     extra_extensions=[((ROLE_OID, b"\x0c\x05admin"), False)])
    assert reason_of(der_of(files.cert)) == "role_duplicated"


def test_other_duplicated_extension_is_malformed(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    other = "1.3.6.1.4.1.99999.1"
    files = ca.issue("client", "dup", out_dir=tmp_path, extra_extensions=[
        ((other, b"\x05\x00"), False), ((other, b"\x05\x00"), False)])
    assert reason_of(der_of(files.cert)) == "certificate_malformed"


@pytest.mark.parametrize("der", [b"", b"\x30\x03\x02\x01\x01", b"not a certificate" * 4])
def test_unparsable_certificate(der: bytes) -> None:
    assert reason_of(der) == "certificate_malformed"


def test_truncated_certificate() -> None:
    der = make_cert((role_ext(b"\x0c\x08operator"), False))
    for cut in (1, 10, len(der) // 2, len(der) - 1):
        assert reason_of(der[:cut]) == "certificate_malformed"


def test_unknown_x509_version_is_malformed() -> None:
    """cryptography raises InvalidVersion, not a ValueError, for a version field outside v1..v3
    (found by fuzz/targets.py fuzz_certificate): it must still be an IdentityError."""
    der = bytearray(make_cert())
    at = der.index(b"\xa0\x03\x02\x01\x02")  # [0] EXPLICIT INTEGER 2 (v3)
    der[at + 4] = 0x3B
    assert reason_of(bytes(der)) == "certificate_malformed"


def test_a_name_attribute_of_a_refused_type_is_malformed() -> None:
    """cryptography raises TypeError when it builds a Name holding a BIT STRING attribute
    other than x500UniqueIdentifier (found by fuzz_certificate): still an IdentityError."""
    der = bytearray(make_cert())
    at = der.index(b"\x0c\x07Test CA")  # the issuer CN, a UTF8String
    der[at], der[at + 2] = 0x03, 0x00  # now a BIT STRING with 0 unused bits
    assert reason_of(bytes(der)) == "certificate_malformed"


# --- a certificate made by the real openssl ----------------------------------------------------

@needs_openssl
def test_openssl_req_role_extension(tmp_path: Path) -> None:
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    result = openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", crt, "-days", "30", "-subj", "/O=Plant/OU=HMI/CN=openssl-hmi",
        "-addext", f"{ROLE_OID}=ASN1:UTF8String:operator",
        "-addext", "subjectAltName=DNS:hmi.example,IP:192.0.2.7")
    assert result.returncode == 0, result.stderr
    ident = parse_identity(der_of(crt))
    assert ident.role == "operator"
    assert ident.common_name == "openssl-hmi"
    assert ident.organizational_units == ("HMI",)
    assert ident.san_dns == ("hmi.example",)
    assert ident.san_ip == ("192.0.2.7",)


@needs_openssl
def test_openssl_printablestring_role_is_rejected(tmp_path: Path) -> None:
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    result = openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", crt, "-days", "30", "-subj", "/CN=printable",
        "-addext", f"{ROLE_OID}=ASN1:PRINTABLESTRING:operator")
    assert result.returncode == 0, result.stderr
    assert reason_of(der_of(crt)) == "role_not_utf8string"


@given(st.binary(max_size=300))
def test_decode_role_fuzz_only_raises_identity_error(value: bytes) -> None:
    try:
        role = decode_role(value)
    except IdentityError as exc:
        assert exc.reason in {"role_malformed", "role_not_utf8string", "role_empty",
                              "role_invalid_utf8"}
    else:
        assert value[0] == 0x0C and role and value.endswith(role.encode("utf-8"))
