"""`mbsec policy report`: the review page, rendered by a real headless Chromium.

Chromium (Debian's package, scripts/test.d/policy-tools.sh) loads the page from a file with
every network request failing, and the test reads the DOM it built (``--dump-dom``): the
access matrix with the writes marked, the diff against the old policy, the test results.
Without Chromium the test skips with the install hint, and fails when CI=true.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

from conftest import fail_or_skip

from mbsec.policy.cli import main as policy_main

ROOT = Path(__file__).resolve().parents[1]
NEW = ROOT / "policies" / "engineer-setpoints.yaml"
OLD = ROOT / "policies" / "operator-readonly.yaml"


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    rc = policy_main(argv, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        hint = "chromium not installed: source scripts/apt_need.sh; " \
            "source scripts/test.d/policy-tools.sh"
        fail_or_skip(hint)
    return path


def dump_dom(page: Path, profile: Path) -> str:
    """The DOM Chromium built from ``page``, with the network unreachable."""
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking",
         f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_report_renders_matrix_diff_and_tests_in_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    rc, _, err = run(["report", str(NEW), "--against", str(OLD), "-o", str(page)])
    assert rc == 0, err
    source = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", source)  # no assets
    assert "<script" not in source
    dom = dump_dom(page, tmp_path / "chromium-profile")
    assert '<table id="matrix">' in dom and "<tbody>" in dom
    row = re.search(r'<tr data-role="engineer">(.*?)</tr>', dom, re.S)
    assert row is not None
    cell = re.search(r'<td data-target="line1-plc">(.*?)</td>', row.group(1), re.S)
    assert cell is not None
    writes = re.findall(r'<li class="write" data-function="([^"]+)" data-ranges="([^"]+)"',
                        cell.group(1))
    assert ("write_single_register (6)", "100-199") in writes
    assert ("write_single_coil (5)", "10") in writes
    reads = re.findall(r'<li class="read" data-function="([^"]+)"', cell.group(1))
    assert "read_holding_registers (3)" in reads
    assert not any("write" in f for f in reads)
    diff = re.search(r'<ul id="diff">(.*?)</ul>', dom, re.S)
    assert diff is not None
    added = re.findall(r'<li class="added">([^<]*)</li>', diff.group(1))
    removed = re.findall(r'<li class="removed">([^<]*)</li>', diff.group(1))
    assert any(x.startswith("+ engineer @ line1-plc: write_single_register (6) write 100-199")
               for x in added)
    assert any(x.startswith("- operator @ line1-plc: read_holding_registers (3) read 0-999")
               for x in removed)
    tests = re.search(r'<table id="tests">(.*?)</table>', dom, re.S)
    assert tests is not None
    assert len(re.findall(r'<tr class="pass">', tests.group(1))) == 13
    assert 'class="fail"' not in tests.group(1)
    assert "13 pass, 0 fail" in dom


def test_a_failing_inline_test_and_no_change_show_on_the_page(tmp_path: Path) -> None:
    broken = tmp_path / "p.yaml"
    broken.write_text(NEW.read_text().replace("value: 800, expect: allow",
                                              "value: 800, expect: deny"))
    page = tmp_path / "r.html"
    rc, _, _ = run(["report", str(broken), "--against", str(NEW), "-o", str(page)])
    assert rc == 0
    dom = dump_dom(page, tmp_path / "chromium-profile")
    assert '<p id="diff">No change in access.</p>' in dom
    assert len(re.findall(r'<tr class="fail"><td>FAIL</td>', dom)) == 1
    assert "12 pass, 1 fail" in dom


def test_markdown_variant_for_a_merge_request() -> None:
    rc, out, _ = run(["report", str(NEW), "--against", str(OLD), "--format", "markdown"])
    assert rc == 0
    assert out.startswith("## Policy review: `")
    assert "```diff\n+ engineer @ line1-plc: read_coils (1) read any  (rule engineer-read)\n" \
        in out
    row = next(x for x in out.splitlines() if x.startswith("| engineer | "))
    assert "**✎ write_single_register (6) write 100-199" in row
    assert "<br>read_holding_registers (3) read any<br>" in row
    assert "| PASS | safe temperature setpoint: role=engineer" in out


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    rc, _, err = run(["report", str(tmp_path / "missing.yaml")])
    assert rc == 1
    assert err.splitlines()[-1] == "mbsec policy report: error: the policy does not load"
    assert "file not found" in err
    rc, _, err = run(["report", str(NEW), "-o", str(tmp_path / "no" / "dir.html")])
    assert rc == 1 and err.startswith("mbsec policy report: error: cannot write ")
