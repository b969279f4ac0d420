"""Shared fixtures: real relay processes, raw protocol peers, tracked connections.

Tests run against a real ``python -m iris.relay`` process on a free loopback
port; nothing is mocked. Every process, socket and connection a fixture hands
out is cleaned up at teardown, even when the test fails.

pytest gives these fixtures to every test under tests/, whatever its part
(binding/, relay/, host/, tools/); the irishost fixtures are in
host/conftest.py. What tests import by name is in plain modules:
support.py (ports, polling, process state) and relay_process.py.

Fixtures:

``relay``
    A relay started with default options; ``relay.port`` to connect to.
``relay_factory``
    ``relay_factory("--max-message", "1MiB")`` starts another relay with extra
    command-line arguments (a later ``--port`` overrides the default 0); each
    one is stopped at teardown. ``relay.stop()`` stops one early and returns
    its exit code; ``relay.kill()`` crashes it on purpose (SIGKILL), which
    exempts it from the clean-exit check; ``relay.log()`` is its stderr.
``raw``
    ``raw(port)`` opens a :class:`RawPeer`: a bare socket that speaks bytes
    built with :mod:`iris.codec`, for wire-level tests.
``attach``
    ``attach.connect(port)`` / ``attach.register(port, cluster, handler)``:
    the binding's entry points, closed at teardown.
``socket_pair``
    Two connected sockets (``socket.socketpair()``), for parts that write to
    a socket without a relay; both closed at teardown.
``thread_limit``
    A :class:`support.ThreadLimit`: ``add(pid)`` a process, then ``on()``
    and it can start no thread until ``off()``. Removed at teardown (its
    processes go back to the root cgroup); skips the test without cgroups.

A relay that does not exit with code 0 on SIGTERM fails the test that used it,
unless the test killed it on purpose.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time

import pytest
from hypothesis import HealthCheck, settings
from relay_process import RelayProcess
from support import ThreadLimit

import iris
from iris import codec

# A run started in the background by a script (``cmd &``, no job control) inherits
# SIGINT ignored, and so would every process a test starts: ``iris subscribe`` would
# never see the Ctrl-C a test sends it. Tests run as if from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# No time limits: on a loaded machine one example of a codec test took 306 ms
# against hypothesis's default 200 ms deadline, and generating examples can
# be "too slow" for its health check; what is tested is the result.
settings.register_profile("tests", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tests")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Captured output as text any pytest-xdist worker can send back.

    Handlers in the hardening tests fail with lone surrogates in their
    messages on purpose, and the binding logs them; xdist's channel refuses
    such text and loses the whole worker with it.
    """
    report = (yield).get_result()
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8"))
        for title, text in report.sections
    ]


@pytest.fixture
def relay_factory(tmp_path):
    """Start relays with extra arguments; each must exit 0 on SIGTERM at teardown."""
    started: list[RelayProcess] = []

    def start(*args: str) -> RelayProcess:
        relay = RelayProcess(list(args), tmp_path / f"relay-{len(started)}.log")
        started.append(relay)
        return relay

    yield start
    codes = [(relay, relay.stop()) for relay in started]
    failed = [
        (relay.args, code, relay.log()) for relay, code in codes if code != 0 and not relay.killed
    ]
    assert not failed, f"relay did not exit cleanly: {failed}"


@pytest.fixture
def relay(relay_factory) -> RelayProcess:
    """One relay with default options."""
    return relay_factory()


class RawPeer:
    """A bare TCP connection to a relay that speaks the client side byte by byte."""

    def __init__(self, port: int, rcvbuf: int | None = None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect, so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.decoder = codec.Decoder(codec.Side.RELAY)
        self.pending: list = []

    def send(self, *packets) -> None:
        self.sock.sendall(b"".join(packet.encode() for packet in packets))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, cluster: str = "") -> RawPeer:
        self.send(codec.Init(cluster))
        answer = self.recv()
        assert answer == codec.Accept(codec.VERSION) and type(answer) is codec.Accept
        return self

    def recv(self, timeout: float = 5.0):
        """The next packet from the relay; AssertionError on timeout or EOF."""
        packet = self.recv_or_eof(timeout)
        assert packet is not None, "relay closed the connection"
        return packet

    def recv_or_eof(self, timeout: float = 5.0):
        """The next packet, or None if the relay closed the connection."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no packet from the relay in time"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def expect_eof(self, timeout: float = 5.0) -> list:
        """Read until the relay hangs up; return the packets that came first."""
        packets = []
        while (packet := self.recv_or_eof(timeout)) is not None:
            packets.append(packet)
        return packets

    def assert_silent(self, wait: float = 0.2) -> None:
        """Nothing arrives for ``wait`` seconds."""
        with contextlib.suppress(AssertionError):
            packet = self.recv(wait)
            raise AssertionError(f"unexpected packet {packet!r}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw():
    """``raw(port, rcvbuf=None)`` opens a RawPeer; all are closed at teardown."""
    peers: list[RawPeer] = []

    def open_peer(port: int, rcvbuf: int | None = None) -> RawPeer:
        peer = RawPeer(port, rcvbuf)
        peers.append(peer)
        return peer

    yield open_peer
    for peer in peers:
        peer.close()


class Attachments:
    """The binding's entry points, remembering what to close at teardown."""

    def __init__(self):
        self._open: list = []

    @property
    def opened(self) -> int:
        """How many connections and services are open."""
        return len(self._open)

    def connect(self, port: int) -> iris.Connection:
        conn = iris.connect(port)
        self._open.append(conn.close)
        return conn

    def register(self, port: int, cluster: str, handler, limits=None) -> iris.Service:
        service = iris.register(port, cluster, handler, limits)
        self._open.append(service.unregister)
        return service

    def close_all(self) -> None:
        for close in reversed(self._open):
            close()
        self._open.clear()


@pytest.fixture
def attach():
    attachments = Attachments()
    yield attachments
    attachments.close_all()


@pytest.fixture
def socket_pair():
    left, right = socket.socketpair()
    yield left, right
    left.close()
    right.close()


@pytest.fixture
def thread_limit():
    limit = ThreadLimit()
    yield limit
    limit.remove()
