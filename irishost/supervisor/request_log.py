"""What became of each request: the metrics' counts and the access log.

Every answer point of :mod:`irishost.supervisor.dispatch` records its request here once,
with its :class:`~irishost.ops.metrics.Outcome` and the time since it reached the
host: counted in :class:`~irishost.ops.metrics.RequestStats` (the snapshot's
``durations`` and ``failures``, the metrics' histogram and failure counters),
and logged on ``irishost.access`` when ``[logging] access`` is on.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from iris.logs import ContextLog

from ..config import Config
from ..ops.metrics import Outcome, RequestStats
from .handle import WorkerHandle

# The access log's logger: one INFO line per request when [logging] access is on.
access_logger = logging.getLogger("irishost.access")


class Request(Protocol):
    """A request as the dispatch knows it (waiting, or held by a worker)."""

    @property
    def received(self) -> float: ...  # monotonic, when it reached the host

    @property
    def size(self) -> int: ...  # bytes


class RequestLog:
    """Fed from the relay connection's reader thread and the supervisor's loop;
    RequestStats has a lock of its own, and a logger is thread-safe."""

    def __init__(self, config: Config):
        self.stats = RequestStats()
        self._access: ContextLog | None = None  # the access log, when on
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Turn the access log on or off as a (reloaded) config says."""
        self._access = None
        if config.logging.access:
            # INFO whatever the host's level: the operator asked for these lines.
            access_logger.setLevel(logging.INFO)
            self._access = ContextLog(access_logger).new(cluster=config.service.cluster)

    def record(
        self, request: Request, outcome: Outcome, worker: WorkerHandle | None = None
    ) -> None:
        """``request`` was answered (or expired) just now; ``worker`` held it, if one did."""
        seconds = time.monotonic() - request.received
        self.stats.record(outcome, seconds)
        if self._access is not None:
            self._access.info(
                "request",
                worker="-" if worker is None else worker.slot,
                size=request.size,
                duration=f"{seconds:.6f}",
                outcome=outcome,
            )
