"""The gate for trio upgrades (issue 9, item 6): mbsec.trio_private against the installed trio.

Real handshakes with the test PKI over a trio memory stream pair. Nothing here skips: a trio
release that renames, retypes or rewires the SSLStream internals, or starts sending the fatal
alert itself, fails these tests, and pyproject.toml's upper bound on trio is raised only once
they pass on the new release.
"""

from __future__ import annotations

import ssl
from typing import Any

import pytest
import trio
import trio.testing
from conftest import Pki

from mbsec import session, trio_private


def _server_ctx(pki: Pki, *, require_client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(pki.server.chain), str(pki.server.key))
    ctx.load_verify_locations(cafile=str(pki.ca.trust_bundle))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def _pair(
    pki: Pki, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext,
) -> tuple[trio.SSLStream[Any], trio.SSLStream[Any]]:
    c_raw, s_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(c_raw, client_ctx, server_hostname="localhost")
    server = trio.SSLStream(s_raw, server_ctx, server_side=True)
    return client, server


async def _handshake(client: trio.SSLStream[Any], server: trio.SSLStream[Any]) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        nursery.start_soon(server.do_handshake)


def test_check_trio_internals_passes() -> None:
    trio_private.check_trio_internals()


def test_check_trio_internals_names_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate a trio that renamed an attribute: the error must say which and which trio.
    real_init = trio.SSLStream.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self._outgoing_bio = self.__dict__.pop("_outgoing")

    monkeypatch.setattr(trio.SSLStream, "__init__", init)
    with pytest.raises(trio_private.TrioInternalsChanged) as info:
        trio_private.check_trio_internals()
    assert f"trio {trio.__version__}" in str(info.value)
    assert "_outgoing" in str(info.value)


def test_fresh_stream_attribute_types(pki: Pki) -> None:
    c_raw, _ = trio.testing.memory_stream_pair()
    stream = trio.SSLStream(c_raw, pki.client_ctx(pki.operator), server_hostname="localhost")
    assert type(stream._ssl_object) is ssl.SSLObject
    assert type(stream._incoming) is ssl.MemoryBIO
    assert type(stream._outgoing) is ssl.MemoryBIO
    assert stream._delayed_outgoing is None


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_take_tls_state_drives_the_connection(pki: Pki, version: ssl.TLSVersion) -> None:
    client, server = _pair(pki, pki.client_ctx(pki.operator, max_version=version),
                           _server_ctx(pki))
    await _handshake(client, server)

    obj, incoming, outgoing, delayed = trio_private.take_tls_state(server)
    assert obj is server._ssl_object
    assert obj.server_side
    assert obj.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                             ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    peer = obj.getpeercert()
    assert peer and dict(x[0] for x in peer["subject"])["commonName"] == "op-1"
    assert isinstance(incoming, ssl.MemoryBIO) and isinstance(outgoing, ssl.MemoryBIO)
    assert isinstance(delayed, bytes)
    if version == ssl.TLSVersion.TLSv1_3:
        # trio holds the session tickets back; they are ours now and must go first.
        assert delayed, "trio no longer delays the TLS 1.3 session tickets"
    assert server._delayed_outgoing is None  # taken, so trio cannot send them twice

    # Server -> client: encrypt on the taken SSLObject, write raw to the transport.
    obj.write(b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01")
    await server.transport_stream.send_all(delayed + outgoing.read())
    assert await client.receive_some(100) == b"\x00\x01\x00\x00\x00\x06\x01\x03\x00\x00\x00\x01"

    # Client -> server: feed the raw ciphertext into the taken incoming BIO, read plaintext.
    await client.send_all(b"reply-please")
    got = b""
    while len(got) < len(b"reply-please"):
        try:
            got += obj.read(100)
        except ssl.SSLWantReadError:
            incoming.write(await server.transport_stream.receive_some(65536))
    assert got == b"reply-please"
    # Whatever the read side produced (none expected here) would be in the same outgoing BIO.
    assert outgoing.pending == 0

    # The session.py entry point is the same function.
    client2, server2 = _pair(pki, pki.client_ctx(pki.operator, max_version=version),
                             _server_ctx(pki))
    await _handshake(client2, server2)
    assert session.take_tls_state(server2)[0] is server2._ssl_object


async def test_pending_alert_after_failed_handshake(pki: Pki) -> None:
    # A client without a certificate against a server that requires one (TLS 1.3: the
    # server fails after the client's Finished, with a certificate_required alert).
    client, server = _pair(pki, pki.client_ctx(None), _server_ctx(pki))
    server_error: list[BaseException] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError as e:
            server_error.append(e)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.do_handshake()  # TLS 1.3: the client finishes before the server checks
    assert server_error, "the server accepted a client without a certificate"
    assert isinstance(server_error[0].__cause__, ssl.SSLError)

    alert = trio_private.pending_alert(server)
    # trio raised before sending what OpenSSL wrote: the alert is still in the BIO. If this
    # fails because it is empty, trio now sends it itself; _flush_alert can go.
    assert alert, "trio no longer leaves the fatal alert in _outgoing"
    assert trio_private.pending_alert(server) == b""  # read once

    # Deliver it: the client must learn the reason, not see a bare close.
    await server.transport_stream.send_all(alert)
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.receive_some(100)
    assert isinstance(info.value.__cause__, ssl.SSLError)
    assert "CERTIFICATE_REQUIRED" in str(info.value.__cause__).upper()


async def test_pending_alert_tls12_unknown_ca(pki: Pki) -> None:
    # TLS 1.2, a client certificate from a CA the server does not trust: unknown_ca.
    client, server = _pair(pki, pki.client_ctx(pki.rogue, max_version=ssl.TLSVersion.TLSv1_2),
                           _server_ctx(pki))
    errors: dict[str, BaseException] = {}

    async def run(name: str, s: trio.SSLStream[Any]) -> None:
        try:
            await s.do_handshake()
        except trio.BrokenResourceError as e:
            errors[name] = e
            if name == "server":
                await s.transport_stream.send_all(trio_private.pending_alert(s))
                await s.transport_stream.aclose()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "client", client)
            nursery.start_soon(run, "server", server)
    assert "server" in errors
    assert "UNKNOWN_CA" in str(errors["client"].__cause__).upper()


def test_pending_alert_without_the_attribute_is_empty() -> None:
    class NotAStream:
        pass

    assert trio_private.pending_alert(NotAStream()) == b""  # type: ignore[arg-type]
