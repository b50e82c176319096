"""One PLC as a state machine (``mbsec.path.target.Target``), sans-IO.

Bytes and ``now`` go in, the outbox is drained by :class:`path.core_helpers.Driver`; the
clock is a number (``d.now``), timers fire through ``timers.run_due(now)``. No socket, no trio,
no sleep. These tests replace the trio pool's ``tests/test_upstream.py``; a test whose behaviour
changed under the availability rules (docs/config.md) says so in a ``NEW RULE`` comment.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from mbsec.modbus.pdu import ExceptionResponse
from mbsec.path.exchange import DONE, SENT, WAITING, Exchange
from mbsec.path.link import CONNECTING, IDLE, OPEN
from mbsec.path.plc import UpstreamTarget
from path.core_helpers import (
    HEADER,
    Driver,
    FakeClient,
    PlcRequest,
    ScriptedPlc,
    adu,
    fc03_reply,
    make_exchange,
    normal_answer,
    plc_target,
    read_pdu,
    registers,
    splits,
    value,
    write_pdu,
)


def silent(**kw: Any) -> Driver:
    """A driver whose PLC accepts connects and answers nothing unless the test says so."""
    return Driver(plc_target(**kw), plc=ScriptedPlc(None))


def error(ex: Exchange) -> Any:
    assert ex.state == DONE and ex.error is not None, (ex.state, ex.reply)
    return ex.error


def ok(ex: Exchange) -> list[int]:
    assert ex.state == DONE and ex.error is None and ex.reply is not None, ex.error
    return registers(ex.reply.pdu)


def closes(d: Driver) -> list[tuple[int, int]]:
    return [(link.index, gen) for kind, link, gen in d.actions if kind == "close"]


class Sequential(FakeClient):
    """A client that sends its next request when the previous one finished (a poller)."""

    def __init__(self, d: Driver, key: str, pdus: list[bytes]) -> None:
        super().__init__(key)
        self.d = d
        self.todo = list(pdus)

    def start(self) -> None:
        self.d.send(self, self.todo.pop(0))

    def finished(self, ex: Exchange, now: float) -> None:
        super().finished(ex, now)
        if self.todo:  # inside the driver's drain, as ClientConn.finished does
            self.d.router.submit(make_exchange(self, 1, 1, self.todo.pop(0), now), now)


# -- a good PLC ----------------------------------------------------------------------------------


def test_reads_writes_fc16_and_exception_replies() -> None:
    def plc(req: PlcRequest) -> bytes | None:
        if req.pdu[0] == 16:
            return adu(req.tid, req.unit, req.pdu[:5])
        if req.pdu[0] == 3 and struct.unpack(">H", req.pdu[1:3])[0] >= 1999:
            return adu(req.tid, req.unit, b"\x83\x02")
        return normal_answer(req)

    d = Driver(plc_target(), plc=ScriptedPlc(plc))
    c = FakeClient()
    assert ok(d.send(c, read_pdu(10, 3))) == [value(1, 10), value(1, 11), value(1, 12)]
    w = d.send(c, write_pdu(5, 4242))
    assert w.reply is not None and w.reply.pdu == write_pdu(5, 4242)
    fc16 = struct.pack(">BHHB3H", 16, 20, 3, 6, 7, 8, 9)
    r16 = d.send(c, fc16)
    assert r16.reply is not None and r16.reply.pdu == struct.pack(">BHH", 16, 20, 3)
    # an exception reply is a valid answer, not a failure of the PLC
    exc = d.send(c, read_pdu(1999, 10))
    assert exc.reply is not None and isinstance(exc.reply.response, ExceptionResponse)
    assert exc.reply.pdu == b"\x83\x02" and exc.reply.target == "plc1"
    assert [ex for ex, _ in c.outcomes] == [d.finished[0], w, r16, exc]
    assert d.metrics.count("mbsec_upstream_connects_total", target="plc1") == 1
    assert d.metrics.count("mbsec_upstream_failures_total") == 0
    assert [n for n, _, _ in d.metrics.observed] == ["mbsec_upstream_request_seconds"] * 4
    assert d.log.actions() == ["upstream-connect"]
    connect = d.log.of("upstream-connect")[0]
    assert connect["destination.ip"] == "192.0.2.10" and connect["destination.port"] == 502
    assert connect["mbsec.target"] == "plc1" and connect["mbsec.connection"] == 0


def test_unit_rewrite_out_and_reply_checked_against_the_plc_unit() -> None:
    d = Driver(plc_target(unit_ids=frozenset({1, 9}), unit_rewrite={9: 1}))
    ex = d.send(FakeClient(), read_pdu(3, 1), tid=0x4242, unit=9)
    assert d.plc.requests[-1].unit == 1  # the PLC sees its own unit
    assert ok(ex) == [value(1, 3)] and ex.adu.unit_id == 9 and ex.plc_unit == 1
    # a reply that carries the client's unit instead of the PLC's is the wrong unit
    d2 = Driver(plc_target(unit_ids=frozenset({1, 9}), unit_rewrite={9: 1}),
                plc=ScriptedPlc(None))
    ex2 = d2.send(FakeClient(), read_pdu(3, 1), unit=9)
    req = d2.plc.requests[0]
    d2.answer(req, adu(req.tid, 9, fc03_reply(1, req.pdu)))
    assert error(ex2).exception_code == 0x0B
    assert d2.log.of("upstream-reset")[0]["event.reason"] == "wrong_unit"


def test_many_clients_share_the_pool_and_every_reply_reaches_its_request() -> None:
    # was: 40 trio callers x 5 reads on one pymodbus connection; NEW RULE: pool_size default 2
    d = silent(depth=1)
    clients = [Sequential(d, f"c{i}", [read_pdu(i * 10 + k, 2) for k in range(5)])
               for i in range(40)]
    for c in clients:
        c.start()
    for _ in range(500):
        if not d.answer_all():
            break
    for i, c in enumerate(clients):
        got = [ok(ex) for ex, _ in c.outcomes]
        assert got == [[value(1, i * 10 + k), value(1, i * 10 + k + 1)] for k in range(5)]
    assert d.connects == 2 and d.metrics.count("mbsec_upstream_failures_total") == 0


def test_interleaved_out_of_order_replies_reach_their_requests() -> None:
    """The PLC collects four requests and answers them in reverse: tids route every reply."""
    d = silent(depth=4, pool_size=1)
    clients = [Sequential(d, f"c{i}", [read_pdu(1000 + i * 4 + k) for k in range(4)])
               for i in range(8)]
    for c in clients:
        c.start()
    peak = 0
    while d.unanswered():
        peak = max(peak, len(d.unanswered()))
        batch = d.unanswered()[:4]
        for req in reversed(batch):
            d.answer(req)
    for i, c in enumerate(clients):
        assert [ok(ex) for ex, _ in c.outcomes] == [[value(1, 1000 + i * 4 + k)]
                                                   for k in range(4)]
    assert d.connects == 1 and peak == 4


def test_depth_limits_requests_in_flight_per_link_and_the_pool_grows_to_its_size() -> None:
    d = silent(depth=3, pool_size=2)
    clients = [Sequential(d, f"c{i}", [read_pdu(i * 3 + k) for k in range(3)])
               for i in range(20)]
    for c in clients:
        c.start()
    peaks = [0, 0]
    while d.unanswered():
        for link in d.target().links:
            assert link.busy <= 3
            peaks[link.index] = max(peaks[link.index], link.busy)
        d.answer_all()
    assert d.connects == 2  # the pool grew to its size and no further
    assert peaks == [3, 3]
    for i, c in enumerate(clients):
        assert [ok(ex) for ex, _ in c.outcomes] == [[value(1, i * 3 + k)] for k in range(3)]


def test_each_request_queues_one_whole_adu_with_its_own_tid() -> None:
    # was: one send_all per ADU on a trio stream; the core queues whole ADUs in link.out
    d = silent(depth=4, pool_size=1)
    d.plc.reading = False
    d.send(FakeClient(), read_pdu(0, 5))  # connects the link, nothing written yet
    link = d.target().links[0]
    for i in range(1, 4):
        d.send(FakeClient(f"c{i}"), read_pdu(i, 5), tid=0xBEEF)
    out = bytes(link.out)
    assert len(out) == 4 * 12 and link.queued_bytes == 48 and link.written == 0
    frames = [HEADER.unpack_from(out, 12 * i) for i in range(4)]
    assert all(pid == 0 and length == 6 and unit == 1 for _, pid, length, unit in frames)
    assert [tid for tid, _, _, _ in frames] == [1, 2, 3, 4]  # the link's ids, not the client's
    assert [ex.end for ex in link.pending.values()] == [12, 24, 36, 48]


# -- transaction ids -----------------------------------------------------------------------------


def test_link_numbers_requests_itself_and_the_reply_goes_back_to_its_request() -> None:
    d = silent(depth=2, pool_size=1)
    a = d.send(FakeClient("a"), read_pdu(1), tid=0xBEEF)
    b = d.send(FakeClient("b"), read_pdu(2), tid=0xBEEF)  # the same client tid twice
    assert [r.tid for r in d.plc.requests] == [1, 2]
    d.answer(d.plc.requests[1])
    assert ok(b) == [value(1, 2)] and a.state == SENT
    d.answer(d.plc.requests[0])
    assert ok(a) == [value(1, 1)] and a.adu.transaction_id == 0xBEEF


def test_tid_wraps_at_16_bits_and_skips_ids_still_in_use() -> None:
    d = silent(depth=3, pool_size=1)
    c = FakeClient()
    d.send(c, read_pdu(0))  # tid 1
    link = d.target().links[0]
    link.next_tid = 0xFFFF
    d.send(c, read_pdu(1))
    d.send(c, read_pdu(2))
    assert [r.tid for r in d.plc.requests] == [1, 0xFFFF, 0]
    d.answer_all()
    link.next_tid = 0xFFFF
    d.send(c, read_pdu(3))
    assert d.plc.requests[-1].tid == 0xFFFF


def test_timed_out_tid_is_not_reused_even_when_the_counter_wraps() -> None:
    """A tid answered 0x0B stays reserved, so its late reply is recognised as late instead of
    completing the request that would reuse the id."""
    # NEW RULE: the timed-out request keeps its slot, so the next one needs depth 2 here
    d = silent(depth=2, pool_size=1, request_timeout=1.0)
    a = d.send(FakeClient("a"), read_pdu(0))
    d.advance(1.0)
    assert error(a).reason == "timeout"
    link = d.target().links[0]
    link.next_tid = d.plc.requests[0].tid  # as if 65536 requests had gone by
    b = d.send(FakeClient("b"), read_pdu(200))
    late, new = d.plc.requests
    assert new.tid != late.tid
    d.answer(late)  # the late reply first: dropped, it completes nothing
    assert b.state == SENT
    d.answer(new)
    assert ok(b) == [value(1, 200)]
    assert "upstream-late-reply" in d.log.actions() and "upstream-reset" not in d.log.actions()


# -- framing: replies split at every offset ------------------------------------------------------


def test_reply_split_at_every_offset_completes_its_request() -> None:
    data = adu(1, 1, fc03_reply(1, read_pdu(7, 3)))
    for chunks in splits(data):
        d = silent()
        ex = d.send(FakeClient(), read_pdu(7, 3))
        for i, chunk in enumerate(chunks):
            assert (ex.state == SENT) == any(chunks[i:]), (chunks, i)
            d.reply(d.target().links[0], chunk)
        assert ok(ex) == [value(1, 7), value(1, 8), value(1, 9)], chunks
        assert d.log.actions() == ["upstream-connect"]


def test_two_replies_in_one_stream_split_at_every_offset() -> None:
    data = adu(2, 1, fc03_reply(1, read_pdu(20))) + adu(1, 1, fc03_reply(1, read_pdu(10)))
    for chunks in splits(data):
        d = silent(depth=2, pool_size=1)
        a = d.send(FakeClient("a"), read_pdu(10))
        b = d.send(FakeClient("b"), read_pdu(20))
        for chunk in chunks:
            d.reply(d.target().links[0], chunk)
        assert ok(a) == [value(1, 10)] and ok(b) == [value(1, 20)], chunks
        assert "upstream-reset" not in d.log.actions()


def test_a_good_reply_followed_by_garbage_in_one_read_completes_then_resets() -> None:
    data = adu(1, 1, fc03_reply(1, read_pdu(10))) + b"\xde\xad\xbe\xef\x00\x05\x01\x03\x02\x00\x01"
    for chunks in splits(data):
        d = silent(depth=2, pool_size=1)
        a = d.send(FakeClient("a"), read_pdu(10))
        b = d.send(FakeClient("b"), read_pdu(20))
        for chunk in chunks:
            if d.target().links[0].state == OPEN:
                d.reply(d.target().links[0], chunk)
        assert ok(a) == [value(1, 10)], chunks
        assert error(b).reason == "upstream_reset", chunks
        assert [e["event.reason"] for e in d.log.of("upstream-reset")] == ["bad_frame"]


# -- replies that do not fit reset the link ------------------------------------------------------


def _bad_reply(kind: str, req: PlcRequest) -> bytes:
    tid, unit, pdu = req.tid, req.unit, req.pdu
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
#: reasons that name the request (by tid) and so blame its client
BLAMED = {"wrong_unit", "wrong_function", "wrong_byte_count"}


@pytest.mark.parametrize("kind", sorted(RESET_REASONS))
def test_bad_reply_resets_the_link_fails_what_is_on_it_and_reconnects_at_once(kind: str) -> None:
    # NEW RULE: the reconnect is immediate (the old pool answered 0x0A backoff first)
    data_for: list[bytes] = []
    d = silent(depth=2, pool_size=1)
    a = d.send(FakeClient("a"), read_pdu(0, 2))
    b = d.send(FakeClient("b"), read_pdu(10, 2))
    first = d.plc.requests[0]
    data_for.append(_bad_reply(kind, first))
    d.reply(first.conn, data_for[0])
    for ex in (a, b):
        assert error(ex).exception_code == 0x0B and ex.error.reason == "upstream_reset"
    [reset] = d.log.of("upstream-reset")
    assert reset["event.reason"] == RESET_REASONS[kind] and reset["error.message"]
    assert reset["level"] == "warning" and reset["mbsec.pending"] == 2  # both failed by it
    assert reset.get("mbsec.blamed") == ("a" if kind in BLAMED else None)
    assert d.metrics.count("mbsec_upstream_failures_total", reason=RESET_REASONS[kind]) == 1
    assert closes(d) == [(0, 0)] and first.conn.closed
    # at once, same instant: no backoff, a new connection
    c = d.send(FakeClient("c"), read_pdu(30, 2))
    d.answer_all()
    assert ok(c) == [value(1, 30), value(1, 31)]
    assert d.connects == 2 and len(d.plc.conns) == 2


@pytest.mark.parametrize("kind", sorted(RESET_REASONS))
def test_bad_reply_split_at_every_offset_resets_once(kind: str) -> None:
    probe = silent(depth=2, pool_size=1)
    probe.send(FakeClient("a"), read_pdu(0, 2))
    data = _bad_reply(kind, probe.plc.requests[0])
    for chunks in splits(data):
        d = silent(depth=2, pool_size=1)
        a = d.send(FakeClient("a"), read_pdu(0, 2))
        b = d.send(FakeClient("b"), read_pdu(10, 2))
        link = d.target().links[0]
        for chunk in chunks:
            if link.state == OPEN:
                d.reply(link, chunk)
        assert a.state == DONE and b.state == DONE, chunks
        assert [e["event.reason"] for e in d.log.of("upstream-reset")] == [RESET_REASONS[kind]]


def test_a_bad_reply_costs_only_the_link_it_came_on() -> None:
    d = silent(depth=1, pool_size=2)
    bad = d.send(FakeClient("bad"), read_pdu(1))
    good = d.send(FakeClient("good"), read_pdu(2))
    r_bad, r_good = d.plc.requests
    assert r_bad.conn.link is not r_good.conn.link
    d.answer(r_bad, _bad_reply("wrong_unit", r_bad))
    assert error(bad).exception_code == 0x0B and good.state == SENT
    d.answer(r_good)
    assert ok(good) == [value(1, 2)]


def test_write_whose_link_drops_is_not_retried() -> None:
    d = silent()
    w = d.send(FakeClient(), write_pdu(3, 99))
    d.plc_closes(d.plc.requests[0].conn, "eof", "connection closed by the PLC")
    assert error(w).exception_code == 0x0B and w.error.reason == "connection_lost"
    assert [e["event.reason"] for e in d.log.of("upstream-reset")] == ["eof"]
    r = d.send(FakeClient(), read_pdu(3))
    d.answer_all()
    d.advance(5.0)
    assert ok(r) == [value(1, 3)]
    writes = [req.pdu for req in d.plc.requests if req.pdu[0] == 6]
    assert writes == [write_pdu(3, 99)]  # sent once, never again
    assert len(d.plc.conns) == 2


def test_eof_on_an_idle_link_is_quiet_and_reconnects_on_demand() -> None:
    d = silent(resets_before_backoff=0)
    a = d.send(FakeClient(), read_pdu(1))
    d.answer_all()
    assert ok(a) == [value(1, 1)]
    d.plc_closes(d.plc.conns[0])
    [reset] = d.log.of("upstream-reset")
    assert reset["event.reason"] == "eof" and reset["level"] == "info"
    assert reset["mbsec.pending"] == 0
    assert d.target().resets == []  # an idle close counts toward nothing
    b = d.send(FakeClient(), read_pdu(2))
    d.answer_all()
    assert ok(b) == [value(1, 2)] and d.connects == 2


def test_reports_about_an_older_socket_are_ignored() -> None:
    d = silent(pool_size=1)
    a = d.send(FakeClient("a"), read_pdu(1))
    link = d.target().links[0]
    old = link.gen
    d.answer(d.plc.requests[0], _bad_reply("wrong_unit", d.plc.requests[0]))
    assert error(a).reason == "upstream_reset" and link.gen == old + 1 and link.state == IDLE
    t = d.target()
    t.connected(link, old, d.now)
    t.closed(link, old, "eof", "late report", d.now)
    t.connect_failed(link, old, "connect_failed", "late report", d.now)
    d.drain()
    assert link.state == IDLE and d.log.actions() == ["upstream-connect", "upstream-reset"]
    assert t.retry_at == 0.0


# -- connects, connect deadline, backoff ----------------------------------------------------------


def test_plc_down_fails_fast_then_backs_off_then_recovers() -> None:
    d = Driver(plc_target(), plc=ScriptedPlc(normal_answer, connect="refuse"))
    a = d.send(FakeClient(), read_pdu(0))
    assert error(a).exception_code == 0x0A and a.error.reason == "connect_failed"
    assert d.plc.connect_attempts == 1
    [failed] = d.log.of("upstream-connect-failed")
    assert failed["error.message"] and failed["destination.port"] == 502
    assert failed["event.reason"] == "connect_failed" and failed["mbsec.backoff"] == 0.2
    # in backoff: fail fast without dialing, even once the PLC is back
    d.plc.connect = "accept"
    d.advance(0.1)
    b = d.send(FakeClient(), read_pdu(0))
    assert error(b).exception_code == 0x0A and b.error.reason == "backoff"
    assert d.plc.connect_attempts == 1
    assert d.metrics.count("mbsec_upstream_failures_total", reason="backoff") == 1
    d.advance(0.1)
    c = d.send(FakeClient(), read_pdu(4))
    assert ok(c) == [value(1, 4)] and d.plc.connect_attempts == 2
    assert d.log.actions()[-1] == "upstream-connect"


def test_backoff_doubles_up_to_max() -> None:
    # binary-exact times (0.25 + 0.5 is 0.75 exactly; 0.2 + 0.4 is not 0.6)
    d = Driver(plc_target(backoff_initial=0.25, backoff_max=0.75),
               plc=ScriptedPlc(normal_answer, connect="refuse"))

    def attempt() -> str:
        ex = d.send(FakeClient(), read_pdu(0))
        return str(error(ex).reason)

    assert attempt() == "connect_failed"  # t=0, next try at 0.25
    d.run_until(0.24)
    assert attempt() == "backoff"
    d.run_until(0.25)
    assert attempt() == "connect_failed"  # t=0.25, next at 0.75
    d.run_until(0.74)
    assert attempt() == "backoff"
    d.run_until(0.75)
    assert attempt() == "connect_failed"  # t=0.75, next at 1.5 (capped at 0.75)
    d.run_until(1.49)
    assert attempt() == "backoff"
    d.run_until(1.5)
    assert attempt() == "connect_failed"
    assert d.plc.connect_attempts == 4
    assert d.metrics.count("mbsec_upstream_failures_total", reason="connect_failed") == 4
    assert [e["mbsec.backoff"] for e in d.log.of("upstream-connect-failed")] == [
        0.25, 0.5, 0.75, 0.75]


def test_a_good_reply_resets_the_backoff() -> None:
    d = Driver(plc_target(backoff_initial=0.25, backoff_max=5.0),
               plc=ScriptedPlc(normal_answer, connect="refuse"))
    d.send(FakeClient(), read_pdu(0))
    d.run_until(0.25)
    d.send(FakeClient(), read_pdu(0))  # the next failure would wait 1.0
    d.plc.connect = "accept"
    d.run_until(0.75)
    assert ok(d.send(FakeClient(), read_pdu(0))) == [value(1, 0)]
    d.plc_closes(d.plc.conns[0])
    d.plc.connect = "refuse"
    d.send(FakeClient(), read_pdu(0))
    assert [e["mbsec.backoff"] for e in d.log.of("upstream-connect-failed")] == [
        0.25, 0.5, 0.25]


def test_connect_deadline() -> None:
    d = Driver(plc_target(connect_timeout=3.0, request_timeout=5.0),
               plc=ScriptedPlc(normal_answer, connect="hang"))
    ex = d.send(FakeClient(), read_pdu(0))
    d.run_until(2.999)
    assert ex.state == WAITING and d.target().links[0].state == CONNECTING
    d.run_until(3.0)
    assert error(ex).exception_code == 0x0A and ex.error.reason == "connect_failed"
    assert d.finished == [ex] and ex.client.outcomes[0][1] == 3.0
    assert d.metrics.count("mbsec_upstream_failures_total", reason="connect_timeout") == 1
    assert d.log.actions() == ["upstream-connect-failed"]
    assert closes(d) == [(0, 0)]  # the driver abandons the half-open socket
    d.accept_pending()  # the PLC's very late accept is ignored
    assert d.target().links[0].state == IDLE


# -- silent and late PLCs ----------------------------------------------------------------------


def test_silent_plc_gives_0B_at_the_deadline_and_keeps_the_link() -> None:
    d = silent(request_timeout=2.0)
    ex = d.send(FakeClient(), read_pdu(0))
    d.run_until(1.999)
    assert ex.state == SENT
    d.run_until(2.0)
    assert error(ex).exception_code == 0x0B and ex.error.reason == "timeout"
    assert d.metrics.count("mbsec_upstream_failures_total", reason="timeout") == 1
    # a timeout is not a reason to drop the link (its late reply is handled by tid)
    assert d.target().links[0].state == OPEN and closes(d) == []


@pytest.mark.parametrize("b_answered", [True, False])
def test_late_reply_never_reaches_the_next_request(b_answered: bool) -> None:
    """Request A times out; the PLC answers A while B is in flight: B never gets A's reply."""
    # NEW RULE: A keeps its slot while it is owed a late reply, so B shares the link (depth 2)
    d = silent(request_timeout=1.0, depth=2, pool_size=1)
    a = d.send(FakeClient("a"), read_pdu(0))
    d.advance(1.0)
    assert error(a).reason == "timeout"
    b = d.send(FakeClient("b"), read_pdu(100))
    req_a, req_b = d.plc.requests
    d.answer(req_a)  # A, late
    assert b.state == SENT
    if b_answered:
        d.answer(req_b)
        assert ok(b) == [value(1, 100)]
    else:
        d.advance(1.0)
        assert error(b).reason == "timeout"
    [late] = d.log.of("upstream-late-reply")
    assert late["mbsec.target"] == "plc1" and late["modbus.transaction_id"] == req_a.tid
    assert d.metrics.count("mbsec_upstream_failures_total", reason="late_reply") == 1
    assert "upstream-reset" not in d.log.actions() and len(d.plc.conns) == 1
    c = d.send(FakeClient("c"), read_pdu(7))
    d.answer(d.plc.requests[-1])
    assert ok(c) == [value(1, 7)]


