"""Real peers on both sides: pymodbus AsyncModbusTlsClient -> mbsec -> pymodbus Modbus/TCP PLC.

The pymodbus client runs in a worker thread with its own asyncio loop (pytest runs trio).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from conftest import Pki, PymodbusPlc, StartProxy


def run_client(port: int, ctx: ssl.SSLContext, body: Callable[[Any], Awaitable[Any]]) -> Any:
    from pymodbus.client import AsyncModbusTlsClient

    async def main() -> Any:
        client = AsyncModbusTlsClient("127.0.0.1", port=port, sslctx=ctx, timeout=3, retries=0)
        assert await client.connect(), "pymodbus could not connect through mbsec"
        try:
            return await body(client)
        finally:
            client.close()

    return asyncio.run(main())


async def in_thread(port: int, ctx: ssl.SSLContext, body: Callable[[Any], Awaitable[Any]]) -> Any:
    return await trio.to_thread.run_sync(run_client, port, ctx, body)


async def test_operator_reads_land(pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy) -> None:
    h = await start_proxy(plc.port, upstream={"depth": 1})

    async def body(c: Any) -> Any:
        return await c.read_holding_registers(10, count=5, device_id=1)

    rr = await in_thread(h.port, pki.client_ctx(pki.operator), body)
    assert not rr.isError()
    assert rr.registers == await plc.holding(1, 10, 5)
    ev = await h.wait_event("modbus-request")
    assert ev["modbus.decision"] == "allow"
    assert ev["rule.id"] == "operator-read"
    assert ev["modbus.function"] == "read_holding_registers"
    assert ev["modbus.address"] == 10 and ev["modbus.quantity"] == 5
    assert ev["tls.client.x509.subject.common_name"] == "op-1"
    assert ev["user.roles"] == ["operator"]


async def test_concurrent_reads_each_get_their_own_registers(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy
) -> None:
    """pymodbus's TLS client with several reads at once (it sends one at a time and waits for
    each reply, so each comes in a record of its own; replies that finish together for a
    pipelining client share one record, test_proxy_paths.py): every read its registers."""
    h = await start_proxy(plc.port, upstream={"depth": 4})

    async def body(c: Any) -> Any:
        return await asyncio.gather(*(c.read_holding_registers(a, count=3, device_id=1)
                                      for a in range(0, 60, 10)))

    got = await in_thread(h.port, pki.client_ctx(pki.operator), body)
    assert [r.registers for r in got] == [await plc.holding(1, a, 3) for a in range(0, 60, 10)]


async def test_engineer_write_lands_on_the_plc(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(plc.port)

    async def body(c: Any) -> Any:
        w = await c.write_register(42, 4321, device_id=1)
        m = await c.write_registers(50, [7, 8, 9], device_id=1)
        r = await c.read_holding_registers(42, count=1, device_id=1)
        return w, m, r

    w, m, r = await in_thread(h.port, pki.client_ctx(pki.engineer), body)
    assert not w.isError() and not m.isError()
    assert r.registers == [4321]
    assert await plc.holding(1, 42) == [4321]
    assert await plc.holding(1, 50, 3) == [7, 8, 9]


async def test_operator_write_is_denied_with_exception_01(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(plc.port)
    before = await plc.holding(1, 42)

    async def body(c: Any) -> Any:
        return await c.write_register(42, 999, device_id=1)

    rr = await in_thread(h.port, pki.client_ctx(pki.operator), body)
    assert rr.isError()
    assert rr.exception_code == 1
    assert await plc.holding(1, 42) == before  # the write never reached the PLC
    ev = await h.wait_event("modbus-request", lambda e: e.get("modbus.decision") == "deny")
    assert ev["modbus.exception_code"] == 1
    assert ev["rule.id"] == "default"
    assert ev["log.level"] == "warning"
    assert ev["event.outcome"] == "failure"


async def test_out_of_range_read_is_denied(
    pki: Pki, plc: PymodbusPlc, start_proxy: StartProxy
) -> None:
    h = await start_proxy(plc.port)

    async def body(c: Any) -> Any:
        return await c.read_holding_registers(195, count=10, device_id=1)  # 195..204 > 199

    rr = await in_thread(h.port, pki.client_ctx(pki.operator), body)
    assert rr.isError() and rr.exception_code == 1
    assert h.metrics.value("mbsec_requests_total", decision="deny",
                           function="read_holding_registers") == 1
