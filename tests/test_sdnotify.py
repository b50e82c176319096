"""mbsec.sdnotify without a proxy: the environment it reads, the datagrams it sends to a real
socket, the worker relay's rule (one silent worker, no WATCHDOG=1) and socket activation's
checks. The end-to-end tests are in tests/e2e/test_systemd_service.py."""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from mbsec.sdnotify import Notifier, WorkerRelay, keep_watchdog, listen_sockets


@pytest.fixture
def manager() -> Iterator[tuple[socket.socket, str]]:
    """The service manager's notify socket (abstract name) and its $NOTIFY_SOCKET value."""
    name = f"systemd-ha-unit-{uuid.uuid4().hex[:12]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(0.3)
    yield s, "@" + name
    s.close()


def received(s: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(s.recv(4096).decode())
        except TimeoutError:
            return out


def test_environment_is_read_and_unset() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_environment(env)
    assert env == {}  # a child process must not speak for us
    assert n.watchdog_interval == 2.0
    other = Notifier.from_environment({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "4000000",
                                       "WATCHDOG_PID": "1"})
    assert other.enabled and other.watchdog_interval is None  # the watchdog is another pid's
    alone = Notifier.from_environment({"WATCHDOG_USEC": "1000000"})  # no socket: no-op
    assert not alone.enabled and alone.watchdog_interval is None and not alone.ready("x")


def test_messages_are_newline_separated_datagrams(manager: tuple[socket.socket, str]) -> None:
    s, address = manager
    n = Notifier(address)
    assert n.ready("serving x") and n.watchdog() and n.stopping()
    assert received(s) == ["READY=1\nSTATUS=serving x", "WATCHDOG=1",
                           "STOPPING=1\nSTATUS=draining"]
    assert not Notifier("@systemd-ha-nobody-listens").ready("x")  # never raises


def test_relay_speaks_only_once_every_worker_has(manager: tuple[socket.socket, str]) -> None:
    s, address = manager
    relay = WorkerRelay(Notifier(address, watchdog_usec=2_000_000))
    env = relay.worker_environment()
    assert env["WATCHDOG_USEC"] == "2000000" and env["NOTIFY_SOCKET"].startswith("@")
    worker = Notifier(env["NOTIFY_SOCKET"])  # this process plays worker 0 ...
    silent = 2**22 + 7  # ... and worker 1 says nothing (wedged)
    relay.workers = {os.getpid(): 0, silent: 1}
    worker.ready("serving 127.0.0.1:802 (configuration generation 0)")
    worker.watchdog()
    worker.send("READY=1", f"STATUS=x\nMAINPID={silent}")  # a sender's pid is the kernel's
    relay.poll(0.2)
    # one worker is not ready, nor alive, yet: only its status goes through, named
    assert received(s) == ["STATUS=worker 0: x"]
    worker.watchdog()
    relay.poll(0.2)
    assert received(s) == []
    relay._handle(silent, ["READY=1", "WATCHDOG=1"])  # worker 1 answers
    assert received(s) == ["READY=1\nSTATUS=serving with 2 workers", "WATCHDOG=1"]
    relay.reloading()
    worker.ready("serving")
    relay.poll(0.2)
    assert [m.split("\n")[0] for m in received(s)] == ["RELOADING=1"]  # READY waits for both
    relay.close()


def test_socket_activation_takes_only_its_own_listening_sockets() -> None:
    assert listen_sockets({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []  # another process's
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_sockets(env) == [] and env == {}
    # fd 3 not a listening TCP socket: one clear error
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as u:
        saved = os.dup(3) if _open(3) else None
        os.dup2(u.fileno(), 3)
        try:
            with pytest.raises(ValueError, match="descriptor 3 is not a listening TCP socket"):
                listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"})
        finally:
            if saved is not None:
                os.dup2(saved, 3)
                os.close(saved)
            else:
                os.close(3)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_path_socket_address(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(0.3)
        assert Notifier(str(path)).status("hello")
        assert received(s) == ["STATUS=hello"]


class Recorder(Notifier):
    """What would be sent, with the (simulated) time it was sent at."""

    def __init__(self, watchdog_usec: int) -> None:
        super().__init__("@unused", watchdog_usec=watchdog_usec)
        self.sent: list[tuple[float, tuple[str, ...]]] = []

    def send(self, *lines: str) -> bool:
        self.sent.append((trio.current_time(), lines))
        return True


async def test_watchdog_pings_only_while_the_plane_answers(autojump_clock: object) -> None:
    """On a simulated clock: WATCHDOG=1 every half timeout while the plane answers, none
    while it is wedged (3 s to 6 s here), one STATUS when it stops and one when it is back."""
    n = Recorder(watchdog_usec=1_000_000)  # interval 0.5 s
    wedged = (3.0, 6.0)

    async def alive(within: float) -> bool:
        now = trio.current_time()
        if wedged[0] <= now < wedged[1]:
            await trio.sleep(min(within, wedged[1] - now))
            return False
        return True

    with trio.move_on_after(9.0):
        await keep_watchdog(n, alive, serving_status=lambda: "serving x")
    pings = [t for t, lines in n.sent if lines == ("WATCHDOG=1",)]
    statuses = [(t, lines[0]) for t, lines in n.sent if lines[0].startswith("STATUS=")]
    assert not [t for t in pings if wedged[0] < t < wedged[1]]
    assert len([t for t in pings if t < wedged[0]]) == 6  # 0, 0.5, ..., 2.5
    assert len([t for t in pings if t >= wedged[1]]) >= 5
    assert all(b - a <= 0.5 + 1e-9 for a, b in itertools.pairwise(pings)
               if b <= wedged[0] or a >= wedged[1])
    assert [s for _, s in statuses] == [
        "STATUS=data plane not answering for 0.5 s; no WATCHDOG=1", "STATUS=serving x"]


async def test_no_watchdog_without_watchdog_usec() -> None:
    n = Recorder(watchdog_usec=0)
    n.watchdog_usec = None

    async def alive(within: float) -> bool:
        raise AssertionError("not asked")

    with trio.fail_after(1):
        await keep_watchdog(n, alive, serving_status=lambda: "x")  # returns at once
    assert n.sent == []
