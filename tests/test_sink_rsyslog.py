"""Remote sinks against a real rsyslogd (scripts/test.d/sinks.sh installs rsyslog and its
OpenSSL driver): RFC 5424 over TLS and TCP with octet counting, CEF, a collector that is down
and then up, a full spool, and a proxy serving while its collector is away.

Each test starts its own rsyslogd in the foreground (own config, work directory and pid file
under tmp_path, 127.0.0.1, an unused port) and stops it by its pid. rsyslog writes the raw
message of everything it receives (``%rawmsg%``) and, in a second file, its own parse of it
(PRI, APP-NAME, MSGID, STRUCTURED-DATA): both are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    TEST_POLICY,
    Pki,
    PymodbusPlc,
    TlsClient,
    fail_or_skip,
    read_hr,
    serve_config,
    serve_process,
    unused_port,
)
from syslog_parsers import parse_cef, parse_rfc5424

from mbsec import events
from mbsec.audit import SinkLogger, close_logger, flatten, make_logger
from mbsec.settings import LoggingSettings, SinkSettings, build_settings
from mbsec.sink_formats import HEADER_FIELDS, field_values, flat_fields, sd_address
from mbsec.sink_remote import RemoteSink

RSYSLOGD = os.environ.get("MBSEC_RSYSLOGD") or shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
OSSL = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/rsyslog/lmnsd_ossl.so")


@pytest.fixture(scope="module")
def rsyslogd() -> str:
    if not (os.path.exists(RSYSLOGD) and OSSL.exists()):
        hint = ("rsyslog with its TLS driver is needed: source scripts/apt_need.sh; "
                "source scripts/test.d/sinks.sh")
        fail_or_skip(hint)
    return RSYSLOGD


ROOT = Path(__file__).resolve().parents[1]


def documented_rsyslog_conf(*, work: Path, ca: Path, cert: Path, key: Path, auth: str,
                            port: int, out: Path) -> str:
    """The rsyslog configuration docs/events.md gives ("Pointing a collector at mbsec"): the
    TLS tests run exactly that, with the test's paths, address, port and auth mode put in,
    plus a second action that writes rsyslog's own parse of each message."""
    doc = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    conf = doc[doc.index("**rsyslog**"):].split("```", 2)[1]
    raw_action = 'template="mbsec_raw")'
    for documented, ours in [
        ('"/var/spool/rsyslog"', f'"{work}"'),
        ('"/etc/rsyslog.d/mbsec-ca.pem"', f'"{ca}"'),
        ('"/etc/rsyslog.d/collector-chain.pem"', f'"{cert}"'),
        ('"/etc/rsyslog.d/collector.key"', f'"{key}"'),
        ('authMode="x509/certvalid"', f'authMode="{auth}"'),
        ('input(type="imtcp" port="6514"', f'input(type="imtcp" address="127.0.0.1" port="{port}"'),
        ('file="/var/log/mbsec/events.log"', f'file="{out}/raw.log"'),
        (raw_action, raw_action + f'\n  action(type="omfile" file="{out}/parsed.log" '
                                  'template="mbsec_parsed")'),
    ]:
        assert conf.count(documented) == 1, documented
        conf = conf.replace(documented, ours)
    return PARSED_TEMPLATE + conf


PARSED_TEMPLATE = """\
template(name="mbsec_parsed" type="list") {
  property(name="pri") constant(value="|") property(name="app-name") constant(value="|")
  property(name="msgid") constant(value="|") property(name="structured-data")
  constant(value="\\n")
}
"""
RSYSLOG_TCP = """\
global(workDirectory="{work}")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="mbsec")
"""
RSYSLOG_OUT = """\
template(name="mbsec_raw" type="string" string="%rawmsg%\\n")
ruleset(name="mbsec") {{
  action(type="omfile" file="{out}/raw.log" template="mbsec_raw")
  action(type="omfile" file="{out}/parsed.log" template="mbsec_parsed")
}}
"""


