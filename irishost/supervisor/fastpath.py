"""The supervisor's fast path: requests from the relay's bytes to the rings, and back.

Nearly all of a host's traffic is requests and their successful replies. As
the relay does (``iris/relay/passthrough.py``), the supervisor handles those
straight from the bytes, with no packet or frame objects:

- Requests. The relay connection's reader thread hands each read to
  :meth:`FastPath.route_leading` before its decoder sees it. For the complete
  REQUEST packets at the start of the read it finds the id, the payload and
  the timeout, picks a worker and books each request (one taking of the
  table's lock for the whole read), keeps the head of its reply (the id's
  octets as they came), and writes each worker's frames to its ring together:
  one wake-up per worker per read, not one per request. Anything else (another
  packet, an incomplete one, a request no worker can take now) ends the fast
  path there, and the decoder and ``Switchboard.request`` take the rest,
  with their waiting, refusals and faults.
- Replies. The loop hands every batch a worker wrote to
  :meth:`FastPath.answer_replies`, which settles the successful REPLY frames
  among them in one taking of the lock, and after each turn calls
  :meth:`FastPath.flush`, which writes their packets (head, length, payload)
  to the relay in one write for all the workers' batches of that turn. The
  other frames (faults, expiries, tunnels, READY) go back to the loop's
  decoder.

Every request still gets exactly one answer, is counted and logged
(``RequestLog``) and counts toward its worker's ``max_requests``, as on the
slow path; the bookkeeping (ticket, HeldRequest) is the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import iris
from iris import codec
from iris.relay.passthrough import NotFast, read_minimal_varint, read_varint

from ..ops.metrics import Outcome
from ..wire.frames import request_frame, split_replies
from .handle import WorkerHandle, WorkerUnreachable
from .request_log import HostRequest, RequestLog
from .worker_choice import Refusing, WorkerChoice
from .worker_table import HeldRequest, WorkerTable, reply_head

_REQUEST = int(codec.Op.REQUEST)
_encode_varint = codec.encode_varint
_MAX_MESSAGE = codec.MAX_MESSAGE


class FastPathHost(Protocol):
    """What the fast path shares with the slow one
    (``irishost.supervisor.switchboard.Switchboard``, which owns it): the
    connection, the bookkeeping and the counts, the choice of a worker, and
    the one way out for an answer the fast path does not send itself."""

    conn: iris.Connection | None
    table: WorkerTable
    request_log: RequestLog
    served: int
    recycle: Callable[[WorkerHandle], None]

    @property
    def answer(self) -> Callable[[HostRequest, Outcome, bytes | str, WorkerHandle | None], None]:
        """Switchboard.answer: the request, its outcome, the reply or fault, its worker."""

    def choice(self, now: float) -> WorkerChoice | Refusing:
        """Switchboard.choice: who takes requests now."""


class FastPath:
    """The fast path of one Switchboard; see the module docstring."""

    def __init__(self, switchboard: FastPathHost):
        self.switchboard = switchboard
        # The replies of one turn of the loop, until flush(): the packets per
        # connection, and the requests they answer per worker.
        self._sends: dict[iris.Connection, list[bytes]] = {}
        self._answered: list[tuple[WorkerHandle, list[HeldRequest]]] = []

    def route_leading(self, data: bytes) -> int:
        """Book and hand to workers the run of complete requests at the start
        of ``data``, one read of the relay connection (reader thread); return
        how many bytes they took. Dense on purpose: this runs per request."""
        switchboard = self.switchboard
        conn, table = switchboard.conn, switchboard.table
        batches: dict[WorkerHandle, tuple[list[int], list[bytes]]] = {}
        end, pos = len(data), 0
        now = time.monotonic()
        assert conn is not None  # set before the connection reads
        with table.lock:
            choose = switchboard.choice(now).choose
            while pos < end and data[pos] == _REQUEST:
                try:
                    relay_id, body = read_minimal_varint(data, pos + 1)
                    length, after = read_varint(data, body)
                    at = after + length
                    if length > _MAX_MESSAGE or at >= end:
                        break
                    timeout_ms, at = read_varint(data, at)
                except (IndexError, NotFast):  # incomplete, or for the codec to judge
                    break
                worker = choose(length)
                if type(worker) is not WorkerHandle:  # it waits, or is refused
                    break
                deadline = now + timeout_ms / 1000
                head = reply_head(data[pos + 1 : body])
                ticket = table.book(worker, conn, relay_id, deadline, length, now, head)
                batch = batches.get(worker)
                if batch is None:
                    batch = batches[worker] = ([], [])
                tickets, out = batch
                tickets.append(ticket)
                out.append(request_frame(ticket, deadline, data[after : after + length]))
                pos = at
            for worker in batches:
                worker.hold_inbox()  # see WorkerHandle.hold_inbox
        for worker, (tickets, out) in batches.items():
            try:
                self._hand_over(worker, tickets, out)
            finally:
                worker.release_inbox()
        return pos

    def _hand_over(self, worker: WorkerHandle, tickets: list[int], out: list[bytes]) -> None:
        """Write one read's requests to ``worker``; fault the ones it did not take."""
        try:
            worker.put_batch(out)
        except WorkerUnreachable as err:
            fault = f"{worker} did not take the request: {err}"
            for held in self.switchboard.table.settle_all(tickets[err.taken :]):
                if held is not None:
                    self.switchboard.answer(held, Outcome.NO_ROOM, fault, worker)

    def answer_replies(self, worker: WorkerHandle, batch: list[bytes]) -> list[bytes]:
        """Settle the successful replies among the frames ``worker`` wrote, for
        :meth:`flush` to send (loop thread); the other frames."""
        tickets, payloads, rest = split_replies(batch)
        if tickets:
            self._queue(worker, self.switchboard.table.settle_all(tickets), payloads)
        return rest

    def _queue(
        self, worker: WorkerHandle, settled: list[HeldRequest | None], payloads: list[bytes]
    ) -> None:
        """Queue the replies to the settled requests for flush()."""
        switchboard = self.switchboard
        answered: list[HeldRequest] = []
        oversized: list[tuple[HeldRequest, bytes]] = []
        sends = self._sends
        for held, payload in zip(settled, payloads, strict=True):
            if held is None:  # settled already: its worker's death answered it
                continue
            if len(payload) > _MAX_MESSAGE:  # refused by reply(), with a fault
                oversized.append((held, payload))
                continue
            out = sends.get(held.conn)
            if out is None:
                out = sends[held.conn] = []
            out += (held.head, _encode_varint(len(payload)), payload)
            answered.append(held)
        served = len(answered) + len(oversized)
        switchboard.served += served
        worker.served += served
        # Retire the worker before its last reply goes out (see on_frame).
        if worker.max_requests and worker.served >= worker.max_requests:
            switchboard.recycle(worker)
        for held, payload in oversized:
            switchboard.answer(held, Outcome.OK, payload, worker)
        self._answered.append((worker, answered))

    def flush(self) -> int:
        """Send the replies queued since the last flush, one write per connection
        for every worker's, then count and log them (loop thread); how many."""
        sends, self._sends = self._sends, {}
        answered, self._answered = self._answered, []
        for conn, out in sends.items():
            conn.send_encoded(b"".join(out))
        replies = 0
        for worker, requests in answered:
            self.switchboard.request_log.record_all(requests, Outcome.OK, worker)
            replies += len(requests)
        return replies
