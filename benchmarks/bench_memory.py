"""mbsec's memory: idle authenticated sessions, and rejected connections (issue 10, item 4).
Not run in CI.

``sessions``: ``--sessions`` (default 10,000) mutual-TLS clients connect to one ``mbsec serve``
(limits raised to fit, ``idle_timeout`` one hour), each sends one FC03 request (so the session
is in the data plane, not only handshaken) and then stays idle. The proxy's RSS (``VmRSS``) is
sampled at checkpoints, after all sessions are up, and again after they all closed;
``--rounds N`` does that N times in the same proxy (memory reused, or leaked?). The clients
run in ``--client-procs`` processes (the open file limit is raised to the hard limit first).

``rejections``: for ``--seconds`` (default 180), or until ``--count`` were rejected,
``--client-procs`` processes open TCP connections that are refused: one process makes TLS
clients without a certificate, one at a time; the others keep 48 connections each open at
once that send garbage instead of a ClientHello (``max_per_source = 32``, so many are refused
by the limits before any TLS). Each waits for mbsec to close, then resets (SO_LINGER 0: no
TIME_WAIT on the client side). RSS is sampled every ``--sample`` rejections; printed: the
start, the end, the growth per 100,000 rejections over the second half (the steady state),
and the extrapolation to a million.

``--tracemalloc N``: run mbsec under ``tracemalloc`` (N frames) and write its top allocation
sites (by size and by count) before and after each phase into the work directory (SIGUSR2 to
the proxy dumps them). Slower and bigger: only to find where memory goes.

    .venv/bin/python benchmarks/bench_memory.py sessions                  # ~4-5 minutes
    .venv/bin/python benchmarks/bench_memory.py rejections --seconds 300
    .venv/bin/python benchmarks/bench_memory.py rejections --seconds 7200 --count 1000000
    .venv/bin/python benchmarks/bench_memory.py sessions --sessions 5000 --rounds 3
    .venv/bin/python benchmarks/bench_memory.py sessions --sessions 1000 --tracemalloc 4
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import resource
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mbsec_stack import (
    KIT,
    Pki,
    fc03,
    free_port,
    make_pki,
    mbsec_serve,
    rss_kib,
    write_config,
)

#: garbage connections each rejection process keeps open at once
CONCURRENCY = 48

TRACED = """\
import gc, os, signal, sys, tracemalloc
tracemalloc.start({frames})
out = {out!r}
n = [0]
prev = []
def dump(*_):
    n[0] += 1
    before = tracemalloc.get_traced_memory()[0]
    gc.set_debug(gc.DEBUG_SAVEALL)  # keep the cyclic garbage to name its types
    unreachable = gc.collect()  # what is only garbage in cycles is not memory in use
    kinds = {{}}
    for o in gc.garbage:
        k = type(o).__module__ + "." + type(o).__qualname__
        kinds[k] = kinds.get(k, 0) + 1
    gc.garbage.clear()
    gc.set_debug(0)
    gc.collect()
    after_gc = tracemalloc.get_traced_memory()[0]
    snap = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    tmp = f"{{out}}/.tracemalloc-{{n[0]}}.tmp"
    with open(tmp, "w") as fh:
        cur, peak = tracemalloc.get_traced_memory()
        fh.write(f"gc.collect(): {{unreachable}} unreachable objects, traced "
                 f"{{before / 1048576:.1f}} -> {{after_gc / 1048576:.1f}} MiB\\n")
        for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:40]:
            fh.write(f"  cyclic garbage: {{v:8d}} {{k}}\\n")
        fh.write(f"traced by Python: {{cur / 1048576:.1f}} MiB now, ")
        fh.write(f"{{peak / 1048576:.1f}} MiB peak\\n")
        if prev:
            fh.write("== growth since the previous dump, by line\\n")
            for d in snap.compare_to(prev[0], "lineno")[:25]:
                fh.write(f"  {{d.size_diff / 1024:+10.1f}} KiB {{d.count_diff:+8d}} blocks  ")
                fh.write(f"{{d.traceback.format()[-1].strip()}}\\n")
        prev[:] = [snap]
        for key in ("traceback", "lineno"):
            stats = snap.statistics(key)
            fh.write(f"== top by size, grouped by {{key}}\\n")
            for s in stats[:25]:
                fh.write(f"{{s.size / 1024:10.1f}} KiB {{s.count:8d}} blocks\\n")
                for line in s.traceback.format()[-{frames}:]:
                    fh.write(f"      {{line}}\\n")
    os.rename(tmp, f"{{out}}/tracemalloc-{{n[0]}}.txt")
