"""``iris tunnel CLUSTER``: netcat over an Iris tunnel.

stdin goes into the tunnel (each read of up to READ_SIZE bytes is one tunnel
message) and every message out of the tunnel goes to stdout as it arrives.

Iris tunnels have no half-close: a close from either end closes both
(docs/protocol.md, tunnels). So at the end of stdin the command keeps copying
the tunnel to stdout until the remote end closes it or nothing has arrived
for ``linger`` seconds, and only then closes the tunnel. When the remote end
closes first, the command stops reading stdin and exits.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

import iris

from .exits import Exit, ToolError
from .messaging import connect, write_out

# One read from stdin, one tunnel message: the original relay's chunk limit,
# so a message normally travels as a single chunk.
READ_SIZE = 64 * 1024
# After stdin ends, how long to wait for more from the tunnel before closing
# it: enough for a reply from a handler on this machine.
DEFAULT_LINGER = 1.0


class TunnelToStdout(threading.Thread):
    """Copies tunnel messages to stdout until the tunnel or stdout closes."""

    def __init__(self, tunnel: iris.Tunnel, wake_fd: int):
        super().__init__(name="iris-tunnel-out", daemon=True)
        self.tunnel = tunnel
        self.wake_fd = wake_fd  # written once when this thread ends, to wake the stdin loop
        self.last_message = time.monotonic()
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            while True:
                write_out(self.tunnel.recv())
                self.last_message = time.monotonic()
        except (iris.ClosedError, BrokenPipeError):
            pass  # the tunnel closed (remote end, or ours), or stdout's reader went away
        finally:
            self.finished.set()
            os.write(self.wake_fd, b"x")

    def wait_until_quiet(self, linger: float) -> None:
        """Return once this thread ended or no message arrived for ``linger`` s."""
        quiet_since = time.monotonic()
        while True:
            deadline = max(quiet_since, self.last_message) + linger
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.finished.wait(remaining):
                return


def stdin_to_tunnel(tunnel: iris.Tunnel, wake_fd: int) -> None:
    """Send stdin into the tunnel until EOF or until ``wake_fd`` says the tunnel ended.

    select, not a selector: epoll refuses regular files, and stdin may be one.
    """
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin, wake_fd], [], [])
        if wake_fd in readable:
            return
        data = os.read(stdin, READ_SIZE)
        if not data:
            return
        try:
            tunnel.send(data)
        except iris.ClosedError:
            return  # the remote end closed while we were sending


def run(port: int, cluster: str, timeout: float, linger: float) -> Exit:
    wake_read, wake_write = os.pipe()
    try:
        with connect(port) as conn:
            tunnel = conn.tunnel(cluster, timeout)
            copier = TunnelToStdout(tunnel, wake_write)
            copier.start()
            try:
                stdin_to_tunnel(tunnel, wake_read)
                copier.wait_until_quiet(linger)
            except KeyboardInterrupt:
                pass  # Ctrl-C (or SIGTERM) ends an interactive session
            finally:
                tunnel.close()
                copier.join()
            if conn.closed:  # the relay dropped us; our own close comes after this
                raise ToolError(Exit.FAILURE, f"connection ended: {conn.close_reason}")
    finally:
        os.close(wake_read)
        os.close(wake_write)
    return Exit.OK
