"""Validation: every mistake an admin can make is an error (or warning) at file:line:col."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mbsec.policy import Diagnostic, PolicyError, load_policy, load_policy_text

HEAD = "version: 1\ndefault: deny\n"


def diags(text: str, *, strict: bool = False) -> list[Diagnostic]:
    with pytest.raises(PolicyError) as exc:
        load_policy_text(textwrap.dedent(text), "p.yaml", strict=strict)
    return exc.value.diagnostics


def one_error(text: str) -> Diagnostic:
    errors = [d for d in diags(text) if d.severity == "error"]
    assert len(errors) == 1, [str(d) for d in errors]
    return errors[0]


def rule(body: str) -> str:
    base = "  - id: r1\n    description: test rule\n"
    return HEAD + "rules:\n" + base + textwrap.indent(textwrap.dedent(body), "    ")


def test_minimal_file_loads() -> None:
    p = load_policy_text(HEAD + "rules: []\n")
    assert p.rules == () and p.warnings == ()


def test_missing_default_is_an_error_with_fix() -> None:
    d = one_error("version: 1\nrules: []\n")
    assert "does not state its default" in d.message
    assert d.hint is not None and "default: deny" in d.hint
    assert (d.file, d.line, d.col) == ("p.yaml", 1, 1)


def test_default_allow_is_refused() -> None:
    d = one_error("version: 1\ndefault: allow\nrules: []\n")
    assert d.line == 2 and "must be 'deny'" in d.message


def test_unknown_key_suggests_the_right_one() -> None:
    d = one_error(rule("""\
        roles: [operator]
        functions: [3]
        adresses: ["0-9"]
    """))
    assert d.message == "unknown key 'adresses'"
    assert d.hint is not None and "did you mean 'addresses'" in d.hint
    assert (d.line, d.col) == (8, 5)


def test_misspelt_required_key_is_one_error() -> None:
    """'functons' is one mistake: not also "missing required key 'functions'"."""
    d = one_error(rule("""\
        roles: [operator]
        functons: [3]
    """))
    assert d.message == "unknown key 'functons'"
    assert d.hint is not None and "did you mean 'functions'" in d.hint


def test_unknown_key_in_nested_mapping() -> None:
    d = one_error(HEAD + "targets:\n  plc: {unit_ids: [1], upstrem: 'a:502'}\nrules: []\n")
    assert "upstrem" in d.message and d.hint is not None and "upstream" in d.hint
    assert (d.line, d.col) == (4, 24)


def test_duplicate_key_is_an_error_not_last_wins() -> None:
    d = one_error(HEAD + "rules: []\ndefault: deny\n")
    assert "duplicate key 'default'" in d.message and "line 2" in d.message
    assert d.line == 4


def test_yaml_syntax_error_has_position() -> None:
    d = one_error(HEAD + "rules: [\n")
    assert d.message.startswith("YAML syntax error") and d.line >= 3


def test_an_unknown_yaml_tag_is_a_policy_error_with_its_position() -> None:
    # found by the atheris policy target: the tag error escaped as yaml's ConstructorError
    d = one_error(rule("""\
        roles: !operator]
        functions: [3]"""))
    assert d.message.startswith("YAML error") and "!operator]" in d.message
    assert d.line is not None and d.line > 1


def test_merge_keys_are_refused() -> None:
    d = one_error(HEAD + "x: &a {unit_ids: [1]}\ntargets:\n  t: {<<: *a}\nrules: []\n")
    assert "merge keys" in d.message


def test_not_a_mapping() -> None:
    assert "YAML mapping" in one_error("- 1\n- 2\n").message


def test_type_errors_name_the_value() -> None:
    d = one_error(rule("""\
        roles: [operator]
        functions: [3]
        max_quantity: lots
    """))
    assert "max_quantity" in d.message and "'lots'" in d.message and d.line == 8


def test_missing_rule_id_and_description() -> None:
    ds = diags(HEAD + "rules:\n  - roles: [a]\n    functions: [3]\n")
    msgs = " | ".join(d.message for d in ds)
    assert "missing required key 'id'" in msgs and "missing required key 'description'" in msgs
    assert all(d.line == 4 for d in ds)


def test_unknown_function_name_suggests() -> None:
    d = one_error(rule("roles: [a]\nfunctions: [read_holding_register]\n"))
    assert "unknown function 'read_holding_register'" in d.message
    assert d.hint == "did you mean 'read_holding_registers'?"
    assert (d.line, d.col) == (7, 17)


@pytest.mark.parametrize("code", [0, 128, 200])
def test_function_code_range(code: int) -> None:
    d = one_error(rule(f"roles: [a]\nfunctions: [{code}]\n"))
    assert "outside 1-127" in d.message


def test_register_numbers_are_flagged_with_the_fix() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [3]\naddresses: ["40001-40010"]\n'))
    assert "1-based register number" in d.message and "4xxxx" in d.message
    assert d.hint is not None and 'write "0-9"' in d.hint and "0x9c41-0x9c4a" in d.hint
    assert d.line == 8


@pytest.mark.parametrize("spelling,fix", [("30001", '"0"'), ("10005-10010", '"4-9"'),
                                          ("400001", '"0"'), ("40101", '"100"')])
def test_register_number_variants(spelling: str, fix: str) -> None:
    d = one_error(rule(f"roles: [a]\nfunctions: [3]\naddresses: [{spelling}]\n"))
    assert "register number" in d.message and d.hint is not None and f"write {fix}" in d.hint


def test_hex_is_the_escape_hatch_for_high_addresses() -> None:
    p = load_policy_text(rule('roles: [a]\nfunctions: [3]\naddresses: ["0x9C41-0x9C4A", 0xA000]\n'))
    assert p.rules[0].read_ranges == ((40001, 40010), (40960, 40960))


def test_plain_high_addresses_outside_the_patterns_are_fine() -> None:
    p = load_policy_text(rule('roles: [a]\nfunctions: [3]\naddresses: ["20000-20099", 40000]\n'))
    assert p.rules[0].read_ranges == ((20000, 20099), (40000, 40000))


def test_inverted_range() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [3]\naddresses: ["10-5"]\n'))
    assert "inverted range" in d.message and d.hint == 'write "5-10"'


def test_overlapping_ranges_in_one_rule() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [3]\naddresses: ["0-20", "15-30"]\n'))
    assert "overlaps" in d.message and d.col > 20


def test_adjacent_ranges_are_merged() -> None:
    p = load_policy_text(rule('roles: [a]\nfunctions: [3]\naddresses: ["0-9", "10-19", 30]\n'))
    assert p.rules[0].read_ranges == ((0, 19), (30, 30))


def test_address_beyond_65535() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [3]\naddresses: ["0-70000"]\n'))
    assert "65535" in d.message


def test_allow_rule_must_say_who() -> None:
    d = one_error(rule("functions: [3]\n"))
    assert "does not say who" in d.message and d.hint is not None and "roles" in d.hint


def test_star_role_means_anyone() -> None:
    p = load_policy_text(rule("roles: ['*']\nfunctions: [3]\n"))
    assert p.rules[0].roles is None


def test_deny_rule_may_omit_roles() -> None:
    p = load_policy_text(rule("action: deny\nfunctions: [3]\nexception_code: 2\n"))
    assert p.rules[0].roles is None and p.rules[0].exception_code == 2


def test_exception_code_on_allow_rule_is_an_error() -> None:
    assert "only applies to deny" in one_error(
        rule("roles: [a]\nfunctions: [3]\nexception_code: 2\n")).message


def test_invalid_exception_code() -> None:
    assert "not a Modbus exception code" in one_error(
        rule("action: deny\nfunctions: [3]\nexception_code: 7\n")).message


def test_unknown_target_suggests() -> None:
    text = HEAD + "targets:\n  line1: {unit_ids: [1]}\nrules:\n  - id: r\n    description: d\n" \
        "    roles: [a]\n    targets: [lien1]\n    functions: [3]\n"
    d = one_error(text)
    assert "unknown target 'lien1'" in d.message and d.hint == "did you mean 'line1'?"


def test_source_with_host_bits() -> None:
    d = one_error(rule("roles: [a]\nsources: [10.0.0.1/8]\nfunctions: [3]\n"))
    assert "host bits" in d.message and d.hint is not None and "10.0.0.0/8" in d.hint


def test_half_restricted_allow_rule_is_an_error() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [read_write_multiple_registers]\n'
                       'write_addresses: ["0-9"]\n'))
    assert "leaves the reads" in d.message


def test_addresses_and_read_addresses_conflict() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [3]\naddresses: [1]\nread_addresses: [2]\n'))
    assert "already covers" in d.message


def test_values_need_a_register_write() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [3]\nvalues: {min: 0, max: 5}\n'))
    assert "bounds register writes" in d.message


def test_values_on_mask_write_are_refused() -> None:
    errors = [d.message for d in diags(rule(
        'roles: [a]\nfunctions: [6, 22]\nvalues: {min: 0, max: 5}\n'))]
    assert any("mask_write_register" in m for m in errors)


def test_value_bounds_checked() -> None:
    assert "above max" in one_error(rule(
        'roles: [a]\nfunctions: [6]\nvalues: [{min: 9, max: 5}]\n')).message
    d = one_error(rule('roles: [a]\nfunctions: [6]\nvalues: [{min: -5, max: 5}]\n'))
    assert d.hint is not None and "signed: true" in d.hint


def test_value_ranges_must_not_overlap() -> None:
    d = one_error(rule('roles: [a]\nfunctions: [6]\nvalues: [{addresses: "0-9", min: 0, max: 1},'
                       ' {addresses: "5-20", min: 0, max: 2}]\n'))
    assert "overlap" in d.message


def test_subfunctions_need_diagnostics() -> None:
    assert "needs function 8" in one_error(
        rule("roles: [a]\nfunctions: [3]\nsubfunctions: [0]\n")).message


def test_unknown_subfunction_name() -> None:
    d = one_error(rule("roles: [a]\nfunctions: [8]\nsubfunctions: [return_query_dat]\n"))
    assert "unknown FC08 sub-function" in d.message and d.hint is not None


def test_coil_states() -> None:
    p = load_policy_text(rule("roles: [a]\nfunctions: [5]\ncoil_states: [on]\n"))
    assert p.rules[0].coil_states == frozenset({1})
    assert "is not on or off" in one_error(
        rule("roles: [a]\nfunctions: [5]\ncoil_states: [maybe]\n")).message


def test_yaml_11_traps_are_closed() -> None:
    # 'on' stays a word, '010' is ten (not octal eight)
    p = load_policy_text(rule("roles: [a]\nfunctions: [5]\naddresses: [010]\n"
                              "coil_states: [on, off]\n"))
    assert p.rules[0].write_ranges == ((10, 10),)
    assert p.rules[0].coil_states == frozenset({0, 1})


def test_duplicate_rule_ids() -> None:
    text = rule("roles: [a]\nfunctions: [3]\n") + \
        "  - id: r1\n    description: again\n    roles: [b]\n    functions: [4]\n"
    d = one_error(text)
    assert "duplicate rule id 'r1'" in d.message and d.line == 8


def test_reserved_rule_id() -> None:
    text = HEAD + "rules:\n  - id: default\n    description: d\n    roles: [a]\n" \
        "    functions: [3]\n"
    assert "invalid rule id" in one_error(text).message


def test_shadowed_rule_is_a_warning_and_strict_makes_it_an_error() -> None:
    text = rule('roles: [a, b]\nfunctions: [read-only]\n') + \
        '  - id: r2\n    description: narrower\n    roles: [a]\n    functions: [3]\n' \
        '    addresses: ["0-9"]\n'
    p = load_policy_text(text, "p.yaml")
    assert len(p.warnings) == 1
    w = p.warnings[0]
    assert w.severity == "warning"
    assert "'r2' can never match" in w.message and "'r1'" in w.message and w.line == 8
    ds = diags(text, strict=True)
    assert [d.severity for d in ds] == ["error"]


@pytest.mark.parametrize("second", [
    "roles: [c]\nfunctions: [3]",                       # other role
    "roles: [a]\nfunctions: [6]",                       # other function
    "roles: [a]\nfunctions: [3]\nunit_ids: [1]",        # any address beats 0-9
])
def test_not_shadowed_when_earlier_rule_is_narrower(second: str) -> None:
    first = 'roles: [a]\nfunctions: [3]\naddresses: ["0-9"]\n'
    text = rule(first) + "  - id: r2\n    description: d\n" + textwrap.indent(second, "    ") + "\n"
    assert load_policy_text(text).warnings == ()


def test_shadowing_respects_sources_and_values() -> None:
    text = rule('roles: [a]\nsources: [10.0.0.0/8]\nfunctions: [6]\n'
                'values: {min: 0, max: 100}\n') + \
        "  - id: r2\n    description: d\n    roles: [a]\n    sources: [10.1.0.0/16]\n" \
        "    functions: [6]\n    values: {min: 5, max: 50}\n" \
        "  - id: r3\n    description: d\n    roles: [a]\n    functions: [6]\n" \
        "    values: {min: 5, max: 50}\n"
    p = load_policy_text(text)
    assert [str(w).split("rule ")[1].split(" ")[0] for w in p.warnings] == ["'r2'"]


def test_identities_validation() -> None:
    d = one_error(HEAD + "identities:\n  - match: {}\n    roles: [x]\nrules: []\n")
    assert "at least one certificate fact" in d.message
    d = one_error(HEAD + "identities:\n  - match: {fingerprint_sha256: abc}\n    roles: [x]\n"
                  "rules: []\n")
    assert "64 hex digits" in d.message


def test_limits_inherit_from_default() -> None:
    p = load_policy_text(HEAD + "limits:\n  default: {requests_per_second: 5, max_in_flight: 2}\n"
                         "  roles:\n    eng: {writes_per_second: 1}\nrules: []\n")
    lim = p.limit_for(frozenset({"eng"}))
    assert lim is not None and lim.requests_per_second == 5 and lim.writes_per_second == 1
    assert lim.max_in_flight == 2 and lim.burst == 5 and lim.write_burst == 1
    assert p.limit_for(frozenset()) == p.default_limit


def test_inline_test_errors() -> None:
    text = HEAD + "rules: []\ntests:\n  - {function: nope, expect: allow}\n" \
        "  - {function: 3, expect: allow, rule: missing}\n" \
        "  - {function: 3, quantity: 126, expect: deny}\n" \
        "  - {function: 3, target: nowhere, expect: deny}\n"
    ds = diags(text)
    assert [d.line for d in ds] == [5, 6, 7, 8]
    assert "rejects this request before policy" in ds[2].message


def test_inline_test_schema_error() -> None:
    d = one_error(HEAD + "rules: []\ntests:\n  - {function: 3, expect: maybe}\n")
    assert d.line == 5 and "expect" in d.message


def test_all_errors_are_reported_at_once_in_line_order() -> None:
    ds = diags(rule('roles: [a]\nfunctions: [nope, 3]\naddresses: ["40001", "9-1"]\n'))
    assert len(ds) == 3 and [d.line for d in ds] == sorted(d.line for d in ds)


def test_load_policy_from_path_and_unreadable(tmp_path: Path) -> None:
    f = tmp_path / "x.yaml"
    f.write_text(HEAD + "rules: []\n")
    p = load_policy(f)
    assert p.path == str(f) and len(p.digest) == 64
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path / "missing.yaml")
    assert str(exc.value).endswith("missing.yaml:1:1: error: file not found")
    with pytest.raises(PolicyError) as exc:
        load_policy(tmp_path)
    assert "cannot read file: Is a directory" in str(exc.value)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("# r\xe8gles\n".encode("latin-1"))
    with pytest.raises(PolicyError) as exc:
        load_policy(latin1)
    assert "not UTF-8 text" in str(exc.value)


def test_diagnostic_format() -> None:
    d = Diagnostic("error", "f.yaml", 3, 7, "bad", "fix it")
    assert str(d) == "f.yaml:3:7: error: bad\n    hint: fix it"


def test_several_documents_are_refused() -> None:
    d = one_error(HEAD + "rules: []\n---\n" + HEAD + "rules: []\n")
    assert "YAML" in d.message and d.line == 4


def test_values_shorthand_mapping_covers_every_address() -> None:
    p = load_policy_text(rule('roles: [a]\nfunctions: [6]\nvalues: {min: 0, max: 9}\n'))
    v = p.rules[0].values
    assert v is not None and (v[0].low, v[0].high, v[0].vmin, v[0].vmax) == (0, 65535, 0, 9)


def test_one_name_table_in_the_project() -> None:
    from mbsec.modbus import pdu
    from mbsec.policy import names

    assert names.FUNCTION_NAMES is pdu.FUNCTION_NAMES and names.MEI_NAMES is pdu.MEI_NAMES
    assert names.WRITE_FUNCTIONS is pdu.WRITE_FUNCTIONS
    assert set(names.PRESETS["read-write"]) - set(names.PRESETS["read-only"]) == \
        {(c, None) for c in pdu.WRITE_FUNCTIONS}