signal.signal(signal.SIGUSR2, dump)
from mbsec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def raise_nofile() -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def dump_tracemalloc(pid: int, work: Path, enabled: bool) -> None:
    if not enabled:
        return
    before = set(work.glob("tracemalloc-*.txt"))
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + 600
    while set(work.glob("tracemalloc-*.txt")) == before and time.monotonic() < deadline:
        time.sleep(0.5)


# -- sessions --------------------------------------------------------------------------------


def _hold_sessions(port: int, pki: Pki, n: int, up: Any, release: Any, failed: Any) -> None:
    """One client process: open ``n`` sessions, one request each, hold them until released."""
    raise_nofile()
    ctx = pki.client_ctx()
    socks = []
    for i in range(n):
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            s = ctx.wrap_socket(raw, server_hostname="localhost")
            s.sendall(fc03(i, 0, 1))
            reply = s.recv(64)
            if len(reply) < 9 or reply[7] != 3:
                failed.value += 1
            socks.append(s)
        except OSError:
            failed.value += 1
        with up.get_lock():
            up.value += 1
    release.wait()
    for s in socks:
        with contextlib.suppress(OSError):
            s.close()


def _session_round(args: argparse.Namespace, port: int, pki: Pki, pid: int, start_fds: int,
                   work: Path) -> tuple[int, int, int, int, float]:
    """Open ``--sessions`` sessions, sample, close them all: (opened, failed, RSS with all
    open, RSS after all closed, seconds to open)."""
    n = args.sessions
    up = mp.Value("i", 0)
    failed = mp.Value("i", 0)
    release = mp.Event()
    per = [n // args.client_procs + (1 if i < n % args.client_procs else 0)
           for i in range(args.client_procs)]
    procs = [mp.Process(target=_hold_sessions, args=(port, pki, k, up, release, failed))
             for k in per]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    marks = sorted({m for m in (1000, 2000, 5000, n) if m <= n})
    t_open = 0.0
    while marks:
        if up.value >= marks[0]:
            t_open = time.monotonic() - t0
            print(f"  {up.value} sessions ({failed.value} failed): RSS "
                  f"{rss_kib(pid) / 1024:.1f} MiB, {t_open:.0f} s", flush=True)
            marks.pop(0)
        elif not any(p.is_alive() for p in procs):
            break
        time.sleep(0.2)
    time.sleep(3)
    full = rss_kib(pid)
    dump_tracemalloc(pid, work, bool(args.tracemalloc))
    release.set()
    for p in procs:
        p.join()
    # closing thousands of sessions takes a while: wait until the proxy holds no more
    # descriptors than at the start (give or take its PLC links), then a little more
    t1 = time.monotonic()
    deadline = t1 + 300
    while fd_count(pid) > start_fds + 8 and time.monotonic() < deadline:
        time.sleep(0.5)
    closed_after = time.monotonic() - t1
    time.sleep(5)
    after = rss_kib(pid)
    print(f"  all closed {closed_after:.0f} s after the clients let go ({fd_count(pid)} "
          f"descriptors): RSS {after / 1024:.1f} MiB", flush=True)
    dump_tracemalloc(pid, work, bool(args.tracemalloc))
    return up.value, failed.value, full, after, t_open


