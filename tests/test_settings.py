"""Configuration: TOML + MBSEC_* environment, strictness, one clear line per problem, and
`mbsec config check` (which loads TLS material, CRLs and the policy and cross-checks targets)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TEST_POLICY, Pki

from mbsec.cli import main as mbsec_main
from mbsec.settings import SettingsError, load_settings, parse_hostport


def write_config(d: Path, pki: Pki, extra: str = "", *, policy: str = TEST_POLICY,
                 upstream: str | None = None) -> Path:
    (d / "policy.yaml").write_text(policy, encoding="utf-8")
    up = upstream if upstream is not None else (
        '[upstreams.plc]\nhost = "127.0.0.1"\nport = 5020\nunit_ids = [1, 2]\n'
    )
    cfg = d / "mbsec.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:8020"]\npolicy = "policy.yaml"\n{extra}\n'
        f'[tls]\ncert = "{pki.server.chain}"\nkey = "{pki.server.key}"\n'
        f'client_ca = "{pki.ca.trust_bundle}"\ncrl = ["{pki.crl}"]\n\n{up}'
        '\n[admin]\nsocket = "admin.sock"\nstate_file = "state"\n',  # not /run/mbsec
        encoding="utf-8",
    )
    return cfg


def test_defaults_and_relative_paths(tmp_path: Path, pki: Pki) -> None:
    s = load_settings(write_config(tmp_path, pki))
    assert s.policy == tmp_path.resolve() / "policy.yaml"  # relative to the config file
    assert s.tls.min_version == "1.2"
    assert s.limits.max_pipelined >= 1
    assert s.logging.allowed_requests == "debug"
    [t] = s.upstream_targets()
    assert (t.name, t.host, t.port, t.unit_ids, t.pool_size, t.depth) == (
        "plc", "127.0.0.1", 5020, frozenset({1, 2}), 2, 1)


def test_default_listen_port_is_802(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace('listen = ["127.0.0.1:8020"]\n', ""))
    assert load_settings(cfg).listen_addresses() == [("0.0.0.0", 802)]


def test_environment_overrides_the_file(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MBSEC_LIMITS__IDLE_TIMEOUT", "12.5")
    monkeypatch.setenv("MBSEC_TLS__MIN_VERSION", "1.3")
    monkeypatch.setenv("MBSEC_LISTEN", '["127.0.0.1:9999"]')
    s = load_settings(write_config(tmp_path, pki, "[limits]\nidle_timeout = 60\n"))
    assert s.limits.idle_timeout == 12.5
    assert s.tls.min_version == "1.3"
    assert s.listen == ["127.0.0.1:9999"]


def test_unknown_key_is_one_clear_line(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(tmp_path, pki, "[limits]\nmax_conections = 5\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(cfg)
    assert ei.value.problems == [f"{cfg}: limits.max_conections: unknown key; did you mean "
                                 "'max_connections'? (docs/config.md)"]


@pytest.mark.parametrize("value", ["-1", "20", '"low"'])
def test_handshake_nice_out_of_range_is_one_clear_line(
    tmp_path: Path, pki: Pki, value: str
) -> None:
    """``limits.handshake_nice`` is a number of nice steps, 0..19 (Linux's range): anything
    else is one line naming the key, not a traceback nor a silent clamp."""
    cfg = write_config(tmp_path, pki, f"[limits]\nhandshake_nice = {value}\n")
    with pytest.raises(SettingsError) as ei:
        load_settings(cfg)
    [line] = ei.value.problems
    assert line.startswith(f"{cfg}: limits.handshake_nice: ")
    assert "0..19" in line if value != '"low"' else "integer" in line


def test_handshake_nice_defaults_to_no_change(tmp_path: Path, pki: Pki) -> None:
    assert load_settings(write_config(tmp_path, pki)).limits.handshake_nice == 0
    cfg = write_config(tmp_path, pki, "[limits]\nhandshake_nice = 19\n")
    assert load_settings(cfg).limits.handshake_nice == 19


def test_every_problem_is_reported(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(
        tmp_path, pki, '[logging]\nformat = "xml"\n',
        upstream='[upstreams.a]\nhost = "h"\nunit_ids = [1, 300]\n'
                 '[upstreams.b]\nhost = "h2"\nunit_ids = [2]\nport = 0\n',
    )
    with pytest.raises(SettingsError) as ei:
        load_settings(cfg)
    text = "\n".join(ei.value.problems)
    assert "logging.format" in text
    assert "upstreams.a.unit_ids" in text and "0..255" in text
    assert "upstreams.b.port" in text
    assert all(p.startswith(f"{cfg}: ") for p in ei.value.problems)


@pytest.mark.parametrize(("host", "ok"), [("10.20.0.5:502", False), ("plc-1:502", False),
                                          ("", False), ("::1", True), ("[::1]", True),
                                          ("plc-1.plant.example", True),
                                          ("plc-1..plant.example", False), ("x" * 64, False)])
def test_upstream_host_takes_no_port(tmp_path: Path, pki: Pki, host: str, ok: bool) -> None:
    cfg = write_config(tmp_path, pki, upstream=f'[upstreams.plc]\nhost = "{host}"\n'
                       'port = 5020\nunit_ids = [1]\n')
    if ok:
        assert load_settings(cfg).upstreams["plc"].host == host.strip("[]")
        return
    with pytest.raises(SettingsError) as exc:
        load_settings(cfg)
    assert exc.value.problems[0].startswith(f"{cfg}: upstreams.plc.host: ")


def test_unit_routed_twice(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(tmp_path, pki, upstream=(
        '[upstreams.a]\nhost = "h"\nunit_ids = [1]\n[upstreams.b]\nhost = "i"\nunit_ids = [1]\n'))
    with pytest.raises(SettingsError, match="unit id 1 is routed to both"):
        load_settings(cfg)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="file not found"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = [\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(bad)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('policy = "r\xe8gles.yaml"\n'.encode("latin-1"))
    with pytest.raises(SettingsError, match="not UTF-8"):
        load_settings(latin1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:802", ("127.0.0.1", 802)), ("[::1]:8020", ("::1", 8020)),
     (":802", ("", 802)), ("plc.local", ("plc.local", 502))],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text, default_port=502) == expected


def test_parse_hostport_rejects() -> None:
    for bad in ("h:99999", "h:x", "[::1"):
        with pytest.raises(ValueError):
            parse_hostport(bad, default_port=1)


# -- mbsec config check ---------------------------------------------------------------------


def test_config_check_ok(tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    assert mbsec_main(["config", "check", str(write_config(tmp_path, pki))]) == 0
    out = capsys.readouterr()
    assert "ok" in out.out
    assert out.err == ""  # the mbsec-pki chain file ends with the root: no R-46 warning


def test_config_check_warns_when_the_chain_stops_short_of_the_root(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(str(pki.server.chain), str(pki.server.cert)))
    assert mbsec_main(["config", "check", str(cfg)]) == 0  # it works, clients hold the root
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: tls.cert: ") and "R-46" in err[0], err


def test_config_check_missing_tls_file(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(str(pki.server.key), str(tmp_path / "gone.key")))
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"tls.key: file not found: {tmp_path / 'gone.key'}" in err
    assert "Traceback" not in err


def test_config_check_key_does_not_match(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(str(pki.server.key), str(pki.operator.key)))
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    assert "does the key match the certificate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "content", "expected"),
    [
        ("cert", b"garbage\n", "not a PEM certificate chain"),
        ("key", b"garbage\n", "not a PEM private key"),
        ("key", b"-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n"
                b"-----END ENCRYPTED PRIVATE KEY-----\n", "the private key is encrypted"),
        ("client_ca", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
         "not a PEM bundle of CA certificates"),
        ("crl", b"garbage\n", "not a PEM or DER CRL"),
    ],
)
def test_config_check_corrupt_tls_file_is_one_line(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], key: str, content: bytes,
    expected: str,
) -> None:
    """A corrupt or passphrase-protected PEM names the key and the file (and never makes
    OpenSSL prompt for a passphrase on the terminal)."""
    original = {"cert": pki.server.chain, "key": pki.server.key,
                "client_ca": pki.ca.trust_bundle, "crl": pki.crl}[key]
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(str(original), str(bad)))
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f": {bad}: {expected}" in err[0], err


def test_config_check_bad_policy_and_cross_check(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, pki, policy="version: 1\ndefault: allow\nrules: []\n")
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    assert "policy.yaml" in capsys.readouterr().err

    named = TEST_POLICY.replace("    unit_ids: [1, 2]\n",
                                '    unit_ids: [1, 2]\n    upstream: "10.0.0.9:502"\n')
    cfg = write_config(tmp_path, pki, policy=named)
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "targets.plc.upstream: 10.0.0.9:502 is not the host:port of any" in err

    unrouted = TEST_POLICY.replace("unit_ids: [1, 2]", "unit_ids: [1, 2, 7]")
    cfg = write_config(tmp_path, pki, policy=unrouted)
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    assert "unit id 7 is not routed" in capsys.readouterr().err


def test_config_check_refuses_an_expired_crl(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    import datetime as dt

    old = pki.ca.write_crl(tmp_path / "old.crl", next_update_days=1,
                           now=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    cfg = write_config(tmp_path, pki)
    cfg.write_text(cfg.read_text().replace(f'crl = ["{pki.crl}"]', f'crl = ["{old}"]'))
    assert mbsec_main(["config", "check", str(cfg)]) == 1  # OpenSSL would reject everyone
    assert "expired at" in capsys.readouterr().err


def test_serve_reports_config_problems_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('policy = "p.yaml"\n[tls]\ncert = "a"\n')
    assert mbsec_main(["serve", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "tls.key: required key is missing" in err
    assert "tls.client_ca: required key is missing" in err
    assert "Traceback" not in err


def test_deploy_sample_config_is_valid() -> None:
    cfg = Path(__file__).resolve().parent.parent / "deploy" / "mbsec.toml"
    s = load_settings(cfg)
    assert s.listen_addresses() == [("0.0.0.0", 802)]
    assert s.tls.cert == cfg.parent / "tls" / "server-chain.pem"
    assert [t.name for t in s.upstream_targets()] == ["line1-plc"]


def test_serve_port_in_use_is_one_line(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, pki)
        cfg.write_text(cfg.read_text().replace("127.0.0.1:8020", f"127.0.0.1:{port}"))
        assert mbsec_main(["serve", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen (127.0.0.1:{port}): Address already in use" in err
    assert "Traceback" not in err


def test_build_settings_can_ignore_the_environment(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mbsec.settings import build_settings

    monkeypatch.setenv("MBSEC_LIMITS__IDLE_TIMEOUT", "1")
    data = {"policy": "p.yaml", "tls": {"cert": "c", "key": "k", "client_ca": "a"}}
    assert build_settings(data).limits.idle_timeout == 1
    assert build_settings(data, environment=False).limits.idle_timeout == 300


def test_unit_rewrite_from_toml(tmp_path: Path, pki: Pki) -> None:
    cfg = write_config(tmp_path, pki, upstream=(
        '[upstreams.gw]\nhost = "10.0.0.9"\nunit_ids = [10, 11]\n'
        'unit_rewrite = { 10 = 1, 11 = 2 }\n'))
    [t] = load_settings(cfg).upstream_targets()
    assert dict(t.unit_rewrite) == {10: 1, 11: 2}
    bad = write_config(tmp_path, pki, upstream=(
        '[upstreams.gw]\nhost = "h"\nunit_ids = [10]\nunit_rewrite = { 12 = 1 }\n'))
    with pytest.raises(SettingsError, match="unit 12 is not in unit_ids"):
        load_settings(bad)


def test_config_check_reports_unusable_log_sinks(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    cfg = write_config(tmp_path, pki, f'[logging]\nfile = "{blocker}/events.jsonl"\n'
                                      '[logging.syslog]\naddress = "/nonexistent/log"\n')
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert f"{cfg}: logging.file: cannot create" in err
    assert f"{cfg}: logging.syslog: /nonexistent/log" in err
    assert "Traceback" not in err


def test_worker_metrics_ports_follow_the_configured_one(tmp_path: Path, pki: Pki) -> None:
    s = load_settings(write_config(
        tmp_path, pki, 'workers = 3\n[metrics]\nlisten = "127.0.0.1:9802"\n'))
    assert [s.metrics_address(w) for w in range(3)] == [
        ("127.0.0.1", 9802), ("127.0.0.1", 9803), ("127.0.0.1", 9804)]
    s = load_settings(write_config(
        tmp_path, pki, 'workers = 2\n[metrics]\nlisten = "127.0.0.1:0"\n'))
    assert [s.metrics_address(w) for w in range(2)] == [("127.0.0.1", 0), ("127.0.0.1", 0)]
    assert load_settings(write_config(tmp_path, pki)).metrics_address() is None


def test_config_check_worker_metrics_ports_past_65535(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, pki, 'workers = 2\n[metrics]\nlisten = "127.0.0.1:65535"\n')
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "metrics.listen port 65535 with workers = 2" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("key", ["listen", "metrics"])
def test_a_malformed_host_name_in_an_address_is_one_line(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], key: str
) -> None:
    """``a..b`` cannot be resolved (getaddrinfo raises UnicodeError): refused at load."""
    extra = '[metrics]\nlisten = "mgmt..example:9802"\n' if key == "metrics" else ""
    cfg = write_config(tmp_path, pki, extra)
    if key == "listen":
        cfg.write_text(cfg.read_text().replace("127.0.0.1:8020", "mbsec..plant:802"))
    assert mbsec_main(["config", "check", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a valid host name" in err[0], err


@pytest.mark.parametrize("host", ["plc_\u00fc.invalid", "\u2603.invalid"])
def test_upstream_host_names_trios_resolver_refuses_are_refused_at_load(
    tmp_path: Path, pki: Pki, host: str
) -> None:
    """Names Python's IDNA 2003 codec encodes but the ``idna`` package (IDNA 2008, UTS 46,
    what trio's resolver uses) refuses: one clear line at load, not a failure at the first
    connect (tests/e2e/test_proxy_paths.py shows the proxy survives such a name anyway).
    Regression: the check used only the IDNA 2003 codec."""
    host.encode("idna")  # the standard library's codec takes it
    cfg = write_config(tmp_path, pki, upstream=f'[upstreams.plc]\nhost = "{host}"\n'
                       'port = 5020\nunit_ids = [1]\n')
    with pytest.raises(SettingsError) as exc:
        load_settings(cfg)
    problem = exc.value.problems[0]
    assert problem.startswith(f"{cfg}: upstreams.plc.host: ") and "not a valid host name" in (
        problem), problem


def test_unit_rewrite_onto_a_unit_clients_also_address_is_refused(
    tmp_path: Path, pki: Pki
) -> None:
    """``unit_rewrite = {1 = 2}`` with unit 2 also routed: the policy judges units 1 and 2
    separately, so a grant for unit 1 would read and write the PLC's unit 2 (say, a safety
    PLC the policy keeps everyone away from). Refused at load. Regression: accepted, and a
    client denied unit 2 read it through unit 1."""
    cfg = write_config(tmp_path, pki, upstream=(
        '[upstreams.plc]\nhost = "127.0.0.1"\nunit_ids = [1, 2]\nunit_rewrite = { 1 = 2 }\n'))
    with pytest.raises(SettingsError, match="aliases unit 2"):
        load_settings(cfg)
