"""An mbsec HA pair with keepalived, in network namespaces: how long a master waits after the
active node dies (deploy/HA.md).

Five namespaces on one bridge (10.10.0.0/24, the addresses of deploy/keepalived/):
``sha-lan`` holds the bridge; ``sha-a`` and ``sha-b`` each run ``mbsec serve`` (the same
configuration, certificate and CRL) and Debian's keepalived with deploy/keepalived/mbsec-a.conf
and mbsec-b.conf as shipped (only the paths of the track script changed); ``sha-plc`` runs a
pymodbus PLC; ``sha-m`` runs the master, a TLS Modbus client with its certificate that reads a
register every 50 ms from the virtual address and, when a request fails, reconnects at once
(connect and request deadlines of 0.3 s). Then the active node is killed: its mbsec and
keepalived get SIGKILL and its link goes down (a node that loses power); with
``--kill process`` only mbsec dies (keepalived's track script notices); with ``--kill wedge``
mbsec's data-plane thread stops (ptrace, tests/ptrace_helpers.py) while the process, its trio
thread and keepalived live on: /healthz turns 503 and the track script moves the address. The
figure is the time from the kill to the master's next answered request.

    sudo .venv/bin/python benchmarks/bench_failover.py --runs 7 [--kill node|process|wedge]

Needs root, iproute2 and keepalived (scripts/test.d/systemd-ha.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.ptrace_helpers import data_plane_thread, thread_stopped  # noqa: E402

KEEPALIVED = ROOT / "deploy" / "keepalived"
PREFIX = "sha-"
LAN = "10.10.0"
VIP = f"{LAN}.100"
NODES = {"a": f"{LAN}.11", "b": f"{LAN}.12"}
MASTER_IP = f"{LAN}.50"
PLC_IP = f"{LAN}.60"
POLICY = """\
version: 1
default: deny
targets:
  plc: {unit_ids: [1]}
rules:
  - id: operator-read
    description: the master reads process values
    roles: [operator]
    functions: [read_holding_registers]
    addresses: ["0-99"]
"""

PLC_CODE = """
import asyncio, sys
from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext
from pymodbus.server import StartAsyncTcpServer
ctx = ModbusServerContext(devices={1: ModbusDeviceContext(
    hr=ModbusSequentialDataBlock(1, list(range(100))))}, single=False)
asyncio.run(StartAsyncTcpServer(ctx, address=(sys.argv[1], 502)))
"""

# the master: one line per request outcome, CLOCK_MONOTONIC (one clock for every namespace)
MASTER_CODE = """
import socket, ssl, sys, time, json
vip, ca, cert, key = sys.argv[1:5]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
req = bytes.fromhex("000100000006010300000001")
conn = None
while True:
    t = time.monotonic()
    try:
        if conn is None:
            raw = socket.create_connection((vip, 802), timeout=0.3)
            conn = ctx.wrap_socket(raw, server_hostname=vip)
        conn.sendall(req)
        reply = conn.recv(64)
        if len(reply) < 9 or reply[7] != 3:
            raise OSError("no answer")
        print(json.dumps({"t": time.monotonic(), "ok": True}), flush=True)
        time.sleep(0.05)
    except (OSError, ssl.SSLError) as exc:
        print(json.dumps({"t": time.monotonic(), "ok": False, "error": str(exc)[:80]}), flush=True)
        if conn is not None:
            conn.close()
        conn = None
        time.sleep(max(0.0, 0.02 - (time.monotonic() - t)))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def netns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", PREFIX + ns, *argv]


