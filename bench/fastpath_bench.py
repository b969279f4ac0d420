"""The supervisor's fast path alone, in one process: its Python per request.

Run as ``python bench/fastpath_bench.py`` (about ten seconds; ``--compare
DIR`` to run the same measurement from the checkout DIR in turns, as a
child process with DIR first on the path; ``--rounds N``).

``irishost_bench.py --only echo-overhead`` measures a whole host, and on
a 2-core machine its supervisor figure moves by 10-20 % from run to run,
with the batch sizes that the scheduling of five processes happens to
make. That is more than most changes to the fast path, so those are judged
here: the supervisor's two halves (``FastPath.route_leading`` on the relay
reader's side; the loop's drain of the worker's ring, ``answer_replies``
and ``flush``) run on a real ``WorkerTable``, ``Switchboard`` and rings, in
batches of a fixed size. The worker's side (reading the requests, writing
the replies) and the relay's socket are left out: the relay connection is
replaced by an object that keeps the bytes it is given, and the worker's
replies are written to its ring before the clock starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _util

from iris import codec
from iris.logs import ContextLog
from irishost.config import load_config
from irishost.supervisor.handle import WorkerHandle
from irishost.supervisor.switchboard import Switchboard
from irishost.supervisor.worker_table import Change, WorkerTable
from irishost.wire import frames
from irishost.wire.ring import Ring

# Requests in one read of the relay connection, and replies in one drain of
# a worker's ring: what a 64-in-flight client makes, in two groups.
BATCH = 32
PAYLOAD = b"x" * 100
TIMEOUT_MS = 10_000
FIRST_RELAY_ID = 1 << 20  # a three-octet varint, as a long-lived connection's ids are
BATCHES = 2000  # per timed run
RUNS = 7  # the best of these is the figure

CONFIG = """
[service]
cluster = "fastpath-bench"
handler = "echo:EchoHandler"
[relay]
port = 55555
embedded = false
"""


class RelayStandIn:
    """The relay connection, as far as the fast path writes to it."""

    def __init__(self) -> None:
        self.sent = 0

    def send_encoded(self, data: bytes) -> None:
        self.sent += len(data)


def reply_to(data: bytes) -> bytes:
    """The worker's successful reply to the request frame ``data``."""
    request = frames.decode(data)
    assert isinstance(request, frames.Request)
    return frames.Reply(request.ticket, True, PAYLOAD).encode()


def measure(workers: int) -> dict[str, float]:
    """us per request of each half, the best of RUNS runs of BATCHES batches,
    with ``workers`` ready workers sharing each batch."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "service.toml"
        path.write_text(CONFIG)
        config = load_config(path)
    table = WorkerTable()
    handles = []
    for slot in range(workers):
        # Distinct pids, as real workers have; the rings are this process's.
        handle = WorkerHandle(slot, os.getpid() + slot, Ring.create(), Ring.create(), 0)
        table.add(handle)
        table.transition(handle, Change.BOOTED)
        handles.append(handle)
    switchboard = Switchboard(config, ContextLog(), table, recycle=lambda _: None)
    relay = RelayStandIn()
    switchboard.conn = relay  # type: ignore[assignment]  # the one method the fast path uses
    fast = switchboard.fast_path
    relay_id = FIRST_RELAY_ID
    best = {"requests": float("inf"), "replies": float("inf")}
    try:
        for _ in range(RUNS):
            request_seconds = reply_seconds = 0.0
            gc.disable()
            for _ in range(BATCHES):
                packets = b"".join(
                    codec.RequestDelivery(relay_id + i, PAYLOAD, TIMEOUT_MS).encode()
                    for i in range(BATCH)
                )
                relay_id += BATCH
                started = time.perf_counter()
                taken = fast.route_leading(packets)
                request_seconds += time.perf_counter() - started
                assert taken == len(packets), "the fast path left requests to the slow one"
                for handle in handles:
                    handle.outbox.put_batch([reply_to(frame) for frame in handle.inbox.drain()])
                started = time.perf_counter()
                for handle in handles:
                    rest = fast.answer_replies(handle, handle.outbox.drain())
                    assert not rest, "a reply left the fast path"
                fast.flush()
                reply_seconds += time.perf_counter() - started
            gc.enable()
            per = BATCHES * BATCH / 1e6
            best["requests"] = min(best["requests"], request_seconds / per)
            best["replies"] = min(best["replies"], reply_seconds / per)
    finally:
        for handle in handles:
            handle.inbox.close()
            handle.outbox.close()
    best["total"] = best["requests"] + best["replies"]
    return best


def compare(checkouts: list[str], rounds: int, workers: int) -> None:
    """This checkout and each of ``checkouts`` in turns, as child processes
    (the order reversed every other round); the median of each side's figures."""
    here = str(Path(__file__).resolve().parent.parent)
    sides = [here, *(str(Path(c).resolve()) for c in checkouts)]
    figures: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for side in _util.alternating(sides, rounds):
        done = subprocess.run(
            [sys.executable, __file__, "--json", "--workers", str(workers)],
            capture_output=True,
            text=True,
            **_util.in_checkout(side),
        )
        if done.returncode:
            raise SystemExit(f"the run from {side} failed:\n{done.stderr}")
        figures[side].append(json.loads(done.stdout))
    print(
        f"us of supervisor Python per request, batches of {BATCH}, {workers} worker(s), "
        f"median of {rounds} turns"
    )
    print()
    print(
        "| checkout | requests (route_leading) | replies (drain + answer_replies + flush) | total "
        "| total / this checkout's |"
    )
    print("|---|---|---|---|---|")
    mine = statistics.median(run["total"] for run in figures[here])
    for side in sides:
        median = {k: statistics.median(run[k] for run in figures[side]) for k in figures[side][0]}
        print(
            f"| {side} | {median['requests']:.2f} | {median['replies']:.2f} "
            f"| {median['total']:.2f} | {median['total'] / mine:.2f}x |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", action="append", default=[], metavar="DIR")
    parser.add_argument("--rounds", type=int, default=5, help="with --compare: turns a side")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--workers", type=int, default=1, help="ready workers sharing a batch")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.rounds, args.workers)
    elif args.json:
        print(json.dumps(measure(args.workers)))
    else:
        figures = measure(args.workers)
        print(
            f"us of supervisor Python per request, batches of {BATCH}, "
            f"{args.workers} worker(s), best of {RUNS}"
        )
        print()
        print("| requests (route_leading) | replies (drain + answer_replies + flush) | total |")
        print("|---|---|---|")
        print(f"| {figures['requests']:.2f} | {figures['replies']:.2f} | {figures['total']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
