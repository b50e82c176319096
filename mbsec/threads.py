"""The proxy's threads as the operating system sees them: names and CPU priority.

Each process runs its handshakes (and accept, admin, metrics, reload) on the trio thread and
the bytes of authenticated connections on the data-plane thread. ``limits.handshake_nice``
raises the trio thread's nice value so that, when a flood of full handshakes takes the CPU,
the scheduler gives it to the data plane first: the clients that are already in keep their
requests, the flood gets what is left (docs/config.md, "handshake_nice"; benchmarks/README.md,
"Issue 10: handshake_nice").

Linux keeps the nice value per thread (``setpriority(PRIO_PROCESS, tid)``), and a thread
starts with the value of the thread that created it; an unprivileged process may raise a
value but never lower it again. So every thread that must stay at the process's value (the
data plane, the log writers, the remote sinks' senders) is started before the trio thread is
lowered (:func:`lower_this_thread`), and threads the trio thread starts later (trio's worker
threads for name lookups) run at its lowered value, as the work that asked for them does.
"""

from __future__ import annotations

import contextlib
import os
import threading

#: Linux's bound on a thread name (16 bytes with the terminating NUL)
NAME_MAX = 15


def name_thread(thread: threading.Thread) -> None:
    """Show ``thread.name`` (cut to 15 bytes) as the thread's name in ``/proc`` (``top -H``,
    ``ps -L``, the tests): Python before 3.14 keeps it to itself. Best effort."""
    tid = thread.native_id
    if tid is None:
        return
    with contextlib.suppress(OSError), \
            open(f"/proc/self/task/{tid}/comm", "w", encoding="utf-8") as fh:
        fh.write(thread.name.encode("utf-8")[:NAME_MAX].decode("utf-8", "ignore"))


def thread_nice() -> int:
    """The calling thread's nice value (Linux: per thread)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def lower_this_thread(increment: int) -> int:
    """Raise the calling thread's nice value by ``increment`` (at most to 19) and return the
    new value; 0 changes nothing. Only this thread: the others keep theirs."""
    nice = thread_nice()
    if increment <= 0:
        return nice
    target = min(19, nice + increment)
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), target)
    return thread_nice()
