"""A closed session is freed by reference counting alone, not at the cyclic GC's next pass.

With the cyclic collector off, real mutual-TLS sessions through a real proxy (a request each,
a denied one, a refused handshake, one the proxy closes itself) are opened and closed: once
closed, none of the session's objects (``Session``, its ``ServerTlsStream`` and server-side
``ssl.SSLObject`` with OpenSSL's state, the data plane's ``ClientConn`` / ``ClientIO``,
``Decisions``) may survive, and a collection afterwards finds no mbsec object in a reference
cycle. Before, ``ClientConn`` and ``ClientIO`` pointed at each other, so every closed session
waited, whole, for a full collection (benchmarks/README.md, "Memory").
"""

from __future__ import annotations

import collections
import contextlib
import gc
import ssl
from typing import Any

import trio
from conftest import Pki, ProxyHandle, ScriptedPlc, StartProxy, TlsClient, read_hr

from mbsec.path.client import ClientConn
from mbsec.path.decide import Decisions
from mbsec.path.epoll import ClientIO
from mbsec.session import Session
from mbsec.tls_stream import ServerTlsStream

SESSIONS = 20  # clean closes, besides the denied, refused and server-closed ones
WATCHED: tuple[type, ...] = (Session, ServerTlsStream, ClientConn, ClientIO, Decisions)


def _server_objects() -> collections.Counter[str]:
    """How many of each per-session server object exist (the client's SSLObjects are not
    counted: the test's trio clients are in trio's own cycles)."""
    counts: collections.Counter[str] = collections.Counter()
    for o in gc.get_objects():
        if isinstance(o, WATCHED):
            counts[type(o).__qualname__] += 1
        elif isinstance(o, ssl.SSLObject) and o.server_side:
            counts["SSLObject(server)"] += 1
    return counts


def _mbsec_garbage() -> collections.Counter[str]:
    """Collect, keeping what was garbage: the mbsec objects (and server-side SSLObjects) that
    only the cyclic collector could have freed."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    found: collections.Counter[str] = collections.Counter()
    for o in garbage:
        module = type(o).__module__
        if module == "builtins" and callable(o):
            module = getattr(o, "__module__", None) or ""
        if module.startswith("mbsec") or (isinstance(o, ssl.SSLObject) and o.server_side):
            found[f"{module}.{getattr(o, '__qualname__', type(o).__qualname__)}"] += 1
    del garbage
    return found


async def _closed(h: ProxyHandle, n: int) -> None:
    """Wait until ``n`` sessions logged their end (close line or handshake rejection)."""
    with trio.fail_after(10):
        while len(h.events("connection-closed")) + len([  # noqa: ASYNC110 - a log, no event
                e for e in h.events("tls-handshake") if e["event.outcome"] == "failure"]) < n:
            await trio.sleep(0.01)


async def _session(port: int, ctx: ssl.SSLContext, pdu: bytes) -> Any:
    c = await TlsClient.connect(port, ctx)
    try:
        return await c.request(1, 1, pdu)
    finally:
        await c.aclose()


async def test_closed_sessions_are_freed_without_the_cyclic_gc(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery,
) -> None:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    # a long request_timeout: nothing may wait for a deadline to let go of a closed session
    h = await start_proxy(plc.port, limits={"request_complete_timeout": 0.3},
                          upstream={"request_timeout": 10.0})
    operator = pki.client_ctx(pki.operator)
    gc.collect()  # what startup left in cycles (e.g. the YAML loader) is not the sessions'
    gc.disable()
    try:
        baseline = _server_objects()
        # the first request waits for the PLC link to open (the target's wait queue)
        for _ in range(SESSIONS):
            assert await _session(h.port, operator, read_hr(1, 1)) is not None
        denied = await _session(h.port, pki.client_ctx(pki.norole), read_hr(1, 1))
        assert denied is not None and denied[2][0] & 0x80  # an exception reply
        with contextlib.suppress(trio.BrokenResourceError, ssl.SSLError):
            await _session(h.port, pki.client_ctx(None), read_hr(1, 1))  # no certificate
        c = await TlsClient.connect(h.port, operator)
        await c.stream.send_all(b"\x00\x01\x00")  # never completed: the proxy closes it
        assert await c.closed_by_peer()
        await c.aclose()
        await _closed(h, SESSIONS + 3)
        # the session task ends right after its close line; nothing else may hold it
        with trio.move_on_after(3):
            while _server_objects() != baseline:  # noqa: ASYNC110 - freeing has no event
                await trio.sleep(0.05)
        left = _server_objects()
        assert left == baseline, (
            f"closed sessions still alive without the cyclic GC: {left - baseline}; "
            f"in reference cycles: {dict(_mbsec_garbage())}")
        assert _mbsec_garbage() == collections.Counter()
        assert len(h.events("connection-closed")) == SESSIONS + 2
    finally:
        gc.enable()
