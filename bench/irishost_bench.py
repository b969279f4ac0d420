"""Benchmark irishost against its product targets, all side by side in one run.

Run as ``python bench/irishost_bench.py`` (about two minutes; ``--quick`` for a
smoke test of a few seconds, ``--only NAME`` for one benchmark, ``--json
FILE`` to keep the figures, ``--strict`` to exit 1 when a target is missed,
``--profile DIR`` to profile irishost's request path instead, sequential
or with ``--profile-load`` under load, ``--compare DIR`` to run
echo-overhead against irishost from another checkout too).

Each comparison measures both sides in the same run on the same machine, so
a ratio holds for this machine at this moment; absolute figures on a shared
2-core box move with its load, which is printed first for that reason.

- cpu-bound: a handler spending a few ms of pure-Python CPU per request
  (counting primes by trial division), once under plain ``iris.register``
  in a service process (default limits) and once under irishost with 2
  workers of 1 request thread; each side has its relay in its own process.
  8 requester threads in this process share one client connection. Target:
  irishost >= 1.8x the plain service's requests/s, which is what forking
  workers is for (the plain service holds one GIL).
- ring: irishost's shared-memory Ring against multiprocessing.Queue (one
  way, 100-byte messages; target >= 3x) and multiprocessing.Pipe (round
  trip; target <= 0.5x), with the functions of ``bench/ring_bench.py``.
- dispatch: supervisor -> worker -> supervisor with no relay. This process
  plays the supervisor: it creates a ring pair, forks a real
  ``irishost.worker.process`` with an echo handler and speaks frames to it, one at
  a time (latency) and PIPELINE_DEPTH in flight (throughput); the same
  against ``ProcessPoolExecutor(max_workers=1)``, ``submit().result()`` and
  ``map(chunksize=1)``. Target: irishost throughput >= 5x the executor's.
- echo-overhead: sequential 1-byte requests to an echo handler, plain
  ``iris.register`` against irishost with 1 worker, relay in its own
  process. Target: irishost's mean latency at most 1.15x the plain one.
  Then LOAD_CONCURRENCY requests in flight on each, and on irishost with
  2 workers too: requests/s, the CPU per request of all the service's
  processes and of irishost's supervisor alone (issue 19's targets: at 1
  worker, CPU at most 1.5x and requests/s at least 0.8x the plain
  service's, the supervisor at most 8 us; at 2 workers, requests/s at
  least the plain service's). irishost with 1 worker also runs the
  ``iris.aio`` echo of configs/async_echo.py (its event-loop worker), in
  every window, with no target of its own. The loaded windows also count
  the client's and the relay's CPU per request and how many cores the
  whole machine kept busy: once the cores are all busy, requests/s is the
  cores over everything a request crosses, whatever the supervisor's
  speed. ``--compare DIR`` (repeatable) adds
  irishost run from the checkout DIR (its ``iris`` and ``irishost``) to the
  same alternation, here, in cpu-bound and in access-log: the way to tell
  whether a change helps or hurts, as run-to-run noise on this machine is
  larger than most changes.
- access-log: echo with LOAD_CONCURRENCY in flight against irishost with 1
  worker, ``[logging] access`` off and on (stderr to a file, as a journald
  stream drains it). Target: on keeps >= 0.85x the requests/s of off. With
  ``--compare DIR`` the checkout DIR runs both ways in the same alternation.
- handler-cost: LOAD_CONCURRENCY in flight against plain ``iris.register``
  and irishost with 1 and 2 workers, for configs/primes.py handlers of
  about 0, 15, 65 and 250 us of CPU a request: where, on this machine, a
  second worker starts to pay. No target.

- preload-memory: a handler module that builds about 200 MB of small
  containers at import, preloaded by irishost's fork server, 4 workers,
  each running a full ``gc.collect()`` in ``init`` (as its collector
  would once the worker has allocated enough): each worker's private
  memory (USS), read by ``irishost status``, with ``[workers] gc_freeze``
  off and on, and the proportional memory (PSS) of the whole host. Target:
  frozen, under 15 % of the preloaded size per worker. Then the cost of
  reading memory in the supervisor's way, per round over 16 workers,
  preloaded and small: RSS (/proc/PID/statm) and USS with PSS
  (/proc/PID/smaps_rollup).

The sides of cpu-bound, ring, echo-overhead and access-log run in alternating rounds
(ABBA order; for the services, on rigs that are all up), so a load spike
from elsewhere on the machine lands on every side rather than on one.

Each target is a floor (see ``_util.Target``). A figure below its floor
prints BELOW FLOOR and still exits 0, since the figures are information;
``--strict`` makes it exit 1. A benchmark that fails to run always exits 1,
as does anything this run leaves behind in /dev/shm.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import multiprocessing
import os
import pstats
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import _util
import psutil
import ring_bench

import iris
import iris.aio
from irishost import cli
from irishost.config import Config, load_config
from irishost.loader import load_handler
from irishost.ops.control import query_status
from irishost.supervisor.memory import PRIVATE_CPU_SHARE, Family, ProcessTree
from irishost.wire import frames
from irishost.wire.ring import Ring, segment_prefix
from irishost.worker import process as worker

BENCHMARKS = (
    "cpu-bound",
    "ring",
    "dispatch",
    "echo-overhead",
    "access-log",
    "handler-cost",
    "preload-memory",
)

# The handlers both sides serve: the example services of configs/, so the
# figures are those of the code the README runs. A module written into the
# run's temp dir makes them importable by one name, so that irishost imports
# them through ``[service] path`` like any deployment, and the plain service
# imports the very same module.
HANDLER_MODULE = "hostbench_handlers"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Set by --profile for the profiled irishost: the directory the profiles go to.
PROFILE_VARIABLE = "HOSTBENCH_PROFILE"
HANDLER_SOURCE = f'''\
"""Handlers of bench/irishost_bench.py: the examples of configs/."""

import os
import sys

PROFILE_VARIABLE = {PROFILE_VARIABLE!r}

sys.path.insert(0, {str(CONFIGS)!r})

from async_echo import AsyncEchoHandler  # noqa: E402,F401
from echo import EchoHandler  # noqa: E402,F401
from primes import PrimeHandler  # noqa: E402,F401

if os.environ.get(PROFILE_VARIABLE):  # --profile: workers forked from here profile themselves
    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
    from irishost_bench import profile_forked_workers

    profile_forked_workers(os.environ[PROFILE_VARIABLE])
'''
# About 4 ms of trial division on the project's 2-core Xeon: long enough that the
# relay, supervisor and client CPU per request stay a small share of the two
# cores, short enough for a few hundred requests per second.
PRIME_LIMIT = 8_000
PRIME_REQUEST = str(PRIME_LIMIT).encode()
CPU_REQUESTERS = 8
CPU_WORKERS = 2
ECHO_REQUEST = b"x"
# handler-cost's handlers: primes below each, from about 0 to 250 us of CPU.
HANDLER_COST_LIMITS = (2, 100, 400, 1000)
# configs/async_echo.py's handler: echo-overhead runs it in irishost too, so the
# event-loop worker's request path is measured beside the threaded one.
ASYNC_ECHO = "AsyncEchoHandler"
# Frames to the worker in the dispatch benchmark: 100 bytes, as in ring_bench.
DISPATCH_PAYLOAD = b"x" * 100
# Enough to keep the worker's main thread and handler thread both busy; the
# ring holds 4 MiB, so it never fills at this depth.
PIPELINE_DEPTH = 64
# Echo requests in flight at once in echo-overhead's loaded windows: the
# CPU per request there must not grow for the sake of sequential latency.
LOAD_CONCURRENCY = 64
# The workers of the second irishost in those windows (issue 19: with 2
# workers, at least the plain service's requests/s).
LOAD_WORKERS = 2
# Prefix of this benchmark's own rings (dispatch); irishost names its own
# after the cluster (segment_prefix), ring_bench uses "ringbench".
RING_PREFIX = "irishostbench"
CLUSTER = "hostbench"
SHM_PREFIXES = (f"{RING_PREFIX}-", segment_prefix(CLUSTER) + "-", "ringbench-")

# A relay answers timed-out requests itself; this only stops a stalled run.
REPLY_TIMEOUT = 10.0
# irishost registers with the relay only once its workers are ready; until
# then a request waits for its timeout, so probes use a short one.
PROBE_TIMEOUT = 0.25
START_TIMEOUT = 30.0
# A forked dispatch worker gets this long to exit after DRAIN before SIGKILL.
WORKER_STOP_TIMEOUT = 5.0


@dataclass(frozen=True)
class Settings:
    """How long each measurement runs; --quick shrinks every one of them."""

    rounds: int  # alternating rounds per side in cpu-bound, ring and echo-overhead
    cpu_seconds: float  # one cpu-bound window
    warmup_seconds: float  # requesters run this long before each window
    latency_seconds: float  # one echo-latency window
    warmup_count: int  # sequential requests before each latency window
    ring_messages: int
    ring_round_trips: int
    dispatch_seconds: float  # each irishost dispatch measurement
    executor_tasks: int  # ProcessPoolExecutor.map is given a fixed list
    compare: tuple[str, ...] = ()  # checkouts echo-overhead runs irishost from too


FULL = Settings(
    rounds=3,
    cpu_seconds=1.0,
    warmup_seconds=0.3,
    latency_seconds=1.0,
    warmup_count=200,
    ring_messages=100_000,
    ring_round_trips=10_000,
    dispatch_seconds=1.5,
    executor_tasks=15_000,
)
QUICK = Settings(
    rounds=1,
    cpu_seconds=0.3,
    warmup_seconds=0.05,
    latency_seconds=0.2,
    warmup_count=20,
    ring_messages=20_000,
    ring_round_trips=1_000,
    dispatch_seconds=0.2,
    executor_tasks=500,
)


# Floors: a missed one fails a --strict run.
CPU_TARGET = _util.Target(floor=1.8, on_ratio=True)
DISPATCH_TARGET = _util.Target(floor=5.0, on_ratio=True)
ECHO_TARGET = _util.Target(floor=1.15, higher_is_better=False, on_ratio=True)
# Issue 19, at LOAD_CONCURRENCY in flight: irishost with 1 worker at least
# 0.8x the plain service's requests/s for at most 1.5x its CPU per request,
# the supervisor at most 8 us of it; with LOAD_WORKERS, at least 1x.
LOAD_TARGET = _util.Target(floor=0.8, on_ratio=True)
LOAD_CPU_TARGET = _util.Target(floor=1.5, higher_is_better=False, on_ratio=True)
SUPERVISOR_TARGET = _util.Target(floor=8.0, higher_is_better=False)
WIDE_TARGET = _util.Target(floor=1.0, on_ratio=True)
# The access log may cost at most 15 % of the loaded echo throughput (issue 16).
ACCESS_LOG_TARGET = _util.Target(floor=0.85, on_ratio=True)


# ---------------------------------------------------------------------------
# The services under test.


def write_config(
    directory: Path, name: str, handler: str, port: int, workers: int, access: bool = False
) -> Path:
    """One service's TOML: irishost reads all of it, the plain service its
    [service] and [relay] tables.

    The relay is external (``embedded = false``), so it runs in its own
    process on both sides. Logging stays at warning: an info line per
    event would be measured too; only the access-log benchmark turns on
    ``access`` (its lines are INFO whatever the level).
    """
    path = directory / f"{name}.toml"
    path.write_text(
        f"""\
