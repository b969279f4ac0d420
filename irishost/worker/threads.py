"""The threaded executor: an ``iris.ServiceHandler`` on a worker's threads.

The worker's main thread reads frames from the inbound ring and hands them
to the core, which passes the handler's work to the binding's bounded pools
(``iris.pool.HandlerPool``), so the thread and memory caps of a worker are
exactly those of ``iris.register``; handler threads write their answers to
the outbound ring. Tunnels and ``handle_drop`` get threads of their own,
outside the pools. ``init`` gets the worker's own threaded connection, so
outbound traffic goes straight to the relay instead of through the
supervisor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import iris
from iris.dispatch import answer, memory_fault, serve_tunnel, thread_fault
from iris.handlers import close_handler
from iris.logs import RateLimitedWarning
from iris.pool import HandlerPool

from ..config import Config
from ..wire.ring import Ring
from .core import IDLE_CHECK_SECONDS, PARENT_GONE, WorkerCore
from .executor import CONNECT_RETRY_SECONDS, PooledExecutor, connect_deadline, connection_log
from .tunnel import ThreadTunnelProxy


class ThreadExecutor(PooledExecutor[HandlerPool]):
    """Runs one worker's handler on threads; see the module docstring."""

    def __init__(self, core: WorkerCore, handler: Any, config: Config, inbox: Ring):
        super().__init__(core, handler, config, inbox)
        self._no_thread = RateLimitedWarning(core.log, "could not start a handler thread")

    # -- life cycle ---------------------------------------------------------------

    def boot(self) -> None:
        self._conn = self._connect()
        self._handler.init(self._conn)
        self._start_pools(HandlerPool)

    def _connect(self) -> iris.Connection:
        deadline = connect_deadline(self._config)
        while True:
            try:
                return iris.connect(self._config.relay.port, connection_log(self._log))
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(CONNECT_RETRY_SECONDS)

    def serve(self) -> int:
        """The frame loop, on the main thread; it spins for the next frame only
        while no work is in flight: a spin holds the GIL that handler threads
        at work need (see Ring.get)."""
        core, inbox = self._core, self._inbox
        handle = core.handle
        while True:
            data = inbox.get(IDLE_CHECK_SECONDS, spin=not core.in_flight)
            if data is not None:
                handle([data, *inbox.drain()])
            elif core.orphaned():
                return PARENT_GONE
            if core.drained:
                self._log.info("worker drained; exiting")
                close_handler(self._handler, self._log)  # with init's connection still open
                self._conn.close()
                return 0

    # -- work ----------------------------------------------------------------------

    def run_request(self, ticket: int, deadline: float, payload: bytes) -> str | None:
        pool = self._requests
        try:
            if pool.submit(self._serve_request, (ticket, deadline, payload), len(payload)):
                return None
            return memory_fault(pool, self._core.where)
        except RuntimeError as err:  # no thread for it; the pool has logged it
            return thread_fault(err, self._core.where)

    def _serve_request(self, ticket: int, deadline: float, payload: bytes) -> None:
        expired = time.monotonic() > deadline  # its caller has timed out already
        # answer() never raises: whatever the handler does, the request is answered.
        self._core.answer(ticket, None if expired else answer(self._handler, payload, self._errors))

    def _run_callback(
        self,
        pool: HandlerPool,
        callback: Callable[..., object],
        args: tuple[object, ...],
        size: int,
        overflow: RateLimitedWarning,
    ) -> bool:
        def task(*args: object) -> None:
            try:
                callback(*args)
            finally:
                self._core.complete()

        try:
            if pool.submit(task, args, size):
                return True
            overflow(size=size)
        except RuntimeError:
            pass  # no thread for it: dropped, as the pool has logged
        return False

    def run_drop(self, reason: str) -> bool:
        def task() -> None:
            try:
                self._handler.handle_drop(iris.ClosedError(reason))
            except BaseException as err:
                self._errors("drop handler raised", err)
            finally:
                self._core.complete()

        return self._start_thread(task, "irishost-drop", refused="handle_drop")

    def run_tunnel(self, tunnel_id: int) -> None:
        tunnel = self._core.open_tunnel(ThreadTunnelProxy, tunnel_id)

        def task() -> None:
            try:
                serve_tunnel(self._handler, tunnel, self._errors)
            finally:
                self._core.returned()

        if not self._start_thread(task, "irishost-tunnel", tunnel=tunnel_id):
            tunnel.close()  # and the supervisor closes the caller's end

    def _start_thread(self, target: Callable[[], None], name: str, **context: object) -> bool:
        """Start a daemon thread for ``target``; False, and logged, if none can be.

        Called on the frame loop's thread: Thread.start's RuntimeError (a
        pids or process limit, no memory for a stack) let through would end
        the worker and everything it serves over one piece of work.
        """
        try:
            threading.Thread(target=target, name=name, daemon=True).start()
        except RuntimeError as err:
            self._no_thread(error=str(err), **context)
            return False
        return True
