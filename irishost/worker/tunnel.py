"""A tunnel as a worker's handler sees it: the iris.Tunnel surface, proxied.

The real tunnel lives in the supervisor, on the relay connection. Messages
cross the rings: TUN_DATA frames bring the remote end's messages, a TUN_ACK
after each ``recv`` lets the supervisor fetch more (so flow control reaches
all the way to the handler), and each ``send`` waits for the supervisor's
TUN_SENT, so a send returns or times out exactly as iris.Tunnel.send does.
:class:`LoopTunnelProxy` is the same for iris.aio handlers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeAlias

import iris
from iris.logs import ContextLog
from iris.tunnel import validate_send, wait_until

from ..wire import frames

# A worker's open tunnels by id; each removes itself when it closes.
TunnelRegistry: TypeAlias = "dict[int, TunnelProxy]"


class TunnelProxy:
    """What both proxies share: the tunnel's id, the queues its frames fill, its close.

    The waits differ (a condition variable for threads, futures on a loop),
    so each subclass says how a change is awaited and signalled.
    """

    def __init__(
        self,
        tunnel_id: int,
        send_frame: Callable[[bytes], None],
        log: ContextLog,
        registry: TunnelRegistry,
    ):
        self.id = tunnel_id
        self.log = log
        self._send_frame = send_frame
        self._registry = registry
        self._inbox: deque[bytes] = deque()
        self._sent: deque[str | None] = deque()  # outcomes of TUN_SEND, in order
        self._closed_reason: str | None = None
        self._make_waits()

    def _make_waits(self) -> None:
        """Make what ``send`` and ``recv`` wait on: a condition, or the loop's futures."""
        raise NotImplementedError

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise iris.ClosedError(self._closed_reason or "tunnel closed")

    @staticmethod
    def _raise_send_error(error: str | None) -> None:
        """Raise what a TUN_SENT's outcome says went wrong, as iris.Tunnel.send would."""
        if error == "timeout":
            raise iris.TimeoutError("tunnel send timed out waiting for allowance")
        if error is not None:
            raise iris.ClosedError(error)

    def _tell_closed(self) -> None:
        """The handler closed the tunnel: the supervisor needs no answer to a TUN_CLOSE."""
        self._registry.pop(self.id, None)
        self._send_frame(frames.TunClose(self.id).encode())
        self.log.info("tunnel closed")


class ThreadTunnelProxy(TunnelProxy):
    """The iris.Tunnel surface, proxied, for handlers on a worker's threads."""

    def _make_waits(self) -> None:
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()

    def __enter__(self) -> ThreadTunnelProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, message: bytes, timeout: float | None = None) -> None:
        validate_send(message, timeout)
        with self._send_lock:
            self._raise_if_closed()
            self._send_frame(frames.TunSend(self.id, bytes(message), timeout).encode())
            with self._cond:
                # The supervisor answers by the timeout; it never stays silent
                # unless it dies, and then the tunnel is closed for us.
                self._cond.wait_for(lambda: self._sent or self._closed_reason is not None)
                if not self._sent:
                    self._raise_if_closed()
                error = self._sent.popleft()
        self._raise_send_error(error)

    def recv(self, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            wait_until(self._cond, lambda: self._inbox, self._raise_if_closed, deadline, "receive")
            message = self._inbox.popleft()
        self._send_frame(frames.TunAck(self.id, len(message)).encode())
        return message

    def close(self) -> None:
        with self._cond:
            if self._closed_reason is not None:
                return
            self._closed_reason = ""
            self._cond.notify_all()
        self._tell_closed()

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


class LoopTunnelProxy(TunnelProxy):
    """The iris.aio.Tunnel surface, proxied, for handlers on a worker's event loop.

    The same frames as :class:`ThreadTunnelProxy`; the waits are futures resolved
    by the loop executor's frame pump instead of condition variables.
    """

    def _make_waits(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()
        self._changed = self._loop.create_future()

    async def __aenter__(self) -> LoopTunnelProxy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, message: bytes, timeout: float | None = None) -> None:
        validate_send(message, timeout)
        async with self._send_lock:
            self._raise_if_closed()
            self._send_frame(frames.TunSend(self.id, bytes(message), timeout).encode())
            # The supervisor answers by the timeout; it never stays silent
            # unless it dies, and then the tunnel is closed for us.
            while not self._sent:
                self._raise_if_closed()
                await self._next_change(None)
            error = self._sent.popleft()
        self._raise_send_error(error)

    async def recv(self, timeout: float | None = None) -> bytes:
        deadline = None if timeout is None else self._loop.time() + timeout
        while not self._inbox:
            self._raise_if_closed()
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                raise iris.TimeoutError("tunnel receive timed out")
            await self._next_change(remaining)
        message = self._inbox.popleft()
        self._send_frame(frames.TunAck(self.id, len(message)).encode())
        return message

    async def close(self) -> None:
        self.close_nowait()

    def close_nowait(self) -> None:
        """Close at once: the supervisor needs no answer to a TUN_CLOSE."""
        if self._closed_reason is not None:
            return
        self._closed_reason = ""
        self._notify()
        self._tell_closed()

    async def _next_change(self, timeout: float | None) -> None:
        await asyncio.wait([self._changed], timeout=timeout)

    def _notify(self) -> None:
        if not self._changed.done():
            self._changed.set_result(None)
        self._changed = self._loop.create_future()

    # -- frames from the supervisor, on the worker's loop ------------------------

    def on_data(self, message: bytes) -> None:
        self._inbox.append(message)
        self._notify()

    def on_sent(self, error: str | None) -> None:
        self._sent.append(error)
        self._notify()

    def on_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._notify()
        self._registry.pop(self.id, None)
