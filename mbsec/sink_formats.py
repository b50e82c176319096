"""Event formats for the sinks besides the ECS JSON line: RFC 5424 syslog and ArcSight CEF.

Pure functions of one event (the nested ECS dict the logger built): no I/O, no clock, no
state, so they run on whichever thread a sink formats on (the remote sinks' sender threads,
never the data plane) and are tested without sockets.

RFC 5424 (section 6): ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG``. Every event
field goes into structured data: one SD-ELEMENT per ECS field set (the dotted path without
its last part, ``tls.client.x509.subject@32473``), one SD-PARAM per leaf (``common_name``), a
list as the same PARAM-NAME repeated (6.3.3 allows it). PARAM-VALUE escapes ``"``, ``\\`` and
``]`` with a backslash (6.3.3). MSG is the event's message, plain when it is ASCII, otherwise
UTF-8 after the BOM (6.4).

CEF (ArcSight Common Event Format, implementation standard): ``CEF:0|Vendor|Product|Version|
Class ID|Name|Severity|Extension``. Header fields escape ``\\`` and ``|``; extension values
escape ``\\`` and ``=`` and write CR/LF as ``\\r``/``\\n``. Well-known fields get the CEF
dictionary keys (``src``, ``spt``, ``suser``...), every other field a custom key
``mbsec`` + the dotted name in CamelCase (the standard's naming rule for vendor keys).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging.handlers
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from mbsec import __version__

#: RFC 5424 severity (6.2.1) of each log level
SYSLOG_SEVERITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
#: CEF severity 0-10 (0-3 low, 4-6 medium, 7-8 high, 9-10 very high)
CEF_SEVERITY = {"debug": 1, "info": 3, "warning": 6, "error": 8, "critical": 10}
#: facility name -> code, as syslog(3) and the standard library spell them
FACILITIES: Mapping[str, int] = logging.handlers.SysLogHandler.facility_names

APP_NAME = "mbsec"
#: the fields the RFC 5424 header already carries (TIMESTAMP, MSG, severity, APP-NAME)
HEADER_FIELDS = frozenset(("@timestamp", "message", "log.level", "ecs.version", "service.name"))
_NIL = "-"
_BOM = "\ufeff"


def flat_fields(event: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The nested ECS event as ``(dotted name, value)`` pairs, in the event's order."""
    for key, value in event.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flat_fields(value, name + ".")
        else:
            yield name, value


def field_values(value: Any) -> list[str]:
    """One field's value as strings: a list gives one string per item; None gives none."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [s for item in value for s in field_values(item)]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, int | float):
        return [repr(value) if isinstance(value, float) else str(value)]
    return [json.dumps(value, separators=(",", ":"), default=str)]


# -- RFC 5424 ------------------------------------------------------------------------------------


def _printusascii(value: str, limit: int) -> str:
    """A header field: PRINTUSASCII (33..126), at most ``limit`` characters, or NILVALUE."""
    out = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return out or _NIL


def _sd_name(value: str) -> str:
    """SD-NAME: PRINTUSASCII except ``=``, space, ``]`` and ``"``, 1 to 32 characters."""
    return "".join(c for c in value if 33 <= ord(c) <= 126 and c not in '= ]"')[:32]


