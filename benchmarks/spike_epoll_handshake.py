#!/usr/bin/env python3
"""Spike (benchmark only): accept and TLS handshake in one epoll loop, outside trio.

Why: issue 10 item 3 wants ``workers = 2`` to handshake as fast as haproxy on a 2-vCPU box
that is CPU-bound, so mbsec's CPU per handshake would have to be haproxy's (~1.7 ms) while
0.8-0.9 ms of mbsec's goes to the interpreter (trio accept, admission, the handshake loop
through trio, two structlog events, the data-plane hand-off). This server does what a
redesign would do, and nothing of mbsec's behaviour changes: it measures whether a compiled
(mypyc) accept + handshake loop gets near haproxy's CPU per handshake
(benchmarks/README.md, "Issue 10 item 3: a spike of the handshake outside trio").

What it does per connection, with mbsec's own code where mbsec has it:

* accept in a level-triggered ``epoll`` loop, batch accepts until ``EAGAIN`` (``accept4``
  with ``SOCK_CLOEXEC``, what CPython's ``accept`` calls), the fd made non-blocking;
  TCP_NODELAY and the keepalive options are set once on the listening socket (Linux
  copies them to each accepted socket; mbsec sets them per connection, 5 ``setsockopt``);
* :class:`mbsec.admission.Admission` (admit with "spoke", heard, established, closed;
  an eviction victim is closed), ``limits.handshake_timeout`` as a deadline per handshake;
* the TLS server handshake over memory BIOs (``SSLContext.wrap_bio``, what the data plane
  takes over) on the non-blocking fd, with mbsec's real context:
  :func:`mbsec.tls.build_material` from the ``[tls]`` section of an mbsec config, and the
  TLS 1.3 key log on as mbsec's default (``tls.name_tls13_rejections = true``: OpenSSL
  writes every handshake's secret line into the pipe and the handshake takes it out again,
  found by the client random of a :class:`mbsec.tls_sniff.HandshakeTap` fed every read);
* after it: :func:`mbsec.handshake.verdict`, the decision ``mbsec serve`` makes
  (:func:`mbsec.identity.parse_verified_identity`, cached per certificate; the resumed-session
  refusal; the CRL re-check; the expiry check; a per-identity connection count,
  ``limits.max_per_identity``), then :meth:`mbsec.policy.Policy.principal` (cached);
* one ``tls-handshake`` line and, at close, one ``connection-closed`` line, the fields of
  :func:`mbsec.events.tls_handshake_accepted` / :func:`mbsec.events.connection_closed`
  with the connection and peer context, nested as mbsec.audit nests them, rendered from a
  template per (certificate, roles, version, cipher) in which only the clock, the
  connection id, the peer address and the durations are filled in; the lines of one loop
  pass leave in one ``write`` (``O_APPEND``) to ``logging.file`` of the config;
* then it waits for the client's close (``s_time -new`` closes right after the handshake,
  without close_notify: reason ``client_reset`` as the data plane names it) and closes.

Rejections (a failed handshake, a refused connection) are handled and logged plainly
(:func:`mbsec.events.tls_handshake_rejected`), without the aggregation of mbsec's
``RejectionLog`` or its tarpit: the benchmark never takes that path. There is no data
plane: nothing is forwarded to a PLC.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/spike_epoll_handshake.py --config mbsec.toml \\
        [--workers 2] [--no-keylog]

Compiled: ``mypycify(["benchmarks/spike_epoll_handshake.py"])`` in a throwaway setup
script (benchmarks/README.md gives the commands); it says ``compiled: True`` when it starts.
With ``--workers N`` the parent binds N ``SO_REUSEPORT`` sockets on the config's listen
address, forks N workers and waits; SIGTERM or SIGINT stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import errno
import json
import os
import select
import signal
import socket
import ssl
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Final

from mbsec import events
from mbsec.admission import Admission, Admitted
from mbsec.audit import ECS_VERSION, nest_dotted, utc_stamp
from mbsec.handshake import Acceptance, IdentityCounter, verdict
from mbsec.identity import PeerIdentity
from mbsec.path.decide import ProxyState
from mbsec.policy import Policy, RateLimiter, load_policy
from mbsec.settings import Settings, load_settings
from mbsec.tls import TlsMaterial, build_material, handshake_failure_reason
from mbsec.tls_keylog import KeyLog
from mbsec.tls_sniff import HandshakeTap

RECEIVE_SIZE: Final = 65536
MAX_EVENTS: Final = 256
LISTEN_BACKLOG: Final = 1024
KEEPALIVE_IDLE: Final = 30
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3
#: templates kept (one per certificate, roles, version and cipher); cleared when full
MAX_TEMPLATES: Final = 1024
_IN: Final = select.EPOLLIN | select.EPOLLRDHUP
_OUT: Final = select.EPOLLOUT
_ERR: Final = select.EPOLLERR | select.EPOLLHUP
#: accept errors after which the loop goes on (the connection is gone, or fds ran out)
_ACCEPT_AGAIN: Final = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))
_ACCEPT_STOP: Final = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_SENTINEL: Final = "@@spike%d@@"

HANDSHAKE: Final = 0
ESTABLISHED: Final = 1


def compiled() -> bool:
    """True when this module runs compiled by mypyc."""
    return __file__.endswith(".so")


class Template:
    """A JSON line with ``%s`` where the variable fields go (their JSON, in this order)."""

    def __init__(self, fmt: str, n: int) -> None:
        self.fmt = fmt
        self.n = n


def compile_template(flat: dict[str, Any], slots: list[str]) -> str:
    """mbsec.audit's rendering (nest the dotted keys, compact JSON) of ``flat``, with the
    values of ``slots`` left as ``%s`` for their JSON (``@timestamp``: for the bare clock), in
    the order of ``slots``, which must be the order in which they appear in the line
    (checked)."""
    marked = dict(flat)
    for i, key in enumerate(slots):
        marked[key] = _SENTINEL % i
    text = json.dumps(nest_dotted(marked), separators=(",", ":"), default=str)
    text = text.replace("%", "%%")
    last = -1
    for i in range(len(slots)):
        quoted = '"' + (_SENTINEL % i).replace("%", "%%") + '"'
        pos = text.find(quoted)
        if pos <= last:
            raise ValueError(f"template slot {slots[i]} out of order")
        last = pos
        # the clock's digits need no escaping: its quotes stay literal
        text = text.replace(quoted, '"%s"' if slots[i] == "@timestamp" else "%s", 1)
    return text


def _envelope(message: str) -> dict[str, Any]:
    return {"@timestamp": "", "message": message}


def _tail(level: str) -> dict[str, Any]:
    return {"log.level": level, "ecs.version": ECS_VERSION, "service.name": "mbsec"}


#: the variable fields, in the order each line holds them
HANDSHAKE_SLOTS: Final = ["@timestamp", "event.duration", "mbsec.conn_id", "source.ip",
                          "source.port"]
CLOSE_SLOTS: Final = ["@timestamp", "event.reason", "event.duration", "source.bytes",
                      "source.ip", "source.port", "destination.bytes", "mbsec.requests",
                      "mbsec.allowed", "mbsec.denied", "mbsec.errors", "mbsec.conn_id"]


def handshake_template(identity: PeerIdentity, roles: list[str], version: str | None,
                       cipher: str | None, local_ip: str, local_port: int) -> Template:
    ev = events.tls_handshake_accepted(0.0, identity, version, cipher, False)
    flat = _envelope(ev.message)
    flat.update(ev.fields)
    flat.update(events.connection_context(0, "", 0, local_ip, local_port))
    flat.update(events.peer_context(identity, roles))
    flat.update(_tail(ev.level))
    return Template(compile_template(flat, HANDSHAKE_SLOTS), len(HANDSHAKE_SLOTS))


def close_template(identity: PeerIdentity, roles: list[str], local_ip: str,
                   local_port: int) -> Template:
    ev = events.connection_closed("unknown", 0.0, 0, 0, 0, 0, 0, 0)
    flat = _envelope(ev.message)
    flat.update(ev.fields)
    flat.update(events.connection_context(0, "", 0, local_ip, local_port))
    flat.update(events.peer_context(identity, roles))
    flat.update(_tail(ev.level))
    return Template(compile_template(flat, CLOSE_SLOTS), len(CLOSE_SLOTS))


def plain_line(event: events.Event, context: dict[str, Any]) -> str:
    """A rarely written event (rejections), rendered the slow way."""
    flat = _envelope(event.message)
    flat.update(event.fields)
    flat.update(context)
    flat.update(_tail(event.level))
    flat["@timestamp"] = utc_stamp()
    return json.dumps(nest_dotted(flat), separators=(",", ":"), default=str)


_encode_str: Final = json.encoder.encode_basestring_ascii


def js(value: str) -> str:
    """JSON of one string, quotes included (the C encoder json.dumps uses)."""
    out: str = _encode_str(value)
    return out


class Conn:
    """One client connection: its fd, TLS state and what its lines need."""

    def __init__(self, fd: int, ip: str, port: int, conn_id: int, ticket: int, obj: Any,
                 incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, now: float,
                 deadline: float) -> None:
        self.fd = fd
        self.ip = ip
        self.port = port
        self.conn_id = conn_id
        self.ticket = ticket
        self.obj = obj
        #: the C object behind ``obj`` (as the data plane calls it)
        self.tls: Any = getattr(obj, "_sslobj", None) or obj
        self.incoming = incoming
        self.outgoing = outgoing
        self.tap: HandshakeTap | None = HandshakeTap()
        self.out = b""
        self.state = HANDSHAKE
        self.started = now
        self.deadline = deadline
        self.mask = _IN
        self.closed = False
        self.identity_key = ""
        self.close_tpl: Template | None = None
        self.bytes_in = 0


class Worker:
    """One process's epoll loop over its listening socket."""

    def __init__(self, settings: Settings, listener: socket.socket, index: int, count: int,
                 keylog_on: bool, log_path: Path) -> None:
        self.settings = settings
        limits = settings.limits
        self.keylog: KeyLog | None = (KeyLog.open(limits.max_handshakes)
                                      if keylog_on and settings.tls.name_tls13_rejections
                                      else None)
        self.material: TlsMaterial = build_material(settings.tls, keylog=self.keylog)
        self.context: ssl.SSLContext = self.material.context
        self.policy: Policy = load_policy(settings.policy)
        self.state = ProxyState(tls=self.material, policy=self.policy,
                                limiter=RateLimiter(self.policy))
        self.handshake_timeout = self.material.handshake_timeout
        self.admission = Admission(
            max_connections=limits.max_connections, max_handshakes=limits.max_handshakes,
            max_per_source=limits.max_per_source, prefix_rate=limits.prefix_connection_rate,
            prefix_burst=limits.prefix_connection_burst)
        self.listener = listener
        self.lfd = listener.fileno()
        name = listener.getsockname()
        self.local_ip = str(name[0])
        self.local_port = int(name[1])
        self._accept: Any = getattr(listener, "_accept")  # noqa: B009 - (fd, address), no object
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.by_ticket: dict[int, Conn] = {}
        self.handshakes: deque[Conn] = deque()  # deadline order (one timeout for all)
        self.identities = IdentityCounter(limits.max_per_identity)
        self.templates: dict[tuple[Any, ...], tuple[Template, Template]] = {}
        self.lines: list[str] = []
        self.log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o640)
        self.next_id = index + 1
        self.id_step = count
        self.stopping = False
        self.accepted = 0
        self.established = 0
        self.rejected = 0
        self.refused = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.ep.register(self.wake_r, select.EPOLLIN)
        self.ep.register(self.lfd, select.EPOLLIN)
        lfd = self.lfd
        wake = self.wake_r
        conns = self.conns
        while not self.stopping:
            timeout = -1.0
            if self.handshakes:
                timeout = max(0.0, self.handshakes[0].deadline - time.monotonic())
            try:
                ready = self.ep.poll(timeout, MAX_EVENTS)
            except InterruptedError:
                ready = []
            for fd, ev in ready:
                if fd == lfd:
                    self.accept_batch()
                elif fd == wake:
                    self.stopping = True
                else:
                    conn = conns.get(fd)
                    if conn is not None:
                        self.on_event(conn, ev)
            if self.handshakes:
                self.expire(time.monotonic())
            if self.lines:
                self.flush_lines()
        for conn in list(conns.values()):
            self.close(conn, "server_shutdown")
        self.flush_lines()

    def flush_lines(self) -> None:
        data = ("\n".join(self.lines) + "\n").encode()
        self.lines.clear()
        while data:
            n = os.write(self.log_fd, data)
            data = data[n:]

    def accept_batch(self) -> None:
        """Accept until EAGAIN (level-triggered: what is left wakes the next pass)."""
        accept = self._accept
        while True:
            try:
                pair = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_AGAIN:
                    continue
                if exc.errno in _ACCEPT_STOP:
                    return  # fds or memory ran out: the backlog waits for the next pass
                raise
            fd: int = pair[0]
            addr = pair[1]
            self.accepted += 1
            os.set_blocking(fd, False)
            self.admit(fd, str(addr[0]), int(addr[1]))

    def admit(self, fd: int, ip: str, port: int) -> None:
        now = time.monotonic()
        try:
            first: bytes | None = os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            first = None
        except OSError:
            os.close(fd)
            return
        verdict = self.admission.admit(ip, now, spoke=first is not None)
        if not isinstance(verdict, Admitted):
            self.refused += 1
            self.lines.append(plain_line(events.connection_rejected(verdict.reason, ip, port),
                                         {}))
            abort(fd)
            return
        if verdict.victim is not None:
            victim = self.by_ticket.get(verdict.victim)
            if victim is not None:
                self.reject(victim, "handshake_evicted", "every handshake place was taken")
        incoming = ssl.MemoryBIO()
        outgoing = ssl.MemoryBIO()
        obj = self.context.wrap_bio(incoming, outgoing, server_side=True)
        conn_id = self.next_id
        self.next_id += self.id_step
        conn = Conn(fd, ip, port, conn_id, verdict.ticket, obj, incoming, outgoing, now,
                    now + self.handshake_timeout)
        self.conns[fd] = conn
        self.by_ticket[verdict.ticket] = conn
        self.handshakes.append(conn)
        self.ep.register(fd, _IN)
        if first is not None:
            self.admission.heard(verdict.ticket)
            self.handshake_step(conn, first)

    def on_event(self, conn: Conn, ev: int) -> None:
        if ev & _OUT:
            self.send(conn, b"")
            if conn.closed:
                return
        if ev & (_IN | _ERR):
            try:
                data = os.read(conn.fd, RECEIVE_SIZE)
            except BlockingIOError:
                return
            except OSError:
                if conn.state == HANDSHAKE:
                    self.reject(conn, "client_closed", "connection reset during handshake")
                else:
                    self.close(conn, "client_reset")
                return
            if conn.state == HANDSHAKE:
                self.handshake_step(conn, data)
            else:
                self.established_read(conn, data)

    # -- handshake -------------------------------------------------------------------------

    def handshake_step(self, conn: Conn, data: bytes) -> None:
        if data:
            conn.incoming.write(data)
            tap = conn.tap
            if tap is not None:
                tap.feed(data)
        else:
            conn.incoming.write_eof()
        done = False
        error: ssl.SSLError | None = None
        try:
            conn.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            error = exc
        out = conn.outgoing.read()
        if error is not None:
            if out:  # the fatal alert, best effort
                with contextlib.suppress(OSError):
                    os.write(conn.fd, out)
            reason, detail = handshake_failure_reason(error)
            self.reject(conn, reason, detail)
            return
        if out:
            self.send(conn, out)
            if conn.closed:
                return
        if done:
            self.accept_identity(conn)
        elif not data:
            self.reject(conn, "client_closed", "connection closed during handshake")

    def send(self, conn: Conn, data: bytes) -> None:
        out = conn.out + data if conn.out else data
        try:
            n = os.write(conn.fd, out) if out else 0
        except BlockingIOError:
            n = 0
        except OSError:
            if conn.state == HANDSHAKE:
                self.reject(conn, "client_closed", "connection reset during handshake")
            else:
                self.close(conn, "client_gone")
            return
        conn.out = out[n:]
        want = _IN | (_OUT if conn.out else 0)
        if want != conn.mask:
            conn.mask = want
            self.ep.modify(conn.fd, want)

    def take_secret(self, conn: Conn) -> bytes | None:
        """Every handshake takes its key-log secret out, used or not (mbsec's session)."""
        tap = conn.tap
        conn.tap = None
        keylog = self.keylog
        if keylog is None:
            return None
        return keylog.take(tap.client_random() if tap is not None else None)

    def current_state(self) -> ProxyState:
        return self.state

    def accept_identity(self, conn: Conn) -> None:
        tap = conn.tap
        secret = self.take_secret(conn)
        now = time.monotonic()
        tls = conn.tls
        # mbsec's own decision (mbsec.handshake, what Session runs): certificate, identity,
        # resumed, CRL, expiry, the per-identity place
        outcome = verdict(der=tls.getpeercert(True), resumed=bool(tls.session_reused),
                          state=self.current_state, now=dt.datetime.now(dt.UTC),
                          slots=self.identities, max_per_identity=self.identities.limit,
                          tap=tap, secret=secret)
        if not isinstance(outcome, Acceptance):
            self.reject(conn, outcome.reason, outcome.detail)
            return
        identity = outcome.identity
        key = identity.subject
        principal = self.policy.principal(identity, conn.ip)
        roles = principal.roles
        version: str | None = tls.version()
        cipher: Any = tls.cipher()
        cipher_name: str | None = cipher[0] if cipher else None
        # the fingerprint names the certificate (one DER, one identity); its hash is cached
        tkey = (identity.fingerprint_sha256, roles, version, cipher_name)
        pair = self.templates.get(tkey)
        if pair is None:
            role_list = sorted(roles)
            pair = (handshake_template(identity, role_list, version, cipher_name,
                                       self.local_ip, self.local_port),
                    close_template(identity, role_list, self.local_ip, self.local_port))
            if len(self.templates) >= MAX_TEMPLATES:
                self.templates.clear()
            self.templates[tkey] = pair
        hs_tpl = pair[0]
        conn.identity_key = key
        conn.close_tpl = pair[1]
        conn.state = ESTABLISHED
        self.admission.established(conn.ticket)
        self.by_ticket.pop(conn.ticket, None)
        self.established += 1
        self.lines.append(hs_tpl.fmt % (
            utc_stamp(), int((now - conn.started) * 1e9), conn.conn_id, js(conn.ip),
            conn.port))

    def expire(self, now: float) -> None:
        hs = self.handshakes
        while hs and (hs[0].state != HANDSHAKE or hs[0].closed or hs[0].deadline <= now):
            conn = hs.popleft()
            if conn.state == HANDSHAKE and not conn.closed:
                self.reject(conn, "handshake_timeout",
                            f"no complete handshake within {self.handshake_timeout:g} s")

    # -- established -----------------------------------------------------------------------

    def established_read(self, conn: Conn, data: bytes) -> None:
        if data:
            conn.incoming.write(data)
            conn.bytes_in += len(data)
        else:
            conn.incoming.write_eof()
        try:
            while True:
                plain = conn.tls.read(RECEIVE_SIZE)
                if not plain:
                    self.close(conn, "client_closed")
                    return
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLEOFError:  # EOF without close_notify: a reset, as the data plane says
            self.close(conn, "client_reset")
            return
        except ssl.SSLError:
            self.close(conn, "client_reset")
            return
        if conn.outgoing.pending:  # a refused renegotiation's alert, a KeyUpdate answer
            self.send(conn, conn.outgoing.read())

    # -- ends ------------------------------------------------------------------------------

    def _release(self, conn: Conn) -> None:
        conn.closed = True
        self.conns.pop(conn.fd, None)
        self.by_ticket.pop(conn.ticket, None)
        self.admission.closed(conn.ticket)
        os.close(conn.fd)  # leaves the epoll set with it (never dup'ed)
        if conn.identity_key:
            self.identities.release_identity(conn.identity_key)

    def reject(self, conn: Conn, reason: str, detail: str) -> None:
        if conn.closed:
            return
        if conn.tap is not None:
            self.take_secret(conn)
        self.rejected += 1
        duration = time.monotonic() - conn.started
        self.lines.append(plain_line(
            events.tls_handshake_rejected(reason, detail, duration),
            events.connection_context(conn.conn_id, conn.ip, conn.port, self.local_ip,
                                      self.local_port)))
        self._release(conn)

    def close(self, conn: Conn, reason: str) -> None:
        if conn.closed:
            return
        if conn.state == HANDSHAKE:
            self.reject(conn, reason, "closed during handshake")
            return
        self._release(conn)
        tpl = conn.close_tpl
        if tpl is not None:
            self.lines.append(tpl.fmt % (
                utc_stamp(), js(reason), int((time.monotonic() - conn.started) * 1e9),
                conn.bytes_in, js(conn.ip), conn.port, 0, 0, 0, 0, 0, conn.conn_id))