def test_queued_request_times_out_waiting_for_a_slot() -> None:
    d = silent(depth=1, pool_size=1, request_timeout=2.0)
    a = d.send(FakeClient("a"), read_pdu(0))
    d.advance(0.5)
    b = d.send(FakeClient("b"), read_pdu(1))  # waits for the only slot
    d.run_until(2.0)
    assert error(a).reason == "timeout" and b.state == WAITING
    d.run_until(2.5)
    assert error(b).exception_code == 0x0B and b.error.reason == "timeout"
    assert "no free slot" in b.error.message
    assert d.metrics.count("mbsec_upstream_failures_total", reason="timeout") == 2
    assert len(d.plc.requests) == 1  # B was never sent


def test_client_gone_withdraws_its_waiting_requests_only() -> None:
    # was: a cancelled trio caller; NEW: the client's sent request still gets its outcome (the
    # client conn drops it), its waiting ones are never sent
    d = silent(depth=1, pool_size=1)
    gone = FakeClient("gone")
    sent = d.send(gone, read_pdu(0))
    waiting = d.send(gone, read_pdu(1))
    other = d.send(FakeClient("other"), read_pdu(2))
    d.router.withdraw(gone)
    d.drain()
    assert error(waiting).exception_code == 0x0B and waiting.error.reason == "client_gone"
    assert sent.state == SENT and other.state == WAITING
    d.answer_all()
    d.answer_all()
    assert ok(sent) == [value(1, 0)] and ok(other) == [value(1, 2)]
    assert [r.pdu for r in d.plc.requests] == [read_pdu(0), read_pdu(2)]


