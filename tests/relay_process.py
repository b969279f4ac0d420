"""A real ``python -m iris.relay`` process for the tests: its port, its log, a clean stop.

The ``relay`` and ``relay_factory`` fixtures (conftest.py) hand these out;
tests that need a relay on a given port start one themselves.
"""

from __future__ import annotations

import re
import select
import signal
import subprocess
import sys
from pathlib import Path

# How long a relay may take to print its listening line, and to exit on SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

_LISTENING = re.compile(r"^iris-relay: listening on 127\.0\.0\.1:(\d+) and \[::1\]:(\d+)$")


class RelayProcess:
    """A relay subprocess: ``port``, ``proc``, its log, and a clean stop."""

    def __init__(self, args: list[str], log_path: Path):
        self.args = args
        self.log_path = log_path
        self.killed = False  # SIGKILLed on purpose: no clean exit is expected
        self._log_file = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iris.relay", "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log_file,  # a file, not a pipe: a chatty relay never blocks on it
            text=True,
        )
        self.port = self._read_port()

    def _read_port(self) -> int:
        ready, _, _ = select.select([self.proc.stdout], [], [], START_TIMEOUT)
        line = self.proc.stdout.readline().strip() if ready else ""
        match = _LISTENING.match(line)
        if match is None or match[1] != match[2]:
            self._sigkill()
            raise RuntimeError(f"relay did not start: stdout {line!r}, log:\n{self.log()}")
        return int(match[1])

    def log(self) -> str:
        """Everything the relay has written to stderr (its log) so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, wait, and return the exit code; SIGKILL if it hangs (code -9)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._sigkill()  # hung: its -9 fails the clean-exit check
        self._release()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash on purpose, exempt from the clean-exit check."""
        self.killed = True
        self._sigkill()

    def _sigkill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._release()

    def _release(self) -> None:
        self.proc.stdout.close()
        self._log_file.close()
