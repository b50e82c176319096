"""Load a policy file: strict YAML -> schema (pydantic) -> semantic checks -> compiled engine.

Every problem becomes a :class:`Diagnostic` with ``file:line:col`` and, where we can tell,
how to fix it. All structural problems (unknown keys, wrong types) are reported together; the
semantic checks (names, ranges, shadowing, inline tests) then run on a well-formed file and
also report everything at once. A file with any error never produces a :class:`Policy`, so a
typo can never widen access.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import itertools
import re
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pydantic

from mbsec.policy import model as m
from mbsec.policy.cases import Case, Who, build_access
from mbsec.policy.engine import (
    IdentityRule,
    Interval,
    Network,
    Policy,
    RateLimit,
    Rule,
    ValueBound,
    merge_intervals,
    parse_source,
)
from mbsec.policy.names import (
    ADDRESSED_FUNCTIONS,
    COIL_WRITE_FUNCTIONS,
    DIAGNOSTICS,
    ENCAPSULATED,
    FUNCTION_CODES,
    FUNCTION_NAMES,
    MEI_CODES,
    PRESETS,
    READ_FUNCTIONS,
    REGISTER_VALUE_FUNCTIONS,
    SUBFUNCTION_CODES,
    WRITE_FUNCTIONS,
)
from mbsec.policy.yamlsrc import Mark, Path_, Source, YamlError, parse_yaml

Severity = Literal["error", "warning"]

#: Exception codes a deny rule may answer with (Modbus Application Protocol 7).
EXCEPTION_CODES = frozenset({1, 2, 3, 4, 5, 6, 8, 10, 11})
MAX_PDU = 253
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_RANGE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*(?:-\s*(0[xX][0-9a-fA-F]+|\d+)\s*)?$")
_TABLE_DIGIT = {1: "1xxxx = discrete inputs", 3: "3xxxx = input registers",
                4: "4xxxx = holding registers"}


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Severity
    file: str
    line: int
    col: int
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        text = f"{self.file}:{self.line}:{self.col}: {self.severity}: {self.message}"
        return text + (f"\n    hint: {self.hint}" if self.hint else "")


class PolicyError(Exception):
    """The file cannot be used; ``diagnostics`` lists every problem (errors and warnings)."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        errors = [d for d in self.diagnostics if d.severity == "error"]
        first = str(errors[0]) if errors else "policy rejected"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first + more)


def load_policy(path: str | Path, *, strict: bool = False) -> Policy:
    """Load and compile a policy file; ``strict`` treats warnings as errors.

    Raises :class:`PolicyError` (with all diagnostics) when the file cannot be used.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError([Diagnostic("error", str(p), 1, 1, "file not found")]) from None
    except OSError as exc:
        raise PolicyError([Diagnostic("error", str(p), 1, 1,
                                      f"cannot read file: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError as exc:
        raise PolicyError([Diagnostic("error", str(p), 1, 1,
                                      f"not UTF-8 text (byte {exc.start})",
                                      "save the file as UTF-8")]) from None
    return load_policy_text(text, str(p), strict=strict)


def load_policy_text(text: str, filename: str = "<policy>", *, strict: bool = False) -> Policy:
    """Like :func:`load_policy` for text already in memory (tests, reload from a store)."""
    diags = _Diagnostics(filename)
    try:
        src = parse_yaml(text)
    except YamlError as exc:
        diags.add("error", exc.mark, exc.message, exc.hint)
        raise PolicyError(diags.items) from None
    diags.src = src
    if not isinstance(src.data, dict):
        diags.add("error", Mark(1, 1), "a policy file is a YAML mapping",
                  "start with 'version: 1' and 'default: deny'")
        raise PolicyError(diags.items)
    try:
        parsed = m.PolicyModel.model_validate(src.data)
    except pydantic.ValidationError as exc:
        _schema_errors(exc, src, diags)
        raise PolicyError(diags.items) from None
    policy = _Compiler(parsed, src, diags, text).compile()
    if diags.errors or (strict and diags.items):
        if strict:
            diags.items = [Diagnostic("error", d.file, d.line, d.col, d.message, d.hint)
                           for d in diags.items]
        raise PolicyError(diags.items)
    return policy


class _Diagnostics:
    """Collects diagnostics for one file, positioned through the parsed source's marks."""

    def __init__(self, filename: str) -> None:
        self.file = filename
        self.items: list[Diagnostic] = []
        self.src: Source | None = None

    @property
    def errors(self) -> int:
        return sum(d.severity == "error" for d in self.items)

    def add(self, severity: Severity, mark: Mark, message: str, hint: str | None = None) -> None:
        d = Diagnostic(severity, self.file, mark.line, mark.col, message, hint)
        if d not in self.items:
            self.items.append(d)
            self.items.sort(key=lambda x: (x.line, x.col))

    def at(self, path: Path_, message: str, hint: str | None = None, *, key: bool = False,
           severity: Severity = "error") -> None:
        assert self.src is not None
        mark = self.src.key_marks.get(tuple(path)) if key else None
        self.add(severity, mark or self.src.mark(path), message, hint)


