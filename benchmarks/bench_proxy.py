#!/usr/bin/env python3
"""mbsec against stunnel and haproxy, with the neutral kit in ../shared/bench (not run in CI).

One run measures, interleaved so drift hits every target alike:
  direct (mbload -> mbplc), stunnel, haproxy, and mbsec three ways (mutual TLS -> mbplc):
  mbsec (one process, the defaults), mbsec-workers (``workers = --workers``, default 2:
  processes sharing the port), mbsec-busypoll (``busy_poll_us = --busy-poll-us``,
  default 50) and mbsec-logall (every allowed request logged: ``allowed_requests = "info"``;
  paired with mbsec repetition by repetition, so the cost of logging them is a ratio)
at 1x1, 10x1, 100x1 and 10x4 (connections x pipelining depth), and 10x1-serial (a PLC with a
1 ms scan serving one request per connection at a time, mbsec pool_size 10 x depth 1, on a
stack of its own), FC03 quantity 10, with the
full mbsec policy on (role from the certificate, source network, unit, function, address
range, quantity and response-size limits, a rate limiter sized not to bind). It prints a
table of rps, p50/p99 latency, proxy CPU % and proxy CPU microseconds per request, and the
ratios mbsec/stunnel and mbsec/haproxy. Any request mbload could not validate (mismatch,
bad tid/unit/fc/length/MBAP, exception, timeout, connection or TLS error) fails the run.

Builds side by side: ``--build NAME=PATH`` (repeatable) names a checkout whose own
``PATH/.venv/bin/mbsec`` serves the targets ``mbsec@NAME`` (and ``mbsec-workers@NAME``,
``mbsec-busypoll@NAME``), each with the same generated config and policy. The repetitions
alternate the order of the targets (odd repetitions as listed, even ones reversed), and the
run prints every repetition and the paired ratios of each build against the first one
(``--baseline``): rps after/before and p50 before/after per repetition, their median per
point, and whether it holds ``--min-ratio``.

Everything it starts (mbplc, stunnel, haproxy, mbsec) is stopped by pid on exit. Ports are
picked free on 127.0.0.1, so it does not collide with another run or service.

    python3 benchmarks/bench_proxy.py --duration 3
    python3 benchmarks/bench_proxy.py --reps 3 --duration 5 --json-out results.jsonl
    python3 benchmarks/bench_proxy.py --build before=/tmp/bench-before \
        --build after=/tmp/bench-after --reps 7 --duration 12
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
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
#: issue 14's slow-PLC point: a PLC with a 1 ms scan that serves one request per connection at
#: a time (``mbplc --delay-us 1000 --serial``), 10 clients of depth 1, mbsec ``pool_size = 10``
#: and ``depth = 1``. It runs on a stack of its own (its own mbplc, peers and mbsec processes).
SERIAL_POINT = "10x1-serial"
SERIAL_PLC_ARGS = ("--delay-us", "1000", "--serial")
SERIAL_POOL, SERIAL_DEPTH = 10, 1
TARGETS = (
    "direct", "stunnel", "haproxy", "mbsec", "mbsec-workers", "mbsec-busypoll", "mbsec-logall"
)
#: the mbsec configurations; each is a target on its own (this checkout's .venv) and, for a
#: ``--build NAME=PATH``, as ``KIND@NAME`` (that checkout's .venv)
MBSEC_KINDS = ("mbsec", "mbsec-workers", "mbsec-busypoll", "mbsec-logall")
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


def kind_of(target: str) -> str:
    """``mbsec-workers@after`` -> ``mbsec-workers``; ``stunnel`` -> ``stunnel``."""
    return target.split("@", 1)[0]


def build_of(target: str) -> str | None:
    return target.split("@", 1)[1] if "@" in target else None


def is_mbsec(target: str) -> bool:
    return kind_of(target) in MBSEC_KINDS


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
    #: what each mbsec target's ``server-start`` event says about its data plane
    compiled: dict[str, Any] = field(default_factory=dict)

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



#: the benchmark policy (``{plc_port}`` filled in): every check runs for every request
POLICY_TEMPLATE = """\
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

