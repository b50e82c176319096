# tests/e2e/test_log_disk_full.py mounts a 2 MiB tmpfs in a mount namespace of its own
# (unshare -m, as root); tests/e2e/test_honest_events.py drives a TLS 1.2 renegotiation with
# openssl s_client
apt_need unshare:util-linux mount:mount openssl:openssl
