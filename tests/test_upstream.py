"""Upstream pool: real sockets on 127.0.0.1 against pymodbus and scripted (misbehaving) PLCs.

Timing is deterministic: tests that need a deadline to pass use pytest-trio's ``mock_clock``
(time stands still unless the test jumps it), so a timeout fires exactly when the test says,
never because the machine was slow.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from mbsec.modbus.pdu import ExceptionResponse, Request, parse_request
from mbsec.upstream import (
    PathUnavailable,
    TargetNoResponse,
    UpstreamError,
    UpstreamReply,
    Upstreams,
    UpstreamTarget,
    configure_socket,
    tcp_dialer,
)

HEADER = struct.Struct(">HHHB")


def value(unit: int, address: int) -> int:
    """The register pattern every scripted PLC (and the pymodbus fixture) serves."""
    return (address * 7 + unit) & 0xFFFF


def adu(tid: int, unit: int, pdu: bytes) -> bytes:
    return HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu


def read_request(address: int, quantity: int) -> tuple[Request, bytes]:
    pdu = struct.pack(">BHH", 3, address, quantity)
    return parse_request(pdu), pdu


def write_request(address: int, value_: int) -> tuple[Request, bytes]:
    pdu = struct.pack(">BHH", 6, address, value_)
    return parse_request(pdu), pdu


def fc03_reply(unit: int, pdu: bytes) -> bytes:
    _, address, quantity = struct.unpack(">BHH", pdu)
    values = [value(unit, a) for a in range(address, address + quantity)]
    return bytes([3, 2 * quantity]) + struct.pack(f">{quantity}H", *values)


def registers(reply_pdu: bytes) -> list[int]:
    assert reply_pdu[0] == 3, reply_pdu
    n = reply_pdu[1] // 2
    return list(struct.unpack(f">{n}H", reply_pdu[2 : 2 + 2 * n]))


class AduReader:
    """Reads whole ADUs from a stream; ``None`` at EOF."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def next(self) -> tuple[int, int, bytes] | None:
        while True:
            if len(self.buf) >= 7:
                tid, _pid, length, unit = HEADER.unpack_from(self.buf)
                if len(self.buf) >= 6 + length:
                    pdu = bytes(self.buf[7 : 6 + length])
                    del self.buf[: 6 + length]
                    return tid, unit, pdu
            try:
                data = await self.stream.receive_some(4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not data:
                return None
            self.buf += data


async def serve_normally(stream: trio.abc.Stream, reader: AduReader | None = None) -> None:
    """A well-behaved PLC: answers every FC03 in order with the value pattern."""
    if reader is None:
        reader = AduReader(stream)
    while (req := await reader.next()) is not None:
        tid, unit, pdu = req
        if pdu[0] == 3:
            await stream.send_all(adu(tid, unit, fc03_reply(unit, pdu)))
        elif pdu[0] == 6:
            await stream.send_all(adu(tid, unit, pdu))
        else:
            await stream.send_all(adu(tid, unit, bytes([pdu[0] | 0x80, 1])))


async def normal_plc(stream: trio.abc.Stream, n: int) -> None:
    await serve_normally(stream)


Handler = Callable[[trio.abc.Stream, int], Awaitable[None]]


@dataclass
class ScriptedPlc:
    """A TCP server whose n-th connection (0-based) is handled by ``script(stream, n)``."""

    script: Handler
    connections: int = 0
    closed: trio.Event = field(default_factory=trio.Event)
    port: int = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        n = self.connections
        self.connections += 1
        try:
            await self.script(stream, n)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)
            self.closed.set()

    async def start(self, nursery: trio.Nursery, port: int = 0) -> int:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, port, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]
        return self.port


