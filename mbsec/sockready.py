"""Whether a socket has bytes (or an EOF) waiting, asked without waiting.

The accept loop uses it to tell a connection that has spoken (its ClientHello is there) from a
silent one before admission decides (mbsec/server.py); the session uses it to skip its wait for
the first byte when that byte is already there: one ``poll`` instead of a round trip through
trio's epoll loop (registration, wait, reschedule) per connection (benchmarks/README.md,
"Issue 10 item 3: handshake rate rounds").
"""

from __future__ import annotations

import select
from typing import Any

__all__ = ["readable_now"]


def readable_now(sock: Any) -> bool:
    """Bytes (or an EOF) are waiting on the socket, without waiting (poll, not select: file
    descriptors above 1023 are common under a flood)."""
    p = select.poll()
    try:
        p.register(sock.fileno(), select.POLLIN)
        return bool(p.poll(0))
    except (OSError, ValueError):
        return False