# -- availability rules, one test each ---------------------------------------------------------


def test_rule_pool_size_default_is_2_and_a_slow_register_costs_only_its_reader() -> None:
    assert UpstreamTarget("p", "h", 502, frozenset({1})).pool_size == 2
    d = Driver(plc_target(), plc=ScriptedPlc(None))
    slow = d.send(FakeClient("slow"), read_pdu(500))
    fast = d.send(FakeClient("fast"), read_pdu(1))
    d.answer(d.plc.requests[1])
    assert ok(fast) == [value(1, 1)] and slow.state == SENT


def test_rule_send_timeout_resets_a_link_the_plc_stopped_reading() -> None:
    d = silent(request_timeout=1.0)
    d.plc.reading = False
    w = d.send(FakeClient("w"), write_pdu(1, 2))
    link = d.target().links[0]
    assert link.written < w.end
    d.run_until(1.0)
    assert error(w).exception_code == 0x0B and w.error.reason == "timeout"
    assert [e["event.reason"] for e in d.log.of("upstream-reset")] == ["send_timeout"]
    assert closes(d) == [(0, 0)] and link.state == IDLE and not link.out


def test_rule_send_timeout_also_for_a_half_written_adu() -> None:
    d = silent(request_timeout=1.0)
    d.plc.reading = False
    w = d.send(FakeClient("w"), write_pdu(1, 2))
    link = d.target().links[0]
    link.wrote(w.end - 1)  # the socket took all but the last byte
    d.run_until(1.0)
    assert [e["event.reason"] for e in d.log.of("upstream-reset")] == ["send_timeout"]


