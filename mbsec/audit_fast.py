"""Logging an allowed request cheaply: the same JSON line, rendered from a per-connection template.

Why: with ``allowed_requests = "info"`` every forwarded request writes one ``modbus-request``
line, on the data-plane thread. Through structlog that line cost about 130 µs of CPU
(benchmarks/README.md): the connection's ~20 bound keys copied into each event, turned from
dotted keys into nested objects (:func:`mbsec.audit.nest_dotted`) and serialized again, for
every request, although they never change within a connection.

:class:`EventWriter` renders the bound context once per connection and event shape: the
reference chain (the logger's own processors, then ``nest_dotted``) runs once on placeholder
values, and the JSON around the placeholders becomes the literal text of a template, the
context's values included. Per event only the event's own values are encoded (the C string
encoder of :mod:`json`, ``int.__repr__``) and joined into the template. The allowed request
itself goes further (:meth:`EventWriter.allowed`): one format per kind of request (unit,
function, access, rule, target), in which only the clock, the transaction id and the duration
are filled in. The line is the one structlog would write, byte for byte apart from the clock
(tests/test_audit_fast.py checks both against the reference with hypothesis). The file and
stdout sinks write it from their writer thread (mbsec.audit, deferred writes); on the
data-plane thread the lines of one loop pass go to them together (``SinkLogger.batch``).
This module is compiled with the data plane (setup.py's ``CORE``).

:class:`ConnectionLines` does the same for the two events every authenticated connection
writes on the control plane (the accepted ``tls-handshake`` and ``connection-closed``), with
templates shared by every connection of one certificate, role set, TLS version and cipher.

The writer steps aside (the bound logger writes the event, as before) whenever the template
would not be exact: a value that is a dict (nesting would merge it), structlog contextvars
bound in the calling thread, a logger that is not :func:`mbsec.audit.make_logger`'s JSON one.
A sink that formats events itself (``[[logging.sinks]]``) gets the nested event parsed back
from the line, which equals the reference's when every value is a JSON type; otherwise the
bound logger writes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from contextvars import copy_context
from threading import get_ident
from typing import TYPE_CHECKING, Any

from structlog.contextvars import get_contextvars

from mbsec import events
from mbsec.audit import _LEVELS, SinkLogger, _Deferring, nest_dotted, utc_stamp

if TYPE_CHECKING:
    from mbsec.modbus.access import Access

#: the C encoder of json.dumps(ensure_ascii=True) for one string, quotes included
_encode_str: Callable[[str], str] = json.encoder.encode_basestring_ascii
_STRUCTLOG_PREFIX = "structlog_"
#: event shapes remembered per connection (the allowed event has a handful: with or
#: without values, an exception code, FC23's two ranges)
MAX_SHAPES = 32


def dumps(value: Any) -> str:
    """What :func:`mbsec.audit._json` writes for ``value``."""
    return json.dumps(value, separators=(",", ":"), default=str)


def reference_line(flat: Mapping[str, Any]) -> str:
    """The reference rendering of a flat event: nest the dotted keys, then serialize."""
    return dumps(nest_dotted(dict(flat)))


class _Slot:
    """A placeholder for one value of the event in the template (never a dict, so that
    ``nest_dotted`` treats it as the leaf the real value will be)."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


#: the fields of an allowed request that change from one request to the next
_TID = "modbus.transaction_id"
_DURATION = "event.duration"
#: an allowed request's line around its values (:meth:`EventWriter._allowed_format`)
_Parts = tuple[str, str, str, str, bool] | tuple[()]
#: the slots that are not fields (no field can be named like these)
_STAMP = "\x00timestamp"
_MESSAGE = "\x00message"


class _Template:
    """``fmt % (JSON of each slot's value, in the order of keys)`` is the line; ``hidden``:
    the fields whose value a later key replaced (unless it is a dict, which that key would
    have been nested into)."""

    __slots__ = ("fmt", "hidden", "keys", "literals", "raw")

    def __init__(self, literals: list[str], keys: list[str]) -> None:
        self.raw = literals  # the JSON text between the slots (``literals``: for ``fmt``)
        self.literals = [part.replace("%", "%%") for part in literals]
        self.fmt = "%s".join(self.literals)
        self.keys = keys
        self.hidden: tuple[str, ...] = ()


