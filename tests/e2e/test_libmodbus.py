"""libmodbus's own unit-test-client, run directly against its unit-test-server and through mbsec.

The path through mbsec::

    unit-test-client --plain TCP--> stunnel (client mode, the engineer's certificate)
        --TLS--> mbsec serve --plain Modbus/TCP--> unit-test-server

and the same with ``mbsec connect`` (the client side mbsec ships) in stunnel's place.

The programs come from the libmodbus source package of the Debian release the machine runs,
built by scripts/libmodbus.sh (sourced by scripts/test.sh) with a small patch, stated there and
in docs/compliance.md ("libmodbus unit-test-client through mbsec"):

- The port comes from ``$UT_PORT`` (stock: 1502 for both programs). Client and server share
  that hard-coded port, and the client must reach stunnel while mbsec reaches the server, so
  each gets a free port of its own (also no clash with a parallel run or anything on 1502).
  The tcppi server listens on ::1 (stock: every address); the client already uses ::1.
- The server accepts the next connection when one ends (stock: it quits): mbsec resets its
  PLC link after a reply that fails validation and reconnects, as it would to a PLC. Its
  byte-by-byte reply echoes both bytes of the transaction id (stock: the low one only).
- With ``$UT_CONTINUE`` the client counts a failed assertion and goes on (stock: ASSERT_TRUE
  does ``goto close``, so the first difference would hide every later one). Each assertion is
  then identified by its source line (``Line N: assertion error``), named by the label the
  client printed before it.

The test asserts that the assertions failing through mbsec, minus those failing directly, are
exactly the documented differences: the byte-timeout test (tcp mode; the client runs it only
with the TCP backend: mbsec forwards a reply once it is complete, so the 5 ms gaps between
the server's bytes never reach the client) and the short-reply test (mbsec validates the reply
against its request and answers 0x0B instead of passing on a short reply).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BUILT = ROOT / ".cache" / "libmodbus" / "BUILT"

BYTE_TIMEOUT = "1/2 Too small byte timeout (3ms < 5ms)"
SHORT_REPLY = "TEST BAD RESPONSE ERROR: * modbus_read_registers"

#: assertions (by label) that fail through mbsec and pass directly, and why
EXPECTED = {
    "tcp": {
        BYTE_TIMEOUT: "mbsec re-frames replies: it forwards a reply once it is complete, so the "
        "client never sees the 5 ms gaps between the server's bytes",
        SHORT_REPLY: "mbsec checks the reply against its request (2 registers asked, 1 sent) "
        "and answers exception 0x0B instead of passing the short reply on",
    },
    "tcppi": {
        SHORT_REPLY: "mbsec checks the reply against its request (2 registers asked, 1 sent) "
        "and answers exception 0x0B instead of passing the short reply on",
    },
}

POLICY = """\
version: 1
default: deny
description: Everything libmodbus's unit-test-client sends (tests/e2e/test_libmodbus.py)
targets:
  ut-server: {unit_ids: [0, 18, 255], description: libmodbus unit-test-server}
rules:
  - id: libmodbus-unit-test
    description: The unit test's function codes on its tables; 66 is its unknown-function probe
    roles: [engineer]
    targets: [ut-server]
    functions: [read_coils, read_discrete_inputs, read_holding_registers, read_input_registers,
                write_single_coil, write_single_register, write_multiple_coils,
                write_multiple_registers, report_server_id, mask_write_register,
                read_write_multiple_registers, 66]
    addresses: ["0-511"]
tests:
  - {role: engineer, unit: 255, function: read_coils, address: 0x130, quantity: 37,
     expect: allow}
  - {role: engineer, unit: 0, function: read_holding_registers, address: 0x160, quantity: 3,
     expect: allow}
  - {role: engineer, unit: 18, function: report_server_id, expect: allow}
  - {role: operator, unit: 255, function: read_coils, address: 0x130, expect: deny}
