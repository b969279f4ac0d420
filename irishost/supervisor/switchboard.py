"""The switchboard: the relay's inbound work put through to workers, and answers back.

:class:`Switchboard` is the ``iris.dispatch.Inbound`` of the supervisor's
relay connection. The connection's reader thread calls it for every request,
broadcast and tunnel; it picks a worker and writes a frame to that worker's
ring, with no thread hop. The supervisor's loop calls :meth:`on_frame` with
what workers send back. Both sides book and settle requests through the
:class:`~irishost.supervisor.worker_table.WorkerTable`.

Every request the relay delivers gets exactly one answer from here: the
worker's reply, a fault when no worker can take it, or a fault when its
worker dies - unless its deadline passes first, when the relay has already
answered the caller with a timeout.

When no worker is ready at all (every one crashed and waiting for its
respawn, or still booting), requests wait here, as connections wait in the
listen queue in front of gunicorn's workers: up to ``limits.request_memory``
bytes of them, handed to the first worker that becomes ready. One whose
deadline passes while it waits is dropped unrun; its caller gets the
relay's timeout, as a client of gunicorn gets its proxy's. Only when that
budget is full does a request get a fault at once.

Every answer, reply or fault, leaves through :meth:`Switchboard.answer`,
which records its outcome in the :class:`~irishost.supervisor.request_log.RequestLog`
(metrics and access log); so does every request whose deadline passes
unanswered (its caller got the relay's timeout).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import iris
from iris.logs import ContextLog, RateLimitedWarning

from ..config import Config
from ..ops.metrics import Outcome
from ..wire import frames
from .bridge import TunnelBridge
from .fastpath import FastPath
from .handle import BEST_EFFORT_TIMEOUT, WorkerHandle, WorkerState, WorkerUnreachable
from .request_log import HostRequest, RequestLog
from .worker_choice import Refusal, Refusing, WorkerChoice
from .worker_table import WorkerTable


class WaitingRequest(NamedTuple):
    """A request on its way to a worker, or waiting here for one to be ready."""

    conn: iris.Connection  # the connection it came in on
    relay_id: int  # the relay's id for it, on that connection
    deadline: float  # monotonic; its caller has timed out after this
    payload: bytes
    received: float  # monotonic, when it reached the host

    @property
    def size(self) -> int:
        return len(self.payload)


class Switchboard:
    def __init__(
        self,
        config: Config,
        log: ContextLog,
        table: WorkerTable,
        recycle: Callable[[WorkerHandle], None],
    ):
        self.config = config
        self.log = log
        self.table = table
        self.conn: iris.Connection | None = None
        self.dropped: iris.Connection | None = None  # the last connection drop() was told of
        self.bridges: dict[int, TunnelBridge] = {}
        self.served = 0
        self._clock = itertools.count(1)  # numbers each choice of a worker (WorkerChoice)
        self._waiting: deque[WaitingRequest] = deque()  # for a worker to be ready, oldest first
        self._waiting_bytes = 0
        self._delivery_dropped = RateLimitedWarning(log, "broadcast or event dropped")
        self.accepting = True  # False while stopping: new requests get a fault
        self.recycle = recycle
        self.request_log = RequestLog(config)
        # The fast path (fastpath.py); the relay connection's reader calls route_leading.
        self.fast_path = FastPath(self)
        self.route_leading = self.fast_path.route_leading
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the rules of a reloaded config."""
        self.config = config
        self._memory_cap = config.limits.request_memory
        self._topic_rules = {topic.name: topic.deliver for topic in config.topics}
        self.request_log.reconfigure(config)

    def attach(self, conn: iris.Connection) -> Switchboard:
        """Used as the Connection's inbound factory."""
        self.conn = conn
        return self

    def ready_workers(self) -> list[WorkerHandle]:
        return self.table.in_state(WorkerState.READY)

    def in_flight(self) -> int:
        return self.table.in_flight()

    def waiting(self) -> int:
        """Requests waiting for a worker to be ready."""
        return len(self._waiting)

    # -- Inbound: called on the relay connection's reader thread ---------------------

    def request(self, relay_id: int, payload: bytes, timeout: float) -> None:
        conn = self.conn  # the connection whose reader thread this is: set
        assert conn is not None
        now = time.monotonic()
        waiting = WaitingRequest(conn, relay_id, now + timeout, payload, now)
        with self.table.lock:
            choice = self.choice(now).choose(len(payload))
            if choice is None:
                choice = self._wait_for_worker(waiting)
                if choice is None:
                    return
            ticket = self._book(choice, waiting)
        self._hand_over(waiting, choice, ticket)

    def _wait_for_worker(self, waiting: WaitingRequest) -> Refusal | None:
        """Keep a request until a worker is ready; a Refusal if the budget is full."""
        size = waiting.size
        if self._waiting_bytes + size > self._memory_cap:
            return Refusal(
                Outcome.NO_ROOM,
                f"no worker is ready, and the requests waiting for one fill the request "
                f"memory limit ({self._memory_cap} bytes, request is {size} bytes)",
            )
        self._waiting.append(waiting)
        self._waiting_bytes += size
        return None

    def _book(self, choice: WorkerHandle | Refusal, waiting: WaitingRequest) -> int | None:
        """Record a request as held by the worker chosen for it; its ticket. Under the
        lock; the worker's inbox is held until _hand_over (see WorkerHandle.hold_inbox)."""
        if isinstance(choice, Refusal):
            return None
        w = waiting
        ticket = self.table.book(choice, w.conn, w.relay_id, w.deadline, w.size, w.received)
        choice.hold_inbox()
        return ticket

    def _hand_over(
        self, waiting: WaitingRequest, choice: WorkerHandle | Refusal, ticket: int | None
    ) -> None:
        """Write a booked request to its worker's ring, or answer with the fault text."""
        if isinstance(choice, Refusal):
            self.answer(waiting, choice.outcome, choice.text)
            return
        assert ticket is not None  # _book gives a worker's booking its ticket
        try:
            choice.put(frames.Request(ticket, waiting.deadline, waiting.payload).encode())
        except WorkerUnreachable as err:
            held = self.table.settle(ticket)
            if held is not None:
                fault = f"{choice} did not take the request: {err}"
                self.answer(held, Outcome.NO_ROOM, fault, choice)
        finally:
            choice.release_inbox()

    def release_waiting(self) -> None:
        """Hand waiting requests to workers once one is ready; forget expired ones.

        Called by the supervisor's loop when a worker becomes ready, on every
        tick, and when stopping (the requests then get the shutdown fault).
        """
        now = time.monotonic()
        handed: list[tuple[WaitingRequest, WorkerHandle | Refusal, int | None]] = []
        expired: list[WaitingRequest] = []
        with self.table.lock:
            if not self._waiting:
                return
            live: list[WaitingRequest] = []
            for waiting in self._waiting:
                alive = waiting.deadline > now and not waiting.conn.closed
                (live if alive else expired).append(waiting)
            self._waiting = deque(live)
            self._waiting_bytes = sum(w.size for w in live)
            workers = self.choice(now)
            while self._waiting:
                waiting = self._waiting[0]
                choice = workers.choose(waiting.size)
                if choice is None:
                    break
                self._waiting.popleft()
                self._waiting_bytes -= waiting.size
                handed.append((waiting, choice, self._book(choice, waiting)))
        for waiting in expired:  # unanswered: the relay has timed them out, or is gone
            self.request_log.record(waiting, Outcome.EXPIRED)
        for waiting, choice, ticket in handed:
            self._hand_over(waiting, choice, ticket)

    def choice(self, now: float) -> WorkerChoice | Refusing:
        """Who takes requests now (see WorkerChoice); hold the table's lock
        while choosing."""
        if not self.accepting:
            return Refusing()
        return WorkerChoice(self.table.workers, now, self._memory_cap, self._clock)

    def broadcast(self, message: bytes) -> None:
        self._deliver(self.config.workers.broadcast, frames.Broadcast(message).encode())

    def event(self, topic: str) -> Callable[[bytes], None]:
        """The subscription callback for one configured topic."""

        def deliver(event: bytes) -> None:
            rule = self._topic_rules.get(topic)
            if rule is not None:  # else dropped from the config by a reload
                self._deliver(rule, frames.Event(topic, event).encode())

        return deliver

    def _deliver(self, rule: str, frame: bytes) -> None:
        """Best effort, as broadcasts and events are on the relay itself."""
        now = time.monotonic()
        with self.table.lock:
            targets = [w for w in self.ready_workers() if not w.stalled(now)]
            if rule == "one" and targets:
                targets = [min(targets, key=lambda w: len(w.in_flight))]
        for worker in targets:
            try:
                worker.put(frame, BEST_EFFORT_TIMEOUT)
            except WorkerUnreachable as err:
                self._delivery_dropped(worker=worker.slot, error=str(err))

    def tunnel(self, tunnel: iris.Tunnel) -> None:
        with self.table.lock:
            ready = self.ready_workers()
            worker = min(ready, key=lambda w: len(w.tunnels)) if ready else None
            if worker is not None:
                worker.tunnels.add(tunnel.id)
        if worker is None:
            tunnel.log.warning("no worker ready for the tunnel; closing it")
            tunnel.close_async()
            return
        bridge = TunnelBridge(tunnel, worker, self._forget_bridge)
        self.bridges[tunnel.id] = bridge
        bridge.start()

    def _forget_bridge(self, bridge: TunnelBridge) -> None:
        self.bridges.pop(bridge.tunnel.id, None)
        bridge.worker.tunnels.discard(bridge.tunnel.id)

    def drop(self, reason: iris.ClosedError) -> None:
        """Tell every worker's handler (handle_drop); then set ``dropped``.

        The supervisor replaces the workers before it registers again, and
        waits for ``dropped`` first, so that a worker forked for the new
        connection can never be told of the old one's drop.
        """
        for worker in self.table.workers:
            try:
                worker.put(frames.Drop(str(reason)).encode())
            except WorkerUnreachable:
                pass  # a wedged worker is the stuck-worker check's business
        self.dropped = self.conn

    def close(self) -> None:
        for bridge in list(self.bridges.values()):
            bridge.stop("relay connection closed")

    # -- answers from workers: called on the supervisor's loop -------------------------

    def on_frame(self, worker: WorkerHandle, frame: frames.Frame) -> None:
        """An answer or tunnel frame from ``worker``; FrameError for any other kind."""
        if isinstance(frame, frames.Reply):
            held = self.table.settle(frame.ticket)
            if held is not None:
                self.served += 1
                worker.served += 1
                # Retire the worker before its last reply goes out, or the
                # caller's next request could still reach it: a worker serves
                # max_requests, not one more.
                if worker.max_requests and worker.served >= worker.max_requests:
                    self.recycle(worker)
                outcome = Outcome.OK if frame.success else Outcome.FAULT
                self.answer(held, outcome, frame.payload, worker)
        elif isinstance(frame, frames.Expired):
            held = self.table.settle(frame.ticket)
            if held is not None:
                self.request_log.record(held, Outcome.EXPIRED, worker)
        elif isinstance(frame, (frames.TunSend, frames.TunAck, frames.TunClose)):
            bridge = self.bridges.get(frame.tunnel_id)
            # Tunnel ids restart with each connection too: a frame from the
            # worker of a tunnel that died with an old connection must not
            # reach a new tunnel that has its id.
            if bridge is not None and bridge.worker is worker:
                bridge.on_frame(frame)
        else:
            raise frames.FrameError(f"unexpected {type(frame).__name__} frame")

    def answer(
        self,
        request: HostRequest,
        outcome: Outcome,
        payload: bytes | str,
        worker: WorkerHandle | None = None,
    ) -> None:
        """Answer one request: every reply and every fault of the host goes out here.

        ``payload`` is the reply if ``outcome`` is OK, else the fault text. On a
        connection closed since, the answer is dropped: its relay has answered
        the caller already, or is gone with the caller."""
        request.conn.reply(request.relay_id, outcome is Outcome.OK, payload)
        self.request_log.record(request, outcome, worker)

    def fail_worker(self, worker: WorkerHandle, how: str) -> None:
        """Fault everything a dead worker held, and close its tunnels."""
        self.fast_path.flush()  # its last replies, collected just before, go first
        held = self.table.remove(worker)
        fault = f"{worker} died while handling the request: {how}"
        for request in held:
            self.answer(request, Outcome.WORKER_DIED, fault, worker)
        for tunnel_id in list(worker.tunnels):
            bridge = self.bridges.get(tunnel_id)
            if bridge is not None:
                bridge.stop(f"{worker} died: {how}")
        if held:
            self.log.warning(
                "faulted requests of a dead worker", worker=worker.slot, count=len(held)
            )
