"""What the node state costs per request (mbsec.nodestate): the rate limiter of one process
against the node-wide one (its buckets in the shared state file, behind flock), and the freeze
lookup every write makes. Also two processes on one client's bucket at once (the contended
case of ``workers = 2``).

    PYTHONPATH=. MBSEC_PURE=1 .venv/bin/python benchmarks/bench_nodestate.py [--n 200000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import tempfile
import time
from pathlib import Path

from mbsec.identity import PeerIdentity
from mbsec.nodestate import FreezeView, NodeState, SharedRateLimiter
from mbsec.policy import RateLimiter, load_policy_text
from mbsec.policy.cases import build_access

POLICY = """\
version: 1
default: deny
limits:
  default: {requests_per_second: 1000000000, burst: 1000000000, max_in_flight: 100}
rules: []
"""
RATE_ONLY = POLICY.replace(", max_in_flight: 100", "")
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
READ = build_access(3)


def principal(fp: str = "aa") -> object:
    policy = load_policy_text(RATE_ONLY)  # the key and roles: the same under both policies
    ident = PeerIdentity(subject="CN=x", common_name="x", organizational_units=(), san_dns=(),
                         san_ip=(), san_uri=(), issuer="CN=ca", serial=1,
                         fingerprint_sha256=fp * 32, not_before=T0, not_after=T0, role=None)
    return policy.principal(ident, "10.0.0.1")


def per_call(fn: object, n: int) -> float:
    call = fn  # type: ignore[assignment]
    t = time.perf_counter()
    for _ in range(n):
        call()  # type: ignore[operator]
    return (time.perf_counter() - t) / n * 1e6


def limiter_cost(lim: object, n: int) -> float:
    pr = principal()

    def one() -> None:
        lim.acquire(pr, READ)  # type: ignore[attr-defined]
        lim.release(pr)  # type: ignore[attr-defined]

    return per_call(one, n)


def deferred_cost(node: NodeState, n: int, per_pass: int = 14) -> float:
    """``workers > 1`` since issue 14's workers round: releases owed, written by one
    ``settle`` per data-plane pass (``per_pass`` replies a pass: 100x1 measured 14)."""
    pr = principal()
    lim = SharedRateLimiter(load_policy_text(POLICY), node)
    node.defer_releases = True

    def one_pass() -> None:
        for _ in range(per_pass):
            lim.acquire(pr, READ)
            lim.release(pr)
        node.settle()

    try:
        return per_call(one_pass, max(1, n // per_pass)) / per_pass
    finally:
        node.settle()
        node.defer_releases = False


def contended(path: str, n: int, out: multiprocessing.Queue,  # type: ignore[type-arg]
              defer: bool = False) -> None:
    node = NodeState.open(Path(path), reset_buckets=False)
    if defer:
        out.put(deferred_cost(node, n))
        return
    out.put(limiter_cost(SharedRateLimiter(load_policy_text(POLICY), node), n))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200_000)
    n = p.parse_args().n
    policy = load_policy_text(POLICY)
    with tempfile.TemporaryDirectory(prefix="ctl-bench-") as d:
        path = Path(d) / "state"
        node = NodeState.open(path, reset_buckets=True)
        rows = [
            ("RateLimiter (one process), acquire + release", limiter_cost(RateLimiter(policy), n)),
            ("SharedRateLimiter, anonymous mapping (one process: tests, the demo)",
             limiter_cost(SharedRateLimiter(policy, NodeState.memory()), n)),
            ("SharedRateLimiter, state file (workers > 1: pthread mutex in the file)",
             limiter_cost(SharedRateLimiter(policy, node), n)),
            ("SharedRateLimiter, state file, no max_in_flight (release is free)",
             limiter_cost(SharedRateLimiter(load_policy_text(RATE_ONLY), node), n)),
            ("SharedRateLimiter, state file, releases settled per pass of 14 (workers > 1)",
             deferred_cost(node, n)),
        ]
        view = FreezeView(node, {1: "plc"})
        rows.append(("FreezeView.frozen (per write, nothing frozen)",
                     per_call(lambda: view.frozen(1), n)))
        node.set_freeze("other", 1)
        rows.append(("FreezeView.frozen (per write, another target frozen)",
                     per_call(lambda: view.frozen(1), n)))
        flock_node = NodeState.open(Path(d) / "flock", reset_buckets=True)
        flock_node._mutex = None  # the fallback where pthread mutexes are missing
        rows.append(("SharedRateLimiter, state file, flock fallback",
                     limiter_cost(SharedRateLimiter(policy, flock_node), n)))
        for defer, what in ((False, ""), (True, ", releases settled per pass of 14")):
            q: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
            procs = [multiprocessing.Process(target=contended, args=(str(path), n, q, defer))
                     for _ in range(2)]
            for pr in procs:
                pr.start()
            both = [q.get() for _ in procs]
            for pr in procs:
                pr.join()
            rows.append((f"SharedRateLimiter, 2 processes on one bucket at once (each){what}",
                         sum(both) / len(both)))
    for name, us in rows:
        print(f"{us:7.2f} µs  {name}")


if __name__ == "__main__":
    main()
