"""The policy side of one client connection: parse, decide, rate-limit, check the reply, log.

Called by the client core (:class:`mbsec.path.client.ClientConn`) for each request: no I/O
but the event it logs, no clock (``now`` comes from the driver). The policy decision itself is
pure (:mod:`mbsec.policy`); this adds the per-connection state around it: the principal (rebuilt
when a reload changes the policy), a cache of decisions for requests that write nothing, the
counters of the close line, and the rule for a log that cannot be written:

``logging.on_sink_failure`` (docs/config.md): when no sink can take events (a full disk, a
dead syslog), ``refuse_writes`` (the default) answers writes with exception 04 and still serves
reads, ``refuse`` answers every forwarded request with 04, ``serve`` serves all. The process
never stops over a sink, and the failure raises an alarm (``log-sink-failed`` on stderr and
``mbsec_log_sink_failures_total``). Why refuse writes by default: an unaudited write can move
equipment with no trace, while a read keeps the operators' screens alive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, final

from mypy_extensions import mypyc_attr

# Everything imported at run time, nothing under TYPE_CHECKING: mypyc (setup.py) compiles this
# module, and its dataclasses need their annotations' classes when the module is loaded.
from mbsec import events
from mbsec.audit_fast import EventWriter, event_writer
from mbsec.identity import PeerIdentity
from mbsec.metrics import counter
from mbsec.modbus.access import Access
from mbsec.modbus.errors import Action, RemoteProtocolError
from mbsec.modbus.mbap import Adu
from mbsec.modbus.pdu import (
    FUNCTION_NAMES,
    ExceptionCode,
    Request,
    exception_pdu,
    parse_request,
)
from mbsec.nodestate import FreezeView, SharedRateLimiter
from mbsec.path.plc import UpstreamError, UpstreamReply
from mbsec.policy.engine import Decision, Policy, Principal
from mbsec.policy.ratelimit import RateLimiter
from mbsec.role_labels import role_labels
from mbsec.tls import TlsMaterial

DECIDED_MAX: Final = 64  # decisions remembered per connection (read requests only)
RATE_LIMIT_EXCEPTION: Final = int(ExceptionCode.SERVER_DEVICE_BUSY)
RESPONSE_LIMIT_EXCEPTION: Final = int(ExceptionCode.SERVER_DEVICE_FAILURE)
AUDIT_EXCEPTION: Final = int(ExceptionCode.SERVER_DEVICE_FAILURE)


@dataclass(frozen=True, slots=True)
class ProxyState:
    """Everything a reload replaces, swapped as one object: TLS material, policy, rate limiter.

    A connection takes the state once per request, so a request is decided entirely by the old
    or entirely by the new policy, and a rate-limit slot is released on the limiter that
    granted it.
    """

    tls: TlsMaterial
    policy: Policy
    limiter: RateLimiter | SharedRateLimiter
    generation: int = 0
    #: which targets' writes are frozen (``mbsec ctl freeze``, automatic on a flapping
    #: link; mbsec.nodestate), and the exception a frozen write gets (``admin.freeze_exception``)
    freeze: FreezeView | None = None
    freeze_exception: int = 1


@final
class StateCell:
    """The state requests are decided by, swapped in place by the proxy on a reload
    (:meth:`mbsec.server.Proxy.reload`). The data plane reads ``current`` once per request:
    a native attribute read, where a ``lambda: proxy.decision_state`` was a Python frame per
    request (issue 14)."""

    __slots__ = ("current",)

    def __init__(self, current: ProxyState) -> None:
        self.current = current


@final
class Forward:
    """An allowed request on its way to the PLC: what :meth:`Decisions.complete` needs after.

    A plain record with a written-out ``__init__``, not a frozen dataclass: one is made per
    forwarded request, and mypyc compiles this ``__init__`` while a dataclass's generated one
    stays interpreted (a Python frame and a ``object.__setattr__`` per field). Nothing changes
    a Forward once made.
    """

    __slots__ = ("access", "decision", "fname", "limiter", "principal", "request", "t0")

    def __init__(self, request: Request, access: Access, decision: Decision,
                 principal: Principal, limiter: RateLimiter | SharedRateLimiter, fname: str,
                 t0: float) -> None:
        self.request = request
        self.access = access
        self.decision = decision
        self.principal = principal
        self.limiter = limiter
        self.fname = fname
        self.t0 = t0


#: function codes that change nothing in the PLC (43 only with MEI type 14, read device
#: identification); ``on_sink_failure = "refuse_writes"`` refuses everything else (writes,
#: FC08 diagnostics such as restart, vendor codes) while no sink takes events
READ_FUNCTIONS: Final = frozenset({1, 2, 3, 4, 7, 11, 12, 17, 20, 24})


def reads_only(pdu: bytes) -> bool:
    fc = pdu[0] if pdu else 0
    return fc in READ_FUNCTIONS or (fc == 43 and len(pdu) > 1 and pdu[1] == 14)


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it to inject a bug
class Decisions:
    """Decide and complete the requests of one authenticated connection."""

    def __init__(
        self,
        *,
        state: Callable[[], ProxyState] | StateCell,
        identity: PeerIdentity,
        peer_ip: str,
        log: Any,
        metrics: Any,
        allowed_requests: str = "debug",
        sink: Any = None,
        on_sink_failure: str = "refuse_writes",
    ) -> None:
        #: the proxy's cell (read per request), or a function for tests and library use
        self.state_cell: StateCell | None = state if isinstance(state, StateCell) else None
        self.state_fn: Callable[[], ProxyState] | None = (
            None if isinstance(state, StateCell) else state)
        self.identity = identity
        self.peer_ip = peer_ip
        self.blame_key = identity.fingerprint_sha256
        self.metrics = metrics
        #: the logger's sinks (audit.SinkLogger): ``healthy`` False while none takes events
        self.sink = sink
        self.on_sink_failure = on_sink_failure
        self.allowed_level = allowed_requests
        self.log: Any = log
        self.log_allowed: Callable[..., Any] | None = None
        #: the same event rendered from this connection's templates (mbsec.audit_fast)
        self.write_allowed: EventWriter | None = None
        self.set_log(log)
        self._allowed_cells: dict[str, Any] = {}
        #: ``mbsec_role_requests_total`` series by decision, one per role label of the
        #: principal (mbsec/role_labels.py bounds the labels); rebuilt with the principal
        self._role_labels: tuple[str, ...] = ()
        self._role_cells: dict[str, list[Any]] = {}
        #: (unit id, request PDU) -> (request, access, decision) for requests that write
        #: nothing: an HMI polls the same blocks all day, and the decision is a pure function
        #: of the principal, the unit and the PDU under one policy (cleared when it changes)
        self._decided: dict[tuple[int, bytes], tuple[Request, Access, Decision]] = {}
        self._principal: Principal | None = None
        self._principal_generation = -1
        self.close_reason = "unknown"
        self.now = 0.0
        # counters for the canonical close line
        self.requests = 0
        self.allowed = 0
        self.denied = 0
        self.errors = 0

    def set_log(self, log: Any) -> None:
        self.log = log
        self.log_allowed = None
        if self.allowed_level == "info":
            self.log_allowed = log.info
        elif self.allowed_level == "debug" and log.is_enabled_for(10):
            self.log_allowed = log.debug
        self.write_allowed = (event_writer(log, self.allowed_level)
                              if self.log_allowed is not None else None)

    def _rebind_principal(self, state: ProxyState) -> None:
        self._principal = state.policy.principal(self.identity, self.peer_ip)
        self._principal_generation = state.generation
        self._decided.clear()  # decided by the old policy
        roles = list(getattr(self._principal, "roles", ()) or ())
        self._role_labels = role_labels(state.policy, roles)
        self._role_cells = {}
        self.set_log(self.log.bind(**events.roles_context(roles)))

    def framing_error(self, exc: RemoteProtocolError) -> None:
        self.errors += 1
        self.metrics.inc("mbsec_protocol_errors_total", reason=exc.reason)
        events.emit(self.log, events.modbus_framing_error(exc.reason, exc.message))

    def decide(self, adu: Adu, t0: float) -> bytes | Forward | None:
        """Everything before the PLC: parse, policy, rate limit, the sink rule. Returns the
        answer PDU when the request goes no further, a :class:`Forward` when it goes to the
        PLC, or None when it broke the connection (logged, ``close_reason`` set)."""
        self.now = t0
        self.requests += 1
        pdu = adu.pdu
        fc = pdu[0] if pdu else 0
        cell = self.state_cell
        if cell is not None:
            state = cell.current
        else:
            fn = self.state_fn
            assert fn is not None
            state = fn()
        if state.generation != self._principal_generation:
            self._rebind_principal(state)  # a reload: roles come from the new policy's mapping
        key = (adu.unit_id, pdu)
        hit = self._decided.get(key)
        if hit is not None:
            request, access, decision = hit
        else:
            try:
                request = parse_request(pdu)
            except RemoteProtocolError as exc:
                return self._invalid(adu, fc, t0, exc)
            principal = self._principal
            assert principal is not None
            access = request.access()
            decision = state.policy.evaluate(principal, adu.unit_id, access)
            if access.write is None and len(self._decided) < DECIDED_MAX:
                self._decided[key] = (request, access, decision)
        principal = self._principal
        assert principal is not None
        fname = FUNCTION_NAMES.get(fc) or str(fc)
        tid = adu.transaction_id
        if not decision.allowed:
            return self._deny(events.modbus_request_denied(
                tid, adu.unit_id, fc, access, 0.0, decision.rule_id, decision.reason,
                decision.exception_code), fc, decision.exception_code, "deny")
        if decision.outcome == "would_deny":
            events.emit(self.log, events.modbus_request_would_deny(
                tid, adu.unit_id, fc, access, 0.0, decision.rule_id, decision.reason))
        freeze = state.freeze
        if freeze is not None and not reads_only(pdu):
            frozen = freeze.frozen(adu.unit_id)
            if frozen is not None:  # reads go on; the connection stays
                code = state.freeze_exception
                reason = "writes_frozen" if frozen.flags & 1 else "link_flapping"
                return self._deny(events.modbus_request_denied(
                    tid, adu.unit_id, fc, access, 0.0, decision.rule_id, reason, code,
                    "frozen"), fc, code, "frozen")
        limiter = state.limiter
        limited = limiter.acquire(principal, access)
        if limited is not None:
            return self._deny(events.modbus_request_denied(
                tid, adu.unit_id, fc, access, 0.0, decision.rule_id, limited,
                RATE_LIMIT_EXCEPTION, "rate_limited"), fc, RATE_LIMIT_EXCEPTION, "rate_limited")
        sink = self.sink
        if sink is not None and not sink.healthy and (
            self.on_sink_failure == "refuse"
            or (self.on_sink_failure == "refuse_writes" and not reads_only(pdu))
        ):
            limiter.release(principal)
            return self._deny(events.modbus_request_audit_unavailable(
                tid, adu.unit_id, fc, access, 0.0, decision.rule_id), fc, AUDIT_EXCEPTION,
                "audit_unavailable")
        return Forward(request, access, decision, principal, limiter, fname, t0)

    def _invalid(self, adu: Adu, fc: int, t0: float, exc: RemoteProtocolError) -> bytes | None:
        if exc.action is Action.CLOSE or exc.exception_code is None:
            self.framing_error(exc)
            self.close_reason = exc.reason
            return None
        self.errors += 1
        self.metrics.inc("mbsec_protocol_errors_total", reason=exc.reason)
        events.emit(self.log, events.modbus_request_invalid(
            adu.transaction_id, adu.unit_id, fc, 0.0, exc.reason, exc.exception_code,
            exc.message))
        return exception_pdu(fc & 0x7F, exc.exception_code)

    def complete(
        self, adu: Adu, fwd: Forward, reply: UpstreamReply | None, error: UpstreamError | None,
        now: float, delivered: bool = True, close_reason: str = "",
    ) -> bytes:
        """Everything after the PLC: map a failure, check the reply against the rule's limits,
        log; returns the PDU for the client. ``delivered`` False: the connection closed
        (``close_reason``) before the reply could be sent, and the event says so."""
        self.now = now
        fwd.limiter.release(fwd.principal)
        fc = adu.pdu[0]
        fname = fwd.fname
        access = fwd.access
        decision = fwd.decision
        took = now - fwd.t0
        if not delivered and not (error is not None and error.reason == "client_gone"):
            # (a withdrawn request, never sent, keeps its own event below)
            if error is None:
                self.allowed += 1  # the PLC executed it: allowed, only the reply was lost
            else:
                self.errors += 1
            self.metrics.inc("mbsec_requests_total", decision="unanswered", function=fname)
            events.emit(self.log, events.modbus_request_unanswered(
                adu.transaction_id, adu.unit_id, fc, access, took, decision.rule_id,
                close_reason or "unknown", error.reason if error is not None else "reply"))
            return b""
        if error is not None or reply is None:
            assert error is not None
            self.errors += 1
            self.metrics.inc("mbsec_requests_total", decision="upstream_error", function=fname)
            self._count_role("upstream_error")
            events.emit(self.log, events.modbus_request_failed(
                adu.transaction_id, adu.unit_id, fc, access, took, decision.rule_id,
                error.reason, error.exception_code, error.message))
            return exception_pdu(fc, error.exception_code)
        limit = decision.max_response_bytes
        if limit is not None and len(reply.pdu) > limit:
            self.errors += 1
            self.metrics.inc("mbsec_requests_total", decision="response_too_large", function=fname)
            self._count_role("response_too_large")
            events.emit(self.log, events.modbus_request_response_too_large(
                adu.transaction_id, adu.unit_id, fc, access, took, decision.rule_id,
                len(reply.pdu), limit))
            return exception_pdu(fc, RESPONSE_LIMIT_EXCEPTION)
        self.allowed += 1
        cell = self._allowed_cells.get(fname)
        if cell is None:
            cell = self._allowed_cells[fname] = counter(
                self.metrics, "mbsec_requests_total", decision="allow", function=fname)
        cell.value += 1
        self._count_role("allow")
        log_allowed = self.log_allowed
        if log_allowed is not None:
            # a normal FC03/04 reply is checked, not parsed (``response`` None): asking None
            # for the attribute raised and caught an AttributeError per logged request
            response = reply.response
            code = None if response is None else getattr(response, "exception_code", None)
            writer = self.write_allowed
            if writer is not None:  # the same line, from this connection's templates
                writer.allowed(
                    adu.transaction_id, adu.unit_id, fc, access, took, decision.rule_id,
                    decision.outcome, reply.target, code)
            else:
                ev = events.modbus_request_allowed(
                    adu.transaction_id, adu.unit_id, fc, access, took, decision.rule_id,
                    decision.outcome, reply.target, code)
                log_allowed(ev.message, **ev.fields)
        return reply.pdu

    def _deny(self, event: events.Event, fc: int, code: int, decision: str) -> bytes:
        self.denied += 1
        self.metrics.inc(
            "mbsec_requests_total", decision=decision, function=FUNCTION_NAMES.get(fc, str(fc)))
        self._count_role(decision)
        events.emit(self.log, event)
        return exception_pdu(fc, code)

    def _count_role(self, decision: str) -> None:
        """``mbsec_role_requests_total``: once under each role label of the principal."""
        cells = self._role_cells.get(decision)
        if cells is None:
            cells = self._role_cells[decision] = [
                counter(self.metrics, "mbsec_role_requests_total", role=r, decision=decision)
                for r in self._role_labels]
        for c in cells:
            c.value += 1
