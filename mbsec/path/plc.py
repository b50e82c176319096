"""What the request path knows about a PLC: its target settings, the errors a request can get
from it, a validated reply, and the check of a reply against the request that caused it.

No I/O. Shared by the core (:mod:`mbsec.path.target`) and the settings that build targets
(:class:`UpstreamTarget` lives in :mod:`mbsec.path.plc_target`, re-exported here).
"""

from __future__ import annotations

from typing import Final, final

from mypy_extensions import mypyc_attr

from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.mbap import Adu
from mbsec.modbus.pdu import ExceptionCode, ExceptionResponse, Request, Response, check_response
from mbsec.path.plc_target import UpstreamTarget, check_targets

__all__ = [
    "RETIRE_GRACE",
    "PathUnavailable",
    "ReplyProblem",
    "TargetNoResponse",
    "UpstreamError",
    "UpstreamReply",
    "UpstreamTarget",
    "check_reply",
    "check_targets",
    "reset_error",
]

RETIRE_GRACE: Final = 1.0  # extra seconds a replaced target keeps serving its in-flight requests


# The errors stay plain Python classes under mypyc: each subclass overrides the class
# attribute ``exception_code``, which native classes refuse. They are raised per failure,
# never per served request.
@mypyc_attr(native_class=False)
class UpstreamError(Exception):
    """A request could not be answered by its PLC; ``exception_code`` goes back to the client."""

    exception_code: int = int(ExceptionCode.GATEWAY_PATH_UNAVAILABLE)

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@mypyc_attr(native_class=False)
class PathUnavailable(UpstreamError):
    """Exception 0x0A: no target for the unit id, or no link to its PLC can be had."""

    exception_code = int(ExceptionCode.GATEWAY_PATH_UNAVAILABLE)


@mypyc_attr(native_class=False)
class TargetNoResponse(UpstreamError):
    """Exception 0x0B: the request was sent (or waited) but no valid answer came in time."""

    exception_code = int(ExceptionCode.GATEWAY_TARGET_NO_RESPONSE)


@final
class UpstreamReply:
    """A validated reply: the PDU as the PLC sent it and its parsed form (None for a normal
    reply to a register read: checked, not decoded, :func:`mbsec.modbus.pdu.check_response`).

    A plain record with a written-out ``__init__`` (one per reply; mypyc compiles it, where a
    dataclass's generated ``__init__`` stays interpreted). Nothing changes it once made.
    """

    __slots__ = ("pdu", "response", "target")

    def __init__(self, pdu: bytes, response: Response | ExceptionResponse | None,
                 target: str) -> None:
        self.pdu = pdu
        self.response = response
        self.target = target


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
        response = check_response(request, adu.pdu)
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
