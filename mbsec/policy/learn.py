"""``mbsec policy learn``: a least-privilege policy proposed from recorded requests.

The proposal allows what the recording shows each role (or, for a certificate without a role,
each identity) doing on each unit with each function, and nothing else but what the admin
stated: address ranges closer than ``gap`` addresses are merged (the gap becomes allowed), and
quantities and written values are widened by ``margin`` percent. Every rule says how many
requests and which time span back it, and the file carries inline tests made from the traffic
(an allow per rule; denies for the neighbouring addresses, functions and values), so
``mbsec policy check --strict`` and ``mbsec policy test`` pass on it as written.

Requests the recording policy refused (``deny``, enforce mode) are not learned: what was
refused is not part of normal operation. Monitor mode's ``would_deny`` requests were forwarded
and are learned. Memory grows with the distinct (who, unit, function, address) seen, never
with the number of events.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mbsec.modbus.access import Access
from mbsec.policy.cases import Who, run_cases
from mbsec.policy.cases import build_access as build_case_access
from mbsec.policy.engine import Interval, Policy
from mbsec.policy.loader import _register_number_hint, load_policy_text
from mbsec.policy.names import DIAGNOSTICS, ENCAPSULATED, FUNCTION_CODES, FUNCTION_NAMES
from mbsec.policy.records import Record

#: largest quantity the Modbus spec allows per function (``max_quantity`` never exceeds it)
SPEC_QUANTITY = {1: 2000, 2: 2000, 3: 125, 4: 125, 15: 1968, 16: 123, 23: 125}
#: functions whose learned rule bounds written register values (``values:``)
VALUE_FUNCTIONS = frozenset({6, 16, 23})
COIL_FUNCTIONS = frozenset({5, 15})
#: the function a neighbour test tries instead: a write beside a read, and so on
NEIGHBOUR = {1: 5, 2: 1, 3: 6, 4: 3, 5: 15, 6: 16, 15: 5, 16: 6, 23: 16, 20: 21, 21: 20,
             22: 6, 24: 3, 7: 8, 11: 12, 12: 11, 17: 43, 8: 17, 43: 17}
_SLUG = re.compile(r"[^A-Za-z0-9_.:-]+")


def merge_with_gap(spans: Iterable[Interval], gap: int) -> list[Interval]:
    """Sorted, with spans closer than ``gap`` free addresses joined: ``gap=0`` joins only
    overlapping and adjacent spans."""
    out: list[Interval] = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1] + 1 + gap:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def widen_up(x: int, margin: int, top: int) -> int:
    """``x`` plus ``margin`` percent, rounded up, at most ``top``."""
    return min(top, -(-x * (100 + margin) // 100))


def widen_down(x: int, margin: int) -> int:
    """``x`` minus ``margin`` percent, rounded down, at least 0."""
    return max(0, x * (100 - margin) // 100)


def _slug(text: str) -> str:
    s = _SLUG.sub("-", text).strip("-")
    return s if s and s[0].isalnum() else f"x{s}"


def _q(s: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(s, ensure_ascii=False)


def _range_text(lo: int, hi: int) -> str:
    text = str(lo) if lo == hi else f"{lo}-{hi}"
    if _register_number_hint(lo, hi, text) is not None:  # 40001 would read as a register no.
        text = f"{lo:#x}" if lo == hi else f"{lo:#x}-{hi:#x}"
    return _q(text)


def _ranges_text(ranges: Sequence[Interval]) -> str:
    return "[" + ", ".join(_range_text(lo, hi) for lo, hi in ranges) + "]"


@dataclass(frozen=True, slots=True)
class WhoKey:
    """A learned principal: a certificate role, or one identity (CN and issuer, else the
    fingerprint) mapped to a role of its own."""

    role: str | None
    cn: str | None = None
    issuer: str | None = None
    fingerprint: str | None = None


@dataclass
class Group:
    """Everything seen for one (who, unit, function)."""

    count: int = 0
    first: str = ""
    last: str = ""
    sources: Counter[str] = field(default_factory=Counter)
    spans: set[Interval] = field(default_factory=set)
    write_spans: set[Interval] = field(default_factory=set)  # FC23's write side
    max_quantity: int = 0
    subs: set[int] = field(default_factory=set)
    #: address -> [min, max] of the register values written there
    values: dict[int, list[int]] = field(default_factory=dict)
    coil_states: set[int] = field(default_factory=set)
    values_cut: int = 0
    example: Record | None = None

    def add(self, rec: Record) -> None:
        a = rec.access
        self.count += 1
        if not self.first or rec.timestamp < self.first:
            self.first = rec.timestamp
        if rec.timestamp > self.last:
            self.last = rec.timestamp
        if len(self.sources) < 64 or rec.source in self.sources:
            self.sources[rec.source] += 1
        if self.example is None:
            self.example = rec
        fc = a.function_code
        if fc == 23:
            assert a.read is not None and a.write is not None
            self.spans.add((a.read[0], a.read[0] + a.read[1] - 1))
            self.write_spans.add((a.write[0], a.write[0] + a.write[1] - 1))
        else:
            span = a.read or a.write
            if span is not None:
                self.spans.add((span[0], span[0] + max(span[1], 1) - 1))
        self.max_quantity = max(self.max_quantity, a.quantity)
        if a.subfunction is not None:
            self.subs.add(a.subfunction)
        if rec.values_cut:
            self.values_cut += 1
        if fc in VALUE_FUNCTIONS and a.write is not None:
            for i, v in enumerate(a.values):
                mm = self.values.get(a.write[0] + i)
                if mm is None:
                    self.values[a.write[0] + i] = [v, v]
                elif v < mm[0]:
                    mm[0] = v
                elif v > mm[1]:
                    mm[1] = v
        elif fc in COIL_FUNCTIONS:
            self.coil_states.update(a.values)


@dataclass
class LearnOptions:
    gap: int = 0
    margin: int = 0
    by: str = "role"  # or "identity"
    mode: str = "enforce"
    sources: Sequence[str] = ()  # the files, named in the header


@dataclass
class Learned:
    """The proposal and the numbers its summary states."""

    text: str
    rules: int
    tests: int
    principals: int
    targets: int
    learned: int
    not_learned: int


class Learner:
    """Collects records (:meth:`add`), then writes the proposal (:meth:`proposal`)."""

    def __init__(self, options: LearnOptions) -> None:
        self.o = options
        self.groups: dict[tuple[WhoKey, int, int], Group] = {}
        self.unit_targets: dict[int, Counter[str]] = {}
        self.learned = 0
        self.refused = 0
        self.refused_by_rule: Counter[str] = Counter()
        self.first = ""
        self.last = ""

    def target_hints(self, unit_targets: dict[int, str]) -> None:
        """Upstream names for units whose own records named none (would_deny events)."""
        for unit, name in unit_targets.items():
            names = self.unit_targets.get(unit)
            if names is not None and not names:
                names[name] += 1

    def who_key(self, rec: Record) -> WhoKey:
        role = rec.who.role if rec.role_known else (rec.roles[0] if len(rec.roles) == 1
                                                     else None)
        if self.o.by == "role" and role and " " not in role and role != "*":
            return WhoKey(role)
        if rec.who.cn:
            return WhoKey(None, cn=rec.who.cn, issuer=rec.who.issuer)
        return WhoKey(None, fingerprint=rec.who.fingerprint)

    def add(self, rec: Record) -> None:
        if not rec.forwarded:
            self.refused += 1
            self.refused_by_rule[rec.rule] += 1
            return
        self.learned += 1
        if not self.first or rec.timestamp < self.first:
            self.first = rec.timestamp
        if rec.timestamp > self.last:
            self.last = rec.timestamp
        key = (self.who_key(rec), rec.unit, rec.access.function_code)
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = Group()
        g.add(rec)
        if rec.target is not None:
            self.unit_targets.setdefault(rec.unit, Counter())[rec.target] += 1
        else:
            self.unit_targets.setdefault(rec.unit, Counter())

    # -- writing ---------------------------------------------------------------------------
    def _names(self) -> tuple[dict[WhoKey, str], dict[int, str]]:
        """Role names for principals and target names for units, unique and valid."""
        roles: dict[WhoKey, str] = {}
        used: set[str] = set()
        whos = sorted({k[0] for k in self.groups}, key=lambda w: (
            w.role is None, w.role or "", w.cn or "", w.issuer or "", w.fingerprint or ""))
        for w in whos:
            if w.role is not None:
                name = w.role
            elif w.cn is not None:
                name = "cn-" + _slug(w.cn)
            else:
                name = "fp-" + (w.fingerprint or "")[:16]
            base, n = name, 2
            while name in used:
                name, n = f"{base}-{n}", n + 1
            used.add(name)
            roles[w] = name
        upstream_units: dict[str, set[int]] = {}
        for unit, names in self.unit_targets.items():
            if names:
                upstream_units.setdefault(names.most_common(1)[0][0], set()).add(unit)
        targets: dict[int, str] = {}
        for unit, names in sorted(self.unit_targets.items()):
            up = names.most_common(1)[0][0] if names else None
            if up is None:
                targets[unit] = f"unit{unit}"
            elif len(upstream_units[up]) == 1:
                targets[unit] = _slug(up)
            else:
                targets[unit] = f"{_slug(up)}-unit{unit}"
        return roles, targets

    def proposal(self, verify: bool = True) -> Learned:
        """The proposal text; ``verify`` loads it strictly and runs its tests (a failure is
        a bug here, never the admin's)."""
        o = self.o
        role_names, target_names = self._names()
        head = [
            "# Proposed by `mbsec policy learn` from "
            f"{self.learned:,} recorded request(s), {self.first or '-'} .. {self.last or '-'}",
        ]
        if o.sources:
            head.append("# events: " + ", ".join(o.sources))
        head += [
            "# Least privilege: each rule allows what one role (or one identity) was seen doing",
            "# on one unit with one function, nothing else but what these settings state:",
            f"#   --gap {o.gap}: address ranges with at most {o.gap} unused address(es) between "
            "them were merged (the gap is allowed too)",
            f"#   --margin {o.margin}%: quantities and the highest written values raised, the "
            "lowest lowered, by that much",
        ]
        if self.refused:
            head.append(f"# Not learned: {self.refused:,} request(s) the recording policy "
                        "refused (" + ", ".join(f"rule {r}: {n:,}" for r, n in
                                                sorted(self.refused_by_rule.items())) + ")")
        head.append("# Review every rule before you enforce it (docs/policy.md, adoption path).")
        lines = [*head, "version: 1", "default: deny", f"mode: {o.mode}",
                 f"description: {_q('Learned from recorded traffic; review before enforcing')}",
                 ""]
        idents = [w for w in role_names if w.role is None]
        if idents:
            lines.append("identities:")
            for w in idents:
                n = sum(g.count for (k, _, _), g in self.groups.items() if k == w)
                lines.append(f"  # {n:,} request(s)")
                if w.cn is not None:
                    match = f"{{subject_cn: {_q(w.cn)}"
                    match += f", issuer: {_q(w.issuer)}}}" if w.issuer else "}"
                    desc = f"certificate CN {w.cn}" + (f" from {w.issuer}" if w.issuer else "")
                else:
                    match = f"{{fingerprint_sha256: {_q(w.fingerprint or '')}}}"
                    desc = f"certificate {(w.fingerprint or '')[:16]}..."
                lines += [f"  - description: {_q(desc)}", f"    match: {match}",
                          f"    roles: [{_q(role_names[w])}]"]
            lines.append("")
        lines.append("targets:")
        for unit, name in sorted(target_names.items(), key=lambda x: x[1]):
            names = self.unit_targets[unit]
            up = names.most_common(1)[0][0] if names else None
            desc = f"upstream {up}, unit {unit}" if up else f"unit {unit}"
            lines.append(f"  {_q(name)}: {{unit_ids: [{unit}], description: {_q(desc)}}}")
        lines += ["", "rules:"]
        used_ids: set[str] = set()
        rules: list[tuple[str, WhoKey, int, int, Group]] = []
        for (w, unit, fc), g in sorted(self.groups.items(), key=lambda x: (
                role_names[x[0][0]], target_names[x[0][1]], x[0][2])):
            fname = FUNCTION_NAMES.get(fc, f"function{fc}")
            rid = base = _slug(f"{role_names[w]}-{target_names[unit]}-{fname}")
            n = 2
            while rid in used_ids:
                rid, n = f"{base}-{n}", n + 1
            used_ids.add(rid)
            rules.append((rid, w, unit, fc, g))
            lines += self._rule(rid, role_names[w], target_names[unit], fc, g)
        if not rules:
            lines[-1] = "rules: []"
        body = "\n".join(lines) + "\n"
        tests = self._tests(body, rules, role_names, target_names)
        text = body + ("\ntests:\n" + "".join(f"  - {t}\n" for t in tests) if tests else "")
        if verify:
            policy = load_policy_text(text, "<learned>", strict=True)
            failed = [r for r in run_cases(policy) if not r.passed]
            if failed:  # pragma: no cover - a bug in this module, not the admin's input
                raise AssertionError("learned policy fails its own test "
                                     f"{failed[0].case.describe()}")
        return Learned(text, len(rules), len(tests), len(role_names), len(target_names),
                       self.learned, self.refused)

    def _rule(self, rid: str, role: str, target: str, fc: int, g: Group) -> list[str]:
        o = self.o
        srcs = ", ".join(s for s, _ in g.sources.most_common(3))
        more = len(g.sources) - 3
        out = [f"  # {g.count:,} request(s), {g.first} .. {g.last}, from {srcs}"
               + (f" and {more} more" if more > 0 else "")]
        fname = FUNCTION_NAMES.get(fc)
        out += [f"  - id: {rid}",
                f"    description: {_q(f'{role}: {fname or fc} on {target}, as recorded')}",
                f"    roles: [{_q(role)}]", f"    targets: [{_q(target)}]",
                f"    functions: [{fname if fname else fc}]"]
        if fc == DIAGNOSTICS and g.subs:
            out.append(f"    subfunctions: [{', '.join(str(s) for s in sorted(g.subs))}]")
        if fc == ENCAPSULATED and g.subs:
            out.append(f"    mei_types: [{', '.join(str(s) for s in sorted(g.subs))}]")
        if fc == 23:
            out.append(f"    read_addresses: {_ranges_text(merge_with_gap(g.spans, o.gap))}")
            out.append("    write_addresses: "
                       f"{_ranges_text(merge_with_gap(g.write_spans, o.gap))}")
        elif g.spans:
            out.append(f"    addresses: {_ranges_text(merge_with_gap(g.spans, o.gap))}")
        if fc in SPEC_QUANTITY:
            out.append(f"    max_quantity: "
                       f"{widen_up(g.max_quantity, o.margin, SPEC_QUANTITY[fc])}")
        if fc in VALUE_FUNCTIONS:
            if g.values_cut:
                out.append(f"    # values not bounded: {g.values_cut:,} request(s) wrote more "
                           "values than the events keep (mbsec.values_total)")
            elif g.values:
                out.append("    values:")
                for lo, hi, vmin, vmax in self._value_bounds(fc, g):
                    out.append(f"      - {{addresses: {_range_text(lo, hi)}, min: {vmin}, "
                               f"max: {vmax}}}")
        if fc in COIL_FUNCTIONS:
            states = {0, 1} if g.values_cut else g.coil_states
            out.append("    coil_states: [" + ", ".join(
                s for s, v in (("on", 1), ("off", 0)) if v in states) + "]")
        if fc == 22:
            out.append("    # mask values are not bounded (values cannot bound masks)")
        return out

    def _value_bounds(self, fc: int, g: Group) -> list[tuple[int, int, int, int]]:
        """Per merged write range: the lowest and highest value written there, widened."""
        spans = g.write_spans if fc == 23 else g.spans
        out = []
        for lo, hi in merge_with_gap(spans, self.o.gap):
            seen = [mm for a, mm in g.values.items() if lo <= a <= hi]
            vmin = min(mm[0] for mm in seen)
            vmax = max(mm[1] for mm in seen)
            out.append((lo, hi, widen_down(vmin, self.o.margin),
                        widen_up(vmax, self.o.margin, 0xFFFF)))
        return out

    # -- inline tests ----------------------------------------------------------------------
    def _tests(self, body: str, rules: list[tuple[str, WhoKey, int, int, Group]],
               role_names: dict[WhoKey, str], target_names: dict[int, str]) -> list[str]:
        """An allow per rule (its first recorded request) and the neighbours it denies."""
        policy = load_policy_text(body, "<learned>", strict=True)
        cases: list[str] = []
        seen: set[str] = set()
        for rid, w, unit, fc, g in rules:
            ex = g.example
            assert ex is not None
            who = self._who(w, ex)
            target = target_names[unit]
            allow = _case_fields(ex, fc)
            if allow is not None:
                cases.append(_case_text(f"recorded {rid}", who, target, allow, "allow", rid))
            for name, fields in self._neighbours(fc, g, ex):
                text = _case_text(name, who, target, fields, "deny", None)
                key = text.split(", ", 1)[1]
                if key in seen or not _denied(policy, who, unit, fields):
                    continue
                seen.add(key)
                cases.append(text)
        return cases

    def _who(self, w: WhoKey, ex: Record) -> dict[str, str]:
        if w.role is not None:
            return {"role": w.role}
        who: dict[str, str] = {}
        if ex.who.role:
            who["role"] = ex.who.role
        if w.cn is not None:
            who["cn"] = w.cn
            if w.issuer:
                who["issuer"] = w.issuer
        else:
            who["fingerprint"] = w.fingerprint or ""
        return who

    def _neighbours(self, fc: int, g: Group, ex: Record
                    ) -> list[tuple[str, dict[str, object]]]:
        out: list[tuple[str, dict[str, object]]] = []
        gap = self.o.gap
        base = _case_fields(ex, fc) or {"function": _fn(fc)}
        if fc == 23:
            reads, writes = merge_with_gap(g.spans, gap), merge_with_gap(g.write_spans, gap)
            w0 = writes[0][0]
            allowed_value = g.values.get(w0, [0, 0])[0]
            for _lo, hi in reads[-1:]:
                if hi < 0xFFFF:
                    out.append((f"read above {hi}", {**base, "address": hi + 1, "quantity": 1,
                                                     "write_address": w0,
                                                     "values": [allowed_value]}))
            for _lo, hi in writes[-1:]:
                if hi < 0xFFFF:
                    out.append((f"write above {hi}", {**base, "address": reads[0][0],
                                                      "quantity": 1, "write_address": hi + 1,
                                                      "values": [allowed_value]}))
        elif g.spans:
            ranges = merge_with_gap(g.spans, gap)
            first_lo, last_hi = ranges[0][0], ranges[-1][1]
            edge = dict(base)
            edge.pop("values", None)
            edge.pop("value", None)
            if fc in VALUE_FUNCTIONS:  # a value written there: the address is what is wrong
                v = g.values.get(first_lo, [0, 0])[0]
                if fc == 6:
                    edge["value"] = v
                else:
                    edge["values"] = [v]
            elif fc in COIL_FUNCTIONS:
                st = "on" if 1 in g.coil_states else "off"
                if fc == 5:
                    edge["value"] = st
                else:
                    edge["values"] = [1 if st == "on" else 0]
            elif fc in (21, 22):
                edge["values"] = list(ex.access.values[:2]) if fc == 22 else [0]
            if "quantity" in edge:
                edge["quantity"] = 1
            if last_hi < 0xFFFF:
                out.append((f"above {last_hi}", {**edge, "address": last_hi + 1}))
            if first_lo > 0:
                out.append((f"below {first_lo}", {**edge, "address": first_lo - 1}))
            holes = [(a[1] + 1, b[0] - 1) for a, b in itertools.pairwise(ranges)]
            if holes:
                out.append((f"between ranges at {holes[0][0]}", {**edge,
                                                                 "address": holes[0][0]}))
            if fc in VALUE_FUNCTIONS and not g.values_cut and g.values:
                lo, _hi, vmin, vmax = self._value_bounds(fc, g)[0]
                for v, what in ((vmax + 1, f"value above {vmax}"),
                                (vmin - 1, f"value below {vmin}")):
                    if 0 <= v <= 0xFFFF:
                        val = {**edge, "address": lo}
                        val.pop("quantity", None)
                        if fc == 6:
                            val["value"] = v
                        else:
                            val["values"] = [v]
                        out.append((what, val))
            if fc in COIL_FUNCTIONS and len(g.coil_states) == 1 and not g.values_cut:
                other = "off" if 1 in g.coil_states else "on"
                val = {**edge, "address": first_lo}
                if fc == 5:
                    val["value"] = other
                else:
                    val["values"] = [1 if other == "on" else 0]
                out.append((f"coil {other}", val))
        if fc == DIAGNOSTICS:
            for sub in (1, 4, 10, 0):
                if sub not in g.subs:
                    out.append((f"sub-function {sub}", {"function": "diagnostics",
                                                        "subfunction": sub}))
                    break
        if fc == ENCAPSULATED and 13 not in g.subs:
            out.append(("MEI type 13", {"function": _fn(43), "subfunction": 13}))
        nb = NEIGHBOUR.get(fc)
        if nb is not None:
            addr = ex.access.write[0] if ex.access.write else \
                ex.access.read[0] if ex.access.read else 0
            fields: dict[str, object] = {"function": _fn(nb)}
            if nb in (1, 2, 3, 4, 5, 6, 15, 16, 20, 21, 22, 24):
                fields["address"] = addr
            if nb == 5:
                fields["value"] = "on"
            out.append((f"neighbour {FUNCTION_NAMES.get(nb, nb)}", fields))
        return out


def _fn(fc: int) -> str | int:
    return FUNCTION_NAMES.get(fc) or fc


def _case_fields(rec: Record, fc: int) -> dict[str, object] | None:
    """The test-case keys that rebuild ``rec``'s request (None if it cannot be rebuilt)."""
    a = rec.access
    f: dict[str, object] = {"function": _fn(fc)}
    if fc == 23:
        assert a.read is not None and a.write is not None
        vals = list(a.values) + [0] * (a.write[1] - len(a.values))
        f.update(address=a.read[0], quantity=a.read[1], write_address=a.write[0], values=vals)
    elif fc in (1, 2, 3, 4, 20) and a.read is not None:
        f.update(address=a.read[0], quantity=a.read[1])
    elif fc == 24 and a.read is not None:
        f["address"] = a.read[0]
    elif fc == 5 and a.write is not None:
        f.update(address=a.write[0], value="on" if a.values and a.values[0] else "off")
    elif fc == 6 and a.write is not None:
        f.update(address=a.write[0], value=a.values[0] if a.values else 0)
    elif fc in (15, 16, 21) and a.write is not None:
        vals = list(a.values) + [0] * (a.write[1] - len(a.values))
        f.update(address=a.write[0], values=vals[:a.write[1]])
    elif fc == 22 and a.write is not None:
        f.update(address=a.write[0], values=list(a.values[:2]) or [0xFFFF, 0])
    elif fc in (DIAGNOSTICS, ENCAPSULATED) and a.subfunction is not None:
        f["subfunction"] = a.subfunction
    elif fc not in (7, 11, 12, 17) and fc in FUNCTION_NAMES:
        return None
    try:
        _access_of(f)
    except ValueError:
        return None
    return f


def _int(v: object) -> int:
    assert isinstance(v, int)
    return v


def _access_of(f: dict[str, object]) -> Access:
    """The request a test case with these keys builds (``ValueError`` if the proxy would
    reject it before policy)."""
    function = f["function"]
    fc = function if isinstance(function, int) else FUNCTION_CODES[str(function)]
    value, values = f.get("value"), f.get("values")
    vals: tuple[int, ...] | None = None
    if isinstance(values, list):
        vals = tuple(_int(v) for v in values)
    elif isinstance(value, str):
        vals = (1 if value == "on" else 0,)
    elif value is not None:
        vals = (_int(value),)
    sub, waddr = f.get("subfunction"), f.get("write_address")
    return build_case_access(
        fc, address=_int(f.get("address", 0)), quantity=_int(f.get("quantity", 1)),
        write_address=None if waddr is None else _int(waddr), values=vals,
        subfunction=None if sub is None else _int(sub))


def _denied(policy: Policy, who: dict[str, str], unit: int, f: dict[str, object]) -> bool:
    try:
        access = _access_of(f)
    except ValueError:
        return False
    w = Who(role=who.get("role"), cn=who.get("cn"), issuer=who.get("issuer"),
            fingerprint=who.get("fingerprint"))
    d = policy.evaluate(policy.principal(w.identity(), "192.0.2.10"), unit, access)
    return d.outcome != "allow"


def _scalar(v: object) -> str:
    if isinstance(v, str):
        return _q(v)
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return str(v)


def _case_text(name: str, who: dict[str, str], target: str, fields: dict[str, object],
               expect: str, rule: str | None) -> str:
    parts = [f"name: {_q(name)}", *(f"{k}: {_q(v)}" for k, v in who.items()),
             f"target: {_q(target)}", *(f"{k}: {_scalar(v)}" for k, v in fields.items()),
             f"expect: {expect}"]
    if rule is not None:
        parts.append(f"rule: {rule}")
    return "{" + ", ".join(parts) + "}"


def learn(records: Iterable[Record], options: LearnOptions,
          unit_targets: dict[int, str] | None = None, *, verify: bool = True) -> Learned:
    learner = Learner(options)
    for rec in records:
        learner.add(rec)
    learner.target_hints(unit_targets or {})
    return learner.proposal(verify)


__all__ = ["LearnOptions", "Learned", "Learner", "learn", "merge_with_gap", "widen_down",
           "widen_up"]
