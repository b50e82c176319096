"""Every SIEM event mbsec writes, built by one typed constructor each; the registry of them.

A constructor returns an :class:`Event` (level, message, flat ECS fields); :func:`emit` writes
it. The connection and PLC-link fields that many events share are bound on the logger once
(:func:`connection_context`, :func:`peer_context`, :func:`upstream_context`), not passed to
every constructor::

    log = log.bind(**events.upstream_context(t.name, t.host, t.port, index))
    events.emit(log, events.upstream_reset("bad_frame", exc.message, pending=3))

:data:`ACTIONS` is the registry: for each ``event.action`` the levels it is written at, the
context bound around it, every field its constructors write and every ``event.reason`` value
it can carry. docs/events.md documents exactly that and tests/test_events.py checks both ways
(every action, reason and field documented; nothing documented that is never written), so a
new field or reason starts here, in its constructor and its :func:`_register` entry.

Cheap on purpose: a constructor builds one dict, nothing is validated at run time (the tests
do that). ``modbus_request_allowed`` runs once per forwarded request when allowed requests are
logged. No I/O, no trio: the request-path core imports this module.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from mbsec.modbus.messages import FUNCTION_NAMES, ExceptionCode

if TYPE_CHECKING:
    import datetime as dt

    from mbsec.identity import PeerIdentity
    from mbsec.modbus.access import Access

Level = Literal["debug", "info", "warning", "error", "critical"]


class Event(NamedTuple):
    """One event, not yet written: ``fields`` are flat dotted ECS keys (``"event.action"``)."""

    level: Level
    message: str
    fields: dict[str, Any]

    @property
    def action(self) -> str:
        return str(self.fields["event.action"])


def emit(log: Any, event: Event) -> None:
    """Write ``event`` through a structlog logger (``log.warning(message, **fields)``)."""
    getattr(log, event.level)(event.message, **event.fields)


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """What one ``event.action`` can look like (docs/events.md documents each of these)."""

    action: str
    levels: frozenset[str]
    #: which :data:`CONTEXTS` entry is bound on the logger around it, or None
    context: str | None
    #: every field its constructors may write, besides :data:`COMMON_FIELDS`
    fields: frozenset[str]
    #: every ``event.reason`` value it can carry
    reasons: frozenset[str]
    #: True when a library may name further reasons (OpenSSL's, lower-cased)
    more_reasons: bool
    constructors: tuple[str, ...]


#: the registry: ``event.action`` -> :class:`Spec`, in the order docs/events.md lists them
ACTIONS: dict[str, Spec] = {}

#: fields on every event, added by mbsec.audit's processors (and ``event.action``)
COMMON_FIELDS = frozenset(
    ("@timestamp", "message", "log.level", "event.action", "ecs.version", "service.name")
)

#: the certificate facts an ``identities:`` entry of the policy can match besides the CN and
#: the fingerprint (docs/policy.md), bound by :func:`peer_context`; the SAN and OU lists only
#: when the certificate has any
PEER_MATCH_FIELDS = (
    "tls.client.x509.issuer.distinguished_name", "tls.client.x509.subject.organizational_unit",
    "mbsec.san_dns", "mbsec.san_ip", "mbsec.san_uri",
)

#: fields bound on the logger rather than passed to each event
CONTEXTS: dict[str, frozenset[str]] = {
    # bound per client connection at accept (and after the handshake: the peer's identity)
    "connection": frozenset((
        "mbsec.conn_id", "source.ip", "source.port", "destination.ip", "destination.port",
        "tls.client.x509.subject.common_name", "tls.client.hash.sha256", "user.name",
        "user.roles", "mbsec.role", *PEER_MATCH_FIELDS,
    )),
    # bound per PLC target (and connection slot)
    "upstream": frozenset(("mbsec.target", "destination.ip", "destination.port",
                           "mbsec.connection")),
    # bound per plain connection `mbsec connect` accepted (tunnel_context)
    "tunnel": frozenset(("mbsec.conn_id", "source.ip", "source.port", "server.address",
                         "server.port")),
}


def _register(
    action: str,
    *,
    levels: Iterable[str],
    context: str | None,
    fields: Iterable[str],
    reasons: Iterable[str] = (),
    more_reasons: bool = False,
    constructors: Iterable[str],
) -> None:
    if action in ACTIONS:  # pragma: no cover - a typo in this module
        raise ValueError(f"event action {action!r} registered twice")
    ACTIONS[action] = Spec(action, frozenset(levels), context, frozenset(fields),
                           frozenset(reasons), more_reasons, tuple(constructors))


_ENVELOPE = ("event.kind", "event.category", "event.type", "event.outcome")
_IDENTITY = (
    "tls.client.x509.subject.common_name",
    "tls.client.x509.subject.distinguished_name",
    "tls.client.x509.issuer.distinguished_name",
    "tls.client.x509.serial_number",
    "tls.client.x509.not_after",
    "tls.client.hash.sha256",
)


# -- context (bound on loggers) -----------------------------------------------------------------


def connection_context(
    conn_id: int, source_ip: str | None, source_port: int | None,
    local_ip: str | None, local_port: int | None,
) -> dict[str, Any]:
    """Bound once per client connection: repeated on every event of it."""
    return {
        "mbsec.conn_id": conn_id,
        "source.ip": source_ip,
        "source.port": source_port,
        "destination.ip": local_ip,
        "destination.port": local_port,
    }


def peer_context(identity: PeerIdentity, roles: Iterable[str]) -> dict[str, Any]:
    """Bound after a successful handshake: who the connection is, with every certificate
    fact an ``identities:`` entry of the policy matches (subject CN and OU, SANs, issuer,
    fingerprint), so that the events of a connection are enough to learn or replay one."""
    ctx: dict[str, Any] = {
        "tls.client.x509.subject.common_name": identity.common_name,
        "tls.client.hash.sha256": identity.fingerprint_sha256,
        "tls.client.x509.issuer.distinguished_name": identity.issuer,
        "user.name": identity.common_name,
        "user.roles": list(roles),
        # the certificate's own Modbus role: replaying against another policy resolves the
        # roles again from it (user.roles holds the recording policy's identities: mappings)
        "mbsec.role": identity.role,
    }
    if identity.organizational_units:
        ctx["tls.client.x509.subject.organizational_unit"] = list(identity.organizational_units)
    if identity.san_dns:
        ctx["mbsec.san_dns"] = list(identity.san_dns)
    if identity.san_ip:
        ctx["mbsec.san_ip"] = list(identity.san_ip)
    if identity.san_uri:
        ctx["mbsec.san_uri"] = list(identity.san_uri)
    return ctx


def roles_context(roles: Iterable[str]) -> dict[str, Any]:
    """Bound again when a reload changed the roles the policy resolves."""
    return {"user.roles": list(roles)}


def upstream_context(
    target: str, host: str, port: int, connection: int | None = None
) -> dict[str, Any]:
    """Bound per PLC target; ``connection``: which connection of its pool (0-based)."""
    ctx: dict[str, Any] = {"mbsec.target": target, "destination.ip": host,
                           "destination.port": port}
    if connection is not None:
        ctx["mbsec.connection"] = connection
    return ctx


def identity_fields(identity: PeerIdentity) -> dict[str, Any]:
    """The verified client certificate, ECS ``tls.client.*``."""
    return {
        "tls.client.x509.subject.common_name": identity.common_name,
        "tls.client.x509.subject.distinguished_name": identity.subject,
        "tls.client.x509.issuer.distinguished_name": identity.issuer,
        "tls.client.x509.serial_number": format(identity.serial, "X"),
        "tls.client.x509.not_after": identity.not_after.isoformat(),
        "tls.client.hash.sha256": identity.fingerprint_sha256,
    }


# -- tls-handshake --------------------------------------------------------------------------------

#: reasons named by mbsec (tls.handshake_failure_reason, identity.parse_identity, the session)
TLS_REJECT_REASONS = (
    "no_certificate", "unknown_ca", "certificate_expired", "certificate_not_yet_valid",
    "certificate_revoked", "crl_unavailable", "crl_expired", "crl_not_yet_valid",
    "unhandled_critical_extension", "bad_signature", "invalid_ca", "invalid_purpose",
    "self_signed_certificate", "certificate_verify_failed", "unsupported_protocol_version",
    "no_shared_cipher", "not_tls", "handshake_timeout", "client_closed",
    "renegotiation_refused", "role_not_utf8string", "role_malformed", "role_empty",
    "role_invalid_utf8", "role_duplicated", "certificate_malformed",
    "too_many_connections_for_identity", "session_resumed", "client_rejected_server_ca",
    "client_rejected_server_certificate", "tls_error", "handshake_evicted",
)

#: rejections that are security incidents, not mistakes: a revoked certificate is one its owner
#: lost or that was stolen. Their events are ``event.kind`` ``alert`` at ``error`` (SIEM rules
#: and CEF severity pick them out) and ``mbsec_revoked_certificate_seen_total`` counts them.
INCIDENT_REASONS = frozenset(("certificate_revoked",))

_register(
    "tls-handshake",
    levels=("info", "warning", "error"),
    context="connection",
    fields=(*_ENVELOPE, "event.reason", "event.duration", "error.message", "tls.version",
            "tls.version_protocol", "tls.cipher", "tls.resumed", *_IDENTITY, "mbsec.role"),
    reasons=TLS_REJECT_REASONS,
    more_reasons=True,  # any other OpenSSL reason, lower-cased
    constructors=("tls_handshake_accepted", "tls_handshake_rejected"),
)


def tls_handshake_accepted(
    duration_s: float, identity: PeerIdentity, version: str | None, cipher: str | None,
    resumed: bool,
) -> Event:
    """``version`` and ``cipher`` as ``ssl`` reports them (``"TLSv1.3"``, cipher name)."""
    return Event("info", "TLS client accepted", {
        "event.kind": "event",
        "event.category": ["network", "authentication"],
        "event.type": ["connection", "start", "allowed"],
        "event.action": "tls-handshake",
        "event.outcome": "success",
        "event.duration": int(duration_s * 1e9),
        "tls.version": (version or "").removeprefix("TLSv"),
        "tls.version_protocol": "tls",
        "tls.cipher": cipher,
        "tls.resumed": resumed,
        **identity_fields(identity),
        "mbsec.role": identity.role,
    })


def tls_handshake_rejected(
    reason: str, detail: str, duration_s: float, identity: PeerIdentity | None = None,
    resumed: bool | None = None,
) -> Event:
    """``identity``: the certificate the client presented, when known: a verified one refused
    after the handshake, or (TLS 1.2) the one OpenSSL rejected, read from the handshake bytes
    (presented, not verified: mbsec/tls_sniff.py)."""
    incident = reason in INCIDENT_REASONS
    fields: dict[str, Any] = {
        "event.kind": "alert" if incident else "event",
        "event.category": (["network", "authentication", "intrusion_detection"] if incident
                           else ["network", "authentication"]),
        "event.type": ["connection", "denied"],
        "event.action": "tls-handshake",
        "event.outcome": "failure",
        "event.reason": reason,
        "event.duration": int(duration_s * 1e9),
        "error.message": detail,
    }
    if identity is not None:
        fields.update(identity_fields(identity))
    if resumed is not None:
        fields["tls.resumed"] = resumed
    return Event("error" if incident else "warning", "TLS client rejected", fields)


# -- modbus-request -------------------------------------------------------------------------------

#: policy (mbsec.policy.engine), rate limiter (mbsec.policy.ratelimit), invalid requests
#: (mbsec.modbus parse_request), the request path (upstream errors) and the proxy itself
MODBUS_REQUEST_REASONS = (
    "denied_by_rule", "no_matching_rule",
    "too_many_in_flight", "request_rate_exceeded", "write_rate_exceeded",
    "illegal_function", "bad_pdu_length", "bad_quantity", "bad_byte_count", "bad_value",
    "bad_address", "bad_file_reference",
    "no_route", "connect_failed", "backoff", "penalized",
    "timeout", "upstream_reset", "connection_lost", "tid_exhausted", "client_gone",
    "response_too_large", "audit_unavailable", "closed_before_reply",
    "writes_frozen", "link_flapping",
)

_register(
    "modbus-request",
    levels=("debug", "info", "warning"),
    context="connection",
    fields=(*_ENVELOPE, "event.reason", "event.duration", "rule.id", "modbus.decision",
            "modbus.transaction_id", "modbus.unit_id", "modbus.function_code", "modbus.function",
            "modbus.subfunction", "modbus.address", "modbus.quantity", "modbus.read.address",
            "modbus.read.quantity", "modbus.write.address", "modbus.write.quantity",
            "modbus.values", "mbsec.values_total", "mbsec.request_bytes",
            "modbus.exception_code", "mbsec.target", "mbsec.response_bytes",
            "mbsec.max_response_bytes", "error.message", "mbsec.plc_outcome"),
    reasons=MODBUS_REQUEST_REASONS,
    constructors=("modbus_request_allowed", "modbus_request_would_deny", "modbus_request_denied",
                  "modbus_request_invalid", "modbus_request_failed",
                  "modbus_request_response_too_large", "modbus_request_audit_unavailable",
                  "modbus_request_unanswered"),
)

RESPONSE_TOO_LARGE_EXCEPTION = int(ExceptionCode.SERVER_DEVICE_FAILURE)  # 04
AUDIT_UNAVAILABLE_EXCEPTION = int(ExceptionCode.SERVER_DEVICE_FAILURE)  # 04

#: written values logged per request; a longer write logs the first ones and
#: ``mbsec.values_total`` (FC16 writes up to 123 registers, FC15 up to 1968 coils)
MAX_LOGGED_VALUES = 16


def _request(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float
) -> dict[str, Any]:
    """The fields every request event shares: what the policy decides on (``access``), so a
    policy can be learned from the events and replayed against them."""
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["network"],
        "event.action": "modbus-request",
        "event.duration": int(duration_s * 1e9),
        "modbus.transaction_id": tid,
        "modbus.unit_id": unit_id,
        "modbus.function_code": fc,
        "modbus.function": FUNCTION_NAMES.get(fc) or f"function_{fc}",
    }
    if access is not None:
        read = access.read
        write = access.write
        span = write or read
        if span is not None:
            fields["modbus.address"] = span[0]
            fields["modbus.quantity"] = access.quantity
            if read is not None and write is not None:  # FC23: both ranges, each on its own
                fields["modbus.read.address"] = read[0]
                fields["modbus.read.quantity"] = read[1]
                fields["modbus.write.address"] = write[0]
                fields["modbus.write.quantity"] = write[1]
        if access.subfunction is not None:
            fields["modbus.subfunction"] = access.subfunction
        values = access.values
        if values:
            if len(values) > MAX_LOGGED_VALUES:
                fields["modbus.values"] = list(values[:MAX_LOGGED_VALUES])
                fields["mbsec.values_total"] = len(values)
            else:
                fields["modbus.values"] = list(values)
        fields["mbsec.request_bytes"] = access.pdu_length
    return fields


def modbus_request_allowed(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
    decision: str, target: str, exception_code: int | None = None, level: Level = "debug",
) -> Event:
    """Forwarded and answered by the PLC (hot path). ``decision``: the policy's outcome
    (``allow``, or ``would_deny`` in monitor mode); ``exception_code``: the PLC answered with
    an exception; ``level``: ``logging.allowed_requests``."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "allowed"]
    fields["event.outcome"] = "success"
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = decision
    fields["mbsec.target"] = target
    if exception_code is not None:
        fields["modbus.exception_code"] = exception_code
    return Event(level, "request forwarded", fields)


