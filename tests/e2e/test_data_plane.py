"""The data planes through real sockets: pipelining bound, stalled clients, idle timeout with a
request in flight, PLCs that stop reading or never accept, the slot queue, backoff, reload of
the upstream target, drain, the data-plane thread's life cycle, busy polling, TLS 1.3 KeyUpdate.

These behaviours were covered by unit tests on memory streams (tests/test_session.py,
tests/test_upstream.py) for the trio engine only. Every test here runs the real proxy; the
``data_plane`` fixture (conftest) runs each one on the threaded engine and on the trio engine,
except the few that are about the data-plane thread itself.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import trio
from conftest import (
    Pki,
    ScriptedPlc,
    StartProxy,
    TlsClient,
    read_hr,
    tuned_client,
    unused_port,
)

from mbsec.modbus.mbap import FrameBuffer, encode_adu

THREAD_ONLY = pytest.mark.parametrize("data_plane", ["thread"])


# -- PLCs ------------------------------------------------------------------------------------


class CountingPlc(ScriptedPlc):
    """A ScriptedPlc that counts requests it holds unanswered, and connections that ended."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.outstanding = 0
        self.max_outstanding = 0
        self.ended = 0
        self.first_ended = trio.Event()

    async def _reply(self, stream: trio.SocketStream, lock: trio.Lock, tid: int, unit: int,
                     pdu: bytes) -> None:
        self.outstanding += 1
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        try:
            await super()._reply(stream, lock, tid, unit, pdu)
        finally:
            self.outstanding -= 1

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            await super()._handle(stream)
        finally:
            self.ended += 1
            self.first_ended.set()


async def counting(nursery: trio.Nursery, **kw: object) -> CountingPlc:
    plc = CountingPlc(**kw)
    await nursery.start(plc.serve)
    return plc


class DeafPlc:
    """Accepts connections and never reads from them. The listening socket advertises the
    smallest MSS and receive buffer, so the proxy's socket buffers fill after ~15 kB."""

    def __init__(self) -> None:
        self.conns: list[trio.socket.SocketType] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        ls = trio.socket.socket()
        ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        try:
            await ls.bind(("127.0.0.1", 0))
            ls.listen()
            self.port = ls.getsockname()[1]
            task_status.started(self.port)
            while True:
                conn, _ = await ls.accept()
                self.conns.append(conn)
        finally:
            ls.close()
            for c in self.conns:
                c.close()

    async def drain(self, conn: trio.socket.SocketType) -> bytes:
        """Everything the proxy wrote on ``conn``, read once the proxy has closed it."""
        data = b""
        with trio.fail_after(5):
            while chunk := await conn.recv(65536):
                data += chunk
        return data


