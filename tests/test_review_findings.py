"""Security review findings: each test proved one bug (it failed before the fix it names).
They stay as regression tests: each fails again if its fix is undone.

Real sockets on 127.0.0.1 (the proxy from conftest's ``start_proxy``) or sans-IO calls.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
from conftest import TEST_POLICY, Pki, ScriptedPlc, StartProxy, TlsClient, read_hr

from mbsec.modbus.errors import RemoteProtocolError
from mbsec.modbus.mbap import FrameBuffer
from mbsec.modbus.pdu import DiagnosticsRequest, parse_response
from mbsec.pki.ca import CertificateAuthority


async def _scripted(nursery: trio.Nursery, **kw: object) -> ScriptedPlc:
    plc = ScriptedPlc(**kw)  # type: ignore[arg-type]
    await nursery.start(plc.serve)
    return plc


# -- 1. reload: roles granted by the OLD policy's identities: mapping survive the reload ---------

POLICY_WITH_IDENTITY_GRANT = TEST_POLICY.replace(
    "targets:\n",
    'identities:\n  - match: {subject_cn: "norole-1"}\n    roles: [operator]\n\ntargets:\n',
    1,
)


async def test_reload_withdrawing_an_identity_role_applies_to_open_connections(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await _scripted(nursery)
    h = await start_proxy(plc.port, policy=POLICY_WITH_IDENTITY_GRANT)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.norole))
    # the certificate has no role extension; the policy's identities: entry makes it operator
    r = await c.request(1, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([3, 2, 0, 0])
    # the admin withdraws the grant (the plain test policy has no identities: section)
    h.policy_path.write_text(TEST_POLICY, encoding="utf-8")
    assert h.proxy.reload() is True
    # a NEW connection is denied, as it should be ...
    fresh = await TlsClient.connect(h.port, pki.client_ctx(pki.norole))
    r = await fresh.request(2, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x01])
    # ... and docs/config.md (SIGHUP): "the next request on every connection uses the new
    # policy" -- but the open connection still reads with the withdrawn role
    r = await c.request(3, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x01]), r


# -- 2. a handshake in progress during a CRL reload is checked against the OLD CRL --------------


def _ctx_for(pki: Pki, cert: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.trust_bundle))
    ctx.load_cert_chain(str(cert.chain), str(cert.key))  # type: ignore[attr-defined]
    return ctx


async def test_revoked_client_mid_handshake_during_reload_is_rejected(
    pki: Pki, fresh_ca: CertificateAuthority, start_proxy: StartProxy,
    nursery: trio.Nursery, tmp_path: Path,
) -> None:
    plc = await _scripted(nursery)
    cert = fresh_ca.issue("client", "soon-revoked", role="operator", out_dir=tmp_path,
                          name="sr")
    crl = fresh_ca.write_crl(tmp_path / "crl.pem")
    h = await start_proxy(plc.port, tls={"client_ca": str(fresh_ca.trust_bundle)}, crl=[crl])
    # the attacker opens TCP; the proxy starts the TLS handshake (and takes its state) now
    tcp = await trio.open_tcp_stream("127.0.0.1", h.port)
    await trio.sleep(0.2)
    # meanwhile the admin revokes the certificate and reloads
    fresh_ca.revoke(cert.serial)
    fresh_ca.write_crl(tmp_path / "crl.pem")
    assert h.proxy.reload() is True
    assert h.proxy.state.tls.is_revoked(  # the running state does know it is revoked
        fresh_ca.issuer_cert.subject.rfc4514_string(), cert.serial)
    # then the attacker finishes the handshake (well within tls.handshake_timeout)
    stream = trio.SSLStream(tcp, _ctx_for(pki, cert), server_hostname="localhost")
    c = TlsClient(stream)
    accepted = True
    try:
        with trio.fail_after(5):
            await stream.do_handshake()
            r = await c.request(1, 1, read_hr(0, 1))
        accepted = r is not None and r[2][0] == 3
    except trio.BrokenResourceError:
        accepted = False
    assert not accepted, "a certificate on the loaded CRL was served"


# -- 3. FC08 response: a non-echo sub-function reply of any length is accepted -----------------


def test_fc08_counter_reply_with_wrong_data_length_is_rejected() -> None:
    req = DiagnosticsRequest(0x000B, b"\x00\x00")  # return bus message count
    bad = bytes([0x08, 0x00, 0x0B]) + bytes(40)  # 40 data bytes instead of 2
    with pytest.raises(RemoteProtocolError):
        parse_response(req, bad)


# -- 4. reload resets every client's rate-limit budget and in-flight count ---------------------

RATE_LIMITED_POLICY = TEST_POLICY + (
    "limits:\n  default: {requests_per_second: 0.001, burst: 1}\n"
)


async def test_reload_keeps_a_clients_spent_rate_budget(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = await _scripted(nursery)
    h = await start_proxy(plc.port, policy=RATE_LIMITED_POLICY)
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    r = await c.request(1, 1, read_hr(0, 1))
    assert r is not None and r[2][0] == 3  # the one token of the burst
    r = await c.request(2, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x06])  # budget spent: busy
    assert h.proxy.reload() is True  # the same files: nothing about limits changed
    r = await c.request(3, 1, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x06]), r


# -- 5. a root CRL that revokes the issuing intermediate is loaded but never applied -------------


async def test_root_crl_revoking_the_intermediate_rejects_its_clients(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery, tmp_path: Path
) -> None:
    import datetime as dt

    plc = await _scripted(nursery)
    ca = CertificateAuthority.init(tmp_path / "ica", common_name="Plant CA", intermediate=True)
    assert ca.intermediate is not None
    leaf = ca.issue("client", "via-intermediate", role="operator", out_dir=tmp_path,
                    name="vi")
    crl = ca.write_crl(tmp_path / "crl.pem")  # intermediate's CRL (empty) + root's (empty)
    now = dt.datetime.now(dt.UTC)
    revoked_at = (now - dt.timedelta(minutes=5)).isoformat()
    root_crl = CertificateAuthority._crl(  # the root revokes the (compromised) intermediate
        ca.root, ca._root_key(),
        [{"serial": format(ca.intermediate.serial_number, "x"), "revoked_at": revoked_at,
          "revocation_reason": "ca_compromise"}],
        99, now, 7,
    )
    from cryptography.hazmat.primitives import serialization

    pems = crl.read_bytes().split(b"-----END X509 CRL-----")
    leaf_crl = pems[0] + b"-----END X509 CRL-----\n"  # keep the intermediate's own CRL
    (tmp_path / "both.pem").write_bytes(
        leaf_crl + root_crl.public_bytes(serialization.Encoding.PEM))
    h = await start_proxy(plc.port, tls={"client_ca": str(ca.trust_bundle)},
                          crl=[tmp_path / "both.pem"])
    served = True
    try:
        c = await TlsClient.connect(h.port, _ctx_for(pki, leaf))
        r = await c.request(1, 1, read_hr(0, 1))
        served = r is not None and r[2][0] == 3
    except trio.BrokenResourceError:
        served = False
    assert not served, "a client of a revoked intermediate CA was served"


# -- 6. a request cancelled mid-send hands the send right over before the stream is reset -----


class _HalfWriteStream(trio.abc.Stream):
    """A PLC connection whose first send_all puts ``PARTIAL`` bytes on the wire and then
    blocks (the PLC stopped reading); later sends go through. ``wire`` is what the PLC
    would receive."""

    PARTIAL = 13  # MBAP header + FC16 address, quantity, byte count: the values are missing

    def __init__(self) -> None:
        self.wire = bytearray()
        self._first = True
        self._closed = trio.Event()
        self.stuck = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed.is_set():
            raise trio.ClosedResourceError
        if self._first:
            self._first = False
            self.wire += bytes(data)[: self.PARTIAL]
            self.stuck.set()
            await trio.sleep_forever()
        self.wire += bytes(data)
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._closed.wait()
        raise trio.ClosedResourceError

    async def aclose(self) -> None:
        self._closed.set()
        await trio.lowlevel.checkpoint()


async def test_request_cancelled_mid_send_never_lets_another_adu_follow_it(
    nursery: trio.Nursery,
) -> None:
    from mbsec.modbus.mbap import encode_adu
    from mbsec.modbus.pdu import parse_request
    from mbsec.upstream import UpstreamError, Upstreams, UpstreamTarget

    stream = _HalfWriteStream()

    async def dialer(host: str, port: int) -> trio.abc.Stream:
        return stream

    ups = Upstreams(
        [UpstreamTarget(name="plc", host="plc", port=502, unit_ids=frozenset({1}), depth=2,
                        request_timeout=5.0)],
        dialer=dialer,
    )
    await nursery.start(ups.run)
    pdu_x = bytes.fromhex("10000000020400010002")  # FC16: registers 0-1 := 1, 2
    pdu_y = bytes.fromhex("0600640539")  # FC06: register 100 := 1337
    results: dict[str, object] = {}

    async def call(name: str, pdu: bytes, scope: trio.CancelScope) -> None:
        with scope:
            try:
                results[name] = await ups.exchange(1, parse_request(pdu), pdu)
            except UpstreamError as exc:
                results[name] = exc

    x_scope, y_scope = trio.CancelScope(), trio.CancelScope()
    nursery.start_soon(call, "x", pdu_x, x_scope)
    with trio.fail_after(5):
        await stream.stuck.wait()
    nursery.start_soon(call, "y", pdu_y, y_scope)
    await trio.sleep(0.05)  # y has a slot and waits for the send right
    x_scope.cancel()  # e.g. x's client disconnected or broke its framing
    await trio.sleep(0.2)
    y_scope.cancel()
    wire = bytes(stream.wire)
    assert wire[: stream.PARTIAL] == encode_adu(1, 1, pdu_x)[: stream.PARTIAL]
    spliced = FrameBuffer()
    spliced.receive_data(wire)
    first = spliced.next_frame() if len(wire) >= 17 else None
    # after a partial ADU nothing more may ever be written to that stream; with the bug the
    # PLC reads one valid FC16 frame "write registers 0-1" whose values are the first bytes
    # of the next client's FC06 request (neither client asked for them)
    assert len(wire) == stream.PARTIAL, (
        f"PLC receives a spliced frame: {wire.hex()} -> {first!r}")


# -- 7. FC43/14 response: "one specific object" answered with another object ------------------


def test_fc43_individual_object_reply_must_carry_the_requested_object() -> None:
    from mbsec.modbus.pdu import ReadDeviceIdentificationRequest

    req = ReadDeviceIdentificationRequest(4, 0x05)  # object 5 only (ModelName)
    # read code 4, conformity 0x81, more follows 0xFF, next id 0x06, 2 objects: 0x00 and 0x01
    bad = bytes([43, 14, 4, 0x81, 0xFF, 0x06, 2, 0x00, 3]) + b"ACM" + bytes([0x01, 2]) + b"X1"
    with pytest.raises(RemoteProtocolError):
        parse_response(req, bad)


# -- 8. unit_rewrite can alias a client-visible unit onto a unit the policy denies ------------

ALIAS_POLICY = """\
version: 1
default: deny
targets:
  line1: {unit_ids: [1]}
  safety-plc: {unit_ids: [2]}
