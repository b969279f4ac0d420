"""The failures a caller of the binding may need to tell apart.

Mirrors the Go binding's ErrTimeout, ErrClosed and RemoteError; all three
derive from :class:`Error`, so ``except iris.Error`` catches whatever Iris
itself reports. Local argument mistakes raise the built-in ValueError; a peer
breaking the wire protocol is iris.codec.ProtocolError.
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


class RemoteError(Error):
    """The remote handler failed; ``fault`` is the text it sent back.

    From this binding that is the exception's type and text, as in
    ``"KeyError: 'user'"``; other bindings send their own texts.
    """

    def __init__(self, fault: str):
        super().__init__(fault)
        self.fault = fault
