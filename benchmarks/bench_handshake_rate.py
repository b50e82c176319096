#!/usr/bin/env python3
"""Full mutual-TLS handshakes per second: mbsec against stunnel and haproxy (issue 10, item 3).

Not run in CI. One run, on the box it runs on, with the neutral kit in ../shared/bench:

* a test PKI from the kit's ``gen-certs.sh`` (``--keyalg ec``: ECDSA P-256, what mbsec-pki's
  profiles issue; ``--keyalg rsa``: RSA-2048), mbplc as the PLC, stunnel and haproxy from
  ``run-peers.sh``, and ``mbsec serve`` as ``mbsec`` (one process) and ``mbsec-workers``
  (``workers = --workers``, default 2), with the benchmark policy and config of
  ``bench_proxy.py``. ``--crl`` adds ``mbsec-crl``: one process with a CRL of the test CA
  loaded (OpenSSL then checks revocation on every handshake, ``VERIFY_CRL_CHECK_CHAIN``).
* each measurement is ``--clients`` (default 4) parallel ``openssl s_time -new -tls1_2`` with
  the client certificate for ``--duration`` seconds: every connection is a full handshake in
  which the server verifies the client certificate (TLS 1.2: a refused certificate fails the
  handshake and is not counted). The rate is the connections the clients counted divided by
  the wall time from their start to the end of the last one (s_time itself prints whole
  seconds only).
* the proxy's CPU over the run is utime + stime from ``/proc/PID/stat`` of all its processes
  (a worker set: the main process and every worker), so ``CPU ms per handshake`` is the
  proxy's own cost; the clients' CPU (``getrusage`` of the children) is printed too.
* repetitions interleave the targets (odd repetitions as listed, even ones reversed) and the
  load average before each run is printed, because the box may be shared. At the end: every
  repetition, the totals (handshakes and CPU summed over all repetitions: use enough of them
  for >= 10,000 handshakes per target), and the medians of the paired ratios per repetition:
  ``mbsec-workers`` / ``haproxy`` rate, ``mbsec`` / ``stunnel`` CPU per handshake.

Everything it starts is stopped by pid on exit; ports are picked free on 127.0.0.1.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_handshake_rate.py --reps 5 --duration 20
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_handshake_rate.py --keyalg rsa --crl

``mbsec`` runs as ``--python -m mbsec.cli serve`` (default: this interpreter), so it imports
what that interpreter imports (with PYTHONPATH set: this checkout). ``--compare NAME=PATH``
adds ``mbsec@NAME``, one process importing mbsec from the source tree PATH (say the code
before a change, ``git archive BASE mbsec | tar -x -C PATH``), paired with ``mbsec`` per
repetition. ``--openssl-only`` measures only OpenSSL's server CPU per handshake in memory
(mbsec's own context, mbsec-pki certificates, per key type, with and without an intermediate
and a CRL). Figures and the profile behind them: benchmarks/README.md, "Handshake rate".

``--spike`` adds the handshake spike (benchmarks/spike_epoll_handshake.py: accept and the
handshake in one epoll loop outside trio, with mbsec's context, identity, principal and
template-rendered events) as ``spike-py`` (one process, interpreted), ``spike-py2`` (``--workers``
processes, interpreted) and, with
``--spike-build DIR`` (a directory holding the mypyc-compiled module), ``spike-c`` (one
process) and ``spike-c2`` (``--workers`` processes), each with the config of ``mbsec``.
``--openssl-variants`` measures in memory what server options change OpenSSL's CPU per
handshake (mbsec's context against the options haproxy and stunnel use). ``--perf NAME``
(repeatable) runs one more measurement of that target under ``perf record`` and prints its
CPU per handshake split by shared object.

``--established N`` also runs N established clients (mbload N x depth 1, FC03 to mbplc) against
each target, alone and then during its s_time run, and reports the share of their rate kept,
their p50 / p99 / worst latency and the handshakes made meanwhile: what a flood of full
handshakes costs the clients already in (issue 10: a fault costs only whoever caused it;
docs/reliability.md).

``--handshake-nice N[,N...]`` adds ``mbsec-niceN``: one process with ``[limits] handshake_nice
= N`` (the trio thread, which runs the handshakes, N nice steps below the data-plane thread),
paired with ``mbsec`` (0) per repetition; with ``--established`` it shows what the setting buys
the established clients and costs the flood. ``--pin SERVERS:CLIENTS`` (CPU lists as taskset
takes them, e.g. ``0:1``) runs every server (mbplc, stunnel, haproxy, each mbsec and all their
threads) on the CPUs SERVERS and every client (s_time, mbload) on CLIENTS: a DMZ host whose
clients are elsewhere, where the flood's own CPU is not taken from the proxy (the benchmark
process sets its own affinity, which the processes it starts inherit).

``--server-chain root`` gives every server the same chain, leaf and root (R-46; mbsec from a
chain file as ``mbsec-pki`` writes them): with the kit's files haproxy sends the leaf alone, and
the root costs each client 0.1-0.2 ms of CPU per handshake (benchmarks/README.md, "the clients'
CPU explained"). Every repetition prints the clients' CPU per handshake, user and system.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_proxy import (  # the sibling script holds the stack code
    DEFAULT_KIT,
    Stack,
    data_plane_compiled,
    ensure_packages,
    free_port,
    mbload,
    run,
    say,
    wait_listening,
    write_mbsec_config,
)
from memory_handshake import StdServer, run_handshake

PEERS = ("stunnel", "haproxy")
#: the kit next to the checkout, or next to the directory of worktrees (/work/wt/NAME)
KIT = next((k for k in (DEFAULT_KIT, DEFAULT_KIT.parents[2] / "shared" / "bench")
            if k.is_dir()), DEFAULT_KIT)
CLK_TCK = os.sysconf("SC_CLK_TCK")
_COUNT = re.compile(r"(\d+) connections in [\d.]+s;")


def box() -> str:
    """CPU model and count, as lscpu says, for the report."""
    try:
        out = subprocess.run(["lscpu"], text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{os.cpu_count()} CPUs"
    facts = dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in out.splitlines())
    )
    return f"{facts.get('Model name', '?')}, {facts.get('CPU(s)', os.cpu_count())} CPUs"


def write_crl(certs: Path) -> Path:
    """A CRL of the kit's test CA (one unrelated serial revoked), PEM, valid for a week."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    revoked = (x509.RevokedCertificateBuilder().serial_number(0x5EED)
               .revocation_date(now - dt.timedelta(hours=1)).build())
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
           .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=7))
           .add_revoked_certificate(revoked).sign(key, hashes.SHA256()))  # type: ignore[arg-type]
    path = certs / "ca.crl.pem"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def send_root(certs: Path) -> None:
    """Make every server send the same chain, leaf and root, as R-46 asks (docs/compliance.md
    row 7) and as mbsec-pki's chain files hold: ``server-chain.crt`` for mbsec, and haproxy's
    ``server.pem`` with the root after the leaf. stunnel keeps ``server.crt``: OpenSSL's auto
    chain already adds the root from its CAfile. With the kit's files as they are, haproxy
    sends the leaf alone, and its clients spend less CPU per handshake (one certificate fewer
    to parse and check): the ``kit`` chain is not the same work for every server."""
    leaf, root = (certs / "server.crt").read_text(), (certs / "ca.crt").read_text()
    (certs / "server-chain.crt").write_text(leaf + root)
    (certs / "server.pem").write_text(leaf + root + (certs / "server.key").read_text())


