"""What irishost says as it starts and runs: each line once, with the context
that tells whose it is, and where to reach the host.

Real hosts; their logs are read as an operator would read the journal.
"""

from __future__ import annotations

import re

from support import free_port


def test_each_worker_is_announced_ready_once_with_its_pid(service):
    service.config(workers={"count": 2})
    host = service.start()
    pids = {worker.pid for worker in host.worker_count(2)}
    assert host.stop() == 0, host.log()

    ready = re.findall(r"worker ready .*", host.log())
    assert len(ready) == 2, ready
    assert {int(re.search(r"pid=(\d+)", line)[1]) for line in ready} == pids


def test_worker_connections_log_their_service_and_worker(service):
    service.config(workers={"count": 2})
    host = service.start()
    host.worker_count(2)
    assert host.stop() == 0, host.log()

    log = host.log()
    established = [line for line in log.splitlines() if "relay connection established" in line]
    workers = sorted(
        re.search(r" worker=(\d+)", line)[1] for line in established if " worker=" in line
    )
    assert workers == ["0", "1"], established
    assert all(f"service={service.cluster}" in line for line in established), established
    assert not re.search(r"\bclient=\d", log), log


def test_the_start_announces_the_control_socket_and_the_metrics_url(service):
    port = free_port()
    service.config(metrics={"port": port})
    host = service.start()

    log = host.log()
    socket_path = service.dir / "control.sock"
    assert len(re.findall(rf"INFO irishost: control socket .*path={socket_path}\b", log)) == 1
    url = f"url=http://127.0.0.1:{port}/metrics"
    assert len(re.findall(rf"INFO irishost: metrics endpoint .*{re.escape(url)}", log)) == 1


def test_check_says_what_it_checked(service):
    service.config()

    result = service.run("--check")

    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"irishost: {service.config_path}: OK: config valid; handler imported; init not run"
        " (probe:ProbeHandler)\n"
    )
