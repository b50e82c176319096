# Sourced by scripts/test.d/*.sh: install the Debian packages whose command is missing.
#   apt_need CMD:PACKAGE [CMD:PACKAGE ...]     (CMD may be an absolute path to a file)
# Waits for the dpkg lock (another install may be running) and runs `apt-get update` once.
apt_need() {
  local pair cmd pkg missing=()
  for pair in "$@"; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    if [ "${cmd#/}" != "$cmd" ]; then [ -e "$cmd" ] || missing+=("$pkg")
    else command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg"); fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== installing system packages: ${missing[*]}"
  local sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  if [ -z "${_MBSEC_APT_UPDATED:-}" ]; then
    $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq && _MBSEC_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}"
}