def use_chain(args: argparse.Namespace, cfg: Path) -> None:
    """Point an mbsec config at ``server-chain.crt`` under ``--server-chain root``."""
    if getattr(args, "server_chain", "kit") == "root":
        cfg.write_text(cfg.read_text().replace('cert = "certs/server.crt"',
                                               'cert = "certs/server-chain.crt"'))


SPIKE = Path(__file__).resolve().parent / "spike_epoll_handshake.py"
#: spike target -> (processes, compiled); spike-py2's and spike-c2's processes are --workers
SPIKE_TARGETS = {"spike-py": (1, False), "spike-py2": (2, False), "spike-c": (1, True),
                 "spike-c2": (2, True)}
_SPIKE_LOADER = "import sys, spike_epoll_handshake as m; sys.exit(m.main())"


def start_spike(args: argparse.Namespace, stack: Stack, name: str, port: int,
                plc_port: int) -> None:
    """One spike server (benchmarks/spike_epoll_handshake.py) with the config of ``mbsec``."""
    work = stack.work
    procs, comp = SPIKE_TARGETS[name]
    workers = args.workers if procs > 1 else 1
    cfg = write_mbsec_config(work, port, plc_port, 4, 16, workers, name, "", "off")
    use_chain(args, cfg)
    env = dict(os.environ)
    if comp:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(args.spike_build), env.get("PYTHONPATH", "")) if p)
        cmd = [args.python, "-c", _SPIKE_LOADER]
    else:
        cmd = [args.python, str(SPIKE)]
    say(f"starting {name} ({workers} process(es)) on 127.0.0.1:{port}")
    out = work / f"{name}.out"
    stack.procs[name] = subprocess.Popen(
        [*cmd, "--config", str(cfg), "--workers", str(workers)],
        stdout=out.open("w"), stderr=subprocess.STDOUT, cwd=work, env=env)
    wait_listening(port, stack.procs[name], name, 30)
    text = out.read_text()
    stack.compiled[name] = "compiled: True" in text
    if stack.compiled[name] != comp:
        raise SystemExit(f"{name}: wanted compiled = {comp}, it says: {text.strip()[:200]}")
    say(f"{name}: compiled = {stack.compiled[name]}")


