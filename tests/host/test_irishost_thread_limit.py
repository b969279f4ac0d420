"""A worker that cannot start a thread faults that one piece of work and lives on.

The worker process is moved into a pids cgroup whose limit is full (the
``thread_limit`` fixture), as under a unit's ``TasksMax``; the host talks to
a relay process of its own.
"""

from __future__ import annotations

import pytest
from support import fault_of, gone, wait_for

import iris

NO_THREAD = "could not start a handler thread"


def test_a_worker_that_cannot_start_a_thread_faults_the_work_and_serves_on(
    relay, service, thread_limit
):
    service.config(relay={"port": relay.port, "embedded": False}, limits={"request_threads": 2})
    host = service.start()
    (worker,) = host.worker_count(1)
    # Its only request thread so far is busy: the next request needs the second.
    busy = service.request_async(b"wait:gate")
    wait_for(lambda: service.records("request"), what="the busy request")
    thread_limit.add(worker.pid)
    thread_limit.on()

    fault = fault_of(service.request_async(b"pid"))
    assert fault == f"{NO_THREAD} in worker 0: RuntimeError: can't start new thread"
    service.conn.broadcast(service.cluster, b"dropped")
    with service.conn.tunnel(service.cluster, 5.0) as tunnel, pytest.raises(iris.ClosedError):
        tunnel.recv(5.0)
    logged = wait_for(
        lambda: len(lines := [x for x in host.log().splitlines() if NO_THREAD in x]) == 3 and lines,
        what="the request, the broadcast and the tunnel refused in the log",
    )
    assert [any(f" {key}=" in line for line in logged) for key in ("pool", "tunnel")] == [True] * 2
    assert sorted(line.split(" pool=")[-1].split()[0] for line in logged if "pool=" in line) == [
        "broadcast",
        "request",
    ]

    thread_limit.off()
    service.open_gate("gate")
    assert busy.result(5.0) == str(worker.pid).encode()
    assert service.request(b"pid") == str(worker.pid).encode()
    service.conn.broadcast(service.cluster, b"heard")
    wait_for(lambda: service.records("broadcast"), what="the broadcast")
    assert [text for _, _, text in service.records("broadcast")] == ["heard"]
    with service.conn.tunnel(service.cluster, 5.0) as tunnel:
        tunnel.send(b"echo")
        tunnel.send(b"back")
        assert tunnel.recv(5.0) == b"%d:back" % worker.pid
    assert [process.pid for process in host.workers()] == [worker.pid]


def test_a_worker_that_cannot_start_a_thread_for_handle_drop_logs_it_and_lives_on(
    relay_factory, service, thread_limit
):
    relay = relay_factory()
    service.config(relay={"port": relay.port, "embedded": False})
    host = service.start()
    (worker,) = host.worker_count(1)
    thread_limit.add(worker.pid)
    thread_limit.on()

    relay.kill()  # the supervisor hands the drop on to its workers

    host.wait_log("refused=handle_drop")
    thread_limit.off()
    assert not gone(worker.pid), host.log()
