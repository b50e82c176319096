"""Hypothesis: parse(encode(x)) == x for every message type, and fuzzing only raises ours."""

from __future__ import annotations

from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mbsec.modbus import (
    Action,
    DiagnosticsRequest,
    DiagnosticsResponse,
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
    ProtocolError,
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
    RemoteProtocolError,
    ReportServerIdRequest,
    ReportServerIdResponse,
    Request,
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
    check_response,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
)

REQUEST_REASONS = {
    "empty_pdu", "illegal_function", "bad_pdu_length", "bad_quantity", "bad_byte_count",
    "bad_value", "bad_address", "bad_file_reference",
}
RESPONSE_REASONS = {
    "function_mismatch", "bad_exception_pdu", "byte_count_mismatch", "echo_mismatch",
    "mei_mismatch", "bad_response_length", "bad_response",
}
KNOWN = {int(f) for f in FunctionCode}  # every public function code the core models
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


def ranged(max_qty: int) -> st.SearchStrategy[tuple[int, int]]:
    """(address, quantity) with address + quantity <= 65536."""
    return st.integers(1, max_qty).flatmap(
        lambda q: st.tuples(st.integers(0, 65536 - q), st.just(q))
    )


def read_req(cls: Any, max_qty: int) -> st.SearchStrategy[Request]:
    return ranged(max_qty).map(lambda aq: cls(*aq))


def coils_req() -> st.SearchStrategy[Request]:
    return ranged(1968).flatmap(
        lambda aq: st.lists(st.booleans(), min_size=aq[1], max_size=aq[1]).map(
            lambda v: WriteMultipleCoilsRequest(aq[0], tuple(v))
        )
    )


def regs_req() -> st.SearchStrategy[Request]:
    return ranged(123).flatmap(
        lambda aq: st.lists(u16, min_size=aq[1], max_size=aq[1]).map(
            lambda v: WriteMultipleRegistersRequest(aq[0], tuple(v))
        )
    )


def rw_req() -> st.SearchStrategy[Request]:
    return st.tuples(ranged(125), ranged(121)).flatmap(
        lambda t: st.lists(u16, min_size=t[1][1], max_size=t[1][1]).map(
            lambda v: ReadWriteMultipleRegistersRequest(t[0][0], t[0][1], t[1][0], tuple(v))
        )
    )


def file_sub(max_len: int = 10000) -> st.SearchStrategy[FileSubRequest]:
    return st.integers(0, 9999).flatmap(
        lambda rec: st.builds(
            FileSubRequest, st.integers(1, 0xFFFF), st.just(rec),
            st.integers(0, min(max_len, 10000 - rec)),
        )
    )


def file_record(max_len: int = 20) -> st.SearchStrategy[FileRecord]:
    return st.integers(0, 9999).flatmap(
        lambda rec: st.builds(
            FileRecord, st.integers(1, 0xFFFF), st.just(rec),
            st.lists(u16, max_size=min(max_len, 10000 - rec)).map(tuple),
        )
    )


def write_file_req() -> st.SearchStrategy[Request]:
    recs = st.lists(file_record(), min_size=1, max_size=6).filter(
        lambda rs: 9 <= sum(7 + 2 * len(r.values) for r in rs) <= 0xFB
    )
    return recs.map(lambda rs: WriteFileRecordRequest(tuple(rs)))


diag_req = st.one_of(
    st.builds(DiagnosticsRequest, st.just(0), st.binary(max_size=250)),
    st.builds(DiagnosticsRequest, st.integers(1, 0xFFFF), st.binary(min_size=2, max_size=2)),
)

