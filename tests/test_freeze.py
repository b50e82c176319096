"""Write freezes of one worker (mbsec.freeze): events and gauges for every change, the
automatic freeze fed by link events on a simulated clock, a restart that finds its own
automatic freeze in the state file, a thaw made through another worker."""

from __future__ import annotations

from typing import Any

from path.core_helpers import RecordingLog

from mbsec.flap import FlapRule
from mbsec.freeze import GAUGE, WriteFreeze
from mbsec.nodestate import AUTO, NodeState

RULE = FlapRule(enabled=True, drops=2, window=10.0, stable_for=5.0)


class Gauges:
    def __init__(self) -> None:
        self.values: dict[tuple[str, str], float] = {}

    def inc(self, name: str, value: float = 1.0, **labels: Any) -> None:
        pass

    def observe(self, name: str, value: float, **labels: Any) -> None:
        pass

    def set(self, name: str, value: float, **labels: Any) -> None:
        assert name == GAUGE
        self.values[(labels["target"], labels["kind"])] = value


class Timers:
    """The data plane's timers, by hand: the test runs what is due."""

    def __init__(self) -> None:
        self.due: list[tuple[float, Any]] = []

    def at(self, when: float, fn: Any) -> Any:
        entry = [when, fn]
        self.due.append(entry)  # type: ignore[arg-type]

        class Handle:
            def cancel(self) -> None:
                entry[1] = None

        return Handle()

    def run(self, now: float) -> None:
        for entry in list(self.due):
            if entry[0] <= now and entry[1] is not None:
                self.due.remove(entry)
                entry[1](now)


def make(node: NodeState, worker: int = 0) -> tuple[WriteFreeze, RecordingLog, Gauges, Timers]:
    log, gauges, timers = RecordingLog(), Gauges(), Timers()
    wf = WriteFreeze(node, RULE, log=log, metrics=gauges, worker=worker,
                     targets=lambda: ["plc", "other"])
    wf.schedule = timers.at
    return wf, log, gauges, timers


def test_operator_freeze_and_thaw_are_events_and_gauges() -> None:
    wf, log, gauges, _ = make(NodeState.memory())
    assert gauges.values[("plc", "manual")] == 0.0 and gauges.values[("*", "manual")] == 0.0
    assert wf.freeze("plc") is not None
    assert wf.freeze("plc") is None  # frozen already: no second event
    assert gauges.values[("plc", "manual")] == 1.0
    assert wf.thaw("plc") == ["manual"] and wf.thaw("plc") == []
    assert gauges.values[("plc", "manual")] == 0.0
    evs = log.of("writes-freeze")
    assert [(e["mbsec.frozen"], e["event.reason"]) for e in evs] == [
        (True, "operator"), (False, "operator")]
    wf.freeze()
    wf.freeze("other")
    assert sorted(wf.thaw_all()) == ["manual"] and wf.node.freezes() == {}


def test_flaps_freeze_and_a_stable_link_thaws_on_the_driver_clock() -> None:
    wf, log, gauges, timers = make(NodeState.memory(), worker=1)
    wf.link_event("plc", True, 0.0)
    wf.link_event("plc", False, 1.0)
    assert wf.node.freezes() == {}
    wf.link_event("plc", False, 2.0)
    [ev] = log.of("writes-freeze")
    assert ev["event.reason"] == "link_flapping" and ev["mbsec.drops"] == 2
    assert ev["mbsec.worker"] == 1 and wf.node.freezes()["plc"].owner == 1
    assert gauges.values[("plc", "auto")] == 1.0
    wf.link_event("plc", True, 3.0)
    timers.run(7.9)
    assert "plc" in wf.node.freezes()
    timers.run(8.0)
    assert wf.node.freezes() == {} and gauges.values[("plc", "auto")] == 0.0
    assert log.of("writes-freeze")[-1]["event.reason"] == "link_stable"


def test_a_restart_adopts_its_own_automatic_freeze() -> None:
    node = NodeState.memory()
    node.set_freeze("plc", AUTO, owner=1)
    node.set_freeze("other", AUTO, owner=0)
    wf, log, _, timers = make(node, worker=1)
    assert wf.detector.frozen == {"plc"}  # the other one is worker 0's to thaw
    wf.link_event("plc", True, 100.0)
    timers.run(105.0)
    assert list(node.freezes()) == ["other"]
    assert log.of("writes-freeze")[-1]["event.reason"] == "link_stable"


def test_a_thaw_through_another_worker_lets_this_one_freeze_again() -> None:
    node = NodeState.memory()
    wf, log, _, _ = make(node, worker=1)
    wf.link_event("plc", False, 1.0)
    wf.link_event("plc", False, 2.0)
    other, _, _, _ = make(node, worker=0)
    assert other.thaw("plc") == ["auto"]  # worker 0 served `mbsec ctl thaw plc`
    wf.link_event("plc", False, 3.0)
    wf.link_event("plc", False, 4.0)
    assert node.freezes()["plc"].kinds == ["auto"]
    assert len([e for e in log.of("writes-freeze") if e["mbsec.frozen"]]) == 2


def test_off_by_default_link_events_change_nothing() -> None:
    node = NodeState.memory()
    log = RecordingLog()
    wf = WriteFreeze(node, FlapRule(), log=log, metrics=Gauges())
    for i in range(20):
        wf.link_event("plc", False, float(i))
    assert node.freezes() == {} and log.of("writes-freeze") == []
