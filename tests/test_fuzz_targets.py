"""The atheris fuzz targets (fuzz/targets.py): the committed corpus replays clean, and each
target runs briefly under coverage-guided fuzzing (a bounded smoke run; the long runs and their
figures are in fuzz/README.md)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fail_or_skip

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fuzz" / "corpus"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz.targets import TARGETS  # noqa: E402

#: inputs per target in CI (1.5-6 s each on the 2-vCPU box), a fixed count with a fixed seed,
#: so CI runs the same inputs on any box (a time bound ran more on a faster one, and a finding
#: there failed CI at random); SMOKE_CAP bounds a very slow box
SMOKE_RUNS = 3000
SMOKE_CAP = 30


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_corpus_replays_clean(name: str) -> None:
    files = sorted((CORPUS / name).iterdir())
    assert files, f"no seed corpus for {name}: run fuzz/make_corpus.py"
    for f in files:
        TARGETS[name](f.read_bytes())


def test_every_target_has_a_corpus() -> None:
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(TARGETS)


def test_invariants_catch_a_broken_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """The targets can fail: a framing encoder that drops a byte, and a role decoder that
    accepts a non-minimal DER length, each break their target's round-trip check."""
    import fuzz.targets as t

    adu = bytes.fromhex("000100000006010300000001")
    t.fuzz_mbap(b"\x00" + adu)
    monkeypatch.setattr(t, "encode_adu", lambda tid, unit, pdu: adu[:-1])
    with pytest.raises(AssertionError):
        t.fuzz_mbap(b"\x00" + adu)
    monkeypatch.setattr(t, "decode_role", lambda value: value[3:].decode())
    with pytest.raises(AssertionError):
        t.fuzz_role(b"\x0c\x81\x08operator")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_fuzzes_clean(name: str, tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        fail_or_skip("atheris is not installed: pip install -e '.[test]'")
    env = dict(os.environ, MBSEC_PURE="1")
    (tmp_path / "new").mkdir()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), name, f"-runs={SMOKE_RUNS}",
         f"-max_total_time={SMOKE_CAP}",
         "-seed=1", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
         str(tmp_path / "new"), str(CORPUS / name)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = [line for line in proc.stderr.splitlines()
            if line.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 10, proc.stderr[-2000:]
