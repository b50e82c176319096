"""The ``/metrics`` and ``/healthz`` HTTP endpoint, in trio (kept apart from :mod:`mbsec.metrics`
so that the request-path core can count without importing trio)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from mbsec.metrics import Metrics

if TYPE_CHECKING:
    from mbsec.expiry import Expiry
    from mbsec.path.epoll import DataPlane
    from mbsec.path.stats import TargetStats

#: seconds a scrape waits for the data-plane thread's figures (a wedged loop, a bug that stops
#: the proxy anyway, costs the per-PLC series of that scrape, not the scrape)
STATS_TIMEOUT = 1.0

# -- HTTP endpoint --------------------------------------------------------------------------

MAX_REQUEST_HEAD = 8192


def _response(status: str, body: bytes, ctype: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


async def data_plane_stats(plane: DataPlane) -> list[TargetStats] | None:
    """The request path's per-PLC figures, collected in the data-plane thread (which owns the
    PLC sockets, see :meth:`DataPlane.stats_threadsafe`) and handed back to trio; None when
    the plane has stopped or did not answer within :data:`STATS_TIMEOUT`."""
    token = trio.lowlevel.current_trio_token()
    got: list[list[TargetStats]] = []
    ready = trio.Event()

    def done(stats: list[TargetStats]) -> None:  # in the data-plane thread
        got.append(stats)
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(ready.set)

    if not plane.stats_threadsafe(done):
        return None
    with trio.move_on_after(STATS_TIMEOUT):
        await ready.wait()
    return got[0] if got else None


async def scrape_proxy(metrics: Metrics, plane: DataPlane, expiry: Expiry | None) -> bytes:
    """One ``/metrics`` answer of the proxy: its counters, the per-PLC figures, the expiry
    gauges and the process series (:func:`mbsec.metrics_export.render`)."""
    from mbsec.metrics_export import render

    stats = await data_plane_stats(plane)
    return render(metrics, upstreams=stats, expiry=expiry, process=True)


async def _handle_http(
    stream: trio.abc.Stream, metrics: Metrics, healthy: Callable[[], bool],
    scrape: Callable[[], Awaitable[bytes]] | None = None,
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
                try:
                    body = await scrape() if scrape is not None else metrics.render().encode()
                except Exception as exc:  # a bug costs this scrape, never the proxy
                    out = _response("500 Internal Server Error",
                                    f"scrape failed: {type(exc).__name__}\n".encode())
                else:
                    out = _response("200 OK", body, "text/plain; version=0.0.4; charset=utf-8")
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
    scrape: Callable[[], Awaitable[bytes]] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` and ``/healthz`` until cancelled; ``task_status`` gets the bound port.
    ``sockets``: already listening (a worker's, bound by the main process) instead of
    ``host:port``. ``scrape``: what ``/metrics`` answers (default: ``metrics`` alone)."""
    if sockets:
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _handle_http(stream, metrics, healthy, scrape)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)
