#!/usr/bin/env bash
# Render the example review page (`mbsec policy report`) and screenshot it with headless
# Chromium, for people to look at: docs/policy-report.png. Not needed by CI.
#   bash scripts/policy_report_screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/policy-report.png}
tmp=$(mktemp -d /tmp/mbsec-report-XXXXXX)
trap 'rm -rf "$tmp"' EXIT
PYTHONPATH=$PWD .venv/bin/python -m mbsec.cli policy report policies/engineer-setpoints.yaml \
  --against policies/operator-readonly.yaml -o "$tmp/report.html"
chromium --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
  --user-data-dir="$tmp/profile" --proxy-server=127.0.0.1:9 \
  --host-resolver-rules="MAP * ~NOTFOUND" --window-size=1400,1500 \
  --screenshot="$PWD/$out" "file://$tmp/report.html" 2>/dev/null
echo "wrote $out"
