"""Handler failures and oversized messages must never cost a service its connection.

Each test runs a real relay (and, for the irishost ones, a real host with
forked workers) and checks one way a careless or unlucky handler used to
take a service down or leave its callers waiting:

- a reply or fault text over the relay's 64 MiB message limit dropped the
  whole connection; outbound messages over it were a ClosedError for that
  call and every later one;
- a BaseException in a broadcast, event or subscription callback killed the
  pool's thread, so a pool of one never ran anything again;
- a fault text that could not be built or encoded sent no answer at all;
- handler exceptions were not logged, and the fault lost the exception type.

The irishost tests run each guarantee for a threaded handler and for its
iris.aio twin, which irishost runs on a worker's event loop
(irishost/async_worker.py); tests/test_aio_hardening.py does the same for
iris.aio services outside irishost.
"""

from __future__ import annotations

import inspect
import logging
import queue
import sys
import threading
import time

import pytest
from irishost_support import wait_for

import iris
from iris import codec, logs

pytest_plugins = ["irishost_fixtures"]

OVERSIZE = codec.MAX_MESSAGE + 1
LIMIT_TEXT = f"{OVERSIZE} bytes exceeds the relay's message limit of {codec.MAX_MESSAGE} bytes"


# What _fail's requests make the caller read.
FAULT_TEXTS = [
    (b"key", "KeyError: 'user'"),
    (b"exit", "SystemExit: 3"),
    (b"interrupt", "KeyboardInterrupt"),
    (b"unprintable", "UnprintableError"),
    (b"surrogates", "ValueError: caf?"),
]


class CustomStop(BaseException):
    """A BaseException of the user's own, outside the Exception tree."""


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


def _fail(command: bytes) -> bytes:
    """The request handler of both the in-process and the irishost tests.

    ``echo:...`` answers the request, ``sleep:<seconds>`` after a while;
    anything else fails one particular way.
    """
    if command.startswith(b"echo"):
        return command
    if command.startswith(b"sleep:"):
        time.sleep(float(command.removeprefix(b"sleep:")))
        return command
    if command == b"big-reply":
        return bytes(OVERSIZE)
    if command == b"big-fault":
        raise ValueError("x" * OVERSIZE)
    if command == b"key":
        return {}["user"]
    if command == b"exit":
        sys.exit(3)
    if command == b"unprintable":
        raise UnprintableError
    if command == b"surrogates":
        raise ValueError(b"caf\xe9".decode("utf-8", "surrogateescape"))
    if command == b"interrupt":
        raise KeyboardInterrupt
    raise AssertionError(f"unknown command {command!r}")


def _raise_for(message: bytes) -> None:
    """Broadcast and event callbacks: raise a BaseException on request."""
    if message == b"system-exit":
        sys.exit(1)
    if message == b"keyboard-interrupt":
        raise KeyboardInterrupt
    if message == b"custom":
        raise CustomStop("custom stop")


class Failing(iris.ServiceHandler):
    def __init__(self):
        self.broadcasts: queue.Queue[bytes] = queue.Queue()

    def handle_request(self, request: bytes) -> bytes:
        return _fail(request)

    def handle_broadcast(self, message: bytes) -> None:
        _raise_for(message)
        self.broadcasts.put(message)


def remote_fault(conn: iris.Connection, cluster: str, request: bytes, timeout=5.0) -> str:
    with pytest.raises(iris.RemoteError) as caught:
        conn.request(cluster, request, timeout)
    return caught.value.fault


@pytest.fixture
def failing(relay, attach):
    """A registered Failing service and a client; (client, handler)."""
    handler = Failing()
    attach.register(relay.port, "failing", handler, iris.ServiceLimits(broadcast_threads=1))
    return attach.connect(relay.port), handler


def handler_errors(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]


# -- sizes are checked before anything is sent ------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (b"big-reply", f"reply of {LIMIT_TEXT}"),
        (b"big-fault", f"fault text of {OVERSIZE + len('ValueError: ')} bytes exceeds"),
    ],
)
def test_an_oversized_answer_is_a_fault_and_the_service_stays(failing, caplog, request_, expected):
    conn, _ = failing
    caplog.set_level(logging.CRITICAL, "iris")  # not 64 MiB of "x" in the test's log

    fault = remote_fault(conn, "failing", request_)

    assert fault.startswith(expected)
    assert fault.endswith(f"exceeds the relay's message limit of {codec.MAX_MESSAGE} bytes")
    assert conn.request("failing", b"echo:still here", 5) == b"echo:still here"


@pytest.mark.parametrize("timeout", ["5", -1.0, float("nan"), float("inf"), True])
def test_a_bad_tunnel_send_timeout_is_a_value_error_and_the_tunnel_stays(relay, attach, timeout):
    class TunnelEcho(iris.ServiceHandler):
        def handle_tunnel(self, tunnel):
            with tunnel:
                tunnel.send(tunnel.recv(10), timeout=10)

    attach.register(relay.port, "tunnel-echo", TunnelEcho())
    conn = attach.connect(relay.port)
    with conn.tunnel("tunnel-echo", 5) as tunnel:
        with pytest.raises(ValueError, match="tunnel send timeout must be None or a number"):
            tunnel.send(b"x", timeout=timeout)
        tunnel.send(b"first", timeout=5)  # nothing was sent before: this is the first message
        assert tunnel.recv(timeout=5) == b"first"


