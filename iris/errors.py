"""The failures a caller of the binding may need to tell apart.

Mirrors the Go binding's ErrTimeout, ErrClosed and RemoteError, and adds
DeniedError for the relay's DENY; all derive from :class:`Error`, so
``except iris.Error`` catches whatever Iris itself reports. Local argument
mistakes raise the built-in ValueError; a peer breaking the wire protocol is
iris.codec.ProtocolError.
"""

import builtins


class Error(Exception):
    """Base of the failures the binding reports (not of argument errors)."""


class TimeoutError(Error, builtins.TimeoutError):  # noqa: A001 - mirrors iris.ErrTimeout
    """The operation did not complete before its timeout.

    Also a built-in TimeoutError, so code written against the standard library
    (``except TimeoutError``) keeps working.
    """


class ClosedError(Error):
    """The connection, service or tunnel was closed (or dropped) first."""


class DeniedError(Error, builtins.ConnectionRefusedError):
    """The relay refused the connection at the handshake (its DENY); ``reason``
    is the relay's text: a protocol version mismatch, or, on a relay with
    permissions, a user that may not serve the cluster.

    Also a built-in ConnectionRefusedError, which a denial was before this
    class, so ``except ConnectionRefusedError`` keeps working.
    """

    def __init__(self, reason: str):
        super().__init__(f"relay denied the connection: {reason}")
        self.reason = reason


class RemoteError(Error):
    """The remote handler failed; ``fault`` is the text it sent back.

    From this binding that is the exception's type and text, as in
    ``"KeyError: 'user'"``; other bindings send their own texts.
    """

    def __init__(self, fault: str):
        super().__init__(fault)
        self.fault = fault
