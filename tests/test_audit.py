"""Events (ECS JSON lines, sinks, levels) and metrics (registry, Prometheus text, HTTP)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import structlog
import trio
from conftest import http_get

from mbsec.audit import ListSink, flatten, make_logger, nest_dotted
from mbsec.metrics import Metrics, NullMetrics, counter, observer
from mbsec.metrics_http import serve_metrics
from mbsec.settings import LoggingSettings


def test_dotted_keys_nest_and_flatten_back() -> None:
    ev = {"@timestamp": "t", "event.action": "a", "event.outcome": "success",
          "modbus.unit_id": 1, "message": "m"}
    nested = nest_dotted(ev)
    assert nested == {"@timestamp": "t", "message": "m",
                      "event": {"action": "a", "outcome": "success"}, "modbus": {"unit_id": 1}}
    assert list(nested)[:2] == ["@timestamp", "message"]
    assert flatten(nested) == ev


def test_one_json_object_per_line_with_ecs_fields() -> None:
    out = io.StringIO()
    log = make_logger(LoggingSettings(), stdout=out)
    log.warning("request denied", **{"event.action": "modbus-request", "rule.id": "r1",
                                     "modbus.function_code": 6})
    log.info("second")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    ev = json.loads(lines[0])
    assert ev["message"] == "request denied"
    assert ev["event"]["action"] == "modbus-request"
    assert ev["rule"]["id"] == "r1"
    assert ev["modbus"]["function_code"] == 6
    assert ev["log"]["level"] == "warning"
    assert ev["ecs"]["version"]
    assert ev["@timestamp"].endswith("Z")


def test_contextvars_are_merged() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    structlog.contextvars.bind_contextvars(**{"source.ip": "10.1.2.3"})
    try:
        log.info("x")
    finally:
        structlog.contextvars.clear_contextvars()
    assert sink.events()[0]["source"]["ip"] == "10.1.2.3"


def test_level_filters_debug_but_never_warnings() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False, level="warning"), extra_sinks=[sink])
    log.debug("allowed request")
    log.info("info")
    log.warning("denied")
    assert [e["message"] for e in sink.events()] == ["denied"]
    assert not log.is_enabled_for(10)


def test_file_sink(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    log = make_logger(LoggingSettings(stdout=False, file=path))
    log.info("a", **{"event.action": "x"})
    log.info("b")
    from mbsec.audit import close_logger

    close_logger(log)
    lines = path.read_text().splitlines()
    assert [json.loads(x)["message"] for x in lines] == ["a", "b"]


def test_syslog_sink_sends_datagrams(tmp_path: Path) -> None:
    import socket

    from mbsec.settings import SyslogSettings

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(5)
        port = rx.getsockname()[1]
        log = make_logger(LoggingSettings(
            stdout=False, syslog=SyslogSettings(address=f"127.0.0.1:{port}", facility="local3")))
        log.warning("denied", **{"event.action": "modbus-request"})
        data = rx.recv(65536).decode()
    # <PRI> = facility local3 (19) * 8 + warning (4) = 156
    assert data.startswith("<156>mbsec: {")
    assert json.loads(data.split("mbsec: ", 1)[1].rstrip("\x00"))["message"] == "denied"


def test_console_format() -> None:
    out = io.StringIO()
    log = make_logger(LoggingSettings(format="console"), stdout=out)
    log.info("hello", **{"event.action": "x"})
    assert "hello" in out.getvalue() and "event.action" in out.getvalue()


# -- metrics --------------------------------------------------------------------------------


def test_metrics_render_prometheus_text() -> None:
    m = Metrics(buckets=(0.001, 0.01))
    m.inc("mbsec_requests_total", decision="allow", function="read_coils")
    m.inc("mbsec_requests_total", 2, decision="deny", function="read_coils")
    m.set("mbsec_connections_active", 3)
    m.observe("mbsec_request_seconds", 0.005)
    m.observe("mbsec_request_seconds", 0.5)
    text = m.render()
    assert "# TYPE mbsec_requests_total counter" in text
    assert 'mbsec_requests_total{decision="deny",function="read_coils"} 2' in text
    assert "mbsec_connections_active 3" in text
    assert 'mbsec_request_seconds_bucket{le="0.001"} 0' in text
    assert 'mbsec_request_seconds_bucket{le="0.01"} 1' in text
    assert 'mbsec_request_seconds_bucket{le="+Inf"} 2' in text
    assert "mbsec_request_seconds_count 2" in text
    assert m.value("mbsec_requests_total", decision="allow", function="read_coils") == 1
    NullMetrics().inc("x")  # same API, no effect


def test_hot_path_series_handles_count_into_the_registry() -> None:
    m = Metrics(buckets=(0.001, 0.01))
    cell = counter(m, "mbsec_requests_total", decision="allow", function="read_coils")
    cell.value += 1
    cell.value += 1
    m.inc("mbsec_requests_total", decision="allow", function="read_coils")
    assert m.value("mbsec_requests_total", decision="allow", function="read_coils") == 3
    assert counter(m, "mbsec_requests_total", function="read_coils", decision="allow") is cell
    observe = observer(m, "mbsec_upstream_request_seconds", target="plc")
    observe(0.005)
    m.observe("mbsec_upstream_request_seconds", 0.5, target="plc")
    text = m.render()
    assert 'mbsec_upstream_request_seconds_count{target="plc"} 2' in text
    assert 'mbsec_upstream_request_seconds_bucket{le="0.01",target="plc"} 1' in text


def test_hot_path_handles_fall_back_to_inc_and_observe() -> None:
    """A metrics object without series (a test double) still sees every count."""
    calls: list[tuple[str, str, float, dict[str, str | int]]] = []

    class Recording:
        def inc(self, name: str, value: float = 1.0, **labels: str | int) -> None:
            calls.append(("inc", name, value, labels))

        def observe(self, name: str, value: float, **labels: str | int) -> None:
            calls.append(("observe", name, value, labels))

    rec = Recording()
    cell = counter(rec, "mbsec_requests_total", decision="allow")
    cell.value += 1
    observer(rec, "mbsec_request_seconds")(0.25)
    assert calls == [
        ("inc", "mbsec_requests_total", 1.0, {"decision": "allow"}),
        ("observe", "mbsec_request_seconds", 0.25, {}),
    ]


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.inc("mbsec_x_total", reason='a"b\\c')
    assert 'reason="a\\"b\\\\c"' in m.render()


async def test_metrics_endpoint(nursery: trio.Nursery) -> None:
    m = Metrics()
    m.inc("mbsec_connections_total", outcome="accepted")
    healthy = [True]
    port = await nursery.start(
        lambda task_status: serve_metrics(m, "127.0.0.1", 0, healthy=lambda: healthy[0],
                                          task_status=task_status))
    status, body = await http_get(port, "/metrics")
    assert status == "HTTP/1.1 200 OK"
    assert 'mbsec_connections_total{outcome="accepted"} 1' in body
    assert (await http_get(port, "/healthz"))[0] == "HTTP/1.1 200 OK"
    healthy[0] = False
    assert (await http_get(port, "/healthz"))[0] == "HTTP/1.1 503 Service Unavailable"
    assert (await http_get(port, "/nope"))[0] == "HTTP/1.1 404 Not Found"


def test_a_failing_sink_is_an_alarm_to_the_other_sinks_and_a_metric_never_an_exception(
) -> None:
    """A sink that raises (a full disk) costs one ``log-sink-failed`` event, on stderr and to
    every sink that still works, plus a count per lost line; logging goes on and the caller
    never sees the error; the failing sink's close cannot raise either."""
    from mbsec.audit import SinkLogger

    class FullDisk(ListSink):
        def write(self, level: str, line: str) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            raise OSError(28, "No space left on device")

    good = ListSink()
    stderr = io.StringIO()
    metrics = Metrics()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[FullDisk(), good])
    inner = log._logger  # type: ignore[attr-defined]
    assert isinstance(inner, SinkLogger)
    inner.metrics = metrics
    inner._alarm = stderr
    log.warning("first", **{"event.action": "x"})
    log.warning("second", **{"event.action": "x"})
    actions = [e["event"]["action"] for e in good.events()]
    assert actions == ["log-sink-failed", "x", "x"]  # the alarm once, then the lines
    alarm = good.events()[0]
    assert alarm["mbsec"]["sink"] == "FullDisk" and alarm["log"]["level"] == "critical"
    assert "No space left on device" in alarm["error"]["message"]
    assert stderr.getvalue().count("log-sink-failed") == 1
    assert metrics.counter("mbsec_log_sink_failures_total", sink="FullDisk").value == 2
    assert inner.healthy  # another sink took the lines
    inner.close()  # the full disk's close raises: swallowed
