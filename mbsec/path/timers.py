"""Deadlines for the request path without a clock: the core schedules, the driver supplies ``now``.

The core never reads a clock. Every input carries ``now``; the core schedules callbacks at
absolute times here; the driver sleeps until :meth:`Timers.next_deadline` and then calls
:meth:`Timers.run_due` with the time it read. A simulation does the same with a simulated
clock, which is what makes fault schedules replayable.

Cancelled timers stay in the heap until they are due (lazy deletion) and are swept once the
heap doubles, so a client whose deadlines move on every request cannot grow it for minutes.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Final

from mypy_extensions import mypyc_attr

COMPACT_MIN: Final = 4096  # heap size from which cancelled timers are swept out


class Timer:
    """A scheduled call; :meth:`cancel` makes it a no-op."""

    __slots__ = ("fn", "when")

    def __init__(self, when: float, fn: Callable[[float], None] | None) -> None:
        self.when = when
        self.fn = fn

    def cancel(self) -> None:
        self.fn = None


@mypyc_attr(allow_interpreted_subclasses=True)  # tests guard against timers that never end
class Timers:
    """A heap of :class:`Timer`; callbacks get the ``now`` the driver passed in."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._compact_at = COMPACT_MIN

    def at(self, when: float, fn: Callable[[float], None]) -> Timer:
        t = Timer(when, fn)
        heap = self._heap
        heapq.heappush(heap, (when, next(self._seq), t))
        if len(heap) > self._compact_at:
            self.compact()
        return t

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2].fn is None:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run_due(
        self, now: float,
        contain: Callable[[Callable[[float], None], Exception], None] | None = None,
    ) -> int:
        """Call every timer due at ``now`` (in deadline order); returns how many ran.

        A callback may schedule more; those due at ``now`` run in the same call. With
        ``contain``, a callback that raises is handed to it and the others still run."""
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            timer = heapq.heappop(heap)[2]
            fn = timer.fn
            if fn is not None:
                timer.fn = None
                ran += 1
                if contain is None:
                    fn(now)
                    continue
                try:
                    fn(now)
                except Exception as exc:
                    contain(fn, exc)
        return ran

    def __len__(self) -> int:
        return len(self._heap)

    def compact(self) -> None:
        live = [entry for entry in self._heap if entry[2].fn is not None]
        heapq.heapify(live)
        self._heap[:] = live
        self._compact_at = max(COMPACT_MIN, 2 * len(live))
