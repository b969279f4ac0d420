"""irishost's own moving parts under faults and careless operators (issue 16): the
metrics port taken by someone else, a stopped fork server, reloads and scales
racing each other, ``irishost reload --wait``, and the processes a handler forks.

Everything runs for real: a relay, irishost, its fork servers and workers, and
the signals an operator or the kernel would send. The handler is written for
these tests (``HANDLER``): it answers ``"<version> <pid> <request>"`` like the
production tests' handler, so that their steady load can check every reply,
and flag files beside it change what its import does, so that the first start
is quick and only a later reload's import is slow or broken.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest
from production_support import steady_load
from support import gone, in_threads, wait_for

from irishost.ops.control import ControlError, query_status, send_command

HANDLER = '''\
"""Written by tests/host/test_irishost_process_control.py."""

import os
import subprocess
import sys
import time

import iris

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "v1"


def _flag(name):
    return os.path.exists(os.path.join(HERE, name))


# A reload's import misbehaves while a flag file says so; the first start's does not.
if _flag("slow-import"):
    time.sleep(2.0)
if _flag("raise-import"):
    raise RuntimeError("the handler refuses to import")
if _flag("exit-import"):
    os._exit(7)


def _daemon():
    """A double-forked, setsid sleep (as a daemonising helper does); its pid."""
    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:
        os.setsid()
        pid = os.fork()
        if pid == 0:
            os.execvp("sleep", ["sleep", "1000"])
        os.write(write, str(pid).encode())
        os._exit(0)
    os.close(write)
    pid = int(os.read(read, 32))
    os.close(read)
    os.waitpid(middle, 0)
    return pid


class Handler(iris.ServiceHandler):
    def handle_request(self, request):
        text = request.decode()
        command, _, argument = text.partition(":")
        # Children the handler starts and never waits for.
        if command == "child":
            return str(subprocess.Popen(["sleep", "1000"]).pid).encode()
        if command == "daemon":
            return str(_daemon()).encode()
        if command == "child-alloc":  # a child holding ``argument`` MiB, written so resident
            code = f"data = b'x' * ({int(argument)} << 20); import time; time.sleep(30)"
            return str(subprocess.Popen([sys.executable, "-c", code]).pid).encode()
        return f"{VERSION} {os.getpid()} {text}".encode()
'''

SPEC = "process_probe:Handler"
# How long the reload's import sleeps while "slow-import" exists (HANDLER's figure).
SLOW_IMPORT = 2.0


def configure(service, **tables) -> None:
    (service.dir / "process_probe.py").write_text(HANDLER)
    service.config(**{"service": {"handler": SPEC}, **tables})


def control(service):
    return service.dir / "control.sock"


def snapshot(service) -> dict:
    return query_status(control(service), timeout=5.0)


def fork_servers(host_pid: int) -> list[psutil.Process]:
    """The host's fork servers, by their process title, wherever they are in its tree."""
    try:
        descendants = psutil.Process(host_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for process in descendants:
        with contextlib.suppress(psutil.Error):
            if " ".join(process.cmdline()).startswith("irishost: fork server"):
                found.append(process)
    return found


def ready_pids(status: dict) -> set[int]:
    return {worker["pid"] for worker in status["workers"] if worker["state"] == "ready"}


@contextlib.contextmanager
def killed_at_exit(pids: list[int]):
    """SIGKILL whichever of ``pids`` still runs when the block ends (a failed test)."""
    try:
        yield pids
    finally:
        for pid in pids:
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# -- the metrics endpoint is optional (Done when 8) -------------------------------------------


def test_a_taken_metrics_port_is_one_error_and_the_host_serves_without_metrics(service):
    with socket.socket() as squatter:  # another local user got there first
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        configure(service, metrics={"port": port})

        host = service.start()

        assert service.request(b"echo:served").startswith(b"v1 ")
        errors = [line for line in host.log().splitlines() if " ERROR " in f" {line}"]
        assert len(errors) == 1, host.log()
        assert str(port) in errors[0] and "metrics" in errors[0]
        assert "Traceback" not in host.log()
        metrics = snapshot(service)["metrics"]
        assert metrics["port"] == port
        assert str(port) in metrics["problem"] and "in use" in metrics["problem"]
        text = service.run("status")
        assert text.returncode == 0, text.stderr
        assert f"metrics:   not served: {metrics['problem']}\n" in text.stdout


# -- a stopped fork server (Done when 9) ------------------------------------------------------


@pytest.mark.parametrize("then", ["SIGHUP", "nothing"])
def test_a_stopped_fork_server_stops_neither_replies_nor_respawns(service, then):
    """SIGSTOP the fork server, SIGHUP (or not), SIGKILL a worker: the loop must not
    wait on the stopped server, the dead worker must not pass for a live one, and
    two workers are ready again within 20 s (by the reload's fork server, or by a
    fresh one launched once the stopped one missed its spawn deadline)."""
    configure(service, workers={"count": 2})
    host = service.start()
    victim = host.worker_count(2)[0].pid
    (server,) = fork_servers(host.pid)
    snapshots: list[tuple[float, dict]] = []

    try:
        with steady_load(service.port, service.cluster, threads=4, timeout=3.0) as load:
            load.wait_for_replies(20)
            os.kill(server.pid, signal.SIGSTOP)
            if then == "SIGHUP":
                host.proc.send_signal(signal.SIGHUP)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()

            def back() -> bool:
                status = snapshot(service)
                snapshots.append((time.monotonic(), status))
                ready = ready_pids(status)
                return len(ready) == 2 and victim not in ready and not status["degraded"]

            wait_for(back, timeout=20.0, interval=0.1, what="2 ready workers again")
            recovered = time.monotonic()
            served = load.wait_for_replies(20, since=recovered)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)

    assert recovered - killed < 20.0
    assert victim not in {reply.pid for reply in served}
    # The only failures: the requests the victim held when it died, told so at once.
    failures = load.failures()
    assert len(failures) <= 4, failures[:5]
    for failure in failures:
        assert "RemoteError" in failure.error and "SIGKILL" in failure.error, failure
        assert failure.at - killed < 1.0, failure
    # Status told the truth meanwhile: once the death was seen, the victim was not
    # listed, and "health: ok" never came with a slot empty. (A replacement that
    # becomes ready while the snapshot is taken may still show as booting.)
    seen = [status for at, status in snapshots if at - killed >= 0.5]
    for status in seen:
        shown = {key: status[key] for key in ("uptime", "workers", "degraded", "restarts")}
        assert victim not in {worker["pid"] for worker in status["workers"]}, shown
        if not status["degraded"]:
            live = [w for w in status["workers"] if w["state"] in ("ready", "booting")]
            assert len(live) >= 2, shown
    if then == "nothing":  # the slot stayed empty past the spawn deadline: said so
        assert any(status["degraded"] for status in seen), seen[:1]
    host.worker_count(2)


