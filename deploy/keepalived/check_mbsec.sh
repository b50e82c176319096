#!/bin/sh
# keepalived's track script (deploy/keepalived/mbsec-*.conf): healthy while mbsec's /healthz
# answers 200 within a second (mbsec/metrics_http.py; 503 while draining or while the data plane
# does not answer). Install as /etc/keepalived/check_mbsec.sh, mode 0755, owned by root.
exec /usr/bin/curl -fsS -o /dev/null -m 1 "http://127.0.0.1:${MBSEC_HEALTH_PORT:-9802}/healthz"
