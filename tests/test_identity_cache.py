"""parse_verified_identity: the per-certificate cache in front of parse_identity."""

from __future__ import annotations

import pytest
from cryptography import x509
from test_identity import make_cert, role_ext

from mbsec import identity
from mbsec.identity import IdentityError, parse_identity, parse_verified_identity


def test_same_identity_as_parse_identity_and_parsed_once() -> None:
    der = make_cert((role_ext(b"\x0c\x08operator"), False))
    first = parse_verified_identity(der)
    assert first == parse_identity(der)
    assert first.role == "operator"
    assert parse_verified_identity(bytes(der)) is first  # a new bytes object, same certificate


def test_a_certificate_that_fails_is_never_cached() -> None:
    der = make_cert((role_ext(b"\x13\x08operator"), False))  # PrintableString: refused
    for _ in range(2):
        with pytest.raises(IdentityError) as info:
            parse_verified_identity(der)
        assert info.value.reason == "role_not_utf8string"
    assert der not in identity._verified


def test_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "VERIFIED_CACHE_SIZE", 3)
    monkeypatch.setattr(identity, "_verified", {})
    ders = [make_cert((role_ext(b"\x0c\x02r" + bytes([48 + i])), False)) for i in range(5)]
    for der in ders:
        parse_verified_identity(der)
    assert list(identity._verified) == ders[2:]
    assert [parse_verified_identity(d).role for d in ders] == ["r0", "r1", "r2", "r3", "r4"]
    assert len(identity._verified) == 3


def test_distinct_certificates_are_distinct_identities() -> None:
    a = make_cert((role_ext(b"\x0c\x08operator"), False))
    b = make_cert((role_ext(b"\x0c\x08engineer"), False))
    assert x509.load_der_x509_certificate(a).serial_number == \
        x509.load_der_x509_certificate(b).serial_number  # only the role differs
    assert parse_verified_identity(a).role == "operator"
    assert parse_verified_identity(b).role == "engineer"
    assert parse_verified_identity(a).fingerprint_sha256 != parse_verified_identity(
        b).fingerprint_sha256
