"""Availability under faults, end to end: "a fault costs only whoever caused it".

Real sockets, a real mutual-TLS handshake with the test PKI, a fault-injecting fake PLC
(tests/faulty_plc.py). The tests count outcomes (which requests got their own correct reply),
never how long anything took: the clock only paces the clients (20 Hz polling) and bounds how
long a client waits for a reply before it counts the request as unanswered. A bystander polls
at a fixed rate without waiting for earlier replies (:class:`Poller`), so a stall costs every
request it delays, not just the one it ends with a 0x0B.

Clients that cause faults use a different certificate (engineer, small) than the bystanders
(operator), so a penalty the proxy puts on the faulty client's identity cannot hit a bystander.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
from conftest import Pki, StartProxy, TlsClient, read_hr
from faulty_plc import (
    BAD_BYTE_COUNT,
    DROP,
    SLOW,
    SLOW_DELAY,
    SLOW_VALUE,
    UNKNOWN_TID,
    FaultyPlc,
    fc03_reply,
    mbap,
)

#: how long a client waits for a reply before it counts the request as unanswered (the proxy
#: answers within request_timeout = 1 s in these tests, with an exception if need be)
REPLY_WAIT = 3.0

Reply = tuple[int, int, bytes]


async def faulty_plc(nursery: trio.Nursery) -> FaultyPlc:
    plc = FaultyPlc()
    await nursery.start(plc.serve)
    return plc


async def ask(c: TlsClient, tid: int, unit: int, pdu: bytes,
              within: float = REPLY_WAIT) -> Reply | str:
    """One request: the reply, "closed" (EOF, reset) or "no reply" (nothing within ``within``)."""
    try:
        await c.send(tid, unit, pdu)
        with trio.move_on_after(within):
            got = await c.recv()
            return "closed" if got is None else got
        return "no reply"
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return "closed"


def local_port(c: TlsClient) -> int:
    return int(c.stream.transport_stream.socket.getsockname()[1])  # type: ignore[attr-defined]


def carries_late_value(outcome: Reply | str) -> bool:
    """The reply holds the slow register's value, i.e. it is (a copy of) a late reply."""
    if isinstance(outcome, str):
        return False
    pdu = outcome[2]
    n = (len(pdu) - 2) // 2
    if pdu[:1] != b"\x03" or n <= 0:
        return False
    return SLOW_VALUE in struct.unpack(f">{n}H", pdu[2 : 2 + 2 * n])


@dataclass
class Tally:
    """What one polling client got: ``good`` of its ``sent`` requests had their own correct
    reply; ``unexpected`` frames answered nothing it had outstanding."""

    name: str
    sent: int = 0
    good: int = 0
    late_values: int = 0  # frames carrying SLOW_VALUE (somebody's late reply)
    unexpected: int = 0
    failures: list[str] = field(default_factory=list)

    def record(self, i: int, expected: Reply, outcome: Reply | str) -> None:
        if outcome == expected:
            self.good += 1
            return
        if carries_late_value(outcome):
            self.late_values += 1
        self._note(f"#{i}: {describe(outcome)} (expected {describe(expected)})")

    def record_unexpected(self, frame: Reply) -> None:
        self.unexpected += 1
        if carries_late_value(frame):
            self.late_values += 1
        self._note(f"unexpected frame: {describe(frame)}")

    def _note(self, failure: str) -> None:
        if len(self.failures) < 12:
            self.failures.append(failure)

    def ratio(self) -> float:
        return self.good / self.sent if self.sent else 0.0

    def __str__(self) -> str:
        return (f"{self.name}: {self.good}/{self.sent} requests got their own reply "
                f"({100 * self.ratio():.1f} %), {self.unexpected} unexpected frames; first "
                f"failures: {self.failures}")


def describe(outcome: Reply | str) -> str:
    if isinstance(outcome, str):
        return outcome
    tid, unit, pdu = outcome
    if len(pdu) == 2 and pdu[0] & 0x80:
        return f"tid {tid} unit {unit} exception 0x{pdu[1]:02X}"
    return f"tid {tid} unit {unit} pdu {pdu.hex()}"


