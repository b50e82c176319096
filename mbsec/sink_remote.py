"""Sinks configured by ``[[logging.sinks]]``: a formatted line to stdout or a file, and
RFC 5424 over TCP (RFC 6587 octet counting) or TLS (RFC 5425) to a remote collector.

A remote collector must never slow or stop the proxy. :class:`RemoteSink.write_event` runs on
the thread that logs (the data plane, trio) and only appends the event to a bounded spool:
formatting, connecting, TLS and sending happen on the sink's own sender thread.

The spool holds the events not yet handed to the kernel, oldest first, at most
``spool_events`` of them, as their JSON lines (memory: about 1 KB each, measured for a
denial; strings, so the garbage collector has nothing to walk there). While the collector is
away the sender reconnects with exponential backoff (``reconnect_initial`` doubling up to
``reconnect_max``, +-20 % jitter) and sends the spool in order when it is back. When the
spool is full, the new event is dropped for this sink (the older ones are kept: the start of
an incident is what a SOC needs), :meth:`write_event` raises :class:`SpoolFull` so that the
logger counts it (``mbsec_log_sink_failures_total``) and raises its ``log-sink-failed``
alarm once, and as soon as there is room again a ``log-sink-dropped`` event takes its place
in the stream, with the count and the time span of what was lost. The other sinks (the local
file: the guaranteed record) take every event regardless.

TCP offers no acknowledgement: an event counts as sent once the kernel took it. Before each
batch the sender checks whether the collector closed the connection, so a collector that
restarted costs at most what was in flight, not the next batch.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from mbsec import events, sink_formats
from mbsec.settings import SinkSettings
from mbsec.threads import name_thread

#: events formatted and written by the sender in one system call, at most
BATCH = 256


class SpoolFull(Exception):
    """The remote sink's spool is full: this event is dropped for that sink."""


def make_formatter(cfg: SinkSettings, *, hostname: str | None = None) -> Callable[
        [str, Mapping[str, Any]], str]:
    """The function that turns (level, nested event) into this sink's text (one message)."""
    fmt = cfg.effective_format()
    host = cfg.hostname or hostname or socket.gethostname()
    facility = sink_formats.FACILITIES[cfg.facility]
    pen = cfg.enterprise_number
    remote = cfg.type in ("tcp", "tls")

    def rfc(level: str, event: Mapping[str, Any]) -> str:
        return sink_formats.rfc5424(level, event, facility=facility, hostname=host,
                                    procid=os.getpid(), enterprise_number=pen)

    if fmt == "rfc5424":
        return rfc
    inner = sink_formats.cef if fmt == "cef" else sink_formats.json_line
    if not remote:
        return inner

    def wrapped(level: str, event: Mapping[str, Any]) -> str:
        # on the wire every format rides in an RFC 5424 frame; CEF and JSON are its MSG
        return sink_formats.rfc5424(level, event, facility=facility, hostname=host,
                                    procid=os.getpid(), enterprise_number=pen,
                                    message=inner(level, event), structured=False)

    return wrapped


class LineSink:
    """stdout or a file in ``rfc5424`` or ``cef`` format (json lines use audit's sinks):
    formatted on the logging thread, one line each (control characters as ``#NNN``)."""

    def __init__(self, cfg: SinkSettings, *, stream: TextIO | None = None,
                 name: str = "line") -> None:
        self.name = name
        self._format = make_formatter(cfg)
        self._stream = stream
        self._fh: TextIO | None = None
        if cfg.type == "file":
            assert cfg.path is not None
            cfg.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = cfg.path.open("a", encoding="utf-8", buffering=1)

    def write(self, level: str, line: str) -> None:  # pragma: no cover - audit uses write_event
        raise TypeError("LineSink takes events (write_event)")

    def write_event(self, level: str, line: str, event: Mapping[str, Any]) -> None:
        text = sink_formats.one_line(self._format(level, event)) + "\n"
        if self._fh is not None:
            self._fh.write(text)
        else:
            stream = self._stream or sys.stdout
            stream.write(text)
            stream.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _lf_frame(msg: str) -> bytes:
    """RFC 6587 3.4.2 non-transparent framing: the message, then LF (control characters in
    it written ``#NNN``, so that a value cannot end the frame early)."""
    return (sink_formats.one_line(msg) + "\n").encode("utf-8")


def client_context(cfg: SinkSettings) -> ssl.SSLContext:
    """TLS client context: the collector is verified against ``ca`` (and its name against
    ``server_name`` or the address's host); the client certificate is optional."""
    assert cfg.ca is not None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.cert is not None and cfg.key is not None:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key))
    return ctx


