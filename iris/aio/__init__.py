"""The Iris binding on asyncio: ``await iris.aio.connect(port)``.

The same operations, semantics and errors as the threaded binding
(``iris.connect`` / ``iris.register``), for code that lives on an event
loop. Both share the wire codec (``iris.codec``), the limits and the errors.
Handlers and subscription callbacks may be ``async def`` or plain functions;
both run on the loop, so neither may block it.

Objects of this package belong to the event loop they were made on: use
them from that loop's thread only (the threaded binding is the one to share
between threads).
"""

from ..errors import ClosedError, RemoteError, TimeoutError
from ..handlers import TopicHandler
from ..limits import ServiceLimits, TopicLimits
from .connection import Connection, connect
from .handlers import ServiceHandler
from .service import Service, register
from .tunnel import Tunnel

__all__ = [
    "ClosedError",
    "Connection",
    "RemoteError",
    "Service",
    "ServiceHandler",
    "ServiceLimits",
    "TimeoutError",
    "TopicHandler",
    "TopicLimits",
    "Tunnel",
    "connect",
    "register",
]
