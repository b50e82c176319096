"""One PLC as a state machine: its links, slots, reply deadlines, resets, reconnects, fairness.

Inputs carry ``now`` (:meth:`Target.submit`, :meth:`Target.connected`, :meth:`Target.receive`,
...); outputs go to the shared :class:`~mbsec.path.router.Outbox`: ADUs to write (``link.out``
plus the ``dirty`` list), sockets to open or close (``actions``) and finished requests
(``done``). No socket, no clock, no thread: the driver moves the bytes.

The availability rules (docs/config.md, "Availability rules"), each in one place here:

* A reset caused by the PLC's reply (unknown transaction id, wrong unit or function, bad
  length, EOF on a link that was working) reconnects at once. Backoff throttles connect
  attempts that fail, and resets nobody is blamed for once more than
  ``resets_before_backoff`` happen within ``reset_window``; never a first reconnect.
* A request waits for a link within its deadline (``request_timeout``) while links connect;
  0x0A at once only when no link can be had (every link in connect-failure backoff).
* A request answered 0x0B keeps its slot (``Link.overdue``) until its late reply arrives and
  is dropped, or ``late_reply_wait`` passes and the link is reset. New requests go to links
  with nothing overdue first.
* Clients with waiting requests are served in turn (round robin), never one FIFO for all. A
  reset is charged to the client whose request the bad reply belongs to (by transaction id, or
  the only request in flight); a client charged ``breaker_resets`` times within
  ``breaker_window`` is refused (0x0A) by this target for ``breaker_hold`` seconds.
* Nothing is ever sent twice: an :class:`Exchange` is written once or not at all.
"""

from __future__ import annotations