# -- control answers are true (Done when 10) --------------------------------------------------


def test_twenty_concurrent_reloads_start_one_and_the_rest_say_it_is_in_progress(service):
    configure(service, workers={"count": 1})
    host = service.start()
    service.open_gate("slow-import")  # the reload's import takes 2 s
    answers: list[tuple[bool, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(20)

    def reload(_: int) -> None:
        barrier.wait()
        try:
            answer = (True, send_command(control(service), {"cmd": "reload"}, 10.0)["message"])
        except ControlError as err:
            answer = (False, str(err))
        with lock:
            answers.append(answer)

    in_threads(20, reload)
    host.wait_log("reload complete", timeout=15.0)
    (service.dir / "slow-import").unlink()

    started = [line for ok, line in answers if ok]
    refused = [line for ok, line in answers if not ok]
    assert len(answers) == 20
    assert len(started) <= 1, started
    assert all("reload started" in line for line in started), started
    assert len(refused) >= 19
    assert all("reload already in progress (generation " in line for line in refused), refused
    assert host.log().count("reload complete") == 1
    host.worker_count(1)


def test_scale_during_a_slow_reload_applies_to_the_new_generation(service):
    configure(service, workers={"count": 2})
    host = service.start()
    old = {worker.pid for worker in host.worker_count(2)}
    service.open_gate("slow-import")

    answer = send_command(control(service), {"cmd": "reload"}, 5.0)
    assert "reload started" in answer["message"]
    scaled = service.run("scale", "3")
    assert scaled.returncode == 0, scaled.stderr
    host.wait_log("reload complete", timeout=15.0)
    (service.dir / "slow-import").unlink()

    assert "scaling to 3 workers" in scaled.stdout
    new = {worker.pid for worker in host.worker_count(3)}
    assert not new & old
    time.sleep(3.0)  # and nothing undoes it later
    assert {worker.pid for worker in host.worker_count(3, timeout=1.0)} == new
    status = snapshot(service)
    assert ready_pids(status) == new and not status["degraded"]


# -- irishost reload --wait -------------------------------------------------------------------


def test_reload_wait_returns_once_the_reload_completed(service):
    configure(service, workers={"count": 1})
    host = service.start()
    (old,) = (worker.pid for worker in host.worker_count(1))
    service.open_gate("slow-import")

    started = time.monotonic()
    result = service.run("reload", "--wait")
    took = time.monotonic() - started
    (service.dir / "slow-import").unlink()

    assert result.returncode == 0, result.stderr
    assert "reload complete" in result.stdout
    assert took >= SLOW_IMPORT  # it waited for the import, not only for the command
    ready = ready_pids(snapshot(service))  # the new worker was ready when it returned
    assert ready and old not in ready
    assert service.request(b"echo:new").split()[1] != str(old).encode()


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        ("bad-toml", "invalid TOML"),
        ("raise-import", "RuntimeError: the handler refuses to import"),
        ("exit-import", "exited with code 7"),
    ],
)
def test_reload_wait_exits_1_with_the_reason_when_the_reload_failed(service, breakage, reason):
    """Broken TOML in the config, or reloaded code that raises or exits at import."""
    configure(service, workers={"count": 1})
    host = service.start()
    (old,) = (worker.pid for worker in host.worker_count(1))
    socket_path = str(control(service))
    if breakage == "bad-toml":
        service.config_path.write_text(service.config_path.read_text() + "[workers\ncount = 3\n")
    else:
        service.open_gate(breakage)  # the flag file the handler's import looks for

    # --socket: with -c, the command itself would stop at the broken config (exit 3).
    result = service.run("reload", "--wait", "--socket", socket_path, with_config=False)

    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "reload failed" in result.stderr and reason in result.stderr, result.stderr
    assert result.stdout == ""
    assert service.request(b"echo:old").split()[1] == str(old).encode()
    assert [worker.pid for worker in host.worker_count(1)] == [old]


