"""Names a policy file may use for function codes, presets, FC08 sub-functions and FC43 MEI types.

Function and MEI names come from the Modbus core (one name table in the project); this module
adds only what is policy vocabulary: presets, the function-code groups the validator reasons
about, and the names of FC08 diagnostics sub-functions.
"""

from __future__ import annotations

from mbsec.modbus.pdu import FUNCTION_NAMES, MEI_NAMES, WRITE_FUNCTIONS

__all__ = [
    "ADDRESSED_FUNCTIONS",
    "COIL_WRITE_FUNCTIONS",
    "DIAGNOSTICS",
    "ENCAPSULATED",
    "FUNCTION_CODES",
    "FUNCTION_NAMES",
    "MEI_CODES",
    "MEI_NAMES",
    "PRESETS",
    "READ_FUNCTIONS",
    "REGISTER_VALUE_FUNCTIONS",
    "SUBFUNCTION_CODES",
    "SUBFUNCTION_NAMES",
    "WRITE_FUNCTIONS",
    "function_label",
]

DIAGNOSTICS = 8
ENCAPSULATED = 43

FUNCTION_CODES: dict[str, int] = {name: code for code, name in FUNCTION_NAMES.items()}
MEI_CODES: dict[str, int] = {name: code for code, name in MEI_NAMES.items()}

#: Functions whose request carries a read range (Access.read).
READ_FUNCTIONS: frozenset[int] = frozenset({1, 2, 3, 4, 20, 23, 24})
#: Functions with an address range at all (read or write).
ADDRESSED_FUNCTIONS: frozenset[int] = READ_FUNCTIONS | WRITE_FUNCTIONS
#: Functions whose written values are register values a `values:` range can bound.
REGISTER_VALUE_FUNCTIONS: frozenset[int] = frozenset({6, 16, 23})
#: Functions that write coils (their values are 0/1, bounded by `coil_states:`).
COIL_WRITE_FUNCTIONS: frozenset[int] = frozenset({5, 15})

#: FC08 sub-functions (Modbus Application Protocol v1.1b3, 6.8.1).
SUBFUNCTION_NAMES: dict[int, str] = {
    0: "return_query_data",
    1: "restart_communications_option",
    2: "return_diagnostic_register",
    3: "change_ascii_input_delimiter",
    4: "force_listen_only_mode",
    10: "clear_counters_and_diagnostic_register",
    11: "return_bus_message_count",
    12: "return_bus_communication_error_count",
    13: "return_bus_exception_error_count",
    14: "return_server_message_count",
    15: "return_server_no_response_count",
    16: "return_server_nak_count",
    17: "return_server_busy_count",
    18: "return_bus_character_overrun_count",
    20: "clear_overrun_counter_and_flag",
}
SUBFUNCTION_CODES: dict[str, int] = {name: code for code, name in SUBFUNCTION_NAMES.items()}

#: A preset expands to (function code, MEI type or None for "any") pairs.
_READ_ONLY: tuple[tuple[int, int | None], ...] = (
    (1, None), (2, None), (3, None), (4, None), (7, None), (11, None), (12, None),
    (17, None), (20, None), (24, None), (ENCAPSULATED, 14),
)
PRESETS: dict[str, tuple[tuple[int, int | None], ...]] = {
    "read-only": _READ_ONLY,
    "read-write": _READ_ONLY + tuple((c, None) for c in (5, 6, 15, 16, 21, 22, 23)),
    "any": tuple((c, None) for c in range(1, 128)),
}


def function_label(code: int, sub: int | None = None) -> str:
    """Human label used by explain/diff/test output: ``read_holding_registers (3)``."""
    if code == ENCAPSULATED and sub is not None:
        return f"{MEI_NAMES.get(sub, 'mei')} (43/{sub})"
    if code == DIAGNOSTICS and sub is not None:
        return f"diagnostics/{SUBFUNCTION_NAMES.get(sub, sub)} (8/{sub})"
    return f"{FUNCTION_NAMES.get(code, 'function')} ({code})"
