"""Peer benchmark: iris.aio, threaded iris and NATS side by side, same workloads.

Run as ``python bench/peer_bench.py`` (about five minutes; ``--quick`` for a
smoke test, ``--seconds S`` per measurement, ``--rounds N`` to keep the best
of N runs per cell, ``--json FILE`` to keep the figures, ``--stacks
aio,threads`` or ``--workloads echo`` to run part of the grid, ``--compare
DIR`` to add the aio and threads columns of the checkout DIR, the code
before a change, in the same alternation).

Stacks, each with its own server and a fresh responder process:

- ``aio``: ``python -m iris.relay`` + ``iris.aio`` (requester and responder);
- ``threads``: ``python -m iris.relay`` + threaded ``iris``;
- ``nats``: ``nats-server`` + ``nats-py`` (asyncio), when both are installed;
  otherwise the column is skipped with a message. Set-up, for the benchmark
  only (the test suite never needs or installs them)::

      apt-get install -y nats-server      # the Debian package, v2.9 here
      .venv/bin/pip install nats-py

Workloads, both as round trips with 100-byte payloads at 1, 16 and 64
concurrent requesters (coroutines for the asyncio stacks, threads for the
threaded one, all on one connection):

- ``echo``: a request answered by an echo responder;
- ``publish``: an event published to a topic the responder subscribes to,
  which it publishes back on a second topic the requester subscribes to.

The requester, the responder and the server are three processes, so each
one's CPU time is its own; it is read from the kernel (psutil) over the
measured window and divided by the round trips completed. On 2 cores the sum
of the three bounds the throughput. A requester warms up, prints
``measuring``, runs for the measurement time, and prints its count.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import _util

import iris
import iris.aio

PAYLOAD_SIZE = 100
CONCURRENCIES = (1, 16, 64)
WORKLOADS = ("echo", "publish")
STACKS = ("aio", "threads", "nats")
STACK_LABELS = {"aio": "iris-relay + iris.aio", "threads": "iris-relay + iris", "nats": "nats"}
CLUSTER = "peer-echo"  # iris cluster and NATS subject of the echo responder
PING, PONG = "peer-ping", "peer-pong"  # the publish workload's two topics
# A round trip slower than this means a stalled stack: the run fails loudly.
REPLY_TIMEOUT = 10.0
# The key figures of the comparison, at 64 concurrent requesters: iris.aio
# at least 1.3 times threaded iris (the floor), and as fast as NATS.
KEY_CONCURRENCY = 64
KEY_TARGETS = {
    "threads": _util.Target(floor=1.3, on_ratio=True),
    "nats": _util.Target(goal=1.0, on_ratio=True),
}


@dataclass
class Result:
    stack: str
    checkout: str  # "" for this one's; else the --compare checkout the stack ran from
    workload: str
    concurrency: int
    round_trips_per_s: float
    requester_us: float  # CPU per round trip, each process
    responder_us: float
    server_us: float


def payload(lane: int) -> bytes:
    """100 bytes naming the lane (the concurrent requester) they belong to."""
    return lane.to_bytes(4, "little") + b"x" * (PAYLOAD_SIZE - 4)


# ---------------------------------------------------------------------------
# Responders: ``--respond STACK PORT``, until SIGTERM.


class AioEcho(iris.aio.ServiceHandler):
    async def init(self, conn: iris.aio.Connection) -> None:
        self.conn = conn

    async def handle_request(self, request: bytes) -> bytes:
        return request


class ThreadedEcho(iris.ServiceHandler):
    def init(self, conn: iris.Connection) -> None:
        self.conn = conn

    def handle_request(self, request: bytes) -> bytes:
        return request


async def respond_aio(port: int, stopped: asyncio.Event) -> None:
    async with iris.aio.register(port, CLUSTER, AioEcho()) as service:
        conn = service.conn

        async def bounce(event: bytes) -> None:
            await conn.publish(PONG, event)

        await conn.subscribe(PING, bounce)
        await conn.request(CLUSTER, b"sync", REPLY_TIMEOUT)  # the subscription is in place
        print("ready", flush=True)
        await stopped.wait()


def respond_threads(port: int, stopped: threading.Event) -> None:
    with iris.register(port, CLUSTER, ThreadedEcho()) as service:
        conn = service.conn
        conn.subscribe(PING, lambda event: conn.publish(PONG, event))
        conn.request(CLUSTER, b"sync", REPLY_TIMEOUT)
        print("ready", flush=True)
        while not stopped.wait(1.0):
            pass


async def respond_nats(port: int, stopped: asyncio.Event) -> None:
    import nats

    nc = await nats.connect(f"nats://127.0.0.1:{port}")

    async def echo(msg) -> None:
        await msg.respond(msg.data)

    async def bounce(msg) -> None:
        await nc.publish(PONG, msg.data)

    await nc.subscribe(CLUSTER, cb=echo)
    await nc.subscribe(PING, cb=bounce)
    await nc.flush()
    print("ready", flush=True)
    await stopped.wait()
    await nc.close()


def respond(stack: str, port: int) -> int:
    if stack == "threads":
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        respond_threads(port, stopped)
        return 0

    async def main() -> None:
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
        await (respond_aio if stack == "aio" else respond_nats)(port, stopped)

    asyncio.run(main())
    return 0


# ---------------------------------------------------------------------------
# Requesters: ``--request STACK PORT WORKLOAD CONCURRENCY SECONDS WARMUP``.


class Window:
    """The measured window: warm-up, then ``measuring``, then the count."""

    def __init__(self, seconds: float, warmup: float):
        self.start = time.monotonic()
        self.measure_from = self.start + warmup
        self.end = self.measure_from + seconds
        self.measuring = False
        self.count = 0

    def tick(self) -> bool:
        """Count one round trip; False once the window is over."""
        now = time.monotonic()
        if not self.measuring:
            if now < self.measure_from:
                return True
            self.measuring = True
            self.started_at = now
            print("measuring", flush=True)
        self.count += 1
        return now < self.end

    def report(self) -> None:
        elapsed = time.monotonic() - self.started_at
        print(json.dumps({"count": self.count, "elapsed": elapsed}), flush=True)


class Lanes:
    """Futures of the publish workload's lanes, completed by the pong subscription."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future] = {}

    def arrived(self, event: bytes) -> None:
        future = self.waiting.pop(int.from_bytes(event[:4], "little"), None)
        if future is not None and not future.done():
            future.set_result(None)

    async def round_trip(self, lane: int, publish: Callable) -> None:
        future = asyncio.get_running_loop().create_future()
        self.waiting[lane] = future
        await publish(payload(lane))
        async with asyncio.timeout(REPLY_TIMEOUT):
            await future


