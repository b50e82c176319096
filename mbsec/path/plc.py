"""What the request path knows about a PLC: its target settings, the errors a request can get
from it, a validated reply, and the check of a reply against the request that caused it.

No I/O. Shared by the core (:mod:`mbsec.path.target`) and the settings that build targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from mbsec.modbus._fast import fast_init
from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.mbap import Adu
from mbsec.modbus.pdu import ExceptionCode, ExceptionResponse, Request, Response, parse_response

RETIRE_GRACE = 1.0  # extra seconds a replaced target keeps serving its in-flight requests


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One PLC (or gateway), the unit ids routed to it and its availability rules.

    ``unit_rewrite`` maps the client's unit id to the PLC's; the reply must carry the
    rewritten unit and goes back to the client with its original one. The rules are explained
    in docs/config.md ("Availability rules").
    """

    name: str
    host: str
    port: int
    unit_ids: frozenset[int]
    unit_rewrite: Mapping[int, int] = field(default_factory=dict)
    pool_size: int = 2
    depth: int = 1
    connect_timeout: float = 3.0
    request_timeout: float = 2.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    #: a request answered 0x0B keeps its slot this long for its late reply, then the link resets
    late_reply_wait: float = 10.0
    #: resets no client is blamed for: this many within ``reset_window`` reconnect at once,
    #: more are throttled by the backoff
    resets_before_backoff: int = 3
    reset_window: float = 10.0
    #: a client charged with this many resets within ``breaker_window`` is refused (0x0A) by
    #: this target for ``breaker_hold`` seconds
    breaker_resets: int = 3
    breaker_window: float = 60.0
    breaker_hold: float = 30.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not in 1..65535")
        if not self.unit_ids:
            problems.append("no unit ids")
        for unit in self.unit_ids:
            if not 0 <= unit <= 255:
                problems.append(f"unit id {unit} is not in 0..255")
        for src, dst in self.unit_rewrite.items():
            if not (0 <= src <= 255 and 0 <= dst <= 255):
                problems.append(f"unit rewrite {src}->{dst} is outside 0..255")
        if self.pool_size < 1:
            problems.append("pool_size must be at least 1")
        if self.depth < 1:
            problems.append("depth must be at least 1")
        if self.connect_timeout <= 0 or self.request_timeout <= 0 or self.late_reply_wait <= 0:
            problems.append("timeouts must be positive")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            problems.append("backoff must satisfy 0 <= backoff_initial <= backoff_max")
        if self.resets_before_backoff < 0 or self.reset_window < 0:
            problems.append("resets_before_backoff and reset_window must not be negative")
        if self.breaker_resets < 1 or self.breaker_window < 0 or self.breaker_hold < 0:
            problems.append("breaker_resets must be at least 1, breaker_window and "
                            "breaker_hold not negative")
        if problems:
            raise ValueError(f"upstream target {self.name!r}: " + "; ".join(problems))
        # Freeze the mapping so a shared target cannot change under a running pool.
        object.__setattr__(self, "unit_ids", frozenset(self.unit_ids))
        object.__setattr__(self, "unit_rewrite", MappingProxyType(dict(self.unit_rewrite)))


def check_targets(targets: list[UpstreamTarget]) -> None:
    """Names unique, every unit id routed to one target; ``ValueError`` otherwise."""
    names: set[str] = set()
    owner: dict[int, str] = {}
    for t in targets:
        if t.name in names:
            raise ValueError(f"duplicate upstream target name {t.name!r}")
        names.add(t.name)
        for unit in t.unit_ids:
            if unit in owner:
                raise ValueError(
                    f"unit id {unit} is routed to both {owner[unit]!r} and {t.name!r}")
            owner[unit] = t.name


class UpstreamError(Exception):
    """A request could not be answered by its PLC; ``exception_code`` goes back to the client."""

    exception_code: int = int(ExceptionCode.GATEWAY_PATH_UNAVAILABLE)

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class PathUnavailable(UpstreamError):
    """Exception 0x0A: no target for the unit id, or no link to its PLC can be had."""

    exception_code = int(ExceptionCode.GATEWAY_PATH_UNAVAILABLE)


class TargetNoResponse(UpstreamError):
    """Exception 0x0B: the request was sent (or waited) but no valid answer came in time."""

    exception_code = int(ExceptionCode.GATEWAY_TARGET_NO_RESPONSE)


@fast_init
@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A validated reply: the PDU as the PLC sent it and its parsed form."""

    pdu: bytes
    response: Response | ExceptionResponse
    target: str


class ReplyProblem(Exception):
    """A reply that matches its tid but not its request: the link is reset."""

    def __init__(self, reason: str, message: str, detail: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail  # for the request's own error


def check_reply(adu: Adu, unit_id: int, request: Request, target: str) -> UpstreamReply:
    """Validate a reply against the request that sent its tid (unit, function, body)."""
    if adu.unit_id != unit_id:
        raise ReplyProblem(
            "wrong_unit",
            f"reply to tid {adu.transaction_id} from unit {adu.unit_id}, expected {unit_id}",
            f"reply from unit {adu.unit_id}",
        )
    try:
        response = parse_response(request, adu.pdu)
    except ProtocolError as exc:
        raise ReplyProblem(
            "bad_reply",
            f"reply to tid {adu.transaction_id} does not match its request: {exc.message}",
            exc.message,
        ) from None
    return UpstreamReply(adu.pdu, response, target)


def reset_error(target: str, reason: str, message: str) -> TargetNoResponse:
    """What the requests on a reset link get (0x0B)."""
    lost = reason in ("connection_lost", "eof")
    return TargetNoResponse(f"upstream {target} connection reset: {message}",
                            reason="connection_lost" if lost else "upstream_reset")
