"""``mbsec policy replay``: what a candidate policy would decide for recorded requests.

Each recorded request (:mod:`mbsec.policy.records`) is decided again by the candidate, from
the same certificate facts, unit and access the proxy had, and compared with what the
recorded policy decided. The result is counts (old -> new decision, per rule pair and role)
and the first examples of each change: enough for a change board to see what a policy edit
breaks or opens before it goes live. Memory is bounded by the number of distinct rules,
roles and principals (a cache of at most :data:`PRINCIPALS_MAX`), never by the events.

Two ways to call something a change (``--compare``): ``decision`` (the default) compares the
decisions as logged (``allow``, ``deny``, ``would_deny``); ``forwarding`` compares only
whether the request reaches the PLC (``would_deny`` is forwarded, like ``allow``), which is
the question for a recording made in monitor mode.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from mbsec.policy.engine import Policy, Principal, parse_source
from mbsec.policy.names import function_label
from mbsec.policy.records import ReadStats, Record

PRINCIPALS_MAX = 4096
EXAMPLES = 3  # per kind of change
Compare = Literal["decision", "forwarding"]


def _forwarded(decision: str) -> bool:
    return decision != "deny"


@dataclass
class ReplayResult:
    """Counts of one replay; :meth:`lines` and :meth:`as_json` present them."""

    policy: str
    compare: Compare
    total: int = 0
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: changed requests per (old decision, new decision, old rule, new rule)
    by_rule: Counter[tuple[str, str, str, str]] = field(default_factory=Counter)
    #: changed requests per (roles, old decision, new decision)
    by_role: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: requests decided by the same outcome through another rule
    rule_moves: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    values_cut: int = 0
    role_unknown: int = 0

    def is_change(self, old: str, new: str) -> bool:
        if self.compare == "forwarding":
            return _forwarded(old) != _forwarded(new)
        return old != new

    @property
    def changed(self) -> int:
        return sum(n for (o, w), n in self.transitions.items() if self.is_change(o, w))

    def lines(self, stats: ReadStats | None = None) -> list[str]:
        out = [f"replayed {self.total:,} recorded request(s) against {self.policy}"
               + (f" ({stats.span()})" if stats is not None and self.total else "")]
        if stats is not None:
            out += [f"  {line}" for line in stats.summary()[1:]]
        if self.values_cut:
            out.append(f"  {self.values_cut:,} write(s) logged only their first values: "
                       "decided on those")
        out.append("")
        out.append("decisions (recorded -> candidate):")
        width = max((len(f"{o} -> {w}") for o, w in self.transitions), default=0)
        for (o, w), n in sorted(self.transitions.items(), key=lambda x: (-x[1], x[0])):
            mark = "  changed" if self.is_change(o, w) else ""
            out.append(f"  {f'{o} -> {w}':<{width}}  {n:>10,}{mark}")
        if not self.transitions:
            out.append("  (none)")
        if self.by_rule:
            out += ["", "changes by rule (recorded rule -> candidate rule):"]
            for (o, w, ro, rn), n in sorted(self.by_rule.items(), key=lambda x: (-x[1], x[0])):
                out.append(f"  {o} -> {w}  {ro} -> {rn}: {n:,}")
            out += ["", "changes by role:"]
            for (roles, o, w), n in sorted(self.by_role.items(), key=lambda x: (-x[1], x[0])):
                out.append(f"  {roles}: {o} -> {w}: {n:,}")
            out += ["", f"first examples of each change (up to {EXAMPLES}):"]
            for (o, w), exs in sorted(self.examples.items()):
                out.append(f"  {o} -> {w}:")
                out += [f"    {e}" for e in exs]
        if self.rule_moves:
            out += ["", f"not changed (compare: {self.compare}), decided by another rule:"]
            for (ro, rn), n in sorted(self.rule_moves.items(), key=lambda x: (-x[1], x[0])):
                out.append(f"  {ro} -> {rn}: {n:,}")
        out += ["", f"{self.changed:,} of {self.total:,} request(s) would be decided "
                f"differently (compare: {self.compare})"]
        return out

    def as_json(self, stats: ReadStats | None = None) -> dict[str, Any]:
        return {
            "policy": self.policy, "compare": self.compare, "requests": self.total,
            "changed": self.changed,
            "transitions": [{"old": o, "new": w, "count": n, "changed": self.is_change(o, w)}
                            for (o, w), n in sorted(self.transitions.items())],
            "by_rule": [{"old": o, "new": w, "old_rule": ro, "new_rule": rn, "count": n}
                        for (o, w, ro, rn), n in sorted(self.by_rule.items())],
            "by_role": [{"roles": r, "old": o, "new": w, "count": n}
                        for (r, o, w), n in sorted(self.by_role.items())],
            "examples": [{"old": o, "new": w, "requests": exs}
                         for (o, w), exs in sorted(self.examples.items())],
            "values_cut": self.values_cut,
            "skipped_lines": (stats.not_json + stats.not_event) if stats else 0,
            "first": stats.first if stats else None, "last": stats.last if stats else None,
        }


def describe(rec: Record) -> str:
    """One line per example: when, who, where, what, the location in the log."""
    a = rec.access
    what = function_label(a.function_code, a.subfunction)
    if a.read is not None:
        what += f" read {a.read[0]}+{a.read[1]}"
    if a.write is not None:
        what += f" write {a.write[0]}+{a.write[1]}"
    if a.values and a.function_code in (5, 6, 15, 16, 23):
        what += " values=" + ",".join(str(v) for v in a.values[:4]) + \
            ("..." if len(a.values) > 4 or rec.values_cut else "")
    who = rec.who.label() if rec.role_known else \
        f"roles={','.join(rec.roles) or '-'} cn={rec.who.cn}"
    return f"{rec.timestamp} {who} unit {rec.unit} {what} ({rec.location})"


class Replayer:
    """Decides records with a candidate policy; principals are cached per certificate."""

    def __init__(self, policy: Policy, compare: Compare = "decision") -> None:
        self.policy = policy
        self.result = ReplayResult(policy.path, compare)
        self._principals: OrderedDict[tuple[Any, ...], Principal] = OrderedDict()

    def principal(self, rec: Record) -> Principal:
        key = (rec.who, rec.source, rec.roles if not rec.role_known else None)
        p = self._principals.get(key)
        if p is not None:
            return p
        policy = self.policy
        identity = rec.who.identity()
        roles = policy.roles_for(identity)
        if not rec.role_known:  # the recorded roles stand in for the certificate's role
            roles = roles | frozenset(rec.roles)
        source = parse_source(rec.source)
        assert identity is not None
        p = Principal(identity.fingerprint_sha256, roles, str(source), identity, policy,
                      policy._plan(roles, source))
        self._principals[key] = p
        if len(self._principals) > PRINCIPALS_MAX:
            self._principals.popitem(last=False)
        return p

    def add(self, rec: Record) -> str:
        """Decide one record; returns the candidate's outcome."""
        res = self.result
        d = self.policy.evaluate(self.principal(rec), rec.unit, rec.access)
        old, new = rec.decision, d.outcome
        res.total += 1
        res.transitions[(old, new)] += 1
        if rec.values_cut:
            res.values_cut += 1
        if res.is_change(old, new):
            res.by_rule[(old, new, rec.rule, d.rule_id)] += 1
            res.by_role[(",".join(sorted(rec.roles)) or f"(no role) cn={rec.who.cn}",
                         old, new)] += 1
            exs = res.examples.setdefault((old, new), [])
            if len(exs) < EXAMPLES:
                exs.append(describe(rec) + f": rule {rec.rule} -> {d.rule_id}")
        elif rec.rule != d.rule_id:
            res.rule_moves[(rec.rule, d.rule_id)] += 1
        return new

    def run(self, records: Iterable[Record]) -> ReplayResult:
        for rec in records:
            self.add(rec)
        return self.result


def to_json(result: ReplayResult, stats: ReadStats) -> str:
    return json.dumps(result.as_json(stats), indent=2)


__all__ = ["ReplayResult", "Replayer", "describe", "to_json"]
