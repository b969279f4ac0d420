"""Which generation of workers runs, which one a rollout is starting, and what changes them.

A reload (SIGHUP, ``irishost reload``) and a reconnect start a generation
beside the running one (see :mod:`irishost.supervisor.rollout`); ``scale`` changes the
count of whichever generation is the newest; and every answer of a fork
server is routed here by the generation it concerns: a worker for the
running generation or the rollout's joins the table, one for a generation
given up meanwhile is killed; a failed spawn is retried with backoff for the
running generation and fails a rollout; a fork server that cannot start
ends the host only at start-up (which is also where a ``max_rss`` below a
fresh worker's memory ends it: the spawner reports that as a failed start).
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

from iris.logs import ContextLog

from ..config import Config, ConfigError
from ..exits import HostError
from ..ops.notify import Notifier
from .generation import Generation
from .handle import WorkerHandle
from .relay_link import RelayLink
from .rollout import Reconnect, Reload, Rollout, Waiter, reread
from .spawner import LaunchFailed, Spawned, SpawnerEvent, SpawnFailed
from .switchboard import Switchboard
from .worker_table import WorkerTable
from .workforce import Workforce, signal_worker


class Generations:
    """The running generation (the workforce's) and the rollout in progress, if any.

    It is what a :class:`~irishost.supervisor.rollout.Rollout` works on (its
    ``RolloutHost``): the workforce, the table, the relay link and switchboard, the
    notifier and the log, and ``rollout``, which it clears when it ends.
    """

    def __init__(
        self,
        workforce: Workforce,
        switchboard: Switchboard,
        link: RelayLink,
        notifier: Notifier,
        log: ContextLog,
        overrides: dict[str, Any],
    ):
        self.workforce = workforce
        self.table: WorkerTable = workforce.table
        self.switchboard = switchboard
        self.link = link
        self.notifier = notifier
        self.log = log
        self.overrides = overrides  # command-line flags, re-applied on reload
        self.rollout: Rollout | None = None  # a reload or reconnect in progress
        # Never reused: workers of an aborted reload may still be waiting to be
        # reaped when the next reload starts, and must not pass for its workers.
        self._numbers = itertools.count(1)

    @property
    def config(self) -> Config:
        return self.workforce.config

    # -- reload, reconnect, scale --------------------------------------------------------

    def reload(self, reply: Waiter, wait: bool = False) -> None:
        """Start a new generation from the re-read config (see Rollout).

        Its fork server imports the handler, so nothing here waits for that;
        ``reply`` is told at once, or, with ``wait``, when the reload ends.
        """
        if self.rollout is not None:
            line = (
                f"{self.rollout.what} already in progress "
                f"(generation {self.rollout.generation.number})"
            )
            self.log.warning(f"{line}; reload ignored")
            # Type=notify-reload waits for this pair after each SIGHUP it sends.
            self.notifier.tell_reloading()
            self.notifier.tell_ready()
            reply(False, line)
            return
        self.log.info("reloading", config=str(self.config.file))
        self.notifier.tell_reloading()
        try:
            generation = reread(self.config, self.overrides, next(self._numbers))
        except ConfigError as err:
            self.log.error("reload failed; keeping the running workers", error=str(err))
            self.notifier.tell_ready()
            reply(False, f"reload failed: {err}; the running workers carry on")
            return
        self.workforce.spawner.launch(generation)
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

    def reconnect(self) -> None:
        """Register again after the relay dropped the connection, with fresh workers.

        Every worker's handler has had handle_drop, after which no callback
        may follow, and the connection its init() got went down with the
        relay. So, as at start, new workers of the running code boot once
        the relay listens again and all of them are ready (see Reconnect); a
        reload in progress is given up: its workers were told of the drop too.
        """
        if isinstance(self.rollout, Reconnect):
            return  # its workers are booting
        if not self.link.drop_told():
            return  # the workers are still being told; a worker forked now might be too
        if self.rollout is not None:
            self.rollout.abort("the relay connection was dropped")
        if not self.link.may_reconnect(time.monotonic()):
            return
        number = next(self._numbers)
        self.log.info("relay is back; starting fresh workers", generation=number)
        running = self.workforce.generation
        generation = Generation(number, running.config, code=running.code)
        self._roll_out(Reconnect(self, generation, self.workforce.count))

    def _roll_out(self, rollout: Rollout) -> None:
        self.rollout = rollout
        rollout.start()

    def scale_by(self, delta: int) -> None:
        """SIGTTIN and SIGTTOU: one worker more or less than the count in force."""
        self.scale((self.rollout or self.workforce).count + delta)

    def scale(self, count: int) -> str:
        """Scale the running generation, or the one a rollout is starting; the answer."""
        if self.rollout is None:
            self.workforce.scale(count)
            return f"scaling to {count} workers"
        if self.workforce.valid_count(count):
            number = self.rollout.generation.number
            self.log.info("scaling the new generation", generation=number, after=count)
            self.rollout.scale(count)
        return (
            f"scaling to {count} workers: applies to the {self.rollout.what} in progress "
            f"(generation {self.rollout.generation.number})"
        )

    def abandon(self) -> None:
        """The host is stopping: a rollout in progress ends with it, unreported to
        systemd (no READY=1 after STOPPING=1), its waiters told."""
        if self.rollout is not None:
            for waiter in self.rollout.waiters:
                waiter(False, f"{self.rollout.what} abandoned: the host is stopping")
        self.rollout = None

    # -- the workers of a rollout ----------------------------------------------------------

    def on_ready(self, worker: WorkerHandle) -> None:
        if self.rollout is not None and self.rollout.owns(worker):
            self.rollout.on_ready()

    def on_death(self, worker: WorkerHandle, how: str) -> None:
        """A worker that was not retired died: respawn its slot, or fail its rollout."""
        if worker.generation <= self.workforce.generation.number:
            self.workforce.bury(worker, how)
        elif self.rollout is not None and self.rollout.owns(worker):
            self.rollout.on_death(worker, how)
        # else one of the workers an aborted rollout killed: reported already

    # -- what the fork servers say -------------------------------------------------------

    def on_spawner(self, event: SpawnerEvent, stopping: bool) -> WorkerHandle | None:
        """Act on a fork server's answer, or its failure; the worker that joined
        the table, if one did. HostError when the host cannot start at all."""
        number = event.handle.generation if isinstance(event, Spawned) else event.generation.number
        running = number == self.workforce.generation.number
        rollout = (
            self.rollout if self.rollout and self.rollout.generation.number == number else None
        )
        if isinstance(event, Spawned):
            if (running or rollout) and not stopping:
                self.workforce.on_spawned(event)
                return event.handle
            signal_worker(event.handle.pid, signal.SIGKILL)  # its generation was given up
            event.handle.close()
        elif isinstance(event, SpawnFailed):
            if running and not stopping:
                self.workforce.on_spawn_failed(event.slot, event.reason)
            elif rollout is not None:
                rollout.abort(f"could not start new worker {event.slot}: {event.reason}")
        elif isinstance(event, LaunchFailed):
            if running and not self.workforce.respawner.ever_ready:  # at start-up
                raise HostError(event.code, event.message, event.details)
            if rollout is not None:
                rollout.abort(event.message, event.details or None)
            else:  # a relaunch for the running generation: its spawns fail and are retried
                self.log.error("fork server failed to start", error=event.message)
        # ServerReady: its queued spawns are on their way; nothing to do here
        return None
