"""Stop one thread of another process, and only that thread: ``PTRACE_SEIZE`` then
``PTRACE_INTERRUPT`` (a signal such as SIGSTOP would stop the whole process). How the tests
and benchmarks/bench_failover.py wedge mbsec's data-plane thread while trio keeps running."""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Iterator
from pathlib import Path

PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
EPOLL_SYSCALLS = {"232", "281", "441"}  # x86_64 epoll_wait, epoll_pwait, epoll_pwait2


def data_plane_thread(pid: int) -> int:
    """The tid of the data-plane thread: the thread other than the main one that sleeps in
    epoll (trio's own epoll runs in the main thread; trio's worker threads wait on futexes).
    Sampled until one is found: a thread that is running shows no system call."""
    seen: dict[str, str] = {}
    for _ in range(50):
        found = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                seen[task.name] = call = (task / "syscall").read_text().split()[0]
                if int(task.name) != pid and call in EPOLL_SYSCALLS:
                    found.append(int(task.name))
        if len(found) == 1:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no single data-plane thread in epoll: {seen}")


@contextlib.contextmanager
def thread_stopped(tid: int) -> Iterator[None]:
    """Stop one thread of another process (ptrace stop) and let it run again on the way out."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_SEIZE, tid, None, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace(PTRACE_SEIZE) of the data-plane thread: {os.strerror(err)}")
    try:
        assert libc.ptrace(PTRACE_INTERRUPT, tid, None, None) == 0
        os.waitpid(tid, 0x40000000)  # __WALL: the thread is in its ptrace stop now
        yield
    finally:
        libc.ptrace(PTRACE_DETACH, tid, None, None)
