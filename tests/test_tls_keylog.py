"""The TLS 1.3 client Certificate, decrypted with the handshake secret from OpenSSL's key log.

Real handshakes over memory BIOs (two ``ssl.SSLObject``s, real certificates from the test PKI):
the server context's key log goes into :class:`mbsec.tls_keylog.KeyLog`'s pipe, and
:class:`mbsec.tls_sniff.HandshakeTap` reads the leaf out of the client's encrypted flight.
The three TLS 1.3 cipher suites are covered end to end with ``openssl s_client`` in
tests/e2e/test_tls_rejections.py.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Iterator

import pytest
from conftest import Pki
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tls_sniff import _server_ctx, client_bytes, der_of

from mbsec.tls_keylog import BYTES_PER_HANDSHAKE, KeyLog
from mbsec.tls_sniff import HandshakeTap


@pytest.fixture
def keylog() -> Iterator[KeyLog]:
    kl = KeyLog.open(128)
    assert kl is not None, "this system gives no 128-handshake pipe"
    yield kl
    kl.close()


def logged_ctx(pki: Pki, keylog: KeyLog) -> ssl.SSLContext:
    ctx = _server_ctx(pki)
    keylog.attach(ctx)
    return ctx


def tap_of(data: bytes) -> HandshakeTap:
    tap = HandshakeTap()
    tap.feed(data)
    return tap


def test_rejected_tls13_client_certificate_is_decrypted(pki: Pki, keylog: KeyLog) -> None:
    """The rogue CA's client: OpenSSL rejects it, and its leaf is still read."""
    data = client_bytes(pki, pki.rogue, ssl.TLSVersion.TLSv1_3, logged_ctx(pki, keylog))
    tap = tap_of(data)
    assert tap.client_certificate() is None  # encrypted: nothing in clear
    secret = keylog.take(tap.client_random())
    assert secret is not None and len(secret) in (32, 48)
    assert tap.client_certificate_tls13(secret) == der_of(pki.rogue)
    assert keylog.held == 0


def test_accepted_tls13_client_certificate_is_decrypted(pki: Pki, keylog: KeyLog) -> None:
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_3, logged_ctx(pki, keylog))
    tap = tap_of(data)
    secret = keylog.take(tap.client_random())
    assert secret is not None
    assert tap.client_certificate_tls13(secret) == der_of(pki.operator)


def test_no_certificate_tls13(pki: Pki, keylog: KeyLog) -> None:
    data = client_bytes(pki, None, ssl.TLSVersion.TLSv1_3, logged_ctx(pki, keylog))
    tap = tap_of(data)
    secret = keylog.take(tap.client_random())
    assert secret is not None
    assert tap.client_certificate_tls13(secret) is None  # an empty Certificate message


def test_another_handshakes_secret_reads_nothing(pki: Pki, keylog: KeyLog) -> None:
    ctx = logged_ctx(pki, keylog)
    first = tap_of(client_bytes(pki, pki.rogue, ssl.TLSVersion.TLSv1_3, ctx))
    second = tap_of(client_bytes(pki, pki.rogue, ssl.TLSVersion.TLSv1_3, ctx))
    s1, s2 = keylog.take(first.client_random()), keylog.take(second.client_random())
    assert s1 is not None and s2 is not None and s1 != s2
    assert first.client_certificate_tls13(s2) is None
    assert second.client_certificate_tls13(s1) is None
    assert first.client_certificate_tls13(s1) == der_of(pki.rogue)
    assert first.client_certificate_tls13(b"\0" * 48) is None
    assert first.client_certificate_tls13(b"short") is None


def test_every_cut_is_none_or_the_certificate(pki: Pki, keylog: KeyLog) -> None:
    """A flight recorded only in part (the tap's bound, a client gone mid-record) reads
    nothing or the right leaf, never something else, never raises."""
    data = client_bytes(pki, pki.rogue, ssl.TLSVersion.TLSv1_3, logged_ctx(pki, keylog))
    full = tap_of(data)
    secret = keylog.take(full.client_random())
    assert secret is not None
    want = der_of(pki.rogue)
    found_at = None
    for cut in range(0, len(data) + 1):
        got = tap_of(data[:cut]).client_certificate_tls13(secret)
        assert got in (None, want)
        if got is not None and found_at is None:
            found_at = cut
    assert found_at is not None and found_at < len(data)  # before CertificateVerify/Finished


