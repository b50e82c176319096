"""mbsec with a lossy link to its PLC: is anything lost, and what do clients wait (issue 10,
item 6). Not run in CI; needs root (benchmarks/lossy_link.py) and the kit's mbplc.

For every configuration (loss share each way, per-route ``rto_min`` on the proxy's side and/or
the PLC's side), a fresh lossy link is built, the kit's ``mbplc`` runs inside the namespace,
and ``--clients`` clients poll it, each one FC03 read of 10 registers every ``--interval-ms``
(a SCADA poll cycle) for ``--duration`` seconds:

* ``mbsec``: mutual-TLS clients on 127.0.0.1 -> ``mbsec serve`` (the default upstream settings:
  ``request_timeout = 2``, ``pool_size = 2``) -> the lossy link -> mbplc;
* ``direct``: the same polls in plain Modbus/TCP straight through the lossy link (what the loss
  costs without mbsec).

Every reply is checked (transaction id, function, the register values mbplc serves); a
Modbus exception, a wrong reply, a closed connection or no reply within 10 s counts as lost.
Printed: per client, requests, lost, and latency percentiles (ms); and the packets the link
dropped.

    .venv/bin/python benchmarks/bench_lossy_plc.py                       # ~4 minutes
    .venv/bin/python benchmarks/bench_lossy_plc.py --duration 10 --configs 0.05:20:20
    .venv/bin/python benchmarks/bench_lossy_plc.py --dead-link    # TCP_USER_TIMEOUT, ~2 min
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lossy_link import LossyLink
from mbsec_stack import KIT, Pki, fc03, make_pki, mbplc_value, mbsec_serve, write_config

PLC_PORT = 502
COUNT = 10


@dataclass
class ClientResult:
    name: str
    latencies: list[float] = field(default_factory=list)
    lost: int = 0
    problems: list[str] = field(default_factory=list)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def poll_client(res: ClientResult, connect: socket.socket, interval: float, until: float,
                seq: int) -> None:
    s = connect
    s.settimeout(10)
    tid = 0
    nxt = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= until:
            break
        if nxt > now:
            time.sleep(nxt - now)
        nxt += interval
        tid = (tid + 1) & 0xFFFF
        address = (seq * 97 + tid * 10) % 990
        t0 = time.perf_counter()
        try:
            s.sendall(fc03(tid, address, COUNT))
            head = _recv_exact(s, 7)
            rtid, _, length, unit = struct.unpack(">HHHB", head)
            body = _recv_exact(s, length - 1)
        except (OSError, ConnectionError) as exc:
            res.lost += 1
            res.problems.append(f"{type(exc).__name__}: {exc}")
            return
        dt = time.perf_counter() - t0
        want = bytes((3, 2 * COUNT)) + struct.pack(
            f">{COUNT}H", *(mbplc_value(a) for a in range(address, address + COUNT)))
        if rtid != tid or unit != 1 or body != want:
            res.lost += 1
            if len(res.problems) < 5:
                res.problems.append(f"tid {tid}: got {body.hex()}")
            continue
        res.latencies.append(dt)
        nxt = max(nxt, time.monotonic())  # a stalled poll does not fire a burst afterwards


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1e3


@dataclass
class Config:
    loss: float
    rto_host: int | None
    rto_plc: int | None

    @property
    def label(self) -> str:
        def r(v: int | None) -> str:
            return "default" if v is None else f"{v}ms"
        return f"{self.loss:.0%} loss, rto_min proxy {r(self.rto_host)} / PLC {r(self.rto_plc)}"


def parse_config(text: str) -> Config:
    parts = text.split(":")
    loss = float(parts[0])

    def ms(i: int) -> int | None:
        return int(parts[i]) if len(parts) > i and parts[i] not in ("", "-") else None

    return Config(loss, ms(1), ms(2))


def run_one(cfg: Config, target: str, args: argparse.Namespace, pki: Pki,
            work: Path) -> tuple[list[ClientResult], dict[str, int]]:
    with LossyLink(loss=cfg.loss, seed=args.seed) as link:
        link.spawn([str(args.kit / "mbplc"), "--bind", link.plc_ip, "--port", str(PLC_PORT),
                    "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        link.set_rto_min(cfg.rto_host, host=True, plc=False)
        link.set_rto_min(cfg.rto_plc, host=False, plc=True)
        time.sleep(0.3)
        results = [ClientResult(f"{target}-{i}") for i in range(args.clients)]

        def clients(connect_one: object) -> None:
            socks = [connect_one() for _ in results]  # type: ignore[operator]
            until = time.monotonic() + args.duration
            threads = [threading.Thread(target=poll_client,
                                        args=(r, s, args.interval_ms / 1e3, until, i))
                       for i, (r, s) in enumerate(zip(results, socks, strict=True))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for s in socks:
                s.close()

        if target == "direct":
            def direct() -> socket.socket:
                s = socket.create_connection((link.plc_ip, PLC_PORT), timeout=10)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            clients(direct)
        else:
            d = work / f"mbsec-{time.monotonic_ns()}"
            d.mkdir()
            conf, port = write_config(d, pki, link.plc_ip, PLC_PORT)
            ctx = pki.client_ctx()

            def tls() -> socket.socket:
                raw = socket.create_connection(("127.0.0.1", port), timeout=10)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return ctx.wrap_socket(raw, server_hostname="localhost")

            with mbsec_serve(conf, port):
                clients(tls)
        return results, link.counters()


def dead_link(args: argparse.Namespace) -> None:
    """How long until a socket with a request in flight learns that its PLC is gone: the
    kernel's default (``tcp_retries2`` = 15, about 15 minutes) against ``TCP_USER_TIMEOUT``."""
    print("\n| PLC link cut with a request in flight | error after s | error |\n|---|---:|---|")
    for user_timeout, rto in ((None, None), (2000, None), (2000, 20), (None, 20)):
        with LossyLink(loss=0.0) as link:
            link.spawn([str(args.kit / "mbplc"), "--bind", link.plc_ip, "--port",
                        str(PLC_PORT), "--quiet"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
            link.set_rto_min(rto)
            time.sleep(0.3)
            s = socket.create_connection((link.plc_ip, PLC_PORT), timeout=5)
            if user_timeout is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, user_timeout)
            s.sendall(fc03(1, 0, 1))
            _recv_exact(s, 11)
            link.cut()
            s.settimeout(args.dead_wait)
            t0 = time.monotonic()
            s.sendall(fc03(2, 0, 1))
            try:
                s.recv(100)
                err = "a reply?"
            except OSError as exc:  # ETIMEDOUT is a TimeoutError too: told apart by errno
                err = (f"{errno.errorcode[exc.errno]} ({exc.strerror})" if exc.errno
                       else f"none within {args.dead_wait:g} s")
            took = time.monotonic() - t0
            s.close()
        label = (f"TCP_USER_TIMEOUT {user_timeout or 'unset'} ms, rto_min "
                 f"{f'{rto}ms' if rto else 'default'}")
        print(f"| {label} | {took:.1f} | {err} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", type=Path, default=KIT, help="the bench kit with mbplc built")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--targets", default="mbsec,direct")
    p.add_argument("--configs", default="0,0.01,0.05,0.05:20:-,0.05:20:20",
                   help="LOSS[:RTO_MIN_PROXY_MS[:RTO_MIN_PLC_MS]],... ('-': kernel default)")
    p.add_argument("--dead-link", action="store_true",
                   help="only measure how long a cut PLC link takes to be noticed")
    p.add_argument("--dead-wait", type=float, default=30.0)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what we started on kill
    if not (args.kit / "mbplc").exists():
        sys.exit(f"{args.kit}/mbplc not built: make -C {args.kit}")
    if args.dead_link:
        dead_link(args)
        return 0
    configs = [parse_config(c) for c in args.configs.split(",")]
    rows = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work)
        for cfg in configs:
            for target in args.targets.split(","):
                results, counters = run_one(cfg, target, args, pki, work)
                for r in results:
                    failed += r.lost
                    rows.append((cfg.label, target, r, counters))
                    print(f"{cfg.label} | {target} | {r.name} | n={len(r.latencies)} "
                          f"lost={r.lost} p50={pct(r.latencies, 50):.2f} "
                          f"p99={pct(r.latencies, 99):.1f} max={pct(r.latencies, 100):.1f} "
                          f"{r.problems[:2]}", flush=True)
                print(f"   link: {counters}", flush=True)
    print("\n| configuration | path | client | requests ok | lost | p50 ms | p90 ms | p99 ms "
          "| p99.9 ms | max ms | packets dropped to PLC / from PLC |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, target, r, c in rows:
        xs = r.latencies
        print(f"| {label} | {target} | {r.name} | {len(xs)} | {r.lost} | {pct(xs, 50):.2f} | "
              f"{pct(xs, 90):.2f} | {pct(xs, 99):.1f} | {pct(xs, 99.9):.1f} | "
              f"{max(xs) * 1e3 if xs else float('nan'):.1f} | "
              f"{c['to_plc_dropped']}/{c['to_plc_dropped'] + c['to_plc_forwarded']} / "
              f"{c['from_plc_dropped']}/{c['from_plc_dropped'] + c['from_plc_forwarded']} |")
    print("\nmedian of per-client p99 by configuration and path:")
    keys = dict.fromkeys((lab, t) for lab, t, _, _ in rows)  # in the order they ran
    for lab, t in keys:
        p99s = [pct(r.latencies, 99) for l2, t2, r, _ in rows if l2 == lab and t2 == t]
        print(f"  {lab} | {t}: {statistics.median(p99s):.1f} ms")
    print(f"\nlost: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
