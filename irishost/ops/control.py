"""The local control socket behind ``irishost status|reload|scale|stop``.

The running host listens on a unix stream socket (``[control] socket``, by
default in systemd's RuntimeDirectory). A client sends one JSON line and
reads one JSON line back, ``{"error": "..."}`` when the command failed:

- ``{"cmd": "status"}``: the snapshot below.
- ``{"cmd": "reload"}``: as SIGHUP, a fresh generation of workers from the
  re-read config and code; ``{"ok": true, "message": "reload started
  (generation N) ..."}`` once it has started, or ``{"error": "reload already
  in progress (generation N)"}``. With ``"wait": true``, answered when the
  reload completed, or with its failure.
- ``{"cmd": "scale", "count": N}``: N workers (1 to 1024), as SIGTTIN and
  SIGTTOU would reach it one by one; during a reload, the new generation's.
- ``{"cmd": "stop"}``: as SIGTERM.

The server never does the work on its own thread: the supervisor's
``act`` callable queues the command and wakes the loop, as its signal
handlers do, so a command cannot race the loop's own steps; the loop
answers with what it did, which ``act`` waits for.

A unix socket rather than TCP because file permissions then decide who may
look and command: the socket is 0600 (in a 0700 directory, when irishost
creates it), so only the service's user and root can connect.

The snapshot, as built by the supervisor's ``snapshot`` callable::

    {
      "service": str,        # the config's name (its file's stem)
      "cluster": str,        # the Iris cluster the workers serve
      "pid": int,            # the supervisor's
      "uptime": float,       # seconds since the supervisor started
      "relay": {"state": str, "port": int},  # "starting", "connected" (usable),
                             # "reconnecting" or "stopping"
      "served": int,         # requests answered since start, by any worker
      "in_flight": int,      # requests handed to workers and not yet answered
      "waiting": int,        # requests waiting for a worker to be ready
      "restarts": int,       # workers that died unexpectedly and were respawned
      "degraded": [          # slots down (crashed, failing to start) until ready again
        {"slot": int, "problem": str},
      ],
      "metrics": {           # null when [metrics] port is not set
        "port": int,         # the configured port
        "problem": str,      # why it is not served (e.g. the port is taken), "" when it is
      },
      "workers": [           # live worker processes (booting, ready or draining)
        {
          "slot": int,       # shared by a draining worker and its successor
          "pid": int,
          "state": str,      # "booting", "ready" or "draining"
          "served": int,
          "in_flight": int,
          "rss": int,        # resident memory, bytes; counts pages shared with other workers
          "uss": int,        # private memory (USS), bytes: what the worker alone holds
          "pss": int,        # proportional memory (PSS), bytes: shared pages split among
                             # their sharers, so the workers' add up to what they cost
          "restarts": int,   # unexpected deaths in this slot
          "uptime": float,   # seconds
        },
      ],
      "durations": {         # requests from arrival to answer, whatever the outcome
        "buckets": [[float, int]],  # [upper bound in seconds, requests up to it], cumulative
        "sum": float,        # seconds, all requests together
        "count": int,        # requests, the +Inf bucket
      },
      "failures": {          # requests answered with a fault or not at all, by cause:
        "fault": int,        # the handler raised
        "worker_died": int,  # its worker died holding it (crash, kill, max_rss)
        "no_room": int,      # no worker could take it: memory limits, stalled workers
        "expired": int,      # its deadline passed first: the caller got the relay's timeout
        "shutdown": int,     # the host was stopping
      },
      "log_records_dropped": int,  # log records the supervisor dropped, its log
                             # writer's queue full (stderr or the file not keeping up)
    }

``irishost status --json`` prints this snapshot as it is; its keys are
kept stable, and new ones are only ever added.

``snapshot`` runs on the server's connection threads, concurrently with the
supervisor loop, so it must read shared state under the lock that guards it.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iris.logs import ContextLog
from iris.private_socket import (
    PrivateSocketError,
    make_private_directory,
    owner_only,
    refuse_shared_directory,
    remove_stale_socket,
)
from iris.tool.table import table

from ..config import parse_worker_count

Snapshot = dict[str, Any]

# A command is a few bytes; anything longer than this is not a client of ours.
MAX_COMMAND = 4096
# A status answer is a few hundred bytes per worker; this allows thousands.
MAX_ANSWER = 16 * 2**20
# A client that connects and then says nothing is dropped after this long.
CLIENT_TIMEOUT = 5.0
# How quickly close() takes effect: the accept loop checks for it this often.
POLL_INTERVAL = 0.1

log = ContextLog(logging.getLogger(__name__))

# How errors about the socket's place name it, and what to do about a shared directory.
WHAT = "control socket"
REMEDY = "run chmod go-w on it or set [control] socket to a private directory"


class ControlError(Exception):
    """The control socket cannot be served or queried; ``str()`` is the line to show."""


@dataclass(frozen=True)
class Command:
    """A command for the supervisor's loop: "reload", "stop", or "scale" to ``count``."""

    name: str
    count: int = 0
    wait: bool = False  # reload: answer when it completed or failed, not when it started


