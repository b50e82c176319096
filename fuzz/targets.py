"""The fuzz targets: one function per pure parser, each checking its invariants.

A target takes the fuzzer's bytes and returns normally, or raises ``AssertionError`` (an
invariant broke) or any exception that is not one of the parser's documented error types (a
crash). Nothing here imports atheris: ``fuzz/run.py`` drives the targets under libFuzzer, and
``tests/test_fuzz_targets.py`` replays the corpus through them without it.

The invariants are the protocol facts of /work/shared/design.md ("Facts that are easy to get
wrong") and the error contracts in the parsers' docstrings:

* ``mbap``: only ``RemoteProtocolError`` with a documented framing reason; every ADU has a
  PDU of 1..253 bytes; re-encoding the frames gives back the exact bytes consumed; how the
  stream is split into reads changes nothing.
* ``request``: only ``RemoteProtocolError`` with a documented reason, CLOSE for the empty PDU
  and EXCEPTION with code 01/02/03 otherwise; an accepted request respects the spec's
  quantity and address limits, encodes back to the same bytes (up to the padding bits of
  FC15) and its ``access()`` stays within the 0..65535 address space.
* ``response``: ``check_reply`` raises only ``ReplyProblem``; an accepted reply answers its
  request (function echo or exception, the register/bit count asked for), and encodes back to
  a PDU that parses to the same response.
* ``role``: ``decode_role`` raises only ``IdentityError``; an accepted value is a minimal-DER
  UTF8String whose re-encoding is the same bytes.
* ``certificate``: ``parse_identity`` raises only ``IdentityError``.
* ``policy``: ``load_policy_text`` raises only ``PolicyError``; an accepted policy decides
  a request without raising.
* ``settings``: ``load_settings`` raises only ``SettingsError``.
* ``tls_sniff``: ``HandshakeTap`` never raises; a certificate it returns is a DER SEQUENCE
  taken from the recorded bytes, and the answer does not depend on how the bytes arrived.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from mbsec.identity import IdentityError, decode_role, encode_role, parse_identity
from mbsec.modbus import (
    Action,
    Adu,
    FrameBuffer,
    RemoteProtocolError,
    encode_adu,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
)
from mbsec.modbus.access import Access
from mbsec.modbus.messages import (
    ExceptionResponse,
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    ReadWriteMultipleRegistersRequest,
    ReadWriteMultipleRegistersResponse,
    Request,
    WriteMultipleCoilsRequest,
    WriteMultipleRegistersRequest,
)
from mbsec.path.plc import ReplyProblem, check_reply
from mbsec.policy.loader import PolicyError, load_policy_text
from mbsec.settings import SettingsError, load_settings
from mbsec.tls_sniff import HandshakeTap, presented_identity

#: the reason slugs mbsec/modbus/__init__.py documents, per raiser
FRAMING_REASONS = {"bad_protocol_id", "bad_length", "buffer_overflow"}
REQUEST_REASONS = {
    "empty_pdu", "illegal_function", "bad_pdu_length", "bad_quantity", "bad_byte_count",
    "bad_value", "bad_address", "bad_file_reference",
}
ROLE_REASONS = {"role_malformed", "role_not_utf8string", "role_empty", "role_invalid_utf8"}

_LIMITS = {
    ReadCoilsRequest: 2000, ReadDiscreteInputsRequest: 2000,
    ReadHoldingRegistersRequest: 125, ReadInputRegistersRequest: 125,
    WriteMultipleCoilsRequest: 1968, WriteMultipleRegistersRequest: 123,
}


# -- MBAP framing ---------------------------------------------------------------------------


def _frames(chunks: list[bytes]) -> tuple[list[Adu], str | None, int]:
    """Feed ``chunks`` to one FrameBuffer, pulling frames after each: the frames, the error
    reason (or None) and the bytes left buffered."""
    fb = FrameBuffer(max_pending=512)
    out: list[Adu] = []
    try:
        for chunk in chunks:
            fb.receive_data(chunk)
            while (adu := fb.next_frame()) is not None:
                out.append(adu)
    except RemoteProtocolError as exc:
        assert exc.reason in FRAMING_REASONS, exc.reason
        assert exc.action is Action.CLOSE
        return out, exc.reason, 0
    return out, None, fb.buffered


def fuzz_mbap(data: bytes) -> None:
    if not data:
        return
    # the first byte picks the read size: the same stream in chunks and in one piece
    size = data[0] % 16 + 1
    stream = data[1:]
    chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
    frames, error, left = _frames(chunks)
    consumed = b""
    for adu in frames:
        assert 1 <= len(adu.pdu) <= 253, len(adu.pdu)
        assert 0 <= adu.unit_id <= 255
        consumed += encode_adu(adu.transaction_id, adu.unit_id, adu.pdu)
    assert stream.startswith(consumed), "re-encoded frames differ from the bytes consumed"
    whole, whole_error, whole_left = _frames([stream])
    if error != "buffer_overflow" and whole_error != "buffer_overflow":
        # the overflow depends on how much arrives between pulls; nothing else may
        assert whole == frames, "frames depend on how the stream was split"
        assert whole_error == error, (whole_error, error)
        if error is None:
            assert left == whole_left == len(stream) - len(consumed)


# -- request PDUs ---------------------------------------------------------------------------


def _check_access(access: Access, pdu: bytes) -> None:
    assert access.pdu_length == len(pdu)
    for span in (access.read, access.write):
        if span is not None:
            start, qty = span
            assert start >= 0 and qty >= 0 and start + qty <= 65536, span


def fuzz_request(data: bytes) -> None:
    try:
        req = parse_request(data)
    except RemoteProtocolError as exc:
        assert exc.reason in REQUEST_REASONS, exc.reason
        if exc.reason == "empty_pdu":
            assert exc.action is Action.CLOSE
        else:
            assert exc.action is Action.EXCEPTION and exc.exception_code in (1, 2, 3), exc
        return
    assert 1 <= len(data) <= 253
    limit = _LIMITS.get(type(req))
    if limit is not None:
        count = req.count if hasattr(req, "count") else len(req.values)  # type: ignore[attr-defined]
        assert 1 <= count <= limit, (req, count)
        assert req.address + count <= 65536  # type: ignore[attr-defined]
    if isinstance(req, ReadWriteMultipleRegistersRequest):
        assert 1 <= req.read_count <= 125 and 1 <= len(req.values) <= 121
    encoded = encode_request(req)
    if isinstance(req, WriteMultipleCoilsRequest):
        # the unused high bits of the last byte are not part of the request
        assert encoded[:-1] == data[:-1] and parse_request(encoded) == req
    else:
        assert encoded == data, (encoded.hex(), data.hex())
    _check_access(req.access(), data)


# -- response PDUs, as the PLC link checks them -----------------------------------------------


def fuzz_response(data: bytes) -> None:
    """``data`` = request length (1 byte), request PDU, reply unit (1 byte), reply PDU."""
    if len(data) < 2:
        return
    n = data[0]
    try:
        req = parse_request(data[1 : 1 + n])
    except RemoteProtocolError:
        return
    rest = data[1 + n :]
    if not rest:
        return
    unit, pdu = rest[0], rest[1:]
    adu = Adu(7, unit, pdu)
    try:
        reply = check_reply(adu, 1, req, "plc")
    except ReplyProblem as exc:
        assert exc.reason in ("wrong_unit", "bad_reply"), exc.reason
        return
    assert unit == 1
    resp = reply.response
    if resp is None:  # a register read's normal reply: checked (check_response), not decoded
        assert isinstance(req, ReadHoldingRegistersRequest | ReadInputRegistersRequest)
        resp = parse_response(req, pdu)  # what the check passed must decode
    fc = req.function_code
    if isinstance(resp, ExceptionResponse):
        assert pdu[0] == fc | 0x80 and len(pdu) == 2
        return
    assert pdu[0] == fc
    _check_counts(req, resp)
    again = parse_response(req, encode_response(resp))
    assert again == resp, (again, resp)


def _check_counts(req: Request, resp: object) -> None:
    if isinstance(req, ReadCoilsRequest | ReadDiscreteInputsRequest):
        assert isinstance(resp, ReadCoilsResponse | ReadDiscreteInputsResponse)
        assert len(resp.values) == req.count
    elif isinstance(req, ReadHoldingRegistersRequest | ReadInputRegistersRequest):
        assert isinstance(resp, ReadHoldingRegistersResponse | ReadInputRegistersResponse)
        assert len(resp.values) == req.count
    elif isinstance(req, ReadWriteMultipleRegistersRequest):
        assert isinstance(resp, ReadWriteMultipleRegistersResponse)
        assert len(resp.values) == req.read_count


# -- certificates and the role extension ------------------------------------------------------


def fuzz_role(data: bytes) -> None:
    try:
        role = decode_role(data)
    except IdentityError as exc:
        assert exc.reason in ROLE_REASONS, exc.reason
        return
    assert role
    try:
        canonical = encode_role(role)
    except ValueError:
        return  # a role mbsec-pki would not issue (whitespace, control characters, > 128)
    assert canonical == data, "an accepted role extension is not minimal DER"


def fuzz_certificate(data: bytes) -> None:
    try:
        identity = parse_identity(data)
    except IdentityError:
        return
    assert len(identity.fingerprint_sha256) == 64


# -- policy and configuration files -----------------------------------------------------------

_ACCESS = parse_request(bytes.fromhex("0300640002")).access()


def fuzz_policy(data: bytes) -> None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # load_policy refuses it before the YAML parser (tested in test_policy_loader)
    try:
        policy = load_policy_text(text, "<fuzz>")
    except PolicyError:
        return
    principal = policy.principal(None, "10.0.0.1")
    policy.evaluate(principal, 1, _ACCESS)


_SETTINGS_DIR: list[Path] = []  # one temporary directory per process, made on first use


def fuzz_settings(data: bytes) -> None:
    if not _SETTINGS_DIR:
        _SETTINGS_DIR.append(Path(tempfile.mkdtemp(prefix="mbsec-fuzz-settings-")))
    path = _SETTINGS_DIR[0] / "mbsec.toml"
    path.write_bytes(data)
    try:
        load_settings(path)
    except SettingsError as exc:
        assert str(exc), "a settings error without a message"


# -- the TLS handshake tap ------------------------------------------------------------------


def fuzz_tls_sniff(data: bytes) -> None:
    if not data:
        return
    size = data[0] * 8 + 1
    stream = data[1:]
    whole = HandshakeTap()
    whole.feed(stream)
    split = HandshakeTap()
    for i in range(0, len(stream), size):
        split.feed(stream[i : i + size])
    der = whole.client_certificate()
    assert split.client_certificate() == der
    if der is not None:
        assert der[0] == 0x30 and der in stream
        presented_identity(der)  # must not raise, whatever the bytes


TARGETS: dict[str, Callable[[bytes], None]] = {
    "mbap": fuzz_mbap,
    "request": fuzz_request,
    "response": fuzz_response,
    "role": fuzz_role,
    "certificate": fuzz_certificate,
    "policy": fuzz_policy,
    "settings": fuzz_settings,
    "tls_sniff": fuzz_tls_sniff,
}
