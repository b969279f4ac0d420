"""What the host tells about itself: systemd's STATUS= line and watchdog,
and the snapshot behind `irishost status` and the metrics."""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from iris.logfmt import dropped_records

from ..config import Config
from ..ops.notify import Notifier
from .relay_link import RelayLink
from .switchboard import Switchboard
from .worker_table import WorkerTable
from .workforce import Workforce


class Observed(Protocol):
    """What the status reads (the Supervisor): it only reads, from the loop
    for systemd and from the control and metrics threads for snapshots."""

    notifier: Notifier
    link: RelayLink
    switchboard: Switchboard
    workforce: Workforce
    table: WorkerTable
    metrics_problem: str

    @property
    def config(self) -> Config: ...


# How often systemd's STATUS= line is refreshed.
STATUS_SECONDS = 2.0


class HostStatus:
    def __init__(self, host: Observed):
        self.host = host
        self.started = time.monotonic()
        self._next_status = 0.0
        self._next_watchdog = 0.0
        self._status_relay = ""  # the relay state in the last STATUS= line

    def next_watchdog(self) -> float | None:
        """When the next watchdog ping is due, if systemd wants them."""
        return self._next_watchdog if self.host.notifier.watchdog_interval() else None

    def tell_systemd(self, now: float) -> None:
        """Status and watchdog pings, from the loop so a hung loop stops pinging."""
        notifier = self.host.notifier
        interval = notifier.watchdog_interval()
        if interval and now >= self._next_watchdog:
            notifier.ping_watchdog()
            self._next_watchdog = now + interval
        # A change of the relay's state is news at once: an outage shorter
        # than STATUS_SECONDS would otherwise never show.
        relay = self.host.link.state.value
        if now >= self._next_status or relay != self._status_relay:
            notifier.tell_status(self.line())
            self._next_status = now + STATUS_SECONDS
            self._status_relay = relay

    def line(self) -> str:
        host = self.host
        switchboard, workforce = host.switchboard, host.workforce
        line = (
            f"workers {len(switchboard.ready_workers())}/{workforce.count}, "
            f"served {switchboard.served}, in flight {switchboard.in_flight()}, "
            f"restarts {workforce.respawner.restarts}, relay {host.link.state.value}"
        )
        waiting = switchboard.waiting()
        if waiting:
            line += f", waiting for a worker {waiting}"
        problems = workforce.respawner.slot_problems(workforce.count)
        if problems:
            line += "; degraded: " + "; ".join(
                f"worker {slot} {problem}" for slot, problem in problems.items()
            )
        return line

    def _metrics(self) -> dict[str, Any] | None:
        """The metrics endpoint's port and, when it is not served, why; None when off."""
        port = self.host.config.metrics.port
        if not port:
            return None
        return {"port": port, "problem": self.host.metrics_problem}

    def snapshot(self) -> dict[str, Any]:
        """What `irishost status` and the metrics show; runs on their threads."""
        host = self.host
        now = time.monotonic()
        restarts = host.workforce.respawner.slot_restarts
        with host.table.lock:
            workers: list[dict[str, Any]] = [
                {
                    "slot": w.slot,
                    "pid": w.pid,
                    "state": w.state.value,
                    "served": w.served,
                    "in_flight": len(w.in_flight),
                    "restarts": restarts.get(w.slot, 0),
                    "uptime": now - w.started,
                    "process": w,
                }
                for w in host.table.workers
            ]
            in_flight = host.switchboard.in_flight()
            waiting = host.switchboard.waiting()
        for entry in workers:  # outside the lock: reading /proc is slow
            usage = entry.pop("process").memory.usage()
            entry.update(rss=usage.rss, uss=usage.uss, pss=usage.pss)
        problems = host.workforce.respawner.slot_problems(host.workforce.count)
        return {
            "service": host.config.file.stem,
            "cluster": host.config.service.cluster,
            "pid": os.getpid(),
            "uptime": now - self.started,
            "relay": {"state": host.link.state.value, "port": host.config.relay.port},
            "served": host.switchboard.served,
            "in_flight": in_flight,
            "waiting": waiting,
            "restarts": host.workforce.respawner.restarts,
            "degraded": [{"slot": slot, "problem": text} for slot, text in problems.items()],
            "metrics": self._metrics(),
            "workers": workers,
            "log_records_dropped": dropped_records(),  # the supervisor's writer's queue was full
            **host.switchboard.request_log.stats.snapshot(),  # "durations" and "failures"
        }
