"""The simulation bites: five faults the request path once had, each put back into the core by
a subclass here (the shipped code has no switch for them), each caught by the simulation of
test_request_path_sim within its budget (the same number of 50-step schedules).

Each test runs :class:`PairedSim`: the shipped core and the faulty one get the same schedule,
and only a violation the faulty world shows while the shipped one does not counts, so a test
passes only when *this* fault was caught (by the invariant its ``match`` names), never because
of something else. No shrinking: the first failing schedule is enough (it is printed).
"""

from __future__ import annotations

from typing import Any

import pytest

from mbsec.path import exchange as xs
from mbsec.path.client import ClientConn
from mbsec.path.link import Link
from mbsec.path.plc import PathUnavailable
from mbsec.path.target import Target
from sim.plc import Violation
from sim.test_request_path_sim import EXAMPLES, PairedSim, run_sim

GOOD_REPLY = "a well-behaved client's request gets its reply"
#: either half of the poller's guarantee: its reply, or its reply within the bound
GOOD_SERVED = "a well-behaved client's request (gets its reply|completes within)"


class BackoffAfterBadReply(Target):
    """1. A reset caused by a bad reply backs off, as the old code did: no connect attempt for
    the backoff, and the requests waiting meanwhile get 0x0A."""

    def _reset(self, link: Link, reason: str, message: str, now: float, blame: str | None,
               **kw: Any) -> None:
        super()._reset(link, reason, message, now, blame, **kw)
        if kw.get("quiet") or reason == "shutdown":
            return
        self._back_off(now, message)
        for ex in self.wait.take():
            self._fail(ex, PathUnavailable("backing off after a reset", reason="backoff"))


class DownAfterBadReply(Target):
    """2. One bad reply makes the PLC unreachable for every client for ``backoff_initial``
    (as if only a good reply reset the backoff, and every reset started it)."""

    down_until = 0.0

    def _reset(self, link: Link, reason: str, message: str, now: float, blame: str | None,
               **kw: Any) -> None:
        super()._reset(link, reason, message, now, blame, **kw)
        if blame is not None:
            self.down_until = now + self.target.backoff_initial

    def reachable(self, now: float) -> bool:
        return now >= self.down_until and super().reachable(now)


class FreeSlotOnTimeout(Target):
    """3. A timed-out request frees its slot at once (nothing kept owed a late reply): the next
    request goes to a link where a one-at-a-time PLC still works on the previous one, and the
    late reply arrives with a transaction id no longer known."""

    def _sweep(self, link: Link, now: float) -> None:
        super()._sweep(link, now)
        for tid, ex in list(link.overdue.items()):
            del link.overdue[tid]
            self._unpin(ex)
        if link.overdue_timer is not None:
            link.overdue_timer.cancel()
            link.overdue_timer = None


class FifoForAll(Target):
    """4. One FIFO for all clients instead of round robin: the oldest waiting request goes
    first, whoever sent it."""

    def schedule(self, now: float) -> None:
        wait = self.wait
        while wait.count:
            ex = next(e for e in wait.arrivals if e.state == xs.WAITING)
            link = self.place(ex.client, now)
            if link is None:
                break
            wait.remove(ex)
            self._send(link, ex, now)
        if wait.count and now >= self.retry_at:
            self._open_links(now, wait.count)


class NoCompletionDeadline(ClientConn):
    """5. No request-completion deadline: a request may take forever to arrive."""

    def settled(self, tls_partial: bool, now: float) -> None:
        pass


def caught(fault: dict[str, type], match: str) -> None:
    machine = type(f"Paired{next(iter(fault.values())).__name__}", (PairedSim,), dict(fault))
    with pytest.raises(Violation, match=match):
        run_sim(machine, EXAMPLES, shrink=False)


def test_bite_backoff_after_bad_reply() -> None:
    caught({"target_cls": BackoffAfterBadReply}, GOOD_REPLY)


def test_bite_one_bad_reply_makes_the_plc_unreachable() -> None:
    caught({"target_cls": DownAfterBadReply}, GOOD_REPLY)


def test_bite_timed_out_request_frees_its_slot() -> None:
    """The poller's request lands behind the request the PLC still works on: it times out (an
    un-excused 0x0B) or, during a PLC episode that excuses the 0x0B, misses the time bound;
    which comes first depends on the schedules (with the current ones, the bound)."""
    caught({"target_cls": FreeSlotOnTimeout}, GOOD_SERVED)


def test_bite_fifo_for_all() -> None:
    caught({"target_cls": FifoForAll}, GOOD_REPLY)


def test_bite_no_request_completion_deadline() -> None:
    caught({"client_cls": NoCompletionDeadline},
           "not complete within request_complete_timeout is closed")