def abort(fd: int) -> None:
    """Close a refused connection with a reset (SO_LINGER 0), as mbsec does."""
    try:
        sock = socket.socket(fileno=fd)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        os.close(fd)


def listening_socket(host: str, port: int) -> socket.socket:
    """Non-blocking, SO_REUSEPORT, with the options every accepted socket inherits."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


def _stop(signum: int, frame: Any) -> None:
    """The wake-up fd ends the loop; nothing to do here."""


def serve(settings: Settings, listener: socket.socket, index: int, count: int,
          keylog_on: bool, log_path: Path) -> int:
    worker = Worker(settings, listener, index, count, keylog_on, log_path)
    worker.run()
    print(f"worker {index} (pid {os.getpid()}): accepted {worker.accepted}, established "
          f"{worker.established}, rejected {worker.rejected}, refused {worker.refused}",
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="accept + TLS handshake in one epoll loop "
                                "(benchmark spike, issue 10 item 3)")
    p.add_argument("--config", required=True, help="an mbsec config (TOML)")
    p.add_argument("--workers", type=int, default=1, help="processes (SO_REUSEPORT)")
    p.add_argument("--no-keylog", action="store_true",
                   help="the TLS 1.3 key log off (mbsec's default: on)")
    args = p.parse_args(argv)
    cfg = Path(args.config).resolve()
    settings = load_settings(cfg)
    host, _, port_s = settings.listen[0].rpartition(":")
    host = host.strip("[]")
    log_file = settings.logging.file
    log_path = Path(log_file) if log_file is not None else cfg.with_suffix(".log")
    if not log_path.is_absolute():
        log_path = cfg.parent / log_path
    count = max(1, int(args.workers))
    listeners = [listening_socket(host, int(port_s))]
    for _ in range(count - 1):  # the same port (a port 0 is resolved by the first bind)
        listeners.append(listening_socket(host, int(listeners[0].getsockname()[1])))
    keylog_on = not args.no_keylog
    print(f"spike-start compiled: {compiled()} workers: {count} keylog: {keylog_on} "
          f"listen: {host}:{listeners[0].getsockname()[1]} pid: {os.getpid()}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if count == 1:
        return serve(settings, listeners[0], 0, 1, keylog_on, log_path)
    children: list[int] = []
    for i in range(count):
        pid = os.fork()
        if pid == 0:
            for j, other in enumerate(listeners):
                if j != i:
                    other.close()
            code = 1
            try:
                code = serve(settings, listeners[i], i, count, keylog_on, log_path)
            finally:
                os._exit(code)
        children.append(pid)
    for sock in listeners:
        sock.close()
    signal.pause()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
