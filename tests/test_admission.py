"""mbsec/admission.py without sockets: source prefixes, handshake places (caps, eviction, the
per-prefix rate under pressure) and the rejection log (first event, summaries, the global
budget), by examples and by hypothesis state machines on a simulated clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)
from hypothesis_determinism import no_local_constants

from mbsec.admission import (
    REFUSAL_REASONS,
    Admission,
    Admitted,
    Refused,
    RejectionLog,
    Summary,
    TokenBucket,
    WaitingRoom,
    source_prefix,
)

SIM = settings(max_examples=80, stateful_step_count=50, deadline=None, derandomize=True,
               phases=[Phase.explicit, Phase.generate, Phase.target],
               database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _same_schedules_in_any_run() -> Iterator[None]:
    """Schedules that depend on this file only, not on what else the process imported."""
    with no_local_constants():
        yield


# -- prefixes and buckets ------------------------------------------------------------------------


def test_source_prefix_is_the_24_or_the_64() -> None:
    assert source_prefix("203.0.113.77") == "203.0.113.0/24"
    assert source_prefix("::ffff:203.0.113.77") == "203.0.113.0/24"  # mapped: the IPv4 /24
    assert source_prefix("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_prefix("fe80::1%eth0") == "fe80::/64"
    assert source_prefix("not an address") == "not an address"
    assert source_prefix(None) == "unknown"


def test_token_bucket_starts_full_and_refills_at_its_rate() -> None:
    b = TokenBucket(2.0, 3, now=0.0)
    assert [b.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take(0.4)  # 0.8 tokens
    assert b.take(0.5)
    assert b.full(100.0) and b.tokens == 3


# -- admission, by example -----------------------------------------------------------------------


def adm(**kw: float) -> Admission:
    base = {"max_connections": 10, "max_handshakes": 4, "max_per_source": 5,
            "prefix_rate": 1.0, "prefix_burst": 100}
    base.update(kw)
    return Admission(**base)  # type: ignore[arg-type]


def test_a_silent_handshake_is_evicted_first_and_a_speaking_one_survives() -> None:
    a = adm()
    t = [a.admit(f"10.0.{i}.1", float(i), spoke=False) for i in range(4)]
    assert all(isinstance(x, Admitted) for x in t)
    tickets = [x.ticket for x in t if isinstance(x, Admitted)]
    a.heard(tickets[0])  # the oldest sent its ClientHello
    assert a.admit("10.9.9.8", 5.0, spoke=False) == Refused("too_many_handshakes")  # no chain
    new = a.admit("10.9.9.9", 5.0)  # its ClientHello is there: it may evict
    assert isinstance(new, Admitted) and new.victim == tickets[1]  # oldest *silent* one
    assert a.evicted(tickets[1]) and a.handshakes == 4
    a.closed(tickets[1])
    assert a.connections == 4


def test_without_silent_ones_the_greediest_prefix_pays_or_the_newcomer_is_refused() -> None:
    a = adm()
    greedy = [a.admit("10.0.0.1", 0.0), a.admit("10.0.0.2", 0.0), a.admit("10.0.0.3", 0.0)]
    other = a.admit("10.0.1.1", 0.0)
    for x in [*greedy, other]:
        assert isinstance(x, Admitted)
        a.heard(x.ticket)
    fresh = a.admit("10.0.2.1", 1.0)  # the /24 holding 3 loses its oldest
    assert isinstance(fresh, Admitted) and fresh.victim == greedy[0].ticket  # type: ignore[union-attr]
    a.heard(fresh.ticket)
    # now 2 (greedy), 1, 1: a newcomer from 10.0.2.x would hold 2, no more than the greedy
    # /24: refused; one from a fourth /24 would hold 1 < 2: the greedy /24 pays again
    assert a.admit("10.0.2.2", 1.0) == Refused("too_many_handshakes")
    again = a.admit("10.0.3.1", 1.0)
    assert isinstance(again, Admitted) and again.victim == greedy[1].ticket  # type: ignore[union-attr]
    a.heard(again.ticket)
    assert a.admit("10.0.3.2", 1.0) == Refused("too_many_handshakes")  # every /24 holds 1


def test_established_sessions_keep_their_reserved_room() -> None:
    a = adm(max_connections=6, max_handshakes=2)
    for i in range(4):  # four authenticated sessions
        x = a.admit(f"10.0.{i}.1", 0.0)
        assert isinstance(x, Admitted)
        a.established(x.ticket)
    h1, h2 = a.admit("10.1.0.1", 0.0, spoke=False), a.admit("10.1.1.1", 0.0, spoke=False)
    assert isinstance(h1, Admitted) and isinstance(h2, Admitted)
    third = a.admit("10.1.2.1", 0.0)  # full: a silent handshake makes room, no session does
    assert isinstance(third, Admitted) and third.victim == h1.ticket
    a.closed(h1.ticket)
    a.established(h2.ticket)
    a.established(third.ticket)  # 6 sessions, no handshake left to evict
    assert a.admit("10.1.3.1", 0.0) == Refused("too_many_connections")


def test_per_source_cap_and_the_prefix_rate_only_under_pressure() -> None:
    a = adm(max_handshakes=4, max_per_source=2, prefix_rate=1.0, prefix_burst=2)
    x, y = a.admit("10.0.0.1", 0.0), a.admit("10.0.0.1", 0.0)
    assert a.admit("10.0.0.1", 0.0) == Refused("too_many_connections_from_source")
    for z in (x, y):
        assert isinstance(z, Admitted)
        a.established(z.ticket)  # no handshake in progress: no pressure
    ok = a.admit("10.0.0.2", 0.0)  # the /24's bucket is empty, but there is room: admitted
    assert isinstance(ok, Admitted)
    a.admit("10.0.5.1", 0.0)  # two handshakes of four: under pressure now
    assert a.under_pressure()
    assert a.admit("10.0.0.3", 0.0) == Refused("connection_rate_exceeded")
    assert isinstance(a.admit("10.0.0.3", 1.5), Admitted)  # refilled


def test_a_plant_behind_one_address_reconnects_at_once() -> None:
    """50 masters behind one SCADA host, all at once, with the defaults' shape (burst 100)."""
    a = Admission(max_connections=512, max_handshakes=128, max_per_source=64,
                  prefix_rate=50.0, prefix_burst=100)
    got = [a.admit("10.20.0.5", 0.0) for _ in range(50)]
    assert all(isinstance(x, Admitted) and x.victim is None for x in got)


