"""irishost under systemd: the notify protocol, the watchdog, stopping, ``irishost
status`` and the log format.

Each test runs the real ``irishost`` command with NOTIFY_SOCKET pointing at a
datagram socket the test holds, as systemd would, and drives it with real
signals. The kernel tells the listener who sent each datagram, so the tests
also check that only the supervisor speaks (the unit's NotifyAccess=main).
Reloads, scaling and a restarted relay are in
test_irishost_production_reload.py and test_irishost_production_relay.py.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid

import pytest
from production_support import NotifyListener, parse_reply, status, write_handler
from support import gone, wait_for, worker_processes

import iris
from irishost.ops.control import query_status
from irishost.supervisor.loop import STATUS_SECONDS

STATUS_LINE = re.compile(
    r"workers (\d+)/(\d+), served (\d+), in flight (\d+), restarts (\d+), relay (\w+)"
)


def in_flight(service) -> int:
    return query_status(service.dir / "control.sock")["in_flight"]


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- the notify sequence ------------------------------------------------------------------


def test_ready_comes_once_the_workers_are_ready_and_the_service_is_registered(notify, service):
    handler = write_handler(service.dir, init_delay=1.0)
    service.config(service={"handler": handler}, workers={"count": 2})
    started = time.monotonic()
    host = service.start(env=notify.env, wait=False)

    ready = notify.wait("READY", timeout=20)
    reply = service.request(b"echo:first", timeout=1.0)  # no retry: it must work at once
    answered = time.monotonic()

    inits = service.records("init done")
    assert len(inits) == 2
    assert ready.at - started > 1.0
    assert max(at for _, _, _, at in inits) < ready.at, "READY=1 before a worker's init ended"
    assert parse_reply(reply, b"echo:first").pid in {pid for _, pid, _, _ in inits}
    assert answered - ready.at < 1.0
    assert notify.states() == ["READY=1"]
    assert {datagram.pid for datagram in notify.datagrams()} == {host.pid}


def test_status_lines_report_workers_served_in_flight_restarts_and_relay(notify, service):
    service.config(service={"handler": write_handler(service.dir)}, workers={"count": 2})
    service.start(env=notify.env)
    for number in range(5):
        service.request(b"echo:%d" % number)
    held = service.request_async(b"sleep:%g" % (STATUS_SECONDS + 1))
    wait_for(lambda: in_flight(service) == 1, what="the request to reach a worker")
    since = time.monotonic()

    busy = notify.wait_status("in flight 1", since=since, timeout=STATUS_SECONDS + 1)
    held.result(STATUS_SECONDS + 5)
    idle = notify.wait_status("in flight 0", since=busy.at, timeout=STATUS_SECONDS + 1)

    workers, count, served, flying, restarts, relay = STATUS_LINE.fullmatch(
        busy.fields["STATUS"]
    ).groups()
    assert (workers, count, flying, restarts, relay) == ("2", "2", "1", "0", "connected")
    assert int(served) >= 5
    assert int(STATUS_LINE.fullmatch(idle.fields["STATUS"])[3]) == int(served) + 1
    times = [d.at for d in notify.datagrams("STATUS") if d.at >= since]
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    assert gaps and all(STATUS_SECONDS - 0.5 < gap < STATUS_SECONDS + 0.5 for gap in gaps), gaps


def test_sighup_sends_reloading_with_monotonic_usec_then_ready_and_sigterm_stopping(
    notify, service
):
    service.config(service={"handler": write_handler(service.dir)})
    host = service.start(env=notify.env)
    notify.wait("READY")

    before = monotonic_usec()
    host.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait("RELOADING")
    after = monotonic_usec()
    reloaded = notify.wait("READY", count=2)
    host.proc.send_signal(signal.SIGTERM)
    stopping = notify.wait("STOPPING")

    assert set(reloading.fields) == {"RELOADING", "MONOTONIC_USEC"}
    assert re.fullmatch(r"[0-9]+", reloading.fields["MONOTONIC_USEC"])
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    assert reloading.at <= reloaded.at <= stopping.at
    assert host.wait_exit() == 0
    assert notify.states() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    assert {datagram.pid for datagram in notify.datagrams()} == {host.pid}


def test_an_abstract_namespace_notify_socket_gets_the_same_messages(service):
    listener = NotifyListener(f"@irishost-test-{uuid.uuid4().hex}")
    try:
        service.config(service={"handler": write_handler(service.dir)})
        host = service.start(env=listener.env)
        listener.wait("READY")
        listener.wait("STATUS")
        host.proc.send_signal(signal.SIGTERM)
        listener.wait("STOPPING")

        assert host.wait_exit() == 0
        assert listener.states() == ["READY=1", "STOPPING=1"]
    finally:
        listener.close()


# -- the watchdog ---------------------------------------------------------------------------


def test_watchdog_pings_every_half_interval_and_stop_while_the_loop_is_blocked(notify, service):
    service.config(service={"handler": write_handler(service.dir)})
    host = service.start(env={**notify.env, "WATCHDOG_USEC": "400000"})
    notify.wait("WATCHDOG", count=8)

    def pings(since: float = 0.0, until: float = float("inf")) -> list[float]:
        return [d.at for d in notify.datagrams("WATCHDOG") if since <= d.at < until]

    steady = pings()[-6:]
    stopped = time.monotonic()
    host.proc.send_signal(signal.SIGSTOP)  # the loop cannot run: a real hang, as far as pings go
    try:
        time.sleep(1.0)
    finally:
        resumed = time.monotonic()
        host.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: len(pings(since=resumed)) >= 4, timeout=3, what="pings after SIGCONT")
    service.request(b"echo:still serving")

    gaps = [later - earlier for earlier, later in zip(steady, steady[1:], strict=False)]
    assert max(gaps) < 0.4, f"a gap as long as WATCHDOG_USEC: {gaps}"
    assert 0.15 < statistics.median(gaps) < 0.25, gaps
    # A datagram sent just before SIGSTOP may still be on its way.
    assert pings(since=stopped + 0.05, until=resumed) == []
    assert pings(since=resumed)[0] - resumed < 0.3
    assert all(d.fields == {"WATCHDOG": "1"} for d in notify.datagrams("WATCHDOG"))


# -- stopping ---------------------------------------------------------------------------------


def test_sigterm_finishes_requests_in_flight_and_faults_new_ones_then_exits_0(notify, service):
    handler = write_handler(service.dir)
    service.config(
        service={"handler": handler},
        workers={"count": 2, "shutdown_timeout": "3s"},
        limits={"request_threads": 1},
    )
    host = service.start(env=notify.env)
    workers = {worker.pid for worker in host.worker_count(2)}
    calls = [service.request_async(b"sleep:1") for _ in range(4)]  # two per worker, in turn
    wait_for(lambda: in_flight(service) == 4, what="four requests in the workers")

    host.proc.send_signal(signal.SIGTERM)
    notify.wait("STOPPING")
    asked = time.monotonic()
    with pytest.raises(iris.RemoteError) as late:
        service.request(b"echo:too late", timeout=5)
    refused = time.monotonic()

    assert refused - asked < 0.5, "a new request during the stop waited instead of failing"
    assert "shutting down" in late.value.fault
    replies = [parse_reply(call.result(5), b"sleep:1") for call in calls]
    assert {reply.pid for reply in replies} == workers
    assert host.wait_exit() == 0
    assert all(gone(pid, wait=2) for pid in workers)
    assert service.shm_leftovers() == []


def test_a_second_sigint_during_a_slow_stop_stops_at_once(notify, service):
    service.config(
        service={"handler": write_handler(service.dir)},
        workers={"shutdown_timeout": "30s"},
    )
    host = service.start(env=notify.env)
    worker = host.worker_count(1)[0].pid
    held = service.request_async(b"sleep:20", timeout=30)
    wait_for(lambda: in_flight(service) == 1, what="the request to reach the worker")

    host.proc.send_signal(signal.SIGINT)
    notify.wait("STOPPING")
    time.sleep(0.3)
    assert host.proc.poll() is None, "the first SIGINT did not wait for the request"
    host.proc.send_signal(signal.SIGINT)
    second = time.monotonic()

    assert host.wait_exit(timeout=5) == 0
    assert time.monotonic() - second < 2.0
    assert gone(worker, wait=2)
    with pytest.raises((iris.ClosedError, iris.RemoteError)):
        held.result(5)
    assert service.shm_leftovers() == []


# -- irishost status ----------------------------------------------------------------------------


def test_irishost_status_shows_the_host_and_a_row_per_worker_then_fails_once_it_is_gone(service):
    service.config(service={"handler": write_handler(service.dir)}, workers={"count": 2})
    host = service.start()
    crashed = host.worker_count(2)[1].pid
    os.kill(crashed, signal.SIGKILL)  # so that a restart shows
    wait_for(lambda: query_status(service.dir / "control.sock")["restarts"] == 1)
    workers = {worker.pid for worker in host.worker_count(2)}
    for number in range(6):
        service.request(b"echo:%d" % number)

    shown = status(service)
    header, rows = shown["header"], shown["rows"]

    assert list(header) == [
        "service", "cluster", "pid", "uptime", "relay", "served", "in flight", "waiting",
        "restarts", "failed", "workers", "health", "logging",
    ]  # fmt: skip
    assert header["service"] == "service"  # the config's name
    assert header["cluster"] == service.cluster
    assert header["pid"] == str(host.pid)
    assert re.fullmatch(r"\d+s", header["uptime"])
    assert header["relay"] == f"connected (port {service.port})"
    assert int(header["served"]) >= 6
    assert (header["in flight"], header["waiting"]) == ("0", "0")
    assert (header["restarts"], header["workers"]) == ("1", "2 alive")
    # The killed worker held no request: no failure but, on a loaded machine, a
    # start-up ping of 0.2 s that expired waiting for the first worker.
    assert re.fullmatch(r"0|(\d+) \(expired \1\)", header["failed"]), header["failed"]
    assert shown["columns"] == [
        "WORKER", "PID", "STATE", "SERVED", "IN FLIGHT", "RSS", "USS", "PSS", "RESTARTS",
        "UPTIME",
    ]  # fmt: skip
    assert {int(row["PID"]) for row in rows} == workers and crashed not in workers
    assert sorted(row["WORKER"] for row in rows) == ["0", "1"]
    assert all(row["STATE"] == "ready" and row["IN FLIGHT"] == "0" for row in rows)
    assert sum(int(row["SERVED"]) for row in rows) >= 6
    assert all(re.fullmatch(r"\d+\.\d MiB", row[size]) for row in rows for size in ("RSS", "PSS"))
    assert all(re.fullmatch(r"\d+(\.\d KiB| B|\.\d MiB)", row["USS"]) for row in rows), rows
    assert all(re.fullmatch(r"\d+s", row["UPTIME"]) for row in rows), rows
    assert {row["WORKER"]: row["RESTARTS"] for row in rows} == {"0": "0", "1": "1"}
    assert header["health"] == "ok"  # the crashed slot is back

    assert host.stop() == 0, host.log()
    gone_host = service.run("status", timeout=15)
    assert gone_host.returncode == 1
    assert gone_host.stdout == ""
    assert gone_host.stderr.startswith("irishost: no irishost is running for this config: ")
    assert str(service.dir / "control.sock") in gone_host.stderr


# -- logs -------------------------------------------------------------------------------------


def test_log_lines_carry_time_level_and_key_value_context(service):
    service.config(service={"handler": write_handler(service.dir)})
    host = service.start()
    worker = host.worker_count(1)[0].pid
    assert host.stop() == 0, host.log()

    lines = host.log().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    context = f"service={re.escape(service.cluster)}"
    for expected in (
        rf"INFO irishost: spawned worker {context} worker=0 pid={worker}",
        rf"INFO irishost: service ready {context} workers=1",
        rf"INFO irishost: stopping {context} signal=SIGTERM",
    ):
        assert any(re.fullmatch(f"{stamp} {expected}", line) for line in lines), expected


def test_under_journald_lines_carry_a_priority_prefix_and_no_timestamp(service):
    config = service.config(service={"handler": write_handler(service.dir)})
    journal = service.dir / "journal.log"
    with journal.open("wb") as stream:
        identity = os.fstat(stream.fileno())
        proc = subprocess.Popen(
            [sys.executable, "-m", "irishost", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stream,
            stderr=stream,
            env={**os.environ, "JOURNAL_STREAM": f"{identity.st_dev}:{identity.st_ino}"},
        )
    workers = set()
    try:
        client = service.connect()
        wait_for(lambda: _answers(client, service.cluster), timeout=20, what="the host to serve")
        workers = {worker.pid for worker in worker_processes(proc.pid)}
        proc.send_signal(signal.SIGTTOU)  # a warning: the last worker stays
        wait_for(lambda: "SIGTTOU ignored" in journal.read_text())
        os.kill(workers.pop(), signal.SIGKILL)  # an error: a worker died
        wait_for(lambda: "worker died" in journal.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(gone(pid, wait=2) for pid in workers)

    lines = journal.read_text().splitlines()
    context = f"service={re.escape(service.cluster)}"
    assert lines and all(re.match(r"<[0-7]>[A-Z]+ ", line) for line in lines), lines
    assert not [line for line in lines if re.search(r"\d\d:\d\d:\d\d", line)]
    for expected in (
        rf"<6>INFO irishost: service ready {context} workers=1",
        rf"<4>WARNING irishost: SIGTTOU ignored: at least one worker must stay {context}",
        rf"<3>ERROR irishost: worker died {context} worker=0 pid=\d+ how=\"killed by SIGKILL.*",
    ):
        assert any(re.fullmatch(expected, line) for line in lines), expected


def _answers(client: iris.Connection, cluster: str) -> bool:
    try:
        return bool(client.request(cluster, b"echo:up", 0.5))
    except (iris.TimeoutError, iris.RemoteError):
        return False
