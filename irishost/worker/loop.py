"""A worker's event loop, for handlers written against iris.aio.

When ``[service] handler`` names an :class:`iris.aio.ServiceHandler`, the
worker (irishost/worker/process.py) hands its boot and its frame loop to a
:class:`LoopWorker`: the inbound ring is read from the event loop (its
eventfd is a loop reader), requests, broadcasts and events run as
coroutines in the binding's asyncio pools (``iris.aio.pool``), so
``request_threads`` and the other ``*_threads`` limits cap concurrently
running coroutines, and ``init`` gets an ``iris.aio`` connection of the
worker's own. Answers go back on the outbound ring as from a threaded
worker; the supervisor cannot tell the two apart.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import iris
import iris.aio
from iris.aio.pool import UNCAPPED, Callback, HandlerPool
from iris.aio.service import EXPIRED, answer, close_failed_tunnel, close_handler, settle
from iris.dispatch import memory_fault
from iris.logs import RateLimitedWarning

from ..wire import frames
from .process import (
    IDLE_CHECK_SECONDS,
    PARENT_GONE,
    CallbackPools,
    FrameHandlers,
    Worker,
    supervisor_gone,
)
from .tunnel import AsyncWorkerTunnel

# Frames handled per pump before the loop gets a turn (timers, the relay
# connection): a busy ring must not starve them.
MAX_BATCHES = 16


class LoopWorker(CallbackPools[HandlerPool]):
    """Runs one worker's handler on an event loop; see the module docstring."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.log = worker.log
        self.errors = worker.errors  # tracebacks, rate-limited, with service and worker
        self.handler = worker.handler
        self.inbox = worker.spec.inbox
        self.loop = asyncio.new_event_loop()
        self._exit_code: asyncio.Future[int] = self.loop.create_future()  # set once drained

    # -- life cycle ---------------------------------------------------------------

    def boot(self) -> None:
        """Connect, run ``init`` and make the pools; raises as Worker._boot does."""
        self.loop.run_until_complete(self._boot())

    async def _boot(self) -> None:
        config = self.worker.config
        self.conn = await self._connect()
        await settle(self.handler.init(self.conn))
        self._others = HandlerPool("tunnel-and-drop", UNCAPPED, UNCAPPED, self.errors)
        for pool in (*self._make_pools(HandlerPool, config), self._others):
            pool.start()

    async def _connect(self) -> iris.aio.Connection:
        """The relay may be restarting just as a worker boots: retry a while."""
        deadline = time.monotonic() + self.worker.config.relay.connect_timeout
        while True:
            try:
                return await iris.aio.connect(
                    self.worker.config.relay.port, self.worker.connection_log()
                )
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    def serve(self) -> int:
        """The frame loop until drained or orphaned; the worker's exit code."""
        return self.loop.run_until_complete(self._serve())

    async def _serve(self) -> int:
        self._handlers: FrameHandlers = self.worker.frame_handlers(self)
        self.loop.add_reader(self.inbox.data_fd, self._pump)
        self._pump()
        try:
            while not self._exit_code.done():
                await asyncio.wait([self._exit_code], timeout=IDLE_CHECK_SECONDS)
                if supervisor_gone(self.worker.spec.alive):
                    self.log.error("supervisor is gone; exiting")
                    return PARENT_GONE
                self._finish_if_drained()
            code = self._exit_code.result()
        finally:
            self.loop.remove_reader(self.inbox.data_fd)
        self.log.info("worker drained; exiting")
        await close_handler(self.handler, self.log)  # with init's connection still open
        await self.conn.close()
        return code

    def _finish_if_drained(self) -> None:
        if self.worker._draining and self.worker._idle() and not self._exit_code.done():
            self._exit_code.set_result(0)

    # -- the inbound ring ------------------------------------------------------------

    def _pump(self) -> None:
        """Handle the frames waiting in the ring; arm its eventfd when it is empty.

        Arm, then look once more: a frame published before the writer saw
        the flag raises no signal, so it must be found by this second look.
        """
        inbox = self.inbox
        inbox.disarm()
        for _ in range(MAX_BATCHES):
            batch = inbox.drain()
            if not batch:
                inbox.arm()
                batch = inbox.drain()
                if not batch:
                    self._finish_if_drained()
                    return
                inbox.disarm()
            for frame in batch:
                message = frames.decode(frame)
                self._handlers[type(message)](*message)
        self.loop.call_soon(self._pump)

    # -- work --------------------------------------------------------------------------

    def _on_request(self, request_id: int, deadline: float, payload: bytes) -> None:
        self.worker._track(1)
        pool = self._requests
        if not pool.submit(
            self._serve_request, (deadline, payload), len(payload), self._reply, request_id
        ):
            self.worker._track(-1)
            fault = memory_fault(pool, self.worker._where)
            self.worker.send(frames.Reply(request_id, False, fault).encode())

    def _serve_request(self, deadline: float, payload: bytes) -> object:
        if time.monotonic() > deadline:  # its caller has timed out already
            return EXPIRED
        return self.handler.handle_request(payload)

    def _reply(self, request_id: int, ok: bool, value: object) -> None:
        try:
            if value is EXPIRED:
                self.worker.send(frames.Expired(request_id).encode())
            else:
                reply = answer(ok, value, self.errors)
                self.worker.send(frames.Reply(request_id, *reply).encode())
        finally:
            self.worker._track(-1)

    def _run_counted(
        self,
        pool: HandlerPool,
        callback: Callback,
        args: tuple[object, ...],
        size: int,
        overflow: RateLimitedWarning,
    ) -> None:
        self.worker._track(1)
        if not pool.submit(callback, args, size, self._untrack, pool.name):
            self.worker._track(-1)
            overflow(size=size)

    def _untrack(self, what: str, ok: bool, value: object) -> None:
        self.worker._track(-1)
        if not ok and not isinstance(value, asyncio.CancelledError):
            # not ok: the pool hands over the exception the callback raised
            self.errors("handler raised", cast(BaseException, value), pool=what)

    def _on_tunnel(self, tunnel_id: int) -> None:
        worker = self.worker
        tunnel = AsyncWorkerTunnel(
            tunnel_id, worker.send, self.log.new(tunnel=tunnel_id), worker._tunnels
        )
        worker._tunnels[tunnel_id] = tunnel
        self._others.submit(self.handler.handle_tunnel, (tunnel,), 0, self._tunnel_done, tunnel)

    def _tunnel_done(self, tunnel: AsyncWorkerTunnel, ok: bool, value: object) -> None:
        close_failed_tunnel(self.errors, tunnel, ok, value)

    def _on_drop(self, reason: str) -> None:
        """handle_drop, counted like a request so a drain waits for it."""
        self.worker._track(1)
        self._others.submit(
            self.handler.handle_drop, (iris.ClosedError(reason),), 0, self._untrack, "drop"
        )
