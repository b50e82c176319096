#!/usr/bin/env bash
# The one test command (README, .ci/run): install what the tests need, then run every check.
# Exits non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_NEEDS="openssl:openssl" EXTRAS=test,dev source scripts/bootstrap.sh
source scripts/libmodbus.sh  # libmodbus's unit-test programs (tests/e2e/test_libmodbus.py)
# one file per real component a test needs (rsyslog, promtool, keepalived, chromium...): each
# installs what is missing with apt-get (scripts/apt_need.sh) and exports what its tests read
source scripts/apt_need.sh
for f in scripts/test.d/*.sh; do
  [ -e "$f" ] && source "$f"
done

echo "== ruff"
.venv/bin/ruff check mbsec tests benchmarks
echo "== mypy --strict mbsec"
.venv/bin/mypy --strict mbsec

if compgen -G 'policies/*.yaml' >/dev/null; then
  echo "== example policies: check --strict and inline tests"
  for f in policies/*.yaml; do
    .venv/bin/mbsec policy check --strict "$f"
    .venv/bin/mbsec policy test "$f"
  done
fi

echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
