"""``mbsec demo``: the whole product in one command, on 127.0.0.1, with nothing left behind.

A throw-away CA issues the proxy's and the clients' certificates, a tiny simulated PLC (plain
Modbus/TCP, written here with mbsec.modbus so the demo needs no test extras) holds 100 holding
registers, the proxy runs in-process on ephemeral ports, and a real mutual-TLS Modbus client
walks through four steps. Each step is checked; the exit code is 0 only if all behaved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import ssl
import struct
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from mbsec.audit import ListSink, flatten, make_logger
from mbsec.modbus.mbap import FrameBuffer, encode_adu
from mbsec.settings import LoggingSettings, build_settings

DEMO_POLICY = """\
version: 1
default: deny
description: mbsec demo - operators may read holding registers 0-99 of unit 1, nothing else
targets:
  demo-plc:
    description: the simulated PLC
    unit_ids: [1]
rules:
  - id: operator-read
    description: Operators read process values (holding registers 0-99) on the demo PLC
    roles: [operator]
    targets: [demo-plc]
    functions: [read_holding_registers]
    addresses: ["0-99"]
"""

TIMEOUT = 10.0


# -- the simulated PLC ------------------------------------------------------------------------


class SimulatedPlc:
    """Plain Modbus/TCP server for unit 1: FC03/FC04 read, FC06/FC16 write, others -> 01."""

    def __init__(self, registers: int = 100) -> None:
        self.registers = [(i * 7) % 1000 for i in range(registers)]
        self.writes = 0
        self.port = 0

    def answer(self, pdu: bytes) -> bytes:
        fc = pdu[0]
        try:
            if fc in (3, 4):
                addr, count = struct.unpack(">HH", pdu[1:5])
                if not 1 <= count <= 125 or addr + count > len(self.registers):
                    return bytes([fc | 0x80, 2])
                vals = self.registers[addr : addr + count]
                return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *vals)
            if fc == 6:
                addr, value = struct.unpack(">HH", pdu[1:5])
                if addr >= len(self.registers):
                    return bytes([fc | 0x80, 2])
                self.registers[addr] = value
                self.writes += 1
                return pdu[:5]
            if fc == 16:
                addr, count = struct.unpack(">HH", pdu[1:5])
                if addr + count > len(self.registers):
                    return bytes([fc | 0x80, 2])
                new = struct.unpack(f">{count}H", pdu[6 : 6 + 2 * count])
                self.registers[addr : addr + count] = [int(v) for v in new]
                self.writes += 1
                return pdu[:5]
        except struct.error:
            return bytes([fc | 0x80, 3])
        return bytes([(fc & 0x7F) | 0x80, 1])

    async def handle(self, stream: trio.SocketStream) -> None:
        frames = FrameBuffer()
        try:
            while True:
                data = await stream.receive_some(4096)
                if not data:
                    return
                frames.receive_data(data)
                while (adu := frames.next_frame()) is not None:
                    if adu.unit_id != 1:
                        reply = bytes([(adu.pdu[0] & 0x7F) | 0x80, 0x0B])
                    else:
                        reply = self.answer(adu.pdu)
                    await stream.send_all(encode_adu(adu.transaction_id, adu.unit_id, reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception:  # a broken frame: a real PLC would just drop the connection
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as n:
            await n.start(trio.serve_listeners, self.handle, listeners)
            task_status.started(self.port)


# -- the client ---------------------------------------------------------------------------


@dataclass
class ClientResult:
    reply: bytes | None = None
    error: str | None = None


def client_context(ca_bundle: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_bundle))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _alert_name(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return str(cause.reason)
    return type(cause).__name__


async def modbus_over_tls(
    port: int, ctx: ssl.SSLContext, unit_id: int, pdu: bytes, tid: int = 1
) -> ClientResult:
    """Connect, handshake, send one request, read one reply (or the error that ends it)."""
    try:
        with trio.fail_after(TIMEOUT):
            tcp = await trio.open_tcp_stream("127.0.0.1", port)
            stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    except (trio.BrokenResourceError, OSError) as exc:
        return ClientResult(error=_alert_name(exc))
    try:
        with trio.fail_after(TIMEOUT):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                return ClientResult(error=_alert_name(exc))
            try:
                await stream.send_all(encode_adu(tid, unit_id, pdu))
                frames = FrameBuffer()
                while True:
                    data = await stream.receive_some(4096)
                    if not data:
                        return ClientResult(error="connection closed without a reply")
                    frames.receive_data(data)
                    adu = frames.next_frame()
                    if adu is not None:
                        if adu.transaction_id != tid:
                            return ClientResult(error="reply with a foreign transaction id")
                        return ClientResult(reply=adu.pdu)
            except trio.BrokenResourceError as exc:
                return ClientResult(error=_alert_name(exc))
    finally:
        with trio.move_on_after(1) as cs:
            cs.shield = True
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()  # close_notify: a polite client
        if cs.cancelled_caught:
            await trio.aclose_forcefully(stream)


# -- the script -----------------------------------------------------------------------------


@dataclass
class Step:
    title: str
    ok: bool
    told: str


class Demo:
    def __init__(self, workdir: Path, out: Callable[[str], None], show_events: bool) -> None:
        self.dir = workdir
        self.out = out
        self.show_events = show_events
        self.sink = ListSink()
        self.shown = 0
        self.steps: list[Step] = []

    def say(self, text: str = "") -> None:
        self.out(text)

    def events_since_last(self) -> None:
        lines = self.sink.lines[self.shown :]
        self.shown = len(self.sink.lines)
        if self.show_events:
            for line in lines:
                self.say(f"      {line}")

    def record(self, title: str, ok: bool, told: str) -> None:
        self.steps.append(Step(title, ok, told))
        mark = "[ok]  " if ok else "[FAIL]"
        self.say(f"  {mark} " + told.replace("\n", "\n         "))

    def make_pki(self) -> dict[str, Any]:
        from mbsec.pki.ca import CertificateAuthority

        self.say("1. A throw-away PKI: a plant CA, the proxy's certificate, an operator's "
                 "certificate (role 'operator'),")
        self.say("   and a second CA nobody trusts, with a client certificate of its own.")
        ca = CertificateAuthority.init(self.dir / "ca", common_name="mbsec demo CA")
        certs = self.dir / "certs"
        server = ca.issue("server", "mbsec-proxy", dns=("localhost",), ips=("127.0.0.1",),
                          out_dir=certs, name="proxy")
        operator = ca.issue("client", "hmi-operator-01", role="operator", out_dir=certs,
                            name="operator")
        rogue_ca = CertificateAuthority.init(self.dir / "rogue-ca", common_name="Rogue CA")
        rogue = rogue_ca.issue("client", "rogue-laptop", role="operator", out_dir=certs,
                               name="rogue")
        crl = ca.write_crl()
        return {"ca": ca, "server": server, "operator": operator, "rogue": rogue, "crl": crl}

    async def run(self) -> bool:
        from mbsec.server import Proxy

        pki = self.make_pki()
        policy = self.dir / "policy.yaml"
        policy.write_text(DEMO_POLICY, encoding="utf-8")
        self.say(f"2. A policy ({policy.name}): operators may read holding registers 0-99 of "
                 "unit 1; everything else is denied.")
        plc = SimulatedPlc()
        async with trio.open_nursery() as nursery:
            plc_port = await nursery.start(plc.serve)
            self.say(f"3. A simulated PLC: plain Modbus/TCP on 127.0.0.1:{plc_port}, unit 1, "
                     "100 holding registers.")
            settings = build_settings(
                {
                    "listen": ["127.0.0.1:0"],
                    "tls": {
                        "cert": str(pki["server"].chain),
                        "key": str(pki["server"].key),
                        "client_ca": str(pki["ca"].trust_bundle),
                        "crl": [str(pki["crl"])],
                    },
                    "policy": str(policy),
                    "upstreams": {
                        "demo-plc": {"host": "127.0.0.1", "port": plc_port, "unit_ids": [1]}
                    },
                    "logging": {"stdout": False, "allowed_requests": "info"},
                },
                source="demo",
                environment=False,  # the demo is self-contained: no MBSEC_* overrides
            )
            log = make_logger(LoggingSettings(stdout=False, allowed_requests="info"),
                              extra_sinks=[self.sink])
            proxy = Proxy(settings, log=log)
            # the proxy stops (drains) before the PLC does: stopping both at once would log
            # the PLC closing its connection, an upstream-reset the demo is not about
            async with trio.open_nursery() as proxy_nursery:
                addrs = await proxy_nursery.start(proxy.serve)
                port = addrs[0][1]
                self.say(f"4. mbsec, the proxy: mutual TLS on 127.0.0.1:{port} -> the PLC.")
                self.events_since_last()
                await self.drive(port, pki, plc)
                proxy.request_shutdown()
            nursery.cancel_scope.cancel()
        self.say()
        self.say("Shut down (the proxy first, then the PLC); the temporary directory is "
                 "removed next.")
        self.events_since_last()  # every event the summary counts is shown
        return all(s.ok for s in self.steps) and len(self.steps) == 4

    async def expect_event(self, action: str, **want: Any) -> dict[str, Any] | None:
        """Wait (2 s at most) for a not yet shown event with this action and these fields."""
        with trio.move_on_after(2):
            while True:
                for line in self.sink.lines[self.shown :]:
                    ev = flatten(json.loads(line))
                    if ev.get("event.action") == action and all(
                        ev.get(k) == v for k, v in want.items()
                    ):
                        return ev
                await trio.sleep(0.01)
        return None

    async def drive(self, port: int, pki: dict[str, Any], plc: SimulatedPlc) -> None:
        bundle = pki["ca"].trust_bundle
        op = pki["operator"]
        operator = client_context(bundle, op.cert, op.key)

        self.say()
        self.say("Step A: the operator reads holding registers 0-9 of unit 1 (allowed).")
        r = await modbus_over_tls(port, operator, 1, struct.pack(">BHH", 3, 0, 10), tid=0x0101)
        ev = await self.expect_event("modbus-request", **{"modbus.decision": "allow"})
        await self.expect_event("connection-closed")
        if r.reply and r.reply[0] == 3 and r.reply[1] == 20:
            vals = list(struct.unpack(">10H", r.reply[2:22]))
            self.record("allowed read", vals == plc.registers[:10] and ev is not None,
                        f"the PLC answered through the proxy: registers 0-9 = {vals}\n"
                        f"logged as allowed by rule {ev and ev.get('rule.id')!r}")
        else:
            self.record("allowed read", False, f"expected registers, got {r}")
        self.events_since_last()

        self.say()
        self.say("Step B: the operator tries to write 1234 into holding register 10 (denied).")
        before = plc.writes
        r = await modbus_over_tls(port, operator, 1, struct.pack(">BHH", 6, 10, 1234), tid=0x0202)
        ev = await self.expect_event("modbus-request", **{"modbus.decision": "deny"})
        await self.expect_event("connection-closed")
        ok = r.reply == bytes([0x86, 0x01]) and plc.writes == before and ev is not None
        self.record("denied write", ok,
                    "the proxy answered with Modbus exception 01 (illegal function)\n"
                    "the PLC never saw the write; a denial event was logged" if ok
                    else f"expected exception 01 and a denial event, got {r}")
        self.events_since_last()

        for title, who, reason in (
            ("Step C: a client without any certificate connects (rejected).", None,
             "no_certificate"),
            ("Step D: a client with a certificate from an unknown CA connects (rejected).",
             pki["rogue"], "unknown_ca"),
        ):
            self.say()
            self.say(title)
            ctx = client_context(bundle, who.cert if who else None, who.key if who else None)
            r = await modbus_over_tls(port, ctx, 1, struct.pack(">BHH", 3, 0, 1))
            ev = await self.expect_event("tls-handshake", **{"event.outcome": "failure"})
            ok = r.reply is None and r.error is not None and ev is not None \
                and ev.get("event.reason") == reason
            self.record(reason, ok,
                        f"the TLS handshake was refused; the client was told {r.error}\n"
                        f"the proxy logged the rejection with reason {reason!r}" if ok
                        else f"expected a TLS rejection ({reason}), got {r} / event {ev}")
            self.events_since_last()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mbsec demo",
        description="Throw-away PKI + simulated PLC + the proxy + a mutual-TLS client, end to "
        "end on 127.0.0.1; prints what happened and the SIEM events. Exit 0 if every step "
        "behaved as expected.",
    )
    p.add_argument("--quiet-events", action="store_true", help="do not print the JSON events")
    p.add_argument("--keep", metavar="DIR",
                   help="work in DIR (new or empty) instead of a temp dir, and keep it")
    args = p.parse_args(argv or [])
    if args.keep:
        workdir = Path(args.keep)
        if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
            p.error(f"--keep {workdir}: must be a new or empty directory")
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            p.error(f"--keep {workdir}: cannot create it: {exc.strerror or exc}")
    else:
        workdir = Path(tempfile.mkdtemp(prefix="mbsec-demo-"))

    def out(text: str) -> None:
        print(text, flush=True)

    demo = Demo(workdir, out, show_events=not args.quiet_events)
    out("mbsec demo: Modbus/TCP Security proxy, end to end on 127.0.0.1")
    out(f"(working directory {workdir})")
    out("")
    try:
        ok = trio.run(demo.run)
    except Exception as exc:
        out(f"demo failed: {type(exc).__name__}: {exc}")
        for line in traceback.format_exception(exc):
            out(line.rstrip())
        ok = False
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    out("")
    passed = sum(s.ok for s in demo.steps)
    out(f"Summary: {passed}/4 steps behaved as expected; {len(demo.sink.lines)} SIEM events.")
    counts: dict[str, int] = {}
    for line in demo.sink.lines:
        action = json.loads(line).get("event", {}).get("action", "?")
        counts[action] = counts.get(action, 0) + 1
    out("Events by action: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    out("RESULT: OK" if ok else "RESULT: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