def test_rule_a_request_on_the_wire_times_out_without_a_reset() -> None:
    d = silent(request_timeout=1.0)
    w = d.send(FakeClient("w"), write_pdu(1, 2))
    assert d.target().links[0].written == w.end
    d.run_until(1.0)
    assert error(w).reason == "timeout" and d.log.of("upstream-reset") == []


def test_rule_timed_out_request_keeps_its_slot_in_overdue() -> None:
    d = silent(depth=1, pool_size=1, request_timeout=1.0, late_reply_wait=5.0)
    a = d.send(FakeClient("a"), read_pdu(0))
    d.run_until(1.0)
    link = d.target().links[0]
    assert error(a).reason == "timeout"
    assert list(link.overdue.values()) == [a] and a.deadline == 6.0 and link.busy == 1
    b = d.send(FakeClient("b"), read_pdu(1))
    assert b.state == WAITING and len(d.plc.requests) == 1


def test_rule_late_reply_after_0B_is_dropped_and_frees_the_slot() -> None:
    d = silent(depth=1, pool_size=1, request_timeout=1.0)
    a = d.send(FakeClient("a"), read_pdu(0))
    d.run_until(1.0)
    b = d.send(FakeClient("b"), read_pdu(1))
    assert b.state == WAITING
    d.answer(d.plc.requests[0])  # the late reply
    link = d.target().links[0]
    assert a.reply is None and error(a).reason == "timeout"
    assert not link.overdue and b.state == SENT
    assert d.log.of("upstream-late-reply") and not d.log.of("upstream-reset")
    d.answer(d.plc.requests[1])
    assert ok(b) == [value(1, 1)]


