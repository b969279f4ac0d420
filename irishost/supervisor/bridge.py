"""Carrying one relay tunnel between the supervisor and a worker.

The tunnel itself (allowance, chunking) lives on the supervisor's relay
connection; the worker's handler holds a WorkerTunnel. Two threads per
tunnel keep the supervisor's loop from ever blocking on a tunnel: one
receives from the relay and forwards to the worker, at most WINDOW bytes
ahead of what the handler has consumed, so a slow handler pushes back on the
remote sender; the other performs the worker's sends and closes in order.
Tunnels are long-lived and few, which makes two threads each affordable.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from typing import cast

import iris

from ..wire import frames
from .handle import WorkerHandle, WorkerUnreachable

# Bytes forwarded to the worker and not yet consumed by its handler.
WINDOW = 4 * 1024 * 1024


class TunnelBridge:
    def __init__(
        self,
        tunnel: iris.Tunnel,
        worker: WorkerHandle,
        forget: Callable[[TunnelBridge], None],
    ):
        self.tunnel = tunnel
        self.worker = worker
        self._forget = forget
        self._cond = threading.Condition()
        self._unconsumed = 0
        self._stopped = False
        # The worker's sends and close; None stops the thread performing them.
        self._requests: queue.SimpleQueue[frames.TunSend | frames.TunClose | None] = (
            queue.SimpleQueue()
        )

    def start(self) -> None:
        """Hand the tunnel to the worker, or close it if the worker cannot take it.

        This runs on the relay connection's reader thread: an exception here
        would end that thread and with it the supervisor's registration.
        """
        if not self._tell_worker(frames.Tunnel(self.tunnel.id).encode()):
            return
        for target in (self._forward_inbound, self._perform_requests):
            threading.Thread(
                target=self._guarded, args=(target,), name="irishost-tunnel", daemon=True
            ).start()

    def on_frame(self, frame: frames.TunSend | frames.TunAck | frames.TunClose) -> None:
        """A TUN_* frame from the worker (supervisor loop thread)."""
        if isinstance(frame, frames.TunAck):
            with self._cond:
                self._unconsumed -= frame.size
                self._cond.notify_all()
        else:
            self._requests.put(frame)

    def stop(self, reason: str) -> None:
        """End the bridge from outside (worker died, connection closed)."""
        with self._cond:
            if self._stopped:
                return
            self._stopped = True
            self._cond.notify_all()
        self.tunnel.log.info("tunnel bridge stopped", reason=reason)
        self.tunnel.close_async()
        self._requests.put(None)
        self._forget(self)

    def _guarded(self, target: Callable[[], None]) -> None:
        """Run one of the bridge's threads; whatever it raises closes the tunnel.

        An unexpected error (a malformed frame from the worker, a bug) must
        not end the thread silently: both ends would wait on it forever. The
        worker's handler is told the tunnel closed, and why.
        """
        try:
            target()
        except Exception as err:
            self.tunnel.log.error(
                "tunnel bridge failed", error=repr(err), traceback=traceback.format_exc()
            )
            self._tell_worker(
                frames.TunClosed(self.tunnel.id, f"tunnel bridge failed: {err!r}").encode()
            )
            self.stop(f"failed: {err!r}")

    def _forward_inbound(self) -> None:
        tunnel = self.tunnel
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._unconsumed < WINDOW or self._stopped)
                if self._stopped:
                    return
            try:
                message = tunnel.recv()
            except iris.ClosedError as err:
                self._tell_worker(frames.TunClosed(tunnel.id, str(err)).encode())
                self.stop("remote end closed")
                return
            with self._cond:
                self._unconsumed += len(message)
            if not self._tell_worker(frames.TunData(tunnel.id, message).encode()):
                return

    def _perform_requests(self) -> None:
        tunnel = self.tunnel
        while True:
            request = self._requests.get()
            if request is None:
                return
            if isinstance(request, frames.TunClose):
                tunnel.close()
                self.stop("closed by the handler")
                return
            try:
                # The worker's timeout is any value it sent: send() checks it,
                # and a bad one raises the ValueError that closes this tunnel.
                tunnel.send(request.payload, cast("float | None", request.timeout))
                outcome = None
            except iris.TimeoutError:
                outcome = "timeout"
            except iris.ClosedError as err:
                outcome = str(err) or "tunnel closed"
            if not self._tell_worker(frames.TunSent(tunnel.id, outcome).encode()):
                return

    def _tell_worker(self, frame: bytes) -> bool:
        try:
            self.worker.put(frame)
            return True
        except WorkerUnreachable as err:
            self.stop(str(err))
            return False
