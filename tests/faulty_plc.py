"""A fake Modbus/TCP PLC that misbehaves on purpose, for the availability tests.

It answers read holding registers (FC03) correctly, except for reads that cover one of the special
addresses below. It parses MBAP itself (struct, no mbsec code), so a framing bug in mbsec cannot
hide in the fault injector too. Each connection is served one request at a time (read a request,
answer it, read the next), as many small PLCs do; several connections are served concurrently.

``await nursery.start(plc.serve)`` listens on 127.0.0.1 (a free port) and returns the port; the
listener goes when the nursery is cancelled.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass, field

import trio

#: the reply's byte count is 2 bytes short of what the request asked for (MBAP length consistent)
BAD_BYTE_COUNT = 100
#: the PLC closes the TCP connection instead of replying (EOF, no reply)
DROP = 101
#: the reply carries a transaction id the proxy never sent
UNKNOWN_TID = 102
#: answered correctly, but only after SLOW_DELAY seconds
SLOW = 103
SLOW_DELAY = 3.0
#: every register of the slow reply holds this value (no good register does): a late reply that
#: reaches a client is recognisable by it
SLOW_VALUE = 0xBEEF

SPECIAL = frozenset({BAD_BYTE_COUNT, DROP, UNKNOWN_TID, SLOW})


def register_value(unit: int, address: int) -> int:
    """What a good holding register holds: distinct per unit and address, never SLOW_VALUE."""
    return (0x1000 * unit + address) & 0xFFFF


def fc03_reply(unit: int, address: int, count: int) -> bytes:
    """The correct FC03 response PDU for a read of good registers."""
    values = [register_value(unit, address + i) for i in range(count)]
    return bytes([3, 2 * count]) + struct.pack(f">{count}H", *values)


def mbap(tid: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


@dataclass
class Request:
    conn: int
    tid: int
    unit: int
    function: int
    address: int
    count: int


@dataclass
class FaultyPlc:
    """The PLC; ``requests`` is everything it was asked, ``connections`` how many it accepted."""

    slow_delay: float = SLOW_DELAY
    port: int = 0
    connections: int = 0
    requests: list[Request] = field(default_factory=list)

    def asked(self, address: int) -> int:
        """How many FC03 requests covering ``address`` reached the PLC."""
        return sum(1 for r in self.requests
                   if r.function == 3 and r.address <= address < r.address + r.count)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as n:
            await n.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = self.connections
        buf = b""
        try:
            while True:
                while len(buf) < 7 or len(buf) < 6 + struct.unpack(">H", buf[4:6])[0]:
                    if len(buf) >= 7:
                        _tid, proto, length = struct.unpack(">HHH", buf[:6])
                        if proto != 0 or not 2 <= length <= 254:
                            return  # not Modbus/TCP: hang up
                    data = await stream.receive_some(4096)
                    if not data:
                        return
                    buf += data
                tid, _proto, length, unit = struct.unpack(">HHHB", buf[:7])
                pdu, buf = buf[7 : 6 + length], buf[6 + length :]
                if not await self._answer(stream, conn, tid, unit, pdu):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()

    async def _answer(self, stream: trio.SocketStream, conn: int, tid: int, unit: int,
                      pdu: bytes) -> bool:
        """Answer one request; False: hang up."""
        fc = pdu[0]
        if fc != 3 or len(pdu) != 5:
            self.requests.append(Request(conn, tid, unit, fc, -1, 0))
            await stream.send_all(mbap(tid, unit, bytes([fc | 0x80, 1 if fc != 3 else 3])))
            return True
        address, count = struct.unpack(">HH", pdu[1:5])
        self.requests.append(Request(conn, tid, unit, fc, address, count))
        if not 1 <= count <= 125:
            await stream.send_all(mbap(tid, unit, bytes([0x83, 3])))
            return True
        covered = {a for a in SPECIAL if address <= a < address + count}
        reply = fc03_reply(unit, address, count)
        if DROP in covered:
            return False
        if BAD_BYTE_COUNT in covered:
            short = max(count - 1, 0)
            reply = bytes([3, 2 * short]) + reply[2 : 2 + 2 * short]
        if UNKNOWN_TID in covered:
            tid ^= 0x5A5A  # never a tid the proxy has outstanding on this connection
        if SLOW in covered:
            await trio.sleep(self.slow_delay)
            reply = bytes([3, 2 * count]) + struct.pack(f">{count}H", *[SLOW_VALUE] * count)
        await stream.send_all(mbap(tid, unit, reply))
        return True
