"""PLC connections: a small shared pool per PLC, proxy-owned transaction ids, deadlines.

PLCs accept only a handful of TCP connections, so every client session shares the same few
upstream connections. Each connection numbers its own requests (the client's transaction id
never reaches the PLC), so a reply is matched by *our* id and can only ever complete the
request that caused it. A reply to a request that already timed out is dropped, never handed
to the next caller (the classic Modbus-proxy bug). Anything else that does not fit (unknown
id, wrong unit, wrong function or body, broken MBAP) means the byte stream can no longer be
trusted: the connection is reset, its pending requests fail with 0x0B and it reconnects with
backoff. Nothing is retried, writes least of all: a replayed write moves real equipment.

Per-connection tasks live in :meth:`Upstreams.run`: a manager that connects on demand and
reads replies, and one deadline watchdog. The request path spawns no task and opens no cancel
scope: it takes a slot (``depth`` per connection, FIFO hand-off when full), sends one ADU in
one write and waits on a ``trio.Event`` that the reader or the watchdog sets.

Deadlines: ``connect_timeout`` for the TCP connect (then 0x0A, and requests fail fast with
0x0A until the backoff, doubling from ``backoff_initial`` to ``backoff_max``, has passed);
``request_timeout`` from send to validated reply (then 0x0B; the connection stays, and the
late reply is dropped by its transaction id); a caller queued for a slot also gives up after
``request_timeout``.

Events (structlog, ECS keys): ``event.action`` = ``upstream-connect``,
``upstream-connect-failed``, ``upstream-reset``, ``upstream-late-reply``, with
``mbsec.target``, ``destination.ip``, ``destination.port``, ``error.message`` and, for resets,
``event.reason`` and ``mbsec.pending`` (requests failed by it).
Metrics: ``mbsec_upstream_connects_total{target}``,
``mbsec_upstream_failures_total{target,reason}`` (reason: ``connect_failed``,
``connect_timeout``, ``backoff``, ``no_route``, ``timeout``, ``late_reply``, or the reset
reason: ``unknown_tid``, ``wrong_unit``, ``bad_reply``, ``bad_frame``, ``connection_lost``,
``eof``, ``send_failed``, ``send_timeout``), ``mbsec_upstream_request_seconds{target}`` (send
to validated reply).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

import structlog
import trio

from mbsec.modbus._fast import fast_init
from mbsec.modbus.errors import ProtocolError
from mbsec.modbus.mbap import Adu, FrameBuffer, encode_adu
from mbsec.modbus.pdu import ExceptionCode, ExceptionResponse, Request, Response, parse_response

__all__ = [
    "Dialer",
    "MetricsLike",
    "PathUnavailable",
    "TargetNoResponse",
    "UpstreamError",
    "UpstreamReply",
    "UpstreamTarget",
    "Upstreams",
    "configure_socket",
    "tcp_dialer",
]

P = TypeVar("P")

KEEPALIVE_IDLE = 30  # seconds before the first keepalive probe (seed guidance)
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
RECEIVE_SIZE = 65536
EXPIRED_MAX = 4096  # timed-out transaction ids remembered per connection
RETIRE_GRACE = 1.0  # extra seconds a replaced target keeps serving its in-flight requests


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One PLC (or gateway) and the unit ids routed to it.

    ``unit_rewrite`` maps the client's unit id to the PLC's; the reply must carry the
    rewritten unit and goes back to the client with its original one (the session keeps it).
    """

    name: str
    host: str
    port: int
    unit_ids: frozenset[int]
    unit_rewrite: Mapping[int, int] = field(default_factory=dict)
    pool_size: int = 1
    depth: int = 1
    connect_timeout: float = 3.0
    request_timeout: float = 2.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not in 1..65535")
        if not self.unit_ids:
            problems.append("no unit ids")
        for unit in self.unit_ids:
            if not 0 <= unit <= 255:
                problems.append(f"unit id {unit} is not in 0..255")
        for src, dst in self.unit_rewrite.items():
            if not (0 <= src <= 255 and 0 <= dst <= 255):
                problems.append(f"unit rewrite {src}->{dst} is outside 0..255")
        if self.pool_size < 1:
            problems.append("pool_size must be at least 1")
        if self.depth < 1:
            problems.append("depth must be at least 1")
        if self.connect_timeout <= 0 or self.request_timeout <= 0:
            problems.append("timeouts must be positive")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            problems.append("backoff must satisfy 0 <= backoff_initial <= backoff_max")
        if problems:
            raise ValueError(f"upstream target {self.name!r}: " + "; ".join(problems))
        # Freeze the mapping so a shared target cannot change under a running pool.
        object.__setattr__(self, "unit_ids", frozenset(self.unit_ids))
        object.__setattr__(self, "unit_rewrite", MappingProxyType(dict(self.unit_rewrite)))