"""


# -- the built programs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    version: str
    client: Path
    server: Path
    stunnel: Path


def built() -> Built:
    """The programs scripts/libmodbus.sh built: fail when test.sh ran it (it exports
    MBSEC_LIBMODBUS_BUILT), skip when this file runs on its own and nothing was built."""
    required = os.environ.get("MBSEC_LIBMODBUS_BUILT")
    path = Path(required) if required else DEFAULT_BUILT
    if not path.is_file():
        error = path.parent / "ERROR"
        why = error.read_text().strip() if error.is_file() else f"{path} is missing"
        if required:
            pytest.fail(f"libmodbus unit-test programs not built: {why}", pytrace=False)
        pytest.skip(f"libmodbus unit-test programs not built ({why}): run "
                    "`source scripts/libmodbus.sh` (scripts/test.sh does)")
    kv = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    b = Built(kv["version"], Path(kv["client"]), Path(kv["server"]), Path(kv["stunnel"]))
    for p in (b.client, b.server, b.stunnel):
        if not os.access(p, os.X_OK):
            msg = f"{p} (listed in {path}) is not an executable: run `source scripts/libmodbus.sh`"
            if required:
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
    return b


# -- processes --------------------------------------------------------------------------------


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listening(host: str, port: int) -> bool:
    """Whether something listens on host:port, read from /proc (connecting would start a
    session: stunnel would open a TLS connection, the one-connection server would take it)."""
    table = "/proc/net/tcp6" if ":" in host else "/proc/net/tcp"
    with open(table) as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                return True
    return False


def wait_until(what: str, cond: Callable[[], bool], proc: subprocess.Popen[bytes],
               log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}): {tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout} s: {tail(log)}")
        time.sleep(0.05)


def tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"({log} missing)"


@contextlib.contextmanager
def process(argv: list[str], log: Path, env: dict[str, str] | None = None,
            ) -> Iterator[subprocess.Popen[bytes]]:
    """A child process writing to ``log``, stopped by its process id on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=log.parent)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def ut_server(b: Built, mode: str, host: str, d: Path) -> Iterator[int]:
    """unit-test-server in ``mode`` on a free port of ``host``; yields the port."""
    port = free_port(host)
    log = d / "unit-test-server.log"
    with process([str(b.server), mode], log, {"UT_PORT": str(port)}) as proc:
        wait_until("unit-test-server", lambda: listening(host, port), proc, log)
        yield port


def mbsec_config(pki: Pki, d: Path, host: str, port: int) -> Path:
    (d / "policy.yaml").write_text(POLICY)
    cfg = d / "mbsec.toml"
    cfg.write_text(
        'listen = ["127.0.0.1:0"]\npolicy = "policy.yaml"\n'
        f'[tls]\ncert = "{pki.server.chain}"\nkey = "{pki.server.key}"\n'
        f'client_ca = "{pki.ca.trust_bundle}"\ncrl = ["{pki.crl}"]\n'
        # request_timeout: above the server's 0.5 s sleep (the "0.6 s > 0.5 s" test);
        # pool_size 1: the server serves one connection at a time (as many PLCs do)
        f'[upstreams.ut-server]\nhost = "{host}"\nport = {port}\nunit_ids = [0, 18, 255]\n'
        "request_timeout = 2.0\npool_size = 1\n"
        f'[logging]\nstdout = false\nfile = "{d / "events.jsonl"}"\nallowed_requests = "info"\n'
        '[admin]\nsocket = "admin.sock"\nstate_file = "state"\n'  # not the shared /run/mbsec
    )
    return cfg


