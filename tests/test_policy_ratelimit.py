"""Rate limits with a fake clock: token buckets per identity, writes separately, in-flight cap."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbsec.identity import PeerIdentity
from mbsec.policy import Policy, Principal, RateLimiter, load_policy_text
from mbsec.policy.cases import build_access
from mbsec.policy.engine import RateLimit
from mbsec.policy.ratelimit import (
    REASON_IN_FLIGHT,
    REASON_REQUEST_RATE,
    REASON_WRITE_RATE,
    State,
)
from mbsec.policy.ratelimit import admit as admit_state

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
READ = build_access(3)
WRITE = build_access(6, values=(1,))

POLICY = """\
version: 1
default: deny
limits:
  default: {requests_per_second: 2, burst: 3, max_in_flight: 10}
  roles:
    eng: {writes_per_second: 1, write_burst: 2}
    slow: {requests_per_second: 1, burst: 1, max_in_flight: 1}
rules: []
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def who(p: Policy, role: str | None, fp: str = "aa", source: str = "10.0.0.1") -> Principal:
    ident = None if fp == "" else PeerIdentity(
        subject="CN=x", common_name="x", organizational_units=(), san_dns=(), san_ip=(),
        san_uri=(), issuer="CN=ca", serial=1, fingerprint_sha256=fp * 32, not_before=T0,
        not_after=T0, role=role)
    return p.principal(ident, source)


def setup() -> tuple[Policy, FakeClock, RateLimiter]:
    p = load_policy_text(POLICY)
    clock = FakeClock()
    return p, clock, RateLimiter(p, clock)


def admit(lim: RateLimiter, pr: Principal, access: object = READ) -> str | None:
    reason = lim.acquire(pr, access)  # type: ignore[arg-type]
    if reason is None:
        lim.release(pr)
    return reason


def test_burst_then_refill() -> None:
    p, clock, lim = setup()
    pr = who(p, None)
    assert [admit(lim, pr) for _ in range(4)] == [None, None, None, REASON_REQUEST_RATE]
    clock.now += 0.49
    assert admit(lim, pr) == REASON_REQUEST_RATE
    clock.now += 0.01  # 0.5 s at 2/s = one token
    assert admit(lim, pr) is None
    assert admit(lim, pr) == REASON_REQUEST_RATE
    clock.now += 100  # refills to the burst, not beyond
    assert [admit(lim, pr) for _ in range(4)] == [None, None, None, REASON_REQUEST_RATE]


def test_writes_have_their_own_bucket_and_inherit_the_default() -> None:
    p, clock, lim = setup()
    pr = who(p, "eng")
    assert admit(lim, pr, WRITE) is None
    assert admit(lim, pr, WRITE) is None
    assert admit(lim, pr, WRITE) == REASON_WRITE_RATE
    assert admit(lim, pr, READ) is None  # the third request token
    assert admit(lim, pr, READ) == REASON_REQUEST_RATE
    clock.now += 1.0
    assert admit(lim, pr, WRITE) is None  # one write token back, two request tokens back
    assert admit(lim, pr, READ) is None


def test_refused_write_does_not_spend_a_request_token() -> None:
    p, _, lim = setup()
    pr = who(p, "eng")
    assert admit(lim, pr, WRITE) is None and admit(lim, pr, WRITE) is None
    assert admit(lim, pr, WRITE) == REASON_WRITE_RATE
    assert admit(lim, pr, READ) is None  # the third request token is still there


def test_in_flight_cap_and_release() -> None:
    p, clock, lim = setup()
    pr = who(p, "slow")
    assert lim.acquire(pr, READ) is None
    assert lim.in_flight(pr) == 1
    clock.now += 10
    assert lim.acquire(pr, READ) == REASON_IN_FLIGHT
    lim.release(pr)
    assert lim.in_flight(pr) == 0
    assert lim.acquire(pr, READ) is None
    lim.release(pr)
    lim.release(pr)  # an extra release never goes negative
    assert lim.in_flight(pr) == 0


def test_budgets_are_per_identity_not_per_connection() -> None:
    p, _, lim = setup()
    a1 = who(p, None, "aa", "10.0.0.1")
    a2 = who(p, None, "aa", "10.0.0.2")  # same certificate, another connection
    b = who(p, None, "bb")
    assert [admit(lim, x) for x in (a1, a2, a1)] == [None, None, None]
    assert admit(lim, a2) == REASON_REQUEST_RATE
    assert admit(lim, b) is None


def test_anonymous_clients_are_keyed_by_source_ip() -> None:
    p, _, lim = setup()
    x, y = who(p, None, "", "10.0.0.1"), who(p, None, "", "10.0.0.2")
    assert x.key == "ip:10.0.0.1"
    for _ in range(3):
        assert admit(lim, x) is None
    assert admit(lim, x) == REASON_REQUEST_RATE
    assert admit(lim, y) is None


