"""The session alone, over in-memory streams with a fake upstream: deterministic checks of
backpressure, id mapping, monitor mode, rate limits and the alert flush."""

from __future__ import annotations

import ssl
import struct
from typing import Any

import trio
import trio.testing
from conftest import TEST_POLICY, Pki

from mbsec.audit import ListSink, flatten, make_logger
from mbsec.modbus.mbap import FrameBuffer, encode_adu
from mbsec.modbus.pdu import Request, parse_response
from mbsec.policy import RateLimiter, load_policy_text
from mbsec.session import ProxyState, Session
from mbsec.settings import LimitsSettings, LoggingSettings, TlsSettings
from mbsec.tls import build_material
from mbsec.upstream import TargetNoResponse, UpstreamReply


class FakeUpstreams:
    """Answers FC03 with register = address; ``gate`` holds every exchange until set."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: trio.Event | None = None
        self.fail = False

    async def exchange(self, unit_id: int, request: Request, pdu: bytes) -> UpstreamReply:
        self.calls.append((unit_id, pdu))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail:
                raise TargetNoResponse("silent", reason="timeout")
            addr, count = struct.unpack(">HH", pdu[1:5])
            reply = bytes([3, 2 * count]) + b"".join(struct.pack(">H", addr + i)
                                                     for i in range(count))
            return UpstreamReply(reply, parse_response(request, reply), "fake")
        finally:
            self.in_flight -= 1


def state_for(pki: Pki, policy: str = TEST_POLICY) -> ProxyState:
    tls = build_material(TlsSettings(cert=pki.server.chain, key=pki.server.key,
                                     client_ca=pki.ca.trust_bundle, crl=[pki.crl]))
    pol = load_policy_text(policy)
    return ProxyState(tls=tls, policy=pol, limiter=RateLimiter(pol))


async def run_session(
    nursery: trio.Nursery, pki: Pki, *, who: Any, policy: str = TEST_POLICY,
    limits: LimitsSettings | None = None, upstreams: FakeUpstreams | None = None,
    client_ctx: ssl.SSLContext | None = None,
) -> tuple[trio.SSLStream[Any], FakeUpstreams, ListSink, trio.abc.Stream]:
    client_raw, server_raw = trio.testing.memory_stream_pair()
    ups = upstreams or FakeUpstreams()
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False, allowed_requests="info"), extra_sinks=[sink])
    state = state_for(pki, policy)
    session = Session(server_raw, state=lambda: state, upstreams=ups,
                      limits=limits or LimitsSettings(), log=log, allowed_requests="info")
    nursery.start_soon(session.run)
    ctx = client_ctx or pki.client_ctx(who)
    client = trio.SSLStream(client_raw, ctx, server_hostname="localhost")
    return client, ups, sink, client_raw


async def read_replies(client: trio.SSLStream[Any], n: int) -> list[tuple[int, int, bytes]]:
    frames = FrameBuffer()
    out: list[tuple[int, int, bytes]] = []
    with trio.fail_after(5):
        while len(out) < n:
            adu = frames.next_frame()
            if adu is not None:
                out.append((adu.transaction_id, adu.unit_id, adu.pdu))
                continue
            data = await client.receive_some(65536)
            assert data, "session closed early"
            frames.receive_data(data)
    return out


def events(sink: ListSink, action: str) -> list[dict[str, Any]]:
    return [flatten(e) for e in sink.events() if e.get("event", {}).get("action") == action]


async def test_pipelining_is_bounded_per_client(pki: Pki, nursery: trio.Nursery) -> None:
    ups = FakeUpstreams()
    ups.gate = trio.Event()
    client, ups, _sink, _ = await run_session(nursery, pki, who=pki.operator, upstreams=ups,
                                               limits=LimitsSettings(max_pipelined=2))
    await client.send_all(b"".join(encode_adu(t, 1, struct.pack(">BHH", 3, t, 1))
                                   for t in range(5)))
    await trio.testing.wait_all_tasks_blocked()
    assert ups.in_flight == 2  # the rest waits: reading pauses at the limit
    ups.gate.set()
    replies = await read_replies(client, 5)
    assert sorted((t, p) for t, _u, p in replies) == [
        (t, bytes([3, 2, 0, t])) for t in range(5)]
    assert ups.max_in_flight == 2


async def test_reply_carries_the_clients_tid_and_unit(pki: Pki, nursery: trio.Nursery) -> None:
    client, ups, sink, _ = await run_session(nursery, pki, who=pki.operator)
    await client.send_all(encode_adu(0xBEEF, 2, struct.pack(">BHH", 3, 7, 2)))
    assert await read_replies(client, 1) == [(0xBEEF, 2, bytes([3, 4, 0, 7, 0, 8]))]
    assert ups.calls == [(2, struct.pack(">BHH", 3, 7, 2))]
    [ev] = events(sink, "modbus-request")
    assert ev["modbus.transaction_id"] == 0xBEEF and ev["modbus.decision"] == "allow"
    assert ev["mbsec.target"] == "fake"


async def test_monitor_mode_forwards_and_logs_would_deny(
    pki: Pki, nursery: trio.Nursery
) -> None:
    policy = TEST_POLICY.replace("default: deny\n", "default: deny\nmode: monitor\n")
    client, ups, sink, _ = await run_session(nursery, pki, who=pki.norole, policy=policy)
    await client.send_all(encode_adu(1, 1, struct.pack(">BHH", 3, 0, 1)))
    assert (await read_replies(client, 1))[0][2][0] == 3
    assert len(ups.calls) == 1
    evs = events(sink, "modbus-request")
    assert any(e["modbus.decision"] == "would_deny" and e["log.level"] == "warning" for e in evs)


async def test_rate_limit_answers_busy(pki: Pki, nursery: trio.Nursery) -> None:
    policy = TEST_POLICY + ("limits:\n  default:\n    requests_per_second: 0.001\n"
                            "    burst: 1\n")
    client, ups, sink, _ = await run_session(nursery, pki, who=pki.operator, policy=policy)
    await client.send_all(encode_adu(1, 1, struct.pack(">BHH", 3, 0, 1)))
    assert (await read_replies(client, 1))[0][2][0] == 3
    await client.send_all(encode_adu(2, 1, struct.pack(">BHH", 3, 0, 1)))
    assert (await read_replies(client, 1))[0] == (2, 1, bytes([0x83, 0x06]))
    assert len(ups.calls) == 1
    denied = [e for e in events(sink, "modbus-request") if e["modbus.decision"] == "rate_limited"]
    assert denied and denied[0]["modbus.exception_code"] == 6


async def test_upstream_failure_maps_to_its_exception(pki: Pki, nursery: trio.Nursery) -> None:
    ups = FakeUpstreams()
    ups.fail = True
    client, ups, sink, _ = await run_session(nursery, pki, who=pki.operator, upstreams=ups)
    await client.send_all(encode_adu(9, 1, struct.pack(">BHH", 3, 0, 1)))
    assert await read_replies(client, 1) == [(9, 1, bytes([0x83, 0x0B]))]
    [ev] = events(sink, "modbus-request")
    assert ev["event.reason"] == "timeout" and ev["modbus.exception_code"] == 0x0B


async def test_failed_handshake_alert_bytes_are_flushed(pki: Pki, nursery: trio.Nursery) -> None:
    """TLS 1.2: the client learns *why* (unknown_ca alert), not just a bare EOF."""
    client, _ups, sink, _raw = await run_session(
        nursery, pki, who=pki.rogue,
        client_ctx=pki.client_ctx(pki.rogue, max_version=ssl.TLSVersion.TLSv1_2))
    try:
        with trio.fail_after(5):
            await client.do_handshake()
    except trio.BrokenResourceError as exc:
        assert isinstance(exc.__cause__, ssl.SSLError)
        assert exc.__cause__.reason == "TLSV1_ALERT_UNKNOWN_CA"
    else:
        raise AssertionError("handshake should have failed")
    [ev] = events(sink, "tls-handshake")
    assert ev["event.reason"] == "unknown_ca"


async def test_client_that_stops_reading_is_disconnected(
    pki: Pki, nursery: trio.Nursery
) -> None:
    client_raw, server_raw = trio.testing.lockstep_stream_pair()  # no buffering at all
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    state = state_for(pki)
    session = Session(server_raw, state=lambda: state, upstreams=FakeUpstreams(),
                      limits=LimitsSettings(idle_timeout=0.3), log=log)
    done = trio.Event()

    async def run() -> None:
        await session.run()
        done.set()

    nursery.start_soon(run)
    client = trio.SSLStream(client_raw, pki.client_ctx(pki.operator), server_hostname="localhost")
    with trio.fail_after(5):
        await client.do_handshake()
        # TLS 1.3 tickets are off, so nothing is pending; send and never read the reply
        await client.send_all(encode_adu(1, 1, struct.pack(">BHH", 3, 0, 1)))
        await done.wait()
    assert session.close_reason == "client_stalled"
    [ev] = events(sink, "connection-closed")
    assert ev["event.reason"] == "client_stalled"


class RecordingStream(trio.abc.Stream):
    """Passes bytes through and keeps what the server sent, to count TLS records."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.received = bytearray()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        self.received += data
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


