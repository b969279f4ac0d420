"""Bounded handler pools: the thread and memory caps of docs/protocol.md section 7.

Inbound work runs on at most ``threads`` threads; what waits for a thread is
limited to ``memory`` bytes, so a flood of messages can neither spawn
unbounded threads nor exhaust memory. Threads are started on demand and kept.

Starting one can fail (threading's "can't start new thread": a pids cgroup
or RLIMIT_NPROC is full, or there is no memory for a stack). That refuses
only the task that needed the thread: the pool logs it (rate-limited), the
caller faults or drops it, and the pool serves later tasks once threads can
be started again.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Final

from .logs import HandlerErrorLog, RateLimitedWarning

# A queued task: the callable, its arguments and the bytes it holds.
_Task = tuple[Callable[..., object], tuple[object, ...], int]
_STOP: Final = None  # queued once per thread by close()


class HandlerPool:
    """Runs ``task(*args)`` on a capped number of threads, with a byte budget.

    A pool starts *held*: tasks queue but do not run until :meth:`start`, which
    is how a service's ``init`` runs before any other callback.
    """

    def __init__(self, name: str, threads: int, memory: int, errors: HandlerErrorLog) -> None:
        self.name = name
        self.threads = threads
        self.memory = memory
        self._errors = errors
        self._no_thread = RateLimitedWarning(
            errors.log.new(pool=name), "could not start a handler thread"
        )
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._started = False
        self._closed = False
        self._workers = 0
        self._idle = 0
        self._queued = 0
        self.waiting_bytes = 0

    def submit(self, task: Callable[..., object], args: tuple[object, ...], size: int) -> bool:
        """Queue a task holding ``size`` bytes; False if it does not fit the budget.

        Raises the RuntimeError of ``Thread.start``, with the task not queued,
        when it needs a new thread and none can be started: the caller owes
        its sender an answer, and a task queued behind busy threads instead
        could wait for ever without anyone learning why.
        """
        with self._lock:
            if self._closed or self.waiting_bytes + size > self.memory:
                return False
            if self._started and self._queued >= self._idle and self._workers < self.threads:
                self._spawn()  # before queueing, so a failure leaves nothing behind
            self.waiting_bytes += size
            self._queued += 1
            self._queue.put((task, args, size))
        return True

    def start(self) -> None:
        with self._lock:
            self._started = True
            for _ in range(min(self._queued, self.threads)):
                self._spawn()

    def close(self) -> None:
        """Stop taking tasks; threads exit once their current task ends."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in range(self._workers):
                self._queue.put(_STOP)

    def _spawn(self) -> None:
        """Start one more thread (lock held); on RuntimeError the counts are unchanged."""
        name = f"iris-{self.name}-{self._workers + 1}"
        try:
            threading.Thread(target=self._run, name=name, daemon=True).start()
        except RuntimeError as err:
            self._no_thread(error=str(err))  # logged here once for every kind of caller
            raise
        self._workers += 1

    def _run(self) -> None:
        get, lock = self._queue.get, self._lock
        while True:
            with lock:
                self._idle += 1
            item = get()
            with lock:
                self._idle -= 1
                if item is _STOP:
                    return
                self._queued -= 1
                self.waiting_bytes -= item[2]
            task, args, _ = item
            try:
                task(*args)
            except BaseException as err:
                # Whatever user code raises, SystemExit included, is logged and
                # the thread carries on: a pool of one thread that lost it
                # would never run anything again, and nobody would be told.
                self._errors("handler raised", err, pool=self.name)
