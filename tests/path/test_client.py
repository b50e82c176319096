"""One client connection of the request path, sans-IO (:class:`mbsec.path.client.ClientConn`).

The core is driven as the epoll driver drives it (``raw_received`` / ``receive`` /
``settled`` for a read, ``flushed`` after writing the replies, ``receive_eof``, timers fired
at their own time), with a real router and target behind it and a scripted PLC
(tests/path/core_helpers.py); the clock is a number. What is checked: framing errors close,
the pipelining limit pauses reading, replies leave in completion order with the client's
transaction id and unit, drain finishes what is in flight, the idle timeout spares requests
in flight, the stall limit, the request-completion deadline, the bound on replies waiting to
be written, withdrawal of waiting requests when the client goes, and that every request the
core takes gets exactly one outcome. Inputs are split at every offset (h11 style).

Ported from the trio session tests (tests/test_session.py) and the reviews of the threaded
data plane (tests/test_reactor_*.py); the end-to-end side is tests/e2e/test_data_plane.py.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from mbsec.modbus.errors import RemoteProtocolError
from mbsec.modbus.mbap import Adu
from mbsec.modbus.pdu import exception_pdu, parse_request
from mbsec.path.client import ClientConn
from mbsec.path.timers import COMPACT_MIN
from path.core_helpers import (
    Driver,
    Fwd,
    PlcRequest,
    ScriptedPlc,
    adu,
    fc03_reply,
    normal_answer,
    plc_target,
    read_pdu,
    splits,
    write_pdu,
)

DENIED_FROM = 1000  # the test decider denies FC03 reads from this address on


# -- the policy side, reduced to what the client core needs ------------------------------------


class Decider:
    """Forwards every request that parses; an FC03 read at DENIED_FROM or above is denied at
    once (01), a bad PDU gets its exception at once. Records each request's outcomes by the
    client's transaction id (tests use distinct ids), so a test can check there is one each."""

    def __init__(self, blame_key: str = "client-a") -> None:
        self.blame_key = blame_key
        self.close_reason = "unknown"
        self.outcomes: dict[int, list[str]] = {}
        self.framing: list[str] = []
        self.raise_in_decide: int | None = None  # a tid whose decision raises (a bug)
        self.raise_in_complete: int | None = None
        self.close_on: int | None = None  # a tid whose decision breaks the connection

    def _note(self, a: Adu, what: str) -> None:
        self.outcomes.setdefault(a.transaction_id, []).append(what)

    def decide(self, a: Adu, now: float) -> bytes | Fwd | None:
        if a.transaction_id == self.raise_in_decide:
            raise RuntimeError("a bug while deciding")
        if a.transaction_id == self.close_on:
            self.close_reason = "bad_request"
            self._note(a, "closed")
            return None
        try:
            request = parse_request(a.pdu)
        except RemoteProtocolError as exc:
            assert exc.exception_code is not None
            self._note(a, "invalid")
            return exception_pdu(a.pdu[0] & 0x7F, exc.exception_code)
        if a.pdu[0] == 3 and struct.unpack(">H", a.pdu[1:3])[0] >= DENIED_FROM:
            self._note(a, "denied")
            return exception_pdu(3, 1)
        return Fwd(request, now)

    def complete(self, a: Adu, fwd: Any, reply: Any, error: Any, now: float,
                 delivered: bool = True, close_reason: str = "") -> bytes:
        self._note(a, "reply" if reply is not None else error.reason)
        if a.transaction_id == self.raise_in_complete:
            raise RuntimeError("a bug while completing")
        if reply is not None:
            return bytes(reply.pdu)
        return exception_pdu(a.pdu[0], error.exception_code)

    def framing_error(self, exc: RemoteProtocolError) -> None:
        self.framing.append(exc.reason)


    def one_outcome_each(self) -> dict[int, str]:
        """Every request the core took has exactly one outcome; returns them by tid."""
        many = {tid: got for tid, got in self.outcomes.items() if len(got) != 1}
        assert not many, f"requests with more than one outcome: {many}"
        return {tid: got[0] for tid, got in self.outcomes.items()}


# -- the client half of the driver contract ----------------------------------------------------


