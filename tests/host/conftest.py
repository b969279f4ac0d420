"""Running a real ``irishost`` for the tests: configs, processes, clients, cleanup.

pytest gives these fixtures to every test under tests/host/; the helpers the
tests import by name are in production_support.py here and ../support.py.

``service``
    ``service.config(**tables)`` writes ``service.toml`` and the probe handler
    (tests/host/probe.py) into the test's tmp_path; ``service.start()``
    runs ``python -m irishost -c service.toml`` and waits until it answers.
    At teardown every host is stopped with SIGTERM (which must exit 0), its
    workers must be gone, and none of the cluster's segments may remain in
    /dev/shm.

``other_service``
    Another such service, in tmp_path/other, with a cluster of its own.

``restore_root_logger`` (every test here)
    ``configure_logging``, called by in-process tests and by a reload
    (test_succession.py), changes the root logger; it is put back after
    each test, so no handler outlives the stream it writes to.

``notify``
    A NotifyListener (production_support.py) on a path in tmp_path,
    systemd's end of NOTIFY_SOCKET; ``notify.env`` goes into the host's
    environment. List it before ``service`` so that it outlives the host and
    hears its STOPPING=1.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from production_support import NotifyListener
from support import free_port, gone, journal_stream, wait_for, worker_processes
from toml_text import to_toml

import iris
from irishost.wire.ring import segment_prefix

PROBE = Path(__file__).resolve().parent / "probe.py"
SHM = "/dev/shm"

# How long a host may take to answer its first request, and to exit on SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def restore_root_logger():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = saved


def render_config(tables: dict[str, dict], topics: list[dict]) -> str:
    lines = []
    for name, table in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {to_toml(value)}" for key, value in table.items()]
    for topic in topics:
        lines.append("[[topics]]")
        lines += [f"{key} = {to_toml(value)}" for key, value in topic.items()]
    return "\n".join(lines) + "\n"


class Host:
    """One ``irishost`` process and the service it runs."""

    def __init__(self, service: Service, args: list[str], env: dict[str, str], journal: bool):
        self.service = service
        self.cluster = service.cluster
        self.port = service.port
        self._log_file = (service.dir / f"host-{len(service.hosts)}.log").open("wb")
        self.log_path = Path(self._log_file.name)
        if journal:
            env = {**env, **journal_stream(self._log_file)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "irishost", "-c", str(service.config_path), *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        self.pid = self.proc.pid
        self.worker_pids: set[int] = set()  # every worker seen, for the teardown check

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The log once ``text`` is in it: a running host's processes write
        their lines from writer threads, a moment after they are logged."""
        return wait_for(lambda: text in (log := self.log()) and log, timeout, what=repr(text))

    def workers(self) -> list[psutil.Process]:
        """The host's live worker processes, remembered for the teardown check."""
        live = [child for child in worker_processes(self.pid) if not gone(child.pid)]
        self.worker_pids.update(child.pid for child in live)
        return live

    def worker_count(self, count: int, timeout: float = 10.0) -> list[psutil.Process]:
        """Wait until exactly ``count`` workers run; return them."""
        return wait_for(
            lambda: len(found := self.workers()) == count and found,
            timeout,
            what=f"{count} workers of {self.cluster}",
        )

    def wait_serving(self, conn: iris.Connection, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"irishost exited early:\n{self.log()}"
            try:
                conn.request(self.cluster, b"ping", 0.2)
                self.workers()
                return
            except iris.TimeoutError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"irishost did not answer in time:\n{self.log()}")

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"irishost did not exit in time:\n{self.log()}") from None

    def stop(self) -> int:
        """SIGTERM and wait for the exit code; SIGKILL (and fail) if it hangs."""
        if self.proc.poll() is None:
            self.workers()
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