def test_rule_overdue_cap_resets_the_link_with_late_reply_overdue() -> None:
    d = silent(depth=1, pool_size=1, request_timeout=1.0, late_reply_wait=0.5,
               breaker_resets=10)
    a = d.send(FakeClient("slow"), read_pdu(0))
    d.run_until(1.0)
    assert error(a).reason == "timeout"
    b = d.send(FakeClient("b"), read_pdu(1))
    d.run_until(1.499)
    assert b.state == WAITING and closes(d) == []
    d.run_until(1.5)
    [reset] = d.log.of("upstream-reset")
    # NEW RULE: a PLC's silence is charged to nobody (the client paid with its 0x0B)
    assert reset["event.reason"] == "late_reply_overdue" and "mbsec.blamed" not in reset
    assert closes(d) == [(0, 0)]
    # the waiting request goes out on a fresh connection that owes nothing
    link = d.target().links[0]
    assert b.state == SENT and not link.overdue and link.busy == 1
    assert len(d.plc.conns) == 2 and d.plc.requests[-1].conn is d.plc.conns[1]
    d.answer_all()
    assert ok(b) == [value(1, 1)]


def test_rule_new_requests_go_to_links_with_nothing_overdue_first() -> None:
    d = silent(depth=2, pool_size=2, request_timeout=1.0)
    d.send(FakeClient("a"), read_pdu(0))
    d.run_until(1.0)
    l0, l1 = d.target().links
    assert l0.overdue and l1.state == IDLE
    b = d.send(FakeClient("b"), read_pdu(1))
    assert b.link is l1  # a second link is opened rather than queue behind the late one
    d.answer(d.plc.requests[-1])
    c = d.send(FakeClient("c"), read_pdu(2))
    assert c.link is l1


