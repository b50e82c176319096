# rsyslog and its OpenSSL TLS driver: tests/test_sink_rsyslog.py starts its own rsyslogd
# (foreground, own config and work directory, 127.0.0.1) and mbsec sends it RFC 5424 over
# TCP and TLS. The service the package installs is not used (and may not even start here).
_mbsec_multiarch="$(uname -m)-linux-gnu"
apt_need /usr/sbin/rsyslogd:rsyslog \
  "/usr/lib/${_mbsec_multiarch}/rsyslog/lmnsd_ossl.so:rsyslog-openssl"
export MBSEC_RSYSLOGD=/usr/sbin/rsyslogd
unset _mbsec_multiarch
