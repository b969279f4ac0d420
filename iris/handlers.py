"""Callback interfaces a service or a subscription implements.

Subclass and override what you need; the defaults do nothing (and
handle_request refuses), so a broadcast-only service stays a few lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import Connection
    from .tunnel import Tunnel


class ServiceHandler:
    """Callbacks of a registered service, run on the binding's handler threads."""

    def init(self, conn: Connection) -> None:
        """Runs once after registration, before any other callback.

        ``conn`` is the service's own connection, for outbound traffic. Raising
        here unregisters the service and makes ``register`` raise.
        """

    def handle_broadcast(self, message: bytes) -> None:
        """A broadcast sent to this service's cluster."""

    def handle_request(self, request: bytes) -> bytes:
        """Answer a request; an exception becomes the fault the caller sees."""
        raise NotImplementedError(f"{type(self).__name__} does not handle requests")

    def handle_tunnel(self, tunnel: Tunnel) -> None:
        """An inbound tunnel; the handler owns it and should close it."""
        tunnel.close()

    def handle_drop(self, reason: Exception) -> None:
        """The relay dropped the connection; no more callbacks will follow."""


class TopicHandler:
    """Callback of a topic subscription."""

    def handle_event(self, event: bytes) -> None:
        """An event published to the subscribed topic."""