rules:
  - id: operator-read-line1
    description: Operators read line 1 only; the safety PLC (unit 2) is off limits
    roles: [operator]
    targets: [line1]
    functions: [read_holding_registers]
    addresses: ["0-199"]
"""


async def test_unit_rewrite_cannot_alias_a_unit_the_policy_denies(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    from mbsec.server import StartupError
    from mbsec.settings import SettingsError

    plc = await _scripted(nursery)
    try:
        h = await start_proxy(plc.port, policy=ALIAS_POLICY, unit_ids=[1, 2],
                              upstream={"unit_rewrite": {1: 2}})
    except (SettingsError, StartupError, ValueError):
        return  # the configuration is refused: fixed
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    r = await c.request(1, 2, read_hr(0, 1))
    assert r is not None and r[2] == bytes([0x83, 0x01])  # unit 2 is denied ...
    r = await c.request(2, 1, read_hr(0, 1))
    assert r is not None
    # ... but the PLC's unit 2 is read anyway, through unit 1
    assert all(unit != 2 for _tid, unit, _pdu in plc.requests), plc.requests


# -- 9. a reply queued behind the READER's flush has no stall limit --------------------------


class _KeyUpdateSSLObject:
    """Stands in for the session's SSLObject: every incoming record is a TLS 1.3 KeyUpdate
    with update_requested, so reading it queues the proxy's own KeyUpdate for sending."""

    def __init__(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self._in = incoming
        self._out = outgoing

    def read(self, n: int) -> bytes:
        if not self._in.read():
            raise ssl.SSLWantReadError
        self._out.write(b"\x17" * 22)  # our KeyUpdate record
        raise ssl.SSLWantReadError  # no application data

    def write(self, data: bytes) -> int:
        self._out.write(b"\x17" + data)
        return len(data)

    def pending(self) -> int:
        return 0


class _NotReadingClient(trio.abc.Stream):
    """The client's TCP socket: sends one record, never reads (its window stays full)."""

    def __init__(self) -> None:
        self._sent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep_forever()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_forever()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._sent:
            self._sent = True
            return b"\x17\x03\x03\x00\x16" + bytes(22)
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _FakeSSLStream:
    def __init__(self) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl_object = _KeyUpdateSSLObject(self._incoming, self._outgoing)
        self.transport_stream = _NotReadingClient()
        self._delayed_outgoing = None


async def test_reply_behind_a_stuck_key_update_flush_is_bounded_by_the_stall_limit(
    nursery: trio.Nursery,
) -> None:
    from mbsec.session import _RecordIO

    io = _RecordIO(_FakeSSLStream(), stall_limit=0.2)  # type: ignore[arg-type]
    reader_broke = trio.Event()

    async def reader() -> None:  # reads the KeyUpdate, flushes ours, gives up at the limit
        with pytest.raises(trio.BrokenResourceError):
            await io.receive(65536)
        reader_broke.set()

    nursery.start_soon(reader)
    await trio.sleep(0.05)
    outcome: object = "no answer"
    with trio.move_on_after(2.0):
        try:
            outcome = await io.send(b"reply")  # False = stalled, as documented
        except trio.BrokenResourceError as exc:
            outcome = exc
    assert outcome is False or isinstance(outcome, trio.BrokenResourceError), outcome
    with trio.fail_after(2.0):
        await reader_broke.wait()  # the reader stops too: the connection closes


# -- 10. a reload that fails with an OSError takes the whole proxy down ------------------------


async def test_reload_that_cannot_write_the_crl_bundle_keeps_the_running_state(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tempfile

    plc = await _scripted(nursery)
    h = await start_proxy(plc.port)
    old = h.proxy.state

    def full_tmp(*args: object, **kwargs: object) -> object:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", full_tmp)
    try:
        ok = h.proxy.reload()
    except OSError as exc:
        pytest.fail(f"reload raised {exc!r}: the SIGHUP watcher (and the proxy) would die")
    assert ok is False
    assert h.proxy.state is old
