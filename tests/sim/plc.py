"""A simulated world for the request-path core: a clock, a PLC, clients and the driver between.

Everything the core needs from the outside is simulated here, deterministically (no randomness
of its own; the schedule comes from the caller, in the tests from hypothesis):

* the clock: :attr:`World.now`, advanced only by :meth:`World.advance` to the next core timer
  or simulated event (a heap ordered by time, then by insertion);
* the driver: after every input it drains the router's outbox exactly as the core's driver
  contract says (``actions``, ``done``, ``dirty``), reads client bytes only while
  ``ClientConn.wants_read``, writes a link's ``out`` to the PLC unless the PLC stopped reading;
* the PLC (:class:`SimPlc`): parses MBAP itself (struct, no mbsec code), answers each request
  the way its *kind* says (the kind travels as an oracle keyed by a nonce that every request
  carries in its address field), serves requests concurrently or one at a time per connection,
  and can, for a while, refuse connects, swallow them, stop answering, close every connection
  or stop reading (:data:`EPISODES`);
* the clients (:class:`SimClient`): well-behaved pollers (one request at a time, good registers
  only, sometimes split in two chunks) that run by themselves, and misbehaving ones the schedule
  drives (pipelined bursts of any kind, trickling, TLS-record trickling, stopping half way,
  not reading replies, framing garbage, EOF).

The invariants (:meth:`World.check` after every step, some at the moment an event happens, and
:meth:`World.finish` after a quiet period) are listed in the tests' module docstring.
A violation raises :class:`Violation` with a message that names the invariant.
"""

from __future__ import annotations

import heapq
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.pdu import Request, exception_pdu, parse_request
from mbsec.path import exchange as xs
from mbsec.path.client import ClientConn
from mbsec.path.link import CONNECTING, OPEN, Link
from mbsec.path.plc import UpstreamTarget
from mbsec.path.router import Router
from mbsec.path.target import Target
from mbsec.path.timers import Timers

# -- settings, in seconds of simulated time ----------------------------------------------------

REQUEST_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.5
LATE_REPLY_WAIT = 3.0
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 2.0
RESETS_BEFORE_BACKOFF = 3
RESET_WINDOW = 10.0
BREAKER_RESETS = 3
BREAKER_WINDOW = 20.0
BREAKER_HOLD = 10.0
IDLE_TIMEOUT = 5.0
COMPLETE_TIMEOUT = 1.0
GOOD_PIPELINE = 4
BAD_PIPELINE = 16

CONNECT_DELAY = 0.004  # a healthy PLC accepts a connection this fast
SERVICE_MAX = 0.047  # the longest a good request takes (one PLC reply time)
SLOW_DELAY = 0.35  # a slow register: answered well within the request timeout
LATE_DELAY = 1.7  # a late register: answered after the request timeout, before late_reply_wait
EPS = 1e-6

UNIT = 1  # the unit id clients use ...
PLC_UNIT = 7  # ... rewritten to this one for the PLC
NO_ROUTE_UNIT = 9

#: one PLC reply time in the availability bound (one-at-a-time: behind ``depth - 1`` others)
#: and the bound itself: request_timeout + one PLC reply time + connect_timeout
def good_bound(depth: int, serial: bool) -> float:
    return REQUEST_TIMEOUT + SERVICE_MAX * (depth if serial else 1) + CONNECT_TIMEOUT


#: what lets a well-behaved client's request take longer than the bound: a slow reply
#: (the PLC holds requests) that took every link, or the only one
LATENCY_EXCUSES = frozenset({"stuck", "slow_pool1", "plc_slow"})

#: every exchange has its outcome within this long of being started (waited a slot up to the
#: request timeout, then waited its reply up to the request timeout)
EXCHANGE_BOUND = 2 * REQUEST_TIMEOUT

# -- request kinds: what the PLC does with a request (the oracle, keyed by the nonce) ----------

GOOD = "good"  # FC03, answered correctly after at most SERVICE_MAX
WRITE = "write"  # FC06, echoed after at most SERVICE_MAX
SLOW = "slow"  # answered correctly after SLOW_DELAY
LATE = "late"  # answered correctly after LATE_DELAY (the proxy has given up by then)
NEVER = "never"  # never answered (a one-at-a-time PLC is stuck on that connection)
GARBAGE = "garbage"  # answered with an MBAP protocol id of 1
UNKNOWN_TID = "unknown_tid"  # answered with a transaction id the proxy never sent
WRONG_FUNCTION = "wrong_function"  # answered with function 4 to a function 3 request
SHORT_COUNT = "short_count"  # answered with a byte count 2 short (MBAP length consistent)
WRONG_UNIT = "wrong_unit"  # answered from another unit id
CLOSE = "close"  # the PLC closes the connection instead of answering
PLC_EXCEPTION = "plc_exception"  # the PLC answers exception 02 (a valid reply)
NO_ROUTE = "no_route"  # sent to a unit id no target serves: 0x0A from the router
BAD_PDU = "bad_pdu"  # FC03 with quantity 0: exception 03 from the proxy, never forwarded

ALL_KINDS = (GOOD, WRITE, SLOW, LATE, NEVER, GARBAGE, UNKNOWN_TID, WRONG_FUNCTION, SHORT_COUNT,
             WRONG_UNIT, CLOSE, PLC_EXCEPTION, NO_ROUTE, BAD_PDU)
#: replies that hold a slot for long: the availability bound does not hold for pool_size 1
SLOW_KINDS = frozenset({SLOW, LATE, NEVER})
#: replies that hold a slot past the request timeout
STUCK_KINDS = frozenset({LATE, NEVER})
BAD_REPLY_KINDS = frozenset({GARBAGE, UNKNOWN_TID, WRONG_FUNCTION, SHORT_COUNT, WRONG_UNIT,
                             CLOSE})
