"""A healthy client on a relay under attack, for the relay's hostile-input tests
(test_relay.py's malformed input, test_fuzz.py's hostile streams)."""

from __future__ import annotations

import threading
import time

from support import wait_for

import iris


class _Echo(iris.ServiceHandler):
    def handle_request(self, request: bytes) -> bytes:
        return request


class Bystander:
    """Serves an echo cluster and requests it non-stop on a thread,
    remembering anything that went wrong."""

    def __init__(self, port: int, attach):
        attach.register(port, "echo", _Echo())
        self.conn = attach.connect(port)
        self.served = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bystander", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            number += 1
            payload = b"healthy %d" % number
            try:
                reply = self.conn.request("echo", payload, 2)
            except Exception as err:
                self.errors.append(repr(err))
                return
            if reply != payload:
                self.errors.append(f"wrong reply {reply!r} to {payload!r}")
                return
            self.served += 1
            time.sleep(0.002)  # steady, but leaves the cores to the attack

    def still_served(self, more: int = 3) -> None:
        """Over ``more`` further requests succeed, and none ever failed."""
        before = self.served
        wait_for(lambda: self.served > before + more or self.errors, what="bystander served")
        assert self.errors == []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
