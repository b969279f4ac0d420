"""Registering a service: a connection that is also a member of a cluster.

``register`` returns at once and the service runs on the binding's threads;
``serve`` is the blocking form for a program that is just the service: it
registers, waits for SIGINT or SIGTERM, and unregisters.
"""

from __future__ import annotations

import itertools
import signal
import threading
from typing import cast

from .connection import DEFAULT_PORT, Connection
from .dispatch import HandlerDispatch
from .errors import ClosedError
from .handlers import ServiceHandler, close_handler
from .limits import ServiceLimits
from .logs import ContextLog
from .send_buffer import DEFAULT_SEND_BUFFER
from .session import check_name

_service_ids = itertools.count(1)

# The signals that end iris.serve: Ctrl-C, and what systemd and kill send.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Service:
    """A registered cluster member; ``unregister`` (or ``with``) detaches it."""

    def __init__(
        self,
        port: int,
        cluster: str,
        handler: ServiceHandler,
        limits: ServiceLimits | None = None,
        send_buffer: int = DEFAULT_SEND_BUFFER,
    ):
        check_name("cluster", cluster)
        if not isinstance(handler, ServiceHandler):
            raise ValueError("handler must be an iris.ServiceHandler instance")
        self.log = ContextLog().new(service=next(_service_ids))
        self.cluster = cluster
        self.handler = handler
        self._ended = False  # unregister has run: handler.close() is called once
        self._end_lock = threading.Lock()
        self.log.info("registering service", cluster=cluster)
        # Handler errors name the cluster, so a process hosting several
        # services shows which one failed.
        handler_log = self.log.new(cluster=cluster)
        self.conn = Connection(
            port,
            cluster,
            lambda conn: HandlerDispatch(conn, handler, limits, handler_log),
            self.log,
            send_buffer,
        )
        try:
            handler.init(self.conn)
        except BaseException:
            self.log.error("service init failed; unregistering")
            self.conn.close()
            raise
        # The inbound factory above made it: narrowed, not a check that can fail.
        dispatch = cast(HandlerDispatch, self.conn.inbound)
        dispatch.start()
        self.log.info("service registration completed")

    def unregister(self) -> None:
        """Leave the cluster, close the service's connection, then call ``handler.close()``.

        The connection closes first so that no callback starts during or
        after ``close``; ``close`` runs on the first call only.
        """
        with self._end_lock:
            first, self._ended = not self._ended, True
        self.log.info("unregistering service")
        self.conn.close()
        if first:
            close_handler(self.handler, self.log.new(cluster=self.cluster))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the service has stopped; False if ``timeout`` passed first.

        The service stops when ``unregister`` is called (from another thread)
        or when the relay drops it; ``conn.close_reason`` says which.
        """
        return self.conn.wait_closed(timeout)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unregister()


def register(
    port: int,
    cluster: str,
    handler: ServiceHandler,
    limits: ServiceLimits | None = None,
    send_buffer: int = DEFAULT_SEND_BUFFER,
) -> Service:
    """Join ``cluster`` with ``handler`` serving its requests, broadcasts and tunnels.

    ``handler.init(conn)`` runs before any other callback; if it raises, the
    service is unregistered and the exception propagates. ``send_buffer`` is
    the connection's bound on bytes queued but not yet sent, as in
    :func:`iris.connect`.
    """
    port = port if port is not None else DEFAULT_PORT
    return Service(port, cluster, handler, limits, send_buffer)


def serve(
    port: int,
    cluster: str,
    handler: ServiceHandler,
    limits: ServiceLimits | None = None,
    send_buffer: int = DEFAULT_SEND_BUFFER,
) -> None:
    """Register ``handler`` under ``cluster`` and serve until SIGINT or SIGTERM.

    The whole main loop of a program that is just a service. On a signal the
    service unregisters (calling ``handler.close()``) and ``serve`` returns.
    If the relay drops the service first, ``serve`` raises iris.ClosedError
    with the reason, so the program ends with an error instead of idling
    unregistered (``handler.close()`` has run then too). Must be called from the
    main thread (Python delivers signals there); the previous signal handlers
    are restored on return.
    """
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in STOP_SIGNALS}
    try:
        with register(port, cluster, handler, limits, send_buffer) as service:

            def stop_when_dropped() -> None:
                service.wait()
                stop.set()

            # The signal handler and the end of the connection wake the same event.
            threading.Thread(target=stop_when_dropped, name="iris-serve", daemon=True).start()
            stop.wait()
            if service.conn.closed:
                raise ClosedError(f"service {cluster!r} dropped: {service.conn.close_reason}")
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