# The commands that change the host, each handed to the supervisor's ``act``.
ACTIONS = ("reload", "scale", "stop")

# Runs on a connection thread: queues the command for the supervisor's loop
# and returns the line to answer, or raises ControlError to refuse it.
Act = Callable[[Command], str]


class ControlServer:
    """Answers commands on a unix socket at ``path`` until closed."""

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], Snapshot],
        act: Act,
        host_log: ContextLog | None = None,
    ):
        """``host_log``: the host's, to announce the socket with its context."""
        self.path = path
        try:
            make_private_directory(path.parent, WHAT, REMEDY)
            if remove_stale_socket(path, f"another irishost is already running with {WHAT} {path}"):
                log.info("removing stale control socket", path=path)
            self._server = _UnixServer(str(path), snapshot, act)
        except PrivateSocketError as err:
            raise ControlError(str(err)) from err
        except OSError as err:  # e.g. a path over the 107 bytes AF_UNIX allows
            raise ControlError(f"cannot listen on {path}: {err.strerror or err}") from err
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            args=(POLL_INTERVAL,),
            name="irishost-control",
            daemon=True,
        )
        self._thread.start()
        # Where `irishost status`, `stop` and the rest connect: said once, at start.
        (host_log or log).info("control socket", path=path)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a stuck client must not hold up the host's exit
    # socketserver's default backlog is 5: a burst of commands (a deploy script
    # running `irishost reload` on many shells) would be refused beyond it.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, path: str, snapshot: Callable[[], Snapshot], act: Act):
        self.snapshot = snapshot
        self.act = act
        super().__init__(path, _Handler)

    def server_bind(self) -> None:
        owner_only(self.socket)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; a client that hung up
        # early or never spoke is not worth one.
        log.warning("control connection failed", error=repr(sys.exception()))


