"""Logging that never holds up the host: a stalled stderr pipe, the dropped
records' count, and a log file that logrotate can move away (SIGUSR1).

Real irishost processes; the stalled pipe is a real pipe nobody reads.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from conftest import Host, Service
from support import free_port, wait_for

import iris

# fcntl's F_SETPIPE_SZ (Linux), named by the fcntl module from Python 3.10 on.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 4096  # the smallest a pipe gets: a page; filled by ~40 access lines
LOAD_SECONDS = 3.0
CALLERS = 8
SLOW = 3.0  # seconds: no request may take longer (a held-up one would never be answered)


class StalledHost(Host):
    """A host whose stdout and stderr are one pipe that nobody reads until ``drain``."""

    def __init__(self, service: Service):
        self.service = service
        self.cluster = service.cluster
        self.port = service.port
        read, write = os.pipe()
        fcntl.fcntl(write, F_SETPIPE_SZ, PIPE_SIZE)
        self._read = read
        self._log_file = open(os.devnull, "wb")  # noqa: SIM115  # Host.close closes it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "irishost", "-c", str(service.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=write,
            stderr=write,
        )
        os.close(write)
        self.pid = self.proc.pid
        self.worker_pids: set[int] = set()
        self._drained: list[bytes] = []

    def log(self) -> str:
        return b"".join(self._drained).decode(errors="replace")

    def queued_bytes(self) -> int:
        """What the pipe holds, unread."""
        return int.from_bytes(fcntl.ioctl(self._read, 0x541B, b"\0" * 4), sys.byteorder)

    def drain(self) -> None:
        """Read the pipe from now on (as journald would once it recovers)."""

        def read() -> None:
            while chunk := os.read(self._read, 65536):
                self._drained.append(chunk)
            os.close(self._read)

        threading.Thread(target=read, name="drain", daemon=True).start()


def load(service: Service, seconds: float) -> list[float | None]:
    """CALLERS threads sending echo requests for ``seconds``: each one's duration,
    None for one that failed (timed out)."""
    durations: list[float | None] = []
    end = time.monotonic() + seconds

    def caller() -> None:
        while time.monotonic() < end:
            start = time.monotonic()
            try:
                service.conn.request(service.cluster, b"echo", 2 * SLOW)
                durations.append(time.monotonic() - start)
            except iris.TimeoutError:
                durations.append(None)

    threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return durations


def status_json(service: Service) -> dict:
    result = service.run("status", "--json", timeout=15)
    assert result.returncode == 0, result.stderr
    snapshot: dict = json.loads(result.stdout)
    return snapshot


def test_a_stalled_stderr_pipe_holds_up_no_request(service):
    """Issue 16, done-when 7: the access log on, stderr a full pipe nobody
    reads; requests are answered as ever, and the lines dropped are counted."""
    metrics = free_port()
    service.config(
        logging={"level": "info", "access": True},
        workers={"count": 2},
        metrics={"port": metrics},
    )
    host = StalledHost(service)
    service.hosts.append(host)
    try:
        host.wait_serving(service.connect())
        load(service, 0.5)  # enough access lines to fill the pipe
        # Full for the writer: its next piece (a batch of lines, up to PIPE_BUF
        # bytes, written whole) no longer fits, and nothing drains it.
        stalled = host.queued_bytes()
        assert stalled > 0, "the pipe should hold the lines written before it stalled"
        load(service, 0.2)
        assert host.queued_bytes() == stalled, "the pipe should be full by now"

        # On a loaded machine fewer requests fit in LOAD_SECONDS, and the writer's
        # queue may not have overflowed yet: load on, in rounds, until it has.
        deadline = time.monotonic() + 30.0
        while True:
            durations = load(service, LOAD_SECONDS)
            answered = [seconds for seconds in durations if seconds is not None]
            assert len(answered) >= 0.95 * len(durations), f"{len(answered)} of {len(durations)}"
            assert max(answered) < SLOW
            dropped = status_json(service)["log_records_dropped"]
            if dropped > 0 or time.monotonic() > deadline:
                break
        assert dropped > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as page:
            text = page.read().decode()
        [line] = [line for line in text.splitlines() if line.startswith("irishost_log_records")]
        assert int(line.split()[1]) >= dropped
        assert "logging:   0 records dropped" not in service.run("status").stdout
    finally:
        host.drain()  # so that the host can write its last lines and stop


def test_the_log_file_is_opened_again_on_sigusr1(service):
    """logrotate's way: move the file, signal; new lines go to a new file at the
    path, the supervisor's and the workers'. SIGUSR1 to every process of the
    host (``systemctl kill -s USR1``) kills none of them."""
    service.config(logging={"level": "info", "access": True, "file": "logs/host.log"})
    (service.dir / "logs").mkdir()
    log = service.dir / "logs" / "host.log"
    host = service.start()
    service.request(b"echo|1")
    wait_for(lambda: "size=6 " in log.read_text(), what="the first access line in the file")
    assert "irishost.access" not in host.log()  # stderr: not there

    log.rename(log.with_suffix(".log.1"))
    processes = [host.pid, *(child.pid for child in host.workers())]
    processes.append(host.workers()[0].parent().pid)  # the fork server
    for pid in processes:
        os.kill(pid, signal.SIGUSR1)

    def new_lines() -> str:
        service.request(b"echo|22")
        try:  # a worker's own line: the traceback of its handler
            service.request(b"fail:rotated")
        except iris.RemoteError:
            pass
        text = log.read_text() if log.exists() else ""
        return text if "size=7 " in text and "rotated" in text else ""

    text = wait_for(new_lines, what="access and worker lines in a new host.log")
    assert "size=6 " not in text
    # The first tries may have come before the supervisor took the signal (and
    # so went to the old file); once it has, no line goes there.
    service.request(b"echo|4444")
    wait_for(lambda: "size=9 " in log.read_text(), what="a later access line")
    assert "size=9 " not in log.with_suffix(".log.1").read_text()
    assert host.proc.poll() is None
    [worker] = host.workers()

    # A worker forked after the rotation writes to the new file too, though
    # the fork server's stderr is still the old one.
    worker.kill()
    [new] = wait_for(
        lambda: [w for w in host.workers() if w.pid != worker.pid], what="a new worker"
    )
    wait_for(lambda: f"pid={new.pid}" in log.read_text(), what="the new worker's ready line")
    assert f"pid={new.pid}" not in log.with_suffix(".log.1").read_text()
