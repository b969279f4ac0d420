"""A connection to the local Iris relay on threads: the I/O shell of a Session.

The protocol's rules live in the pure ``iris.session.Session``; this shell
moves its bytes and makes its callers wait. One TCP socket and one reader
thread per connection. Calls from any thread ask the session for the bytes
to send and hand them to a SocketWriter, which combines the packets of
concurrent callers into one write; the reader thread feeds what the relay
sends to the session and delivers the events it returns: replies through a
ReplyHandoff (which wakes their callers one after another), inbound work
(requests, broadcasts, events, tunnels) to bounded handler pools.

    caller threads --Session op--> bytes --> SocketWriter --> socket --> relay
    reader thread  <--events-- Session.receive_data <-- socket <-- relay
        |-- replies -> ReplyHandoff -> waiting callers (one wake-up at a time)
        |-- tunnel answers -> waiting callers
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
from typing import Any, ClassVar

from . import codec
from .dispatch import Inbound, MemberConnection
from .errors import ClosedError
from .handlers import TopicHandler
from .handoff import ReplyHandoff, Waiter
from .limits import TopicLimits
from .logs import ContextLog, HandlerErrorLog
from .pool import HandlerPool
from .send_buffer import DEFAULT_SEND_BUFFER, check_send_buffer
from .session import (
    RELAY_GRACE,
    Accepted,
    PendingCall,
    Refused,
    RelayEnded,
    Session,
    Subscription,
    check_port,
)
from .tunnel import Tunnel
from .tunnel_core import TUNNEL_HANDLERS, TunnelRoutes
from .writer import SocketWriter

DEFAULT_PORT = 55555

# How long to wait for the relay's INIT answer before giving up on it.
HANDSHAKE_TIMEOUT = 10.0
# How long close() waits for the relay to acknowledge a graceful CLOSE.
CLOSE_TIMEOUT = 5.0
# Read size: a whole batch of small packets or a tunnel chunk in one system
# call. Not larger: glibc serves allocations over 128 KiB with mmap, which made
# every 256 KiB read cost ten times as much as a 64 KiB one.
RECV_SIZE = 64 * 1024

_client_ids = itertools.count(1)


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
        # Serializes what the session must see whole: a subscription against
        # the end, and the end against a close from another thread.
        self._state_lock = threading.Lock()
        self._closed = threading.Event()
        self._event_errors = HandlerErrorLog(self.log)  # all subscriptions share one budget
        self.inbound: Inbound[Tunnel] | None = inbound(self) if inbound else None
        self._session: Session[Waiter[Any], Tunnel, HandlerPool] = self._new_session(
            self._new_tunnel
        )

        self.log.info("connecting to relay", relay_port=port, cluster=cluster or None)
        self._sock, early = self._handshake(port, cluster)
        self._writer = SocketWriter(self._sock, send_buffer)
        self._handoff = ReplyHandoff(self._writer)
        self._reader = threading.Thread(
            target=self._read_loop, args=(early,), name=f"iris-reader-{port}", daemon=True
        )
        self._reader.start()
        self.log.info("relay connection established")

    # -- setup and teardown ------------------------------------------------

    def _handshake(self, port: int, cluster: str) -> tuple[socket.socket, list[object]]:
        """Send INIT and wait for the answer; return the socket and the events
        of what came with the answer.

        The relay may route traffic to a new member in the same write as its
        INIT, so what follows the answer in that read belongs to the reader.
        """
        sock = _dial(port)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock.sendall(self._session.hello(cluster))
            events: list[object] = []
            while not events:
                data = sock.recv(RECV_SIZE)
                if not data:
                    raise ConnectionError(f"relay on port {port} closed during the handshake")
                events = self._session.receive_data(data)
            answer, *early = events
            if type(answer) is not Accepted:
                reason = self._session.end().reason
                if isinstance(answer, Refused):
                    raise answer.error
                raise ConnectionError(f"relay ended the handshake: {reason}")
            sock.settimeout(None)
            return sock, early
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        """Detach gracefully; pending calls on this connection raise ClosedError."""
        with self._state_lock:
            farewell = self._session.close()
        self._say_goodbye(farewell)
        if threading.current_thread() is not self._reader:
            self._closed.wait(CLOSE_TIMEOUT)
        self._end()

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

    def _end(self, lost: str | None = None) -> None:
        """End the session, in its order: fail what is pending, close the
        tunnels and pools, release the socket; report a drop. Idempotent."""
        with self._state_lock:
            ended = self._session.end(lost)
        if not ended.first:
            return
        self._closed.set()  # after end(): wait_closed() callers read close_reason
        for call in ended.calls:
            self._resolve(call, ClosedError(ended.reason))
        self._handoff.wake_all()
        self._close_tunnels(ended.tunnels, ended.reason)
        for subscription in ended.subscriptions:
            subscription.pool.close()
        self._close_inbound()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._report_drop(ended)

    # -- sending -------------------------------------------------------------

    def _send(self, data: bytes, deadline: float | None = None) -> None:
        if self._closed.is_set():
            raise self._session.closed_error()
        self._writer.send(data, deadline)

    def _wait_for_room(self, deadline: float | None = None) -> None:
        """Block while more than ``send_buffer`` bytes are queued; iris.TimeoutError
        past ``deadline`` (``time.monotonic()``), ClosedError if the connection ends."""
        self._writer.wait_for_room(deadline)

    def _resolve(self, call: PendingCall[Waiter[Any]], result: object) -> None:
        call.waiter.resolve(result)

    # -- the public operations ---------------------------------------------------

    def request(self, cluster: str, request: bytes, timeout: float) -> bytes:
        """Send ``request`` to one member of ``cluster`` and wait for its reply.

        Raises iris.TimeoutError, iris.RemoteError (the member's fault text) or
        iris.ClosedError. Over the connection's ``send_buffer`` it first blocks
        for room; the timeout counts that wait too.
        """
        session = self._session
        now = time.monotonic()
        if not self._writer.has_room():
            session.check_request(cluster, request, timeout)  # a mistake is not kept waiting
            self._writer.wait_for_room(now + timeout)
        waiter: Waiter[Any] = Waiter()
        call, data = session.request(cluster, request, timeout, now, waiter)
        deadline = now + timeout  # the timeout checked by request()
        try:
            if self.log.is_debug():
                self.log.debug("sending request", cluster=cluster, id=call.id, size=len(request))
            if not self._handoff.hold(data):
                self._send(data, deadline)
            reply = self._handoff.wait(waiter, timeout + RELAY_GRACE)
        except BaseException:
            self._handoff.cancel(waiter)  # an answer queued for us must not stop the chain
            session.forget(call)  # an answered call has left the session's tables already
            raise
        return call.outcome(reply)

    def broadcast(self, cluster: str, message: bytes) -> None:
        """Send ``message`` to every member of ``cluster`` (best effort).

        Over the connection's ``send_buffer`` it blocks until there is room,
        or raises ClosedError if the connection ends first: no timeout, as in
        the Go binding.
        """
        if not self._writer.has_room():
            self._session.check_broadcast(cluster, message)  # a mistake is not kept waiting
            self._writer.wait_for_room()
        data = self._session.broadcast(cluster, message)
        if self.log.is_debug():
            self.log.debug("sending broadcast", cluster=cluster, size=len(message))
        self._send(data)

    def publish(self, topic: str, event: bytes) -> None:
        """Deliver ``event`` to every subscriber of ``topic`` (best effort).

        Waits for room as :meth:`broadcast` does.
        """
        if not self._writer.has_room():
            self._session.check_publish(topic, event)  # a mistake is not kept waiting
            self._writer.wait_for_room()
        data = self._session.publish(topic, event)
        if self.log.is_debug():
            self.log.debug("publishing event", topic=topic, size=len(event))
        self._send(data)

    def subscribe(
        self,
        topic: str,
        handler: TopicHandler | Callable[[bytes], None],
        limits: TopicLimits | None = None,
    ) -> None:
        """Receive the events of ``topic`` through ``handler``.

        ``handler`` is a TopicHandler or any callable taking the event bytes.
        """
        subscription = Subscription.of(topic, handler, limits, HandlerPool, self._event_errors)
        with self._state_lock:
            data = self._session.subscribe(topic, subscription)
        subscription.pool.start()
        self.log.info("subscribing to topic", topic=topic)
        self._send(data)  # ClosedError: the end has closed the pool, or is about to

    def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic``; events already queued are still handled."""
        with self._state_lock:
            subscription, data = self._session.unsubscribe(topic)
        self.log.info("unsubscribing from topic", topic=topic)
        subscription.pool.close()
        self._send(data)

    def tunnel(self, cluster: str, timeout: float) -> Tunnel:
        """Open an ordered, flow-controlled stream to one member of ``cluster``."""
        waiter: Waiter[Tunnel] = Waiter()
        call, data = self._session.tunnel(cluster, timeout, time.monotonic(), waiter)
        self.log.info("opening tunnel", cluster=cluster, tunnel=call.id)
        try:
            self._send(data)
            # A late answer finds no call, and the reader closes its tunnel.
            return waiter.wait(timeout + RELAY_GRACE)
        finally:
            self._session.forget(call)

    # -- the reader thread -----------------------------------------------------------

    def _read_loop(self, events: list[object]) -> None:
        lost: str | None = None
        handlers = self._event_handlers
        try:
            recv, receive, wake = self._sock.recv, self._session.receive_data, self._handoff.wake
            while True:
                for event in events:
                    if handlers[type(event)](self, event):
                        return
                wake()  # the callers answered by this read
                data = recv(RECV_SIZE)
                if not data:
                    break
                events = receive(data)
        except (OSError, ClosedError) as err:  # ClosedError: a send of ours met the end
            lost = str(err)
        finally:
            self._end(lost)

    def _on_answer(self, call: PendingCall[Waiter[Any]], reply: codec.ReplyDelivery) -> None:
        self._handoff.deliver(call.waiter, reply)

    def _on_event(self, subscription: Subscription[HandlerPool], data: bytes) -> None:
        if self.log.is_debug():
            self.log.debug("event arrived", size=len(data))
        # No thread for it (RuntimeError): dropped, as the pool has logged;
        # raised here, it would end this reader thread and the connection.
        with contextlib.suppress(RuntimeError):
            if not subscription.pool.submit(subscription.callback, (data,), len(data)):
                subscription.overflow(size=len(data))

    def _on_relay_ended(self, event: RelayEnded) -> bool:
        if event.violation is not None:
            self.log.error("relay broke the protocol", error=event.violation)
        return True  # stop reading

    # An event's handler, by the event's type; True: stop reading. Each handler
    # takes its own event type, which a dict's value type cannot tie to its
    # key: hence Any.
    # (Replies, requests, broadcasts and topic events are the session's Deliveries.)
    _event_handlers: ClassVar[dict[type, Callable[[Connection, Any], bool | None]]] = {
        **TUNNEL_HANDLERS,
        RelayEnded: _on_relay_ended,
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