def events(d: Path) -> list[dict[str, Any]]:
    try:
        lines = (d / "events.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def mbsec_port(d: Path) -> int | None:
    for ev in events(d):
        if ev.get("event", {}).get("action") == "server-start":
            return int(ev["mbsec"]["listen"][0].rsplit(":", 1)[1])
    return None


@contextlib.contextmanager
def through_mbsec(b: Built, pki: Pki, mode: str, d: Path, shim: str = "stunnel",
                  ) -> Iterator[int]:
    """unit-test-server, mbsec and the TLS shim for ``mode`` (``stunnel``, or ``connect``:
    ``mbsec connect``); yields the port the client uses."""
    host = "::1" if mode == "tcppi" else "127.0.0.1"
    with ut_server(b, mode, host, d) as server_port:
        cfg = mbsec_config(pki, d, host, server_port)
        log = d / "mbsec.log"
        with process([sys.executable, "-m", "mbsec.cli", "serve", "--config", str(cfg)],
                     log) as mbsec:
            wait_until("mbsec serve", lambda: mbsec_port(d) is not None, mbsec, log)
            proxy_port = mbsec_port(d)
            shim_port = free_port(host)
            if shim == "connect":
                argv = [sys.executable, "-m", "mbsec.cli", "connect",
                        "--listen", f"[{host}]:{shim_port}" if ":" in host
                        else f"{host}:{shim_port}",
                        "--server", f"127.0.0.1:{proxy_port}", "--server-name", "localhost",
                        "--cert", str(pki.engineer.chain), "--key", str(pki.engineer.key),
                        "--ca", str(pki.ca.trust_bundle)]
            else:
                conf = d / "stunnel.conf"
                conf.write_text(
                    "foreground = yes\npid =\ndebug = notice\n"
                    "[modbus-security]\nclient = yes\n"
                    f"accept = {host}:{shim_port}\nconnect = 127.0.0.1:{proxy_port}\n"
                    f"cert = {pki.engineer.chain}\nkey = {pki.engineer.key}\n"
                    f"CAfile = {pki.ca.trust_bundle}\nverifyChain = yes\n"
                    "checkHost = localhost\nsslVersionMin = TLSv1.2\n"
                )
                argv = [str(b.stunnel), str(conf)]
            slog = d / f"{shim}.log"
            with process(argv, slog) as shim_proc:
                wait_until(shim, lambda: listening(host, shim_port), shim_proc, slog)
                yield shim_port


# -- the client's output ----------------------------------------------------------------------


def assertion_labels(source: Path) -> dict[int, str]:
    """Source line of every ASSERT_TRUE -> the label the client printed before it (the
    section header, for the labels that repeat, e.g. ``* modbus_read_registers: ``)."""
    labels: dict[int, str] = {}
    section = label = ""
    for n, line in enumerate(source.read_text().splitlines(), 1):
        if m := re.search(r'printf\("((?:\\n)*)(TEST [A-Z ]+):?', line):
            section, label = m.group(2), ""
        elif m := re.search(r'printf\("(?:\\n)*([^"%\\]+)', line):
            label = m.group(1).strip().rstrip(":").strip()
        if "ASSERT_TRUE(" in line and "#define" not in line:
            labels[n] = f"{section}: {label}" if label.startswith("*") or not label else label
    return labels


@dataclass
class Run:
    output: str
    failed: set[str]


def run_client(b: Built, mode: str, port: int, d: Path, labels: dict[int, str]) -> Run:
    log = d / f"unit-test-client-{mode}.log"
    with open(log, "wb") as out:
        proc = subprocess.run([str(b.client), mode], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "UT_PORT": str(port), "UT_CONTINUE": "1"},
                              timeout=120, check=False)
    output = log.read_text(errors="replace")
    assert "ALL TESTS PASS WITH SUCCESS." in output or "END OF TESTS:" in output, (
        f"unit-test-client {mode} did not run to its end (exit {proc.returncode}):\n"
        f"{tail(log, 40)}")
    failed = {labels.get(int(n), f"line {n}")
              for n in re.findall(r"^Line (\d+): assertion error", output, re.M)}
    return Run(output, failed)


# -- the test -----------------------------------------------------------------------------------


@dataclass
class ModeRuns:
    direct: Run
    proxied: Run  # through stunnel and mbsec serve
    connected: Run  # through mbsec connect and mbsec serve
    backoff_answers: list[str]  # requests answered 0x0A for the reconnect backoff (events)


