"""Prometheus metrics for the host, in the text format; :mod:`iris.prometheus` serves them.

Off unless ``[metrics] port`` is set. The numbers come from the same snapshot
as ``irishost status`` (its schema is in :mod:`irishost.ops.control`), so the two
never disagree.
"""

from __future__ import annotations

import bisect
import enum
import threading
from collections.abc import Callable
from typing import Any

from iris import prometheus
from iris.logs import ContextLog
from iris.prometheus import MetricsServer

Snapshot = dict[str, Any]

# Request duration buckets, seconds: from an echo through the rings (~100 us)
# to a handler using most of a generous timeout (10 s); longer ones land in +Inf.
DURATION_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Outcome(enum.StrEnum):
    """How the host answered a request: the access log's ``outcome``, the failures' cause."""

    OK = "ok"  # the handler's reply
    FAULT = "fault"  # the worker answered with a fault: the handler raised
    WORKER_DIED = "worker_died"  # its worker died holding it (crash, kill, max_rss)
    NO_ROOM = "no_room"  # no worker could take it: memory limits, or stalled workers
    EXPIRED = "expired"  # its deadline passed first: the relay told the caller it timed out
    SHUTDOWN = "shutdown"  # the host was stopping


FAILURES = tuple(outcome for outcome in Outcome if outcome is not Outcome.OK)


class RequestStats:
    """How long requests took until answered, and why the failed ones failed.

    Fed at every answer point of irishost.supervisor.switchboard, from the supervisor's loop
    and from the relay connection's reader thread, so under a lock of its own.
    Read into the snapshot (see :mod:`irishost.ops.control`), as ``durations``
    and ``failures``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * (len(DURATION_BUCKETS) + 1)  # per bucket; the last is +Inf
        self._seconds = 0.0
        self._failures = dict.fromkeys(FAILURES, 0)

    def record_all(self, outcome: Outcome, durations: list[float]) -> None:
        """Requests that ended with ``outcome`` after these many seconds each."""
        buckets = [bisect.bisect_left(DURATION_BUCKETS, s) for s in durations]  # le: inclusive
        with self._lock:
            for bucket in buckets:
                self._counts[bucket] += 1
            self._seconds += sum(durations)
            if outcome is not Outcome.OK:
                self._failures[outcome] += len(durations)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts, seconds, failures = list(self._counts), self._seconds, dict(self._failures)
        cumulative, total = [], 0
        for bound, count in zip(DURATION_BUCKETS, counts, strict=False):
            total += count
            cumulative.append([bound, total])
        return {
            "durations": {"buckets": cumulative, "sum": seconds, "count": sum(counts)},
            "failures": {str(cause): count for cause, count in failures.items()},
        }


def render(snapshot: Snapshot) -> str:
    """The snapshot in the Prometheus text format."""
    per_slot = _by_slot(snapshot["workers"])
    families = [
        ("workers_alive", "gauge", "Worker processes alive (booting, ready or draining).",
         {"": len(snapshot["workers"])}),
        ("requests_served_total", "counter", "Requests answered since the host started.",
         {"": snapshot["served"]}),
        ("requests_in_flight", "gauge", "Requests handed to workers and not yet answered.",
         {"": snapshot["in_flight"]}),
        ("requests_waiting", "gauge", "Requests waiting for a worker to be ready.",
         {"": snapshot["waiting"]}),
        ("worker_restarts_total", "counter", "Workers that died unexpectedly and were respawned.",
         {"": snapshot["restarts"]}),
        ("slots_down", "gauge", "Worker slots down (crashed, failing to start) until ready again.",
         {"": len(snapshot["degraded"])}),
        ("relay_connected", "gauge", "1 if the host is connected to the Iris relay, else 0.",
         {"": int(snapshot["relay"]["state"] == "connected")}),
        ("log_records_dropped_total", "counter", "Log records dropped: the log "
         "writer fell behind.", {"": snapshot.get("log_records_dropped", 0)}),
        ("worker_rss_bytes", "gauge", "Resident memory of the worker processes in a slot.",
         per_slot["rss"]),
        ("worker_uss_bytes", "gauge", "Private memory (USS) of the worker processes in a slot.",
         per_slot["uss"]),
        ("worker_pss_bytes", "gauge",
         "Proportional memory (PSS) of the worker processes in a slot.", per_slot["pss"]),
        ("worker_requests_served_total", "counter", "Requests answered by a slot's worker.",
         per_slot["served"]),
        ("worker_requests_in_flight", "gauge", "Requests held by a slot's worker processes.",
         per_slot["in_flight"]),
    ]  # fmt: skip
    families.append(
        ("requests_failed_total", "counter", "Requests answered with a fault or not at all, "
         "by cause.", {f'{{cause="{cause}"}}': n for cause, n in snapshot["failures"].items()})
    )  # fmt: skip
    lines = []
    for name, kind, description, samples in families:
        lines += _family(name, kind, description)
        lines += [f"irishost_{name}{labels} {value}" for labels, value in samples.items()]
    lines += _duration_histogram(snapshot["durations"])
    return "\n".join(lines) + "\n"


def _family(name: str, kind: str, description: str) -> list[str]:
    return prometheus.family(f"irishost_{name}", kind, description)


def _duration_histogram(durations: dict[str, Any]) -> list[str]:
    """The histogram family: cumulative _bucket samples, then _sum and _count."""
    name = "irishost_request_duration_seconds"
    lines = _family(
        "request_duration_seconds",
        "histogram",
        "Seconds from a request's arrival at the host to its answer, whatever the outcome.",
    )
    lines += [f'{name}_bucket{{le="{bound!r}"}} {count}' for bound, count in durations["buckets"]]
    lines += [
        f'{name}_bucket{{le="+Inf"}} {durations["count"]}',
        f"{name}_sum {durations['sum']!r}",
        f"{name}_count {durations['count']}",
    ]
    return lines


def _by_slot(workers: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-slot totals: {"rss": {'{worker="0"}': bytes, ...}, "uss": ..., "served": ...}.

    A draining worker and its successor share a slot for a while; two samples
    with the same labels would make the whole scrape invalid, and a pid label
    would start a new series at every recycle. Summing them keeps one series
    per slot, and a counter that drops when the old worker leaves is a reset
    that Prometheus's rate() already handles.
    """
    keys = ("rss", "uss", "pss", "served", "in_flight")
    totals: dict[str, dict[str, int]] = {key: {} for key in keys}
    for worker in sorted(workers, key=lambda worker: worker["slot"]):
        labels = f'{{worker="{worker["slot"]}"}}'
        for key, samples in totals.items():
            samples[labels] = samples.get(labels, 0) + worker[key]
    return totals


def serve_optionally(
    port: int, snapshot: Callable[[], Snapshot], log: ContextLog
) -> tuple[MetricsServer | None, str]:
    """The metrics endpoint on ``port``, or None and why not.

    It is optional (see :mod:`iris.prometheus`): a taken port costs one
    ERROR line and the metrics, not the host. ``snapshot`` runs on the
    server's request threads (see :mod:`irishost.ops.control`).
    """
    server, problem = prometheus.serve_optionally(
        port, lambda: render(snapshot()), "irishost-metrics"
    )
    if server is None:
        log.error("metrics endpoint not served; serving without it", port=port, error=problem)
    else:
        log.info("metrics endpoint", url=f"http://{prometheus.HOST}:{port}/metrics")
    return server, problem