# -- admission, generated schedules ----------------------------------------------------------------

SOURCES = st.sampled_from([f"10.{p}.0.{h}" for p in range(4) for h in range(1, 4)] +
                          ["2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"])


class AdmissionMachine(RuleBasedStateMachine):
    """Connections arrive, speak, finish or fail their handshakes and close, on a simulated
    clock; after every step the places add up and stay within every cap, and every eviction
    followed the rule."""

    tickets = Bundle("tickets")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.a = Admission(max_connections=12, max_handshakes=5, max_per_source=4,
                           prefix_rate=2.0, prefix_burst=3)
        self.model: dict[int, dict[str, object]] = {}  # ticket -> source, hs, silent, evicted

    def _live_handshakes(self) -> list[int]:
        return [t for t, m in self.model.items() if m["hs"] and not m["evicted"]]

    @rule(dt=st.floats(0, 2))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(target=tickets, source=SOURCES, spoke=st.booleans())
    def arrive(self, source: str, spoke: bool) -> int:
        before = {t: dict(m) for t, m in self.model.items()}
        hs = self._live_handshakes()
        full = len(hs) >= self.a.max_handshakes or (
            len([m for m in self.model.values() if not m["evicted"]]) >= self.a.max_connections)
        per_source = sum(1 for m in self.model.values() if m["source"] == source)
        out = self.a.admit(source, self.now, spoke=spoke)
        if isinstance(out, Refused):
            assert out.reason in REFUSAL_REASONS
            if out.reason == "too_many_connections_from_source":
                assert per_source >= self.a.max_per_source
            elif out.reason == "connection_rate_exceeded":
                assert 2 * len(hs) >= self.a.max_handshakes  # only under pressure
            else:
                assert full
                silent = [t for t in hs if before[t]["silent"]]
                assert not spoke or not silent  # a speaking one would have evicted it
            return -1
        assert per_source < self.a.max_per_source
        if out.victim is not None:
            assert full, "evicted with room to spare"
            assert spoke, "a silent newcomer evicted someone"
            v = before[out.victim]
            assert v["hs"] and not v["evicted"]
            silent = [t for t in hs if before[t]["silent"]]
            if silent:
                assert out.victim == min(silent)  # the oldest silent one
            else:
                mine = sum(1 for t in hs if source_prefix(str(before[t]["source"]))
                           == source_prefix(source))
                theirs = sum(1 for t in hs if source_prefix(str(before[t]["source"]))
                             == source_prefix(str(v["source"])))
                assert theirs > mine + 1, "evicted from a prefix holding no more than ours"
            self.model[out.victim]["evicted"] = True
        else:
            assert not full
        self.model[out.ticket] = {"source": source, "hs": True, "silent": not spoke,
                                  "evicted": False}
        return out.ticket

    @rule(t=tickets)
    def speak(self, t: int) -> None:
        if t in self.model:
            self.a.heard(t)
            self.model[t]["silent"] = False

    @rule(t=tickets)
    def handshake_done(self, t: int) -> None:
        m = self.model.get(t)
        if m is not None and not m["evicted"]:
            self.a.established(t)
            m["hs"] = False

    @precondition(lambda self: bool(self.model))
    @rule(t=consumes(tickets))
    def close(self, t: int) -> None:
        self.a.closed(t)
        self.model.pop(t, None)

    @invariant()
    def places_add_up(self) -> None:
        a = self.a
        live_hs = self._live_handshakes()
        assert a.handshakes == len(live_hs) <= a.max_handshakes
        assert a.connections == len(self.model)
        live = [m for m in self.model.values() if not m["evicted"]]
        assert len(live) == a.places <= a.max_connections
        for src in {str(m["source"]) for m in self.model.values()}:
            n = sum(1 for m in self.model.values() if m["source"] == src)
            assert a.per_source(src) == n <= a.max_per_source
        for t, m in self.model.items():
            assert a.evicted(t) == m["evicted"]


