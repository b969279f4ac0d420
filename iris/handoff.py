"""Handing replies from the reader thread to the callers waiting for them.

Under the GIL, waking every caller whose reply arrived at once is the
expensive way: each woken thread finds the GIL taken and goes back to sleep
on it, a second context switch per reply. So replies are handed on in a
*wake chain*: the reader wakes one caller, and each caller wakes the next
one as it leaves, by which time the GIL is about to be free.

    reader:  deliver(reply) ...;  after each read: queue them, wake the first
    caller:  woken -> wakes the next ready caller (or ends the chain) -> returns

While a chain runs, callers' new requests are held in the SocketWriter's
outbox instead of written one by one: the caller that ends the chain writes
them all in one system call, so the relay and the service also see batches.

A waiter that times out leaves the chain safely: it is taken out of the
ready queue, or, if it had been woken meanwhile, it wakes the next one itself.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar, cast

from .errors import TimeoutError
from .writer import SocketWriter

# Requests held back while a chain runs, at most. Enough to batch the
# requests of a chain's callers into one write; a bound, so that a long chain
# cannot keep the relay waiting for them.
HELD_REQUESTS = 8

# What a waiter is answered with (besides an exception to raise).
_Result = TypeVar("_Result")


class Waiter(Generic[_Result]):
    """One caller blocked on one answer from the reader thread.

    A pre-acquired lock is the cheapest blocking hand-off CPython offers.
    """

    __slots__ = ("lock", "result", "abandoned")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        # None until answered; no waiter is woken before its answer is set.
        self.result: _Result | Exception | None = None
        self.abandoned = False  # its caller gave up: not to be queued any more

    def resolve(self, result: _Result | Exception) -> None:
        """Answer and wake at once, outside any chain (rare answers, the end)."""
        self.result = result
        self.lock.release()

    def wait(self, timeout: float) -> _Result:
        """Block until :meth:`resolve`; the result, raised if an exception."""
        if not self.lock.acquire(timeout=timeout):
            raise TimeoutError("the relay did not answer in time")
        if isinstance(self.result, Exception):
            raise self.result
        return cast(_Result, self.result)  # answered: no longer the initial None


class ReplyHandoff:
    """The wake chain of one connection; see the module docstring."""

    __slots__ = ("_writer", "_lock", "_arrived", "_ready", "_running")

    def __init__(self, writer: SocketWriter) -> None:
        self._writer = writer
        self._lock = threading.Lock()
        self._arrived: list[Waiter[Any]] = []  # answered by the current read (reader only)
        self._ready: deque[Waiter[Any]] = deque()  # answered, not yet woken
        self._running = False  # a woken caller will wake the next one

    # -- the reader thread ----------------------------------------------------

    def deliver(self, waiter: Waiter[_Result], result: _Result) -> None:
        """Record ``waiter``'s answer; :meth:`wake` queues it after the read."""
        waiter.result = result
        self._arrived.append(waiter)

    def wake(self) -> None:
        """Queue the answers of a read, and start a chain if none runs."""
        arrived = self._arrived
        if not arrived:
            return
        with self._lock:
            self._ready.extend(waiter for waiter in arrived if not waiter.abandoned)
            arrived.clear()
            if self._running or not self._ready:
                return
            self._running = True
            self._ready.popleft().lock.release()

    def wake_all(self) -> None:
        """Wake every answered waiter at once; the connection ended."""
        with self._lock:
            ready, self._ready = [*self._ready, *self._arrived], deque()
            self._arrived.clear()
        for waiter in ready:
            if not waiter.abandoned:
                waiter.lock.release()

    # -- the callers ---------------------------------------------------------------

    def hold(self, data: bytes) -> bool:
        """Hold a request for the end of the running chain; False if no chain
        runs (or enough are held): then the caller sends it."""
        with self._lock:
            return self._running and self._writer.hold(data, HELD_REQUESTS)

    def wait(self, waiter: Waiter[_Result], timeout: float) -> _Result:
        """Block until ``waiter`` is answered; its result, raised if an exception."""
        try:
            answered = waiter.lock.acquire(timeout=timeout)
        except BaseException:  # interrupted (KeyboardInterrupt): leave the chain
            self.cancel(waiter)
            raise
        if answered:
            self._pass_on()
        elif not self.cancel(waiter):
            raise TimeoutError("the relay did not answer in time")
        if isinstance(waiter.result, Exception):
            raise waiter.result
        return cast(_Result, waiter.result)  # answered: no longer the initial None

    def _pass_on(self) -> None:
        """Wake the next answered caller, or end the chain and send what it held."""
        with self._lock:
            if self._ready:
                self._ready.popleft().lock.release()
                return
            self._running = False
        self._writer.flush()

    def cancel(self, waiter: Waiter[_Result]) -> bool:
        """Take the waiter of a caller that stops waiting (or never starts:
        an exception between sending and waiting) out of the chain; True if
        its answer had arrived after all. A second call returns False."""
        with self._lock:
            waiter.abandoned = True  # deliver() does not queue it any more
            if waiter in self._ready:  # answered, not yet woken: O(n), a rare path
                self._ready.remove(waiter)
                return True
            if not waiter.lock.acquire(blocking=False):
                return False  # never answered
        self._pass_on()  # woken as the timeout struck: the chain is ours to pass on
        return True
