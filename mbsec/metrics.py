"""Counters, gauges and histograms (the ``/metrics`` endpoint is :mod:`mbsec.metrics_http`).

The request path counts here, on plain floats: a dict keyed by (name, labels) and a
:class:`Cell` a hot path keeps and adds to, cheaper per request than a client library's
locked, label-resolving counters. prometheus_client reads these at scrape time
(:mod:`mbsec.metrics_export`), so the text format is the library's. Names are ``mbsec_*``
snake case, counters end in ``_total``, histograms are in seconds; every name is in
:data:`HELP` and in docs/metrics.md. ``NullMetrics`` has the same methods and does nothing, so
components take ``metrics=None`` -> ``NullMetrics()`` instead of checking everywhere.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Protocol, TypeAlias

from mbsec.metrics_core import Cell, Histogram

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)

LabelKey = tuple[tuple[str, str], ...]

HELP: dict[str, str] = {
    "mbsec_connections_total": "Accepted TCP connections by outcome",
    "mbsec_connections_active": "Client connections currently open",
    "mbsec_tls_handshakes_total": "TLS handshakes by outcome and reason",
    "mbsec_tls_handshake_seconds": "TLS handshake duration",
    "mbsec_requests_total": "Modbus requests by decision and function",
    "mbsec_request_seconds": "Time from a complete request to its reply being sent",
    "mbsec_protocol_errors_total": "Malformed client frames or PDUs by reason",
    "mbsec_config_reloads_total": "SIGHUP reloads by outcome",
    "mbsec_crl_next_update_seconds": "Seconds until the earliest loaded CRL's nextUpdate",
    "mbsec_upstream_connects_total": "PLC connections made",
    "mbsec_upstream_failures_total": "PLC-side failures by reason (connect, timeout, resets)",
    "mbsec_upstream_request_seconds": "PLC round trip",
    "mbsec_clients_penalized_total": "Clients refused by a PLC target for breaking its links",
    "mbsec_log_sink_failures_total": "Events a log sink could not take (disk full, syslog down)",
    # mbsec connect (the client side)
    "mbsec_connect_connections_total": "Plain connections from masters by outcome",
    "mbsec_connect_connections_active": "Plain connections from masters currently open",
    "mbsec_connect_upstream_total": "Connection attempts to the server by outcome and reason",
    "mbsec_connect_handshake_seconds": "TLS connection to the server, connect and handshake",
    "mbsec_connect_bytes_total": "Bytes carried, by direction (to_server, to_client)",
    # issue 11: per role, per PLC target and link, expiry, revoked certificates
    "mbsec_role_requests_total":
        "Modbus requests by the client's role (each role it holds) and decision",
    "mbsec_upstream_resets_total": "PLC connections reset, by target and reason",
    "mbsec_upstream_exception_answers_total":
        "Gateway exceptions answered for a target: 0x0A path unavailable, 0x0B no response",
    "mbsec_revoked_certificate_seen_total":
        "Revoked client certificates seen: refused in a handshake, or an open connection ended "
        "by a reloaded CRL",
    "mbsec_upstream_up": "1 unless the last connection attempt to the PLC failed",
    "mbsec_upstream_backoff": "1 while connecting to the PLC waits for the reconnect backoff",
    "mbsec_upstream_requests_in_flight": "Requests sent to the PLC and not yet answered",
    "mbsec_upstream_requests_overdue":
        "Requests answered 0x0B whose PLC connection still waits for the late reply",
    "mbsec_upstream_requests_queued": "Requests waiting for a free PLC connection slot",
    "mbsec_upstream_link_state": "PLC connection state (1 for the current state)",
    "mbsec_upstream_tcp_rtt_seconds": "Smoothed TCP round-trip time of the PLC connection",
    "mbsec_upstream_tcp_rtt_variance_seconds": "TCP round-trip time mean deviation",
    "mbsec_upstream_tcp_rto_seconds": "TCP retransmission timeout of the PLC connection",
    "mbsec_upstream_tcp_retransmits": "RTO expiries in a row for the current segment",
    "mbsec_upstream_tcp_lost_segments": "Segments the kernel presumes lost now",
    "mbsec_upstream_tcp_unacked_segments": "Segments sent and not yet acknowledged",
    "mbsec_upstream_tcp_retransmissions_total":
        "Segments retransmitted on this PLC connection (restarts with a new connection)",
    "mbsec_certificate_expiry_timestamp_seconds":
        "notAfter of each loaded certificate (server chain, client CAs), Unix time",
    "mbsec_crl_next_update_timestamp_seconds": "nextUpdate of each loaded CRL, Unix time",
    "mbsec_start_time_seconds": "When this proxy process started, Unix time",
    # operator control (mbsec ctl, automatic freeze)
    "mbsec_writes_frozen": "1 while writes to the target are frozen (kind manual or auto)",
    "mbsec_handshakes_active": "Client connections still in their TLS handshake",
    "mbsec_handshakes_evicted_total": "Handshakes ended to make room for a new connection",
    "mbsec_connections_waiting": "New connections waiting for a handshake place or their "
                                 "prefix's rate",
    "mbsec_connections_waited_total": "New connections admitted after waiting for a handshake "
                                      "place or their prefix's rate",
    "mbsec_rejections_suppressed_total": "Rejections of unauthenticated peers not logged one by "
                                         "one (summed up in rejections-suppressed events)",
}


class MetricsLike(Protocol):
    def inc(self, name: str, value: float = 1.0, **labels: str | int) -> None: ...

    def observe(self, name: str, value: float, **labels: str | int) -> None: ...

    def set(self, name: str, value: float, **labels: str | int) -> None: ...


_KEYS: dict[tuple[tuple[str, str | int], ...], LabelKey] = {}
_KEYS_MAX = 4096  # distinct label sets remembered; beyond that keys are built each time


def _key(labels: dict[str, str | int]) -> LabelKey:
    """Canonical (sorted, stringified) label key, cached by the labels as passed.

    The per-request series are a handful of label sets, so the sort and ``str`` calls are paid
    once per set instead of once per request.
    """
    raw = tuple(labels.items())
    k = _KEYS.get(raw)
    if k is None:
        k = tuple(sorted((n, str(v)) for n, v in raw))
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[raw] = k
    return k


class Metrics:
    """In-process registry; ``render()`` gives Prometheus text exposition format 0.0.4."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self._buckets = buckets
        self._counters: dict[str, dict[LabelKey, Cell]] = {}
        self._gauges: dict[str, dict[LabelKey, float]] = {}
        self._hists: dict[str, dict[LabelKey, Histogram]] = {}

    def inc(self, name: str, value: float = 1.0, **labels: str | int) -> None:
        self.counter(name, **labels).value += value

    def counter(self, name: str, **labels: str | int) -> Cell:
        """The series itself, for a hot path that counts the same one many times."""
        series = self._counters.get(name)
        if series is None:  # not setdefault: that builds a throw-away dict per call
            series = self._counters[name] = {}
        k = _key(labels)
        cell = series.get(k)
        if cell is None:
            cell = series[k] = Cell()
        return cell

    def set(self, name: str, value: float, **labels: str | int) -> None:
        self._gauges.setdefault(name, {})[_key(labels)] = value

    def gauge(self, name: str, **labels: str | int) -> Callable[[float], None]:
        """``set`` for one series, the label key built once (:func:`gauge_setter`)."""
        k = _key(labels)
        gauges = self._gauges

        def set_(value: float) -> None:
            series = gauges.get(name)
            if series is None:
                series = gauges[name] = {}
            series[k] = value

        return set_

    def observe(self, name: str, value: float, **labels: str | int) -> None:
        self.histogram(name, **labels).observe(value)

    def histogram(self, name: str, **labels: str | int) -> Histogram:
        """The series itself, for a hot path that observes the same one many times."""
        series = self._hists.get(name)
        if series is None:
            series = self._hists[name] = {}
        k = _key(labels)
        h = series.get(k)
        if h is None:
            h = series[k] = Histogram(self._buckets)
        return h

    def value(self, name: str, **labels: str | int) -> float:
        """Current counter or gauge value (0 when never touched): for tests."""
        k = _key(labels)
        if name in self._counters:
            cell = self._counters[name].get(k)
            return cell.value if cell is not None else 0.0
        return self._gauges.get(name, {}).get(k, 0.0)

    def snapshot(self) -> tuple[
        list[tuple[str, list[tuple[LabelKey, float]]]],
        list[tuple[str, list[tuple[LabelKey, float]]]],
        list[tuple[str, list[tuple[LabelKey, tuple[tuple[float, ...], list[int], float, int]]]]],
    ]:
        """Every series, sorted: (counters, gauges, histograms), for the exposition.

        The data-plane thread adds series while a scrape reads them in trio's thread: every
        dict is copied by one C-level call (atomic under the GIL) before it is walked."""
        counters = [(name, sorted(((k, c.value) for k, c in list(self._counters[name].items())),
                                  key=_first))
                    for name in sorted(list(self._counters))]
        gauges = [(name, sorted(list(self._gauges[name].items()), key=_first))
                  for name in sorted(list(self._gauges))]
        hists = [(name, sorted(((k, (h.buckets, list(h.counts), h.sum, h.count))
                                for k, h in list(self._hists[name].items())), key=_first))
                 for name in sorted(list(self._hists))]
        return counters, gauges, hists

    def render(self) -> str:
        """The store alone in the Prometheus text format (the proxy's scrape adds more:
        :func:`mbsec.metrics_export.render`)."""
        from mbsec.metrics_export import render  # prometheus_client: not for the core

        return render(self).decode()