[service]
cluster = "{CLUSTER}"
handler = "{HANDLER_MODULE}:{handler}"
path = ["."]

[relay]
port = {port}
embedded = false

[workers]
count = {workers}
shutdown_timeout = "2s"

[limits]
request_threads = 1

[logging]
level = "warning"
access = {str(access).lower()}
"""
    )
    return path


def irishost_argv(config: Path) -> list[str]:
    """``python -m irishost`` where the package has a __main__, else the script."""
    if importlib.util.find_spec("irishost.__main__") is not None:
        return [sys.executable, "-m", "irishost", "-c", str(config)]
    script = shutil.which("irishost")
    if script is None:
        raise RuntimeError("neither irishost/__main__.py nor an irishost script is installed")
    return [script, "-c", str(config)]


def serve_plain(config_path: str) -> int:
    """The plain service process: the handler under ``iris.register``, default limits.

    SIGTERM is blocked and then awaited with sigwait, so the binding's
    threads (which inherit the mask) never see it and no handler is needed.
    """
    config = load_config(config_path)
    handler = load_handler(config)(**config.settings)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    with iris.register(config.relay.port, config.service.cluster, handler):
        signal.sigwait({signal.SIGTERM})
    return 0


class Rig:
    """A fresh relay, one service on it, and a client connection from here.

    ``workers`` None runs the plain service (this script with ``--serve``),
    a number runs irishost with that many workers. Ready means a probe
    request came back with the expected answer, which for irishost also
    proves its workers are up. Everything is torn down by :meth:`close`,
    which runs even when setup fails half way.
    """

    def __init__(
        self,
        directory: Path,
        handler: str,
        workers: int | None,
        probe: tuple[bytes, bytes],
        argv: Callable[[Path], list[str]] = irishost_argv,
        access: bool = False,
        checkout: str | None = None,
    ):
        """``checkout``: run irishost from that checkout (--compare)."""
        if workers is None:
            self.label = "plain iris.register"
        else:
            self.label = f"irishost {workers} worker{'s' if workers > 1 else ''}"
        if handler == ASYNC_ECHO:
            self.label += ", iris.aio handler"
        if access:
            self.label += ", access log on"
        self.relay = self.service = self.conn = None
        try:
            self.relay, port = _util.start_relay()
            self.port = port
            name = f"{handler}-{'plain' if workers is None else f'host{workers}'}-{port}"
            config = write_config(directory, name, handler, port, workers or 1, access)
            if workers is None:
                command = [sys.executable, __file__, "--serve", str(config)]
            else:
                command = argv(config)
            self.service = _util.Child(command, self.label, checkout)
            self.conn = iris.connect(port)
            self._wait_serving(*probe)
        except BaseException:
            self.close()
            raise

    def _wait_serving(self, request: bytes, expected: bytes) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                reply = self.conn.request(CLUSTER, request, PROBE_TIMEOUT)
                break
            except (iris.TimeoutError, iris.RemoteError) as err:
                if not self.service.alive():
                    # stdout is at EOF, so this raises with the child's stderr.
                    self.service.readline(1.0)
                    raise RuntimeError(f"{self.label} exited during start-up") from err
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.label} not serving after {START_TIMEOUT:g} s"
                    ) from err
        if reply != expected:
            raise RuntimeError(f"{self.label} answered {reply!r}, expected {expected!r}")

    def processes(self) -> list[psutil.Process]:
        """The service's processes: irishost's supervisor and its workers, found
        by their titles among its descendants (its fork servers, idle between
        forks, are left out); a checkout from before the process model of
        issue 16 has its workers one level further down, under its fork server."""
        ps = self.service.ps
        workers = [child for child in ps.children(recursive=True) if _is_worker(child)]
        return [ps, *workers]

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.conn.close()
        finally:
            for child in (self.service, self.relay):
                if child is not None:
                    child.stop()


def timed_calls(operation: Callable[[], object], warmup: int, seconds: float) -> list[float]:
    """Durations in us of sequential calls for ``seconds``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        operation()
    samples = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e9)
    while True:
        start = clock()
        operation()
        stop = clock()
        samples.append((stop - start) / 1000)
        if stop >= end:
            return samples


