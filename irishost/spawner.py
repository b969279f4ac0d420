"""Making a worker: asking the fork server for one, and the supervisor's handle on it."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from iris.logfmt import start_log_writer
from iris.logs import ContextLog

from .exits import Exit, HostError
from .fork_server import ForkServer, ForkServerGone, thread_count
from .rollout import Generation
from .workers import WorkerHandle

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Spawner:
    def __init__(self, prefix: str, log: ContextLog):
        self.prefix = prefix  # of the rings' shared-memory names (segment_prefix)
        self.log = log
        self.forks: ForkServer | None = None

    def start(self, generation: Generation, handler_class: type | None) -> None:
        """Start the fork server; call while this process has one thread."""
        self._warn_if_threaded("the fork server", thread_count())
        self.forks = ForkServer.start(generation.config, handler_class, self.prefix)
        start_log_writer()  # the supervisor's first thread: only once the fork server is forked

    def add(self, generation: Generation, like: Generation | None = None) -> None:
        """Prepare ``generation`` in the fork server (HandlerImportError: see ForkServer)."""
        self._call(
            self._server().add_generation,
            generation.number,
            generation.config,
            like.number if like is not None else None,
        )

    def retain(self, generation: Generation) -> None:
        self._call(self._server().retain, generation.number)

    def spawn(self, slot: int, generation: Generation) -> WorkerHandle:
        """A new worker for ``slot`` of ``generation``."""
        config = generation.config
        limits = config.limits
        max_requests = 0
        if limits.max_requests:
            jitter = config.workers.max_requests_jitter
            max_requests = limits.max_requests + random.randint(0, jitter)
        pid, inbox, outbox, threads = self._call(self._server().spawn, slot, generation.number)
        self.log.debug(
            "forked worker",
            worker=slot,
            pid=pid,
            forked_by=self._server().pid,
            threads_at_fork=threads,
        )
        self._warn_if_threaded(f"worker {slot}", threads)
        handle = WorkerHandle(slot, pid, inbox, outbox, max_requests)
        handle.generation = generation.number
        return handle

    def _warn_if_threaded(self, what: str, threads: int) -> None:
        if threads != 1:
            self.log.warning(
                f"{what} forked from a process with several threads (a preloaded handler "
                "started threads at import?); a lock one of them held stays held in the child",
                threads=threads,
            )

    def exits(self) -> list[tuple[int, int]]:
        """Workers that died, as (pid, wait status); HostError if the fork server died."""
        return self._call(self._server().exits)

    def stop(self) -> None:
        if self.forks is not None:
            self.forks.stop()

    def _server(self) -> ForkServer:
        if self.forks is None:
            raise RuntimeError("Spawner.start was not called")
        return self.forks

    def _call(self, method: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> _R:
        """``method(*args)``, with the fork server's death as the HostError it is."""
        try:
            return method(*args, **kwargs)
        except ForkServerGone as err:
            raise HostError(Exit.FAILURE, f"the fork server died: {err}") from err
