"""The threaded data plane's own guarantees that end-to-end request tests do not reach:
a dead loop stops the proxy (exit 1) instead of leaving it accepting and never answering."""

from __future__ import annotations

import threading

import pytest
import trio
from conftest import ScriptedPlc, StartProxy


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
    ev = await h.wait_event("data-plane-error")
    assert ev["log.level"] == "critical" and ev["error.type"] == "ValueError"
    with trio.fail_after(5):
        while not h.proxy._shutdown.is_set():
            await trio.sleep(0.01)
    assert h.proxy.failed
    with trio.fail_after(5):  # serve() returns, the thread is gone
        while any(t.name == "mbsec-data-plane" for t in threading.enumerate()):
            await trio.sleep(0.01)
