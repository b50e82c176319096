"""Reload (SIGHUP, ``Proxy.reload``) over real sockets: what a new policy or CRL changes for the
connections already open or still handshaking, what it must not reset, and that a reload
that fails keeps the running state."""

from __future__ import annotations

import datetime as dt
import ssl
import tempfile
from pathlib import Path

import pytest
import trio
from conftest import (
    TEST_POLICY,
    Pki,
    ScriptedPlc,
    StartProxy,
    TlsClient,
    blocking_ask,
    blocking_tls,
    read_hr,
)
from cryptography.hazmat.primitives import serialization

from mbsec.pki.ca import CertificateAuthority


async def scripted(nursery: trio.Nursery) -> ScriptedPlc:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    return plc


def refused(port: int, ctx: ssl.SSLContext) -> bool:
    """A full handshake and one request (blocking; run it in a thread): True when the proxy
    refuses the client instead of answering."""
    try:
        with blocking_tls(port, ctx) as s:
            return blocking_ask(s) == b""
    except (ssl.SSLError, OSError):
        return True


# -- policy ---------------------------------------------------------------------------------

POLICY_WITH_IDENTITY_GRANT = TEST_POLICY.replace(
    "targets:\n",
    'identities:\n  - match: {subject_cn: "norole-1"}\n    roles: [operator]\n\ntargets:\n',
    1,
)


