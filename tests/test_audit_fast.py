"""mbsec.audit_fast: a template-rendered event is the line (and nested event) structlog's chain
writes, byte for byte apart from the clock; and the sinks' deferred writes (one batch per
data-plane pass) keep lines whole, are written by close, and raise the alarm when they fail."""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import json
import re
import threading
import time
import unittest.mock
from pathlib import Path
from typing import Any

import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from mbsec import audit, audit_fast, events
from mbsec.audit import FileSink, ListSink, SinkLogger, StreamSink, make_logger
from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access, Table
from mbsec.settings import LoggingSettings, SinkSettings

STAMP = re.compile(r'"@timestamp":"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z)"')


def unstamped(line: str) -> str:
    """The line with its timestamp's value blanked (the only part that may differ; a key
    ``@timestamp.x`` replaces it, in the reference too)."""
    return STAMP.sub('"@timestamp":"T"', line)


class EventListSink(ListSink):
    """A sink that formats events itself (like ``[[logging.sinks]]``): keeps what it got."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[dict[str, Any]] = []

    def write_event(self, level: str, line: str, event: dict[str, Any]) -> None:
        self.got.append(event)
        self.write(level, line)


def in_fresh_context(fn: Any, *args: Any) -> Any:
    """Run as the data-plane thread does: no structlog contextvars bound."""
    return contextvars.Context().run(fn, *args)


def both(log: Any, sink: ListSink, message: str, fields: dict[str, Any],
         level: str = "info") -> tuple[str, str, bool]:
    """(reference line, template line, whether the writer rendered it itself)."""
    writer = audit_fast.event_writer(log, level)
    assert writer is not None
    fell_back = []
    reference = writer._fallback

    def counting(*a: Any, **kw: Any) -> None:
        fell_back.append(1)
        reference(*a, **kw)

    writer._fallback = counting
    in_fresh_context(lambda: getattr(log, level)(message, **fields))
    in_fresh_context(writer, message, fields)
    assert len(sink.lines) == 2
    ref, fast = sink.lines
    sink.lines.clear()
    return ref, fast, not fell_back


# -- values and keys hypothesis draws: dotted keys whose segments collide on purpose ---------

SEGMENTS = st.sampled_from(["event", "mbsec", "source", "log", "ecs", "service", "message",
                            "@timestamp", "a", "b", "x9", "ünï"])
KEYS = st.lists(SEGMENTS, min_size=1, max_size=3).map(".".join)
SCALARS = st.one_of(
    st.text(max_size=12), st.integers(min_value=-2**70, max_value=2**70), st.none(),
    st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
    st.just(Table.HOLDING_REGISTERS), st.just(dt.datetime(2026, 1, 2, tzinfo=dt.UTC)),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(st.one_of(st.text(max_size=6), st.integers()), max_size=3),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.lists(SCALARS, max_size=2),
)
CONTEXT = st.dictionaries(KEYS, VALUES, max_size=8)
#: ``event`` is structlog's own argument: no keyword can have that name
FIELDS = st.dictionaries(KEYS.filter(lambda k: k != "event"), VALUES, max_size=8)


@settings(max_examples=300, deadline=None)
@given(context=CONTEXT, fields=FIELDS, message=st.text(max_size=10),
       level=st.sampled_from(["info", "debug", "warning"]))
def test_template_line_equals_structlog_line(
    context: dict[str, Any], fields: dict[str, Any], message: str, level: str
) -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False, level="debug"), extra_sinks=[sink])
    log = log.bind(**context)
    ref, fast, rendered = both(log, sink, message, fields, level)
    assert unstamped(fast) == unstamped(ref)
    assert rendered  # no dict value here: the template rendered every one of them


@settings(max_examples=100, deadline=None)
@given(context=CONTEXT, fields=FIELDS, message=st.text(max_size=10))
def test_sinks_that_format_events_get_the_reference_event(
    context: dict[str, Any], fields: dict[str, Any], message: str
) -> None:
    """The nested event a ``[[logging.sinks]]`` sink gets is the reference's (parsed back from
    the line only when that gives the same objects; else the logger writes it)."""
    sink = EventListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink]).bind(**context)
    ref, fast, _ = both(log, sink, message, fields)
    assert unstamped(fast) == unstamped(ref)
    ref_event, fast_event = sink.got
    ref_event.pop("@timestamp")
    fast_event.pop("@timestamp")
    assert fast_event == ref_event
    # same order, same types
    assert json.dumps(fast_event, default=repr) == json.dumps(ref_event, default=repr)


@settings(max_examples=50, deadline=None)
@given(context=CONTEXT, inner=st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
       key=KEYS.filter(lambda k: k != "event"))
def test_dict_values_are_left_to_the_logger(
    context: dict[str, Any], inner: dict[str, int], key: str
) -> None:
    """A dict value is merged by nest_dotted, which a template cannot stand for: the bound
    logger writes that event (the same line, of course)."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink]).bind(**context)
    ref, fast, rendered = both(log, sink, "m", {key: dict(inner)})
    assert unstamped(fast) == unstamped(ref)
    assert not rendered
    bound = log.bind(**{key: dict(inner)})
    assert audit_fast.event_writer(bound, "info") is None  # a dict bound in the context


