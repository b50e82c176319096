"""The userspace lossy link of benchmarks/lossy_link.py really loses packets: TCP through it
retransmits (counted from TCP_INFO), nothing arrives damaged, and a per-route ``rto_min`` set
inside the namespace is what the sockets use. Needs root (namespaces, TUN, veth): fails
rather than skips when CI=true."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from conftest import fail_or_skip
from lossy_link import LossyLink, missing_requirements, tcp_rto_us, tcp_total_retrans

pytestmark = pytest.mark.slow

ECHO = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(({ip!r}, 1502)); s.listen()\n"
    "c, _ = s.accept()\n"
    "while d := c.recv(4096): c.sendall(d)\n"
)


@pytest.fixture(autouse=True)
def _root_features() -> None:
    missing = missing_requirements()
    if missing:
        fail_or_skip(f"the lossy link needs {', '.join(missing)}")


def connect(ip: str) -> socket.socket:
    deadline = time.monotonic() + 10
    while True:
        try:
            s = socket.create_connection((ip, 1502), timeout=20)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def echo_round_trips(s: socket.socket, n: int) -> None:
    for i in range(n):
        msg = i.to_bytes(4, "big") * 3
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            chunk = s.recv(100)
            assert chunk, "connection closed"
            got += chunk
        assert got == msg


@pytest.fixture
def lossy() -> Iterator[LossyLink]:
    with LossyLink(loss=0.15, seed=7) as link:
        link.set_rto_min(20)  # recover in tens of ms, not 200 ms per loss: a fast test
        link.spawn([sys.executable, "-c", ECHO.format(ip=link.plc_ip)])
        yield link


def test_loss_makes_tcp_retransmit(lossy: LossyLink) -> None:
    s = connect(lossy.plc_ip)
    with s:
        echo_round_trips(s, 150)
        retrans = tcp_total_retrans(s)
        rto = tcp_rto_us(s)
    c = lossy.counters()
    assert c["to_plc_dropped"] > 0 and c["from_plc_dropped"] > 0, c
    share = c["to_plc_dropped"] / (c["to_plc_dropped"] + c["to_plc_forwarded"])
    assert 0.05 < share < 0.3, c
    assert retrans > 0, "packets were dropped but the client never retransmitted"
    assert rto < 150_000, f"rto_min 20ms on the route, yet the socket's RTO is {rto} us"


def test_no_loss_no_retransmission() -> None:
    with LossyLink(loss=0.0) as link:
        link.spawn([sys.executable, "-c", ECHO.format(ip=link.plc_ip)])
        s = connect(link.plc_ip)
        with s:
            echo_round_trips(s, 50)
            # a tail loss probe can fire spuriously when the box stalls the forwarder for a
            # few ms (srtt is ~0.2 ms here): a handful, never one per round trip
            assert tcp_total_retrans(s) <= 5
            assert tcp_rto_us(s) >= 200_000  # the kernel's default minimum, no route setting
        c = link.counters()
        assert c["to_plc_dropped"] == c["from_plc_dropped"] == 0
        assert c["to_plc_forwarded"] >= 50 and c["from_plc_forwarded"] >= 50, c


def test_teardown_leaves_nothing() -> None:
    with LossyLink(loss=0.0) as link:
        ns = link.ns
        names = [f"fl-v0-{link.k}", f"fl-t0-{link.k}"]
    assert ns not in os.popen("ip netns list").read().split()
    links = os.popen("ip -o link show").read()
    for name in names:
        assert f" {name}:" not in links and f" {name}@" not in links
