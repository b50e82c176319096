"""The log disk, for real: a real ``mbsec serve`` whose event file is on a 2 MiB tmpfs that
the test mounts in a mount namespace of its own (``unshare -m``, as root; the host never sees
it). A rejection flood from peers without a certificate (silent connections from 8 addresses,
non-TLS bytes and certificate-less handshakes from many addresses) writes so little that
5 minutes of it could not fill the 2 MiB; and once the file system is full anyway, the process
keeps running, and an authenticated session that was already open is treated by
``logging.on_sink_failure`` (reads served, writes refused with exception 04), with the alarm
on stderr and in the metrics. These tests fail, never skip, when ``CI=true``."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from conftest import (
    Pki,
    ScriptedPlc,
    TlsClient,
    fail_or_skip,
    http_get,
    read_hr,
    serve_config,
    unused_port,
)

from tests.e2e.test_handshake_admission import silent_flood

FS_BYTES = 2 * 1024 * 1024
FIVE_MINUTES = 300.0
FLOOD_S = 15.0


def _need_unshare() -> None:
    problem = None
    if shutil.which("unshare") is None:
        problem = "needs unshare (util-linux)"
    elif os.geteuid() != 0:
        problem = "needs root (mount in a mount namespace)"
    if problem is not None:
        fail_or_skip(problem)


class LogFsProxy:
    def __init__(self, proc: trio.Process, mount: Path, port: int, metrics_port: int,
                 stderr: Path) -> None:
        self.proc = proc
        self.mount = mount
        self.port = port
        self.metrics_port = metrics_port
        self.stderr = stderr

    def inside(self, name: str) -> Path:
        """A path on the tmpfs, as the proxy's mount namespace sees it."""
        return Path(f"/proc/{self.proc.pid}/root{self.mount}/{name}")

    def log_bytes(self) -> int:
        return self.inside("events.jsonl").stat().st_size

    def used_bytes(self) -> int:
        st = os.statvfs(self.inside(""))
        return (st.f_blocks - st.f_bfree) * st.f_frsize


@contextlib.asynccontextmanager
async def logfs_proxy(pki: Pki, tmp_path: Path, plc_port: int) -> AsyncIterator[LogFsProxy]:
    _need_unshare()
    mount = tmp_path / "admission-logfs"
    mount.mkdir()
    port, metrics_port = unused_port(), unused_port()
    cfg = serve_config(pki, tmp_path, plc_port, extra=(
        f'[logging]\nstdout = false\nfile = "{mount}/events.jsonl"\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'))
    text = cfg.read_text().replace('listen = ["127.0.0.1:0"]', f'listen = ["127.0.0.1:{port}"]')
    cfg.write_text(text)
    stderr = tmp_path / "stderr.txt"
    script = (f"mount -t tmpfs -o size={FS_BYTES} admission-logfs {mount} && "
              f"exec {sys.executable} -m mbsec.cli serve --config {cfg}")
    with stderr.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.DEVNULL, stderr=err)
    try:
        h = LogFsProxy(proc, mount, port, metrics_port, stderr)
        with trio.fail_after(20):
            while True:  # server-start on the tmpfs: listening
                if proc.poll() is not None:
                    pytest.fail(f"mbsec serve under unshare exited {proc.returncode}: "
                                f"{stderr.read_text()}")
                with contextlib.suppress(OSError):
                    if h.log_bytes() > 0:
                        break
                await trio.sleep(0.05)
        yield h
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def junk_and_no_certificate(port: int, pki: Pki, seconds: float) -> int:
    """Non-TLS bytes and handshakes without a client certificate, from random addresses in
    127.60.0.0/14 (many /24s): each is a rejection the proxy must not write one by one."""
    made = 0
    no_cert = ssl.create_default_context(cafile=str(pki.ca.trust_bundle))

    async def one(kind: int) -> None:
        nonlocal made
        sock = trio.socket.socket()
        try:
            await sock.bind((f"127.{60 + random.randrange(4)}.{random.randrange(256)}."
                             f"{random.randrange(1, 255)}", 0))
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            if kind:
                await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
                while await stream.receive_some(4096):
                    pass
            else:
                tls = trio.SSLStream(stream, no_cert, server_hostname="localhost")
                await tls.do_handshake()
                await tls.receive_some(10)  # TLS 1.3: the refusal comes on the first read
            made += 1
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            made += 1
        finally:
            sock.close()

    async def loop(kind: int) -> None:
        while True:
            with trio.move_on_after(3):
                await one(kind)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(loop, i % 2)
    return made


