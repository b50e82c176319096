"""`mbsec policy learn`: least privilege from recorded traffic, proven by replaying it.

The end-to-end test records a real proxy (monitor mode, allowed requests at info) serving real
pymodbus clients with several roles and identities, learns from that log file, and then
enforces the proposal with a real proxy again: the recorded traffic goes through, its
neighbours do not. The property test states "nothing beyond the stated gap and margin" as an
envelope computed independently of the learner, over generated recordings and requests.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Pki, PymodbusPlc, StartProxy
from e2e.test_pymodbus_e2e import in_thread
from event_log import EventLog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbsec.policy.cases import Who, build_access, run_cases
from mbsec.policy.cli import main as policy_main
from mbsec.policy.learn import LearnOptions, learn, merge_with_gap
from mbsec.policy.loader import load_policy_text
from mbsec.policy.records import Reader, Record
from mbsec.policy.replay import Replayer

ROOT = Path(__file__).resolve().parents[1]
#: the policy in force while the walkthrough's events were recorded (docs/policy.md)
RECORDING_POLICY = (ROOT / "docs" / "adoption" / "monitor.yaml").read_text()


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = policy_main(argv, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def records(path: Path) -> list[Record]:
    return list(Reader().records([str(path)]))


# -- a real run -------------------------------------------------------------------------------


async def operator_body(c: Any) -> list[Any]:
    out = []
    for _ in range(3):
        out.append(await c.read_holding_registers(0, count=10, device_id=1))
        out.append(await c.read_holding_registers(10, count=10, device_id=1))
        out.append(await c.read_coils(0, count=8, device_id=1))
    return out


async def engineer_body(c: Any) -> list[Any]:
    return [await c.write_register(120, 800, device_id=1),
            await c.write_register(121, 805, device_id=1),
            await c.write_registers(150, [1, 2, 3], device_id=2),
            await c.write_coil(10, True, device_id=1),
            await c.read_holding_registers(120, count=2, device_id=1)]


async def historian_body(c: Any) -> list[Any]:
    return [await c.read_input_registers(100, count=20, device_id=2) for _ in range(3)]


async def test_learn_from_a_real_monitor_mode_recording(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy, tmp_path: Path
) -> None:
    h = await start_proxy(plc.port, policy=RECORDING_POLICY, allowed_requests="info")
    port = h.port
    for who, body in ((pki.operator, operator_body), (pki.engineer, engineer_body),
                      (pki.norole, historian_body)):
        results = await in_thread(port, pki.client_ctx(who), body)
        assert not any(r.isError() for r in results)  # monitor mode forwards everything
    await h.wait_event("modbus-request", lambda e: e.get("modbus.function_code") == 4
                       and e.get("modbus.decision") == "would_deny"
                       and "allowed" in e.get("event.type", ()))
    log = tmp_path / "recorded.jsonl"
    log.write_text("\n".join(h.sink.lines) + "\n")
    if dest := os.environ.get("MBSEC_WALKTHROUGH_EVENTS"):  # docs/adoption/events.jsonl.gz
        await trio.Path(dest).write_bytes(gzip.compress(log.read_bytes(), mtime=0))
    recorded = records(log)
    assert {r.decision for r in recorded} == {"allow", "would_deny"}
    assert len(recorded) == 9 + 5 + 3  # one record per request, monitor outcomes folded in
    assert {r.who.role for r in recorded} == {"operator", "engineer", None}

    proposal = tmp_path / "proposal.yaml"
    rc, _, err = run(["learn", str(log), "-o", str(proposal)])
    assert rc == 0, err
    assert "learned from 17 request(s)" in err
    assert run(["check", "--strict", str(proposal)])[0] == 0
    rc, out, _ = run(["test", str(proposal)])
    assert rc == 0 and " 0 failed" in out
    text = proposal.read_text()
    assert 'match: {subject_cn: "norole-1", issuer: ' in text  # no role: its identity
    assert 'addresses: ["0-19"]' in text  # two adjacent polls, one range
    assert "- {addresses: \"120-121\", min: 800, max: 805}" in text
    assert "coil_states: [on]" in text

    # the recording replayed: nothing that went through would now be refused
    rc, out, _ = run(["replay", str(proposal), str(log), "--compare", "forwarding",
                      "--exit-code"])
    assert rc == 0, out
    assert "0 of 17 request(s) would be decided differently" in out
    replayer = Replayer(load_policy_text(text, "p.yaml", strict=True))
    result = replayer.run(recorded)
    assert set(result.transitions) == {("allow", "allow"), ("would_deny", "allow")}

    # a tightened policy (the engineer's register writes dropped) changes decisions: exit 1
    tight = tmp_path / "tight.yaml"
    tight.write_text(text.replace("functions: [write_single_register]",
                                  "functions: [write_single_register]\n    sources: [10.9.9.9]"))
    rc, out, _ = run(["replay", str(tight), str(log), "--exit-code"])
    assert rc == 1
    assert "would_deny -> deny" in out and "changed" in out
    assert "default" in out and "engineer" in out

    # enforced by a real proxy: the recorded traffic passes, a neighbour does not
    enforced = await start_proxy(plc.port, policy=text, allowed_requests="info")
    for who, body in ((pki.operator, operator_body), (pki.engineer, engineer_body),
                      (pki.norole, historian_body)):
        results = await in_thread(enforced.port, pki.client_ctx(who), body)
        assert not any(r.isError() for r in results)

    async def neighbours(c: Any) -> list[Any]:
        return [await c.write_register(122, 800, device_id=1),
                await c.write_register(120, 886, device_id=1),
                await c.read_holding_registers(120, count=3, device_id=1)]

    denied = await in_thread(enforced.port, pki.client_ctx(pki.engineer), neighbours)
    assert [r.isError() for r in denied] == [True, True, True]
    assert [r.exception_code for r in denied] == [1, 1, 1]


# -- streams and bad input -------------------------------------------------------------------


OP = Who(role="operator", cn="op-1", issuer="CN=Test CA")


def test_gzip_stdin_and_bad_lines_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = EventLog()
    for a in (0, 10, 30):
        log.request(OP, ["operator"], 1, build_access(3, address=a, quantity=10), "allow", "r")
    raw = (log.text() + "not json\n[1, 2]\n{\"no\": \"action\"}\n").encode()
    gz = tmp_path / "ev.jsonl.gz"
    gz.write_bytes(gzip.compress(raw))

    class Stdin:
        buffer = io.BufferedReader(io.BytesIO(gzip.compress(raw)))  # type: ignore[arg-type]

    monkeypatch.setattr("sys.stdin", Stdin)
    for arg in (str(gz), "-"):
        rc, out, err = run(["learn", arg, "--gap", "10"])
        assert rc == 0, err
        assert 'addresses: ["0-39"]' in out  # 20-29 is a gap of 10: merged
        assert "skipped 3 line(s) that are not JSON events (2 not JSON, 1 without " \
               "event.action; first at" in err
    rc, out, _ = run(["learn", str(gz), "--gap", "9"])
    assert 'addresses: ["0-19", "30-39"]' in out


def test_unreadable_and_empty_input_are_one_line_errors(tmp_path: Path) -> None:
    rc, out, err = run(["learn", str(tmp_path / "missing.jsonl")])
    assert rc == 1 and out == ""
    assert err.strip().splitlines()[-1] == \
        f"mbsec policy learn: error: cannot read {tmp_path / 'missing.jsonl'}: " \
        "No such file or directory"
    junk = tmp_path / "junk.txt"
    junk.write_text("hello\nworld\n")
    rc, _, err = run(["learn", str(junk)])
    assert rc == 1
    assert "skipped 2 line(s) that are not JSON events" in err
    assert err.strip().splitlines()[-1].startswith("mbsec policy learn: error: nothing to learn")
    rc, _, err = run(["learn", str(junk), "--gap", "-1"])
    assert rc == 2 and "must be 0 or more" in err


def test_refused_requests_are_not_learned_and_values_cut_are_not_bounded(
    tmp_path: Path
) -> None:
    log = EventLog()
    log.request(OP, ["operator"], 1, build_access(3, address=0, quantity=5), "allow", "r")
    log.request(OP, ["operator"], 1, build_access(6, address=7, values=(1,)), "deny", "default")
    log.request(OP, ["operator"], 1, build_access(16, address=100, values=tuple(range(40))),
                "allow", "r")
    path = tmp_path / "ev.jsonl"
    path.write_text(log.text())
    rc, out, err = run(["learn", str(path)])
    assert rc == 0, err
    assert "write_single_register" not in out.split("tests:")[0]
    assert "# Not learned: 1 request(s) the recording policy refused (rule default: 1)" in out
    assert "# values not bounded: 1 request(s) wrote more values than the events keep" in out
    policy = load_policy_text(out, strict=True)
    assert all(r.passed for r in run_cases(policy))
    result = Replayer(policy).run(records(path))  # an enforce-mode recording: no change at all
    assert result.transitions == {("allow", "allow"): 2, ("deny", "deny"): 1}
    assert result.changed == 0


def test_by_identity_gives_each_certificate_its_own_role(tmp_path: Path) -> None:
    log = EventLog()
    op2 = Who(role="operator", cn="op-2", issuer="CN=Test CA")
    log.request(OP, ["operator"], 1, build_access(3, address=0, quantity=5), "allow", "r")
    log.request(op2, ["operator"], 1, build_access(3, address=50, quantity=5), "allow", "r")
    path = tmp_path / "ev.jsonl"
    path.write_text(log.text())
    rc, out, _ = run(["learn", str(path), "--by", "identity"])
    assert rc == 0
    assert out.count("match: {subject_cn:") == 2
    policy = load_policy_text(out, strict=True)
    who2 = Who(role="operator", cn="op-2", issuer="CN=Test CA").identity()
    p2 = policy.principal(who2, "10.0.0.5")
    assert policy.evaluate(p2, 1, build_access(3, address=50, quantity=5)).outcome == "allow"
    assert policy.evaluate(p2, 1, build_access(3, address=0, quantity=5)).outcome == "deny"


# -- nothing beyond the stated gap and margin -----------------------------------------------

ROLES = ("operator", "engineer")
FCS = (3, 4, 6, 16, 5, 1)
QMAX = {1: 2000, 3: 125, 4: 125, 16: 123}


@st.composite
def recordings(draw: st.DrawFn) -> list[tuple[str, int, int, int, int, tuple[int, ...]]]:
    """A few (role, unit, function) keys with several requests each, close together, so that
    holes of every size near the gap occur."""
    keys = draw(st.lists(st.tuples(st.sampled_from(ROLES), st.sampled_from((1, 2)),
                                   st.sampled_from(FCS)), min_size=1, max_size=3, unique=True))
    out = []
    for _ in range(draw(st.integers(1, 12))):
        role, unit, fc = draw(st.sampled_from(keys))
        address = draw(st.integers(0, 40))
        qty = 1 if fc in (5, 6) else draw(st.integers(1, 5))
        if fc in (6, 16):
            values = tuple(draw(st.lists(st.integers(0, 2000), min_size=qty, max_size=qty)))
        elif fc == 5:
            values = (draw(st.sampled_from((0, 1))),)
        else:
            values = ()
        out.append((role, unit, fc, address, qty, values))
    return out


def _access(fc: int, address: int, qty: int, values: tuple[int, ...]) -> Any:
    if fc in (5, 6, 16):
        return build_access(fc, address=address, values=values or (0,) * qty)
    return build_access(fc, address=address, quantity=qty)


def _groups(recs: list[tuple[str, int, int, int, int, tuple[int, ...]]], gap: int
            ) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The envelope, from the recording alone: merged address ranges (a hole joins when it is
    at most ``gap`` addresses), the largest quantity, values per merged range, coil states."""
    out: dict[tuple[str, int, int], dict[str, Any]] = {}
    for role, unit, fc, address, qty, values in recs:
        g = out.setdefault((role, unit, fc), {"addrs": set(), "q": 0, "vals": {},
                                              "coils": set()})
        g["addrs"].update(range(address, address + qty))
        g["q"] = max(g["q"], qty)
        for i, v in enumerate(values):
            if fc == 5:
                g["coils"].add(v)
            else:
                g["vals"].setdefault(address + i, []).append(v)
    for g in out.values():
        ranges: list[list[int]] = []
        for a in sorted(g["addrs"]):
            if ranges and a - ranges[-1][1] - 1 <= gap:
                ranges[-1][1] = a
            else:
                ranges.append([a, a])
        g["ranges"] = ranges
    return out


