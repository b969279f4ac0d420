"""Tunnels: ordered, flow-controlled message streams to one cluster member.

Flow control follows docs/protocol.md section 6: the sender spends allowance the
relay granted before each chunk and blocks while it has none; the receiver
grants allowance back as the application consumes each message. A message
larger than the chunk limit travels as several chunks and is reassembled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import chunks, codec
from .errors import TimeoutError
from .logs import ContextLog
from .tunnel_core import TunnelCore

if TYPE_CHECKING:
    from .connection import Connection

# How long close() waits for the relay to acknowledge the TUN_CLOSE.
CLOSE_TIMEOUT = 5.0
# A send whose timeout passed while another send of its tunnel went on.
SEND_BEHIND_ANOTHER = "tunnel send timed out behind another send on the tunnel"


def wait_until(
    cond: threading.Condition,
    ready: Callable[[], object],
    raise_if_closed: Callable[[], None],
    deadline: float | None,
    what: str,
) -> None:
    """Wait on ``cond`` (held by the caller) until ``ready()`` is true.

    Raises what ``raise_if_closed`` raises once the tunnel is closed, and
    iris.TimeoutError naming ``what`` at the monotonic ``deadline``.
    """
    while not ready():
        raise_if_closed()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"tunnel {what} timed out")
        cond.wait(remaining)


def validate_send(message: bytes, timeout: float | None) -> None:
    """Refuse what ``send`` cannot deliver, with a ValueError.

    A tunnel message travels in chunks, but the receiving binding holds it
    whole, within the allowance it grants a tunnel (64 MiB, TUNNEL_BUFFER),
    so the relay's limit on every other message applies to it too. The
    timeout is checked here, before anything is sent, so that a mistake
    surfaces in the caller's code (under irishost the send itself runs in
    the supervisor, far from the handler).
    """
    if not isinstance(message, bytes | bytearray | memoryview) or not message:
        raise ValueError("tunnel message must be non-empty bytes")
    if len(message) > codec.MAX_MESSAGE:
        raise ValueError(codec.too_large("tunnel message", len(message)))
    check_wait("send", timeout)


def check_wait(what: str, timeout: float | None) -> None:
    """ValueError unless ``timeout`` is None or seconds from 0 to MAX_TIMEOUT:
    NaN would never time out, and a wait past threading's TIMEOUT_MAX raises
    OverflowError midway."""
    is_number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if timeout is not None and not (is_number and 0 <= timeout <= codec.MAX_TIMEOUT):
        raise ValueError(
            f"tunnel {what} timeout must be None or a number of seconds from 0 to "
            f"{codec.MAX_TIMEOUT:g}, got {timeout!r}"
        )


class Tunnel(TunnelCore):
    """One end of a tunnel; made by Connection.tunnel or given to handle_tunnel."""

    _conn: Connection  # TunnelCore's TunnelHost, with _wait_for_room for back-pressure

    def __init__(self, conn: Connection, tid: int, chunk_limit: int, log: ContextLog):
        super().__init__(conn, tid, chunk_limit, log)
        self._cond = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()  # one message's chunks must not interleave

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: bytes, timeout: float | None = None) -> None:
        """Send one message, waiting for allowance as needed.

        On TimeoutError part of the message may have been sent; the receiver
        discards that part when the next message starts, so the tunnel stays
        usable.
        """
        validate_send(message, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        # Behind another send of this tunnel, the timeout applies too: that
        # one may wait for room or allowance as long as its own allows.
        wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._send_lock.acquire(timeout=wait):
            raise TimeoutError(SEND_BEHIND_ANOTHER)
        try:
            for size_field, chunk in chunks.split(message, self._chunk_limit):
                # Room first: a chunk refused there has spent no allowance.
                self._conn._wait_for_room(deadline)
                self._spend(len(chunk), deadline)
                self._conn._send(codec.TunnelTransfer(self.id, size_field, chunk).encode())
        finally:
            self._send_lock.release()
        if self.log.is_debug():
            self.log.debug("tunnel message sent", size=len(message))

    def _spend(self, size: int, deadline: float | None) -> None:
        with self._cond:
            wait_until(
                self._cond,
                lambda: self._allowance >= size,
                self._raise_if_closed,
                deadline,
                "send waiting for allowance",
            )
            self._raise_if_closed()
            self._allowance -= size

    def recv(self, timeout: float | None = None) -> bytes:
        """The next whole message; ClosedError once closed and drained."""
        check_wait("receive", timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            wait_until(self._cond, lambda: self._inbox, self._raise_if_closed, deadline, "receive")
            message = self._inbox.popleft()
        self._grant(len(message))
        return message

    def close(self) -> None:
        """Close both ends; waits briefly for the relay's acknowledgement."""
        if self.close_async():
            with self._cond:
                self._cond.wait_for(lambda: self._closed_reason is not None, CLOSE_TIMEOUT)
        self.log.info("tunnel closed")

    def close_async(self) -> bool:
        """Send the close request without waiting; False if already closed."""
        with self._cond:
            if self._close_sent or self._closed_reason is not None:
                return False
            self._close_sent = True
        return self._send_close()

    _close_unclaimed = close_async

    # -- called by the connection's reader thread ---------------------------------

    def _on_allow(self, size: int) -> None:
        with self._cond:
            self._allowance += size
            self._cond.notify_all()

    def _on_transfer(self, size: int, chunk: bytes) -> None:
        with self._cond:
            message, discarded = self._reassembly.add(size, chunk)
            if message is not None:
                self._inbox.append(message)
                self._cond.notify_all()
        if discarded:
            self._regrant_discarded(discarded)

    def _on_closed(self, reason: str) -> None:
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._cond.notify_all()
        self._conn._forget_tunnel(self.id)