#: requests whose connection may fail with them (shared fate of one Modbus/TCP stream)
MISBEHAVING = STUCK_KINDS | BAD_REPLY_KINDS
#: kinds whose correct reply may reach the client (all others: exceptions only)
REPLY_KINDS = frozenset({GOOD, WRITE, SLOW, PLC_EXCEPTION})

GW_UNAVAILABLE = 0x0A
GW_NO_RESPONSE = 0x0B

# -- PLC-wide episodes -----------------------------------------------------------------------

REFUSE = "refuse"  # connection attempts are refused
BLACKHOLE = "blackhole"  # connection attempts are never answered
MUTE = "mute"  # requests received meanwhile are never answered
RESTART = "restart"  # every connection is closed, then attempts are refused meanwhile
STALL = "stall"  # the PLC stops reading its sockets (the proxy's writes block)
EPISODES = (REFUSE, BLACKHOLE, MUTE, RESTART, STALL)
#: episodes that are slow replies (the PLC holds requests): the time bound does not hold
SLOW_EPISODES = frozenset({MUTE, STALL})
#: how long after an episode its traces (backoff, requests owed late replies) may still cost a
#: well-behaved client its request
RECOVERY = REQUEST_TIMEOUT + LATE_REPLY_WAIT + BACKOFF_MAX + CONNECT_TIMEOUT


class Violation(AssertionError):
    """An invariant of the request path does not hold; the message names it."""


def violation(what: str, detail: str) -> Violation:
    return Violation(f"{what}: {detail}")


# -- the logger stub and the decider -------------------------------------------------------------

class SimLog:
    """structlog-like: ``bind`` returns a child, events go to the world."""

    __slots__ = ("ctx", "world")

    def __init__(self, world: World, ctx: dict[str, Any] | None = None) -> None:
        self.world = world
        self.ctx = ctx or {}

    def bind(self, **kw: Any) -> SimLog:
        return SimLog(self.world, {**self.ctx, **kw})

    def debug(self, event: str, **kw: Any) -> None:
        self.world.on_log("debug", event, kw)

    def info(self, event: str, **kw: Any) -> None:
        self.world.on_log("info", event, kw)

    def warning(self, event: str, **kw: Any) -> None:
        self.world.on_log("warning", event, kw)

    def error(self, event: str, **kw: Any) -> None:
        self.world.on_log("error", event, kw)


@dataclass(frozen=True, slots=True)
class Fwd:
    """What the policy hands the core for a forwarded request."""

    request: Request
    t0: float


class SimDecider:
    """Allows every request that parses; a bad PDU gets its exception at once."""

    __slots__ = ("blame_key", "client", "framing_errors")

    def __init__(self, client: SimClient) -> None:
        self.client = client
        self.blame_key = client.name
        self.framing_errors: list[str] = []

    def decide(self, adu: Any, now: float) -> bytes | Fwd | None:
        self.client.on_start(adu, now)
        try:
            request = parse_request(adu.pdu)
        except ProtocolError as exc:
            if exc.exception_code is None:
                return None
            return exception_pdu(adu.pdu[0], exc.exception_code)
        self.client.world.started[self.client.requests[adu.transaction_id]] = now
        return Fwd(request, now)

    def complete(self, adu: Any, fwd: Fwd, reply: Any, error: Any, now: float,
                 delivered: bool = True, close_reason: str = "") -> bytes:
        if reply is not None:
            return bytes(reply.pdu)
        req = self.client.requests.get(adu.transaction_id)
        if req is not None:
            req.error = f"{error.reason}: {error}"
        return exception_pdu(fwd.request.function_code, error.exception_code)

    def framing_error(self, exc: Any) -> None:
        self.framing_errors.append(exc.reason)


# -- requests and clients ------------------------------------------------------------------------

def read_reply(nonce: int) -> bytes:
    count = 1 + nonce % 3
    values = [(nonce * 7 + i) & 0xFFFF for i in range(count)]
    return bytes((3, 2 * count)) + struct.pack(f">{count}H", *values)


def service_time(nonce: int) -> float:
    return 0.011 + (nonce % 5) * 0.009  # <= SERVICE_MAX


class SimRequest:
    """One request a client sends, from its first byte to its outcome."""

    __slots__ = (
        "client",
        "data",
        "end",
        "error",
        "ex_done",
        "excuses",
        "first_fed",
        "kind",
        "nonce",
        "outcome",
        "outcome_t",
        "pdu",
        "plc_received",
        "released_t",
        "start",
        "start_t",
        "tid",
        "unit",
    )

    def __init__(self, client: SimClient, tid: int, kind: str, nonce: int) -> None:
        self.client = client
        self.tid = tid
        self.kind = kind
        self.nonce = nonce
        self.unit = NO_ROUTE_UNIT if kind == NO_ROUTE else UNIT
        if kind == WRITE:
            self.pdu = struct.pack(">BHH", 6, nonce, (nonce * 31) & 0xFFFF)
        elif kind == BAD_PDU:
            self.pdu = struct.pack(">BHH", 3, nonce, 0)
        else:
            self.pdu = struct.pack(">BHH", 3, nonce, 1 + nonce % 3)
        self.data = struct.pack(">HHHB", tid, 0, len(self.pdu) + 1, self.unit) + self.pdu
        self.start = 0  # offset of its first byte in the client's stream
        self.end = 0
        self.first_fed = -1.0  # when the driver read its first byte
        self.start_t = -1.0  # when the core started it (decide)
        self.ex_done = -1.0  # when its exchange came out of the router's done queue
        self.plc_received = -1.0
        self.released_t = -1.0  # when the PLC answered it or its connection closed
        self.outcome: str | None = None  # "reply" | "exception" | "closed"
        self.outcome_t = -1.0
        self.excuses: set[str] = set()
        self.error = ""

    def expected_reply(self) -> bytes:
        if self.kind == WRITE:
            return self.pdu
        if self.kind == PLC_EXCEPTION:
            return bytes((0x83, 0x02))
        return read_reply(self.nonce)

    def __repr__(self) -> str:
        return (f"<{self.client.name} tid {self.tid} {self.kind} nonce {self.nonce} "
                f"start {self.start_t:.3f} outcome {self.outcome}@{self.outcome_t:.3f}"
                f"{' (' + self.error + ')' if self.error else ''}>")