@contextlib.contextmanager
def handshake_stack(args: argparse.Namespace, work: Path, mbsec_targets: dict[str, int],
                    spike_targets: tuple[str, ...] = ()
                    ) -> Iterator[tuple[Stack, dict[str, int]]]:
    """mbplc, stunnel, haproxy and one ``mbsec serve`` per entry of ``mbsec_targets``
    (name -> workers; a name ending in ``-crl`` gets the CRL; ``mbsec@NAME`` imports mbsec
    from the ``--compare NAME=PATH`` tree), and the ``spike_targets``."""
    kit: Path = args.kit
    ports = {name: free_port() for name in ("direct", *PEERS, *mbsec_targets, *spike_targets)}
    peers_env = dict(os.environ, RUNDIR=str(work / "peers"),
                     STUNNEL_PORT=str(ports["stunnel"]), HAPROXY_PORT=str(ports["haproxy"]),
                     UPSTREAM=f"127.0.0.1:{ports['direct']}")
    stack = Stack(kit=kit, work=work, peers_env=peers_env)
    try:
        certs = work / "certs"
        run([str(kit / "gen-certs.sh"), str(certs), "operator"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=dict(os.environ, KEYALG=args.keyalg))
        crl = write_crl(certs)
        if getattr(args, "server_chain", "kit") == "root":
            send_root(certs)
        stack.procs["mbplc"] = subprocess.Popen(
            [str(kit / "mbplc"), "--port", str(ports["direct"]), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(ports["direct"], stack.procs["mbplc"], "mbplc", 5)
        stack.peers_started = True
        run([str(kit / "run-peers.sh"), "start", str(certs)], env=peers_env)
        for name, workers in mbsec_targets.items():
            cfg = write_mbsec_config(work, ports[name], ports["direct"], 4, 16, workers, name,
                                     "", "off")
            use_chain(args, cfg)
            if name.startswith("mbsec-nice"):
                text = cfg.read_text().replace(
                    "[limits]\n", f"[limits]\nhandshake_nice = {name[len('mbsec-nice'):]}\n")
                cfg.write_text(text)
            if name.endswith("-crl"):
                text = cfg.read_text().replace(
                    'client_ca = "certs/ca.crt"\n',
                    f'client_ca = "certs/ca.crt"\ncrl = ["{crl.relative_to(work)}"]\n')
                cfg.write_text(text)
            say(f"starting {name} ({workers} worker(s)) on 127.0.0.1:{ports[name]}")
            env = dict(os.environ)
            if "@" in name:
                env["PYTHONPATH"] = str(getattr(args, "compare_paths", {})[name])
            stack.procs[name] = subprocess.Popen(
                [args.python, "-m", "mbsec.cli", "serve", "--config", str(cfg)],
                stdout=(work / f"{name}.out").open("w"), stderr=subprocess.STDOUT, cwd=work,
                env=env)
            wait_listening(ports[name], stack.procs[name], name, 30)
            stack.compiled[name] = data_plane_compiled(work / f"{name}.log",
                                                       stack.procs[name], 10)
            say(f"{name}: data plane compiled = {stack.compiled[name]}")
        for name in spike_targets:
            start_spike(args, stack, name, ports[name], ports["direct"])
        yield stack, ports
    finally:
        stack.stop()


def cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total


@dataclass
class Run:
    target: str
    rep: int
    handshakes: int
    wall_s: float
    proxy_cpu_s: float
    client_cpu_s: float
    load1: float
    client_sys_s: float
    ok: bool

    @property
    def rate(self) -> float:
        return self.handshakes / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.proxy_cpu_s / self.handshakes if self.handshakes else float("nan")


@dataclass
class Established:
    """``--established``: the clients already in, alone and during one s_time run."""

    target: str
    rep: int
    alone: dict[str, Any]
    during: dict[str, Any]
    handshakes: int


def with_established(stack: Stack, ports: dict[str, int], target: str, rep: int,
                     args: argparse.Namespace) -> tuple[Run, Established]:
    """mbload (``--established`` connections x depth 1, FC03) alone for ``--duration``, then
    again while ``--clients`` s_time processes make full handshakes against the same target:
    what a handshake flood (a reconnect storm, or peers with certificates reconnecting as
    fast as they can) costs the clients already in."""
    point = f"{args.established}x1"
    alone = mbload(stack, ports, target, point, rep, args.duration)
    box: dict[str, Any] = {}

    def load() -> None:
        time.sleep(0.5)  # the flood first
        box["r"] = mbload(stack, ports, target, point, rep, max(1.0, args.duration - 1.0))

    t = threading.Thread(target=load)
    t.start()
    r = s_time(stack, ports[target], target, rep, args.clients, args.duration)
    t.join()
    during = box["r"].data
    say(f"rep {rep} {target:<14} established {point}: {alone.data['rps']:,.0f} -> "
        f"{during['rps']:,.0f} rps, p99 {alone.data['p99_us']:,.0f} -> {during['p99_us']:,.0f} us,"
        f" max {during['max_us']:,.0f} us during {r.handshakes} handshakes")
    return r, Established(target, rep, alone.data, during, r.handshakes)


def established_report(rows: list[Established], targets: list[str]) -> str:
    lines = ["", "established clients alone -> during the handshake flood (every repetition):",
             f"  {'rep':>3} {'target':<14} {'rps alone':>9} {'rps during':>10} {'kept':>5} "
             f"{'p50 us':>13} {'p99 us':>15} {'max us':>8} {'handshakes':>10}"]
    for e in rows:
        a, d = e.alone, e.during
        lines.append(
            f"  {e.rep:>3} {e.target:<14} {a['rps']:9,.0f} {d['rps']:10,.0f} "
            f"{d['rps'] / a['rps']:5.2f} {a['p50_us']:6,.0f}->{d['p50_us']:6,.0f} "
            f"{a['p99_us']:7,.0f}->{d['p99_us']:7,.0f} {d['max_us']:8,.0f} {e.handshakes:10d}")
    lines.append("  median share of the established rps kept during the flood:")
    for t in targets:
        kept = [e.during["rps"] / e.alone["rps"] for e in rows if e.target == t]
        if kept:
            lines.append(f"    {t:<14} {statistics.median(kept):.2f} "
                         f"({', '.join(f'{k:.2f}' for k in kept)})")
    base = {e.rep: e for e in rows if e.target == "mbsec"}
    paired = [t for t in targets if t.startswith("mbsec-nice")]
    if base and paired:
        lines.append("  --handshake-nice, paired with mbsec (nice 0) in the same repetition "
                     "(median; per rep):")
        for t in paired:
            mine = [e for e in rows if e.target == t and e.rep in base]
            for what, key in (("established rps during", "rps"), ("p99 during", "p99_us"),
                              ("worst during", "max_us"), ("handshakes", "")):
                ratios = [(e.handshakes / max(base[e.rep].handshakes, 1)) if not key
                          else e.during[key] / max(base[e.rep].during[key], 1e-9)
                          for e in mine]
                if ratios:
                    lines.append(f"    {t:<14} {what:<24} x{statistics.median(ratios):.2f} "
                                 f"({', '.join(f'{r:.2f}' for r in ratios)})")
    return "\n".join(lines)


def s_time(stack: Stack, port: int, target: str, rep: int, clients: int,
           duration: float) -> Run:
    certs = stack.work / "certs"
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-tls1_2",
           "-time", f"{duration:g}", "-cert", str(certs / "client.crt"),
           "-key", str(certs / "client.key"), "-CAfile", str(certs / "ca.crt")]
    pids = stack.cpu_pids(target)
    load1 = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    c0 = cpu_ticks(pids)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(clients)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    c1 = cpu_ticks(pids)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    n, ok = 0, True
    for p, out in zip(procs, outs, strict=True):
        m = _COUNT.search(out)
        if p.returncode != 0 or m is None or "ERROR" in out:
            ok = False
            say(f"{target}: s_time status {p.returncode}: {out.strip()[-300:]}")
        if m is not None:
            n += int(m.group(1))
    client = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    client_sys = ru1.ru_stime - ru0.ru_stime
    r = Run(target, rep, n, wall, (c1 - c0) / CLK_TCK, client, load1, client_sys, ok)
    per = 1000 / max(n, 1)
    say(f"rep {rep} {target:<14} {r.rate:7.1f} hs/s  {r.handshakes:6d} hs  proxy CPU "
        f"{r.cpu_ms:5.2f} ms/hs  clients {client * per:4.2f} ms/hs "
        f"(user {(client - client_sys) * per:4.2f}, sys {client_sys * per:4.2f})  "
        f"load {load1:.1f}"
        f"{'' if ok else '  FAILED'}")
    return r


def ratio_line(runs: list[Run], reps: int, a: str, b: str, what: str) -> str:
    vals = []
    for rep in range(1, reps + 1):
        ra = next((r for r in runs if r.target == a and r.rep == rep), None)
        rb = next((r for r in runs if r.target == b and r.rep == rep), None)
        if ra is None or rb is None:
            continue
        vals.append(ra.rate / rb.rate if what == "rate" else ra.cpu_ms / rb.cpu_ms)
    if not vals:
        return f"  {a} / {b} {what}: -"
    return (f"  {a} / {b} {what}: median {statistics.median(vals):.2f}  "
            f"(per repetition: {', '.join(f'{v:.2f}' for v in vals)})")


def report(runs: list[Run], targets: list[str], reps: int) -> str:
    lines = ["", "every repetition:",
             f"  {'rep':>3} {'target':<14} {'hs/s':>7} {'handshakes':>10} {'CPU ms/hs':>9} "
             f"{'proxy CPU %':>11} {'clients CPU %':>13} {'load1':>5}"]
    for r in runs:
        lines.append(f"  {r.rep:>3} {r.target:<14} {r.rate:7.1f} {r.handshakes:10d} "
                     f"{r.cpu_ms:9.2f} {100 * r.proxy_cpu_s / r.wall_s:11.0f} "
                     f"{100 * r.client_cpu_s / r.wall_s:13.0f} {r.load1:5.1f}"
                     f"{'' if r.ok else '  FAILED'}")
    lines += ["", "totals over all repetitions:",
              f"  {'target':<14} {'median hs/s':>11} {'handshakes':>10} {'CPU ms/hs':>9}"]
    for t in targets:
        mine = [r for r in runs if r.target == t]
        hs = sum(r.handshakes for r in mine)
        cpu = sum(r.proxy_cpu_s for r in mine)
        lines.append(f"  {t:<14} {statistics.median(r.rate for r in mine):11.1f} {hs:10d} "
                     f"{1000 * cpu / hs if hs else float('nan'):9.2f}")
    lines += ["", "paired ratios (same repetition):"]
    for a, b, what in (("mbsec-workers", "haproxy", "rate"), ("mbsec-workers", "stunnel", "rate"),
                       ("mbsec", "haproxy", "rate"), ("mbsec", "stunnel", "rate"),
                       ("mbsec", "stunnel", "cpu"), ("mbsec-workers", "stunnel", "cpu"),
                       ("mbsec", "haproxy", "cpu"), ("mbsec-crl", "mbsec", "cpu"),
                       ("spike-c2", "haproxy", "rate"), ("spike-c2", "mbsec-workers", "rate"),
                       ("spike-c", "haproxy", "rate"), ("spike-c", "haproxy", "cpu"),
                       ("spike-c2", "haproxy", "cpu"), ("spike-py", "haproxy", "cpu"),
                       ("spike-c", "stunnel", "cpu"), ("spike-c", "mbsec", "cpu"),
                       ("spike-py", "mbsec", "cpu"), ("spike-c", "spike-py", "cpu"),
                       ("spike-py2", "haproxy", "rate"), ("spike-py2", "stunnel", "rate"),
                       ("spike-py2", "mbsec-workers", "rate"), ("spike-py2", "haproxy", "cpu"),
                       ("spike-py2", "stunnel", "cpu")):
        if a in targets and b in targets:
            lines.append(ratio_line(runs, reps, a, b, what))
    for other in (t for t in targets if t.startswith("mbsec@")):
        if "mbsec" in targets:
            lines.append(ratio_line(runs, reps, "mbsec", other, "rate"))
            lines.append(ratio_line(runs, reps, "mbsec", other, "cpu"))
    return "\n".join(lines)


# -- OpenSSL's share, in memory ------------------------------------------------------------


def openssl_only(n: int, runs: int) -> str:
    """Server CPU of a full TLS 1.2 mutual handshake inside OpenSSL alone (memory BIOs, no
    sockets, no trio, the client's work excluded), with mbsec's own server context
    (:func:`mbsec.tls.build_material`) and certificates from mbsec-pki, per key type, with
    and without an issuing intermediate and a CRL: the floor a handshake costs any proxy
    using this OpenSSL, and what the key type and the CRL check add to it."""
    import ssl

    from mbsec.pki.ca import CertificateAuthority
    from mbsec.settings import TlsSettings
    from mbsec.tls import build_material

    lines = [f"{'key type':<10} {'intermediate':<12} {'CRL':<4} {'server CPU us/hs':>16} "
             f"{'min':>6} {'max':>6}"]
    with tempfile.TemporaryDirectory(prefix="mbsec-bench-ossl-") as tmp:
        for key_type in ("ec-p256", "rsa-2048"):
            for inter in (False, True):
                d = Path(tmp) / f"{key_type}-{inter}"
                ca = CertificateAuthority.init(d / "ca", common_name=f"Bench {key_type}",
                                               key_type=key_type, intermediate=inter)
                server = ca.issue("server", "mbsec-bench", dns=("localhost",),
                                  out_dir=d / "certs", name="server")
                client = ca.issue("client", "op-1", role="operator", out_dir=d / "certs",
                                  name="client")
                crl = ca.write_crl(d / "crl.pem")
                cctx = ssl.create_default_context(cafile=str(ca.trust_bundle))
                cctx.maximum_version = ssl.TLSVersion.TLSv1_2
                cctx.load_cert_chain(str(client.chain), str(client.key))
                for with_crl in (False, True):
                    sctx = build_material(TlsSettings(
                        cert=server.chain, key=server.key, client_ca=ca.trust_bundle,
                        crl=[crl] if with_crl else [])).context
                    per: list[float] = []
                    for _ in range(runs):
                        spent = 0.0
                        for _ in range(n):
                            spent += _memory_handshake(sctx, cctx)
                        per.append(1e6 * spent / n)
                    lines.append(f"{key_type:<10} {'yes' if inter else 'no':<12} "
                                 f"{'yes' if with_crl else 'no':<4} "
                                 f"{statistics.median(per):16.0f} {min(per):6.0f} "
                                 f"{max(per):6.0f}")
    return "\n".join(lines)


def _memory_handshake(sctx: Any, cctx: Any) -> float:
    """One handshake over memory BIOs (:func:`memory_handshake.run_handshake`); returns the
    server's thread CPU seconds, its ``wrap_bio`` included."""
    clock = time.thread_time
    t0 = clock()
    server = StdServer(sctx)
    spent = clock() - t0
    result = run_handshake(server, cctx, clock=clock)
    if not result.ok:
        raise SystemExit("in-memory handshake failed: "
                         f"{result.server_error or result.client_error}")
    if server.peer_der() is None:
        raise SystemExit("in-memory handshake: no client certificate")
    return spent + result.server_time


# -- which server options change OpenSSL's work (in memory) ---------------------------------

_SSL_CTRL_MODE = 33  # OpenSSL's ssl.h: SSL_CTX_set_mode / SSL_CTX_get_mode (larg 0)
_SSL_CTRL_CLEAR_MODE = 78
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_MODE_RELEASE_BUFFERS = 0x10
_SSL_SESS_CACHE_SERVER = 0x2


def _ssl_ctx(ctx: Any) -> tuple[Any, int]:
    """libssl (ctypes) and the ``SSL_CTX *`` of a Python context, found as
    :func:`mbsec.tls.disable_session_cache` finds it (benchmark only)."""
    import _ssl
    import ctypes

    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_load_client_CA_file.argtypes = [ctypes.c_char_p]
    lib.SSL_load_client_CA_file.restype = ctypes.c_void_p
    lib.SSL_CTX_set_client_CA_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.SSL_CTX_set_client_CA_list.restype = None
    lib.SSL_CTX_set_verify_depth.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_CTX_set_verify_depth.restype = None
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != int(ctx.options):
        raise SystemExit("cannot find the SSL_CTX of a Python context on this build")
    return lib, ptr


def openssl_variants(certs: Path, n: int, runs: int) -> str:
    """OpenSSL's server CPU per full TLS 1.2 mutual handshake in memory (as
    ``--openssl-only``), mbsec's own context (:func:`mbsec.tls.build_material`) with the
    kit's certificates, changed one option at a time toward what haproxy and stunnel run
    with (tickets, a session cache, the client CA list in the CertificateRequest), plus
    options that could change the cost for everyone (buffers, curve, verify depth).
    Variants interleave within each repetition."""
    import ssl

    from mbsec.settings import TlsSettings
    from mbsec.tls import build_material
    from mbsec.tls_keylog import KeyLog

    def base(keylog: KeyLog | None = None) -> Any:
        return build_material(TlsSettings(cert=certs / "server.crt", key=certs / "server.key",
                                          client_ca=certs / "ca.crt"), keylog=keylog).context

    def tickets(ctx: Any) -> None:  # haproxy's and stunnel's default
        ctx.options &= ~ssl.OP_NO_TICKET

    def cache(ctx: Any) -> None:  # a server session cache, as haproxy and stunnel keep
        lib, ptr = _ssl_ctx(ctx)
        lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_SERVER, None)

    def ca_list(ctx: Any) -> None:  # haproxy's ca-file, stunnel's CAfile send the CA names
        lib, ptr = _ssl_ctx(ctx)
        names = lib.SSL_load_client_CA_file(str(certs / "ca.crt").encode())
        if not names:
            raise SystemExit("SSL_load_client_CA_file failed")
        lib.SSL_CTX_set_client_CA_list(ptr, names)

    def keep_buffers(ctx: Any) -> None:
        lib, ptr = _ssl_ctx(ctx)
        lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_CLEAR_MODE, _SSL_MODE_RELEASE_BUFFERS, None)

    def p256(ctx: Any) -> None:
        ctx.set_ecdh_curve("prime256v1")

    def depth1(ctx: Any) -> None:
        lib, ptr = _ssl_ctx(ctx)
        lib.SSL_CTX_set_verify_depth(ptr, 1)

    def haproxy_like(ctx: Any) -> None:
        tickets(ctx)
        cache(ctx)
        ca_list(ctx)

    keylog = KeyLog.open(128)
    variants: dict[str, tuple[Any, KeyLog | None]] = {"mbsec, key log off": (base(), None)}
    if keylog is not None:
        variants["mbsec as it runs (key log on)"] = (base(keylog), keylog)
    for name, change in (("+ tickets (OP_NO_TICKET cleared)", tickets),
                         ("+ server session cache", cache),
                         ("+ client CA list in CertificateRequest", ca_list),
                         ("- SSL_MODE_RELEASE_BUFFERS", keep_buffers),
                         ("ECDHE on P-256 only (not X25519)", p256),
                         ("verify depth 1", depth1),
                         ("haproxy-like: tickets + cache + CA list", haproxy_like)):
        ctx = base()
        change(ctx)
        variants[name] = (ctx, None)
    lib, ptr = _ssl_ctx(variants["mbsec, key log off"][0])
    mode = int(lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_MODE, 0, None))
    cctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    per: dict[str, list[float]] = {name: [] for name in variants}
    negotiated: dict[str, str] = {}
    for _ in range(runs):
        for name, (ctx, klog) in variants.items():
            spent = 0.0
            for _ in range(n):
                spent += _memory_handshake(ctx, cctx)
                if klog is not None:  # every handshake takes its secret out (the session)
                    t0 = time.thread_time()
                    klog.take(None)
                    spent += time.thread_time() - t0
            per[name].append(1e6 * spent / n)
        if not negotiated:
            for name, (ctx, _klog) in variants.items():
                server = StdServer(ctx)
                run_handshake(server, cctx)
                negotiated[name] = f"{server.obj.version()} {(server.obj.cipher() or ('?',))[0]}"
    ref = statistics.median(per["mbsec, key log off"])
    lines = [f"server context mode: 0x{mode:x} (SSL_MODE_RELEASE_BUFFERS "
             f"{'set' if mode & _SSL_MODE_RELEASE_BUFFERS else 'not set'} by Python)",
             f"{'variant':<42} {'us/hs':>6} {'x base':>6} {'min':>6} {'max':>6}  negotiated"]
    for name, vals in per.items():
        med = statistics.median(vals)
        lines.append(f"{name:<42} {med:6.0f} {med / ref:6.2f} {min(vals):6.0f} "
                     f"{max(vals):6.0f}  {negotiated.get(name, '')}")
    if keylog is not None:
        keylog.close()
    return "\n".join(lines)


