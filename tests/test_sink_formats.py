"""RFC 5424 and CEF formatting (mbsec/sink_formats.py), checked with strict parsers written
from the specifications (tests/syslog_parsers.py) and against the CEF standard's examples."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from syslog_parsers import ParseError, parse_cef, parse_octet_counted, parse_rfc5424

from mbsec import events, sink_formats
from mbsec.audit import nest_dotted
from mbsec.sink_formats import (
    cef,
    cef_line,
    escape_param_value,
    field_values,
    flat_fields,
    octet_counted,
    rfc5424,
    sd_address,
)

# The "Character Encoding" examples of the ArcSight CEF implementation standard (as also quoted
# by e.g. https://library.humio.com/falcon-logscale/functions-parsecef.html): a pipe in the
# header is escaped, in the extension it is not; a backslash is escaped in both; an equal sign
# is escaped only in the extension; a newline in an extension value is written \n.
SPEC_EXAMPLES = [
    ("Sep 19 08:26:10 host CEF:0|security|threatmanager|1.0|100|detected a \\| in packet|10|"
     "src=10.0.0.1 act=blocked a | dst=1.1.1.1",
     "detected a | in packet", [("src", "10.0.0.1"), ("act", "blocked a |"),
                                ("dst", "1.1.1.1")]),
    ("Sep 19 08:26:10 host CEF:0|security|threatmanager|1.0|100|detected a \\\\ in packet|10|"
     "src=10.0.0.1 act=blocked a \\\\ dst=1.1.1.1",
     "detected a \\ in packet", [("src", "10.0.0.1"), ("act", "blocked a \\"),
                                 ("dst", "1.1.1.1")]),
    ("Sep 19 08:26:10 host CEF:0|security|threatmanager|1.0|100|detected a = in message|10|"
     "src=10.0.0.1 act=blocked a \\= dst=1.1.1.1",
     "detected a = in message", [("src", "10.0.0.1"), ("act", "blocked a ="),
                                 ("dst", "1.1.1.1")]),
    ("Sep 19 08:26:10 host CEF:0|security|threatmanager|1.0|100|Detected a threat. No action "
     "needed.|10|src=10.0.0.1 msg=Detected a threat.\\n No action needed.",
     "Detected a threat. No action needed.",
     [("src", "10.0.0.1"), ("msg", "Detected a threat.\n No action needed.")]),
    ("Sep 19 08:26:10 host CEF:0|security|threatmanager|1.0|100|worm successfully stopped|10|"
     "src=10.0.0.1 dst=2.1.2.2 spt=1232",
     "worm successfully stopped", [("src", "10.0.0.1"), ("dst", "2.1.2.2"), ("spt", "1232")]),
]


@pytest.mark.parametrize(("line", "name", "extension"), SPEC_EXAMPLES)
def test_cef_spec_examples_parse_and_are_reproduced_exactly(
    line: str, name: str, extension: list[tuple[str, str]]
) -> None:
    parsed = parse_cef(line)
    assert (parsed.version, parsed.vendor, parsed.product, parsed.device_version,
            parsed.class_id, parsed.name, parsed.severity) == (
        "0", "security", "threatmanager", "1.0", "100", name, "10")
    assert parsed.extension == extension
    # mbsec's writer, given the same contents, writes the standard's text byte for byte
    ours = cef_line("security", "threatmanager", "1.0", "100", name, 10, extension)
    assert "Sep 19 08:26:10 host " + ours == line


def test_the_strict_cef_parser_rejects_what_the_standard_forbids() -> None:
    for bad in ("CEF:0|a|b|c|d|e|5|k=a=b",        # unescaped = in a value
                "CEF:0|a|b\\x|c|d|e|5|k=v",      # undefined header escape
                "CEF:0|a|b|c|d|e|5|k=a\\tb",     # undefined extension escape
                "CEF:0|a|b|c|d|e",               # short header
                "CEF:0|a|b|c|d|e|5|k=line\nbreak"):
        with pytest.raises(ParseError):
            parse_cef(bad)


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_header_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",),
                                     exclude_characters="\r\n"), max_size=40)


@given(header=st.lists(_header_text, min_size=5, max_size=5),
       values=st.lists(_text, max_size=6))
def test_cef_round_trips_any_text(header: list[str], values: list[str]) -> None:
    extension = [(f"k{i}", v) for i, v in enumerate(values)]
    line = cef_line(*header, 5, extension)
    assert "\n" not in line and "\r" not in line
    parsed = parse_cef(line)
    assert [parsed.vendor, parsed.product, parsed.device_version, parsed.class_id,
            parsed.name] == header
    assert parsed.extension == extension


@given(_text)
def test_sd_param_values_round_trip_any_text(value: str) -> None:
    msg = f'<134>1 - h mbsec 1 x [a@32473 p="{escape_param_value(value)}"]'
    assert parse_rfc5424(msg).params("a@32473", "p") == [value]


def test_param_value_escapes_exactly_quote_backslash_and_bracket() -> None:
    assert escape_param_value('a"b\\c]d=e|f') == 'a\\"b\\\\c\\]d=e|f'


def _event(**extra: object) -> dict[str, object]:
    ev = events.modbus_request_denied(7, 1, 6, None, 0.0012, 'rule "x" [1]', "no_rule", 1)
    flat: dict[str, object] = {
        "@timestamp": "2026-12-06T23:30:16.123456Z", "message": ev.message, **ev.fields,
        "log.level": ev.level, "ecs.version": "8.11.0", "service.name": "mbsec",
        "source.ip": "10.0.0.9", "source.port": 40000, "user.roles": ["operator", "eng]\\"],
        "tls.client.x509.subject.common_name": 'hmi "01" \\ ]',
        **extra,
    }
    return nest_dotted(flat)


def test_rfc5424_header_and_structured_data_carry_every_field() -> None:
    event = _event()
    text = rfc5424("warning", event, facility=sink_formats.FACILITIES["local3"],
                   hostname="dmz-proxy-1", procid=4242, enterprise_number=32473)
    msg = parse_rfc5424(text)
    assert msg.pri == 19 * 8 + 4  # local3, warning
    assert (msg.timestamp, msg.hostname, msg.app_name, msg.procid, msg.msgid) == (
        "2026-12-06T23:30:16.123456Z", "dmz-proxy-1", "mbsec", "4242", "modbus-request")
    assert msg.msg == "request denied"
    seen = 0
    for name, value in flat_fields(event):
        if name in sink_formats.HEADER_FIELDS:
            continue
        sd_id, param = sd_address(name, 32473)
        assert msg.params(sd_id, param) == field_values(value), name
        seen += 1
    assert seen > 10
    assert msg.params("user@32473", "roles") == ["operator", "eng]\\"]  # a list: repeated
    assert msg.params("tls.client.x509.subject@32473", "common_name") == ['hmi "01" \\ ]']
    # nothing but the fields: every SD-PARAM is one of them
    assert sum(len(ps) for _, ps in msg.sd) == sum(
        len(field_values(v)) for n, v in flat_fields(event) if n not in sink_formats.HEADER_FIELDS)


def test_every_registered_field_has_a_valid_sd_address() -> None:
    names = set(events.COMMON_FIELDS).union(*(s.fields for s in events.ACTIONS.values()),
                                            *events.CONTEXTS.values())
    for name in names - sink_formats.HEADER_FIELDS:
        sd_id, param = sd_address(name, 32473)
        assert len(sd_id) <= 32 and 1 <= len(param) <= 32, name
        assert sd_id.rpartition("@")[0] + "." + param == name  # nothing cut or merged


def test_non_ascii_message_gets_the_bom_and_ascii_does_not() -> None:
    ascii_msg = rfc5424("info", {"message": "ok"}, facility=16, hostname="h", procid=1,
                        enterprise_number=32473)
    assert ascii_msg.endswith(" - - ok")
    text = rfc5424("info", {"message": "Störung"}, facility=16, hostname="h", procid=1,
                   enterprise_number=32473)
    assert text.endswith(" \ufeffStörung")
    assert parse_rfc5424(text).msg == "Störung"


def test_octet_counting_counts_bytes_not_characters() -> None:
    frames = octet_counted("<14>1 - h a - - - é") + octet_counted("<14>1 - h a - - - x")
    assert frames.startswith(b"20 ")
    assert parse_octet_counted(frames) == ["<14>1 - h a - - - é", "<14>1 - h a - - - x"]


def test_cef_of_an_event_maps_the_dictionary_keys_and_escapes() -> None:
    event = _event(**{"event.reason": "no_rule", "destination.ip": "fd00::1",
                      "modbus.write.values": [1, 2]})
    line = cef("warning", event, version="9.9")
    parsed = parse_cef(line)
    assert (parsed.vendor, parsed.product, parsed.device_version) == ("mbsec", "mbsec", "9.9")
    assert parsed.class_id == "modbus-request:no_rule"
    assert parsed.name == "request denied" and parsed.severity == "6"
    assert parsed.get("src") == "10.0.0.9" and parsed.get("spt") == "40000"
    assert parsed.get("c6a3") == "fd00::1"
    assert parsed.get("c6a3Label") == "Destination IPv6 Address"
    assert parsed.get("cs1") == 'rule "x" [1]' and parsed.get("cs1Label") == "Rule ID"
    assert parsed.get("spriv") == "operator,eng]\\"
    assert parsed.get("mbsecTlsClientX509SubjectCommonName") == 'hmi "01" \\ ]'
    assert parsed.get("mbsecModbusWriteValues") == "1,2"
    assert parsed.get("rt") == "1796599816123"
    keys = [k for k, _ in parsed.extension]
    assert len(keys) == len(set(keys))


def test_every_registered_field_has_a_distinct_cef_key() -> None:
    names = set().union(*(s.fields for s in events.ACTIONS.values()), *events.CONTEXTS.values())
    keys: dict[str, str] = {}
    for name in sorted(names):
        key = sink_formats.CEF_KEYS.get(name) or sink_formats.cef_custom_key(name)
        if name in ("source.ip", "destination.ip"):
            continue  # src/dst, shost/dhost or c6a2/c6a3 by value
        assert key not in keys, (name, keys.get(key))
        keys[key] = name


def test_one_line_escapes_control_characters() -> None:
    assert sink_formats.one_line("a\nb\tc") == "a#012b#011c"
    assert json.loads(json.dumps("x"))  # (json lines are escaped by json itself)