def test_rule_a_client_owed_a_late_reply_stays_on_that_link() -> None:
    # a slow register costs the client that reads it; one client never holds two links
    d = silent(depth=1, pool_size=2, request_timeout=1.0)
    slow = FakeClient("slow")
    d.send(slow, read_pdu(500))
    d.run_until(1.0)
    l0, l1 = d.target().links
    nxt = d.send(slow, write_pdu(1, 1))
    other = d.send(FakeClient("other"), read_pdu(2))
    assert nxt.state == WAITING and other.link is l1
    d.answer(d.plc.requests[0])  # the late reply settles it
    assert nxt.state == SENT and nxt.link is l0


def test_rule_a_link_owed_a_late_reply_is_used_when_no_other_can_be_had() -> None:
    d = silent(depth=2, pool_size=1, request_timeout=1.0)
    d.send(FakeClient("a"), read_pdu(0))
    d.run_until(1.0)
    b = d.send(FakeClient("b"), read_pdu(1))
    assert b.state == SENT and b.link is d.target().links[0]


def test_rule_waiting_for_a_link_instead_of_failing_at_once() -> None:
    # NEW RULE: while a link (re)connects, requests wait within request_timeout (the old pool
    # answered 0x0A at once)
    d = silent(request_timeout=1.0)
    d.plc.connect = "hang"
    ex = d.send(FakeClient(), read_pdu(1))
    d.run_until(0.9)
    assert ex.state == WAITING
    d.accept_pending()
    d.answer_all()
    assert ok(ex) == [value(1, 1)]


def test_rule_a_failed_connect_does_not_fail_requests_while_another_link_is_open() -> None:
    d = silent(depth=1, pool_size=2)
    c = FakeClient("c")
    first = d.send(c, read_pdu(1))
    d.plc.connect = "refuse"
    second = d.send(FakeClient("other"), read_pdu(2))  # link 1 is refused
    assert d.log.of("upstream-connect-failed") and second.state == WAITING
    d.answer_all()
    assert ok(first) == [value(1, 1)]
    d.answer_all()
    assert ok(second) == [value(1, 2)] and second.link is d.target().links[0]


def test_rule_waiting_requests_get_0A_when_no_link_can_be_had() -> None:
    d = Driver(plc_target(pool_size=2, depth=1), plc=ScriptedPlc(None, connect="hang"))
    a = d.send(FakeClient("a"), read_pdu(1))
    b = d.send(FakeClient("b"), read_pdu(2))
    assert [kind for kind, _, _ in d.actions] == ["connect", "connect"]
    t = d.target()
    t.connect_failed(t.links[0], 0, "connect_failed", "refused", d.now)
    d.drain()
    assert a.state == WAITING and b.state == WAITING  # link 1 is still connecting
    t.connect_failed(t.links[1], 0, "connect_failed", "refused", d.now)
    d.drain()
    assert error(a).reason == "connect_failed" and error(b).reason == "connect_failed"
    assert a.error.exception_code == 0x0A


def test_rule_immediate_reconnect_after_a_blamed_reset() -> None:
    d = silent(pool_size=1, backoff_initial=1.0, backoff_max=1.0)
    a = d.send(FakeClient("a"), read_pdu(1))
    d.answer(d.plc.requests[0], _bad_reply("wrong_unit", d.plc.requests[0]))
    assert error(a).reason == "upstream_reset"
    b = d.send(FakeClient("b"), read_pdu(2))
    assert b.state == SENT and d.connects == 2


def test_rule_a_blamed_reset_does_not_start_the_backoff() -> None:
    d = silent(pool_size=1, resets_before_backoff=0, breaker_resets=100)
    for i in range(5):
        ex = d.send(FakeClient("bad"), read_pdu(i))
        req = d.plc.requests[-1]
        d.answer(req, _bad_reply("wrong_unit", req))
        assert error(ex).reason == "upstream_reset"
    t = d.target()
    assert t.retry_at == 0.0 and t.resets == []
    good = d.send(FakeClient("good"), read_pdu(9))
    d.answer_all()
    assert ok(good) == [value(1, 9)]


