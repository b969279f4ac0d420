"""How the host ends: fixed exit codes, and the error that carries one."""

from __future__ import annotations

import enum
import os
import signal


class Exit(enum.IntEnum):
    """Fixed exit codes, for systemd units (RestartPreventExitStatus) and operators."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    HANDLER = 4
    RELAY = 5


class HostError(Exception):
    """A reason to stop the host with a given exit code."""

    def __init__(self, code: Exit, message: str, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


def describe_exit(status: int) -> str:
    """A worker's wait status in words, for logs and the faults of its requests."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # real-time signals between SIGRTMIN and SIGRTMAX have no name
        name = f"signal {-code}"
    hint = " (out of memory, or killed by an operator)" if -code == signal.SIGKILL else ""
    return f"killed by {name}{hint}"
