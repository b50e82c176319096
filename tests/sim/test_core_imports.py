"""The request-path core is sans-IO: it imports none of trio, socket, ssl, select, threading or
time, directly or through anything it imports. Only the driver (mbsec/path/epoll.py and its
scrape collector stats.py) and the policy side (decide.py: the logger) may.

Checked in a fresh interpreter where those modules are made unimportable before the core is
imported, so an indirect import fails as loudly as a direct one, and by reading each core file's
import statements (which also catches an import hidden inside a function).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mbsec.path

FORBIDDEN = ("trio", "socket", "ssl", "select", "threading", "time")
#: the driver, its scrape collector (reads TCP_INFO from the link sockets on the data-plane
#: thread) and the policy side are not the core
NOT_CORE = {"epoll", "stats", "decide"}
PATH = Path(mbsec.path.__file__).parent
CORE = sorted(p.stem for p in PATH.glob("*.py") if p.stem not in NOT_CORE)


def test_the_core_is_what_the_package_says() -> None:
    for name in ("timers", "plc", "exchange", "link", "target", "router", "client"):
        assert name in CORE


def test_core_imports_no_io_modules_even_indirectly() -> None:
    modules = ", ".join(f"mbsec.path.{name}" for name in CORE if name != "__init__")
    script = (
        "import sys\n"
        f"blocked = {FORBIDDEN!r}\n"
        "saved = {name: sys.modules.pop(name, None) for name in blocked}\n"
        "for name in blocked:\n"
        "    sys.modules[name] = None  # import of it raises ImportError\n"
        "try:\n"
        f"    import {modules}\n"
        "finally:\n"
        "    for name, module in saved.items():\n"
        "        if module is None:\n"
        "            del sys.modules[name]\n"
        "        else:\n"
        "            sys.modules[name] = module\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr


def test_core_files_import_no_io_modules() -> None:
    for name in CORE:
        tree = ast.parse((PATH / f"{name}.py").read_text(), filename=f"{name}.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            bad = [root for root in roots if root in FORBIDDEN]
            assert not bad, f"mbsec/path/{name}.py line {node.lineno} imports {bad}"
            if isinstance(node, ast.ImportFrom) and node.module == "mbsec.path":
                imported = {alias.name for alias in node.names}
                assert not imported & NOT_CORE, f"mbsec/path/{name}.py imports the driver"
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                assert not (parts[:2] == ["mbsec", "path"] and len(parts) > 2
                            and parts[2] in NOT_CORE), (
                    f"mbsec/path/{name}.py line {node.lineno} imports {node.module}")
