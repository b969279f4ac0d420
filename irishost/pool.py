"""The worker pool: the verbs of a worker's life, as gunicorn's arbiter names them.

spawn (fork one), retire (drain and exit), recycle (spawn a successor, then
retire), kill (SIGKILL, with the reason its requests' faults carry), murder
(kill the stuck), bury (a dead worker's respawn) and scale. The pool acts; the
:class:`~irishost.respawner.Respawner` decides when, and the
:class:`~irishost.worker_table.WorkerTable` keeps the records.
"""

from __future__ import annotations

import os
import signal
import time

import setproctitle

from iris.logs import ContextLog

from . import frames
from .config import MAX_WORKERS, Config
from .exits import HostError
from .respawner import Death, Respawner, memory_verdict, stuck_reason
from .rollout import Generation
from .spawner import Spawner
from .worker_table import Change, WorkerTable
from .workers import WorkerHandle, WorkerState, WorkerUnreachable

# Resident memory is sampled this often when max_rss is set: psutil reads
# /proc/<pid>/statm, some microseconds per worker. Often enough that a handler
# growing 320 MiB a second gets 32 MiB past the kill threshold at most.
RSS_CHECK_SECONDS = 0.1
# On the way out, killed workers are waited for this long (SIGKILL takes effect
# at once; a worker in uninterruptible I/O may take a moment).
KILL_ALL_SECONDS = 5.0


class WorkerPool:
    def __init__(
        self, generation: Generation, table: WorkerTable, spawner: Spawner, log: ContextLog
    ):
        self.generation = generation  # the running one; rollouts replace it
        self.count = generation.config.workers.count  # changed by SIGTTIN/SIGTTOU and reloads
        self.table = table
        self.spawner = spawner
        self.respawner = Respawner()
        self.log = log
        self.stopping = False  # no recycling or respawning any more
        self.next_rss_check = 0.0

    @property
    def config(self) -> Config:
        """The running generation's."""
        return self.generation.config

    def spawn(self, slot: int, generation: Generation | None = None) -> WorkerHandle:
        """Fork a worker for ``slot`` of ``generation`` (default: the running one)."""
        handle = self.spawner.spawn(slot, generation or self.generation)
        self.table.add(handle)
        self.log.info("spawned worker", worker=slot, pid=handle.pid)
        self.title()
        return handle

    def retire(self, handle: WorkerHandle) -> None:
        """Stop sending new work to ``handle``; it drains and exits."""
        if handle.state is WorkerState.DRAINING:
            return
        handle.drain_deadline = time.monotonic() + self.config.workers.shutdown_timeout
        self.table.transition(handle, Change.RETIRED)
        try:
            handle.put(frames.Drain().encode())
        except WorkerUnreachable as err:
            self.log.warning("could not ask worker to drain", worker=handle.slot, error=str(err))
        self.title()

    def recycle(self, handle: WorkerHandle, reason: str = "reached max_requests") -> None:
        """Replace a worker: fork its successor, then let it drain and exit."""
        if handle.state is not WorkerState.READY or self.stopping:
            return
        self.log.info("recycling worker", worker=handle.slot, pid=handle.pid, reason=reason)
        self.spawn(handle.slot)
        self.retire(handle)

    def kill(self, handle: WorkerHandle, reason: str, quiet: bool = False) -> None:
        """SIGKILL a worker; ``reason`` becomes the fault of every request it held."""
        handle.kill_reason = f"killed by the supervisor: {reason}"
        if not quiet:
            self.log.error("killing worker", worker=handle.slot, pid=handle.pid, reason=reason)
        signal_worker(handle.pid, signal.SIGKILL)

    def bury(self, handle: WorkerHandle, how: str) -> None:
        """A worker of the running generation died unasked: schedule its slot's respawn.

        Raises HostError when the host cannot start at all (see Respawner).
        """
        death = Death(
            handle.slot,
            handle.state,
            how,
            time.monotonic() - handle.started,
            handle.failure,
            handle.kill_reason is not None,
        )
        if self.respawner.on_death(death, time.monotonic(), self.count) is None:
            return
        if not death.failed_start:
            self.log.error("worker died", worker=death.slot, pid=handle.pid, how=how)
            return
        self.log.error(
            "worker failed to start; retrying", worker=death.slot, pid=handle.pid, how=how
        )
        if death.failure:
            self.log.error("traceback of the failed worker", traceback=death.failure)

    def murder_stuck(self, now: float) -> None:
        threads = self.config.limits.request_threads
        for handle in self.table.workers:
            if handle.kill_reason is not None:
                continue
            running = self.table.running_deadline(handle, threads)
            reason = stuck_reason(
                handle.state, running, handle.started, handle.drain_deadline, now, self.config
            )
            if reason is not None:
                self.kill(handle, reason)

    def check_memory(self, now: float) -> None:
        if not self.config.limits.max_rss or now < self.next_rss_check:
            return
        self.next_rss_check = now + RSS_CHECK_SECONDS
        for handle in self.table.workers:
            if handle.kill_reason is not None:
                continue
            verdict = memory_verdict(handle.rss(), handle.state, self.config)
            if verdict is not None:
                action, reason = verdict
                if action == "kill":
                    self.kill(handle, reason)
                else:
                    self.recycle(handle, reason)

    def respawn_due(self, now: float) -> None:
        for slot in self.respawner.due(now):
            if slot < self.count:
                self.spawn(slot)

    def scale(self, count: int) -> None:
        if count < 1:
            self.log.warning("SIGTTOU ignored: at least one worker must stay")
            return
        if count > MAX_WORKERS:
            self.log.warning(
                "SIGTTIN ignored: already at the most workers allowed", limit=MAX_WORKERS
            )
            return
        self.log.info("scaling workers", before=self.count, after=count)
        self.count = count
        current = [w for w in self.table.workers if w.state is not WorkerState.DRAINING]
        slots = {w.slot for w in current}
        for slot in range(count):
            if slot not in slots:
                self.spawn(slot)
        for handle in current:
            if handle.slot >= count:
                self.retire(handle)

    def kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the supervisor.

        The fork server, their parent, reaps them; it exits once they are all
        reported dead (Spawner.stop), or dies with this process.
        """
        for pid in self.table.pids():
            signal_worker(pid, signal.SIGKILL)
        deadline = time.monotonic() + KILL_ALL_SECONDS
        while self.table.pids() and time.monotonic() < deadline:
            try:
                exits = self.spawner.exits()
            except HostError:
                break  # the fork server died: and its workers with it
            for pid, _ in exits:
                handle = self.table.by_pid(pid)
                if handle is not None:
                    self.table.remove(handle)
                    handle.close()
            time.sleep(0.01)
        for handle in self.table.workers:
            self.table.remove(handle)
            handle.close()

    def title(self) -> None:
        config = self.config
        ready = len(self.table.in_state(WorkerState.READY))
        setproctitle.setproctitle(
            f"irishost: supervisor {config.service.cluster} "
            f"({config.file.name}) workers={ready}/{self.count}"
        )


def signal_worker(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
