"""Review of the threaded data plane (mbsec/reactor.py, ``data_plane = "thread"``).

Each test proves one bug found in the review and is marked ``xfail(strict=True)`` until the
bug is fixed: then it passes, the strict xfail turns it red, and the marker must go.

Real sockets on 127.0.0.1: a proxy built like conftest's ``start_proxy`` (with several
upstreams and the engine chosen here), scripted trio PLCs, raw TLS clients. Where a bug needs
the data-plane thread to be busy at one precise moment, an audit sink that blocks on one log
line holds it there (a synchronous sink writing to a full pipe does exactly that in service).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    TEST_POLICY,
    FailingSink,
    LocalTcpServer,
    Pki,
    ProxyHandle,
    ScriptedPlc,
    TlsClient,
    read_hr,
)

from mbsec.audit import ListSink, make_logger
from mbsec.metrics import Metrics
from mbsec.modbus.mbap import FrameBuffer, encode_adu
from mbsec.settings import LoggingSettings, Settings, build_settings

WRITE_100 = struct.pack(">BHH", 6, 100, 1337)  # FC06: register 100 := 1337


def _settings(
    pki: Pki,
    policy_path: Path,
    upstreams: dict[str, dict[str, Any]],
    *,
    limits: dict[str, Any] | None = None,
    data_plane: str = "thread",
) -> Settings:
    ups = {}
    for name, up in upstreams.items():
        cfg: dict[str, Any] = {
            "host": "127.0.0.1", "request_timeout": 1.0, "connect_timeout": 1.0,
        }
        cfg.update(up)
        ups[name] = cfg
    return build_settings(
        {
            "listen": ["127.0.0.1:0"],
            "tls": {
                "cert": str(pki.server.chain),
                "key": str(pki.server.key),
                "client_ca": str(pki.ca.trust_bundle),
                "crl": [str(pki.crl)],
                "handshake_timeout": 5.0,
            },
            "policy": str(policy_path),
            "upstreams": ups,
            "limits": limits or {},
            "logging": {"stdout": False, "allowed_requests": "info"},
            "data_plane": data_plane,
        },
        environment=False,
    )


async def _proxy(
    nursery: trio.Nursery,
    pki: Pki,
    tmp_path: Path,
    upstreams: dict[str, dict[str, Any]],
    *,
    policy: str = TEST_POLICY,
    limits: dict[str, Any] | None = None,
    sink: ListSink | None = None,
) -> ProxyHandle:
    """Like conftest's ``start_proxy`` with ``data_plane = "thread"`` and several upstreams."""
    from mbsec.server import Proxy

    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy, encoding="utf-8")
    settings = _settings(pki, policy_path, upstreams, limits=limits)
    sink = sink if sink is not None else ListSink()
    log = make_logger(LoggingSettings(stdout=False, allowed_requests="info"), extra_sinks=[sink])
    metrics = Metrics()
    proxy = Proxy(settings, log=log, metrics=metrics)
    assert proxy.data_plane is not None  # the engine under review
    addrs = await nursery.start(proxy.serve)
    return ProxyHandle(proxy, addrs[0][1], sink, metrics, policy_path)


async def _scripted(nursery: trio.Nursery, **kw: Any) -> ScriptedPlc:
    plc = ScriptedPlc(**kw)
    await nursery.start(plc.serve)
    return plc


class _BlockingSink(ListSink):
    """Once armed, blocks the thread that writes the next "request denied" line until
    ``release`` (at most 2 s): the data plane stops in the middle of a loop pass."""

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


class _RawPlc(LocalTcpServer):
    """A PLC on real sockets that records requests, answers FC03 with zeros unless ``silent``,
    can reset its connections (RST), and counts connections the proxy closed."""

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
        for s in self._streams:
            s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.socket.close()  # RST


def _rst(client: TlsClient) -> None:
    """The client's TCP connection dies hard (RST), as when an HMI crashes."""
    sock = client.stream.transport_stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- 1. requests that fail at once recurse: pump -> submit -> done -> finish_request -> pump ----


