"""Log lines of the relay and the host: plain on a terminal, priority-tagged for journald.

The binding's ContextLog already renders "msg key=value ..." into each
message, so only the line around it is decided here.

Under systemd, stderr is a stream into journald, which stamps every entry
with its own time and reads a leading "<N>" as the entry's syslog priority
(sd-daemon(3)). So there the timestamp is dropped and each line gets its
level's "<N>" instead, which lets ``journalctl -p warning`` find our
warnings. systemd says where its stream is in JOURNAL_STREAM ("dev:inode");
stderr is only that stream if the numbers match, since a shell started from
a unit inherits the variable but may redirect stderr elsewhere.

Not everything goes through logging: a config error is printed before logging
is set up, a worker's start-up traceback after it is torn down, and argparse
and the interpreter write usage errors and uncaught tracebacks to stderr
themselves. ``tag_standard_streams`` (the first thing each command does)
wraps stdout and stderr under journald so that such lines get a priority too:
err for stderr, info for stdout.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import BinaryIO, TextIO

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"

# logging's levels as syslog priorities (sd-daemon.h's SD_CRIT .. SD_DEBUG), highest first.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7
# What a line that already names its priority starts with.
_HAS_PRIORITY = re.compile(r"<[0-7]>")


class _JournalFormatter(logging.Formatter):
    """Prefixes every line with the record's syslog priority.

    journald makes each line of a stream a separate entry, so a traceback's
    lines each need the prefix, or they would be filed as plain info.
    """

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)


def _priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


class _PriorityLines(io.TextIOBase):
    """A text stream that starts each line with ``<priority>`` unless it has one.

    Lines from the journal formatter keep their own priority; everything else
    gets the stream's. Writes pass straight through (no buffering here), so a
    line may arrive in pieces: only the piece that starts a line is tagged.
    There is no lock: one is not needed for whole-line writes (logging's, and
    print's text and newline land in order from one thread), and a lock held
    by another thread at fork() would hang a worker's first write.
    """

    def __init__(self, target: TextIO, priority: int):
        super().__init__()
        self.target = target
        self._prefix = f"<{priority}>"
        self._at_line_start = True

    def write(self, text: str) -> int:
        lines = text.split("\n")
        # Every piece but the last ended with a newline; the last one is
        # tagged only if it holds text, or the next write would get two tags.
        for index, line in enumerate(lines):
            starts_line = self._at_line_start or index > 0
            ends_line = index < len(lines) - 1
            if starts_line and (line or ends_line) and not _HAS_PRIORITY.match(line):
                lines[index] = self._prefix + line
        if text:
            self._at_line_start = text.endswith("\n")
        self.target.write("\n".join(lines))
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def fileno(self) -> int:
        return self.target.fileno()

    def isatty(self) -> bool:
        return self.target.isatty()

    def writable(self) -> bool:
        return True

    # typeshed declares TextIOBase's encoding and errors plain attributes; at
    # run time they are read-only properties, as here.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.target.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self.target.errors

    @property
    def buffer(self) -> BinaryIO:
        """The binary stream below, for code that writes bytes; untagged, but working."""
        return self.target.buffer


def tag_standard_streams(environ: Mapping[str, str] = os.environ) -> None:
    """Under journald, make every line on stdout and stderr carry a priority.

    stderr's untagged lines are errors (usage errors, config errors,
    tracebacks), so ``journalctl -p err`` shows why a unit failed; stdout's
    are info. Elsewhere, and when called again, nothing changes.
    """
    for name, level in (("stdout", logging.INFO), ("stderr", logging.ERROR)):
        stream = getattr(sys, name)
        if not isinstance(stream, _PriorityLines) and _is_journal(stream, environ):
            setattr(sys, name, _PriorityLines(stream, _priority(level)))


def configure_logging(
    level: str, stream: TextIO | None = None, environ: Mapping[str, str] = os.environ
) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr).

    Replaces any handlers set up before, so calling it again on a reload
    changes the level without doubling every line.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    if _is_journal(handler.stream, environ):
        handler.setFormatter(_JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation), or no number
        return False
