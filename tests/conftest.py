"""Shared fixtures: a throw-away PKI, PLCs (pymodbus and scripted trio ones), a proxy launcher.

Everything listens on 127.0.0.1 port 0 and is stopped by its fixture. pymodbus runs in a thread
with its own asyncio loop (pytest runs trio).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from mbsec.audit import ListSink, make_logger
from mbsec.metrics import Metrics
from mbsec.modbus.mbap import FrameBuffer, encode_adu
from mbsec.pki.ca import CertificateAuthority, IssuedFiles
from mbsec.settings import LoggingSettings, build_settings

TEST_POLICY = """\
version: 1
default: deny
targets:
  plc:
    unit_ids: [1, 2]
rules:
  - id: operator-read
    description: Operators read process values
    roles: [operator]
    functions: [read_holding_registers, read_input_registers, read_coils]
    addresses: ["0-199"]
  - id: engineer-rw
    description: Engineers read and write registers and coils
    roles: [engineer]
    functions: [read_holding_registers, write_single_register, write_multiple_registers,
                read_coils, write_single_coil]
    addresses: ["0-199"]
  - id: limited-read
    description: Readers get small replies only
    roles: [small]
    functions: [read_holding_registers]
    addresses: ["0-199"]
    max_response_bytes: 10
"""


# -- PKI ------------------------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path
    ca: CertificateAuthority
    server: IssuedFiles
    operator: IssuedFiles
    engineer: IssuedFiles
    small: IssuedFiles
    norole: IssuedFiles
    rogue: IssuedFiles
    crl: Path
    extra: dict[str, IssuedFiles] = field(default_factory=dict)

    def client_ctx(
        self,
        who: IssuedFiles | None,
        *,
        max_version: ssl.TLSVersion | None = None,
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.trust_bundle))
        if max_version is not None:
            ctx.maximum_version = max_version
        if who is not None:
            ctx.load_cert_chain(str(who.chain), str(who.key))
        return ctx


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.init(d / "ca", common_name="Test Plant CA")
    out = d / "certs"
    server = ca.issue("server", "mbsec-test", dns=("localhost",), ips=("127.0.0.1",),
                      out_dir=out, name="server")
    operator = ca.issue("client", "op-1", role="operator", out_dir=out, name="operator")
    engineer = ca.issue("client", "eng-1", role="engineer", out_dir=out, name="engineer")
    small = ca.issue("client", "small-1", role="small", out_dir=out, name="small")
    norole = ca.issue("client", "norole-1", out_dir=out, name="norole")
    rogue_ca = CertificateAuthority.init(d / "rogue", common_name="Rogue CA")
    rogue = rogue_ca.issue("client", "rogue-1", role="operator", out_dir=out, name="rogue")
    crl = ca.write_crl(next_update_days=7)
    return Pki(d, ca, server, operator, engineer, small, norole, rogue, crl)


@pytest.fixture
def fresh_ca(tmp_path: Path) -> CertificateAuthority:
    """A CA a test may modify (revoke, odd certificates) without touching the shared one."""
    return CertificateAuthority.init(tmp_path / "ca", common_name="Fresh CA")


# -- PLCs -----------------------------------------------------------------------------------


class PymodbusPlc:
    """pymodbus ModbusTcpServer (unit 1 and 2) in a thread with its own asyncio loop.

    Holding register / coil ``i`` initially holds ``i`` (resp. ``i % 2``).
    """

    def __init__(self) -> None:
        from pymodbus.datastore import (
            ModbusDeviceContext,
            ModbusSequentialDataBlock,
            ModbusServerContext,
        )

        def device() -> Any:
            return ModbusDeviceContext(
                hr=ModbusSequentialDataBlock(1, list(range(1001))),
                ir=ModbusSequentialDataBlock(1, [1000 + i for i in range(1001)]),
                co=ModbusSequentialDataBlock(1, [i % 2 for i in range(1001)]),
                di=ModbusSequentialDataBlock(1, [0] * 1001),
            )

        self.devices = {1: device(), 2: device()}
        self.context = ModbusServerContext(devices=self.devices, single=False)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.server: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from pymodbus.server import ModbusTcpServer

        self.server = ModbusTcpServer(self.context, address=("127.0.0.1", 0))
        await self.server.serve_forever(background=True)
        self.port = self.server.transport.sockets[0].getsockname()[1]

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "pymodbus PLC did not start"

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop)
        try:
            fut.result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    async def holding(self, unit: int, address: int, count: int = 1) -> list[int]:
        """Read the PLC's registers directly over plain Modbus/TCP (not through the proxy)."""
        return await plain_read(self.port, unit, address, count)