@contextlib.contextmanager
def hanging_listener() -> Iterator[int]:
    """A port where connect() hangs: backlog 0 and one connection already waiting in the accept
    queue, so Linux drops further SYNs (no refusal, no accept)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(0)
    filler = socket.socket()
    filler.settimeout(2)
    filler.connect(ls.getsockname())
    probe = socket.socket()
    probe.setblocking(False)
    try:
        probe.connect_ex(ls.getsockname())
        import select

        _r, w, _x = select.select([], [probe], [], 0.1)
        if w:
            pytest.skip("this kernel completes connects beyond a full backlog-0 accept queue")
        probe.close()
        yield int(ls.getsockname()[1])
    finally:
        probe.close()
        filler.close()
        ls.close()


# -- helpers -----------------------------------------------------------------------------------


def regs(pdu: bytes) -> list[int]:
    assert pdu[0] == 3, pdu
    return list(struct.unpack(f">{pdu[1] // 2}H", pdu[2:]))


def fc03_reply(address: int, count: int) -> bytes:
    """What ScriptedPlc (value = address) answers, as the client must see it."""
    return bytes([3, 2 * count]) + struct.pack(f">{count}H", *range(address, address + count))


def write_regs(address: int, count: int) -> bytes:
    return struct.pack(">BHHB", 16, address, count, 2 * count) + b"\x00\x07" * count


async def eventually(pred: Callable[[], bool], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while True:
            if pred():
                return
            await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def closing(c: TlsClient) -> AsyncIterator[TlsClient]:
    try:
        yield c
    finally:
        await c.aclose()


# -- client side ---------------------------------------------------------------------------------


async def test_pipelining_is_bounded_by_max_pipelined(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """max_pipelined = 2: five requests in one TLS record all get their replies, and never
    more than two of them are at the PLC at the same time (the PLC could take eight)."""
    plc = await counting(nursery, delay=lambda a: 0.1)
    h = await start_proxy(plc.port, upstream={"depth": 8}, limits={"max_pipelined": 2})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.stream.send_all(b"".join(encode_adu(10 + a, 1, read_hr(a, 2)) for a in range(5)))
    replies = [await c.recv() for _ in range(5)]
    assert sorted(r for r in replies if r is not None) == [
        (10 + a, 1, fc03_reply(a, 2)) for a in range(5)
    ]
    assert plc.max_outstanding == 2  # bounded, and really pipelined
    assert len(plc.requests) == 5 and plc.connections == 1
    evs = sorted(h.events("modbus-request"), key=lambda e: int(e["modbus.transaction_id"]))
    assert [(e["modbus.transaction_id"], e["modbus.address"], e["modbus.quantity"])
            for e in evs] == [(10 + a, a, 2) for a in range(5)]
    for ev in evs:
        assert ev["modbus.decision"] == "allow" and ev["event.outcome"] == "success"
        assert ev["mbsec.target"] == "plc"


async def test_client_that_stops_reading_is_disconnected_as_stalled(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A client that sends many large FC03 requests and never reads: once the proxy cannot
    write to it, it is closed with client_stalled after about idle_timeout; others are served
    throughout, and what the stalled client did get is intact."""
    idle = 0.3
    plc = await counting(nursery)
    h = await start_proxy(plc.port, upstream={"depth": 8, "pool_size": 1},
                          limits={"idle_timeout": idle})
    other = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    stalled = await tuned_client(h.port, pki, rcvbuf=1, mss=88)
    port = stalled.stream.transport_stream.socket.getsockname()[1]
    n = 400  # ~110 kB of replies; the proxy can queue only ~15 kB towards this client
    await stalled.stream.send_all(
        b"".join(encode_adu(1 + i, 1, read_hr(i % 75, 125)) for i in range(n)))
    sent_at = trio.current_time()
    assert await other.request(1, 1, read_hr(5, 1)) == (1, 1, fc03_reply(5, 1))
    ev = await h.wait_event("connection-closed", lambda e: e.get("source.port") == port)
    took = trio.current_time() - sent_at
    assert ev["event.reason"] == "client_stalled", ev
    assert idle * 0.9 <= took < idle + 1.0, took
    # the proxy keeps serving others on the same PLC connection
    async with closing(await TlsClient.connect(h.port, pki.client_ctx(pki.operator))) as third:
        assert await third.request(2, 1, read_hr(7, 3)) == (2, 1, fc03_reply(7, 3))
    assert plc.connections == 1
    # the stalled client gets what the kernel held for it, each reply intact, then the end
    got = 0
    with trio.fail_after(5):
        while True:
            try:
                r = await stalled.recv()
            except trio.BrokenResourceError:
                break
            if r is None:
                break
            tid, unit, pdu = r
            assert (unit, pdu) == (1, fc03_reply((tid - 1) % 75, 125))
            got += 1
    assert 0 < got < n
    await stalled.aclose()
    await other.aclose()


