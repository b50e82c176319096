"""The policy file's schema: what keys exist and what type each value has.

Strict on purpose: an unknown key (a typo such as ``adresses``) is an error, never ignored,
because an ignored restriction silently widens access. Semantic checks (ranges, names,
shadowing) happen in :mod:`mbsec.policy.loader`, which knows the file positions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _listify(v: Any) -> Any:
    """Let a single item stand for a one-item list (``addresses: "0-99"``)."""
    return v if isinstance(v, list) or v is None else [v]


RangeList = Annotated[list[int | str], BeforeValidator(_listify)]
NameList = Annotated[list[str], BeforeValidator(_listify)]
CodeList = Annotated[list[int | str], BeforeValidator(_listify)]
Mode = Literal["enforce", "monitor"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class IdentityMatch(_Strict):
    """Certificate facts; every key given must match (AND), a list means any of its items."""

    subject_cn: NameList | None = None
    subject_ou: NameList | None = None
    san_dns: NameList | None = None
    san_ip: NameList | None = None
    san_uri: NameList | None = None
    issuer: NameList | None = None
    fingerprint_sha256: NameList | None = None


class IdentityMapping(_Strict):
    description: str | None = None
    match: IdentityMatch
    roles: Annotated[NameList, Field(min_length=1)]


class TargetModel(_Strict):
    description: str | None = None
    unit_ids: Annotated[list[int], Field(min_length=1)]
    upstream: str | None = None


class ValueRangeModel(_Strict):
    addresses: RangeList | None = None
    min: int
    max: int
    signed: bool = False


class LimitModel(_Strict):
    requests_per_second: Annotated[float, Field(gt=0)] | None = None
    burst: Annotated[int, Field(ge=1)] | None = None
    writes_per_second: Annotated[float, Field(gt=0)] | None = None
    write_burst: Annotated[int, Field(ge=1)] | None = None
    max_in_flight: Annotated[int, Field(ge=1)] | None = None


class LimitsModel(_Strict):
    default: LimitModel | None = None
    roles: dict[str, LimitModel] = Field(default_factory=dict)


class RuleModel(_Strict):
    id: str
    description: Annotated[str, Field(min_length=1)]
    action: Literal["allow", "deny"] = "allow"
    mode: Mode | None = None
    exception_code: int | None = None
    roles: NameList | None = None
    sources: NameList | None = None
    targets: NameList | None = None
    unit_ids: Annotated[list[int], BeforeValidator(_listify)] | None = None
    functions: Annotated[CodeList, Field(min_length=1)]
    addresses: RangeList | None = None
    read_addresses: RangeList | None = None
    write_addresses: RangeList | None = None
    max_quantity: int | None = None
    max_request_bytes: int | None = None
    max_response_bytes: int | None = None
    values: Annotated[list[ValueRangeModel], BeforeValidator(_listify)] | None = None
    coil_states: NameList | None = None
    subfunctions: CodeList | None = None
    mei_types: CodeList | None = None


class CaseModel(_Strict):
    name: str | None = None
    # who
    role: str | None = None
    cn: str | None = None
    ou: NameList | None = None
    san_dns: NameList | None = None
    san_ip: NameList | None = None
    san_uri: NameList | None = None
    issuer: str | None = None
    fingerprint: str | None = None
    anonymous: bool = False
    source: str = "192.0.2.10"
    # where
    unit: int | None = None
    target: str | None = None
    # what
    function: int | str
    subfunction: int | str | None = None
    address: int = 0
    quantity: int = 1
    write_address: int | None = None
    write_quantity: int | None = None
    value: int | str | None = None
    values: list[int] | None = None
    pdu_bytes: int | None = None
    # expectation
    expect: Literal["allow", "deny", "would_deny"]
    rule: str | None = None


class PolicyModel(_Strict):
    version: Literal[1]
    default: Literal["deny"]
    mode: Mode = "enforce"
    description: str | None = None
    identities: list[IdentityMapping] = Field(default_factory=list)
    targets: dict[str, TargetModel] = Field(default_factory=dict)
    limits: LimitsModel | None = None
    rules: list[RuleModel]
    tests: list[CaseModel] = Field(default_factory=list)
