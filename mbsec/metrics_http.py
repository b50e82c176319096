"""The ``/metrics`` and ``/healthz`` HTTP endpoint, in trio (kept apart from :mod:`mbsec.metrics`
so that the request-path core can count without importing trio)."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from mbsec.metrics import Metrics

# -- HTTP endpoint --------------------------------------------------------------------------

MAX_REQUEST_HEAD = 8192


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def _handle_http(
    stream: trio.abc.Stream, metrics: Metrics, healthy: Callable[[], bool]
) -> None:
    buf = b""
    with trio.move_on_after(5):
        try:
            while b"\r\n\r\n" not in buf and len(buf) < MAX_REQUEST_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                buf += chunk
            line = buf.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                out = _response("405 Method Not Allowed", b"GET only\n")
            elif line[1].split("?", 1)[0] == "/metrics":
                out = _response(
                    "200 OK", metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8"
                )
            elif line[1] == "/healthz":
                ok = healthy()
                out = _response("200 OK" if ok else "503 Service Unavailable",
                                b"ok\n" if ok else b"not ready\n")
            else:
                out = _response("404 Not Found", b"try /metrics or /healthz\n")
            await stream.send_all(out)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def serve_metrics(
    metrics: Metrics,
    host: str | None,
    port: int,
    *,
    healthy: Callable[[], bool] = lambda: True,
    sockets: list[socket.socket] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/healthz`` until cancelled; ``task_status`` gets the bound port.
    ``sockets``: already listening (a worker's, bound by the main process) instead of
    ``host:port``."""
    if sockets:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_http(stream, metrics, healthy)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
