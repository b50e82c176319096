"""``mbsec serve`` under systemd's protocols. The notify protocol, as systemd sees it: the
test binds the ``NOTIFY_SOCKET`` datagram socket, starts the real process with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC`` set, and reads what arrives (READY, WATCHDOG, RELOADING, STOPPING), with the
sender's pid from the kernel (``SO_PASSCRED``), as systemd checks ``NotifyAccess=main``.

The watchdog must stop when the data plane is wedged: the test stops the data-plane thread,
and only that thread, with ``ptrace`` (``PTRACE_SEIZE`` + ``PTRACE_INTERRUPT`` stop one thread
of another process; trio's thread keeps running), and sees no ``WATCHDOG=1``, a ``STATUS=``
saying why, ``/healthz`` 503, and a TLS client's request unanswered; once the thread runs
again, all of it comes back. Socket activation: systemd's systemd-socket-activate binds the
port and starts the proxy, which serves that socket.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from conftest import (
    Pki,
    PymodbusPlc,
    ServeProcess,
    TlsClient,
    fail_or_skip,
    http_get,
    mbsec_process,
    read_hr,
    serve_config,
)
from ptrace_helpers import data_plane_thread, thread_stopped

WATCHDOG_USEC = 600_000  # WATCHDOG=1 every 0.3 s


@dataclass
class Message:
    pid: int
    fields: dict[str, str]


class NotifySocket:
    """The service manager's end: an abstract ``SOCK_DGRAM`` socket with ``SO_PASSCRED``."""

    def __init__(self) -> None:
        self.name = f"systemd-ha-notify-{uuid.uuid4().hex[:12]}"
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[Message] = []

    async def bind(self) -> None:
        await self.sock.bind("\0" + self.name)

    @property
    def env(self) -> str:
        return "@" + self.name

    async def receive(self, within: float = 10.0) -> Message:
        with trio.fail_after(within):
            data, anc, _flags, _addr = await self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, blob in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", blob[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        msg = Message(pid, fields)
        self.messages.append(msg)
        return msg

    async def until(self, key: str, within: float = 10.0) -> Message:
        """The next message carrying ``key`` (the ones before it are kept in ``messages``)."""
        with trio.fail_after(within):
            while True:
                msg = await self.receive(within)
                if key in msg.fields:
                    return msg

    async def count(self, key: str, seconds: float) -> int:
        """How many messages carry ``key`` during the next ``seconds``."""
        n = 0
        with trio.move_on_after(seconds):
            while True:
                if key in (await self.receive(seconds + 1)).fields:
                    n += 1
        return n


@contextlib.asynccontextmanager
async def notified_serve(config: Path, notify: NotifySocket,
                         watchdog_usec: int | None = WATCHDOG_USEC) -> AsyncIterator[ServeProcess]:
    env = dict(os.environ, NOTIFY_SOCKET=notify.env)
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    async with mbsec_process(["serve", "--config", str(config)], env=env) as proc:
        yield proc


async def test_ready_watchdog_reload_stopping(pki: Pki, plc: PymodbusPlc, tmp_path: Path) -> None:
    notify = NotifySocket()
    await notify.bind()
    cfg = serve_config(pki, tmp_path, plc.port)
    async with notified_serve(cfg, notify) as sp:
        ready = await notify.until("READY")
        assert ready.pid == sp.proc.pid  # NotifyAccess=main: from the main process
        assert ready.fields["READY"] == "1"
        assert ready.fields["STATUS"].startswith("serving 127.0.0.1:")
        start = await sp.next_event("server-start")
        port = int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])
        client = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        assert (await client.request(1, 1, read_hr(0, 1))) is not None  # READY means serving
        await client.aclose()
        # every WATCHDOG_USEC / 2: about 6 in 2 s (a loaded box sends fewer, never none)
        assert await notify.count("WATCHDOG", 2.0) >= 3

        sp.proc.send_signal(signal.SIGHUP)
        reloading = await notify.until("RELOADING")
        assert reloading.fields["RELOADING"] == "1"
        assert int(reloading.fields["MONOTONIC_USEC"]) > 0
        again = await notify.until("READY")
        assert "generation 1" in again.fields["STATUS"]
        await sp.next_event("config-reload")

        sp.proc.send_signal(signal.SIGTERM)
        stopping = await notify.until("STOPPING")
        assert stopping.pid == sp.proc.pid
        with trio.fail_after(15):
            assert await sp.proc.wait() == 0
    assert all(m.pid == sp.proc.pid for m in notify.messages)


# -- a wedged data plane --------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64",
                    reason="reads x86_64 syscall numbers from /proc")
