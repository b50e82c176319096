"""Protocol errors that say whose fault it is and what the I/O layer must do.

Modelled on h11's ``RemoteProtocolError`` / ``LocalProtocolError``: the sans-IO core never
touches a socket, so every error carries the action the caller has to take.
"""

from __future__ import annotations

from enum import Enum


class Action(Enum):
    """What the I/O layer does with a protocol error."""

    CLOSE = "close"  # framing is broken: drop the connection, forward nothing
    EXCEPTION = "exception"  # framing is fine: answer with a Modbus exception response


class ProtocolError(Exception):
    """Base class: ``reason`` is a short machine-readable slug for logs and metrics."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        action: Action = Action.CLOSE,
        exception_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.action = action
        self.exception_code = exception_code
        if action is Action.EXCEPTION and exception_code is None:
            raise ValueError("an EXCEPTION action needs an exception_code")


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid."""


class LocalProtocolError(ProtocolError):
    """We were asked to encode something invalid (a bug on our side, never the peer's)."""
