"""The supervisor: one loop of named steps, and the signal table.

Like gunicorn's arbiter, the loop wakes on a timeout, on a signal (the
handlers only queue the signal; ``signal.set_wakeup_fd`` wakes the loop),
on a command from the control socket (queued as the signal it stands for)
or on data from a worker, and then does the steps in order: collect answers,
handle queued signals, reap dead workers, murder stuck ones, recycle bloated
ones, respawn what is missing, talk to systemd, reconnect. Nothing else runs
on this thread, so the steps never race each other; the relay connection's
reader thread only books requests through the WorkerTable.

The parts it drives, each owning one kind of state: ``WorkerTable`` (the
workers, their states, the requests they hold), ``RelayLink`` (the relay
connection and its state), ``Rollout`` (a reload or reconnect in progress),
``Respawner`` (when to replace a worker and when to give up), ``Spawner``
(forking one).
"""

from __future__ import annotations

import itertools
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from iris.logfmt import reopen_log_file
from iris.logs import ContextLog

from . import frames
from .config import Config, ConfigError
from .control import Command, ControlError, ControlServer
from .dispatch import RelayDispatch
from .exits import Exit, HostError, describe_exit
from .host_status import STATUS_SECONDS, HostStatus
from .loader import HandlerImportError
from .metrics import MetricsServer
from .notify import Notifier
from .pool import WorkerPool, signal_worker
from .relay_link import RelayLink, RelayState
from .ring import remove_stale_segments, segment_prefix, wait_readable
from .rollout import Generation, Reconnect, Reload, Rollout, reread
from .spawner import Spawner
from .wakeup import WakeupPipe
from .worker_table import Change, WorkerTable
from .workers import WorkerHandle, WorkerState

__all__ = ["STATUS_SECONDS", "Exit", "HostError", "Supervisor", "describe_exit"]

# The loop wakes at least this often to check deadlines, memory and respawns.
TICK_SECONDS = 0.25

BOOTING, READY, DRAINING = WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING

# The control socket's commands and the signal each stands for; "scale" has
# none (no signal says how many), and is queued as the command itself.
COMMAND_SIGNALS = {"reload": signal.SIGHUP, "stop": signal.SIGTERM}
_COMMAND_ANSWERS = {
    "reload": "reload started: new workers take over once all are ready; "
    "a failure is logged and leaves the running ones",
    "stop": "stopping: in-flight requests finish within workers.shutdown_timeout",
    "scale": "scaling to {count} workers",
}
# What the signal queue holds: a signal's number, or a command that has no signal.
Queued = int | Command
# Command-line flags that override the config file, by name.
Flags = dict[str, Any]


