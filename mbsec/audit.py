"""SIEM events: structlog rendering one JSON object per line with Elastic Common Schema names.

Code emits flat dotted keys (``log.warning("...", **{"event.action": "tls-handshake"})``); the
last processor nests them (``{"event": {"action": ...}}``), which is what ECS ingest expects.
The structlog message becomes ECS ``message``. The logger is built per proxy instance and
injected (no global ``structlog.configure``), so tests can run several proxies and capture lines.

Only synchronous methods are used: structlog's ``a*`` methods run in asyncio's executor and must
never be called under trio. Sinks write synchronously; a line is small.
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
from typing import Any, Protocol, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

from mbsec.settings import LoggingSettings, parse_hostport

ECS_VERSION = "8.11.0"

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


class Sink(Protocol):
    def write(self, level: str, line: str) -> None: ...

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

    def __init__(self, sinks: Iterable[Sink], *, alarm: TextIO | None = None) -> None:
        self.sinks = list(sinks)
        self.healthy = True
        self.failures = 0
        self._failing: set[int] = set()  # indexes of sinks whose last write raised
        self._alarm = alarm
        self.metrics: Any = None  # set by the proxy: counts failures

    def _emit(self, level: str, line: str) -> None:
        took = not self.sinks
        for i, s in enumerate(self.sinks):
            try:
                s.write(level, line)
            except Exception as exc:
                self._sink_failed(i, s, exc)
            else:
                took = True
                if self._failing:
                    self._failing.discard(i)
        self.healthy = took

    def _sink_failed(self, index: int, sink: Sink, exc: Exception) -> None:
        self.failures += 1
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.inc("mbsec_log_sink_failures_total", sink=type(sink).__name__)
        if index in self._failing:
            return  # alarmed once per failure period, not per line
        self._failing.add(index)
        from mbsec import events  # events imports this module for fallback_line

        alarm = events.fallback_line(events.log_sink_failed(type(sink).__name__, exc))
        with contextlib.suppress(Exception):
            stream = self._alarm or sys.stderr
            stream.write(alarm + "\n")
            stream.flush()
        # and to every sink that still works: the SIEM learns that one destination is blind
        for i, other in enumerate(self.sinks):
            if i != index and i not in self._failing:
                with contextlib.suppress(Exception):
                    other.write("critical", alarm)

    def debug(self, line: str) -> None:
        self._emit("debug", line)

    def info(self, line: str) -> None:
        self._emit("info", line)

    def msg(self, line: str) -> None:
        self._emit("info", line)

    def warning(self, line: str) -> None:
        self._emit("warning", line)

    def error(self, line: str) -> None:
        self._emit("error", line)

    def critical(self, line: str) -> None:
        self._emit("critical", line)

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


def nest_dotted(ev: EventDict) -> dict[str, Any]:
    """``{"event.action": x}`` -> ``{"event": {"action": x}}``; '@timestamp' stays flat."""
    out: dict[str, Any] = {}
    for first in ("@timestamp", "message"):  # the order people read lines in
        if first in ev:
            out[first] = ev[first]
    for key, value in ev.items():
        if key in _FIRST:
            continue
        if "." not in key:
            if key in out and isinstance(out[key], dict) and isinstance(value, dict):
                out[key].update(value)
            else:
                out[key] = value
            continue
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if not isinstance(nxt, dict):
                nxt = {}
                node[p] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def _nest(_: Any, __: str, ev: EventDict) -> EventDict:
    return nest_dotted(ev)


def _json(_: Any, __: str, ev: EventDict) -> str:
    return json.dumps(ev, separators=(",", ":"), default=str)


def make_logger(
    settings: LoggingSettings | None = None,
    *,
    extra_sinks: Iterable[Sink] = (),
    stdout: TextIO | None = None,
) -> FilteringBoundLogger:
    """Build the event logger from the ``[logging]`` settings (plus extra sinks for tests)."""
    settings = settings or LoggingSettings()
    sinks: list[Sink] = []
    if settings.stdout:
        sinks.append(StreamSink(stdout))
    if settings.file is not None:
        sinks.append(FileSink(settings.file))
    if settings.syslog is not None:
        sinks.append(SyslogSink(settings.syslog.address, settings.syslog.facility))
    sinks.extend(extra_sinks)
    renderer: Callable[[Any, str, EventDict], Any]
    if settings.format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
        tail: list[Callable[[Any, str, EventDict], Any]] = [renderer]
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
    wrapper = structlog.make_filtering_bound_logger(_LEVELS[settings.level])
    logger: FilteringBoundLogger = structlog.wrap_logger(
        SinkLogger(sinks),
        processors=processors,
        wrapper_class=wrapper,
        cache_logger_on_first_use=False,
    )
    return logger


def check_sinks(settings: LoggingSettings) -> list[str]:
    """Problems that would stop the sinks from opening, found without creating anything."""
    problems = []
    if settings.file is not None:
        parent = settings.file.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if settings.file.is_dir():
            problems.append(f"logging.file: {settings.file} is a directory")
        elif not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            problems.append(f"logging.file: cannot create {settings.file} ({parent} is not a "
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
