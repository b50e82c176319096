"""Sans-IO Modbus/TCP: MBAP framing, typed PDUs, validation. No trio, ssl or socket here.

``from mbsec.modbus import FrameBuffer, parse_request, ...`` is the supported import path.

Every error is a :class:`ProtocolError` whose ``reason`` slug ends up in events and metrics:

=========================  =========  ====================================================
reason                     action     raised by / meaning
=========================  =========  ====================================================
bad_protocol_id            CLOSE      FrameBuffer: MBAP protocol id is not 0
bad_length                 CLOSE      FrameBuffer: MBAP length outside 2..254
buffer_overflow            CLOSE      FrameBuffer: > 64 KiB received but not pulled
empty_pdu                  CLOSE      parse_request: zero-length PDU
illegal_function           EXC 01     parse_request: function code >= 0x80
bad_pdu_length             EXC 03     parse_request: truncated, trailing bytes, > 253 bytes
bad_quantity               EXC 03     parse_request: quantity outside the spec's range
bad_byte_count             EXC 03     parse_request: byte count does not match quantity/data
bad_value                  EXC 03     parse_request: FC05 value, FC43/14 read code
bad_address                EXC 02     parse_request: address + quantity > 65536, records > 9999
bad_file_reference         EXC 02     parse_request: FC20/21 reference type != 6 or file 0
function_mismatch          CLOSE      parse_response: neither fc nor fc | 0x80
bad_exception_pdu          CLOSE      parse_response: exception PDU is not 2 bytes
byte_count_mismatch        CLOSE      parse_response: byte count != requested quantity
echo_mismatch              CLOSE      parse_response: FC05/06/08/15/16/21/22/43 echo differs
mei_mismatch               CLOSE      parse_response: FC43 MEI type differs
bad_response_length        CLOSE      parse_response: fixed-size response of wrong size
bad_response               CLOSE      parse_response: FC20 sub-response reference type != 6
=========================  =========  ====================================================

Encoders raise :class:`LocalProtocolError` (our bug, never the peer's).
"""

from __future__ import annotations

from .access import Access, Table
from .errors import Action, LocalProtocolError, ProtocolError, RemoteProtocolError
from .mbap import MAX_ADU, MBAP_HEADER_LEN, Adu, FrameBuffer, encode_adu
from .pdu import *  # noqa: F403  (pdu.__all__ is the message vocabulary)
from .pdu import __all__ as _pdu_all

__all__ = [
    "MAX_ADU",
    "MBAP_HEADER_LEN",
    "Access",
    "Action",
    "Adu",
    "FrameBuffer",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "Table",
    "encode_adu",
    *_pdu_all,
]
