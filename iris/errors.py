"""The failures a caller of the binding may need to tell apart.

Mirrors the Go binding's ErrTimeout, ErrClosed and RemoteError. Local argument
mistakes raise the built-in ValueError; a peer breaking the wire protocol is
iris.codec.ProtocolError.
"""

import builtins


class TimeoutError(builtins.TimeoutError):  # noqa: A001 - mirrors iris.ErrTimeout on purpose
    """The operation did not complete before its timeout."""


class ClosedError(Exception):
    """The connection, service or tunnel was closed (or dropped) first."""


class RemoteError(Exception):
    """The remote handler failed; ``fault`` is the text it sent back.

    From this binding that is the exception's type and text, as in
    ``"KeyError: 'user'"``; other bindings send their own texts.
    """

    def __init__(self, fault: str):
        super().__init__(fault)
        self.fault = fault
