"""The ``iris`` command, run as a real subprocess against a real relay process.

Each command is checked for what it prints, what it sends, and its exit code
(iris.tool.exits.Exit). The peers on the other side are the binding, in this
process, or another ``iris`` process.
"""

from __future__ import annotations

import os
import pty
import queue
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from support import free_port, read_terminal

import iris
from iris.tool.exits import Exit

RUN_TIMEOUT = 30.0  # a command that hangs fails its test instead of the suite


def iris_command(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "iris.tool", "--port", str(port), *args]


def run_iris(port: int, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run(
        iris_command(port, *args), input=stdin, capture_output=True, timeout=RUN_TIMEOUT
    )


class IrisProcess:
    """A long-running ``iris`` command (reply, subscribe, tunnel); stderr goes to a file."""

    def __init__(self, port: int, args: tuple[str, ...], stderr_path, stdin):
        self.stderr_path = stderr_path
        self._stderr = stderr_path.open("wb")
        self.proc = subprocess.Popen(
            iris_command(port, *args), stdin=stdin, stdout=subprocess.PIPE, stderr=self._stderr
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_for_stderr(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr()}"
            assert time.monotonic() < deadline, f"no {text!r} on stderr: {self.stderr()}"
            time.sleep(0.02)

    def finish(self, signum: int | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
        """Optionally signal, then wait: (exit code, everything on stdout)."""
        if signum is not None:
            self.proc.send_signal(signum)
        stdout, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, stdout

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self._stderr.close()


@pytest.fixture
def start_iris(tmp_path):
    """``start_iris(port, *args, stdin=DEVNULL)``: a background command, killed at teardown."""
    started: list[IrisProcess] = []

    def start(port: int, *args: str, stdin=subprocess.DEVNULL) -> IrisProcess:
        process = IrisProcess(port, args, tmp_path / f"iris-{len(started)}.err", stdin)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


class Failing(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        raise ValueError(f"cannot handle {request!r}")


class Recorder(iris.ServiceHandler):
    """Puts every broadcast it gets on a queue."""

    def __init__(self):
        self.broadcasts: queue.Queue[bytes] = queue.Queue()

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts.put(message)


# -- versions and help ---------------------------------------------------------


def test_version_comes_from_the_package_metadata():
    assert iris.__version__ == metadata.version("iris-python")


def test_version_without_package_metadata(tmp_path):
    """A copy of the source that was never installed still imports, with a placeholder."""
    shutil.copytree(Path(iris.__file__).parent, tmp_path / "iris")
    done = subprocess.run(
        # -S: no site-packages, so neither the installed copy nor its metadata is found.
        [sys.executable, "-S", "-c", "import iris; print(iris.__version__, iris.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.stdout.split() == ["0+unknown", str(tmp_path / "iris" / "__init__.py")], done.stderr


@pytest.mark.parametrize(
    ("program", "module"),
    [("iris", "iris.tool"), ("iris-relay", "iris.relay"), ("irishost", "irishost")],
)
def test_every_command_prints_its_version(program, module):
    done = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout) == (0, f"{program} {iris.__version__}\n")


def test_help_shows_examples_and_exit_codes():
    done = subprocess.run(
        [sys.executable, "-m", "iris.tool", "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    assert "iris request echo hello" in done.stdout
    assert "iris bench request echo" in done.stdout
    for code in Exit:
        assert str(code.value) in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        (),  # no command
        ("reply", "echo"),  # neither --echo nor --data
        ("reply", "echo", "--echo", "--data", "x"),
        ("subscribe", "news", "--count", "0"),
        ("bench", "request", "echo", "--seconds", "1", "--count", "5"),
    ],
)
def test_usage_errors_exit_2(args):
    assert run_iris(free_port(), *args).returncode == Exit.USAGE


# -- request -------------------------------------------------------------------


def test_request_prints_the_reply_as_raw_bytes(relay, attach):
    attach.register(relay.port, "echo", Echo())
    done = run_iris(relay.port, "request", "echo", "hello")
    assert (done.returncode, done.stdout) == (0, b"hello")
    binary = bytes(range(256)) * 1000  # newlines, NULs, not UTF-8: all must pass untouched
    done = run_iris(relay.port, "request", "echo", stdin=binary)
    assert (done.returncode, done.stdout) == (0, binary)


def test_request_remote_error_exits_3_with_the_fault(relay, attach):
    attach.register(relay.port, "failing", Failing())
    done = run_iris(relay.port, "request", "failing", "x")
    assert done.returncode == Exit.REMOTE
    assert done.stdout == b""
    assert "remote error: ValueError: cannot handle b'x'" in done.stderr.decode()


def test_request_timeout_exits_4(relay):
    started = time.monotonic()
    done = run_iris(relay.port, "request", "nobody", "x", "--timeout", "0.3")
    assert done.returncode == Exit.TIMEOUT
    assert "timed out" in done.stderr.decode()
    assert time.monotonic() - started < 5


def test_empty_request_is_a_usage_error(relay):
    done = run_iris(relay.port, "request", "echo", stdin=b"")
    assert done.returncode == Exit.USAGE
    assert "must not be empty" in done.stderr.decode()


@pytest.mark.parametrize(
    "args",
    [
        ("request", "echo", "x"),
        ("broadcast", "echo", "x"),
        ("publish", "news", "x"),
        ("subscribe", "news"),
        ("reply", "echo", "--echo"),
        ("tunnel", "echo"),
        ("bench", "request", "echo", "--count", "1"),
        ("bench", "publish", "news", "--count", "1"),
    ],
)
def test_no_relay_exits_5(args):
    port = free_port()
    done = run_iris(port, *args)
    assert done.returncode == Exit.NO_RELAY, done.stderr
    assert f"cannot reach a relay on port {port}" in done.stderr.decode()


def test_port_may_follow_the_command(relay, attach):
    attach.register(relay.port, "echo", Echo())
    done = subprocess.run(
        [sys.executable, "-m", "iris.tool", "request", "echo", "hi", "--port", str(relay.port)],
        capture_output=True,
        timeout=RUN_TIMEOUT,
    )
    assert (done.returncode, done.stdout) == (0, b"hi")


# -- broadcast and publish -----------------------------------------------------


def test_broadcast_reaches_every_member(relay, attach):
    members = [Recorder(), Recorder()]
    for member in members:
        attach.register(relay.port, "workers", member)
    assert run_iris(relay.port, "broadcast", "workers", "reload").returncode == 0
    assert run_iris(relay.port, "broadcast", "workers", stdin=b"from stdin").returncode == 0
    for member in members:
        assert member.broadcasts.get(timeout=5) == b"reload"
        assert member.broadcasts.get(timeout=5) == b"from stdin"


def test_publish_reaches_the_subscribers(relay, attach):
    events: queue.Queue[bytes] = queue.Queue()
    attach.connect(relay.port).subscribe("news", events.put)
    time.sleep(0.1)  # the subscription is sent asynchronously; let the relay take it
    assert run_iris(relay.port, "publish", "news", "it happened").returncode == 0
    assert run_iris(relay.port, "publish", "news", stdin=b"\x00binary").returncode == 0
    assert events.get(timeout=5) == b"it happened"
    assert events.get(timeout=5) == b"\x00binary"


# -- subscribe -----------------------------------------------------------------


def test_subscribe_prints_one_event_per_line_and_stops_after_count(relay, attach, start_iris):
    subscriber = start_iris(relay.port, "subscribe", "news", "--count", "2")
    subscriber.wait_for_stderr("subscribed to topic 'news'")
    publisher = attach.connect(relay.port)
    for event in (b"one", b"two", b"three"):
        publisher.publish("news", event)
    assert subscriber.finish() == (0, b"one\ntwo\n")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_subscribe_runs_until_interrupted(relay, attach, start_iris, signum):
    subscriber = start_iris(relay.port, "subscribe", "news")
    subscriber.wait_for_stderr("subscribed")
    attach.connect(relay.port).publish("news", b"only")
    # Signal only once the event is printed, or the test would race the delivery.
    assert select.select([subscriber.proc.stdout], [], [], 5)[0], "the event was not printed"
    assert subscriber.finish(signum) == (0, b"only\n")


def test_subscribe_into_a_closed_pipe_ends_quietly(relay, attach, start_iris):
    """``iris subscribe news | head -1``: the reader leaving is not an error."""
    subscriber = start_iris(relay.port, "subscribe", "news")
    subscriber.wait_for_stderr("subscribed")
    publisher = attach.connect(relay.port)
    publisher.publish("news", b"first")
    assert subscriber.proc.stdout.readline() == b"first\n"
    subscriber.proc.stdout.close()
    for _ in range(3):  # the next write meets the closed pipe
        publisher.publish("news", b"more")
    assert subscriber.proc.wait(10) == 0
    assert "Traceback" not in subscriber.stderr()


def test_subscribe_fails_when_the_relay_goes_away(relay_factory, start_iris):
    relay = relay_factory()
    subscriber = start_iris(relay.port, "subscribe", "news")
    subscriber.wait_for_stderr("subscribed")
    relay.kill()
    code, _ = subscriber.finish()
    assert code == Exit.FAILURE
    assert "connection ended" in subscriber.stderr()


# -- reply ---------------------------------------------------------------------


def test_reply_echo_serves_requests_until_sigterm(relay, attach, start_iris):
    responder = start_iris(relay.port, "reply", "echo", "--echo")
    responder.wait_for_stderr("echoing requests to cluster 'echo'")
    conn = attach.connect(relay.port)
    assert conn.request("echo", b"ping", 5.0) == b"ping"
    assert responder.finish(signal.SIGTERM) == (0, b"")
    with pytest.raises(iris.TimeoutError):  # unregistered: nobody serves the cluster now
        conn.request("echo", b"ping", 0.3)


def test_reply_data_answers_with_the_fixed_text(relay, attach, start_iris):
    responder = start_iris(relay.port, "reply", "fixed", "--data", "pong")
    responder.wait_for_stderr("answering requests")
    assert attach.connect(relay.port).request("fixed", b"ping", 5.0) == b"pong"
    assert responder.finish(signal.SIGINT)[0] == 0


def test_reply_then_request_between_two_commands(relay, start_iris):
    start_iris(relay.port, "reply", "echo", "--echo").wait_for_stderr("echoing")
    done = run_iris(relay.port, "request", "echo", "through two processes")
    assert (done.returncode, done.stdout) == (0, b"through two processes")


# -- tunnel --------------------------------------------------------------------


def test_tunnel_carries_stdin_to_stdout_through_an_echo(relay, start_iris):
    start_iris(relay.port, "reply", "echo", "--echo").wait_for_stderr("echoing")
    data = os.urandom(300_000)  # several reads of stdin, several chunks each way
    done = run_iris(relay.port, "tunnel", "echo", stdin=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout == data


class SlowAnswer(iris.ServiceHandler):
    """Answers a tunnel's first message after a delay, then waits for the close."""

    def __init__(self):
        self.closed = threading.Event()

    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        message = tunnel.recv(timeout=5)
        time.sleep(0.3)
        tunnel.send(b"late answer to " + message)
        try:
            tunnel.recv(timeout=10)
        except iris.ClosedError:
            self.closed.set()


def test_tunnel_after_stdin_ends_waits_for_the_answer_then_closes(relay, attach):
    handler = SlowAnswer()
    attach.register(relay.port, "slow", handler)
    done = run_iris(relay.port, "tunnel", "slow", "--linger", "1", stdin=b"question")
    assert (done.returncode, done.stdout) == (0, b"late answer to question")
    assert handler.closed.wait(5), "the command did not close the tunnel"


class SayGoodbye(iris.ServiceHandler):
    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        with tunnel:
            tunnel.send(b"bye")


def test_tunnel_closed_by_the_remote_end_ends_the_command(relay, attach, start_iris):
    attach.register(relay.port, "goodbye", SayGoodbye())
    # stdin stays open: the command must notice the close without an EOF.
    tunnel = start_iris(relay.port, "tunnel", "goodbye", stdin=subprocess.PIPE)
    assert tunnel.finish() == (0, b"bye")


def test_tunnel_to_an_empty_cluster_times_out(relay):
    done = run_iris(relay.port, "tunnel", "nobody", "--timeout", "0.3")
    assert done.returncode == Exit.TIMEOUT


# -- bench ---------------------------------------------------------------------


def assert_latency_report(text: str, label: str) -> None:
    lines = text.splitlines()
    summary = next(line for line in lines if line.startswith(f"{label}: "))
    for part in ("p50 ", "p90 ", "p99 ", "max "):
        assert part in summary
    bars = [line for line in lines if line.lstrip().startswith("<=") and "#" in line]
    assert bars, f"no histogram in:\n{text}"


def test_bench_request_reports_rate_percentiles_and_histogram(relay, attach):
    attach.register(relay.port, "echo", Echo())
    done = run_iris(
        relay.port, "bench", "request", "echo", "--count", "300", "--clients", "3", "--size", "64"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.startswith("300 requests in "), out
    assert "/s" in out and "0 failed" in out
    assert_latency_report(out, "latency")
    assert "\r" not in done.stderr.decode(), "progress line drawn although stderr is no tty"


def test_bench_publish_reports_delivery_latency(relay):
    done = run_iris(relay.port, "bench", "publish", "ticks", "--count", "500", "--size", "16")
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert out.startswith("500 events published in "), out
    assert "500 delivered to our subscriber, 0 lost" in out
    assert_latency_report(out, "delivery latency")


def test_bench_draws_progress_on_a_terminal(relay, attach):
    attach.register(relay.port, "echo", Echo())
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            iris_command(relay.port, "bench", "request", "echo", "--seconds", "1.5"),
            stdout=subprocess.PIPE,
            stderr=terminal,
        )
        os.close(terminal)
        terminal = -1
        stdout, _ = proc.communicate(timeout=RUN_TIMEOUT)
        drawn = read_terminal(controller)
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    assert proc.returncode == 0
    assert b"\r" in drawn and b"requests" in drawn and b"/s" in drawn
    assert b"\r" not in stdout  # the report itself stays clean


def test_bench_request_without_a_server_exits_4(relay):
    done = run_iris(relay.port, "bench", "request", "nobody", "--timeout", "0.3")
    assert done.returncode == Exit.TIMEOUT
    assert "no member is registered under 'nobody'" in done.stderr.decode()


def test_bench_publish_needs_room_for_its_timestamp(relay):
    done = run_iris(relay.port, "bench", "publish", "ticks", "--size", "4", "--count", "1")
    assert done.returncode == Exit.USAGE


# -- keygen --------------------------------------------------------------------


def load_key(pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def test_keygen_writes_a_pkcs1_key_with_mode_0600(tmp_path):
    path = tmp_path / "network.pem"
    done = subprocess.run(
        [sys.executable, "-m", "iris.tool", "keygen", "-o", str(path)],
        capture_output=True,
        timeout=RUN_TIMEOUT,
        preexec_fn=lambda: os.umask(0),  # a careless umask must not widen the mode
    )
    assert done.returncode == 0, done.stderr
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")
    assert load_key(pem).key_size == 2048
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["network.pem"]  # no temporary left


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "network.pem"
    path.write_bytes(b"the old key")
    done = run_iris(free_port(), "keygen", "-o", str(path))
    assert done.returncode == Exit.FAILURE
    assert "exists; use --force" in done.stderr.decode()
    assert path.read_bytes() == b"the old key"
    assert run_iris(free_port(), "keygen", "-o", str(path), "--force").returncode == 0
    load_key(path.read_bytes())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keygen_to_stdout_and_bits(tmp_path):
    done = run_iris(free_port(), "keygen", "--bits", "3072")
    assert done.returncode == 0
    assert load_key(done.stdout).key_size == 3072
    assert run_iris(free_port(), "keygen", "--bits", "1024").returncode == Exit.USAGE


def test_keygen_reports_an_unwritable_path(tmp_path):
    done = run_iris(free_port(), "keygen", "-o", str(tmp_path / "missing" / "key.pem"))
    assert done.returncode == Exit.FAILURE
    assert "cannot write" in done.stderr.decode()