async def request_async(
    stack: str, port: int, workload: str, concurrency: int, window: Window
) -> None:
    lanes = Lanes()
    if stack == "aio":
        conn = await iris.aio.connect(port)

        async def echo(data: bytes) -> None:
            await conn.request(CLUSTER, data, REPLY_TIMEOUT)

        async def publish(data: bytes) -> None:
            await conn.publish(PING, data)

        await conn.subscribe(PONG, lanes.arrived)
        await conn.request(CLUSTER, b"sync", REPLY_TIMEOUT)
        close = conn.close
    else:
        import nats

        nc = await nats.connect(f"nats://127.0.0.1:{port}")

        async def echo(data: bytes) -> None:
            await nc.request(CLUSTER, data, timeout=REPLY_TIMEOUT)

        async def publish(data: bytes) -> None:
            await nc.publish(PING, data)

        async def arrived(msg) -> None:
            lanes.arrived(msg.data)

        await nc.subscribe(PONG, cb=arrived)
        await nc.flush()
        close = nc.close

    async def lane(number: int) -> None:
        data = payload(number)
        if workload == "echo":
            while True:
                await echo(data)
                if not window.tick():
                    return
        while True:
            await lanes.round_trip(number, publish)
            if not window.tick():
                return

    await asyncio.gather(*(lane(n) for n in range(concurrency)))
    window.report()
    await close()


def request_threads(port: int, workload: str, concurrency: int, window: Window) -> None:
    conn = iris.connect(port)
    events = [threading.Event() for _ in range(concurrency)]

    def arrived(event: bytes) -> None:
        events[int.from_bytes(event[:4], "little")].set()

    conn.subscribe(PONG, arrived)
    conn.request(CLUSTER, b"sync", REPLY_TIMEOUT)
    lock = threading.Lock()

    def lane(number: int) -> None:
        data, done = payload(number), events[number]
        while True:
            if workload == "echo":
                conn.request(CLUSTER, data, REPLY_TIMEOUT)
            else:
                done.clear()
                conn.publish(PING, data)
                if not done.wait(REPLY_TIMEOUT):
                    raise RuntimeError("publish round trip timed out")
            with lock:
                if not window.tick():
                    return

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window.report()
    conn.close()


