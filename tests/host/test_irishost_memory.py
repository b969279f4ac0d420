"""What a worker's memory costs the machine (issue 19, items 3 and 4), on real
processes: a preloaded structure stays shared after the workers' garbage
collector has run (``workers.gc_freeze``), ``irishost status`` and the metrics
show private (USS) and proportional (PSS) memory beside RSS, and
``limits.max_private`` recycles by private memory, not by shared pages.

The handler (``HANDLER``) builds 100 MB of small containers at import, the
objects CPython's collector writes to, and runs a full collection in ``init``,
as a worker's first automatic one would.
"""

from __future__ import annotations

import json
import re
import urllib.request

import pytest
from production_support import status_json
from support import free_port, gone, wait_for

HANDLER = '''"""Written by tests/host/test_irishost_memory.py."""

import gc
import json
import os

import iris


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_before = resident()
# About 100 MB: a list and a string per entry, all reached by the collector.
TABLE = {str(i): [i, str(i)] for i in range(370_000)}
SIZE = resident() - _before
_hoard = []


class Handler(iris.ServiceHandler):
    def init(self, conn):
        gc.collect()

    def handle_request(self, request):
        command, _, argument = request.decode().partition(":")
        if command == "alloc":  # written bytes, so the pages are resident and private
            _hoard.append(b"x" * (int(argument) * 2**20))
        state = {"pid": os.getpid(), "size": SIZE, "collecting": gc.isenabled()}
        return json.dumps({**state, "frozen": gc.get_freeze_count()}).encode()
'''
MiB = 2**20


def serve_preloaded(service, **tables: dict) -> None:
    (service.dir / "preloaded.py").write_text(HANDLER)
    service.config(service={"handler": "preloaded:Handler"}, **tables)


def ask(service, request: bytes = b"state") -> dict:
    answer: dict = json.loads(service.request(request, timeout=10))
    return answer


def only_worker(service) -> dict:
    (worker,) = status_json(service)["workers"]
    return worker  # type: ignore[no-any-return]


@pytest.mark.parametrize("freeze", [True, False])
def test_a_preloaded_structure_stays_shared_after_the_worker_collects_only_when_frozen(
    service, freeze
):
    serve_preloaded(service, workers={"count": 1, "preload": True, "gc_freeze": freeze})
    service.start()

    state = ask(service)
    worker = only_worker(service)

    assert state["collecting"]  # the worker's collector runs either way
    size = state["size"]
    assert size > 80 * MiB
    assert worker["rss"] > size  # the structure is resident in the worker either way
    if freeze:
        assert state["frozen"] > 370_000
        assert worker["uss"] < 0.2 * size, (worker, size)
    else:
        assert state["frozen"] == 0
        assert worker["uss"] > 0.5 * size, (worker, size)


def test_status_json_and_metrics_show_private_and_proportional_memory_beside_rss(service):
    port = free_port()
    service.config(workers={"count": 2}, metrics={"port": port})
    host = service.start()
    host.worker_count(2)

    workers = status_json(service)["workers"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        metrics = response.read().decode()

    for worker in workers:
        # Each worker shares the interpreter's pages with its sibling and the fork server.
        assert 0 < worker["uss"] < worker["pss"] < worker["rss"], worker
    for kind in ("rss", "uss", "pss"):
        for slot in (0, 1):
            series = rf'^irishost_worker_{kind}_bytes{{worker="{slot}"}} (\d+)$'
            assert int(re.search(series, metrics, re.M)[1]) > 0, metrics


def test_max_private_recycles_by_private_memory_not_by_shared_pages(service):
    serve_preloaded(
        service,
        workers={"count": 1, "preload": True},
        limits={"max_private": "60MiB", "max_rss_kill_factor": 3},  # recycled, not killed
    )
    host = service.start()
    first = ask(service)["pid"]
    # Resident far beyond max_private (the preloaded structure), private well below it:
    # the supervisor reads its private memory several times a second, and keeps it.
    wait_for(lambda: only_worker(service)["uptime"] > 1.0, what="a second of checks")
    worker = only_worker(service)
    assert worker["rss"] > 100 * MiB and worker["uss"] < 40 * MiB, worker
    assert "recycling worker" not in host.log()

    assert ask(service, b"alloc:60")["pid"] == first

    host.wait_log("recycling worker", timeout=10)
    (line,) = [line for line in host.log().splitlines() if "recycling worker" in line]
    assert f"pid={first}" in line and "is over max_private" in line, line
    assert wait_for(lambda: gone(first), what="the recycled worker to exit")
    assert ask(service)["pid"] != first
