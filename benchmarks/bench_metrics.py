"""What counting costs per request: mbsec's plain cells against prometheus_client's metrics.

An allowed request on the request path counts three things: ``mbsec_requests_total`` (a
:class:`~mbsec.metrics.Cell` the connection keeps), ``mbsec_role_requests_total`` (one cell per
role label, issue 11) and the two latency histograms (bound ``observe``). This times that set
per request, as mbsec does it (before and after the per-role counter) and as it would cost with
prometheus_client's own ``Counter``/``Histogram`` (``labels()`` resolved per request, and the
best case: children bound once), plus one scrape of a store of realistic size.

Plain script: ``.venv/bin/python benchmarks/bench_metrics.py [--loops N] [--rounds R]``;
prints the median and minimum ns per request over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram

from mbsec.metrics import Metrics, counter, observer
from mbsec.metrics_export import render


def mbsec_before(m: Metrics) -> Callable[[], None]:
    cell = counter(m, "mbsec_requests_total", decision="allow",
                   function="read_holding_registers")
    req = observer(m, "mbsec_request_seconds")
    rtt = observer(m, "mbsec_upstream_request_seconds", target="plc")

    def one() -> None:
        cell.value += 1
        req(0.0021)
        rtt(0.0012)

    return one


def mbsec_after(m: Metrics) -> Callable[[], None]:
    cell = counter(m, "mbsec_requests_total", decision="allow",
                   function="read_holding_registers")
    roles = {"allow": [counter(m, "mbsec_role_requests_total", role="operator",
                               decision="allow")]}
    req = observer(m, "mbsec_request_seconds")
    rtt = observer(m, "mbsec_upstream_request_seconds", target="plc")

    def one() -> None:
        cell.value += 1
        for c in roles["allow"]:  # Decisions._count_role
            c.value += 1
        req(0.0021)
        rtt(0.0012)

    return one


def _prom(registry: CollectorRegistry) -> tuple[Counter, Counter, Histogram, Histogram]:
    return (Counter("mbsec_requests", "", ["decision", "function"], registry=registry),
            Counter("mbsec_role_requests", "", ["role", "decision"], registry=registry),
            Histogram("mbsec_request_seconds", "", registry=registry),
            Histogram("mbsec_upstream_request_seconds", "", ["target"], registry=registry))


def prom_labels() -> Callable[[], None]:
    reqs, roles, req, rtt = _prom(CollectorRegistry())

    def one() -> None:
        reqs.labels(decision="allow", function="read_holding_registers").inc()
        roles.labels(role="operator", decision="allow").inc()
        req.observe(0.0021)
        rtt.labels(target="plc").observe(0.0012)

    return one


def prom_bound() -> Callable[[], None]:
    reqs, roles, req, rtt = _prom(CollectorRegistry())
    a = reqs.labels(decision="allow", function="read_holding_registers")
    b = roles.labels(role="operator", decision="allow")
    c = rtt.labels(target="plc")

    def one() -> None:
        a.inc()
        b.inc()
        req.observe(0.0021)
        c.observe(0.0012)

    return one


def time_ns(fn: Callable[[], None], loops: int, rounds: int) -> tuple[float, float]:
    per: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        per.append((time.perf_counter_ns() - t0) / loops)
    return statistics.median(per), min(per)


def scrape_store() -> Metrics:
    """A store as a busy proxy has it: 20 functions x 6 decisions, 8 roles, 10 targets."""
    m = Metrics()
    for f in range(20):
        for d in ("allow", "deny", "rate_limited", "upstream_error", "response_too_large",
                  "audit_unavailable"):
            m.inc("mbsec_requests_total", decision=d, function=f"fc{f}")
    for r in range(8):
        for d in ("allow", "deny"):
            m.inc("mbsec_role_requests_total", role=f"role{r}", decision=d)
    for t in range(10):
        m.observe("mbsec_upstream_request_seconds", 0.001, target=f"plc{t}")
        m.inc("mbsec_upstream_connects_total", target=f"plc{t}")
    m.observe("mbsec_request_seconds", 0.002)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    cases = [
        ("mbsec cells, before issue 11 (requests + 2 histograms)", mbsec_before(Metrics())),
        ("mbsec cells, after (+ 1 role cell)", mbsec_after(Metrics())),
        ("prometheus_client, labels() per request", prom_labels()),
        ("prometheus_client, children bound once", prom_bound()),
    ]
    print(f"{'per allowed request':60} {'median ns':>10} {'min ns':>8}")
    for name, fn in cases:
        med, low = time_ns(fn, args.loops, args.rounds)
        print(f"{name:60} {med:10.0f} {low:8.0f}")
    store = scrape_store()
    med, low = time_ns(lambda: render(store), 50, args.rounds)
    print(f"{'one scrape of a 170-series store (render)':60} {med / 1000:9.0f}us "
          f"{low / 1000:7.0f}us")


if __name__ == "__main__":
    main()
