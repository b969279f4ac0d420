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

import ctypes
import itertools
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from iris.logs import ContextLog

from . import frames
from .config import Config, ConfigError
from .control import Command, ControlError, ControlServer
from .dispatch import RelayDispatch
from .exits import Exit, HostError, describe_exit
from .generation import Generation
from .host_status import STATUS_SECONDS, HostStatus
from .metrics import MetricsServer
from .notify import Notifier
from .pool import WorkerPool, signal_worker
from .relay_link import RelayLink, RelayState
from .respawner import fresh_memory_problem
from .ring import remove_stale_segments, segment_prefix, wait_readable
from .rollout import Reconnect, Reload, Rollout, reread
from .spawner import Event, ServerReady, Spawned, Spawner, SpawnFailed
from .wakeup import WakeupPipe
from .worker_table import Change, WorkerTable
from .workers import WorkerHandle, WorkerState

__all__ = ["STATUS_SECONDS", "Exit", "HostError", "Supervisor", "describe_exit"]

# The loop wakes at least this often to check deadlines, memory and respawns.
TICK_SECONDS = 0.25
# A control command is answered by the loop, which never blocks; a command
# not answered within this long (the host is stopping) is reported as such.
ANSWER_SECONDS = 5.0
# ``irishost reload --wait`` is answered when the reload ends; its client sets
# the real limit, this only bounds the control thread's wait.
RELOAD_WAIT_SECONDS = 3600.0
# A pid the reaper found before the fork server's answer named it (a worker
# that died at once) is remembered this long, for that answer.
UNCLAIMED_SECONDS = 60.0

# prctl(2): orphaned descendants are reparented to this process, not to init.
PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)

BOOTING, READY, DRAINING = WorkerState.BOOTING, WorkerState.READY, WorkerState.DRAINING