def test_no_limits_means_unlimited() -> None:
    p = load_policy_text("version: 1\ndefault: deny\nrules: []\n")
    lim = RateLimiter(p, FakeClock())
    pr = who(p, None)
    assert all(lim.acquire(pr, WRITE) is None for _ in range(1000))


def test_idle_entries_are_pruned() -> None:
    p = load_policy_text(POLICY)
    clock = FakeClock()
    lim = RateLimiter(p, clock, max_entries=3)
    for fp in ("01", "02", "03"):
        assert admit(lim, who(p, None, fp)) is None
    clock.now += 10  # everyone refilled and idle
    assert admit(lim, who(p, None, "04")) is None
    assert len(lim._state) <= 3


def test_limit_for_is_per_role_set_and_stays_right_when_asked_again() -> None:
    # limit_for is cached per role set (it is asked once per request): every role set keeps
    # its own answer, the first matching roles entry wins, and a repeated question (cache
    # hit) gives the same object as the first one (cache miss).
    p = load_policy_text(POLICY)
    eng, slow = dict(p.role_limits)["eng"], dict(p.role_limits)["slow"]
    cases = [
        (frozenset(), p.default_limit),
        (frozenset({"operator"}), p.default_limit),
        (frozenset({"eng"}), eng),
        (frozenset({"slow"}), slow),
        (frozenset({"slow", "eng"}), eng),  # file order: eng comes first
    ]
    for _ in range(2):
        for roles, expected in cases:
            assert p.limit_for(roles) is expected
    # the "slow" role's own bucket applies through the limiter too, after the cache warmed up
    lim = RateLimiter(p, FakeClock())
    pr = who(p, "slow")
    assert [admit(lim, pr) for _ in range(2)] == [None, REASON_REQUEST_RATE]


def test_a_copied_policy_does_not_share_the_limit_cache() -> None:
    import dataclasses

    p = load_policy_text(POLICY)
    assert p.limit_for(frozenset({"slow"})) is dict(p.role_limits)["slow"]
    q = dataclasses.replace(p, role_limits=())
    assert q.limit_for(frozenset({"slow"})) is q.default_limit
    assert p.limit_for(frozenset({"slow"})) is dict(p.role_limits)["slow"]


def test_successor_carries_spent_budgets_and_in_flight_into_a_reloaded_policy() -> None:
    p, clock, lim = setup()
    pr = who(p, "slow")
    assert lim.acquire(pr, READ) is None  # in flight, and the one token of the burst spent
    p2 = load_policy_text(POLICY.replace("max_in_flight: 1}", "max_in_flight: 2}"))
    nxt = lim.successor(p2)
    pr2 = who(p2, "slow")
    assert nxt.in_flight(pr2) == 1
    assert nxt.acquire(pr2, READ) == REASON_REQUEST_RATE  # no refill from the reload
    lim.release(pr)  # released on the limiter that granted it: the same counter
    assert nxt.in_flight(pr2) == 0
    clock.now += 1.0
    assert admit(nxt, pr2) is None


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(rps=st.one_of(st.none(), st.floats(0.1, 1000)), burst=st.floats(1, 100),
       wps=st.one_of(st.none(), st.floats(0.1, 1000)), wburst=st.floats(1, 100),
       cap=st.one_of(st.none(), st.integers(1, 4)), tokens=st.floats(0, 100),
       wtokens=st.floats(0, 100), in_flight=st.integers(0, 5),
       stamp=st.floats(0, 10), now=st.floats(0, 20), write=st.booleans())
def test_admit_refills_exactly_as_state_refill(
    rps: float | None, burst: float, wps: float | None, wburst: float, cap: int | None,
    tokens: float, wtokens: float, in_flight: int, stamp: float, now: float, write: bool,
) -> None:
    """``admit`` has State.refill written out (it runs per request): both must agree, then
    admit takes exactly one token (and one write token for a write) when it admits."""
    limit = RateLimit(rps, burst, wps, wburst, cap)
    got = State(limit, tokens, wtokens, stamp, in_flight)
    want = State(limit, tokens, wtokens, stamp, in_flight)
    verdict = admit_state(got, WRITE if write else READ, now)
    want.refill(now)
    if verdict is None:
        want.in_flight += 1
        if rps is not None:
            want.tokens -= 1.0
        if write and wps is not None:
            want.write_tokens -= 1.0
    assert (got.tokens, got.write_tokens, got.stamp, got.in_flight) == pytest.approx(
        (want.tokens, want.write_tokens, want.stamp, want.in_flight))
