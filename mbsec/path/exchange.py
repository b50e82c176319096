"""One request on its way from a client connection to a PLC and back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from mbsec.modbus.mbap import Adu

if TYPE_CHECKING:
    from mbsec.path.plc import UpstreamError, UpstreamReply

WAITING: Final = 0  # queued at its target for a link slot
SENT: Final = 1  # written (or being written) on a link
DONE: Final = 2  # has its outcome; never sent again


class Exchange:
    """A forwarded request. The target sends it at most once and gives it exactly one outcome
    (``reply`` or ``error``), then puts it on the router's ``done`` queue for its client."""

    __slots__ = ("adu", "client", "deadline", "end", "error", "fwd", "link", "pinned",
                 "plc_unit", "reply", "sent", "state", "tid")

    def __init__(self, client: Any, adu: Adu, fwd: Any) -> None:
        self.client = client  # the ClientConn (or a test's stand-in) that gets the outcome
        self.adu = adu  # the client's request (its tid, unit and PDU)
        self.fwd = fwd  # the decision that let it through (parsed request, rule, t0)
        self.state = WAITING
        self.plc_unit = adu.unit_id
        self.tid = -1
        self.sent = 0.0
        self.deadline = 0.0  # while WAITING: when it gives up waiting for a slot
        self.end = 0  # byte offset on its link where its ADU ends
        self.link: Any = None
        self.pinned = False  # counts in its client's pin on ``link`` (see Target.place)
        self.reply: UpstreamReply | None = None
        self.error: UpstreamError | None = None
