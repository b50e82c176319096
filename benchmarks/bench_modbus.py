"""Micro-benchmark of the Modbus core's hot path (what the proxy runs for every request).

Run: ``.venv/bin/python benchmarks/bench_modbus.py [--rounds N]``. Prints the median
nanoseconds per operation over N rounds of a fixed-size timing loop.
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


def measure(fn: Callable[[], None], loops: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter_ns() - start) / loops)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loops", type=int, default=20000)
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {args.rounds} rounds x {args.loops} loops")
    for name, fn in CASES:
        fn()  # warm up, and fail fast if the case is broken
        ns = measure(fn, args.loops, args.rounds)
        print(f"{name:<50} {ns:>9.0f} ns/op")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