def tls_records(data: bytes) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos + 5 <= len(data):
        rtype, length = data[pos], struct.unpack(">H", data[pos + 3 : pos + 5])[0]
        out.append((rtype, length))
        pos += 5 + length
    assert pos == len(data), "partial record"
    return out


async def test_one_adu_per_tls_record(pki: Pki, nursery: trio.Nursery) -> None:
    client_raw, server_raw = trio.testing.memory_stream_pair()
    state = state_for(pki)
    session = Session(server_raw, state=lambda: state, upstreams=FakeUpstreams(),
                      limits=LimitsSettings(), log=make_logger(LoggingSettings(stdout=False)))
    nursery.start_soon(session.run)
    rec = RecordingStream(client_raw)
    client = trio.SSLStream(rec, pki.client_ctx(pki.operator), server_hostname="localhost")
    await client.do_handshake()
    mark = len(rec.received)
    await client.send_all(b"".join(encode_adu(t, 1, struct.pack(">BHH", 3, t, 1 + t))
                                   for t in range(6)))
    replies = await read_replies(client, 6)
    assert len(replies) == 6
    records = tls_records(bytes(rec.received[mark:]))
    assert [r[0] for r in records] == [23] * 6  # application data, one record per reply
    sizes = sorted(r[1] for r in records)
    assert sizes == sorted(len(encode_adu(t, 1, p)) + 17 for t, _u, p in replies)  # TLS 1.3 AEAD


