"""``mbsec policy check|test|explain|diff|eval``: the tools admins run before a change goes live.

Exit codes: 0 ok, 1 errors or failures (invalid file, failing test, access change with
``diff --exit-code``), 2 usage errors. Output is plain text for people; diagnostics use the
``file:line:col: severity: message`` form editors and CI annotate.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from mbsec.modbus.access import Access
from mbsec.policy.cases import Who, build_access, run_cases
from mbsec.policy.engine import Policy
from mbsec.policy.explain import diff, explain, why_not
from mbsec.policy.loader import PolicyError, load_policy
from mbsec.policy.names import (
    DIAGNOSTICS,
    ENCAPSULATED,
    FUNCTION_CODES,
    MEI_CODES,
    SUBFUNCTION_CODES,
    function_label,
)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so ``main`` can return 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mbsec policy", description="Check, test, explain, diff and evaluate "
                "mbsec policy files; learn one from recorded events, replay events against "
                "one, report on one for review (see docs/policy.md).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)
    c = sub.add_parser("check", help="validate files; exit 1 on errors")
    c.add_argument("files", nargs="+", metavar="FILE", help="policy file(s) to validate")
    c.add_argument("--strict", action="store_true", help="treat warnings as errors")
    t = sub.add_parser("test", help="run the files' inline tests: cases")
    t.add_argument("files", nargs="+", metavar="FILE", help="policy file(s) with tests:")
    t.add_argument("-q", "--quiet", action="store_true", help="print failures and summary only")
    e = sub.add_parser("explain", help="table of what a role may do")
    e.add_argument("file", metavar="FILE", help="policy file")
    e.add_argument("--role", help="role name (omit for a client without a matching role)")
    e.add_argument("--target", help="limit to one target")
    e.add_argument("--source", help="only rules that admit this source IP")
    d = sub.add_parser("diff", help="access added/removed between two versions")
    d.add_argument("old", metavar="OLD", help="policy file as it is now")
    d.add_argument("new", metavar="NEW", help="the proposed version")
    d.add_argument("--exit-code", action="store_true",
                   help="exit 1 when access changes (like git diff --exit-code)")
    v = sub.add_parser("eval", help="decide one request")
    v.add_argument("file", metavar="FILE", help="policy file")
    v.add_argument("--role", help="the certificate's Modbus role (omit: NULL role)")
    v.add_argument("--cn", help="certificate subject CN (for identities: mappings)")
    v.add_argument("--ou", action="append", default=[], help="certificate subject OU")
    v.add_argument("--san-dns", action="append", default=[], help="DNS SAN (repeatable)")
    v.add_argument("--san-uri", action="append", default=[], help="URI SAN (repeatable)")
    v.add_argument("--san-ip", action="append", default=[], help="IP SAN (repeatable)")
    v.add_argument("--issuer", help="issuer DN (RFC 4514)")
    v.add_argument("--fingerprint", help="certificate SHA-256 fingerprint (hex)")
    v.add_argument("--anonymous", action="store_true", help="client without a certificate")
    v.add_argument("--source", default="192.0.2.10", help="client IP (default 192.0.2.10)")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--unit", type=int, help="unit id the client addresses")
    g.add_argument("--target", help="use the target's first unit id")
    v.add_argument("--function", required=True, help="name or number")
    v.add_argument("--subfunction", help="FC08 sub-function / FC43 MEI type (name or number)")
    v.add_argument("--address", type=_int, default=0,
                   help="0-based start address (default 0; 0x.. accepted)")
    v.add_argument("--quantity", type=_int, default=1, help="quantity (default 1)")
    v.add_argument("--write-address", type=_int, help="FC23 write start")
    v.add_argument("--value", action="append", default=[],
                   help="written value (repeat for several; on/off for coils)")
    v.add_argument("--pdu-bytes", type=_int, help="request PDU size to assume")
    v.add_argument("--json", action="store_true", help="print the decision as JSON")
    _tool_parsers(sub)
    return p


def _tool_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """learn / replay / report: the adoption path's tools (docs/policy.md)."""
    events_help = "JSON-lines event files (gzip is fine; - for stdin)"
    lr = sub.add_parser("learn", help="propose a least-privilege policy from recorded events")
    lr.add_argument("events", nargs="+", metavar="EVENTS", help=events_help)
    lr.add_argument("-o", "--output", default="-", metavar="FILE",
                    help="where to write the proposal (default: stdout)")
    lr.add_argument("--gap", type=_nonneg, default=0, metavar="N",
                    help="merge address ranges with at most N unused addresses between "
                    "them (default 0)")
    lr.add_argument("--margin", type=_nonneg, default=0, metavar="PERCENT",
                    help="widen quantities and written values by PERCENT (default 0)")
    lr.add_argument("--by", choices=("role", "identity"), default="role",
                    help="rules per certificate role (default) or per identity (CN)")
    lr.add_argument("--mode", choices=("enforce", "monitor"), default="enforce",
                    help="the proposal's mode (default enforce)")
    lr.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    rp = sub.add_parser("replay", help="decide recorded requests with a candidate policy")
    rp.add_argument("file", metavar="POLICY", help="the candidate policy")
    rp.add_argument("events", nargs="+", metavar="EVENTS", help=events_help)
    rp.add_argument("--compare", choices=("decision", "forwarding"), default="decision",
                    help="what counts as a change: the decision (default) or only whether "
                    "the request reaches the PLC")
    rp.add_argument("--exit-code", action="store_true",
                    help="exit 1 when any request would be decided differently")
    rp.add_argument("--json", action="store_true", help="print the result as JSON")
    rp.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    rr = sub.add_parser("report", help="a review page: access matrix, diff, test results")
    rr.add_argument("file", metavar="POLICY", help="the policy to review")
    rr.add_argument("--against", metavar="OLD", help="the policy in force, for the diff")
    rr.add_argument("-o", "--output", default="-", metavar="FILE",
                    help="where to write the report (default: stdout)")
    rr.add_argument("--format", choices=("html", "markdown"), default="html",
                    help="one self-contained HTML page (default) or Markdown")