# ---------------------------------------------------------------------------
# 1. CPU-bound handler: plain service against irishost with 2 workers.


def handler_seconds(config: Config, request: bytes, calls: int = 20) -> tuple[float, bytes]:
    """Seconds one request costs the handler in this process, and its answer.

    The fastest of ``calls``: the cost with a core to itself, which other
    work on a shared machine can only add to.
    """
    handler = load_handler(config)(**config.settings)
    reply = handler.handle_request(request)
    fastest = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        handler.handle_request(request)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest, reply


def cpu_window(rig: Rig, settings: Settings) -> tuple[int, float, float]:
    """Requests, seconds and service CPU seconds of one window of CPU_REQUESTERS.

    The requesters run through warm-up and window without pause; the window
    is cut out of the middle by snapshots of the counters, so thread start
    and stop fall outside it.
    """
    stop = threading.Event()
    counts = [0] * CPU_REQUESTERS
    errors: list[BaseException] = []
    request = rig.conn.request

    def requester(index: int) -> None:
        try:
            while not stop.is_set():
                request(CLUSTER, PRIME_REQUEST, REPLY_TIMEOUT)
                counts[index] += 1
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            stop.set()

    threads = [
        threading.Thread(target=requester, args=(i,), name=f"hostbench-requester-{i}")
        for i in range(CPU_REQUESTERS)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(settings.warmup_seconds)
        processes = rig.processes()
        before = sum(counts), time.perf_counter(), sum(map(_cpu_seconds, processes))
        stop.wait(settings.cpu_seconds)
        after = sum(counts), time.perf_counter(), sum(map(_cpu_seconds, processes))
    finally:
        stop.set()
        for thread in threads:
            thread.join(REPLY_TIMEOUT + 5)
    if errors:
        raise RuntimeError(f"a requester failed: {errors[0]!r}") from errors[0]
    requests, seconds, cpu = (a - b for a, b in zip(after, before, strict=True))
    return int(requests), seconds, cpu


def _is_worker(process: psutil.Process) -> bool:
    try:
        return " ".join(process.cmdline()).startswith("irishost: worker")
    except psutil.Error:
        return False


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def bench_cpu_bound(report: _util.Report, settings: Settings, directory: Path) -> None:
    config = load_config(write_config(directory, "calibrate", "PrimeHandler", 1, 1))
    seconds, answer = handler_seconds(config, PRIME_REQUEST)
    report.add(
        f"cpu-bound: handler time per request (primes < {PRIME_LIMIT:,})", seconds * 1e3, "ms"
    )
    probe = (PRIME_REQUEST, answer)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(Rig(directory, "PrimeHandler", None, probe))
        hosts = [stack.enter_context(Rig(directory, "PrimeHandler", CPU_WORKERS, probe))]
        hosts += compared_rigs(stack, settings, directory, "PrimeHandler", CPU_WORKERS, probe)
        totals = {rig: [0, 0.0, 0.0] for rig in (plain, *hosts)}
        for rig in _util.alternating((plain, *hosts), settings.rounds):
            for index, value in enumerate(cpu_window(rig, settings)):
                totals[rig][index] += value
    plain_requests, plain_seconds, plain_cpu = totals[plain]
    plain_rate = plain_requests / plain_seconds
    label = f"{CPU_REQUESTERS} requesters"
    report.add(f"cpu-bound: {plain.label}, {label}", plain_rate, "requests/s")
    for host in hosts:
        host_requests, host_seconds, _ = totals[host]
        report.add(
            f"cpu-bound: {host.label} (1 request thread each), {label}",
            host_requests / host_seconds,
            "requests/s",
            CPU_TARGET if host is hosts[0] else None,
            baseline=plain_rate,
        )
    # Cores the service kept busy: what explains the ratio (1 against ~2).
    for rig in (plain, *hosts):
        _, rig_seconds, rig_cpu = totals[rig]
        report.add(f"cpu-bound: {rig.label}, CPU in use", rig_cpu / rig_seconds, "cores")


# ---------------------------------------------------------------------------
# 2. The shared-memory ring against multiprocessing's Queue and Pipe.


def bench_ring(report: _util.Report, settings: Settings, directory: Path) -> None:
    """ring_bench's measurements in ABBA rounds; the median rate of the rounds
    and the median of all round trips, so one noisy round does not decide."""
    rates: dict[Callable, list[float]] = {
        ring_bench.queue_throughput: [],
        ring_bench.ring_throughput: [],
    }
    round_trips: dict[Callable, list[float]] = {
        ring_bench.pipe_round_trips: [],
        ring_bench.ring_round_trips: [],
    }
    try:
        for measure in _util.alternating(tuple(rates), settings.rounds):
            rates[measure].append(measure(settings.ring_messages))
        for measure in _util.alternating(tuple(round_trips), settings.rounds):
            round_trips[measure] += measure(settings.ring_round_trips)
    finally:
        _reap_multiprocessing_children()
    queue_rate = statistics.median(rates[ring_bench.queue_throughput])
    ring_rate = statistics.median(rates[ring_bench.ring_throughput])
    pipe = statistics.median(round_trips[ring_bench.pipe_round_trips])
    ring = statistics.median(round_trips[ring_bench.ring_round_trips])
    report.add("ring: one way 100 B, multiprocessing.Queue", queue_rate, "msgs/s")
    report.add(
        "ring: one way 100 B, Ring",
        ring_rate,
        "msgs/s",
        ring_bench.QUEUE_TARGET,
        baseline=queue_rate,
    )
    report.add("ring: round trip 100 B, multiprocessing.Pipe, median", pipe, "us")
    report.add(
        "ring: round trip 100 B, Ring pair, median",
        ring,
        "us",
        ring_bench.PIPE_TARGET,
        baseline=pipe,
    )


def _reap_multiprocessing_children() -> None:
    """ring_bench joins its children only on success; a failure must not leave them."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join()


# ---------------------------------------------------------------------------
# 3. Task dispatch without the relay: a real worker against ProcessPoolExecutor.


def echo(payload: bytes) -> bytes:
    """The executor's task: the same nothing the EchoHandler does."""
    return payload


@contextlib.contextmanager
def work_directory() -> Iterator[Path]:
    """A temporary directory that this process, and only this process, removes.

    Not a ``TemporaryDirectory``: dispatch forks a worker from this process,
    and a worker leaving on a drain runs the atexit handlers it inherited
    (as irishost's own workers do), among them the one that would remove a
    ``TemporaryDirectory`` from under the benchmarks that follow.
    """
    path = Path(tempfile.mkdtemp(prefix="irishost-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def forked_worker(config: Config) -> Iterator[tuple[Ring, Ring]]:
    """Fork an ``irishost.worker.process`` as the supervisor would; yield (inbox, outbox).

    The handler is preloaded here and the rings made before the fork, as a
    fork server does. On the way out the worker is asked to drain, then
    killed if it does not exit; the rings are closed either way (their names
    were unlinked when they were made, so /dev/shm never sees them).
    """
    handler_class = load_handler(config)
    rings: list[Ring] = []
    pid = 0
    alive, alive_write = os.pipe()  # the supervisor's alive pipe: this process holds it
    try:
        rings += [Ring.create(prefix=RING_PREFIX), Ring.create(prefix=RING_PREFIX)]
        inbox, outbox = rings
        spec = worker.WorkerSpec(0, config, inbox, outbox, handler_class, os.getpid(), alive)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                worker.run(spec)
            finally:  # run() never returns; this keeps the child out of our code if it raises
                os._exit(1)
        first = outbox.get(START_TIMEOUT)
        if first is None:
            raise RuntimeError(f"dispatch worker not ready after {START_TIMEOUT:g} s")
        message = frames.decode(first)
        if not isinstance(message, frames.Ready):
            raise RuntimeError(f"dispatch worker did not start: {message}")
        yield inbox, outbox
    finally:
        if pid:
            _stop_worker(pid, rings[0])
        for ring in rings:
            ring.close()
        os.close(alive)
        os.close(alive_write)


def _stop_worker(pid: int, inbox: Ring) -> None:
    with contextlib.suppress(TimeoutError, ValueError, OSError):
        inbox.put(frames.Drain().encode(), timeout=1.0)
    deadline = time.monotonic() + WORKER_STOP_TIMEOUT
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _request_frame(ticket: int) -> bytes:
    """What Switchboard.request writes, deadline included."""
    deadline = time.monotonic() + REPLY_TIMEOUT
    return frames.Request(ticket, deadline, DISPATCH_PAYLOAD).encode()


def _check_reply(data: bytes) -> int:
    """Decode a REPLY frame as the supervisor's loop does; return its ticket."""
    reply = frames.decode(data)
    if (
        not isinstance(reply, frames.Reply)
        or not reply.success
        or reply.payload != DISPATCH_PAYLOAD
    ):
        raise RuntimeError(f"unexpected frame from the worker: {reply!r:.80}")
    return reply.ticket


def dispatch_round_trip(inbox: Ring, outbox: Ring) -> Callable[[], None]:
    """One REQUEST -> REPLY exchange with the worker, for timed_calls."""
    tickets = itertools.count(1)

    def round_trip() -> None:
        ticket = next(tickets)
        inbox.put(_request_frame(ticket), REPLY_TIMEOUT)
        data = outbox.get(REPLY_TIMEOUT)
        if data is None or _check_reply(data) != ticket:
            raise RuntimeError(f"no reply to ticket {ticket}")

    return round_trip


def dispatch_pipelined(inbox: Ring, outbox: Ring, seconds: float) -> float:
    """Tasks per second with PIPELINE_DEPTH in flight: replies received
    divided by the time from the first request to the last reply."""
    sent = received = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        if time.perf_counter() < end:
            while sent - received < PIPELINE_DEPTH:
                sent += 1
                inbox.put(_request_frame(sent), REPLY_TIMEOUT)
        elif received == sent:
            return received / (time.perf_counter() - start)
        batch = outbox.drain()
        if not batch:
            data = outbox.get(REPLY_TIMEOUT)
            if data is None:
                raise RuntimeError(f"worker stalled with {sent - received} tasks in flight")
            batch = [data]
        for data in batch:
            _check_reply(data)
        received += len(batch)


def executor_map_rate(pool: ProcessPoolExecutor, tasks: int) -> float:
    """map() submits every item up front, so the count is fixed, not the time."""
    items = [DISPATCH_PAYLOAD] * tasks
    start = time.perf_counter()
    done = sum(1 for _ in pool.map(echo, items, chunksize=1))
    return done / (time.perf_counter() - start)


def bench_dispatch(report: _util.Report, settings: Settings, directory: Path) -> None:
    relay, port = _util.start_relay()  # only for the worker's own client connection in init
    try:
        config = load_config(write_config(directory, "dispatch", "EchoHandler", port, 1))
        with forked_worker(config) as (inbox, outbox):
            host_samples = timed_calls(
                dispatch_round_trip(inbox, outbox), settings.warmup_count, settings.dispatch_seconds
            )
            dispatch_pipelined(inbox, outbox, settings.warmup_seconds)
            host_rate = dispatch_pipelined(inbox, outbox, settings.dispatch_seconds)
    finally:
        relay.stop()
    with ProcessPoolExecutor(max_workers=1) as pool:
        pool_samples = timed_calls(
            lambda: pool.submit(echo, DISPATCH_PAYLOAD).result(),
            settings.warmup_count,
            settings.dispatch_seconds,
        )
        executor_map_rate(pool, settings.warmup_count)
        pool_rate = executor_map_rate(pool, settings.executor_tasks)
    baseline = report.add_latencies(
        "dispatch: round trip 100 B, ProcessPoolExecutor(1) submit().result()", pool_samples
    )
    report.add_latencies(
        "dispatch: round trip 100 B, irishost worker", host_samples, baseline=baseline
    )
    report.add("dispatch: ProcessPoolExecutor(1) map, chunksize=1", pool_rate, "tasks/s")
    report.add(
        f"dispatch: irishost worker, {PIPELINE_DEPTH} in flight",
        host_rate,
        "tasks/s",
        DISPATCH_TARGET,
        baseline=pool_rate,
    )


# ---------------------------------------------------------------------------
# 4. Echo overhead: what irishost adds to a request's latency.


def latency_window(rig: Rig, settings: Settings) -> list[float]:
    """Sequential echo round trips for one window, in us."""
    request = rig.conn.request
    return timed_calls(
        lambda: request(CLUSTER, ECHO_REQUEST, REPLY_TIMEOUT),
        settings.warmup_count,
        settings.latency_seconds,
    )


@dataclass
class LoadWindow:
    """What one window of LOAD_CONCURRENCY echo requests in flight did."""

    answered: int
    seconds: float
    cpu: list[float]  # CPU seconds of each process load_window was given
    machine: float  # CPU seconds of the whole machine: every process and interrupt


def load_window(
    rig: Rig,
    settings: Settings,
    processes: Sequence[psutil.Process] = (),
    request: bytes = ECHO_REQUEST,
) -> LoadWindow:
    """LOAD_CONCURRENCY requesters of ``request`` (iris.aio, the cheapest
    client on the shared cores) through a warm-up, then a window cut out of
    the middle by snapshots of the count and the CPU times, as iris_bench
    cuts its own.

    So connecting, the ramp up and the drain at the end, when batches are
    small and the processes have just woken, fall outside the window: its
    figures are the steady state with that many in flight.
    """

    def snapshot() -> tuple[float, list[float], float]:
        return time.monotonic(), [_cpu_seconds(p) for p in processes], _cpu_split()[0]

    async def run() -> LoadWindow:
        conn = await iris.aio.connect(rig.port)
        answered = 0
        running = True

        async def lane() -> None:
            nonlocal answered
            while running:
                await conn.request(CLUSTER, request, REPLY_TIMEOUT)
                answered += 1

        lanes = [asyncio.ensure_future(lane()) for _ in range(LOAD_CONCURRENCY)]
        try:
            await asyncio.sleep(settings.warmup_seconds)
            (started, cpu_before, machine_before), answered_before = snapshot(), answered
            await asyncio.sleep(settings.latency_seconds)
            (ended, cpu_after, machine_after), answered_after = snapshot(), answered
        finally:
            running = False
            await asyncio.gather(*lanes)  # a requester's error is raised here
            await conn.close()
        return LoadWindow(
            answered_after - answered_before,
            ended - started,
            [after - before for before, after in zip(cpu_before, cpu_after, strict=True)],
            machine_after - machine_before,
        )

    return asyncio.run(run())


def compared_rigs(
    stack: contextlib.ExitStack,
    settings: Settings,
    directory: Path,
    handler: str,
    workers: int,
    probe: tuple[bytes, bytes],
) -> list[Rig]:
    """The same service run by irishost from each ``--compare`` checkout."""
    rigs = []
    for checkout in settings.compare:
        rig = stack.enter_context(Rig(directory, handler, workers, probe, checkout=checkout))
        rig.label += f" from {checkout}"
        rigs.append(rig)
    return rigs


def bench_echo_overhead(report: _util.Report, settings: Settings, directory: Path) -> None:
    """Latency of each side, and the CPU each process of the service spends
    per request, which is where irishost's extra hop shows when the machine
    is busy; then the same with LOAD_CONCURRENCY requests in flight, where
    irishost with LOAD_WORKERS workers joins in."""
    probe = (ECHO_REQUEST, ECHO_REQUEST)
    with contextlib.ExitStack() as stack:
        plain = stack.enter_context(Rig(directory, "EchoHandler", None, probe))
        hosts = [stack.enter_context(Rig(directory, "EchoHandler", 1, probe))]
        hosts += compared_rigs(stack, settings, directory, "EchoHandler", 1, probe)
        hosts.append(stack.enter_context(Rig(directory, ASYNC_ECHO, 1, probe)))
        hosts += compared_rigs(stack, settings, directory, ASYNC_ECHO, 1, probe)
        wide = [stack.enter_context(Rig(directory, "EchoHandler", LOAD_WORKERS, probe))]
        wide += compared_rigs(stack, settings, directory, "EchoHandler", LOAD_WORKERS, probe)
        rigs = [plain, *hosts]
        samples: dict[Rig, list[float]] = {rig: [] for rig in rigs}
        # Per process (irishost: supervisor, then its worker): CPU seconds.
        cpu = {rig: [0.0] * len(rig.processes()) for rig in rigs}
        for rig in _util.alternating(rigs, settings.rounds):
            processes = rig.processes()
            before = [_cpu_seconds(process) for process in processes]
            samples[rig] += latency_window(rig, settings)
            for index, process in enumerate(processes):
                cpu[rig][index] += _cpu_seconds(process) - before[index]
        loaded = loaded_windows([*rigs, *wide], settings)
    baseline = report.add_latencies(f"echo latency: {plain.label}", samples[plain])
    for host in hosts:
        target = ECHO_TARGET if host is hosts[0] else None
        report.add_latencies(
            f"echo latency: {host.label}", samples[host], target, baseline=baseline
        )
    # latency_window also sends warmup_count requests per round.
    per_request = {
        rig: 1e6 / (len(samples[rig]) + settings.rounds * settings.warmup_count) for rig in rigs
    }
    plain_cpu = cpu[plain][0] * per_request[plain]
    report.add(f"echo CPU per request: {plain.label} service process", plain_cpu, "us")
    for host in hosts:
        supervisor, worker_cpu = (seconds * per_request[host] for seconds in cpu[host])
        report.add(f"echo CPU per request: {host.label}, supervisor", supervisor, "us")
        report.add(f"echo CPU per request: {host.label}, worker", worker_cpu, "us")
        report.add(
            f"echo CPU per request: {host.label}, supervisor + worker",
            supervisor + worker_cpu,
            "us",
            baseline=plain_cpu,
        )
    report_loaded(report, plain, hosts, wide, loaded)
    report_saturation(report, [plain, *hosts, *wide], loaded)


@dataclass
class Loaded:
    """A rig's loaded windows added up: requests and CPU seconds."""

    answered: int
    seconds: float
    service: float  # the service's processes: plain's one, or supervisor and workers
    supervisor: float  # the service's first process: irishost's supervisor
    client_relay: float  # the client (this process) and the relay
    machine: float  # the whole machine

    @classmethod
    def total(cls, windows: list[LoadWindow]) -> Loaded:
        """Of windows measured on [the service's processes..., client, relay]."""
        return cls(
            answered=sum(w.answered for w in windows),
            seconds=sum(w.seconds for w in windows),
            service=sum(sum(w.cpu[:-2]) for w in windows),
            supervisor=sum(w.cpu[0] for w in windows),
            client_relay=sum(sum(w.cpu[-2:]) for w in windows),
            machine=sum(w.machine for w in windows),
        )

    @property
    def rate(self) -> float:
        return self.answered / self.seconds

    def per_request(self, cpu_seconds: float) -> float:
        """``cpu_seconds`` over these windows, in us per request."""
        return cpu_seconds / self.answered * 1e6


def loaded_windows(
    rigs: list[Rig], settings: Settings, request: bytes = ECHO_REQUEST
) -> dict[Rig, Loaded]:
    """Each rig's windows of LOAD_CONCURRENCY ``request``s in flight, in
    alternating rounds, added up; each window measured on the rig's service
    processes (irishost's supervisor first), then the client (this process)
    and the rig's relay, as Loaded.total reads them."""
    client = psutil.Process()
    windows: dict[Rig, list[LoadWindow]] = {rig: [] for rig in rigs}
    for rig in _util.alternating(rigs, settings.rounds):
        processes = [*rig.processes(), client, rig.relay.ps]
        windows[rig].append(load_window(rig, settings, processes, request))
    return {rig: Loaded.total(rig_windows) for rig, rig_windows in windows.items()}


def report_loaded(
    report: _util.Report,
    plain: Rig,
    hosts: list[Rig],
    wide: list[Rig],
    loaded: dict[Rig, Loaded],
) -> None:
    """echo-overhead's rows for its windows of LOAD_CONCURRENCY in flight."""
    in_flight = f"{LOAD_CONCURRENCY} in flight"
    plain_rate = loaded[plain].rate
    report.add(f"echo, {in_flight}: {plain.label}", plain_rate, "requests/s")
    targets = {hosts[0]: LOAD_TARGET, wide[0]: WIDE_TARGET}  # not the compared checkouts
    for rig in (*hosts, *wide):
        report.add(
            f"echo, {in_flight}: {rig.label}",
            loaded[rig].rate,
            "requests/s",
            targets.get(rig),
            baseline=plain_rate,
        )
    plain_cpu = loaded[plain].per_request(loaded[plain].service)
    report.add(f"echo CPU per request, {in_flight}: {plain.label}", plain_cpu, "us")
    for rig in (*hosts, *wide):
        report.add(
            f"echo CPU per request, {in_flight}: {rig.label}, supervisor + workers",
            loaded[rig].per_request(loaded[rig].service),
            "us",
            LOAD_CPU_TARGET if rig is hosts[0] else None,
            baseline=plain_cpu,
        )
        report.add(
            f"echo CPU per request, {in_flight}: {rig.label}, supervisor",
            loaded[rig].per_request(loaded[rig].supervisor),
            "us",
            SUPERVISOR_TARGET if rig is hosts[0] else None,
        )


def report_saturation(report: _util.Report, rigs: list[Rig], loaded: dict[Rig, Loaded]) -> None:
    """What else each loaded window cost, and how busy the machine was.

    When the cores are all busy, a side's requests/s is the cores over the CPU
    per request of everything a request crosses (client, relay, service), so
    a host's share of that decides its ratio to the plain service, whatever
    the supervisor's own speed: the reason issue 19's figures need these."""
    in_flight = f"{LOAD_CONCURRENCY} in flight"
    for rig in rigs:
        report.add(
            f"echo CPU per request, {in_flight}: {rig.label}, client + relay",
            loaded[rig].per_request(loaded[rig].client_relay),
            "us",
        )
        report.add(
            f"echo, {in_flight}: {rig.label}, cores busy (whole machine)",
            loaded[rig].machine / loaded[rig].seconds,
            "cores",
        )


def bench_access_log(report: _util.Report, settings: Settings, directory: Path) -> None:
    """Loaded echo throughput of irishost with the access log off and on, and
    the supervisor's CPU per request, where the access lines are written;
    each --compare checkout is measured both ways too."""
    probe = (ECHO_REQUEST, ECHO_REQUEST)
    pairs: list[tuple[Rig, Rig]] = []
    with contextlib.ExitStack() as stack:
        for checkout in (None, *settings.compare):
            off, on = (
                stack.enter_context(
                    Rig(directory, "EchoHandler", 1, probe, access=access, checkout=checkout)
                )
                for access in (False, True)
            )
            if checkout is not None:
                off.label += f" from {checkout}"
                on.label += f" from {checkout}"
            pairs.append((off, on))
        loaded = loaded_windows([rig for pair in pairs for rig in pair], settings)
    in_flight = f"{LOAD_CONCURRENCY} in flight"
    for off, on in pairs:
        off_rate, on_rate = loaded[off].rate, loaded[on].rate
        off_cpu = loaded[off].per_request(loaded[off].supervisor)
        on_cpu = loaded[on].per_request(loaded[on].supervisor)
        report.add(f"echo, {in_flight}: {off.label}", off_rate, "requests/s")
        target = ACCESS_LOG_TARGET if off is pairs[0][0] else None
        report.add(
            f"echo, {in_flight}: {on.label}", on_rate, "requests/s", target, baseline=off_rate
        )
        report.add(f"echo supervisor CPU per request, {in_flight}: {off.label}", off_cpu, "us")
        report.add(
            f"echo supervisor CPU per request, {in_flight}: {on.label}",
            on_cpu,
            "us",
            baseline=off_cpu,
        )


# ---------------------------------------------------------------------------
# 5b. Where a second worker starts to pay, on this machine (issue 19).


def bench_handler_cost(report: _util.Report, settings: Settings, directory: Path) -> None:
    """LOAD_CONCURRENCY in flight against plain iris.register and irishost
    with 1 and 2 workers, for handlers of growing CPU cost (primes below
    each of HANDLER_COST_LIMITS). On 2 cores the client, the relay and the
    supervisor take CPU too, so a second worker adds little capacity for
    a handler that does nothing (echo-overhead) and pays once the handler's
    own work dominates; this shows where."""
    for limit in HANDLER_COST_LIMITS:
        config = load_config(write_config(directory, f"cost{limit}", "PrimeHandler", 1, 1))
        request = str(limit).encode()
        seconds, answer = handler_seconds(config, request)
        with contextlib.ExitStack() as stack:
            rigs = [
                stack.enter_context(Rig(directory, "PrimeHandler", workers, (request, answer)))
                for workers in (None, 1, 2)
            ]
            loaded = loaded_windows(rigs, settings, request)
        rates = {rig: figures.rate for rig, figures in loaded.items()}
        name = f"handler-cost: primes below {limit} ({seconds * 1e6:.0f} us a request)"
        plain = rates[rigs[0]]
        report.add(f"{name}, {LOAD_CONCURRENCY} in flight: {rigs[0].label}", plain, "requests/s")
        for rig in rigs[1:]:
            report.add(
                f"{name}, {LOAD_CONCURRENCY} in flight: {rig.label}",
                rates[rig],
                "requests/s",
                baseline=plain,
            )


# ---------------------------------------------------------------------------
# 6. Preloaded memory: what each worker holds of its own (issue 19, items 3 and 4).

PRELOADED_MODULE = "hostbench_preloaded"
PRELOADED_SOURCE = """\
\"\"\"The preloaded handler of bench/irishost_bench.py's preload-memory benchmark.\"\"\"

import gc
import os

import iris


def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_before = resident()
# About 200 MB: a list and two strings per entry, the lists reached by the collector.
TABLE = {str(i): [i, str(i)] for i in range(750_000)}
SIZE = resident() - _before


class PreloadedHandler(iris.ServiceHandler):
    def init(self, conn):
        gc.collect()  # the worker's first full collection

    def handle_request(self, request):
        return str(SIZE).encode() if request == b"size" else request
"""
MEMORY_WORKERS = 4
SAMPLING_WORKERS = 16
SAMPLING_ROUNDS = 20
# Frozen, a worker's private memory stays under 15 % of what was preloaded (issue 19).
PRIVATE_TARGET = _util.Target(floor=0.15, higher_is_better=False, on_ratio=True)


class WatchedHost:
    """irishost as Rig's ``argv``, keeping its config to read ``irishost status``:
    the config Rig wrote gets its handler from ``module`` and ``gc_freeze`` set."""

    def __init__(self, module: str = HANDLER_MODULE, freeze: bool = True):
        self.module = module
        self.freeze = freeze
        self.config: Config | None = None

    def __call__(self, path: Path) -> list[str]:
        text = path.read_text().replace(f'"{HANDLER_MODULE}:', f'"{self.module}:')
        freeze = f"gc_freeze = {str(self.freeze).lower()}"
        path.write_text(text.replace("[workers]\n", f"[workers]\n{freeze}\n"))
        self.config = load_config(path)
        return irishost_argv(path)

    def ready_workers(self, count: int) -> list[dict]:
        """The status of the host's workers once ``count`` are ready (each has collected)."""
        assert self.config is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            workers = query_status(self.config.control.socket)["workers"]
            if sum(worker["state"] == "ready" for worker in workers) == count:
                return list(workers)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} workers not ready after {START_TIMEOUT:g} s")
            time.sleep(0.1)


def _host_pss(rig: Rig) -> int:
    """Proportional memory of every process of the host: what the machine pays for it."""
    ps = rig.service.ps
    total = 0
    for process in [ps, *ps.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += process.memory_full_info().pss
    return total


def sampling_cost(pids: list[int]) -> dict[str, float]:
    """CPU seconds of one round over ``pids`` of each thing the supervisor reads:
    the workers' descendants (a scan of /proc, once a second: psutil's per
    worker before issue 19, one for all since), their resident memory (each
    check), and all three figures (smaps_rollup)."""
    processes = [psutil.Process(pid) for pid in pids]

    def each(read: Callable[[psutil.Process], object]) -> Callable[[], None]:
        def round_() -> None:
            for process in processes:
                read(process)

        return round_

    def one_scan() -> None:
        family = Family()  # a fresh one scans /proc once, for every worker's tree
        for pid in pids:
            family.descendants(pid)

    rounds = {
        "descendants, a scan of /proc per worker": each(
            lambda process: process.children(recursive=True)
        ),
        "descendants, one scan of /proc": one_scan,
        "RSS (statm)": each(psutil.Process.memory_info),
        "RSS, USS, PSS (smaps_rollup)": each(psutil.Process.memory_full_info),
    }
    costs = {}
    for name, round_ in rounds.items():
        start = time.thread_time()
        for _ in range(SAMPLING_ROUNDS):
            round_()
        costs[name] = (time.thread_time() - start) / SAMPLING_ROUNDS
    return costs


def bench_preload_memory(report: _util.Report, settings: Settings, directory: Path) -> None:
    """Each worker's private memory with gc_freeze off and on, and what reading it costs."""
    (directory / f"{PRELOADED_MODULE}.py").write_text(PRELOADED_SOURCE)
    probe = (ECHO_REQUEST, ECHO_REQUEST)
    label = f"preload-memory: {MEMORY_WORKERS} workers"
    size = 0.0
    for freeze in (False, True):
        host = WatchedHost(PRELOADED_MODULE, freeze)
        with Rig(directory, "PreloadedHandler", MEMORY_WORKERS, probe, host) as rig:
            size = int(rig.conn.request(CLUSTER, b"size", REPLY_TIMEOUT)) / 2**20
            workers = host.ready_workers(MEMORY_WORKERS)
            host_pss = _host_pss(rig) / 2**20
        side = f"{label}, gc_freeze {'on' if freeze else 'off'}"
        private = statistics.mean(worker["uss"] for worker in workers) / 2**20
        resident = statistics.mean(worker["rss"] for worker in workers) / 2**20
        target = PRIVATE_TARGET if freeze else None
        report.add(
            f"{side}: private memory (USS) per worker", private, "MiB", target, baseline=size
        )
        report.add(f"{side}: resident memory (RSS) per worker", resident, "MiB")
        report.add(f"{side}: proportional memory (PSS), whole host", host_pss, "MiB")
    report.add("preload-memory: preloaded structure (the fork server's RSS growth)", size, "MiB")
    for kind, handler, host in (
        ("preloaded", "PreloadedHandler", WatchedHost(PRELOADED_MODULE)),
        ("echo", "EchoHandler", WatchedHost()),
    ):
        with Rig(directory, handler, SAMPLING_WORKERS, probe, host):
            pids = [worker["pid"] for worker in host.ready_workers(SAMPLING_WORKERS)]
            rss = statistics.mean(ProcessTree(pid).rss() for pid in pids) / 2**20
            costs = sampling_cost(pids)
        each = f"memory sampling, {SAMPLING_WORKERS} {kind} workers of {rss:.0f} MiB RSS"
        for name, seconds in costs.items():
            report.add(f"{each}: {name}, CPU per round", seconds * 1e3, "ms")
        rollup = costs["RSS, USS, PSS (smaps_rollup)"]
        report.add(
            f"{each}: each worker's private memory read every ({PRIVATE_CPU_SHARE:.0%} of a core)",
            rollup / PRIVATE_CPU_SHARE,
            "s",
        )


RUNNERS: dict[str, Callable[[_util.Report, Settings, Path], None]] = {
    "cpu-bound": bench_cpu_bound,
    "ring": bench_ring,
    "dispatch": bench_dispatch,
    "echo-overhead": bench_echo_overhead,
    "access-log": bench_access_log,
    "handler-cost": bench_handler_cost,
    "preload-memory": bench_preload_memory,
}


# ---------------------------------------------------------------------------
# Profiling irishost's request path.


def run_profiled_host(directory: str, config: str) -> int:
    """irishost's own ``main``, with its supervisor and every worker under cProfile.

    The supervisor's statistics are written when it returns (it stops on
    SIGTERM). Its workers are forked by fork servers, fresh interpreters
    that import the handler module, which sees PROFILE_VARIABLE (inherited
    from here) and calls :func:`profile_forked_workers`.
    """
    os.environ[PROFILE_VARIABLE] = directory
    profile = _util.AllThreadsProfile()
    profile.enable()
    try:
        return cli.main(["-c", config])
    finally:
        profile.stats().dump_stats(os.path.join(directory, "supervisor.prof"))


def profile_forked_workers(directory: str) -> None:
    """Profile every process forked from this one (a fork server's workers).

    Workers end in ``os._exit`` and are stopped with SIGTERM, so nothing
    would be written at exit: a fork hook starts a fresh profile in each
    child and installs a SIGUSR2 handler, a signal irishost leaves alone,
    that writes the child's file.
    """
    os.register_at_fork(after_in_child=lambda: _profile_worker(directory))


def _profile_worker(directory: str) -> None:
    profile = _util.AllThreadsProfile()
    profile.enable()

    def dump(*_signal) -> None:
        path = os.path.join(directory, f"worker-{os.getpid()}.prof")
        profile.stats().dump_stats(f"{path}.part")
        os.replace(f"{path}.part", path)  # so the benchmark never reads half a file

    signal.signal(signal.SIGUSR2, dump)


def profile_echo(directory: str, settings: Settings, loaded: bool) -> None:
    """The echo-latency run against irishost with 1 worker, profiled; prints the hot spots.

    ``loaded`` profiles the windows of LOAD_CONCURRENCY requests in flight
    instead of sequential requests. Deterministic profiling slows every
    call, small ones most, so the latency printed here is not a benchmark
    figure; read the output for proportions. Start-up is profiled too, but
    is small next to thousands of requests.
    """
    os.makedirs(directory, exist_ok=True)

    def profiled_argv(config: Path) -> list[str]:
        return [sys.executable, __file__, "--profiled-host", directory, str(config)]

    with work_directory() as workdir:
        (workdir / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
        probe = (ECHO_REQUEST, ECHO_REQUEST)
        with Rig(workdir, "EchoHandler", 1, probe, profiled_argv) as rig:
            samples: list[float] = []
            answered = 0
            for _ in range(settings.rounds):
                if loaded:
                    answered += load_window(rig, settings).answered
                else:
                    samples += latency_window(rig, settings)
            workers = rig.processes()[1:]
            for process in workers:
                process.send_signal(signal.SIGUSR2)
            paths = [os.path.join(directory, f"worker-{p.pid}.prof") for p in workers]
            deadline = time.monotonic() + START_TIMEOUT
            while not all(map(os.path.exists, paths)) and time.monotonic() < deadline:
                time.sleep(0.05)
    if loaded:
        requests = answered
        print(f"profiled run: {requests} echo requests, {LOAD_CONCURRENCY} in flight\n")
    else:
        requests = len(samples) + settings.rounds * settings.warmup_count
        print(
            f"profiled run: {requests} sequential echo requests, mean "
            f"{statistics.fmean(samples):.0f} us (slowed by profiling)\n"
        )
    for path in [os.path.join(directory, "supervisor.prof"), *paths]:
        stats = pstats.Stats(path)
        per_request = stats.total_tt / requests * 1e6
        print(f"## {path}: {per_request:.0f} us profiled per request; top functions by own time")
        stats.sort_stats("tottime").print_stats(25)
        print(f"## {path}: irishost and iris functions by cumulative time")
        stats.sort_stats("cumulative").print_stats(r"irishost/|iris/", 25)


# ---------------------------------------------------------------------------


def _cpu_split() -> tuple[float, float]:
    """CPU seconds used so far by the whole machine, and by this benchmark.

    The benchmark's share is this process and every child it has reaped;
    the kernel adds a child's own reaped children (irishost's workers) to
    the child's account, so by the time a benchmark's rigs are closed all
    of their processes are in. Whatever else ran meanwhile competed for the
    same two cores, which a reader needs to know to trust the figures.
    """
    machine = psutil.cpu_times()
    busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
    busy += machine.steal  # another guest on the host holding our core
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system


def _shm_names() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIXES)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="much shorter runs (smoke test)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help=f"run only NAME: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument(
        "--profile", metavar="DIR", help="profile irishost's echo request path instead"
    )
    parser.add_argument(
        "--profile-load",
        action="store_true",
        help=f"with --profile: {LOAD_CONCURRENCY} requests in flight instead of one at a time",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="echo-overhead, cpu-bound and access-log also run irishost from the checkout DIR "
        "(repeatable)",
    )
    parser.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profiled-host", nargs=2, metavar=("DIR", "CONFIG"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.serve:
        return serve_plain(args.serve)
    if args.profiled_host:
        return run_profiled_host(*args.profiled_host)
    settings = dataclasses.replace(QUICK if args.quick else FULL, compare=tuple(args.compare))
    if args.profile:
        profile_echo(args.profile, settings, args.profile_load)
        return 0

    report = _util.Report(_util.machine(), "quick" if args.quick else "full")
    shm_before = _shm_names()
    started = time.monotonic()
    with work_directory() as directory:
        (directory / f"{HANDLER_MODULE}.py").write_text(HANDLER_SOURCE)
        for name in _util.select(BENCHMARKS, args.only):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            busy, ours = _cpu_split()
            start = time.monotonic()
            try:
                RUNNERS[name](report, settings, directory)
            except Exception as err:  # one failed benchmark must not hide the others
                report.errors[name] = f"{type(err).__name__}: {err}"
                continue
            busy_after, ours_after = _cpu_split()
            # The machine's counters tick in 10 ms steps and ours do not, so an
            # idle machine can come out a hair below zero.
            others = max(0.0, (busy_after - busy) - (ours_after - ours))
            seconds = time.monotonic() - start
            report.add(f"{name}: CPU used by other work meanwhile", others / seconds, "cores")
    report.machine["load_at_end"] = _util.load_average()
    leftover = _shm_names() - shm_before
    if leftover:
        report.errors["cleanup"] = f"left in /dev/shm: {', '.join(sorted(leftover))}"
    report.print()
    print(f"\ntotal {time.monotonic() - started:.1f} s", file=sys.stderr)
    if args.json:
        report.write_json(args.json, settings=asdict(settings))
    if report.errors:
        return 1
    return 1 if args.strict and report.missed() else 0


if __name__ == "__main__":
    sys.exit(main())
