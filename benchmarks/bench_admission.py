"""The edge facing peers without a certificate, measured (issue 10 items 1 and 2): the figures
behind the handshake-admission and rejection-log defaults (docs/config.md).

Plain script; real ``mbsec serve`` processes, real sockets, a throw-away PKI, a scripted PLC.
Run as root from the repository (``PYTHONPATH=$PWD``):

    benchmarks/bench_admission.py flood [--seconds 300]
        a rejection flood (silent connections from 8 addresses, 65 each; non-TLS bytes and
        certificate-less handshakes from many /24s) against a proxy whose only log is a file on
        a 2 MiB tmpfs in a mount namespace of its own: bytes written, rate, the projection to
        5 minutes, and whether the process still serves.
    benchmarks/bench_admission.py silent [--probes 400]
        silent floods from 8 addresses (x65) and from 1,000 addresses (one /24 each): share of
        a fresh client's attempts (40/s, one address) that complete a handshake and get a reply
        within 2 s, their latency percentiles, and 50 masters behind one SCADA host
        reconnecting at once during the flood.
    benchmarks/bench_admission.py storm [--clients 50 200 1000]
        reconnect storms without a flood: N clients from one address at once (as many as the
        limits let through: set --per-source), time until all are served and the server-side
        handshake durations, for ``tls.handshake_timeout``.

The figures are for the box it runs on; print ``lscpu`` with them, and say whether the box was
shared.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

# the tests import their conftest as ``conftest`` (pytest puts tests/ on the path); so does
# tests/e2e/test_log_disk_full.py, imported below
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mbsec.pki.ca import CertificateAuthority
from tests.conftest import Pki, ScriptedPlc, http_get, serve_config
from tests.e2e.test_handshake_admission import (
    FRESH,
    PROBE_INTERVAL,
    SCADA,
    attempt,
    mbsec_serve,
    silent_flood,
)
from tests.e2e.test_log_disk_full import FS_BYTES, junk_and_no_certificate, logfs_proxy


def make_pki(d: Path) -> Pki:
    ca = CertificateAuthority.init(d / "ca", common_name="Bench CA")
    out = d / "certs"
    server = ca.issue("server", "mbsec-bench", dns=("localhost",), ips=("127.0.0.1",),
                      out_dir=out, name="server")
    op = ca.issue("client", "op-1", role="operator", out_dir=out, name="operator")
    crl = ca.write_crl(next_update_days=7)
    return Pki(d, ca, server, op, op, op, op, op, crl)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


async def bench_flood(pki: Pki, d: Path, plc: ScriptedPlc, seconds: float) -> dict[str, Any]:
    async with logfs_proxy(pki, d, plc.port) as h:
        before = h.log_bytes()
        t0 = trio.current_time()
        async with silent_flood(h.port, 8, 65, seconds + 30) as flood:
            made = await junk_and_no_certificate(h.port, pki, seconds)
            flood.send_signal(signal.SIGINT)
        elapsed = trio.current_time() - t0
        written = h.log_bytes() - before
        _s, body = await http_get(h.metrics_port, "/metrics")
        refused = sum(float(x.rsplit(" ", 1)[1]) for x in body.splitlines()
                      if x.startswith(('mbsec_connections_total{outcome="too_many',
                                       'mbsec_tls_handshakes_total{outcome="failure"')))
        alive = h.proc.returncode is None
        used = h.used_bytes()
        h.proc.send_signal(signal.SIGTERM)
        await h.proc.wait()
    return {"seconds": round(elapsed, 1), "junk_attempts": made, "rejections": refused,
            "bytes_written": written, "bytes_per_s": round(written / elapsed),
            "projected_5min_kib": round(written / elapsed * 300 / 1024),
            "fs_used_kib": used // 1024, "fs_kib": FS_BYTES // 1024, "still_serving": alive}


async def bench_silent(pki: Pki, d: Path, plc: ScriptedPlc, probes: int) -> list[dict[str, Any]]:
    out = []
    for addresses, per in ((8, 65), (1000, 1)):
        cfg = serve_config(pki, d, plc.port, extra="max_per_identity = 64\n")
        async with mbsec_serve(cfg, d / f"events-{addresses}.jsonl") as (proc, served):
            port = await served.port()
            async with silent_flood(port, addresses, per, 600):
                await trio.sleep(2.0)
                results: list[float | None] = []

                async def one(results: list[float | None] = results, port: int = port) -> None:
                    results.append(await attempt(port, FRESH, pki))

                async with trio.open_nursery() as n:
                    for _ in range(probes):
                        n.start_soon(one)
                        await trio.sleep(PROBE_INTERVAL)
                t0 = trio.current_time()
                masters: list[float | None] = []

                async def master(masters: list[float | None] = masters,
                                 port: int = port) -> None:
                    masters.append(await attempt(port, SCADA, pki, within=10.0))

                async with trio.open_nursery() as n:
                    for _ in range(50):
                        n.start_soon(master)
                storm = trio.current_time() - t0
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        ok = [r for r in results if r is not None]
        out.append({"flood": f"{addresses} addresses x {per}", "attempts": len(results),
                    "within_2s": len(ok), "share": round(len(ok) / len(results), 4),
                    "p50_s": round(pct(ok, .5), 3), "p95_s": round(pct(ok, .95), 3),
                    "p99_s": round(pct(ok, .99), 3),
                    "scada_50_served": sum(m is not None for m in masters),
                    "scada_50_all_served_s": round(storm, 2)})
    return out


async def bench_storm(pki: Pki, d: Path, plc: ScriptedPlc, sizes: list[int],
                      per_source: int) -> list[dict[str, Any]]:
    out = []
    for n_clients in sizes:
        cfg = serve_config(pki, d, plc.port, extra=(
            f"max_per_identity = {n_clients + 8}\nmax_per_source = {n_clients + 8}\n"
            f"max_connections = {max(512, 2 * n_clients)}\n"
            f"max_handshakes = {max(128, n_clients)}\nprefix_connection_burst = "
            f"{max(100, n_clients)}\n"))
        out_file = d / f"storm-{n_clients}.jsonl"
        async with mbsec_serve(cfg, out_file) as (proc, served):
            port = await served.port()
            t0 = trio.current_time()
            done: list[float | None] = []

            async def client(done: list[float | None] = done, port: int = port) -> None:
                done.append(await attempt(port, SCADA, pki, within=30.0))

            async with trio.open_nursery() as n:
                for _ in range(n_clients):
                    n.start_soon(client)
            total = trio.current_time() - t0
            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        hs = [e["event"]["duration"] / 1e9 for e in served.events()
              if e["event"]["action"] == "tls-handshake" and e["event"]["outcome"] == "success"]
        ok = [x for x in done if x is not None]
        out.append({"clients": n_clients, "served": len(ok), "all_served_s": round(total, 2),
                    "client_p50_s": round(pct(ok, .5), 3), "client_max_s": round(max(ok), 3),
                    "server_handshake_p50_s": round(pct(hs, .5), 4),
                    "server_handshake_p99_s": round(pct(hs, .99), 4),
                    "server_handshake_max_s": round(max(hs), 4)})
    return out


async def main(args: argparse.Namespace) -> None:
    d = Path(tempfile.mkdtemp(prefix="admission-bench-"))
    pki = make_pki(d)
    async with trio.open_nursery() as n:
        plc = ScriptedPlc()
        await n.start(plc.serve)
        if args.mode == "flood":
            result: Any = await bench_flood(pki, d, plc, args.seconds)
        elif args.mode == "silent":
            result = await bench_silent(pki, d, plc, args.probes)
        else:
            result = await bench_storm(pki, d, plc, args.clients, 0)
        print(json.dumps(result, indent=1))
        n.cancel_scope.cancel()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["flood", "silent", "storm"])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--probes", type=int, default=400)
    ap.add_argument("--clients", type=int, nargs="+", default=[50, 200])
    sys.exit(trio.run(main, ap.parse_args()) or 0)
