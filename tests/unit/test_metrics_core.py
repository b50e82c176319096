"""The histogram the request path observes into: the bucket it counts a value in."""

from __future__ import annotations

import math
from bisect import bisect_left

from hypothesis import given, settings
from hypothesis import strategies as st

from mbsec.metrics_core import Histogram

BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=30),
       st.lists(st.floats(-10, 10, allow_nan=False), min_size=0, max_size=12, unique=True))
def test_a_value_is_counted_in_the_first_bucket_whose_bound_is_not_below_it(
        values: list[float], bounds: list[float]) -> None:
    """``bisect_left``'s bucket for every value (bounds as the registry sorts them, the
    benchmark's latency bounds too), the sum and the count: what the exposition reads."""
    for buckets in (tuple(sorted(bounds)), BOUNDS):
        values = [*values, *buckets]  # a value on a bound counts in that bound's bucket
        h = Histogram(buckets)
        expected = [0] * (len(buckets) + 1)
        for v in values:
            h.observe(v)
            expected[bisect_left(buckets, v)] += 1
        assert h.counts == expected
        assert h.count == len(values)
        total = 0.0
        for v in values:
            total += v
        assert h.sum == total or (math.isnan(h.sum) and math.isnan(total))
