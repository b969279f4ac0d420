"""What both executors share, threads and an event loop.

A worker's :class:`~irishost.worker.core.WorkerCore` keeps its state and
reads its frames' meaning; an executor (the core's ``Executor`` protocol)
runs the handler: on threads (:class:`~irishost.worker.threads.ThreadExecutor`,
for ``iris.ServiceHandler``) or on an event loop
(:class:`~irishost.worker.loop.LoopExecutor`, for ``iris.aio.ServiceHandler``).
The supervisor cannot tell the two apart.

Both take from here (:class:`PooledExecutor`) which pools a config asks for
and how broadcasts and events are routed to them, and how long a booting
worker keeps trying to reach its relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from iris.logs import ContextLog, HandlerErrorLog, RateLimitedWarning

from ..config import Config
from ..wire.ring import Ring
from .core import WorkerCore

# A refused relay connection is retried this often while a worker boots:
# the relay may be restarting just then.
CONNECT_RETRY_SECONDS = 0.1


class _Pool(Protocol):
    """What :class:`PooledExecutor` needs of a pool: iris.pool's or iris.aio.pool's."""

    name: str

    def start(self) -> None: ...


PoolT = TypeVar("PoolT", bound=_Pool)


class PooledExecutor(Generic[PoolT]):
    """What both executors share: what they run for whom, and their pools.

    Threads (iris.pool) or coroutines (iris.aio.pool): which pools a config
    asks for, their limits and which broadcast or event goes to which pool
    are the same, so they are made and routed here; each executor says in
    ``_run_callback`` how a fire-and-forget callback runs.
    """

    # Each executor's own: start a counted fire-and-forget callback in ``pool``,
    # (pool, callback, args, size, overflow) -> False, logged, if it is dropped.
    _run_callback: Callable[
        [PoolT, Callable[..., object], tuple[object, ...], int, RateLimitedWarning], bool
    ]
    _requests: PoolT
    _broadcasts: PoolT
    _topics: dict[str, tuple[PoolT, RateLimitedWarning]]
    _broadcast_overflow: RateLimitedWarning

    def __init__(self, core: WorkerCore, handler: Any, config: Config, inbox: Ring):
        self._core = core
        self._log = core.log
        self._errors = core.errors  # tracebacks, rate-limited, with service and worker
        self._handler = handler
        self._config = config
        self._inbox = inbox  # read by the executor's frame loop

    def _start_pools(self, pool_class: Callable[[str, int, int, HandlerErrorLog], PoolT]) -> None:
        """Make the pools the config asks for and start them: init has returned.

        Made here, at boot, on the executor's own loop (iris.aio's pools
        belong to the loop they are made on).
        """
        limits, errors = self._config.limits, self._errors
        self._requests = pool_class(
            "request", limits.request_threads, limits.request_memory, errors
        )
        self._broadcasts = pool_class(
            "broadcast", limits.broadcast_threads, limits.broadcast_memory, errors
        )
        self._broadcast_overflow = RateLimitedWarning(errors.log, "broadcast dropped: memory limit")
        self._topics = {
            topic.name: (
                pool_class(f"topic-{topic.name}", topic.event_threads, topic.event_memory, errors),
                RateLimitedWarning(errors.log.new(topic=topic.name), "event dropped: memory limit"),
            )
            for topic in self._config.topics
        }
        for pool in (self._requests, self._broadcasts, *(p for p, _ in self._topics.values())):
            pool.start()

    def run_broadcast(self, payload: bytes) -> bool:
        return self._run_callback(
            self._broadcasts,
            self._handler.handle_broadcast,
            (payload,),
            len(payload),
            self._broadcast_overflow,
        )

    def run_event(self, topic: str, payload: bytes) -> bool:
        pool, overflow = self._topics[topic]
        return self._run_callback(
            pool, self._handler.handle_event, (topic, payload), len(payload), overflow
        )


def connect_deadline(config: Config) -> float:
    """Until when a booting worker retries a refused relay connection."""
    return time.monotonic() + config.relay.connect_timeout


def connection_log(log: ContextLog) -> ContextLog:
    """The worker's own relay connection logs on the binding's logger, tagged
    with this worker's service and slot: a bare ``client=1`` would not say
    which of the host's workers it is."""
    return ContextLog(context=log.context)
