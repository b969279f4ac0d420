"""The client half of the Iris protocol as a state machine: no sockets, no threads, no loop.

In the style of h11. A :class:`Session` takes the bytes the relay sent and
the operations its caller asks for, and gives back the bytes to send and the
events to deliver. Both bindings drive this one copy of the rules:

- the handshake, and the packets the relay may send in each state;
- request and tunnel ids, and the pending calls with their deadlines;
- the subscriptions, one per topic;
- the routing of the relay's tunnel packets to the tunnels they belong to;
- the decision between a graceful close and a drop, and what is failed when
  the session ends;
- the checking of every argument before anything is encoded.

``iris.Connection`` (threads) and ``iris.aio.Connection`` (asyncio) are the
I/O shells around it: a reader that feeds :meth:`Session.receive_data`, a
writer for the bytes the operations return, and the shell's own way to make
a caller wait (the session stores the shell's waiter in each PendingCall and
hands it back, untouched, when the answer comes).

    caller --operation--> Session --bytes--> shell's writer --> relay
    relay --bytes--> shell's reader --receive_data--> Session --events--> shell
        CallAnswered           -> the caller waiting on its PendingCall
        RequestDelivery,
        BroadcastDelivery      -> the member's Inbound (passed through as decoded)
        TopicEvent             -> the subscription's handler pool
          (these four, the packets that come by the thousand, go to the
           shell's Deliveries as they are decoded, if it gave them)
        TunnelOffered          -> a new tunnel for the member's Inbound
        TunnelOpened/Refused   -> the caller of tunnel()
        TunnelAllowed/Data/Ended -> the tunnel
        RelayEnded             -> stop reading; then end()

Events that complete a call are returned (or delivered) once the call has
left the session's tables, so a shell that delivers every event it gets
cannot leave a caller waiting, even when a later packet of the same read
breaks the protocol (that packet becomes a RelayEnded at the end of the list).

Threads: the threaded shell calls the operations from any thread, the
reader calls receive_data, and close() may race the reader's end(). Each
operation's change to the session is one dict operation or one assignment
(atomic under the GIL); end() re-checks so that no call registered while it
ran is left unanswered.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, NoReturn, TypeVar, cast

from . import codec
from .errors import ClosedError, DeniedError, RemoteError, TimeoutError
from .handlers import TopicHandler, event_callback
from .limits import TUNNEL_BUFFER, TopicLimits
from .logs import HandlerErrorLog, RateLimitedWarning

# The relay answers every request and tunnel by its deadline; this extra wait
# only guards against a relay that has stopped working, so a call never hangs.
RELAY_GRACE = 2.0

# -- argument checks: the caller's mistakes, as ValueError before anything is sent


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a non-empty string (a cluster or a topic), else ValueError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    return name


def check_message(kind: str, data: bytes) -> bytes:
    """``data`` as bytes if it is a non-empty message within the relay's limit."""
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


# -- what the session keeps for its shell

# The shell's way to wait for an answer (a handoff Waiter, an asyncio Future),
# its tunnel class, and its subscriptions' handler pool: opaque to the session.
_Waiter = TypeVar("_Waiter")
_Tunnel = TypeVar("_Tunnel")
_Pool = TypeVar("_Pool")


class PendingCall(NamedTuple, Generic[_Waiter]):
    """A caller's request or tunnel() waiting for the relay's answer.

    ``deadline`` is the caller's timeout plus RELAY_GRACE, on the shell's
    clock: past it the relay has stopped answering, and the shell fails the
    call (iris.aio sweeps :meth:`Session.overdue`; a thread waits that long).
    A tuple, which the session makes without the Python-level __new__ of a
    NamedTuple or an __init__: one is made per request.
    """

    kind: str  # "request" or "tunnel", for the caller's errors
    id: int
    cluster: str
    timeout: float
    deadline: float
    waiter: _Waiter

    def outcome(self, reply: codec.ReplyDelivery) -> bytes:
        """The reply's payload, or the TimeoutError or RemoteError it stands for."""
        if reply.timed_out:
            raise self.timed_out()
        # The payload's type follows ``success``; cast, not checked: this is per request.
        if not reply.success:
            raise RemoteError(cast(str, reply.payload))
        return cast(bytes, reply.payload)

    def timed_out(self) -> TimeoutError:
        """The error of a call the relay answered with a timeout."""
        return TimeoutError(f"{self.kind} to {self.cluster!r} timed out after {self.timeout:g} s")


