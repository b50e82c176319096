"""The policy side of a connection (:class:`mbsec.path.decide.Decisions`), sans-IO.

``decide`` (parse, policy, rate limit, the log-sink rule) answers a request at once with the
exception PDU, forwards it (a ``Forward``), or breaks the connection (None); ``complete`` maps
the PLC's reply or failure to what the client gets. Each outcome is checked with its event
(a recording logger) and its counters; the real policy engine decides, from the test policy
in tests/conftest.py.

Ported from the trio session tests (tests/test_session.py): denial, monitor mode, rate limit,
upstream failures, the per-connection decision cache; new: ``logging.on_sink_failure``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import TEST_POLICY

from mbsec.modbus.errors import RemoteProtocolError
from mbsec.modbus.mbap import Adu
from mbsec.modbus.pdu import parse_request, parse_response
from mbsec.path.decide import Decisions, Forward, ProxyState
from mbsec.path.plc import PathUnavailable, TargetNoResponse, UpstreamReply
from mbsec.policy import Policy, RateLimiter, load_policy_text
from path.core_helpers import RecordingLog, RecordingMetrics

FINGERPRINT = "ab" * 32


def identity(role: str | None, cn: str = "op-1") -> Any:
    from mbsec.identity import PeerIdentity

    now = dt.datetime.now(dt.UTC)
    return PeerIdentity(
        subject=f"CN={cn}", common_name=cn, organizational_units=(), san_dns=(), san_ip=(),
        san_uri=(), issuer="CN=Test Plant CA", serial=1, fingerprint_sha256=FINGERPRINT,
        not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=1), role=role)


def state(policy: Any, generation: int = 0, limiter: RateLimiter | None = None) -> ProxyState:
    if isinstance(policy, str):
        policy = load_policy_text(policy)
    return ProxyState(tls=None, policy=policy,  # type: ignore[arg-type]  # decide needs none
                      limiter=limiter or RateLimiter(policy), generation=generation)


class Conn:
    """One connection's Decisions with its state, log and metrics."""

    def __init__(self, role: str | None = "operator", policy: Any = TEST_POLICY, *,
                 audit_ok: bool = True, on_sink_failure: str = "refuse_writes",
                 allowed_requests: str = "info") -> None:
        self.current = state(policy)
        self.log = RecordingLog()
        self.metrics = RecordingMetrics()
        self.sink = SimpleNamespace(healthy=audit_ok)  # audit.SinkLogger's health flag
        self.d = Decisions(state=lambda: self.current, identity=identity(role),
                           peer_ip="192.0.2.7", log=self.log, metrics=self.metrics,
                           allowed_requests=allowed_requests, sink=self.sink,
                           on_sink_failure=on_sink_failure)
        self.now = 100.0

    def decide(self, pdu: bytes, tid: int = 1, unit: int = 1) -> tuple[Adu, Any]:
        a = Adu(tid, unit, pdu)
        return a, self.d.decide(a, self.now)

    def forward(self, pdu: bytes, tid: int = 1, unit: int = 1) -> tuple[Adu, Forward]:
        a, result = self.decide(pdu, tid, unit)
        assert isinstance(result, Forward), result
        return a, result

    def requests(self) -> list[dict[str, Any]]:
        return self.log.of("modbus-request")


def read(address: int, count: int = 1) -> bytes:
    return struct.pack(">BHH", 3, address, count)


def write(address: int, value: int) -> bytes:
    return struct.pack(">BHH", 6, address, value)


def reply_to(fwd: Forward, pdu: bytes, target: str = "plc") -> UpstreamReply:
    return UpstreamReply(pdu, parse_response(fwd.request, pdu), target)


def fc03_reply(address: int, count: int) -> bytes:
    return bytes([3, 2 * count]) + struct.pack(f">{count}H", *range(address, address + count))


# -- allowed, denied, invalid ------------------------------------------------------------------


