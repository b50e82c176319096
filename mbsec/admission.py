"""The edge toward peers without a certificate: who may start a handshake, and how much of the
log their rejections may take. Sans-IO: no socket, no clock (``now`` is passed in), no logger.

Two parts, both keyed by the **source prefix** (IPv4 /24, IPv6 /64: one attacker rarely holds
only one address, one plant network rarely spans more than one /24):

:class:`Admission` decides at accept, before TLS, and tracks every connection until it closes:

* ``max_connections`` counts all of them; ``max_handshakes`` (smaller) caps those still in
  their handshake, so authenticated sessions always keep ``max_connections - max_handshakes``
  places that nobody without a certificate can take;
* ``max_per_source`` per address, as before;
* a token bucket per prefix (``prefix_connection_rate`` per second, ``prefix_connection_burst``
  deep), enforced only while at least half the handshake places are taken: like the kernel's
  SYN cookies it engages under pressure, so a busy legitimate host (a test rig, a historian
  opening short connections) is never throttled while the proxy has room;
* when every handshake place is taken, a newcomer that has **spoken** (its ClientHello is
  already there: a legitimate TLS client sends it right after connecting, so by the time a
  loaded proxy accepts it, it has arrived) **evicts** instead of being refused: the oldest
  handshake that has not sent a byte yet, else the oldest handshake of the prefix holding the
  most places, if that prefix holds more than the newcomer's would. A silent newcomer never
  evicts, so an evicted silent connection that reconnects at once is refused instead of
  evicting the next one (no chain of evictions): a silent flood is refused cheaply, and a
  fresh address that speaks gets in.

:class:`RejectionLog` decides which rejection events of unauthenticated peers are written
(anchors: the kernel's ``printk_ratelimit``, Suricata's ``threshold: type both, track by_src``):
per (prefix, reason) the first event of an interval is written, the others are counted and
summed up in one summary when the interval ends; first events and summaries share one global
budget (a token bucket of ``rate`` events per second), and what the budget refuses is summed
up in one global summary per interval. Whatever the peers do, at most ``rate`` events per
second plus one global summary per interval are written, so the bytes a flood can write are
bounded by the configuration, not by the attacker.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "WAITABLE_REASONS",
    "Admission",
    "Admitted",
    "Refused",
    "RejectionLog",
    "Summary",
    "TokenBucket",
    "WaitingRoom",
    "source_prefix",
]


def source_prefix(ip: str | None) -> str:
    """The prefix rejections and connection rates are counted by: ``a.b.c.0/24`` for IPv4
    (an IPv4-mapped IPv6 address too), ``x:x:x:x::/64`` for IPv6; anything unparsable is
    its own key."""
    if ip is None:
        return "unknown"
    if ip.count(".") == 3 and ":" not in ip:  # the common case, without ipaddress (per accept)
        head, _, last = ip.rpartition(".")
        if last.isdigit() and all(p.isdigit() for p in head.split(".")):
            return head + ".0/24"
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is None:
            return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
        addr = mapped
    return str(ipaddress.IPv4Network((int(addr) >> 8 << 8, 24)))


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity``; starts full."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self.refill(now)
        return self.tokens >= self.capacity


# -- admission ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    source: str
    prefix: str
    since: float
    handshaking: bool = True
    silent: bool = True
    evicted: bool = False


@dataclass(frozen=True, slots=True)
class Admitted:
    """Admit the connection as ``ticket``; first evict ``victim`` (a ticket), if any."""

    ticket: int
    victim: int | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    """Refuse the connection at accept (``reason``: the ``connection-rejected`` reason)."""

    reason: str


#: the ``connection-rejected`` reasons :meth:`Admission.admit` returns
REFUSAL_REASONS = ("too_many_connections", "too_many_connections_from_source",
                   "too_many_handshakes", "connection_rate_exceeded")


class Admission:
    """Connection and handshake places: admit at accept, then follow each connection through
    :meth:`heard` (its first byte), :meth:`established` (handshake done) and :meth:`closed`."""

    def __init__(self, *, max_connections: int, max_handshakes: int, max_per_source: int,
                 prefix_rate: float, prefix_burst: int) -> None:
        self.max_connections = max_connections
        self.max_handshakes = min(max_handshakes, max_connections)
        self.max_per_source = max_per_source
        self.prefix_rate = prefix_rate
        self.prefix_burst = prefix_burst
        self._entries: dict[int, _Entry] = {}
        #: handshakes that have not sent a byte, oldest first
        self._silent: OrderedDict[int, None] = OrderedDict()
        #: handshakes per prefix, each prefix's oldest first
        self._by_prefix: dict[str, OrderedDict[int, None]] = {}
        self._per_source: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._next = 0
        self.handshakes = 0
        self.evictions = 0
        self._evicted_open = 0  # evicted, socket not closed yet: not counted as a place

    # -- views -------------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections not yet closed, evicted ones included."""
        return len(self._entries)

    @property
    def places(self) -> int:
        """Places taken: connections, without the evicted ones about to close (their place
        went to whoever evicted them)."""
        return len(self._entries) - self._evicted_open

    def per_source(self, source: str) -> int:
        return self._per_source.get(source, 0)

    def handshakes_of(self, prefix: str) -> int:
        held = self._by_prefix.get(prefix)
        return len(held) if held is not None else 0

    def under_pressure(self) -> bool:
        """At least half the handshake places are taken: the per-prefix rate applies."""
        return 2 * self.handshakes >= self.max_handshakes

    # -- accept ------------------------------------------------------------------------

    def full(self) -> bool:
        """A silent newcomer would be refused now (every place or handshake place taken)."""
        return self.handshakes >= self.max_handshakes or self.places >= self.max_connections

    def over_rate(self, source: str, now: float) -> bool:
        """A newcomer from ``source`` would be refused for its prefix's rate now (nothing is
        taken): a silent one then gets its probation, as when every place is taken."""
        if not self.under_pressure():
            return False
        bucket = self._buckets.get(source_prefix(source))
        if bucket is None:
            return False
        bucket.refill(now)
        return bucket.tokens < 1.0

    def admit(self, source: str, now: float, *, spoke: bool = True) -> Admitted | Refused:
        """``spoke``: the connection's first bytes have arrived; only such a newcomer may
        evict a handshake when every place is taken."""
        prefix = source_prefix(source)
        bucket = self._buckets.get(prefix)
        if bucket is None:
            bucket = self._buckets[prefix] = TokenBucket(self.prefix_rate, self.prefix_burst,
                                                         now)
            if len(self._buckets) > 4 * self.max_connections + 1024:
                self._forget_full_buckets(now)
        within_rate = bucket.take(now)  # charged always: the rate is a fact about the prefix
        if self._per_source.get(source, 0) >= self.max_per_source:
            return Refused("too_many_connections_from_source")
        if not within_rate and self.under_pressure():
            return Refused("connection_rate_exceeded")
        victim: int | None = None
        if self.full():
            if self.handshakes == 0:  # every place is an authenticated session's
                return Refused("too_many_connections")
            victim = self._victim(prefix) if spoke else None
            if victim is None:
                return Refused("too_many_handshakes" if self.handshakes >= self.max_handshakes
                               else "too_many_connections")
            self._evict(victim)
        ticket = self._next
        self._next += 1
        self._entries[ticket] = _Entry(source, prefix, now, silent=not spoke)
        if not spoke:
            self._silent[ticket] = None
        self._by_prefix.setdefault(prefix, OrderedDict())[ticket] = None
        self._per_source[source] = self._per_source.get(source, 0) + 1
        self.handshakes += 1
        return Admitted(ticket, victim)

    def _victim(self, prefix: str) -> int | None:
        if self._silent:
            return next(iter(self._silent))
        mine = self.handshakes_of(prefix) + 1  # what the newcomer's prefix would hold
        best: str | None = None
        most = mine
        for p, held in self._by_prefix.items():
            if len(held) > most:
                best, most = p, len(held)
        if best is None:
            return None
        return next(iter(self._by_prefix[best]))

    def _evict(self, ticket: int) -> None:
        """The victim's place is free at once (its handshake is cancelled by the caller)."""
        entry = self._entries[ticket]
        self._leave_handshake(ticket, entry)
        entry.evicted = True
        self._evicted_open += 1
        self.evictions += 1

    def _leave_handshake(self, ticket: int, entry: _Entry) -> None:
        if entry.handshaking:
            entry.handshaking = False
            self.handshakes -= 1
            self._silent.pop(ticket, None)
            held = self._by_prefix[entry.prefix]
            del held[ticket]
            if not held:
                del self._by_prefix[entry.prefix]

    def _forget_full_buckets(self, now: float) -> None:
        """A full bucket is as good as none: dropped, so many prefixes cannot grow the table."""
        for p in [p for p, b in self._buckets.items() if b.full(now)]:
            del self._buckets[p]

    # -- the connection's life ---------------------------------------------------------

    def heard(self, ticket: int) -> None:
        """The connection sent its first byte: it is no longer a silent handshake."""
        entry = self._entries.get(ticket)
        if entry is not None and entry.silent:
            entry.silent = False
            self._silent.pop(ticket, None)

    def established(self, ticket: int) -> None:
        """The handshake succeeded: the connection leaves the handshake places."""
        entry = self._entries.get(ticket)
        if entry is not None:
            self._leave_handshake(ticket, entry)

    def evicted(self, ticket: int) -> bool:
        entry = self._entries.get(ticket)
        return entry is not None and entry.evicted

    def closed(self, ticket: int) -> None:
        entry = self._entries.pop(ticket, None)
        if entry is None:
            return
        self._leave_handshake(ticket, entry)
        if entry.evicted:
            self._evicted_open -= 1
        n = self._per_source[entry.source] - 1
        if n:
            self._per_source[entry.source] = n
        else:
            del self._per_source[entry.source]


