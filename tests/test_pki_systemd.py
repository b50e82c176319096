"""The renewal timer's service really renews a due certificate and calls the reload hook."""

from __future__ import annotations

import configparser
import datetime as dt
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from mbsec.pki.ca import CertificateAuthority
from mbsec.pki.cli import main

UNITS = Path(__file__).resolve().parents[1] / "deploy" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((UNITS / name).read_text().replace("\\\n", " "))
    return cp


def test_timer_is_persistent_and_starts_the_service() -> None:
    timer = unit("mbsec-pki-renew.timer")
    assert timer["Timer"]["Persistent"] in ("true", "yes")
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert (UNITS / "mbsec-pki-renew.service").is_file()  # the timer's default unit


def test_service_command_renews_when_due_and_reloads(tmp_path: Path) -> None:
    service = unit("mbsec-pki-renew.service")["Service"]
    assert service["Type"] == "oneshot"
    argv = shlex.split(service["ExecStart"].replace("$CA_PASS_ARGS", ""))
    assert argv[0].endswith("/mbsec-pki") and argv[1] == "renew"
    assert "--check" not in argv
    hook = argv[argv.index("--exec") + 1]
    assert hook.startswith("systemctl reload mbsec")
    cert_path = Path(argv[2])

    # run the same command against a throw-away CA with a certificate past 2/3 of its life
    ca = CertificateAuthority.init(tmp_path / "ca")
    now = dt.datetime.now(dt.UTC)
    files = ca.issue("server", "mbsec.plant.example", out_dir=tmp_path / "tls", name="server",
                     not_before=now - dt.timedelta(days=300), not_after=now + dt.timedelta(days=60))
    marker = tmp_path / "reloaded"
    fake_reload = f"{shlex.quote(sys.executable)} -c \"open(r'{marker}', 'w').write('1')\""
    local = [str(files.cert) if a == str(cert_path) else a for a in argv[1:]]
    local[local.index("--exec") + 1] = fake_reload
    assert main([local[0], "--dir", str(tmp_path / "ca"), *local[1:]]) == 0
    assert marker.exists()
    new = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert new.serial_number != files.serial
    assert main(["renew", "--check", "--dir", str(tmp_path / "ca"), str(files.cert)]) == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(UNITS / "mbsec-pki-renew.service"),
                        str(UNITS / "mbsec-pki-renew.timer")],
                       capture_output=True, text=True, timeout=60, check=False)
    problems = [li for li in (r.stdout + r.stderr).splitlines()
                if li.strip() and "is not executable" not in li and "mbsec.service" not in li]
    assert problems == [], problems
