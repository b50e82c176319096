"""mbsec.metrics' bound updaters (incrementer, lazy_observer, gauge_setter): the same series
and values as ``inc``/``observe``/``set``, each series made on its first update only, and test
doubles without series still called by name."""

from __future__ import annotations

from typing import Any

from mbsec.metrics import Metrics, gauge_setter, incrementer, lazy_observer


def names(m: Metrics) -> set[str]:
    counters, gauges, hists = m.snapshot()
    return {name for name, series in (*counters, *gauges, *hists) if series}


def test_bound_updaters_make_their_series_on_first_use_with_the_same_values() -> None:
    m = Metrics()
    count = incrementer(m, "mbsec_connections_total", outcome="accepted")
    observe = lazy_observer(m, "mbsec_tls_handshake_seconds")
    set_active = gauge_setter(m, "mbsec_connections_active")
    assert names(m) == set()  # nothing appears before it happened
    assert "mbsec_connections_active" not in m.render()
    count()
    count()
    observe(0.002)
    set_active(3)
    set_active(2)
    assert names(m) == {"mbsec_connections_total", "mbsec_tls_handshake_seconds",
                        "mbsec_connections_active"}
    ref = Metrics()
    ref.inc("mbsec_connections_total", outcome="accepted")
    ref.inc("mbsec_connections_total", outcome="accepted")
    ref.observe("mbsec_tls_handshake_seconds", 0.002)
    ref.set("mbsec_connections_active", 2)
    assert m.render() == ref.render()
    # the bound updater and the by-name call update one series, not two
    m.inc("mbsec_connections_total", outcome="accepted")
    assert m.value("mbsec_connections_total", outcome="accepted") == 3


class Recording:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def inc(self, name: str, value: float = 1.0, **labels: str | int) -> None:
        self.calls.append(("inc", name, value, labels))

    def observe(self, name: str, value: float, **labels: str | int) -> None:
        self.calls.append(("observe", name, value, labels))

    def set(self, name: str, value: float, **labels: str | int) -> None:
        self.calls.append(("set", name, value, labels))


def test_bound_updaters_call_a_metrics_double_by_name() -> None:
    r = Recording()
    incrementer(r, "a_total", outcome="x")()
    lazy_observer(r, "b_seconds")(0.5)
    gauge_setter(r, "c", kind="y")(7)
    assert r.calls == [("inc", "a_total", 1.0, {"outcome": "x"}),
                       ("observe", "b_seconds", 0.5, {}),
                       ("set", "c", 7, {"kind": "y"})]
