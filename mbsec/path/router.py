"""The PLC side of the core: targets by unit id, and the outbox every core object writes to.

A driver owns one :class:`Router` (with its :class:`Timers`). After feeding any input it
drains, in this order: ``actions`` (sockets to open or close), ``done`` (finished requests,
handed to their client with ``ex.client.finished(ex, now)``), ``dirty`` (links with requests
to write) and then ``clients`` (client connections with replies to write or news: closing,
reading paused or resumed). Core objects never call each other back directly: a request that
finishes at once (0x0A) goes through ``done`` like any other, so no core method is
re-entered.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

from mbsec import events
from mbsec.metrics import MetricsLike, NullMetrics, observer
from mbsec.path import exchange as xs
from mbsec.path.exchange import Exchange
from mbsec.path.link import Link
from mbsec.path.plc import (
    RETIRE_GRACE,
    PathUnavailable,
    UpstreamTarget,
    check_targets,
)
from mbsec.path.pool import LinkPool
from mbsec.path.target import Target
from mbsec.path.timers import Timers

#: link resets caused by a frame the PLC sent (it answered): never a link drop
_ANSWERED: Final = frozenset(("unknown_tid", "bad_frame"))

class Outbox:
    """What the core asks of its driver, and the injected clockless services it uses."""

    def __init__(self, timers: Timers, log: Any, metrics: MetricsLike) -> None:
        self.timers = timers
        self.log = log
        self.metrics = metrics
        #: (CONNECT | CLOSE, link, link generation), in order
        self.actions: collections.deque[tuple[str, Link, int]] = collections.deque()
        self.done: collections.deque[Exchange] = collections.deque()
        self.dirty: list[Link] = []  # links with ADUs to write (written first: requests out)
        self.clients: list[Any] = []  # client connections with replies or news for the driver
        #: told (target name, True) when a link connects and (name, False) when one drops
        #: with no client charged (a failed connect, an EOF or a timeout): the automatic
        #: write freeze counts these (mbsec.flap); the driver supplies the time
        self.on_link: Callable[[str, bool], None] | None = None

    def observer(self, name: str, **labels: str) -> Callable[[float], None]:
        return observer(self.metrics, name, **labels)

    # events of the PLC side: the target's logger carries its name and address
    def _link_log(self, target: LinkPool, link: Link) -> Any:
        return target.log.bind(**{"mbsec.connection": link.index})

    def emit_connect(self, target: LinkPool, link: Link) -> None:
        events.emit(self._link_log(target, link), events.upstream_connect())
        if self.on_link is not None:
            self.on_link(target.target.name, True)

    def emit_connect_failed(self, target: LinkPool, link: Link, reason: str, message: str,
                            backoff: float) -> None:
        events.emit(self._link_log(target, link),
                    events.upstream_connect_failed(reason, message, backoff))
        if self.on_link is not None:
            self.on_link(target.target.name, False)

    def emit_reset(self, target: LinkPool, link: Link, reason: str, message: str, pending: int,
                   blame: str | None) -> None:
        events.emit(self._link_log(target, link),
                    events.upstream_reset(reason, message, pending, blame))
        # a reply no transaction id places (several clients on the link, nobody charged) is
        # not a drop: the PLC answered, and a client's bad requests must not freeze writes
        if blame is None and self.on_link is not None and reason not in _ANSWERED:
            self.on_link(target.target.name, False)

    def emit_late_reply(self, target: LinkPool, link: Link, tid: int) -> None:
        self.metrics.inc("mbsec_upstream_failures_total", target=target.target.name,
                         reason="late_reply")
        events.emit(self._link_log(target, link), events.upstream_late_reply(tid))

    def emit_penalized(self, target: LinkPool, blame: str, resets: int) -> None:
        self.metrics.inc("mbsec_clients_penalized_total", target=target.target.name)
        events.emit(target.log,
                    events.client_penalized(blame, resets, target.target.breaker_hold))


class Router:
    """Every PLC target, routed by unit id; reload keeps unchanged targets' links."""

    def __init__(self, targets: Iterable[UpstreamTarget], *, timers: Timers, log: Any,
                 metrics: MetricsLike | None = None) -> None:
        self.outbox = Outbox(timers, log, metrics if metrics is not None else NullMetrics())
        self.timers = timers
        self.targets: dict[str, Target] = {}
        self.routes: dict[int, Target] = {}
        self.retired: list[Target] = []
        self.install(list(targets), 0.0)

    def install(self, targets: list[UpstreamTarget], now: float) -> None:
        """Reload: new requests use the new set at once; removed or changed targets finish
        their requests (bounded by the deadlines), then close. ``ValueError`` keeps the old."""
        check_targets(targets)
        old = self.targets
        new: dict[str, Target] = {}
        for t in targets:
            kept = old.get(t.name)
            new[t.name] = kept if kept is not None and kept.target == t else Target(
                t, self.outbox, self.outbox.log)
        for name, target in old.items():
            if new.get(name) is not target:
                self.retired.append(target)
                t = target.target
                self.timers.at(now + t.connect_timeout + t.request_timeout + RETIRE_GRACE,
                               partial(self._close_retired, target))
        self.targets = new
        self.routes = {unit: tg for tg in new.values() for unit in tg.target.unit_ids}

    def _close_retired(self, target: Target, now: float) -> None:
        if target in self.retired:
            self.retired.remove(target)
        target.close("shutdown", "target removed by a reload", now)

    def submit(self, ex: Exchange, now: float) -> None:
        """Send one request toward the PLC for its unit id; it ends up in ``done`` once."""
        target = self.routes.get(ex.adu.unit_id)
        if target is None:
            self.outbox.metrics.inc("mbsec_upstream_failures_total", target="", reason="no_route")
            self.outbox.metrics.inc("mbsec_upstream_exception_answers_total", target="",
                                    code="0x0A")
            ex.error = PathUnavailable(f"no upstream target for unit id {ex.adu.unit_id}",
                                       reason="no_route")
            ex.state = xs.DONE
            self.outbox.done.append(ex)
            return
        target.submit(ex, now)

    def all_targets(self) -> list[Target]:
        """The routed targets and those a reload retired (still finishing requests)."""
        return [*self.targets.values(), *self.retired]

    def withdraw(self, client: Any) -> None:
        for target in self.all_targets():
            target.withdraw(client)

    def close(self, reason: str, message: str, now: float) -> None:
        for target in self.all_targets():
            target.close(reason, message, now)
        self.retired.clear()

