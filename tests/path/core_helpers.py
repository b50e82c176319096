"""Shared sans-IO helpers for tests of the request-path core (``mbsec.path``).

No socket, no trio, no sleep: the clock is :attr:`Driver.now`, a number the test advances.

* :class:`RecordingLog`, :class:`RecordingMetrics`: structlog- and metrics-like stubs that keep
  what the core emits;
* :class:`FakeClient`: what a :class:`~mbsec.path.exchange.Exchange` needs of its client
  (``blame_key``, ``finished(ex, now)``);
* :class:`ScriptedPlc`: the PLC side of every link: accepts, refuses or swallows connects,
  parses the ADUs the core writes (with ``struct``, no mbsec code) and answers them the way its
  ``answer`` callable says (or not at all: the test answers with :meth:`Driver.reply`);
* :class:`Driver`: a :class:`~mbsec.path.router.Router` on a :class:`~mbsec.path.timers.Timers`
  and the driver contract: after every input it drains ``outbox.actions`` (connect / close),
  ``outbox.done`` (``ex.client.finished(ex, now)``) and ``outbox.dirty`` (a link's ``out`` goes
  to the PLC, then ``link.wrote(n)``; a client's ``replies`` are collected in
  :attr:`Driver.client_out`), until nothing is left.

Keep this API stable: other test modules import it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mbsec.modbus.mbap import Adu
from mbsec.modbus.pdu import Request, parse_request
from mbsec.path.exchange import DONE, Exchange
from mbsec.path.link import OPEN, Link
from mbsec.path.plc import UpstreamTarget
from mbsec.path.router import Router
from mbsec.path.target import Target
from mbsec.path.timers import Timers

HEADER = struct.Struct(">HHHB")

# -- Modbus bytes ------------------------------------------------------------------------------


def adu(tid: int, unit: int, pdu: bytes) -> bytes:
    """An MBAP frame, built with struct (independent of the code under test)."""
    return HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu


def value(unit: int, address: int) -> int:
    """The register pattern :func:`normal_answer` serves."""
    return (address * 7 + unit) & 0xFFFF


def read_pdu(address: int, quantity: int = 1) -> bytes:
    return struct.pack(">BHH", 3, address, quantity)


def write_pdu(address: int, value_: int) -> bytes:
    return struct.pack(">BHH", 6, address, value_)


def fc03_reply(unit: int, pdu: bytes) -> bytes:
    """The good reply PDU to an FC03 request PDU."""
    _, address, quantity = struct.unpack(">BHH", pdu)
    values = [value(unit, a) for a in range(address, address + quantity)]
    return bytes([3, 2 * quantity]) + struct.pack(f">{quantity}H", *values)


def registers(reply_pdu: bytes) -> list[int]:
    assert reply_pdu[0] == 3, reply_pdu
    n = reply_pdu[1] // 2
    return list(struct.unpack(f">{n}H", reply_pdu[2 : 2 + 2 * n]))


def splits(data: bytes) -> Iterator[list[bytes]]:
    """``data`` cut in two at every offset (h11 style), then byte by byte."""
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]
    yield [data[i : i + 1] for i in range(len(data))]


# -- logger and metrics stubs ------------------------------------------------------------------


class RecordingLog:
    """A structlog-like logger that keeps every event (with its bound context) in one list."""

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

    def critical(self, event: str, **kw: Any) -> None:
        self._log("critical", event, **kw)

    def is_enabled_for(self, level: Any) -> bool:
        return True

    def actions(self) -> list[str]:
        """``event.action`` of every event, in order."""
        return [e["event.action"] for e in self.events if "event.action" in e]

    def of(self, action: str) -> list[dict[str, Any]]:
        """The events with this ``event.action``."""
        return [e for e in self.events if e.get("event.action") == action]


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


# -- clients and requests ----------------------------------------------------------------------


@dataclass
class Fwd:
    """The decision that let a request through, as far as the PLC side needs it."""

    request: Request
    t0: float = 0.0
    rule: Any = None


class FakeClient:
    """A client connection as the PLC side sees it: a blame key and a ``finished`` callback."""

    def __init__(self, blame_key: str = "client-a") -> None:
        self.blame_key = blame_key
        self.outcomes: list[tuple[Exchange, float]] = []  # (finished exchange, now)

    def finished(self, ex: Exchange, now: float) -> None:
        self.outcomes.append((ex, now))

    def __repr__(self) -> str:
        return f"FakeClient({self.blame_key!r})"


def make_exchange(client: Any, tid: int, unit: int, pdu: bytes, t0: float = 0.0) -> Exchange:
    """``Exchange(client, Adu(tid, unit, pdu), fwd)`` with ``fwd.request = parse_request(pdu)``."""
    return Exchange(client, Adu(tid, unit, pdu), Fwd(parse_request(pdu), t0))


# -- the PLC -----------------------------------------------------------------------------------


@dataclass
class PlcRequest:
    tid: int
    unit: int
    pdu: bytes
    conn: PlcConn
    answered: bool = False


@dataclass
class PlcConn:
    """One accepted PLC connection: a link at one generation."""

    link: Link
    gen: int
    requests: list[PlcRequest] = field(default_factory=list)
    buf: bytearray = field(default_factory=bytearray)
    raw: bytearray = field(default_factory=bytearray)  # every byte the core wrote
    closed: bool = False

    def take(self, data: bytes) -> list[PlcRequest]:
        self.raw += data
        self.buf += data
        out: list[PlcRequest] = []
        while len(self.buf) >= 7:
            tid, _pid, length, unit = HEADER.unpack_from(self.buf)
            if len(self.buf) < 6 + length:
                break
            req = PlcRequest(tid, unit, bytes(self.buf[7 : 6 + length]), self)
            del self.buf[: 6 + length]
            self.requests.append(req)
            out.append(req)
        return out


def normal_answer(req: PlcRequest) -> bytes | None:
    """A well-behaved PLC: FC03 with the value pattern, FC06 echoed, anything else 0x01."""
    fc = req.pdu[0]
    if fc == 3:
        return adu(req.tid, req.unit, fc03_reply(req.unit, req.pdu))
    if fc == 6:
        return adu(req.tid, req.unit, req.pdu)
    return adu(req.tid, req.unit, bytes([fc | 0x80, 1]))


class ScriptedPlc:
    """The far end of every link.

    ``connect``: ``"accept"`` (at once), ``"refuse"`` (``connect_failed`` at once) or ``"hang"``
    (no answer: :attr:`Driver.pending_connects`, the connect deadline fires);
    ``reading``: False and the core's bytes stay in ``link.out`` (a PLC that stopped reading);
    ``answer``: called for every request the PLC reads; its bytes (if any) are fed back at once.
    """

    def __init__(self, answer: Callable[[PlcRequest], bytes | None] | None = None,
                 connect: str = "accept") -> None:
        self.answer = answer
        self.connect = connect
        self.reading = True
        self.conns: list[PlcConn] = []
        self.connect_attempts = 0

    @property
    def requests(self) -> list[PlcRequest]:
        """Every request the PLC read, in order."""
        return [r for c in self.conns for r in c.requests]

    def conn(self, link: Link) -> PlcConn | None:
        """The open connection of ``link`` (its current generation)."""
        for c in reversed(self.conns):
            if c.link is link and c.gen == link.gen and not c.closed:
                return c
        return None

    @property
    def open_conns(self) -> list[PlcConn]:
        return [c for c in self.conns if not c.closed]


# -- the driver --------------------------------------------------------------------------------


class GuardedTimers(Timers):
    """:class:`Timers` that fail a test (instead of hanging it) when callbacks keep
    scheduling callbacks due at the same instant."""

    LIMIT = 100_000

    def __init__(self) -> None:
        super().__init__()
        self.scheduled = 0  # since the last run_due began

    def at(self, when: float, fn: Callable[[float], None]) -> Any:
        self.scheduled += 1
        if self.scheduled > self.LIMIT:
            raise AssertionError(f"more than {self.LIMIT} timers scheduled in one run_due")
        return super().at(when, fn)

    def run_due(self, now: float, contain: Any = None) -> int:
        self.scheduled = 0
        return super().run_due(now, contain)


def plc_target(**kw: Any) -> UpstreamTarget:
    """An :class:`UpstreamTarget` named ``plc1`` for unit 1 (override anything)."""
    settings: dict[str, Any] = {
        "name": "plc1",
        "host": "192.0.2.10",
        "port": 502,
        "unit_ids": frozenset({1}),
        "connect_timeout": 1.0,
        "request_timeout": 1.0,
        "backoff_initial": 0.2,
        "backoff_max": 1.0,
    }
    settings.update(kw)
    return UpstreamTarget(**settings)


class Driver:
    """A router, its timers, a PLC and the driver loop, on a clock the test advances."""

    def __init__(self, *targets: UpstreamTarget, plc: ScriptedPlc | None = None,
                 now: float = 0.0) -> None:
        self.timers: Timers = GuardedTimers()
        self.log = RecordingLog()
        self.metrics = RecordingMetrics()
        self.router = Router(targets or (plc_target(),), timers=self.timers, log=self.log,
                             metrics=self.metrics)
        self.outbox = self.router.outbox
        self.plc = plc if plc is not None else ScriptedPlc(normal_answer)
        self.now = now
        self.actions: list[tuple[str, Link, int]] = []  # every action, in order
        self.pending_connects: list[tuple[Link, int]] = []  # swallowed by a "hang" PLC
        self.finished: list[Exchange] = []  # every exchange from ``done``, in order
        self.client_out: dict[Any, list[bytes]] = {}  # a client's reply ADUs, in order
        self._finished_ids: set[int] = set()

    # -- access

    def target(self, name: str = "plc1") -> Target:
        return self.router.targets[name]

    @property
    def connects(self) -> int:
        return sum(1 for kind, _, _ in self.actions if kind == "connect")

    # -- inputs

    def submit(self, ex: Exchange) -> Exchange:
        self.router.submit(ex, self.now)
        self.drain()
        return ex

    def send(self, client: Any, pdu: bytes, *, tid: int = 1, unit: int = 1) -> Exchange:
        """A request from ``client``, submitted now."""
        return self.submit(make_exchange(client, tid, unit, pdu, self.now))

    def advance(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until(self, when: float) -> None:
        """Fire every timer due up to ``when`` at its own time, then stop the clock at it."""
        for _ in range(100_000):
            deadline = self.timers.next_deadline()
            if deadline is None or deadline > when:
                break
            self.now = max(self.now, deadline)
            self.timers.run_due(self.now)
            self.drain()
        else:
            raise AssertionError(f"timers keep firing at {self.now}: they never settle")
        self.now = when
        self.timers.run_due(self.now)
        self.drain()

    def reply(self, link_or_conn: Link | PlcConn, data: bytes) -> None:
        """Bytes from the PLC on a link."""
        link = link_or_conn.link if isinstance(link_or_conn, PlcConn) else link_or_conn
        link.target.receive(link, data, self.now)  # type: ignore[attr-defined]
        self.drain()

    def answer(self, req: PlcRequest, data: bytes | None = None) -> None:
        """The PLC answers ``req`` now (``data``, else :func:`normal_answer`)."""
        req.answered = True
        reply = normal_answer(req) if data is None else data
        assert reply is not None
        self.reply(req.conn.link, reply)

    def unanswered(self) -> list[PlcRequest]:
        """Requests on open PLC connections not answered yet, in the order the PLC read them."""
        return [r for c in self.plc.open_conns for r in c.requests if not r.answered]

    def answer_all(self, *, reverse: bool = False) -> int:
        """Answer every request :meth:`unanswered` lists (last first with ``reverse``)."""
        todo = self.unanswered()
        for req in reversed(todo) if reverse else todo:
            if not req.conn.closed and req.conn.gen == req.conn.link.gen:
                self.answer(req)
        return len(todo)

    def plc_closes(self, link_or_conn: Link | PlcConn, reason: str = "eof",
                   message: str = "connection closed by the PLC") -> None:
        """The PLC side of a link ended (EOF or a socket error)."""
        link = link_or_conn.link if isinstance(link_or_conn, PlcConn) else link_or_conn
        conn = self.plc.conn(link)
        if conn is not None:
            conn.closed = True
        link.target.closed(link, link.gen, reason, message, self.now)  # type: ignore[attr-defined]
        self.drain()

    def accept_pending(self) -> None:
        """A "hang" PLC finally accepts the connects it swallowed (stale ones are ignored)."""
        pending, self.pending_connects = self.pending_connects, []
        for link, gen in pending:
            self._accept(link, gen)
        self.drain()

    def flush(self) -> None:
        """Write every link's ``out`` again (after ``plc.reading`` turned True)."""
        for target in self.router.all_targets():
            self.outbox.dirty.extend(target.links)
        self.drain()

    # -- the driver loop

    def drain(self) -> None:
        outbox = self.outbox
        while outbox.actions or outbox.done or outbox.dirty or outbox.clients:
            while outbox.actions:
                kind, link, gen = outbox.actions.popleft()
                self.actions.append((kind, link, gen))
                if kind == "connect":
                    self._dial(link, gen)
                else:
                    for c in self.plc.conns:
                        if c.link is link and c.gen == gen:
                            c.closed = True
            while outbox.done:
                ex = outbox.done.popleft()
                assert ex.state == DONE, "an exchange in done without its outcome"
                assert id(ex) not in self._finished_ids, "an exchange finished twice"
                assert (ex.reply is None) != (ex.error is None), "not exactly one outcome"
                self._finished_ids.add(id(ex))
                self.finished.append(ex)
                ex.client.finished(ex, self.now)
            while outbox.dirty:  # requests to the PLC first, as the epoll driver does
                self._write(outbox.dirty.pop(0))
            while outbox.clients:
                self._client_write(outbox.clients.pop(0))

    def _dial(self, link: Link, gen: int) -> None:
        self.plc.connect_attempts += 1
        mode = self.plc.connect
        if mode == "accept":
            self._accept(link, gen)
        elif mode == "refuse":
            link.target.connect_failed(  # type: ignore[attr-defined]
                link, gen, "connect_failed", "[Errno 111] Connection refused", self.now)
        else:
            self.pending_connects.append((link, gen))

    def _accept(self, link: Link, gen: int) -> None:
        if gen == link.gen:
            self.plc.conns.append(PlcConn(link, gen))
        link.target.connected(link, gen, self.now)  # type: ignore[attr-defined]

    def _write(self, link: Link) -> None:
        if link.state != OPEN or not self.plc.reading or not link.out:
            return
        conn = self.plc.conn(link)
        assert conn is not None, "bytes for a link the PLC never accepted"
        data = bytes(link.out)
        link.wrote(len(data))
        for req in conn.take(data):
            if self.plc.answer is not None:
                answer = self.plc.answer(req)
                if answer is not None and not conn.closed and link.gen == conn.gen:
                    req.answered = True
                    link.target.receive(link, answer, self.now)  # type: ignore[attr-defined]

    def _client_write(self, client: Any) -> None:
        """A client with replies (a real ClientConn): collect them, report them written."""
        if hasattr(client, "queued"):
            client.queued = False
        replies = getattr(client, "replies", None)
        if replies is None:
            return
        self.client_out.setdefault(client, []).extend(replies)
        replies.clear()
        if getattr(client, "closing", False):
            return
        client.flushed(True, self.now)
