"""Capped handler concurrency on an event loop: the asyncio HandlerPool.

Mirrors :class:`iris.pool.HandlerPool`, with coroutines in place of threads:
at most ``concurrency`` callbacks run at once (``request_threads`` and the
other ``*_threads`` limits keep that meaning), what waits for a slot is
limited to ``memory`` bytes, and a pool starts *held* so that a service's
``init`` runs before any other callback.

A callback may be a plain function, which runs at once on the loop, inside
the read that delivered its message; or it may return a coroutine, which
runs in a Task of its own, as any coroutine on the loop expects
(``asyncio.current_task()``, ``asyncio.timeout()`` and cancellation work in
handlers as everywhere else).

A handler that blocks the loop is the user's bug, but a hard one to see:
every step a handler takes on the loop is timed, and one that holds the loop
longer than ``slow_step`` seconds is logged, in the manner of asyncio's debug
mode (whose ``slow_callback_duration`` default is the 0.1 s used here).
"""

from __future__ import annotations

import asyncio
import collections.abc
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..logs import ContextLog

# As asyncio debug mode's slow_callback_duration: longer on the loop is a stall.
SLOW_STEP = 0.1
# For pools with no cap, such as one tunnel handler per tunnel.
UNCAPPED = sys.maxsize

# done(key, ok, value): told the outcome of one callback.
Done = Callable[[Any, bool, Any], None]

class HandlerPool:
    """Runs callbacks on the running loop, at most ``concurrency`` at once.

    ``submit(fn, args, size, done, key)`` runs ``fn(*args)`` (awaiting the
    coroutine it returns, if any) and then calls ``done(key, True, result)``
    or ``done(key, False, exception)``; a cancelled handler's exception is
    its CancelledError.
    """

    def __init__(
        self,
        name: str,
        concurrency: int,
        memory: int,
        log: ContextLog,
        slow_step: float = SLOW_STEP,
    ):
        self.name = name
        self.concurrency = concurrency
        self.memory = memory
        self.slow_step = slow_step
        self.waiting_bytes = 0  # bytes of the callbacks waiting for a slot
        self.running = 0
        self._log = log
        self._queue: deque[tuple] = deque()
        self._tasks: set[asyncio.Task] = set()
        self._started = False
        self._closed = False
        self._draining = False  # guards against recursing through _release

    def submit(
        self, fn: Callable, args: tuple, size: int, done: Done | None = None, key: Any = None
    ) -> bool:
        """Run or queue ``fn(*args)`` holding ``size`` bytes; False if over budget.

        As in the threaded pool, the budget applies even when a slot is free,
        so a single message over ``memory`` is refused rather than run.
        """
        if self._closed or self.waiting_bytes + size > self.memory:
            return False
        if self._started and self.running < self.concurrency:
            self._run(fn, args, done, key)
        else:
            self.waiting_bytes += size
            self._queue.append((fn, args, size, done, key))
        return True

    def start(self) -> None:
        """Let queued and future callbacks run."""
        self._started = True
        self._release_waiting()

    def close(self) -> None:
        """Take no more callbacks; queued and running ones still finish."""
        self._closed = True

    def cancel(self) -> None:
        """Take no more callbacks, drop the queued ones, cancel the running ones."""
        self._closed = True
        self._queue.clear()
        self.waiting_bytes = 0
        for task in list(self._tasks):
            task.cancel()

    # -- running -----------------------------------------------------------------

    def _run(self, fn: Callable, args: tuple, done: Done | None, key: Any) -> None:
        self.running += 1
        start = time.perf_counter()
        try:
            result = fn(*args)
            if isinstance(result, collections.abc.Coroutine):
                task = asyncio.get_running_loop().create_task(_Timed(result, self))
                self._tasks.add(task)
                task.add_done_callback(lambda task: self._task_done(task, done, key))
                return
        except BaseException as err:  # noqa: B036 - the callback's outcome, whatever it was
            self._finish(done, key, False, err)
            return
        finally:
            self._timed(time.perf_counter() - start)
        self._finish(done, key, True, result)

    def _step(self, step: Callable, value: Any) -> Any:
        """One resumption of a suspended handler coroutine, timed."""
        start = time.perf_counter()
        try:
            return step(value)
        finally:
            self._timed(time.perf_counter() - start)

    def _timed(self, seconds: float) -> None:
        if seconds > self.slow_step:
            self._log.warning(
                "handler held the event loop; blocking calls belong in a thread "
                "(asyncio.to_thread)",
                pool=self.name,
                seconds=round(seconds, 3),
            )

    def _task_done(self, task: asyncio.Task, done: Done | None, key: Any) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self._finish(done, key, False, asyncio.CancelledError())
        elif task.exception() is not None:
            self._finish(done, key, False, task.exception())
        else:
            self._finish(done, key, True, task.result())

    def _finish(self, done: Done | None, key: Any, ok: bool, value: Any) -> None:
        if done is not None:
            try:
                done(key, ok, value)
            except Exception as err:
                self._log.error("handler completion raised", pool=self.name, error=repr(err))
        elif not ok:
            self._log.error("handler raised", pool=self.name, error=repr(value))
        self.running -= 1
        self._release_waiting()

    def _release_waiting(self) -> None:
        """Start queued callbacks while slots are free.

        Iterative: a callback that completes at once would otherwise start
        the next from inside its own completion, one stack frame per message.
        """
        if self._draining or not self._started:
            return
        self._draining = True
        try:
            queue = self._queue
            while queue and self.running < self.concurrency:
                fn, args, size, done, key = queue.popleft()
                self.waiting_bytes -= size
                self._run(fn, args, done, key)
        finally:
            self._draining = False


class _Timed(collections.abc.Coroutine):
    """A handler coroutine whose every step on the loop the pool times."""

    __slots__ = ("_coro", "_pool")

    def __init__(self, coro: collections.abc.Coroutine, pool: HandlerPool):
        self._coro = coro
        self._pool = pool

    def send(self, value: Any) -> Any:
        return self._pool._step(self._coro.send, value)

    def throw(self, exc: BaseException) -> Any:
        return self._pool._step(self._coro.throw, exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self):
        raise TypeError("a handler coroutine is driven by its Task only")