class Subscription(Generic[_Pool]):
    """One topic's subscriber: its callback, the pool it runs in, and the
    warning for events dropped because the pool's memory is full."""

    __slots__ = ("callback", "pool", "overflow")

    def __init__(
        self, callback: Callable[..., object], pool: _Pool, overflow: RateLimitedWarning
    ) -> None:
        self.callback = callback
        self.pool = pool
        self.overflow = overflow

    @classmethod
    def of(
        cls,
        topic: str,
        handler: object,
        limits: TopicLimits | None,
        pool_class: Callable[[str, int, int, HandlerErrorLog], _Pool],
        errors: HandlerErrorLog,
    ) -> Subscription[_Pool]:
        """``handler``'s subscription to ``topic``, with a pool of the shell's
        ``pool_class`` made (not started) to ``limits``; ValueError for a
        handler that is neither a TopicHandler nor a callable."""
        callback = event_callback(cast(TopicHandler, handler))
        limits = (limits or TopicLimits()).with_defaults()
        pool = pool_class(f"topic-{topic}", limits.event_threads, limits.event_memory, errors)
        overflow = RateLimitedWarning(
            errors.log.new(topic=topic), "event dropped: memory limit reached"
        )
        return cls(callback, pool, overflow)


# -- events: what the relay's packets mean for the shell

# Builds an event without the Python-level __new__ a NamedTuple has: the
# events made once per packet (replies, topic events, tunnel data) use it.
_tuple_new = tuple.__new__


class Accepted(NamedTuple):
    """The relay accepted the connection."""


class Refused(NamedTuple):
    """The relay refused the connection (DENY); the session has ended."""

    error: DeniedError


class RelayEnded(NamedTuple):
    """Stop reading: the relay closed the connection, or broke the protocol
    (``violation`` says how). The shell calls :meth:`Session.end` next."""

    violation: str | None


class CallAnswered(NamedTuple, Generic[_Waiter]):
    call: PendingCall[_Waiter]
    reply: codec.ReplyDelivery


class TopicEvent(NamedTuple, Generic[_Pool]):
    subscription: Subscription[_Pool]
    event: bytes


class TunnelOffered(NamedTuple, Generic[_Tunnel]):
    """A member accepted a tunnel: send ``send``, then hand ``tunnel`` to the Inbound."""

    tunnel: _Tunnel
    send: bytes


class TunnelOpened(NamedTuple, Generic[_Waiter, _Tunnel]):
    """The answer to tunnel(): send ``send``; ``call`` is None if its caller
    gave up already, and then the tunnel is to be closed at once."""

    call: PendingCall[_Waiter] | None
    tunnel: _Tunnel
    send: bytes


class TunnelRefused(NamedTuple, Generic[_Waiter]):
    """The relay found no member to accept the tunnel in time."""

    call: PendingCall[_Waiter]


class TunnelAllowed(NamedTuple, Generic[_Tunnel]):
    tunnel: _Tunnel
    size: int


class TunnelData(NamedTuple, Generic[_Tunnel]):
    tunnel: _Tunnel
    size: int  # the chunk's size field: the whole message's size on its first chunk
    chunk: bytes


class TunnelEnded(NamedTuple, Generic[_Tunnel]):
    tunnel: _Tunnel
    reason: str


class Ended(NamedTuple, Generic[_Waiter, _Tunnel, _Pool]):
    """What :meth:`Session.end` leaves to the shell, to be ended in this order:
    fail the ``calls`` with ClosedError(``reason``), close the ``tunnels``,
    stop the ``subscriptions``' pools, close the Inbound, release the
    transport; then, if ``dropped``, log it and tell the Inbound. ``first``
    is False, and all else empty, on every call after the first."""

    reason: str
    dropped: bool  # the relay ended an accepted session that was not closing gracefully
    first: bool
    calls: list[PendingCall[_Waiter]]
    tunnels: list[_Tunnel]
    subscriptions: list[Subscription[_Pool]]


