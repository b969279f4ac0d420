"""What the threaded and the asyncio tunnels share, whatever does the waiting.

:class:`TunnelCore` holds a tunnel end's flow and closing state and grants
allowance back; :class:`TunnelRoutes` is the part of a connection that makes
its tunnels and delivers the session's tunnel events to them (which tunnel a
packet belongs to is the session's to know: iris.session). ``iris.Tunnel``
and ``iris.Connection`` build on them with threads, ``iris.aio.Tunnel`` and
``iris.aio.Connection`` with the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Protocol, Self, TypeVar

from . import chunks, codec
from . import session as protocol
from .errors import ClosedError
from .logs import ContextLog
from .session import PendingCall, Session


class TunnelHost(Protocol):
    """What a tunnel end uses of its connection (a TunnelRoutes)."""

    def _send(self, data: bytes) -> None: ...

    def _forget_tunnel(self, tid: int) -> None: ...


class TunnelCore:
    """A tunnel end's identity, flow and closing state; subclasses add the waiting."""

    # Subclasses: the tunnel was closed, by the relay or because its
    # connection ended, for ``reason``; wake whoever waits on it.
    _on_closed: Callable[[str], None]

    def __init__(self, conn: TunnelHost, tid: int, chunk_limit: int, log: ContextLog) -> None:
        self.id = tid
        self.log = log
        self._conn = conn
        self._chunk_limit = chunk_limit
        self._allowance = 0  # bytes the relay lets us send
        self._inbox: deque[bytes] = deque()  # whole messages recv() has not taken yet
        self._reassembly = chunks.Reassembly(tid)
        self._close_sent = False
        self._closed_reason: str | None = None

    def _raise_if_closed(self) -> None:
        if self._closed_reason is not None:
            raise ClosedError(self._closed_reason or "tunnel closed")
        if self._close_sent:
            raise ClosedError("tunnel closed")

    def _send_close(self) -> bool:
        """Send TUN_CLOSE; False, and closed here, if the connection is gone."""
        try:
            self._conn._send(codec.TunnelClose(self.id).encode())
        except ClosedError:
            self._on_closed("connection closed")
            return False
        return True

    def _grant(self, size: int) -> None:
        try:
            self._conn._send(codec.TunnelAllow(self.id, size).encode())
        except ClosedError:
            pass  # the tunnel died with its connection; nothing left to grant

    def _regrant_discarded(self, size: int) -> None:
        """The sender timed out mid-message; return the allowance the
        abandoned part used, or the tunnel would slowly starve."""
        self.log.warning("incomplete tunnel message discarded", size=size)
        self._grant(size)


class RoutedTunnel(Protocol):
    """What TunnelRoutes uses of a tunnel end (a TunnelCore subclass)."""

    id: int
    log: ContextLog

    def _on_allow(self, size: int) -> None: ...

    def _on_transfer(self, size: int, chunk: bytes) -> None: ...

    def _on_closed(self, reason: str) -> None: ...

    # Send the close request without waiting (a tunnel whose opener gave up).
    def _close_unclaimed(self) -> object: ...


_Tunnel = TypeVar("_Tunnel", bound=RoutedTunnel)
_Tunnel_contra = TypeVar("_Tunnel_contra", bound=RoutedTunnel, contravariant=True)


class TunnelAcceptor(Protocol[_Tunnel_contra]):
    """Where a member's inbound tunnels go (its Inbound)."""

    def tunnel(self, tunnel: _Tunnel_contra) -> None: ...


class TunnelRoutes(Generic[_Tunnel]):
    """The part of a connection shell that makes its tunnels and delivers the
    session's tunnel events (iris.session) to them.

    Generic in the connection's kind of tunnel. The connection sets
    ``tunnel_class`` to its kind of tunnel, has ``_session``, ``_send``,
    ``_member_inbound`` (iris.dispatch.MemberConnection's) and ``_resolve``,
    gives ``_new_tunnel`` to its Session, and takes TUNNEL_HANDLERS into its
    table of event handlers.
    """

    tunnel_class: Callable[[Self, int, int, ContextLog], _Tunnel]  # called with the connection
    _session: Session[Any, _Tunnel, Any]
    log: ContextLog
    _send: Callable[[bytes], None]
    # The member's Inbound; the session passes tunnel offers to members only.
    _member_inbound: Callable[[], TunnelAcceptor[_Tunnel]]
    # Answer the caller waiting on a PendingCall, each binding its own way:
    # with its tunnel, or with the exception to raise.
    _resolve: Callable[[PendingCall[Any], object], None]

    def _new_tunnel(self: Self, tid: int, chunk_limit: int) -> _Tunnel:
        """The Session's factory of tunnel objects."""
        return self.tunnel_class(self, tid, chunk_limit, self.log.new(tunnel=tid))

    def _forget_tunnel(self, tid: int) -> None:
        self._session.forget_tunnel(tid)

    def _close_tunnels(self, tunnels: list[_Tunnel], reason: str) -> None:
        """The session ended: its tunnels end too, waking whoever waits on them."""
        for tunnel in tunnels:
            tunnel._on_closed(reason)

    def _on_tunnel_offered(self, event: protocol.TunnelOffered[_Tunnel]) -> None:
        """A member accepted a tunnel: confirm it and hand it to the service."""
        self._send(event.send)
        event.tunnel.log.info("inbound tunnel accepted")
        self._member_inbound().tunnel(event.tunnel)

    def _on_tunnel_opened(self, event: protocol.TunnelOpened[Any, _Tunnel]) -> None:
        """The relay's answer to this connection's ``tunnel()`` call."""
        self._send(event.send)
        if event.call is None:  # its caller gave up already
            event.tunnel._close_unclaimed()
        else:
            event.tunnel.log.info("tunnel established")
            self._resolve(event.call, event.tunnel)

    def _on_tunnel_refused(self, event: protocol.TunnelRefused[Any]) -> None:
        self._resolve(event.call, event.call.timed_out())

    def _on_tunnel_allowed(self, event: protocol.TunnelAllowed[_Tunnel]) -> None:
        event.tunnel._on_allow(event.size)

    def _on_tunnel_data(self, event: protocol.TunnelData[_Tunnel]) -> None:
        event.tunnel._on_transfer(event.size, event.chunk)

    def _on_tunnel_ended(self, event: protocol.TunnelEnded[_Tunnel]) -> None:
        event.tunnel._on_closed(event.reason)


# The session's tunnel events and their TunnelRoutes handlers: the part of a
# connection's table of event handlers both bindings share. Each handler
# takes its own event type, which a dict's value type cannot tie to its key:
# hence Any.
TUNNEL_HANDLERS: dict[type, Callable[[TunnelRoutes[Any], Any], None]] = {
    protocol.TunnelOffered: TunnelRoutes._on_tunnel_offered,
    protocol.TunnelOpened: TunnelRoutes._on_tunnel_opened,
    protocol.TunnelRefused: TunnelRoutes._on_tunnel_refused,
    protocol.TunnelAllowed: TunnelRoutes._on_tunnel_allowed,
    protocol.TunnelData: TunnelRoutes._on_tunnel_data,
    protocol.TunnelEnded: TunnelRoutes._on_tunnel_ended,
}
