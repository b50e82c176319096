"""Write freezes of one worker: the operator's (``mbsec ctl freeze``) and the automatic one.

The freeze table lives in the node state (:mod:`mbsec.nodestate`), so every worker obeys a
freeze whichever worker or ``mbsec ctl`` set it; the request path reads it per write
(:class:`~mbsec.nodestate.FreezeView`). This object changes it and says so: every change is a
``writes-freeze`` event and the ``mbsec_writes_frozen`` gauge. Link events come from the
data-plane thread (:meth:`WriteFreeze.link_event`), operator commands from the trio thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from mbsec import events
from mbsec.flap import FlapDetector, FlapRule
from mbsec.metrics import MetricsLike
from mbsec.nodestate import ALL, AUTO, KINDS, MANUAL, Freeze, NodeState

GAUGE = "mbsec_writes_frozen"


class WriteFreeze:
    """Changes to the freeze table made by this worker, with their events and gauges."""

    def __init__(self, node: NodeState, rule: FlapRule, *, log: Any, metrics: MetricsLike,
                 worker: int = 0, targets: Callable[[], list[str]] = list) -> None:
        self.node = node
        self.rule = rule
        self.detector = FlapDetector(rule)
        self.log = log
        self.metrics = metrics
        self.worker = worker
        self.targets = targets  # the configured upstream names (they change on a reload)
        self._lock = threading.Lock()  # detector: data-plane thread and operator commands
        self._gauged: set[tuple[str, str]] = set()
        #: set by the driver: schedule ``fn(now)`` at ``when`` on its clock
        self.schedule: Callable[[float, Callable[[float], None]], Any] | None = None
        self._timer: Any = None
        self._timer_at: float | None = None
        for name, entry in node.freezes().items():  # a restart: this worker's auto freezes
            if entry.flags & AUTO and entry.owner == worker:
                self.detector.adopt(name)
        self.refresh_gauges()

    # -- operator -------------------------------------------------------------------------

    def freeze(self, target: str = ALL) -> Freeze | None:
        """Freeze writes to ``target`` (``*``: all); None when it was frozen by hand already."""
        entry = self.node.set_freeze(target, MANUAL, reason="operator")
        if entry is not None:
            events.emit(self.log, events.writes_frozen(target, "manual", "operator",
                                                       self.worker))
        self.refresh_gauges()
        return entry

    def thaw(self, target: str = ALL) -> list[str]:
        """Remove every freeze of ``target`` (manual and automatic); the kinds removed."""
        removed = self.node.clear_freeze(target)
        with self._lock:
            self.detector.forget(target)
        kinds = [name for bit, name in KINDS.items() if removed & bit]
        if kinds:
            events.emit(self.log, events.writes_thawed(target, kinds, "operator", self.worker))
        self.refresh_gauges()
        return kinds

    def thaw_all(self) -> list[str]:
        """``mbsec ctl thaw`` without a target: every freeze, of every target, goes."""
        kinds: set[str] = set()
        for name in self.node.freezes():
            kinds.update(self.thaw(name))
        return sorted(kinds)

    def refresh_gauges(self) -> None:
        """``mbsec_writes_frozen{target,kind}`` 1 or 0 for every target and ``*`` (each worker
        serves its own /metrics, so each sets them from the shared table)."""
        table = self.node.freezes()
        seen: set[tuple[str, str]] = set()
        for name in [ALL, *self.targets()]:
            flags = table[name].flags if name in table else 0
            for bit, kind in KINDS.items():
                seen.add((name, kind))
                self.metrics.set(GAUGE, 1.0 if flags & bit else 0.0, target=name, kind=kind)
        for name, kind in self._gauged - seen:  # a target removed by a reload
            self.metrics.set(GAUGE, 0.0, target=name, kind=kind)
        self._gauged = seen

    # -- data-plane thread ---------------------------------------------------------------

    def link_event(self, target: str, up: bool, now: float) -> None:
        """A link of ``target`` connected (``up``) or dropped uncharged; never raises (it runs
        inside the request-path core)."""
        if not self.rule.enabled:
            return
        try:
            if not up and target in self.detector.frozen:
                entry = self.node.freezes().get(target)
                if entry is None or not entry.flags & AUTO:  # thawed through another worker
                    with self._lock:
                        self.detector.forget(target)
            with self._lock:
                if up:
                    self.detector.up(target, now)
                    froze = 0
                else:
                    froze = self.detector.drop(target, now)
            if froze:
                entry = self.node.set_freeze(target, AUTO, reason="link_flapping",
                                             owner=self.worker)
                if entry is not None:
                    events.emit(self.log, events.writes_frozen(
                        target, "auto", "link_flapping", self.worker, froze, self.rule.window))
                self.refresh_gauges()
            self._arm()
        except Exception as exc:  # a bug here must not break the PLC link
            events.emit(self.log, events.data_plane_error(exc))

    def run_due(self, now: float) -> None:
        """Timer: thaw what was stable for ``stable_for``."""
        self._timer = None
        self._timer_at = None
        with self._lock:
            due = self.detector.due(now)
        for target in due:
            if self.node.clear_freeze(target, AUTO):
                events.emit(self.log, events.writes_thawed(target, ["auto"], "link_stable",
                                                           self.worker))
        if due:
            self.refresh_gauges()
        self._arm()

    def _arm(self) -> None:
        with self._lock:
            when = self.detector.next_deadline()
        if when is None or self.schedule is None or when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.schedule(when, self.run_due)
