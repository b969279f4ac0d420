"""A connection to the local Iris relay, on an asyncio event loop.

The same protocol and semantics as :class:`iris.Connection`, driven by the
loop instead of a reader thread: the transport hands received bytes to the
shared codec (``iris.codec``), and the decoded packets complete waiting
futures or go to handler pools (``iris.aio.pool``).

    coroutines --encode--> outbound batch --one write per loop turn--> relay
    protocol   <--decode-- received bytes <--------------------------- relay
        |-- replies / tunnel results -> waiting futures
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
from ..connection import (
    CLOSE_TIMEOUT,
    DEFAULT_PORT,
    HANDSHAKE_TIMEOUT,
    RECV_SIZE,
    RELAY_GRACE,
    _validate_message,
    _validate_name,
    check_port,
    timeout_ms,
)
from ..dispatch import Inbound, MemberConnection
from ..errors import ClosedError, DeniedError, RemoteError, TimeoutError
from ..handlers import TopicHandler, event_callback
from ..limits import TopicLimits
from ..logs import ContextLog, HandlerErrorLog, RateLimitedWarning
from ..send_buffer import DEFAULT_SEND_BUFFER, check_send_buffer, no_room
from ..tunnel_core import TUNNEL_HANDLERS, TunnelRoutes
from .pool import Callback, HandlerPool
from .tunnel import Tunnel

# How often pending calls are checked against their deadline plus RELAY_GRACE.
SWEEP_SECONDS = 1.0
# The transport pauses (and its resume wakes senders waiting for room) past
# this many buffered bytes, or past send_buffer if that is smaller: a few
# chunks, enough to keep the socket busy.
WRITE_HIGH_WATER = 1024 * 1024

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
        self._conn._on_lost(exc)

    def resume_writing(self) -> None:
        self._conn._room.set()


class _Subscription:
    __slots__ = ("callback", "pool", "overflow")

    def __init__(self, callback: Callback, pool: HandlerPool, overflow: RateLimitedWarning):
        self.callback = callback
        self.pool = pool
        self.overflow = overflow


class Connection(MemberConnection[Tunnel], TunnelRoutes[Tunnel]):
    """A live attachment to the relay; use :func:`connect` or :func:`iris.aio.register`."""

    tunnel_class = Tunnel

    def __init__(
        self,
        cluster: str = "",
        log: ContextLog | None = None,
        send_buffer: int = DEFAULT_SEND_BUFFER,
    ):
        """Not attached yet: :meth:`_attach` does that (connect and register call it)."""
        self._send_buffer = check_send_buffer(send_buffer)
        self.log = log or ContextLog().new(client=next(_client_ids))
        self.cluster = cluster
        self.inbound: Inbound[Tunnel] | None = None  # a member's, set before attaching
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = codec.Decoder(codec.Side.RELAY)
        self._ids = itertools.count()
        # Calls waiting for the relay's answer, with the deadline of their sweep.
        self._requests: dict[int, tuple[asyncio.Future[codec.ReplyDelivery], float]] = {}
        # A tunnel, or None if it timed out.
        self._tunnel_inits: dict[int, tuple[asyncio.Future[Tunnel | None], float]] = {}
        self._tunnels: dict[int, Tunnel] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._event_errors = HandlerErrorLog(self.log)  # all subscriptions share one budget
        self._out: list[bytes] = []
        self._out_bytes = 0  # the size of what _out holds
        self._flush_pending = False
        self._reading = False  # inside _on_bytes: its end flushes what was queued
        self._sweeper: asyncio.TimerHandle | None = None
        # Cleared by a sender that found no room; set when room may have come
        # (a flush, the transport's resume) or the connection ended.
        self._room = asyncio.Event()
        self._accepted: asyncio.Future[None] = self._loop.create_future()
        self._finished: asyncio.Future[None] = self._loop.create_future()  # set once shut down
        self._dispatch: _Handlers = _HANDSHAKE
        self._closing = False
        self._closed = False
        self._drop_reason: str | None = None
        self.close_reason: str | None = None  # why the connection ended, once it has

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
        self._transport.write(codec.Init(self.cluster).encode())
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
        if not self._closing:
            self._closing = True
            self.log.info("detaching from relay")
            try:
                self._send(codec.Close().encode())
            except ClosedError:
                pass
        await asyncio.wait([self._finished], timeout=CLOSE_TIMEOUT)
        self._shutdown("connection closed")

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _shutdown(self, reason: str) -> None:
        """Fail everything pending and release the transport; idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        self.close_reason = reason
        self._out.clear()
        self._out_bytes = 0
        requests, self._requests = self._requests, {}
        inits, self._tunnel_inits = self._tunnel_inits, {}
        tunnels, self._tunnels = self._tunnels, {}
        subscriptions, self._subscriptions = self._subscriptions, {}
        pending: list[tuple[asyncio.Future[Any], float]] = [*requests.values(), *inits.values()]
        for future, _ in pending:
            if not future.done():
                future.set_exception(ClosedError(reason))
        for tunnel in tunnels.values():
            tunnel._on_closed(reason)
        for sub in subscriptions.values():
            sub.pool.cancel()
        if self.inbound is not None:
            self.inbound.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._room.set()  # wake senders waiting for room; they find the end
        if not self._accepted.done():
            self._accepted.set_exception(ConnectionError(f"relay ended the handshake: {reason}"))
        if self._transport is not None:
            self._transport.close()
        if not self._finished.done():
            self._finished.set_result(None)

    def _on_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        if self._drop_reason is not None:
            reason = self._drop_reason
        elif exc is not None:
            reason = f"connection lost: {exc}"
        else:
            reason = "connection closed" if self._closing else "connection lost"
        graceful = self._closing and self._drop_reason is None
        self._shutdown(reason)
        if not graceful:
            self.log.warning("relay connection dropped", reason=reason)
            if self.inbound is not None:
                self.inbound.drop(ClosedError(reason))

    def _fail(self, reason: str) -> None:
        """End the connection because the relay broke the protocol."""
        self.log.error("relay broke the protocol", error=reason)
        self._drop_reason = f"protocol violation by relay: {reason}"
        self._on_lost(None)

    # -- sending ---------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Queue ``data`` for this loop turn's write."""
        if self._closed:
            raise self._closed_error()
        self._out.append(data)
        self._out_bytes += len(data)
        if not self._flush_pending and not self._reading:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        out = self._out
        if out and not self._closed:
            self._out = []
            self._out_bytes = 0
            # Attached: nothing is queued before _attach set the transport.
            transport = cast(asyncio.Transport, self._transport)
            transport.write(out[0] if len(out) == 1 else b"".join(out))
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
        while not self._closed and self._over_bound():
            self._room.clear()
            if deadline is None:
                await self._room.wait()
                continue
            try:
                async with asyncio.timeout_at(deadline):
                    await self._room.wait()
            except builtins.TimeoutError:  # asyncio's; iris's derives from it
                raise no_room(self._send_buffer) from None
        if self._closed:
            raise self._closed_error()

    def _check_open(self) -> None:
        if self._closing:
            raise self._closed_error()

    def _watch_deadlines(self) -> None:
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Fail calls whose relay has not answered by their deadline and the grace."""
        self._sweeper = None
        now = self._loop.time()
        for pending in (self._requests, self._tunnel_inits):
            late = [key for key, (_, deadline) in pending.items() if deadline < now]
            for key in late:
                future, _ = pending.pop(key)
                if not future.done():
                    future.set_exception(TimeoutError("the relay did not answer in time"))
        if self._requests or self._tunnel_inits:
            self._watch_deadlines()

    # -- the public operations ---------------------------------------------------------

    async def request(self, cluster: str, request: bytes, timeout: float) -> bytes:
        """Send ``request`` to one member of ``cluster`` and wait for its reply.

        Raises iris.TimeoutError, iris.RemoteError (the member's fault text) or
        iris.ClosedError. Cancelling the call forgets the request; a late
        reply is dropped. Over the connection's ``send_buffer`` it first waits
        for room; the timeout counts that wait too.
        """
        _validate_name("cluster", cluster)
        request = _validate_message("request", request)
        millis = timeout_ms(timeout)
        if self._closing:
            raise self._closed_error()
        if self._over_bound():
            await self._wait_for_room(self._loop.time() + timeout)
        rid = next(self._ids)
        future: asyncio.Future[codec.ReplyDelivery] = self._loop.create_future()
        self._requests[rid] = (future, self._loop.time() + timeout + RELAY_GRACE)
        if self._sweeper is None:
            self._watch_deadlines()
        self._send(codec.Request(rid, cluster, request, millis).encode())
        try:
            reply = await future
        finally:
            self._requests.pop(rid, None)
        if reply.timed_out:
            raise TimeoutError(f"request to {cluster!r} timed out after {timeout:g} s")
        # The payload's type follows ``success``, as in codec.ReplyDelivery.
        if not reply.success:
            raise RemoteError(cast(str, reply.payload))
        return cast(bytes, reply.payload)

    async def broadcast(self, cluster: str, message: bytes) -> None:
        """Send ``message`` to every member of ``cluster`` (best effort).

        Over the connection's ``send_buffer`` it waits until there is room,
        or raises ClosedError if the connection ends first: no timeout, as in
        the Go binding.
        """
        _validate_name("cluster", cluster)
        message = _validate_message("message", message)
        self._check_open()
        if self._over_bound():
            await self._wait_for_room()
        self._send(codec.Broadcast(cluster, message).encode())

    async def publish(self, topic: str, event: bytes) -> None:
        """Deliver ``event`` to every subscriber of ``topic`` (best effort).

        Waits for room as :meth:`broadcast` does.
        """
        _validate_name("topic", topic)
        event = _validate_message("event", event)
        self._check_open()
        if self._over_bound():
            await self._wait_for_room()
        self._send(codec.Publish(topic, event).encode())

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
        _validate_name("topic", topic)
        callback = event_callback(handler)
        limits = (limits or TopicLimits()).with_defaults()
        self._check_open()
        if topic in self._subscriptions:
            raise ValueError(f"already subscribed to {topic!r}")
        pool = HandlerPool(
            f"topic-{topic}", limits.event_threads, limits.event_memory, self._event_errors
        )
        overflow = RateLimitedWarning(
            self.log.new(topic=topic), "event dropped: memory limit reached"
        )
        self._subscriptions[topic] = _Subscription(callback, pool, overflow)
        pool.start()
        self.log.info("subscribing to topic", topic=topic)
        self._send(codec.Subscribe(topic).encode())
        await self._wait_for_room()

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; events already queued are still handled."""
        _validate_name("topic", topic)
        self._check_open()
        sub = self._subscriptions.pop(topic, None)
        if sub is None:
            raise ValueError(f"not subscribed to {topic!r}")
        self.log.info("unsubscribing from topic", topic=topic)
        sub.pool.close()
        self._send(codec.Unsubscribe(topic).encode())
        await self._wait_for_room()

    async def tunnel(self, cluster: str, timeout: float) -> Tunnel:
        """Open an ordered, flow-controlled stream to one member of ``cluster``."""
        _validate_name("cluster", cluster)
        millis = timeout_ms(timeout)
        self._check_open()
        tid = next(self._ids)
        future: asyncio.Future[Tunnel | None] = self._loop.create_future()
        self._tunnel_inits[tid] = (future, self._loop.time() + timeout + RELAY_GRACE)
        self._watch_deadlines()
        try:
            self.log.info("opening tunnel", cluster=cluster, tunnel=tid)
            self._send(codec.TunnelInit(tid, cluster, millis).encode())
            # A late answer finds no future, and its tunnel is closed at once.
            tunnel = await future
        finally:
            self._tunnel_inits.pop(tid, None)
        if tunnel is None:
            raise TimeoutError(f"tunnel to {cluster!r} timed out after {timeout:g} s")
        return tunnel

    # -- received packets ------------------------------------------------------------------

    def _on_bytes(self, data: memoryview) -> None:
        try:
            packets = self._decoder.feed(data)
        except codec.ProtocolError as err:
            self._fail(str(err))
            return
        self._reading = True
        try:
            for packet in packets:
                handle = self._dispatch.get(type(packet))
                if handle is None:
                    raise codec.ProtocolError(f"unexpected packet {type(packet).__name__}")
                handle(self, packet)
                if self._closed:
                    return
        except codec.ProtocolError as err:
            self._fail(str(err))
            return
        finally:
            self._reading = False
        if self._out:
            self._flush()

    def _on_accept(self, packet: codec.Accept) -> None:
        self._dispatch = _DISPATCH
        self._accepted.set_result(None)

    def _on_deny(self, packet: codec.Deny) -> None:
        denied = DeniedError(packet.reason)
        self._accepted.set_exception(denied)
        self._drop_reason = str(denied)
        self._shutdown(self._drop_reason)

    def _on_closed(self, packet: codec.Closed) -> None:
        """The relay's CLOSE: an acknowledgement, or a drop with its reason."""
        if packet.reason:
            self._drop_reason = packet.reason
        self._on_lost(None)

    def _on_reply(self, packet: codec.ReplyDelivery) -> None:
        pending = self._requests.pop(packet.id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result(packet)

    def _on_request(self, packet: codec.RequestDelivery) -> None:
        self._member_inbound("a request").request(
            packet.id, packet.request, packet.timeout_ms / 1000
        )

    def _on_broadcast(self, packet: codec.BroadcastDelivery) -> None:
        self._member_inbound("a broadcast").broadcast(packet.message)

    def _on_event(self, packet: codec.Publish) -> None:
        sub = self._subscriptions.get(packet.topic)
        if sub is None:
            return  # unsubscribed while the event was in flight
        if not sub.pool.submit(sub.callback, (packet.event,), len(packet.event)):
            sub.overflow(size=len(packet.event))

    def _take_tunnel_init(self, tid: int) -> Callable[[Tunnel | None], None] | None:
        pending = self._tunnel_inits.pop(tid, None)
        if pending is None or pending[0].done():
            return None
        return pending[0].set_result


# A packet's handler, by the packet's type. Each handler takes its own packet
# type, which a dict's value type cannot tie to its key: hence Any.
_Handlers = dict[type[codec.RelayPacket], Callable[[Connection, Any], None]]

# What the relay may send before, and after, it accepted the connection.
_HANDSHAKE: _Handlers = {
    codec.Accept: Connection._on_accept,
    codec.Deny: Connection._on_deny,
    codec.Closed: Connection._on_closed,
}
_DISPATCH: _Handlers = {
    codec.ReplyDelivery: Connection._on_reply,
    codec.RequestDelivery: Connection._on_request,
    codec.BroadcastDelivery: Connection._on_broadcast,
    codec.Publish: Connection._on_event,
    **TUNNEL_HANDLERS,
    codec.Closed: Connection._on_closed,
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