def test_oversized_outbound_messages_are_a_local_value_error(failing):
    conn, handler = failing
    big = bytes(OVERSIZE)
    conn.subscribe("news", lambda event: None)
    with (
        conn.tunnel("failing", 5) as tunnel,
        pytest.raises(ValueError, match=f"tunnel message of {LIMIT_TEXT}"),
    ):
        tunnel.send(big, timeout=5)
    for kind, call in [
        ("request", lambda: conn.request("failing", big, 5)),
        ("message", lambda: conn.broadcast("failing", big)),
        ("event", lambda: conn.publish("news", big)),
    ]:
        with pytest.raises(ValueError, match=f"{kind} of {LIMIT_TEXT}"):
            call()

    # The connection is untouched: calls go on working.
    assert conn.request("failing", b"echo:after", 5) == b"echo:after"
    conn.broadcast("failing", b"after")
    assert handler.broadcasts.get(timeout=5) == b"after"


# -- pools survive whatever user code raises ------------------------------------------------


def test_base_exceptions_in_broadcast_handlers_do_not_kill_the_pool(failing, caplog):
    conn, handler = failing  # broadcast_threads=1: a lost thread would stop the pool
    for message in (b"system-exit", b"keyboard-interrupt", b"custom", b"after"):
        conn.broadcast("failing", message)

    assert handler.broadcasts.get(timeout=5) == b"after"
    raised = [type(r.exc_info[1]) for r in handler_errors(caplog)]
    assert raised == [SystemExit, KeyboardInterrupt, CustomStop]


def test_base_exceptions_in_subscription_callbacks_do_not_kill_the_pool(relay, attach, caplog):
    conn = attach.connect(relay.port)
    seen: queue.Queue[bytes] = queue.Queue()

    def on_event(event: bytes) -> None:
        _raise_for(event)
        seen.put(event)

    class Handler(iris.TopicHandler):
        def handle_event(self, event: bytes) -> None:
            on_event(event)

    conn.subscribe("plain", on_event, iris.TopicLimits(event_threads=1))
    conn.subscribe("handler", Handler(), iris.TopicLimits(event_threads=1))
    for topic in ("plain", "handler"):
        for event in (b"system-exit", b"keyboard-interrupt", b"custom", topic.encode()):
            conn.publish(topic, event)

    assert {seen.get(timeout=5), seen.get(timeout=5)} == {b"plain", b"handler"}
    assert len(handler_errors(caplog)) == 6
    assert all("pool=topic-" in r.getMessage() for r in handler_errors(caplog))


# -- every failure is answered, typed and logged ---------------------------------------------


@pytest.mark.parametrize(("request_", "expected"), FAULT_TEXTS)
def test_a_failed_request_is_answered_with_type_and_text(failing, request_, expected):
    conn, _ = failing

    assert remote_fault(conn, "failing", request_, timeout=2) == expected
    assert conn.request("failing", b"echo", 5) == b"echo"


def test_handler_exceptions_are_logged_with_traceback_and_cluster(failing, caplog):
    conn, _ = failing
    remote_fault(conn, "failing", b"key")

    [record] = handler_errors(caplog)
    assert "request handler raised" in record.getMessage()
    assert "cluster=failing" in record.getMessage()
    assert isinstance(record.exc_info[1], KeyError)
    assert "in _fail" in logging.Formatter().format(record)  # the traceback reaches the handler


def test_handler_exception_logging_is_rate_limited(failing, caplog):
    conn, _ = failing
    for _ in range(25):
        remote_fault(conn, "failing", b"key")

    assert len(handler_errors(caplog)) == 10  # HandlerErrorLog's default burst


def test_the_rate_limited_log_reports_what_it_left_out(caplog):
    log = logs.HandlerErrorLog(logs.ContextLog().new(cluster="c"), burst=2, interval=0.5)
    caplog.set_level(logging.ERROR, "iris")
    for number in range(5):
        log("request handler raised", ValueError(number))
    time.sleep(0.55)  # into the next interval
    log("request handler raised", ValueError("next interval"))

    messages = [r.getMessage() for r in caplog.records]
    assert len(handler_errors(caplog)) == 3
    assert messages[2].startswith("handler exceptions not logged: over the limit cluster=c")
    assert "count=3" in messages[2]


def test_many_threads_failing_at_once_all_get_their_fault(failing):
    conn, _ = failing
    faults: list[str] = []

    def call():
        faults.append(remote_fault(conn, "failing", b"unprintable"))

    threads = [threading.Thread(target=call) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert faults == ["UnprintableError"] * 20


# -- the same under irishost --------------------------------------------------------------------

HOSTED_HANDLER = f'''
"""Written by tests/test_binding_hardening.py."""

import asyncio
import json
import os
import sys
import time

import iris
import iris.aio

OVERSIZE = {OVERSIZE}
HERE = os.path.dirname(os.path.abspath(__file__))


class CustomStop(BaseException):
    pass


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("__str__ is broken too")


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
    (service.dir / "hardening.py").write_text(HOSTED_HANDLER + "\n\n" + _source(_fail, _raise_for))
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

    log = wait_for(lambda: "Traceback" in host.log() and host.log())
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
    assert host.log().count("Traceback") == 6
