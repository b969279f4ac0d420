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
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

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


def configure_logging(
    level: str, stream: TextIO = sys.stderr, environ: Mapping[str, str] = os.environ
) -> None:
    """Send the root logger's records at ``level`` and above to ``stream``.

    Replaces any handlers set up before, so calling it again on a reload
    changes the level without doubling every line.
    """
    handler = logging.StreamHandler(stream)
    if _is_journal(stream, environ):
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
