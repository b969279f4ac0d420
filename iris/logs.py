"""Contextual logging in the style of the Go binding's log15 loggers.

Every Connection, Service and Tunnel carries a ``log`` that tags its entries
with the entity's id (``client=1``, ``service=2``, ``tunnel=3``), so the lines
of one entity can be picked out of a busy log. Entries go to the standard
``logging`` logger ``iris``; configure it as any other (``logging.basicConfig``).

Formatting is deferred: an entry's text is only built if a handler emits it,
so DEBUG calls on the hot path cost one level check when DEBUG is off.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("iris")

# An entry's key=value context, in the order it was given.
Pairs = tuple[tuple[str, object], ...]


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "='):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def format_pairs(pairs: Pairs) -> str:
    """``key=value ...`` as entries show their context, values quoted where needed."""
    return " ".join(f"{key}={_quote(value)}" for key, value in pairs)


class _Entry:
    """A log message whose text is rendered only when a handler asks for it."""

    __slots__ = ("msg", "pairs")

    def __init__(self, msg: str, pairs: Pairs):
        self.msg = msg
        self.pairs = pairs

    def __str__(self) -> str:
        tail = format_pairs(self.pairs)
        return f"{self.msg} {tail}" if tail else self.msg


class HotRecord(logging.LogRecord):
    """A LogRecord for a line logged per request: made in a fifth of the time.

    ``Logger.info`` finds its caller's file and line and makes a LogRecord,
    which looks up the thread and process: about 8 us on the thread that
    logs, where the supervisor's relay reader and loop have a budget of a
    few. A HotRecord takes only its time; ``msg`` is rendered (``str``)
    when the line is written, which behind logfmt's writer is on its thread.
    Pass it to ``Logger.handle`` after ``Logger.isEnabledFor``.
    """

    # What it leaves unset, as class attributes (nothing to copy per record),
    # as logging does when told not to collect them (logging.logThreads and
    # the like): no arguments, caller, thread or process.
    args = None
    exc_info = None
    exc_text = None
    stack_info = None
    pathname = filename = module = funcName = ""
    lineno = 0
    relativeCreated = 0.0
    thread = threadName = processName = process = taskName = None

    def __init__(self, name: str, level: int, msg: object) -> None:
        self.name = name
        self.msg = msg
        self.levelno = level
        self.levelname = logging.getLevelName(level)
        self.created = created = time.time()
        self.msecs = (created - int(created)) * 1000


class LineBatch:
    """Several lines of one logger, level and moment, logged as one HotRecord
    (its ``msg``): the per-request access lines of a batch of replies cost
    the thread that answers them one record and one queue entry.

    ``iris.logfmt``'s writer writes each of :meth:`lines` as a line of its
    own, with its own prefix; any other handler gets them joined (``str``),
    as it would a message with a traceback. A subclass keeps its lines'
    fields and renders them in :meth:`lines`, on the writer's thread.
    """

    __slots__ = ()

    def lines(self) -> list[str]:
        raise NotImplementedError

    def __str__(self) -> str:
        return "\n".join(self.lines())


class ContextLog:
    """A logger bound to key=value context, like log15's ``Logger.New``."""

    def __init__(self, base: logging.Logger = logger, context: Pairs = ()):
        self.logger = base
        self.context = context

    def new(self, **context: object) -> ContextLog:
        """A child logger carrying this one's context plus ``context``."""
        return ContextLog(self.logger, self.context + tuple(context.items()))

    def log(
        self, level: int, msg: str, exc_info: BaseException | None = None, **kv: object
    ) -> None:
        """One entry at ``level``; the level methods below pass ``exc_info`` as
        None (a traceback is :meth:`exception`'s job), so no key of ``kv`` is
        taken for it."""
        if self.logger.isEnabledFor(level):
            entry = _Entry(msg, self.context + tuple(kv.items()))
            self.logger.log(level, entry, exc_info=exc_info, stacklevel=3)

    def debug(self, msg: str, **kv: object) -> None:
        self.log(logging.DEBUG, msg, None, **kv)

    def info(self, msg: str, **kv: object) -> None:
        self.log(logging.INFO, msg, None, **kv)

    def warning(self, msg: str, **kv: object) -> None:
        self.log(logging.WARNING, msg, None, **kv)

    def error(self, msg: str, **kv: object) -> None:
        self.log(logging.ERROR, msg, None, **kv)

    def exception(self, msg: str, err: BaseException, **kv: object) -> None:
        """An ERROR entry followed by ``err``'s traceback."""
        self.log(logging.ERROR, msg, exc_info=err, **kv)

    def critical(self, msg: str, **kv: object) -> None:
        self.log(logging.CRITICAL, msg, None, **kv)

    def is_debug(self) -> bool:
        """Guard for hot paths that would otherwise compute debug fields."""
        return self.logger.isEnabledFor(logging.DEBUG)


class RateLimitedWarning:
    """Logs a recurring condition at most once per interval, with a count.

    Dropped broadcasts under overload can arrive thousands of times a second;
    one line per drop would turn an overload into a logging outage.
    """

    def __init__(self, log: ContextLog, msg: str, interval: float = 5.0):
        self._log = log
        self._msg = msg
        self._interval = interval
        self._next = 0.0
        self._suppressed = 0

    def __call__(self, **kv: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        self._log.warning(self._msg, suppressed=self._suppressed, **kv)
        self._suppressed = 0
        self._next = now + self._interval


class HandlerErrorLog:
    """Logs the exceptions of a service's callbacks at ERROR, with tracebacks.

    A traceback is what lets an operator fix a handler, but a handler that
    fails on every request would write thousands a second and turn one bug
    into a logging outage. So the first ``burst`` exceptions of each
    ``interval`` are logged in full; the rest are only counted, and the count
    is logged when the next exception after the interval arrives. One
    instance serves all pools of a service (or an irishost worker), so its
    callbacks share one budget.

    ``log`` is the context the entries carry; iris.aio's pools also write
    their other warnings about callbacks (a handler holding the loop) there.
    """

    def __init__(self, log: ContextLog, burst: int = 10, interval: float = 60.0):
        self.log = log
        self._burst = burst
        self._interval = interval
        self._lock = threading.Lock()  # pool threads report concurrently
        self._window_end = 0.0
        self._logged = 0
        self._suppressed = 0

    def __call__(self, msg: str, err: BaseException, **kv: object) -> None:
        now = time.monotonic()
        with self._lock:
            suppressed = 0
            if now >= self._window_end:
                suppressed, self._suppressed = self._suppressed, 0
                self._window_end, self._logged = now + self._interval, 0
            full = self._logged < self._burst
            if full:
                self._logged += 1
            else:
                self._suppressed += 1
        if suppressed:
            self.log.error(
                "handler exceptions not logged: over the limit",
                count=suppressed,
                limit=f"{self._burst} per {self._interval:g} s",
            )
        if full:
            self.log.exception(msg, err, **kv)
