"""One client connection: TLS handshake -> identity -> loop(frame -> policy -> upstream -> reply).

The session owns every failure of its connection and maps library errors at this boundary:
a failed handshake becomes an event with a reason slug (and the fatal alert is flushed to the
client, which trio's ``SSLStream`` does not do by itself); a broken frame closes the connection;
an invalid PDU, a denial or an upstream failure becomes a Modbus exception reply.

Client pipelining: requests are read as they arrive and handled concurrently, at most
``limits.max_pipelined`` at a time per connection (reading pauses at the limit, which is the
backpressure). Each reply carries the client's own transaction id and unit id and is written as
one TLS record, in completion order.

Hot path: the handshake runs in ``trio.SSLStream`` (it keeps the alert flush and the TLS 1.3
ticket handling); after it, :class:`_RecordIO` drives the same ``SSLObject`` and memory BIOs
directly and reads/writes the socket without ``SSLStream``'s locks and retry loop. A request
that arrives alone while nothing else is in flight (every request of a depth-1 client) is
handled in the reader task itself, without spawning a task; requests that arrive together or
while others are in flight get a task each, as before. The idle timeout is one watchdog task
per connection, not a cancel scope per read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from mbsec.identity import IdentityError, PeerIdentity, parse_identity
from mbsec.metrics import CounterCell, MetricsLike, NullMetrics, counter
from mbsec.modbus._fast import fast_init
from mbsec.modbus.errors import Action, RemoteProtocolError
from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu
from mbsec.modbus.pdu import FUNCTION_NAMES, ExceptionCode, exception_pdu, parse_request
from mbsec.settings import LimitsSettings
from mbsec.tls import TlsMaterial, handshake_failure_reason
from mbsec.upstream import UpstreamError, UpstreamReply, receive_raw, socket_fd

if TYPE_CHECKING:
    from mbsec.modbus.access import Access
    from mbsec.modbus.pdu import Request
    from mbsec.policy import Decision, Policy, Principal, RateLimiter
    from mbsec.reactor import Client, DataPlane

RECEIVE_SIZE = 65536
ALERT_FLUSH_TIMEOUT = 1.0
CLOSE_TIMEOUT = 1.0
DECIDED_MAX = 64  # decisions remembered per connection (read requests only)
RATE_LIMIT_EXCEPTION = int(ExceptionCode.SERVER_DEVICE_BUSY)
RESPONSE_LIMIT_EXCEPTION = int(ExceptionCode.SERVER_DEVICE_FAILURE)

_conn_ids = itertools.count(1)


def set_conn_id_space(first: int, step: int) -> None:
    """Worker processes number connections ``first, first + step, ...`` so ids stay unique
    across the workers of one proxy."""
    global _conn_ids
    _conn_ids = itertools.count(first, step)


@dataclass(frozen=True, slots=True)
class ProxyState:
    """Everything a reload replaces, swapped as one object: TLS material, policy, rate limiter.

    A session takes the state once per request, so a request is decided entirely by the old or
    entirely by the new policy, and a rate-limit slot is released on the limiter that granted it.
    """

    tls: TlsMaterial
    policy: Policy
    limiter: RateLimiter
    generation: int = 0


@fast_init
@dataclass(frozen=True, slots=True)
class Forward:
    """An allowed request on its way to the PLC: what :meth:`Session.complete` needs after."""

    request: Request
    access: Access
    decision: Decision
    principal: Principal
    limiter: RateLimiter
    fname: str
    t0: float


class UpstreamsLike(Protocol):
    async def exchange(self, unit_id: int, request: Request, pdu: bytes) -> UpstreamReply: ...


class IdentitySlots(Protocol):
    def claim_identity(self, key: str) -> bool: ...

    def release_identity(self, key: str) -> None: ...


class UnlimitedIdentities:
    def claim_identity(self, key: str) -> bool:
        return True

    def release_identity(self, key: str) -> None:
        pass


class _Stopped(Exception):
    """The reader stops: the connection is being closed (the reason is already recorded)."""


class _Closing(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def take_tls_state(
    ssl_stream: trio.SSLStream[Any],
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """The ``SSLStream``'s own ``SSLObject`` and memory BIOs, and the TLS 1.3 tickets it held
    back after the handshake (taken: whoever drives the connection from here sends them).
    Both data planes use it; the private access itself is in :mod:`mbsec.trio_private`."""
    from mbsec import trio_private

    return trio_private.take_tls_state(ssl_stream)


class _RecordIO:
    """TLS application data after the handshake, on the ``SSLStream``'s own ``SSLObject``.

    ``receive`` feeds ciphertext into the incoming BIO until ``SSLObject.read`` yields
    plaintext. ``send`` encrypts one message (one ``SSLObject.write`` = one TLS record) and
    writes the ciphertext: directly to the socket when the kernel takes it, otherwise the
    caller waits (at most ``stall_limit``) for the socket to drain; replies that complete meanwhile
    queue behind it in order. Any ciphertext the read side produces (a TLS 1.3 key update
    reply) goes out in the same order. A TLS error or a socket error is ``BrokenResourceError``.
    """

    def __init__(self, ssl_stream: trio.SSLStream[Any], stall_limit: float) -> None:
        self._stall_limit = stall_limit
        self._obj, self._incoming, self._outgoing, delayed = take_tls_state(ssl_stream)
        self._transport = ssl_stream.transport_stream
        self._fd = socket_fd(self._transport)
        self._out = bytearray(delayed)  # ciphertext not yet written, in order
        self._flushing = False
        self._flushed = trio.lowlevel.ParkingLot()
        self.broken = False  # no close_notify can follow: close the transport as is

    @property
    def unsent(self) -> int:
        return len(self._out)

    async def receive(self, max_bytes: int) -> bytes:
        obj = self._obj
        incoming = self._incoming
        while True:
            if not incoming.pending and not incoming.eof and not obj.pending():
                data = None  # nothing buffered: skip a read that can only want more
            else:
                try:
                    data = obj.read(max_bytes)  # b"": the client sent close_notify
                except ssl.SSLWantReadError:
                    data = None
                except ssl.SSLError as exc:
                    self.broken = True
                    raise trio.BrokenResourceError(str(exc)) from exc
            if self._outgoing.pending:
                self._out += self._outgoing.read()
                # e.g. a TLS 1.3 KeyUpdate answer: bounded like any reply, so a client that
                # stops reading cannot hold the replies queued behind it forever
                if not self._flushing and not await self._flush(self._stall_limit):
                    raise trio.BrokenResourceError("client stopped reading (stall limit)")
            if data is not None:
                return data
            if self._fd >= 0:
                raw = await receive_raw(self._fd, RECEIVE_SIZE)
            else:
                raw = await self._transport.receive_some(RECEIVE_SIZE)
            if raw:
                incoming.write(raw)
            else:
                incoming.write_eof()

    async def send(self, data: bytes) -> bool:
        """Encrypt and write one message; False if the socket did not drain within
        ``stall_limit`` seconds."""
        if self.broken:
            raise trio.BrokenResourceError("TLS stream is broken")
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            self.broken = True
            raise trio.BrokenResourceError(str(exc)) from exc
        out = self._out
        out += self._outgoing.read()
        if self._flushing:  # another reply is waiting for the socket; it writes ours too
            await self._flushed.park()
            if self.broken:
                raise trio.BrokenResourceError("TLS stream is broken")
            return not out
        if self._write_now():  # the common case, without another coroutine
            return True
        return await self._flush(self._stall_limit)

    def _write_now(self) -> bool:
        """Write what the kernel takes without waiting; True when nothing is left."""
        out = self._out
        if self._fd < 0:
            return not out
        try:
            n = os.write(self._fd, out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.broken = True
            raise trio.BrokenResourceError(str(exc)) from exc
        del out[:n]
        return not out

    async def _flush(self, limit: float) -> bool:
        out = self._out
        fd = self._fd
        if self._write_now():
            return True
        self._flushing = True
        try:
            with trio.move_on_after(limit):
                while out:
                    if fd >= 0:
                        await trio.lowlevel.wait_writable(fd)
                        try:
                            n = os.write(fd, out)
                        except BlockingIOError:
                            continue
                        except OSError as exc:
                            raise trio.BrokenResourceError(str(exc)) from exc
                        del out[:n]
                    else:
                        chunk = bytes(out)
                        await self._transport.send_all(chunk)
                        del out[: len(chunk)]
            return not out
        except BaseException:
            self.broken = True  # part of a record may be on the wire
            raise
        finally:
            if out:
                self.broken = True
            self._flushing = False
            self._flushed.unpark_all()


def _addr(sockname: Any) -> tuple[str | None, int | None]:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    return None, None


def stream_addresses(stream: trio.abc.Stream) -> tuple[tuple[str | None, int | None], ...]:
    """(peer, local) addresses of a SocketStream; (None, None) for in-memory test streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return (None, None), (None, None)
    try:
        return _addr(sock.getpeername()), _addr(sock.getsockname())
    except OSError:
        return (None, None), (None, None)


