"""Engine semantics: first match wins, fall-through on ranges, monitor mode, who/where/what."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest

from mbsec.identity import PeerIdentity
from mbsec.modbus import encode_request, parse_request
from mbsec.modbus.pdu import ReadWriteMultipleRegistersRequest
from mbsec.policy import Decision, Policy, load_policy_text
from mbsec.policy.cases import Who, build_access

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def ident(role: str | None = None, cn: str | None = "client", **kw: object) -> PeerIdentity:
    fields: dict[str, object] = dict(
        subject=f"CN={cn}", common_name=cn, organizational_units=(), san_dns=(), san_ip=(),
        san_uri=(), issuer="CN=mbsec CA", serial=7, fingerprint_sha256="ab" * 32,
        not_before=T0, not_after=T0 + dt.timedelta(days=1), role=role)
    fields.update(kw)
    return PeerIdentity(**fields)  # type: ignore[arg-type]


def policy(body: str, mode: str = "enforce") -> Policy:
    text = f"version: 1\ndefault: deny\nmode: {mode}\n" + textwrap.dedent(body)
    return load_policy_text(text, "t.yaml")


def decide(p: Policy, role: str | None, unit: int, fc: int, *, source: str = "10.0.0.1",
           **kw: object) -> Decision:
    principal = p.principal(ident(role), source)
    return p.evaluate(principal, unit, build_access(fc, **kw))  # type: ignore[arg-type]


BASIC = """\
targets:
  line1: {unit_ids: [1, 2], upstream: "10.20.0.5:502"}
  line2: {unit_ids: [3]}
rules:
  - id: op-read
    description: operators read 0-99
    roles: [operator]
    targets: [line1]
    functions: [read_holding_registers]
    addresses: ["0-99"]
    max_response_bytes: 200
  - id: op-read-wide
    description: operators read 100-199 on any unit, small reads only
    roles: [operator]
    functions: [3]
    addresses: ["100-199"]
    max_quantity: 10
  - id: block-writes
    description: nobody writes
    action: deny
    functions: [write_single_register, write_multiple_registers]
    exception_code: 2
"""


def test_allow_names_rule_target_and_response_limit() -> None:
    d = decide(policy(BASIC), "operator", 1, 3, address=0, quantity=10)
    assert d == Decision(True, "allow", "op-read", 1, "allowed_by_rule", "line1", 200)


def test_default_deny_names_default_and_exception_01() -> None:
    d = decide(policy(BASIC), "operator", 1, 4)
    assert d == Decision(False, "deny", "default", 1, "no_matching_rule", "line1", None)


def test_deny_rule_exception_code() -> None:
    d = decide(policy(BASIC), "operator", 3, 6, address=5, values=(1,))
    assert (d.allowed, d.outcome, d.rule_id, d.exception_code, d.target) == \
        (False, "deny", "block-writes", 2, "line2")


def test_out_of_range_falls_through_to_later_rules() -> None:
    p = policy(BASIC)
    # 95+10 straddles op-read's end: falls through; op-read-wide covers 100-199 only
    assert decide(p, "operator", 1, 3, address=95, quantity=10).rule_id == "default"
    assert decide(p, "operator", 1, 3, address=100, quantity=10).rule_id == "op-read-wide"
    # too large for op-read-wide's max_quantity: falls through to default
    assert decide(p, "operator", 1, 3, address=100, quantity=11).rule_id == "default"


def test_where_unit_and_target() -> None:
    p = policy(BASIC)
    assert decide(p, "operator", 3, 3, address=0).rule_id == "default"
    assert decide(p, "operator", 9, 3, address=0).target is None


def test_first_match_wins() -> None:
    p = policy("""\
        rules:
          - {id: deny-first, description: d, action: deny, roles: [a], functions: [3]}
          - {id: allow-later, description: d, roles: [a], functions: [3], unit_ids: [1]}
    """)
    assert decide(p, "a", 1, 3).rule_id == "deny-first"
    assert p.warnings  # the allow rule is shadowed


def test_fc23_read_and_write_ranges_are_checked_separately() -> None:
    p = policy("""\
        rules:
          - id: rw
            description: read 0-99, write 500-509
            roles: [eng]
            functions: [read_write_multiple_registers]
            read_addresses: ["0-99"]
            write_addresses: ["500-509"]
    """)
    ok = build_access(23, address=0, quantity=10, write_address=500, values=(1, 2))
    assert p.evaluate(p.principal(ident("eng"), "10.0.0.1"), 1, ok).rule_id == "rw"
    swapped = build_access(23, address=500, quantity=2, write_address=0, values=(1,))
    assert p.evaluate(p.principal(ident("eng"), "10.0.0.1"), 1, swapped).rule_id == "default"
    # the same decision for a request that came off the wire
    wire = parse_request(encode_request(ReadWriteMultipleRegistersRequest(0, 10, 505, (1,) * 6)))
    assert p.evaluate(p.principal(ident("eng"), "10.0.0.1"), 1, wire.access()).rule_id == \
        "default"  # 505+6 ends at 510, outside 500-509


VALUES = """\
rules:
  - id: sp
    description: setpoints
    roles: [eng]
    functions: [write_single_register, write_multiple_registers]
    addresses: ["100-199"]
    values:
      - {addresses: "100-149", min: 0, max: 1500}
      - {addresses: "150-199", min: -50, max: 50, signed: true}