# -- rejection log -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    """Rejections not written during ``[start, end)``: ``count`` of ``action``/``reason`` from
    ``prefix``; the global summary (what the budget refused) has ``prefix`` None, ``reason``
    ``"budget_exceeded"``, ``action`` None and ``prefixes`` the number of distinct prefixes."""

    prefix: str | None
    action: str | None
    reason: str
    count: int
    start: float
    end: float
    prefixes: int = 1


@dataclass(eq=False)
class _Key:
    start: float  # when this key's interval began (its first event, written)
    suppressed: int = 0


@dataclass(eq=False)
class _Overflow:
    start: float = -1.0
    count: int = 0
    prefixes: set[str] = field(default_factory=set)


#: refusals a newcomer that has spoken waits out in the :class:`WaitingRoom` instead of
#: being refused at once: both end as soon as handshakes finish or the prefix's bucket refills
WAITABLE_REASONS = frozenset(("connection_rate_exceeded", "too_many_handshakes"))

T = TypeVar("T")


class WaitingRoom(Generic[T]):
    """Newcomers that have spoken (their ClientHello is there) but found no handshake place or
    no token of their prefix's rate: they wait here, holding a socket and no TLS state, for at
    most ``max_wait`` seconds, in arrival order within their prefix, and the prefixes take
    turns.

    Why: a plant's masters behind one SCADA host reconnect all at once after a network blip;
    refused, each sat in the tarpit until its reset and reconnected seconds later (the reconnect
    storm benchmark: 61-392 attempts stalled 5 s, the last master served after 5-6 s where
    haproxy took 1.6 s). Waiting, they are served first come, first served as places free.
    One prefix holds at most ``per_prefix`` places of the room (half by default), and a prefix
    whose head must still wait never holds another's back, so a flood that speaks from one
    prefix costs that prefix its turn, not everyone's. Sans-IO: the caller passes the clock
    and drives the retries (:meth:`serve`, :meth:`expired`)."""

    __slots__ = ("_queues", "_size", "capacity", "max_wait", "per_prefix")

    def __init__(self, capacity: int, max_wait: float, per_prefix: int | None = None) -> None:
        self.capacity = capacity
        self.max_wait = max_wait
        self.per_prefix = max(1, capacity // 2) if per_prefix is None else per_prefix
        self._queues: OrderedDict[str, deque[tuple[float, T]]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def waiting(self, prefix: str) -> int:
        q = self._queues.get(prefix)
        return len(q) if q is not None else 0

    def add(self, prefix: str, item: T, now: float) -> bool:
        """Queue ``item`` behind its prefix's; False (nothing queued) when the room or the
        prefix's share of it is full."""
        if self._size >= self.capacity:
            return False
        q = self._queues.get(prefix)
        if q is None:
            q = self._queues[prefix] = deque()
        elif len(q) >= self.per_prefix:
            return False
        q.append((now, item))
        self._size += 1
        return True

    def prefixes(self) -> list[str]:
        """The prefixes with someone waiting, in turn order."""
        return list(self._queues)

    def to_back(self, prefixes: list[str]) -> None:
        """The prefixes that had their turn (and still wait) go to the back of the order."""
        for prefix in prefixes:
            if prefix in self._queues:
                self._queues.move_to_end(prefix)

    def head(self, prefix: str) -> T | None:
        q = self._queues.get(prefix)
        return q[0][1] if q else None

    def pop(self, prefix: str) -> T:
        """Take the prefix's head out (admitted, or refused for another reason)."""
        q = self._queues[prefix]
        _since, item = q.popleft()
        self._size -= 1
        if not q:
            del self._queues[prefix]
        return item

    def serve(self, admit: Callable[[T], Admitted | Refused], max_misses: int
              ) -> list[tuple[T, Admitted | Refused]]:
        """One pass: each prefix in turn offers its heads to ``admit`` until one must still
        wait (a refusal in :data:`WAITABLE_REASONS`: a miss); every other verdict takes the
        head out and is returned with it, in order. The pass ends after ``max_misses`` misses,
        and the prefixes it visited go to the back, so the next pass starts where this one
        stopped: a pass costs at most ``max_misses`` refused admissions however many prefixes
        wait, and every prefix gets its turn."""
        out: list[tuple[T, Admitted | Refused]] = []
        visited: list[str] = []
        misses = 0
        for prefix in self.prefixes():
            if misses >= max_misses:
                break
            visited.append(prefix)
            while (head := self.head(prefix)) is not None:
                verdict = admit(head)
                if isinstance(verdict, Refused) and verdict.reason in WAITABLE_REASONS:
                    misses += 1
                    break
                self.pop(prefix)
                out.append((head, verdict))
        self.to_back(visited)
        return out

    def expired(self, now: float) -> list[T]:
        """Take out everyone who has waited ``max_wait`` or longer (each prefix's oldest are at
        its front, so only fronts are looked at)."""
        out: list[T] = []
        for prefix in list(self._queues):
            q = self._queues[prefix]
            while q and now - q[0][0] >= self.max_wait:
                out.append(q.popleft()[1])
                self._size -= 1
            if not q:
                del self._queues[prefix]
        return out

    def drain(self) -> list[T]:
        """Everyone, oldest first per prefix (at shutdown)."""
        out = [item for q in self._queues.values() for _since, item in q]
        self._queues.clear()
        self._size = 0
        return out


