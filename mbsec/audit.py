"""SIEM events: structlog rendering one JSON object per line with Elastic Common Schema names.

Code emits flat dotted keys (``log.warning("...", **{"event.action": "tls-handshake"})``); the
last processor nests them (``{"event": {"action": ...}}``), which is what ECS ingest expects.
The structlog message becomes ECS ``message``. The logger is built per proxy instance and
injected (no global ``structlog.configure``), so tests can run several proxies and capture lines.

Only synchronous methods are used: structlog's ``a*`` methods run in asyncio's executor and must
never be called under trio. Sinks write synchronously; a line is small. The one event that can
come once per request (an allowed request, ``allowed_requests = "info"``) skips the chain, and
so do the two every authenticated connection writes (its accepted ``tls-handshake`` and its
``connection-closed``, written at once as the chain would):
mbsec/audit_fast.py renders the same line from a template, and while a data
plane runs, the file and stdout sinks hand such lines to a writer thread of their own, which
writes them in one write per 5 ms batch (:class:`_Deferring`): the data-plane thread makes no
system call and never waits for a disk for them. Any other line written to such a sink first
writes the waiting ones, so the order of events is kept; a normal stop writes every line; a
crash can lose the last 5 ms of allowed-request lines. The sinks of
``[[logging.sinks]]`` get the nested event with its line (the last processor passes both) and
format it themselves; a remote one only spools it here and formats and sends on its own thread
(mbsec/sink_remote.py).
Nothing is sampled: denials and TLS failures are logged at ``warning`` and the level setting
cannot go above ``warning``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import logging
import logging.handlers
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any, Protocol, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger

from mbsec.settings import LoggingSettings, SinkSettings, parse_hostport
from mbsec.threads import name_thread

ECS_VERSION = "8.11.0"

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class Sink(Protocol):
    def write(self, level: str, line: str) -> None: ...

    def close(self) -> None: ...


class EventSink(Protocol):
    """A sink with a format of its own (``[[logging.sinks]]``, mbsec/sink_remote.py): it gets
    the nested event besides the JSON line and formats it itself (a remote sink does that on
    its sender thread, never on the thread that logs)."""

    def write_event(self, level: str, line: str, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _Deferring:
    """Lines written later, in batches, by a writer thread of the sink: the data plane hands
    over the allowed requests of each loop pass with :meth:`write_deferred_lines` (one line:
    :meth:`write_deferred`), which only appends them to a list; the
    writer wakes when the list stops being empty, lets lines gather for :attr:`INTERVAL`
    and writes them with one write. So the data-plane thread neither makes a system call per
    line nor waits for a slow disk. Each write carries whole lines only (a reader never sees
    half a line from us, and processes appending to one file do not interleave within a
    line); from :attr:`MAX_PENDING` bytes on, the caller writes at once; :meth:`close`
    writes what is left. ``report(written, error, lost)`` hears how each batch went."""

    MAX_PENDING = 65536
    #: how long a line may wait in memory for the lines after it (a crash loses at most that)
    INTERVAL = 0.005

    def __init__(self) -> None:
        from mbsec import audit_fast  # it imports this module

        self._pending: list[str] = []
        self._pending_bytes = 0
        #: :meth:`write_deferred` for several lines at once, in order (one lock, one
        #: accounting: the data plane hands over a loop pass's allowed requests together).
        #: Compiled with the data plane (:func:`mbsec.audit_fast.defer_lines`), and bound here
        #: rather than a method: the data plane calls it once per loop pass, and an
        #: interpreted method there cost 2-3 µs per pass, at 10x1 per request
        #: (benchmarks/README.md, "Issue 14: logging every allowed request, round 3").
        self.write_deferred_lines: Callable[[list[str]], None] = functools.partial(
            audit_fast.defer_lines, self)
        self._lock = threading.Lock()  # a plain lock: the data plane takes it once a pass
        #: the writer's wake-up, held while it has nothing to write: whoever makes the list
        #: non-empty releases it, the writer takes it back. Plain locks, not threading.Event:
        #: an Event's set and wait run a dozen lines of Python each (with the GIL, which the
        #: data-plane thread then waits for), a lock's release and acquire are one C call
        self._wake = threading.Lock()
        self._wake.acquire()
        #: held until close(): the writer's wait of INTERVAL, which close ends at once
        self._stop = threading.Lock()
        self._stop.acquire()
        self._writer: threading.Thread | None = None
        self._closing = False
        self.report: Callable[[int, Exception | None, int], None] | None = None

    def _write_out(self, text: str) -> None:
        raise NotImplementedError

    def write(self, level: str, line: str) -> None:
        """A line written now; the deferred ones before it go first, in the same write (the
        file keeps the order of events: a connection's last requests before its close line,
        everything before ``server-stopped``)."""
        lines = self._take()
        if not lines:
            self._write_out(line + "\n")
            return
        lines += (line, "")
        try:
            self._write_out("\n".join(lines))
        except Exception as exc:
            if self.report is not None:
                self.report(0, exc, len(lines) - 2)
            raise
        if self.report is not None:
            self.report(len(lines) - 2, None, 0)

    def write_deferred(self, line: str) -> None:
        if self._closing:  # a late line (a data plane that outlived the logger)
            self.write("info", line)
            return
        with self._lock:
            pending = self._pending
            pending.append(line)
            first = len(pending) == 1
            self._pending_bytes += len(line) + 1
            full = self._pending_bytes >= self.MAX_PENDING
        if full:
            self._flush_reporting()
        elif first:
            self._wake_writer()

    def start_writer(self) -> None:
        """Start the writer thread now rather than at the first deferred line: it then runs
        at the nice value of this thread, not at that of whichever thread logs first (the
        handshake thread may be lowered, ``limits.handshake_nice``)."""
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._run_writer, name="mbsec-logwriter", daemon=True)
            self._writer.start()
            name_thread(self._writer)

    def _wake_writer(self) -> None:
        """Start the writer on first use; release its wake-up (already released: a wake-up
        is pending, and the writer takes the lines that are there when its wait ends)."""
        if self._writer is None:
            self.start_writer()
        from mbsec import audit_fast  # it imports this module

        audit_fast._release(self._wake)

    def _run_writer(self) -> None:
        from mbsec import audit_fast

        audit_fast.run_writer(self)

    def _take(self) -> list[str]:
        with self._lock:
            lines = self._pending
            self._pending = []
            self._pending_bytes = 0
            return lines

    def _flush_reporting(self) -> None:
        """Write the pending lines now, reporting how it went (``report``), never raising."""
        from mbsec import audit_fast

        audit_fast.flush_reporting(self)

    def flush_deferred(self) -> int:
        """Write the lines kept so far, now; returns how many (dropped if it raises)."""
        lines = self._take()
        if not lines:
            return 0
        lines.append("")
        self._write_out("\n".join(lines))
        return len(lines) - 1

    def _stop_writer(self) -> None:
        self._closing = True
        writer = self._writer
        from mbsec import audit_fast  # it imports this module

        for lock in (self._stop, self._wake):  # ends either wait of the writer at once
            audit_fast._release(lock)  # released already (a second close): nothing to do
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=5.0)


class StreamSink(_Deferring):
    """stdout (or any text stream): one line, flushed, so a pipe to a shipper sees it at once
    (deferred lines: a batch every few milliseconds, see :class:`_Deferring`)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream

    def _write_out(self, text: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(text)
        stream.flush()

    def close(self) -> None:
        self._stop_writer()
        self.flush_deferred()


class FileSink(_Deferring):
    """Appends to a file with one ``write(2)`` per line (or per batch of deferred lines), no
    user-space buffer in between: what was written is in the kernel at once."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("ab", buffering=0)

    def _write_out(self, text: str) -> None:
        data = memoryview(text.encode("utf-8"))
        while data:
            n = self._fh.write(data)
            if not n:  # a regular file takes something or raises (ENOSPC)
                raise OSError(errno.EIO, f"short write to {self._fh.name}")
            data = data[n:]

    def close(self) -> None:
        self._stop_writer()
        try:
            self.flush_deferred()
        finally:
            self._fh.close()


class SyslogSink:
    """RFC 3164 syslog via the standard library handler (unix socket or UDP host:port)."""

    def __init__(self, address: str, facility: str) -> None:
        addr: str | tuple[str, int] = (
            address if address.startswith("/") else parse_hostport(address, default_port=514)
        )
        fac = logging.handlers.SysLogHandler.facility_names.get(facility)
        if fac is None:
            raise ValueError(f"unknown syslog facility {facility!r}")
        self._handler = logging.handlers.SysLogHandler(
            address=addr, facility=fac, socktype=socket.SOCK_DGRAM
        )
        self._handler.ident = "mbsec: "

    def write(self, level: str, line: str) -> None:
        rec = logging.LogRecord("mbsec", _LEVELS.get(level, 20), "", 0, line, None, None)
        self._handler.emit(rec)

    def close(self) -> None:
        self._handler.close()


class ListSink:
    """Keeps the lines in memory: tests and the demo read the events back."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write(self, level: str, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def close(self) -> None:
        pass

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(x) for x in self.lines]


