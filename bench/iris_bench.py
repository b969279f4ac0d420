"""Benchmark the iris binding and the embedded relay, after the Go binding's set.

Run as ``python bench/iris_bench.py`` (about a minute; ``--quick`` for a smoke
test of a few seconds, ``--only NAME`` for one benchmark, ``--json FILE`` to
keep the figures, ``--profile DIR`` to profile the request path instead,
``--compare DIR`` to run each benchmark in turn here and in the checkout DIR
and report every figure against DIR's).

Mirrors iris-go's BenchmarkRequestLatency, BenchmarkRequestThroughputNThreads,
BenchmarkBroadcastLatency/Throughput, BenchmarkPublishLatency/Throughput and
BenchmarkTunnelLatency/Throughput, with one deliberate difference: iris-go's
benchmarks run the load generator and the member in one test process (one
connection is both), against an Iris node. Here every benchmark gets three
processes - a fresh relay (``python -m iris.relay --port 0``), a fresh
service process (this script with ``--serve``) and the load generator (this
process) - so that each side's CPU time is its own and one GIL does not
serialise both ends, as in a deployment.

How each figure is taken, and why that way:

- request latency: sequential 1-byte round trips to an echo member; the
  distribution's mean, p50 and p99.
- request throughput: N threads share one client connection, each looping
  on a round trip, for a fixed time after a warm-up; completed round trips
  per second. At 64 requesters the CPU time of the relay, the service and
  the client per round trip is read from the kernel (psutil), because the
  relay's budget per round trip is a product target and on 2 cores the sum
  of the three bounds the throughput.
- broadcast and publish latency: the payload carries the sender's
  CLOCK_MONOTONIC time (system-wide on Linux, so comparable between
  processes on one machine); the member's handler subtracts it on entry,
  which is the one-way "send -> handler runs" time, and answers with an
  event, whose arrival gives the round trip. Messages go one at a time.
- broadcast and publish throughput: 1-byte messages from one sender thread,
  with at most WINDOW of them unacknowledged (the member reports progress
  every ACK_EVERY messages), so the relay's queue stays bounded and the
  figure is a sustained rate; delivered messages divided by the time from
  the first send to the member handling the last one.
- tunnel latency: ping-pong of 1-byte messages over one tunnel to an echo.
- tunnel throughput: 64 KiB or 1 MiB messages in one direction for a fixed
  time, then an end marker; the receiver counts the bytes and reports when
  it has them all. Bytes divided by the time from the first send to then.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import _util

import iris

BENCH_CLUSTER = "bench"  # the member: echo, probes, tunnels
CTL_CLUSTER = "bench-ctl"  # the service process's own control questions
EVENT_TOPIC = "bench-events"  # the member subscribes; publish benchmarks send here
ACK_TOPIC = "bench-acks"  # the member answers probes here; the client subscribes

# A relay answers timed-out requests itself; this only stops a stalled run.
REPLY_TIMEOUT = 10.0
# Throughput streams: the member reports every ACK_EVERY messages and the
# sender stays at most WINDOW ahead, so a slow consumer shows up as a lower
# rate instead of a growing queue in the relay.
ACK_EVERY = 512
WINDOW = 32 * ACK_EVERY
# The longest wait for the last messages of a stream to be handled.
DRAIN_TIMEOUT = 30.0
REQUEST_THREADS = (1, 2, 4, 8, 16, 32, 64, 128)
# The requester count at which the product targets are set.
TARGET_THREADS = 64
TUNNEL_SIZES = (64 * 1024, 1024 * 1024)
# A tunnel stream's end marker: "end" and the byte count sent; it is shorter
# than any data message, which is how the receiver tells them apart.
END_MARKER = b"end"
END_LEN = len(END_MARKER) + 8

BENCHMARKS = (
    "request-latency",
    "request-throughput",
    "broadcast-latency",
    "broadcast-throughput",
    "publish-latency",
    "publish-throughput",
    "tunnel-latency",
    "tunnel-throughput",
)


@dataclass(frozen=True)
class Settings:
    """How long each measurement runs; --quick shrinks every one of them."""

    latency_seconds: float
    throughput_seconds: float
    warmup_seconds: float
    warmup_count: int


FULL = Settings(latency_seconds=2.5, throughput_seconds=2.0, warmup_seconds=0.3, warmup_count=200)
QUICK = Settings(latency_seconds=0.3, throughput_seconds=0.3, warmup_seconds=0.05, warmup_count=20)


# The product's targets, and its peers as measured on the 2-core reference
# machine (Go relay + Go binding; NATS + nats-py).
LATENCY_TARGET = _util.Target(goal=200, higher_is_better=False)
LATENCY_PEERS = "Go 231, NATS 384"
THROUGHPUT_TARGET = _util.Target(floor=20_000, goal=30_000)
THROUGHPUT_PEERS = "Go 20.4k, NATS 26.4k"
RELAY_CPU_TARGET = _util.Target(floor=25, higher_is_better=False)


@dataclass
class Report(_util.Report):
    """The shared report, with the CPU split of the request-throughput window."""

    # At TARGET_THREADS requesters: per process, us of CPU per round trip.
    cpu_per_round_trip: dict[str, dict] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# The service process: started by the benchmark as ``--serve PORT``.


class Probe:
    """Receiver of broadcasts or events: answers latency probes, counts streams.

    Runs on the binding's handler threads (several at once), hence the lock.
    """

    def __init__(self) -> None:
        self.conn: iris.Connection | None = None
        self._lock = threading.Lock()
        self._count = 0
        # Tags progress reports, so that late ones of a past stream are told apart.
        self._stream = b"\x00"

    def __call__(self, message: bytes) -> None:
        now = time.monotonic_ns()
        kind = message[:1]
        if kind == b"T":
            with self._lock:
                self._count += 1
                count, stream = self._count, self._stream
            if count % ACK_EVERY == 0:
                self._ack(b"T" + stream + count.to_bytes(8, "little") + now.to_bytes(8, "little"))
        elif kind == b"L":
            delay = now - int.from_bytes(message[1:9], "little")
            self._ack(b"L" + delay.to_bytes(8, "little", signed=True))
        elif kind == b"R":  # a new stream; the sender waits for this answer first
            with self._lock:
                self._count, self._stream = 0, message[1:2]
            self._ack(message)

    def _ack(self, payload: bytes) -> None:
        self.conn.publish(ACK_TOPIC, payload)


class Member(iris.ServiceHandler):
    """The benchmarked member of BENCH_CLUSTER."""

    def __init__(self) -> None:
        self.broadcasts = Probe()
        self.events = Probe()

    def init(self, conn: iris.Connection) -> None:
        self.broadcasts.conn = self.events.conn = conn

    def handle_request(self, request: bytes) -> bytes:
        return request

    def handle_broadcast(self, message: bytes) -> None:
        self.broadcasts(message)

    def handle_tunnel(self, tunnel: iris.Tunnel) -> None:
        """The first message picks the mode: b"echo", or b"sink" to count bytes."""
        try:
            mode = tunnel.recv()
            if mode == b"echo":
                while True:
                    tunnel.send(tunnel.recv())
            elif mode == b"sink":
                counted = 0
                while True:
                    message = tunnel.recv()
                    if len(message) == END_LEN and message.startswith(END_MARKER):
                        break
                    counted += len(message)
                done = time.monotonic_ns()
                tunnel.send(b"done" + done.to_bytes(8, "little") + counted.to_bytes(8, "little"))
        except iris.ClosedError:
            pass  # the benchmark closed the tunnel: the normal end
        finally:
            tunnel.close()


class Control(iris.ServiceHandler):
    """Answers the benchmark's questions about this process (CTL_CLUSTER)."""

    def handle_request(self, request: bytes) -> bytes:
        if request == b"cpu":
            return json.dumps(_util.thread_cpu_by_role()).encode()
        raise ValueError(f"unknown control request {request!r}")


