"""Listeners, connection limits, reload and drain: everything around the sessions.

``Proxy.serve`` follows trio's ``task_status`` convention, so a test (or the demo) does
``addrs = await nursery.start(proxy.serve)`` and learns the bound ports. Reload builds a complete
new :class:`~mbsec.session.ProxyState` first and swaps it in one assignment; if anything fails
the running state stays and the reason is logged. Shutdown happens in two phases: stop accepting
and stop reading new requests, then give in-flight requests ``limits.drain_timeout`` seconds.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import datetime as dt
import errno
import heapq
import itertools
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from structlog.typing import FilteringBoundLogger

from mbsec import events
from mbsec.admission import (
    WAITABLE_REASONS,
    Admission,
    Admitted,
    Refused,
    RejectionLog,
    Summary,
    WaitingRoom,
    source_prefix,
)
from mbsec.audit import SinkLogger, null_logger
from mbsec.audit_fast import connection_lines
from mbsec.expiry import tls_expiry
from mbsec.flap import FlapRule
from mbsec.freeze import WriteFreeze
from mbsec.handshake import IdentityCounter
from mbsec.metrics import Metrics, MetricsLike, NullMetrics, gauge_setter, incrementer
from mbsec.metrics_http import scrape_proxy, serve_metrics
from mbsec.nodestate import FreezeView, NodeState, SharedRateLimiter
from mbsec.path.decide import StateCell
from mbsec.path.epoll import DataPlane
from mbsec.path.epoll import compiled as reactor_compiled
from mbsec.path.plc import check_targets
from mbsec.policy import Policy, PolicyError, RateLimiter, load_policy
from mbsec.sdnotify import Notifier, PlaneProbe, WorkerRelay
from mbsec.session import Address, HandshakeCounters, ProxyState, Session, set_conn_id_space
from mbsec.settings import LimitsSettings, Settings, SettingsError, load_settings, parse_hostport
from mbsec.sockready import readable_now as _readable
from mbsec.threads import lower_this_thread, thread_nice
from mbsec.tls import TlsConfigError, build_material, crl_warnings
from mbsec.tls_keylog import KeyLog

KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
CRL_CHECK_INTERVAL = 3600.0
RELOAD_APPLY_TIMEOUT = 2.0  # seconds a reload waits for the data plane to switch
LIVENESS_INTERVAL = 1.0  # seconds between two questions to the data-plane thread (/healthz)
ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: while every handshake place is taken, or its prefix is over its rate, a connection whose
#: ClientHello has not arrived yet at accept may wait this long for it before admission
#: decides (when the proxy accepts at once, a legitimate client's first bytes may still be on
#: their way); at most PROBATION_MAX wait at once, and a newcomer ends the oldest wait (a
#: silent flood cannot starve it)
PROBATION_S = 1.0
PROBATION_MAX = 256
#: a refused connection is held about this long (unread; spread over half to one and a half
#: times it, so that a flood's reconnects do not arrive in waves) before its reset: a flood
#: that reconnects at once then waits instead of cycling through accept, and a legitimate
#: client's connection does not queue behind it; at most TARPIT_MAX held at once (fewer when
#: the open-files limit is low), beyond that refused ones are reset at once
TARPIT_S = 5.0
TARPIT_MAX = 1024
#: a newcomer that has spoken but found no handshake place or no token of its prefix's rate
#: waits up to WAITING_S for one (mbsec.admission.WaitingRoom), retried every WAITING_TICK_S;
#: at most WAITING_MAX wait at once (fewer when the open-files limit is low), three quarters
#: of them from one prefix; who waits longer, or finds the room full, is refused as before.
#: 4 s: a storm of 1,000 masters drains in 2-3 s on a 2-vCPU box, and a master's own
#: response timeout is rarely below 5 s
WAITING_S = 4.0
WAITING_TICK_S = 0.01
WAITING_MAX = 1024
#: a pass over the room ends after this many heads that must still wait: waiters from a
#: thousand prefixes (a flood that speaks and stalls) cost a bounded share of the loop
WAITING_MISSES = 32


class StartupError(Exception):
    """The configuration cannot be served; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _policy_problems(exc: PolicyError) -> list[str]:
    """One line per diagnostic, without an "error:" of its own: the caller prefixes one
    (``error: mbsec.toml: policy.yaml:4:5: missing required key ...``)."""
    diags = getattr(exc, "diagnostics", None)
    if diags:
        return [f"{d.file}:{d.line}:{d.col}: "
                + ("" if d.severity == "error" else f"{d.severity}: ") + d.message
                + (f" (hint: {d.hint})" if d.hint else "") for d in diags]
    return [str(exc)]