class SinkLogger:
    """The structlog 'logger' at the end of the chain: fans one rendered line out to sinks.

    A sink that raises (a full disk, a dead syslog socket) never reaches the caller: logging
    must not stop the proxy or close a connection. The failure raises an alarm instead (one
    ``log-sink-failed`` event on stderr and to the other sinks when a sink starts failing, and
    ``mbsec_log_sink_failures_total``), and :attr:`healthy` says whether the last event found a
    sink that took it: the request path applies ``logging.on_sink_failure`` while it does not.
    """

    def __init__(self, sinks: Iterable[Sink | EventSink], *, alarm: TextIO | None = None,
                 levels: Iterable[int] | None = None) -> None:
        self.sinks = list(sinks)
        #: each sink's minimum level (``[[logging.sinks]]`` level); 0: everything the logger
        #: lets through
        self.levels = list(levels) if levels is not None else [0] * len(self.sinks)
        self._takes_event = [hasattr(s, "write_event") for s in self.sinks]
        self._defers = [hasattr(s, "write_deferred") for s in self.sinks]
        #: set by the data plane while it runs (mbsec/path/epoll.py): :meth:`emit` with
        #: ``defer`` then leaves lines to the sinks' writer threads
        self.defer_writes = False
        #: deferred lines were emitted since the last :meth:`flush_deferred`
        self.pending = False
        self._pending_took = False  # a sink that does not defer took the last deferred line
        #: the allowed-request lines of the data plane's current loop pass (mbsec.audit_fast,
        #: appended only on ``batch_thread``), all of ``batch_level``: handed to the sinks at
        #: once by :meth:`emit_batch` at the end of the pass, before any other event that
        #: thread logs and before a connection goes back to the control plane (its close line)
        self.batch: list[str] = []
        self.batch_level = "info"
        #: the data-plane thread while it runs (mbsec/path/epoll.py), else None
        self.batch_thread: int | None = None
        from mbsec import audit_fast  # it imports this module

        #: the lines of :attr:`batch` to the sinks, in order: one call per sink instead of one
        #: :meth:`emit` per line (the same outcome: deferred, health known once written).
        #: Compiled with the data plane, which calls it at the end of every loop pass
        #: (:func:`mbsec.audit_fast.emit_batch`; bound here, as ``write_deferred_lines``).
        self.emit_batch: Callable[[], None] = functools.partial(audit_fast.emit_batch, self)
        for i, s in enumerate(self.sinks):
            if self._defers[i]:
                s.report = functools.partial(self._deferred_written, i)  # type: ignore[union-attr]
        #: the processors before the JSON renderer, for mbsec.audit_fast (None: the console
        #: format, which it does not render)
        self.head: list[Callable[[Any, str, EventDict], Any]] | None = None
        self.healthy = True
        self.failures = 0
        self._failing: set[int] = set()  # indexes of sinks whose last write raised
        self._alarm = alarm
        self.metrics: Any = None  # set by the proxy: counts failures

    def batches(self, level: str) -> bool:
        """Whether a deferred line at ``level`` may wait in :attr:`batch`: every sink that
        takes it defers, none formats events itself, and at least one takes it (then
        :meth:`emit_batch` does what :meth:`emit` with ``defer`` does for each line)."""
        number = _LEVELS.get(level, 20)
        wanted = [i for i in range(len(self.sinks)) if number >= self.levels[i]]
        return bool(wanted) and all(
            self._defers[i] and not self._takes_event[i] for i in wanted)

    def _emit(self, level: str, line: str, event: dict[str, Any] | None = None,
              defer: bool = False) -> None:
        if self.batch and threading.get_ident() == self.batch_thread:
            self.emit_batch()  # the data plane's lines of this pass go first
        took = wanted = deferred = False
        number = _LEVELS.get(level, 20)
        for i, s in enumerate(self.sinks):
            if number < self.levels[i]:
                continue  # below this sink's level
            wanted = True
            try:
                if self._takes_event[i]:
                    s.write_event(level, line, event if event is not None  # type: ignore[union-attr]
                                  else _event_of(line))
                elif defer and self._defers[i]:
                    s.write_deferred(line)  # type: ignore[union-attr]
                    deferred = True
                    continue  # taken or not: its writer reports (_deferred_written)
                else:
                    s.write(level, line)  # type: ignore[union-attr]
            except Exception as exc:
                self._sink_failed(i, s, exc)
            else:
                took = True
                if self._failing:
                    self._failing.discard(i)
        if deferred:
            self.pending = True
            self._pending_took = took
            if not took:
                return  # healthy: what the flush of this line will say
        self.healthy = took or not wanted  # no sink wanted it: nothing was lost

    def emit(self, level: str, line: str, event: dict[str, Any] | None = None,
             defer: bool = False) -> None:
        """Write a rendered line (and its nested event, for the sinks that format it); with
        ``defer``, a sink that can keeps it until :meth:`flush_deferred`."""
        self._emit(level, line, event, defer)

    def flush_deferred(self, wait: bool = False) -> None:
        """The deferred lines are on their way (each sink's writer thread writes them within
        ``INTERVAL``); ``wait``, or a data plane that has stopped (``defer_writes`` False):
        write them now, in this thread."""
        self.pending = False
        if wait or not self.defer_writes:  # the data plane has stopped: nothing waits
            for s in self.sinks:
                if hasattr(s, "write_deferred"):
                    s._flush_reporting()  # type: ignore[union-attr]

    def _deferred_written(self, index: int, written: int, exc: Exception | None,
                          lost: int) -> None:
        """A sink wrote a batch of deferred lines (in its writer thread), or failed to: the
        alarm, and the health the request path reads (``on_sink_failure``)."""
        if exc is not None:
            self._sink_failed(index, self.sinks[index], exc, lost)
            if not self._pending_took:
                self.healthy = False
        elif written:
            if self._failing:
                self._failing.discard(index)
            self.healthy = True

    def _sink_failed(self, index: int, sink: Sink | EventSink, exc: Exception,
                     lines: int = 1) -> None:
        self.failures += lines
        name = str(getattr(sink, "name", None) or type(sink).__name__)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.inc("mbsec_log_sink_failures_total", lines, sink=name)
        if index in self._failing:
            return  # alarmed once per failure period, not per line
        self._failing.add(index)
        from mbsec import events  # events imports this module for fallback_line

        alarm = events.fallback_line(events.log_sink_failed(name, exc))
        with contextlib.suppress(Exception):
            stream = self._alarm or sys.stderr
            stream.write(alarm + "\n")
            stream.flush()
        # and to every sink that still works: the SIEM learns that one destination is blind
        for i, other in enumerate(self.sinks):
            if i != index and i not in self._failing:
                with contextlib.suppress(Exception):
                    if self._takes_event[i]:  # a formatting sink (RFC 5424, CEF) gets the event
                        other.write_event(  # type: ignore[union-attr]
                            "critical", alarm, _event_of(alarm))
                    else:
                        other.write("critical", alarm)  # type: ignore[union-attr]

    def debug(self, line: str, event: dict[str, Any] | None = None) -> None:
        self._emit("debug", line, event)

    def info(self, line: str, event: dict[str, Any] | None = None) -> None:
        self._emit("info", line, event)

    def msg(self, line: str, event: dict[str, Any] | None = None) -> None:
        self._emit("info", line, event)

    def warning(self, line: str, event: dict[str, Any] | None = None) -> None:
        self._emit("warning", line, event)

    def error(self, line: str, event: dict[str, Any] | None = None) -> None:
        self._emit("error", line, event)

    def critical(self, line: str, event: dict[str, Any] | None = None) -> None:
        self._emit("critical", line, event)

    exception = error
    fatal = critical
    warn = warning
    failure = error
    err = error

    def start_writers(self) -> None:
        """Start the writer thread of every sink that defers lines, now (on this thread's
        CPU priority: :meth:`_Deferring.start_writer`)."""
        for s in self.sinks:
            start = getattr(s, "start_writer", None)
            if start is not None:
                start()

    def close(self) -> None:
        """Close every sink; one that cannot flush its last bytes (a full disk) does not stop
        the others closing, nor make the proxy's exit a traceback."""
        for s in self.sinks:
            with contextlib.suppress(Exception):
                s.close()


