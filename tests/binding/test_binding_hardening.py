"""Handler failures and oversized messages must never cost a service its connection.

Each test runs a real relay and checks one way a careless or unlucky handler used to
take a service down or leave its callers waiting:

- a reply or fault text over the relay's 64 MiB message limit dropped the
  whole connection; outbound messages over it were a ClosedError for that
  call and every later one;
- a BaseException in a broadcast, event or subscription callback killed the
  pool's thread, so a pool of one never ran anything again;
- a fault text that could not be built or encoded sent no answer at all;
- handler exceptions were not logged, and the fault lost the exception type.

The handler's failures are in failing_handler.py;
host/test_irishost_handler_hardening.py runs the same guarantees under
irishost, test_aio_hardening.py for iris.aio services.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest
from failing_handler import (
    FAULT_TEXTS,
    LIMIT_TEXT,
    OVERSIZE,
    CustomStop,
    _fail,
    _raise_for,
    handler_errors,
    remote_fault,
)

import iris
from iris import codec, logs


class Failing(iris.ServiceHandler):
    def __init__(self):
        self.broadcasts: queue.Queue[bytes] = queue.Queue()

    def handle_request(self, request: bytes) -> bytes:
        return _fail(request)

    def handle_broadcast(self, message: bytes) -> None:
        _raise_for(message)
        self.broadcasts.put(message)


@pytest.fixture
def failing(relay, attach):
    """A registered Failing service and a client; (client, handler)."""
    handler = Failing()
    attach.register(relay.port, "failing", handler, iris.ServiceLimits(broadcast_threads=1))
    return attach.connect(relay.port), handler


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
