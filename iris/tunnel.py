"""Tunnels: ordered, flow-controlled message streams to one cluster member.

Flow control follows PROTOCOL.md section 6: the sender spends allowance the
relay granted before each chunk and blocks while it has none; the receiver
grants allowance back as the application consumes each message. A message
larger than the chunk limit travels as several chunks and is reassembled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import codec
from .errors import ClosedError, TimeoutError
from .logs import ContextLog

if TYPE_CHECKING:
    from .connection import Connection

# How long close() waits for the relay to acknowledge the TUN_CLOSE.
CLOSE_TIMEOUT = 5.0


def wait_until(
    cond: threading.Condition,
    ready: Callable[[], bool],
    raise_if_closed: Callable[[], None],
    deadline: float | None,
    what: str,
) -> None:
    """Wait on ``cond`` (held by the caller) until ``ready()``.

    Raises what ``raise_if_closed`` raises once the tunnel is closed, and
    iris.TimeoutError naming ``what`` at the monotonic ``deadline``.
    """
    while not ready():
        raise_if_closed()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"tunnel {what} timed out")
        cond.wait(remaining)


def validate_message(message: bytes) -> None:
    """Refuse what ``send`` cannot deliver, with a ValueError.

    A tunnel message travels in chunks, but the receiving binding holds it
    whole, within the allowance it grants a tunnel (64 MiB, TUNNEL_BUFFER),
    so the relay's limit on every other message applies to it too.
    """
    if not isinstance(message, bytes | bytearray | memoryview) or not message:
        raise ValueError("tunnel message must be non-empty bytes")
    if len(message) > codec.MAX_MESSAGE:
        raise ValueError(codec.too_large("tunnel message", len(message)))


class Tunnel:
    """One end of a tunnel; made by Connection.tunnel or given to handle_tunnel."""

    def __init__(self, conn: Connection, tid: int, chunk_limit: int, log: ContextLog):
        self.id = tid
        self.log = log
        self._conn = conn
        self._chunk_limit = chunk_limit
        self._cond = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()  # one message's chunks must not interleave
        self._allowance = 0  # bytes the relay lets us send
        self._inbox: deque[bytes] = deque()
        self._partial: list[bytes] = []  # chunks of the message being received
        self._partial_size = 0  # its announced length
        self._partial_have = 0
        self._close_sent = False
        self._closed_reason: str | None = None

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, message: bytes, timeout: float | None = None) -> None:
        """Send one message, waiting for allowance as needed.

        On TimeoutError part of the message may have been sent; the receiver
        discards that part when the next message starts, so the tunnel stays
        usable.
        """
        validate_message(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(message)
        size, limit = len(view), self._chunk_limit
        with self._send_lock:
            for pos in range(0, size, limit):
                chunk = bytes(view[pos : pos + limit])
                self._spend(len(chunk), deadline)
                self._conn._send(codec.TunnelTransfer(self.id, 0 if pos else size, chunk).encode())
        if self.log.is_debug():
            self.log.debug("tunnel message sent", size=size)

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
        try:
            self._conn._send(codec.TunnelClose(self.id).encode())
        except ClosedError:
            self._on_closed("connection closed")
            return False
        return True

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise ClosedError(self._closed_reason or "tunnel closed")
        if self._close_sent:
            raise ClosedError("tunnel closed")

    def _grant(self, size: int) -> None:
        try:
            self._conn._send(codec.TunnelAllow(self.id, size).encode())
        except ClosedError:
            pass  # the tunnel died with its connection; nothing left to grant

    # -- called by the connection's reader thread ---------------------------------

    def _on_allow(self, size: int) -> None:
        with self._cond:
            self._allowance += size
            self._cond.notify_all()

    def _on_transfer(self, size: int, chunk: bytes) -> None:
        discarded = 0
        with self._cond:
            if size:  # a first chunk: an unfinished message before it is abandoned
                if self._partial:
                    discarded = self._partial_have
                self._partial, self._partial_size, self._partial_have = [], size, 0
            elif not self._partial_size:
                raise codec.ProtocolError(f"tunnel {self.id}: continuation without a message")
            self._partial.append(chunk)
            self._partial_have += len(chunk)
            if self._partial_have > self._partial_size:
                raise codec.ProtocolError(f"tunnel {self.id}: message longer than announced")
            if self._partial_have == self._partial_size:
                self._inbox.append(b"".join(self._partial))
                self._partial, self._partial_size, self._partial_have = [], 0, 0
                self._cond.notify_all()
        if discarded:
            # The sender timed out mid-message; return the allowance the
            # abandoned part used, or the tunnel would slowly starve.
            self.log.warning("incomplete tunnel message discarded", size=discarded)
            self._grant(discarded)

    def _on_closed(self, reason: str) -> None:
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._cond.notify_all()
        self._conn._forget_tunnel(self.id)
