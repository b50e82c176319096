"""`mbsec policy ...`: exit codes and output of check, test, explain, diff and eval."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mbsec.policy.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "policies").glob("*.yaml"))
ENGINEER = str(ROOT / "policies" / "engineer-setpoints.yaml")
OPERATOR = str(ROOT / "policies" / "operator-readonly.yaml")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = main(list(argv), out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def write(tmp_path: Path, name: str, text: str) -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


GOOD = """\
version: 1
default: deny
rules:
  - {id: ro, description: read, roles: [operator], functions: [3], addresses: ["0-99"]}
tests:
  - {role: operator, function: 3, address: 5, expect: allow, rule: ro}
  - {role: operator, function: 3, address: 99, quantity: 2, expect: deny, rule: default}
"""


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"operator-readonly.yaml", "engineer-setpoints.yaml", "historian-by-cn.yaml",
            "vendor-diagnostics.yaml", "deny-all.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_passes_check_strict_and_its_tests(path: Path) -> None:
    rc, out, _ = run("check", "--strict", str(path))
    assert rc == 0, out
    rc, out, _ = run("test", str(path))
    assert rc == 0, out
    assert " 0 failed" in out and "PASS" in out


def test_check_reports_errors_with_position(tmp_path: Path) -> None:
    f = write(tmp_path, "bad.yaml", GOOD.replace("default: deny\n", "").replace('"0-99"',
                                                                               '"40001-40100"'))
    rc, out, _ = run("check", f)
    assert rc == 1
    assert f"{f}:1:1: error: the file does not state its default" in out
    assert "error(s)" in out


def test_check_multiple_files_and_strict_warnings(tmp_path: Path) -> None:
    shadow = GOOD.replace("tests:", "  - {id: ro2, description: again, roles: [operator], "
                          "functions: [3], addresses: [5]}\ntests:")
    f = write(tmp_path, "shadow.yaml", shadow)
    g = write(tmp_path, "good.yaml", GOOD)
    rc, out, _ = run("check", f, g)
    assert rc == 0 and "warning: rule 'ro2' can never match" in out and "1 warning(s)" in out
    rc, out, _ = run("check", "--strict", f, g)
    assert rc == 1 and "error: rule 'ro2' can never match" in out and f"{g}: ok" in out


def test_test_command_reports_failures(tmp_path: Path) -> None:
    f = write(tmp_path, "t.yaml", GOOD.replace("address: 5, expect: allow", "address: 5, "
                                               "expect: deny"))
    rc, out, _ = run("test", f)
    assert rc == 1
    assert "FAIL" in out and "expected deny" in out and "1 passed, 1 failed" in out
    rc, out, _ = run("test", "-q", write(tmp_path, "ok.yaml", GOOD))
    assert rc == 0 and "PASS" not in out and "2 passed, 0 failed" in out


def test_test_command_explains_a_fall_through(tmp_path: Path) -> None:
    f = write(tmp_path, "t.yaml", GOOD.replace("quantity: 2, expect: deny, rule: default",
                                               "quantity: 2, expect: allow"))
    rc, out, _ = run("test", f)
    assert rc == 1 and "not rule ro" in out and "read 99-100 is outside 0-99" in out


def test_test_command_on_invalid_file(tmp_path: Path) -> None:
    rc, out, _ = run("test", write(tmp_path, "x.yaml", "version: 1\n"))
    assert rc == 1 and "did not load" in out


def test_explain_table() -> None:
    rc, out, _ = run("explain", ENGINEER, "--role", "engineer", "--target", "line1-plc")
    assert rc == 0
    assert "RULE" in out and "FUNCTION" in out and "CONDITIONS" in out
    assert "engineer-setpoints" in out and "100-199" in out and "0..1500" in out
    assert "deny (02)" in out and "900-999" in out
    assert "falls through" in out and "rate limit: 50 requests/s" in out
    rc, out, _ = run("explain", ENGINEER, "--role", "operator")
    assert "engineer-setpoints " not in out and "engineer-no-safety-block" in out


def test_explain_shows_identities_and_source_filter() -> None:
    hist = str(ROOT / "policies" / "historian-by-cn.yaml")
    rc, out, _ = run("explain", hist, "--role", "historian")
    assert rc == 0 and "subject_cn=historian-01.plant.example" in out
    rc, out, _ = run("explain", hist, "--role", "historian", "--source", "192.0.2.1")
    assert "No rule applies" in out


def test_explain_unknown_target_is_usage_error() -> None:
    rc, _, err = run("explain", ENGINEER, "--role", "engineer", "--target", "nope")
    assert rc == 2 and "unknown target" in err


def test_diff_shows_added_and_removed_access(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", GOOD)
    new = write(tmp_path, "new.yaml", GOOD.replace('"0-99"', '"0-199"').replace(
        "tests:", "  - {id: w, description: w, roles: [engineer], functions: [6], "
        "addresses: [10], values: {min: 0, max: 5}}\ntests:"))
    rc, out, _ = run("diff", old, new)
    assert rc == 0, out
    assert "+ operator @ (other units): read_holding_registers (3) read 100-199  (rule ro)" in out
    assert "+ engineer @ (other units): write_single_register (6) write 10 [values 0..5]" in out
    rc, out, _ = run("diff", new, old)
    assert "- operator @ (other units): read_holding_registers (3) read 100-199" in out
    rc, out, _ = run("diff", "--exit-code", old, old)
    assert rc == 0 and "no change in access" in out
    assert run("diff", "--exit-code", old, new)[0] == 1


def test_diff_respects_first_match_and_modes(tmp_path: Path) -> None:
    old = write(tmp_path, "old.yaml", GOOD)
    blocked = GOOD.replace("rules:\n", "rules:\n  - {id: no, description: d, action: deny, "
                           "functions: [3], addresses: [\"50-99\"]}\n").replace(
        "tests:", "mode: monitor\ntests:")
    new = write(tmp_path, "new.yaml", blocked)
    _, out, _ = run("diff", old, new)
    assert "- operator @ (other units): read_holding_registers (3) read 50-99" in out
    assert "~ mode: enforce -> monitor" in out


def test_diff_between_examples() -> None:
    rc, out, _ = run("diff", OPERATOR, ENGINEER)
    assert rc == 0
    assert "+ engineer @ line1-plc: write_single_register (6) write 100-199" in out
    assert "- operator @ line1-plc: read_holding_registers (3) read 0-999" in out


def test_eval_allow_and_default_with_reason() -> None:
    rc, out, _ = run("eval", ENGINEER, "--role", "engineer", "--unit", "1", "--function",
                     "write_single_register", "--address", "120", "--value", "800")
    assert rc == 0 and out.startswith("allow  rule=engineer-setpoints  target=line1-plc")
    rc, out, _ = run("eval", ENGINEER, "--role", "engineer", "--target", "line1-plc",
                     "--function", "6", "--address", "120", "--value", "2000")
    assert out.startswith("deny  rule=default") and "Modbus exception 01" in out
    assert "not rule engineer-setpoints" in out
    assert "value 2000 at address 120 is outside 0..1500" in out
    rc, out, _ = run("eval", OPERATOR, "--role", "engineer", "--unit", "1", "--function", "3")
    assert "no rule for this role and function" in out


def test_eval_json_and_monitor() -> None:
    import json

    vendor = str(ROOT / "policies" / "vendor-diagnostics.yaml")
    rc, out, _ = run("eval", vendor, "--role", "vendor", "--unit", "1", "--function",
                     "read_holding_registers", "--json")
    d = json.loads(out)
    assert rc == 0 and d["outcome"] == "would_deny" and d["allowed"] is True
    assert d["rule_id"] == "default" and d["roles"] == ["vendor"]
    rc, out, _ = run("eval", vendor, "--role", "vendor", "--unit", "1", "--function",
                     "diagnostics", "--subfunction", "restart_communications_option")
    assert out.startswith("deny  rule=vendor-no-restart")


def test_eval_identity_mapping_by_cn() -> None:
    hist = str(ROOT / "policies" / "historian-by-cn.yaml")
    rc, out, _ = run("eval", hist, "--cn", "historian-01.plant.example", "--source",
                     "10.30.0.4", "--unit", "1", "--function", "4", "--quantity", "10")
    assert rc == 0 and out.startswith("allow  rule=historian-read") and "roles=historian" in out


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["check"], ["eval", ENGINEER, "--function", "3"],
    ["eval", ENGINEER, "--unit", "1", "--function", "nope"],
    ["eval", ENGINEER, "--unit", "1", "--function", "3", "--quantity", "500"],
    ["eval", ENGINEER, "--unit", "1", "--function", "3", "--source", "not-an-ip"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    rc, _, err = run(*argv)
    assert rc == 2 and "error" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "check" in capsys.readouterr().out


def test_installed_console_script() -> None:
    exe = shutil.which("mbsec", path=str(Path(sys.executable).parent))
    assert exe is not None
    res = subprocess.run([exe, "policy", "check", "--strict", *map(str, EXAMPLES)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": ok (") == len(EXAMPLES)
    res = subprocess.run([exe, "policy", "test", "-q", *map(str, EXAMPLES)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and " 0 failed" in res.stdout
    res = subprocess.run([exe, "policy", "check"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 2


def test_diff_reports_other_effective_changes(tmp_path: Path) -> None:
    base = """\
