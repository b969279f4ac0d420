"""irishost's core against its own races and broken workers (issue 12): a
worker retired while it boots must stay retired when its READY arrives, and
a worker that writes an undecodable frame is replaced like a crashed one.
Each runs a real host, real workers and real signals.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from irishost_support import gone, wait_for

import iris

pytest_plugins = ["irishost_fixtures"]


def test_a_worker_retired_while_booting_never_takes_requests(service):
    """SIGTTOU while the second worker is still in init retires it; its READY,
    arriving later, must not make it take requests (it drains and exits 0)."""
    service.config(workers={"count": 1}, limits={"request_threads": 2})
    host = service.start(env={"PROBE_INIT": "hang-while:init-hangs"})
    first = host.worker_count(1)[0].pid
    held = service.request_async(b"wait:release", timeout=30)  # keeps `first` loaded
    wait_for(lambda: service.records("request"), what="the held request running")

    service.open_gate("init-hangs")
    os.kill(host.proc.pid, signal.SIGTTIN)
    wait_for(lambda: len(service.records("init")) == 2, what="the second worker in init")
    late = next(pid for _, pid, *_ in service.records("init") if pid != first)
    os.kill(host.proc.pid, signal.SIGTTOU)
    wait_for(lambda: "scaling workers" in host.log().split("after=2")[-1], what="SIGTTOU seen")

    stop = threading.Event()
    replies: list[bytes] = []
    faults: list[str] = []

    def call() -> None:
        while not stop.is_set():
            try:
                replies.append(service.conn.request(service.cluster, b"pid", 10))
            except iris.RemoteError as err:
                faults.append(err.fault)

    callers = [threading.Thread(target=call) for _ in range(8)]
    for caller in callers:
        caller.start()
    time.sleep(0.2)
    os.unlink(service.dir / "init-hangs")  # the retired worker finishes init: READY
    assert gone(late, wait=10)
    time.sleep(0.2)
    stop.set()
    for caller in callers:
        caller.join(15)
    service.open_gate("release")
    held.result(10)

    assert faults == []
    assert replies and set(replies) == {str(first).encode()}
    assert "retired worker exited" in host.log()
    assert "worker died" not in host.log()


def test_a_worker_sending_an_undecodable_frame_is_replaced_and_faults_only_its_work(service):
    """Garbage from one worker kills that worker as broken, through the normal
    death path: exactly its requests are faulted; the other worker carries on."""
    service.config(workers={"count": 2})
    host = service.start()
    workers = {worker.pid for worker in host.worker_count(2)}
    held = service.request_async(b"wait:release")
    wait_for(lambda: service.records("request"), what="the held request running")
    holder = service.records("request")[0][1]

    broken = service.request_async(b"garbage:1")

    fault = pytest.raises(iris.RemoteError, broken.result, 10).value.fault
    assert "sent an undecodable frame" in fault
    (culprit,) = workers - {holder}
    assert gone(culprit, wait=5)
    service.open_gate("release")
    assert held.result(10) == str(holder).encode()
    assert "worker sent an undecodable frame" in host.log()
    host.worker_count(2)
    assert host.proc.poll() is None