_first = operator.itemgetter(0)


class _IncCell:
    """Stands in for a :class:`Cell` on a metrics object without series (a test double):
    ``cell.value += n`` becomes ``metrics.inc(name, n, **labels)``."""

    __slots__ = ("_inc",)

    def __init__(self, inc: Callable[[float], None]) -> None:
        self._inc = inc

    @property
    def value(self) -> float:
        return 0.0

    @value.setter
    def value(self, new: float) -> None:
        self._inc(new)


CounterCell: TypeAlias = "Cell | _IncCell"


def counter(metrics: object, name: str, **labels: str | int) -> CounterCell:
    """A counter series to add to directly (``cell.value += 1``)."""
    get = getattr(metrics, "counter", None)
    if get is not None:
        cell: Cell = get(name, **labels)
        return cell
    inc = metrics.inc  # type: ignore[attr-defined]
    return _IncCell(lambda n: inc(name, n, **labels))


def observer(metrics: object, name: str, **labels: str | int) -> Callable[[float], None]:
    """A bound ``observe`` for one series: the label lookup is paid once, not per request."""
    histogram = getattr(metrics, "histogram", None)
    if histogram is not None:
        bound: Callable[[float], None] = histogram(name, **labels).observe
        return bound
    observe = metrics.observe  # type: ignore[attr-defined]
    return lambda value: observe(name, value, **labels)


