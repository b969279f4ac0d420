"""The ``irishost`` command line: --check, --workers, --log-level and the exit codes
that systemd units and operators rely on (3 config, 4 handler, 5 relay).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

from irishost.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

BROKEN_MODULE = """
import iris

raise RuntimeError("cannot import: the licence file is missing")


class Handler(iris.ServiceHandler):
    pass
"""


def test_check_validates_config_and_handler_then_exits_0_without_serving(service):
    service.config()

    result = service.run("--check")

    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "probe:ProbeHandler" in result.stdout
    assert service.records() == [], "--check started workers"


@pytest.mark.parametrize("example", ["echo.toml", "primes.toml", "async_echo.toml"])
def test_the_installed_command_checks_the_example_configs(example):
    # The script sits beside the interpreter running the tests (a venv's bin/),
    # whether or not that venv is activated.
    command = shutil.which("irishost", path=str(Path(sys.executable).parent))
    assert command, "the irishost console script is not installed"

    result = subprocess.run(
        [command, "--check", "-c", str(CONFIGS / example)], capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr
    assert f"{CONFIGS / example}: OK" in result.stdout


def test_check_fails_with_exit_4_on_a_handler_that_does_not_import(service):
    service.config(service={"handler": "missing_module:Handler"})

    result = service.run("--check")

    assert result.returncode == 4
    assert "irishost: handler error:" in result.stderr
    assert "no module named 'missing_module'" in result.stderr


def test_a_config_error_exits_3_naming_file_and_key(service):
    config = service.config(workers={"cuont": 2})

    result = service.run()

    assert result.returncode == 3
    assert f"irishost: config error: {config}: workers.cuont: unknown key" in result.stderr


@pytest.mark.parametrize("workers", ["0", "100000"])
def test_a_bad_workers_flag_exits_2_naming_the_flag(service, workers):
    """With --check: on a host without the upper bound, a real start would fork them all.
    A usage error (exit 2) as for every numeric flag, not a config error (issue 17)."""
    service.config()

    result = service.run("--check", "--workers", workers)

    assert result.returncode == 2
    assert f"--workers: expected an integer from 1 to 1024, got {workers}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_handler_module_raising_at_import_exits_4_with_its_traceback(service):
    (service.dir / "broken.py").write_text(BROKEN_MODULE)
    service.config(service={"handler": "broken:Handler"})

    result = service.run()

    assert result.returncode == 4
    assert "irishost: handler error:" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: cannot import: the licence file is missing" in result.stderr


def test_a_handler_failing_to_import_in_the_workers_exits_4_with_its_traceback(service):
    """Without preload the workers import the handler; the same failure, the same exit."""
    (service.dir / "broken.py").write_text(BROKEN_MODULE)
    service.config(service={"handler": "broken:Handler"}, workers={"preload": False})

    result = service.run()

    assert result.returncode == 4
    assert "failed to start" in result.stderr
    assert "RuntimeError: cannot import: the licence file is missing" in result.stderr


def test_topics_for_a_handler_without_handle_event_exit_4_naming_the_method(service):
    service.config(
        service={"handler": "echo:EchoHandler", "path": [str(CONFIGS)]},
        topics=[{"name": "news"}],
    )

    result = service.run()

    assert result.returncode == 4
    assert "has no handle_event(topic, event) method" in result.stderr
    assert "subscribes to news" in result.stderr


def test_no_relay_listening_exits_5_naming_the_port(service):
    port = free_port()
    service.config(relay={"port": port, "embedded": False, "connect_timeout": "300ms"})

    result = service.run(timeout=10)

    assert result.returncode == 5
    assert f"irishost: no Iris relay is listening on port {port}" in result.stderr


def test_workers_flag_overrides_the_worker_count(service):
    service.config(workers={"count": 1})

    host = service.start("--workers", "3")

    assert len(host.worker_count(3)) == 3


def test_log_level_flag_overrides_the_file(service):
    service.config(logging={"level": "debug"})
    logs = {}
    for level in ("warning", "debug"):  # each host brings its own embedded relay
        host = service.start("--log-level", level)
        service.connect().request(service.cluster, b"pid", 5)
        assert host.stop() == 0, host.log()
        logs[level] = host.log()

    assert not re.search(r" (DEBUG|INFO) ", logs["warning"]), logs["warning"]
    assert " DEBUG " in logs["debug"]


def test_a_fifo_for_a_config_is_refused_at_once(tmp_path):
    """Reading a FIFO would wait for a writer forever, under systemd too."""
    fifo = tmp_path / "service.toml"
    os.mkfifo(fifo)

    result = subprocess.run(
        [sys.executable, "-m", "irishost", "--check", "-c", str(fifo)],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert result.returncode == 3
    assert result.stderr == f"irishost: config error: {fifo}: not a regular file " + (
        "(a FIFO, device or directory?)\n"
    )


def test_a_worker_count_beyond_the_bound_is_a_config_error(service):
    """With --check: on a host without the upper bound, a real start would fork them all."""
    config = service.config(workers={"count": 100000000000000000000})

    result = service.run("--check")

    assert result.returncode == 3
    assert result.stderr == (
        f"irishost: config error: {config}: workers.count: expected an integer from 1 to 1024, "
        "got 100000000000000000000\n"
    )


def test_check_rejects_a_setting_the_host_could_not_carry_to_a_reload(service):
    """It passed --check and the start, then the next SIGHUP ended the host."""
    config = service.config(settings={"table": {"big": 2**70}})

    result = service.run("--check")

    assert result.returncode == 3
    assert result.stderr == (
        f"irishost: config error: {config}: settings.table.big: integer {2**70} is out of "
        "range: settings carry integers from -2**63 to 2**64-1\n"
    )


@pytest.mark.parametrize(
    "name", ["billing/v2", "x" * 220, "../é ☃"], ids=["slash", "220-chars", "dots-and-unicode"]
)
def test_any_cluster_name_the_protocol_allows_is_served(service, name):
    """The rings' shared-memory names must not be built from the raw cluster name."""
    service.cluster = f"{name}-{service.cluster}"
    service.config()

    result = service.run("--check")
    service.start()

    assert result.returncode == 0, result.stderr
    assert int(service.request(b"pid")) in {worker.pid for worker in service.hosts[0].workers()}