version: 1
default: deny
identities:
  - {match: {subject_cn: hist-01}, roles: [historian]}
targets:
  plc: {unit_ids: [1]}
rules:
  - {id: d, description: d, action: deny, functions: [6], exception_code: 2}
  - {id: r, description: r, roles: [historian], targets: [plc], functions: [4],
     max_response_bytes: 200}
"""
    changed = base.replace("hist-01", "hist-02").replace("unit_ids: [1]", "unit_ids: [1, 2]") \
        .replace("exception_code: 2", "exception_code: 3").replace("200}", "100}")
    old, new = write(tmp_path, "a.yaml", base), write(tmp_path, "b.yaml", changed)
    rc, out, _ = run("diff", old, new)
    assert rc == 0
    assert "~ rule d: exception 02 -> 03" in out
    assert "~ rule r: max_response_bytes 200 -> 100" in out
    assert "~ target plc: units 1 -> 1,2" in out
    assert "+ identity mapping subject_cn=hist-02 -> roles historian" in out
    assert "- identity mapping subject_cn=hist-01 -> roles historian" in out


def test_explain_marks_monitor_rules(tmp_path: Path) -> None:
    f = write(tmp_path, "m.yaml", "version: 1\ndefault: deny\nmode: monitor\nrules:\n"
              "  - {id: t, description: d, action: deny, roles: [a], functions: [6]}\n")
    rc, out, _ = run("explain", f, "--role", "a")
    assert rc == 0 and "would_deny" in out and "logged as would_deny in monitor mode" in out
    rc, out, _ = run("explain", f)
    assert "a client without a matching role" in out and "No rule applies" in out
