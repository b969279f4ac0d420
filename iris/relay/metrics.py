"""The relay's Prometheus metrics (``iris-relay --metrics-port``, ``[relay] metrics_port``).

The numbers are the status socket's snapshot (status.py), so a scrape and
``iris relay status`` never disagree, and the relay counts nothing more for
them: its passthrough path (passthrough.py) is where a relay spends its
time, and per-kind counters of requests, broadcasts or tunnels would be
paid there on every packet.

The snapshot is built on the relay's loop, which alone changes what it
reads: the server's request thread asks for it and waits
(``RelayServer.snapshot_from_thread``), so the loop takes no lock and
nothing it changes is read from another thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import prometheus
from .status import Snapshot

log = logging.getLogger("iris.relay")


def render(snapshot: Snapshot) -> str:
    """The snapshot in the Prometheus text format."""
    clusters, topics = snapshot["clusters"], snapshot["topics"]
    families = [
        ("info", "gauge", "Always 1; the relay's version is its label.",
         {_labels(version=snapshot["version"]): 1}),
        ("uptime_seconds", "gauge", "Seconds since the relay started.",
         {"": snapshot["uptime"]}),
        ("connections", "gauge", "TCP connections, attached or not.",
         {"": snapshot["connections"]}),
        ("clusters", "gauge", "Clusters with at least one member.", {"": len(clusters)}),
        ("members", "gauge", "Members registered under a cluster.",
         {_labels(cluster=name): count for name, count in sorted(clusters.items())}),
        ("topics", "gauge", "Topics with at least one subscriber.", {"": len(topics)}),
        ("subscribers", "gauge", "Subscribers of a topic.",
         {_labels(topic=name): count for name, count in sorted(topics.items())}),
        ("pending_requests", "gauge", "Requests delivered and waiting for their answer.",
         {"": snapshot["pending"]}),
        ("received_packets_total", "counter", "Packets read from clients.",
         {"": snapshot["in_msgs"]}),
        ("received_bytes_total", "counter", "Bytes read from clients.",
         {"": snapshot["in_bytes"]}),
        ("sent_packets_total", "counter", "Packets written to clients.",
         {"": snapshot["out_msgs"]}),
        ("sent_bytes_total", "counter", "Bytes written to clients.", {"": snapshot["out_bytes"]}),
        ("slow_consumers_total", "counter", "Connections dropped for not reading their packets, "
         "by the bound they broke (--outbound-cap, --outbound-budget, --write-deadline).",
         {_labels(cause=cause): count
          for cause, count in sorted(snapshot["slow_consumer_causes"].items())}),
        ("unsent_bytes", "gauge", "Bytes routed to connections and not yet written.",
         {"": snapshot["unsent_bytes"]}),
        ("outbound_budget_bytes", "gauge", "The most unsent bytes held at once "
         "(--outbound-budget).", {"": snapshot["outbound_budget"]}),
        ("partial_bytes", "gauge", "Bytes of incomplete packets held now.",
         {"": snapshot["partial_bytes"]}),
        ("partial_budget_bytes", "gauge", "The most bytes of incomplete packets held at once "
         "(--partial-budget).", {"": snapshot["partial_budget"]}),
        ("refusals_total", "counter", "Actions the permissions file refused, by action "
         "(--permissions).",
         {_labels(action=action): count for action, count in sorted(snapshot["refusals"].items())}),
    ]  # fmt: skip
    lines = []
    for name, kind, description, samples in families:
        lines += prometheus.family(f"iris_relay_{name}", kind, description)
        lines += [f"iris_relay_{name}{labels} {value}" for labels, value in samples.items()]
    return "\n".join(lines) + "\n"


def _labels(**pairs: str) -> str:
    return (
        "{"
        + ",".join(f"{key}={prometheus.label_value(value)}" for key, value in pairs.items())
        + "}"
    )


def serve_optionally(
    port: int, snapshot: Callable[[], Snapshot | None]
) -> prometheus.MetricsServer | None:
    """The endpoint on ``port`` (0: any free one), or None after one ERROR line:
    a relay without its metrics still routes (see :mod:`iris.prometheus`).

    ``snapshot`` runs on the server's request threads; None means the loop
    did not build one (stopping, or stuck), which the scrape gets as 503.
    """

    def text() -> str:
        taken = snapshot()
        if taken is None:
            raise prometheus.Unavailable("the relay did not answer in time; is it stopping?")
        return render(taken)

    server, problem = prometheus.serve_optionally(port, text, "iris-relay-metrics")
    if server is None:
        log.error("metrics not served: %s; the relay serves without them", problem)
    else:
        log.info("metrics on http://%s:%d/metrics", prometheus.HOST, server.port)
    return server
