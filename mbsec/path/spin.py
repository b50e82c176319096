"""When the data-plane loop spins before it sleeps (``busy_poll_us``, adaptive; sans-IO).

Busy polling saves a sleep and a wake-up per event only where the next event comes within the
window: a PLC's reply after a pass that sent it requests, or the next request while traffic is
dense. Elsewhere it burns CPU for nothing, so a spin of either kind that finds nothing makes
the next 1, 2, 4 ... 64 passes of that kind sleep at once, and a spin that finds work resets
that kind's backoff (issue 14; benchmarks/README.md, "Issue 14 rounds"). The two kinds back
off independently: a slow PLC does not stop the spin for dense client traffic.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DENSE", "MAX_SKIP", "NONE", "REPLY", "SpinPolicy"]

NONE: Final = -1  #: a pass after which no spin pays (nothing sent upstream, no dense traffic)
REPLY: Final = 0  #: after a pass that sent requests to a PLC: its reply may come within the window
DENSE: Final = 1  #: after a pass whose work came within the window: the next event may too
MAX_SKIP: Final = 64  #: passes of one kind that sleep at once, at most, after spins found nothing


class SpinPolicy:
    """The backoff of both kinds; the loop asks :meth:`should_spin` before each sleep and
    reports each spin's outcome to :meth:`spun`."""

    __slots__ = ("_backoff", "_skip", "window")

    def __init__(self, window: float) -> None:
        #: seconds one spin lasts at most (``busy_poll_us``)
        self.window = window
        self._backoff = [0, 0]
        self._skip = [0, 0]

    def kind(self, sent_upstream: bool, active: bool) -> int:
        """What the pass just ended makes worth spinning for."""
        return REPLY if sent_upstream else DENSE if active else NONE

    def should_spin(self, kind: int, timeout: float) -> bool:
        """Spin before the next sleep? Never for :data:`NONE` or when the loop does not sleep
        (``timeout`` 0: work is waiting); a pass of a kind in backoff sleeps, spending one."""
        if kind < 0 or timeout == 0.0:
            return False
        if self._skip[kind]:
            self._skip[kind] -= 1
            return False
        return True

    def spun(self, kind: int, found: bool) -> None:
        """A spin of ``kind`` ended: it found an event (backoff reset) or not (the next 1, 2,
        4 ... :data:`MAX_SKIP` passes of that kind sleep)."""
        if found:
            self._backoff[kind] = 0
        else:
            skip = min(MAX_SKIP, 2 * self._backoff[kind] or 1)
            self._backoff[kind] = skip
            self._skip[kind] = skip

    def active(self, had_events: bool, took: float) -> bool:
        """Was the pass dense: its events came within one window of the loop's wait?"""
        return had_events and took <= self.window
