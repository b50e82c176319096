"""Recorded requests: ``modbus-request`` events read back from JSON-lines logs, one at a time.

``mbsec policy learn`` and ``mbsec policy replay`` work on what the proxy logged. An event
carries everything the policy decided on (docs/events.md): the client's certificate facts
(connection context), the unit, the function, the ranges, the written values (at most 16,
``mbsec.values_total`` when cut) and the request size. This module turns each event back into
the :class:`Access` and certificate facts the proxy had, so a candidate policy decides exactly
what the live one decided on.

Streaming on purpose: files are read line by line (gzip or plain, ``-`` for stdin) and a
:class:`Record` is yielded per request; the only state kept across lines is bounded (which
connections have a pending monitor-mode ``would_deny``, each connection's certificate role
from its ``tls-handshake``), so a year of logs fits in the memory of a day's.

One request, one record: in monitor mode the proxy writes a ``would_deny`` event when it
decides and an outcome event when the PLC answered (or failed); the outcome is recognised and
skipped. Invalid requests (rejected by the Modbus parser, no policy decision) are counted,
not yielded.
"""

from __future__ import annotations

import gzip
import io
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from mbsec.modbus.access import Access, Table
from mbsec.policy.cases import Who

#: connections whose ``would_deny`` waits for its outcome event (monitor mode), and
#: connections whose handshake named the certificate role; the oldest are forgotten first
PENDING_MAX = 65536
ROLES_MAX = 65536

_TABLES = {1: Table.COILS, 5: Table.COILS, 15: Table.COILS, 2: Table.DISCRETE_INPUTS,
           3: Table.HOLDING_REGISTERS, 6: Table.HOLDING_REGISTERS,
           16: Table.HOLDING_REGISTERS, 22: Table.HOLDING_REGISTERS,
           23: Table.HOLDING_REGISTERS, 24: Table.HOLDING_REGISTERS,
           4: Table.INPUT_REGISTERS, 20: Table.FILE_RECORDS, 21: Table.FILE_RECORDS}
_READS = frozenset({1, 2, 3, 4, 20, 24})
_WRITES = frozenset({5, 6, 15, 16, 21, 22})

#: what the policy decided, from the event's ``modbus.decision``: the rate limiter, a PLC
#: failure or a dead log sink come after a policy "allow"
_POLICY_DECISION = {"allow": "allow", "deny": "deny", "would_deny": "would_deny",
                    "rate_limited": "allow", "audit_unavailable": "allow"}


class InputError(Exception):
    """An events file cannot be read (one line for the user: file and reason)."""


@dataclass(frozen=True, slots=True)
class Record:
    """One recorded request: who, where, what, and what the recorded policy decided."""

    timestamp: str
    who: Who
    #: the roles the recording policy resolved (certificate role plus identities: mappings)
    roles: tuple[str, ...]
    #: False when the certificate's own role was not in the events (older logs): ``who.role``
    #: then holds nothing and ``roles`` stands in for it
    role_known: bool
    source: str
    unit: int
    target: str | None
    access: Access
    #: ``allow``, ``deny`` or ``would_deny``: what the recorded policy decided
    decision: str
    rule: str
    #: the event's own decision (``rate_limited``, ``audit_unavailable``... kept for reports)
    event_decision: str
    #: True when the event logged only the first written values (``mbsec.values_total``)
    values_cut: bool
    location: str  # file:line

    @property
    def forwarded(self) -> bool:
        return self.decision != "deny"


@dataclass
class ReadStats:
    """What reading skipped and why; printed as the summary's first lines."""

    files: int = 0
    lines: int = 0
    records: int = 0
    not_json: int = 0
    not_event: int = 0
    other_events: int = 0
    invalid_requests: int = 0
    anonymous: int = 0
    outcome_duplicates: int = 0
    role_unknown: int = 0
    first_bad: str | None = None
    first: str | None = None
    last: str | None = None
    bytes: int = 0

    def span(self) -> str:
        if self.first is None:
            return "no requests"
        return f"{self.first} .. {self.last}"

    def skipped_line(self) -> str | None:
        bad = self.not_json + self.not_event
        if not bad:
            return None
        return (f"skipped {bad:,} line(s) that are not JSON events ({self.not_json:,} not JSON, "
                f"{self.not_event:,} without event.action; first at {self.first_bad})")

    def summary(self) -> list[str]:
        out = [f"read {self.lines:,} line(s) from {self.files} file(s): {self.records:,} "
               f"recorded request(s), {self.span()}"]
        if (s := self.skipped_line()) is not None:
            out.append(s)
        notes = []
        if self.other_events:
            notes.append(f"{self.other_events:,} other event(s)")
        if self.invalid_requests:
            notes.append(f"{self.invalid_requests:,} invalid request(s) (no policy decision)")
        if self.outcome_duplicates:
            notes.append(f"{self.outcome_duplicates:,} monitor-mode outcome event(s) of a "
                         "would_deny already counted")
        if self.anonymous:
            notes.append(f"{self.anonymous:,} request(s) without a client certificate")
        if notes:
            out.append("not requests to decide: " + ", ".join(notes))
        if self.role_unknown:
            out.append(f"{self.role_unknown:,} request(s) without the certificate's role "
                       "(mbsec.role): their recorded user.roles stand in for it")
        return out