def request(stack: str, port: int, workload: str, concurrency: int, seconds: float, warmup: float):
    window = Window(seconds, warmup)
    if stack == "threads":
        request_threads(port, workload, concurrency, window)
    else:
        asyncio.run(request_async(stack, port, workload, concurrency, window))
    return 0


# ---------------------------------------------------------------------------
# The orchestrator.


def start_nats() -> tuple[_util.Child, int]:
    port = _util.free_port()
    server = _util.Child(["nats-server", "-a", "127.0.0.1", "-p", str(port)], "nats-server")
    deadline = time.monotonic() + _util.READY_TIMEOUT
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            if time.monotonic() > deadline or not server.alive():
                server.stop()
                raise RuntimeError(f"nats-server did not start{server.stderr_tail()}") from None
            time.sleep(0.05)


def nats_missing() -> str | None:
    """Why the NATS column cannot run, or None if it can."""
    missing = []
    if shutil.which("nats-server") is None:
        missing.append("nats-server (apt-get install -y nats-server)")
    if importlib.util.find_spec("nats") is None:
        missing.append("nats-py (.venv/bin/pip install nats-py)")
    return ", ".join(missing) or None


def cpu_seconds(child: _util.Child) -> float:
    user, system = child.cpu()
    return user + system


class Stack:
    """One column: its server and its responder, up for the whole run.

    ``checkout``: the relay, responder and requester run that checkout's
    iris (this script, with the checkout first on the path)."""

    def __init__(self, name: str, checkout: str = ""):
        self.name, self.checkout = name, checkout
        if name == "nats":
            self.server, self.port = start_nats()
        else:
            self.server, self.port = _util.start_relay(checkout=checkout or None)
        try:
            argv = [sys.executable, __file__, "--respond", name, str(self.port)]
            self.responder = _util.Child(argv, f"{self.label} responder", checkout or None)
            if self.responder.readline() != "ready":
                raise RuntimeError(f"{name} responder misbehaved{self.responder.stderr_tail()}")
        except BaseException:
            self.stop()
            raise

    @property
    def label(self) -> str:
        return column_label(self.name, self.checkout)

    def stop(self) -> None:
        if hasattr(self, "responder"):
            self.responder.stop()
        self.server.stop()


def measure_all(stacks: list[Stack], settings: argparse.Namespace) -> list[Result]:
    """Every cell, the stacks taking turns, best of ``settings.rounds``.

    Taking turns cell by cell, rather than stack after stack, exposes every
    column to the same neighbours: on a shared 2-core machine other work
    comes and goes, and the best of a few rounds is the figure least
    disturbed by it.
    """
    best: dict[tuple, Result] = {}
    for workload in settings.workloads:
        for concurrency in CONCURRENCIES:
            for _ in range(settings.rounds):
                for stack in stacks:
                    result = measure(stack, workload, concurrency, settings)
                    print(format_result(result), file=sys.stderr, flush=True)
                    key = (stack.name, stack.checkout, workload, concurrency)
                    if key not in best or result.round_trips_per_s > best[key].round_trips_per_s:
                        best[key] = result
    return list(best.values())


def measure(stack: Stack, workload: str, concurrency: int, settings) -> Result:
    argv = [sys.executable, __file__, "--request", stack.name, str(stack.port), workload]
    argv += [str(concurrency), str(settings.seconds), str(settings.warmup)]
    requester = _util.Child(argv, f"{stack.label} requester", stack.checkout or None)
    processes = (requester, stack.responder, stack.server)
    try:
        timeout = settings.warmup + _util.READY_TIMEOUT
        if requester.readline(timeout) != "measuring":
            raise RuntimeError(f"{stack.label} requester misbehaved{requester.stderr_tail()}")
        before = [cpu_seconds(p) for p in processes]
        outcome = json.loads(requester.readline(settings.seconds + _util.READY_TIMEOUT))
        after = [cpu_seconds(p) for p in processes]
    finally:
        requester.stop()
    count = max(outcome["count"], 1)
    per_trip = [(a - b) / count * 1e6 for a, b in zip(after, before, strict=True)]
    rate = count / outcome["elapsed"]
    return Result(stack.name, stack.checkout, workload, concurrency, rate, *per_trip)


