"""What a request touches, in the terms a policy speaks: tables, ranges, values.

The policy engine never looks at PDUs; it looks at an :class:`Access`, which each typed
request produces once (``request.access()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Table(Enum):
    """The Modbus data model table a request addresses."""

    COILS = "coils"
    DISCRETE_INPUTS = "discrete_inputs"
    HOLDING_REGISTERS = "holding_registers"
    INPUT_REGISTERS = "input_registers"
    FILE_RECORDS = "file_records"
    NONE = "none"  # diagnostics, device identification, opaque function codes


@dataclass(frozen=True, slots=True)
class Access:
    """The policy-relevant facts of one request.

    ``read``/``write`` are ``(start, quantity)`` in 0-based protocol addresses, or ``None``.
    FC23 has both. ``values`` are the register values written (FC06/16/22/23, for FC22 the
    OR mask is not a value: it is reported as ``(and_mask, or_mask)``), or coil states as 0/1
    (FC05/15). ``subfunction`` is the FC08 sub-function or the FC43 MEI type. ``pdu_length``
    is the request PDU size in bytes (function code included).
    """

    function_code: int
    table: Table
    read: tuple[int, int] | None
    write: tuple[int, int] | None
    values: tuple[int, ...]
    subfunction: int | None
    pdu_length: int

    @property
    def is_write(self) -> bool:
        return self.write is not None

    @property
    def quantity(self) -> int:
        """The larger of read and write quantity (0 when neither applies)."""
        r = self.read[1] if self.read else 0
        w = self.write[1] if self.write else 0
        return max(r, w)
