"""Operating a real irishost from the command line: status --json, reload, scale and
stop over the control socket, and the handler's [settings] from the config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from production_support import run_ok
from support import wait_for

# A handler whose reply shows its code version, its settings and its pid.
TUNED = """
import json
import os

import iris
import iris.aio

VERSION = {version!r}


class Tuned(iris.ServiceHandler):
    def __init__(self, greeting="hello", *, repeat, options=None):
        self.settings = {{"greeting": greeting, "repeat": repeat, "options": options}}

    def handle_request(self, request):
        return json.dumps([VERSION, self.settings, os.getpid()]).encode()


class AsyncTuned(iris.aio.ServiceHandler):
    def __init__(self, greeting="hello", *, repeat, options=None):
        self.settings = {{"greeting": greeting, "repeat": repeat, "options": options}}

    async def handle_request(self, request):
        return json.dumps([VERSION, self.settings, os.getpid()]).encode()
"""


def write_tuned(service, version: str = "v1") -> None:
    (service.dir / "tuned.py").write_text(TUNED.format(version=version))


def ask(service) -> list:
    """[version, settings, pid] from whichever worker answers."""
    return json.loads(service.request(b"who"))


# -- status ---------------------------------------------------------------------------------


def test_status_json_parses_and_names_every_worker(service):
    service.config(workers={"count": 2})
    host = service.start()
    pids = {worker.pid for worker in host.worker_count(2)}
    service.request(b"pid")

    status = json.loads(run_ok(service, "status", "--json"))

    assert status["cluster"] == service.cluster
    assert status["pid"] == host.pid
    assert status["relay"] == {"state": "connected", "port": service.port}
    assert status["served"] >= 1 and status["in_flight"] == 0 and status["restarts"] == 0
    assert {worker["pid"] for worker in status["workers"]} == pids
    for worker in status["workers"]:
        assert worker["state"] == "ready"
        assert worker["rss"] > 1_000_000
        assert set(worker) == {
            "slot", "pid", "state", "served", "in_flight", "rss", "uss", "pss", "restarts",
            "uptime",
        }  # fmt: skip


def test_socket_option_reaches_the_host_without_its_config(service):
    service.start()
    socket_path = str(service.dir / "control.sock")
    service.config_path.unlink()  # --socket alone must do

    result = service.run("status", "--json", "--socket", socket_path, with_config=False)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cluster"] == service.cluster


def test_a_command_with_no_host_running_exits_1(service):
    service.config()

    result = service.run("reload")

    assert result.returncode == 1
    assert "no irishost is running for this config" in result.stderr


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["scale", "0"], "expected an integer from 1 to 1024, got 0"),
        (["scale", "1025"], "expected an integer from 1 to 1024, got 1025"),
        (["scale"], "scale needs a worker count"),
        (["reload", "--json"], "--json is for status"),
        (["stop", "--workers", "2"], "are for running a host, not stop"),
        # Issue 17: NaN waited forever, inf and 1e12 overflowed.
        (["stop", "--timeout", "nan"], "--timeout: expected seconds from 0.001 to 86400"),
        (["stop", "--timeout", "inf"], "--timeout: expected seconds from 0.001 to 86400"),
        (["reload", "--wait", "--timeout", "1e12"], "--timeout: expected seconds from 0.001"),
    ],
)
def test_bad_command_lines_exit_2(service, args, error):
    service.config()

    result = service.run(*args)

    assert result.returncode == 2
    assert error in result.stderr
    assert "Traceback" not in result.stderr


def test_a_socket_path_too_long_for_unix_sockets_exits_2(service, tmp_path):
    """Before, connect's OSError ("AF_UNIX path too long") ended in a traceback."""
    path = tmp_path / ("s" * 120 + ".sock")

    result = service.run("status", "--socket", str(path), with_config=False)

    assert result.returncode == 2, result.stderr
    assert f"--socket: {path} is {len(str(path))} bytes long" in result.stderr
    assert "a unix socket path has at most 107" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_with_timeout_0_is_refused_and_sends_nothing(service):
    """0 is out of range (exit 2), not a stop sent and then reported as a failure."""
    host = service.start()

    result = service.run("stop", "--timeout", "0")

    assert result.returncode == 2
    assert "--timeout: expected seconds from 0.001 to 86400, got '0'" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_ok(service, "status")  # still running: no stop was sent
    assert "control command cmd=stop" not in host.log()


# -- reload, scale, stop ----------------------------------------------------------------------


