"""The CA library, judged by the real openssl and a real mutual-TLS handshake."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pki_helpers import (
    client_context,
    der_of,
    handshake,
    needs_openssl,
    openssl,
    server_context,
)

from mbsec.identity import ROLE_OID, parse_identity
from mbsec.pki.ca import (
    CertificateAuthority,
    PKIError,
    create_csr,
    renewal_due,
    renewal_time,
    san_values,
)
from mbsec.pki.files import generate_key, load_certificate, load_key, write_file
from mbsec.pki.verify import verify_certificate

T0 = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(params=[False, True], ids=["root-only", "intermediate"])
def ca(request: pytest.FixtureRequest, tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca", intermediate=request.param)


def ossl_verify(ca: CertificateAuthority, chain: Path, *crl_args: str | Path) -> tuple[int, str]:
    r = openssl("verify", "-CAfile", ca.trust_bundle, "-untrusted", chain, *crl_args, chain)
    return r.returncode, r.stdout + r.stderr


# --- layout and key protection -----------------------------------------------------------------

def test_init_layout_and_refuses_existing(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", common_name="Plant CA", intermediate=True)
    d = tmp_path / "ca"
    for name in ("ca.json", "ca.crt", "intermediate.crt", "index.json", "crl.pem",
                 "private/ca.key", "private/intermediate.key"):
        assert (d / name).is_file(), name
    assert stat.S_IMODE((d / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "private/ca.key").stat().st_mode) == 0o600
    assert ca.trust_bundle == d / "ca.crt"
    assert ca.root.subject.rfc4514_string() == "CN=Plant CA"
    with pytest.raises(PKIError, match="already contains a CA"):
        CertificateAuthority.init(d)
    reopened = CertificateAuthority.open(d)
    assert reopened.intermediate is not None
    assert reopened.issuer_cert.subject == ca.intermediate.subject  # type: ignore[union-attr]


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="no such CA directory"):
        CertificateAuthority.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PKIError, match=r"ca\.json missing"):
        CertificateAuthority.open(tmp_path / "empty")
    ca = CertificateAuthority.init(tmp_path / "ca")
    (tmp_path / "ca" / "index.json").write_text("{not json")
    with pytest.raises(PKIError, match="corrupted"):
        ca.issue("client", "x", out_dir=tmp_path)
    (tmp_path / "ca" / "ca.crt").write_text("garbage")
    with pytest.raises(PKIError, match="not a readable CA certificate"):
        CertificateAuthority.open(tmp_path / "ca")


def test_issue_files_modes_and_chain(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path / "out")
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.cert.stat().st_mode) == 0o644
    chain = x509.load_pem_x509_certificates(files.chain.read_bytes())
    assert chain[0].serial_number == files.serial
    # leaf, the intermediate (if any), the root
    assert chain[1:] == ([ca.intermediate, ca.root] if ca.intermediate is not None else [ca.root])
    entry = ca.find(files.serial)
    assert entry is not None and entry["role"] == "operator" and entry["status"] == "valid"
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_refuses_to_overwrite(ca: CertificateAuthority, tmp_path: Path) -> None:
    first = ca.issue("client", "hmi-01", out_dir=tmp_path)
    before = first.key.read_bytes()
    with pytest.raises(PKIError, match="already exists"):
        ca.issue("client", "hmi-01", out_dir=tmp_path)
    assert first.key.read_bytes() == before
    again = ca.issue("client", "hmi-01", out_dir=tmp_path, force=True)
    assert again.key.read_bytes() != before
    assert stat.S_IMODE(again.key.stat().st_mode) == 0o600


def test_write_file_never_clobbers(tmp_path: Path) -> None:
    target = tmp_path / "k"
    write_file(target, b"one", mode=0o600)
    with pytest.raises(PKIError, match="already exists"):
        write_file(target, b"two", mode=0o600)
    assert target.read_bytes() == b"one"
    write_file(target, b"two", mode=0o600, overwrite=True)
    assert target.read_bytes() == b"two"
    with pytest.raises(PKIError, match="does not exist"):
        write_file(tmp_path / "nodir" / "k", b"x")


def test_encrypted_keys(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", passphrase=b"s3cret")
    assert b"ENCRYPTED" in (tmp_path / "ca/private/ca.key").read_bytes()
    locked = CertificateAuthority.open(tmp_path / "ca")
    with pytest.raises(PKIError, match="encrypted"):
        locked.issue("client", "x", out_dir=tmp_path)
    wrong = CertificateAuthority.open(tmp_path / "ca", passphrase=b"nope")
    with pytest.raises(PKIError, match="passphrase"):
        wrong.issue("client", "x", out_dir=tmp_path)
    files = ca.issue("client", "x", out_dir=tmp_path, key_passphrase=b"leafpw")
    assert isinstance(load_key(files.key, b"leafpw"), ec.EllipticCurvePrivateKey)
    with pytest.raises(PKIError, match="encrypted"):
        load_key(files.key)


@pytest.mark.parametrize("key_type", ["rsa-2048", "ec-p384"])
def test_other_key_types(tmp_path: Path, key_type: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", key_type=key_type)
    files = ca.issue("server", "plc-gw.example", out_dir=tmp_path)
    key = load_key(files.key)
    assert isinstance(key, rsa.RSAPrivateKey if key_type.startswith("rsa") else
                      ec.EllipticCurvePrivateKey)
    assert verify_certificate(files.chain, ca.trust_bundle).ok


# --- certificate contents --------------------------------------------------------------------

def test_leaf_extensions(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = ca.issue("server", "proxy", dns=["proxy.plant.example"], ips=["10.0.0.2"],
                     out_dir=tmp_path)
    cert = load_certificate(files.cert)
    ext = cert.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = ca.issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert aki.key_identifier == issuer_ski.value.digest
    assert ski.digest != aki.key_identifier
    assert san_values(cert) == (["proxy.plant.example"], ["10.0.0.2"], [])
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha256"
    with pytest.raises(x509.ExtensionNotFound):
        ext.get_extension_for_oid(x509.ObjectIdentifier(ROLE_OID))


def test_server_defaults_cn_as_dns_and_refuses_role(ca: CertificateAuthority,
                                                    tmp_path: Path) -> None:
    files = ca.issue("server", "mbsec.plant.example", out_dir=tmp_path)
    assert san_values(load_certificate(files.cert))[0] == ["mbsec.plant.example"]
    with pytest.raises(PKIError, match="needs --dns or --ip"):
        ca.issue("server", "Proxy Server", out_dir=tmp_path)
    with pytest.raises(PKIError, match="client certificates only"):
        ca.issue("server", "p.example", role="operator", out_dir=tmp_path)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"role": ""}, "invalid role"),
    ({"role": " operator"}, "invalid role"),
    ({"dns": ["bad name"]}, "not a valid DNS name"),
    ({"ips": ["10.0.0.300"]}, "not a valid IP address"),
    ({"days": 0}, "at least 1"),
])
def test_issue_input_errors(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(PKIError, match=message):
        ca.issue("client", "c", out_dir=tmp_path, **kwargs)  # type: ignore[arg-type]


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", days=30)
    cert = load_certificate(ca.issue("client", "c", days=365, out_dir=tmp_path).cert)
    assert cert.not_valid_after_utc <= ca.root.not_valid_after_utc


# --- the real openssl --------------------------------------------------------------------------

@needs_openssl
def test_openssl_verifies_every_issued_certificate(ca: CertificateAuthority,
                                                   tmp_path: Path) -> None:
    issued = [
        ca.issue("server", "proxy", dns=["localhost"], ips=["127.0.0.1"], out_dir=tmp_path),
        ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path),
        ca.issue("client", "historian-01", out_dir=tmp_path),
        ca.issue("client", "eng-01", role="engineer", key_type="rsa-2048", out_dir=tmp_path),
    ]
    crl = ca.write_crl()
    for files in issued:
        purpose = "sslserver" if files.cert.name.startswith("proxy") else "sslclient"
        rc, out = ossl_verify(ca, files.chain, "-purpose", purpose)
        assert rc == 0, out
        rc, out = ossl_verify(ca, files.chain, "-crl_check", "-CRLfile", crl)
        assert rc == 0, out
        rc, out = ossl_verify(ca, files.chain, "-crl_check_all", "-CRLfile", crl)
        assert rc == 0, out


@needs_openssl
def test_openssl_sees_role_as_noncritical_utf8string(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path)
    text = openssl("x509", "-in", files.cert, "-noout", "-text", check=True).stdout
    line = next(li for li in text.splitlines() if ROLE_OID in li)
    assert "critical" not in line
    assert "operator" in text
    # the extension value, parsed on its own, is one UTF8STRING
    asn1 = openssl("asn1parse", "-in", files.cert, check=True).stdout.splitlines()
    idx = next(i for i, li in enumerate(asn1) if ROLE_OID in li)
    following = asn1[idx + 1]
    assert "BOOLEAN" not in following  # critical flag omitted = FALSE (DER default)
    assert "OCTET STRING" in following
    offset = following.split(":", 1)[0].strip()
    inner = openssl("asn1parse", "-in", files.cert, "-strparse", offset, check=True).stdout
    assert "UTF8STRING" in inner and ":operator" in inner


@needs_openssl
def test_openssl_rejects_revoked(ca: CertificateAuthority, tmp_path: Path) -> None:
    good = ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path)
    bad = ca.issue("client", "vendor-acme", role="vendor", out_dir=tmp_path)
    assert ca.revoke(bad.cert, "cessation_of_operation") == bad.serial
    crl = ca.write_crl(next_update_days=3)
    rc, out = ossl_verify(ca, bad.chain, "-crl_check", "-CRLfile", crl)
    assert rc != 0 and "revoked" in out
    rc, out = ossl_verify(ca, good.chain, "-crl_check", "-CRLfile", crl)
    assert rc == 0, out
    text = openssl("crl", "-in", crl, "-noout", "-text", check=True).stdout
    assert f"{bad.serial:X}" in text.replace(":", "").upper()
    assert "Cessation Of Operation" in text
    report = verify_certificate(bad.chain, ca.trust_bundle, crl_paths=[crl])
    assert not report.ok and "revoked" in report.problems[0]


@needs_openssl
def test_openssl_rejects_critical_role(tmp_path: Path) -> None:
    # why the role must be NON-critical: OpenSSL refuses unknown critical extensions
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.issue("client", "crit", out_dir=tmp_path,
                     extra_extensions=[((ROLE_OID, b"\x0c\x08operator"), True)])
    rc, out = ossl_verify(ca, files.chain)
    assert rc != 0 and "unhandled critical extension" in out
    report = verify_certificate(files.chain, ca.trust_bundle)
    assert any("critical" in p for p in report.problems)


# --- a real mutual-TLS handshake -----------------------------------------------------------------

def test_mutual_tls_handshake_reads_role(ca: CertificateAuthority, tmp_path: Path) -> None:
    server = ca.issue("server", "proxy", dns=["localhost"], ips=["127.0.0.1"], out_dir=tmp_path)
    client = ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path)
    crl = ca.write_crl()
    s, c = handshake(server_context(server.chain, server.key, ca.trust_bundle, crl),
                     client_context(client.chain, client.key, ca.trust_bundle), "localhost")
    peer = s.getpeercert(binary_form=True)
    assert peer is not None
    ident = parse_identity(peer)
    assert ident.role == "operator"
    assert ident.common_name == "hmi-01"
    assert ident.serial == client.serial
    assert parse_identity(c.getpeercert(binary_form=True) or b"").san_dns == ("localhost",)


def test_mutual_tls_rejects_revoked_client(ca: CertificateAuthority, tmp_path: Path) -> None:
    server = ca.issue("server", "proxy", dns=["localhost"], out_dir=tmp_path)
    client = ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path)
    ca.revoke(client.serial, "key_compromise")
    crl = ca.write_crl()
    with pytest.raises(ssl.SSLError):
        handshake(server_context(server.chain, server.key, ca.trust_bundle, crl),
                  client_context(client.chain, client.key, ca.trust_bundle), "localhost")


def test_mutual_tls_rejects_foreign_ca(tmp_path: Path) -> None:
    ours = CertificateAuthority.init(tmp_path / "ours")
    theirs = CertificateAuthority.init(tmp_path / "theirs")
    server = ours.issue("server", "proxy", dns=["localhost"], out_dir=tmp_path / "s")
    client = theirs.issue("client", "intruder", role="engineer", out_dir=tmp_path / "c")
    with pytest.raises(ssl.SSLError):
        handshake(server_context(server.chain, server.key, ours.trust_bundle),
                  client_context(client.chain, client.key, ours.trust_bundle), "localhost")


# --- revocation and CRL ----------------------------------------------------------------------

def test_revoke_errors_and_crl_numbers(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", now=T0)
    files = ca.issue("client", "c", out_dir=tmp_path, now=T0)
    with pytest.raises(PKIError, match="unknown reason"):
        ca.revoke(files.serial, "because")
    with pytest.raises(PKIError, match="not in this CA's index"):
        ca.revoke(12345)
    with pytest.raises(PKIError, match="neither a certificate file nor a hex serial"):
        ca.revoke("zz-not-hex")
    ca.revoke(f"{files.serial:x}", "superseded", now=T0)
    with pytest.raises(PKIError, match="already revoked"):
        ca.revoke(files.serial)
    crl1 = x509.load_pem_x509_crl(ca.write_crl(next_update_days=7, now=T0).read_bytes())
    crl2 = x509.load_pem_x509_crl(ca.write_crl(tmp_path / "c2.pem", now=T0).read_bytes())
    n1 = crl1.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    n2 = crl2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert n2 == n1 + 1
    assert crl1.next_update_utc == T0 + dt.timedelta(days=7)
    assert crl1.get_revoked_certificate_by_serial_number(files.serial) is not None
    # an expired CRL is reported, because OpenSSL would then reject every client
    report = verify_certificate(files.cert, ca.trust_bundle, crl_paths=[tmp_path / "c2.pem"],
                                now=T0 + dt.timedelta(days=8))
    assert any("CRL" in p and "expired" in p for p in report.problems)


def test_revoke_refuses_foreign_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    other = CertificateAuthority.init(tmp_path / "other")
    files = other.issue("client", "x", out_dir=tmp_path)
    with pytest.raises(PKIError, match="not issued by"):
        ca.revoke(files.cert)


# --- CSR and signing -----------------------------------------------------------------------------

def test_sign_never_takes_role_from_csr(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = generate_key()
    csr = create_csr("hmi-07", key=key, role="admin", dns=["evil.example"])
    from cryptography.hazmat.primitives import serialization

    pem = csr.public_bytes(serialization.Encoding.PEM)
    signed = ca.sign_csr(pem, "client", out=tmp_path / "hmi-07.crt")
    ident = parse_identity(der_of(signed.cert))
    assert ident.role is None  # asked for admin, got nothing: the role comes from the CA side
    assert ident.san_dns == ()  # the CSR's names are not copied without use_csr_sans
    signed = ca.sign_csr(pem, "client", out=tmp_path / "b.crt", role="operator")
    ident = parse_identity(der_of(signed.cert))
    assert ident.role == "operator" and ident.common_name == "hmi-07"
    cert = load_certificate(signed.cert)
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(PKIError, match="needs --dns"):
        ca.sign_csr(pem, "server", out=tmp_path / "s.crt")
    signed = ca.sign_csr(pem, "server", out=tmp_path / "s.crt", use_csr_sans=True)
    assert parse_identity(der_of(signed.cert)).san_dns == ("evil.example",)
    assert verify_certificate(signed.chain, ca.trust_bundle, purpose="server").ok


def test_sign_rejects_bad_csr(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    with pytest.raises(PKIError, match="not a readable certificate signing request"):
        ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
                    "client", out=tmp_path / "x.crt")


# --- renewal -------------------------------------------------------------------------------------

def test_renewal_threshold_with_fixed_clock(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", now=T0)
    files = ca.issue("client", "c", days=90, out_dir=tmp_path, now=T0,
                     not_before=T0)
    cert = load_certificate(files.cert)
    assert renewal_time(cert) == T0 + dt.timedelta(days=60)
    assert not renewal_due(cert, now=T0 + dt.timedelta(days=59, hours=23))
    assert renewal_due(cert, now=T0 + dt.timedelta(days=60))
    assert renewal_due(cert, now=T0 + dt.timedelta(days=200))  # expired: certainly due
    assert not renewal_due(cert, now=T0 + dt.timedelta(days=80), threshold=0.9)
    assert renewal_due(cert, now=T0 + dt.timedelta(days=81), threshold=0.9)
    with pytest.raises(PKIError):
        renewal_time(cert, threshold=0)
    assert ca.renew(files.cert, now=T0 + dt.timedelta(days=30)) is None
    assert load_certificate(files.cert).serial_number == files.serial  # untouched


def test_renew_keeps_subject_sans_role_and_custom_extensions(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", now=T0, intermediate=True)
    custom = ("1.3.6.1.4.1.99999.7", b"\x0c\x03abc")
    files = ca.issue("client", "hmi-01", role="operator", dns=["hmi-01.plant"],
                     ips=["10.1.1.1"], organization="Plant 1", organizational_units=["HMI"],
                     days=90, out_dir=tmp_path, now=T0, extra_extensions=[(custom, False)])
    old = load_certificate(files.cert)
    old_key = files.key.read_bytes()
    later = T0 + dt.timedelta(days=70)
    result = ca.renew(files.cert, now=later)
    assert result is not None and result.old_serial == files.serial
    new = load_certificate(files.cert)
    assert new.serial_number == result.serial != old.serial_number
    assert new.subject == old.subject
    assert san_values(new) == san_values(old)
    assert parse_identity(der_of(files.cert)).role == "operator"
    ext = new.extensions.get_extension_for_oid(x509.ObjectIdentifier(custom[0]))
    assert ext.value.value == custom[1]  # type: ignore[attr-defined]
    assert new.not_valid_after_utc - new.not_valid_before_utc == \
        old.not_valid_after_utc - old.not_valid_before_utc
    assert new.not_valid_before_utc <= later
    assert files.key.read_bytes() != old_key  # new key by default
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert new.public_key() == load_key(files.key).public_key()
    chain = x509.load_pem_x509_certificates(files.chain.read_bytes())
    assert chain[0] == new and len(chain) == 3  # leaf, intermediate, root
    index = {e["serial"]: e for e in ca.entries()}
    assert index[f"{old.serial_number:X}"]["renewed_by"] == f"{new.serial_number:X}"
    assert index[f"{new.serial_number:X}"]["renewed_from"] == f"{old.serial_number:X}"
    # reuse-key keeps the key
    again = ca.renew(files.cert, now=later, force=True, reuse_key=True)
    assert again is not None and not again.new_key
    assert load_certificate(files.cert).public_key() == new.public_key()


def test_renew_refuses_foreign_or_broken(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    other = CertificateAuthority.init(tmp_path / "other")
    foreign = other.issue("client", "x", out_dir=tmp_path / "o")
    with pytest.raises(PKIError, match="not issued by"):
        ca.renew(foreign.cert, force=True)
    with pytest.raises(PKIError, match="not found"):
        ca.renew(tmp_path / "missing.crt", force=True)
    broken = ca.issue("client", "dup", role="operator", out_dir=tmp_path,
                      extra_extensions=[((ROLE_OID, b"\x0c\x01x"), False)])
    with pytest.raises(PKIError, match="more than one role"):
        ca.renew(broken.cert, force=True)


def test_mutual_tls_over_a_socketpair(tmp_path: Path) -> None:
    import socket
    import threading

    ca = CertificateAuthority.init(tmp_path / "ca", intermediate=True)
    server = ca.issue("server", "proxy", dns=["localhost"], out_dir=tmp_path)
    client = ca.issue("client", "eng-01", role="engineer", out_dir=tmp_path)
    s_ctx = server_context(server.chain, server.key, ca.trust_bundle, ca.write_crl())
    c_ctx = client_context(client.chain, client.key, ca.trust_bundle)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    seen: dict[str, object] = {}

    def serve() -> None:
        try:
            with s_ctx.wrap_socket(a, server_side=True) as tls:
                seen["der"] = tls.getpeercert(binary_form=True)
                seen["version"] = tls.version()
                tls.sendall(tls.recv(4))
        except Exception as exc:  # reported by the assertion below
            seen["error"] = exc

    t = threading.Thread(target=serve)
    t.start()
    with c_ctx.wrap_socket(b, server_hostname="localhost") as tls:
        tls.sendall(b"ping")
        assert tls.recv(4) == b"ping"
    t.join(10)
    assert "error" not in seen, seen
    assert seen["version"] in ("TLSv1.2", "TLSv1.3")
    der = seen["der"]
    assert isinstance(der, bytes)
    ident = parse_identity(der)
    assert ident.role == "engineer" and ident.issuer.endswith("Issuing")


def test_expired_ca_refuses_to_issue(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", days=10, now=T0)
    with pytest.raises(PKIError, match="issuing CA expired"):
        ca.issue("client", "late", out_dir=tmp_path, now=T0 + dt.timedelta(days=11))


def test_key_types() -> None:
    from mbsec.pki.files import key_type_of

    for kt in ("ec-p256", "ec-p384", "rsa-3072"):
        assert key_type_of(generate_key(kt)) == kt
    with pytest.raises(PKIError, match="unknown key type"):
        generate_key("dsa-1024")