def _compile(nested: Mapping[str, Any]) -> _Template | None:
    """Walk the nested placeholder event: literal JSON around the slots (None: a dict value
    from the context, which the template cannot stand for)."""
    parts: list[str] = []  # literal, slot key, literal, slot key, ..., literal
    text: list[str] = []
    if not _compile_node(nested, parts, text):
        return None
    parts.append("".join(text))
    return _Template(parts[0::2], parts[1::2])


def _compile_node(obj: Mapping[str, Any], parts: list[str], text: list[str]) -> bool:
    """One JSON object of :func:`_compile` (a module function, not a closure calling itself:
    that would be a reference cycle per compiled template, left to the cyclic GC)."""
    text.append("{")
    first = True
    for key, value in obj.items():
        text.append(("" if first else ",") + _encode_str(key) + ":")
        first = False
        if isinstance(value, _Slot):
            stamp = value.key is _STAMP  # a string of its own: the quotes are literal
            if stamp:
                text.append('"')
            parts.append("".join(text))
            text.clear()
            parts.append(value.key)
            if stamp:
                text.append('"')
        elif type(value) is dict:
            # nest_dotted's own objects are plain dicts built from placeholders; a dict
            # value bound in the context is refused before we get here
            if not _compile_node(value, parts, text):
                return False
        else:
            text.append(dumps(value))
    text.append("}")
    return True


def _encode_list(items: list[Any]) -> str | None:
    """A list of strings and ints as json.dumps writes it; None for anything else."""
    out = []
    for item in items:
        t = type(item)
        if t is str:
            out.append(_encode_str(item))
        elif t is int:
            out.append(int.__repr__(item))
        else:
            return None
    return "[" + ",".join(out) + "]"


#: fast_stamp's cache: the second it last saw (in microseconds) and that second's text, one
#: tuple (a thread that reads it never sees one second's number with another's text)
_stamp_cache: tuple[int, str] = (-1, "")


def _scalar(value: Any) -> str | None:
    """A str, an int or None as the JSON text a template's slot takes; None for any other
    value (the caller encodes it otherwise, or leaves the event to the logger)."""
    t = type(value)
    if t is str:
        return _encode_str(value)
    if t is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    return None


def fast_stamp() -> str:
    """:func:`mbsec.audit.utc_stamp`'s text (the same clock, the same rounding: microseconds
    floored, none shown when they are 0) at a fraction of its cost: the date and time are
    formatted once a second, only the microseconds per call (``datetime.now(UTC)
    .isoformat()`` was a quarter of :meth:`EventWriter.allowed`'s own cost)."""
    second, frac = _stamp_now()
    # str(10**6 + frac)[1:]: the six digits, zero-padded, without a format spec to parse
    return second + "." + str(1_000_000 + frac)[1:] + "Z" if frac else second + "Z"


