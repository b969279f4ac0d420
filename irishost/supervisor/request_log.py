"""What became of each request: the metrics' counts and the access log.

Every answer point of :mod:`irishost.supervisor.switchboard` records its request here once,
with its :class:`~irishost.ops.metrics.Outcome` and the time since it reached the
host: counted in :class:`~irishost.ops.metrics.RequestStats` (the snapshot's
``durations`` and ``failures``, the metrics' histogram and failure counters),
and logged on ``irishost.access`` when ``[logging] access`` is on.

The access lines of a batch of answers cost the thread that answers them one
HotRecord and one queue entry (a ``LineBatch`` of up to
``ACCESS_LINES_PER_RECORD`` lines); their text is made by the log writer
(``iris.logfmt``), a line per request, in the same "request key=value ..."
form as ContextLog's lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import iris
from iris.logs import HotRecord, LineBatch, format_pairs

from ..config import Config
from ..ops.metrics import Outcome, RequestStats
from .handle import WorkerHandle

# The access log's logger: one INFO line per request when [logging] access is on.
access_logger = logging.getLogger("irishost.access")
# Access lines per record at most: the log writer's queue bound is in records
# (iris.logfmt.QUEUE_RECORDS), so this bounds what a stalled stderr holds.
ACCESS_LINES_PER_RECORD = 16


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


class _AccessLines(LineBatch):
    """The access lines of a batch of answers, rendered only when written:
    one worker and outcome, each request's size and seconds."""

    __slots__ = ("context", "worker", "outcome", "requests")

    def __init__(
        self, context: str, worker: object, outcome: Outcome, requests: list[tuple[int, float]]
    ):
        self.context = context
        self.worker = worker
        self.outcome = outcome
        self.requests = requests  # (size, seconds) of each

    def lines(self) -> list[str]:
        head = f"request {self.context} worker={self.worker} size="
        tail = f" outcome={self.outcome}"
        return [f"{head}{size} duration={seconds:.6f}{tail}" for size, seconds in self.requests]


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
            rows = [(r.size, seconds) for r, seconds in zip(requests, durations, strict=True)]
            for start in range(0, len(rows), ACCESS_LINES_PER_RECORD):
                batch = _AccessLines(
                    context, slot, outcome, rows[start : start + ACCESS_LINES_PER_RECORD]
                )
                access_logger.handle(HotRecord(access_logger.name, logging.INFO, batch))
