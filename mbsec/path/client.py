"""One authenticated client connection as a state machine: framing, pipelining, deadlines,
reply order, drain. Plaintext in (the driver runs TLS), reply ADUs out, no socket, no clock.

Driver contract (what :mod:`mbsec.path.epoll` does):

* ciphertext arrived: :meth:`ClientConn.raw_received`; each decrypted chunk:
  :meth:`ClientConn.receive`; then :meth:`ClientConn.settled` with whether a TLS record is
  still partial; the peer closed or broke: :meth:`ClientConn.receive_eof`;
* a request finished at its PLC: :meth:`ClientConn.finished`;
* after writing :attr:`ClientConn.replies` (in order, several may share a TLS record):
  :meth:`ClientConn.flushed` with whether the socket took everything;
* read from the socket only while :attr:`ClientConn.wants_read`; once :attr:`closing` stop
  all I/O (after one last try at the replies already made), and hand the connection back to
  the control plane once :attr:`ClientConn.released`.

Deadlines, all from the ``now`` the driver passes:

* ``request_complete_timeout``: a request must be complete within it, counted from the first
  byte (TLS record bytes count) that arrived after the previous request was complete: a client
  trickling a request byte by byte, or stopping half way, is closed (``request_incomplete``);
* ``idle_timeout``: no byte at all for that long and nothing in flight (``idle_timeout``);
* the stall limit (``idle_timeout`` too): a client that stops taking its replies
  (``client_stalled``): replies never pile up beyond what ``max_pipelined`` requests make.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from mypy_extensions import mypyc_attr

from mbsec.modbus.errors import RemoteProtocolError
from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu
from mbsec.path.exchange import Exchange
from mbsec.path.timers import Timer, Timers

if TYPE_CHECKING:
    from mbsec.path.plc import UpstreamError, UpstreamReply
    from mbsec.path.router import Router


class Decider(Protocol):
    """The policy side of a connection (:class:`mbsec.path.decide.Decisions`)."""

    blame_key: str
    close_reason: str  # why a request broke the connection (decide returned None)

    def decide(self, adu: Adu, now: float) -> bytes | Any | None: ...

    def complete(self, adu: Adu, fwd: Any, reply: UpstreamReply | None,
                 error: UpstreamError | None, now: float, delivered: bool = True,
                 close_reason: str = "") -> bytes: ...

    def framing_error(self, exc: RemoteProtocolError) -> None: ...



@mypyc_attr(allow_interpreted_subclasses=True)  # tests put old faults back
class ClientConn:
    """The request path of one client connection after its handshake."""

    def __init__(self, decider: Decider, router: Router, *, max_pipelined: int,
                 idle_timeout: float, request_complete_timeout: float, now: float) -> None:
        self.decider = decider
        self.blame_key = decider.blame_key
        self.router = router
        self.timers: Timers = router.timers
        self.max = max_pipelined
        self.idle = idle_timeout
        self.complete_timeout = request_complete_timeout
        self.frames = FrameBuffer()
        #: reply ADUs made and not yet taken by the driver, in completion order
        self.replies: list[bytes] = []
        self.inflight = 0
        self.reading = True  # the peer may still send and requests are still taken
        self.blocked = False  # the socket toward the client is full
        self.closing = False  # no more socket I/O
        self.released = False  # closing, nothing in flight: the control plane takes it back
        self.broken = False  # no clean TLS close can follow
        self.close_reason = "unknown"
        self.bytes_in = 0
        self.bytes_out = 0
        #: request latency (complete request to its reply made), the metrics' histogram
        self.observe: Callable[[float], None] = router.outbox.observer("mbsec_request_seconds")
        self.queued = False  # in the outbox's dirty list
        #: the driver's handle for this connection (opaque to the core; the driver sets it
        #: back to None when it hands the connection back, so the two are no cycle)
        self.io: Any = None
        self._pumping = False
        self._more = False  # buffered requests left because replies waited to be written
        self.last_rx = now
        self.partial_since = -1.0  # first byte of the request still arriving (-1: none)
        self._idle_timer: Timer | None = self.timers.at(now + idle_timeout, self._idle_check)
        self._complete_timer: Timer | None = None
        self._stall_timer: Timer | None = None

    @property
    def wants_read(self) -> bool:
        return (self.reading and self.inflight < self.max and not self.blocked
                and not self._more)

    def note_close_reason(self, reason: str) -> None:
        """The first reason wins: it is the cause, later ones are consequences."""
        if self.close_reason == "unknown":
            self.close_reason = reason

    # -- input ------------------------------------------------------------------------------

    def raw_received(self, now: float) -> None:
        """Bytes (ciphertext) arrived on the socket."""
        self.last_rx = now
        if self.partial_since < 0:
            self.partial_since = now

    def receive(self, data: bytes, now: float) -> None:
        """Decrypted bytes from the client."""
        if not self.reading:
            return
        self.bytes_in += len(data)
        try:
            self.frames.receive_data(data)
        except RemoteProtocolError as exc:
            self.decider.framing_error(exc)
            self._close(exc.reason)
            return
        self.pump(now)

    def settled(self, tls_partial: bool, now: float) -> None:
        """The driver read what there was: arm the request-completion deadline while part of
        a request (or of a TLS record) is buffered, drop it once nothing is."""
        if self.closing or not self.reading:
            return
        if tls_partial or self.frames.incomplete():
            if self._complete_timer is None:
                since = self.partial_since if self.partial_since >= 0 else now
                self._complete_timer = self.timers.at(since + self.complete_timeout,
                                                      self._incomplete)
        else:
            self.partial_since = -1.0
            if self._complete_timer is not None:
                self._complete_timer.cancel()
                self._complete_timer = None

    def receive_eof(self, reason: str, now: float, *, broken: bool = False) -> None:
        """The peer closed (``client_closed``) or the stream broke (``client_reset``)."""
        if self.closing:
            return
        self.broken = self.broken or broken
        self.note_close_reason(reason)
        self.reading = False
        self._drop_request_deadline()
        self._maybe_close()
        self.mark_dirty()

    def pump(self, now: float) -> None:
        """Start buffered requests while a pipelining slot is free and the client takes its
        replies (``max_pipelined`` replies at most wait to be written)."""
        if self._pumping:
            return  # re-entered from a request that finished at once: the outer loop goes on
        self._pumping = True
        self._more = False
        frames = self.frames
        decider = self.decider
        router = self.router
        completed = False
        try:
            while self.reading and not self.closing and self.inflight < self.max:
                if self.blocked or len(self.replies) + self.inflight >= self.max:
                    self._more = frames.buffered > 0  # resumes after the driver wrote them
                    break
                try:
                    adu = frames.next_frame()
                except RemoteProtocolError as exc:
                    decider.framing_error(exc)
                    self._close(exc.reason)
                    return
                if adu is None:
                    break
                completed = True
                self.inflight += 1
                try:
                    result = decider.decide(adu, now)
                except BaseException:
                    self.inflight -= 1
                    raise
                if result is None:  # the request broke the connection (logged)
                    self.inflight -= 1
                    self._close(decider.close_reason)
                    return
                if type(result) is bytes:
                    self.inflight -= 1
                    self._reply(adu, result, now, now)
                else:
                    router.submit(Exchange(self, adu, result), now)
        finally:
            self._pumping = False
        if completed and self.partial_since >= 0:
            # what is still buffered arrived after the request that just completed
            self.partial_since = now
            if self._complete_timer is not None:
                self._complete_timer.cancel()
                self._complete_timer = None
        if (completed and self._complete_timer is None and self.reading and not self.closing
                and self.frames.incomplete()):
            # the part of a request left behind a pipelined burst: its deadline runs from
            # when the request before it was taken
            self.partial_since = now
            self._complete_timer = self.timers.at(now + self.complete_timeout, self._incomplete)
        self.mark_dirty()

    def finished(self, ex: Exchange, now: float) -> None:
        """A forwarded request has its outcome (from the router's ``done`` queue)."""
        self.inflight -= 1
        if self.closing:  # nobody takes the reply, but what reached the PLC is audited,
            # and its event says the client got nothing (the drain deadline, a reset...)
            self.decider.complete(ex.adu, ex.fwd, ex.reply, ex.error, now, False,
                                  self.close_reason)
            self._maybe_release()
            return
        pdu = self.decider.complete(ex.adu, ex.fwd, ex.reply, ex.error, now)
        self._reply(ex.adu, pdu, ex.fwd.t0, now)
        if self.reading:
            self.pump(now)
        else:
            self._maybe_close()
            self.mark_dirty()

    def _reply(self, adu: Adu, pdu: bytes, t0: float, now: float) -> None:
        data = encode_adu(adu.transaction_id, adu.unit_id, pdu)
        self.replies.append(data)
        self.bytes_out += len(data)
        self.observe(now - t0)
        self.mark_dirty()

    def flushed(self, all_written: bool, now: float) -> None:
        """The driver wrote the replies; ``all_written`` False: the socket is full."""
        if all_written:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            was_blocked = self.blocked
            self.blocked = False
            if (was_blocked or self._more) and self.reading:
                self.pump(now)
            self._maybe_close()
        elif not self.blocked:
            self.blocked = True
            # a client that stops reading must not hold its replies' slots forever
            self._stall_timer = self.timers.at(now + self.idle, self._stalled)

    # -- close ------------------------------------------------------------------------------

    def stop_reading(self, reason: str) -> None:
        """Drain: take no new requests; those in flight still get their replies."""
        if self.closing:
            return
        self.note_close_reason(reason)
        self.reading = False
        self.frames = FrameBuffer()  # requests not yet started are dropped
        self._drop_request_deadline()
        self._maybe_close()
        self.mark_dirty()

    def abort(self, reason: str) -> None:
        """Close now; replies of requests still in flight are not sent."""
        self.broken = True
        self._close(reason)

    def _maybe_close(self) -> None:
        if not self.reading and self.inflight == 0 and not self.closing and not self.blocked:
            self._close(self.close_reason)

    def _close(self, reason: str) -> None:
        if self.closing:
            return
        self.note_close_reason(reason)
        self.closing = True
        self.reading = False
        for timer in (self._idle_timer, self._complete_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._idle_timer = self._complete_timer = self._stall_timer = None
        if self.inflight:
            self.router.withdraw(self)  # waiting ones come back through ``done``
        self._maybe_release()
        self.mark_dirty()

    def _maybe_release(self) -> None:
        if self.closing and self.inflight <= 0 and not self.released:
            self.released = True
            self.mark_dirty()

    def mark_dirty(self) -> None:
        """Ask the driver to come back to this connection (replies, close, reading)."""
        if not self.queued:
            self.queued = True
            self.router.outbox.clients.append(self)

    def _drop_request_deadline(self) -> None:
        self.partial_since = -1.0
        if self._complete_timer is not None:
            self._complete_timer.cancel()
            self._complete_timer = None

    # -- deadlines --------------------------------------------------------------------------

    def _incomplete(self, now: float) -> None:
        self._complete_timer = None
        if self.reading and not self.closing:
            self.decider.framing_error(RemoteProtocolError(
                f"request not complete within {self.complete_timeout:g} s of its first byte",
                reason="request_incomplete"))
            self.broken = True
            self._close("request_incomplete")

    def _stalled(self, now: float) -> None:
        self._stall_timer = None
        if self.blocked and not self.closing:
            self.broken = True
            self._close("client_stalled")

    def _idle_check(self, now: float) -> None:
        self._idle_timer = None
        if self.closing or not self.reading:
            return
        due = self.last_rx + self.idle
        if now >= due:
            if self.inflight or self.replies or self.blocked:
                self.last_rx = now  # in flight, or replies not taken: a new full period
            else:
                self.stop_reading("idle_timeout")
                return
        self._idle_timer = self.timers.at(self.last_rx + self.idle, self._idle_check)
