# mbsec connect's tests (issue 13): stunnel for docs/clients.md's stunnel snippet
# (tests/e2e/test_clients_doc.py; scripts/libmodbus.sh installs it too) and systemd-analyze for
# the score of deploy/systemd/mbsec-connect.service (tests/test_connect_unit.py).
apt_need stunnel4:stunnel4 systemd-analyze:systemd
