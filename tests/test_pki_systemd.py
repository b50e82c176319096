"""The renewal timer's service really renews a due certificate and calls the reload hook."""

from __future__ import annotations

import configparser
import datetime as dt
import shlex
import shutil
import subprocess
from pathlib import Path

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


def test_service_renews_when_due_then_installs_and_reloads(tmp_path: Path) -> None:
    """ExecStart renews the working copy (as mbsec-pki); ExecStartPost (privileged) installs a
    renewed certificate, chain and key for the proxy and reloads it, and does nothing when
    nothing was renewed. Both are run here as written, with the paths moved to tmp_path."""
    service = unit("mbsec-pki-renew.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] == "mbsec-pki"
    argv = shlex.split(service["ExecStart"].replace("$CA_PASS_ARGS", ""))
    assert argv[0].endswith("/mbsec-pki") and argv[1] == "renew"
    assert "--check" not in argv and "--exec" not in argv  # mbsec-pki cannot signal the proxy
    cert_path = Path(argv[2])
    work, etc = cert_path.parent, "/etc/mbsec/tls"
    post = service["ExecStartPost"]
    assert post.startswith("+/bin/sh -c ")
    script = shlex.split(post[1:])[2]
    assert "systemctl reload mbsec.service" in script and "-o mbsec -g mbsec -m 0600" in script

    # a throw-away CA and a server certificate past 2/3 of its life, issued into the working
    # copy; the proxy's directory holds the same files (as set up by docs/pki.md)
    ca = CertificateAuthority.init(tmp_path / "ca")
    now = dt.datetime.now(dt.UTC)
    files = ca.issue("server", "mbsec.plant.example", out_dir=tmp_path / "work", name="server",
                     not_before=now - dt.timedelta(days=300), not_after=now + dt.timedelta(days=60))
    proxy_dir = tmp_path / "etc"
    proxy_dir.mkdir()
    for f in (files.cert, files.chain, files.key):
        shutil.copy(f, proxy_dir / f.name)
    marker = tmp_path / "reloaded"
    local_script = (script.replace(str(work), str(tmp_path / "work")).replace(etc, str(proxy_dir))
                    .replace("-o mbsec -g mbsec ", "")  # no such users here
                    .replace("systemctl reload mbsec.service", f"touch {marker}"))

    def post_step() -> None:
        subprocess.run(["/bin/sh", "-c", local_script], check=True, timeout=30)

    post_step()  # nothing renewed yet: nothing installed, no reload
    assert not marker.exists()
    local = [files.cert.as_posix() if a == str(cert_path) else a for a in argv[1:]]
    assert main([local[0], "--dir", str(tmp_path / "ca"), *local[1:]]) == 0
    new = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert new.serial_number != files.serial
    post_step()
    assert marker.exists()
    for name in (files.cert.name, files.chain.name, files.key.name):
        installed = proxy_dir / name
        assert installed.read_bytes() == (files.cert.parent / name).read_bytes()
        assert installed.stat().st_mode & 0o777 == 0o600
    assert not list(proxy_dir.glob("*.new"))
    assert main(["renew", "--check", "--dir", str(tmp_path / "ca"), str(files.cert)]) == 0