def free_port() -> int:
    """A port on 127.0.0.1 that refuses connections (bound, then released)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class RecordingLog:
    """A structlog-like logger that keeps every event (with its bound context) in a list."""

    def __init__(self, events: list[dict[str, Any]] | None = None, **ctx: Any) -> None:
        self.events: list[dict[str, Any]] = events if events is not None else []
        self.ctx = ctx

    def bind(self, **kw: Any) -> RecordingLog:
        return RecordingLog(self.events, **{**self.ctx, **kw})

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.events.append({"event": event, "level": level, **self.ctx, **kw})

    def debug(self, event: str, **kw: Any) -> None:
        self._log("debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)

    def actions(self) -> list[str]:
        return [e["event.action"] for e in self.events if "event.action" in e]


class RecordingMetrics:
    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.observed: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        self.observed.append((name, value, labels))

    def set(self, name: str, value: float, **labels: str) -> None:
        pass

    def count(self, name: str, **labels: str) -> float:
        return sum(
            v
            for (n, lab), v in self.counters.items()
            if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
        )


# -- fixtures ---------------------------------------------------------------------------


def target(port: int, **kw: Any) -> UpstreamTarget:
    defaults: dict[str, Any] = {
        "name": "plc1",
        "host": "127.0.0.1",
        "port": port,
        "unit_ids": frozenset({1}),
        "connect_timeout": 1.0,
        "request_timeout": 1.0,
        "backoff_initial": 0.2,
        "backoff_max": 1.0,
    }
    defaults.update(kw)
    return UpstreamTarget(**defaults)


async def started(
    nursery: trio.Nursery, *targets: UpstreamTarget, **kw: Any
) -> tuple[Upstreams, RecordingLog, RecordingMetrics]:
    log = RecordingLog()
    metrics = RecordingMetrics()
    ups = Upstreams(targets, log=log, metrics=metrics, **kw)
    await nursery.start(ups.run)
    return ups, log, metrics


@pytest.fixture
def pymodbus_plc() -> Iterator[int]:
    """A real pymodbus 3 Modbus/TCP server (asyncio, own thread), unit 1, registers 0..1999."""
    from pymodbus.datastore import (
        ModbusDeviceContext,
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus.server import ModbusTcpServer

    ready = threading.Event()
    state: dict[str, Any] = {}

    async def main() -> None:
        block = ModbusSequentialDataBlock(1, [value(1, a) for a in range(2000)])
        context = ModbusServerContext(devices={1: ModbusDeviceContext(hr=block)}, single=False)
        server = ModbusTcpServer(context, address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        state["port"] = server.transport.sockets[0].getsockname()[1]
        state["loop"] = asyncio.get_running_loop()
        state["stop"] = stop = asyncio.Event()
        ready.set()
        await stop.wait()
        await server.shutdown()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "pymodbus server did not start"
    try:
        yield state["port"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


# -- against a real pymodbus PLC ----------------------------------------------------------


async def test_pymodbus_reads_writes_and_unit_rewrite(
    nursery: trio.Nursery, pymodbus_plc: int
) -> None:
    t = target(pymodbus_plc, unit_ids=frozenset({1, 9}), unit_rewrite={9: 1})
    ups, log, metrics = await started(nursery, t)
    assert ups.route(9) is t and ups.route(2) is None

    reply = await ups.exchange(1, *read_request(10, 3))
    assert isinstance(reply, UpstreamReply) and reply.target == "plc1"
    assert registers(reply.pdu) == [value(1, 10), value(1, 11), value(1, 12)]
    assert not isinstance(reply.response, ExceptionResponse)

    # Unit 9 is rewritten to the PLC's unit 1 on the way out; the reply is accepted.
    reply = await ups.exchange(9, *write_request(5, 4242))
    assert reply.pdu == struct.pack(">BHH", 6, 5, 4242)
    reply = await ups.exchange(1, *read_request(5, 1))
    assert registers(reply.pdu) == [4242]

    fc16 = struct.pack(">BHHB3H", 16, 20, 3, 6, 7, 8, 9)
    reply = await ups.exchange(1, parse_request(fc16), fc16)
    assert reply.pdu == struct.pack(">BHH", 16, 20, 3)
    assert registers((await ups.exchange(9, *read_request(20, 3))).pdu) == [7, 8, 9]

    # An exception reply is a valid answer, not an upstream failure.
    reply = await ups.exchange(1, *read_request(1999, 10))
    assert isinstance(reply.response, ExceptionResponse)
    assert reply.pdu[0] == 0x83

    assert metrics.count("mbsec_upstream_connects_total", target="plc1") == 1
    assert metrics.count("mbsec_upstream_failures_total") == 0
    assert len(metrics.observed) == 6
    assert all(n == "mbsec_upstream_request_seconds" for n, _, _ in metrics.observed)
    assert log.actions() == ["upstream-connect"]
    connect = log.events[0]
    assert connect["destination.ip"] == "127.0.0.1"
    assert connect["destination.port"] == pymodbus_plc
    assert connect["mbsec.target"] == "plc1"


async def test_pymodbus_many_callers_share_one_pipelined_connection(
    nursery: trio.Nursery, pymodbus_plc: int
) -> None:
    # depth 1: pymodbus 3.16's server handles only the first ADU of a TCP read, so it cannot
    # take pipelined requests (pipelining is tested against scripted PLCs below).
    ups, _log, metrics = await started(nursery, target(pymodbus_plc, depth=1))
    results: dict[int, list[int]] = {}

    async def caller(i: int) -> None:
        for round_ in range(5):
            address = i * 10 + round_
            reply = await ups.exchange(1, *read_request(address, 2))
            results[address] = registers(reply.pdu)

    async with trio.open_nursery() as callers:
        for i in range(40):
            callers.start_soon(caller, i)
    assert len(results) == 200
    for address, regs in results.items():
        assert regs == [value(1, address), value(1, address + 1)]
    assert metrics.count("mbsec_upstream_connects_total") == 1


async def test_default_logger_and_metrics_work(nursery: trio.Nursery, pymodbus_plc: int) -> None:
    ups = Upstreams([target(pymodbus_plc)])
    await nursery.start(ups.run)
    reply = await ups.exchange(1, *read_request(0, 1))
    assert registers(reply.pdu) == [value(1, 0)]


# -- routing, validation, lifecycle --------------------------------------------------------


async def test_no_route_and_not_running() -> None:
    ups = Upstreams([target(1)])
    with pytest.raises(PathUnavailable) as exc:
        await ups.exchange(7, *read_request(0, 1))
    assert exc.value.exception_code == 0x0A and exc.value.reason == "no_route"
    with pytest.raises(PathUnavailable) as exc:
        await ups.exchange(1, *read_request(0, 1))
    assert exc.value.reason == "not_running"


def test_target_validation() -> None:
    with pytest.raises(ValueError, match="port"):
        target(0)
    with pytest.raises(ValueError, match="unit id 300"):
        target(502, unit_ids=frozenset({300}))
    with pytest.raises(ValueError, match="depth"):
        target(502, depth=0)
    with pytest.raises(ValueError, match="backoff"):
        target(502, backoff_initial=5, backoff_max=1)
    with pytest.raises(ValueError, match="rewrite"):
        target(502, unit_rewrite={1: 256})
    with pytest.raises(ValueError, match="routed to both"):
        Upstreams([target(502), target(503, name="plc2")])
    with pytest.raises(ValueError, match="duplicate"):
        Upstreams([target(502), target(503, unit_ids=frozenset({2}))])
    # The rewrite map is frozen: a target shared with a running pool cannot change.
    t = target(502, unit_rewrite={1: 2})
    with pytest.raises(TypeError):
        t.unit_rewrite[1] = 3  # type: ignore[index]
    assert issubclass(PathUnavailable, UpstreamError)
    assert issubclass(TargetNoResponse, UpstreamError)
    assert TargetNoResponse("x", reason="timeout").exception_code == 0x0B


async def test_socket_options(nursery: trio.Nursery) -> None:
    plc = ScriptedPlc(normal_plc)
    port = await plc.start(nursery)
    stream = await tcp_dialer("127.0.0.1", port)
    assert isinstance(stream, trio.SocketStream)
    sock = stream.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    configure_socket(sock)  # idempotent
    await stream.aclose()


async def test_cancelling_run_closes_plc_connections(nursery: trio.Nursery) -> None:
    plc = ScriptedPlc(normal_plc)
    port = await plc.start(nursery)
    ups = Upstreams([target(port)], log=RecordingLog())
    async with trio.open_nursery() as inner:
        await inner.start(ups.run)
        await ups.exchange(1, *read_request(0, 1))
        assert not plc.closed.is_set()
        inner.cancel_scope.cancel()
    with trio.fail_after(5):
        await plc.closed.wait()
    with pytest.raises(PathUnavailable):
        await ups.exchange(1, *read_request(0, 1))


async def test_replace_targets_keeps_unchanged_pools(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    plc = ScriptedPlc(normal_plc)
    port = await plc.start(nursery)
    t1 = target(port)
    ups, _log, metrics = await started(nursery, t1)
    await ups.exchange(1, *read_request(0, 1))

    t2 = target(port, name="plc2", unit_ids=frozenset({2}))
    ups.replace_targets([target(port), t2])  # an equal copy of t1: same pool, same connection
    assert ups.route(2) == t2
    assert registers((await ups.exchange(1, *read_request(3, 1))).pdu) == [value(1, 3)]
    assert registers((await ups.exchange(2, *read_request(3, 1))).pdu) == [value(2, 3)]
    assert metrics.count("mbsec_upstream_connects_total", target="plc1") == 1

    with pytest.raises(ValueError):
        ups.replace_targets([t1, target(port, name="plc3")])  # unit 1 twice: refused
    assert ups.route(1) == t1 and ups.route(2) == t2  # the running set is kept

    ups.replace_targets([t2])
    assert ups.route(1) is None
    with pytest.raises(PathUnavailable):
        await ups.exchange(1, *read_request(0, 1))
    assert ups.targets == (t2,)
    # The removed target's connection stays for its in-flight requests' deadlines, then closes.
    await trio.testing.wait_all_tasks_blocked()
    assert not plc.closed.is_set()
    mock_clock.jump(t1.connect_timeout + t1.request_timeout + 1.0)
    with trio.fail_after(5):
        await plc.closed.wait()
    assert plc.connections == 2
    assert registers((await ups.exchange(2, *read_request(9, 1))).pdu) == [value(2, 9)]


# -- PLC down, connect deadline, backoff ---------------------------------------------------


async def test_plc_down_fails_fast_then_backs_off_then_recovers(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    port = free_port()
    dials = 0

    async def counting_dialer(host: str, port_: int) -> trio.abc.Stream:
        nonlocal dials
        dials += 1
        return await tcp_dialer(host, port_)

    ups, log, metrics = await started(nursery, target(port), dialer=counting_dialer)
    with pytest.raises(PathUnavailable) as exc:
        await ups.exchange(1, *read_request(0, 1))
    assert exc.value.exception_code == 0x0A and exc.value.reason == "connect_failed"
    assert dials == 1
    failed = [e for e in log.events if e.get("event.action") == "upstream-connect-failed"]
    assert len(failed) == 1 and failed[0]["error.message"]
    assert failed[0]["destination.port"] == port

    # In backoff: fail fast without dialing, even once the PLC is back.
    plc = ScriptedPlc(normal_plc)
    await plc.start(nursery, port)
    with pytest.raises(PathUnavailable) as exc:
        await ups.exchange(1, *read_request(0, 1))
    assert exc.value.reason == "backoff" and dials == 1
    assert metrics.count("mbsec_upstream_failures_total", reason="backoff") == 1

    mock_clock.jump(0.2)
    reply = await ups.exchange(1, *read_request(4, 1))
    assert registers(reply.pdu) == [value(1, 4)] and dials == 2
    assert log.actions()[-1] == "upstream-connect"


async def test_backoff_doubles_up_to_max(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    dials = 0

    async def refusing(host: str, port: int) -> trio.abc.Stream:
        nonlocal dials
        dials += 1
        raise ConnectionRefusedError(111, "Connection refused")

    ups, _log, metrics = await started(
        nursery, target(502, backoff_initial=0.2, backoff_max=0.5), dialer=refusing
    )
    request = read_request(0, 1)

    async def attempt() -> str:
        with pytest.raises(PathUnavailable) as exc:
            await ups.exchange(1, *request)
        return exc.value.reason

    assert await attempt() == "connect_failed"  # t=0, next try at 0.2
    mock_clock.jump(0.19)
    assert await attempt() == "backoff"
    mock_clock.jump(0.01)
    assert await attempt() == "connect_failed"  # t=0.2, next at 0.6
    mock_clock.jump(0.39)
    assert await attempt() == "backoff"
    mock_clock.jump(0.01)
    assert await attempt() == "connect_failed"  # t=0.6, next at 1.1 (capped at 0.5)
    mock_clock.jump(0.49)
    assert await attempt() == "backoff"
    mock_clock.jump(0.01)
    assert await attempt() == "connect_failed"
    assert dials == 4
    assert metrics.count("mbsec_upstream_failures_total", reason="connect_failed") == 4


async def test_connect_deadline(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    async def black_hole(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    ups, log, metrics = await started(nursery, target(502, connect_timeout=3.0), dialer=black_hole)
    start = trio.current_time()
    with pytest.raises(PathUnavailable) as exc:
        await ups.exchange(1, *read_request(0, 1))
    assert trio.current_time() - start == pytest.approx(3.0)
    assert exc.value.exception_code == 0x0A
    assert metrics.count("mbsec_upstream_failures_total", reason="connect_timeout") == 1
    assert log.actions() == ["upstream-connect-failed"]


# -- silent and late PLCs -------------------------------------------------------------------


async def test_silent_plc_gives_0B_at_the_deadline(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    got = trio.Event()

    async def silent(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        while await reader.next() is not None:
            got.set()

    plc = ScriptedPlc(silent)
    port = await plc.start(nursery)
    ups, _log, metrics = await started(nursery, target(port, request_timeout=2.0))

    async def expire() -> None:
        await got.wait()
        mock_clock.jump(1.999)
        await trio.testing.wait_all_tasks_blocked()
        assert not done
        mock_clock.jump(0.001)

    done = False
    nursery.start_soon(expire)
    with pytest.raises(TargetNoResponse) as exc:
        await ups.exchange(1, *read_request(0, 1))
    done = True
    assert exc.value.exception_code == 0x0B and exc.value.reason == "timeout"
    assert metrics.count("mbsec_upstream_failures_total", reason="timeout") == 1
    # A timeout is not a reason to drop the connection (its late reply is handled by tid).
    assert plc.connections == 1 and not plc.closed.is_set()


@pytest.mark.parametrize("b_answered", [True, False])
async def test_late_reply_never_reaches_the_next_request(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, b_answered: bool
) -> None:
    """Request A times out; the PLC answers A while B is in flight: B never gets A's reply."""
    got_a, got_b = trio.Event(), trio.Event()

    async def laggard(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        a = await reader.next()
        assert a is not None
        got_a.set()
        b = await reader.next()
        assert b is not None
        got_b.set()
        await stream.send_all(adu(a[0], a[1], fc03_reply(a[1], a[2])))  # A, late
        if b_answered:
            await stream.send_all(adu(b[0], b[1], fc03_reply(b[1], b[2])))
        await serve_normally(stream, reader)

    plc = ScriptedPlc(laggard)
    port = await plc.start(nursery)
    ups, log, metrics = await started(nursery, target(port, request_timeout=1.0))

    async def timeout_a() -> None:
        await got_a.wait()
        mock_clock.jump(1.0)

    nursery.start_soon(timeout_a)
    with pytest.raises(TargetNoResponse):
        await ups.exchange(1, *read_request(0, 1))  # A: address 0

    async def timeout_b() -> None:
        await got_b.wait()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1.0)

    nursery.start_soon(timeout_b)
    request_b = read_request(100, 1)
    if b_answered:
        reply = await ups.exchange(1, *request_b)
        assert registers(reply.pdu) == [value(1, 100)]
    else:
        with pytest.raises(TargetNoResponse) as exc:
            await ups.exchange(1, *request_b)
        assert exc.value.reason == "timeout"
    late = [e for e in log.events if e.get("event.action") == "upstream-late-reply"]
    assert len(late) == 1 and late[0]["mbsec.target"] == "plc1"
    assert metrics.count("mbsec_upstream_failures_total", reason="late_reply") == 1
    # The late reply did not cost the connection.
    assert "upstream-reset" not in log.actions() and plc.connections == 1
    assert registers((await ups.exchange(1, *read_request(7, 1))).pdu) == [value(1, 7)]