class Poller:
    """A well-behaved client polling good registers at a fixed rate, the way a SCADA master
    polls: request ``i`` goes out at ``start + i / hz`` whether or not earlier ones have been
    answered (Modbus/TCP allows several outstanding transactions; replies are matched by
    transaction id), so a stall costs every request it delays instead of hiding behind one
    slow answer. Each request has its own transaction id and address range and must get exactly
    its own reply; a connection the proxy closes costs its outstanding requests, and the next
    request opens a new one."""

    def __init__(self, port: int, ctx: ssl.SSLContext, tally: Tally, unit: int = 1) -> None:
        self.port = port
        self.ctx = ctx
        self.tally = tally
        self.unit = unit
        self.conn: TlsClient | None = None
        #: tid -> (request number, expected reply, the connection it went out on)
        self.pending: dict[int, tuple[int, Reply, TlsClient]] = {}
        self.all_sent = False
        self.all_answered = trio.Event()  # set once all_sent and nothing is pending

    async def run(self, *, duration: float, hz: float = 20.0) -> None:
        async with trio.open_nursery() as n:
            start = trio.current_time()
            for i in range(round(duration * hz)):
                await trio.sleep_until(start + i / hz)
                tid = 0x100 + i
                address, count = (7 * i) % 50, 1 + i % 4  # good registers only (0..52)
                expected = (tid, self.unit, fc03_reply(self.unit, address, count))
                self.tally.sent += 1
                if self.conn is None:
                    try:
                        self.conn = await TlsClient.connect(self.port, self.ctx)
                    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
                        self.tally.record(i, expected, f"connect failed: {exc!r}")
                        continue
                    n.start_soon(self._receive, self.conn)
                c = self.conn
                self.pending[tid] = (i, expected, c)
                try:
                    await c.send(tid, self.unit, read_hr(address, count))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._lost(c, "closed")
            self.all_sent = True
            self._check_done()
            with trio.move_on_after(REPLY_WAIT):  # the last requests' replies
                await self.all_answered.wait()
            for i, expected, _c in self.pending.values():
                self.tally.record(i, expected, "no reply")
            self.pending.clear()
            n.cancel_scope.cancel()
        if self.conn is not None:
            await self.conn.aclose()

    async def _receive(self, c: TlsClient) -> None:
        try:
            while data := await c.stream.receive_some(65536):
                c.frames.receive_data(data)
                while (adu := c.frames.next_frame()) is not None:
                    frame = (adu.transaction_id, adu.unit_id, adu.pdu)
                    entry = self.pending.get(adu.transaction_id)
                    if entry is None or entry[2] is not c:
                        self.tally.record_unexpected(frame)
                        continue
                    del self.pending[adu.transaction_id]
                    self.tally.record(entry[0], entry[1], frame)
                    self._check_done()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await self._lost(c, "connection closed")

    async def _lost(self, c: TlsClient, why: str) -> None:
        for tid, (i, expected, cc) in list(self.pending.items()):
            if cc is c:
                del self.pending[tid]
                self.tally.record(i, expected, why)
        if self.conn is c:
            self.conn = None
        self._check_done()
        await c.aclose()

    def _check_done(self) -> None:
        if self.all_sent and not self.pending:
            self.all_answered.set()


async def poll(port: int, ctx: ssl.SSLContext, tally: Tally, *, duration: float,
               hz: float = 20.0) -> None:
    await Poller(port, ctx, tally).run(duration=duration, hz=hz)


@dataclass
class Attacker:
    """A client reading a faulty register over and over (reconnecting when it is hung up on);
    ``outcomes`` counts what it got, for the failure messages."""

    address: int
    count: int = 1  # one register: 100-103 are each a different fault
    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def note(self, outcome: Reply | str) -> None:
        self.sent += 1
        key = describe(outcome) if isinstance(outcome, str) else (
            f"exception 0x{outcome[2][1]:02X}" if outcome[2][0] & 0x80 else "normal reply")
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    async def run(self, port: int, ctx: ssl.SSLContext, *, duration: float,
                  hz: float | None = None) -> None:
        """At ``hz`` (None: the next request as soon as the previous one is answered)."""
        start = trio.current_time()
        end = start + duration
        c: TlsClient | None = None
        i = 0
        try:
            while trio.current_time() < end:
                if hz is not None:
                    await trio.sleep_until(max(start + i / hz, trio.current_time()))
                    if trio.current_time() >= end:
                        break
                i += 1
                if c is None:
                    try:
                        c = await TlsClient.connect(port, ctx)
                    except (OSError, trio.BrokenResourceError, ssl.SSLError):
                        self.note("connect failed")
                        await trio.sleep(0.05)
                        continue
                outcome = await ask(c, i & 0xFFFF, 1, read_hr(self.address, self.count))
                self.note(outcome)
                if isinstance(outcome, str) or outcome[0] != i & 0xFFFF:
                    await c.aclose()
                    c = None
        finally:
            if c is not None:
                await c.aclose()

    def __str__(self) -> str:
        return f"attacker on register {self.address}: {self.sent} requests, {self.outcomes}"


# -- 1. a bystander next to a client whose reads break the PLC link ------------------------


