"""Third review: reload waiting for the thread data plane (6f71084) and per-worker metrics
endpoints (8dc0bf1). Each test failed on the reviewed code because of the bug its docstring
names; they stay as regression tests."""

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
def test_a_malformed_metrics_host_is_one_error_line(
    pki: Pki, tmp_path: Path, workers: int
) -> None:
    """Bug: a typo in ``metrics.listen``'s host (``mgmt..example``, an empty DNS label) makes
    ``getaddrinfo`` raise ``UnicodeError`` (a ValueError, not an OSError). With workers > 1
    ``bind_metrics_sockets`` (server.py ``_addresses``) lets it out of ``serve_main``, which
    only catches OSError (cli_proxy.py); with workers = 1 ``_first_oserror`` finds no OSError
    and re-raises. Either way a traceback instead of one error line."""
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
    """Bug: ``_addresses`` claims to bind "as trio binds them", but ``bind_metrics_sockets``
    (server.py, via ``_listening_socket``) fails the whole start when one address family the
    host resolves to cannot be used (EAFNOSUPPORT: an IPv4-only kernel, ipv6.disable=1, where
    /etc/hosts still maps ``localhost`` to ::1). trio.open_tcp_listeners, used by the
    workers = 1 path, skips such a family, so ``metrics.listen = "localhost:9802"`` works with
    one worker and fails to start with two ("Address family not supported by protocol")."""
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


@pytest.mark.parametrize("data_plane", ["thread"], indirect=True)
async def test_single_process_metrics_on_all_addresses(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: ``metrics.listen = ":9802"`` (``:port``, all addresses, as ``parse_hostport`` and
    the listen row define it, and as the workers > 1 path binds it: ``host or None``) fails
    with workers = 1: ``Proxy._serve`` (server.py, ``serve_metrics(self.metrics, host, ...)``)
    hands trio the empty host, and ``getaddrinfo("")`` is "Name or service not known". The
    same configuration starts with two workers and not with one. (Pre-existing in the
    workers = 1 path; the new per-worker path made the two disagree.) The test binds only
    127.0.0.1: it checks that the host given to trio resolves, then binds loopback."""
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