def test_an_allowed_request_is_forwarded_and_its_reply_logged_with_the_clients_tid() -> None:
    c = Conn("operator")
    a, fwd = c.forward(read(7, 2), tid=0xBEEF, unit=2)
    assert fwd.decision.rule_id == "operator-read" and fwd.t0 == c.now
    assert c.requests() == []  # logged once it is complete
    c.now += 0.25
    pdu = c.d.complete(a, fwd, reply_to(fwd, fc03_reply(7, 2)), None, c.now)
    assert pdu == fc03_reply(7, 2)
    [ev] = c.requests()
    assert ev["event"] == "request forwarded" and ev["level"] == "info"
    assert (ev["modbus.transaction_id"], ev["modbus.unit_id"]) == (0xBEEF, 2)
    assert ev["modbus.decision"] == "allow" and ev["event.outcome"] == "success"
    assert ev["rule.id"] == "operator-read" and ev["mbsec.target"] == "plc"
    assert (ev["modbus.address"], ev["modbus.quantity"]) == (7, 2)
    assert ev["event.duration"] == 250_000_000
    assert (c.d.requests, c.d.allowed, c.d.denied, c.d.errors) == (1, 1, 0, 0)
    assert c.metrics.count("mbsec_requests_total", decision="allow",
                           function="read_holding_registers") == 1


def test_allowed_requests_off_logs_nothing_for_an_allowed_request() -> None:
    c = Conn("operator", allowed_requests="off")
    a, fwd = c.forward(read(7, 1))
    c.d.complete(a, fwd, reply_to(fwd, fc03_reply(7, 1)), None, c.now)
    assert c.requests() == [] and c.d.allowed == 1


def test_a_denied_request_gets_exception_01_and_a_denial_event() -> None:
    c = Conn("operator")
    _a, answer = c.decide(write(7, 9), tid=5)  # operators may not write
    assert answer == bytes([0x86, 0x01])
    [ev] = c.requests()
    assert ev["event"] == "request denied" and ev["level"] == "warning"
    assert ev["modbus.decision"] == "deny" and ev["modbus.exception_code"] == 1
    assert ev["event.outcome"] == "failure" and ev["modbus.transaction_id"] == 5
    assert ev["rule.id"] and ev["event.reason"]
    assert (ev["modbus.address"], ev["modbus.function_code"]) == (7, 6)
    assert (c.d.requests, c.d.denied) == (1, 1)
    assert c.metrics.count("mbsec_requests_total", decision="deny") == 1


def test_a_deny_rule_answers_with_its_own_exception_code() -> None:
    policy = TEST_POLICY.replace(
        "rules:\n",
        "rules:\n  - id: no-writes\n    description: writes answered with 02\n    action: deny\n"
        "    exception_code: 2\n    functions: [write_single_register]\n",
        1,
    )
    c = Conn("engineer", policy)
    _a, answer = c.decide(write(3, 3))
    assert answer == bytes([0x86, 0x02])
    assert c.requests()[0]["rule.id"] == "no-writes"


def test_an_invalid_pdu_gets_its_exception_and_an_event() -> None:
    c = Conn("operator")
    _a, answer = c.decide(read(0, 0), tid=3)  # quantity 0
    assert answer == bytes([0x83, 0x03])
    [ev] = c.requests()
    assert ev["modbus.decision"] == "invalid" and ev["event.reason"] == "bad_quantity"
    assert ev["modbus.exception_code"] == 3 and ev["modbus.transaction_id"] == 3
    assert c.d.errors == 1
    assert c.metrics.count("mbsec_protocol_errors_total", reason="bad_quantity") == 1


def test_a_framing_error_is_logged_and_counted() -> None:
    c = Conn("operator")
    c.d.framing_error(RemoteProtocolError("MBAP protocol id 7 is not 0 (Modbus)",
                                          reason="bad_protocol_id"))
    [ev] = c.log.of("modbus-framing-error")
    assert ev["level"] == "warning" and ev["event.reason"] == "bad_protocol_id"
    assert c.d.errors == 1
    assert c.metrics.count("mbsec_protocol_errors_total", reason="bad_protocol_id") == 1


# -- monitor mode, rate limit ------------------------------------------------------------------


