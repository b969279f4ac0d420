"""The one owner of the supervisor's worker records and request tickets.

Two threads use the table: the relay connection's reader thread books
requests onto workers (through Switchboard), and the supervisor's loop
changes workers' states, settles answers and removes dead workers. Every
change goes through a method here, under the table's lock, so no other
module changes a record's state or its requests.

A worker's state changes only as ``TRANSITIONS`` allows, as h11's state
tables do for a connection. One pair is a known race, not a bug: a worker
retired while it was still booting (scaled down, or replaced by a reload)
announces READY afterwards; it stays DRAINING, so it never takes work it
would be gone before finishing. Any other change not in the table is a bug
in the supervisor and raises :class:`IllegalTransition`.

Two numbers name a request here, and never mix. Its ``relay_id`` is the
relay's id for it, what the answer must carry; it is only unique within one
relay process: a restarted relay numbers its requests from 0 again, and a
late reply to a request of the dead one would answer whichever new request
now has its number. So workers never see it: each request gets a ``ticket``
of ours, unique for the host's life, which the frames on the rings carry,
and the ticket's :class:`HeldRequest` remembers the connection and relay_id
to answer.
"""

from __future__ import annotations

import enum
import itertools
import threading
import time
from typing import NamedTuple

import iris
from iris import codec

from ..wire.ring import Ring
from .handle import WorkerHandle, WorkerState


class Change(enum.Enum):
    """What happened to a worker."""

    BOOTED = "booted"  # it sent READY
    RETIRED = "retired"  # the supervisor told it to drain


BOOTING, READY, DRAINING = WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING

TRANSITIONS: dict[tuple[WorkerState, Change], WorkerState] = {
    (BOOTING, Change.BOOTED): READY,
    (BOOTING, Change.RETIRED): DRAINING,
    (READY, Change.RETIRED): DRAINING,
    (DRAINING, Change.BOOTED): DRAINING,  # retired while booting: stays retired
}


class IllegalTransition(Exception):
    """A change the state table does not allow: a bug in the supervisor."""


_REPLY_OP, _SUCCESS = bytes((codec.Op.REPLY,)), b"\x01"


def reply_head(id_octets: bytes) -> bytes:
    """A successful reply packet up to its payload's length: the opcode, the
    request's id (its varint, as the relay sent it) and the success flag."""
    return _REPLY_OP + id_octets + _SUCCESS


class HeldRequest(NamedTuple):
    """A request a worker holds, under its ticket: who runs it, where the answer goes."""

    worker: WorkerHandle
    conn: iris.Connection  # the connection it came in on, perhaps closed since
    relay_id: int  # the relay's id for it, on that connection
    received: float  # monotonic, when it reached the host
    size: int  # bytes
    head: bytes  # reply_head: a successful reply is this, the length, the payload


_new_tuple = tuple.__new__


class WorkerTable:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Every live worker process, in fork order: a tuple, replaced when it
        # changes, so that a reader may iterate it while the table changes.
        self._workers: tuple[WorkerHandle, ...] = ()
        self._by_pid: dict[int, WorkerHandle] = {}
        self._held: dict[int, HeldRequest] = {}  # ticket -> the request
        self._tickets = itertools.count()
        self._outboxes: dict[Ring, WorkerHandle] | None = None  # until the workers change

    # -- the workers -------------------------------------------------------------------

    @property
    def workers(self) -> tuple[WorkerHandle, ...]:
        """The live workers, safe to iterate while the table changes."""
        return self._workers

    def add(self, worker: WorkerHandle) -> None:
        with self.lock:
            self._workers = (*self._workers, worker)
            self._by_pid[worker.pid] = worker
            self._outboxes = None

    def outboxes(self) -> dict[Ring, WorkerHandle]:
        """Each live worker's outbox, mapped to its worker: what the loop waits on."""
        outboxes = self._outboxes
        if outboxes is None:
            outboxes = self._outboxes = {w.outbox: w for w in self.workers}
        return outboxes

    def by_pid(self, pid: int) -> WorkerHandle | None:
        return self._by_pid.get(pid)

    def pids(self) -> list[int]:
        return list(self._by_pid)

    def in_state(self, state: WorkerState) -> list[WorkerHandle]:
        return [w for w in self._workers if w.state is state]

    def of_generation(self, number: int) -> list[WorkerHandle]:
        return [w for w in self._workers if w.generation == number]

    def transition(self, worker: WorkerHandle, change: Change) -> WorkerState:
        """Apply ``change`` to ``worker``'s state; the state it is in afterwards."""
        with self.lock:
            new = TRANSITIONS.get((worker.state, change))
            if new is None:
                raise IllegalTransition(
                    f"{worker} is {worker.state.value}: cannot be {change.value}"
                )
            worker.state = new
            return new

    def remove(self, worker: WorkerHandle) -> list[HeldRequest]:
        """Forget a dead worker; the requests it held, which nobody will answer now."""
        with self.lock:
            if worker in self._workers:
                self._workers = tuple(w for w in self._workers if w is not worker)
                self._outboxes = None
            self._by_pid.pop(worker.pid, None)
            held = [self._held.pop(ticket) for ticket in worker.in_flight]
            worker.in_flight.clear()
            worker.in_flight_bytes = 0
        return held

    # -- the requests ----------------------------------------------------------------

    def book(
        self,
        worker: WorkerHandle,
        conn: iris.Connection,
        relay_id: int,
        deadline: float,
        size: int,
        received: float | None = None,
        head: bytes | None = None,
    ) -> int:
        """Record a request as held by ``worker``; its ticket. Under the lock.

        ``received`` is when the request reached the host (its duration
        counts from there); by default now, for a request booked on arrival.
        ``head`` is its reply_head, if the caller has the id's octets at hand.
        """
        ticket = next(self._tickets)
        worker.in_flight[ticket] = (deadline, size)
        worker.in_flight_bytes += size
        if received is None:
            received = time.monotonic()
        if head is None:
            head = reply_head(codec.encode_varint(relay_id))
        # tuple.__new__: a NamedTuple's own constructor is Python code, 0.15 us a request.
        self._held[ticket] = _new_tuple(HeldRequest, (worker, conn, relay_id, received, size, head))
        return ticket

    def settle(self, ticket: int) -> HeldRequest | None:
        """Forget a request's bookkeeping; None if it was settled already."""
        with self.lock:
            held = self._held.pop(ticket, None)
            if held is not None:
                _, size = held.worker.in_flight.pop(ticket)
                held.worker.in_flight_bytes -= size
        return held

    def settle_all(self, tickets: list[int]) -> list[HeldRequest | None]:
        """settle() for each of a batch of answers, under one taking of the lock."""
        settled: list[HeldRequest | None] = []
        by_ticket = self._held
        with self.lock:
            for ticket in tickets:
                held = by_ticket.pop(ticket, None)
                if held is not None:
                    worker = held.worker
                    worker.in_flight_bytes -= worker.in_flight.pop(ticket)[1]
                settled.append(held)
        return settled

    def in_flight(self) -> int:
        return len(self._held)

    def running_deadline(self, worker: WorkerHandle, threads: int) -> float | None:
        with self.lock:
            return worker.running_deadline(threads)
