"""The binding (iris.connect / iris.register) against a real relay process."""

from __future__ import annotations

import builtins
import itertools
import logging
import queue
import re
import threading
import time

import pytest
from support import OneShotServer, echo_tunnel, timed, wait_for

import iris
from iris import codec, logs

MiB = 1 << 20
# Slack for "arrives at about the timeout" on a loaded two-core machine.
LATE = 0.3


class Echo(iris.ServiceHandler):
    def __init__(self):
        self.requests: list[bytes] = []
        self.broadcasts: queue.Queue[bytes] = queue.Queue()

    def handle_request(self, request: bytes) -> bytes:
        self.requests.append(request)
        return request

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.put(message)

    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        echo_tunnel(tunnel)


class Gate(iris.ServiceHandler):
    """Requests block until ``release`` is set; tracks how many run at once."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.seen: list[bytes] = []
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()

    def handle_request(self, request: bytes) -> bytes:
        with self._lock:
            self.seen.append(request)
            self.running += 1
            self.peak = max(self.peak, self.running)
        self.entered.release()
        try:
            if self.delay:
                time.sleep(self.delay)
            else:
                self.release.wait(10)
            return request
        finally:
            with self._lock:
                self.running -= 1


class Inbox:
    """A topic callback that queues events; usable as a plain callable.

    Probes (see :func:`subscribed`) are kept apart from the events a test
    checks, since every subscriber of a topic receives every probe.
    """

    def __init__(self):
        self.events: queue.Queue[bytes] = queue.Queue()
        self._probes: set[bytes] = set()
        self._cond = threading.Condition()

    def __call__(self, event: bytes) -> None:
        if event.startswith(PROBE):
            with self._cond:
                self._probes.add(event)
                self._cond.notify_all()
        else:
            self.events.put(event)

    def get(self, timeout: float = 5.0) -> bytes:
        return self.events.get(timeout=timeout)

    def assert_empty(self, wait: float = 0.2) -> None:
        with pytest.raises(queue.Empty):
            self.events.get(timeout=wait)

    def wait_probe(self, probe: bytes) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: probe in self._probes, 5)


PROBE = b"probe-"
_probes = itertools.count()


def subscribed(conn: iris.Connection, topic: str, handler, inbox: Inbox) -> None:
    """Subscribe and wait until the relay has the subscription.

    The probe is published on the same connection, so the relay sees it after
    the SUBSCRIBE; its arrival proves events from anyone now reach us.
    """
    conn.subscribe(topic, handler)
    probe = PROBE + b"%d" % next(_probes)
    conn.publish(topic, probe)
    inbox.wait_probe(probe)


# ---------------------------------------------------------------------------
# Connecting and closing.


def test_connect_and_close(relay):
    conn = iris.connect(relay.port)
    assert not conn.closed
    conn.close()
    assert conn.closed
    conn.close()  # idempotent


def test_context_managers(relay, attach):
    echo = Echo()
    with iris.register(relay.port, "echo", echo) as service, iris.connect(relay.port) as conn:
        assert conn.request("echo", b"ping", 1) == b"ping"
    assert conn.closed and service.conn.closed
    other = attach.connect(relay.port)
    with pytest.raises(iris.TimeoutError):  # the cluster left with the service
        other.request("echo", b"anyone?", 0.1)
    assert echo.requests == [b"ping"]


def test_connect_without_relay_fails(relay_factory):
    relay = relay_factory()
    port = relay.port
    assert relay.stop() == 0
    with pytest.raises(ConnectionRefusedError, match=str(port)):
        iris.connect(port)


def test_denied_connection_raises_with_reason():
    """A relay that answers INIT with DENY: the binding surfaces the reason."""
    server = OneShotServer(codec.Deny("protocol version mismatch: relay speaks v9").encode())
    with server, pytest.raises(ConnectionRefusedError, match="relay speaks v9"):
        iris.connect(server.port)


# ---------------------------------------------------------------------------
# Request/reply.


def test_request_reply(relay, attach):
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    assert conn.request("echo", b"hello", 1) == b"hello"
    payload = bytes(range(256)) * 4096  # 1 MiB, not all alike
    assert conn.request("echo", payload, 5) == payload
    assert conn.request("echo", bytearray(b"ba"), 1) == b"ba"


class Faulty(iris.ServiceHandler):
    def handle_request(self, request: bytes):
        if request == b"raise":
            raise ValueError("bad input 42")
        if request == b"bare":
            raise RuntimeError
        if request == b"str":
            return "not bytes"
        return None


def test_remote_error_carries_fault_text(relay, attach):
    attach.register(relay.port, "faulty", Faulty())
    conn = attach.connect(relay.port)
    with pytest.raises(iris.RemoteError) as info:
        conn.request("faulty", b"raise", 1)
    assert info.value.fault == "ValueError: bad input 42"
    assert str(info.value) == "ValueError: bad input 42"
    with pytest.raises(iris.RemoteError) as bare:
        conn.request("faulty", b"bare", 1)
    assert bare.value.fault == "RuntimeError"  # no text: the type alone names it


@pytest.mark.parametrize("request_, returned", [(b"str", "str"), (b"none", "NoneType")])
def test_handler_returning_non_bytes_is_a_remote_error(relay, attach, request_, returned):
    attach.register(relay.port, "faulty", Faulty())
    conn = attach.connect(relay.port)
    with pytest.raises(iris.RemoteError, match=f"returned {returned}, not bytes"):
        conn.request("faulty", request_, 1)


def test_timeout_error_is_the_builtin_kind():
    assert issubclass(iris.TimeoutError, builtins.TimeoutError)


def test_the_binding_reports_every_failure_as_an_iris_error(relay, attach):
    """One ``except iris.Error`` catches timeouts, closed connections and remote
    faults alike, but not the caller's own argument mistakes."""
    assert all(
        issubclass(kind, iris.Error)
        for kind in (iris.TimeoutError, iris.ClosedError, iris.RemoteError)
    )
    assert not issubclass(ValueError, iris.Error)
    conn = attach.connect(relay.port)
    with pytest.raises(iris.Error):
        conn.request("nobody", b"x", 0.01)
    conn.close()
    with pytest.raises(iris.Error):
        conn.publish("news", b"x")


