"""Black-box fuzzing of a running mbsec (issue 10, item 5). Not run in CI (the parsers'
coverage-guided targets in fuzz/ are; tests/test_fuzz_targets.py).

One ``mbsec serve`` (the benchmark policy of mbsec_stack.py: operators may read holding
registers 0-999 of unit 1, nothing else), a strict PLC behind it, and for ``--seconds``:

* ``--fuzzers`` processes, each with an operator certificate over mutual TLS, send mutated
  ADUs: valid requests of many function codes (allowed and denied), then 1-4 mutations each
  (bit flips, random bytes, insertions, deletions, a random MBAP length, truncation,
  concatenation, pure garbage), written in random splits. Every byte mbsec sends back must be a
  well-formed response ADU (protocol id 0, MBAP length 3..254, the function echoed or an
  exception with a known code). When mbsec closes the connection (broken framing), the fuzzer
  reconnects.
* one legitimate client polls FC03 every 20 ms and checks every reply (values, transaction id);
  any error, exception or timeout (5 s) is counted.
* the PLC asserts that nothing malformed and nothing the policy denies reaches it: every ADU it
  gets must frame, parse (mbsec.modbus.parse_request) and be an FC03 of unit 1 within 0-999.

Printed: inputs sent, reconnects, replies checked, and every violation; exit 1 on any.

    .venv/bin/python benchmarks/fuzz_proxy.py --seconds 300
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import random
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mbsec_stack import Pki, fc03, make_pki, mbplc_value, mbsec_serve, write_config

from mbsec.modbus import RemoteProtocolError, parse_request
from mbsec.modbus.messages import ReadHoldingRegistersRequest

SEEDS = [bytes.fromhex(h) for h in (
    "0300000001", "030064000a", "030000007d", "0303e70001", "0303e80001",
    "0400000001", "0100000010", "050010ff00", "0600640123", "0f0013000a02cd01",
    "1000640002040001000a", "16000400120025", "17000300060008000306000a000b000c",
    "2b0e0100", "0800001234", "07", "11", "180004", "41010203",
)]
EXCEPTION_CODES = {1, 2, 3, 4, 5, 6, 8, 10, 11}


# -- the strict PLC --------------------------------------------------------------------------


class StrictPlc:
    """Answers FC03 with mbplc's values; records anything that should never reach a PLC."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.violations: list[str] = []
        self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _bad(self, msg: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(msg)

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 7:
                    tid, pid, length, unit = struct.unpack_from(">HHHB", buf)
                    if pid != 0 or not 2 <= length <= 254:
                        self._bad(f"malformed MBAP header reached the PLC: {buf[:7].hex()}")
                        return
                    if len(buf) < 6 + length:
                        break
                    pdu, buf = buf[7 : 6 + length], buf[6 + length :]
                    self.requests += 1
                    try:
                        req = parse_request(pdu)
                    except RemoteProtocolError as exc:
                        self._bad(f"invalid PDU reached the PLC ({exc.reason}): {pdu.hex()}")
                        continue
                    if (not isinstance(req, ReadHoldingRegistersRequest) or unit != 1
                            or req.address + req.count > 1000):
                        self._bad(f"a request the policy denies reached the PLC: {req!r}")
                        continue
                    values = [mbplc_value(a) for a in range(req.address,
                                                             req.address + req.count)]
                    body = bytes((3, 2 * req.count)) + struct.pack(f">{req.count}H", *values)
                    with contextlib.suppress(OSError):
                        conn.sendall(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)


# -- mutation ------------------------------------------------------------------------------


def mutate(rng: random.Random) -> bytes:
    if rng.random() < 0.05:
        return rng.randbytes(rng.randint(1, 300))
    pdu = rng.choice(SEEDS)
    adu = bytearray(struct.pack(">HHHB", rng.randrange(65536), 0, len(pdu) + 1,
                                rng.choice((1, 1, 1, 0, 2, 255))) + pdu)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and adu:
            i = rng.randrange(len(adu))
            adu[i] ^= 1 << rng.randrange(8)
        elif op == 1 and adu:
            adu[rng.randrange(len(adu))] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(len(adu) + 1)
            adu[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and len(adu) > 1:
            i = rng.randrange(len(adu))
            del adu[i : i + rng.randint(1, 4)]
        elif op == 4 and len(adu) >= 6:
            adu[4:6] = struct.pack(">H", rng.choice((0, 1, 2, 3, 253, 254, 255, 256,
                                                     rng.randrange(65536))))
        elif op == 5:
            del adu[rng.randint(1, max(1, len(adu))) :]
        elif op == 6:
            other = rng.choice(SEEDS)
            adu += struct.pack(">HHHB", rng.randrange(65536), 0, len(other) + 1, 1) + other
        elif op == 7 and len(adu) > 8:
            i = rng.randrange(7, len(adu))
            adu[i] = rng.choice((0, 0x7F, 0x80, 0xFF))
    return bytes(adu) or b"\x00"


def check_replies(buf: bytes, violations: list[str]) -> bytes:
    """Validate every complete reply ADU in ``buf``; return what is left (partial)."""
    while len(buf) >= 7:
        _, pid, length, _ = struct.unpack_from(">HHHB", buf)
        if pid != 0 or not 3 <= length <= 254:
            violations.append(f"malformed reply header from mbsec: {buf[:7].hex()}")
            return b""
        if len(buf) < 6 + length:
            break
        pdu, buf = buf[7 : 6 + length], buf[6 + length :]
        if pdu[0] & 0x80 and (len(pdu) != 2 or pdu[1] not in EXCEPTION_CODES):
            violations.append(f"bad exception reply from mbsec: {pdu.hex()}")
    return buf


def fuzzer(port: int, pki: Pki, until: float, seed: int, out: Any) -> None:
    rng = random.Random(seed)
    ctx = pki.client_ctx()
    inputs = reconnects = replies = 0
    violations: list[str] = []
    s: ssl.SSLSocket | None = None
    buf = b""
    while time.monotonic() < until:
        if s is None:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=5)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s = ctx.wrap_socket(raw, server_hostname="localhost")
                reconnects += 1
                buf = b""
            except (OSError, ssl.SSLError) as exc:
                violations.append(f"fuzzer could not connect: {exc}")
                time.sleep(0.1)
                continue
        data = mutate(rng)
        inputs += 1
        try:
            pos = 0
            while pos < len(data):
                step = rng.choice((len(data), 1, rng.randint(1, 16)))
                s.sendall(data[pos : pos + step])
                pos += step
            # read what has come back; every 32nd input wait 20 ms for the replies to catch up
            s.settimeout(0.02 if inputs % 32 == 0 else 0.0)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionResetError("closed by mbsec")
                before = len(buf) + len(chunk)
                buf = check_replies(buf + chunk, violations)
                replies += 1 if before != len(buf) else 0
        except (TimeoutError, ssl.SSLWantReadError, BlockingIOError):
            continue
        except (OSError, ssl.SSLError):
            with contextlib.suppress(OSError):
                s.close()
            s = None
    out.put((inputs, reconnects, replies, violations[:20]))


def legit_client(port: int, pki: Pki, until: float, stats: dict[str, Any]) -> None:
    ctx = pki.client_ctx()
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                        server_hostname="localhost")
    s.settimeout(5)
    tid = 0
    while time.monotonic() < until:
        tid = (tid + 1) & 0xFFFF
        address = (tid * 13) % 990
        try:
            s.sendall(fc03(tid, address, 10))
            reply = b""
            while len(reply) < 29:
                chunk = s.recv(29 - len(reply))
                if not chunk:
                    raise ConnectionError("closed")
                reply += chunk
        except (OSError, ConnectionError) as exc:
            stats["errors"].append(f"legit client: {type(exc).__name__} {exc}")
            return
        want = struct.pack(">HHHBBB", tid, 0, 23, 1, 3, 20) + struct.pack(
            ">10H", *(mbplc_value(a) for a in range(address, address + 10)))
        if reply != want:
            stats["errors"].append(f"legit client: wrong reply {reply.hex()}")
        stats["ok"] += 1
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--fuzzers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what we started on kill
    plc = StrictPlc()
    with tempfile.TemporaryDirectory(prefix="fl-fuzzproxy-") as tmp:
        work = Path(tmp)
        pki = make_pki(work)
        cfg, port = write_config(work, pki, "127.0.0.1", plc.port,
                                 limits="max_per_identity = 64", log_file="/dev/null")
        with mbsec_serve(cfg, port) as proc:
            until = time.monotonic() + args.seconds
            out: Any = mp.Queue()
            procs = [mp.Process(target=fuzzer, args=(port, pki, until, args.seed + i, out))
                     for i in range(args.fuzzers)]
            for pr in procs:
                pr.start()
            stats: dict[str, Any] = {"ok": 0, "errors": []}
            legit = threading.Thread(target=legit_client, args=(port, pki, until, stats))
            legit.start()
            results = [out.get() for _ in procs]
            for pr in procs:
                pr.join()
            legit.join()
            alive = proc.poll() is None
    inputs = sum(r[0] for r in results)
    violations = [v for r in results for v in r[3]] + plc.violations + stats["errors"]
    if not alive:
        violations.append("mbsec exited during the run")
    print(f"inputs: {inputs} mutated ADUs in {args.seconds:g} s "
          f"({inputs / args.seconds:.0f}/s, {args.fuzzers} fuzzers)")
    print(f"fuzzer connections: {sum(r[1] for r in results)}, reply reads checked: "
          f"{sum(r[2] for r in results)}")
    print(f"requests that reached the PLC: {plc.requests} (all framed, valid and allowed: "
          f"{'yes' if not plc.violations else 'NO'})")
    print(f"legitimate client: {stats['ok']} replies checked, {len(stats['errors'])} errors")
    print(f"mbsec alive at the end: {alive}")
    for v in violations[:30]:
        print("VIOLATION:", v)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
