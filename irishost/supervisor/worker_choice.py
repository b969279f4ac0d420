"""Which worker takes a request: the least loaded ready one with room.

A choice is made for many requests at once: the fast path books a whole
read of the relay connection (about 30 requests at 64 in flight) under one
taking of the table's lock, during which no worker changes state, and the
waiting requests are handed out in one go when a worker becomes ready. So
:class:`WorkerChoice` finds the workers that may take work once, and keeps
them in a heap by load: a request costs O(log W), not a look at each of the
W workers and its state, which cost 0.4 us a request with one worker and
2.8 us with 16 (BENCHMARKS.md, "Choosing a worker").
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from typing import Any, NamedTuple

from ..ops.metrics import Outcome
from .handle import WorkerHandle, WorkerState

READY, DRAINING = WorkerState.READY, WorkerState.DRAINING
# Added to a booting worker's load: more than any ready worker's count of
# requests in flight, so it comes after them all.
BOOTING_LOAD = 1 << 62

# A worker in the heap: [load, last_chosen, pid, worker]. A list, changed in
# place; the pid breaks ties between workers never chosen yet, so that
# workers themselves are never compared.
_Entry = list[Any]


class Refusal(NamedTuple):
    """Why no worker can take a request: its outcome, and the fault text for its caller."""

    outcome: Outcome
    text: str


SHUTTING_DOWN = Refusal(Outcome.SHUTDOWN, "service is shutting down")


def no_room(open_workers: int, stalled: int, memory_cap: int, size: int) -> Refusal:
    """Why none of the ``open_workers`` (``stalled`` of them) can take a request."""
    if stalled == open_workers:
        return Refusal(
            Outcome.NO_ROOM,
            f"all {open_workers} workers are stalled: none took a frame in time lately",
        )
    return Refusal(
        Outcome.NO_ROOM,
        f"all {open_workers} workers are at their request memory limit "
        f"({memory_cap} bytes each, request is {size} bytes)"
        + (f" or stalled ({stalled})" if stalled else ""),
    )


class WorkerChoice:
    """The workers that may take requests now, least loaded first.

    Ready workers come before booting ones: when no ready worker has room, a
    booting one will do, and the request waits in its ring until it is up.
    A stalled or draining worker takes nothing. Among equally loaded workers
    the one chosen least recently goes first (``WorkerHandle.last_chosen``,
    numbered by the switchboard's ``clock``), so quick handlers, which leave
    every worker idle whenever a request arrives, are served round-robin, as
    on the relay; otherwise the first worker would get them all.

    Valid while the table's lock is held: the loads are counted when it is
    made, and then only its own choices add to them.
    """

    __slots__ = ("_heap", "_memory_cap", "_clock", "_ready", "_open", "_stalled")

    def __init__(
        self,
        workers: Iterable[WorkerHandle],
        now: float,
        memory_cap: int,
        clock: itertools.count[int],
    ):
        self._memory_cap = memory_cap
        self._clock = clock
        self._heap: list[_Entry] = []
        self._ready = self._open = self._stalled = 0
        for worker in workers:
            state = worker.state
            if state is DRAINING:
                continue
            self._open += 1
            if state is READY:
                self._ready += 1
            if now < worker.stalled_until:
                self._stalled += 1
                continue
            load = len(worker.in_flight) + (0 if state is READY else BOOTING_LOAD)
            self._heap.append([load, worker.last_chosen, worker.pid, worker])
        heapq.heapify(self._heap)

    def choose(self, size: int) -> WorkerHandle | Refusal | None:
        """The worker for a request of ``size`` bytes, a Refusal saying why
        none can take it, or None when no worker is ready at all (the request
        waits for one). Dense on purpose: this runs per request."""
        if not self._ready:
            return None
        heap = self._heap
        if heap:
            entry = heap[0]
            if entry[3].in_flight_bytes + size <= self._memory_cap:
                worker = self._count(entry)
                heapq.heapreplace(heap, entry)  # the top, one more: sifted down
                return worker
            for entry in sorted(heap):  # the least loaded one is full: rare
                if entry[3].in_flight_bytes + size <= self._memory_cap:
                    worker = self._count(entry)
                    heapq.heapify(heap)
                    return worker
        return no_room(self._open, self._stalled, self._memory_cap, size)

    def _count(self, entry: _Entry) -> WorkerHandle:
        """One more request for ``entry``'s worker, chosen now; the worker.
        The caller puts the heap back in order."""
        worker: WorkerHandle = entry[3]
        entry[0] += 1
        entry[1] = worker.last_chosen = next(self._clock)
        return worker


class Refusing:
    """The choice while the host stops: every request gets the shutdown fault."""

    def choose(self, size: int) -> Refusal:
        return SHUTTING_DOWN
