# tests/e2e/test_lossy_link.py: iproute2 (netns, veth, tuntap, per-route rto_min); the test
# itself needs root and /dev/net/tun and fails when CI=true and they are missing.
# tests/test_fuzz_targets.py needs atheris, a pip dependency of the test extra (pyproject.toml).
apt_need ip:iproute2