@pytest.mark.parametrize("preload", [True, False])
def test_reload_command_picks_up_new_code_and_settings(service, preload):
    write_tuned(service, "v1")
    service.config(
        service={"handler": "tuned:Tuned"},
        workers={"preload": preload},
        settings={"repeat": 1},
    )
    host = service.start()
    version, settings, old_pid = ask(service)
    assert (version, settings["repeat"]) == ("v1", 1)

    write_tuned(service, "v2")
    service.config(
        service={"handler": "tuned:Tuned"},
        workers={"preload": preload},
        settings={"repeat": 2, "greeting": "hi"},
    )
    output = run_ok(service, "reload")

    assert "reload started" in output
    version, settings, pid = wait_for(lambda: (answer := ask(service))[0] == "v2" and answer)
    assert settings == {"greeting": "hi", "repeat": 2, "options": None}
    assert pid != old_pid
    wait_for(lambda: [worker.pid for worker in host.workers()] == [pid], what="old worker gone")


def test_scale_command_changes_the_worker_count(service):
    host = service.start()
    first = host.worker_count(1)[0].pid

    assert "scaling to 3 workers" in run_ok(service, "scale", "3")
    pids = {worker.pid for worker in host.worker_count(3)}
    assert first in pids
    assert len(json.loads(run_ok(service, "status", "--json"))["workers"]) == 3

    run_ok(service, "scale", "1")
    wait_for(lambda: {worker.pid for worker in host.workers()} == {first}, what="scaled down")


def test_stop_command_stops_the_host_with_exit_0(service):
    host = service.start()
    socket_path = service.dir / "control.sock"

    output = run_ok(service, "stop")

    assert "stopping" in output and "stopped" in output
    assert host.wait_exit() == 0
    assert not socket_path.exists()
    assert "control command cmd=stop" in host.log()


def test_a_stopping_host_refuses_reloads_and_lets_stop_wait(service):
    """SIGTERM while a request runs: the host stays up to finish it, refuses a reload,
    and a stop command waits for the exit like the first stop would."""
    host = service.start()
    held = service.request_async(b"wait:release")
    wait_for(lambda: service.records("request"), what="request running")
    host.proc.send_signal(signal.SIGTERM)
    host.wait_log("stopping")
    result = service.run("reload")
    stop = subprocess.Popen(
        [sys.executable, "-m", "irishost", "stop", "-c", str(service.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    assert result.returncode == 1
    assert "the host is stopping" in result.stderr
    host.wait_log("control command cmd=stop")
    service.open_gate("release")
    assert stop.wait(10) == 0, stop.stderr.read()
    assert "already stopping; stopped" in stop.stdout.read()
    assert held.result(10)
    assert host.wait_exit() == 0


# -- [settings] -------------------------------------------------------------------------------


@pytest.mark.parametrize("handler", ["Tuned", "AsyncTuned"])
@pytest.mark.parametrize("preload", [True, False])
def test_settings_reach_the_handler_as_keyword_arguments(service, handler, preload):
    write_tuned(service)
    service.config(
        service={"handler": f"tuned:{handler}"},
        workers={"preload": preload},
        settings={"repeat": 3, "options": ["a", "b"]},
    )
    service.start()

    _, settings, _ = ask(service)

    assert settings == {"greeting": "hello", "repeat": 3, "options": ["a", "b"]}


@pytest.mark.parametrize(
    ("settings", "key", "problem"),
    [
        ({"repeat": 1, "colour": "red"}, "settings.colour", "not a keyword argument"),
        ({"greeting": "hi"}, "settings.repeat", "required by the handler class, but missing"),
    ],
)
def test_check_finds_settings_the_handler_does_not_take(service, settings, key, problem):
    write_tuned(service)
    config = service.config(
        service={"handler": "tuned:Tuned"}, workers={"preload": False}, settings=settings
    )

    result = service.run("--check")

    assert result.returncode == 3
    assert f"irishost: config error: {config}: {key}: {problem}" in result.stderr
    assert "(the handler is tuned:Tuned(greeting='hello', *, repeat, options=None))" in (
        result.stderr
    )


def test_a_reload_with_bad_settings_keeps_the_running_workers(service):
    write_tuned(service)
    service.config(service={"handler": "tuned:Tuned"}, settings={"repeat": 1})
    host = service.start()
    pid = ask(service)[2]

    service.config(service={"handler": "tuned:Tuned"}, settings={"repeat": 1, "colour": "red"})
    os.kill(host.pid, signal.SIGHUP)

    host.wait_log("reload failed")
    assert "settings.colour: not a keyword argument" in host.log()
    assert ask(service)[2] == pid


@pytest.mark.parametrize(("preload", "code"), [(True, 3), (False, 4)])
def test_a_start_with_bad_settings_fails_naming_the_key(service, preload, code):
    """Preloaded, the supervisor finds it (a config error); otherwise the first worker does."""
    write_tuned(service)
    config = service.config(
        service={"handler": "tuned:Tuned"}, workers={"preload": preload}, settings={"rpeat": 1}
    )

    result = service.run()

    assert result.returncode == code
    assert f"{config}: settings.rpeat: not a keyword argument of the handler class" in (
        result.stderr
    )
