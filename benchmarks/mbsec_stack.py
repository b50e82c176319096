"""A throw-away PKI, config and ``mbsec serve`` process for the hostile-network benchmarks
(bench_lossy_plc.py, bench_memory.py, fuzz_proxy.py). Not a test fixture: plain subprocesses,
stopped by pid.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mbsec.pki.ca import CertificateAuthority, IssuedFiles

REPO = Path(__file__).resolve().parents[1]
#: the neutral bench kit (mbplc, mbload): next to the checkout, or next to a worktree's parent
KIT = next((k for k in (REPO.parent / "shared" / "bench", REPO.parents[1] / "shared" / "bench")
            if (k / "mbplc.c").exists()), REPO.parent / "shared" / "bench")


@dataclass
class Pki:
    ca: CertificateAuthority
    server: IssuedFiles
    operator: IssuedFiles
    crl: Path

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.trust_bundle))
        ctx.load_cert_chain(str(self.operator.chain), str(self.operator.key))
        return ctx


def make_pki(work: Path) -> Pki:
    ca = CertificateAuthority.init(work / "ca", common_name="Bench CA")
    out = work / "certs"
    server = ca.issue("server", "mbsec-bench", dns=("localhost",), ips=("127.0.0.1",),
                      out_dir=out, name="server")
    operator = ca.issue("client", "op-bench", role="operator", out_dir=out, name="operator")
    return Pki(ca, server, operator, ca.write_crl(next_update_days=7))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


POLICY = """\
version: 1
default: deny
description: benchmark policy, operators read holding registers 0-999
targets:
  plc:
    description: the benchmark PLC
    upstream: "{plc_host}:{plc_port}"
    unit_ids: [1]
limits:
  default: {{requests_per_second: 10000000, burst: 10000000, max_in_flight: 4096}}
rules:
  - id: operator-read
    description: Operators on localhost read holding registers 0-999
    roles: [operator]
    sources: ["127.0.0.0/8"]
    targets: [plc]
    functions: [read_holding_registers]
    addresses: ["0-999"]
    max_quantity: 125
"""


def write_config(work: Path, pki: Pki, plc_host: str, plc_port: int, *,
                 upstream_extra: str = "", extra: str = "", limits: str = "",
                 log_file: str = "mbsec.log") -> tuple[Path, int]:
    """An mbsec config listening on a free 127.0.0.1 port; (path, port)."""
    port = free_port()
    (work / "policy.yaml").write_text(POLICY.format(plc_host=plc_host, plc_port=plc_port))
    cfg = work / "mbsec.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:{port}"]\npolicy = "policy.yaml"\n{extra}\n'
        # no admin socket and its own state file: another mbsec may run on this host
        f'[admin]\nsocket = ""\nstate_file = "{work / "mbsec.state"}"\n'
        f'[tls]\ncert = "{pki.server.chain}"\nkey = "{pki.server.key}"\n'
        f'client_ca = "{pki.ca.trust_bundle}"\ncrl = ["{pki.crl}"]\n'
        f'[upstreams.plc]\nhost = "{plc_host}"\nport = {plc_port}\nunit_ids = [1]\n'
        f'{upstream_extra}\n'
        f'[limits]\n{limits}\n'
        f'[logging]\nstdout = false\nfile = "{log_file}"\nallowed_requests = "off"\n'
    )
    return cfg, port


def wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mbsec exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise SystemExit(f"mbsec is not listening on 127.0.0.1:{port} after {timeout:g} s")


@contextlib.contextmanager
def mbsec_serve(cfg: Path, port: int, *, cwd: Path | None = None,
                pre: list[str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``mbsec serve --config cfg`` until the block ends (SIGTERM, then SIGKILL, by pid)."""
    proc = subprocess.Popen([*(pre or []), sys.executable, "-m", "mbsec.cli", "serve",
                             "--config", str(cfg)], cwd=cwd or cfg.parent)
    try:
        wait_listening(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fc03(tid: int, address: int, count: int, unit: int = 1) -> bytes:
    return struct.pack(">HHHBBHH", tid & 0xFFFF, 0, 6, unit, 3, address, count)


def mbplc_value(address: int, unit: int = 1) -> int:
    """A holding register of the kit's mbplc (nobody writes it here)."""
    return (address * 7 + unit) & 0xFFFF


def read_events(log: Path) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        for line in log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out
