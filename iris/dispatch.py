"""Where a member connection sends the work the relay routes to it.

A Connection decodes inbound requests, broadcasts and tunnels and passes them
to an :class:`Inbound`, which answers through the connection's ``reply``
(:class:`MemberConnection`, in both bindings). :class:`HandlerDispatch` is
the usual Inbound: it runs a ServiceHandler's callbacks in bounded pools, as
the Go binding does. irishost plugs in its own Inbound that forwards the
work to worker processes instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from . import codec
from .errors import ClosedError
from .handlers import ServiceHandler, TunnelEnd
from .limits import ServiceLimits
from .logs import ContextLog, HandlerErrorLog, RateLimitedWarning
from .pool import HandlerPool
from .session import Deliveries, Ended, PendingCall, RouteLeading, Session, Subscription

if TYPE_CHECKING:
    from .connection import Connection
    from .tunnel import Tunnel


def fault_text(err: BaseException) -> str:
    """The fault a caller reads for ``err``: ``"KeyError: 'user'"``.

    The type name comes first because ``str()`` alone loses it (a KeyError's
    text is just the key); an empty text leaves the type name alone. Never
    raises: an exception whose ``__str__`` fails is named by its type, and
    text that UTF-8 cannot carry (lone surrogates, as surrogateescape makes)
    has those characters replaced, since the fault must reach the caller.
    """
    name = type(err).__name__
    try:
        detail = str(err)
    except BaseException:  # a broken __str__ must not cost the caller the answer
        detail = ""
    text = f"{name}: {detail}" if detail else name
    return text.encode("utf-8", "replace").decode()


def answer(
    handler: ServiceHandler, request: bytes, errors: HandlerErrorLog
) -> tuple[bool, bytes | str]:
    """Run ``handle_request``: (True, reply) or (False, the fault text).

    Never raises, not even for SystemExit: the caller is owed an answer. The
    exception is logged with its traceback through ``errors``. Shared by
    iris.register's pools and irishost's workers.
    """
    try:
        return checked_reply(handler.handle_request(request))
    except BaseException as err:
        errors("request handler raised", err)
        return False, fault_text(err)


def checked_reply(reply: object) -> tuple[bool, bytes]:
    """(True, the reply as bytes); TypeError if ``handle_request`` returned no bytes.

    Shared with iris.aio, whose handlers may return their reply from a coroutine.
    """
    if not isinstance(reply, bytes | bytearray | memoryview):
        raise TypeError(f"handle_request returned {type(reply).__name__}, not bytes")
    return True, bytes(reply)


class ByteBudget(Protocol):
    """A handler pool's byte budget, as both bindings' HandlerPools keep it."""

    @property
    def waiting_bytes(self) -> int:
        """Bytes of the tasks waiting for a thread (or task)."""

    @property
    def memory(self) -> int:
        """The most bytes that may wait."""


def memory_fault(pool: ByteBudget, where: str = "") -> str:
    """The fault for a request refused because ``pool``'s byte budget is full."""
    return (
        f"request memory limit exceeded{where}: {pool.waiting_bytes} bytes waiting, "
        f"limit {pool.memory} bytes"
    )


def thread_fault(err: RuntimeError, where: str = "") -> str:
    """The fault for work refused because no thread could be started for it.

    ``"could not start a handler thread in worker 0: RuntimeError: can't
    start new thread"``: the reason is usually a limit outside the program
    (a pids cgroup, RLIMIT_NPROC, memory), which the caller's operator can
    only find with the error's own text.
    """
    return f"could not start a handler thread{where}: {fault_text(err)}"


def serve_tunnel(handler: ServiceHandler, tunnel: TunnelEnd, errors: HandlerErrorLog) -> None:
    """Run ``handle_tunnel``; a handler that raises has its tunnel closed."""
    try:
        handler.handle_tunnel(tunnel)
    except BaseException as err:  # the thread is ours: even SystemExit is only logged
        errors("tunnel handler raised", err, tunnel=tunnel.id)
        tunnel.close()


# The kind of tunnel a connection hands its Inbound: iris.Tunnel or iris.aio.Tunnel.
_Tunnel_contra = TypeVar("_Tunnel_contra", contravariant=True)