def serve(port: int, profile_to: str | None) -> int:
    """Run the member until SIGTERM; print "ready" once it can be measured."""
    profiler = _util.AllThreadsProfile() if profile_to else None
    if profiler:
        profiler.enable()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    member = Member()
    with (
        iris.register(port, BENCH_CLUSTER, member) as service,
        iris.register(port, CTL_CLUSTER, Control()),
    ):
        service.conn.subscribe(EVENT_TOPIC, member.events)
        # The relay handles one connection's packets in order: once this round
        # trip is back, the subscription is in place.
        service.conn.request(BENCH_CLUSTER, b"sync", REPLY_TIMEOUT)
        print("ready", flush=True)
        while not stop.wait(1.0):
            pass
    if profiler:
        profiler.stats().dump_stats(profile_to)
    return 0


# ---------------------------------------------------------------------------
# The load generator's side.


class Acks:
    """The client's subscription to ACK_TOPIC: what the member reports back."""

    def __init__(self) -> None:
        self.answers: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.progress = threading.Condition()
        self.stream = 0  # the stream whose progress counts; 0: none yet
        self.count = 0  # messages of that stream the member has handled
        self.last_ns = 0  # when it handled the last of them

    def __call__(self, event: bytes) -> None:
        if event[:1] == b"T":
            count = int.from_bytes(event[2:10], "little")
            with self.progress:
                # Handler threads publish concurrently: reports can arrive out
                # of order, or late from the previous stream.
                if event[1] == self.stream and count > self.count:
                    self.count, self.last_ns = count, int.from_bytes(event[10:18], "little")
                    self.progress.notify_all()
        else:
            self.answers.put(event)

    def answer(self) -> bytes:
        try:
            return self.answers.get(timeout=REPLY_TIMEOUT)
        except queue.Empty:
            raise RuntimeError(f"no answer from the member in {REPLY_TIMEOUT:g} s") from None