class Session:
    """Serve one accepted client stream until it closes; never raises for client faults."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        state: Callable[[], ProxyState],
        upstreams: UpstreamsLike,
        limits: LimitsSettings,
        log: FilteringBoundLogger,
        metrics: MetricsLike | None = None,
        identity_slots: IdentitySlots | None = None,
        allowed_requests: str = "debug",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        data_plane: DataPlane | None = None,
        decision_state: Callable[[], ProxyState] | None = None,
    ) -> None:
        self._raw = stream
        self._state_fn = state  # handshake, CRL re-check, first principal
        #: requests: the proxy switches it together with the routes (default: ``state``)
        self._decision_state_fn = decision_state or state
        self._upstreams = upstreams
        self._limits = limits
        self._log = log
        self._metrics: MetricsLike = metrics or NullMetrics()
        self._identity_slots = identity_slots or UnlimitedIdentities()
        self._now = now
        self._allowed_level = allowed_requests
        self._log_allowed: Callable[..., Any] | None = None
        self._set_log(log)
        self._plane = data_plane
        self._client: Client | None = None  # set while the data plane owns the connection
        self._plane_broken = False
        self._allowed_cells: dict[str, CounterCell] = {}  # mbsec_requests_total{allow,fc}
        #: (unit id, request PDU) -> (request, access, decision) for requests that write nothing:
        #: an HMI polls the same blocks all day, and the decision is a pure function of the
        #: principal, the unit and the PDU under one policy (cleared when the policy changes)
        self._decided: dict[tuple[int, bytes], tuple[Request, Access, Decision]] = {}
        self.conn_id = next(_conn_ids)
        (self.peer_ip, self.peer_port), (self.local_ip, self.local_port) = stream_addresses(stream)
        self._ssl: trio.SSLStream[trio.abc.Stream] | None = None
        self._handshake_done = False
        self._identity_key: str | None = None
        self._nursery: trio.Nursery
        self._io: _RecordIO | None = None
        self._reader_scope = trio.CancelScope()
        self._idle_scope = trio.CancelScope()
        self._inflight = 0
        self._slots = trio.lowlevel.ParkingLot()  # the reader waits here at max_pipelined
        self._spawned = 0  # pipelined requests given a task, in arrival order
        self._turn = 0  # the next of them that may go to the PLC
        self._turns = trio.lowlevel.ParkingLot()
        self._inline = False  # the reader task is handling a request itself
        self._stop = False
        self._idle_base = 0.0
        self.identity: PeerIdentity | None = None
        self._principal: Principal | None = None
        self._principal_generation = -1  # the state generation the principal was built from
        self.close_reason = "unknown"
        # counters for the canonical close line
        self.requests = 0
        self.allowed = 0
        self.denied = 0
        self.errors = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()

    def _set_log(self, log: FilteringBoundLogger) -> None:
        self._log = log
        self._log_allowed = None
        if self._allowed_level == "info":
            self._log_allowed = log.info
        elif self._allowed_level == "debug" and log.is_enabled_for(10):
            self._log_allowed = log.debug

    # -- public ------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def note_close_reason(self, reason: str) -> None:
        """The first reason wins: it is the cause, later ones are consequences."""
        if self.close_reason == "unknown":
            self.close_reason = reason

    def stop_reading(self, reason: str = "server_shutdown") -> None:
        """Drain: take no new requests; those in flight still get their replies."""
        self.note_close_reason(reason)
        self._stop = True
        client = self._client
        if client is not None and self._plane is not None:
            self._plane.call_threadsafe(lambda: client.stop_reading(reason))
        elif not self._inline:  # else the reader stops once its own request is answered
            self._reader_scope.cancel()

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(
            **{
                "mbsec.conn_id": self.conn_id,
                "source.ip": self.peer_ip,
                "source.port": self.peer_port,
                "destination.ip": self.local_ip,
                "destination.port": self.local_port,
            }
        )
        handshake_ok = False
        try:
            handshake_ok = await self._handshake()
            if handshake_ok:
                await self._serve_requests()
        finally:
            if self._identity_key is not None:
                self._identity_slots.release_identity(self._identity_key)
                self._identity_key = None
            await self._close()
            if handshake_ok:
                self._log_closed()

    # -- handshake ----------------------------------------------------------------------

    async def _handshake(self) -> bool:
        state = self._state_fn()
        ssl_stream = trio.SSLStream(self._raw, state.tls.context, server_side=True)
        self._ssl = ssl_stream
        t0 = time.monotonic()
        error: BaseException | None = None
        timed_out = False
        with trio.move_on_after(state.tls.handshake_timeout) as cs:
            try:
                await ssl_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                error = exc.__cause__ if exc.__cause__ is not None else exc
            except trio.ClosedResourceError as exc:
                error = exc
        if cs.cancelled_caught:
            timed_out = True
        duration = time.monotonic() - t0
        self._handshake_done = not timed_out and error is None
        if timed_out or error is not None:
            if timed_out:
                reason, detail = "handshake_timeout", (
                    f"no complete handshake within {state.tls.handshake_timeout:g} s"
                )
            else:
                reason, detail = handshake_failure_reason(error)
            await self._flush_alert(ssl_stream)
            self._reject(reason, detail, duration)
            return False
        return self._accept_identity(ssl_stream, state, duration)

    async def _flush_alert(self, ssl_stream: trio.SSLStream[trio.abc.Stream]) -> None:
        """Send the fatal alert OpenSSL wrote into the outgoing BIO before failing.

        trio's ``_retry`` raises on SSLError before it reads the BIO, so without this the
        client never learns why (R-44): it sees a bare TCP close instead of e.g.
        ``certificate_required`` or ``unknown_ca``.
        """
        from mbsec import trio_private

        pending = trio_private.pending_alert(ssl_stream)
        if not pending:
            return
        with trio.move_on_after(ALERT_FLUSH_TIMEOUT):
            with contextlib.suppress(
                trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError
            ):
                await self._raw.send_all(pending)

    def _reject(
        self, reason: str, detail: str, duration: float, identity: PeerIdentity | None = None,
        *, resumed: bool | None = None,
    ) -> None:
        self.close_reason = reason
        self._metrics.inc("mbsec_tls_handshakes_total", outcome="failure", reason=reason)
        fields: dict[str, Any] = {
            "event.kind": "event",
            "event.category": ["network", "authentication"],
            "event.type": ["connection", "denied"],
            "event.action": "tls-handshake",
            "event.outcome": "failure",
            "event.reason": reason,
            "event.duration": int(duration * 1e9),
            "error.message": detail,
        }
        if identity is not None:
            fields.update(_identity_fields(identity))
        if resumed is not None:
            fields["tls.resumed"] = resumed
        self._log.warning("TLS client rejected", **fields)

    def _accept_identity(
        self, ssl_stream: trio.SSLStream[trio.abc.Stream], state: ProxyState, duration: float
    ) -> bool:
        # OpenSSL verifies nothing on a resumed handshake (not the chain's CAs, not the CRLs'
        # freshness), so the session cache is off (tls.disable_session_cache) and a resumed
        # handshake, possible only where that failed, is refused: every connection is a full
        # handshake.
        resumed = bool(ssl_stream.session_reused)
        der = ssl_stream.getpeercert(binary_form=True)
        if not der:
            self._reject("no_certificate", "the client sent no certificate", duration,
                         resumed=resumed)
            return False
        try:
            identity = parse_identity(der)
        except IdentityError as exc:
            self._reject(exc.reason, exc.message, duration, resumed=resumed)
            return False
        if resumed:
            self._reject("session_resumed", "a resumed TLS session is not accepted: every "
                         "connection must make a full handshake", duration, identity,
                         resumed=resumed)
            return False
        # Re-checked after the handshake as well: the state is read again, since a reload (new
        # CRL, new policy) may have happened during the handshake.
        state = self._state_fn()
        if state.tls.is_revoked(identity.issuer, identity.serial):
            self._reject("certificate_revoked", "serial is on the current CRL", duration, identity,
                         resumed=resumed)
            return False
        if identity.not_after < self._now():
            self._reject("certificate_expired", "certificate expired", duration, identity,
                         resumed=resumed)
            return False
        key = identity.subject
        if not self._identity_slots.claim_identity(key):
            self._reject(
                "too_many_connections_for_identity",
                f"more than {self._limits.max_per_identity} connections for this identity",
                duration,
                identity,
                resumed=resumed,
            )
            return False
        self._identity_key = key
        self.identity = identity
        # no peer address only happens on in-memory test streams: "unspecified" matches only
        # rules without a source restriction (or 0.0.0.0/0)
        self._principal = state.policy.principal(identity, self.peer_ip or "0.0.0.0")
        self._principal_generation = state.generation
        cipher = ssl_stream.cipher()
        tls_fields = {
            "tls.version": (ssl_stream.version() or "").removeprefix("TLSv"),
            "tls.version_protocol": "tls",
            "tls.cipher": cipher[0] if cipher else None,
            "tls.resumed": resumed,
        }
        roles = list(getattr(self._principal, "roles", ()) or ())
        ident = _identity_fields(identity)
        structlog.contextvars.bind_contextvars(
            **{
                "tls.client.x509.subject.common_name": identity.common_name,
                "tls.client.hash.sha256": identity.fingerprint_sha256,
                "user.name": identity.common_name,
                "user.roles": roles,
            }
        )
        self._metrics.inc("mbsec_tls_handshakes_total", outcome="success", reason="ok")
        self._metrics.observe("mbsec_tls_handshake_seconds", duration)
        self._log.info(
            "TLS client accepted",
            **{
                "event.kind": "event",
                "event.category": ["network", "authentication"],
                "event.type": ["connection", "start", "allowed"],
                "event.action": "tls-handshake",
                "event.outcome": "success",
                "event.duration": int(duration * 1e9),
                **tls_fields,
                **ident,
                "mbsec.role": identity.role,
            },
        )
        return True

    # -- request loop -------------------------------------------------------------------

    async def _serve_requests(self) -> None:
        assert self._ssl is not None
        if self._plane is not None:
            fd = socket_fd(self._ssl.transport_stream)
            if fd >= 0:
                await self._serve_in_plane(self._plane, fd)
                return
        self._io = _RecordIO(self._ssl, self._limits.idle_timeout)
        self._idle_base = trio.current_time()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._idle_watch)
            with self._reader_scope, contextlib.suppress(_Stopped):
                await self._read_loop(nursery)
            self._idle_scope.cancel()
            # reader finished (EOF, idle, drain): in-flight requests still complete

    async def _serve_in_plane(self, plane: DataPlane, fd: int) -> None:
        """Hand the connection to the threaded data plane and wait until it gives it back."""
        from mbsec.reactor import Client

        ssl_stream = self._ssl
        assert ssl_stream is not None
        # the data plane has no contextvars: the connection's fields travel on the logger
        self._set_log(self._log.bind(**structlog.contextvars.get_contextvars()))
        obj, incoming, outgoing, delayed = take_tls_state(ssl_stream)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def finished(broken: bool) -> None:  # called in the data-plane thread
            self._plane_broken = broken
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        client = Client(
            plane, self, fd, obj, incoming, outgoing, delayed,
            max_pipelined=self._limits.max_pipelined, idle_timeout=self._limits.idle_timeout,
            on_finished=finished,
        )
        self._client = client
        plane.adopt_threadsafe(client)
        try:
            await done.wait()
        finally:
            if not done.is_set():  # cancelled (drain deadline): take the socket back first
                plane.call_threadsafe(lambda: client.abort("server_shutdown"))
                with trio.move_on_after(CLOSE_TIMEOUT) as cs:
                    cs.shield = True
                    await done.wait()
            self._client = None

    async def _idle_watch(self) -> None:
        """Stop reading after ``idle_timeout`` without a byte from the client, unless a request
        is in flight (then the wait starts over, as a new full period)."""
        idle = self._limits.idle_timeout
        with self._idle_scope:
            while True:
                await trio.sleep_until(self._idle_base + idle)
                now = trio.current_time()
                if now < self._idle_base + idle:
                    continue  # data arrived meanwhile
                if self._inflight:
                    self._idle_base = now
                    continue
                self.close_reason = "idle_timeout"
                self._reader_scope.cancel()
                return

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        io = self._io
        assert io is not None
        frames = FrameBuffer()
        max_pipelined = self._limits.max_pipelined
        while True:
            try:
                data = await io.receive(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
                if self.close_reason == "unknown":
                    self.close_reason = "client_reset"
            if not data:
                if self.close_reason == "unknown":
                    self.close_reason = "client_closed"
                return
            self._idle_base = trio.current_time()
            self.bytes_in += len(data)
            frames.receive_data(data)
            adu = self._next_frame(frames)
            while adu is not None:
                t0 = time.monotonic()
                following = self._next_frame(frames)
                if following is None and not self._inflight:
                    # alone and nothing in flight: answer it here, no task to spawn
                    self._inflight = 1
                    self._inline = True
                    try:
                        await self._respond(adu, t0)
                    finally:
                        self._inflight -= 1
                        self._inline = False
                    if self._stop:
                        return
                else:
                    while self._inflight >= max_pipelined:
                        await self._slots.park()
                    self._inflight += 1
                    nursery.start_soon(self._handle, adu, t0, self._spawned)
                    self._spawned += 1
                adu = following

    def _next_frame(self, frames: FrameBuffer) -> Adu | None:
        try:
            return frames.next_frame()
        except RemoteProtocolError as exc:
            self.framing_error(exc)
            self.close_reason = exc.reason
            self._nursery.cancel_scope.cancel()  # nothing more from a broken stream
            raise _Stopped from None

    def framing_error(self, exc: RemoteProtocolError) -> None:
        self.errors += 1
        self._metrics.inc("mbsec_protocol_errors_total", reason=exc.reason)
        self._log.warning(
            "malformed Modbus frame, closing the connection",
            **{
                "event.kind": "event",
                "event.category": ["network", "intrusion_detection"],
                "event.type": ["connection", "denied"],
                "event.action": "modbus-framing-error",
                "event.outcome": "failure",
                "event.reason": exc.reason,
                "error.message": exc.message,
            },
        )

    async def _handle(self, adu: Adu, t0: float, seq: int) -> None:
        """One pipelined request in its own task. Tasks start in any order (trio runs a batch
        forwards or backwards), so each waits for its turn: the next one runs only once this
        one is on its way to the PLC (sent, or queued FIFO for a slot), and two writes a client
        pipelines reach the PLC in the order it sent them (over one PLC connection; with
        ``pool_size`` > 1 they may take different ones, see the README's known limits)."""
        try:
            while self._turn != seq:
                await self._turns.park()
            self._turn = seq + 1
            self._turns.unpark_all()  # they run when we first wait, i.e. inside exchange
            await self._respond(adu, t0)
        finally:
            self._inflight -= 1
            self._slots.unpark()

    async def _respond(self, adu: Adu, t0: float) -> None:
        try:
            pdu = await self._process(adu, t0)
        except _Closing as exc:
            self.close_reason = exc.reason
            self._nursery.cancel_scope.cancel()
            return
        await self._send(encode_adu(adu.transaction_id, adu.unit_id, pdu))
        self._metrics.observe("mbsec_request_seconds", time.monotonic() - t0)

    async def _send(self, data: bytes) -> None:
        io = self._io
        assert io is not None
        try:
            # A client that stops reading its replies must not hold its slot forever.
            sent = await io.send(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if self.close_reason == "unknown":
                self.close_reason = "client_gone"
            self._reader_scope.cancel()
            return
        if not sent:
            self.close_reason = "client_stalled"
            self._nursery.cancel_scope.cancel()
            return
        self.bytes_out += len(data)

    def _rebind_principal(self, state: ProxyState) -> None:
        assert self.identity is not None
        self._principal = state.policy.principal(self.identity, self.peer_ip or "0.0.0.0")
        self._principal_generation = state.generation
        self._decided.clear()  # decided by the old policy
        roles = {"user.roles": list(getattr(self._principal, "roles", ()) or ())}
        if self._client is not None:  # in the data-plane thread: no contextvars there
            self._set_log(self._log.bind(**roles))
        else:
            structlog.contextvars.bind_contextvars(**roles)

    async def _process(self, adu: Adu, t0: float) -> bytes:
        """Decide one request; return the PDU to send back (the PLC's reply or an exception)."""
        fwd = self.decide(adu, t0)
        if fwd is None:
            raise _Closing(self.close_reason)
        if isinstance(fwd, bytes):
            return fwd
        try:
            reply = await self._upstreams.exchange(adu.unit_id, fwd.request, adu.pdu)
        except UpstreamError as exc:
            return self.complete(adu, fwd, None, exc)
        except BaseException:
            self.abandon(fwd)
            raise
        return self.complete(adu, fwd, reply, None)

    def decide(self, adu: Adu, t0: float) -> bytes | Forward | None:
        """Everything before the PLC: parse, policy, rate limit. Returns the answer PDU when the
        request goes no further, a :class:`Forward` when it goes to the PLC, or None when it
        broke the connection (logged, ``close_reason`` set)."""
        self.requests += 1
        pdu = adu.pdu
        fc = pdu[0] if pdu else 0
        state = self._decision_state_fn()
        if state.generation != self._principal_generation:
            self._rebind_principal(state)  # a reload: roles come from the new policy's mapping
        key = (adu.unit_id, pdu)
        hit = self._decided.get(key)
        if hit is not None:
            request, access, decision = hit
        else:
            try:
                request = parse_request(pdu)
            except RemoteProtocolError as exc:
                return self._invalid(adu, fc, t0, exc)
            principal = self._principal
            assert principal is not None
            access = request.access()
            decision = state.policy.evaluate(principal, adu.unit_id, access)
            if access.write is None and len(self._decided) < DECIDED_MAX:
                self._decided[key] = (request, access, decision)
        principal = self._principal
        assert principal is not None
        fname = FUNCTION_NAMES.get(fc) or str(fc)
        if not decision.allowed:
            return self._deny(adu, fc, access, t0, decision.rule_id, decision.reason,
                              decision.exception_code, "deny")
        if decision.outcome == "would_deny":
            self._log.warning(
                "request would be denied (monitor mode), forwarded",
                **self._request_fields(adu, fc, access, t0),
                **{
                    "event.type": ["protocol", "info"],
                    "event.outcome": "success",
                    "event.reason": decision.reason,
                    "rule.id": decision.rule_id,
                    "modbus.decision": "would_deny",
                },
            )
        limiter = state.limiter
        limited = limiter.acquire(principal, access)
        if limited is not None:
            return self._deny(adu, fc, access, t0, decision.rule_id, limited,
                              RATE_LIMIT_EXCEPTION, "rate_limited")
        return Forward(request, access, decision, principal, limiter, fname, t0)

    def _invalid(self, adu: Adu, fc: int, t0: float, exc: RemoteProtocolError) -> bytes | None:
        if exc.action is Action.CLOSE or exc.exception_code is None:
            self.framing_error(exc)
            self.close_reason = exc.reason
            return None
        self.errors += 1
        self._metrics.inc("mbsec_protocol_errors_total", reason=exc.reason)
        self._log.warning(
            "invalid Modbus request",
            **self._request_fields(adu, fc, None, t0),
            **{
                "event.type": ["protocol", "denied"],
                "event.outcome": "failure",
                "event.reason": exc.reason,
                "modbus.decision": "invalid",
                "modbus.exception_code": exc.exception_code,
                "error.message": exc.message,
            },
        )
        return exception_pdu(fc & 0x7F, exc.exception_code)

    def abandon(self, fwd: Forward) -> None:
        """The client went away before the reply: only the rate-limit slot is given back."""
        fwd.limiter.release(fwd.principal)

    def complete(
        self, adu: Adu, fwd: Forward, reply: UpstreamReply | None, error: UpstreamError | None
    ) -> bytes:
        """Everything after the PLC: map a failure, check the reply against the rule's limits,
        log; returns the PDU for the client."""
        fwd.limiter.release(fwd.principal)
        fc = adu.pdu[0]
        fname = fwd.fname
        access = fwd.access
        decision = fwd.decision
        t0 = fwd.t0
        if error is not None or reply is None:
            assert error is not None
            self.errors += 1
            self._metrics.inc("mbsec_requests_total", decision="upstream_error", function=fname)
            self._log.warning(
                "PLC did not answer" if error.reason != "client_gone"
                else "client went away before its request was sent; withdrawn",
                **self._request_fields(adu, fc, access, t0),
                **{
                    "event.type": ["protocol", "error"],
                    "event.outcome": "failure",
                    "event.reason": error.reason,
                    "rule.id": decision.rule_id,
                    "modbus.decision": "allow",
                    "modbus.exception_code": error.exception_code,
                    "error.message": error.message,
                },
            )
            return exception_pdu(fc, error.exception_code)
        limit = decision.max_response_bytes
        if limit is not None and len(reply.pdu) > limit:
            self.errors += 1
            self._metrics.inc("mbsec_requests_total", decision="response_too_large", function=fname)
            self._log.warning(
                "PLC reply exceeds the policy's max_response_bytes, withheld",
                **self._request_fields(adu, fc, access, t0),
                **{
                    "event.type": ["protocol", "denied"],
                    "event.outcome": "failure",
                    "event.reason": "response_too_large",
                    "rule.id": decision.rule_id,
                    "modbus.decision": "allow",
                    "modbus.exception_code": RESPONSE_LIMIT_EXCEPTION,
                    "mbsec.response_bytes": len(reply.pdu),
                    "mbsec.max_response_bytes": limit,
                },
            )
            return exception_pdu(fc, RESPONSE_LIMIT_EXCEPTION)
        self.allowed += 1
        cell = self._allowed_cells.get(fname)
        if cell is None:
            cell = self._allowed_cells[fname] = counter(
                self._metrics, "mbsec_requests_total", decision="allow", function=fname
            )
        cell.value += 1
        if self._log_allowed is not None:
            extra: dict[str, Any] = {
                "event.type": ["protocol", "allowed"],
                "event.outcome": "success",
                "rule.id": decision.rule_id,
                "modbus.decision": decision.outcome,
                "mbsec.target": reply.target,
            }
            code = getattr(reply.response, "exception_code", None)
            if code is not None:
                extra["modbus.exception_code"] = code
            self._log_allowed("request forwarded", **self._request_fields(adu, fc, access, t0),
                              **extra)
        return reply.pdu

    def _deny(
        self,
        adu: Adu,
        fc: int,
        access: Any,
        t0: float,
        rule_id: str,
        reason: str,
        code: int,
        decision: str,
    ) -> bytes:
        self.denied += 1
        self._metrics.inc(
            "mbsec_requests_total", decision=decision, function=FUNCTION_NAMES.get(fc, str(fc))
        )
        self._log.warning(
            "request denied",
            **self._request_fields(adu, fc, access, t0),
            **{
                "event.type": ["protocol", "denied"],
                "event.outcome": "failure",
                "event.reason": reason,
                "rule.id": rule_id,
                "modbus.decision": decision,
                "modbus.exception_code": code,
            },
        )
        return exception_pdu(fc, code)

    def _request_fields(self, adu: Adu, fc: int, access: Any, t0: float) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event.kind": "event",
            "event.category": ["network"],
            "event.action": "modbus-request",
            "event.duration": int((time.monotonic() - t0) * 1e9),
            "modbus.transaction_id": adu.transaction_id,
            "modbus.unit_id": adu.unit_id,
            "modbus.function_code": fc,
            "modbus.function": FUNCTION_NAMES.get(fc, f"function_{fc}"),
        }
        if access is not None:
            span = access.write or access.read
            if span is not None:
                fields["modbus.address"] = span[0]
                fields["modbus.quantity"] = access.quantity
            if access.subfunction is not None:
                fields["modbus.subfunction"] = access.subfunction
        return fields

    # -- close ---------------------------------------------------------------------------

    async def _close(self) -> None:
        stream: trio.abc.AsyncResource = self._ssl if self._ssl is not None else self._raw
        with trio.move_on_after(CLOSE_TIMEOUT) as cs:
            cs.shield = True
            try:
                io = self._io
                if self._plane_broken or (io is not None and (io.broken or io.unsent)):
                    await self._raw.aclose()  # no clean close_notify after a broken record
                elif self._handshake_done and self._ssl is not None:
                    await self._ssl.aclose()  # close_notify, then TCP close
                else:
                    await self._raw.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
        if cs.cancelled_caught:
            await trio.aclose_forcefully(stream)

    def _log_closed(self) -> None:
        duration = time.monotonic() - self.started
        self._log.info(
            "connection closed",
            **{
                "event.kind": "event",
                "event.category": ["network"],
                "event.type": ["connection", "end"],
                "event.action": "connection-closed",
                "event.outcome": "success",
                "event.reason": self.close_reason,
                "event.duration": int(duration * 1e9),
                "source.bytes": self.bytes_in,
                "destination.bytes": self.bytes_out,
                "mbsec.requests": self.requests,
                "mbsec.allowed": self.allowed,
                "mbsec.denied": self.denied,
                "mbsec.errors": self.errors,
            },
        )


def _identity_fields(identity: PeerIdentity) -> dict[str, Any]:
    return {
        "tls.client.x509.subject.common_name": identity.common_name,
        "tls.client.x509.subject.distinguished_name": identity.subject,
        "tls.client.x509.issuer.distinguished_name": identity.issuer,
        "tls.client.x509.serial_number": format(identity.serial, "X"),
        "tls.client.x509.not_after": identity.not_after.isoformat(),
        "tls.client.hash.sha256": identity.fingerprint_sha256,
    }
