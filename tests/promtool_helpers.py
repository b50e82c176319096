"""promtool (Debian's prometheus package, installed by scripts/test.d/promtool.sh) for the
tests of /metrics and deploy/prometheus/: a missing one fails under ``CI=true``, else skips
with the install hint."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from conftest import fail_or_skip


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        fail_or_skip("promtool not installed: apt-get install prometheus "
                     "(or: source scripts/apt_need.sh; source scripts/test.d/promtool.sh)")
    return path


def run_promtool(*args: str, cwd: Path | None = None, stdin: bytes | None = None) -> str:
    """Run promtool, assert it succeeded, return what it printed."""
    out = subprocess.run([promtool(), *args], cwd=cwd, input=stdin, capture_output=True,
                         timeout=60)
    text = out.stdout.decode() + out.stderr.decode()
    assert out.returncode == 0, text
    return text


def metric_names(text: str) -> set[str]:
    """The mbsec_* and process_* names a PromQL text (or a rule file) refers to."""
    return set(re.findall(r"\b((?:mbsec|process)_[a-z0-9_]+)\b", text))
