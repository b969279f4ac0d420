"""A worker process: runs the service's handler on work from the supervisor.

The worker is forked by a fork server (``irishost.forks.server``) and never returns
into its code: :func:`run` ends in ``os._exit``. Its main thread reads
frames from the inbound ring and hands them to the binding's bounded pools
(``iris.pool.HandlerPool``), so the thread and memory caps of a worker are
exactly those of ``iris.register``; handler threads write their answers to
the outbound ring.

Exit codes tell the supervisor how a worker ended: 0 after a requested
drain (the handler's ``close()`` and ``atexit`` callbacks have run then),
BOOT_FAILED when the handler could not be imported or initialised
(the FAILED frame carries the traceback), PARENT_GONE when the supervisor
disappeared.

A worker never outlives its supervisor. It is forked by a fork server
through an intermediate process that exits at once, which hands the worker
to the supervisor, a child subreaper; once the supervisor is its parent, the
kernel kills it when the supervisor dies (PR_SET_PDEATHSIG, set before
anything else runs), whatever it is doing, even blocked in a C call inside
``init``. It also holds the read end of the supervisor's alive pipe, which
reads EOF once the supervisor is gone (as CPython's forkserver's children
do), and looks at it whenever it is idle. And a process a handler forks never
touches the worker's rings: it shares their
mapping, and two writers on a ring meant for one would corrupt it or hand a
caller the child's reply. Should such a child return from the handler into
the worker's code, it exits there instead (see ``_leave_if_forked``).
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import setproctitle

import iris
import iris.aio
from iris.dispatch import answer, memory_fault, serve_tunnel, thread_fault
from iris.handlers import close_handler
from iris.logfmt import reopen_log_file, start_log_writer, stop_log_writer
from iris.logs import ContextLog, HandlerErrorLog, RateLimitedWarning
from iris.pool import HandlerPool

from ..config import Config
from ..loader import reload_handler
from ..wire import frames
from ..wire.ring import Ring
from .tunnel import TunnelRegistry, WorkerTunnel

if TYPE_CHECKING:
    from .loop import LoopWorker

BOOT_FAILED = 3
PARENT_GONE = 4
# The exit code of a process forked by a handler that returned into the worker's code.
FORKED_CHILD_EXIT = 0

# prctl(2) option: the signal the kernel sends this process when its parent dies.
PR_SET_PDEATHSIG = 1
# Loaded before any fork, so a fresh worker only makes the call.
_libc = ctypes.CDLL(None, use_errno=True)

# How often an idle worker looks up from its ring to check on its parent.
IDLE_CHECK_SECONDS = 1.0

# The frame loop's table: each kind of frame to the method given its fields.
FrameHandlers = dict[type[frames.Frame], Callable[..., None]]


class _Pool(Protocol):
    """What :class:`CallbackPools` needs of a pool: iris.pool's or iris.aio.pool's."""

    name: str

    def start(self) -> None: ...


PoolT = TypeVar("PoolT", bound=_Pool)


class CallbackPools(Generic[PoolT]):
    """The request, broadcast and event pools, as both kinds of worker route to them.

    :class:`Worker` runs callbacks on threads (iris.pool), the loop worker
    (irishost/worker/loop.py) as coroutines (iris.aio.pool); which pools
    there are, their limits and how broadcasts and events reach them are
    the same, so they live here once. Each kind says how a fire-and-forget
    callback is run and counted in ``_run_counted``.
    """

    handler: Any
    log: ContextLog
    errors: HandlerErrorLog
    _requests: PoolT
    _broadcasts: PoolT
    _topics: dict[str, tuple[PoolT, RateLimitedWarning]]
    _broadcast_overflow: RateLimitedWarning

    def _make_pools(
        self, pool_class: Callable[[str, int, int, HandlerErrorLog], PoolT], config: Config
    ) -> list[PoolT]:
        """Make the pools the config asks for (held until started); all of them."""
        limits, errors = config.limits, self.errors
        self._requests = pool_class(
            "request", limits.request_threads, limits.request_memory, errors
        )
        self._broadcasts = pool_class(
            "broadcast", limits.broadcast_threads, limits.broadcast_memory, errors
        )
        self._topics = {
            topic.name: (
                pool_class(f"topic-{topic.name}", topic.event_threads, topic.event_memory, errors),
                RateLimitedWarning(self.log.new(topic=topic.name), "event dropped: memory limit"),
            )
            for topic in config.topics
        }
        self._broadcast_overflow = RateLimitedWarning(self.log, "broadcast dropped: memory limit")
        return [self._requests, self._broadcasts, *(p for p, _ in self._topics.values())]

    def _on_broadcast(self, message: bytes) -> None:
        self._run_counted(
            self._broadcasts,
            self.handler.handle_broadcast,
            (message,),
            len(message),
            self._broadcast_overflow,
        )

    def _on_event(self, topic: str, event: bytes) -> None:
        pool, overflow = self._topics[topic]
        self._run_counted(pool, self.handler.handle_event, (topic, event), len(event), overflow)

    def _run_counted(
        self,
        pool: PoolT,
        callback: Callable[..., object],
        args: tuple[object, ...],
        size: int,
        overflow: RateLimitedWarning,
    ) -> None:
        """Submit a fire-and-forget callback, counted so a drain waits for it."""
        raise NotImplementedError


@dataclass
class WorkerSpec:
    """What a worker needs, set before fork."""

    index: int
    config: Config
    inbox: Ring  # supervisor -> worker
    outbox: Ring  # worker -> supervisor
    handler_class: type | None  # preloaded in the fork server, or None to import here
    supervisor: int  # the supervisor's pid: its parent once reparented; it must not outlive it
    alive: int  # the read end of the supervisor's alive pipe: EOF once the supervisor is gone


def run(spec: WorkerSpec) -> None:
    """Body of a forked worker, called first thing after fork; never returns.

    A drained worker (exit code 0, after ``handler.close()``) runs the
    ``atexit`` callbacks handler code registered, as a program's normal
    exit would; ``os._exit`` alone would skip them. No other way out does:
    an orphaned or failed worker must not act as if it ended normally, and
    a process a handler forked that came back here shares the worker's
    registry, not its resources. The log writer's own hook was registered
    before the handler's (LIFO), so it runs after them and writes their lines.
    """
    code = 1
    pid = os.getpid()
    try:
        _wait_for_reparenting(spec.supervisor)
        die_with_parent(spec.supervisor)
        code = Worker(spec).serve()
        if code == 0 and os.getpid() == pid:
            atexit._run_exitfuncs()
    except BaseException:  # the last line of defence in a child: report, then exit
        traceback.print_exc()
    finally:
        stop_log_writer()  # os._exit skips atexit, where the queued lines would be written
        os._exit(code)


def _wait_for_reparenting(supervisor: int) -> None:
    """Wait until the intermediate that forked this worker has exited and the
    supervisor (a child subreaper) is this worker's parent.

    The intermediate exits right after the fork, so this takes microseconds;
    a parent that is neither means the supervisor died meanwhile.
    """
    middle = os.getppid()
    while (parent := os.getppid()) != supervisor:
        if parent != middle:
            os._exit(PARENT_GONE)
        time.sleep(0.0005)


def supervisor_gone(alive: int) -> bool:
    """Whether the supervisor's alive pipe reads EOF: nobody writes to it,
    so it becomes readable only when its write end, held by the supervisor
    alone, is closed."""
    readable, _, _ = select.select([alive], [], [], 0)
    return bool(readable)


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` dies, at any stage.

    Polling ``getppid`` alone leaves gaps: a worker blocked in ``init``
    never polls. SIGKILL, because handlers may catch or block anything
    milder. The supervisor may have died between fork and prctl, when no
    signal is sent any more: the check after it closes that gap.
    """
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent:
        os._exit(PARENT_GONE)


