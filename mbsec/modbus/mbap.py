"""MBAP framing for Modbus/TCP: bytes in any split -> whole ADUs out, no I/O.

The 7-byte header is validated as soon as it is complete and before any body byte is
consumed, so a peer cannot make us wait for (or buffer) a body whose length is already
known to be invalid. The buffer is capped: a caller that feeds data without pulling
frames gets a ``buffer_overflow`` error instead of unbounded memory growth.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from typing import ClassVar, Final, final

from .errors import Action, LocalProtocolError, RemoteProtocolError

#: transaction id (2) + protocol id (2) + length (2) + unit id (1)
MBAP_HEADER_LEN: Final = 7
#: the largest ADU: header + 253-byte PDU
MAX_ADU: Final = 260
#: the MBAP length field counts the unit id and the PDU: 1 + (1..253)
MIN_LENGTH_FIELD: Final = 2
MAX_LENGTH_FIELD: Final = 254
MAX_PDU: Final = 253
#: data accepted by :meth:`FrameBuffer.receive_data` but not yet pulled by ``next_frame``
DEFAULT_MAX_PENDING: Final = 64 * 1024



@final
class Adu:
    """One Modbus/TCP application data unit; ``pdu`` starts with the function code.

    Immutable, compared and hashed by its fields, as the frozen dataclass it was; written out
    so that mypyc (setup.py) compiles it to a native class with a compiled ``__init__``: two
    are made per request (the request and the PLC's reply), and a frozen dataclass's
    generated ``__init__`` stays interpreted (benchmarks/README.md, issue 14 round 8 of
    2026-12-07).
    """

    __slots__ = ("pdu", "transaction_id", "unit_id")
    __match_args__: ClassVar[tuple[str, ...]] = ("transaction_id", "unit_id", "pdu")
    transaction_id: int
    unit_id: int
    pdu: bytes

    def __init__(self, transaction_id: int, unit_id: int, pdu: bytes) -> None:
        object.__setattr__(self, "transaction_id", transaction_id)
        object.__setattr__(self, "unit_id", unit_id)
        object.__setattr__(self, "pdu", pdu)

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not Adu:
            return NotImplemented
        return (self.transaction_id == other.transaction_id and self.unit_id == other.unit_id
                and self.pdu == other.pdu)

    def __hash__(self) -> int:
        return hash((self.transaction_id, self.unit_id, self.pdu))

    def __repr__(self) -> str:
        return (f"Adu(transaction_id={self.transaction_id!r}, unit_id={self.unit_id!r}, "
                f"pdu={self.pdu!r})")


class FrameBuffer:
    """Reassembles ADUs from a byte stream (h11-style ``receive_data`` / ``next_frame``).

    Once a framing error has been raised the stream cannot be resynchronised (Modbus/TCP has
    no frame delimiter), so every later ``next_frame`` call raises the same error again.
    """

    __slots__ = ("_buf", "_error", "_max_pending", "_pos")

    def __init__(self, *, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if max_pending < MAX_ADU:
            raise ValueError(f"max_pending must be at least {MAX_ADU}")
        self._buf: bytes = b""
        self._pos = 0  # bytes of _buf already returned as frames
        self._max_pending = max_pending
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as part of a frame."""
        return len(self._buf) - self._pos

    def incomplete(self) -> bool:
        """True when bytes are buffered that do not yet form a whole frame (a request still
        arriving), False when nothing is buffered or the next frame is complete."""
        avail = len(self._buf) - self._pos
        if avail == 0 or self._error is not None:
            return False
        if avail < MBAP_HEADER_LEN:
            return True
        buf = self._buf
        pos = self._pos
        return avail < 6 + ((buf[pos + 4] << 8) | buf[pos + 5])

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the peer; raises ``buffer_overflow`` past the pending cap."""
        if not data:
            return
        if self._pos == len(self._buf):
            # Common case: everything before was consumed; keep the chunk without copying.
            self._buf = data if type(data) is bytes else bytes(data)
        else:
            self._buf = self._buf[self._pos :] + bytes(data)
        self._pos = 0
        if len(self._buf) > self._max_pending:
            self._buf = b""  # drop it: the connection is going away anyway
            self._error = RemoteProtocolError(
                f"more than {self._max_pending} bytes pending without a complete frame pulled",
                reason="buffer_overflow",
                action=Action.CLOSE,
            )
            raise self._error

    def next_frame(self) -> Adu | None:
        """Return the next complete ADU, or ``None`` if more bytes are needed."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < MBAP_HEADER_LEN:
            return None
        # the header by its bytes: native integers once compiled, where ``struct.unpack_from``
        # gave objects and every comparison and sum on them was a generic call (7.5 % of the
        # data-plane thread at 10 connections x depth 4: benchmarks/README.md, round 10)
        tid = (buf[pos] << 8) | buf[pos + 1]
        pid = (buf[pos + 2] << 8) | buf[pos + 3]
        length = (buf[pos + 4] << 8) | buf[pos + 5]
        unit = buf[pos + 6]
        if pid != 0:
            self._error = RemoteProtocolError(
                f"MBAP protocol id {pid} is not 0 (Modbus)",
                reason="bad_protocol_id",
                action=Action.CLOSE,
            )
            raise self._error
        if length < MIN_LENGTH_FIELD or length > MAX_LENGTH_FIELD:
            self._error = RemoteProtocolError(
                f"MBAP length {length} outside {MIN_LENGTH_FIELD}..{MAX_LENGTH_FIELD}",
                reason="bad_length",
                action=Action.CLOSE,
            )
            raise self._error
        end = pos + 6 + length
        if len(buf) < end:
            return None
        self._pos = end
        if end == len(buf):
            self._buf = b""
            self._pos = 0
        return Adu(tid, unit, buf[pos + MBAP_HEADER_LEN : end])


def encode_adu(transaction_id: int, unit_id: int, pdu: bytes) -> bytes:
    """Prefix ``pdu`` with its MBAP header; raises ``LocalProtocolError`` on bad fields.

    The header is one ``int.to_bytes(7, "big")``, which mypyc compiles to a native call,
    where ``struct.pack`` was a generic call with its format parsed per request (issue 14);
    the fields are range-checked first, as ``struct`` did (tests/unit/test_mbap.py checks the
    bytes against ``struct.pack`` for any fields)."""
    n = len(pdu)
    if n < 1 or n > MAX_PDU:
        raise LocalProtocolError(
            f"PDU length {n} outside 1..{MAX_PDU}", reason="bad_pdu_length"
        )
    if not (0 <= transaction_id <= 0xFFFF and 0 <= unit_id <= 0xFF):
        raise LocalProtocolError(
            f"transaction id {transaction_id!r} or unit id {unit_id!r} out of range",
            reason="bad_header_field",
        )
    # transaction id, protocol id 0, length (unit id + PDU), unit id: 2 + 2 + 2 + 1 bytes
    return ((transaction_id << 40) | ((n + 1) << 8) | unit_id).to_bytes(7, "big") + pdu
