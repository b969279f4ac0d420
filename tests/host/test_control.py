"""Tests for irishost.ops.control: a real server on a unix socket in a temporary directory."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from pathlib import Path
from unittest import mock

import pytest

from irishost.ops.control import (
    MAX_COMMAND,
    Command,
    ControlError,
    ControlServer,
    format_status,
    query_status,
    send_command,
    wait_closed,
)

SNAPSHOT = {
    "service": "primes",
    "cluster": "primes-cluster",
    "pid": 4242,
    "uptime": 7530.4,
    "relay": {"state": "connected", "port": 55555},
    "served": 1523,
    "in_flight": 2,
    "waiting": 0,
    "restarts": 1,
    "degraded": [],
    "workers": [
        {
            "slot": 1,
            "pid": 4301,
            "state": "ready",
            "served": 1000,
            "in_flight": 0,
            "rss": 43_200_000,
            "uss": 9_500_000,
            "pss": 20_100_000,
            "restarts": 1,
            "uptime": 95.2,
        },
        {
            "slot": 0,
            "pid": 4243,
            "state": "draining",
            "served": 523,
            "in_flight": 2,
            "rss": 900,
            "uss": 500,
            "pss": 700,
            "restarts": 0,
            "uptime": 7529.0,
        },
    ],
    "durations": {"buckets": [[0.001, 1400], [10.0, 1525]], "sum": 12.5, "count": 1525},
    "failures": {"fault": 0, "worker_died": 2, "no_room": 0, "expired": 0, "shutdown": 0},
}


def refuse(command: Command) -> str:
    raise AssertionError(f"{command} reached the supervisor")


@pytest.fixture
def servers():
    """``servers(path, snapshot, act)`` starts a ControlServer; all are closed at teardown."""
    started: list[ControlServer] = []

    def start(path, snapshot=lambda: SNAPSHOT, act=refuse) -> ControlServer:
        server = ControlServer(path, snapshot, act)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


@pytest.fixture
def sock_path(tmp_path):
    return tmp_path / "run" / "primes.sock"


def raw_exchange(path, data: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5.0)
        sock.connect(str(path))
        sock.sendall(data)
        with sock.makefile("rb") as reader:
            return json.loads(reader.readline())


def test_status_round_trip(servers, sock_path):
    servers(sock_path)
    assert query_status(sock_path) == SNAPSHOT


def test_each_query_sees_a_fresh_snapshot(servers, sock_path):
    calls = iter(range(100))
    servers(sock_path, lambda: {"call": next(calls)})
    assert [query_status(sock_path)["call"] for _ in range(3)] == [0, 1, 2]


def test_directory_is_private_and_socket_is_owner_only(servers, sock_path):
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        servers(sock_path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    mode = sock_path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_existing_directory_owned_by_another_user_is_refused(servers, sock_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory away")
    sock_path.parent.mkdir()
    os.chown(sock_path.parent, 65534, 65534)
    with pytest.raises(ControlError, match="belongs to uid 65534"):
        servers(sock_path)


def test_unusable_path_is_a_control_error(servers, tmp_path):
    too_long = tmp_path / ("x" * 120) / "primes.sock"
    with pytest.raises(ControlError, match="cannot listen on .*primes.sock: AF_UNIX path too long"):
        servers(too_long)


def test_close_removes_the_socket_file(servers, sock_path):
    server = servers(sock_path)
    server.close()
    assert not sock_path.exists()
    with pytest.raises(ControlError, match="no irishost is running for this config"):
        query_status(sock_path)


def test_stale_socket_is_replaced(servers, sock_path):
    sock_path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as dead:  # bound, then closed: what a SIGKILL leaves
        dead.bind(str(sock_path))
    with pytest.raises(ControlError, match="nothing listens on"):
        query_status(sock_path)
    servers(sock_path)
    assert query_status(sock_path) == SNAPSHOT


def test_live_server_is_not_replaced(servers, sock_path):
    servers(sock_path)
    with pytest.raises(ControlError, match="another irishost is already running"):
        ControlServer(sock_path, dict, refuse)
    assert query_status(sock_path) == SNAPSHOT


def test_a_file_that_is_not_a_socket_is_left_alone(servers, sock_path):
    sock_path.parent.mkdir(mode=0o700)
    sock_path.write_text("operator's notes")
    with pytest.raises(ControlError, match="is not a socket"):
        servers(sock_path)
    assert sock_path.read_text() == "operator's notes"


def test_silent_client_does_not_block_others(servers, sock_path):
    servers(sock_path)
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(sock_path))
        assert query_status(sock_path, timeout=2.0) == SNAPSHOT


def test_unknown_and_malformed_commands_get_errors(servers, sock_path):
    servers(sock_path)
    assert "unknown command 'restart'" in raw_exchange(sock_path, b'{"cmd": "restart"}\n')["error"]
    assert "not a JSON command" in raw_exchange(sock_path, b"status\n")["error"]
    assert "unknown command None" in raw_exchange(sock_path, b"[1, 2]\n")["error"]


def test_commands_reach_act_and_its_answer_comes_back(servers, sock_path):
    received = []

    def act(command: Command) -> str:
        received.append(command)
        return f"queued {command.name}"

    servers(sock_path, act=act)
    for command in ({"cmd": "reload"}, {"cmd": "scale", "count": 3}, {"cmd": "stop"}):
        answer = send_command(sock_path, command)
        assert answer == {"ok": True, "message": f"queued {command['cmd']}"}
    assert received == [Command("reload"), Command("scale", 3), Command("stop")]


@pytest.mark.parametrize("count", [0, 1025, "2", True, None, 2.0])
def test_scale_out_of_bounds_never_reaches_the_supervisor(servers, sock_path, count):
    servers(sock_path)
    with pytest.raises(ControlError, match="scale: expected an integer from 1 to 1024, got"):
        send_command(sock_path, {"cmd": "scale", "count": count})


def test_a_command_act_refuses_gets_its_error(servers, sock_path):
    def act(command: Command) -> str:
        raise ControlError("the host is stopping")

    servers(sock_path, act=act)
    with pytest.raises(ControlError, match="irishost at .*: the host is stopping"):
        send_command(sock_path, {"cmd": "reload"})


def test_wait_closed_returns_once_the_server_is_gone(servers, sock_path):
    server = servers(sock_path)
    with pytest.raises(ControlError, match="still running after 0.2 s"):
        wait_closed(sock_path, 0.2)
    threading.Timer(0.2, server.close).start()
    wait_closed(sock_path, 5.0)
    assert not sock_path.exists()


def test_failing_snapshot_is_reported_and_server_survives(servers, sock_path):
    servers(sock_path, mock.Mock(side_effect=[RuntimeError("worker table busy"), SNAPSHOT]))
    with pytest.raises(ControlError, match="status snapshot failed: RuntimeError"):
        query_status(sock_path)
    assert query_status(sock_path) == SNAPSHOT


def test_missing_socket_says_no_host_is_running(tmp_path):
    path = tmp_path / "absent.sock"
    with pytest.raises(ControlError) as caught:
        query_status(path)
    assert str(caught.value) == f"no irishost is running for this config: {path} not found"


def test_server_that_never_answers_times_out(sock_path):
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as mute:  # listens, never accepts
        mute.bind(str(sock_path))
        mute.listen()
        with pytest.raises(ControlError, match="did not answer within 0.2 s"):
            query_status(sock_path, timeout=0.2)


def test_server_that_hangs_up_is_reported(sock_path):
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as rude:
        rude.bind(str(sock_path))
        rude.listen()
        hang_up = threading.Thread(target=lambda: rude.accept()[0].close())
        hang_up.start()
        with pytest.raises(ControlError, match="hung up without answering"):
            query_status(sock_path)
        hang_up.join()


def test_other_users_get_permission_denied(servers, sock_path):
    """Run the query as nobody (root ignores file modes) and report its error through a pipe."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    servers(sock_path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setuid(65534)
            query_status(sock_path)
            message = "no error"
        except BaseException as err:
            message = str(err)
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    os.waitpid(pid, 0)
    assert message == f"permission denied on {sock_path}: run as the service's user or root"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o720])
