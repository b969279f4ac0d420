"""What the threaded and the asyncio tunnels share, whatever does the waiting.

:class:`TunnelCore` holds a tunnel end's flow and closing state and grants
allowance back; :class:`TunnelRoutes` is the part of a connection that keeps
its tunnels and routes the relay's tunnel packets to them. ``iris.Tunnel``
and ``iris.Connection`` build on them with threads, ``iris.aio.Tunnel`` and
``iris.aio.Connection`` with the event loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, Self, TypeVar

from . import chunks, codec
from .errors import ClosedError
from .limits import TUNNEL_BUFFER
from .logs import ContextLog


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
    """A connection's tunnels, and the routing of the relay's tunnel packets.

    Generic in the connection's kind of tunnel. The connection sets
    ``_tunnels`` to a dict and ``tunnel_class`` to its kind of tunnel, has
    ``_ids``, ``_send``, ``_member_inbound`` (iris.dispatch.MemberConnection's)
    and ``_take_tunnel_init``, and dispatches the relay's TUN_INIT,
    TUN_RESULT, TUN_ALLOW, TUN_TRANSFER and TUN_CLOSE packets to the
    handlers here (its table takes in TUNNEL_HANDLERS).
    """

    tunnel_class: Callable[[Self, int, int, ContextLog], _Tunnel]  # called with the connection
    _tunnels: dict[int, _Tunnel]
    _ids: Iterator[int]  # the connection's ids for its requests and tunnels
    log: ContextLog
    _send: Callable[[bytes], None]
    # The member's Inbound, or a ProtocolError naming ``what`` was sent to a plain client.
    _member_inbound: Callable[[str], TunnelAcceptor[_Tunnel]]
    # The waiting ``tunnel()`` call for an id, taken off the pending ones: what
    # to call with its tunnel, or with None when it timed out; None if that
    # call gave up already. Each binding waits its own way.
    _take_tunnel_init: Callable[[int], Callable[[_Tunnel | None], object] | None]

    def _new_tunnel(self: Self, tid: int, chunk_limit: int) -> _Tunnel:
        if chunk_limit < 1:
            raise codec.ProtocolError(f"tunnel chunk limit {chunk_limit} is not positive")
        tunnel = self.tunnel_class(self, tid, chunk_limit, self.log.new(tunnel=tid))
        self._tunnels[tid] = tunnel
        return tunnel

    def _forget_tunnel(self, tid: int) -> None:
        self._tunnels.pop(tid, None)

    def _on_tunnel_offer(self, packet: codec.TunnelOffer) -> None:
        """A member is offered a tunnel: accept it and hand it to the service."""
        inbound = self._member_inbound("a tunnel")
        tunnel = self._new_tunnel(next(self._ids), packet.chunk_limit)
        self._send(
            codec.TunnelConfirm(packet.build_id, tunnel.id).encode()
            + codec.TunnelAllow(tunnel.id, TUNNEL_BUFFER).encode()
        )
        tunnel.log.info("inbound tunnel accepted")
        inbound.tunnel(tunnel)

    def _on_tunnel_result(self, packet: codec.TunnelResult) -> None:
        """The relay's answer to this connection's ``tunnel()`` call."""
        resolve = self._take_tunnel_init(packet.id)
        if packet.timed_out:
            if resolve is not None:
                resolve(None)
            return
        tunnel = self._new_tunnel(packet.id, packet.chunk_limit)
        self._send(codec.TunnelAllow(packet.id, TUNNEL_BUFFER).encode())
        if resolve is None:  # its caller gave up already
            tunnel._close_unclaimed()
        else:
            tunnel.log.info("tunnel established")
            resolve(tunnel)

    def _on_tunnel_allow(self, packet: codec.TunnelAllow) -> None:
        tunnel = self._tunnels.get(packet.id)
        if tunnel is not None:
            tunnel._on_allow(packet.size)

    def _on_tunnel_transfer(self, packet: codec.TunnelTransfer) -> None:
        tunnel = self._tunnels.get(packet.id)
        if tunnel is not None:
            tunnel._on_transfer(packet.size, packet.chunk)

    def _on_tunnel_closed(self, packet: codec.TunnelClosed) -> None:
        tunnel = self._tunnels.pop(packet.id, None)
        if tunnel is not None:
            tunnel._on_closed(packet.reason)


# The relay's tunnel packets and their TunnelRoutes handlers: the part of a
# connection's dispatch table both bindings share. Each handler takes its own
# packet type, which a dict's value type cannot tie to its key: hence Any.
TUNNEL_HANDLERS: dict[type[codec.RelayPacket], Callable[[TunnelRoutes[Any], Any], None]] = {
    codec.TunnelOffer: TunnelRoutes._on_tunnel_offer,
    codec.TunnelResult: TunnelRoutes._on_tunnel_result,
    codec.TunnelAllow: TunnelRoutes._on_tunnel_allow,
    codec.TunnelTransfer: TunnelRoutes._on_tunnel_transfer,
    codec.TunnelClosed: TunnelRoutes._on_tunnel_closed,
}