REQUESTS: st.SearchStrategy[Request] = st.one_of(
    read_req(ReadCoilsRequest, 2000),
    read_req(ReadDiscreteInputsRequest, 2000),
    read_req(ReadHoldingRegistersRequest, 125),
    read_req(ReadInputRegistersRequest, 125),
    st.builds(WriteSingleCoilRequest, u16, st.booleans()),
    st.builds(WriteSingleRegisterRequest, u16, u16),
    st.just(ReadExceptionStatusRequest()),
    diag_req,
    st.just(GetCommEventCounterRequest()),
    st.just(GetCommEventLogRequest()),
    coils_req(),
    regs_req(),
    st.just(ReportServerIdRequest()),
    st.lists(file_sub(), min_size=1, max_size=35).map(lambda s: ReadFileRecordRequest(tuple(s))),
    write_file_req(),
    st.builds(MaskWriteRegisterRequest, u16, u16, u16),
    rw_req(),
    st.builds(ReadFifoQueueRequest, u16),
    st.builds(ReadDeviceIdentificationRequest, st.integers(1, 4), u8),
    st.builds(MeiRequest, u8.filter(lambda m: m != 14), st.binary(max_size=251)),
    st.builds(
        OpaqueRequest,
        st.integers(0, 0x7F).filter(lambda fc: fc not in KNOWN),
        st.binary(max_size=252),
    ),
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(REQUESTS)
def test_request_round_trip(req: Request) -> None:
    raw = encode_request(req)
    assert parse_request(raw) == req
    assert 1 <= len(raw) <= 253
    assert raw[0] == req.function_code
    access = req.access()
    assert access.function_code == req.function_code
    assert access.pdu_length == len(raw)


def bits(n: int) -> st.SearchStrategy[tuple[bool, ...]]:
    return st.lists(st.booleans(), min_size=n, max_size=n).map(tuple)


def words(n: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(u16, min_size=n, max_size=n).map(tuple)


def response_for(req: Request) -> st.SearchStrategy[Any]:
    """A valid response to ``req`` (the server's point of view)."""
    match req:
        case ReadCoilsRequest(_, n):
            return bits(n).map(ReadCoilsResponse)
        case ReadDiscreteInputsRequest(_, n):
            return bits(n).map(ReadDiscreteInputsResponse)
        case ReadHoldingRegistersRequest(_, n):
            return words(n).map(ReadHoldingRegistersResponse)
        case ReadInputRegistersRequest(_, n):
            return words(n).map(ReadInputRegistersResponse)
        case WriteSingleCoilRequest(a, v):
            return st.just(WriteSingleCoilResponse(a, v))
        case WriteSingleRegisterRequest(a, v):
            return st.just(WriteSingleRegisterResponse(a, v))
        case ReadExceptionStatusRequest():
            return st.builds(ReadExceptionStatusResponse, u8)
        case DiagnosticsRequest(0, data):
            return st.just(DiagnosticsResponse(0, data))
        case DiagnosticsRequest(sub, _):
            return st.builds(DiagnosticsResponse, st.just(sub), st.binary(min_size=2, max_size=2))
        case GetCommEventCounterRequest():
            return st.builds(GetCommEventCounterResponse, u16, u16)
        case GetCommEventLogRequest():
            return st.builds(GetCommEventLogResponse, u16, u16, u16, st.binary(max_size=64))
        case WriteMultipleCoilsRequest(a, v):
            return st.just(WriteMultipleCoilsResponse(a, len(v)))
        case WriteMultipleRegistersRequest(a, v):
            return st.just(WriteMultipleRegistersResponse(a, len(v)))
        case ReportServerIdRequest():
            return st.builds(ReportServerIdResponse, st.binary(max_size=251))
        case ReadFileRecordRequest(subs):
            return st.tuples(*[words(s.record_length) for s in subs]).map(ReadFileRecordResponse)
        case WriteFileRecordRequest(records):
            return st.just(WriteFileRecordResponse(records))
        case MaskWriteRegisterRequest(a, m1, m2):
            return st.just(MaskWriteRegisterResponse(a, m1, m2))
        case ReadWriteMultipleRegistersRequest(_, n, _, _):
            return words(n).map(ReadWriteMultipleRegistersResponse)
        case ReadFifoQueueRequest():
            return st.lists(u16, max_size=31).map(lambda v: ReadFifoQueueResponse(tuple(v)))
        case ReadDeviceIdentificationRequest(4, object_id):  # individual access: that object
            return st.builds(
                ReadDeviceIdentificationResponse, st.just(4), u8, st.just(0), u8,
                st.tuples(st.tuples(st.just(object_id), st.binary(max_size=20))),
            )
        case ReadDeviceIdentificationRequest(code, _):
            objs = st.lists(st.tuples(u8, st.binary(max_size=20)), max_size=8).map(tuple)
            return st.builds(
                ReadDeviceIdentificationResponse, st.just(code), u8, st.sampled_from([0, 0xFF]),
                u8, objs,
            )
        case MeiRequest(mei, _):
            return st.builds(MeiResponse, st.just(mei), st.binary(max_size=251))
        case OpaqueRequest(fc, _):
            return st.builds(OpaqueResponse, st.just(fc), st.binary(max_size=252))
    raise AssertionError(req)


# FC20 responses must fit 245 bytes: pair them with small requests
SMALL_FILE_READS = st.lists(file_sub(max_len=20), min_size=1, max_size=5).filter(
    lambda s: sum(2 + 2 * r.record_length for r in s) <= 0xF5
).map(lambda s: ReadFileRecordRequest(tuple(s)))
PAIRS = st.one_of(REQUESTS.filter(lambda r: not isinstance(r, ReadFileRecordRequest)),
                  SMALL_FILE_READS).flatmap(lambda r: st.tuples(st.just(r), response_for(r)))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(PAIRS)
def test_response_round_trip(pair: tuple[Request, Any]) -> None:
    req, resp = pair
    raw = encode_response(resp)
    assert raw[0] == req.function_code
    assert parse_response(req, raw) == resp


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(REQUESTS, u8)
def test_exception_round_trip(req: Request, code: int) -> None:
    exc = ExceptionResponse(req.function_code, code)
    raw = encode_response(exc)
    assert raw == bytes([req.function_code | 0x80, code])
    assert parse_response(req, raw) == exc


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=260))
def test_fuzz_parse_request(raw: bytes) -> None:
    try:
        req = parse_request(raw)
    except RemoteProtocolError as exc:
        assert exc.reason in REQUEST_REASONS
        assert exc.action is (Action.CLOSE if not raw else Action.EXCEPTION)
        if exc.action is Action.EXCEPTION:
            assert exc.exception_code in (1, 2, 3)
        return
    req.access()
    # whatever we accept we can re-encode, and that re-encoding is stable
    again = encode_request(req)
    assert parse_request(again) == req


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(st.binary(min_size=1, max_size=20), st.binary(max_size=260))
def test_fuzz_parse_response_random(request_bytes: bytes, raw: bytes) -> None:
    try:
        req = parse_request(request_bytes)
    except ProtocolError:
        assume(False)
        return
    try:
        parse_response(req, raw)
    except RemoteProtocolError as exc:
        assert exc.reason in RESPONSE_REASONS
        assert exc.action is Action.CLOSE


