"""Typed Modbus requests and responses (Modbus Application Protocol v1.1b3), no parsing here.

Every message is a frozen, slotted dataclass so it can be matched on (``match req: case
ReadHoldingRegistersRequest(address, count): ...``), hashed and compared. Addresses are
0-based protocol addresses. Parsing and encoding live in :mod:`mbsec.modbus.pdu`.

Requests know what they touch: ``access()`` builds the :class:`Access` the policy engine
evaluates. It runs once per proxied request, so it is a handful of attribute reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

from ._fast import fast_init, positional_factory
from .access import Access, Table

#: builds an Access without the frozen-dataclass __init__ overhead (access() is per request)
_access = positional_factory(Access)


class FunctionCode(IntEnum):
    """Public function codes of Modbus Application Protocol v1.1b3."""

    READ_COILS = 1
    READ_DISCRETE_INPUTS = 2
    READ_HOLDING_REGISTERS = 3
    READ_INPUT_REGISTERS = 4
    WRITE_SINGLE_COIL = 5
    WRITE_SINGLE_REGISTER = 6
    READ_EXCEPTION_STATUS = 7
    DIAGNOSTICS = 8
    GET_COMM_EVENT_COUNTER = 11
    GET_COMM_EVENT_LOG = 12
    WRITE_MULTIPLE_COILS = 15
    WRITE_MULTIPLE_REGISTERS = 16
    REPORT_SERVER_ID = 17
    READ_FILE_RECORD = 20
    WRITE_FILE_RECORD = 21
    MASK_WRITE_REGISTER = 22
    READ_WRITE_MULTIPLE_REGISTERS = 23
    READ_FIFO_QUEUE = 24
    ENCAPSULATED_INTERFACE_TRANSPORT = 43


#: function code -> the name policies and events use
FUNCTION_NAMES: dict[int, str] = {int(fc): fc.name.lower() for fc in FunctionCode}

#: MEI types carried by function 43
MEI_CAN_OPEN_GENERAL_REFERENCE = 13
MEI_READ_DEVICE_IDENTIFICATION = 14
MEI_NAMES: dict[int, str] = {
    MEI_CAN_OPEN_GENERAL_REFERENCE: "can_open_general_reference",
    MEI_READ_DEVICE_IDENTIFICATION: "read_device_identification",
}

#: function codes that change state in the server (never retried, always audited as writes)
WRITE_FUNCTIONS: frozenset[int] = frozenset({5, 6, 15, 16, 21, 22, 23})


class ExceptionCode(IntEnum):
    """Modbus exception codes (spec section 7)."""

    ILLEGAL_FUNCTION = 0x01
    ILLEGAL_DATA_ADDRESS = 0x02
    ILLEGAL_DATA_VALUE = 0x03
    SERVER_DEVICE_FAILURE = 0x04
    ACKNOWLEDGE = 0x05
    SERVER_DEVICE_BUSY = 0x06
    MEMORY_PARITY_ERROR = 0x08
    GATEWAY_PATH_UNAVAILABLE = 0x0A
    GATEWAY_TARGET_NO_RESPONSE = 0x0B


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadCoilsRequest:
    function_code: ClassVar[int] = 1
    address: int
    count: int

    def access(self) -> Access:
        return _access(1, Table.COILS, (self.address, self.count), None, (), None, 5)


@dataclass(frozen=True, slots=True)
class ReadDiscreteInputsRequest:
    function_code: ClassVar[int] = 2
    address: int
    count: int

    def access(self) -> Access:
        return _access(2, Table.DISCRETE_INPUTS, (self.address, self.count), None, (), None, 5)


@dataclass(frozen=True, slots=True)
class ReadHoldingRegistersRequest:
    function_code: ClassVar[int] = 3
    address: int
    count: int

    def access(self) -> Access:
        return _access(
            3, Table.HOLDING_REGISTERS, (self.address, self.count), None, (), None, 5
        )


@dataclass(frozen=True, slots=True)
class ReadInputRegistersRequest:
    function_code: ClassVar[int] = 4
    address: int
    count: int

    def access(self) -> Access:
        return _access(4, Table.INPUT_REGISTERS, (self.address, self.count), None, (), None, 5)


@dataclass(frozen=True, slots=True)
class WriteSingleCoilRequest:
    """``value`` is the coil state; on the wire it is 0xFF00 (on) or 0x0000 (off)."""

    function_code: ClassVar[int] = 5
    address: int
    value: bool

    def access(self) -> Access:
        return _access(
            5, Table.COILS, None, (self.address, 1), (1,) if self.value else (0,), None, 5
        )


@dataclass(frozen=True, slots=True)
class WriteSingleRegisterRequest:
    function_code: ClassVar[int] = 6
    address: int
    value: int

    def access(self) -> Access:
        return _access(
            6, Table.HOLDING_REGISTERS, None, (self.address, 1), (self.value,), None, 5
        )


@dataclass(frozen=True, slots=True)
class ReadExceptionStatusRequest:
    function_code: ClassVar[int] = 7

    def access(self) -> Access:
        return _access(7, Table.NONE, None, None, (), None, 1)


@dataclass(frozen=True, slots=True)
class DiagnosticsRequest:
    """FC08. Sub-function 0x0000 (return query data) carries any data, the others 2 bytes."""

    function_code: ClassVar[int] = 8
    sub_function: int
    data: bytes

    def access(self) -> Access:
        return _access(8, Table.NONE, None, None, (), self.sub_function, 3 + len(self.data))


@dataclass(frozen=True, slots=True)
class GetCommEventCounterRequest:
    function_code: ClassVar[int] = 11

    def access(self) -> Access:
        return _access(11, Table.NONE, None, None, (), None, 1)


@dataclass(frozen=True, slots=True)
class GetCommEventLogRequest:
    function_code: ClassVar[int] = 12

    def access(self) -> Access:
        return _access(12, Table.NONE, None, None, (), None, 1)


@dataclass(frozen=True, slots=True)
class WriteMultipleCoilsRequest:
    function_code: ClassVar[int] = 15
    address: int
    values: tuple[bool, ...]

    def access(self) -> Access:
        n = len(self.values)
        return _access(
            15,
            Table.COILS,
            None,
            (self.address, n),
            tuple(map(int, self.values)),
            None,
            6 + (n + 7) // 8,
        )


@dataclass(frozen=True, slots=True)
class WriteMultipleRegistersRequest:
    function_code: ClassVar[int] = 16
    address: int
    values: tuple[int, ...]

    def access(self) -> Access:
        n = len(self.values)
        return _access(
            16, Table.HOLDING_REGISTERS, None, (self.address, n), self.values, None, 6 + 2 * n
        )


@dataclass(frozen=True, slots=True)
class ReportServerIdRequest:
    function_code: ClassVar[int] = 17

    def access(self) -> Access:
        return _access(17, Table.NONE, None, None, (), None, 1)


@dataclass(frozen=True, slots=True)
class FileSubRequest:
    """One FC20 sub-request (reference type 6 is implied): read ``record_length`` registers."""

    file_number: int
    record_number: int
    record_length: int


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One FC21 sub-request / sub-response: write ``values`` starting at ``record_number``."""

    file_number: int
    record_number: int
    values: tuple[int, ...]


