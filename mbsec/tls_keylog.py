"""Each TLS 1.3 handshake's client handshake traffic secret, from OpenSSL's key log, in memory.

Why: under TLS 1.3 the client's Certificate message is encrypted, Python's ``ssl`` has no verify
callback, and after a failed handshake ``getpeercert()`` is empty, so a handshake OpenSSL rejects
(revoked, expired, unknown CA...) would name no certificate. The one public hook that yields
the keys is ``SSLContext.keylog_filename`` (OpenSSL's ``SSL_CTX_set_keylog_callback``, the
NSS key log format). mbsec points it at the write end of an anonymous pipe, through
``/proc/self/fd``: no file is ever created, nothing leaves the process. The read end is
drained by the session itself at the end of every handshake (no thread, no wake-ups), which
keeps only ``CLIENT_HANDSHAKE_TRAFFIC_SECRET`` lines (the other secrets are dropped as they
are read) and hands a rejected handshake's secret to :mod:`mbsec.tls_sniff`; every handshake
takes its own entry out when it ends, so nothing accumulates.

The pipe must never fill: OpenSSL's writer blocks in the middle of a handshake. Only
handshakes in progress write lines (at most :data:`BYTES_PER_HANDSHAKE` each, written at the
ServerHello and the Finished messages), each drains everything when it ends, and
``limits.max_handshakes`` bounds how many are in progress (the admission counts a handshake
until its session took its secret; an evicted one may still be unwinding while its successor
starts, hence twice that room), so :meth:`KeyLog.open` enlarges the pipe to hold twice that
many and refuses (returns ``None``: rejections then name no TLS 1.3
certificate, and the proxy says so) where the system will not give it that much.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import ssl

__all__ = ["BYTES_PER_HANDSHAKE", "KeyLog"]

#: key-log bytes one TLS 1.3 handshake writes at most: five lines of label, 32-byte client
#: random and a secret of up to 48 bytes, in hex (TLS 1.2 writes one shorter line)
BYTES_PER_HANDSHAKE = 5 * (len("CLIENT_HANDSHAKE_TRAFFIC_SECRET") + 1 + 64 + 1 + 96 + 1)
#: the pipe size asked for; Linux grants up to /proc/sys/fs/pipe-max-size (1 MiB by default)
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_LABEL = b"CLIENT_HANDSHAKE_TRAFFIC_SECRET"
#: secrets kept at most: a handshake takes its own out when it ends; this only bounds memory
#: if that ever failed to happen
_MAX_ENTRIES = 4096


class KeyLog:
    """The pipe, and the secrets of the handshakes in progress (client random -> secret)."""

    __slots__ = ("_partial", "_read_fd", "_secrets", "_write_fd", "capacity")

    def __init__(self, read_fd: int, write_fd: int, capacity: int) -> None:
        self._read_fd = read_fd
        self._write_fd = write_fd
        #: bytes the pipe holds before OpenSSL's writer would block
        self.capacity = capacity
        self._secrets: dict[bytes, bytes] = {}
        self._partial = b""

    @classmethod
    def open(cls, max_handshakes: int, pipe_size: int = PIPE_SIZE) -> KeyLog | None:
        """A key log able to hold ``max_handshakes`` handshakes' lines, or ``None`` when the
        system will not give a pipe that large (or no ``/proc/self/fd``). ``pipe_size``: what
        to ask for (tests ask for less)."""
        if not os.path.isdir("/proc/self/fd"):
            return None
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # EPERM above pipe-max-size: keep the default
                fcntl.fcntl(write_fd, _F_SETPIPE_SZ, pipe_size)
            capacity = fcntl.fcntl(write_fd, _F_GETPIPE_SZ)
            if cls.handshakes_for(capacity) < max_handshakes:
                raise OSError("pipe too small")
            os.set_blocking(read_fd, False)
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return None
        return cls(read_fd, write_fd, capacity)

    @staticmethod
    def handshakes_for(capacity: int) -> int:
        """How many handshakes in progress a pipe of ``capacity`` bytes covers, with as much
        room again for evicted ones still unwinding."""
        return capacity // (2 * BYTES_PER_HANDSHAKE)

    def attach(self, context: ssl.SSLContext) -> None:
        """Make OpenSSL write ``context``'s key log lines into the pipe (a new write end per
        context; the pipe outlives every context attached to it)."""
        context.keylog_filename = f"/proc/self/fd/{self._write_fd}"

    def drain(self) -> None:
        """Read everything in the pipe; keep the client handshake secrets, drop the rest."""
        chunks = [self._partial]
        while True:
            try:
                data = os.read(self._read_fd, 65536)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            chunks.append(data)
        if len(chunks) == 1:
            return
        lines = b"".join(chunks).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line (a write is one whole line)
        secrets = self._secrets
        for line in lines:
            if line.startswith(_LABEL):
                parts = line.split()
                if len(parts) == 3:
                    try:
                        secrets[bytes.fromhex(parts[1].decode())] = bytes.fromhex(
                            parts[2].decode())
                    except ValueError:
                        continue
        while len(secrets) > _MAX_ENTRIES:
            del secrets[next(iter(secrets))]

    def take(self, client_random: bytes | None) -> bytes | None:
        """Drain, then take (remove) the secret of the handshake with this client random."""
        self.drain()
        if client_random is None:
            return None
        return self._secrets.pop(client_random, None)

    @property
    def held(self) -> int:
        """Secrets held now (handshakes in progress whose lines were read)."""
        return len(self._secrets)

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read_fd = self._write_fd = -1
