"""The relay's Prometheus metrics (iris/relay/metrics.py), scraped from real relays.

- ``--metrics-port`` serves the status socket's numbers as Prometheus text on
  GET /metrics of 127.0.0.1, 404 elsewhere, and announces its URL in the log.
- Cluster and topic names are escaped in label values.
- A taken port is one ERROR line; the relay serves without metrics.
- A bad port exits 2 naming the flag.
- A loop that does not answer is a 503, not a hung scrape, and stopping the
  relay closes the port.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from support import wait_for

import iris
from iris.prometheus import CONTENT_TYPE
from iris.relay import RelayServer, server
from iris.relay.metrics import render

_ANNOUNCED = re.compile(r"INFO iris\.relay: metrics on http://127\.0\.0\.1:(\d+)/metrics$", re.M)


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


def scrape(port: int, path: str = "/metrics") -> tuple[str, str]:
    """The body and content type of GET ``path``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


def samples(text: str) -> dict[str, str]:
    """Each sample line's series (name and labels) and value; HELP and TYPE left out."""
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    return dict(line.rsplit(" ", 1) for line in lines)


def metrics_port(relay) -> int:
    """The port the relay announced in its log (written from its log thread, so polled)."""
    match = wait_for(lambda: _ANNOUNCED.search(relay.log()), what="the metrics URL in the log")
    return int(match[1])


def test_metrics_count_members_subscribers_and_traffic(relay_factory, attach):
    relay = relay_factory("--metrics-port", "0")
    port = metrics_port(relay)
    attach.register(relay.port, "echo", Echo())
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    conn.subscribe("news", lambda event: None)
    assert conn.request("echo", b"x" * 1000, 5) == b"x" * 1000  # every SUBSCRIBE is routed

    text, content_type = scrape(port)

    assert content_type == CONTENT_TYPE
    values = samples(text)
    assert values['iris_relay_members{cluster="echo"}'] == "2"
    assert values['iris_relay_subscribers{topic="news"}'] == "1"
    assert values["iris_relay_clusters"] == "1" and values["iris_relay_topics"] == "1"
    assert values["iris_relay_connections"] == "3"
    assert values["iris_relay_pending_requests"] == "0"
    assert int(values["iris_relay_received_bytes_total"]) > 2000
    assert int(values["iris_relay_sent_bytes_total"]) > 2000
    assert float(values["iris_relay_uptime_seconds"]) > 0
    assert "# TYPE iris_relay_received_packets_total counter" in text.splitlines()
    for path in ("/", "/metrics/x", "/status"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            scrape(port, path)
        assert caught.value.code == 404


def test_label_values_are_escaped():
    snapshot = {
        "version": "1", "uptime": 1.5, "connections": 1, "pending": 0,
        "clusters": {'say "hi"\\\n': 1}, "topics": {"plain": 2},
        "in_msgs": 0, "in_bytes": 0, "out_msgs": 0, "out_bytes": 0,
        "slow_consumers": 0, "partial_bytes": 0, "partial_budget": 1,
        "slow_consumer_causes": {"write_deadline": 0}, "unsent_bytes": 0, "outbound_budget": 1,
        "refusals": {"serve": 0, "send": 3},
    }  # fmt: skip
    lines = render(snapshot).splitlines()
    assert 'iris_relay_members{cluster="say \\"hi\\"\\\\\\n"} 1' in lines
    assert 'iris_relay_subscribers{topic="plain"} 2' in lines
    assert 'iris_relay_slow_consumers_total{cause="write_deadline"} 0' in lines


def test_a_taken_metrics_port_is_one_error_and_the_relay_serves(relay_factory, attach):
    with socket.socket() as squatter:  # another local user got there first
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        relay = relay_factory("--metrics-port", str(port))

        attach.register(relay.port, "echo", Echo())
        assert attach.connect(relay.port).request("echo", b"served", 5) == b"served"
        errors = wait_for(
            lambda: [line for line in relay.log().splitlines() if " ERROR " in line],
            what="the ERROR line",
        )
    assert len(errors) == 1, relay.log()
    assert errors[0].endswith(
        f"ERROR iris.relay: metrics not served: port {port} unavailable: "
        "Address already in use; the relay serves without them"
    )
    assert "Traceback" not in relay.log() and not _ANNOUNCED.search(relay.log())


@pytest.mark.parametrize("value", ["-1", "65536", "9e3", "http", ""])
def test_a_bad_metrics_port_exits_2_naming_the_flag(value):
    done = subprocess.run(
        [sys.executable, "-m", "iris.relay", "--port", "0", "--metrics-port", value],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "argument --metrics-port: expected a TCP port from 0 to 65535" in done.stderr


def test_a_loop_that_does_not_answer_is_503_and_stop_closes_the_port(monkeypatch):
    monkeypatch.setattr(server, "SNAPSHOT_WAIT_SECONDS", 0.2)
    relay = RelayServer(0, metrics_port=0)  # never served: its loop never answers
    try:
        port = relay.metrics_port
        assert port is not None
        with pytest.raises(urllib.error.HTTPError) as caught:
            scrape(port)
        assert caught.value.code == 503
    finally:
        relay.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