class Progress:
    """A line on stderr every ``every`` seconds of a long run (nothing for short ones)."""

    def __init__(self, label: str, out: TextIO | None, every: float = 2.0) -> None:
        self.label = label
        self.out = out
        self.every = every
        self.t0 = time.monotonic()
        self.next = self.t0 + every

    def tick(self, stats: ReadStats) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.every
        rate = stats.lines / max(now - self.t0, 1e-9)
        print(f"{self.label}: {stats.lines:,} lines, {stats.records:,} requests "
              f"({rate:,.0f} lines/s)", file=self.out, flush=True)


def open_events(path: str) -> io.BufferedIOBase:
    """A binary stream of the file's lines, gunzipped when it starts with the gzip magic."""
    try:
        raw = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
        buffered = raw if isinstance(raw, io.BufferedReader) else \
            io.BufferedReader(raw)  # type: ignore[type-var]
        head = buffered.peek(2)[:2]
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb")
    return buffered


_MISSING: Any = object()


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat dotted keys (a SIEM export) -> nested, as mbsec writes events."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split(".") if key != "@timestamp" else [key]
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out


def _get(obj: Any, path: tuple[str, ...], default: Any = None) -> Any:
    """``obj["a"]["b"]`` for ``path=("a", "b")``, or ``default`` where a level is missing."""
    for part in path:
        if type(obj) is not dict:
            return default
        obj = obj.get(part, _MISSING)
        if obj is _MISSING:
            return default
    return obj


def _tuple(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, list):
        return tuple(str(x) for x in v)
    return (str(v),)


def build_access(fc: int, modbus: dict[str, Any], request_bytes: int) -> Access:
    """The :class:`Access` the proxy decided on, from a request event's ``modbus`` object."""
    read = write = None
    if fc == 23:
        r, w = modbus["read"], modbus["write"]
        read = (int(r["address"]), int(r["quantity"]))
        write = (int(w["address"]), int(w["quantity"]))
    elif "address" in modbus:
        span = (int(modbus["address"]), int(modbus["quantity"]))
        if fc in _READS:
            read = span
        elif fc in _WRITES:
            write = span
    values = modbus.get("values") or ()
    sub = modbus.get("subfunction")
    return Access(fc, _TABLES.get(fc, Table.NONE), read, write,
                  tuple(int(v) for v in values), None if sub is None else int(sub),
                  int(request_bytes))


