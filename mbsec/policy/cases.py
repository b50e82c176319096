"""Inline ``tests:`` cases and ad-hoc ``eval`` questions: synthetic principals and requests.

A case describes a request the way an admin thinks of it (role, unit, function, address,
quantity, value); this module turns that into the same :class:`Access` and
:class:`PeerIdentity` the proxy would build from the wire, so a case exercises exactly the
code path a live request takes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access, Table
from mbsec.policy.engine import Decision, Policy
from mbsec.policy.names import DIAGNOSTICS, ENCAPSULATED, function_label

_EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
_TABLE_READ = {1: Table.COILS, 2: Table.DISCRETE_INPUTS, 3: Table.HOLDING_REGISTERS,
               4: Table.INPUT_REGISTERS, 20: Table.FILE_RECORDS, 23: Table.HOLDING_REGISTERS,
               24: Table.HOLDING_REGISTERS}
_TABLE_WRITE = {5: Table.COILS, 15: Table.COILS, 6: Table.HOLDING_REGISTERS,
                16: Table.HOLDING_REGISTERS, 22: Table.HOLDING_REGISTERS,
                21: Table.FILE_RECORDS}


@dataclass(frozen=True, slots=True)
class Who:
    """Certificate facts of a synthetic client (``anonymous`` = no certificate at all)."""

    role: str | None = None
    cn: str | None = None
    ou: tuple[str, ...] = ()
    san_dns: tuple[str, ...] = ()
    san_ip: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    issuer: str | None = None
    fingerprint: str | None = None
    anonymous: bool = False

    def identity(self) -> PeerIdentity | None:
        if self.anonymous:
            return None
        fp = self.fingerprint or hashlib.sha256(
            f"{self.role}|{self.cn}|{self.ou}|{self.san_dns}".encode()).hexdigest()
        subject = ",".join([*(f"OU={o}" for o in self.ou),
                            *([f"CN={self.cn}"] if self.cn is not None else [])])
        return PeerIdentity(
            subject=subject, common_name=self.cn, organizational_units=self.ou,
            san_dns=self.san_dns, san_ip=self.san_ip, san_uri=self.san_uri,
            issuer=self.issuer or "CN=mbsec CA", serial=1,
            fingerprint_sha256=fp.lower().replace(":", ""),
            not_before=_EPOCH, not_after=_EPOCH.replace(year=2100), role=self.role)

    def label(self) -> str:
        if self.anonymous:
            return "anonymous"
        parts = [f"role={self.role}"] if self.role else []
        if self.cn is not None:
            parts.append(f"cn={self.cn}")
        parts += [f"ou={o}" for o in self.ou]
        parts += [f"dns={d}" for d in self.san_dns]
        parts += [f"uri={u}" for u in self.san_uri]
        parts += [f"san_ip={i}" for i in self.san_ip]
        if self.fingerprint:
            parts.append(f"fp={self.fingerprint[:12]}")
        return " ".join(parts) or "no role"


def build_access(function_code: int, *, address: int = 0, quantity: int = 1,
                 write_address: int | None = None, write_quantity: int | None = None,
                 values: tuple[int, ...] | None = None, subfunction: int | None = None,
                 pdu_bytes: int | None = None) -> Access:
    """The :class:`Access` a well-formed request with these fields produces.

    Raises ``ValueError`` with an admin-readable message for impossible combinations.
    """
    fc = function_code
    read: tuple[int, int] | None = None
    write: tuple[int, int] | None = None
    vals: tuple[int, ...] = ()
    table = Table.NONE
    length = 1
    if not 0 <= address <= 0xFFFF:
        raise ValueError(f"address {address} is outside 0-65535")
    if fc in (1, 2, 3, 4, 20, 24):
        table = _TABLE_READ[fc]
        read = (address, 1 if fc == 24 else quantity)
        length = {20: 9, 24: 3}.get(fc, 5)
    elif fc == 5:
        table, write = Table.COILS, (address, 1)
        v = values[0] if values else 0
        if v not in (0, 1, 0xFF00):
            raise ValueError("write_single_coil takes on (0xFF00 / 1) or off (0)")
        vals, length = (1 if v else 0,), 5
    elif fc == 6:
        table, write = Table.HOLDING_REGISTERS, (address, 1)
        vals, length = (values[0] if values else 0,), 5
    elif fc in (15, 16):
        table = _TABLE_WRITE[fc]
        vals = values if values else (0,) * quantity
        write = (address, len(vals))
        if fc == 15:
            if any(v not in (0, 1) for v in vals):
                raise ValueError("write_multiple_coils values are 0 or 1")
            length = 6 + (len(vals) + 7) // 8
        else:
            length = 6 + 2 * len(vals)
    elif fc == 21:
        table, write, vals, length = Table.FILE_RECORDS, (address, quantity), (), 10 + 2 * quantity
    elif fc == 22:
        table, write = Table.HOLDING_REGISTERS, (address, 1)
        vals = values if values and len(values) == 2 else (0xFFFF, 0)
        length = 7
    elif fc == 23:
        table = Table.HOLDING_REGISTERS
        read = (address, quantity)
        vals = values if values else (0,) * (write_quantity or 1)
        write = (address if write_address is None else write_address, len(vals))
        length = 10 + 2 * len(vals)
    elif fc == DIAGNOSTICS:
        length = 5
        subfunction = 0 if subfunction is None else subfunction
    elif fc == ENCAPSULATED:
        length = 4
        subfunction = 14 if subfunction is None else subfunction
    for span in (read, write):
        if span is not None and (span[1] < 1 or span[0] + span[1] - 1 > 0xFFFF):
            raise ValueError(f"range {span[0]}+{span[1]} is outside 0-65535")
    if any(not 0 <= v <= 0xFFFF for v in vals):
        raise ValueError("register values are 0-65535 (write negative values as 65536-n)")
    return Access(function_code=fc, table=table, read=read, write=write, values=vals,
                  subfunction=subfunction if fc in (DIAGNOSTICS, ENCAPSULATED) else None,
                  pdu_length=pdu_bytes if pdu_bytes is not None else length)


@dataclass(frozen=True, slots=True)
class Case:
    """One inline test: who asks, what, and the expected outcome (and rule id)."""

    index: int
    line: int
    name: str | None
    who: Who
    source: str
    unit: int
    access: Access
    expect: str
    rule: str | None

    def describe(self) -> str:
        a = self.access
        what = function_label(a.function_code, a.subfunction)
        if a.read is not None:
            what += f" read {a.read[0]}+{a.read[1]}"
        if a.write is not None:
            what += f" write {a.write[0]}+{a.write[1]}"
        if a.values and a.function_code in (5, 6, 16, 23, 15):
            shown = ",".join(str(v) for v in a.values[:4]) + ("..." if len(a.values) > 4 else "")
            what += f" values={shown}"
        head = f"{self.name}: " if self.name else ""
        return f"{head}{self.who.label()} from {self.source} unit {self.unit} {what}"


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    decision: Decision
    passed: bool


def run_case(policy: Policy, case: Case) -> CaseResult:
    principal = policy.principal(case.who.identity(), case.source)
    d = policy.evaluate(principal, case.unit, case.access)
    ok = d.outcome == case.expect and (case.rule is None or case.rule == d.rule_id)
    return CaseResult(case, d, ok)


def run_cases(policy: Policy) -> list[CaseResult]:
    return [run_case(policy, c) for c in policy.cases if isinstance(c, Case)]
