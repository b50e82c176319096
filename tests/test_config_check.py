"""``mbsec config check`` refuses what loads but cannot work (a server certificate without
serverAuth, an expired CRL), warns for ``crl = []``, and the small things of its command
line: help texts, one "error:" per line for policy problems, a close key name suggested for
a typo, and a port clash that names the address taken."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from conftest import TEST_POLICY, Pki

from mbsec.cli import main
from mbsec.pki.ca import CertificateAuthority


def config(d: Path, pki: Pki, *, cert: Path | None = None, key: Path | None = None,
           crl: str | None = None, policy: str = TEST_POLICY, extra: str = "") -> Path:
    (d / "policy.yaml").write_text(policy)
    cfg = d / "mbsec.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:0"]\npolicy = "policy.yaml"\n{extra}\n'
        # its own admin socket: another mbsec on this host may hold the default one
        f'[admin]\nsocket = "{d / "admin.sock"}"\nstate_file = "{d / "state"}"\n'
        f'[tls]\ncert = "{cert or pki.server.chain}"\nkey = "{key or pki.server.key}"\n'
        f'client_ca = "{pki.ca.trust_bundle}"\n'
        f'crl = {crl if crl is not None else repr([str(pki.crl)]).replace(chr(39), chr(34))}\n'
        '[upstreams.plc]\nhost = "127.0.0.1"\nport = 5020\nunit_ids = [1, 2]\n')
    return cfg


def check(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["config", "check", str(cfg)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_good_configuration_is_ok(pki: Pki, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = check(config(tmp_path, pki), capsys)
    assert rc == 0 and ": ok (" in out and err == "", err


def test_a_server_certificate_without_server_auth_is_refused(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client certificate in tls.cert: every client would refuse the proxy."""
    rc, out, err = check(config(tmp_path, pki, cert=pki.operator.chain, key=pki.operator.key),
                         capsys)
    assert rc == 1 and "ok" not in out
    (line,) = err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'mbsec.toml'}: tls.cert: ")
    assert "has no serverAuth" in line and "(a client certificate)" in line
    assert "mbsec-pki issue server NAME --profile proxy-server" in line


def test_an_expired_crl_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   pki: Pki) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", common_name="Lapsed CA")
    server = ca.issue("server", "mbsec", dns=("localhost",), out_dir=tmp_path / "tls",
                      name="server")
    lapsed = ca.write_crl(tmp_path / "crl.pem", next_update_days=1,
                          now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2))
    cfg = config(tmp_path, pki, cert=server.chain, key=server.key, crl=f'["{lapsed}"]')
    cfg.write_text(cfg.read_text().replace(str(pki.ca.trust_bundle), str(ca.trust_bundle)))
    rc, out, err = check(cfg, capsys)
    assert rc == 1 and "ok" not in out
    (line,) = err.splitlines()
    assert f"tls.crl: {lapsed}: the CRL of CN=Lapsed CA expired at " in line
    assert "OpenSSL would reject every client" in line
    assert f"mbsec-pki crl --dir CA_DIR --out {lapsed}" in line


def test_no_crl_is_a_warning(pki: Pki, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = check(config(tmp_path, pki, crl="[]"), capsys)
    assert rc == 0 and ": ok (" in out
    (line,) = err.splitlines()
    assert line.startswith("warning: tls.crl = []: revocation is not checked")
    assert "mbsec-pki crl" in line


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["config", "check", "--help"])
    out = capsys.readouterr().out
    assert "serverAuth" in out and "Nothing is served" in out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "SIGHUP reloads" in out and "SIGTERM or SIGINT stop accepting, drain" in out


def test_policy_problems_say_error_once(pki: Pki, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = "version: 1\ndefault: deny\nrules:\n  - id: x\n    descripton: y\n"
    rc, _, err = check(config(tmp_path, pki, policy=bad), capsys)
    assert rc == 1
    lines = err.splitlines()
    assert len(lines) == 2, lines  # one line each, the hint on it
    assert all(line.count("error:") == 1 for line in lines), lines
    assert any("unknown key 'descripton' (hint: did you mean 'description'?" in x
               for x in lines)


@pytest.mark.parametrize("typo, close", [("limit", "limits"), ("listne", "listen"),
                                         ("tls.crll", "crl"), ("upstreams.plc.pool", "pool_size")])
def test_an_unknown_key_suggests_the_close_name(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str], typo: str, close: str
) -> None:
    cfg = config(tmp_path, pki)
    text = cfg.read_text()
    if typo == "limit":
        text += "[limit]\nmax_connections = 3\n"
    elif typo == "listne":
        text = 'listne = ["x"]\n' + text
    elif typo == "tls.crll":
        text = text.replace("crl = ", "crll = []\ncrl = ")
    else:
        text += "pool = 3\n"
    cfg.write_text(text)
    rc, _, err = check(cfg, capsys)
    assert rc == 1
    assert f"{typo}: unknown key; did you mean {close!r}?" in err, err


def test_a_port_clash_names_the_address_taken(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy, socket.socket() as free:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        free.bind(("127.0.0.1", 0))
        taken, unused = busy.getsockname()[1], free.getsockname()[1]
        free.close()
        cfg = config(tmp_path, pki, extra=f'[metrics]\nlisten = "127.0.0.1:{taken}"\n')
        cfg.write_text(cfg.read_text().replace('"127.0.0.1:0"', f'"127.0.0.1:{unused}"'))
        assert main(["serve", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen (metrics.listen 127.0.0.1:{taken}): Address already in use" in err
    assert f"127.0.0.1:{unused}" not in err