class Rig:
    """One benchmark's world: a fresh relay, a fresh service, a client connection.

    Fresh per benchmark so that no state, queue or CPU time leaks from one
    measurement into the next. Everything is torn down by :meth:`close`,
    which runs even when setup fails half way.
    """

    def __init__(self, profile_dir: str | None = None):
        self.relay = self.service = self.conn = None
        try:
            relay_profile = f"{profile_dir}/relay.prof" if profile_dir else None
            self.relay, self.port = _util.start_relay(relay_profile)
            argv = [sys.executable, __file__, "--serve", str(self.port)]
            if profile_dir:
                argv += ["--serve-profile", f"{profile_dir}/service.prof"]
            self.service = _util.Child(argv, "service")
            line = self.service.readline()
            if line != "ready":
                raise RuntimeError(f"service printed an unexpected line: {line!r}")
            self.conn = iris.connect(self.port)
            self.acks = Acks()
            self.conn.subscribe(ACK_TOPIC, self.acks)
            self.conn.request(BENCH_CLUSTER, b"sync", REPLY_TIMEOUT)  # subscription in place
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        dead = [c for c in (self.relay, self.service) if c is not None and not c.alive()]
        if exc is not None and dead:  # the failure is the symptom; say what caused it
            cause = "; ".join(
                f"the {c.name} exited with {c.proc.returncode}{c.stderr_tail()}" for c in dead
            )
            self.close()
            raise RuntimeError(cause) from exc
        self.close()

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.conn.close()
        finally:
            for child in (self.service, self.relay):
                if child is not None:
                    child.stop()

    def service_threads(self) -> dict[str, float]:
        return json.loads(self.conn.request(CTL_CLUSTER, b"cpu", REPLY_TIMEOUT))


