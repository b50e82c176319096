"""The data plane (the epoll driver, mbsec/path/epoll.py, and the core it drives) through real
sockets and real TLS: pipelining bound, stalled clients, idle timeout with a request in flight,
PLCs that stop reading or never accept, the slot queue, backoff, reload of the upstream
targets, drain, the data-plane thread's life cycle, busy polling, TLS 1.3 KeyUpdate, host
names resolved off the loop, failing log sinks (``logging.on_sink_failure``) and bugs in a
handler (they cost one connection, never the data plane).

The core's rules are tested sans-IO in tests/path/ (test_client.py, test_decide.py, ...);
what is here needs the driver: sockets, TLS records, the thread, the control plane around it.
Regression tests from the reviews of the threaded data plane (formerly
tests/test_reactor_review*.py) are named for what they test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    LocalTcpServer,
    Pki,
    ProxyHandle,
    ScriptedPlc,
    StartProxy,
    TlsClient,
    read_hr,
    tuned_client,
    unused_port,
)

from mbsec.audit import ListSink
from mbsec.modbus.mbap import FrameBuffer, encode_adu

WRITE_100 = struct.pack(">BHH", 6, 100, 1337)  # FC06: register 100 := 1337


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


class RawPlc(LocalTcpServer):
    """A PLC that records requests, answers FC03 with zeros unless ``silent``, can reset its
    connections (RST), and counts the connections the proxy closed."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.requests: list[tuple[int, int, bytes]] = []
        self.opened = 0
        self.closed = 0
        self.got_request = trio.Event()
        self._streams: list[trio.SocketStream] = []

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.opened += 1
        self._streams.append(stream)
        frames = FrameBuffer()
        try:
            while data := await stream.receive_some(4096):
                frames.receive_data(data)
                while (adu := frames.next_frame()) is not None:
                    self.requests.append((adu.transaction_id, adu.unit_id, adu.pdu))
                    self.got_request.set()
                    if not self.silent:
                        await stream.send_all(
                            encode_adu(adu.transaction_id, adu.unit_id, bytes([3, 2, 0, 0])))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        self.closed += 1

    def reset_connections(self) -> None:
        for st in self._streams:
            st.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            st.socket.close()  # RST


async def raw_plc(nursery: trio.Nursery, **kw: Any) -> RawPlc:
    plc = RawPlc(**kw)
    await nursery.start(plc.serve)
    return plc


# -- log sinks ---------------------------------------------------------------------------------


class BlockingSink(ListSink):
    """Once armed, blocks the thread that writes the next "request denied" line until
    ``release`` (at most 2 s): the data plane stops in the middle of a loop pass (a
    synchronous sink writing to a full pipe does exactly that in service)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, level: str, line: str) -> None:
        if self.armed and '"request denied"' in line:
            self.armed = False
            self.entered.set()
            self.release.wait(2.0)
        super().write(level, line)

    async def wait_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 2.0), "the sink was not reached"


class BreakingSink(ListSink):
    """A log destination that breaks (its pipe closed) while ``failing``, or on every line
    containing ``marker``: a full disk, a SIEM pipe that went away."""

    def __init__(self, marker: str | None = None) -> None:
        super().__init__()
        self.marker = marker
        self.failing = False
        self.failed = 0

    def write(self, level: str, line: str) -> None:
        if self.failing or (self.marker is not None and self.marker in line):
            self.failed += 1
            raise BrokenPipeError(32, "Broken pipe")
        super().write(level, line)


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


def upstreams(**targets: dict[str, Any]) -> dict[str, Any]:
    """``settings=`` for start_proxy with several PLC targets (127.0.0.1, 1 s timeouts)."""
    return {"upstreams": {
        name: {"host": "127.0.0.1", "request_timeout": 1.0, "connect_timeout": 1.0, **cfg}
        for name, cfg in targets.items()}}


def rst(client: TlsClient) -> None:
    """The client's TCP connection dies hard (RST), as when an HMI crashes."""
    sock = client.stream.transport_stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def plane_errors(h: ProxyHandle) -> list[Any]:
    return [e.get("error.type") for e in h.events("data-plane-error")]


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