def _covering(ranges: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The smallest (start, quantity) covering every (start, end) pair: one range for policy."""
    if not ranges:
        return None
    start = min(r[0] for r in ranges)
    return (start, max(r[1] for r in ranges) - start)


@dataclass(frozen=True, slots=True)
class ReadFileRecordRequest:
    """FC20. ``access().read`` is the record range covering every sub-request (any file)."""

    function_code: ClassVar[int] = 20
    records: tuple[FileSubRequest, ...]

    def access(self) -> Access:
        rng = _covering(
            [(r.record_number, r.record_number + r.record_length) for r in self.records]
        )
        return _access(20, Table.FILE_RECORDS, rng, None, (), None, 2 + 7 * len(self.records))


@dataclass(frozen=True, slots=True)
class WriteFileRecordRequest:
    """FC21. ``access().write`` covers every sub-request; ``values`` are all written registers."""

    function_code: ClassVar[int] = 21
    records: tuple[FileRecord, ...]

    def access(self) -> Access:
        rng = _covering(
            [(r.record_number, r.record_number + len(r.values)) for r in self.records]
        )
        values = tuple(v for r in self.records for v in r.values)
        return _access(
            21,
            Table.FILE_RECORDS,
            None,
            rng,
            values,
            None,
            2 + 7 * len(self.records) + 2 * len(values),
        )


@dataclass(frozen=True, slots=True)
class MaskWriteRegisterRequest:
    """FC22: register = (current AND and_mask) OR (or_mask AND NOT and_mask)."""

    function_code: ClassVar[int] = 22
    address: int
    and_mask: int
    or_mask: int

    def access(self) -> Access:
        return _access(
            22,
            Table.HOLDING_REGISTERS,
            None,
            (self.address, 1),
            (self.and_mask, self.or_mask),
            None,
            7,
        )


@dataclass(frozen=True, slots=True)
class ReadWriteMultipleRegistersRequest:
    """FC23: the write is performed before the read."""

    function_code: ClassVar[int] = 23
    read_address: int
    read_count: int
    write_address: int
    values: tuple[int, ...]

    def access(self) -> Access:
        n = len(self.values)
        return _access(
            23,
            Table.HOLDING_REGISTERS,
            (self.read_address, self.read_count),
            (self.write_address, n),
            self.values,
            None,
            10 + 2 * n,
        )


@dataclass(frozen=True, slots=True)
class ReadFifoQueueRequest:
    """FC24. ``access().read`` is the FIFO pointer register; queue contents are device-defined."""

    function_code: ClassVar[int] = 24
    address: int

    def access(self) -> Access:
        return _access(24, Table.HOLDING_REGISTERS, (self.address, 1), None, (), None, 3)


@dataclass(frozen=True, slots=True)
class ReadDeviceIdentificationRequest:
    """FC43 / MEI 14. ``read_code`` 1 basic, 2 regular, 3 extended (stream), 4 one object."""

    function_code: ClassVar[int] = 43
    mei_type: ClassVar[int] = 14
    read_code: int
    object_id: int

    def access(self) -> Access:
        return _access(43, Table.NONE, None, None, (), 14, 4)


@dataclass(frozen=True, slots=True)
class MeiRequest:
    """FC43 with any MEI type but 14 (e.g. 13, CANopen general reference): opaque data."""

    function_code: ClassVar[int] = 43
    mei_type: int
    data: bytes

    def access(self) -> Access:
        return _access(43, Table.NONE, None, None, (), self.mei_type, 2 + len(self.data))


@dataclass(frozen=True, slots=True)
class OpaqueRequest:
    """A function code this core does not model (user-defined, vendor, reserved).

    The proxy still forwards it if the policy allows that function code by number.
    """

    function_code: int
    data: bytes

    def access(self) -> Access:
        return _access(self.function_code, Table.NONE, None, None, (), None, 1 + len(self.data))


Request: TypeAlias = (
    ReadCoilsRequest
    | ReadDiscreteInputsRequest
    | ReadHoldingRegistersRequest
    | ReadInputRegistersRequest
    | WriteSingleCoilRequest
    | WriteSingleRegisterRequest
    | ReadExceptionStatusRequest
    | DiagnosticsRequest
    | GetCommEventCounterRequest
    | GetCommEventLogRequest
    | WriteMultipleCoilsRequest
    | WriteMultipleRegistersRequest
    | ReportServerIdRequest
    | ReadFileRecordRequest
    | WriteFileRecordRequest
    | MaskWriteRegisterRequest
    | ReadWriteMultipleRegistersRequest
    | ReadFifoQueueRequest
    | ReadDeviceIdentificationRequest
    | MeiRequest
    | OpaqueRequest
)


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadCoilsResponse:
    """``values`` has exactly the requested count; padding bits of the last byte are dropped."""

    function_code: ClassVar[int] = 1
    values: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class ReadDiscreteInputsResponse:
    function_code: ClassVar[int] = 2
    values: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class ReadHoldingRegistersResponse:
    function_code: ClassVar[int] = 3
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadInputRegistersResponse:
    function_code: ClassVar[int] = 4
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class WriteSingleCoilResponse:
    function_code: ClassVar[int] = 5
    address: int
    value: bool


@dataclass(frozen=True, slots=True)
class WriteSingleRegisterResponse:
    function_code: ClassVar[int] = 6
    address: int
    value: int


@dataclass(frozen=True, slots=True)
class ReadExceptionStatusResponse:
    function_code: ClassVar[int] = 7
    status: int


@dataclass(frozen=True, slots=True)
class DiagnosticsResponse:
    function_code: ClassVar[int] = 8
    sub_function: int
    data: bytes


@dataclass(frozen=True, slots=True)
class GetCommEventCounterResponse:
    function_code: ClassVar[int] = 11
    status: int
    event_count: int


@dataclass(frozen=True, slots=True)
class GetCommEventLogResponse:
    """``events`` holds up to 64 event bytes, most recent first."""

    function_code: ClassVar[int] = 12
    status: int
    event_count: int
    message_count: int
    events: bytes


@dataclass(frozen=True, slots=True)
class WriteMultipleCoilsResponse:
    function_code: ClassVar[int] = 15
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class WriteMultipleRegistersResponse:
    function_code: ClassVar[int] = 16
    address: int
    count: int


@dataclass(frozen=True, slots=True)
class ReportServerIdResponse:
    """Server id, run indicator and device-specific data: their layout is vendor-defined."""

    function_code: ClassVar[int] = 17
    data: bytes


@dataclass(frozen=True, slots=True)
class ReadFileRecordResponse:
    """One tuple of register values per sub-request, in request order."""

    function_code: ClassVar[int] = 20
    records: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class WriteFileRecordResponse:
    """The server echoes the request."""

    function_code: ClassVar[int] = 21
    records: tuple[FileRecord, ...]


@dataclass(frozen=True, slots=True)
class MaskWriteRegisterResponse:
    function_code: ClassVar[int] = 22
    address: int
    and_mask: int
    or_mask: int


@dataclass(frozen=True, slots=True)
class ReadWriteMultipleRegistersResponse:
    function_code: ClassVar[int] = 23
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadFifoQueueResponse:
    function_code: ClassVar[int] = 24
    values: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReadDeviceIdentificationResponse:
    """``objects`` are (object id, raw value) pairs; ``more_follows`` is 0x00 or 0xFF."""

    function_code: ClassVar[int] = 43
    mei_type: ClassVar[int] = 14
    read_code: int
    conformity_level: int
    more_follows: int
    next_object_id: int
    objects: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class MeiResponse:
    function_code: ClassVar[int] = 43
    mei_type: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OpaqueResponse:
    function_code: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ExceptionResponse:
    """``function_code`` is the request's (without the 0x80 bit the wire carries)."""

    function_code: int
    exception_code: int


Response: TypeAlias = (
    ReadCoilsResponse
    | ReadDiscreteInputsResponse
    | ReadHoldingRegistersResponse
    | ReadInputRegistersResponse
    | WriteSingleCoilResponse
    | WriteSingleRegisterResponse
    | ReadExceptionStatusResponse
    | DiagnosticsResponse
    | GetCommEventCounterResponse
    | GetCommEventLogResponse
    | WriteMultipleCoilsResponse
    | WriteMultipleRegistersResponse
    | ReportServerIdResponse
    | ReadFileRecordResponse
    | WriteFileRecordResponse
    | MaskWriteRegisterResponse
    | ReadWriteMultipleRegistersResponse
    | ReadFifoQueueResponse
    | ReadDeviceIdentificationResponse
    | MeiResponse
    | OpaqueResponse
)


for _cls in (
    *Request.__args__,
    *Response.__args__,
    ExceptionResponse,
    FileSubRequest,
    FileRecord,
):
    fast_init(_cls)
del _cls
