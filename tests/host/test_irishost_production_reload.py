"""irishost changing its workers while it serves: SIGHUP reloads (good and bad) and
SIGTTIN/SIGTTOU scaling.

A reload starts a new generation of workers from the re-read config and
re-imported handler, and retires the old one only once the new one is ready,
so a steady stream of requests never sees a failure. A reload that cannot
work (broken TOML, a handler whose init raises) leaves the old workers
serving, and systemd still gets READY=1 after RELOADING=1.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from production_support import status, steady_load, write_handler
from support import gone, wait_for


def reload(host, notify, count: int) -> None:
    """SIGHUP, then wait for the ``count``-th READY=1 (the first came at start)."""
    host.proc.send_signal(signal.SIGHUP)
    notify.wait("READY", count=count, timeout=15)


def rows(service) -> list[dict]:
    return status(service)["rows"]


# -- reloading --------------------------------------------------------------------------------


def test_reload_under_a_steady_stream_of_requests_fails_none_and_serves_new_code(notify, service):
    module = service.dir / "handler.py"
    handler = write_handler(service.dir, version="v1")
    service.config(
        service={"handler": handler},
        workers={"count": 2, "shutdown_timeout": "3s"},
        limits={"request_threads": 2},
    )
    # As under systemd, Python writes bytecode caches (a test run may not).
    host = service.start(env={**notify.env, "PYTHONDONTWRITEBYTECODE": ""})
    first = {worker.pid for worker in host.worker_count(2)}

    with steady_load(service.port, service.cluster, threads=4) as load:
        assert {r.pid for r in load.wait_for_replies(40)} == first

        reload(host, notify, count=2)  # the same code: new workers all the same
        assert wait_for(lambda: all(gone(pid) for pid in first), what="the old workers to exit")
        second = {worker.pid for worker in host.worker_count(2)}
        served = load.wait_for_replies(40, since=time.monotonic(), version="v1")
        assert {r.pid for r in served} == second

        # A deployment that keeps file times (rsync -a, or the fixed times of
        # reproducible builds) must not leave Python serving the stale bytecode.
        times = module.stat()
        write_handler(service.dir, version="v2", init_delay=0.3)  # a longer overlap
        os.utime(module, ns=(times.st_atime_ns, times.st_mtime_ns))
        reload(host, notify, count=3)
        assert wait_for(lambda: all(gone(pid) for pid in second), what="the old workers to exit")
        third = {worker.pid for worker in host.worker_count(2)}
        served = load.wait_for_replies(40, since=time.monotonic())

    assert not first & second and not second & third
    assert {r.pid for r in served} == third
    assert {r.version for r in served} == {"v2"}
    assert load.failures() == [], load.failures()[:5]
    assert notify.states() == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1"]


@pytest.mark.parametrize("breakage", ["broken TOML", "init raises"])
def test_a_reload_that_cannot_work_keeps_the_old_workers_serving(notify, service, breakage):
    handler = write_handler(service.dir, version="v1")
    config = service.config(service={"handler": handler}, workers={"count": 2})
    host = service.start(env=notify.env)
    workers = {worker.pid for worker in host.worker_count(2)}

    with steady_load(service.port, service.cluster, threads=2) as load:
        load.wait_for_replies(10)
        if breakage == "broken TOML":
            good = config.read_text()
            config.write_text(good + "[workers\ncount = 3\n")
        else:
            write_handler(service.dir, version="v2", init_raises=True)
        reload(host, notify, count=2)
        # The failed workers, if any were forked, are gone; the old ones stay.
        assert host.worker_count(2, timeout=5) and {w.pid for w in host.workers()} == workers
        served = load.wait_for_replies(20, since=time.monotonic())

        if breakage == "broken TOML":
            config.write_text(good)
        write_handler(service.dir, version="v3")
        reload(host, notify, count=3)  # and the next good reload goes through
        fresh = load.wait_for_replies(20, since=time.monotonic(), version="v3")

    assert {(r.version, r.pid) for r in served} <= {("v1", pid) for pid in workers}
    assert not {r.pid for r in fresh} & workers
    assert load.failures() == [], load.failures()[:5]
    log = host.log()
    assert log.count("reload failed; keeping the running workers") == 1, log
    if breakage == "broken TOML":
        assert "invalid TOML" in log
    else:
        assert "RuntimeError: init refused in version v2" in log
    assert notify.states() == ["READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1"]


# -- scaling ------------------------------------------------------------------------------------


def test_sigttin_and_sigttou_add_and_remove_workers_but_never_the_last(service):
    service.config(service={"handler": write_handler(service.dir)}, workers={"count": 1})
    host = service.start()
    first = host.worker_count(1)[0].pid

    def settles_at(count: int) -> set[int]:
        pids = {worker.pid for worker in host.worker_count(count)}
        wait_for(
            lambda: (
                sorted(int(row["PID"]) for row in rows(service) if row["STATE"] == "ready")
                == sorted(pids)
                and len(rows(service)) == count
            ),
            what=f"irishost status to show {count} ready workers",
        )
        return pids

    host.proc.send_signal(signal.SIGTTIN)
    two = settles_at(2)
    host.proc.send_signal(signal.SIGTTIN)
    three = settles_at(3)
    host.proc.send_signal(signal.SIGTTOU)
    back_to_two = settles_at(2)
    host.proc.send_signal(signal.SIGTTOU)
    one = settles_at(1)
    host.proc.send_signal(signal.SIGTTOU)  # ignored: a service needs a worker
    host.wait_log("SIGTTOU ignored")
    assert two > {first} and three > two
    assert back_to_two < three and one == {first}
    assert settles_at(1) == {first}
    assert {int(row["WORKER"]) for row in rows(service)} == {0}
    assert service.request(b"echo:still one")


def test_sigterm_during_a_reload_stops_without_finishing_it(notify, service):
    handler = write_handler(service.dir, version="v1")
    service.config(service={"handler": handler}, workers={"shutdown_timeout": "3s"})
    host = service.start(env=notify.env)
    held = service.request_async(b"sleep:1")  # keeps the stop busy while the reload boots
    write_handler(service.dir, version="v2", init_delay=0.5)

    host.proc.send_signal(signal.SIGHUP)
    notify.wait("RELOADING")
    host.proc.send_signal(signal.SIGTERM)

    assert host.wait_exit() == 0
    assert held.result(5).startswith(b"v1 ")
    assert notify.states() == ["READY=1", "RELOADING=1", "STOPPING=1"]
