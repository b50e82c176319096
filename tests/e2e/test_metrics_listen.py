"""Where the /metrics endpoint listens (``metrics.listen``): the same address behaves the same
with one worker and with several, and a bad one is one error line."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Pki, StartProxy, http_get, serve_config

from mbsec.server import bind_metrics_sockets, close_all
from mbsec.settings import load_settings


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_a_malformed_metrics_host_prints_one_error_line(
    pki: Pki, tmp_path: Path, workers: int
) -> None:
    """``metrics.listen = "mgmt..example:9802"`` (an empty DNS label): ``getaddrinfo`` would
    raise UnicodeError (a ValueError, not an OSError). ``mbsec serve`` exits 1 with one
    ``error: <config>: ...`` line, with one worker and with two. Regression: with workers > 1
    it escaped ``serve_main`` (which caught OSError only), with one worker it was re-raised:
    a traceback either way."""
    cfg = serve_config(pki, tmp_path, 1502, workers=workers,
                       extra='[metrics]\nlisten = "mgmt..example:9802"\n')
    res = subprocess.run([sys.executable, "-m", "mbsec.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: "), res.stderr


def test_worker_metrics_sockets_skip_an_unsupported_address_family(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-worker metrics sockets are bound as trio binds them for one worker: an address
    family the host resolves to but cannot use (EAFNOSUPPORT: an IPv4-only kernel,
    ipv6.disable=1, where /etc/hosts still maps ``localhost`` to ::1) is skipped, so
    ``metrics.listen = "localhost:..."`` starts with two workers as it does with one.
    Regression: ``bind_metrics_sockets`` failed the whole start ("Address family not
    supported by protocol")."""
    cfg = serve_config(pki, tmp_path, 1502, workers=2,
                       extra='[metrics]\nlisten = "localhost:0"\n')
    settings = load_settings(cfg)
    real_getaddrinfo = socket.getaddrinfo
    real_socket = socket.socket

    def getaddrinfo(host: Any, port: Any, *args: Any, **kw: Any) -> Any:
        if host == "localhost":  # Debian's /etc/hosts: ::1 and 127.0.0.1
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
            ]
        return real_getaddrinfo(host, port, *args, **kw)

    class Ipv4OnlySocket(real_socket):  # type: ignore[misc, valid-type]
        def __init__(self, family: Any = -1, *args: Any, **kw: Any) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
            super().__init__(family, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "socket", Ipv4OnlySocket)

    async def single_process() -> int:  # what workers = 1 does with the same address
        listeners = await trio.open_tcp_listeners(0, host="localhost")
        for ln in listeners:
            await ln.aclose()
        return len(listeners)

    assert trio.run(single_process) == 1
    per_worker = bind_metrics_sockets(settings, 2)
    try:
        assert [len(socks) for socks in per_worker] == [1, 1]
    finally:
        close_all(per_worker)


async def test_metrics_on_all_addresses_works_with_one_worker(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``metrics.listen = ":9802"`` (``:port``, all addresses, as ``parse_hostport`` and the
    workers > 1 path read it) starts with one worker too. Regression: the one-worker path
    handed trio the empty host, and ``getaddrinfo("")`` is "Name or service not known". The
    test binds only 127.0.0.1: it checks that the host given to trio resolves, then binds
    loopback."""
    real = trio.open_tcp_listeners

    async def open_tcp_listeners(port: int, *, host: Any = None, **kw: Any) -> Any:
        await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                      flags=socket.AI_PASSIVE)  # raises as trio would
        return await real(port, host="127.0.0.1", **kw)

    monkeypatch.setattr(trio, "open_tcp_listeners", open_tcp_listeners)
    h = await start_proxy(1502, settings={"metrics": {"listen": ":0"}})
    assert h.proxy.metrics_port
    assert (await http_get(h.proxy.metrics_port, "/healthz"))[0] == "HTTP/1.1 200 OK"
    h.proxy.request_shutdown()
