"""Every allowed request logged (``allowed_requests = "info"``) by a real ``mbsec serve`` into a
file and stdout: the data plane hands the lines to each sink's writer thread, which writes them
in batches a few milliseconds later; every line is whole, each request has its line once, and a
stopped proxy has written all of them (mbsec.audit_fast, the deferred writes of mbsec.audit)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import trio
from conftest import Pki, ScriptedPlc, TlsClient, read_hr, serve_config, serve_process


def allowed_tids(path: Path) -> list[int]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "a partial line"
    evs = [json.loads(line) for line in text.splitlines()]
    return [e["modbus"]["transaction_id"] for e in evs
            if e["event"]["action"] == "modbus-request" and e["modbus"]["decision"] == "allow"]


async def written(path: Path, tids: list[int]) -> None:
    """The lines of ``tids`` reach the file soon (the writer's interval is 5 ms)."""
    with trio.fail_after(5):
        while True:
            if sorted(allowed_tids(path)) == tids:
                return
            await trio.sleep(0.005)


async def test_every_allowed_request_is_written_once_in_whole_lines(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    log = tmp_path / "events.log"
    cfg = serve_config(pki, tmp_path, plc.port,
                       extra=f'[logging]\nallowed_requests = "info"\nfile = "{log}"\n')
    async with serve_process(cfg) as sp:
        start = await sp.next_event("server-start")
        port = int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])
        c = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        for tid in range(1, 6):  # one at a time: each line follows its reply within ms
            assert (await c.request(tid, 1, read_hr(tid, 1)))[0] == tid
            await written(log, list(range(1, tid + 1)))
        burst = range(100, 132)  # pipelined: several lines per pass, per write
        for tid in burst:
            await c.send(tid, 1, read_hr(tid % 50, 2))
        got = []
        for _ in burst:
            reply = await c.recv()
            assert reply is not None
            got.append(reply[0])
        assert sorted(got) == list(burst)
        await written(log, [*range(1, 6), *burst])
        on_stdout = [await sp.next_event("modbus-request") for _ in range(37)]
        assert sorted(e["modbus"]["transaction_id"] for e in on_stdout) == \
            [*range(1, 6), *burst]
        for tid in range(200, 216):  # in flight when the stop comes: written before the exit
            await c.send(tid, 1, read_hr(1, 1))
        for _ in range(16):
            assert await c.recv() is not None
        sp.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await sp.proc.wait() == 0
    tids = allowed_tids(log)
    assert sorted(tids) == [*range(1, 6), *burst, *range(200, 216)]  # each once, all written
    # the connection's allowed requests come before its close line (the data plane hands a
    # pass's lines over before the connection goes back to the control plane)
    actions = [json.loads(line)["event"]["action"] for line in log.read_text().splitlines()]
    assert actions.index("connection-closed") > max(
        i for i, a in enumerate(actions) if a == "modbus-request")
    stopped = json.loads(log.read_text().splitlines()[-1])
    assert stopped["event"]["action"] == "server-stopped"