def test_monitor_mode_forwards_and_logs_would_deny() -> None:
    policy = TEST_POLICY.replace("default: deny\n", "default: deny\nmode: monitor\n")
    c = Conn(None, policy)  # no role: nothing allowed
    a, fwd = c.forward(read(0, 1))
    [ev] = c.requests()
    assert ev["modbus.decision"] == "would_deny" and ev["level"] == "warning"
    assert ev["event.outcome"] == "success"
    c.d.complete(a, fwd, reply_to(fwd, fc03_reply(0, 1)), None, c.now)
    assert c.requests()[-1]["modbus.decision"] == "would_deny"  # the forwarded line says so


def test_the_rate_limit_answers_busy_06() -> None:
    policy = TEST_POLICY + "limits:\n  default:\n    requests_per_second: 0.001\n    burst: 1\n"
    c = Conn("operator", policy)
    a, fwd = c.forward(read(0, 1), tid=1)
    c.d.complete(a, fwd, reply_to(fwd, fc03_reply(0, 1)), None, c.now)
    _a, answer = c.decide(read(0, 1), tid=2)
    assert answer == bytes([0x83, 0x06])
    [denied] = [e for e in c.requests() if e["modbus.decision"] == "rate_limited"]
    assert denied["modbus.exception_code"] == 6 and denied["modbus.transaction_id"] == 2
    assert denied["rule.id"] == "operator-read"


def test_the_rate_limit_slot_is_given_back_when_the_request_completes() -> None:
    policy = TEST_POLICY + "limits:\n  default:\n    max_in_flight: 1\n"
    c = Conn("operator", policy)
    a, fwd = c.forward(read(0, 1), tid=1)
    assert c.decide(read(0, 1), tid=2)[1] == bytes([0x83, 0x06])  # one in flight at most
    c.d.complete(a, fwd, None, TargetNoResponse("silent", reason="timeout"), c.now)
    a, fwd = c.forward(read(0, 1), tid=3)
    c.d.complete(a, fwd, reply_to(fwd, fc03_reply(0, 1)), None, c.now)
    c.forward(read(0, 1), tid=4)


# -- after the PLC --------------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "code"), [
    (PathUnavailable("no upstream target for unit id 7", reason="no_route"), 0x0A),
    (PathUnavailable("backoff", reason="backoff"), 0x0A),
    (TargetNoResponse("no reply within 2 s", reason="timeout"), 0x0B),
    (TargetNoResponse("connection reset", reason="upstream_reset"), 0x0B),
])
def test_an_upstream_error_maps_to_its_gateway_exception(error: Any, code: int) -> None:
    c = Conn("operator")
    a, fwd = c.forward(read(0, 1), tid=9)
    assert c.d.complete(a, fwd, None, error, c.now) == bytes([0x83, code])
    [ev] = c.requests()
    assert ev["event"] == "PLC did not answer" and ev["level"] == "warning"
    assert ev["event.reason"] == error.reason and ev["modbus.exception_code"] == code
    assert ev["modbus.decision"] == "allow" and ev["event.outcome"] == "failure"
    assert c.d.errors == 1 and c.d.allowed == 0
    assert c.metrics.count("mbsec_requests_total", decision="upstream_error") == 1


def test_a_request_withdrawn_before_it_was_sent_is_logged_as_such() -> None:
    c = Conn("engineer")
    a, fwd = c.forward(write(5, 1))
    error = TargetNoResponse("the client went away before the request was sent",
                             reason="client_gone")
    assert c.d.complete(a, fwd, None, error, c.now) == bytes([0x86, 0x0B])
    [ev] = c.requests()
    assert ev["event.reason"] == "client_gone" and "withdrawn" in ev["event"]