class RejectionLog:
    """Which rejections of unauthenticated peers are written, and the summaries of the rest.

    ``offer(prefix, action, reason, now)`` -> True: write this event now; False: it is
    counted. ``due(now)`` returns the summaries whose interval has ended (write each, in
    order); ``next_deadline()`` says when to call it next.
    """

    OVERFLOW = "budget_exceeded"

    def __init__(self, *, rate: float, interval: float, now: float,
                 burst: float | None = None) -> None:
        self.interval = interval
        self.budget = TokenBucket(rate, burst if burst is not None else max(1.0, rate), now)
        self._keys: dict[tuple[str, str, str], _Key] = {}
        self._overflow = _Overflow()
        self.written = 0
        self.suppressed = 0

    def offer(self, prefix: str, action: str, reason: str, now: float) -> bool:
        key = (prefix, action, reason)
        state = self._keys.get(key)
        if state is not None:  # within this key's interval: counted in its summary
            state.suppressed += 1
            self.suppressed += 1
            return False
        if not self.budget.take(now):  # counted in the global summary; no key is kept, so
            self._overflowed(prefix, now)  # memory is bounded by the budget, not the peers
            self.suppressed += 1
            return False
        self._keys[key] = _Key(now)
        self.written += 1
        return True

    def _overflowed(self, prefix: str, now: float) -> None:
        o = self._overflow
        if o.count == 0:
            o.start = now
        o.count += 1
        if len(o.prefixes) < 65536:  # a count of distinct prefixes, bounded in memory
            o.prefixes.add(prefix)

    def next_deadline(self) -> float | None:
        starts = [s.start for s in self._keys.values()]
        if self._overflow.count:
            starts.append(self._overflow.start)
        return min(starts) + self.interval if starts else None

    def due(self, now: float, *, final: bool = False) -> list[Summary]:
        """Summaries of the intervals that ended by ``now``; their keys start afresh.
        ``final`` (the proxy stops): every interval ends now."""
        out: list[Summary] = []
        for key, state in list(self._keys.items()):
            end = state.start + self.interval
            if final:
                end = min(end, now)
            elif end > now:
                continue
            del self._keys[key]
            if state.suppressed:
                prefix, action, reason = key
                if self.budget.take(now):
                    self.written += 1
                    out.append(Summary(prefix, action, reason, state.suppressed, state.start,
                                       end))
                else:  # no budget for the summary either: the global one carries its count
                    if self._overflow.count == 0:
                        self._overflow.start = now
                    self._overflow.count += state.suppressed
                    self._overflow.prefixes.add(prefix)
        o = self._overflow
        if o.count and (final or o.start + self.interval <= now):
            out.append(Summary(None, None, self.OVERFLOW, o.count, o.start, now,
                               len(o.prefixes)))
            self.written += 1
            self._overflow = _Overflow()
        return out
