"""Parse and encode Modbus PDUs: bytes <-> the typed messages of :mod:`.messages`.

Requests are validated in the order of the spec's state diagrams (section 6), each failure
naming the exception code the server side must answer with: quantity and byte count (03),
then address + quantity <= 65536 (02), then values such as the FC05 0x0000/0xFF00 (03).
Unknown function codes below 0x80 are *not* an error here: the proxy forwards them as
:class:`OpaqueRequest` if the policy allows that number.

Responses are checked against the request they answer (function echo, byte count for the
requested quantity, echoed fields); a mismatch means the server or the stream is confused,
so the connection is closed rather than a wrong answer forwarded.

Hot path: dispatch is a 256-entry tuple indexed by function code, unpacking uses
precompiled ``struct.Struct`` objects, register blocks use one cached struct per count.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, NoReturn

from .errors import Action, LocalProtocolError, RemoteProtocolError
from .messages import (
    FUNCTION_NAMES,
    MEI_CAN_OPEN_GENERAL_REFERENCE,
    MEI_NAMES,
    MEI_READ_DEVICE_IDENTIFICATION,
    WRITE_FUNCTIONS,
    DiagnosticsRequest,
    DiagnosticsResponse,
    ExceptionCode,
    ExceptionResponse,
    FileRecord,
    FileSubRequest,
    FunctionCode,
    GetCommEventCounterRequest,
    GetCommEventCounterResponse,
    GetCommEventLogRequest,
    GetCommEventLogResponse,
    MaskWriteRegisterRequest,
    MaskWriteRegisterResponse,
    MeiRequest,
    MeiResponse,
    OpaqueRequest,
    OpaqueResponse,
    ReadCoilsRequest,
    ReadCoilsResponse,
    ReadDeviceIdentificationRequest,
    ReadDeviceIdentificationResponse,
    ReadDiscreteInputsRequest,
    ReadDiscreteInputsResponse,
    ReadExceptionStatusRequest,
    ReadExceptionStatusResponse,
    ReadFifoQueueRequest,
    ReadFifoQueueResponse,
    ReadFileRecordRequest,
    ReadFileRecordResponse,
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    ReadInputRegistersRequest,
    ReadInputRegistersResponse,
    ReadWriteMultipleRegistersRequest,
    ReadWriteMultipleRegistersResponse,
    ReportServerIdRequest,
    ReportServerIdResponse,
    Request,
    Response,
    WriteFileRecordRequest,
    WriteFileRecordResponse,
    WriteMultipleCoilsRequest,
    WriteMultipleCoilsResponse,
    WriteMultipleRegistersRequest,
    WriteMultipleRegistersResponse,
    WriteSingleCoilRequest,
    WriteSingleCoilResponse,
    WriteSingleRegisterRequest,
    WriteSingleRegisterResponse,
)

__all__ = [
    "FUNCTION_NAMES",
    "LIMITS",
    "MAX_PDU",
    "MEI_CAN_OPEN_GENERAL_REFERENCE",
    "MEI_NAMES",
    "MEI_READ_DEVICE_IDENTIFICATION",
    "WRITE_FUNCTIONS",
    "DiagnosticsRequest",
    "DiagnosticsResponse",
    "ExceptionCode",
    "ExceptionResponse",
    "FileRecord",
    "FileSubRequest",
    "FunctionCode",
    "GetCommEventCounterRequest",
    "GetCommEventCounterResponse",
    "GetCommEventLogRequest",
    "GetCommEventLogResponse",
    "MaskWriteRegisterRequest",
    "MaskWriteRegisterResponse",
    "MeiRequest",
    "MeiResponse",
    "OpaqueRequest",
    "OpaqueResponse",
    "ReadCoilsRequest",
    "ReadCoilsResponse",
    "ReadDeviceIdentificationRequest",
    "ReadDeviceIdentificationResponse",
    "ReadDiscreteInputsRequest",
    "ReadDiscreteInputsResponse",
    "ReadExceptionStatusRequest",
    "ReadExceptionStatusResponse",
    "ReadFifoQueueRequest",
    "ReadFifoQueueResponse",
    "ReadFileRecordRequest",
    "ReadFileRecordResponse",
    "ReadHoldingRegistersRequest",
    "ReadHoldingRegistersResponse",
    "ReadInputRegistersRequest",
    "ReadInputRegistersResponse",
    "ReadWriteMultipleRegistersRequest",
    "ReadWriteMultipleRegistersResponse",
    "ReportServerIdRequest",
    "ReportServerIdResponse",
    "Request",
    "Response",
    "WriteFileRecordRequest",
    "WriteFileRecordResponse",
    "WriteMultipleCoilsRequest",
    "WriteMultipleCoilsResponse",
    "WriteMultipleRegistersRequest",
    "WriteMultipleRegistersResponse",
    "WriteSingleCoilRequest",
    "WriteSingleCoilResponse",
    "WriteSingleRegisterRequest",
    "WriteSingleRegisterResponse",
    "check_response",
    "encode_request",
    "encode_response",
    "exception_pdu",
    "parse_request",
    "parse_response",
]

MAX_PDU: Final = 253

#: quantity limits (spec section 6); the boundary tests and the docs read them from here
LIMITS: dict[str, tuple[int, int]] = {
    "read_bits": (1, 2000),  # FC01, FC02
    "read_registers": (1, 125),  # FC03, FC04, FC23 read
    "write_coils": (1, 1968),  # FC15
    "write_registers": (1, 123),  # FC16
    "rw_write_registers": (1, 121),  # FC23 write
    "fifo_count": (0, 31),  # FC24 response
    "comm_events": (0, 64),  # FC12 response
    "file_request_bytes": (0x07, 0xF5),  # FC20 request byte count
    "file_write_bytes": (0x09, 0xFB),  # FC21 request byte count
}
_MAX_BITS_READ: Final = 2000
_MAX_REGS_READ: Final = 125
_MAX_COILS_WRITE: Final = 1968
_MAX_REGS_WRITE: Final = 123
_MAX_REGS_RW_WRITE: Final = 121
_FILE_REFERENCE_TYPE: Final = 6
_MAX_FILE_RECORD: Final = 0x270F  # records are numbered 0..9999

_U16: Final = struct.Struct(">H")
_U16x2: Final = struct.Struct(">HH")
_U16x3: Final = struct.Struct(">HHH")
_U16x4: Final = struct.Struct(">HHHH")
_FILE_SUB: Final = struct.Struct(">BHHH")
_unpack_u16: Final = _U16.unpack_from
_unpack_u16x2: Final = _U16x2.unpack_from
_unpack_u16x3: Final = _U16x3.unpack_from
_unpack_u16x4: Final = _U16x4.unpack_from
_unpack_file_sub: Final = _FILE_SUB.unpack_from

#: ">{n}H" for every register count a PDU can hold: no format string is built per call
_REGS: Final = tuple(struct.Struct(f">{n}H") for n in range(MAX_PDU // 2 + 1))

#: byte -> its 8 bits, LSB first (Modbus packs coil n of a byte at bit n)
_BITS: Final[tuple[tuple[bool, ...], ...]] = tuple(
    tuple(bool(b >> i & 1) for i in range(8)) for b in range(256)
)

_CLOSE: Final = Action.CLOSE
_EXC: Final = Action.EXCEPTION


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _reject(code: int, reason: str, message: str) -> NoReturn:
    raise RemoteProtocolError(message, reason=reason, action=_EXC, exception_code=code)


def _bad_length(fc: int, pdu: bytes) -> NoReturn:
    _reject(3, "bad_pdu_length", f"function {fc}: PDU length {len(pdu)} is wrong")


def _mismatch(reason: str, message: str) -> NoReturn:
    raise RemoteProtocolError(message, reason=reason, action=_CLOSE)


def _unpack_bits(data: bytes, start: int, count: int) -> tuple[bool, ...]:
    bits: list[bool] = []
    extend = bits.extend
    table = _BITS
    for b in data[start : start + (count + 7) // 8]:
        extend(table[b])
    del bits[count:]
    return tuple(bits)


def _pack_bits(values: tuple[bool, ...]) -> bytes:
    out = bytearray((len(values) + 7) // 8)
    for i, v in enumerate(values):
        if v:
            out[i >> 3] |= 1 << (i & 7)
    return bytes(out)


# --------------------------------------------------------------------------------------------
# requests
# --------------------------------------------------------------------------------------------

_RequestParser = Callable[[bytes], Request]


def _read_parser(
    fc: int, cls: Callable[[int, int], Request], max_count: int
) -> _RequestParser:
    def parse(pdu: bytes) -> Request:
        if len(pdu) != 5:
            _bad_length(fc, pdu)
        address, count = _unpack_u16x2(pdu, 1)
        if count < 1 or count > max_count:
            _reject(3, "bad_quantity", f"function {fc}: quantity {count} outside 1..{max_count}")
        if address + count > 65536:
            _reject(2, "bad_address", f"function {fc}: {address} + {count} > 65536")
        return cls(address, count)

    return parse


def _parse_write_single_coil(pdu: bytes) -> Request:
    if len(pdu) != 5:
        _bad_length(5, pdu)
    address, value = _unpack_u16x2(pdu, 1)
    if value == 0xFF00:
        return WriteSingleCoilRequest(address, True)
    if value == 0:
        return WriteSingleCoilRequest(address, False)
    _reject(3, "bad_value", f"function 5: coil value {value:#06x} is not 0x0000/0xFF00")


def _parse_write_single_register(pdu: bytes) -> Request:
    if len(pdu) != 5:
        _bad_length(6, pdu)
    address, value = _unpack_u16x2(pdu, 1)
    return WriteSingleRegisterRequest(address, value)


def _no_data_parser(fc: int, instance: Request) -> _RequestParser:
    def parse(pdu: bytes) -> Request:
        if len(pdu) != 1:
            _bad_length(fc, pdu)
        return instance

    return parse


def _parse_diagnostics(pdu: bytes) -> Request:
    if len(pdu) < 3:
        _bad_length(8, pdu)
    sub = _unpack_u16(pdu, 1)[0]
    if sub != 0 and len(pdu) != 5:
        _reject(3, "bad_pdu_length", f"function 8 sub-function {sub}: data must be 2 bytes")
    return DiagnosticsRequest(sub, pdu[3:])


def _parse_write_multiple_coils(pdu: bytes) -> Request:
    if len(pdu) < 6:
        _bad_length(15, pdu)
    address, count = _unpack_u16x2(pdu, 1)
    if count < 1 or count > _MAX_COILS_WRITE:
        _reject(3, "bad_quantity", f"function 15: quantity {count} outside 1..1968")
    nbytes = (count + 7) >> 3
    if pdu[5] != nbytes or len(pdu) != 6 + nbytes:
        _reject(3, "bad_byte_count", f"function 15: byte count {pdu[5]} for {count} coils")
    if address + count > 65536:
        _reject(2, "bad_address", f"function 15: {address} + {count} > 65536")
    return WriteMultipleCoilsRequest(address, _unpack_bits(pdu, 6, count))


def _parse_write_multiple_registers(pdu: bytes) -> Request:
    if len(pdu) < 6:
        _bad_length(16, pdu)
    address, count = _unpack_u16x2(pdu, 1)
    if count < 1 or count > _MAX_REGS_WRITE:
        _reject(3, "bad_quantity", f"function 16: quantity {count} outside 1..123")
    nbytes = count << 1
    if pdu[5] != nbytes or len(pdu) != 6 + nbytes:
        _reject(3, "bad_byte_count", f"function 16: byte count {pdu[5]} for {count} registers")
    if address + count > 65536:
        _reject(2, "bad_address", f"function 16: {address} + {count} > 65536")
    return WriteMultipleRegistersRequest(address, _REGS[count].unpack_from(pdu, 6))


def _check_file_reference(fc: int, ref_type: int, file_number: int, record: int, n: int) -> None:
    if ref_type != _FILE_REFERENCE_TYPE:
        _reject(2, "bad_file_reference", f"function {fc}: reference type {ref_type} is not 6")
    if file_number == 0:
        _reject(2, "bad_file_reference", f"function {fc}: file number 0")
    if record > _MAX_FILE_RECORD or record + n > _MAX_FILE_RECORD + 1:
        _reject(2, "bad_address", f"function {fc}: records {record}+{n} beyond 9999")


def _parse_read_file_record(pdu: bytes) -> Request:
    if len(pdu) < 2:
        _bad_length(20, pdu)
    nbytes = pdu[1]
    if nbytes < 0x07 or nbytes > 0xF5 or nbytes % 7 or len(pdu) != 2 + nbytes:
        _reject(3, "bad_byte_count", f"function 20: byte count {nbytes}")
    records = []
    for off in range(2, 2 + nbytes, 7):
        ref, file_number, record, length = _unpack_file_sub(pdu, off)
        _check_file_reference(20, ref, file_number, record, length)
        records.append(FileSubRequest(file_number, record, length))
    return ReadFileRecordRequest(tuple(records))


def _parse_file_records(fc: int, pdu: bytes, start: int, end: int) -> tuple[FileRecord, ...]:
    """FC21 request and response body: (ref, file, record, length, data) until ``end``."""
    records = []
    off = start
    while off < end:
        if off + 7 > end:
            _reject(3, "bad_byte_count", f"function {fc}: truncated sub-request")
        ref, file_number, record, length = _unpack_file_sub(pdu, off)
        off += 7
        if off + 2 * length > end:
            _reject(3, "bad_byte_count", f"function {fc}: record data beyond byte count")
        _check_file_reference(fc, ref, file_number, record, length)
        records.append(FileRecord(file_number, record, _REGS[length].unpack_from(pdu, off)))
        off += 2 * length
    return tuple(records)


def _parse_write_file_record(pdu: bytes) -> Request:
    if len(pdu) < 2:
        _bad_length(21, pdu)
    nbytes = pdu[1]
    if nbytes < 0x09 or nbytes > 0xFB or len(pdu) != 2 + nbytes:
        _reject(3, "bad_byte_count", f"function 21: byte count {nbytes}")
    return WriteFileRecordRequest(_parse_file_records(21, pdu, 2, len(pdu)))


def _parse_mask_write_register(pdu: bytes) -> Request:
    if len(pdu) != 7:
        _bad_length(22, pdu)
    return MaskWriteRegisterRequest(*_unpack_u16x3(pdu, 1))


def _parse_read_write_multiple(pdu: bytes) -> Request:
    if len(pdu) < 10:
        _bad_length(23, pdu)
    raddr, rcount, waddr, wcount = _unpack_u16x4(pdu, 1)
    if rcount < 1 or rcount > _MAX_REGS_READ:
        _reject(3, "bad_quantity", f"function 23: read quantity {rcount} outside 1..125")
    if wcount < 1 or wcount > _MAX_REGS_RW_WRITE:
        _reject(3, "bad_quantity", f"function 23: write quantity {wcount} outside 1..121")
    nbytes = wcount << 1
    if pdu[9] != nbytes or len(pdu) != 10 + nbytes:
        _reject(3, "bad_byte_count", f"function 23: byte count {pdu[9]} for {wcount} registers")
    if raddr + rcount > 65536:
        _reject(2, "bad_address", f"function 23: read {raddr} + {rcount} > 65536")
    if waddr + wcount > 65536:
        _reject(2, "bad_address", f"function 23: write {waddr} + {wcount} > 65536")
    values = _REGS[wcount].unpack_from(pdu, 10)
    return ReadWriteMultipleRegistersRequest(raddr, rcount, waddr, values)


def _parse_read_fifo_queue(pdu: bytes) -> Request:
    if len(pdu) != 3:
        _bad_length(24, pdu)
    return ReadFifoQueueRequest(_unpack_u16(pdu, 1)[0])


def _parse_mei(pdu: bytes) -> Request:
    if len(pdu) < 2:
        _bad_length(43, pdu)
    mei = pdu[1]
    if mei == MEI_READ_DEVICE_IDENTIFICATION:
        if len(pdu) != 4:
            _bad_length(43, pdu)
        read_code = pdu[2]
        if read_code < 1 or read_code > 4:
            _reject(3, "bad_value", f"function 43/14: read device id code {read_code}")
        return ReadDeviceIdentificationRequest(read_code, pdu[3])
    return MeiRequest(mei, pdu[2:])


_REQUEST_PARSERS: dict[int, _RequestParser] = {
    1: _read_parser(1, ReadCoilsRequest, _MAX_BITS_READ),
    2: _read_parser(2, ReadDiscreteInputsRequest, _MAX_BITS_READ),
    3: _read_parser(3, ReadHoldingRegistersRequest, _MAX_REGS_READ),
    4: _read_parser(4, ReadInputRegistersRequest, _MAX_REGS_READ),
    5: _parse_write_single_coil,
    6: _parse_write_single_register,
    7: _no_data_parser(7, ReadExceptionStatusRequest()),
    8: _parse_diagnostics,
    11: _no_data_parser(11, GetCommEventCounterRequest()),
    12: _no_data_parser(12, GetCommEventLogRequest()),
    15: _parse_write_multiple_coils,
    16: _parse_write_multiple_registers,
    17: _no_data_parser(17, ReportServerIdRequest()),
    20: _parse_read_file_record,
    21: _parse_write_file_record,
    22: _parse_mask_write_register,
    23: _parse_read_write_multiple,
    24: _parse_read_fifo_queue,
    43: _parse_mei,
}
_REQUEST_TABLE: Final[tuple[_RequestParser | None, ...]] = tuple(
    _REQUEST_PARSERS.get(fc) for fc in range(256)
)


def parse_request(pdu: bytes) -> Request:
    """Decode and validate a request PDU (function code first).

    Raises ``RemoteProtocolError`` with ``action=EXCEPTION`` and the exception code to send
    for a well-framed but invalid request, ``action=CLOSE`` for an empty PDU.
    """
    if not pdu:
        raise RemoteProtocolError("empty PDU", reason="empty_pdu", action=_CLOSE)
    fc = pdu[0]
    if fc >= 0x80:
        _reject(1, "illegal_function", f"function code {fc:#04x} is an exception code")
    if len(pdu) > MAX_PDU:
        _reject(3, "bad_pdu_length", f"PDU length {len(pdu)} > {MAX_PDU}")
    parser = _REQUEST_TABLE[fc]
    if parser is None:
        return OpaqueRequest(fc, pdu[1:])
    return parser(pdu)


def _invalid(message: str) -> NoReturn:
    raise LocalProtocolError(message, reason="invalid_message")


def _u16(*values: int) -> None:
    for v in values:
        if type(v) is not int or v < 0 or v > 0xFFFF:
            _invalid(f"{v!r} is not a 16-bit unsigned value")


def _u8(*values: int) -> None:
    for v in values:
        if type(v) is not int or v < 0 or v > 0xFF:
            _invalid(f"{v!r} is not an 8-bit unsigned value")


def _regs(values: tuple[int, ...]) -> bytes:
    try:
        return _REGS[len(values)].pack(*values)
    except (struct.error, IndexError):
        _invalid(f"register values out of range or too many ({len(values)})")


def _file_sub(file_number: int, record_number: int, length: int) -> bytes:
    _u16(file_number, record_number, length)
    return _FILE_SUB.pack(_FILE_REFERENCE_TYPE, file_number, record_number, length)


def _encode_request_body(req: Request) -> bytes:
    """Bytes only; :func:`encode_request` validates by parsing them back."""
    match req:
        case (
            ReadCoilsRequest(address, count)
            | ReadDiscreteInputsRequest(address, count)
            | ReadHoldingRegistersRequest(address, count)
            | ReadInputRegistersRequest(address, count)
        ):
            _u16(address, count)
            return bytes((req.function_code,)) + _U16x2.pack(address, count)
        case WriteSingleCoilRequest(address, value):
            _u16(address)
            return b"\x05" + _U16x2.pack(address, 0xFF00 if value else 0)
        case WriteSingleRegisterRequest(address, value):
            _u16(address, value)
            return b"\x06" + _U16x2.pack(address, value)
        case ReadExceptionStatusRequest():
            return b"\x07"
        case DiagnosticsRequest(sub, data):
            _u16(sub)
            return b"\x08" + _U16.pack(sub) + bytes(data)
        case GetCommEventCounterRequest():
            return b"\x0b"
        case GetCommEventLogRequest():
            return b"\x0c"
        case WriteMultipleCoilsRequest(address, values):
            _u16(address, len(values))
            bits = _pack_bits(values)
            _u8(len(bits))
            return b"\x0f" + _U16x2.pack(address, len(values)) + bytes((len(bits),)) + bits
        case WriteMultipleRegistersRequest(address, values):
            _u16(address, len(values))
            _u8(2 * len(values))
            return b"\x10" + _U16x2.pack(address, len(values)) + bytes((2 * len(values),)) + (
                _regs(values)
            )
        case ReportServerIdRequest():
            return b"\x11"
        case ReadFileRecordRequest(records):
            body = b"".join(
                _file_sub(r.file_number, r.record_number, r.record_length) for r in records
            )
            _u8(len(body))
            return b"\x14" + bytes((len(body),)) + body
        case WriteFileRecordRequest(records):
            body = _encode_file_records(records)
            _u8(len(body))
            return b"\x15" + bytes((len(body),)) + body
        case MaskWriteRegisterRequest(address, and_mask, or_mask):
            _u16(address, and_mask, or_mask)
            return b"\x16" + _U16x3.pack(address, and_mask, or_mask)
        case ReadWriteMultipleRegistersRequest(raddr, rcount, waddr, values):
            _u16(raddr, rcount, waddr, len(values))
            _u8(2 * len(values))
            return (
                b"\x17"
                + _U16x4.pack(raddr, rcount, waddr, len(values))
                + bytes((2 * len(values),))
                + _regs(values)
            )
        case ReadFifoQueueRequest(address):
            _u16(address)
            return b"\x18" + _U16.pack(address)
        case ReadDeviceIdentificationRequest(read_code, object_id):
            _u8(read_code, object_id)
            return bytes((43, 14, read_code, object_id))
        case MeiRequest(mei_type, data):
            _u8(mei_type)
            if mei_type == MEI_READ_DEVICE_IDENTIFICATION:
                _invalid("MEI type 14 is ReadDeviceIdentificationRequest, not MeiRequest")
            return bytes((43, mei_type)) + bytes(data)
        case OpaqueRequest(fc, data):
            _u8(fc)
            if fc in _REQUEST_PARSERS or fc >= 0x80:
                _invalid(f"function code {fc} cannot be sent as an OpaqueRequest")
            return bytes((fc,)) + bytes(data)
    _invalid(f"not a Modbus request: {req!r}")


def _encode_file_records(records: tuple[FileRecord, ...]) -> bytes:
    parts = []
    for r in records:
        parts.append(_file_sub(r.file_number, r.record_number, len(r.values)))
        parts.append(_regs(r.values))
    return b"".join(parts)


def encode_request(req: Request) -> bytes:
    """Encode a request PDU; raises ``LocalProtocolError`` if it is not a valid request.

    Validation is the parser itself: the bytes must parse back to an equal request, so a
    peer can never receive from us what we would reject from it.
    """
    pdu = _encode_request_body(req)
    try:
        back = parse_request(pdu)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(
            f"invalid request {req!r}: {exc.message}", reason=exc.reason
        ) from None
    if back != req:
        _invalid(f"request {req!r} does not survive encoding (got {back!r})")
    return pdu


# --------------------------------------------------------------------------------------------
# responses
# --------------------------------------------------------------------------------------------


def _resp_length(fc: int, pdu: bytes, expected: int) -> None:
    if len(pdu) != expected:
        _mismatch(
            "bad_response_length",
            f"function {fc} response: {len(pdu)} bytes, expected {expected}",
        )


def _resp_byte_count(fc: int, pdu: bytes, expected: int) -> None:
    if len(pdu) < 2 or pdu[1] != expected or len(pdu) != 2 + expected:
        _mismatch(
            "byte_count_mismatch",
            f"function {fc} response: byte count/length does not match {expected} bytes",
        )


def _echo_mismatch(fc: int) -> NoReturn:
    _mismatch("echo_mismatch", f"function {fc} response does not echo the request")


def _resp_read_bits(req: Any, pdu: bytes) -> Response:
    count = req.count
    _resp_byte_count(req.function_code, pdu, (count + 7) >> 3)
    values = _unpack_bits(pdu, 2, count)
    if req.function_code == 1:
        return ReadCoilsResponse(values)
    return ReadDiscreteInputsResponse(values)


def _resp_read_regs(req: Any, pdu: bytes) -> Response:
    count = req.count
    if len(pdu) != 2 + 2 * count or pdu[1] != 2 * count:
        _resp_byte_count(req.function_code, pdu, 2 * count)
    values = _REGS[count].unpack_from(pdu, 2)
    if req.function_code == 3:
        return ReadHoldingRegistersResponse(values)
    return ReadInputRegistersResponse(values)


def _resp_write_single_coil(req: Any, pdu: bytes) -> Response:
    if pdu != _encode_request_body(req):
        _resp_length(5, pdu, 5)
        _echo_mismatch(5)
    return WriteSingleCoilResponse(req.address, req.value)


def _resp_write_single_register(req: Any, pdu: bytes) -> Response:
    _resp_length(6, pdu, 5)
    address, value = _unpack_u16x2(pdu, 1)
    if address != req.address or value != req.value:
        _echo_mismatch(6)
    return WriteSingleRegisterResponse(address, value)


def _resp_exception_status(req: Any, pdu: bytes) -> Response:
    _resp_length(7, pdu, 2)
    return ReadExceptionStatusResponse(pdu[1])


def _resp_diagnostics(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 3:
        _resp_length(8, pdu, 3)
    sub = _unpack_u16(pdu, 1)[0]
    data = pdu[3:]
    if sub != req.sub_function or (sub == 0 and data != req.data):
        _echo_mismatch(8)
    if sub != 0:
        _resp_length(8, pdu, 5)  # every other sub-function answers with one 2-byte data field
    return DiagnosticsResponse(sub, data)


def _resp_comm_event_counter(req: Any, pdu: bytes) -> Response:
    _resp_length(11, pdu, 5)
    return GetCommEventCounterResponse(*_unpack_u16x2(pdu, 1))


def _resp_comm_event_log(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 8 or len(pdu) > 8 + 64 or pdu[1] != len(pdu) - 2:
        _mismatch("byte_count_mismatch", "function 12 response: bad byte count")
    status, events, messages = _unpack_u16x3(pdu, 2)
    return GetCommEventLogResponse(status, events, messages, pdu[8:])


def _resp_write_multiple(req: Any, pdu: bytes) -> Response:
    fc = req.function_code
    _resp_length(fc, pdu, 5)
    address, count = _unpack_u16x2(pdu, 1)
    if address != req.address or count != len(req.values):
        _echo_mismatch(fc)
    if fc == 15:
        return WriteMultipleCoilsResponse(address, count)
    return WriteMultipleRegistersResponse(address, count)


def _resp_report_server_id(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 2 or pdu[1] != len(pdu) - 2:
        _mismatch("byte_count_mismatch", "function 17 response: bad byte count")
    return ReportServerIdResponse(pdu[2:])


def _resp_read_file_record(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 2 or pdu[1] != len(pdu) - 2:
        _mismatch("byte_count_mismatch", "function 20 response: bad byte count")
    records = []
    off = 2
    for sub in req.records:
        n = sub.record_length
        if off + 2 + 2 * n > len(pdu) or pdu[off] != 1 + 2 * n:
            _mismatch("byte_count_mismatch", "function 20 response: sub-response length")
        if pdu[off + 1] != _FILE_REFERENCE_TYPE:
            _mismatch("bad_response", "function 20 response: reference type is not 6")
        records.append(_REGS[n].unpack_from(pdu, off + 2))
        off += 2 + 2 * n
    if off != len(pdu):
        _mismatch("byte_count_mismatch", "function 20 response: more sub-responses than asked")
    return ReadFileRecordResponse(tuple(records))


def _resp_write_file_record(req: Any, pdu: bytes) -> Response:
    if pdu != _encode_request_body(req):
        _echo_mismatch(21)
    return WriteFileRecordResponse(req.records)


def _resp_mask_write(req: Any, pdu: bytes) -> Response:
    _resp_length(22, pdu, 7)
    address, and_mask, or_mask = _unpack_u16x3(pdu, 1)
    if address != req.address or and_mask != req.and_mask or or_mask != req.or_mask:
        _echo_mismatch(22)
    return MaskWriteRegisterResponse(address, and_mask, or_mask)


def _resp_read_write_multiple(req: Any, pdu: bytes) -> Response:
    count = req.read_count
    _resp_byte_count(23, pdu, 2 * count)
    return ReadWriteMultipleRegistersResponse(_REGS[count].unpack_from(pdu, 2))


def _resp_fifo(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 5:
        _resp_length(24, pdu, 5)
    nbytes, count = _unpack_u16x2(pdu, 1)
    if count > 31 or nbytes != 2 + 2 * count or len(pdu) != 3 + nbytes:
        _mismatch("byte_count_mismatch", "function 24 response: bad byte/FIFO count")
    return ReadFifoQueueResponse(_REGS[count].unpack_from(pdu, 5))


def _resp_device_identification(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 2:
        _resp_length(43, pdu, 7)
    if pdu[1] != MEI_READ_DEVICE_IDENTIFICATION:
        _mismatch("mei_mismatch", "function 43 response: MEI type is not 14")
    if len(pdu) < 7:
        _resp_length(43, pdu, 7)
    read_code, conformity, more, next_id, n = pdu[2], pdu[3], pdu[4], pdu[5], pdu[6]
    if read_code != req.read_code:
        _echo_mismatch(43)  # spec: the response carries the request's read device id code
    objects = []
    off = 7
    for _ in range(n):
        if off + 2 > len(pdu) or off + 2 + pdu[off + 1] > len(pdu):
            _mismatch("bad_response_length", "function 43/14 response: truncated object")
        length = pdu[off + 1]
        objects.append((pdu[off], pdu[off + 2 : off + 2 + length]))
        off += 2 + length
    if off != len(pdu):
        _mismatch("bad_response_length", "function 43/14 response: bytes after the objects")
    if more not in (0x00, 0xFF):  # Next Object Id is "useless" when 0x00: not judged
        _mismatch("response_mismatch", "function 43/14 response: More Follows is not 00 or FF")
    if read_code == 4 and (
        more != 0 or len(objects) != 1 or objects[0][0] != req.object_id
    ):
        _mismatch(
            "response_mismatch",
            "function 43/14 response: an individual access must return exactly the "
            "requested object",
        )
    return ReadDeviceIdentificationResponse(read_code, conformity, more, next_id, tuple(objects))


def _resp_mei(req: Any, pdu: bytes) -> Response:
    if len(pdu) < 2 or pdu[1] != req.mei_type:
        _mismatch("mei_mismatch", f"function 43 response: MEI type is not {req.mei_type}")
    return MeiResponse(pdu[1], pdu[2:])


def _resp_opaque(req: Any, pdu: bytes) -> Response:
    return OpaqueResponse(pdu[0], pdu[1:])


_ResponseParser = Callable[[Any, bytes], Response]
_RESPONSE_PARSERS: dict[type, _ResponseParser] = {
    ReadCoilsRequest: _resp_read_bits,
    ReadDiscreteInputsRequest: _resp_read_bits,
    ReadHoldingRegistersRequest: _resp_read_regs,
    ReadInputRegistersRequest: _resp_read_regs,
    WriteSingleCoilRequest: _resp_write_single_coil,
    WriteSingleRegisterRequest: _resp_write_single_register,
    ReadExceptionStatusRequest: _resp_exception_status,
    DiagnosticsRequest: _resp_diagnostics,
    GetCommEventCounterRequest: _resp_comm_event_counter,
    GetCommEventLogRequest: _resp_comm_event_log,
    WriteMultipleCoilsRequest: _resp_write_multiple,
    WriteMultipleRegistersRequest: _resp_write_multiple,
    ReportServerIdRequest: _resp_report_server_id,
    ReadFileRecordRequest: _resp_read_file_record,
    WriteFileRecordRequest: _resp_write_file_record,
    MaskWriteRegisterRequest: _resp_mask_write,
    ReadWriteMultipleRegistersRequest: _resp_read_write_multiple,
    ReadFifoQueueRequest: _resp_fifo,
    ReadDeviceIdentificationRequest: _resp_device_identification,
    MeiRequest: _resp_mei,
    OpaqueRequest: _resp_opaque,
}


def parse_response(request: Request, pdu: bytes) -> Response | ExceptionResponse:
    """Decode the response to ``request``; anything that does not answer it closes.

    Every failure is ``RemoteProtocolError(action=CLOSE)`` with a slug: ``function_mismatch``,
    ``bad_exception_pdu``, ``byte_count_mismatch``, ``echo_mismatch``, ``mei_mismatch``,
    ``bad_response_length`` or ``bad_response``.
    """
    fc = request.function_code
    if not pdu or len(pdu) > MAX_PDU:
        _mismatch("bad_response_length", f"response PDU length {len(pdu)} outside 1..{MAX_PDU}")
    got = pdu[0]
    if got == fc:
        parser = _RESPONSE_PARSERS.get(type(request))
        if parser is None:
            raise TypeError(f"not a Modbus request: {request!r}")
        return parser(request, pdu)
    if got == fc | 0x80:
        if len(pdu) != 2:
            _mismatch("bad_exception_pdu", f"exception response of {len(pdu)} bytes, not 2")
        return ExceptionResponse(fc, pdu[1])
    _mismatch("function_mismatch", f"response function {got:#04x} to request function {fc}")


def check_response(request: Request, pdu: bytes) -> Response | ExceptionResponse | None:
    """:func:`parse_response`'s verdict without decoding what nobody reads: a normal reply to
    a register read (FC 03/04, most of a plant's traffic) is checked by its byte count and
    length alone and gives None; any other reply is parsed. The same errors for the same bytes
    (tests/unit/test_pdu_properties.py); the proxy forwards the PLC's bytes, not a re-encoding,
    so the register values were built per reply only to be thrown away."""
    if isinstance(request, (ReadHoldingRegistersRequest, ReadInputRegistersRequest)):
        fc = request.function_code
        if pdu and pdu[0] == fc and len(pdu) <= MAX_PDU:
            expected = 2 * request.count
            if len(pdu) != 2 + expected or pdu[1] != expected:
                _resp_byte_count(fc, pdu, expected)
            return None
    return parse_response(request, pdu)


def exception_pdu(function_code: int, exception_code: int) -> bytes:
    """The 2-byte exception PDU answering ``function_code`` (the 0x80 bit is added here)."""
    if function_code < 0 or function_code > 0xFF or exception_code < 0 or exception_code > 0xFF:
        _invalid(f"exception {function_code}/{exception_code} out of range")
    return bytes((function_code | 0x80, exception_code))


def _bits_or_invalid(values: tuple[bool, ...], max_count: int) -> bytes:
    if len(values) < 1 or len(values) > max_count:
        _invalid(f"{len(values)} bits outside 1..{max_count}")
    return _pack_bits(values)


def _counted_regs(values: tuple[int, ...], max_count: int) -> bytes:
    if len(values) < 1 or len(values) > max_count:
        _invalid(f"{len(values)} registers outside 1..{max_count}")
    return bytes((2 * len(values),)) + _regs(values)


def _counted_bytes(data: bytes, max_len: int) -> bytes:
    if len(data) > max_len:
        _invalid(f"{len(data)} data bytes > {max_len}")
    return bytes((len(data),)) + bytes(data)


def _encode_response_body(resp: Response | ExceptionResponse) -> bytes:
    match resp:
        case ReadCoilsResponse(values) | ReadDiscreteInputsResponse(values):
            bits = _bits_or_invalid(values, _MAX_BITS_READ)
            return bytes((resp.function_code, len(bits))) + bits
        case (
            ReadHoldingRegistersResponse(values)
            | ReadInputRegistersResponse(values)
            | ReadWriteMultipleRegistersResponse(values)
        ):
            return bytes((resp.function_code,)) + _counted_regs(values, _MAX_REGS_READ)
        case WriteSingleCoilResponse(address, value):
            return _encode_request_body(WriteSingleCoilRequest(address, value))
        case WriteSingleRegisterResponse(address, value):
            return _encode_request_body(WriteSingleRegisterRequest(address, value))
        case ReadExceptionStatusResponse(status):
            _u8(status)
            return bytes((7, status))
        case DiagnosticsResponse(sub, data):
            _u16(sub)
            if sub != 0 and len(data) != 2:
                _invalid("function 8 response: sub-functions other than 0 carry 2 data bytes")
            return b"\x08" + _U16.pack(sub) + bytes(data)
        case GetCommEventCounterResponse(status, count):
            _u16(status, count)
            return b"\x0b" + _U16x2.pack(status, count)
        case GetCommEventLogResponse(status, events, messages, log):
            _u16(status, events, messages)
            if len(log) > 64:
                _invalid(f"{len(log)} comm events > 64")
            return b"\x0c" + bytes((6 + len(log),)) + _U16x3.pack(status, events, messages) + log
        case WriteMultipleCoilsResponse(address, count) | WriteMultipleRegistersResponse(
            address, count
        ):
            _u16(address, count)
            return bytes((resp.function_code,)) + _U16x2.pack(address, count)
        case ReportServerIdResponse(data):
            return b"\x11" + _counted_bytes(data, MAX_PDU - 2)
        case ReadFileRecordResponse(records):
            parts = []
            for values in records:
                regs = _regs(values)
                _u8(len(regs) + 1)
                parts.append(bytes((len(regs) + 1, _FILE_REFERENCE_TYPE)) + regs)
            return b"\x14" + _counted_bytes(b"".join(parts), 0xF5)
        case WriteFileRecordResponse(records):
            return b"\x15" + _counted_bytes(_encode_file_records(records), 0xFB)
        case MaskWriteRegisterResponse(address, and_mask, or_mask):
            _u16(address, and_mask, or_mask)
            return b"\x16" + _U16x3.pack(address, and_mask, or_mask)
        case ReadFifoQueueResponse(values):
            if len(values) > 31:
                _invalid(f"{len(values)} FIFO registers > 31")
            return b"\x18" + _U16x2.pack(2 + 2 * len(values), len(values)) + _regs(values)
        case ReadDeviceIdentificationResponse(read_code, conformity, more, next_id, objects):
            _u8(read_code, conformity, more, next_id, len(objects))
            parts = [bytes((43, 14, read_code, conformity, more, next_id, len(objects)))]
            for object_id, raw in objects:
                _u8(object_id, len(raw))
                parts.append(bytes((object_id, len(raw))) + bytes(raw))
            return b"".join(parts)
        case MeiResponse(mei_type, data):
            _u8(mei_type)
            if mei_type == MEI_READ_DEVICE_IDENTIFICATION:
                _invalid("MEI type 14 is ReadDeviceIdentificationResponse, not MeiResponse")
            return bytes((43, mei_type)) + bytes(data)
        case OpaqueResponse(fc, data):
            _u8(fc)
            if fc in _REQUEST_PARSERS or fc >= 0x80:
                _invalid(f"function code {fc} cannot be sent as an OpaqueResponse")
            return bytes((fc,)) + bytes(data)
        case ExceptionResponse(fc, code):
            if fc >= 0x80:
                _invalid(f"exception for function code {fc} >= 0x80")
            return exception_pdu(fc, code)
    _invalid(f"not a Modbus response: {resp!r}")


def encode_response(resp: Response | ExceptionResponse) -> bytes:
    """Encode a response PDU; raises ``LocalProtocolError`` on values out of range."""
    pdu = _encode_response_body(resp)
    if len(pdu) > MAX_PDU:
        _invalid(f"response PDU of {len(pdu)} bytes > {MAX_PDU}")
    return pdu
