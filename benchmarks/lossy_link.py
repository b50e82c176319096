"""A lossy IP link to a network namespace, in userspace (this kernel has no netem).

::

    host                                    namespace fl-ns-K (the PLC lives here)
    10.213.K.5  fl-t0-K (TUN)               fl-t1-K (TUN)  10.213.K.6
         |  forwarder (host)                      |  forwarder (in the namespace)
         |  drops `loss` of host->PLC packets     |  drops `loss_back` of PLC->host packets
         +-- UDP 10.213.K.1:4789 == veth fl-v0-K/fl-v1-K == UDP 10.213.K.2:4789 --+

Every IP packet routed to 10.213.K.6 leaves through the host TUN device; the host forwarder
reads it, drops a set share (seeded), and sends the rest as one UDP datagram over the veth pair;
the forwarder in the namespace writes it into its TUN device, where the namespace's stack
receives it. The way back is the same. TCP between the two sides sees real loss: real
retransmissions, real RTO back-off, counted in ``TCP_INFO``.

Use it from a benchmark or a test (root needed: namespaces, TUN, veth)::

    with LossyLink(loss=0.05) as link:
        plc = link.spawn(["mbplc", "--bind", link.plc_ip, "--port", "502"])
        ...  # connect to (link.plc_ip, 502) from the host
        print(link.counters())  # packets forwarded / dropped each way
        link.cut()              # every packet dropped from now on (again: restored)

Everything is named ``fl-...-K`` (K picked so that no existing address collides) and torn down
by name and pid on the way out, also after an error. ``python benchmarks/lossy_link.py
forward ...`` is the forwarder process itself (started by :class:`LossyLink`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

PORT = 4789
MTU = 1400  # the UDP encapsulation (28 bytes) must fit the veth's 1500
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


def missing_requirements() -> list[str]:
    """What this host lacks to build the link (empty: it can)."""
    return [what for what, ok in (
        ("root", os.geteuid() == 0), ("/dev/net/tun", Path("/dev/net/tun").exists()),
        ("iproute2", shutil.which("ip") is not None)) if not ok]


def tcp_total_retrans(sock: socket.socket) -> int:
    """``tcpi_total_retrans`` from ``TCP_INFO``: segments this socket has retransmitted."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("<24I", raw, 8)[23])


