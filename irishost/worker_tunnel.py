"""A tunnel as a worker's handler sees it: the iris.Tunnel surface, proxied.

The real tunnel lives in the supervisor, on the relay connection. Messages
cross the rings: TUN_DATA frames bring the remote end's messages, a TUN_ACK
after each ``recv`` lets the supervisor fetch more (so flow control reaches
all the way to the handler), and each ``send`` waits for the supervisor's
TUN_SENT, so a send returns or times out exactly as iris.Tunnel.send does.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import iris
from iris.logs import ContextLog
from iris.tunnel import wait_until

from . import frames
from .frames import Kind


def _check_timeout(timeout: float | None) -> None:
    """Refuse here what the supervisor's Tunnel.send could not take.

    The send runs in the supervisor; a timeout it cannot use would fail
    there, far from the handler's mistake.
    """
    is_number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if timeout is not None and not (is_number and math.isfinite(timeout) and timeout >= 0):
        raise ValueError(
            f"tunnel send timeout must be None or a number of seconds >= 0, got {timeout!r}"
        )


class WorkerTunnel:
    def __init__(
        self,
        tunnel_id: int,
        send_frame: Callable[[bytes], None],
        log: ContextLog,
        registry: dict[int, WorkerTunnel],
    ):
        self.id = tunnel_id
        self.log = log
        self._send_frame = send_frame
        self._registry = registry
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._inbox: deque[bytes] = deque()
        self._sent: deque[str | None] = deque()  # outcomes of TUN_SEND, in order
        self._closed_reason: str | None = None

    def __enter__(self) -> WorkerTunnel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, message: bytes, timeout: float | None = None) -> None:
        if not isinstance(message, bytes | bytearray | memoryview) or not message:
            raise ValueError("tunnel message must be non-empty bytes")
        _check_timeout(timeout)
        with self._send_lock:
            self._raise_if_closed()
            self._send_frame(frames.encode(Kind.TUN_SEND, self.id, bytes(message), timeout))
            with self._cond:
                # The supervisor answers by the timeout; it never stays silent
                # unless it dies, and then the tunnel is closed for us.
                self._cond.wait_for(lambda: self._sent or self._closed_reason is not None)
                if not self._sent:
                    self._raise_if_closed()
                error = self._sent.popleft()
        if error == "timeout":
            raise iris.TimeoutError("tunnel send timed out waiting for allowance")
        if error is not None:
            raise iris.ClosedError(error)

    def recv(self, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            wait_until(self._cond, lambda: self._inbox, self._raise_if_closed, deadline, "receive")
            message = self._inbox.popleft()
        self._send_frame(frames.encode(Kind.TUN_ACK, self.id, len(message)))
        return message

    def close(self) -> None:
        with self._cond:
            if self._closed_reason is not None:
                return
            self._closed_reason = ""
            self._cond.notify_all()
        self._registry.pop(self.id, None)
        self._send_frame(frames.encode(Kind.TUN_CLOSE, self.id))
        self.log.info("tunnel closed")

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise iris.ClosedError(self._closed_reason or "tunnel closed")

    # -- frames from the supervisor, on the worker's main thread ------------------

    def on_data(self, message: bytes) -> None:
        with self._cond:
            self._inbox.append(message)
            self._cond.notify_all()

    def on_sent(self, error: str | None) -> None:
        with self._cond:
            self._sent.append(error)
            self._cond.notify_all()

    def on_closed(self, reason: str) -> None:
        with self._cond:
            if self._closed_reason is None:
                self._closed_reason = reason
            self._cond.notify_all()
        self._registry.pop(self.id, None)
