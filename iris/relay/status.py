"""The relay's status socket: what it holds, as JSON, for ``iris ls`` and ``iris relay status``.

Without it an unknown cluster is a silent wait for the full timeout, and
nothing lists clusters, members or topics (NATS has its monitoring
endpoint for this). The relay listens on a unix socket whose path follows
from its TCP port, so a client that knows the port finds it::

    $RUNTIME_DIRECTORY/<port>.sock      # under systemd's RuntimeDirectory=
    /tmp/iris-relay-<uid>/<port>.sock   # elsewhere

mode 0600 in a directory of the relay's user that no one else may write to
(iris/private_socket.py), so only that user and root can read it. Under
systemd the first: PrivateTmp= would hide the second from every shell.
A client looks where a relay of its own environment would listen, then
under /tmp, then in the shipped unit's directory, /run/iris-relay
(systemd/iris-relay.service), so root finds that one without being told.
A client connects and reads one JSON object, then EOF; it sends nothing.
The original Iris node has no such socket: a client that finds none says so.

The snapshot is built on the relay's own loop (it only counts what the
router holds: O(clusters + topics)); a thread per client writes it, so a
client that does not read cannot hold up the loop. Its keys, as built by
``RelayServer.snapshot``::

    {
      "server": "iris-relay", "version": str, "pid": int, "port": int,
      "uptime": float,              # seconds
      "connections": int,           # TCP connections, attached or not
      "clusters": {name: members},  # every cluster with at least one member
      "topics": {name: subscribers},
      "pending": int,               # requests waiting for their answer
      "in_msgs": int, "in_bytes": int,    # packets and bytes read from clients
      "out_msgs": int, "out_bytes": int,  # packets and bytes written to them
      "slow_consumers": int,        # connections dropped for not reading
      "slow_consumer_causes": {cause: int},  # the same by cause: outbound_cap,
                                    # outbound_budget, write_deadline (the flags)
      "unsent_bytes": int,          # bytes routed to connections, not yet written
      "outbound_budget": int,       # --outbound-budget
      "partial_bytes": int,         # bytes of incomplete packets held now
      "partial_budget": int,        # --partial-budget
      "permissions": str | None,    # --permissions: the file, if any
      "refusals": {action: int},    # refused by it: serve, send, subscribe, publish
    }
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..private_socket import (
    PrivateSocketError,
    make_private_directory,
    owner_only,
    refuse_shared_directory,
    remove_stale_socket,
)

log = logging.getLogger("iris.relay")

WHAT = "relay status socket"
REMEDY = "run chmod go-w on it"
# A client that does not read its snapshot within this long is dropped.
SEND_TIMEOUT = 5.0
# Thousands of clusters and topics fit; a longer answer is not a relay's.
MAX_ANSWER = 64 * 2**20
# RuntimeDirectory= of the shipped iris-relay.service.
UNIT_DIRECTORY = Path("/run/iris-relay")

Snapshot = dict[str, Any]


def status_path(port: int) -> Path:
    """Where the relay on TCP ``port`` serves its status, started in this environment."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "")
    if runtime:
        # systemd joins several RuntimeDirectory= entries with ":".
        return Path(runtime.split(":")[0]) / f"{port}.sock"
    return _tmp_path(port)


def status_paths(port: int) -> list[Path]:
    """Where a client looks for the status of the relay on ``port``, in order:
    where a relay started here would serve it, then under /tmp (a shell
    started from a unit inherits its RUNTIME_DIRECTORY), then the unit's."""
    candidates = [status_path(port), _tmp_path(port), UNIT_DIRECTORY / f"{port}.sock"]
    return list(dict.fromkeys(candidates))


def _tmp_path(port: int) -> Path:
    return Path("/tmp") / f"iris-relay-{os.getuid()}" / f"{port}.sock"


class StatusListener:
    """The listening status socket; the relay's loop calls :meth:`serve` when it is readable."""

    def __init__(self, port: int) -> None:
        self.path = status_path(port)
        make_private_directory(self.path.parent, WHAT, REMEDY)
        remove_stale_socket(self.path, f"another relay serves port {port}'s status at {self.path}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            owner_only(self.sock)
            self.sock.bind(str(self.path))
            self.sock.listen(64)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    @classmethod
    def open(cls, port: int) -> StatusListener | None:
        """The listener, or None with a warning: a relay without its status
        still routes, so a taken or unsafe path must not stop it."""
        try:
            return cls(port)
        except (OSError, PrivateSocketError) as err:
            log.warning("no status socket: %s", err)
            return None

    def serve(self, snapshot: Callable[[], Snapshot]) -> None:
        """Answer every waiting client with one snapshot, written on threads."""
        clients: list[socket.socket] = []
        while True:
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as err:  # out of descriptors: the next loop turn retries
                log.warning("status socket: cannot accept: %s", err.strerror or err)
                break
            clients.append(client)
        if not clients:
            return
        data = json.dumps(snapshot()).encode() + b"\n"
        for client in clients:
            threading.Thread(target=_send, args=(client, data), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _send(client: socket.socket, data: bytes) -> None:
    with client:
        client.settimeout(SEND_TIMEOUT)
        try:
            client.sendall(data)
        except OSError:
            pass  # the client went away or stopped reading: its loss


class StatusError(Exception):
    """The status cannot be read; ``str()`` is the line to show."""


class NoStatusSocket(StatusError):
    """Nothing serves a status for the port: no relay, or one without it (an Iris node)."""


def query(port: int, timeout: float = 5.0) -> Snapshot:
    """The snapshot of the relay on ``port``, from the first of :func:`status_paths`
    that has a socket; NoStatusSocket if none has, or StatusError."""
    paths = status_paths(port)
    for path in paths:
        try:
            return _query(path, timeout)
        except NoStatusSocket:
            continue
    raise NoStatusSocket(f"no status socket at {' or '.join(map(str, paths))}")


def _query(path: Path, timeout: float) -> Snapshot:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            refuse_shared_directory(path.parent, WHAT, REMEDY)
            sock.connect(str(path))
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_ANSWER)
        except PrivateSocketError as err:
            raise StatusError(str(err)) from None
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoStatusSocket(f"no status socket at {path}") from None
        except PermissionError:
            raise StatusError(
                f"permission denied on {path}: run as the relay's user or root"
            ) from None
        except OSError as err:
            raise StatusError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        answer = json.loads(line)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise StatusError(f"malformed status from {path}: {line[:80]!r}")
    return answer
