"""MBAP framing: every split of the stream, header checks before any body, bounded buffer."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbsec.modbus import (
    MAX_ADU,
    MBAP_HEADER_LEN,
    Action,
    Adu,
    FrameBuffer,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    encode_adu,
)
from mbsec.modbus.mbap import DEFAULT_MAX_PENDING

FC03 = bytes.fromhex("03 0000 007d")
ADUS = [
    Adu(1, 1, FC03),
    Adu(0xFFFF, 0xFF, b"\x07"),
    Adu(0, 0, b"\x41" + bytes(range(252))),  # 253-byte PDU, the largest
    Adu(42, 17, b"\x2b\x0e\x01\x00"),
]
STREAM = b"".join(encode_adu(a.transaction_id, a.unit_id, a.pdu) for a in ADUS)


def drain(fb: FrameBuffer) -> list[Adu]:
    out = []
    while (adu := fb.next_frame()) is not None:
        out.append(adu)
    return out


def test_encode_adu_layout() -> None:
    assert encode_adu(0x1234, 0x11, FC03) == bytes.fromhex("1234 0000 0006 11") + FC03
    assert len(encode_adu(0, 0, bytes(253))) == MAX_ADU


def test_largest_pdu_is_260_bytes() -> None:
    assert len(encode_adu(1, 1, ADUS[2].pdu)) == MAX_ADU


@pytest.mark.parametrize(
    ("tid", "unit", "pdu"),
    [(-1, 1, b"\x03"), (65536, 1, b"\x03"), (1, 256, b"\x03"), (1, -1, b"\x03"),
     (1, 1, b""), (1, 1, bytes(254))],
)
def test_encode_adu_rejects_out_of_range(tid: int, unit: int, pdu: bytes) -> None:
    with pytest.raises(LocalProtocolError):
        encode_adu(tid, unit, pdu)


def test_one_chunk_several_adus() -> None:
    fb = FrameBuffer()
    fb.receive_data(STREAM)
    assert drain(fb) == ADUS
    assert fb.buffered == 0


def test_one_byte_feeds() -> None:
    fb = FrameBuffer()
    got: list[Adu] = []
    for i in range(len(STREAM)):
        fb.receive_data(STREAM[i : i + 1])
        got.extend(drain(fb))
        assert fb.buffered < MAX_ADU
    assert got == ADUS
    assert fb.buffered == 0


def test_split_at_every_offset() -> None:
    for cut in range(len(STREAM) + 1):
        fb = FrameBuffer()
        fb.receive_data(STREAM[:cut])
        got = drain(fb)
        fb.receive_data(STREAM[cut:])
        got.extend(drain(fb))
        assert got == ADUS, cut


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_split_at_arbitrary_offsets(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    fb = FrameBuffer()
    got: list[Adu] = []
    for a, b in itertools.pairwise(points):
        fb.receive_data(STREAM[a:b])
        got.extend(drain(fb))
    assert got == ADUS


def test_partial_header_waits() -> None:
    fb = FrameBuffer()
    fb.receive_data(STREAM[:MBAP_HEADER_LEN - 1])
    assert fb.next_frame() is None
    assert fb.buffered == MBAP_HEADER_LEN - 1


def test_accepts_bytearray_and_memoryview() -> None:
    fb = FrameBuffer()
    fb.receive_data(bytearray(STREAM[:10]))
    fb.receive_data(memoryview(STREAM[10:]))
    got = drain(fb)
    assert got == ADUS
    assert all(type(a.pdu) is bytes for a in got)


def header(tid: int, pid: int, length: int, unit: int) -> bytes:
    return struct.pack(">HHHB", tid, pid, length, unit)


@pytest.mark.parametrize("pid", [1, 0x0100, 0xFFFF])
def test_bad_protocol_id_closes_from_header_alone(pid: int) -> None:
    fb = FrameBuffer()
    fb.receive_data(header(1, pid, 6, 1))  # the 5-byte body never arrives
    with pytest.raises(RemoteProtocolError) as info:
        fb.next_frame()
    assert info.value.action is Action.CLOSE
    assert info.value.reason == "bad_protocol_id"


@pytest.mark.parametrize("length", [0, 1, 255, 256, 65535])
def test_bad_length_closes_from_header_alone(length: int) -> None:
    fb = FrameBuffer()
    fb.receive_data(header(1, 0, length, 1))
    with pytest.raises(RemoteProtocolError) as info:
        fb.next_frame()
    assert info.value.action is Action.CLOSE
    assert info.value.reason == "bad_length"


@pytest.mark.parametrize("length", [2, 254])
def test_length_bounds_accepted(length: int) -> None:
    fb = FrameBuffer()
    fb.receive_data(header(9, 0, length, 3))
    assert fb.next_frame() is None  # valid header: waits for the body
    fb.receive_data(b"\x03" * (length - 1))
    adu = fb.next_frame()
    assert adu == Adu(9, 3, b"\x03" * (length - 1))


def test_error_is_sticky() -> None:
    fb = FrameBuffer()
    fb.receive_data(header(1, 0, 0, 1) + STREAM)
    for _ in range(3):
        with pytest.raises(RemoteProtocolError, match="length"):
            fb.next_frame()


def test_bad_second_frame_after_good_first() -> None:
    fb = FrameBuffer()
    fb.receive_data(STREAM[:12] + header(1, 7, 6, 1))
    assert fb.next_frame() == ADUS[0]
    with pytest.raises(RemoteProtocolError) as info:
        fb.next_frame()
    assert info.value.reason == "bad_protocol_id"


def test_buffer_is_capped_when_frames_are_not_pulled() -> None:
    fb = FrameBuffer()
    chunk = encode_adu(1, 1, FC03)
    with pytest.raises(RemoteProtocolError) as info:
        for _ in range(DEFAULT_MAX_PENDING // len(chunk) + 2):
            fb.receive_data(chunk)
    assert info.value.reason == "buffer_overflow"
    assert info.value.action is Action.CLOSE
    assert fb.buffered <= DEFAULT_MAX_PENDING
    with pytest.raises(RemoteProtocolError):
        fb.next_frame()


def test_cap_is_configurable_but_fits_one_adu() -> None:
    with pytest.raises(ValueError):
        FrameBuffer(max_pending=MAX_ADU - 1)
    fb = FrameBuffer(max_pending=MAX_ADU)
    fb.receive_data(encode_adu(1, 1, ADUS[2].pdu))
    assert fb.next_frame() == Adu(1, 1, ADUS[2].pdu)


def test_empty_receive_is_noop() -> None:
    fb = FrameBuffer()
    fb.receive_data(b"")
    assert fb.buffered == 0
    assert fb.next_frame() is None


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_fuzz_only_protocol_errors_and_bounded(chunks: list[bytes]) -> None:
    fb = FrameBuffer()
    try:
        for c in chunks:
            fb.receive_data(c)
            while (adu := fb.next_frame()) is not None:
                assert 1 <= len(adu.pdu) <= 253
                assert 0 <= adu.unit_id <= 255
            # after pulling everything available, at most one incomplete ADU is pending
            assert fb.buffered < MAX_ADU
    except ProtocolError as exc:
        assert exc.action is Action.CLOSE
        assert exc.reason in {"bad_protocol_id", "bad_length", "buffer_overflow"}


def test_an_adu_is_an_immutable_value() -> None:
    """What the frozen dataclass gave, kept by the written-out class (compiled or not)."""
    import dataclasses

    adu = Adu(1, 2, b"\x07")
    assert adu == Adu(transaction_id=1, unit_id=2, pdu=b"\x07")
    assert hash(adu) == hash(Adu(1, 2, b"\x07")) and len({adu, Adu(1, 2, b"\x07")}) == 1
    assert adu != Adu(1, 2, b"\x08") and adu != Adu(2, 2, b"\x07") and adu != Adu(1, 3, b"\x07")
    assert adu != (1, 2, b"\x07")
    assert repr(adu) == "Adu(transaction_id=1, unit_id=2, pdu=b'\\x07')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        adu.pdu = b"\x08"
    with pytest.raises(dataclasses.FrozenInstanceError):
        del adu.unit_id
    match adu:
        case Adu(tid, unit, pdu):
            assert (tid, unit, pdu) == (1, 2, b"\x07")


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 0xFFFF), st.one_of(st.just(0), st.integers(0, 0xFFFF)),
       st.one_of(st.integers(-3, 3), st.integers(-0x10000, -4)), st.integers(0, 0xFF),
       st.binary(max_size=270))
def test_header_fields_are_read_as_the_mbap_layout_says(
        tid: int, pid: int, off: int, unit: int, body: bytes) -> None:
    """Any header: the frame buffer's verdict (frame, wait, or which error) and the frame's
    fields are what ``struct`` reads from the big-endian MBAP header, and ``incomplete``
    agrees with it (the buffer reads the header by its bytes, not by ``struct``). The length
    field is near what the body holds (``off`` -3..3: a frame, one short of one, one and a
    bit more) or anything else (``off`` below -3 stands for ``-off - 4`` itself)."""
    length = len(body) + 1 + off if off >= -3 else -off - 4
    length = max(0, min(length, 0xFFFF))
    data = struct.pack(">HHHB", tid, pid, length, unit) + body
    fb = FrameBuffer()
    fb.receive_data(data)
    if pid != 0 or not 2 <= length <= 254:
        with pytest.raises(RemoteProtocolError) as info:
            fb.next_frame()
        assert info.value.reason == ("bad_protocol_id" if pid != 0 else "bad_length")
        return
    complete = len(data) >= 6 + length
    assert fb.incomplete() is not complete
    adu = fb.next_frame()
    if not complete:
        assert adu is None
        return
    assert adu == Adu(tid, unit, data[7 : 6 + length])
    assert fb.buffered == len(data) - (6 + length)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(0, 0xFFFF), st.integers(-(2**70), 2**70)),
       st.one_of(st.integers(0, 0xFF), st.integers(-(2**40), 2**40)),
       st.binary(min_size=0, max_size=256))
def test_the_encoded_header_is_the_mbap_layout(tid: int, unit: int, pdu: bytes) -> None:
    """Any fields: ``encode_adu`` writes what ``struct`` packs as the big-endian MBAP header
    (transaction id, protocol id 0, length of unit id and PDU, unit id), or refuses exactly
    what ``struct`` cannot pack and the PDU lengths Modbus does not allow (the encoder builds
    the header with ``int.to_bytes``, not ``struct``)."""
    try:
        expected = struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu
    except struct.error:
        expected = None
    if expected is None or not 1 <= len(pdu) <= 253:
        with pytest.raises(LocalProtocolError) as info:
            encode_adu(tid, unit, pdu)
        assert info.value.reason == ("bad_pdu_length" if not 1 <= len(pdu) <= 253
                                     else "bad_header_field")
        return
    assert encode_adu(tid, unit, pdu) == expected