class ClientDriver(Driver):
    """core_helpers' Driver plus client sockets: bytes the client wrote wait in its "kernel"
    buffer and are read (one read each time) only while the core ``wants_read``; a "full"
    socket takes no replies (``flushed(False)``) until :meth:`unblock`."""

    def __init__(self, *targets: Any, plc: ScriptedPlc | None = None) -> None:
        super().__init__(*targets, plc=plc)
        self.kernel: dict[ClientConn, bytearray] = {}
        self.full: set[ClientConn] = set()
        self.held: dict[ClientConn, list[bytes]] = {}  # replies written while the socket is full
        self.stopped: set[ClientConn] = set()  # closing: the driver did its last write
        self.most_waiting = 0  # most replies the core had waiting at one write

    def open(self, decider: Decider | None = None, *, max_pipelined: int = 8,
             idle_timeout: float = 300.0, request_complete_timeout: float = 5.0) -> ClientConn:
        conn = ClientConn(decider or Decider(), self.router, max_pipelined=max_pipelined,
                          idle_timeout=idle_timeout,
                          request_complete_timeout=request_complete_timeout, now=self.now)
        self.kernel[conn] = bytearray()
        self.client_out[conn] = []
        return conn

    # inputs from the client

    def write(self, conn: ClientConn, *chunks: bytes) -> None:
        """The client writes ``chunks``, one after the other (each its own socket read while the
        core reads)."""
        for chunk in chunks:
            self.kernel[conn] += chunk
            self._read(conn)

    def feed(self, conn: ClientConn, data: bytes, *, tls_partial: bool = False) -> None:
        """One read straight into the core (``tls_partial``: a TLS record is still partial)."""
        conn.raw_received(self.now)
        if data:
            conn.receive(data, self.now)
        conn.settled(tls_partial, self.now)
        self.drain()

    def _read(self, conn: ClientConn) -> None:
        buf = self.kernel[conn]
        if buf and conn.wants_read and not conn.closing:
            data = bytes(buf)
            buf.clear()
            self.feed(conn, data)

    def drain(self) -> None:
        super().drain()
        for conn, buf in list(self.kernel.items()):
            if buf and conn.wants_read and not conn.closing:
                self._read(conn)

    def unblock(self, conn: ClientConn) -> None:
        """The client reads its socket again: the driver's EPOLLOUT flush."""
        self.full.discard(conn)
        self._client_write(conn)
        self.drain()

    # outputs to the client

    def _client_write(self, client: Any) -> None:
        conn: ClientConn = client
        conn.queued = False
        self.most_waiting = max(self.most_waiting, len(conn.replies))
        if conn in self.stopped:  # no more socket I/O
            conn.replies.clear()
            return
        if conn in self.full:
            self.held.setdefault(conn, []).extend(conn.replies)
            conn.replies.clear()
            all_written = False
        else:
            self.client_out[conn] += self.held.pop(conn, [])
            self.client_out[conn] += conn.replies
            conn.replies.clear()
            all_written = True
        if not conn.closing:
            conn.flushed(all_written, self.now)
        if conn.closing:
            self.stopped.add(conn)

    def got(self, conn: ClientConn) -> list[tuple[int, int, bytes]]:
        """What the client received: (tid, unit, pdu) per reply; each write one whole ADU."""
        out = []
        for data in self.client_out[conn]:
            tid, pid, length, unit = struct.unpack(">HHHB", data[:7])
            assert pid == 0 and len(data) == 6 + length, f"not one whole ADU: {data.hex()}"
            out.append((tid, unit, data[7:]))
        return out


def manual_plc() -> ScriptedPlc:
    """A PLC the test answers itself (:meth:`Driver.answer`)."""
    return ScriptedPlc(answer=None)


def one_link(**kw: Any) -> Any:
    """One PLC connection taking up to 8 requests at once, units 1 and 2."""
    return plc_target(**{"pool_size": 1, "depth": 8, "unit_ids": frozenset({1, 2}), **kw})


def at_plc(d: Driver) -> list[PlcRequest]:
    return d.plc.requests


def addresses(reqs: list[PlcRequest]) -> list[int]:
    return [struct.unpack(">H", r.pdu[1:3])[0] for r in reqs]


def warm_up(d: ClientDriver, conn: ClientConn, tid: int = 100) -> None:
    """One request answered: the PLC link is open, the next request is sent at once."""
    d.write(conn, adu(tid, 1, read_pdu(99)))
    d.answer_all()
    assert d.got(conn)[-1][0] == tid


# -- framing ------------------------------------------------------------------------------------

