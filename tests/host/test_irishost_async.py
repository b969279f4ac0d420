"""irishost hosting an iris.aio handler: coroutines on an event loop in each worker.

The handler (async_probe.py, copied next to the config as aprobe.py)
runs in real forked workers behind a real embedded relay; the tests drive it
with plain threaded ``iris`` clients, as any caller would. Handler failures
(oversized replies, BaseExceptions, logged tracebacks) are tested for async
handlers with the threaded ones, in test_irishost_handler_hardening.py.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from support import gone, wait_for

import iris

ASYNC_PROBE = Path(__file__).resolve().parent / "async_probe.py"


def async_config(service, **tables) -> None:
    shutil.copy(ASYNC_PROBE, service.dir / "aprobe.py")
    service.config(service={"handler": "aprobe:AsyncProbe"}, **tables)


def test_an_async_handler_answers_from_every_worker_with_its_own_aio_connection(service):
    async_config(service, workers={"count": 2})
    host = service.start()
    replies = [service.request_async(b"peak:0.05") for _ in range(8)]
    pids = {json.loads(reply.result(10))[0] for reply in replies}

    assert pids == {worker.pid for worker in host.worker_count(2)}
    assert service.request(b"conn") == b"iris.aio.connection"
    with pytest.raises(iris.RemoteError, match="async handler refused"):
        service.request(b"fail")


def test_request_threads_caps_concurrent_coroutines_in_a_worker(service):
    async_config(service, limits={"request_threads": 3})
    service.start()
    replies = [service.request_async(b"peak:0.3") for _ in range(9)]

    peaks = {json.loads(reply.result(10))[1] for reply in replies}

    assert max(peaks) == 3


def test_broadcasts_and_events_reach_async_handlers(service):
    async_config(service, topics=[{"name": "news"}])
    host = service.start()
    service.conn.broadcast(service.cluster, b"hello")
    publisher = service.connect()

    def seen() -> list:
        publisher.publish("news", b"story")  # until the host's subscription is in place
        return json.loads(service.request(b"seen"))

    found = wait_for(lambda: "event:news:story" in (s := seen()) and s, what="the event")
    assert "broadcast:hello" in found, host.log()  # once seen lost in a full run: say why


def test_a_tunnel_to_an_async_handler_carries_large_messages_both_ways(service):
    async_config(service)
    service.start()
    large = random.Random(11).randbytes(4 * 1024 * 1024)

    with service.conn.tunnel(service.cluster, 5) as tunnel:
        tunnel.send(b"small")
        assert tunnel.recv(5) == b"small"
        tunnel.send(large, timeout=10)
        assert tunnel.recv(10) == large


def test_sigterm_lets_running_coroutines_finish_then_exits_zero(service):
    async_config(service)
    host = service.start()
    worker = host.worker_count(1)[0].pid
    held = service.request_async(b"peak:0.5")
    time.sleep(0.2)  # the request is on its way to, or in, the worker's handler

    assert host.stop() == 0, host.log()
    assert json.loads(held.result(5))[0] == worker
    assert gone(worker)
