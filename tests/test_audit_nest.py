"""nest_dotted with its per-key path cache: same output on the first and every later call."""

from __future__ import annotations

import pytest

from mbsec import audit
from mbsec.audit import flatten, nest_dotted


def test_nesting_is_the_same_cached_or_not(monkeypatch: pytest.MonkeyPatch) -> None:
    ev = {"event.action": "a", "message": "m", "@timestamp": "t", "tls.client.x509.subject.cn": 1,
          "event.outcome": "success", "plain": 2, "user": {"roles": ["x"]}, "user.name": "u"}
    want = {"@timestamp": "t", "message": "m", "event": {"action": "a", "outcome": "success"},
            "tls": {"client": {"x509": {"subject": {"cn": 1}}}}, "plain": 2,
            "user": {"roles": ["x"], "name": "u"}}
    monkeypatch.setattr(audit, "_PATHS", {})
    first = nest_dotted(dict(ev))
    second = nest_dotted(dict(ev))
    assert first == second == want
    assert list(first)[:2] == ["@timestamp", "message"]
    assert flatten(first)["tls.client.x509.subject.cn"] == 1


def test_the_path_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "_PATHS", {})
    monkeypatch.setattr(audit, "_PATHS_MAX", 3)
    ev = {f"k{i}.v": i for i in range(10)}
    assert nest_dotted(ev) == {f"k{i}": {"v": i} for i in range(10)}
    assert len(audit._PATHS) == 3
    assert nest_dotted(ev) == {f"k{i}": {"v": i} for i in range(10)}
