"""Registering a service on an event loop: a connection that is also a cluster member.

:class:`HandlerDispatch` is the asyncio counterpart of
:class:`iris.dispatch.HandlerDispatch`: requests, broadcasts and tunnels the
relay routes to the member run as the handler's callbacks in capped pools
(``iris.aio.pool``), so ``request_threads`` caps concurrently running request
handlers, and ``request_memory`` caps the bytes waiting for one, with the same
immediate fault for a request over it.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Protocol, cast

from ..connection import DEFAULT_PORT
from ..dispatch import ServiceDispatch, checked_reply, fault_text, memory_fault
from ..errors import ClosedError
from ..handlers import CLOSE_FAILED
from ..limits import ServiceLimits
from ..logs import ContextLog, HandlerErrorLog
from ..send_buffer import DEFAULT_SEND_BUFFER, check_send_buffer
from ..service import _service_ids
from ..session import check_name
from .connection import Connection, Opening
from .handlers import ServiceHandler
from .pool import UNCAPPED, HandlerPool
from .tunnel import Tunnel

# A request whose caller had timed out before a handler was free: no answer.
EXPIRED = object()


def answer(ok: bool, value: object, errors: HandlerErrorLog) -> tuple[bool, bytes | str]:
    """A request handler's outcome as (True, reply) or (False, the fault text).

    The asyncio twin of iris.dispatch.answer, for an outcome the pool
    reports; shared with irishost's loop workers. A handler's exception is
    logged with its traceback through ``errors``; a cancellation is not (it
    is how a closing service stops its handlers), but its caller still gets
    a fault saying so.
    """
    if ok:
        try:
            return checked_reply(value)
        except TypeError as err:
            error: BaseException = err
    elif isinstance(value, asyncio.CancelledError):
        return False, "request handler was cancelled"
    else:
        error = cast(BaseException, value)  # a pool's outcome that is not ok is an exception
    errors("request handler raised", error)
    return False, fault_text(error)


class ClosableTunnel(Protocol):
    """What close_failed_tunnel uses of a tunnel: an iris.aio.Tunnel or irishost's."""

    @property
    def id(self) -> int: ...

    def close_nowait(self) -> object: ...


def close_failed_tunnel(
    errors: HandlerErrorLog, tunnel: ClosableTunnel, ok: bool, value: object
) -> None:
    """A tunnel handler's outcome: one that raised is logged and its tunnel closed.

    As iris.dispatch.serve_tunnel does; shared with irishost's loop workers,
    whose tunnels (any object with ``id`` and ``close_nowait``) are their own.
    """
    if not ok:
        if not isinstance(value, asyncio.CancelledError):
            errors("tunnel handler raised", cast(BaseException, value), tunnel=tunnel.id)
        tunnel.close_nowait()


async def settle(result: object) -> object:
    """Await ``result`` if a callback returned an awaitable (an ``async def``'s call)."""
    return await result if inspect.isawaitable(result) else result


async def close_handler(handler: ServiceHandler, log: ContextLog) -> None:
    """Await ``handler.close()`` (an ``async def`` or a plain method); what it
    raises is logged with its traceback, as iris.handlers.close_handler does,
    and for the same reason. A cancellation is the caller's and goes through."""
    try:
        await settle(handler.close())
    except asyncio.CancelledError:
        raise
    except BaseException as err:
        log.exception(CLOSE_FAILED, err)