@pytest.mark.parametrize(
    "bad_register", [BAD_BYTE_COUNT, DROP], ids=["bad_byte_count", "plc_drops_connection"]
)
async def test_bystander_keeps_its_replies_next_to_a_client_breaking_the_link(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, bad_register: int
) -> None:
    # the upstream is configured with its defaults (its pool size in particular)
    plc = await faulty_plc(nursery)
    h = await start_proxy(plc.port)
    bystander = Tally("bystander")
    attacker = Attacker(bad_register)
    async with trio.open_nursery() as n:
        n.start_soon(partial(poll, h.port, pki.client_ctx(pki.operator), bystander,
                             duration=10.0))
        n.start_soon(partial(attacker.run, h.port, pki.client_ctx(pki.engineer),
                             duration=10.0, hz=20.0))
    assert plc.asked(bad_register) > 0, f"the faulty register was never read: {attacker}"
    assert bystander.unexpected == 0, str(bystander)
    assert bystander.ratio() >= 0.95, f"{bystander}; {attacker}"


# -- 2. a bad reply costs the request that got it, nothing more ----------------------------


@pytest.mark.parametrize(
    "bad_register", [UNKNOWN_TID, BAD_BYTE_COUNT], ids=["unknown_tid", "bad_byte_count"]
)
async def test_a_bad_reply_costs_only_the_request_that_got_it(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, bad_register: int
) -> None:
    plc = await faulty_plc(nursery)
    h = await start_proxy(plc.port)
    clients = {
        "x": await TlsClient.connect(h.port, pki.client_ctx(pki.engineer)),  # gets the bad reply
        "y": await TlsClient.connect(h.port, pki.client_ctx(pki.operator)),
        "z": await TlsClient.connect(h.port, pki.client_ctx(pki.small)),
    }
    # every client has had a normal reply: the PLC links are up before the fault
    for k, c in enumerate(clients.values()):
        assert await ask(c, 1, 1, read_hr(10 + k, 2)) == (1, 1, fc03_reply(1, 10 + k, 2))

    # one register: 100-103 are each a different fault
    bad = await ask(clients["x"], 2, 1, read_hr(bad_register, 1))
    # the bad reply is not passed on: that one request gets an exception
    assert not isinstance(bad, str) and bad[:2] == (2, 1) and bad[2][0] == 0x83, describe(bad)
    assert plc.asked(bad_register) == 1

    # right after it: the other clients' requests and x's next one, all at once (with more
    # than one PLC connection, at least one of them needs the link that got the bad reply)
    got: dict[str, Reply | str] = {}
    expected = {name: (3, 1, fc03_reply(1, 20 + k, 2)) for k, name in enumerate(clients)}

    async def one(name: str, k: int) -> None:
        got[name] = await ask(clients[name], 3, 1, read_hr(20 + k, 2))

    async with trio.open_nursery() as n:
        for k, name in enumerate(clients):
            n.start_soon(one, name, k)
    wrong = {name: describe(got[name]) for name in clients if got[name] != expected[name]}
    assert not wrong, (f"after the bad reply to x ({describe(bad)}), these requests did not get "
                       f"their normal reply: {wrong}")
    for c in clients.values():
        await c.aclose()


# -- 3. a late reply: 0x0B for its client, delivered to nobody ----------------------------