# -- schema errors ---------------------------------------------------------------------------

_CUSTOM: dict[tuple[str, str], tuple[str, str]] = {
    ("default", "missing"): ("the file does not state its default",
                             "add 'default: deny' at the top level: mbsec is default-deny and "
                             "the reviewer must see it"),
    ("default", "literal_error"): ("default must be 'deny'",
                                   "express what is allowed as rules; anything else is denied"),
    ("version", "missing"): ("the file does not say which policy language version it uses",
                             "add 'version: 1' at the top level"),
    ("rules", "missing"): ("the file has no 'rules:' list",
                           "add 'rules: []' for a file that denies everything"),
}


def _strip(ann: Any) -> Any:
    """Remove Annotated/Optional layers; of a union keep the model or container member."""
    while True:
        origin = get_origin(ann)
        if origin is Annotated:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(ann) if a is not type(None)]
            pick = [a for a in args if _is_model(a) or get_origin(_strip(a)) in (list, dict)]
            ann = pick[0] if pick else args[0]
        else:
            return ann


def _model_at(loc: Sequence[str | int]) -> type[pydantic.BaseModel] | None:
    """Which model the mapping at ``loc`` is validated against (for key suggestions)."""
    ann: Any = m.PolicyModel
    for part in loc:
        ann = _strip(ann)
        origin = get_origin(ann)
        if origin is list and isinstance(part, int):
            ann = get_args(ann)[0]
        elif origin is dict:
            ann = get_args(ann)[1]
        elif _is_model(ann) and isinstance(part, str) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            return None
    ann = _strip(ann)
    return ann if _is_model(ann) else None


def _is_model(a: Any) -> bool:
    return isinstance(a, type) and issubclass(a, pydantic.BaseModel)


def _close_key(loc: Path_) -> tuple[list[str], str | None]:
    """The keys allowed beside the unknown key at ``loc``, and the one it most resembles."""
    parent = _model_at(loc[:-1])
    allowed = sorted(parent.model_fields) if parent else []
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    return allowed, (close[0] if close else None)


def _schema_errors(exc: pydantic.ValidationError, src: Source, diags: _Diagnostics) -> None:
    seen: set[tuple[Path_, str]] = set()
    # a misspelt required key is one mistake: report the unknown key (with "did you mean"),
    # not also the required key it was meant to be
    misspelt = {(tuple(e["loc"])[:-1], _close_key(tuple(e["loc"]))[1])
                for e in exc.errors() if e["type"] == "extra_forbidden"}
    for err in exc.errors():
        loc: Path_ = tuple(err["loc"])
        kind = err["type"]
        # union/annotated members add synthetic loc parts ('int', 'str', 'function-before[]')
        path = loc
        while path and path not in src.marks and path not in src.key_marks:
            path = path[:-1]
        if kind == "extra_forbidden":
            key = loc[-1]
            allowed, close = _close_key(loc)
            hint = (f"did you mean '{close}'? " if close else "") + \
                (f"allowed keys here: {', '.join(allowed)}" if allowed else "")
            if (path, kind) not in seen:
                seen.add((path, kind))
                diags.at(path, f"unknown key '{key}'", hint or None, key=True)
            continue
        if kind == "missing":
            parent_path = loc[:-1]
            if (parent_path, str(loc[-1])) in misspelt:
                continue
            custom = _CUSTOM.get((str(loc[-1]), kind)) if len(loc) == 1 else None
            if custom:
                diags.at(parent_path, *custom)
            else:
                diags.at(parent_path, f"missing required key '{loc[-1]}'",
                         _missing_hint(loc))
            continue
        if len(loc) == 1 and (str(loc[0]), kind) in _CUSTOM:
            diags.at(path, *_CUSTOM[(str(loc[0]), kind)])
            continue
        if (path, "value") in seen:
            continue
        seen.add((path, "value"))
        where = ".".join(str(p) for p in path) or "the file"
        given = src.raw.get(path)
        shown = f" (got {given!r})" if given is not None else ""
        msgs = sorted({e["msg"] for e in exc.errors() if _prefix(tuple(e["loc"]), path, src)})
        diags.at(path, f"invalid value for {where}{shown}: " + "; or ".join(msgs))


def _prefix(loc: Path_, path: Path_, src: Source) -> bool:
    p = loc
    while p and p not in src.marks and p not in src.key_marks:
        p = p[:-1]
    return p == path


