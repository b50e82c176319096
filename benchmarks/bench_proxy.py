#!/usr/bin/env python3
"""mbsec against stunnel and haproxy, with the neutral kit in ../shared/bench (not run in CI).

One run measures, interleaved so drift hits every target alike:
  direct (mbload -> mbplc), stunnel, haproxy, and mbsec four ways (mutual TLS -> mbplc):
  mbsec (one process, the defaults), mbsec-workers (``workers = --workers``, default 2:
  processes sharing the port), mbsec-busypoll (``busy_poll_us = --busy-poll-us``, default 50)
  and mbsec-trio (``data_plane = "trio"``, the all-trio reference engine)
at 1x1, 10x1, 100x1 and 10x4 (connections x pipelining depth), FC03 quantity 10, with the
full mbsec policy on (role from the certificate, source network, unit, function, address
range, quantity and response-size limits, a rate limiter sized not to bind). It prints a
table of rps, p50/p99 latency, proxy CPU % and proxy CPU microseconds per request, and the
ratios mbsec/stunnel and mbsec/haproxy. Any request mbload could not validate (mismatch,
bad tid/unit/fc/length/MBAP, exception, timeout, connection or TLS error) fails the run.

Everything it starts (mbplc, stunnel, haproxy, mbsec) is stopped by pid on exit. Ports are
picked free on 127.0.0.1, so it does not collide with another run or service.

    python3 benchmarks/bench_proxy.py --duration 3
    python3 benchmarks/bench_proxy.py --reps 3 --duration 5 --json-out results.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_KIT = REPO.parent / "shared" / "bench"
POINTS = ("1x1", "10x1", "100x1", "10x4")
TARGETS = ("direct", "stunnel", "haproxy", "mbsec", "mbsec-workers", "mbsec-busypoll",
           "mbsec-trio")
MBSEC_TARGETS = ("mbsec", "mbsec-workers", "mbsec-busypoll", "mbsec-trio")
ERROR_KEYS = (
    "mismatch",
    "bad_tid",
    "bad_unit",
    "bad_fc",
    "bad_len",
    "bad_mbap",
    "timeout",
    "conn_error",
    "tls_error",
    "aborted",
)


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a setup step; its output goes to stderr so stdout carries only the tables."""
    say("$ " + " ".join(cmd))
    kw.setdefault("stdout", sys.stderr)
    return subprocess.run(cmd, check=True, text=True, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(
    port: int, proc: subprocess.Popen[Any] | None, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"{what} is not listening on 127.0.0.1:{port} after {timeout:g} s")


# -- prerequisites -----------------------------------------------------------------------


def ensure_packages(install: bool) -> None:
    """stunnel4, haproxy and libssl-dev (mbload links OpenSSL); apt-get them if missing."""
    missing = []
    if not (shutil.which("stunnel4") or shutil.which("stunnel")):
        missing.append("stunnel4")
    if not shutil.which("haproxy"):
        missing.append("haproxy")
    if not Path("/usr/include/openssl/ssl.h").exists():
        missing.append("libssl-dev")
    if not shutil.which("cc") and not shutil.which("gcc"):
        missing.append("build-essential")
    if not missing:
        return
    if not install:
        raise SystemExit(f"missing packages: {' '.join(missing)} (run without --no-install)")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    say(f"installing missing packages with apt-get: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run([*sudo, "apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)
    except subprocess.CalledProcessError:
        run([*sudo, "apt-get", "update"], env=env)
        run([*sudo, "apt-get", "install", "-y", "--no-install-recommends", *missing], env=env)


# -- processes ---------------------------------------------------------------------------


@dataclass
class Stack:
    """Everything this run started, so ``stop`` can end exactly those processes."""

    kit: Path
    work: Path
    peers_env: dict[str, str]
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    peers_started: bool = False

    def cpu_pids(self, name: str) -> list[int]:
        """The processes whose CPU counts for ``name``: a worker set is its main process and
        every worker."""
        pid = self.pid(name)
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        return [pid, *(int(k) for k in kids)]

    def pid(self, name: str) -> int:
        if name in self.procs:
            return self.procs[name].pid
        out = subprocess.run(
            [str(self.kit / "run-peers.sh"), "pid", name],
            env=self.peers_env,
            text=True,
            capture_output=True,
            check=True,
        )
        return int(out.stdout.strip())

    def stop(self) -> None:
        for name, proc in reversed(list(self.procs.items())):
            if proc.poll() is None:
                say(f"stopping {name} (pid {proc.pid})")
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.peers_started:
            subprocess.run(
                [str(self.kit / "run-peers.sh"), "stop"],
                env=self.peers_env,
                check=False,
                stdout=sys.stderr,
            )
            self.peers_started = False


def write_mbsec_config(
    work: Path, port: int, plc_port: int, pool: int, depth: int, workers: int = 1,
    name: str = "mbsec", extra: str = "",
) -> Path:
    """A config and policy that enforce everything a production policy would check."""
    (work / "policy.yaml").write_text(
        f"""\
# Benchmark policy: every check runs for every request (first match wins, default deny).
version: 1
default: deny
mode: enforce
description: mbload operator reads FC03 through mbsec
targets:
  bench-plc:
    description: mbplc, the kit's simulated PLC
    upstream: "127.0.0.1:{plc_port}"
    unit_ids: [1]
limits:
  default: {{requests_per_second: 10000000, burst: 10000000, max_in_flight: 4096}}
rules:
  - id: no-writes-on-bench
    description: Writes are refused before any allow rule is looked at
    action: deny
    targets: [bench-plc]
    functions: [write_single_coil, write_single_register, write_multiple_coils,
                write_multiple_registers, mask_write_register, read_write_multiple_registers]
  - id: operator-read-bench
    description: Operators on localhost read holding registers 0-999 of the bench PLC
    roles: [operator]
    sources: ["127.0.0.0/8"]
    targets: [bench-plc]
    functions: [read_holding_registers]
    addresses: ["0-999"]
    max_quantity: 125
    max_response_bytes: 252
tests:
  - {{role: operator, source: 127.0.0.1, unit: 1, function: read_holding_registers,
     address: 0, quantity: 10, expect: allow, rule: operator-read-bench}}
  - {{role: operator, source: 127.0.0.1, unit: 1, function: write_single_register,
     address: 0, value: 1, expect: deny, rule: no-writes-on-bench}}
  - {{role: engineer, source: 127.0.0.1, unit: 1, function: read_holding_registers,
     address: 0, quantity: 10, expect: deny}}
"""
    )
    cfg = work / f"{name}.toml"
    cfg.write_text(
        f"""\
listen = ["127.0.0.1:{port}"]
policy = "policy.yaml"
workers = {workers}
{extra}
[tls]
cert = "certs/server.crt"
key = "certs/server.key"
client_ca = "certs/ca.crt"

[upstreams.bench-plc]
host = "127.0.0.1"
port = {plc_port}
unit_ids = [1]
pool_size = {pool}
depth = {depth}

[limits]
max_connections = 4096
max_per_identity = 4096
max_per_source = 4096
max_pipelined = 16

[logging]
level = "info"
allowed_requests = "off"
stdout = false
file = "{name}.log"
"""
    )
    return cfg


@contextlib.contextmanager
def started_stack(args: argparse.Namespace, work: Path) -> Iterator[tuple[Stack, dict[str, int]]]:
    kit: Path = args.kit
    ports = {
        "direct": free_port(),
        "stunnel": free_port(),
        "haproxy": free_port(),
        "mbsec": free_port(),
        "mbsec-workers": free_port(),
        "mbsec-busypoll": free_port(),
        "mbsec-trio": free_port(),
    }
    peers_env = dict(
        os.environ,
        RUNDIR=str(work / "peers"),
        STUNNEL_PORT=str(ports["stunnel"]),
        HAPROXY_PORT=str(ports["haproxy"]),
        UPSTREAM=f"127.0.0.1:{ports['direct']}",
    )
    stack = Stack(kit=kit, work=work, peers_env=peers_env)
    try:
        certs = work / "certs"
        run([str(kit / "gen-certs.sh"), str(certs), "operator"], stdout=subprocess.DEVNULL)

        plc_log = (work / "mbplc.log").open("w")
        say(f"starting mbplc on 127.0.0.1:{ports['direct']}")
        stack.procs["mbplc"] = subprocess.Popen(
            [str(kit / "mbplc"), "--port", str(ports["direct"]), "--quiet"],
            stdout=plc_log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(ports["direct"], stack.procs["mbplc"], "mbplc", 5)

        stack.peers_started = True
        run([str(kit / "run-peers.sh"), "start", str(certs)], env=peers_env)

        mbsec = str(REPO / ".venv" / "bin" / "mbsec")
        if not Path(mbsec).exists():
            mbsec = shutil.which("mbsec") or "mbsec"
        for name in MBSEC_TARGETS:
            if name not in args.target_list:
                continue
            workers = args.workers if name == "mbsec-workers" else 1
            extra = {
                "mbsec-busypoll": f"busy_poll_us = {args.busy_poll_us}\n",
                "mbsec-trio": 'data_plane = "trio"\n',
            }.get(name, "")
            cfg = write_mbsec_config(work, ports[name], ports["direct"], args.pool, args.depth,
                                     workers, name, extra)
            run([mbsec, "policy", "check", "--strict", str(work / "policy.yaml")])
            run([mbsec, "policy", "test", str(work / "policy.yaml")])
            run([mbsec, "config", "check", str(cfg)])
            say(f"starting mbsec serve ({workers} worker(s)) on 127.0.0.1:{ports[name]}")
            out = (work / f"{name}.out").open("w")
            stack.procs[name] = subprocess.Popen(
                [mbsec, "serve", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT
            )
            wait_listening(ports[name], stack.procs[name], name, 15)
        yield stack, ports
    finally:
        stack.stop()


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Result:
    point: str
    target: str
    rep: int
    data: dict[str, Any]
    proxy_pids: list[int]
    plc_pid: int
    exit_status: int

    @property
    def failed(self) -> int:
        return int(self.data.get("requests", 0)) - int(self.data.get("ok", 0))

    def errors(self) -> dict[str, int]:
        errs = {k: int(self.data["errors"].get(k, 0)) for k in ERROR_KEYS}
        for code, n in self.data["errors"].get("exceptions", {}).items():
            errs[f"exception_{code}"] = int(n)
        return {k: v for k, v in errs.items() if v}

    def cpu(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        v = self.data.get("cpu_pct", {}).get(str(pid))
        return float(v) if v is not None else None

    def proxy_cpu(self) -> float | None:
        vals = [self.cpu(p) for p in self.proxy_pids]
        return sum(v for v in vals if v is not None) if vals and None not in vals else None


def mbload(
    stack: Stack, ports: dict[str, int], target: str, point: str, rep: int, duration: float
) -> Result:
    conns, depth = point.split("x")
    certs = stack.work / "certs"
    cmd = [str(stack.kit / "mbload"), "--port", str(ports[target])]
    proxy_pids: list[int] = []
    if target != "direct":
        cmd += ["--tls", "--cert", str(certs / "client.crt"), "--key", str(certs / "client.key")]
        cmd += ["--ca", str(certs / "ca.crt")]
        proxy_pids = stack.cpu_pids(target)
        for pid in proxy_pids:
            cmd += ["--cpu-pid", str(pid)]
    plc_pid = stack.pid("mbplc")
    cmd += ["--cpu-pid", str(plc_pid), "--conns", conns, "--depth", depth]
    cmd += ["--duration", f"{duration:g}", "--fc", "3", "--qty", "10", "--unit", "1", "--quiet"]
    proc = subprocess.run(cmd, text=True, capture_output=True, check=False)
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        raise SystemExit(
            f"mbload gave no JSON for {target} {point} (status {proc.returncode}):\n{proc.stderr}"
        ) from None
    r = Result(point, target, rep, data, proxy_pids, plc_pid, proc.returncode)
    status = "ok" if r.failed == 0 and not r.errors() else f"FAILED {r.failed} {r.errors()}"
    say(
        f"{point:>6} {target:<13} rep {rep}: {data['rps']:>9,.0f} rps  p50 {data['p50_us']:,.0f} us"
        f"  p99 {data['p99_us']:,.0f} us  {status}"
    )
    if r.failed or r.errors():
        say(proc.stderr.strip())
    return r


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(ours: dict[str, float | None], peer: dict[str, float | None] | None, key: str) -> str:
    a = ours.get(key)
    b = peer.get(key) if peer is not None else None
    return "-" if a is None or not b else f"{a / b:.2f}"


def summarize(results: list[Result], points: list[str], targets: list[str]) -> str:
    rows = [
        "| conns x depth | target | ok rps | p50 µs | p99 µs | proxy CPU % | proxy CPU µs/req "
        "| mbplc CPU % | mbload CPU % | failed |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    agg: dict[tuple[str, str], dict[str, float | None]] = {}
    for point in points:
        for target in targets:
            rs = [r for r in results if r.point == point and r.target == target]
            if not rs:
                continue
            cpu = [c for r in rs if (c := r.proxy_cpu()) is not None]
            us = [
                c / 100 * 1e6 / r.data["rps"]
                for r in rs
                if (c := r.proxy_cpu()) is not None and r.data["rps"]
            ]
            a: dict[str, float | None] = {
                "rps": median([r.data["rps"] for r in rs]),
                "p50": median([r.data["p50_us"] for r in rs]),
                "p99": median([r.data["p99_us"] for r in rs]),
                "cpu": median(cpu),
                "us": median(us),
                "plc": median([c for r in rs if (c := r.cpu(r.plc_pid)) is not None]),
                "load": median([float(r.data["cpu_pct"].get("mbload", 0)) for r in rs]),
            }
            agg[(point, target)] = a
            failed = sum(r.failed for r in rs)
            rows.append(
                f"| {point} | {target} | {fmt(a['rps'])} | {fmt(a['p50'])} | {fmt(a['p99'])} "
                f"| {fmt(a['cpu'])} | {fmt(a['us'], '.1f')} | {fmt(a['plc'])} "
                f"| {fmt(a['load'])} | {failed} |"
            )
    ours = [t for t in MBSEC_TARGETS if t in targets]
    if ours:
        rows += [
            "",
            "| conns x depth | mbsec | rps /stunnel | rps /haproxy | p50 -stunnel µs "
            "| CPU/req /stunnel | CPU/req /haproxy |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
    for point in points:
        for target in ours:
            m = agg.get((point, target))
            s = agg.get((point, "stunnel"))
            h = agg.get((point, "haproxy"))
            if m is None:
                continue

            diff = "-"
            if s is not None and s["p50"] is not None and m["p50"] is not None:
                diff = f"{m['p50'] - s['p50']:+,.0f}"
            rows.append(
                f"| {point} | {target} | {_ratio(m, s, 'rps')} | {_ratio(m, h, 'rps')} | {diff} "
                f"| {_ratio(m, s, 'us')} | {_ratio(m, h, 'us')} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="the bench kit (shared/bench)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per mbload run")
    p.add_argument("--reps", type=int, default=1, help="repetitions of the whole matrix")
    p.add_argument("--points", default=",".join(POINTS), help="connsxdepth list")
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of " + ",".join(TARGETS))
    p.add_argument("--pool", type=int, default=4, help="mbsec upstream pool_size to mbplc")
    p.add_argument("--depth", type=int, default=16, help="mbsec upstream depth per connection")
    p.add_argument("--workers", type=int, default=2, help="workers of the mbsec-workers target")
    p.add_argument("--busy-poll-us", type=int, default=50,
                   help="busy_poll_us of the mbsec-busypoll target")
    p.add_argument("--workdir", type=Path, help="keep certs, configs and logs here")
    p.add_argument("--json-out", type=Path, help="append every mbload result as a JSON line")
    p.add_argument("--no-install", action="store_true", help="never apt-get missing packages")
    args = p.parse_args(argv)
    points = [x.strip() for x in args.points.split(",") if x.strip()]
    targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    args.target_list = targets
    unknown = set(targets) - set(TARGETS)
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")

    ensure_packages(not args.no_install)
    run(["make", "-s", "-C", str(args.kit)])
    keep = args.workdir is not None
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="mbsec-bench-"))
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    try:
        with started_stack(args, work) as (stack, ports):
            for rep in range(1, args.reps + 1):
                for point in points:
                    for target in targets:
                        results.append(mbload(stack, ports, target, point, rep, args.duration))
                    for name in MBSEC_TARGETS:
                        proc = stack.procs.get(name)
                        if proc is not None and proc.poll() is not None:
                            raise SystemExit(
                                f"{name} exited during the run; see {name}.out/{name}.log")
    finally:
        if args.json_out is not None:
            with args.json_out.open("a") as f:
                for r in results:
                    rec = {"point": r.point, "target": r.target, "rep": r.rep, "result": r.data}
                    f.write(json.dumps(rec) + "\n")
    bad = [r for r in results if r.failed or r.errors() or r.exit_status != 0]
    if not keep and not bad and len(results) == args.reps * len(points) * len(targets):
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"certs, configs and logs kept in {work}")

    print(
        f"FC03 qty 10, {args.duration:g} s per run, {args.reps} rep(s), interleaved; "
        f"mbsec upstream pool {args.pool} x depth {args.depth} (per worker); mbsec-workers: "
        f"workers = {args.workers}; mbsec-busypoll: busy_poll_us = {args.busy_poll_us}; "
        f"mbsec-trio: data_plane = \"trio\"; {os.cpu_count()} CPUs"
    )
    print(summarize(results, points, targets))
    if bad:
        for r in bad:
            print(
                f"FAILED: {r.target} {r.point} rep {r.rep}: {r.failed} failed, {r.errors()}, "
                f"mbload exit {r.exit_status}",
                file=sys.stderr,
            )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