class UpstreamError(Exception):
    """A request could not be answered by its PLC; ``exception_code`` goes back to the client."""

    exception_code: int = int(ExceptionCode.GATEWAY_PATH_UNAVAILABLE)

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


class PathUnavailable(UpstreamError):
    """Exception 0x0A: no target for the unit id, or its PLC cannot be reached right now."""

    exception_code = int(ExceptionCode.GATEWAY_PATH_UNAVAILABLE)


class TargetNoResponse(UpstreamError):
    """Exception 0x0B: the request was sent (or queued) but no valid answer came in time."""

    exception_code = int(ExceptionCode.GATEWAY_TARGET_NO_RESPONSE)


@fast_init
@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """A validated reply: the PDU as the PLC sent it and its parsed form."""

    pdu: bytes
    response: Response | ExceptionResponse
    target: str


class MetricsLike(Protocol):
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None: ...
    def observe(self, name: str, value: float, **labels: str) -> None: ...
    def set(self, name: str, value: float, **labels: str) -> None: ...


class _NoMetrics:
    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        pass

    def observe(self, name: str, value: float, **labels: str) -> None:
        pass

    def set(self, name: str, value: float, **labels: str) -> None:
        pass


Dialer = Callable[[str, int], Awaitable[trio.abc.Stream]]