def peer() -> PeerIdentity:
    return PeerIdentity(
        "CN=hmi-01,OU=operators", "hmi-01", ("operators",), ("hmi-01.plant.example",),
        ("10.0.0.5",), (), "CN=test CA", 1234567890123, "ab" * 32,
        dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, tzinfo=dt.UTC),
        "operator")


ACCESSES = st.one_of(
    st.none(),
    st.builds(Access, st.sampled_from([1, 3, 4, 6, 8, 16, 23]), st.sampled_from(list(Table)),
              st.one_of(st.none(), st.tuples(st.integers(0, 65535), st.integers(1, 125))),
              st.one_of(st.none(), st.tuples(st.integers(0, 65535), st.integers(1, 123))),
              st.lists(st.integers(0, 65535), max_size=20).map(tuple),
              st.one_of(st.none(), st.integers(0, 65535)), st.integers(1, 253)),
)


@settings(max_examples=200, deadline=None)
@given(tid=st.integers(0, 65535), unit=st.integers(0, 255), fc=st.integers(1, 127),
       access=ACCESSES, took=st.floats(0, 10), rule=st.text(max_size=8),
       decision=st.sampled_from(["allow", "would_deny"]), target=st.text(max_size=8),
       code=st.one_of(st.none(), st.integers(1, 11)))
def test_the_allowed_request_event_of_a_connection(
    tid: int, unit: int, fc: int, access: Access | None, took: float, rule: str, decision: str,
    target: str, code: int | None,
) -> None:
    """The hot event, with the context a real connection binds (connection, certificate,
    roles), through one writer: every shape of it renders like the reference."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    log = log.bind(**events.connection_context(17, "10.0.0.5", 50123, "10.0.0.1", 802))
    log = log.bind(**events.peer_context(peer(), ["operator"]))
    ev = events.modbus_request_allowed(tid, unit, fc, access, took, rule, decision, target,
                                       code, level="info")
    ref, fast, rendered = both(log, sink, ev.message, ev.fields)
    assert unstamped(fast) == unstamped(ref) and rendered


@settings(max_examples=150, deadline=None)
@given(kinds=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 127), ACCESSES,
                                st.text(max_size=6), st.sampled_from(["allow", "would_deny"]),
                                st.text(max_size=6), st.one_of(st.none(), st.integers(1, 11))),
                      min_size=1, max_size=3),
       requests=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 65535),
                                   st.floats(0, 100)), min_size=1, max_size=8))
def test_allowed_renders_each_request_kind_like_the_reference(
    kinds: list[tuple[Any, ...]], requests: list[tuple[int, int, float]]
) -> None:
    """``EventWriter.allowed``: one format per kind of request, in which only the clock, the
    transaction id and the duration change; each line is the constructor's event written
    by the bound logger."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    log = log.bind(**events.connection_context(17, "10.0.0.5", 50123, "10.0.0.1", 802))
    log = log.bind(**events.peer_context(peer(), ["operator"]))
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    for which, tid, took in requests:
        unit, fc, access, rule, decision, target, code = kinds[which % len(kinds)]
        ev = events.modbus_request_allowed(tid, unit, fc, access, took, rule, decision,
                                           target, code)
        in_fresh_context(functools.partial(log.info, ev.message, **ev.fields))
        in_fresh_context(writer.allowed, tid, unit, fc, access, took, rule, decision, target,
                         code)
        ref, fast = taken(sink)
        assert unstamped(fast) == unstamped(ref)
    # every kind that writes nothing had its format (a write's access is new each time)
    assert all(fmt for _, fmt in writer._allowed.values())
    assert all(access is None or access.write is None for access, _ in writer._allowed.values())


