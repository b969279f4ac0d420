"""irishost hosting an iris.aio handler: coroutines on an event loop in each worker.

The handler (irishost_async_probe.py, copied next to the config as aprobe.py)
runs in real forked workers behind a real embedded relay; the tests drive it
with plain threaded ``iris`` clients, as any caller would.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import pytest
from irishost_support import gone, wait_for
from test_binding_hardening import FAULT_TEXTS, LIMIT_TEXT, remote_fault, write_hardening_module

import iris

pytest_plugins = ["irishost_fixtures"]

ASYNC_PROBE = Path(__file__).resolve().parent / "irishost_async_probe.py"


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
    service.start()
    service.conn.broadcast(service.cluster, b"hello")
    publisher = service.connect()

    def seen() -> list:
        publisher.publish("news", b"story")  # until the host's subscription is in place
        return json.loads(service.request(b"seen"))

    found = wait_for(lambda: "event:news:story" in (s := seen()) and s, what="the event")
    assert "broadcast:hello" in found


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

    assert host.stop() == 0
    assert json.loads(held.result(5))[0] == worker
    assert gone(worker)


# -- handler failures: the guarantees of tests/test_binding_hardening.py, for coroutines ------

ASYNC_FAILING = '''
"""Written by tests/test_irishost_async.py: hardening.py's failures, as coroutines."""

import asyncio
import os

import iris.aio
from hardening import _fail, _raise_for, record


class AsyncFailing(iris.aio.ServiceHandler):
    async def handle_request(self, request):
        if request == b"pid":
            return str(os.getpid()).encode()
        if request == b"ping":
            return b"pong"
        if request.startswith(b"nap:"):
            await asyncio.sleep(float(request[4:]))
            return request
        await asyncio.sleep(0)
        return _fail(request)

    async def handle_broadcast(self, message):
        await asyncio.sleep(0)
        _raise_for(message)
        record("broadcast", message.decode())

    def handle_event(self, topic, event):  # a plain method: it runs on the loop too
        _raise_for(event)
        record("event", event.decode())

    async def handle_tunnel(self, tunnel):
        _raise_for(await tunnel.recv(10))
        await tunnel.send(b"survived")
        await tunnel.close()
'''

RAISING = (b"system-exit", b"keyboard-interrupt", b"custom")


@pytest.fixture
def hosted_async(service):
    """irishost running AsyncFailing in one worker: one coroutine at a time for
    broadcasts and events (the defaults), two for requests."""
    write_hardening_module(service.dir)
    (service.dir / "ahardening.py").write_text(ASYNC_FAILING)
    service.config(
        [{"name": "hardening-news"}],
        service={"handler": "ahardening:AsyncFailing"},
        limits={"request_threads": 2},
    )
    return service, service.start()


def test_an_oversized_async_reply_is_a_fault_and_nothing_is_lost(hosted_async):
    service, host = hosted_async
    pid = service.request(b"pid")
    napping = service.request_async(b"nap:1")  # in flight meanwhile: it must not be lost

    fault = remote_fault(service.conn, service.cluster, b"big-reply", timeout=10)

    assert fault.startswith("reply") and LIMIT_TEXT in fault
    assert napping.result(10) == b"nap:1"
    assert service.request(b"pid") == pid  # same worker, same relay connection
    assert "relay connection dropped" not in host.log()


@pytest.mark.parametrize(("request_", "expected"), FAULT_TEXTS)
def test_a_failed_async_request_is_answered_with_type_and_text(hosted_async, request_, expected):
    service, host = hosted_async
    pid = service.request(b"pid")

    assert remote_fault(service.conn, service.cluster, request_, timeout=2) == expected
    assert service.request(b"pid") == pid  # the worker was not replaced


def test_async_handler_exceptions_are_logged_with_service_and_worker(hosted_async):
    service, host = hosted_async
    remote_fault(service.conn, service.cluster, b"key")

    log = wait_for(lambda: "Traceback" in host.log() and host.log())
    line = next(line for line in log.splitlines() if "request handler raised" in line)
    assert "ERROR" in line and f"service={service.cluster} worker=0" in line
    assert "in _fail" in log and "KeyError: 'user'" in log


def test_base_exceptions_in_async_callbacks_do_not_stop_the_worker(hosted_async):
    service, host = hosted_async
    pid = service.request(b"pid")
    for message in (*RAISING, b"after"):
        service.conn.broadcast(service.cluster, message)
        service.conn.publish("hardening-news", message)
    for message in RAISING:
        with service.conn.tunnel(service.cluster, 5) as tunnel:
            tunnel.send(message)
            with pytest.raises(iris.ClosedError):
                tunnel.recv(5)  # the raising handler's tunnel was closed for it

    wait_for(lambda: len(service.records()) == 2, what="the broadcast and event after")
    assert sorted(map(tuple, service.records())) == [("broadcast", "after"), ("event", "after")]
    with service.conn.tunnel(service.cluster, 5) as tunnel:
        tunnel.send(b"fine")
        assert tunnel.recv(5) == b"survived"
    assert service.request(b"pid") == pid
    log = wait_for(lambda: host.log().count("Traceback") == 9 and host.log())
    assert log.count("tunnel handler raised") == 3
