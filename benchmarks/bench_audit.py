"""CPU per logged allowed request: structlog's chain against mbsec.audit_fast (not run in CI).

Modes: ``structlog`` (the constructor, then the bound logger: the reference, a write per
line), ``template`` (the constructor, then ``EventWriter(message, fields)``: the connection's
context rendered once per event shape) and ``allowed`` (``EventWriter.allowed``: one format per
kind of request, what ``Decisions.complete`` calls), both with deferred writes (the sink's
writer thread writes them; its CPU is not counted here, one write per 5 ms batch).

The event a connection writes for each allowed request (``allowed_requests = "info"``), with
the context a real connection binds (connection, certificate facts, roles), into a file sink,
from a thread without contextvars as the data plane's. Thread CPU time, so that a busy box
inflates it less than wall time; the median and minimum of ``--reps`` runs.

    .venv/bin/python benchmarks/bench_audit.py --events 20000 --reps 5 [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import pstats
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mbsec import audit, audit_fast, events
from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access, Table
from mbsec.settings import LoggingSettings


def connection_logger(path: Path) -> Any:
    ident = PeerIdentity(
        "CN=hmi-01,OU=operators,O=Plant", "hmi-01", ("operators",), ("hmi-01.plant.example",),
        ("10.0.0.5",), (), "CN=mbsec test CA,O=Plant", 1234567890123, "ab" * 32,
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
        "operator")
    log = audit.make_logger(LoggingSettings(stdout=False, file=path, level="info"))
    log = log.bind(**events.connection_context(17, "127.0.0.1", 50123, "127.0.0.1", 8802))
    return log.bind(**events.peer_context(ident, ["operator"]))


def one_run(log: Any, mode: str, n: int) -> float:
    """µs of thread CPU per event (constructor included, as in Decisions.complete)."""
    access = Access(3, Table.HOLDING_REGISTERS, (100, 10), None, (), None, 5)
    sink = log._logger
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    sink.defer_writes = mode != "structlog"
    info = log.info
    t0 = time.thread_time()
    for i in range(n):
        if mode == "allowed":
            writer.allowed(i & 0xFFFF, 1, 3, access, 0.000321 + i * 1e-9, "operator-read",
                           "allow", "plc1")
            continue
        ev = events.modbus_request_allowed(i & 0xFFFF, 1, 3, access, 0.000321 + i * 1e-9,
                                           "operator-read", "allow", "plc1")
        if mode == "structlog":
            info(ev.message, **ev.fields)
        else:
            writer(ev.message, ev.fields)
    took = (time.thread_time() - t0) / n * 1e6
    sink.flush_deferred(wait=True)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="cProfile one run of each mode")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        log = connection_logger(Path(tmp) / "events.log")
        results: dict[str, list[float]] = {"structlog": [], "template": [], "allowed": []}

        def work() -> None:
            for _ in range(args.reps):
                for mode, runs in results.items():
                    if args.profile:
                        prof = cProfile.Profile()
                        prof.runcall(one_run, log, mode, args.events)
                        print(f"--- {mode}")
                        pstats.Stats(prof).sort_stats("tottime").print_stats(8)
                    else:
                        runs.append(one_run(log, mode, args.events))
            audit.close_logger(log)

        t = threading.Thread(target=work)  # a fresh context, as the data-plane thread
        t.start()
        t.join()
    if not args.profile:
        for mode, runs in results.items():
            print(f"{mode:10} µs/event CPU: median {statistics.median(runs):6.1f}  "
                  f"min {min(runs):6.1f}  runs {' '.join(f'{r:.1f}' for r in runs)}")


if __name__ == "__main__":
    main()