class SimClient:
    """One client connection (a well-behaved poller or a misbehaving one)."""

    def __init__(self, world: World, name: str, good: bool, max_pipelined: int,
                 think: float = 0.0) -> None:
        self.world = world
        self.name = name
        self.good = good
        self.think = think
        self.decider = SimDecider(self)
        self.conn: ClientConn = world.client_cls(
            self.decider, world.router, max_pipelined=max_pipelined, idle_timeout=IDLE_TIMEOUT,
            request_complete_timeout=COMPLETE_TIMEOUT, now=world.now)
        world.conn_client[id(self.conn)] = self
        self.requests: dict[int, SimRequest] = {}
        self.order: list[SimRequest] = []  # in stream order
        self.next_tid = 1
        self.stream = bytearray()  # everything the client wrote to its socket
        self.fed = 0  # bytes of it the driver read
        self.tls_pending = False  # a TLS record is arriving (no plaintext yet) ...
        self.tls_unread = 0  # ... its fragments the driver has not read yet
        self.tls_partial_since = -1.0  # when the driver read its first fragment
        self.eof_sent = False
        self.stalled = False
        self.stalled_since = -1.0
        self.closed_t = -1.0
        self.outstanding = 0  # a poller's request without outcome
        self.spent = False  # its stream is left mid-request (trickling, stopped, garbage)

    def new_request(self, kind: str) -> SimRequest:
        w = self.world
        tid = self.next_tid
        self.next_tid = (tid + 1) & 0xFFFF
        nonce = next(w.nonces)
        req = SimRequest(self, tid, kind, nonce)
        w.by_nonce[nonce] = req
        self.requests[tid] = req
        self.order.append(req)
        return req

    @property
    def closed(self) -> bool:
        return self.closed_t >= 0

    def write(self, data: bytes) -> None:
        """The client writes ``data`` (plaintext; TLS is the driver's) to its socket."""
        if self.closed or self.eof_sent:
            return
        self.stream += data
        self.world.inputs[self] = None
        self.world.settle()

    def send(self, req: SimRequest, chunks: int = 1) -> None:
        """Queue a request's bytes; with ``chunks`` > 1 the rest follow in later writes."""
        req.start = len(self.stream)
        req.end = req.start + len(req.data)
        self.write(req.data[:len(req.data) if chunks == 1 else 3])

    def on_start(self, adu: Any, now: float) -> None:
        req = self.requests.get(adu.transaction_id)
        if req is None or req.start_t >= 0:
            raise violation("a request starts once", f"{self.name} tid {adu.transaction_id}")
        if self.fed < req.end:
            raise violation("a request starts when complete", repr(req))
        if adu.pdu != req.pdu or adu.unit_id != req.unit:
            raise violation("the core passes the request unchanged", repr(req))
        req.start_t = now
        w = self.world
        if self.good:
            w.note_good_start(req)
        elif req.kind in SLOW_KINDS:
            if not w.slow_active:
                w.window("slow", True)
            w.slow_active[req] = None

    def on_reply(self, data: bytes) -> None:
        w = self.world
        tid, pid, length, unit = struct.unpack_from(">HHHB", data)
        pdu = data[7:]
        if pid != 0 or length != len(pdu) + 1:
            raise violation("reply framing", f"{self.name}: {data.hex()}")
        req = self.requests.get(tid)
        if req is None:
            raise violation("a reply answers a request the client sent",
                            f"{self.name} got tid {tid}")
        if unit != req.unit:
            raise violation("a reply carries the client's unit id", repr(req))
        if req.outcome is not None:
            raise violation("exactly one outcome per request", f"second reply to {req!r}")
        expected_fc = req.pdu[0]
        if pdu[0] == expected_fc | 0x80:
            code = pdu[1]
            if req.kind == BAD_PDU:
                allowed = {0x03}
            elif req.kind == NO_ROUTE:
                allowed = {GW_UNAVAILABLE}
            elif req.kind == PLC_EXCEPTION:
                allowed = {0x02, GW_UNAVAILABLE, GW_NO_RESPONSE}
            else:
                allowed = {GW_UNAVAILABLE, GW_NO_RESPONSE}
            if len(pdu) != 2 or code not in allowed:
                raise violation("a request gets its own reply or a gateway exception",
                                f"{req!r} got exception {pdu.hex()}")
            outcome = "reply" if (req.kind == PLC_EXCEPTION and code == 0x02) else "exception"
        else:
            if req.kind not in REPLY_KINDS or pdu != req.expected_reply():
                raise violation("a request gets its own reply",
                                f"{req!r} got {pdu.hex()}, expected "
                                f"{req.expected_reply().hex()}")
            outcome = "reply"
        if req.start_t < 0:
            raise violation("a reply follows the request's start", repr(req))
        w.record_outcome(req, outcome)

    def on_closed(self) -> None:
        w = self.world
        self.closed_t = w.now
        if self.good and not w.quiet:
            raise violation("a well-behaved client is never closed",
                            f"{self.name} closed: {self.conn.close_reason}")
        for req in self.order:
            if req.outcome is None:
                w.record_outcome(req, "closed")


# -- the PLC ---------------------------------------------------------------------------------------

class SimSocket:
    """One TCP connection between the proxy (a link generation) and the PLC."""

    __slots__ = ("free_at", "gen", "late", "link", "open", "outstanding", "rx")

    def __init__(self, link: Link, gen: int) -> None:
        self.link = link
        self.gen = gen
        self.open = False  # False while connecting
        self.rx = bytearray()
        self.free_at = 0.0  # one-at-a-time: when the PLC is done with what it has
        self.outstanding: dict[int, tuple[float, bool, bool]] = {}  # nonce -> (recv, late, bad)
        self.late = 0  # outstanding requests answered after the request timeout (or never)