@given(st.integers(0, 65535), st.floats(0, 100), st.booleans())
def test_allowed_fills_the_transaction_id_and_duration_in_either_order(
    tid: int, took: float, modbus_first: bool,
) -> None:
    """The line's objects come in the order of their first key: a context with a ``modbus.*``
    key bound before any ``event.*`` one puts the transaction id before the duration."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    if modbus_first:
        log = log.bind(**{"modbus.gateway": "gw-1"})
    log = log.bind(**events.connection_context(17, "10.0.0.5", 50123, "10.0.0.1", 802))
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    access = Access(3, Table.HOLDING_REGISTERS, (0, 10), None, (), None, 5)
    args = (tid, 1, 3, access, took, "r1", "allow", "plc-1", None)
    in_fresh_context(writer.allowed, *args)
    ev = events.modbus_request_allowed(*args)
    in_fresh_context(functools.partial(log.info, ev.message, **ev.fields))
    fast, ref = sink.lines
    assert unstamped(fast) == unstamped(ref)
    (_, parts), = writer._allowed.values()
    assert parts and parts[4] is modbus_first  # the template, not the fallback, wrote it


def test_the_timestamp_is_the_reference_clock() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink]).bind(a=1)
    before = dt.datetime.now(dt.UTC)
    ref, fast, _ = both(log, sink, "m", {"b": 2})
    after = dt.datetime.now(dt.UTC)
    for line in (ref, fast):
        stamp = dt.datetime.fromisoformat(STAMP.findall(line)[0].replace("Z", "+00:00"))
        assert before <= stamp <= after


def reference_stamp(ns: int) -> str:
    """utc_stamp's text for a clock reading of ``ns`` (datetime.now floors to microseconds)."""
    when = dt.datetime.fromtimestamp(ns // 10**9, dt.UTC).replace(
        microsecond=ns // 1000 % 10**6)
    return when.isoformat().replace("+00:00", "Z")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 4102444800 * 10**9),  # up to 2100
                          st.integers(0, 4102444800).map(lambda s: s * 10**9),  # .000000
                          st.integers(0, 4102444800).map(lambda s: s * 10**9 + 999_999_999)),
                min_size=1, max_size=6))
def test_fast_stamp_writes_what_utc_stamp_does_for_any_clock_reading(
    readings: list[int],
) -> None:
    """The second's text is cached: readings in any order (the clock stepped back, a second
    boundary, a whole second with no microseconds) still give utc_stamp's text."""
    for ns in readings:
        with unittest.mock.patch.object(audit_fast.time, "time_ns", return_value=ns):
            assert audit_fast.fast_stamp() == reference_stamp(ns)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 4102444800 * 10**9),
                          st.integers(0, 4102444800).map(lambda s: s * 10**9)),
                min_size=1, max_size=4))
def test_the_allowed_line_carries_fast_stamps_text(readings: list[int]) -> None:
    """EventWriter.allowed joins the stamp's parts into its line itself: the line's
    ``@timestamp`` is utc_stamp's text for the clock reading (with and without
    microseconds), and the rest of the line is unchanged."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    for ns in readings:
        with unittest.mock.patch.object(audit_fast.time, "time_ns", return_value=ns):
            in_fresh_context(writer.allowed, 7, 1, 3, READ, 0.001, "r", "allow", "plc")
        line = sink.lines[-1]
        assert json.loads(line)["@timestamp"] == reference_stamp(ns)
        assert STAMP.findall(line) == [reference_stamp(ns)]


def test_fast_stamp_reads_utc_stamps_clock() -> None:
    for _ in range(200):
        before, fast, after = audit.utc_stamp(), audit_fast.fast_stamp(), audit.utc_stamp()
        parsed = [dt.datetime.fromisoformat(x.replace("Z", "+00:00"))
                  for x in (before, fast, after)]
        assert parsed[0] <= parsed[1] <= parsed[2]
        assert STAMP.fullmatch(f'"@timestamp":"{fast}"')


def test_bound_contextvars_are_left_to_the_logger() -> None:
    """merge_contextvars would add them: a thread that has some gets the reference path."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None

    def bound() -> None:
        structlog.contextvars.bind_contextvars(**{"mbsec.conn_id": 5})
        writer("m", {"b": 1})

    contextvars.Context().run(bound)
    assert json.loads(sink.lines[0])["mbsec"] == {"conn_id": 5}


def test_no_writer_for_a_console_logger_or_a_level_it_drops() -> None:
    log = make_logger(LoggingSettings(stdout=False, format="console"))
    assert audit_fast.event_writer(log, "info") is None
    quiet = make_logger(LoggingSettings(stdout=False, level="info"))
    assert audit_fast.event_writer(quiet, "debug") is None
    assert audit_fast.event_writer(quiet, "info") is not None
    assert audit_fast.event_writer(structlog.get_logger(), "info") is None


