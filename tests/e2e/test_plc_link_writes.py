"""What the proxy writes on a PLC connection, over real sockets: whole ADUs, one after the
other, even when the PLC stops reading in the middle of one and the clients go away."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Any

import pytest
import trio
from conftest import Pki, StartProxy, TlsClient

from mbsec.modbus.errors import RemoteProtocolError
from mbsec.modbus.mbap import FrameBuffer, encode_adu


class PausedPlc:
    """A PLC whose connections take only a few kB (SO_RCVBUF at the kernel's minimum) and
    read nothing until :attr:`resume` is set; then every FC06/FC16 request is echoed.
    :attr:`received` holds the raw bytes of each connection."""

    def __init__(self) -> None:
        self.resume = trio.Event()
        self.received: list[bytearray] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket()
        with listener:
            # before listen(): the accepted sockets inherit it (and the window it allows)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
            await listener.bind(("127.0.0.1", 0))
            listener.listen()
            task_status.started(listener.getsockname()[1])
            async with trio.open_nursery() as n:
                while True:
                    sock, _addr = await listener.accept()
                    n.start_soon(self._handle, trio.SocketStream(sock))

    async def _handle(self, stream: trio.SocketStream) -> None:
        data = bytearray()
        self.received.append(data)
        frames = FrameBuffer()
        async with stream:
            await self.resume.wait()
            with contextlib.suppress(trio.BrokenResourceError, RemoteProtocolError):
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    frames.receive_data(chunk)
                    while (adu := frames.next_frame()) is not None:
                        if adu.pdu[0] in (6, 16):
                            await stream.send_all(
                                encode_adu(adu.transaction_id, adu.unit_id, adu.pdu[:5]))


def _pdus(stream: bytes) -> list[bytes]:
    """Split what a PLC received into ADUs (MBAP: protocol 0, length 2..254, whole)."""
    out = []
    at = 0
    while at < len(stream):
        assert len(stream) - at >= 7, f"a partial MBAP header at byte {at}: {stream[at:].hex()}"
        _tid, proto, length, _unit = struct.unpack(">HHHB", stream[at:at + 7])
        assert proto == 0 and 2 <= length <= 254, f"broken MBAP header at byte {at}"
        end = at + 6 + length
        assert end <= len(stream), f"an ADU cut short at byte {at}"
        out.append(stream[at + 7:end])
        at = end
    return out


def _write_registers(client: int, n: int) -> bytes:
    """FC16: registers 0-122 := values only this (client, n) writes."""
    values = [(client * 4096 + n * 128 + k) & 0xFFFF for k in range(123)]
    return struct.pack(">BHHB", 16, 0, 123, 246) + struct.pack(">123H", *values)


async def test_a_client_leaving_mid_write_never_splits_an_adu_on_the_plc_link(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PLC stops reading while the proxy writes to it: the link's socket takes part of an
    ADU. Then every client with requests on that link goes away, and another client sends a
    write. What the PLC reads must still be whole ADUs, each one a client sent: the rest of
    the cut ADU first, never another ADU after a part of one. Regression: the trio engine
    cancelled a request mid-``send_all`` (its client had gone) and handed the stream to the
    next request, so the PLC read one FC16 "write registers 0-1" whose values were the first
    bytes of another client's FC06 (neither client had asked for it)."""
    real_socket = socket.socket

    class SmallSendBuffer(real_socket):  # type: ignore[misc, valid-type]
        """The proxy's PLC sockets (made in the data-plane thread) queue only a few kB."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            if threading.current_thread().name == "mbsec-dataplane":
                self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)

    monkeypatch.setattr(socket, "socket", SmallSendBuffer)
    plc = PausedPlc()
    port = await nursery.start(plc.serve)
    h = await start_proxy(port, upstream={"pool_size": 1, "depth": 16,
                                              "request_timeout": 10.0})
    sent: set[bytes] = set()
    leaving = []
    for who in range(4):  # 32 writes of 259 bytes: 16 on the link, 16 waiting for a slot
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
        leaving.append(c)
        for n in range(8):
            pdu = _write_registers(who, n)
            sent.add(pdu)
            await c.send(n + 1, 1, pdu)
    plane = h.proxy.data_plane
    with trio.fail_after(5):  # a write the PLC's socket took only part of
        while True:
            if any(io._writing for io in list(plane._links.values())):
                break
            await trio.sleep(0.01)
    for c in leaving:
        await c.aclose()
    last = bytes.fromhex("0600640539")  # FC06: register 100 := 1337
    sent.add(last)
    fresh = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    await fresh.send(77, 1, last)
    await trio.sleep(0.2)
    plc.resume.set()
    assert await fresh.recv() == (77, 1, last)
    await fresh.aclose()
    with trio.fail_after(5):  # the requests of the clients that left are still forwarded
        seen = -1
        while seen != sum(len(r) for r in plc.received):
            seen = sum(len(r) for r in plc.received)
            await trio.sleep(0.3)
    assert len(plc.received) == 1, "the PLC link was reset"
    pdus = _pdus(bytes(plc.received[0]))
    assert set(pdus) <= sent, "the PLC read an ADU no client sent"
    assert last in pdus