def cross_check(settings: Settings, policy: Policy) -> list[str]:
    """Policy targets against ``[upstreams]``: named upstreams exist and route those unit ids."""
    problems: list[str] = []
    routed: dict[int, str] = {}
    by_addr: dict[tuple[str, int], str] = {}
    for name, up in settings.upstreams.items():
        by_addr[(up.host, up.port)] = name
        for u in up.unit_ids:
            routed[u] = name
    for tname, (units, upstream) in policy.targets.items():
        if upstream is not None:
            try:
                addr = parse_hostport(upstream, default_port=502)
            except ValueError as exc:
                problems.append(f"{settings.policy}: targets.{tname}.upstream: {exc}")
                continue
            owner = by_addr.get(addr)
            if owner is None:
                problems.append(
                    f"{settings.policy}: targets.{tname}.upstream: {upstream} is not the "
                    "host:port of any [upstreams.*] entry in the configuration"
                )
                continue
            for u in sorted(units):
                if routed.get(u) != owner:
                    problems.append(
                        f"{settings.policy}: targets.{tname}: unit id {u} is routed to "
                        f"{routed.get(u) or 'no upstream'}, not to {owner!r} ({upstream})"
                    )
        else:
            for u in sorted(units):
                if u not in routed:
                    problems.append(
                        f"{settings.policy}: targets.{tname}: unit id {u} is not routed by any "
                        "[upstreams.*] entry (requests would get exception 0x0A)"
                    )
    return problems


def build_state(
    settings: Settings, *, generation: int = 0, previous: ProxyState | None = None,
    node: NodeState | None = None, shared_limits: bool = False, keylog: KeyLog | None = None,
) -> ProxyState:
    """Load TLS material, CRLs and the policy and cross-check them; collect every problem."""
    problems: list[str] = []
    material = None
    try:
        material = build_material(settings.tls, keylog=keylog)
    except TlsConfigError as exc:
        problems.extend(exc.problems)
    policy = None
    if not settings.policy.is_file():
        problems.append(f"policy: file not found: {settings.policy}")
    else:
        try:
            policy = load_policy(settings.policy)
        except PolicyError as exc:
            problems.extend(_policy_problems(exc))
    if policy is not None:
        problems.extend(cross_check(settings, policy))
    if problems or material is None or policy is None:
        raise StartupError(problems or ["configuration is not usable"])
    limiter: RateLimiter | SharedRateLimiter
    if previous is not None:  # a reload keeps every client's spent budget and in-flight count
        limiter = previous.limiter.successor(policy)
    elif node is not None and shared_limits:  # workers > 1: one budget for the node
        limiter = SharedRateLimiter(policy, node, clock=time.monotonic)
    else:
        limiter = RateLimiter(policy, clock=time.monotonic)
    freeze = None
    if node is not None:  # writes frozen by mbsec ctl or a flapping link (mbsec.nodestate)
        units = {u: name for name, up in settings.upstreams.items() for u in up.unit_ids}
        freeze = FreezeView(node, units)
    return ProxyState(tls=material, policy=policy, limiter=limiter, generation=generation,
                      freeze=freeze, freeze_exception=settings.admin.freeze_exception)


#: Linux copies SO_KEEPALIVE and the keepalive timings of a listening socket to every
#: socket accept() returns, so they are set once per listener (:func:`configure_listener`)
KEEPALIVE_INHERITED = sys.platform.startswith("linux")


def configure_listener(sock: Any) -> None:
    """The client sockets' 30 s keepalive, set on the listening socket: accepted sockets
    inherit it on Linux (tests/e2e/test_proxy_paths.py reads it back from one), which
    saves four ``setsockopt`` calls per connection; ``trio.SocketStream`` sets TCP_NODELAY
    on each accepted socket itself."""
    with contextlib.suppress(OSError):
        _keepalive(sock)


def configure_accepted(stream: trio.SocketStream) -> None:
    """TCP_NODELAY and a 30 s keepalive on client sockets: dead HMIs free their slots
    (where accepted sockets do not inherit them from the listener)."""
    with contextlib.suppress(OSError):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        _keepalive(stream)


