"""docs/clients.md's snippets, read from the markdown itself and run against a real
``mbsec serve`` in front of a pymodbus PLC: the TLS-capable pymodbus client, stunnel with
the plain pymodbus master behind it, and ``mbsec connect`` with the same master. Only the
documented names and ports are swapped for local ones (``mbsec.plant.local`` -> ``localhost``,
802 -> the proxy's port, 502 -> a free port for the shim); the files sit where the page
says (``ca/ca.crt``, ``clients/hmi-01-chain.pem``, ``clients/hmi-01.key``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import (
    Pki,
    PymodbusPlc,
    ServeProcess,
    fail_or_skip,
    serve_config,
    serve_process,
    unused_port,
)

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "clients.md"

pytestmark = pytest.mark.slow


def snippets() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    found = re.findall(r"<!-- snippet: ([a-z-]+) -->\n```[a-z]*\n(.*?)```", text, re.S)
    return dict(found)


def localize(snippet: str, server_port: int, shim_port: int) -> str:
    return (snippet.replace("mbsec.plant.local", "localhost")
            .replace("802", str(server_port)).replace("502", str(shim_port)))


def listening(port: int) -> bool:
    """From /proc: connecting to the shim would open a session through it."""
    with open("/proc/net/tcp") as f:
        return any(line.split()[3] == "0A" and int(line.split()[1].rsplit(":", 1)[1], 16) == port
                   for line in f.readlines()[1:])


def test_the_page_has_the_three_ways() -> None:
    assert set(snippets()) == {"pymodbus-tls", "stunnel", "plain-master", "mbsec-connect"}


async def run_python(code: str, cwd: Path) -> str:
    with trio.fail_after(30):
        done = await trio.run_process([sys.executable, "-c", code], cwd=cwd, check=False,
                                      capture_stdout=True, capture_stderr=True)
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    return done.stdout.decode()


async def test_every_snippet_reaches_the_plc_through_mbsec(
    pki: Pki, plc: PymodbusPlc, tmp_path: Path
) -> None:
    found = snippets()
    (tmp_path / "ca").mkdir()
    shutil.copy(pki.ca.trust_bundle, tmp_path / "ca" / "ca.crt")
    pki.ca.issue("client", "hmi-01", role="operator", out_dir=tmp_path / "clients",
                 name="hmi-01")
    env = {**os.environ,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    async with serve_process(serve_config(pki, serve_dir, plc.port)) as serve:
        ev = await serve.next_event("server-start")
        sport = int(ev["mbsec"]["listen"][0].rsplit(":", 1)[1])

        # 1. the TLS-capable client
        out = await run_python(localize(found["pymodbus-tls"], sport, 0), tmp_path)
        assert out.strip() == "[10, 11, 12]"

        # 2. stunnel, and the plain master behind it
        stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
        if stunnel is not None:  # else ways 1 and 3 still run, then fail_or_skip below
            shim = unused_port()
            conf = tmp_path / "stunnel.conf"
            conf.write_text("foreground = yes\npid =\n" + localize(found["stunnel"], sport, shim))
            proc = await trio.lowlevel.open_process([stunnel, str(conf)], cwd=tmp_path,
                                                    stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.DEVNULL)
            try:
                with trio.fail_after(15):
                    while not listening(shim):
                        assert proc.returncode is None, "stunnel exited"
                        await trio.sleep(0.05)
                out = await run_python(localize(found["plain-master"], sport, shim), tmp_path)
                assert out.strip() == "[10, 11, 12]"
            finally:
                proc.kill()
                await proc.wait()

        # 3. mbsec connect, and the same master behind it
        shim = unused_port()
        proc = await trio.lowlevel.open_process(
            ["bash", "-c", "exec " + localize(found["mbsec-connect"], sport, shim)],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE)
        try:
            conn = ServeProcess(proc)
            start = await conn.next_event("connect-start")
            assert start["mbsec"]["listen"] == [f"127.0.0.1:{shim}"]
            assert start["mbsec"]["server_name"] == "localhost"
            out = await run_python(localize(found["plain-master"], sport, shim), tmp_path)
            assert out.strip() == "[10, 11, 12]"
            up = await conn.next_event("connect-upstream")
            assert up["event"]["outcome"] == "success"
        finally:
            proc.kill()
            await proc.wait()
        ways = 3 if stunnel else 2
        names = [(await serve.next_event("tls-handshake"))["tls"]["client"]["x509"]["subject"][
            "common_name"] for _ in range(ways)]
        assert names == ["hmi-01"] * ways  # mbsec saw the master's certificate every time
    if stunnel is None:
        fail_or_skip("stunnel is missing (scripts/libmodbus.sh installs stunnel4)")
