"""Every TLS rejection path: the client must receive the fatal alert, the SIEM an event with the
reason, and the PLC nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import ssl
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import (
    Pki,
    ScriptedPlc,
    StartProxy,
    TlsClient,
    blocking_ask,
    blocking_tls,
    read_hr,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mbsec.identity import ROLE_OID
from mbsec.pki.ca import CertificateAuthority


@dataclass
class Outcome:
    kind: str  # "reply" | "alert" | "eof"
    detail: str | bytes


async def attempt(port: int, ctx: ssl.SSLContext) -> Outcome:
    """Connect, handshake, send one FC03 request and see what comes back."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        with trio.fail_after(5):
            try:
                await stream.do_handshake()
                await stream.send_all(bytes.fromhex("000100000006010300000001"))
                data = await stream.receive_some(4096)
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                if isinstance(cause, ssl.SSLError):
                    return Outcome("alert" if "ALERT" in (cause.reason or "") else "error",
                                   cause.reason or str(cause))
                return Outcome("eof", repr(cause))
            return Outcome("reply", data) if data else Outcome("eof", b"")
    finally:
        await trio.aclose_forcefully(stream)


@pytest.fixture
async def silent_plc(nursery: trio.Nursery) -> ScriptedPlc:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    return plc


def level(reason: str) -> str:
    """A revoked certificate's rejection is an incident (``error``, ``event.kind`` alert)."""
    return "error" if reason == "certificate_revoked" else "warning"


async def rejected(h: object, reason: str) -> dict[str, object]:
    ev = await h.wait_event(  # type: ignore[attr-defined]
        "tls-handshake", lambda e: e.get("event.outcome") == "failure"
    )
    assert ev["event.reason"] == reason, ev
    assert ev["log.level"] == level(reason)
    return ev  # type: ignore[no-any-return]


async def rejected_named(h: object, reason: str) -> dict[str, object]:
    """The first rejection that names a certificate (after earlier ones that named none)."""
    ev = await h.wait_event(  # type: ignore[attr-defined]
        "tls-handshake", lambda e: e.get("event.outcome") == "failure"
        and "tls.client.hash.sha256" in e,
    )
    assert ev["event.reason"] == reason, ev
    assert ev["log.level"] == level(reason)
    return ev  # type: ignore[no-any-return]


async def test_accepted_client_gets_a_reply(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(pki.operator))
    assert out.kind == "reply"
    ev = await h.wait_event("tls-handshake")
    assert ev["event.outcome"] == "success"
    assert ev["tls.version"] in ("1.2", "1.3")
    assert ev["tls.client.x509.subject.common_name"] == "op-1"
    assert len(ev["tls.client.hash.sha256"]) == 64


async def test_no_certificate_tls13_alert_reaches_client(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(None))
    assert out.kind == "alert", out
    assert out.detail == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    await rejected(h, "no_certificate")
    assert silent_plc.requests == []


async def test_no_certificate_tls12_alert_reaches_client(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    # Under TLS 1.2 the client waits for the server's Finished; without the alert flush it
    # would only see a bare EOF.
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(None, max_version=ssl.TLSVersion.TLSv1_2))
    assert out.kind == "alert", out
    assert "HANDSHAKE_FAILURE" in str(out.detail) or "CERTIFICATE" in str(out.detail)
    await rejected(h, "no_certificate")


async def test_unknown_ca(pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy) -> None:
    """TLS 1.3: the rogue client's encrypted Certificate is read with the handshake's secret
    from the key log, and the rejection names it as under TLS 1.2."""
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(pki.rogue))
    assert out == Outcome("alert", "TLSV1_ALERT_UNKNOWN_CA")
    ev = await rejected(h, "unknown_ca")
    assert_names(ev, pki.rogue)
    assert ev["tls.client.x509.issuer.distinguished_name"] == "CN=Rogue CA"
    start = await h.wait_event("server-start")  # type: ignore[attr-defined]
    assert start["mbsec.tls13_rejection_certificate"] == "named"
    assert h.proxy.keylog.held == 0  # type: ignore[attr-defined]  # nothing left behind