def _missing_hint(loc: Path_) -> str | None:
    name = loc[-1]
    if name == "id":
        return "every rule needs a unique id, e.g. 'id: operator-read'"
    if name == "description":
        return "say in one line why the rule exists; reviewers sign off on it"
    if name == "functions":
        return "list function names or numbers, or a preset such as read-only"
    if name == "expect":
        return "add 'expect: allow' or 'expect: deny'"
    return None


# -- semantic compile ------------------------------------------------------------------------

def _suggest(word: str, choices: Iterable[str]) -> str | None:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


class _Compiler:
    def __init__(self, model: m.PolicyModel, src: Source, diags: _Diagnostics,
                 text: str) -> None:
        self.m = model
        self.src = src
        self.d = diags
        self.text = text
        self.targets: dict[str, tuple[frozenset[int], str | None]] = {}

    def err(self, path: Path_, message: str, hint: str | None = None) -> None:
        self.d.at(path, message, hint)

    def warn(self, path: Path_, message: str, hint: str | None = None) -> None:
        self.d.at(path, message, hint, severity="warning")

    def compile(self) -> Policy:
        pm = self.m
        for name, t in pm.targets.items():
            p: Path_ = ("targets", name)
            self._units(t.unit_ids, (*p, "unit_ids"))
            if t.upstream is not None:
                self._check_upstream(t.upstream, (*p, "upstream"))
            self.targets[name] = (frozenset(t.unit_ids), t.upstream)
        identities = tuple(self._identity(i, im) for i, im in enumerate(pm.identities))
        default_limit, role_limits = self._limits()
        rules: list[Rule] = []
        ids: dict[str, int] = {}
        for i, rm in enumerate(pm.rules):
            r = self._rule(i, rm)
            if rm.id in ids:
                self.err(("rules", i, "id"), f"duplicate rule id '{rm.id}' (also rule "
                         f"#{ids[rm.id] + 1})", "rule ids name decisions in events; make "
                         "each unique")
            ids.setdefault(rm.id, i)
            if r is not None:
                rules.append(r)
        if len(rules) == len(pm.rules):
            self._shadowing(rules)
        policy = Policy(
            path=self.d.file, digest=hashlib.sha256(self.text.encode()).hexdigest(),
            monitor=pm.mode == "monitor", rules=tuple(rules), targets=self.targets,
            identities=identities, default_limit=default_limit, role_limits=role_limits)
        policy.cases = tuple(c for i, cm in enumerate(pm.tests)
                             if (c := self._case(i, cm, ids)) is not None)
        policy.warnings = tuple(d for d in self.d.items if d.severity == "warning")
        return policy

    # -- pieces ---------------------------------------------------------------------------
    def _check_upstream(self, text: str, path: Path_) -> None:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.err(path, f"upstream '{text}' is not host:port", "write e.g. '10.20.0.5:502'")

    def _units(self, units: Sequence[int], path: Path_) -> frozenset[int]:
        seen: set[int] = set()
        for j, u in enumerate(units):
            if not 0 <= u <= 255:
                self.err((*path, j), f"unit id {u} is outside 0-255")
            elif u in seen:
                self.err((*path, j), f"unit id {u} is listed twice")
            seen.add(u)
        return frozenset(seen)

    def _identity(self, i: int, im: m.IdentityMapping) -> IdentityRule:
        p: Path_ = ("identities", i)
        fields: list[tuple[str, frozenset[str]]] = []
        for name in m.IdentityMatch.model_fields:
            vals = getattr(im.match, name)
            if vals is None:
                continue
            norm: set[str] = set()
            for j, v in enumerate(vals):
                if name == "fingerprint_sha256":
                    v = v.lower().replace(":", "")
                    if not re.fullmatch(r"[0-9a-f]{64}", v):
                        self.err((*p, "match", name, j), "a SHA-256 fingerprint is 64 hex "
                                 "digits", "mbsec-pki show CERT prints it")
                elif name == "san_ip":
                    try:
                        v = str(ipaddress.ip_address(v))
                    except ValueError:
                        self.err((*p, "match", name, j), f"'{v}' is not an IP address")
                elif name == "san_dns":
                    v = v.lower()
                norm.add(v)
            fields.append((name, frozenset(norm)))
        if not fields:
            self.err((*p, "match"), "an identity match needs at least one certificate fact",
                     "e.g. match: {subject_cn: historian-01}")
        self._role_names(im.roles, (*p, "roles"), allow_star=False)
        return IdentityRule(tuple(fields), frozenset(im.roles), self.src.mark(p).line)

    def _role_names(self, roles: Sequence[str], path: Path_, *, allow_star: bool) -> None:
        for j, r in enumerate(roles):
            if r == "*" and not allow_star:
                self.err((*path, j), "'*' is not a role name here")
            elif not r or r != r.strip() or any(c.isspace() for c in r):
                self.err((*path, j), f"role name {r!r} must not contain spaces")
            if roles.index(r) != j:
                self.err((*path, j), f"role '{r}' is listed twice")

    def _limit(self, lm: m.LimitModel) -> RateLimit:
        rps, wps = lm.requests_per_second, lm.writes_per_second
        return RateLimit(
            requests_per_second=rps,
            burst=float(lm.burst if lm.burst is not None else max(1, round(rps or 1))),
            writes_per_second=wps,
            write_burst=float(lm.write_burst if lm.write_burst is not None
                              else max(1, round(wps or 1))),
            max_in_flight=lm.max_in_flight)

    def _limits(self) -> tuple[RateLimit | None, tuple[tuple[str, RateLimit], ...]]:
        lm = self.m.limits
        if lm is None:
            return None, ()
        base = lm.default
        default = self._limit(base) if base is not None else None
        roles: list[tuple[str, RateLimit]] = []
        for role, rl in lm.roles.items():
            if base is not None:  # role entries inherit what they do not set
                merged = base.model_dump(exclude_none=True) | rl.model_dump(exclude_none=True)
                rl = m.LimitModel.model_validate(merged)
            roles.append((role, self._limit(rl)))
        return default, tuple(roles)

    def _functions(self, rm: m.RuleModel, p: Path_) -> dict[int, frozenset[int] | None]:
        entries: dict[int, set[int] | None] = {}
        seen: dict[tuple[int, int | None], str] = {}
        for j, item in enumerate(rm.functions):
            path = (*p, "functions", j)
            pairs = self._function_item(item, path)
            for code, sub in pairs:
                label = str(item)
                other = seen.get((code, sub)) or seen.get((code, None))
                if other is not None:
                    self.warn(path, f"function {FUNCTION_NAMES.get(code, code)} is listed "
                              f"twice ('{label}' and '{other}')", "remove one of them")
                seen.setdefault((code, sub), label)
                if sub is None:
                    entries[code] = None
                elif code not in entries:
                    entries[code] = {sub}
                else:
                    cur = entries[code]
                    if cur is not None:
                        cur.add(sub)
        for key, code, table, names in (("subfunctions", DIAGNOSTICS, "FC08 sub-function",
                                         SUBFUNCTION_CODES),
                                        ("mei_types", ENCAPSULATED, "FC43 MEI type",
                                         MEI_CODES)):
            items = getattr(rm, key)
            if items is None:
                continue
            if code not in entries:
                self.err((*p, key), f"'{key}' needs function {code} "
                         f"({FUNCTION_NAMES.get(code)}) in this rule's functions")
                continue
            if entries[code] is not None:
                self.err((*p, key), f"'{key}' and a '{code}/N' function entry both restrict "
                         f"function {code}", "use only one of the two forms")
                continue
            subs: set[int] = set()
            limit = 0xFFFF if code == DIAGNOSTICS else 0xFF
            for j, it in enumerate(items):
                val = self._code(it, names, limit, (*p, key, j), table)
                if val is not None:
                    if val in subs:
                        self.err((*p, key, j), f"{table} {val} is listed twice")
                    subs.add(val)
            entries[code] = subs
        return {c: (frozenset(s) if s is not None else None) for c, s in entries.items()}

    def _code(self, item: int | str, names: dict[str, int], limit: int, path: Path_,
              what: str) -> int | None:
        if isinstance(item, int) or item.isdigit():
            v = int(item)
            if not 0 <= v <= limit:
                self.err(path, f"{what} {v} is outside 0-{limit}")
                return None
            return v
        if item in names:
            return names[item]
        self.err(path, f"unknown {what} '{item}'",
                 _suggest(item, names) or f"use a number or one of: {', '.join(sorted(names))}")
        return None

    def _function_item(self, item: int | str, path: Path_) -> list[tuple[int, int | None]]:
        if isinstance(item, str) and item in PRESETS:
            return list(PRESETS[item])
        if isinstance(item, str) and item in MEI_CODES:
            return [(ENCAPSULATED, MEI_CODES[item])]
        if isinstance(item, str) and item in FUNCTION_CODES:
            return [(FUNCTION_CODES[item], None)]
        if isinstance(item, str):
            mm = re.fullmatch(r"(\d+)(?:/(\d+))?", item.strip())
            if mm is None:
                choices = [*FUNCTION_CODES, *MEI_CODES, *PRESETS]
                self.err(path, f"unknown function '{item}'",
                         _suggest(item, choices) or "use a function name such as "
                         "read_holding_registers, a number 1-127, or a preset (read-only, "
                         "read-write, any)")
                return []
            code, sub = int(mm.group(1)), (int(mm.group(2)) if mm.group(2) else None)
        else:
            code, sub = item, None
        if not 1 <= code <= 127:
            self.err(path, f"function code {code} is outside 1-127",
                     "codes 128-255 are exception responses, never requests")
            return []
        if sub is not None and code not in (DIAGNOSTICS, ENCAPSULATED):
            self.err(path, f"'{item}': only 8 (diagnostics) and 43 (MEI) take a sub-code")
            return []
        if sub is not None and not 0 <= sub <= (0xFFFF if code == DIAGNOSTICS else 0xFF):
            self.err(path, f"'{item}': sub-code {sub} is out of range")
            return []
        return [(code, sub)]

    def _range(self, item: int | str, path: Path_) -> Interval | None:
        raw = self.src.raw.get(path, str(item))
        if isinstance(item, int):
            lo_txt, hi_txt = raw.strip(), None
        else:
            mm = _RANGE.match(item)
            if mm is None:
                self.err(path, f"'{item}' is not an address or range",
                         "write a 0-based address (17) or an inclusive range (\"0-99\")")
                return None
            lo_txt, hi_txt = mm.group(1), mm.group(2)
        hexed = lo_txt.lower().startswith("0x")
        lo = int(lo_txt, 0) if hexed else int(lo_txt.replace("_", ""), 10)
        hi = lo if hi_txt is None else int(hi_txt, 16 if hi_txt.lower().startswith("0x") else 10)
        if lo < 0:
            self.err(path, f"address {lo} is negative", "addresses are 0-65535")
            return None
        if not hexed:
            hint = _register_number_hint(lo, hi, raw)
            if hint is not None:
                self.err(path, hint[0], hint[1])
                return None
        if hi < lo:
            self.err(path, f"inverted range '{raw}': the end is before the start",
                     f"write \"{hi}-{lo}\"")
            return None
        if hi > 0xFFFF:
            self.err(path, f"'{raw}' is beyond the last protocol address 65535")
            return None
        return (lo, hi)

    def _ranges(self, items: Sequence[int | str] | None, path: Path_
                ) -> tuple[Interval, ...] | None:
        if items is None:
            return None
        if not items:
            self.err(path, "an empty address list matches nothing",
                     "remove the key to allow any address, or list ranges")
            return None
        parsed: list[tuple[Interval, int]] = []
        for j, it in enumerate(items):
            r = self._range(it, (*path, j))
            if r is not None:
                parsed.append((r, j))
        parsed.sort()
        for (a, ja), (b, jb) in itertools.pairwise(parsed):
            if b[0] <= a[1]:
                self.err((*path, max(ja, jb)),
                         f"range {_fmt(b)} overlaps range {_fmt(a)} in the same list",
                         "merge them into one range or remove the duplicate")
        return merge_intervals(r for r, _ in parsed)

    def _rule(self, i: int, rm: m.RuleModel) -> Rule | None:
        p: Path_ = ("rules", i)
        before = self.d.errors
        if not _RULE_ID.match(rm.id) or rm.id == "default":
            self.err((*p, "id"), f"invalid rule id '{rm.id}'",
                     "use letters, digits, '-', '_', '.', ':' ('default' is reserved)")
        allow = rm.action == "allow"
        # who
        roles: frozenset[str] | None = None
        if rm.roles is None:
            if allow and rm.sources is None:
                self.err(p, f"allow rule '{rm.id}' does not say who it is for",
                         "add 'roles: [operator]' (or roles: ['*'] for any client)")
        elif not rm.roles:
            self.err((*p, "roles"), "an empty roles list matches nobody",
                     "list roles, or write roles: ['*'] for any client")
        else:
            self._role_names(rm.roles, (*p, "roles"), allow_star=True)
            if "*" in rm.roles:
                if len(rm.roles) > 1:
                    self.err((*p, "roles"), "'*' already means any client",
                             "remove the other roles or the '*'")
            else:
                roles = frozenset(rm.roles)
        sources = self._sources(rm.sources, (*p, "sources"))
        # where
        units: set[int] | None = None
        target_names: tuple[str, ...] = ()
        if rm.targets is not None:
            units = set()
            for j, t in enumerate(rm.targets):
                if t not in self.targets:
                    self.err((*p, "targets", j), f"unknown target '{t}'",
                             _suggest(t, self.targets) or "declare it under 'targets:'")
                else:
                    units |= self.targets[t][0]
            target_names = tuple(rm.targets)
        if rm.unit_ids is not None:
            units = (units or set()) | self._units(rm.unit_ids, (*p, "unit_ids"))
        # what
        functions = self._functions(rm, p)
        codes = set(functions)
        ranges = {k: self._ranges(getattr(rm, k), (*p, k))
                  for k in ("addresses", "read_addresses", "write_addresses")}
        read_r, write_r = self._range_semantics(rm, p, codes, ranges)
        max_q = self._bounded(rm.max_quantity, (*p, "max_quantity"), 1, 2000, "quantity")
        max_req = self._bounded(rm.max_request_bytes, (*p, "max_request_bytes"), 1, MAX_PDU,
                                "request PDU bytes")
        max_resp = self._bounded(rm.max_response_bytes, (*p, "max_response_bytes"), 1, MAX_PDU,
                                 "response PDU bytes")
        if max_resp is not None and not allow:
            self.err((*p, "max_response_bytes"), "max_response_bytes only applies to allow "
                     "rules (a denied request gets no PLC response)")
        values = self._values(rm, p, codes)
        coils = self._coil_states(rm, p, codes)
        exc = 1
        if rm.exception_code is not None:
            if allow:
                self.err((*p, "exception_code"), "exception_code only applies to deny rules",
                         "remove it, or set 'action: deny'")
            elif rm.exception_code not in EXCEPTION_CODES:
                self.err((*p, "exception_code"), f"exception code {rm.exception_code} is not "
                         "a Modbus exception code",
                         "use 1 (illegal function), 2 (illegal data address), 3 (illegal "
                         "data value) or 4, 5, 6, 8, 10, 11")
            else:
                exc = rm.exception_code
        if self.d.errors > before:
            return None
        mode = rm.mode or self.m.mode
        return Rule(
            index=i + 1, id=rm.id, description=rm.description, allow=allow,
            monitor=mode == "monitor", exception_code=exc, line=self.src.mark(p).line,
            roles=roles, sources=sources,
            units=frozenset(units) if units is not None else None,
            target_names=target_names, functions=functions, read_ranges=read_r,
            write_ranges=write_r, max_quantity=max_q, max_request_bytes=max_req,
            max_response_bytes=max_resp, values=values, coil_states=coils)

    def _sources(self, items: Sequence[str] | None, path: Path_) -> tuple[Network, ...] | None:
        if items is None:
            return None
        if not items:
            self.err(path, "an empty sources list matches nobody",
                     "remove the key for any source address")
            return None
        nets: list[Network] = []
        for j, s in enumerate(items):
            try:
                nets.append(ipaddress.ip_network(s, strict=True))
            except ValueError:
                try:
                    loose = ipaddress.ip_network(s, strict=False)
                    self.err((*path, j), f"'{s}' has host bits set",
                             f"did you mean '{loose}'? (or '{s.split('/')[0]}' for one host)")
                except ValueError:
                    self.err((*path, j), f"'{s}' is not an IP address or CIDR",
                             "write e.g. '10.20.0.0/24' or '10.20.0.7'")
        return tuple(nets)

    def _bounded(self, v: int | None, path: Path_, lo: int, hi: int, what: str) -> int | None:
        if v is not None and not lo <= v <= hi:
            self.err(path, f"{what} limit {v} is outside {lo}-{hi}")
            return None
        return v

    def _range_semantics(self, rm: m.RuleModel, p: Path_, codes: set[int],
                         ranges: dict[str, tuple[Interval, ...] | None]
                         ) -> tuple[tuple[Interval, ...] | None, tuple[Interval, ...] | None]:
        both, rd, wr = ranges["addresses"], ranges["read_addresses"], ranges["write_addresses"]
        given = [k for k in ranges if getattr(rm, k) is not None]
        if "addresses" in given and len(given) > 1:
            self.err((*p, given[1]), "'addresses' already covers reads and writes",
                     "use either 'addresses' or 'read_addresses'/'write_addresses'")
        if given and not codes & ADDRESSED_FUNCTIONS:
            self.err((*p, given[0]), "address ranges have no effect: none of this rule's "
                     "functions addresses data", "remove the address keys")
        reads, writes = codes & READ_FUNCTIONS, codes & WRITE_FUNCTIONS
        # An allow rule that bounds one direction only would leave the other wide open; a
        # deny rule bounded on one side is only broader, which is safe.
        allow = rm.action == "allow"
        if allow and rd is not None and both is None and wr is None and writes:
            self.err((*p, "read_addresses"), "this rule restricts read addresses but leaves "
                     "the writes of " + ", ".join(FUNCTION_NAMES.get(c, str(c))
                                                  for c in sorted(writes)) + " unrestricted",
                     "add 'write_addresses' (or use 'addresses' for both)")
        if allow and wr is not None and both is None and rd is None and reads:
            self.err((*p, "write_addresses"), "this rule restricts write addresses but leaves "
                     "the reads of " + ", ".join(FUNCTION_NAMES.get(c, str(c))
                                                 for c in sorted(reads)) + " unrestricted",
                     "add 'read_addresses' (or use 'addresses' for both)")
        if rd is not None and not reads:
            self.err((*p, "read_addresses"), "none of this rule's functions reads")
        if wr is not None and not writes:
            self.err((*p, "write_addresses"), "none of this rule's functions writes")
        return (both if both is not None else rd), (both if both is not None else wr)

    def _values(self, rm: m.RuleModel, p: Path_, codes: set[int]
                ) -> tuple[ValueBound, ...] | None:
        if rm.values is None:
            return None
        vp: Path_ = (*p, "values")
        if not codes & REGISTER_VALUE_FUNCTIONS:
            self.err(vp, "'values' bounds register writes, but this rule has none of "
                     "write_single_register, write_multiple_registers, "
                     "read_write_multiple_registers",
                     "for coils use 'coil_states: [on]' / [off]")
        for code, why in ((22, "its values are AND/OR masks"), (21, "file records are not "
                          "register values"), (5, "coils take coil_states"),
                          (15, "coils take coil_states")):
            if code in codes:
                self.err(vp, f"'values' cannot bound {FUNCTION_NAMES[code]}: {why}",
                         f"move {FUNCTION_NAMES[code]} to a rule of its own")
        if not rm.values:
            self.err(vp, "an empty values list matches no write")
        bounds: list[tuple[ValueBound, int]] = []
        for j, v in enumerate(rm.values):
            ep: Path_ = (*vp, j)
            lo_ok, hi_ok = (-0x8000, 0x7FFF) if v.signed else (0, 0xFFFF)
            if not lo_ok <= v.min <= hi_ok or not lo_ok <= v.max <= hi_ok:
                kind = "signed 16-bit (-32768..32767)" if v.signed else \
                    "unsigned 16-bit (0..65535)"
                self.err(ep, f"value bounds {v.min}..{v.max} are outside {kind}",
                         None if v.signed else "add 'signed: true' for negative values")
                continue
            if v.min > v.max:
                self.err((*ep, "min"), f"min {v.min} is above max {v.max}", "swap them")
                continue
            if v.addresses is None:
                if len(rm.values) > 1:
                    self.err(ep, "a values entry without 'addresses' covers every address, "
                             "so it cannot share the list with others",
                             "give each entry its own 'addresses'")
                spans: tuple[Interval, ...] | None = ((0, 0xFFFF),)
            else:
                spans = self._ranges(v.addresses, (*ep, "addresses"))
            for lo, hi in spans or ():
                bounds.append((ValueBound(lo, hi, v.min, v.max, v.signed), j))
        bounds.sort(key=lambda b: b[0].low)
        for (a, ja), (b, jb) in itertools.pairwise(bounds):
            if b.low <= a.high and ja != jb:
                self.err((*vp, max(ja, jb)), f"values addresses {b.low}-{b.high} overlap "
                         f"{a.low}-{a.high}", "each address may have one value range")
        return tuple(b for b, _ in bounds)

    def _coil_states(self, rm: m.RuleModel, p: Path_, codes: set[int]
                     ) -> frozenset[int] | None:
        if rm.coil_states is None:
            return None
        if not codes & COIL_WRITE_FUNCTIONS:
            self.err((*p, "coil_states"), "'coil_states' needs write_single_coil or "
                     "write_multiple_coils in this rule's functions")
        states: set[int] = set()
        for j, s in enumerate(rm.coil_states):
            if s not in ("on", "off"):
                self.err((*p, "coil_states", j), f"coil state '{s}' is not on or off")
            states.add(1 if s == "on" else 0)
        if not states:
            self.err((*p, "coil_states"), "an empty coil_states list matches no write")
        return frozenset(states)

    # -- inline tests -----------------------------------------------------------------------
    def _case(self, i: int, cm: m.CaseModel, ids: dict[str, int]) -> Case | None:
        p: Path_ = ("tests", i)
        before = self.d.errors
        fc: int | None = None
        sub: int | None = None
        pairs = self._function_item(cm.function, (*p, "function"))
        if pairs and len(pairs) != 1:
            self.err((*p, "function"), "a test case names one function, not a preset")
        elif pairs:
            fc, sub = pairs[0]
        if cm.subfunction is not None:
            names = SUBFUNCTION_CODES if fc == DIAGNOSTICS else MEI_CODES
            sub = self._code(cm.subfunction, names, 0xFFFF, (*p, "subfunction"), "sub-function")
        unit = cm.unit
        if cm.target is not None:
            if cm.target not in self.targets:
                self.err((*p, "target"), f"unknown target '{cm.target}'",
                         _suggest(cm.target, self.targets))
            elif unit is None:
                unit = min(self.targets[cm.target][0])
            elif unit not in self.targets[cm.target][0]:
                self.err((*p, "unit"), f"unit {unit} is not in target '{cm.target}'")
        if unit is None:
            unit = 1
        if not 0 <= unit <= 255:
            self.err((*p, "unit"), f"unit id {unit} is outside 0-255")
        if cm.rule is not None and cm.rule != "default" and cm.rule not in ids:
            self.err((*p, "rule"), f"no rule has id '{cm.rule}'",
                     _suggest(cm.rule, ids) or "use a rule id from this file or 'default'")
        if cm.value is not None and cm.values is not None:
            self.err((*p, "value"), "give either 'value' or 'values'")
        values: tuple[int, ...] | None = tuple(cm.values) if cm.values is not None else None
        if cm.value is not None:
            if isinstance(cm.value, str):
                if cm.value not in ("on", "off"):
                    self.err((*p, "value"), f"value '{cm.value}' is not a number, on or off")
                values = (1 if cm.value == "on" else 0,)
            else:
                values = (cm.value,)
        try:
            parse_source(cm.source)
        except ValueError:
            self.err((*p, "source"), f"'{cm.source}' is not an IP address")
        if fc is None or self.d.errors > before:
            return None
        try:
            access = build_access(fc, address=cm.address, quantity=cm.quantity,
                                  write_address=cm.write_address,
                                  write_quantity=cm.write_quantity, values=values,
                                  subfunction=sub, pdu_bytes=cm.pdu_bytes)
        except ValueError as exc:
            self.err(p, f"test case cannot be built: {exc}")
            return None
        who = Who(role=cm.role, cn=cm.cn, ou=tuple(cm.ou or ()), san_dns=tuple(cm.san_dns or ()),
                  san_ip=tuple(cm.san_ip or ()), san_uri=tuple(cm.san_uri or ()),
                  issuer=cm.issuer, fingerprint=cm.fingerprint, anonymous=cm.anonymous)
        return Case(index=i + 1, line=self.src.mark(p).line, name=cm.name, who=who,
                    source=cm.source, unit=unit, access=access, expect=cm.expect, rule=cm.rule)

    # -- shadowing --------------------------------------------------------------------------
    def _shadowing(self, rules: list[Rule]) -> None:
        for j, b in enumerate(rules):
            for a in rules[:j]:
                if covers(a, b):
                    self.warn(("rules", b.index - 1), f"rule '{b.id}' can never match: every "
                              f"request it matches is already matched by rule '{a.id}' "
                              f"(line {a.line})", "remove it, narrow the earlier rule, or "
                              "move this rule above it")
                    break


