"""A service that cannot start a handler thread faults that one request and serves on.

The service (``iris.register``, a topic subscription) runs in a child process
moved into a pids cgroup whose limit is full (the ``thread_limit`` fixture),
against a real relay process. Before, the connection's reader thread died of
``Thread.start``'s RuntimeError and took the service down with it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from support import wait_for

import iris

# Writes what its handlers see to stdout, a file the test reads: one os.write
# per line, as print's two writes (text, then newline) from the broadcast and
# event threads at once could interleave into "broadcast heardevent heard".
PROGRAM = """
import logging, os, sys
import iris

def say(line):
    os.write(1, (line + "\\n").encode())

class Handler(iris.ServiceHandler):
    def init(self, conn):
        conn.subscribe("limited-topic", lambda event: say("event " + event.decode()))
        say("registered")

    def handle_request(self, request):
        return request

    def handle_broadcast(self, message):
        say("broadcast " + message.decode())

    def handle_tunnel(self, tunnel):
        with tunnel:
            tunnel.send(tunnel.recv())

logging.basicConfig(level=logging.WARNING)
iris.serve(int(sys.argv[1]), "limited", Handler(), iris.ServiceLimits(request_threads=2))
"""


@pytest.fixture
def limited_service(relay, tmp_path, thread_limit):
    """The program above, registered, in the thread limit (still off); its output file."""
    out = tmp_path / "out.txt"
    with out.open("w") as stdout, (tmp_path / "err.txt").open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, str(relay.port)],
            stdout=stdout,
            stderr=stderr,
        )
    try:
        wait_for(lambda: out.read_text() == "registered\n", what="the service")
        thread_limit.add(proc.pid)
        yield out, tmp_path / "err.txt"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_a_service_that_cannot_start_a_thread_faults_the_request_and_serves_on(
    relay, attach, thread_limit, limited_service
):
    out, err = limited_service
    conn = attach.connect(relay.port)
    thread_limit.on()
    with pytest.raises(iris.RemoteError) as caught:
        conn.request("limited", b"hello", 5.0)
    assert caught.value.fault == (
        "could not start a handler thread: RuntimeError: can't start new thread"
    )
    conn.broadcast("limited", b"dropped")
    conn.publish("limited-topic", b"dropped")
    with conn.tunnel("limited", 5.0) as tunnel, pytest.raises(iris.ClosedError):
        tunnel.recv(5.0)
    wait_for(
        lambda: (
            err.read_text().count("could not start a handler thread") == 3
            and "tunnel closed: no thread for it" in err.read_text()
        ),
        what="the request, broadcast, event and tunnel refused in the log",
    )

    thread_limit.off()
    assert conn.request("limited", b"hello", 5.0) == b"hello"
    conn.broadcast("limited", b"heard")
    conn.publish("limited-topic", b"heard")
    with conn.tunnel("limited", 5.0) as tunnel:
        tunnel.send(b"back")
        assert tunnel.recv(5.0) == b"back"
    wait_for(lambda: sorted(out.read_text().splitlines()[1:]) == ["broadcast heard", "event heard"])
