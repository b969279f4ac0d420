"""Python binding of the Iris decentralized messaging framework.

Mirrors the official Go binding: ``connect`` for a plain client, ``register``
for a service; request/reply, broadcast, publish/subscribe and tunnels.
"""

from .connection import Connection, connect
from .errors import ClosedError, DeniedError, Error, RemoteError, TimeoutError
from .handlers import ServiceHandler, TopicHandler, TunnelEnd
from .limits import ServiceLimits, TopicLimits
from .logs import ContextLog
from .service import Service, register, serve
from .tunnel import Tunnel
from .version import __version__

__all__ = [
    "ClosedError",
    "Connection",
    "ContextLog",
    "DeniedError",
    "Error",
    "RemoteError",
    "Service",
    "ServiceHandler",
    "ServiceLimits",
    "TimeoutError",
    "TopicHandler",
    "TopicLimits",
    "Tunnel",
    "TunnelEnd",
    "connect",
    "__version__",
    "register",
    "serve",
]