def modbus_request_would_deny(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
    reason: str,
) -> Event:
    """Monitor mode: the policy would deny it; it is forwarded (its outcome is logged too)."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "info"]
    fields["event.outcome"] = "success"
    fields["event.reason"] = reason
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = "would_deny"
    return Event("warning", "request would be denied (monitor mode), forwarded", fields)


def modbus_request_denied(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
    reason: str, exception_code: int, decision: Literal["deny", "rate_limited", "frozen"] = "deny",
) -> Event:
    """Refused by the policy (``deny``, ``reason`` the policy's), the rate limiter
    (``rate_limited``, ``reason`` the limiter's) or a write freeze (``frozen``)."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "denied"]
    fields["event.outcome"] = "failure"
    fields["event.reason"] = reason
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = decision
    fields["modbus.exception_code"] = exception_code
    return Event("warning", "request denied", fields)


def modbus_request_invalid(
    tid: int, unit_id: int, fc: int, duration_s: float, reason: str, exception_code: int,
    detail: str,
) -> Event:
    """A well-framed request the Modbus spec rejects (answered with ``exception_code``)."""
    fields = _request(tid, unit_id, fc, None, duration_s)
    fields["event.type"] = ["protocol", "denied"]
    fields["event.outcome"] = "failure"
    fields["event.reason"] = reason
    fields["modbus.decision"] = "invalid"
    fields["modbus.exception_code"] = exception_code
    fields["error.message"] = detail
    return Event("warning", "invalid Modbus request", fields)


def modbus_request_failed(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
    reason: str, exception_code: int, detail: str,
) -> Event:
    """Allowed, but the PLC side failed (``UpstreamError``: its reason, exception, message)."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "error"]
    fields["event.outcome"] = "failure"
    fields["event.reason"] = reason
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = "allow"
    fields["modbus.exception_code"] = exception_code
    fields["error.message"] = detail
    message = ("PLC did not answer" if reason != "client_gone"
               else "client went away before its request was sent; withdrawn")
    return Event("warning", message, fields)


def modbus_request_response_too_large(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
    response_bytes: int, max_response_bytes: int,
) -> Event:
    """The PLC's reply PDU exceeds the rule's ``max_response_bytes``: withheld, 04 sent."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "denied"]
    fields["event.outcome"] = "failure"
    fields["event.reason"] = "response_too_large"
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = "allow"
    fields["modbus.exception_code"] = RESPONSE_TOO_LARGE_EXCEPTION
    fields["mbsec.response_bytes"] = response_bytes
    fields["mbsec.max_response_bytes"] = max_response_bytes
    return Event("warning", "PLC reply exceeds the policy's max_response_bytes, withheld", fields)


def modbus_request_audit_unavailable(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
) -> Event:
    """Allowed by the policy but refused with 04: no log sink takes events and
    ``logging.on_sink_failure`` refuses this request (``rule_id``: the rule that allowed it)."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "denied"]
    fields["event.outcome"] = "failure"
    fields["event.reason"] = "audit_unavailable"
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = "audit_unavailable"
    fields["modbus.exception_code"] = AUDIT_UNAVAILABLE_EXCEPTION
    return Event("warning", "request denied", fields)


def modbus_request_unanswered(
    tid: int, unit_id: int, fc: int, access: Access | None, duration_s: float, rule_id: str,
    close_reason: str, plc_outcome: str,
) -> Event:
    """Forwarded, but its connection closed before the reply could be sent (the drain
    deadline, the client reset...): the client got nothing. ``close_reason``: the connection's;
    ``plc_outcome``: what the PLC side gave (``reply``, or the failure's reason)."""
    fields = _request(tid, unit_id, fc, access, duration_s)
    fields["event.type"] = ["protocol", "error"]
    fields["event.outcome"] = "failure"
    fields["event.reason"] = "closed_before_reply"
    fields["rule.id"] = rule_id
    fields["modbus.decision"] = "allow"
    fields["mbsec.plc_outcome"] = plc_outcome
    fields["error.message"] = (f"the connection closed ({close_reason}) before the reply was "
                               "sent: the client got no reply")
    return Event("warning", "request got no reply: its connection closed", fields)


# -- modbus-framing-error -------------------------------------------------------------------------

FRAMING_REASONS = ("bad_protocol_id", "bad_length", "buffer_overflow", "empty_pdu",
                   "request_incomplete")

_register(
    "modbus-framing-error",
    levels=("warning",),
    context="connection",
    fields=(*_ENVELOPE, "event.reason", "error.message"),
    reasons=FRAMING_REASONS,
    constructors=("modbus_framing_error",),
)


def modbus_framing_error(reason: str, detail: str) -> Event:
    return Event("warning", "malformed Modbus frame, closing the connection", {
        "event.kind": "event",
        "event.category": ["network", "intrusion_detection"],
        "event.type": ["connection", "denied"],
        "event.action": "modbus-framing-error",
        "event.outcome": "failure",
        "event.reason": reason,
        "error.message": detail,
    })


# -- connection-closed --------------------------------------------------------------------------

CLOSE_REASONS = (
    "client_closed", "client_reset", "client_gone", "client_stalled", "idle_timeout",
    "server_shutdown", "certificate_revoked", "internal_error", "unknown",
    "dropped_by_operator", "renegotiation_refused",
    *FRAMING_REASONS,
)

_register(
    "connection-closed",
    levels=("info",),
    context="connection",
    fields=(*_ENVELOPE, "event.reason", "event.duration", "source.bytes", "destination.bytes",
            "mbsec.requests", "mbsec.allowed", "mbsec.denied", "mbsec.errors"),
    reasons=CLOSE_REASONS,
    constructors=("connection_closed",),
)


def connection_closed(
    reason: str, duration_s: float, bytes_in: int, bytes_out: int, requests: int,
    allowed: int, denied: int, errors: int,
) -> Event:
    """The canonical line: one per connection that completed its handshake."""
    return Event("info", "connection closed", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "end"],
        "event.action": "connection-closed",
        "event.outcome": "success",
        "event.reason": reason,
        "event.duration": int(duration_s * 1e9),
        "source.bytes": bytes_in,
        "destination.bytes": bytes_out,
        "mbsec.requests": requests,
        "mbsec.allowed": allowed,
        "mbsec.denied": denied,
        "mbsec.errors": errors,
    })


# -- connection-rejected, connection-revoked --------------------------------------------------

_register(
    "connection-rejected",
    levels=("warning",),
    context=None,
    fields=(*_ENVELOPE, "event.reason", "source.ip", "source.port"),
    reasons=("too_many_connections", "too_many_connections_from_source",
             "too_many_handshakes", "connection_rate_exceeded"),
    constructors=("connection_rejected",),
)


def connection_rejected(reason: str, source_ip: str, source_port: int) -> Event:
    """A TCP connection refused by the limits, before TLS."""
    return Event("warning", "connection refused by limits", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "denied"],
        "event.action": "connection-rejected",
        "event.outcome": "failure",
        "event.reason": reason,
        "source.ip": source_ip,
        "source.port": source_port,
    })


