"""Counters, gauges and histograms (the ``/metrics`` endpoint is :mod:`mbsec.metrics_http`).

No client library: the proxy needs a handful of series, and a dict keyed by (name, labels) is
cheaper per request than anything generic. Names are ``mbsec_*`` snake case, counters end in
``_total``, histograms are in seconds. ``NullMetrics`` has the same methods and does nothing, so
components take ``metrics=None`` -> ``NullMetrics()`` instead of checking everywhere.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable
from typing import Protocol, TypeAlias

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
    "mbsec_handshakes_active": "Client connections still in their TLS handshake",
    "mbsec_handshakes_evicted_total": "Handshakes ended to make room for a new connection",
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


class Cell:
    """One counter series; a hot path keeps it and adds to ``value`` directly."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _Histogram:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.count += 1


class Metrics:
    """In-process registry; ``render()`` gives Prometheus text exposition format 0.0.4."""

    def __init__(self, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self._buckets = buckets
        self._counters: dict[str, dict[LabelKey, Cell]] = {}
        self._gauges: dict[str, dict[LabelKey, float]] = {}
        self._hists: dict[str, dict[LabelKey, _Histogram]] = {}

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

    def observe(self, name: str, value: float, **labels: str | int) -> None:
        self.histogram(name, **labels).observe(value)

    def histogram(self, name: str, **labels: str | int) -> _Histogram:
        """The series itself, for a hot path that observes the same one many times."""
        series = self._hists.get(name)
        if series is None:
            series = self._hists[name] = {}
        k = _key(labels)
        h = series.get(k)
        if h is None:
            h = series[k] = _Histogram(self._buckets)
        return h

    def value(self, name: str, **labels: str | int) -> float:
        """Current counter or gauge value (0 when never touched): for tests."""
        k = _key(labels)
        if name in self._counters:
            cell = self._counters[name].get(k)
            return cell.value if cell is not None else 0.0
        return self._gauges.get(name, {}).get(k, 0.0)

    def render(self) -> str:
        lines: list[str] = []

        def head(name: str, kind: str) -> None:
            if name in HELP:
                lines.append(f"# HELP {name} {HELP[name]}")
            lines.append(f"# TYPE {name} {kind}")

        # The data-plane thread adds series while this renders in trio's thread: every dict is
        # copied by one C-level call (atomic under the GIL) before it is sorted and walked.
        for name in sorted(list(self._counters)):
            head(name, "counter")
            for k, cell in sorted(list(self._counters[name].items()), key=_first):
                lines.append(f"{name}{_fmt_labels(k)} {_num(cell.value)}")
        for name in sorted(list(self._gauges)):
            head(name, "gauge")
            for k, v in sorted(list(self._gauges[name].items()), key=_first):
                lines.append(f"{name}{_fmt_labels(k)} {_num(v)}")
        for name in sorted(list(self._hists)):
            head(name, "histogram")
            for k, h in sorted(list(self._hists[name].items()), key=_first):
                cum = 0
                for bound, c in zip((*h.buckets, math.inf), h.counts, strict=True):
                    cum += c
                    le = "+Inf" if bound == math.inf else repr(bound)
                    lines.append(f"{name}_bucket{_fmt_labels((*k, ('le', le)))} {cum}")
                lines.append(f"{name}_sum{_fmt_labels(k)} {_num(h.sum)}")
                lines.append(f"{name}_count{_fmt_labels(k)} {h.count}")
        return "\n".join(lines) + "\n"


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


class NullMetrics:
    """Same API, no cost."""

    def inc(self, name: str, value: float = 1.0, **labels: str | int) -> None:
        pass

    def set(self, name: str, value: float, **labels: str | int) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str | int) -> None:
        pass


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(k: LabelKey) -> str:
    if not k:
        return ""
    return "{" + ",".join(f'{n}="{_esc(v)}"' for n, v in k) + "}"


def _num(v: float) -> str:
    v = float(v)  # callers may pass ints (len(...))
    if math.isinf(v) or math.isnan(v):
        return "+Inf" if v > 0 else ("-Inf" if v < 0 else "NaN")
    return str(int(v)) if v.is_integer() else repr(v)
