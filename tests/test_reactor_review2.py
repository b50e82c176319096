"""Second review of the threaded data plane (mbsec/reactor.py) after the first round of fixes.

Each test proved one bug (a strict xfail until it was fixed); they stay as regression tests.
Real sockets on 127.0.0.1: the conftest proxy (both engines where both can run the case; the
trio engine must pass), scripted trio PLCs, raw TLS clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TEST_POLICY, Pki, ProxyHandle, ScriptedPlc, StartProxy, TlsClient, read_hr

from mbsec.audit import ListSink, make_logger
from mbsec.metrics import Metrics
from mbsec.modbus.mbap import encode_adu
from mbsec.settings import LoggingSettings, build_settings


async def _scripted(nursery: trio.Nursery, **kw: Any) -> ScriptedPlc:
    plc = ScriptedPlc(**kw)
    await nursery.start(plc.serve)
    return plc


async def _proxy(
    nursery: trio.Nursery, pki: Pki, tmp_path: Path, plc_port: int, *, sink: ListSink,
    data_plane: str,
) -> ProxyHandle:
    """conftest's ``start_proxy`` with a log destination of the test's choosing."""
    from mbsec.server import Proxy

    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(TEST_POLICY, encoding="utf-8")
    settings = build_settings(
        {
            "listen": ["127.0.0.1:0"],
            "tls": {
                "cert": str(pki.server.chain),
                "key": str(pki.server.key),
                "client_ca": str(pki.ca.trust_bundle),
                "crl": [str(pki.crl)],
                "handshake_timeout": 5.0,
            },
            "policy": str(policy_path),
            "upstreams": {"plc": {"host": "127.0.0.1", "port": plc_port, "unit_ids": [1, 2],
                                  "request_timeout": 1.0, "connect_timeout": 1.0}},
            "logging": {"stdout": False, "allowed_requests": "info"},
            "data_plane": data_plane,
        },
        environment=False,
    )
    log = make_logger(LoggingSettings(stdout=False, allowed_requests="info"), extra_sinks=[sink])
    metrics = Metrics()
    proxy = Proxy(settings, log=log, metrics=metrics)
    addrs = await nursery.start(proxy.serve)
    return ProxyHandle(proxy, addrs[0][1], sink, metrics, policy_path)


# -- 1. a timed-out request's client starts its next one on the link: the sweep resets it -----


async def test_a_timeout_does_not_reset_the_link_for_the_request_its_client_starts_next(
    start_proxy: StartProxy, nursery: trio.Nursery, pki: Pki
) -> None:
    plc = await _scripted(nursery, delay=lambda a: 2.0 if a == 50 else 0.0)
    h = await start_proxy(plc.port, upstream={"request_timeout": 0.3},
                          limits={"max_pipelined": 1})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    # a read the PLC answers too late, and behind it (pipelining limit 1) a read it answers
    await c.stream.send_all(encode_adu(1, 1, read_hr(50, 1)) + encode_adu(2, 1, read_hr(7, 1)))
    first, second = await c.recv(), await c.recv()
    assert first is not None and first[0] == 1 and first[2] == bytes([0x83, 0x0B])
    resets = [e.get("event.reason") for e in h.events("upstream-reset")]
    assert second is not None and second[0] == 2
    assert second[2] == bytes([3, 2, 0, 7]), (
        f"the second read was answered {second[2].hex()} and never reached the PLC "
        f"({len(plc.requests)} request(s) there); link resets: {resets}")


# -- 2. an exception while deciding a request leaks the in-flight count: the session hangs ----


class _DenyFailingSink(ListSink):
    """A log destination that breaks (its pipe closed) on denied-request lines."""

    def write(self, level: str, line: str) -> None:
        if '"request denied"' in line:
            raise BrokenPipeError(32, "Broken pipe")
        super().write(level, line)


@pytest.mark.parametrize("engine", [
    "thread",
    "trio",
])
async def test_an_exception_while_deciding_a_request_does_not_hang_the_connection(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery, engine: str
) -> None:
    plc = await _scripted(nursery)
    h = await _proxy(nursery, pki, tmp_path, plc.port, sink=_DenyFailingSink(),
                     data_plane=engine)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.send(1, 1, read_hr(500, 1))  # outside operator-read: denied, and the log fails
    outcome: object = "no reply and no close"
    with trio.move_on_after(1.5):
        try:
            outcome = await c.recv()
        except trio.BrokenResourceError as exc:
            outcome = exc
    assert outcome != "no reply and no close", (
        f"the connection neither answered nor closed; {len(h.proxy.sessions)} session(s) open")


# -- 3. a log line that fails while a link resets loses every request on the link ------------


class _ResetFailingSink(ListSink):
    """A log destination that breaks (its pipe closed) on upstream-reset lines."""

    def write(self, level: str, line: str) -> None:
        if '"upstream-reset"' in line:
            raise BrokenPipeError(32, "Broken pipe")
        super().write(level, line)


async def test_an_exception_while_logging_a_link_reset_does_not_lose_its_requests(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery
) -> None:
    # thread engine only: in the trio engine the same failure ends the upstream manager task
    # and with it the proxy (a separate matter)
    plc = await _scripted(nursery, garbage_at=frozenset({0}))  # a broken reply: reset
    h = await _proxy(nursery, pki, tmp_path, plc.port, sink=_ResetFailingSink(),
                     data_plane="thread")
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    await c.send(1, 1, read_hr(0, 1))
    outcome: object = "no reply and no close"
    with trio.move_on_after(1.5):
        try:
            outcome = await c.recv()
        except trio.BrokenResourceError as exc:
            outcome = exc
    assert outcome != "no reply and no close", (
        f"the request was lost with its link: {len(plc.requests)} request(s) reached the PLC, "
        f"{len(h.proxy.sessions)} session(s) still open")