def test_a_reply_over_max_response_bytes_is_withheld_with_04() -> None:
    c = Conn("small")  # limited-read: max_response_bytes 10
    a, fwd = c.forward(read(0, 5), tid=4)
    big = fc03_reply(0, 5)  # 12 bytes
    assert c.d.complete(a, fwd, reply_to(fwd, big), None, c.now) == bytes([0x83, 0x04])
    [ev] = c.requests()
    assert ev["event.reason"] == "response_too_large" and ev["modbus.exception_code"] == 4
    assert (ev["mbsec.response_bytes"], ev["mbsec.max_response_bytes"]) == (12, 10)
    a, fwd = c.forward(read(0, 4), tid=5)
    fits = fc03_reply(0, 4)  # 10 bytes
    assert c.d.complete(a, fwd, reply_to(fwd, fits), None, c.now) == fits


def test_the_plcs_own_exception_is_passed_on_and_logged() -> None:
    c = Conn("operator")
    a, fwd = c.forward(read(0, 1))
    assert c.d.complete(a, fwd, reply_to(fwd, bytes([0x83, 0x02])), None, c.now) == \
        bytes([0x83, 0x02])
    assert c.requests()[0]["modbus.exception_code"] == 2


# -- the decision cache and reloads --------------------------------------------------------------


class CountingPolicy(Policy):
    """A real policy that counts its ``evaluate`` calls."""

    evaluated: list[tuple[int, int]]  # (unit, function code)

    def evaluate(self, principal: Any, unit_id: int, access: Any) -> Any:
        self.evaluated.append((unit_id, access.function_code))
        return super().evaluate(principal, unit_id, access)


def counting(policy: Policy) -> CountingPolicy:
    counted = CountingPolicy(**{f.name: getattr(policy, f.name)
                                for f in dataclasses.fields(policy) if f.init})
    counted.evaluated = []
    return counted


def test_repeated_reads_are_decided_once_per_policy_and_every_denial_is_logged() -> None:
    """A polled read is decided once per policy generation; writes are always decided; a
    denial is still answered and logged every time; a reload decides afresh."""
    base = load_policy_text(TEST_POLICY)
    first = counting(base)
    c = Conn("operator")
    c.current = state(first, limiter=RateLimiter(base))
    for tid in (1, 2, 3):
        c.forward(read(7, 2), tid=tid)
    assert first.evaluated == [(1, 3)]
    c.forward(read(7, 2), tid=4, unit=2)  # another unit is another decision
    for tid in (5, 6):
        assert c.decide(write(7, 9), tid=tid)[1] == bytes([0x86, 0x01])
    assert first.evaluated == [(1, 3), (2, 3), (1, 6), (1, 6)]
    # a reload (new generation) to a policy that denies everything: decided afresh
    deny_all = counting(load_policy_text("version: 1\ndefault: deny\nrules: []\n"))
    c.current = state(deny_all, generation=1, limiter=RateLimiter(deny_all))
    for tid in (7, 8):
        assert c.decide(read(7, 2), tid=tid)[1] == bytes([0x83, 0x01])
    assert deny_all.evaluated == [(1, 3)]
    assert len(first.evaluated) == 4
    denied = [e for e in c.requests() if e["modbus.decision"] == "deny"]
    assert [e["modbus.transaction_id"] for e in denied] == [5, 6, 7, 8]


def test_a_reload_rebinds_the_roles_of_an_open_connection() -> None:
    """The roles come from the policy's identities: mapping; a reload that withdraws the
    mapping takes the role away from the open connection on its next request."""
    mapped = TEST_POLICY.replace(
        "targets:\n",
        'identities:\n  - match: {subject_cn: "op-1"}\n    roles: [operator]\ntargets:\n', 1)
    c = Conn(None, mapped)  # the certificate has no role: only the mapping gives one
    c.forward(read(0, 1), tid=1)
    c.current = state(TEST_POLICY, generation=1)
    assert c.decide(read(0, 1), tid=2)[1] == bytes([0x83, 0x01])
    assert c.requests()[-1]["user.roles"] == []


# -- logging.on_sink_failure -------------------------------------------------------------------