_register(
    "rejections-suppressed",
    levels=("warning",),
    context=None,
    fields=(*_ENVELOPE, "event.reason", "event.start", "event.end", "mbsec.source_prefix",
            "mbsec.rejected_action", "mbsec.suppressed", "mbsec.source_prefixes"),
    reasons=("too_many_connections", "too_many_connections_from_source",
             "too_many_handshakes", "connection_rate_exceeded", *TLS_REJECT_REASONS,
             "budget_exceeded"),
    more_reasons=True,  # any tls-handshake reason OpenSSL names
    constructors=("rejections_suppressed",),
)


def rejections_suppressed(
    prefix: str | None, action: str | None, reason: str, count: int, start: dt.datetime,
    end: dt.datetime, prefixes: int = 1,
) -> Event:
    """``count`` rejections of peers without a certificate that were not written (see
    mbsec/admission.py's RejectionLog): of ``action`` with ``reason`` from ``prefix``, or,
    for the global summary (``prefix`` None, ``reason`` ``budget_exceeded``), every one the
    event budget refused, from ``prefixes`` distinct prefixes."""
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "denied"],
        "event.action": "rejections-suppressed",
        "event.outcome": "failure",
        "event.reason": reason,
        "event.start": start.isoformat(),
        "event.end": end.isoformat(),
        "mbsec.suppressed": count,
    }
    if prefix is not None:
        fields["mbsec.source_prefix"] = prefix
    if action is not None:
        fields["mbsec.rejected_action"] = action
    if prefix is None:
        fields["mbsec.source_prefixes"] = prefixes
    what = f"{count} rejections of {reason} from {prefix}" if prefix else (
        f"{count} rejections from {prefixes} prefixes over the event budget")
    return Event("warning", f"{what} not logged", fields)


