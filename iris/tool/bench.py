"""``iris bench request`` / ``iris bench publish``: load tests in the shape of ``nats bench``.

Each client is a thread with its own connection. A request client sends one
request at a time and times each round trip; publish clients send as fast as
they can while one subscriber, on its own connection, times each event from
the moment it was published (the publish time travels in the event's first
8 bytes), unless the payload is given (--data, --data-file): then events
are only counted. While the clients run, a progress line is redrawn on stderr when
stderr is a terminal; the report goes to stdout.
"""

from __future__ import annotations

import functools
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import iris

from . import status
from .exits import Exit, ToolError
from .latency import Latencies, latency_lines, rate_line
from .messaging import connect, note

# How long a benchmark runs when neither --seconds nor --count is given.
DEFAULT_SECONDS = 5.0
# How often the progress line is redrawn.
PROGRESS_INTERVAL = 0.5
# After the last publish, how long to wait for events still in flight: the
# wait ends when every event arrived or none arrived for this long.
DRAIN_QUIET = 1.0
DRAIN_POLL = 0.01
# The publish time at the start of each bench event: perf_counter_ns, 8 bytes.
STAMP = struct.Struct("<q")


@dataclass(frozen=True)
class Plan:
    """What to run: ``clients`` threads, ``size``-byte messages, for ``seconds`` or ``count``.

    ``payload`` is the message itself when given (then ``size`` is ignored):
    a real service needs requests it understands, which ``x`` * size is not.
    """

    clients: int
    size: int
    seconds: float | None
    count: int | None
    payload: bytes | None = None

    @property
    def message_size(self) -> int:
        return self.size if self.payload is None else len(self.payload)

    def message(self) -> bytes:
        return b"x" * self.size if self.payload is None else self.payload

    def share(self, client: int) -> int | None:
        """How many messages client number ``client`` sends in count mode."""
        if self.count is None:
            return None
        return self.count // self.clients + (client < self.count % self.clients)


class Client(threading.Thread):
    """Runs ``operation`` in a loop until its share is done or the deadline passed."""

    def __init__(self, operation: Callable[[], object], share: int | None, deadline: float | None):
        super().__init__(daemon=True)
        self.operation = operation
        self.share = share
        self.deadline = deadline
        self.latencies: list[int] = []  # nanoseconds per completed operation
        self.failed = 0
        self.error: BaseException | None = None  # what stopped the client early

    def run(self) -> None:
        clock, latencies = time.perf_counter_ns, self.latencies
        try:
            while (self.share is None or len(latencies) + self.failed < self.share) and (
                self.deadline is None or time.monotonic() < self.deadline
            ):
                start = clock()
                try:
                    self.operation()
                except (iris.RemoteError, iris.TimeoutError):
                    self.failed += 1
                    continue
                latencies.append(clock() - start)
        except BaseException as err:  # reported by the main thread, not lost with the thread
            self.error = err


def run_clients(plan: Plan, operations: Sequence[Callable[[], object]], what: str) -> list[Client]:
    deadline = None if plan.seconds is None else time.monotonic() + plan.seconds
    clients = [Client(op, plan.share(i), deadline) for i, op in enumerate(operations)]
    progress = Progress(what, clients) if sys.stderr.isatty() else None
    for client in clients:
        client.start()
    for client in clients:
        while client.is_alive():
            client.join(PROGRESS_INTERVAL)
            if progress:
                progress.draw()
    if progress:
        progress.clear()
    errors = [client.error for client in clients if client.error is not None]
    if errors:
        raise errors[0]
    return clients


class Progress:
    """The live line on stderr: messages so far, the rate so far, elapsed time."""

    def __init__(self, what: str, clients: list[Client]):
        self.what = what
        self.clients = clients
        self.started = time.monotonic()

    def draw(self) -> None:
        done = sum(len(client.latencies) for client in self.clients)
        elapsed = time.monotonic() - self.started
        line = f"{done:,} {self.what}  {done / elapsed:,.0f}/s  {elapsed:.1f} s"
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    @staticmethod
    def clear() -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def describe(plan: Plan, what: str) -> str:
    until = f"{plan.seconds:g} s" if plan.seconds is not None else f"{plan.count:,} {what}"
    return f"{plan.clients} client(s), {plan.message_size}-byte {what}, {until}"


