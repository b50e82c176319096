"""tests/hypothesis_determinism.py: a derandomized hypothesis test draws the same examples
whatever other modules of the checkout the process has imported, once
:func:`no_local_constants` is on (and, without it, it does not: that is what it is for).

Run in a fresh interpreter, so the module this test writes and imports (literals 100-254, the
range of the swarm-testing draw of a state machine) does not reach other tests' pools.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypothesis_determinism import _modules

SCRIPT = """
import json, sys
from hypothesis import given, settings, strategies as st
from hypothesis_determinism import no_local_constants

seen = []

@settings(max_examples=10, derandomize=True, database=None)
@given(st.lists(st.integers(0, 254), min_size=50, max_size=50))
def draws(xs):
    seen.append(xs)

def run(fixed):
    seen.clear()
    if fixed:
        with no_local_constants():
            draws()
    else:
        draws()
    return list(seen)

before = run(False), run(True)
sys.path.insert(0, sys.argv[1])
import plant_constants  # a module of the checkout another test happened to import
after = run(False), run(True)
print(json.dumps({"plain": before[0] == after[0], "fixed": before[1] == after[1],
                  "fixed_is_plain_before": after[1] == before[0]}))
"""


def test_examples_do_not_depend_on_the_modules_loaded(tmp_path: Path) -> None:
    (tmp_path / "plant_constants.py").write_text(
        "".join(f"REGISTER_{i} = {i}\n" for i in range(100, 255, 3)))
    tests = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=False, cwd=tmp_path,
                          env={"PYTHONPATH": str(tests), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    same = json.loads(done.stdout)
    assert same["fixed"] and same["fixed_is_plain_before"], same
    if _modules() is not None:  # this hypothesis has local constants: they did change the draws
        assert not same["plain"], same