class Inbound(Protocol[_Tunnel_contra]):
    """The receiving half of a service, generic in its connection's kind of tunnel.

    ``Inbound[iris.Tunnel]`` for a threaded connection, whose reader thread
    calls it; ``Inbound[iris.aio.Tunnel]`` for an asyncio one, whose read
    callback calls it (iris.aio.service's HandlerDispatch). Either way no
    method may block.
    """

    def request(self, request_id: int, request: bytes, timeout: float) -> None:
        """Answer later with ``Connection.reply(request_id, ...)``."""

    def broadcast(self, message: bytes) -> None: ...

    def tunnel(self, tunnel: _Tunnel_contra) -> None:
        """A tunnel already accepted on the wire."""

    def drop(self, reason: ClosedError) -> None:
        """The relay dropped the connection (not called on a graceful close)."""

    def close(self) -> None:
        """The connection ended; release the threads or cancel the tasks still running."""

    @property
    def route_leading(self) -> RouteLeading | None:
        """None, or a fast path for requests: called with the bytes of each
        read before they are decoded, it takes the complete requests at their
        start and returns how many bytes they were (irishost's supervisor
        does). An attribute, not a method, so that the reader reads it once
        and calls it without a lookup per read."""


# The kind of tunnel a member connection makes: iris.Tunnel or iris.aio.Tunnel.
_Tunnel = TypeVar("_Tunnel")


class MemberConnection(Generic[_Tunnel]):
    """What both bindings' connection shells share: as a cluster member,
    hand the relay's work to their Inbound and send its replies; and the
    steps of a goodbye and an end that do not depend on how they wait.

    The connection sets ``inbound`` (None for a plain client) and
    ``_session`` (its iris.session.Session), and has ``log`` and ``_send``.
    """

    inbound: Inbound[_Tunnel] | None
    _session: Session[Any, _Tunnel, Any]
    log: ContextLog
    _send: Callable[[bytes], None]
    # The shell's handlers of a reply and of a topic event, for its Deliveries.
    _on_answer: Callable[[PendingCall[Any], codec.ReplyDelivery], None]
    _on_event: Callable[[Subscription[Any], bytes], None]

    def _new_session(self, new_tunnel: Callable[[int, int], _Tunnel]) -> Session[Any, _Tunnel, Any]:
        """The connection's session: a member's if it has an Inbound, handing
        the packets that come by the thousand straight to this shell."""
        inbound = self.inbound
        return Session(
            new_tunnel,
            member=inbound is not None,
            route_leading=inbound.route_leading if inbound is not None else None,
            deliveries=Deliveries(
                self._on_answer, self._on_request, self._on_broadcast, self._on_event
            ),
        )

    @property
    def close_reason(self) -> str | None:
        """Why the connection ended (None until it has)."""
        return self._session.close_reason

    def _member_inbound(self) -> Inbound[_Tunnel]:
        """The Inbound: the session passes requests, broadcasts and tunnels
        only to a member, which has one. (The type as a string: subscripted
        at run time, ``Inbound[_Tunnel]`` cost as much as the call itself.)"""
        return cast("Inbound[_Tunnel]", self.inbound)

    def _say_goodbye(self, farewell: bytes | None) -> None:
        """Send the session's CLOSE, if it gave one (the first close() only)."""
        if farewell is not None:
            self.log.info("detaching from relay")
            with contextlib.suppress(ClosedError):  # ended already: nothing to say
                self._send(farewell)

    def _close_inbound(self) -> None:
        if self.inbound is not None:
            self.inbound.close()

    def _report_drop(self, ended: Ended[Any, Any, Any]) -> None:
        """The last step of an end: a drop is logged, and the Inbound told."""
        if ended.dropped:
            self.log.warning("relay connection dropped", reason=ended.reason)
            if self.inbound is not None:
                self.inbound.drop(ClosedError(ended.reason))

    def _on_request(self, packet: codec.RequestDelivery) -> None:
        if self.log.is_debug():
            self.log.debug("request arrived", id=packet.id, size=len(packet.request))
        # _member_inbound(), inline: this runs per request.
        cast("Inbound[_Tunnel]", self.inbound).request(
            packet.id, packet.request, packet.timeout_ms / 1000
        )

    def _on_broadcast(self, packet: codec.BroadcastDelivery) -> None:
        if self.log.is_debug():
            self.log.debug("broadcast arrived", size=len(packet.message))
        self._member_inbound().broadcast(packet.message)

    def reply(self, request_id: int, success: bool, payload: bytes | str) -> None:
        """Answer an inbound request (for Inbound implementations).

        A reply or fault text over the relay's message limit goes out as a
        fault saying so, and is logged: sent, it would make the relay drop
        this connection and with it every request in flight. A reply that
        cannot be sent because the connection closed is dropped: the relay
        times the request out for its caller.
        """
        # The payload's type follows ``success``; cast, not checked: this is per reply.
        size = len(payload) if success else len(cast(str, payload).encode("utf-8", "replace"))
        if size > codec.MAX_MESSAGE:
            payload = codec.too_large("reply" if success else "fault text", size)
            success = False
            self.log.error("reply refused", id=request_id, reason=payload)
        try:
            self._send(codec.ReplyPacket(request_id, success, payload).encode())
        except ClosedError:
            self.log.debug("reply lost: connection closed", id=request_id)

    def send_encoded(self, packets: bytes) -> None:
        """Send packets encoded by the caller: irishost's supervisor writes a
        batch of replies from heads it kept. Each must be within the relay's
        message limit, as reply() makes sure of. Dropped, as a reply is, if
        the connection has closed."""
        try:
            self._send(packets)
        except ClosedError:
            self.log.debug("replies lost: connection closed")