class HandlerDispatch(ServiceDispatch[Connection, ServiceHandler, HandlerPool]):
    """Runs a ServiceHandler's callbacks, coroutines or plain, in capped pools.

    Closing cancels the callbacks still running: their answers could no
    longer be sent.
    """

    pool_class = HandlerPool

    def _init_binding(self) -> None:
        self._time = asyncio.get_running_loop().time
        self._tunnels = HandlerPool("tunnel", UNCAPPED, UNCAPPED, self._errors)
        # Not closed with the others: handle_drop runs after the connection ended.
        self._drops = HandlerPool("drop", UNCAPPED, UNCAPPED, self._errors)
        self._drops.start()

    def start(self) -> None:
        for pool in (self._requests, self._broadcasts, self._tunnels):
            pool.start()

    def request(self, request_id: int, request: bytes, timeout: float) -> None:
        pool = self._requests
        deadline = self._time() + timeout
        size = len(request)
        if not pool.submit(self._serve, (request, deadline), size, self._answer, request_id):
            self._conn.reply(request_id, False, memory_fault(pool))

    def _serve(self, request: bytes, deadline: float) -> object:
        if self._time() > deadline:  # its caller has timed out already
            return EXPIRED
        return self._handler.handle_request(request)

    def _answer(self, request_id: int, ok: bool, value: object) -> None:
        if value is EXPIRED:
            self._log.debug("request expired before a handler was free", id=request_id)
            return
        self._conn.reply(request_id, *answer(ok, value, self._errors))

    def broadcast(self, message: bytes) -> None:
        if not self._broadcasts.submit(self._handler.handle_broadcast, (message,), len(message)):
            self._broadcast_overflow(size=len(message))

    def tunnel(self, tunnel: Tunnel) -> None:
        self._tunnels.submit(self._handler.handle_tunnel, (tunnel,), 0, self._tunnel_done, tunnel)

    def _tunnel_done(self, tunnel: Tunnel, ok: bool, value: object) -> None:
        close_failed_tunnel(self._errors, tunnel, ok, value)

    def drop(self, reason: ClosedError) -> None:
        self._drops.submit(self._handler.handle_drop, (reason,), 0, self._drop_done)

    def _drop_done(self, _key: None, ok: bool, value: object) -> None:
        if not ok:
            self._errors("drop handler raised", cast(BaseException, value))

    def close(self) -> None:
        for pool in (self._requests, self._broadcasts, self._tunnels):
            pool.cancel()


class Service:
    """A registered cluster member; ``unregister`` (or ``async with``) detaches it."""

    def __init__(self, conn: Connection, cluster: str, handler: ServiceHandler):
        self.conn = conn
        self.cluster = cluster
        self.handler = handler
        self.log = conn.log
        self._ended = False  # unregister has run: handler.close() is awaited once

    async def unregister(self) -> None:
        """Leave the cluster, close the service's connection, then await ``handler.close()``.

        Handlers still running then are cancelled: their answers could no
        longer reach anyone. ``close`` runs on the first call only.
        """
        first, self._ended = not self._ended, True
        self.log.info("unregistering service")
        await self.conn.close()
        if first:
            await close_handler(self.handler, self.log.new(cluster=self.cluster))

    async def __aenter__(self) -> Service:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unregister()


def register(
    port: int,
    cluster: str,
    handler: ServiceHandler,
    limits: ServiceLimits | None = None,
    send_buffer: int = DEFAULT_SEND_BUFFER,
) -> Opening[Service]:
    """Join ``cluster`` with ``handler`` serving its requests, broadcasts and tunnels.

    ``service = await iris.aio.register(...)``, or ``async with`` it.
    ``handler.init(conn)`` runs before any other callback; if it raises, the
    service is unregistered and the exception propagates. ``send_buffer`` is
    the connection's bound on bytes queued but not yet sent, as in
    :func:`iris.aio.connect`.
    """
    check_name("cluster", cluster)
    check_send_buffer(send_buffer)
    if not isinstance(handler, ServiceHandler):
        raise ValueError("handler must be an iris.aio.ServiceHandler instance")
    port = port if port is not None else DEFAULT_PORT

    async def open_() -> Service:
        log = ContextLog().new(service=next(_service_ids))
        log.info("registering service", cluster=cluster)
        # Handler errors name the cluster, as in iris.register.
        handler_log = log.new(cluster=cluster)
        conn = Connection(
            cluster,
            log,
            send_buffer,
            lambda conn: HandlerDispatch(conn, handler, limits, handler_log),
        )
        # The inbound factory above made it: narrowed, not a check that can fail.
        dispatch = cast(HandlerDispatch, conn.inbound)
        await conn._attach(port)
        try:
            await settle(handler.init(conn))
        except BaseException:
            log.error("service init failed; unregistering")
            await conn.close()
            raise
        dispatch.start()
        log.info("service registration completed")
        return Service(conn, cluster, handler)

    return Opening(open_)