async def test_watchdog_stops_while_the_data_plane_is_wedged(
    pki: Pki, plc: PymodbusPlc, tmp_path: Path
) -> None:
    notify = NotifySocket()
    await notify.bind()
    cfg = serve_config(pki, tmp_path, plc.port, extra='[metrics]\nlisten = "127.0.0.1:0"\n')
    async with notified_serve(cfg, notify) as sp:
        await notify.until("READY")
        start = await sp.next_event("server-start")
        port = int(start["mbsec"]["listen"][0].rsplit(":", 1)[1])
        metrics_port = int(start["mbsec"]["metrics_port"])
        assert await notify.count("WATCHDOG", 1.0) >= 1
        assert (await http_get(metrics_port, "/healthz"))[0].endswith("200 OK")
        client = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        assert (await client.request(1, 1, read_hr(0, 1))) is not None

        with thread_stopped(data_plane_thread(sp.proc.pid)):
            # the next probe goes unanswered: at most one WATCHDOG=1 already on its way
            assert await notify.count("WATCHDOG", 0.8) <= 1
            assert await notify.count("WATCHDOG", 2.0) == 0  # ~6 intervals without one
            assert any("data plane not answering" in m.fields.get("STATUS", "")
                       for m in notify.messages)
            # trio still runs (it answers HTTP), and says unhealthy: keepalived moves the VIP
            assert (await http_get(metrics_port, "/healthz"))[0].endswith("503 Service Unavailable")
            await client.send(2, 1, read_hr(0, 1))
            assert not await client.answered_or_closed(within=0.5)  # really wedged

        # the thread runs again: the queued request is answered, WATCHDOG and 200 come back
        assert (await client.recv()) is not None
        assert await notify.count("WATCHDOG", 1.5) >= 2
        assert notify.messages[-1].pid == sp.proc.pid
        assert any(m.fields.get("STATUS", "").startswith("serving") for m in notify.messages[-6:])
        for _ in range(25):  # the next liveness probe (every second) sees it answer
            if (await http_get(metrics_port, "/healthz"))[0].endswith("200 OK"):
                break
            await trio.sleep(0.2)
        else:
            raise AssertionError("/healthz stayed 503 after the data plane ran again")
        await client.aclose()
        sp.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await sp.proc.wait() == 0


# -- socket activation ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_socket_activation_serves_the_socket_systemd_bound(
    pki: Pki, plc: PymodbusPlc, tmp_path: Path, workers: int
) -> None:
    """systemd's own systemd-socket-activate binds the port (as mbsec.socket does) and starts
    mbsec serve on the first connection; mbsec serves that socket (its `listen` is ignored),
    alone or as a set of two workers that systemd hears through the main process."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        why = "systemd-socket-activate missing: source scripts/test.d/systemd-ha.sh"
        fail_or_skip(why)
    notify = NotifySocket()
    await notify.bind()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = serve_config(pki, tmp_path, plc.port, workers=workers)  # listen 127.0.0.1:0
    proc = await trio.lowlevel.open_process(
        [tool, "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={notify.env}",
         "-E", f"WATCHDOG_USEC={WATCHDOG_USEC}",
         "-E", f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}", "-E", "MBSEC_PURE=1",
         sys.executable, "-m", "mbsec.cli", "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sp = ServeProcess(proc)
    try:
        said = b""
        with trio.fail_after(10):  # "Listening on 127.0.0.1:PORT as 3." once it has bound
            while b"Listening on" not in said:
                assert proc.stderr is not None
                said += await proc.stderr.receive_some(4096)
        with trio.fail_after(30):
            # the first connection starts the proxy; its handshake waits in the backlog
            client = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        assert (await client.request(1, 1, read_hr(0, 2))) == (1, 1, bytes([3, 4, 0, 0, 0, 1]))
        await client.aclose()
        start = await sp.next_event("server-start")
        assert start["mbsec"]["listen"] == [f"127.0.0.1:{port}"]
        ready = await notify.until("READY", within=20)
        serving = "serving with 2 workers" if workers == 2 else f"serving 127.0.0.1:{port} "
        assert ready.fields["STATUS"].startswith(serving)
        if workers == 2:  # (one process: test_ready_watchdog_reload_stopping)
            # the main process speaks for both (NotifyAccess=main): READY above once both
            # serve, WATCHDOG only while both answer, READY again once both reloaded
            assert await notify.count("WATCHDOG", 1.5) >= 2
            proc.send_signal(signal.SIGHUP)
            await notify.until("RELOADING")
            assert (await notify.until("READY")).fields["STATUS"].startswith(serving)
        proc.send_signal(signal.SIGTERM)
        await notify.until("STOPPING")
        with trio.fail_after(15):
            assert await proc.wait() == 0
        # systemd-socket-activate execs mbsec in its own process: every message from that pid
        assert {m.pid for m in notify.messages} == {proc.pid}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
