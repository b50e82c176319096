"""PDU parsing: the spec's limits, its validation order, response matching, Access."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from mbsec.modbus import (
    FUNCTION_NAMES,
    MEI_NAMES,
    WRITE_FUNCTIONS,
    Access,
    Action,
    DiagnosticsRequest,
    DiagnosticsResponse,
    ExceptionCode,
    ExceptionResponse,
    FileRecord,
    FileSubRequest,
    FunctionCode,
    GetCommEventCounterRequest,
    GetCommEventLogRequest,
    LocalProtocolError,
    MaskWriteRegisterRequest,
    MeiRequest,
    MeiResponse,
    OpaqueRequest,
    OpaqueResponse,
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDeviceIdentificationRequest,
    ReadDeviceIdentificationResponse,
    ReadDiscreteInputsRequest,
    ReadExceptionStatusRequest,
    ReadFifoQueueRequest,
    ReadFifoQueueResponse,
    ReadFileRecordRequest,
    ReadFileRecordResponse,
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadWriteMultipleRegistersRequest,
    RemoteProtocolError,
    ReportServerIdRequest,
    Request,
    Table,
    WriteFileRecordRequest,
    WriteMultipleCoilsRequest,
    WriteMultipleRegistersRequest,
    WriteSingleCoilRequest,
    WriteSingleRegisterRequest,
    encode_request,
    encode_response,
    exception_pdu,
    parse_request,
    parse_response,
)


def pdu(fc: int, fmt: str = "", *fields: int, tail: bytes = b"") -> bytes:
    return bytes([fc]) + struct.pack(">" + fmt, *fields) + tail


def fc15(addr: int, qty: int, nbytes: int | None = None, data: int | None = None) -> bytes:
    n = (qty + 7) // 8 if nbytes is None else nbytes
    return pdu(15, "HHB", addr, qty, n, tail=bytes(n if data is None else data))


def fc16(addr: int, qty: int, nbytes: int | None = None, data: int | None = None) -> bytes:
    n = 2 * qty if nbytes is None else nbytes
    return pdu(16, "HHB", addr, qty, n, tail=bytes(n if data is None else data))


def fc23(raddr: int, rq: int, waddr: int, wq: int, nbytes: int | None = None) -> bytes:
    n = 2 * wq if nbytes is None else nbytes
    return pdu(23, "HHHHB", raddr, rq, waddr, wq, n, tail=bytes(2 * wq))


def fc20(*subs: tuple[int, int, int, int], nbytes: int | None = None) -> bytes:
    body = b"".join(struct.pack(">BHHH", *s) for s in subs)
    return bytes([20, len(body) if nbytes is None else nbytes]) + body


def fc21(*subs: tuple[int, int, int, int]) -> bytes:
    body = b"".join(struct.pack(">BHHH", *s) + bytes(2 * s[3]) for s in subs)
    return bytes([21, len(body)]) + body


OK = 0
# (id, pdu, expected exception code or OK): every limit at 0, 1, max, max+1 and the
# address boundary addr + qty = 65536 (ok) / 65537 (02).
BOUNDARIES: list[tuple[str, bytes, int]] = []
for _fc, _max in ((1, 2000), (2, 2000), (3, 125), (4, 125)):
    BOUNDARIES += [
        (f"fc{_fc}-qty0", pdu(_fc, "HH", 0, 0), 3),
        (f"fc{_fc}-qty1", pdu(_fc, "HH", 0, 1), OK),
        (f"fc{_fc}-qtymax", pdu(_fc, "HH", 0, _max), OK),
        (f"fc{_fc}-qtymax+1", pdu(_fc, "HH", 0, _max + 1), 3),
        (f"fc{_fc}-qty65535", pdu(_fc, "HH", 0, 65535), 3),
        (f"fc{_fc}-end65536", pdu(_fc, "HH", 65536 - _max, _max), OK),
        (f"fc{_fc}-end65537", pdu(_fc, "HH", 65537 - _max, _max), 2),
        (f"fc{_fc}-last", pdu(_fc, "HH", 65535, 1), OK),
        (f"fc{_fc}-last2", pdu(_fc, "HH", 65535, 2), 2),
        (f"fc{_fc}-short", pdu(_fc, "HB", 0, 1), 3),
        (f"fc{_fc}-trailing", pdu(_fc, "HHB", 0, 1, 0), 3),
    ]
BOUNDARIES += [
    ("fc5-off", pdu(5, "HH", 65535, 0), OK),
    ("fc5-on", pdu(5, "HH", 0, 0xFF00), OK),
    ("fc5-1", pdu(5, "HH", 0, 1), 3),
    ("fc5-00ff", pdu(5, "HH", 0, 0x00FF), 3),
    ("fc5-ffff", pdu(5, "HH", 0, 0xFFFF), 3),
    ("fc5-trailing", pdu(5, "HHB", 0, 0, 0), 3),
    ("fc6-max", pdu(6, "HH", 65535, 65535), OK),
    ("fc6-short", pdu(6, "H", 1), 3),
    ("fc7", pdu(7), OK),
    ("fc7-trailing", pdu(7, "B", 0), 3),
    ("fc11-trailing", pdu(11, "B", 0), 3),
    ("fc12-trailing", pdu(12, "B", 0), 3),
    ("fc17-trailing", pdu(17, "B", 0), 3),
    ("fc8-sub0-empty", pdu(8, "H", 0), OK),
    ("fc8-sub0-250", pdu(8, "H", 0, tail=bytes(250)), OK),
    ("fc8-sub1", pdu(8, "HH", 1, 0xFF00), OK),
    ("fc8-sub10-short", pdu(8, "HB", 10, 0), 3),
    ("fc8-sub10-long", pdu(8, "HHB", 10, 0, 0), 3),
    ("fc8-sub10-none", pdu(8, "H", 10), 3),
    ("fc8-short", pdu(8, "B", 0), 3),
    ("fc15-qty0", fc15(0, 0), 3),
    ("fc15-qty1", fc15(0, 1), OK),
    ("fc15-qty1968", fc15(0, 1968), OK),
    ("fc15-qty1969", fc15(0, 1969), 3),
    ("fc15-bytecount-low", fc15(0, 9, nbytes=1, data=1), 3),
    ("fc15-bytecount-high", fc15(0, 8, nbytes=2, data=2), 3),
    ("fc15-data-short", fc15(0, 16, data=1), 3),
    ("fc15-data-long", fc15(0, 16, data=3), 3),
    ("fc15-end65536", fc15(65536 - 1968, 1968), OK),
    ("fc15-end65537", fc15(65537 - 1968, 1968), 2),
    ("fc15-header-short", pdu(15, "HH", 0, 1), 3),
    ("fc16-qty0", fc16(0, 0), 3),
    ("fc16-qty1", fc16(0, 1), OK),
    ("fc16-qty123", fc16(0, 123), OK),
    ("fc16-qty124", fc16(0, 124, nbytes=248, data=0), 3),
    ("fc16-bytecount", fc16(0, 2, nbytes=3, data=3), 3),
    ("fc16-data-short", fc16(0, 2, data=3), 3),
    ("fc16-end65536", fc16(65536 - 123, 123), OK),
    ("fc16-end65537", fc16(65537 - 123, 123), 2),
    ("fc20-7", fc20((6, 1, 0, 1)), OK),
    ("fc20-bytecount-6", fc20((6, 1, 0, 1), nbytes=6), 3),
    ("fc20-bytecount-0xf5", fc20(*[(6, 1, 0, 1)] * 35), OK),
    ("fc20-bytecount-0xfc", fc20(*[(6, 1, 0, 1)] * 36), 3),
    ("fc20-bytecount-not-7n", fc20((6, 1, 0, 1)) + b"\x00", 3),
    ("fc20-empty", bytes([20, 0]), 3),
    ("fc20-reftype5", fc20((5, 1, 0, 1)), 2),
    ("fc20-file0", fc20((6, 0, 0, 1)), 2),
    ("fc20-record9999", fc20((6, 1, 9999, 1)), OK),
    ("fc20-record9999-len2", fc20((6, 1, 9999, 2)), 2),
    ("fc20-record10000", fc20((6, 1, 10000, 0)), 2),
    ("fc21-one", fc21((6, 1, 0, 1)), OK),
    ("fc21-bytecount-7", fc21((6, 1, 0, 0)), 3),
    ("fc21-bytecount-0xfb", fc21((6, 1, 0, 122)), OK),
    ("fc21-reftype0", fc21((0, 1, 0, 1)), 2),
    ("fc21-data-beyond", bytes([21, 9]) + struct.pack(">BHHH", 6, 1, 0, 2) + bytes(2), 3),
    ("fc21-sub-truncated", bytes([21, 9]) + bytes([6, 0, 1, 0, 0, 0, 0, 0, 0]), 3),
    ("fc22", pdu(22, "HHH", 65535, 0xF2F2, 0x2525), OK),
    ("fc22-short", pdu(22, "HH", 1, 2), 3),
    ("fc23-ok", fc23(0, 1, 0, 1), OK),
    ("fc23-rq0", fc23(0, 0, 0, 1), 3),
    ("fc23-rq125", fc23(0, 125, 0, 1), OK),
    ("fc23-rq126", fc23(0, 126, 0, 1), 3),
    ("fc23-wq0", fc23(0, 1, 0, 0), 3),
    ("fc23-wq121", fc23(0, 1, 0, 121), OK),
    ("fc23-wq122", fc23(0, 1, 0, 122), 3),
    ("fc23-bytecount", fc23(0, 1, 0, 2, nbytes=3), 3),
    ("fc23-read-end65536", fc23(65536 - 125, 125, 0, 1), OK),
    ("fc23-read-end65537", fc23(65537 - 125, 125, 0, 1), 2),
    ("fc23-write-end65536", fc23(0, 1, 65536 - 121, 121), OK),
    ("fc23-write-end65537", fc23(0, 1, 65537 - 121, 121), 2),
    ("fc24", pdu(24, "H", 65535), OK),
    ("fc24-trailing", pdu(24, "HB", 0, 0), 3),
    ("fc43-14-code0", pdu(43, "BBB", 14, 0, 0), 3),
    ("fc43-14-code1", pdu(43, "BBB", 14, 1, 0), OK),
    ("fc43-14-code4", pdu(43, "BBB", 14, 4, 0xFF), OK),
    ("fc43-14-code5", pdu(43, "BBB", 14, 5, 0), 3),
    ("fc43-14-short", pdu(43, "BB", 14, 1), 3),
    ("fc43-no-mei", pdu(43), 3),
    ("fc43-13", pdu(43, "BB", 13, 1, tail=b"abc"), OK),
    ("pdu-253", pdu(0x41, tail=bytes(252)), OK),
    ("pdu-254", pdu(0x41, tail=bytes(253)), 3),
    ("fc-0x80", pdu(0x80), 1),
    ("fc-0x83", pdu(0x83, "HH", 0, 1), 1),
    ("fc-0xff", pdu(0xFF), 1),
]


@pytest.mark.parametrize(("raw", "expected"), [(b[1], b[2]) for b in BOUNDARIES],
                         ids=[b[0] for b in BOUNDARIES])
def test_boundary(raw: bytes, expected: int) -> None:
    if expected == OK:
        req = parse_request(raw)
        assert encode_request(req) == raw  # valid requests re-encode byte for byte
        assert req.access().pdu_length == len(raw)
        return
    with pytest.raises(RemoteProtocolError) as info:
        parse_request(raw)
    assert info.value.action is Action.EXCEPTION
    assert info.value.exception_code == expected


def reason(raw: bytes) -> tuple[int | None, str]:
    with pytest.raises(RemoteProtocolError) as info:
        parse_request(raw)
    return info.value.exception_code, info.value.reason


def test_validation_order_quantity_before_address() -> None:
    # a bad quantity at a bad address is 03, not 02 (spec state diagrams)
    assert reason(pdu(3, "HH", 65535, 0)) == (3, "bad_quantity")
    assert reason(pdu(3, "HH", 65535, 126)) == (3, "bad_quantity")
    assert reason(pdu(1, "HH", 65000, 2001)) == (3, "bad_quantity")


def test_validation_order_byte_count_before_address() -> None:
    assert reason(fc16(65535, 2, nbytes=3, data=3)) == (3, "bad_byte_count")
    assert reason(fc15(65535, 9, nbytes=1, data=1)) == (3, "bad_byte_count")
    assert reason(fc16(65535, 200, nbytes=3, data=3)) == (3, "bad_quantity")


def test_validation_order_address_before_value() -> None:
    # FC05 has no address overflow; FC23 write address is checked after all quantities
    assert reason(pdu(23, "HHHHB", 65535, 2, 0, 122, 2, tail=bytes(2))) == (3, "bad_quantity")
    assert reason(fc23(65535, 2, 0, 1)) == (2, "bad_address")


def test_empty_pdu_closes() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_request(b"")
    assert info.value.action is Action.CLOSE


@pytest.mark.parametrize("fc", [0, 9, 10, 13, 14, 18, 19, 25, 40, 42, 65, 100, 0x7F])
def test_unknown_function_codes_are_opaque(fc: int) -> None:
    req = parse_request(bytes([fc, 1, 2, 3]))
    assert req == OpaqueRequest(fc, b"\x01\x02\x03")
    assert req.access() == Access(fc, Table.NONE, None, None, (), None, 4)
    assert encode_request(req) == bytes([fc, 1, 2, 3])


# Every valid typed request (fixed layout): each strict prefix and each one-byte extension is
# rejected with an exception, never with IndexError/struct.error.
STRICT = [raw for name, raw, exp in BOUNDARIES
          if exp == OK and not name.startswith(("fc8-sub0", "fc43-13", "pdu-"))]


@pytest.mark.parametrize("raw", STRICT, ids=lambda r: r[:8].hex())
def test_every_truncation_and_extension_rejected(raw: bytes) -> None:
    for cut in range(1, len(raw)):
        with pytest.raises(RemoteProtocolError) as info:
            parse_request(raw[:cut])
        assert info.value.exception_code == 3, cut
    if len(raw) < 253:
        with pytest.raises(RemoteProtocolError) as info:
            parse_request(raw + b"\x00")
        assert info.value.exception_code == 3


def test_variable_fc8_and_mei_prefixes_stay_valid() -> None:
    raw = pdu(8, "H", 0, tail=b"hello")
    for cut in range(3, len(raw) + 1):
        assert parse_request(raw[:cut]) == DiagnosticsRequest(0, raw[3:cut])
    assert parse_request(bytes([43, 13])) == MeiRequest(13, b"")


# ---------------------------------------------------------------------------- typed values


def test_typed_fields() -> None:
    assert parse_request(pdu(5, "HH", 7, 0xFF00)) == WriteSingleCoilRequest(7, True)
    assert parse_request(pdu(5, "HH", 7, 0)) == WriteSingleCoilRequest(7, False)
    coils = parse_request(bytes.fromhex("0f 0013 000a 02 cd01"))  # spec example
    assert coils == WriteMultipleCoilsRequest(
        19, (True, False, True, True, False, False, True, True, True, False)
    )
    regs = parse_request(bytes.fromhex("10 0001 0002 04 000a 0102"))  # spec example
    assert regs == WriteMultipleRegistersRequest(1, (0x000A, 0x0102))
    rw = parse_request(bytes.fromhex("17 0003 0006 000e 0003 06 00ff 00ff 00ff"))
    assert rw == ReadWriteMultipleRegistersRequest(3, 6, 14, (0xFF, 0xFF, 0xFF))
    fr = parse_request(bytes.fromhex("14 0e 06 0004 0001 0002 06 0003 0009 0002"))
    assert fr == ReadFileRecordRequest((FileSubRequest(4, 1, 2), FileSubRequest(3, 9, 2)))
    fw = parse_request(bytes.fromhex("15 0d 06 0004 0007 0003 06af 04be 100d"))
    assert fw == WriteFileRecordRequest((FileRecord(4, 7, (0x06AF, 0x04BE, 0x100D)),))
    assert parse_request(bytes.fromhex("16 0004 00f2 0025")) == MaskWriteRegisterRequest(
        4, 0xF2, 0x25
    )
    assert parse_request(bytes.fromhex("18 04de")) == ReadFifoQueueRequest(0x04DE)
    assert parse_request(bytes.fromhex("2b 0e 01 00")) == ReadDeviceIdentificationRequest(1, 0)


def test_match_friendly() -> None:
    match parse_request(pdu(3, "HH", 10, 2)):
        case ReadHoldingRegistersRequest(address, count):
            assert (address, count) == (10, 2)
        case _:
            pytest.fail("no match")


ACCESS: list[tuple[Request, Access]] = [
    (ReadCoilsRequest(1, 2), Access(1, Table.COILS, (1, 2), None, (), None, 5)),
    (ReadDiscreteInputsRequest(1, 2),
     Access(2, Table.DISCRETE_INPUTS, (1, 2), None, (), None, 5)),
    (ReadHoldingRegistersRequest(1, 2),
     Access(3, Table.HOLDING_REGISTERS, (1, 2), None, (), None, 5)),
    (ReadInputRegistersRequest(1, 2),
     Access(4, Table.INPUT_REGISTERS, (1, 2), None, (), None, 5)),
    (WriteSingleCoilRequest(9, True), Access(5, Table.COILS, None, (9, 1), (1,), None, 5)),
    (WriteSingleCoilRequest(9, False), Access(5, Table.COILS, None, (9, 1), (0,), None, 5)),
    (WriteSingleRegisterRequest(9, 1500),
     Access(6, Table.HOLDING_REGISTERS, None, (9, 1), (1500,), None, 5)),
    (ReadExceptionStatusRequest(), Access(7, Table.NONE, None, None, (), None, 1)),
    (DiagnosticsRequest(0, b"ab"), Access(8, Table.NONE, None, None, (), 0, 5)),
    (DiagnosticsRequest(10, b"\0\0"), Access(8, Table.NONE, None, None, (), 10, 5)),
    (GetCommEventCounterRequest(), Access(11, Table.NONE, None, None, (), None, 1)),
    (GetCommEventLogRequest(), Access(12, Table.NONE, None, None, (), None, 1)),
    (WriteMultipleCoilsRequest(3, (True, False, True)),
     Access(15, Table.COILS, None, (3, 3), (1, 0, 1), None, 7)),
    (WriteMultipleRegistersRequest(3, (5, 6)),
     Access(16, Table.HOLDING_REGISTERS, None, (3, 2), (5, 6), None, 10)),
    (ReportServerIdRequest(), Access(17, Table.NONE, None, None, (), None, 1)),
    (ReadFileRecordRequest((FileSubRequest(4, 1, 2), FileSubRequest(3, 9, 2))),
     Access(20, Table.FILE_RECORDS, (1, 10), None, (), None, 16)),
    (WriteFileRecordRequest((FileRecord(4, 7, (1, 2, 3)),)),
     Access(21, Table.FILE_RECORDS, None, (7, 3), (1, 2, 3), None, 15)),
    (MaskWriteRegisterRequest(4, 0xF2, 0x25),
     Access(22, Table.HOLDING_REGISTERS, None, (4, 1), (0xF2, 0x25), None, 7)),
    (ReadWriteMultipleRegistersRequest(3, 6, 14, (1, 2, 3)),
     Access(23, Table.HOLDING_REGISTERS, (3, 6), (14, 3), (1, 2, 3), None, 16)),
    (ReadFifoQueueRequest(7), Access(24, Table.HOLDING_REGISTERS, (7, 1), None, (), None, 3)),
    (ReadDeviceIdentificationRequest(1, 0), Access(43, Table.NONE, None, None, (), 14, 4)),
    (MeiRequest(13, b"xyz"), Access(43, Table.NONE, None, None, (), 13, 5)),
    (OpaqueRequest(65, b"xyz"), Access(65, Table.NONE, None, None, (), None, 4)),
]


@pytest.mark.parametrize(("req", "expected"), ACCESS, ids=lambda x: type(x).__name__)
def test_access(req: Request, expected: Access) -> None:
    access = req.access()
    assert access == expected
    assert access.pdu_length == len(encode_request(req))
    assert access.is_write == (req.function_code in WRITE_FUNCTIONS)


def test_names() -> None:
    assert FUNCTION_NAMES[3] == "read_holding_registers"
    assert FUNCTION_NAMES[43] == "encapsulated_interface_transport"
    assert FUNCTION_NAMES[23] == "read_write_multiple_registers"
    assert set(FUNCTION_NAMES) == {int(f) for f in FunctionCode}
    assert len(FUNCTION_NAMES) == 19
    assert MEI_NAMES == {13: "can_open_general_reference", 14: "read_device_identification"}
    assert frozenset({5, 6, 15, 16, 21, 22, 23}) == WRITE_FUNCTIONS
    assert ExceptionCode.GATEWAY_TARGET_NO_RESPONSE == 0x0B
    assert ExceptionCode.MEMORY_PARITY_ERROR == 8


# ---------------------------------------------------------------------------- responses


def mismatch(req: Request, raw: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        parse_response(req, raw)
    assert info.value.action is Action.CLOSE
    return info.value.reason


FC03 = ReadHoldingRegistersRequest(0, 2)


def test_response_spec_examples() -> None:
    assert parse_response(FC03, bytes.fromhex("03 04 022b 0000")) == (
        ReadHoldingRegistersResponse((0x022B, 0))
    )
    coils = parse_response(ReadCoilsRequest(19, 19), bytes.fromhex("01 03 cd 6b 05"))
    assert isinstance(coils, ReadCoilsResponse)
    assert len(coils.values) == 19
    assert coils.values[:8] == (True, False, True, True, False, False, True, True)
    fifo = parse_response(ReadFifoQueueRequest(0x4DE), bytes.fromhex("18 0006 0002 01b8 1284"))
    assert fifo == ReadFifoQueueResponse((0x1B8, 0x1284))
    fr = parse_response(
        ReadFileRecordRequest((FileSubRequest(4, 1, 2), FileSubRequest(3, 9, 2))),
        bytes.fromhex("14 0c 05 06 0dfe 0020 05 06 33cd 0040"),
    )
    assert fr == ReadFileRecordResponse(((0x0DFE, 0x20), (0x33CD, 0x40)))


def test_exception_response() -> None:
    assert parse_response(FC03, b"\x83\x02") == ExceptionResponse(3, 2)
    assert encode_response(ExceptionResponse(3, 2)) == b"\x83\x02"
    assert exception_pdu(3, ExceptionCode.GATEWAY_TARGET_NO_RESPONSE) == b"\x83\x0b"
    assert mismatch(FC03, b"\x83") == "bad_exception_pdu"
    assert mismatch(FC03, b"\x83\x02\x00") == "bad_exception_pdu"
    assert mismatch(FC03, b"\x84\x02") == "function_mismatch"


@pytest.mark.parametrize(
    ("req", "raw", "slug"),
    [
        (FC03, bytes.fromhex("04 04 0000 0000"), "function_mismatch"),
        (FC03, bytes.fromhex("03 02 0000"), "byte_count_mismatch"),
        (FC03, bytes.fromhex("03 04 0000 00"), "byte_count_mismatch"),
        (FC03, bytes.fromhex("03 04 0000 0000 00"), "byte_count_mismatch"),
        (FC03, b"", "bad_response_length"),
        (ReadCoilsRequest(0, 9), bytes.fromhex("01 01 ff"), "byte_count_mismatch"),
        (ReadCoilsRequest(0, 8), bytes.fromhex("01 02 ff 00"), "byte_count_mismatch"),
        (WriteSingleCoilRequest(1, True), bytes.fromhex("05 0001 0000"), "echo_mismatch"),
        (WriteSingleCoilRequest(1, True), bytes.fromhex("05 0002 ff00"), "echo_mismatch"),
        (WriteSingleCoilRequest(1, True), bytes.fromhex("05 0001 ff"), "bad_response_length"),
        (WriteSingleRegisterRequest(1, 2), bytes.fromhex("06 0001 0003"), "echo_mismatch"),
        (WriteMultipleRegistersRequest(1, (2, 3)), bytes.fromhex("10 0001 0001"),
         "echo_mismatch"),
        (WriteMultipleCoilsRequest(1, (True,)), bytes.fromhex("0f 0000 0001"), "echo_mismatch"),
        (MaskWriteRegisterRequest(1, 2, 3), bytes.fromhex("16 0001 0002 0004"), "echo_mismatch"),
        (DiagnosticsRequest(0, b"ab"), bytes.fromhex("08 0000 6162 00"), "echo_mismatch"),
        (DiagnosticsRequest(10, b"\0\0"), bytes.fromhex("08 000b 0000"), "echo_mismatch"),
        (ReadWriteMultipleRegistersRequest(0, 2, 0, (1,)), bytes.fromhex("17 02 0000"),
         "byte_count_mismatch"),
        (ReadDeviceIdentificationRequest(1, 0), bytes.fromhex("2b 0d 01 01 00 00 00"),
         "mei_mismatch"),
        (ReadDeviceIdentificationRequest(1, 0), bytes.fromhex("2b 0e 01 01 00 00 01 00 05 61"),
         "bad_response_length"),
        (ReadDeviceIdentificationRequest(1, 0), bytes.fromhex("2b 0e 02 01 00 00 00"),
         "echo_mismatch"),
        (MeiRequest(13, b""), bytes.fromhex("2b 0e"), "mei_mismatch"),
        (ReadFifoQueueRequest(0), bytes.fromhex("18 0004 0002 0001"), "byte_count_mismatch"),
        (ReadFifoQueueRequest(0), bytes.fromhex("18 0042 0020") + bytes(64),
         "byte_count_mismatch"),
        (ReadFileRecordRequest((FileSubRequest(4, 1, 2),)), bytes.fromhex("14 04 03 06 0dfe"),
         "byte_count_mismatch"),
        (ReadFileRecordRequest((FileSubRequest(4, 1, 1),)), bytes.fromhex("14 04 03 05 0dfe"),
         "bad_response"),
        (WriteFileRecordRequest((FileRecord(4, 7, (1,)),)),
         bytes.fromhex("15 09 06 0004 0007 0001 0002"), "echo_mismatch"),
    ],
)
def test_response_mismatch(req: Request, raw: bytes, slug: str) -> None:
    assert mismatch(req, raw) == slug


def test_diagnostics_counter_reply_must_carry_two_data_bytes() -> None:
    """FC08 sub-functions other than the echo ones answer one 16-bit counter: a reply with
    any other amount of data is refused (the connection to the PLC closes), never
    forwarded. Regression: a non-echo sub-function's reply of any length was accepted."""
    req = DiagnosticsRequest(0x000B, b"\x00\x00")  # return bus message count
    assert mismatch(req, bytes([0x08, 0x00, 0x0B]) + bytes(40)) == "bad_response_length"
    assert parse_response(req, bytes([0x08, 0x00, 0x0B, 0x01, 0x02])) == (
        DiagnosticsResponse(0x000B, b"\x01\x02"))


