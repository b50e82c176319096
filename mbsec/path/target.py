"""One PLC as a state machine: its links, slots, reply deadlines, resets, reconnects, fairness.

Inputs carry ``now`` (:meth:`Target.submit`, :meth:`Target.connected`, :meth:`Target.receive`,
...); outputs go to the shared :class:`~mbsec.path.router.Outbox`: ADUs to write (``link.out``
plus the ``dirty`` list), sockets to open or close (``actions``) and finished requests
(``done``). No socket, no clock, no thread: the driver moves the bytes.

The availability rules (docs/config.md, "Availability rules"), each in one place here:

* A reset caused by the PLC's reply (unknown transaction id, wrong unit or function, bad
  length, EOF on a link that was working) reconnects at once. Backoff throttles connect
  attempts that fail, and resets nobody is blamed for once more than
  ``resets_before_backoff`` happen within ``reset_window``; never a first reconnect. The
  backoff is the target's (its links share one host), not one link's.
* A request waits for a link within its deadline (``request_timeout``) while links connect;
  0x0A at once only when no link can be had (none open or connecting, and in backoff).
* A request answered 0x0B keeps its slot (``Link.overdue``) until its late reply arrives and
  is dropped, or ``late_reply_wait`` passes and the link is reset. New requests go to links
  with nothing overdue first.
* Clients with waiting requests are served in turn (:class:`~mbsec.path.fair.WaitQueue`). A
  client's requests travel on one link at a time (``pins``), so they reach the PLC in the
  order it sent them; a write answered 0x0B keeps its client there until it is settled, a
  read does not. A reset is charged to the client whose request the bad reply belongs to
  (by transaction id, or the only request on the link); a client charged ``breaker_resets``
  times within ``breaker_window`` is refused (0x0A) for ``breaker_hold`` seconds
  (:class:`~mbsec.path.fair.Breaker`).
* Nothing is ever sent twice: an :class:`Exchange` is written once or not at all.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from mbsec import events
from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu
from mbsec.path import exchange as xs
from mbsec.path.exchange import Exchange, read_only
from mbsec.path.fair import Breaker, WaitQueue
from mbsec.path.link import CONNECTING, IDLE, OPEN, Link
from mbsec.path.plc import (
    PathUnavailable,
    ReplyProblem,
    TargetNoResponse,
    UpstreamError,
    UpstreamTarget,
    check_reply,
    reset_error,
)

if TYPE_CHECKING:
    from mbsec.path.router import Outbox

CONNECT = "connect"
CLOSE = "close"


@mypyc_attr(allow_interpreted_subclasses=True)  # tests put old faults back
class Target:
    """The links to one PLC and the requests waiting for them."""

    def __init__(self, target: UpstreamTarget, outbox: Outbox, log: Any) -> None:
        self.target = target
        self.outbox = outbox
        self.timers = outbox.timers
        self.metrics = outbox.metrics
        self.log = log.bind(**events.upstream_context(target.name, target.host, target.port))
        self.links = [Link(self, i) for i in range(target.pool_size)]
        self.wait = WaitQueue()
        self.wait_timer: Any = None
        #: client -> [link, requests of it on that link (in flight or owed a late reply)]
        self.pins: dict[Any, list[Any]] = {}
        self.breaker = Breaker(target.breaker_resets, target.breaker_window, target.breaker_hold)
        self.backoff = target.backoff_initial
        self.retry_at = 0.0  # no connect before this (the target's backoff)
        self.resets: list[float] = []  # recent resets nobody was blamed for
        self.last_error = ""
        self.observe_rtt = outbox.observer("mbsec_upstream_request_seconds", target=target.name)

    # -- requests -------------------------------------------------------------------------

    def submit(self, ex: Exchange, now: float) -> None:
        t = self.target
        unit = ex.adu.unit_id
        ex.plc_unit = t.unit_rewrite.get(unit, unit) if t.unit_rewrite else unit
        until = self.breaker.refused_until(ex.client.blame_key, now)
        if until is not None:
            self._fail(ex, PathUnavailable(
                f"upstream {t.name} refuses this client for {until - now:.1f} s more: its "
                "requests kept breaking the PLC connection", reason="penalized"), "penalized")
            return
        if not self.reachable(now):
            self._fail(ex, PathUnavailable(
                f"upstream {t.name} unavailable (reconnect backoff): {self.last_error}",
                reason="backoff"), "backoff")
            return
        if not self.wait.count:  # fast path: nobody waits before it
            link = self.place(ex.client, now)
            if link is not None:
                self._send(link, ex, now)
                return
        ex.deadline = now + t.request_timeout
        self.wait.push(ex)
        if self.wait_timer is None:
            self.wait_timer = self.timers.at(ex.deadline, self._wait_expired)
        self.schedule(now)

    def reachable(self, now: float) -> bool:
        """False only when no link is open or connecting and the backoff has not passed."""
        if now >= self.retry_at:
            return True
        return any(link.state != IDLE for link in self.links)

    def place(self, client: Any, now: float) -> Link | None:
        """The link for ``client``'s next request, or None when it must wait: the link its
        earlier requests are on, else an open link with a free slot, nothing overdue first."""
        depth = self.target.depth
        pin = self.pins.get(client)
        if pin is not None:
            link: Link = pin[0]
            return link if link.state == OPEN and link.busy < depth else None
        best: Link | None = None
        tainted: Link | None = None
        can_open = False
        for link in self.links:
            state = link.state
            if state == OPEN:
                if link.busy >= depth:
                    continue
                if link.overdue:
                    if tainted is None or link.busy < tainted.busy:
                        tainted = link
                elif best is None or link.busy < best.busy:
                    best = link
            elif state == CONNECTING or now >= self.retry_at:
                can_open = True
        if best is not None:
            return best
        # a link owed a late reply is used only when no other can be had
        return None if can_open else tainted

    def schedule(self, now: float) -> None:
        """Hand waiting requests to free slots, clients in turn; open links for the rest."""
        wait = self.wait
        place = partial(self.place, now=now)
        while wait.count:
            got = wait.pop(place)
            if got is None:
                break
            ex, link = got
            self._send(link, ex, now)
        if wait.count and now >= self.retry_at:
            self._open_links(now)

    def _open_links(self, now: float) -> None:
        """Connect idle links until those connecting can take every waiting request."""
        depth = self.target.depth
        connecting = sum(1 for link in self.links if link.state == CONNECTING)
        for link in self.links:
            if connecting * depth >= self.wait.count:
                return
            if link.state == IDLE:
                self._connect(link, now)
                connecting += 1

    def _send(self, link: Link, ex: Exchange, now: float) -> None:
        if ex.state != xs.WAITING:  # never twice: a write moves real equipment
            raise AssertionError("request sent twice")
        tid = link.allocate_tid()
        ex.tid = tid
        ex.state = xs.SENT
        ex.link = link
        ex.sent = now
        adu = encode_adu(tid, ex.plc_unit, ex.adu.pdu)
        link.out += adu
        link.queued_bytes += len(adu)
        ex.end = link.queued_bytes
        link.pending[tid] = ex
        pin = self.pins.get(ex.client)
        if pin is None:
            self.pins[ex.client] = [link, 1]
        else:
            pin[1] += 1
        ex.pinned = True
        if link.sweep_timer is None:
            link.sweep_timer = self.timers.at(now + self.target.request_timeout,
                                              partial(self._sweep, link))
        self.outbox.dirty.append(link)

    def _unpin(self, ex: Exchange) -> None:
        if not ex.pinned:
            return
        ex.pinned = False
        pin = self.pins.get(ex.client)
        if pin is not None:
            pin[1] -= 1
            if pin[1] <= 0:
                del self.pins[ex.client]

    def _fail(self, ex: Exchange, error: UpstreamError, metric: str | None = None) -> None:
        if metric is not None:
            self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name,
                             reason=metric)
        ex.error = error
        ex.state = xs.DONE
        self.outbox.done.append(ex)

    def _wait_expired(self, now: float) -> None:
        """Requests that waited ``request_timeout`` for a slot give up (0x0B, never sent)."""
        t = self.target
        expired, following = self.wait.expired(now)
        self.wait_timer = None if following is None else self.timers.at(following,
                                                                         self._wait_expired)
        for ex in expired:
            self._fail(ex, TargetNoResponse(
                f"upstream {t.name}: no free slot within {t.request_timeout:g} s "
                f"({t.pool_size} connection(s) x depth {t.depth} busy)", reason="timeout"),
                "timeout")

    def withdraw(self, client: Any) -> None:
        """The client is gone: its requests still waiting here are never sent."""
        for ex in self.wait.take(lambda c: c is not client):
            self._fail(ex, TargetNoResponse("the client went away before the request was sent",
                                            reason="client_gone"))

    def _sweep(self, link: Link, now: float) -> None:
        """Requests whose reply is overdue get 0x0B and keep their slot (``overdue``)."""
        link.sweep_timer = None
        t = self.target
        pending = link.pending
        while pending:
            tid, ex = next(iter(pending.items()))
            if ex.sent + t.request_timeout > now:
                link.sweep_timer = self.timers.at(ex.sent + t.request_timeout,
                                                  partial(self._sweep, link))
                return
            del pending[tid]
            unsent = link.written < ex.end  # not (wholly) on the wire: the PLC stopped reading
            ex.deadline = now + t.late_reply_wait
            link.overdue[tid] = ex
            if read_only(ex.adu.pdu):
                # its client may go on elsewhere: a read the PLC still works on changes nothing
                # (a write keeps the client on this link, so its next write cannot overtake it)
                self._unpin(ex)
            self._fail(ex, TargetNoResponse(
                f"no reply from upstream {t.name} within {t.request_timeout:g} s",
                reason="timeout"), "timeout")
            if unsent:
                self._reset(link, "send_timeout", "PLC did not accept the request in time",
                            now, None)
                return
            if link.overdue_timer is None:
                link.overdue_timer = self.timers.at(ex.deadline, partial(self._overdue, link))

    def _overdue(self, link: Link, now: float) -> None:
        """A late reply did not come within ``late_reply_wait``: reset the link, charged to
        the client that asked for it (a slow register costs the client that reads it)."""
        link.overdue_timer = None
        for ex in link.overdue.values():
            if ex.deadline <= now:
                self._reset(link, "late_reply_overdue",
                            f"no late reply within {self.target.late_reply_wait:g} s after a "
                            "request timed out", now, ex.client.blame_key)
                self.schedule(now)
                return
        if link.overdue:
            first = min(ex.deadline for ex in link.overdue.values())
            link.overdue_timer = self.timers.at(first, partial(self._overdue, link))

    # -- replies ----------------------------------------------------------------------------

    def receive(self, link: Link, data: bytes, now: float) -> None:
        """Bytes from a PLC socket."""
        frames = link.frames
        try:
            frames.receive_data(data)
            while link.state == OPEN:
                adu = frames.next_frame()
                if adu is None:
                    break
                self._dispatch(link, adu, now)
        except ProtocolError as exc:
            self._reset(link, "bad_frame", exc.message, now, self._only_one(link))
        self.schedule(now)

    def _dispatch(self, link: Link, adu: Adu, now: float) -> None:
        tid = adu.transaction_id
        ex = link.pending.pop(tid, None)
        if ex is None:
            late = link.overdue.pop(tid, None)
            if late is not None:
                self._unpin(late)
                self.outbox.emit_late_reply(self, link, tid)
                return
            self._reset(link, "unknown_tid",
                        f"reply with transaction id {tid}, which is not in flight", now,
                        self._only_one(link))
            return
        self._unpin(ex)
        try:
            reply = check_reply(adu, ex.plc_unit, ex.fwd.request, self.target.name)
        except ReplyProblem as problem:
            self._fail(ex, reset_error(self.target.name, "upstream_reset", problem.detail))
            self._reset(link, problem.reason, problem.message, now, ex.client.blame_key)
            return
        self.backoff = self.target.backoff_initial  # a PLC that answers properly is healthy
        self.observe_rtt(now - ex.sent)
        ex.reply = reply
        ex.state = xs.DONE
        self.outbox.done.append(ex)

    def _only_one(self, link: Link) -> str | None:
        """The client to blame for a fault no tid names: the only request on the link."""
        if len(link.pending) + len(link.overdue) == 1:
            for ex in [*link.pending.values(), *link.overdue.values()]:
                key: str = ex.client.blame_key
                return key
        return None

    def closed(self, link: Link, gen: int, reason: str, message: str, now: float) -> None:
        """The PLC socket ended (EOF, or an error reading or writing it)."""
        if gen != link.gen or link.state != OPEN:
            return
        if reason == "eof" and not link.pending and not link.overdue:
            self._reset(link, "eof", message, now, None, quiet=True)  # an idle close
        else:
            self._reset(link, reason, message, now, self._only_one(link))
        self.schedule(now)

    # -- connections ------------------------------------------------------------------------

    def _connect(self, link: Link, now: float) -> None:
        link.state = CONNECTING
        link.connect_timer = self.timers.at(now + self.target.connect_timeout,
                                            partial(self._connect_timeout, link))
        self.outbox.actions.append((CONNECT, link, link.gen))

    def connected(self, link: Link, gen: int, now: float) -> None:
        if gen != link.gen or link.state != CONNECTING:
            return
        if link.connect_timer is not None:
            link.connect_timer.cancel()
            link.connect_timer = None
        link.state = OPEN
        link.frames = FrameBuffer()
        self.metrics.inc("mbsec_upstream_connects_total", target=self.target.name)
        self.outbox.emit_connect(self, link)
        self.schedule(now)

    def _connect_timeout(self, link: Link, now: float) -> None:
        link.connect_timer = None
        if link.state == CONNECTING:
            self.outbox.actions.append((CLOSE, link, link.gen))
            self.connect_failed(link, link.gen, "connect_timeout",
                                f"no connection within {self.target.connect_timeout:g} s", now)

    def connect_failed(self, link: Link, gen: int, reason: str, message: str,
                       now: float) -> None:
        if gen != link.gen or link.state != CONNECTING:
            return
        if link.connect_timer is not None:
            link.connect_timer.cancel()
            link.connect_timer = None
        link.gen += 1
        link.state = IDLE
        backoff = self.backoff
        self._back_off(now, message)
        self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name, reason=reason)
        self.outbox.emit_connect_failed(self, link, reason, message, backoff)
        if not self.reachable(now):  # no link can be had: waiting requests get 0x0A now
            t = self.target
            for ex in self.wait.take():
                self._fail(ex, PathUnavailable(
                    f"cannot connect to upstream {t.name} at {t.host}:{t.port}: {message}",
                    reason="connect_failed"))
        else:
            self.schedule(now)

    def _back_off(self, now: float, message: str) -> None:
        self.last_error = message
        self.retry_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.target.backoff_max)
        if self.wait.count:  # waiting requests may connect once the backoff has passed
            self.timers.at(self.retry_at, self.schedule)

    def _reset(self, link: Link, reason: str, message: str, now: float,
               blame: str | None, *, quiet: bool = False) -> None:
        """The byte stream cannot be trusted (or is gone): fail what is on it, reconnect.

        ``blame``: the client whose request caused it, charged instead of the backoff."""
        lost = list(link.pending.values())
        for ex in [*lost, *link.overdue.values()]:
            self._unpin(ex)
        link.pending.clear()
        link.overdue.clear()
        link.out.clear()
        link.written = link.queued_bytes
        for timer in (link.sweep_timer, link.overdue_timer):
            if timer is not None:
                timer.cancel()
        link.sweep_timer = link.overdue_timer = None
        self.outbox.actions.append((CLOSE, link, link.gen))
        link.gen += 1
        link.state = IDLE
        self.last_error = message
        if blame is not None:
            self._charge(blame, now)
        elif not quiet and reason != "shutdown":
            self.resets = [t for t in self.resets if t > now - self.target.reset_window]
            self.resets.append(now)
            if len(self.resets) > self.target.resets_before_backoff:
                self._back_off(now, message)
        if reason != "shutdown":
            self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name,
                             reason=reason)
            self.outbox.emit_reset(self, link, reason, message, len(lost), blame)
        error = reset_error(self.target.name, reason, message)
        for ex in lost:
            self._fail(ex, error)

    def _charge(self, blame: str, now: float) -> None:
        tripped = self.breaker.charge(blame, now)
        if not tripped:
            return
        self.outbox.emit_penalized(self, blame, tripped)
        t = self.target
        for ex in self.wait.take(lambda c: c.blame_key != blame):
            self._fail(ex, PathUnavailable(
                f"upstream {t.name} refuses this client: its requests kept breaking the PLC "
                "connection", reason="penalized"), "penalized")

    def close(self, reason: str, message: str, now: float) -> None:
        """Shutdown or retirement: every link closes, every request gets its outcome."""
        for link in self.links:
            if link.state != IDLE:
                if link.connect_timer is not None:
                    link.connect_timer.cancel()
                    link.connect_timer = None
                self._reset(link, reason, message, now, None, quiet=True)
        for ex in self.wait.take():
            self._fail(ex, TargetNoResponse(
                f"upstream {self.target.name} closed: {message}", reason="connection_lost"))
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
