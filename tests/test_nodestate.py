"""The node state file (mbsec.nodestate): freezes every process sees, rate buckets shared by
the workers, what a restart keeps. Two processes are real ones (a child Python), the clock of
the rate limiter is a fake one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mbsec.nodestate import (
    ALL,
    AUTO,
    MANUAL,
    FreezeView,
    NodeState,
    NodeStateError,
    SharedRateLimiter,
)
from mbsec.policy import load_policy_text
from mbsec.policy.ratelimit import REASON_IN_FLIGHT, REASON_REQUEST_RATE, REASON_WRITE_RATE
from tests.test_policy_ratelimit import READ, WRITE, FakeClock, who

POLICY = """\
version: 1
default: deny
limits:
  default: {requests_per_second: 10, burst: 5, writes_per_second: 1, write_burst: 2,
            max_in_flight: 3}
rules: []
"""


def test_freeze_table_set_clear_and_generation(tmp_path: Path) -> None:
    node = NodeState.open(tmp_path / "state", reset_buckets=True)
    g0 = node.generation()
    e = node.set_freeze("plc", MANUAL, reason="operator", now=5.0)
    assert e is not None and e.kinds == ["manual"] and e.since == 5.0
    assert node.set_freeze("plc", MANUAL) is None  # held already: no change
    assert node.generation() == g0 + 1
    e2 = node.set_freeze("plc", AUTO, owner=1)
    assert e2 is not None and e2.kinds == ["manual", "auto"] and e2.owner == 1
    assert node.clear_freeze("plc", MANUAL) == MANUAL
    assert node.freezes()["plc"].kinds == ["auto"]
    assert node.clear_freeze("plc") == AUTO
    assert node.clear_freeze("plc") == 0
    assert node.freezes() == {}
    node.close()


def test_a_freeze_by_another_process_holds_from_the_next_lookup(tmp_path: Path) -> None:
    """What every worker does per write: one generation read, the table when it moved."""
    path = tmp_path / "state"
    node = NodeState.open(path, reset_buckets=True)
    view = FreezeView(node, {1: "plc", 2: "plc", 7: "other"})
    assert view.frozen(1) is None
    code = ("import sys; from pathlib import Path; from mbsec.nodestate import *; "
            "n = NodeState.open(Path(sys.argv[1]), reset_buckets=False); "
            "n.set_freeze(sys.argv[2], MANUAL, reason='operator'); n.close()")
    subprocess.run([sys.executable, "-c", code, str(path), "plc"], check=True)
    hit = view.frozen(2)
    assert hit is not None and hit.target == "plc"
    assert view.frozen(7) is None and view.frozen(99) is None
    subprocess.run([sys.executable, "-c", code, str(path), ALL], check=True)
    all_hit = view.frozen(7)
    assert all_hit is not None and all_hit.target == ALL  # every target, routed or not
    node.close()


def test_the_lock_excludes_under_contention_and_survives_a_dead_holder(tmp_path: Path) -> None:
    """The node lock spins on trylock before it waits (mbsec.nodestate._Mutex): two threads
    and a child process hammering one counter in the mapping lose no increment (the spin and
    the wait both exclude), and a process that dies holding the lock does not wedge the node
    (EOWNERDEAD: the next taker goes on)."""
    import struct
    import threading

    path = tmp_path / "state"
    node = NodeState.open(path, reset_buckets=True)
    if node._mutex is None:
        pytest.skip("no pthread mutex on this platform (the flock fallback is used)")
    at = 8  # the freeze generation: any 8 bytes of the mapping will do
    start = struct.unpack_from("<Q", node._mm, at)[0]
    n = 3000
    child = ("import struct, sys; from pathlib import Path; from mbsec.nodestate import *; "
             "n = NodeState.open(Path(sys.argv[1]), reset_buckets=False)\n"
             "for _ in range(int(sys.argv[2])):\n"
             "    n.lock(); v = struct.unpack_from('<Q', n._mm, 8)[0]; "
             "struct.pack_into('<Q', n._mm, 8, v + 1); n.unlock()\n")
    proc = subprocess.Popen([sys.executable, "-c", child, str(path), str(n)])

    def bump() -> None:
        for _ in range(n):
            node.lock()
            try:
                v = struct.unpack_from("<Q", node._mm, at)[0]
                struct.pack_into("<Q", node._mm, at, v + 1)
            finally:
                node.unlock()

    threads = [threading.Thread(target=bump) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proc.wait(60) == 0
    assert struct.unpack_from("<Q", node._mm, at)[0] == start + 3 * n
    dies = ("import os, sys; from pathlib import Path; from mbsec.nodestate import *; "
            "n = NodeState.open(Path(sys.argv[1]), reset_buckets=False); n.lock(); os._exit(0)")
    subprocess.run([sys.executable, "-c", dies, str(path)], check=True)
    done = threading.Event()

    def take() -> None:
        node.lock()
        node.unlock()
        done.set()

    threading.Thread(target=take, daemon=True).start()
    assert done.wait(10), "a lock held by a dead process wedged the node"
    node.close()


def test_a_restart_keeps_freezes_and_resets_buckets(tmp_path: Path) -> None:
    path = tmp_path / "state"
    policy = load_policy_text(POLICY)
    clock = FakeClock()
    node = NodeState.open(path, reset_buckets=True)
    node.set_freeze("plc", MANUAL)
    lim = SharedRateLimiter(policy, node, clock)
    pr = who(policy, None)
    for _ in range(5):
        assert lim.acquire(pr, READ) is None
        lim.release(pr)
    assert lim.acquire(pr, READ) == REASON_REQUEST_RATE
    node.close()
    worker = NodeState.open(path, reset_buckets=False)  # a worker joining: budgets kept
    assert SharedRateLimiter(policy, worker, clock).acquire(pr, READ) == REASON_REQUEST_RATE
    worker.close()
    node = NodeState.open(path, reset_buckets=True)  # the next start
    assert node.freezes()["plc"].kinds == ["manual"]
    assert SharedRateLimiter(policy, node, clock).acquire(pr, READ) is None
    node.close()


def test_a_file_of_another_layout_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"not a state file")
    node = NodeState.open(path, reset_buckets=False)
    assert node.freezes() == {}
    node.close()


def test_unusable_state_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a file, not a directory")
    with pytest.raises(NodeStateError, match=r"admin\.state_file .*f/state"):
        NodeState.open(tmp_path / "f" / "state", reset_buckets=True)


def test_two_workers_share_one_budget(tmp_path: Path) -> None:
    """Two mappings of one file (two workers): a client's tokens, write tokens and in-flight
    count are one, whichever worker admits its requests."""
    path = tmp_path / "state"
    policy = load_policy_text(POLICY)
    clock = FakeClock()
    a = SharedRateLimiter(policy, NodeState.open(path, reset_buckets=True), clock)
    b = SharedRateLimiter(policy, NodeState.open(path, reset_buckets=False), clock)
    pr = who(policy, None)
    other = who(policy, None, fp="bb")
    assert [a.acquire(pr, READ), b.acquire(pr, READ), a.acquire(pr, READ)] == [None] * 3
    assert b.acquire(pr, READ) == REASON_IN_FLIGHT  # 3 in flight over both workers
    assert a.in_flight(pr) == b.in_flight(pr) == 3
    for lim in (b, a, b):
        lim.release(pr)
    assert a.in_flight(pr) == 0
    assert b.acquire(pr, WRITE) is None and a.release(pr) is None
    assert a.acquire(pr, READ) is None and b.release(pr) is None  # the 5th token
    assert [b.acquire(pr, READ), a.acquire(pr, READ)] == [REASON_REQUEST_RATE] * 2
    assert a.acquire(other, READ) is None  # another client: its own bucket
    a.release(other)
    clock.now += 0.1  # 10/s: one token back, for the node
    assert a.acquire(pr, WRITE) is None
    a.release(pr)
    clock.now += 0.1  # a request token, but not a write token (1/s), is back
    assert b.acquire(pr, WRITE) == REASON_WRITE_RATE  # write burst 2 spent over both
    b.release(pr)


def test_deferred_releases_free_the_slot_at_settle(tmp_path: Path) -> None:
    """``workers > 1``: a release is owed until the end of the loop pass (``settle``); until
    then the other worker still counts the request (stricter, never looser), the releasing
    worker does not (its next acquire writes the owed release with its own update), and one
    settle writes every owed release of the pass."""
    path = tmp_path / "state"
    policy = load_policy_text(POLICY)
    clock = FakeClock()
    node_a = NodeState.open(path, reset_buckets=True)
    node_a.defer_releases = True
    a = SharedRateLimiter(policy, node_a, clock)
    b = SharedRateLimiter(policy, NodeState.open(path, reset_buckets=False), clock)
    pr = who(policy, None)
    assert [a.acquire(pr, READ), a.acquire(pr, READ), b.acquire(pr, READ)] == [None] * 3
    a.release(pr)
    a.release(pr)
    assert b.in_flight(pr) == 3  # not settled: the other worker still counts both
    assert a.in_flight(pr) == 1  # the releasing worker does not
    assert b.acquire(pr, READ) == REASON_IN_FLIGHT
    assert a.acquire(pr, READ) is None  # both owed releases written with this update
    assert b.in_flight(pr) == 2
    a.release(pr)
    node_a.settle()  # the end of the pass: one lock for the owed release
    assert b.in_flight(pr) == a.in_flight(pr) == 1
    node_a.settle()  # nothing owed: a no-op
    assert b.in_flight(pr) == 1
    b.release(pr)
    assert a.in_flight(pr) == 0


def test_settle_never_counts_below_zero(tmp_path: Path) -> None:
    """An owed release whose bucket was reset meanwhile (a restart of the node) stops at 0."""
    node = NodeState.open(tmp_path / "state", reset_buckets=True)
    node.defer_releases = True
    policy = load_policy_text(POLICY)
    lim = SharedRateLimiter(policy, node, FakeClock())
    pr = who(policy, None)
    assert lim.acquire(pr, READ) is None
    lim.release(pr)
    lim.release(pr)  # one more than was in flight
    node.settle()
    assert lim.in_flight(pr) == 0
    assert [lim.acquire(pr, READ) for _ in range(3)] == [None] * 3
    assert lim.acquire(pr, READ) == REASON_IN_FLIGHT


def test_a_reload_keeps_the_budget(tmp_path: Path) -> None:
    policy = load_policy_text(POLICY)
    clock = FakeClock()
    lim = SharedRateLimiter(policy, NodeState.memory(), clock)
    pr = who(policy, None)
    for _ in range(5):
        lim.acquire(pr, READ)
        lim.release(pr)
    assert lim.successor(load_policy_text(POLICY)).acquire(pr, READ) == REASON_REQUEST_RATE


def test_the_table_prunes_idle_clients_and_refuses_when_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many clients: idle ones (no request for a minute, nothing in flight) make room; a
    table full of busy ones refuses (fail closed) instead of admitting unlimited."""
    import mbsec.nodestate as ns

    monkeypatch.setattr(ns, "BUCKET_SLOTS", 8)
    monkeypatch.setattr(ns, "PROBE_MAX", 8)
    policy = load_policy_text(POLICY)
    clock = FakeClock()
    lim = SharedRateLimiter(policy, NodeState.memory(), clock)
    clients = [who(policy, None, fp=f"{i:02x}") for i in range(9)]
    for c in clients[:8]:
        assert lim.acquire(c, READ) is None  # in flight: kept
    assert lim.acquire(clients[8], READ) == REASON_REQUEST_RATE
    for c in clients[:8]:
        lim.release(c)
    clock.now += 61.0
    assert lim.acquire(clients[8], READ) is None  # the idle ones were pruned
