"""Helpers for the production tests of irishost: systemd's notify socket, a
rewritable handler, a steady stream of requests, and ``irishost status``.
The ``notify`` fixture is in conftest.py.

Nothing here is mocked: the listener is the datagram socket systemd would
hold, the handler is a real module the host imports (and re-imports on
SIGHUP), and the load comes from real clients on their own connections.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import NamedTuple

from support import wait_for

import iris

# A notify datagram is a few lines of KEY=VALUE; systemd itself reads at most this much.
DATAGRAM_MAX = 4096
_UCRED = struct.Struct("iII")  # pid, uid, gid: what SCM_CREDENTIALS carries


class Datagram(NamedTuple):
    at: float  # time.monotonic() when it arrived
    pid: int  # the sender, from the kernel's credentials
    fields: dict[str, str]


class NotifyListener:
    """systemd's end of NOTIFY_SOCKET: records every datagram with its sender and time.

    ``address`` is a filesystem path or "@name" for the abstract namespace,
    exactly as NOTIFY_SOCKET spells it. SO_PASSCRED makes the kernel attach
    the sender's pid, which is how systemd applies NotifyAccess=main.
    """

    def __init__(self, address: str):
        self.address = address
        self.env = {"NOTIFY_SOCKET": address}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self._sock.settimeout(0.1)
        self._received: list[Datagram] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        space = socket.CMSG_SPACE(_UCRED.size)
        while not self._closed:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(DATAGRAM_MAX, space)
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            lines = data.decode().split("\n")
            fields = dict(line.partition("=")[::2] for line in lines if line)
            with self._lock:
                self._received.append(Datagram(time.monotonic(), pid, fields))

    def datagrams(self, key: str | None = None) -> list[Datagram]:
        """Everything received so far, or only the datagrams carrying ``key``."""
        with self._lock:
            received = list(self._received)
        return [d for d in received if key is None or key in d.fields]

    def states(self) -> list[str]:
        """The state changes in order, e.g. ["READY=1", "RELOADING=1", ...].

        STATUS= and WATCHDOG= are left out: they repeat on a timer.
        """
        return [
            f"{key}={value}"
            for datagram in self.datagrams()
            for key, value in datagram.fields.items()
            if key in ("READY", "RELOADING", "STOPPING")
        ]

    def wait(self, key: str, value: str | None = None, count: int = 1, timeout: float = 10.0):
        """Wait until ``count`` datagrams carry ``key`` (with ``value``); return the last."""

        def found():
            hits = [d for d in self.datagrams(key) if value is None or d.fields[key] == value]
            return hits[count - 1] if len(hits) >= count else None

        what = f"datagram #{count} with {key}={value or '*'} on {self.address}"
        return wait_for(found, timeout, what=what)

    def wait_status(self, contains: str, since: float = 0.0, timeout: float = 10.0) -> Datagram:
        """The first STATUS= line after ``since`` that contains ``contains``."""

        def found():
            return next(
                (
                    d
                    for d in self.datagrams("STATUS")
                    if d.at >= since and contains in d.fields["STATUS"]
                ),
                None,
            )

        return wait_for(found, timeout, what=f"STATUS containing {contains!r}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self._sock.close()


# -- the handler the tests rewrite ----------------------------------------------------------

HANDLER_BODY = '''
HERE = os.path.dirname(os.path.abspath(__file__))


def record(what, *values):
    """One line in records.jsonl, as the probe handler writes them: [what, pid, ...]."""
    line = json.dumps([what, os.getpid(), *values]) + "\\n"
    fd = os.open(os.path.join(HERE, "records.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class Handler(iris.ServiceHandler):
    def init(self, conn):
        self.conn = conn
        time.sleep(INIT_DELAY)
        if INIT_RAISES:
            raise RuntimeError("init refused in version " + VERSION)
        record("init done", VERSION, time.monotonic())

    def handle_request(self, request):
        """Answer "<version> <pid> <request>"; "sleep:S" first sleeps S seconds,
        "publish" first publishes an event through init's connection."""
        text = request.decode()
        command, _, argument = text.partition(":")
        if command == "sleep":
            time.sleep(float(argument))
        elif command == "publish":
            self.conn.publish("irishost-tests-nobody-listens", b"event")
        return f"{VERSION} {os.getpid()} {text}".encode()

    def handle_drop(self, reason):
        record("drop", str(reason))