def test_check_rejects_a_cluster_name_the_host_could_not_start_with(service):
    """A NUL made the start fail in setproctitle after --check had said OK."""
    service.cluster = "a\x00b"
    config = service.config()

    checked = service.run("--check")
    started = service.run()

    for result in (checked, started):
        assert result.returncode == 3
        assert result.stderr == (
            f"irishost: config error: {config}: service.cluster: expected a name without "
            'control characters (NUL, tab, newline...), got "a\\u0000b"\n'
        )


def test_status_into_a_pipe_nobody_reads_exits_quietly(service):
    """``irishost status | head -1``: head is gone before the table is written."""
    service.start()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "irishost", "status", "-c", str(service.config_path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=20,
        )
    finally:
        os.close(write_end)

    assert (result.returncode, result.stderr) == (1, "")


def test_help_and_the_unit_name_the_control_socket_as_it_is_made(tmp_path, monkeypatch):
    """Issue 17: both said ``primes.sock``; the socket is ``primes-<hash>.sock``."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    config = tmp_path / "primes.toml"
    config.write_text((CONFIGS / "primes.toml").read_text())
    made = load_config(config).control.socket.name
    assert re.fullmatch(r"primes-[0-9a-f]{12}\.sock", made)

    usage = subprocess.run(
        [sys.executable, "-m", "irishost", "--help"], capture_output=True, text=True
    ).stdout
    unit = (CONFIGS.parent / "systemd" / "irishost@.service").read_text()
    assert "primes-<hash>.sock" in usage and "/primes.sock" not in usage
    assert "<config>-<hash>.sock" in unit and "<config>.sock" not in unit