async def test_a_late_reply_gets_0x0B_and_reaches_nobody(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await faulty_plc(nursery)
    h = await start_proxy(plc.port, upstream={"request_timeout": 1.0, "pool_size": 2})
    b = Tally("client B")
    a_got: list[Reply | str] = []

    async def client_a() -> None:
        await trio.sleep(0.5)  # B is polling already
        a = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
        a_got.append(await ask(a, 7, 1, read_hr(SLOW, 1)))
        # the PLC sends the late reply SLOW_DELAY s after the request: listen past that; any
        # frame A gets now is not an answer to anything it asked (the proxy hanging up is fine)
        with trio.move_on_after(SLOW_DELAY + 0.5):
            try:
                extra = await a.recv()
            except trio.BrokenResourceError:
                extra = None
            if extra is not None:
                a_got.append(extra)
        await a.aclose()

    async with trio.open_nursery() as n:
        n.start_soon(partial(poll, h.port, pki.client_ctx(pki.operator), b, duration=5.5))
        n.start_soon(client_a)
    assert plc.asked(SLOW) >= 1, "the slow request never reached the PLC"
    assert a_got[0] == (7, 1, bytes([0x83, 0x0B])), f"A got {describe(a_got[0])}, not 0x0B"
    assert a_got[1:] == [], f"A got frames it never asked for: {[describe(x) for x in a_got[1:]]}"
    assert b.late_values == 0 and b.unexpected == 0, f"A's late reply reached B: {b}"
    assert b.ratio() >= 0.95, str(b)


# -- 4. a slow register costs the client that reads it ------------------------------------


async def test_a_client_reading_a_slow_register_leaves_the_bystander_its_replies(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await faulty_plc(nursery)
    h = await start_proxy(plc.port, upstream={"pool_size": 2})
    bystander = Tally("bystander")
    slow_reader = Attacker(SLOW, count=1)
    async with trio.open_nursery() as n:
        n.start_soon(partial(poll, h.port, pki.client_ctx(pki.operator), bystander,
                             duration=8.0))
        n.start_soon(partial(slow_reader.run, h.port, pki.client_ctx(pki.engineer),
                             duration=8.0))  # the next read as soon as one is answered
    assert plc.asked(SLOW) >= 2, f"the slow register was not read repeatedly: {slow_reader}"
    assert bystander.late_values == 0 and bystander.unexpected == 0, (
        f"a late reply reached the bystander: {bystander}")
    assert bystander.ratio() >= 0.95, f"{bystander}; {slow_reader}"


# -- 5. a request must be complete in time; an idle connection is not a slow request ------

REQUEST_COMPLETE_TIMEOUT = 2.0
#: how long the clients watch for the proxy to hang up: 3x the deadline
WATCH = 3 * REQUEST_COMPLETE_TIMEOUT


async def watch_for_close(c: TlsClient, within: float) -> str:
    """"closed" when the proxy hangs up within ``within`` s, "still open" when nothing comes,
    else what came instead."""
    with trio.move_on_after(within):
        try:
            while True:
                data = await c.stream.receive_some(65536)
                if not data:
                    return "closed"
                c.frames.receive_data(data)
                if (adu := c.frames.next_frame()) is not None:
                    return f"answered: {describe((adu.transaction_id, adu.unit_id, adu.pdu))}"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return "closed"
    return "still open"


async def test_incomplete_requests_are_closed_and_idle_connections_are_not(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await faulty_plc(nursery)
    h = await start_proxy(plc.port,
                          limits={"request_complete_timeout": REQUEST_COMPLETE_TIMEOUT})
    trickler = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    header = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
    idle = await TlsClient.connect(h.port, pki.client_ctx(pki.small))
    ports = {"trickler": local_port(trickler), "header": local_port(header),
             "idle": local_port(idle)}
    # the idle client sent complete requests and had its replies; from now on it is silent
    for tid in (1, 2):
        assert await ask(idle, tid, 1, read_hr(tid, 1)) == (tid, 1, fc03_reply(1, tid, 1))
    request = mbap(9, 1, read_hr(5, 1))  # 12 bytes
    result: dict[str, str] = {}

    async def trickle() -> None:
        """One byte a second, until the proxy hangs up or the request is complete."""
        for sent in range(len(request)):
            try:
                await trickler.stream.send_all(request[sent : sent + 1])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                result["trickler"] = f"closed ({sent} of {len(request)} bytes sent)"
                return
            outcome = await watch_for_close(trickler, 1.0)
            if outcome != "still open":
                result["trickler"] = f"{outcome} ({sent + 1} of {len(request)} bytes sent)"
                return
        result["trickler"] = "whole request sent: " + await watch_for_close(trickler, 1.0)

    async def header_only() -> None:
        await header.stream.send_all(request[:4])  # 4 bytes of the MBAP header, then nothing
        result["header"] = await watch_for_close(header, WATCH)

    async def idle_client() -> None:
        result["idle"] = await watch_for_close(idle, WATCH)

    async with trio.open_nursery() as n:
        n.start_soon(trickle)
        n.start_soon(header_only)
        n.start_soon(idle_client)

    assert result["trickler"].startswith("closed ("), result
    assert result["header"] == "closed", result
    assert result["idle"] == "still open", result
    for name in ("trickler", "header"):
        try:
            ev = await h.wait_event("connection-closed",
                                    lambda e, p=ports[name]: e.get("source.port") == p)
        except trio.TooSlowError:
            pytest.fail(f"no connection-closed event for the {name} client (port "
                        f"{ports[name]}): {h.events('connection-closed')}")
        assert ev.get("event.reason") == "request_incomplete", (name, ev)
    assert not [e for e in h.events("connection-closed")
                if e.get("source.port") == ports["idle"]]
    # the idle connection still works
    assert await ask(idle, 3, 1, read_hr(3, 1)) == (3, 1, fc03_reply(1, 3, 1))
    for c in (trickler, header, idle):
        await c.aclose()