async def test_pipelined_requests_answered_at_once_are_all_answered(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """600 pipelined requests for a unit no target routes (0x0A at once, as for a PLC in its
    reconnect backoff): every one is answered, the data plane neither recurses nor wedges."""
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    n = 600
    await c.stream.send_all(b"".join(encode_adu(i, 7, read_hr(0, 1)) for i in range(n)))
    replies = []
    with trio.move_on_after(3):
        while len(replies) < n and (r := await c.recv()) is not None:
            replies.append(r)
    assert len(replies) == n, f"{len(replies)} of {n} replies; errors: {plane_errors(h)}"
    assert sorted(replies) == [(i, 7, bytes([0x83, 0x0A])) for i in range(n)]
    assert plc.requests == []


async def test_a_client_pipelining_a_long_burst_of_valid_requests_is_served(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """400 kB of valid FC16 writes, sent as fast as the socket takes them in 13600-byte TLS
    records, to a PLC that takes 2 ms per request (so the proxy's socket buffer is full
    whenever it reads): the proxy reads at its own pace (max_pipelined) and answers every
    one. (With 13600-byte records, a full 64 KiB read takes five whole records within two
    reads, whatever the first one's alignment.)"""
    plc = await counting(nursery, delay=lambda a: 0.002)
    h = await start_proxy(plc.port, upstream={"depth": 8})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    n = 1500
    data = b"".join(encode_adu(i, 1, write_regs(0, 123)) for i in range(n))  # 259 bytes each
    got = 0

    async def reader() -> None:
        nonlocal got
        while got < n and await c.recv() is not None:
            got += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as n_:
            n_.start_soon(reader)
            with contextlib.suppress(trio.BrokenResourceError):
                for i in range(0, len(data), 13600):
                    await c.stream.send_all(data[i : i + 13600])
    reasons = [e.get("event.reason") for e in h.events("connection-closed")]
    assert got == n, f"{got} of {n} answered; the connection closed: {reasons}"


async def test_a_vanished_clients_requests_at_the_plc_are_audited_and_waiting_ones_withdrawn(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A slow read at the PLC and a write queued behind it (the client's requests travel on
    one link, depth 1); the HMI crashes (RST): the read is audited when the PLC answers it,
    the write is withdrawn (never sent) and that is audited too."""
    plc = await counting(nursery, delay=lambda a: 0.4 if a == 50 else 0.0)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    await c.stream.send_all(encode_adu(8, 1, read_hr(50, 1)) + encode_adu(9, 1, WRITE_100))
    await trio.sleep(0.1)
    rst(c)
    await trio.sleep(0.6)  # the read is answered; the write would go out after it
    executed = sorted(pdu[0] for _tid, _unit, pdu in plc.requests)
    events = h.events("modbus-request")
    audited = sorted(e["modbus.function_code"] for e in events
                     if e.get("event.reason") != "client_gone")
    withdrawn = sorted(e["modbus.function_code"] for e in events
                       if e.get("event.reason") == "client_gone")
    assert executed == [3], "the read reached the PLC, the write did not"
    assert audited == executed, (
        f"the PLC executed function codes {executed}, the audit log shows {audited}")
    assert withdrawn == [6]
    closed = await h.wait_event("connection-closed")
    assert closed["mbsec.allowed"] == 1 and closed["mbsec.errors"] == 1


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


async def test_a_timed_out_request_keeps_the_link_and_its_late_reply_reaches_nobody(
    start_proxy: StartProxy, nursery: trio.Nursery, pki: Pki
) -> None:
    """The PLC answers a read after 2 s, request_timeout is 0.3 s: the read gets 0x0B, the
    link is not reset for it, the client's next request gets its own outcome (its reply, or
    0x0B while the late one holds its link's slot), the late reply is dropped, and once it
    came the client is served on that link again."""
    plc = await counting(nursery, delay=lambda a: 2.0 if a == 50 else 0.0)
    h = await start_proxy(plc.port, upstream={"request_timeout": 0.3},
                          limits={"max_pipelined": 1})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    t0 = trio.current_time()
    await c.stream.send_all(encode_adu(1, 1, read_hr(50, 1)) + encode_adu(2, 1, read_hr(7, 1)))
    first, second = await c.recv(), await c.recv()
    assert first == (1, 1, bytes([0x83, 0x0B]))
    assert second in ((2, 1, fc03_reply(7, 1)), (2, 1, bytes([0x83, 0x0B]))), second
    await trio.sleep(max(0.0, 2.3 - (trio.current_time() - t0)))  # the late reply came
    assert await c.request(3, 1, read_hr(8, 1)) == (3, 1, fc03_reply(8, 1))
    assert h.events("upstream-reset") == []
    late = await h.wait_event("upstream-late-reply")
    assert late["mbsec.target"] == "plc"


async def test_a_client_whose_requests_keep_breaking_the_link_is_refused_not_everyone(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Every reply to register 0 is a broken frame: each costs the request that got it (0x0B)
    and resets the link, which reconnects at once (no backoff for a reset a client is blamed
    for); after breaker_resets of them the client is refused (0x0A) without reaching the PLC,
    while another client is served."""
    plc = await counting(nursery, garbage_at=frozenset({0}))
    h = await start_proxy(plc.port, upstream={"breaker_resets": 2, "backoff_initial": 5.0},
                          limits={"max_pipelined": 1})
    bad = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    await bad.stream.send_all(b"".join(encode_adu(i, 1, read_hr(0, 1)) for i in (1, 2, 3)))
    replies = [await bad.recv() for _ in range(3)]
    assert replies == [(1, 1, bytes([0x83, 0x0B])), (2, 1, bytes([0x83, 0x0B])),
                       (3, 1, bytes([0x83, 0x0A]))]
    assert len(plc.requests) == 2  # the third never reached the PLC
    penalized = await h.wait_event("client-penalized")
    assert penalized["mbsec.resets"] == 2
    refused = await h.wait_event("modbus-request",
                                 lambda e: e.get("modbus.transaction_id") == 3)
    assert refused["event.reason"] == "penalized"
    async with closing(await TlsClient.connect(h.port, pki.client_ctx(pki.operator))) as other:
        assert await other.request(4, 1, read_hr(5, 1)) == (4, 1, fc03_reply(5, 1))
    resets = h.events("upstream-reset")
    assert len(resets) == 2 and all(e["mbsec.blamed"] for e in resets), resets
    assert h.events("upstream-connect-failed") == []


async def test_a_request_started_by_a_failed_link_write_is_sent_in_the_same_pass(
    pki: Pki, nursery: trio.Nursery, start_proxy: StartProxy
) -> None:
    """PLC A resets while the data plane is busy (a log line that blocks); the write at the
    end of that pass fails, the link resets, its requests get 0x0B, and the client's write
    for PLC B, which starts because of it, must be sent by the same pass, not after B's
    request deadline (then it would be answered 0x0B and executed later anyway)."""
    plc_a = await raw_plc(nursery, silent=True)
    plc_b = await counting(nursery)
    sink = BlockingSink()
    h = await start_proxy(0, sink=sink, limits={"max_pipelined": 1}, settings=upstreams(
        a={"port": plc_a.port, "unit_ids": [1], "depth": 2, "request_timeout": 2.0,
           "connect_timeout": 5.0},
        b={"port": plc_b.port, "unit_ids": [2], "request_timeout": 0.3,
           "connect_timeout": 5.0}))
    x = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    y = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    r = await x.request(1, 2, read_hr(0, 1))  # PLC B connected
    assert r is not None and r[2][0] == 3
    await trio.sleep(0.4)  # the warm-up's deadline timer has fired
    # x: a read on A (never answered) and, pipelined behind it, a write on B
    await x.stream.send_all(encode_adu(2, 1, read_hr(0, 1)) + encode_adu(3, 2, WRITE_100))
    with trio.fail_after(2):
        await plc_a.got_request.wait()
    # y: a denied request (its log line holds the data plane), then a read for A
    sink.armed = True
    await y.stream.send_all(encode_adu(10, 1, read_hr(500, 1)) + encode_adu(11, 1, read_hr(1, 1)))
    await sink.wait_entered()
    plc_a.reset_connections()  # A resets: the write at the end of this pass fails
    await trio.sleep(0.1)
    sink.release.set()
    got: dict[int, bytes] = {}
    with trio.fail_after(2):
        while len(got) < 2:
            reply = await x.recv()
            assert reply is not None
            got[reply[0]] = reply[2]
    await trio.sleep(0.1)
    writes_at_b = [pdu for _tid, _unit, pdu in plc_b.requests if pdu[0] == 6]
    assert got[2] == bytes([0x83, 0x0B])
    assert got[3] == WRITE_100, (
        f"the write was answered {got[3].hex()} and PLC B then received "
        f"{len(writes_at_b)} write(s): executed after the client was told it failed")
    assert writes_at_b == [WRITE_100]


async def test_upstream_by_host_name_is_resolved_off_the_loop(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await counting(nursery)
    h = await start_proxy(plc.port, upstream={"host": "localhost"})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(5, 1)) == (1, 1, fc03_reply(5, 1))
    assert len(plc.requests) == 1


async def test_unresolvable_upstream_name_gives_0x0a(
    pki: Pki, start_proxy: StartProxy
) -> None:
    h = await start_proxy(502, upstream={"host": "plc.invalid", "connect_timeout": 0.5})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    with trio.fail_after(5):
        assert await c.request(1, 1, read_hr(0, 1)) == (1, 1, bytes([0x83, 0x0A]))
    ev = await h.wait_event("upstream-connect-failed")
    assert ev["event.reason"] in ("connect_failed", "connect_timeout")


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


async def test_data_plane_thread_ends_with_serve(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    ours = [t for t in threading.enumerate() if t.name == "mbsec-dataplane"]
    assert len(ours) == 1 and ours[0].daemon
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(0, 1)) == (1, 1, fc03_reply(0, 1))
    h.proxy.request_shutdown()
    assert await c.closed_by_peer()
    with trio.fail_after(3):
        await h.stopped.wait()
    assert not ours[0].is_alive()
    assert [t for t in threading.enumerate() if t.name == "mbsec-dataplane"] == []
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "server_shutdown"


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


async def test_busy_poll_does_not_spin_for_a_trickle_of_requests(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """``busy_poll_us`` spins only where it pays: one request every 10 ms to a PLC that takes
    3 ms (neither the next request nor the reply comes within the 1 ms window): the spins find
    nothing and back off. The former rule (spin after every pass that had events) spun after
    each of the two passes a request makes: about 200 empty 1 ms spins for these 100 requests.
    Counted, not timed: the thread's CPU (60-70 ms here, against 250-300 ms with the former
    rule) moves with the box."""
    plc = await counting(nursery, delay=lambda a: 0.003)
    h = await start_proxy(plc.port, settings={"busy_poll_us": 1000})
    plane = h.proxy.data_plane
    assert plane is not None
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(0, 1, read_hr(0, 1)) is not None
    spins, empty = plane.spins, plane.empty_spins
    for i in range(1, 101):
        assert await c.request(i, 1, read_hr(i, 1)) == (i, 1, fc03_reply(i, 1))
        await trio.sleep(0.01)
    spins, empty = plane.spins - spins, plane.empty_spins - empty
    assert empty <= 40, f"{empty} empty spins of {spins} for 100 sparse requests"


SWAP_POLICY = """\
version: 1
default: deny
targets:
  line-plc: {{unit_ids: [{line}]}}
  bench-plc: {{unit_ids: [{bench}]}}
rules:
  - id: engineer-bench
    description: Engineers read and write the test bench only, never the line PLC
    roles: [engineer]
    targets: [bench-plc]
    functions: [read_holding_registers, write_single_register]
    addresses: ["0-199"]
"""


async def test_reload_switches_the_policy_and_the_routes_in_one_step(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The admin renumbers (the bench becomes unit 1, the line unit 2; configuration and
    policy together) while the data plane is between two requests: a write to unit 1 is
    decided and routed either by the old pair or by the new one, so it never reaches the
    line PLC."""
    line = await counting(nursery)
    bench = await counting(nursery)
    sink = BlockingSink()
    h = await start_proxy(0, policy=SWAP_POLICY.format(line=1, bench=2), sink=sink,
                          settings=upstreams(line={"port": line.port, "unit_ids": [1]},
                                             bench={"port": bench.port, "unit_ids": [2]}))
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    s = h.proxy.settings
    new = s.model_copy(update={"upstreams": {
        "line": s.upstreams["line"].model_copy(update={"unit_ids": [2]}),
        "bench": s.upstreams["bench"].model_copy(update={"unit_ids": [1]}),
    }})
    sink.armed = True
    # a denied read (old policy: unit 1 is the line), then a write to unit 1
    await c.stream.send_all(encode_adu(1, 1, read_hr(0, 1)) + encode_adu(2, 1, WRITE_100))
    await sink.wait_entered()  # the data plane is between the two requests
    h.policy_path.write_text(SWAP_POLICY.format(line=2, bench=1), encoding="utf-8")
    threading.Timer(0.3, sink.release.set).start()  # while reload() waits for the switch
    assert h.proxy.reload(new) is True
    first, second = await c.recv(), await c.recv()
    assert first == (1, 1, bytes([0x83, 0x01]))
    await trio.sleep(0.1)
    line_writes = [pdu for _tid, _unit, pdu in line.requests if pdu[0] == 6]
    assert not line_writes, (
        f"the line PLC executed {line_writes} (reply {second}): allowed by the new policy "
        "(unit 1 = bench) but routed by the old map (unit 1 = line)")
    # after the reload, unit 1 is the bench: the write goes there
    assert await c.request(3, 1, WRITE_100) == (3, 1, WRITE_100)
    assert [pdu for _tid, _unit, pdu in bench.requests if pdu[0] == 6][-1:] == [WRITE_100]


async def test_shutdown_closes_the_plc_connections_of_targets_retired_by_a_reload(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await raw_plc(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    r = await c.request(1, 1, read_hr(0, 1))
    assert r is not None and r[2][0] == 3
    s = h.proxy.settings
    changed = s.model_copy(update={"upstreams": {
        "plc": s.upstreams["plc"].model_copy(update={"request_timeout": 1.5})}})
    assert h.proxy.reload(changed) is True  # the old target retires (3.5 s grace)
    await c.aclose()
    await trio.sleep(0.1)
    h.proxy.request_shutdown()
    with trio.fail_after(5):
        await h.stopped.wait()
    await trio.sleep(0.3)  # serve() has returned: every PLC connection must be closed
    assert plc.opened >= 1
    assert plc.closed == plc.opened, (
        f"{plc.opened - plc.closed} of {plc.opened} PLC connection(s) still open after shutdown")


async def test_a_dead_data_plane_loop_stops_the_proxy_and_marks_it_failed(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The loop itself dies (not one handler): the proxy stops (and exits 1) instead of
    accepting connections it never answers."""
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    plane = h.proxy.data_plane
    assert plane is not None and not h.proxy.failed
    plane._ep.close()  # the loop's next epoll_wait raises: the loop itself dies
    plane.call_threadsafe(lambda: None)  # wake it
    ev = await h.wait_event("data-plane-error", lambda e: e["log.level"] == "critical")
    assert ev["error.type"] in ("ValueError", "OSError")  # closed before or during the wait
    with trio.fail_after(5):
        await h.stopped.wait()
    assert h.proxy.failed
    with trio.fail_after(5):  # the thread is gone
        while any(t.name == "mbsec-dataplane" for t in threading.enumerate()):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_name_resolution_finishing_after_stop_writes_into_no_other_file(
    pki: Pki, start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PLC's name is still being resolved (in a thread) when the proxy stops: the result
    must not be written into the closed wake-up eventfd, whose number a new file may have."""
    real = socket.getaddrinfo

    def slow_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "plc.example.test":
            time.sleep(0.4)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    h = await start_proxy(502, upstream={"host": "plc.example.test"},
                          limits={"drain_timeout": 0})
    assert h.proxy.data_plane is not None
    wake = h.proxy.data_plane._wake_fd
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.send(1, 1, read_hr(0, 1))  # the PLC's name is being resolved (0.4 s)
    await trio.sleep(0.05)
    h.proxy.request_shutdown()
    with trio.fail_after(5):
        await h.stopped.wait()
    # serve() returned and stop() closed the eventfd; a new socket takes its number
    try:
        os.fstat(wake)
        pytest.skip("the eventfd's number was reused before the test could take it")
    except OSError:
        pass
    a, b = socket.socketpair()
    extra = a.fileno() != wake and b.fileno() != wake
    if extra:
        os.dup2(a.fileno(), wake)  # the freed number now names our socket too
    reader = a if b.fileno() == wake else b
    try:
        await trio.sleep(0.6)  # the resolution ends
        reader.setblocking(False)
        injected = b""
        with contextlib.suppress(BlockingIOError):
            injected = reader.recv(100)
        assert injected == b"", f"{injected!r} written into an unrelated socket"
    finally:
        if extra:
            os.close(wake)
        a.close()
        b.close()


def test_the_data_plane_is_compiled_unless_asked_not_to_be() -> None:
    """scripts/bootstrap.sh installs a C compiler and the Python headers, so setup.py's mypyc
    build must have produced the extension: a silent fallback to the interpreted modules
    would cost a good part of the throughput. MBSEC_PURE=1 (an install without the build)
    opts out."""
    from mbsec import audit_fast, metrics_core, nodestate
    from mbsec.modbus import mbap, pdu
    from mbsec.path import client, decide, epoll, plc
    from mbsec.policy import ratelimit

    if os.environ.get("MBSEC_PURE") == "1":
        pytest.skip("MBSEC_PURE=1: the interpreted data plane was asked for")
    assert epoll.compiled(), f"{epoll.__file__} is not the mypyc build"
    # the request side is compiled with the core (setup.py's CORE): one module left out would
    # put the boxing of an interpreted call back on every request
    for module in (client, mbap, decide, plc, pdu, ratelimit, audit_fast, nodestate,
                   metrics_core):
        assert module.__file__ is not None and module.__file__.endswith(".so"), (
            f"{module.__file__} is not the mypyc build")


async def test_server_start_says_which_data_plane_runs(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    from mbsec.path import epoll

    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    ev = await h.wait_event("server-start")
    assert ev["mbsec.data_plane"] == "thread"
    assert ev["mbsec.data_plane_compiled"] is epoll.compiled()


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


# -- log sinks that fail (logging.on_sink_failure) -----------------------------------------------


async def test_a_failing_log_sink_refuses_writes_and_serves_reads_by_default(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    """The only log sink breaks (a full disk): nothing stops and no connection is closed;
    reads are answered, a write gets exception 04 (refuse_writes, the default) and never
    reaches the PLC, an alarm goes to stderr and the failures are counted; once the sink
    takes events again, writes go through."""
    plc = await counting(nursery)
    sink = BreakingSink()
    h = await start_proxy(plc.port, sink=sink)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    assert await c.request(1, 1, read_hr(5, 1)) == (1, 1, fc03_reply(5, 1))
    sink.failing = True
    assert await c.request(2, 1, read_hr(6, 1)) == (2, 1, fc03_reply(6, 1))  # its line is lost
    assert await c.request(3, 1, WRITE_100) == (3, 1, bytes([0x86, 0x04]))
    assert await c.request(4, 1, read_hr(7, 1)) == (4, 1, fc03_reply(7, 1))
    async with closing(await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))) as other:
        assert await other.request(5, 1, read_hr(8, 1)) == (5, 1, fc03_reply(8, 1))
        assert await other.request(6, 1, WRITE_100) == (6, 1, bytes([0x86, 0x04]))
    assert [p for _t, _u, p in plc.requests if p[0] == 6] == []
    assert sink.failed >= 5
    assert h.metrics.value("mbsec_log_sink_failures_total", sink="BreakingSink") == sink.failed
    assert "log-sink-failed" in capsys.readouterr().err
    sink.failing = False  # room on the disk again: the next event is written
    assert await c.request(7, 1, read_hr(9, 1)) == (7, 1, fc03_reply(9, 1))
    assert await c.request(8, 1, WRITE_100) == (8, 1, WRITE_100)
    assert [p for _t, _u, p in plc.requests if p[0] == 6] == [WRITE_100]
    refused = [e for e in h.events("modbus-request")
               if e.get("event.reason") == "audit_unavailable"]
    assert refused == []  # their lines were lost with the sink: the counter tells


async def test_on_sink_failure_serve_answers_writes_while_the_sink_fails(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await counting(nursery)
    sink = BreakingSink()
    h = await start_proxy(plc.port, sink=sink, settings={"logging": {
        "stdout": False, "allowed_requests": "info", "on_sink_failure": "serve"}})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    sink.failing = True
    assert await c.request(1, 1, read_hr(5, 1)) == (1, 1, fc03_reply(5, 1))
    assert await c.request(2, 1, WRITE_100) == (2, 1, WRITE_100)
    assert await c.request(3, 1, WRITE_100) == (3, 1, WRITE_100)
    assert [p for _t, _u, p in plc.requests if p[0] == 6] == [WRITE_100, WRITE_100]


@pytest.mark.parametrize(("marker", "pdu", "answer"), [
    ('"request denied"', read_hr(500, 1), bytes([0x83, 0x01])),  # outside operator-read
    ('"request forwarded"', read_hr(3, 1), fc03_reply(3, 1)),
    ('"upstream-reset"', read_hr(0, 1), bytes([0x83, 0x0B])),  # a broken reply resets
], ids=["denial", "allowed", "link_reset"])
async def test_a_sink_failing_on_one_event_costs_no_request(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, marker: str, pdu: bytes,
    answer: bytes,
) -> None:
    """The log line of a denial, of an allowed request, or of a PLC link reset cannot be
    written: the request is still answered, and the connection serves the next one."""
    plc = await counting(nursery, garbage_at=frozenset({0}))
    sink = BreakingSink(marker)
    h = await start_proxy(plc.port, sink=sink)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, pdu) == (1, 1, answer)
    assert sink.failed >= 1
    assert await c.request(2, 1, read_hr(7, 1)) == (2, 1, fc03_reply(7, 1))
    assert plane_errors(h) == []


# -- a bug in a handler costs its connection, never the data plane --------------------------------


def _inject_decisions_bug(monkeypatch: pytest.MonkeyPatch, where: str,
                          wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """The proxy's connections get a subclass of ``Decisions`` whose ``where`` method is
    ``wrap(the real one)``. A subclass, not a patched class: setup.py compiles decide.py with
    mypyc, and a compiled class cannot be patched (it allows interpreted subclasses)."""
    from mbsec import session
    from mbsec.path.decide import Decisions

    buggy = type("BuggyDecisions", (Decisions,), {where: wrap(getattr(Decisions, where))})
    monkeypatch.setattr(session, "Decisions", buggy)


@pytest.mark.parametrize("where", ["decide", "complete"])
async def test_a_bug_while_handling_a_request_closes_that_connection_only(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """An exception while deciding a request, or while completing it: that connection is
    closed (internal_error), neither answered wrongly nor left hanging with the request
    counted in flight; the error is logged and other clients are served."""
    poison = read_hr(66, 1)

    def buggy(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, adu: Any, *args: Any) -> Any:
            if adu.pdu == poison:
                raise RuntimeError(f"a bug in {where}")
            return real(self, adu, *args)
        return call

    _inject_decisions_bug(monkeypatch, where, buggy)
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(5, 1)) == (1, 1, fc03_reply(5, 1))
    await c.send(2, 1, poison)
    assert await c.closed_by_peer()
    ev = await h.wait_event("data-plane-error")
    assert ev["error.type"] == "RuntimeError" and where in ev["error.message"]
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "internal_error"
    async with closing(await TlsClient.connect(h.port, pki.client_ctx(pki.operator))) as other:
        assert await other.request(3, 1, read_hr(6, 1)) == (3, 1, fc03_reply(6, 1))


def _tls13_handshake_then_request_in_one_write(port: int, ctx: ssl.SSLContext,
                                               adu: bytes) -> socket.socket:
    """A TLS 1.3 client over memory BIOs that sends its last handshake flight and a request
    in one TCP write: the proxy's handshake ends with the request already read, so the data
    plane serves it as it takes the connection over (``ClientIO.start``), not on a later
    socket event."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            if outgoing.pending:
                sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the proxy closed during the handshake") from None
            incoming.write(data)
    assert obj.version() == "TLSv1.3"
    obj.write(adu)
    sock.sendall(outgoing.read())  # the client's Finished, then the request
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``sock`` (EOF or reset) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


async def test_a_bug_while_the_data_plane_takes_a_connection_over_closes_that_connection(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request that came with the client's last handshake flight is served as the data
    plane takes the connection over; a bug there closes that connection (internal_error),
    as a bug on any later event does, instead of leaving it open with nobody serving it."""
    from mbsec.path import client

    class BuggyConn(client.ClientConn):
        def receive(self, data: bytes, now: float) -> Any:
            raise RuntimeError("a bug in receive")

    monkeypatch.setattr(client, "ClientConn", BuggyConn)
    plc = await counting(nursery)
    h = await start_proxy(plc.port)
    ctx = pki.client_ctx(pki.operator)
    sock = await trio.to_thread.run_sync(
        _tls13_handshake_then_request_in_one_write, h.port, ctx,
        encode_adu(1, 1, read_hr(5, 1)))
    with sock:
        assert await trio.to_thread.run_sync(_closed_within, sock, 5.0)
    ev = await h.wait_event("data-plane-error")
    assert ev["error.type"] == "RuntimeError" and "receive" in ev["error.message"]
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "internal_error"


def _closed_internal_at_least(h: Any, n: int, _event: dict[str, Any]) -> bool:
    return len([e for e in h.events("connection-closed")
                if e.get("event.reason") == "internal_error"]) >= n


async def test_a_connection_the_data_plane_could_not_take_over_is_closed_and_freed(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug while the data plane builds a connection's state: the session, which the plane
    will never hand the connection back to, closes it (internal_error) and frees its place,
    so the identity's connection limit is not used up by connections nobody serves."""
    from mbsec.path import client

    class BrokenConn(client.ClientConn):
        def __init__(self, *args: Any, **kw: Any) -> None:
            raise RuntimeError("a bug in ClientConn")

    monkeypatch.setattr(client, "ClientConn", BrokenConn)
    plc = await counting(nursery)
    h = await start_proxy(plc.port, limits={"max_per_identity": 1})
    for n in range(1, 4):  # with its place not freed, the second one would be refused
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
        with trio.fail_after(5):
            assert await c.closed_by_peer()
        await h.wait_event("connection-closed", partial(_closed_internal_at_least, h, n))
    assert not [e for e in h.events("tls-handshake") if e.get("event.outcome") != "success"]
    errors = h.events("data-plane-error")
    assert len(errors) == 3
    assert all(e["error.type"] == "RuntimeError" and "ClientConn" in e["error.message"]
               for e in errors)


class _PairPlc(LocalTcpServer):
    """Answers FC03 requests two at a time, both replies in one send (one read on the link,
    so both complete in the same data-plane pass)."""

    async def _handle(self, stream: trio.SocketStream) -> None:
        frames = FrameBuffer()
        held: list[Any] = []
        try:
            while data := await stream.receive_some(4096):
                frames.receive_data(data)
                while (adu := frames.next_frame()) is not None:
                    held.append(adu)
                    if len(held) == 2:
                        out = b""
                        for a in held:
                            addr, count = struct.unpack(">HH", a.pdu[1:5])
                            vals = struct.pack(f">{count}H", *range(addr, addr + count))
                            out += encode_adu(a.transaction_id, a.unit_id,
                                              bytes([3, 2 * count]) + vals)
                        held.clear()
                        await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def test_a_connection_closed_by_a_bug_still_gets_the_replies_finished_before_it(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The PLC answers two pipelined reads in one segment; completing the second one fails (a
    bug), so the connection is closed as internal_error. The first read was answered by the
    PLC, logged as allowed and counted in the close line's ``destination.bytes``: the client
    must get it (for a write, it could not tell otherwise whether the PLC executed it)."""
    poison = read_hr(77, 1)

    def buggy(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, adu: Any, *args: Any) -> Any:
            if adu.pdu == poison:
                raise RuntimeError("a bug in complete")
            return real(self, adu, *args)
        return call

    _inject_decisions_bug(monkeypatch, "complete", buggy)
    plc = _PairPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, upstream={"depth": 2, "pool_size": 1})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    try:
        await c.stream.send_all(encode_adu(1, 1, read_hr(5, 1)) + encode_adu(2, 1, poison))
        try:
            first = await c.recv()
        except trio.BrokenResourceError:
            first = None
        closed = await h.wait_event("connection-closed")
        assert closed["event.reason"] == "internal_error", closed
        assert first == (1, 1, bytes([3, 2, 0, 5])), (
            f"got {first!r}; the close line says {closed.get('destination.bytes')} bytes were "
            "sent to the client")
    finally:
        await c.aclose()


def test_a_core_timer_that_raises_resets_its_link() -> None:
    """A bug in a core timer (a partial of a Target method over its link, e.g. the reply
    sweep) costs that link, never the loop: the driver finds the link in the partial and
    resets it, failing what was on it, with a data-plane-error event."""
    from functools import partial

    from mbsec.audit import flatten, make_logger
    from mbsec.metrics import NullMetrics
    from mbsec.path.epoll import DataPlane, LinkIO
    from mbsec.path.link import IDLE, OPEN
    from mbsec.path.plc import UpstreamTarget
    from mbsec.settings import LoggingSettings

    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    plane = DataPlane([UpstreamTarget("plc", "127.0.0.1", 502, frozenset({1}))], log=log,
                      metrics=NullMetrics())
    try:
        target = plane.router.targets["plc"]
        link = target.links[0]
        link.state = OPEN  # as if connected (no socket: the reset only closes it)
        plane._links[link] = LinkIO(plane, link, link.gen)
        plane.contain(partial(target._sweep, link), RuntimeError("a bug in a timer"))
        assert link.state == IDLE and link.gen == 1
        actions = [flatten(e).get("event.action") for e in sink.events()]
        assert "data-plane-error" in actions and "upstream-reset" in actions, actions
    finally:
        plane.stop()


def test_pass_end_runs_after_every_pass_and_a_failure_is_contained() -> None:
    """``pass_end`` (``workers > 1``: the node state settles the pass's in-flight releases)
    runs at the end of each loop pass, after the pass's work; one that raises costs a
    data-plane-error event, never the loop."""
    import threading

    from mbsec.audit import flatten, make_logger
    from mbsec.metrics import NullMetrics
    from mbsec.path.epoll import DataPlane
    from mbsec.path.plc import UpstreamTarget
    from mbsec.settings import LoggingSettings

    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    order: list[str] = []
    failed = threading.Event()
    ran = threading.Event()

    def pass_end() -> None:
        order.append("end")
        if order.count("end") == 1:
            failed.set()
            raise RuntimeError("a bug at the end of a pass")
        if "work" in order:
            ran.set()

    plane = DataPlane([UpstreamTarget("plc", "127.0.0.1", 502, frozenset({1}))], log=log,
                      metrics=NullMetrics(), pass_end=pass_end)
    plane.start()
    try:
        plane.call_threadsafe(lambda: None)  # a first pass: its pass_end raises
        assert failed.wait(5)
        plane.call_threadsafe(lambda: order.append("work"))  # the loop goes on
        assert ran.wait(5)
        assert order.index("work") < len(order) - 1  # the pass's work came first
        actions = [flatten(e).get("event.action") for e in sink.events()]
        assert "data-plane-error" in actions, actions
    finally:
        plane.stop()


def test_calls_handed_to_the_loop_in_bursts_all_run_in_order_with_one_wake_up_per_burst() -> None:
    """``call_threadsafe`` writes the loop's eventfd only when its queue was empty: calls
    handed over while earlier ones still wait ride on the wake-up already written. From two
    threads at once, in bursts and one by one, while the loop also runs them: none is lost,
    each thread's calls run in the order it handed them over, and a burst that lands while
    the loop is busy costs fewer eventfd writes than calls."""
    import os as _os
    import threading

    from mbsec.audit import make_logger
    from mbsec.metrics import NullMetrics
    from mbsec.path.epoll import DataPlane
    from mbsec.path.plc import UpstreamTarget
    from mbsec.settings import LoggingSettings

    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[ListSink()])
    plane = DataPlane([UpstreamTarget("plc", "127.0.0.1", 502, frozenset({1}))], log=log,
                      metrics=NullMetrics())
    writes = 0
    real_write = _os.eventfd_write

    def counting_write(fd: int, value: int) -> None:
        nonlocal writes
        writes += 1
        real_write(fd, value)

    seen: dict[str, list[int]] = {"a": [], "b": []}
    done = threading.Event()
    gate = threading.Event()
    total = 2 * 3000
    count = 0

    def record(name: str, i: int) -> None:
        nonlocal count
        seen[name].append(i)
        count += 1
        if count == total:
            done.set()

    def hand_over(name: str) -> None:
        for i in range(3000):
            plane.call_threadsafe(lambda i=i: record(name, i))
            if i % 500 == 0:
                _os.sched_yield()

    plane.start()
    try:
        plane.call_threadsafe(lambda: gate.wait(5))  # the loop busy: the next calls queue up
        _os.eventfd_write = counting_write  # type: ignore[assignment]
        try:
            threads = [threading.Thread(target=hand_over, args=(n,)) for n in ("a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            burst_writes = writes
            gate.set()
            assert done.wait(10)
        finally:
            _os.eventfd_write = real_write  # type: ignore[assignment]
        assert seen["a"] == list(range(3000)) and seen["b"] == list(range(3000))
        # the first call of the burst may find the queue empty (the loop took the gate call
        # off it): one write; every later one found calls waiting
        assert burst_writes <= 1, burst_writes
        ran = threading.Event()
        plane.call_threadsafe(ran.set)  # an idle loop is still woken by a lone call
        assert ran.wait(5)
    finally:
        plane.stop()
