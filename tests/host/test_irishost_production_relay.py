"""irishost when its relay dies: SIGKILL the external relay, start it again on the
same port, and the service must come back on its own.

The host runs with ``relay.embedded = false`` against a ``python -m
iris.relay`` process, as under the iris-relay.service unit. A dropped
connection is a handle_drop for every worker's handler; once the relay is
back, fresh workers (whose init gets a live connection) take over, and
systemd's STATUS= and ``irishost status`` show the relay's state meanwhile.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from production_support import (
    parse_reply,
    status,
    steady_load,
    write_handler,
)
from relay_process import RelayProcess
from support import free_port, gone, wait_for

import iris
from irishost.ops.control import query_status


@pytest.fixture
def relay_on(tmp_path):
    """``relay_on(port)`` starts a relay on that very port (a restarted relay must
    take its predecessor's); all still running are stopped at teardown."""
    started: list[RelayProcess] = []

    def start(port: int) -> RelayProcess:
        relay = RelayProcess(["--port", str(port)], tmp_path / f"relay-{len(started)}.log")
        assert relay.port == port
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def external_relay_config(service, port: int, **workers) -> None:
    service.config(
        service={"handler": write_handler(service.dir)},
        relay={"port": port, "embedded": False},
        workers={"count": 2, "shutdown_timeout": "5s", **workers},
        limits={"request_threads": 2},
    )


def kill(relay: RelayProcess) -> float:
    """SIGKILL the relay and reap it; return the time just before the signal."""
    before = time.monotonic()
    relay.proc.send_signal(signal.SIGKILL)
    relay.kill()
    return before


def test_the_service_recovers_on_its_own_when_the_relay_is_killed_and_restarted(
    notify, relay_on, service
):
    port = free_port()
    relay = relay_on(port)
    external_relay_config(service, port)
    host = service.start(env=notify.env)
    old = {worker.pid for worker in host.worker_count(2)}
    notify.wait_status("relay connected")

    with steady_load(port, service.cluster, threads=4, timeout=2.0, reconnect=True) as load:
        load.wait_for_replies(20)
        killed = kill(relay)
        notify.wait_status("relay reconnecting", since=killed, timeout=1)  # not the next period
        down = status(service)["header"]["relay"]
        assert wait_for(lambda: len(service.records("drop")) == 2, what="handle_drop")

        restarted = time.monotonic()
        relay = relay_on(port)
        notify.wait_status("relay connected", since=restarted, timeout=10)
        recovered = load.wait_for_replies(20, since=restarted, timeout=5)

    first_success = min(o.at for o in load.outcomes() if o.reply and o.at >= restarted)
    assert first_success - restarted < 5.0
    assert not [o for o in load.outcomes() if o.error.startswith("wrong reply")]
    assert down == f"reconnecting (port {port})"
    assert status(service)["header"]["relay"] == f"connected (port {port})"
    drops = service.records("drop")
    assert {pid for _, pid, _ in drops} == old
    assert all("connection lost" in reason for _, _, reason in drops), drops
    # The handlers that saw handle_drop get no more calls: fresh workers serve.
    assert not {reply.pid for reply in recovered} & old
    assert wait_for(lambda: all(gone(pid) for pid in old), what="the dropped workers to exit")
    # ... and their init() got a live connection for outbound traffic.
    client = service.connect()
    assert parse_reply(client.request(service.cluster, b"publish", 5), b"publish")
    assert query_status(service.dir / "control.sock")["restarts"] == 0


def test_a_reply_from_before_the_relay_restart_never_answers_a_new_request(
    notify, relay_on, service
):
    """A restarted relay numbers its requests from 0 again, so a late reply to a
    request of the dead relay carries an id that now means another request."""
    port = free_port()
    relay = relay_on(port)
    external_relay_config(service, port)
    service.start(env=notify.env, wait=False)  # no probing: ours are the relay's first requests
    notify.wait("READY", timeout=20)
    callers = ThreadPoolExecutor(max_workers=8)
    before = iris.connect(port)
    try:
        doomed = [
            callers.submit(before.request, service.cluster, b"sleep:2.5", 10) for _ in range(4)
        ]
        wait_for(lambda: query_status(service.dir / "control.sock")["in_flight"] == 4)
        restarted = kill(relay)
        relay = relay_on(port)
        notify.wait_status("relay connected", since=restarted, timeout=10)
        after = service.connect()
        fresh = [callers.submit(after.request, service.cluster, b"sleep:2", 10) for _ in range(4)]

        for call in fresh:  # still running when the late replies come back
            parse_reply(call.result(10), b"sleep:2")
        for call in doomed:
            with pytest.raises(iris.ClosedError):
                call.result(10)
    finally:
        before.close()
        callers.shutdown()
