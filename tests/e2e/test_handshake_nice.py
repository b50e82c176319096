"""``limits.handshake_nice``: in a real ``mbsec serve`` (one process, and each of two workers)
the thread that runs the handshakes (trio, the process's main thread) runs at the process's
nice value plus the setting, while the data-plane thread, the log writer and a remote sink's
sender keep the process's value, as the kernel reports them in /proc/PID/task/*/stat."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from conftest import Pki, TlsClient, serve_config, serve_process, unused_port


def threads_of(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread of ``pid``: its name (``comm``) and its nice value (``stat`` field 19)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        with open(f"{base}/comm", encoding="utf-8") as fh:
            name = fh.read().strip()
        with open(f"{base}/stat", encoding="utf-8") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(")") + 2:].split()  # field 3 (state) onwards
        out[int(tid)] = (name, int(fields[19 - 3]))
    return out


def assert_lowered(pid: int, base: int, steps: int) -> None:
    threads = threads_of(pid)
    by_name = {name: nice for tid, (name, nice) in threads.items() if tid != pid}
    assert threads[pid][1] == min(19, base + steps), threads  # trio: accept, handshakes
    # started before the trio thread was lowered, so they keep the process's value
    assert by_name["mbsec-dataplane"] == base, threads
    assert by_name["mbsec-logwriter"] == base, threads
    assert by_name["mbsec-sink-siem"] == base, threads


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("steps", [0, 10])
async def test_only_the_handshake_thread_is_lowered(
    pki: Pki, tmp_path: Path, workers: int, steps: int
) -> None:
    collector = unused_port()  # the sink's sender thread exists whether it connects or not
    cfg = serve_config(
        pki, tmp_path, unused_port(), workers=workers,
        extra=(f"handshake_nice = {steps}\n" if steps else "")
        + f'[[logging.sinks]]\ntype = "tcp"\naddress = "127.0.0.1:{collector}"\nname = "siem"\n')
    base = os.getpriority(os.PRIO_PROCESS, 0)  # what the child inherits from this thread
    async with serve_process(cfg) as out:
        starts = [await out.next_event("server-start") for _ in range(workers)]
        assert [s["mbsec"]["handshake_nice"] for s in starts] == [min(19 - base, steps)] * workers
        pid = out.proc.pid
        if workers == 1:
            assert_lowered(pid, base, steps)
        else:
            children = (await trio.Path(f"/proc/{pid}/task/{pid}/children").read_text()).split()
            assert len(children) == workers
            for child in children:
                assert_lowered(int(child), base, steps)
            # the main process only starts and watches the workers: left as it was
            assert {nice for _, nice in threads_of(pid).values()} == {base}
        # a lowered handshake thread still completes handshakes
        port = int(starts[0]["mbsec"]["listen"][0].rsplit(":", 1)[1])
        client = await TlsClient.connect(port, pki.client_ctx(pki.operator))
        await client.aclose()
        out.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await out.proc.wait() == 0
