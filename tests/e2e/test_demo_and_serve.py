"""The two user-facing commands as users run them: `mbsec demo`, and `mbsec serve` as a real
process driven by signals (SIGHUP reload, SIGTERM drain + exit 0)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from conftest import (
    TEST_POLICY,
    Pki,
    ScriptedPlc,
    TlsClient,
    http_get,
    read_hr,
    serve_config,
    serve_process,
)

import mbsec.demo


def test_demo_runs_green(capsys: pytest.CaptureFixture[str]) -> None:
    assert mbsec.demo.main([]) == 0
    out = capsys.readouterr().out
    assert "RESULT: OK" in out
    assert "4/4 steps" in out
    events = [json.loads(line.strip()) for line in out.splitlines()
              if line.strip().startswith("{")]
    reasons = {e["event"].get("reason") for e in events if e["event"]["action"] == "tls-handshake"}
    assert {"no_certificate", "unknown_ca"} <= reasons
    denied = [e for e in events if e["event"]["action"] == "modbus-request"
              and e["modbus"]["decision"] == "deny"]
    assert denied and denied[0]["modbus"]["exception_code"] == 1


def test_demo_shows_every_event_it_counts(capsys: pytest.CaptureFixture[str]) -> None:
    """The summary's "Events by action" counts exactly the events printed above it (it once
    counted an upstream-reset from stopping the PLC with the proxy, never shown)."""
    assert mbsec.demo.main([]) == 0
    out = capsys.readouterr().out
    shown: dict[str, int] = {}
    for line in out.splitlines():
        if line.strip().startswith("{"):
            action = json.loads(line)["event"]["action"]
            shown[action] = shown.get(action, 0) + 1
    summary = out.split("Events by action: ", 1)[1].splitlines()[0]
    counted = {k: int(v) for k, v in (item.split("=") for item in summary.split(", "))}
    assert counted == shown
    assert "upstream-reset" not in counted and "server-stopped" in counted


def test_demo_keeps_nothing_behind(capsys: pytest.CaptureFixture[str]) -> None:
    assert mbsec.demo.main(["--quiet-events"]) == 0
    out = capsys.readouterr().out
    workdir = Path(out.split("(working directory ", 1)[1].split(")", 1)[0])
    assert workdir.name.startswith("mbsec-demo-")
    assert not workdir.exists()
    assert '{"@timestamp"' not in out


@pytest.mark.parametrize("existing", ["file", "non-empty dir"])
def test_demo_keep_refuses_a_file_or_non_empty_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str
) -> None:
    target = tmp_path / "target"
    if existing == "file":
        target.write_text("x")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exc:
        mbsec.demo.main(["--keep", str(target)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--keep {target}: must be a new or empty directory" in err
    assert "Traceback" not in err


async def test_serve_process_reload_and_sigterm(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    cfg = serve_config(pki, tmp_path, plc.port, extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    policy = tmp_path / "policy.yaml"
    async with serve_process(cfg) as sp:
        proc = sp.proc
        start = await sp.next_event("server-start")
        port = int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])
        c = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        assert (await c.request(1, 1, read_hr(0, 1)))[2] == bytes([3, 2, 0, 0])
        status, body = await http_get(start["mbsec"]["metrics_port"], "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert 'mbsec_tls_handshakes_total{outcome="success",reason="ok"} 1' in body

        policy.write_text("this is: [not a policy")
        proc.send_signal(signal.SIGHUP)
        assert (await sp.next_event("config-reload"))["event"]["outcome"] == "failure"
        assert (await c.request(2, 1, read_hr(0, 1)))[2] == bytes([3, 2, 0, 0])

        policy.write_text(TEST_POLICY.replace("read_holding_registers, read_input", "read_input"))
        proc.send_signal(signal.SIGHUP)
        assert (await sp.next_event("config-reload"))["event"]["outcome"] == "success"
        assert (await c.request(3, 1, read_hr(0, 1)))[2] == bytes([0x83, 0x01])

        proc.send_signal(signal.SIGTERM)
        await sp.next_event("server-stop")
        assert await c.closed_by_peer()
        with trio.fail_after(10):
            assert await proc.wait() == 0
