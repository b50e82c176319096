"""Automatic write freeze on a flapping PLC link, as a state machine (sans-IO, clock passed in).

A *drop* is a failed connect, an EOF or a timeout of a PLC link that no client was charged
with (the request path decides blame: :mod:`mbsec.path.pool`); a client whose bad requests
break links is the breaker's business, and must not freeze everyone's writes. After ``drops``
drops of one target within ``window`` seconds its writes freeze; they thaw once a link of it
has connected and no drop followed for ``stable_for`` seconds (or an operator thaws them).

The driver reports link events with the time it read (:meth:`FlapDetector.drop`,
:meth:`FlapDetector.up`), sleeps until :meth:`FlapDetector.next_deadline` and then asks
:meth:`FlapDetector.due`. Tested with a hypothesis state machine on a simulated clock
(tests/test_flap.py).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FlapRule:
    """``[admin.auto_freeze]`` (docs/config.md)."""

    enabled: bool = False
    drops: int = 5
    window: float = 60.0
    stable_for: float = 300.0


class FlapDetector:
    """Per target: recent drops, whether writes are frozen by it, since when it is stable."""

    def __init__(self, rule: FlapRule) -> None:
        self.rule = rule
        self._drops: dict[str, collections.deque[float]] = {}
        #: targets this detector froze (and has not thawed)
        self.frozen: set[str] = set()
        #: target -> when a link connected with no drop since (None: not stable)
        self._stable_since: dict[str, float | None] = {}

    def drop(self, target: str, now: float) -> int:
        """A link of ``target`` dropped. Returns the drops within the window when this one
        freezes its writes, else 0."""
        self._stable_since[target] = None
        if not self.rule.enabled:
            return 0
        recent = self._drops.get(target)
        if recent is None:
            recent = self._drops[target] = collections.deque()
        recent.append(now)
        edge = now - self.rule.window
        while recent and recent[0] <= edge:
            recent.popleft()
        if target in self.frozen or len(recent) < self.rule.drops:
            return 0
        count = len(recent)
        recent.clear()
        self.frozen.add(target)
        return count

    def up(self, target: str, now: float) -> None:
        """A link of ``target`` connected: stable from now, unless one is already counted."""
        if self._stable_since.get(target) is None:
            self._stable_since[target] = now

    def adopt(self, target: str) -> None:
        """``target`` is auto-frozen by this worker already (the state file, after a restart):
        thaw it by the same rule."""
        if self.rule.enabled:
            self.frozen.add(target)

    def forget(self, target: str) -> None:
        """An operator thawed ``target``: its flap history starts afresh."""
        self.frozen.discard(target)
        self._drops.pop(target, None)

    def next_deadline(self) -> float | None:
        """When the next thaw may be due (None: no frozen target is stable yet)."""
        times = [s for t in self.frozen if (s := self._stable_since.get(t)) is not None]
        return min(times) + self.rule.stable_for if times else None

    def due(self, now: float) -> list[str]:
        """The frozen targets stable for ``stable_for`` at ``now``: thawed and returned."""
        out = []
        for target in sorted(self.frozen):
            since = self._stable_since.get(target)
            if since is not None and now - since >= self.rule.stable_for:
                out.append(target)
        for target in out:
            self.frozen.discard(target)
            self._drops.pop(target, None)
        return out
