"""The data plane driver: one epoll loop in one thread moves the core's bytes and timers.

It decides nothing. Client sockets: ciphertext in, through the connection's ``SSLObject``,
plaintext to :class:`~mbsec.path.client.ClientConn`; its replies out (those made in one pass
in one TLS record).
PLC sockets: connect when the core asks, bytes both ways, close when it asks. Timers: sleep
until :meth:`Timers.next_deadline`, then run what is due. Work made in one loop pass (requests
for a PLC link, replies for a client) leaves in one write at the end of the pass.

Why a thread and not trio: every request costs two wake-ups (client readable, PLC readable);
under trio each is a run-loop pass, an ``epoll_ctl`` re-arm and a coroutine switch, and the
all-trio data plane ran at 0.1-0.45x stunnel where this loop runs at about 1x
(benchmarks/README.md). Trio keeps the control plane: accept, limits, the TLS handshake,
signals, reload, drain, metrics. A session hands its connection over with
:meth:`DataPlane.adopt_threadsafe` and gets it back (close, close line) when it is done.

Thread rules: everything runs in the data-plane thread except the ``*_threadsafe`` entry
points and :meth:`DataPlane.stop`, which queue a call and wake the loop.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Final

from mbsec import events
from mbsec.metrics import MetricsLike
from mbsec.path.client import ClientConn
from mbsec.path.link import Link
from mbsec.path.plc import UpstreamTarget, check_targets
from mbsec.path.router import Router
from mbsec.path.spin import SpinPolicy
from mbsec.path.stats import TargetStats
from mbsec.path.stats import collect as collect_stats
from mbsec.path.target import CONNECT, Target
from mbsec.path.timers import Timers
from mbsec.threads import name_thread

__all__ = ["DataPlane", "compiled", "configure_socket", "records"]

STOP_TIMEOUT: Final = 5.0  # seconds stop() waits for the data-plane thread
RECEIVE_SIZE: Final = 65536
#: the most plaintext one TLS record carries (RFC 8446 5.1): replies are joined up to this
TLS_RECORD_MAX: Final = 16384
KEEPALIVE_IDLE: Final = 30  # seconds before the first keepalive probe on a PLC link
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3
_IN: Final = select.EPOLLIN | select.EPOLLRDHUP
_OUT: Final = select.EPOLLOUT
_ERR: Final = select.EPOLLERR | select.EPOLLHUP
#: module attributes read per request, bound once: compiled, a ``Final`` name is a C static,
#: where ``os.read`` is a module-dict lookup on every call
_READABLE: Final = select.EPOLLIN
_PEER_DATA: Final = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP
_os_read: Final = os.read
_os_write: Final = os.write


def compiled() -> bool:
    """True when this module runs compiled by mypyc (setup.py), False when interpreted."""
    return __file__.endswith(".so")


def configure_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (one ADU per segment) and a 30 s keepalive (finds a PLC that vanished
    without a FIN on an idle link; the reply deadline covers busy ones)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def records(replies: list[bytes], limit: int = TLS_RECORD_MAX) -> list[bytes]:
    """The replies joined into as few TLS records as fit ``limit`` bytes of plaintext each,
    split only between ADUs (an ADU never spans two records), in order."""
    out: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for data in replies:
        if batch and size + len(data) > limit:
            out.append(b"".join(batch))
            batch = []
            size = 0
        batch.append(data)
        size += len(data)
    if batch:
        out.append(b"".join(batch))
    return out


class DataPlane:
    """The epoll loop, its wake-up fd and the sockets of every adopted client and PLC link."""

    def __init__(self, targets: Iterable[UpstreamTarget], *, log: Any, metrics: MetricsLike,
                 busy_poll: float = 0.0, on_fatal: Callable[[], None] | None = None,
                 pass_end: Callable[[], None] | None = None) -> None:
        self.log = log
        self.metrics = metrics
        self.timers = Timers()
        self.router = Router(list(targets), timers=self.timers, log=log, metrics=metrics)
        self.outbox = self.router.outbox
        self._busy_poll = busy_poll
        self._on_fatal = on_fatal
        #: called at the end of every loop pass (``workers > 1``: the node state writes the
        #: in-flight releases of the pass under one lock, mbsec.nodestate.NodeState.settle)
        self._pass_end = pass_end
        self._ep = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._wake_fd, select.EPOLLIN)
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._links: dict[Link, LinkIO] = {}
        self.now = time.monotonic()
        self._running = False
        self._worker: threading.Thread | None = None
        self._wake_lock = threading.Lock()
        self._stopped = False
        self._sent_upstream = False  # this pass wrote requests to a PLC (busy poll)
        #: busy polls taken and those that found nothing (``busy_poll_us``): what the
        #: adaptive rule decided, counted where the clock cannot blur it (tests)
        self.spins = 0
        self.empty_spins = 0
        #: the logger's sinks (audit.SinkLogger): while this loop runs, the allowed-request
        #: lines logged on this thread go to each sink's writer thread (no write(2) here)
        sink = getattr(log, "_logger", None)
        self._log_sink: Any = sink if hasattr(sink, "flush_deferred") else None
        #: that sink while this thread owns its per-pass batch of allowed lines (``_run``)
        self._batch_sink: Any = None

    # -- trio side --------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._worker = threading.Thread(target=self._run, name="mbsec-dataplane", daemon=True)
        self._worker.start()
        name_thread(self._worker)

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
        if wedged:  # pragma: no cover - only a bug gets here
            self.bug(RuntimeError(f"data plane did not stop within {STOP_TIMEOUT:g} s"))

    def call_threadsafe(self, fn: Callable[[], None]) -> bool:
        """Run ``fn`` in the loop; False when the plane has stopped (``fn`` is dropped)."""
        with self._wake_lock:
            if self._stopped:
                return False
            calls = self._calls
            # one wake-up per batch: a queue that already holds calls has its wake-up written
            # and not yet acted on (the loop drains the queue to empty after reading the
            # eventfd, and checks it before it sleeps), so a burst of hand-offs costs one
            # write and one wake-up, not one each
            was_empty = not calls
            calls.append(fn)
            if was_empty:
                os.eventfd_write(self._wake_fd, 1)
            return True

    def replace_targets_threadsafe(
        self, targets: Iterable[UpstreamTarget], then: Callable[[], None] | None = None
    ) -> threading.Event:
        """Reload: validated here (``ValueError`` keeps the running set), applied in the loop,
        with ``then`` in the same step; the event is set once applied."""
        new = list(targets)
        check_targets(new)
        applied = threading.Event()

        def apply() -> None:
            try:
                self.router.install(new, time.monotonic())
                if then is not None:
                    then()
            finally:
                applied.set()

        if self._worker is None:
            apply()
        elif not self.call_threadsafe(apply):
            applied.set()
        return applied

    def stats_threadsafe(self, done: Callable[[list[TargetStats]], None]) -> bool:
        """A scrape: per-target state and each open PLC socket's ``TCP_INFO``, collected in the
        loop (the only thread that closes those sockets, so no descriptor is read after it was
        closed and reused) and handed to ``done`` there. False when the plane has stopped."""

        def collect() -> None:
            done(collect_stats(self.router.targets.values(), self._links, time.monotonic()))

        if self._worker is None:  # not started, or stopped: no socket to race with
            collect()
            return True
        return self.call_threadsafe(collect)
    def attach_freeze(self, freeze: Any) -> None:
        """Link events feed the automatic write freeze (:class:`mbsec.freeze.WriteFreeze`)
        on this loop's clock; its thaw timer runs on this loop's timers."""
        freeze.schedule = self.timers.at
        self.outbox.on_link = lambda name, up: freeze.link_event(name, up, self.now)

    def adopt_threadsafe(self, make: Callable[[DataPlane, float], ClientIO]) -> None:
        """Hand a connection to the loop: ``make`` builds its :class:`ClientIO` in the loop.

        A bug while it starts (it serves at once what the client sent with its last
        handshake flight) closes that connection, as a bug in one of its later events does
        (:meth:`contain`): the call itself names no connection to close."""
        def adopt() -> None:
            io = make(self, time.monotonic())
            try:
                io.start()
            except Exception as exc:
                self.contain(None, exc, io)

        self.call_threadsafe(adopt)

    # -- loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        sink = self._log_sink
        # the logger's per-pass batch belongs to one data-plane thread (another plane in this
        # process sharing the logger, as in tests, logs line by line)
        batching = sink is not None and sink.batch_thread is None
        if sink is not None:
            sink.defer_writes = True
            if batching:
                sink.batch_thread = threading.get_ident()
                self._batch_sink = sink
        try:
            self._loop()
        except BaseException as exc:  # pragma: no cover - the loop itself failed: a bug
            self.bug(exc, fatal=True)
            if self._on_fatal is not None:
                self._on_fatal()
        finally:
            if sink is not None:  # what this thread logged is written before it ends
                if batching:
                    sink.emit_batch()
                    sink.batch_thread = None
                    self._batch_sink = None
                sink.defer_writes = False
                sink.flush_deferred()

    def _loop(self) -> None:
        ep = self._ep
        handlers = self._handlers
        timers = self.timers
        outbox = self.outbox
        wake = self._wake_fd
        spin = self._busy_poll
        sink = self._batch_sink  # its batch: the allowed requests logged in one pass
        pass_end = self._pass_end
        active = False
        policy = SpinPolicy(spin)  # adaptive busy poll (mbsec.path.spin)
        # the last handler and call are dropped at the end of each pass: a local would keep
        # a closed connection (its ClientIO, or the session that ``make`` closes over) alive
        # while the loop sleeps
        handler: Callable[[int], None] | None = None
        call: Callable[[], None] | None = None
        while self._running:
            deadline = timers.next_deadline()
            if self._calls:
                timeout = 0.0
            elif deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            else:
                timeout = -1.0
            if not spin:
                events = ep.poll(timeout)
                self.now = now = time.monotonic()
            else:
                # busy poll (opt-in, costs CPU), adaptive: the event is picked up without a
                # sleep and a wake-up where one is due within the window (mbsec.path.spin)
                kind = policy.kind(self._sent_upstream, active)
                self._sent_upstream = False
                start = time.monotonic()
                if not policy.should_spin(kind, timeout):
                    events = ep.poll(timeout)
                else:
                    end = start + spin
                    events = ep.poll(0)
                    while not events and time.monotonic() < end:
                        events = ep.poll(0)
                    policy.spun(kind, bool(events))
                    self.spins += 1
                    if not events:
                        self.empty_spins += 1
                        if deadline is not None:
                            timeout = max(0.0, deadline - time.monotonic())
                        events = ep.poll(timeout)
                self.now = now = time.monotonic()
                active = policy.active(bool(events), now - start)
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
                        self.contain(handler, exc)
            handler = None
            if deadline is not None and deadline <= now:
                timers.run_due(now, self.contain)
            while self._calls:
                call = self._calls.popleft()
                try:
                    call()
                except Exception as exc:
                    self.contain(call, exc)
            call = None
            if outbox.actions or outbox.done or outbox.dirty or outbox.clients:
                self.drain(now)
            if pass_end is not None:
                try:
                    pass_end()
                except Exception as exc:
                    self.contain(None, exc)
            if sink is not None and sink.batch:
                sink.emit_batch()

    def drain(self, now: float) -> None:
        """Carry out what the core asked for, until it asks nothing more."""
        outbox = self.outbox
        actions = outbox.actions
        done = outbox.done
        dirty = outbox.dirty
        clients = outbox.clients
        links = self._links
        while actions or done or dirty or clients:
            while actions:
                kind, link, gen = actions.popleft()
                try:
                    if kind == CONNECT:
                        io = LinkIO(self, link, gen)
                        links[link] = io
                        io.connect()
                    else:
                        io2 = links.get(link)
                        if io2 is not None and io2.gen == gen:
                            del links[link]
                            io2.close()
                except Exception as exc:
                    self.contain(None, exc)
            while done:
                ex = done.popleft()
                owner: ClientConn = ex.client
                try:
                    owner.finished(ex, now)
                except Exception as exc:
                    self.bug(exc)
                    owner.abort("internal_error")
            # requests to the PLCs first (they start the next round trip), replies after
            while dirty:
                link = dirty.pop()
                try:
                    io3 = links.get(link)
                    if io3 is not None:
                        if link.out:
                            self._sent_upstream = True
                        io3.write()
                except Exception as exc:
                    self.contain(None, exc, link)
            while clients:
                conn: ClientConn = clients.pop()
                try:
                    conn.queued = False
                    cio: ClientIO | None = conn.io
                    if cio is not None:  # None: handed back already (nothing left to do)
                        cio.flush(now)
                except Exception as exc:
                    self.contain(None, exc, conn)

    def contain(self, fn: Any, exc: Exception, owner: Any = None) -> None:
        """A handler failed (a bug): log it and close what it belongs to, so a half-updated
        connection cannot hang with requests in flight."""
        self.bug(exc)
        if owner is None:  # a bound method's object, or the link of a core timer's partial
            owner = getattr(fn, "__self__", None)
            if owner is None and isinstance(fn, partial) and fn.args:
                owner = fn.args[0]
        try:
            if isinstance(owner, ClientIO):
                owner.conn.abort("internal_error")
            elif isinstance(owner, ClientConn):
                owner.abort("internal_error")
            elif isinstance(owner, LinkIO):
                owner.crashed()
            elif isinstance(owner, Link):
                io = self._links.get(owner)
                if io is not None:
                    io.crashed()
        except Exception as again:  # pragma: no cover - the cleanup failed too
            self.bug(again)

    def bug(self, exc: BaseException, *, fatal: bool = False) -> None:
        """A bug must cost one event, never the data plane (``fatal``: the loop itself died)."""
        events.emit(self.log, events.data_plane_error(exc, fatal))

    def _shutdown(self) -> None:
        self.router.close("shutdown", "upstream pool stopped", time.monotonic())
        self.drain(time.monotonic())
        for io in list(self._links.values()):
            io.close()
        self._links.clear()
        self._running = False

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._ep.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._ep.unregister(fd)


class ClientIO:
    """The socket and TLS side of one adopted client connection."""

    def __init__(self, plane: DataPlane, conn: ClientConn, fd: int, obj: ssl.SSLObject,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, pending_out: bytes,
                 on_finished: Callable[[bool], None]) -> None:
        self.plane = plane
        self.conn = conn
        conn.io = self
        self.fd = fd
        self._obj = obj
        #: the C object behind ``obj`` (``ssl.SSLObject`` wraps each call in a Python frame);
        #: the same calls, errors and state, without the wrapper
        self._tls: Any = getattr(obj, "_sslobj", None) or obj
        self._incoming = incoming
        self._outgoing = outgoing
        self._out = bytearray(pending_out)  # ciphertext the kernel has not taken yet
        self._on_finished = on_finished
        self._mask = 0
        self._held = False  # ciphertext waits in the BIO until the core takes requests again
        self.closed = False  # no more socket I/O (unregistered)
        self._handed_back = False
        self.broken = False
        # TLS 1.2 has no message a client may send after the handshake but a renegotiating
        # ClientHello: OpenSSL writing while it reads (its no_renegotiation alert) means it
        # refused one, and a connection that then breaks closes for that reason
        self._tls12 = obj.version() == "TLSv1.2"
        self._refused_renegotiation = False

    def start(self) -> None:
        self._mask = _IN
        self.plane.register(self.fd, _IN, self.on_event)
        now = self.plane.now
        if self.conn.closing or self._out:  # stopped before we got it, or tickets to send
            self.flush(now)
        if self._incoming.pending and not self.closed:  # sent right after the handshake
            self._decrypt(now)
        self.plane.drain(now)

    def on_event(self, ev: int) -> None:
        now = self.plane.now
        conn = self.conn
        if ev & _OUT:
            self.flush(now)
            if self.closed:
                return
        if not conn.reading:
            if ev & _ERR and not self.closed:
                # hung up while we only write (drain): nobody takes the replies, and a
                # level-triggered HUP would wake the loop on every pass
                conn.abort("client_reset")
            return
        # EPOLLIN of a pass in which the mask dropped it (pipelining limit) waits
        if ev & _ERR or (ev & _IN and self._mask & _READABLE):
            try:
                raw = _os_read(self.fd, RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError:
                conn.receive_eof(self._broken_reason(), now, broken=True)
                return
            conn.raw_received(now)
            if raw:
                self._incoming.write(raw)
            else:
                self._incoming.write_eof()
            self._decrypt(now)

    def _decrypt(self, now: float) -> None:
        """Decrypt what the BIO holds while the core takes requests. While it takes none
        (pipelining limit, replies waiting) the ciphertext stays here, at most one read of
        it, and :meth:`flush` comes back once the core takes requests again."""
        obj = self._tls
        conn = self.conn
        incoming = self._incoming
        drained = False
        self._held = False
        while True:
            if not conn.wants_read:
                # the core takes no requests now: what the BIO holds waits for flush
                self._held = conn.reading and bool(incoming.pending or obj.pending())
                break
            if not incoming.pending and not incoming.eof and not obj.pending():
                drained = True
                break  # nothing buffered: a read could only want more
            try:
                data = obj.read(RECEIVE_SIZE)
            except ssl.SSLWantReadError:
                drained = True
                break
            except ssl.SSLEOFError:  # EOF without close_notify (docs/events.md: a reset)
                conn.receive_eof("renegotiation_refused" if self._refused_renegotiation
                                 else "client_reset", now, broken=True)
                return
            except ssl.SSLError:
                conn.receive_eof(self._broken_reason(), now, broken=True)
                return
            if not data:
                conn.receive_eof("client_closed", now)
                break
            conn.receive(data, now)
        if self._outgoing.pending:  # e.g. a TLS 1.3 KeyUpdate answer, in order with replies
            if self._tls12:
                self._refused_renegotiation = True
            self._out += self._outgoing.read()
            conn.mark_dirty()
        if drained:  # what is left in the BIO is part of a record (not held back by us)
            conn.settled(incoming.pending > 0, now)

    def _broken_reason(self) -> str:
        """Why the client's stream broke: after a refused renegotiation (the client aborts
        on the no_renegotiation alert) that is the cause, else a reset."""
        if self._refused_renegotiation or (self._tls12 and self._outgoing.pending):
            return "renegotiation_refused"
        return "client_reset"

    def flush(self, now: float) -> None:
        """Encrypt the replies, write what the kernel takes, report.

        The replies made since the last flush leave in one TLS record (TLS is a stream: the
        record boundaries carry no meaning, and docs/compliance.md row 12 says so). A client
        that waits for each reply gets one ADU per record; a pipelining client gets the
        replies that finished in one loop pass together, with one encryption and one
        ``write(2)`` instead of one per reply."""
        conn = self.conn
        if self.closed:
            conn.replies.clear()
            self._hand_back_if_released()
            return
        replies = conn.replies
        if replies:
            try:
                if len(replies) == 1:
                    self._tls.write(replies[0])
                else:
                    for record in records(replies):
                        self._tls.write(record)
            except ssl.SSLError:
                replies.clear()
                conn.abort("client_gone")
                self._finish()
                return
            replies.clear()
            self._out += self._outgoing.read()
        out = self._out
        if out:
            try:
                n = _os_write(self.fd, out)
            except BlockingIOError:
                n = 0
            except OSError:
                conn.abort("client_gone")
                self._finish()
                return
            del out[:n]
        if conn.closing:
            self._finish()
            return
        conn.flushed(not out, now)
        if conn.closing:
            self._finish()
            return
        wants_read = conn.wants_read
        want = (_IN if wants_read else 0) | (_OUT if out else 0)
        if want != self._mask:
            self._mask = want
            self.plane.modify(self.fd, want)
        if wants_read and self._held:
            self._decrypt(now)  # ciphertext held back while the core took no requests

    def _finish(self) -> None:
        """No more socket I/O; the connection goes back to trio once nothing is in flight."""
        if not self.closed:
            self.closed = True
            self.broken = self.conn.broken or bool(self._out)
            self.plane.unregister(self.fd)
        self._hand_back_if_released()

    def _hand_back_if_released(self) -> None:
        conn = self.conn
        if conn.released and not self._handed_back:
            self._handed_back = True
            # The connection ends here for the data plane: cut the ``conn.io`` back
            # reference, so that once trio has closed the session its ``ClientConn``, this
            # object, the ``SSLObject`` and the session behind ``on_finished`` are freed by
            # reference counting alone, not at the cyclic GC's next full pass
            # (tests/e2e/test_session_memory.py; benchmarks/README.md, "Memory").
            conn.io = None
            sink = self.plane._batch_sink
            if sink is not None and sink.batch:
                sink.emit_batch()  # its allowed requests before its close line
            self._on_finished(self.broken)


class LinkIO:
    """The socket of one PLC link (one connect attempt: a reconnect makes a new one)."""

    def __init__(self, plane: DataPlane, link: Link, gen: int) -> None:
        self.plane = plane
        self.link = link
        self.gen = gen
        target = link.target
        assert isinstance(target, Target)
        self.target: Target = target
        self.sock: socket.socket | None = None
        self.fd = -1
        self.connected = False
        self._writing = False
        self._addrs: list[tuple[Any, ...]] = []

    def connect(self) -> None:
        """A non-blocking connect; a name is resolved off the loop (a slow DNS stalls no one);
        the core's connect deadline covers both."""
        t = self.target.target
        try:
            ipaddress.ip_address(t.host)
        except ValueError:
            plane = self.plane

            def resolve() -> None:
                result: list[tuple[Any, ...]] | OSError
                try:
                    result = list(socket.getaddrinfo(t.host, t.port, type=socket.SOCK_STREAM))
                except (OSError, UnicodeError) as exc:
                    result = OSError(str(exc))
                plane.call_threadsafe(lambda: self._resolved(result))

            threading.Thread(target=resolve, name="mbsec-resolve", daemon=True).start()
            return
        family = socket.AF_INET6 if ":" in t.host else socket.AF_INET
        self._resolved([(family, socket.SOCK_STREAM, 0, "", (t.host, t.port))])

    def _resolved(self, result: list[tuple[Any, ...]] | OSError) -> None:
        if self.plane._links.get(self.link) is not self:
            return  # closed (timed out) meanwhile
        if isinstance(result, OSError):
            self._failed(str(result) or type(result).__name__)
            return
        self._addrs = result
        self._next("no address")

    def _next(self, last_error: str) -> None:
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
            self.fd = sock.fileno()
            self.plane.register(self.fd, _OUT, self._on_connect)
            return
        self._failed(last_error)

    def _failed(self, message: str) -> None:
        self.plane._links.pop(self.link, None)
        self.target.connect_failed(self.link, self.gen, "connect_failed", message,
                                   time.monotonic())

    def _on_connect(self, _ev: int) -> None:
        sock = self.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self.plane.unregister(self.fd)
        if not err:
            try:
                configure_socket(sock)
            except OSError as exc:
                err = exc.errno or errno.EIO
        if err:
            sock.close()
            self.sock = None
            self.fd = -1
            self._next(os.strerror(err))
            return
        self.connected = True
        self.plane.register(self.fd, _IN, self.on_event)
        self.target.connected(self.link, self.gen, self.plane.now)

    def write(self) -> None:
        """Write the link's queued ADUs (end of a loop pass: many in one system call)."""
        out = self.link.out
        if not out or not self.connected or self._writing:
            return
        try:
            n = _os_write(self.fd, out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.target.closed(self.link, self.gen, "send_failed",
                               str(exc) or type(exc).__name__, self.plane.now)
            return
        self.link.wrote(n)
        if out:
            self._writing = True
            self.plane.modify(self.fd, _IN | _OUT)

    def on_event(self, ev: int) -> None:
        link = self.link
        if link.gen != self.gen:
            return  # reset by the core in this pass; the close follows
        now = self.plane.now
        if ev & _OUT and self._writing:
            self._writing = False
            self.plane.modify(self.fd, _IN)
            self.write()
            if link.gen != self.gen:
                return
        if not ev & _PEER_DATA:
            return
        try:
            data = _os_read(self.fd, RECEIVE_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self.target.closed(link, self.gen, "connection_lost",
                               str(exc) or type(exc).__name__, now)
            return
        if not data:
            self.target.closed(link, self.gen, "eof", "connection closed by the PLC", now)
            return
        self.target.receive(link, data, now)

    def crashed(self) -> None:
        """A handler of this link raised (logged): reset it, failing what is on it."""
        self.target.closed(self.link, self.gen, "internal_error",
                           "internal error on this PLC connection (logged)", self.plane.now)

    def close(self) -> None:
        sock = self.sock
        if sock is not None:
            self.plane.unregister(sock.fileno())
            sock.close()
        self.sock = None
        self.fd = -1
        self.connected = False
