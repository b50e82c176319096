"""Run one fuzz target under atheris (libFuzzer), on the interpreted mbsec modules.

    MBSEC_PURE=1 .venv/bin/python fuzz/run.py TARGET [libFuzzer flags] [CORPUS_DIR ...]
    .venv/bin/python fuzz/run.py request -max_total_time=60 fuzz/corpus/request
    .venv/bin/python fuzz/run.py --list

mypyc compiles mbsec/modbus/mbap.py and the request-path core into extension modules that
coverage cannot see; this script imports every ``mbsec`` module from its ``.py`` source even
when a compiled ``.so`` sits next to it, so the fuzzer is guided through all of them.
Crashes are written by libFuzzer as ``crash-<sha1>`` in the working directory (``-artifact_prefix=``
moves them); replay one with ``fuzz/run.py TARGET crash-...``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


class _SourceOnly(importlib.abc.MetaPathFinder):
    """Finds ``mbsec`` and its submodules as ``.py`` files only (never a compiled ``.so``)."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "mbsec" and not fullname.startswith("mbsec."):
            return None
        for entry in path if path is not None else sys.path:
            base = Path(entry or ".") / fullname.rpartition(".")[2]
            for candidate, pkg in ((base / "__init__.py", True), (base.with_suffix(".py"), False)):
                if candidate.is_file():
                    return importlib.util.spec_from_file_location(
                        fullname, candidate,
                        submodule_search_locations=[str(base)] if pkg else None)
        return None


def force_interpreted() -> None:
    """Make every later ``import mbsec...`` load the Python source."""
    if not any(isinstance(f, _SourceOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceOnly())


def main() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--list"]:
        force_interpreted()
        from fuzz.targets import TARGETS
        print("\n".join(TARGETS))
        return
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    name = sys.argv.pop(1)
    import atheris

    force_interpreted()
    with atheris.instrument_imports(include=["mbsec", "fuzz"]):
        from fuzz.targets import TARGETS
    if name not in TARGETS:
        sys.exit(f"unknown target {name!r}; one of: {', '.join(TARGETS)}")
    atheris.Setup(sys.argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
