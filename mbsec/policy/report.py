"""``mbsec policy report``: one page a change board reviews before a policy goes live.

What it shows is the policy's *effect*, computed by the same code as ``explain`` and ``diff``
(:func:`mbsec.policy.explain.grants`): the access matrix (roles x targets, each cell the
functions with their address ranges, writes standing out), the access a change adds and
removes against the policy in force, the identity mappings and rate limits, and the inline
tests with their results. HTML is one self-contained page (inline CSS, no script, no external
asset: it opens from a mail attachment or an air-gapped share); Markdown is for a merge request.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from mbsec.policy.cases import CaseResult, run_cases
from mbsec.policy.engine import Policy
from mbsec.policy.explain import (
    NO_ROLE,
    OTHER_UNITS,
    _limit_label,
    _role_names,
    diff,
    fmt_ranges,
    function_name,
    grants,
)
from mbsec.policy.names import WRITE_FUNCTIONS


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a matrix cell: a function and the addresses it may touch there."""

    function: str
    dim: str  # read, write or -
    ranges: str
    conditions: str
    rules: str

    @property
    def write(self) -> bool:
        return self.dim == "write"

    def text(self) -> str:
        what = self.function + (f" {self.dim} {self.ranges}" if self.dim != "-" else "")
        return what + (f" [{self.conditions}]" if self.conditions else "")


def matrix(policy: Policy) -> tuple[list[str], list[str], dict[tuple[str, str], list[Entry]]]:
    """Roles (rows), targets (columns) and the cells that grant anything."""
    roles = [*sorted(_role_names(policy)), NO_ROLE]
    targets = [*policy.targets, OTHER_UNITS]
    g = grants(policy, roles, targets)
    cells: dict[tuple[str, str], list[Entry]] = {}
    for key in sorted(g.ranges, key=lambda k: (k[0], k[1], k[2], k[3] != "read", k[4])):
        role, target, code, dim, cond = key
        ranges = fmt_ranges(g.ranges[key])
        write = dim == "write" or (dim == "-" and code in WRITE_FUNCTIONS)
        cells.setdefault((role, target), []).append(Entry(
            function_name(code), "write" if write else dim, ranges, cond,
            ", ".join(sorted(g.rules[key]))))
    used_roles = [r for r in roles if any(k[0] == r for k in cells)]
    used_targets = [t for t in targets if any(k[1] == t for k in cells)]
    return used_roles, used_targets, cells


def _diff_kind(line: str) -> str:
    return {"+": "added", "-": "removed"}.get(line[:1], "changed")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #bbb;padding:4px 8px;vertical-align:top}