def test_refuse_writes_refuses_writes_with_04_and_serves_reads_while_the_log_fails() -> None:
    c = Conn("engineer", audit_ok=False)  # the default: refuse_writes
    _a, answer = c.decide(write(5, 1), tid=1)
    assert answer == bytes([0x86, 0x04])
    [ev] = c.requests()
    assert ev["modbus.decision"] == "audit_unavailable"
    assert ev["event.reason"] == "audit_unavailable" and ev["modbus.exception_code"] == 4
    assert ev["rule.id"] == "engineer-rw"
    c.forward(read(5, 1), tid=2)
    c.sink.healthy = True  # the sink works again: writes go through
    c.forward(write(5, 1), tid=3)


def test_refuse_refuses_every_forwarded_request_while_the_log_fails() -> None:
    c = Conn("engineer", audit_ok=False, on_sink_failure="refuse")
    assert c.decide(read(5, 1), tid=1)[1] == bytes([0x83, 0x04])
    assert c.decide(write(5, 1), tid=2)[1] == bytes([0x86, 0x04])
    assert [e["event.reason"] for e in c.requests()] == ["audit_unavailable"] * 2


def test_serve_serves_everything_while_the_log_fails() -> None:
    c = Conn("engineer", audit_ok=False, on_sink_failure="serve")
    c.forward(read(5, 1), tid=1)
    c.forward(write(5, 1), tid=2)
    assert c.requests() == []


def test_a_denial_stays_a_denial_while_the_log_fails() -> None:
    c = Conn("operator", audit_ok=False)
    assert c.decide(write(5, 1))[1] == bytes([0x86, 0x01])  # the policy answers first


def test_a_write_refused_for_the_log_gives_its_rate_limit_slot_back() -> None:
    policy = TEST_POLICY + "limits:\n  default:\n    max_in_flight: 1\n"
    c = Conn("engineer", policy, audit_ok=False)
    for tid in (1, 2, 3):
        assert c.decide(write(5, 1), tid=tid)[1] == bytes([0x86, 0x04])
    c.sink.healthy = True
    c.forward(write(5, 1), tid=4)  # the refused ones hold no slot


def test_the_parsed_request_travels_with_the_forward() -> None:
    c = Conn("engineer")
    _a, fwd = c.forward(write(5, 1))
    assert fwd.request == parse_request(write(5, 1)) and fwd.access.is_write
    assert fwd.fname == "write_single_register"


# -- write freezes (mbsec ctl freeze, a flapping PLC link) ---------------------------------------


def test_a_frozen_target_refuses_writes_with_its_reason_and_serves_reads() -> None:
    """The freeze table is read per write (mbsec.nodestate.FreezeView): from the next request
    on, a write to a frozen target gets the configured exception and an event naming why;
    reads, and writes to other targets, go on; a thaw lets the next write through."""
    import dataclasses

    from mbsec.nodestate import ALL, AUTO, MANUAL, FreezeView, NodeState

    node = NodeState.memory()
    c = Conn("engineer")
    c.current = dataclasses.replace(c.current, freeze=FreezeView(node, {1: "plc", 2: "other"}),
                                    freeze_exception=4)
    c.forward(write(10, 5))
    node.set_freeze("plc", MANUAL)
    assert c.decide(write(10, 6), tid=2)[1] == bytes([0x86, 4])
    c.forward(read(10), tid=3)  # reads are served
    c.forward(write(10, 7), tid=4, unit=2)  # another target
    node.set_freeze("plc", AUTO, owner=0)
    node.clear_freeze("plc", MANUAL)
    assert c.decide(write(10, 8), tid=6)[1] == bytes([0x86, 4])
    node.clear_freeze("plc")
    c.forward(write(10, 9), tid=7)
    node.set_freeze(ALL, MANUAL)
    assert c.decide(write(10, 10), tid=8, unit=2)[1] == bytes([0x86, 4])
    refused = [e for e in c.requests() if e.get("modbus.decision") == "frozen"]
    assert [(e["modbus.transaction_id"], e["event.reason"]) for e in refused] == [
        (2, "writes_frozen"), (6, "link_flapping"), (8, "writes_frozen")]
    assert all(e["modbus.exception_code"] == 4 and e["level"] == "warning" for e in refused)
    assert c.metrics.count("mbsec_requests_total", decision="frozen",
                           function="write_single_register") == 3
