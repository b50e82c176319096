"""The request path over real sockets: framing errors, denials, PLC failures, pipelining,
sharing one PLC connection, reload, limits, drain."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from conftest import (
    TEST_POLICY,
    Pki,
    ScriptedPlc,
    StartProxy,
    TlsClient,
    http_get,
    read_hr,
    serve_config,
    serve_process,
    unused_port,
)

from mbsec.modbus.mbap import FrameBuffer, encode_adu


async def scripted(nursery: trio.Nursery, **kw: object) -> ScriptedPlc:
    plc = ScriptedPlc(**kw)  # type: ignore[arg-type]
    await nursery.start(plc.serve)
    return plc


def regs(pdu: bytes) -> list[int]:
    assert pdu[0] == 3, pdu
    return list(struct.unpack(f">{pdu[1] // 2}H", pdu[2:]))


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (bytes.fromhex("0001" "0001" "0006" "01" "0300000001"), "bad_protocol_id"),
        # length 300 > 254: rejected from the header alone, nothing is buffered or forwarded
        (struct.pack(">HHHB", 1, 0, 300, 1) + b"\x03\x00\x00\x00\x01", "bad_length"),
    ],
    ids=["bad_protocol_id", "oversize_length"],
)
async def test_broken_mbap_header_closes_the_connection(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, frame: bytes, reason: str
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.stream.send_all(frame)
    assert await c.closed_by_peer()
    ev = await h.wait_event("modbus-framing-error")
    assert ev["event.reason"] == reason
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == reason
    assert plc.requests == []


async def test_invalid_pdu_gets_an_exception_and_the_connection_stays(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    tid, unit, pdu = await c.request(5, 1, struct.pack(">BHH", 3, 0, 0))  # quantity 0
    assert (tid, unit) == (5, 1) and pdu == bytes([0x83, 0x03])
    assert await c.request(6, 1, read_hr(0, 1)) == (6, 1, bytes([3, 2, 0, 0]))
    ev = await h.wait_event("modbus-request", lambda e: e.get("modbus.decision") == "invalid")
    assert ev["modbus.exception_code"] == 3
    assert len(plc.requests) == 1


async def test_policy_deny_event_and_default_exception(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.norole))  # NULL role: nothing allowed
    assert await c.request(77, 2, read_hr(0, 1)) == (77, 2, bytes([0x83, 0x01]))
    ev = await h.wait_event("modbus-request")
    assert ev["modbus.decision"] == "deny"
    assert ev["modbus.transaction_id"] == 77 and ev["modbus.unit_id"] == 2
    assert ev["user.roles"] == []
    assert plc.requests == []


async def test_rule_exception_code_is_used(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    policy = TEST_POLICY.replace(
        "rules:\n",
        "rules:\n  - id: no-writes\n    description: writes answered with 02\n    action: deny\n"
        "    exception_code: 2\n    functions: [write_single_register]\n",
        1,
    )
    h = await start_proxy(plc.port, policy=policy)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    assert await c.request(1, 1, struct.pack(">BHH", 6, 3, 3)) == (1, 1, bytes([0x86, 0x02]))
    ev = await h.wait_event("modbus-request")
    assert ev["rule.id"] == "no-writes"


async def test_plc_down_gives_0x0a(pki: Pki, start_proxy: StartProxy) -> None:
    h = await start_proxy(unused_port(), upstream={"connect_timeout": 0.5})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(3, 1, read_hr(0, 1)) == (3, 1, bytes([0x83, 0x0A]))
    ev = await h.wait_event("modbus-request", lambda e: e.get("modbus.exception_code") == 0x0A)
    assert ev["event.outcome"] == "failure"


async def test_upstream_host_the_resolver_refuses_gets_0x0a_and_the_proxy_runs_on(
    pki: Pki, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name that got past the load-time check (``check_host_name``) but that the
    resolver refuses (``getaddrinfo("plc..invalid")`` raises UnicodeError, not an OSError) is
    a failed connect: the client gets 0x0A and the proxy keeps serving. Regression: the check
    and the resolver disagreed on some names (IDNA 2003 vs 2008), and the resolver's
    UnicodeError took the whole proxy down with a traceback. tests/test_settings.py checks
    that those names are refused at load."""
    import mbsec.settings

    monkeypatch.setattr(mbsec.settings, "check_host_name", lambda host, where: None)
    h = await start_proxy(1, upstream={"host": "plc..invalid", "port": 502,
                                       "connect_timeout": 30.0})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    try:
        with trio.fail_after(2):  # the failed resolution itself, not the connect deadline
            assert await c.request(1, 1, read_hr(0, 1)) == (1, 1, bytes([0x83, 0x0A]))
    finally:
        await c.aclose()
    ev = await h.wait_event("upstream-connect-failed")
    assert ev["event.reason"] == "connect_failed", ev
    assert not h.stopped.is_set()


