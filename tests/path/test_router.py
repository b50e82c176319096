"""Targets by unit id, target settings, reload and shutdown (``mbsec.path.router``), sans-IO.

Replaces the routing, validation and reload tests of the trio pool's ``tests/test_upstream.py``.
"""

from __future__ import annotations

from typing import Any

import pytest

from mbsec.path.exchange import DONE, SENT, Exchange
from mbsec.path.link import IDLE, OPEN
from mbsec.path.plc import (
    RETIRE_GRACE,
    PathUnavailable,
    TargetNoResponse,
    UpstreamError,
    check_targets,
    reset_error,
)
from mbsec.path.router import Router, observer
from mbsec.path.timers import Timers
from path.core_helpers import (
    Driver,
    FakeClient,
    RecordingLog,
    ScriptedPlc,
    make_exchange,
    normal_answer,
    plc_target,
    read_pdu,
    registers,
    value,
)


def error(ex: Exchange) -> Any:
    assert ex.state == DONE and ex.error is not None, (ex.state, ex.reply)
    return ex.error


def ok(ex: Exchange) -> list[int]:
    assert ex.state == DONE and ex.reply is not None, ex.error
    return registers(ex.reply.pdu)


def plc2(**kw: Any) -> Any:
    return plc_target(**{"name": "plc2", "host": "192.0.2.20", "unit_ids": frozenset({2}), **kw})


# -- routing -------------------------------------------------------------------------------------


def test_no_route_is_0A_through_done_without_re_entering_the_client() -> None:
    d = Driver(plc_target())
    c = FakeClient()
    ex = make_exchange(c, 5, 7, read_pdu(0))
    d.router.submit(ex, d.now)
    assert c.outcomes == []  # never called back from inside submit
    assert list(d.outbox.done) == [ex]
    d.drain()
    assert c.outcomes == [(ex, 0.0)]
    assert error(ex).exception_code == 0x0A and ex.error.reason == "no_route"
    assert "unit id 7" in ex.error.message
    assert d.metrics.count("mbsec_upstream_failures_total", reason="no_route") == 1
    assert d.actions == [] and d.plc.connect_attempts == 0


def test_units_are_routed_to_their_target_and_targets_fail_separately() -> None:
    d = Driver(plc_target(), plc2(), plc=ScriptedPlc(normal_answer))
    d.plc.connect = "refuse"
    down = d.send(FakeClient(), read_pdu(0), unit=1)
    assert error(down).reason == "connect_failed"
    d.plc.connect = "accept"
    up = d.send(FakeClient(), read_pdu(3), unit=2)
    assert ok(up) == [value(2, 3)]  # plc1's backoff is plc1's
    assert up.link.target is d.target("plc2")
    assert error(d.send(FakeClient(), read_pdu(0), unit=1)).reason == "backoff"


def test_default_metrics_work() -> None:
    timers = Timers()
    router = Router([plc_target()], timers=timers, log=RecordingLog())
    ex = make_exchange(FakeClient(), 1, 9, read_pdu(0))
    router.submit(ex, 0.0)
    assert error(ex).reason == "no_route"


def test_observer_uses_a_bound_histogram_when_the_metrics_have_one() -> None:
    seen: list[tuple[str, dict[str, str], float]] = []

    class Hist:
        def __init__(self, name: str, labels: dict[str, str]) -> None:
            self.name, self.labels = name, labels

        def observe(self, v: float) -> None:
            seen.append((self.name, self.labels, v))

    class WithHistogram:
        def histogram(self, name: str, **labels: str) -> Hist:
            return Hist(name, labels)

    observer(WithHistogram(), "h", target="t")(0.5)
    assert seen == [("h", {"target": "t"}, 0.5)]
    got: list[tuple[str, float, dict[str, str]]] = []

    class Plain:
        def observe(self, name: str, v: float, **labels: str) -> None:
            got.append((name, v, labels))

    observer(Plain(), "h", target="t")(0.25)
    assert got == [("h", 0.25, {"target": "t"})]


