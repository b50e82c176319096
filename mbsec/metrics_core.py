"""The two series the request path updates for every request: a counter cell and a histogram.

Compiled with the core (setup.py's ``CORE``): interpreted, ``Histogram.observe`` was a Python
frame entered twice per request (the request and the PLC round trip), about 4 % of the
data-plane thread at 10 connections x depth 4 (py-spy; benchmarks/README.md, "Issue 14 round
9"). The registry around them (:mod:`mbsec.metrics`) stays interpreted: it runs once per
series, not per request.
"""

from __future__ import annotations


class Cell:
    """One counter series; a hot path keeps it and adds to ``value`` directly."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class Histogram:
    """One histogram series: cumulative-free bucket counts (the exposition sums them), the sum
    and the count, as Prometheus's text format wants them."""

    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        """Count ``v`` in the first bucket whose bound is >= ``v`` (``bisect_left``'s index),
        found by walking up from the lowest bound: compiled, the bounds are compared as
        doubles, where ``bisect_left`` compared objects through generic calls, and the
        values the hot path observes (request and PLC round-trip times) sit in the lowest
        few buckets (benchmarks/README.md, issue 14 round 10)."""
        buckets = self.buckets
        n = len(buckets)
        i = 0
        while i < n and buckets[i] < v:
            i += 1
        counts = self.counts
        c: int = counts[i]
        counts[i] = c + 1
        self.sum += v
        self.count += 1