def _register_number_hint(lo: int, hi: int, raw: str) -> tuple[str, str] | None:
    """Flag Modicon-style 1-based register numbers (40001, 300001) written as addresses."""
    for width, base in ((5, 10_000), (6, 100_000)):
        lead = lo // base
        if len(str(lo)) == width and lead in _TABLE_DIGIT and lo % base >= 1:
            off = lead * base + 1
            top = hi - off if hi // base == lead and hi >= lo else lo - off
            fix = f"{lo - off}" if lo == hi else f"{lo - off}-{top}"
            return (f"\"{raw}\" looks like a 1-based register number ({_TABLE_DIGIT[lead]}); "
                    "policy addresses are 0-based protocol addresses",
                    f"write \"{fix}\". If you really mean protocol address {lo}, write it in "
                    f"hex: \"{lo:#x}" + (f"-{hi:#x}\"" if hi != lo else "\""))
    return None


def _fmt(r: Interval) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _within(inner: tuple[Interval, ...] | None, outer: tuple[Interval, ...] | None) -> bool:
    """Is every address of ``inner`` (None = all) inside ``outer`` (None = all)?"""
    if outer is None:
        return True
    if inner is None:
        return False
    return all(any(o[0] <= lo and hi <= o[1] for o in outer) for lo, hi in inner)


