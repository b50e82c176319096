"""`mbsec policy replay`: recorded requests decided again by a candidate policy.

Logs are built with mbsec.events' own constructors (tests/event_log.py), so they have the
shape the proxy writes; tests/test_policy_learn.py replays a real proxy's log.
"""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest
from event_log import EventLog

from mbsec.policy.cases import Who, build_access
from mbsec.policy.cli import main as policy_main
from mbsec.policy.loader import load_policy_text
from mbsec.policy.records import Reader
from mbsec.policy.replay import EXAMPLES, Replayer

POLICY = """\
version: 1
default: deny
rules:
  - id: op-read
    description: operators read 0-99
    roles: [operator]
    functions: [read_holding_registers]
    addresses: ["0-99"]
  - id: eng-write
    description: engineers write 100-199
    roles: [engineer]
    functions: [write_single_register]
    addresses: ["100-199"]
"""
TIGHT = POLICY.replace('addresses: ["0-99"]', 'addresses: ["0-49"]')
MONITOR_ALL = "version: 1\ndefault: deny\nmode: monitor\nrules: []\n"

OP = Who(role="operator", cn="op-1", issuer="CN=Test CA")
ENG = Who(role="engineer", cn="eng-1", issuer="CN=Test CA")


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = policy_main(argv, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def recording(tmp_path: Path) -> Path:
    log = EventLog()
    for a in range(0, 100, 10):  # 10 reads, 5 of them above 49
        log.request(OP, ["operator"], 1, build_access(3, address=a, quantity=10), "allow",
                    "op-read")
    log.request(ENG, ["engineer"], 1, build_access(6, address=150, values=(5,)), "allow",
                "eng-write")
    log.request(OP, ["operator"], 1, build_access(6, address=150, values=(5,)), "deny",
                "default")
    path = tmp_path / "ev.jsonl"
    path.write_text(log.text())
    return path


def files(tmp_path: Path, **texts: str) -> dict[str, str]:
    out = {}
    for name, text in texts.items():
        p = tmp_path / f"{name}.yaml"
        p.write_text(text)
        out[name] = str(p)
    return out


def test_the_same_policy_changes_nothing(tmp_path: Path) -> None:
    ev = recording(tmp_path)
    p = files(tmp_path, same=POLICY)
    rc, out, _ = run(["replay", p["same"], str(ev), "--exit-code"])
    assert rc == 0
    assert "  allow -> allow  " in out and "  deny -> deny  " in out
    assert "0 of 12 request(s) would be decided differently (compare: decision)" in out


def test_a_tightened_policy_names_the_changes_and_exits_1(tmp_path: Path) -> None:
    ev = recording(tmp_path)
    p = files(tmp_path, tight=TIGHT)
    rc, out, _ = run(["replay", p["tight"], str(ev), "--exit-code"])
    assert rc == 1
    lines = out.splitlines()
    assert ["allow", "->", "deny", "5", "changed"] in [x.split() for x in lines]
    assert "  allow -> deny  op-read -> default: 5" in lines
    assert "  operator: allow -> deny: 5" in lines
    examples = [x for x in lines if x.startswith("    2026-")]
    assert len(examples) == EXAMPLES
    assert "role=operator cn=op-1" in examples[0] and "read 50+10" in examples[0]
    assert "ev.jsonl:6): rule op-read -> default" in examples[0]
    assert "5 of 12 request(s) would be decided differently" in out
    rc, out, _ = run(["replay", p["tight"], str(ev)])
    assert rc == 0  # without --exit-code a change is a result, not a failure
    rc, out, _ = run(["replay", p["tight"], str(ev), "--json"])
    doc = json.loads(out)
    assert doc["changed"] == 5 and doc["requests"] == 12
    assert {"old": "allow", "new": "deny", "count": 5, "changed": True} in doc["transitions"]


def test_monitor_recordings_count_each_request_once_and_compare_forwarding(
    tmp_path: Path
) -> None:
    log = EventLog()
    log.request(OP, ["operator"], 1, build_access(3, address=0, quantity=10), "would_deny",
                "default")  # would_deny + its outcome
    log.request(OP, ["operator"], 1, build_access(3, address=10, quantity=10), "would_deny",
                "default", outcome_logged=False)  # allowed_requests = debug: no outcome
    ev = tmp_path / "ev.jsonl"
    ev.write_text(log.text())
    assert len(log.lines) == 3
    reader = Reader()
    recs = list(reader.records([str(ev)]))
    assert [r.decision for r in recs] == ["would_deny", "would_deny"]
    assert reader.stats.outcome_duplicates == 1
    p = files(tmp_path, cand=POLICY, mon=MONITOR_ALL)
    rc, out, _ = run(["replay", p["cand"], str(ev), "--exit-code"])
    assert rc == 1 and "would_deny -> allow" in out
    rc, out, _ = run(["replay", p["cand"], str(ev), "--exit-code", "--compare", "forwarding"])
    assert rc == 0, out  # forwarded then, forwarded now
    rc, out, _ = run(["replay", p["mon"], str(ev), "--exit-code"])
    assert rc == 0  # would_deny -> would_deny


def test_the_certificate_role_comes_from_the_handshake_when_the_events_lack_it(
    tmp_path: Path
) -> None:
    """Older logs: no mbsec.role on request events. The connection's tls-handshake names the
    role; without it the recorded user.roles stand in (and the summary says so)."""
    log = EventLog()
    log.handshake(OP)
    log.request(OP, ["operator", "mapped"], 1, build_access(3, address=0, quantity=1),
                "allow", "op-read", role_in_context=False)
    other = Who(role="operator", cn="op-9", issuer="CN=Test CA")
    log.request(other, ["operator"], 1, build_access(3, address=0, quantity=1), "allow",
                "op-read", role_in_context=False)
    ev = tmp_path / "ev.jsonl"
    ev.write_text(log.text())
    reader = Reader()
    recs = list(reader.records([str(ev)]))
    assert [(r.who.role, r.role_known) for r in recs] == [("operator", True), (None, False)]
    assert reader.stats.role_unknown == 1
    result = Replayer(load_policy_text(POLICY)).run(recs)
    assert result.transitions == {("allow", "allow"): 2}
    rc, out, _ = run(["replay", files(tmp_path, p=POLICY)["p"], str(ev)])
    assert rc == 0
    assert "1 request(s) without the certificate's role (mbsec.role)" in out


def test_bad_input_is_a_one_line_error_with_exit_2(tmp_path: Path) -> None:
    p = files(tmp_path, p=POLICY, bad="version: 1\ndefault: deny\nrules: [{id: x}]\n")
    rc, out, err = run(["replay", p["p"], str(tmp_path / "nope.jsonl"), "--exit-code"])
    assert rc == 2 and out == ""
    assert err == f"mbsec policy replay: error: cannot read {tmp_path / 'nope.jsonl'}: " \
        "No such file or directory\n"
    junk = tmp_path / "junk"
    junk.write_text('{"event": {"action": "server-start"}}\nnope\n')
    rc, _, err = run(["replay", p["p"], str(junk)])
    assert rc == 2
    assert err.startswith(f"mbsec policy replay: error: no recorded requests in {junk} "
                          "(skipped 1 line(s) that are not JSON events")
    rc, _, err = run(["replay", p["bad"], str(recording(tmp_path)), "--exit-code"])
    assert rc == 2 and "error: the policy does not load" in err


@pytest.mark.parametrize("flat", [False, True])
def test_flat_siem_exports_read_like_nested_events(tmp_path: Path, flat: bool) -> None:
    from mbsec.audit import flatten

    ev = recording(tmp_path)
    if flat:
        ev.write_text("".join(json.dumps(flatten(json.loads(x))) + "\n"
                              for x in ev.read_text().splitlines()))
    recs = list(Reader().records([str(ev)]))
    assert len(recs) == 12
    assert recs[0].access == build_access(3, address=0, quantity=10)
    assert recs[10].access == build_access(6, address=150, values=(5,))


def test_memory_stays_bounded_as_the_log_grows(tmp_path: Path) -> None:
    """Replaying 16x the events must not need 16x the memory: nothing is kept per event
    (a kept record alone is over 1 KB; the peaks vary by 2x with what is in flight)."""
    log = EventLog()
    for i in range(150):
        who = Who(role="operator", cn=f"op-{i % 7}", issuer="CN=Test CA")
        log.request(who, ["operator"], 1 + i % 3, build_access(3, address=i % 200,
                                                               quantity=1 + i % 9),
                    "allow" if i % 5 else "would_deny", "op-read")
    chunk = log.text()
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text(chunk)
    big.write_text(chunk * 16)
    policy = load_policy_text(TIGHT)
    peaks = []
    for path in (small, big):
        tracemalloc.start()
        result = Replayer(policy).run(Reader().records([str(path)]))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert result.total > 0
    assert peaks[1] < 4 * peaks[0], peaks