async def test_pipelined_requests_that_fail_at_once_do_not_recurse_and_wedge(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = await _scripted(nursery)
    h = await _proxy(nursery, pki, tmp_path, {"plc": {"port": plc.port, "unit_ids": [1, 2]}})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    # operator-read has no targets: unit 7 is allowed by the policy but routed nowhere (0x0A),
    # an HMI polling a PLC that is down (reconnect backoff) gets the same immediate failure
    n = 600
    await c.stream.send_all(b"".join(encode_adu(i, 7, read_hr(0, 1)) for i in range(n)))
    replies = 0
    with trio.move_on_after(1.5):
        while replies < n and await c.recv() is not None:
            replies += 1
    errors = [e.get("error.type") for e in h.events("data-plane-error")]
    assert replies == n, f"{replies} of {n} replies, then nothing; data plane errors: {errors}"


# -- 2. an ADU queued while the links are being flushed waits for the next wake-up ----------


async def test_request_started_by_a_failed_flush_is_sent_at_once_not_after_its_timeout(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc_a = _RawPlc(silent=True)
    await nursery.start(plc_a.serve)
    plc_b = await _scripted(nursery)
    sink = _BlockingSink()
    h = await _proxy(
        nursery, pki, tmp_path,
        {
            "a": {"port": plc_a.port, "unit_ids": [1], "depth": 2, "request_timeout": 2.0,
                  "connect_timeout": 5.0},
            "b": {"port": plc_b.port, "unit_ids": [2], "request_timeout": 0.3,
                  "connect_timeout": 5.0},
        },
        sink=sink, limits={"max_pipelined": 1},
    )
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
    plc_a.reset_connections()  # A resets: the flush at the end of this pass fails
    await trio.sleep(0.1)
    sink.release.set()
    # the failed flush resets A: x's read gets 0x0B and x's write on B starts (it is sent
    # by the next flush, which only comes with the next wake-up: B's deadline sweep)
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
        f"the write was answered {got[3].hex()} (no response) and PLC B then received "
        f"{len(writes_at_b)} write(s): executed after the client was told it failed")


# -- 3. reload: the policy (trio thread) and the routes (data plane) change at different times --

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


async def test_reload_never_decides_by_the_new_policy_and_routes_by_the_old_map(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    line = await _scripted(nursery)
    bench = await _scripted(nursery)
    sink = _BlockingSink()
    h = await _proxy(
        nursery, pki, tmp_path,
        {"line": {"port": line.port, "unit_ids": [1]}, "bench": {"port": bench.port,
                                                                "unit_ids": [2]}},
        policy=SWAP_POLICY.format(line=1, bench=2), sink=sink,
    )
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    # the admin renumbers: the bench becomes unit 1, the line unit 2 (config and policy
    # together); before and after, writes may only ever reach the bench
    new = _settings(pki, h.policy_path, {
        "line": {"port": line.port, "unit_ids": [2]},
        "bench": {"port": bench.port, "unit_ids": [1]},
    })
    sink.armed = True
    # a denied read (old policy: unit 1 is the line), then a write to unit 1
    await c.stream.send_all(encode_adu(1, 1, read_hr(0, 1)) + encode_adu(2, 1, WRITE_100))
    await sink.wait_entered()  # the data plane is between the two requests
    h.policy_path.write_text(SWAP_POLICY.format(line=2, bench=1), encoding="utf-8")
    assert h.proxy.reload(new) is True
    sink.release.set()
    first, second = await c.recv(), await c.recv()
    assert first is not None and first[2] == bytes([0x83, 0x01])
    await trio.sleep(0.1)
    line_writes = [pdu for _tid, _unit, pdu in line.requests if pdu[0] == 6]
    assert not line_writes, (
        f"the line PLC executed {line_writes} (reply {second}): allowed by the new policy "
        "(unit 1 = bench) but routed by the old map (unit 1 = line)")


# -- 4. a client that vanishes: its requests still reach the PLC, but nothing is audited ------


async def test_every_request_that_reaches_the_plc_is_audited_even_if_the_client_vanished(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = await _scripted(nursery, delay=lambda a: 0.4 if a == 50 else 0.0)
    h = await _proxy(nursery, pki, tmp_path, {"plc": {"port": plc.port, "unit_ids": [1, 2]}})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    # a slow read, and a write queued behind it (depth 1)
    await c.stream.send_all(encode_adu(8, 1, read_hr(50, 1)) + encode_adu(9, 1, WRITE_100))
    await trio.sleep(0.1)
    _rst(c)  # the HMI crashes
    await trio.sleep(0.6)  # the read is answered, then the queued write goes out
    executed = sorted(pdu[0] for _tid, _unit, pdu in plc.requests)
    events = h.events("modbus-request")
    audited = sorted(e["modbus.function_code"] for e in events
                     if e.get("event.reason") != "client_gone")
    withdrawn = sorted(e["modbus.function_code"] for e in events
                       if e.get("event.reason") == "client_gone")
    assert executed, "nothing reached the PLC"
    assert audited == executed, (
        f"the PLC executed function codes {executed}, the audit log shows {audited}")
    # the write queued behind the read was withdrawn, never sent, and that is logged too
    assert withdrawn == [6] and 6 not in executed
    closed = await h.wait_event("connection-closed")
    assert closed["mbsec.allowed"] == 1 and closed["mbsec.errors"] == 1


# -- 5. a reset whose failed requests start new ones skips the reconnect backoff --------------


async def test_a_reset_link_backs_off_even_when_clients_have_more_requests_queued(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = await _scripted(nursery, garbage_at=frozenset({0}))  # every reply is broken
    h = await _proxy(
        nursery, pki, tmp_path,
        {"plc": {"port": plc.port, "unit_ids": [1, 2], "backoff_initial": 1.0}},
        limits={"max_pipelined": 1},
    )
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.stream.send_all(b"".join(encode_adu(i, 1, read_hr(0, 1)) for i in (1, 2, 3)))
    replies = [await c.recv() for _ in range(3)]
    await trio.sleep(0.2)  # well within the 1 s backoff
    assert all(r is not None and r[2][0] == 0x83 for r in replies), replies
    assert (plc.connections, len(plc.requests)) == (1, 1), (
        f"{plc.connections} connections and {len(plc.requests)} requests to a PLC that just "
        f"sent a broken reply; the reconnect backoff (1 s) was skipped: {replies}")


# -- 6. an exception in a handler costs the connection nothing but a log line: it hangs -------


async def test_an_exception_while_completing_a_request_does_not_wedge_the_connection(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = await _scripted(nursery)
    h = await _proxy(nursery, pki, tmp_path, {"plc": {"port": plc.port, "unit_ids": [1, 2]}},
                     sink=FailingSink('"request forwarded"'))
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.send(1, 1, read_hr(0, 1))
    assert await c.answered_or_closed(), (
        f"no reply, no close; data plane errors: {[e.get('error.type') for e in h.events()]}")


# -- 7. pools retired by a reload are not closed at shutdown ------------------------------


async def test_shutdown_closes_the_plc_connections_of_pools_retired_by_a_reload(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = _RawPlc()
    await nursery.start(plc.serve)
    async with trio.open_nursery() as proxy_nursery:
        h = await _proxy(proxy_nursery, pki, tmp_path, {"plc": {"port": plc.port,
                                                                "unit_ids": [1, 2]}})
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
        r = await c.request(1, 1, read_hr(0, 1))
        assert r is not None and r[2][0] == 3
        changed = _settings(pki, h.policy_path, {"plc": {"port": plc.port, "unit_ids": [1, 2],
                                                         "request_timeout": 1.5}})
        assert h.proxy.reload(changed) is True  # the old pool retires (3.5 s grace)
        await c.aclose()
        await trio.sleep(0.1)
        h.proxy.request_shutdown()
    await trio.sleep(0.3)  # serve() has returned: every PLC connection must be closed
    assert plc.closed == plc.opened, (
        f"{plc.opened - plc.closed} of {plc.opened} PLC connection(s) still open after shutdown")


# -- 8. a name resolution that ends after stop() writes to a closed (reused) eventfd -----------


async def test_a_resolution_finishing_after_stop_writes_into_no_other_file(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = socket.getaddrinfo

    def slow_dns(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == "plc.example.test":
            time.sleep(0.4)
            return real("127.0.0.1", *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_dns)
    async with trio.open_nursery() as proxy_nursery:
        h = await _proxy(proxy_nursery, pki, tmp_path,
                         {"plc": {"host": "plc.example.test", "port": 502,
                                  "unit_ids": [1, 2]}},
                         limits={"drain_timeout": 0})
        assert h.proxy.data_plane is not None
        wake = h.proxy.data_plane._wake_fd
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
        await c.send(1, 1, read_hr(0, 1))  # the PLC's name is being resolved (0.4 s)
        await trio.sleep(0.05)
        h.proxy.request_shutdown()
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