def escape_param_value(value: str) -> str:
    """RFC 5424 6.3.3: ``"``, ``\\`` and ``]`` are escaped with a backslash (only those)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def sd_address(name: str, enterprise_number: int) -> tuple[str, str]:
    """Where a dotted field goes: ``(SD-ID, PARAM-NAME)``.

    ``tls.client.x509.subject.common_name`` -> ``("tls.client.x509.subject@32473",
    "common_name")``. When that SD-ID would pass 32 characters, the first label is the SD-ID
    and the rest the PARAM-NAME; a field without a dot goes to ``mbsec@PEN``.
    """
    suffix = f"@{enterprise_number}"
    parent, dot, leaf = name.rpartition(".")
    if not dot:
        return f"mbsec{suffix}", _sd_name(name)
    if len(parent) + len(suffix) > 32:
        parent, _, leaf = name.partition(".")
    return _sd_name(parent)[: 32 - len(suffix)] + suffix, _sd_name(leaf)


def structured_data(event: Mapping[str, Any], enterprise_number: int) -> str:
    """The STRUCTURED-DATA part for ``event`` (NILVALUE when it has no fields)."""
    elements: dict[str, list[str]] = {}
    for name, value in flat_fields(event):
        if name in HEADER_FIELDS:
            continue
        sd_id, param = sd_address(name, enterprise_number)
        params = elements.setdefault(sd_id, [])
        params.extend(f'{param}="{escape_param_value(v)}"' for v in field_values(value))
    parts = [f"[{sd_id} {' '.join(params)}]" for sd_id, params in elements.items() if params]
    return "".join(parts) or _NIL


_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)\Z")


def _timestamp(event: Mapping[str, Any]) -> str:
    stamp = event.get("@timestamp")
    if isinstance(stamp, str) and _RFC3339.match(stamp):
        return stamp
    return _NIL


def _msg(text: str) -> str:
    return text if text.isascii() else _BOM + text


def rfc5424(
    level: str,
    event: Mapping[str, Any],
    *,
    facility: int,
    hostname: str,
    procid: int | str,
    enterprise_number: int,
    message: str | None = None,
    structured: bool = True,
) -> str:
    """One RFC 5424 SYSLOG-MSG (without framing). ``message`` replaces the event's message as
    MSG (a CEF or JSON payload); ``structured=False`` writes NILVALUE for STRUCTURED-DATA."""
    pri = facility * 8 + SYSLOG_SEVERITY.get(level, 6)
    ev_section = event.get("event")
    action = ev_section.get("action") if isinstance(ev_section, dict) else None
    msgid = _printusascii(str(action), 32) if action else _NIL
    sd = structured_data(event, enterprise_number) if structured else _NIL
    text = message if message is not None else str(event.get("message", ""))
    head = (f"<{pri}>1 {_timestamp(event)} {_printusascii(hostname, 255)} {APP_NAME} "
            f"{_printusascii(str(procid), 128)} {msgid} {sd}")
    return f"{head} {_msg(text)}" if text else head


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(text: str) -> str:
    """For line-oriented outputs (a file, stdout): control characters as ``#NNN`` (octal),
    the convention rsyslog uses when it writes what it received (so a value cannot start a
    new line)."""
    return _CONTROL.sub(lambda m: f"#{ord(m.group()):03o}", text)


def octet_counted(msg: str) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3 framing: ``MSG-LEN SP SYSLOG-MSG`` (length in octets)."""
    data = msg.encode("utf-8")
    return b"%d %s" % (len(data), data)


# -- CEF ----------------------------------------------------------------------------------------


def cef_escape_header(value: str) -> str:
    """Header fields: ``\\`` and ``|`` escaped; CR/LF (not allowed in a one-line header)
    become spaces."""
    out = value.replace("\\", "\\\\").replace("|", "\\|")
    return out.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def cef_escape_value(value: str) -> str:
    """Extension values: ``\\`` and ``=`` escaped, CR and LF written ``\\r`` and ``\\n``
    (``|`` is not escaped in the extension)."""
    out = value.replace("\\", "\\\\").replace("=", "\\=")
    return out.replace("\r", "\\r").replace("\n", "\\n")


def cef_line(
    vendor: str, product: str, version: str, class_id: str, name: str, severity: int | str,
    extension: list[tuple[str, str]],
) -> str:
    """``CEF:0|...|extension`` with every part escaped; ``extension``: ``(key, value)`` pairs
    (keys are alphanumeric, so they need no escaping)."""
    header = "|".join(cef_escape_header(str(x)) for x in
                      (vendor, product, version, class_id, name, severity))
    ext = " ".join(f"{k}={cef_escape_value(v)}" for k, v in extension)
    return f"CEF:0|{header}|{ext}"