# -- target settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(("kw", "match"), [
    ({"port": 0}, "port"),
    ({"port": 65536}, "port"),
    ({"unit_ids": frozenset()}, "no unit ids"),
    ({"unit_ids": frozenset({300})}, "unit id 300"),
    ({"unit_rewrite": {1: 256}}, "rewrite"),
    ({"pool_size": 0}, "pool_size"),
    ({"depth": 0}, "depth"),
    ({"connect_timeout": 0}, "timeouts"),
    ({"request_timeout": -1}, "timeouts"),
    ({"late_reply_wait": 0}, "timeouts"),
    ({"backoff_initial": 5, "backoff_max": 1}, "backoff"),
    ({"backoff_initial": -1}, "backoff"),
    ({"resets_before_backoff": -1}, "resets_before_backoff"),
    ({"reset_window": -1}, "reset_window"),
    ({"breaker_resets": 0}, "breaker_resets"),
    ({"breaker_window": -1}, "breaker"),
    ({"breaker_hold": -1}, "breaker"),
])
def test_target_validation(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plc_target(**kw)


def test_target_defaults_and_frozen_rewrite_map() -> None:
    t = plc_target(unit_rewrite={1: 2})
    with pytest.raises(TypeError):
        t.unit_rewrite[1] = 3  # type: ignore[index]
    assert plc_target(unit_ids={1, 2}).unit_ids == frozenset({1, 2})
    bare = type(t)("p", "h", 502, frozenset({1}))
    assert (bare.pool_size, bare.depth, bare.late_reply_wait) == (2, 1, 10.0)
    assert (bare.resets_before_backoff, bare.breaker_resets, bare.breaker_hold) == (3, 3, 30.0)


def test_targets_must_have_unique_names_and_units() -> None:
    with pytest.raises(ValueError, match="routed to both"):
        check_targets([plc_target(), plc_target(name="plc2")])
    with pytest.raises(ValueError, match="duplicate"):
        check_targets([plc_target(), plc_target(unit_ids=frozenset({2}))])
    with pytest.raises(ValueError, match="routed to both"):
        Router([plc_target(), plc_target(name="plc2")], timers=Timers(), log=RecordingLog())


def test_error_classes_and_codes() -> None:
    assert issubclass(PathUnavailable, UpstreamError)
    assert issubclass(TargetNoResponse, UpstreamError)
    assert TargetNoResponse("x", reason="timeout").exception_code == 0x0B
    assert PathUnavailable("x", reason="no_route").exception_code == 0x0A
    assert reset_error("t", "eof", "m").reason == "connection_lost"
    assert reset_error("t", "connection_lost", "m").reason == "connection_lost"
    assert reset_error("t", "bad_frame", "m").reason == "upstream_reset"
    assert reset_error("t", "bad_frame", "m").exception_code == 0x0B


# -- reload --------------------------------------------------------------------------------------


def test_reload_keeps_unchanged_targets_and_their_links() -> None:
    d = Driver(plc_target())
    assert ok(d.send(FakeClient(), read_pdu(0))) == [value(1, 0)]
    kept = d.target()
    d.router.install([plc_target(), plc2()], d.now)  # an equal copy of plc1: same links
    assert d.target() is kept and d.router.routes[2] is d.target("plc2")
    assert ok(d.send(FakeClient(), read_pdu(3), unit=1)) == [value(1, 3)]
    assert ok(d.send(FakeClient(), read_pdu(3), unit=2)) == [value(2, 3)]
    assert d.metrics.count("mbsec_upstream_connects_total", target="plc1") == 1
    assert d.router.retired == []


def test_a_refused_reload_keeps_the_running_set() -> None:
    d = Driver(plc_target(), plc2())
    before = dict(d.router.routes)
    with pytest.raises(ValueError):
        d.router.install([plc_target(), plc_target(name="plc3")], d.now)  # unit 1 twice
    assert d.router.routes == before and set(d.router.targets) == {"plc1", "plc2"}


def test_a_removed_target_serves_its_requests_then_closes() -> None:
    d = Driver(plc_target(), plc2(), plc=ScriptedPlc(None))
    old = d.target("plc1")
    inflight = d.send(FakeClient(), read_pdu(5), unit=1)
    d.advance(0.5)
    d.router.install([plc2()], d.now)
    assert d.router.retired == [old] and d.router.all_targets() == [d.target("plc2"), old]
    # new requests for its units have no route at once ...
    assert error(d.send(FakeClient(), read_pdu(0), unit=1)).reason == "no_route"
    # ... while the request it already sent still gets its reply
    d.answer_all()
    assert ok(inflight) == [value(1, 5)]
    grace = 1.0 + 1.0 + RETIRE_GRACE  # connect_timeout + request_timeout + grace
    d.run_until(0.5 + grace - 0.001)
    assert old.links[0].state == OPEN and [k for k, _, _ in d.actions] == ["connect"]
    d.run_until(0.5 + grace)
    assert old.links[0].state == IDLE and [k for k, _, _ in d.actions] == ["connect", "close"]
    assert d.router.retired == [] and d.log.of("upstream-reset") == []  # no fault
    last = d.send(FakeClient(), read_pdu(9), unit=2)
    d.answer_all()
    assert ok(last) == [value(2, 9)]


def test_a_changed_target_is_replaced_and_the_old_one_retired() -> None:
    d = Driver(plc_target(), plc=ScriptedPlc(None))
    old = d.target()
    inflight = d.send(FakeClient("a"), read_pdu(1))
    d.router.install([plc_target(depth=2)], d.now)
    new = d.target()
    assert new is not old and new.target.depth == 2 and d.router.retired == [old]
    ex = d.send(FakeClient("b"), read_pdu(2))
    assert ex.link.target is new and d.connects == 2
    d.answer_all()
    assert ok(inflight) == [value(1, 1)] and ok(ex) == [value(1, 2)]
    d.advance(3.0)
    assert old.links[0].state == IDLE and new.links[0].state == OPEN


def test_a_retired_target_closes_on_time_even_when_a_late_reply_is_owed() -> None:
    d = Driver(plc_target(request_timeout=5.0, late_reply_wait=100.0), plc=ScriptedPlc(None))
    old = d.target()
    ex = d.send(FakeClient(), read_pdu(1))
    d.router.install([plc2()], d.now)
    d.run_until(5.0)
    assert error(ex).reason == "timeout" and old.links[0].overdue
    d.run_until(1.0 + 5.0 + RETIRE_GRACE)
    assert old.links[0].state == IDLE and not old.links[0].overdue
    assert d.finished == [ex]  # one outcome, not a second one at the close


def test_withdraw_and_close_reach_retired_targets() -> None:
    d = Driver(plc_target(depth=1, pool_size=1), plc=ScriptedPlc(None))
    gone = FakeClient("gone")
    sent = d.send(FakeClient("a"), read_pdu(0))
    waiting = d.send(gone, read_pdu(1))
    d.router.install([plc2()], d.now)
    d.router.withdraw(gone)
    d.drain()
    assert error(waiting).reason == "client_gone"
    assert sent.state == SENT
    d.router.close("shutdown", "stopping", d.now)
    d.drain()
    assert error(sent).exception_code == 0x0B and d.router.retired == []
    assert [k for k, _, _ in d.actions] == ["connect", "close"]


# -- the PLC sockets the driver opens for the router's links -------------------------------------


def test_plc_socket_options() -> None:
    # ported from test_upstream's test_socket_options; the options are now set by the epoll
    # driver on every link's socket (no connection needed to check them)
    import socket

    from mbsec.path.epoll import configure_socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        configure_socket(sock)
        configure_socket(sock)  # idempotent
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30


# -- link events for the automatic write freeze (Outbox.on_link) ---------------------------------


def test_link_events_count_only_drops_no_client_is_charged_with() -> None:
    """``on_link`` hears connects, failed connects and resets nobody is blamed for (EOF of an
    idle link, a PLC silent past late_reply_wait); a reset charged to a client (its bad reply)
    is not a drop, so a client's bad requests cannot freeze everyone's writes."""
    heard: list[tuple[str, bool]] = []
    d = Driver(plc_target(pool_size=1, late_reply_wait=0.5), plc=ScriptedPlc(normal_answer))
    d.outbox.on_link = lambda name, up: heard.append((name, up))
    client = FakeClient("poller")
    d.send(client, read_pdu(1))
    assert heard == [("plc1", True)]
    link = d.target().links[0]
    d.plc_closes(link)  # idle link, PLC hung up: a drop
    assert heard[-1] == ("plc1", False)
    heard.clear()
    d.plc.answer = None  # the PLC stops answering
    d.send(client, read_pdu(2), tid=2)
    d.advance(5.0)  # 0x0B, then no late reply within late_reply_wait: reset, nobody blamed
    assert heard == [("plc1", True), ("plc1", False)]
    heard.clear()
    d.plc.answer = lambda req: b"\xde\xad\x00\x00\x00\x05junk!"  # a broken frame for it
    d.send(client, read_pdu(3), tid=3)
    resets = d.log.of("upstream-reset")
    assert resets[-1]["mbsec.blamed"] == client.blame_key
    assert ("plc1", False) not in heard  # charged to the client: not a drop
    heard.clear()
    d.plc.connect = "refuse"
    d.send(FakeClient("other"), read_pdu(4), tid=4)
    assert ("plc1", False) in heard  # a failed connect is a drop