class Service:
    """A service directory in tmp_path: its config, the probe handler, its hosts."""

    def __init__(self, directory: Path, test_name: str):
        self.dir = directory
        # A cluster name of its own keeps the /dev/shm check to this test's segments,
        # even when several test runs share the machine.
        slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower().removeprefix("test_"))
        self.cluster = f"{slug.strip('-')[:40]}-{uuid.uuid4().hex[:6]}"
        self.port = free_port()
        self.config_path = directory / "service.toml"
        self.hosts: list[Host] = []
        self._conns: list[iris.Connection] = []
        self._conn: iris.Connection | None = None
        self._callers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="caller")
        shutil.copy(PROBE, directory / "probe.py")

    def config(self, topics: list[dict] = (), **tables: dict) -> Path:
        """Write service.toml: small, quick defaults overridden table by table."""
        defaults = {
            "service": {"cluster": self.cluster, "handler": "probe:ProbeHandler"},
            "relay": {"port": self.port, "embedded": True, "connect_timeout": "5s"},
            "workers": {"count": 1, "timeout_grace": "5s", "shutdown_timeout": "5s"},
            "limits": {},
            "control": {"socket": "control.sock"},
        }
        for name, table in tables.items():
            defaults[name] = {**defaults.get(name, {}), **table}
        if "port" in defaults["relay"]:
            self.port = defaults["relay"]["port"]
        self.config_path.write_text(render_config(defaults, list(topics)))
        return self.config_path

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        journal: bool = False,
    ) -> Host:
        """Run irishost on the config (written with defaults if not yet).

        ``journal``: its log file stands in for journald's stream, as under systemd.
        """
        if not self.config_path.exists():
            self.config()
        host = Host(self, list(args), env or {}, journal)
        self.hosts.append(host)
        if wait:
            host.wait_serving(self.connect())
        return host

    def run(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        with_config: bool = True,
    ):
        """Run irishost to completion; the CompletedProcess with text output.

        ``with_config=False`` leaves out ``-c service.toml``.
        """
        if with_config and not self.config_path.exists():
            self.config()
        config = ["-c", str(self.config_path)] if with_config else []
        return subprocess.run(
            [sys.executable, "-m", "irishost", *config, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def connect(self) -> iris.Connection:
        """A client of the relay, closed at teardown."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                conn = iris.connect(self.port)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._conns.append(conn)
        return conn

    @property
    def conn(self) -> iris.Connection:
        """The test's client, made on first use."""
        if self._conn is None:
            self._conn = self.connect()
        return self._conn

    def request(self, payload: bytes, timeout: float = 5.0) -> bytes:
        return self.conn.request(self.cluster, payload, timeout)

    def request_async(self, payload: bytes, timeout: float = 10.0) -> Future:
        """The request made on another thread; the future's result is the reply."""
        return self._callers.submit(self.conn.request, self.cluster, payload, timeout)

    def records(self, what: str | None = None) -> list[list]:
        """The probe's observations, ``[what, pid, ...]``, optionally of one kind."""
        path = self.dir / "records.jsonl"
        if not path.exists():
            return []
        # A line still being written (no newline yet) is left for the next call.
        complete = path.read_text().split("\n")[:-1]
        lines = [json.loads(line) for line in complete]
        return [line for line in lines if what is None or line[0] == what]

    def open_gate(self, name: str) -> None:
        (self.dir / name).touch()

    def close_clients(self) -> None:
        """Close every client; callers still waiting get ClosedError."""
        for conn in self._conns:
            conn.close()
        self._callers.shutdown()

    def shm_leftovers(self) -> list[str]:
        prefix = segment_prefix(self.cluster) + "-"
        return [name for name in os.listdir(SHM) if name.startswith(prefix)]


@pytest.fixture
def service(tmp_path, request):
    yield from _serve(Service(tmp_path, request.node.name))


@pytest.fixture
def other_service(tmp_path, request):
    """A second service, in tmp_path/other, whose config has the same name (service.toml)."""
    directory = tmp_path / "other"
    directory.mkdir()
    yield from _serve(Service(directory, request.node.name))


def _serve(svc: Service):
    """Yield ``svc``; then stop its hosts and check that they left nothing behind."""
    yield svc
    svc.close_clients()
    problems = []
    try:
        for host in svc.hosts:
            if host.proc.poll() is None:
                code = host.stop()
                if code != 0:
                    problems.append(f"irishost exited with {code} on SIGTERM:\n{host.log()}")
            left = [pid for pid in host.worker_pids if not gone(pid, wait=5.0)]
            if left:
                problems.append(f"workers {left} outlived their supervisor")
    finally:
        for host in svc.hosts:
            host.close()
            for pid in host.worker_pids:
                if not gone(pid):
                    os.kill(pid, signal.SIGKILL)
    leftovers = svc.shm_leftovers()
    if leftovers:
        problems.append(f"left in /dev/shm: {leftovers}")
    assert not problems, "\n".join(problems)


@pytest.fixture
def notify(tmp_path):
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    yield listener
    listener.close()