"""


@pytest.mark.parametrize("address,values,rule", [
    (100, (0,), "sp"), (149, (1500,), "sp"), (149, (1501,), "default"),
    (150, (0xFFCE,), "sp"),           # -50 as int16
    (150, (0xFFCD,), "default"),      # -51
    (150, (51,), "default"),
    (148, (10, 20, 30), "sp"),        # spans both blocks, all in bounds
    (148, (10, 20, 60), "default"),   # third value (150) above 50
    (198, (1, 2, 3), "default"),      # runs past 199
])
def test_value_ranges_per_address(address: int, values: tuple[int, ...], rule: str) -> None:
    p = policy(VALUES)
    fc = 6 if len(values) == 1 else 16
    assert decide(p, "eng", 1, fc, address=address, values=values).rule_id == rule


def test_coil_states() -> None:
    p = policy("""\
        rules:
          - {id: on-only, description: d, roles: [a], functions: [5, 15], coil_states: [on]}
    """)
    assert decide(p, "a", 1, 5, values=(1,)).rule_id == "on-only"
    assert decide(p, "a", 1, 5, values=(0,)).rule_id == "default"
    assert decide(p, "a", 1, 15, values=(1, 1, 0)).rule_id == "default"
    assert decide(p, "a", 1, 15, values=(1, 1)).rule_id == "on-only"


def test_diagnostics_subfunctions_and_mei_types() -> None:
    p = policy("""\
        rules:
          - {id: diag, description: d, roles: [v], functions: [diagnostics],
             subfunctions: [return_query_data, 11]}
          - {id: devid, description: d, roles: [v], functions: [read_device_identification]}
          - {id: mei, description: d, roles: [w], functions: [43], mei_types: [13]}
    """)
    assert decide(p, "v", 1, 8, subfunction=0).rule_id == "diag"
    assert decide(p, "v", 1, 8, subfunction=11).rule_id == "diag"
    assert decide(p, "v", 1, 8, subfunction=1).rule_id == "default"
    assert decide(p, "v", 1, 43, subfunction=14).rule_id == "devid"
    assert decide(p, "v", 1, 43, subfunction=13).rule_id == "default"
    assert decide(p, "w", 1, 43, subfunction=13).rule_id == "mei"
    assert decide(p, "w", 1, 43, subfunction=14).rule_id == "default"


def test_presets() -> None:
    p = policy("rules:\n  - {id: ro, description: d, roles: [a], functions: [read-only]}\n"
               "  - {id: rw, description: d, roles: [b], functions: [read-write]}\n")
    ro = {1, 2, 3, 4, 7, 11, 12, 17, 20, 24, 43}
    assert set(p.rules[0].functions) == ro and p.rules[0].functions[43] == frozenset({14})
    assert set(p.rules[1].functions) == ro | {5, 6, 15, 16, 21, 22, 23}
    assert decide(p, "a", 1, 6, values=(1,)).rule_id == "default"
    assert decide(p, "b", 1, 6, values=(1,)).rule_id == "rw"


def test_max_request_bytes() -> None:
    p = policy("rules:\n  - {id: small, description: d, roles: [a], functions: [16],"
               " max_request_bytes: 10}\n")
    assert decide(p, "a", 1, 16, values=(1, 2)).rule_id == "small"       # 6 + 4 = 10 B
    assert decide(p, "a", 1, 16, values=(1, 2, 3)).rule_id == "default"  # 12 B


def test_opaque_function_by_number() -> None:
    p = policy("rules:\n  - {id: vendor, description: d, roles: [a], functions: [100]}\n")
    assert decide(p, "a", 1, 100).rule_id == "vendor"
    assert decide(p, "a", 1, 101).rule_id == "default"


def test_monitor_mode_file_level() -> None:
    p = policy(BASIC, mode="monitor")
    d = decide(p, "operator", 1, 6, values=(1,))
    assert (d.allowed, d.outcome, d.rule_id, d.exception_code) == \
        (True, "would_deny", "block-writes", 2)
    d = decide(p, "nobody", 1, 3)
    assert (d.allowed, d.outcome, d.rule_id) == (True, "would_deny", "default")
    assert decide(p, "operator", 1, 3).outcome == "allow"


def test_monitor_mode_per_rule() -> None:
    p = policy("""\
        rules:
          - {id: trial, description: d, action: deny, mode: monitor, functions: [6]}
          - {id: hard, description: d, action: deny, functions: [16]}
    """)
    assert decide(p, "x", 1, 6, values=(1,)).outcome == "would_deny"
    assert decide(p, "x", 1, 16, values=(1,)).outcome == "deny"
    assert decide(p, "x", 1, 3).outcome == "deny"
    p2 = policy("rules:\n  - {id: e, description: d, action: deny, mode: enforce,"
                " functions: [6]}\n", mode="monitor")
    assert decide(p2, "x", 1, 6, values=(1,)).outcome == "deny"


def test_sources_and_ipv4_mapped_addresses() -> None:
    p = policy("rules:\n  - {id: net, description: d, roles: [a], sources: [10.1.0.0/16, "
               "'2001:db8::/32'], functions: [3]}\n")
    assert decide(p, "a", 1, 3, source="10.1.2.3").rule_id == "net"
    assert decide(p, "a", 1, 3, source="::ffff:10.1.2.3").rule_id == "net"
    assert decide(p, "a", 1, 3, source="2001:db8::5").rule_id == "net"
    assert decide(p, "a", 1, 3, source="10.2.0.1").rule_id == "default"


def test_sources_without_roles_means_any_client_from_there() -> None:
    p = policy("rules:\n  - {id: net, description: d, sources: [10.1.0.0/16], functions: [3]}\n")
    assert decide(p, None, 1, 3, source="10.1.0.9").rule_id == "net"


IDENT = """\
identities:
  - match: {subject_cn: historian-01}
    roles: [historian]
  - match: {san_dns: [hist.example], issuer: "CN=mbsec CA"}
    roles: [historian, auditor]
  - match: {fingerprint_sha256: "FP"}
    roles: [pinned]