class RemoteSink:
    """RFC 5424 frames to a TCP or TLS collector from a sender thread, through a bounded
    spool (see the module docstring for what it holds and what happens when it is full)."""

    def __init__(self, cfg: SinkSettings, *, name: str = "remote",
                 alarm: TextIO | None = None, lines_are_json: bool = True) -> None:
        self.name = name
        self.cfg = cfg
        self.host, self.port = cfg.host_port()
        self._ctx = client_context(cfg) if cfg.type == "tls" else None
        self._server_name = cfg.server_name or self.host
        self._format = make_formatter(cfg)
        self._frame: Callable[[str], bytes] = (
            sink_formats.octet_counted if cfg.framing == "octet-counting" else _lf_frame)
        self._capacity = cfg.spool_events
        #: (level, the JSON line, or the event when the lines are not JSON): a line is a
        #: third of the memory of the nested dict and no work for the garbage collector,
        #: which would otherwise walk every spooled event's dicts on each full collection
        self._spool: collections.deque[tuple[str, str | Mapping[str, Any]]] = \
            collections.deque()
        self._lines_are_json = lines_are_json
        self._cond = threading.Condition()
        self._closing = False
        self._alarm = alarm
        #: counters, read by tests and the close report
        self.sent = 0
        self.dropped = 0
        self.connects = 0
        self.connected = False
        self._drop_pending = 0
        self._drop_first: str | None = None
        self._drop_last: str | None = None
        self._sock: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name=f"mbsec-sink-{name}",
                                        daemon=True)
        self._thread.start()
        name_thread(self._thread)

    # -- the logging thread's side: O(1), never blocks on the network ------------------------

    def write(self, level: str, line: str) -> None:  # pragma: no cover - audit uses write_event
        raise TypeError("RemoteSink takes events (write_event)")

    def write_event(self, level: str, line: str, event: Mapping[str, Any]) -> None:
        with self._cond:
            spool = self._spool
            was_empty = not spool
            if self._drop_pending and len(spool) < self._capacity:
                spool.append(self._drop_notice())
            if len(spool) >= self._capacity or self._closing:
                self.dropped += 1
                self._drop_pending += 1
                stamp = event.get("@timestamp")
                self._drop_last = stamp if isinstance(stamp, str) else None
                if self._drop_first is None:
                    self._drop_first = self._drop_last
                raise SpoolFull(f"spool full ({self._capacity} events waiting for "
                                f"{self.host}:{self.port}): event dropped for this sink")
            spool.append((level, line if self._lines_are_json else event))
            if was_empty:
                self._cond.notify()  # the sender sleeps only on an empty spool

    def _drop_notice(self) -> tuple[str, str]:
        """The ``log-sink-dropped`` event, as the JSON line the logger would write."""
        ev = events.log_sink_dropped(self.name, self._drop_pending, self._drop_first,
                                     self._drop_last)
        self._drop_pending = 0
        self._drop_first = self._drop_last = None
        return ev.level, events.fallback_line(ev)

    @property
    def spooled(self) -> int:
        return len(self._spool)

    # -- the sender thread ----------------------------------------------------------------------

    def _run(self) -> None:
        """The sender thread. A bug in it must not silently stop this sink for good: it is
        reported on stderr and the loop starts over (the spool is kept)."""
        while True:
            try:
                self._loop()
                return
            except Exception as exc:  # pragma: no cover - a bug; nothing known raises here
                self._disconnect()
                line = events.fallback_line(events.log_sink_failed(self.name, exc))
                with contextlib.suppress(Exception):
                    stream = self._alarm or sys.stderr
                    stream.write(line + "\n")
                    stream.flush()
                time.sleep(self.cfg.reconnect_max)

    def _loop(self) -> None:
        backoff = self.cfg.reconnect_initial
        next_try = 0.0
        deadline: float | None = None
        while True:
            with self._cond:
                while not self._spool and not self._closing:
                    self._cond.wait()
                if self._closing:
                    if deadline is None:
                        deadline = time.monotonic() + self.cfg.close_timeout
                    if not self._spool or time.monotonic() >= deadline:
                        break
                wait = next_try - time.monotonic()
                if wait > 0:
                    if deadline is not None and deadline - time.monotonic() < wait:
                        break  # stopping: no time left for another attempt
                    self._cond.wait(wait)
                    continue
                batch = [self._spool[i] for i in range(min(BATCH, len(self._spool)))]
            if self._sock is not None and not self._alive(self._sock):
                self._disconnect()
            if self._sock is None:
                try:
                    self._sock = self._connect()
                except (OSError, ValueError):
                    next_try = time.monotonic() + backoff * random.uniform(0.8, 1.2)
                    backoff = min(backoff * 2, self.cfg.reconnect_max)
                    continue
                self.connects += 1
                self.connected = True
                backoff = self.cfg.reconnect_initial
            done = self._send(self._sock, batch)
            with self._cond:
                for _ in range(done):
                    self._spool.popleft()
            self.sent += done
            if done < len(batch):
                self._disconnect()
                next_try = time.monotonic() + backoff * random.uniform(0.8, 1.2)
                backoff = min(backoff * 2, self.cfg.reconnect_max)
        self._disconnect()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.cfg.connect_timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ctx is not None:
                started = time.monotonic()
                sock = self._ctx.wrap_socket(sock, server_hostname=self._server_name)
                if sock.version() == "TLSv1.3":
                    # the collector judges our certificate after our side of the handshake
                    # is done: its refusal (an alert) comes about one round trip later, and
                    # what we sent before it would be lost. Wait two handshake times for it
                    # (session tickets, which an accepting server sends, end the wait early).
                    wait = min(self.cfg.connect_timeout,
                               max(0.05, 2 * (time.monotonic() - started)))
                    readable, _, _ = select.select([sock], [], [], wait)
                    if readable and not self._alive(sock):
                        raise ConnectionRefusedError("the collector ended the TLS session")
            sock.settimeout(self.cfg.send_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def _alive(self, sock: socket.socket) -> bool:
        """False when the collector closed the connection (syslog collectors send nothing,
        so a readable socket means EOF, a reset, or TLS housekeeping such as tickets)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return True
            sock.settimeout(0)
            try:
                data = sock.recv(4096)
            finally:
                sock.settimeout(self.cfg.send_timeout)
            return bool(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return True
        except (OSError, ValueError):
            return False

    def _send(self, sock: socket.socket,
              batch: list[tuple[str, str | Mapping[str, Any]]]) -> int:
        """Frame and send ``batch``; return how many events the kernel took completely."""
        frames: list[bytes] = []
        frame = self._frame
        for level, item in batch:
            try:
                event = json.loads(item) if isinstance(item, str) else item
                frames.append(frame(self._format(level, event)))
            except Exception as exc:  # a formatting bug must not wedge the spool
                frames.append(frame(sink_formats.rfc5424(
                    "error", {"message": f"event not formattable: {exc!r}"},
                    facility=sink_formats.FACILITIES[self.cfg.facility], hostname="-",
                    procid=os.getpid(), enterprise_number=self.cfg.enterprise_number)))
        data = memoryview(b"".join(frames))
        offset = 0
        try:
            while offset < len(data):
                offset += sock.send(data[offset:])
        except (OSError, ValueError):
            pass
        done, total = 0, 0
        for framed in frames:
            total += len(framed)
            if total > offset:
                break
            done += 1
        return done

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        self.connected = False
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                sock.close()

    def close(self) -> None:
        """Stop: the sender gets ``close_timeout`` seconds for what is spooled (a stop never
        waits much longer for a collector); what is left then is counted as dropped and
        reported once on stderr (the file has it)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(self.cfg.close_timeout + 0.1)
        sock = self._sock
        if self._thread.is_alive() and sock is not None:
            # stuck in send() to a collector that stopped reading: unblock it; a connect in
            # progress is abandoned (a daemon thread; the process is stopping)
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(socket.SHUT_RDWR)
            self._thread.join(1.0)
        with self._cond:
            left = len(self._spool)
            self._spool.clear()
        if left:
            self.dropped += left
            line = events.fallback_line(events.log_sink_failed(
                self.name, SpoolFull(f"{left} events not sent to {self.host}:{self.port} "
                                     "before the stop")))
            with contextlib.suppress(Exception):
                stream = self._alarm or sys.stderr
                stream.write(line + "\n")
                stream.flush()


def build_sink(cfg: SinkSettings, index: int, *, stdout: TextIO | None = None,
               lines_are_json: bool = True) -> Any:
    """The sink object for one ``[[logging.sinks]]`` entry (json stdout/file: audit's);
    ``lines_are_json``: the logger's lines are the ECS JSON (not ``format = "console"``)."""
    name = cfg.label(index)
    if cfg.type in ("tcp", "tls"):
        return RemoteSink(cfg, name=name, lines_are_json=lines_are_json)
    return LineSink(cfg, stream=stdout, name=name)


def check_sink(cfg: SinkSettings, index: int) -> list[str]:
    """Problems with a tls sink's material, found without connecting (audit.check_sinks
    checks file paths)."""
    where = f"logging.sinks[{index}] ({cfg.label(index)})"
    problems: list[str] = []
    if cfg.type == "tls":
        for key in ("ca", "cert", "key"):
            path: Path | None = getattr(cfg, key)
            if path is not None and not path.is_file():
                problems.append(f"{where}: {key}: {path} is not a file")
        if not problems:
            try:
                client_context(cfg)
            except (OSError, ssl.SSLError, ValueError) as exc:
                problems.append(f"{where}: TLS material: {exc}")
    return problems
