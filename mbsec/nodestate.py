"""State every worker process of one node shares: write freezes and rate-limit buckets.

One small file (``admin.state_file``, default ``/run/mbsec/state``) mapped into every worker
(``mmap``, ``MAP_SHARED``) and guarded by a process-shared robust pthread mutex inside it
(``flock`` plus a thread lock where pthreads are missing); the admin task and the data-plane
thread of each worker both use it. Why shared memory and not a hand-off of connections:
``SO_REUSEPORT`` spreads connections before anyone knows the client's identity, and moving a
TLS connection to another process costs more than a lock per request (benchmarks/README.md,
"Node-wide rate limits and write freezes").

Layout (little endian, fixed): a header (magic, version, a generation that every freeze change
bumps), :data:`FREEZE_SLOTS` freeze entries, then :data:`BUCKET_SLOTS` rate buckets in an
open-addressing table keyed by a 16-byte hash of the client's key.

What a restart does (docs/config.md, ``[admin]``): the freeze table is kept, so writes an
operator froze stay frozen across a restart (fail closed; ``/run`` is emptied by a reboot);
the rate buckets are reset by the process that starts the node (every client starts with
full buckets, as with one process). ``workers = 1`` and tests without a file use an anonymous
mapping (:meth:`NodeState.memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mbsec.modbus.access import Access
from mbsec.policy.engine import Policy, Principal
from mbsec.policy.ratelimit import REASON_REQUEST_RATE, State, admit

MAGIC = b"MBSECND1"
HEADER = struct.Struct("<8sQ")  # magic, freeze generation
HEADER_SIZE = 64
MUTEX_AT = 16  # a process-shared, robust pthread mutex (40 bytes on glibc x86-64, 48 arm64)
MUTEX_SIZE = 48
FREEZE = struct.Struct("<64sBb6xd48s")  # name, flags, owner worker, since (wall clock), reason
FREEZE_SLOTS = 64
BUCKET = struct.Struct("<16sdddiI")  # key hash, tokens, write tokens, stamp, in flight, used
FLIGHT = struct.Struct("<i")  # the in-flight count, at offset 40 of a bucket
USED = struct.Struct("<I")  # at offset 44: 0 free, 1 taken
BUCKET_SLOTS = 8192
PROBE_MAX = 64  # slots probed before the table is pruned
BUCKETS_AT = 16384
SIZE = BUCKETS_AT + BUCKET_SLOTS * BUCKET.size

MANUAL = 1  # an operator froze it (``mbsec ctl freeze``)
AUTO = 2  # the link flapped (``[admin.auto_freeze]``)
ALL = "*"  # the freeze entry that holds every target
KINDS = {MANUAL: "manual", AUTO: "auto"}


class NodeStateError(Exception):
    """The state file cannot be used (one line for the operator)."""


class _Mutex:
    """A pthread mutex inside the mapping (``PTHREAD_PROCESS_SHARED``, ``ROBUST``): taken and
    given back without a system call when nobody else holds it (a futex), where ``flock``
    costs two per lock; it excludes threads too, and a worker that dies holding it does not
    wedge the others (``EOWNERDEAD``: the next one marks it consistent and goes on).

    Taking it spins first: ``trylock`` up to :data:`SPIN_TRIES` times, keeping the GIL (each
    try is a few hundred ns), and only then waits in ``pthread_mutex_lock``, which releases
    the GIL. With ``workers = 2`` and one client's connections on both workers, the holder is
    most often the other worker in its critical section of a few µs; waiting in the kernel for
    it cost a futex sleep, a wake-up and a context switch per collision (0.15 per request at
    100x1: benchmarks/README.md, "Issue 14: workers = 2")."""

    __deletable__ = ["_arg", "_buf"]  # mypyc: drop() deletes them

    def __init__(self, mm: mmap.mmap, init: bool) -> None:
        libc = _libc()
        nogil = _libc_nogil()
        if libc is None or nogil is None:
            raise OSError("no pthread mutex")
        self._buf = (ctypes.c_char * MUTEX_SIZE).from_buffer(mm, MUTEX_AT)
        self._ptr = ctypes.addressof(self._buf)
        self._arg = ctypes.c_void_p(self._ptr)  # passed as is: no int conversion per call
        self._lock = libc.pthread_mutex_lock  # may wait: releases the GIL meanwhile
        self._trylock = nogil.pthread_mutex_trylock  # never waits: keeps the GIL
        self._unlock = nogil.pthread_mutex_unlock
        self._consistent = libc.pthread_mutex_consistent
        if init:
            attr = ctypes.create_string_buffer(64)
            ok = (libc.pthread_mutexattr_init(attr) == 0
                  and libc.pthread_mutexattr_setpshared(attr, 1) == 0  # PTHREAD_PROCESS_SHARED
                  and libc.pthread_mutexattr_setrobust(attr, 1) == 0  # PTHREAD_MUTEX_ROBUST
                  and libc.pthread_mutex_init(self._ptr, attr) == 0)
            libc.pthread_mutexattr_destroy(attr)
            if not ok:
                raise OSError("pthread_mutex_init failed")

    def acquire(self) -> None:
        arg = self._arg
        rc = self._trylock(arg)
        if rc == errno.EBUSY:
            tries = SPIN_TRIES
            while rc == errno.EBUSY and tries:
                tries -= 1
                rc = self._trylock(arg)
            if rc == errno.EBUSY:
                rc = self._lock(arg)
        if rc == errno.EOWNERDEAD:  # its holder died: the data is as it left it
            self._consistent(arg)
        elif rc:
            raise OSError(rc, os.strerror(rc))

    def release(self) -> None:
        self._unlock(self._arg)

    def drop(self) -> None:
        del self._arg
        del self._buf  # the mapping can close once nothing points into it


#: ``trylock`` attempts before a contended lock waits in the kernel (about 10-20 µs of
#: spinning: longer than the critical section, shorter than a sleep and a wake-up)
SPIN_TRIES = 64

_LIBC: list[ctypes.CDLL | None] = []
_LIBC_NOGIL: list[ctypes.CDLL | None] = []
_LIBC_PATH = ctypes.util.find_library("c") or "libc.so.6"


def _libc() -> ctypes.CDLL | None:
    if not _LIBC:
        lib: ctypes.CDLL | None
        try:
            lib = ctypes.CDLL(_LIBC_PATH, use_errno=True)
            for name, args in (
                ("pthread_mutex_lock", [ctypes.c_void_p]),
                ("pthread_mutex_unlock", [ctypes.c_void_p]),
                ("pthread_mutex_consistent", [ctypes.c_void_p]),
                ("pthread_mutex_init", [ctypes.c_void_p, ctypes.c_void_p]),
                ("pthread_mutexattr_init", [ctypes.c_void_p]),
                ("pthread_mutexattr_destroy", [ctypes.c_void_p]),
                ("pthread_mutexattr_setpshared", [ctypes.c_void_p, ctypes.c_int]),
                ("pthread_mutexattr_setrobust", [ctypes.c_void_p, ctypes.c_int]),
            ):
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC.append(lib)
    return _LIBC[0]


def _libc_nogil() -> ctypes.CDLL | None:
    """libc through ``PyDLL``: calls keep the GIL (cheaper), only for those that never wait."""
    if not _LIBC_NOGIL:
        lib: ctypes.CDLL | None
        try:
            lib = ctypes.PyDLL(_LIBC_PATH)
            for name in ("pthread_mutex_trylock", "pthread_mutex_unlock"):
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.c_void_p]
                fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
        _LIBC_NOGIL.append(lib)
    return _LIBC_NOGIL[0]


@dataclass(frozen=True, slots=True)
class Freeze:
    """One frozen target: by whom (``MANUAL`` and/or ``AUTO`` flags), since when, why."""

    target: str
    flags: int
    owner: int  # worker index whose link flapped (AUTO), -1 for none
    since: float  # time.time()
    reason: str

    @property
    def kinds(self) -> list[str]:
        return [name for bit, name in KINDS.items() if self.flags & bit]


class NodeState:
    """The shared mapping; every method is safe from any thread of any worker."""

    def __init__(self, mm: mmap.mmap, fd: int | None, path: Path | None, *,
                 init_lock: bool = False) -> None:
        self._mm = mm
        self._fd = fd
        self.path = path
        self._tlock = threading.Lock()
        self._hashes: dict[str, bytes] = {}
        self._slots: dict[bytes, int] = {}  # key hash -> its bucket's offset, as last found
        #: in-flight releases not written to the mapping yet, per key hash (:meth:`settle`)
        self._owed: dict[bytes, int] = {}
        self._owed_lock = threading.Lock()
        #: releases are owed and settled by :meth:`settle` (the data plane calls it at the end
        #: of every loop pass, ``workers > 1``) rather than each taking the node's lock
        self.defer_releases = False
        #: the lock every process takes; without pthreads, flock plus a thread lock
        self._mutex: _Mutex | None
        try:
            self._mutex = _Mutex(mm, init_lock)
        except OSError:
            self._mutex = None

    @classmethod
    def memory(cls) -> NodeState:
        """A private mapping: one process, nothing on disk (tests, ``Proxy`` without a file)."""
        mm = mmap.mmap(-1, SIZE)
        mm[:HEADER.size] = HEADER.pack(MAGIC, 0)
        return cls(mm, None, None, init_lock=True)

    @classmethod
    def open(cls, path: Path, *, reset_buckets: bool) -> NodeState:
        """Map ``path`` (created 0600 with its directory 0750 when missing); a file of another
        layout is started afresh. ``reset_buckets``: the process that starts the node."""
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise NodeStateError(f"admin.state_file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                fresh = os.fstat(fd).st_size != SIZE
                if not fresh:
                    fresh = os.pread(fd, len(MAGIC), 0) != MAGIC
                if fresh:
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, SIZE)
                mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                if fresh:
                    mm[:HEADER.size] = HEADER.pack(MAGIC, 1)
                elif reset_buckets:
                    mm[BUCKETS_AT:SIZE] = bytes(SIZE - BUCKETS_AT)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            os.close(fd)
            raise NodeStateError(f"admin.state_file {path}: {exc.strerror or exc}") from None
        # the process that starts the node (re)initializes the lock: no worker runs yet
        return cls(mm, fd, path, init_lock=fresh or reset_buckets)

    def close(self) -> None:
        with self._tlock:
            if self._mutex is not None:
                self._mutex.drop()
                self._mutex = None
            with contextlib.suppress(BufferError):
                self._mm.close()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[mmap.mmap]:
        self.lock()
        try:
            yield self._mm
        finally:
            self.unlock()

    def lock(self) -> None:
        """Exclusive over every thread of every process: the shared mutex, else the thread
        lock and then flock."""
        mutex = self._mutex
        if mutex is not None:
            mutex.acquire()
            return
        self._tlock.acquire()
        fd = self._fd
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                self._tlock.release()
                raise

    def unlock(self) -> None:
        mutex = self._mutex
        if mutex is not None:
            mutex.release()
            return
        fd = self._fd
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()

    # -- freezes ---------------------------------------------------------------------------

    def generation(self) -> int:
        """Bumped by every freeze change: a reader re-reads the table only when it moved."""
        return int(struct.unpack_from("<Q", self._mm, 8)[0])

    def freezes(self) -> dict[str, Freeze]:
        with self.locked() as mm:
            return _read_freezes(mm)

    def set_freeze(self, target: str, kind: int, *, reason: str = "", owner: int = -1,
                   now: float | None = None) -> Freeze | None:
        """Add ``kind`` to ``target``'s freeze; the new entry, or None when it held already."""
        name = target.encode()[:64]
        with self.locked() as mm:
            free = -1
            for i in range(FREEZE_SLOTS):
                at = HEADER_SIZE + i * FREEZE.size
                raw, flags, own, since, why = FREEZE.unpack_from(mm, at)
                if flags and raw.rstrip(b"\0") == name:
                    if flags & kind:
                        return None
                    flags |= kind
                    if kind == AUTO:
                        own = owner
                    FREEZE.pack_into(mm, at, raw, flags, own, since, why)
                    _bump(mm)
                    return _entry(raw, flags, own, since, why)
                if not flags and free < 0:
                    free = i
            if free < 0:
                raise NodeStateError(f"more than {FREEZE_SLOTS} frozen targets")
            stamp = time.time() if now is None else now
            args = (name, kind, owner if kind == AUTO else -1, stamp, reason.encode()[:48])
            FREEZE.pack_into(mm, HEADER_SIZE + free * FREEZE.size, *args)
            _bump(mm)
            return _entry(*args)

    def clear_freeze(self, target: str, kinds: int = MANUAL | AUTO) -> int:
        """Remove ``kinds`` from ``target``'s freeze; the flags that were removed (0: none)."""
        name = target.encode()[:64]
        with self.locked() as mm:
            for i in range(FREEZE_SLOTS):
                at = HEADER_SIZE + i * FREEZE.size
                raw, flags, own, since, why = FREEZE.unpack_from(mm, at)
                if flags and raw.rstrip(b"\0") == name:
                    removed = int(flags) & kinds
                    if not removed:
                        return 0
                    flags &= ~kinds
                    if flags:
                        FREEZE.pack_into(mm, at, raw, flags, own if flags & AUTO else -1,
                                         since, why)
                    else:
                        mm[at:at + FREEZE.size] = bytes(FREEZE.size)
                    _bump(mm)
                    return removed
        return 0

    # -- rate buckets; in-flight releases, settled once per data-plane pass -------------------

    def owe_release(self, h: bytes) -> None:
        """One request of ``h`` ended; written by the next :meth:`settle` (or the next
        :meth:`take_owed` of ``h``)."""
        with self._owed_lock:
            owed = self._owed
            owed[h] = owed.get(h, 0) + 1

    def take_owed(self, h: bytes) -> int:
        """The releases of ``h`` not written yet, handed to a caller that holds the node's
        lock and writes them with its own update (they are no longer owed)."""
        if not self._owed:
            return 0
        with self._owed_lock:
            return self._owed.pop(h, 0)

    def settle(self) -> None:
        """Write every owed release, under one lock for all of them: with ``workers > 1`` the
        data plane calls this at the end of each loop pass, so a request's in-flight slot is
        freed for the other workers before the loop sleeps, and a pass of N replies takes the
        node's lock once rather than N times. Until then the other workers count the request
        as still in flight (stricter, never looser, than the policy's ``max_in_flight``)."""
        if not self._owed:
            return
        with self._owed_lock:
            owed = self._owed
            self._owed = {}
        self.lock()
        try:
            for h, n in owed.items():
                self.end_in_flight(h, n)
        finally:
            self.unlock()

    def end_in_flight(self, h: bytes, n: int) -> None:
        """``n`` requests of ``h`` are no longer in flight (the caller holds the lock)."""
        mm = self._mm
        at = self._slot(mm, h, 0.0, create=False)
        if at >= 0:
            flight = FLIGHT.unpack_from(mm, at + 40)[0]
            if flight > 0:
                FLIGHT.pack_into(mm, at + 40, max(0, flight - n))

    def key_hash(self, key: str) -> bytes:
        h = self._hashes.get(key)
        if h is None:
            if len(self._hashes) > 4 * BUCKET_SLOTS:
                self._hashes.clear()
            h = self._hashes[key] = hashlib.blake2b(key.encode(), digest_size=16).digest()
        return h

    def _slot(self, mm: mmap.mmap, h: bytes, now: float, create: bool) -> int:
        """The offset of ``h``'s bucket, a new one when ``create``, -1 when none. The offset
        found last is tried first (a prune may have moved the bucket: the hash there says)."""
        at = self._slots.get(h, -1)
        if at >= 0 and mm[at:at + 16] == h:
            return at
        at = self._probe(mm, h, now, create)
        if at >= 0:
            if len(self._slots) > 4 * BUCKET_SLOTS:
                self._slots.clear()
            self._slots[h] = at
        return at

    def _probe(self, mm: mmap.mmap, h: bytes, now: float, create: bool) -> int:
        start = int.from_bytes(h[:4], "little") % BUCKET_SLOTS
        for attempt in range(2):
            for step in range(PROBE_MAX):
                at = BUCKETS_AT + ((start + step) % BUCKET_SLOTS) * BUCKET.size
                if not USED.unpack_from(mm, at + 44)[0]:
                    return at if create else -1
                if mm[at:at + 16] == h:
                    return at
            if not create or attempt:
                return -1
            self._prune(mm, now)
        return -1  # pragma: no cover - the loop returns

    def _prune(self, mm: mmap.mmap, now: float) -> None:
        """The table is crowded: keep only buckets that are not full again or in flight
        (a bucket that refilled would start full anyway), re-inserted from scratch."""
        keep = []
        for i in range(BUCKET_SLOTS):
            at = BUCKETS_AT + i * BUCKET.size
            h, tokens, wtokens, stamp, flight, used = BUCKET.unpack_from(mm, at)
            if used and (flight > 0 or now - stamp < 60.0):
                keep.append((h, tokens, wtokens, stamp, flight, used))
        mm[BUCKETS_AT:SIZE] = bytes(SIZE - BUCKETS_AT)
        for rec in keep:
            start = int.from_bytes(rec[0][:4], "little") % BUCKET_SLOTS
            for step in range(BUCKET_SLOTS):
                at = BUCKETS_AT + ((start + step) % BUCKET_SLOTS) * BUCKET.size
                if not int(struct.unpack_from("<I", mm, at + 44)[0]):
                    BUCKET.pack_into(mm, at, *rec)
                    break


