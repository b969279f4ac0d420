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
connection and its state), ``Succession`` (the running generation, and the
reload or reconnect in progress), ``Respawner`` (when to replace a worker
and when to give up), ``Spawner`` (the fork servers, whose answers arrive
through this loop's own wait: it never blocks on one).

Every child of this process is reaped here: workers (the supervisor is their
parent: a child subreaper, see ``_become_subreaper``), fork servers, and
orphans a handler left behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from iris.logfmt import reopen_log_file
from iris.logs import ContextLog
from iris.prometheus import MetricsServer

from ..config import Config
from ..exits import Exit, HostError, describe_exit
from ..ops.control import Command, ControlError, ControlServer
from ..ops.metrics import serve_optionally
from ..ops.notify import Notifier
from ..wire import frames
from ..wire.ring import remove_stale_segments, segment_prefix
from ..wire.wakeup import WakeupPipe
from .batch_waiter import BatchWaiter
from .generation import Generation
from .handle import WorkerHandle, WorkerState
from .relay_link import RelayLink, RelayState
from .spawner import Spawner, SpawnerEvent
from .status import STATUS_SECONDS, HostStatus
from .succession import Succession
from .switchboard import Switchboard
from .worker_table import Change, WorkerTable
from .workforce import Workforce, reap_children

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
        self.log = ContextLog(logging.getLogger("irishost")).new(service=config.service.cluster)
        self.table = WorkerTable()
        self.prefix = segment_prefix(config.service.cluster)
        self.workforce = Workforce(
            Generation(0, config, code=0), self.table, Spawner(self.log), self.log
        )
        self.switchboard = Switchboard(config, self.log, self.table, self.workforce.recycle)
        self.link = RelayLink(config, self.switchboard, self.log)
        self.notifier = Notifier.from_environ()
        self.succession = Succession(
            self.workforce, self.switchboard, self.link, self.notifier, self.log, overrides or {}
        )
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
            signal.SIGUSR1: reopen_log_file,  # logrotate moved [logging] file away
        }
        self._next_tick = 0.0
        self._waiter = BatchWaiter()
        self._unclaimed: dict[int, tuple[int, float]] = {}  # pid -> (wait status, when reaped)
        self.metrics_problem = ""  # why the metrics endpoint is not served, if it is not

    @property
    def stopping(self) -> bool:
        return self.link.state is RelayState.STOPPING

    @property
    def config(self) -> Config:
        """The running generation's."""
        return self.workforce.config

    # -- the whole life ----------------------------------------------------------------

    def run(self) -> Exit:
        """Start, serve until told to stop, stop; HostError for fatal problems."""
        _become_subreaper()
        if removed := remove_stale_segments(self.prefix):
            self.log.info("removed stale shared memory", segments=len(removed))
        servers: list[ControlServer | MetricsServer] = []
        self._install_signals()
        snapshot = self.status.snapshot
        try:
            servers.append(ControlServer(self.config.control.socket, snapshot, self.act, self.log))
            if self.config.metrics.port:
                metrics, self.metrics_problem = serve_optionally(
                    self.config.metrics.port, snapshot, self.log
                )
                servers += [metrics] if metrics is not None else []
            self.link.ensure_relay()
            self.workforce.spawner.launch(self.workforce.generation)
            for slot in range(self.config.workers.count):
                self.workforce.spawn(slot)
            self._wait_until_ready()
            self.link.connect()
            self.log.info("service ready", workers=len(self.table.workers))
            self.notifier.tell_ready()
            while not self.stopping:
                self._step()
            self._stop_gracefully()
            return Exit.OK
        except ControlError as err:
            raise HostError(Exit.FAILURE, f"control socket: {err}") from err
        finally:
            self.workforce.kill_all()
            self.workforce.spawner.stop()
            self.link.close()
            for server in servers:
                server.close()
            self.link.stop_relay()

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
            or self.workforce.spawner.spawning(self.workforce.generation.number)
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
        rings, spawner = self.table.outboxes(), self.workforce.spawner
        timeout = max(0.0, due - time.monotonic())
        owed = spawner.fds()  # fork servers that owe an answer: usually none
        for ring in self._waiter.wait(list(rings), timeout, (self._wakeup.fileno(), *owed)):
            self._collect(rings[ring])
        self._waiter.after_turn(self.switchboard.fast_path.flush())  # the turn's replies, one write
        if owed:
            for event in spawner.poll(time.monotonic()):
                self._on_spawner(event)
        if not self.signal_queue.empty():
            self._handle_signals()
        now = time.monotonic()
        if now < due:
            return
        self._next_tick = now + TICK_SECONDS
        self._reap()  # SIGCHLD reaps at once; this is the safety net
        self.workforce.murder_stuck(now)
        self.workforce.check_memory(now)
        if self.link.state is not RelayState.RECONNECTING:  # init needs the relay
            self.workforce.respawn_due(now)
        self.switchboard.release_waiting()  # drops the expired ones
        self.status.tell_systemd(now)
        if serving and self.link.state is RelayState.RECONNECTING:
            self.succession.reconnect()

    def _next_wake(self) -> float:
        """The next respawn, watchdog ping or memory sample, or the tick."""
        wakes = [self._next_tick, self.workforce.respawner.next_due(), self.status.next_watchdog()]
        if self.workforce.watches_memory():
            wakes.append(self.workforce.next_rss_check)
        return min(wake for wake in wakes if wake is not None)

    def _collect(self, handle: WorkerHandle) -> None:
        """Act on every frame a worker has written (fast path first); kill a broken one."""
        if handle.outbox.closed or handle.broken:
            return
        batch = handle.outbox.drain()
        if batch:
            handle.stalled_until = 0.0  # it is running again
        for data in self.switchboard.fast_path.answer_replies(handle, batch):
            try:
                frame = frames.decode(data)
                if isinstance(frame, frames.Ready):
                    self._on_ready(handle)
                elif isinstance(frame, frames.Failed):
                    handle.failure = frame.traceback
                else:
                    self.switchboard.on_frame(handle, frame)
            except frames.FrameError as err:
                handle.broken = True
                self.log.error(
                    "worker sent an undecodable frame", worker=handle.slot, error=str(err)
                )
                self.workforce.kill(handle, "sent an undecodable frame")
                return

    def _on_ready(self, handle: WorkerHandle) -> None:
        if handle.state is READY:
            raise frames.FrameError("a second READY frame")
        if self.table.transition(handle, Change.BOOTED) is DRAINING:
            self.log.info("retired worker finished starting; it drains", worker=handle.slot)
            return
        self.workforce.respawner.on_ready(handle.slot)
        self.switchboard.release_waiting()
        self.log.info("worker ready", worker=handle.slot, pid=handle.pid)
        self.workforce.set_title()
        self.succession.on_ready(handle)

    def _on_spawner(self, event: SpawnerEvent) -> None:
        """Act on what a fork server said, or on its failure."""
        handle = self.succession.on_spawner(event, self.stopping)
        unclaimed = self._unclaimed.pop(handle.pid, None) if handle is not None else None
        if handle is not None and unclaimed is not None:  # it died before this answer came
            self._on_exit(handle, unclaimed[0])

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
            self.succession.reload(answer, command.wait)
        else:
            answer(True, self.succession.scale(command.count))

    def _reload(self) -> None:
        """SIGHUP: a reload with no one to answer but the log."""
        if not self.stopping:
            self.succession.reload(lambda ok, line: None)

    def _scale_by(self, delta: int) -> None:
        if not self.stopping:
            self.succession.scale_by(delta)

    def _interrupt(self) -> None:
        if self.stopping:
            raise HostError(Exit.OK, "second SIGINT: stopping at once")
        self._stop(signal.SIGINT)

    def _stop(self, signum: int = signal.SIGTERM) -> None:
        if self.stopping:
            return
        self.log.info("stopping", signal=signal.Signals(signum).name)
        self.link.begin_stopping()
        self.workforce.stopping = True
        self.succession.abandon()  # its workers stop with the rest
        self.notifier.tell_stopping()

    # -- dead processes ----------------------------------------------------------------

    def _reap(self) -> None:
        """Reap every child that exited: workers, fork servers, and orphans a
        handler left (which come to this process, a child subreaper)."""
        now = time.monotonic()
        for pid, status in reap_children():
            handle = self.table.by_pid(pid)
            if handle is not None:
                self._on_exit(handle, status)
                continue
            events = self.workforce.spawner.on_exit(pid, status)
            if events is None:  # an orphan, or a worker whose fork answer is yet to come
                self._unclaimed[pid] = (status, now)
            for event in events or []:
                self._on_spawner(event)
        self._unclaimed = {
            pid: (status, when)
            for pid, (status, when) in self._unclaimed.items()
            if now - when <= UNCLAIMED_SECONDS
        }

    def _on_exit(self, handle: WorkerHandle, status: int) -> None:
        """Fail what a dead worker held; then tell whoever cares about its death."""
        self._collect(handle)  # frames written just before death (FAILED, last replies) count
        how = handle.kill_reason or describe_exit(status)
        self.switchboard.fail_worker(handle, how)
        handle.close()
        self.workforce.set_title()
        if self.stopping:
            return
        if handle.state is DRAINING:
            self.log.info("retired worker exited", worker=handle.slot, pid=handle.pid, how=how)
        else:
            self.succession.on_death(handle, how)

    # -- stopping ----------------------------------------------------------------------

    def _stop_gracefully(self) -> None:
        """Finish in-flight work, then drain the workers (their close(), atexit), in time."""
        switchboard = self.switchboard
        switchboard.accepting = False
        switchboard.release_waiting()  # with the shutdown fault
        deadline = time.monotonic() + self.config.workers.shutdown_timeout
        while switchboard.in_flight() and time.monotonic() < deadline:
            self._step(serving=False)
        self.link.close()
        for handle in self.table.workers:
            self.workforce.retire(handle)  # drained, not signalled: so close() and atexit run
        while self.table.pids() and time.monotonic() < deadline:
            self._step(serving=False)
        self.log.info("stopped")


def _become_subreaper() -> None:
    """Have orphaned descendants (workers, once their intermediate exits, and
    whatever a handler forks) reparented to this process rather than to init,
    so that it reaps them, sees their exit and ends them at stop."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
