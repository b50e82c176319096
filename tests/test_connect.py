"""``mbsec connect`` without a server: its options (loopback by default, a remote listen address
only when asked), one-line errors for bad input and a taken port, and the shared backoff on a
simulated clock. End to end with real masters: tests/e2e/test_connect.py."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from conftest import Pki
from hypothesis import given
from hypothesis import strategies as st

from mbsec.connect import Backoff, classify, main, normalize_fingerprint


def args(pki: Pki, *extra: str, cert: Path | None = None) -> list[str]:
    return ["--server", "127.0.0.1:1", "--cert", str(cert or pki.operator.chain),
            "--key", str(pki.operator.key), "--ca", str(pki.ca.trust_bundle), *extra]


def test_a_non_loopback_listen_address_needs_allow_remote(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(pki, "--listen", "0.0.0.0:1502")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--listen 0.0.0.0:1502: not a loopback address" in err
    assert "--allow-remote" in err


def test_bad_options_are_one_line_each(pki: Pki, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--server", "mbsec.plant.local", "--cert", str(tmp_path / "nope.pem"),
               "--key", str(tmp_path / "nope.key"), "--ca", str(pki.ca.trust_bundle),
               "--server-sha256", "12:34", "--retry-for", "0"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1
    assert all(line.startswith("mbsec connect: error: ") for line in err), err
    assert any("--server-sha256: '12:34' is not a SHA-256 fingerprint" in x for x in err)
    assert any("--retry-for: must be > 0" in x for x in err)
    # the files are checked once the options are right
    rc = main(["--server", "mbsec.plant.local", "--cert", str(tmp_path / "nope.pem"),
               "--key", str(tmp_path / "nope.key"), "--ca", str(pki.ca.trust_bundle)])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and len(err) == 2, err
    assert f"--cert: file not found: {tmp_path / 'nope.pem'}" in err[0]
    assert f"--key: file not found: {tmp_path / 'nope.key'}" in err[1]


def test_a_server_certificate_as_the_master_certificate_is_refused_with_the_fix(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args(pki, cert=pki.server.chain)) == 1
    err = capsys.readouterr().err
    assert "is not a client certificate (no clientAuth" in err
    assert "mbsec-pki issue client" in err


def test_a_taken_port_names_the_address(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(args(pki, "--listen", f"127.0.0.1:{port}")) == 1
    err = capsys.readouterr().err
    assert f"mbsec connect: error: cannot listen on 127.0.0.1:{port}: " in err
    assert "in use" in err and err.count("\n") == 1


def test_fingerprints_are_normalized() -> None:
    hexa = "ab" * 32
    assert normalize_fingerprint(":".join(["AB"] * 32)) == hexa
    assert normalize_fingerprint(hexa.upper()) == hexa
    with pytest.raises(ValueError, match="mbsec-pki show"):
        normalize_fingerprint("ab" * 31)


def test_server_certificate_failures_are_final_and_named() -> None:
    mismatch = ssl.SSLCertVerificationError(1, "certificate verify failed")
    mismatch.verify_code = 62
    mismatch.verify_message = "Hostname mismatch, certificate is not valid for 'x'."
    f = classify(mismatch)
    assert (f.reason, f.retry) == ("server_name_mismatch", False)
    assert "Hostname mismatch" in f.detail
    unknown = ssl.SSLCertVerificationError(1, "certificate verify failed")
    unknown.verify_code = 20
    unknown.verify_message = "unable to get local issuer certificate"
    assert classify(unknown).reason == "server_unknown_ca"
    eof = classify(ConnectionResetError(104, "Connection reset by peer"))
    assert (eof.reason, eof.retry) == ("server_closed", True)


@given(st.lists(st.sampled_from(["fail", "ok"]), max_size=40),
       st.floats(0.01, 2.0), st.floats(0.01, 30.0))
def test_backoff_doubles_on_failures_is_capped_and_a_success_clears_it(
    steps: list[str], initial: float, maximum: float
) -> None:
    """On a simulated clock: each failure waits initial * 2**(n-1) (n failures in a row),
    never more than ``maximum``; a success lets the next attempt start at once."""
    b = Backoff(initial, maximum)
    now = 0.0
    streak = 0
    for step in steps:
        assert b.wait(now) >= 0
        now += b.wait(now)  # the next attempt starts when the backoff allows
        assert b.wait(now) == 0
        if step == "fail":
            delay = b.failed(now)
            assert delay == pytest.approx(min(maximum, initial * 2 ** streak))
            assert b.wait(now) == pytest.approx(delay)
            streak += 1
        else:
            b.succeeded()
            streak = 0
            assert b.wait(now) == 0
