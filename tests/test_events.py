"""Events have one home: mbsec/events.py builds every event and its registry is what
docs/events.md documents, both ways. Also the constructors themselves (fields, levels, ECS
names) and the reasons the code uses today (all registered)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mbsec import events
from mbsec.audit import ListSink, flatten, make_logger
from mbsec.events import ACTIONS, COMMON_FIELDS, CONTEXTS, Event
from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access, Table
from mbsec.settings import LoggingSettings

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "events.md"


# -- docs/events.md, parsed -----------------------------------------------------------------------


@dataclass
class Section:
    fields: set[str] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)


@dataclass
class Doc:
    common: set[str] = field(default_factory=set)
    contexts: dict[str, set[str]] = field(default_factory=dict)
    glance: dict[str, tuple[set[str], str | None]] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)


def _ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_doc(text: str) -> Doc:
    """The format is described in docs/events.md, "About this document"."""
    doc = Doc()
    h2 = ""
    action: str | None = None
    lines = text.splitlines()
    i = 0
    fenced = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        if fenced:
            i += 1
            continue
        if line.startswith("## "):
            h2, action = line[3:].strip(), None
        elif line.startswith("### "):
            m = re.fullmatch(r"`([a-z-]+)`", line[4:].strip())
            action = m.group(1) if m else None
            if action is not None:
                assert action not in doc.sections, f"two sections for {action}"
                doc.sections[action] = Section()
        if not line.startswith("|"):
            i += 1
            continue
        header = [c.lower() for c in _cells(line)]
        rows = []
        i += 2  # the header and the |---| line
        while i < len(lines) and lines[i].startswith("|"):
            rows.append(_cells(lines[i]))
            i += 1
        kind = header[0]
        if kind == "field" and h2 == "Fields on every event":
            for r in rows:
                doc.common.update(_ticks(r[0]))
        elif kind == "context":
            for r in rows:
                (ctx,) = _ticks(r[0])
                doc.contexts.setdefault(ctx, set()).update(_ticks(r[1]))
        elif kind == "action":
            assert header[1:3] == ["level", "context"], header
            for r in rows:
                (name,) = _ticks(r[0])
                ctx = _ticks(r[2])
                doc.glance[name] = (set(_ticks(r[1])), ctx[0] if ctx else None)
        elif kind in ("field", "reason"):
            assert action is not None, f"a {kind} table outside an action section: {rows[0]}"
            target = doc.sections[action].fields if kind == "field" else \
                doc.sections[action].reasons
            for r in rows:
                names = _ticks(r[0])
                assert names, f"{action}: a {kind} row without a name: {r}"
                target.update(names)
    return doc


@pytest.fixture(scope="module")
def doc() -> Doc:
    return parse_doc(DOC.read_text(encoding="utf-8"))


def test_the_parser_reads_tables_per_section() -> None:
    text = """
## Fields on every event
| field | x |
|---|---|
| `a.b`, `c` | `not-a-field` in column 2 |
## Context fields
| context | field | meaning |
|---|---|---|
| `connection` | `x.y`, `x.z` | |
## Events at a glance
| action | level | context | when |
|---|---|---|---|
| `one-thing` | `info`, `warning` | | |
## Group
### `one-thing`
prose with `ignored`
| field | meaning |
|---|---|
| `event.reason` (see below) | `ignored` |

