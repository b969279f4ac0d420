"""Tunnels on an event loop: ordered, flow-controlled message streams.

The asyncio twin of :class:`iris.Tunnel`, with the same flow control
(docs/protocol.md, section 6) and the same chunking and reassembly
(``iris.chunks``): a sender spends allowance before each chunk and waits
while it has none; a receiver grants allowance back as each message is
consumed. Waits are futures woken by the connection's read callback.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import chunks, codec
from ..errors import TimeoutError
from ..logs import ContextLog
from ..tunnel import CLOSE_TIMEOUT, SEND_BEHIND_ANOTHER, check_wait, validate_send
from ..tunnel_core import TunnelCore

if TYPE_CHECKING:
    from .connection import Connection


class Tunnel(TunnelCore):
    """One end of a tunnel; made by Connection.tunnel or given to handle_tunnel."""

    _conn: Connection  # TunnelCore's TunnelHost, with _wait_for_room for back-pressure

    def __init__(self, conn: Connection, tid: int, chunk_limit: int, log: ContextLog):
        super().__init__(conn, tid, chunk_limit, log)
        self._loop = asyncio.get_running_loop()
        self._send_lock = asyncio.Lock()  # one message's chunks must not interleave
        self._waiters: list[asyncio.Future[None]] = []  # woken on any change of state

    async def __aenter__(self) -> Tunnel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, message: bytes, timeout: float | None = None) -> None:
        """Send one message, waiting for allowance as needed.

        On TimeoutError part of the message may have been sent; the receiver
        discards that part when the next message starts, so the tunnel stays
        usable.
        """
        validate_send(message, timeout)
        deadline = None if timeout is None else self._loop.time() + timeout
        # Behind another send of this tunnel, the timeout applies too.
        if deadline is None:
            await self._send_lock.acquire()
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._send_lock.acquire()
            except builtins.TimeoutError:  # asyncio's; iris's derives from it
                raise TimeoutError(SEND_BEHIND_ANOTHER) from None
        try:
            for size_field, chunk in chunks.split(message, self._chunk_limit):
                size = len(chunk)

                def has_allowance(size: int = size) -> bool:
                    return self._allowance >= size

                await self._wait_until(has_allowance, deadline, "send waiting for allowance")
                # Then room: nothing awaits between it and the send below.
                await self._conn._wait_for_room(deadline)
                self._raise_if_closed()
                self._allowance -= size
                self._conn._send(codec.TunnelTransfer(self.id, size_field, chunk).encode())
        finally:
            self._send_lock.release()
        if self.log.is_debug():
            self.log.debug("tunnel message sent", size=len(message))

    async def recv(self, timeout: float | None = None) -> bytes:
        """The next whole message; ClosedError once closed and drained."""
        check_wait("receive", timeout)
        deadline = None if timeout is None else self._loop.time() + timeout
        await self._wait_until(lambda: self._inbox, deadline, "receive")
        message = self._inbox.popleft()
        self._grant(len(message))
        return message

    async def close(self) -> None:
        """Close both ends; waits briefly for the relay's acknowledgement."""
        if self.close_nowait():
            try:
                await self._wait_until(
                    lambda: self._closed_reason is not None,
                    self._loop.time() + CLOSE_TIMEOUT,
                    "close",
                    raise_if_closed=False,
                )
            except TimeoutError:
                self.log.warning("relay did not acknowledge the tunnel close")
        self.log.info("tunnel closed")

    def close_nowait(self) -> bool:
        """Send the close request without waiting; False if already closed."""
        if self._close_sent or self._closed_reason is not None:
            return False
        self._close_sent = True
        self._wake()
        return self._send_close()

    _close_unclaimed = close_nowait

    async def _wait_until(
        self,
        ready: Callable[[], object],
        deadline: float | None,
        what: str,
        raise_if_closed: bool = True,
    ) -> None:
        """Wait until ``ready()``; ClosedError once closed, TimeoutError at ``deadline``."""
        while not ready():
            if raise_if_closed:
                self._raise_if_closed()
            remaining = None if deadline is None else deadline - self._loop.time()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"tunnel {what} timed out")
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait([waiter], timeout=remaining)
            finally:
                waiter.cancel()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- called from the connection's read callback ------------------------------

    def _on_allow(self, size: int) -> None:
        self._allowance += size
        self._wake()

    def _on_transfer(self, size: int, chunk: bytes) -> None:
        message, discarded = self._reassembly.add(size, chunk)
        if message is not None:
            self._inbox.append(message)
            self._wake()
        if discarded:
            self._regrant_discarded(discarded)

    def _on_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._wake()
        self._conn._forget_tunnel(self.id)
