"""The handler irishost's tests run in worker processes.

The tests copy this file next to a generated config and point
``service.handler`` at ``probe:ProbeHandler``. One handler serves every test:
a request's text names what to do (``b"pid"``, ``b"sleep:0.5"``, ``b"segv"``,
...; anything after a ``|`` is padding), and whatever the handler observes
is appended to ``records.jsonl`` beside the module, one JSON array per line
starting with what happened and the worker's pid, for the test to read back.

``PROBE_INIT`` in the environment makes ``init`` misbehave: ``raise``,
``exit`` (``os._exit(9)``), ``kill`` (SIGKILL itself), ``exit-once`` (die
only in the first worker that boots), ``raise-while:<file>`` (raise while a
file of that name exists beside the module: a database that is briefly
down) or ``hang-while:<file>`` (block until that file is gone).

``handle_drop`` records ``drop``; ``close()`` records ``close`` and whether
init's connection had closed, then, if ``PROBE_CLOSE`` is ``raise``, raises.
With ``PROBE_ATEXIT`` set, ``init`` registers an atexit callback that
records ``atexit``: both are how a test sees a worker's graceful end.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import json
import os
import signal
import threading
import time

import iris
from irishost.wire import frames

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDS = os.path.join(HERE, "records.jsonl")
MiB = 1024 * 1024

_lock = threading.Lock()
_running = 0  # handle_request calls running right now in this worker
_peak = 0  # the most that ever ran at once
_hoard: list[bytes] = []  # memory kept on purpose by "alloc"


def record(what: str, *values) -> None:
    """Append one observation; a single O_APPEND write keeps lines whole."""
    line = json.dumps([what, os.getpid(), *values]) + "\n"
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _wait_for_file(name: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(HERE, name)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {name} never opened")
        time.sleep(0.01)


class ProbeHandler(iris.ServiceHandler):
    def init(self, conn: iris.Connection) -> None:
        self.conn = conn
        record("init", type(conn).__name__, time.monotonic())
        if os.environ.get("PROBE_ATEXIT"):
            atexit.register(record, "atexit")
        mode = os.environ.get("PROBE_INIT", "")
        if mode == "raise":
            raise RuntimeError("init refused: the database is down")
        if mode == "exit":
            os._exit(9)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        condition, _, flag = mode.partition("-while:")
        flag_path = os.path.join(HERE, flag)
        if condition == "raise" and os.path.exists(flag_path):
            raise RuntimeError(f"init refused while {flag} exists")
        if condition == "hang":
            while os.path.exists(flag_path):
                time.sleep(0.01)
        if mode == "exit-once":
            try:
                os.close(os.open(os.path.join(HERE, "died-once"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os._exit(9)

    def handle_drop(self, reason: Exception) -> None:
        record("drop", str(reason))

    def close(self) -> None:
        # The connection init got is still open: a lost one would fail this record.
        record("close", self.conn.closed)
        if os.environ.get("PROBE_CLOSE") == "raise":
            raise RuntimeError("close refused: the pool is gone")

    # -- requests: "command" or "command:argument" ----------------------------------

    def handle_request(self, request: bytes) -> bytes:
        global _running, _peak
        text = request.partition(b"|")[0].decode()
        command, _, argument = text.partition(":")
        if command == "ping":  # the tests' "is it up yet?", not worth a record
            return b"pong"
        if command == "echo":  # the whole request back, padding and all
            return request
        record("request", text)
        with _lock:
            _running += 1
            _peak = max(_peak, _running)
        try:
            return getattr(self, f"do_{command}")(argument)
        finally:
            with _lock:
                _running -= 1

    def do_pid(self, _: str) -> bytes:
        return str(os.getpid()).encode()

    def do_sleep(self, seconds: str) -> bytes:
        time.sleep(float(seconds))
        return self.do_pid("")

    def do_peak(self, seconds: str) -> bytes:
        """Stay busy ``seconds``, then report the most handlers seen running at once."""
        time.sleep(float(seconds))
        return json.dumps([os.getpid(), _peak]).encode()

    def do_wait(self, gate: str) -> bytes:
        """Block until a file named ``gate`` appears next to this module."""
        _wait_for_file(gate)
        return self.do_pid("")

    def do_hang(self, _: str) -> bytes:
        threading.Event().wait()
        raise AssertionError("unreachable")

    def do_fail(self, message: str) -> bytes:
        raise ValueError(message)

    # The crashes take an optional delay, so a test can queue work behind them.

    def do_segv(self, delay: str) -> bytes:
        time.sleep(float(delay or 0))
        ctypes.string_at(0)  # reads address 0 in C: SIGSEGV
        raise AssertionError("unreachable")

    def do_abort(self, delay: str) -> bytes:
        time.sleep(float(delay or 0))
        os.abort()

    def do_exit(self, code_and_delay: str) -> bytes:
        code, _, delay = code_and_delay.partition(",")
        time.sleep(float(delay or 0))
        os._exit(int(code))

    def do_kill(self, delay: str) -> bytes:
        time.sleep(float(delay or 0))
        os.kill(os.getpid(), signal.SIGKILL)
        threading.Event().wait()
        raise AssertionError("unreachable")

    def do_fork(self, delay: str) -> bytes:
        """Fork; the child returns at once, the worker after ``delay`` seconds.

        A careless handler's child that returns carries on in the worker's
        code with the worker's rings mapped; its reply would come first.
        """
        child = os.fork()
        if child == 0:
            return b"child %d" % os.getpid()
        record("forked", child)
        time.sleep(float(delay or 0))
        return self.do_pid("")

    def do_garbage(self, delay: str) -> bytes:
        """Write a frame the supervisor cannot decode into the worker's outbox, as
        a worker with corrupted memory would; then answer after ``delay``."""
        from irishost.worker.core import WorkerCore

        (worker,) = [o for o in gc.get_objects() if isinstance(o, WorkerCore)]
        worker.send(b"\xc1 not msgpack")
        time.sleep(float(delay or 0))
        return self.do_pid("")

    def do_grow(self, rate_and_limit: str) -> bytes:
        """Grow resident memory by ``rate`` MiB a second, up to ``limit`` MiB."""
        rate, _, limit = rate_and_limit.partition(",")
        for _ in range(int(limit) // 10):
            _hoard.append(b"x" * (10 * MiB))
            time.sleep(10 / float(rate))
        return self.do_pid("")

    def do_alloc(self, mebibytes: str) -> bytes:
        # Written bytes, not calloc'ed ones, so the pages are really resident.
        _hoard.append(b"x" * (int(mebibytes) * MiB))
        return self.do_pid("")

    def do_call(self, cluster: str) -> bytes:
        return self.conn.request(cluster, b"from a worker", 5.0)

    def do_broadcast(self, cluster: str) -> bytes:
        self.conn.broadcast(cluster, b"broadcast from a worker")
        return b"sent"

    def do_publish(self, topic: str) -> bytes:
        self.conn.publish(topic, b"event from a worker")
        return b"sent"

    # -- broadcasts, events, tunnels ------------------------------------------------

    def handle_broadcast(self, message: bytes) -> None:
        text = message.partition(b"|")[0].decode()
        record("broadcast", text)
        if text.startswith("wait:"):
            _wait_for_file(text.removeprefix("wait:"))

    def handle_event(self, topic: str, event: bytes) -> None:
        record("event", topic, event.decode())

    def handle_tunnel(self, tunnel) -> None:
        """The first message picks the mode: "echo", "close", "hold:<gate>",
        "bad-timeout" (a send with a timeout of the wrong type; the error goes
        back as a message) or "bad-frame" (a TUN_SEND frame the supervisor
        cannot perform, written past the tunnel's checks, as a broken worker
        would)."""
        record("tunnel")
        try:
            mode = tunnel.recv(10).decode()
            if mode == "bad-timeout":
                try:
                    tunnel.send(b"never sent", timeout="5")
                except ValueError as err:
                    tunnel.send(f"{type(err).__name__}: {err}".encode(), timeout=10)
                mode = "echo"
            if mode == "bad-frame":
                tunnel._send_frame(frames.TunSend(tunnel.id, b"x", "5").encode())
                tunnel.recv(10)
            if mode == "echo":
                while True:
                    message = tunnel.recv()
                    tunnel.send(b"%d:" % os.getpid() + message, timeout=10)
            elif mode.startswith("hold:"):
                _wait_for_file(mode.removeprefix("hold:"))
                count = size = 0
                while (message := tunnel.recv(10)) != b"end":
                    count, size = count + 1, size + len(message)
                tunnel.send(json.dumps([count, size]).encode(), timeout=10)
            tunnel.close()
        except iris.ClosedError as err:
            record("tunnel closed", str(err))