class Deliveries(NamedTuple, Generic[_Waiter, _Pool]):
    """The shell's handlers of the four events that come one a packet, by the
    thousand: called by :meth:`Session.receive_data` as each packet is
    decoded, instead of returned in its list for the shell to dispatch again
    by type (an event object, a list entry and a second look-up a packet:
    a tenth of a round trip's client CPU). A session given none returns them
    as events (CallAnswered, the packet as decoded, TopicEvent)."""

    answered: Callable[[PendingCall[_Waiter], codec.ReplyDelivery], None]
    request: Callable[[codec.RequestDelivery], None]
    broadcast: Callable[[codec.BroadcastDelivery], None]
    topic_event: Callable[[Subscription[_Pool], bytes], None]


class _StopReading(Exception):
    """Raised by the handler of the packet after which nothing is read (the
    relay's CLOSE), with the last event: cheaper than a check per packet."""

    def __init__(self, event: RelayEnded) -> None:
        self.event = event


# The bytes of one read, for an Inbound that routes requests itself
# (irishost's supervisor): returns how many leading bytes it took.
RouteLeading = Callable[[bytes], int]


class Session(Generic[_Waiter, _Tunnel, _Pool]):
    """One connection's protocol state; see the module docstring.

    ``new_tunnel(tid, chunk_limit)`` makes the shell's tunnel object for a
    tunnel the relay opened. A ``member`` (a service) may be sent requests,
    broadcasts and tunnel offers; to a plain client they are a violation.
    ``deliveries``: see :class:`Deliveries`.
    """

    def __init__(
        self,
        new_tunnel: Callable[[int, int], _Tunnel],
        member: bool = False,
        route_leading: RouteLeading | None = None,
        deliveries: Deliveries[_Waiter, _Pool] | None = None,
    ) -> None:
        self.member = member
        self._new_tunnel = new_tunnel
        self._route = route_leading
        self._decoder = codec.Decoder(codec.Side.RELAY)
        self._ids = itertools.count()
        self._calls: dict[int, PendingCall[_Waiter]] = {}  # requests, by id
        self._tunnel_calls: dict[int, PendingCall[_Waiter]] = {}  # tunnel() calls, by id
        self._tunnels: dict[int, _Tunnel] = {}
        self._subscriptions: dict[str, Subscription[_Pool]] = {}
        self._closing = False  # close() was asked for, or the session ended
        self._drop_reason: str | None = None  # the relay's, or the violation's
        self._relay_closed = False  # the relay's CLOSE came
        self._accepted = False  # the relay accepted the handshake
        self.close_reason: str | None = None  # set by end()
        self._events: list[object] = []  # receive_data's, while it runs
        if deliveries is None:
            collect = self._collect
            deliveries = Deliveries(self._collect_answer, collect, collect, self._collect_event)
        self._answered = deliveries.answered
        self._topic_event = deliveries.topic_event
        # A packet's handler, by the packet's type and the state: until the
        # relay accepts, only its answer (or its CLOSE) may come.
        # Each handler takes its own packet type, which a dict's value type
        # cannot tie to its key: hence Any.
        self._handshake: dict[type, Callable[[Any], object]] = {
            codec.Accept: self._on_accept,
            codec.Deny: self._on_deny,
            codec.Closed: self._on_closed,
        }
        self._accepted_handlers: dict[type, Callable[[Any], object]] = {
            codec.ReplyDelivery: self._on_reply,
            # To a member as they are; to a plain client, a violation.
            codec.RequestDelivery: deliveries.request if member else self._not_for_client,
            codec.BroadcastDelivery: deliveries.broadcast if member else self._not_for_client,
            codec.Publish: self._on_event,
            codec.TunnelOffer: self._on_tunnel_offer,
            codec.TunnelResult: self._on_tunnel_result,
            codec.TunnelAllow: self._on_tunnel_allow,
            codec.TunnelTransfer: self._on_tunnel_transfer,
            codec.TunnelClosed: self._on_tunnel_closed,
            codec.Closed: self._on_closed,
        }
        self._handlers = self._handshake

    # -- state --------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.close_reason is not None

    def closed_error(self) -> ClosedError:
        """What a call on the closed session raises: why it ended, if the relay
        said (say, a permission it refused), so the caller learns it."""
        return ClosedError(self.close_reason or "connection closed")

    def check_open(self) -> None:
        """ClosedError once close() was asked for or the session ended."""
        if self._closing:
            raise self.closed_error()

    @property
    def pending(self) -> bool:
        """Some call waits for the relay's answer."""
        return bool(self._calls or self._tunnel_calls)

    # -- operations: the caller's, in; the bytes to send, out ------------------------

    def hello(self, cluster: str) -> bytes:
        """The INIT that opens the connection (as a member of ``cluster``, if given)."""
        return codec.Init(cluster).encode()

    def check_request(self, cluster: str, request: bytes, timeout: float) -> None:
        """A request's arguments checked, for a shell that must wait for room
        before :meth:`request`: a caller's mistake is told before any wait."""
        check_name("cluster", cluster)
        check_message("request", request)
        timeout_ms(timeout)
        self.check_open()

    def request(
        self, cluster: str, request: bytes, timeout: float, now: float, waiter: _Waiter
    ) -> tuple[PendingCall[_Waiter], bytes]:
        """Check and register a request; its call and packet. The checks are
        :meth:`check_request`'s, written out: this runs per request."""
        check_name("cluster", cluster)
        request = check_message("request", request)
        millis = timeout_ms(timeout)
        if self._closing:
            raise self.closed_error()
        call = self._register(self._calls, "request", cluster, timeout, now, waiter)
        return call, codec.RequestPacket(call.id, cluster, request, millis).encode()

    def forget(self, call: PendingCall[_Waiter]) -> None:
        """The caller stopped waiting (timed out or cancelled): an answer that
        still comes is dropped. (An answered call has left already.)"""
        self._calls.pop(call.id, None)
        self._tunnel_calls.pop(call.id, None)

    def check_broadcast(self, cluster: str, message: bytes) -> bytes:
        """A broadcast's arguments checked, for a shell that must wait for room
        before :meth:`broadcast`: a caller's mistake is told before any wait."""
        return self._checked("cluster", cluster, "message", message)

    def broadcast(self, cluster: str, message: bytes) -> bytes:
        """A broadcast's packet, its arguments checked as by
        :meth:`check_broadcast` (written out: this runs per message)."""
        check_name("cluster", cluster)
        message = check_message("message", message)
        if self._closing:
            raise self.closed_error()
        return codec.BroadcastPacket(cluster, message).encode()

    def check_publish(self, topic: str, event: bytes) -> bytes:
        """An event's arguments checked, for a shell that must wait for room
        before :meth:`publish`: a caller's mistake is told before any wait."""
        return self._checked("topic", topic, "event", event)

    def publish(self, topic: str, event: bytes) -> bytes:
        """An event's packet, its arguments checked as by :meth:`check_publish`
        (written out: this runs per message)."""
        check_name("topic", topic)
        event = check_message("event", event)
        if self._closing:
            raise self.closed_error()
        return codec.Publish(topic, event).encode()

    def subscribe(self, topic: str, subscription: Subscription[_Pool]) -> bytes:
        """Record ``subscription`` (its pool not started) for ``topic``; its packet."""
        check_name("topic", topic)
        self.check_open()
        if topic in self._subscriptions:
            raise ValueError(f"already subscribed to {topic!r}")
        self._subscriptions[topic] = subscription
        return codec.Subscribe(topic).encode()

    def unsubscribe(self, topic: str) -> tuple[Subscription[_Pool], bytes]:
        """Forget ``topic``'s subscription: it and the packet to send."""
        check_name("topic", topic)
        self.check_open()
        subscription = self._subscriptions.pop(topic, None)
        if subscription is None:
            raise ValueError(f"not subscribed to {topic!r}")
        return subscription, codec.Unsubscribe(topic).encode()

    def tunnel(
        self, cluster: str, timeout: float, now: float, waiter: _Waiter
    ) -> tuple[PendingCall[_Waiter], bytes]:
        """Register a tunnel() call; its call and packet."""
        check_name("cluster", cluster)
        millis = timeout_ms(timeout)
        self.check_open()
        call = self._register(self._tunnel_calls, "tunnel", cluster, timeout, now, waiter)
        return call, codec.TunnelInit(call.id, cluster, millis).encode()

    def forget_tunnel(self, tid: int) -> None:
        """The tunnel ended on its own side: its packets are dropped from now on."""
        self._tunnels.pop(tid, None)

    def close(self) -> bytes | None:
        """Start a graceful close: the CLOSE to send, or None if one was sent
        already or the session has ended. The relay acknowledges with its
        own CLOSE (a RelayEnded event)."""
        if self._closing:
            return None
        self._closing = True
        return codec.Close().encode()

    def overdue(self, now: float) -> list[PendingCall[_Waiter]]:
        """Take the calls whose deadline has passed: the relay stopped answering."""
        late: list[PendingCall[_Waiter]] = []
        for calls in (self._calls, self._tunnel_calls):
            for call in [call for call in calls.values() if call.deadline < now]:
                del calls[call.id]
                late.append(call)
        return late

    def end(self, lost: str | None = None) -> Ended[_Waiter, _Tunnel, _Pool]:
        """End the session: the transport is gone (``lost`` says why, if it
        failed), the relay's CLOSE came, or the shell gave up waiting for it.

        Graceful only if close() was asked for and the relay gave no reason;
        otherwise, once accepted, a drop (a refused or failed handshake is
        the opener's error, not a drop). Idempotent: later calls return an
        empty Ended.
        """
        if self.close_reason is not None:
            return Ended(self.close_reason, False, False, [], [], [])
        if self._drop_reason is not None:
            reason = self._drop_reason
        elif lost is not None:
            reason = f"connection lost: {lost}"
        elif self._closing or self._relay_closed:
            reason = "connection closed"
        else:
            reason = "connection lost"
        dropped = self._accepted and not (self._closing and self._drop_reason is None)
        self.close_reason = reason
        self._closing = True
        calls, self._calls = self._calls, {}
        tunnel_calls, self._tunnel_calls = self._tunnel_calls, {}
        tunnels, self._tunnels = self._tunnels, {}
        subscriptions, self._subscriptions = self._subscriptions, {}
        self._handlers = {}
        return Ended(
            reason,
            dropped,
            True,
            [*calls.values(), *tunnel_calls.values()],
            list(tunnels.values()),
            list(subscriptions.values()),
        )

    def _checked(self, name_kind: str, name: str, message_kind: str, message: bytes) -> bytes:
        """The message as bytes, once the name, the message and the state allow sending."""
        check_name(name_kind, name)
        message = check_message(message_kind, message)
        self.check_open()
        return message

    def _register(
        self,
        calls: dict[int, PendingCall[_Waiter]],
        kind: str,
        cluster: str,
        timeout: float,
        now: float,
        waiter: _Waiter,
    ) -> PendingCall[_Waiter]:
        """A new call in ``calls`` under a fresh id. One registered after
        end() took the tables (another thread) is taken back: nothing would
        ever answer it."""
        cid = next(self._ids)
        call = _tuple_new(
            PendingCall, (kind, cid, cluster, timeout, now + timeout + RELAY_GRACE, waiter)
        )
        calls[cid] = call
        if self.close_reason is not None:
            self.forget(call)
            raise self.closed_error()
        return call

    # -- received bytes: events out ----------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> list[object]:
        """Decode one read of the relay's bytes; the events its packets make.

        A violation of the protocol ends the list with a RelayEnded that says
        what it was; nothing after it is read.
        """
        route = self._route
        if route is not None and self._accepted and not self._decoder.buffered:
            # The Inbound takes the complete requests at the start of the read
            # (bytes, which a threaded shell reads anyway).
            taken = route(data if isinstance(data, bytes) else bytes(data))
            data = memoryview(data)[taken:]
        events: list[object] = []
        self._events = events
        append = events.append
        try:
            for packet in self._decoder.feed(data):
                handle = self._handlers.get(type(packet))
                if handle is None:
                    raise codec.ProtocolError(f"unexpected packet {type(packet).__name__}")
                event = handle(packet)
                if event is not None:
                    append(event)
        except _StopReading as stop:
            append(stop.event)
        except codec.ProtocolError as err:
            self._drop_reason = f"protocol violation by relay: {err}"
            self._handlers = {}
            events.append(RelayEnded(str(err)))
        return events

    def _on_accept(self, packet: codec.Accept) -> Accepted:
        self._accepted = True
        self._handlers = self._accepted_handlers
        return Accepted()

    def _on_deny(self, packet: codec.Deny) -> Refused:
        error = DeniedError(packet.reason)
        self._drop_reason = str(error)
        self._handlers = {}
        return Refused(error)

    def _on_closed(self, packet: codec.Closed) -> None:
        """The relay's CLOSE: an acknowledgement, or a drop with its reason.
        Nothing after it is read."""
        if packet.reason:
            self._drop_reason = packet.reason
        self._relay_closed = True
        self._handlers = {}
        raise _StopReading(RelayEnded(None))

    def _on_reply(self, packet: codec.ReplyDelivery) -> None:
        call = self._calls.pop(packet.id, None)
        if call is not None:
            self._answered(call, packet)

    def _not_for_client(self, packet: codec.RelayPacket) -> NoReturn:
        what = "a request" if type(packet) is codec.RequestDelivery else "a broadcast"
        raise codec.ProtocolError(f"relay sent {what} to a plain client")

    def _on_event(self, packet: codec.Publish) -> None:
        subscription = self._subscriptions.get(packet.topic)
        if subscription is not None:  # else unsubscribed while the event was in flight
            self._topic_event(subscription, packet.event)

    # The Deliveries of a session whose shell gave none: its events, in the list.

    def _collect(self, packet: codec.RelayPacket) -> None:
        self._events.append(packet)

    def _collect_answer(self, call: PendingCall[_Waiter], reply: codec.ReplyDelivery) -> None:
        self._events.append(CallAnswered(call, reply))

    def _collect_event(self, subscription: Subscription[_Pool], event: bytes) -> None:
        self._events.append(TopicEvent(subscription, event))

    def _make_tunnel(self, tid: int, chunk_limit: int) -> _Tunnel:
        if chunk_limit < 1:
            raise codec.ProtocolError(f"tunnel chunk limit {chunk_limit} is not positive")
        tunnel = self._new_tunnel(tid, chunk_limit)
        self._tunnels[tid] = tunnel
        return tunnel

    def _on_tunnel_offer(self, packet: codec.TunnelOffer) -> TunnelOffered[_Tunnel]:
        """A member is offered a tunnel: accept it with a full allowance."""
        if not self.member:
            raise codec.ProtocolError("relay sent a tunnel to a plain client")
        tid = next(self._ids)
        tunnel = self._make_tunnel(tid, packet.chunk_limit)
        send = (
            codec.TunnelConfirm(packet.build_id, tid).encode()
            + codec.TunnelAllow(tid, TUNNEL_BUFFER).encode()
        )
        return TunnelOffered(tunnel, send)

    def _on_tunnel_result(
        self, packet: codec.TunnelResult
    ) -> TunnelOpened[_Waiter, _Tunnel] | TunnelRefused[_Waiter] | None:
        """The relay's answer to a tunnel() call."""
        call = self._tunnel_calls.pop(packet.id, None)
        if packet.timed_out:
            return None if call is None else TunnelRefused(call)
        tunnel = self._make_tunnel(packet.id, packet.chunk_limit)
        return TunnelOpened(call, tunnel, codec.TunnelAllow(packet.id, TUNNEL_BUFFER).encode())

    def _on_tunnel_allow(self, packet: codec.TunnelAllow) -> TunnelAllowed[_Tunnel] | None:
        tunnel = self._tunnels.get(packet.id)
        return None if tunnel is None else TunnelAllowed(tunnel, packet.size)

    def _on_tunnel_transfer(self, packet: codec.TunnelTransfer) -> TunnelData[_Tunnel] | None:
        tunnel = self._tunnels.get(packet.id)
        return (
            None if tunnel is None else _tuple_new(TunnelData, (tunnel, packet.size, packet.chunk))
        )

    def _on_tunnel_closed(self, packet: codec.TunnelClosed) -> TunnelEnded[_Tunnel] | None:
        tunnel = self._tunnels.pop(packet.id, None)
        return None if tunnel is None else TunnelEnded(tunnel, packet.reason)