async def test_tls13_rejections_name_nothing_when_turned_off(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(silent_plc.port, tls={"name_tls13_rejections": False})
    out = await attempt(h.port, pki.client_ctx(pki.rogue))
    assert out == Outcome("alert", "TLSV1_ALERT_UNKNOWN_CA")
    assert_names_none(await rejected(h, "unknown_ca"))
    start = await h.wait_event("server-start")  # type: ignore[attr-defined]
    assert start["mbsec.tls13_rejection_certificate"] == "off"
    # TLS 1.2 names it whatever the setting says (in clear on the wire)
    out = await attempt(h.port, pki.client_ctx(pki.rogue, max_version=ssl.TLSVersion.TLSv1_2))
    assert_names(await rejected_named(h, "unknown_ca"), pki.rogue)
    # a reload that turns it on opens the key log then: the next TLS 1.3 rejection is named
    proxy = h.proxy  # type: ignore[attr-defined]
    assert proxy.keylog is None
    tls_on = proxy.settings.tls.model_copy(update={"name_tls13_rejections": True})
    assert proxy.reload(proxy.settings.model_copy(update={"tls": tls_on}))
    assert proxy.keylog is not None
    await attempt(h.port, pki.client_ctx(pki.rogue))
    with trio.fail_after(5):
        while len([e for e in h.events("tls-handshake")  # noqa: ASYNC110
                   if "tls.client.hash.sha256" in e]) < 2:
            await trio.sleep(0.01)
    named = [e for e in h.events("tls-handshake") if "tls.client.hash.sha256" in e]
    assert_names(named[1], pki.rogue)


async def test_unknown_ca_tls12(pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy) -> None:
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(pki.rogue, max_version=ssl.TLSVersion.TLSv1_2))
    assert out == Outcome("alert", "TLSV1_ALERT_UNKNOWN_CA")
    ev = await rejected(h, "unknown_ca")
    assert_names(ev, pki.rogue)
    assert ev["tls.client.x509.issuer.distinguished_name"] == "CN=Rogue CA"


def _cert(files: object) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())  # type: ignore[attr-defined]


def assert_names(ev: dict[str, object], files: object) -> None:
    """The rejection event names the certificate the client presented (TLS 1.2: read from its
    Certificate message, which travels in clear)."""
    cert = _cert(files)
    assert ev["tls.client.x509.serial_number"] == format(cert.serial_number, "X"), ev
    assert ev["tls.client.hash.sha256"] == cert.fingerprint(hashes.SHA256()).hex(), ev
    assert ev["tls.client.x509.subject.distinguished_name"] == cert.subject.rfc4514_string()
    assert ev["tls.client.x509.issuer.distinguished_name"] == cert.issuer.rfc4514_string()
    assert ev["tls.client.x509.not_after"] == cert.not_valid_after_utc.isoformat()


def assert_names_none(ev: dict[str, object]) -> None:
    """TLS 1.3 with ``tls.name_tls13_rejections`` off: the Certificate stays encrypted."""
    assert not [k for k in ev if k.startswith("tls.client.")], ev


def _ctx_for(pki: Pki, ca: CertificateAuthority, cert: object,
             max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.trust_bundle))
    if max_version is not None:
        ctx.maximum_version = max_version
    ctx.load_cert_chain(str(cert.chain), str(cert.key))  # type: ignore[attr-defined]
    return ctx


async def _proxy_trusting(
    ca: CertificateAuthority, pki: Pki, plc: ScriptedPlc, start_proxy: StartProxy,
    crl: Path | None = None,
) -> object:
    return await start_proxy(
        plc.port,
        tls={"client_ca": str(ca.trust_bundle)},
        crl=[crl or ca.write_crl()],
    )


