"""A connection to the local Iris relay on an asyncio event loop: the I/O shell of a Session.

The same protocol and semantics as :class:`iris.Connection`, whose rules both
take from the pure ``iris.session.Session``, driven by the loop instead of a
reader thread: the transport hands received bytes to the session, and the
events it returns complete waiting futures or go to handler pools
(``iris.aio.pool``).

    coroutines --Session op--> outbound batch --one write per loop turn--> relay
    protocol   <--events-- Session.receive_data <-------------------------- relay
        |-- replies / tunnel answers -> waiting futures
        |-- requests, broadcasts, tunnels -> the service's Inbound
        |-- events -> subscription pools
        `-- tunnel allowance and data -> Tunnel objects

Why it is built this way (speed is the point of this binding):

- ``asyncio.BufferedProtocol``, not streams: bytes are received into one
  preallocated buffer and fed straight to the decoder, with no StreamReader
  and no task per connection.
- A request is a future, not a task: the reply completes it from inside
  the read that brought it.
- Writes are batched: packets queued in one loop turn leave in one
  ``transport.write``; those queued while handling a read leave at its end.
  A batch is written as soon as it holds FLUSH_PACKETS, so that the relay
  works on the first packets while the rest are being made.
- The bytes queued but not yet sent (``_out`` and the transport's buffer)
  are bounded by ``send_buffer`` (iris.send_buffer): over it, the public
  operations await room before they encode anything, so a thousand
  concurrent large requests wait instead of all being copied into memory.
  The check adds one integer and reads the transport's buffer size; an event
  is awaited only over the bound.
- The relay answers every request by its deadline, so there is no timer per
  request; one sweep a second fails the calls of a relay that stopped
  answering.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, Protocol, TypeVar, cast

from .. import codec
from .. import session as protocol
from ..connection import CLOSE_TIMEOUT, DEFAULT_PORT, HANDSHAKE_TIMEOUT, RECV_SIZE
from ..dispatch import Inbound, MemberConnection
from ..errors import ClosedError, TimeoutError
from ..handlers import TopicHandler
from ..limits import TopicLimits
from ..logs import ContextLog, HandlerErrorLog
from ..send_buffer import DEFAULT_SEND_BUFFER, check_send_buffer, no_room
from ..session import PendingCall, Session, Subscription, check_port
from ..tunnel_core import TUNNEL_HANDLERS, TunnelRoutes
from .pool import HandlerPool
from .tunnel import Tunnel

# How often pending calls are checked against their deadline (which includes
# iris.session.RELAY_GRACE).
SWEEP_SECONDS = 1.0
# The transport pauses (and its resume wakes senders waiting for room) past
# this many buffered bytes, or past send_buffer if that is smaller: a few
# chunks, enough to keep the socket busy.
WRITE_HIGH_WATER = 1024 * 1024
# A turn's packets up to this size go out joined, in one write; a larger
# batch (large messages) is written packet by packet.
JOIN_LIMIT = 1024 * 1024
# A turn's packets go out when this many have gathered, not only at its end.
# One write for a whole turn's requests leaves the relay and the peer idle
# until the requester has made the last of them, and the three then take
# turns; writing as they gather lets them work at once, on separate cores.
# Measured (peer_bench, echo x64, 2 cores): 16 and 32 alike, +25 % round
# trips; 32 makes fewer writes.
FLUSH_PACKETS = 32

_client_ids = itertools.count(1)


class _RelayProtocol(asyncio.BufferedProtocol):
    """The transport's callbacks, passed on to the connection."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._buffer = memoryview(bytearray(RECV_SIZE))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # create_connection's transport is a stream one, which can write. Over
        # send_buffer it is then paused, so its resume_writing comes when room does.
        high = min(WRITE_HIGH_WATER, self._conn._send_buffer)
        cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=high)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._conn._on_bytes(self._buffer[:nbytes])

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn._end(None if exc is None else str(exc))

    def resume_writing(self) -> None:
        self._conn._room.set()