async def test_unrouted_unit_gives_0x0a(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    # the policy allows unit 3 (operator-read names no target), but no upstream routes it
    assert await c.request(3, 3, read_hr(0, 1)) == (3, 3, bytes([0x83, 0x0A]))
    assert plc.requests == []


async def test_plc_silent_gives_0x0b(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery, silent=True)
    h = await start_proxy(plc.port, upstream={"request_timeout": 0.3})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(4, 1, read_hr(0, 1)) == (4, 1, bytes([0x83, 0x0B]))


async def test_max_response_bytes_withholds_the_reply(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.small))
    assert (await c.request(1, 1, read_hr(0, 2)))[2][0] == 3  # 6-byte PDU: within 10
    assert await c.request(2, 1, read_hr(0, 10)) == (2, 1, bytes([0x83, 0x04]))
    ev = await h.wait_event("modbus-request",
                            lambda e: e.get("event.reason") == "response_too_large")
    assert ev["mbsec.max_response_bytes"] == 10


async def test_client_disconnect_mid_request(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery, delay=lambda a: 0.3 if a == 10 else 0.0)
    h = await start_proxy(plc.port, upstream={"pool_size": 1})  # c2 shares c1's link
    c1 = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c1.send(1, 1, read_hr(10, 1))
    await trio.sleep(0.05)
    await c1.aclose()  # gone before the PLC answers
    c2 = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c2.request(1, 1, read_hr(20, 2)) == (1, 1, bytes([3, 4, 0, 20, 0, 21]))
    await trio.sleep(0.4)  # the late reply to c1 must not reach c2
    assert await c2.request(2, 1, read_hr(30, 1)) == (2, 1, bytes([3, 2, 0, 30]))
    closed = await h.wait_event("connection-closed")
    assert closed["mbsec.requests"] == 1
    assert plc.connections == 1


async def test_pipelined_requests_get_their_own_replies_out_of_order(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    # The PLC answers low addresses last, so replies come back in reverse order.
    plc = await scripted(nursery, delay=lambda a: 0.05 * (10 - a))
    h = await start_proxy(plc.port, upstream={"depth": 8}, limits={"max_pipelined": 8})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    batch = b"".join(encode_adu(100 + a, 1, read_hr(a, 1)) for a in range(1, 6))
    await c.stream.send_all(batch)  # five requests in one TLS record
    replies = [await c.recv() for _ in range(5)]
    got = {r[0]: regs(r[2]) for r in replies if r is not None}
    assert got == {100 + a: [a] for a in range(1, 6)}
    order = [r[0] for r in replies if r is not None]
    assert order != sorted(order)  # they really were interleaved
    assert plc.connections == 1


class BatchingPlc:
    """A PLC that answers only once it holds ``n`` requests, all replies in one ``send``
    (so the proxy reads them in one pass). FC03 register i holds its address."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        frames = FrameBuffer()
        held: list[bytes] = []
        while data := await stream.receive_some(4096):
            frames.receive_data(data)
            while (a := frames.next_frame()) is not None:
                addr, count = struct.unpack(">HH", a.pdu[1:5])
                body = struct.pack(f">{count}H", *range(addr, addr + count))
                held.append(encode_adu(a.transaction_id, a.unit_id, bytes([3, 2 * count]) + body))
            if len(held) >= self.n:
                await stream.send_all(b"".join(held))
                held.clear()


def split_adus(data: bytes) -> list[bytes]:
    """Whole ADUs of ``data``; fails when it ends inside one."""
    out = []
    while data:
        n = 6 + struct.unpack(">H", data[4:6])[0]
        assert len(data) >= n, "a record ends inside an ADU"
        out.append(data[:n])
        data = data[n:]
    return out


async def test_replies_finished_together_share_one_tls_record(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Five pipelined requests answered in one PLC read: their replies leave in one TLS
    record (one ``SSLObject.read`` returns one record), in completion order, each ADU whole;
    a client that waits for each reply still gets one ADU per record."""
    plc = BatchingPlc(5)
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, upstream={"depth": 8}, limits={"max_pipelined": 8})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.stream.send_all(b"".join(encode_adu(10 + a, 1, read_hr(a, 1)) for a in range(5)))
    record = await c.stream.receive_some(65536)
    adus = split_adus(record)
    assert [struct.unpack(">H", a[:2])[0] for a in adus] == list(range(10, 15))
    assert [a[7:] for a in adus] == [bytes([3, 2, 0, a]) for a in range(5)]
    plc.n = 1
    for tid in range(20, 23):  # one at a time: one ADU per record
        await c.stream.send_all(encode_adu(tid, 1, read_hr(tid, 1)))
        record = await c.stream.receive_some(65536)
        assert len(split_adus(record)) == 1 and struct.unpack(">H", record[:2])[0] == tid