def column_label(stack: str, checkout: str) -> str:
    return STACK_LABELS[stack] + (f" from {checkout}" if checkout else "")


def format_result(result: Result) -> str:
    where = f" ({result.checkout})" if result.checkout else ""
    return (
        f"{result.stack:>7}{where} {result.workload:>7} x{result.concurrency:<3} "
        f"{result.round_trips_per_s:>9,.0f} rt/s  CPU/rt us: requester {result.requester_us:.1f}, "
        f"responder {result.responder_us:.1f}, server {result.server_us:.1f}"
    )


def table(results: list[Result]) -> str:
    header = [
        "workload",
        "concurrency",
        "stack",
        "round trips/s",
        "requester CPU/rt (us)",
        "responder CPU/rt (us)",
        "server CPU/rt (us)",
    ]
    order = {stack: i for i, stack in enumerate(STACKS)}
    rows = [
        [
            r.workload,
            str(r.concurrency),
            column_label(r.stack, r.checkout),
            _util.format_value(r.round_trips_per_s),
            _util.format_value(r.requester_us),
            _util.format_value(r.responder_us),
            _util.format_value(r.server_us),
        ]
        for r in sorted(
            results,
            key=lambda r: (WORKLOADS.index(r.workload), r.concurrency, order[r.stack], r.checkout),
        )
    ]
    return _util.markdown_table(header, rows)


def key_figures(report: _util.Report, results: list[Result]) -> None:
    """iris.aio's rate at KEY_CONCURRENCY against each peer's, judged by
    KEY_TARGETS; then each cell against the same cell of every --compare
    checkout (a ratio above 1: this checkout is faster)."""
    for workload in WORKLOADS:
        at_key = {
            r.stack: r
            for r in results
            if r.workload == workload and r.concurrency == KEY_CONCURRENCY and not r.checkout
        }
        aio = at_key.get("aio")
        if aio is None:
            continue
        for peer, target in KEY_TARGETS.items():
            if peer in at_key:
                report.add(
                    f"{workload} x{KEY_CONCURRENCY}: iris.aio against {STACK_LABELS[peer]}",
                    aio.round_trips_per_s,
                    "round trips/s",
                    target,
                    baseline=at_key[peer].round_trips_per_s,
                )
    here = {(r.stack, r.workload, r.concurrency): r for r in results if not r.checkout}
    for before in results:
        now = here.get((before.stack, before.workload, before.concurrency))
        if before.checkout and now:
            report.add(
                f"{before.workload} x{before.concurrency}: {STACK_LABELS[before.stack]}"
                f" against {before.checkout}",
                now.round_trips_per_s,
                "round trips/s",
                baseline=before.round_trips_per_s,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs per cell")
    parser.add_argument("--stacks", default=",".join(STACKS), help="comma-separated columns")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="also run the aio and threads stacks from the checkout DIR (repeatable)",
    )
    parser.add_argument("--respond", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--request", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.respond:
        return respond(args.respond[0], int(args.respond[1]))
    if args.request:
        stack, port, workload, concurrency, seconds, warmup = args.request
        return request(stack, int(port), workload, int(concurrency), float(seconds), float(warmup))

    args.warmup = 0.5
    if args.quick:
        args.seconds, args.warmup, args.rounds = 0.5, 0.2, 1
    args.workloads = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workloads) - set(WORKLOADS)
    stacks = [s for s in args.stacks.split(",") if s]
    unknown |= set(stacks) - set(STACKS)
    if unknown:
        parser.error(f"unknown stacks or workloads: {', '.join(sorted(unknown))}")
    mode = f"{args.seconds:g} s per run, best of {args.rounds}"
    report = _util.Report(_util.machine(), mode)
    print(f"{_util.describe_machine(report.machine)}; mode: {mode}")
    print()
    if "nats" in stacks and (missing := nats_missing()):
        print(f"NATS column skipped: {missing} not installed")
        stacks.remove("nats")
    running: list[Stack] = []
    try:
        for name in stacks:
            running.append(Stack(name))
            if name != "nats":
                running.extend(Stack(name, os.path.abspath(d)) for d in args.compare)
        results = measure_all(running, args)
    finally:
        for stack in running:
            stack.stop()
    print(table(results))
    print()
    print(f"Key figures, iris.aio against its peers at {KEY_CONCURRENCY} requesters:")
    print()
    key_figures(report, results)
    print(report.table())
    if args.json:
        report.write_json(args.json, results=[asdict(r) for r in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