def test_device_identification_individual_reply_must_carry_the_requested_object() -> None:
    """FC43/14 read code 4 asks for one specific object: a reply carrying other objects (or
    more than one) is refused. Regression: "object 5 only" answered with objects 0 and 1
    was accepted."""
    req = ReadDeviceIdentificationRequest(4, 0x05)  # object 5 only (ModelName)
    # read code 4, conformity 0x81, more follows 0xFF, next id 0x06, 2 objects: 0x00 and 0x01
    bad = bytes([43, 14, 4, 0x81, 0xFF, 0x06, 2, 0x00, 3]) + b"ACM" + bytes([0x01, 2]) + b"X1"
    assert mismatch(req, bad) == "response_mismatch"
    good = bytes([43, 14, 4, 0x81, 0x00, 0x00, 1, 0x05, 2]) + b"X1"
    assert parse_response(req, good) == ReadDeviceIdentificationResponse(
        4, 0x81, 0, 0, ((5, b"X1"),))


def test_response_truncated_at_every_offset() -> None:
    cases: list[tuple[Request, Any]] = [
        (FC03, ReadHoldingRegistersResponse((1, 2))),
        (ReadCoilsRequest(0, 19), ReadCoilsResponse((True,) * 19)),
        (WriteSingleRegisterRequest(1, 2), None),
        (MaskWriteRegisterRequest(1, 2, 3), None),
        (ReadFifoQueueRequest(0), ReadFifoQueueResponse((1, 2))),
        (ReadDeviceIdentificationRequest(1, 0),
         ReadDeviceIdentificationResponse(1, 1, 0, 0, ((0, b"acme"), (1, b"x")))),
    ]
    for req, resp in cases:
        raw = encode_request(req) if resp is None else encode_response(resp)
        assert parse_response(req, raw) is not None
        for cut in range(len(raw)):
            with pytest.raises(RemoteProtocolError) as info:
                parse_response(req, raw[:cut])
            assert info.value.action is Action.CLOSE


