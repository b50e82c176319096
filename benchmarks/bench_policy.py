"""Policy engine benchmark: median and p99 decision time for generated 10- and 500-rule policies.

Plain script (no pytest). Each policy is generated as YAML text, loaded through the real
loader, then a fixed, seeded mix of requests from several roles (reads inside and outside
the granted blocks, writes with values, functions nobody is granted) is decided ``--loops``
times; every single ``Policy.evaluate`` call is timed with ``perf_counter_ns``.

    .venv/bin/python benchmarks/bench_policy.py [--loops 20000] [--rules 10 500]
    .venv/bin/python benchmarks/bench_policy.py --replay-events 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access
from mbsec.policy import Policy, Principal, load_policy_text
from mbsec.policy.cases import Who, build_access

FUNCTIONS = ["read_coils", "read_holding_registers", "read_input_registers",
             "write_single_register", "write_multiple_registers", "write_single_coil"]


def generate(n_rules: int, seed: int = 1) -> str:
    """A plausible large policy: 20 roles, 16 PLC targets, rules per role/target/block."""
    rnd = random.Random(seed)
    lines = ["version: 1", "default: deny", "targets:"]
    for t in range(16):
        lines.append(f"  plc{t}: {{unit_ids: [{t * 2}, {t * 2 + 1}], "
                     f"upstream: \"10.20.{t}.5:502\"}}")
    lines.append("rules:")
    for i in range(n_rules):
        role = f"role{i % 20}"
        fn = FUNCTIONS[rnd.randrange(len(FUNCTIONS))]
        lo = rnd.randrange(0, 60000)
        hi = lo + rnd.randrange(10, 2000)
        lines += [f"  - id: rule-{i}", f"    description: generated rule {i}",
                  f"    roles: [{role}]", f"    targets: [plc{rnd.randrange(16)}]",
                  f"    functions: [{fn}]",
                  # hex: random blocks land on 3xxxx/4xxxx, which plain decimals would flag
                  f"    addresses: [\"{lo:#x}-{min(hi, 65535):#x}\"]"]
        if fn == "write_single_coil":
            lines.append("    coil_states: [on]")
        elif fn.startswith("write"):
            lines.append("    values: {min: 0, max: 1000}")
        elif rnd.random() < 0.5:
            lines.append("    max_quantity: 100")
    return "\n".join(lines) + "\n"


def workload(policy: Policy, seed: int = 2) -> list[tuple[Principal, int, Access]]:
    rnd = random.Random(seed)
    principals = []
    for r in range(0, 20, 3):
        ident = Who(role=f"role{r}", cn=f"client{r}").identity()
        assert isinstance(ident, PeerIdentity)
        principals.append(policy.principal(ident, f"10.10.0.{r + 1}"))
    out: list[tuple[Principal, int, Access]] = []
    for _ in range(500):
        pr = rnd.choice(principals)
        unit = rnd.randrange(32)
        kind = rnd.random()
        addr = rnd.randrange(0, 65000)
        mine = [r for r in policy.rules if r.roles and pr.roles & r.roles and r.read_ranges]
        if mine and rnd.random() < 0.4:  # aim at a block this role is granted
            r = rnd.choice(mine)
            unit = min(r.units or {0})
            assert r.read_ranges is not None
            addr = r.read_ranges[0][0]
            code = min(r.functions)
            values = (1,) if code == 5 else (1, 1) if code == 15 else (7, 7) if code == 16 else (7,)
            acc = build_access(code, address=addr, quantity=2, values=values)
        elif kind < 0.6:
            acc = build_access(3, address=addr, quantity=rnd.randrange(1, 100))
        elif kind < 0.8:
            acc = build_access(16, address=addr, values=tuple(rnd.randrange(0, 1200)
                                                              for _ in range(4)))
        elif kind < 0.9:
            acc = build_access(5, address=addr, values=(1,))
        else:
            acc = build_access(8, subfunction=0)  # nobody is granted diagnostics
        out.append((pr, unit, acc))
    return out


def bench(n_rules: int, loops: int) -> dict[str, float]:
    text = generate(n_rules)
    t0 = time.perf_counter()
    policy = load_policy_text(text, f"generated-{n_rules}.yaml")
    load_ms = (time.perf_counter() - t0) * 1000
    work = workload(policy)
    evaluate = policy.evaluate
    clock = time.perf_counter_ns
    for pr, unit, acc in work:  # warm-up (per-rule decision caches)
        evaluate(pr, unit, acc)
    samples: list[int] = []
    allowed = 0
    n = len(work)
    for i in range(loops):
        pr, unit, acc = work[i % n]
        start = clock()
        d = evaluate(pr, unit, acc)
        samples.append(clock() - start)
        allowed += d.allowed
    # timer overhead, measured the same way, so the numbers are the engine's own cost
    overhead = statistics.median(-(clock() - clock()) for _ in range(loops // 4 or 1))
    samples.sort()
    return {
        "rules": n_rules, "load_ms": load_ms, "overhead_ns": overhead,
        "median_ns": statistics.median(samples) - overhead,
        "p99_ns": samples[int(len(samples) * 0.99) - 1] - overhead,
        "allowed_pct": 100 * allowed / loops,
    }


def write_events(path: Path, n: int, seed: int = 3) -> None:
    """``n`` request events as the proxy logs them (built by mbsec.events' constructors):
    20 clients of 7 roles, reads and writes inside and outside the generated policy's blocks,
    allowed, denied and monitor-mode would_deny with their outcome events."""
    from mbsec import events
    from mbsec.audit import ECS_VERSION, nest_dotted

    rnd = random.Random(seed)
    policy = load_policy_text(generate(500), "generated-500.yaml")
    templates: list[str] = []
    for pr, unit, acc in workload(policy, seed):
        ident = pr.identity
        assert ident is not None
        d = policy.evaluate(pr, unit, acc)
        ctx = {**events.connection_context(rnd.randrange(1, 1000), pr.source_ip, 40000,
                                           "10.0.0.1", 802),
               **events.peer_context(ident, sorted(pr.roles))}
        fc = acc.function_code
        if d.outcome == "allow":
            evs = [events.modbus_request_allowed(1, unit, fc, acc, 0.001, d.rule_id, "allow",
                                                 "plc", level="info")]
        elif rnd.random() < 0.5:
            evs = [events.modbus_request_denied(1, unit, fc, acc, 0.0, d.rule_id, d.reason, 1)]
        else:
            evs = [events.modbus_request_would_deny(1, unit, fc, acc, 0.0, d.rule_id, d.reason),
                   events.modbus_request_allowed(1, unit, fc, acc, 0.001, d.rule_id,
                                                 "would_deny", "plc", level="info")]
        lines = []
        for ev in evs:
            flat = {"@timestamp": "TS", "message": ev.message, **ctx, **ev.fields,
                    "log.level": ev.level, "ecs.version": ECS_VERSION, "service.name": "mbsec"}
            lines.append(json.dumps(nest_dotted(flat), separators=(",", ":")))
        templates.append("\n".join(lines) + "\n")
    with path.open("w") as f:
        written = 0
        i = 0
        while written < n:
            t = templates[i % len(templates)]
            stamp = f"2026-12-{1 + i // 100000 % 28:02d}T{i // 3600 % 24:02d}:" \
                f"{i // 60 % 60:02d}:{i % 60:02d}.{i % 1000000:06d}Z"
            f.write(t.replace('"TS"', f'"{stamp}"', t.count('"TS"')).replace(
                '"transaction_id":1,', f'"transaction_id":{i & 0xFFFF},'))
            written += t.count("\n")
            i += 1


def bench_replay(n: int, keep: Path | None) -> None:
    """``mbsec policy replay`` of ``n`` generated events against the 500-rule policy with one
    rule's roles changed: events/s and the process's peak RSS."""
    import resource
    import tempfile

    from mbsec.policy.records import Reader
    from mbsec.policy.replay import Replayer

    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        path = keep or Path(tmp) / "events.jsonl"
        t0 = time.perf_counter()
        write_events(path, n)
        gen_s = time.perf_counter() - t0
        size = path.stat().st_size
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        candidate = load_policy_text(generate(500).replace("roles: [role3]", "roles: [role4]"),
                                     "candidate.yaml")
        reader = Reader()
        t0, c0 = time.perf_counter(), time.process_time()
        result = Replayer(candidate).run(reader.records([str(path)]))
        took, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines = reader.stats.lines
    print(f"replay: {lines:,} event lines ({size / 1e6:.0f} MB, generated in {gen_s:.0f} s), "
          f"{result.total:,} requests, {result.changed:,} changed")
    print(f"replay: {took:.1f} s wall, {cpu:.1f} s CPU: {lines / cpu:,.0f} events/s "
          f"({lines / took:,.0f} by the wall clock), {result.total / cpu:,.0f} requests/s; "
          f"peak RSS {rss0 / 1024:.0f} MB before, {rss1 / 1024:.0f} MB after")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", type=int, default=20000)
    ap.add_argument("--rules", type=int, nargs="+", default=[10, 500])
    ap.add_argument("--replay-events", type=int, metavar="N",
                    help="instead: time `mbsec policy replay` over N generated events")
    ap.add_argument("--keep", type=Path, metavar="FILE",
                    help="with --replay-events: write the events here and keep them")
    ns = ap.parse_args()
    if ns.replay_events:
        bench_replay(ns.replay_events, ns.keep)
        return
    print(f"{'rules':>6} {'load ms':>9} {'median ns':>10} {'p99 ns':>8} {'allowed %':>10}")
    for n in ns.rules:
        r = bench(n, ns.loops)
        print(f"{r['rules']:>6} {r['load_ms']:>9.1f} {r['median_ns']:>10.0f} "
              f"{r['p99_ns']:>8.0f} {r['allowed_pct']:>10.1f}")
    print(f"(timer overhead {r['overhead_ns']:.0f} ns per call subtracted)")


if __name__ == "__main__":
    main()
