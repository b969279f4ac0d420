"""Capped handler concurrency on an event loop: the asyncio HandlerPool.

Mirrors :class:`iris.pool.HandlerPool`, with worker Tasks in place of
threads: at most ``concurrency`` callbacks run at once (``request_threads``
and the other ``*_threads`` limits keep that meaning), what waits for a
worker is limited to ``memory`` bytes, and a pool starts *held* so that a
service's ``init`` runs before any other callback.

A callback may be a plain function or an ``async def``; either runs in a
worker Task, so ``asyncio.current_task()``, ``asyncio.timeout()`` and
cancellation work in handlers as in any coroutine. Speed is why workers are
long-lived rather than one Task per message: a worker woken for a batch of
messages runs them one after another, and a handler that completes without
suspending (an echo) costs no Task, no future and no loop turn of its own.
Before running a message a worker wakes one idle colleague if more are
waiting, so handlers that do suspend still run ``concurrency`` at a time.

Whatever a callback raises is its outcome, BaseExceptions included: a
worker Task reports it (``done``, or the pool's HandlerErrorLog with its
traceback) and carries on. asyncio lets KeyboardInterrupt and SystemExit out
of a Task and out of the loop itself, so a ``sys.exit()`` in one handler
would stop the whole service and strand every caller in flight; the threaded
pools keep their threads for the same reason. (A real Ctrl-C does not come
this way under ``asyncio.run``: it cancels the main task instead.) Only the
pool's own teardown cancellation ends a worker.

A handler that blocks the loop is the user's bug, but a hard one to see:
every step a worker takes on the loop is timed, and one that holds the loop
longer than ``slow_step`` seconds is logged, in the manner of asyncio's
debug mode (whose ``slow_callback_duration`` default is the 0.1 s used here).
"""

from __future__ import annotations

import asyncio
import collections.abc
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from ..logs import HandlerErrorLog

# As asyncio debug mode's slow_callback_duration: longer on the loop is a stall.
SLOW_STEP = 0.1
# For pools with no cap, such as the tunnel handlers (one per tunnel).
UNCAPPED = sys.maxsize

# done(key, ok, value): told the outcome of one callback, its result or exception;
# it logs the exception itself (the pool logs those of callbacks without one).
Done = Callable[[Any, bool, Any], None]
# A callback: a plain function, or an ``async def`` (its call returns the coroutine to await).
Callback = Callable[..., object]
# What waits for a worker: submit's arguments.
_Job = tuple[Callback, tuple[object, ...], int, Done | None, Any]


