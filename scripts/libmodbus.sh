# Sourced by scripts/test.sh: libmodbus's own unit-test-client/-server, built from the source
# package of the Debian release this machine runs, for tests/e2e/test_libmodbus.py.
#   source scripts/libmodbus.sh      (from the checkout's root; idempotent)
#   bash scripts/libmodbus.sh build  (the work itself; what `source` runs when needed)
#
# The work, in a child bash (so that `set -e` holds there, whatever the caller does):
#  1. a deb-src entry for this release (/etc/apt/sources.list.d/mbsec-deb-src.sources) when apt
#     has none, then `apt-get update`;
#  2. the build tools when missing: gcc, make, autoconf, automake, libtool, dpkg-dev (for
#     dpkg-source), patch, and stunnel4 (the TLS shim the test puts in front of the client);
#  3. `apt-get source libmodbus` into .cache/libmodbus (git-ignored), Debian's patches applied;
#  4. our patch to the two test programs (below, stated in docs/compliance.md): the port comes
#     from $UT_PORT (stock 1502), the tcppi server listens on ::1 (stock: every address), the
#     server accepts the next connection when one ends (stock: it quits) and echoes both bytes
#     of the transaction id in its byte-by-byte reply (stock: the low one), and with
#     $UT_CONTINUE set the client counts a failed assertion and goes on (stock: it stops at
#     the first);
#  5. ./autogen.sh, ./configure --disable-shared --without-documentation, make: the library
#     and tests/unit-test-client, tests/unit-test-server (static, no libtool wrapper);
#  6. .cache/libmodbus/BUILT: key=value lines (version, client, server, stunnel, script hash).
#
# When sourced it exports MBSEC_LIBMODBUS_BUILT (the BUILT file's path): with it set, the test
# FAILS when the build is missing (its reason is in .cache/libmodbus/ERROR, the log in
# build.log); without it (pytest run by hand) the test skips when nothing was built. A failed
# build does not stop test.sh: the other checks still run and that test fails.
# Cost: a no-op when BUILT matches this script (10 ms); from scratch about 30 s on the 2-vCPU
# box (28 s measured: deb-src entry and apt-get update, the installs, apt-get source, autogen,
# configure, make; 23 s when the packages are already there). The test itself takes ~15 s.

