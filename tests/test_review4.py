"""Fourth review: a client's replies of one loop pass leave in one write (70f5f69,
``Client._batch`` / ``Client.flush`` in mbsec/reactor.py). Each test failed on the reviewed
code because of the bug its docstring names; they stay as regression tests. Real sockets on
127.0.0.1; thread engine only (the change is in the threaded data plane)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import trio
from conftest import (
    FailingSink,
    LocalTcpServer,
    Pki,
    ScriptedPlc,
    StartProxy,
    TlsClient,
    read_hr,
    tuned_client,
)

from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu

THREAD_ONLY = pytest.mark.parametrize("data_plane", ["thread"], indirect=True)


def _plane_clients(h: Any) -> list[Any]:
    """The data plane's adopted clients (their registered ``_on_event`` handlers)."""
    from mbsec.reactor import Client

    owners = [getattr(fn, "__self__", None) for fn in list(h.proxy.data_plane._handlers.values())]
    return [o for o in owners if isinstance(o, Client)]


# -- 1. the socket towards a client is full: the pump still answers a whole read ---------------


@THREAD_ONLY
async def test_replies_do_not_pile_up_behind_a_client_that_stopped_reading(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Bug: backpressure lost within a pass. ``Client._pump`` (reactor.py, the loop condition
    ``self._stall_timer is None``) stops starting requests once the socket towards the client
    is full, which its docstring promises ("no new request while the socket toward it is full:
    replies cannot pile up in memory beyond what max_pipelined requests produce"). Before
    70f5f69 ``_send`` wrote each reply at once, so the first reply that did not fit started
    the stall timer and the pump stopped. Now ``_send`` only appends to ``_batch``; the full
    socket is discovered in ``flush`` at the end of the pass, after the pump has answered
    every request of the read (requests answered at once, a denial or no route, do not count
    towards max_pipelined). A client that sends one read's worth of tiny requests and never
    reads gets thousands of replies (tens of kB, up to ~4x the bytes it sent per read: 8-byte
    requests, 31-byte records) parked in ``_out`` until the stall limit; before, ``_out`` held
    one record."""
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, limits={"idle_timeout": 5.0, "max_pipelined": 1})
    c = await tuned_client(h.port, pki, rcvbuf=1, mss=88)
    try:
        # unit 7 has no route: each request is answered at once (0x0A), never reaching a PLC
        flood = b"".join(encode_adu(i & 0xFFFF, 7, read_hr(0, 1)) for i in range(20000))
        with trio.move_on_after(2):
            await c.stream.send_all(flood)  # blocks once the proxy stops reading: expected
        with trio.fail_after(3):  # the stall timer runs: the socket towards it is full
            while True:
                if any(cl._stall_timer is not None for cl in _plane_clients(h)):
                    break
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        (client,) = _plane_clients(h)
        pending = len(client._out)
        assert pending < 1024, (
            f"{pending} bytes of replies queued in memory behind a full socket "
            f"(max_pipelined = 1)")
    finally:
        await c.aclose()


# -- 2. a crash close drops the replies the same pass already made -----------------------------


class _PairPlc(LocalTcpServer):
    """Answers FC03 requests two at a time, both replies in one send (one read on the link,
    so both complete in the same data-plane pass)."""

    async def _handle(self, stream: trio.SocketStream) -> None:
        frames = FrameBuffer()
        held: list[Adu] = []
        with_closed = (trio.BrokenResourceError, trio.ClosedResourceError)
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
        except with_closed:
            pass


@THREAD_ONLY
async def test_a_crash_close_still_sends_the_replies_finished_before_it(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Bug: ``Client._finish`` (reactor.py) writes the pending ``_batch`` only when the close
    is not ``broken``; ``crashed()`` (and ``abort()``, the drain deadline) close with
    ``broken=True`` although the socket is fine, so replies completed earlier in the same pass
    are dropped. Before 70f5f69 they were already written. Here the PLC answers two pipelined
    reads in one segment; completing the second one fails (its log line breaks), so the
    connection is closed as internal_error. The first read was answered by the PLC, logged as
    allowed and counted in ``destination.bytes`` of the close line, yet the client never
    gets it (for a write, it cannot tell whether the PLC executed it)."""
    plc = _PairPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, upstream={"depth": 2}, sink=FailingSink('"address":77'))
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    try:
        await c.stream.send_all(encode_adu(1, 1, read_hr(5, 1)) + encode_adu(2, 1, read_hr(77, 1)))
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
