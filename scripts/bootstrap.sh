# Sourced by test.sh and demo.sh: make sure the system packages exist, then a .venv with EXTRAS.
# usage: EXTRAS=test,dev source scripts/bootstrap.sh   (EXTRAS empty: runtime only)
need_apt=()
for pair in ${APT_NEEDS:-}; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# setup.py compiles the data plane with mypyc: a C compiler and the Python headers
# (without them the install still works, with the slower interpreted data plane)
command -v gcc >/dev/null 2>&1 || need_apt+=(build-essential)
python3 -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  >/dev/null 2>&1 || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing system packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
echo "== virtual environment .venv${EXTRAS:+ with extras [$EXTRAS]}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
echo "== installing mbsec (setup.py compiles its data plane with mypyc: about a minute)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
.venv/bin/python -c 'from mbsec.path import epoll
print("== data plane:", "compiled" if epoll.compiled() else "interpreted (no C compiler?)")'
