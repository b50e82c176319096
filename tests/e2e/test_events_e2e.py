"""Events end to end (issue 11, item 3): request events carry what the policy decides on (the
written values, FC23's two ranges, the certificate facts `identities:` match), and the last
thing a stopped proxy writes is `server-stopped`."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import trio
from conftest import Pki, ScriptedPlc, StartProxy, TlsClient, read_hr, serve_config, serve_process


def fc16(address: int, values: list[int]) -> bytes:
    n = len(values)
    return struct.pack(f">BHHB{n}H", 16, address, n, 2 * n, *values)


def fc23(read_address: int, read_count: int, write_address: int, values: list[int]) -> bytes:
    n = len(values)
    return struct.pack(f">BHHHHB{n}H", 23, read_address, read_count, write_address, n, 2 * n,
                       *values)


async def test_serve_denied_write_events_carry_values_and_the_certificate_and_stop_last(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A real `mbsec serve` (the shipped default: allowed requests not logged): a denied FC16
    write names its values (the first 16 of 20, and the count), a denied FC23 both ranges; the
    connection context names the certificate's issuer, OU and SANs; after SIGTERM the last
    line on stdout is `server-stopped`, and the process exits 0."""
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    who = pki.ca.issue("client", "hmi-07", role="operator", dns=("hmi-07.plant.example",),
                       ips=("10.0.0.7",), organizational_units=("Line 1",), out_dir=tmp_path,
                       name="hmi-07")
    cfg = serve_config(pki, tmp_path, plc.port)
    async with serve_process(cfg) as sp:
        start = await sp.next_event("server-start")
        port = int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])
        c = await TlsClient.connect(port, pki.client_ctx(who))
        values = list(range(1000, 1020))
        assert await c.request(7, 1, fc16(10, values)) == (7, 1, bytes([0x90, 0x01]))
        denied = await sp.next_event("modbus-request")
        m = denied["modbus"]
        assert (m["decision"], m["function_code"], m["address"], m["quantity"]) == \
            ("deny", 16, 10, 20)
        assert m["values"] == values[:16] and denied["mbsec"]["values_total"] == 20
        assert denied["mbsec"]["request_bytes"] == 6 + 2 * 20
        x509 = denied["tls"]["client"]["x509"]
        assert x509["subject"]["common_name"] == "hmi-07"
        assert x509["subject"]["organizational_unit"] == ["Line 1"]
        assert x509["issuer"]["distinguished_name"] == \
            pki.ca.issuer_cert.subject.rfc4514_string()
        assert denied["mbsec"]["san_dns"] == ["hmi-07.plant.example"]
        assert denied["mbsec"]["san_ip"] == ["10.0.0.7"]
        assert "san_uri" not in denied["mbsec"]

        assert await c.request(8, 1, fc23(100, 4, 20, [5, 6])) == (8, 1, bytes([0x97, 0x01]))
        rw = (await sp.next_event("modbus-request"))["modbus"]
        assert rw["read"] == {"address": 100, "quantity": 4}
        assert rw["write"] == {"address": 20, "quantity": 2}
        assert rw["values"] == [5, 6]

        assert (await c.request(9, 1, read_hr(0, 1)))[2] == bytes([3, 2, 0, 0])  # allowed
        sp.proc.send_signal(signal.SIGTERM)
        await sp.next_event("server-stop")
        assert await c.closed_by_peer()
        with trio.fail_after(10):
            assert await sp.proc.wait() == 0
        assert sp.proc.stdout is not None
        rest = sp.buf
        while chunk := await sp.proc.stdout.receive_some(65536):
            rest += chunk
        lines = [json.loads(line) for line in rest.splitlines() if line.strip()]
        actions = [e["event"]["action"] for e in sp.events + lines]
        # the shipped default logs no allowed request: only the two denials
        assert actions.count("modbus-request") == 2
        assert actions[-2:] == ["connection-closed", "server-stopped"]
        stopped = lines[-1]
        assert stopped["event"]["reason"] == "shutdown_requested"
        assert stopped["event"]["outcome"] == "success"
        assert stopped["process"]["exit_code"] == 0
        assert stopped["mbsec"]["connections_cut"] == 0


async def test_a_drain_that_times_out_counts_the_connections_it_cut(
    pki: Pki, nursery: trio.Nursery, start_proxy: StartProxy
) -> None:
    plc = ScriptedPlc(delay=lambda a: 30.0 if a == 50 else 0.0)
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, limits={"drain_timeout": 0.3},
                          upstream={"request_timeout": 20.0})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.send(1, 1, read_hr(50, 1))  # the PLC sits on it
    await h.wait_event("upstream-connect")
    await trio.sleep(0.2)  # the request reaches the PLC
    assert plc.requests
    h.proxy.request_shutdown()
    with trio.fail_after(5):
        await h.stopped.wait()
    evs = h.events()
    assert evs[-1]["event.action"] == "server-stopped"
    assert evs[-1]["mbsec.connections_cut"] == 1
    assert evs[-1]["event.reason"] == "shutdown_requested"
    assert evs[-1]["process.exit_code"] == 0
    assert 0.25e9 <= evs[-1]["event.duration"] < 5e9
    closed = h.events("connection-closed")
    assert [e["event.reason"] for e in closed] == ["server_shutdown"]
