"""Sans-IO Modbus/TCP: MBAP framing, typed PDUs, validation. No trio, ssl or socket here.

``from mbsec.modbus import FrameBuffer, parse_request, ...`` is the supported import path;
the submodules are an implementation detail.
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