def _nonneg(text: str) -> int:
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return n


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        ns = _parser().parse_args(list(sys.argv[2:] if argv is None else argv))
    except _UsageError as exc:
        print(exc, file=err)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        match ns.cmd:
            case "check":
                return _check(ns.files, ns.strict, out)
            case "test":
                return _test(ns.files, ns.quiet, out)
            case "explain":
                return _explain(ns, out, err)
            case "diff":
                return _diff(ns, out)
            case "eval":
                return _eval(ns, out, err)
            case "learn" | "replay" | "report":
                from mbsec.policy import tools_cli

                return tools_cli.run(ns, out, err)
    except _UsageError as exc:
        print(f"mbsec policy: error: {exc}", file=err)
        return 2
    except PolicyError as exc:
        for dgn in exc.diagnostics:
            print(dgn, file=out)
        return 1
    return 2  # pragma: no cover - argparse enforces the choices


def _check(files: Sequence[str], strict: bool, out: TextIO) -> int:
    rc = 0
    for f in files:
        try:
            p = load_policy(f, strict=strict)
        except PolicyError as exc:
            for dgn in exc.diagnostics:
                print(dgn, file=out)
            n = sum(d.severity == "error" for d in exc.diagnostics)
            print(f"{f}: {n} error(s)", file=out)
            rc = 1
            continue
        for w in p.warnings:
            print(w, file=out)
        print(f"{f}: ok ({len(p.rules)} rules, {len(p.cases)} tests, "
              f"{len(p.warnings)} warning(s), mode {'monitor' if p.monitor else 'enforce'})",
              file=out)
    return rc


def _test(files: Sequence[str], quiet: bool, out: TextIO) -> int:
    failed = passed = 0
    broken = False
    for f in files:
        try:
            policy = load_policy(f)
        except PolicyError as exc:
            for dgn in exc.diagnostics:
                print(dgn, file=out)
            broken = True
            continue
        for res in run_cases(policy):
            c, dcs = res.case, res.decision
            got = f"{dcs.outcome} (rule {dcs.rule_id})"
            want = c.expect + (f" (rule {c.rule})" if c.rule else "")
            if res.passed:
                passed += 1
                if not quiet:
                    print(f"PASS {f}:{c.line} #{c.index} {c.describe()} -> {got}", file=out)
            else:
                failed += 1
                print(f"FAIL {f}:{c.line} #{c.index} {c.describe()} -> {got}, "
                      f"expected {want}", file=out)
                _explain_fall_through(policy, c.who, c.source, c.unit, c.access, out)
        if not policy.cases:
            print(f"{f}: no tests: cases", file=out)
    print(f"{passed} passed, {failed} failed" + (", some files did not load" if broken else ""),
          file=out)
    return 1 if failed or broken else 0