def write_mbsec_config(
    work: Path,
    port: int,
    plc_port: int,
    pool: int,
    depth: int,
    workers: int = 1,
    name: str = "mbsec",
    extra: str = "",
    allowed_requests: str = "off",
) -> Path:
    """A config and policy that enforce everything a production policy would check."""
    (work / "policy.yaml").write_text(POLICY_TEMPLATE.format(plc_port=plc_port))
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

[admin]
# no admin socket, and a node state file of its own: targets run side by side on one host
socket = ""
state_file = "{name}.state"

[logging]
level = "info"
allowed_requests = "{allowed_requests}"
stdout = false
file = "{name}.log"
"""
    )
    return cfg


def mbsec_exe(args: argparse.Namespace, target: str) -> str:
    build = build_of(target)
    root = REPO if build is None else args.builds[build]
    exe = root / ".venv" / "bin" / "mbsec"
    if exe.exists():
        return str(exe)
    if build is not None:
        raise SystemExit(f"--build {build}={root}: no {exe} (make its .venv and pip install -e)")
    return shutil.which("mbsec") or "mbsec"


def data_plane_compiled(log: Path, proc: subprocess.Popen[Any], timeout: float) -> Any:
    """The ``mbsec.data_plane_compiled`` field of the ``server-start`` event in the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            for line in log.read_text().splitlines():
                if "data_plane_compiled" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    return _find_key(json.loads(line), "mbsec.data_plane_compiled")
        time.sleep(0.1)
    return None


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        head, _, rest = key.partition(".")
        if rest and isinstance(obj.get(head), dict):
            return _find_key(obj[head], rest)
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


def point_shape(point: str) -> tuple[str, str]:
    """``10x4`` -> (``10``, ``4``); the serial point is 10x1 on its own stack."""
    conns, depth = point.removesuffix("-serial").split("x")
    return conns, depth