th{background:#eee;text-align:left}ul{margin:0;padding-left:1.1em}
.write{color:#a00;font-weight:bold}.write::before{content:"\\270E  "}
.read{color:#225}.cond{color:#666;font-size:.9em}.rule{color:#888;font-size:.85em}
#diff{list-style:none;padding-left:0}.added{color:#070}.removed{color:#a00}.changed{color:#850}
.pass{color:#070}.fail{color:#a00;font-weight:bold}.meta{color:#555}
code{background:#f4f4f4;padding:0 3px}
"""


def html_report(policy: Policy, old: Policy | None = None) -> str:
    e = html.escape
    roles, targets, cells = matrix(policy)
    results = run_cases(policy)
    failed = sum(not r.passed for r in results)
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>mbsec policy report: {e(policy.path)}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>Policy review: <code>{e(policy.path)}</code></h1>",
           f'<p class="meta" id="summary">mode <b>{"monitor" if policy.monitor else "enforce"}'
           f"</b>, {len(policy.rules)} rule(s), {len(policy.identities)} identity mapping(s), "
           f"{len(policy.targets)} target(s), {len(results)} inline test(s) "
           f"({len(results) - failed} pass, {failed} fail); default deny; "
           f"SHA-256 <code>{policy.digest[:16]}</code>"
           + (f"; compared with <code>{e(old.path)}</code>" if old is not None else "")
           + "</p>"]
    out.append("<h2>Access matrix</h2>")
    out.append('<p class="meta">What each role may do on each target after earlier rules '
               'have claimed their requests; <span class="write">writes</span> stand out. '
               "Everything not listed is denied.</p>")
    if cells:
        out.append('<table id="matrix"><thead><tr><th>role</th>' + "".join(
            f'<th data-target="{e(t)}">{e(t)}<br><span class="meta">{e(_units(policy, t))}'
            "</span></th>" for t in targets) + "</tr></thead><tbody>")
        for role in roles:
            out.append(f'<tr data-role="{e(role)}"><th>{e(role)}</th>')
            for t in targets:
                entries = cells.get((role, t), [])
                items = "".join(
                    f'<li class="{"write" if en.write else "read"}" data-function="'
                    f'{e(en.function)}" data-ranges="{e(en.ranges)}">{e(en.function)}'
                    + (f" {en.dim} {e(en.ranges)}" if en.dim != "-" else "")
                    + (f' <span class="cond">[{e(en.conditions)}]</span>'
                       if en.conditions else "")
                    + f' <span class="rule">({e(en.rules)})</span></li>' for en in entries)
                out.append(f'<td data-target="{e(t)}">' + (f"<ul>{items}</ul>" if items
                                                            else "&ndash;") + "</td>")
            out.append("</tr>")
        out.append("</tbody></table>")
    else:
        out.append('<p id="matrix">No rule allows anything: every request is denied.</p>')
    if old is not None:
        lines = diff(old, policy)
        out.append(f"<h2>Changes against <code>{e(old.path)}</code></h2>")
        if lines:
            out.append('<ul id="diff">' + "".join(
                f'<li class="{_diff_kind(x)}">{e(x)}</li>' for x in lines) + "</ul>")
        else:
            out.append('<p id="diff">No change in access.</p>')
    out += _html_who(policy)
    out.append("<h2>Inline tests</h2>")
    out += _html_tests(results)
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _units(policy: Policy, target: str) -> str:
    if target not in policy.targets:
        return "units no target names"
    units, upstream = policy.targets[target]
    return f"unit{'s' if len(units) > 1 else ''} {', '.join(str(u) for u in sorted(units))}" \
        + (f" @ {upstream}" if upstream else "")


def _html_who(policy: Policy) -> list[str]:
    e = html.escape
    out = ["<h2>Identities and rate limits</h2>"]
    if policy.identities:
        out.append('<table id="identities"><tr><th>certificate facts</th><th>roles</th></tr>'
                   + "".join(f"<tr><td>{e(_facts(m.fields))}</td>"
                             f"<td>{e(', '.join(sorted(m.roles)))}</td></tr>"
                             for m in policy.identities) + "</table>")
    else:
        out.append("<p>Roles come from the certificates' Modbus role extension only.</p>")
    roles = sorted(_role_names(policy))
    out.append('<table id="limits"><tr><th>role</th><th>rate limit</th></tr>'
               + "".join(f"<tr><td>{e(r)}</td><td>"
                         f"{e(_limit_label(policy.limit_for(frozenset({r}))))}</td></tr>"
                         for r in roles) + "</table>")
    return out


def _facts(fields: Sequence[tuple[str, frozenset[str]]]) -> str:
    return ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in fields)


def _html_tests(results: Sequence[CaseResult]) -> list[str]:
    e = html.escape
    if not results:
        return ['<p id="tests">The file has no inline tests.</p>']
    rows = []
    for r in results:
        ok = "pass" if r.passed else "fail"
        rows.append(f'<tr class="{ok}"><td>{ok.upper()}</td><td>{e(r.case.describe())}</td>'
                    f"<td>{e(r.case.expect)}</td><td>{e(r.decision.outcome)} "
                    f"(rule {e(r.decision.rule_id)})</td></tr>")
    return ['<table id="tests"><tr><th></th><th>case</th><th>expected</th><th>got</th></tr>',
            *rows, "</table>"]


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_report(policy: Policy, old: Policy | None = None) -> str:
    roles, targets, cells = matrix(policy)
    results = run_cases(policy)
    failed = sum(not r.passed for r in results)
    out = [f"## Policy review: `{policy.path}`", "",
           f"Mode **{'monitor' if policy.monitor else 'enforce'}**, {len(policy.rules)} "
           f"rule(s), {len(policy.targets)} target(s), {len(results)} inline test(s) "
           f"({len(results) - failed} pass, {failed} fail), default deny, SHA-256 "
           f"`{policy.digest[:16]}`.", ""]
    if old is not None:
        lines = diff(old, policy)
        out += [f"### Changes against `{old.path}`", ""]
        out += ["```diff", *lines, "```"] if lines else ["No change in access."]
        out.append("")
    out += ["### Access matrix", "", "Writes are **bold** (✎). Everything not listed is "
            "denied.", ""]
    if cells:
        out.append("| role | " + " | ".join(_md(t) for t in targets) + " |")
        out.append("|---" * (len(targets) + 1) + "|")
        for role in roles:
            row = [_md(role)]
            for t in targets:
                entries = cells.get((role, t), [])
                row.append("<br>".join(f"**✎ {_md(en.text())}**" if en.write else
                                       _md(en.text()) for en in entries) or "-")
            out.append("| " + " | ".join(row) + " |")
    else:
        out.append("No rule allows anything: every request is denied.")
    out += ["", "### Inline tests", ""]
    if results:
        out += ["| result | case | expected | got |", "|---|---|---|---|"]
        out += [f"| {'PASS' if r.passed else '**FAIL**'} | {_md(r.case.describe())} | "
                f"{r.case.expect} | {r.decision.outcome} ({_md(r.decision.rule_id)}) |"
                for r in results]
    else:
        out.append("The file has no inline tests.")
    return "\n".join(out) + "\n"


__all__ = ["html_report", "markdown_report", "matrix"]