def tcp_rto_us(sock: socket.socket) -> int:
    """``tcpi_rto``: the socket's current retransmission timeout in microseconds."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("<24I", raw, 8)[0])


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _free_index() -> int:
    """A K in 10.213.K.0/24 that no interface of this host uses (and no fl- netns)."""
    used = _ip("-o", "addr", "show").stdout
    namespaces = _ip("netns", "list").stdout
    start = os.getpid() % 200
    for i in range(200):
        k = 20 + (start + i) % 200
        if f"10.213.{k}." not in used and f"fl-ns-{k} " not in namespaces + " ":
            return k
    raise RuntimeError("no free 10.213.K.0/24 for a lossy link")


class LossyLink:
    """The namespace, the veth pair, two TUN devices and the two forwarders (see module doc)."""

    def __init__(self, loss: float = 0.0, loss_back: float | None = None, *,
                 seed: int = 1, work: Path | None = None) -> None:
        if not (0.0 <= loss < 1.0 and 0.0 <= (loss if loss_back is None else loss_back) < 1.0):
            raise ValueError("loss is a share in [0, 1)")
        self.loss = loss
        self.loss_back = loss if loss_back is None else loss_back
        self.seed = seed
        self.k = -1
        self.work = work
        self._forwarders: list[subprocess.Popen[bytes]] = []
        self._spawned: list[subprocess.Popen[Any]] = []
        self._stats: list[Path] = []
        self._own_work: Path | None = None

    # names, once ``k`` is chosen
    @property
    def ns(self) -> str:
        return f"fl-ns-{self.k}"

    @property
    def host_ip(self) -> str:
        return f"10.213.{self.k}.5"

    @property
    def plc_ip(self) -> str:
        return f"10.213.{self.k}.6"

    def _names(self) -> tuple[str, str, str, str]:
        return f"fl-v0-{self.k}", f"fl-v1-{self.k}", f"fl-t0-{self.k}", f"fl-t1-{self.k}"

    def __enter__(self) -> LossyLink:
        self.k = _free_index()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _create(self) -> None:
        v0, v1, t0, t1 = self._names()
        k, ns = self.k, self.ns
        _ip("netns", "add", ns)
        _ip("link", "add", v0, "type", "veth", "peer", "name", v1)
        _ip("link", "set", v1, "netns", ns)
        _ip("addr", "add", f"10.213.{k}.1/30", "dev", v0)
        _ip("link", "set", v0, "up")
        _ip("-n", ns, "addr", "add", f"10.213.{k}.2/30", "dev", v1)
        _ip("-n", ns, "link", "set", v1, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        for netns, tun, local, peer in ((None, t0, self.host_ip, self.plc_ip),
                                        (ns, t1, self.plc_ip, self.host_ip)):
            pre = ["-n", netns] if netns else []
            _ip(*pre, "tuntap", "add", "dev", tun, "mode", "tun")
            _ip(*pre, "link", "set", tun, "mtu", str(MTU))
            _ip(*pre, "addr", "add", local, "peer", peer, "dev", tun)
            _ip(*pre, "link", "set", tun, "up")
        if self.work is None:  # ours: removed on close
            self._own_work = Path(tempfile.mkdtemp(prefix=f"fl-link-{k}-"))
        work = self.work or self._own_work
        work.mkdir(parents=True, exist_ok=True)
        me = [sys.executable, str(Path(__file__).resolve()), "forward"]
        for netns, tun, local, remote, loss, seed in (
                (None, t0, f"10.213.{k}.1", f"10.213.{k}.2", self.loss, self.seed),
                (ns, t1, f"10.213.{k}.2", f"10.213.{k}.1", self.loss_back, self.seed + 1)):
            stats = work / f"{tun}.stats"
            self._stats.append(stats)
            argv = [*me, "--tun", tun, "--local", local, "--remote", remote,
                    "--loss", str(loss), "--seed", str(seed), "--stats", str(stats)]
            if netns:
                argv = ["ip", "netns", "exec", netns, *argv]
            self._forwarders.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while not all(s.exists() for s in self._stats):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self._forwarders):
                raise RuntimeError("the lossy link's forwarders did not start")
            time.sleep(0.02)

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process inside the namespace; it is killed (by pid) on close."""
        proc: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, *argv], **kw)
        self._spawned.append(proc)
        return proc

    def ns_run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a short command in the namespace (``ip route ...``), checked."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=True,
                              capture_output=True, text=True)

    def set_rto_min(self, ms: int | None, *, host: bool = True, plc: bool = True) -> None:
        """Per-route ``rto_min`` on the routes through the link (``None``: the default 200 ms)."""
        _, _, t0, t1 = self._names()
        extra = ["rto_min", f"{ms}ms"] if ms is not None else []
        if host:
            _ip("route", "replace", self.plc_ip, "dev", t0, "src", self.host_ip, *extra)
        if plc:
            _ip("-n", self.ns, "route", "replace", self.host_ip, "dev", t1, "src", self.plc_ip,
                *extra)

    def cut(self) -> None:
        """Cut the link both ways (every packet dropped) or, called again, restore it: the
        PLC vanished, as a pulled cable or a dead switch port looks to TCP."""
        for p in self._forwarders:
            p.send_signal(signal.SIGUSR1)
        time.sleep(0.05)

    def counters(self) -> dict[str, int]:
        """Packets forwarded and dropped each way so far (the forwarders write them when idle
        for 50 ms, or every 50 ms under load: this waits that long)."""
        time.sleep(0.12)
        out: dict[str, int] = {}
        for name, path in zip(("to_plc", "from_plc"), self._stats, strict=True):
            fwd, drop = (int(x) for x in path.read_text().split())
            out[f"{name}_forwarded"] = fwd
            out[f"{name}_dropped"] = drop
        return out

    def close(self) -> None:
        for p in [*self._spawned, *self._forwarders]:
            if p.poll() is None:
                p.terminate()
        for p in [*self._spawned, *self._forwarders]:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.k < 0:
            return
        v0, _, t0, _ = self._names()
        _ip("netns", "del", self.ns, check=False)  # takes fl-t1 and the veth peer with it
        _ip("link", "del", v0, check=False)
        _ip("tuntap", "del", "dev", t0, "mode", "tun", check=False)
        if self._own_work is not None:
            shutil.rmtree(self._own_work, ignore_errors=True)


# -- the forwarder process -------------------------------------------------------------------


def _open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TUN | _IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def forward(tun: str, local: str, remote: str, loss: float, seed: int, stats: Path) -> None:
    """TUN -> (drop ``loss``) -> UDP to ``remote``; UDP from ``remote`` -> TUN. Until SIGTERM."""
    fd = _open_tun(tun)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((local, PORT))
    udp.setblocking(False)
    rng = random.Random(seed)
    forwarded = dropped = 0
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    cut = False

    def toggle_cut(*_: object) -> None:
        nonlocal cut
        cut = not cut

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, toggle_cut)
    stats.write_text("0 0\n")
    written = time.monotonic()
    last = (0, 0)
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    poller.register(udp.fileno(), select.EPOLLIN)
    while running:
        try:
            ready = poller.poll(0.05)
        except InterruptedError:
            continue
        for rfd, _ in ready:
            if rfd == fd:
                while True:
                    try:
                        pkt = os.read(fd, 65535)
                    except BlockingIOError:
                        break
                    if cut or rng.random() < loss:
                        dropped += 1
                        continue
                    forwarded += 1
                    with contextlib.suppress(OSError):  # a full socket buffer is loss too
                        udp.sendto(pkt, (remote, PORT))
            else:
                while True:
                    try:
                        pkt = udp.recv(65535)
                    except BlockingIOError:
                        break
                    with contextlib.suppress(OSError):
                        os.write(fd, pkt)
        now = time.monotonic()
        if (not ready or now - written > 0.05) and (forwarded, dropped) != last:
            last = (forwarded, dropped)
            tmp = stats.with_suffix(".tmp")
            tmp.write_text(f"{forwarded} {dropped}\n")
            tmp.replace(stats)
            written = now
    stats.write_text(f"{forwarded} {dropped}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("forward", help="one side's forwarder (started by LossyLink)")
    f.add_argument("--tun", required=True)
    f.add_argument("--local", required=True)
    f.add_argument("--remote", required=True)
    f.add_argument("--loss", type=float, default=0.0)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--stats", type=Path, required=True)
    args = p.parse_args(argv)
    forward(args.tun, args.local, args.remote, args.loss, args.seed, args.stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
