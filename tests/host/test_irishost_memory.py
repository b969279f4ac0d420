"""What a worker's memory costs the machine (issue 19, items 3 and 4), on real
processes: ``irishost status`` and the metrics show private (USS) and
proportional (PSS) memory beside RSS.
"""

from __future__ import annotations

import json
import re
import urllib.request

from support import free_port


def status_json(service) -> dict:
    result = service.run("status", "--json", timeout=15)
    assert result.returncode == 0, result.stderr
    snapshot: dict = json.loads(result.stdout)
    return snapshot


def test_status_and_metrics_show_private_and_proportional_memory_beside_rss(service):
    port = free_port()
    service.config(workers={"count": 2}, metrics={"port": port})
    host = service.start()
    host.worker_count(2)

    workers = status_json(service)["workers"]
    text = service.run("status").stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()

    for worker in workers:
        # Each worker shares the interpreter's pages with its sibling and the fork server.
        assert 0 < worker["uss"] < worker["pss"] < worker["rss"], worker
    assert re.search(r"^WORKER +PID +STATE +SERVED +IN FLIGHT +RSS +USS +PSS +RESTARTS", text, re.M)
    for kind in ("rss", "uss", "pss"):
        for slot in (0, 1):
            series = rf'^irishost_worker_{kind}_bytes{{worker="{slot}"}} (\d+)$'
            assert int(re.search(series, metrics, re.M)[1]) > 0, metrics

