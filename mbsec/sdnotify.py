"""systemd's notify protocol (sd_notify(3)), the watchdog and socket activation
(sd_listen_fds(3)), written out: no libsystemd.

The protocol is one datagram per message, newline-separated ``KEY=value`` lines, sent to the
unix socket named in ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading
``@``). ``mbsec serve`` sends ``READY=1`` once it listens, ``RELOADING=1`` then ``READY=1``
around a SIGHUP reload, ``STOPPING=1`` when it starts draining, ``STATUS=`` lines for
``systemctl status``, and ``WATCHDOG=1`` every half ``$WATCHDOG_USEC``, but only while the
data-plane thread answers: a loop that is wedged (a handler that never returns) would accept
connections in trio and answer none, and systemd then restarts the service (``WatchdogSec=``).
Without ``$NOTIFY_SOCKET`` every call is a no-op, so nothing changes outside systemd.

Socket activation (``deploy/systemd/mbsec.socket``): systemd binds port 802 and hands the
listening sockets over (``$LISTEN_FDS`` from fd 3, for ``$LISTEN_PID``), so the proxy needs no
capability and can run in its own user namespace (``PrivateUsers=yes``), and connections that
arrive while it restarts wait in the backlog instead of being refused.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Protocol

import trio

__all__ = ["Notifier", "PlaneProbe", "WorkerRelay", "keep_watchdog", "listen_sockets"]


class Notifier:
    """Sends notify messages to one socket; never raises (systemd is not worth a crash)."""

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = address
        #: microseconds systemd waits between two ``WATCHDOG=1`` before it kills the service
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """Read and remove ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (as
        ``sd_notify(unset_environment=1)`` does: a child process must not talk for us).
        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or this process."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) or None
        usec_text = env.pop("WATCHDOG_USEC", "")
        pid = env.pop("WATCHDOG_PID", "")
        usec: int | None = None
        if usec_text.isdigit() and int(usec_text) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(usec_text)
        return cls(address, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1``: half the timeout, as sd_watchdog_enabled(3)
        recommends; None when systemd watches nothing."""
        if self.watchdog_usec is None or not self.enabled:
            return None
        return self.watchdog_usec / 2e6

    def _target(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):  # abstract namespace: a leading NUL byte
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, *lines: str) -> bool:
        """One datagram of ``KEY=value`` lines; False when not under systemd or it failed."""
        if self.address is None or not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self._target())
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC: systemd >= 253 (Type=notify-reload) requires it with RELOADING=1
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")

    def stopping(self, status: str = "draining") -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


LISTEN_FDS_START = 3


def listen_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The listening sockets systemd passed (and remove ``LISTEN_*`` from the environment, so
    that a worker process does not take them for its own); empty when none were passed to
    this process. ``ValueError`` for a passed descriptor that is not a listening TCP socket."""
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    env.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        if (sock.family not in (socket.AF_INET, socket.AF_INET6)
                or sock.type != socket.SOCK_STREAM
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            sock.detach()  # not ours to close
            raise ValueError(f"socket activation: descriptor {fd} is not a listening TCP socket "
                             "(ListenStream= in the .socket unit)")
        socks.append(sock)
    return socks


class CallsThreadsafe(Protocol):
    """What a probe needs of :class:`mbsec.path.epoll.DataPlane`."""

    def call_threadsafe(self, fn: Callable[[], None]) -> bool: ...


class PlaneProbe:
    """Asks the data-plane thread to run a no-op that hands the answer back to trio.

    One question is outstanding at a time: while the loop is wedged, later probes wait for the
    same answer instead of piling calls up in its queue.
    """

    def __init__(self, plane: CallsThreadsafe) -> None:
        self._plane = plane
        self._answer: trio.Event | None = None

    async def answers(self, within: float) -> bool:
        """True when the loop ran our call within ``within`` seconds."""
        if self._answer is None:
            answer = trio.Event()
            token = trio.lowlevel.current_trio_token()

            def pong() -> None:  # in the data-plane thread
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(answer.set)

            if not self._plane.call_threadsafe(pong):
                return False  # the plane has stopped
            self._answer = answer
        answer = self._answer
        with trio.move_on_after(within):
            await answer.wait()
        if answer.is_set():
            self._answer = None
            return True
        return False


async def keep_watchdog(
    notifier: Notifier,
    alive: Callable[[float], Awaitable[bool]],
    *,
    serving_status: Callable[[], str],
) -> None:
    """Send ``WATCHDOG=1`` every :attr:`Notifier.watchdog_interval` while ``alive(seconds)``
    (which waits at most that long) says so; when it stops answering, no ``WATCHDOG=1`` and a
    ``STATUS=`` line saying why, so that systemd's kill is explained in ``systemctl status``.
    Returns at once when systemd set no watchdog."""
    interval = notifier.watchdog_interval
    if interval is None:
        return
    healthy = True
    while True:
        start = trio.current_time()
        ok = await alive(interval)
        if ok:
            notifier.watchdog()
            if not healthy:
                notifier.status(serving_status())
        elif healthy:
            notifier.status(f"data plane not answering for {interval:g} s; no WATCHDOG=1")
        healthy = ok
        await trio.sleep_until(start + interval)


class WorkerRelay:
    """With ``workers > 1`` the main process is the one systemd listens to
    (``NotifyAccess=main``), so it speaks for its workers: each worker notifies a socket of
    the main process (an autobound abstract name), which sends ``READY=1`` once every worker is
    ready (again after a reload), and ``WATCHDOG=1`` only once every worker sent one since the
    last: one wedged worker is enough for systemd to restart the set. Senders are told apart
    by their kernel-checked pid (``SO_PASSCRED``)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.workers: dict[int, int] = {}  # pid -> worker index
        self._ready: set[int] = set()
        self._watched: set[int] = set()
        self._announced = False
        self._sock: socket.socket | None = None
        if notifier.enabled:
            sock = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            sock.bind("")  # Linux autobind: a unique abstract name
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock = sock

    def worker_environment(self) -> dict[str, str]:
        """What a worker's environment gets instead of ours (empty: not under systemd)."""
        if self._sock is None:
            return {}
        name: bytes = self._sock.getsockname()
        env = {"NOTIFY_SOCKET": "@" + name[1:].decode()}
        if self.notifier.watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self.notifier.watchdog_usec)
        return env

    def reloading(self) -> None:
        self._ready.clear()
        self._announced = False
        self.notifier.reloading()

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for worker messages and act on them."""
        if self._sock is None:
            time.sleep(timeout)
            return
        readable, _, _ = select.select([self._sock], [], [], timeout)
        while readable:
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            pid = next((int.from_bytes(d[:4], "little", signed=True)
                        for level, kind, d in ancdata
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), -1)
            if pid in self.workers:
                self._handle(pid, data.decode(errors="replace").split("\n"))

    def _handle(self, pid: int, lines: list[str]) -> None:
        alive = set(self.workers)
        for line in lines:
            if line == "READY=1":
                self._ready.add(pid)
                if not self._announced and self._ready >= alive:
                    self._announced = True
                    self.notifier.ready(f"serving with {len(alive)} workers")
            elif line == "WATCHDOG=1":
                self._watched.add(pid)
                if self._watched >= alive:
                    self._watched.clear()
                    self.notifier.watchdog()
            elif line.startswith("STATUS=") and not line.startswith("STATUS=serving"):
                self.notifier.status(f"worker {self.workers[pid]}: {line[7:]}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
