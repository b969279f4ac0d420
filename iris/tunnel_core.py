"""What the threaded and the asyncio tunnels share, whatever does the waiting.

:class:`TunnelCore` holds a tunnel end's closing state and grants allowance
back; :class:`TunnelRoutes` is the part of a connection that keeps its
tunnels and routes the relay's tunnel packets to them. ``iris.Tunnel`` and
``iris.Connection`` build on them with threads, ``iris.aio.Tunnel`` and
``iris.aio.Connection`` with the event loop.
"""

from __future__ import annotations

from typing import Any

from . import codec
from .errors import ClosedError
from .limits import TUNNEL_BUFFER
from .logs import ContextLog


class TunnelCore:
    """A tunnel end's identity and closing state; subclasses add the waiting."""

    def __init__(self, conn: Any, tid: int, chunk_limit: int, log: ContextLog):
        self.id = tid
        self.log = log
        self._conn = conn
        self._chunk_limit = chunk_limit
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


class TunnelRoutes:
    """A connection's tunnels, and the routing of the relay's tunnel packets.

    The connection sets ``_tunnels`` to a dict and ``tunnel_class`` to its
    kind of tunnel, has ``_ids``, ``_send`` and ``_member_inbound``, and
    dispatches the relay's TUN_INIT, TUN_ALLOW, TUN_TRANSFER and TUN_CLOSE
    packets to the handlers here.
    """

    tunnel_class: type
    _tunnels: dict[int, Any]
    log: ContextLog

    def _new_tunnel(self, tid: int, chunk_limit: int):
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