BAD_FRAMES = {  # what the client sends -> the close reason
    "protocol_id_7": (bytes.fromhex("0002 0007 0006 01") + read_pdu(0), "bad_protocol_id"),
    "length_1": (bytes.fromhex("0002 0000 0001 01"), "bad_length"),  # no function code
    "length_255": (bytes.fromhex("0002 0000 00ff 01") + read_pdu(0), "bad_length"),
}


@pytest.mark.parametrize("bad", sorted(BAD_FRAMES))
def test_a_framing_error_closes_the_connection_and_nothing_after_it_is_forwarded(
    bad: str,
) -> None:
    good = adu(1, 1, read_pdu(5))
    after = adu(3, 1, read_pdu(6))
    frame, reason = BAD_FRAMES[bad]
    stream = good + frame + after
    for chunks in splits(stream):
        d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
        decider = Decider()
        conn = d.open(decider)
        d.write(conn, *chunks)
        assert conn.closing and conn.close_reason == reason, chunks
        assert decider.framing == [reason], chunks
        assert not conn.broken  # the TLS stream itself is fine: a clean close_notify
        # the good request got one outcome: its reply if it was answered before the bad
        # frame arrived, else withdrawn before it was sent
        outcomes = decider.one_outcome_each()
        assert set(outcomes) == {1} and outcomes[1] in ("reply", "client_gone"), chunks
        assert addresses(at_plc(d)) == ([5] if outcomes[1] == "reply" else []), chunks
        assert d.got(conn) == ([(1, 1, fc03_reply(1, read_pdu(5)))]
                               if outcomes[1] == "reply" else []), chunks
        assert conn.released and not conn.wants_read


def test_a_framing_error_with_a_request_at_the_plc_audits_it_and_sends_no_reply() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider)
    d.write(conn, adu(1, 1, read_pdu(5)))
    [req] = at_plc(d)
    d.write(conn, BAD_FRAMES["protocol_id_7"][0])
    assert conn.closing and not conn.released  # its request is still at the PLC
    d.answer(req)
    assert decider.one_outcome_each() == {1: "reply"}  # what reached the PLC is audited
    assert d.got(conn) == [] and conn.released


def test_a_request_that_breaks_the_connection_closes_it_with_the_deciders_reason() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    decider = Decider()
    decider.close_on = 2
    conn = d.open(decider)
    warm_up(d, conn)
    d.write(conn, adu(1, 1, read_pdu(1)) + adu(2, 1, read_pdu(2)) + adu(3, 1, read_pdu(3)))
    assert conn.closing and conn.close_reason == "bad_request"
    assert decider.one_outcome_each() == {100: "reply", 1: "reply", 2: "closed"}  # 3 not taken
    assert addresses(at_plc(d)) == [99, 1]


# -- pipelining and reply order ----------------------------------------------------------------


def test_pipelined_requests_split_at_every_offset_each_get_their_own_reply() -> None:
    reqs = [(0xBEEF, 2, read_pdu(7, 2)), (2, 1, read_pdu(3)), (3, 1, write_pdu(4, 9)),
            (4, 1, read_pdu(DENIED_FROM)), (5, 1, read_pdu(0, 0))]  # denied; quantity 0
    stream = b"".join(adu(*r) for r in reqs)
    expected = {  # tid -> (unit, pdu); the answers made at once come first
        0xBEEF: (2, fc03_reply(2, read_pdu(7, 2))),
        2: (1, fc03_reply(1, read_pdu(3))),
        3: (1, write_pdu(4, 9)),
        4: (1, bytes([0x83, 0x01])),
        5: (1, bytes([0x83, 0x03])),
    }
    for chunks in splits(stream):
        d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
        decider = Decider()
        conn = d.open(decider)
        d.write(conn, *chunks)
        got = d.got(conn)
        assert {t: (u, p) for t, u, p in got} == expected and len(got) == 5, chunks
        assert decider.one_outcome_each() == {
            0xBEEF: "reply", 2: "reply", 3: "reply", 4: "denied", 5: "invalid"}
        # the PLC saw the proxy's own transaction ids, never the client's
        assert [r.tid for r in at_plc(d)] != [0xBEEF, 2, 3]
        assert [(r.unit, r.pdu) for r in at_plc(d)] == [(u, p) for _t, u, p in reqs[:3]]
        assert not conn.closing and conn.inflight == 0


