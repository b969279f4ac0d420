"""Compare irishost.wire.ring with multiprocessing.Queue and multiprocessing.Pipe.

Run as ``python bench/ring_bench.py``.  Every side runs in a forked child
and the parent, measured in the same run, so the ratios hold for this
machine at this moment.  Ring messages are msgpack-encoded and decoded,
because Queue and Pipe pickle theirs.

Targets (product spec, floors): one-way ring throughput at least 3x Queue;
ring round trip at most half of a Pipe round trip. Exit status 1 when one
is missed. On a machine whose rings are TSO (x86-64), the same two
measurements of the KERNEL ordering follow, with no target: what the safe
path of a weakly ordered CPU costs (irishost/wire/ordering.py). Last, the
CPU one frame costs in one process (a put, then a get_nowait, no peer to
wait for) under each ordering: the figure the machine's load moves least.
bench/irishost_bench.py runs the same measurements against the
same targets in alternating rounds.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import sys
import time

import _util
import msgpack

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from irishost.wire.ordering import ORDERING, Ordering  # noqa: E402
from irishost.wire.ring import Ring  # noqa: E402

CTX = multiprocessing.get_context("fork")
MESSAGE = (1, b"x" * 100)
THROUGHPUT_MESSAGES = 300_000
ROUND_TRIPS = 20_000
TIMEOUT = 10.0
QUEUE_TARGET = _util.Target(floor=3.0, on_ratio=True)
PIPE_TARGET = _util.Target(floor=0.5, higher_is_better=False, on_ratio=True)


def _rate(count: int, seconds: float) -> float:
    return count / seconds


# ------------------------------------------------------------------ one way


def _queue_producer(queue, count: int) -> None:
    for _ in range(count):
        queue.put(MESSAGE)


def queue_throughput(count: int) -> float:
    queue = CTX.Queue()
    child = CTX.Process(target=_queue_producer, args=(queue, count))
    child.start()
    queue.get(timeout=TIMEOUT)
    # The clock starts at the first message so the fork is not counted.
    start = time.perf_counter()
    for _ in range(count - 1):
        queue.get(timeout=TIMEOUT)
    elapsed = time.perf_counter() - start
    child.join()
    return _rate(count - 1, elapsed)


def _ring_producer(ring: Ring, count: int) -> None:
    pack = msgpack.packb
    put = ring.put
    for _ in range(count):
        put(pack(MESSAGE), TIMEOUT)


def ring_throughput(count: int, ordering: Ordering = ORDERING) -> float:
    ring = Ring.create(prefix="ringbench", ordering=ordering)
    child = CTX.Process(target=_ring_producer, args=(ring, count))
    child.start()
    unpack = msgpack.unpackb
    unpack(ring.get(TIMEOUT))
    start = time.perf_counter()
    received = 1
    while received < count:
        batch = ring.drain()
        if not batch:
            frame = ring.get(TIMEOUT)
            if frame is None:
                raise RuntimeError("ring producer stalled")
            batch = [frame]
        for frame in batch:
            unpack(frame)
        received += len(batch)
    elapsed = time.perf_counter() - start
    child.join()
    ring.close()
    return _rate(count - 1, elapsed)


def ring_cost_in_one_process(count: int, ordering: Ordering) -> float:
    """Microseconds of one put and one get_nowait of a 100-byte frame, best of 5."""
    ring = Ring.create(prefix="ringbench", ordering=ordering)
    frame = msgpack.packb(MESSAGE)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(count):
            ring.put(frame)
            ring.get_nowait()
        best = min(best, time.perf_counter() - start)
    ring.close()
    return best / count * 1e6


# --------------------------------------------------------------- round trip


def _pipe_echo(conn) -> None:
    while (message := conn.recv()) is not None:
        conn.send(message)


def pipe_round_trips(count: int) -> list[float]:
    parent, child_end = CTX.Pipe()
    child = CTX.Process(target=_pipe_echo, args=(child_end,))
    child.start()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        parent.send(MESSAGE)
        parent.recv()
        samples.append((clock() - start) / 1000)
    parent.send(None)
    child.join()
    return samples


def _ring_echo(requests: Ring, replies: Ring) -> None:
    while (frame := requests.get(TIMEOUT)) is not None and frame:
        replies.put(msgpack.packb(msgpack.unpackb(frame)), TIMEOUT)


def ring_round_trips(count: int, ordering: Ordering = ORDERING) -> list[float]:
    requests = Ring.create(prefix="ringbench", ordering=ordering)
    replies = Ring.create(prefix="ringbench", ordering=ordering)
    child = CTX.Process(target=_ring_echo, args=(requests, replies))
    child.start()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(count):
        start = clock()
        requests.put(msgpack.packb(MESSAGE), TIMEOUT)
        msgpack.unpackb(replies.get(TIMEOUT))
        samples.append((clock() - start) / 1000)
    requests.put(b"", TIMEOUT)  # an empty frame tells the echo child to stop
    child.join()
    requests.close()
    replies.close()
    return samples


def main() -> int:
    started = time.perf_counter()
    report = _util.Report(_util.machine(), "single run; compare on an idle machine")
    queue_rate = queue_throughput(THROUGHPUT_MESSAGES)
    ring_rate = ring_throughput(THROUGHPUT_MESSAGES)
    pipe = sorted(pipe_round_trips(ROUND_TRIPS))
    ring = sorted(ring_round_trips(ROUND_TRIPS))

    one_way = f"one way {THROUGHPUT_MESSAGES:,} x 100 B"
    report.add(f"{one_way}, multiprocessing.Queue", queue_rate, "msgs/s")
    report.add(f"{one_way}, Ring (drain)", ring_rate, "msgs/s", QUEUE_TARGET, baseline=queue_rate)
    round_trip = f"round trip {ROUND_TRIPS:,} x 100 B"
    pipe_median, ring_median = statistics.median(pipe), statistics.median(ring)
    report.add(f"{round_trip}, multiprocessing.Pipe, median", pipe_median, "us")
    report.add(f"{round_trip}, multiprocessing.Pipe, p99", _util.percentile(pipe, 0.99), "us")
    report.add(
        f"{round_trip}, Ring pair, median", ring_median, "us", PIPE_TARGET, baseline=pipe_median
    )
    report.add(f"{round_trip}, Ring pair, p99", _util.percentile(ring, 0.99), "us")
    if ORDERING is not Ordering.KERNEL:
        kernel_rate = ring_throughput(THROUGHPUT_MESSAGES, Ordering.KERNEL)
        kernel = sorted(ring_round_trips(ROUND_TRIPS, Ordering.KERNEL))
        label = "KernelOrderedRing"
        report.add(f"{one_way}, {label} (drain)", kernel_rate, "msgs/s", baseline=ring_rate)
        median = statistics.median(kernel)
        report.add(f"{round_trip}, {label} pair, median", median, "us", baseline=ring_median)
        report.add(f"{round_trip}, {label} pair, p99", _util.percentile(kernel, 0.99), "us")
    one_process = f"one process, put + get_nowait x {ROUND_TRIPS:,}"
    costs = {ordering: ring_cost_in_one_process(ROUND_TRIPS, ordering) for ordering in Ordering}
    for ordering, cost in costs.items():
        baseline = costs[ORDERING]
        report.add(f"{one_process}, {ordering.value} ordering", cost, "us", baseline=baseline)
    report.print()
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 1 if report.missed() else 0


if __name__ == "__main__":
    sys.exit(main())
