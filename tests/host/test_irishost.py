"""irishost serving requests: dispatch, per-worker caps, recycling, titles, stopping.

Every test runs the real ``irishost`` command on a generated config, with the
probe handler (probe.py) in its workers and an embedded relay on a
free port, and drives it with plain ``iris`` clients. Crashes are in
test_irishost_crashes.py, broadcasts/events/tunnels in
test_irishost_delivery.py, the command line in test_irishost_cli.py.
"""

from __future__ import annotations

import json
import random
import time

import psutil
import pytest
from support import gone, wait_for

import iris
from irishost.wire.ring import DEFAULT_CAPACITY


def title(process) -> str:
    """A process title as ps shows it (setproctitle pads argv with empty strings)."""
    return " ".join(process.cmdline()).strip()


# -- serving ------------------------------------------------------------------------------


def test_requests_are_answered_by_the_worker_processes(service):
    service.config(workers={"count": 2})
    host = service.start()
    workers = {w.pid for w in host.worker_count(2)}

    pids = {int(service.request(b"pid")) for _ in range(10)}

    assert pids <= workers
    assert host.pid not in pids


def test_handler_exception_becomes_the_callers_fault(service):
    service.start()

    with pytest.raises(iris.RemoteError) as caught:
        service.request(b"fail:no such customer")

    assert caught.value.fault == "ValueError: no such customer"
    assert int(service.request(b"pid"))  # the worker carries on


def test_messages_larger_than_a_ring_cross_intact_both_ways(service):
    service.start()
    payload = b"echo|" + random.Random(7).randbytes(3 * DEFAULT_CAPACITY)

    assert service.request(payload, timeout=20) == payload


def test_process_titles_name_the_role_and_cluster(service):
    service.config(workers={"count": 2})
    host = service.start()

    assert title(psutil.Process(host.pid)).startswith(f"irishost: supervisor {service.cluster} ")
    titles = sorted(title(worker) for worker in host.worker_count(2))
    assert titles[0].startswith(f"irishost: worker 0 {service.cluster} ")
    assert titles[1].startswith(f"irishost: worker 1 {service.cluster} ")


# -- dispatch -----------------------------------------------------------------------------


def test_a_request_goes_to_the_worker_with_fewest_outstanding(service):
    service.config(workers={"count": 2})
    service.start()
    held = service.request_async(b"wait:gate")
    busy = wait_for(lambda: service.records("request") and service.records("request")[-1][1])

    answered_by = {int(service.request(b"pid")) for _ in range(5)}
    second = service.request_async(b"wait:gate")
    wait_for(lambda: len(service.records("request")) == 7)
    service.open_gate("gate")

    assert busy not in answered_by, "requests went to the busy worker"
    assert int(held.result(5)) == busy
    assert int(second.result(5)) != busy, "two held requests landed on one worker"


def test_request_over_the_memory_cap_faults_at_once_naming_the_limit(service):
    service.config(limits={"request_memory": 1000})
    service.start()
    held = service.request_async(b"wait:gate|" + b"x" * 590)
    wait_for(lambda: service.records("request"))

    started = time.monotonic()
    with pytest.raises(iris.RemoteError) as caught:
        service.request(b"pid|" + b"x" * 600, timeout=10)
    elapsed = time.monotonic() - started
    with pytest.raises(iris.RemoteError) as alone:
        service.request(b"pid|" + b"x" * 1100, timeout=10)
    service.open_gate("gate")

    assert elapsed < 1.0
    assert "request memory limit" in caught.value.fault
    assert "1000 bytes" in caught.value.fault
    assert "request memory limit" in alone.value.fault
    held.result(5)
    assert int(service.request(b"pid|" + b"x" * 600))  # room again once the first is done


def test_a_request_past_its_deadline_is_not_started(service):
    service.config(limits={"request_threads": 1})
    service.start()
    held = service.request_async(b"wait:gate")
    wait_for(lambda: service.records("request"))

    with pytest.raises(iris.TimeoutError):
        service.request(b"pid:late", timeout=0.3)
    service.open_gate("gate")
    held.result(5)
    service.request(b"pid:after")  # queued behind the late one, so runs after its turn

    started = [text for _, _, text in service.records("request")]
    assert started == ["wait:gate", "pid:after"]


