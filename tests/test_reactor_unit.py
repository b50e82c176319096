"""The threaded data plane's own guarantees that end-to-end request tests do not reach:
a dead loop stops the proxy (exit 1) instead of leaving it accepting and never answering."""

from __future__ import annotations

import threading

import pytest
import trio
from conftest import Pki, ScriptedPlc, StartProxy, TlsClient, read_hr


@pytest.fixture
def data_plane() -> str:
    return "thread"


async def test_a_dead_data_plane_loop_stops_the_proxy_and_marks_it_failed(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    plane = h.proxy.data_plane
    assert plane is not None and not h.proxy.failed
    plane._ep.close()  # the loop's next epoll_wait raises: the loop itself dies
    plane.call_threadsafe(lambda: None)  # wake it
    ev = await h.wait_event("data-plane-error", lambda e: e["log.level"] == "critical")
    assert ev["error.type"] in ("ValueError", "OSError")  # closed before or during the wait
    with trio.fail_after(5):
        await h.proxy._shutdown.wait()
    assert h.proxy.failed
    with trio.fail_after(5):  # serve() returns, the thread is gone
        while any(t.name == "mbsec-data-plane" for t in threading.enumerate()):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_upstream_by_host_name_is_resolved_off_the_loop(
    pki: Pki, start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port, upstream={"host": "localhost"})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    assert await c.request(1, 1, read_hr(5, 1)) == (1, 1, bytes([3, 2, 0, 5]))
    assert len(plc.requests) == 1


async def test_unresolvable_upstream_name_gives_0x0a(
    pki: Pki, start_proxy: StartProxy
) -> None:
    h = await start_proxy(502, upstream={"host": "plc.invalid", "connect_timeout": 0.5})
    c = await TlsClient.connect(h.port, pki.client_ctx(pki.operator))
    with trio.fail_after(5):
        assert await c.request(1, 1, read_hr(0, 1)) == (1, 1, bytes([0x83, 0x0A]))
    ev = await h.wait_event("upstream-connect-failed")
    assert ev["event.reason"] in ("connect_failed", "connect_timeout")


def test_the_data_plane_is_compiled_unless_asked_not_to_be() -> None:
    """scripts/bootstrap.sh installs a C compiler and the Python headers, so setup.py's mypyc
    build must have produced the extension: a silent fallback to the interpreted module would
    cost a sixth of the throughput. MBSEC_PURE=1 (an install without the build) opts out."""
    import os

    from mbsec import reactor
    from mbsec.modbus import mbap

    if os.environ.get("MBSEC_PURE") == "1":
        pytest.skip("MBSEC_PURE=1: the interpreted data plane was asked for")
    assert reactor.compiled(), f"{reactor.__file__} is not the mypyc build"
    assert mbap.__file__.endswith(".so"), f"{mbap.__file__} is not the mypyc build"


async def test_server_start_says_which_data_plane_runs(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    from mbsec import reactor

    plc = ScriptedPlc()
    await nursery.start(plc.serve)
    h = await start_proxy(plc.port)
    ev = await h.wait_event("server-start")
    assert ev["mbsec.data_plane"] == "thread"
    assert ev["mbsec.data_plane_compiled"] is reactor.compiled()


def test_cancelled_timers_do_not_pile_up_in_the_heap() -> None:
    """Stall timers are cancelled within microseconds but would stay in the heap until due
    (``idle_timeout`` later); the heap is swept once it has doubled, so it stays bounded by
    about twice the live timers."""
    import os

    from mbsec.audit import null_logger
    from mbsec.metrics import NullMetrics
    from mbsec.reactor import TIMERS_COMPACT_MIN, DataPlane

    plane = DataPlane([], log=null_logger(), metrics=NullMetrics())
    try:
        live = [plane.timer(300.0, lambda: None) for _ in range(100)]
        for _ in range(50 * TIMERS_COMPACT_MIN):
            plane.timer(300.0, lambda: None).cancel()  # a socket that filled and drained
        assert len(plane._timers) <= 2 * TIMERS_COMPACT_MIN
        assert all(t.fn is not None for t in live)  # live timers are kept
        plane.compact_timers()
        assert len(plane._timers) == len(live)
        assert plane._timers[0][0] == min(t.when for t in live)  # still a heap
    finally:
        plane._ep.close()
        os.close(plane._wake_fd)
