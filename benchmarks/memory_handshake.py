"""One full TLS handshake over memory BIOs, with only the server's calls timed.

Shared by ``bench_handshake.py`` (stdlib ``ssl`` against pyOpenSSL, and the rejection probe)
and ``bench_handshake_rate.py --openssl-only`` (OpenSSL's own server CPU per handshake): both
drive a stdlib client against a server object that moves bytes through its own BIOs, and
count only the server's side. No sockets, no threads.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["HandshakeResult", "MemoryServer", "StdServer", "run_handshake"]

#: flights a handshake may take before it is declared stuck (TLS 1.2 needs 2 round trips)
MAX_ROUNDS = 20


class MemoryServer(Protocol):
    """A server end driven by hand: bytes in, one handshake step, bytes out."""

    def feed(self, data: bytes) -> None: ...

    def step(self) -> bool: ...  # True once the handshake is complete

    def take(self) -> bytes: ...


class StdServer:
    """The stdlib server: ``SSLContext.wrap_bio`` over two ``MemoryBIO``s, as
    :mod:`mbsec.tls_stream` builds it for every connection."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_side=True)

    def step(self) -> bool:
        try:
            self.obj.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False

    def feed(self, data: bytes) -> None:
        if data:
            self.inc.write(data)

    def take(self) -> bytes:
        return self.out.read()

    def peer_der(self) -> bytes | None:
        return self.obj.getpeercert(binary_form=True)


@dataclass
class HandshakeResult:
    ok: bool
    #: time spent in the server's calls (feed, step, take), in the clock's unit
    server_time: float
    server_error: BaseException | None = None
    client_error: str | None = None  # reason of the alert the client received
    server: Any = None
    client: ssl.SSLObject | None = None
    c_in: ssl.MemoryBIO | None = None
    c_out: ssl.MemoryBIO | None = None


def run_handshake(
    server: MemoryServer,
    client_ctx: ssl.SSLContext,
    *,
    clock: Callable[[], float] = time.perf_counter_ns,
    server_errors: tuple[type[BaseException], ...] = (ssl.SSLError,),
    server_hostname: str = "localhost",
) -> HandshakeResult:
    """One full handshake; only the server's calls are timed (with ``clock``: wall
    nanoseconds by default, ``time.thread_time`` for CPU seconds). A server failure among
    ``server_errors`` ends it, and the client then reads the fatal alert OpenSSL wrote. In TLS
    1.3 the client is done before the server has verified it: it learns a rejection from its
    next read, as here."""
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    spent: float = 0
    c_done = s_done = False
    s_err: BaseException | None = None
    c_err: str | None = None
    for _ in range(MAX_ROUNDS):
        if not c_done:
            try:
                client.do_handshake()
                c_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                c_err = exc.reason or str(exc)
                break
        hello = c_out.read()
        t0 = clock()
        server.feed(hello)
        if not s_done:
            try:
                s_done = server.step()
            except server_errors as exc:
                s_err = exc
        back = server.take()
        spent += clock() - t0
        c_in.write(back)
        if s_err is not None:
            try:  # the client reads the fatal alert OpenSSL wrote before it failed
                if not c_done:
                    client.do_handshake()
                client.read(1)
            except ssl.SSLError as exc:
                c_err = exc.reason or str(exc)
            break
        if c_done and s_done:
            break
    return HandshakeResult(s_done and c_done and s_err is None and c_err is None, spent, s_err,
                           c_err, server, client, c_in, c_out)
