"""The two series the request path updates for every request: a counter cell and a histogram.

Compiled with the core (setup.py's ``CORE``): interpreted, ``Histogram.observe`` was a Python
frame entered twice per request (the request and the PLC round trip), about 4 % of the
data-plane thread at 10 connections x depth 4 (py-spy; benchmarks/README.md, "Issue 14 round
9"). The registry around them (:mod:`mbsec.metrics`) stays interpreted: it runs once per
series, not per request.
"""

from __future__ import annotations

from bisect import bisect_left


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
        self.counts[bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1
