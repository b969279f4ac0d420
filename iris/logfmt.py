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

A write to stderr blocks when its reader stalls (a stuck journald, a tee
that stopped reading): with the writes on the threads that log, a service
would stop serving with them. So a long-running process starts a writer
thread (:func:`start_log_writer`): records go
through a bounded queue to it, and when the queue is full they are dropped
and counted (:func:`dropped_records`) rather than waited for. Formatting
happens on the writer too, once per record, so a line costs the thread that
logs it little more than a queue entry. Only a process that will not fork
afterwards may start the writer: ``fork`` copies the calling thread alone,
and a child would inherit a queue nobody reads (see :func:`_after_fork`).

A log file (irishost's ``[logging] file``) replaces stderr itself
(``dup2``): so every line of the process and of the children it forks
later, tracebacks and usage errors included, lands in it, and opening the
file again after logrotate has moved it away (:func:`reopen_log_file`,
irishost's SIGUSR1) needs no lock, which a stalled write could hold.
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import queue
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, TextIO

from .logs import LineBatch

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

# Records the writer may fall behind by before new ones are dropped. The
# access log is the busiest source, its lines in records of up to 16
# (iris.logs.LineBatch; irishost's request_log): at 50k requests/s this is
# seconds of lines, enough to ride out a slow disk or journald catching up;
# a stalled reader then holds at most this many records (about 20 MB of
# access lines) in memory.
QUEUE_RECORDS = 10_000
# The writer flushes at most this much at once: a pipe write of up to
# PIPE_BUF bytes is atomic, so lines of the processes sharing stderr (the
# supervisor, its workers, an embedded relay) never interleave mid-line.
FLUSH_BYTES = select.PIPE_BUF
# After writing all it had, the writer waits this long before taking the
# next record: records logged meanwhile are then written (and flushed) as
# one batch. Waking it for each record instead costs the threads that log
# a futex wake and a GIL hand-over per line, more than the line itself.
BATCH_SECONDS = 0.01
# How long the writer may take at exit to write out what is queued; past it
# (a stalled reader), the rest is lost rather than the exit hung.
EXIT_DRAIN_SECONDS = 2.0


class _JournalFormatter(logging.Formatter):
    """Prefixes every line with the record's syslog priority.

    journald makes each line of a stream a separate entry, so a traceback's
    lines each need the prefix, or they would be filed as plain info.
    """

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if _is_plain(record):  # JOURNAL_FORMAT, without logging's general machinery
            return self.format_batch(record, [record.getMessage()])[0]
        prefix = f"<{_priority(record.levelno)}>"
        return prefix + super().format(record).replace("\n", "\n" + prefix)

    def format_batch(self, record: logging.LogRecord, messages: list[str]) -> list[str]:
        """The lines of a plain record's messages (one, or a LineBatch's), the
        part before the message made once."""
        prefix = f"<{_priority(record.levelno)}>"
        head = f"{prefix}{record.levelname} {record.name}: "
        return [(head + message).replace("\n", "\n" + prefix) for message in messages]


def _is_plain(record: logging.LogRecord) -> bool:
    """A record with no traceback or stack to add: its line is its fields alone.
    Formatting it directly takes a third of logging.Formatter's time, which
    the access log pays per request."""
    return not (record.exc_info or record.exc_text or record.stack_info)


def _priority(levelno: int) -> int:
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


class _PlainFormatter(logging.Formatter):
    """PLAIN_FORMAT, with the time text made once per second rather than per record.

    ``time.strftime`` is most of a plain line's formatting cost; under the
    access log every request pays it.
    """

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)
        self._second = -1
        self._second_text = ""

    def format(self, record: logging.LogRecord) -> str:
        if _is_plain(record):  # PLAIN_FORMAT, without logging's general machinery
            return self.format_batch(record, [record.getMessage()])[0]
        return super().format(record)

    def format_batch(self, record: logging.LogRecord, messages: list[str]) -> list[str]:
        """The lines of a plain record's messages (one, or a LineBatch's), the
        part before the message made once."""
        head = f"{self.formatTime(record)} {record.levelname} {record.name}: "
        return [head + message for message in messages]

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # as default_msec_format


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


class _Output(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes formatted lines to stderr (or a given stream).

    Behind the writer thread, it flushes only when the queue is empty or
    FLUSH_BYTES have gathered, so a burst costs a few writes, not one per line.
    """

    def __init__(self, stream: TextIO | None, environ: Mapping[str, str]) -> None:
        super().__init__(sys.stderr if stream is None else stream)
        journal = _is_journal(self.stream, environ)
        self._formatter = _JournalFormatter() if journal else _PlainFormatter()
        self.setFormatter(self._formatter)
        # Records still queued for it, when behind a writer: no flush until 0.
        self.backlog: Callable[[], int] = lambda: 0
        self._pending: list[str] = []  # formatted lines not yet written
        self._unflushed = 0  # their length

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if isinstance(record.msg, LineBatch):  # a line per message
                lines = self._formatter.format_batch(record, record.msg.lines())
                text = self.terminator.join(lines) + self.terminator
                if len(text) <= FLUSH_BYTES:  # whole lines, in one write whatever comes
                    self._add(text)
                else:
                    for line in lines:
                        self._add(line + self.terminator)
            else:
                self._add(self.format(record) + self.terminator)
            if not self.backlog():
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _add(self, line: str) -> None:
        if self._unflushed + len(line) > FLUSH_BYTES:
            self.flush()
        self._pending.append(line)
        self._unflushed += len(line)

    def flush(self) -> None:
        """Write the gathered lines in one piece: stderr is line-buffered, so
        one write per line would be one system call per line."""
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self._unflushed = 0
                self.stream.write(text)
            super().flush()

    def forget_pending(self) -> None:
        self._pending.clear()
        self._unflushed = 0

    def close(self) -> None:
        """Write what is gathered first: the writer closes an output it replaces
        (a reload's reconfiguring) while it may still hold a batch."""
        self.flush()
        super().close()


class _Enqueue(logging.Handler):
    """The root logger's handler under a writer: the record goes on the queue as it is.

    Like logging.handlers.QueueHandler (not used: that module imports
    pickle, which irishost keeps out of its processes), but without its
    ``prepare``, which would format the record here, on the thread that
    logs; the writer formats it instead, once, when it writes it. So a
    record's arguments must not change after the call that logs them, as
    with any logging that may be deferred.
    """

    def __init__(self, records: _BoundedQueue) -> None:
        super().__init__()
        self.records = records

    def handle(self, record: logging.LogRecord) -> bool:
        """As Handler.handle, without its lock: the queue is thread-safe already."""
        passed = self.filter(record)
        if passed:
            self.emit(record)
        return bool(passed)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.put_nowait(record)


class _BoundedQueue:
    """A ``queue.SimpleQueue`` that refuses records past QUEUE_RECORDS, counting them.

    ``queue.Queue(maxsize)`` would do the same for about ten times the cost
    per record (a Python-level condition variable). The size check and the
    put are two steps, so threads logging at once may overshoot the bound
    by one record each, which a bound on memory can afford.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.dropped = 0
        self._items: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._drop_lock = threading.Lock()  # taken only to count a drop

    def put_nowait(self, item: _Item) -> None:
        if self._items.qsize() < self.maxsize:
            self._items.put(item)
            return
        with self._drop_lock:
            self.dropped += 1

    def put_control(self, item: _Item) -> None:
        """A retarget or the end for the writer: never dropped, and rare."""
        self._items.put(item)

    def get(self) -> _Item:
        return self._items.get()

    def qsize(self) -> int:
        return self._items.qsize()


class _Control:
    """A change the writer makes between records: ``action`` runs on its thread,
    so it never races a write (and never waits for one stuck on a full pipe)."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action


_Item = logging.LogRecord | _Control | None  # None: the writer's cue to stop


_writer: _Writer | None = None  # this process's writer thread, once started


class _Writer:
    """The writer thread: takes records off the queue and writes them with
    ``output`` (logging.handlers.QueueListener's job; see _Enqueue)."""

    def __init__(self, output: _Output) -> None:
        self.records = _BoundedQueue(QUEUE_RECORDS)
        self.output = output
        self.enqueue = _Enqueue(self.records)
        output.backlog = self.records.qsize
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while (item := self.records.get()) is not None:
            if isinstance(item, _Control):
                item.action()
                continue
            self.output.handle(item)
            if not self.records.qsize():
                time.sleep(BATCH_SECONDS)
        self.output.flush()  # the last batch: its lines waited for the end marker

    def retarget(self, output: _Output) -> None:
        """Write with ``output`` from the next record on; the old one is closed."""

        def swap() -> None:
            old, self.output = self.output, output
            output.backlog = self.records.qsize
            old.close()

        self.records.put_control(_Control(swap))

    def drain(self, timeout: float) -> None:
        """Write out what is queued, waiting at most ``timeout``; the thread then ends."""
        self.records.put_control(None)
        self._thread.join(timeout)


def configure_logging(
    level: str,
    stream: TextIO | None = None,
    environ: Mapping[str, str] = os.environ,
    *,
    file: Path | None = None,
) -> None:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr).

    ``file``: point this process's stderr at it first, appending (see the
    module's docstring); without it, stderr stays where it is, so a reload
    that passes only the level keeps the file.

    Replaces any handlers set up before, so calling it again on a reload
    changes the level without doubling every line. In a process that has
    started its writer (:func:`start_log_writer`), the writer stays, and
    takes the new destination from its next record on.
    """
    if file is not None:
        _point_stderr_at(file)
    output = _Output(stream, environ)
    handler: logging.Handler = output
    if _writer is not None:
        _writer.retarget(output)
        handler = _writer.enqueue
    _set_root_handler(handler)
    logging.getLogger().setLevel(level.upper())


def start_log_writer() -> None:
    """Write this process's log lines from a writer thread, behind a bounded queue.

    Call after :func:`configure_logging`, and only where the process will
    not fork any more: a child would get the queue without the thread that
    empties it (see the module's docstring). A second call does nothing.
    """
    global _writer
    if _writer is not None:
        return
    outputs = [h for h in logging.getLogger().handlers if isinstance(h, _Output)]
    _writer = _Writer(outputs[0] if outputs else _Output(None, os.environ))
    _writer.start()
    atexit.register(stop_log_writer)
    _set_root_handler(_writer.enqueue)


def _set_root_handler(handler: logging.Handler) -> None:
    """Make ``handler`` the root logger's only one; close the replaced ones but
    the writer's output, which its thread closes when it lets go of it."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        if old is not handler and (_writer is None or old is not _writer.output):
            old.close()
    root.addHandler(handler)


def stop_log_writer(timeout: float = EXIT_DRAIN_SECONDS) -> None:
    """Write out what is queued, waiting at most ``timeout``, and end the writer.

    Runs at exit (atexit); a process that ends in ``os._exit`` calls it first.
    Later records are written directly.
    """
    global _writer
    if _writer is None:
        return
    writer, _writer = _writer, None
    _set_root_handler(writer.output)
    writer.drain(timeout)


_log_file: Path | None = None  # where configure_logging pointed stderr, if anywhere


def _point_stderr_at(file: Path) -> None:
    """Make descriptor 2 an appending descriptor of ``file``, created if missing.

    A _PriorityLines wrapper (the journal's) is taken off: a file's lines
    need no priority.
    """
    global _log_file
    fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.dup2(fd, 2)  # atomic: a write in progress lands in the old file or the new one
    finally:
        os.close(fd)
    if isinstance(sys.stderr, _PriorityLines):
        sys.stderr = sys.stderr.target
    _log_file = file


def reopen_log_file() -> None:
    """Open the ``file`` given to configure_logging again (irishost's SIGUSR1).

    logrotate moves the file away and signals; what this process writes
    afterwards goes to a new file at the path. Without a file, nothing happens.
    """
    if _log_file is not None:
        _point_stderr_at(_log_file)


def dropped_records() -> int:
    """Records dropped so far because the writer's queue was full (0 without a writer)."""
    return 0 if _writer is None else _writer.records.dropped


def _after_fork() -> None:
    """In a child forked after the writer started: log directly, as the parent's
    writer thread did not come along (fork copies only the calling thread)."""
    global _writer
    if _writer is not None:
        writer, _writer = _writer, None
        root = logging.getLogger()
        root.removeHandler(writer.enqueue)
        root.addHandler(writer.output)
        writer.output.backlog = lambda: 0
        writer.output.forget_pending()  # the parent's lines, which the parent writes


os.register_at_fork(after_in_child=_after_fork)


def _is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation), or no number
        return False