class Supervisor:
    def __init__(self, config: Config, handler_class: type | None, overrides: Flags | None = None):
        self.overrides = overrides or {}  # command-line flags, re-applied on reload
        # Never reused: an aborted reload's workers, still unreaped, must not pass for the next's.
        self._generation_numbers = itertools.count(1)
        self.rollout: Rollout | None = None  # a reload or reconnect in progress
        self.log = ContextLog(logging.getLogger("irishost")).new(service=config.service.cluster)
        self.table = WorkerTable()
        self.prefix = segment_prefix(config.service.cluster)
        self.handler_class = handler_class  # preloaded: the fork server inherits it
        self.pool = WorkerPool(
            Generation(0, config), self.table, Spawner(self.prefix, self.log), self.log
        )
        self.dispatch = RelayDispatch(config, self.log, self.table, self.pool.recycle)
        self.link = RelayLink(config, self.dispatch, self.log)
        self.notifier = Notifier.from_environ()
        self.status = HostStatus(self)
        self.signal_queue: list[Queued] = []  # by the handlers and act(); the loop empties it
        self.signal_table: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self._stop,
            signal.SIGINT: self._interrupt,
            signal.SIGHUP: self._reload,
            signal.SIGTTIN: lambda: self._scale(self.pool.count + 1),
            signal.SIGTTOU: lambda: self._scale(self.pool.count - 1),
            signal.SIGUSR1: reopen_log_file,  # logrotate moved [logging] file away
        }
        self._next_tick = 0.0

    @property
    def stopping(self) -> bool:
        return self.link.state is RelayState.STOPPING

    @property
    def config(self) -> Config:
        """The running generation's."""
        return self.pool.config

    # -- the whole life ----------------------------------------------------------------

    def run(self) -> Exit:
        """Start, serve until told to stop, stop; HostError for fatal problems."""
        removed = remove_stale_segments(self.prefix)
        if removed:
            self.log.info("removed stale shared memory", segments=len(removed))
        servers: list[ControlServer | MetricsServer] = []
        # Before any thread exists in this process (see fork_server).
        self.pool.spawner.start(self.pool.generation, self.handler_class)
        self._install_signals()
        snapshot = self.status.snapshot
        try:
            servers.append(ControlServer(self.config.control.socket, snapshot, self.act))
            if self.config.metrics.port:
                servers.append(MetricsServer(self.config.metrics.port, snapshot))
            self.link.ensure_relay()
            for slot in range(self.config.workers.count):
                self.pool.spawn(slot)
            self._wait_until_ready()
            self.link.connect()
            self.log.info("service ready", workers=len(self.table.workers))
            self.notifier.ready()
            while not self.stopping:
                self._step()
            self._stop_gracefully()
            return Exit.OK
        except ControlError as err:
            raise HostError(Exit.FAILURE, f"control socket: {err}") from err
        finally:
            self.pool.kill_all()
            self.pool.spawner.stop()
            self.link.close()
            for server in servers:
                server.close()
            self.link.stop_relay()

    def _install_signals(self) -> None:
        self._wakeup = WakeupPipe()
        for signum in (signal.SIGCHLD, *self.signal_table):
            signal.signal(signum, lambda signum, _: self.signal_queue.append(signum))

    def act(self, command: Command) -> str:
        """Queue a control-socket command as the signal it stands for; the line to answer.
        Runs on a control connection's thread, so like a signal handler it only
        queues and wakes the loop, and the loop's steps never race it."""
        if self.stopping:
            if command.name == "stop":
                return "already stopping"
            raise ControlError("the host is stopping")
        self.signal_queue.append(COMMAND_SIGNALS.get(command.name, command))
        self._wakeup.wake()
        return _COMMAND_ANSWERS[command.name].format(count=command.count)

    def _wait_until_ready(self) -> None:
        """Return once every worker has booted, and at least one is ready.

        Once one is ready, a slot that failed to start is retried with backoff
        like any crash, and the service starts degraded.
        """
        while not self.table.in_state(READY) or self.table.in_state(BOOTING):
            self._step(serving=False)
            if self.stopping:
                raise HostError(Exit.OK, "stopped during start-up")

    # -- the loop ----------------------------------------------------------------------

    def _step(self, serving: bool = True) -> None:
        """One turn of the loop: answers and signals at once, housekeeping when due.

        Under load a turn happens per reply batch, so housekeeping waits for
        its tick instead of costing every reply.
        """
        due = self._next_wake()
        rings = self.table.outboxes()
        timeout = max(0.0, due - time.monotonic())
        for ring in wait_readable(list(rings), timeout, (self._wakeup.fileno(),)):
            self._collect(rings[ring])
        if self.signal_queue:
            self._handle_signals()
        now = time.monotonic()
        if now < due:
            return
        self._next_tick = now + TICK_SECONDS
        self._reap()  # SIGCHLD reaps at once; this is the safety net
        self.pool.murder_stuck(now)
        self.pool.check_memory(now)
        if self.link.state is not RelayState.RECONNECTING:  # init needs the relay
            self.pool.respawn_due(now)
        self.dispatch.release_waiting()  # drops the expired ones
        self.status.tell_systemd(now)
        if serving and self.link.state is RelayState.RECONNECTING:
            self._reconnect()

    def _next_wake(self) -> float:
        """The next respawn, watchdog ping or memory sample, or the tick."""
        wakes = [self._next_tick, self.pool.respawner.next_due(), self.status.next_watchdog()]
        if self.config.limits.max_rss:
            wakes.append(self.pool.next_rss_check)
        return min(wake for wake in wakes if wake is not None)

    def _collect(self, handle: WorkerHandle) -> None:
        """Act on every frame a worker has written; a broken one is killed."""
        if handle.outbox.closed or handle.broken:
            return
        batch = handle.outbox.drain()
        if batch:
            handle.stalled_until = 0.0  # it is running again
        for data in batch:
            try:
                frame = frames.decode(data)
                if isinstance(frame, frames.Ready):
                    self._on_ready(handle)
                elif isinstance(frame, frames.Failed):
                    handle.failure = frame.traceback
                else:
                    self.dispatch.on_frame(handle, frame)
            except frames.FrameError as err:
                handle.broken = True
                self.log.error(
                    "worker sent an undecodable frame", worker=handle.slot, error=str(err)
                )
                self.pool.kill(handle, "sent an undecodable frame")
                return

    def _on_ready(self, handle: WorkerHandle) -> None:
        if handle.state is READY:
            raise frames.FrameError("a second READY frame")
        if self.table.transition(handle, Change.BOOTED) is DRAINING:
            self.log.info("retired worker finished starting; it drains", worker=handle.slot)
            return
        self.pool.respawner.on_ready(handle.slot)
        self.dispatch.release_waiting()
        self.log.info("worker ready", worker=handle.slot, pid=handle.pid)
        self.pool.title()
        if self.rollout is not None and self.rollout.owns(handle):
            self.rollout.on_ready()

    # -- signals -----------------------------------------------------------------------

    def _handle_signals(self) -> None:
        self._wakeup.empty()
        queued, self.signal_queue = self.signal_queue, []
        if signal.SIGCHLD in queued:
            self._reap()
        for entry in queued:
            if isinstance(entry, Command):  # scale, to a count
                self._scale(entry.count)
            elif entry in self.signal_table:
                self.signal_table[entry]()

    def _interrupt(self) -> None:
        if self.stopping:
            raise HostError(Exit.OK, "second SIGINT: stopping at once")
        self._stop(signal.SIGINT)

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        if self.stopping:
            return
        self.log.info("stopping", signal=signal.Signals(signum).name)
        self.link.stopping()
        self.pool.stopping = True
        # A rollout in progress is abandoned: its workers stop with the rest,
        # and must not send READY=1 after STOPPING=1 on finishing.
        self.rollout = None
        self.notifier.stopping()

    # -- dead workers ------------------------------------------------------------------

    def _reap(self) -> None:
        """Act on the deaths the fork server (the workers' parent) reported."""
        for pid, status in self.pool.spawner.exits():
            handle = self.table.by_pid(pid)
            if handle is not None:
                self._on_exit(handle, status)

    def _on_exit(self, handle: WorkerHandle, status: int) -> None:
        """Fail what a dead worker held; then tell whoever cares about its death."""
        self._collect(handle)  # frames written just before death (FAILED, last replies) count
        how = handle.kill_reason or describe_exit(status)
        self.dispatch.fail_worker(handle, how)
        handle.close()
        self.pool.title()
        if self.stopping:
            return
        if handle.state is DRAINING:
            self.log.info("retired worker exited", worker=handle.slot, pid=handle.pid, how=how)
        elif handle.generation <= self.pool.generation.number:
            self.pool.bury(handle, how)
        elif self.rollout is not None and self.rollout.owns(handle):
            self.rollout.on_death(handle, how)
        # else one of the workers an aborted rollout killed: reported already

    # -- reload, reconnect and scaling -------------------------------------------------

    def _reload(self) -> None:
        """Start a new generation of workers from the re-read config (see Rollout)."""
        if self.stopping:
            return
        if self.rollout is not None:
            self.log.warning(f"{self.rollout.what} already in progress; SIGHUP ignored")
            # Type=notify-reload waits for this pair after each SIGHUP it sends.
            self.notifier.reloading()
            self.notifier.ready()
            return
        self.log.info("reloading", config=str(self.config.file))
        self.notifier.reloading()
        try:
            generation = reread(self.config, self.overrides, next(self._generation_numbers))
            self.pool.spawner.add(generation)  # imports the handler there when preloading
        except (ConfigError, HandlerImportError) as err:
            self.log.error("reload failed; keeping the running workers", error=str(err))
            self.notifier.ready()
            return
        self._roll_out(Reload(self, generation))

    def _reconnect(self) -> None:
        """Register again after the relay dropped the connection, with fresh workers.

        Every worker's handler has had handle_drop, after which no callback
        may follow, and the connection its init() got went down with the
        relay. So, as at start, new workers boot once the relay listens again
        and all of them are ready (see Reconnect); a reload in progress is
        given up: its workers were told of the drop too.
        """
        if isinstance(self.rollout, Reconnect):
            return  # its workers are booting
        if not self.link.drop_told():
            return  # the workers are still being told; a worker forked now might be too
        if self.rollout is not None:
            self.rollout.abort("the relay connection was dropped")
        if not self.link.may_reconnect(time.monotonic()):
            return
        number = next(self._generation_numbers)
        self.log.info("relay is back; starting fresh workers", generation=number)
        generation = Generation(number, self.config)
        self.pool.spawner.add(generation, like=self.pool.generation)
        self._roll_out(Reconnect(self, generation))

    def _roll_out(self, rollout: Rollout) -> None:
        self.rollout = rollout
        rollout.start()

    def _scale(self, count: int) -> None:
        if not self.stopping:
            self.pool.scale(count)

    # -- stopping ----------------------------------------------------------------------

    def _stop_gracefully(self) -> None:
        """Finish in-flight work within the shutdown timeout, then take everything down."""
        dispatch = self.dispatch
        dispatch.accepting = False
        dispatch.release_waiting()  # with the shutdown fault
        deadline = time.monotonic() + self.config.workers.shutdown_timeout
        while dispatch.in_flight() and time.monotonic() < deadline:
            self._step(serving=False)
        self.link.close()
        for handle in self.table.workers:
            signal_worker(handle.pid, signal.SIGTERM)
        while self.table.pids() and time.monotonic() < deadline:
            self._step(serving=False)
        self.log.info("stopped")
