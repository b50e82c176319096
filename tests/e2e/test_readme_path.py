"""The README's "Putting it in front of a PLC" works verbatim: its commands, read from README.md
itself, run one by one in a fresh directory (with the checkout's ``policies/`` and ``deploy/``
beside them, as in a checkout) and end in "ok" from ``mbsec config check`` on the shipped
sample ``deploy/mbsec.toml``; so the README, the PKI's file names and the sample cannot drift
apart. Then that configuration is served, with ``MBSEC_*`` overrides only: 127.0.0.1 ports, a
local PLC and the policy edited as the README says (its targets and sources), never the
sample's plant addresses; the operator certificate the README issued reads a register."""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import PymodbusPlc, ServeProcess

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Putting it in front of a PLC\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "no ```sh block in the README's 'Putting it in front of a PLC'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_names_the_sample_and_serves_it() -> None:
    cmds = readme_commands()
    assert cmds[-1].split("#")[0].split() == ["mbsec", "serve", "--config", "mbsec.toml"]
    assert any(c.startswith("cp deploy/mbsec.toml mbsec.toml") for c in cmds)
    assert any(c.startswith("mbsec config check mbsec.toml") for c in cmds)


def ask_register(port: int, workdir: Path) -> bytes:
    """FC03 for holding register 10 of unit 1 with the README's operator certificate."""
    ctx = ssl.create_default_context(cafile=str(workdir / "ca" / "ca.crt"))
    ctx.load_cert_chain(str(workdir / "clients" / "hmi-01-chain.pem"),
                        str(workdir / "clients" / "hmi-01.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="mbsec.plant.local") as s:
        s.sendall(bytes.fromhex("0001000000060103000a0001"))
        return s.recv(100)


async def test_the_readme_path_works_verbatim_and_serves(
    tmp_path: Path, plc: PymodbusPlc
) -> None:
    for name in ("policies", "deploy"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env = {k: v for k, v in env.items() if not k.startswith("MBSEC_") or k == "MBSEC_PURE"}
    last = None
    for cmd in readme_commands():
        if cmd.split()[:2] == ["mbsec", "serve"]:
            continue
        with trio.fail_after(60):
            last = await trio.run_process(["bash", "-c", f"set -euo pipefail; {cmd}"],
                                          cwd=tmp_path, env=env, capture_stdout=True,
                                          capture_stderr=True, check=False)
        out, err = last.stdout.decode(), last.stderr.decode()
        assert last.returncode == 0, f"README command failed: {cmd}\n{out}{err}"
    assert last is not None
    assert re.match(r"mbsec\.toml: ok \(listen 0\.0\.0\.0:802; 1 upstream\(s\)", out), out + err
    assert "error" not in err

    # serve it: the sample file unchanged, MBSEC_* overrides for this test only
    local_policy = tmp_path / "policy-local.yaml"
    local_policy.write_text((tmp_path / "policy.yaml").read_text()
                            .replace("10.20.0.5:502", f"127.0.0.1:{plc.port}")
                            .replace("10.10.0.0/24", "127.0.0.1/32"))
    overrides = {
        "MBSEC_LISTEN": '["127.0.0.1:0"]',
        "MBSEC_METRICS__LISTEN": "127.0.0.1:0",
        "MBSEC_UPSTREAMS__LINE1-PLC__HOST": "127.0.0.1",
        "MBSEC_UPSTREAMS__LINE1-PLC__PORT": str(plc.port),
        "MBSEC_POLICY": str(local_policy),
    }
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mbsec.cli", "serve", "--config", str(tmp_path / "mbsec.toml")],
        stdout=subprocess.PIPE, env={**env, **overrides})
    try:
        serve = ServeProcess(proc)
        started = await serve.next_event("server-start")
        (listen,) = started["mbsec"]["listen"]
        host, port = listen.rsplit(":", 1)
        assert host == "127.0.0.1"
        reply = await trio.to_thread.run_sync(ask_register, int(port), tmp_path)
        assert reply[7:9] == b"\x03\x02" and struct.unpack(">H", reply[9:11]) == (10,)
        ev = await serve.next_event("tls-handshake")
        assert ev["tls"]["client"]["x509"]["subject"]["common_name"] == "hmi-01"
        assert ev["user"]["roles"] == ["operator"]
    finally:
        proc.kill()
        await proc.wait()