def test_at_most_max_pipelined_requests_are_in_flight_and_reading_pauses_at_the_limit() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider, max_pipelined=2)
    d.write(conn, b"".join(adu(t, 1, read_pdu(t)) for t in range(5)))
    assert addresses(at_plc(d)) == [0, 1]  # the rest waits in the core's buffer
    assert conn.inflight == 2 and not conn.wants_read
    d.write(conn, adu(5, 1, read_pdu(5)))  # arrives while paused: stays in the socket
    assert d.kernel[conn] == adu(5, 1, read_pdu(5))
    most = 0
    while d.unanswered():
        most = max(most, len(d.unanswered()))
        d.answer(d.unanswered()[0])
    assert most == 2
    assert addresses(at_plc(d)) == [0, 1, 2, 3, 4, 5]
    assert d.got(conn) == [(t, 1, fc03_reply(1, read_pdu(t))) for t in range(6)]
    assert conn.wants_read and decider.one_outcome_each() == dict.fromkeys(range(6), "reply")


def test_replies_leave_in_completion_order() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    conn = d.open()
    d.write(conn, b"".join(adu(10 + t, 1, read_pdu(t)) for t in range(4)))
    reqs = d.unanswered()
    for i in (2, 0, 3, 1):
        d.answer(reqs[i])
    assert [tid for tid, _u, _p in d.got(conn)] == [12, 10, 13, 11]


def test_replies_made_in_one_pass_are_separate_adus() -> None:
    """Six replies that complete in one PLC read are six entries of ``replies``, each one whole
    ADU (the driver writes them in one TLS record)."""
    d = ClientDriver(one_link(), plc=manual_plc())
    conn = d.open()
    d.write(conn, b"".join(adu(t, 1, read_pdu(t, 1 + t)) for t in range(6)))
    reqs = d.unanswered()
    link = reqs[0].conn.link
    replies = b"".join(normal_answer(r) or b"" for r in reqs)
    d.most_waiting = 0
    d.reply(link, replies)  # all six in one read
    assert d.most_waiting == 6  # made in one pass, written together
    got = d.got(conn)  # one whole ADU per entry
    assert [(t, p) for t, _u, p in got] == [(t, fc03_reply(1, read_pdu(t, 1 + t)))
                                            for t in range(6)]


def test_replies_completed_while_the_socket_is_full_wait_in_completion_order() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider)
    d.write(conn, b"".join(adu(t, 1, read_pdu(t)) for t in range(4)))
    reqs = d.unanswered()
    d.full.add(conn)  # the socket stops taking data
    d.answer(reqs[0])
    assert conn.blocked and not conn.wants_read  # no new requests while replies wait
    for i in (3, 1, 2):
        d.answer(reqs[i])
    assert d.got(conn) == []
    d.write(conn, adu(9, 1, read_pdu(9)))
    assert addresses(at_plc(d)) == [0, 1, 2, 3]  # not read while blocked
    d.unblock(conn)
    assert [t for t, _u, _p in d.got(conn)][:4] == [0, 3, 1, 2]
    assert conn.bytes_out >= 4 * 11
    assert addresses(at_plc(d)) == [0, 1, 2, 3, 9]  # reading resumed


# -- replies made at once are bounded ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["no_route", "denied"])
def test_requests_answered_at_once_are_all_answered_with_a_bounded_backlog(kind: str) -> None:
    """600 pipelined requests answered without a PLC (0x0A: no target for unit 7; or denied
    by the policy): no recursion through the router, every one answered once, and never more
    than about max_pipelined replies wait to be written (the bound, whatever ``n``)."""
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider, max_pipelined=8)
    n = 600
    if kind == "no_route":
        stream = b"".join(adu(i, 7, read_pdu(0)) for i in range(n))
        answer, outcome = bytes([0x83, 0x0A]), "no_route"
    else:
        stream = b"".join(adu(i, 1, read_pdu(DENIED_FROM)) for i in range(n))
        answer, outcome = bytes([0x83, 0x01]), "denied"
    d.write(conn, stream)
    assert d.got(conn) == [(i, 7 if kind == "no_route" else 1, answer) for i in range(n)]
    assert decider.one_outcome_each() == dict.fromkeys(range(n), outcome)
    assert 0 < d.most_waiting < 2 * 8  # waiting ones, plus the ones in flight finishing
    assert at_plc(d) == [] and conn.inflight == 0 and conn.wants_read