@pytest.fixture
async def plc(nursery: trio.Nursery) -> ScriptedPlc:
    p = ScriptedPlc()
    await nursery.start(p.serve)
    return p


async def test_a_rejection_flood_cannot_fill_the_log_disk(
    pki: Pki, plc: ScriptedPlc, tmp_path: Path,
) -> None:
    async with logfs_proxy(pki, tmp_path, plc.port) as h:
        before = h.log_bytes()
        t0 = trio.current_time()
        async with silent_flood(h.port, 8, 65) as flood:
            made = await junk_and_no_certificate(h.port, pki, FLOOD_S)
            flood.send_signal(signal.SIGINT)
        elapsed = trio.current_time() - t0
        written = h.log_bytes() - before
        assert h.proc.returncode is None  # still serving
        _status, body = await http_get(h.metrics_port, "/metrics")
        refused = sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                      if line.startswith(("mbsec_connections_total{outcome=\"too_many",
                                          "mbsec_tls_handshakes_total{outcome=\"failure\"")))
        rate = written / elapsed
        print(f"\n{made} junk/no-certificate attempts + a silent flood from 8 addresses, "
              f"{refused:.0f} rejections in {elapsed:.1f} s: {written} bytes written "
              f"({rate:.0f} B/s; 5 minutes: {rate * FIVE_MINUTES / 1024:.0f} KiB of "
              f"{FS_BYTES // 1024} KiB)")
        assert made > 200 and refused > 1000, (made, refused)  # the flood was real
        assert rate * FIVE_MINUTES < FS_BYTES, rate  # 5 minutes of it cannot fill 2 MiB
        assert h.used_bytes() < FS_BYTES // 4
        h.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await h.proc.wait() == 0


async def test_a_full_log_disk_stops_nothing_and_open_sessions_follow_the_rule(
    pki: Pki, plc: ScriptedPlc, tmp_path: Path,
) -> None:
    async with logfs_proxy(pki, tmp_path, plc.port) as h:
        c = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
        write = struct.pack(">BHH", 6, 10, 1234)
        assert await c.request(1, 1, read_hr(0, 2)) == (1, 1, b"\x03\x04\x00\x00\x00\x01")
        assert await c.request(2, 1, write) == (2, 1, write)  # logged, so served
        # the disk fills up (another process's fault), seen from inside the namespace
        with h.inside("filler").open("wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
        with pytest.raises(OSError) as full:
            h.inside("probe").write_bytes(b"x" * 65536)
        assert full.value.errno == errno.ENOSPC
        async with silent_flood(h.port, 8, 65):
            made = await junk_and_no_certificate(h.port, pki, 3.0)
        assert made > 20
        assert h.proc.returncode is None  # the full disk stopped nothing
        # the open session: reads served, writes refused with 04 (on_sink_failure default)
        assert await c.request(3, 1, read_hr(0, 2)) == (3, 1, b"\x03\x04\x00\x00\x00\x01")
        assert await c.request(4, 1, write) == (4, 1, b"\x86\x04")
        assert [r[2] for r in plc.requests].count(write) == 1  # the refused write never left
        # and a new client gets in and is treated the same way
        c2 = await TlsClient.connect(h.port, pki.client_ctx(pki.engineer))
        assert await c2.request(5, 1, read_hr(0, 1)) == (5, 1, b"\x03\x02\x00\x00")
        await c.aclose()
        await c2.aclose()
        _status, body = await http_get(h.metrics_port, "/metrics")
        failures = [line for line in body.splitlines()
                    if line.startswith("mbsec_log_sink_failures_total{sink=\"FileSink\"}")]
        assert failures and float(failures[0].rsplit(" ", 1)[1]) > 0, body
        h.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await h.proc.wait() == 0
    alarms = [line for line in h.stderr.read_text().splitlines() if "log-sink-failed" in line]
    assert len(alarms) == 1 and "No space left on device" in alarms[0], alarms