# -- caps per worker process -------------------------------------------------------------


def test_a_worker_runs_at_most_request_threads_handlers_at_once(service):
    service.config(workers={"count": 2}, limits={"request_threads": 2})
    host = service.start()
    calls = [service.request_async(b"peak:0.3") for _ in range(8)]

    peaks = {}
    for call in calls:
        pid, peak = json.loads(call.result(10))
        peaks[pid] = max(peaks.get(pid, 0), peak)

    assert peaks == {worker.pid: 2 for worker in host.worker_count(2)}


def test_a_worker_holds_at_most_broadcast_memory_bytes_of_waiting_broadcasts(service):
    service.config(limits={"broadcast_threads": 1, "broadcast_memory": 1000})
    service.start()
    service.conn.broadcast(service.cluster, b"wait:gate")
    wait_for(lambda: service.records("broadcast"))

    for number in range(3):  # 400 bytes each: two fit in 1000, the third does not
        service.conn.broadcast(service.cluster, b"queued %d|" % number + b"x" * 391)
    service.request(b"pid")  # the broadcasts reached the worker before this reply
    service.open_gate("gate")

    wait_for(lambda: len(service.records("broadcast")) == 3)
    service.request(b"pid")
    time.sleep(0.2)
    seen = [text for _, _, text in service.records("broadcast")]
    assert seen == ["wait:gate", "queued 0", "queued 1"]


# -- recycling ------------------------------------------------------------------------------


def runs(pids: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive pids."""
    lengths = [1]
    for before, after in zip(pids, pids[1:], strict=False):
        if after == before:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def test_a_worker_is_replaced_after_max_requests_without_failing_any(service):
    service.config(limits={"max_requests": 3})
    service.start()  # its readiness ping is the first worker's first request

    pids = [int(service.request(b"pid")) for _ in range(8)]

    assert runs(pids) == [2, 3, 3]
    assert len(set(pids)) == 3
    assert wait_for(lambda: gone(pids[0]) and gone(pids[3]), what="retired workers to exit")


def test_max_requests_jitter_spreads_the_recycling(service):
    service.config(limits={"max_requests": 2}, workers={"max_requests_jitter": 3})
    service.start()

    pids = [int(service.request(b"pid")) for _ in range(40)]

    # The first worker also served the readiness ping; the last has not reached its limit.
    lengths = runs(pids)[1:-1]
    assert all(2 <= length <= 5 for length in lengths), lengths
    assert len(set(lengths)) > 1, f"no jitter: {lengths}"


def test_a_recycled_worker_finishes_the_requests_it_holds(service):
    service.config(limits={"max_requests": 2, "request_threads": 2})
    service.start()  # the readiness ping is the first request served
    held = service.request_async(b"wait:gate")
    wait_for(lambda: service.records("request"))
    first = int(service.request(b"pid"))  # the second: the worker is recycled

    successor = wait_for(lambda: (pid := int(service.request(b"pid"))) != first and pid)
    service.open_gate("gate")

    assert int(held.result(5)) == first
    assert wait_for(lambda: gone(first), what="the retired worker to exit")
    assert int(service.request(b"pid")) == successor


def test_a_worker_over_max_rss_is_replaced(service):
    service.config(limits={"max_rss": "150MiB"})
    host = service.start()
    assert host.worker_count(1)[0].memory_info().rss < 100 * 2**20  # well below at first
    # Over max_rss, and below the 1.5 x max_rss at which it would be killed outright.
    bloated = int(service.request(b"alloc:170", timeout=10))

    replaced = wait_for(lambda: int(service.request(b"pid")) != bloated, timeout=10)

    assert replaced
    assert wait_for(lambda: gone(bloated), what="the bloated worker to exit")


# -- stopping ---------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(service):
    host = service.start()
    worker = host.worker_count(1)[0].pid
    held = service.request_async(b"sleep:0.5")
    wait_for(lambda: service.records("request"))

    assert host.stop() == 0, host.log()
    assert int(held.result(5)) == worker
    assert gone(worker)