_register(
    "connection-revoked",
    levels=("error",),
    context=None,
    fields=(*_ENVELOPE, "event.reason", "mbsec.conn_id", "tls.client.x509.subject.common_name",
            "tls.client.hash.sha256", "source.ip"),
    reasons=("certificate_revoked",),
    constructors=("connection_revoked",),
)


def connection_revoked(conn_id: int, identity: PeerIdentity, source_ip: str | None) -> Event:
    """A reloaded CRL revokes the certificate (or a CA above it) of an open connection."""
    return Event("error", "certificate revoked by the reloaded CRL, closing its connection", {
        "event.kind": "alert",
        "event.category": ["network", "authentication", "intrusion_detection"],
        "event.type": ["connection", "end", "denied"],
        "event.action": "connection-revoked",
        "event.outcome": "success",
        "event.reason": "certificate_revoked",
        "mbsec.conn_id": conn_id,
        "tls.client.x509.subject.common_name": identity.common_name,
        "tls.client.hash.sha256": identity.fingerprint_sha256,
        "source.ip": source_ip,
    })


# -- server life cycle ----------------------------------------------------------------------------

_register(
    "server-start",
    levels=("info",),
    context=None,
    fields=(*_ENVELOPE, "mbsec.listen", "mbsec.metrics_port", "mbsec.upstreams",
            "mbsec.data_plane", "mbsec.data_plane_compiled", "mbsec.tls13_rejection_certificate",
            "mbsec.handshake_nice"),
    constructors=("server_start",),
)


