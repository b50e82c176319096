"""Handshake admission against real silent floods: a real ``mbsec serve`` process with the
default limits, a flood process whose connections never send a ClientHello and reconnect when
closed (8 source addresses x 65 connections, as the issue measured, and 1,000 addresses, one
connection each, every one in its own /24 of 127.0.0.0/8), and a fresh client that connects
200 times (40 a second, from an address of its own) with a real certificate and must complete
its handshake and get its Modbus reply within 2 s at least 95 % of the time. A plant's 50
masters behind one SCADA host reconnecting at once during the flood all get through. The
waiting room: a storm from one /24 waits for places instead of being refused, and a waiter
that waits in vain is refused when its wait ends, with its reason."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from mbsec.modbus.mbap import FrameBuffer, encode_adu
from tests.conftest import Pki, ScriptedPlc, read_hr, serve_config

PROBES = 200
PROBE_INTERVAL = 0.025  # 40 attempts a second from the fresh address
WITHIN = 2.0
FRESH = "127.250.0.1"
SCADA = "127.251.0.1"


async def attempt(port: int, source: str, pki: Pki, within: float = WITHIN) -> float | None:
    """Connect from ``source``, handshake, one FC03: the seconds it took, None on failure."""
    t0 = trio.current_time()
    ctx = pki.client_ctx(pki.operator)
    with trio.move_on_after(within):
        sock = trio.socket.socket()
        try:
            await sock.bind((source, 0))
            await sock.connect(("127.0.0.1", port))
            s = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname="localhost")
            await s.do_handshake()
            await s.send_all(encode_adu(7, 1, read_hr(3, 1)))
            frames = FrameBuffer()
            while (adu := frames.next_frame()) is None:
                data = await s.receive_some(4096)
                if not data:
                    return None
                frames.receive_data(data)
            ok = adu.transaction_id == 7 and adu.pdu[:2] == b"\x03\x02"
            await trio.aclose_forcefully(s)
            return trio.current_time() - t0 if ok else None
        except (OSError, trio.BrokenResourceError):
            return None
        finally:
            sock.close()
    return None


async def fresh_client_attempts(port: int, pki: Pki) -> list[float | None]:
    results: list[float | None] = []

    async def one() -> None:
        results.append(await attempt(port, FRESH, pki))

    async with trio.open_nursery() as n:
        for _ in range(PROBES):
            n.start_soon(one)
            await trio.sleep(PROBE_INTERVAL)
    return results


class Served:
    def __init__(self, out: Path) -> None:
        self.out = out

    def events(self) -> list[dict[str, Any]]:
        lines = self.out.read_text(encoding="utf-8", errors="replace").splitlines()
        return [json.loads(x) for x in lines if x.startswith("{")]

    async def port(self) -> int:
        with trio.fail_after(15):
            while True:
                for ev in self.events():
                    if ev.get("event", {}).get("action") == "server-start":
                        return int(ev["mbsec"]["listen"][0].rsplit(":", 1)[1])
                await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def mbsec_serve(config: Path, out: Path) -> AsyncIterator[tuple[trio.Process, Served]]:
    """``mbsec serve`` with its events in a file (a pipe nobody reads would stop it)."""
    with out.open("wb") as fh:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "mbsec.cli", "serve", "--config", str(config)], stdout=fh)
        try:
            yield proc, Served(out)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def silent_flood(port: int, addresses: int, per_address: int,
                       seconds: float = 60.0) -> AsyncIterator[trio.Process]:
    # at the lowest priority: a real attacker's CPU is not the proxy's box; on a 2-core test
    # box the flood process would otherwise take the CPU the proxy defends with
    # (MBSEC_FLOOD_NICE=0: the benchmark's run at normal priority, the flood competing)
    nice = os.environ.get("MBSEC_FLOOD_NICE", "19")
    proc = await trio.lowlevel.open_process(
        ["nice", "-n", nice, sys.executable, "-m", "tests.silent_flood", str(port),
         str(seconds), str(addresses), str(per_address)], stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def plc(nursery: trio.Nursery) -> ScriptedPlc:
    p = ScriptedPlc()
    await nursery.start(p.serve)
    return p


@pytest.mark.parametrize(("addresses", "per_address"), [(8, 65), (1000, 1)],
                         ids=["8-addresses", "1000-addresses"])
async def test_fresh_clients_get_in_during_a_silent_flood(
    pki: Pki, plc: ScriptedPlc, tmp_path: Path, addresses: int, per_address: int,
) -> None:
    # the 50 masters share one certificate: max_per_identity allows them
    cfg = serve_config(pki, tmp_path, plc.port, extra="max_per_identity = 64\n")
    async with mbsec_serve(cfg, tmp_path / "events.jsonl") as (proc, served):
        port = await served.port()
        baseline = await attempt(port, FRESH, pki)
        assert baseline is not None
        async with silent_flood(port, addresses, per_address):
            await trio.sleep(2.0)  # the flood has taken every place it can
            results = await fresh_client_attempts(port, pki)
            # a plant's masters behind one SCADA host reconnect at once, during the flood
            async with trio.open_nursery() as n:
                masters: list[float | None] = []

                async def master() -> None:
                    masters.append(await attempt(port, SCADA, pki, within=5.0))

                for _ in range(50):
                    n.start_soon(master)
        assert proc.returncode is None  # still serving
        proc.send_signal(signal.SIGTERM)  # a clean stop writes the last summaries
        with trio.fail_after(20):
            assert await proc.wait() == 0
    ok = sorted(r for r in results if r is not None)
    share = len(ok) / len(results)
    p95 = ok[int(0.95 * len(ok)) - 1] if ok else None
    evs = served.events()
    evicted = sum(1 for e in evs if e["event"].get("reason") == "handshake_evicted")
    suppressed = sum(e["mbsec"]["suppressed"] for e in evs
                     if e["event"]["action"] == "rejections-suppressed")
    print(f"\n{addresses} addresses x {per_address}: {len(ok)}/{len(results)} fresh attempts "
          f"within {WITHIN:g} s (p95 {p95}); 50 SCADA masters: "
          f"{sum(m is not None for m in masters)}/50; evictions logged {evicted}, "
          f"rejections summarized {suppressed}")
    hs = sorted(e["event"]["duration"] / 1e9 for e in evs if e["event"]["action"] == "tls-handshake"
                and e["event"]["outcome"] == "success" and e["source"]["ip"] == FRESH)
    print("server-side handshake p50/p95", hs[len(hs) // 2], hs[int(len(hs) * 0.95)])
    assert share >= 0.95, (share, results)
    assert all(m is not None for m in masters), masters
    # the flood was real (the proxy refused or evicted it thousands of times), and its log
    # stayed small: at most the budget (5/s) plus one global summary per interval
    assert evicted + suppressed > 300, (evicted, suppressed)
    refusals = [e for e in evs if e["event"]["outcome"] == "failure"
                and e["event"]["action"] != "modbus-request"]
    assert len(refusals) <= 5 * 60 + 10, len(refusals)


STORM = "127.252.0.{}"  # 30 masters of one plant network: one /24, one rate bucket


async def test_a_storm_from_one_prefix_waits_for_places_instead_of_being_refused(
    pki: Pki, plc: ScriptedPlc, tmp_path: Path,
) -> None:
    """30 masters of one /24 reconnect at the same instant against 4 handshake places and a
    prefix rate of 20/s (burst 4): the ones that find no place or token wait in the waiting
    room and are admitted as handshakes end and tokens come, well within the 4 s they may
    wait, so every master completes its handshake and gets its reply in its first attempt and
    no rejection is written. Refused at once instead (the tarpit: with the room sized 0, 4 of
    the 30 were served and the others waited 2.5-7.5 s for a reset)."""
    cfg = serve_config(pki, tmp_path, plc.port, extra=(
        "max_per_identity = 64\nmax_handshakes = 4\nprefix_connection_rate = 20\n"
        "prefix_connection_burst = 4\n"))
    async with mbsec_serve(cfg, tmp_path / "events.jsonl") as (proc, served):
        port = await served.port()
        results: list[float | None] = []

        async def master(i: int) -> None:
            results.append(await attempt(port, STORM.format(i), pki, within=6.0))

        async with trio.open_nursery() as n:
            for i in range(1, 31):
                n.start_soon(master, i)
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    evs = served.events()
    rejected = [e for e in evs if e["event"]["action"] in ("connection-rejected",
                                                           "rejections-suppressed")]
    served_ok = sorted(r for r in results if r is not None)
    print(f"\n30 masters of one /24: {len(served_ok)}/30 served, slowest "
          f"{served_ok[-1] if served_ok else None:.2f} s; rejections {len(rejected)}")
    assert len(served_ok) == 30, results
    assert rejected == [], rejected
    assert served_ok[-1] < 4.0  # ~26 over the burst at 20/s: about 1.3 s of waiting
    accepted = [e for e in evs if e["event"]["action"] == "tls-handshake"
                and e["event"]["outcome"] == "success"]
    assert len(accepted) == 30


async def test_a_newcomer_that_waits_in_vain_is_refused_after_the_wait_with_its_reason(
    pki: Pki, plc: ScriptedPlc, tmp_path: Path,
) -> None:
    """A master whose prefix has spent its token (burst 1, one token per 100 s) while half of
    the handshake places are taken (a silent connection from elsewhere holds one of 2) speaks
    and waits: no token comes within the 4 s it may wait, so it is refused then, with the
    reason it waited for (``connection_rate_exceeded``, not ``too_many_handshakes``), its
    rejection event written when the wait ends (not when it started), and it never gets a
    ServerHello. The master before it, with the token, was served."""
    from datetime import datetime

    from mbsec.server import WAITING_S

    cfg = serve_config(pki, tmp_path, plc.port, extra=(
        "max_handshakes = 2\nprefix_connection_rate = 0.01\n"
        "prefix_connection_burst = 1\n"))
    async with mbsec_serve(cfg, tmp_path / "events.jsonl") as (proc, served):
        port = await served.port()
        holder = trio.socket.socket()  # silent: a handshake place held, no ClientHello
        await holder.bind(("127.253.0.1", 0))
        await holder.connect(("127.0.0.1", port))
        try:
            first = await attempt(port, STORM.format(1), pki, within=5.0)
            started = datetime.now().astimezone()
            second = await attempt(port, STORM.format(2), pki, within=WAITING_S + 2.0)
        finally:
            holder.close()
        assert proc.returncode is None
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    assert first is not None
    assert second is None
    evs = served.events()
    refused = [e for e in evs if e["event"]["action"] == "connection-rejected"
               and e["source"]["ip"] == STORM.format(2)]
    assert [e["event"]["reason"] for e in refused] == ["connection_rate_exceeded"], refused
    waited = (datetime.fromisoformat(refused[0]["@timestamp"].replace("Z", "+00:00"))
              - started).total_seconds()
    assert WAITING_S - 0.2 <= waited <= WAITING_S + 1.5, waited
    assert not [e for e in evs if e["event"]["action"] == "tls-handshake"
                and e.get("source", {}).get("ip") == STORM.format(2)]