def _bump(mm: mmap.mmap) -> None:
    struct.pack_into("<Q", mm, 8, struct.unpack_from("<Q", mm, 8)[0] + 1)


def _entry(raw: bytes, flags: int, owner: int, since: float, why: bytes) -> Freeze:
    return Freeze(raw.rstrip(b"\0").decode(errors="replace"), flags, owner, since,
                  why.rstrip(b"\0").decode(errors="replace"))


def _read_freezes(mm: mmap.mmap) -> dict[str, Freeze]:
    out = {}
    for i in range(FREEZE_SLOTS):
        rec = FREEZE.unpack_from(mm, HEADER_SIZE + i * FREEZE.size)
        if rec[1]:
            e = _entry(*rec)
            out[e.target] = e
    return out


class FreezeView:
    """What the request path asks per write: is the target of this unit id frozen?

    Reads one 8-byte generation from the mapping per write request and re-reads the table
    only when it moved, so a freeze made by any worker (or ``mbsec ctl``) holds from the next
    request on in every worker. ``units`` maps unit ids to ``[upstreams.NAME]`` names and is
    replaced whole on a reload."""

    def __init__(self, node: NodeState, units: dict[int, str]) -> None:
        self.node = node
        self.units = units
        self._gen = -1
        self._table: dict[str, Freeze] = {}

    def frozen(self, unit: int) -> Freeze | None:
        gen = self.node.generation()
        if gen != self._gen:
            self._table = self.node.freezes()
            self._gen = gen
        table = self._table
        if not table:
            return None
        name = self.units.get(unit)
        hit = table.get(name) if name is not None else None
        return hit if hit is not None else table.get(ALL)


