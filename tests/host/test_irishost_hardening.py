"""irishost against the faults of real deployments (issue 9): a worker that
fails to start after the service is up, a handler leaking memory fast, a
supervisor killed while a worker is still in init, a handler that forks,
a handler misusing its tunnel, and requests arriving while every worker is
down. Each runs a real host, real workers and real signals.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from production_support import status
from support import fault_of, gone, wait_for

import iris

MiB = 2**20


def ready_pids(service) -> set[int]:
    return {int(row["PID"]) for row in status(service)["rows"] if row["STATE"] == "ready"}


def take_down(service, host) -> None:
    """SIGKILL the only worker while its replacements fail in init; return once the
    supervisor knows (so no request can still reach the dead one)."""
    service.open_gate("init-fails")
    os.kill(host.worker_count(1)[0].pid, signal.SIGKILL)
    wait_for(lambda: status(service)["header"]["health"] != "ok", what="the worker down")


# -- a worker that cannot start once the service is up (item 1) ---------------------------------


def test_a_replacement_failing_in_init_is_a_crash_of_its_slot(notify, service):
    """The database is briefly down when a worker is replaced: the host stays up,
    says it is degraded, retries the slot with backoff, and the other worker serves."""
    service.config(workers={"count": 2})
    host = service.start(env={"PROBE_INIT": "raise-while:init-fails", **notify.env})
    victim, survivor = (worker.pid for worker in host.worker_count(2))

    service.open_gate("init-fails")
    since = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    line = notify.wait_status("failed to start", since=since, timeout=5).fields["STATUS"]
    assert "; degraded: worker " in line
    assert " failed to start: RuntimeError: init refused while init-fails exists" in line
    wait_for(lambda: len(service.records("init")) >= 2 + 3, what="the slot retried")
    assert host.proc.poll() is None, host.log()
    assert {int(service.request(b"pid")) for _ in range(5)} == {survivor}
    health = status(service)["header"]["health"]
    assert re.fullmatch(
        r"degraded: worker \d failed to start: RuntimeError: init refused.*", health
    )
    log = host.log()
    assert "worker failed to start; retrying" in log
    assert "Traceback (most recent call last)" in log

    (service.dir / "init-fails").unlink()  # the database is back
    wait_for(lambda: len(ready_pids(service)) == 2, timeout=15, what="the slot back")
    assert status(service)["header"]["health"] == "ok"
    notify.wait_status("workers 2/2", since=time.monotonic(), timeout=5)


def test_a_recycled_worker_whose_successor_fails_in_init_leaves_requests_waiting(service):
    """max_requests retires the only worker while its successor cannot start: the
    host stays up, and requests wait for the successor instead of failing."""
    service.config(limits={"max_requests": 2})
    host = service.start(env={"PROBE_INIT": "raise-while:init-fails"})  # served 1: the ping
    retired = host.worker_count(1)[0].pid
    service.open_gate("init-fails")

    assert int(service.request(b"pid")) == retired  # the second: recycled
    assert gone(retired, wait=5)
    waiting = service.request_async(b"pid", timeout=15)
    host.wait_log("worker failed to start; retrying")
    (service.dir / "init-fails").unlink()

    assert int(waiting.result(15)) != retired
    assert host.proc.poll() is None


def test_a_hung_init_at_start_is_killed_after_boot_timeout_with_exit_4(service):
    service.config(workers={"boot_timeout": "1s"})
    service.open_gate("init-hangs")
    started = time.monotonic()
    host = service.start(env={"PROBE_INIT": "hang-while:init-hangs"}, wait=False)

    assert host.wait_exit() == 4
    assert time.monotonic() - started < 8
    assert (
        "worker 0 failed to start: killed by the supervisor: "
        "still starting after workers.boot_timeout (1 s)" in host.log()
    )


def test_a_replacement_hung_in_init_is_killed_after_boot_timeout_and_retried(service):
    service.config(workers={"count": 2, "boot_timeout": "1.5s"})
    host = service.start(env={"PROBE_INIT": "hang-while:init-hangs"})
    victim, survivor = (worker.pid for worker in host.worker_count(2))

    service.open_gate("init-hangs")
    os.kill(victim, signal.SIGKILL)

    host.wait_log("still starting after workers.boot_timeout", timeout=10)
    wait_for(lambda: len(service.records("init")) >= 2 + 2, what="a second try")
    assert int(service.request(b"pid")) == survivor
    assert "still starting after" in status(service)["header"]["health"]
    (service.dir / "init-hangs").unlink()
    wait_for(lambda: len(ready_pids(service)) == 2, timeout=15, what="the slot back")


# -- memory (item 11) ---------------------------------------------------------------------------


def test_a_worker_far_over_max_rss_is_killed_at_once(service):
    """A handler growing 320 MiB a second is stopped near 1.5 x max_rss, not drained."""
    service.config(limits={"max_rss": "100MiB"})
    host = service.start()
    victim = host.worker_count(1)[0].pid

    fault = fault_of(service.request_async(b"grow:320,600", timeout=10), timeout=10)

    assert "died while handling the request: killed by the supervisor" in fault
    assert "exceeded max_rss 100.0 MiB more than 1.5 times" in fault
    seen = float(re.search(r"resident memory ([0-9.]+) MiB", fault)[1])
    # The first sample past 150 MiB, not one long after (undrained, it reaches 600 MiB).
    # Shown to 0.1 MiB: just past 150 reads "150.0". Under 300: killed at the
    # first sample past the line, not drained (the handler would reach 600 MiB).
    # Not timed: a loaded machine slows the handler's growth as much as the check.
    assert 150 <= seen < 300, fault
    assert gone(victim, wait=5)
    assert int(service.request(b"pid")) != victim


# -- orphans and forks (item 12) --------------------------------------------------------------


def test_a_worker_still_in_init_dies_with_its_supervisor(service, relay):
    service.config(relay={"port": relay.port, "embedded": False})
    service.open_gate("init-hangs")
    host = service.start(env={"PROBE_INIT": "hang-while:init-hangs"}, wait=False)
    booting = wait_for(lambda: service.records("init"), what="init to start")[0][1]
    host.workers()  # remembered, so teardown kills it should it survive

    os.kill(host.pid, signal.SIGKILL)
    host.wait_exit()

    assert gone(booting, wait=5), "a worker in init outlived its supervisor"


def test_a_process_forked_by_a_handler_never_answers_for_the_worker(service):
    host = service.start()
    worker = host.worker_count(1)[0].pid

    # The child returns at once, the worker 0.2 s later.
    replies = [service.request(b"fork:0.2") for _ in range(5)]

    assert replies == [str(worker).encode()] * 5
    children = [child for _, _, child in service.records("forked")]
    assert len(children) == 5
    for child in children:
        assert gone(child, wait=5), "a forked child lived on in the worker's code"
    host.wait_log("a process forked by a handler returned into the worker; it exits")
    assert int(service.request(b"pid")) == worker


# -- tunnels (item 13) --------------------------------------------------------------------------


def test_a_bad_tunnel_send_timeout_is_a_value_error_in_the_handler(service):
    host = service.start()
    tunnel = service.conn.tunnel(service.cluster, 5)

    tunnel.send(b"bad-timeout", 5)
    error = tunnel.recv(5)
    tunnel.send(b"still open", 5)  # the handler went on to echo

    assert error.decode().startswith("ValueError: tunnel send timeout must be None or a number")
    assert tunnel.recv(5).endswith(b":still open")
    tunnel.close()
    assert "Traceback" not in host.log()


def test_a_tunnel_frame_the_supervisor_cannot_perform_closes_only_that_tunnel(service):
    host = service.start()
    broken = service.conn.tunnel(service.cluster, 5)

    broken.send(b"bad-frame", 5)

    with pytest.raises(iris.ClosedError):
        broken.recv(5)
    closed = wait_for(lambda: service.records("tunnel closed"), what="the handler told")
    assert "tunnel bridge failed: ValueError" in closed[0][2]
    # The log writer writes the line moments later: it is a thread of its own.
    host.wait_log("tunnel bridge failed")
    healthy = service.conn.tunnel(service.cluster, 5)
    healthy.send(b"echo", 5)
    healthy.send(b"hello", 5)
    assert healthy.recv(5).endswith(b":hello")
    healthy.close()


# -- every worker down (item 16) --------------------------------------------------------------


def test_requests_wait_for_a_respawning_worker_instead_of_failing(service):
    host = service.start()
    for _ in range(2):  # two quick deaths: the next respawn waits 0.2 s
        victim = host.worker_count(1)[0].pid
        with pytest.raises(iris.RemoteError):
            service.request(b"exit:1")
        assert gone(victim, wait=5)

    reply = service.request(b"pid", timeout=5)  # no worker exists right now

    assert int(reply) != victim
    assert int(reply) in {worker.pid for worker in host.workers()}


def test_a_request_waiting_past_its_deadline_times_out_and_never_runs(service):
    host = service.start(env={"PROBE_INIT": "raise-while:init-fails"})
    take_down(service, host)

    with pytest.raises(iris.TimeoutError):
        service.request(b"pid:late", timeout=0.5)
    (service.dir / "init-fails").unlink()

    assert int(service.request(b"pid:fresh", timeout=10))
    assert [text for _, _, text in service.records("request")] == ["pid:fresh"]


def test_requests_waiting_for_a_worker_are_bounded_by_request_memory(service):
    service.config(limits={"request_memory": "1MiB"})
    host = service.start(env={"PROBE_INIT": "raise-while:init-fails"})
    take_down(service, host)

    first = service.request_async(b"echo|".ljust(600_000, b"a"), timeout=15)
    wait_for(lambda: status(service)["header"]["waiting"] == "1", what="the first waiting")
    second = service.request_async(b"echo|".ljust(600_000, b"b"), timeout=15)
    fault = fault_of(second, timeout=5)
    (service.dir / "init-fails").unlink()

    assert fault == (
        "no worker is ready, and the requests waiting for one fill the request memory "
        "limit (1048576 bytes, request is 600000 bytes)"
    )
    assert first.result(15) == b"echo|".ljust(600_000, b"a")


def test_requests_waiting_for_a_worker_get_the_shutdown_fault_on_stop(service):
    host = service.start(env={"PROBE_INIT": "raise-while:init-fails"})
    take_down(service, host)
    waiting = service.request_async(b"pid", timeout=30)
    wait_for(lambda: status(service)["header"]["waiting"] == "1", what="the request waiting")

    host.proc.send_signal(signal.SIGTERM)

    assert fault_of(waiting, timeout=5) == "service is shutting down"
    assert host.wait_exit() == 0
