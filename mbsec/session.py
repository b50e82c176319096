"""One client connection: TLS handshake -> identity -> the request path -> close line.

The session owns every failure of its handshake and maps library errors at this boundary: a
failed handshake becomes an event with a reason slug (and the fatal alert is flushed to the
client: the handshake loop, :mod:`mbsec.tls_stream`, leaves it in the BIO as trio's
``SSLStream`` does). After the handshake the connection
goes to the data plane (:mod:`mbsec.path`): the request path's core decides, the epoll driver
moves the bytes, and the session gets the connection back to close it and write its close line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import trio
from structlog.typing import FilteringBoundLogger

from mbsec import events, trio_private
from mbsec.handshake import Acceptance, IdentitySlots, Refusal, failed, not_completed, verdict
from mbsec.identity import PeerIdentity
from mbsec.metrics import MetricsLike, NullMetrics, incrementer, lazy_observer
from mbsec.path.decide import Decisions, Forward, ProxyState, StateCell
from mbsec.settings import LimitsSettings
from mbsec.sockready import readable_now
from mbsec.tls_sniff import HandshakeTap
from mbsec.tls_stream import ServerTlsStream

if TYPE_CHECKING:
    from mbsec.audit_fast import ConnectionLines
    from mbsec.path.client import ClientConn
    from mbsec.path.epoll import ClientIO, DataPlane

__all__ = ["Forward", "ProxyState", "Session", "set_conn_id_space"]

ALERT_FLUSH_TIMEOUT = 1.0
CLOSE_TIMEOUT = 1.0

_conn_ids = itertools.count(1)

#: (host, port) of one end of a connection; (None, None) on an in-memory test stream
Address = tuple[str | None, int | None]


def set_conn_id_space(first: int, step: int) -> None:
    """Worker processes number connections ``first, first + step, ...`` so ids stay unique
    across the workers of one proxy."""
    global _conn_ids
    _conn_ids = itertools.count(first, step)


class EdgeHooks(Protocol):
    """What the proxy's admission (mbsec/admission.py) learns from a handshake, and where
    the rejections of peers without a certificate go (aggregated, not written one by one)."""

    def heard(self) -> None: ...  # the first byte arrived: not a silent connection

    def established(self) -> None: ...  # the handshake succeeded: it leaves the handshakes

    def rejected(self, event: events.Event) -> None: ...  # unauthenticated rejection


class UnlimitedIdentities:
    def claim_identity(self, key: str) -> bool:
        return True

    def release_identity(self, key: str) -> None:
        pass


def take_tls_state(
    ssl_stream: trio.SSLStream[Any] | ServerTlsStream,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """The ``SSLStream``'s own ``SSLObject`` and memory BIOs, and the TLS 1.3 tickets it held
    back after the handshake (the private access itself is in :mod:`mbsec.trio_private`)."""
    return trio_private.take_tls_state(ssl_stream)


def _addr(sockname: Any) -> tuple[str | None, int | None]:
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    return None, None


def stream_addresses(stream: trio.abc.Stream) -> tuple[Address, Address]:
    """(peer, local) addresses of a SocketStream; (None, None) for in-memory test streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return (None, None), (None, None)
    try:
        return _addr(sock.getpeername()), _addr(sock.getsockname())
    except OSError:
        return (None, None), (None, None)


