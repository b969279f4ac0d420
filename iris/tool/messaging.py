"""One-shot messaging from the shell: request, broadcast, publish, subscribe, reply.

Payloads are raw bytes: DATA from the command line (UTF-8), or all of stdin
when DATA is omitted; replies and events go to stdout unchanged. Progress
notes go to stderr so stdout stays pipeable.
"""

from __future__ import annotations

import os
import queue
import sys
import threading

import iris

from . import status
from .exits import Exit, ToolError, relay_unreachable


def note(message: str) -> None:
    """A line for the human at the terminal, on stderr."""
    print(f"iris: {message}", file=sys.stderr, flush=True)


def connect(port: int) -> iris.Connection:
    """A plain connection, or ToolError(NO_RELAY) naming the port."""
    try:
        return iris.connect(port)
    except OSError as err:
        raise relay_unreachable(port, err) from err


def payload(data: str | None) -> bytes:
    """DATA as UTF-8, or everything on stdin when DATA was omitted."""
    return data.encode() if data is not None else sys.stdin.buffer.read()


def write_out(data: bytes) -> None:
    """``data`` to stdout now; ToolError(FAILURE) in one line when stdout cannot
    take it (``> /dev/full``), as BrokenPipeError stays the caller's to handle."""
    out = sys.stdout.buffer
    try:
        out.write(data)
        out.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        # What stayed in the buffer would fail again in the interpreter's
        # final flush, with a second message; /dev/null takes it quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        raise ToolError(Exit.FAILURE, f"cannot write to stdout: {err.strerror or err}") from err


def request(port: int, cluster: str, data: bytes, timeout: float) -> Exit:
    """Send one request; the reply goes to stdout as raw bytes, and on a terminal
    with a newline at the end, so that the prompt does not run into it. After
    a timeout the relay's status tells an unknown cluster from a slow handler."""
    with connect(port) as conn:
        try:
            reply = conn.request(cluster, data, timeout)
        except iris.TimeoutError as err:
            if status.members(port, cluster) == 0:
                line = f"timeout: {err}: {status.no_member_line(cluster)}"
                raise ToolError(Exit.TIMEOUT, line) from None
            raise
    if sys.stdout.isatty() and not reply.endswith(b"\n"):
        reply += b"\n"
    write_out(reply)
    return Exit.OK


def broadcast(port: int, cluster: str, data: bytes) -> Exit:
    with connect(port) as conn:
        conn.broadcast(cluster, data)
    return Exit.OK


def publish(port: int, topic: str, data: bytes) -> Exit:
    with connect(port) as conn:
        conn.publish(topic, data)
    return Exit.OK


def subscribe(port: int, topic: str, count: int | None) -> Exit:
    """Print each event of ``topic`` as one line until ``count`` events or Ctrl-C.

    Events are handled on one thread, so lines come out in arrival order.
    """
    # One event in hand at a time: while stdout is slow, the handler thread
    # blocks, events wait in the subscription's pool, and its memory cap
    # (TopicLimits.event_memory) bounds them instead of an unbounded queue.
    events: queue.Queue[bytes | None] = queue.Queue(maxsize=1)
    with connect(port) as conn:
        conn.subscribe(topic, events.put, iris.TopicLimits(event_threads=1))

        def end_when_dropped() -> None:
            conn.wait_closed()
            events.put(None)

        threading.Thread(target=end_when_dropped, name="iris-subscribe", daemon=True).start()
        note(f"subscribed to topic {topic!r}")
        received = 0
        try:
            while count is None or received < count:
                event = events.get()
                if event is None:
                    raise ToolError(Exit.FAILURE, f"connection ended: {conn.close_reason}")
                write_out(event + b"\n")
                received += 1
        except KeyboardInterrupt:
            pass  # Ctrl-C (or SIGTERM) is how an open-ended subscription ends
    return Exit.OK


class ReplyHandler(iris.ServiceHandler):
    """Answers every request with ``answer``, or echoes it (and tunnel messages)."""

    def __init__(self, cluster: str, answer: bytes | None):
        self.cluster = cluster
        self.answer = answer

    def init(self, conn: iris.Connection) -> None:
        mode = "echoing" if self.answer is None else "answering"
        note(f"{mode} requests to cluster {self.cluster!r} (Ctrl-C to stop)")

    def handle_request(self, request: bytes) -> bytes:
        return request if self.answer is None else self.answer

    def handle_tunnel(self, tunnel: iris.TunnelEnd) -> None:
        with tunnel:
            if self.answer is not None:
                return  # only --echo serves tunnels
            while True:
                try:
                    tunnel.send(tunnel.recv())
                except iris.ClosedError:
                    return


def reply(port: int, cluster: str, answer: bytes | None) -> Exit:
    """Serve ``cluster`` until SIGINT/SIGTERM: echo (``answer`` None) or a fixed reply."""
    try:
        iris.serve(port, cluster, ReplyHandler(cluster, answer))
    except OSError as err:
        raise relay_unreachable(port, err) from err
    return Exit.OK