EventDict = MutableMapping[str, Any]


def _add_level(_: Any, method: str, ev: EventDict) -> EventDict:
    ev["log.level"] = "warning" if method == "warn" else method
    return ev


def utc_stamp() -> str:
    """``@timestamp``: ISO 8601 in UTC with a ``Z`` (microseconds unless they are 0)."""
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def _add_timestamp(_: Any, __: str, ev: EventDict) -> EventDict:
    ev["@timestamp"] = utc_stamp()
    return ev


def _add_ecs(_: Any, __: str, ev: EventDict) -> EventDict:
    ev["ecs.version"] = ECS_VERSION
    ev.setdefault("service.name", "mbsec")
    return ev


_FIRST = frozenset(("@timestamp", "message"))


#: dotted key -> (its parents, its last part), split once per key: two events per connection
#: with ~30 keys each made ``str.split`` a visible share of a handshake's CPU. Keys come from
#: mbsec's code (event constructors, bound context), so a few hundred; bounded all the same.
_PATHS: dict[str, tuple[tuple[str, ...], str]] = {}
_PATHS_MAX = 4096


def nest_dotted(ev: EventDict) -> dict[str, Any]:
    """``{"event.action": x}`` -> ``{"event": {"action": x}}``; '@timestamp' stays flat."""
    out: dict[str, Any] = {}
    for first in ("@timestamp", "message"):  # the order people read lines in
        if first in ev:
            out[first] = ev[first]
    paths = _PATHS
    for key, value in ev.items():
        if key in _FIRST:
            continue
        path = paths.get(key)
        if path is None:
            *up, leaf = key.split(".")
            path = (tuple(up), leaf)
            if len(paths) < _PATHS_MAX:
                paths[key] = path
        parents, leaf = path
        if not parents:
            if key in out and isinstance(out[key], dict) and isinstance(value, dict):
                out[key].update(value)
            else:
                out[key] = value
            continue
        node = out
        for p in parents:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[leaf] = value
    return out


