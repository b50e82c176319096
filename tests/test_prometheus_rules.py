"""deploy/prometheus/: the alert rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), the sample configuration ``promtool check config``, and the Grafana
dashboard is valid JSON whose every query is valid PromQL (checked by promtool as recording
rules). That each metric they name exists in a real scrape is
tests/e2e/test_metrics_exposition.py's job.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from promtool_helpers import promtool, run_promtool

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = DEPLOY / "mbsec-alerts.yml"
DASHBOARD = DEPLOY / "mbsec-dashboard.json"
#: Grafana's variables, replaced by what they stand for at query time
GRAFANA_VARS = {"$__rate_interval": "1m", "$instance": ".*", "$target": ".*"}


def run(*args: str, cwd: Path = DEPLOY) -> str:
    return run_promtool(*args, cwd=cwd)


def test_alert_rules_pass_promtool_check() -> None:
    assert "SUCCESS: 9 rules found" in run("check", "rules", RULES.name)


def test_alert_rules_unit_tests_pass() -> None:
    assert "SUCCESS" in run("test", "rules", "mbsec-alerts.test.yml")


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "mbsec-alerts.test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == alerts


def test_sample_prometheus_config_loads_the_rules() -> None:
    assert "1 rule files found" in run("check", "config", "prometheus.yml")


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", ())]


def test_dashboard_is_valid_json_with_the_panels_an_ot_engineer_needs() -> None:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in dash["panels"]}
    assert {"TCP round-trip time per PLC link", "TCP retransmissions per PLC link",
            "Decisions by role", "TLS handshakes by outcome"} <= titles
    for p in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(dash["panels"])))
    assert used - {"__rate_interval"} <= variables


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool has no query parser of its own: each query becomes a recording rule, which
    ``promtool check rules`` parses."""
    rules = []
    for i, (_title, expr) in enumerate(dashboard_queries()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    (tmp_path / "dash.yml").write_text(yaml.safe_dump({"groups": [{"name": "d",
                                                                   "rules": rules}]}))
    assert f"SUCCESS: {len(rules)} rules found" in run("check", "rules", "dash.yml",
                                                        cwd=tmp_path)
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "x:y", "expr": "sum by (role (rate(x[5m]))"}]}]}))
    bad = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True)
    assert bad.returncode != 0  # the check can fail