def timed_loop(
    operation: Callable[[], float | None], settings: Settings
) -> tuple[list[float], list[float]]:
    """Run ``operation`` one call at a time: warm-up, then for a fixed time.

    Returns each call's duration in us, and whatever numbers it returned
    (the member's one-way delay, for probes).
    """
    for _ in range(settings.warmup_count):
        operation()
    durations, extras = [], []
    clock = time.perf_counter_ns
    deadline = clock() + int(settings.latency_seconds * 1e9)
    while True:
        start = clock()
        extra = operation()
        end = clock()
        durations.append((end - start) / 1000)
        if extra is not None:
            extras.append(extra)
        if end >= deadline:
            return durations, extras


def bench_request_latency(report: Report, settings: Settings) -> None:
    with Rig() as rig:
        request = rig.conn.request

        def round_trip() -> None:
            request(BENCH_CLUSTER, b"x", REPLY_TIMEOUT)

        durations, _ = timed_loop(round_trip, settings)
    report.add_latencies("request latency", durations, LATENCY_TARGET, peers=LATENCY_PEERS)


def bench_request_throughput(report: Report, settings: Settings) -> None:
    with Rig() as rig:
        for threads in REQUEST_THREADS:
            window = request_window(rig, threads, settings)
            rate = window.round_trips / window.seconds
            at_target = threads == TARGET_THREADS
            report.add(
                f"request throughput, {threads} requester{'s' if threads > 1 else ''}",
                rate,
                "round trips/s",
                THROUGHPUT_TARGET if at_target else None,
                peers=THROUGHPUT_PEERS if at_target else "",
            )
            if at_target:
                report.cpu_per_round_trip = window.per_round_trip()
                for side, cpu in report.cpu_per_round_trip.items():
                    report.add(
                        f"{side} CPU per round trip, {threads} requesters",
                        cpu["total"],
                        "us",
                        RELAY_CPU_TARGET if side == "relay" else None,
                    )
                report.add(
                    f"rest of the machine, {threads} requesters window",
                    window.other_cores(),
                    "cores",
                )


@dataclass
class Window:
    """What one timed window of request load did, and cost each process."""

    round_trips: int
    seconds: float
    cpu: dict[str, tuple[float, float]]  # process -> (user, system) seconds
    threads: dict[str, dict[str, float]]  # process -> thread role -> seconds
    machine_busy: float  # CPU seconds of the whole machine, every process and interrupt

    def other_cores(self) -> float:
        """Cores kept busy by anything but the three benchmark processes.

        Other work on a 2-core machine takes CPU from the benchmark; this
        says how much, so a low figure can be told from a busy machine.
        """
        ours = sum(user + system for user, system in self.cpu.values())
        return (self.machine_busy - ours) / self.seconds

    def per_round_trip(self) -> dict[str, dict]:
        """us of CPU per round trip: user, system, total and by thread role."""
        scale = 1e6 / self.round_trips
        return {
            side: {
                "user": user * scale,
                "system": system * scale,
                "total": (user + system) * scale,
                "threads": {role: t * scale for role, t in self.threads.get(side, {}).items()},
            }
            for side, (user, system) in self.cpu.items()
        }


def request_window(rig: Rig, threads: int, settings: Settings) -> Window:
    """Round trips and CPU seconds of ``threads`` requesters over one window.

    The requesters run through warm-up and the window without pause; the
    window is cut out of the middle by snapshots of the counters, so thread
    start-up and shutdown fall outside it.
    """
    stop = threading.Event()
    counts = [0] * threads
    errors: list[BaseException] = []
    request = rig.conn.request

    def requester(index: int) -> None:
        try:
            while not stop.is_set():
                request(BENCH_CLUSTER, b"x", REPLY_TIMEOUT)
                counts[index] += 1
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            stop.set()

    workers = [
        threading.Thread(target=requester, args=(i,), name=f"bench-requester-{i}", daemon=True)
        for i in range(threads)
    ]
    for worker in workers:
        worker.start()
    try:
        time.sleep(settings.warmup_seconds)
        before = _snapshot(rig, counts)
        stop.wait(settings.throughput_seconds)
        after = _snapshot(rig, counts)
    finally:
        stop.set()
        for worker in workers:
            worker.join(REPLY_TIMEOUT + 5)
    if errors:
        raise RuntimeError(f"a requester failed: {errors[0]!r}") from errors[0]
    return Window(
        round_trips=after.round_trips - before.round_trips,
        seconds=after.seconds - before.seconds,
        cpu={
            side: (user - before.cpu[side][0], system - before.cpu[side][1])
            for side, (user, system) in after.cpu.items()
        },
        threads={
            side: {role: t - before.threads[side].get(role, 0.0) for role, t in roles.items()}
            for side, roles in after.threads.items()
        },
        machine_busy=after.machine_busy - before.machine_busy,
    )


