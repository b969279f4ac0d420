"""Registering a service: a connection that is also a member of a cluster."""

from __future__ import annotations

import itertools

from .connection import DEFAULT_PORT, Connection, _validate_name
from .dispatch import HandlerDispatch
from .handlers import ServiceHandler
from .limits import ServiceLimits
from .logs import ContextLog

_service_ids = itertools.count(1)


class Service:
    """A registered cluster member; ``unregister`` (or ``with``) detaches it."""

    def __init__(
        self,
        port: int,
        cluster: str,
        handler: ServiceHandler,
        limits: ServiceLimits | None = None,
    ):
        _validate_name("cluster", cluster)
        if not isinstance(handler, ServiceHandler):
            raise ValueError("handler must be an iris.ServiceHandler instance")
        self.log = ContextLog().new(service=next(_service_ids))
        self.cluster = cluster
        self.handler = handler
        self.log.info("registering service", cluster=cluster)
        # Handler errors name the cluster, so a process hosting several
        # services shows which one failed.
        handler_log = self.log.new(cluster=cluster)
        self.conn = Connection(
            port,
            cluster,
            lambda conn: HandlerDispatch(conn, handler, limits, handler_log),
            self.log,
        )
        try:
            handler.init(self.conn)
        except BaseException:
            self.log.error("service init failed; unregistering")
            self.conn.close()
            raise
        self.conn.inbound.start()
        self.log.info("service registration completed")

    def unregister(self) -> None:
        """Leave the cluster and close the service's connection."""
        self.log.info("unregistering service")
        self.conn.close()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.unregister()


def register(
    port: int,
    cluster: str,
    handler: ServiceHandler,
    limits: ServiceLimits | None = None,
) -> Service:
    """Join ``cluster`` with ``handler`` serving its requests, broadcasts and tunnels.

    ``handler.init(conn)`` runs before any other callback; if it raises, the
    service is unregistered and the exception propagates.
    """
    return Service(port if port is not None else DEFAULT_PORT, cluster, handler, limits)