def test_at_most_max_pipelined_replies_wait_to_be_written() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    conn = d.open(max_pipelined=8)
    d.write(conn, b"".join(adu(i, 7, read_pdu(0)) for i in range(40)))  # no route: 0x0A
    assert len(d.got(conn)) == 40
    assert d.most_waiting <= 8


def test_a_client_whose_socket_is_full_gets_no_new_requests_started() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    decider = Decider()
    conn = d.open(decider, max_pipelined=4)
    d.full.add(conn)
    d.write(conn, b"".join(adu(t, 1, read_pdu(t)) for t in range(40)))
    started = len(at_plc(d))
    assert started <= 2 * 4  # the replies that wait, and those in flight
    assert conn.blocked and not conn.wants_read
    d.unblock(conn)
    assert [t for t, _u, _p in d.got(conn)] == list(range(40))
    assert decider.one_outcome_each() == dict.fromkeys(range(40), "reply")


# -- drain ---------------------------------------------------------------------------------------


def test_stop_reading_lets_the_request_in_flight_finish_then_closes() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider, max_pipelined=1)
    d.write(conn, adu(7, 1, read_pdu(4)) + adu(8, 1, read_pdu(5)))  # 8 waits in the buffer
    [req] = d.unanswered()
    conn.stop_reading("server_shutdown")
    d.drain()
    assert not conn.closing and not conn.wants_read and conn.inflight == 1
    d.answer(req)
    assert d.got(conn) == [(7, 1, fc03_reply(1, read_pdu(4)))]
    assert conn.closing and conn.released and conn.close_reason == "server_shutdown"
    assert decider.one_outcome_each() == {7: "reply"}  # 8 was never started
    assert addresses(at_plc(d)) == [4]


def test_stop_reading_with_nothing_in_flight_closes_at_once() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    conn = d.open()
    conn.stop_reading("server_shutdown")
    assert conn.closing and conn.released and conn.close_reason == "server_shutdown"


# -- idle timeout and stall limit ----------------------------------------------------------------


def test_idle_timeout_spares_a_connection_with_a_request_in_flight() -> None:
    d = ClientDriver(one_link(request_timeout=10.0), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider, idle_timeout=0.2)
    d.write(conn, adu(3, 1, read_pdu(1)))
    d.run_until(0.5)  # more than two idle periods with the PLC silent
    assert not conn.closing
    d.answer(d.unanswered()[0])
    assert d.got(conn) == [(3, 1, fc03_reply(1, read_pdu(1)))]
    assert not conn.closing
    d.run_until(0.7)  # silent, nothing in flight: closed by the next check
    assert conn.closing and conn.close_reason == "idle_timeout" and conn.released
    assert decider.one_outcome_each() == {3: "reply"}


def test_idle_timeout_closes_a_silent_connection_counted_from_its_last_byte() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(idle_timeout=1.0)
    d.run_until(0.6)
    d.write(conn, adu(1, 1, read_pdu(1)))
    d.run_until(1.59)
    assert not conn.closing
    d.run_until(1.6)
    assert conn.closing and conn.close_reason == "idle_timeout"
    assert not conn.broken


def test_a_client_that_stops_taking_its_replies_is_closed_after_idle_timeout() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    decider = Decider()
    conn = d.open(decider, idle_timeout=0.3)
    d.full.add(conn)
    d.write(conn, adu(1, 1, read_pdu(0)))
    assert conn.blocked
    d.run_until(0.29)
    assert not conn.closing
    d.run_until(0.3)
    assert conn.closing and conn.close_reason == "client_stalled"
    assert conn.broken  # replies half-written: no clean TLS close can follow
    assert conn.released and decider.one_outcome_each() == {1: "reply"}


def test_a_client_that_takes_its_replies_again_in_time_is_not_closed() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(idle_timeout=0.3)
    d.full.add(conn)
    d.write(conn, adu(1, 1, read_pdu(0)))
    d.run_until(0.25)
    d.unblock(conn)
    d.write(conn, adu(2, 1, read_pdu(0)))  # not idle either
    d.run_until(0.5)
    assert not conn.closing
    assert [t for t, _u, _p in d.got(conn)] == [1, 2]