def test_opaque_and_mei_responses() -> None:
    assert parse_response(OpaqueRequest(65, b"x"), b"\x41yz") == OpaqueResponse(65, b"yz")
    assert parse_response(OpaqueRequest(65, b"x"), b"\xc1\x01") == ExceptionResponse(65, 1)
    assert parse_response(MeiRequest(13, b"q"), b"\x2b\x0dr") == MeiResponse(13, b"r")
    assert parse_response(DiagnosticsRequest(0, b"ab"), b"\x08\x00\x00ab") == (
        DiagnosticsResponse(0, b"ab")
    )


# ---------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(
    "req",
    [
        ReadHoldingRegistersRequest(0, 126),
        ReadHoldingRegistersRequest(0, 0),
        ReadHoldingRegistersRequest(65535, 2),
        ReadHoldingRegistersRequest(-1, 1),
        ReadCoilsRequest(0, 2001),
        WriteSingleRegisterRequest(0, 65536),
        WriteSingleRegisterRequest(0, -1),
        WriteMultipleRegistersRequest(0, ()),
        WriteMultipleRegistersRequest(0, (0,) * 124),
        WriteMultipleRegistersRequest(0, (70000,)),
        WriteMultipleCoilsRequest(0, (True,) * 1969),
        ReadWriteMultipleRegistersRequest(0, 1, 0, (0,) * 122),
        DiagnosticsRequest(1, b""),
        DiagnosticsRequest(0x10000, b"\0\0"),
        ReadFileRecordRequest(()),
        ReadFileRecordRequest((FileSubRequest(0, 0, 1),)),
        WriteFileRecordRequest(()),
        ReadDeviceIdentificationRequest(0, 0),
        MeiRequest(14, b"\x01\x00"),
        MeiRequest(256, b""),
        OpaqueRequest(3, b"\0\0\0\1"),
        OpaqueRequest(0x80, b""),
        OpaqueRequest(65, bytes(253)),
    ],
    ids=repr,
)
def test_encode_request_rejects(req: Request) -> None:
    with pytest.raises(LocalProtocolError):
        encode_request(req)


