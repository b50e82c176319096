"""What a scrape reads from the core, without sockets: ``mbsec_upstream_up`` follows the
connection attempts, the gateway exceptions are counted per target and code, resets by reason,
and :func:`mbsec.path.stats.collect` reports links, in flight, queued and backoff."""

from __future__ import annotations

from mbsec.path.exchange import DONE
from mbsec.path.stats import collect
from path.core_helpers import Driver, FakeClient, ScriptedPlc, normal_answer, plc_target, read_pdu


def figures(d: Driver) -> dict[str, object]:
    [t] = collect(d.router.targets.values(), {}, d.now)
    return {"up": t.up, "backoff": t.backoff, "in_flight": t.in_flight, "queued": t.queued,
            "overdue": t.overdue, "states": [lk.state for lk in t.links],
            "tcp": [lk.tcp for lk in t.links]}


def test_up_follows_connection_attempts_and_0x0a_is_counted() -> None:
    d = Driver(plc_target(pool_size=2), plc=ScriptedPlc(normal_answer, connect="refuse"))
    assert figures(d)["up"] is True  # nothing failed yet
    a = d.send(FakeClient(), read_pdu(0))
    assert a.error is not None and a.error.exception_code == 0x0A
    f = figures(d)
    assert f["up"] is False and f["backoff"] is True and f["states"] == ["idle", "idle"]
    assert d.metrics.count("mbsec_upstream_exception_answers_total", target="plc1",
                           code="0x0A") == 1
    d.plc.connect = "accept"
    d.advance(0.3)  # past the backoff: the next request connects
    b = d.send(FakeClient(), read_pdu(0))
    assert b.state == DONE and b.error is None
    f = figures(d)
    assert f["up"] is True and f["backoff"] is False and "open" in f["states"]
    assert f["tcp"] == [None, None]  # no driver socket here: no TCP_INFO


def test_in_flight_queued_overdue_and_0x0b_per_target() -> None:
    d = Driver(plc_target(pool_size=1, depth=1, late_reply_wait=5.0), plc=ScriptedPlc(None))
    d.send(FakeClient("a"), read_pdu(0))
    d.send(FakeClient("b"), read_pdu(1))
    assert figures(d) | {"tcp": None} == {"up": True, "backoff": False, "in_flight": 1,
                                          "queued": 1, "overdue": 0, "states": ["open"],
                                          "tcp": None}
    d.advance(1.0)  # request_timeout: the first is answered 0x0B and stays owed a late reply
    f = figures(d)
    assert f["in_flight"] == 0 and f["overdue"] == 1
    assert d.metrics.count("mbsec_upstream_exception_answers_total", target="plc1",
                           code="0x0B") >= 1
    d.advance(5.0)  # late_reply_wait: the link is reset for it
    assert d.metrics.count("mbsec_upstream_resets_total", target="plc1",
                           reason="late_reply_overdue") == 1
    assert figures(d)["overdue"] == 0


def test_a_client_that_left_is_not_counted_as_answered() -> None:
    d = Driver(plc_target(pool_size=1, depth=1), plc=ScriptedPlc(None))
    d.send(FakeClient("a"), read_pdu(0))
    gone = FakeClient("b")
    d.send(gone, read_pdu(1))  # waits for the busy link
    d.router.withdraw(gone)
    assert d.metrics.count("mbsec_upstream_exception_answers_total") == 0