def server_start(
    listen: Sequence[str], metrics_port: int | None, upstreams: Iterable[str], data_plane: str,
    data_plane_compiled: bool, tls13_rejection_certificate: str = "off",
    handshake_nice: int = 0,
) -> Event:
    return Event("info", "mbsec listening", {
        "event.kind": "event",
        "event.category": ["process"],
        "event.type": ["start"],
        "event.action": "server-start",
        "event.outcome": "success",
        "mbsec.listen": list(listen),
        "mbsec.metrics_port": metrics_port,
        "mbsec.upstreams": sorted(upstreams),
        "mbsec.data_plane": data_plane,
        "mbsec.data_plane_compiled": data_plane_compiled,
        "mbsec.tls13_rejection_certificate": tls13_rejection_certificate,
        "mbsec.handshake_nice": handshake_nice,
    })


_register(
    "server-stop",
    levels=("info",),
    context=None,
    fields=(*_ENVELOPE, "mbsec.sessions", "mbsec.drain_timeout"),
    constructors=("server_stop",),
)


def server_stop(sessions: int, drain_timeout: float) -> Event:
    """SIGTERM: draining starts."""
    return Event("info", "draining", {
        "event.kind": "event",
        "event.category": ["process"],
        "event.type": ["end"],
        "event.action": "server-stop",
        "event.outcome": "success",
        "mbsec.sessions": sessions,
        "mbsec.drain_timeout": drain_timeout,
    })


SERVER_STOPPED_REASONS = ("shutdown_requested", "data_plane_failed", "internal_error",
                          "cancelled")

_register(
    "server-stopped",
    levels=("info", "error"),
    context=None,
    fields=(*_ENVELOPE, "event.reason", "event.duration", "process.exit_code",
            "mbsec.connections_cut"),
    reasons=SERVER_STOPPED_REASONS,
    constructors=("server_stopped",),
)


def server_stopped(
    reason: str, connections_cut: int, drain_s: float, exit_code: int | None
) -> Event:
    """The last event: the proxy has stopped serving (after the drain; the data plane has
    stopped). ``connections_cut``: connections still open when ``drain_timeout`` ran out,
    closed with their in-flight requests unanswered; ``drain_s``: how long the drain took;
    ``exit_code``: the status ``mbsec serve`` exits with (None when the proxy was embedded
    and cancelled by its caller)."""
    clean = reason == "shutdown_requested"
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["process"],
        "event.type": ["end"],
        "event.action": "server-stopped",
        "event.outcome": "success" if clean or reason == "cancelled" else "failure",
        "event.reason": reason,
        "event.duration": int(drain_s * 1e9),
        "mbsec.connections_cut": connections_cut,
    }
    if exit_code is not None:
        fields["process.exit_code"] = exit_code
    return Event("info" if clean or reason == "cancelled" else "error", "mbsec stopped", fields)


_register(
    "config-reload",
    levels=("info", "error"),
    context=None,
    fields=(*_ENVELOPE, "mbsec.generation", "mbsec.restart_needed_for", "error.message"),
    constructors=("config_reloaded", "config_reload_failed"),
)


def config_reloaded(generation: int, restart_needed_for: Sequence[str]) -> Event:
    return Event("info", "configuration reloaded", {
        "event.kind": "event",
        "event.category": ["configuration"],
        "event.type": ["change"],
        "event.action": "config-reload",
        "event.outcome": "success",
        "mbsec.generation": generation,
        "mbsec.restart_needed_for": list(restart_needed_for),
    })


def config_reload_failed(problems: Iterable[str]) -> Event:
    """The old state keeps running; every problem, ``; ``-separated."""
    return Event("error", "reload failed, keeping the running configuration", {
        "event.kind": "event",
        "event.category": ["configuration"],
        "event.type": ["change"],
        "event.action": "config-reload",
        "event.outcome": "failure",
        "error.message": "; ".join(problems),
    })


_register(
    "crl-expiry",
    levels=("error",),
    context=None,
    fields=(*_ENVELOPE, "error.message"),
    constructors=("crl_expiry",),
)


def crl_expiry(detail: str) -> Event:
    """A CRL expired or within ``tls.crl_warn_days`` of nextUpdate (``detail`` names it)."""
    return Event("error", "CRL expiring or expired", {
        "event.kind": "alert",
        "event.category": ["configuration"],
        "event.type": ["info"],
        "event.action": "crl-expiry",
        "event.outcome": "failure",
        "error.message": detail,
    })


_register(
    "accept-failed",
    levels=("error",),
    context=None,
    fields=(*_ENVELOPE, "error.message"),
    constructors=("accept_failed",),
)


def accept_failed(exc: BaseException) -> Event:
    """``accept()`` failed for lack of resources (EMFILE, ENOBUFS, ...): backing off."""
    return Event("error", "accept failed, backing off", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["error"],
        "event.action": "accept-failed",
        "event.outcome": "failure",
        "error.message": str(exc),
    })


# -- internal errors ------------------------------------------------------------------------------

_register(
    "session-error",
    levels=("error",),
    context="connection",
    fields=(*_ENVELOPE, "error.type", "error.message", "source.ip"),
    constructors=("session_error",),
)


def session_error(exc: BaseException, source_ip: str) -> Event:
    """A bug in one connection (logged; the proxy keeps serving)."""
    return Event("error", "session failed unexpectedly", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["error"],
        "event.action": "session-error",
        "event.outcome": "failure",
        "error.type": type(exc).__name__,
        "error.message": str(exc),
        "source.ip": source_ip,
    })