@settings(max_examples=600, deadline=None, derandomize=True, database=None)
@given(PAIRS, st.data())
def test_fuzz_parse_response_mutated(pair: tuple[Request, Any], data: st.DataObject) -> None:
    req, resp = pair
    raw = bytearray(encode_response(resp))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(u8)
    cut = data.draw(st.integers(0, len(raw)))
    try:
        parse_response(req, bytes(raw[:cut]))
    except RemoteProtocolError as exc:
        assert exc.reason in RESPONSE_REASONS
        assert exc.action is Action.CLOSE


def _verdict(fn: Any, req: Request, raw: bytes) -> Any:
    try:
        return ("ok", fn(req, raw))
    except RemoteProtocolError as exc:
        return ("error", exc.reason, exc.action, exc.message)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(PAIRS, st.data())
def test_check_response_gives_parse_responses_verdict(
    pair: tuple[Request, Any], data: st.DataObject
) -> None:
    """The proxy checks replies with check_response: for any reply bytes (the right one, a
    mutated one, a cut one) it raises what parse_response raises, and where parse_response
    decodes a normal register-read reply it gives None, else the same object."""
    req, resp = pair
    raw = bytearray(encode_response(resp))
    if data.draw(st.booleans()):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(u8)
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    pdu = bytes(raw)
    parsed = _verdict(parse_response, req, pdu)
    checked = _verdict(check_response, req, pdu)
    if parsed[0] == "ok" and isinstance(
            req, (ReadHoldingRegistersRequest, ReadInputRegistersRequest)) and not isinstance(
            parsed[1], ExceptionResponse):
        assert checked == ("ok", None)
    else:
        assert checked == parsed


REGISTER_READS = st.one_of(read_req(ReadHoldingRegistersRequest, 125),
                           read_req(ReadInputRegistersRequest, 125))


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(REGISTER_READS, st.data())
def test_check_response_checks_a_register_reads_reply_as_parse_response_does(
    req: Request, data: st.DataObject
) -> None:
    """The replies check_response does not decode: function code (right, exception, other),
    byte count and body length drawn near what the request asks for, so that each of the
    three checks (function, byte count, length) is the one that fails in some examples."""
    fc = req.function_code
    count = 2 * req.count  # type: ignore[union-attr]
    head = data.draw(st.sampled_from([fc, fc, fc, fc | 0x80, data.draw(u8)]))
    byte_count = data.draw(st.sampled_from([count, count, (count + 1) % 256,
                                            data.draw(u8)]))
    body = data.draw(st.sampled_from([count, count, count - 1, count + 1,
                                      data.draw(st.integers(0, 252))]))
    pdu = bytes([head, byte_count]) + bytes(max(0, body))
    if data.draw(st.booleans()):
        pdu = pdu[:data.draw(st.integers(0, len(pdu)))]
    parsed = _verdict(parse_response, req, pdu)
    checked = _verdict(check_response, req, pdu)
    if parsed[0] == "ok" and not isinstance(parsed[1], ExceptionResponse):
        assert checked == ("ok", None)
    else:
        assert checked == parsed