rules:
  - {id: hist, description: d, roles: [historian], functions: [4]}
""".replace("FP", ":".join(["AB"] * 32))


def test_identities_map_certificate_facts_to_roles() -> None:
    p = policy(IDENT)
    assert p.roles_for(ident(None, "historian-01", fingerprint_sha256="cd" * 32)) == \
        {"historian"}
    assert p.roles_for(ident("operator", "x", san_dns=("HIST.example",),
                             fingerprint_sha256="cd" * 32)) == {"operator", "historian", "auditor"}
    assert p.roles_for(ident(None, "x", san_dns=("hist.example",), issuer="CN=other",
                             fingerprint_sha256="cd" * 32)) == frozenset()
    assert "pinned" in p.roles_for(ident(None, "x"))  # fingerprint "ab"*32
    assert p.roles_for(None) == frozenset()


def test_principal_key_and_fields() -> None:
    p = policy(IDENT)
    pr = p.principal(ident("operator", "hmi-1", fingerprint_sha256="EF" * 32), "10.0.0.9")
    assert pr.key == "ef" * 32 and pr.common_name == "hmi-1" and pr.source_ip == "10.0.0.9"
    anon = p.principal(None, "::ffff:192.0.2.1")
    assert anon.key == "ip:192.0.2.1" and anon.roles == frozenset() and anon.common_name is None


def test_principal_from_another_policy_is_re_evaluated() -> None:
    """After a reload, a connection's old principal must get the new policy's answer."""
    old = policy("rules:\n  - {id: r, description: d, roles: [a], functions: [3]}\n")
    new = policy("rules: []\n")
    pr = old.principal(ident("a"), "10.0.0.1")
    acc = build_access(3)
    assert old.evaluate(pr, 1, acc).rule_id == "r"
    assert new.evaluate(pr, 1, acc).rule_id == "default"


def test_evaluate_is_pure_and_repeatable() -> None:
    p = policy(BASIC)
    pr = p.principal(ident("operator"), "10.0.0.1")
    acc = build_access(3, address=0, quantity=5)
    assert {p.evaluate(pr, 1, acc) for _ in range(5)} == {p.evaluate(pr, 1, acc)}


def test_who_label_and_anonymous_case() -> None:
    assert Who(anonymous=True).identity() is None
    assert Who(role="a", cn="b").label() == "role=a cn=b"


def test_san_ip_matching_is_canonical() -> None:
    p = policy("identities:\n  - {match: {san_ip: '2001:db8::1'}, roles: [r]}\nrules: []\n")
    assert p.roles_for(ident(None, san_ip=("2001:DB8:0::1",))) == {"r"}
    assert p.roles_for(ident(None, san_ip=("garbage",))) == frozenset()


def test_principal_is_remembered_per_certificate_and_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One principal per (certificate, address), as a plant's masters reconnect; never one
    made for other facts or another address, and the memory is bounded."""
    import mbsec.policy.engine as engine

    p = policy(BASIC)
    op = ident("operator", fingerprint_sha256="cd" * 32)
    first = p.principal(op, "10.0.0.1")
    assert p.principal(op, "10.0.0.1") is first
    elsewhere = p.principal(op, "10.0.0.2")
    assert elsewhere is not first and elsewhere.source_ip == "10.0.0.2"
    # the same fingerprint with other facts (never in practice) is not answered from memory
    other = ident("engineer", fingerprint_sha256="cd" * 32)
    assert p.principal(other, "10.0.0.1").roles == frozenset({"engineer"})
    assert decide(p, "operator", 1, 3, address=0, quantity=5).rule_id == "op-read"
    assert decide(p, "engineer", 1, 3, address=0, quantity=5).rule_id == "default"
    monkeypatch.setattr(engine, "PRINCIPAL_CACHE_MAX", 3)
    for i in range(10):
        p.principal(op, f"10.0.1.{i}")
    assert len(p._principals) <= 3
    assert p.principal(op, "10.0.1.9") is p.principal(op, "10.0.1.9")