_register(
    "data-plane-error",
    levels=("error", "critical"),
    context=None,
    fields=(*_ENVELOPE, "error.type", "error.message"),
    constructors=("data_plane_error",),
)


def data_plane_error(exc: BaseException, fatal: bool = False) -> Event:
    """A bug while handling one socket event or timer (``error``), or the loop itself died
    (``fatal``: ``critical``, the proxy drains and exits 1)."""
    return Event("critical" if fatal else "error",
                 "data plane stopped" if fatal else "data plane error", {
                     "event.kind": "event",
                     "event.category": ["process"],
                     "event.type": ["error"],
                     "event.action": "data-plane-error",
                     "event.outcome": "failure",
                     "error.type": type(exc).__name__,
                     "error.message": str(exc),
                 })


_register(
    "log-sink-failed",
    levels=("critical",),
    context=None,
    fields=(*_ENVELOPE, "mbsec.sink", "error.type", "error.message"),
    constructors=("log_sink_failed",),
)


def log_sink_failed(sink: str, exc: BaseException) -> Event:
    """A log sink raised (disk full, syslog gone); ``sink``: which one (its class name).
    Written to stderr with :func:`fallback_line` and to the sinks that still work, never
    through the failing one."""
    return Event("critical", "log sink failed", {
        "event.kind": "alert",
        "event.category": ["process"],
        "event.type": ["error"],
        "event.action": "log-sink-failed",
        "event.outcome": "failure",
        "mbsec.sink": sink,
        "error.type": type(exc).__name__,
        "error.message": str(exc),
    })


_register(
    "log-sink-dropped",
    levels=("warning",),
    context=None,
    fields=(*_ENVELOPE, "mbsec.sink", "mbsec.dropped", "mbsec.dropped_first",
            "mbsec.dropped_last"),
    constructors=("log_sink_dropped",),
)


def log_sink_dropped(sink: str, count: int, first: str | None, last: str | None) -> Event:
    """A remote sink's spool was full: ``count`` events (timestamps ``first`` to ``last``)
    were not sent to it. Sent to that sink, in the place of the lost events, once it has room
    again (mbsec/sink_remote.py); the other sinks got the events themselves."""
    fields: dict[str, Any] = {
        "event.kind": "alert",
        "event.category": ["process"],
        "event.type": ["info"],
        "event.action": "log-sink-dropped",
        "event.outcome": "failure",
        "mbsec.sink": sink,
        "mbsec.dropped": count,
    }
    if first is not None:
        fields["mbsec.dropped_first"] = first
    if last is not None:
        fields["mbsec.dropped_last"] = last
    return Event("warning", "log sink dropped events", fields)


# -- upstream (PLC side) --------------------------------------------------------------------------
# Written with the PLC target's logger: its name and address (and the connection slot, except
# for client-penalized) are bound there (upstream_context).

_register(
    "upstream-connect",
    levels=("info",),
    context="upstream",
    fields=_ENVELOPE,
    constructors=("upstream_connect",),
)


def upstream_connect() -> Event:
    return Event("info", "upstream-connect", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "start"],
        "event.action": "upstream-connect",
        "event.outcome": "success",
    })


_register(
    "upstream-connect-failed",
    levels=("warning",),
    context="upstream",
    fields=(*_ENVELOPE, "event.reason", "error.message", "mbsec.backoff"),
    reasons=("connect_failed", "connect_timeout"),
    constructors=("upstream_connect_failed",),
)


def upstream_connect_failed(reason: str, detail: str, backoff_s: float) -> Event:
    """``backoff_s``: seconds before this connection slot tries again."""
    return Event("warning", "upstream-connect-failed", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "error"],
        "event.action": "upstream-connect-failed",
        "event.outcome": "failure",
        "event.reason": reason,
        "error.message": detail,
        "mbsec.backoff": backoff_s,
    })


UPSTREAM_RESET_REASONS = (
    "unknown_tid", "wrong_unit", "bad_reply", "bad_frame", "connection_lost", "eof",
    "send_failed", "send_timeout", "late_reply_overdue", "internal_error",
)

_register(
    "upstream-reset",
    levels=("info", "warning"),
    context="upstream",
    fields=(*_ENVELOPE, "event.reason", "error.message", "mbsec.pending", "mbsec.blamed"),
    reasons=UPSTREAM_RESET_REASONS,
    constructors=("upstream_reset",),
)


def upstream_reset(reason: str, detail: str, pending: int, blamed: str | None = None) -> Event:
    """``pending``: requests failed by it (0x0B); ``blamed``: the blame key of the client
    charged with it. An idle PLC closing (``eof``, nothing pending) is ``info``. Never for
    ``shutdown`` (the pool stopping)."""
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "end"],
        "event.action": "upstream-reset",
        "event.outcome": "failure",
        "event.reason": reason,
        "error.message": detail,
        "mbsec.pending": pending,
    }
    if blamed is not None:
        fields["mbsec.blamed"] = blamed
    return Event("info" if reason == "eof" and not pending else "warning", "upstream-reset",
                 fields)


_register(
    "upstream-late-reply",
    levels=("info",),
    context="upstream",
    fields=(*_ENVELOPE, "modbus.transaction_id", "error.message"),
    constructors=("upstream_late_reply",),
)


def upstream_late_reply(tid: int) -> Event:
    """A reply after its request's deadline: dropped. ``tid``: the proxy's, on the PLC link."""
    return Event("info", "upstream-late-reply", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["info"],
        "event.action": "upstream-late-reply",
        "event.outcome": "unknown",
        "modbus.transaction_id": tid,
        "error.message": "reply after its request timed out; dropped",
    })


_register(
    "client-penalized",
    levels=("warning",),
    context="upstream",
    fields=(*_ENVELOPE, "event.reason", "mbsec.blamed", "mbsec.resets", "mbsec.hold"),
    reasons=("breaks_plc_link",),
    constructors=("client_penalized",),
)


def client_penalized(blamed: str, resets: int, hold_s: float) -> Event:
    """A client whose requests keep breaking this target's links is refused (0x0A) for
    ``hold_s`` seconds. ``blamed``: its blame key; ``resets``: resets charged to it."""
    return Event("warning", "client refused by this PLC: its requests keep breaking the "
                 "connection", {
                     "event.kind": "event",
                     "event.category": ["network", "intrusion_detection"],
                     "event.type": ["denied"],
                     "event.action": "client-penalized",
                     "event.outcome": "success",
                     "event.reason": "breaks_plc_link",
                     "mbsec.blamed": blamed,
                     "mbsec.resets": resets,
                     "mbsec.hold": hold_s,
                 })


