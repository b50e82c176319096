"""HandshakeTap: the client certificate read from the bytes of a real TLS 1.2 handshake."""

from __future__ import annotations

import datetime as dt
import os
import ssl
from pathlib import Path

import pytest
from conftest import Pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mbsec.identity import ROLE_OID
from mbsec.pki.ca import IssuedFiles
from mbsec.tls_sniff import HandshakeTap, presented_identity


def _server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.server.chain), str(pki.server.key))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(pki.ca.trust_bundle))
    return ctx


def client_bytes(pki: Pki, who: IssuedFiles | None, version: ssl.TLSVersion,
                 server_ctx: ssl.SSLContext | None = None) -> bytes:
    """Everything the client sent to the server in a handshake over memory BIOs (which may
    fail: the server's verdict does not matter to what the client sent)."""
    cctx = pki.client_ctx(who, max_version=version)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = (server_ctx or _server_ctx(pki)).wrap_bio(s_in, s_out, server_side=True)
    client = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    sent = bytearray()
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, obj in (("c", client), ("s", server)):
            if done[name]:
                continue
            try:
                obj.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                done[name] = True
        data = c_out.read()
        sent += data
        s_in.write(data)
        c_in.write(s_out.read())
        if done["c"] and done["s"]:
            break
    with_more = c_out.read()  # e.g. an alert after the last round
    return bytes(sent + with_more)


def der_of(files: IssuedFiles) -> bytes:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def tapped(data: bytes, *cuts: int) -> bytes | None:
    tap = HandshakeTap()
    last = 0
    for cut in (*cuts, len(data)):
        tap.feed(data[last:cut])
        last = cut
    return tap.client_certificate()


def test_tls12_certificate_is_read(pki: Pki) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_2)
    assert tapped(data) == der_of(pki.operator)


def test_tls12_certificate_of_a_rejected_client(pki: Pki) -> None:
    """The rogue CA's client is refused (unknown_ca): its certificate is still on the wire."""
    data = client_bytes(pki, pki.rogue, ssl.TLSVersion.TLSv1_2)
    assert tapped(data) == der_of(pki.rogue)


def test_split_at_every_offset(pki: Pki) -> None:
    data = client_bytes(pki, pki.engineer, ssl.TLSVersion.TLSv1_2)
    want = der_of(pki.engineer)
    for i in range(len(data) + 1):
        assert tapped(data, i) == want, i
    for i in range(0, len(data), 7):  # three pieces
        assert tapped(data, i, min(len(data), i + 13)) == want, i


def test_every_prefix_is_none_or_the_certificate(pki: Pki) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_2)
    want = der_of(pki.operator)
    seen = False
    for i in range(len(data) + 1):
        got = tapped(data[:i])
        assert got in (None, want), i
        seen = seen or got == want
    assert seen


def test_byte_by_byte(pki: Pki) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_2)
    tap = HandshakeTap()
    for b in data:
        tap.feed(bytes([b]))
    assert tap.client_certificate() == der_of(pki.operator)


def test_no_certificate_tls12(pki: Pki) -> None:
    data = client_bytes(pki, None, ssl.TLSVersion.TLSv1_2)
    assert tapped(data) is None


def test_tls13_certificate_is_encrypted(pki: Pki) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_3)
    assert len(data) > 500  # the client did send its (encrypted) certificate
    assert tapped(data) is None
    for i in range(0, len(data) + 1, 5):
        assert tapped(data, i) is None


def test_bounded(pki: Pki) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_2)
    tap = HandshakeTap(limit=100)
    tap.feed(data)
    assert tap.recorded == 100
    assert tap.client_certificate() is None
    tap = HandshakeTap()
    tap.feed(data[:10])
    tap.stop()
    tap.feed(data[10:])
    assert tap.recorded == 10