def _stamp_now() -> tuple[str, int]:
    """:func:`fast_stamp` in two parts, the date and time to the second and the
    microseconds, for a caller that joins them into its line itself (a compiled function
    returns the pair without allocating it)."""
    global _stamp_cache
    us = time.time_ns() // 1000
    frac = us % 1_000_000
    second = us - frac
    cache = _stamp_cache
    if cache[0] != second:
        t = time.gmtime(second // 1_000_000)
        cache = _stamp_cache = (second, f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
                                f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
    return cache[1], frac


def _native(value: Any) -> bool:
    """json.loads gives back an equal object of the same types (str, int, None, bool and
    lists of them)."""
    t = type(value)
    if t is list:
        return all(_native(v) for v in value)
    return t is str or t is int or t is bool or value is None


def _contextvars_bound() -> bool:
    """True when the calling thread has structlog contextvars (merge_contextvars would add
    them): the data-plane thread has none."""
    ctx = copy_context()
    if not len(ctx):
        return False
    return any(k.name.startswith(_STRUCTLOG_PREFIX) and ctx[k] is not Ellipsis for k in ctx)


class EventWriter:
    """Writes events of one bound logger at one level, as that logger would.

    Built per connection (and again when its logger is rebound): ``write(message, fields)``
    is ``log.<level>(message, **fields)`` without structlog's chain. See the module
    docstring for when it hands the event to the bound logger instead.
    """

    def __init__(self, log: Any, sink: SinkLogger, level: str, processors: list[Any]) -> None:
        self._log = log
        self._fallback: Callable[..., Any] = getattr(log, level)
        self._sink = sink
        self._level = level
        self._context: dict[str, Any] = dict(log._context)
        #: the processors before nest+json (contextvars, level, timestamp, ECS, message)
        self._processors = processors
        self._templates: dict[tuple[str, ...], _Template | None] = {}
        #: allowed(): (unit, fc, id(access), rule, decision, target, exception) ->
        #: (access, its literal parts: :meth:`_allowed_format`)
        self._allowed: dict[tuple[Any, ...], tuple[Any, _Parts]] = {}
        #: the last kind allowed() wrote, compared field by field before the dict (a
        #: connection that polls asks the same request over and over): its key's fields
        #: (access by identity) and its parts; () when none
        self._last_parts: _Parts = ()
        self._last_access: Any = None
        self._last_unit = -1
        self._last_fc = -1
        self._last_rule = ""
        self._last_decision = ""
        self._last_target = ""
        self._last_exception: int | None = None
        number = _LEVELS[level]
        #: some sink formats the event itself: it gets the nested event (parsed back)
        self._needs_event = any(
            takes and number >= sink_level
            for takes, sink_level in zip(sink._takes_event, sink.levels, strict=True))
        #: the context's values come back equal from the line (else the logger writes
        #: events that a sink needs as objects)
        self._context_native = all(_native(v) for v in self._context.values())
        #: allowed lines logged on the data-plane thread wait for the end of its loop pass
        self._batches = sink.batches(level)

    def _template(self, shape: tuple[str, ...]) -> _Template | None:
        """The reference chain run once on placeholders for this shape of event."""
        tpl = self._compile_event(_Slot(_MESSAGE), {key: _Slot(key) for key in shape})
        if tpl is not None:
            shown = set(tpl.keys)
            tpl.hidden = tuple(key for key in shape if key not in shown)
        if len(self._templates) < MAX_SHAPES:
            self._templates[shape] = tpl
        return tpl

    def _compile_event(self, message: Any, fields: dict[str, Any]) -> _Template | None:
        """The reference chain (the logger's processors, nest_dotted) run once; what is not
        a placeholder becomes literal JSON."""
        ev: Any = dict(self._context)
        ev.update(fields)
        ev["event"] = message
        for proc in self._processors:
            ev = proc(self._sink, self._level, ev)
        ev["@timestamp"] = _Slot(_STAMP)  # stamped per event
        return _compile(nest_dotted(ev))

    def allowed(self, tid: int, unit_id: int, fc: int, access: Access | None,
                duration_s: float, rule_id: str, decision: str, target: str,
                exception_code: int | None = None) -> None:
        """``events.modbus_request_allowed(...)`` written at this writer's level: the
        hot event, from a template per connection and request kind in which everything but
        the clock, the transaction id and the duration is literal text (a polling HMI asks
        the same few requests all day: :class:`mbsec.path.decide.Decisions` hands the same
        ``access`` object for a repeated request). The line is one join of the literals and
        the three values (a ``%`` format scanned its 1 kB of literal text per event), stamped
        by :func:`fast_stamp` (benchmarks/README.md, "Issue 14: the cost of logging every
        allowed request")."""
        # access by identity (hashing the dataclass costs more than the rest): the entry
        # keeps it alive, so its id cannot stand for another one while it is cached
        # a write's access is new each time (and its values vary): no format for it
        parts = self._last_parts
        if not (parts and access is self._last_access and unit_id == self._last_unit
                and fc == self._last_fc and rule_id == self._last_rule
                and decision == self._last_decision and target == self._last_target
                and exception_code == self._last_exception):
            key = (unit_id, fc, id(access), rule_id, decision, target, exception_code)
            entry = self._allowed.get(key)
            if entry is None and len(self._allowed) < MAX_SHAPES * 2 and (
                    access is None or access.write is None):
                entry = self._allowed[key] = (access, self._allowed_format(
                    unit_id, fc, access, rule_id, decision, target, exception_code))
            parts = entry[1] if entry is not None and entry[0] is access else ()
            if parts:  # the entry keeps access alive: its identity stands for it
                self._last_parts = parts
                self._last_access = access
                self._last_unit = unit_id
                self._last_fc = fc
                self._last_rule = rule_id
                self._last_decision = decision
                self._last_target = target
                self._last_exception = exception_code
        if parts and type(tid) is int and not _contextvars_bound():
            a, zb, c, d, tid_first = parts
            # str of an exact int (tid checked above, int() of a float) is int.__repr__'s
            # text, and compiled it is a native conversion (int.__repr__ a method call)
            nanos = int(duration_s * 1e9)
            first, second = (str(tid), str(nanos)) if tid_first else (str(nanos), str(tid))
            # the stamp's parts joined in with the rest (fast_stamp's text): one string built
            stamp, frac = _stamp_now()
            line = "".join((a, stamp, ".", str(1_000_000 + frac)[1:], zb, first, c, second, d)
                           if frac else (a, stamp, zb, first, c, second, d))
            sink = self._sink
            if self._batches and sink.batch_thread == get_ident():
                # the data plane: the line waits for the end of the loop pass, and the
                # pass's lines go to the sinks in one call (SinkLogger.emit_batch)
                batch = sink.batch
                level = self._level
                if sink.batch_level != level:
                    if batch:
                        sink.emit_batch()
                        batch = sink.batch
                    sink.batch_level = level
                batch.append(line)
                return
            sink.emit(self._level, line, None, sink.defer_writes)
            return
        ev = events.modbus_request_allowed(tid, unit_id, fc, access, duration_s, rule_id,
                                           decision, target, exception_code)
        self(ev.message, ev.fields)

    def _allowed_format(self, unit_id: int, fc: int, access: Access | None, rule_id: str,
                        decision: str, target: str, exception_code: int | None) -> _Parts:
        """The literal text of one kind of allowed request around its three values: (before
        the stamp, between it and the first of the transaction id and the duration, with the
        stamp's closing ``Z`` in front, between those two, after the second, whether the
        transaction id is the first); ``()`` when it cannot be one: a sink that needs the
        event as objects, a value the template cannot stand for."""
        if self._needs_event:
            return ()
        ev = events.modbus_request_allowed(0, unit_id, fc, access, 0.0, rule_id, decision,
                                           target, exception_code)
        fields: dict[str, Any] = dict(ev.fields)
        if any(isinstance(v, dict) for v in fields.values()):
            return ()
        fields[_TID] = _Slot(_TID)
        fields[_DURATION] = _Slot(_DURATION)
        tpl = self._compile_event(ev.message, fields)
        if tpl is None or len(tpl.keys) != 3 or tpl.keys[0] is not _STAMP or (
                sorted(tpl.keys) != sorted((_STAMP, _TID, _DURATION))):
            return ()
        a, b, c, d = tpl.raw
        return a, "Z" + b, c, d, tpl.keys[1] == _TID

    def __call__(self, message: str, fields: dict[str, Any]) -> None:
        if _contextvars_bound():
            self._fallback(message, **fields)
            return
        shape = tuple(fields)
        tpl = self._templates.get(shape)
        if tpl is None:
            tpl = self._template(shape) if shape not in self._templates else None
            if tpl is None:
                self._fallback(message, **fields)
                return
        for key in tpl.hidden:
            if isinstance(fields[key], dict):
                self._fallback(message, **fields)
                return
        native = True
        out: list[str] = []
        append = out.append
        for key in tpl.keys:
            if key is _STAMP:
                append(utc_stamp())  # digits, '-', ':', '.', 'T', 'Z': nothing to escape
            else:
                value: Any = message if key is _MESSAGE else fields[key]
                encoded = _scalar(value)
                if encoded is not None:
                    append(encoded)
                else:
                    encoded = _encode_list(value) if type(value) is list else None
                    if encoded is None:
                        if isinstance(value, dict):  # nest_dotted would merge it: not ours
                            self._fallback(message, **fields)
                            return
                        encoded = dumps(value)
                        native = False
                    append(encoded)
        line = tpl.fmt % tuple(out)
        event: dict[str, Any] | None = None
        if self._needs_event:
            if not (native and self._context_native):  # the sink gets the reference's objects
                self._fallback(message, **fields)
                return
            event = json.loads(line)
        sink = self._sink
        sink.emit(self._level, line, event, sink.defer_writes)


def emit_batch(sink: SinkLogger) -> None:
    """:attr:`SinkLogger.emit_batch <mbsec.audit.SinkLogger.emit_batch>`: the lines of
    ``sink.batch`` to the sinks, in order, one call per sink; health is known once they are
    written (a sink that raises: an alarm per line, :meth:`mbsec.audit.SinkLogger._sink_failed`).
    Here, compiled, because the data plane calls it at the end of every loop pass."""
    lines = sink.batch
    if not lines:
        return
    sink.batch = []
    number = _LEVELS.get(sink.batch_level, 20)
    levels = sink.levels
    wanted = deferred = False
    for i, s in enumerate(sink.sinks):
        if number >= levels[i]:
            wanted = True
            out: Any = s
            try:
                out.write_deferred_lines(lines)
            except Exception as exc:
                sink._sink_failed(i, s, exc, len(lines))
            else:
                deferred = True
    if deferred:
        sink.pending = True
        sink._pending_took = False
    else:
        sink.healthy = not wanted


def defer_lines(queue: _Deferring, lines: list[str]) -> None:
    """:attr:`_Deferring.write_deferred_lines <mbsec.audit._Deferring>`: the lines join the
    sink's pending list under its lock, in order (compiled: the data plane hands each loop
    pass's lines over with it); then, as for one line, the caller writes them at once when the
    list is full, else wakes the writer thread when the list was empty."""
    if queue._closing:  # a late line (a data plane that outlived the logger)
        for line in lines:
            queue.write("info", line)
        return
    size = len(lines)
    for line in lines:
        size += len(line)
    lock: Any = queue._lock
    lock.acquire()
    try:
        pending = queue._pending
        first = not pending
        pending.extend(lines)
        total = queue._pending_bytes + size
        queue._pending_bytes = total
    finally:
        lock.release()
    if total >= queue.MAX_PENDING:
        flush_reporting(queue)
    elif first:
        if queue._writer is None:
            queue._wake_writer()
        else:
            _release(queue._wake)


def _release(lock: Any) -> None:
    """Release the writer's wake-up; released already: a wake-up is pending, and the writer
    takes the lines that are there when its wait ends."""
    if lock.locked():  # (an exception raised here costs a traceback object: tens of µs)
        try:  # noqa: SIM105 - compiled, try is native; contextlib.suppress a Python object
            lock.release()
        except RuntimeError:  # close() released it meanwhile
            pass


def run_writer(queue: _Deferring) -> None:
    """The writer thread of a deferring sink (:class:`mbsec.audit._Deferring`): woken when the
    pending list stops being empty, it lets lines gather for ``INTERVAL`` and writes them with
    one write; ``close`` ends either wait at once. Compiled, with C locks for the waits: the
    thread holds the GIL, which the data-plane thread then waits for, as briefly as it can."""
    wake: Any = queue._wake
    stop: Any = queue._stop
    while True:
        wake.acquire()  # taken back: a line that finds the list empty releases it again
        if queue._closing:
            return  # close() writes what is left
        # the lines of the next few ms join this write
        if stop.acquire(True, queue.INTERVAL) or queue._closing:
            return
        flush_reporting(queue)


def flush_reporting(queue: _Deferring) -> None:
    """Write the pending lines now (the writer's batch, or the caller's when the list is
    full), reporting how it went through ``queue.report``; never raises."""
    lines = queue._take()
    if not lines:
        return
    report = queue.report
    try:
        lines.append("")
        queue._write_out("\n".join(lines))
    except Exception as exc:
        if report is not None:
            report(0, exc, len(lines) - 1)
    else:
        if report is not None:
            report(len(lines) - 1, None, 0)


def event_writer(log: Any, level: str) -> EventWriter | None:
    """An :class:`EventWriter` for ``log`` at ``level``, or None when ``log`` is not a JSON
    logger of :func:`mbsec.audit.make_logger` or does not write ``level`` at all (the caller
    then calls the logger)."""
    sink = getattr(log, "_logger", None)
    context = getattr(log, "_context", None)
    if not isinstance(sink, SinkLogger) or sink.head is None or not isinstance(context, dict):
        return None
    if level not in _LEVELS or not log.is_enabled_for(_LEVELS[level]):
        return None
    if any(isinstance(v, dict) for v in context.values()):
        return None
    return EventWriter(log, sink, level, sink.head)


# -- the control plane's per-connection events ----------------------------------------------

#: the connection context (:func:`mbsec.events.connection_context`) that differs from one
#: connection to the next; the rest of what the session binds (the peer) is the same for every
#: connection of one certificate and role set
CONNECTION_SLOTS = ("mbsec.conn_id", "source.ip", "source.port", "destination.ip",
                    "destination.port")
#: per ``event.action``: the event's own fields that differ between connections of one key
EVENT_SLOTS: dict[str, tuple[str, ...]] = {
    "tls-handshake": ("event.duration",),
    "connection-closed": ("event.reason", "event.duration", "source.bytes",
                          "destination.bytes", "mbsec.requests", "mbsec.allowed",
                          "mbsec.denied", "mbsec.errors"),
}
#: templates kept (keys: certificate, roles, TLS version, cipher); cleared when full
MAX_CONNECTION_TEMPLATES = 1024


class _ConnTemplate:
    """One event's line around its slots, and what it was built from: the event's and the
    structlog contextvars' keys in order, their values with the slots blanked."""

    __slots__ = ("ctx", "ctx_keys", "field_keys", "fields", "hidden", "level", "message", "raw",
                 "slots")

    def __init__(self, level: str, message: str, fields: dict[str, Any],
                 ctx: dict[str, Any], raw: list[str], slots: list[tuple[str, bool]]) -> None:
        self.level = level
        self.message = message
        self.field_keys = tuple(fields)
        self.fields = fields
        self.ctx_keys = tuple(ctx)
        self.ctx = ctx
        self.raw = raw
        #: (key, whether its value comes from the event's fields, else from the contextvars),
        #: in the order of the line; the stamp is _STAMP
        self.slots = slots
        #: the slots a later key replaced (not in the line, unless the value is a dict, which
        #: that key would have been nested into): (key, from the fields)
        self.hidden: list[tuple[str, bool]] = []


def _masked(values: dict[str, Any], slots: tuple[str, ...]) -> dict[str, Any]:
    out = dict(values)
    for key in slots:
        if key in out:
            out[key] = None
    return out


class ConnectionLines:
    """The two events every authenticated connection writes on the control plane
    (``tls-handshake`` accepted, ``connection-closed``), rendered from a template shared by
    all connections of one key (the session's: certificate, roles, TLS version, cipher).

    Why: through structlog's chain the two cost about 100 µs per connection (the ~25 bound
    keys merged from the contextvars, nested by :func:`mbsec.audit.nest_dotted`, serialized),
    a tenth of a handshake's Python work (benchmarks/README.md, "Issue 10 item 3: the
    per-connection Python, round 2"). Here only the clock, the connection's ids and
    addresses, durations, counts and reason are encoded per event.

    Exact, not trusted: the key only picks a template; each event is checked against what the
    template was built from (its fields and the structlog contextvars of the calling task, in
    order, equal but for the slots) and a mismatch builds it again. The template is the
    reference chain (the logger's processors, contextvars included, then ``nest_dotted``) run
    on the event itself with placeholders put in for the slots, so the line is the one
    structlog writes, byte for byte apart from the clock (tests/test_audit_fast.py). It goes
    to :meth:`mbsec.audit.SinkLogger.emit` as structlog's last processor would hand it over
    (written at once, never deferred), so the sinks and their failure rule are unchanged.
    The logger writes the event itself whenever the template cannot stand for it: a value
    that is a dict, a slot that is not a string, int or None, a level the logger drops.
    """

    def __init__(self, log: Any, sink: SinkLogger, processors: list[Any]) -> None:
        self.log = log
        self._sink = sink
        self._processors = processors
        self._log_context: dict[str, Any] = dict(log._context)
        self._templates: dict[Any, _ConnTemplate | None] = {}
        #: templates built so far (each is the reference chain run once): tests count them
        self.built = 0
        #: per level: (the logger writes it, some sink formats events itself)
        self._levels: dict[str, tuple[bool, bool]] = {}
        for level, number in _LEVELS.items():
            needs = any(takes and number >= sink_level for takes, sink_level in zip(
                sink._takes_event, sink.levels, strict=True))
            self._levels[level] = (bool(log.is_enabled_for(number)), needs)

    def write(self, log: Any, event: events.Event, key: Any) -> None:
        """``events.emit(log, event)``, from the template of ``key`` when it stands for it."""
        slots = EVENT_SLOTS.get(str(event.fields.get("event.action")))
        if log is not self.log or slots is None:
            events.emit(log, event)
            return
        enabled, needs_event = self._levels.get(event.level, (False, False))
        if not enabled:
            return  # the filtering logger drops it too
        fields = event.fields
        ctx = get_contextvars()  # what merge_contextvars merges, in its order
        tpl = self._templates.get(key)
        if tpl is None and key in self._templates:  # no template can stand for this key
            events.emit(log, event)
            return
        if tpl is None or not (
                tpl.field_keys == tuple(fields) and tpl.ctx_keys == tuple(ctx)
                and tpl.message == event.message and tpl.level == event.level
                and tpl.fields == _masked(fields, slots)
                and tpl.ctx == _masked(ctx, CONNECTION_SLOTS)):
            tpl = self._build(event, ctx, slots)
            if len(self._templates) >= MAX_CONNECTION_TEMPLATES:
                self._templates.clear()
            self._templates[key] = tpl
            if tpl is None:
                events.emit(log, event)
                return
        for name, from_fields in tpl.hidden:
            if isinstance(fields[name] if from_fields else ctx[name], dict):
                events.emit(log, event)
                return
        raw = tpl.raw
        pieces = [raw[0]]
        append = pieces.append
        i = 1
        for name, from_fields in tpl.slots:
            if name is _STAMP:
                append(fast_stamp())
            else:
                encoded = _scalar(fields[name] if from_fields else ctx[name])
                if encoded is None:  # a float, a bool, a dict...: not what it stands for
                    events.emit(log, event)
                    return
                append(encoded)
            append(raw[i])
            i += 1
        line = "".join(pieces)
        self._sink.emit(event.level, line, json.loads(line) if needs_event else None)

    def _build(self, event: events.Event, ctx: dict[str, Any],
               slots: tuple[str, ...]) -> _ConnTemplate | None:
        """The reference chain run on this event, the slots then replaced by placeholders;
        None when a template cannot stand for it (a dict or non-JSON value, which
        ``nest_dotted`` would merge or ``json.loads`` would not give back)."""
        self.built += 1
        fields = event.fields
        if not all(_native(v) for v in fields.values()) or not all(
                _native(v) for v in ctx.values()) or not all(
                _native(v) for v in self._log_context.values()):
            return None
        ev: Any = dict(self._log_context)
        ev.update(fields)
        ev["event"] = event.message
        for proc in self._processors:
            ev = proc(self._sink, event.level, ev)
        # a slot's value is the event's, else the contextvars' unless the logger's own
        # context holds the key (merge_contextvars only sets what is missing)
        sources: dict[str, bool] = {}
        for name in slots:
            if name in fields:
                sources[name] = True
        for name in CONNECTION_SLOTS:
            if name not in fields and name not in self._log_context and name in ctx:
                sources[name] = False
        for name in sources:
            ev[name] = _Slot(name)
        ev["@timestamp"] = _Slot(_STAMP)
        tpl = _compile(nest_dotted(ev))
        if tpl is None:
            return None
        built = _ConnTemplate(
            event.level, event.message, _masked(fields, slots), _masked(ctx, CONNECTION_SLOTS),
            tpl.raw, [(name, sources.get(name, False)) for name in tpl.keys])
        built.hidden = [(name, src) for name, src in sources.items() if name not in tpl.keys]
        return built


def connection_lines(log: Any) -> ConnectionLines | None:
    """A :class:`ConnectionLines` for ``log``, or None when ``log`` is not a JSON logger of
    :func:`mbsec.audit.make_logger` that merges structlog contextvars first (the session then
    calls the logger)."""
    import structlog

    sink = getattr(log, "_logger", None)
    context = getattr(log, "_context", None)
    if not isinstance(sink, SinkLogger) or sink.head is None or not isinstance(context, dict):
        return None
    if not sink.head or sink.head[0] is not structlog.contextvars.merge_contextvars:
        return None
    return ConnectionLines(log, sink, sink.head)