# -- mbsec connect (the client side) --------------------------------------------------------------
# Written by `mbsec connect` on a master's host: plain Modbus/TCP in, Modbus/TCP Security out.
# The "tunnel" context (tunnel_context) is bound per accepted plain connection.

CONNECT_UPSTREAM_REASONS = (
    "connect_failed", "connect_timeout", "handshake_timeout", "server_closed",
    "server_name_mismatch", "server_fingerprint_mismatch", "server_unknown_ca",
    "server_certificate_expired", "server_certificate_not_yet_valid",
    "server_certificate_wrong_purpose", "server_certificate_invalid",
    "client_certificate_rejected", "unsupported_protocol_version", "tls_error",
)
CONNECT_CLOSE_REASONS = (
    "client_closed", "client_reset", "server_closed", "server_reset",
    "client_certificate_rejected", "server_unreachable", "server_refused",
    "too_many_connections", "shutdown", "internal_error",
)

_register(
    "connect-start",
    levels=("info",),
    context=None,
    fields=(*_ENVELOPE, "mbsec.listen", "server.address", "server.port", "mbsec.server_name",
            "mbsec.server_sha256", "tls.client.x509.subject.common_name",
            "tls.client.hash.sha256", "mbsec.metrics_port"),
    constructors=("connect_start",),
)


def tunnel_context(conn_id: int, source_ip: str | None, source_port: int | None,
                   server: str, server_port: int) -> dict[str, Any]:
    """Bound once per plain connection ``mbsec connect`` accepted: the master and the DMZ
    mbsec it is carried to."""
    return {"mbsec.conn_id": conn_id, "source.ip": source_ip, "source.port": source_port,
            "server.address": server, "server.port": server_port}


def connect_start(
    listen: Sequence[str], server: str, server_port: int, server_name: str | None,
    server_sha256: str | None, client_cn: str | None, client_sha256: str,
    metrics_port: int | None,
) -> Event:
    """``mbsec connect`` listens; how it verifies the server (name and/or pinned
    fingerprint) and the certificate it presents."""
    return Event("info", "mbsec connect listening", {
        "event.kind": "event",
        "event.category": ["process"],
        "event.type": ["start"],
        "event.action": "connect-start",
        "event.outcome": "success",
        "mbsec.listen": list(listen),
        "server.address": server,
        "server.port": server_port,
        "mbsec.server_name": server_name,
        "mbsec.server_sha256": server_sha256,
        "tls.client.x509.subject.common_name": client_cn,
        "tls.client.hash.sha256": client_sha256,
        "mbsec.metrics_port": metrics_port,
    })


_register(
    "connect-upstream",
    levels=("info", "warning"),
    context="tunnel",
    fields=(*_ENVELOPE, "event.reason", "event.duration", "error.message", "mbsec.attempt",
            "mbsec.backoff", "mbsec.retry", "tls.version", "tls.version_protocol", "tls.cipher",
            "tls.server.x509.subject.common_name", "tls.server.hash.sha256"),
    reasons=CONNECT_UPSTREAM_REASONS,
    constructors=("connect_upstream_ok", "connect_upstream_failed"),
)


def connect_upstream_ok(duration_s: float, attempt: int, version: str, cipher: str,
                        server_cn: str | None, server_sha256: str) -> Event:
    """The TLS connection to the DMZ mbsec is up and its certificate verified."""
    return Event("info", "connected to the server", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "start"],
        "event.action": "connect-upstream",
        "event.outcome": "success",
        "event.duration": int(duration_s * 1e9),
        "mbsec.attempt": attempt,
        "tls.version": version.removeprefix("TLSv"),
        "tls.version_protocol": "tls",
        "tls.cipher": cipher,
        "tls.server.x509.subject.common_name": server_cn,
        "tls.server.hash.sha256": server_sha256,
    })


def connect_upstream_failed(reason: str, detail: str, attempt: int, backoff_s: float,
                            retry: bool) -> Event:
    """An attempt failed. ``backoff_s``: seconds before the next attempt of any connection;
    ``retry``: whether this plain connection tries again (never after the server's
    certificate failed verification: that is refused at once)."""
    return Event("warning", "cannot connect to the server", {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "error"],
        "event.action": "connect-upstream",
        "event.outcome": "failure",
        "event.reason": reason,
        "error.message": detail,
        "mbsec.attempt": attempt,
        "mbsec.backoff": backoff_s,
        "mbsec.retry": retry,
    })


_register(
    "connect-closed",
    levels=("info", "warning"),
    context="tunnel",
    fields=(*_ENVELOPE, "event.reason", "event.duration", "error.message", "source.bytes",
            "destination.bytes"),
    reasons=CONNECT_CLOSE_REASONS,
    constructors=("connect_closed",),
)


def connect_closed(reason: str, duration_s: float, bytes_in: int, bytes_out: int,
                   detail: str | None = None) -> Event:
    """The canonical line: one per plain connection accepted. ``bytes_in``: from the master
    (to the server); ``bytes_out``: to the master. ``warning`` unless a side closed."""
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["network"],
        "event.type": ["connection", "end"],
        "event.action": "connect-closed",
        "event.outcome": "success" if reason in ("client_closed", "server_closed", "shutdown")
        else "failure",
        "event.reason": reason,
        "event.duration": int(duration_s * 1e9),
        "source.bytes": bytes_in,
        "destination.bytes": bytes_out,
    }
    if detail:
        fields["error.message"] = detail
    level: Level = "info" if fields["event.outcome"] == "success" else "warning"
    return Event(level, "connection closed", fields)


_register(
    "connect-stopped",
    levels=("info",),
    context=None,
    fields=(*_ENVELOPE, "mbsec.connections_cut"),
    constructors=("connect_stopped",),
)


def connect_stopped(connections_cut: int) -> Event:
    """SIGTERM/SIGINT: ``mbsec connect`` stopped; ``connections_cut``: tunnels it closed."""
    return Event("info", "mbsec connect stopped", {
        "event.kind": "event",
        "event.category": ["process"],
        "event.type": ["end"],
        "event.action": "connect-stopped",
        "event.outcome": "success",
        "mbsec.connections_cut": connections_cut,
    })