def test_tls12_handshakes_leave_no_secret(pki: Pki, keylog: KeyLog) -> None:
    """TLS 1.2 writes a CLIENT_RANDOM line (its master secret): read and dropped."""
    data = client_bytes(pki, pki.operator, ssl.TLSVersion.TLSv1_2, logged_ctx(pki, keylog))
    assert keylog.take(tap_of(data).client_random()) is None
    assert keylog.held == 0


def test_max_handshakes_in_progress_fit_in_the_pipe(pki: Pki) -> None:
    """The bound the proxy relies on: a pipe sized for N handshakes holds the lines of 2N
    handshakes all in progress at once (ServerHello and Finished written, none ended, nothing
    drained: N admitted and N evicted ones not yet unwound), then of their ends; OpenSSL's
    writer, inside the handshake, never blocks. (Five in this pipe do block it.) Run in a
    thread: a blocked writer fails the test instead of hanging it."""
    kl = KeyLog.open(2, pipe_size=4096)  # the smallest pipe: one page
    assert kl is not None and kl.handshakes_for(kl.capacity) == 2
    ctx = logged_ctx(pki, kl)
    result: list[object] = []

    def run() -> None:
        pairs = []
        for _ in range(4):
            s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
            server = ctx.wrap_bio(s_in, s_out, server_side=True)
            client = pki.client_ctx(pki.operator).wrap_bio(c_in, c_out,
                                                           server_hostname="localhost")
            pairs.append((server, client, s_in, s_out, c_in, c_out))
        for _ in range(6):  # every handshake one step at a time, side by side
            for server, client, s_in, s_out, c_in, c_out in pairs:
                for obj in (client, server):
                    with contextlib.suppress(ssl.SSLWantReadError):
                        obj.do_handshake()
                s_in.write(c_out.read())
                c_in.write(s_out.read())
        for _server, client, *_ in pairs:  # both ends finished (raises if not)
            client.write(b"x")
        result.append(sum(1 for p in pairs if p[0].version() == "TLSv1.3"))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "OpenSSL's key-log write blocked inside a handshake"
    assert result == [4]  # all four completed
    kl.drain()
    assert kl.held == 4  # nothing was taken: every line of the four sat in the pipe
    kl.close()


def test_open_refuses_a_pipe_too_small() -> None:
    """A pipe that cannot hold max_handshakes handshakes' lines could block OpenSSL inside a
    handshake: no key log then (the proxy reports ``unavailable``)."""
    with open("/proc/sys/fs/pipe-max-size") as f:
        most = int(f.read())
    assert KeyLog.open(most // (2 * BYTES_PER_HANDSHAKE) + 1) is None
    kl = KeyLog.open(1)
    assert kl is not None and kl.capacity >= BYTES_PER_HANDSHAKE
    kl.close()


def test_drain_keeps_only_client_handshake_secrets() -> None:
    kl = KeyLog.open(1)
    assert kl is not None
    try:
        rnd, sec = os.urandom(32), os.urandom(48)
        lines = (f"SERVER_HANDSHAKE_TRAFFIC_SECRET {rnd.hex()} {os.urandom(48).hex()}\n"
                 f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {rnd.hex()} {sec.hex()}\n"
                 f"CLIENT_TRAFFIC_SECRET_0 {rnd.hex()} {os.urandom(48).hex()}\n"
                 f"CLIENT_HANDSHAKE_TRAFFIC_SECRET zz {sec.hex()}\n"  # not hex: skipped
                 "# a comment\n").encode()
        os.write(kl._write_fd, lines[:50])  # a line split across reads
        kl.drain()
        os.write(kl._write_fd, lines[50:])
        kl.drain()
        assert kl.held == 1
        assert kl.take(rnd) == sec
        assert kl.take(rnd) is None
    finally:
        kl.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.binary(min_size=32, max_size=48))
def test_garbage_with_a_secret_never_raises(data: bytes, secret: bytes) -> None:
    tap = tap_of(b"\x17\x03\x03" + len(data).to_bytes(2, "big") + data)
    assert tap.client_certificate_tls13(secret) is None
    assert tap_of(data).client_random() is None or len(data) >= 38