def incrementer(metrics: object, name: str, **labels: str | int) -> Callable[[], None]:
    """Add 1 to one counter series, bound once: for a series a hot path counts once per
    connection. The series is made on the first count, not here, so it still appears with its
    first event as one counted through ``inc`` does."""
    if not isinstance(metrics, Metrics):
        inc = metrics.inc  # type: ignore[attr-defined]
        return lambda: inc(name, **labels)
    cell: Cell | None = None

    def add() -> None:
        nonlocal cell
        if cell is None:
            cell = metrics.counter(name, **labels)
        cell.value += 1.0

    return add


def lazy_observer(metrics: object, name: str, **labels: str | int) -> Callable[[float], None]:
    """:func:`observer` whose histogram is made on the first observation, not here (a series
    that appears before anything happened would be a change in the exposition)."""
    if not isinstance(metrics, Metrics):
        return observer(metrics, name, **labels)
    hist: Histogram | None = None

    def observe(value: float) -> None:
        nonlocal hist
        if hist is None:
            hist = metrics.histogram(name, **labels)
        hist.observe(value)

    return observe


def gauge_setter(metrics: object, name: str, **labels: str | int) -> Callable[[float], None]:
    """``metrics.set(name, value, **labels)`` bound once: the label key is built here, not on
    every set (the connection gauges are set several times per connection). The series is made
    on the first set, as with ``set``."""
    if not isinstance(metrics, Metrics):
        set_ = metrics.set  # type: ignore[attr-defined]
        return lambda value: set_(name, value, **labels)
    return metrics.gauge(name, **labels)


class NullMetrics:
    """Same API, no cost."""

    def inc(self, name: str, value: float = 1.0, **labels: str | int) -> None:
        pass

    def set(self, name: str, value: float, **labels: str | int) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str | int) -> None:
        pass