async def test_client_that_stops_reading_gets_no_more_requests_forwarded(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Backpressure: once replies cannot be written, the proxy stops taking requests from that
    client (the replies that fit in the kernel buffers, plus max_pipelined waiting ones)."""
    plc = await counting(nursery)
    h = await start_proxy(plc.port, upstream={"depth": 8},
                          limits={"idle_timeout": 2.0, "max_pipelined": 8})
    stalled = await tuned_client(h.port, pki, rcvbuf=1, mss=88)
    n = 400  # ~110 kB of replies; the proxy can queue only ~15 kB (~60 replies) towards it
    await stalled.stream.send_all(
        b"".join(encode_adu(1 + i, 1, read_hr(i % 75, 125)) for i in range(n)))
    await trio.sleep(0.3)  # far longer than the PLC needs for all of them
    forwarded = len(plc.requests)
    assert 30 < forwarded <= n // 2, forwarded
    async with closing(await TlsClient.connect(h.port, pki.client_ctx(pki.operator))) as other:
        assert await other.request(2, 1, read_hr(7, 3)) == (2, 1, fc03_reply(7, 3))
    await stalled.aclose()
    ev = await h.wait_event("connection-closed", lambda e: e.get("mbsec.requests", 0) > 1)
    assert ev["mbsec.requests"] <= n // 2


async def test_idle_timeout_spares_a_request_in_flight_then_closes(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The PLC takes 0.5 s, idle_timeout is 0.2 s: the connection stays for the reply (more
    than two idle periods), then the idle timeout closes it."""
    plc = await counting(nursery, delay=lambda a: 0.5)
    h = await start_proxy(plc.port, limits={"idle_timeout": 0.2})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    t0 = trio.current_time()
    assert await c.request(9, 1, read_hr(3, 1)) == (9, 1, fc03_reply(3, 1))
    assert trio.current_time() - t0 >= 0.45
    assert h.events("connection-closed") == []
    assert await c.closed_by_peer()
    ev = await h.wait_event("connection-closed")
    assert ev["event.reason"] == "idle_timeout"
    assert ev["mbsec.requests"] == 1 and ev["mbsec.allowed"] == 1
    assert ev["event.duration"] >= 0.5e9


# -- PLC side ------------------------------------------------------------------------------------


async def test_plc_that_stops_reading_keeps_its_slots_then_resets_the_link(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The PLC accepts and never recv()s: requests time out with 0x0B and keep their slots
    (the PLC may still be working on them), so no more than ``depth`` requests are ever on the
    link; after ``late_reply_wait`` the link is reset. Nothing was ever written twice. (The
    send_timeout reset, for a request the PLC's socket never took, is a core unit test.)"""
    plc = DeafPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(
        plc.port,
        upstream={"depth": 16, "pool_size": 1, "request_timeout": 0.1,
                  "late_reply_wait": 0.3, "backoff_initial": 5.0},
        limits={"max_pipelined": 64},
    )
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    codes: dict[int, int] = {}
    sent = 0

    async def reader() -> None:
        while True:
            r = await c.recv()
            assert r is not None
            tid, unit, pdu = r
            assert unit == 1 and pdu[0] == 0x90 and len(pdu) == 2, pdu  # FC16 exception
            codes[tid] = pdu[1]

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(reader)
            while not h.events("upstream-reset"):
                batch = [encode_adu(sent + i, 1, write_regs(0, 123)) for i in range(16)]
                sent += 16
                await c.stream.send_all(b"".join(batch))
                await trio.sleep(0.03)
            await eventually(lambda: len(codes) >= sent)  # every request got its answer
            n.cancel_scope.cancel()
    assert sorted(codes) == list(range(sent))  # one answer per request
    assert set(codes.values()) <= {0x0A, 0x0B} and 0x0B in codes.values()
    reset = await h.wait_event("upstream-reset")
    assert reset["event.reason"] == "late_reply_overdue", reset
    assert reset["mbsec.target"] == "plc" and reset["destination.port"] == plc.port
    timeout = await h.wait_event("modbus-request", lambda e: e.get("event.reason") == "timeout")
    assert timeout["modbus.exception_code"] == 0x0B and timeout["modbus.function_code"] == 16
    # what reached the PLC: whole ADUs with distinct transaction ids (no retry, no replay)
    wire = await plc.drain(plc.conns[0])
    frames = FrameBuffer()
    frames.receive_data(wire)
    tids = []
    with contextlib.suppress(Exception):  # the last ADU may be cut short by the reset
        while (adu := frames.next_frame()) is not None:
            assert adu.pdu == write_regs(0, 123)
            tids.append(adu.transaction_id)
    assert len(tids) == 16 and len(set(tids)) == len(tids)  # depth, never more, never again
    assert len(tids) < sent


async def test_queued_requests_time_out_waiting_for_the_only_slot(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """depth 1, pool 1, the PLC takes 0.25 s, request_timeout 0.4 s: of three requests (three
    clients, 30 ms apart) the second waits and gets its reply, the third never gets the slot
    and gets 0x0B."""
    plc = await counting(nursery, delay=lambda a: 0.25)
    h = await start_proxy(plc.port, upstream={"depth": 1, "pool_size": 1,
                                              "request_timeout": 0.4})
    clients = [await TlsClient.connect(h.port, pki.client_ctx(pki.operator)) for _ in range(3)]
    for t, c in enumerate(clients, 1):
        await c.send(t, 1, read_hr(t, 1))
        await trio.sleep(0.03)
    replies = [await c.recv() for c in clients]
    assert replies == [
        (1, 1, fc03_reply(1, 1)),
        (2, 1, fc03_reply(2, 1)),
        (3, 1, bytes([0x83, 0x0B])),
    ]
    assert [struct.unpack(">H", pdu[1:3])[0] for _t, _u, pdu in plc.requests] == [1, 2]
    assert plc.max_outstanding == 1
    ev = await h.wait_event("modbus-request", lambda e: e.get("modbus.transaction_id") == 3)
    assert ev["event.reason"] == "timeout" and ev["modbus.exception_code"] == 0x0B
    assert "no free slot" in ev["error.message"]
    assert 0.35e9 <= ev["event.duration"] < 0.6e9  # request_timeout in the queue, not longer
    done = await h.wait_event("modbus-request", lambda e: e.get("modbus.transaction_id") == 2)
    assert done["event.outcome"] == "success"


async def test_pipelined_writes_reach_the_plc_in_the_order_sent(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Twenty rounds of two writes to the same register in one TLS record: the PLC must see
    them in the order the client sent them, or the register ends with the older value."""
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    for k in range(20):
        first, second = 2 * k + 1, 2 * k + 2
        await c.stream.send_all(encode_adu(first, 1, struct.pack(">BHH", 6, 5, first))
                                + encode_adu(second, 1, struct.pack(">BHH", 6, 5, second)))
        replies = sorted(r for r in [await c.recv(), await c.recv()] if r is not None)
        assert replies == [(v, 1, struct.pack(">BHH", 6, 5, v)) for v in (first, second)]
    written = [struct.unpack(">H", pdu[3:5])[0] for _t, _u, pdu in plc.requests]
    assert written == list(range(1, 41))
    evs = [e for e in h.events("modbus-request") if e.get("modbus.function_code") == 6]
    assert len(evs) == 40 and all(e["event.outcome"] == "success" for e in evs)


async def test_plc_connect_timeout_gives_0x0a(
    pki: Pki, start_proxy: StartProxy
) -> None:
    with hanging_listener() as port:
        h = await start_proxy(port, upstream={"connect_timeout": 0.3, "backoff_initial": 5.0})
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
        t0 = trio.current_time()
        assert await c.request(4, 1, read_hr(0, 1)) == (4, 1, bytes([0x83, 0x0A]))
        took = trio.current_time() - t0
        assert 0.25 <= took < 1.5, took
        failed = await h.wait_event("upstream-connect-failed")
        assert failed["event.reason"] == "connect_timeout"
        assert failed["destination.port"] == port and failed["mbsec.backoff"] == 5.0
        ev = await h.wait_event("modbus-request", lambda e: e.get("modbus.transaction_id") == 4)
        assert ev["modbus.exception_code"] == 0x0A and ev["event.outcome"] == "failure"
        # docs/events.md lists both for 0x0A; both engines report connect_failed here
        assert ev["event.reason"] in ("connect_timeout", "connect_failed")
        assert h.metrics.value("mbsec_upstream_failures_total", target="plc",
                               reason="connect_timeout") == 1


async def test_request_during_backoff_gets_0x0a_without_a_connect(
    pki: Pki, start_proxy: StartProxy
) -> None:
    port = unused_port()
    h = await start_proxy(port, upstream={"backoff_initial": 5.0})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(0, 1)) == (1, 1, bytes([0x83, 0x0A]))
    first = await h.wait_event("modbus-request", lambda e: e.get("modbus.transaction_id") == 1)
    assert first["event.reason"] == "connect_failed"
    failed = await h.wait_event("upstream-connect-failed")
    assert failed["event.reason"] == "connect_failed" and failed["mbsec.backoff"] == 5.0
    t0 = trio.current_time()
    assert await c.request(2, 1, read_hr(0, 1)) == (2, 1, bytes([0x83, 0x0A]))
    assert trio.current_time() - t0 < 0.5  # failed fast, no connect attempt
    ev = await h.wait_event("modbus-request", lambda e: e.get("modbus.transaction_id") == 2)
    assert ev["event.reason"] == "backoff" and ev["modbus.exception_code"] == 0x0A
    assert "backoff" in ev["error.message"]
    assert len(h.events("upstream-connect-failed")) == 1
    assert h.metrics.value("mbsec_upstream_failures_total", target="plc", reason="backoff") == 1


# -- control plane ---------------------------------------------------------------------------------


async def test_reload_to_another_plc_port_routes_new_requests_and_retires_the_old_link(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    old = await counting(nursery, value=lambda u, a: 1000 + a,
                         delay=lambda a: 0.15 if a == 50 else 0.0)
    new = await counting(nursery, value=lambda u, a: 2000 + a)
    h = await start_proxy(old.port, upstream={"connect_timeout": 0.05, "request_timeout": 0.3})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(5, 1)) == (1, 1, bytes([3, 2]) + struct.pack(">H", 1005))
    await c.send(2, 1, read_hr(50, 1))  # in flight on the old link across the reload
    await trio.sleep(0.03)
    s = h.proxy.settings
    moved = s.upstreams["plc"].model_copy(update={"port": new.port})
    assert h.proxy.reload(s.model_copy(update={"upstreams": {"plc": moved}})) is True
    # reload() returns once the new targets are installed: the very next request on a new
    # connection reaches the new PLC, not the old one
    async with closing(await TlsClient.connect(h.port, pki.client_ctx(pki.operator))) as probe:
        assert await probe.request(1, 2, read_hr(99, 1)) == (1, 2, b"\x03\x02\x08\x33")
    await c.send(3, 1, read_hr(6, 1))
    replies = {r[0]: r for r in [await c.recv() for _ in range(2)] if r is not None}
    assert replies == {
        2: (2, 1, bytes([3, 2]) + struct.pack(">H", 1050)),  # the old link finished it
        3: (3, 1, bytes([3, 2]) + struct.pack(">H", 2006)),  # the new target answered
    }
    assert [struct.unpack(">H", p[1:3])[0] for _t, u, p in old.requests if u == 1] == [5, 50]
    assert [struct.unpack(">H", p[1:3])[0] for _t, u, p in new.requests if u == 1] == [6]
    ev = await h.wait_event("config-reload")
    assert ev["event.outcome"] == "success"
    connect = await h.wait_event("upstream-connect",
                                 lambda e: e.get("destination.port") == new.port)
    assert connect["mbsec.target"] == "plc"
    # retired: closed after connect_timeout + request_timeout + the grace
    assert old.ended == 0
    with trio.fail_after(3):
        await old.first_ended.wait()
    assert old.connections == 1 and new.ended == 0
    assert await c.request(4, 1, read_hr(7, 1)) == (4, 1, bytes([3, 2]) + struct.pack(">H", 2007))


async def test_shutdown_drains_in_flight_requests(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """SIGTERM: the request in flight is answered, the connection closes, the listener stops
    accepting, serve() returns and the PLC link is closed."""
    plc = await counting(nursery, delay=lambda a: 0.3)
    h = await start_proxy(plc.port, limits={"drain_timeout": 5})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.send(21, 1, read_hr(8, 2))
    await trio.sleep(0.05)
    h.proxy.request_shutdown()
    assert await c.recv() == (21, 1, fc03_reply(8, 2))  # the in-flight request completes
    assert await c.closed_by_peer()
    with trio.fail_after(3):
        await h.stopped.wait()  # serve() returned
    stop = await h.wait_event("server-stop")
    assert stop["mbsec.sessions"] == 1
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "server_shutdown"
    assert (closed["mbsec.requests"], closed["mbsec.allowed"]) == (1, 1)
    with trio.fail_after(3):
        await plc.first_ended.wait()  # the PLC link was closed too
    with pytest.raises(OSError):  # no longer accepting
        await trio.open_tcp_stream("127.0.0.1", h.port)


@THREAD_ONLY
async def test_data_plane_thread_ends_with_serve(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    ours = [t for t in threading.enumerate() if t.name == "mbsec-data-plane"]
    assert len(ours) == 1 and ours[0].daemon
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(0, 1)) == (1, 1, fc03_reply(0, 1))
    h.proxy.request_shutdown()
    assert await c.closed_by_peer()
    with trio.fail_after(3):
        await h.stopped.wait()
    assert not ours[0].is_alive()
    assert [t for t in threading.enumerate() if t.name == "mbsec-data-plane"] == []
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "server_shutdown"


@THREAD_ONLY
async def test_busy_poll_serves_correct_replies(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await counting(nursery, value=lambda u, a: u * 100 + a,
                         delay=lambda a: 0.002 * (a % 4))
    h = await start_proxy(plc.port, upstream={"depth": 4}, settings={"busy_poll_us": 50})
    assert h.proxy.settings.busy_poll_us == 50
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    for i in range(20):  # one at a time: the spin picks up the reply
        unit = 1 + i % 2
        assert await c.request(i, unit, read_hr(i, 1)) == (
            i, unit, bytes([3, 2]) + struct.pack(">H", unit * 100 + i))
    await c.stream.send_all(b"".join(encode_adu(100 + a, 2, read_hr(a, 2)) for a in range(8)))
    replies = sorted(r for r in [await c.recv() for _ in range(8)] if r is not None)
    assert replies == [
        (100 + a, 2, bytes([3, 4]) + struct.pack(">2H", 200 + a, 201 + a)) for a in range(8)
    ]
    evs = [e for e in h.events("modbus-request") if e.get("modbus.decision") == "allow"]
    assert len(evs) == 28 and all(e["event.outcome"] == "success" for e in evs)
    assert h.metrics.value("mbsec_requests_total", decision="allow",
                           function="read_holding_registers") == 28


# -- TLS 1.3 KeyUpdate -------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls13_key_update_mid_connection(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Python's ssl cannot send a KeyUpdate; ``openssl s_client`` can (the ``K`` command:
    update and request the peer's). The proxy answers it in order with the replies."""
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    msgs = tmp_path / "msgs.txt"
    proc = await trio.lowlevel.open_process(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{h.port}", "-tls1_3",
         "-servername", "localhost", "-CAfile", str(pki.ca.trust_bundle),
         "-cert", str(pki.operator.chain), "-key", str(pki.operator.key),
         "-msg", "-msgfile", str(msgs)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    out = b""

    async def until(needle: bytes) -> None:
        nonlocal out
        with trio.fail_after(5):
            while needle not in out:
                chunk = await proc.stdout.receive_some(65536)  # type: ignore[union-attr]
                assert chunk, f"s_client ended before {needle!r}: {out[-400:]!r}"
                out += chunk

    try:
        await until(b"---\n")  # session printed: the handshake is done
        await proc.stdin.send_all(encode_adu(0x0101, 1, read_hr(11, 1)))
        await until(encode_adu(0x0101, 1, fc03_reply(11, 1)))
        await proc.stdin.send_all(b"K\n")  # KeyUpdate, update_requested
        await eventually(lambda: b"KeyUpdate" in msgs.read_bytes())
        await proc.stdin.send_all(encode_adu(0x0102, 1, read_hr(12, 2)))
        # decrypting this reply proves the proxy's own KeyUpdate came before it, in order
        await until(encode_adu(0x0102, 1, fc03_reply(12, 2)))
        log = msgs.read_text()
        assert log.count(">>> TLS 1.3, Handshake [length 0005], KeyUpdate") == 1
        assert log.count("<<< TLS 1.3, Handshake [length 0005], KeyUpdate") == 1
        await proc.stdin.send_all(encode_adu(0x0103, 1, read_hr(13, 1)))
        await until(encode_adu(0x0103, 1, fc03_reply(13, 1)))
    finally:
        proc.kill()
        await proc.wait()
    evs = [e for e in h.events("modbus-request") if e.get("modbus.decision") == "allow"]
    assert sorted(e["modbus.transaction_id"] for e in evs) == [0x0101, 0x0102, 0x0103]
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] in ("client_reset", "client_closed")
    assert closed["mbsec.requests"] == 3
