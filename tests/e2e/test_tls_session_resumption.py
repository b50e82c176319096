"""TLS 1.2 session resumption, over real sockets: a session offered after what a full handshake
checks along the chain has changed (an expired intermediate CA, an expired CRL) is not
resumed and the client is refused; a rejection after the handshake says whether it resumed.

OpenSSL's server session cache is off (a resumed handshake verifies neither the chain's CAs
nor the CRLs' freshness): these tests make sure it stays that way, whatever the client offers.
tests/e2e/test_tls_rejections.py covers the plain cases (never resumed; refused where the
cache cannot be turned off)."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

import trio
from conftest import Pki, ScriptedPlc, StartProxy, blocking_ask, blocking_tls
from cryptography.hazmat.primitives import serialization

from mbsec.pki.ca import CertificateAuthority, IssuedFiles, _ca_certificate


def tls12_ctx(pki: Pki, who: IssuedFiles) -> ssl.SSLContext:
    return pki.client_ctx(who, max_version=ssl.TLSVersion.TLSv1_2)


def full_handshake_refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        with blocking_tls(port, ctx) as s:
            return blocking_ask(s) == b""
    except (ssl.SSLError, OSError):
        return True


def refused_offering(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> bool:
    """The client offers ``session``: True when it is not resumed and the client is refused."""
    try:
        with blocking_tls(port, ctx, session) as s:
            return not s.session_reused and blocking_ask(s) == b""
    except (ssl.SSLError, OSError):
        return True


async def sleep_until(when: dt.datetime) -> None:
    await trio.sleep(max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds()))


async def scripted(nursery: trio.Nursery) -> ScriptedPlc:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    return plc


async def test_a_session_offered_after_its_intermediate_ca_expired_is_not_resumed(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Once the issuing intermediate has expired a full handshake is refused
    (``certificate_expired``); a TLS 1.2 session made before it expired is not resumed
    either. Regression: a resumed handshake was re-checked only against the leaf's CRL entry
    and notAfter, so the old session was resumed and served."""
    plc = await scripted(nursery)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ca = CertificateAuthority.init(tmp_path / "ica", common_name="Short CA", intermediate=True)
    assert ca.intermediate is not None
    int_key = ca._issuer_key()
    short = _ca_certificate(ca.intermediate.subject, int_key.public_key(), ca.root.subject,
                            ca._root_key(), now - dt.timedelta(days=1),
                            now + dt.timedelta(seconds=4), path_length=0)
    (tmp_path / "ica" / "intermediate.crt").write_bytes(
        short.public_bytes(serialization.Encoding.PEM))
    ca = CertificateAuthority.open(tmp_path / "ica")
    leaf = ca.issue("client", "under-short-ca", role="operator", out_dir=tmp_path, name="usc",
                    not_after=now + dt.timedelta(days=1))
    h = await start_proxy(plc.port, tls={"client_ca": str(ca.trust_bundle)},
                          crl=[ca.write_crl(tmp_path / "crl.pem")])
    ctx = tls12_ctx(pki, leaf)
    first = await trio.to_thread.run_sync(blocking_tls, h.port, ctx)
    with first:
        assert await trio.to_thread.run_sync(blocking_ask, first)
        await sleep_until(now + dt.timedelta(seconds=5.2))
        # a full handshake now fails: the intermediate CA has expired
        assert await trio.to_thread.run_sync(full_handshake_refused, h.port,
                                             tls12_ctx(pki, leaf))
        assert await trio.to_thread.run_sync(refused_offering, h.port, ctx, first.session), (
            "a session was resumed after its intermediate CA expired")


async def test_a_session_offered_after_the_crl_expired_is_not_resumed(
    pki: Pki, fresh_ca: CertificateAuthority, start_proxy: StartProxy, nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    """Once a loaded CRL passes its nextUpdate OpenSSL refuses every full handshake
    (``crl_expired``: revocation status unknown, fail closed); a TLS 1.2 session made before
    is not resumed either (docs/compliance.md: "revocation status is current for every
    connection (incl. resumed sessions)"). Regression: a resumed handshake only looked the
    leaf up in the stale CRL and was served."""
    plc = await scripted(nursery)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = fresh_ca.issue("client", "hmi", role="operator", out_dir=tmp_path, name="hmi")
    # lastUpdate a day ago, nextUpdate in 4 s
    crl = fresh_ca.write_crl(tmp_path / "crl.pem", next_update_days=1,
                             now=now - dt.timedelta(days=1) + dt.timedelta(seconds=4))
    h = await start_proxy(plc.port, tls={"client_ca": str(fresh_ca.trust_bundle)}, crl=[crl])
    ctx = tls12_ctx(pki, cert)
    first = await trio.to_thread.run_sync(blocking_tls, h.port, ctx)
    with first:
        assert await trio.to_thread.run_sync(blocking_ask, first)
        await sleep_until(now + dt.timedelta(seconds=5.2))
        assert await trio.to_thread.run_sync(full_handshake_refused, h.port,
                                             tls12_ctx(pki, cert))
        assert await trio.to_thread.run_sync(refused_offering, h.port, ctx, first.session), (
            "a session was resumed on an expired CRL")


async def test_tls_resumed_is_logged_on_a_per_identity_limit_rejection(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """docs/events.md: ``tls.resumed`` is "also on a rejection after the handshake": a client
    offering its session beside its open connection, refused with
    ``too_many_connections_for_identity``, is logged with ``tls.resumed`` false (present,
    and nothing was resumed). Regression: only ``certificate_revoked`` and
    ``certificate_expired`` rejections carried it (not this one, nor the role_* ones)."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port, limits={"max_per_identity": 1})
    ctx = tls12_ctx(pki, pki.operator)
    first = await trio.to_thread.run_sync(blocking_tls, h.port, ctx)
    with first:
        assert await trio.to_thread.run_sync(blocking_ask, first)
        assert await trio.to_thread.run_sync(refused_offering, h.port, ctx, first.session)
        ev = await h.wait_event("tls-handshake", lambda e: e.get("event.outcome") == "failure")
    assert ev["event.reason"] == "too_many_connections_for_identity", ev
    assert ev.get("tls.resumed") is False, ev