@contextlib.contextmanager
def started_stack(
    args: argparse.Namespace, work: Path, serial: bool = False
) -> Iterator[tuple[Stack, dict[str, int]]]:
    kit: Path = args.kit
    work.mkdir(parents=True, exist_ok=True)
    pool, depth = (SERIAL_POOL, SERIAL_DEPTH) if serial else (args.pool, args.depth)
    ports = {name: free_port() for name in ("direct", "stunnel", "haproxy", *args.target_list)}
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
            [str(kit / "mbplc"), "--port", str(ports["direct"]), "--quiet",
             *(SERIAL_PLC_ARGS if serial else ())],
            stdout=plc_log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(ports["direct"], stack.procs["mbplc"], "mbplc", 5)

        stack.peers_started = True
        run([str(kit / "run-peers.sh"), "start", str(certs)], env=peers_env)

        for name in args.target_list:
            if not is_mbsec(name):
                continue
            kind = kind_of(name)
            mbsec = mbsec_exe(args, name)
            workers = args.workers if kind == "mbsec-workers" else 1
            extra = f"busy_poll_us = {args.busy_poll_us}\n" if kind == "mbsec-busypoll" else ""
            # the same config for every build: only the port and the log file differ
            cfg = write_mbsec_config(
                work, ports[name], ports["direct"], pool, depth, workers, name, extra,
                "info" if kind == "mbsec-logall" else "off",
            )
            run([mbsec, "policy", "check", "--strict", str(work / "policy.yaml")], cwd=work)
            run([mbsec, "policy", "test", str(work / "policy.yaml")], cwd=work)
            run([mbsec, "config", "check", str(cfg)], cwd=work)
            say(f"starting {name}: {mbsec} serve ({workers} worker(s)) on 127.0.0.1:{ports[name]}")
            out = (work / f"{name}.out").open("w")
            # cwd is the work directory, so no checkout's sources shadow the build's own
            stack.procs[name] = subprocess.Popen(
                [mbsec, "serve", "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=work,
            )
            wait_listening(ports[name], stack.procs[name], name, 15)
            stack.compiled[name] = data_plane_compiled(work / f"{name}.log", stack.procs[name], 10)
            say(f"{name}: data plane compiled = {stack.compiled[name]}")
            if stack.compiled[name] is not True:
                say(f"WARNING: {name} runs the interpreted data plane (reinstall its .venv)")
            if (
                build_of(name) is not None
                and stack.compiled[name] is not True
                and not args.allow_interpreted
            ):
                raise SystemExit(
                    f"{name}: the server-start event says data_plane_compiled = "
                    f"{stack.compiled[name]} (see {work / (name + '.log')}); "
                    "--allow-interpreted to measure it anyway"
                )
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
    #: position of this run among the targets of its point and repetition (1 = first)
    slot: int = 0
    #: a worker set: established client connections per worker pid, sampled once mid-run
    shares: dict[int, int] = field(default_factory=dict)
    #: the proxy's user and system CPU seconds over the run (/proc, every process and thread)
    user_s: float | None = None
    sys_s: float | None = None

    def split_us(self) -> tuple[float, float] | None:
        """User and system CPU µs per ok request."""
        ok = int(self.data.get("ok", 0))
        if self.user_s is None or self.sys_s is None or not ok:
            return None
        return 1e6 * self.user_s / ok, 1e6 * self.sys_s / ok

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
    conns, depth = point_shape(point)
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
    shares: dict[int, int] = {}
    before = cpu_times(proxy_pids)
    if len(proxy_pids) > 2:  # a worker set: which worker holds how many client connections
        run = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(min(1.0, duration / 2))
        shares = connections_by_pid(ports[target], proxy_pids[1:])
        out, err = run.communicate()
        proc = subprocess.CompletedProcess(cmd, run.returncode, out, err)
    else:
        proc = subprocess.run(cmd, text=True, capture_output=True, check=False)
    after = cpu_times(proxy_pids)
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        data = json.loads(line)
    except json.JSONDecodeError:
        raise SystemExit(
            f"mbload gave no JSON for {target} {point} (status {proc.returncode}):\n{proc.stderr}"
        ) from None
    r = Result(point, target, rep, data, proxy_pids, plc_pid, proc.returncode)
    r.shares = shares
    if before is not None and after is not None:
        r.user_s, r.sys_s = after[0] - before[0], after[1] - before[1]
    status = "ok" if r.failed == 0 and not r.errors() else f"FAILED {r.failed} {r.errors()}"
    say(
        f"{point:>6} {target:<20} rep {rep}: {data['rps']:>9,.0f} rps  p50 {data['p50_us']:,.0f} us"
        f"  p99 {data['p99_us']:,.0f} us  {status}"
    )
    if r.failed or r.errors():
        say(proc.stderr.strip())
    return r


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pids: list[int]) -> tuple[float, float] | None:
    """User and system CPU seconds of ``pids`` so far (each process's own and its threads',
    ended threads included: stunnel runs a thread per connection)."""
    if not pids:
        return None
    user = system = 0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    except (OSError, IndexError, ValueError):
        return None
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_split(results: list[Result], points: list[str], targets: list[str]) -> str:
    """Medians of the proxies' user and system CPU per request: the interpreter shows in user
    time, the sockets and wake-ups in system time."""
    rows = ["| conns x depth | target | user µs/req | system µs/req | user share |",
            "|---|---|---:|---:|---:|"]
    for point in points:
        for target in targets:
            splits = [x for r in results
                      if r.point == point and r.target == target
                      and (x := r.split_us()) is not None]
            if not splits:
                continue
            u = statistics.median(x[0] for x in splits)
            sy = statistics.median(x[1] for x in splits)
            rows.append(f"| {point} | {target} | {u:.1f} | {sy:.1f} | {100 * u / (u + sy):.0f} % |")
    return "\n".join(rows) if len(rows) > 2 else ""


