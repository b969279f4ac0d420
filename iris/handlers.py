"""Callback interfaces a service or a subscription implements.

Subclass and override what you need; the defaults do nothing (and
handle_request refuses), so a broadcast-only service stays a few lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

if TYPE_CHECKING:
    from .connection import Connection
    from .logs import ContextLog

# What a close() that raised is logged as, by both bindings and irishost.
CLOSE_FAILED = "handler close() raised"


class TunnelEnd(Protocol):
    """What a tunnel handler may use of its tunnel.

    An :class:`iris.Tunnel`, or irishost's proxy of one in a worker process
    (the real tunnel stays in the supervisor), so handlers and
    :func:`iris.dispatch.serve_tunnel` accept either.
    """

    @property
    def id(self) -> int: ...

    def send(self, message: bytes, timeout: float | None = None) -> None: ...

    def recv(self, timeout: float | None = None) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ServiceHandler:
    """Callbacks of a registered service, run on the binding's handler threads.

    Life cycle: ``init`` once, then the callbacks, then ``close`` once when
    the service ends gracefully. ``handle_drop`` is no end of that kind:
    after it, ``close`` still runs when the program unregisters (or, in
    irishost, when the worker is retired).
    """

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

    def handle_tunnel(self, tunnel: TunnelEnd) -> None:
        """An inbound tunnel; the handler owns it and should close it."""
        tunnel.close()

    def handle_drop(self, reason: Exception) -> None:
        """The relay dropped the connection; no more callbacks will follow."""

    def close(self) -> None:
        """Release what ``init`` acquired (a database pool, say); does nothing by default.

        Runs once when the service ends gracefully: ``Service.unregister``
        (and so the end of ``with``, or ``iris.serve`` returning), or an
        irishost worker's graceful exit (stop, reload, recycling,
        scale-down, the retirement after a relay drop), there after its
        in-flight work and within ``workers.shutdown_timeout``. Never after a
        crash or a kill, so do not rely on it for data that must not be
        lost. No callback starts once it runs, but in the bindings a
        handler thread still running at ``unregister`` is not waited for
        (irishost's drain does wait). An exception is logged with its
        traceback and changes nothing else.
        """


def close_handler(handler: ServiceHandler, log: ContextLog) -> None:
    """Run ``handler.close()``; what it raises is logged with its traceback.

    Not raised: close runs on the way out, where an exception would only
    skip what the exit still has to do (closing the connection, running
    atexit, the exit code an operator reads).
    """
    try:
        handler.close()
    except BaseException as err:
        log.exception(CLOSE_FAILED, err)


class TopicHandler:
    """Callback of a topic subscription."""

    def handle_event(self, event: bytes) -> None:
        """An event published to the subscribed topic."""


_EventCallback = TypeVar("_EventCallback", bound=Callable[[bytes], object])


def event_callback(
    handler: TopicHandler | _EventCallback,
) -> _EventCallback | Callable[[bytes], None]:
    """What a subscription calls with each event: the handler's ``handle_event``,
    or the handler itself if it is a plain callable; ValueError if neither."""
    callback = handler.handle_event if isinstance(handler, TopicHandler) else handler
    if not callable(callback):
        raise ValueError("handler must be an iris.TopicHandler or a callable")
    return callback
