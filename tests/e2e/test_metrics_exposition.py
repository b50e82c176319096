"""/metrics of a running proxy: a real scrape passes ``promtool check metrics``, the per-PLC
figures come from the live PLC socket's TCP_INFO, and the per-target and per-role series move
when real requests are allowed, denied and timed out.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
from pathlib import Path

import pytest
import trio
from conftest import Pki, ScriptedPlc, StartProxy, TlsClient, http_get, read_hr
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from promtool_helpers import metric_names, run_promtool

from mbsec.metrics import HELP

METRICS = {"metrics": {"listen": "127.0.0.1:0"}}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    found = [v for (n, lab), v in samples(text).items() if n == name and want <= lab]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


async def scrape(port: int) -> str:
    status, body = await http_get(port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    return body


def check_metrics(text: str) -> None:
    """``promtool check metrics``: the exposition parses and follows the naming rules (it
    prints lint problems and fails on them)."""
    assert run_promtool("check", "metrics", stdin=text.encode()).strip() == ""


@pytest.fixture
async def plc(nursery: trio.Nursery) -> ScriptedPlc:
    p = ScriptedPlc(delay=lambda a: 5.0 if a == 150 else 0.0)  # register 150 never in time
    await nursery.start(p.serve)
    return p


async def test_live_plc_link_scrape_passes_promtool_and_has_tcp_figures(
    pki: Pki, plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(plc.port, settings=METRICS, upstream={"pool_size": 2})
    port = h.proxy.metrics_port
    before = await scrape(port)
    assert value(before, "mbsec_upstream_up", target="plc") == 1
    assert value(before, "mbsec_upstream_link_state", target="plc", link="0",
                 state="idle") == 1
    assert value(before, "mbsec_upstream_tcp_rtt_seconds", target="plc") is None  # no socket

    client = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    for tid in range(1, 6):
        assert (await client.request(tid, 1, read_hr(0, 2)))[2][0] == 3  # type: ignore[index]
    text = await scrape(port)
    check_metrics(text)
    assert value(text, "mbsec_upstream_link_state", target="plc", link="0", state="open") == 1
    rtt = value(text, "mbsec_upstream_tcp_rtt_seconds", target="plc", link="0")
    assert rtt is not None and 0 < rtt < 1.0, rtt  # a real loopback RTT, in seconds
    rto = value(text, "mbsec_upstream_tcp_rto_seconds", target="plc", link="0")
    assert rto is not None and rto >= 0.2  # Linux's minimum RTO
    assert value(text, "mbsec_upstream_tcp_rtt_variance_seconds", target="plc",
                 link="0") is not None
    assert value(text, "mbsec_upstream_tcp_retransmissions_total", target="plc",
                 link="0") == 0  # loopback loses nothing
    assert value(text, "mbsec_upstream_tcp_retransmits", target="plc", link="0") == 0
    assert value(text, "mbsec_upstream_tcp_lost_segments", target="plc", link="0") == 0
    assert value(text, "mbsec_upstream_requests_in_flight", target="plc") == 0
    assert value(text, "process_start_time_seconds") is not None
    # every mbsec series is documented in HELP (and docs/metrics.md: tests/test_metrics_docs.py)
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert {n for n in names if n.startswith("mbsec_")} - {
        n.removesuffix("_total") for n in HELP} == set()
    await client.aclose()


async def test_per_target_and_role_series_move_with_requests(
    pki: Pki, plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(plc.port, settings=METRICS,
                          upstream={"request_timeout": 0.3, "late_reply_wait": 0.5})
    port = h.proxy.metrics_port
    op = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await op.request(1, 1, read_hr(0, 1)))[2][0] == 3  # type: ignore[index]
    assert (await op.request(2, 1, bytes.fromhex("0600010001")))[2] == b"\x86\x01"  # denied
    nr = await TlsClient.connect(h.port, pki.client_ctx(pki.norole))
    assert (await nr.request(1, 1, read_hr(0, 1)))[2] == b"\x83\x01"  # NULL role: denied
    text = await scrape(port)
    assert value(text, "mbsec_role_requests_total", role="operator", decision="allow") == 1
    assert value(text, "mbsec_role_requests_total", role="operator", decision="deny") == 1
    assert value(text, "mbsec_role_requests_total", role="none", decision="deny") == 1
    assert value(text, "mbsec_role_requests_total", role="none", decision="allow") is None
    assert value(text, "mbsec_upstream_exception_answers_total", target="plc") is None

    # a register the PLC answers too late: 0x0B, and the link waits for the late reply
    assert (await op.request(3, 1, read_hr(150, 1)))[2] == b"\x83\x0b"  # type: ignore[index]
    text = await scrape(port)
    assert value(text, "mbsec_upstream_exception_answers_total", target="plc",
                 code="0x0B") == 1
    assert value(text, "mbsec_upstream_requests_overdue", target="plc") == 1
    assert value(text, "mbsec_role_requests_total", role="operator",
                 decision="upstream_error") == 1
    await h.wait_event("upstream-reset",  # late_reply_wait passes: the link is reset
                       lambda e: e.get("event.reason") == "late_reply_overdue")
    text = await scrape(port)
    assert value(text, "mbsec_upstream_resets_total", target="plc",
                 reason="late_reply_overdue") == 1
    assert value(text, "mbsec_upstream_requests_overdue", target="plc") == 0
    check_metrics(text)
    await op.aclose()
    await nr.aclose()


async def test_unreachable_plc_is_down_and_answers_0x0a(
    pki: Pki, start_proxy: StartProxy
) -> None:
    from conftest import unused_port

    h = await start_proxy(unused_port(), settings=METRICS, upstream={"backoff_initial": 5.0})
    port = h.proxy.metrics_port
    op = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await op.request(1, 1, read_hr(0, 1)))[2] == b"\x83\x0a"  # type: ignore[index]
    text = await scrape(port)
    assert value(text, "mbsec_upstream_up", target="plc") == 0
    assert value(text, "mbsec_upstream_backoff", target="plc") == 1
    assert value(text, "mbsec_upstream_exception_answers_total", target="plc",
                 code="0x0A") == 1
    assert value(text, "mbsec_upstream_link_state", target="plc", link="0", state="open") == 0
    await op.aclose()


def _not_after(path: Path) -> list[float]:
    return [c.not_valid_after_utc.timestamp()
            for c in x509.load_pem_x509_certificates(path.read_bytes())]


async def test_expiry_gauges_follow_the_loaded_material_and_reloads(
    pki: Pki, plc: ScriptedPlc, start_proxy: StartProxy, tmp_path: Path
) -> None:
    h = await start_proxy(plc.port, settings=METRICS)
    text = await scrape(h.proxy.metrics_port)
    servers = sorted(v for (n, lab), v in samples(text).items()
                     if n == "mbsec_certificate_expiry_timestamp_seconds"
                     and ("kind", "server") in lab)
    assert servers == sorted(_not_after(pki.server.chain))
    cas = sorted(v for (n, lab), v in samples(text).items()
                 if n == "mbsec_certificate_expiry_timestamp_seconds"
                 and ("kind", "client_ca") in lab)
    assert cas == sorted(_not_after(pki.ca.trust_bundle))
    crl_next = value(text, "mbsec_crl_next_update_timestamp_seconds", path=str(pki.crl))
    now = dt.datetime.now(dt.UTC).timestamp()
    assert crl_next is not None and 6 * 86400 < crl_next - now <= 7 * 86400 + 60

    # a reload with a CRL due tomorrow moves the gauge (and the old series is gone)
    soon = pki.ca.write_crl(tmp_path / "soon.pem", next_update_days=1)
    assert h.proxy.reload(h.proxy.settings.model_copy(update={"tls": h.proxy.settings.tls
                                                              .model_copy(update={"crl": [soon]})}))
    text = await scrape(h.proxy.metrics_port)
    assert value(text, "mbsec_crl_next_update_timestamp_seconds", path=str(pki.crl)) is None
    soon_next = value(text, "mbsec_crl_next_update_timestamp_seconds", path=str(soon))
    assert soon_next is not None and 0 < soon_next - now <= 86400 + 60
    check_metrics(text)


DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


async def test_every_metric_of_the_dashboard_and_alerts_exists_in_a_real_scrape(
    pki: Pki, plc: ScriptedPlc, start_proxy: StartProxy
) -> None:
    """The names deploy/prometheus/ queries (dashboard, alert rules, their unit tests' input
    series) are what a proxy exposes, after traffic of each kind."""
    h = await start_proxy(plc.port, settings=METRICS,
                          upstream={"request_timeout": 0.3, "late_reply_wait": 0.3})
    op = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await op.request(1, 1, read_hr(0, 1)))[2][0] == 3  # type: ignore[index]
    assert (await op.request(2, 1, bytes.fromhex("0600010001")))[2] == b"\x86\x01"
    assert (await op.request(3, 1, read_hr(150, 1)))[2] == b"\x83\x0b"  # type: ignore[index]
    await h.wait_event("upstream-reset",  # the late reply does not come: the link is reset
                       lambda e: e.get("event.reason") == "late_reply_overdue")
    assert (await op.request(4, 1, read_hr(0, 1)))[2][0] == 3  # type: ignore[index]
    with pytest.raises(trio.BrokenResourceError):  # a failed handshake (1.2: the client sees it)
        await TlsClient.connect(h.port, pki.client_ctx(pki.rogue,
                                                       max_version=ssl.TLSVersion.TLSv1_2))
    await h.wait_event("tls-handshake", lambda e: e.get("event.outcome") == "failure")
    text = await scrape(h.proxy.metrics_port)
    check_metrics(text)
    exposed = {name for name, _labels in samples(text)}
    dashboard = json.loads((DEPLOY / "mbsec-dashboard.json").read_text())
    queried = metric_names(" ".join(t["expr"] for p in dashboard["panels"]
                                    for t in p.get("targets", ())))
    alerting = metric_names((DEPLOY / "mbsec-alerts.yml").read_text())
    tested = metric_names((DEPLOY / "mbsec-alerts.test.yml").read_text())
    assert {"mbsec_upstream_tcp_rtt_seconds", "mbsec_role_requests_total",
            "mbsec_tls_handshakes_total"} <= queried
    assert len(alerting) >= 7
    assert (queried | alerting | tested) - exposed == set()
    await op.aclose()


async def test_a_failing_scrape_costs_the_scrape_not_the_endpoint(
    nursery: trio.Nursery,
) -> None:
    from mbsec.metrics import Metrics
    from mbsec.metrics_http import serve_metrics

    calls = []

    async def scrape_once_broken() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a bug in a collector")
        return b"mbsec_connections_active 0\n"

    port = await nursery.start(lambda task_status: serve_metrics(
        Metrics(), "127.0.0.1", 0, scrape=scrape_once_broken, task_status=task_status))
    status, body = await http_get(port, "/metrics")
    assert status == "HTTP/1.1 500 Internal Server Error" and "ValueError" in body
    assert await http_get(port, "/metrics") == ("HTTP/1.1 200 OK", "mbsec_connections_active 0\n")
    assert (await http_get(port, "/healthz"))[0] == "HTTP/1.1 200 OK"
