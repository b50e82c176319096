"""Deterministic simulation of the request-path core (mbsec.path) under generated fault schedules.

hypothesis drives a :class:`tests.sim.plc.World`: a simulated clock, one PLC target behind the
core, one or two well-behaved pollers and two misbehaving client identities. Each step is one
rule (a misbehaving client's burst of requests of any kind, a trickled or half-sent request,
a client that stops taking its replies, framing garbage, EOF, a PLC-wide episode, or waiting)
followed by simulated time. The PLC answers per request (good, slow, late, never, garbage,
unknown transaction id, wrong function, short byte count, wrong unit, closes, its own
exception) and per episode (refuses or swallows connects, stops answering, restarts, stops
reading), concurrently or one request at a time per connection.

Invariants, checked after every step (and where noted, at the moment it happens):

* every client request gets exactly one outcome: its own reply (checked byte for byte), a
  gateway exception (0x0A/0x0B; 03 for a bad PDU, the PLC's own exception), or its
  connection closed; every exchange leaves the core exactly once, within 2 x request_timeout;
* no request is ever sent to the PLC twice (every request carries a nonce), nothing that has
  its outcome (0x0B included) is sent later, refused requests are never sent;
* links <= pool_size (sockets counted by the driver), one socket per link, slots <= depth;
* a well-behaved client's request (a poller: one good request at a time) gets its own reply,
  within request_timeout + one PLC reply time + connect_timeout, while others misbehave. It
  is excused (may get 0x0A/0x0B) only when it shared a PLC connection with a misbehaving
  request the core could not know about yet (sent less than request_timeout before), when
  the PLC itself misbehaved (an episode, and the time its traces last), when every link was
  stuck with a request owed a late reply, when an earlier request of its own answered 0x0B is
  still at the PLC (it keeps its client on that link), or, for pool_size 1, while a slow reply
  held the only link. Only a slow reply (an episode that holds requests, every link stuck,
  pool_size 1) excuses the time bound;
* a request still arriving request_complete_timeout after its first byte (or after the
  request before it started, whichever is later) closes its
  connection; a client that stops taking replies is closed after idle_timeout; a
  well-behaved client is never closed;
* every queue and book stays bounded (wait queues, arrivals, breaker books, reset books,
  pending replies, link output, the timer heap); the driver leaves the outbox empty;
* after a quiet period at the end: nothing in flight, nothing waiting, every request answered.

The run is deterministic (``derandomize``); a failing schedule is printed as the steps that
reproduce it (and as a ``@reproduce_failure`` blob). ``MBSEC_SIM_SEED=<n>`` explores other
schedules with a fixed seed, ``MBSEC_SIM_EXAMPLES=<n>`` sets how many, ``MBSEC_SIM_SHRINK=1``
shrinks a failing schedule (minutes) instead of printing it as found.

Why the schedules differed between runs (the CI suite, a quiet re-run of this file) while a given
schedule always replayed the same: not the clock (``deadline=None``, too_slow suppressed, no
database, neither the core nor the world reads real time). Hypothesis draws, now and then, a
*local constant*: a literal (100 or more) of a module of this checkout outside tests/ that is in
``sys.modules`` at that moment. In a state machine that draw is the share of rules a schedule
switches off (swarm testing), so what the process had imported (the whole suite or this file,
``-k``, a merge that added a module, a thread of an earlier test importing late on a loaded box)
changed the schedules from there on. :func:`run_sim` runs with an empty pool
(tests/hypothesis_determinism.py): the schedules depend on this file and the hypothesis version
only. ``MBSEC_SIM_SHRINK=1`` stops exploring at the first failure (``report_multiple_bugs=False``;
hypothesis went on for up to 10 s of wall clock); shrinking keeps hypothesis's wall-clock budget
(5 minutes), so a shrunk schedule may be longer on a loaded box, the schedule found is the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, Phase, assume, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from hypothesis_determinism import no_local_constants

from mbsec.path.client import ClientConn
from mbsec.path.target import Target
from sim.plc import ALL_KINDS, EPISODES, GOOD, SimClient, SimRequest, Violation, World

STEPS = 50
EXAMPLES = int(os.environ.get("MBSEC_SIM_EXAMPLES", "2000"))
SEED = os.environ.get("MBSEC_SIM_SEED")
#: shrink a failing schedule to a short one (can take minutes; the unshrunk one is printed too)
SHRINK = os.environ.get("MBSEC_SIM_SHRINK") == "1"
BAD = ("bad0", "bad1")

DT = st.sampled_from((0.0, 0.02, 0.1, 0.4, 1.2))

#: schedules trickle one byte (or TLS fragment) this often: a request takes ~3.6 s to arrive
TRICKLE_EVERY = 0.3
GARBAGE_FRAME = bytes.fromhex("0001000700060103000000") + b"\x01"  # protocol id 7


def sim_settings(examples: int = EXAMPLES, *, shrink: bool = SHRINK) -> settings:
    phases = (Phase.explicit, Phase.generate, Phase.shrink) if shrink else (
        Phase.explicit, Phase.generate)
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        database=None,
        derandomize=SEED is None,
        print_blob=True,
        report_multiple_bugs=False,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much],
    )


class RequestPathSim(RuleBasedStateMachine):
    """The fault schedule: every rule is one step, followed by ``dt`` of simulated time.

    The rules act on every world in :attr:`worlds` alike (one here; a bite test runs the
    shipped core and one with a fault put back side by side, :class:`PairedSim`)."""

    client_cls: type[ClientConn] = ClientConn
    target_cls: type[Target] = Target
    runs = 0  # schedules run (for the measurements in the report)
    steps = 0

    def __init__(self) -> None:
        super().__init__()
        self.worlds: list[World] = []
        type(self).runs += 1

    def make_worlds(self, **config: Any) -> list[World]:
        return [World(client_cls=self.client_cls, target_cls=self.target_cls, **config)]

    def each(self, step: Callable[[World], None], dt: float | None = None) -> None:
        """Run ``step`` (then ``dt`` of simulated time) in every world."""
        for w in self.worlds:
            step(w)
            if dt is not None:
                w.advance(dt)

    @initialize(pool=st.integers(1, 3), depth=st.integers(1, 2), serial=st.booleans(),
                pollers=st.integers(1, 2), think=st.sampled_from((0.05, 0.15)))
    def setup(self, pool: int, depth: int, serial: bool, pollers: int, think: float) -> None:
        self.worlds = self.make_worlds(pool_size=pool, depth=depth, serial=serial)

        def populate(w: World) -> None:
            for i in range(pollers):
                w.add_client(f"good{i}", good=True, think=think * (i + 1))
            for name in BAD:
                w.add_client(name, good=False)
            w.settle()
        self.each(populate)

    @rule(who=st.sampled_from(BAD), kind=st.sampled_from(ALL_KINDS),
          n=st.sampled_from((1, 2, 5, 20)), dt=DT)
    def burst(self, who: str, kind: str, n: int, dt: float) -> None:
        """A client pipelines ``n`` requests of one kind in one write."""
        type(self).steps += 1
        self.each(lambda w: burst(w, who, kind, n), dt)

    @rule(who=st.sampled_from(BAD), how=st.sampled_from(("bytes", "tls", "stop")),
          before=st.sampled_from((0, 3, 20)), dt=DT)
    def trickle(self, who: str, how: str, before: int, dt: float) -> None:
        """``before`` good requests, then one that arrives byte by byte, as a TLS record in
        fragments, or stops half way."""
        type(self).steps += 1
        self.each(lambda w: trickle(w, who, how, before), dt)

    @rule(who=st.sampled_from(BAD), dt=DT)
    def stall(self, who: str, dt: float) -> None:
        """A client sends requests and stops reading its socket."""
        type(self).steps += 1
        self.each(lambda w: stall(w, who), dt)

    @rule(who=st.sampled_from(BAD), garbage=st.booleans(), dt=DT)
    def hang_up(self, who: str, garbage: bool, dt: float) -> None:
        """A client sends framing garbage, or closes its side, with requests in flight."""
        type(self).steps += 1
        self.each(lambda w: hang_up(w, who, garbage), dt)

    @rule(mode=st.sampled_from(EPISODES), duration=st.sampled_from((0.2, 0.8, 2.5)), dt=DT)
    def plc_episode(self, mode: str, duration: float, dt: float) -> None:
        """The PLC misbehaves for everyone for a while."""
        type(self).steps += 1
        self.each(lambda w: w.episode(mode, duration), dt)

    @rule(dt=st.sampled_from((0.05, 0.3, 1.0, 3.0)))
    def wait(self, dt: float) -> None:
        type(self).steps += 1
        self.each(lambda w: None, dt)

    @invariant()
    def check_world(self) -> None:
        self.each(World.check)

    def teardown(self) -> None:
        self.each(World.finish)


class PairedSim(RequestPathSim):
    """The shipped core and one with a fault put back (``client_cls`` / ``target_cls``), fed
    the same schedule. A violation counts when the faulty world shows it and the shipped one
    does not: the simulation caught the fault, not something else. A schedule on which the
    shipped core fails first is dropped (that is the main test's business)."""

    def make_worlds(self, **config: Any) -> list[World]:
        return [World(**config), *super().make_worlds(**config)]

    def each(self, step: Callable[[World], None], dt: float | None = None) -> None:
        reference, faulty = self.worlds
        try:
            step(reference)
            if dt is not None:
                reference.advance(dt)
        except Violation:
            assume(False)
        step(faulty)
        if dt is not None:
            faulty.advance(dt)

    def teardown(self) -> None:
        if not self.worlds:
            return
        reference, faulty = self.worlds
        try:
            reference.finish()
        except Violation:
            return
        faulty.finish()


# -- the steps, on one world ----------------------------------------------------------------------

def frame(c: SimClient, kinds: list[str]) -> bytes:
    """The requests' bytes, placed at the end of the client's stream."""
    data = bytearray()
    for kind in kinds:
        req = c.new_request(kind)
        req.start = len(c.stream) + len(data)
        req.end = req.start + len(req.data)
        data += req.data
    return bytes(data)


def burst(w: World, who: str, kind: str, n: int) -> None:
    c = w.client(who)
    c.write(frame(c, [kind] * n))


def trickle(w: World, who: str, how: str, before: int) -> None:
    c = w.client(who)
    data = frame(c, [GOOD] * before)
    req = c.new_request(GOOD)
    req.start = len(c.stream) + len(data)
    req.end = req.start + len(req.data)
    c.spent = True
    if how == "tls":
        c.write(data)
        c.tls_pending = True
        for i in range(12):
            w.schedule(w.now + i * TRICKLE_EVERY, tls_fragment, c, req, i == 11)
    elif how == "bytes":
        c.write(data + req.data[:1])
        for i in range(1, len(req.data)):
            w.schedule(w.now + i * TRICKLE_EVERY, c.write, req.data[i:i + 1])
    else:
        c.write(data + req.data[:5])


def stall(w: World, who: str) -> None:
    c = w.client(who)
    c.stalled = True
    c.write(frame(c, [GOOD] * 5))


def hang_up(w: World, who: str, garbage: bool) -> None:
    c = w.client(who)
    c.spent = True
    if garbage:
        c.write(GARBAGE_FRAME)
    else:
        c.eof_sent = True
        w.inputs[c] = None
        w.settle()


def tls_fragment(c: SimClient, req: SimRequest, last: bool) -> None:
    """One fragment of a TLS record; the last one completes it (its plaintext is the request)."""
    if c.closed or not c.tls_pending:
        return
    if last:
        c.tls_pending = False
        c.tls_partial_since = -1.0
        c.write(req.data)
    else:
        c.tls_unread += 1
        c.world.inputs[c] = None
        c.world.settle()


def run_sim(machine: type[RequestPathSim], examples: int = EXAMPLES, *,
            shrink: bool = SHRINK) -> None:
    if SEED is not None:
        machine = seed(int(SEED))(type(machine.__name__, (machine,), {}))
    with no_local_constants():
        run_state_machine_as_test(machine, settings=sim_settings(examples, shrink=shrink))


def test_request_path_simulation() -> None:
    """2,000 schedules of 50 steps against the core as shipped."""
    run_sim(RequestPathSim)


# -- schedules the simulation found (the core failed them when they were written) ---------------

def replay(steps: Callable[[RequestPathSim], None]) -> None:
    """Run one fixed schedule (as hypothesis prints it) against the shipped core."""
    state = RequestPathSim()
    steps(state)
    state.check_world()
    state.teardown()


def test_schedule_stopping_half_way_after_a_pipelined_burst() -> None:
    """More requests than max_pipelined in one write, then half of one more: the half request
    must close the connection within request_complete_timeout (not idle_timeout)."""
    def steps(state: RequestPathSim) -> None:
        state.setup(pool=1, depth=1, serial=False, pollers=1, think=0.15)
        state.trickle(who="bad0", how="stop", before=20, dt=3.0)
    replay(steps)


def test_schedule_pipelined_unknown_transaction_ids() -> None:
    """One client pipelines requests the PLC answers with unknown transaction ids (depth 2: two
    of its requests share a link): the resets are its own, nobody else gets 0x0A."""
    def steps(state: RequestPathSim) -> None:
        state.setup(pool=2, depth=2, serial=False, pollers=1, think=0.05)
        state.burst(who="bad0", kind="unknown_tid", n=20, dt=1.2)
    replay(steps)


def test_schedule_plc_stops_answering_three_times() -> None:
    """The PLC stops answering for 0.8 s three times: a well-behaved poller is not refused by
    the breaker afterwards (the late replies it was owed were the PLC's fault)."""
    def steps(state: RequestPathSim) -> None:
        state.setup(pool=1, depth=1, serial=False, pollers=1, think=0.05)
        for _ in range(3):
            state.plc_episode(mode="mute", duration=0.8, dt=3.0)
            state.wait(dt=3.0)
        for _ in range(2):
            state.wait(dt=3.0)
    replay(steps)


def test_schedule_busy_link_preferred_to_one_owed_a_late_reply() -> None:
    """A one-at-a-time PLC still works on a client's late register on link 0 while link 1 is
    busy with good requests: a poller's request waits for link 1 rather than queue behind the
    late register on link 0 (a slow register costs the client that reads it)."""
    def steps(state: RequestPathSim) -> None:
        state.setup(pool=2, depth=2, serial=True, pollers=1, think=0.05)
        state.burst(who="bad0", kind="late", n=2, dt=1.6)
        state.burst(who="bad1", kind="good", n=20, dt=1.2)
        state.burst(who="bad1", kind="good", n=20, dt=1.2)
    replay(steps)


def test_schedule_two_misbehaving_clients_hold_both_links() -> None:
    """Two misbehaving clients, one pipelining late registers, one slow ones, on a pool of two
    and a one-at-a-time PLC: each holds one link, so a poller cannot be served within the
    bound; the simulation excuses it (the guarantee is for one misbehaving client per spare
    link) instead of calling it a fault."""
    def steps(state: RequestPathSim) -> None:
        state.setup(pool=2, depth=2, serial=True, pollers=2, think=0.05)
        state.burst(dt=0.02, kind="late", n=20, who="bad0")
        state.burst(dt=1.2, kind="no_route", n=2, who="bad0")
        state.burst(dt=1.2, kind="slow", n=20, who="bad1")
        state.wait(dt=3.0)
    replay(steps)


def test_schedule_unplaceable_replies_with_two_clients_on_one_link() -> None:
    """pool 1, depth 2: a client's requests are answered with unknown transaction ids (and
    broken frames) while a well-behaved poller's request shares the link, so nobody can be
    blamed; those resets must not start the backoff that would answer the poller's next
    request 0x0A (found by the simulation in a CI run)."""
    def steps(state: RequestPathSim) -> None:
        state.setup(pollers=1, serial=False, depth=2, pool=1, think=0.05)
        state.wait(dt=0.05)
        state.burst(dt=0.0, kind='wrong_unit', n=1, who='bad1')
        state.stall(dt=0.02, who='bad0')
        state.wait(dt=0.05)
        state.wait(dt=0.3)
        state.burst(dt=0.02, kind='bad_pdu', n=20, who='bad0')
        state.stall(dt=0.02, who='bad0')
        state.wait(dt=0.3)
        state.burst(dt=1.2, kind='never', n=5, who='bad1')
        state.wait(dt=0.3)
        state.wait(dt=1.0)
        state.wait(dt=0.3)
        state.stall(dt=0.02, who='bad1')
        state.burst(dt=0.0, kind='wrong_function', n=5, who='bad0')
        state.burst(dt=0.0, kind='short_count', n=20, who='bad1')
        state.stall(dt=1.2, who='bad1')
        state.burst(dt=0.4, kind='never', n=5, who='bad0')
        state.burst(dt=0.1, kind='late', n=20, who='bad0')
        state.wait(dt=1.0)
        state.wait(dt=3.0)
        state.burst(dt=1.2, kind='late', n=5, who='bad0')
        state.burst(dt=0.1, kind='good', n=1, who='bad1')
        state.burst(dt=1.2, kind='write', n=20, who='bad1')
        state.stall(dt=0.4, who='bad1')
        state.burst(dt=0.4, kind='slow', n=5, who='bad0')
        state.burst(dt=0.1, kind='plc_exception', n=1, who='bad0')
        state.burst(dt=0.02, kind='unknown_tid', n=20, who='bad1')
        state.burst(dt=0.0, kind='bad_pdu', n=20, who='bad0')
        state.burst(dt=0.0, kind='late', n=1, who='bad1')
        state.stall(dt=0.0, who='bad0')
        state.wait(dt=1.0)
        state.stall(dt=1.2, who='bad0')
    replay(steps)