def local_address(stream: trio.abc.Stream) -> Address:
    """The local address of a SocketStream; (None, None) for in-memory test streams."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return None, None
    try:
        return _addr(sock.getsockname())
    except OSError:
        return None, None


class _TappedStream(trio.abc.Stream):
    """The client's raw stream, with what it receives fed to a :class:`HandshakeTap` until
    :meth:`stop_tap` (the handshake is over). Public trio API only: it forwards the four
    ``Stream`` methods. After the handshake the data plane takes the socket from the session's
    raw stream, not from this wrapper."""

    def __init__(self, raw: trio.abc.Stream, tap: HandshakeTap) -> None:
        self._raw = raw
        self._tap: HandshakeTap | None = tap

    def stop_tap(self) -> None:
        if self._tap is not None:
            self._tap.stop()
            self._tap = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._raw.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._raw.receive_some(max_bytes)
        tap = self._tap
        if tap is not None and data:
            tap.feed(data)
        return data

    async def aclose(self) -> None:
        await self._raw.aclose()


class HandshakeCounters:
    """The series every accepted handshake updates, bound once per proxy instead of looked up
    by name and labels per connection (benchmarks/README.md, "Issue 10 item 3: the
    control-plane side per connection")."""

    __slots__ = ("accepted", "seconds")

    def __init__(self, metrics: MetricsLike) -> None:
        self.accepted = incrementer(metrics, "mbsec_tls_handshakes_total", outcome="success",
                                    reason="ok")
        self.seconds = lazy_observer(metrics, "mbsec_tls_handshake_seconds")


class Session:
    """Serve one accepted client stream until it closes; never raises for client faults."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        state: Callable[[], ProxyState],
        limits: LimitsSettings,
        log: FilteringBoundLogger,
        data_plane: DataPlane,
        metrics: MetricsLike | None = None,
        identity_slots: IdentitySlots | None = None,
        allowed_requests: str = "debug",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        decision_state: Callable[[], ProxyState] | StateCell | None = None,
        sink: Any = None,
        on_sink_failure: str = "refuse_writes",
        edge: EdgeHooks | None = None,
        lines: ConnectionLines | None = None,
        addresses: tuple[Address, Address | None] | None = None,
        spoke: bool = False,
        counters: HandshakeCounters | None = None,
    ) -> None:
        """``addresses``: (peer, local) as the accept loop already has them (local None: not
        known, asked of the socket), so the session does not ask the socket again; ``spoke``:
        the accept loop saw the first byte waiting, so the session does not look again."""
        self._raw = stream
        #: the accepted and closed lines from shared templates (mbsec.audit_fast); None:
        #: through the logger
        self._lines = lines
        #: what those lines' template is shared by (certificate, roles), after the handshake
        self._line_key: tuple[str, tuple[str, ...]] | None = None
        #: the proxy's admission; None: rejections are written one by one (tests, library use)
        self._edge = edge
        self._handshake_scope: trio.CancelScope | None = None
        self._evicted = False
        self._state_fn = state  # handshake, CRL re-check, first principal
        #: requests: the proxy switches it together with the routes (default: ``state``)
        self._decision_state_fn = decision_state if decision_state is not None else state
        self._limits = limits
        self._log = log
        self._metrics: MetricsLike = metrics or NullMetrics()
        self._counters = counters or HandshakeCounters(self._metrics)
        self._spoke = spoke
        self._identity_slots = identity_slots or UnlimitedIdentities()
        self._now = now
        self._allowed_level = allowed_requests
        self._sink = sink
        self._on_sink_failure = on_sink_failure
        self._plane = data_plane
        self._conn: ClientConn | None = None  # set while the data plane owns the connection
        self._plane_broken = False
        self.decisions: Decisions | None = None
        self.conn_id = next(_conn_ids)
        if addresses is None:
            peer, local = stream_addresses(stream)
        else:
            peer, local_known = addresses
            local = local_known if local_known is not None else local_address(stream)
        (self.peer_ip, self.peer_port), (self.local_ip, self.local_port) = peer, local
        self._ssl: ServerTlsStream | None = None
        self._handshake_done = False
        self._identity_key: str | None = None
        self._stop = False
        self.identity: PeerIdentity | None = None
        #: (issuer, serial) of the CAs above the leaf that the client presented, when
        #: ``client_ca`` does not hold its issuer (mbsec.tls_sniff.issuing_cas); else empty
        self.issuing_cas: tuple[tuple[str, int], ...] = ()
        self.close_reason = "unknown"
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = time.monotonic()

    # -- public ------------------------------------------------------------------------

    def note_close_reason(self, reason: str) -> None:
        """The first reason wins: it is the cause, later ones are consequences."""
        if self.close_reason == "unknown":
            self.close_reason = reason

    def stop_reading(self, reason: str = "server_shutdown") -> None:
        """Drain: take no new requests; those in flight still get their replies."""
        self.note_close_reason(reason)
        self._stop = True
        conn = self._conn
        if conn is not None:
            self._plane.call_threadsafe(lambda: conn.stop_reading(reason))

    def evict(self) -> None:
        """Admission needs this connection's handshake place (mbsec/admission.py): end the
        handshake now (reason ``handshake_evicted``)."""
        self._evicted = True
        if self._handshake_scope is not None:
            self._handshake_scope.cancel()

    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(**events.connection_context(
            self.conn_id, self.peer_ip, self.peer_port, self.local_ip, self.local_port))
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

    async def _first_byte(self, deadline: float) -> bool:
        """Wait for the peer's first byte (its ClientHello) before building any TLS state: a
        silent connection costs its socket and this wait, nothing more, and an eviction or
        the deadline ends it cheaply (a silent flood churns through here many times a
        second). False: evicted or timed out."""
        sock = getattr(self._raw, "socket", None)
        if sock is None:  # in-memory test streams
            return True
        if self._evicted:
            return False
        # usually it is there (and the accept loop may have seen it): then no trip through
        # trio's epoll loop
        if not self._spoke and not readable_now(sock):
            with trio.move_on_at(deadline) as cs:
                self._handshake_scope = cs
                if self._evicted:
                    cs.cancel()
                await trio.lowlevel.wait_readable(sock)
            self._handshake_scope = None
            if cs.cancelled_caught:
                return False
        if self._edge is not None:
            self._edge.heard()
        return True

    async def _handshake(self) -> bool:
        state = self._state_fn()
        t0 = time.monotonic()
        deadline = trio.current_time() + state.tls.handshake_timeout
        if not await self._first_byte(deadline):
            self._reject(not_completed(self._evicted, state.tls.handshake_timeout),
                         time.monotonic() - t0)
            return False
        # What the client sends during the handshake is recorded (bounded): under TLS 1.2 its
        # Certificate message is in clear, so a rejection by OpenSSL can still name it.
        tap = HandshakeTap()
        # on a socket the handshake loop reads and writes the fd directly and feeds the tap
        # itself (its transport then only closes); other streams go through _TappedStream
        sock = getattr(self._raw, "socket", None)
        tapped = _TappedStream(self._raw, tap) if sock is None else None
        ssl_stream = ServerTlsStream(tapped if tapped is not None else self._raw,
                                     state.tls.context,
                                     fd=sock.fileno() if sock is not None else None,
                                     on_receive=tap.feed)
        self._ssl = ssl_stream
        error: BaseException | None = None
        timed_out = False
        with trio.move_on_at(deadline) as cs:
            self._handshake_scope = cs
            if self._evicted:
                cs.cancel()
            try:
                await ssl_stream.do_handshake()
            except trio.BrokenResourceError as exc:
                error = exc.__cause__ if exc.__cause__ is not None else exc
            except trio.ClosedResourceError as exc:
                error = exc
        if cs.cancelled_caught:
            timed_out = True
        duration = time.monotonic() - t0
        if tapped is not None:
            tapped.stop_tap()
        else:
            tap.stop()
        keylog = state.tls.keylog  # every handshake takes its secret out, used or not
        secret = keylog.take(tap.client_random()) if keylog is not None else None
        self._handshake_done = not timed_out and error is None
        self._handshake_scope = None
        if timed_out or error is not None:
            await self._flush_alert(ssl_stream)
            self._reject(not_completed(self._evicted, state.tls.handshake_timeout) if timed_out
                         else failed(error, tap, secret), duration)
            return False
        return self._accept_identity(ssl_stream, duration, tap, secret)

    async def _flush_alert(self, ssl_stream: ServerTlsStream) -> None:
        """Send the fatal alert OpenSSL wrote into the outgoing BIO before failing.

        The handshake loop (like trio's ``_retry``) raises on SSLError before it reads the
        BIO, so without this the
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

    def _reject(self, refusal: Refusal, duration: float) -> None:
        """Count and log a refusal. One of a peer that proved nothing (``authenticated``
        False) goes through the admission's rejection log, which aggregates repeats; a
        verified certificate's rejection is always written."""
        reason = refusal.reason
        self.close_reason = reason
        self._metrics.inc("mbsec_tls_handshakes_total", outcome="failure", reason=reason)
        if reason in events.INCIDENT_REASONS:  # a revoked certificate tried to get in
            self._metrics.inc("mbsec_revoked_certificate_seen_total", stage="handshake")
        event = events.tls_handshake_rejected(reason, refusal.detail, duration,
                                              refusal.identity, refusal.resumed)
        if not refusal.authenticated and self._edge is not None:
            self._edge.rejected(event)
        else:
            events.emit(self._log, event)

    def _accept_identity(
        self, ssl_stream: ServerTlsStream, duration: float, tap: HandshakeTap | None = None,
        secret: bytes | None = None,
    ) -> bool:
        outcome = verdict(
            der=ssl_stream.getpeercert(binary_form=True),
            resumed=bool(ssl_stream.session_reused), state=self._state_fn, now=self._now(),
            slots=self._identity_slots, max_per_identity=self._limits.max_per_identity,
            tap=tap, secret=secret)
        if not isinstance(outcome, Acceptance):
            self._reject(outcome, duration)
            return False
        identity, state = outcome.identity, outcome.state
        resumed = False  # a resumed session is refused (mbsec.handshake.verdict)
        self._identity_key = identity.subject
        self.identity = identity
        self.issuing_cas = outcome.issuing_cas
        if self._edge is not None:
            self._edge.established()
        # no peer address only happens on in-memory test streams: "unspecified" matches only
        # rules without a source restriction (or 0.0.0.0/0)
        principal = state.policy.principal(identity, self.peer_ip or "0.0.0.0")
        cipher = ssl_stream.cipher()
        roles = list(getattr(principal, "roles", ()) or ())
        structlog.contextvars.bind_contextvars(**events.peer_context(identity, roles))
        self._counters.accepted()
        self._counters.seconds(duration)
        accepted = events.tls_handshake_accepted(
            duration, identity, ssl_stream.version(), cipher[0] if cipher else None, resumed)
        if self._lines is not None:
            self._line_key = (identity.fingerprint_sha256, tuple(roles))
            self._lines.write(self._log, accepted, (
                "accepted", self._line_key, accepted.fields["tls.version"],
                accepted.fields["tls.cipher"], resumed))
        else:
            events.emit(self._log, accepted)
        return True

    # -- requests: the data plane ------------------------------------------------------

    async def _serve_requests(self) -> None:
        """Hand the connection to the data plane and wait until it gives it back."""
        from mbsec.path.client import ClientConn
        from mbsec.path.epoll import ClientIO

        ssl_stream = self._ssl
        assert ssl_stream is not None and self.identity is not None
        sock = getattr(self._raw, "socket", None)  # transport_stream is the _TappedStream
        if sock is None:  # pragma: no cover - the proxy only serves socket streams
            self.note_close_reason("internal_error")
            return
        # the data plane has no contextvars: the connection's fields travel on the logger
        log = self._log.bind(**structlog.contextvars.get_contextvars())
        decisions = Decisions(
            state=self._decision_state_fn, identity=self.identity,
            peer_ip=self.peer_ip or "0.0.0.0", log=log, metrics=self._metrics,
            allowed_requests=self._allowed_level, sink=self._sink,
            on_sink_failure=self._on_sink_failure)
        self.decisions = decisions
        obj, incoming, outgoing, delayed = take_tls_state(ssl_stream)
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        limits = self._limits
        fd = sock.fileno()

        def finished(broken: bool) -> None:  # called in the data-plane thread
            self._plane_broken = broken
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        def make(plane: DataPlane, now: float) -> ClientIO:  # runs in the data-plane thread
            try:
                conn = ClientConn(decisions, plane.router, max_pipelined=limits.max_pipelined,
                                  idle_timeout=limits.idle_timeout,
                                  request_complete_timeout=limits.request_complete_timeout,
                                  now=now)
                self._conn = conn
                if self._stop:  # drained or revoked before the plane got it
                    conn.stop_reading(self.close_reason)
                return ClientIO(plane, conn, fd, obj, incoming, outgoing, delayed, finished)
            except BaseException:
                # a bug: the plane never got the connection, so it never hands it back; the
                # session ends it here (the plane logs the error), or it would wait forever
                self._conn = None
                self.note_close_reason("internal_error")
                finished(True)
                raise

        self._plane.adopt_threadsafe(make)
        try:
            await done.wait()
        finally:
            if not done.is_set():  # cancelled (drain deadline): take the socket back first
                taken = self._conn
                if taken is not None:
                    self._plane.call_threadsafe(lambda: taken.abort("server_shutdown"))
                    with trio.move_on_after(CLOSE_TIMEOUT) as cs:
                        cs.shield = True
                        await done.wait()
            conn = self._conn
            if conn is not None:
                self.note_close_reason(conn.close_reason)
                self.bytes_in = conn.bytes_in
                self.bytes_out = conn.bytes_out
            self._conn = None

    # -- close ---------------------------------------------------------------------------

    async def _close(self) -> None:
        sock = getattr(self._raw, "socket", None)
        if sock is not None and (self._plane_broken or not self._handshake_done
                                 or self._ssl is None):
            # nothing to send first (no close_notify after a broken record or without a
            # handshake): the socket is closed now, which cannot block, without the shielded
            # cancel scope and the trip through trio's loop of the stream's aclose
            sock.close()
            return
        stream: trio.abc.AsyncResource = self._ssl if self._ssl is not None else self._raw
        with trio.move_on_after(CLOSE_TIMEOUT) as cs:
            cs.shield = True
            try:
                if self._plane_broken:
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
        d = self.decisions
        closed = events.connection_closed(
            self.close_reason, duration, self.bytes_in, self.bytes_out,
            d.requests if d else 0, d.allowed if d else 0, d.denied if d else 0,
            d.errors if d else 0)
        if self._lines is not None:
            self._lines.write(self._log, closed, ("closed", self._line_key))
        else:
            events.emit(self._log, closed)