def test_shapes_are_remembered_up_to_a_bound() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    for i in range(audit_fast.MAX_SHAPES + 10):
        in_fresh_context(writer, "m", {f"k{i}": i})
    assert len(writer._templates) == audit_fast.MAX_SHAPES
    assert [json.loads(x)[f"k{i}"] for i, x in enumerate(sink.lines)] == \
        list(range(audit_fast.MAX_SHAPES + 10))


# -- deferred writes ----------------------------------------------------------------------------


def wait_for(cond: Any, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "not written in time"
        time.sleep(0.005)


def test_file_sink_writer_thread_writes_deferred_lines_in_whole_batches(tmp_path: Path) -> None:
    path = tmp_path / "a" / "events.log"
    sink = FileSink(path)
    sink.write("info", "now")
    for i in range(50):
        sink.write_deferred(f"line-{i}")
    wait_for(lambda: path.read_text().count("\n") == 51)  # nobody flushed: its writer did
    assert path.read_text() == "now\n" + "".join(f"line-{i}\n" for i in range(50))
    sink.close()


def test_deferred_lines_wait_for_the_interval_and_close_writes_them(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    sink = FileSink(path)
    sink.INTERVAL = 60.0  # the writer holds them
    sink.write_deferred("one")
    sink.write_deferred("two")
    time.sleep(0.05)
    assert path.read_text() == ""
    assert sink.flush_deferred() == 2  # now, in this thread
    assert sink.flush_deferred() == 0
    assert path.read_text() == "one\ntwo\n"
    sink.write_deferred("three")
    t0 = time.monotonic()
    sink.close()  # shutdown writes what is left, without waiting out the interval
    assert time.monotonic() - t0 < 5.0
    assert path.read_text() == "one\ntwo\nthree\n"
    assert sink._writer is not None and not sink._writer.is_alive()


def test_a_large_batch_is_written_by_the_caller_at_once(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    sink = FileSink(path)
    sink.INTERVAL = 60.0
    line = "x" * 999
    n = FileSink.MAX_PENDING // 1000
    for _ in range(n + 1):
        sink.write_deferred(line)
    assert path.read_text() == (line + "\n") * (n + 1)  # whole lines only
    sink.close()


def test_stream_sink_defers_too() -> None:
    import io

    out = io.StringIO()
    sink = StreamSink(out)
    sink.INTERVAL = 60.0
    sink.write_deferred("a")
    assert out.getvalue() == ""
    sink.close()
    assert out.getvalue() == "a\n"


def test_the_logger_defers_only_while_a_data_plane_runs(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    log = make_logger(LoggingSettings(stdout=False, file=path))
    inner = log._logger  # type: ignore[attr-defined]
    assert isinstance(inner, SinkLogger)
    inner.sinks[0].INTERVAL = 60.0
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    in_fresh_context(writer, "first", {})
    assert len(path.read_text().splitlines()) == 1  # no data plane: written at once
    inner.defer_writes = True
    in_fresh_context(writer, "second", {})
    in_fresh_context(writer, "third", {})
    assert inner.pending and len(path.read_text().splitlines()) == 1
    log.warning("a denial")  # not deferred: written now, after the deferred ones
    got = [json.loads(x)["message"] for x in path.read_text().splitlines()]
    assert got == ["first", "second", "third", "a denial"]
    in_fresh_context(writer, "fourth", {})
    inner.flush_deferred(wait=True)
    assert not inner.pending
    assert len(path.read_text().splitlines()) == 5
    in_fresh_context(writer, "fifth", {})
    inner.defer_writes = False  # the data plane stops: its last flush writes them now
    inner.flush_deferred()
    assert len(path.read_text().splitlines()) == 6
    assert inner.healthy
    audit.close_logger(log)


def test_a_failing_batch_raises_the_alarm_and_makes_the_logger_unhealthy() -> None:
    """/dev/full: every write fails with ENOSPC, a full disk."""
    import io

    alarm = io.StringIO()
    full = FileSink(Path("/dev/full"))
    full.INTERVAL = 60.0
    inner = SinkLogger([full], alarm=alarm)
    inner.emit("info", "lost", None, defer=True)
    assert inner.healthy and inner.pending  # not known before it is written
    inner.flush_deferred(wait=True)
    assert not inner.healthy
    assert inner.failures == 1
    assert "log-sink-failed" in alarm.getvalue()
    for _ in range(3):
        inner.emit("info", "lost too", None, defer=True)
    inner.flush_deferred(wait=True)  # each lost line is counted, the alarm is raised once
    assert inner.failures == 4 and alarm.getvalue().count("log-sink-failed") == 1
    inner.close()


def test_the_writer_thread_reports_a_failure_and_the_recovery(tmp_path: Path) -> None:
    import io

    sink = FileSink(tmp_path / "events.log")
    inner = SinkLogger([sink], alarm=io.StringIO())
    real = sink._write_out
    broken = [True]

    def write_out(text: str) -> None:
        if broken[0]:
            raise OSError(28, "No space left on device")
        real(text)

    sink._write_out = write_out  # type: ignore[method-assign]
    inner.emit("info", "lost", None, defer=True)
    wait_for(lambda: not inner.healthy)
    broken[0] = False
    inner.emit("info", "kept", None, defer=True)
    wait_for(lambda: inner.healthy)
    assert (tmp_path / "events.log").read_text() == "kept\n"
    inner.close()


def test_a_failing_batch_is_not_unhealthy_when_another_sink_took_the_line() -> None:
    other = ListSink()
    full = FileSink(Path("/dev/full"))
    full.INTERVAL = 60.0
    inner = SinkLogger([full, other], alarm=__import__("io").StringIO())
    inner.emit("info", "kept", None, defer=True)
    inner.flush_deferred(wait=True)
    assert inner.healthy and other.lines[0] == "kept"
    # and the other sink learns that one destination is blind (the alarm goes to every sink
    # that still works)
    assert [json.loads(line)["event"]["action"] for line in other.lines[1:]] == [
        "log-sink-failed"]
    inner.close()


def test_deferred_and_direct_writes_from_two_threads_keep_lines_whole(tmp_path: Path) -> None:
    """The data-plane thread defers while the control plane writes its own lines: every line
    arrives whole, once."""
    path = tmp_path / "events.log"
    sink = FileSink(path)

    def plane() -> None:
        for i in range(2000):
            sink.write_deferred(f"deferred-{i}")

    t = threading.Thread(target=plane)
    t.start()
    for i in range(2000):
        sink.write("info", f"direct-{i}")
    t.join()
    sink.close()
    lines = path.read_text().splitlines()
    assert sorted(lines) == sorted([f"deferred-{i}" for i in range(2000)]
                                   + [f"direct-{i}" for i in range(2000)])


def batching_logger(path: Path) -> tuple[Any, SinkLogger, audit_fast.EventWriter]:
    """A file logger as the data plane runs it: deferring, this thread the batching one."""
    log = make_logger(LoggingSettings(stdout=False, file=path))
    inner = log._logger  # type: ignore[attr-defined]
    assert isinstance(inner, SinkLogger)
    inner.sinks[0].INTERVAL = 60.0  # type: ignore[union-attr]
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    inner.defer_writes = True
    inner.batch_thread = threading.get_ident()
    return log, inner, writer


READ = Access(3, Table.HOLDING_REGISTERS, (0, 10), None, (), None, 5)


def allowed_tids(path: Path) -> list[Any]:
    return [json.loads(x).get("modbus", {}).get("transaction_id", json.loads(x)["message"])
            for x in path.read_text().splitlines()]


def test_the_data_plane_thread_hands_a_pass_of_allowed_lines_over_at_once(
        tmp_path: Path) -> None:
    """On the data-plane thread the allowed lines wait in the logger's batch until the end
    of the loop pass (emit_batch); an event that thread logs meanwhile comes after them."""
    path = tmp_path / "events.log"
    log, inner, writer = batching_logger(path)
    for tid in (1, 2, 3):
        writer.allowed(tid, 1, 3, READ, 0.001, "r", "allow", "plc")
    assert len(inner.batch) == 3 and not inner.pending and path.read_text() == ""
    log.warning("a denial")  # written now, after the pass's allowed lines
    assert allowed_tids(path) == [1, 2, 3, "a denial"] and inner.batch == []
    for tid in (4, 5):
        writer.allowed(tid, 1, 3, READ, 0.001, "r", "allow", "plc")
    inner.emit_batch()  # the end of the pass: deferred to the writer thread
    assert inner.batch == [] and inner.pending and inner.healthy
    inner.flush_deferred(wait=True)
    assert allowed_tids(path) == [1, 2, 3, "a denial", 4, 5]
    # another thread (the control plane) never takes or flushes the data plane's batch
    writer.allowed(6, 1, 3, READ, 0.001, "r", "allow", "plc")
    other = threading.Thread(target=lambda: writer.allowed(7, 1, 3, READ, 0.001, "r",
                                                           "allow", "plc"))
    other.start()
    other.join()
    assert len(inner.batch) == 1
    inner.emit_batch()
    inner.flush_deferred(wait=True)
    assert sorted(allowed_tids(path)[-2:]) == [6, 7]
    audit.close_logger(log)


def test_a_batch_a_sink_refuses_raises_the_alarm_for_each_line() -> None:
    import io

    alarm = io.StringIO()
    sink = FileSink(Path("/dev/null"))

    def refuse(lines: list[str]) -> None:
        raise OSError(28, "No space left on device")

    sink.write_deferred_lines = refuse  # type: ignore[method-assign]
    inner = SinkLogger([sink], alarm=alarm)
    assert inner.batches("info")
    inner.batch_thread = threading.get_ident()
    inner.batch += ["a", "b", "c"]
    inner.emit_batch()
    assert not inner.healthy and inner.failures == 3 and not inner.pending
    assert alarm.getvalue().count("log-sink-failed") == 1
    inner.close()


def test_a_named_json_file_sink_takes_the_data_planes_batches(tmp_path: Path) -> None:
    """A ``[[logging.sinks]]`` json file sink (wrapped in its name) defers like the main file
    sink, so the pass's lines are batched to it too: it must take them (it used to lack the
    batch hand-over, and every pass's lines were lost to a sink-failure alarm)."""
    import io

    path = tmp_path / "named.log"
    log = make_logger(LoggingSettings(stdout=False, sinks=[
        SinkSettings(type="file", path=path, name="siem")]))
    inner = log._logger  # type: ignore[attr-defined]
    assert isinstance(inner, SinkLogger) and inner.batches("info")
    inner._alarm = io.StringIO()
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    inner.defer_writes = True
    inner.batch_thread = threading.get_ident()
    for tid in (1, 2):
        writer.allowed(tid, 1, 3, READ, 0.001, "r", "allow", "plc")
    assert len(inner.batch) == 2
    inner.emit_batch()
    inner.flush_deferred(wait=True)
    assert allowed_tids(path) == [1, 2]
    assert inner.healthy and inner.failures == 0 and inner._alarm.getvalue() == ""
    audit.close_logger(log)


def test_lines_are_batched_only_where_every_sink_defers() -> None:
    """A sink that writes at once, or formats events itself, keeps the per-line path."""
    deferring = FileSink(Path("/dev/null"))
    assert SinkLogger([deferring]).batches("info")
    assert not SinkLogger([deferring, ListSink()]).batches("info")
    assert not SinkLogger([deferring, EventListSink()]).batches("info")
    # a sink above the level does not count; no sink at all wants it: nothing to batch
    assert SinkLogger([deferring, ListSink()], levels=[0, 30]).batches("info")
    assert not SinkLogger([deferring], levels=[30]).batches("info")
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    inner = log._logger  # type: ignore[attr-defined]
    writer = audit_fast.event_writer(log, "info")
    assert writer is not None
    inner.defer_writes = True
    inner.batch_thread = threading.get_ident()
    writer.allowed(9, 1, 3, READ, 0.001, "r", "allow", "plc")
    assert inner.batch == [] and json.loads(sink.lines[-1])["modbus"]["transaction_id"] == 9
    deferring.close()


# -- the control plane's per-connection events (ConnectionLines) --------------------------------

IDENTITIES = st.builds(
    PeerIdentity, st.text(max_size=8).map(lambda s: f"CN={s}"), st.text(max_size=8),
    st.lists(st.text(max_size=4), max_size=2).map(tuple),
    st.lists(st.text(max_size=6), max_size=2).map(tuple),
    st.lists(st.sampled_from(["10.0.0.5", "::1"]), max_size=2).map(tuple),
    st.lists(st.text(max_size=6), max_size=1).map(tuple), st.text(max_size=8),
    st.integers(0, 2**128), st.sampled_from(["ab" * 32, "cd" * 32]),
    st.just(dt.datetime(2026, 1, 1, tzinfo=dt.UTC)),
    st.just(dt.datetime(2027, 1, 1, tzinfo=dt.UTC)), st.one_of(st.none(), st.text(max_size=8)))
CONNECTIONS = st.tuples(st.integers(1, 2**40), st.one_of(st.none(), st.sampled_from(
    ["127.0.0.1", "10.1.2.3", "::1"])), st.one_of(st.none(), st.integers(0, 65535)),
    st.one_of(st.none(), st.just("127.0.0.1")), st.one_of(st.none(), st.integers(0, 65535)))
CLOSE = st.tuples(st.sampled_from(list(events.CLOSE_REASONS)), st.floats(0, 1e5),
                  *(st.integers(0, 2**40) for _ in range(6)))


def connection_event_lines(log: Any, sink: ListSink, lines: audit_fast.ConnectionLines,
                           identity: PeerIdentity, roles: list[str],
                           conns: list[tuple[Any, ...]], took: float, version: str,
                           cipher: str | None, close: tuple[Any, ...],
                           extra: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """For each connection, in a task context of its own as the session's: (reference line,
    template line) of its accepted event and of its closed event."""
    pairs = []
    for conn in conns:
        def run(conn: tuple[Any, ...] = conn) -> None:
            if extra:
                structlog.contextvars.bind_contextvars(**extra)
            structlog.contextvars.bind_contextvars(**events.connection_context(*conn))
            structlog.contextvars.bind_contextvars(**events.peer_context(identity, roles))
            key = (identity.fingerprint_sha256, tuple(roles))
            for ev, k in ((events.tls_handshake_accepted(took, identity, version, cipher,
                                                         False), ("accepted", key)),
                          (events.connection_closed(*close), ("closed", key))):
                events.emit(log, ev)
                lines.write(log, ev, k)
        contextvars.Context().run(run)
        got = sink.lines[:]
        sink.lines.clear()
        pairs += [(got[0], got[1]), (got[2], got[3])]
    return pairs


@settings(max_examples=200, deadline=None)
@given(identity=IDENTITIES, roles=st.lists(st.text(max_size=6), max_size=3),
       conns=st.lists(CONNECTIONS, min_size=1, max_size=3), took=st.floats(0, 100),
       version=st.sampled_from(["TLSv1.2", "TLSv1.3"]),
       cipher=st.one_of(st.none(), st.sampled_from(["ECDHE-ECDSA-AES128-GCM-SHA256"])),
       close=CLOSE, extra=st.one_of(st.none(), CONTEXT), bound=CONTEXT)
def test_connection_lines_are_the_structlog_lines(
    identity: PeerIdentity, roles: list[str], conns: list[tuple[Any, ...]], took: float,
    version: str, cipher: str | None, close: tuple[Any, ...], extra: dict[str, Any] | None,
    bound: dict[str, Any],
) -> None:
    """Every connection of one certificate shares a template; the line is structlog's, byte
    for byte but the clock, whatever else is bound in the logger or the contextvars (those
    with dicts or non-JSON values are left to the logger)."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink]).bind(**bound)
    lines = audit_fast.connection_lines(log)
    assert lines is not None
    for ref, fast in connection_event_lines(log, sink, lines, identity, roles, conns, took,
                                            version, cipher, close, extra):
        assert unstamped(fast) == unstamped(ref)


def taken(sink: ListSink) -> tuple[str, str]:
    """The two lines just written (the reference's, then the template's); the sink emptied."""
    ref, fast = sink.lines
    sink.lines.clear()
    return ref, fast


def test_connections_of_one_certificate_share_the_template() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    lines = audit_fast.connection_lines(log)
    assert lines is not None
    conns = [(i, "10.0.0.7", 40000 + i, "10.0.0.1", 802) for i in range(1, 5)]
    pairs = connection_event_lines(log, sink, lines, peer(), ["operator"], conns, 0.002,
                                   "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256",
                                   ("client_closed", 1.5, 10, 20, 1, 1, 0, 0))
    assert lines.built == 2  # one per event, for all four connections
    assert [json.loads(f)["mbsec"]["conn_id"] for _r, f in pairs] == [1, 1, 2, 2, 3, 3, 4, 4]
    for ref, fast in pairs:
        assert unstamped(fast) == unstamped(ref)
    # another role set for the same certificate (a reload): checked, not trusted
    pairs = connection_event_lines(log, sink, lines, peer(), ["engineer"], conns[:1], 0.002,
                                   "TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256",
                                   ("idle_timeout", 1.5, 10, 20, 1, 1, 0, 0))
    for ref, fast in pairs:
        assert unstamped(fast) == unstamped(ref)
        assert json.loads(fast)["user"]["roles"] == ["engineer"]


def test_a_stale_key_rebuilds_instead_of_writing_the_wrong_line() -> None:
    """The caller's key only picks a template: an event that differs from it outside the
    slots (here a key that forgets the roles) gets a template of its own."""
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    lines = audit_fast.connection_lines(log)
    assert lines is not None
    for roles in (["operator"], ["engineer"], ["operator"]):
        def run(roles: list[str] = roles) -> None:
            structlog.contextvars.bind_contextvars(**events.connection_context(
                1, "10.0.0.7", 4000, "10.0.0.1", 802))
            structlog.contextvars.bind_contextvars(**events.peer_context(peer(), roles))
            ev = events.connection_closed("client_closed", 1.0, 1, 2, 3, 3, 0, 0)
            events.emit(log, ev)
            lines.write(log, ev, "same key")
        contextvars.Context().run(run)
        ref, fast = taken(sink)
        assert unstamped(fast) == unstamped(ref)
        assert json.loads(fast)["user"]["roles"] == roles


def test_connection_lines_leave_what_a_template_cannot_stand_for_to_the_logger() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    lines = audit_fast.connection_lines(log)
    assert lines is not None

    def run(extra: dict[str, Any], reason: Any) -> None:
        structlog.contextvars.bind_contextvars(**extra)
        ev = events.connection_closed("client_closed", 1.0, 1, 2, 3, 3, 0, 0)
        ev.fields["event.reason"] = reason
        events.emit(log, ev)
        lines.write(log, ev, "k")

    for extra, reason in (({"mbsec.conn_id": {"x": 1}}, "client_closed"),  # a dict: merged
                          ({"mbsec.conn_id": 1.5}, "client_closed"),  # a float slot
                          ({"mbsec.conn_id": 2}, {"nested": 1}),  # a dict slot
                          ({"mbsec.conn_id": 3}, True)):  # a bool slot
        contextvars.Context().run(run, extra, reason)
        ref, fast = taken(sink)
        assert unstamped(fast) == unstamped(ref)
    # a slot a later key hides: a dict there would be merged into that key's object
    for reason in ("client_closed", {"y": 2}):
        def hidden(reason: Any = reason) -> None:
            ev = events.connection_closed("client_closed", 1.0, 1, 2, 3, 3, 0, 0)
            ev.fields["event.reason"] = reason
            ev.fields["event.reason.x"] = 1
            events.emit(log, ev)
            lines.write(log, ev, "hidden")
        contextvars.Context().run(hidden)
        ref, fast = taken(sink)
        assert unstamped(fast) == unstamped(ref)
    # no lines for a console logger, nor for one that is not make_logger's
    assert audit_fast.connection_lines(
        make_logger(LoggingSettings(stdout=False, format="console"))) is None
    assert audit_fast.connection_lines(structlog.get_logger()) is None


def test_connection_lines_at_a_level_the_logger_drops_write_nothing() -> None:
    sink = ListSink()
    log = make_logger(LoggingSettings(stdout=False, level="warning"), extra_sinks=[sink])
    lines = audit_fast.connection_lines(log)
    assert lines is not None
    lines.write(log, events.connection_closed("client_closed", 1.0, 1, 2, 3, 3, 0, 0), "k")
    assert sink.lines == []


def test_connection_lines_give_formatting_sinks_the_reference_event() -> None:
    sink = EventListSink()
    log = make_logger(LoggingSettings(stdout=False), extra_sinks=[sink])
    lines = audit_fast.connection_lines(log)
    assert lines is not None
    connection_event_lines(log, sink, lines, peer(), ["operator"],
                           [(9, "10.0.0.7", 4000, "10.0.0.1", 802)], 0.01, "TLSv1.3",
                           "TLS_AES_128_GCM_SHA256", ("client_reset", 2.0, 1, 2, 3, 3, 0, 0))
    assert len(sink.got) == 4
    for ref_event, fast_event in (sink.got[0:2], sink.got[2:4]):
        ref_event.pop("@timestamp")
        fast_event.pop("@timestamp")
        assert json.dumps(fast_event) == json.dumps(ref_event)


class FailingSink(ListSink):
    def write(self, level: str, line: str) -> None:
        raise OSError(28, "No space left on device")


def test_connection_lines_keep_the_sink_failure_rule() -> None:
    """A sink that raises: the caller never sees it, the alarm goes to the other sinks, the
    logger turns unhealthy, exactly as through the chain."""
    outcomes = []
    for fast in (False, True):
        good, alarm = ListSink(), unittest.mock.Mock()
        log = make_logger(LoggingSettings(stdout=False), extra_sinks=[FailingSink(), good])
        inner = log._logger  # type: ignore[attr-defined]
        inner._alarm = alarm
        lines = audit_fast.connection_lines(log)
        assert lines is not None
        ev = events.connection_closed("client_closed", 1.0, 1, 2, 3, 3, 0, 0)
        if fast:
            lines.write(log, ev, "k")
        else:
            events.emit(log, ev)
        outcomes.append((inner.healthy, inner.failures, len(good.lines),
                         [json.loads(x)["event"]["action"] for x in good.lines]))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][3] == ["log-sink-failed", "connection-closed"]
