#!/usr/bin/env python3
"""Reconnect storm: 1,000 Modbus masters from 10 source addresses reconnect at once (issue 10,
item 3). Not run in CI.

The same stack as ``bench_handshake_rate.py`` (kit PKI, mbplc, stunnel, haproxy, ``mbsec``
one process, ``mbsec-workers``). For each target, ``--clients`` (default 1,000) clients, spread
evenly over ``--sources`` (default 10) source addresses 127.0.0.1 .. 127.0.0.10, all call
``connect`` at the same instant (a shared start time; the clients run in ``--procs`` client
processes, default 2, each a non-blocking ``selectors`` loop over ``ssl.SSLSocket``s, so the
client side costs OpenSSL's work and little Python). Each client: TCP connect, a full
mutual-TLS handshake with the kit's client certificate (TLS 1.2 by default, ``--tls 1.3``),
one FC03 read of 10 registers of unit 1, the reply checked against mbplc's pattern, close.
A client whose attempt fails (refused, reset, handshake error, ``--attempt-timeout`` seconds
without progress, default 5) closes it and tries again after 100 ms, as a master would, until
``--deadline``; the failed attempts are counted by cause.

Printed per target and repetition: the time from the first ``connect`` until the last client
has its checked reply (``all served``), the 50th/90th/99th percentile of the clients' own
times, failed attempts, the proxy's CPU (``/proc``, every process of it) and the clients'
CPU. Repetitions interleave the targets; the load average before each run is printed.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_reconnect_storm.py --reps 3

``--compare NAME=PATH`` adds ``mbsec@NAME``, one process importing mbsec from the source tree
PATH (``git archive BASE mbsec | tar -x -C PATH``), as in ``bench_handshake_rate.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing as mp
import os
import resource
import selectors
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_handshake_rate import (  # the sibling script holds the stack
    CLK_TCK,
    KIT,
    PEERS,
    add_compare_targets,
    box,
    cpu_ticks,
    handshake_stack,
)
from bench_proxy import ensure_packages, run, say

QTY = 10
UNIT = 1
RETRY_S = 0.1


def request(tid: int) -> bytes:
    return struct.pack(">HHHBBHH", tid, 0, 6, UNIT, 3, 0, QTY)


def reply_ok(data: bytes, tid: int) -> bool:
    want = struct.pack(">HHHBBB", tid, 0, 3 + 2 * QTY, UNIT, 3, 2 * QTY) + b"".join(
        struct.pack(">H", (a * 7 + UNIT) & 0xFFFF) for a in range(QTY))
    return data == want


class Client:
    """One master: connect, handshake, one request, one checked reply."""

    def __init__(self, index: int, source: str) -> None:
        self.index = index
        self.source = source
        self.sock: Any = None
        self.state = "idle"
        self.buf = b""
        self.retry_at = 0.0
        self.progress_at = 0.0
        self.done_at: float | None = None
        self.failures = 0
        self.last_error = ""


def client_process(port: int, ctx_args: tuple[str, str, str, str], sources: list[str],
                   indexes: list[int], start_at: float, deadline_s: float, stall_s: float,
                   out: Any) -> None:
    """Run the clients ``indexes`` (``indexes[i]`` from ``sources[i % len]``) and put
    ``(index, done_at | None, failures, last_error)`` for each, then this process's CPU."""
    cert, key, ca, version = ctx_args
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sel = selectors.DefaultSelector()
    clients = [Client(i, sources[i % len(sources)]) for i in indexes]
    pending = len(clients)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    time.sleep(max(0.0, start_at - time.monotonic()))

    def fail(c: Client, why: str, now: float) -> None:
        c.failures += 1
        c.last_error = why
        if c.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(c.sock)
            c.sock.close()
            c.sock = None
        c.state = "idle"
        c.retry_at = now + RETRY_S

    def start(c: Client, now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.bind((c.source, 0))
        rc = s.connect_ex(("127.0.0.1", port))
        c.sock, c.buf, c.progress_at = s, b"", now
        if rc not in (0, errno.EINPROGRESS):
            fail(c, os.strerror(rc), now)
            return
        c.state = "connecting"
        sel.register(s, selectors.EVENT_WRITE, c)

    def step(c: Client, now: float) -> None:
        nonlocal pending
        c.progress_at = now
        s = c.sock
        if c.state == "connecting":
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(c, os.strerror(err), now)
                return
            sel.unregister(s)
            c.sock = s = ctx.wrap_socket(s, server_hostname="localhost",
                                         do_handshake_on_connect=False)
            sel.register(s, selectors.EVENT_WRITE, c)
            c.state = "handshake"
        if c.state == "handshake":
            try:
                s.do_handshake()
            except ssl.SSLWantReadError:
                sel.modify(s, selectors.EVENT_READ, c)
                return
            except ssl.SSLWantWriteError:
                sel.modify(s, selectors.EVENT_WRITE, c)
                return
            except (ssl.SSLError, OSError) as exc:
                fail(c, f"handshake: {exc}", now)
                return
            try:
                s.send(request(c.index & 0xFFFF))
            except (ssl.SSLError, OSError) as exc:
                fail(c, f"send: {exc}", now)
                return
            c.state = "reply"
            sel.modify(s, selectors.EVENT_READ, c)
            return
        if c.state == "reply":
            try:
                data = s.recv(4096)
            except ssl.SSLWantReadError:
                return
            except (ssl.SSLError, OSError) as exc:
                fail(c, f"read: {exc}", now)
                return
            if not data:
                fail(c, "closed before the reply", now)
                return
            c.buf += data
            if len(c.buf) < 9 + 2 * QTY:
                return
            if not reply_ok(c.buf, c.index & 0xFFFF):
                fail(c, f"bad reply {c.buf.hex()}", now)
                return
            c.done_at = now
            c.state = "done"
            pending -= 1
            sel.unregister(s)
            s.close()
            c.sock = None

    now = time.monotonic()
    for c in clients:
        start(c, now)
    end = start_at + deadline_s
    while pending and now < end:
        for k, _ in sel.select(0.05):
            step(k.data, time.monotonic())
        now = time.monotonic()
        for c in clients:
            if c.state == "idle" and now >= c.retry_at:
                start(c, now)
            elif c.state not in ("idle", "done") and now - c.progress_at > stall_s:
                fail(c, "no progress", now)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in clients:
        out.put((c.index, c.done_at, c.failures, c.last_error))
    out.put(("cpu", (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)))


@dataclass
class Storm:
    target: str
    rep: int
    served: int
    clients: int
    all_served_s: float | None
    p50: float
    p90: float
    p99: float
    failures: int
    errors: dict[str, int]
    proxy_cpu_s: float
    client_cpu_s: float
    load1: float


def storm(stack: Any, port: int, target: str, rep: int, args: argparse.Namespace) -> Storm:
    certs = stack.work / "certs"
    sources = [f"127.0.0.{i}" for i in range(1, args.sources + 1)]
    ctx_args = (str(certs / "client.crt"), str(certs / "client.key"), str(certs / "ca.crt"),
                args.tls)
    pids = stack.cpu_pids(target)
    load1 = os.getloadavg()[0]
    q: Any = mp.get_context("fork").Queue()
    start_at = time.monotonic() + 1.0
    procs = []
    for p in range(args.procs):
        idx = list(range(p, args.clients, args.procs))
        procs.append(mp.get_context("fork").Process(
            target=client_process, args=(port, ctx_args, sources, idx, start_at,
                                         args.deadline, args.attempt_timeout, q)))
    for pr in procs:
        pr.start()
    time.sleep(max(0.0, start_at - time.monotonic()))
    c0 = cpu_ticks(pids)
    results: list[tuple[int, float | None, int, str]] = []
    client_cpu = 0.0
    got_cpu = 0
    while got_cpu < args.procs:
        item = q.get()
        if item[0] == "cpu":
            client_cpu += item[1]
            got_cpu += 1
        else:
            results.append(item)
    c1 = cpu_ticks(pids)
    for pr in procs:
        pr.join()
    times = sorted(d - start_at for _, d, _, _ in results if d is not None)
    errors: dict[str, int] = {}
    for _, _done, f, e in results:
        if f:
            key = e.split(":")[0] + (": " + e.split(":", 1)[1].strip()[:60] if ":" in e else "")
            errors[key] = errors.get(key, 0) + f
    served = len(times)

    def pct(q_: float) -> float:
        return times[min(len(times) - 1, int(q_ * len(times)))] if times else float("nan")

    s = Storm(target, rep, served, args.clients, times[-1] if served == args.clients else None,
              pct(0.5), pct(0.9), pct(0.99), sum(f for _, _, f, _ in results), errors,
              (c1 - c0) / CLK_TCK, client_cpu, load1)
    say(f"rep {rep} {target:<14} served {served}/{args.clients}  all served "
        f"{'-' if s.all_served_s is None else f'{s.all_served_s:.2f} s'}  p50 {s.p50:.2f} s  "
        f"p99 {s.p99:.2f} s  failed attempts {s.failures}  proxy CPU {s.proxy_cpu_s:.1f} s  "
        f"clients CPU {client_cpu:.1f} s  load {load1:.1f}")
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", type=Path, default=KIT, help="the bench kit (shared/bench)")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--sources", type=int, default=10, help="source addresses 127.0.0.1..N")
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--deadline", type=float, default=60.0, help="seconds a storm may take")
    p.add_argument("--attempt-timeout", type=float, default=5.0,
                   help="seconds without progress before a client gives an attempt up")
    p.add_argument("--tls", choices=("1.2", "1.3"), default="1.2")
    p.add_argument("--workers", type=int, default=2, help="workers of mbsec-workers")
    p.add_argument("--keyalg", choices=("ec", "rsa"), default="ec")
    p.add_argument("--targets", help="comma list (default: stunnel,haproxy,mbsec,mbsec-workers)")
    p.add_argument("--python", default=sys.executable, help="the interpreter running mbsec")
    p.add_argument("--workdir", type=Path, help="keep certs, configs and logs here")
    p.add_argument("--no-install", action="store_true", help="never apt-get missing packages")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                   help="also mbsec@NAME: one process importing mbsec from PATH (a source tree, "
                   "e.g. the code before a change); repeatable")
    args = p.parse_args(argv)
    args.crl = False
    all_mbsec = {"mbsec": 1, "mbsec-workers": args.workers}
    add_compare_targets(p, args, all_mbsec)
    targets = ([t.strip() for t in args.targets.split(",") if t.strip()] if args.targets
               else [*PEERS, *all_mbsec])
    ensure_packages(not args.no_install)
    run(["make", "-s", "-C", str(args.kit)])
    work = (args.workdir.resolve() if args.workdir
            else Path(tempfile.mkdtemp(prefix="mbsec-bench-storm-")))
    work.mkdir(parents=True, exist_ok=True)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile[0] < 4 * args.clients:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile[1], 8 * args.clients), nofile[1]))
    print(f"box: {box()}; load average at the start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.clients} clients from {args.sources} source addresses at once, TLS "
          f"{args.tls}, one FC03 read each, {args.procs} client processes, "
          f"{args.reps} repetitions")
    storms: list[Storm] = []
    with handshake_stack(args, work, {t: all_mbsec[t] for t in targets if t in all_mbsec}) as (
            stack, ports):
        print(f"mbsec data plane compiled: {stack.compiled}")
        for rep in range(1, args.reps + 1):
            for target in targets if rep % 2 else targets[::-1]:
                storms.append(storm(stack, ports[target], target, rep, args))
                time.sleep(1.0)  # let TIME_WAIT and the proxies' close paths settle
    print("\nevery repetition (times in s from the first connect):")
    print(f"  {'rep':>3} {'target':<14} {'served':>9} {'all served':>10} {'p50':>5} {'p90':>5} "
          f"{'p99':>5} {'failed':>6} {'proxy CPU':>9} {'clients CPU':>11} {'load1':>5}")
    for s in storms:
        all_s = "-" if s.all_served_s is None else f"{s.all_served_s:.2f}"
        print(f"  {s.rep:>3} {s.target:<14} {s.served:>4}/{s.clients:<4} {all_s:>10} "
              f"{s.p50:5.2f} {s.p90:5.2f} {s.p99:5.2f} {s.failures:6d} {s.proxy_cpu_s:9.1f} "
              f"{s.client_cpu_s:11.1f} {s.load1:5.1f}")
        for why, n in s.errors.items():
            print(f"        {n} x {why}")
    print("\nmedian over repetitions:")
    for t in targets:
        mine = [s for s in storms if s.target == t]
        done = [s.all_served_s for s in mine if s.all_served_s is not None]
        print(f"  {t:<14} all served {statistics.median(done) if done else float('nan'):.2f} s "
              f"({len(done)}/{len(mine)} storms fully served), p50 "
              f"{statistics.median(s.p50 for s in mine):.2f} s, proxy CPU "
              f"{statistics.median(s.proxy_cpu_s for s in mine):.1f} s")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(s.all_served_s is not None for s in storms) else 1


if __name__ == "__main__":
    sys.exit(main())