def _snapshot(rig: Rig, counts: list[int]) -> Window:
    """The counters since the start; two of them make a window."""
    return Window(
        round_trips=sum(counts),
        seconds=time.perf_counter(),
        cpu={"relay": rig.relay.cpu(), "service": rig.service.cpu(), "client": _util.own_cpu()},
        threads={"service": rig.service_threads(), "client": _util.thread_cpu_by_role()},
        machine_busy=_util.machine_busy_cpu(),
    )


def _probe_latency(report: Report, settings: Settings, name: str) -> None:
    """Broadcast or publish latency: see the module docstring."""
    with Rig() as rig:
        send = _sender(rig, name)

        def probe() -> float:
            send(b"L" + time.monotonic_ns().to_bytes(8, "little"))
            answer = rig.acks.answer()
            return int.from_bytes(answer[1:9], "little", signed=True) / 1000

        round_trips, one_way = timed_loop(probe, settings)
    report.add_latencies(f"{name} latency, one way", one_way)
    report.add(
        f"{name} latency, round trip (member answers by event), mean",
        sum(round_trips) / len(round_trips),
        "us",
    )


def _stream_throughput(report: Report, settings: Settings, name: str) -> None:
    """Broadcast or publish throughput: see the module docstring."""
    with Rig() as rig:
        send = _sender(rig, name)
        _stream(rig, send, settings.warmup_seconds)  # starts the member's handler threads
        delivered, seconds = _stream(rig, send, settings.throughput_seconds)
    report.add(f"{name} throughput", delivered / seconds, "msgs/s delivered")


def _sender(rig: Rig, kind: str) -> Callable[[bytes], None]:
    """Broadcasts go to the member's cluster, publishes to the topic it subscribed."""
    if kind == "broadcast":
        return lambda message: rig.conn.broadcast(BENCH_CLUSTER, message)
    return lambda message: rig.conn.publish(EVENT_TOPIC, message)


def _stream(rig: Rig, send: Callable[[bytes], None], seconds: float) -> tuple[int, float]:
    """Stream 1-byte messages for ``seconds``; (delivered, seconds until the last)."""
    acks = rig.acks
    with acks.progress:
        acks.stream, acks.count = acks.stream % 255 + 1, 0
        reset = b"R" + bytes((acks.stream,))
    send(reset)
    if acks.answer() != reset:
        raise RuntimeError("the member did not acknowledge the new stream")
    sent, start = 0, time.monotonic_ns()
    deadline = start + int(seconds * 1e9)
    while time.monotonic_ns() < deadline:
        with acks.progress:
            if not acks.progress.wait_for(
                lambda s=sent: s - acks.count <= WINDOW - ACK_EVERY, REPLY_TIMEOUT
            ):
                raise RuntimeError(f"member stalled at {acks.count} of {sent} messages")
        for _ in range(ACK_EVERY):
            send(b"T")
        sent += ACK_EVERY
    with acks.progress:
        if not acks.progress.wait_for(lambda: acks.count >= sent, DRAIN_TIMEOUT):
            raise RuntimeError(f"only {acks.count} of {sent} messages delivered (best effort)")
        return acks.count, (acks.last_ns - start) / 1e9


