"""A connection to the local Iris relay: the client half of the protocol.

One TCP socket and one reader thread per connection. Calls from any thread
encode a packet and hand it to a SocketWriter, which combines the packets of
concurrent callers into one write; the reader thread decodes what the relay
sends and completes the waiting call (replies through a ReplyHandoff, which
wakes their callers one after another), or hands inbound work (requests,
broadcasts, events, tunnels) to bounded handler pools.

    caller threads --encode/send--> SocketWriter --> socket --> relay
    reader thread  <--decode------- socket <-- relay
        |-- replies -> ReplyHandoff -> waiting callers (one wake-up at a time)
        |-- tunnel results -> waiting callers
        |-- requests, broadcasts, events -> HandlerPools -> handlers
        `-- tunnel allowance and data -> Tunnel objects
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar, cast

from . import codec
from .dispatch import Inbound, MemberConnection
from .errors import ClosedError, DeniedError, RemoteError, TimeoutError
from .handlers import TopicHandler, event_callback
from .handoff import ReplyHandoff, Waiter
from .limits import TopicLimits
from .logs import ContextLog, HandlerErrorLog, RateLimitedWarning
from .pool import HandlerPool
from .send_buffer import DEFAULT_SEND_BUFFER, check_send_buffer
from .tunnel import Tunnel
from .tunnel_core import TUNNEL_HANDLERS, TunnelRoutes
from .writer import SocketWriter

DEFAULT_PORT = 55555

# How long to wait for the relay's INIT answer before giving up on it.
HANDSHAKE_TIMEOUT = 10.0
# The relay answers every request and tunnel by its deadline; this extra wait
# only guards against a relay that has stopped working, so a call never hangs.
RELAY_GRACE = 2.0
# How long close() waits for the relay to acknowledge a graceful CLOSE.
CLOSE_TIMEOUT = 5.0
# Read size: a whole batch of small packets or a tunnel chunk in one system
# call. Not larger: glibc serves allocations over 128 KiB with mmap, which made
# every 256 KiB read cost ten times as much as a 64 KiB one.
RECV_SIZE = 64 * 1024

_client_ids = itertools.count(1)


def _validate_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")


def _validate_message(kind: str, data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{kind} must be bytes, got {type(data).__name__}")
    if not data:
        raise ValueError(f"{kind} must not be empty")
    if len(data) > codec.MAX_MESSAGE:  # else the relay would drop the connection
        raise ValueError(codec.too_large(kind, len(data)))
    return bytes(data)


def timeout_ms(timeout: float) -> int:
    """Seconds to the wire's milliseconds, or ValueError before anything is sent.

    Under 1 ms is a caller error. So is NaN, infinity or more than MAX_TIMEOUT:
    unchecked, those raised OverflowError here or in the wait for the reply
    (after sending), and a value too big for the wire's 64-bit varint made the
    relay drop the whole connection, failing unrelated calls in flight on it.
    """
    is_number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not (is_number and codec.MIN_TIMEOUT <= timeout <= codec.MAX_TIMEOUT):  # NaN fails both
        raise ValueError(
            f"timeout must be a number of seconds from {codec.MIN_TIMEOUT:g} "
            f"to {codec.MAX_TIMEOUT:g}, got {timeout!r}"
        )
    return round(timeout * 1000)


def check_port(port: int) -> None:
    """ValueError for anything but a TCP port a relay can listen on (1 to 65535);
    the socket layer would raise OverflowError or TypeError instead."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int from 1 to 65535, got {port!r}")


class _Subscription:
    __slots__ = ("callback", "pool", "overflow")

    def __init__(
        self, callback: Callable[[bytes], None], pool: HandlerPool, overflow: RateLimitedWarning
    ) -> None:
        self.callback = callback
        self.pool = pool
        self.overflow = overflow


