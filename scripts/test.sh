#!/usr/bin/env bash
# The one test command (README, .ci/run): install what the tests need, then run every check.
# Exits non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing system packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

echo "== virtual environment .venv with the test and dev extras"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,dev]'

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