# -- the processes a handler forks (issue 16's small rules) -----------------------------------


@pytest.mark.parametrize("kind", ["child", "daemon"])
def test_a_process_a_handler_started_ends_with_the_host(service, kind):
    """A child the handler never waits for, or a daemon it double-forked into a
    session of its own: either would outlive the host outside systemd."""
    configure(service, workers={"count": 1})
    host = service.start()
    child = int(service.request(kind.encode()))

    with killed_at_exit([child]):
        assert not gone(child)
        assert host.stop() == 0, host.log()
        assert gone(child, wait=5.0), f"the handler's {kind} outlived the host"


def test_max_rss_counts_the_memory_of_a_worker_s_children(service):
    configure(
        service,
        workers={"count": 1},
        limits={"max_rss": "200MiB", "max_rss_kill_factor": 3},  # recycled, not killed
    )
    host = service.start()
    (first,) = (worker.pid for worker in host.worker_count(1))

    child = int(service.request(b"child-alloc:300"))
    with killed_at_exit([child]):
        host.wait_log("recycling worker", timeout=10.0)
        lines = [line for line in host.log().splitlines() if "recycling worker" in line]
        # The successor is forked once the fork server answers; the old worker drains.
        replacement = wait_for(
            lambda: (
                len(found := [w.pid for w in host.workers()]) == 1
                and found[0] != first
                and found[0]
            ),
            what="the successor serving alone",
        )

    assert len(lines) == 1, lines
    assert f"pid={first}" in lines[0] and "is over max_rss" in lines[0], lines[0]
    assert replacement != first
    assert service.request(b"echo:after").split()[1] == str(replacement).encode()


def test_status_json_names_the_metrics_port_when_it_is_served(service):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    configure(service, metrics={"port": port})
    service.start()

    status = json.loads(service.run("status", "--json").stdout)

    assert status["metrics"] == {"port": port, "problem": ""}
