"""The server side of one TLS handshake, driven over a trio stream with nothing else.

Why not ``trio.SSLStream``: mbsec only does the handshake in trio (the data plane takes the
``SSLObject`` and its memory BIOs afterwards, :mod:`mbsec.trio_private`), and for that
``SSLStream`` is a general full-duplex stream with locks, conflict detectors, receive-size
bookkeeping and a re-entrant retry loop, built and run for every connection. Profiled under
``openssl s_time -new`` (benchmarks/README.md, "Handshake rate") that machinery cost more
Python time per handshake than OpenSSL's own work; this class keeps only the loop.

It behaves as ``SSLStream`` does where mbsec depends on it:

* OpenSSL decides everything (verification, CRLs, alerts): this only moves bytes.
* A failed handshake raises ``trio.BrokenResourceError`` *from* the ``ssl.SSLError``, and
  leaves the fatal alert OpenSSL wrote in the outgoing BIO, unsent (the session sends it,
  :func:`mbsec.trio_private.pending_alert`). A transport failure propagates as it is.
* End of stream during the handshake is fed to OpenSSL (``write_eof``), whose error then says
  why (``UNEXPECTED_EOF_WHILE_READING``).
* On a TLS 1.3 server, what OpenSSL writes after its last handshake step (session tickets;
  none while ``num_tickets = 0``) is held back in ``_delayed_outgoing``, as trio does.
* The attributes :mod:`mbsec.trio_private` reads (``_ssl_object``, ``_incoming``,
  ``_outgoing``, ``_delayed_outgoing``) have trio's names and types, so the data plane takes
  over the session keys and anything already buffered exactly as from an ``SSLStream``.

Given the connection's file descriptor (``fd``), the handshake reads and writes it directly
(non-blocking ``os.read``/``os.write``, trio's ``wait_readable``/``wait_writable`` only when
the socket would block) instead of through the transport's stream: each successful trio socket
call also yields to trio's scheduler once, and with the stream wrappers that was about a sixth
of a handshake's Python time (benchmarks/README.md, "Issue 10 item 3: handshake rate rounds").
The bytes received are handed to ``on_receive`` (the session's handshake tap), socket errors
raise ``trio.BrokenResourceError`` from the ``OSError`` as trio's ``SocketStream`` does, and a
cancelled scope (deadline, eviction) is noticed before every read and write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import ssl
from collections.abc import Callable
from typing import Any

import trio

__all__ = ["HANDSHAKE_RECEIVE_SIZE", "ServerTlsStream"]

#: bytes asked of the transport per read during the handshake (a client flight with a
#: certificate chain is a few KB; trio's SSLStream starts at the same size)
HANDSHAKE_RECEIVE_SIZE = 16384


def _stream_error(exc: OSError) -> Exception:
    """The error trio's ``SocketStream`` raises for ``exc``: a socket closed under it is
    ``ClosedResourceError``, anything else ``BrokenResourceError``."""
    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
        return trio.ClosedResourceError("this socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


class ServerTlsStream(trio.abc.AsyncResource):
    """One server-side TLS connection over ``transport``: :meth:`do_handshake`, the facts of
    the negotiated session, and :meth:`aclose` (close_notify, then the transport)."""

    __slots__ = ("_delayed_outgoing", "_fd", "_handshook", "_incoming", "_on_receive",
                 "_outgoing", "_ssl_object", "transport_stream")

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, *,
                 fd: int | None = None,
                 on_receive: Callable[[bytes], None] | None = None) -> None:
        self.transport_stream = transport
        self._fd = fd
        self._on_receive = on_receive
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._delayed_outgoing: bytes | None = None
        self._handshook = False

    async def do_handshake(self) -> None:
        """Run the handshake to its end; see the module docstring for failures."""
        obj = self._ssl_object
        transport = self.transport_stream
        while True:
            try:
                obj.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise trio.BrokenResourceError from exc  # the alert stays in _outgoing
            to_send = self._outgoing.read()
            if done and obj.version() == "TLSv1.3":
                self._delayed_outgoing = to_send or None  # trio issue 819, as SSLStream
                to_send = b""
            if to_send:
                if self._fd is None:
                    await transport.send_all(to_send)
                else:
                    await self._send_fd(self._fd, to_send)
            if done:
                self._handshook = True
                return
            if self._fd is None:
                data = await transport.receive_some(HANDSHAKE_RECEIVE_SIZE)
            else:
                data = await self._receive_fd(self._fd)
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()  # OpenSSL then raises with its own reason

    async def _send_fd(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc
            view = view[sent:]

    async def _receive_fd(self, fd: int) -> bytes:
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                data = os.read(fd, HANDSHAKE_RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            except OSError as exc:
                raise _stream_error(exc) from exc
            if data and self._on_receive is not None:
                self._on_receive(data)
            return data

    # -- the negotiated session (what ssl.SSLObject reports) ---------------------------------

    @property
    def session_reused(self) -> bool:
        return bool(self._ssl_object.session_reused)

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._ssl_object.getpeercert(binary_form)

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl_object.cipher()

    def version(self) -> str | None:
        return self._ssl_object.version()

    async def aclose(self) -> None:
        """Send close_notify (without waiting for the peer's) when the handshake completed,
        then close the transport; a peer that is gone already only skips the close_notify."""
        try:
            if self._handshook:
                with contextlib.suppress(ssl.SSLError):
                    self._ssl_object.unwrap()
                to_send = self._outgoing.read()
                if to_send:
                    with contextlib.suppress(trio.BrokenResourceError, trio.BusyResourceError):
                        await self.transport_stream.send_all(to_send)
        except BaseException:
            await trio.aclose_forcefully(self.transport_stream)
            raise
        await self.transport_stream.aclose()