class Connection(MemberConnection[Tunnel], TunnelRoutes[Tunnel]):
    """A live attachment to the relay; use :func:`connect` or :func:`iris.aio.register`."""

    tunnel_class = Tunnel

    def __init__(
        self,
        cluster: str = "",
        log: ContextLog | None = None,
        send_buffer: int = DEFAULT_SEND_BUFFER,
        inbound: Callable[[Connection], Inbound[Tunnel]] | None = None,
    ):
        """Not attached yet: :meth:`_attach` does that (connect and register
        call it). A member (non-empty ``cluster``) passes ``inbound``, a
        factory of the Inbound that receives its requests, broadcasts and tunnels."""
        self._send_buffer = check_send_buffer(send_buffer)
        self.log = log or ContextLog().new(client=next(_client_ids))
        self.cluster = cluster
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._event_errors = HandlerErrorLog(self.log)  # all subscriptions share one budget
        self.inbound: Inbound[Tunnel] | None = inbound(self) if inbound else None
        self._session: Session[asyncio.Future[Any], Tunnel, HandlerPool] = self._new_session(
            self._new_tunnel
        )
        self._out: list[bytes] = []
        self._out_bytes = 0  # the size of what _out holds
        self._flush_pending = False
        self._reading = False  # inside _on_bytes: its end flushes what was queued
        self._sweeper: asyncio.TimerHandle | None = None
        # Cleared by a sender that found no room; set when room may have come
        # (a flush, the transport's resume) or the connection ended.
        self._room = asyncio.Event()
        self._accepted: asyncio.Future[None] = self._loop.create_future()
        self._finished: asyncio.Future[None] = self._loop.create_future()  # set once ended

    async def _attach(self, port: int) -> None:
        """Dial the relay, send INIT and wait for its answer."""
        check_port(port)
        self.log.info("connecting to relay", relay_port=port, cluster=self.cluster or None)
        errors: list[OSError] = []
        for host in ("127.0.0.1", "::1"):
            try:
                self._transport, _ = await self._loop.create_connection(
                    lambda: _RelayProtocol(self), host, port
                )
                break
            except OSError as err:
                errors.append(err)
        else:
            first = errors[0]
            raise ConnectionRefusedError(f"no Iris relay on port {port}: {first}") from first
        self._transport.write(self._session.hello(self.cluster))
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await asyncio.shield(self._accepted)
        except BaseException:
            self._transport.abort()
            raise
        self.log.info("relay connection established")

    # -- teardown ---------------------------------------------------------------

    async def close(self) -> None:
        """Detach gracefully; pending calls on this connection raise ClosedError."""
        self._say_goodbye(self._session.close())
        await asyncio.wait([self._finished], timeout=CLOSE_TIMEOUT)
        self._end()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._session.ended

    def _end(self, lost: str | None = None) -> None:
        """End the session, in its order: fail what is pending, close the
        tunnels and pools, release the transport; report a drop. Idempotent."""
        ended = self._session.end(lost)
        if not ended.first:
            return
        self._out.clear()
        self._out_bytes = 0
        for call in ended.calls:
            self._resolve(call, ClosedError(ended.reason))
        self._close_tunnels(ended.tunnels, ended.reason)
        for subscription in ended.subscriptions:
            subscription.pool.cancel()
        self._close_inbound()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._room.set()  # wake senders waiting for room; they find the end
        if not self._accepted.done():
            error = ConnectionError(f"relay ended the handshake: {ended.reason}")
            self._accepted.set_exception(error)
        if self._transport is not None:
            self._transport.close()
        self._finished.set_result(None)
        self._report_drop(ended)

    # -- sending ---------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Queue ``data`` for this loop turn's write."""
        if self._session.close_reason is not None:  # .ended, inline: this runs per message
            raise self._session.closed_error()
        self._out.append(data)
        self._out_bytes += len(data)
        if len(self._out) >= FLUSH_PACKETS:
            self._write_out()
        elif not self._flush_pending and not self._reading:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        self._write_out()

    def _write_out(self) -> None:
        out, size = self._out, self._out_bytes
        if out and self._session.close_reason is None:  # not .ended, inline
            self._out = []
            self._out_bytes = 0
            # Attached: nothing is queued before _attach set the transport.
            transport = cast(asyncio.Transport, self._transport)
            if len(out) == 1:
                transport.write(out[0])
            elif size <= JOIN_LIMIT:
                transport.write(b"".join(out))
            else:
                # One at a time, each let go of once the transport has it: a
                # join would hold the batch three times (packets, join, buffer).
                out.reverse()
                while out:
                    transport.write(out.pop())
            # Still over: the transport is paused, and its resume_writing wakes.
            if not self._room.is_set() and not self._over_bound():
                self._room.set()

    def _over_bound(self) -> bool:
        # Attached: senders run after _attach set the transport.
        transport = cast(asyncio.Transport, self._transport)
        return self._out_bytes + transport.get_write_buffer_size() > self._send_buffer

    async def _wait_for_room(self, deadline: float | None = None) -> None:
        """Wait while more than ``send_buffer`` bytes are queued; iris.TimeoutError
        past ``deadline`` (the loop's time), ClosedError if the connection ends.

        Called before a message is encoded, so a waiting caller holds no copy
        of it and one refused here has queued nothing. The operations call it
        only when _over_bound: under the bound a send costs no coroutine.
        """
        while not self._session.ended and self._over_bound():
            self._room.clear()
            if deadline is None:
                await self._room.wait()
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    await self._room.wait()
            except builtins.TimeoutError:  # asyncio's; iris's derives from it
                raise no_room(self._send_buffer) from None
        if self._session.ended:
            raise self._session.closed_error()

    def _resolve(self, call: PendingCall[asyncio.Future[Any]], result: object) -> None:
        future = call.waiter
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def _watch_deadlines(self) -> None:
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Fail calls whose relay has not answered by their deadline and the grace."""
        self._sweeper = None
        for call in self._session.overdue(self._loop.time()):
            self._resolve(call, TimeoutError("the relay did not answer in time"))
        if self._session.pending:
            self._watch_deadlines()

    # -- the public operations ---------------------------------------------------------

    async def request(self, cluster: str, request: bytes, timeout: float) -> bytes:
        """Send ``request`` to one member of ``cluster`` and wait for its reply.

        Raises iris.TimeoutError, iris.RemoteError (the member's fault text) or
        iris.ClosedError. Cancelling the call forgets the request; a late
        reply is dropped. Over the connection's ``send_buffer`` it first waits
        for room; the timeout counts that wait too.
        """
        if self._over_bound():
            self._session.check_request(cluster, request, timeout)  # a mistake is not kept waiting
            await self._wait_for_room(self._loop.time() + timeout)
        future: asyncio.Future[Any] = self._loop.create_future()
        now = self._loop.time()
        call, data = self._session.request(cluster, request, timeout, now, future)
        if self._sweeper is None:
            self._watch_deadlines()
        self._send(data)
        try:
            reply = await future
        except BaseException:  # cancelled (or failed: then the session let go of it)
            self._session.forget(call)  # an answered call has left its tables already
            raise
        return call.outcome(reply)

    async def broadcast(self, cluster: str, message: bytes) -> None:
        """Send ``message`` to every member of ``cluster`` (best effort).

        Over the connection's ``send_buffer`` it waits until there is room,
        or raises ClosedError if the connection ends first: no timeout, as in
        the Go binding.
        """
        if self._over_bound():
            self._session.check_broadcast(cluster, message)  # a mistake is not kept waiting
            await self._wait_for_room()
        self._send(self._session.broadcast(cluster, message))

    async def publish(self, topic: str, event: bytes) -> None:
        """Deliver ``event`` to every subscriber of ``topic`` (best effort).

        Waits for room as :meth:`broadcast` does.
        """
        if self._over_bound():
            self._session.check_publish(topic, event)  # a mistake is not kept waiting
            await self._wait_for_room()
        self._send(self._session.publish(topic, event))

    async def subscribe(
        self,
        topic: str,
        handler: TopicHandler | Callable[[bytes], Awaitable[None] | None],
        limits: TopicLimits | None = None,
    ) -> None:
        """Receive the events of ``topic`` through ``handler``.

        ``handler`` is an ``async def`` or a plain callable taking the event
        bytes, or a TopicHandler whose ``handle_event`` is either. At most
        ``limits.event_threads`` of its calls run at once.
        """
        subscription = Subscription.of(topic, handler, limits, HandlerPool, self._event_errors)
        self._send(self._session.subscribe(topic, subscription))
        subscription.pool.start()
        self.log.info("subscribing to topic", topic=topic)
        await self._wait_for_room()

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; events already queued are still handled."""
        subscription, data = self._session.unsubscribe(topic)
        self.log.info("unsubscribing from topic", topic=topic)
        subscription.pool.close()
        self._send(data)
        await self._wait_for_room()

    async def tunnel(self, cluster: str, timeout: float) -> Tunnel:
        """Open an ordered, flow-controlled stream to one member of ``cluster``."""
        future: asyncio.Future[Tunnel] = self._loop.create_future()
        call, data = self._session.tunnel(cluster, timeout, self._loop.time(), future)
        self._watch_deadlines()
        self.log.info("opening tunnel", cluster=cluster, tunnel=call.id)
        self._send(data)
        try:
            # A late answer finds no call, and its tunnel is closed at once.
            return await future
        finally:
            self._session.forget(call)

    # -- received bytes ------------------------------------------------------------------

    def _on_bytes(self, data: memoryview) -> None:
        self._reading = True  # what the deliveries send leaves at the end of the read
        try:
            for event in self._session.receive_data(data):
                _EVENT_HANDLERS[type(event)](self, event)
        finally:
            self._reading = False
        if self._out:
            self._flush()

    def _on_accepted(self, event: protocol.Accepted) -> None:
        self._accepted.set_result(None)

    def _on_refused(self, event: protocol.Refused) -> None:
        self._accepted.set_exception(event.error)
        self._end()

    def _on_relay_ended(self, event: protocol.RelayEnded) -> None:
        if event.violation is not None:
            self.log.error("relay broke the protocol", error=event.violation)
        self._end()

    def _on_answer(
        self, call: PendingCall[asyncio.Future[Any]], reply: codec.ReplyDelivery
    ) -> None:
        future = call.waiter
        if not future.done():
            future.set_result(reply)

    def _on_event(self, subscription: Subscription[HandlerPool], data: bytes) -> None:
        if not subscription.pool.submit(subscription.callback, (data,), len(data)):
            subscription.overflow(size=len(data))


# An event's handler, by the event's type. Each handler takes its own event
# type, which a dict's value type cannot tie to its key: hence Any. (Replies,
# requests, broadcasts and topic events are the session's Deliveries.)
_EVENT_HANDLERS: dict[type, Callable[[Connection, Any], None]] = {
    protocol.Accepted: Connection._on_accepted,
    protocol.Refused: Connection._on_refused,
    **TUNNEL_HANDLERS,
    protocol.RelayEnded: Connection._on_relay_ended,
}


class _AsyncCloser(Protocol):
    """What an Opening opens: a Connection or a Service."""

    async def __aexit__(self, *exc: object) -> None: ...


_Opened = TypeVar("_Opened", bound=_AsyncCloser)


class Opening(Generic[_Opened]):
    """What :func:`connect` and :func:`iris.aio.register` return: await it for
    the connection or service, or use it in ``async with``, which closes it."""

    _opened: _Opened  # set by __aenter__

    def __init__(self, open_: Callable[[], Awaitable[_Opened]]):
        self._open = open_

    def __await__(self) -> Generator[Any, None, _Opened]:
        return self._open().__await__()

    async def __aenter__(self) -> _Opened:
        self._opened = await self._open()
        return self._opened

    async def __aexit__(self, *exc: object) -> None:
        await self._opened.__aexit__(*exc)


def connect(
    port: int = DEFAULT_PORT, log: ContextLog | None = None, send_buffer: int = DEFAULT_SEND_BUFFER
) -> Opening[Connection]:
    """Attach to the local relay as a plain client (cannot receive requests).

    ``conn = await iris.aio.connect(port)``, or ``async with
    iris.aio.connect(port) as conn:`` to have it closed at the block's end.
    ``log`` tags the connection's log lines with its context instead of a
    bare ``client=<n>``, as in :func:`iris.connect`. ``send_buffer`` bounds
    the bytes queued but not yet sent, as there: over it, request, publish,
    broadcast and tunnel sends await room.
    """
    check_send_buffer(send_buffer)

    async def open_() -> Connection:
        conn = Connection(log=log, send_buffer=send_buffer)
        await conn._attach(port)
        return conn

    return Opening(open_)