import collections
from functools import partial
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu
from mbsec.path import exchange as xs
from mbsec.path.exchange import Exchange
from mbsec.path.link import BACKOFF, CONNECTING, IDLE, OPEN, Link
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
        self.log = log.bind(**{"mbsec.target": target.name, "destination.ip": target.host,
                               "destination.port": target.port})
        self.links = [Link(self, i, target.backoff_initial) for i in range(target.pool_size)]
        #: waiting requests: one FIFO per client, clients served in turn
        self.queues: dict[Any, collections.deque[Exchange]] = {}
        self.turns: collections.deque[Any] = collections.deque()
        self.waiting = 0
        #: every waiting request in arrival order, for the wait deadline (lazy removal)
        self.arrivals: collections.deque[Exchange] = collections.deque()
        self.wait_timer: Any = None
        self.strikes: dict[str, list[float]] = {}  # blame key -> times of charged resets
        self.penalized: dict[str, float] = {}  # blame key -> refused until
        self.retired = False
        rtt = outbox.observer("mbsec_upstream_request_seconds", target=target.name)
        self.observe_rtt = rtt

    # -- requests -------------------------------------------------------------------------

    def submit(self, ex: Exchange, now: float) -> None:
        t = self.target
        unit = ex.adu.unit_id
        ex.plc_unit = t.unit_rewrite.get(unit, unit) if t.unit_rewrite else unit
        blame = ex.client.blame_key
        until = self.penalized.get(blame)
        if until is not None:
            if now < until:
                self._fail(ex, PathUnavailable(
                    f"upstream {t.name} refuses this client for {until - now:.1f} s more: its "
                    "requests kept breaking the PLC connection", reason="penalized"), "penalized")
                return
            del self.penalized[blame]
        if not self.reachable(now):
            link = self.links[0]
            self._fail(ex, PathUnavailable(
                f"upstream {t.name} unavailable (reconnect backoff): {link.last_error}",
                reason="backoff"), "backoff")
            return
        # fast path: nobody waits and a link has a free slot with nothing overdue
        if not self.waiting:
            for link in self.links:
                if link.state == OPEN and not link.overdue and len(link.pending) < t.depth:
                    self._send(link, ex, now)
                    return
        ex.deadline = now + t.request_timeout
        q = self.queues.get(ex.client)
        if q is None:
            q = self.queues[ex.client] = collections.deque()
            self.turns.append(ex.client)
        q.append(ex)
        self.waiting += 1
        self.arrivals.append(ex)
        if self.wait_timer is None:
            self.wait_timer = self.timers.at(ex.deadline, self._wait_expired)
        self.schedule(now)

    def reachable(self, now: float) -> bool:
        """False only when every link is in connect-failure backoff."""
        return any(link.state != BACKOFF or now >= link.retry_at for link in self.links)

    def schedule(self, now: float) -> None:
        """Hand waiting requests to free slots, clients in turn; open links for the rest."""
        depth = self.target.depth
        while self.waiting:
            link = self._free_link(depth)
            if link is None:
                break
            client = self.turns.popleft()
            q = self.queues[client]
            ex = q.popleft()
            if q:
                self.turns.append(client)
            else:
                del self.queues[client]
            self.waiting -= 1
            self._send(link, ex, now)
        if self.waiting:
            self._open_links(now)

    def _free_link(self, depth: int) -> Link | None:
        """An open link with a free slot: nothing overdue first, then the least busy."""
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
            elif state in (IDLE, CONNECTING):
                can_open = True
        if best is not None:
            return best
        # a link with a request owed a late reply is used only when no other can be had
        return None if can_open else tainted

    def _open_links(self, now: float) -> None:
        """Connect links until those connecting can take every waiting request."""
        depth = self.target.depth
        connecting = sum(1 for link in self.links if link.state == CONNECTING)
        for link in self.links:
            if connecting * depth >= self.waiting:
                return
            if link.state == IDLE or (link.state == BACKOFF and now >= link.retry_at):
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
        if link.sweep_timer is None:
            link.sweep_timer = self.timers.at(now + self.target.request_timeout,
                                              partial(self._sweep, link))
        self.outbox.dirty.append(link)

    def _fail(self, ex: Exchange, error: UpstreamError, metric: str | None = None) -> None:
        if metric is not None:
            self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name,
                             reason=metric)
        ex.error = error
        ex.state = xs.DONE
        self.outbox.done.append(ex)

    def _wait_expired(self, now: float) -> None:
        """Requests that waited ``request_timeout`` for a slot give up (0x0B, never sent)."""
        self.wait_timer = None
        arrivals = self.arrivals
        t = self.target
        while arrivals:
            ex = arrivals[0]
            if ex.state != xs.WAITING:
                arrivals.popleft()
                continue
            if ex.deadline > now:
                self.wait_timer = self.timers.at(ex.deadline, self._wait_expired)
                return
            arrivals.popleft()
            self._unqueue(ex)
            self._fail(ex, TargetNoResponse(
                f"upstream {t.name}: no free slot within {t.request_timeout:g} s "
                f"({t.pool_size} connection(s) x depth {t.depth} busy)", reason="timeout"),
                "timeout")

    def _unqueue(self, ex: Exchange) -> None:
        q = self.queues[ex.client]
        q.remove(ex)
        self.waiting -= 1
        if not q:
            del self.queues[ex.client]
            self.turns.remove(ex.client)

    def withdraw(self, client: Any) -> None:
        """The client is gone: its requests still waiting here are never sent."""
        q = self.queues.pop(client, None)
        if q is None:
            return
        self.turns.remove(client)
        self.waiting -= len(q)
        for ex in q:
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
            self._fail(ex, TargetNoResponse(
                f"no reply from upstream {t.name} within {t.request_timeout:g} s",
                reason="timeout"), "timeout")
            if link.written < ex.end:  # not (wholly) on the wire: the PLC stopped reading
                self._reset(link, "send_timeout", "PLC did not accept the request in time",
                            now, None)
                return
            link.overdue[tid] = now + t.late_reply_wait
            if link.overdue_timer is None:
                link.overdue_timer = self.timers.at(
                    now + t.late_reply_wait, partial(self._overdue, link))

    def _overdue(self, link: Link, now: float) -> None:
        """A late reply did not come within ``late_reply_wait``: reset the link."""
        link.overdue_timer = None
        for when in link.overdue.values():
            if when <= now:
                self._reset(link, "late_reply_overdue",
                            f"no late reply within {self.target.late_reply_wait:g} s after a "
                            "request timed out", now, None)
                return
        if link.overdue:
            first = min(link.overdue.values())
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
            self._reset(link, "bad_frame", exc.message, now, self._only_in_flight(link))
        self.schedule(now)

    def _dispatch(self, link: Link, adu: Adu, now: float) -> None:
        tid = adu.transaction_id
        ex = link.pending.pop(tid, None)
        if ex is None:
            if link.overdue.pop(tid, None) is not None:
                self.outbox.emit_late_reply(self, link, tid)
                return
            self._reset(link, "unknown_tid",
                        f"reply with transaction id {tid}, which is not in flight", now,
                        self._only_in_flight(link))
            return
        try:
            reply = check_reply(adu, ex.plc_unit, ex.fwd.request, self.target.name)
        except ReplyProblem as problem:
            self._fail(ex, reset_error(self.target.name, "upstream_reset", problem.detail))
            self._reset(link, problem.reason, problem.message, now, ex.client.blame_key)
            return
        link.backoff = self.target.backoff_initial  # a PLC that answers properly is healthy
        self.observe_rtt(now - ex.sent)
        ex.reply = reply
        ex.state = xs.DONE
        self.outbox.done.append(ex)

    def _only_in_flight(self, link: Link) -> str | None:
        """The client to blame for a fault no tid names: the only request on the link."""
        if len(link.pending) == 1 and not link.overdue:
            key: str = next(iter(link.pending.values())).client.blame_key
            return key
        return None

    def closed(self, link: Link, gen: int, reason: str, message: str, now: float) -> None:
        """The PLC socket ended (EOF, or an error reading or writing it)."""
        if gen != link.gen or link.state != OPEN:
            return
        if reason == "eof" and not link.pending and not link.overdue:
            self._reset(link, "eof", message, now, None, quiet=True)  # an idle close
        else:
            self._reset(link, reason, message, now, self._only_in_flight(link))
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
        backoff = link.backoff
        self._back_off(link, now, message)
        self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name, reason=reason)
        self.outbox.emit_connect_failed(self, link, reason, message, backoff)
        if not self.reachable(now):  # no link can be had: waiting requests get 0x0A now
            t = self.target
            for client in list(self.queues):
                for ex in self.queues.pop(client):
                    self._fail(ex, PathUnavailable(
                        f"cannot connect to upstream {t.name} at {t.host}:{t.port}: {message}",
                        reason="connect_failed"))
            self.turns.clear()
            self.waiting = 0
        else:
            self.schedule(now)

    def _back_off(self, link: Link, now: float, message: str) -> None:
        link.state = BACKOFF
        link.last_error = message
        link.retry_at = now + link.backoff
        link.backoff = min(link.backoff * 2, self.target.backoff_max)
        if self.waiting:  # waiting requests may use this link once the backoff has passed
            self.timers.at(link.retry_at, self.schedule)

    def _reset(self, link: Link, reason: str, message: str, now: float,
               blame: str | None, *, quiet: bool = False) -> None:
        """The byte stream cannot be trusted (or is gone): fail what is on it, reconnect.

        ``blame``: the client whose request caused it, charged instead of the backoff."""
        lost = list(link.pending.values())
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
        link.last_error = message
        if blame is not None:
            self._charge(blame, now)
        elif not quiet and reason != "shutdown":
            window = self.target.reset_window
            link.resets = [t for t in link.resets if t > now - window]
            link.resets.append(now)
            if len(link.resets) > self.target.resets_before_backoff:
                self._back_off(link, now, message)
        if reason != "shutdown":
            self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name,
                             reason=reason)
            self.outbox.emit_reset(self, link, reason, message, len(lost), blame)
        error = reset_error(self.target.name, reason, message)
        for ex in lost:
            self._fail(ex, error)

    def _charge(self, blame: str, now: float) -> None:
        t = self.target
        times = [x for x in self.strikes.get(blame, ()) if x > now - t.breaker_window]
        times.append(now)
        if len(times) < t.breaker_resets:
            self.strikes[blame] = times
            return
        self.strikes.pop(blame, None)
        self.penalized[blame] = now + t.breaker_hold
        self.outbox.emit_penalized(self, blame, len(times))
        for client in [c for c in self.queues if c.blame_key == blame]:
            for ex in self.queues.pop(client):
                self._fail(ex, PathUnavailable(
                    f"upstream {t.name} refuses this client: its requests kept breaking the "
                    "PLC connection", reason="penalized"), "penalized")
            self.turns.remove(client)
        self.waiting = sum(len(q) for q in self.queues.values())
        if len(self.strikes) > 4096 or len(self.penalized) > 4096:  # bounded
            self.strikes = {k: v for k, v in self.strikes.items() if v[-1] > now - t.breaker_window}
            self.penalized = {k: v for k, v in self.penalized.items() if v > now}

    def close(self, reason: str, message: str, now: float) -> None:
        """Shutdown or retirement: every link closes, every request gets its outcome."""
        self.retired = True
        for link in self.links:
            if link.state in (OPEN, CONNECTING):
                self._reset(link, reason, message, now, None, quiet=True)
            if link.connect_timer is not None:
                link.connect_timer.cancel()
                link.connect_timer = None
        for client in list(self.queues):
            for ex in self.queues.pop(client):
                self._fail(ex, TargetNoResponse(
                    f"upstream {self.target.name} closed: {message}", reason="connection_lost"))
        self.turns.clear()
        self.waiting = 0
        if self.wait_timer is not None:
            self.wait_timer.cancel()
            self.wait_timer = None
