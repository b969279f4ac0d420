"""A new generation of workers taking over from the running one.

Two things start a generation beside the running workers: a reload (SIGHUP:
the re-read config and handler code) and a reconnect (the relay dropped the
connection: the running config and code, in fresh workers whose ``init``
connects afresh, since every old worker's handler had ``handle_drop``).
Both go the same way, and differ only at the ends:

- ``start``: fork one worker per slot of the new generation;
- ``on_ready``: once all of them are ready, ``complete``: make the
  generation the running one and retire the old workers (they finish what
  they hold and exit), then a reload reports to systemd and a reconnect
  registers with the relay;
- ``on_death`` of a new worker, or a stop, or a lost relay during a reload:
  ``abort``: kill the new workers, keep the old ones; a reload reports the
  failure, a reconnect tries again later.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from iris.logfmt import configure_logging

from .config import Config, ConfigError, load_config
from .exits import HostError
from .workers import WorkerHandle, WorkerState

if TYPE_CHECKING:
    from .supervisor import Supervisor


@dataclass(frozen=True)
class Generation:
    """The workers started from one reading of the config (one per reload or reconnect)."""

    number: int
    config: Config  # the handler class, when preloading, is the fork server's


def reread(running: Config, overrides: dict[str, Any], number: int) -> Generation:
    """The generation a reload starts: the config file read again, with the
    command line's overrides; ConfigError when it cannot be used. (The fork
    server re-imports the handler when preloading: Spawner.add.)
    """
    config = load_config(running.file).with_overrides(**overrides)
    if (config.service.cluster, config.relay.port) != (
        running.service.cluster,
        running.relay.port,
    ):
        raise ConfigError(config.file, "service.cluster", "cluster and relay port need a restart")
    return Generation(number, config)


class Rollout(abc.ABC):
    what = "rollout"

    def __init__(self, host: Supervisor, generation: Generation):
        self.host = host
        self.generation = generation

    def start(self) -> None:
        for slot in range(self.generation.config.workers.count):
            self.host.pool.spawn(slot, self.generation)

    def owns(self, worker: WorkerHandle) -> bool:
        return worker.generation == self.generation.number

    def on_ready(self) -> None:
        fresh = self.host.table.of_generation(self.generation.number)
        if all(w.state is WorkerState.READY for w in fresh):
            self.complete(len(fresh))

    def on_death(self, worker: WorkerHandle, how: str) -> None:
        self.abort(f"new worker {worker.slot} {how}", worker.failure)

    def complete(self, workers: int) -> None:
        host = self.host
        host.rollout = None
        old = [w for w in host.table.workers if w.generation < self.generation.number]
        self._take_over()
        for worker in old:
            host.pool.retire(worker)
        host.pool.spawner.retain(self.generation)
        self._completed(workers)

    def abort(self, why: str, details: str | None = None) -> None:
        host = self.host
        host.rollout = None
        self._aborted(why)
        if details:
            host.log.error("traceback of the failed worker", traceback=details)
        for worker in host.table.of_generation(self.generation.number):
            host.pool.kill(worker, "its generation was given up", quiet=True)

    @abc.abstractmethod
    def _take_over(self) -> None:
        """Make the new generation the running one (before the old workers retire)."""

    @abc.abstractmethod
    def _completed(self, workers: int) -> None:
        """What follows the take-over."""

    @abc.abstractmethod
    def _aborted(self, why: str) -> None:
        """Report the failure; the old workers carry on."""


class Reload(Rollout):
    what = "reload"

    def _take_over(self) -> None:
        """The new config's topics, dispatch rules, worker count and log level."""
        host, config = self.host, self.generation.config
        host.pool.generation = self.generation
        host.pool.count = config.workers.count
        host.dispatch.reconfigure(config)
        host.link.reconfigure(config)
        configure_logging(config.logging.level)

    def _completed(self, workers: int) -> None:
        self.host.log.info("reload complete", workers=workers, generation=self.generation.number)
        self.host.notifier.ready()

    def _aborted(self, why: str) -> None:
        self.host.log.error("reload failed; keeping the running workers", error=why)
        self.host.notifier.ready()


class Reconnect(Rollout):
    what = "reconnect"

    def _take_over(self) -> None:
        self.host.pool.generation = self.generation

    def _completed(self, workers: int) -> None:
        """Register again; the old workers were retired first, so no request of
        the new connection reaches them."""
        try:
            self.host.link.connect()
        except HostError as err:  # the relay went away again: fresh workers next time too
            self.host.link.retry_later(str(err))
            return
        self.host.log.info(
            "reconnected to relay", workers=workers, generation=self.generation.number
        )

    def _aborted(self, why: str) -> None:
        self.host.link.retry_later(f"fresh workers did not start: {why}")