class Connection(MemberConnection[Tunnel], TunnelRoutes[Tunnel]):
    """A live attachment to the relay; use :func:`connect` or :func:`register`."""

    tunnel_class = Tunnel

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        cluster: str = "",
        inbound: Callable[[Connection], Inbound[Tunnel]] | None = None,
        log: ContextLog | None = None,
        send_buffer: int = DEFAULT_SEND_BUFFER,
    ) -> None:
        """Attach; a member (non-empty ``cluster``) passes ``inbound``, a factory
        of the Inbound that receives its requests, broadcasts and tunnels.
        ``send_buffer`` bounds the bytes queued but not yet sent (iris.send_buffer)."""
        check_port(port)
        check_send_buffer(send_buffer)
        self.log = log or ContextLog().new(client=next(_client_ids))
        self._state_lock = threading.Lock()
        self._ids = itertools.count()
        self._requests: dict[int, Waiter[codec.ReplyDelivery]] = {}
        self._tunnel_inits: dict[int, Waiter[Tunnel | None]] = {}  # None: timed out
        self._tunnels: dict[int, Tunnel] = {}
        self._subscriptions: dict[str, _Subscription] = {}
        self._closing = False
        self._closed = threading.Event()
        self._drop_reason: str | None = None
        self.close_reason: str | None = None  # why the connection ended, once it has
        self._event_errors = HandlerErrorLog(self.log)  # all subscriptions share one budget
        self.inbound: Inbound[Tunnel] | None = inbound(self) if inbound else None

        self.log.info("connecting to relay", relay_port=port, cluster=cluster or None)
        self._sock, self._decoder, early = self._handshake(port, cluster)
        self._writer = SocketWriter(self._sock, send_buffer)
        self._handoff = ReplyHandoff(self._writer)
        self._reader = threading.Thread(
            target=self._read_loop, args=(early,), name=f"iris-reader-{port}", daemon=True
        )
        self._reader.start()
        self.log.info("relay connection established")

    # -- setup and teardown ------------------------------------------------

    def _handshake(
        self, port: int, cluster: str
    ) -> tuple[socket.socket, codec.Decoder[codec.RelayPacket], list[codec.RelayPacket]]:
        """Send INIT and wait for the answer; return the socket, its decoder and
        the packets that came with the answer.

        The relay may route traffic to a new member in the same write as its
        INIT, so what follows the answer in that read belongs to the reader.
        """
        sock = _dial(port)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.sendall(codec.Init(cluster).encode())
            decoder = codec.Decoder(codec.Side.RELAY)
            while True:
                data = sock.recv(RECV_SIZE)
                if not data:
                    raise ConnectionError(f"relay on port {port} closed during the handshake")
                packets = decoder.feed(data)
                if packets:
                    break
            answer, *early = packets
            if isinstance(answer, codec.Deny):
                raise DeniedError(answer.reason)
            if not isinstance(answer, codec.Accept):
                raise ConnectionError(f"relay answered the handshake with {answer!r}")
            sock.settimeout(None)
            return sock, decoder, early
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Detach gracefully; pending calls on this connection raise ClosedError."""
        with self._state_lock:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
        if not already:
            self.log.info("detaching from relay")
            try:
                self._send(codec.Close().encode())
            except ClosedError:
                pass
        if threading.current_thread() is not self._reader:
            self._closed.wait(CLOSE_TIMEOUT)
        self._shutdown("connection closed")

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection has ended (closed or dropped); False on timeout."""
        return self._closed.wait(timeout)

    def _mark_closed(self, reason: str) -> None:
        """Record why the connection ended; from here on, _send refuses."""
        if self.close_reason is None:
            self.close_reason = reason  # before the event: wait_closed() callers read it
        self._closed.set()

    def _shutdown(self, reason: str) -> None:
        """Fail everything pending and release the socket; idempotent."""
        self._mark_closed(reason)
        with self._state_lock:
            self._closing = True
            requests, self._requests = self._requests, {}
            inits, self._tunnel_inits = self._tunnel_inits, {}
            tunnels, self._tunnels = self._tunnels, {}
            subscriptions, self._subscriptions = self._subscriptions, {}
        waiters: tuple[Waiter[Any], ...] = (*requests.values(), *inits.values())
        for waiter in waiters:
            waiter.resolve(ClosedError(reason))
        self._handoff.wake_all()
        for tunnel in tunnels.values():
            tunnel._on_closed(reason)
        for sub in subscriptions.values():
            sub.pool.close()
        if self.inbound is not None:
            self.inbound.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    # -- sending -------------------------------------------------------------

    def _send(self, data: bytes, deadline: float | None = None) -> None:
        if self._closed.is_set():
            raise self._closed_error()
        self._writer.send(data, deadline)

    def _wait_for_room(self, deadline: float | None = None) -> None:
        """Block while more than ``send_buffer`` bytes are queued; iris.TimeoutError
        past ``deadline`` (``time.monotonic()``), ClosedError if the connection ends."""
        self._writer.wait_for_room(deadline)

    def _check_open(self) -> None:
        if self._closing:
            raise self._closed_error()

    # -- the public operations ---------------------------------------------------

    def request(self, cluster: str, request: bytes, timeout: float) -> bytes:
        """Send ``request`` to one member of ``cluster`` and wait for its reply.

        Raises iris.TimeoutError, iris.RemoteError (the member's fault text) or
        iris.ClosedError. Over the connection's ``send_buffer`` it first blocks
        for room; the timeout counts that wait too.
        """
        _validate_name("cluster", cluster)
        request = _validate_message("request", request)
        millis = timeout_ms(timeout)
        self._check_open()
        deadline = time.monotonic() + timeout
        self._wait_for_room(deadline)
        rid = next(self._ids)
        waiter: Waiter[codec.ReplyDelivery] = Waiter()
        self._requests[rid] = waiter
        try:
            if self.log.is_debug():
                self.log.debug("sending request", cluster=cluster, id=rid, size=len(request))
            data = codec.Request(rid, cluster, request, millis).encode()
            if not self._handoff.hold(data):
                self._send(data, deadline)
            reply = self._handoff.wait(waiter, timeout + RELAY_GRACE)
        except BaseException:
            self._handoff.cancel(waiter)  # an answer queued for us must not stop the chain
            raise
        finally:
            self._requests.pop(rid, None)
        if reply.timed_out:
            raise TimeoutError(f"request to {cluster!r} timed out after {timeout:g} s")
        # The payload's type follows ``success``; cast, not checked: this is per request.
        if not reply.success:
            raise RemoteError(cast(str, reply.payload))
        return cast(bytes, reply.payload)

    def broadcast(self, cluster: str, message: bytes) -> None:
        """Send ``message`` to every member of ``cluster`` (best effort).

        Over the connection's ``send_buffer`` it blocks until there is room,
        or raises ClosedError if the connection ends first: no timeout, as in
        the Go binding.
        """
        _validate_name("cluster", cluster)
        message = _validate_message("message", message)
        self._check_open()
        self._wait_for_room()
        if self.log.is_debug():
            self.log.debug("sending broadcast", cluster=cluster, size=len(message))
        self._send(codec.Broadcast(cluster, message).encode())

    def publish(self, topic: str, event: bytes) -> None:
        """Deliver ``event`` to every subscriber of ``topic`` (best effort).

        Waits for room as :meth:`broadcast` does.
        """
        _validate_name("topic", topic)
        event = _validate_message("event", event)
        self._check_open()
        self._wait_for_room()
        if self.log.is_debug():
            self.log.debug("publishing event", topic=topic, size=len(event))
        self._send(codec.Publish(topic, event).encode())

    def subscribe(
        self,
        topic: str,
        handler: TopicHandler | Callable[[bytes], None],
        limits: TopicLimits | None = None,
    ) -> None:
        """Receive the events of ``topic`` through ``handler``.

        ``handler`` is a TopicHandler or any callable taking the event bytes.
        """
        _validate_name("topic", topic)
        callback = event_callback(handler)
        limits = (limits or TopicLimits()).with_defaults()
        log = self.log.new(topic=topic)
        pool = HandlerPool(
            f"topic-{topic}", limits.event_threads, limits.event_memory, self._event_errors
        )
        overflow = RateLimitedWarning(log, "event dropped: memory limit reached")
        with self._state_lock:
            self._check_open()
            if topic in self._subscriptions:
                raise ValueError(f"already subscribed to {topic!r}")
            self._subscriptions[topic] = _Subscription(callback, pool, overflow)
        pool.start()
        self.log.info("subscribing to topic", topic=topic)
        try:
            self._send(codec.Subscribe(topic).encode())
        except ClosedError:
            self._subscriptions.pop(topic, None)
            pool.close()
            raise

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; events already queued are still handled."""
        _validate_name("topic", topic)
        with self._state_lock:
            self._check_open()
            sub = self._subscriptions.pop(topic, None)
        if sub is None:
            raise ValueError(f"not subscribed to {topic!r}")
        self.log.info("unsubscribing from topic", topic=topic)
        sub.pool.close()
        self._send(codec.Unsubscribe(topic).encode())

    def tunnel(self, cluster: str, timeout: float) -> Tunnel:
        """Open an ordered, flow-controlled stream to one member of ``cluster``."""
        _validate_name("cluster", cluster)
        millis = timeout_ms(timeout)
        self._check_open()
        tid = next(self._ids)
        waiter: Waiter[Tunnel | None] = Waiter()
        self._tunnel_inits[tid] = waiter
        try:
            self.log.info("opening tunnel", cluster=cluster, tunnel=tid)
            self._send(codec.TunnelInit(tid, cluster, millis).encode())
            # A late answer finds no waiter, and the reader closes its tunnel.
            tunnel = waiter.wait(timeout + RELAY_GRACE)
        finally:
            self._tunnel_inits.pop(tid, None)
        if tunnel is None:
            raise TimeoutError(f"tunnel to {cluster!r} timed out after {timeout:g} s")
        return tunnel

    # -- the reader thread -----------------------------------------------------------

    def _read_loop(self, packets: list[codec.RelayPacket]) -> None:
        reason = "connection lost"
        dispatch = self._dispatch
        # An Inbound may route requests straight from the bytes read (irishost's
        # supervisor does): route_leading(data) takes the complete requests at
        # the start of a read and returns how many bytes they were.
        route = getattr(self.inbound, "route_leading", None)
        try:
            decoder = self._decoder
            recv, feed, wake = self._sock.recv, decoder.feed, self._handoff.wake
            while True:
                for packet in packets:
                    handle = dispatch.get(type(packet))
                    if handle is None:
                        raise codec.ProtocolError(f"unexpected packet {type(packet).__name__}")
                    if handle(self, packet):
                        reason = self._drop_reason or "connection closed"
                        return
                wake()  # the callers answered by this read
                data = recv(RECV_SIZE)
                if not data:
                    break
                if route is not None and not decoder.buffered:
                    packets = feed(memoryview(data)[route(data) :])  # the rest, if any
                else:
                    packets = feed(data)
        except codec.ProtocolError as err:
            reason = f"protocol violation by relay: {err}"
            self.log.error("relay broke the protocol", error=str(err))
        except (OSError, ClosedError) as err:  # ClosedError: a send of ours met the end
            reason = f"connection lost: {err}"
        finally:
            graceful = self._closing and self._drop_reason is None
            self._shutdown(reason)
            if not graceful:
                self._on_drop(reason)

    def _on_drop(self, reason: str) -> None:
        self.log.warning("relay connection dropped", reason=reason)
        if self.inbound is not None:
            self.inbound.drop(ClosedError(reason))

    def _on_closed(self, packet: codec.Closed) -> bool:
        if packet.reason:
            self._drop_reason = packet.reason
        return True  # the relay closes the socket next; stop reading

    def _on_reply(self, packet: codec.ReplyDelivery) -> None:
        waiter = self._requests.pop(packet.id, None)
        if waiter is not None:
            self._handoff.deliver(waiter, packet)

    def _on_request(self, packet: codec.RequestDelivery) -> None:
        inbound = self._member_inbound("a request")
        if self.log.is_debug():
            self.log.debug("request arrived", id=packet.id, size=len(packet.request))
        inbound.request(packet.id, packet.request, packet.timeout_ms / 1000)

    def _on_broadcast(self, packet: codec.BroadcastDelivery) -> None:
        inbound = self._member_inbound("a broadcast")
        if self.log.is_debug():
            self.log.debug("broadcast arrived", size=len(packet.message))
        inbound.broadcast(packet.message)

    def _on_event(self, packet: codec.Publish) -> None:
        sub = self._subscriptions.get(packet.topic)
        if sub is None:
            return  # unsubscribed while the event was in flight
        if self.log.is_debug():
            self.log.debug("event arrived", topic=packet.topic, size=len(packet.event))
        # No thread for it (RuntimeError): dropped, as the pool has logged;
        # raised here, it would end this reader thread and the connection.
        with contextlib.suppress(RuntimeError):
            if not sub.pool.submit(sub.callback, (packet.event,), len(packet.event)):
                sub.overflow(size=len(packet.event))

    def _take_tunnel_init(self, tid: int) -> Callable[[Tunnel | None], None] | None:
        waiter = self._tunnel_inits.pop(tid, None)
        return None if waiter is None else waiter.resolve

    # A packet's handler, by the packet's type; True: stop reading. Each handler
    # takes its own packet type, which a dict's value type cannot tie to its
    # key: hence Any.
    _dispatch: ClassVar[dict[type[codec.RelayPacket], Callable[[Connection, Any], bool | None]]] = {
        codec.ReplyDelivery: _on_reply,
        codec.RequestDelivery: _on_request,
        codec.BroadcastDelivery: _on_broadcast,
        codec.Publish: _on_event,
        **TUNNEL_HANDLERS,
        codec.Closed: _on_closed,
    }


def _dial(port: int) -> socket.socket:
    """Connect to the relay on loopback, IPv4 first, then IPv6."""
    errors = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.connect((host, port))
            return sock
        except OSError as err:
            sock.close()
            errors.append(err)
    raise ConnectionRefusedError(f"no Iris relay on port {port}: {errors[0]}") from errors[0]


def connect(
    port: int = DEFAULT_PORT, log: ContextLog | None = None, send_buffer: int = DEFAULT_SEND_BUFFER
) -> Connection:
    """Attach to the local relay as a plain client (cannot receive requests).

    ``log`` tags the connection's log lines with its context (a host passes
    its service and worker) instead of a bare ``client=<n>``. ``send_buffer``
    bounds the bytes queued but not yet sent (32 MiB by default): over it,
    request, publish, broadcast and tunnel sends block for room. A message
    larger than the bound still goes, once the queue has drained to it.
    """
    return Connection(port, log=log, send_buffer=send_buffer)