TestAdmissionMachine = AdmissionMachine.TestCase
TestAdmissionMachine.settings = SIM


# -- rejection log -------------------------------------------------------------------------------


def test_first_event_then_one_summary_per_prefix_and_reason() -> None:
    log = RejectionLog(rate=5.0, interval=10.0, now=0.0)
    assert log.offer("10.0.0.0/24", "tls-handshake", "handshake_timeout", 0.0)
    assert not any(log.offer("10.0.0.0/24", "tls-handshake", "handshake_timeout", 0.1 * i)
                   for i in range(1, 50))
    assert log.offer("10.0.0.0/24", "tls-handshake", "not_tls", 1.0)  # another reason
    assert log.next_deadline() == 10.0
    assert log.due(9.9) == []
    assert log.due(10.0) == [Summary("10.0.0.0/24", "tls-handshake", "handshake_timeout", 49,
                                     0.0, 10.0)]
    assert log.next_deadline() == 11.0  # not_tls's interval; nothing suppressed: no summary
    assert log.due(11.0) == [] and log.next_deadline() is None
    assert log.offer("10.0.0.0/24", "tls-handshake", "handshake_timeout", 12.0)  # afresh


def test_the_budget_bounds_what_many_prefixes_write() -> None:
    log = RejectionLog(rate=2.0, interval=5.0, now=0.0)
    written = [log.offer(f"10.{i // 256}.{i % 256}.0/24", "connection-rejected",
                         "too_many_handshakes", i / 1e6) for i in range(1000)]
    assert sum(written) == 2  # the bucket's two tokens
    summaries = log.due(6.0)
    assert summaries[-1].prefix is None and summaries[-1].reason == "budget_exceeded"
    assert summaries[-1].count == 998 and summaries[-1].prefixes == 998


class RejectionLogMachine(RuleBasedStateMachine):
    """Rejections from many prefixes on a simulated clock: every one is written or counted
    in exactly one summary, and what is written never exceeds the budget (the rate times the
    time, plus the bucket, plus one global summary per interval)."""

    def __init__(self) -> None:
        super().__init__()
        self.rate, self.interval = 3.0, 4.0
        self.log = RejectionLog(rate=self.rate, interval=self.interval, now=0.0)
        self.now = 0.0
        self.offered = 0
        self.firsts = 0
        self.summarized = 0
        self.summaries = 0
        self.globals = 0
        self.last_global = -1e9

    @rule(dt=st.floats(0, 3))
    def tick(self, dt: float) -> None:
        self.now += dt
        self._due()

    @rule(p=st.integers(0, 30), reason=st.sampled_from(["not_tls", "handshake_timeout",
                                                        "too_many_handshakes"]),
          n=st.integers(1, 40))
    def flood(self, p: int, reason: str, n: int) -> None:
        for _ in range(n):
            self.offered += 1
            if self.log.offer(f"10.0.{p}.0/24", "tls-handshake", reason, self.now):
                self.firsts += 1

    def _due(self) -> None:
        deadline = self.log.next_deadline()
        if deadline is not None and deadline > self.now:
            assert self.log.due(self.now) == []  # nothing before its deadline
        for s in self.log.due(self.now):
            assert s.count > 0 and s.end <= self.now
            self.summarized += s.count
            if s.prefix is None:
                assert s.start + self.interval <= self.now
                assert self.now - self.last_global >= self.interval or self.last_global < 0
                self.last_global = self.now
                self.globals += 1
            else:
                assert abs(s.end - s.start - self.interval) < 1e-9
                self.summaries += 1

    @invariant()
    def nothing_lost_and_the_budget_holds(self) -> None:
        pending = sum(k.suppressed for k in self.log._keys.values()) + self.log._overflow.count
        assert self.firsts + self.summarized + pending == self.offered
        assert self.firsts + self.summaries <= self.rate * self.now + max(1.0, self.rate) + 1e-6
        assert self.globals <= self.now / self.interval + 1

    def teardown(self) -> None:
        self.now += 2 * self.interval
        self._due()
        self.now += 2 * self.interval
        self._due()
        assert self.firsts + self.summarized == self.offered  # all accounted for at the end


