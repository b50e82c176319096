"""`mbsec-pki` end to end through main(argv): outputs, exit codes, and the error paths."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from pki_helpers import der_of, needs_openssl, openssl

from mbsec.identity import parse_identity
from mbsec.pki.cli import EXIT_DUE, EXIT_ERROR, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main

COMMANDS = ["init", "issue", "csr", "sign", "renew", "revoke", "crl", "list", "show", "verify",
            "profiles"]


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [li for li in err.splitlines() if li.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("mbsec-pki ")
    return lines[0]


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "ca"
    code, out, _ = run(capsys, "init", "--dir", d, "--cn", "Plant CA", "--intermediate")
    assert code == EXIT_OK and "trust bundle" in out
    return d


@pytest.mark.parametrize("command", COMMANDS)
def test_help_with_examples(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out and f"mbsec-pki {command}" in out


def test_top_level_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "exit codes" in out
    code, _, err = run(capsys)
    assert code == EXIT_USAGE
    code, _, err = run(capsys, "issue", "robot", "x")
    assert code == EXIT_USAGE and "invalid choice" in err


def test_init_refuses_existing(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "init", "--dir", ca_dir)
    assert code == EXIT_ERROR and "refusing to overwrite" in one_line_error(err)


def test_issue_with_profiles(ca_dir: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "certs"
    code, out, _ = run(capsys, "issue", "client", "hmi-01", "--profile", "hmi-operator",
                       "--dir", ca_dir, "--out-dir", out_dir)
    assert code == EXIT_OK and "role=operator" in out
    ident = parse_identity(der_of(out_dir / "hmi-01.crt"))
    assert ident.role == "operator" and ident.organizational_units == ("HMI",)
    assert stat.S_IMODE((out_dir / "hmi-01.key").stat().st_mode) == 0o600

    code, out, _ = run(capsys, "issue", "client", "historian-01", "--profile", "historian",
                       "--dir", ca_dir, "--out-dir", out_dir)
    assert code == EXIT_OK and "(no role)" in out
    assert parse_identity(der_of(out_dir / "historian-01.crt")).role is None

    code, out, _ = run(capsys, "issue", "client", "acme", "--profile", "vendor",
                       "--role", "vendor-ro", "--dir", ca_dir, "--out-dir", out_dir)
    assert code == EXIT_OK
    cert = x509.load_pem_x509_certificate((out_dir / "acme.crt").read_bytes())
    assert parse_identity(der_of(out_dir / "acme.crt")).role == "vendor-ro"  # CLI beats profile
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 7 <= life.days <= 7 + 1  # the vendor profile's short lifetime

    code, _, _ = run(capsys, "issue", "client", "eng-01", "--profile", "engineering-workstation",
                     "--no-role", "--dir", ca_dir, "--out-dir", out_dir)
    assert code == EXIT_OK and parse_identity(der_of(out_dir / "eng-01.crt")).role is None

    code, out, _ = run(capsys, "issue", "server", "mbsec.plant.example", "--profile",
                       "proxy-server", "--ip", "127.0.0.1", "--dir", ca_dir, "--out-dir", out_dir)
    assert code == EXIT_OK
    code, out, _ = run(capsys, "profiles", "--dir", ca_dir)
    for name in ("proxy-server", "hmi-operator", "engineering-workstation", "historian", "vendor"):
        assert name in out


def test_builtin_profiles_ship_with_the_package() -> None:
    """--profile must work from an installed wheel: the profiles are package data (the
    repository's pki/profiles links to them), not files next to a source checkout."""
    import tomllib

    import mbsec
    from mbsec.pki.profiles import builtin_profile_dir

    package = Path(mbsec.__file__).resolve().parent
    shipped = builtin_profile_dir()
    assert shipped.is_relative_to(package)
    names = {p.stem for p in shipped.glob("*.yaml")}
    assert {"proxy-server", "hmi-operator", "engineering-workstation", "historian",
            "vendor"} <= names
    root = package.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["mbsec"]
    assert any(sorted(package.glob(pat)) == sorted(shipped.glob("*.yaml")) for pat in patterns)
    assert (root / "pki" / "profiles").resolve() == shipped


@pytest.mark.parametrize(("argv", "message"), [
    (["issue", "client", "x", "--profile", "nope"], "unknown profile 'nope'"),
    (["issue", "client", "x", "--profile", "proxy-server"], "is for server certificates"),
    (["issue", "server", "x y", "--role", "operator"], "client certificates only"),
    (["issue", "client", "x", "--ip", "1.2.3"], "not a valid IP address"),
    (["issue", "client", "x", "--role", " op"], "invalid role"),
    (["revoke", "ABCDEF"], "not in this CA's index"),
    (["revoke", "not-hex!"], "neither a certificate file nor a hex serial"),
    (["show", "missing.crt"], "certificate file not found"),
    (["sign", "client", "missing.csr"], "CSR file not found"),
    (["renew", "missing.crt"], "certificate file not found"),
    (["issue", "client", "x", "--now", "yesterday"], "not an ISO 8601 time"),
])
def test_user_mistakes_are_one_line_errors(ca_dir: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    uses_dir = argv[0] in ("issue", "revoke", "sign", "renew")
    code, _, err = run(capsys, *argv, *(["--dir", str(ca_dir)] if uses_dir else []))
    assert code == EXIT_ERROR
    assert message in one_line_error(err)


def test_missing_and_corrupted_ca(tmp_path: Path, ca_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "list", "--dir", tmp_path / "none")
    assert code == EXIT_ERROR and "no such CA directory" in one_line_error(err)
    (ca_dir / "index.json").write_text("[1, 2")
    code, _, err = run(capsys, "list", "--dir", ca_dir)
    assert code == EXIT_ERROR and "corrupted" in one_line_error(err)
    (ca_dir / "private" / "intermediate.key").write_text("-----BEGIN PRIVATE KEY-----\nxx\n")
    (ca_dir / "index.json").write_text('{"crl_number": 1, "certificates": []}')
    code, _, err = run(capsys, "issue", "client", "x", "--dir", ca_dir, "--out-dir", tmp_path)
    assert code == EXIT_ERROR and "not a readable PEM private key" in one_line_error(err)
    (ca_dir / "private" / "intermediate.key").unlink()
    code, _, err = run(capsys, "crl", "--dir", ca_dir)
    assert code == EXIT_ERROR and "private key file not found" in one_line_error(err)


def test_refuses_overwrite_then_force(ca_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    args = ["issue", "client", "hmi-01", "--dir", str(ca_dir), "--out-dir", str(tmp_path)]
    assert run(capsys, *args)[0] == EXIT_OK
    key_before = (tmp_path / "hmi-01.key").read_bytes()
    code, _, err = run(capsys, *args)
    assert code == EXIT_ERROR and "already exists (use --force" in one_line_error(err)
    assert (tmp_path / "hmi-01.key").read_bytes() == key_before
    assert run(capsys, *args, "--force")[0] == EXIT_OK
    assert (tmp_path / "hmi-01.key").read_bytes() != key_before


def test_passphrases_from_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pw = tmp_path / "ca.pass"
    pw.write_text("correct horse\n")
    d = tmp_path / "ca"
    code, out, _ = run(capsys, "init", "--dir", d, "--encrypt-keys", "--ca-passphrase-file", pw)
    assert code == EXIT_OK and "[encrypted]" in out
    # without a terminal and without the file, a clear error instead of a hang
    code, _, err = run(capsys, "issue", "client", "x", "--dir", d, "--out-dir", tmp_path)
    assert code == EXIT_ERROR and "passphrase" in one_line_error(err)
    leaf_pw = tmp_path / "leaf.pass"
    leaf_pw.write_text("leaf secret")
    code, _, _ = run(capsys, "issue", "client", "x", "--dir", d, "--out-dir", tmp_path,
                     "--ca-passphrase-file", pw, "--key-passphrase-file", leaf_pw)
    assert code == EXIT_OK
    assert b"ENCRYPTED" in (tmp_path / "x.key").read_bytes()
    empty = tmp_path / "empty.pass"
    empty.write_text("\n")
    code, _, err = run(capsys, "crl", "--dir", d, "--ca-passphrase-file", empty)
    assert code == EXIT_ERROR and "empty" in one_line_error(err)


def test_csr_and_sign(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "device"
    code, out, _ = run(capsys, "csr", "hmi-07", "--role", "admin", "--dns", "hmi-07.plant",
                       "--key-out", dev / "hmi-07.key", "--csr-out", dev / "hmi-07.csr")
    assert code == EXIT_OK and "stays on this device" in out
    assert stat.S_IMODE((dev / "hmi-07.key").stat().st_mode) == 0o600
    code, _, err = run(capsys, "csr", "hmi-07", "--key-out", dev / "hmi-07.key",
                       "--csr-out", dev / "other.csr")
    assert code == EXIT_ERROR and "already exists" in one_line_error(err)
    code, _, err = run(capsys, "sign", "client", dev / "hmi-07.csr", "--profile", "hmi-operator",
                       "--dir", ca_dir)
    assert code == EXIT_OK
    assert "asks for role 'admin'; ignored" in err
    ident = parse_identity(der_of(dev / "hmi-07.crt"))
    assert ident.role == "operator" and ident.san_dns == ()
    code, _, _ = run(capsys, "sign", "server", dev / "hmi-07.csr", "--use-csr-sans", "--no-role",
                     "--out", dev / "srv.crt", "--dir", ca_dir)
    assert code == EXIT_OK
    assert parse_identity(der_of(dev / "srv.crt")).san_dns == ("hmi-07.plant",)
    (tmp_path / "junk.csr").write_text("junk")
    code, _, err = run(capsys, "sign", "client", tmp_path / "junk.csr", "--dir", ca_dir)
    assert code == EXIT_ERROR and "not a readable CSR" in one_line_error(err)


def test_renew_check_and_exec(ca_dir: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    t0 = "2030-01-01T00:00:00+00:00"
    # the CA must outlive the leaf, so make one valid at t0
    d = tmp_path / "ca2"
    assert run(capsys, "init", "--dir", d, "--now", t0)[0] == EXIT_OK
    assert run(capsys, "issue", "server", "proxy.example", "--days", "90", "--dir", d,
               "--out-dir", tmp_path, "--now", t0)[0] == EXIT_OK
    crt = tmp_path / "proxy.example.crt"
    serial0 = x509.load_pem_x509_certificate(crt.read_bytes()).serial_number

    code, out, _ = run(capsys, "renew", "--check", crt, "--dir", d, "--now", "2030-02-01")
    assert code == EXIT_OK and "not due" in out
    code, out, _ = run(capsys, "renew", "--check", crt, "--dir", d, "--now", "2030-03-02T01:00")
    assert code == EXIT_DUE and "due" in out
    assert x509.load_pem_x509_certificate(crt.read_bytes()).serial_number == serial0  # unchanged

    marker = tmp_path / "hook.txt"
    hook = f"{sys.executable} -c \"import os,pathlib; pathlib.Path(r'{marker}').write_text(" \
           f"os.environ['MBSEC_PKI_RENEWED'])\""
    code, out, _ = run(capsys, "renew", crt, "--dir", d, "--now", "2030-02-01", "--exec", hook)
    assert code == EXIT_OK and not marker.exists()  # nothing due: no hook
    code, out, _ = run(capsys, "renew", crt, "--dir", d, "--now", "2030-03-02T01:00",
                       "--exec", hook)
    assert code == EXIT_OK and "renewed" in out
    assert marker.read_text() == str(crt)
    new = x509.load_pem_x509_certificate(crt.read_bytes())
    assert new.serial_number != serial0
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["proxy.example"]

    code, out, _ = run(capsys, "list", "--dir", d, "--json", "--now", "2030-03-02T02:00")
    states = {r["serial"]: r["state"] for r in json.loads(out)}
    assert states == {f"{serial0:X}": "superseded", f"{new.serial_number:X}": "valid"}

    code, _, err = run(capsys, "renew", crt, "--force", "--dir", d, "--exec", "exit 7")
    assert code == EXIT_ERROR and "exit code 7" in one_line_error(err)
    code, _, err = run(capsys, "renew", crt, "--threshold", "1.5", "--dir", d)
    assert code == EXIT_ERROR and "--threshold" in one_line_error(err)


def test_revoke_crl_list_show_verify(ca_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for cn, role in (("hmi-01", "operator"), ("acme", "vendor")):
        assert run(capsys, "issue", "client", cn, "--role", role, "--dir", ca_dir,
                   "--out-dir", tmp_path)[0] == EXIT_OK
    crl = ca_dir / "crl.pem"
    code, out, _ = run(capsys, "verify", tmp_path / "acme-chain.pem", "--dir", ca_dir / "ca.crt",
                       "--crl", crl, "--purpose", "client")
    assert code == EXIT_OK and "OK" in out and "role vendor" in out
    code, _, err = run(capsys, "verify", tmp_path / "acme-chain.pem", "--dir", ca_dir,
                       "--purpose", "server")
    assert code == EXIT_INVALID and "lacks serverAuth" in err
    code, _, err = run(capsys, "verify", tmp_path / "acme.crt", "--dir", ca_dir)
    assert code == EXIT_INVALID and "no chain" in err
    # --ca: the old spelling of --dir, still accepted, with a warning
    code, out, err = run(capsys, "verify", tmp_path / "acme-chain.pem", "--ca", ca_dir)
    assert code == EXIT_OK and "OK" in out
    assert "warning: --ca is deprecated, use --dir" in err

    code, out, _ = run(capsys, "revoke", tmp_path / "acme.crt", "--reason",
                       "cessation_of_operation", "--dir", ca_dir)
    assert code == EXIT_OK and "CRL updated" in out
    code, _, err = run(capsys, "verify", tmp_path / "acme-chain.pem", "--ca", ca_dir,
                       "--crl", crl)
    assert code == EXIT_INVALID and "revoked" in err

    hmi = x509.load_pem_x509_certificate((tmp_path / "hmi-01.crt").read_bytes())
    hmi_serial = f"{hmi.serial_number:X}"
    code, out, _ = run(capsys, "revoke", hmi_serial.lower(), "--no-crl", "--dir", ca_dir)
    assert code == EXIT_OK and "CRL updated" not in out
    code, out, _ = run(capsys, "crl", "--dir", ca_dir, "--next-update-days", "30")
    assert code == EXIT_OK and "2 revoked" in out

    code, out, _ = run(capsys, "list", "--dir", ca_dir)
    assert code == EXIT_OK and out.count("revoked") == 2
    code, out, _ = run(capsys, "list", "--dir", ca_dir, "--json", "--status", "revoked")
    rows = json.loads(out)
    assert {r["common_name"] for r in rows} == {"hmi-01", "acme"}
    code, out, _ = run(capsys, "list", "--dir", ca_dir, "--status", "expiring", "--within", "400")
    assert code == EXIT_OK and "no certificates" in out
    code, out, _ = run(capsys, "list", "--dir", ca_dir, "--status", "expired",
                       "--now", "2040-01-01")
    assert "no certificates" in out  # all are revoked, which wins over expired

    code, out, _ = run(capsys, "show", tmp_path / "hmi-01.crt")
    assert code == EXIT_OK
    for field in ("subject:     CN=hmi-01", "role:        operator", "usage:       clientAuth",
                  "days left", "sha256:", "issuer:      CN=Plant CA Issuing"):
        assert field in out
    code, out, _ = run(capsys, "show", tmp_path / "hmi-01.crt", "--now", "2099-01-01")
    assert "EXPIRED" in out
    (tmp_path / "bad.pem").write_text("garbage")
    code, _, err = run(capsys, "show", tmp_path / "bad.pem")
    assert code == EXIT_ERROR and "not a readable certificate" in one_line_error(err)


@needs_openssl
def test_cli_certificates_pass_openssl(ca_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "issue", "server", "proxy.example", "--dir", ca_dir,
               "--out-dir", tmp_path)[0] == EXIT_OK
    assert run(capsys, "issue", "client", "hmi-01", "--role", "operator", "--dir", ca_dir,
               "--out-dir", tmp_path, "--key-type", "rsa-2048")[0] == EXIT_OK
    for name in ("proxy.example", "hmi-01"):
        chain = tmp_path / f"{name}-chain.pem"
        r = openssl("verify", "-CAfile", ca_dir / "ca.crt", "-untrusted", chain,
                    "-crl_check", "-CRLfile", ca_dir / "crl.pem", chain)
        assert r.returncode == 0, r.stderr


def test_installed_console_script(tmp_path: Path) -> None:
    exe = shutil.which("mbsec-pki", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("mbsec-pki console script not installed")
    r = subprocess.run([exe, "init", "--dir", str(tmp_path / "ca")], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([exe, "list", "--dir", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=60, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_passphrase_prompt_needs_a_terminal(ca_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    code, _, err = run(capsys, "issue", "client", "x", "--key-passphrase-prompt", "--dir", ca_dir,
                       "--out-dir", tmp_path)
    assert code == EXIT_ERROR and "no terminal" in one_line_error(err)
    assert not (tmp_path / "x.key").exists()


def test_passphrase_prompt_on_a_terminal(ca_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    answers = iter(["typed secret", "typed secret"])
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    code, _, _ = run(capsys, "issue", "client", "x", "--key-passphrase-prompt", "--dir", ca_dir,
                     "--out-dir", tmp_path)
    assert code == EXIT_OK
    from mbsec.pki.files import load_key

    load_key(tmp_path / "x.key", b"typed secret")
    answers = iter(["one", "two"])
    code, _, err = run(capsys, "issue", "client", "y", "--key-passphrase-prompt", "--dir", ca_dir,
                       "--out-dir", tmp_path)
    assert code == EXIT_ERROR and "do not match" in one_line_error(err)