def test_cancelled_stall_timers_do_not_pile_up_in_the_timer_heap() -> None:
    """A socket that fills and drains over and over schedules and cancels a stall timer each
    time; cancelled timers are swept once the heap doubles, so it stays bounded."""
    d = ClientDriver(one_link(), plc=manual_plc())
    conn = d.open(idle_timeout=300.0)
    live = [d.timers.at(300.0, lambda now: None) for _ in range(100)]
    for _ in range(10 * COMPACT_MIN):
        conn.flushed(False, d.now)  # the socket filled ...
        conn.flushed(True, d.now)  # ... and drained
    assert len(d.timers) <= 2 * COMPACT_MIN
    assert all(t.fn is not None for t in live)  # live timers are kept
    d.timers.compact()
    assert len(d.timers) == len(live) + 1  # and the idle timer
    assert d.timers.next_deadline() == 300.0
    assert not conn.closing


# -- the request-completion deadline -------------------------------------------------------------

REQUEST = adu(9, 1, read_pdu(5))  # 12 bytes


def test_a_trickled_request_is_closed_as_incomplete() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    decider = Decider()
    conn = d.open(decider, request_complete_timeout=5.0)
    for i, byte in enumerate(REQUEST):
        d.run_until(float(i))  # one byte a second: never idle, never complete in time
        if conn.closing:
            break
        d.write(conn, bytes([byte]))
    assert conn.closing and conn.close_reason == "request_incomplete"
    assert d.now == 5.0  # five seconds after the first byte
    assert decider.framing == ["request_incomplete"] and conn.broken
    assert at_plc(d) == [] and decider.outcomes == {}


@pytest.mark.parametrize("cut", range(1, len(REQUEST)))
def test_a_half_sent_request_is_closed_at_the_deadline_and_not_before(cut: int) -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(request_complete_timeout=5.0)
    d.run_until(1.0)
    d.write(conn, REQUEST[:cut])
    d.run_until(5.99)
    assert not conn.closing
    d.run_until(6.0)
    assert conn.closing and conn.close_reason == "request_incomplete"


@pytest.mark.parametrize("cut", range(1, len(REQUEST)))
def test_a_request_completed_within_the_deadline_is_served(cut: int) -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(request_complete_timeout=5.0)
    d.write(conn, REQUEST[:cut])
    d.run_until(4.99)
    d.write(conn, REQUEST[cut:])
    d.run_until(20.0)
    assert not conn.closing and d.got(conn) == [(9, 1, fc03_reply(1, read_pdu(5)))]


def test_a_partial_tls_record_counts_toward_the_deadline() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(request_complete_timeout=5.0)
    d.run_until(1.0)
    d.feed(conn, b"", tls_partial=True)  # ciphertext arrived, no whole record yet
    d.run_until(5.99)
    assert not conn.closing
    d.run_until(6.0)
    assert conn.closing and conn.close_reason == "request_incomplete"


def test_the_deadline_counts_from_the_first_byte_after_the_previous_complete_request() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(request_complete_timeout=5.0)
    d.write(conn, adu(1, 1, read_pdu(1)))  # complete at 0
    d.run_until(4.0)
    d.write(conn, REQUEST[:3])  # the next request starts at 4
    d.run_until(8.99)
    assert not conn.closing
    d.run_until(9.0)
    assert conn.closing and conn.close_reason == "request_incomplete"


def test_the_deadline_of_a_request_that_arrives_with_the_end_of_the_previous_one() -> None:
    """Request A starts at 0 and is completed at 3 by a read that also brings the start of B:
    B's deadline counts from 3, not from A's first byte."""
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(request_complete_timeout=5.0)
    a = adu(1, 1, read_pdu(1))
    d.write(conn, a[:4])
    d.run_until(3.0)
    d.write(conn, a[4:] + REQUEST[:5])
    assert d.got(conn) == [(1, 1, fc03_reply(1, read_pdu(1)))]
    d.run_until(7.99)
    assert not conn.closing  # A's deadline (5) has passed without closing
    d.run_until(8.0)
    assert conn.closing and conn.close_reason == "request_incomplete"


def test_an_idle_client_with_nothing_partial_is_not_closed_by_the_request_deadline() -> None:
    d = ClientDriver(one_link(), plc=ScriptedPlc(normal_answer))
    conn = d.open(idle_timeout=300.0, request_complete_timeout=5.0)
    for t in range(3):
        d.run_until(float(t))
        d.write(conn, adu(t, 1, read_pdu(t)))
    d.run_until(200.0)
    assert not conn.closing and len(d.got(conn)) == 3