async def test_expired_certificate(
    pki: Pki, fresh_ca: CertificateAuthority, silent_plc: ScriptedPlc, start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = fresh_ca.issue("client", "old", role="operator", out_dir=tmp_path, name="old",
                          not_before=now - dt.timedelta(days=30),
                          not_after=now - dt.timedelta(days=1))
    h = await _proxy_trusting(fresh_ca, pki, silent_plc, start_proxy)
    out = await attempt(h.port, _ctx_for(pki, fresh_ca, cert))  # type: ignore[attr-defined]
    assert out == Outcome("alert", "SSLV3_ALERT_CERTIFICATE_EXPIRED")
    assert_names(await rejected(h, "certificate_expired"), cert)  # TLS 1.3
    out = await attempt(h.port, _ctx_for(pki, fresh_ca, cert, ssl.TLSVersion.TLSv1_2))
    assert out == Outcome("alert", "SSLV3_ALERT_CERTIFICATE_EXPIRED")
    assert_names(await rejected_named(h, "certificate_expired"), cert)


async def test_not_yet_valid_certificate(
    pki: Pki, fresh_ca: CertificateAuthority, silent_plc: ScriptedPlc, start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    cert = fresh_ca.issue("client", "future", role="operator", out_dir=tmp_path, name="future",
                          not_before=now + dt.timedelta(days=2),
                          not_after=now + dt.timedelta(days=30))
    h = await _proxy_trusting(fresh_ca, pki, silent_plc, start_proxy)
    out = await attempt(h.port, _ctx_for(pki, fresh_ca, cert))  # type: ignore[attr-defined]
    assert out.kind == "alert"
    assert_names(await rejected(h, "certificate_not_yet_valid"), cert)  # TLS 1.3
    out12 = await attempt(h.port, _ctx_for(pki, fresh_ca, cert, ssl.TLSVersion.TLSv1_2))
    assert out12 == out
    assert_names(await rejected_named(h, "certificate_not_yet_valid"), cert)


async def test_revoked_certificate(
    pki: Pki, fresh_ca: CertificateAuthority, silent_plc: ScriptedPlc, start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    good = fresh_ca.issue("client", "good", role="operator", out_dir=tmp_path, name="good")
    bad = fresh_ca.issue("client", "bad", role="operator", out_dir=tmp_path, name="bad")
    fresh_ca.revoke(bad.serial)
    crl = fresh_ca.write_crl(tmp_path / "crl.pem")
    h = await _proxy_trusting(fresh_ca, pki, silent_plc, start_proxy, crl)
    assert (await attempt(h.port, _ctx_for(pki, fresh_ca, good))).kind == "reply"
    out = await attempt(h.port, _ctx_for(pki, fresh_ca, bad))
    assert out == Outcome("alert", "SSLV3_ALERT_CERTIFICATE_REVOKED")
    assert_names(await rejected(h, "certificate_revoked"), bad)  # TLS 1.3
    out = await attempt(h.port, _ctx_for(pki, fresh_ca, bad, ssl.TLSVersion.TLSv1_2))
    assert out == Outcome("alert", "SSLV3_ALERT_CERTIFICATE_REVOKED")
    ev = await rejected_named(h, "certificate_revoked")
    assert_names(ev, bad)
    assert ev["tls.client.x509.serial_number"] == format(bad.serial, "X")
    assert ev["tls.client.x509.subject.common_name"] == "bad"
    assert ev["event.kind"] == "alert" and "intrusion_detection" in ev["event.category"]
    assert len(silent_plc.requests) == 1  # the good client's only
    # an incident, counted: both attempts (TLS 1.3 and 1.2), nothing for the good client
    assert h.metrics.value(  # type: ignore[attr-defined]
        "mbsec_revoked_certificate_seen_total", stage="handshake") == 2


async def test_revocation_after_reload_applies_to_the_same_client(
    pki: Pki, fresh_ca: CertificateAuthority, silent_plc: ScriptedPlc, start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    """A client accepted before the CRL changed is rejected on its next connection (no
    session resumption can carry it past the new CRL)."""
    cert = fresh_ca.issue("client", "later-bad", role="operator", out_dir=tmp_path, name="lb")
    crl = fresh_ca.write_crl(tmp_path / "crl.pem")
    h = await _proxy_trusting(fresh_ca, pki, silent_plc, start_proxy, crl)
    ctx = _ctx_for(pki, fresh_ca, cert)
    assert (await attempt(h.port, ctx)).kind == "reply"
    held = await TlsClient.connect(h.port, ctx)  # a long-lived HMI connection
    assert (await held.request(1, 1, read_hr(0, 1)))[2][0] == 3
    fresh_ca.revoke(cert.serial)
    fresh_ca.write_crl(tmp_path / "crl.pem")
    assert h.proxy.reload()  # type: ignore[attr-defined]
    out = await attempt(h.port, ctx)
    assert out.kind == "alert"
    await rejected(h, "certificate_revoked")
    assert await held.closed_by_peer()  # the open connection is ended too
    ev = await h.wait_event("connection-revoked")  # type: ignore[attr-defined]
    assert ev["event.reason"] == "certificate_revoked"
    assert ev["event.kind"] == "alert" and ev["log.level"] == "error"
    metrics = h.metrics  # type: ignore[attr-defined]
    assert metrics.value("mbsec_revoked_certificate_seen_total", stage="open_connection") == 1
    assert metrics.value("mbsec_revoked_certificate_seen_total", stage="handshake") == 1
    closed = await h.wait_event(  # type: ignore[attr-defined]
        "connection-closed", lambda e: e.get("event.reason") == "certificate_revoked")
    assert closed["mbsec.requests"] == 1


async def test_client_of_an_intermediate_the_root_crl_revoked_is_refused(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy, tmp_path: Path
) -> None:
    """The root's CRL revokes the (compromised) intermediate CA: its clients are refused,
    although their own certificates are on no CRL (``VERIFY_CRL_CHECK_CHAIN``). Regression:
    the root CRL was loaded but never applied to the intermediate."""
    ca = CertificateAuthority.init(tmp_path / "ica", common_name="Plant CA", intermediate=True)
    assert ca.intermediate is not None
    leaf = ca.issue("client", "via-intermediate", role="operator", out_dir=tmp_path,
                    name="vi")
    crl = ca.write_crl(tmp_path / "crl.pem")  # intermediate's CRL (empty) + root's (empty)
    now = dt.datetime.now(dt.UTC)
    root_crl = CertificateAuthority._crl(  # the root revokes the intermediate
        ca.root, ca._root_key(),
        [{"serial": format(ca.intermediate.serial_number, "x"),
          "revoked_at": (now - dt.timedelta(minutes=5)).isoformat(),
          "revocation_reason": "ca_compromise"}],
        99, now, 7,
    )
    end = b"-----END X509 CRL-----\n"
    int_crl = crl.read_bytes().split(end)[0] + end  # keep the intermediate's own CRL
    (tmp_path / "both.pem").write_bytes(
        int_crl + root_crl.public_bytes(serialization.Encoding.PEM))
    h = await _proxy_trusting(ca, pki, silent_plc, start_proxy, tmp_path / "both.pem")
    out = await attempt(h.port, pki.client_ctx(leaf))
    assert out.kind != "reply", "a client of a revoked intermediate CA was served"
    assert_names(await rejected(h, "certificate_revoked"), leaf)  # TLS 1.3: the leaf
    out12 = await attempt(h.port, pki.client_ctx(leaf, max_version=ssl.TLSVersion.TLSv1_2))
    assert out12.kind != "reply"
    assert_names(await rejected_named(h, "certificate_revoked"), leaf)  # the leaf, not the CA
    assert silent_plc.requests == []


async def test_unknown_critical_extension(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy, tmp_path: Path
) -> None:
    odd = (x509.ObjectIdentifier("1.3.6.1.4.1.99999.1.2"), b"\x05\x00")
    cert = pki.ca.issue("client", "crit", role="operator", out_dir=tmp_path, name="crit",
                        extra_extensions=[(odd, True)])
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(cert))
    assert out.kind == "alert"
    await rejected(h, "unhandled_critical_extension")
    out12 = await attempt(h.port, pki.client_ctx(cert, max_version=ssl.TLSVersion.TLSv1_2))
    assert out12 == out
    assert_names(await rejected_named(h, "unhandled_critical_extension"), cert)


async def test_malformed_role_printable_string(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy, tmp_path: Path
) -> None:
    role = (x509.ObjectIdentifier(ROLE_OID), b"\x13\x08operator")  # PrintableString, not UTF8
    cert = pki.ca.issue("client", "badrole", out_dir=tmp_path, name="badrole",
                        extra_extensions=[(role, False)])
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(cert))
    assert out.kind in ("eof", "alert"), out  # no Modbus reply: the connection is dropped
    ev = await rejected(h, "role_not_utf8string")
    assert ev["error.message"]
    assert_names(ev, cert)  # verified, refused after the handshake: any TLS version
    assert silent_plc.requests == []


async def test_two_roles_rejected(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy, tmp_path: Path
) -> None:
    r1 = (x509.ObjectIdentifier(ROLE_OID), b"\x0c\x08operator")
    r2 = (x509.ObjectIdentifier(ROLE_OID), b"\x0c\x08engineer")
    try:
        cert = pki.ca.issue("client", "tworoles", out_dir=tmp_path, name="tworoles",
                            extra_extensions=[(r1, False), (r2, False)])
    except Exception as exc:  # the PKI may refuse to build it at all
        pytest.skip(f"PKI refuses duplicate extensions: {exc}")
    h = await start_proxy(silent_plc.port)
    out = await attempt(h.port, pki.client_ctx(cert))
    assert out.kind != "reply"
    ev = await h.wait_event("tls-handshake", lambda e: e.get("event.outcome") == "failure")
    assert ev["event.reason"] in ("role_duplicated", "certificate_malformed",
                                  "certificate_verify_failed")


async def test_tls11_client_refused(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(silent_plc.port)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca.trust_bundle))
    ctx.load_cert_chain(str(pki.operator.chain), str(pki.operator.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    out = await attempt(h.port, ctx)
    assert out.kind in ("alert", "error"), out
    assert out.kind != "reply"
    await rejected(h, "unsupported_protocol_version")


async def test_plaintext_modbus_on_the_tls_port(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(silent_plc.port)
    s = await trio.open_tcp_stream("127.0.0.1", h.port)
    await s.send_all(bytes.fromhex("000100000006010300000001"))
    with trio.fail_after(5):
        rest = b""
        while chunk := await s.receive_some(4096):
            rest += chunk
    await s.aclose()
    assert not rest.startswith(b"\x00\x01")  # never a Modbus reply; at most a TLS alert
    await rejected(h, "not_tls")


async def test_handshake_timeout(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(silent_plc.port, tls={"handshake_timeout": 0.2})
    s = await trio.open_tcp_stream("127.0.0.1", h.port)
    with trio.fail_after(5):
        assert await s.receive_some(10) == b""  # the proxy hangs up
    await s.aclose()
    await rejected(h, "handshake_timeout")


async def test_tls_material_is_strict(pki: Pki, start_proxy: StartProxy,
                                      silent_plc: ScriptedPlc) -> None:
    h = await start_proxy(silent_plc.port)
    ctx = h.proxy.state.tls.context  # type: ignore[attr-defined]
    assert h.proxy.state.tls.session_cache_off  # type: ignore[attr-defined]
    assert ctx.session_stats()["number"] == 0
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.options & ssl.OP_NO_TICKET
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.num_tickets == 0
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    names = {c["name"] for c in ctx.get_ciphers()}
    assert {"ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES128-GCM-SHA256"} <= names
    # TLS 1.2: the mandatory suites first, then only ECDHE AEAD suites (no CBC, static RSA, NULL)
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert {c["name"] for c in tls12[:2]} == {"ECDHE-ECDSA-AES128-GCM-SHA256",
                                             "ECDHE-RSA-AES128-GCM-SHA256"}
    for c in tls12:
        assert c["kea"] == "kx-ecdhe" and c["aead"], c["name"]
        # no HMAC-MD5, no HMAC-SHA-1, no NULL integrity: AEAD only
        assert c["description"].rstrip().endswith("Mac=AEAD") and c["digest"] is None, c


async def test_client_certificate_without_client_auth_usage_is_refused(
    pki: Pki, fresh_ca: CertificateAuthority, silent_plc: ScriptedPlc, start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    """A certificate whose extended key usage is serverAuth only cannot log in as a client."""
    cert = fresh_ca.issue("server", "not-a-client", dns=("localhost",), out_dir=tmp_path,
                          name="srvonly")
    h = await _proxy_trusting(fresh_ca, pki, silent_plc, start_proxy)
    out = await attempt(h.port, _ctx_for(pki, fresh_ca, cert))
    assert out.kind == "alert", out
    await rejected(h, "invalid_purpose")
    assert silent_plc.requests == []


async def test_whole_server_chain_is_sent(
    tmp_path: Path, silent_plc: ScriptedPlc, start_proxy: StartProxy, pki: Pki
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ica", common_name="Chain CA", intermediate=True)
    server = ca.issue("server", "chain-srv", dns=("localhost",), out_dir=tmp_path, name="srv")
    client = ca.issue("client", "chain-cli", role="operator", out_dir=tmp_path, name="cli")
    h = await start_proxy(
        silent_plc.port,
        tls={"cert": str(server.chain), "key": str(server.key),
             "client_ca": str(ca.trust_bundle)},
        crl=[ca.write_crl(tmp_path / "crl.pem")],
    )
    # The client trusts only the root: it can only verify if the intermediate is sent.
    ctx = ssl.create_default_context(cafile=str(ca.trust_bundle))
    ctx.load_cert_chain(str(client.chain), str(client.key))
    assert (await attempt(h.port, ctx)).kind == "reply"


async def test_tls_client_class_roundtrip(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(9, 1, read_hr(3, 2)) == (9, 1, bytes([3, 4, 0, 3, 0, 4]))
    await c.aclose()


async def test_sessions_are_never_resumed(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A client offering its previous session (after a close with close_notify, or beside an
    open connection) always gets a full handshake: no tickets, and OpenSSL's session cache
    is off (a resumed handshake would verify neither the chain's CAs nor the CRLs' freshness).
    Before the cache was turned off, both TLS 1.2 cases resumed."""
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    assert h.proxy.state.tls.session_cache_off  # type: ignore[attr-defined]
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = pki.client_ctx(pki.operator, max_version=version)
        with await trio.to_thread.run_sync(blocking_tls, h.port, ctx) as first:
            assert await trio.to_thread.run_sync(blocking_ask, first)
            session = first.session
            with await trio.to_thread.run_sync(blocking_tls, h.port, ctx, session) as beside:
                assert not beside.session_reused, version.name
                assert await trio.to_thread.run_sync(blocking_ask, beside)
            await trio.to_thread.run_sync(first.unwrap)  # close_notify both ways
        with await trio.to_thread.run_sync(blocking_tls, h.port, ctx, session) as after:
            assert not after.session_reused, version.name
            assert await trio.to_thread.run_sync(blocking_ask, after)
    accepted = [e for e in h.events("tls-handshake") if e["event.outcome"] == "success"]
    assert [(e["tls.version"], e["tls.resumed"]) for e in accepted] == [
        ("1.2", False)] * 3 + [("1.3", False)] * 3


async def test_a_resumed_session_is_refused_where_the_cache_stays_on(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the session cache cannot be turned off (another Python build), OpenSSL resumes
    TLS 1.2 sessions without verifying anything: mbsec then refuses the resumed handshake
    (fail closed) with its own reason, and the client gets no reply."""
    import mbsec.tls

    monkeypatch.setattr(mbsec.tls, "disable_session_cache", lambda ctx: False)
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    assert not h.proxy.state.tls.session_cache_off  # type: ignore[attr-defined]
    ctx = pki.client_ctx(pki.operator, max_version=ssl.TLSVersion.TLSv1_2)
    with await trio.to_thread.run_sync(blocking_tls, h.port, ctx) as first:
        assert await trio.to_thread.run_sync(blocking_ask, first)
        with await trio.to_thread.run_sync(blocking_tls, h.port, ctx, first.session) as second:
            assert second.session_reused  # OpenSSL resumed it, verifying nothing
            assert await trio.to_thread.run_sync(blocking_ask, second) == b""  # mbsec did not
    ev = await rejected(h, "session_resumed")
    assert ev["tls.resumed"] is True
    assert len(plc.requests) == 1  # only the first connection's request


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls12_extensions_and_refused_renegotiation_on_the_wire(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    """R-57/R-58: a client asking for 512-byte fragments (RFC 6066) gets the extension back;
    R-60: the server sends the RFC 5746 renegotiation indication; a renegotiation the client
    then starts (``openssl s_client``'s ``R`` command) is refused with a no_renegotiation alert.
    R-46: the chain the server sends goes down to the root (mbsec-pki's chain file)."""
    h = await start_proxy(silent_plc.port)
    res = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{h.port}", "-tls1_2",
         "-maxfraglen", "512", "-tlsextdebug", "-showcerts", "-servername", "localhost",
         "-CAfile", str(pki.ca.trust_bundle),
         "-cert", str(pki.operator.chain), "-key", str(pki.operator.key)],
        stdin=b"R\n", capture_stdout=True, capture_stderr=True, check=False,
    )
    out = (res.stdout + res.stderr).decode(errors="replace")
    assert 'TLS server extension "max fragment length" (id=1), len=1' in out, out
    assert 'TLS server extension "renegotiation info" (id=65281)' in out, out
    assert "Secure Renegotiation IS supported" in out, out
    assert "no renegotiation" in out, out  # the alert the client received for its attempt
    assert out.count("-----BEGIN CERTIFICATE-----") == 2, out  # the leaf and the root
    root = pki.ca.root.subject.rfc4514_string()
    assert re.search(rf"^ 1 s:{re.escape(root)}$", out.replace("CN = ", "CN="), re.M), out
    assert res.returncode != 0
    closed = await h.wait_event("connection-closed")  # type: ignore[attr-defined]
    assert closed["mbsec.requests"] == 0
    assert silent_plc.requests == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("suite", ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",
                                   "TLS_CHACHA20_POLY1305_SHA256"])
async def test_tls13_rejection_names_the_certificate_in_every_cipher_suite(
    pki: Pki, silent_plc: ScriptedPlc, start_proxy: StartProxy, suite: str
) -> None:
    """``openssl s_client`` with the rogue CA's certificate, one TLS 1.3 suite each: the
    Certificate is decrypted with the record protection of that suite (two share SHA-256)."""
    h = await start_proxy(silent_plc.port)
    res = await trio.run_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{h.port}", "-tls1_3",
         "-ciphersuites", suite, "-servername", "localhost",
         "-CAfile", str(pki.ca.trust_bundle),
         "-cert", str(pki.rogue.chain), "-key", str(pki.rogue.key)],
        stdin=b"", capture_stdout=True, capture_stderr=True, check=False,
    )
    out = (res.stdout + res.stderr).decode(errors="replace")
    assert f"Cipher is {suite}" in out or suite in out, out
    ev = await rejected_named(h, "unknown_ca")
    assert_names(ev, pki.rogue)
    assert h.proxy.keylog.held == 0  # type: ignore[attr-defined]
