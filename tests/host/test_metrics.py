"""Tests for irishost.ops.metrics: the exposition text, and a real HTTP server on loopback
(iris.prometheus, which serves it)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from unittest import mock

import pytest

from iris.prometheus import CONTENT_TYPE, MetricsServer
from irishost.ops.metrics import DURATION_BUCKETS, Outcome, RequestStats, render

SNAPSHOT = {
    "service": "primes",
    "cluster": "primes",
    "pid": 4242,
    "uptime": 60.0,
    "relay": {"state": "connected", "port": 55555},
    "served": 1523,
    "in_flight": 3,
    "waiting": 4,
    "restarts": 1,
    "degraded": [{"slot": 2, "problem": "failed to start: RuntimeError: database down"}],
    "workers": [
        # Slot 1 is being recycled: the draining worker and its successor both count.
        {"slot": 1, "pid": 11, "state": "draining", "served": 900, "in_flight": 1, "rss": 5000,
         "uss": 2000, "pss": 3500, "restarts": 0, "uptime": 50.0},
        {"slot": 0, "pid": 10, "state": "ready", "served": 600, "in_flight": 2, "rss": 7000,
         "uss": 1000, "pss": 4000, "restarts": 1, "uptime": 50.0},
        {"slot": 1, "pid": 12, "state": "booting", "served": 0, "in_flight": 0, "rss": 3000,
         "uss": 500, "pss": 1500, "restarts": 0, "uptime": 0.5},
    ],
    "durations": {"buckets": [[0.001, 1000], [0.1, 1500], [10.0, 1520]], "sum": 17.25,
                  "count": 1530},
    "failures": {"fault": 3, "worker_died": 2, "no_room": 0, "expired": 5, "shutdown": 0},
    "log_records_dropped": 7,
}  # fmt: skip

EXPECTED = """\
# HELP irishost_workers_alive Worker processes alive (booting, ready or draining).
# TYPE irishost_workers_alive gauge
irishost_workers_alive 3
# HELP irishost_requests_served_total Requests answered since the host started.
# TYPE irishost_requests_served_total counter
irishost_requests_served_total 1523
# HELP irishost_requests_in_flight Requests handed to workers and not yet answered.
# TYPE irishost_requests_in_flight gauge
irishost_requests_in_flight 3
# HELP irishost_requests_waiting Requests waiting for a worker to be ready.
# TYPE irishost_requests_waiting gauge
irishost_requests_waiting 4
# HELP irishost_worker_restarts_total Workers that died unexpectedly and were respawned.
# TYPE irishost_worker_restarts_total counter
irishost_worker_restarts_total 1
# HELP irishost_slots_down Worker slots down (crashed, failing to start) until ready again.
# TYPE irishost_slots_down gauge
irishost_slots_down 1
# HELP irishost_relay_connected 1 if the host is connected to the Iris relay, else 0.
# TYPE irishost_relay_connected gauge
irishost_relay_connected 1
# HELP irishost_log_records_dropped_total Log records dropped: the log writer fell behind.
# TYPE irishost_log_records_dropped_total counter
irishost_log_records_dropped_total 7
# HELP irishost_worker_rss_bytes Resident memory of the worker processes in a slot.
# TYPE irishost_worker_rss_bytes gauge
irishost_worker_rss_bytes{worker="0"} 7000
irishost_worker_rss_bytes{worker="1"} 8000
# HELP irishost_worker_uss_bytes Private memory (USS) of the worker processes in a slot.
# TYPE irishost_worker_uss_bytes gauge
irishost_worker_uss_bytes{worker="0"} 1000
irishost_worker_uss_bytes{worker="1"} 2500
# HELP irishost_worker_pss_bytes Proportional memory (PSS) of the worker processes in a slot.
# TYPE irishost_worker_pss_bytes gauge
irishost_worker_pss_bytes{worker="0"} 4000
irishost_worker_pss_bytes{worker="1"} 5000
# HELP irishost_worker_requests_served_total Requests answered by a slot's worker.
# TYPE irishost_worker_requests_served_total counter
irishost_worker_requests_served_total{worker="0"} 600
irishost_worker_requests_served_total{worker="1"} 900
# HELP irishost_worker_requests_in_flight Requests held by a slot's worker processes.
# TYPE irishost_worker_requests_in_flight gauge
irishost_worker_requests_in_flight{worker="0"} 2
irishost_worker_requests_in_flight{worker="1"} 1
# HELP irishost_requests_failed_total Requests answered with a fault or not at all, by cause.
# TYPE irishost_requests_failed_total counter
irishost_requests_failed_total{cause="fault"} 3
irishost_requests_failed_total{cause="worker_died"} 2
irishost_requests_failed_total{cause="no_room"} 0
irishost_requests_failed_total{cause="expired"} 5
irishost_requests_failed_total{cause="shutdown"} 0
# HELP irishost_request_duration_seconds Seconds from a request's arrival at the host to its \
answer, whatever the outcome.
# TYPE irishost_request_duration_seconds histogram
irishost_request_duration_seconds_bucket{le="0.001"} 1000
irishost_request_duration_seconds_bucket{le="0.1"} 1500
irishost_request_duration_seconds_bucket{le="10.0"} 1520
irishost_request_duration_seconds_bucket{le="+Inf"} 1530
irishost_request_duration_seconds_sum 17.25
irishost_request_duration_seconds_count 1530
"""

# One sample line: a metric name, an optional label set, a number.
SAMPLE = re.compile(r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-z_]+="[^"\\\n]*"\})? -?[0-9.e+-]+')


def test_render_exact_text():
    assert render(SNAPSHOT) == EXPECTED


def test_render_follows_the_exposition_format():
    """Each family: HELP, then TYPE, then its samples; counters end in _total; no duplicates."""
    text = render(SNAPSHOT)
    assert text.endswith("\n")
    current = None
    seen_series = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = line.split()[2]
            assert current.startswith("irishost_")
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name == current
            assert kind in ("gauge", "counter", "histogram")
            assert name.endswith("_total") == (kind == "counter")
            suffixes = ("_bucket", "_sum", "_count") if kind == "histogram" else ("",)
        else:
            match = SAMPLE.fullmatch(line)
            assert match is not None, line
            assert match["name"] in [current + suffix for suffix in suffixes]
            series = line.rpartition(" ")[0]
            assert series not in seen_series
            seen_series.add(series)


def test_relay_down_and_no_workers():
    text = render({**SNAPSHOT, "relay": {"state": "reconnecting", "port": 1}, "workers": []})
    assert "\nirishost_relay_connected 0\n" in text
    assert "\nirishost_workers_alive 0\n" in text
    assert "{worker=" not in text


@pytest.fixture
def serve():
    """``serve(snapshot)`` starts a MetricsServer on a free port; closed at teardown."""
    servers: list[MetricsServer] = []

    def start(snapshot) -> MetricsServer:
        server = MetricsServer(0, lambda: render(snapshot()), "irishost-metrics")
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def get(port: int, path: str):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)


def test_http_get_metrics(serve):
    server = serve(lambda: SNAPSHOT)
    assert server.port > 0
    with get(server.port, "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        assert response.read().decode() == EXPECTED


def test_http_other_paths_are_404(serve):
    server = serve(lambda: SNAPSHOT)
    for path in ("/", "/metrics/x", "/status"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            get(server.port, path)
        assert caught.value.code == 404


def test_http_failing_snapshot_is_500_and_server_survives(serve):
    server = serve(mock.Mock(side_effect=[KeyError("workers"), SNAPSHOT]))
    with pytest.raises(urllib.error.HTTPError) as caught:
        get(server.port, "/metrics")
    assert caught.value.code == 500
    with get(server.port, "/metrics") as response:
        assert response.read().decode() == EXPECTED


def test_listens_on_loopback_only(serve):
    server = serve(lambda: SNAPSHOT)
    with open("/proc/net/tcp") as table:  # local_address is hex IP:port, little-endian IP
        listening = [line.split()[1] for line in table.readlines()[1:] if line.split()[3] == "0A"]
    assert f"0100007F:{server.port:04X}" in listening
    assert f"00000000:{server.port:04X}" not in listening


def test_request_stats_fill_the_buckets_up_to_their_inclusive_bounds():
    stats = RequestStats()
    for outcome, seconds in [
        (Outcome.OK, 0.00005),
        (Outcome.OK, 0.0001),  # on the bound: in its bucket, as Prometheus's le says
        (Outcome.FAULT, 0.0002),
        (Outcome.WORKER_DIED, 3.0),
        (Outcome.EXPIRED, 60.0),  # above every bound: only in +Inf
    ]:
        stats.record_all(outcome, [seconds])

    snapshot = stats.snapshot()

    buckets = dict(snapshot["durations"]["buckets"])
    assert list(buckets) == list(DURATION_BUCKETS)
    assert (buckets[0.0001], buckets[0.00025], buckets[2.5], buckets[5.0], buckets[10.0]) == (
        2, 3, 3, 4, 4
    )  # fmt: skip
    assert snapshot["durations"]["count"] == 5
    assert snapshot["durations"]["sum"] == pytest.approx(63.0003)
    assert snapshot["failures"] == {
        "fault": 1, "worker_died": 1, "no_room": 0, "expired": 1, "shutdown": 0
    }  # fmt: skip
