"""docs/policy.md's adoption walkthrough, re-run: every documented command, its real output.

Each ~~~console block of the "Adoption path" section is a list of ``$ command`` lines, each
followed by its output. The test runs the commands in a copy of docs/adoption/ (the recorded
events of a real monitor-mode run, the policies) and compares the output with the document,
so the walkthrough cannot drift from what the tools print. ``mbsec ...`` runs in-process;
``cat FILE`` prints a file; a trailing ``; echo "exit $?"`` adds the exit status.

After a deliberate change of output, regenerate the blocks with
``MBSEC_UPDATE_DOCS=1 .venv/bin/pytest tests/test_policy_walkthrough.py`` and review the diff.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest

from mbsec.cli import main as mbsec_main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "policy.md"
BLOCK = re.compile(r"^~~~console\n(.*?)^~~~\n", re.S | re.M)  # output may hold ``` fences
EXIT = '; echo "exit $?"'


def _section(text: str) -> str | None:
    """The "## Adoption path" section, up to the next heading outside a fenced block (the
    Markdown report in it has headings of its own)."""
    start = text.find("\n## Adoption path")
    if start < 0:
        return None
    lines, fenced = text[start + 1:].split("\n"), False
    for i, line in enumerate(lines):
        if line.startswith("~~~"):
            fenced = not fenced
        elif i and not fenced and line.startswith("## "):
            return "\n".join(lines[:i])
    return "\n".join(lines)


def _commands(block: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs; ``\\`` continues a command line."""
    out: list[tuple[str, list[str]]] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            cmd = line[2:]
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            out.append((cmd, []))
        else:
            out[-1][1].append(line)
        i += 1
    return [(c, "\n".join(o) + ("\n" if o else "")) for c, o in out]


def _run(cmd: str) -> str:
    status = cmd.endswith(EXIT)
    argv = shlex.split(cmd.removesuffix(EXIT))
    if argv[0] == "cat":
        return Path(argv[1]).read_text()
    assert argv[0] == "mbsec", f"the walkthrough runs only mbsec and cat: {cmd}"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = mbsec_main(argv[1:])
    return buf.getvalue() + (f"exit {rc}\n" if status else "")


def test_the_walkthrough_prints_what_the_tools_print(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    text = DOC.read_text()
    section = _section(text)
    assert section is not None, "docs/policy.md has no '## Adoption path' section"
    for f in (ROOT / "docs" / "adoption").iterdir():
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.chdir(tmp_path)
    update = os.environ.get("MBSEC_UPDATE_DOCS") == "1"
    blocks = BLOCK.findall(section)
    assert len(blocks) >= 5
    new_section = section
    ran = 0
    for block in blocks:
        rebuilt = []
        for cmd, expected in _commands(block):
            got = _run(cmd)
            ran += 1
            if not update:
                assert got == expected, f"$ {cmd}"
            shown = "$ " + cmd if len(cmd) <= 96 else "$ " + _wrap(cmd)
            rebuilt.append(shown + "\n" + got)
        new_section = new_section.replace(block, "".join(rebuilt), 1)
    assert ran >= 8
    if update:
        DOC.write_text(text.replace(section, new_section))
    # reviewed.yaml is the proposal without the engineer's coil rule, nothing else
    from mbsec.policy.explain import diff
    from mbsec.policy.loader import load_policy

    assert diff(load_policy("proposal.yaml"), load_policy("reviewed.yaml")) == [
        "- engineer @ plc-unit1: write_single_coil (5) write 10 [coils on]  "
        "(rule engineer-plc-unit1-write_single_coil)"]


def _wrap(cmd: str) -> str:
    """Break a long command before its options (``\\`` continues the line)."""
    parts = re.split(r" (?=--|; )", cmd)
    lines, cur = [], parts[0]
    for p in parts[1:]:
        if len(cur) + 1 + len(p) > 90:
            lines.append(cur + " \\")
            cur = "    " + p
        else:
            cur = f"{cur} {p}"
    return "\n".join([*lines, cur])


@pytest.mark.parametrize("cmd", ["learn", "replay", "report"])
def test_every_flag_of_the_adoption_tools_is_documented(
    cmd: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with contextlib.suppress(SystemExit):
        mbsec_main(["policy", cmd, "--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", capsys.readouterr().out)) - {"--help"}
    assert flags
    text = DOC.read_text()
    assert sorted(f for f in flags if f"`{f}" not in text and f" {f}" not in text) == []
    assert f"`mbsec policy {cmd} " in text


def test_progress_lines_go_to_stderr_on_long_runs() -> None:
    from mbsec.policy.records import Progress, ReadStats

    err = io.StringIO()
    p = Progress("mbsec policy replay", err, every=0.0)
    p.tick(ReadStats(lines=1_000_000, records=900_000))
    assert err.getvalue().startswith("mbsec policy replay: 1,000,000 lines, 900,000 requests (")
    quiet = Progress("x", None, every=0.0)
    quiet.tick(ReadStats(lines=5))  # -q: no stream, nothing printed
