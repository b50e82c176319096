"""The documentation standard, checked: every CLI flag, configuration key, policy key, event
action and metric name is documented in README.md or docs/ (or pki/README.md)."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pydantic
import pytest

from mbsec.cli import main as mbsec_main
from mbsec.pki.cli import main as pki_main
from mbsec.policy import model
from mbsec.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCS = "\n".join(p.read_text(encoding="utf-8") for p in
                 [ROOT / "README.md", ROOT / "pki" / "README.md", *(ROOT / "docs").glob("*.md")])

MBSEC_COMMANDS = [["serve"], ["config", "check"], ["policy", "check"], ["policy", "test"],
                  ["policy", "explain"], ["policy", "diff"], ["policy", "eval"], ["demo"],
                  ["connect"]]
PKI_COMMANDS = ["init", "issue", "csr", "sign", "renew", "revoke", "crl", "list", "show",
                "verify", "profiles"]


def _help(run: object, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with contextlib.suppress(SystemExit):
        run(argv)  # type: ignore[operator]
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - {"--help"}


@pytest.mark.parametrize("cmd", MBSEC_COMMANDS, ids=" ".join)
def test_every_mbsec_flag_is_documented(cmd: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    flags = _flags(_help(mbsec_main, [*cmd, "--help"], capsys))
    assert flags or cmd == ["config", "check"]
    assert sorted(f for f in flags if f not in DOCS) == []


@pytest.mark.parametrize("cmd", PKI_COMMANDS)
def test_every_pki_flag_is_documented(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    flags = _flags(_help(pki_main, [cmd, "--help"], capsys))
    assert sorted(f for f in flags if f not in DOCS) == []
    assert f"mbsec-pki {cmd}" in DOCS or f"## {cmd}" in DOCS


def _keys(cls: type[pydantic.BaseModel]) -> set[str]:
    out = set()
    for name, field in cls.model_fields.items():
        out.add(name)
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, pydantic.BaseModel):
                out |= _keys(arg)
    return out


def test_every_config_key_is_documented() -> None:
    config = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    # a key is `key` in a table, a table is [name], [name.NAME] or [logging.name]
    forms = ("`{}`", "`syslog.{}`", "[{}]", "[{}.", ".{}]")
    assert sorted(k for k in _keys(Settings)
                  if not any(f.format(k) in config for f in forms)) == []


def test_every_policy_key_is_documented() -> None:
    policy = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")
    models = [c for c in vars(model).values() if isinstance(c, type)
              and issubclass(c, pydantic.BaseModel) and c.__module__ == model.__name__]
    keys = set().union(*(c.model_fields for c in models))
    assert sorted(k for k in keys if not re.search(rf"\b{k}\b", policy)) == []


def _source() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "mbsec").rglob("*.py"))


def test_every_event_action_and_metric_is_documented() -> None:
    events = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    src = _source()
    actions = set(re.findall(r'"event\.action":\s*"([a-z-]+)"', src))
    metrics = set(re.findall(r'"(mbsec_[a-z_]+)"', src))
    assert actions and metrics
    assert sorted(a for a in actions if f"`{a}`" not in events) == []
    assert sorted(m for m in metrics if f"`{m}`" not in events) == []
