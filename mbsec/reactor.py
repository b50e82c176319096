"""The threaded data plane: client connections after their handshake, and the PLC links.

Why a thread of its own: under trio every request costs two task wake-ups (client readable, PLC
readable), and each wake-up is a pass through trio's run loop, an ``epoll_ctl`` re-arm and a
coroutine switch. Measured on the benchmark box that is most of the 56 CPU µs a request cost,
against 24 µs for stunnel (see ``benchmarks/README.md``). Here one thread blocks in
``epoll_wait`` on level-triggered registrations made once per socket, handles every ready socket
in a plain function call, and writes all requests queued for a PLC link in one ``write`` at the
end of the pass, so a busy link carries many ADUs per system call.

Trio keeps the control plane: accept, limits, the TLS handshake (with the alert flush), signals,
reload, drain, metrics. A session hands its connection over with :meth:`DataPlane.adopt` and
gets it back (for the close and the close line) when the data plane is done with it. The
decisions themselves are the session's own (``Session.decide``/``Session.complete``), shared
with the trio data plane (``data_plane = "trio"``), so both engines decide alike.

Thread rules: everything below runs in the data-plane thread, except the ``*_threadsafe``
entry points and :meth:`DataPlane.stop`, which only queue a call and wake the loop. Results go
back to trio with ``TrioToken.run_sync_soon``.

Upstream semantics are those of :mod:`mbsec.upstream` (proxy-owned transaction ids, depth,
FIFO slot queue, deadlines, dropped late replies, reset on anything unexpected, backoff, never
a retry), with the same events and metrics.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import ipaddress
import itertools
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from mbsec.metrics import observer
from mbsec.modbus.errors import ProtocolError, RemoteProtocolError
from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu
from mbsec.upstream import (
    EXPIRED_MAX,
    RECEIVE_SIZE,
    RETIRE_GRACE,
    MetricsLike,
    PathUnavailable,
    ReplyProblem,
    TargetNoResponse,
    TidBook,
    UpstreamError,
    UpstreamReply,
    Upstreams,
    UpstreamTarget,
    check_reply,
    configure_socket,
    connect_failed,
    connection_reset,
    dropped_late_reply,
    reset_error,
    unknown_tid,
)

if TYPE_CHECKING:
    from mbsec.session import Forward, Session

__all__ = ["DataPlane", "compiled"]


def compiled() -> bool:
    """True when this module runs compiled by mypyc (setup.py), False when interpreted."""
    return __file__.endswith(".so")

STOP_TIMEOUT = 5.0  # seconds stop() waits for the data-plane thread
TIMERS_COMPACT_MIN = 4096  # heap size from which cancelled timers are swept out
_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP


class _Timer:
    """A heap entry; ``cancel`` makes it a no-op (lazy deletion)."""

    __slots__ = ("fn", "when")

    def __init__(self, when: float, fn: Callable[[], None] | None) -> None:
        self.when = when
        self.fn = fn

    def cancel(self) -> None:
        self.fn = None


class DataPlane:
    """One epoll loop in one thread for all adopted connections and all PLC links."""

    def __init__(
        self,
        targets: Iterable[UpstreamTarget],
        *,
        log: Any,
        metrics: MetricsLike,
        busy_poll: float = 0.0,
        on_fatal: Callable[[], None] | None = None,
    ) -> None:
        self.log = log
        self.metrics = metrics
        self.observe_request = observer(metrics, "mbsec_request_seconds")
        self._busy_poll = busy_poll
        self._on_fatal = on_fatal
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._compact_at = TIMERS_COMPACT_MIN
        self._seq = itertools.count()
        self._dirty: list[_Link] = []  # links with queued requests to write at the end of a pass
        self._dirty_clients: list[Client] = []  # clients with replies to write at the end
        self.now = time.monotonic()
        self._running = False
        self._worker: threading.Thread | None = None
        self._wake_lock = threading.Lock()
        self._stopped = False
        self._pools: dict[str, _Pool] = {}
        self._retired: set[_Pool] = set()  # replaced by a reload, still finishing requests
        self._routes: dict[int, _Pool] = {}
        self._install(list(targets))

    # -- trio side ------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._worker = threading.Thread(target=self._run, name="mbsec-data-plane", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Close every PLC link and end the thread (adopted clients must be finished first)."""
        if self._worker is None:
            return
        self.call_threadsafe(self._shutdown)
        self._worker.join(timeout=STOP_TIMEOUT)
        wedged = self._worker.is_alive()
        self._worker = None
        with self._wake_lock:
            self._stopped = True  # a late call_threadsafe (a resolver thread) is dropped
            if not wedged:  # a wedged thread may still use them: leave them to the exit
                self._ep.close()
                os.close(self._wake_fd)
        if wedged:  # pragma: no cover - only a bug (or a blocked log sink) gets here
            self._bug(RuntimeError(f"data plane did not stop within {STOP_TIMEOUT:g} s"))

    def call_threadsafe(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` in the loop; False when the plane has stopped (``fn`` is dropped)."""
        with self._wake_lock:
            if self._stopped:
                return False
            self._calls.append(fn)
            os.eventfd_write(self._wake_fd, 1)
            return True

    def replace_targets_threadsafe(
        self, targets: Iterable[UpstreamTarget], then: Callable[[], None] | None = None
    ) -> threading.Event:
        """Reload: validated here (``ValueError`` keeps the running set), applied in the loop,
        with ``then`` in the same step (the proxy switches its decision state there).

        The returned event is set once applied, so a caller can wait until every request
        the loop reads from then on sees the new state."""
        new = list(targets)
        Upstreams.check_targets(new)
        applied = threading.Event()

        def apply() -> None:
            try:
                self._install(new)
                if then is not None:
                    then()
            finally:
                applied.set()

        if self._worker is None:  # not running: nothing can race with us
            apply()
        elif not self.call_threadsafe(apply):
            applied.set()  # stopped: there is no loop left to read a request
        return applied

    # -- loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - the loop itself failed: a bug
            self._bug(exc, fatal=True)
            if self._on_fatal is not None:
                self._on_fatal()

    def _loop(self) -> None:
        ep = self._ep
        handlers = self._handlers
        timers = self._timers
        dirty = self._dirty
        dirty_clients = self._dirty_clients
        wake = self._wake_fd
        spin = self._busy_poll
        active = False
        while self._running:
            if self._calls:
                timeout = 0.0
            elif timers:
                timeout = max(0.0, timers[0][0] - time.monotonic())
            else:
                timeout = -1.0
            if spin and active and timeout != 0.0:
                # busy poll: while traffic flows, the next request or reply is picked up
                # without a sleep and a wake-up (opt-in: it costs CPU, see docs/config.md)
                end = time.monotonic() + spin
                events = ep.poll(0)
                while not events and time.monotonic() < end:
                    events = ep.poll(0)
                if not events:
                    if timers:
                        timeout = max(0.0, timers[0][0] - time.monotonic())
                    events = ep.poll(timeout)
            else:
                events = ep.poll(timeout)
            active = bool(events)
            self.now = now = time.monotonic()
            for fd, ev in events:
                if fd == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
                    continue
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception as exc:
                        self._contain(handler, exc)
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                fn = timer.fn
                if fn is not None:
                    timer.fn = None
                    try:
                        fn()
                    except Exception as exc:
                        self._contain(fn, exc)
            while self._calls:
                call = self._calls.popleft()
                try:
                    call()
                except Exception as exc:
                    self._contain(call, exc)
            # a failed flush can start requests on other links, a client's flush can resume
            # its reading and start requests: flush until nothing is left
            while dirty or dirty_clients:
                self._flush(dirty)
                self._flush(dirty_clients)

    def _flush(self, pending: list[_Link] | list[Client]) -> None:
        """End of a pass: each link writes its queued requests, each client its replies."""
        while pending:
            owner = pending.pop()
            try:
                owner.flush()
            except Exception as exc:
                self._contain(owner.flush, exc)

    def _contain(self, fn: Callable[..., Any], exc: Exception) -> None:
        """A handler failed (a bug, or a log sink that raises): log it and close the object
        it belongs to, so a half-updated connection cannot hang with requests in flight."""
        self._bug(exc)
        owner = getattr(fn, "__self__", None)
        try:
            if isinstance(owner, (Client, _Link)):
                owner.crashed()
        except Exception as again:  # pragma: no cover - the cleanup failed too
            self._bug(again)

    def _bug(self, exc: BaseException, *, fatal: bool = False) -> None:
        """A bug must cost one event, never the data plane (``fatal``: the loop itself died)."""
        (self.log.critical if fatal else self.log.error)(
            "data plane stopped" if fatal else "data plane error",
            **{
                "event.kind": "event",
                "event.category": ["process"],
                "event.type": ["error"],
                "event.action": "data-plane-error",
                "event.outcome": "failure",
                "error.type": type(exc).__name__,
                "error.message": str(exc),
            },
        )

    def _shutdown(self) -> None:
        for pool in [*self._pools.values(), *self._retired]:
            pool.close("shutdown", "upstream pool stopped")
        self._retired.clear()
        self._running = False

    def timer(self, delay: float, fn: Callable[[], None]) -> _Timer:
        t = _Timer(time.monotonic() + delay, fn)
        timers = self._timers
        heapq.heappush(timers, (t.when, next(self._seq), t))
        if len(timers) > self._compact_at:
            self.compact_timers()
        return t

    def compact_timers(self) -> None:
        """Drop cancelled timers. They stay in the heap until they are due (lazy deletion),
        which can be ``idle_timeout`` away: a client whose socket fills and drains many times
        a second would otherwise grow the heap for minutes. Amortised: the next compaction
        waits until the heap has doubled."""
        live = [entry for entry in self._timers if entry[2].fn is not None]
        heapq.heapify(live)
        self._timers[:] = live  # the loop holds a reference to this very list
        self._compact_at = max(TIMERS_COMPACT_MIN, 2 * len(live))

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._ep.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)

    def mark_dirty(self, link: _Link) -> None:
        self._dirty.append(link)

    def mark_client(self, client: Client) -> None:
        self._dirty_clients.append(client)

    # -- upstream routing -------------------------------------------------------------------

    def _install(self, targets: list[UpstreamTarget]) -> None:
        Upstreams.check_targets(targets)
        old = self._pools
        pools: dict[str, _Pool] = {}
        for t in targets:
            kept = old.get(t.name)
            pools[t.name] = kept if kept is not None and kept.target == t else _Pool(self, t)
        for name, pool in old.items():
            if pools.get(name) is not pool:
                self._retired.add(pool)
                pool.retire()
        self._pools = pools
        self._routes = {unit: p for p in pools.values() for unit in p.target.unit_ids}

    def submit(self, exchange: Exchange) -> None:
        """Send one request to the PLC for its unit id; ``exchange.done`` is called exactly
        once."""
        unit_id = exchange.adu.unit_id
        pool = self._routes.get(unit_id)
        if pool is None:
            self.metrics.inc("mbsec_upstream_failures_total", target="", reason="no_route")
            error = PathUnavailable(f"no upstream target for unit id {unit_id}", reason="no_route")
            exchange.done(None, error)
            return
        pool.pick().submit(exchange)

    def withdraw(self, client: Client) -> None:
        for pool in [*self._pools.values(), *self._retired]:
            for link in pool.links:
                link.withdraw(client)

    # -- clients ----------------------------------------------------------------------------

    def adopt_threadsafe(self, client: Client) -> None:
        self.call_threadsafe(client.start)


class Exchange:
    """One request on its way to a PLC; the link calls :meth:`done` once with a reply or error."""

    __slots__ = ("adu", "client", "end", "fwd", "plc_unit", "sent", "tid")

    def __init__(self, client: Client, adu: Adu, fwd: Forward) -> None:
        self.client = client
        self.adu = adu  # the client's request (its tid, unit and PDU)
        self.fwd = fwd  # the session's decision (parsed request, start time)
        # set by the link that takes it (_Link.submit / _send)
        self.plc_unit: int
        self.tid: int
        self.sent: float
        self.end: int  # byte offset on the link where its ADU ends

    def done(self, reply: UpstreamReply | None, error: UpstreamError | None) -> None:
        client = self.client
        try:
            client.finish_request(self, reply, error)
        except Exception as exc:  # the client's failure, not the link's: close the client
            client.plane._bug(exc)
            client.crashed()


# -- clients -------------------------------------------------------------------------------


class Client:
    """One TLS client connection after its handshake, owned by the data plane until ``finish``.

    Mirrors the trio session's request loop: at most ``max_pipelined`` requests in flight
    (reading pauses at the limit), one TLS record per reply in completion order, an idle
    timeout that spares a connection with requests in flight, and a stall limit on a client
    that stops reading its replies.
    """

    def __init__(
        self,
        plane: DataPlane,
        session: Session,
        sock_fd: int,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        pending_out: bytes,
        *,
        max_pipelined: int,
        idle_timeout: float,
        on_finished: Callable[[bool], None],
    ) -> None:
        self.plane = plane
        self.session = session
        self.fd = sock_fd
        self._obj = obj
        self._incoming = incoming
        self._outgoing = outgoing
        self._out = bytearray(pending_out)  # TLS bytes the kernel has not taken yet
        #: TLS records made during this loop pass, written in one system call at its end
        #: (a pipelining client gets its replies of one pass in one write)
        self._batch = bytearray()
        self._queued = False  # in the plane's list of clients to flush
        self._max = max_pipelined
        self._idle = idle_timeout
        self._on_finished = on_finished
        self._frames = FrameBuffer()
        self.inflight = 0
        self._reading = True  # the peer may still send (no EOF, no stop)
        self._mask = 0
        self.closed = False  # no more socket I/O (the fd is unregistered)
        self._handed_back = False  # on_finished called: trio owns the socket again
        self._pumping = False
        self.broken = False
        self._last_rx = 0.0
        self._idle_timer: _Timer | None = None
        self._stall_timer: _Timer | None = None

    # lifecycle

    def start(self) -> None:
        plane = self.plane
        self._last_rx = plane.now
        self._mask = _IN
        plane.register(self.fd, _IN, self._on_event)
        self._idle_timer = plane.timer(self._idle, self._idle_check)
        if self.session.stop_requested:  # drained or revoked before we got it
            self.stop_reading(self.session.close_reason)
        if self._out and not self.closed:
            self._write()
        # bytes the client sent right after its handshake may already sit in the BIO
        if self._incoming.pending and self._reading and not self.closed:
            self._decrypt()

    def stop_reading(self, reason: str) -> None:
        """Drain: take no new requests; those in flight still get their replies."""
        if self.closed:
            return
        self.session.note_close_reason(reason)
        self._reading = False
        self._frames = FrameBuffer()  # requests not yet started are dropped, as in trio
        self._update_mask()
        self._maybe_finish()

    def _finish(self, *, broken: bool = False) -> None:
        """No more I/O on the socket. Requests queued for a PLC and not yet sent are withdrawn
        (they never reach it); those already sent are still completed and logged, and the
        connection goes back to trio (close, close line) once none is left."""
        if self.closed:
            return
        self.closed = True
        batch = self._batch
        if batch and not self._out:
            # replies finished in this pass before the close (a denial answered just before a
            # malformed frame, a reply completed before a handler crashed or the drain
            # deadline): whole TLS records, written as they were before the batching; on a
            # socket that already failed the write fails too, and the close stays broken
            with contextlib.suppress(OSError):
                del batch[: os.write(self.fd, batch)]
        self.broken = self.broken or broken or bool(self._out) or bool(batch)
        batch.clear()
        self.plane.unregister(self.fd)
        for t in (self._idle_timer, self._stall_timer):
            if t is not None:
                t.cancel()
        if self.inflight:
            self.plane.withdraw(self)
        self._hand_back_if_done()

    def _hand_back_if_done(self) -> None:
        if self.closed and self.inflight <= 0 and not self._handed_back:
            self._handed_back = True
            self._on_finished(self.broken)

    def abort(self, reason: str) -> None:
        """Stop all I/O at once (the session was cancelled)."""
        self._abort(reason, broken=True)

    def crashed(self) -> None:
        """A handler of this connection raised (logged): close it rather than leave it half
        updated with requests that will never be answered."""
        self._abort("internal_error", broken=True)

    def _abort(self, reason: str, *, broken: bool = False) -> None:
        """Close now; replies of requests still in flight are not sent."""
        self.session.note_close_reason(reason)
        self._finish(broken=broken)

    def _maybe_finish(self) -> None:
        if not self._reading and self.inflight == 0 and not self.closed:
            if self._out or self._batch:
                return  # the last replies are still being written; finish when flushed
            self._finish()

    def _update_mask(self) -> None:
        want = 0
        if self._reading and self.inflight < self._max and self._stall_timer is None:
            want |= _IN
        if self._out:
            want |= _OUT
        if want != self._mask and not self.closed:
            self._mask = want
            self.plane.modify(self.fd, want)

    # events

    def _on_event(self, ev: int) -> None:
        if ev & _OUT:
            self._write()
            if self.closed:
                return
        if not self._reading:
            if ev & _ERR and not self.closed:
                # hung up while we only write (EOF seen, draining): nobody will take the
                # replies, and a level-triggered HUP would wake the loop on every pass
                self._abort("client_reset", broken=True)
            return
        # EPOLLIN of a pass in which the mask dropped it (pipelining limit) is left for later
        if ev & _ERR or (ev & _IN and self._mask & select.EPOLLIN):
            try:
                raw = os.read(self.fd, RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError:
                raw = b""
                self.broken = True
                self.session.note_close_reason("client_reset")
            if raw:
                self._incoming.write(raw)
            else:
                self._incoming.write_eof()
            self._last_rx = self.plane.now
            self._decrypt()

    def _decrypt(self) -> None:
        obj = self._obj
        session = self.session
        frames = self._frames
        incoming = self._incoming
        eof = False
        while True:
            if not incoming.pending and not incoming.eof and not obj.pending():
                break  # nothing buffered: a read could only raise SSLWantReadError
            try:
                data = obj.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError:
                self.broken = True
                session.note_close_reason("client_reset")
                eof = True
                break
            if not data:
                session.note_close_reason("client_closed")
                eof = True
                break
            session.bytes_in += len(data)
            frames.receive_data(data)
        if self._outgoing.pending:  # e.g. a TLS 1.3 KeyUpdate answer, in order with replies
            self._queue(self._outgoing.read())
        self._pump()
        if eof and not self.closed:
            self._reading = False
            self._update_mask()
            self._maybe_finish()

    def _pump(self) -> None:
        """Start buffered requests while there is a pipelining slot and the client takes its
        replies (no new request while the socket toward it is full: replies cannot pile up
        in memory beyond what ``max_pipelined`` requests produce)."""
        if not self._reading or self._pumping:
            return  # re-entered from a request that completed at once: the outer loop goes on
        self._pumping = True
        session = self.session
        frames = self._frames
        submit = self.plane.submit
        try:
            while (self.inflight < self._max and self._stall_timer is None and self._reading
                   and not self.closed):
                if self._batch and frames.buffered:
                    # replies of this pass wait while more requests are buffered: write them
                    # before starting another, so that a full socket (the stall timer) stops
                    # the pump and replies never pile up in memory (as before the batching)
                    self.flush()
                    if self._cannot_pump():  # a method: mypyc must not reuse the narrowing
                        break
                try:
                    adu = frames.next_frame()
                except RemoteProtocolError as exc:
                    session.framing_error(exc)
                    self._abort(exc.reason)
                    return
                if adu is None:
                    break
                self.inflight += 1
                t0 = time.monotonic()
                try:
                    result = session.decide(adu, t0)
                except BaseException:
                    self.inflight -= 1  # so that crashed() can hand the connection back
                    raise
                if result is None:  # the request broke the connection (logged)
                    self.inflight -= 1
                    self._finish()
                    return
                if type(result) is bytes:
                    self.inflight -= 1
                    self._send(adu, result, t0)
                else:
                    assert not isinstance(result, bytes)
                    submit(Exchange(self, adu, result))
        finally:
            self._pumping = False
        self._update_mask()

    def _cannot_pump(self) -> bool:
        """The socket toward the client is full (stall timer), or the connection closes."""
        return self._stall_timer is not None or self.closed or not self._reading

    def finish_request(
        self, exchange: Exchange, reply: UpstreamReply | None, error: UpstreamError | None
    ) -> None:
        self.inflight -= 1
        if self.closed:
            try:  # nobody takes the reply, but what reached the PLC is audited
                self.session.complete(exchange.adu, exchange.fwd, reply, error)
            finally:
                self._hand_back_if_done()
            return
        pdu = self.session.complete(exchange.adu, exchange.fwd, reply, error)
        self._send(exchange.adu, pdu, exchange.fwd.t0)
        if self.closed:
            return
        if self._reading:
            self._pump()
        else:
            self._update_mask()
            self._maybe_finish()

    def _send(self, adu: Adu, pdu: bytes, t0: float) -> None:
        data = encode_adu(adu.transaction_id, adu.unit_id, pdu)
        try:
            self._obj.write(data)  # one write, one TLS record
        except ssl.SSLError:
            self._abort("client_gone", broken=True)
            return
        self.session.bytes_out += len(data)
        self.plane.observe_request(time.monotonic() - t0)
        self._queue(self._outgoing.read())

    def _queue(self, cipher: bytes) -> None:
        """TLS bytes for the client, in the order the TLS object made them; written by
        :meth:`flush` at the end of the loop pass."""
        self._batch += cipher
        if not self._queued:
            self._queued = True
            self.plane.mark_client(self)

    def flush(self) -> None:
        """Write this pass's records in one system call (end of a loop pass); behind what the
        kernel has not taken yet, and not while the client is stalled (the stall timer and
        EPOLLOUT take over, as for any partial write)."""
        self._queued = False
        batch = self._batch
        if not batch or self.closed:
            return
        self._out += batch
        batch.clear()
        if self._stall_timer is None:
            self._write()

    def _write(self) -> None:
        out = self._out
        if not out:
            return
        try:
            n = os.write(self.fd, out)
        except BlockingIOError:
            n = 0
        except OSError:
            self._abort("client_gone", broken=True)
            return
        del out[:n]
        resumed = False
        if out:
            if self._stall_timer is None:
                # a client that stops reading must not hold its replies' slots forever
                self._stall_timer = self.plane.timer(self._idle, self._stalled)
        elif self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
            resumed = True
        self._update_mask()
        if not out:
            if resumed and self._reading:
                self._pump()  # requests that waited for the client to take its replies
            self._maybe_finish()

    def _stalled(self) -> None:
        self._stall_timer = None
        if self._out:
            self._abort("client_stalled", broken=True)

    def _idle_check(self) -> None:
        now = self.plane.now
        if self.closed:
            return
        due = self._last_rx + self._idle
        if now >= due:
            if self.inflight or self._out or self._batch:
                # a request in flight, or replies the client has not taken yet (the stall
                # limit decides about those): the wait starts over, as a new full period
                self._last_rx = now
            else:
                self.stop_reading("idle_timeout")
                return
        self._idle_timer = self.plane.timer(max(0.0, self._last_rx + self._idle - now),
                                            self._idle_check)


# -- PLC links --------------------------------------------------------------------------------


class _Pool:
    """The links to one target; picks like :meth:`mbsec.upstream._Pool.pick`."""

    def __init__(self, plane: DataPlane, target: UpstreamTarget) -> None:
        self.plane = plane
        self.target = target
        self.links = [_Link(plane, target, i) for i in range(target.pool_size)]

    def pick(self) -> _Link:
        links = self.links
        first = links[0]
        if len(links) == 1 or (first.fd >= 0 and first.load == 0):
            return first  # one link, or the first is open and idle: nothing is less loaded
        depth = self.target.depth
        best: _Link | None = None
        for c in links:
            if c.fd >= 0 and c.load < depth and (best is None or c.load < best.load):
                best = c
        if best is not None:
            return best
        for c in links:
            if c.fd < 0 and c.load < depth and not c.in_backoff():
                return c
        for c in links:
            if not c.in_backoff() and (best is None or c.load < best.load):
                best = c
        return best if best is not None else links[0]

    def retire(self) -> None:
        """Replaced by a reload: in-flight requests finish (bounded by their deadlines)."""
        t = self.target
        self.plane.timer(t.connect_timeout + t.request_timeout + RETIRE_GRACE, self._close_retired)

    def _close_retired(self) -> None:
        self.plane._retired.discard(self)
        self.close("shutdown", "target removed by a reload")

    def close(self, reason: str, message: str) -> None:
        for link in self.links:
            link.close(reason, message)


class _Link:
    """One TCP connection slot to a PLC: proxy-owned tids, depth, FIFO queue, deadlines."""

    def __init__(self, plane: DataPlane, target: UpstreamTarget, index: int) -> None:
        self.plane = plane
        self.target = target
        self.log = plane.log.bind(
            **{
                "mbsec.target": target.name,
                "destination.ip": target.host,
                "destination.port": target.port,
                "mbsec.connection": index,
            }
        )
        self.sock: socket.socket | None = None
        self.fd = -1  # >= 0 once connected
        self.connecting = False
        self.load = 0  # requests queued or in flight here
        self._book: TidBook[Exchange] = TidBook()
        self._pending = self._book.pending  # the same dict, for the hot paths
        self._queue: collections.deque[Exchange] = collections.deque()
        self._queue_timers: dict[int, _Timer] = {}
        self._out = bytearray()
        self._frames = FrameBuffer()
        self._dirty = False
        self._writing = False  # waiting for EPOLLOUT
        self.retry_at = -math.inf
        self._backoff = target.backoff_initial
        self._last_error = ""
        self._connect_timer: _Timer | None = None
        self._queued_bytes = 0  # bytes ever queued on this link ...
        self._written = 0  # ... and written (ADU of a request on the wire: _written >= ex.end)
        self._attempt = 0  # connect attempts, so a late name resolution is recognised
        self._addrs: list[tuple[Any, ...]] = []  # resolved addresses not tried yet
        self._deadline_timer: _Timer | None = None
        self._observe_rtt = observer(plane.metrics, "mbsec_upstream_request_seconds",
                                     target=target.name)

    def in_backoff(self) -> bool:
        return self.fd < 0 and not self.connecting and self.plane.now < self.retry_at

    # request path

    def submit(self, ex: Exchange) -> None:
        t = self.target
        unit_id = ex.adu.unit_id
        ex.plc_unit = t.unit_rewrite.get(unit_id, unit_id) if t.unit_rewrite else unit_id
        self.load += 1
        if self.fd < 0:
            if self.in_backoff():
                self.plane.metrics.inc("mbsec_upstream_failures_total", target=t.name,
                                       reason="backoff")
                self._fail(ex, PathUnavailable(
                    f"upstream {t.name} unavailable (reconnect backoff): {self._last_error}",
                    reason="backoff"))
                return
            self._queue.append(ex)
            if not self.connecting:
                self._connect()
            return
        if len(self._pending) < t.depth and not self._queue:
            self._send(ex)
        else:
            self._enqueue(ex)

    def _enqueue(self, ex: Exchange) -> None:
        """Queue (FIFO) for a slot, for at most ``request_timeout``."""
        self._queue.append(ex)
        t = self.target
        self._queue_timers[id(ex)] = self.plane.timer(t.request_timeout,
                                                      lambda: self._slot_timeout(ex))

    def _slot_timeout(self, ex: Exchange) -> None:
        self._queue_timers.pop(id(ex), None)
        try:
            self._queue.remove(ex)
        except ValueError:
            return
        t = self.target
        self.plane.metrics.inc("mbsec_upstream_failures_total", target=t.name, reason="timeout")
        self._fail(ex, TargetNoResponse(
            f"upstream {t.name}: no free slot within {t.request_timeout:g} s "
            f"({t.pool_size} connection(s) x depth {t.depth} busy)",
            reason="timeout"))

    def _fail(self, ex: Exchange, error: UpstreamError) -> None:
        self.load -= 1
        ex.done(None, error)

    def _send(self, ex: Exchange) -> None:
        tid = self._book.allocate()
        ex.tid = tid
        adu = encode_adu(tid, ex.plc_unit, ex.adu.pdu)
        self._out += adu
        self._queued_bytes += len(adu)
        ex.end = self._queued_bytes  # on the wire once _written reaches it
        self._pending[tid] = ex
        ex.sent = time.monotonic()
        if self._deadline_timer is None:
            self._deadline_timer = self.plane.timer(self.target.request_timeout, self._sweep)
        if not self._dirty:
            self._dirty = True
            self.plane.mark_dirty(self)

    def _next_from_queue(self) -> None:
        depth = self.target.depth
        while self._queue and self.fd >= 0 and len(self._pending) < depth:
            ex = self._queue.popleft()
            timer = self._queue_timers.pop(id(ex), None)
            if timer is not None:
                timer.cancel()
            self._send(ex)

    def flush(self) -> None:
        """Write every queued ADU in one system call (end of a loop pass)."""
        self._dirty = False
        out = self._out
        if not out or self.fd < 0 or self._writing:
            return
        try:
            n = os.write(self.fd, out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._reset("send_failed", str(exc) or type(exc).__name__)
            return
        del out[:n]
        self._written += n
        if out:
            self._writing = True
            self.plane.modify(self.fd, _IN | _OUT)

    def _forget_deadline_timer(self) -> None:
        self._deadline_timer = None

    def _sweep(self) -> None:
        """Fail requests whose reply is overdue. One timer per link, not one per request:
        every request waits ``request_timeout`` and ``_pending`` is in send order, so the
        oldest entry is always the next deadline."""
        # Through a method, not ``self._deadline_timer = None`` here: mypy (and so mypyc's
        # compiled code) would take the attribute to stay None in this function, but a
        # client called back below may arm a new timer through _send.
        self._forget_deadline_timer()
        t = self.target
        timeout = t.request_timeout
        now = time.monotonic()
        pending = self._pending
        while pending:
            tid, ex = next(iter(pending.items()))
            if ex.sent + timeout > now:
                break
            del pending[tid]
            # its ADU not (wholly) on the wire yet: a full socket (the PLC stopped reading) or
            # not flushed yet. Judged now, before its client can queue more on this link.
            unsent = self._written < ex.end
            too_many = self._book.expire(tid)  # known before anything can reuse the id
            self._fail(ex, TargetNoResponse(
                f"no reply from upstream {t.name} within {timeout:g} s", reason="timeout"))
            self.plane.metrics.inc("mbsec_upstream_failures_total", target=t.name,
                                   reason="timeout")
            if unsent:  # reset: a request answered 0x0B must never be sent later
                self._reset("send_timeout", "PLC did not accept the request in time")
                return
            if too_many:
                self._reset("too_many_timeouts",
                            f"more than {EXPIRED_MAX} requests timed out on this connection")
                return
            if self.fd < 0:
                return
        if pending and self._deadline_timer is None:
            oldest = next(iter(pending.values()))
            self._deadline_timer = self.plane.timer(max(0.0, oldest.sent + timeout - now),
                                                    self._sweep)
        self._next_from_queue()

    # connection

    def _connect(self) -> None:
        """Start a non-blocking connect; ``connect_timeout`` covers name resolution too."""
        t = self.target
        self.connecting = True
        self._attempt += 1
        attempt = self._attempt
        self._connect_timer = self.plane.timer(t.connect_timeout, self._connect_timeout)
        try:
            ipaddress.ip_address(t.host)
        except ValueError:  # a name: resolved off the loop, so a slow DNS stalls nobody else
            plane = self.plane

            def resolve() -> None:
                result: list[tuple[Any, ...]] | OSError
                try:
                    result = list(socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM))
                except OSError as exc:
                    result = exc
                plane.call_threadsafe(lambda: self._resolved(attempt, result))

            threading.Thread(target=resolve, name="mbsec-resolve", daemon=True).start()
            return
        family = socket.AF_INET6 if ":" in t.host else socket.AF_INET
        self._resolved(attempt, [(family, socket.SOCK_STREAM, 0, "", (t.host, t.port))])

    def _resolved(self, attempt: int, result: list[tuple[Any, ...]] | OSError) -> None:
        if attempt != self._attempt or not self.connecting or self.sock is not None:
            return  # timed out (or superseded) meanwhile
        if isinstance(result, OSError):
            self._connect_failed("connect_failed", str(result) or type(result).__name__)
            return
        self._addrs = result
        self._connect_next("no address")

    def _connect_next(self, last_error: str) -> None:
        """Try the next resolved address (a name may have A and AAAA records)."""
        while self._addrs:
            family, kind, proto, _name, addr = self._addrs.pop(0)
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:
                last_error = str(exc) or type(exc).__name__
                continue
            sock.setblocking(False)
            err = sock.connect_ex(addr)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                last_error = os.strerror(err)
                continue
            self.sock = sock
            self.plane.register(sock.fileno(), _OUT, self._on_connect)
            return
        self._connect_failed("connect_failed", last_error)

    def _on_connect(self, _ev: int) -> None:
        sock = self.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.plane.unregister(sock.fileno())
        if err:
            sock.close()
            self.sock = None
            self._connect_next(os.strerror(err))
            return
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        try:
            configure_socket(sock)
        except OSError as exc:
            sock.close()
            self.sock = None
            self._connect_failed("connect_failed", str(exc))
            return
        self.connecting = False
        self.fd = sock.fileno()
        self._frames = FrameBuffer()
        self.plane.register(self.fd, _IN, self._on_event)
        self.plane.metrics.inc("mbsec_upstream_connects_total", target=self.target.name)
        self.log.info("upstream-connect", **{"event.action": "upstream-connect"})
        waiting = list(self._queue)
        self._queue.clear()
        for ex in waiting:  # they waited for the connection, not for a slot: keep FIFO order
            if len(self._pending) < self.target.depth:
                self._send(ex)
            else:
                self._enqueue(ex)

    def _connect_timeout(self) -> None:
        self._connect_timer = None
        if not self.connecting:
            return
        sock = self.sock
        if sock is not None:
            self.plane.unregister(sock.fileno())
            sock.close()
            self.sock = None
        t = self.target
        self._connect_failed("connect_timeout", f"no connection within {t.connect_timeout:g} s")

    def _connect_failed(self, reason: str, message: str) -> None:
        t = self.target
        self.connecting = False
        self._attempt += 1  # a resolution still running for this attempt is ignored
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self._last_error = message
        self.retry_at = time.monotonic() + self._backoff
        backoff = self._backoff
        self._backoff = min(self._backoff * 2, t.backoff_max)
        waiting = list(self._queue)
        self._queue.clear()
        try:
            connect_failed(self.log, self.plane.metrics, t.name, reason, message, backoff)
        finally:  # a failing log sink must not strand the requests waiting for the connection
            for ex in waiting:
                self._fail(ex, PathUnavailable(
                    f"cannot connect to upstream {t.name} at {t.host}:{t.port}: {message}",
                    reason="connect_failed"))

    # replies

    def _on_event(self, ev: int) -> None:
        if ev & _OUT and self._writing:
            self._writing = False
            self.plane.modify(self.fd, _IN)
            self.flush()
            if self.fd < 0:
                return
        if not ev & (select.EPOLLIN | _ERR | select.EPOLLRDHUP):
            return
        try:
            data = os.read(self.fd, RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._reset("connection_lost", str(exc) or type(exc).__name__)
            return
        if not data:
            self._reset("eof", "connection closed by the PLC")
            return
        frames = self._frames
        try:
            frames.receive_data(data)
            while True:
                adu = frames.next_frame()
                if adu is None:
                    break
                problem = self._dispatch(adu)
                if problem is not None:
                    self._reset(*problem)
                    return
        except ProtocolError as exc:
            self._reset("bad_frame", exc.message)
            return
        self._next_from_queue()

    def _dispatch(self, adu: Adu) -> tuple[str, str] | None:
        """Hand a reply to the request that sent its tid; anything off resets the connection."""
        tid = adu.transaction_id
        ex = self._pending.pop(tid, None)
        if ex is None:
            if self._book.late(tid):
                dropped_late_reply(self.log, self.plane.metrics, self.target.name, tid)
                return None
            return unknown_tid(tid)
        try:
            reply = check_reply(adu, ex.plc_unit, ex.fwd.request, self.target.name)
        except ReplyProblem as problem:
            self._fail(ex, self._reset_error(problem.detail))
            return problem.reason, problem.message
        self._backoff = self.target.backoff_initial  # a PLC that answers properly is healthy
        self._observe_rtt(self.plane.now - ex.sent)
        self.load -= 1
        ex.done(reply, None)
        return None

    def _reset_error(self, message: str) -> TargetNoResponse:
        return reset_error(self.target.name, "upstream_reset", message)

    def _reset(self, reason: str, message: str) -> None:
        """The byte stream cannot be trusted (or is gone): fail what is on it, back off.

        The link's state (socket, backoff, last error) is final before any request is failed:
        a failed request's client may start its next one on this link at once, and that one
        must see the backoff (no reconnect storm against a PLC that sends garbage)."""
        pending = self._book.clear()
        waiting = list(self._queue)
        self._queue.clear()
        for timer in self._queue_timers.values():
            timer.cancel()
        self._queue_timers.clear()
        self._out.clear()
        self._written = self._queued_bytes  # nothing of the old stream is pending any more
        self._writing = False
        self._drop_socket()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        t = self.target
        if reason != "eof" or pending:
            self.retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, t.backoff_max)
        try:
            if reason != "shutdown":
                self._last_error = message
                connection_reset(self.log, self.plane.metrics, t.name, reason, message,
                                 len(pending))
        finally:  # a failing log sink must not strand the requests taken off the link
            error = reset_error(t.name, reason, message)
            for ex in pending:
                self._fail(ex, error)
            for ex in waiting:
                self._fail(ex, TargetNoResponse(
                    f"upstream {t.name} connection lost before the request was sent: "
                    f"{message}", reason="connection_lost"))

    def withdraw(self, client: Client) -> None:
        """The client is gone: its requests still queued here are never sent."""
        mine = [ex for ex in self._queue if ex.client is client]
        for ex in mine:
            self._queue.remove(ex)
            timer = self._queue_timers.pop(id(ex), None)
            if timer is not None:
                timer.cancel()
            self._fail(ex, TargetNoResponse("the client went away before the request was sent",
                                            reason="client_gone"))

    def crashed(self) -> None:
        """A handler of this link raised (logged): reset it, failing what is on it."""
        self._reset("internal_error", "internal error on this PLC connection (logged)")

    def _drop_socket(self) -> None:
        sock = self.sock
        if sock is not None:
            self.plane.unregister(sock.fileno())
            sock.close()
        self.sock = None
        self.fd = -1
        self.connecting = False
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None

    def close(self, reason: str, message: str) -> None:
        if self.sock is not None or self._pending or self._queue:
            self._reset(reason, message)