def _le(inner: int | None, outer: int | None) -> bool:
    """A limit ``inner`` is at least as tight as ``outer`` (None = no limit)."""
    return outer is None or (inner is not None and inner <= outer)


def covers(a: Rule, b: Rule) -> bool:
    """True when every request rule ``b`` matches is matched by ``a`` (conservative)."""
    if a.roles is not None and (b.roles is None or not b.roles <= a.roles):
        return False
    if a.sources is not None:
        if b.sources is None:
            return False
        if not all(any(nb.version == na.version and nb.subnet_of(na)  # type: ignore[arg-type]
                       for na in a.sources) for nb in b.sources):
            return False
    if a.units is not None and (b.units is None or not b.units <= a.units):
        return False
    for code, bsubs in b.functions.items():
        if code not in a.functions:
            return False
        asubs = a.functions[code]
        if asubs is not None and (bsubs is None or not bsubs <= asubs):
            return False
    if not (_within(b.read_ranges, a.read_ranges) and _within(b.write_ranges, a.write_ranges)):
        return False
    if not (_le(b.max_quantity, a.max_quantity) and
            _le(b.max_request_bytes, a.max_request_bytes)):
        return False
    if a.coil_states is not None and (b.coil_states is None or
                                      not b.coil_states <= a.coil_states):
        return False
    if a.values is not None:
        if b.values is None:
            return False
        for vb in b.values:
            if not any(va.low <= vb.low and vb.high <= va.high and va.signed == vb.signed and
                       va.vmin <= vb.vmin and vb.vmax <= va.vmax for va in a.values):
                return False
    return True
