"""The worker core: what a worker process does with frames, whoever runs its handler.

Frames from the supervisor come in through :meth:`WorkerCore.handle`; the
core keeps the state of the worker and hands the handler's work to an
executor (:class:`Executor`: threads in threads.py, an event loop in
loop.py, what they share in executor.py), which says how handler code runs
and nothing else::

    inbound ring --> executor's frame loop --> WorkerCore.handle(batch)
                                                 |  the frame table
                          in-flight count, tunnels, drain
                                                 v
                     Executor.run_request / run_broadcast / ...   (handler code)
                                                 |
    outbound ring <-- WorkerCore.complete / send / returned  <------+

The core owns:

- the frame table: which frame does what;
- the in-flight count (requests, broadcasts, events and ``handle_drop``
  handed to the executor and not yet ended) and the open tunnels, which
  together say whether the worker is idle;
- the drain: once DRAIN came, the worker ends when it is idle;
- the fork guard. A process a handler forks shares the worker's rings: two
  writers on a ring meant for one would corrupt it or hand a caller the
  child's reply. Handler code comes back into the worker only through
  :meth:`WorkerCore.complete`, :meth:`WorkerCore.send` and
  :meth:`WorkerCore.returned`, and each of them ends such a child first.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from iris.logs import ContextLog, HandlerErrorLog

from ..wire import frames
from ..wire.ring import Ring
from .tunnel import TunnelProxy, TunnelRegistry

# The worker's exit code when its supervisor disappeared.
PARENT_GONE = 4
# The exit code of a process forked by a handler that returned into the worker's code.
FORKED_CHILD_EXIT = 0
# How often an idle worker looks up from its ring to check on its parent, and
# how long a write to a full outbound ring waits before it does the same.
IDLE_CHECK_SECONDS = 1.0

ProxyT = TypeVar("ProxyT", bound=TunnelProxy)


class Executor(Protocol):
    """Runs a worker's handler. The core calls the ``run_*`` methods on the
    frame loop, so none may block; the work they start ends through the
    core (``complete``, ``returned``), which counts it out."""

    def boot(self) -> None:
        """Connect to the relay, run the handler's ``init``, start the pools;
        raises what init raised."""

    def serve(self) -> int:
        """Read frames into the core until drained or orphaned; the exit code."""

    def run_request(self, ticket: int, deadline: float, payload: bytes) -> str | None:
        """Start ``handle_request``, answered through ``complete``; or the fault
        text for its caller if it cannot be taken."""

    def run_broadcast(self, payload: bytes) -> bool:
        """Start ``handle_broadcast``; False (logged) if it is dropped."""

    def run_event(self, topic: str, payload: bytes) -> bool:
        """Start ``handle_event``; False (logged) if it is dropped."""

    def run_drop(self, reason: str) -> bool:
        """Start ``handle_drop``; False (logged) if it cannot run."""

    def run_tunnel(self, tunnel_id: int) -> None:
        """Open the tunnel's proxy through the core and start ``handle_tunnel``;
        close it if that cannot run."""


def supervisor_gone(alive: int) -> bool:
    """Whether the supervisor's alive pipe reads EOF: nobody writes to it,
    so it becomes readable only when its write end, held by the supervisor
    alone, is closed."""
    readable, _, _ = select.select([alive], [], [], 0)
    return bool(readable)


class WorkerCore:
    """One worker's state and frame table; see the module docstring.

    Made before its executor, which is made with it and then attached
    (:meth:`attach`): the two call each other, the core for work, the
    executor for completions.
    """

    def __init__(self, outbox: Ring, alive: int, log: ContextLog, index: int):
        self.log = log
        self.errors = HandlerErrorLog(log)  # every callback of this worker shares it
        self.where = f" in worker {index}"  # for the faults this worker gives
        self._outbox = outbox
        self._alive = alive
        self._out_lock = threading.Lock()  # handler threads share the outbound ring
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._tunnels: TunnelRegistry = {}
        self._draining = False
        self._forked = False  # True only in a process a handler forked
        self._executor: Executor
        self._table: dict[type[frames.Frame], Callable[..., None]] = {
            frames.Request: self._on_request,
            frames.Broadcast: self._on_broadcast,
            frames.Event: self._on_event,
            frames.Tunnel: self._on_tunnel,
            frames.TunData: self._tunnel_handler("on_data"),
            frames.TunSent: self._tunnel_handler("on_sent"),
            frames.TunClosed: self._tunnel_handler("on_closed"),
            frames.Drop: self._on_drop,
            frames.Drain: self._on_drain,
        }

    def attach(self, executor: Executor) -> None:
        """Run the handler's work on ``executor`` from now on."""
        self._executor = executor

    # -- state --------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Counted work handed to the executor and not yet ended."""
        return self._in_flight

    @property
    def drained(self) -> bool:
        """DRAIN came, and no work or tunnel is left: the worker may end."""
        return self._draining and self._in_flight == 0 and not self._tunnels

    def orphaned(self) -> bool:
        """Whether the supervisor is gone (logged): the worker must end at once."""
        if supervisor_gone(self._alive):
            self.log.error("supervisor is gone; exiting")
            return True
        return False

    # -- frames in ----------------------------------------------------------------

    def handle(self, batch: Iterable[bytes]) -> None:
        """Act on frames read from the inbound ring, in order.

        A frame that does not decode raises FrameError: the supervisor is
        broken, and the worker ends rather than guess.
        """
        table, decode = self._table, frames.decode
        for data in batch:
            message = decode(data)
            table[type(message)](*message)

    def _on_request(self, ticket: int, deadline: float, payload: bytes) -> None:
        self._count(1)
        fault = self._executor.run_request(ticket, deadline, payload)
        if fault is not None:
            self.answer(ticket, (False, fault))

    def _on_broadcast(self, payload: bytes) -> None:
        self._count(1)
        if not self._executor.run_broadcast(payload):
            self._count(-1)

    def _on_event(self, topic: str, payload: bytes) -> None:
        self._count(1)
        if not self._executor.run_event(topic, payload):
            self._count(-1)

    def _on_drop(self, reason: str) -> None:
        """handle_drop, counted like a request.

        The supervisor retires the worker soon after (fresh workers take over
        once the relay is back); counting it makes that drain wait for the
        handler to finish instead of exiting under it.
        """
        self._count(1)
        if not self._executor.run_drop(reason):
            self._count(-1)

    def _on_tunnel(self, tunnel_id: int) -> None:
        self._executor.run_tunnel(tunnel_id)

    def _tunnel_handler(self, method: str) -> Callable[[int, bytes | str | None], None]:
        """A frame handler passing a tunnel frame to that tunnel's ``method``."""

        def handle(tunnel_id: int, value: bytes | str | None) -> None:
            tunnel = self._tunnels.get(tunnel_id)
            if tunnel is not None:  # else closed meanwhile
                getattr(tunnel, method)(value)

        return handle

    def _on_drain(self) -> None:
        self._draining = True

    def _count(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    # -- for the executor ---------------------------------------------------------

    def open_tunnel(self, proxy_class: type[ProxyT], tunnel_id: int) -> ProxyT:
        """A tunnel's proxy for its handler, held open (the worker is not idle)
        until it closes; its frames are routed to it from now on."""
        tunnel = proxy_class(tunnel_id, self.send, self.log.new(tunnel=tunnel_id), self._tunnels)
        self._tunnels[tunnel_id] = tunnel
        return tunnel

    def answer(self, ticket: int, outcome: tuple[bool, bytes | str] | None) -> None:
        """A request ended: its REPLY, (success, reply or fault text), or EXPIRED
        when ``outcome`` is None (its caller had timed out before it ran)."""
        if outcome is None:
            self.complete(frames.Expired(ticket).encode())
        else:
            self.complete(frames.reply_frame(ticket, *outcome))

    def complete(self, frame: bytes | None = None) -> None:
        """Counted work ended: send its answer, if it has one, and count it out.

        Handler code returns here: the fork guard comes first.
        """
        self._leave_if_forked()
        try:
            if frame is not None:
                self._put(frame)
        finally:
            self._count(-1)

    def returned(self) -> None:
        """Uncounted handler code (a tunnel's) returned into the worker."""
        self._leave_if_forked()

    def send(self, frame: bytes) -> None:
        """Write one frame to the supervisor, from any thread; handler code may
        call this (a tunnel's send), so the fork guard comes first."""
        self._leave_if_forked()
        self._put(frame)

    def _put(self, frame: bytes) -> None:
        with self._out_lock:
            while True:
                try:
                    self._outbox.put(frame, timeout=IDLE_CHECK_SECONDS)
                    return
                except TimeoutError:
                    if supervisor_gone(self._alive):
                        os._exit(PARENT_GONE)

    # -- the fork guard -----------------------------------------------------------

    def note_fork(self) -> None:
        """The at-fork hook (``os.register_at_fork(after_in_child=...)``): this
        process is a child a handler forked."""
        self._forked = True

    def _leave_if_forked(self) -> None:
        """End a process a handler forked, should it come back into the worker's code.

        Exiting is the only safe course: only the forking thread exists in
        the child, so the pools it would return to are never fed again (it
        would block forever), and the locks other threads held at fork stay
        held. A flag set by an at-fork hook costs the hot path one attribute
        read, where ``os.getpid()`` would cost a system call.
        """
        if self._forked:
            self.log.warning("a process forked by a handler returned into the worker; it exits")
            os._exit(FORKED_CHILD_EXIT)
