"""The ``iris`` command's exit codes, fixed so scripts can tell failures apart."""

from __future__ import annotations

import enum


class Exit(enum.IntEnum):
    OK = 0
    FAILURE = 1  # anything else: the connection dropped, a file could not be written, ...
    USAGE = 2  # bad arguments or an empty message (argparse uses 2 as well)
    REMOTE = 3  # the remote handler failed; its fault text is on stderr
    TIMEOUT = 4  # no answer in time (or no member of the cluster)
    NO_RELAY = 5  # nothing listens on the relay port (same code as irishost's)
    INTERRUPTED = 130  # Ctrl-C where it is not the normal way to stop (128 + SIGINT)


EPILOG = """\
exit codes:
  0 ok, 1 failure, 2 usage (also: a number out of range),
  3 remote error (the fault on stderr), 4 timeout (also: no member in the
  cluster), 5 no relay on the port, 130 interrupted"""


class ToolError(Exception):
    """A failure the command reports in one line on stderr, with its exit code."""

    def __init__(self, code: Exit, message: str):
        super().__init__(message)
        self.code = code


def relay_unreachable(port: int, err: OSError) -> ToolError:
    return ToolError(Exit.NO_RELAY, f"cannot reach a relay on port {port}: {err}")