@dataclass
class Reader:
    """Reads events files into :class:`Record`s, keeping :class:`ReadStats`."""

    stats: ReadStats = field(default_factory=ReadStats)
    progress: Progress | None = None
    #: unit id -> the upstream (``mbsec.target``) that last answered for it: outcome events
    #: name it, monitor mode's would_deny events do not
    unit_targets: dict[int, str] = field(default_factory=dict)
    _pending: OrderedDict[tuple[Any, Any], None] = field(default_factory=OrderedDict)
    _roles: OrderedDict[Any, str | None] = field(default_factory=OrderedDict)
    #: (connection, fingerprint, role) -> its Who: built once per connection, not per event
    _whos: dict[tuple[Any, ...], Who] = field(default_factory=dict)

    def records(self, paths: Iterable[str]) -> Iterator[Record]:
        for path in paths:
            self.stats.files += 1
            stream = open_events(path)
            name = "<stdin>" if path == "-" else path
            try:
                yield from self._file(stream, name)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise InputError(f"cannot read {name}: {exc}") from None
            finally:
                if path != "-":
                    stream.close()

    def _file(self, stream: io.BufferedIOBase, name: str) -> Iterator[Record]:
        stats = self.stats
        progress = self.progress
        for n, line in enumerate(stream, 1):
            stats.lines += 1
            stats.bytes += len(line)
            if progress is not None and not stats.lines & 0x3FFF:
                progress.tick(stats)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
                stats.not_json += 1
            if not isinstance(obj, dict):
                if obj is not None:
                    stats.not_json += 1
                stats.first_bad = stats.first_bad or f"{name}:{n}"
                continue
            if "event.action" in obj:
                obj = nest(obj)
            action = _get(obj, ("event", "action"))
            if action is None:
                stats.not_event += 1
                stats.first_bad = stats.first_bad or f"{name}:{n}"
                continue
            if action != "modbus-request":
                if action == "tls-handshake":
                    self._remember_role(obj)
                stats.other_events += 1
                continue
            try:
                rec = self._record(obj, name, n)
            except (KeyError, TypeError, ValueError):
                stats.not_event += 1
                stats.first_bad = stats.first_bad or f"{name}:{n}"
                continue
            if rec is not None:
                stats.records += 1
                if stats.first is None or rec.timestamp < stats.first:
                    stats.first = rec.timestamp
                if stats.last is None or rec.timestamp > stats.last:
                    stats.last = rec.timestamp
                yield rec

    def _remember_role(self, ev: dict[str, Any]) -> None:
        mbsec = ev.get("mbsec")
        if not isinstance(mbsec, dict) or "role" not in mbsec or "conn_id" not in mbsec \
                or _get(ev, ("event", "outcome")) != "success":
            return
        key = mbsec["conn_id"]
        self._roles[key] = mbsec["role"]
        self._roles.move_to_end(key)
        if len(self._roles) > ROLES_MAX:
            self._roles.popitem(last=False)

    def _record(self, ev: dict[str, Any], name: str, line: int) -> Record | None:
        stats = self.stats
        mbsec = ev.get("mbsec") or {}
        modbus = ev["modbus"]
        request_bytes = mbsec.get("request_bytes")
        if request_bytes is None:  # the parser rejected it: no Access, no policy decision
            stats.invalid_requests += 1
            return None
        target = mbsec.get("target")
        if target is not None and len(self.unit_targets) < 256:
            self.unit_targets[int(modbus["unit_id"])] = str(target)
        event_decision = str(modbus["decision"])
        conn = mbsec.get("conn_id")
        key = (conn, modbus.get("transaction_id"))
        if event_decision == "would_deny" and "info" in (_get(ev, ("event", "type")) or ()):
            self._pending[key] = None  # its outcome event follows, if any is logged
            self._pending.move_to_end(key)
            if len(self._pending) > PENDING_MAX:
                self._pending.popitem(last=False)
        elif key in self._pending:
            del self._pending[key]
            stats.outcome_duplicates += 1
            return None
        decision = _POLICY_DECISION.get(event_decision, "allow")
        client = _get(ev, ("tls", "client")) or {}
        fp = _get(client, ("hash", "sha256"))
        if fp is None:
            stats.anonymous += 1
            return None
        fc = int(modbus["function_code"])
        access = build_access(fc, modbus, request_bytes)
        roles = _tuple(_get(ev, ("user", "roles")))
        if "role" in mbsec:
            role, known = mbsec["role"], True
        elif conn in self._roles:
            role, known = self._roles[conn], True
        else:
            role, known = None, False
            stats.role_unknown += 1
        wkey = (conn, fp, role)
        who = self._whos.get(wkey)
        if who is None:
            x509 = client.get("x509") or {}
            who = Who(role=role, cn=_get(x509, ("subject", "common_name")),
                      ou=_tuple(_get(x509, ("subject", "organizational_unit"))),
                      san_dns=_tuple(mbsec.get("san_dns")), san_ip=_tuple(mbsec.get("san_ip")),
                      san_uri=_tuple(mbsec.get("san_uri")),
                      issuer=_get(x509, ("issuer", "distinguished_name")), fingerprint=str(fp))
            if len(self._whos) >= ROLES_MAX:
                self._whos.clear()
            self._whos[wkey] = who
        total = mbsec.get("values_total")
        return Record(
            timestamp=str(ev.get("@timestamp", "")), who=who, roles=roles, role_known=known,
            source=str(_get(ev, ("source", "ip")) or "192.0.2.10"),
            unit=int(modbus["unit_id"]), target=target, access=access, decision=decision,
            rule=str(_get(ev, ("rule", "id"), "default")), event_decision=event_decision,
            values_cut=total is not None and int(total) > len(access.values),
            location=f"{name}:{line}")


__all__ = ["InputError", "Progress", "ReadStats", "Reader", "Record", "build_access", "nest",
           "open_events"]
