# promtool (Debian's prometheus package): `promtool check metrics` validates a real scrape of
# /metrics, `promtool check rules` / `promtool test rules` the alert rules in deploy/prometheus/
# (tests/test_prometheus_rules.py, tests/e2e/test_metrics_exposition.py).
apt_need promtool:prometheus
