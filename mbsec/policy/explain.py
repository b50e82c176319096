"""Human views of a compiled policy: per-role tables, access diffs, and why a rule did not match.

Reviewers sign off on the *effect* of a policy, not its text: ``explain`` lists what a role
may do, ``diff`` lists access a change adds or removes per role and target, and
:func:`why_not` tells an admin why a rule that looks relevant did not decide a request
(the request fell through to a later rule or to the default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mbsec.modbus.access import Access
from mbsec.policy.engine import (
    Interval,
    Policy,
    RateLimit,
    Rule,
    merge_intervals,
    parse_source,
)
from mbsec.policy.names import (
    ADDRESSED_FUNCTIONS,
    ENCAPSULATED,
    FUNCTION_NAMES,
    MEI_NAMES,
    READ_FUNCTIONS,
    SUBFUNCTION_NAMES,
    WRITE_FUNCTIONS,
)

FULL: tuple[Interval, ...] = ((0, 0xFFFF),)
NO_ROLE = "(no role)"
OTHER_UNITS = "(other units)"


# -- interval sets ----------------------------------------------------------------------------

def _intersect(a: Sequence[Interval], b: Sequence[Interval]) -> tuple[Interval, ...]:
    return merge_intervals((max(x[0], y[0]), min(x[1], y[1])) for x in a for y in b
                 if max(x[0], y[0]) <= min(x[1], y[1]))


def _subtract(a: Sequence[Interval], b: Sequence[Interval]) -> tuple[Interval, ...]:
    out = list(a)
    for blo, bhi in b:
        nxt: list[Interval] = []
        for lo, hi in out:
            if bhi < lo or blo > hi:
                nxt.append((lo, hi))
                continue
            if lo < blo:
                nxt.append((lo, blo - 1))
            if bhi < hi:
                nxt.append((bhi + 1, hi))
        out = nxt
    return merge_intervals(out)


def fmt_ranges(ranges: Sequence[Interval] | None) -> str:
    if ranges is None or tuple(ranges) == FULL:
        return "any"
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


# -- describing rules -------------------------------------------------------------------------

def _subs_label(code: int, subs: frozenset[int] | None) -> str:
    if subs is None:
        return ""
    names = MEI_NAMES if code == ENCAPSULATED else SUBFUNCTION_NAMES
    kind = "MEI" if code == ENCAPSULATED else "sub-function"
    return f"{kind} " + ", ".join(f"{names.get(s, s)} ({s})" if s in names else str(s)
                                  for s in sorted(subs))


def function_name(code: int) -> str:
    return f"{FUNCTION_NAMES.get(code, 'function')} ({code})"


def conditions(rule: Rule, code: int, *, with_units: bool = False,
               targets: dict[str, frozenset[int]] | None = None) -> list[str]:
    """The parts of a rule besides role/function/ranges that a request must also meet."""
    out: list[str] = []
    subs = rule.functions.get(code)
    if subs is not None:
        out.append(_subs_label(code, subs))
    if rule.sources is not None:
        out.append("from " + ", ".join(str(n) for n in rule.sources))
    if with_units and rule.units is not None:
        out.append("units " + ", ".join(str(u) for u in sorted(rule.units)))
    if rule.max_quantity is not None:
        out.append(f"quantity <= {rule.max_quantity}")
    if rule.max_request_bytes is not None:
        out.append(f"request <= {rule.max_request_bytes} B")
    if rule.values is not None and code in (6, 16, 23):
        out.append("values " + "; ".join(
            f"{'' if (b.low, b.high) == FULL[0] else fmt_ranges(((b.low, b.high),)) + ': '}"
            f"{b.vmin}..{b.vmax}{' signed' if b.signed else ''}" for b in rule.values))
    if rule.coil_states is not None and code in (5, 15):
        out.append("coils " + "/".join("on" if s else "off" for s in sorted(rule.coil_states,
                                                                            reverse=True)))
    return out


def _units_label(policy: Policy, units: frozenset[int] | None) -> str:
    if units is None:
        return "any"
    names = [n for n, (us, _) in policy.targets.items() if us and us <= units]
    covered = set().union(*(policy.targets[n][0] for n in names)) if names else set()
    rest = sorted(units - covered)
    parts = [f"{n} ({','.join(str(u) for u in sorted(policy.targets[n][0]))})" for n in names]
    parts += [str(u) for u in rest]
    return ", ".join(parts)


def _limit_label(lim: RateLimit | None) -> str:
    if lim is None:
        return "none"
    parts = []
    if lim.requests_per_second is not None:
        parts.append(f"{lim.requests_per_second:g} requests/s (burst {lim.burst:g})")
    if lim.writes_per_second is not None:
        parts.append(f"{lim.writes_per_second:g} writes/s (burst {lim.write_burst:g})")
    if lim.max_in_flight is not None:
        parts.append(f"{lim.max_in_flight} in flight")
    return ", ".join(parts) or "none"


def _applies(rule: Rule, role: str | None, units: frozenset[int] | None) -> bool:
    if rule.roles is not None and (role is None or role not in rule.roles):
        return False
    return units is None or rule.units is None or not rule.units.isdisjoint(units)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    return [line.format(*header).rstrip(), line.format(*("-" * w for w in widths)).rstrip(),
            *(line.format(*r).rstrip() for r in rows)]


def explain(policy: Policy, role: str | None, target: str | None = None,
            source: str | None = None) -> str:
    """A table of what ``role`` may (and may not) do, rule by rule, in evaluation order."""
    units = policy.targets[target][0] if target is not None else None
    src = parse_source(source) if source is not None else None
    who = f"role '{role}'" if role else "a client without a matching role"
    where = f"target '{target}' (units {fmt_units(units)})" if target else "all units"
    out = [f"Policy {policy.path}: what {who} may do on {where}"
           + (f" from {source}" if source else ""),
           "mode: " + ("monitor (denials are logged as would_deny, not enforced)"
                       if policy.monitor else "enforce"),
           ""]
    rows: list[list[str]] = []
    for r in policy.rules:
        if not _applies(r, role, units):
            continue
        if src is not None and r.sources is not None and not any(src in n for n in r.sources):
            continue
        action = "allow" if r.allow else ("would_deny" if r.monitor else
                                          f"deny ({r.exception_code:02d})")
        for code in sorted(r.functions):
            reads = fmt_ranges(r.read_ranges) if code in READ_FUNCTIONS else "-"
            writes = fmt_ranges(r.write_ranges) if code in WRITE_FUNCTIONS else "-"
            extra = conditions(r, code)
            if r.allow and r.max_response_bytes is not None and code not in WRITE_FUNCTIONS - {23}:
                extra.append(f"response <= {r.max_response_bytes} B")
            rows.append([f"{r.index}", r.id, action, function_name(code),
                         _units_label(policy, r.units), reads, writes, "; ".join(extra) or "-"])
    if rows:
        out += _table(["#", "RULE", "ACTION", "FUNCTION", "UNITS", "READ", "WRITE",
                       "CONDITIONS"], rows)
    else:
        out.append("No rule applies: everything is denied by the default rule.")
    roles = frozenset({role}) if role else frozenset()
    out += ["", f"rate limit: {_limit_label(policy.limit_for(roles))}"]
    granted_by = [f"line {m.line}: " + ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in m.fields)
                  for m in policy.identities if role in m.roles]
    if granted_by:
        out.append("certificates given this role by 'identities':")
        out += [f"  {g}" for g in granted_by]
    out += ["",
            "Rules are tried in order; the first rule whose role, source, unit, function AND "
            "ranges/limits all hold decides.",
            "A request outside a rule's ranges or limits does not match that rule; it falls "
            "through to the next rule and finally",
            "to the default rule: deny with exception 01 (illegal function)"
            + (", logged as would_deny in monitor mode." if policy.monitor else ".")]
    return "\n".join(out)


def fmt_units(units: Iterable[int] | None) -> str:
    return "any" if units is None else ",".join(str(u) for u in sorted(units))


# -- why a rule did not match ------------------------------------------------------------------

def why_not(policy: Policy, rule: Rule, roles: frozenset[str], source: str, unit: int,
            a: Access) -> list[str]:
    """Reasons ``rule`` does not match this request (empty list: it matches)."""
    reasons: list[str] = []
    if rule.roles is not None and rule.roles.isdisjoint(roles):
        reasons.append(f"role {'/'.join(sorted(roles)) or 'none'} is not "
                       f"{'/'.join(sorted(rule.roles))}")
    src = parse_source(source)
    if rule.sources is not None and not any(src in n for n in rule.sources):
        reasons.append(f"source {source} is outside {', '.join(map(str, rule.sources))}")
    if rule.units is not None and unit not in rule.units:
        reasons.append(f"unit {unit} is not in {fmt_units(rule.units)}")
    if a.function_code not in rule.functions:
        reasons.append(f"function {a.function_code} is not in the rule's functions")
        return reasons
    subs = rule.functions[a.function_code]
    if subs is not None and a.subfunction not in subs:
        reasons.append(f"sub-function {a.subfunction} is not {_subs_label(a.function_code, subs)}")
    if rule.max_quantity is not None and a.quantity > rule.max_quantity:
        reasons.append(f"quantity {a.quantity} > {rule.max_quantity}")
    if rule.max_request_bytes is not None and a.pdu_length > rule.max_request_bytes:
        reasons.append(f"request PDU {a.pdu_length} B > {rule.max_request_bytes} B")
    for span, ranges, kind in ((a.read, rule.read_ranges, "read"),
                               (a.write, rule.write_ranges, "write")):
        if span is None or ranges is None:
            continue
        end = span[0] + span[1] - 1
        if not any(lo <= span[0] and end <= hi for lo, hi in ranges):
            reasons.append(f"{kind} {fmt_ranges(((span[0], end),))} is outside "
                           f"{fmt_ranges(ranges)}")
    if not reasons and not rule.matches_what(a):
        reasons.append(_value_reason(rule, a))
    return reasons


def _value_reason(rule: Rule, a: Access) -> str:
    start = a.write[0] if a.write is not None else 0
    if rule.coil_states is not None and a.function_code in (5, 15):
        allowed = "/".join("on" if s else "off" for s in sorted(rule.coil_states, reverse=True))
        return f"coil state is not {allowed}"
    for i, v in enumerate(a.values):
        addr = start + i
        bound = next((b for b in rule.values or () if b.low <= addr <= b.high), None)
        if bound is None:
            return f"no values range covers address {addr}"
        x = v - 0x10000 if bound.signed and v >= 0x8000 else v
        if not bound.vmin <= x <= bound.vmax:
            return f"value {x} at address {addr} is outside {bound.vmin}..{bound.vmax}"
    return "written values are outside the rule's values"


# -- diff -------------------------------------------------------------------------------------

GrantKey = tuple[str, str, int, str, str]  # role, target, function code, dimension, conditions


@dataclass
class Grants:
    ranges: dict[GrantKey, tuple[Interval, ...]]
    rules: dict[GrantKey, set[str]]


def _role_names(p: Policy) -> set[str]:
    names: set[str] = set()
    for r in p.rules:
        names |= r.roles or set()
    for m in p.identities:
        names |= m.roles
    names |= {role for role, _ in p.role_limits}
    return names


def grants(policy: Policy, roles: Iterable[str], targets: Iterable[str]) -> Grants:
    """What each role may do per target: allow-rule ranges not already decided earlier.

    Earlier rules *claim* addresses only when they have no extra conditions (sources,
    sub-functions, quantity, bytes, values, coil states) and cover the whole target; a
    conditional rule's grant is listed with its conditions.
    """
    g = Grants({}, {})
    all_target_units = frozenset().union(*(u for u, _ in policy.targets.values())) \
        if policy.targets else frozenset()
    for role in roles:
        rname = None if role == NO_ROLE else role
        for target in targets:
            if target == OTHER_UNITS:
                bucket: frozenset[int] | None = None
            elif target in policy.targets:
                bucket = policy.targets[target][0]
            else:
                continue
            rules = [r for r in policy.rules if _applies_bucket(r, rname, bucket,
                                                                 all_target_units)]
            codes = sorted({c for r in rules for c in r.functions})
            for code in codes:
                dims = [d for d, fs in (("read", READ_FUNCTIONS), ("write", WRITE_FUNCTIONS))
                        if code in fs] or ["-"]
                free = {d: FULL for d in dims}
                for r in rules:
                    if code not in r.functions:
                        continue
                    cond = conditions(r, code)
                    if bucket is None:
                        whole = r.units is None
                    else:
                        whole = r.units is None or bucket <= r.units
                    if not whole:
                        cond.append("units " + fmt_units(r.units))
                    for d in dims:
                        rr = {"read": r.read_ranges, "write": r.write_ranges}.get(d) or FULL
                        part = _intersect(rr, free[d])
                        if r.allow and part:
                            key = (role, target, code, d, "; ".join(cond))
                            g.ranges[key] = merge_intervals((*g.ranges.get(key, ()), *part))
                            g.rules.setdefault(key, set()).add(r.id)
                        if not cond:
                            free[d] = _subtract(free[d], rr)
    return g


def _applies_bucket(r: Rule, role: str | None, bucket: frozenset[int] | None,
                    target_units: frozenset[int]) -> bool:
    if r.roles is not None and (role is None or role not in r.roles):
        return False
    if r.units is None:
        return True
    if bucket is None:
        return bool(r.units - target_units)
    return not r.units.isdisjoint(bucket)


def diff(old: Policy, new: Policy) -> list[str]:
    """Lines describing access added (+), removed (-) and other effective changes (~)."""
    roles = [*sorted(_role_names(old) | _role_names(new)), NO_ROLE]
    targets = [*sorted(set(old.targets) | set(new.targets)), OTHER_UNITS]
    a, b = grants(old, roles, targets), grants(new, roles, targets)
    lines: list[str] = []
    for sign, src, other in (("+", b, a), ("-", a, b)):
        for key in sorted(src.ranges, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
            rest = _subtract(src.ranges[key], other.ranges.get(key, ()))
            if not rest:
                continue
            role, target, code, dim, cond = key
            what = function_name(code)
            if code in ADDRESSED_FUNCTIONS and dim != "-":
                what += f" {dim} {fmt_ranges(rest)}"
            lines.append(f"{sign} {role} @ {target}: {what}"
                         + (f" [{cond}]" if cond else "")
                         + f"  (rule {', '.join(sorted(src.rules[key]))})")
    if old.monitor != new.monitor:
        lines.append(f"~ mode: {'monitor' if old.monitor else 'enforce'} -> "
                     f"{'monitor' if new.monitor else 'enforce'}")
    for r in new.rules:
        o = old.rule(r.id)
        if o is not None and not r.allow and not o.allow and o.monitor != r.monitor:
            lines.append(f"~ rule {r.id}: {'monitor' if r.monitor else 'enforce'} "
                         f"(was {'monitor' if o.monitor else 'enforce'})")
        if o is not None and not r.allow and not o.allow and \
                o.exception_code != r.exception_code:
            lines.append(f"~ rule {r.id}: exception {o.exception_code:02d} -> "
                         f"{r.exception_code:02d}")
        if o is not None and r.allow and o.allow and o.max_response_bytes != r.max_response_bytes:
            lines.append(f"~ rule {r.id}: max_response_bytes {o.max_response_bytes} -> "
                         f"{r.max_response_bytes}")
    for name in targets[:-1]:
        ot, nt = old.targets.get(name), new.targets.get(name)
        if ot is not None and nt is not None and ot != nt:
            lines.append(f"~ target {name}: units {fmt_units(ot[0])} -> {fmt_units(nt[0])}, "
                         f"upstream {ot[1]} -> {nt[1]}")
    for role in roles:
        rs = frozenset() if role == NO_ROLE else frozenset({role})
        lo, ln = old.limit_for(rs), new.limit_for(rs)
        if lo != ln:
            lines.append(f"~ rate limit for {role}: {_limit_label(lo)} -> {_limit_label(ln)}")
    old_id = {(tuple(m.fields), m.roles) for m in old.identities}
    new_id = {(tuple(m.fields), m.roles) for m in new.identities}
    for sign, items in (("+", new_id - old_id), ("-", old_id - new_id)):
        for fields, mroles in sorted(items, key=str):
            facts = ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in fields)
            lines.append(f"{sign} identity mapping {facts} -> roles {', '.join(sorted(mroles))}")
    return lines


__all__ = ["diff", "explain", "fmt_ranges", "grants", "why_not"]