async def test_many_clients_share_one_plc_connection(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery, delay=lambda a: (a % 7) * 0.005)
    h = await start_proxy(plc.port, upstream={"depth": 4, "pool_size": 1},
                          limits={"max_pipelined": 4})
    errors: list[str] = []

    async def client(n: int) -> None:
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
        base = n * 10
        for k in range(4):
            await c.send(k + 1, 1, read_hr(base + k, 1))
        for _ in range(4):
            r = await c.recv()
            assert r is not None
            tid, _unit, pdu = r
            if regs(pdu) != [base + tid - 1]:
                errors.append(f"client {n} tid {tid} got {regs(pdu)}")
        await c.aclose()

    async with trio.open_nursery() as n:
        for i in range(12):
            n.start_soon(client, i)
    assert errors == []
    assert plc.connections == 1
    assert len(plc.requests) == 48
    assert h.metrics.value("mbsec_requests_total", decision="allow",
                           function="read_holding_registers") == 48


async def test_reload_with_a_bad_policy_keeps_the_old_state(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    old = h.proxy.state
    h.policy_path.write_text("version: 1\ndefault: deny\nrules:\n  - id: x\n    nonsense: 1\n")
    assert h.proxy.reload() is False
    assert h.proxy.state is old
    ev = await h.wait_event("config-reload")
    assert ev["event.outcome"] == "failure" and ev["error.message"]
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await c.request(1, 1, read_hr(0, 1)))[2] == bytes([3, 2, 0, 0])
    # a good reload applies to the next request on the same connection
    no_fc03 = TEST_POLICY.replace("read_holding_registers, read_input", "read_input")
    h.policy_path.write_text(no_fc03)
    assert h.proxy.reload() is True
    # reload() returns once the state deciding requests is switched, on both engines (the
    # thread engine switches in its loop: a request sent now must not meet the old policy)
    assert h.proxy.decision_state is h.proxy.state
    assert (await c.request(2, 1, read_hr(0, 1)))[2] == bytes([0x83, 0x01])


async def test_reload_lists_the_keys_that_need_a_restart(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A reload applies TLS, CRLs, policy and upstreams; a change to a key it cannot apply is
    kept as it was and named in ``mbsec.restart_needed_for`` (docs/config.md, SIGHUP)."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    s = h.proxy.settings
    other = "trio" if s.data_plane == "thread" else "thread"
    changed = s.model_copy(update={"data_plane": other, "busy_poll_us": s.busy_poll_us + 5,
                                   "workers": 2})
    assert h.proxy.reload(changed) is True
    ev = await h.wait_event("config-reload")
    assert sorted(ev["mbsec.restart_needed_for"]) == ["busy_poll_us", "data_plane", "workers"]
    assert h.proxy.settings.data_plane == s.data_plane  # not applied


async def test_idle_timeout_closes(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port, limits={"idle_timeout": 0.2})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.closed_by_peer()
    ev = await h.wait_event("connection-closed")
    assert ev["event.reason"] == "idle_timeout"


async def test_per_source_limit(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port, limits={"max_per_source": 1})
    c1 = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    s = await trio.open_tcp_stream("127.0.0.1", h.port)
    with trio.fail_after(10):  # refused: held unread (a tarpit, 2.5-7.5 s), then reset
        with pytest.raises(trio.BrokenResourceError):
            await s.receive_some(10)
    ev = await h.wait_event("connection-rejected")
    assert ev["event.reason"] == "too_many_connections_from_source"
    assert (await c1.request(1, 1, read_hr(0, 1)))[2][0] == 3


async def test_per_identity_limit(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port, limits={"max_per_identity": 1})
    c1 = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await c1.request(1, 1, read_hr(0, 1)))[2][0] == 3
    c2 = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c2.closed_by_peer()
    ev = await h.wait_event("tls-handshake", lambda e: e.get("event.outcome") == "failure")
    assert ev["event.reason"] == "too_many_connections_for_identity"
    c3 = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))  # another identity: fine
    assert (await c3.request(1, 1, read_hr(0, 1)))[2][0] == 3
    await c1.stream.aclose()  # the slot is released with the connection
    await h.wait_event("connection-closed",
                       lambda e: e.get("tls.client.x509.subject.common_name") == "op-1")
    c4 = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await c4.request(1, 1, read_hr(0, 1)))[2][0] == 3


