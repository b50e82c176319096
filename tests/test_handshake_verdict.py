"""What a finished handshake decides (:mod:`mbsec.handshake`), sans-IO: real certificates from
``mbsec.pki``, real TLS material and CRLs from ``mbsec.tls.build_material``, handshakes run
in memory between two ``ssl.SSLObject`` (no socket, no thread). The proxy's end-to-end tests
(tests/e2e/test_tls_rejections.py, test_reload.py, test_tls_session_resumption.py) check the
same outcomes through a running proxy; these pin each rule and its order on its own."""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from pki_helpers import der_of

from mbsec.handshake import (
    Acceptance,
    IdentityCounter,
    Refusal,
    failed,
    not_completed,
    verdict,
)
from mbsec.identity import ROLE_OID
from mbsec.path.decide import ProxyState
from mbsec.pki.ca import CertificateAuthority, IssuedFiles
from mbsec.policy import RateLimiter, load_policy_text
from mbsec.settings import TlsSettings
from mbsec.tls import TlsMaterial, build_material
from mbsec.tls_sniff import HandshakeTap

POLICY = """\
version: 1
default: deny
description: verdict tests
targets:
  plc: {description: the PLC, upstream: "127.0.0.1:502", unit_ids: [1]}
rules:
  - id: operator-read
    description: operators read
    roles: [operator]
    targets: [plc]
    functions: [read_holding_registers]
    addresses: ["0-99"]
"""


@dataclass
class Plant:
    dir: Path
    ca: CertificateAuthority
    operator: IssuedFiles
    expired: IssuedFiles
    rogue: IssuedFiles

    def material(self, *, revoke: int | None = None, name: str = "crl.pem") -> TlsMaterial:
        if revoke is not None:
            self.ca.revoke(revoke, reason="key_compromise")
        crl = self.ca.write_crl(self.dir / name)
        return build_material(TlsSettings(cert=self.dir / "srv-chain.pem",
                                          key=self.dir / "srv.key",
                                          client_ca=self.ca.trust_bundle, crl=[crl]))

    def state(self, material: TlsMaterial) -> ProxyState:
        policy = load_policy_text(POLICY)
        return ProxyState(tls=material, policy=policy, limiter=RateLimiter(policy))


@pytest.fixture
def plant(tmp_path: Path) -> Plant:
    ca = CertificateAuthority.init(tmp_path / "ca", common_name="Verdict CA")
    ca.issue("server", "proxy", dns=("localhost",), out_dir=tmp_path, name="srv")
    operator = ca.issue("client", "op-1", role="operator", out_dir=tmp_path, name="op")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = ca.issue("client", "old-1", role="operator", out_dir=tmp_path, name="old",
                       not_before=past, not_after=past + dt.timedelta(days=1))
    rogue_ca = CertificateAuthority.init(tmp_path / "rogue", common_name="Rogue CA")
    rogue = rogue_ca.issue("client", "rogue-1", role="operator", out_dir=tmp_path, name="rogue")
    return Plant(tmp_path, ca, operator, expired, rogue)


NOW = dt.datetime.now(dt.UTC)


def judge(der: bytes | None, state: ProxyState, *, resumed: bool = False,
          slots: IdentityCounter | None = None, now: dt.datetime = NOW) -> Acceptance | Refusal:
    counter = slots if slots is not None else IdentityCounter(4)
    return verdict(der=der, resumed=resumed, state=lambda: state, now=now, slots=counter,
                   max_per_identity=counter.limit)


def test_a_valid_client_gets_in_with_its_role_and_claims_its_identity_slot(plant: Plant) -> None:
    state = plant.state(plant.material())
    slots = IdentityCounter(4)
    outcome = judge(der_of(plant.operator.cert), state, slots=slots)
    assert isinstance(outcome, Acceptance)
    assert outcome.identity.role == "operator" and outcome.identity.common_name == "op-1"
    assert outcome.state is state and outcome.issuing_cas == ()
    assert slots.held == {outcome.identity.subject: 1}


def test_no_certificate_is_an_unauthenticated_refusal(plant: Plant) -> None:
    outcome = judge(None, plant.state(plant.material()), resumed=False)
    assert outcome == Refusal("no_certificate", "the client sent no certificate",
                              resumed=False, authenticated=False)