def bench_requests(port: int, cluster: str, plan: Plan, timeout: float) -> Exit:
    """Round trips to ``cluster``, each with ``timeout`` seconds for its reply;
    something must serve it (``iris reply CLUSTER --echo``)."""
    message = plan.message()
    conns = [connect(port) for _ in range(plan.clients)]
    try:
        try:
            conns[0].request(cluster, message, timeout)  # fails fast if nobody serves
        except (iris.TimeoutError, iris.RemoteError) as err:
            note(f"the first request failed: {first_failure(port, cluster, err, timeout)}")
            raise
        note(f"bench request {cluster!r}: {describe(plan, 'requests')}")
        operations = [functools.partial(conn.request, cluster, message, timeout) for conn in conns]
        started = time.monotonic()
        clients = run_clients(plan, operations, "requests")
        elapsed = time.monotonic() - started
    finally:
        for conn in conns:
            conn.close()
    samples = [sample for client in clients for sample in client.latencies]
    failed = sum(client.failed for client in clients)
    print(rate_line("requests", len(samples), elapsed, plan.message_size, failed))
    print("\n".join(latency_lines("latency", Latencies(samples))))
    return Exit.OK if not failed else Exit.FAILURE


def first_failure(port: int, cluster: str, err: iris.Error, timeout: float) -> str:
    """Why the first request failed, as far as the relay's status tells."""
    if isinstance(err, iris.RemoteError):
        return f"the handler failed: {err.fault}"
    members = status.members(port, cluster)
    if members == 0:
        return status.no_member_line(cluster)
    if members is None:
        return f"no answer within {timeout:g} s; is anything serving {cluster!r}?"
    return f"{members} member(s) of {cluster!r} did not answer within {timeout:g} s (--timeout)"


def bench_publish(port: int, topic: str, plan: Plan) -> Exit:
    """Events to ``topic``, timed from publish to delivery at our own subscriber;
    a given payload goes out as it is, so its events are counted, not timed."""
    stamped = plan.payload is None
    if stamped and plan.size < STAMP.size:
        raise ToolError(Exit.USAGE, f"--size must be at least {STAMP.size} for publish")
    padding = b"x" * (plan.size - STAMP.size)
    delays: list[int] = []

    def on_event(event: bytes) -> None:
        delays.append(time.perf_counter_ns() - STAMP.unpack_from(event)[0] if stamped else 0)

    def publisher(conn: iris.Connection) -> Callable[[], None]:
        if not stamped:
            return functools.partial(conn.publish, topic, plan.message())
        return lambda: conn.publish(topic, STAMP.pack(time.perf_counter_ns()) + padding)

    subscriber = connect(port)
    conns: list[iris.Connection] = []
    try:
        subscriber.subscribe(topic, on_event, iris.TopicLimits(event_threads=1))
        conns = [connect(port) for _ in range(plan.clients)]
        note(f"bench publish {topic!r}: {describe(plan, 'events')}")
        operations = [publisher(conn) for conn in conns]
        started = time.monotonic()
        clients = run_clients(plan, operations, "events")
        elapsed = time.monotonic() - started
        published = sum(len(client.latencies) for client in clients)
        wait_for_delivery(delays, published)
    finally:
        for conn in [*conns, subscriber]:
            conn.close()
    print(rate_line("events published", published, elapsed, plan.message_size, 0))
    print(f"{len(delays):,} delivered to our subscriber, {published - len(delays):,} lost")
    if stamped:
        print("\n".join(latency_lines("delivery latency", Latencies(delays))))
    return Exit.OK


def read_payload(data: str | None, data_file: str | None) -> bytes | None:
    """The payload of --data (UTF-8) or --data-file, or None for a generated one."""
    if data_file is None:
        return None if data is None else data.encode()
    try:
        with open(data_file, "rb") as file:
            return file.read()
    except OSError as err:
        raise ToolError(
            Exit.USAGE, f"--data-file: cannot read {data_file}: {err.strerror}"
        ) from None


def wait_for_delivery(delays: list[int], published: int) -> None:
    """Until every event arrived, or none arrived for DRAIN_QUIET seconds."""
    seen, changed = len(delays), time.monotonic()
    while len(delays) < published and time.monotonic() - changed < DRAIN_QUIET:
        time.sleep(DRAIN_POLL)
        if len(delays) != seen:
            seen, changed = len(delays), time.monotonic()
