"""SIEM events: structlog rendering one JSON object per line with Elastic Common Schema names.

Code emits flat dotted keys (``log.warning("...", **{"event.action": "tls-handshake"})``); the
last processor nests them (``{"event": {"action": ...}}``), which is what ECS ingest expects.
The structlog message becomes ECS ``message``. The logger is built per proxy instance and
injected (no global ``structlog.configure``), so tests can run several proxies and capture lines.

Only synchronous methods are used: structlog's ``a*`` methods run in asyncio's executor and must
never be called under trio. Sinks write synchronously; a line is small. The sinks of
``[[logging.sinks]]`` get the nested event with its line (the last processor passes both) and
format it themselves; a remote one only spools it here and formats and sends on its own thread
(mbsec/sink_remote.py).
Nothing is sampled: denials and TLS failures are logged at ``warning`` and the level setting
cannot go above ``warning``.
"""

from __future__ import annotations

import contextlib
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


class StreamSink:
    """stdout (or any text stream): one line, flushed, so a pipe to a shipper sees it at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, level: str, line: str) -> None:
        stream = self._stream or sys.stdout
        stream.write(line + "\n")
        stream.flush()

    def close(self) -> None:
        pass


class FileSink:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8", buffering=1)

    def write(self, level: str, line: str) -> None:
        self._fh.write(line + "\n")

    def close(self) -> None:
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
        self.healthy = True
        self.failures = 0
        self._failing: set[int] = set()  # indexes of sinks whose last write raised
        self._alarm = alarm
        self.metrics: Any = None  # set by the proxy: counts failures

    def _emit(self, level: str, line: str, event: dict[str, Any] | None = None) -> None:
        took = wanted = False
        number = _LEVELS.get(level, 20)
        for i, s in enumerate(self.sinks):
            if number < self.levels[i]:
                continue  # below this sink's level
            wanted = True
            try:
                if self._takes_event[i]:
                    s.write_event(level, line, event if event is not None  # type: ignore[union-attr]
                                  else _event_of(line))
                else:
                    s.write(level, line)  # type: ignore[union-attr]
            except Exception as exc:
                self._sink_failed(i, s, exc)
            else:
                took = True
                if self._failing:
                    self._failing.discard(i)
        self.healthy = took or not wanted  # no sink wanted it: nothing was lost

    def _sink_failed(self, index: int, sink: Sink | EventSink, exc: Exception) -> None:
        self.failures += 1
        name = str(getattr(sink, "name", None) or type(sink).__name__)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.inc("mbsec_log_sink_failures_total", sink=name)
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
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="@timestamp"),
        _add_ecs,
        structlog.processors.EventRenamer("message"),
        *tail,
    ]
    wrapper = structlog.make_filtering_bound_logger(min(levels, default=_LEVELS[settings.level]))
    logger: FilteringBoundLogger = structlog.wrap_logger(
        SinkLogger(sinks, levels=levels),
        processors=processors,
        wrapper_class=wrapper,
        cache_logger_on_first_use=False,
    )
    return logger


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
