"""Tests for irishost.ops.notify against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from irishost.ops.notify import Notifier


class FakeSystemd:
    """A bound datagram socket, as systemd holds for NOTIFY_SOCKET."""

    def __init__(self, bind_to: str, notify_socket: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)
        self.sock.settimeout(2.0)
        self.environ = {"NOTIFY_SOCKET": notify_socket}

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def assert_silent(self) -> None:
        self.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            self.sock.recv(4096)


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path):
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        fake = FakeSystemd(path, path)
    else:
        name = f"irishost-test-{uuid.uuid4().hex}"
        fake = FakeSystemd("\0" + name, "@" + name)
    yield fake
    fake.sock.close()


@pytest.fixture
def notifiers():
    """``notifiers(environ)`` builds a Notifier from ``environ``; all are closed at teardown."""
    made: list[Notifier] = []

    def make(environ: dict[str, str]) -> Notifier:
        notifier = Notifier.from_environ(environ)
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


def test_state_changes_are_exact_datagrams(systemd, notifiers):
    notifier = notifiers(systemd.environ)
    notifier.tell_ready()
    notifier.tell_stopping()
    notifier.tell_status("serving 4 workers")
    notifier.ping_watchdog()
    assert [systemd.recv() for _ in range(4)] == [
        b"READY=1",
        b"STOPPING=1",
        b"STATUS=serving 4 workers",
        b"WATCHDOG=1",
    ]


def test_send_puts_all_fields_in_one_datagram(systemd, notifiers):
    notifiers(systemd.environ).send(READY=1, STATUS="ready: 4 workers", MAINPID=42)
    assert systemd.recv() == b"READY=1\nSTATUS=ready: 4 workers\nMAINPID=42"
    systemd.assert_silent()


def test_multi_line_values_are_flattened(systemd, notifiers):
    notifiers(systemd.environ).tell_status("relay lost:\nconnection reset")
    assert systemd.recv() == b"STATUS=relay lost: connection reset"


def test_reloading_carries_the_monotonic_clock_in_microseconds(systemd, notifiers):
    notifier = notifiers(systemd.environ)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.tell_reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = systemd.recv().split(b"\n")
    assert reloading == b"RELOADING=1"
    key, value = stamp.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_without_notify_socket_everything_is_a_no_op(notifiers):
    notifier = notifiers({})
    notifier.tell_ready()
    notifier.send(STATUS="x")
    notifier.ping_watchdog()
    assert notifier.watchdog_interval() is None


def test_unsupported_address_is_a_no_op_with_a_warning(notifiers, caplog):
    notifier = notifiers({"NOTIFY_SOCKET": "vsock:2:1234"})
    notifier.tell_ready()
    assert "unsupported NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize(
    ("extra", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nonsense"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(notifiers, extra, interval):
    pid = os.getpid()
    environ = {key: value.format(pid=pid, other=pid + 1) for key, value in extra.items()}
    assert notifiers(environ).watchdog_interval() == interval


def test_vanished_socket_warns_once_and_never_raises(systemd, notifiers, caplog):
    notifier = notifiers(systemd.environ)
    notifier.tell_ready()
    assert systemd.recv() == b"READY=1"
    systemd.sock.close()
    path = systemd.environ["NOTIFY_SOCKET"]
    if path.startswith("/"):
        os.unlink(path)
    for _ in range(3):
        notifier.ping_watchdog()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
    assert f"notify_socket={path}" in warnings[0].getMessage()