def _nest(_: Any, __: str, ev: EventDict) -> EventDict:
    return nest_dotted(ev)


def _json(_: Any, __: str, ev: EventDict) -> tuple[tuple[str, EventDict], dict[str, Any]]:
    # the nested event travels with its line, for the sinks that format it themselves
    return (json.dumps(ev, separators=(",", ":"), default=str), ev), {}


def _event_of(line: str) -> dict[str, Any]:
    """The event of a line logged without one (a caller of SinkLogger itself)."""
    try:
        ev = json.loads(line)
    except ValueError:
        return {"message": line}
    return ev if isinstance(ev, dict) else {"message": line}


def make_logger(
    settings: LoggingSettings | None = None,
    *,
    extra_sinks: Iterable[Sink] = (),
    stdout: TextIO | None = None,
) -> FilteringBoundLogger:
    """Build the event logger from the ``[logging]`` settings (plus extra sinks for tests)."""
    settings = settings or LoggingSettings()
    sinks: list[Sink | EventSink] = []
    if settings.stdout:
        sinks.append(StreamSink(stdout))
    if settings.file is not None:
        sinks.append(FileSink(settings.file))
    if settings.syslog is not None:
        sinks.append(SyslogSink(settings.syslog.address, settings.syslog.facility))
    sinks.extend(extra_sinks)
    levels = [_LEVELS[settings.level]] * len(sinks)
    try:
        for index, cfg in enumerate(settings.sinks):
            sinks.append(_configured_sink(settings, cfg, index, stdout))
            levels.append(_LEVELS[cfg.level or settings.level])
    except BaseException:
        for sink in sinks:
            with contextlib.suppress(Exception):
                sink.close()
        raise
    renderer: Callable[[Any, str, EventDict], Any]
    if settings.format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)

        def _console(logger: Any, method: str, ev: EventDict) -> Any:
            nested = nest_dotted(ev)
            return (renderer(logger, method, ev), nested), {}

        tail: list[Callable[[Any, str, EventDict], Any]] = [_console]
    else:
        tail = [_nest, _json]
    processors: list[Callable[[Any, str, EventDict], Any]] = [
        structlog.contextvars.merge_contextvars,
        _add_level,
        _add_timestamp,
        _add_ecs,
        structlog.processors.EventRenamer("message"),
        *tail,
    ]
    wrapper = structlog.make_filtering_bound_logger(min(levels, default=_LEVELS[settings.level]))
    sink_logger = SinkLogger(sinks, levels=levels)
    if settings.format != "console":
        sink_logger.head = processors[:-2]  # mbsec.audit_fast renders what _nest + _json do
    logger: FilteringBoundLogger = structlog.wrap_logger(
        sink_logger,
        processors=processors,
        wrapper_class=wrapper,
        cache_logger_on_first_use=False,
    )
    # a concrete bound logger: the lazy proxy wrap_logger returns built a new one for every
    # event (about 6 us each, two or three per connection; benchmarks/README.md, "Issue 10
    # item 3: handshake rate rounds")
    return logger.bind()


