"""The links of one PLC: connecting, resets, reconnects, backoff and the breaker, as state.

:class:`LinkPool` is the connection half of :class:`mbsec.path.target.Target` (which adds the
requests: waiting, slots, replies, deadlines). No socket, no clock: sockets are asked for
through the outbox (``actions``), and every input carries ``now``.

* A reset caused by the PLC's reply (unknown transaction id, wrong unit or function, bad
  length, EOF on a link that was working) reconnects at once. Backoff throttles connect
  attempts that fail, and resets nobody is blamed for once more than
  ``resets_before_backoff`` happen within ``reset_window``; never a first reconnect. The
  backoff is the PLC's (its links share one host), not one link's.
* A reset is charged to the client whose request the bad reply belongs to (by transaction id,
  or the one client whose requests are on the link); a client charged ``breaker_resets``
  times in a row (no good reply for it in between) within ``breaker_window`` is refused (0x0A)
  for ``breaker_hold`` seconds (:class:`~mbsec.path.fair.Breaker`), so a PLC restart that
  hits a poller now and then never locks it out. A charged reset does not count toward the
  backoff; one nobody is blamed for does, once they repeat with no good reply in between.
  A request that never got its late reply (``late_reply_overdue``) is the PLC's silence and is
  charged to nobody.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Final

from mypy_extensions import mypyc_attr

from mbsec import events
from mbsec.modbus.mbap import FrameBuffer
from mbsec.path import exchange as xs
from mbsec.path.exchange import Exchange
from mbsec.path.fair import Breaker, WaitQueue
from mbsec.path.link import CONNECTING, IDLE, OPEN, Link
from mbsec.path.plc import (
    PathUnavailable,
    TargetNoResponse,
    UpstreamError,
    UpstreamTarget,
    reset_error,
)

if TYPE_CHECKING:
    from mbsec.path.router import Outbox

CONNECT: Final = "connect"
CLOSE: Final = "close"


@mypyc_attr(allow_interpreted_subclasses=True)  # tests put old faults back
class LinkPool:
    """The links to one PLC and their health; :class:`~mbsec.path.target.Target` adds the
    requests."""

    def __init__(self, target: UpstreamTarget, outbox: Outbox, log: Any) -> None:
        self.target = target
        # what every request reads, copied from the (interpreted, frozen) settings once: a
        # native attribute each, where ``self.target.depth`` was a generic lookup (issue 14)
        self.name = target.name
        self.depth = target.depth
        self.request_timeout = target.request_timeout
        self.backoff_initial = target.backoff_initial
        self.unit_rewrite: dict[int, int] = dict(target.unit_rewrite)
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
        #: resets nobody was blamed for since the last good reply (within ``reset_window``)
        self.resets: list[float] = []
        self.last_error = ""
        #: False after a failed connection attempt until one succeeds (``mbsec_upstream_up``)
        self.up = True
        self.observe_rtt = outbox.observer("mbsec_upstream_request_seconds", target=target.name)

    def schedule(self, now: float) -> None:
        """Hand waiting requests to free links (the requests' half: Target)."""

    def reachable(self, now: float) -> bool:
        """False only when no link is open or connecting and the backoff has not passed."""
        if now >= self.retry_at:
            return True
        return any(link.state != IDLE for link in self.links)

    def _open_links(self, now: float, wanted: int) -> None:
        """Connect idle links until those connecting can take ``wanted`` requests."""
        depth = self.depth
        connecting = sum(1 for link in self.links if link.state == CONNECTING)
        for link in self.links:
            if connecting * depth >= wanted:
                return
            if link.state == IDLE:
                self._connect(link, now)
                connecting += 1

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
        if error.reason != "client_gone":  # nobody is left to answer
            self.metrics.inc("mbsec_upstream_exception_answers_total", target=self.target.name,
                             code=f"0x{error.exception_code:02X}")
        ex.error = error
        ex.state = xs.DONE
        self.outbox.done.append(ex)

    def _only_one(self, link: Link) -> str | None:
        """The client to blame for a fault no tid names (an unknown tid, a broken frame, an
        EOF): the one client whose requests are on the link, else nobody."""
        key: str | None = None
        for ex in [*link.pending.values(), *link.overdue.values()]:
            owner: str = ex.client.blame_key
            if key is None:
                key = owner
            elif owner != key:
                return None
        return key

    def closed(self, link: Link, gen: int, reason: str, message: str, now: float) -> None:
        """The PLC socket ended (EOF, or an error reading or writing it)."""
        if gen != link.gen or link.state != OPEN:
            return
        if reason == "eof" and not link.pending and not link.overdue:
            self._reset(link, "eof", message, now, None, quiet=True)  # an idle close
        else:
            self._reset(link, reason, message, now, self._only_one(link))
        self.schedule(now)

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
        self.up = True
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
        self.up = False
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
               blame: str | None, *, quiet: bool = False, failed_too: int = 0) -> None:
        """The byte stream cannot be trusted (or is gone): fail what is on it, reconnect.

        ``blame``: the client whose request caused it, charged instead of the backoff;
        ``failed_too``: requests the caller already failed for it (counted in the event)."""
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
            # resets nobody is blamed for since the PLC last answered properly (a good reply
            # clears them): a PLC that breaks every connection is throttled, one that only
            # breaks now and then between good replies is reconnected at once every time
            self.resets = [t for t in self.resets if t > now - self.target.reset_window]
            self.resets.append(now)
            if len(self.resets) > self.target.resets_before_backoff:
                self._back_off(now, message)
        if reason != "shutdown":
            self.metrics.inc("mbsec_upstream_failures_total", target=self.target.name,
                             reason=reason)
            self.metrics.inc("mbsec_upstream_resets_total", target=self.target.name,
                             reason=reason)
            self.outbox.emit_reset(self, link, reason, message, len(lost) + failed_too, blame)
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
