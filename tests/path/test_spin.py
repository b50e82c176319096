"""The adaptive busy-poll rule (mbsec.path.spin) against a plain model, on generated
schedules of passes: no clock, no sockets (the loop's real spin is in tests/e2e)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mbsec.path.spin import DENSE, MAX_SKIP, NONE, REPLY, SpinPolicy

#: one pass: what it did (sent upstream, dense), whether the loop would sleep, and whether a
#: spin, if one runs, finds an event
PASSES = st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
                  max_size=400)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(PASSES)
def test_spins_back_off_per_kind_as_the_model_says(passes: list[tuple[bool, bool, bool, bool]]
                                                   ) -> None:
    policy = SpinPolicy(0.001)
    misses = {REPLY: 0, DENSE: 0}  # consecutive spins that found nothing, per kind
    sleeps_left = {REPLY: 0, DENSE: 0}
    for sent, dense, sleeps, found in passes:
        kind = policy.kind(sent, dense)
        assert kind == (REPLY if sent else DENSE if dense else NONE)
        spins = policy.should_spin(kind, 0.5 if sleeps else 0.0)
        if kind == NONE or not sleeps:
            assert not spins  # and no backoff is spent
            continue
        if sleeps_left[kind]:
            assert not spins
            sleeps_left[kind] -= 1
            continue
        assert spins
        policy.spun(kind, found)
        if found:
            misses[kind] = 0
        else:
            misses[kind] += 1
            sleeps_left[kind] = min(MAX_SKIP, 2 ** (misses[kind] - 1))


def test_a_slow_plc_backs_off_to_64_and_a_reply_resets_it() -> None:
    policy = SpinPolicy(0.001)
    assert policy.should_spin(REPLY, 1.0)
    skipped = []
    for _ in range(9):  # nine spins that find nothing: 1, 2, 4 ... 64, 64 passes asleep
        policy.spun(REPLY, False)
        n = 0
        while not policy.should_spin(REPLY, 1.0):  # ends at the next spin granted
            n += 1
        skipped.append(n)
    assert skipped == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert policy.should_spin(DENSE, 1.0)  # the other kind never backed off
    policy.spun(REPLY, True)  # the granted spin found the reply: no backoff left
    policy.spun(REPLY, False)
    assert not policy.should_spin(REPLY, 1.0)  # one pass asleep again, not 64
    assert policy.should_spin(REPLY, 1.0)


def test_dense_means_events_within_one_window() -> None:
    policy = SpinPolicy(0.001)
    assert policy.active(True, 0.0005)
    assert not policy.active(True, 0.002)
    assert not policy.active(False, 0.0)