def test_existing_directory_others_can_write_is_refused(servers, sock_path, mode):
    sock_path.parent.mkdir()
    sock_path.parent.chmod(mode)
    with pytest.raises(ControlError) as caught:
        servers(sock_path)
    assert str(caught.value) == (
        f"{sock_path.parent} is writable by group or others (mode {mode:04o}); another user "
        "could replace the control socket there: run chmod go-w on it or set [control] socket "
        "to a private directory"
    )
    assert not sock_path.exists()


@contextlib.contextmanager
def impostor(path: Path, answer: dict):
    """A server at ``path`` that answers one query with ``answer``, as another user's would."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()

        def serve() -> None:
            connection, _ = listener.accept()
            with connection:
                if connection.recv(MAX_COMMAND):  # b"": the unblocking connect below
                    connection.sendall(json.dumps(answer).encode() + b"\n")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield
        if thread.is_alive():  # not queried: unblock accept()
            with socket.socket(socket.AF_UNIX) as unblock:
                unblock.connect(str(path))
        thread.join(5)


def test_status_refuses_a_socket_in_a_directory_others_can_write(sock_path):
    sock_path.parent.mkdir()
    sock_path.parent.chmod(0o777)
    forged = {**SNAPSHOT, "cluster": "forged"}
    with impostor(sock_path, forged), pytest.raises(ControlError, match="writable by group or"):
        query_status(sock_path)


def test_deeply_nested_json_gets_an_error(servers, sock_path):
    servers(sock_path)
    answer = raw_exchange(sock_path, b"[" * (MAX_COMMAND - 1) + b"\n")
    assert answer["error"].startswith("not a JSON command: b'[[[[")
    assert query_status(sock_path) == SNAPSHOT


def test_a_client_that_hangs_up_without_asking_is_not_logged(servers, sock_path, caplog):
    """Another irishost checking whether the socket is in use does just that."""
    servers(sock_path)
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(sock_path))
    assert query_status(sock_path) == SNAPSHOT  # served after the probe, so it was handled
    assert [record for record in caplog.records if record.name == "irishost.ops.control"] == []


# -- through a real irishost ----------------------------------------------------------------


def test_irishost_will_not_listen_in_a_directory_others_can_write(service):
    (service.dir / "shared").mkdir(mode=0o777)
    (service.dir / "shared").chmod(0o777)  # past the umask
    service.config(control={"socket": "shared/control.sock"})

    result = service.run()

    assert result.returncode == 1
    assert f"irishost: control socket: {service.dir / 'shared'} is writable by group or " in (
        result.stderr
    )
    assert list((service.dir / "shared").iterdir()) == []


def test_irishost_status_will_not_believe_a_socket_others_could_have_placed(service):
    shared = service.dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    service.config(control={"socket": "shared/control.sock"})

    with impostor(shared / "control.sock", {**SNAPSHOT, "cluster": "forged"}):
        result = service.run("status")

    assert result.returncode == 1
    assert "forged" not in result.stdout
    assert f"{shared} is writable by group or others" in result.stderr


def test_irishost_answers_deeply_nested_json_with_an_error(service):
    host = service.start()
    path = service.dir / "control.sock"

    answer = raw_exchange(path, b"[" * (MAX_COMMAND - 1) + b"\n")

    assert answer["error"].startswith("not a JSON command")
    assert query_status(path)["cluster"] == service.cluster
    assert "Traceback" not in host.log()


def test_a_second_host_on_the_same_socket_leaves_the_first_one_alone(service, other_service):
    shared = {"socket": str(service.dir / "run" / "control.sock")}
    service.config(control=shared)
    other_service.config(control=shared)
    first = service.start()

    loser = other_service.run()

    assert loser.returncode == 1
    assert "another irishost is already running with control socket" in loser.stderr
    assert query_status(service.dir / "run" / "control.sock")["cluster"] == service.cluster
    assert first.stop() == 0
    assert "control connection failed" not in first.log()


def test_hosts_of_configs_with_the_same_name_get_sockets_of_their_own(service, other_service):
    """/srv/a/service.toml and /srv/b/service.toml, both with the default socket path."""
    env = {"RUNTIME_DIRECTORY": str(service.dir / "run")}
    for each in (service, other_service):
        each.config(control={"socket": ""})  # "": the default, in RUNTIME_DIRECTORY
        each.start(env=env)

    for each in (service, other_service):
        result = each.run("status", env=env)
        assert result.returncode == 0, result.stderr
        assert f"cluster:   {each.cluster}\n" in result.stdout


def test_format_status():
    assert format_status(SNAPSHOT) == (
        "service:   primes\n"
        "cluster:   primes-cluster\n"
        "pid:       4242\n"
        "uptime:    2h 05m\n"
        "relay:     connected (port 55555)\n"
        "served:    1523\n"
        "in flight: 2\n"
        "waiting:   0\n"
        "restarts:  1\n"
        "failed:    2 (worker_died 2)\n"
        "workers:   2 alive\n"
        "health:    ok\n"
        "logging:   0 records dropped\n"  # SNAPSHOT is of a host too old to count them
        "\n"
        "WORKER  PID   STATE     SERVED  IN FLIGHT  RSS       USS      PSS       RESTARTS  UPTIME\n"
        "0       4243  draining  523     2          900 B     500 B    700 B     0         2h 05m\n"
        "1       4301  ready     1000    0          41.2 MiB  9.1 MiB  19.2 MiB  1         1m 35s\n"
    )


def test_format_status_of_a_host_that_reads_no_private_memory():
    """A host started before an upgrade of the package has no "uss" or "pss"."""
    workers = [
        {key: value for key, value in worker.items() if key not in ("uss", "pss")}
        for worker in SNAPSHOT["workers"]
    ]

    text = format_status({**SNAPSHOT, "workers": workers})

    assert "1       4301  ready     1000    0          41.2 MiB  -    -    1 " in text


def test_format_status_names_the_slots_that_are_down():
    degraded = [{"slot": 1, "problem": "failed to start: RuntimeError: database down"}]

    text = format_status({**SNAPSHOT, "degraded": degraded})

    assert "health:    degraded: worker 1 failed to start: RuntimeError: database down\n" in text


def test_format_status_counts_the_log_records_dropped():
    text = format_status({**SNAPSHOT, "log_records_dropped": 12})

    assert "logging:   12 records dropped\n" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59.9, "59s"), (61, "1m 01s"), (3600, "1h 00m"), (90061, "1d 01h")],
)
def test_format_status_uptime_units(seconds, text):
    assert f"uptime:    {text}\n" in format_status({**SNAPSHOT, "uptime": seconds})


def test_format_status_counts_failures_by_cause():
    failures = {"fault": 3, "worker_died": 0, "no_room": 1, "expired": 4, "shutdown": 0}

    assert "failed:    8 (fault 3, no_room 1, expired 4)\n" in format_status(
        {**SNAPSHOT, "failures": failures}
    )
    assert "failed:    0\n" in format_status({**SNAPSHOT, "failures": dict.fromkeys(failures, 0)})


def test_format_status_says_whether_metrics_are_served():
    served = format_status({**SNAPSHOT, "metrics": {"port": 9108, "problem": ""}})
    taken = format_status(
        {**SNAPSHOT, "metrics": {"port": 9108, "problem": "port 9108 unavailable: in use"}}
    )

    assert "metrics:   http://127.0.0.1:9108/metrics\n" in served
    assert "metrics:   not served: port 9108 unavailable: in use\n" in taken
    assert "metrics:" not in format_status({**SNAPSHOT, "metrics": None})