def _address_key(side: str, value: str) -> str:
    """``src``/``dst`` for IPv4, ``c6a2``/``c6a3`` (labelled) for IPv6, ``shost``/``dhost``
    for a name (a PLC configured by host name)."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return "shost" if side == "source" else "dhost"
    if ip.version == 6:
        return "c6a2" if side == "source" else "c6a3"
    return "src" if side == "source" else "dst"


def _rt(stamp: Any) -> str | None:
    """``rt``: milliseconds since the epoch (one of the forms the standard lists)."""
    if not isinstance(stamp, str):
        return None
    try:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return str(int(when.timestamp() * 1000))


#: ECS field -> CEF dictionary key (where the dictionary has a key that means the same)
CEF_KEYS: dict[str, str] = {
    "source.port": "spt",
    "destination.port": "dpt",
    "user.name": "suser",
    "user.roles": "spriv",
    "event.outcome": "outcome",
    "event.reason": "reason",
    "modbus.decision": "act",
    "rule.id": "cs1",
    "tls.client.hash.sha256": "cs2",
    "mbsec.target": "cs3",
    "modbus.function": "cs4",
    "mbsec.conn_id": "cn1",
    "modbus.unit_id": "cn2",
    "modbus.function_code": "cn3",
}
#: labels of the custom CEF keys used above
CEF_LABELS = {
    "cs1": "Rule ID", "cs2": "Client Certificate SHA-256", "cs3": "PLC Target",
    "cs4": "Modbus Function", "cn1": "Connection ID", "cn2": "Modbus Unit ID",
    "cn3": "Modbus Function Code", "c6a2": "Source IPv6 Address",
    "c6a3": "Destination IPv6 Address",
}


def cef_custom_key(name: str) -> str:
    """``modbus.function_code`` -> ``mbsecModbusFunctionCode`` (``mbsec.request_bytes`` ->
    ``mbsecRequestBytes``): the standard's naming for keys outside its dictionary (vendor
    prefix, then the name, alphanumeric only)."""
    words = re.split(r"[^A-Za-z0-9]+", name.removeprefix("mbsec."))
    return "mbsec" + "".join(w[:1].upper() + w[1:] for w in words if w)


def cef(
    level: str, event: Mapping[str, Any], *, vendor: str = "mbsec", product: str = "mbsec",
    version: str = __version__,
) -> str:
    """One event as a CEF line. Class ID: ``event.action`` (``:event.reason`` when it has
    one, so a SIEM rule can key on ``tls-handshake:certificate_revoked``); Name: the message."""
    flat = dict(flat_fields(event))
    action = str(flat.get("event.action", "unknown"))
    reason = flat.get("event.reason")
    class_id = f"{action}:{reason}" if reason else action
    ext: list[tuple[str, str]] = []
    rt = _rt(flat.get("@timestamp"))
    if rt is not None:
        ext.append(("rt", rt))
    labels: list[tuple[str, str]] = []
    for name, value in flat.items():
        if name in HEADER_FIELDS:
            continue
        values = field_values(value)
        if not values:
            continue
        text = ",".join(values)
        if name in ("source.ip", "destination.ip"):
            key = _address_key(name.partition(".")[0], text)
        else:
            key = CEF_KEYS.get(name) or cef_custom_key(name)
        ext.append((key, text))
        if key in CEF_LABELS:
            labels.append((key + "Label", CEF_LABELS[key]))
    return cef_line(vendor, product, version, class_id, str(flat.get("message", action)),
                    CEF_SEVERITY.get(level, 3), ext + labels)


Formatter = Callable[[str, Mapping[str, Any]], str]


def json_line(level: str, event: Mapping[str, Any]) -> str:
    """The ECS JSON line (what the logger renders; for a sink that gets only the event)."""
    return json.dumps(event, separators=(",", ":"), default=str)
