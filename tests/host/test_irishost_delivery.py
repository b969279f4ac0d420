"""irishost delivering more than requests: broadcasts, topic events, tunnels, and
the connection ``init`` hands the handler for its own outbound traffic.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time

import pytest
from support import wait_for

import iris

# Long enough for a delivery that should not happen to show up if it were going to.
SETTLE_SECONDS = 0.3


def settled(service, what: str, count: int) -> list[list]:
    """The records of one kind once there are ``count``, and still that many a moment later."""
    wait_for(lambda: len(service.records(what)) >= count, what=f"{count} {what} records")
    time.sleep(SETTLE_SECONDS)
    return service.records(what)


# -- broadcasts -------------------------------------------------------------------------------


def test_a_broadcast_reaches_every_worker_by_default(service):
    service.config(workers={"count": 2})
    host = service.start()

    service.conn.broadcast(service.cluster, b"hello all")

    seen = settled(service, "broadcast", 2)
    assert sorted(pid for _, pid, _ in seen) == sorted(w.pid for w in host.worker_count(2))
    assert {message for _, _, message in seen} == {"hello all"}


def test_broadcast_one_reaches_a_single_worker(service):
    service.config(workers={"count": 2, "broadcast": "one"})
    service.start()

    for number in range(4):
        service.conn.broadcast(service.cluster, b"only once %d" % number)

    seen = settled(service, "broadcast", 4)
    assert sorted(message for _, _, message in seen) == [f"only once {n}" for n in range(4)]


# -- topic events ------------------------------------------------------------------------------

TOPICS = [{"name": "news", "deliver": "all"}, {"name": "jobs", "deliver": "one"}]


def test_events_reach_handle_event_by_each_topics_rule(service):
    service.config(topics=TOPICS, workers={"count": 2})
    host = service.start()
    workers = sorted(w.pid for w in host.worker_count(2))

    service.conn.publish("news", b"extra!")
    for number in range(3):
        service.conn.publish("jobs", b"job %d" % number)
    service.conn.publish("unsubscribed", b"nobody listens")

    seen = settled(service, "event", 5)
    news = [pid for _, pid, topic, _ in seen if topic == "news"]
    jobs = sorted(event for _, _, topic, event in seen if topic == "jobs")
    assert sorted(news) == workers
    assert jobs == ["job 0", "job 1", "job 2"]
    assert len(seen) == 5


# -- tunnels ----------------------------------------------------------------------------------


def test_a_tunnel_reaches_a_workers_handle_tunnel_and_carries_messages_both_ways(service):
    service.config(workers={"count": 2})
    host = service.start()
    workers = {w.pid for w in host.worker_count(2)}
    large = random.Random(4).randbytes(1024 * 1024)  # many relay chunks

    first = service.conn.tunnel(service.cluster, 5)
    second = service.conn.tunnel(service.cluster, 5)
    answers = []
    for tunnel in (first, second):
        tunnel.send(b"echo")
        tunnel.send(b"hello")
        answers.append(tunnel.recv(5))
    first.send(large)
    echoed_large = first.recv(10)
    first.close()

    pids = {int(answer.split(b":")[0]) for answer in answers}
    assert pids == workers, "both tunnels went to the same worker"
    assert all(answer.endswith(b":hello") for answer in answers)
    assert echoed_large == answers[0].split(b":")[0] + b":" + large
    closed = wait_for(lambda: service.records("tunnel closed"), what="the handler to see the close")
    assert [pid for _, pid, _ in closed] == [int(answers[0].split(b":")[0])]
    second.close()


def test_a_tunnel_closed_by_the_handler_is_closed_for_the_caller(service):
    service.start()
    tunnel = service.conn.tunnel(service.cluster, 5)

    tunnel.send(b"close")

    with pytest.raises(iris.ClosedError):
        tunnel.recv(5)


def test_a_tunnel_is_flow_controlled_up_to_the_handler(service):
    """A handler that does not read pushes back on the sender; nothing is lost."""
    service.start()
    tunnel = service.conn.tunnel(service.cluster, 5)
    tunnel.send(b"hold:gate")
    message = b"m" * (1024 * 1024)

    sent = 0
    with pytest.raises(iris.TimeoutError):
        while sent < 300:  # far beyond every buffer on the way
            tunnel.send(message, timeout=0.5)
            sent += 1
    service.open_gate("gate")
    tunnel.send(message, timeout=10)
    tunnel.send(b"end", timeout=10)

    count, size = json.loads(tunnel.recv(20))
    assert 0 < sent < 200, f"{sent} MiB went out before the sender was held back"
    assert (count, size) == (sent + 1, (sent + 1) * len(message))
    tunnel.close()


def test_a_tunnel_closes_for_the_caller_when_its_worker_dies(service):
    service.start()
    tunnel = service.conn.tunnel(service.cluster, 5)
    tunnel.send(b"echo")
    tunnel.send(b"who")
    pid = int(tunnel.recv(5).split(b":")[0])

    os.kill(pid, signal.SIGKILL)

    with pytest.raises(iris.ClosedError):
        tunnel.recv(5)


# -- init and the worker's own connection ------------------------------------------------------


class Helper(iris.ServiceHandler):
    """Another service, in the test process, for the workers to talk to."""

    def __init__(self):
        self.broadcasts = []

    def handle_request(self, request: bytes) -> bytes:
        return b"helped: " + request

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.append(message)


def test_init_runs_in_each_worker_with_a_connection_for_outbound_traffic(service, attach):
    service.config(workers={"count": 2})
    host = service.start()
    helper = Helper()
    attach.register(service.port, "helper", helper)
    events = []
    service.conn.subscribe("from-workers", events.append)

    inits = service.records("init")
    reply = service.request(b"call:helper")
    service.request(b"broadcast:helper")
    service.request(b"publish:from-workers")

    assert sorted(pid for _, pid, _, _ in inits) == sorted(w.pid for w in host.worker_count(2))
    assert {kind for _, _, kind, _ in inits} == {"Connection"}
    assert reply == b"helped: from a worker"
    assert wait_for(lambda: helper.broadcasts) == [b"broadcast from a worker"]
    assert wait_for(lambda: events) == [b"event from a worker"]
