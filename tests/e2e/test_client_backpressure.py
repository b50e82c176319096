"""Backpressure towards a client that stops reading, over real sockets: what the proxy keeps in
memory for it is bounded (replies answered at once, TLS records of its own such as KeyUpdate
answers), and the stall limit (``limits.idle_timeout``) ends the connection."""

from __future__ import annotations

import ctypes
import socket
import ssl
import time
from typing import Any

import pytest
import trio
from conftest import Pki, ScriptedPlc, StartProxy, read_hr, tuned_client

from mbsec.modbus.mbap import encode_adu


def adopted_clients(h: Any) -> list[Any]:
    """The data plane's adopted client connections (:class:`mbsec.path.epoll.ClientIO`, found
    through the epoll handlers they registered). Read from the trio thread: a snapshot."""
    from mbsec.path.epoll import ClientIO

    owners = [getattr(fn, "__self__", None) for fn in list(h.proxy.data_plane._handlers.values())]
    return [o for o in owners if isinstance(o, ClientIO)]


async def test_replies_made_at_once_do_not_pile_up_behind_a_client_that_stopped_reading(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """Requests answered at once (no route, a denial) do not count towards ``max_pipelined``,
    so nothing but the full socket stops the pump: it must stop starting buffered requests
    once the socket towards the client is full. A client that sends one read's worth of tiny
    requests and never reads would otherwise get thousands of replies (tens of kB, ~4x the
    bytes it sent: 12-byte requests, 31-byte records) parked in memory until the stall limit.
    Regression: the batching of a pass's replies into one write found the full socket only at
    the end of the pass, after the pump had answered every request of the read."""
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, limits={"idle_timeout": 5.0, "max_pipelined": 1})
    c = await tuned_client(h.port, pki, rcvbuf=1, mss=88)
    try:
        # unit 7 has no route: each request is answered at once (0x0A), never reaching a PLC
        flood = b"".join(encode_adu(i & 0xFFFF, 7, read_hr(0, 1)) for i in range(20000))
        with trio.move_on_after(2):
            await c.stream.send_all(flood)  # blocks once the proxy stops reading: expected
        with trio.fail_after(3):  # the stall timer runs: the socket towards it is full
            while True:
                if any(io.conn._stall_timer is not None for io in adopted_clients(h)):
                    break
                await trio.sleep(0.01)
        await trio.sleep(0.2)
        (io,) = adopted_clients(h)
        pending = len(io._out) + sum(len(r) for r in io.conn.replies)
        assert pending < 1024, (
            f"{pending} bytes of replies queued in memory behind a full socket "
            f"(max_pipelined = 1)")
    finally:
        await c.aclose()


# -- TLS 1.3 KeyUpdate: output of the TLS layer itself ---------------------------------------

SSL_KEY_UPDATE_REQUESTED = 1
TLS1_3_VERSION = 0x0304


def _ssl_pointer(sock: ssl.SSLSocket) -> int:
    """The ``SSL *`` of a CPython ``_ssl._SSLSocket`` (the field after PyObject_HEAD and the
    socket weakref): the standard library has no API that sends a KeyUpdate."""
    obj = sock._sslobj  # type: ignore[attr-defined]
    ptr = ctypes.c_void_p.from_address(id(obj) + 3 * ctypes.sizeof(ctypes.c_void_p)).value
    return int(ptr or 0)


def _libssl() -> Any:
    import _ssl

    lib = ctypes.CDLL(_ssl.__file__)  # resolves through the libssl _ssl is linked with
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_version.argtypes = [ctypes.c_void_p]
    lib.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    return lib


def _key_update_flood(port: int, ctx: ssl.SSLContext, most: int) -> tuple[ssl.SSLSocket, int]:
    """A TLS 1.3 client that never reads sends KeyUpdate(update_requested) records, no
    request, until the proxy closes the connection or ``most`` are sent; while its socket
    takes nothing (the proxy stopped reading) it keeps trying, as a flooding peer would.
    Each asks the proxy for a KeyUpdate of its own. Returns the connection (the caller
    closes it) and how many it sent. Both socket buffers are small, so the kernel holds only
    a few kB in either direction."""
    lib = _libssl()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 88)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", port))
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        ptr = _ssl_pointer(s)
        if not ptr or lib.SSL_version(ptr) != TLS1_3_VERSION:
            pytest.fail("cannot reach the SSL object of the client socket (CPython layout?)")
        s.settimeout(0.5)
        sent = 0
        give_up = time.monotonic() + 20
        while sent < most and time.monotonic() < give_up:
            assert lib.SSL_key_update(ptr, SSL_KEY_UPDATE_REQUESTED) == 1
            while time.monotonic() < give_up:
                try:
                    s.do_handshake()  # sends the pending KeyUpdate
                    break
                except TimeoutError:
                    # the proxy takes nothing now; keep asking (a client that gave up
                    # here would go idle once the proxy's buffers grew, not stall)
                    continue
                except (ssl.SSLError, OSError):
                    return s, sent  # the proxy closed the connection
            sent += 1
    except BaseException:
        s.close()
        raise
    return s, sent


async def test_key_update_answers_to_a_client_that_never_reads_end_at_the_stall_limit(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """A TLS 1.3 client may ask for a KeyUpdate in return for each of its own: the proxy's
    answers are output of the TLS layer, not replies, and must leave through the same
    bounded path: once the socket towards a client that never reads is full, the proxy stops
    reading it and closes it at the stall limit (``client_stalled``). Regression: the trio
    data plane flushed these answers from its reader without a stall limit, and a reply
    waited behind that flush for ever."""
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    idle = 1.0
    h = await start_proxy(plc.port, limits={"idle_timeout": idle})
    ctx = pki.client_ctx(pki.operator, max_version=ssl.TLSVersion.TLSv1_3)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    most = 20000  # ~0.5 MB of KeyUpdate records, and as many answers
    s, sent = await trio.to_thread.run_sync(_key_update_flood, h.port, ctx, most)
    with s:
        assert sent < most, "the proxy kept reading a client whose socket it cannot write to"
        ev = await h.wait_event("connection-closed")
    assert ev["event.reason"] == "client_stalled", ev
    assert plc.requests == []