def bench_sessions(args: argparse.Namespace, work: Path, pki: Pki, plc_port: int) -> int:
    n = args.sessions
    cfg, port = write_config(
        work, pki, "127.0.0.1", plc_port,
        limits=f"max_connections = {n + 100}\nmax_per_identity = {n + 100}\n"
               f"max_per_source = {n + 100}\nidle_timeout = 3600",
        upstream_extra="pool_size = 2")
    pre = ([sys.executable, "-c", TRACED.format(frames=args.tracemalloc, out=str(work))]
           if args.tracemalloc else None)
    server = _traced_serve(pre, cfg, port) if pre else mbsec_serve(cfg, port)
    rows = []
    with server as proc:
        time.sleep(1)
        start = rss_kib(proc.pid)
        start_fds = fd_count(proc.pid)
        print(f"mbsec pid {proc.pid}: RSS at start {start / 1024:.1f} MiB", flush=True)
        dump_tracemalloc(proc.pid, work, bool(args.tracemalloc))
        for r in range(args.rounds):
            print(f"round {r + 1}", flush=True)
            rows.append(_session_round(args, port, pki, proc.pid, start_fds, work))
    print("\n| round | sessions | failed | RSS start MiB | RSS with all open MiB | per session "
          "KiB | RSS after they closed MiB | time to open s |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, (opened, failed, full, after, t_open) in enumerate(rows, 1):
        per_session = (full - start) / max(1, opened - failed)
        print(f"| {r} | {opened} | {failed} | {start / 1024:.1f} | {full / 1024:.1f} | "
              f"{per_session:.1f} | {after / 1024:.1f} | {t_open:.0f} |")
    ok = all(failed == 0 and full < 1024 * 1024 for _, failed, full, _, _ in rows)
    print(f"\n{n} sessions under 1 GiB RSS: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


@contextlib.contextmanager
def _traced_serve(pre: list[str], cfg: Path, port: int) -> Any:
    from mbsec_stack import wait_listening

    proc = subprocess.Popen([*pre, "serve", "--config", str(cfg)], cwd=cfg.parent)
    try:
        wait_listening(port, proc, timeout=300)  # imports under tracemalloc are slow
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- rejections ------------------------------------------------------------------------------


def _reject_loop(port: int, ca: str, until: float, count: Any, index: int, stop: Any) -> None:
    """Process 0: TLS clients without a certificate, one at a time (a full handshake each).
    The others: ``CONCURRENCY`` non-blocking connections at once that send garbage instead of a
    ClientHello; beyond ``max_per_source`` they are refused by the limits. Each waits for
    mbsec to close, then resets (SO_LINGER 0). ``stop`` set: finish as at ``until``."""
    raise_nofile()

    def going() -> bool:
        return time.monotonic() < until and not stop.is_set()

    linger = struct.pack("ii", 1, 0)
    if index == 0:
        ctx = ssl.create_default_context(cafile=ca)  # no client certificate
        while going():
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.settimeout(15)
            with contextlib.suppress(OSError, ssl.SSLError):
                s.connect(("127.0.0.1", port))
                t = ctx.wrap_socket(s, server_hostname="localhost")
                t.sendall(fc03(1, 0, 1))
                while t.recv(4096):
                    pass
            s.close()
            with count.get_lock():
                count.value += 1
        return
    sel = selectors.DefaultSelector()

    def open_one() -> None:
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        sel.register(s, selectors.EVENT_WRITE, [False, time.monotonic()])

    for _ in range(CONCURRENCY):
        open_one()
    done = 0
    while going() or sel.get_map():
        for key, _ in sel.select(0.5):
            s, state = key.fileobj, key.data
            assert isinstance(s, socket.socket)
            finished = False
            if not state[0]:  # connected (or failed): send the garbage, then wait for the close
                try:
                    s.send(b"GET / HTTP/1.0\r\n\r\n")
                    state[0] = True
                    sel.modify(s, selectors.EVENT_READ, state)
                except OSError:
                    finished = True
            else:
                try:
                    finished = not s.recv(4096)
                except OSError:
                    finished = True
            if finished or time.monotonic() - state[1] > 30:
                sel.unregister(s)
                s.close()
                done += 1
                if done % 64 == 0:
                    with count.get_lock():
                        count.value += 64
                if going():
                    open_one()
    with count.get_lock():
        count.value += done % 64


def bench_rejections(args: argparse.Namespace, work: Path, pki: Pki, plc_port: int) -> int:
    cfg, port = write_config(work, pki, "127.0.0.1", plc_port,
                             limits="max_connections = 512\nmax_per_source = 32",
                             log_file="/dev/null")
    count = mp.Value("l", 0)
    stop = mp.Event()
    with mbsec_serve(cfg, port) as proc:
        time.sleep(1)
        start = rss_kib(proc.pid)
        until = time.monotonic() + args.seconds
        procs = [mp.Process(target=_reject_loop,
                            args=(port, str(pki.ca.trust_bundle), until, count, i, stop))
                 for i in range(args.client_procs)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        samples = [(0, start, 0.0)]
        nxt = args.sample
        while any(p.is_alive() for p in procs):
            if args.count and count.value >= args.count:
                stop.set()
            if count.value >= nxt:
                samples.append((count.value, rss_kib(proc.pid), time.monotonic() - t0))
                c, r, t = samples[-1]
                print(f"  {c} rejected, {c / t:.0f}/s: RSS {r / 1024:.1f} MiB", flush=True)
                nxt += args.sample
            time.sleep(0.2)
        for p in procs:
            p.join()
        time.sleep(3)
        end = rss_kib(proc.pid)
        samples.append((count.value, end, time.monotonic() - t0))
        alive = proc.poll() is None
    total = count.value
    half = [s for s in samples if s[0] >= total / 2]
    slope = ((half[-1][1] - half[0][1]) / max(1, half[-1][0] - half[0][0]) * 100_000
             if len(half) >= 2 else float("nan"))
    print(f"\n| rejected | rate /s | RSS start MiB | RSS peak MiB | RSS end MiB | growth "
          f"per 100k, 2nd half, KiB | extrapolated to 1M, MiB over start |\n"
          f"|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {total} | {total / samples[-1][2]:.0f} | {start / 1024:.1f} | "
          f"{max(s[1] for s in samples) / 1024:.1f} | {end / 1024:.1f} | {slope:.0f} | "
          f"{(end - start + slope * max(0, 1_000_000 - total) / 100_000) / 1024:.1f} |")
    print(f"mbsec still running: {alive}")
    return 0 if alive else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=["sessions", "rejections"])
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=1,
                   help="open and close the sessions this many times in one proxy (reuse or leak)")
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--count", type=int, default=0,
                   help="rejections: stop once this many were rejected (0: run --seconds)")
    p.add_argument("--sample", type=int, default=20_000)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--kit", type=Path, default=KIT)
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what we started on kill
    hard = raise_nofile()
    if args.phase == "sessions" and hard < args.sessions + 200:
        sys.exit(f"the open file hard limit is {hard}: too low for {args.sessions} sessions")
    if not (args.kit / "mbplc").exists():
        sys.exit(f"{args.kit}/mbplc not built: make -C {args.kit}")
    with tempfile.TemporaryDirectory(prefix="fl-mem-") as tmp:
        work = Path(tmp)
        pki = make_pki(work)
        plc_port = free_port()
        plc = subprocess.Popen([str(args.kit / "mbplc"), "--port", str(plc_port), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if args.phase == "sessions":
                rc = bench_sessions(args, work, pki, plc_port)
            else:
                rc = bench_rejections(args, work, pki, plc_port)
            if args.tracemalloc:
                keep = Path(f"/tmp/fl-mem-tracemalloc-{os.getpid()}")
                keep.mkdir()
                for f in work.glob("tracemalloc-*.txt"):
                    f.rename(keep / f.name)
                print(f"tracemalloc dumps in {keep}")
        finally:
            plc.terminate()
            plc.wait()
    return rc


if __name__ == "__main__":
    sys.exit(main())
