"""One TCP connection slot to a PLC, as state: no socket, no clock.

A link numbers its own requests (the client's transaction id never reaches the PLC), so a
reply can only ever complete the request that caused it. A request answered 0x0B keeps its
transaction id and its slot in ``overdue`` until its late reply arrives (and is dropped) or
``late_reply_wait`` passes: a PLC that serves one request at a time is still working on it,
and the next request sent on this link would wait behind it.
"""

from __future__ import annotations

from typing import Final

from mbsec.modbus.mbap import FrameBuffer
from mbsec.path.exchange import Exchange
from mbsec.path.plc import TargetNoResponse
from mbsec.path.timers import Timer

IDLE: Final = 0  # no socket (it may connect once the target's backoff, if any, has passed)
CONNECTING: Final = 1
OPEN: Final = 2

STATE_NAMES: Final = ("idle", "connecting", "open")


class Link:
    """State of one PLC connection slot; :class:`mbsec.path.target.Target` drives it."""

    __slots__ = ("connect_timer", "frames", "gen", "index", "next_tid", "out", "overdue",
                 "overdue_timer", "pending", "queued_bytes", "state", "sweep_timer", "target",
                 "written")

    def __init__(self, target: object, index: int) -> None:
        self.target = target  # the owning Target (typed loosely: no import cycle)
        self.index = index
        self.state = IDLE
        #: bumped on every reset: a driver report about an older socket is ignored
        self.gen = 0
        #: tid -> request on the wire, in send order (every request waits the same
        #: ``request_timeout``, so the first entry is always the next reply deadline)
        self.pending: dict[int, Exchange] = {}
        #: tid answered 0x0B -> its request (``deadline``: when the link stops waiting for the
        #: late reply)
        self.overdue: dict[int, Exchange] = {}
        self.next_tid = 1
        self.out = bytearray()  # ADUs for the driver to write, in order
        self.queued_bytes = 0  # bytes ever queued on this socket ...
        self.written = 0  # ... and taken by the kernel (an ADU is on the wire: written >= end)
        self.frames = FrameBuffer()
        self.connect_timer: Timer | None = None
        self.sweep_timer: Timer | None = None
        self.overdue_timer: Timer | None = None

    @property
    def busy(self) -> int:
        """Slots taken: requests on the wire and requests still owed a late reply."""
        return len(self.pending) + len(self.overdue)

    def allocate_tid(self) -> int:
        """Next 16-bit id neither in flight nor owed a late reply (at most ``depth`` are)."""
        tid = self.next_tid
        pending = self.pending
        overdue = self.overdue
        for _ in range(65536):
            if tid not in pending and tid not in overdue:
                break
            tid = (tid + 1) & 0xFFFF
        else:  # pragma: no cover - depth keeps far fewer than 65536 ids in use
            raise TargetNoResponse("no free transaction id", reason="tid_exhausted")
        self.next_tid = (tid + 1) & 0xFFFF
        return tid

    def wrote(self, n: int) -> None:
        """The driver wrote ``n`` bytes of :attr:`out` to the socket."""
        del self.out[:n]
        self.written += n

    def describe(self) -> str:
        return f"link {self.index} ({STATE_NAMES[self.state]})"
