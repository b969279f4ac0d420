"""A handler's close() and atexit callbacks on every graceful worker exit.

Real irishost processes with forked workers behind a real relay; the probe
handler (probe.py) records each close() call and, with PROBE_ATEXIT, each
atexit callback, one line per process, so a test can count them by pid.
"""

from __future__ import annotations

import signal

from production_support import run_ok
from relay_process import RelayProcess
from support import free_port, gone, wait_for
from test_irishost_async import async_config


def closes(service) -> list[int]:
    """The pid of each close() call, in order (a pid twice would be a bug)."""
    return [pid for _, pid, _ in service.records("close")]


def test_irishost_stop_runs_close_once_per_worker(service):
    service.config(workers={"count": 3})
    host = service.start()
    pids = {worker.pid for worker in host.worker_count(3)}
    assert closes(service) == []

    run_ok(service, "stop")

    assert host.wait_exit() == 0
    assert sorted(closes(service)) == sorted(pids)
    assert host.log().count("worker drained; exiting") == 3
    # init's connection was still open in close(), for a last outbound call.
    assert [conn_closed for *_, conn_closed in service.records("close")] == [False] * 3


def test_close_waits_for_the_request_in_flight_at_stop(service):
    host = service.start()
    (worker,) = host.worker_count(1)
    reply = service.request_async(b"sleep:1")
    wait_for(lambda: service.records("request"), what="the request to start")

    host.proc.send_signal(signal.SIGTERM)

    assert int(reply.result(10)) == worker.pid
    assert host.wait_exit() == 0
    order = [what for what, *_ in service.records() if what in ("request", "close")]
    assert order == ["request", "close"]


def test_a_reload_runs_close_once_per_retired_worker(service):
    service.config(workers={"count": 2})
    host = service.start()
    old = {worker.pid for worker in host.worker_count(2)}

    run_ok(service, "reload", "--wait")
    wait_for(lambda: all(gone(pid) for pid in old), what="the old workers to exit")

    assert sorted(closes(service)) == sorted(old)
    new = {worker.pid for worker in host.worker_count(2)}
    assert not new & old


def test_a_recycled_worker_runs_close(service):
    service.config(limits={"max_requests": 3})
    service.start()  # its readiness ping is the first worker's first request

    pids = [int(service.request(b"pid")) for _ in range(4)]
    first = pids[0]
    assert pids[-1] != first
    wait_for(lambda: gone(first), what="the recycled worker to exit")

    assert closes(service) == [first]


def test_scaling_down_runs_close_in_the_retired_workers_only(service):
    host = service.start()
    (first,) = host.worker_count(1)
    run_ok(service, "scale", "3")
    extra = {worker.pid for worker in host.worker_count(3)} - {first.pid}

    run_ok(service, "scale", "1")
    wait_for(lambda: all(gone(pid) for pid in extra), what="scaled down")

    assert sorted(closes(service)) == sorted(extra)


def test_a_sigkilled_worker_runs_no_close(service):
    host = service.start()
    (worker,) = host.worker_count(1)

    worker.send_signal(signal.SIGKILL)
    wait_for(lambda: gone(worker.pid), what="the killed worker to exit")
    (replacement,) = wait_for(
        lambda: [w for w in host.workers() if w.pid != worker.pid], what="its replacement"
    )
    assert host.stop() == 0, host.log()

    assert closes(service) == [replacement.pid]


def test_a_raising_close_is_logged_with_its_traceback_and_the_worker_exits_0(service):
    service.config(workers={"count": 2})
    host = service.start(env={"PROBE_CLOSE": "raise"})
    retired = max(host.worker_count(2), key=lambda w: int(w.cmdline()[0].split()[2]))

    run_ok(service, "scale", "1")
    wait_for(lambda: gone(retired.pid), what="the retired worker to exit")
    host.wait_log("retired worker exited")
    log = host.log()
    assert "handler close() raised" in log
    assert "RuntimeError: close refused: the pool is gone" in log
    (line,) = [line for line in log.splitlines() if "handler close() raised" in line]
    assert f"service={service.cluster}" in line and "worker=1" in line
    (exited,) = [line for line in log.splitlines() if "retired worker exited" in line]
    assert "exited with code 0" in exited
    assert closes(service) == [retired.pid]


def test_atexit_callbacks_registered_in_init_run_on_a_graceful_exit_only(service):
    service.config(workers={"count": 2})
    host = service.start(env={"PROBE_ATEXIT": "1"})
    killed, kept = host.worker_count(2)
    killed.send_signal(signal.SIGKILL)
    survivors = wait_for(
        lambda: len(pids := {w.pid for w in host.workers()} - {killed.pid}) == 2 and pids,
        what="the killed worker's replacement",
    )
    assert kept.pid in survivors

    run_ok(service, "stop")

    assert host.wait_exit() == 0
    ran = [pid for _, pid in service.records("atexit")]
    assert sorted(ran) == sorted(survivors)
    for pid in survivors:  # after close(), in each process
        mine = [what for what, who, *_ in service.records() if who == pid]
        assert mine.index("close") < mine.index("atexit")


def test_an_async_handlers_close_is_awaited_once_per_worker_at_stop(service):
    async_config(service, workers={"count": 2})
    host = service.start()
    pids = {worker.pid for worker in host.worker_count(2)}

    run_ok(service, "stop")

    assert host.wait_exit() == 0
    closed = [int(line) for line in (service.dir / "closed.txt").read_text().split()]
    assert sorted(closed) == sorted(pids)


def test_workers_retired_after_a_relay_drop_run_close_after_handle_drop(service, tmp_path):
    port = free_port()
    relay = RelayProcess(["--port", str(port)], tmp_path / "relay-0.log")
    service.config(relay={"port": port, "embedded": False}, workers={"count": 2})
    try:
        host = service.start()
        old = {worker.pid for worker in host.worker_count(2)}
        relay.proc.send_signal(signal.SIGKILL)
        relay.kill()
        wait_for(lambda: len(service.records("drop")) == 2, what="handle_drop in each worker")
        relay = RelayProcess(["--port", str(port)], tmp_path / "relay-1.log")
        wait_for(lambda: all(gone(pid) for pid in old), what="the dropped workers to exit")

        assert sorted(closes(service)) == sorted(old)
        for pid in old:  # handle_drop first, then close(), in each worker
            mine = [what for what, who, *_ in service.records() if who == pid]
            assert mine.index("drop") < mine.index("close")
        host.stop()
    finally:
        relay.stop()