class _Handler(socketserver.StreamRequestHandler):
    timeout = CLIENT_TIMEOUT
    server: _UnixServer

    def handle(self) -> None:
        line = self.rfile.readline(MAX_COMMAND)
        if not line:
            # Hung up without a word: another irishost checking whether this
            # socket is in use (_remove_stale_socket). Nothing to answer or log.
            return
        answer = _answer(line, self.server.snapshot, self.server.act)
        try:
            self.wfile.write(json.dumps(answer).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting; its loss, not the host's problem


def _answer(line: bytes, snapshot: Callable[[], Snapshot], act: Act) -> Snapshot:
    try:
        command = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        return {"error": f"not a JSON command: {line[:80]!r}"}
    cmd = command.get("cmd") if isinstance(command, dict) else None
    if cmd == "status":
        try:
            return snapshot()
        except Exception as err:  # the host carries on; the operator sees why status failed
            log.logger.exception("status snapshot failed")
            return {"error": f"status snapshot failed: {err!r}"}
    if cmd not in ACTIONS:
        known = ", ".join(repr(name) for name in ("status", *ACTIONS))
        return {"error": f"unknown command {cmd!r}; known: {known}"}
    count = 0
    if cmd == "scale":
        try:
            count = parse_worker_count(command.get("count"))
        except ValueError as err:
            return {"error": f"scale: {err}"}
    log.info("control command", cmd=cmd, **({"count": count} if cmd == "scale" else {}))
    try:
        wait = cmd == "reload" and command.get("wait") is True
        return {"ok": True, "message": act(Command(cmd, count, wait))}
    except ControlError as err:
        return {"error": str(err)}


def query_status(path: Path, timeout: float = 5.0) -> Snapshot:
    """Ask the host listening at ``path`` for its snapshot; ControlError on failure."""
    return send_command(path, {"cmd": "status"}, timeout)


def send_command(path: Path, command: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send ``command`` to the host listening at ``path``; its answer, or ControlError
    with the host's own error text when it refused."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            refuse_shared_directory(path.parent, WHAT, REMEDY)
            _connect(sock, str(path), timeout)
            sock.sendall(json.dumps(command).encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_ANSWER)
        except PrivateSocketError as err:
            raise ControlError(str(err)) from None
        except FileNotFoundError:
            raise ControlError(
                f"no irishost is running for this config: {path} not found"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"no irishost is running for this config: nothing listens on {path}"
            ) from None
        except PermissionError:
            raise ControlError(
                f"permission denied on {path}: run as the service's user or root"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            line = b""  # reported below, like a clean hang-up
        except TimeoutError:
            raise ControlError(f"irishost at {path} did not answer within {timeout:g} s") from None
    if not line:
        raise ControlError(f"irishost at {path} hung up without answering")
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ControlError(f"irishost at {path} sent a malformed answer: {line[:80]!r}")
    if "error" in answer:
        raise ControlError(f"irishost at {path}: {answer['error']}")
    return answer


def _connect(sock: socket.socket, path: str, timeout: float) -> None:
    """Connect, waiting up to ``timeout`` for room in the host's backlog.

    A unix socket's connect does not wait for a full backlog the way TCP's
    does: with a timeout set (the socket is non-blocking underneath) it fails
    at once with EAGAIN. TimeoutError once ``timeout`` has passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(POLL_INTERVAL / 10)


def wait_closed(path: Path, timeout: float) -> None:
    """Return once nothing listens at ``path`` (``irishost stop``); ControlError after
    ``timeout`` seconds. A host closes its control socket last, just before it exits.
    """
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            # Connecting and hanging up unheard is what the server ignores quietly.
            error = probe.connect_ex(str(path))
        if error in (errno.ENOENT, errno.ECONNREFUSED):
            return
        if time.monotonic() >= deadline:
            raise ControlError(f"irishost at {path} is still running after {timeout:g} s")
        time.sleep(POLL_INTERVAL)


def format_status(snapshot: Snapshot) -> str:
    """The snapshot as a summary and a table of workers, for a terminal."""
    relay = snapshot["relay"]
    workers = sorted(snapshot["workers"], key=lambda worker: (worker["slot"], worker["uptime"]))
    summary = [
        ("service", snapshot["service"]),
        ("cluster", snapshot["cluster"]),
        ("pid", snapshot["pid"]),
        ("uptime", _duration(snapshot["uptime"])),
        ("relay", f"{relay['state']} (port {relay['port']})"),
        ("served", snapshot["served"]),
        ("in flight", snapshot["in_flight"]),
        ("waiting", snapshot["waiting"]),
        ("restarts", snapshot["restarts"]),
        # A host started before an upgrade of the package has no "failures".
        ("failed", _failures(snapshot.get("failures", {}))),
        ("workers", f"{len(workers)} alive"),
        ("health", _health(snapshot["degraded"])),
        # A host started before an upgrade of the package does not count them.
        ("logging", f"{snapshot.get('log_records_dropped', 0)} records dropped"),
    ]
    # Absent from a host started before an upgrade of the package; null when off.
    metrics = snapshot.get("metrics")
    if metrics:
        summary.append(("metrics", _metrics(metrics)))
    header: list[object] = [
        "WORKER",
        "PID",
        "STATE",
        "SERVED",
        "IN FLIGHT",
        "RSS",
        "USS",
        "PSS",
        "RESTARTS",
        "UPTIME",
    ]
    rows = [
        [
            worker["slot"],
            worker["pid"],
            worker["state"],
            worker["served"],
            worker["in_flight"],
            _size(worker["rss"]),
            # A host started before an upgrade of the package reads RSS alone.
            *(_size(worker[key]) if key in worker else "-" for key in ("uss", "pss")),
            worker["restarts"],
            _duration(worker["uptime"]),
        ]
        for worker in workers
    ]
    lines = [f"{name + ':':<11}{value}" for name, value in summary]
    return "\n".join([*lines, "", *table([header, *rows])]) + "\n"


def _failures(failures: dict[str, int]) -> str:
    """The failed requests' total, and the causes that occurred."""
    causes = [f"{cause} {count}" for cause, count in failures.items() if count]
    total = sum(failures.values())
    return f"{total} ({', '.join(causes)})" if causes else "0"


def _metrics(metrics: dict[str, Any]) -> str:
    """Where the metrics are served, or that they are not and why."""
    if metrics["problem"]:
        return f"not served: {metrics['problem']}"
    return f"http://127.0.0.1:{metrics['port']}/metrics"


def _health(degraded: list[dict[str, Any]]) -> str:
    if not degraded:
        return "ok"
    return "degraded: " + "; ".join(f"worker {d['slot']} {d['problem']}" for d in degraded)


def _size(count: int) -> str:
    """Bytes in binary units, as free(1) and the config's sizes use."""
    value, unit = float(count), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"


def _duration(seconds: float) -> str:
    """Two units at most: enough to tell a fresh worker from an old one."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