async def test_cancelled_caller_reply_is_dropped(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """A client that goes away mid-request: its reply arrives later and goes nowhere."""
    got = trio.Event()
    release = trio.Event()

    async def slow(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        req = await reader.next()
        assert req is not None
        got.set()
        await release.wait()
        await stream.send_all(adu(req[0], req[1], fc03_reply(req[1], req[2])))
        await serve_normally(stream, reader)

    plc = ScriptedPlc(slow)
    port = await plc.start(nursery)
    ups, log, _metrics = await started(nursery, target(port))
    with trio.CancelScope() as scope:
        nursery.start_soon(lambda: _cancel_when(got, scope))
        await ups.exchange(1, *read_request(0, 1))
    assert scope.cancelled_caught
    release.set()
    reply = await ups.exchange(1, *read_request(50, 1))
    assert registers(reply.pdu) == [value(1, 50)]
    assert "upstream-late-reply" in log.actions()
    assert plc.connections == 1


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# -- replies that do not fit reset the connection ------------------------------------------


def _bad_reply(kind: str, tid: int, unit: int, pdu: bytes) -> bytes:
    good = fc03_reply(unit, pdu)
    match kind:
        case "garbage":
            return b"\xde\xad\xbe\xef\x00\x05\x01\x03\x02\x00\x01"  # protocol id 0xbeef
        case "bad_length":
            return struct.pack(">HHHB", tid, 0, 300, unit) + good
        case "unknown_tid":
            return adu((tid + 1000) & 0xFFFF, unit, good)
        case "wrong_unit":
            return adu(tid, (unit + 1) & 0xFF, good)
        case "wrong_function":
            return adu(tid, unit, bytes([4]) + good[1:])
        case "wrong_byte_count":
            return adu(tid, unit, bytes([3, good[1] - 2]) + good[2:-2])
    raise AssertionError(kind)


RESET_REASONS = {
    "garbage": "bad_frame",
    "bad_length": "bad_frame",
    "unknown_tid": "unknown_tid",
    "wrong_unit": "wrong_unit",
    "wrong_function": "bad_reply",
    "wrong_byte_count": "bad_reply",
}


@pytest.mark.parametrize("kind", sorted(RESET_REASONS))
async def test_bad_reply_resets_connection_fails_pending_and_reconnects(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, kind: str
) -> None:
    async def script(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        if n == 0:
            first = await reader.next()
            second = await reader.next()  # both requests are in flight (depth 2)
            assert first is not None and second is not None
            await stream.send_all(_bad_reply(kind, *first))
            await stream.receive_some(1)  # until the proxy drops us
            return
        await serve_normally(stream, reader)

    plc = ScriptedPlc(script)
    port = await plc.start(nursery)
    ups, log, metrics = await started(nursery, target(port, depth=2))
    errors: list[UpstreamError] = []

    async def call(address: int) -> None:
        with pytest.raises(TargetNoResponse) as exc:
            await ups.exchange(1, *read_request(address, 2))
        errors.append(exc.value)

    async with trio.open_nursery() as callers:
        callers.start_soon(call, 0)
        callers.start_soon(call, 10)
    assert len(errors) == 2 and all(e.exception_code == 0x0B for e in errors)
    resets = [e for e in log.events if e.get("event.action") == "upstream-reset"]
    assert len(resets) == 1
    assert resets[0]["event.reason"] == RESET_REASONS[kind]
    assert resets[0]["mbsec.pending"] >= 1 and resets[0]["error.message"]
    assert metrics.count("mbsec_upstream_failures_total", reason=RESET_REASONS[kind]) == 1

    with trio.fail_after(5):
        await plc.closed.wait()  # the bad connection was closed
    with pytest.raises(PathUnavailable) as exc:  # backoff before reconnecting
        await ups.exchange(1, *read_request(0, 1))
    assert exc.value.reason == "backoff"
    mock_clock.jump(0.2)
    reply = await ups.exchange(1, *read_request(30, 2))
    assert registers(reply.pdu) == [value(1, 30), value(1, 31)]
    assert plc.connections == 2


async def test_write_whose_connection_drops_is_not_retried(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    writes: list[bytes] = []

    async def drops_after_write(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        while (req := await reader.next()) is not None:
            tid, unit, pdu = req
            if pdu[0] == 6:
                writes.append(pdu)
                return  # the connection closes without an answer
            await stream.send_all(adu(tid, unit, fc03_reply(unit, pdu)))

    plc = ScriptedPlc(drops_after_write)
    port = await plc.start(nursery)
    ups, log, _metrics = await started(nursery, target(port))
    with pytest.raises(TargetNoResponse) as exc:
        await ups.exchange(1, *write_request(3, 99))
    assert exc.value.exception_code == 0x0B and exc.value.reason == "connection_lost"
    assert "upstream-reset" in log.actions()
    mock_clock.jump(1.0)
    assert registers((await ups.exchange(1, *read_request(3, 1))).pdu) == [value(1, 3)]
    await trio.testing.wait_all_tasks_blocked()
    assert writes == [struct.pack(">BHH", 6, 3, 99)]  # sent once, never again
    assert plc.connections == 2


# -- sharing and pipelining ------------------------------------------------------------------


async def test_interleaved_out_of_order_replies_reach_their_callers(
    nursery: trio.Nursery,
) -> None:
    """The PLC collects four requests and answers them in reverse: tids route every reply."""
    max_in_flight = 0

    async def reverser(stream: trio.abc.Stream, n: int) -> None:
        nonlocal max_in_flight
        reader = AduReader(stream)
        while True:
            batch = []
            for _ in range(4):
                req = await reader.next()
                if req is None:
                    return
                batch.append(req)
            max_in_flight = max(max_in_flight, len(batch))
            for tid, unit, pdu in reversed(batch):
                await stream.send_all(adu(tid, unit, fc03_reply(unit, pdu)))

    plc = ScriptedPlc(reverser)
    port = await plc.start(nursery)
    ups, _log, _metrics = await started(nursery, target(port, depth=4))
    seen: dict[int, list[int]] = {}

    async def caller(i: int) -> None:
        for k in range(4):
            address = 1000 + i * 4 + k
            seen[address] = registers((await ups.exchange(1, *read_request(address, 1))).pdu)

    async with trio.open_nursery() as callers:
        for i in range(8):  # 8 callers x 4 requests = 32, a multiple of the batch of 4
            callers.start_soon(caller, i)
    assert seen == {a: [value(1, a)] for a in range(1000, 1032)}
    assert plc.connections == 1 and max_in_flight == 4


async def test_depth_limits_requests_in_flight_per_connection(nursery: trio.Nursery) -> None:
    peaks: list[int] = []

    async def counting(stream: trio.abc.Stream, n: int) -> None:
        in_flight = 0
        peaks.append(0)
        lock = trio.Lock()
        reader = AduReader(stream)
        queue: list[tuple[int, int, bytes]] = []

        async def answer_later() -> None:
            nonlocal in_flight
            while True:
                await trio.sleep(0.01)
                async with lock:
                    while queue:
                        tid, unit, pdu = queue.pop(0)
                        in_flight -= 1
                        await stream.send_all(adu(tid, unit, fc03_reply(unit, pdu)))

        async with trio.open_nursery() as inner:
            inner.start_soon(answer_later)
            while (req := await reader.next()) is not None:
                in_flight += 1
                peaks[n] = max(peaks[n], in_flight)
                queue.append(req)
            inner.cancel_scope.cancel()

    plc = ScriptedPlc(counting)
    port = await plc.start(nursery)
    ups, _log, _metrics = await started(nursery, target(port, depth=3, pool_size=2))

    async def caller(i: int) -> None:
        for k in range(3):
            reply = await ups.exchange(1, *read_request(i * 3 + k, 1))
            assert registers(reply.pdu) == [value(1, i * 3 + k)]

    async with trio.open_nursery() as callers:
        for i in range(20):
            callers.start_soon(caller, i)
    assert plc.connections == 2  # the pool grew to its size and no further
    assert max(peaks) == 3  # never more than depth outstanding on one connection


async def test_each_request_is_one_write_of_one_adu(nursery: trio.Nursery) -> None:
    writes: list[bytes] = []

    class Recording(trio.abc.Stream):
        def __init__(self, inner: trio.abc.Stream) -> None:
            self.inner = inner

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            writes.append(bytes(data))
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
            return await self.inner.receive_some(max_bytes)

        async def aclose(self) -> None:
            await self.inner.aclose()

    async def memory_dialer(host: str, port: int) -> trio.abc.Stream:
        ours, theirs = trio.testing.memory_stream_pair()
        nursery.start_soon(serve_normally, theirs)
        return Recording(ours)

    ups, _log, _metrics = await started(nursery, target(502, depth=4), dialer=memory_dialer)
    async with trio.open_nursery() as callers:
        for i in range(10):
            callers.start_soon(ups.exchange, 1, *read_request(i, 5))
    assert len(writes) == 10
    for w in writes:
        _tid, pid, length, unit = HEADER.unpack_from(w)
        assert pid == 0 and unit == 1 and len(w) == 6 + length == 12
    assert len({HEADER.unpack_from(w)[0] for w in writes}) == 10  # distinct proxy tids


async def test_queued_request_times_out_waiting_for_a_slot(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    got = trio.Event()

    async def silent(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        while await reader.next() is not None:
            got.set()

    plc = ScriptedPlc(silent)
    port = await plc.start(nursery)
    ups, _log, metrics = await started(nursery, target(port, depth=1, request_timeout=2.0))
    errors: list[TargetNoResponse] = []

    async def call(address: int) -> None:
        with pytest.raises(TargetNoResponse) as exc:
            await ups.exchange(1, *read_request(address, 1))
        errors.append(exc.value)

    async with trio.open_nursery() as callers:
        callers.start_soon(call, 0)
        await got.wait()
        callers.start_soon(call, 1)  # waits for the only slot
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(2.0)
    assert len(errors) == 2
    assert all(e.exception_code == 0x0B and e.reason == "timeout" for e in errors)
    assert any("no free slot" in e.message for e in errors)
    assert metrics.count("mbsec_upstream_failures_total", reason="timeout") == 2


async def test_plc_that_stops_reading_resets_the_connection(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """send_all blocked past the deadline: the watchdog fails it and resets the stream."""

    class StuckStream(trio.abc.Stream):
        def __init__(self) -> None:
            self.closed = trio.Event()
            self.sending = trio.Event()

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            self.sending.set()
            await self.closed.wait()  # like a full socket buffer, until aclose
            raise trio.ClosedResourceError("closed while sending")

        async def wait_send_all_might_not_block(self) -> None:
            await self.closed.wait()

        async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
            await self.closed.wait()
            raise trio.ClosedResourceError("closed")

        async def aclose(self) -> None:
            self.closed.set()
            await trio.lowlevel.checkpoint()

    stuck = StuckStream()

    async def dialer(host: str, port: int) -> trio.abc.Stream:
        return stuck

    ups, log, _metrics = await started(nursery, target(502, request_timeout=1.0), dialer=dialer)

    async def expire() -> None:
        await stuck.sending.wait()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1.0)

    nursery.start_soon(expire)
    with pytest.raises(TargetNoResponse) as exc:
        await ups.exchange(1, *write_request(1, 2))
    assert exc.value.exception_code == 0x0B
    await trio.testing.wait_all_tasks_blocked()
    assert stuck.closed.is_set()
    resets = [e for e in log.events if e.get("event.action") == "upstream-reset"]
    assert [e["event.reason"] for e in resets] == ["send_timeout"]


async def test_queued_callers_are_served_in_order_not_starved(nursery: trio.Nursery) -> None:
    """A caller that loops must not barge ahead of callers already waiting for the slot."""
    order: list[int] = []
    first_seen = trio.Event()
    go = trio.Event()

    async def recording(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        while (req := await reader.next()) is not None:
            tid, unit, pdu = req
            order.append(struct.unpack(">H", pdu[1:3])[0])
            first_seen.set()
            await go.wait()
            await stream.send_all(adu(tid, unit, fc03_reply(unit, pdu)))

    plc = ScriptedPlc(recording)
    port = await plc.start(nursery)
    ups, _log, _metrics = await started(nursery, target(port, depth=1))

    async def caller(addresses: list[int]) -> None:
        for a in addresses:
            assert registers((await ups.exchange(1, *read_request(a, 1))).pdu) == [value(1, a)]

    async with trio.open_nursery() as callers:
        callers.start_soon(caller, [0, 1, 2])
        await first_seen.wait()
        callers.start_soon(caller, [10])
        await trio.testing.wait_all_tasks_blocked()
        callers.start_soon(caller, [20])
        await trio.testing.wait_all_tasks_blocked()
        go.set()
    assert order == [0, 10, 20, 1, 2]


async def test_timed_out_tid_is_not_reused_even_when_the_counter_wraps(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """After a timeout, that tid stays reserved: the counter skips it, so its late reply is
    recognised as late instead of completing the request that would reuse the id."""
    tids: list[int] = []
    got = trio.Event()
    held: list[tuple[int, int, bytes]] = []

    async def script(stream: trio.abc.Stream, n: int) -> None:
        reader = AduReader(stream)
        while (req := await reader.next()) is not None:
            tids.append(req[0])
            if not held:  # hold the first request's reply back
                held.append(req)
                got.set()
                continue
            await stream.send_all(adu(*held[0][:2], fc03_reply(held[0][1], held[0][2])))
            await stream.send_all(adu(req[0], req[1], fc03_reply(req[1], req[2])))

    plc = ScriptedPlc(script)
    port = await plc.start(nursery)
    ups, log, _metrics = await started(nursery, target(port, request_timeout=1.0))

    async def expire() -> None:
        await got.wait()
        mock_clock.jump(1.0)

    nursery.start_soon(expire)
    with pytest.raises(TargetNoResponse):
        await ups.exchange(1, *read_request(0, 1))
    # Wind the counter back to the expired id, as if 65536 requests had gone by.
    conn = ups._pools["plc1"].connections[0]
    conn._book.next_tid = tids[0]
    reply = await ups.exchange(1, *read_request(200, 1))
    assert registers(reply.pdu) == [value(1, 200)]
    assert tids[1] != tids[0]
    assert "upstream-late-reply" in log.actions() and "upstream-reset" not in log.actions()


async def test_too_many_timed_out_tids_reset_the_connection_instead_of_forgetting_one(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forgotten timed-out tid could be reused and its very late reply would complete
    another request: past the bound, the connection is reset (its ids start afresh)."""
    import mbsec.upstream as upstream_mod

    monkeypatch.setattr(upstream_mod, "EXPIRED_MAX", 2)
    seen = 0

    async def silent(stream: trio.abc.Stream, n: int) -> None:
        nonlocal seen
        reader = AduReader(stream)
        while await reader.next() is not None:
            seen += 1

    plc = ScriptedPlc(silent)
    port = await plc.start(nursery)
    ups, log, _metrics = await started(nursery, target(port, request_timeout=1.0))
    for i in range(3):
        async def expire() -> None:
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(1.0)

        nursery.start_soon(expire)
        with pytest.raises(TargetNoResponse):
            await ups.exchange(1, *read_request(i, 1))
        await trio.testing.wait_all_tasks_blocked()
        assert ("upstream-reset" in log.actions()) == (i == 2)
    conn = ups._pools["plc1"].connections[0]
    assert not conn._book.expired  # a fresh connection remembers nothing
    assert seen == 3
