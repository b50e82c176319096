"""The automatic write freeze's state machine (mbsec.flap) on a simulated clock: generated
schedules of link drops, connects, operator thaws and passing time, checked after every step
against a plain model of the rule (docs/config.md, ``[admin.auto_freeze]``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from hypothesis_determinism import no_local_constants

from mbsec.flap import FlapDetector, FlapRule

TARGETS = ("plc-a", "plc-b")


@pytest.fixture(autouse=True)
def _same_schedules_in_any_run() -> Iterator[None]:
    """Schedules that depend on this file only, not on what else the process imported."""
    with no_local_constants():
        yield


class Model:
    """The rule, written from the documentation with the whole history kept."""

    def __init__(self, r: FlapRule) -> None:
        self.r = r
        self.drops: dict[str, list[float]] = {t: [] for t in TARGETS}  # since last freeze/thaw
        self.frozen: set[str] = set()
        self.stable_since: dict[str, float | None] = {t: None for t in TARGETS}

    def drop(self, t: str, now: float) -> bool:
        self.stable_since[t] = None
        if not self.r.enabled:
            return False
        self.drops[t].append(now)
        recent = [d for d in self.drops[t] if d > now - self.r.window]
        if t not in self.frozen and len(recent) >= self.r.drops:
            self.frozen.add(t)
            self.drops[t] = []
            return True
        return False

    def up(self, t: str, now: float) -> None:
        if self.stable_since[t] is None:
            self.stable_since[t] = now

    def thaw(self, t: str) -> None:
        self.frozen.discard(t)
        self.drops[t] = []

    def next_deadline(self) -> float | None:
        times = [s for t in self.frozen if (s := self.stable_since[t]) is not None]
        return min(times) + self.r.stable_for if times else None

    def due(self, now: float) -> set[str]:
        out = set()
        for t in list(self.frozen):
            since = self.stable_since[t]
            if since is not None and now - since >= self.r.stable_for:
                out.add(t)
                self.thaw(t)
        return out


class FlapMachine(RuleBasedStateMachine):
    @initialize(enabled=st.sampled_from([True, True, True, False]), drops=st.integers(1, 3),
                window=st.sampled_from([1.0, 2.0, 4.0]),
                stable_for=st.sampled_from([1.0, 2.0]))
    def setup(self, enabled: bool, drops: int, window: float, stable_for: float) -> None:
        self.rule_ = FlapRule(enabled=enabled, drops=drops, window=window,
                              stable_for=stable_for)
        self.d = FlapDetector(self.rule_)
        self.m = Model(self.rule_)
        self.now = 1000.0
        self.last_drop: dict[str, float] = {}
        self.last_up: dict[str, float] = {}

    def _timers(self) -> None:
        """What the driver does: run what is due at ``now`` (it sleeps until the deadline)."""
        got = set(self.d.due(self.now))
        assert got == self.m.due(self.now)
        for t in got:  # a thaw only after a connect and stable_for with no drop
            assert self.last_up.get(t, -1.0) >= self.last_drop.get(t, -1.0)
            assert self.now - self.last_drop.get(t, -1e9) >= self.rule_.stable_for

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0]))  # exact in binary: boundaries are hit
    def time_passes(self, dt: float) -> None:
        deadline = self.d.next_deadline()
        if deadline is not None and deadline <= self.now + dt:
            assert deadline >= self.now - 1e-9  # the deadline was never missed
            self.now = max(self.now, deadline)
            self._timers()
        self.now += dt
        self._timers()

    @rule(t=st.sampled_from(TARGETS))
    def link_drops(self, t: str) -> None:
        was = t in self.d.frozen
        froze = self.d.drop(t, self.now)
        assert bool(froze) == self.m.drop(t, self.now)
        if froze:
            assert not was and froze >= self.rule_.drops
        self.last_drop[t] = self.now

    @rule(t=st.sampled_from(TARGETS))
    def link_connects(self, t: str) -> None:
        self.d.up(t, self.now)
        self.m.up(t, self.now)
        self.last_up[t] = self.now

    @rule(t=st.sampled_from(TARGETS))
    def operator_thaws(self, t: str) -> None:
        self.d.forget(t)
        self.m.thaw(t)

    @invariant()
    def same_as_model(self) -> None:
        if not hasattr(self, "d"):
            return
        assert self.d.frozen == self.m.frozen
        if not self.rule_.enabled:
            assert not self.d.frozen
        deadline = self.d.next_deadline()
        assert deadline == self.m.next_deadline()  # the driver wakes up exactly then
        if deadline is not None:
            assert self.d.frozen


# the same 100 schedules in every run (derandomize, no example database; see _same_schedules...)
FlapMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                         deadline=None, derandomize=True, database=None)
TestFlapDetector = FlapMachine.TestCase


def test_drops_within_the_window_freeze_and_a_stable_link_thaws() -> None:
    d = FlapDetector(FlapRule(enabled=True, drops=3, window=10.0, stable_for=60.0))
    assert d.drop("p", 0.0) == 0
    assert d.drop("p", 5.0) == 0
    assert d.drop("p", 10.5) == 0  # the drop at 0.0 left the window
    assert d.drop("p", 11.0) == 3
    assert d.frozen == {"p"}
    assert d.next_deadline() is None  # not connected since: never thaws on its own
    d.up("p", 20.0)
    assert d.next_deadline() == 80.0
    d.drop("p", 30.0)  # flapping again: stable only from the next connect
    d.up("p", 31.0)
    assert d.due(90.0) == []
    assert d.due(91.0) == ["p"]
    assert d.frozen == set()


def test_off_by_default_never_freezes() -> None:
    d = FlapDetector(FlapRule())
    assert not any(d.drop("p", float(i) / 10) for i in range(100))
    assert d.frozen == set()