_mbsec_lm_build() {
  set -euo pipefail
  local root cache codename uri sudo pkgs=() version src pair cmd pkg
  root=$(pwd)
  cache="$root/.cache/libmodbus"
  mkdir -p "$cache"
  if [ "$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi
  # shellcheck disable=SC1091
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$codename" ] || { echo "no VERSION_CODENAME in /etc/os-release: not Debian?"; return 1; }

  echo "== libmodbus: deb-src entry for $codename"
  if [ -z "$(apt-get indextargets 'Created-By: Sources' "Codename: $codename" 2>/dev/null)" ]; then
    # the mirror the machine already uses for this release's binary packages
    uri=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' \
          "Codename: $codename" 'Origin: Debian' 2>/dev/null | head -n 1)
    uri=${uri:-http://deb.debian.org/debian/}
    {
      echo "# added by mbsec scripts/libmodbus.sh: source packages (apt-get source libmodbus)"
      echo "Types: deb-src"
      echo "URIs: $uri"
      echo "Suites: $codename"
      echo "Components: main"
      if [ -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
        echo "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"
      fi
    } | $sudo tee /etc/apt/sources.list.d/mbsec-deb-src.sources >/dev/null
    echo "   added /etc/apt/sources.list.d/mbsec-deb-src.sources ($uri $codename main)"
    $sudo apt-get update -qq
  elif ! apt-cache showsrc libmodbus 2>/dev/null | grep -q '^Version:'; then
    $sudo apt-get update -qq  # the entry is there, its index is not
  fi

  for pair in gcc:gcc make:make autoreconf:autoconf aclocal:automake libtoolize:libtool \
              dpkg-source:dpkg-dev patch:patch stunnel4:stunnel4; do
    cmd=${pair%%:*}; pkg=${pair##*:}
    command -v "$cmd" >/dev/null 2>&1 || pkgs+=("$pkg")
  done
  if [ ${#pkgs[@]} -gt 0 ]; then
    echo "== libmodbus: installing ${pkgs[*]}"
    $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" ||
      { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}"; }
  fi

  version=$(apt-cache showsrc libmodbus | sed -n 's/^Version: //p' | sort -V | tail -n 1)
  [ -n "$version" ] || { echo "apt-cache showsrc libmodbus: no source package"; return 1; }
  echo "== libmodbus: apt-get source libmodbus ($version) into .cache/libmodbus"
  rm -rf "$cache"/libmodbus-*/ "$cache"/libmodbus_*
  (cd "$cache" && apt-get source -qq "libmodbus=$version" 2>&1 |
    { grep -v '^W: Download is performed unsandboxed' || true; })
  src=$(find "$cache" -maxdepth 1 -mindepth 1 -type d -name 'libmodbus-*' | head -n 1)
  [ -d "$src/tests" ] || { echo "apt-get source unpacked no libmodbus-*/tests"; return 1; }

  echo "== libmodbus: patching tests/unit-test-{client,server}.c, unit-test.h.in (ports, re-accept, continue)"
  (cd "$src" && patch -p1 --forward --no-backup-if-mismatch) <<'PATCH'
--- a/tests/unit-test.h.in
+++ b/tests/unit-test.h.in
@@ -101,4 +101,12 @@
 const uint32_t UT_IREAL_BADC = 0xF1470020;
 const uint32_t UT_IREAL_CDAB = 0x200047F1;*/
 
+/* mbsec: the port comes from UT_PORT (stock: 1502), so that the client, the TLS shim and the
+   server each get a port of their own on one host */
+#define UT_PORT_STRING (getenv("UT_PORT") ? getenv("UT_PORT") : "1502")
+#define UT_PORT_NUMBER (atoi(UT_PORT_STRING))
+/* mbsec: close the connection and wait for the next one (backend 0: TCP, 1: TCP_PI) */
+#define UT_REACCEPT(ctx, backend, s) (modbus_close(ctx), (backend) == 0 ? \
+    modbus_tcp_accept((ctx), (s)) : modbus_tcp_pi_accept((ctx), (s)))
+
 #endif /* _UNIT_TEST_H_ */
--- a/tests/unit-test-client.c
+++ b/tests/unit-test-client.c
@@ -14,6 +14,8 @@
 #include "unit-test.h"
 
 const int EXCEPTION_RC = 2;
+/* mbsec: UT_CONTINUE set: count a failed assertion and go on (stock: stop at the first) */
+static int ut_failures = 0;
 
 enum {
     TCP,
@@ -37,7 +39,9 @@
         printf("OK\n");                           \
     } else {                                      \
         BUG_REPORT(_cond, _format, ## __args);    \
-        goto close;                               \
+        ut_failures++;                            \
+        if (getenv("UT_CONTINUE") == NULL)        \
+            goto close;                           \
     }                                             \
 };
 
@@ -89,9 +93,9 @@
     }
 
     if (use_backend == TCP) {
-        ctx = modbus_new_tcp("127.0.0.1", 1502);
+        ctx = modbus_new_tcp("127.0.0.1", UT_PORT_NUMBER);
     } else if (use_backend == TCP_PI) {
-        ctx = modbus_new_tcp_pi("::1", "1502");
+        ctx = modbus_new_tcp_pi("::1", UT_PORT_STRING);
     } else {
         ctx = modbus_new_rtu("/dev/ttyUSB1", 115200, 'N', 8, 1);
     }
@@ -684,6 +688,10 @@
     ctx = modbus_new_tcp_pi(NULL, NULL);
     ASSERT_TRUE(ctx == NULL && errno == EINVAL, "");
 
+    if (ut_failures > 0) {
+        printf("\nEND OF TESTS: %d FAILED ASSERTION(S).\n", ut_failures);
+        goto close;
+    }
     printf("\nALL TESTS PASS WITH SUCCESS.\n");
     success = TRUE;
 
--- a/tests/unit-test-server.c
+++ b/tests/unit-test-server.c
@@ -57,10 +57,10 @@
     }
 
     if (use_backend == TCP) {
-        ctx = modbus_new_tcp("127.0.0.1", 1502);
+        ctx = modbus_new_tcp("127.0.0.1", UT_PORT_NUMBER);
         query = malloc(MODBUS_TCP_MAX_ADU_LENGTH);
     } else if (use_backend == TCP_PI) {
-        ctx = modbus_new_tcp_pi("::0", "1502");
+        ctx = modbus_new_tcp_pi("::1", UT_PORT_STRING);
         query = malloc(MODBUS_TCP_MAX_ADU_LENGTH);
     } else {
         ctx = modbus_new_rtu("/dev/ttyUSB0", 115200, 'N', 8, 1);
@@ -119,6 +119,11 @@
         /* The connection is not closed on errors which require on reply such as
            bad CRC in RTU. */
         if (rc == -1 && errno != EMBBADCRC) {
+            /* mbsec: like a PLC, accept the next connection (the proxy reconnects after
+               it reset its link); stock: quit */
+            if (use_backend != RTU && UT_REACCEPT(ctx, use_backend, &s) != -1) {
+                continue;
+            }
             /* Quit */
             break;
         }
@@ -166,7 +171,9 @@
                     continue;
                 }
 
-                /* Copy TID */
+                /* Copy TID (mbsec: both bytes; stock: the low one only, which breaks as soon
+                   as the peer's transaction ids pass 255, as a proxy's may) */
+                req[0] = query[0];
                 req[1] = query[1];
                 for (i=0; i < req_length; i++) {
                     printf("(%.2X)", req[i]);
@@ -182,6 +189,9 @@
 
         rc = modbus_reply(ctx, query, rc, mb_mapping);
         if (rc == -1) {
+            if (use_backend != RTU && UT_REACCEPT(ctx, use_backend, &s) != -1) {
+                continue;
+            }
             break;
         }
     }
PATCH

  echo "== libmodbus: autogen, configure, make"
  (cd "$src" && ./autogen.sh >/dev/null &&
   ./configure -q --disable-shared --without-documentation &&
   make -s -j"$(nproc)" >/dev/null && make -s -C tests unit-test-client unit-test-server >/dev/null)
  [ -x "$src/tests/unit-test-client" ] && [ -x "$src/tests/unit-test-server" ] ||
    { echo "make built no tests/unit-test-client and unit-test-server"; return 1; }
  {
    echo "version=$version"
    echo "source=$src"
    echo "client=$src/tests/unit-test-client"
    echo "server=$src/tests/unit-test-server"
    echo "stunnel=$(command -v stunnel4)"
    echo "script=$(sha256sum "$root/scripts/libmodbus.sh" | cut -d' ' -f1)"
  } >"$cache/BUILT.tmp"
  mv "$cache/BUILT.tmp" "$cache/BUILT"
  echo "== libmodbus: built $version: $src/tests/unit-test-{client,server}"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  # executed: do the work
  cd "$(dirname "$0")/.."
  if [ "${1:-build}" = build ]; then _mbsec_lm_build; exit $?; fi
  echo "usage: bash scripts/libmodbus.sh [build]" >&2
  exit 2
fi

# sourced (scripts/test.sh): quick when BUILT matches this script and its files exist
export MBSEC_LIBMODBUS_BUILT="$PWD/.cache/libmodbus/BUILT"
_mbsec_lm_ok() {
  local f=$MBSEC_LIBMODBUS_BUILT key val
  [ -f "$f" ] || return 1
  grep -qx "script=$(sha256sum scripts/libmodbus.sh | cut -d' ' -f1)" "$f" || return 1
  while IFS='=' read -r key val; do
    case $key in client|server|stunnel) [ -x "$val" ] || return 1 ;; esac
  done <"$f"
}
if _mbsec_lm_ok; then
  echo "== libmodbus: unit-test-client/-server $(sed -n 's/^version=//p' "$MBSEC_LIBMODBUS_BUILT") already built (.cache/libmodbus)"
else
  _mbsec_lm_started=$SECONDS
  mkdir -p .cache/libmodbus
  rm -f .cache/libmodbus/BUILT .cache/libmodbus/ERROR
  echo "== libmodbus: building unit-test-client/-server from Debian's source package (log: .cache/libmodbus/build.log)"
  if bash scripts/libmodbus.sh build >.cache/libmodbus/build.log 2>&1; then
    grep '^==' .cache/libmodbus/build.log | sed 's/^/   /'
    echo "== libmodbus: done in $((SECONDS - _mbsec_lm_started)) s"
  else
    tail -n 25 .cache/libmodbus/build.log | sed 's/^/   | /'
    echo "libmodbus build FAILED ($(grep '^==' .cache/libmodbus/build.log | tail -n 1 | sed 's/^== libmodbus: //')); see .cache/libmodbus/build.log" \
      | tee .cache/libmodbus/ERROR
    echo "   tests/e2e/test_libmodbus.py will fail; the other checks still run"
  fi
  unset _mbsec_lm_started
fi
unset -f _mbsec_lm_ok _mbsec_lm_build