def configure_socket(sock: trio.socket.SocketType | socket.socket) -> None:
    """TCP_NODELAY (one ADU per segment, no Nagle delay) and 30 s keepalive.

    Keepalive finds a PLC that vanished without a FIN (power loss, cable) on idle
    connections; the request deadline covers busy ones.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def socket_fd(stream: trio.abc.Stream) -> int:
    """The file descriptor of a ``trio.SocketStream`` (-1 for any other stream).

    The hot paths read and write such a socket directly (``os.read``/``os.write`` on the
    non-blocking descriptor, ``wait_readable``/``wait_writable`` only when it would block):
    ``SocketStream`` costs a conflict detector, a cancel check and a reschedule per call even
    when the kernel takes the bytes at once. Other streams (tests' memory streams) go through
    their ``send_all``/``receive_some``.
    """
    if type(stream) is trio.SocketStream:
        return stream.socket.fileno()
    return -1


async def receive_raw(fd: int, max_bytes: int) -> bytes:
    """Wait until ``fd`` is readable, then read; b"" at EOF. Errors become BrokenResourceError."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue  # spurious wake-up
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc


async def send_raw(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``: at once when the kernel takes it, else wait for writability."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        view = view[n:]


async def tcp_dialer(host: str, port: int) -> trio.abc.Stream:
    """The default dialer: a plain TCP stream with :func:`configure_socket` applied."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        configure_socket(stream.socket)
    except OSError:
        await trio.aclose_forcefully(stream)
        raise
    return stream


class TidBook(Generic[P]):
    """The transaction ids of one PLC connection; sans-IO, shared by both data planes.

    ``pending`` maps each tid on the wire to its request, in send order (every request waits
    the same ``request_timeout``, so the first entry is always the next deadline). ``expired``
    remembers timed-out tids, so a late reply is recognised and dropped instead of being matched
    to a later request that reused the id (the classic Modbus-proxy bug).
    """

    __slots__ = ("expired", "next_tid", "pending")

    def __init__(self) -> None:
        self.pending: dict[int, P] = {}
        self.expired: dict[int, None] = {}  # an insertion-ordered set
        self.next_tid = 1

    def allocate(self) -> int:
        """Next 16-bit id neither in flight nor recently timed out."""
        tid = self.next_tid
        pending = self.pending
        expired = self.expired
        for _ in range(65536):
            if tid not in pending and tid not in expired:
                break
            tid = (tid + 1) & 0xFFFF
        else:  # pragma: no cover - depth and EXPIRED_MAX keep far fewer than 65536 ids in use
            raise TargetNoResponse("no free transaction id", reason="tid_exhausted")
        self.next_tid = (tid + 1) & 0xFFFF
        return tid

    def expire(self, tid: int) -> bool:
        """Remember a timed-out tid. True when more than ``EXPIRED_MAX`` are remembered: the
        connection must then be reset rather than forget one (a forgotten tid could be reused,
        and a very late reply would complete another client's request)."""
        self.expired[tid] = None
        return len(self.expired) > EXPIRED_MAX

    def late(self, tid: int) -> bool:
        """A reply for a tid not in flight: True (and forgotten) when it answers a request that
        timed out, False when nobody ever sent it (the stream cannot be trusted)."""
        if tid in self.expired:
            del self.expired[tid]
            return True
        return False

    def clear(self) -> list[P]:
        """Forget everything (the connection is gone); returns the requests that were on it."""
        pending = list(self.pending.values())
        self.pending.clear()
        self.expired.clear()
        return pending


class ReplyProblem(Exception):
    """A reply that matches its tid but not its request: the connection is reset."""

    def __init__(self, reason: str, message: str, detail: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.detail = detail  # for the request's own error


def check_reply(adu: Adu, unit_id: int, request: Request, target: str) -> UpstreamReply:
    """Validate a reply against the request that sent its tid (unit, function, body)."""
    if adu.unit_id != unit_id:
        raise ReplyProblem(
            "wrong_unit",
            f"reply to tid {adu.transaction_id} from unit {adu.unit_id}, expected {unit_id}",
            f"reply from unit {adu.unit_id}",
        )
    try:
        response = parse_response(request, adu.pdu)
    except ProtocolError as exc:
        raise ReplyProblem(
            "bad_reply",
            f"reply to tid {adu.transaction_id} does not match its request: {exc.message}",
            exc.message,
        ) from None
    return UpstreamReply(adu.pdu, response, target)


def dropped_late_reply(log: Any, metrics: MetricsLike, target: str, tid: int) -> None:
    log.info(
        "upstream-late-reply",
        **{
            "event.action": "upstream-late-reply",
            "modbus.transaction_id": tid,
            "error.message": "reply after its request timed out; dropped",
        },
    )
    metrics.inc("mbsec_upstream_failures_total", target=target, reason="late_reply")


def connect_failed(
    log: Any, metrics: MetricsLike, target: str, reason: str, message: str, backoff: float
) -> None:
    log.warning(
        "upstream-connect-failed",
        **{
            "event.action": "upstream-connect-failed",
            "event.reason": reason,
            "error.message": message,
            "mbsec.backoff": backoff,
        },
    )
    metrics.inc("mbsec_upstream_failures_total", target=target, reason=reason)


def reset_error(target: str, reason: str, message: str) -> TargetNoResponse:
    """What the requests on a reset connection get (0x0B)."""
    lost = reason in ("connection_lost", "eof")
    return TargetNoResponse(f"upstream {target} connection reset: {message}",
                            reason="connection_lost" if lost else "upstream_reset")


def connection_reset(
    log: Any, metrics: MetricsLike, target: str, reason: str, message: str, pending: int
) -> None:
    level = log.info if reason == "eof" and not pending else log.warning
    level(
        "upstream-reset",
        **{
            "event.action": "upstream-reset",
            "event.reason": reason,
            "error.message": message,
            "mbsec.pending": pending,
        },
    )
    metrics.inc("mbsec_upstream_failures_total", target=target, reason=reason)


def unknown_tid(tid: int) -> tuple[str, str]:
    return "unknown_tid", f"reply with transaction id {tid}, which is not in flight"


class _Pending:
    """One request on the wire: the reader fills ``reply`` or ``error`` and calls ``finish``.

    The caller parks its own task (``wait``) and ``finish`` reschedules it directly: no
    ``trio.Event`` and parking lot per request, which is most of a wake-up's cost.
    """

    __slots__ = ("deadline", "error", "finished", "reply", "request", "sending", "task",
                 "unit_id")

    def __init__(self, request: Request, unit_id: int) -> None:
        self.request = request
        self.unit_id = unit_id
        self.finished = False
        self.task: trio.lowlevel.Task | None = None
        self.reply: UpstreamReply | None = None
        self.error: UpstreamError | None = None
        self.deadline = math.inf
        self.sending = False

    def finish(self) -> None:
        self.finished = True
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task)

    def fail(self, error: UpstreamError) -> None:
        if not self.finished:
            self.error = error
            self.finish()

    def _abort(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED

    async def wait(self) -> None:
        """Until ``finish`` (a checkpoint either way; cancellable)."""
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)


class _Connection:
    """One TCP connection slot to a PLC: its manager task, tid space and pending table."""

    def __init__(
        self, target: UpstreamTarget, index: int, dialer: Dialer, log: Any, metrics: MetricsLike
    ) -> None:
        self.target = target
        self.index = index
        self._dialer = dialer
        self._metrics = metrics
        self._log = log.bind(
            **{
                "mbsec.target": target.name,
                "destination.ip": target.host,
                "destination.port": target.port,
                "mbsec.connection": index,
            }
        )
        self.stream: trio.abc.Stream | None = None
        self.fd = -1  # the stream's socket, when it is a trio.SocketStream
        self.load = 0  # callers currently using this connection (queued or in flight)
        self._book: TidBook[_Pending] = TidBook()
        self._pending = self._book.pending  # the same dict, for the hot paths
        # Slots (depth) and the send right are plain counters with a parking lot behind them:
        # the uncontended request path takes them without a trio checkpoint.
        self._in_flight = 0
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._sending = False
        self._send_lot = trio.lowlevel.ParkingLot()
        self.retry_at = -math.inf
        self._backoff = target.backoff_initial
        self._last_error = ""
        self._demand = trio.Event()
        self._changed = trio.Event()
        self._connect_queue: list[object] = []  # callers waiting for a connection, in order
        self._connect_turn = trio.lowlevel.ParkingLot()
        self._scope: trio.CancelScope | None = None
        self._reset_why: tuple[str, str] | None = None

    # -- manager task -------------------------------------------------------------------

    async def manage(self) -> None:
        """Connect when a caller needs the connection, read replies until it breaks, repeat."""
        try:
            while True:
                await self._demand.wait()
                stream = await self._connect()
                # Callers that asked during the attempt were woken by it; a stale request must
                # not trigger a reconnect later (that would bypass the backoff).
                self._demand = trio.Event()
                if stream is not None:
                    await self._serve(stream)
        finally:
            self._teardown("shutdown", "upstream pool stopped", backoff=False, log=False)

    async def _connect(self) -> trio.abc.Stream | None:
        t = self.target
        reason = "connect_failed"
        try:
            with trio.fail_after(t.connect_timeout):
                stream = await self._dialer(t.host, t.port)
        except trio.TooSlowError:
            reason, message = "connect_timeout", f"no connection within {t.connect_timeout:g} s"
        except (OSError, trio.BrokenResourceError, UnicodeError) as exc:
            # UnicodeError: a host name the resolver cannot encode (settings refuse the ones
            # known; this keeps any other a failed connect, not a dead pool)
            message = str(exc) or type(exc).__name__
        else:
            self.stream = stream
            self.fd = socket_fd(stream)
            self._reset_why = None
            self._metrics.inc("mbsec_upstream_connects_total", target=t.name)
            self._log.info("upstream-connect", **{"event.action": "upstream-connect"})
            self._notify()
            return stream
        self._last_error = message
        self.retry_at = trio.current_time() + self._backoff
        connect_failed(self._log, self._metrics, t.name, reason, message, self._backoff)
        self._backoff = min(self._backoff * 2, t.backoff_max)
        self._notify()
        return None

    async def _serve(self, stream: trio.abc.Stream) -> None:
        why: tuple[str, str] | None = None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watchdog)
                    why = await self._read_loop(stream)
                    self._retire_stream()  # broken framing: nothing more is written to it
                    nursery.cancel_scope.cancel()
        finally:
            self._scope = None
            if why is None:
                why = self._reset_why or ("shutdown", "upstream pool stopped")
            reason, message = why
            # requests that asked for a connection while this one was being retired are failed
            # by the teardown; their demand must not skip the reconnect backoff
            self._demand = trio.Event()
            self._teardown(reason, message, backoff=reason != "eof", log=reason != "shutdown")
            await trio.aclose_forcefully(stream)

    async def _read_loop(self, stream: trio.abc.Stream) -> tuple[str, str]:
        frames = FrameBuffer()
        fd = socket_fd(stream)
        data: bytes | bytearray
        while True:
            try:
                if fd >= 0:
                    data = await receive_raw(fd, RECEIVE_SIZE)
                else:
                    data = await stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                return "connection_lost", str(exc) or type(exc).__name__
            if not data:
                return "eof", "connection closed by the PLC"
            while True:
                try:
                    if data:
                        frames.receive_data(data)
                        data = b""
                    adu = frames.next_frame()
                except ProtocolError as exc:
                    return "bad_frame", exc.message
                if adu is None:
                    break
                problem = self._dispatch(adu)
                if problem is not None:
                    return problem

    def _dispatch(self, adu: Adu) -> tuple[str, str] | None:
        """Hand a reply to the request that sent its tid; anything off resets the connection."""
        tid = adu.transaction_id
        pending = self._pending.pop(tid, None)
        if pending is None:
            if self._book.late(tid):
                dropped_late_reply(self._log, self._metrics, self.target.name, tid)
                return None
            return unknown_tid(tid)
        try:
            pending.reply = check_reply(adu, pending.unit_id, pending.request, self.target.name)
        except ReplyProblem as problem:
            pending.fail(self._reset_error(problem.detail))
            return problem.reason, problem.message
        pending.finish()
        self._backoff = self.target.backoff_initial  # a PLC that answers properly is healthy
        return None

    def _reset_error(self, message: str) -> TargetNoResponse:
        return reset_error(self.target.name, "upstream_reset", message)

    def _teardown(self, reason: str, message: str, *, backoff: bool, log: bool) -> None:
        pending = self._book.clear()
        self.stream = None
        error = reset_error(self.target.name, reason, message)
        for p in pending:
            p.fail(error)
        if backoff or pending:
            self.retry_at = trio.current_time() + self._backoff
            self._backoff = min(self._backoff * 2, self.target.backoff_max)
        if log:
            self._last_error = message
            connection_reset(self._log, self._metrics, self.target.name, reason, message,
                             len(pending))
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _watchdog(self) -> None:
        """Fail requests whose reply is overdue: one task per connection, not one timer each.

        Every request gets ``deadline = send time + request_timeout`` and enters ``_pending``
        when it is sent, so the dict's order is deadline order: sleeping until the oldest
        deadline (or a whole ``request_timeout`` when nothing is pending, since anything sent
        later is due later) never oversleeps one.
        """
        t = self.target
        pending = self._pending
        while True:
            now = trio.current_time()
            while pending:
                tid, p = next(iter(pending.items()))
                if p.deadline > now:
                    break
                del pending[tid]
                self._expire(tid)
                p.fail(
                    TargetNoResponse(
                        f"no reply from upstream {t.name} within {t.request_timeout:g} s",
                        reason="timeout",
                    )
                )
                self._metrics.inc("mbsec_upstream_failures_total", target=t.name, reason="timeout")
                if p.sending:  # stuck in send_all: the PLC stopped reading
                    self.request_reset(
                        self.stream, "send_timeout", "PLC did not accept the request in time"
                    )
            if pending:
                await trio.sleep_until(next(iter(pending.values())).deadline)
            else:
                await trio.sleep(t.request_timeout)

    def request_reset(self, stream: trio.abc.Stream | None, reason: str, message: str) -> None:
        """Called from a request task: ``stream`` is unusable, let the manager reset it.

        A failure seen on an old stream must not reset the connection that replaced it.
        """
        if stream is None or stream is not self.stream:
            return
        if self._reset_why is None:
            self._reset_why = (reason, message)
        self._retire_stream()
        if self._scope is not None:
            self._scope.cancel()

    def _retire_stream(self) -> None:
        """No request may write to this stream any more; the manager still closes it.

        Done at once, not at teardown: a request that gets the send right in between must
        never append its ADU to a stream that is no longer framed (a half-written ADU
        followed by the next one is a valid-looking frame spliced from two requests).
        """
        self.stream = None
        self.fd = -1

    # -- request path -------------------------------------------------------------------

    def in_backoff(self) -> bool:
        return self.stream is None and trio.current_time() < self.retry_at

    async def _ensure_connected(self) -> trio.abc.Stream:
        t = self.target
        if self.in_backoff():
            self._metrics.inc("mbsec_upstream_failures_total", target=t.name, reason="backoff")
            raise PathUnavailable(
                f"upstream {t.name} unavailable (reconnect backoff): {self._last_error}",
                reason="backoff",
            )
        changed = self._changed
        self._demand.set()
        me = object()
        self._connect_queue.append(me)
        try:
            with trio.move_on_after(t.connect_timeout + 1.0):
                await changed.wait()
                # the event wakes every waiter at once and trio runs them in either order:
                # go on in arrival order, so requests keep their order on the new connection
                while self._connect_queue[0] is not me:
                    await self._connect_turn.park()
        finally:
            self._connect_queue.remove(me)
            self._connect_turn.unpark_all()
        if self.stream is None:
            raise PathUnavailable(
                f"cannot connect to upstream {t.name} at {t.host}:{t.port}: "
                f"{self._last_error or 'no connection'}",
                reason="connect_failed",
            )
        return self.stream

    def _expire(self, tid: int) -> None:
        """Remember a timed-out tid (see :meth:`TidBook.expire`); reset when too many are."""
        if self._book.expire(tid):
            self.request_reset(
                self.stream,
                "too_many_timeouts",
                f"more than {EXPIRED_MAX} requests timed out on this connection",
            )

    async def _wait_for_slot(self) -> None:
        """Queue (FIFO) for a slot, for at most ``request_timeout``.

        A finishing request hands its slot straight to the first waiter (``_in_flight`` stays
        up), so a caller that loops cannot barge ahead of the queue and starve it.
        """
        t = self.target
        with trio.move_on_after(t.request_timeout):
            await self._slot_lot.park()
            return  # woken by _release_slot: the slot is ours
        self._metrics.inc("mbsec_upstream_failures_total", target=t.name, reason="timeout")
        raise TargetNoResponse(
            f"upstream {t.name}: no free slot within {t.request_timeout:g} s "
            f"({t.pool_size} connection(s) x depth {t.depth} busy)",
            reason="timeout",
        )

    def _release_slot(self) -> None:
        if self._slot_lot:
            self._slot_lot.unpark()
        else:
            self._in_flight -= 1

    def _release_send(self) -> None:
        if self._send_lot:
            self._send_lot.unpark()
        else:
            self._sending = False

    async def exchange(self, unit_id: int, request: Request, pdu: bytes) -> UpstreamReply:
        t = self.target
        plc_unit = t.unit_rewrite.get(unit_id, unit_id) if t.unit_rewrite else unit_id
        if self.stream is None:
            await self._ensure_connected()
        if self._in_flight < t.depth and not self._slot_lot:
            self._in_flight += 1  # fast path: a free slot and nobody queued before us
        else:
            await self._wait_for_slot()
        pending = _Pending(request, plc_unit)
        tid = -1
        try:
            if not self._sending and not self._send_lot:
                self._sending = True
            else:  # another request is in send_all on this connection; it hands over to us
                await self._send_lot.park()
            stream = self.stream  # the connection may have been reset while we waited
            sent = False
            try:
                if stream is None:
                    sent = True
                    raise TargetNoResponse(
                        f"upstream {t.name} connection lost before the request was sent: "
                        f"{self._last_error}",
                        reason="connection_lost",
                    )
                tid = self._book.allocate()
                adu = encode_adu(tid, plc_unit, pdu)
                sent_at = trio.current_time()
                pending.deadline = sent_at + t.request_timeout
                self._pending[tid] = pending
                pending.sending = True
                fd = self.fd if stream is self.stream else socket_fd(stream)
                if fd >= 0:  # one write of one ADU
                    try:
                        n = os.write(fd, adu)
                    except BlockingIOError:
                        n = 0
                    if n < len(adu):
                        await send_raw(fd, adu[n:])
                else:
                    await stream.send_all(adu)
                sent = True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                sent = True  # the stream is reset below; nothing more to do for it
                self.request_reset(stream, "send_failed", str(exc) or type(exc).__name__)
                raise TargetNoResponse(
                    f"upstream {t.name} connection lost while sending: {exc}",
                    reason="connection_lost",
                ) from exc
            finally:
                pending.sending = False
                if not sent:
                    # Cancelled in the middle of send_all: part of an ADU may be on the wire,
                    # so the stream is no longer framed. Never finish or repeat the write, and
                    # retire the stream BEFORE handing the send right to the next request.
                    self.request_reset(stream, "send_failed", "request cancelled while sent")
                self._release_send()
            if pending.finished:  # pending.wait() inlined: one coroutine less per request
                await trio.lowlevel.checkpoint()
            else:
                pending.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(pending._abort)
            if pending.reply is not None:
                self._metrics.observe(
                    "mbsec_upstream_request_seconds", trio.current_time() - sent_at, target=t.name
                )
                return pending.reply
            assert pending.error is not None
            raise pending.error
        finally:
            self._release_slot()
            if tid >= 0 and self._pending.get(tid) is pending:
                del self._pending[tid]  # the caller went away: its reply will be dropped
                self._expire(tid)


class _Pool:
    """The connections to one target; lives in its own cancel scope so a reload can retire it."""

    def __init__(
        self, target: UpstreamTarget, dialer: Dialer, log: Any, metrics: MetricsLike
    ) -> None:
        self.target = target
        self.connections = [
            _Connection(target, i, dialer, log, metrics) for i in range(target.pool_size)
        ]
        self._scope: trio.CancelScope | None = None
        self._retired = False

    async def run(self) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            if self._retired:
                return
            async with trio.open_nursery() as nursery:
                for conn in self.connections:
                    nursery.start_soon(conn.manage)

    async def retire(self) -> None:
        """Let in-flight requests finish (they are bounded by the deadlines), then close."""
        t = self.target
        await trio.sleep(t.connect_timeout + t.request_timeout + RETIRE_GRACE)
        self._retired = True
        if self._scope is not None:
            self._scope.cancel()

    def pick(self) -> _Connection:
        """Fill open connections up to depth, then open the next one, then queue."""
        conns = self.connections
        if len(conns) == 1:
            return conns[0]
        depth = self.target.depth
        best: _Connection | None = None
        for c in conns:  # an open connection with a free slot, least loaded
            if c.stream is not None and c.load < depth and (best is None or c.load < best.load):
                best = c
        if best is not None:
            return best
        for c in conns:  # a connection that is (being) opened and has room
            if c.stream is None and c.load < depth and not c.in_backoff():
                return c
        for c in conns:  # queue on the least loaded usable one
            if not c.in_backoff() and (best is None or c.load < best.load):
                best = c
        return best if best is not None else conns[0]


class Upstreams:
    """All PLC targets, routed by unit id. Start :meth:`run` in a nursery before exchanging."""

    def __init__(
        self,
        targets: Iterable[UpstreamTarget],
        *,
        log: Any = None,
        metrics: MetricsLike | None = None,
        dialer: Dialer | None = None,
    ) -> None:
        self._log: Any = log if log is not None else structlog.get_logger("mbsec.upstream")
        self._metrics: MetricsLike = metrics if metrics is not None else _NoMetrics()
        self._dialer: Dialer = dialer if dialer is not None else tcp_dialer
        self._nursery: trio.Nursery | None = None
        self._pools: dict[str, _Pool] = {}
        self._routes: dict[int, _Pool] = {}
        self._install(list(targets))

    @staticmethod
    def check_targets(targets: list[UpstreamTarget]) -> None:
        """Names unique, every unit id routed to one target; ``ValueError`` otherwise."""
        names: set[str] = set()
        owner: dict[int, str] = {}
        for t in targets:
            if t.name in names:
                raise ValueError(f"duplicate upstream target name {t.name!r}")
            names.add(t.name)
            for unit in t.unit_ids:
                if unit in owner:
                    raise ValueError(
                        f"unit id {unit} is routed to both {owner[unit]!r} and {t.name!r}"
                    )
                owner[unit] = t.name

    def _install(self, targets: list[UpstreamTarget]) -> list[_Pool]:
        """Swap in a new target set; returns pools that are no longer used."""
        self.check_targets(targets)
        old = self._pools
        pools: dict[str, _Pool] = {}
        for t in targets:
            kept = old.get(t.name)
            # An unchanged target keeps its pool, so a reload does not drop PLC connections.
            pools[t.name] = (
                kept
                if kept is not None and kept.target == t
                else _Pool(t, self._dialer, self._log, self._metrics)
            )
        kept_ids = {id(p) for p in pools.values()}
        retired = [p for p in old.values() if id(p) not in kept_ids]
        new = [p for p in pools.values() if not any(p is o for o in old.values())]
        self._pools = pools
        self._routes = {unit: p for p in pools.values() for unit in p.target.unit_ids}
        if self._nursery is not None:
            for p in new:
                self._nursery.start_soon(p.run)
            for p in retired:
                self._nursery.start_soon(p.retire)
        return retired

    @property
    def targets(self) -> tuple[UpstreamTarget, ...]:
        return tuple(p.target for p in self._pools.values())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every connection task until cancelled; cancellation closes all PLC sockets."""
        if self._nursery is not None:
            raise RuntimeError("Upstreams.run is already running")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for pool in self._pools.values():
                    nursery.start_soon(pool.run)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def route(self, unit_id: int) -> UpstreamTarget | None:
        pool = self._routes.get(unit_id)
        return pool.target if pool is not None else None

    async def exchange(self, unit_id: int, request: Request, pdu: bytes) -> UpstreamReply:
        """Send one request PDU to the PLC for ``unit_id`` and return its validated reply.

        Raises :class:`PathUnavailable` (0x0A) or :class:`TargetNoResponse` (0x0B). Never
        retries: a request that was or may have been sent is answered or fails.
        """
        pool = self._routes.get(unit_id)
        if pool is None:
            self._metrics.inc("mbsec_upstream_failures_total", target="", reason="no_route")
            raise PathUnavailable(f"no upstream target for unit id {unit_id}", reason="no_route")
        if self._nursery is None:
            raise PathUnavailable("upstream connections are not running", reason="not_running")
        conn = pool.pick()
        conn.load += 1
        try:
            return await conn.exchange(unit_id, request, pdu)
        finally:
            conn.load -= 1

    def replace_targets(self, targets: Iterable[UpstreamTarget]) -> None:
        """Reload: new requests use the new set at once; unchanged targets keep their pools,
        removed or changed ones finish their in-flight requests, then close. Raises
        ``ValueError`` (keeping the current set) if the new set is inconsistent."""
        self._install(list(targets))
