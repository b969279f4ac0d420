"""Reading a TOML file an operator wrote: an irishost config, the relay's permissions.

Both are read by programs that run unattended, at start and again on
SIGHUP, so nothing in the file may block the reader, end it with a
traceback, or make it read without bound; every problem becomes one line.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

# Such files are a few kilobytes; anything this large is some other file.
MAX_SIZE = 2**20


class TomlFileError(Exception):
    """The file cannot be used; ``str()`` is the problem, without the file's name."""


def read_toml(file: Path, what: str) -> tuple[dict[str, Any], str]:
    """The parsed table of ``file`` and its text (for finding lines);
    ``what`` names the kind of file in the too-large message."""
    try:
        raw = _read_regular_file(file, what)
    except OSError as error:
        raise TomlFileError(f"cannot read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise TomlFileError(f"invalid TOML: not UTF-8 (at line {line})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends with "(at line L, column C)".
        raise TomlFileError(f"invalid TOML: {error}") from None
    except (ValueError, RecursionError) as error:
        # What tomllib lets through undressed: an integer of over 4300 digits
        # (int()'s ValueError) and arrays or inline tables nested deeper than
        # the interpreter's recursion limit. Uncaught, either would be a
        # traceback at start and would end a running program on SIGHUP.
        problem = "nested too deeply" if isinstance(error, RecursionError) else str(error)
        raise TomlFileError(f"invalid TOML: {problem}") from None


def _read_regular_file(file: Path, what: str) -> bytes:
    """The bytes of ``file``, which must be a regular file of at most MAX_SIZE.

    A FIFO would block the read (and the start, or a reload) until some writer
    turned up, and a device such as /dev/zero would never end. O_NONBLOCK lets
    the open itself return at once for a FIFO; the type is then checked on the
    open descriptor, so the file cannot be swapped between check and read.
    """
    fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as reader:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TomlFileError("not a regular file (a FIFO, device or directory?)")
        raw = reader.read(MAX_SIZE + 1)
    if len(raw) > MAX_SIZE:
        raise TomlFileError(f"too large for {what} (over 1 MiB)")
    return raw