async def plain_read(port: int, unit: int, address: int, count: int) -> list[int]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(encode_adu(0x7777, unit, struct.pack(">BHH", 3, address, count)))
        frames = FrameBuffer()
        with trio.fail_after(5):
            while (adu := frames.next_frame()) is None:
                frames.receive_data(await stream.receive_some(4096))
        assert adu.pdu[0] == 3, adu.pdu
        return list(struct.unpack(f">{count}H", adu.pdu[2 : 2 + 2 * count]))
    finally:
        await stream.aclose()


@pytest.fixture
def plc() -> Iterator[PymodbusPlc]:
    p = PymodbusPlc()
    p.start()
    yield p
    p.stop()


class LocalTcpServer:
    """A TCP server on 127.0.0.1 (a free port): ``nursery.start(srv.serve)`` returns the port;
    subclasses handle each connection in ``_handle``."""

    port = 0

    async def _handle(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as n:
            await n.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)


class ScriptedPlc(LocalTcpServer):
    """A trio Modbus/TCP PLC whose behaviour a test scripts.

    FC03 reply: register i holds ``value(unit, address + i)``; ``delay(address)`` seconds pass
    before the reply; requests on one connection are handled concurrently, so replies can be
    reordered. ``silent=True`` never answers.
    """

    def __init__(
        self,
        *,
        delay: Callable[[int], float] = lambda a: 0.0,
        value: Callable[[int, int], int] = lambda u, a: a,
        silent: bool = False,
        garbage_at: frozenset[int] = frozenset(),
    ) -> None:
        self.delay = delay
        self.value = value
        self.silent = silent
        self.garbage_at = garbage_at  # FC03 addresses answered with a broken MBAP frame
        self.connections = 0
        self.requests: list[tuple[int, int, bytes]] = []

    async def _reply(self, stream: trio.SocketStream, lock: trio.Lock, tid: int, unit: int,
                     pdu: bytes) -> None:
        fc = pdu[0]
        if fc in (3, 4):
            addr, count = struct.unpack(">HH", pdu[1:5])
            await trio.sleep(self.delay(addr))
            vals = [self.value(unit, addr + i) & 0xFFFF for i in range(count)]
            out = bytes([fc, 2 * count]) + struct.pack(f">{count}H", *vals)
        elif fc in (5, 6, 16):
            out = pdu[:5]
        else:
            out = bytes([fc | 0x80, 1])
        frame = encode_adu(tid, unit, out)
        if fc == 3 and struct.unpack(">H", pdu[1:3])[0] in self.garbage_at:
            frame = b"\xde\xad" + frame[2:4] + b"\x00\x05" + b"junk!"  # bad protocol id
        async with lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(frame)

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        frames = FrameBuffer()
        lock = trio.Lock()
        async with trio.open_nursery() as n:
            try:
                while True:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    frames.receive_data(data)
                    while (adu := frames.next_frame()) is not None:
                        self.requests.append((adu.transaction_id, adu.unit_id, adu.pdu))
                        if not self.silent:
                            n.start_soon(self._reply, stream, lock, adu.transaction_id,
                                         adu.unit_id, adu.pdu)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass



def unused_port() -> int:
    """A port nothing listens on (bound then closed): the 'PLC down' case."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- proxy --------------------------------------------------------------------------------


@dataclass
class ProxyHandle:
    proxy: Any
    port: int
    sink: ListSink
    metrics: Metrics
    policy_path: Path
    #: set when ``proxy.serve()`` has returned on its own (after ``request_shutdown``)
    stopped: trio.Event = field(default_factory=trio.Event)

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        from mbsec.audit import flatten

        evs = [flatten(json.loads(line)) for line in self.sink.lines]
        if action is not None:
            evs = [e for e in evs if e.get("event.action") == action]
        return evs

    async def wait_event(
        self, action: str, pred: Callable[[dict[str, Any]], bool] = lambda e: True
    ) -> dict[str, Any]:
        with trio.fail_after(5):
            while True:
                for e in self.events(action):
                    if pred(e):
                        return e
                await trio.sleep(0.01)


class FailingSink(ListSink):
    """A log destination that breaks (its pipe closed) on every line containing ``marker``:
    how a failing SIEM pipe reaches the code that logs."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker

    def write(self, level: str, line: str) -> None:
        if self.marker in line:
            raise BrokenPipeError(32, "Broken pipe")
        super().write(level, line)


StartProxy = Callable[..., Awaitable[ProxyHandle]]

DATA_PLANES = ("thread",)


