"""mbsec.sockready.readable_now: bytes waiting, told without waiting, on real sockets."""

from __future__ import annotations

import socket

from mbsec.sockready import readable_now


def test_readable_only_once_bytes_or_eof_wait() -> None:
    a, b = socket.socketpair()
    try:
        assert not readable_now(a)
        b.sendall(b"\x16\x03\x01")  # the start of a ClientHello
        assert readable_now(a)
        assert a.recv(16) == b"\x16\x03\x01"
        assert not readable_now(a)
        b.close()
        assert readable_now(a)  # an EOF is something to read too
    finally:
        a.close()
        b.close()


def test_closed_socket_is_not_readable() -> None:
    a, b = socket.socketpair()
    a.close()
    b.close()
    assert not readable_now(a)
