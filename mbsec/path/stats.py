"""What a scrape learns from the request path: per PLC target its state, per link its
``TCP_INFO``. Collected by :meth:`mbsec.path.epoll.DataPlane.stats_threadsafe` in the
data-plane thread, the only thread that touches a PLC socket (a file descriptor read from
another thread could be closed and reused for another socket meanwhile), and handed to the
scrape as plain data (raw ``TCP_INFO`` bytes, decoded by :mod:`mbsec.tcp_info`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mbsec import tcp_info
from mbsec.path.link import IDLE, OPEN, STATE_NAMES, Link


@dataclass(frozen=True, slots=True)
class LinkStats:
    index: int
    state: str  # idle | connecting | open
    tcp: bytes | None  # raw TCP_INFO of an open link's socket


@dataclass(frozen=True, slots=True)
class TargetStats:
    name: str
    up: bool  # False after a failed connection attempt, until one succeeds
    backoff: bool  # no link open or connecting, and the reconnect backoff has not passed
    in_flight: int
    overdue: int
    queued: int
    links: tuple[LinkStats, ...]


def collect(targets: Any, links: Mapping[Link, Any], now: float) -> list[TargetStats]:
    """``targets``: the routed :class:`~mbsec.path.target.Target` objects (a target a reload
    retired is finishing its requests under the same name and is left out); ``links``: the
    driver's open sockets (``LinkIO`` with a ``sock``) by link."""
    out: list[TargetStats] = []
    for target in targets:
        per_link: list[LinkStats] = []
        in_flight = overdue = 0
        for link in target.links:
            in_flight += len(link.pending)
            overdue += len(link.overdue)
            raw = None
            io = links.get(link)
            sock = getattr(io, "sock", None) if io is not None else None
            if link.state == OPEN and sock is not None and getattr(io, "connected", False):
                raw = tcp_info.read(sock)
            per_link.append(LinkStats(link.index, STATE_NAMES[link.state], raw))
        backoff = now < target.retry_at and all(lk.state == IDLE for lk in target.links)
        out.append(TargetStats(target.target.name, bool(target.up), backoff, in_flight,
                               overdue, target.wait.count, tuple(per_link)))
    return out
