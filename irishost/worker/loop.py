"""The event-loop executor: an ``iris.aio.ServiceHandler`` on a worker's event loop.

The inbound ring is read from the event loop (its eventfd is a loop
reader); requests, broadcasts and events run as coroutines in the binding's
asyncio pools (``iris.aio.pool``), so ``request_threads`` and the other
``*_threads`` limits cap concurrently running coroutines, and ``init`` gets
an ``iris.aio`` connection of the worker's own. Answers go back on the
outbound ring as from a threaded worker; the supervisor cannot tell the two
apart.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import iris
import iris.aio
from iris.aio.pool import UNCAPPED, Callback, HandlerPool
from iris.aio.service import EXPIRED, answer, close_failed_tunnel, close_handler, settle
from iris.dispatch import memory_fault
from iris.logs import RateLimitedWarning

from ..config import Config
from ..wire.ring import Ring
from .core import IDLE_CHECK_SECONDS, PARENT_GONE, WorkerCore
from .executor import CONNECT_RETRY_SECONDS, PooledExecutor, connect_deadline, connection_log
from .tunnel import LoopTunnelProxy

# Frames handled per pump before the loop gets a turn (timers, the relay
# connection): a busy ring must not starve them.
MAX_BATCHES = 16


class LoopExecutor(PooledExecutor[HandlerPool]):
    """Runs one worker's handler on an event loop; see the module docstring."""

    def __init__(self, core: WorkerCore, handler: Any, config: Config, inbox: Ring):
        super().__init__(core, handler, config, inbox)
        self._runner = asyncio.Runner()  # boot and serve run on the same loop
        self._loop = self._runner.get_loop()
        self._drained: asyncio.Future[None] = self._loop.create_future()

    # -- life cycle ---------------------------------------------------------------

    def boot(self) -> None:
        self._runner.run(self._boot())

    async def _boot(self) -> None:
        self._conn = await self._connect()
        await settle(self._handler.init(self._conn))
        self._start_pools(HandlerPool)
        self._others = HandlerPool("tunnel-and-drop", UNCAPPED, UNCAPPED, self._errors)
        self._others.start()

    async def _connect(self) -> iris.aio.Connection:
        deadline = connect_deadline(self._config)
        while True:
            try:
                return await iris.aio.connect(self._config.relay.port, connection_log(self._log))
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(CONNECT_RETRY_SECONDS)

    def serve(self) -> int:
        code = self._runner.run(self._serve())
        if code == 0:  # drained: end the idle pool tasks, as asyncio.run would
            self._runner.close()
        return code

    async def _serve(self) -> int:
        self._loop.add_reader(self._inbox.data_fd, self._pump)
        self._pump()
        try:
            while not self._drained.done():
                await asyncio.wait([self._drained], timeout=IDLE_CHECK_SECONDS)
                if self._core.orphaned():
                    return PARENT_GONE
                self._finish_if_drained()
        finally:
            self._loop.remove_reader(self._inbox.data_fd)
        self._log.info("worker drained; exiting")
        await close_handler(self._handler, self._log)  # with init's connection still open
        await self._conn.close()
        return 0

    def _finish_if_drained(self) -> None:
        if self._core.drained and not self._drained.done():
            self._drained.set_result(None)

    # -- the inbound ring ------------------------------------------------------------

    def _pump(self) -> None:
        """Hand the frames waiting in the ring to the core; arm its eventfd when
        it is empty.

        Arm, then look once more: a frame published before the writer saw
        the flag raises no signal, so it must be found by this second look.
        """
        inbox, handle = self._inbox, self._core.handle
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
            handle(batch)
        self._loop.call_soon(self._pump)

    # -- work --------------------------------------------------------------------------

    def run_request(self, ticket: int, deadline: float, payload: bytes) -> str | None:
        pool = self._requests
        if pool.submit(self._serve_request, (deadline, payload), len(payload), self._reply, ticket):
            return None
        return memory_fault(pool, self._core.where)

    def _serve_request(self, deadline: float, payload: bytes) -> object:
        if time.monotonic() > deadline:  # its caller has timed out already
            return EXPIRED
        return self._handler.handle_request(payload)

    def _reply(self, ticket: int, ok: bool, value: object) -> None:
        # answer() never raises: whatever the handler did, the request is answered.
        self._core.answer(ticket, None if value is EXPIRED else answer(ok, value, self._errors))

    def _run_callback(
        self,
        pool: HandlerPool,
        callback: Callback,
        args: tuple[object, ...],
        size: int,
        overflow: RateLimitedWarning,
    ) -> bool:
        if pool.submit(callback, args, size, self._callback_done, pool.name):
            return True
        overflow(size=size)
        return False

    def _callback_done(self, what: str, ok: bool, value: object) -> None:
        try:
            if not ok and not isinstance(value, asyncio.CancelledError):
                # not ok: the pool hands over the exception the callback raised
                self._errors("handler raised", cast(BaseException, value), pool=what)
        finally:
            self._core.complete()

    def run_drop(self, reason: str) -> bool:
        drop = (iris.ClosedError(reason),)
        return self._others.submit(self._handler.handle_drop, drop, 0, self._callback_done, "drop")

    def run_tunnel(self, tunnel_id: int) -> None:
        tunnel = self._core.open_tunnel(LoopTunnelProxy, tunnel_id)
        self._others.submit(self._handler.handle_tunnel, (tunnel,), 0, self._tunnel_done, tunnel)

    def _tunnel_done(self, tunnel: LoopTunnelProxy, ok: bool, value: object) -> None:
        self._core.returned()
        close_failed_tunnel(self._errors, tunnel, ok, value)