def bench_tunnel_latency(report: Report, settings: Settings) -> None:
    with Rig() as rig, rig.conn.tunnel(BENCH_CLUSTER, REPLY_TIMEOUT) as tunnel:
        tunnel.send(b"echo")

        def ping_pong() -> None:
            tunnel.send(b"x", REPLY_TIMEOUT)
            tunnel.recv(REPLY_TIMEOUT)

        durations, _ = timed_loop(ping_pong, settings)
    report.add_latencies("tunnel latency (ping-pong)", durations)


def bench_tunnel_throughput(report: Report, settings: Settings) -> None:
    with Rig() as rig:
        for size in TUNNEL_SIZES:
            with rig.conn.tunnel(BENCH_CLUSTER, REPLY_TIMEOUT) as tunnel:
                counted, seconds = _tunnel_stream(tunnel, size, settings.throughput_seconds)
            label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
            report.add(f"tunnel throughput, {label} messages", counted / seconds / 1e6, "MB/s")


def _tunnel_stream(tunnel: iris.Tunnel, size: int, seconds: float) -> tuple[int, float]:
    """Send ``size``-byte messages for ``seconds``; (bytes counted, seconds until counted)."""
    tunnel.send(b"sink")
    message = bytes(size)
    sent, start = 0, time.monotonic_ns()
    deadline = start + int(seconds * 1e9)
    while time.monotonic_ns() < deadline:
        tunnel.send(message, REPLY_TIMEOUT)
        sent += size
    tunnel.send(END_MARKER + sent.to_bytes(8, "little"), REPLY_TIMEOUT)
    answer = tunnel.recv(DRAIN_TIMEOUT)
    done, counted = int.from_bytes(answer[4:12], "little"), int.from_bytes(answer[12:20], "little")
    if counted != sent:
        raise RuntimeError(f"receiver counted {counted} of {sent} bytes")
    return counted, (done - start) / 1e9


RUNNERS: dict[str, Callable[[Report, Settings], None]] = {
    "request-latency": bench_request_latency,
    "request-throughput": bench_request_throughput,
    "broadcast-latency": lambda r, s: _probe_latency(r, s, "broadcast"),
    "broadcast-throughput": lambda r, s: _stream_throughput(r, s, "broadcast"),
    "publish-latency": lambda r, s: _probe_latency(r, s, "publish"),
    "publish-throughput": lambda r, s: _stream_throughput(r, s, "publish"),
    "tunnel-latency": bench_tunnel_latency,
    "tunnel-throughput": bench_tunnel_throughput,
}


# ---------------------------------------------------------------------------
# Profiling the request path.


def profile_request_path(directory: str, settings: Settings) -> None:
    """Where the request path spends CPU at 64 requesters; prints the hot spots.

    First an unprofiled window, for the CPU split by process and thread
    (user time is the Python side, system time the socket calls). Then a
    window with all three processes under a CPU-time cProfile: the relay is
    one thread; the service and this process use AllThreadsProfile, since
    their work is on reader and handler threads. Profiling slows everything
    (every timer read is a system call), so the profiled rate is not a
    benchmark figure and the profiles are for proportions.
    """
    with Rig() as rig:
        window = request_window(rig, TARGET_THREADS, settings)
    print(
        f"unprofiled: {window.round_trips / window.seconds:,.0f} round trips/s "
        f"with {TARGET_THREADS} requesters, rest of the machine busy "
        f"{window.other_cores():.2f} cores; CPU per round trip, us:\n"
    )
    print(cpu_table(window.per_round_trip()))
    print()

    os.makedirs(directory, exist_ok=True)
    client_profile = _util.AllThreadsProfile()
    client_profile.enable()  # before the rig: its reader thread must be seen
    with Rig(directory) as rig:
        window = request_window(rig, TARGET_THREADS, settings)
        client_stats = client_profile.stats()
    client_stats.dump_stats(f"{directory}/client.prof")
    print(f"profiled: {window.round_trips:,} round trips in the window\n")
    for side in ("relay", "service", "client"):
        path = f"{directory}/{side}.prof"
        print(f"## {side}: top functions by own CPU time ({path})")
        pstats.Stats(path).sort_stats("tottime").print_stats(30)