@pytest.mark.parametrize("data", [
    b"",
    b"\x16",
    b"\x16\x03\x01",
    b"\x16\x03\x01\x00\x00",  # empty record
    b"\x16\x03\x01\xff\xff" + b"\x00" * 100,  # over-long record
    b"\x16\x03\x01\x00\x04\x0b\x00\x00\x00",  # empty Certificate
    b"\x16\x03\x03\x00\x07\x0b\x00\x00\x03\x00\x00\x00",  # list with an empty entry
    b"\x16\x03\x03\x00\x0a\x0b\x00\x00\x06\x00\x00\x03\x00\x00\x09",  # entry past the list
    b"\x16\x03\x03\x00\x0a\x0b\x00\x00\x06\x00\x00\x03\x00\x00\x01\x05",  # not a SEQUENCE
    b"\x16\x03\x03\x00\x05\x0b\xff\xff\xff\x00",  # message longer than everything
    b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
    b"\x14\x03\x03\x00\x01\x01" + b"\x16\x03\x03\x00\x04\x0b\x00\x00\x00",  # after CCS
    bytes.fromhex("000100000006010300000001"),  # plaintext Modbus
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x80\x2e\x01\x03\x01",  # SSLv2-style hello
])
def test_garbage_gives_none(data: bytes) -> None:
    assert tapped(data) is None
    for i in range(len(data) + 1):
        assert tapped(data, i) is None


def test_random_garbage_never_raises() -> None:
    rnd = os.urandom(200_000)
    for i in range(0, len(rnd) - 4000, 4000):
        chunk = b"\x16\x03\x03" + rnd[i : i + 4000]
        got = tapped(chunk, 7, 100)
        assert got is None or isinstance(got, bytes)


def test_a_certificate_after_the_change_cipher_spec_is_ignored(pki: Pki) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_2)
    assert tapped(b"\x14\x03\x03\x00\x01\x01" + data) is None


def test_presented_identity_fields(pki: Pki) -> None:
    der = der_of(pki.operator)
    ident = presented_identity(der)
    assert ident is not None
    cert = x509.load_der_x509_certificate(der)
    assert ident.serial == pki.operator.serial == cert.serial_number
    assert ident.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()
    assert ident.common_name == "op-1"
    assert ident.role == "operator"
    assert presented_identity(b"\x30\x03\x02\x01\x01") is None
    assert presented_identity(b"garbage") is None


def test_presented_identity_with_a_malformed_role(pki: Pki, tmp_path: Path) -> None:
    role = (x509.ObjectIdentifier(ROLE_OID), b"\x13\x08operator")  # PrintableString
    files = pki.ca.issue("client", "badrole-sniff", out_dir=tmp_path, name="badrole",
                         extra_extensions=[(role, False)])
    ident = presented_identity(der_of(files))
    assert ident is not None
    assert ident.serial == files.serial
    assert ident.common_name == "badrole-sniff"
    assert ident.role is None


def _bogus_ca(subject: x509.Name, issuer: x509.Name) -> x509.Certificate:
    """A CA certificate with the given names, signed by a key nobody trusts."""
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def test_issuing_cas_of_a_presented_chain(tmp_path: Path) -> None:
    """Leaf <- intermediate <- root as a client presents it: the intermediate (its issuer and
    serial, what the root's CRL lists), not the self-signed root, in any order. An impostor
    with the intermediate's name is listed too: the real one is never missed, and an extra
    certificate can only get the connection that sent it ended."""
    from mbsec.pki.ca import CertificateAuthority
    from mbsec.tls_sniff import issuing_cas

    ca = CertificateAuthority.init(tmp_path / "ica", common_name="Plant CA", intermediate=True)
    assert ca.intermediate is not None
    leaf = ca.issue("client", "vi", role="operator", out_dir=tmp_path, name="vi")
    der = serialization.Encoding.DER
    leaf_der = der_of(leaf)
    inter, root = ca.intermediate.public_bytes(der), ca.root.public_bytes(der)
    want = ((ca.root.subject.rfc4514_string(), ca.intermediate.serial_number),)
    assert issuing_cas([leaf_der, inter, root]) == want
    assert issuing_cas([leaf_der, inter]) == want
    assert issuing_cas([leaf_der, root, inter]) == want  # order as sent does not matter
    fake = _bogus_ca(ca.intermediate.subject, ca.root.subject).public_bytes(der)
    fake_entry = (ca.root.subject.rfc4514_string(),
                  x509.load_der_x509_certificate(fake).serial_number)
    assert issuing_cas([leaf_der, fake, inter, root]) == (fake_entry, *want)
    assert issuing_cas([leaf_der, inter, inter]) == want
    assert issuing_cas([leaf_der]) == ()
    assert issuing_cas([]) == ()
    assert issuing_cas([b"\x30\x03\x02\x01\x01", inter]) == want  # the leaf is not read
    assert issuing_cas([leaf_der, b"garbage", inter]) == want
