"""Micro-benchmark of the Modbus core's hot path (what the proxy runs for every request).

Run: ``.venv/bin/python benchmarks/bench_modbus.py [--rounds N]``. Prints the median
(and minimum) nanoseconds per operation over N rounds of a fixed-size timing loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

from mbsec.modbus import (
    FrameBuffer,
    ReadHoldingRegistersRequest,
    ReadHoldingRegistersResponse,
    encode_adu,
    encode_request,
    encode_response,
    parse_request,
    parse_response,
)

REQUEST = ReadHoldingRegistersRequest(100, 125)
REQUEST_ADU = encode_adu(0x1234, 1, encode_request(REQUEST))
RESPONSE_PDU = encode_response(ReadHoldingRegistersResponse(tuple(range(125))))


def frame_and_parse_request() -> None:
    fb = FrameBuffer()
    fb.receive_data(REQUEST_ADU)
    adu = fb.next_frame()
    assert adu is not None
    parse_request(adu.pdu)


def access() -> None:
    REQUEST.access()


def parse_fc03_response() -> None:
    parse_response(REQUEST, RESPONSE_PDU)


def encode_fc03_response_adu() -> None:
    encode_adu(0x1234, 1, RESPONSE_PDU)


def steady_state_connection() -> Callable[[], None]:
    """One FrameBuffer reused across requests, as a session does."""
    fb = FrameBuffer()

    def run() -> None:
        fb.receive_data(REQUEST_ADU)
        adu = fb.next_frame()
        assert adu is not None
        req = parse_request(adu.pdu)
        req.access()
        parse_response(req, RESPONSE_PDU)
        encode_adu(adu.transaction_id, adu.unit_id, RESPONSE_PDU)

    return run


CASES: list[tuple[str, Callable[[], None]]] = [
    ("FrameBuffer + parse_request (FC03, new buffer)", frame_and_parse_request),
    ("request.access()", access),
    ("parse_response (FC03, 125 registers)", parse_fc03_response),
    ("encode_adu (FC03 response, 250-byte PDU)", encode_fc03_response_adu),
    ("whole request/response, reused buffer", steady_state_connection()),
]


def pymodbus_cases() -> list[tuple[str, Callable[[], None]]]:
    """The same two parses done by pymodbus, for scale (skipped if it is not installed)."""
    try:
        from pymodbus.framer import FramerSocket
        from pymodbus.pdu import DecodePDU
    except ImportError:
        return []
    server, client = DecodePDU(is_server=True), DecodePDU(is_server=False)
    framer = FramerSocket(server)

    def pm_request() -> None:
        framer.handleFrame(REQUEST_ADU, 0, 0)

    def pm_response() -> None:
        client.decode(RESPONSE_PDU)

    return [
        ("pymodbus FramerSocket.handleFrame (FC03 request)", pm_request),
        ("pymodbus DecodePDU.decode (FC03, 125 registers)", pm_response),
    ]


def measure(fn: Callable[[], None], loops: int, rounds: int) -> tuple[float, float]:
    """(median, min) ns/op over ``rounds``; min shows the cost without scheduler noise."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter_ns() - start) / loops)
    return statistics.median(samples), min(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", type=int, default=20000)
    parser.add_argument("--no-pymodbus", action="store_true", help="skip the comparison rows")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.loops} loops")
    print(f"{'operation':<50} {'median':>9} {'min':>9}  (ns/op)")
    for name, fn in CASES + ([] if args.no_pymodbus else pymodbus_cases()):
        fn()  # warm up, and fail fast if the case is broken
        median, best = measure(fn, args.loops, args.rounds)
        print(f"{name:<50} {median:>9.0f} {best:>9.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