def _explain(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = load_policy(ns.file)
    if ns.target is not None and ns.target not in policy.targets:
        raise _UsageError(f"unknown target {ns.target!r}; targets: "
                          f"{', '.join(policy.targets) or 'none'}")
    try:
        text = explain(policy, ns.role, ns.target, ns.source)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    print(text, file=out)
    return 0


def _diff(ns: argparse.Namespace, out: TextIO) -> int:
    old, new = load_policy(ns.old), load_policy(ns.new)
    lines = diff(old, new)
    for line in lines:
        print(line, file=out)
    if not lines:
        print("no change in access", file=out)
    return 1 if lines and ns.exit_code else 0


def _resolve_function(text: str) -> tuple[int, int | None]:
    if text in MEI_CODES:
        return ENCAPSULATED, MEI_CODES[text]
    if text in FUNCTION_CODES:
        return FUNCTION_CODES[text], None
    try:
        code = int(text, 0)
    except ValueError:
        raise _UsageError(f"unknown function {text!r}") from None
    if not 1 <= code <= 127:
        raise _UsageError(f"function code {code} is outside 1-127")
    return code, None


def _eval(ns: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    policy = load_policy(ns.file)
    code, sub = _resolve_function(ns.function)
    if ns.subfunction is not None:
        names = SUBFUNCTION_CODES if code == DIAGNOSTICS else MEI_CODES
        sub = names[ns.subfunction] if ns.subfunction in names else _int_usage(ns.subfunction)
    unit = ns.unit
    if ns.target is not None:
        if ns.target not in policy.targets:
            raise _UsageError(f"unknown target {ns.target!r}")
        unit = min(policy.targets[ns.target][0])
    values = tuple(1 if v == "on" else 0 if v == "off" else _int_usage(v) for v in ns.value)
    try:
        access = build_access(code, address=ns.address, quantity=ns.quantity,
                              write_address=ns.write_address, values=values or None,
                              subfunction=sub, pdu_bytes=ns.pdu_bytes)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    who = Who(role=ns.role, cn=ns.cn, ou=tuple(ns.ou), san_dns=tuple(ns.san_dns),
              san_ip=tuple(ns.san_ip), san_uri=tuple(ns.san_uri), issuer=ns.issuer,
              fingerprint=ns.fingerprint, anonymous=ns.anonymous)
    try:
        principal = policy.principal(who.identity(), ns.source)
    except ValueError as exc:
        raise _UsageError(f"bad --source: {exc}") from None
    d = policy.evaluate(principal, unit, access)
    if ns.json:
        print(json.dumps({"outcome": d.outcome, "allowed": d.allowed, "rule_id": d.rule_id,
                          "exception_code": d.exception_code, "reason": d.reason,
                          "target": d.target, "max_response_bytes": d.max_response_bytes,
                          "roles": sorted(principal.roles)}), file=out)
        return 0
    print(f"{d.outcome}  rule={d.rule_id}  target={d.target or '-'}  "
          f"roles={','.join(sorted(principal.roles)) or '-'}", file=out)
    print(f"  request: {who.label()} from {ns.source} unit {unit} "
          f"{function_label(code, access.subfunction)}", file=out)
    rule = policy.rule(d.rule_id)
    if rule is not None:
        print(f"  rule #{rule.index} (line {rule.line}): {rule.description}", file=out)
    if d.outcome != "allow":
        print(f"  answer: Modbus exception {d.exception_code:02d}"
              + (" (monitor mode: logged, request forwarded)" if d.allowed else ""), file=out)
    if d.max_response_bytes is not None:
        print(f"  response PDU limited to {d.max_response_bytes} bytes", file=out)
    if d.rule_id == "default":
        _explain_fall_through(policy, who, ns.source, unit, access, out)
    return 0


def _int_usage(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise _UsageError(f"not a number: {text!r}") from None


def _explain_fall_through(policy: Policy, who: Who, source: str, unit: int,
                          access: Access, out: TextIO) -> None:
    """Name rules that nearly matched (same role and function) and why they did not."""
    roles = policy.roles_for(who.identity())
    near = False
    for r in policy.rules:
        if access.function_code not in r.functions:
            continue
        if r.roles is not None and r.roles.isdisjoint(roles):
            continue
        reasons = why_not(policy, r, roles, source, unit, access)
        if reasons:
            near = True
            print(f"  not rule {r.id} (line {r.line}): " + "; ".join(reasons), file=out)
    if not near:
        print(f"  no rule for this role and function (roles: {', '.join(sorted(roles)) or 'none'})"
              "; see 'mbsec policy explain'", file=out)
