"""What a TLS handshake decides once OpenSSL is done with it (sans-IO): the client's identity,
or the reason it is refused.

The driver runs the handshake and hands over what it saw: whether it completed, timed out or
was evicted, OpenSSL's error, the peer's certificate, whether the session was resumed, the
handshake bytes the :class:`~mbsec.tls_sniff.HandshakeTap` kept and the TLS 1.3 secret of the
key log. This module turns that into a :class:`Refusal` or an :class:`Acceptance`, and the
driver logs, counts and answers. No trio, no socket, no clock of its own: today
:class:`mbsec.session.Session` drives it from trio; a handshake loop outside trio (issue 10
item 3, benchmarks/README.md "a spike of the handshake outside trio") would drive the same
decisions, so the two can never disagree on who gets in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from mbsec.identity import IdentityError, PeerIdentity, parse_verified_identity
from mbsec.tls import handshake_failure_reason
from mbsec.tls_sniff import HandshakeTap, issuing_cas, presented_identity

if TYPE_CHECKING:
    from mbsec.path.decide import ProxyState

__all__ = ["Acceptance", "IdentityCounter", "IdentitySlots", "Refusal", "failed",
           "not_completed", "verdict"]


class IdentitySlots(Protocol):
    """The per-identity connection count (``limits.max_per_identity``)."""

    def claim_identity(self, key: str) -> bool: ...

    def release_identity(self, key: str) -> None: ...


class IdentityCounter:
    """Open connections per identity (certificate subject), at most ``limit`` each
    (``limits.max_per_identity``): the proxy's :class:`IdentitySlots`."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held: dict[str, int] = {}

    def claim_identity(self, key: str) -> bool:
        held = self.held.get(key, 0)
        if held >= self.limit:
            return False
        self.held[key] = held + 1
        return True

    def release_identity(self, key: str) -> None:
        left = self.held.get(key, 1) - 1
        if left > 0:
            self.held[key] = left
        else:
            self.held.pop(key, None)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a client does not get in, with what can be said of its certificate."""

    reason: str  #: the event's ``event.reason`` slug (docs/events.md)
    detail: str  #: ``error.message``
    #: the certificate presented (verified or not); None: none, or unreadable
    identity: PeerIdentity | None = None
    #: whether the session was resumed; None: the handshake did not complete
    resumed: bool | None = None
    #: False: the peer proved nothing (OpenSSL refused it, it timed out, sent no certificate):
    #: its event goes through the admission's rejection log, which aggregates repeats
    authenticated: bool = True


@dataclass(frozen=True, slots=True)
class Acceptance:
    """A client that gets in: its identity, claimed under ``identity.subject`` (the driver
    releases that claim when the connection ends). Never a resumed session: those are refused."""

    identity: PeerIdentity
    #: the state read after the handshake (a reload may have landed during it): the CRL
    #: check used it, and the first principal must come from it too
    state: ProxyState
    #: (issuer, serial) of the CAs above the leaf the client presented, when ``client_ca``
    #: lacks its issuer (a CRL reload revoking one ends this connection too); else empty
    issuing_cas: tuple[tuple[str, int], ...] = ()


def not_completed(evicted: bool, handshake_timeout: float) -> Refusal:
    """A handshake ended by admission (``evicted``) or by its deadline."""
    if evicted:
        return Refusal("handshake_evicted",
                       "every handshake place was taken: this one was the oldest silent one, "
                       "or its source prefix held the most (limits.max_handshakes)",
                       authenticated=False)
    return Refusal("handshake_timeout", f"no complete handshake within {handshake_timeout:g} s",
                   authenticated=False)


def failed(error: BaseException | None, tap: HandshakeTap, secret: bytes | None) -> Refusal:
    """OpenSSL failed the handshake: its reason, and the certificate the client presented
    (TLS 1.2: read in clear from the tap; TLS 1.3: decrypted with the key log's secret)."""
    reason, detail = handshake_failure_reason(error)
    der = tap.client_certificate()
    if der is None and secret is not None:
        der = tap.client_certificate_tls13(secret)
    return Refusal(reason, detail, presented_identity(der) if der is not None else None,
                   authenticated=False)


def verdict(
    *, der: bytes | None, resumed: bool, state: Callable[[], ProxyState], now: dt.datetime,
    slots: IdentitySlots, max_per_identity: int, tap: HandshakeTap | None = None,
    secret: bytes | None = None,
) -> Acceptance | Refusal:
    """The checks after a completed handshake, in order: a certificate, a readable identity
    (role extension included), no resumed session, not revoked by the CRLs as they are now,
    not expired, a free per-identity slot (claimed here when the client gets in).

    OpenSSL verifies nothing on a resumed handshake (not the chain's CAs, not the CRLs'
    freshness), so the session cache is off (``tls.disable_session_cache``) and a resumed
    handshake, possible only where that failed, is refused: every connection is a full one."""
    if not der:
        return Refusal("no_certificate", "the client sent no certificate", resumed=resumed,
                       authenticated=False)
    try:
        identity = parse_verified_identity(der)
    except IdentityError as exc:  # the plain fields, without the role, still name it
        return Refusal(exc.reason, exc.message, presented_identity(der), resumed)
    if resumed:
        return Refusal("session_resumed", "a resumed TLS session is not accepted: every "
                       "connection must make a full handshake", identity, resumed)
    current = state()  # read again: a reload (new CRL, new policy) may have come meanwhile
    if current.tls.is_revoked(identity.issuer, identity.serial):
        return Refusal("certificate_revoked", "serial is on the current CRL", identity, resumed)
    if identity.not_after < now:
        return Refusal("certificate_expired", "certificate expired", identity, resumed)
    if not slots.claim_identity(identity.subject):
        return Refusal("too_many_connections_for_identity",
                       f"more than {max_per_identity} connections for this identity",
                       identity, resumed)
    cas: tuple[tuple[str, int], ...] = ()
    if tap is not None and not current.tls.knows_ca(identity.issuer):
        chain = tap.client_chain() or (tap.client_chain_tls13(secret) if secret else [])
        cas = issuing_cas(chain)
    return Acceptance(identity, current, cas)