def teardown() -> None:
    for ns in ("a", "b", "m", "plc", "lan"):
        sh("ip", "netns", "pids", PREFIX + ns, check=False)
        pids = sh("ip", "netns", "pids", PREFIX + ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        sh("ip", "netns", "del", PREFIX + ns, check=False)


def build_network() -> None:
    teardown()
    for ns in ("lan", "a", "b", "m", "plc"):
        sh("ip", "netns", "add", PREFIX + ns)
        sh(*netns(ns, "ip", "link", "set", "lo", "up"))
    sh(*netns("lan", "ip", "link", "add", "br0", "type", "bridge"))
    sh(*netns("lan", "ip", "link", "set", "br0", "up"))
    for ns, ip in {**NODES, "m": MASTER_IP, "plc": PLC_IP}.items():
        outer = f"{PREFIX}{ns}1"
        sh("ip", "link", "add", f"{PREFIX}{ns}0", "type", "veth", "peer", "name", outer)
        sh("ip", "link", "set", f"{PREFIX}{ns}0", "netns", PREFIX + ns)
        sh("ip", "link", "set", outer, "netns", f"{PREFIX}lan")
        sh(*netns("lan", "ip", "link", "set", outer, "master", "br0"))
        sh(*netns("lan", "ip", "link", "set", outer, "up"))
        sh(*netns(ns, "ip", "link", "set", f"{PREFIX}{ns}0", "name", "eth0"))
        sh(*netns(ns, "ip", "addr", "add", f"{ip}/24", "dev", "eth0"))
        sh(*netns(ns, "ip", "link", "set", "eth0", "up"))


@dataclass
class Pair:
    work: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    master_out: list[dict[str, object]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - the process keeps it
        p = subprocess.Popen(argv, stdout=kw.pop("stdout", log), stderr=log)  # type: ignore[call-overload]
        self.procs[name] = p
        return p

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def make_pki(work: Path) -> dict[str, Path]:
    from mbsec.pki.ca import CertificateAuthority

    ca = CertificateAuthority.init(work / "ca", common_name="HA Test CA")
    out = work / "tls"
    # one certificate for the pair: the virtual address and both node addresses (deploy/HA.md)
    server = ca.issue("server", "mbsec.plant", dns=("mbsec.plant",),
                      ips=(VIP, *NODES.values()), out_dir=out, name="server")
    master = ca.issue("client", "master-1", role="operator", out_dir=out, name="master")
    crl = ca.write_crl(next_update_days=7)
    return {"chain": server.chain, "key": server.key, "ca": ca.trust_bundle, "crl": crl,
            "m_chain": master.chain, "m_key": master.key}


def node_config(work: Path, pki: dict[str, Path]) -> Path:
    """The one configuration both nodes run (a copy per node in a plant, kept identical)."""
    (work / "policy.yaml").write_text(POLICY)
    cfg = work / "mbsec.toml"
    cfg.write_text(
        f'listen = ["0.0.0.0:802"]\npolicy = "{work / "policy.yaml"}"\n'
        f'[tls]\ncert = "{pki["chain"]}"\nkey = "{pki["key"]}"\n'
        f'client_ca = "{pki["ca"]}"\ncrl = ["{pki["crl"]}"]\n'
        f'[upstreams.plc]\nhost = "{PLC_IP}"\nport = 502\nunit_ids = [1]\n'
        f'request_timeout = 1.0\nconnect_timeout = 1.0\n'
        f'[limits]\ndrain_timeout = 1\n[logging]\nstdout = true\n'
        f'[metrics]\nlisten = "127.0.0.1:9802"\n'
    )
    return cfg


def keepalived_config(node: str, scripts: Path) -> Path:
    """deploy/keepalived/mbsec-NODE.conf with the track script where this run keeps it."""
    text = (KEEPALIVED / f"mbsec-{node}.conf").read_text()
    text = text.replace("/etc/keepalived/check_mbsec.sh", str(scripts / "check_mbsec.sh"))
    out = scripts / f"mbsec-{node}.conf"
    out.write_text(text)
    return out


@contextlib.contextmanager
def script_dir() -> Iterator[Path]:
    """keepalived's enable_script_security refuses scripts under a directory anyone can write
    (such as /tmp): keep them in a root-only directory under /run."""
    d = Path(tempfile.mkdtemp(prefix="systemd-ha-", dir="/run"))
    d.chmod(0o755)
    shutil.copy(KEEPALIVED / "check_mbsec.sh", d / "check_mbsec.sh")
    (d / "check_mbsec.sh").chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def holder(timeout: float = 20.0) -> str:
    """The node that holds the virtual address."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        held = [n for n in NODES
                if VIP in sh(*netns(n, "ip", "-4", "addr", "show", "dev", "eth0"),
                             check=False).stdout]
        if len(held) == 1:
            return held[0]
        time.sleep(0.1)
    raise RuntimeError("no single node holds the virtual address")


def read_master(pair: Pair, proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        with contextlib.suppress(ValueError):
            pair.master_out.append(json.loads(line))


def one_run(work: Path, kill: str) -> float:
    """Build, converge, kill the active node; seconds from the kill to the next answer."""
    import threading

    build_network()
    pair = Pair(work)
    py = sys.executable
    env_pythonpath = os.environ.get("PYTHONPATH", "")
    try:
        pki = make_pki(work)
        cfg = node_config(work, pki)
        pair.start("plc", netns("plc", py, "-c", PLC_CODE, PLC_IP))
        with script_dir() as scripts:
            for n in NODES:
                # one host plays both nodes: each its own admin socket and node state file
                # (on two real nodes the defaults under /run/mbsec are per machine)
                node_dir = work / f"node-{n}"
                node_dir.mkdir(exist_ok=True)
                pair.start(f"mbsec-{n}", netns(
                    n, "env", f"PYTHONPATH={env_pythonpath}",
                    f"MBSEC_ADMIN__SOCKET={node_dir / 'admin.sock'}",
                    f"MBSEC_ADMIN__STATE_FILE={node_dir / 'state'}",
                    py, "-m", "mbsec.cli", "serve", "--config", str(cfg)))
                pair.start(f"keepalived-{n}", netns(
                    n, "keepalived", "--dont-fork", "--log-console", "--no-syslog",
                    f"--use-file={keepalived_config(n, scripts)}",
                    f"--pid={scripts}/{n}.pid", f"--vrrp_pid={scripts}/{n}-vrrp.pid",
                    f"--checkers_pid={scripts}/{n}-checkers.pid"))
            active = holder()
            master = pair.start("master", netns("m", py, "-c", MASTER_CODE, VIP, str(pki["ca"]),
                                                str(pki["m_chain"]), str(pki["m_key"])),
                                stdout=subprocess.PIPE)
            threading.Thread(target=read_master, args=(pair, master), daemon=True).start()
            end = time.monotonic() + 20
            while sum(1 for e in pair.master_out if e["ok"]) < 10:  # served through the VIP
                if time.monotonic() > end or master.poll() is not None:
                    raise RuntimeError(f"the master gets no answers: {pair.master_out[-3:]}")
                time.sleep(0.05)
            wedge = contextlib.ExitStack()
            victim = pair.procs[f"mbsec-{active}"]
            tid = data_plane_thread(victim.pid) if kill == "wedge" else 0
            killed_at = time.monotonic()
            if kill == "wedge":
                wedge.enter_context(thread_stopped(tid))
            else:
                victim.kill()
            if kill == "node":
                pair.procs[f"keepalived-{active}"].kill()
                sh(*netns(active, "ip", "link", "set", "eth0", "down"))
            end = time.monotonic() + 20
            while True:
                after = [e for e in pair.master_out
                         if e["ok"] and float(e["t"]) > killed_at]  # type: ignore[arg-type]
                if after:
                    back = float(after[0]["t"]) - killed_at  # type: ignore[arg-type]
                    break
                if time.monotonic() > end:
                    raise RuntimeError(f"no answer 20 s after the kill: {pair.master_out[-3:]}")
                time.sleep(0.05)
            other = next(n for n in NODES if n != active)
            moved = holder() == other
            wedge.close()
            if not moved:
                raise RuntimeError("the virtual address did not move")
            return back
    finally:
        pair.stop_all()
        teardown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--kill", choices=("node", "process", "wedge"), default="node")
    args = p.parse_args(argv)
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="systemd-ha-failover-") as d:
            back = one_run(Path(d), args.kill)
        results.append(back)
        print(f"run {i + 1}: the master's next answer {back:.3f} s after the kill", flush=True)
    print(json.dumps({"kill": args.kill, "runs": len(results),
                      "median_s": round(statistics.median(results), 3),
                      "max_s": round(max(results), 3),
                      "all_s": [round(r, 3) for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
