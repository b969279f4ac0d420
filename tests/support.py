"""Small helpers for tests of every part: ports, polling, threads, a one-shot
stand-in relay, process state, tunnels, faults, journald, a thread limit."""

from __future__ import annotations

import collections
import contextlib
import os
import random
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

import iris

PORTS_FROM = 10000  # free_port's ports: from here to the ephemeral range


def _own_ports() -> range:
    """The ports this test process hands out.

    Below the kernel's ephemeral range: a port from ``bind(0)`` was free when
    asked, but the kernel gives the same range to every ``connect()`` and
    ``bind(0)`` on the machine, and a loaded run of four test processes once
    lost such a port to someone else's connection before its host bound it.
    Each pytest-xdist worker takes a slice of its own.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
        ephemeral = int(ranges.read().split()[0])
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (ephemeral - PORTS_FROM) // workers
    return range(PORTS_FROM + worker * size, PORTS_FROM + (worker + 1) * size)


_PORTS = _own_ports()
_handed: collections.deque[int] = collections.deque(maxlen=256)


def free_port() -> int:
    """A loopback port nobody listens on, not handed out here lately.

    Picked at random: another test run at once has the same slices, and two
    runs stepping through them in order fell into step and kept colliding.
    """
    while True:
        port = random.choice(_PORTS)
        if port in _handed:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT
                continue
        _handed.append(port)
        return port


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = ""):
    """Poll ``condition()`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> tuple[object, float]:
    """Run ``fn``; return (exception or result, seconds taken)."""
    start = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as err:
        result = err
    return result, time.monotonic() - start


def in_threads(count: int, target: Callable[[int], object]) -> None:
    """Run ``target(i)`` on ``count`` threads; fail with the first error any raised."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            target(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


class OneShotServer:
    """A loopback server that plays a relay for one handshake: it reads one
    INIT and answers ``answer`` (e.g. a DENY), then waits for the hang-up."""

    def __init__(self, answer: bytes):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._answer = answer
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock, _ = self._listener.accept()
        with sock:
            sock.recv(1024)
            sock.sendall(self._answer)
            sock.recv(1024)  # until the client hangs up

    def __enter__(self) -> OneShotServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(5)
        self._listener.close()


def worker_processes(host: int) -> list[psutil.Process]:
    """The worker processes of the irishost supervisor ``host``.

    Workers are its children (a fork server forks them through an
    intermediate, and the supervisor, a child subreaper, inherits them),
    named by their process title; its other children are fork servers.
    """
    try:
        children = psutil.Process(host).children()
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if _title(child).startswith("irishost: worker")]


def fork_servers(host: int) -> list[psutil.Process]:
    """The fork server processes of the irishost supervisor ``host``."""
    try:
        children = psutil.Process(host).children()
    except psutil.NoSuchProcess:
        return []
    return [child for child in children if _title(child).startswith("irishost: fork server")]


def _title(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def gone(pid: int, wait: float = 0.0) -> bool:
    """True once ``pid`` has exited, waiting up to ``wait`` seconds for it.

    A zombie counts as exited: a worker whose supervisor died is reparented,
    and whoever inherits it may be slow to reap it.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core that process ``pid`` uses over the next ``seconds``."""
    process = psutil.Process(pid)
    before, started = sum(process.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    return (sum(process.cpu_times()[:2]) - before) / (time.monotonic() - started)


def echo_tunnel(tunnel: iris.Tunnel) -> None:
    """Send every message of ``tunnel`` back until it closes: a handle_tunnel."""
    with tunnel:
        while True:
            try:
                tunnel.send(tunnel.recv())
            except iris.ClosedError:
                return


def fault_of(call, timeout: float = 5.0) -> str:
    """The fault text the request future ``call`` failed with (RemoteError)."""
    with pytest.raises(iris.RemoteError) as caught:
        call.result(timeout)
    return caught.value.fault


def journal_stream(file) -> dict[str, str]:
    """JOURNAL_STREAM as systemd sets it when ``file`` is the process's stream to journald."""
    status = os.fstat(file.fileno())
    return {"JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}


# Where a pids hierarchy is mounted: cgroup v1's own, or v2's unified one.
CGROUP_ROOTS = (Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup"))


class ThreadLimit:
    """A pids cgroup of the test's own: a process moved into it can start no
    thread while the limit is on, as under a full systemd ``TasksMax``.

    A real kernel limit, where RLIMIT_NPROC would not do: root, which runs
    the tests, is exempt from that one, not from a cgroup's ``pids.max``.
    Skips the test where no pids cgroup can be made (cgroup v1's pids
    hierarchy, or v2 with the pids controller, writable).
    """

    def __init__(self) -> None:
        roots = [root for root in CGROUP_ROOTS if self._has_pids(root)]
        if not roots:
            pytest.skip("no pids cgroup controller to limit threads with")
        self.root = roots[0]
        self.path = self.root / f"iris-test-{uuid.uuid4().hex[:8]}"
        try:
            self.path.mkdir()
        except OSError as err:
            pytest.skip(f"cannot make a pids cgroup: {err}")

    @staticmethod
    def _has_pids(root: Path) -> bool:
        """True if ``root`` is a hierarchy whose children get ``pids.max``."""
        if (root / "pids.max").exists() or not (root / "cgroup.procs").exists():
            return False  # not a hierarchy's root, or none at all
        controls = root / "cgroup.subtree_control"  # cgroup v2; v1's pids hierarchy has none
        return not controls.exists() or "pids" in controls.read_text().split()

    def add(self, pid: int) -> None:
        """Move process ``pid``, all its threads, into the cgroup."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def on(self) -> None:
        """No new thread or process in the cgroup: ``Thread.start`` raises RuntimeError."""
        (self.path / "pids.max").write_text("1")

    def off(self) -> None:
        (self.path / "pids.max").write_text("max")

    def remove(self) -> None:
        """Move what is left back to the root cgroup, then delete the cgroup."""
        self.off()
        for pid in (self.path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                (self.root / "cgroup.procs").write_text(pid)
        wait_for(lambda: not (self.path / "cgroup.procs").read_text(), 5.0, what="empty cgroup")
        self.path.rmdir()


def read_terminal(fd: int, wait: float = 0.0) -> bytes:
    """What a terminal's controller ``fd`` has to read, until its last writer is
    gone; ``wait`` seconds for each further chunk."""
    out = b""
    while select.select([fd], [], [], wait)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's last writer has gone
            break
        if not chunk:
            break
        out += chunk
    return out
