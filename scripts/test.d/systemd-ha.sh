# systemd-analyze (verify, security) for deploy/systemd/ (tests/test_systemd_units.py) and
# keepalived + iproute2 for the HA failover in network namespaces (tests/e2e/test_ha_keepalived.py,
# benchmarks/bench_failover.py).
apt_need systemd-analyze:systemd keepalived:keepalived ip:iproute2 curl:curl
