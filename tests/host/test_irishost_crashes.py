"""irishost when workers fail: crashes, stuck handlers, workers that cannot start,
and a supervisor killed with SIGKILL.

A dead worker's requests must fail at once with a fault that says how it
died, its replacement must come up (with backoff), and the other workers
must carry on. Every test runs under pytest-timeout, so a hang is a failure.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from support import fault_of, gone, wait_for

import iris
from irishost.supervisor.handle import PUT_TIMEOUT
from irishost.wire import frames
from irishost.wire.ring import DEFAULT_CAPACITY


def serving_pid(service) -> int:
    """The pid of the worker that answers next.

    A request made while no worker is up waits for the replacement to be
    ready (test_irishost_hardening.py has the details).
    """
    return int(service.request(b"pid", timeout=10))


@pytest.mark.parametrize(
    ("command", "how"),
    [
        ("segv:0.2", "killed by SIGSEGV"),
        ("abort:0.2", "killed by SIGABRT"),
        ("exit:7,0.2", "exited with code 7"),
        ("kill:0.2", "killed by SIGKILL"),
    ],
)
def test_a_crash_faults_every_request_the_worker_held(service, command, how):
    service.config(limits={"request_threads": 1})
    host = service.start()
    victim = host.worker_count(1)[0].pid
    started = time.monotonic()
    crash = service.request_async(command.encode(), timeout=30)
    wait_for(lambda: service.records("request"))
    queued = service.request_async(b"pid:queued", timeout=30)

    faults = [fault_of(crash, 10), fault_of(queued, 10)]
    elapsed = time.monotonic() - started

    assert elapsed < 1.5, "the faults were not immediate"
    for fault in faults:
        assert f"worker 0 (pid {victim}) died while handling the request: {how}" in fault
    assert service.records("request") == [["request", victim, command]]
    replacement = serving_pid(service)
    assert replacement != victim
    assert gone(victim)


def test_other_workers_keep_serving_when_one_is_killed(service):
    service.config(workers={"count": 2}, limits={"request_threads": 1})
    host = service.start()
    held_elsewhere = service.request_async(b"wait:gate")
    survivor = wait_for(lambda: service.records("request") and service.records("request")[0][1])
    victim = next(w.pid for w in host.worker_count(2) if w.pid != survivor)
    doomed = service.request_async(b"wait:never")
    wait_for(lambda: len(service.records("request")) == 2)

    os.kill(victim, signal.SIGKILL)  # as the kernel's OOM killer would
    fault = fault_of(doomed)

    assert "died while handling the request: killed by SIGKILL" in fault
    assert "out of memory" in fault
    service.open_gate("gate")
    assert int(held_elsewhere.result(5)) == survivor
    assert int(service.request(b"pid")) in {survivor, *(w.pid for w in host.workers())}
    assert victim not in {w.pid for w in host.worker_count(2)}, "the worker was not replaced"


def test_a_worker_that_keeps_crashing_is_respawned_with_growing_backoff(service):
    service.start()
    delays = []
    for _ in range(4):
        victim = serving_pid(service)
        with pytest.raises(iris.RemoteError):
            service.request(b"exit:1")
        died = time.monotonic()
        successor = serving_pid(service)
        booted = next(t for what, pid, _, t in service.records("init") if pid == successor)
        delays.append(booted - died)
        assert successor != victim

    # 0.1 s, 0.2 s, 0.4 s, 0.8 s: each quick death doubles the wait before the next fork.
    # (The fault reaches the test a little after the death, hence the 50 ms allowance.)
    # Lower bounds only: on a loaded machine a fork and init can take longer
    # than the first waits (0.51 s for the first, 0.49 s for the second, once).
    for number, delay in enumerate(delays):
        assert delay >= 0.1 * 2**number - 0.05, delays


# -- stuck handlers ---------------------------------------------------------------------------


def test_a_handler_stuck_past_deadline_and_grace_gets_its_worker_replaced(service):
    service.config(workers={"timeout_grace": "0.3s"}, limits={"request_threads": 1})
    host = service.start()
    stuck = host.worker_count(1)[0].pid
    hung = service.request_async(b"hang", timeout=0.3)
    wait_for(lambda: service.records("request"))
    queued = service.request_async(b"pid:queued", timeout=30)

    with pytest.raises(iris.TimeoutError):
        hung.result(5)  # the relay answers the caller at the deadline
    fault = fault_of(queued)

    assert "killed by the supervisor: a handler ran past its deadline plus 0.3 s" in fault
    assert serving_pid(service) != stuck
    assert gone(stuck)


def test_a_stuck_handler_is_noticed_behind_a_longer_running_request(service):
    service.config(workers={"timeout_grace": "0.3s"}, limits={"request_threads": 2})
    service.start()
    slow = service.request_async(b"sleep:4", timeout=5)  # within its deadline all along
    wait_for(lambda: service.records("request"))
    started = time.monotonic()
    service.request_async(b"hang", timeout=0.3)

    fault = fault_of(slow, timeout=6)

    assert "past its deadline plus 0.3 s" in fault
    assert time.monotonic() - started < 2.5, "the stuck handler was noticed late"


# -- workers that cannot start ---------------------------------------------------------------


def test_init_raising_stops_the_host_with_exit_4_and_the_traceback(service):
    service.config(workers={"count": 2})
    host = service.start(env={"PROBE_INIT": "raise"}, wait=False)

    assert host.wait_exit() == 4
    log = host.log()
    assert "irishost: worker" in log and "failed to start" in log
    assert "Traceback (most recent call last)" in log
    assert "RuntimeError: init refused: the database is down" in log
    assert len(service.records("init")) <= 2, "workers were forked again and again"


@pytest.mark.parametrize(
    ("mode", "how"), [("exit", "exited with code 9"), ("kill", "killed by SIGKILL")]
)
def test_workers_dying_during_init_stop_the_host_with_exit_4(service, mode, how):
    host = service.start(env={"PROBE_INIT": mode}, wait=False)

    assert host.wait_exit() == 4
    assert f"irishost: workers keep dying during start-up; the last one {how}" in host.log()
    assert len(service.records("init")) == 3


def test_service_registers_only_once_a_worker_is_ready(service):
    """The first worker dies in init; the second comes up. No caller may see the gap."""
    host = service.start(env={"PROBE_INIT": "exit-once"}, wait=False)
    conn = service.connect()

    deadline = time.monotonic() + 15
    while True:  # poll fast, so a moment without a ready worker would be hit
        try:
            conn.request(service.cluster, b"ping", 0.02)
            break
        except iris.TimeoutError:
            assert time.monotonic() < deadline, host.log()

    assert len(service.records("init")) == 2


# -- the supervisor killed outright ----------------------------------------------------------


def test_workers_exit_on_their_own_when_the_supervisor_is_killed(service, relay):
    service.config(relay={"port": relay.port, "embedded": False}, workers={"count": 2})
    host = service.start()
    service.request_async(b"wait:never")  # one worker is busy in a handler
    wait_for(lambda: service.records("request"))
    workers = host.worker_count(2)

    os.kill(host.pid, signal.SIGKILL)
    host.wait_exit()

    for worker in workers:
        assert gone(worker.pid, wait=5.0), f"worker {worker.pid} outlived its supervisor"
    assert service.shm_leftovers() == []


def test_a_worker_killed_by_a_signal_without_a_name_is_reported_and_replaced(service):
    host = service.start()
    victim = host.worker_count(1)[0].pid
    held = service.request_async(b"wait:never")
    wait_for(lambda: service.records("request"))

    os.kill(victim, signal.SIGRTMIN + 3)  # terminates; Python's signal.Signals has no name for it

    number = int(signal.SIGRTMIN) + 3
    assert f"died while handling the request: killed by signal {number}" in fault_of(held)
    assert serving_pid(service) != victim


# -- a wedged worker -----------------------------------------------------------------------


def request_taking(record_size: int) -> bytes:
    """A request whose frame fills exactly ``record_size`` bytes of a worker's inbox ring.

    A REQUEST frame is msgpack [kind, id, deadline, payload]: 17 bytes beside a
    payload over 64 KiB while the relay's request ids stay below 128; the ring
    adds a 4-byte length word to each record.
    """
    request = b"pid:held|".ljust(record_size - 4 - 17, b"x")
    assert len(frames.Request(127, time.monotonic(), request).encode()) + 4 == record_size
    return request


def test_a_wedged_worker_costs_only_the_work_it_cannot_take(service):
    """New work for a stopped worker with a full inbox fails; nothing else does."""
    host = service.start()
    worker = host.worker_count(1)[0].pid
    # Three records filling the ring's usable space (all but its 8-byte abort reserve).
    sizes = [1398096, 1398096, 1398104]
    assert sum(sizes) == DEFAULT_CAPACITY - 8
    os.kill(worker, signal.SIGSTOP)
    try:
        held = []
        for size in sizes:  # in this order, or the ring would not end up exactly full
            held.append(service.request_async(request_taking(size), timeout=5))
            time.sleep(0.1)
        overflow = service.request_async(b"pid:overflow", timeout=5)
        assert "did not take the request" in fault_of(overflow)
        tunnel = service.conn.tunnel(service.cluster, 5)  # its TUNNEL frame cannot go in
        time.sleep(PUT_TIMEOUT + 0.5)  # the supervisor gives up on the frame meanwhile
    finally:
        os.kill(worker, signal.SIGCONT)

    assert [int(call.result(10)) for call in held] == [worker] * 3
    with pytest.raises(iris.ClosedError):
        tunnel.recv(5)
    assert int(service.request(b"pid")) == worker


def test_a_wedged_worker_does_not_hold_up_broadcasts_or_the_other_worker(service):
    """Best-effort frames for a stopped worker give up quickly, and it is passed
    over until it answers again, instead of holding the relay reader a second
    per frame."""
    service.config(workers={"count": 2})
    host = service.start()
    stopped, other = (worker.pid for worker in host.worker_count(2))
    os.kill(stopped, signal.SIGSTOP)
    try:
        started = time.monotonic()
        for _ in range(8):  # 8 MiB: twice the stopped worker's inbox
            service.conn.broadcast(service.cluster, b"b" * (1 << 20))
        answers = {int(service.request(b"pid", timeout=2)) for _ in range(20)}
        elapsed = time.monotonic() - started
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert answers == {other}
    # Held a PUT_TIMEOUT per frame, the broadcasts its 4 MiB inbox cannot take
    # would cost 4 s or more; a loaded machine can take over 1 s without that.
    assert elapsed < 2.5 * PUT_TIMEOUT, f"the stopped worker held the others up for {elapsed:.2f} s"
    assert wait_for(lambda: int(service.request(b"pid")) == stopped, what="the worker back")