async def test_connection_closed_line_counts(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.request(1, 1, read_hr(0, 1))
    await c.request(2, 1, struct.pack(">BHH", 6, 0, 1))  # denied
    await c.stream.aclose()
    ev = await h.wait_event("connection-closed")
    assert ev["event.reason"] == "client_closed"
    assert (ev["mbsec.requests"], ev["mbsec.allowed"], ev["mbsec.denied"]) == (2, 1, 1)
    assert ev["source.bytes"] == 24 and ev["destination.bytes"] == 11 + 9
    assert ev["event.duration"] > 0


async def test_late_plc_reply_never_reaches_the_next_request(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery, delay=lambda a: 0.6 if a == 10 else 0.0)
    h = await start_proxy(plc.port, upstream={"request_timeout": 0.4})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(10, 1)) == (1, 1, bytes([0x83, 0x0B]))
    # the request answered 0x0B keeps its slot and its client on that link: the next one
    # waits (0.2 s, within its 0.4 s) until the late reply for address 10 has come and been
    # dropped; each gets its own data
    for tid, addr in ((2, 20), (3, 30), (4, 40)):
        assert await c.request(tid, 1, read_hr(addr, 1)) == (tid, 1, bytes([3, 2, 0, addr]))
        await trio.sleep(0.2)


async def test_garbage_plc_reply_gives_0x0b_and_recovers(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery, garbage_at=frozenset({13}))
    h = await start_proxy(plc.port, upstream={"backoff_initial": 0.05})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(13, 1)) == (1, 1, bytes([0x83, 0x0B]))
    with trio.fail_after(5):
        while True:  # the upstream connection is reset and re-established
            reply = await c.request(2, 1, read_hr(14, 1))
            if reply == (2, 1, bytes([3, 2, 0, 14])):
                break
            assert reply is not None and reply[2][0] == 0x83
            await trio.sleep(0.05)
    assert plc.connections >= 2


async def test_unit_rewrite_round_trip(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery, value=lambda u, a: u * 100 + a)
    h = await start_proxy(plc.port, unit_ids=[1, 2, 9], upstream={"unit_rewrite": {9: 3}})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    # the client speaks to unit 9, the PLC sees unit 3, the reply carries unit 9 again
    assert await c.request(5, 9, read_hr(3, 1)) == (5, 9, bytes([3, 2, 1, 47]))  # 303
    assert plc.requests[-1][1] == 3
    assert await c.request(6, 2, read_hr(3, 1)) == (6, 2, bytes([3, 2, 0, 203]))


async def test_workers_share_the_port_reload_and_drain_together(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """workers = 2: both processes accept on one port (connection ids interleave: worker 0
    numbers 1, 3, 5..., worker 1 numbers 2, 4, 6...); SIGHUP to the main process reloads both,
    SIGTERM drains both and the main process exits 0."""
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port, workers=2)
    async with serve_process(cfg) as out:
        proc = out.proc
        starts = [await out.next_event("server-start") for _ in range(2)]
        ports = {int(s["mbsec"]["listen"][0].rsplit(":", 1)[1]) for s in starts}
        assert len(ports) == 1  # one port, two listening processes
        port = ports.pop()
        clients = [await TlsClient.connect(port, pki.client_ctx(pki.operator)) for _ in range(16)]
        for i, c in enumerate(clients):
            assert await c.request(i, 1, read_hr(i, 1)) == (i, 1, bytes([3, 2, 0, i]))
        accepted = [await out.next_event("tls-handshake") for _ in clients]
        conn_ids = [e["mbsec"]["conn_id"] for e in accepted]
        assert len(set(conn_ids)) == 16
        assert {i % 2 for i in conn_ids} == {0, 1}  # both workers took connections

        (tmp_path / "policy.yaml").write_text(
            TEST_POLICY.replace("read_holding_registers, read_input", "read_input"))
        proc.send_signal(signal.SIGHUP)
        for _ in range(2):
            assert (await out.next_event("config-reload"))["event"]["outcome"] == "success"
        for i, c in enumerate(clients):
            assert await c.request(100 + i, 1, read_hr(0, 1)) == (100 + i, 1, bytes([0x83, 1]))

        proc.send_signal(signal.SIGTERM)
        for c in clients:
            assert await c.closed_by_peer()
        with trio.fail_after(10):
            assert await proc.wait() == 0


