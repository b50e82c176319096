"""Inline ``tests:`` cases and ad-hoc ``eval`` questions: synthetic principals and requests.

A case describes a request the way an admin thinks of it (role, unit, function, address,
quantity, value); this module turns that into the same :class:`Access` and
:class:`PeerIdentity` the proxy would build from the wire, so a case exercises exactly the
code path a live request takes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass

from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access
from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.pdu import (
    DiagnosticsRequest,
    FileRecord,
    FileSubRequest,
    GetCommEventCounterRequest,
    GetCommEventLogRequest,
    MaskWriteRegisterRequest,
    MeiRequest,
    OpaqueRequest,
    ReadCoilsRequest,
    ReadDeviceIdentificationRequest,
    ReadDiscreteInputsRequest,
    ReadExceptionStatusRequest,
    ReadFifoQueueRequest,
    ReadFileRecordRequest,
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    ReportServerIdRequest,
    Request,
    WriteFileRecordRequest,
    WriteMultipleCoilsRequest,
    WriteMultipleRegistersRequest,
    WriteSingleCoilRequest,
    WriteSingleRegisterRequest,
    encode_request,
    parse_request,
)
from mbsec.policy.engine import Decision, Policy
from mbsec.policy.names import function_label

_EPOCH = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)


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
    """The :class:`Access` the proxy derives from a well-formed request with these fields.

    The typed request is encoded and parsed back with the Modbus core, so a case exercises
    the live path and a request the proxy would reject before policy (quantity over the
    spec limit, coil value not on/off...) is refused here too. Raises ``ValueError`` with
    an admin-readable message.
    """
    req = _request(function_code, address, quantity, write_address, write_quantity,
                   values, subfunction)
    try:
        access = parse_request(encode_request(req)).access()
    except ProtocolError as exc:
        raise ValueError(f"the proxy rejects this request before policy: {exc.message}") \
            from None
    if pdu_bytes is not None:
        access = dataclasses.replace(access, pdu_length=pdu_bytes)
    return access


def _request(fc: int, address: int, quantity: int, write_address: int | None,
             write_quantity: int | None, values: tuple[int, ...] | None,
             sub: int | None) -> Request:
    vals = values or ()
    first = vals[0] if vals else 0
    match fc:
        case 1:
            return ReadCoilsRequest(address, quantity)
        case 2:
            return ReadDiscreteInputsRequest(address, quantity)
        case 3:
            return ReadHoldingRegistersRequest(address, quantity)
        case 4:
            return ReadInputRegistersRequest(address, quantity)
        case 5:
            if first not in (0, 1, 0xFF00):
                raise ValueError("write_single_coil takes on (1) or off (0)")
            return WriteSingleCoilRequest(address, bool(first))
        case 6:
            return WriteSingleRegisterRequest(address, first)
        case 7:
            return ReadExceptionStatusRequest()
        case 8:
            return DiagnosticsRequest(0 if sub is None else sub, b"\x00\x00")
        case 11:
            return GetCommEventCounterRequest()
        case 12:
            return GetCommEventLogRequest()
        case 15:
            if any(v not in (0, 1) for v in vals):
                raise ValueError("write_multiple_coils values are 0 or 1")
            return WriteMultipleCoilsRequest(
                address, tuple(bool(v) for v in vals) if vals else (False,) * quantity)
        case 16:
            return WriteMultipleRegistersRequest(address, vals or (0,) * quantity)
        case 17:
            return ReportServerIdRequest()
        case 20:
            return ReadFileRecordRequest((FileSubRequest(1, address, quantity),))
        case 21:
            return WriteFileRecordRequest((FileRecord(1, address, vals or (0,) * quantity),))
        case 22:
            and_mask, or_mask = vals if len(vals) == 2 else (0xFFFF, 0)
            return MaskWriteRegisterRequest(address, and_mask, or_mask)
        case 23:
            return ReadWriteMultipleRegistersRequest(
                address, quantity, address if write_address is None else write_address,
                vals or (0,) * (write_quantity or 1))
        case 24:
            return ReadFifoQueueRequest(address)
        case 43 if sub is None or sub == 14:
            return ReadDeviceIdentificationRequest(1, 0)
        case 43:
            return MeiRequest(sub if sub is not None else 14, b"")
    return OpaqueRequest(fc, b"")


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
    return [run_case(policy, c) for c in policy.cases]