def connections_by_pid(port: int, pids: list[int]) -> dict[int, int]:
    """Established TCP connections on 127.0.0.1:``port`` held by each of ``pids`` (``ss -p``):
    how SO_REUSEPORT spread the clients over the workers."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
        text=True, capture_output=True, check=False,
    ).stdout
    counts = dict.fromkeys(pids, 0)
    for pid_text in re.findall(r"pid=(\d+)", out):
        pid = int(pid_text)
        if pid in counts:
            counts[pid] += 1
    return counts


def worker_shares(results: list[Result], points: list[str], targets: list[str]) -> str:
    """Issue 14: each worker should take 40-60 % of the connections (at 100x1)."""
    rows = []
    for point in points:
        for target in targets:
            for r in results:
                if r.point != point or r.target != target or not r.shares:
                    continue
                total = sum(r.shares.values())
                parts = ", ".join(
                    f"{n} ({100 * n / total:.0f} %)" if total else str(n)
                    for n in r.shares.values()
                )
                rows.append(f"| {point} | {target} | {r.rep} | {total} | {parts} |")
    if not rows:
        return ""
    head = ("| conns x depth | target | rep | client connections | per worker |\n"
            "|---|---|---:|---:|---|")
    return head + "\n" + "\n".join(rows)


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
    ours = [t for t in targets if is_mbsec(t)]
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


def _r(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _us(r: Result) -> float | None:
    """Proxy CPU microseconds per request."""
    c = r.proxy_cpu()
    return None if c is None or not r.data["rps"] else c / 100 * 1e6 / r.data["rps"]


def _c(r: Result) -> str:
    return fmt(_us(r), ".1f")


def every_repetition(results: list[Result], points: list[str], targets: list[str]) -> str:
    """One row per mbload run, in the order they ran."""
    rows = [
        "| conns x depth | rep | slot | target | ok rps | p50 µs | p99 µs | proxy CPU % "
        "| proxy CPU µs/req | failed |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        for r in sorted((r for r in results if r.point == point), key=lambda r: (r.rep, r.slot)):
            if r.target not in targets:
                continue
            rows.append(
                f"| {point} | {r.rep} | {r.slot} | {r.target} | {fmt(r.data['rps'])} "
                f"| {fmt(r.data['p50_us'])} | {fmt(r.data['p99_us'])} | {fmt(r.proxy_cpu())} "
                f"| {_c(r)} | {r.failed} |"
            )
    return "\n".join(rows)


def versus_peer(results: list[Result], points: list[str], targets: list[str],
                peer: str = "stunnel") -> str:
    """Every mbsec target against ``peer`` repetition by repetition (both ran in the same
    repetition of the same point, back to back): rps ratio, p50 difference and CPU per
    request ratio, and their medians per point (issue 14's ratios are these medians)."""
    if peer not in targets:
        return ""
    by = {(r.point, r.target, r.rep): r for r in results}
    reps = sorted({r.rep for r in results})
    rows = [
        f"| conns x depth | target | rep | rps | {peer} rps | rps /{peer} | p50 µs "
        f"| p50 -{peer} µs | CPU µs/req | CPU/req /{peer} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        for t in targets:
            if not is_mbsec(t):
                continue
            rr: list[float] = []
            dd: list[float] = []
            cc: list[float] = []
            for rep in reps:
                a, b = by.get((point, t, rep)), by.get((point, peer, rep))
                if a is None or b is None:
                    continue
                q = _r(a.data["rps"], b.data["rps"])
                d = a.data["p50_us"] - b.data["p50_us"]
                c = _r(_us(a), _us(b))
                if q is not None:
                    rr.append(q)
                dd.append(d)
                if c is not None:
                    cc.append(c)
                rows.append(
                    f"| {point} | {t} | {rep} | {fmt(a.data['rps'])} | {fmt(b.data['rps'])} "
                    f"| {fmt(q, '.3f')} | {fmt(a.data['p50_us'])} | {d:+,.0f} | {_c(a)} "
                    f"| {fmt(c, '.2f')} |"
                )
            if rr:
                rows.append(
                    f"| **{point}** | **{t}** | **median of {len(rr)}** | | "
                    f"| **{fmt(median(rr), '.3f')}** (min {fmt(min(rr), '.3f')}, max "
                    f"{fmt(max(rr), '.3f')}) | | **{fmt(median(dd), '+,.0f')}** | "
                    f"| **{fmt(median(cc), '.2f')}** |"
                )
    return "\n".join(rows)


def paired(
    results: list[Result],
    points: list[str],
    targets: list[str],
    baseline: str,
    min_ratio: float,
) -> tuple[str, bool]:
    """Each build against the baseline build, kind by kind, repetition by repetition: rps
    after/before and p50 before/after (both > 1 when the other build is better), and their
    medians per point. Returns the table and whether every median rps ratio holds
    ``min_ratio``."""
    pairs = []
    for t in targets:
        build = build_of(t)
        if kind_of(t) == "mbsec-logall":  # the same build with every allowed request logged
            plain = "mbsec" if build is None else f"mbsec@{build}"
            if plain in targets:
                pairs.append((plain, t))
        if build is None or build == baseline:
            continue
        base = f"{kind_of(t)}@{baseline}"
        if base in targets:
            pairs.append((base, t))
    ok = True
    if not pairs:
        return "", ok
    by = {(r.point, r.target, r.rep): r for r in results}
    reps = sorted({r.rep for r in results})
    rows = [
        "| conns x depth | rep | pair (order) | rps before | rps after | rps after/before "
        "| p50 before µs | p50 after µs | p50 before/after | p99 before µs | p99 after µs "
        "| CPU µs/req before | CPU µs/req after | stunnel rps |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for point in points:
        for base, other in pairs:
            rps_r: list[float] = []
            p50_r: list[float] = []
            cpu_r: list[float] = []
            for rep in reps:
                a, b = by.get((point, base, rep)), by.get((point, other, rep))
                if a is None or b is None:
                    continue
                rr = _r(b.data["rps"], a.data["rps"])
                pr = _r(a.data["p50_us"], b.data["p50_us"])
                if rr is not None:
                    rps_r.append(rr)
                if pr is not None:
                    p50_r.append(pr)
                cr = _r(_us(b), _us(a))
                if cr is not None:
                    cpu_r.append(cr)
                first = base if a.slot < b.slot else other
                s = by.get((point, "stunnel", rep))
                rows.append(
                    f"| {point} | {rep} | {other} / {base} ({first} first) "
                    f"| {fmt(a.data['rps'])} | {fmt(b.data['rps'])} | {fmt(rr, '.3f')} "
                    f"| {fmt(a.data['p50_us'])} | {fmt(b.data['p50_us'])} | {fmt(pr, '.3f')} "
                    f"| {fmt(a.data['p99_us'])} | {fmt(b.data['p99_us'])} | {_c(a)} | {_c(b)} "
                    f"| {fmt(s.data['rps']) if s else '-'} |"
                )
            m_rps, m_p50 = median(rps_r), median(p50_r)
            holds = m_rps is not None and m_rps >= min_ratio
            ok = ok and holds
            rows.append(
                f"| **{point}** | **median** | {other} / {base} | | | **{fmt(m_rps, '.3f')}** "
                f"| | | **{fmt(m_p50, '.3f')}** | | | | | |"
            )
            verdicts.append(
                f"{point}: {other} / {base}: median rps ratio {fmt(m_rps, '.3f')} over "
                f"{len(rps_r)} pairs (min {fmt(min(rps_r) if rps_r else None, '.3f')}, "
                f"max {fmt(max(rps_r) if rps_r else None, '.3f')}), median p50 ratio "
                f"{fmt(m_p50, '.3f')}, median CPU/req ratio after/before "
                f"{fmt(median(cpu_r), '.3f')}: {'holds' if holds else 'BELOW'} {min_ratio:g}"
            )
    return "\n".join(rows) + "\n\n" + "\n".join(verdicts), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", type=Path, default=DEFAULT_KIT, help="the bench kit (shared/bench)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per mbload run")
    p.add_argument("--reps", type=int, default=1, help="repetitions of the whole matrix")
    p.add_argument(
        "--points",
        default=",".join((*POINTS, SERIAL_POINT)),
        help=f"connsxdepth list; {SERIAL_POINT} is issue 14's 1 ms serial PLC point",
    )
    p.add_argument(
        "--targets",
        help="subset of " + ",".join(TARGETS) + " and KIND@NAME for a "
        "--build (default: all of them, or with --build: stunnel and mbsec@NAME "
        "for every build)",
    )
    p.add_argument(
        "--build",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a checkout whose PATH/.venv/bin/mbsec serves mbsec@NAME "
        "(also mbsec-workers@NAME, mbsec-busypoll@NAME); repeatable",
    )
    p.add_argument(
        "--baseline", help="the build the others are compared with (default: the first --build)"
    )
    p.add_argument(
        "--min-ratio",
        type=float,
        default=0.97,
        help="the median paired rps ratio each build must hold against the baseline",
    )
    p.add_argument(
        "--allow-interpreted",
        action="store_true",
        help="measure a --build whose data plane is not compiled",
    )
    p.add_argument("--pool", type=int, default=4, help="mbsec upstream pool_size to mbplc")
    p.add_argument("--depth", type=int, default=16, help="mbsec upstream depth per connection")
    p.add_argument("--workers", type=int, default=2, help="workers of the mbsec-workers target")
    p.add_argument(
        "--busy-poll-us", type=int, default=50, help="busy_poll_us of the mbsec-busypoll target"
    )
    p.add_argument("--workdir", type=Path, help="keep certs, configs and logs here")
    p.add_argument("--json-out", type=Path, help="append every mbload result as a JSON line")
    p.add_argument("--no-install", action="store_true", help="never apt-get missing packages")
    args = p.parse_args(argv)
    points = [x.strip() for x in args.points.split(",") if x.strip()]
    args.builds = {}
    for spec in args.build:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or "@" in name or name in args.builds:
            p.error(f"--build {spec}: want NAME=PATH with a new NAME (no '@')")
        args.builds[name] = Path(path).resolve()
    if args.targets is None:
        args.targets = ",".join(
            ["stunnel", *(f"mbsec@{n}" for n in args.builds)] if args.builds else TARGETS
        )
    targets = [x.strip() for x in args.targets.split(",") if x.strip()]
    args.target_list = targets
    unknown = {
        t
        for t in targets
        if not (t in TARGETS or (kind_of(t) in MBSEC_KINDS and build_of(t) in args.builds))
    }
    if unknown:
        p.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.baseline is None and args.builds:
        args.baseline = next(iter(args.builds))
    if args.baseline is not None and args.baseline not in args.builds:
        p.error(f"--baseline {args.baseline}: not a --build")

    ensure_packages(not args.no_install)
    run(["make", "-s", "-C", str(args.kit)])
    keep = args.workdir is not None
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="mbsec-bench-"))
    else:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    load_start = os.getloadavg()
    started = time.time()
    say(f"load average at the start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    compiled: dict[str, Any] = {}
    # the serial point needs a PLC and mbsec configs of its own: a second stack after the first
    groups = [(False, [pt for pt in points if pt != SERIAL_POINT], work),
              (True, [pt for pt in points if pt == SERIAL_POINT], work / "serial")]
    try:
        for serial, group, gwork in groups:
            if not group:
                continue
            with started_stack(args, gwork, serial) as (stack, ports):
                compiled.update(stack.compiled)
                for rep in range(1, args.reps + 1):
                    # odd repetitions run the targets as listed, even ones in reverse, so
                    # neither build of a pair always runs first (ABBA)
                    order = targets if rep % 2 else targets[::-1]
                    for point in group:
                        for slot, target in enumerate(order, 1):
                            r = mbload(stack, ports, target, point, rep, args.duration)
                            r.slot = slot
                            results.append(r)
                        for name, proc in stack.procs.items():
                            if is_mbsec(name) and proc.poll() is not None:
                                raise SystemExit(
                                    f"{name} exited during the run; see {name}.out/{name}.log"
                                )
    finally:
        if args.json_out is not None:
            with args.json_out.open("a") as f:
                for r in results:
                    rec = {
                        "point": r.point,
                        "target": r.target,
                        "rep": r.rep,
                        "slot": r.slot,
                        "result": r.data,
                        "connections_per_worker": {str(k): v for k, v in r.shares.items()},
                        "proxy_user_s": r.user_s,
                        "proxy_sys_s": r.sys_s,
                    }
                    f.write(json.dumps(rec) + "\n")
    load_end = os.getloadavg()
    say(f"load average at the end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    bad = [r for r in results if r.failed or r.errors() or r.exit_status != 0]
    if not keep and not bad and len(results) == args.reps * len(points) * len(targets):
        shutil.rmtree(work, ignore_errors=True)
    else:
        say(f"certs, configs and logs kept in {work}")

    print(
        f"FC03 qty 10, {args.duration:g} s per run, {args.reps} rep(s), interleaved (even "
        f"repetitions in reverse order); mbsec upstream pool_size {args.pool} x depth "
        f"{args.depth} (per worker); mbsec-workers: workers = {args.workers}; mbsec-busypoll: "
        f"busy_poll_us = {args.busy_poll_us}; {os.cpu_count()} CPUs; "
        f"{time.time() - started:.0f} s; load average {load_start[0]:.2f} at the start, "
        f"{load_end[0]:.2f} at the end"
    )
    for name, path in args.builds.items():
        print(f"build {name}: {path} ({path / '.venv' / 'bin' / 'mbsec'})")
    if compiled:
        print("data plane compiled: " + ", ".join(f"{k} {v}" for k, v in compiled.items()))
    if SERIAL_POINT in points:
        print(f"{SERIAL_POINT}: mbplc {' '.join(SERIAL_PLC_ARGS)}, mbsec pool_size "
              f"{SERIAL_POOL} x depth {SERIAL_DEPTH}, 10 clients of depth 1")
    print()
    print(summarize(results, points, targets))
    print("\nEvery repetition (slot: the position in its point's sequence):\n")
    print(every_repetition(results, points, targets))
    split = cpu_split(results, points, targets)
    if split:
        print("\nThe proxies' CPU per request, user and system (medians; /proc):\n")
        print(split)
    shares = worker_shares(results, points, targets)
    if shares:
        print("\nClient connections per worker (sampled once, mid-run):\n")
        print(shares)
    vs = versus_peer(results, points, targets)
    if vs:
        print("\nEvery repetition against stunnel (same repetition, same point):\n")
        print(vs)
    ok = True
    if (args.builds and args.baseline is not None) or any(
        kind_of(t) == "mbsec-logall" for t in targets
    ):
        table, ok = paired(results, points, targets, args.baseline or "", args.min_ratio)
        if table:
            print(f"\nPaired by repetition against {args.baseline}:\n")
            print(table)
            print(f"\nevery median paired rps ratio >= {args.min_ratio:g}: {'yes' if ok else 'NO'}")
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