async def test_a_dead_worker_stops_the_set_with_status_1(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A worker that dies on its own takes the others down; the main process exits 1 so the
    service manager restarts the whole set."""
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port, workers=2)
    async with serve_process(cfg) as out:
        proc = out.proc
        for _ in range(2):
            await out.next_event("server-start")
        listing = trio.Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        children = (await listing.read_text()).split()
        assert len(children) == 2
        os.kill(int(children[0]), signal.SIGKILL)
        await out.next_event("server-stop")  # the other worker drains
        with trio.fail_after(10):
            assert await proc.wait() == 1


async def test_each_worker_serves_its_own_metrics(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """workers = 2 with [metrics] listen: each worker serves its own counters (its own port,
    reported in its server-start event); together they count every connection once."""
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port, workers=2,
                       extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    async with serve_process(cfg) as out:
        proc = out.proc
        starts = [await out.next_event("server-start") for _ in range(2)]
        port = int(starts[0]["mbsec"]["listen"][0].rsplit(":", 1)[1])
        metrics_ports = {s["mbsec"]["metrics_port"] for s in starts}
        assert len(metrics_ports) == 2 and None not in metrics_ports
        clients = [await TlsClient.connect(port, pki.client_ctx(pki.operator)) for _ in range(16)]
        for i, c in enumerate(clients):
            assert await c.request(i, 1, read_hr(i, 1)) == (i, 1, bytes([3, 2, 0, i]))
        accepted = []
        for mport in metrics_ports:
            status, body = await http_get(mport, "/metrics")
            assert status == "HTTP/1.1 200 OK"
            line = next(ln for ln in body.splitlines()
                        if ln.startswith('mbsec_connections_total{outcome="accepted"}'))
            accepted.append(int(float(line.rsplit(" ", 1)[1])))
            assert (await http_get(mport, "/healthz"))[0] == "HTTP/1.1 200 OK"
        assert sum(accepted) == 16
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await proc.wait() == 0


def test_workers_metrics_port_in_use_is_one_line(pki: Pki, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        cfg = serve_config(pki, tmp_path, 1502, workers=2,
                           extra=f'[metrics]\nlisten = "127.0.0.1:{busy}"\n')
        res = subprocess.run([sys.executable, "-m", "mbsec.cli", "serve", "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"error: {cfg}: cannot listen (metrics.listen 127.0.0.1:{busy} and the next 1 port(s),"
        " one per worker): Address already in use"]




async def test_client_sockets_get_nodelay_and_the_keepalive(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """TCP_NODELAY and the 30 s keepalive on an accepted client socket, as the proxy's own
    socket reads them (on Linux set once on the listener and inherited)."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert (await c.request(1, 1, read_hr(0, 1)))[2][0] == 3
    (session,) = h.proxy.sessions
    sock = session._raw.socket  # type: ignore[attr-defined]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


async def test_connection_events_carry_both_ends_addresses(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The accept loop hands the session the peer address it asked for and the listener's own
    address: the accepted and closed lines still name the client's address and port and the
    address and port it connected to, as the socket says."""
    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    sock = c.stream.transport_stream.socket
    client_ip, client_port = sock.getsockname()[:2]
    server_ip, server_port = sock.getpeername()[:2]
    assert await c.request(1, 1, read_hr(0, 1)) is not None
    await c.stream.aclose()
    for action in ("tls-handshake", "connection-closed"):
        ev = await h.wait_event(action, lambda e: e.get("source.port") == client_port)
        assert (ev["source.ip"], ev["source.port"]) == (client_ip, client_port), ev
        assert (ev["destination.ip"], ev["destination.port"]) == (server_ip, server_port), ev


async def test_listener_local_address_is_given_only_for_a_specific_address() -> None:
    """A wildcard listener's connections each have their own local address: asked of the
    socket (None here); a listener on one address gives that address to all of them."""
    from mbsec.server import _listener_local

    specific = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    wildcard = (await trio.open_tcp_listeners(0, host="0.0.0.0"))[0]
    try:
        assert _listener_local(specific) == ("127.0.0.1", specific.socket.getsockname()[1])
        assert _listener_local(wildcard) is None
    finally:
        await specific.aclose()
        await wildcard.aclose()
