"""Property tests: default deny holds, the engine agrees with a naive reading of the file,
and monitor mode never changes which rule decided."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mbsec.modbus.access import Access
from mbsec.policy import Policy, load_policy_text
from mbsec.policy.cases import Who, build_access

ROLES = ["operator", "engineer", "vendor"]
FUNCS = [1, 3, 4, 5, 6, 15, 16, 23]


@st.composite
def rules(draw: st.DrawFn, allow_only: bool) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(0, 6))):
        r: dict[str, Any] = {"id": f"r{i}", "description": "generated"}
        allow = allow_only or draw(st.booleans())
        if not allow:
            r["action"] = "deny"
            r["mode"] = draw(st.sampled_from(["enforce", "monitor", None]))
            if r["mode"] is None:
                del r["mode"]
        r["roles"] = draw(st.one_of(st.just(["*"]), st.lists(st.sampled_from(ROLES), min_size=1,
                                                            max_size=2, unique=True)))
        if draw(st.booleans()):
            r["unit_ids"] = draw(st.lists(st.integers(0, 3), min_size=1, max_size=2, unique=True))
        r["functions"] = draw(st.lists(st.sampled_from(FUNCS), min_size=1, max_size=3,
                                       unique=True))
        if draw(st.booleans()):
            lo = draw(st.integers(0, 40))
            r["addresses"] = [f"{lo}-{lo + draw(st.integers(0, 20))}"]
        if draw(st.booleans()):
            r["max_quantity"] = draw(st.integers(1, 6))
        out.append(r)
    return out


def to_policy(rs: list[dict[str, Any]], mode: str = "enforce") -> Policy:
    doc = {"version": 1, "default": "deny", "mode": mode, "rules": rs}
    return load_policy_text(yaml.safe_dump(doc, sort_keys=False), "generated.yaml")


@st.composite
def requests(draw: st.DrawFn) -> tuple[str | None, int, Access]:
    fc = draw(st.sampled_from(FUNCS))
    address = draw(st.integers(0, 60))
    qty = draw(st.integers(1, 8))
    values: tuple[int, ...] | None = None
    if fc == 5:
        values = (draw(st.integers(0, 1)),)
    elif fc in (15, 16, 23):
        values = tuple(draw(st.lists(st.integers(0, 1), min_size=1, max_size=8)))
    elif fc == 6:
        values = (draw(st.integers(0, 65535)),)
    access = build_access(fc, address=address, quantity=qty, values=values,
                          write_address=draw(st.integers(0, 60)) if fc == 23 else None)
    return draw(st.sampled_from([*ROLES, None])), draw(st.integers(0, 3)), access


def naive(rs: list[dict[str, Any]], role: str | None, unit: int, a: Access) -> str:
    """The file read literally, rule by rule: the id of the first rule that matches."""
    for r in rs:
        if r["roles"] != ["*"] and role not in r["roles"]:
            continue
        if "unit_ids" in r and unit not in r["unit_ids"]:
            continue
        if a.function_code not in r["functions"]:
            continue
        if "max_quantity" in r and max((a.read or (0, 0))[1], (a.write or (0, 0))[1]) > \
                r["max_quantity"]:
            continue
        if "addresses" in r:
            lo, hi = map(int, r["addresses"][0].split("-"))
            spans = [s for s in (a.read, a.write) if s is not None]
            if not all(lo <= s[0] and s[0] + s[1] - 1 <= hi for s in spans):
                continue
        return str(r["id"])
    return "default"


def decide(p: Policy, role: str | None, unit: int, a: Access) -> Any:
    return p.evaluate(p.principal(Who(role=role, cn="c").identity(), "10.0.0.1"), unit, a)


@settings(max_examples=300, deadline=None)
@given(rules(allow_only=True), st.lists(requests(), min_size=1, max_size=10))
def test_default_deny_denies_everything_not_explicitly_allowed(
        rs: list[dict[str, Any]], reqs: list[tuple[str | None, int, Access]]) -> None:
    p = to_policy(rs)
    for role, unit, a in reqs:
        d = decide(p, role, unit, a)
        expected = naive(rs, role, unit, a)
        assert d.rule_id == expected
        if expected == "default":
            assert (d.allowed, d.outcome, d.exception_code) == (False, "deny", 1)
        else:
            assert d.allowed and d.outcome == "allow"


@settings(max_examples=300, deadline=None)
@given(rules(allow_only=False), st.lists(requests(), min_size=1, max_size=10))
def test_engine_matches_a_literal_reading_with_deny_rules(
        rs: list[dict[str, Any]], reqs: list[tuple[str | None, int, Access]]) -> None:
    p = to_policy(rs)
    for role, unit, a in reqs:
        d = decide(p, role, unit, a)
        assert d.rule_id == naive(rs, role, unit, a)
        r = p.rule(d.rule_id)
        if r is None or not r.allow:
            monitored = r.monitor if r is not None else p.monitor
            assert d.outcome == ("would_deny" if monitored else "deny")
            assert d.allowed == monitored


@settings(max_examples=300, deadline=None)
@given(rules(allow_only=False), st.lists(requests(), min_size=1, max_size=10))
def test_monitor_mode_never_changes_the_rule_id(
        rs: list[dict[str, Any]], reqs: list[tuple[str | None, int, Access]]) -> None:
    enforce = to_policy(rs, "enforce")
    monitor = to_policy(rs, "monitor")
    all_monitor = to_policy([{**r, "mode": "monitor"} if r.get("action") == "deny" else r
                             for r in rs], "monitor")
    for role, unit, a in reqs:
        de = decide(enforce, role, unit, a)
        for other in (monitor, all_monitor):
            dm = decide(other, role, unit, a)
            assert dm.rule_id == de.rule_id
            assert dm.exception_code == de.exception_code
        dm = decide(all_monitor, role, unit, a)
        assert dm.allowed  # nothing is enforced in a fully monitored policy
        assert dm.outcome == ("allow" if de.outcome == "allow" else "would_deny")
