"""The relay's status socket and what reads it: ``iris ls``, ``iris relay status``,
the "no member" answer of a timed-out request, and ``iris bench --data``.

Real relay processes (conftest.py) and real ``iris`` processes; the status
socket is found from the relay's port (iris/relay/status.py).
"""

from __future__ import annotations

import importlib.util
import json
import socket
import stat
import subprocess
import sys
from pathlib import Path

from support import free_port
from test_iris_cli import Echo, Failing, run_iris

import iris
from iris.relay.status import status_path
from iris.tool.exits import Exit

PRIMES = Path(__file__).resolve().parents[2] / "configs" / "primes.py"


def prime_handler() -> iris.ServiceHandler:
    """The README's primes example, as irishost would load it."""
    spec = importlib.util.spec_from_file_location("primes_example", PRIMES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PrimeHandler()


def test_ls_shows_clusters_with_members_and_topics_with_subscribers(relay, attach):
    attach.register(relay.port, "echo", Echo())
    attach.register(relay.port, "echo", Echo())
    for _ in range(3):
        attach.connect(relay.port).subscribe("news", lambda event: None)
    attach.connect(relay.port).request("echo", b"sync", 5)  # every SUBSCRIBE is routed
    done = run_iris(relay.port, "ls")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines == ["CLUSTER  MEMBERS", "echo     2", "", "TOPIC  SUBSCRIBERS", "news   3"]


def test_relay_status_json_has_the_counts(relay, attach):
    attach.register(relay.port, "echo", Echo())
    conn = attach.connect(relay.port)
    conn.subscribe("news", lambda event: None)
    assert conn.request("echo", b"x" * 1000, 5) == b"x" * 1000
    done = run_iris(relay.port, "relay", "status", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["server"] == "iris-relay" and status["port"] == relay.port
    assert status["connections"] == 2
    assert status["clusters"] == {"echo": 1} and status["topics"] == {"news": 1}
    assert status["pending"] == 0 and status["slow_consumers"] == 0
    # INIT, SUBSCRIBE, REQUEST and REPLY, at least; the request and reply each carry 1000 bytes.
    assert status["in_msgs"] >= 5 and status["in_bytes"] > 2000
    assert status["out_msgs"] >= 4 and status["out_bytes"] > 2000
    assert status["partial_bytes"] == 0 and status["partial_budget"] == 256 * 2**20
    text = run_iris(relay.port, "relay", "status")
    assert text.returncode == 0 and b"clusters:    1 (1 members)" in text.stdout


def test_status_socket_is_owner_only_and_removed_at_stop(relay_factory):
    relay = relay_factory()
    path = status_path(relay.port)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.parent.stat().st_uid == path.stat().st_uid
    assert relay.stop() == 0
    assert not path.exists()


def test_under_systemd_the_socket_is_in_the_runtime_directory(relay_factory, monkeypatch, tmp_path):
    """RuntimeDirectory= sets RUNTIME_DIRECTORY: PrivateTmp= would hide /tmp from a shell.
    A client with the same variable finds it there; one without looks elsewhere."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("RUNTIME_DIRECTORY", f"{runtime}:{tmp_path / 'other'}")
    relay = relay_factory()  # inherits the variable, as the relay under systemd has it
    path = runtime / f"{relay.port}.sock"
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert status_path(relay.port) == path
    done = run_iris(relay.port, "relay", "status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["port"] == relay.port

    monkeypatch.delenv("RUNTIME_DIRECTORY")
    done = run_iris(relay.port, "ls")
    assert done.returncode == Exit.FAILURE
    assert done.stderr.decode().count("\n") == 1
    assert f"no status socket at {status_path(relay.port)} or /run/iris-relay/" in (
        done.stderr.decode()
    )
    assert relay.stop() == 0
    assert not path.exists()


def test_a_client_under_systemd_still_finds_a_relay_in_tmp(relay, monkeypatch, tmp_path):
    """A shell started from a unit inherits RUNTIME_DIRECTORY; the relay it asks about did not."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    done = run_iris(relay.port, "relay", "status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["port"] == relay.port


def test_request_to_an_unregistered_cluster_says_no_member(relay):
    done = run_iris(relay.port, "request", "nobody", "x", "--timeout", "0.3")
    assert done.returncode == Exit.TIMEOUT
    assert done.stderr.decode() == (
        "iris: timeout: request to 'nobody' timed out after 0.3 s: "
        "no member is registered under 'nobody'\n"
    )


def test_a_slow_member_is_still_a_plain_timeout(relay, attach):
    attach.register(relay.port, "slow", Sleepy())
    done = run_iris(relay.port, "request", "slow", "x", "--timeout", "0.3")
    assert done.returncode == Exit.TIMEOUT
    assert "timed out" in done.stderr.decode() and "no member" not in done.stderr.decode()


class Sleepy(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        import time

        time.sleep(1.0)
        return request


def test_without_a_status_socket_the_commands_say_so_in_one_line():
    """What an original Iris node looks like: something listens, no status socket."""
    with socket.create_server(("127.0.0.1", 0)) as node:
        port = node.getsockname()[1]
        for args in (["ls"], ["relay", "status"], ["relay", "status", "--json"]):
            done = run_iris(port, *args)
            assert done.returncode == Exit.FAILURE
            err = done.stderr.decode()
            assert err.count("\n") == 1 and "serves no status" in err and "Iris node" in err


def test_ls_without_a_relay_exits_5():
    done = run_iris(free_port(), "ls")
    assert done.returncode == Exit.NO_RELAY
    assert "cannot reach a relay" in done.stderr.decode()


def test_bench_request_with_data_loads_the_primes_example(relay, attach):
    attach.register(relay.port, "primes", prime_handler())
    done = run_iris(relay.port, "bench", "request", "primes", "--data", "2000", "--count", "20")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("20 requests in ")
    assert "4-byte requests" in done.stderr.decode()


def test_bench_with_data_file_sends_the_file(relay, attach, tmp_path):
    seen: list[bytes] = []

    class Recording(iris.ServiceHandler):
        def handle_request(self, request: bytes) -> bytes:
            seen.append(request)
            return request

    attach.register(relay.port, "rec", Recording())
    (tmp_path / "payload").write_bytes(b"\x00\xffbinary")
    done = run_iris(relay.port, "bench", "request", "rec", "--data-file", str(tmp_path / "payload"))
    assert done.returncode == 0, done.stderr
    assert seen and set(seen) == {b"\x00\xffbinary"}


def test_bench_publish_with_data_counts_events(relay):
    done = run_iris(relay.port, "bench", "publish", "t", "--data", "{}", "--count", "50")
    assert done.returncode == 0, done.stderr
    assert "50 delivered to our subscriber, 0 lost" in done.stdout.decode()


def test_bench_data_and_data_file_are_exclusive(relay):
    done = run_iris(relay.port, "bench", "request", "x", "--data", "1", "--data-file", "f")
    assert done.returncode == Exit.USAGE and b"not allowed with" in done.stderr


def test_bench_hint_names_the_handlers_fault(relay, attach):
    """The README's primes example with the generated payload: the handler fails."""
    attach.register(relay.port, "primes", prime_handler())
    done = run_iris(relay.port, "bench", "request", "primes", "--count", "1")
    assert done.returncode == Exit.REMOTE
    err = done.stderr.decode()
    assert "the first request failed: the handler failed: ValueError" in err, err
    assert "is anything serving" not in err


def test_bench_hint_says_no_member(relay):
    done = run_iris(relay.port, "bench", "request", "nobody", "--timeout", "0.3")
    assert done.returncode == Exit.TIMEOUT
    assert "the first request failed: no member is registered under 'nobody'" in (
        done.stderr.decode()
    )


def test_failing_member_is_not_reported_missing(relay, attach):
    attach.register(relay.port, "failing", Failing())
    done = run_iris(relay.port, "request", "failing", "x")
    assert done.returncode == Exit.REMOTE and b"no member" not in done.stderr


def test_status_of_an_in_process_relay_answers_while_it_routes(attach):
    from iris.relay import RelayServer

    with RelayServer(0) as server:
        attach.register(server.port, "echo", Echo())
        done = subprocess.run(
            [sys.executable, "-m", "iris.tool", "--port", str(server.port), "ls"],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0 and b"echo     1" in done.stdout
        attach.close_all()