class Runs:
    """Runs every mode's three sequences (direct, through stunnel and mbsec, through mbsec
    connect and mbsec) at once, on first use: the direct runs take about 14 s, mostly the
    server's own 0.5 s sleeps before its illegal-data-value exceptions (mbsec answers those
    itself), so in parallel the six cost
    about as much as one. CPU stays low (the programs sleep), and the one timing-tight check
    (bytes 5 ms apart against a 7 ms byte timeout) is in the direct run, which only ever
    removes an assertion from the comparison."""

    def __init__(self, pki: Pki, base: Path) -> None:
        self.pki = pki
        self.base = base
        self.results: dict[str, ModeRuns] = {}

    def get(self, b: Built, mode: str) -> ModeRuns:
        if not self.results:
            labels = assertion_labels(b.client.parent / "unit-test-client.c")
            jobs = [(m, via) for m in ("tcp", "tcppi")
                    for via in ("direct", "through", "connect")]
            with ThreadPoolExecutor(len(jobs)) as pool:
                futures = {job: pool.submit(self._sequence, b, *job, labels) for job in jobs}
                done = {job: f.result() for job, f in futures.items()}
            for m in ("tcp", "tcppi"):
                d = self.base / f"{m}-through"
                backoff = [f"FC{e['modbus']['function_code']}@{e['modbus'].get('address')}"
                           for e in events(d) if e.get("event", {}).get("reason") == "backoff"]
                self.results[m] = ModeRuns(done[m, "direct"], done[m, "through"],
                                           done[m, "connect"], backoff)
        return self.results[mode]

    def _sequence(self, b: Built, mode: str, via: str, labels: dict[int, str]) -> Run:
        d = self.base / f"{mode}-{via}"
        d.mkdir()
        if via == "direct":
            host = "::1" if mode == "tcppi" else "127.0.0.1"
            with ut_server(b, mode, host, d) as port:
                return run_client(b, mode, port, d, labels)
        shim = "connect" if via == "connect" else "stunnel"
        with through_mbsec(b, self.pki, mode, d, shim) as port:
            return run_client(b, mode, port, d, labels)


@pytest.fixture(scope="module")
def runs(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(pki, tmp_path_factory.mktemp("libmodbus"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tcp", "tcppi"])
def test_unit_test_client_through_mbsec_differs_only_where_documented(
    mode: str, runs: Runs
) -> None:
    b = built()  # fails (scripts/test.sh) or skips (by hand) without the programs
    labels = set(assertion_labels(b.client.parent / "unit-test-client.c").values())
    assert set(EXPECTED[mode]) <= labels, "the client's labels changed"
    r = runs.get(b, mode)
    differences = r.proxied.failed - r.direct.failed
    report = (f"libmodbus {b.version} unit-test-client {mode}: failing directly "
              f"{sorted(r.direct.failed)}; through mbsec {sorted(r.proxied.failed)}")
    print(report)
    expected = set(EXPECTED[mode])
    assert differences == expected, (
        f"{report}\nunexpected: {sorted(differences - expected)}; "
        f"missing: {sorted(expected - differences)}\n"
        # before the request-path rewrite, 4 more failed: 0x0A from the reconnect backoff
        f"answered 0x0A for the reconnect backoff: {r.backoff_answers or 'none'}\n"
        f"outputs: {runs.base}/{mode}-*/")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tcp", "tcppi"])
def test_unit_test_client_through_mbsec_connect_differs_only_where_documented(
    mode: str, runs: Runs
) -> None:
    """The same client with ``mbsec connect`` as its shim instead of stunnel: a master that
    speaks plain Modbus/TCP only, on its own host, through the client side mbsec ships."""
    b = built()
    r = runs.get(b, mode)
    differences = r.connected.failed - r.direct.failed
    report = (f"libmodbus {b.version} unit-test-client {mode}: failing directly "
              f"{sorted(r.direct.failed)}; through mbsec connect {sorted(r.connected.failed)}")
    print(report)
    expected = set(EXPECTED[mode])
    assert differences == expected, (
        f"{report}\nunexpected: {sorted(differences - expected)}; "
        f"missing: {sorted(expected - differences)}\noutputs: {runs.base}/{mode}-connect/")
    assert differences == r.proxied.failed - r.direct.failed  # as through stunnel


def test_policy_is_strict_and_its_cases_pass(tmp_path: Path) -> None:
    """The policy above (no libmodbus needed): the unit test's function codes, unit ids
    (255 = MODBUS_TCP_SLAVE, the client's default; 18 = INVALID_SERVER_ID; 0 = broadcast) and
    tables fit the policy language."""
    f = tmp_path / "policy.yaml"
    f.write_text(POLICY)
    for cmd in (["check", "--strict"], ["test"]):
        done = subprocess.run([sys.executable, "-m", "mbsec.cli", "policy", *cmd, str(f)],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