def pytest_configure(config: pytest.Config) -> None:
    # setup.py compiles some modules with mypyc into .so files next to them, which Python
    # imports before the .py: after an edit, the tests would run the old code
    package = Path(__file__).resolve().parents[1] / "mbsec"
    for compiled in package.rglob("*.cpython-*.so"):
        source = compiled.parent / (compiled.name.split(".", 1)[0] + ".py")
        if source.exists() and compiled.stat().st_mtime < source.stat().st_mtime:
            pytest.exit(f"{source} changed after it was compiled into {compiled.name}: run "
                        "scripts/test.sh (it reinstalls) or `.venv/bin/pip install -e .`", 2)
    config.addinivalue_line(
        "markers",
        "xfail_engine(engine, reason): strict xfail only where the data_plane fixture is engine "
        "(a behaviour one engine gets wrong; the other must pass)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        engine = getattr(getattr(item, "callspec", None), "params", {}).get("data_plane")
        for mark in item.iter_markers("xfail_engine"):
            if engine == mark.args[0]:
                item.add_marker(pytest.mark.xfail(strict=True, reason=mark.kwargs["reason"]))


@pytest.fixture(params=DATA_PLANES)
def data_plane(request: pytest.FixtureRequest) -> str:
    """Which engine serves the connections after the handshake: every test that starts a proxy
    runs on both (ids ``[thread]`` and ``[trio]``); a module may override this fixture."""
    return str(request.param)


@pytest.fixture
async def start_proxy(
    pki: Pki, tmp_path: Path, nursery: trio.Nursery, data_plane: str
) -> StartProxy:
    """``await start_proxy(plc_port, policy=..., limits=..., upstream=..., tls=...)``.

    ``settings`` adds top-level settings (e.g. ``{"busy_poll_us": 50}``); the engine comes from
    the ``data_plane`` fixture.
    """

    async def start(
        plc_port: int,
        *,
        policy: str = TEST_POLICY,
        unit_ids: list[int] | None = None,
        upstream: dict[str, Any] | None = None,
        tls: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        allowed_requests: str = "info",
        crl: list[Path] | None = None,
        settings: dict[str, Any] | None = None,
        sink: ListSink | None = None,
    ) -> ProxyHandle:
        from mbsec.server import Proxy

        policy_path = tmp_path / "policy.yaml"
        policy_path.write_text(policy, encoding="utf-8")
        up = {"host": "127.0.0.1", "port": plc_port, "unit_ids": unit_ids or [1, 2],
              "request_timeout": 1.0, "connect_timeout": 1.0}
        up.update(upstream or {})
        tls_cfg: dict[str, Any] = {
            "cert": str(pki.server.chain),
            "key": str(pki.server.key),
            "client_ca": str(pki.ca.trust_bundle),
            "crl": [str(p) for p in (crl if crl is not None else [pki.crl])],
            "handshake_timeout": 5.0,
        }
        tls_cfg.update(tls or {})
        tree: dict[str, Any] = {
            "listen": ["127.0.0.1:0"],
            "tls": tls_cfg,
            "policy": str(policy_path),
            "upstreams": {"plc": up},
            "limits": limits or {},
            # every rejection written: tests of other things count them one by one (tests of
            # the rejection log set their own budget and interval)
            "logging": {"stdout": False, "allowed_requests": allowed_requests,
                        "rejections_per_second": 1000, "rejection_interval": 1e-6},
            "data_plane": data_plane,
        }
        tree.update(settings or {})
        built = build_settings(tree, environment=False)
        sink = sink if sink is not None else ListSink()
        log = make_logger(
            LoggingSettings(stdout=False, allowed_requests=allowed_requests),  # type: ignore[arg-type]
            extra_sinks=[sink],
        )
        metrics = Metrics()
        proxy = Proxy(built, log=log, metrics=metrics)
        stopped = trio.Event()

        async def serve(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
            await proxy.serve(task_status=task_status)
            stopped.set()

        addrs = await nursery.start(serve)
        return ProxyHandle(proxy, addrs[0][1], sink, metrics, policy_path, stopped)

    return start


# -- a raw mutual-TLS Modbus client ---------------------------------------------------------


class TlsClient:
    """Speaks MBAP over TLS with full control: pipelining, raw bytes, reading the alert."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self.frames = FrameBuffer()

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext) -> TlsClient:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        s = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        await s.do_handshake()
        return cls(s)

    async def send(self, tid: int, unit: int, pdu: bytes) -> None:
        await self.stream.send_all(encode_adu(tid, unit, pdu))

    async def recv(self, within: float = 5.0) -> tuple[int, int, bytes] | None:
        """The next reply (tid, unit, pdu), or None at EOF (``within`` seconds deadline)."""
        with trio.fail_after(within):
            while True:
                adu = self.frames.next_frame()
                if adu is not None:
                    return adu.transaction_id, adu.unit_id, adu.pdu
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.frames.receive_data(data)

    async def request(self, tid: int, unit: int, pdu: bytes,
                      within: float = 5.0) -> tuple[int, int, bytes] | None:
        await self.send(tid, unit, pdu)
        return await self.recv(within)

    async def answered_or_closed(self, within: float = 1.5) -> bool:
        """True when a reply, or the end of the connection, came within ``within`` seconds;
        a wedged connection does neither."""
        with trio.move_on_after(within):
            with contextlib.suppress(trio.BrokenResourceError):
                await self.recv()
            return True
        return False

    async def closed_by_peer(self) -> bool:
        """True when the proxy hangs up (EOF or a reset/alert) instead of replying."""
        try:
            return await self.recv() is None
        except trio.BrokenResourceError:
            return True

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def read_hr(address: int, count: int) -> bytes:
    return struct.pack(">BHH", 3, address, count)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ServeProcess:
    """A real ``mbsec serve`` child process and the JSON events on its standard output."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.buf = b""
        self.events: list[dict[str, Any]] = []

    async def next_event(self, action: str) -> dict[str, Any]:
        """The next event with ``event.action == action`` (earlier ones are kept in ``events``)."""
        assert self.proc.stdout is not None
        with trio.fail_after(15):
            while True:
                while b"\n" in self.buf:
                    line, self.buf = self.buf.split(b"\n", 1)
                    ev = json.loads(line)
                    self.events.append(ev)
                    if ev.get("event", {}).get("action") == action:
                        return dict(ev)
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    raise AssertionError(f"mbsec serve ended before {action!r}: {self.events}")
                self.buf += chunk


async def tuned_client(port: int, pki: Pki, *, rcvbuf: int, mss: int) -> TlsClient:
    """A TLS client whose socket has a tiny receive buffer and advertises a tiny MSS: the
    proxy can then queue only a few kB towards it before its writes would block."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
    await sock.connect(("127.0.0.1", port))
    s = trio.SSLStream(trio.SocketStream(sock), pki.client_ctx(pki.operator),
                       server_hostname="localhost")
    await s.do_handshake()
    return TlsClient(s)


def blocking_tls(port: int, ctx: ssl.SSLContext,
                 session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    """A blocking TLS client connection to 127.0.0.1 (Python's ssl offers a saved session only
    to a socket wrapper), handshaken; the caller closes it. Run it in a thread from trio."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)
    except BaseException:
        raw.close()
        raise


def blocking_ask(s: ssl.SSLSocket) -> bytes:
    """One FC03 request on a :func:`blocking_tls` connection: the reply bytes, or b"" when the
    proxy closed the connection instead."""
    s.sendall(bytes.fromhex("000100000006010300000001"))
    try:
        return s.recv(100)
    except (ssl.SSLError, OSError):
        return b""


def serve_config(pki: Pki, directory: Path, plc_port: int, *, workers: int = 1,
                 extra: str = "", admin: str = "", policy: str = TEST_POLICY) -> Path:
    """A configuration file for a real ``mbsec serve`` (TEST_POLICY, one PLC on 127.0.0.1,
    units 1 and 2, listening on a free port); ``extra`` is appended (TOML tables), then the
    ``[admin]`` table (socket and state file in ``directory``, never the shared /run/mbsec)
    with ``admin`` (more keys and sub-tables) at its end."""
    (directory / "policy.yaml").write_text(policy)
    cfg = directory / "mbsec.toml"
    cfg.write_text(
        f'listen = ["127.0.0.1:0"]\npolicy = "policy.yaml"\nworkers = {workers}\n'
        f'[tls]\ncert = "{pki.server.chain}"\nkey = "{pki.server.key}"\n'
        f'client_ca = "{pki.ca.trust_bundle}"\ncrl = ["{pki.crl}"]\n'
        f'[upstreams.plc]\nhost = "127.0.0.1"\nport = {plc_port}\nunit_ids = [1, 2]\n'
        f'[limits]\ndrain_timeout = 3\n{extra}'
        f'[admin]\nsocket = "admin.sock"\nstate_file = "state"\n{admin}'
    )
    return cfg


def fail_or_skip(msg: str) -> None:
    """A real component a test needs is missing: fail under CI (``CI=true``: scripts/test.sh
    installs it), skip elsewhere with the hint."""
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@contextlib.asynccontextmanager
async def mbsec_process(args: list[str],
                        env: dict[str, str] | None = None) -> AsyncIterator[ServeProcess]:
    """``mbsec ARGS`` as a child process (its JSON events on stdout), killed on the way out if
    it is still running (a test that ends it itself checks its exit status)."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "mbsec.cli", *args], stdout=subprocess.PIPE, env=env)
    try:
        yield ServeProcess(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def serve_process(config: Path) -> contextlib.AbstractAsyncContextManager[ServeProcess]:
    """``mbsec serve --config config`` as a child process (:func:`mbsec_process`)."""
    return mbsec_process(["serve", "--config", str(config)])


async def http_get(port: int, path: str) -> tuple[str, str]:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    await s.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    with trio.fail_after(5):
        while chunk := await s.receive_some(65536):
            data += chunk
    await s.aclose()
    head, _, body = data.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body