def _close_inherited_fds(keep: set[int]) -> None:
    """Close the supervisor's descriptors (relay sockets, siblings' rings).

    Otherwise a worker would hold the relay's listening port open after the
    supervisor died, and keep siblings' eventfds alive.
    """
    keep = {0, 1, 2, *keep}
    low = 3
    for fd in sorted(keep):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


class Worker(CallbackPools[HandlerPool]):
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.config = spec.config
        # The supervisor's context too: "service=<cluster>" finds both in a log.
        self.log = ContextLog(logging.getLogger("irishost")).new(
            service=spec.config.service.cluster, worker=spec.index
        )
        self.errors = HandlerErrorLog(self.log)  # every callback of this worker shares it
        self._where = f" in worker {spec.index}"  # for the faults this worker gives
        # Tunnels and handle_drop get threads of their own, outside the pools.
        self._no_thread = RateLimitedWarning(self.log, "could not start a handler thread")
        self._forked = False  # True only in a process a handler forked; see _leave_if_forked
        self._out_lock = threading.Lock()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        self._tunnels: TunnelRegistry = {}
        self._draining = False
        # An iris.aio handler's event loop (irishost/worker/loop.py).
        self._loop_worker: LoopWorker | None = None

    # -- life cycle ---------------------------------------------------------------

    def serve(self) -> int:
        config = self.config
        setproctitle.setproctitle(
            f"irishost: worker {self.spec.index} {config.service.cluster} ({config.file.name})"
        )
        for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, signal.SIG_IGN)  # the supervisor handles these
        signal.signal(signal.SIGUSR1, lambda *_: reopen_log_file())  # as the supervisor
        for signum in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        inbox, outbox = self.spec.inbox, self.spec.outbox
        # The fork server maps no other worker's rings when it forks, so a
        # worker that corrupts memory cannot reach theirs.
        _close_inherited_fds(
            {inbox.data_fd, inbox.space_fd, outbox.data_fd, outbox.space_fd, self.spec.alive}
        )
        reopen_log_file()  # the fork server's may be a file logrotate has moved since
        start_log_writer()  # so a stalled stderr never holds up a handler thread that logs
        os.register_at_fork(after_in_child=self._note_fork)
        try:
            self._boot()
        except BaseException:
            self.send(frames.Failed(traceback.format_exc()).encode())
            return BOOT_FAILED
        self.send(frames.Ready(os.getpid()).encode())  # the supervisor logs "worker ready"
        return self._loop()

    def _boot(self) -> None:
        config = self.config
        # Imported here (preload = false): from source, for the same reason
        # reloads do, so a worker never runs code older than its files.
        handler_class = self.spec.handler_class or reload_handler(config)
        self.handler = handler_class(**config.settings)
        if config.topics and not callable(getattr(self.handler, "handle_event", None)):
            raise TypeError(
                f"{config.service.handler} has no handle_event(topic, event) method, "
                f"but the config subscribes to {', '.join(t.name for t in config.topics)}"
            )
        if isinstance(self.handler, iris.aio.ServiceHandler):
            from .loop import LoopWorker  # here: async_worker imports this module

            self._loop_worker = LoopWorker(self)
            self._loop_worker.boot()
            return
        # init's connection is the worker's own plain client: outbound traffic
        # goes straight to the relay instead of through the supervisor.
        self.conn = self._connect()
        self.handler.init(self.conn)
        for pool in self._make_pools(HandlerPool, config):
            pool.start()

    def _connect(self) -> iris.Connection:
        """The relay may be restarting just as a worker boots: retry a while."""
        deadline = time.monotonic() + self.config.relay.connect_timeout
        while True:
            try:
                return iris.connect(self.config.relay.port, self.connection_log())
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)

    def connection_log(self) -> ContextLog:
        """The worker's own relay connection logs on the binding's logger, tagged
        with this worker's service and slot: a bare ``client=1`` would not say
        which of the host's workers it is."""
        return ContextLog(context=self.log.context)

    def _loop(self) -> int:
        if self._loop_worker is not None:
            return self._loop_worker.serve()
        inbox = self.spec.inbox
        handlers = self.frame_handlers(self)
        while True:
            data = inbox.get(IDLE_CHECK_SECONDS, spin=not self._in_flight)
            if data is None:
                if supervisor_gone(self.spec.alive):
                    self.log.error("supervisor is gone; exiting")
                    return PARENT_GONE
                if self._draining and self._idle():
                    return self._finish()
                continue
            for frame in [data, *inbox.drain()]:
                message = frames.decode(frame)
                handlers[type(message)](*message)
            if self._draining and self._idle():
                return self._finish()

    def frame_handlers(self, work: Worker | LoopWorker) -> FrameHandlers:
        """The frame loop's table. The handler's callbacks run on ``work``: this
        worker's threads, or its LoopWorker's coroutines; tunnel frames and the
        drain are this worker's either way, as its tunnels and state are."""
        return {
            frames.Request: work._on_request,
            frames.Broadcast: work._on_broadcast,
            frames.Event: work._on_event,
            frames.Tunnel: work._on_tunnel,
            frames.TunData: self._tunnel_handler("on_data"),
            frames.TunSent: self._tunnel_handler("on_sent"),
            frames.TunClosed: self._tunnel_handler("on_closed"),
            frames.Drop: work._on_drop,
            frames.Drain: self._on_drain,
        }

    def _finish(self) -> int:
        """Drained: ``handler.close()``, while init's connection is still open
        for it, then that connection."""
        self.log.info("worker drained; exiting")
        close_handler(self.handler, self.log)
        self.conn.close()
        return 0

    def _idle(self) -> bool:
        return self._in_flight == 0 and not self._tunnels

    def _note_fork(self) -> None:
        self._forked = True

    def _leave_if_forked(self) -> None:
        """End a process a handler forked, should it come back into the worker's code.

        Called where handler code returns to ours and before any ring
        access. Exiting is the only safe course: only the forking thread
        exists in the child, so the pools it would return to are never fed
        again (it would block forever), and the locks other threads held at
        fork stay held. A flag set by an at-fork hook costs the hot path
        one attribute read, where ``os.getpid()`` would cost a system call.
        """
        if self._forked:
            self.log.warning("a process forked by a handler returned into the worker; it exits")
            os._exit(FORKED_CHILD_EXIT)

    def send(self, frame: bytes) -> None:
        """Write one frame to the supervisor; handler threads share the ring."""
        self._leave_if_forked()
        with self._out_lock:
            while True:
                try:
                    self.spec.outbox.put(frame, timeout=IDLE_CHECK_SECONDS)
                    return
                except TimeoutError:
                    if supervisor_gone(self.spec.alive):
                        os._exit(PARENT_GONE)

    # -- work ------------------------------------------------------------------------

    def _track(self, delta: int) -> None:
        with self._in_flight_lock:
            self._in_flight += delta

    def _on_request(self, request_id: int, deadline: float, payload: bytes) -> None:
        self._track(1)
        try:
            if self._requests.submit(self._serve, (request_id, deadline, payload), len(payload)):
                return
            fault = memory_fault(self._requests, self._where)
        except RuntimeError as err:  # no thread for it; the pool has logged it
            fault = thread_fault(err, self._where)
        self._track(-1)
        self.send(frames.Reply(request_id, False, fault).encode())

    def _serve(self, request_id: int, deadline: float, payload: bytes) -> None:
        # Every way out goes through send(), which has left a forked child already.
        try:
            if time.monotonic() > deadline:  # its caller has timed out already
                self.send(frames.Expired(request_id).encode())
                return
            self.send(
                frames.Reply(request_id, *answer(self.handler, payload, self.errors)).encode()
            )
        finally:
            self._track(-1)

    def _run_counted(
        self,
        pool: HandlerPool,
        callback: Callable[..., object],
        args: tuple[object, ...],
        size: int,
        overflow: RateLimitedWarning,
    ) -> None:
        def task(*args: object) -> None:
            try:
                callback(*args)
            finally:
                self._leave_if_forked()
                self._track(-1)

        self._track(1)
        try:
            if pool.submit(task, args, size):
                return
            overflow(size=size)
        except RuntimeError:
            pass  # no thread for it: dropped, as the pool has logged
        self._track(-1)

    def _on_tunnel(self, tunnel_id: int) -> None:
        tunnel = WorkerTunnel(tunnel_id, self.send, self.log.new(tunnel=tunnel_id), self._tunnels)
        self._tunnels[tunnel_id] = tunnel

        def serve() -> None:
            try:
                serve_tunnel(self.handler, tunnel, self.errors)
            finally:
                self._leave_if_forked()

        if not self._start_thread(serve, "irishost-tunnel", tunnel=tunnel_id):
            tunnel.close()  # and the supervisor closes the caller's end

    def _tunnel_handler(self, method: str) -> Callable[[int, bytes | str | None], None]:
        """A frame handler passing a tunnel frame to that tunnel's ``method``."""

        def handle(tunnel_id: int, value: bytes | str | None) -> None:
            tunnel = self._tunnels.get(tunnel_id)
            if tunnel is not None:  # else closed meanwhile
                getattr(tunnel, method)(value)

        return handle

    def _on_drop(self, reason: str) -> None:
        """Run handle_drop on a thread of its own, counted like a request.

        The supervisor retires the worker soon after (fresh workers take over
        once the relay is back); counting it makes that drain wait for the
        handler to finish instead of exiting under it.
        """

        def task() -> None:
            try:
                self.handler.handle_drop(iris.ClosedError(reason))
            except BaseException as err:
                self.errors("drop handler raised", err)
            finally:
                self._leave_if_forked()
                self._track(-1)

        self._track(1)
        if not self._start_thread(task, "irishost-drop", refused="handle_drop"):
            self._track(-1)

    def _start_thread(self, target: Callable[[], None], name: str, **context: object) -> bool:
        """Start a daemon thread for ``target``; False, and logged, if none can be.

        Called on the frame loop's thread: Thread.start's RuntimeError (a
        pids or process limit, no memory for a stack) let through would end
        the worker and everything it serves over one piece of work.
        """
        try:
            threading.Thread(target=target, name=name, daemon=True).start()
        except RuntimeError as err:
            self._no_thread(error=str(err), **context)
            return False
        return True

    def _on_drain(self) -> None:
        self._draining = True
