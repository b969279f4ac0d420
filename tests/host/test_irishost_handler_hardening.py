"""Handler failures and oversized messages under irishost: the guarantees of
binding/test_binding_hardening.py, for a threaded handler and for its iris.aio
twin, which irishost runs on a worker's event loop (irishost/async_worker.py).

The workers run the source of failing_handler.py's ``_fail`` and ``_raise_for``
and of the exceptions they raise.
"""

from __future__ import annotations

import inspect

import pytest
from failing_handler import (
    FAULT_TEXTS,
    LIMIT_TEXT,
    OVERSIZE,
    CustomStop,
    UnprintableError,
    _fail,
    _raise_for,
    remote_fault,
)
from support import wait_for

HOSTED_HANDLER = f'''
"""Written by tests/host/test_irishost_handler_hardening.py."""

import asyncio
import json
import os
import sys
import time

import iris
import iris.aio

OVERSIZE = {OVERSIZE}
HERE = os.path.dirname(os.path.abspath(__file__))


def record(*values):
    with open(os.path.join(HERE, "records.jsonl"), "a") as out:
        out.write(json.dumps(values) + "\\n")


def answer(request):
    if request == b"pid":
        return str(os.getpid()).encode()
    if request == b"ping":
        return b"pong"
    return _fail(request)


def on_broadcast(message):
    _raise_for(message)
    record("broadcast", message.decode())


def on_event(topic, event):
    _raise_for(event)
    record("event", event.decode())


class Handler(iris.ServiceHandler):
    def handle_request(self, request):
        return answer(request)

    def handle_broadcast(self, message):
        on_broadcast(message)

    def handle_event(self, topic, event):
        on_event(topic, event)

    def handle_tunnel(self, tunnel):
        """Try to send an oversized message; answer what that raised."""
        with tunnel:
            tunnel.recv(10)
            try:
                tunnel.send(bytes(OVERSIZE), timeout=10)
                outcome = b"sent"
            except ValueError as err:
                outcome = str(err).encode()
            tunnel.send(outcome, timeout=10)


class AsyncHandler(iris.aio.ServiceHandler):
    """Handler as coroutines, which irishost runs on a worker's event loop."""

    async def handle_request(self, request):
        if request.startswith(b"sleep:"):  # on the loop's timers: others run meanwhile
            await asyncio.sleep(float(request.removeprefix(b"sleep:")))
            return request
        await asyncio.sleep(0)
        return answer(request)

    async def handle_broadcast(self, message):
        await asyncio.sleep(0)
        on_broadcast(message)

    def handle_event(self, topic, event):  # a plain method: it runs on the loop too
        on_event(topic, event)

    async def handle_tunnel(self, tunnel):
        async with tunnel:
            await tunnel.recv(10)
            try:
                await tunnel.send(bytes(OVERSIZE), timeout=10)
                outcome = b"sent"
            except ValueError as err:
                outcome = str(err).encode()
            await tunnel.send(outcome, timeout=10)
'''


def _source(*functions) -> str:
    return "\n\n".join(inspect.getsource(function) for function in functions)


@pytest.fixture(params=["Handler", "AsyncHandler"], ids=["threads", "asyncio"])
def hosted(service, request):
    """irishost running the failing handler in one worker: one thread (or
    coroutine, for the iris.aio handler) for broadcasts and one for events
    (the defaults), two for requests."""
    (service.dir / "hardening.py").write_text(
        HOSTED_HANDLER + "\n\n" + _source(CustomStop, UnprintableError, _fail, _raise_for)
    )
    service.config(
        [{"name": "hardening-news"}],
        service={"handler": f"hardening:{request.param}"},
        limits={"request_threads": 2},
    )
    return service, service.start()


def test_under_irishost_an_oversized_reply_is_a_fault_and_nothing_is_lost(hosted):
    service, host = hosted
    pid = service.request(b"pid")
    slow = service.request_async(b"sleep:1")  # in flight meanwhile: it must not be lost

    fault = remote_fault(service.conn, service.cluster, b"big-reply", timeout=10)

    assert fault.startswith("reply") and LIMIT_TEXT in fault
    assert slow.result(10) == b"sleep:1"
    assert service.request(b"pid") == pid  # same worker, same relay connection
    assert "relay connection dropped" not in host.log()


def test_under_irishost_an_oversized_tunnel_message_is_a_value_error_in_the_handler(hosted):
    service, host = hosted
    with service.conn.tunnel(service.cluster, 5) as tunnel:
        tunnel.send(b"go")
        outcome = tunnel.recv(timeout=10)

    assert outcome[:200].decode(errors="replace") == f"tunnel message of {LIMIT_TEXT}"
    assert service.request(b"echo:after") == b"echo:after"


@pytest.mark.parametrize(("request_", "expected"), FAULT_TEXTS)
def test_under_irishost_a_failed_request_is_answered_with_type_and_text(hosted, request_, expected):
    service, host = hosted
    pid = service.request(b"pid")

    assert remote_fault(service.conn, service.cluster, request_, timeout=2) == expected
    assert service.request(b"pid") == pid  # the worker was not replaced


def test_under_irishost_handler_exceptions_are_logged_with_service_and_worker(hosted):
    service, host = hosted
    remote_fault(service.conn, service.cluster, b"key")

    log = host.wait_log("Traceback")
    line = next(line for line in log.splitlines() if "request handler raised" in line)
    assert "ERROR" in line and f"service={service.cluster} worker=0" in line
    assert "in _fail" in log and "KeyError: 'user'" in log


def test_under_irishost_base_exceptions_in_callbacks_do_not_stop_the_worker(hosted):
    service, host = hosted
    for message in (b"system-exit", b"keyboard-interrupt", b"custom", b"after"):
        service.conn.broadcast(service.cluster, message)
        service.conn.publish("hardening-news", message)

    wait_for(lambda: len(service.records()) == 2, what="the broadcast and event after")
    assert sorted(map(tuple, service.records())) == [("broadcast", "after"), ("event", "after")]
    # The worker's log writer writes its lines a moment after they are logged.
    wait_for(lambda: host.log().count("Traceback") >= 6, what="the six tracebacks")
    assert host.log().count("Traceback") == 6
