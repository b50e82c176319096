"""Strict parsers for what the sinks write: RFC 5424 messages and ArcSight CEF lines.

Written from the two specifications, independently of mbsec/sink_formats.py, and strict: an
escape the format does not define, an unescaped ``]`` in a PARAM-VALUE or an unescaped ``=``
in a CEF value is an error, not something to guess around.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADER = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    r"(?P<msgid>\S+) "
)
_SD_NAME = re.compile(r'[!-~]{1,32}')  # PRINTUSASCII, checked again for '= ]"' below


class ParseError(ValueError):
    pass


@dataclass
class Syslog5424:
    pri: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    #: (SD-ID, [(PARAM-NAME, value unescaped)]) in order
    sd: list[tuple[str, list[tuple[str, str]]]]
    msg: str

    def params(self, sd_id: str, name: str) -> list[str]:
        return [v for i, ps in self.sd if i == sd_id for n, v in ps if n == name]


def _sd_name(text: str, pos: int, stop: str) -> tuple[str, int]:
    end = pos
    while end < len(text) and text[end] not in stop:
        end += 1
    name = text[pos:end]
    if not _SD_NAME.fullmatch(name) or any(c in name for c in '= ]"'):
        raise ParseError(f"bad SD-NAME {name!r} at {pos}")
    return name, end


def parse_rfc5424(text: str) -> Syslog5424:
    m = _HEADER.match(text)
    if m is None:
        raise ParseError(f"not an RFC 5424 header: {text[:80]!r}")
    pos = m.end()
    sd: list[tuple[str, list[tuple[str, str]]]] = []
    if text.startswith("-", pos):
        pos += 1
    else:
        if not text.startswith("[", pos):
            raise ParseError("STRUCTURED-DATA is neither '-' nor '['")
        while text.startswith("[", pos):
            sd_id, pos = _sd_name(text, pos + 1, " ]")
            if "@" in sd_id and not re.fullmatch(r"[^@]+@\d+(\.\d+)*", sd_id):
                raise ParseError(f"bad SD-ID {sd_id!r}")
            params: list[tuple[str, str]] = []
            while text.startswith(" ", pos):
                name, pos = _sd_name(text, pos + 1, "=")
                if not text.startswith('="', pos):
                    raise ParseError(f"PARAM {name} without =\"")
                pos += 2
                value: list[str] = []
                while True:
                    if pos >= len(text):
                        raise ParseError("PARAM-VALUE not terminated")
                    c = text[pos]
                    if c == "\\" and pos + 1 < len(text) and text[pos + 1] in '"\\]':
                        value.append(text[pos + 1])
                        pos += 2
                    elif c == '"':
                        pos += 1
                        break
                    elif c == "]":
                        raise ParseError(f"unescaped ] in PARAM-VALUE at {pos}")
                    else:  # a backslash before anything else is kept (RFC 5424 6.3.3)
                        value.append(c)
                        pos += 1
                params.append((name, "".join(value)))
            if not text.startswith("]", pos):
                raise ParseError(f"SD-ELEMENT not closed at {pos}")
            pos += 1
            if any(i == sd_id for i, _ in sd):
                raise ParseError(f"SD-ID {sd_id} twice")
            sd.append((sd_id, params))
    msg = ""
    if pos < len(text):
        if text[pos] != " ":
            raise ParseError("no SP before MSG")
        msg = text[pos + 1:]
        msg = msg.removeprefix("\ufeff")
    return Syslog5424(int(m["pri"]), m["ts"], m["host"], m["app"], m["procid"], m["msgid"],
                      sd, msg)


def parse_octet_counted(data: bytes) -> list[str]:
    """RFC 6587 octet-counted frames -> the messages."""
    out = []
    while data:
        length, sp, rest = data.partition(b" ")
        if not sp or not length.isdigit():
            raise ParseError(f"bad frame length {length[:10]!r}")
        n = int(length)
        if len(rest) < n:
            raise ParseError("truncated frame")
        out.append(rest[:n].decode("utf-8"))
        data = rest[n:]
    return out


@dataclass
class Cef:
    version: str
    vendor: str
    product: str
    device_version: str
    class_id: str
    name: str
    severity: str
    extension: list[tuple[str, str]]

    def get(self, key: str) -> str | None:
        return next((v for k, v in self.extension if k == key), None)


_CEF_KEY = re.compile(r"[A-Za-z0-9_]+")
_EXT_ESCAPES = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}


def parse_cef(text: str) -> Cef:
    """A CEF line (anything before ``CEF:``, such as a syslog header, is skipped)."""
    start = text.find("CEF:")
    if start < 0:
        raise ParseError("no CEF:")
    s = text[start + 4:]
    fields: list[str] = []
    cur: list[str] = []
    pos = 0
    while len(fields) < 7:
        if pos >= len(s):
            raise ParseError(f"header has {len(fields)} fields, not 7")
        c = s[pos]
        if c == "\\":
            nxt = s[pos + 1: pos + 2]
            if nxt not in ("\\", "|"):
                raise ParseError(f"bad header escape \\{nxt}")
            cur.append(nxt)
            pos += 2
        elif c == "|":
            fields.append("".join(cur))
            cur = []
            pos += 1
        elif c in "\r\n":
            raise ParseError("newline in the header")
        else:
            cur.append(c)
            pos += 1
    ext = s[pos:]
    # the separators: every unescaped '='; its key is the word before it
    equals = []
    i = 0
    while i < len(ext):
        if ext[i] == "\\":
            i += 2
            continue
        if ext[i] == "=":
            equals.append(i)
        i += 1
    pairs: list[tuple[str, str]] = []
    key_starts = []
    for p in equals:
        k = ext.rfind(" ", 0, p) + 1
        key = ext[k:p]
        if not _CEF_KEY.fullmatch(key):
            raise ParseError(f"bad extension key {key!r} (an unescaped '=' in a value?)")
        key_starts.append((k, p, key))
    for n, (_k, p, key) in enumerate(key_starts):
        end = key_starts[n + 1][0] - 1 if n + 1 < len(key_starts) else len(ext)
        if n + 1 < len(key_starts) and ext[end] != " ":
            raise ParseError("no space between extension pairs")
        raw = ext[p + 1:end]
        value: list[str] = []
        j = 0
        while j < len(raw):
            if raw[j] == "\\":
                nxt = raw[j + 1: j + 2]
                if nxt not in _EXT_ESCAPES:
                    raise ParseError(f"bad extension escape \\{nxt}")
                value.append(_EXT_ESCAPES[nxt])
                j += 2
            elif raw[j] in "\r\n":
                raise ParseError("raw newline in an extension value")
            else:
                value.append(raw[j])
                j += 1
        pairs.append((key, "".join(value)))
    if not key_starts and ext.strip():
        raise ParseError("extension without key=value")
    version, *rest = fields
    if not version.isdigit():
        raise ParseError(f"bad CEF version {version!r}")
    return Cef(version, *rest, extension=pairs)  # type: ignore[call-arg]
