"""Sharing one PLC fairly: clients served in turn, and a breaker for clients that break links.

Both are plain bookkeeping for :class:`mbsec.path.target.Target`; no I/O, no clock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from mbsec.path.exchange import WAITING, Exchange


class WaitQueue:
    """Requests waiting for a slot: one FIFO per client, the clients in turn (round robin).

    A client that pipelines many requests gets one slot per turn like everybody else, so it
    cannot take a PLC's capacity; its own requests keep their order. ``arrivals`` keeps every
    waiting request in arrival order for the wait deadline (all wait the same time, so the
    oldest is always the next to expire; requests taken meanwhile are skipped lazily).
    """

    def __init__(self) -> None:
        self.queues: dict[Any, collections.deque[Exchange]] = {}
        self.turns: collections.deque[Any] = collections.deque()
        self.arrivals: collections.deque[Exchange] = collections.deque()
        self.count = 0

    def push(self, ex: Exchange) -> None:
        q = self.queues.get(ex.client)
        if q is None:
            q = self.queues[ex.client] = collections.deque()
            self.turns.append(ex.client)
        q.append(ex)
        self.count += 1
        self.arrivals.append(ex)

    def pop(self, place: Callable[[Any], Any]) -> tuple[Exchange, Any] | None:
        """The next request, clients in turn, with the slot ``place(client)`` finds for it
        (None: that client must wait; the next client gets its turn)."""
        turns = self.turns
        for _ in range(len(turns)):
            client = turns[0]
            slot = place(client)
            if slot is None:
                turns.rotate(-1)
                continue
            turns.popleft()
            q = self.queues[client]
            ex = q.popleft()
            arrivals = self.arrivals
            if arrivals and arrivals[0] is ex:  # the usual case: no stale entry to skip
                # later (it would keep the request, and its closed client, alive until then)
                arrivals.popleft()
            if q:
                turns.append(client)
            else:
                del self.queues[client]
            self.count -= 1
            return ex, slot
        return None

    def remove(self, ex: Exchange) -> None:
        q = self.queues[ex.client]
        q.remove(ex)
        self.count -= 1
        if not q:
            del self.queues[ex.client]
            self.turns.remove(ex.client)

    def take(self, keep: Callable[[Any], bool] = lambda client: False) -> list[Exchange]:
        """Take every waiting request of the clients ``keep`` rejects (default: all)."""
        out: list[Exchange] = []
        for client in [c for c in self.queues if not keep(c)]:
            out.extend(self.queues.pop(client))
            self.turns.remove(client)
        self.count -= len(out)
        return out

    def expired(self, now: float) -> tuple[list[Exchange], float | None]:
        """Requests whose wait deadline passed (taken out), and the next deadline."""
        out: list[Exchange] = []
        arrivals = self.arrivals
        while arrivals:
            ex = arrivals[0]
            if ex.state != WAITING:
                arrivals.popleft()
                continue
            if ex.deadline > now:
                return out, ex.deadline
            arrivals.popleft()
            self.remove(ex)
            out.append(ex)
        return out, None


class Breaker:
    """Counts the resets charged to each client (by its blame key: the certificate, so a new
    connection does not start over) and refuses a client that caused ``limit`` of them within
    ``window`` seconds for ``hold`` seconds. A good reply to the client forgives its strikes
    (the target pops them from :attr:`strikes`): only resets in a row count."""

    MAX_KEYS = 4096  # clients remembered; the stale ones are dropped beyond that

    def __init__(self, limit: int, window: float, hold: float) -> None:
        self.limit = limit
        self.window = window
        self.hold = hold
        self.strikes: dict[str, list[float]] = {}
        self.refused: dict[str, float] = {}  # blame key -> refused until

    def refused_until(self, key: str, now: float) -> float | None:
        until = self.refused.get(key)
        if until is None:
            return None
        if now < until:
            return until
        del self.refused[key]
        return None

    def charge(self, key: str, now: float) -> int:
        """One reset caused by ``key``'s request; returns the count when it trips, else 0."""
        times = [t for t in self.strikes.get(key, ()) if t > now - self.window]
        times.append(now)
        if len(times) < self.limit:
            self.strikes[key] = times
            if len(self.strikes) > self.MAX_KEYS:
                self.strikes = {k: v for k, v in self.strikes.items()
                                if v[-1] > now - self.window}
            return 0
        self.strikes.pop(key, None)
        self.refused[key] = now + self.hold
        if len(self.refused) > self.MAX_KEYS:
            self.refused = {k: v for k, v in self.refused.items() if v > now}
        return len(times)