class SimPlc:
    """Receives what the proxy writes and answers it per request kind and PLC mode."""

    def __init__(self, world: World, serial: bool) -> None:
        self.world = world
        self.serial = serial  # serves one request at a time per connection
        self.received: dict[int, float] = {}  # nonce -> when it arrived
        self.accepted = 0

    def receive(self, sock: SimSocket, data: bytes) -> None:
        w = self.world
        sock.rx += data
        while len(sock.rx) >= 7:
            tid, pid, length, unit = struct.unpack_from(">HHHB", sock.rx)
            if pid != 0 or not 2 <= length <= 254:
                raise violation("the proxy sends valid MBAP", sock.rx[:7].hex())
            if len(sock.rx) < 6 + length:
                break
            pdu = bytes(sock.rx[7:6 + length])
            del sock.rx[:6 + length]
            nonce = struct.unpack_from(">H", pdu, 1)[0]
            req = w.by_nonce.get(nonce)
            if req is None or pdu != req.pdu:
                raise violation("the proxy forwards the client's PDU", pdu.hex())
            if unit != PLC_UNIT:
                raise violation("the unit id is rewritten", f"{req!r} reached unit {unit}")
            if nonce in self.received:
                raise violation("no request is sent twice", repr(req))
            if req.ex_done >= 0 or req.outcome in ("reply", "exception"):
                # (a request whose client went away may still be on its way: it was sent)
                raise violation("nothing that has its outcome is sent later", repr(req))
            if req.kind in (NO_ROUTE, BAD_PDU):
                raise violation("refused requests are not forwarded", repr(req))
            self.received[nonce] = w.now
            req.plc_received = w.now
            self.answer(sock, tid, req)

    def answer(self, sock: SimSocket, tid: int, req: SimRequest) -> None:
        w = self.world
        kind = req.kind
        now = w.now
        muted = w.active(MUTE)
        if kind in (GOOD, WRITE, PLC_EXCEPTION, GARBAGE, UNKNOWN_TID, WRONG_FUNCTION,
                    SHORT_COUNT, WRONG_UNIT, CLOSE):
            delay = service_time(req.nonce)
        elif kind == SLOW:
            delay = SLOW_DELAY
        elif kind == LATE:
            delay = LATE_DELAY
        else:
            delay = float("inf")
        if muted:
            delay = float("inf")
        if self.serial:
            at = max(now, sock.free_at) + delay
            sock.free_at = at
        else:
            at = now + delay
        late = at - now > REQUEST_TIMEOUT - EPS
        w.plc_outstanding(sock, req, late, muted or kind in MISBEHAVING)
        if at == float("inf"):
            return
        if kind == CLOSE:
            w.schedule(at, w.plc_close, sock, req)
            return
        pdu = req.expected_reply()
        unit = PLC_UNIT
        pid = 0
        if kind == GARBAGE:
            pid = 1
        elif kind == UNKNOWN_TID:
            tid ^= 0x8000
        elif kind == WRONG_FUNCTION:
            pdu = bytes((4,)) + pdu[1:]
        elif kind == SHORT_COUNT:
            pdu = bytes((3, pdu[1] - 2)) + pdu[2:-2]
        elif kind == WRONG_UNIT:
            unit = PLC_UNIT + 1
        data = struct.pack(">HHHB", tid, pid, len(pdu) + 1, unit) + pdu
        w.schedule(at, w.plc_reply, sock, req, data)


# -- the world: clock, driver, bookkeeping, invariants --------------------------------------------

