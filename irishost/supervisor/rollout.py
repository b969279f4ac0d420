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
from collections.abc import Callable
from typing import Any, Protocol

from iris.logfmt import configure_logging
from iris.logs import ContextLog

from ..config import Config, ConfigError, load_config
from ..exits import HostError
from ..ops.notify import Notifier
from .generation import Generation
from .handle import WorkerHandle, WorkerState
from .relay_link import RelayLink
from .switchboard import Switchboard
from .worker_table import WorkerTable
from .workforce import Workforce

# Told how a reload command or a rollout ended: (succeeded, the line to say).
Waiter = Callable[[bool, str], None]


class RolloutHost(Protocol):
    """What a rollout works on (``irishost.supervisor.generations.Generations``): the
    parts it starts, retires and reconfigures, and where it clears itself."""

    workforce: Workforce
    table: WorkerTable
    switchboard: Switchboard
    link: RelayLink
    notifier: Notifier
    log: ContextLog
    rollout: Rollout | None


def reread(running: Config, overrides: dict[str, Any], number: int) -> Generation:
    """The generation a reload starts: the config file read again, with the
    command line's overrides; ConfigError when it cannot be used. (The fork
    server re-imports the handler when preloading: Spawner.add.)
    """
    config = load_config(running.file).with_overrides(**overrides)
    if _fixed(config) != _fixed(running):
        raise ConfigError(
            config.file,
            "service.cluster",
            "cluster, relay.port, relay.metrics_port and relay.permissions (the file's "
            "name; its rules are re-read) need a restart",
        )
    return Generation(number, config, code=number)


def _fixed(config: Config) -> tuple[object, ...]:
    """What a reload cannot change: the registration and the embedded relay
    are made once, at start."""
    relay = config.relay
    return (config.service.cluster, relay.port, relay.metrics_port, relay.permissions)


class Rollout(abc.ABC):
    what = "rollout"

    def __init__(self, host: RolloutHost, generation: Generation, count: int):
        self.host = host
        self.generation = generation
        self.count = count  # workers it starts; `irishost scale` meanwhile changes it
        self.waiters: list[Waiter] = []  # told at the end

    def start(self) -> None:
        for slot in range(self.count):
            self.host.workforce.spawn(slot, self.generation)

    def owns(self, worker: WorkerHandle) -> bool:
        return worker.generation == self.generation.number

    def scale(self, count: int) -> None:
        """Start ``count`` workers instead: the scale applies to the new generation."""
        self.count = count
        number = self.generation.number
        fresh = self.host.table.of_generation(number)
        occupied = {w.slot for w in fresh} | self.host.workforce.spawner.spawning(number)
        for slot in range(count):
            if slot not in occupied:
                self.host.workforce.spawn(slot, self.generation)
        for worker in fresh:
            if worker.slot >= count:
                self.host.workforce.kill(worker, "scaled down during a rollout", quiet=True)
        self.on_ready()

    def on_ready(self) -> None:
        ready = {
            w.slot
            for w in self.host.table.of_generation(self.generation.number)
            if w.state is WorkerState.READY and w.kill_reason is None
        }
        if ready.issuperset(range(self.count)):
            self.complete(self.count)

    def on_death(self, worker: WorkerHandle, how: str) -> None:
        self.abort(f"new worker {worker.slot} {how}", worker.failure)

    def complete(self, workers: int) -> None:
        host = self.host
        host.rollout = None
        old = [w for w in host.table.workers if w.generation < self.generation.number]
        host.workforce.generation = self.generation
        host.workforce.count = self.count
        self._take_over()
        for worker in old:
            host.workforce.retire(worker)
        host.workforce.spawner.retain({self.generation.code})
        self._completed(workers)
        self._tell(True, f"{self.what} complete (generation {self.generation.number})")

    def abort(self, why: str, details: str | None = None) -> None:
        host = self.host
        host.rollout = None
        self._aborted(why)
        if details:
            host.log.error("traceback of the failure", traceback=details)
        for worker in host.table.of_generation(self.generation.number):
            host.workforce.kill(worker, "its generation was given up", quiet=True)
        host.workforce.spawner.retain({host.workforce.generation.code})
        self._tell(False, f"{self.what} failed: {why}; the running workers carry on")

    def _tell(self, ok: bool, line: str) -> None:
        for waiter in self.waiters:
            waiter(ok, line)
        self.waiters.clear()

    @abc.abstractmethod
    def _take_over(self) -> None:
        """What changes with the new generation, besides its workers (before the
        old workers retire)."""

    @abc.abstractmethod
    def _completed(self, workers: int) -> None:
        """What follows the take-over."""

    @abc.abstractmethod
    def _aborted(self, why: str) -> None:
        """Report the failure; the old workers carry on."""


class Reload(Rollout):
    what = "reload"

    def _take_over(self) -> None:
        """The new config's topics, dispatch rules and log level."""
        host, config = self.host, self.generation.config
        host.switchboard.reconfigure(config)
        host.link.reconfigure(config)
        configure_logging(config.logging.level)

    def _completed(self, workers: int) -> None:
        self.host.log.info("reload complete", workers=workers, generation=self.generation.number)
        self.host.notifier.tell_ready()

    def _aborted(self, why: str) -> None:
        self.host.log.error("reload failed; keeping the running workers", error=why)
        self.host.notifier.tell_ready()


class Reconnect(Rollout):
    what = "reconnect"

    def _take_over(self) -> None:
        """Nothing changes but the workers: same config, same code."""

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
