"""``[[logging.sinks]]``: parsing and validation, per-sink levels and formats through the
logger (mbsec/audit.py), and ``mbsec config check`` on sink material. No network here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from syslog_parsers import parse_cef, parse_rfc5424

from mbsec import events
from mbsec.audit import ListSink, SinkLogger, check_sinks, close_logger, make_logger
from mbsec.settings import LoggingSettings, SettingsError, SinkSettings, load_settings


def _config(tmp_path: Path, logging_toml: str) -> Path:
    cfg = tmp_path / "mbsec.toml"
    cfg.write_text(
        'policy = "policy.yaml"\n[tls]\ncert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n'
        + logging_toml, encoding="utf-8")
    return cfg


def test_sinks_from_toml_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '''
[logging]
file = "events.jsonl"
[[logging.sinks]]
type = "tls"
address = "siem.example.net"
ca = "siem-ca.pem"
cert = "me.pem"
key = "me.key"
level = "warning"
format = "cef"
[[logging.sinks]]
type = "file"
path = "logs/events.5424"
format = "rfc5424"
''')
    s = load_settings(cfg).logging
    tls, file = s.sinks
    assert tls.host_port() == ("siem.example.net", 6514)  # RFC 5425's port by default
    assert tls.ca == tmp_path / "siem-ca.pem" and tls.key == tmp_path / "me.key"
    assert (tls.level, tls.effective_format(), tls.label(0)) == ("warning", "cef", "tls-0")
    assert file.path == tmp_path / "logs" / "events.5424"
    assert SinkSettings(type="tcp", address="h:1").effective_format() == "rfc5424"
    assert SinkSettings(type="tcp", address="h").host_port() == ("h", 514)


@pytest.mark.parametrize(("entry", "message"), [
    ('type = "file"', "a file sink needs 'path'"),
    ('type = "tcp"', "a tcp sink needs 'address'"),
    ('type = "tls"\naddress = "h:6514"', "a tls sink needs 'ca'"),
    ('type = "tls"\naddress = "h:6514"\nca = "a"\ncert = "c"', "'cert' and 'key' go together"),
    ('type = "stdout"\naddress = "h:1"', "'address' is for tcp/tls sinks"),
    ('type = "tcp"\naddress = "h:1"\nca = "a"', "ca: only for tls sinks"),
    ('type = "tcp"\naddress = "h:1"\nfacility = "local9"', "unknown syslog facility"),
    ('type = "tcp"\naddress = "h:99999"', "out of range"),
    ('type = "tcp"\naddress = "h:1"\nformat = "xml"', "format"),
    ('type = "tcp"\naddress = "h:1"\nlevel = "error"', "level"),
    ('type = "tcp"\naddress = "h:1"\nspool_events = 0', "spool_events"),
    ('type = "tcp"\naddress = "h:1"\nhostname = "a b"', "printable ASCII"),
    ('type = "tcp"\naddress = "h:1"\nreconnect_initial = 5\nreconnect_max = 1',
     "reconnect_max is below"),
    ('type = "tcp"\naddress = "h:1"\ntypo = 1', "unknown key"),
    ('type = "tls"\naddress = "h:1"\nca = "a"\nserver_name = "a..b"', "not a valid host name"),
])
def test_bad_sink_entries_are_one_line_errors(tmp_path: Path, entry: str, message: str) -> None:
    cfg = _config(tmp_path, f"[[logging.sinks]]\n{entry}\n")
    with pytest.raises(SettingsError) as err:
        load_settings(cfg)
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"{cfg}: logging.sinks.0")
    assert message in err.value.problems[0]


def test_two_sinks_with_one_name_are_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, '[[logging.sinks]]\ntype = "stdout"\nname = "a"\n'
                            '[[logging.sinks]]\ntype = "stdout"\nformat = "cef"\nname = "a"\n')
    with pytest.raises(SettingsError, match="name a is used twice"):
        load_settings(cfg)


def test_config_check_reports_unreadable_tls_material(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("not a certificate\n")
    settings = LoggingSettings(sinks=[
        SinkSettings(type="tls", address="h:6514", ca=tmp_path / "missing.pem", name="soc"),
        SinkSettings(type="tls", address="h:6514", ca=bad, name="siem"),
    ])
    problems = check_sinks(settings)
    assert problems[0] == (f"logging.sinks[0] (soc): ca: {tmp_path / 'missing.pem'} is not "
                           "a file")
    assert problems[1].startswith("logging.sinks[1] (siem): TLS material:")
    assert len(problems) == 2
    (tmp_path / "adir").mkdir()
    assert check_sinks(LoggingSettings(sinks=[SinkSettings(type="file", path=tmp_path / "adir")])
                       ) == [f"logging.sinks[0] (file-0): {tmp_path / 'adir'} is a directory"]


def test_each_sink_has_its_own_minimum_level_and_format(tmp_path: Path) -> None:
    legacy = ListSink()  # the old keys' sinks stay at logging.level
    log = make_logger(LoggingSettings(stdout=False, level="info", sinks=[
        SinkSettings(type="file", path=tmp_path / "debug.jsonl", level="debug"),
        SinkSettings(type="file", path=tmp_path / "warn.cef", level="warning", format="cef"),
        SinkSettings(type="file", path=tmp_path / "all.5424", format="rfc5424",
                     hostname="h1"),
    ]), extra_sinks=[legacy])
    assert log.is_enabled_for(10)  # a debug sink: debug events are built
    log.debug("allowed", **{"event.action": "modbus-request", "mbsec.note": "line\nbreak"})
    log.info("connected", **{"event.action": "upstream-connect"})
    events.emit(log, events.log_sink_dropped("x", 3, None, None))
    close_logger(log)
    debug = [json.loads(x)["message"] for x in (tmp_path / "debug.jsonl").read_text()
             .splitlines()]
    assert debug == ["allowed", "connected", "log sink dropped events"]
    assert [e["message"] for e in legacy.events()] == ["connected", "log sink dropped events"]
    cef_lines = (tmp_path / "warn.cef").read_text().splitlines()
    assert [parse_cef(x).class_id for x in cef_lines] == ["log-sink-dropped"]
    rfc = [parse_rfc5424(x) for x in (tmp_path / "all.5424").read_text().splitlines()]
    assert [(m.msgid, m.hostname) for m in rfc] == [("upstream-connect", "h1"),
                                                    ("log-sink-dropped", "h1")]


def test_rfc5424_lines_in_a_file_escape_control_characters(tmp_path: Path) -> None:
    log = make_logger(LoggingSettings(stdout=False, sinks=[
        SinkSettings(type="file", path=tmp_path / "e.5424", format="rfc5424")]))
    log.warning("x", **{"event.action": "a", "mbsec.note": "two\nlines"})
    close_logger(log)
    (line,) = (tmp_path / "e.5424").read_text().splitlines()
    assert parse_rfc5424(line).params("mbsec@32473", "note") == ["two#012lines"]


def test_json_sink_under_the_console_format_still_gets_json(tmp_path: Path) -> None:
    out = io.StringIO()
    log = make_logger(LoggingSettings(format="console", sinks=[
        SinkSettings(type="file", path=tmp_path / "e.jsonl")]), stdout=out)
    log.info("hello", **{"event.action": "a"})
    close_logger(log)
    assert "hello" in out.getvalue() and not out.getvalue().startswith("{")
    assert json.loads((tmp_path / "e.jsonl").read_text())["event"]["action"] == "a"


def test_health_counts_only_the_sinks_that_wanted_the_event() -> None:
    class Failing(ListSink):
        def write(self, level: str, line: str) -> None:
            raise OSError(28, "No space left on device")

    sink = SinkLogger([Failing(), ListSink()], levels=[10, 30], alarm=io.StringIO())
    sink.info('{"message": "m"}')  # only the failing sink wanted it
    assert not sink.healthy
    sink.warning('{"message": "m"}')  # the second one took it
    assert sink.healthy
    quiet = SinkLogger([ListSink()], levels=[30])
    quiet.info('{"message": "m"}')  # nobody wanted it: nothing lost
    assert quiet.healthy