TestRejectionLogMachine = RejectionLogMachine.TestCase
TestRejectionLogMachine.settings = SIM


def test_over_rate_says_what_admit_would_refuse_for_the_rate_without_taking_a_token() -> None:
    a = Admission(max_connections=10, max_handshakes=4, max_per_source=10, prefix_rate=1.0,
                  prefix_burst=2)
    assert not a.over_rate("10.0.0.1", 0.0)  # no bucket yet, no pressure
    assert isinstance(a.admit("10.0.0.1", 0.0), Admitted)
    assert isinstance(a.admit("10.0.0.2", 0.0), Admitted)  # the burst is spent; 2 of 4: pressure
    assert a.over_rate("10.0.0.3", 0.0)
    assert a.over_rate("10.0.0.3", 0.0)  # asking takes nothing
    assert not a.over_rate("10.9.0.1", 0.0)  # another prefix
    assert a.admit("10.0.0.3", 0.0) == Refused("connection_rate_exceeded")
    assert not a.over_rate("10.0.0.3", 1.0)  # a token a second
    assert isinstance(a.admit("10.0.0.3", 1.0), Admitted)


# -- the waiting room ----------------------------------------------------------------------------


def test_waiting_room_serves_each_prefix_in_arrival_order_and_the_prefixes_in_turn() -> None:
    room: WaitingRoom[str] = WaitingRoom(capacity=10, max_wait=2.0)
    for i, prefix in enumerate(["a", "a", "b", "a", "c"]):
        assert room.add(prefix, f"{prefix}{i}", float(i) / 10)
    assert len(room) == 5 and room.waiting("a") == 3
    assert room.prefixes() == ["a", "b", "c"]
    room.to_back(["a"])  # a had its turn: the next pass starts with b
    assert room.prefixes() == ["b", "c", "a"]
    assert room.head("a") == "a0"
    assert [room.pop("a"), room.pop("a"), room.pop("a")] == ["a0", "a1", "a3"]
    assert room.head("a") is None and room.waiting("a") == 0
    room.to_back(["b", "a"])  # a has gone: nothing to move
    assert room.prefixes() == ["c", "b"]
    assert len(room) == 2


def test_waiting_room_bounds_the_room_and_each_prefixs_share() -> None:
    room: WaitingRoom[int] = WaitingRoom(capacity=6, max_wait=2.0)
    assert room.per_prefix == 3
    assert [room.add("flood", i, 0.0) for i in range(5)] == [True, True, True, False, False]
    assert [room.add(f"p{i}", i, 0.0) for i in range(4)] == [True, True, True, False]
    assert len(room) == 6


def test_waiting_room_gives_up_on_who_waited_max_wait_oldest_first() -> None:
    room: WaitingRoom[str] = WaitingRoom(capacity=10, max_wait=2.0)
    room.add("a", "a-old", 0.0)
    room.add("b", "b-old", 0.5)
    room.add("a", "a-new", 1.5)
    assert room.expired(1.9) == []
    assert room.expired(2.5) == ["a-old", "b-old"]
    assert len(room) == 1 and room.prefixes() == ["a"] and room.head("a") == "a-new"
    assert room.drain() == ["a-new"] and len(room) == 0 and room.prefixes() == []