def _configured_sink(settings: LoggingSettings, cfg: SinkSettings, index: int,
                     stdout: TextIO | None) -> Sink | EventSink:
    """One ``[[logging.sinks]]`` entry; a json stdout/file sink reuses the rendered line
    (unless ``format = "console"`` made that line a console one)."""
    from mbsec import sink_formats, sink_remote

    if cfg.effective_format() == "json" and cfg.type in ("stdout", "file"):
        if settings.format == "json":
            if cfg.type == "file":
                assert cfg.path is not None
                return _Named(FileSink(cfg.path), cfg.label(index))
            return _Named(StreamSink(stdout), cfg.label(index))
        return _JsonFromEvent(FileSink(cfg.path) if cfg.path is not None else StreamSink(stdout),
                              cfg.label(index), sink_formats.json_line)
    return cast("EventSink", sink_remote.build_sink(
        cfg, index, stdout=stdout, lines_are_json=settings.format == "json"))


class _Named:
    """A line sink under its ``[[logging.sinks]]`` name (alarms and metrics use it)."""

    def __init__(self, inner: Sink, name: str) -> None:
        self.inner = inner
        self.name = name
        if isinstance(inner, _Deferring) and not hasattr(self, "write_event"):
            self.write_deferred = inner.write_deferred
            self.write_deferred_lines = inner.write_deferred_lines
            self.flush_deferred = inner.flush_deferred
            self._flush_reporting = inner._flush_reporting
            self.start_writer = inner.start_writer

    @property
    def report(self) -> Callable[[int, Exception | None, int], None] | None:
        return getattr(self.inner, "report", None)

    @report.setter
    def report(self, value: Callable[[int, Exception | None, int], None] | None) -> None:
        self.inner.report = value  # type: ignore[attr-defined]

    def write(self, level: str, line: str) -> None:
        self.inner.write(level, line)

    def close(self) -> None:
        self.inner.close()