def test_the_crl_is_checked_against_the_state_read_after_the_handshake(plant: Plant) -> None:
    before = plant.state(plant.material())
    after = plant.state(plant.material(revoke=plant.operator.serial, name="crl2.pem"))
    der = der_of(plant.operator.cert)
    assert isinstance(judge(der, before), Acceptance)
    reads: list[ProxyState] = []

    def current() -> ProxyState:  # a reload landed during the handshake
        reads.append(after)
        return after

    slots = IdentityCounter(4)
    outcome = verdict(der=der, resumed=False, state=current, now=NOW, slots=slots,
                      max_per_identity=4)
    assert isinstance(outcome, Refusal) and outcome.reason == "certificate_revoked"
    assert outcome.authenticated and outcome.identity is not None
    assert outcome.identity.serial == plant.operator.serial
    assert reads == [after] and slots.held == {}  # read once; nothing claimed


def test_an_expired_certificate_is_refused_and_named(plant: Plant) -> None:
    outcome = judge(der_of(plant.expired.cert), plant.state(plant.material()))
    assert isinstance(outcome, Refusal)
    assert (outcome.reason, outcome.authenticated) == ("certificate_expired", True)
    assert outcome.identity is not None and outcome.identity.common_name == "old-1"


def test_a_resumed_session_is_refused_before_the_crl_and_the_slot(plant: Plant) -> None:
    slots = IdentityCounter(4)
    outcome = judge(der_of(plant.operator.cert), plant.state(plant.material()), resumed=True,
                    slots=slots)
    assert isinstance(outcome, Refusal) and outcome.reason == "session_resumed"
    assert outcome.resumed is True and slots.held == {}


def test_the_identity_limit_refuses_the_one_over_it(plant: Plant) -> None:
    state = plant.state(plant.material())
    der = der_of(plant.operator.cert)
    slots = IdentityCounter(2)
    assert [isinstance(judge(der, state, slots=slots), Acceptance) for _ in range(2)] == [True,
                                                                                         True]
    outcome = judge(der, state, slots=slots)
    assert isinstance(outcome, Refusal)
    assert outcome.reason == "too_many_connections_for_identity"
    assert outcome.detail == "more than 2 connections for this identity"
    assert outcome.identity is not None
    key = outcome.identity.subject
    assert slots.held == {key: 2}
    slots.release_identity(key)  # a connection of that identity ended: a place came free
    assert isinstance(judge(der, state, slots=slots), Acceptance)
    for _ in range(2):
        slots.release_identity(key)
    assert slots.held == {}  # the last release forgets the identity


def test_a_malformed_role_is_refused_with_the_certificate_named_without_its_role(
    plant: Plant,
) -> None:
    leaf = plant.ca.issue("client", "bad-role", out_dir=plant.dir, name="badrole",
                          extra_extensions=[(x509.UnrecognizedExtension(
                              x509.ObjectIdentifier(ROLE_OID), b"\x0c"), False)])
    outcome = judge(der_of(leaf.cert), plant.state(plant.material()))
    assert isinstance(outcome, Refusal) and outcome.reason == "role_malformed"
    assert outcome.authenticated  # OpenSSL verified the chain: always written, not aggregated
    assert outcome.identity is not None and outcome.identity.common_name == "bad-role"
    assert outcome.identity.role is None


def test_a_deadline_and_an_eviction_say_which_ended_the_handshake() -> None:
    assert not_completed(False, 2.5) == Refusal(
        "handshake_timeout", "no complete handshake within 2.5 s", authenticated=False)
    evicted = not_completed(True, 2.5)
    assert evicted.reason == "handshake_evicted" and not evicted.authenticated
    assert "limits.max_handshakes" in evicted.detail


def _failed_handshake(material: TlsMaterial, client: IssuedFiles,
                      ca: Path) -> tuple[ssl.SSLError, HandshakeTap]:
    """A TLS 1.2 handshake in memory that OpenSSL fails, with the client's bytes on a tap."""
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cctx.load_verify_locations(cafile=ca)
    cctx.load_cert_chain(client.chain, client.key)
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = material.context.wrap_bio(s_in, s_out, server_side=True)
    cli = cctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    tap = HandshakeTap()
    for _ in range(20):
        for obj in (cli, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if obj is server:
                    tap.stop()
                    return exc, tap
        data = c_out.read()
        tap.feed(data)
        s_in.write(data)
        c_in.write(s_out.read())
    raise AssertionError("the server never failed the handshake")


def test_a_handshake_openssl_fails_names_the_certificate_the_client_presented(
    plant: Plant,
) -> None:
    material = plant.material()
    error, tap = _failed_handshake(material, plant.rogue, plant.ca.trust_bundle)
    outcome = failed(error, tap, None)
    assert (outcome.reason, outcome.authenticated) == ("unknown_ca", False)
    assert outcome.identity is not None and outcome.identity.common_name == "rogue-1"
    assert outcome.identity.issuer == "CN=Rogue CA"