@pytest.mark.parametrize(
    "resp",
    [
        ReadHoldingRegistersResponse(()),
        ReadHoldingRegistersResponse((0,) * 126),
        ReadHoldingRegistersResponse((65536,)),
        ReadCoilsResponse(()),
        ReadCoilsResponse((True,) * 2001),
        ReadFifoQueueResponse((0,) * 32),
        ExceptionResponse(0x83, 2),
        ExceptionResponse(3, 256),
        MeiResponse(14, b""),
        OpaqueResponse(3, b""),
        ReadDeviceIdentificationResponse(1, 1, 0, 0, ((0, bytes(256)),)),
    ],
    ids=repr,
)
def test_encode_response_rejects(resp: Any) -> None:
    with pytest.raises(LocalProtocolError):
        encode_response(resp)


def test_exception_pdu_rejects() -> None:
    with pytest.raises(LocalProtocolError):
        exception_pdu(256, 1)
    with pytest.raises(LocalProtocolError):
        exception_pdu(3, -1)


# ---------------------------------------------------------------------------- fast init


def test_fast_init_keeps_dataclass_semantics() -> None:
    import dataclasses

    from mbsec.modbus import Adu

    req = ReadHoldingRegistersRequest(address=5, count=2)
    assert req == ReadHoldingRegistersRequest(5, 2)
    assert hash(req) == hash(ReadHoldingRegistersRequest(5, 2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.address = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        ReadHoldingRegistersRequest(5)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ReadHoldingRegistersRequest(5, 2, 3)  # type: ignore[call-arg]
    assert Adu(1, 2, b"\x07") == Adu(transaction_id=1, unit_id=2, pdu=b"\x07")
    assert ReadExceptionStatusRequest() == ReadExceptionStatusRequest()
    access = req.access()
    with pytest.raises(dataclasses.FrozenInstanceError):
        access.read = None  # type: ignore[misc]


def test_fast_factory_falls_back_for_classes_it_cannot_handle() -> None:
    import dataclasses

    from mbsec.modbus._fast import fast_init, positional_factory

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        x: int

        def __post_init__(self) -> None:
            if self.x < 0:
                raise ValueError("negative")

    @dataclasses.dataclass(frozen=True, slots=True)
    class Defaulted:
        x: int = 1

    assert positional_factory(Checked) is Checked
    original = Checked.__init__
    assert fast_init(Checked).__init__ is original
    with pytest.raises(ValueError):
        Checked(-1)
    assert positional_factory(Defaulted) is Defaulted
    assert Defaulted() == Defaulted(1)