def _bounds(g: dict[str, Any], rng: list[int], margin: int) -> tuple[int, int]:
    seen = [v for a, vs in g["vals"].items() if rng[0] <= a <= rng[1] for v in vs]
    return min(seen) * (100 - margin) // 100, min(0xFFFF, -(-max(seen) * (100 + margin) // 100))


def _within(g: dict[str, Any], fc: int, address: int, qty: int, values: tuple[int, ...],
            margin: int) -> bool:
    end = address + qty - 1
    rng = next((r for r in g["ranges"] if r[0] <= address and end <= r[1]), None)
    if rng is None:
        return False
    if fc in QMAX and qty > min(QMAX[fc], -(-g["q"] * (100 + margin) // 100)):
        return False
    if fc == 5:
        return values[0] in g["coils"]
    if fc in (6, 16):
        lo, hi = _bounds(g, rng, margin)
        return all(lo <= v <= hi for v in values)
    return True


def _probes(envelope: dict[tuple[str, int, int], dict[str, Any]], margin: int
            ) -> list[tuple[str, int, int, int, int, tuple[int, ...]]]:
    """Neighbours of the recording: every range edge and hole (inside and just outside),
    the quantity bound and one more, the value bounds and one beyond, the other coil state,
    the other functions and the other unit at the same address."""
    out = []
    for (role, unit, fc), g in envelope.items():
        addrs = sorted(g["addrs"])
        edges = {addrs[0] - 1, addrs[-1] + 1, *(a + 1 for a in addrs), *(a - 1 for a in addrs)}
        v0 = next(iter(g["vals"].values()), [100])[0]
        c0 = next(iter(g["coils"]), 1)
        for a in sorted(x for x in edges if x >= 0):
            out.append((role, unit, fc, a, 1, (c0,) if fc == 5 else (v0,) if fc in (6, 16)
                        else ()))
        for rng in g["ranges"]:
            if fc in QMAX:
                q = min(QMAX[fc], -(-g["q"] * (100 + margin) // 100))
                for qq in (q, q + 1):
                    if qq <= QMAX[fc]:
                        vals = (v0,) * qq if fc == 16 else ()
                        out.append((role, unit, fc, rng[0], qq, vals))
            if fc in (6, 16):
                lo, hi = _bounds(g, rng, margin)
                for v in {lo - 1, lo, hi, hi + 1}:
                    if 0 <= v <= 0xFFFF:
                        out.append((role, unit, fc, rng[0], 1, (v,)))
            if fc == 5:
                out.append((role, unit, fc, rng[0], 1, (1 - c0,)))
        for other in FCS:
            vals = (c0,) if other == 5 else (v0,) if other in (6, 16) else ()
            out.append((role, unit, other, addrs[0], 1, vals))
        out.append((role, 3 - unit, fc, addrs[0], 1, (c0,) if fc == 5 else
                    (v0,) if fc in (6, 16) else ()))
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recording=recordings(),
       gap=st.sampled_from((0, 1, 2, 5)), margin=st.sampled_from((0, 10, 50)))
def test_the_proposal_allows_the_recording_and_nothing_beyond_gap_and_margin(
    recording: list[tuple[str, int, int, int, int, tuple[int, ...]]], gap: int, margin: int,
) -> None:
    log = EventLog()
    who = {r: Who(role=r, cn=f"{r}-1", issuer="CN=Test CA") for r in ROLES}
    for role, unit, fc, address, qty, values in recording:
        log.request(who[role], [role], unit, _access(fc, address, qty, values), "would_deny",
                    "default")
    recs = list(Reader()._file(io.BufferedReader(io.BytesIO(log.text().encode())),  # type: ignore[arg-type]
                               "<gen>"))
    learned = learn(recs, LearnOptions(gap=gap, margin=margin), verify=False)
    policy = load_policy_text(learned.text, strict=True)
    assert all(r.passed for r in run_cases(policy))
    result = Replayer(policy).run(recs)
    assert set(result.transitions) == {("would_deny", "allow")}  # every recorded request
    envelope = _groups(recording, gap)
    principals = {r: policy.principal(who[r].identity(), "10.0.0.5") for r in ROLES}
    for role, unit, fc, address, qty, vals in _probes(envelope, margin):
        d = policy.evaluate(principals[role], unit, _access(fc, address, qty, vals))
        g = envelope.get((role, unit, fc))
        inside = g is not None and _within(g, fc, address, qty, vals, margin)
        assert (d.outcome == "allow") == inside, (role, unit, fc, address, qty, vals, d)


def test_merge_with_gap() -> None:
    assert merge_with_gap([(10, 12), (0, 4), (6, 8)], 0) == [(0, 4), (6, 8), (10, 12)]
    assert merge_with_gap([(10, 12), (0, 4), (6, 8)], 1) == [(0, 12)]
    assert merge_with_gap([(0, 4), (3, 9)], 0) == [(0, 9)]


def test_the_proposal_is_stable_yaml_for_review(tmp_path: Path) -> None:
    """Same recording, same proposal (a reviewer diffs two runs), each rule commented."""
    log = EventLog()
    for a in (0, 5):
        log.request(OP, ["operator"], 1, build_access(3, address=a, quantity=5), "allow", "r")
    path = tmp_path / "ev.jsonl"
    path.write_text(log.text())
    first, second = run(["learn", str(path)])[1], run(["learn", str(path)])[1]
    assert first == second
    assert "  # 2 request(s), 2026-12-01T08:00:01Z .. 2026-12-01T08:00:02Z, from 10.0.0.5\n" \
        "  - id: operator-plc-read_holding_registers\n" in first
    assert json.loads(json.dumps(first))  # plain text, no binary



def test_every_kind_of_request_is_learned_strict_clean(tmp_path: Path) -> None:
    """FC23's two ranges, sub-functions, MEI types, masks, coils, file records, FIFO, no-address
    functions and a vendor code: the proposal loads strictly, passes its tests, allows all."""
    log = EventLog()
    eng = Who(role="engineer", cn="eng-1", issuer="CN=Test CA")
    requests = [
        build_access(23, address=0, quantity=4, write_address=200, values=(7, 8)),
        build_access(8, subfunction=0), build_access(8, subfunction=11),
        build_access(43, subfunction=14), build_access(22, address=30, values=(0xFF00, 0x12)),
        build_access(15, address=40, values=(1, 0, 1)), build_access(2, address=0, quantity=16),
        build_access(24, address=500), build_access(20, address=3, quantity=10),
        build_access(21, address=3, values=(1, 2)), build_access(7), build_access(17),
        build_access(100),
        build_access(16, address=40001 - 40001 + 40005, values=(1,)),  # looks like 4xxxx
    ]
    for a in requests:
        log.request(eng, ["engineer"], 1, a, "allow", "r")
    path = tmp_path / "ev.jsonl"
    path.write_text(log.text())
    rc, out, err = run(["learn", str(path), "--margin", "20"])
    assert rc == 0, err
    assert "functions: [100]" in out and "mei_types: [14]" in out
    assert "subfunctions: [0, 11]" in out
    assert 'read_addresses: ["0-3"]' in out and 'write_addresses: ["200-201"]' in out
    assert 'addresses: ["0x9c45"]' in out  # 40005 in hex: never read as a register number
    assert "# mask values are not bounded" in out
    assert "coil_states: [on, off]" in out
    policy = load_policy_text(out, strict=True)
    assert all(r.passed for r in run_cases(policy))
    assert Replayer(policy).run(records(path)).transitions == {("allow", "allow"): 14}
