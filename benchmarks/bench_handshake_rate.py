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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
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


@contextlib.contextmanager
def handshake_stack(args: argparse.Namespace, work: Path,
                    mbsec_targets: dict[str, int]) -> Iterator[tuple[Stack, dict[str, int]]]:
    """mbplc, stunnel, haproxy and one ``mbsec serve`` per entry of ``mbsec_targets``
    (name -> workers; a name ending in ``-crl`` gets the CRL; ``mbsec@NAME`` imports mbsec
    from the ``--compare NAME=PATH`` tree)."""
    kit: Path = args.kit
    ports = {name: free_port() for name in ("direct", *PEERS, *mbsec_targets)}
    peers_env = dict(os.environ, RUNDIR=str(work / "peers"),
                     STUNNEL_PORT=str(ports["stunnel"]), HAPROXY_PORT=str(ports["haproxy"]),
                     UPSTREAM=f"127.0.0.1:{ports['direct']}")
    stack = Stack(kit=kit, work=work, peers_env=peers_env)
    try:
        certs = work / "certs"
        run([str(kit / "gen-certs.sh"), str(certs), "operator"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=dict(os.environ, KEYALG=args.keyalg))
        crl = write_crl(certs)
        stack.procs["mbplc"] = subprocess.Popen(
            [str(kit / "mbplc"), "--port", str(ports["direct"]), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(ports["direct"], stack.procs["mbplc"], "mbplc", 5)
        stack.peers_started = True
        run([str(kit / "run-peers.sh"), "start", str(certs)], env=peers_env)
        for name, workers in mbsec_targets.items():
            cfg = write_mbsec_config(work, ports[name], ports["direct"], 4, 16, workers, name,
                                     "", "off")
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
    ok: bool

    @property
    def rate(self) -> float:
        return self.handshakes / self.wall_s

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.proxy_cpu_s / self.handshakes if self.handshakes else float("nan")


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
    r = Run(target, rep, n, wall, (c1 - c0) / CLK_TCK, client, load1, ok)
    say(f"rep {rep} {target:<14} {r.rate:7.1f} hs/s  {r.handshakes:6d} hs  proxy CPU "
        f"{r.cpu_ms:5.2f} ms/hs  clients {client:5.1f} s CPU  load {load1:.1f}"
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
                       ("mbsec", "haproxy", "cpu"), ("mbsec-crl", "mbsec", "cpu")):
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
    args = p.parse_args(argv)
    if args.openssl_only:
        print(f"box: {box()}; load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(openssl_only(300, 5))
        return 0
    all_mbsec = {"mbsec": 1, "mbsec-workers": args.workers, **({"mbsec-crl": 1} if args.crl
                                                               else {})}
    args.compare_paths = {}
    for spec in args.compare:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path, "mbsec").is_dir():
            p.error(f"--compare {spec}: want NAME=PATH with PATH/mbsec a source tree")
        args.compare_paths[f"mbsec@{name}"] = Path(path).resolve()
        all_mbsec[f"mbsec@{name}"] = 1
    targets = ([t.strip() for t in args.targets.split(",") if t.strip()] if args.targets
               else [*PEERS, *all_mbsec])
    unknown = [t for t in targets if t not in (*PEERS, *all_mbsec)]
    if unknown:
        p.error(f"unknown targets: {', '.join(unknown)}")
    ensure_packages(not args.no_install)
    run(["make", "-s", "-C", str(args.kit)])
    work = (args.workdir.resolve() if args.workdir
            else Path(tempfile.mkdtemp(prefix="mbsec-bench-hs-")))
    work.mkdir(parents=True, exist_ok=True)
    print(f"box: {box()}; load average at the start: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.clients} x openssl s_time -new -tls1_2 with a client certificate, "
          f"{args.duration:g} s per run, {args.reps} repetitions, keys: {args.keyalg}")
    runs: list[Run] = []
    compiled: dict[str, Any] = {}
    with handshake_stack(args, work, {t: all_mbsec[t] for t in targets if t in all_mbsec}) as (
            stack, ports):
        compiled = dict(stack.compiled)
        for rep in range(1, args.reps + 1):
            for target in targets if rep % 2 else targets[::-1]:
                runs.append(s_time(stack, ports[target], target, rep, args.clients,
                                   args.duration))
                for name, proc in stack.procs.items():
                    if proc.poll() is not None:
                        raise SystemExit(f"{name} exited during the run (see {work})")
    print(f"mbsec data plane compiled: {compiled}")
    print(report(runs, targets, args.reps))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
