"""The workforce: the verbs of a worker process's life, as gunicorn's arbiter names them.

spawn (fork one), retire (drain and exit), recycle (spawn a successor, then
retire), kill (SIGKILL, with the reason its requests' faults carry), murder
(kill the stuck), bury (a dead worker's respawn) and scale. The workforce acts; the
:class:`~irishost.supervisor.respawner.Respawner` decides when, and the
:class:`~irishost.supervisor.worker_table.WorkerTable` keeps the records.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import setproctitle

from iris.logs import ContextLog

from ..config import MAX_WORKERS, Config
from ..wire import frames
from .generation import Generation
from .handle import WorkerHandle, WorkerState, WorkerUnreachable
from .memory import PrivatePace
from .respawner import Death, Respawner, memory_verdict, private_verdict, stuck_reason
from .spawner import Spawned, Spawner
from .worker_table import Change, WorkerTable

# Resident memory is sampled this often when max_rss or max_private is set:
# psutil reads /proc/<pid>/statm, some microseconds per worker. Often enough
# that a handler growing 320 MiB a second gets 32 MiB past the kill threshold
# at most. Private memory costs more, and is paced by PrivatePace.
RSS_CHECK_SECONDS = 0.1
# On the way out, killed workers are waited for this long (SIGKILL takes effect
# at once; a worker in uninterruptible I/O may take a moment).
KILL_ALL_SECONDS = 5.0


class Workforce:
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
        self.private_pace = PrivatePace()
        self.private_turn = 0  # which worker's private memory is read next

    @property
    def config(self) -> Config:
        """The running generation's."""
        return self.generation.config

    def spawn(self, slot: int, generation: Generation | None = None) -> None:
        """Ask for a worker for ``slot`` of ``generation`` (default: the running one);
        it joins the table when the fork server's answer comes (``on_spawned``)."""
        self.spawner.spawn(slot, generation or self.generation)

    def on_spawned(self, spawned: Spawned) -> None:
        handle = spawned.handle
        self.table.add(handle)
        self.log.info("spawned worker", worker=handle.slot, pid=handle.pid)
        self.log.debug(
            "forked worker",
            worker=handle.slot,
            pid=handle.pid,
            forked_by=spawned.server,
            threads_at_fork=spawned.threads,
        )
        if spawned.threads != 1:
            self.log.warning(
                "worker forked from a process with several threads (a preloaded handler "
                "started threads at import?); a lock one of them held stays held in the child",
                worker=handle.slot,
                threads=spawned.threads,
            )
        self.set_title()

    def on_spawn_failed(self, slot: int, reason: str) -> None:
        """No worker came for ``slot`` of the running generation: retry with backoff."""
        delay = self.respawner.on_spawn_failure(slot, reason, time.monotonic(), self.count)
        if delay is not None:
            self.log.error("could not start worker; retrying", worker=slot, reason=reason)

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
        self.set_title()

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

    def watches_memory(self) -> bool:
        limits = self.config.limits
        return bool(limits.max_rss or limits.max_private)

    def check_memory(self, now: float) -> None:
        """Recycle or kill the workers over max_rss, each check, or over
        max_private, one worker a turn (see ``_check_private``)."""
        if not self.watches_memory() or now < self.next_rss_check:
            return
        self.next_rss_check = now + RSS_CHECK_SECONDS
        max_private = self.config.limits.max_private
        suspects = []  # resident beyond max_private, so they may be over it
        for handle in self.table.workers:
            if handle.kill_reason is not None:
                continue
            rss = handle.memory.rss()
            verdict = memory_verdict(rss, handle.state, self.config)
            if verdict is not None:
                self._enforce(handle, verdict)
            elif max_private and rss > max_private:
                suspects.append(handle)
        if suspects and self.private_pace.due(now):
            self._check_private(suspects, now)

    def _check_private(self, suspects: list[WorkerHandle], now: float) -> None:
        """Read the private memory of one of ``suspects``, each in turn.

        Private memory is part of the resident, so only workers resident
        beyond max_private can be over it. Reading it walks the worker's page
        tables on this loop's thread, milliseconds for a large worker, so one
        worker is read a turn and PrivatePace spaces the turns by their cost.
        """
        handle = suspects[self.private_turn % len(suspects)]
        self.private_turn += 1
        started = time.thread_time()
        uss = handle.memory.usage().uss
        self.private_pace.done(now, time.thread_time() - started)
        verdict = private_verdict(uss, handle.state, self.config)
        if verdict is not None:
            self._enforce(handle, verdict)

    def _enforce(self, handle: WorkerHandle, verdict: tuple[str, str]) -> None:
        action, reason = verdict
        if action == "kill":
            self.kill(handle, reason)
        else:
            self.recycle(handle, reason)

    def respawn_due(self, now: float) -> None:
        for slot in self.respawner.due(now):
            if slot < self.count and slot not in self.occupied():
                self.spawn(slot)

    def occupied(self) -> set[int]:
        """The running generation's slots with a worker, or one on its way."""
        number = self.generation.number
        live = {
            w.slot
            for w in self.table.workers
            if w.state is not WorkerState.DRAINING and w.generation == number
        }
        return live | self.spawner.spawning(number)

    def valid_count(self, count: int) -> bool:
        """Whether the host may run ``count`` workers; logs why not."""
        if count < 1:
            self.log.warning("SIGTTOU ignored: at least one worker must stay")
            return False
        if count > MAX_WORKERS:
            self.log.warning(
                "SIGTTIN ignored: already at the most workers allowed", limit=MAX_WORKERS
            )
            return False
        return True

    def scale(self, count: int) -> None:
        if not self.valid_count(count):
            return
        self.log.info("scaling workers", before=self.count, after=count)
        self.count = count
        occupied = self.occupied()
        for slot in range(count):
            if slot not in occupied:
                self.spawn(slot)
        for handle in self.table.workers:
            if handle.slot >= count and handle.state is not WorkerState.DRAINING:
                self.retire(handle)

    def kill_all(self) -> None:
        """Last resort on the way out: no worker, nor anything a handler forked,
        outlives the supervisor.

        The supervisor is a child subreaper: every worker is its child, and so
        is any orphan a handler left, so its descendants are all there is to end.
        A fork server killed in the middle of a fork leaves its intermediate
        to fork the worker after the first look: every look kills what it
        finds, until no child is left.
        """
        deadline = time.monotonic() + KILL_ALL_SECONDS
        while time.monotonic() < deadline:
            for pid in descendants(os.getpid()):
                signal_worker(pid, signal.SIGKILL)
            reap_children()
            if not descendants(os.getpid()):
                break
            time.sleep(0.01)
        for handle in self.table.workers:
            self.table.remove(handle)
            handle.close()

    def set_title(self) -> None:
        """Show the cluster, config and ready workers in ps and top."""
        config = self.config
        ready = len(self.table.in_state(WorkerState.READY))
        setproctitle.setproctitle(
            f"irishost: supervisor {config.service.cluster} "
            f"({config.file.name}) workers={ready}/{self.count}"
        )


def reap_children() -> list[tuple[int, int]]:
    """Every child of this process that has exited, as (pid, wait status); never waits."""
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped  # no child at all
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def descendants(pid: int) -> list[int]:
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def signal_worker(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
