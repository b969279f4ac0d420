"""The bound on the bytes a connection has queued but not yet sent.

Without one, a caller faster than the relay reads makes the client grow
instead of wait: 1000 concurrent 1 MiB requests on one ``iris.aio``
connection took it from 39 to 1,521 MiB (issue 18). Both bindings count the
bytes they have queued and, over the bound, make ``request``, ``publish``,
``broadcast`` and tunnel sends wait for room: block in ``iris``, await in
``iris.aio``.

"Over" is strictly more than the bound, checked before a message is queued.
So a message larger than the bound still goes whenever the queue has drained
to the bound (an empty queue is never over it), and the queue holds at most
the bound plus one message for each caller let in at the same moment.
"""

from __future__ import annotations

from .errors import TimeoutError

# A few tens of MiB: dozens of 1 MiB messages in flight keep the socket busy,
# and a client's memory stays small next to the relay's buffers for it.
DEFAULT_SEND_BUFFER = 32 * 1024 * 1024
# Larger is a typo rather than a plan: 1 TiB.
MAX_SEND_BUFFER = 1 << 40


def check_send_buffer(send_buffer: int) -> int:
    """``send_buffer`` if it is a whole number of bytes from 1 to MAX_SEND_BUFFER,
    else ValueError, as for the other numeric arguments (issue 17)."""
    is_int = isinstance(send_buffer, int) and not isinstance(send_buffer, bool)
    if not (is_int and 1 <= send_buffer <= MAX_SEND_BUFFER):
        raise ValueError(
            f"send_buffer must be an int of bytes from 1 to {MAX_SEND_BUFFER}, got {send_buffer!r}"
        )
    return send_buffer


def no_room(send_buffer: int) -> TimeoutError:
    """The error of a call whose deadline passed while it waited for room;
    nothing of it was queued."""
    return TimeoutError(f"timed out waiting for room to send: over {send_buffer} bytes queued")
