"""``mbsec connect`` end to end: a plain pymodbus master -> ``mbsec connect`` (a real child
process) -> ``mbsec serve`` (a real child process) -> a pymodbus PLC; the server verified by
name or by a pinned fingerprint, a wrong one refused with a clear event, reconnection with
backoff while the server is down, and a master certificate the server refuses."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    Pki,
    PymodbusPlc,
    ServeProcess,
    StartProxy,
    mbsec_process,
    serve_config,
    serve_process,
    unused_port,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mbsec.audit import ListSink, make_logger
from mbsec.connect import ConnectConfig, Connector
from mbsec.metrics import Metrics
from mbsec.pki.ca import IssuedFiles
from mbsec.settings import LoggingSettings

pytestmark = pytest.mark.slow


def fingerprint(files: IssuedFiles) -> str:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


@contextlib.asynccontextmanager
async def connect_process(args: list[str]) -> AsyncIterator[ServeProcess]:
    """``mbsec connect ARGS`` as a child process; its JSON events on stdout."""
    async with mbsec_process(["connect", "--listen", "127.0.0.1:0", *args]) as proc:
        yield proc


def tls_args(pki: Pki, who: IssuedFiles, server_port: int, *extra: str) -> list[str]:
    return ["--server", f"127.0.0.1:{server_port}", "--cert", str(who.chain),
            "--key", str(who.key), "--ca", str(pki.ca.trust_bundle), *extra]


def plain_master(port: int, body: str) -> Any:
    """A plain (no TLS) pymodbus master, as on a SCADA host; ``body``: what it does."""
    from pymodbus.client import ModbusTcpClient

    client = ModbusTcpClient("127.0.0.1", port=port, timeout=8, retries=0)
    try:
        if not client.connect():
            return None
        if body == "write-read":
            w = client.write_register(42, 4321, device_id=1)
            r = client.read_holding_registers(40, count=5, device_id=1)
            return w, r
        return client.read_holding_registers(10, count=3, device_id=1)
    except Exception as exc:  # a closed connection: pymodbus raises ModbusIOException
        return exc
    finally:
        client.close()


async def master(port: int, body: str = "read") -> Any:
    return await trio.to_thread.run_sync(plain_master, port, body)


async def started_serve(serve: ServeProcess) -> int:
    ev = await serve.next_event("server-start")
    return int(ev["mbsec"]["listen"][0].rsplit(":", 1)[1])


async def started_connect(conn: ServeProcess) -> int:
    ev = await conn.next_event("connect-start")
    return int(ev["mbsec"]["listen"][0].rsplit(":", 1)[1])


async def stop(p: ServeProcess) -> int:
    p.proc.send_signal(signal.SIGTERM)
    with trio.fail_after(10):
        return await p.proc.wait()


async def test_plain_pymodbus_master_writes_and_reads_through_connect_and_serve(
    pki: Pki, plc: PymodbusPlc, tmp_path: Path
) -> None:
    async with serve_process(serve_config(pki, tmp_path, plc.port)) as serve:
        sport = await started_serve(serve)
        async with connect_process(tls_args(pki, pki.engineer, sport,
                                            "--server-name", "localhost")) as conn:
            cport = await started_connect(conn)
            w, r = await master(cport, "write-read")
            assert not w.isError() and not r.isError()
            assert r.registers == [40, 41, 4321, 43, 44]
            assert await plc.holding(1, 42) == [4321]
            up = await conn.next_event("connect-upstream")
            assert up["event"]["outcome"] == "success"
            assert up["tls"]["server"]["x509"]["subject"]["common_name"] == "mbsec-test"
            assert up["tls"]["server"]["hash"]["sha256"] == fingerprint(pki.server)
            assert up["server"] == {"address": "127.0.0.1", "port": sport}
            closed = await conn.next_event("connect-closed")
            assert closed["event"]["reason"] == "client_closed"
            assert closed["source"]["bytes"] == 12 + 12  # FC06 + FC03 requests
            # the session mbsec serve saw is the master's, with the engineer's certificate
            hs = await serve.next_event("tls-handshake")
            assert hs["tls"]["client"]["x509"]["subject"]["common_name"] == "eng-1"
            served = await serve.next_event("connection-closed")
            assert served["event"]["reason"] == "client_closed"
            assert served["mbsec"]["allowed"] == 2
            assert await stop(conn) == 0
            assert (await conn.next_event("connect-stopped"))["mbsec"]["connections_cut"] == 0


async def test_a_pinned_fingerprint_verifies_the_server_and_policy_still_applies(
    pki: Pki, plc: PymodbusPlc, tmp_path: Path
) -> None:
    async with serve_process(serve_config(pki, tmp_path, plc.port)) as serve:
        sport = await started_serve(serve)
        pin = ":".join(f"{b:02X}" for b in bytes.fromhex(fingerprint(pki.server)))
        async with connect_process(tls_args(pki, pki.operator, sport,
                                            "--server-sha256", pin)) as conn:
            cport = await started_connect(conn)
            (start,) = [e for e in conn.events if e["event"]["action"] == "connect-start"]
            assert start["mbsec"]["server_sha256"] == fingerprint(pki.server)
            assert start["mbsec"]["server_name"] is None
            rr = await master(cport)
            assert not rr.isError() and rr.registers == [10, 11, 12]

            def operator_write(port: int) -> Any:
                from pymodbus.client import ModbusTcpClient

                c = ModbusTcpClient("127.0.0.1", port=port, timeout=8, retries=0)
                assert c.connect()
                try:
                    return c.write_register(42, 1, device_id=1)
                finally:
                    c.close()

            denied = await trio.to_thread.run_sync(operator_write, cport)
            assert denied.isError() and denied.exception_code == 1  # mbsec serve's policy

            # SIGTERM with a tunnel open: it is closed and counted, the process exits 0
            held = await trio.open_tcp_stream("127.0.0.1", cport)
            await held.send_all(bytes.fromhex("000100000006010300000001"))
            with trio.fail_after(5):
                assert len(await held.receive_some(100)) == 11
            assert await stop(conn) == 0
            while (await conn.next_event("connect-closed"))["event"]["reason"] != "shutdown":
                pass
            assert (await conn.next_event("connect-stopped"))["mbsec"]["connections_cut"] == 1
            await held.aclose()


async def in_process_connector(
    nursery: trio.Nursery, pki: Pki, who: IssuedFiles, server_port: int, *,
    max_version: ssl.TLSVersion | None = None, **over: Any
) -> tuple[Connector, ListSink, Metrics]:
    """``mbsec connect`` in this process (real sockets and TLS, no interpreter start-up):
    its events in a list, its metrics readable; ``max_version`` caps its TLS (a test knob)."""
    cfg = ConnectConfig(listen=("127.0.0.1", 0), server=("127.0.0.1", server_port),
                        cert=who.chain, key=who.key, ca=pki.ca.trust_bundle,
                        server_name="localhost", server_sha256=None)
    cfg = dataclasses.replace(cfg, **over)
    sink, metrics = ListSink(), Metrics()
    connector = Connector(cfg, log=make_logger(LoggingSettings(stdout=False),
                                               extra_sinks=[sink]), metrics=metrics)
    if max_version is not None:
        connector.ctx.maximum_version = max_version
    await nursery.start(connector.serve)
    return connector, sink, metrics


async def next_event(sink: ListSink, action: str, after: int = 0) -> dict[str, Any]:
    with trio.fail_after(15):
        while True:
            found = [e for e in sink.events() if e["event"]["action"] == action]
            if len(found) > after:
                return found[after]
            await trio.sleep(0.02)


@pytest.mark.parametrize("over, reason", [
    ({"server_name": "plc-gw.plant.example"}, "server_name_mismatch"),
    ({"server_name": None, "server_sha256": "ab" * 32}, "server_fingerprint_mismatch"),
])
async def test_a_wrong_server_identity_is_refused_with_a_clear_event(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy, nursery: trio.Nursery,
    over: dict[str, Any], reason: str
) -> None:
    h = await start_proxy(plc.port)
    conn, sink, metrics = await in_process_connector(nursery, pki, pki.engineer, h.port,
                                                     **over)
    result = await master(conn.listen_port or 0)
    assert result is None or isinstance(result, Exception) or result.isError()
    failed = await next_event(sink, "connect-upstream")
    assert failed["event"]["outcome"] == "failure"
    assert failed["event"]["reason"] == reason
    assert failed["mbsec"]["retry"] is False and failed["mbsec"]["attempt"] == 1
    assert failed["log"]["level"] == "warning"
    message = failed["error"]["message"]
    assert ("ab" * 32 in message) if reason == "server_fingerprint_mismatch" else \
        ("mismatch" in message.lower())
    closed = await next_event(sink, "connect-closed")
    assert closed["event"]["reason"] == "server_refused"
    assert closed["destination"]["bytes"] == 0
    assert metrics.value("mbsec_connect_upstream_total", outcome="failure", reason=reason) == 1
    # nothing reached the PLC: the request never left the master's host
    assert h.events("modbus-request") == []


async def test_connect_retries_with_backoff_until_the_server_is_up(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    sport = unused_port()
    conn, sink, metrics = await in_process_connector(
        nursery, pki, pki.operator, sport, retry_for=30.0, backoff_initial=0.1,
        backoff_max=0.4)
    results: list[Any] = []
    answered = trio.Event()

    async def ask() -> None:
        results.append(await master(conn.listen_port or 0))
        answered.set()

    nursery.start_soon(ask)
    failures = [await next_event(sink, "connect-upstream", i) for i in range(4)]
    assert {f["event"]["reason"] for f in failures} == {"connect_failed"}
    assert all(f["mbsec"]["retry"] for f in failures)
    assert [f["mbsec"]["backoff"] for f in failures] == [0.1, 0.2, 0.4, 0.4]  # capped
    await start_proxy(plc.port, settings={"listen": [f"127.0.0.1:{sport}"]})
    with trio.fail_after(10):
        await answered.wait()
    rr = results[0]
    assert not isinstance(rr, Exception) and rr is not None and not rr.isError()
    assert rr.registers == [10, 11, 12]
    ok = [e for e in sink.events() if e["event"]["action"] == "connect-upstream"
          and e["event"]["outcome"] == "success"]
    assert len(ok) == 1 and ok[0]["mbsec"]["attempt"] >= 5
    assert metrics.value("mbsec_connect_upstream_total", outcome="failure",
                         reason="connect_failed") >= 4
    assert conn.backoff.failures == 0  # a success clears the backoff


async def test_a_master_certificate_the_server_refuses_is_named(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The rogue CA's certificate: under TLS 1.3 the master's side learns it only when it
    reads, after its handshake; under TLS 1.2 during the handshake."""
    h = await start_proxy(plc.port)
    for version in ("1.3", "1.2"):
        conn, sink, _ = await in_process_connector(
            nursery, pki, pki.rogue, h.port,
            max_version=ssl.TLSVersion.TLSv1_3 if version == "1.3" else ssl.TLSVersion.TLSv1_2)
        result = await master(conn.listen_port or 0)
        assert result is None or isinstance(result, Exception) or result.isError()
        closed = await next_event(sink, "connect-closed")
        assert closed["event"]["reason"] == (
            "client_certificate_rejected" if version == "1.3" else "server_refused"), closed
        assert "certificate" in closed["error"]["message"]
        if version == "1.2":
            failed = await next_event(sink, "connect-upstream")
            assert failed["event"]["reason"] == "client_certificate_rejected"
    rejected = h.events("tls-handshake")
    assert [e["event.reason"] for e in rejected] == ["unknown_ca", "unknown_ca"]