def _keepalive(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


class Proxy:
    """The running proxy: current state, upstream pool, sessions, limits."""

    def __init__(
        self,
        settings: Settings,
        *,
        log: FilteringBoundLogger | None = None,
        metrics: MetricsLike | None = None,
        config_path: Path | None = None,
        listen_sockets: list[socket.socket] | None = None,
        metrics_sockets: list[socket.socket] | None = None,
        node: NodeState | None = None,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        self.settings = settings
        #: already bound and listening (a worker process gets them from its parent)
        self._listen_sockets = listen_sockets
        self._metrics_sockets = metrics_sockets
        self.config_path = config_path
        self.log = log or null_logger()
        self.metrics: MetricsLike = metrics or NullMetrics()
        inner: Any = getattr(self.log, "_logger", None)
        if isinstance(inner, SinkLogger):  # a sink that fails is counted (mbsec/audit.py)
            inner.metrics = self.metrics
        #: freezes and (workers > 1) rate buckets shared by the node's workers; in memory
        #: when the caller gives no state file (tests, the demo)
        self.node = node if node is not None else NodeState.memory()
        self.worker = worker
        self.workers = workers
        #: TLS 1.3 handshake secrets, to name the certificate a rejected handshake presented
        self.keylog: KeyLog | None = None
        self.tls13_rejection_certificate = "off"
        self.state = build_state(settings, node=self.node, shared_limits=workers > 1,
                                 keylog=self._keylog_for(settings))
        #: why the last reload failed (``mbsec ctl reload`` shows it)
        self.last_reload_problems: list[str] = []
        # alerting series that must exist before their first event: an alert on increase()
        # misses a counter whose series appears with its first count (docs/metrics.md)
        for stage in ("handshake", "open_connection"):
            self.metrics.inc("mbsec_revoked_certificate_seen_total", 0, stage=stage)
        self.metrics.set("mbsec_start_time_seconds", time.time())
        #: when the loaded certificates and CRLs run out (/metrics), rebuilt on every reload
        self.expiry = tls_expiry(settings.tls, self.state.tls)
        #: what requests are decided by; ``state`` (handshakes, CRLs) switches at once on a
        #: reload, this one together with the data plane's routes
        self._decision_cell = StateCell(self.state)
        #: set when the proxy stopped because of an internal failure (exit status 1)
        self.failed = False
        #: nice steps the trio thread (handshakes) runs below the data plane, once serving
        #: (``limits.handshake_nice``; 0 when the system refused it)
        self.handshake_nice = 0
        #: the request path (mbsec.path): its core, driven by one epoll thread
        # workers > 1: a request's in-flight slot in the node state is freed at the end of the
        # loop pass that answered it, one lock per pass (mbsec.nodestate.NodeState.settle)
        self.node.defer_releases = workers > 1
        self.data_plane = DataPlane(settings.upstream_targets(), log=self.log,
                                    metrics=self.metrics, busy_poll=settings.busy_poll_us / 1e6,
                                    on_fatal=self._data_plane_failed,
                                    pass_end=self.node.settle if workers > 1 else None)
        #: write freezes: operator commands and the automatic one, fed by link events
        self.write_freeze = WriteFreeze(
            self.node, FlapRule(**settings.admin.auto_freeze.model_dump()), log=self.log,
            metrics=self.metrics, worker=worker, targets=lambda: list(self.settings.upstreams))
        self.data_plane.attach_freeze(self.write_freeze)
        self.sessions: set[Session] = set()
        #: every session's accepted and closed lines, from templates (mbsec.audit_fast)
        self.connection_lines = connection_lines(self.log)
        #: connection and handshake places, per-prefix rate (mbsec/admission.py)
        self.admission = Admission(
            max_connections=settings.limits.max_connections,
            max_handshakes=settings.limits.max_handshakes,
            max_per_source=settings.limits.max_per_source,
            prefix_rate=settings.limits.prefix_connection_rate,
            prefix_burst=settings.limits.prefix_connection_burst)
        #: ticket -> session, while it is in its handshake (an eviction cancels it)
        self._handshaking: dict[int, Session] = {}
        self._probation: collections.deque[trio.CancelScope] = collections.deque()
        self._tarpit: list[tuple[float, int, trio.SocketStream]] = []  # a heap
        self._tarpit_seq = itertools.count()
        room, self._tarpit_max = _held_sizes(settings.limits.max_connections)
        self._tarpit_changed = trio.Event()
        #: (stream, source, peer, first refusal reason) of speaking newcomers waiting for a place
        self._waiting: WaitingRoom[tuple[trio.SocketStream, str, Any, str]] = WaitingRoom(
            room, WAITING_S, per_prefix=max(1, 3 * room // 4))
        self._waiting_changed = trio.Event()
        #: which rejections of peers without a certificate are written (mbsec/admission.py)
        self.rejections = RejectionLog(rate=settings.logging.rejections_per_second,
                                       interval=settings.logging.rejection_interval,
                                       now=time.monotonic())
        self._rejections_changed = trio.Event()
        #: open connections per identity (``limits.max_per_identity``), claimed after a
        #: handshake (mbsec.handshake.verdict) and released by the session at its end
        self.identities = IdentityCounter(settings.limits.max_per_identity)
        self._shutdown = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._no_sessions = trio.Event()
        self._ready = False
        #: False while the data-plane thread does not answer (a wedged loop): /healthz 503
        self.data_plane_answers = True
        #: for the final ``server-stopped`` event: the drain's length, connections it cut
        self._drain_s = 0.0
        self._connections_cut = 0
        self.addresses: list[tuple[str, int]] = []
        self.metrics_port: int | None = None
        # the series every connection updates, bound once here rather than looked up by name
        # and labels several times per connection (each appears with its first update)
        self._count_accepted = incrementer(self.metrics, "mbsec_connections_total",
                                           outcome="accepted")
        self._set_connections_active = gauge_setter(self.metrics, "mbsec_connections_active")
        self._set_handshakes_active = gauge_setter(self.metrics, "mbsec_handshakes_active")
        self._handshake_counters = HandshakeCounters(self.metrics)
        self._warn_crls()

    # -- rejections of peers without a certificate -------------------------------------------

    def report_rejection(self, event: events.Event, source_ip: str | None) -> None:
        """Write ``event`` (a rejection of an unauthenticated peer) if the rejection log lets
        it through; otherwise it is counted in a ``rejections-suppressed`` summary."""
        reason = str(event.fields.get("event.reason", ""))
        if self.rejections.offer(source_prefix(source_ip), event.action, reason,
                                 time.monotonic()):
            events.emit(self.log, event)
            self._rejections_changed.set()  # a new interval: the summary task re-arms
        else:
            self.metrics.inc("mbsec_rejections_suppressed_total", reason=reason)

    def _write_summaries(self, summaries: list[Summary]) -> None:
        mono = time.monotonic()
        wall = dt.datetime.now(dt.UTC)

        def at(t: float) -> dt.datetime:
            return wall - dt.timedelta(seconds=mono - t)

        for sm in summaries:
            events.emit(self.log, events.rejections_suppressed(
                sm.prefix, sm.action, sm.reason, sm.count, at(sm.start), at(sm.end),
                sm.prefixes))

    async def _rejection_summaries(self) -> None:
        """Write each interval's summaries when it ends (and what is left at shutdown)."""
        try:
            while True:
                self._rejections_changed = trio.Event()
                deadline = self.rejections.next_deadline()
                if deadline is None:
                    await self._rejections_changed.wait()
                    continue
                with trio.move_on_after(max(0.0, deadline - time.monotonic())):
                    await self._rejections_changed.wait()
                self._write_summaries(self.rejections.due(time.monotonic()))
        finally:
            self._write_summaries(self.rejections.due(time.monotonic(), final=True))

    # -- reload ----------------------------------------------------------------------------

    def reload(self, settings: Settings | None = None) -> bool:
        """SIGHUP: re-read the config file (or use ``settings``), rebuild, swap atomically.

        TLS material, CRLs, policy and upstream targets are reloaded; listen addresses, limits,
        logging and metrics need a restart (a change there is logged and ignored).
        """
        try:
            if settings is None:
                if self.config_path is None:
                    settings = self.settings
                else:
                    settings = load_settings(self.config_path)
            state = build_state(  # [admin] needs a restart: the running one stays
                settings.model_copy(update={"admin": self.settings.admin}),
                generation=self.state.generation + 1, previous=self.state, node=self.node,
                keylog=self._keylog_for(settings),
            )
            targets = settings.upstream_targets()
            check_targets(targets)
        except (SettingsError, StartupError, OSError, ValueError) as exc:
            # a failed reload keeps the running state, whatever broke (ghostunnel's rule)
            problems = getattr(exc, "problems", None) or [f"{type(exc).__name__}: {exc}"]
            self.last_reload_problems = list(problems)
            self.metrics.inc("mbsec_config_reloads_total", outcome="failure")
            events.emit(self.log, events.config_reload_failed(problems))
            return False
        ignored = [
            key
            for key in ("listen", "limits", "logging", "metrics", "workers", "data_plane",
                        "busy_poll_us", "admin")
            if getattr(settings, key) != getattr(self.settings, key)
        ]
        # decisions and routes switch in one step of the data-plane thread: a request is
        # never decided by the new policy and routed by the old unit map (or the reverse)
        applied = self.data_plane.replace_targets_threadsafe(
            targets, then=lambda: setattr(self._decision_cell, "current", state))
        # wait (briefly: one loop pass) so that a request sent after reload() returns, or
        # after the success event, is decided by the new policy
        # (a wedged loop, a bug that stops the proxy anyway, must not hang the reload)
        applied.wait(RELOAD_APPLY_TIMEOUT)
        self.state = state
        self.expiry = tls_expiry(settings.tls, state.tls)
        self.settings = self.settings.model_copy(
            update={"tls": settings.tls, "policy": settings.policy, "upstreams": settings.upstreams}
        )
        self.last_reload_problems = []
        self.write_freeze.refresh_gauges()  # targets a reload added or removed
        self.metrics.inc("mbsec_config_reloads_total", outcome="success")
        events.emit(self.log, events.config_reloaded(state.generation, ignored))
        self._warn_crls()
        self._drop_revoked(state)
        return True

    def _keylog_for(self, settings: Settings) -> KeyLog | None:
        """The key log the next TLS context writes to: None when ``tls.name_tls13_rejections``
        is off; opened the first time it is on (at start, or at the reload that turns it on:
        its pipe then serves every later context). ``tls13_rejection_certificate`` says
        which, for ``server-start``."""
        if not settings.tls.name_tls13_rejections:
            self.tls13_rejection_certificate = "off"
            return None
        if self.keylog is None:
            max_handshakes = self.settings.limits.max_handshakes  # [limits]: restart only
            self.keylog = KeyLog.open(max_handshakes)
            if self.keylog is None:
                self.tls13_rejection_certificate = (
                    f"unavailable: the system gives no pipe for the key-log lines of twice "
                    f"limits.max_handshakes ({max_handshakes}) handshakes: raise "
                    "/proc/sys/fs/pipe-max-size or lower limits.max_handshakes")
                return None
        self.tls13_rejection_certificate = "named"
        return self.keylog

    def _drop_revoked(self, state: ProxyState) -> None:
        """A reloaded CRL also ends open connections of now-revoked certificates, or of
        certificates under a now-revoked CA, held in ``client_ca`` or presented by the client
        (``Session.issuing_cas``); their in-flight requests still complete. HMIs hold
        connections for weeks."""
        for s in list(self.sessions):
            ident = s.identity
            if ident is not None and any(  # the leaf, then the CAs the client presented
                    state.tls.is_revoked(issuer, serial) or state.tls.issuer_revoked(issuer)
                    for issuer, serial in ((ident.issuer, ident.serial), *s.issuing_cas)):
                self.metrics.inc("mbsec_revoked_certificate_seen_total", stage="open_connection")
                events.emit(self.log, events.connection_revoked(s.conn_id, ident, s.peer_ip))
                s.stop_reading("certificate_revoked")

    def _warn_crls(self) -> None:
        crls = self.state.tls.crls
        now = dt.datetime.now(dt.UTC)
        nexts = [c.next_update for c in crls if c.next_update is not None]
        if nexts:
            self.metrics.set("mbsec_crl_next_update_seconds",
                             (min(nexts) - now).total_seconds())
        for line in crl_warnings(crls, warn_days=self.settings.tls.crl_warn_days, now=now):
            events.emit(self.log, events.crl_expiry(line))

    async def _crl_watch(self) -> None:
        """Re-check CRL expiry while running: a CRL lapses weeks after the last reload."""
        while True:
            await trio.sleep(CRL_CHECK_INTERVAL)
            self._warn_crls()

    async def _freeze_watch(self) -> None:
        """Another worker (or its flapping link) changed the freeze table: this worker's
        gauges follow within a second (requests follow at once: mbsec.nodestate)."""
        seen = self.node.generation()
        while True:
            await trio.sleep(1.0)
            gen = self.node.generation()
            if gen != seen:
                seen = gen
                self.write_freeze.refresh_gauges()

    # -- serving ---------------------------------------------------------------------------

    def _data_plane_failed(self) -> None:
        """Called in the data-plane thread when its loop died: stop (and exit 1), so the
        service manager restarts a proxy that would otherwise accept and never answer."""
        self.failed = True
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self.request_shutdown)

    def request_shutdown(self) -> None:
        """SIGTERM: stop accepting, drain, return from :meth:`serve`."""
        self._shutdown.set()

    @property
    def decision_state(self) -> ProxyState:
        """What requests are decided by: ``state`` (handshakes, CRLs) switches at once on a
        reload, this one together with the data plane's routes."""
        return self._decision_cell.current

    def healthy(self) -> bool:
        return self._ready and not self._shutdown.is_set() and self.data_plane_answers

    async def _liveness(self) -> None:
        """Ask the data-plane thread every second whether its loop still turns: a wedged loop
        accepts (trio) but answers nobody, and /healthz must say so (keepalived then moves
        the virtual address to the other node, deploy/HA.md)."""
        probe = PlaneProbe(self.data_plane)
        while True:
            start = trio.current_time()
            self.data_plane_answers = await probe.answers(LIVENESS_INTERVAL)
            await trio.sleep_until(start + LIVENESS_INTERVAL)

    async def serve(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        limits = self.settings.limits
        self._token = trio.lowlevel.current_trio_token()
        self.data_plane.start()
        self.handshake_nice = self._lower_handshake_thread(self.settings.limits.handshake_nice)
        reason = "shutdown_requested"
        try:
            await self._serve(limits, task_status)
        except BaseException as exc:
            reason = "cancelled" if _only_cancelled(exc) else "internal_error"
            raise
        finally:
            self.data_plane.stop()
            if self._ready:  # the last event, once nothing serves any more
                if self.failed:
                    reason = "data_plane_failed"
                code = None if reason == "cancelled" else int(reason != "shutdown_requested")
                events.emit(self.log, events.server_stopped(
                    reason, self._connections_cut, self._drain_s, code))

    def _lower_handshake_thread(self, increment: int) -> int:
        """``limits.handshake_nice``: raise this (trio) thread's nice value, after every thread
        that stays at the process's value has started (the data plane, the log writers, here
        rather than at the first line they write; a thread inherits its creator's value,
        mbsec/threads.py); the steps applied."""
        inner: Any = getattr(self.log, "_logger", None)
        if isinstance(inner, SinkLogger):
            inner.start_writers()
        if increment <= 0:
            return 0
        base = thread_nice()
        try:
            return lower_this_thread(increment) - base
        except OSError:  # a sandbox that forbids setpriority: server-start says 0
            return 0

    async def _serve(
        self, limits: LimitsSettings, task_status: trio.TaskStatus[list[tuple[str, int]]]
    ) -> None:
        async with trio.open_nursery() as root:
            if self.settings.metrics.listen and isinstance(self.metrics, Metrics):
                host, port = parse_hostport(self.settings.metrics.listen)
                self.metrics_port = await root.start(
                    lambda task_status: serve_metrics(
                        self.metrics,  # type: ignore[arg-type]
                        host or None,  # ":port": every address, as for listen
                        port,
                        healthy=self.healthy,
                        sockets=self._metrics_sockets,
                        scrape=lambda: scrape_proxy(
                            self.metrics, self.data_plane, self.expiry),  # type: ignore[arg-type]
                        task_status=task_status,
                    )
                )
            root.start_soon(self._crl_watch)
            root.start_soon(self._liveness)
            root.start_soon(self._freeze_watch)
            root.start_soon(self._rejection_summaries)
            root.start_soon(self._tarpit_closer)
            listeners: list[trio.SocketListener] = []
            if self._listen_sockets is not None:
                listeners = [
                    trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                    for sock in self._listen_sockets
                ]
            for host, port in self.settings.listen_addresses() if not listeners else ():
                listeners.extend(await trio.open_tcp_listeners(port, host=host or None))
            self.addresses = [
                (str(ln.socket.getsockname()[0]), int(ln.socket.getsockname()[1]))
                for ln in listeners
            ]
            if KEEPALIVE_INHERITED:
                for ln in listeners:
                    configure_listener(ln.socket)
            async with trio.open_nursery() as conns:
                accept_scope = trio.CancelScope()

                async def accept_all() -> None:
                    with accept_scope:
                        async with trio.open_nursery() as acc:
                            acc.start_soon(self._waiting_room, conns)
                            for ln in listeners:
                                acc.start_soon(self._accept_loop, ln, conns)

                conns.start_soon(accept_all)
                self._ready = True
                events.emit(self.log, events.server_start(
                    [f"{h}:{p}" for h, p in self.addresses], self.metrics_port,
                    self.settings.upstreams, self.settings.data_plane,
                    reactor_compiled(), self.tls13_rejection_certificate,
                    self.handshake_nice))
                task_status.started(self.addresses)
                await self._shutdown.wait()
                accept_scope.cancel()
                for ln in listeners:
                    await ln.aclose()
                for s in list(self.sessions):
                    s.stop_reading()
                events.emit(self.log,
                            events.server_stop(len(self.sessions), limits.drain_timeout))
                drain_start = trio.current_time()
                with trio.move_on_after(limits.drain_timeout):
                    if self.sessions:
                        await self._no_sessions.wait()
                self._drain_s = trio.current_time() - drain_start
                self._connections_cut = len(self.sessions)
                conns.cancel_scope.cancel()
            root.cancel_scope.cancel()

    async def _accept_loop(self, listener: trio.SocketListener, conns: trio.Nursery) -> None:
        local = _listener_local(listener)  # None: a wildcard address, asked per connection
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in ACCEPT_ERRNOS:
                    events.emit(self.log, events.accept_failed(exc))
                    await trio.sleep(0.1)
                    continue
                raise
            # the cheap part here, without a task: a flood is refused before any task,
            # setsockopt or TLS state is spent on it
            try:
                peer = stream.socket.getpeername()
            except OSError:
                _abort(stream)
                continue
            source = str(peer[0])
            spoke = _readable(stream.socket)
            # first come, first served: behind the ones of its prefix already waiting, for
            # what its head waits for (the reason it is refused with if it waits in vain)
            head = self._waiting.head(source_prefix(source)) if spoke else None
            if head is not None and self._wait(stream, source, peer, head[3]):
                continue
            if not spoke and (self.admission.full()
                              or self.admission.over_rate(source, time.monotonic())):
                conns.start_soon(self._probation_then_connection, stream, source, peer)
                continue
            verdict = self._admit(stream, source, peer, spoke)
            if verdict is not None:
                conns.start_soon(self._connection, stream, source, verdict,
                                 ((source, int(peer[1])), local), spoke)

    def _admit(self, stream: trio.SocketStream, source: str, peer: Any,
               spoke: bool) -> Admitted | None:
        verdict = self.admission.admit(source, time.monotonic(), spoke=spoke)
        if isinstance(verdict, Admitted):
            return verdict
        if not (spoke and verdict.reason in WAITABLE_REASONS
                and self._wait(stream, source, peer, verdict.reason)):
            self._refuse(stream, source, peer, verdict)
        return None

    def _wait(self, stream: trio.SocketStream, source: str, peer: Any, reason: str) -> bool:
        """Put a speaking newcomer in the waiting room; False when there is no room for it."""
        if not self._waiting.add(source_prefix(source), (stream, source, peer, reason),
                                 time.monotonic()):
            return False
        self.metrics.set("mbsec_connections_waiting", len(self._waiting))
        self._waiting_changed.set()
        return True

    async def _waiting_room(self, conns: trio.Nursery) -> None:
        """Admit the waiting newcomers as places and tokens free up, each prefix's in arrival
        order and the prefixes in turn; refuse who waited ``WAITING_S`` with the reason it was
        first refused for (its rejection event is written then, not when it started waiting)."""
        room = self._waiting
        try:
            while True:
                if not room:
                    self._waiting_changed = trio.Event()
                    await self._waiting_changed.wait()
                    continue
                now = time.monotonic()
                for stream, source, peer, reason in room.expired(now):
                    self._refuse(stream, source, peer, Refused(reason))
                admit = partial(_readmit, self.admission, now)
                for (stream, source, peer, _reason), verdict in room.serve(admit,
                                                                            WAITING_MISSES):
                    if isinstance(verdict, Admitted):
                        self.metrics.inc("mbsec_connections_waited_total")
                        conns.start_soon(self._connection, stream, source, verdict,
                                         ((source, int(peer[1])), None), True)
                    else:
                        self._refuse(stream, source, peer, verdict)
                self.metrics.set("mbsec_connections_waiting", len(room))
                await trio.sleep(WAITING_TICK_S)
        finally:
            for stream, *_ in room.drain():
                _abort(stream)
            self.metrics.set("mbsec_connections_waiting", 0)

    def _refuse(self, stream: trio.SocketStream, source: str, peer: Any,
                verdict: Refused) -> None:
        """Count and report a refused connection, then hold it in the tarpit or reset it."""
        self.metrics.inc("mbsec_connections_total", outcome=verdict.reason)
        self.report_rejection(events.connection_rejected(verdict.reason, source, int(peer[1])),
                              source)
        if len(self._tarpit) < self._tarpit_max:
            hold = TARPIT_S * (0.5 + random.random())
            heapq.heappush(self._tarpit, (trio.current_time() + hold, next(self._tarpit_seq),
                                          stream))
            self._tarpit_changed.set()
        else:
            _abort(stream)

    async def _tarpit_closer(self) -> None:
        """Reset the held refused connections once their time is up (all of them at the
        end)."""
        held = self._tarpit
        try:
            while True:
                self._tarpit_changed = trio.Event()
                if not held:
                    await self._tarpit_changed.wait()
                    continue
                with trio.move_on_at(held[0][0]):
                    await self._tarpit_changed.wait()  # an earlier deadline may come in
                now = trio.current_time()
                while held and held[0][0] <= now:
                    _abort(heapq.heappop(held)[2])
        finally:
            while held:
                _abort(held.pop()[2])

    async def _probation_then_connection(self, stream: trio.SocketStream, source: str,
                                         peer: Any) -> None:
        """Every place is taken, or its prefix is over its rate, and this connection has not
        spoken yet: give its ClientHello ``PROBATION_S`` to arrive (a silent newcomer never
        evicts anyone and never waits in the waiting room)."""
        waiting = self._probation
        if len(waiting) >= PROBATION_MAX:
            waiting.popleft().cancel()  # the oldest has waited longest without a byte
        spoke = False
        with trio.move_on_after(PROBATION_S) as scope:
            waiting.append(scope)
            try:
                await trio.lowlevel.wait_readable(stream.socket)
                spoke = True
            finally:
                with contextlib.suppress(ValueError):
                    waiting.remove(scope)
        verdict = self._admit(stream, source, peer, spoke)
        if verdict is not None:
            await self._connection(stream, source, verdict, ((source, int(peer[1])), None),
                                   spoke)

    async def _connection(self, stream: trio.SocketStream, source: str,
                          verdict: Admitted,
                          addresses: tuple[Address, Address | None] | None = None,
                          spoke: bool = False) -> None:
        """Serve one admitted connection. ``addresses``: (peer, local) as the accept loop
        knows them (local None: asked of the socket); ``spoke``: its first byte was seen."""
        limits = self.settings.limits
        if not KEEPALIVE_INHERITED:
            configure_accepted(stream)
        ticket = verdict.ticket
        if verdict.victim is not None:
            victim = self._handshaking.pop(verdict.victim, None)
            if victim is not None:
                victim.evict()
            self.metrics.inc("mbsec_handshakes_evicted_total")
        self._count_accepted()
        session = Session(
            stream,
            state=lambda: self.state,
            decision_state=self._decision_cell,
            sink=getattr(self.log, "_logger", None),
            on_sink_failure=self.settings.logging.on_sink_failure,
            limits=limits,
            log=self.log,
            metrics=self.metrics,
            identity_slots=self.identities,
            allowed_requests=self.settings.logging.allowed_requests,
            data_plane=self.data_plane,
            edge=_Edge(self, ticket, source),
            lines=self.connection_lines,
            addresses=addresses,
            spoke=spoke,
            counters=self._handshake_counters,
        )
        self._handshaking[ticket] = session
        self.sessions.add(session)
        if self._no_sessions.is_set():
            self._no_sessions = trio.Event()
        self._set_connections_active(len(self.sessions))
        self._set_handshakes_active(self.admission.handshakes)
        try:
            await session.run()
        except Exception as exc:  # a bug in one session must never take the listener down
            events.emit(self.log, events.session_error(exc, source))
        finally:
            self.sessions.discard(session)
            if not self.sessions:
                self._no_sessions.set()
            self._handshaking.pop(ticket, None)
            self.admission.closed(ticket)
            self._set_connections_active(len(self.sessions))
            self._set_handshakes_active(self.admission.handshakes)


class _Edge:
    """One connection's link to the proxy's admission (:class:`mbsec.session.EdgeHooks`)."""

    __slots__ = ("_proxy", "_source", "_ticket")

    def __init__(self, proxy: Proxy, ticket: int, source: str) -> None:
        self._proxy = proxy
        self._ticket = ticket
        self._source = source

    def heard(self) -> None:
        self._proxy.admission.heard(self._ticket)

    def established(self) -> None:
        self._proxy.admission.established(self._ticket)
        self._proxy._handshaking.pop(self._ticket, None)
        self._proxy._set_handshakes_active(self._proxy.admission.handshakes)

    def rejected(self, event: events.Event) -> None:
        self._proxy.report_rejection(event, self._source)


def _readmit(admission: Admission, now: float, waiting: tuple[Any, str, Any, str]
             ) -> Admitted | Refused:
    """Admission for a newcomer in the waiting room: it has spoken."""
    return admission.admit(waiting[1], now, spoke=True)


def _held_sizes(max_connections: int) -> tuple[int, int]:
    """(waiting room, tarpit): WAITING_MAX and TARPIT_MAX, or what the open-files limit leaves
    beside ``max_connections``, probation, PLC links and the process's own files (systemd's
    default soft limit is 1024), the waiting room served first."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 0, 0
    if soft == resource.RLIM_INFINITY:
        return WAITING_MAX, TARPIT_MAX
    spare = max(0, soft - max_connections - PROBATION_MAX - 256)
    room = min(WAITING_MAX, spare)
    return room, min(TARPIT_MAX, spare - room)


def _listener_local(listener: trio.SocketListener) -> Address | None:
    """The local address of every connection accepted on ``listener`` (its own), or None when
    it listens on a wildcard address: then each connection's local address is its own."""
    try:
        name = listener.socket.getsockname()
    except OSError:
        return None
    if not (isinstance(name, tuple) and len(name) >= 2):
        return None
    host = str(name[0])
    if host in ("0.0.0.0", "::", ""):
        return None
    return host, int(name[1])


def _abort(stream: trio.SocketStream) -> None:
    """Close a refused connection at once with a reset (SO_LINGER 0): no FIN exchange and no
    TIME_WAIT state kept for a peer that is being refused, many times a second in a flood."""
    sock = stream.socket
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _only_cancelled(exc: BaseException) -> bool:
    """``serve`` ended by its caller's cancellation (trio.Cancelled, maybe in a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


# -- worker processes ---------------------------------------------------------------------------

#: set by the main process for a worker: "index/count/listen fds/metrics fds" (fds ","-joined)
WORKER_ENV = "_MBSEC_WORKER"
LISTEN_BACKLOG = 1024


def _listening_socket(
    family: int, type_: int, proto: int, addr: Any, *, reuseport: bool
) -> socket.socket:
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def _addresses(host: str, port: int) -> list[tuple[int, int, int, Any]]:
    """Every distinct (family, type, proto, address) ``host`` resolves to, as trio binds them:
    a family the kernel refuses (IPv6 on a host booted without it) is skipped, unless it is
    the only one."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    seen: set[tuple[int, Any]] = set()
    out: list[tuple[int, int, int, Any]] = []
    refused: OSError | None = None
    for family, type_, proto, _name, addr in infos:
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        try:
            socket.socket(family, type_, proto).close()
        except OSError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                raise
            refused = exc
            continue
        out.append((family, type_, proto, addr))
    if not out and refused is not None:
        raise refused
    return out


def close_all(per_worker: list[list[socket.socket]]) -> None:
    for socks in per_worker:
        for sock in socks:
            sock.close()


def bind_worker_sockets(settings: Settings, workers: int) -> list[list[socket.socket]]:
    """For each worker, its own listening socket per listen address, all bound with
    ``SO_REUSEPORT`` to the same port (port 0 is resolved by the first bind), so the kernel
    spreads new connections evenly over the workers."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for host, port in settings.listen_addresses():
            for family, type_, proto, addr in _addresses(host, port):
                bound = addr
                for w in range(workers):
                    sock = _listening_socket(family, type_, proto, bound, reuseport=True)
                    per_worker[w].append(sock)
                    bound = sock.getsockname()  # later workers take the port the first got
    except OSError:
        close_all(per_worker)
        raise
    return per_worker


def bind_metrics_sockets(settings: Settings, workers: int) -> list[list[socket.socket]]:
    """For each worker, the sockets of its own ``/metrics`` endpoint (``metrics.listen`` port
    plus the worker index): counters are per process, so each worker is its own scrape target.
    Bound here, in the main process, so that a port in use is one clear error at start."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for w in range(workers):
            address = settings.metrics_address(w)
            if address is None:
                break
            for family, type_, proto, addr in _addresses(*address):
                per_worker[w].append(_listening_socket(family, type_, proto, addr,
                                                       reuseport=False))
    except OSError:
        close_all(per_worker)
        raise
    return per_worker


def _fds(socks: list[socket.socket]) -> str:
    return ",".join(str(s.fileno()) for s in socks)


def _socks(fds: str) -> list[socket.socket]:
    return [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]


@dataclasses.dataclass(frozen=True)
class WorkerSockets:
    """What the main process hands a worker: its index, the worker count and its sockets."""

    index: int
    count: int
    listen: list[socket.socket]
    metrics: list[socket.socket]


def worker_from_environment() -> WorkerSockets | None:
    """In a worker process: what the main process handed it (``WORKER_ENV``); else None."""
    spec = os.environ.pop(WORKER_ENV, None)
    if not spec:
        return None
    index, count, listen, metrics = spec.split("/")
    set_conn_id_space(int(index) + 1, int(count))
    return WorkerSockets(int(index), int(count), _socks(listen), _socks(metrics))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: a worker never outlives the main process


def run_workers(
    config: str, per_worker: list[list[socket.socket]], metrics: list[list[socket.socket]]
) -> int:
    """The main process with ``workers > 1``: start one ``mbsec serve`` per worker on its
    inherited sockets, forward SIGHUP (each worker reloads the file itself) and SIGTERM/SIGINT
    (each drains), and exit 0 once all workers exited 0. A worker that dies on its own takes
    the others down and the exit status is 1, so the service manager restarts the whole set."""
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False
    relay = WorkerRelay(Notifier.from_environment())  # systemd hears the set through us

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if signum == signal.SIGHUP:
            relay.reloading()
        else:
            if not stopping:
                relay.notifier.stopping()
            stopping = True
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        for index, (socks, msocks) in enumerate(zip(per_worker, metrics, strict=True)):
            env = dict(os.environ)
            env[WORKER_ENV] = f"{index}/{len(per_worker)}/{_fds(socks)}/{_fds(msocks)}"
            env.update(relay.worker_environment())
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "mbsec.cli", "serve", "--config", config],
                    pass_fds=[s.fileno() for s in socks + msocks], env=env,
                    preexec_fn=_die_with_parent,
                )
            )
            relay.workers[procs[-1].pid] = index
        close_all(per_worker)  # the workers hold them now
        close_all(metrics)
        failed = False
        while True:
            alive = [p for p in procs if p.poll() is None]
            if not alive:
                break
            if not stopping and len(alive) < len(procs):
                failed = True  # a worker ended on its own: stop the set
                forward(signal.SIGTERM, None)
            relay.poll(0.1)
        codes = [p.returncode for p in procs]
        return 1 if failed or any(codes) else 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, h in old.items():
            signal.signal(s, h)
        relay.close()