def test_requests_paused_by_the_pipelining_limit_are_not_incomplete() -> None:
    """Whole requests waiting in the core's buffer (the pipelining limit) are not a request
    still arriving: a slow PLC does not make the client look like a trickler."""
    d = ClientDriver(one_link(request_timeout=30.0), plc=manual_plc())
    conn = d.open(max_pipelined=1, request_complete_timeout=5.0)
    d.write(conn, adu(1, 1, read_pdu(1)) + adu(2, 1, read_pdu(2)))
    d.run_until(12.0)
    assert not conn.closing
    d.answer_all()
    d.answer_all()
    assert [t for t, _u, _p in d.got(conn)] == [1, 2]


# -- the client goes away --------------------------------------------------------------------------


def test_requests_waiting_for_a_link_are_withdrawn_when_the_client_goes() -> None:
    """One link of depth 1: the client's first request is at the PLC, two more wait for the
    slot. The client's socket breaks (the driver aborts it): the waiting two are withdrawn
    (audited as client_gone, never sent), the one at the PLC is audited when its reply comes,
    and the connection is handed back only then."""
    d = ClientDriver(one_link(depth=1), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider)
    d.write(conn, b"".join(adu(t, 1, write_pdu(t, t)) for t in (8, 9, 10)))
    [req] = d.unanswered()
    conn.receive_eof("client_reset", d.now, broken=True)
    conn.abort("client_reset")  # what the driver does when the socket hangs up
    d.drain()
    assert conn.closing and not conn.released and conn.close_reason == "client_reset"
    assert decider.outcomes == {9: ["client_gone"], 10: ["client_gone"]}
    d.answer(req)
    assert decider.one_outcome_each() == {8: "reply", 9: "client_gone", 10: "client_gone"}
    assert addresses(at_plc(d)) == [8] and d.got(conn) == []
    assert conn.released and conn.inflight == 0
    d.run_until(30.0)
    assert addresses(at_plc(d)) == [8]  # never sent later


def test_a_client_that_half_closes_still_gets_its_replies() -> None:
    d = ClientDriver(one_link(depth=1), plc=manual_plc())
    decider = Decider()
    conn = d.open(decider)
    d.write(conn, adu(1, 1, read_pdu(1)) + adu(2, 1, read_pdu(2)))
    conn.receive_eof("client_closed", d.now)
    d.drain()
    assert not conn.closing
    d.answer_all()
    d.answer_all()
    assert [t for t, _u, _p in d.got(conn)] == [1, 2]
    assert conn.closing and conn.released and conn.close_reason == "client_closed"
    assert decider.one_outcome_each() == {1: "reply", 2: "reply"}


# -- a bug in the policy side costs the connection, never a hang ---------------------------------


def test_an_exception_while_deciding_leaves_no_request_counted_in_flight() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    decider.raise_in_decide = 2
    conn = d.open(decider)
    warm_up(d, conn)
    with pytest.raises(RuntimeError, match="while deciding"):
        d.write(conn, adu(1, 1, read_pdu(1)) + adu(2, 1, read_pdu(2)))
    assert conn.inflight == 1  # request 1 only: the failed one is not counted
    conn.abort("internal_error")  # the driver contains the bug: it closes the connection
    d.drain()
    assert conn.closing and not conn.released  # request 1 is at the PLC
    d.answer_all()
    assert conn.released and decider.one_outcome_each() == {100: "reply", 1: "reply"}


def test_an_exception_while_completing_still_releases_the_connection() -> None:
    d = ClientDriver(one_link(), plc=manual_plc())
    decider = Decider()
    decider.raise_in_complete = 1
    conn = d.open(decider)
    warm_up(d, conn)
    d.write(conn, adu(1, 1, read_pdu(1)) + adu(2, 1, read_pdu(2)))
    first, second = d.unanswered()
    with pytest.raises(RuntimeError, match="while completing"):
        d.answer(first)
    conn.abort("internal_error")  # what the driver does with a bug in ``finished``
    d.drain()
    assert conn.inflight == 1 and not conn.released
    d.answer(second)
    assert conn.released and conn.inflight == 0
    assert decider.one_outcome_each() == {100: "reply", 1: "reply", 2: "reply"}
