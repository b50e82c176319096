#!/usr/bin/env bash
# The README's first command: install mbsec (runtime dependencies only) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_NEEDS="" EXTRAS="" source scripts/bootstrap.sh
exec .venv/bin/mbsec demo "$@"