# -- operator control (mbsec.admin, mbsec.freeze) ------------------------------------------------

FREEZE_REASONS = ("operator", "link_flapping", "link_stable")

_register(
    "writes-freeze",
    levels=("warning",),
    context=None,
    fields=(*_ENVELOPE, "event.reason", "mbsec.target", "mbsec.frozen", "mbsec.freeze_kind",
            "mbsec.drops", "mbsec.window", "mbsec.worker"),
    reasons=FREEZE_REASONS,
    constructors=("writes_frozen", "writes_thawed"),
)


def writes_frozen(target: str, kind: str, reason: str, worker: int,
                  drops: int | None = None, window_s: float | None = None) -> Event:
    """Writes to ``target`` (an ``[upstreams]`` name, ``*`` for all) are refused from the next
    request on; ``kind``: ``manual`` (``reason`` ``operator``) or ``auto`` (``link_flapping``:
    ``drops`` link drops within ``window_s``)."""
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["configuration"],
        "event.type": ["change"],
        "event.action": "writes-freeze",
        "event.outcome": "success",
        "event.reason": reason,
        "mbsec.target": target,
        "mbsec.frozen": True,
        "mbsec.freeze_kind": kind,
        "mbsec.worker": worker,
    }
    if drops is not None:
        fields["mbsec.drops"] = drops
    if window_s is not None:
        fields["mbsec.window"] = window_s
    return Event("warning", "writes frozen", fields)


def writes_thawed(target: str, kinds: Sequence[str], reason: str, worker: int) -> Event:
    """Writes to ``target`` flow again: an operator thawed it (``operator``) or its link was
    stable for ``stable_for`` (``link_stable``). ``kinds``: the freezes removed."""
    return Event("warning", "writes thawed", {
        "event.kind": "event",
        "event.category": ["configuration"],
        "event.type": ["change"],
        "event.action": "writes-freeze",
        "event.outcome": "success",
        "event.reason": reason,
        "mbsec.target": target,
        "mbsec.frozen": False,
        "mbsec.freeze_kind": ",".join(kinds),
        "mbsec.worker": worker,
    })


ADMIN_REASONS = ("bad_request", "unknown_command", "unknown_target", "unknown_connection",
                 "reload_failed", "internal_error")

_register(
    "admin-command",
    levels=("info", "warning"),
    context=None,
    fields=(*_ENVELOPE, "event.reason", "mbsec.command", "mbsec.argument", "user.id",
            "process.pid", "error.message"),
    reasons=ADMIN_REASONS,
    constructors=("admin_command",),
)


def admin_command(command: str, argument: str | None, uid: int | None, pid: int | None,
                  error: str | None = None, detail: str | None = None) -> Event:
    """One request on the admin socket (``mbsec ctl``): who (the peer's uid and pid from
    ``SO_PEERCRED``) asked what; ``error`` (a reason) when it was refused."""
    fields: dict[str, Any] = {
        "event.kind": "event",
        "event.category": ["configuration"],
        "event.type": ["access"] if error is None else ["access", "denied"],
        "event.action": "admin-command",
        "event.outcome": "success" if error is None else "failure",
        "mbsec.command": command,
    }
    if argument is not None:
        fields["mbsec.argument"] = argument
    if uid is not None:
        fields["user.id"] = str(uid)
    if pid is not None:
        fields["process.pid"] = pid
    if error is not None:
        fields["event.reason"] = error
        fields["error.message"] = detail or error
    return Event("info" if error is None else "warning", "admin command", fields)


# -- without a logger -----------------------------------------------------------------------------


def fallback_line(event: Event, now: dt.datetime | None = None) -> str:
    """The JSON line the logger would write, built without it: for ``log-sink-failed`` and
    anything else that must reach stderr when the sinks cannot take it."""
    # here, not at import: the request-path core imports this module and reads no clock
    # (datetime imports time); audit imports this module
    import datetime

    from mbsec.audit import ECS_VERSION, nest_dotted

    stamp = (now or datetime.datetime.now(datetime.UTC)).isoformat().replace("+00:00", "Z")
    flat: dict[str, Any] = {"@timestamp": stamp, "message": event.message, **event.fields,
                            "log.level": event.level, "ecs.version": ECS_VERSION,
                            "service.name": "mbsec"}
    return json.dumps(nest_dotted(flat), separators=(",", ":"), default=str)


__all__ = [
    "ACTIONS",
    "AUDIT_UNAVAILABLE_EXCEPTION",
    "CLOSE_REASONS",
    "COMMON_FIELDS",
    "CONNECT_CLOSE_REASONS",
    "CONNECT_UPSTREAM_REASONS",
    "CONTEXTS",
    "FRAMING_REASONS",
    "INCIDENT_REASONS",
    "MAX_LOGGED_VALUES",
    "MODBUS_REQUEST_REASONS",
    "PEER_MATCH_FIELDS",
    "RESPONSE_TOO_LARGE_EXCEPTION",
    "SERVER_STOPPED_REASONS",
    "TLS_REJECT_REASONS",
    "UPSTREAM_RESET_REASONS",
    "Event",
    "Level",
    "Spec",
    "accept_failed",
    "admin_command",
    "client_penalized",
    "config_reload_failed",
    "config_reloaded",
    "connect_closed",
    "connect_start",
    "connect_stopped",
    "connect_upstream_failed",
    "connect_upstream_ok",
    "connection_closed",
    "connection_context",
    "connection_rejected",
    "connection_revoked",
    "crl_expiry",
    "data_plane_error",
    "emit",
    "fallback_line",
    "identity_fields",
    "log_sink_dropped",
    "log_sink_failed",
    "modbus_framing_error",
    "modbus_request_allowed",
    "modbus_request_audit_unavailable",
    "modbus_request_denied",
    "modbus_request_failed",
    "modbus_request_invalid",
    "modbus_request_response_too_large",
    "modbus_request_unanswered",
    "modbus_request_would_deny",
    "peer_context",
    "rejections_suppressed",
    "roles_context",
    "server_start",
    "server_stop",
    "server_stopped",
    "session_error",
    "tls_handshake_accepted",
    "tls_handshake_rejected",
    "tunnel_context",
    "upstream_connect",
    "upstream_connect_failed",
    "upstream_context",
    "upstream_late_reply",
    "upstream_reset",
    "writes_frozen",
    "writes_thawed",
]