class _JsonFromEvent(_Named):
    """A json sink while the main format is ``console``: renders the event itself."""

    def __init__(self, inner: Sink, name: str,
                 render: Callable[[str, dict[str, Any]], str]) -> None:
        super().__init__(inner, name)
        self._render = render

    def write_event(self, level: str, line: str, event: dict[str, Any]) -> None:
        self.inner.write(level, self._render(level, event))


def check_sinks(settings: LoggingSettings) -> list[str]:
    """Problems that would stop the sinks from opening, found without creating anything."""
    problems = []
    files = [("logging.file", settings.file)] + [
        (f"logging.sinks[{i}] ({cfg.label(i)})", cfg.path)
        for i, cfg in enumerate(settings.sinks) if cfg.type == "file"]
    for where, path in files:
        if path is None:
            continue
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if path.is_dir():
            problems.append(f"{where}: {path} is a directory")
        elif not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"{where}: cannot create {path} ({parent} is not a "
                            "writable directory)")
    if settings.syslog is not None:
        addr = settings.syslog.address
        is_sock = os.path.exists(addr) and stat.S_ISSOCK(os.stat(addr).st_mode)
        if addr.startswith("/") and not is_sock:
            problems.append(f"logging.syslog: {addr} is not a unix socket (is syslog running?)")
        try:
            SyslogSink(settings.syslog.address, settings.syslog.facility).close()
        except (OSError, ValueError) as exc:
            problems.append(f"logging.syslog: {settings.syslog.address}: {exc}")
    if settings.sinks:
        from mbsec.sink_remote import check_sink

        for index, cfg in enumerate(settings.sinks):
            problems.extend(check_sink(cfg, index))
    return problems


def close_logger(log: FilteringBoundLogger) -> None:
    """Close file/syslog sinks of a logger made by :func:`make_logger`."""
    inner = getattr(log, "_logger", None)
    if isinstance(inner, SinkLogger):
        inner.close()


def null_logger() -> FilteringBoundLogger:
    """A logger that drops everything (library use without configuration)."""
    return make_logger(LoggingSettings(stdout=False))


def flatten(ev: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Inverse of :func:`nest_dotted`, handy to assert on events: ``flat["event.action"]``."""
    out: dict[str, Any] = {}
    for k, v in ev.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