class Rsyslog:
    """One rsyslogd in the foreground, on 127.0.0.1:port."""

    def __init__(self, binary: str, directory: Path, port: int, pki: Pki | None,
                 auth: str = "x509/certvalid") -> None:
        self.binary = binary
        self.dir = directory
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        work = directory / "work"
        work.mkdir(parents=True, exist_ok=True)
        if pki is not None:
            text = documented_rsyslog_conf(work=work, ca=pki.ca.trust_bundle,
                                           cert=pki.server.chain, key=pki.server.key,
                                           auth=auth, port=port, out=directory)
        else:
            text = (RSYSLOG_TCP.format(work=work, port=port) + PARSED_TEMPLATE
                    + RSYSLOG_OUT.format(out=directory))
        self.conf = directory / "rsyslog.conf"
        self.conf.write_text(text, encoding="utf-8")

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.conf), "-i", str(self.dir / "rsyslogd.pid")],
            stdout=open(self.dir / "stdout.log", "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        deadline = time.monotonic() + 10
        while True:  # listening: /proc/net/tcp has the port in state LISTEN (no probe needed)
            assert self.proc.poll() is None, (self.dir / "stdout.log").read_text()
            if _listening(self.port):
                return
            assert time.monotonic() < deadline, "rsyslogd did not listen within 10 s"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def lines(self, name: str = "raw.log") -> list[str]:
        path = self.dir / name
        if not path.exists():
            return []
        return path.read_text(encoding="utf-8").splitlines()

    def wait_lines(self, n: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines()) < n:
            assert time.monotonic() < deadline, f"rsyslog got {len(self.lines())} of {n} lines"
            time.sleep(0.02)
        return self.lines()


def _listening(port: int) -> bool:
    hexport = f":{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as fh:
        return any(line.split()[1].endswith(hexport) and line.split()[3] == "0A"
                   for line in fh.readlines()[1:])


@pytest.fixture
def collector(rsyslogd: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Rsyslog] = []

    def make(pki: Pki | None = None, port: int | None = None, start: bool = True,
             auth: str = "x509/certvalid") -> Rsyslog:
        r = Rsyslog(rsyslogd, tmp_path / f"rsyslog{len(made)}", port or unused_port(), pki,
                    auth)
        made.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in made:
        r.stop()


def _sink(type_: str, port: int, pki: Pki | None = None, client_cert: bool = True,
          **kw: Any) -> SinkSettings:
    tls: dict[str, Any] = {}
    if pki is not None:
        tls = {"ca": pki.ca.trust_bundle}
        if client_cert:
            tls.update(cert=pki.operator.chain, key=pki.operator.key)
    return SinkSettings(type=type_, address=f"127.0.0.1:{port}", hostname="dmz-proxy-1",  # type: ignore[arg-type]
                        reconnect_initial=0.05, reconnect_max=0.2, **tls, **kw)


def _remote(log: Any, index: int = 0) -> RemoteSink:
    inner = log._logger
    assert isinstance(inner, SinkLogger)
    remote = [s for s in inner.sinks if isinstance(s, RemoteSink)]
    return remote[index]


def _emit_samples(log: Any) -> None:
    """A denial with awkward characters, a handshake rejection, a connection close."""
    conn = log.bind(**events.connection_context(3, "10.0.0.9", 40000, "10.0.0.1", 802),
                    **{"tls.client.x509.subject.common_name": 'hmi "01" ] \\ x=y|z',
                       "user.roles": ["operator", "a]b"]})
    events.emit(conn, events.modbus_request_denied(7, 1, 6, None, 0.0012, "operator-read",
                                                   "no_rule", 1))
    events.emit(log, events.server_stop(1, 2.0))
    events.emit(conn, events.connection_closed("client_closed", 1.5, 30, 20, 3, 2, 1, 0))


def _check_against_file(received: list[str], file_events: list[dict[str, Any]]) -> None:
    """Every received message is the file's event of the same position, field for field."""
    assert len(received) == len(file_events)
    for text, ev in zip(received, file_events, strict=True):
        msg = parse_rfc5424(text)
        assert msg.app_name == "mbsec" and msg.hostname == "dmz-proxy-1"
        assert msg.msgid == ev["event"]["action"]
        assert msg.timestamp == ev["@timestamp"]
        assert msg.msg == ev["message"]
        assert msg.procid == str(os.getpid())
        for name, value in flat_fields(ev):
            if name not in HEADER_FIELDS:
                assert msg.params(*sd_address(name, 32473)) == field_values(value), name


@pytest.mark.parametrize("client_cert", [True, False], ids=["client-cert", "no-client-cert"])
def test_rfc5424_over_tls_reaches_rsyslog_with_structured_data(
    collector: Any, pki: Pki, tmp_path: Path, client_cert: bool
) -> None:
    # with a client certificate rsyslog requires one from the CA (x509/certvalid); without,
    # it asks for none (anon) and only mbsec verifies its peer
    rs = collector(pki, auth="x509/certvalid" if client_cert else "anon")
    log = make_logger(LoggingSettings(stdout=False, file=tmp_path / "events.jsonl", sinks=[
        _sink("tls", rs.port, pki, client_cert=client_cert, facility="local4")]))
    _emit_samples(log)
    remote = _remote(log)
    lines = rs.wait_lines(3)
    close_logger(log)
    file_events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    _check_against_file(lines, file_events)
    assert remote.connects == 1 and remote.dropped == 0
    # rsyslog's own parse agrees: it read PRI, APP-NAME, MSGID and the structured data
    parsed = rs.lines("parsed.log")
    pri, app, msgid, sd = parsed[0].split("|", 3)
    assert (pri, app, msgid) == (str(20 * 8 + 4), "mbsec", "modbus-request")
    assert sd == lines[0].split(" modbus-request ", 1)[1].rsplit("] ", 1)[0] + "]"
    denial = parse_rfc5424(lines[0])
    assert denial.params("tls.client.x509.subject@32473", "common_name") == [
        'hmi "01" ] \\ x=y|z']
    assert denial.params("user@32473", "roles") == ["operator", "a]b"]
    assert denial.params("event@32473", "reason") == ["no_rule"]
    assert denial.params("rule@32473", "id") == ["operator-read"]


def test_tls_sink_refuses_a_collector_its_ca_did_not_sign(
    collector: Any, pki: Pki, tmp_path: Path
) -> None:
    rs = collector(pki)
    sink = _sink("tls", rs.port, pki)
    sink = sink.model_copy(update={"ca": pki.dir / "rogue" / "ca.crt"})
    assert sink.ca is not None and sink.ca.exists()
    log = make_logger(LoggingSettings(stdout=False, sinks=[sink]))
    events.emit(log, events.server_stop(0, 1.0))
    remote = _remote(log)
    time.sleep(0.5)
    assert remote.connects == 0 and remote.spooled == 1 and rs.lines() == []
    remote.cfg = remote.cfg.model_copy(update={"close_timeout": 0.0})
    close_logger(log)


def test_a_collector_that_refuses_our_certificate_gets_nothing_sent_into_the_void(
    collector: Any, pki: Pki, tmp_path: Path
) -> None:
    # TLS 1.3: rsyslog refuses a missing client certificate only after the handshake is
    # complete on our side; the sink must notice that before it sends, and keep the events
    rs = collector(pki, auth="x509/certvalid")
    log = make_logger(LoggingSettings(stdout=False, sinks=[
        _sink("tls", rs.port, pki, client_cert=False, close_timeout=0.0)]))
    events.emit(log, events.server_stop(0, 1.0))
    remote = _remote(log)
    time.sleep(0.6)  # several attempts (backoff 0.05 to 0.2 s)
    assert remote.sent == 0 and remote.spooled == 1 and remote.connects == 0
    assert rs.lines() == []
    close_logger(log)


def test_rfc5424_and_cef_over_plain_tcp(collector: Any, tmp_path: Path) -> None:
    rs = collector()
    log = make_logger(LoggingSettings(
        stdout=False, file=tmp_path / "events.jsonl",
        sinks=[_sink("tcp", rs.port, name="soc"),
               _sink("tcp", rs.port, name="arcsight", format="cef", level="warning",
                     framing="lf")]))
    _emit_samples(log)
    lines = rs.wait_lines(4)  # 3 RFC 5424 + the one warning as CEF
    close_logger(log)
    file_events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    cef_lines = [x for x in lines if " CEF:0|" in x]
    assert len(cef_lines) == 1
    _check_against_file([x for x in lines if x not in cef_lines], file_events)
    frame = parse_rfc5424(cef_lines[0])
    assert frame.msgid == "modbus-request" and frame.sd == []
    c = parse_cef(frame.msg)
    denial = flatten(file_events[0])
    assert (c.vendor, c.product, c.class_id, c.name, c.severity) == (
        "mbsec", "mbsec", "modbus-request:no_rule", "request denied", "6")
    assert c.get("src") == "10.0.0.9" and c.get("spt") == "40000"
    assert c.get("suser") is None  # not bound in this sample
    assert c.get("mbsecTlsClientX509SubjectCommonName") == 'hmi "01" ] \\ x=y|z'
    assert c.get("cs1") == denial["rule.id"] and c.get("cs1Label") == "Rule ID"
    assert c.get("spriv") == "operator,a]b"


def test_remote_sink_under_the_console_format_sends_the_event(collector: Any) -> None:
    # the main lines are console text then, so the sink spools the event itself
    rs = collector()
    log = make_logger(LoggingSettings(format="console", stdout=False,
                                      sinks=[_sink("tcp", rs.port)]))
    events.emit(log, events.server_stop(4, 2.0))
    (line,) = rs.wait_lines(1)
    close_logger(log)
    msg = parse_rfc5424(line)
    assert msg.msgid == "server-stop" and msg.params("mbsec@32473", "sessions") == ["4"]


def test_collector_down_then_up_gets_the_spool_in_order(
    collector: Any, tmp_path: Path
) -> None:
    rs = collector(start=False)
    log = make_logger(LoggingSettings(stdout=False, file=tmp_path / "events.jsonl",
                                      sinks=[_sink("tcp", rs.port)]))
    remote = _remote(log)
    for i in range(30):
        log.info("tick", **{"event.action": "test-tick", "mbsec.seq": i})
    time.sleep(0.3)  # a few reconnect attempts fail meanwhile
    assert remote.connects == 0 and remote.spooled == 30
    rs.start()
    lines = rs.wait_lines(30)
    assert [parse_rfc5424(x).params("mbsec@32473", "seq") for x in lines] == [
        [str(i)] for i in range(30)]
    assert remote.connects == 1 and remote.dropped == 0
    # the collector restarts: the sender notices the closed connection and reconnects
    rs.stop()
    rs.start()
    for i in range(30, 35):
        log.info("tick", **{"event.action": "test-tick", "mbsec.seq": i})
    lines = rs.wait_lines(35)
    assert [parse_rfc5424(x).params("mbsec@32473", "seq")[0] for x in lines[30:]] == [
        str(i) for i in range(30, 35)]
    assert remote.connects == 2
    close_logger(log)


def test_full_spool_drops_new_events_counts_and_reports_them(
    collector: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rs = collector(start=False)
    log = make_logger(LoggingSettings(stdout=False, file=tmp_path / "events.jsonl",
                                      sinks=[_sink("tcp", rs.port, name="soc",
                                                   spool_events=5)]))
    remote = _remote(log)
    inner = log._logger  # type: ignore[attr-defined]
    for i in range(20):
        log.warning("tick", **{"event.action": "test-tick", "mbsec.seq": i})
    assert remote.dropped == 15 and remote.spooled == 5
    assert inner.healthy  # the file took every event: requests are not refused
    in_file = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    file_events = [e for e in in_file if e["event"]["action"] == "test-tick"]
    assert [e["mbsec"]["seq"] for e in file_events] == list(range(20))
    # the file also learns, once, that the remote sink is blind
    assert [e["event"]["action"] for e in in_file if e not in file_events] == ["log-sink-failed"]
    alarms = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(a["event"]["action"], a["mbsec"]["sink"], a["error"]["type"]) for a in alarms] == [
        ("log-sink-failed", "soc", "SpoolFull")]  # once, not per dropped event
    rs.start()
    deadline = time.monotonic() + 10
    while remote.spooled:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    log.warning("tick", **{"event.action": "test-tick", "mbsec.seq": 20})
    lines = rs.wait_lines(7)
    close_logger(log)
    got = [parse_rfc5424(x) for x in lines]
    assert [m.params("mbsec@32473", "seq") for m in got[:5]] == [[str(i)] for i in range(5)]
    notice = got[5]
    assert notice.msgid == "log-sink-dropped"
    assert notice.params("mbsec@32473", "dropped") == ["15"]
    assert notice.params("mbsec@32473", "dropped_first") == [file_events[5]["@timestamp"]]
    assert notice.params("mbsec@32473", "dropped_last") == [file_events[19]["@timestamp"]]
    assert got[6].params("mbsec@32473", "seq") == ["20"]


async def test_proxy_serves_at_full_speed_while_its_collector_is_away(
    pki: Pki, plc: PymodbusPlc, tmp_path: Path, nursery: trio.Nursery
) -> None:
    from mbsec.metrics import Metrics
    from mbsec.server import Proxy

    # a collector that never reads (its connection waits in the accept queue) and one that
    # is not there at all (its spool overflows)
    stall = socket.socket()
    stall.bind(("127.0.0.1", 0))
    stall.listen(1)
    stall_port = stall.getsockname()[1]
    policy = tmp_path / "policy.yaml"
    policy.write_text(TEST_POLICY, encoding="utf-8")
    logging_cfg = {
        "stdout": False, "allowed_requests": "info", "file": str(tmp_path / "events.jsonl"),
        "sinks": [
            {"type": "tcp", "address": f"127.0.0.1:{stall_port}", "spool_events": 50,
             "name": "stalled", "send_timeout": 30.0, "close_timeout": 0.0},
            {"type": "tcp", "address": f"127.0.0.1:{unused_port()}", "spool_events": 50,
             "name": "down", "reconnect_initial": 0.05, "close_timeout": 0.0},
        ],
    }
    settings = build_settings({
        "listen": ["127.0.0.1:0"],
        "tls": {"cert": str(pki.server.chain), "key": str(pki.server.key),
                "client_ca": str(pki.ca.trust_bundle), "crl": [str(pki.crl)]},
        "policy": str(policy),
        "upstreams": {"plc": {"host": "127.0.0.1", "port": plc.port, "unit_ids": [1, 2]}},
        "logging": logging_cfg,
    }, environment=False)
    log = make_logger(settings.logging)
    metrics = Metrics()
    proxy = Proxy(settings, log=log, metrics=metrics)
    addrs = await nursery.start(proxy.serve)
    client = await TlsClient.connect(addrs[0][1], pki.client_ctx(pki.engineer))
    started = time.monotonic()
    n = 300
    for tid in range(1, n + 1):
        pdu = read_hr(0, 4) if tid % 2 else struct.pack(">BHH", 6, 10, tid)  # reads and writes
        reply = await client.request(tid, 1, pdu)
        assert reply is not None and reply[2][0] == pdu[0], reply  # served, never refused
    elapsed = time.monotonic() - started
    await client.aclose()
    inner = log._logger  # type: ignore[attr-defined]
    stalled, down = (s for s in inner.sinks if isinstance(s, RemoteSink))
    assert down.dropped > 0  # its spool filled and overflowed
    assert stalled.sent + stalled.spooled + stalled.dropped > 0
    with trio.fail_after(5):  # the file sink's writer thread writes them within milliseconds
        while True:
            file_lines = (tmp_path / "events.jsonl").read_text().splitlines()
            requests = [json.loads(x) for x in file_lines if '"modbus-request"' in x]
            if len(requests) >= n:
                break
            await trio.sleep(0.01)
    assert len(requests) == n  # the local file is the guaranteed record
    assert elapsed < 30, elapsed  # generous (a shared box); the requests never wait on a sink
    assert 'mbsec_log_sink_failures_total{sink="down"}' in metrics.render()
    proxy.request_shutdown()
    close_logger(log)
    stall.close()


def test_a_collector_that_stops_reading_never_blocks_the_logging_thread(tmp_path: Path) -> None:
    """The sender blocks in send() (the collector's window is closed); the logging thread only
    spools, then drops, and each write stays quick."""
    stall = socket.socket()
    stall.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stall.bind(("127.0.0.1", 0))
    stall.listen(1)
    log = make_logger(LoggingSettings(stdout=False, file=tmp_path / "events.jsonl", sinks=[
        SinkSettings(type="tcp", address=f"127.0.0.1:{stall.getsockname()[1]}",
                     spool_events=100, send_timeout=5.0, close_timeout=0.0)]))
    remote = _remote(log)
    big = "x" * 20000
    slowest = 0.0
    for i in range(1500):  # 30 MB: more than any socket buffer takes
        t0 = time.perf_counter()
        log.warning("tick", **{"event.action": "test-tick", "mbsec.seq": i, "mbsec.pad": big})
        slowest = max(slowest, time.perf_counter() - t0)
    assert remote.connects == 1
    assert remote.dropped > 0 and remote.spooled == 100
    assert slowest < 1.0, slowest  # generous (a shared box), and far below send_timeout
    actions = [json.loads(x)["event"]["action"]
               for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert actions.count("test-tick") == 1500  # the file took every event
    assert set(actions) <= {"test-tick", "log-sink-failed"}  # and at most the alarm besides
    close_logger(log)
    stall.close()


async def test_mbsec_serve_ships_its_events_to_rsyslog_until_the_last_one(
    collector: Any, pki: Pki, plc: PymodbusPlc, tmp_path: Path
) -> None:
    """The real process: a [[logging.sinks]] table in the TOML file, RFC 5424 over TLS, and
    at SIGTERM the final server-stopped event still reaches the collector (the sink is
    flushed when the process stops)."""
    rs = collector(pki)
    cfg = serve_config(pki, tmp_path, plc.port, extra=f"""
[logging]
stdout = true
[[logging.sinks]]
type = "tls"
name = "soc"
address = "127.0.0.1:{rs.port}"
ca = "{pki.ca.trust_bundle}"
cert = "{pki.operator.chain}"
key = "{pki.operator.key}"
facility = "local5"
hostname = "dmz-proxy-1"
""")
    async with serve_process(cfg) as sp:
        start = await sp.next_event("server-start")
        port = int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])
        client = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        assert await client.request(1, 1, read_hr(0, 2)) is not None
        await client.aclose()
        sp.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await sp.proc.wait() == 0
    deadline = time.monotonic() + 10
    while not any(" server-stopped " in x for x in rs.lines()):
        assert time.monotonic() < deadline, rs.lines()
        await trio.sleep(0.02)
    received = [parse_rfc5424(x) for x in rs.lines()]
    actions = [m.msgid for m in received]
    assert actions[0] == "server-start" and actions[-1] == "server-stopped", actions
    assert "connection-closed" in actions and "tls-handshake" in actions
    assert {m.pri for m in received} >= {21 * 8 + 6}  # local5, info
    assert all(m.hostname == "dmz-proxy-1" and m.app_name == "mbsec" for m in received)
    assert received[-1].params("event@32473", "action") == ["server-stopped"]
