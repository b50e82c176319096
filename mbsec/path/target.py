"""One PLC as a state machine: the requests for it (its links are :mod:`mbsec.path.pool`).

Inputs carry ``now`` (:meth:`Target.submit`, :meth:`Target.receive`, and the link inputs of
:class:`~mbsec.path.pool.LinkPool`); outputs go to the shared
:class:`~mbsec.path.router.Outbox`: ADUs to write (``link.out`` plus the ``dirty`` list),
sockets to open or close (``actions``) and finished requests (``done``). No socket, no clock,
no thread: the driver moves the bytes.

The request rules (docs/config.md, "Availability rules"):

* A request waits for a link within its deadline (``request_timeout``) while links connect;
  0x0A at once only when no link can be had (none open or connecting, and in backoff).
* A request answered 0x0B keeps its slot (``Link.overdue``) until its late reply arrives and
  is dropped, or ``late_reply_wait`` passes and the link is reset. New requests go to links
  with nothing overdue first.
* Clients with waiting requests are served in turn (:class:`~mbsec.path.fair.WaitQueue`). A
  client's requests travel on one link at a time (``pins``), so they reach the PLC in the
  order it sent them, and one client never holds more than one link: a request answered 0x0B
  keeps its client there until it is settled (a slow register costs the client that reads
  it, and its next write cannot overtake the one the PLC is still working on).
* A bad reply costs the request that got it: the link is reset (and reconnects at once, see
  :mod:`mbsec.path.pool`), the reset charged to that request's client.
* Nothing is ever sent twice: an :class:`Exchange` is written once or not at all.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from mypy_extensions import mypyc_attr

from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.mbap import Adu, encode_adu
from mbsec.path import exchange as xs
from mbsec.path.exchange import Exchange
from mbsec.path.link import CONNECTING, OPEN, Link
from mbsec.path.plc import PathUnavailable, ReplyProblem, TargetNoResponse, check_reply, reset_error
from mbsec.path.pool import CLOSE, CONNECT, LinkPool

__all__ = ["CLOSE", "CONNECT", "Target"]


@mypyc_attr(allow_interpreted_subclasses=True)  # tests put old faults back
class Target(LinkPool):
    """One PLC: its links (:class:`LinkPool`) and the requests for it."""

    def submit(self, ex: Exchange, now: float) -> None:
        t = self.target
        unit = ex.adu.unit_id
        rewrite = self.unit_rewrite
        ex.plc_unit = rewrite.get(unit, unit) if rewrite else unit
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
        ex.deadline = now + self.request_timeout
        self.wait.push(ex)
        if self.wait_timer is None:
            self.wait_timer = self.timers.at(ex.deadline, self._wait_expired)
        self.schedule(now)

    def place(self, client: Any, now: float) -> Link | None:
        """The link for ``client``'s next request, or None when it must wait: the link its
        earlier requests are on, else an open link with a free slot, nothing overdue first."""
        depth = self.depth
        pin = self.pins.get(client)
        if pin is not None:
            link: Link = pin[0]
            return link if link.state == OPEN and link.busy < depth else None
        best: Link | None = None
        tainted: Link | None = None
        other = False  # a healthy link that is full, connecting, or can be opened
        best_busy = depth
        for link in self.links:
            state = link.state
            if state == OPEN:
                if link.overdue:
                    if link.busy < depth and (tainted is None or link.busy < tainted.busy):
                        tainted = link
                    continue
                busy = len(link.pending)
                if busy >= depth:
                    other = True
                elif busy < best_busy:
                    best = link
                    best_busy = busy
                    if busy == 0:
                        break  # an idle healthy link: nothing is less loaded
            elif state == CONNECTING or now >= self.retry_at:
                other = True
        if best is not None:
            return best
        # a link owed a late reply (the PLC may still be busy with it) is used only when no
        # other link can be had: waiting for a healthy one is shorter
        return None if other else tainted

    def schedule(self, now: float) -> None:
        """Hand waiting requests to free slots, clients in turn; open links for the rest."""
        wait = self.wait
        if not wait.count:
            return  # the common case, after every reply: nobody waits
        place = partial(self.place, now=now)
        while wait.count:
            got = wait.pop(place)
            if got is None:
                break
            ex, link = got
            self._send(link, ex, now)
        if wait.count and now >= self.retry_at:
            pins = self.pins
            # a client whose earlier requests hold a link waits for that link, not a new one
            free = sum(len(q) for client, q in wait.queues.items() if client not in pins)
            if free:
                self._open_links(now, free)

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
            link.sweep_timer = self.timers.at(now + self.request_timeout,
                                              partial(self._sweep, link))
        self.outbox.dirty.append(link)

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
            link.overdue[tid] = ex  # its client stays on this link (``pins``) until settled
            self._fail(ex, TargetNoResponse(
                f"no reply from upstream {t.name} within {t.request_timeout:g} s",
                reason="timeout"), "timeout")
            if unsent:
                self._reset(link, "send_timeout", "PLC did not accept the request in time",
                            now, None)
                self.schedule(now)  # the waiting requests reconnect (within their deadline)
                return
            if link.overdue_timer is None:
                link.overdue_timer = self.timers.at(ex.deadline, partial(self._overdue, link))

    def _overdue(self, link: Link, now: float) -> None:
        """A late reply did not come within ``late_reply_wait``: reset the link (charged to
        nobody: a silent PLC is not its client's fault; the client paid with its 0x0B and its
        wait on this link)."""
        link.overdue_timer = None
        for ex in link.overdue.values():
            if ex.deadline <= now:
                self._reset(link, "late_reply_overdue",
                            f"no late reply within {self.target.late_reply_wait:g} s after a "
                            "request timed out", now, None)
                self.schedule(now)
                return
        if link.overdue:
            first = min(ex.deadline for ex in link.overdue.values())
            link.overdue_timer = self.timers.at(first, partial(self._overdue, link))

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
            self._answered_reset(link, "bad_frame", exc.message, now)
        self.schedule(now)

    def _answered_reset(self, link: Link, reason: str, message: str, now: float) -> None:
        """A frame no tid places (unknown tid, broken frame): charged to the one client on the
        link; with several, to nobody, and not counted toward the backoff either: the PLC
        answered, so it is reachable, and throttling it would cost the clients that did
        nothing (the fault costs only whoever caused it; the breaker finds that client once
        its requests are alone on a link)."""
        blame = self._only_one(link)
        self._reset(link, reason, message, now, blame, quiet=blame is None)

    def _dispatch(self, link: Link, adu: Adu, now: float) -> None:
        tid = adu.transaction_id
        pending = link.pending
        ex = pending.get(tid)  # get and del: compiled primitives, where pop(k, None) is a call
        if ex is not None:
            del pending[tid]
        else:
            late = link.overdue.pop(tid, None)
            if late is not None:
                self._unpin(late)
                self.outbox.emit_late_reply(self, link, tid)
                return
            self._answered_reset(link, "unknown_tid",
                                 f"reply with transaction id {tid}, which is not in flight", now)
            return
        self._unpin(ex)
        try:
            reply = check_reply(adu, ex.plc_unit, ex.fwd.request, self.name)
        except ReplyProblem as problem:
            self._fail(ex, reset_error(self.target.name, "upstream_reset", problem.detail))
            self._reset(link, problem.reason, problem.message, now, ex.client.blame_key,
                        failed_too=1)
            return
        self.backoff = self.backoff_initial  # a PLC that answers properly is healthy
        if self.resets:
            self.resets.clear()
        strikes = self.breaker.strikes
        if strikes:
            strikes.pop(ex.client.blame_key, None)  # its requests do not keep breaking links
        self.observe_rtt(now - ex.sent)
        ex.reply = reply
        ex.state = xs.DONE
        self.outbox.done.append(ex)