async def test_reload_withdrawing_an_identity_role_applies_to_open_connections(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """docs/config.md (SIGHUP): "the next request on every connection uses the new policy",
    also for roles the policy's ``identities:`` section granted. Regression: an open
    connection kept the roles the old policy's mapping had given it."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port, policy=POLICY_WITH_IDENTITY_GRANT)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.norole))
    # the certificate has no role extension; the policy's identities: entry makes it operator
    r = await c.request(1, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([3, 2, 0, 0])
    # the admin withdraws the grant (the plain test policy has no identities: section)
    h.policy_path.write_text(TEST_POLICY, encoding="utf-8")
    assert h.proxy.reload() is True
    fresh = await TlsClient.connect(h.port, pki.client_ctx(pki.norole))
    r = await fresh.request(2, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x01])  # a new connection is denied ...
    r = await c.request(3, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x01]), r  # ... and so is the open one
    await fresh.aclose()
    await c.aclose()


RATE_LIMITED_POLICY = TEST_POLICY + (
    "limits:\n  default: {requests_per_second: 0.001, burst: 1}\n"
)


async def test_reload_keeps_a_clients_spent_rate_budget(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A reload that changes nothing about limits leaves each client's rate budget as it was:
    a client cannot refill its budget by waiting for (or causing) a SIGHUP. Regression: a
    reload reset every client's budget and in-flight count."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port, policy=RATE_LIMITED_POLICY)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    r = await c.request(1, 1, read_hr(0, 1))
    assert r is not None and r[2][0] == 3  # the one token of the burst
    r = await c.request(2, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x06])  # budget spent: busy
    assert h.proxy.reload() is True  # the same files: nothing about limits changed
    r = await c.request(3, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x06]), r
    await c.aclose()


# -- failed reloads -------------------------------------------------------------------------


async def test_reload_that_cannot_write_the_crl_bundle_keeps_the_running_state(
    start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building the TLS context writes the CRLs to a temporary file: a full disk makes that
    reload fail (``False``, the running state kept) like any other bad reload. Regression:
    the OSError escaped ``reload()``, which would end the SIGHUP watcher and the proxy."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    old = h.proxy.state

    def full_tmp(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full_tmp)
    try:
        ok = h.proxy.reload()
    except OSError as exc:
        pytest.fail(f"reload raised {exc!r}: the SIGHUP watcher (and the proxy) would die")
    assert ok is False
    assert h.proxy.state is old


# -- CRLs -----------------------------------------------------------------------------------


async def test_a_handshake_that_ends_after_a_crl_reload_is_checked_against_the_new_crl(
    pki: Pki, fresh_ca: CertificateAuthority, start_proxy: StartProxy,
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    """The client opens TCP (the proxy starts its handshake with the TLS state of that
    moment), the admin revokes its certificate and reloads, then the client finishes the
    handshake within ``tls.handshake_timeout``: it is refused. Regression: a handshake was
    checked against the CRL loaded when it began."""
    plc = await scripted(nursery)
    cert = fresh_ca.issue("client", "soon-revoked", role="operator", out_dir=tmp_path,
                          name="sr")
    crl = fresh_ca.write_crl(tmp_path / "crl.pem")
    h = await start_proxy(plc.port, tls={"client_ca": str(fresh_ca.trust_bundle)}, crl=[crl])
    tcp = await trio.open_tcp_stream("127.0.0.1", h.port)
    await trio.sleep(0.2)
    fresh_ca.revoke(cert.serial)
    fresh_ca.write_crl(tmp_path / "crl.pem")
    assert h.proxy.reload() is True
    assert h.proxy.state.tls.is_revoked(  # the running state does know it is revoked
        fresh_ca.issuer_cert.subject.rfc4514_string(), cert.serial)
    stream = trio.SSLStream(tcp, pki.client_ctx(cert), server_hostname="localhost")
    c = TlsClient(stream)
    try:
        with trio.fail_after(5):
            await stream.do_handshake()
            r = await c.request(1, 1, read_hr(0, 1))
        accepted = r is not None and r[2][0] == 3
    except trio.BrokenResourceError:
        accepted = False
    finally:
        await c.aclose()
    assert not accepted, "a certificate on the loaded CRL was served"
    assert plc.requests == []


@pytest.mark.parametrize("bundle", [
    "root",  # TLS 1.3: the presented intermediate, from the key log's decryption
    "root-tls1.2",  # the presented intermediate, in clear
    pytest.param("root-tls1.3-no-keylog", marks=pytest.mark.xfail(strict=True, reason=(
        "known limit (README): with only the root in client_ca and tls.name_tls13_rejections "
        "off, a TLS 1.3 client's presented chain is not available (Python 3.11's ssl does not "
        "give the peer's chain)"))),
    "root+intermediate",
])
async def test_reload_revoking_the_intermediate_ends_its_clients_open_connections(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, tmp_path: Path, bundle: str
) -> None:
    """A reloaded root CRL that revokes the issuing intermediate CA refuses every new
    handshake of its clients (``VERIFY_CRL_CHECK_CHAIN``) and ends their open connections
    too (HMIs hold connections for weeks): known from ``client_ca``, or, with only the root
    there, from the chain the client presented (mbsec.tls_sniff.issuing_cas). Regression: only
    the leaf's own serial was looked up, so the open connections stayed up and kept being
    served."""
    plc = await scripted(nursery)
    ca = CertificateAuthority.init(tmp_path / "ica", common_name="Plant CA", intermediate=True)
    assert ca.intermediate is not None
    leaf = ca.issue("client", "via-intermediate", role="operator", out_dir=tmp_path, name="vi")
    crl_path = tmp_path / "crl.pem"
    ca.write_crl(crl_path)
    client_ca = ca.trust_bundle
    if bundle == "root+intermediate":  # the intermediate is known from client_ca
        client_ca = tmp_path / "client-ca.pem"
        client_ca.write_bytes(ca.trust_bundle.read_bytes()
                              + ca.intermediate.public_bytes(serialization.Encoding.PEM))
    tls: dict[str, object] = {"client_ca": str(client_ca)}
    if bundle == "root-tls1.3-no-keylog":
        tls["name_tls13_rejections"] = False
    h = await start_proxy(plc.port, tls=tls, crl=[crl_path])
    known = bundle == "root+intermediate"
    assert h.proxy.state.tls.knows_ca(  # type: ignore[attr-defined]
        ca.intermediate.subject.rfc4514_string()) is known
    ctx = pki.client_ctx(
        leaf, max_version=ssl.TLSVersion.TLSv1_2 if bundle == "root-tls1.2" else None)
    held = await TlsClient.connect(h.port, ctx)
    r = await held.request(1, 1, read_hr(0, 1))
    assert r is not None and r[2][0] == 3
    (session,) = h.proxy.sessions  # type: ignore[attr-defined]
    assert session.issuing_cas == (() if known else (
        (ca.root.subject.rfc4514_string(), ca.intermediate.serial_number),))
    now = dt.datetime.now(dt.UTC)
    root_crl = CertificateAuthority._crl(
        ca.root, ca._root_key(),
        [{"serial": format(ca.intermediate.serial_number, "x"),
          "revoked_at": (now - dt.timedelta(minutes=1)).isoformat(),
          "revocation_reason": "ca_compromise"}],
        99, now, 7)
    end = b"-----END X509 CRL-----\n"
    int_crl = crl_path.read_bytes().split(end)[0] + end  # the intermediate's own CRL
    crl_path.write_bytes(int_crl + root_crl.public_bytes(serialization.Encoding.PEM))
    assert h.proxy.reload()
    assert await trio.to_thread.run_sync(refused, h.port, ctx)
    try:
        r = await held.request(2, 1, read_hr(0, 1))
        served = r is not None and r[2][0] == 3
    except (trio.BrokenResourceError, trio.TooSlowError):
        served = False
    await held.aclose()
    assert not served, "an open connection of a revoked intermediate CA is still served"
    ev = await h.wait_event("connection-revoked")
    assert ev["event.reason"] == "certificate_revoked"