class SharedRateLimiter:
    """:class:`mbsec.policy.RateLimiter` with its buckets in the node state: one budget per
    client for the whole node, whichever worker its connections landed on.

    The arithmetic is the same function (:func:`mbsec.policy.ratelimit.admit`); only where the
    bucket lives differs. The table holds :data:`BUCKET_SLOTS` clients; when the probe finds
    no room even after pruning, the request is refused (fail closed)."""

    def __init__(self, policy: Policy, node: NodeState,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._node = node
        self._clock = clock  # CLOCK_MONOTONIC: one clock for every process of the host

    def successor(self, policy: Policy) -> SharedRateLimiter:
        """A reload keeps every budget (they live in the node state, not here)."""
        return SharedRateLimiter(policy, self._node, self._clock)

    def acquire(self, principal: Principal, access: Access) -> str | None:
        limit = self._policy.limit_for(principal.roles)
        if limit is None:
            return None
        node = self._node
        h = node.key_hash(principal.key)
        now = self._clock()
        mm = node._mm
        node.lock()
        try:
            at = node._slot(mm, h, now, create=True)
            if at < 0:
                return REASON_REQUEST_RATE
            _h, tokens, wtokens, stamp, flight, used = BUCKET.unpack_from(mm, at)
            owed = node.take_owed(h)
            if owed:  # this worker's releases not settled yet: written with this update
                flight = max(0, flight - owed)
            if not used:
                st = State(limit, limit.burst, limit.write_burst, now)
            else:
                st = State(limit, min(tokens, limit.burst), min(wtokens, limit.write_burst),
                           stamp, flight)
            reason = admit(st, access, now)
            # no in-flight cap: nothing to count, and release() costs nothing
            counted = st.in_flight if limit.max_in_flight is not None else flight
            BUCKET.pack_into(mm, at, h, st.tokens, st.write_tokens, st.stamp, counted, 1)
        finally:
            node.unlock()
        return reason

    def release(self, principal: Principal) -> None:
        limit = self._policy.limit_for(principal.roles)
        if limit is None or limit.max_in_flight is None:
            return  # acquire() counted nothing in flight
        node = self._node
        h = node.key_hash(principal.key)
        if node.defer_releases:  # written by the end of this loop pass (NodeState.settle)
            node.owe_release(h)
            return
        node.lock()
        try:
            node.end_in_flight(h, 1)
        finally:
            node.unlock()

    def in_flight(self, principal: Principal) -> int:
        """The node's count, less this worker's releases not settled yet."""
        node = self._node
        h = node.key_hash(principal.key)
        with node.locked() as mm:
            at = node._slot(mm, h, 0.0, create=False)
            flight = int(struct.unpack_from("<i", mm, at + 40)[0]) if at >= 0 else 0
        return max(0, flight - node._owed.get(h, 0))
