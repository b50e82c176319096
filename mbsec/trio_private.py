"""The one module that reaches into ``trio.SSLStream``'s private attributes.

trio has no public API for either of the two things mbsec needs, so both go through here and
nowhere else (issue 9, item 6). ``tests/test_trio_private.py`` runs a real handshake on the
installed trio and fails (never skips) when any of this changes; pyproject.toml caps trio
below the first minor release that test has not passed on.

The attributes (as of trio 0.25 .. 0.35, all set in ``SSLStream.__init__``):

``_ssl_object`` (``ssl.SSLObject``), ``_incoming`` / ``_outgoing`` (``ssl.MemoryBIO``)
    After the handshake the data planes (``mbsec.session._RecordIO`` and the reactor) drive
    the ``SSLObject`` themselves: one ``SSLObject.write`` per Modbus reply, ciphertext written
    straight to the socket, no ``SSLStream`` locks, conflict detectors or checkpoints per
    record. They take the stream's own object and BIOs so the session keys, the resumption
    state and anything already buffered carry over from trio's handshake.

``_delayed_outgoing`` (``bytes | None``)
    On a TLS 1.3 server trio holds the session tickets OpenSSL produced at the end of the
    handshake back until the first application write (trio issue 819). Whoever drives the
    ``SSLObject`` afterwards must send them first, in order, so :func:`take_tls_state` takes
    them (and clears the attribute so they cannot go out twice).

The handshake itself runs in :class:`mbsec.tls_stream.ServerTlsStream`, which keeps these
attributes under the same names and types, so both functions below work on either stream.

``_outgoing`` after a failed handshake
    OpenSSL writes the fatal alert (``certificate_required``, ``unknown_ca``, ...) into the
    outgoing BIO and then raises; trio's ``_retry`` re-raises the ``SSLError`` before it sends
    what is in the BIO, so the client would see a bare TCP close instead of the reason
    (R-44). :func:`pending_alert` reads those bytes so the session can send them.
"""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

import trio

from mbsec.tls_stream import ServerTlsStream

__all__ = ["TrioInternalsChanged", "check_trio_internals", "pending_alert", "take_tls_state"]

# (attribute, accepted types) on a fresh SSLStream, before any handshake.
_EXPECTED: tuple[tuple[str, tuple[type, ...]], ...] = (
    ("_ssl_object", (ssl.SSLObject,)),
    ("_incoming", (ssl.MemoryBIO,)),
    ("_outgoing", (ssl.MemoryBIO,)),
    ("_delayed_outgoing", (type(None), bytes)),
)


class TrioInternalsChanged(RuntimeError):
    """trio's ``SSLStream`` no longer has the private attributes mbsec relies on."""


def _changed(what: str) -> TrioInternalsChanged:
    return TrioInternalsChanged(
        f"trio {trio.__version__}: SSLStream internals changed ({what}); mbsec.trio_private "
        "needs updating for this trio release (see tests/test_trio_private.py), or pin trio "
        "below it in pyproject.toml"
    )


def take_tls_state(
    ssl_stream: trio.SSLStream[Any] | ServerTlsStream,
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    """The ``SSLStream``'s own ``SSLObject`` and memory BIOs, and the TLS 1.3 session tickets
    trio held back after the handshake (taken: the caller sends them before anything else).

    Call once, after ``do_handshake`` succeeded; the ``SSLStream`` must not be used for I/O
    afterwards (only ``transport_stream``). Raises :class:`TrioInternalsChanged` when the
    attributes are missing or of another type.
    """
    try:
        obj = ssl_stream._ssl_object
        incoming = ssl_stream._incoming
        outgoing = ssl_stream._outgoing
        delayed = ssl_stream._delayed_outgoing
    except AttributeError as e:
        raise _changed(f"missing {e.name or e}") from e
    if not (isinstance(obj, ssl.SSLObject) and isinstance(incoming, ssl.MemoryBIO)
            and isinstance(outgoing, ssl.MemoryBIO)
            and (delayed is None or isinstance(delayed, bytes | bytearray))):
        raise _changed(
            f"_ssl_object={type(obj).__name__}, _incoming={type(incoming).__name__}, "
            f"_outgoing={type(outgoing).__name__}, _delayed_outgoing={type(delayed).__name__}"
        )
    ssl_stream._delayed_outgoing = None
    return obj, incoming, outgoing, bytes(delayed or b"")


def pending_alert(ssl_stream: trio.SSLStream[Any] | ServerTlsStream) -> bytes:
    """The bytes OpenSSL left in the outgoing BIO when the handshake failed: the fatal alert
    trio did not send (see the module docstring). Empty when there is none.

    Never raises: it runs on the rejection path, where a missing alert only costs the client
    the reason; the test suite is what catches a trio that no longer leaves it there.
    """
    outgoing = getattr(ssl_stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO):
        return b""
    return outgoing.read()


class _NullStream(trio.abc.Stream):
    """A transport that is never used: :func:`check_trio_internals` only constructs."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.ClosedResourceError

    async def wait_send_all_might_not_block(self) -> None:
        raise trio.ClosedResourceError

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.ClosedResourceError

    async def aclose(self) -> None:
        pass


def check_trio_internals() -> None:
    """Construct a real client-side ``SSLStream`` (no I/O, no event loop needed), check every
    private attribute this module reads exists with the expected type, and that the
    ``SSLObject`` writes into that ``_outgoing`` BIO (its ClientHello).

    Raises :class:`TrioInternalsChanged` naming the trio version and what differs.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    stream = trio.SSLStream(_NullStream(), ctx)
    problems = []
    for name, types in _EXPECTED:
        if not hasattr(stream, name):
            problems.append(f"no {name}")
            continue
        value = getattr(stream, name)
        if not isinstance(value, types):
            want = " | ".join(t.__name__ for t in types)
            problems.append(f"{name} is {type(value).__name__}, expected {want}")
    if not problems:
        with contextlib.suppress(ssl.SSLWantReadError):
            stream._ssl_object.do_handshake()
        if not stream._outgoing.pending:
            problems.append("_ssl_object does not write into _outgoing")
    if problems:
        raise _changed("; ".join(problems))
