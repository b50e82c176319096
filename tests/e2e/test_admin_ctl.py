"""``mbsec ctl`` against a real ``mbsec serve``: freeze and thaw writes, connections, drop,
reload, errors; the automatic freeze on a PLC link that flaps; node-wide freezes and rate
limits with ``workers = 2``. Real processes, TLS with the test PKI, Modbus clients (pymodbus
and the raw TLS client) and PLCs on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    TEST_POLICY,
    Pki,
    ScriptedPlc,
    ServeProcess,
    TlsClient,
    http_get,
    read_hr,
    serve_config,
    serve_process,
)

from mbsec.admin import bind_admin_socket

WRITE_10 = bytes.fromhex("06000a004d")  # FC06 register 10 := 77
FROZEN = bytes([0x86, 1])  # exception 01


def ctl_argv(cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "mbsec.cli", "ctl", "--config", str(cfg), *args]


def sock_argv(cfg: Path, *args: str) -> list[str]:
    """``--socket``: the admin socket serve_config puts next to the configuration."""
    return [sys.executable, "-m", "mbsec.cli", "ctl", "--socket", str(cfg.parent / "admin.sock"),
            *args]


async def ctl(cfg: Path, *args: str) -> tuple[int, str, str]:
    res = await trio.run_process(sock_argv(cfg, *args), capture_stdout=True,
                                 capture_stderr=True, check=False)
    return res.returncode, res.stdout.decode(), res.stderr.decode()


async def ctl_json(cfg: Path, *args: str) -> dict[str, Any]:
    res = await trio.run_process(sock_argv(cfg, "--json", *args), capture_stdout=True,
                                 capture_stderr=True, check=False)
    assert res.returncode == 0, (res.stdout, res.stderr)
    return dict(json.loads(res.stdout))


async def started(sp: ServeProcess, workers: int = 1) -> list[dict[str, Any]]:
    return [await sp.next_event("server-start") for _ in range(workers)]


def port_of(start: dict[str, Any]) -> int:
    return int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])


async def scripted(nursery: trio.Nursery, **kw: Any) -> ScriptedPlc:
    plc = ScriptedPlc(**kw)
    await nursery.start(plc.serve)
    return plc


def writes_seen(plc: ScriptedPlc) -> int:
    return sum(1 for _tid, _unit, pdu in plc.requests if pdu[0] == 6)


# -- one worker: freeze, thaw, reload, connections, drop ------------------------------------------


def pymodbus_session(port: int, ctx: ssl.SSLContext, cfg: Path) -> list[Any]:
    """One pymodbus TLS connection: write, freeze (mbsec ctl), write + read, thaw, write.
    Runs in a thread with its own asyncio loop; ctl runs as a child process in between."""
    from pymodbus.client import AsyncModbusTlsClient

    async def main() -> list[Any]:
        client = AsyncModbusTlsClient("127.0.0.1", port=port, sslctx=ctx, timeout=3, retries=0)
        assert await client.connect()
        try:
            out: list[Any] = [await client.write_register(10, 77, device_id=1)]
            out.append(subprocess.run(ctl_argv(cfg, "freeze", "plc"),  # noqa: ASYNC221
                                      capture_output=True, text=True, check=False))
            out.append(await client.write_register(10, 78, device_id=1))
            out.append(await client.read_holding_registers(10, count=2, device_id=1))
            out.append(subprocess.run(ctl_argv(cfg, "thaw", "plc"),  # noqa: ASYNC221
                                      capture_output=True, text=True, check=False))
            out.append(await client.write_register(10, 79, device_id=1))
            return out
        finally:
            client.close()

    return asyncio.run(main())


async def test_ctl_freeze_refuses_writes_from_the_next_request_and_thaw_undoes_it(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port)
    async with serve_process(cfg) as sp:
        [start] = await started(sp)
        port = port_of(start)
        assert oct((tmp_path / "admin.sock").stat().st_mode & 0o777) == "0o660"
        w1, froze, w2, read, thawed, w3 = await trio.to_thread.run_sync(
            pymodbus_session, port, pki.client_ctx(pki.engineer), cfg)
        assert not w1.isError()
        assert froze.returncode == 0 and "writes frozen: plc" in froze.stdout, froze
        assert w2.isError() and w2.exception_code == 1  # the very next write
        assert not read.isError() and read.registers == [10, 11]  # reads go on
        assert thawed.returncode == 0 and "thawed: plc (manual)" in thawed.stdout, thawed
        assert not w3.isError()
        values = [int.from_bytes(pdu[3:5], "big") for _t, _u, pdu in plc.requests
                  if pdu[0] == 6]
        assert values == [77, 79]  # the frozen write never reached the PLC
        ev = await sp.next_event("writes-freeze")
        assert ev["event"]["reason"] == "operator" and ev["mbsec"]["frozen"] is True
        assert ev["mbsec"]["target"] == "plc" and ev["mbsec"]["freeze_kind"] == "manual"
        ev = await sp.next_event("writes-freeze")
        assert ev["mbsec"]["frozen"] is False
        refused = [e for e in sp.events if e["event"]["action"] == "modbus-request"
                   and e["event"].get("reason") == "writes_frozen"]
        assert len(refused) == 1 and refused[0]["modbus"]["decision"] == "frozen"
        assert refused[0]["modbus"]["values"] == [78]
        closed = await sp.next_event("connection-closed")  # one connection for all of it
        assert closed["mbsec"]["requests"] == 4
        cmds = [e["mbsec"]["command"] for e in sp.events
                if e["event"]["action"] == "admin-command"]
        assert cmds == ["freeze", "thaw"]
        assert all(e["user"]["id"] == str(os.getuid()) for e in sp.events
                   if e["event"]["action"] == "admin-command")


async def test_a_freeze_survives_a_reload_and_a_restart(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """SIGHUP and ``mbsec ctl reload`` keep the freeze; a restart keeps it too (the state
    file), until an operator thaws it. ``freeze`` without a target freezes every target."""
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port)
    async with serve_process(cfg) as sp:
        port = port_of((await started(sp))[0])
        c = await TlsClient.connect(port, pki.client_ctx(pki.engineer))
        rc, out, _ = await ctl(cfg, "freeze")
        assert rc == 0 and "writes frozen: all targets" in out
        status = await ctl_json(cfg, "status")
        assert [f["target"] for f in status["frozen"]] == ["*"]
        assert status["connections"] == 1 and status["generation"] == 0
        sp.proc.send_signal(signal.SIGHUP)
        assert (await sp.next_event("config-reload"))["event"]["outcome"] == "success"
        assert await c.request(1, 1, WRITE_10) == (1, 1, FROZEN)
        reloaded = await ctl_json(cfg, "reload")
        assert reloaded["generation"] == 2
        assert await c.request(2, 2, WRITE_10) == (2, 2, FROZEN)  # unit 2: same target
        assert await c.request(3, 1, read_hr(0, 1)) == (3, 1, bytes([3, 2, 0, 0]))
        await c.aclose()
        sp.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await sp.proc.wait() == 0
    assert not (tmp_path / "admin.sock").exists()  # removed on the way out
    async with serve_process(cfg) as sp:
        port = port_of((await started(sp))[0])
        c = await TlsClient.connect(port, pki.client_ctx(pki.engineer))
        assert await c.request(4, 1, WRITE_10) == (4, 1, FROZEN)  # still frozen
        rc, out, _ = await ctl(cfg, "thaw")
        assert rc == 0 and "writes: not frozen" in out
        assert await c.request(5, 1, WRITE_10) == (5, 1, WRITE_10)
        await c.aclose()
    assert writes_seen(plc) == 1


async def test_ctl_connections_drop_and_refusals(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port)
    async with serve_process(cfg) as sp:
        port = port_of((await started(sp))[0])
        op = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        eng = await TlsClient.connect(port, pki.client_ctx(pki.engineer))
        assert await op.request(1, 1, read_hr(0, 1)) is not None
        conns = (await ctl_json(cfg, "connections"))["connections"]
        assert sorted(c["common_name"] for c in conns) == ["eng-1", "op-1"]
        rc, out, _ = await ctl(cfg, "connections")
        assert rc == 0 and "op-1" in out and "2 connection(s)" in out
        victim = next(c["conn_id"] for c in conns if c["common_name"] == "op-1")
        rc, out, _ = await ctl(cfg, "drop", str(victim))
        assert rc == 0 and f"connection {victim} closes" in out
        assert await op.closed_by_peer()
        closed = await sp.next_event("connection-closed")
        assert closed["event"]["reason"] == "dropped_by_operator"
        assert await eng.request(2, 1, read_hr(0, 1)) is not None  # the other one goes on
        for args, words in [(("drop", "99999"), "no connection 99999"),
                            (("freeze", "nosuch"), "unknown target 'nosuch' (upstreams: plc)")]:
            rc, out, err = await ctl(cfg, *args)
            assert rc == 1 and out == "" and err.startswith("error: ") and words in err
            assert "Traceback" not in err
        ev = await sp.next_event("admin-command")
        while ev["event"]["outcome"] != "failure":
            ev = await sp.next_event("admin-command")
        assert ev["event"]["reason"] == "unknown_connection"
        await eng.aclose()


async def test_ctl_says_what_is_wrong_without_a_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sock"
    res = await trio.run_process([sys.executable, "-m", "mbsec.cli", "ctl", "--socket",
                                  str(missing), "status"], capture_stderr=True, check=False)
    assert res.returncode == 1
    err = res.stderr.decode()
    assert err.startswith(f"error: no admin socket at {missing} (is mbsec serve running?")
    assert err.count("\n") == 1
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # a socket file nobody listens on
    res = await trio.run_process([sys.executable, "-m", "mbsec.cli", "ctl", "--socket",
                                  str(stale), "status"], capture_stderr=True, check=False)
    assert res.returncode == 1 and b"nothing listens on" in res.stderr


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory everyone may enter (tmp_path is root's alone), under /tmp, named ctl-*."""
    d = Path(tempfile.mkdtemp(prefix="ctl-admin-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(path: Path) -> str:
    """``mbsec ctl status`` run by uid/gid 65534 (a forked child: no second interpreter that
    user would have to be allowed to start); what it printed on stderr."""
    from mbsec.ctl import CtlError, request

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                request(path, {"command": "status"}, timeout=1)
                msg = "answered"
            except CtlError as exc:
                msg = f"error: {exc}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return out


def test_socket_permissions_decide_who_may_use_it(world_dir: Path) -> None:
    """Mode 0660 root:root: another user gets a one-line "permission denied"; with the other
    bits of the mode it gets in (the socket answers), so the mode is what decides."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    path = world_dir / "admin.sock"
    sock = bind_admin_socket(path, 0o660)
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        assert as_nobody(path).startswith(
            f"error: permission denied: {path} (the socket's mode and group decide")
        with pytest.raises(Exception, match="another process listens"):
            bind_admin_socket(path, 0o660)  # a live socket is never replaced
        path.chmod(0o666)  # nothing accepts here: the connect works, no answer comes
        assert as_nobody(path) == f"error: no answer on {path} within 1 s"
    finally:
        sock.close()


# -- the automatic freeze ------------------------------------------------------------------------


class FlappingPlc(ScriptedPlc):
    """Answers each request, then (while ``flapping``) hangs up: every link drops once idle,
    with no client to blame (the PLC-side EOF of an idle link)."""

    flapping = True

    async def _reply(self, stream: trio.SocketStream, lock: trio.Lock, tid: int, unit: int,
                     pdu: bytes) -> None:
        await super()._reply(stream, lock, tid, unit, pdu)
        if self.flapping:
            await trio.sleep(0.01)
            await stream.aclose()


AUTO = "[admin.auto_freeze]\nenabled = true\ndrops = 3\nwindow = 30\nstable_for = 1.5\n"


async def test_a_flapping_plc_link_freezes_writes_until_it_is_stable(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    plc = FlappingPlc()
    await nursery.start(plc.serve)
    cfg = serve_config(pki, tmp_path, plc.port, admin=AUTO,
                       extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    async with serve_process(cfg) as sp:
        [start] = await started(sp)
        port, mport = port_of(start), start["mbsec"]["metrics_port"]
        c = await TlsClient.connect(port, pki.client_ctx(pki.engineer))
        tid = 0
        with trio.fail_after(20):
            while not any(e["event"]["action"] == "writes-freeze" for e in sp.events):
                tid += 1
                await c.request(tid, 1, read_hr(0, 1))  # a link: connect, answer, EOF
                await trio.sleep(0.1)
                with trio.move_on_after(0.3):
                    await sp.next_event("writes-freeze")
        ev = next(e for e in sp.events if e["event"]["action"] == "writes-freeze")
        assert ev["event"]["reason"] == "link_flapping" and ev["mbsec"]["freeze_kind"] == "auto"
        assert ev["mbsec"]["drops"] == 3 and ev["mbsec"]["target"] == "plc"
        _, body = await http_get(mport, "/metrics")
        assert 'mbsec_writes_frozen{kind="auto",target="plc"} 1' in body
        status = await ctl_json(cfg, "status")
        assert status["frozen"][0]["kinds"] == ["auto"] and status["auto_freeze"]["enabled"]
        writes = writes_seen(plc)
        assert await c.request(900, 1, WRITE_10) == (900, 1, FROZEN)
        assert writes_seen(plc) == writes
        refused = await sp.next_event("modbus-request")
        while refused["event"].get("reason") != "link_flapping":
            refused = await sp.next_event("modbus-request")
        plc.flapping = False  # the link holds from now on: stable after 1.5 s
        await trio.sleep(0.3)  # the last flapping link's EOF is in (else it resets stability)
        assert await c.request(901, 1, read_hr(0, 1)) == (901, 1, bytes([3, 2, 0, 0]))
        thaw = await sp.next_event("writes-freeze")
        assert thaw["event"]["reason"] == "link_stable" and thaw["mbsec"]["frozen"] is False
        assert await c.request(902, 1, WRITE_10) == (902, 1, WRITE_10)
        _, body = await http_get(mport, "/metrics")
        assert 'mbsec_writes_frozen{kind="auto",target="plc"} 0' in body
        await c.aclose()


async def test_a_client_that_breaks_links_does_not_freeze_writes(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Resets charged to a client (its reads get a broken reply) are its own business: the
    breaker refuses it, nobody's writes freeze."""
    plc = await scripted(nursery, garbage_at=frozenset({7}))
    cfg = serve_config(pki, tmp_path, plc.port, admin=AUTO.replace("drops = 3", "drops = 2"))
    async with serve_process(cfg) as sp:
        port = port_of((await started(sp))[0])
        bad = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        for i in range(4):
            await bad.request(i, 1, read_hr(7, 1))
        resets = [e for e in sp.events if e["event"]["action"] == "upstream-reset"]
        while len(resets) < 3:
            resets.append(await sp.next_event("upstream-reset"))
        assert all(e["mbsec"].get("blamed") for e in resets)
        eng = await TlsClient.connect(port, pki.client_ctx(pki.engineer))
        assert await eng.request(1, 1, WRITE_10) == (1, 1, WRITE_10)
        assert not any(e["event"]["action"] == "writes-freeze" for e in sp.events)
        await bad.aclose()
        await eng.aclose()


# -- workers = 2: one freeze, one budget -----------------------------------------------------------


async def spread_connections(port: int, pki: Pki, sp: ServeProcess, *, who: Any,
                             at_least: int = 6) -> list[tuple[TlsClient, int]]:
    """TLS connections of one identity until both workers hold some (worker 0 numbers its
    connections 1, 3, 5..., worker 1 2, 4, 6...): (client, worker)."""
    out: list[tuple[TlsClient, int]] = []
    with trio.fail_after(30):
        while len(out) < at_least or {w for _c, w in out} != {0, 1}:
            c = await TlsClient.connect(port, pki.client_ctx(who))
            ev = await sp.next_event("tls-handshake")
            out.append((c, (int(ev["mbsec"]["conn_id"]) - 1) % 2))
    return out


async def test_workers_obey_one_freeze(pki: Pki, tmp_path: Path, nursery: trio.Nursery) -> None:
    """The freeze lives in the state file every worker maps: a freeze through worker 0's
    socket refuses writes on connections of both workers from the next request on."""
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port, workers=2)
    async with serve_process(cfg) as sp:
        port = port_of((await started(sp, 2))[0])
        clients = await spread_connections(port, pki, sp, who=pki.engineer, at_least=4)
        listed = (await ctl_json(cfg, "connections"))["connections"]
        assert {c["worker"] for c in listed} == {0, 1} and len(listed) == len(clients)
        rc, _out, err = await ctl(cfg, "freeze", "plc")
        assert rc == 0, err
        for i, (c, _w) in enumerate(clients):
            assert await c.request(i, 1, WRITE_10) == (i, 1, FROZEN)
            assert await c.request(i, 1, read_hr(1, 1)) == (i, 1, bytes([3, 2, 0, 1]))
        assert writes_seen(plc) == 0
        status = await ctl_json(cfg, "status")
        assert [w["worker"] for w in status["workers"]] == [0, 1]
        assert sum(w["connections"] for w in status["workers"]) == len(clients)
        assert (await ctl_json(cfg, "reload"))["ok"]
        rc, _out, _err = await ctl(cfg, "thaw", "plc")
        for i, (c, _w) in enumerate(clients):
            assert await c.request(i, 1, WRITE_10) == (i, 1, WRITE_10)
        assert writes_seen(plc) == len(clients)
        victim = listed[-1]["conn_id"]
        assert (await ctl_json(cfg, "drop", str(victim)))["worker"] == (victim - 1) % 2
        for c, _w in clients:
            await c.aclose()


RATE_POLICY = TEST_POLICY.replace("rules:", """\
limits:
  default: {requests_per_second: 40, burst: 10}
rules:""", 1)


async def discard_output(sp: ServeProcess) -> None:
    assert sp.proc.stdout is not None
    while await sp.proc.stdout.receive_some(65536):
        pass


async def hammer(c: TlsClient, until: float, counts: dict[str, int]) -> None:
    """Requests back to back (one in flight) until ``until``: count answers and refusals."""
    tid = 0
    while trio.current_time() < until:
        tid = (tid + 1) & 0xFFFF
        reply = await c.request(tid, 1, read_hr(0, 1))
        assert reply is not None
        if reply[2][0] == 3:
            counts["allowed"] += 1
        else:
            assert reply[2] == bytes([0x83, 6]), reply  # 06: server busy (rate limited)
            counts["limited"] += 1


async def test_workers_keep_one_rate_for_the_node(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    """workers = 2, one identity with connections on both workers (their per-worker metrics
    count allowed requests in each): the node admits burst + rate x time, within 10 %, not
    twice that."""
    plc = await scripted(nursery)
    cfg = serve_config(pki, tmp_path, plc.port, workers=2, policy=RATE_POLICY,
                       extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    async with serve_process(cfg) as sp:
        starts = await started(sp, 2)
        port = port_of(starts[0])
        clients = await spread_connections(port, pki, sp, who=pki.operator, at_least=6)
        counts = {"allowed": 0, "limited": 0}
        duration = 3.0
        async with trio.open_nursery() as drain:
            drain.start_soon(discard_output, sp)  # a refusal is an event: keep the pipe open
            t0 = trio.current_time()
            async with trio.open_nursery() as n:
                for c, _w in clients:
                    n.start_soon(hammer, c, t0 + duration, counts)
            elapsed = trio.current_time() - t0
            drain.cancel_scope.cancel()
        rate = (counts["allowed"] - 10) / elapsed
        print(f"node rate {rate:.2f}/s (configured 40/s), {counts}, {elapsed:.2f} s, "
              f"{len(clients)} connections")
        assert counts["limited"] > counts["allowed"]  # the clients asked far more than that
        assert abs(rate - 40) <= 4, (counts, elapsed, rate)
        per_worker = []
        for s in starts:
            _, body = await http_get(s["mbsec"]["metrics_port"], "/metrics")
            line = next(ln for ln in body.splitlines() if ln.startswith(
                'mbsec_requests_total{decision="allow",function="read_holding_registers"}'))
            per_worker.append(int(float(line.rsplit(" ", 1)[1])))
        assert all(n > 0 for n in per_worker)  # both workers served the identity
        assert sum(per_worker) == counts["allowed"]
        print(f"allowed per worker: {per_worker}")
        for c, _w in clients:
            await c.aclose()


async def test_a_failing_command_is_answered_and_logged_and_the_proxy_goes_on(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery, start_proxy: Any,
) -> None:
    """A bug in a command handler costs that command (an answer and an event), not the
    proxy; a request that is not JSON is refused with its reason."""
    from mbsec.admin import AdminServer, ask

    plc = await scripted(nursery)
    h = await start_proxy(plc.port)
    path = tmp_path / "a.sock"
    server = AdminServer(h.proxy, path)
    await nursery.start(server.serve, server.bind(0o600, None))

    def broken() -> list[str]:
        raise RuntimeError("boom")

    h.proxy.write_freeze.thaw_all = broken
    answer = await ask(path, {"command": "thaw"})
    assert answer == {"ok": False, "error": "internal error (RuntimeError), logged"}
    ev = await h.wait_event("admin-command", lambda e: e.get("event.reason") == "internal_error")
    assert ev["error.message"] == "RuntimeError: boom"
    assert (await ask(path, {"command": "freeze"}))["ok"]
    s = await trio.open_unix_socket(str(path))
    await s.send_all(b"not json\n")
    reply = json.loads(await s.receive_some(4096))
    assert reply["ok"] is False and reply["error"].startswith("bad request")
    await s.aclose()
    await h.wait_event("admin-command", lambda e: e.get("event.reason") == "bad_request")