def test_a_pass_over_the_room_stops_after_max_misses_and_the_next_starts_there() -> None:
    """Waiters from 100 prefixes, none of which may come in yet: a pass asks admission at most
    ``max_misses`` times, and four passes give every prefix its turn once."""
    room: WaitingRoom[str] = WaitingRoom(capacity=200, max_wait=4.0)
    for i in range(100):
        room.add(f"p{i}", f"p{i}-0", 0.0)
    asked: list[str] = []

    def busy(item: str) -> Admitted | Refused:
        asked.append(item)
        return Refused("too_many_handshakes")

    for _ in range(4):
        assert room.serve(busy, max_misses=32) == []
    assert asked[:32] == [f"p{i}-0" for i in range(32)]
    assert len(asked) == 128  # 4 passes x 32
    assert asked[:100] == [f"p{i}-0" for i in range(100)]  # each prefix once, in turn
    assert asked[100:] == [f"p{i}-0" for i in range(28)]  # then from the start again
    assert len(room) == 100


def test_a_pass_admits_each_prefix_in_order_until_one_must_wait() -> None:
    room: WaitingRoom[str] = WaitingRoom(capacity=10, max_wait=4.0)
    for item in ["a1", "a2", "a3"]:
        room.add("a", item, 0.0)
    room.add("b", "b1", 0.0)
    tokens = {"a": 2, "b": 0}

    def admit(item: str) -> Admitted | Refused:
        if item == "b1":
            return Refused("too_many_connections_from_source")  # not waitable: out, refused
        if tokens[item[0]] == 0:
            return Refused("connection_rate_exceeded")
        tokens[item[0]] -= 1
        return Admitted(int(item[1:]))

    out = room.serve(admit, max_misses=8)
    assert out == [("a1", Admitted(1)), ("a2", Admitted(2)),
                   ("b1", Refused("too_many_connections_from_source"))]
    assert room.prefixes() == ["a"] and room.head("a") == "a3"


class WaitingRoomMachine(RuleBasedStateMachine):
    """Arrivals from a few prefixes, admissions of heads, expiries and ticks of a simulated
    clock, against a model (one list per prefix): each prefix is served in arrival order,
    nobody is lost or served twice, the bounds hold, and nobody leaves ``expired`` before
    ``max_wait`` or stays after it."""

    def __init__(self) -> None:
        super().__init__()
        self.room: WaitingRoom[int] = WaitingRoom(capacity=7, max_wait=2.0, per_prefix=4)
        self.model: dict[str, list[tuple[float, int]]] = {}
        self.now = 0.0
        self.next = 0

    @rule(dt=st.floats(0, 1.5))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(prefix=st.sampled_from(["a", "b", "c"]))
    def arrive(self, prefix: str) -> None:
        item, self.next = self.next, self.next + 1
        queued = self.room.add(prefix, item, self.now)
        mine = self.model.setdefault(prefix, [])
        fits = (sum(len(q) for q in self.model.values()) < 7 and len(mine) < 4)
        assert queued == fits
        if queued:
            mine.append((self.now, item))
        elif not mine:
            del self.model[prefix]

    @rule(data=st.data())
    def turns(self, data: st.DataObject) -> None:
        order = self.room.prefixes()
        had = data.draw(st.lists(st.sampled_from(order), unique=True) if order else st.just([]))
        self.room.to_back(had)
        assert self.room.prefixes() == [p for p in order if p not in had] + had

    @rule(data=st.data())
    def admit_a_head(self, data: st.DataObject) -> None:
        order = self.room.prefixes()
        assert sorted(order) == sorted(self.model)
        if not order:
            return
        prefix = data.draw(st.sampled_from(order))
        assert self.room.head(prefix) == self.model[prefix][0][1]
        assert self.room.pop(prefix) == self.model[prefix].pop(0)[1]
        if not self.model[prefix]:
            del self.model[prefix]

    @rule()
    def expire(self) -> None:
        gone = self.room.expired(self.now)
        want = [i for q in self.model.values() for t, i in q if self.now - t >= 2.0]
        assert sorted(gone) == sorted(want)
        for prefix in list(self.model):
            self.model[prefix] = [(t, i) for t, i in self.model[prefix] if self.now - t < 2.0]
            if not self.model[prefix]:
                del self.model[prefix]

    @invariant()
    def the_room_is_the_model(self) -> None:
        assert len(self.room) == sum(len(q) for q in self.model.values()) <= 7
        for prefix, q in self.model.items():
            assert self.room.waiting(prefix) == len(q) <= 4
            assert self.room.head(prefix) == q[0][1]


TestWaitingRoomMachine = WaitingRoomMachine.TestCase
TestWaitingRoomMachine.settings = SIM