def _unblamed_reset(d: Driver) -> list[Exchange]:
    """Two clients' requests on the link, then the PLC closes it: nobody can be blamed."""
    sent = [d.send(FakeClient("a"), read_pdu(0)), d.send(FakeClient("b"), read_pdu(0))]
    d.plc_closes(d.plc.conns[-1])
    return sent


def test_rule_unblamed_resets_beyond_resets_before_backoff_start_the_backoff() -> None:
    # NEW RULE: only resets with no good reply in between count (a good reply clears them)
    d = silent(pool_size=1, depth=2, resets_before_backoff=2, reset_window=10.0,
               backoff_initial=0.5)
    _unblamed_reset(d)
    _unblamed_reset(d)
    third = _unblamed_reset(d)  # two resets before it: still sent at once
    assert all(ex.state == DONE and ex.error is not None for ex in third)
    assert [e["event.reason"] for e in d.log.of("upstream-reset")] == ["eof"] * 3
    assert all("mbsec.blamed" not in e for e in d.log.of("upstream-reset"))
    late = d.send(FakeClient(), read_pdu(1))
    assert error(late).exception_code == 0x0A and late.error.reason == "backoff"
    d.advance(0.5)
    again = d.send(FakeClient(), read_pdu(2))
    d.answer_all()
    assert ok(again) == [value(1, 2)]


@pytest.mark.parametrize("kind", ["unknown_tid", "garbage"])
def test_rule_replies_nobody_can_be_placed_with_several_clients_never_start_the_backoff(
        kind: str) -> None:
    # NEW RULE: the PLC answered (it is reachable): a frame no tid places, with two clients'
    # requests on the link, is charged to nobody and not counted toward the backoff either
    d = silent(pool_size=1, depth=2, resets_before_backoff=1, reset_window=10.0)
    for _ in range(4):
        d.send(FakeClient("a"), read_pdu(0))
        d.send(FakeClient("b"), read_pdu(0))
        d.reply(d.plc.conns[-1], _bad_reply(kind, d.plc.requests[-1]))
    resets = d.log.of("upstream-reset")
    assert [e["event.reason"] for e in resets] == [RESET_REASONS[kind]] * 4
    assert all("mbsec.blamed" not in e for e in resets)
    bystander = d.send(FakeClient("c"), read_pdu(1))
    assert bystander.state == SENT  # no backoff
    d.answer_all()
    assert ok(bystander) == [value(1, 1)]


def test_rule_a_good_reply_clears_the_unblamed_resets() -> None:
    d = silent(pool_size=1, depth=2, resets_before_backoff=1, reset_window=10.0)
    for _ in range(3):  # each time: a good reply, then a reset nobody can be blamed for
        d.send(FakeClient(), read_pdu(0))
        d.answer_all()
        _unblamed_reset(d)
    assert len(d.log.of("upstream-reset")) == 3
    ex = d.send(FakeClient(), read_pdu(1))
    assert ex.state == SENT  # no backoff: the PLC answered properly in between


def test_rule_unblamed_resets_outside_the_window_do_not_count() -> None:
    d = silent(pool_size=1, depth=2, resets_before_backoff=1, reset_window=10.0)
    for _ in range(3):
        d.send(FakeClient(), read_pdu(0))
        d.answer_all()
        _unblamed_reset(d)
        d.advance(10.0)
    ex = d.send(FakeClient(), read_pdu(1))
    assert ex.state == SENT


def test_rule_target_wide_connect_backoff() -> None:
    # NEW RULE: the backoff is the target's: a link that never failed waits for it too
    d = Driver(plc_target(pool_size=2, depth=1), plc=ScriptedPlc(None, connect="refuse"))
    d.send(FakeClient("a"), read_pdu(1))  # link 0 is refused
    d.plc.connect = "accept"
    d.advance(0.1)
    ex = d.send(FakeClient("b"), read_pdu(2))
    assert error(ex).reason == "backoff" and d.plc.connect_attempts == 1
    assert d.target().links[1].state == IDLE


def test_rule_clients_are_served_in_turn() -> None:
    d = silent(depth=1, pool_size=1)
    x, y, z = FakeClient("x"), FakeClient("y"), FakeClient("z")
    for address in (0, 1, 2):
        d.send(x, read_pdu(address))  # x pipelines three
    d.send(y, read_pdu(10))
    d.send(z, read_pdu(20))
    order = []
    while d.unanswered():
        req = d.unanswered()[0]
        order.append(struct.unpack(">H", req.pdu[1:3])[0])
        d.answer(req)
    assert order == [0, 1, 10, 20, 2]  # one queue for all would give 0, 1, 2, 10, 20


def test_queued_callers_are_served_in_order_not_starved() -> None:
    """A caller that loops must not barge ahead of callers already waiting for the slot."""
    d = silent(depth=1, pool_size=1)
    x = Sequential(d, "x", [read_pdu(0), read_pdu(1), read_pdu(2)])
    x.start()
    d.send(FakeClient("y"), read_pdu(10))
    d.send(FakeClient("z"), read_pdu(20))
    order = []
    while d.unanswered():
        req = d.unanswered()[0]
        order.append(struct.unpack(">H", req.pdu[1:3])[0])
        d.answer(req)
    assert order == [0, 10, 20, 1, 2]


def test_rule_one_link_at_a_time_per_client_keeps_pipelined_writes_in_order() -> None:
    d = silent(depth=1, pool_size=2)
    c = FakeClient("c")
    w1 = d.send(c, write_pdu(1, 1))
    w2 = d.send(c, write_pdu(1, 2))  # link 1 is free, but w2 must not overtake w1
    assert w2.state == WAITING and [r.pdu for r in d.plc.requests] == [write_pdu(1, 1)]
    d.answer_all()
    assert w1.reply is not None and w2.link is w1.link
    d.answer_all()
    assert w2.reply is not None
    assert [r.pdu for r in d.plc.requests] == [write_pdu(1, 1), write_pdu(1, 2)]
    assert all(r.conn is d.plc.requests[0].conn for r in d.plc.requests)


