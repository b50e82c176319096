"""The Prometheus exposition of ``/metrics``, through prometheus_client's collectors.

Why two layers: the request path counts on plain Python floats (:class:`mbsec.metrics.Metrics`,
``cell.value += 1``: no lock, no label lookup per request), and prometheus_client reads them
only when Prometheus scrapes, through the custom collectors here. prometheus_client's own
``Counter.labels(...).inc()`` takes a lock and resolves the labels on every call: an
allowed request's counts cost about 12-30 µs that way against 1.5-3 µs on plain cells
(benchmarks/bench_metrics.py, docs/metrics.md), paid on the request path for nothing. The
client library still does what it is good at: the text format (escaping, number formatting,
``# HELP``/``# TYPE``), the process collector (``process_start_time_seconds``...) and the
families' structure, which ``promtool check metrics`` validates in the tests.

Scrape-time figures that live elsewhere come in as plain data: the request path's per-PLC
state and ``TCP_INFO`` (:class:`mbsec.path.stats.TargetStats`, collected on the data-plane
thread) and the certificate and CRL expiry facts (:class:`mbsec.expiry.Expiry`, built at start
and on every reload). No trio here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mbsec import tcp_info
from mbsec.metrics import HELP, Metrics

if TYPE_CHECKING:
    from mbsec.expiry import Expiry
    from mbsec.path.stats import TargetStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _family(name: str, kind: str) -> Metric:
    base = name[:-6] if kind == "counter" and name.endswith("_total") else name
    return Metric(base, HELP.get(name, name), kind)


class StoreCollector(Collector):
    """The counters, gauges and histograms the proxy keeps in a :class:`Metrics` store."""

    def __init__(self, store: Metrics) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        counters, gauges, hists = self.store.snapshot()
        for name, series in counters:
            fam = _family(name, "counter")
            for labels, value in series:
                fam.add_sample(name, dict(labels), value)
            yield fam
        for name, series in gauges:
            fam = _family(name, "gauge")
            for labels, value in series:
                fam.add_sample(name, dict(labels), value)
            yield fam
        for name, hseries in hists:
            fam = _family(name, "histogram")
            for labels, (buckets, counts, total, count) in hseries:
                cum = 0
                for bound, c in zip((*buckets, math.inf), counts, strict=True):
                    cum += c
                    le = "+Inf" if bound == math.inf else repr(bound)
                    fam.add_sample(f"{name}_bucket", {**dict(labels), "le": le}, cum)
                fam.add_sample(f"{name}_sum", dict(labels), total)
                fam.add_sample(f"{name}_count", dict(labels), count)
            yield fam


def _gauges(names: Sequence[str]) -> dict[str, Metric]:
    return {n: _family(n, "gauge") for n in names}


class UpstreamCollector(Collector):
    """Per PLC target and link, from one data-plane snapshot (labels: ``target`` from
    ``[upstreams.NAME]``, ``link`` the 0-based index in its pool: both bounded by the
    configuration)."""

    TARGET = ("mbsec_upstream_up", "mbsec_upstream_backoff", "mbsec_upstream_requests_in_flight",
              "mbsec_upstream_requests_overdue", "mbsec_upstream_requests_queued")
    LINK = ("mbsec_upstream_link_state",)
    TCP = ("mbsec_upstream_tcp_rtt_seconds", "mbsec_upstream_tcp_rtt_variance_seconds",
           "mbsec_upstream_tcp_rto_seconds", "mbsec_upstream_tcp_retransmits",
           "mbsec_upstream_tcp_lost_segments", "mbsec_upstream_tcp_unacked_segments")
    STATES = ("idle", "connecting", "open")

    def __init__(self, stats: Iterable[TargetStats]) -> None:
        self.stats = list(stats)

    def collect(self) -> Iterator[Metric]:
        fams = _gauges((*self.TARGET, *self.LINK, *self.TCP))
        total = _family("mbsec_upstream_tcp_retransmissions_total", "counter")
        for t in self.stats:
            lab = {"target": t.name}
            for name, value in zip(self.TARGET,
                                   (t.up, t.backoff, t.in_flight, t.overdue, t.queued),
                                   strict=True):
                fams[name].add_sample(name, lab, float(value))
            for link in t.links:
                ll = {"target": t.name, "link": str(link.index)}
                for state in self.STATES:
                    fams["mbsec_upstream_link_state"].add_sample(
                        "mbsec_upstream_link_state", {**ll, "state": state},
                        1.0 if link.state == state else 0.0)
                info = tcp_info.parse(link.tcp) if link.tcp is not None else None
                if info is None:
                    continue  # no socket (idle, connecting) or no TCP_INFO: no TCP series
                figures = (info.rtt, info.rtt_var, info.rto, float(info.retransmits),
                           float(info.lost), float(info.unacked))
                for name, figure in zip(self.TCP, figures, strict=True):
                    fams[name].add_sample(name, ll, figure)
                total.add_sample("mbsec_upstream_tcp_retransmissions_total", ll,
                                 float(info.total_retrans))
        yield from fams.values()
        yield total


class ExpiryCollector(Collector):
    """When the loaded certificates and CRLs run out (labels come from the TLS files)."""

    def __init__(self, expiry: Expiry) -> None:
        self.expiry = expiry

    def collect(self) -> Iterator[Metric]:
        certs = _family("mbsec_certificate_expiry_timestamp_seconds", "gauge")
        for c in self.expiry.certificates:
            certs.add_sample(certs.name, {"kind": c.kind, "subject": c.subject,
                                          "serial": c.serial}, c.not_after)
        crls = _family("mbsec_crl_next_update_timestamp_seconds", "gauge")
        for crl in self.expiry.crls:
            crls.add_sample(crls.name, {"issuer": crl.issuer, "path": crl.path},
                            crl.next_update)
        yield certs
        yield crls


class _Scrape(Collector):
    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for c in self.collectors:
            yield from c.collect()


def render(
    store: Metrics,
    *,
    upstreams: Iterable[TargetStats] | None = None,
    expiry: Expiry | None = None,
    process: bool = False,
) -> bytes:
    """One scrape in the Prometheus text format 0.0.4. ``process``: add prometheus_client's
    ``process_*`` series (start time, CPU, memory, file descriptors)."""
    collectors: list[Collector] = [StoreCollector(store)]
    if upstreams is not None:
        collectors.append(UpstreamCollector(upstreams))
    if expiry is not None:
        collectors.append(ExpiryCollector(expiry))
    registry = CollectorRegistry(auto_describe=False)
    if process:
        collectors.append(ProcessCollector(registry=None))
    registry.register(_Scrape(collectors))
    return generate_latest(registry)
