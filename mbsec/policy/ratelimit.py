"""Per-identity rate limits: token buckets for requests and writes, and an in-flight cap.

The only mutable policy state lives here, apart from the pure engine, with the clock
injected so tests drive time by hand. Keys are :attr:`Principal.key` (certificate
fingerprint, or ``ip:<address>`` without a certificate), so one client's many connections
share one budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from mbsec.modbus.access import Access
from mbsec.policy.engine import Policy, Principal, RateLimit

REASON_IN_FLIGHT: Final = "too_many_in_flight"
REASON_REQUEST_RATE: Final = "request_rate_exceeded"
REASON_WRITE_RATE: Final = "write_rate_exceeded"


@dataclass(slots=True)
class State:
    limit: RateLimit
    tokens: float
    write_tokens: float
    stamp: float
    in_flight: int = 0

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.stamp = now
        lim = self.limit
        if lim.requests_per_second is not None:
            self.tokens = min(lim.burst, self.tokens + elapsed * lim.requests_per_second)
        if lim.writes_per_second is not None:
            self.write_tokens = min(lim.write_burst,
                                    self.write_tokens + elapsed * lim.writes_per_second)

    def idle(self) -> bool:
        return self.in_flight == 0 and self.tokens >= self.limit.burst and \
            self.write_tokens >= self.limit.write_burst


def admit(st: State, access: Access, now: float) -> str | None:
    """Refill ``st`` to ``now``, then take a token (and a write token) and an in-flight slot,
    or return why not. Shared by this limiter and the node-wide one (mbsec.nodestate).

    :meth:`State.refill` written out, and each field read once: this runs for every
    forwarded request (issue 14)."""
    limit = st.limit
    elapsed = now - st.stamp
    if elapsed < 0.0:
        elapsed = 0.0
    st.stamp = now
    rps = limit.requests_per_second
    tokens = st.tokens
    if rps is not None:
        tokens = min(limit.burst, tokens + elapsed * rps)
        st.tokens = tokens
    wps = limit.writes_per_second
    if wps is not None:
        st.write_tokens = min(limit.write_burst, st.write_tokens + elapsed * wps)
    cap = limit.max_in_flight
    if cap is not None and st.in_flight >= cap:
        return REASON_IN_FLIGHT
    if rps is not None and tokens < 1.0:
        return REASON_REQUEST_RATE
    write = wps is not None and access.write is not None
    if write and st.write_tokens < 1.0:
        return REASON_WRITE_RATE
    if rps is not None:
        st.tokens = tokens - 1.0
    if write:
        st.write_tokens -= 1.0
    st.in_flight += 1
    return None


class RateLimiter:
    """Admit or refuse requests per principal according to the policy's ``limits:``.

    ``acquire`` returns None when the request is admitted (and counts it in flight until
    ``release``) or a reason slug when it must be refused. Not thread-safe; one per proxy.
    """

    def __init__(self, policy: Policy, clock: Callable[[], float] = time.monotonic, *,
                 max_entries: int = 10_000) -> None:
        self._policy = policy
        self._clock = clock
        self._max_entries = max_entries
        self._state: dict[str, State] = {}
        #: the last role set asked about and its limit, as one pair (read and replaced in one
        #: step): ``limit_for`` is a pure function of the roles under this limiter's policy,
        #: and a connection asks with the same frozenset (its principal's) for every request
        self._last: tuple[frozenset[str], RateLimit | None] | None = None

    def successor(self, policy: Policy) -> RateLimiter:
        """The limiter for a reloaded policy, sharing this one's budgets and in-flight counts.

        A reload (e.g. the hourly CRL refresh) must not refill a throttled client's buckets;
        a changed limit is applied to the carried state on the client's next request, and a
        release on either limiter decrements the same counter.
        """
        nxt = RateLimiter(policy, self._clock, max_entries=self._max_entries)
        nxt._state = self._state
        return nxt

    def acquire(self, principal: Principal, access: Access) -> str | None:
        roles = principal.roles
        last = self._last
        if last is not None and last[0] is roles:
            limit = last[1]
        else:
            limit = self._policy.limit_for(roles)
            self._last = (roles, limit)
        if limit is None:
            return None
        now = self._clock()
        st = self._state.get(principal.key)
        if st is None:
            if len(self._state) >= self._max_entries:
                self._prune(now)
            st = State(limit, limit.burst, limit.write_burst, now)
            self._state[principal.key] = st
        elif st.limit is not limit:
            st.limit = limit
            st.tokens = min(st.tokens, limit.burst)
            st.write_tokens = min(st.write_tokens, limit.write_burst)
        return admit(st, access, now)

    def release(self, principal: Principal) -> None:
        st = self._state.get(principal.key)
        if st is not None and st.in_flight > 0:
            st.in_flight -= 1

    def in_flight(self, principal: Principal) -> int:
        st = self._state.get(principal.key)
        return st.in_flight if st is not None else 0

    def _prune(self, now: float) -> None:
        """Forget identities that are idle with full buckets (they would start full anyway)."""
        for key, st in list(self._state.items()):
            st.refill(now)
            if st.idle():
                del self._state[key]
