"""Events say what happened to the peer: a request whose connection the drain deadline closed
before the PLC's reply says the client got no reply, and a refused TLS 1.2 renegotiation closes
the connection with reason ``renegotiation_refused`` (not ``client_reset``). Real TLS clients,
a real (scripted) PLC, ``openssl s_client`` for the renegotiation."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl

import pytest
import trio
from conftest import Pki, ScriptedPlc, StartProxy, TlsClient, fail_or_skip, read_hr

SLOW = 50  # the register the PLC answers late


@pytest.mark.parametrize(("delay", "plc_outcome"), [(0.7, "reply"), (4.0, "upstream_reset")])
async def test_drain_deadline_before_the_reply_logs_no_reply(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, delay: float, plc_outcome: str,
) -> None:
    """SIGTERM with ``drain_timeout`` shorter than the PLC's answer: the client gets EOF and
    no reply, and the request's event says so (outcome failure, ``closed_before_reply``), with
    what the PLC did: its reply came after the connection was cut (0.7 s), or the proxy
    stopped first and closed the PLC connection (4 s)."""
    plc = ScriptedPlc(delay=lambda a: delay if a == SLOW else 0.0)
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, limits={"drain_timeout": 0.2},
                          upstream={"request_timeout": 8.0})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(1, 1)) is not None  # a normal request first
    await c.send(2, 1, read_hr(SLOW, 1))
    with trio.fail_after(5):
        while len(plc.requests) < 2:  # noqa: ASYNC110 - the PLC has no event to wait on
            await trio.sleep(0.01)
    h.proxy.request_shutdown()
    got = None
    with trio.fail_after(10):
        with contextlib.suppress(trio.BrokenResourceError):
            got = await c.recv()
        await h.stopped.wait()
    assert got is None  # EOF (or a reset), never the reply
    reqs = {e["modbus.transaction_id"]: e for e in h.events("modbus-request")}
    assert reqs[1]["event.outcome"] == "success"
    ev = reqs[2]
    assert ev["event.outcome"] == "failure", ev
    assert ev["event.reason"] == "closed_before_reply", ev
    assert ev["message"] != "request forwarded"
    assert "server_shutdown" in ev["error.message"] and "no reply" in ev["error.message"]
    assert ev["mbsec.plc_outcome"] == plc_outcome
    assert "modbus.exception_code" not in ev  # nothing was sent to the client
    closed = h.events("connection-closed")
    assert [e["event.reason"] for e in closed] == ["server_shutdown"]
    # a reply within the session's close wait (1 s) is counted in the close line (allowed:
    # the PLC executed it); a request still at the PLC when the proxy stops is logged after
    # the close line (docs/events.md)
    assert closed[0]["mbsec.allowed"] == (2 if plc_outcome == "reply" else 1)
    assert closed[0]["mbsec.errors"] == 0
    assert h.metrics.counter("mbsec_requests_total", decision="unanswered",
                             function="read_holding_registers").value == 1


async def test_refused_tls12_renegotiation_is_the_close_reason(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery,
) -> None:
    """``openssl s_client -tls1_2`` and its ``R`` command: the proxy answers the ClientHello
    with the no_renegotiation alert, s_client aborts, and the connection's close line says
    ``renegotiation_refused``. A TLS 1.3 client has no renegotiation: closing after its
    KeyUpdate (``k``) is a plain close."""
    if shutil.which("openssl") is None:
        fail_or_skip("needs the openssl command (apt-get install openssl)")
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{h.port}", "-servername",
            "localhost", "-CAfile", str(pki.ca.trust_bundle), "-cert", str(pki.operator.chain),
            "-key", str(pki.operator.key)]
    res = await trio.run_process([*base, "-tls1_2"], stdin=b"R\n", capture_stdout=True,
                                 capture_stderr=True, check=False)
    out = (res.stdout + res.stderr).decode(errors="replace")
    assert "no renegotiation" in out, out  # the alert s_client got
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "renegotiation_refused", closed
    assert closed["tls.client.x509.subject.common_name"] == "op-1"
    await trio.run_process([*base, "-tls1_3"], stdin=b"k\n", capture_stdout=True,
                           capture_stderr=True, check=False)
    with trio.fail_after(5):
        while len(h.events("connection-closed")) < 2:  # noqa: ASYNC110
            await trio.sleep(0.01)
    second = h.events("connection-closed")[1]
    assert second["event.reason"] in ("client_closed", "client_reset"), second


def _close_without_close_notify(port: int, ctx: ssl.SSLContext) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(bytes.fromhex("000100000006010300000001"))
        assert s.recv(100)  # the reply, then a bare close (no unwrap: no close_notify)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_close_without_close_notify_is_a_reset_not_a_renegotiation(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, version: ssl.TLSVersion,
) -> None:
    """Python's ``ssl`` client closing its socket without ``unwrap()``: the documented
    ``client_reset`` under both versions. Regression: under TLS 1.2 OpenSSL's pending output
    at that EOF made it ``renegotiation_refused``, a renegotiation nobody attempted."""
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    ctx = pki.client_ctx(pki.operator, max_version=version)
    await trio.to_thread.run_sync(_close_without_close_notify, h.port, ctx)
    closed = await h.wait_event("connection-closed")
    assert closed["event.reason"] == "client_reset", closed