| reason | meaning |
|---|---|
| `r1`, `r2`, or another | |
### Not an action
| metric | type |
|---|---|
| `m` | counter |
```json
| field | inside a code block |
```
"""
    d = parse_doc(text)
    assert d.common == {"a.b", "c"}
    assert d.contexts == {"connection": {"x.y", "x.z"}}
    assert d.glance == {"one-thing": ({"info", "warning"}, None)}
    assert d.sections["one-thing"] == Section({"event.reason"}, {"r1", "r2"})
    with pytest.raises(AssertionError, match="outside an action section"):
        parse_doc("## X\n| field | y |\n|---|---|\n| `a` | |\n")


def _diff(name: str, documented: set[str], registered: set[str] | frozenset[str]) -> list[str]:
    out = [f"{name}: {x} is written but not documented" for x in sorted(registered - documented)]
    out += [f"{name}: {x} is documented but never written" for x in sorted(documented - registered)]
    return out


def test_every_action_is_documented_and_nothing_else(doc: Doc) -> None:
    assert _diff("actions (### sections)", set(doc.sections), set(ACTIONS)) == []
    assert _diff("actions (at a glance)", set(doc.glance), set(ACTIONS)) == []
    assert list(doc.glance) == list(ACTIONS), "the glance table follows the registry's order"


def test_levels_and_contexts_at_a_glance(doc: Doc) -> None:
    problems = []
    for action, spec in ACTIONS.items():
        levels, ctx = doc.glance.get(action, (set(), None))
        problems += _diff(f"{action} levels", levels, spec.levels)
        if ctx != spec.context:
            problems.append(f"{action}: context {ctx} documented, {spec.context} bound")
    assert problems == []


def test_every_field_is_documented_and_nothing_else(doc: Doc) -> None:
    problems = _diff("every event", doc.common, COMMON_FIELDS)
    problems += _diff("contexts", set(doc.contexts), set(CONTEXTS))
    for name, fields in CONTEXTS.items():
        problems += _diff(f"context {name}", doc.contexts.get(name, set()), fields)
    for action, spec in ACTIONS.items():
        problems += _diff(action, doc.sections.get(action, Section()).fields, spec.fields)
    assert problems == []


def test_every_reason_is_documented_and_nothing_else(doc: Doc) -> None:
    problems = []
    for action, spec in ACTIONS.items():
        problems += _diff(f"{action} reasons", doc.sections.get(action, Section()).reasons,
                          spec.reasons)
        has_reason = "event.reason" in spec.fields
        assert has_reason == bool(spec.reasons), f"{action}: event.reason without reasons"
    assert problems == []


# -- the constructors -------------------------------------------------------------------------

IDENTITY = PeerIdentity(
    subject="CN=hmi-01,O=Plant", common_name="hmi-01", organizational_units=(), san_dns=(),
    san_ip=(), san_uri=(), issuer="CN=Plant CA", serial=0xBEEF,
    fingerprint_sha256="c4f0" * 16, not_before=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    not_after=dt.datetime(2027, 1, 1, tzinfo=dt.UTC), role="operator",
)
#: a certificate with every fact an ``identities:`` entry can match
SAN_IDENTITY = dataclasses.replace(
    IDENTITY, organizational_units=("Line 1", "HMI"), san_dns=("hmi-01.plant.example",),
    san_ip=("10.0.0.9", "2001:db8::9"), san_uri=("urn:plant:hmi-01",))
WRITE = Access(16, Table.HOLDING_REGISTERS, None, (10, 2), (1, 2), None, 10)
DIAG = Access(8, Table.NONE, None, None, (), 0, 5)
#: FC23: reads 100..104, writes 10..29 (20 values: more than are logged)
READ_WRITE = Access(23, Table.HOLDING_REGISTERS, (100, 5), (10, 20), tuple(range(20)), None, 50)
R = (514, 1, 16, WRITE, 0.00009)  # tid, unit, fc, access, duration

#: calls that together take every branch of every constructor
SAMPLES: list[tuple[Callable[..., Event], tuple[Any, ...], dict[str, Any]]] = [
    (events.tls_handshake_accepted, (0.0012, IDENTITY, "TLSv1.3", "TLS_AES_256_GCM_SHA384",
                                     False), {}),
    (events.tls_handshake_rejected, ("unknown_ca", "unable to get local issuer", 0.002), {}),
    (events.tls_handshake_rejected, ("certificate_revoked", "serial is on the current CRL",
                                     0.002, IDENTITY), {"resumed": False}),
    (events.modbus_request_allowed, (*R, "r1", "allow", "plc-1"), {}),
    (events.modbus_request_allowed, (8, 1, 8, DIAG, 0.001, "r2", "would_deny", "plc-1", 1),
     {"level": "info"}),
    (events.modbus_request_allowed, (9, 1, 99, None, 0.001, "r3", "allow", "plc-1"), {}),
    (events.modbus_request_allowed, (10, 1, 23, READ_WRITE, 0.001, "r4", "allow", "plc-1"), {}),
    (events.modbus_request_would_deny, (*R, "default", "no_matching_rule"), {}),
    (events.modbus_request_denied, (*R, "r1", "denied_by_rule", 1), {}),
    (events.modbus_request_denied, (*R, "r1", "write_rate_exceeded", 6), {
        "decision": "rate_limited"}),
    (events.modbus_request_invalid, (5, 1, 3, 0.0001, "bad_quantity", 3, "quantity 0"), {}),
    (events.modbus_request_failed, (*R, "r1", "timeout", 0x0B, "no reply"), {}),
    (events.modbus_request_failed, (*R, "r1", "client_gone", 0x0B, "withdrawn"), {}),
    (events.modbus_request_response_too_large, (*R, "r1", 200, 100), {}),
    (events.modbus_request_audit_unavailable, (*R, "r1"), {}),
    (events.modbus_request_unanswered, (*R, "r1", "server_shutdown", "reply"), {}),
    (events.modbus_framing_error, ("bad_protocol_id", "MBAP protocol id 1 is not 0"), {}),
    (events.connection_closed, ("client_closed", 12.5, 100, 200, 3, 2, 1, 0), {}),
    (events.connection_rejected, ("too_many_connections", "10.0.0.9", 40000), {}),
    (events.rejections_suppressed, ("10.0.0.0/24", "tls-handshake", "handshake_timeout", 41,
                                    dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
                                    dt.datetime(2026, 12, 1, 0, 0, 10, tzinfo=dt.UTC)), {}),
    (events.rejections_suppressed, (None, None, "budget_exceeded", 900,
                                    dt.datetime(2026, 12, 1, tzinfo=dt.UTC),
                                    dt.datetime(2026, 12, 1, 0, 0, 10, tzinfo=dt.UTC), 312), {}),
    (events.connection_revoked, (7, IDENTITY, "10.0.0.9"), {}),
    (events.server_start, (["127.0.0.1:802"], None, {"b": 1, "a": 2}, "thread", True), {}),
    (events.server_stop, (2, 10.0), {}),
    (events.server_stopped, ("shutdown_requested", 1, 2.5, 0), {}),
    (events.server_stopped, ("data_plane_failed", 0, 0.0, 1), {}),
    (events.server_stopped, ("cancelled", 0, 0.0, None), {}),
    (events.config_reloaded, (3, ["limits"]), {}),
    (events.config_reload_failed, (["a: broken", "b: broken"],), {}),
    (events.crl_expiry, ("CRL of CN=Plant CA expired",), {}),
    (events.accept_failed, (OSError(24, "Too many open files"),), {}),
    (events.session_error, (RuntimeError("bug"), "10.0.0.9"), {}),
    (events.data_plane_error, (ValueError("bug"),), {}),
    (events.data_plane_error, (ValueError("bug"),), {"fatal": True}),
    (events.log_sink_failed, ("FileSink", OSError(28, "No space left on device")), {}),
    (events.log_sink_dropped, ("soc", 12, "2026-11-25T14:56:03.347880Z",
                                "2026-11-25T14:57:00.000001Z"), {}),
    (events.upstream_connect, (), {}),
    (events.upstream_connect_failed, ("connect_timeout", "no connection within 3 s", 0.4), {}),
    (events.upstream_reset, ("bad_frame", "MBAP length 300", 2), {}),
    (events.upstream_reset, ("wrong_unit", "reply from unit 2", 1, "c4f0" * 16), {}),
    (events.upstream_reset, ("eof", "connection closed by the PLC", 0), {}),
    (events.upstream_late_reply, (77,), {}),
    (events.client_penalized, ("c4f0" * 16, 3, 30.0), {}),
    (events.connect_start, (["127.0.0.1:502"], "mbsec.plant.local", 802, "mbsec.plant.local",
                            None, "hmi-01", "c4f0" * 16, None), {}),
    (events.connect_upstream_ok, (0.004, 1, "TLSv1.3", "TLS_AES_256_GCM_SHA384", "mbsec-dmz",
                                  "c4f0" * 16), {}),
    (events.connect_upstream_failed, ("server_name_mismatch", "Hostname mismatch", 1, 0.2,
                                      False), {}),
    (events.connect_closed, ("client_closed", 60.0, 120, 130), {}),
    (events.connect_closed, ("server_refused", 0.01, 12, 0, "server_name_mismatch"), {}),
    (events.connect_stopped, (2,), {}),
    (events.writes_frozen, ("plc-1", "manual", "operator", 0), {}),
    (events.writes_frozen, ("plc-1", "auto", "link_flapping", 1, 5, 60.0), {}),
    (events.writes_thawed, ("plc-1", ["manual", "auto"], "operator", 0), {}),
    (events.writes_thawed, ("*", ["auto"], "link_stable", 1), {}),
    (events.admin_command, ("freeze", "plc-1", 0, 4242), {}),
    (events.admin_command, ("drop", "17", 1000, 4243, "unknown_connection", "no connection 17"),
     {}),
    (events.modbus_request_denied, (*R, "r1", "writes_frozen", 1), {"decision": "frozen"}),
]


def _built() -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for fn, args, kwargs in SAMPLES:
        ev = fn(*args, **kwargs)
        out.setdefault(ev.action, []).append(ev)
    return out


def test_every_constructor_is_registered_and_sampled() -> None:
    registered = {name for spec in ACTIONS.values() for name in spec.constructors}
    public = {name for name, fn in vars(events).items() if inspect.isfunction(fn)
              and fn.__module__ == events.__name__ and not name.startswith("_")
              and inspect.signature(fn).return_annotation in ("Event", Event)}
    assert public - {"emit"} == registered
    assert {fn.__name__ for fn, _, _ in SAMPLES} == registered
    for action, spec in ACTIONS.items():
        for name in spec.constructors:
            fn, args, kwargs = next(s for s in SAMPLES if s[0].__name__ == name)
            assert fn(*args, **kwargs).action == action, name


def test_constructors_write_exactly_the_registered_fields_and_levels() -> None:
    built = _built()
    problems = []
    for action, spec in ACTIONS.items():
        evs = built[action]
        written = set().union(*(ev.fields for ev in evs)) - {"event.action"}
        problems += _diff(f"{action} fields", spec.fields, written)
        problems += _diff(f"{action} levels", spec.levels, {ev.level for ev in evs})
        for ev in evs:
            reason = ev.fields.get("event.reason")
            if reason is not None and reason not in spec.reasons:
                problems.append(f"{action}: reason {reason} not registered")
    assert problems == []


def test_context_helpers_write_the_registered_context_fields() -> None:
    conn = events.connection_context(1, "10.0.0.9", 40000, "10.0.0.1", 802)
    peer = events.peer_context(SAN_IDENTITY, ["operator"])
    assert set(conn) | set(peer) == CONTEXTS["connection"]
    bare = events.peer_context(IDENTITY, ["operator"])  # no OU, no SANs: not bound at all
    assert set(peer) - set(bare) == {"tls.client.x509.subject.organizational_unit",
                                     "mbsec.san_dns", "mbsec.san_ip", "mbsec.san_uri"}
    assert set(events.roles_context(["a"])) <= CONTEXTS["connection"]
    assert set(events.upstream_context("plc-1", "10.0.0.5", 502, 0)) == CONTEXTS["upstream"]
    assert "mbsec.connection" not in events.upstream_context("plc-1", "10.0.0.5", 502)
    assert peer["user.roles"] == ["operator"] and peer["user.name"] == "hmi-01"
    assert set(events.tunnel_context(1, "127.0.0.1", 40000, "mbsec.plant.local", 802)) == \
        CONTEXTS["tunnel"]


# ECS 8.11 fields mbsec uses; anything else must be in mbsec's own or the modbus namespace
ECS_FIELDS = {
    "@timestamp", "message", "log.level", "ecs.version", "service.name",
    "event.kind", "event.category", "event.type", "event.action", "event.outcome",
    "event.reason", "event.duration", "event.start", "event.end", "error.message",
    "error.type", "rule.id",
    "source.ip", "source.port", "source.bytes", "destination.ip", "destination.port",
    "destination.bytes", "user.name", "user.roles", "tls.version", "tls.version_protocol",
    "tls.cipher", "tls.resumed", "tls.client.hash.sha256",
    "tls.client.x509.subject.common_name", "tls.client.x509.subject.distinguished_name",
    "tls.client.x509.issuer.distinguished_name", "tls.client.x509.serial_number",
    "tls.client.x509.not_after", "tls.client.x509.subject.organizational_unit",
    "process.exit_code", "server.address", "server.port",
    "tls.server.x509.subject.common_name", "tls.server.hash.sha256",
    "process.pid", "user.id",
}
ECS_VALUES = {
    "event.kind": {"alert", "enrichment", "event", "metric", "state", "pipeline_error",
                   "signal"},
    "event.category": {"api", "authentication", "configuration", "database", "driver", "email",
                       "file", "host", "iam", "intrusion_detection", "library", "malware",
                       "network", "package", "process", "registry", "session", "threat",
                       "vulnerability", "web"},
    "event.type": {"access", "admin", "allowed", "change", "connection", "creation",
                   "deletion", "denied", "end", "error", "group", "indicator", "info",
                   "installation", "protocol", "start", "user"},
    "event.outcome": {"failure", "success", "unknown"},
}


def test_field_names_are_ecs_or_namespaced() -> None:
    names = set(COMMON_FIELDS).union(*CONTEXTS.values(), *(s.fields for s in ACTIONS.values()))
    assert sorted(n for n in names if n not in ECS_FIELDS
                  and not n.startswith(("mbsec.", "modbus."))) == []
    assert all(re.fullmatch(r"@?[a-z0-9_]+(\.[a-z0-9_]+)*", n) for n in names)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", a) for a in ACTIONS)
    slugs = set().union(*(s.reasons for s in ACTIONS.values()))
    assert sorted(r for r in slugs if not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", r)) == []


def test_every_event_is_categorized_with_ecs_allowed_values() -> None:
    """Every event of every constructor (all sampled) has kind, category, type and outcome,
    each with values ECS allows; category and type are lists, kind and outcome one value."""
    problems = []
    for action, spec in ACTIONS.items():
        for key in ECS_VALUES:
            if key not in spec.fields:
                problems.append(f"{action}: {key} not registered")
    for fn, args, kwargs in SAMPLES:
        ev = fn(*args, **kwargs)
        for key, allowed in ECS_VALUES.items():
            value = ev.fields.get(key)
            if value is None:
                problems.append(f"{fn.__name__}{args}: no {key}")
                continue
            many = key in ("event.category", "event.type")
            if many != isinstance(value, list) or (many and not value):
                problems.append(f"{fn.__name__}: {key} {value!r} has the wrong shape")
            values = value if isinstance(value, list) else [value]
            if not set(values) <= allowed:
                problems.append(f"{fn.__name__}: {key} {value!r} not an ECS value")
    assert problems == []


def test_a_revoked_certificate_is_an_incident_other_rejections_are_not() -> None:
    revoked = events.tls_handshake_rejected("certificate_revoked", "certificate revoked", 0.001,
                                            IDENTITY)
    assert revoked.level == "error" and revoked.fields["event.kind"] == "alert"
    assert "intrusion_detection" in revoked.fields["event.category"]
    assert revoked.fields["tls.client.x509.serial_number"] == format(IDENTITY.serial, "X")
    expired = events.tls_handshake_rejected("certificate_expired", "expired", 0.001, IDENTITY)
    assert expired.level == "warning" and expired.fields["event.kind"] == "event"
    assert "intrusion_detection" not in expired.fields["event.category"]
    assert ACTIONS["tls-handshake"].reasons >= events.INCIDENT_REASONS


def test_tls_events() -> None:
    ok = events.tls_handshake_accepted(0.0012, IDENTITY, "TLSv1.3", "TLS_AES_256_GCM_SHA384",
                                       False).fields
    assert ok["tls.version"] == "1.3" and ok["tls.version_protocol"] == "tls"
    assert ok["event.duration"] == 1_200_000
    assert ok["tls.client.x509.serial_number"] == "BEEF"
    assert ok["tls.client.x509.not_after"] == "2027-01-01T00:00:00+00:00"
    assert ok["mbsec.role"] == "operator"
    assert events.tls_handshake_accepted(0, IDENTITY, None, None, False).fields[
        "tls.version"] == ""
    bad = events.tls_handshake_rejected("no_certificate", "none sent", 0.5)
    assert bad.level == "warning" and bad.fields["event.outcome"] == "failure"
    assert "tls.resumed" not in bad.fields and "tls.client.hash.sha256" not in bad.fields


def test_modbus_request_events() -> None:
    allowed = events.modbus_request_allowed(*R, "r1", "allow", "plc-1")
    assert allowed.level == "debug" and allowed.message == "request forwarded"
    assert allowed.fields == {
        "event.kind": "event", "event.category": ["network"], "event.action": "modbus-request",
        "event.duration": 90000, "modbus.transaction_id": 514, "modbus.unit_id": 1,
        "modbus.function_code": 16, "modbus.function": "write_multiple_registers",
        "modbus.address": 10, "modbus.quantity": 2, "modbus.values": [1, 2],
        "mbsec.request_bytes": 10, "event.type": ["protocol", "allowed"],
        "event.outcome": "success", "rule.id": "r1", "modbus.decision": "allow",
        "mbsec.target": "plc-1",
    }
    diag = events.modbus_request_allowed(8, 1, 8, DIAG, 0.0, "r", "allow", "p").fields
    assert diag["modbus.subfunction"] == 0 and "modbus.address" not in diag
    assert events.modbus_request_allowed(1, 1, 99, None, 0, "r", "allow", "p").fields[
        "modbus.function"] == "function_99"
    denied = events.modbus_request_denied(*R, "r1", "request_rate_exceeded", 6,
                                          decision="rate_limited").fields
    assert denied["modbus.decision"] == "rate_limited" and denied["modbus.exception_code"] == 6
    big = events.modbus_request_response_too_large(*R, "r1", 200, 100).fields
    assert big["modbus.exception_code"] == 4 and big["mbsec.response_bytes"] == 200
    audit = events.modbus_request_audit_unavailable(*R, "r1").fields
    assert audit["event.reason"] == "audit_unavailable" and audit["modbus.exception_code"] == 4
    assert audit["modbus.decision"] == "audit_unavailable" and audit["rule.id"] == "r1"
    gone = events.modbus_request_failed(*R, "r1", "client_gone", 11, "withdrawn")
    assert gone.message.startswith("client went away")
    assert events.modbus_request_failed(*R, "r1", "timeout", 11, "x").message == \
        "PLC did not answer"


def _access(fc: int, table: Table, read: tuple[int, int] | None,
            write: tuple[int, int] | None, values: tuple[int, ...], pdu_length: int) -> Access:
    return Access(fc, table, read, write, values, None, pdu_length)


@pytest.mark.parametrize(("access", "logged", "total"), [
    (_access(5, Table.COILS, None, (7, 1), (1,), 5), [1], None),  # FC05 on
    (_access(5, Table.COILS, None, (7, 1), (0,), 5), [0], None),  # FC05 off
    (_access(15, Table.COILS, None, (0, 10), (1, 0, 1, 1, 0, 0, 0, 0, 1, 1), 8),
     [1, 0, 1, 1, 0, 0, 0, 0, 1, 1], None),  # FC15: one state per coil
    (_access(6, Table.HOLDING_REGISTERS, None, (10, 1), (65535,), 5), [65535], None),
    (_access(16, Table.HOLDING_REGISTERS, None, (10, 16), tuple(range(16)), 38),
     list(range(16)), None),  # exactly the bound: not cut
    (_access(16, Table.HOLDING_REGISTERS, None, (10, 123), tuple(range(123)), 252),
     list(range(16)), 123),  # cut: the first 16 and the count
    (_access(22, Table.HOLDING_REGISTERS, None, (4, 1), (0x00F2, 0x0025), 7),
     [0x00F2, 0x0025], None),  # FC22: and_mask, or_mask
    (_access(3, Table.HOLDING_REGISTERS, (0, 10), None, (), 5), None, None),  # reads: none
])
def test_request_events_carry_the_written_values(
    access: Access, logged: list[int] | None, total: int | None
) -> None:
    for ev in (events.modbus_request_denied(1, 1, access.function_code, access, 0.0, "r",
                                            "denied_by_rule", 1),
               events.modbus_request_allowed(1, 1, access.function_code, access, 0.0, "r",
                                             "allow", "plc-1"),
               events.modbus_request_would_deny(1, 1, access.function_code, access, 0.0, "r",
                                                "denied_by_rule")):
        assert ev.fields.get("modbus.values") == logged
        assert ev.fields.get("mbsec.values_total") == total
        assert ev.fields["mbsec.request_bytes"] == access.pdu_length
    assert len(logged or ()) <= events.MAX_LOGGED_VALUES


def test_fc23_request_events_carry_both_ranges() -> None:
    ev = events.modbus_request_denied(3, 1, 23, READ_WRITE, 0.0, "r", "denied_by_rule", 1)
    f = ev.fields
    assert (f["modbus.read.address"], f["modbus.read.quantity"]) == (100, 5)
    assert (f["modbus.write.address"], f["modbus.write.quantity"]) == (10, 20)
    assert (f["modbus.address"], f["modbus.quantity"]) == (10, 20)  # as before: the write's
    assert f["modbus.values"] == list(range(16)) and f["mbsec.values_total"] == 20
    # one range only: no split fields (modbus.address/quantity say it all)
    for access in (WRITE, _access(3, Table.HOLDING_REGISTERS, (0, 10), None, (), 5)):
        fields = events.modbus_request_denied(3, 1, access.function_code, access, 0.0, "r",
                                              "denied_by_rule", 1).fields
        assert not any(k.startswith(("modbus.read.", "modbus.write.")) for k in fields)


def test_peer_context_carries_what_policy_identities_match() -> None:
    """Every ``identities:`` match key (docs/policy.md) has its fact in the context."""
    from mbsec.policy.engine import _identity_values

    peer = events.peer_context(SAN_IDENTITY, ["operator"])
    by_key = {
        "subject_cn": peer["tls.client.x509.subject.common_name"],
        "subject_ou": peer["tls.client.x509.subject.organizational_unit"],
        "san_dns": peer["mbsec.san_dns"],
        "san_ip": peer["mbsec.san_ip"],
        "san_uri": peer["mbsec.san_uri"],
        "issuer": peer["tls.client.x509.issuer.distinguished_name"],
        "fingerprint_sha256": peer["tls.client.hash.sha256"],
    }
    for key, logged in by_key.items():
        logged = logged if isinstance(logged, list) else [logged]
        assert list(_identity_values(SAN_IDENTITY, key)) == logged, key
    from mbsec.policy.model import IdentityMatch

    assert set(IdentityMatch.model_fields) == set(by_key)  # a new match key: log it too


def test_server_stopped() -> None:
    ok = events.server_stopped("shutdown_requested", 2, 1.5, 0)
    assert ok.level == "info" and ok.message == "mbsec stopped"
    assert ok.fields == {
        "event.kind": "event", "event.category": ["process"], "event.type": ["end"],
        "event.action": "server-stopped", "event.outcome": "success",
        "event.reason": "shutdown_requested", "event.duration": 1_500_000_000,
        "mbsec.connections_cut": 2, "process.exit_code": 0}
    bad = events.server_stopped("data_plane_failed", 0, 0.1, 1)
    assert bad.level == "error" and bad.fields["event.outcome"] == "failure"
    assert bad.fields["process.exit_code"] == 1
    embedded = events.server_stopped("cancelled", 0, 0.0, None)
    assert embedded.level == "info" and "process.exit_code" not in embedded.fields


def test_upstream_events() -> None:
    assert events.upstream_connect().fields["event.type"] == ["connection", "start"]
    assert events.upstream_reset("eof", "closed", 0).level == "info"
    assert events.upstream_reset("eof", "closed", 1).level == "warning"
    assert events.upstream_reset("bad_frame", "x", 0).level == "warning"
    assert "mbsec.blamed" not in events.upstream_reset("bad_frame", "x", 0).fields
    assert events.upstream_reset("bad_frame", "x", 0, "ab").fields["mbsec.blamed"] == "ab"
    assert events.upstream_connect_failed("connect_failed", "refused", 0.2).fields == {
        "event.kind": "event", "event.category": ["network"],
        "event.type": ["connection", "error"], "event.action": "upstream-connect-failed",
        "event.outcome": "failure", "event.reason": "connect_failed",
        "error.message": "refused", "mbsec.backoff": 0.2}
    pen = events.client_penalized("ab", 3, 30.0).fields
    assert pen["event.reason"] == "breaks_plc_link"
    assert (pen["mbsec.blamed"], pen["mbsec.resets"], pen["mbsec.hold"]) == ("ab", 3, 30.0)


def test_server_events() -> None:
    start = events.server_start(["127.0.0.1:802"], None, {"b": 1, "a": 2}, "trio", False)
    assert start.fields["mbsec.upstreams"] == ["a", "b"]
    assert events.config_reload_failed(["a", "b"]).fields["error.message"] == "a; b"
    assert events.data_plane_error(ValueError("x"), fatal=True)[:2] == \
        ("critical", "data plane stopped")
    assert events.session_error(KeyError("k"), "1.2.3.4").fields["error.type"] == "KeyError"


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda message, **kw: self.calls.append((level, message, kw))


def test_emit_writes_at_the_events_level() -> None:
    rec = _Recorder()
    ev = events.upstream_reset("bad_frame", "x", 2)
    events.emit(rec, ev)
    assert rec.calls == [("warning", "upstream-reset", ev.fields)]


def test_emitted_through_the_logger_and_the_fallback_line_alike() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False, level="debug"), extra_sinks=[sink])
    ev = events.connection_revoked(7, IDENTITY, "10.0.0.9")
    events.emit(log, ev)
    (line,) = sink.events()
    flat = flatten(line)
    assert set(flat) == set(ev.fields) | COMMON_FIELDS
    assert {k: flat[k] for k in ev.fields} == ev.fields
    assert flat["log.level"] == "error" and flat["message"] == ev.message  # an incident
    assert flat["event.kind"] == "alert"
    stamp = dt.datetime(2026, 11, 25, 14, 56, 3, 347880, tzinfo=dt.UTC)
    failed = events.log_sink_failed("FileSink", OSError(28, "No space left on device"))
    fb = json.loads(events.fallback_line(failed, stamp))
    assert fb["@timestamp"] == "2026-11-25T14:56:03.347880Z"
    assert fb["event"]["action"] == "log-sink-failed" and fb["mbsec"]["sink"] == "FileSink"
    assert fb["log"]["level"] == "critical" and fb["error"]["type"] == "OSError"
    assert set(flatten(fb)) == set(failed.fields) | COMMON_FIELDS
    assert list(fb)[:2] == ["@timestamp", "message"]


# -- the reasons the code uses are registered -----------------------------------------------------


def _reasons(action: str) -> frozenset[str]:
    return ACTIONS[action].reasons


def test_tls_library_reasons_are_registered() -> None:
    from mbsec import tls

    named = set(tls._VERIFY_REASONS.values()) | set(tls._SSL_REASONS.values())
    fallbacks = {tls.handshake_failure_reason(None)[0], tls.handshake_failure_reason(
        ValueError())[0]}
    ident = set(re.findall(r'reason="(\w+)"',
                           (ROOT / "mbsec" / "identity.py").read_text(encoding="utf-8")))
    assert ident and named
    assert sorted((named | fallbacks | ident) - _reasons("tls-handshake")) == []
    assert ACTIONS["tls-handshake"].more_reasons  # OpenSSL may name others


def test_policy_and_protocol_reasons_are_registered() -> None:
    from mbsec.policy import engine, ratelimit

    policy = {engine.REASON_RULE_DENY, engine.REASON_DEFAULT, ratelimit.REASON_IN_FLIGHT,
              ratelimit.REASON_REQUEST_RATE, ratelimit.REASON_WRITE_RATE}
    pdu = (ROOT / "mbsec" / "modbus" / "pdu.py").read_text(encoding="utf-8")
    invalid = set(re.findall(r'_reject\(\d, "(\w+)"', pdu))
    assert invalid
    assert sorted((policy | invalid) - _reasons("modbus-request")) == []
    mbap = (ROOT / "mbsec" / "modbus" / "mbap.py").read_text(encoding="utf-8")
    framing = set(re.findall(r'reason="(\w+)",\s*action=(?:Action\.CLOSE|_CLOSE)', mbap + pdu))
    assert {"bad_protocol_id", "empty_pdu"} <= framing
    assert sorted(framing - _reasons("modbus-framing-error")) == []
    assert _reasons("modbus-framing-error") <= _reasons("connection-closed")


#: reason strings of the request path that are never an event's reason
NOT_EVENT_REASONS = {"shutdown", "late_reply", "ok"}  # pool stopping; metric labels only

_REQUEST_PATH_PATTERNS = {
    # UpstreamError(reason=...) -> modbus-request (metrics labels share the keyword)
    "modbus-request": [r'reason="(\w+)"'],
    "connection-closed": [
        r'(?:abort|_close|stop_reading|note_close_reason|receive_eof)\(\s*"(\w+)"',
        r'close_reason = "(\w+)"'],
    "upstream-reset": [
        r'(?:_reset|request_reset|_teardown|\.close|\.closed)\((?:[^()"]*?,\s*)?"(\w+)"',
        r'return "(\w+)", ', r'ReplyProblem\(\s*"(\w+)"'],
    "upstream-connect-failed": [r'connect_failed\((?:[^()"]*?,\s*)?"(\w+)"'],
}


def test_request_path_reasons_are_registered() -> None:
    """Reason strings in the request path (mbsec/session.py, mbsec/path/) are registered: a
    new one must be added to mbsec/events.py and docs/events.md."""
    files = [ROOT / "mbsec" / "session.py", *sorted((ROOT / "mbsec" / "path").glob("**/*.py"))]
    src = "\n".join(p.read_text(encoding="utf-8") for p in files if p.exists())
    everything = set().union(*(s.reasons for s in ACTIONS.values()))
    problems = []
    found_any = set()
    for action, patterns in _REQUEST_PATH_PATTERNS.items():
        found = set().union(*(re.findall(p, src) for p in patterns)) - NOT_EVENT_REASONS
        found_any |= found
        # metric labels and errors share the keyword: any registered reason will do there
        allowed = everything if action == "modbus-request" else _reasons(action)
        problems += [f"{action}: {r}" for r in sorted(found - allowed)]
    assert {"client_reset", "eof", "timeout", "connect_timeout"} <= found_any
    assert problems == []