'''


def write_handler(
    directory: Path, version: str = "v1", init_delay: float = 0.0, init_raises: bool = False
) -> str:
    """Write handler.py into ``directory``; return the ``service.handler`` spec for it."""
    header = (
        '"""Written by the irishost production tests."""\n\n'
        "import json\nimport os\nimport time\n\nimport iris\n\n"
        f"VERSION = {version!r}\nINIT_DELAY = {init_delay!r}\nINIT_RAISES = {init_raises!r}\n"
    )
    (directory / "handler.py").write_text(header + HANDLER_BODY)
    return "handler:Handler"


class Reply(NamedTuple):
    version: str
    pid: int


def parse_reply(reply: bytes, request: bytes) -> Reply:
    """Check that ``reply`` answers ``request`` (not another one) and split it."""
    version, pid, echoed = reply.decode().split(" ", 2)
    assert echoed == request.decode(), f"reply {reply!r} answers another request than {request!r}"
    return Reply(version, int(pid))


# -- a steady stream of requests --------------------------------------------------------------


class Outcome(NamedTuple):
    at: float  # time.monotonic() when the answer came
    reply: Reply | None  # None: the request failed
    error: str  # why it failed, or ""


class Load:
    """``threads`` clients requesting one after another until stopped.

    Each has its own connection, each request a payload of its own, and each
    reply is checked against that payload. With ``reconnect``, a client whose
    connection died (its relay went away) dials again until it can.
    """

    def __init__(
        self,
        port: int,
        cluster: str,
        threads: int = 4,
        timeout: float = 5.0,
        reconnect: bool = False,
    ):
        self.port = port
        self.cluster = cluster
        self.timeout = timeout
        self.reconnect = reconnect
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"load-{n}", daemon=True)
            for n in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, number: int) -> None:
        conn = None
        try:
            for count in itertools.count():
                if self._stop.is_set():
                    return
                if conn is None or conn.closed:
                    conn = self._dial()
                    if conn is None:
                        continue
                request = f"echo:{number}-{count}".encode()
                try:
                    reply = parse_reply(conn.request(self.cluster, request, self.timeout), request)
                    outcome = Outcome(time.monotonic(), reply, "")
                except (iris.RemoteError, iris.TimeoutError, iris.ClosedError) as err:
                    outcome = Outcome(time.monotonic(), None, f"{type(err).__name__}: {err}")
                except AssertionError as err:  # a reply to another request: never acceptable
                    outcome = Outcome(time.monotonic(), None, f"wrong reply: {err}")
                with self._lock:
                    self._outcomes.append(outcome)
        finally:
            if conn is not None:
                conn.close()

    def _dial(self) -> iris.Connection | None:
        try:
            return iris.connect(self.port)
        except OSError:
            if not self.reconnect:
                raise
            time.sleep(0.05)
            return None

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes() if outcome.reply is None]

    def wait_for_replies(self, count: int, since: float = 0.0, timeout: float = 10.0, **match):
        """Wait for ``count`` successful replies after ``since`` matching ``match``."""

        def enough():
            hits = [
                o.reply
                for o in self.outcomes()
                if o.at >= since
                and o.reply is not None
                and all(getattr(o.reply, key) == value for key, value in match.items())
            ]
            return hits if len(hits) >= count else None

        return wait_for(enough, timeout, what=f"{count} replies matching {match}")

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        return self.outcomes()


@contextlib.contextmanager
def steady_load(*args, **kwargs):
    load = Load(*args, **kwargs)
    try:
        yield load
    finally:
        load.stop()


# -- irishost status ------------------------------------------------------------------------


def run_ok(service, *args: str) -> str:
    """``irishost ARGS`` for ``service``, which must succeed; its stdout."""
    result = service.run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status_json(service) -> dict:
    """``irishost status --json -c service.toml``, which must succeed."""
    snapshot: dict = json.loads(run_ok(service, "status", "--json"))
    return snapshot


def status(service) -> dict:
    """``irishost status -c service.toml``: exit code, the header fields, the worker rows."""
    result = service.run("status", timeout=15)
    assert result.returncode == 0, result.stderr
    header_text, _, table = result.stdout.partition("\n\n")
    header = dict(
        (name.strip(), value.strip())
        for name, _, value in (line.partition(":") for line in header_text.splitlines())
    )
    lines = [line for line in table.splitlines() if line.strip()]
    columns = [name.strip() for name in lines[0].split("  ") if name.strip()]
    rows = [
        dict(zip(columns, [cell.strip() for cell in line.split("  ") if cell.strip()], strict=True))
        for line in lines[1:]
    ]
    return {"header": header, "columns": columns, "rows": rows, "text": result.stdout}