# What a service's dispatch is generic in: its binding's connection, handler
# interface and handler pool.
_Conn = TypeVar("_Conn")
_Handler = TypeVar("_Handler")
_Pool = TypeVar("_Pool")


class ServiceDispatch(Generic[_Conn, _Handler, _Pool]):
    """What both bindings' HandlerDispatch keep: the connection, the handler,
    one error budget for all its callbacks, and the request and broadcast
    pools made to the service's limits.

    Pools start held, so that ``init`` runs before any other callback; call
    the subclass's ``start`` once it returned.
    """

    route_leading = None  # no fast path: every request goes through request()
    # The binding's handler pool class.
    pool_class: Callable[[str, int, int, HandlerErrorLog], _Pool]

    def __init__(
        self, conn: _Conn, handler: _Handler, limits: ServiceLimits | None, log: ContextLog
    ) -> None:
        limits = (limits or ServiceLimits()).with_defaults()
        self._conn = conn
        self._handler = handler
        self._log = log
        self._errors = HandlerErrorLog(log)  # all callbacks of the service share its budget
        errors = self._errors
        self._requests = self.pool_class(
            "request", limits.request_threads, limits.request_memory, errors
        )
        self._broadcasts = self.pool_class(
            "broadcast", limits.broadcast_threads, limits.broadcast_memory, errors
        )
        self._broadcast_overflow = RateLimitedWarning(log, "broadcast dropped: memory limit")
        self._init_binding()

    def _init_binding(self) -> None:
        """The binding's own parts, made last."""


class HandlerDispatch(ServiceDispatch[Any, ServiceHandler, HandlerPool]):
    """Runs a ServiceHandler's callbacks in capped thread pools."""

    _conn: Connection  # the base's, for its type: a run-time base cannot name it (import circle)
    pool_class = HandlerPool

    def _init_binding(self) -> None:
        self._no_tunnel_thread = RateLimitedWarning(self._log, "tunnel closed: no thread for it")
        self._started = threading.Event()
        self._closed = False

    def start(self) -> None:
        self._requests.start()
        self._broadcasts.start()
        self._started.set()

    def request(self, request_id: int, request: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pool = self._requests
        try:
            if not pool.submit(self._serve_request, (request_id, request, deadline), len(request)):
                self._conn.reply(request_id, False, memory_fault(pool))
        except RuntimeError as err:  # the pool has logged it
            self._conn.reply(request_id, False, thread_fault(err))

    def _serve_request(self, request_id: int, request: bytes, deadline: float) -> None:
        if time.monotonic() > deadline:  # its caller has timed out already
            self._log.debug("request expired before a handler was free", id=request_id)
            return
        self._conn.reply(request_id, *answer(self._handler, request, self._errors))

    def broadcast(self, message: bytes) -> None:
        # No thread for it (RuntimeError): dropped, as the pool has logged.
        with contextlib.suppress(RuntimeError):
            if not self._broadcasts.submit(
                self._handler.handle_broadcast, (message,), len(message)
            ):
                self._broadcast_overflow(size=len(message))

    def tunnel(self, tunnel: Tunnel) -> None:
        """Serve ``tunnel`` on a thread of its own; closed at once if none can be started."""
        try:
            threading.Thread(
                target=self._serve_tunnel, args=(tunnel,), name="iris-tunnel", daemon=True
            ).start()
        except RuntimeError as err:
            self._no_tunnel_thread(tunnel=tunnel.id, error=str(err))
            tunnel.close_async()  # not close(): its acknowledgement comes on this thread

    def _serve_tunnel(self, tunnel: Tunnel) -> None:
        while not self._started.wait(0.1):  # init runs before any callback
            if self._closed:
                return
        serve_tunnel(self._handler, tunnel, self._errors)

    def drop(self, reason: ClosedError) -> None:
        try:
            self._handler.handle_drop(reason)
        except BaseException as err:  # the reader thread must still shut down in order
            self._errors("drop handler raised", err)

    def close(self) -> None:
        self._closed = True
        self._requests.close()
        self._broadcasts.close()