# -- perf: where one target's CPU goes -----------------------------------------------------


def _dso_group(dso: str) -> str:
    if dso.startswith("[kernel") or dso.startswith("[vdso"):
        return "kernel"
    for key, group in (("libcrypto", "libcrypto"), ("libssl", "libssl"), ("libc.so", "libc"),
                       ("libc-", "libc"), ("libpython", "libpython"),
                       ("spike_epoll_handshake", "compiled (mypyc)"),
                       ("__mypyc", "compiled (mypyc)")):
        if key in dso:
            return group
    if dso.startswith("python3"):
        return "libpython"
    if ".cpython-" in dso or dso.startswith("_rust") or "_rust" in dso:
        return "Python C extensions"
    return "other"


def perf_split(stack: Stack, port: int, target: str, clients: int, duration: float) -> str:
    """One more ``s_time`` run of ``target`` under ``perf record`` (all its processes and
    threads); its CPU per handshake split by shared object, in ms per handshake."""
    data = stack.work / f"perf-{target}.data"
    pids = stack.cpu_pids(target)
    perf = subprocess.Popen(["perf", "record", "-q", "-F", "999", "-o", str(data), "-p",
                             ",".join(str(p) for p in pids)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        r = s_time(stack, port, target, 0, clients, duration)
    finally:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(60)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait()
    out = subprocess.run(["perf", "report", "--stdio", "--sort", "dso", "-i", str(data)],
                         text=True, capture_output=True, check=False).stdout
    rows: list[tuple[float, str]] = []
    for line in out.splitlines():
        m = re.match(r"\s+([\d.]+)%\s+(\S.*)$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2).strip()))
    groups: dict[str, float] = {}
    for pct, dso in rows:
        groups[_dso_group(dso)] = groups.get(_dso_group(dso), 0.0) + pct
    lines = [f"perf {target}: {r.rate:.1f} hs/s, {r.handshakes} handshakes, {r.cpu_ms:.2f} CPU "
             f"ms/hs under perf, clients {1000 * r.client_cpu_s / max(r.handshakes, 1):.2f} "
             f"ms/hs, load {r.load1:.1f}"]
    for group, pct in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<22} {pct:5.1f} %  {pct / 100 * r.cpu_ms:5.2f} ms/hs")
    lines.append("  by shared object:")
    for pct, dso in rows:
        if pct >= 0.5:
            lines.append(f"    {dso[:60]:<60} {pct:5.1f} %")
    return "\n".join(lines)


def add_compare_targets(p: argparse.ArgumentParser, args: argparse.Namespace,
                        all_mbsec: dict[str, int]) -> None:
    """``--compare NAME=PATH``: target ``mbsec@NAME`` (one process) imports mbsec from PATH."""
    args.compare_paths = {}
    for spec in args.compare:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path, "mbsec").is_dir():
            p.error(f"--compare {spec}: want NAME=PATH with PATH/mbsec a source tree")
        args.compare_paths[f"mbsec@{name}"] = Path(path).resolve()
        all_mbsec[f"mbsec@{name}"] = 1


def cpu_list(text: str) -> set[int]:
    """``0``, ``0,1``, ``0-3``: the CPUs of a taskset-style list."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pinning(stack: Stack, targets: list[str]) -> str:
    """Where the servers' threads may run, for the report (``--pin``)."""
    names = ["mbplc", *targets]
    out = []
    for name in names:
        pids = stack.cpu_pids(name) if name != "mbplc" else [stack.pid(name)]
        cpus = set()
        for pid in pids:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    cpus.update(os.sched_getaffinity(int(tid)))
        out.append(f"{name} {','.join(map(str, sorted(cpus)))}")
    return "; ".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kit", type=Path, default=KIT, help="the bench kit (shared/bench)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per s_time run")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every target")
    p.add_argument("--clients", type=int, default=4, help="parallel s_time processes")
    p.add_argument("--workers", type=int, default=2, help="workers of mbsec-workers")
    p.add_argument("--keyalg", choices=("ec", "rsa"), default="ec",
                   help="key type of every certificate (gen-certs.sh KEYALG)")
    p.add_argument("--crl", action="store_true", help="also mbsec-crl (a CRL loaded)")
    p.add_argument("--server-chain", choices=("kit", "root"), default="kit",
                   help="kit: the kit's files as they are (haproxy sends the leaf alone, "
                   "stunnel and mbsec leaf and root); root: every server sends leaf and root "
                   "(R-46), the same work for every client")
    p.add_argument("--targets", help="comma list (default: stunnel,haproxy,mbsec,"
                   "mbsec-workers[,mbsec-crl])")
    p.add_argument("--python", default=sys.executable, help="the interpreter running mbsec")
    p.add_argument("--workdir", type=Path, help="keep certs, configs and logs here")
    p.add_argument("--no-install", action="store_true", help="never apt-get missing packages")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                   help="also mbsec@NAME: one process importing mbsec from PATH (a source tree, "
                   "e.g. the code before a change), paired with mbsec; repeatable")
    p.add_argument("--openssl-only", action="store_true",
                   help="only OpenSSL's server CPU per handshake in memory, per key type")
    p.add_argument("--spike", action="store_true",
                   help="also the handshake spike: spike-py, spike-py2, and with --spike-build "
                   "spike-c and spike-c2 (benchmarks/spike_epoll_handshake.py)")
    p.add_argument("--spike-build", type=Path,
                   help="a directory holding the mypyc-compiled spike_epoll_handshake module")
    p.add_argument("--established", type=int, default=0, metavar="N",
                   help="also run N established clients (mbload N x depth 1, FC03) alone and "
                   "during each s_time run, and report what the flood cost them")
    p.add_argument("--handshake-nice", default="", metavar="N[,N...]",
                   help="also mbsec-niceN: one process with [limits] handshake_nice = N")
    p.add_argument("--pin", metavar="SERVERS:CLIENTS",
                   help="CPU lists (taskset style, e.g. 0:1): servers on SERVERS, the s_time "
                   "and mbload clients on CLIENTS")
    p.add_argument("--perf", action="append", default=[], metavar="TARGET",
                   help="after the repetitions, one more run of TARGET under perf record, "
                   "its CPU per handshake by shared object; repeatable")
    p.add_argument("--openssl-variants", action="store_true",
                   help="only OpenSSL's server CPU per handshake in memory, mbsec's context "
                   "against the options haproxy and stunnel use")
    args = p.parse_args(argv)
    if args.openssl_variants:
        print(f"box: {box()}; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        with tempfile.TemporaryDirectory(prefix="mbsec-bench-ossl-") as tmp:
            run([str(args.kit / "gen-certs.sh"), str(Path(tmp) / "certs"), "operator"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=dict(os.environ, KEYALG=args.keyalg))
            print(openssl_variants(Path(tmp) / "certs", 300, max(5, args.reps)))
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return 0
    if args.openssl_only:
        print(f"box: {box()}; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(openssl_only(300, 5))
        return 0
    all_mbsec = {"mbsec": 1, "mbsec-workers": args.workers, **({"mbsec-crl": 1} if args.crl
                                                               else {})}
    add_compare_targets(p, args, all_mbsec)
    for n in (x.strip() for x in args.handshake_nice.split(",") if x.strip()):
        if not n.isdigit() or not 0 <= int(n) <= 19:
            p.error(f"--handshake-nice {n}: want 0..19")
        all_mbsec[f"mbsec-nice{int(n)}"] = 1
    pin: tuple[set[int], set[int]] | None = None
    if args.pin:
        servers, sep, clients = args.pin.partition(":")
        try:
            pin = (cpu_list(servers), cpu_list(clients)) if sep else None
        except ValueError:
            pin = None
        if pin is None or not pin[0] or not pin[1]:
            p.error(f"--pin {args.pin}: want SERVERS:CLIENTS, e.g. 0:1")
    spikes = ([n for n, (_procs, comp) in SPIKE_TARGETS.items()
               if not comp or args.spike_build is not None] if args.spike else [])
    if args.spike_build is not None and not args.spike_build.is_dir():
        p.error(f"--spike-build {args.spike_build}: not a directory")
    targets = ([t.strip() for t in args.targets.split(",") if t.strip()] if args.targets
               else [*PEERS, *all_mbsec, *spikes])
    unknown = [t for t in targets if t not in (*PEERS, *all_mbsec, *spikes)]
    if unknown:
        p.error(f"unknown targets: {', '.join(unknown)}")
    bad_perf = [t for t in args.perf if t not in targets]
    if bad_perf:
        p.error(f"--perf: not a target of this run: {', '.join(bad_perf)}")
    ensure_packages(not args.no_install)
    run(["make", "-s", "-C", str(args.kit)])
    work = (args.workdir.resolve() if args.workdir
            else Path(tempfile.mkdtemp(prefix="mbsec-bench-hs-")))
    work.mkdir(parents=True, exist_ok=True)
    print(f"box: {box()}; load average at the start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.clients} x openssl s_time -new -tls1_2 with a client certificate, "
          f"{args.duration:g} s per run, {args.reps} repetitions, keys: {args.keyalg}, "
          f"server chain: {args.server_chain}")
    runs: list[Run] = []
    established: list[Established] = []
    compiled: dict[str, Any] = {}
    perf_lines: list[str] = []
    if pin is not None:  # every server started from here on runs there, all its threads
        os.sched_setaffinity(0, pin[0])
    with handshake_stack(args, work, {t: all_mbsec[t] for t in targets if t in all_mbsec},
                         tuple(t for t in targets if t in SPIKE_TARGETS)) as (stack, ports):
        compiled = dict(stack.compiled)
        if pin is not None:  # and every client from here on
            os.sched_setaffinity(0, pin[1])
            print(f"pinned: clients (s_time, mbload) on CPUs "
                  f"{','.join(map(str, sorted(pin[1])))}; servers: "
                  f"{pinning(stack, [t for t in targets if t in (*PEERS, *all_mbsec)])}")
        for rep in range(1, args.reps + 1):
            for target in targets if rep % 2 else targets[::-1]:
                if args.established and target in (*PEERS, *all_mbsec):
                    r, e = with_established(stack, ports, target, rep, args)
                    runs.append(r)
                    established.append(e)
                else:
                    runs.append(s_time(stack, ports[target], target, rep, args.clients,
                                       args.duration))
                for name, proc in stack.procs.items():
                    if proc.poll() is not None:
                        raise SystemExit(f"{name} exited during the run (see {work})")
        for target in args.perf:
            perf_lines.append(perf_split(stack, ports[target], target, args.clients,
                                         args.duration))
    print(f"mbsec data plane compiled: {compiled}")
    print(report(runs, targets, args.reps))
    if established:
        print(established_report(established, targets))
    if perf_lines:
        print("\nCPU per handshake by shared object (one more run each, under perf record):")
        print("\n".join(perf_lines))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
