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
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import trio

__all__ = ["HANDSHAKE_RECEIVE_SIZE", "ServerTlsStream"]

#: bytes asked of the transport per read during the handshake (a client flight with a
#: certificate chain is a few KB; trio's SSLStream starts at the same size)
HANDSHAKE_RECEIVE_SIZE = 16384


class ServerTlsStream(trio.abc.AsyncResource):
    """One server-side TLS connection over ``transport``: :meth:`do_handshake`, the facts of
    the negotiated session, and :meth:`aclose` (close_notify, then the transport)."""

    __slots__ = ("_delayed_outgoing", "_handshook", "_incoming", "_outgoing", "_ssl_object",
                 "transport_stream")

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext) -> None:
        self.transport_stream = transport
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
                await transport.send_all(to_send)
            if done:
                self._handshook = True
                return
            data = await transport.receive_some(HANDSHAKE_RECEIVE_SIZE)
            if data:
                self._incoming.write(data)
            else:
                self._incoming.write_eof()  # OpenSSL then raises with its own reason

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
