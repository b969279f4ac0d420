"""The callbacks of a service on an event loop.

Each may be an ``async def`` or a plain method; plain ones run on the loop
too, so neither kind may block it (use ``asyncio.to_thread`` for blocking
work). A subclass of :class:`iris.ServiceHandler`, so irishost's loader
accepts it and its workers know to run it on a loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import handlers

if TYPE_CHECKING:
    from .connection import Connection
    from .tunnel import Tunnel


class ServiceHandler(handlers.ServiceHandler):
    """Callbacks of a service registered with :func:`iris.aio.register`."""

    # Each callback overrides its threaded namesake as a coroutine taking the
    # asyncio Connection or Tunnel, so this class is deliberately not a
    # drop-in for the threaded one (hence ``type: ignore[override]``): it
    # subclasses it only so that irishost's loader accepts it and knows to
    # run it on a loop.

    async def init(self, conn: Connection) -> None:  # type: ignore[override]
        """Runs once after registration, before any other callback.

        ``conn`` is the service's own connection, for outbound traffic.
        Raising here unregisters the service and makes ``register`` raise.
        """

    async def handle_broadcast(self, message: bytes) -> None:  # type: ignore[override]
        """A broadcast sent to this service's cluster."""

    async def handle_request(self, request: bytes) -> bytes:  # type: ignore[override]
        """Answer a request; an exception (or cancellation) becomes the caller's fault."""
        raise NotImplementedError(f"{type(self).__name__} does not handle requests")

    async def handle_tunnel(self, tunnel: Tunnel) -> None:  # type: ignore[override]
        """An inbound tunnel; the handler owns it and should close it."""
        await tunnel.close()

    async def handle_drop(self, reason: Exception) -> None:  # type: ignore[override]
        """The relay dropped the connection; no more callbacks will follow."""

    async def close(self) -> None:  # type: ignore[override]
        """Release what ``init`` acquired; does nothing by default.

        Awaited once when the service ends gracefully: ``await
        service.unregister()`` (and so the end of ``async with``), or an
        irishost worker's graceful exit, as :meth:`iris.ServiceHandler.close`
        says. Handlers still running at unregister have been cancelled by
        then. An exception is logged with its traceback and changes nothing
        else; a cancellation of the unregistering task goes through.
        """