class HandlerPool:
    """Runs callbacks on the running loop, at most ``concurrency`` at once.

    ``submit(fn, args, size, done, key)`` runs ``fn(*args)`` (awaiting the
    coroutine it returns, if any) and then calls ``done(key, True, result)``
    or ``done(key, False, exception)``; a cancelled handler's exception is
    its CancelledError. A callback without ``done`` that raises has its
    exception logged, with traceback, through ``errors``.
    """

    def __init__(
        self,
        name: str,
        concurrency: int,
        memory: int,
        errors: HandlerErrorLog,
        slow_step: float = SLOW_STEP,
    ):
        self.name = name
        self.concurrency = concurrency
        self.memory = memory
        self.slow_step = slow_step
        self.waiting_bytes = 0  # bytes of the callbacks waiting for a worker
        self.running = 0
        self._errors = errors
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Job] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self._parked: list[asyncio.Future[None]] = []  # idle workers wait on these
        self._waking = False  # a worker was woken (or started) and has not run yet
        self._started = False
        self._closed = False
        self._cancelled = False

    def submit(
        self,
        fn: Callback,
        args: tuple[object, ...],
        size: int,
        done: Done | None = None,
        key: Any = None,
    ) -> bool:
        """Queue ``fn(*args)`` holding ``size`` bytes; False if over the budget."""
        if self._closed or self.waiting_bytes + size > self.memory:
            return False
        self.waiting_bytes += size
        self._queue.append((fn, args, size, done, key))
        if not self._waking and self._started:
            self._wake_one()
        return True

    def start(self) -> None:
        """Let queued and future callbacks run."""
        self._started = True
        if self._queue:
            self._wake_one()

    def close(self) -> None:
        """Take no more callbacks; queued and running ones still finish."""
        self._closed = True
        parked, self._parked = self._parked, []
        for waiter in parked:
            if not waiter.done():
                waiter.set_result(None)  # the worker finds the pool closed and ends

    def cancel(self) -> None:
        """Take no more callbacks, drop the queued ones, cancel the running ones."""
        self._closed = self._cancelled = True
        self._queue.clear()
        self.waiting_bytes = 0
        for worker in list(self._workers):
            worker.cancel()

    # -- workers ------------------------------------------------------------------

    def _wake_one(self) -> None:
        """Get one more worker going for the queue: an idle one, else a new one."""
        while self._parked:
            waiter = self._parked.pop()
            if not waiter.done():
                waiter.set_result(None)
                self._waking = True
                return
        if len(self._workers) < self.concurrency:
            worker = self._loop.create_task(_Timed(self._work(), self))
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
            self._waking = True

    async def _work(self) -> None:
        queue, loop = self._queue, self._loop
        while True:
            self._waking = False  # this is the worker that was woken
            while queue:
                fn, args, size, done, key = queue.popleft()
                self.waiting_bytes -= size
                if queue and not self._waking:
                    self._wake_one()  # in case this callback suspends
                self.running += 1
                try:
                    result = fn(*args)
                    if type(result) is types.CoroutineType or isinstance(
                        result, collections.abc.Coroutine
                    ):
                        result = await result
                except asyncio.CancelledError as err:
                    if self._cancelled:  # the pool is being torn down
                        self._finish(done, key, False, err)
                        raise
                    # The handler cancelled itself (or something cancelled
                    # the task it ran in): answer for it and carry on.
                    task = asyncio.current_task()
                    assert task is not None  # this coroutine runs only as a worker Task
                    task.uncancel()
                    self._finish(done, key, False, err)
                except BaseException as err:  # noqa: B036 - see the module docstring
                    self._finish(done, key, False, err)
                else:
                    self._finish(done, key, True, result)
            if self._closed:
                return
            waiter = loop.create_future()
            self._parked.append(waiter)
            await waiter

    def _finish(self, done: Done | None, key: Any, ok: bool, value: Any) -> None:
        self.running -= 1
        if done is not None:
            try:
                done(key, ok, value)
            except BaseException as err:  # the worker must outlive its completions too
                self._errors("handler completion raised", err, pool=self.name)
        elif not ok and not isinstance(value, asyncio.CancelledError):
            self._errors("handler raised", value, pool=self.name)

    def _step(self, step: Callable[[Any], Any], value: Any) -> Any:
        """One step of a worker on the loop, timed."""
        start = time.perf_counter()
        try:
            return step(value)
        finally:
            seconds = time.perf_counter() - start
            if seconds > self.slow_step:
                self._errors.log.warning(
                    "handler held the event loop; blocking calls belong in a thread "
                    "(asyncio.to_thread)",
                    pool=self.name,
                    seconds=round(seconds, 3),
                )


class _Timed(collections.abc.Coroutine[Any, Any, None]):
    """A worker coroutine whose every step on the loop the pool times."""

    __slots__ = ("_coro", "_pool")

    def __init__(self, coro: collections.abc.Coroutine[Any, Any, None], pool: HandlerPool):
        self._coro = coro
        self._pool = pool

    def send(self, value: Any) -> Any:
        return self._pool._step(self._coro.send, value)

    # Only the one-argument form: the Task driving this coroutine never uses the
    # deprecated (type, value, traceback) signature that Coroutine.throw declares.
    def throw(self, exc: BaseException) -> Any:  # type: ignore[override]
        return self._pool._step(self._coro.throw, exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a pool worker is driven by its Task only")
