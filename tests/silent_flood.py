"""A silent flood, run as its own process: TCP connections that never send a ClientHello, each
reconnecting at once when the proxy closes it, from many source addresses in 127.0.0.0/8.

    python -m tests.silent_flood PORT SECONDS ADDRESSES PER_ADDRESS [FIRST_OCTET]

Address ``i`` is ``127.(FIRST_OCTET + i // 200).(i % 200).1``: every address in its own /24,
the worst case for per-prefix limits. Prints one JSON line at the end: connections made,
closed by the proxy, and connects that failed or timed out.
"""

from __future__ import annotations

import errno
import json
import socket
import sys

import trio


def flood_address(i: int, first_octet: int = 20) -> str:
    return f"127.{first_octet + i // 200}.{i % 200}.1"


async def _one(port: int, source: str, stats: dict[str, int]) -> None:
    while True:
        sock = trio.socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((source, 0))
            with trio.move_on_after(3) as cs:
                try:
                    await sock.connect(("127.0.0.1", port))
                except OSError as exc:
                    stats["connect_failed"] += 1
                    if exc.errno == errno.EADDRNOTAVAIL:
                        await trio.sleep(0.05)
                    continue
            if cs.cancelled_caught:
                stats["connect_timeout"] += 1
                continue
            stats["connected"] += 1
            try:
                while await sock.recv(4096):
                    pass  # the proxy sends nothing to a silent peer; an alert at most
            except OSError:
                pass
            stats["closed_by_proxy"] += 1
        finally:
            sock.close()


async def flood(port: int, seconds: float, addresses: int, per_address: int,
                first_octet: int = 20) -> dict[str, int]:
    stats = {"connected": 0, "closed_by_proxy": 0, "connect_failed": 0, "connect_timeout": 0}
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as n:
            for i in range(addresses):
                for _ in range(per_address):
                    n.start_soon(_one, port, flood_address(i, first_octet), stats)
    return stats


def main(argv: list[str]) -> int:
    port, seconds, addresses, per_address = int(argv[0]), float(argv[1]), int(argv[2]), \
        int(argv[3])
    first = int(argv[4]) if len(argv) > 4 else 20
    stats = trio.run(flood, port, seconds, addresses, per_address, first)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