async def test_drain_lets_a_request_handled_in_the_reader_finish(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """A lone request is answered by the reader task itself; a drain (stop_reading) that comes
    while it waits for the PLC must not cancel it: the reply goes out, then the session ends."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    ups = FakeUpstreams()
    ups.gate = trio.Event()
    sink = ListSink()
    state = state_for(pki)
    session = Session(server_raw, state=lambda: state, upstreams=ups, limits=LimitsSettings(),
                      log=make_logger(LoggingSettings(stdout=False), extra_sinks=[sink]))
    done = trio.Event()

    async def run() -> None:
        await session.run()
        done.set()

    nursery.start_soon(run)
    client = trio.SSLStream(client_raw, pki.client_ctx(pki.operator), server_hostname="localhost")
    await client.send_all(encode_adu(7, 1, struct.pack(">BHH", 3, 4, 1)))
    await trio.testing.wait_all_tasks_blocked()
    assert ups.in_flight == 1
    session.stop_reading()
    await trio.testing.wait_all_tasks_blocked()
    assert not done.is_set() and ups.in_flight == 1
    ups.gate.set()
    assert await read_replies(client, 1) == [(7, 1, bytes([3, 2, 0, 4]))]
    with trio.fail_after(5):
        await done.wait()
    assert session.close_reason == "server_shutdown"
    assert (session.requests, session.allowed) == (1, 1)


async def test_idle_timeout_spares_a_connection_with_a_request_in_flight(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """The idle watchdog closes a silent connection, but not while a request is in flight."""
    ups = FakeUpstreams()
    ups.gate = trio.Event()
    client, ups, sink, _ = await run_session(nursery, pki, who=pki.operator, upstreams=ups,
                                             limits=LimitsSettings(idle_timeout=0.2))
    await client.send_all(encode_adu(3, 1, struct.pack(">BHH", 3, 1, 1)))
    await trio.sleep(0.5)  # more than two idle periods with the PLC silent
    assert not events(sink, "connection-closed")
    ups.gate.set()
    assert await read_replies(client, 1) == [(3, 1, bytes([3, 2, 0, 1]))]
    for _ in range(100):
        if events(sink, "connection-closed"):
            break
        await trio.sleep(0.05)
    [ev] = events(sink, "connection-closed")
    assert ev["event.reason"] == "idle_timeout" and ev["mbsec.requests"] == 1


class GatedStream(RecordingStream):
    """A RecordingStream whose sends block while ``gate`` is closed (a full socket buffer)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.gate = trio.Event()
        self.gate.set()
        self.sends = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends += 1
        await self.gate.wait()
        await self.inner.send_all(data)


async def test_replies_queued_behind_a_blocked_send_keep_one_record_each(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """While one reply waits for the transport, replies that complete meanwhile queue behind
    it in completion order and go out in one write, still one TLS record per reply."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    gated = GatedStream(server_raw)
    ups = FakeUpstreams()
    ups.gate = trio.Event()
    state = state_for(pki)
    session = Session(gated, state=lambda: state, upstreams=ups, limits=LimitsSettings(),
                      log=make_logger(LoggingSettings(stdout=False)))
    nursery.start_soon(session.run)
    rec = RecordingStream(client_raw)
    client = trio.SSLStream(rec, pki.client_ctx(pki.operator), server_hostname="localhost")
    await client.do_handshake()
    mark = len(rec.received)
    await client.send_all(b"".join(encode_adu(t, 1, struct.pack(">BHH", 3, t, 1))
                                   for t in range(4)))
    await trio.testing.wait_all_tasks_blocked()
    assert ups.in_flight == 4
    gated.gate = trio.Event()  # the transport stops taking data
    sends_before = gated.sends
    ups.gate.set()
    await trio.testing.wait_all_tasks_blocked()
    assert gated.sends == sends_before + 1  # the first reply is stuck, the rest queue behind it
    gated.gate.set()
    replies = await read_replies(client, 4)
    assert sorted(t for t, _u, _p in replies) == [0, 1, 2, 3]
    assert gated.sends == sends_before + 2  # the queued three went out together
    records = tls_records(bytes(rec.received[mark:]))
    assert [r[0] for r in records] == [23] * 4
    assert session.bytes_out == 4 * 11


class CountingPolicy:
    """Delegates to a real policy and counts ``evaluate`` calls."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.evaluated: list[tuple[int, int]] = []  # (unit, function code)

    def principal(self, identity: Any, source_ip: str) -> Any:
        return self.policy.principal(identity, source_ip)

    def evaluate(self, principal: Any, unit_id: int, access: Any) -> Any:
        self.evaluated.append((unit_id, access.function_code))
        return self.policy.evaluate(principal, unit_id, access)


async def test_repeated_reads_are_decided_once_per_policy_and_every_denial_is_logged(
    pki: Pki, nursery: trio.Nursery
) -> None:
    """The per-connection decision memo: a polled read is decided once per policy generation;
    writes are always decided; a denial is still answered and logged every time."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    ups = FakeUpstreams()
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False, allowed_requests="info"), extra_sinks=[sink])
    base = state_for(pki)
    first = CountingPolicy(base.policy)
    current = [ProxyState(tls=base.tls, policy=first, limiter=base.limiter)]  # type: ignore[arg-type]
    session = Session(server_raw, state=lambda: current[0], upstreams=ups,
                      limits=LimitsSettings(), log=log, allowed_requests="info")
    nursery.start_soon(session.run)
    client = trio.SSLStream(client_raw, pki.client_ctx(pki.operator), server_hostname="localhost")
    read = struct.pack(">BHH", 3, 7, 2)
    write = struct.pack(">BHH", 6, 7, 9)  # operators may not write
    for tid in (1, 2, 3):
        await client.send_all(encode_adu(tid, 1, read))
        assert await read_replies(client, 1) == [(tid, 1, bytes([3, 4, 0, 7, 0, 8]))]
    assert first.evaluated == [(1, 3)]
    await client.send_all(encode_adu(4, 2, read))  # another unit is another decision
    await read_replies(client, 1)
    for tid in (5, 6):
        await client.send_all(encode_adu(tid, 1, write))
        assert await read_replies(client, 1) == [(tid, 1, bytes([0x86, 0x01]))]
    assert first.evaluated == [(1, 3), (2, 3), (1, 6), (1, 6)]
    # a reload (new generation) with a policy that denies everything: decided afresh
    deny_all = CountingPolicy(load_policy_text("version: 1\ndefault: deny\nrules: []\n"))
    current[0] = ProxyState(tls=base.tls, policy=deny_all, limiter=RateLimiter(deny_all.policy),  # type: ignore[arg-type]
                            generation=1)
    for tid in (7, 8):
        await client.send_all(encode_adu(tid, 1, read))
        assert await read_replies(client, 1) == [(tid, 1, bytes([0x83, 0x01]))]
    assert deny_all.evaluated == [(1, 3)]
    assert len(first.evaluated) == 4
    denied = [e for e in events(sink, "modbus-request") if e["modbus.decision"] == "deny"]
    assert [e["modbus.transaction_id"] for e in denied] == [5, 6, 7, 8]
    assert len(ups.calls) == 4  # three polls of unit 1 and one of unit 2 reached the PLC
