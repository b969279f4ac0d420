"""What became of each request: the metrics' counts and the access log.

Every answer point of :mod:`irishost.supervisor.switchboard` records its request here once,
with its :class:`~irishost.ops.metrics.Outcome` and the time since it reached the
host: counted in :class:`~irishost.ops.metrics.RequestStats` (the snapshot's
``durations`` and ``failures``, the metrics' histogram and failure counters),
and logged on ``irishost.access`` when ``[logging] access`` is on.

An access line costs the thread that answers the request a HotRecord and a
queue entry; its text is made by the log writer (``iris.logfmt``), in the
same "request key=value ..." form as ContextLog's lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import iris
from iris.logs import HotRecord, format_pairs

from ..config import Config
from ..ops.metrics import Outcome, RequestStats
from .handle import WorkerHandle

# The access log's logger: one INFO line per request when [logging] access is on.
access_logger = logging.getLogger("irishost.access")


class HostRequest(Protocol):
    """A request the host took from the relay: a
    :class:`~irishost.supervisor.switchboard.WaitingRequest` (for a worker to be
    ready) or a :class:`~irishost.supervisor.worker_table.HeldRequest` (by one).
    What answering it and recording it read."""

    @property
    def conn(self) -> iris.Connection: ...  # the connection it came in on

    @property
    def relay_id(self) -> int: ...  # the relay's id for it, on that connection

    @property
    def received(self) -> float: ...  # monotonic, when it reached the host

    @property
    def size(self) -> int: ...  # bytes


class _AccessLine:
    """An access line's message, rendered only when it is written."""

    __slots__ = ("context", "worker", "size", "seconds", "outcome")

    def __init__(self, context: str, worker: object, size: int, seconds: float, outcome: Outcome):
        self.context = context
        self.worker = worker
        self.size = size
        self.seconds = seconds
        self.outcome = outcome

    def __str__(self) -> str:
        return (
            f"request {self.context} worker={self.worker} size={self.size} "
            f"duration={self.seconds:.6f} outcome={self.outcome}"
        )


class RequestLog:
    """Fed from the relay connection's reader thread and the supervisor's loop;
    RequestStats has a lock of its own, and a logger is thread-safe."""

    def __init__(self, config: Config):
        self.stats = RequestStats()
        self._access: str | None = None  # the access lines' context, when the log is on
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Turn the access log on or off as a (reloaded) config says."""
        self._access = None
        if config.logging.access:
            # INFO whatever the host's level: the operator asked for these lines.
            access_logger.setLevel(logging.INFO)
            self._access = format_pairs((("cluster", config.service.cluster),))

    def record(
        self, request: HostRequest, outcome: Outcome, worker: WorkerHandle | None = None
    ) -> None:
        """``request`` was answered (or expired) just now; ``worker`` held it, if one did."""
        self.record_all((request,), outcome, worker)

    def record_all(
        self, requests: Sequence[HostRequest], outcome: Outcome, worker: WorkerHandle | None = None
    ) -> None:
        """:meth:`record` for a batch (the fast path's replies): one clock read,
        one taking of the stats' lock."""
        now = time.monotonic()
        durations = [now - request.received for request in requests]
        self.stats.record_all(outcome, durations)
        context = self._access
        if context is not None and access_logger.isEnabledFor(logging.INFO):
            slot = "-" if worker is None else worker.slot
            for request, seconds in zip(requests, durations, strict=True):
                line = _AccessLine(context, slot, request.size, seconds, outcome)
                access_logger.handle(HotRecord(access_logger.name, logging.INFO, line))
