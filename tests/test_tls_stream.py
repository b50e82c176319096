"""ServerTlsStream, the server's handshake loop, against a real trio.SSLStream client over a
memory stream pair, with the test PKI: what the session relies on (facts of the session, the
state the data plane takes, the alert left unsent on failure, EOF, close_notify)."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Pki

from mbsec import trio_private
from mbsec.tls import handshake_failure_reason
from mbsec.tls_stream import ServerTlsStream


def _server_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.server.chain), str(pki.server.key))
    ctx.load_verify_locations(cafile=str(pki.ca.trust_bundle))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    return ctx


def _pair(pki: Pki, client_ctx: ssl.SSLContext) -> tuple[trio.SSLStream[Any], ServerTlsStream]:
    c_raw, s_raw = trio.testing.memory_stream_pair()
    return (trio.SSLStream(c_raw, client_ctx, server_hostname="localhost"),
            ServerTlsStream(s_raw, _server_ctx(pki)))


async def _server_error(server: ServerTlsStream) -> BaseException:
    with pytest.raises(trio.BrokenResourceError) as info:
        await server.do_handshake()
    assert info.value.__cause__ is not None
    return info.value.__cause__


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_handshake_then_the_data_plane_state_carries_the_session(
        pki: Pki, version: ssl.TLSVersion) -> None:
    client, server = _pair(pki, pki.client_ctx(pki.operator, max_version=version))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    assert server.version() == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
    assert server.cipher() is not None and not server.session_reused
    der = server.getpeercert(binary_form=True)
    assert der is not None and der == ssl.PEM_cert_to_DER_cert(pki.operator.cert.read_text())
    obj, incoming, outgoing, delayed = trio_private.take_tls_state(server)
    assert delayed == b""  # num_tickets = 0: nothing held back
    await client.send_all(b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01")
    incoming.write(await server.transport_stream.receive_some(65536))
    assert obj.read(100) == b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01"
    obj.write(b"reply")
    await server.transport_stream.send_all(outgoing.read())
    assert await client.receive_some(100) == b"reply"
    await server.aclose()  # close_notify, then the transport
    assert await client.receive_some(100) == b""  # a clean TLS end of stream, not an error


async def test_unknown_ca_raises_from_the_ssl_error_and_leaves_the_alert(pki: Pki) -> None:
    client, server = _pair(pki, pki.client_ctx(pki.rogue, max_version=ssl.TLSVersion.TLSv1_2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _ignore_broken(client.do_handshake))
        cause = await _server_error(server)
        assert handshake_failure_reason(cause)[0] == "unknown_ca"
        alert = trio_private.pending_alert(server)
        assert alert[:1] == b"\x15"  # an unsent TLS alert record, for the session to send
        await server.transport_stream.send_all(alert)
        await server.transport_stream.aclose()


async def test_no_certificate_is_refused_inside_the_handshake(pki: Pki) -> None:
    client, server = _pair(pki, pki.client_ctx(None, max_version=ssl.TLSVersion.TLSv1_2))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _ignore_broken(client.do_handshake))
        cause = await _server_error(server)
        assert handshake_failure_reason(cause)[0] == "no_certificate"
        assert trio_private.pending_alert(server)[:1] == b"\x15"
        await server.transport_stream.aclose()


async def test_end_of_stream_mid_handshake_is_client_closed(pki: Pki) -> None:
    c_raw, s_raw = trio.testing.memory_stream_pair()
    server = ServerTlsStream(s_raw, _server_ctx(pki))
    await c_raw.send_all(b"\x16\x03\x01\x00\x05\x01\x00\x00")  # a ClientHello cut short
    await c_raw.aclose()
    cause = await _server_error(server)
    assert isinstance(cause, ssl.SSLError)
    assert handshake_failure_reason(cause)[0] == "client_closed"


async def _ignore_broken(fn: Any) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await fn()


# -- the same over a real socket, with the handshake's I/O on its file descriptor ---------------


async def _socket_pair(pki: Pki, client_ctx: ssl.SSLContext, seen: list[bytes]
                       ) -> tuple[trio.SSLStream[Any], ServerTlsStream]:
    a, b = trio.socket.socketpair()
    s_raw = trio.SocketStream(b)
    server = ServerTlsStream(s_raw, _server_ctx(pki), fd=b.fileno(), on_receive=seen.append)
    return trio.SSLStream(trio.SocketStream(a), client_ctx, server_hostname="localhost"), server


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_fd_handshake_feeds_what_it_reads_and_hands_over_the_session(
        pki: Pki, version: ssl.TLSVersion) -> None:
    seen: list[bytes] = []
    client, server = await _socket_pair(pki, pki.client_ctx(pki.operator, max_version=version),
                                        seen)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)
    assert server.getpeercert(binary_form=True) == ssl.PEM_cert_to_DER_cert(
        pki.operator.cert.read_text())
    received = b"".join(seen)
    assert received[:1] == b"\x16" and len(received) > 500  # ClientHello .. the client's flight
    obj, incoming, outgoing, _ = trio_private.take_tls_state(server)
    await client.send_all(b"ping")
    incoming.write(await server.transport_stream.receive_some(65536))
    assert obj.read(100) == b"ping"
    obj.write(b"pong")
    await server.transport_stream.send_all(outgoing.read())
    assert await client.receive_some(100) == b"pong"
    await server.aclose()
    assert await client.receive_some(100) == b""


async def test_fd_handshake_refusal_leaves_the_alert_and_eof_is_client_closed(pki: Pki) -> None:
    seen: list[bytes] = []
    client, server = await _socket_pair(
        pki, pki.client_ctx(pki.rogue, max_version=ssl.TLSVersion.TLSv1_2), seen)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _ignore_broken(client.do_handshake))
        cause = await _server_error(server)
        assert handshake_failure_reason(cause)[0] == "unknown_ca"
        assert trio_private.pending_alert(server)[:1] == b"\x15"
        await server.transport_stream.aclose()
    a, b = trio.socket.socketpair()
    eof_server = ServerTlsStream(trio.SocketStream(b), _server_ctx(pki), fd=b.fileno())
    await a.send(b"\x16\x03\x01\x00\x05\x01\x00\x00")  # a ClientHello cut short
    a.close()
    cause = await _server_error(eof_server)
    assert handshake_failure_reason(cause)[0] == "client_closed"
    await eof_server.transport_stream.aclose()


async def test_fd_handshake_ends_at_its_deadline_while_waiting(pki: Pki) -> None:
    a, b = trio.socket.socketpair()
    server = ServerTlsStream(trio.SocketStream(b), _server_ctx(pki), fd=b.fileno())
    with trio.move_on_after(0.2) as scope:
        await server.do_handshake()  # nothing ever arrives
    assert scope.cancelled_caught
    a.close()
    await server.transport_stream.aclose()
