"""iris.serve and Service.wait: a service program that runs until it is told to stop.

iris.serve runs in a real child process (it installs signal handlers, which
only the main thread may do), against a real relay process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

import iris

# Exits 0 after serve returns (with the previous signal handlers back), 7 if
# serve raised ClosedError.
PROGRAM = """
import signal, sys
import iris

class Echo(iris.ServiceHandler):
    def init(self, conn):
        print("registered", flush=True)

    def handle_request(self, request):
        return request

before = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
try:
    iris.serve(int(sys.argv[1]), "served", Echo())
except iris.ClosedError as err:
    print("dropped:", err, flush=True)
    sys.exit(7)
assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == before
print("returned", flush=True)
"""


@pytest.fixture
def serve_program():
    """``serve_program(port)``: the program above, registered once this returns."""
    started: list[subprocess.Popen] = []

    def start(port: int) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(proc)
        assert proc.stdout.readline() == "registered\n", proc.stderr.read()
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_serve_runs_until_a_signal_then_unregisters(relay, attach, serve_program, signum):
    proc = serve_program(relay.port)
    conn = attach.connect(relay.port)
    assert conn.request("served", b"hello", 5.0) == b"hello"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=10)
    assert (proc.returncode, out) == (0, "returned\n"), err
    with pytest.raises(iris.TimeoutError):
        conn.request("served", b"hello", 0.3)


def test_serve_raises_closed_error_when_the_relay_drops_it(relay_factory, serve_program):
    relay = relay_factory()
    proc = serve_program(relay.port)
    relay.kill()
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 7, err
    assert out.startswith("dropped: service 'served' dropped: connection lost")


class Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


def test_service_wait_blocks_until_unregistered(relay, attach):
    service = attach.register(relay.port, "waiting", Echo())
    assert service.wait(0.1) is False
    threading.Timer(0.2, service.unregister).start()
    assert service.wait(5.0) is True
    assert service.conn.close_reason == "connection closed"


def test_service_wait_returns_when_the_relay_drops_it(relay_factory, attach):
    relay = relay_factory()
    service = attach.register(relay.port, "waiting", Echo())
    relay.kill()
    assert service.wait(5.0) is True
    assert service.conn.close_reason.startswith("connection lost")
