"""Making a worker process: its rings, the fork, and the supervisor's handle on it."""

from __future__ import annotations

import os
import random
import sys

from . import worker
from .ring import Ring
from .rollout import Generation
from .workers import WorkerHandle


class Spawner:
    def __init__(self, prefix: str):
        self.prefix = prefix  # of the rings' shared-memory names (segment_prefix)

    def spawn(
        self, slot: int, generation: Generation, siblings: list[WorkerHandle]
    ) -> WorkerHandle:
        """Fork a worker for ``slot`` of ``generation``; ``siblings`` are the live workers,
        whose rings the child unmaps."""
        config = generation.config
        limits = config.limits
        max_requests = 0
        if limits.max_requests:
            jitter = config.workers.max_requests_jitter
            max_requests = limits.max_requests + random.randint(0, jitter)
        inbox, outbox = Ring.create(prefix=self.prefix), Ring.create(prefix=self.prefix)
        rings = tuple(ring for w in siblings for ring in (w.inbox, w.outbox))
        spec = worker.WorkerSpec(
            slot, config, inbox, outbox, generation.handler_class, os.getpid(), rings
        )
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            worker.run(spec)  # never returns; nothing may run in the child before it
        handle = WorkerHandle(slot, pid, inbox, outbox, max_requests)
        handle.generation = generation.number
        return handle