class World:
    """The core, its driver, the PLC and the clients on one simulated clock."""

    def __init__(self, *, pool_size: int, depth: int, serial: bool,
                 client_cls: type[ClientConn] = ClientConn,
                 target_cls: type[Target] = Target) -> None:
        self.now = 0.0
        self._seq = itertools.count(1)
        self.client_cls = client_cls
        self.pool_size = pool_size
        self.depth = depth
        self.timers = Timers()
        self.config = UpstreamTarget(
            name="plc", host="192.0.2.10", port=502, unit_ids=frozenset({UNIT}),
            unit_rewrite={UNIT: PLC_UNIT}, pool_size=pool_size, depth=depth,
            connect_timeout=CONNECT_TIMEOUT, request_timeout=REQUEST_TIMEOUT,
            backoff_initial=BACKOFF_INITIAL, backoff_max=BACKOFF_MAX,
            late_reply_wait=LATE_REPLY_WAIT, resets_before_backoff=RESETS_BEFORE_BACKOFF,
            reset_window=RESET_WINDOW, breaker_resets=BREAKER_RESETS,
            breaker_window=BREAKER_WINDOW, breaker_hold=BREAKER_HOLD)
        self.log = SimLog(self)
        self.router = Router([self.config], timers=self.timers, log=self.log, metrics=None)
        if target_cls is not Target:  # a fault put back by a test (the core may be compiled)
            swapped = target_cls(self.config, self.router.outbox, self.router.outbox.log)
            self.router.targets = {self.config.name: swapped}
            self.router.routes = {UNIT: swapped}
        self.target = self.router.routes[UNIT]
        self.plc = SimPlc(self, serial)
        self.bound = good_bound(depth, serial)
        self.events: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self.sockets: dict[tuple[int, int], SimSocket] = {}
        self.nonces = itertools.count(1)
        self.by_nonce: dict[int, SimRequest] = {}
        self.conn_client: dict[int, SimClient] = {}
        self.inputs: dict[SimClient, None] = {}  # clients with bytes (or EOF) to read
        self.clients: list[SimClient] = []  # every connection ever, in order
        self.current: dict[str, SimClient] = {}  # identity -> its latest connection
        self.started: dict[SimRequest, float] = {}  # started, exchange not done yet
        self.good_open: dict[SimRequest, None] = {}  # a poller's requests without outcome
        self.episodes: dict[str, float] = {}  # mode -> until
        self.windows: dict[str, list[list[float]]] = {
            "plc": [], "plc_slow": [], "stuck": [], "slow": []}
        self.stuck_open = False
        self.slow_active: dict[SimRequest, None] = {}
        self.blamed: list[tuple[float, str]] = []
        self.penalized: dict[str, float] = {}
        self.events_logged: dict[str, int] = {}
        self.quiet = False  # the final quiet period: pollers stop, idle clients may close
        self._settling = False

    # -- clock and events --------------------------------------------------------------------

    def schedule(self, at: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.events, (at, next(self._seq), fn, args))

    def active(self, mode: str) -> bool:
        return self.episodes.get(mode, -1.0) > self.now

    def advance(self, dt: float) -> None:
        """Run every timer and event up to ``now + dt``, in time order."""
        end = self.now + dt
        events = self.events
        timers = self.timers
        while True:
            t_timer = timers.next_deadline()
            t_event = events[0][0] if events else None
            nxt = min(x for x in (t_timer, t_event, end) if x is not None)
            if nxt > end:
                nxt = end
            self.now = max(self.now, nxt)
            if t_timer is not None and t_timer <= self.now:
                timers.run_due(self.now)
                self.settle()
                continue
            if t_event is not None and t_event <= self.now:
                _, _, fn, args = heapq.heappop(events)
                fn(*args)
                self.settle()
                continue
            break
        self.check()

    # -- the driver --------------------------------------------------------------------------

    def settle(self) -> None:
        """Drain the outbox and feed clients until nothing moves (the driver's loop)."""
        if self._settling:
            return
        self._settling = True
        try:
            while True:
                self.drain()
                if not self.feed_clients():
                    break
        finally:
            self._settling = False

    def drain(self) -> None:
        ob = self.router.outbox
        while True:
            if ob.actions:
                act, link, gen = ob.actions.popleft()
                self.on_action(act, link, gen)
                continue
            if ob.done:
                ex = ob.done.popleft()
                self.on_done(ex)
                ex.client.finished(ex, self.now)
                continue
            if ob.dirty:  # requests to the PLC first, as the epoll driver does
                items = list(ob.dirty)
                ob.dirty.clear()
                for item in items:
                    self.flush_link(item)
                continue
            if ob.clients:
                conns = list(ob.clients)
                ob.clients.clear()
                for conn in conns:
                    self.flush_client(conn)
                continue
            break

    def on_action(self, act: str, link: Link, gen: int) -> None:
        key = (link.index, gen)
        if act == "connect":
            if key in self.sockets:
                raise violation("one socket per link generation", f"{key} connected twice")
            if any(k[0] == link.index for k in self.sockets):
                raise violation("a link closes its socket before it connects again",
                                f"link {link.index} gen {gen}: {sorted(self.sockets)}")
            sock = SimSocket(link, gen)
            self.sockets[key] = sock
            if len(self.sockets) > self.pool_size:
                raise violation("links <= pool_size", f"{len(self.sockets)} sockets")
            if self.active(REFUSE) or self.active(RESTART):
                self.schedule(self.now + 0.001, self.connect_refused, sock)
            elif not self.active(BLACKHOLE):
                self.schedule(self.now + CONNECT_DELAY, self.connect_done, sock)
        elif act == "close":
            sock = self.sockets.pop(key, None)
            if sock is not None:
                self.plc_forget(sock)
        else:
            raise violation("known outbox actions", act)

    def connect_done(self, sock: SimSocket) -> None:
        if self.sockets.get((sock.link.index, sock.gen)) is not sock:
            return
        sock.open = True
        self.plc.accepted += 1
        sock.link.target.connected(sock.link, sock.gen, self.now)

    def connect_refused(self, sock: SimSocket) -> None:
        if self.sockets.pop((sock.link.index, sock.gen), None) is not sock:
            return
        sock.link.target.connect_failed(sock.link, sock.gen, "connect_refused",
                                        "connection refused", self.now)

    def flush_link(self, link: Link) -> None:
        if not link.out or self.active(STALL):
            return
        if link.state != OPEN:
            raise violation("bytes are queued only on open links", link.describe())
        sock = self.sockets.get((link.index, link.gen))
        if sock is None or not sock.open:
            raise violation("an open link has a connected socket", link.describe())
        data = bytes(link.out)
        link.wrote(len(data))
        self.plc.receive(sock, data)

    def flush_client(self, conn: ClientConn) -> None:
        c = self.conn_client[id(conn)]
        conn.queued = False
        if conn.replies and not c.stalled:
            replies = list(conn.replies)
            conn.replies.clear()
            for data in replies:
                c.on_reply(data)
            conn.flushed(True, self.now)
        elif conn.replies and not conn.blocked and not conn.closing:
            conn.flushed(False, self.now)
            if c.stalled_since < 0:
                c.stalled_since = self.now
        if conn.closing and not c.closed:
            c.on_closed()

    def feed_clients(self) -> bool:
        """The driver reads every client socket with input that the core wants read."""
        if not self.inputs:
            return False
        moved = False
        now = self.now
        for c in list(self.inputs):
            conn = c.conn
            if c.closed or conn.closing:
                del self.inputs[c]
                continue
            if not conn.wants_read:
                continue
            del self.inputs[c]
            moved = True
            new = len(c.stream) - c.fed
            conn.raw_received(now)
            if c.tls_unread:
                c.tls_unread = 0
                if c.tls_partial_since < 0:
                    c.tls_partial_since = now
            if new > 0:
                start = c.fed
                c.fed = len(c.stream)
                for req in reversed(c.order):
                    if req.end <= start:
                        break
                    if req.first_fed < 0 and req.start < c.fed:
                        req.first_fed = now
                conn.receive(bytes(c.stream[start:]), now)
            if c.eof_sent and not c.tls_pending:
                conn.receive_eof("client_closed", now)
            else:
                conn.settled(c.tls_pending, now)
            self.drain()
        return moved

    # -- the PLC's side of the driver ----------------------------------------------------------

    def plc_reply(self, sock: SimSocket, req: SimRequest, data: bytes) -> None:
        if not self.plc_release(sock, req):
            return
        link = sock.link
        if req.nonce % 4:
            link.target.receive(link, data, self.now)
            return
        cut = 1 + req.nonce % (len(data) - 1)  # every fourth reply arrives in two reads
        link.target.receive(link, data[:cut], self.now)
        self.drain()
        if self.sockets.get((link.index, sock.gen)) is sock:
            link.target.receive(link, data[cut:], self.now)

    def plc_close(self, sock: SimSocket, req: SimRequest | None) -> None:
        if self.sockets.pop((sock.link.index, sock.gen), None) is not sock:
            return
        self.plc_forget(sock)
        sock.link.target.closed(sock.link, sock.gen, "eof", "the PLC closed the connection",
                                self.now)

    def plc_outstanding(self, sock: SimSocket, req: SimRequest, late: bool, bad: bool) -> None:
        now = self.now
        if late:
            sock.late += 1
            self.update_stuck()
        if req.client.good:
            for recv, _late, obad in sock.outstanding.values():
                # sharing a connection with a misbehaving request the proxy cannot have known
                # about yet (sent less than a request timeout ago) may cost this one too
                if obad and now - recv < REQUEST_TIMEOUT - EPS:
                    req.excuses.add("shared")
                elif obad and not self.stuck_open:
                    req.excuses.add("tainted")  # the core chose a link owed a late reply
        elif bad:
            for nonce in sock.outstanding:
                other = self.by_nonce[nonce]
                if other.client.good:
                    other.excuses.add("shared")
        sock.outstanding[req.nonce] = (now, late, bad)
        if req in self.slow_active:
            self.update_stuck()

    def plc_release(self, sock: SimSocket, req: SimRequest) -> bool:
        """The PLC is done with ``req`` (answered it); False if the socket is gone."""
        if self.sockets.get((sock.link.index, sock.gen)) is not sock:
            return False
        info = sock.outstanding.pop(req.nonce, None)
        if info is not None:
            req.released_t = self.now
            if info[1]:
                sock.late -= 1
                self.update_stuck()
            self.slow_release(req)
        return True

    def plc_forget(self, sock: SimSocket) -> None:
        """The connection is gone: the PLC drops what it was working on."""
        for nonce in sock.outstanding:
            req = self.by_nonce[nonce]
            req.released_t = self.now
            self.slow_release(req)
        sock.outstanding.clear()
        sock.late = 0
        self.update_stuck()

    def update_stuck(self) -> None:
        """Every connection holds a misbehaving client's late or slow request (two
        misbehaving clients can take a pool of two): no link is left for the others."""
        slow = self.slow_active
        by_nonce = self.by_nonce
        stuck = sum(1 for s in self.sockets.values()
                    if s.late > 0 or any(by_nonce[n] in slow for n in s.outstanding))
        is_stuck = stuck >= self.pool_size
        if is_stuck != self.stuck_open:
            self.stuck_open = is_stuck
            self.window("stuck", is_stuck)

    def window(self, name: str, opening: bool, tail: float = 0.0) -> None:
        spans = self.windows[name]
        if opening:
            spans.append([self.now, float("inf")])
        elif spans and spans[-1][1] == float("inf"):
            spans[-1][1] = self.now + tail

    def slow_release(self, req: SimRequest) -> None:
        if req in self.slow_active:
            del self.slow_active[req]
            if not self.slow_active:
                self.window("slow", False)
            self.update_stuck()

    # -- episodes ----------------------------------------------------------------------------

    def episode(self, mode: str, duration: float) -> None:
        until = self.now + duration
        self.episodes[mode] = max(self.episodes.get(mode, 0.0), until)
        names = ("plc", "plc_slow") if mode in SLOW_EPISODES else ("plc",)
        for name in names:
            spans = self.windows[name]
            if spans and spans[-1][1] >= self.now:
                spans[-1][1] = max(spans[-1][1], until + RECOVERY)
            else:
                spans.append([self.now, until + RECOVERY])
        if mode == RESTART:
            for sock in [s for s in self.sockets.values() if s.open]:
                self.plc_close(sock, None)
        if mode == STALL:
            self.schedule(until, self.unstall)
        self.settle()

    def unstall(self) -> None:
        if not self.active(STALL):
            for link in self.target.links:
                if link.out:
                    self.router.outbox.dirty.append(link)

    # -- clients -----------------------------------------------------------------------------

    def add_client(self, name: str, *, good: bool, think: float = 0.0) -> SimClient:
        c = SimClient(self, name, good, GOOD_PIPELINE if good else BAD_PIPELINE, think)
        self.clients.append(c)
        self.current[name] = c
        if good:
            self.schedule(self.now + think, self.poll, c)
        return c

    def client(self, name: str) -> SimClient:
        """The identity's connection, reconnecting if the last one is closed."""
        c = self.current[name]
        if c.closed or c.eof_sent or c.stalled or c.spent or c.conn.closing:
            c = self.add_client(name, good=c.good)
        return c

    def poll(self, c: SimClient) -> None:
        """A well-behaved poller: one good request at a time, sometimes in two chunks."""
        if self.quiet or c.closed or c.outstanding:
            return
        nonce_kind = WRITE if next(self.nonces) % 4 == 0 else GOOD
        req = c.new_request(nonce_kind)
        c.outstanding += 1
        self.good_open[req] = None
        if req.nonce % 3 == 0:
            c.send(req, chunks=2)
            self.schedule(self.now + 0.003, self.write_rest, c, req)
        else:
            c.send(req)

    def write_rest(self, c: SimClient, req: SimRequest) -> None:
        c.write(req.data[len(c.stream) - req.start:])

    def note_good_start(self, req: SimRequest) -> None:
        if self.stuck_open:
            req.excuses.add("stuck")
        for earlier in req.client.order[-64:]:
            # a request answered 0x0B that the PLC may still carry out keeps its client on that
            # connection until it is settled (a later write must not overtake it)
            if (earlier is not req and earlier.outcome == "exception"
                    and earlier.plc_received >= 0 and earlier.released_t < 0):
                req.excuses.add("settling")
                break

    def record_outcome(self, req: SimRequest, outcome: str) -> None:
        if req.outcome is not None:
            raise violation("exactly one outcome per request", f"{req!r} then {outcome}")
        req.outcome = outcome
        req.outcome_t = self.now
        c = req.client
        if not c.good:
            return
        self.good_open.pop(req, None)
        if outcome == "closed":
            return
        c.outstanding -= 1
        self.schedule(self.now + c.think, self.poll, c)
        self.check_good(req)

    def excuses_of(self, req: SimRequest, t1: float) -> set[str]:
        """What, during the request's life, lets a well-behaved client's request fail."""
        t0 = req.start_t
        excused = set(req.excuses)
        for name, spans in self.windows.items():
            for s, e in spans:
                if s <= t1 and e >= t0:
                    excused.add(name)
                    break
        if self.pool_size == 1 and "slow" in excused:
            excused.add("slow_pool1")
        excused.discard("slow")
        return excused

    def check_good(self, req: SimRequest) -> None:
        """The availability bound for a well-behaved client's request."""
        t1 = self.now
        excused = self.excuses_of(req, t1)
        if t1 - req.start_t > self.bound + EPS and not excused & LATENCY_EXCUSES:
            raise violation("a well-behaved client's request completes within request_timeout"
                            " + one PLC reply time + connect_timeout",
                            f"{req!r} took {t1 - req.start_t:.3f} s > {self.bound:.3f} s "
                            f"(excuses {sorted(excused)})")
        if req.outcome != "reply" and not (excused - {"tainted"}):
            raise violation("a well-behaved client's request gets its reply while others "
                            "misbehave", f"{req!r} (excuses {sorted(excused)}, "
                            f"{self.describe()})")

    def describe(self) -> str:
        parts = []
        for lk in self.target.links:
            on = [self._ex_name(ex) for ex in lk.pending.values()]
            late = [self._ex_name(ex) for ex in lk.overdue.values()]
            parts.append(f"{lk.describe()} pending {on} overdue {late}")
        return f"t={self.now:.3f}: {'; '.join(parts)}; waiting {self.target.wait.count}"

    def _ex_name(self, ex: Any) -> str:
        c = self.conn_client.get(id(ex.client))
        req = c.requests.get(ex.adu.transaction_id) if c else None
        return f"{c.name if c else '?'}:{req.kind if req else '?'}"

    # -- what the core reports ---------------------------------------------------------------

    def on_done(self, ex: Any) -> None:
        c = self.conn_client.get(id(ex.client))
        if c is None:
            raise violation("exchanges belong to client connections", repr(ex.client))
        req = c.requests.get(ex.adu.transaction_id)
        if req is None or req.ex_done >= 0:
            raise violation("exactly one outcome per exchange", repr(req))
        if ex.state != xs.DONE or (ex.reply is None) == (ex.error is None):
            raise violation("a done exchange has a reply or an error", repr(req))
        req.ex_done = self.now
        started = self.started.pop(req, None)
        if started is None or self.now - started > EXCHANGE_BOUND + EPS:
            raise violation("every exchange has its outcome within 2 x request_timeout",
                            f"{req!r} done at {self.now:.3f}")
        if ex.reply is not None and req.plc_received < 0:
            raise violation("a reply comes from the PLC", repr(req))
        if req.plc_received < 0:
            self.slow_release(req)

    def on_log(self, level: str, event: str, kw: dict[str, Any]) -> None:
        action = kw.get("event.action", event)
        self.events_logged[action] = self.events_logged.get(action, 0) + 1
        if action == "client-penalized":
            self.penalized[kw["mbsec.blamed"]] = self.now
        elif action == "upstream-reset" and kw.get("mbsec.blamed"):
            self.blamed.append((self.now, kw["mbsec.blamed"]))

    # -- invariants --------------------------------------------------------------------------

    def check(self) -> None:
        """Invariants that hold between any two steps."""
        now = self.now
        target = self.target
        for req, started in self.started.items():
            if now - started > EXCHANGE_BOUND + EPS:
                raise violation("every exchange has its outcome within 2 x request_timeout",
                                f"{req!r} started {started:.3f}, now {now:.3f}")
        for req in self.good_open:
            if req.start_t >= 0 and now - req.start_t > self.bound + EPS:
                excused = self.excuses_of(req, now)
                if not excused & LATENCY_EXCUSES:
                    raise violation("a well-behaved client's request completes within "
                                    "request_timeout + one PLC reply time + connect_timeout",
                                    f"{req!r} open after {now - req.start_t:.3f} s "
                                    f"(excuses {sorted(excused)})")
        # links <= pool_size, one socket per link, states agree with the sockets
        if len(self.sockets) > self.pool_size:
            raise violation("links <= pool_size", f"{len(self.sockets)} sockets")
        for link in target.links:
            sock = self.sockets.get((link.index, link.gen))
            if link.state in (OPEN, CONNECTING) and sock is None:
                raise violation("a live link has a socket", link.describe())
            if link.busy > self.depth:
                raise violation("slots per link <= depth", link.describe())
            if len(link.out) > self.depth * 260:
                raise violation("a link's output stays bounded", f"{len(link.out)} bytes")
            if link.state != OPEN and (link.pending or link.overdue):
                raise violation("requests are in flight only on open links", link.describe())
            for tid, ex in link.pending.items():
                if ex.state != xs.SENT or ex.link is not link or ex.tid != tid:
                    raise violation("a pending exchange is sent on its link", repr(ex.state))
        # the target's books
        live = [c for c in self.clients if not c.conn.released]
        wait = target.wait
        queued = sum(len(q) for q in wait.queues.values())
        if queued != wait.count:
            raise violation("the wait count counts the queues", f"{queued} != {wait.count}")
        if set(wait.turns) != set(wait.queues) or len(wait.turns) != len(wait.queues):
            raise violation("every client with waiting requests has one turn",
                            f"{len(wait.turns)} turns, {len(wait.queues)} queues")
        if wait.count > BAD_PIPELINE * len(live):
            raise violation("the wait queue stays bounded", str(wait.count))
        for ex in wait.arrivals:
            if ex.state == xs.WAITING and ex.deadline < now - EPS:
                raise violation("no request waits past its deadline", repr(ex.adu))
        if wait.arrivals and wait.arrivals[0].deadline < now - EPS:
            raise violation("the arrival book only holds requests of the last request_timeout",
                            f"{len(wait.arrivals)} entries")
        breaker = target.breaker
        for key, times in breaker.strikes.items():
            if len(times) >= BREAKER_RESETS:
                raise violation("the breaker's book stays bounded", f"{key}: {times}")
        if len(breaker.strikes) > len(self.current) or len(breaker.refused) > len(self.current):
            raise violation("the breaker's books stay bounded", f"{len(breaker.strikes)}")
        if len(target.resets) > 64:
            raise violation("the reset book stays bounded", f"{len(target.resets)}")
        # a pin names the link a client's requests are on, and never outlives them
        for client, (link, n) in target.pins.items():
            there = sum(1 for ex in [*link.pending.values(), *link.overdue.values()]
                        if ex.client is client)
            if not 1 <= n <= there:
                raise violation("a client's pin counts its requests on its link",
                                f"pin {n}, {there} on {link.describe()}; {self.describe()}")
        if len(target.pins) > len(self.clients):
            raise violation("the pin book stays bounded", str(len(target.pins)))
        ob = self.router.outbox
        if ob.actions or ob.done or ob.dirty or ob.clients:
            raise violation("the driver drained the outbox", "left over")
        # clients
        for c in live:
            conn = c.conn
            if conn.inflight < 0 or conn.inflight > conn.max:
                raise violation("0 <= inflight <= max_pipelined", f"{c.name}: {conn.inflight}")
            # requests start while fewer than max_pipelined replies wait, and those in flight
            # (at most max_pipelined) add theirs: fewer than 2 x max_pipelined wait
            if len(conn.replies) >= 2 * conn.max:
                raise violation("replies waiting for a client stay bounded",
                                f"{c.name}: {len(conn.replies)}")
            if c.closed:
                continue
            self.check_request_deadline(c)
            if c.stalled_since >= 0 and now > c.stalled_since + IDLE_TIMEOUT + EPS:
                raise violation("a client that does not take its replies is closed",
                                f"{c.name} stalled since {c.stalled_since:.3f}")
        live_timers = sum(1 for e in getattr(self.timers, "_heap", ()) if e[2].fn is not None)
        # three per client connection and per link, the wait deadline, and the reconnects
        # scheduled by backoffs (each within backoff_max)
        limit = 3 * len(live) + 3 * self.pool_size + 1 + 32
        if live_timers > limit:
            raise violation("the timer heap stays bounded", f"{live_timers} > {limit}")

    def check_request_deadline(self, c: SimClient) -> None:
        """A request still arriving ``request_complete_timeout`` after its first byte (or after
        the request before it started, whichever is later) closes its connection."""
        conn = c.conn
        if not conn.reading:
            return
        since = -1.0
        if c.tls_partial_since >= 0:
            since = c.tls_partial_since
        partial = None
        prev = None
        for req in reversed(c.order):
            if req.end <= c.fed:
                prev = req
                break
            if req.start < c.fed:
                partial = req
        if partial is not None:
            since = partial.first_fed if since < 0 else min(since, partial.first_fed)
        elif c.fed < len(c.stream) and c.fed == (prev.end if prev else 0):
            pass  # bytes not read yet: the driver reads them when the core wants them
        if since < 0:
            return
        if prev is not None:
            if prev.start_t < 0:
                return  # the request before has not started: the core counts from then
            since = max(since, prev.start_t)
        if self.now > since + COMPLETE_TIMEOUT + EPS:
            raise violation("a client whose request is not complete within "
                            "request_complete_timeout is closed",
                            f"{c.name}: incomplete since {since:.3f}, now {self.now:.3f}")

    def finish(self) -> None:
        """After a quiet period everything has its outcome and every book is empty."""
        self.quiet = True
        self.advance(EXCHANGE_BOUND + LATE_REPLY_WAIT + IDLE_TIMEOUT + BACKOFF_MAX + 2.0)
        for c in self.clients:
            if c.conn.inflight:
                raise violation("every request in flight finishes", f"{c.name} {c.conn.inflight}")
            for req in c.order:
                if req.end <= c.fed and req.outcome is None and not c.closed:
                    raise violation("every request gets exactly one outcome", repr(req))
            if c.closed and not c.conn.released:
                raise violation("a closed connection is released once nothing is in flight",
                                c.name)
        if self.started:
            raise violation("every exchange finishes", repr(next(iter(self.started))))
        t = self.target
        if t.wait.count or t.wait.queues or t.wait.turns or t.pins:
            raise violation("no request waits forever", f"{t.wait.count} waiting")
        for link in t.links:
            if link.pending or link.overdue:
                raise violation("nothing stays in flight", link.describe())