# ---------------------------------------------------------------------------


def print_report(report: Report) -> None:
    sections = []
    if report.cpu_per_round_trip:
        sections.append(
            f"CPU per round trip at {TARGET_THREADS} requesters, us:\n\n"
            + cpu_table(report.cpu_per_round_trip)
        )
    report.print(*sections)


def cpu_table(cpu_per_round_trip: dict[str, dict]) -> str:
    """Per process: user, system and total us per round trip, and by thread."""
    rows = []
    for side, cpu in cpu_per_round_trip.items():
        roles = sorted(cpu["threads"].items(), key=lambda item: -item[1])
        by_thread = ", ".join(
            f"{role} {_util.format_value(us)}" for role, us in roles if us >= 0.05
        )
        rows.append(
            (
                side,
                *(_util.format_value(cpu[part]) for part in ("user", "system", "total")),
                by_thread or "(one thread)",
            )
        )
    return _util.markdown_table(("process", "user", "system", "total", "by thread"), rows)


def compare_checkouts(names: list[str], checkouts: list[str], rounds: int, quick: bool) -> Report:
    """Each benchmark run by this checkout and by each of ``checkouts``, in
    child processes taking turns (the order reversed every other round, so
    that neither side always runs first); each figure is the median of the
    rounds. Each other checkout's row shows its figure, and in the ratio
    column this checkout's figure divided by it.

    A child is this script with a checkout's directory first on the path, so
    every side is measured by the same code.
    """
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = [here, *(os.path.abspath(c) for c in checkouts)]
    figures: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    units: dict[str, str] = {}
    report = Report(_util.machine(), f"{'quick' if quick else 'full'}, median of {rounds}")
    for name in names:
        for side in _util.alternating(sides, rounds):
            print(f"running {name} from {side} ...", file=sys.stderr, flush=True)
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                argv = [sys.executable, __file__, "--only", name, "--json", out.name]
                argv += ["--quick"] if quick else []
                done = subprocess.run(argv, **_util.in_checkout(side))
                if done.returncode:
                    report.errors[f"{name} from {side}"] = f"exit {done.returncode}"
                    continue
                for row in json.load(out)["rows"]:
                    figures[side].setdefault(row["benchmark"], []).append(row["value"])
                    units[row["benchmark"]] = row["unit"]
    for benchmark, values in figures[here].items():
        ours = statistics.median(values)
        report.add(benchmark, ours, units[benchmark])
        for side in sides[1:]:
            if theirs := figures[side].get(benchmark):
                row = report.add(
                    f"{benchmark}, {side}", statistics.median(theirs), units[benchmark]
                )
                row.ratio = ours / row.value if row.value else float("nan")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="much shorter runs (smoke test)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help=f"run only NAME: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--profile", metavar="DIR", help="profile the request path at 64 requesters instead"
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="also run every benchmark from the checkout DIR, in turns (repeatable)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="with --compare: turns per benchmark (median)"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-profile", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve is not None:
        return serve(args.serve, args.serve_profile)
    settings = QUICK if args.quick else FULL
    if args.profile:
        profile_request_path(args.profile, settings)
        return 0

    if args.compare:
        names = _util.select(BENCHMARKS, args.only)
        report = compare_checkouts(names, args.compare, args.rounds, args.quick)
        report.print()
        if args.json:
            report.write_json(args.json, settings=asdict(settings))
        return 1 if report.errors else 0
    report = Report(_util.machine(), "quick" if args.quick else "full")
    for name in _util.select(BENCHMARKS, args.only):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            RUNNERS[name](report, settings)
        except Exception as err:  # one failed benchmark must not hide the others
            report.errors[name] = f"{type(err).__name__}: {err}"
    print_report(report)
    if args.json:
        report.write_json(args.json, settings=asdict(settings))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