def test_rule_breaker_refuses_a_client_that_keeps_breaking_links() -> None:
    def plc(req: PlcRequest) -> bytes | None:
        if req.pdu[1:3] == b"\x02\x9a":  # address 666: the reply has the wrong unit
            return _bad_reply("wrong_unit", req)
        return normal_answer(req)

    d = Driver(plc_target(breaker_resets=3, breaker_window=60.0, breaker_hold=30.0),
               plc=ScriptedPlc(plc))
    bad, good = FakeClient("bad"), FakeClient("good")
    for _ in range(3):
        assert error(d.send(bad, read_pdu(666))).reason == "upstream_reset"
        assert ok(d.send(good, read_pdu(1))) == [value(1, 1)]
    [penalized] = d.log.of("client-penalized")
    assert penalized["mbsec.blamed"] == "bad" and penalized["mbsec.resets"] == 3
    sent = len(d.plc.requests)
    refused = d.send(bad, read_pdu(2))
    assert error(refused).exception_code == 0x0A and refused.error.reason == "penalized"
    assert len(d.plc.requests) == sent  # never reaches the PLC
    assert ok(d.send(good, read_pdu(3))) == [value(1, 3)]
    assert d.metrics.count("mbsec_clients_penalized_total", target="plc1") == 1
    assert d.metrics.count("mbsec_upstream_failures_total", reason="penalized") == 1
    d.run_until(d.now + 30.0)
    assert ok(d.send(bad, read_pdu(4))) == [value(1, 4)]  # the hold is over


def test_rule_breaker_counts_only_resets_within_its_window() -> None:
    d = silent(pool_size=1, breaker_resets=2, breaker_window=5.0)
    for _ in range(3):
        ex = d.send(FakeClient("bad"), read_pdu(0))
        req = d.plc.requests[-1]
        d.answer(req, _bad_reply("wrong_unit", req))
        assert error(ex).reason == "upstream_reset"
        d.advance(5.0)
    assert d.log.of("client-penalized") == []


def test_rule_breaker_fails_the_waiting_requests_of_the_client_it_trips_on() -> None:
    d = silent(pool_size=1, depth=1, breaker_resets=1)
    bad, good = FakeClient("bad"), FakeClient("good")
    first = d.send(bad, read_pdu(0))
    queued_bad = d.send(bad, read_pdu(1))
    queued_good = d.send(good, read_pdu(2))
    req = d.plc.requests[0]
    d.answer(req, _bad_reply("wrong_unit", req))
    assert error(first).reason == "upstream_reset"
    assert error(queued_bad).reason == "penalized" and queued_bad.error.exception_code == 0x0A
    d.answer_all()
    assert ok(queued_good) == [value(1, 2)]


def test_rule_eof_with_one_request_on_the_link_charges_its_client() -> None:
    d = silent(pool_size=1, breaker_resets=1)
    ex = d.send(FakeClient("hangs-up"), read_pdu(0))
    d.plc_closes(d.plc.conns[0], "eof", "closed")
    assert error(ex).reason == "connection_lost"
    assert d.log.of("upstream-reset")[0]["mbsec.blamed"] == "hangs-up"
    assert d.log.of("client-penalized")[0]["mbsec.blamed"] == "hangs-up"


def test_rule_nothing_is_ever_sent_twice() -> None:
    d = silent()
    ex = d.send(FakeClient(), write_pdu(1, 1))
    with pytest.raises(AssertionError, match="sent twice"):
        d.target()._send(d.target().links[0], ex, d.now)
    assert len(d.plc.requests) == 1


def test_close_fails_every_request_and_closes_every_link() -> None:
    # was: cancelling Upstreams.run closed the PLC connections
    d = silent(depth=1, pool_size=1)
    sent = d.send(FakeClient("a"), read_pdu(0))
    waiting = d.send(FakeClient("b"), read_pdu(1))
    d.router.close("shutdown", "proxy stopping", d.now)
    d.drain()
    assert error(sent).exception_code == 0x0B and sent.error.reason == "upstream_reset"
    assert error(waiting).exception_code == 0x0B and waiting.error.reason == "connection_lost"
    assert closes(d) == [(0, 0)] and d.plc.conns[0].closed
    assert d.log.of("upstream-reset") == []  # a shutdown is no fault
    assert d.timers.next_deadline() is None or all(
        link.state == IDLE for link in d.target().links)


# -- regressions: core bugs found while porting (fixed in e8913b3) -------------------------------


def test_rule_send_timeout_reset_reconnects_for_waiting_requests() -> None:
    """Was: the send_timeout reset did not schedule, so a waiting request got 0x0B 'no free
    slot' with the link idle and nothing connecting."""
    d = silent(depth=1, pool_size=1, request_timeout=1.0)
    d.plc.reading = False
    d.send(FakeClient("a"), write_pdu(1, 1))  # t=0: the PLC never takes it
    d.run_until(0.5)
    b = d.send(FakeClient("b"), read_pdu(2))  # t=0.5: waits for the only slot
    d.plc.reading = True
    d.run_until(1.0)  # A's deadline: send_timeout resets the link
    assert [e["event.reason"] for e in d.log.of("upstream-reset")] == ["send_timeout"]
    assert d.connects == 2  # a reset reconnects at once for the request that waits
    d.answer_all()
    assert ok(b) == [value(1, 2)]


def test_reset_event_counts_the_request_whose_reply_caused_it() -> None:
    """Was: mbsec.pending ('requests failed by it', docs/events.md) left out the request
    whose bad reply caused the reset."""
    d = silent(pool_size=1)
    ex = d.send(FakeClient("a"), read_pdu(0))
    req = d.plc.requests[0]
    d.answer(req, _bad_reply("wrong_unit", req))
    assert error(ex).reason == "upstream_reset"
    assert d.log.of("upstream-reset")[0]["mbsec.pending"] == 1