def test_request_without_members_times_out_at_the_timeout(relay, attach):
    conn = attach.connect(relay.port)
    err, took = timed(conn.request, "nobody", b"x", 0.3)
    assert isinstance(err, iris.TimeoutError) and isinstance(err, builtins.TimeoutError)
    assert 0.29 <= took < 0.3 + LATE


def test_slow_handler_times_out_at_the_timeout(relay, attach):
    gate = Gate()
    attach.register(relay.port, "slow", gate)
    conn = attach.connect(relay.port)
    err, took = timed(conn.request, "slow", b"x", 0.3)
    assert isinstance(err, iris.TimeoutError)
    assert 0.29 <= took < 0.3 + LATE
    assert gate.seen == [b"x"]  # it did reach the handler
    gate.release.set()


def test_local_argument_errors(relay, attach):
    """Rejected before anything is sent: the member never sees them."""
    echo = Echo()
    attach.register(relay.port, "echo", echo)
    conn = attach.connect(relay.port)
    bad_calls = [
        lambda: conn.request("", b"x", 1),
        lambda: conn.request("echo", b"", 1),
        lambda: conn.request("echo", "text", 1),
        lambda: conn.request("echo", b"x", 0.0009),
        lambda: conn.request("echo", b"x", 0),
        lambda: conn.request("echo", b"x", -1),
        lambda: conn.request("echo", b"x", None),
        lambda: conn.broadcast("", b"x"),
        lambda: conn.broadcast("echo", b""),
        lambda: conn.publish("", b"x"),
        lambda: conn.publish("topic", b""),
        lambda: conn.subscribe("", lambda event: None),
        lambda: conn.subscribe("topic", "not callable"),
        lambda: conn.unsubscribe("never-subscribed"),
        lambda: conn.tunnel("", 1),
        lambda: conn.tunnel("echo", 0.0005),
        lambda: iris.register(relay.port, "", Echo()),
        lambda: iris.register(relay.port, "echo", object()),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
    assert conn.request("echo", b"x", 1) == b"x"
    assert echo.requests == [b"x"]
    assert echo.broadcasts.empty()


def test_closing_fails_pending_calls_and_later_calls(relay, attach):
    gate = Gate()
    attach.register(relay.port, "slow", gate)
    conn = iris.connect(relay.port)
    results: queue.Queue = queue.Queue()

    def call():
        results.put(timed(conn.request, "slow", b"x", 10))

    caller = threading.Thread(target=call)
    caller.start()
    assert gate.entered.acquire(timeout=5)  # the request is pending at the member
    conn.close()
    err, took = results.get(timeout=5)
    caller.join()
    assert isinstance(err, iris.ClosedError)
    assert took < 5  # ended by the close, not by its 10 s timeout
    for later in (
        lambda: conn.request("slow", b"x", 1),
        lambda: conn.broadcast("slow", b"x"),
        lambda: conn.publish("topic", b"x"),
        lambda: conn.subscribe("topic", lambda event: None),
        lambda: conn.tunnel("slow", 1),
        lambda: conn.unsubscribe("topic"),
    ):
        with pytest.raises(iris.ClosedError):
            later()
    gate.release.set()


def test_many_threads_share_one_connection(relay, attach):
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    errors: list = []

    def worker(n: int) -> None:
        for i in range(40):
            payload = f"{n}:{i}".encode()
            try:
                assert conn.request("echo", payload, 5) == payload
            except Exception as err:
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# ---------------------------------------------------------------------------
# Broadcast and publish/subscribe.


def test_broadcast_reaches_every_member(relay, attach):
    members = [Echo() for _ in range(3)]
    for member in members:
        attach.register(relay.port, "group", member)
    conn = attach.connect(relay.port)
    conn.broadcast("group", b"to all")
    conn.broadcast("group", b"again")
    for member in members:  # handled on a pool: in either order
        got = {member.broadcasts.get(timeout=5), member.broadcasts.get(timeout=5)}
        assert got == {b"to all", b"again"}
    conn.broadcast("nobody", b"lost")  # no members: no delivery, no error


def test_broadcast_includes_a_sending_member(relay, attach):
    echo = Echo()
    service = attach.register(relay.port, "self", echo)
    service.conn.broadcast("self", b"me too")
    assert echo.broadcasts.get(timeout=5) == b"me too"


class TopicInbox(iris.TopicHandler, Inbox):
    def handle_event(self, event: bytes) -> None:
        self(event)


def test_publish_subscribe_across_connections(relay, attach):
    with_handler, with_callable = TopicInbox(), Inbox()
    first, second = attach.connect(relay.port), attach.connect(relay.port)
    publisher = attach.connect(relay.port)
    subscribed(first, "news", with_handler, with_handler)
    subscribed(second, "news", with_callable, with_callable)
    publisher.publish("news", b"extra")
    assert with_handler.get() == b"extra"
    assert with_callable.get() == b"extra"
    publisher.publish("other", b"elsewhere")  # different topic
    with_handler.assert_empty()
    with_callable.assert_empty(0)


def test_unsubscribe_stops_delivery(relay, attach):
    leaving, staying = Inbox(), Inbox()
    first, second = attach.connect(relay.port), attach.connect(relay.port)
    subscribed(first, "news", leaving, leaving)
    subscribed(second, "news", staying, staying)
    first.unsubscribe("news")
    first.publish("news", b"after")  # same connection: the relay saw the unsubscribe first
    assert staying.get() == b"after"
    leaving.assert_empty()
    with pytest.raises(ValueError, match="not subscribed"):
        first.unsubscribe("news")
    subscribed(first, "news", leaving, leaving)  # and subscribing again works


def test_double_subscribe_raises(relay, attach):
    conn = attach.connect(relay.port)
    inbox = Inbox()
    subscribed(conn, "news", inbox, inbox)
    with pytest.raises(ValueError, match="already subscribed"):
        conn.subscribe("news", Inbox())
    conn.publish("news", b"once")
    assert inbox.get() == b"once"
    inbox.assert_empty()


def test_topics_and_clusters_are_separate_namespaces(relay, attach):
    echo = Echo()
    attach.register(relay.port, "shared", echo)
    conn = attach.connect(relay.port)
    inbox = Inbox()
    subscribed(conn, "shared", inbox, inbox)
    conn.broadcast("shared", b"broadcast")
    assert echo.broadcasts.get(timeout=5) == b"broadcast"
    inbox.assert_empty()


# ---------------------------------------------------------------------------
# Services: init, drop.


class SlowInit(Echo):
    """init signals that it started, then takes a while; requests check its end."""

    def __init__(self, port: int):
        super().__init__()
        self.port = port
        self.started = threading.Event()
        self.done = threading.Event()
        self.init_reply = None
        self.early_callbacks = 0

    def init(self, conn: iris.Connection) -> None:
        self.started.set()
        self.init_reply = conn.request("helper", b"from init", 2)  # outbound from init
        time.sleep(0.3)
        self.done.set()

    def handle_request(self, request: bytes) -> bytes:
        if not self.done.is_set():
            self.early_callbacks += 1
        return super().handle_request(request)

    def handle_broadcast(self, message: bytes) -> None:
        if not self.done.is_set():
            self.early_callbacks += 1
        super().handle_broadcast(message)


def test_init_runs_before_any_callback(relay, attach):
    attach.register(relay.port, "helper", Echo())
    handler = SlowInit(relay.port)
    conn = attach.connect(relay.port)
    results: queue.Queue = queue.Queue()

    def early_traffic():
        handler.started.wait(5)
        conn.broadcast("slow-init", b"early broadcast")
        results.put(timed(conn.request, "slow-init", b"early request", 5))

    sender = threading.Thread(target=early_traffic)
    sender.start()
    attach.register(relay.port, "slow-init", handler)
    reply, took = results.get(timeout=10)
    sender.join()
    assert reply == b"early request"
    assert took >= 0.2  # it waited for init
    assert handler.broadcasts.get(timeout=5) == b"early broadcast"
    assert handler.early_callbacks == 0
    assert handler.init_reply == b"from init"


class FailingInit(Echo):
    def init(self, conn: iris.Connection) -> None:
        raise RuntimeError("cannot start")


def test_failing_init_unregisters(relay, attach):
    handler = FailingInit()
    with pytest.raises(RuntimeError, match="cannot start"):
        iris.register(relay.port, "broken", handler)
    conn = attach.connect(relay.port)
    with pytest.raises(iris.TimeoutError):
        conn.request("broken", b"anyone?", 0.2)
    assert handler.requests == []


class DropRecorder(Echo):
    def __init__(self):
        super().__init__()
        self.drops: queue.Queue[Exception] = queue.Queue()

    def handle_drop(self, reason: Exception) -> None:
        self.drops.put(reason)


def test_drop_when_the_relay_shuts_down(relay_factory, attach):
    relay = relay_factory()
    handler = DropRecorder()
    service = attach.register(relay.port, "droppy", handler)
    conn = attach.connect(relay.port)
    gate_results: queue.Queue = queue.Queue()
    waiter = threading.Thread(
        target=lambda: gate_results.put(timed(conn.request, "none", b"x", 10))
    )
    waiter.start()
    time.sleep(0.1)  # the request is pending at the relay
    assert relay.stop() == 0
    reason = handler.drops.get(timeout=5)
    assert isinstance(reason, iris.ClosedError)
    assert "relay shutting down" in str(reason)
    err, took = gate_results.get(timeout=5)
    waiter.join()
    assert isinstance(err, iris.ClosedError) and "relay shutting down" in str(err)
    assert took < 5
    wait_for(lambda: service.conn.closed and conn.closed)
    assert handler.drops.empty()  # exactly once


def test_relay_crash_fails_pending_calls_and_drops_services(relay_factory, attach):
    relay = relay_factory()
    handler = DropRecorder()
    attach.register(relay.port, "crashy", handler)
    conn = attach.connect(relay.port)
    results: queue.Queue = queue.Queue()
    caller = threading.Thread(target=lambda: results.put(timed(conn.request, "none", b"x", 10)))
    caller.start()
    time.sleep(0.1)  # the request is pending at the relay
    relay.kill()
    err, took = results.get(timeout=5)
    caller.join()
    assert isinstance(err, iris.ClosedError) and "connection lost" in str(err)
    assert took < 5
    reason = handler.drops.get(timeout=5)
    assert isinstance(reason, iris.ClosedError) and "connection lost" in str(reason)
    with pytest.raises(iris.ClosedError):
        conn.request("crashy", b"x", 1)


def test_graceful_unregister_is_not_a_drop(relay, attach):
    handler = DropRecorder()
    iris.register(relay.port, "polite", handler).unregister()
    with pytest.raises(queue.Empty):
        handler.drops.get(timeout=0.2)


def test_register_into_a_busy_cluster(relay, attach):
    """Traffic can follow the relay's INIT in the same read; none of it is lost.

    A flood of broadcasts keeps the cluster busy while members join, so the
    relay often sends a new member its acceptance and a delivery together.
    """
    flooder = attach.connect(relay.port)
    stop = threading.Event()

    def flood():
        while not stop.is_set():
            flooder.broadcast("busy", b"x" * 100)

    attach.register(relay.port, "busy", Echo())  # someone to receive the flood
    thread = threading.Thread(target=flood)
    thread.start()
    try:
        for _ in range(10):
            member = Echo()
            with iris.register(relay.port, "busy", member):
                assert member.broadcasts.get(timeout=5) == b"x" * 100
    finally:
        stop.set()
        thread.join()


# ---------------------------------------------------------------------------
# Limits.


def test_request_threads_one_runs_requests_one_at_a_time(relay, attach):
    gate = Gate(delay=0.1)
    attach.register(relay.port, "serial", gate, iris.ServiceLimits(request_threads=1))
    conn = attach.connect(relay.port)
    results: queue.Queue = queue.Queue()
    start = time.monotonic()
    threads = [
        threading.Thread(target=lambda i=i: results.put(conn.request("serial", b"%d" % i, 5)))
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results.get(timeout=1) for _ in range(4)) == [b"0", b"1", b"2", b"3"]
    assert gate.peak == 1
    assert time.monotonic() - start >= 0.4


def test_request_threads_allow_parallel_requests(relay, attach):
    gate = Gate(delay=0.2)
    attach.register(relay.port, "parallel", gate, iris.ServiceLimits(request_threads=3))
    conn = attach.connect(relay.port)
    threads = [threading.Thread(target=conn.request, args=("parallel", b"x", 5)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert gate.peak == 3


def test_request_memory_cap_fails_fast_with_a_remote_error(relay, attach):
    gate = Gate()
    limits = iris.ServiceLimits(request_threads=1, request_memory=1000)
    attach.register(relay.port, "capped", gate, limits)
    conn = attach.connect(relay.port)
    err, took = timed(conn.request, "capped", b"x" * 1001, 5)  # can never fit
    assert isinstance(err, iris.RemoteError), err
    assert "request memory limit exceeded" in err.fault and "limit 1000 bytes" in err.fault
    assert took < 1

    running = threading.Thread(target=conn.request, args=("capped", b"a" * 600, 5))
    running.start()
    assert gate.entered.acquire(timeout=5)  # occupies the only thread
    # Two more of 600 bytes: whichever arrives second does not fit beside the first.
    results: queue.Queue = queue.Queue()
    contenders = [
        threading.Thread(target=lambda m=m: results.put(timed(conn.request, "capped", m, 5)))
        for m in (b"b" * 600, b"c" * 600)
    ]
    for thread in contenders:
        thread.start()
    err, took = results.get(timeout=5)
    assert isinstance(err, iris.RemoteError), err
    assert "request memory limit exceeded" in err.fault
    assert took < 1  # refused at once, not timed out
    gate.release.set()
    reply, _ = results.get(timeout=5)
    for thread in (running, *contenders):
        thread.join()
    assert gate.seen == [b"a" * 600, reply]


class BroadcastGate(iris.ServiceHandler):
    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Event()
        self.handled: list[bytes] = []

    def handle_broadcast(self, message: bytes) -> None:
        self.entered.set()
        self.release.wait(10)
        self.handled.append(message)

    def handle_request(self, request: bytes) -> bytes:
        return request


def test_broadcast_memory_cap_drops_and_logs(relay, attach, caplog):
    caplog.set_level(logging.WARNING, logger="iris")
    gate = BroadcastGate()
    limits = iris.ServiceLimits(broadcast_threads=1, broadcast_memory=1000)
    service = attach.register(relay.port, "bcast", gate, limits)
    conn = attach.connect(relay.port)
    conn.broadcast("bcast", b"1" * 600)
    assert gate.entered.wait(5)  # the only thread is busy
    for digit in b"234":
        conn.broadcast("bcast", bytes([digit]) * 600)
    # The same connection's request arrives after the broadcasts: all are dispatched.
    assert conn.request("bcast", b"sync", 5) == b"sync"
    gate.release.set()
    wait_for(lambda: len(gate.handled) == 2)
    time.sleep(0.1)
    assert gate.handled == [b"1" * 600, b"2" * 600]  # 3 and 4 did not fit
    drops = [r for r in caplog.records if "broadcast dropped" in r.getMessage()]
    assert len(drops) == 1  # rate limited: one line for the burst
    assert f"service={dict(service.log.context)['service']}" in drops[0].getMessage()
    assert drops[0].levelno == logging.WARNING


def test_request_that_waited_past_its_timeout_is_not_run(relay, attach):
    gate = Gate(delay=0.4)
    attach.register(relay.port, "busy", gate, iris.ServiceLimits(request_threads=1))
    conn = attach.connect(relay.port)
    first = threading.Thread(target=conn.request, args=("busy", b"first", 5))
    first.start()
    assert gate.entered.acquire(timeout=5)
    err, took = timed(conn.request, "busy", b"expired", 0.2)
    assert isinstance(err, iris.TimeoutError)
    assert took < 0.2 + LATE
    first.join()
    assert conn.request("busy", b"after", 5) == b"after"
    assert gate.seen == [b"first", b"after"]  # "expired" never reached the handler


# ---------------------------------------------------------------------------
# Tunnels.


def test_tunnel_both_directions(relay, attach):
    class Chat(iris.ServiceHandler):
        def __init__(self):
            self.tunnels: queue.Queue[iris.Tunnel] = queue.Queue()

        def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
            self.tunnels.put(tunnel)

    chat = Chat()
    attach.register(relay.port, "chat", chat)
    conn = attach.connect(relay.port)
    with conn.tunnel("chat", 1) as near:
        far = chat.tunnels.get(timeout=5)
        near.send(b"hello from the client")
        assert far.recv(5) == b"hello from the client"
        far.send(b"hello from the service")
        assert near.recv(5) == b"hello from the service"
        with pytest.raises(iris.TimeoutError):
            near.recv(0.05)
    with pytest.raises(iris.ClosedError):  # the far end saw the close
        far.recv(5)
    with pytest.raises(iris.ClosedError):
        far.send(b"too late", timeout=1)


@pytest.mark.parametrize("size", [1, 65536, 65537, 200_000, 16 * MiB])
def test_tunnel_message_sizes(relay, attach, size):
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    message = (bytes(range(251)) * (size // 251 + 1))[:size]  # 251: chunks differ
    with conn.tunnel("echo", 1) as tunnel:
        tunnel.send(message, timeout=10)
        assert tunnel.recv(10) == message


def test_tunnel_preserves_order(relay, attach):
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    with conn.tunnel("echo", 1) as tunnel:
        sent = [b"%d" % i * (i % 7 + 1) for i in range(1000)]
        sender = threading.Thread(target=lambda: [tunnel.send(m, timeout=5) for m in sent])
        sender.start()
        received = [tunnel.recv(5) for _ in sent]
        sender.join()
    assert received == sent


class Sink(iris.ServiceHandler):
    """Holds each tunnel without reading until ``release``, then drains it."""

    def __init__(self):
        self.release = threading.Event()
        self.received: list[bytes] = []
        self.finished = threading.Event()

    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        self.release.wait(10)
        while True:
            try:
                self.received.append(tunnel.recv(10))
            except iris.ClosedError:
                break
        self.finished.set()


def test_tunnel_flow_control(relay, attach, caplog):
    """A receiver that does not read stops the sender; a timed-out send leaves
    the tunnel usable, and the receiver discards only the cut-off message."""
    caplog.set_level(logging.WARNING, logger="iris")
    sink = Sink()
    attach.register(relay.port, "sink", sink)
    conn = attach.connect(relay.port)
    tunnel = conn.tunnel("sink", 1)
    size = 1_000_000  # not a multiple of the chunk limit: the send blocks mid-message
    sent = 0
    while True:
        message = sent.to_bytes(4, "big") * (size // 4)
        err, took = timed(tunnel.send, message, 0.3)
        if err is not None:
            break
        sent += 1
        assert sent < 100, "the sender was never stopped"
    assert isinstance(err, iris.TimeoutError)
    assert 0.29 <= took < 0.3 + LATE
    # The receiver's 64 MiB grant, the relay's 4 MiB buffer, and up to one message
    # the relay may overdraw the grant by: 71 or 72 messages of 1,000,000 bytes.
    assert 71 <= sent <= 72
    sink.release.set()
    tunnel.send(b"after the timeout", timeout=5)
    tunnel.close()
    assert sink.finished.wait(10)
    expected = [i.to_bytes(4, "big") * (size // 4) for i in range(sent)]
    assert sink.received == [*expected, b"after the timeout"]
    assert any("incomplete tunnel message discarded" in r.getMessage() for r in caplog.records)


def test_tunnel_without_members_times_out(relay, attach):
    conn = attach.connect(relay.port)
    err, took = timed(conn.tunnel, "nobody", 0.3)
    assert isinstance(err, iris.TimeoutError)
    assert 0.29 <= took < 0.3 + LATE


def test_closing_one_side_ends_the_other_after_draining(relay, attach):
    sink = Sink()
    sink.release.set()
    attach.register(relay.port, "sink", sink)
    conn = attach.connect(relay.port)
    tunnel = conn.tunnel("sink", 1)
    for i in range(3):
        tunnel.send(b"message %d" % i)
    tunnel.close()
    assert sink.finished.wait(5)  # recv raised ClosedError after the three messages
    assert sink.received == [b"message 0", b"message 1", b"message 2"]
    with pytest.raises(iris.ClosedError):
        tunnel.send(b"closed", timeout=1)
    with pytest.raises(iris.ClosedError):
        tunnel.recv(1)


def test_service_closing_a_tunnel_ends_the_client_side(relay, attach):
    class Closer(iris.ServiceHandler):
        def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
            tunnel.send(b"bye")
            tunnel.close()

    attach.register(relay.port, "closer", Closer())
    conn = attach.connect(relay.port)
    tunnel = conn.tunnel("closer", 1)
    assert tunnel.recv(5) == b"bye"
    with pytest.raises(iris.ClosedError):
        tunnel.recv(5)


def test_connection_close_ends_its_tunnels(relay, attach):
    sink = Sink()
    sink.release.set()
    attach.register(relay.port, "sink", sink)
    conn = iris.connect(relay.port)
    tunnel = conn.tunnel("sink", 1)
    tunnel.send(b"last words")
    conn.close()
    assert sink.finished.wait(5)
    assert sink.received == [b"last words"]
    with pytest.raises(iris.ClosedError):
        tunnel.recv(1)


# ---------------------------------------------------------------------------
# Logging.


def iris_records(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("iris")]


def test_log_entries_carry_the_entity_id(relay, attach, caplog):
    caplog.set_level(logging.INFO, logger="iris")
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    client_id = dict(conn.log.context)["client"]
    conn.log.info("custom entry", answer=42)
    assert f"custom entry client={client_id} answer=42" in iris_records(caplog)
    assert any(
        m.startswith("relay connection established") and f"client={client_id}" in m
        for m in iris_records(caplog)
    )
    with conn.tunnel("echo", 1) as tunnel:
        tunnel.log.info("tunnel entry")
    assert f"tunnel entry client={client_id} tunnel={tunnel.id}" in iris_records(caplog)
    assert any(f"tunnel={tunnel.id}" in m and "established" in m for m in iris_records(caplog))


def test_service_log_entries_carry_service_id(relay, attach, caplog):
    caplog.set_level(logging.INFO, logger="iris")
    service = attach.register(relay.port, "echo", Echo())
    service_id = dict(service.log.context)["service"]
    main = threading.current_thread().name  # what register logged, not stray threads
    messages = [r.getMessage() for r in caplog.records if r.threadName == main]
    assert any(m.startswith("registering service") for m in messages)
    assert any(m.startswith("relay connection established") for m in messages)
    assert all(f"service={service_id}" in m for m in messages), messages


def test_values_with_spaces_are_quoted(caplog):
    caplog.set_level(logging.INFO, logger="iris")
    iris.ContextLog().new(client=7).info("spaced", reason='a "b" c', empty="")
    assert iris_records(caplog) == ['spaced client=7 reason="a \\"b\\" c" empty=""']


def traffic(port: int, attach) -> None:
    """One of everything that logs on the hot path at DEBUG."""
    attach.register(port, "echo", Echo())
    conn = attach.connect(port)
    inbox = Inbox()
    subscribed(conn, "news", inbox, inbox)
    conn.broadcast("echo", b"b")
    assert conn.request("echo", b"r", 5) == b"r"
    with conn.tunnel("echo", 1) as tunnel:
        tunnel.send(b"t")
        assert tunnel.recv(5) == b"t"


def test_disabled_debug_builds_no_entries(relay, attach, caplog, monkeypatch):
    """With DEBUG off, no entry is built or rendered beyond those emitted."""
    built, rendered = [], []
    original_init, original_str = logs._Entry.__init__, logs._Entry.__str__

    def spy_init(self, msg, pairs):
        built.append(msg)
        original_init(self, msg, pairs)

    def spy_str(self):
        rendered.append(self.msg)
        return original_str(self)

    monkeypatch.setattr(logs._Entry, "__init__", spy_init)
    monkeypatch.setattr(logs._Entry, "__str__", spy_str)
    caplog.set_level(logging.INFO, logger="iris")
    traffic(relay.port, attach)

    def emitted() -> list[str]:
        return sorted(r.msg.msg for r in caplog.records if r.name.startswith("iris"))

    # The far end's threads may still be logging (a tunnel's last entries): wait
    # for them, then every entry built must have been emitted.
    deadline = time.monotonic() + 5
    while sorted(built) != emitted() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(built) == emitted()
    assert all(r.levelno >= logging.INFO for r in caplog.records)
    assert not {"sending request", "request arrived", "tunnel message sent"} & set(built)

    built.clear()
    rendered.clear()
    caplog.set_level(logging.WARNING, logger="iris")
    traffic(relay.port, attach)
    assert built == [] and rendered == []


def test_debug_entries_when_enabled(relay, attach, caplog):
    caplog.set_level(logging.DEBUG, logger="iris")
    traffic(relay.port, attach)
    messages = iris_records(caplog)
    assert any(
        re.match(r"sending request client=\d+ cluster=echo id=\d+ size=1", m) for m in messages
    )
    assert any(m.startswith("request arrived service=") for m in messages)
    assert any(m.startswith("tunnel message sent") and "tunnel=" in m for m in messages)
