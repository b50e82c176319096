"""Hypothesis generation that depends on the test alone, not on what else the process imported.

``derandomize=True`` seeds hypothesis from the test function, but hypothesis (6.170 here) also
draws, with a small probability per choice, *local constants*: the literals of every module of
this checkout outside tests/ (mbsec, benchmarks, fuzz) that is in ``sys.modules`` when a test
case asks for one (hypothesis rescans whenever ``len(sys.modules)`` changed). Which modules
those are depends on what ran before in the same process (the whole suite, one file, ``-k``)
and, when a thread left over from an earlier test imports one while a run is under way, on
timing: the box's load. In a state machine one such draw is the share of rules switched off for
a schedule (swarm testing, ``draw_integer(0, 254)``), so one different constant changes the
mix of every later schedule. :func:`no_local_constants` gives hypothesis an empty pool for the
duration: the examples are a function of the test and the hypothesis version only.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from types import ModuleType

PATCHED = "hypothesis.internal.conjecture.providers"


def _modules() -> tuple[ModuleType, ModuleType] | None:
    try:
        return (importlib.import_module(PATCHED),
                importlib.import_module("hypothesis.internal.constants_ast"))
    except ImportError:  # a hypothesis without local constants: nothing depends on sys.modules
        return None


@contextlib.contextmanager
def no_local_constants() -> Iterator[None]:
    """Hypothesis draws no constants from the modules loaded (private API: a hypothesis that
    collects them differently fails here rather than generating by context again)."""
    found = _modules()
    if found is None:
        yield
        return
    providers, constants_ast = found
    collect = getattr(providers, "_get_local_constants", None)
    cache = getattr(providers, "CONSTANTS_CACHE", None)
    if collect is None or cache is None:
        raise RuntimeError(f"{PATCHED} no longer has _get_local_constants/CONSTANTS_CACHE: "
                           "update tests/hypothesis_determinism.py")
    empty = constants_ast.Constants()
    cache.cache.clear()  # pools an earlier test computed from the real constants
    providers._get_local_constants = lambda: empty
    try:
        yield
    finally:
        providers._get_local_constants = collect
        cache.cache.clear()
