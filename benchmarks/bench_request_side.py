"""CPU per request of the request side alone, without sockets or TLS (not run in CI).

One connection's :class:`mbsec.path.decide.Decisions` takes a cached FC03 read (the bench
policy of bench_proxy.py, its rate limit, real ``Metrics``), the reply is checked with
``check_reply`` and completed: what the data-plane thread runs per request besides the I/O.
Run it against builds to compare them (issue 14 round 7, benchmarks/README.md):

    PYTHONPATH=/tmp/build-a python benchmarks/bench_request_side.py --label a

It reports the best of ``--rounds`` rounds of CPU time (``time.process_time``) per request, so
other work on the box costs less of the figure than wall time would. The loop itself (two
``Adu`` per request, as the frame buffer makes them) is included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import struct
import time
from types import SimpleNamespace
from typing import Any

from bench_proxy import POLICY_TEMPLATE

from mbsec.identity import PeerIdentity
from mbsec.metrics import Metrics
from mbsec.modbus.mbap import Adu
from mbsec.path.decide import Decisions, ProxyState
from mbsec.path.plc import check_reply
from mbsec.policy import RateLimiter, load_policy_text

#: bench_proxy.py's policy: the same rules decide here as in the proxy benchmark
POLICY = POLICY_TEMPLATE.format(plc_port=502)


class _QuietLog:
    """A logger with allowed requests off (bench_proxy.py's mbsec target)."""

    def bind(self, **_: Any) -> _QuietLog:
        return self

    def is_enabled_for(self, _: int) -> bool:
        return False

    def info(self, *_: Any, **__: Any) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000, help="requests per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--label", default="", help="printed with the result")
    args = p.parse_args()
    policy = load_policy_text(POLICY)
    now = dt.datetime.now(dt.UTC)
    identity = PeerIdentity(
        subject="CN=mbload", common_name="mbload", organizational_units=(), san_dns=(),
        san_ip=(), san_uri=(), issuer="CN=ca", serial=1, fingerprint_sha256="ab" * 32,
        not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=1),
        role="operator")
    state = ProxyState(tls=None, policy=policy, limiter=RateLimiter(policy))  # type: ignore[arg-type]
    d = Decisions(state=lambda: state, identity=identity, peer_ip="127.0.0.1", log=_QuietLog(),
                  metrics=Metrics(), allowed_requests="off", sink=SimpleNamespace(healthy=True))
    request = struct.pack(">BHH", 3, 0, 10)
    reply = bytes([3, 20]) + struct.pack(">10H", *range(10))
    best = float("inf")
    for _ in range(args.rounds):
        t = time.process_time()
        for i in range(args.requests):
            tid = i & 0xFFFF
            adu = Adu(tid, 1, request)
            fwd = d.decide(adu, 1.0)
            assert fwd is not None and not isinstance(fwd, bytes)
            got = check_reply(Adu(tid, 1, reply), 1, fwd.request, "bench-plc")
            d.complete(adu, fwd, got, None, 1.0001)
        best = min(best, (time.process_time() - t) / args.requests)
    assert d.allowed == args.rounds * args.requests
    print(f"{args.label}: {best * 1e9:,.0f} ns CPU per request (best of {args.rounds} x "
          f"{args.requests:,})")


if __name__ == "__main__":
    main()