class Answer:
    """A control command's answer, set by the loop, awaited by a control thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.ok = True
        self.line = ""

    def __call__(self, ok: bool, line: str) -> None:
        if not self._done.is_set():
            self.ok, self.line = ok, line
            self._done.set()

    def wait(self, timeout: float) -> str:
        """The line to answer; ControlError for a refusal or a failure."""
        if not self._done.wait(timeout):
            raise ControlError(f"the host did not answer within {timeout:g} s (stopping?)")
        if not self.ok:
            raise ControlError(self.line)
        return self.line


# What the signal queue holds: a signal's number, or a control command and
# where its answer goes.
Queued = int | tuple[Command, Answer]
# Command-line flags that override the config file, by name.
Flags = dict[str, Any]


class Supervisor:
    def __init__(self, config: Config, overrides: Flags | None = None):
        self.overrides = overrides or {}  # command-line flags, re-applied on reload
        # Never reused: workers of an aborted reload may still be waiting to be
        # reaped when the next reload starts, and must not pass for its workers.
        self._generation_numbers = itertools.count(1)
        self.rollout: Rollout | None = None  # a reload or reconnect in progress
        self.log = ContextLog(logging.getLogger("irishost")).new(service=config.service.cluster)
        self.table = WorkerTable()
        self.prefix = segment_prefix(config.service.cluster)
        self.pool = WorkerPool(
            Generation(0, config, code=0), self.table, Spawner(self.log), self.log
        )
        self.dispatch = RelayDispatch(config, self.log, self.table, self.pool.recycle)
        self.link = RelayLink(config, self.dispatch, self.log)
        self.notifier = Notifier.from_environ()
        self.status = HostStatus(self)
        # Filled by signal handlers and control threads (SimpleQueue.put is
        # safe in both); only the loop takes from it.
        self.signal_queue: queue.SimpleQueue[Queued] = queue.SimpleQueue()
        self.signal_table: dict[int, Callable[[], None]] = {
            signal.SIGTERM: self._stop,
            signal.SIGINT: self._interrupt,
            signal.SIGHUP: self._reload,
            signal.SIGTTIN: lambda: self._scale_by(1),
            signal.SIGTTOU: lambda: self._scale_by(-1),
        }
        self._next_tick = 0.0
        self._unclaimed: dict[int, tuple[int, float]] = {}  # pid -> (wait status, when reaped)
        self.metrics_problem = ""  # why the metrics endpoint is not served, if it is not

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
        _become_subreaper()
        removed = remove_stale_segments(self.prefix)
        if removed:
            self.log.info("removed stale shared memory", segments=len(removed))
        servers: list[ControlServer | MetricsServer] = []
        self._install_signals()
        snapshot = self.status.snapshot
        try:
            servers.append(ControlServer(self.config.control.socket, snapshot, self.act))
            metrics = self._serve_metrics()
            if metrics is not None:
                servers.append(metrics)
            self.link.ensure_relay()
            self.pool.spawner.launch(self.pool.generation)
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

    def _serve_metrics(self) -> MetricsServer | None:
        """The metrics endpoint, if configured and its port is free: it is
        optional, and another process holding the port must not keep the
        service from starting."""
        port = self.config.metrics.port
        if not port:
            return None
        try:
            return MetricsServer(port, self.status.snapshot)
        except OSError as err:
            self.metrics_problem = f"port {port} unavailable: {err.strerror or err}"
            self.log.error(
                "metrics endpoint not served; serving without it", port=port, error=str(err)
            )
            return None

    def _install_signals(self) -> None:
        self._wakeup = WakeupPipe()
        for signum in (signal.SIGCHLD, *self.signal_table):
            signal.signal(signum, lambda signum, _: self.signal_queue.put(signum))

    def act(self, command: Command) -> str:
        """Hand a control-socket command to the loop and wait for its answer.

        Runs on a control connection's thread, so like a signal handler it only
        queues and wakes the loop; the loop's steps never race it, and the
        answer says what the loop did, not merely that the command was queued.
        """
        answer = Answer()
        self.signal_queue.put((command, answer))
        self._wakeup.wake()
        return answer.wait(RELOAD_WAIT_SECONDS if command.wait else ANSWER_SECONDS)

    def _wait_until_ready(self) -> None:
        """Return once every worker has booted, and at least one is ready.

        Once one is ready, a slot that failed to start is retried with backoff
        like any crash, and the service starts degraded.
        """
        while (
            not self.table.in_state(READY)
            or self.table.in_state(BOOTING)
            or self.pool.spawner.spawning(self.pool.generation.number)
        ):
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
        spawner = self.pool.spawner
        timeout = max(0.0, due - time.monotonic())
        wake_fds = (self._wakeup.fileno(), *spawner.fds())
        for ring in wait_readable(list(rings), timeout, wake_fds):
            self._collect(rings[ring])
        if spawner.busy():
            for event in spawner.poll(time.monotonic()):
                self._on_spawner(event)
        if not self.signal_queue.empty():
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

    # -- the fork servers' answers -----------------------------------------------------

    def _on_spawner(self, event: Event) -> None:
        """Act on what a fork server said, or on its failure."""
        number = event.handle.generation if isinstance(event, Spawned) else event.generation.number
        running = number == self.pool.generation.number
        rolling = self.rollout is not None and self.rollout.generation.number == number
        if isinstance(event, Spawned):
            self._on_spawned(event, running or rolling)
        elif isinstance(event, SpawnFailed):
            if running and not self.stopping:
                self.pool.on_spawn_failed(event.slot, event.reason)
            elif rolling and self.rollout is not None:
                self.rollout.abort(f"could not start new worker {event.slot}: {event.reason}")
        elif isinstance(event, ServerReady):
            self._check_fresh_memory(event, running, rolling)
        elif running and not self.pool.respawner.ever_ready:  # LaunchFailed, at start-up
            raise HostError(event.code, event.message, event.details)
        elif rolling and self.rollout is not None:
            self.rollout.abort(event.message, event.details or None)
        else:  # a relaunch for the running generation: its spawns fail and are retried
            self.log.error("fork server failed to start", error=event.message)

    def _on_spawned(self, spawned: Spawned, wanted: bool) -> None:
        handle = spawned.handle
        if not wanted or self.stopping:  # its generation was given up meanwhile
            signal_worker(handle.pid, signal.SIGKILL)
            handle.close()
            return
        self.pool.on_spawned(spawned)
        unclaimed = self._unclaimed.pop(handle.pid, None)
        if unclaimed is not None:  # it died before this answer came
            self._on_exit(handle, unclaimed[0])

    def _check_fresh_memory(self, ready: ServerReady, running: bool, rolling: bool) -> None:
        """A max_rss below what a fresh worker starts with would recycle every
        worker at birth: a config error at start, a failed reload later."""
        problem = fresh_memory_problem(ready.generation.config.limits.max_rss, ready.rss)
        if problem is None:
            return
        if running and not self.pool.respawner.ever_ready:
            raise HostError(
                Exit.CONFIG, f"config error: {self.config.file}: limits.max_rss: {problem}"
            )
        if rolling and self.rollout is not None:
            self.rollout.abort(f"limits.max_rss: {problem}")

    # -- signals -----------------------------------------------------------------------

    def _handle_signals(self) -> None:
        self._wakeup.empty()
        queued: list[Queued] = []
        while not self.signal_queue.empty():
            queued.append(self.signal_queue.get_nowait())
        if signal.SIGCHLD in queued:
            self._reap()
        for entry in queued:
            if isinstance(entry, tuple):
                self._command(*entry)
            elif entry in self.signal_table:
                self.signal_table[entry]()

    def _command(self, command: Command, answer: Answer) -> None:
        if self.stopping:
            if command.name == "stop":
                answer(True, "already stopping")
            else:
                answer(False, "the host is stopping")
            return
        if command.name == "stop":
            self._stop()
            answer(True, "stopping: in-flight requests finish within workers.shutdown_timeout")
        elif command.name == "reload":
            self._reload(answer, command.wait)
        else:
            answer(True, self._scale(command.count))

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
        if self.rollout is not None:
            self.rollout.waiters, waiters = [], self.rollout.waiters
            for waiter in waiters:
                waiter(False, f"{self.rollout.what} abandoned: the host is stopping")
        self.rollout = None
        self.notifier.stopping()

    # -- dead processes ----------------------------------------------------------------

    def _reap(self) -> None:
        """Reap every child that exited: workers, fork servers, and orphans a
        handler left (which come to this process, a child subreaper)."""
        now = time.monotonic()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            handle = self.table.by_pid(pid)
            if handle is not None:
                self._on_exit(handle, status)
                continue
            events = self.pool.spawner.on_exit(pid, status)
            if events is None:  # an orphan, or a worker whose fork answer is yet to come
                self._unclaimed[pid] = (status, now)
            for event in events or []:
                self._on_spawner(event)
        for pid, (_, when) in list(self._unclaimed.items()):
            if now - when > UNCLAIMED_SECONDS:
                del self._unclaimed[pid]

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

    def _reload(self, answer: Answer | None = None, wait: bool = False) -> None:
        """Start a new generation of workers from the re-read config (see Rollout).

        The handler is imported by the generation's own fork server, so
        nothing here waits for it; ``answer`` is told at once, or, with
        ``wait``, when the reload completes or fails.
        """
        reply = answer or _nobody
        if self.stopping:
            reply(False, "the host is stopping")
            return
        if self.rollout is not None:
            line = (
                f"{self.rollout.what} already in progress "
                f"(generation {self.rollout.generation.number})"
            )
            self.log.warning(f"{line}; reload ignored")
            # Type=notify-reload waits for this pair after each SIGHUP it sends.
            self.notifier.reloading()
            self.notifier.ready()
            reply(False, line)
            return
        self.log.info("reloading", config=str(self.config.file))
        self.notifier.reloading()
        try:
            generation = reread(self.config, self.overrides, next(self._generation_numbers))
        except ConfigError as err:
            self.log.error("reload failed; keeping the running workers", error=str(err))
            self.notifier.ready()
            reply(False, f"reload failed: {err}; the running workers carry on")
            return
        self.pool.spawner.launch(generation)
        rollout = Reload(self, generation, generation.config.workers.count)
        if wait:
            rollout.waiters.append(reply)
        else:
            reply(
                True,
                f"reload started (generation {generation.number}): new workers take over "
                "once all are ready; a failure is logged and leaves the running ones",
            )
        self._roll_out(rollout)

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
        running = self.pool.generation
        generation = Generation(number, running.config, code=running.code)
        self._roll_out(Reconnect(self, generation, self.pool.count))

    def _roll_out(self, rollout: Rollout) -> None:
        self.rollout = rollout
        rollout.start()

    def _scale_by(self, delta: int) -> None:
        """SIGTTIN and SIGTTOU: one worker more or less than the count in force."""
        self._scale((self.rollout or self.pool).count + delta)

    def _scale(self, count: int) -> str:
        """Scale the running generation, or the one a rollout is starting; the answer."""
        if self.stopping:
            return "the host is stopping"
        if self.rollout is None:
            self.pool.scale(count)
            return f"scaling to {count} workers"
        if self.pool.valid_count(count):
            self.log.info(
                "scaling the new generation", generation=self.rollout.generation.number, after=count
            )
            self.rollout.scale(count)
        return (
            f"scaling to {count} workers: applies to the {self.rollout.what} in progress "
            f"(generation {self.rollout.generation.number})"
        )

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


def _nobody(ok: bool, line: str) -> None:
    """Where the answer to a reload by SIGHUP goes: it has no one to tell."""


def _become_subreaper() -> None:
    """Have orphaned descendants (workers, once their intermediate exits, and
    whatever a handler forks) reparented to this process rather than to init,
    so that it reaps them, sees their exit and ends them at stop."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
