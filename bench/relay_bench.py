"""The embedded relay's CPU per round trip at a fixed batch size.

Run as ``python bench/relay_bench.py`` (about 30 s; ``--batch N`` for other
batch sizes, ``--windows``, ``--rounds``). A raw client sends BATCH requests
at once, a raw member answers them at once, and the client waits for every
reply before the next batch; both speak bytes built with iris.codec, so
nothing of the binding runs. The relay's on-CPU time comes from
/proc/PID/schedstat (nanoseconds), per window of ROUNDS batches.

Why a fixed batch: under bench/iris_bench.py's 64 requesters the relay's
CPU per round trip depends on how many packets each wake-up finds, and that
depends on how busy the machine is (a relay that waits for the CPU finds
more); on a shared 2-core machine that moved the figure by half. Here the
batch is fixed, and the minimum over windows filters out the windows other
work disturbed, so two versions of the relay compare on their own code.
The figure is not iris_bench's (whose batches vary), only comparable to
itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys

import _util

from iris import codec

CLUSTER = "bench"
PAYLOAD = b"x" * 100
TIMEOUT_MS = 10_000
WARMUP_ROUNDS = 500


class RawPeer:
    """An attached socket that reads what the relay sends as packets."""

    def __init__(self, port: int, cluster: str):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = codec.Decoder(codec.Side.RELAY)
        self.sock.sendall(codec.Init(cluster).encode())
        (accept,) = self.read(1)
        assert type(accept) is codec.Accept, accept

    def read(self, count: int) -> list:
        packets: list = []
        while len(packets) < count:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("the relay closed the connection")
            packets += self.decoder.feed(data)
        return packets


def on_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9


def measure(batch: int, rounds: int, windows: int) -> list[float]:
    """us of relay CPU per round trip, one figure per window."""
    relay, port = _util.start_relay()
    try:
        client, member = RawPeer(port, ""), RawPeer(port, CLUSTER)
        next_id = 0

        def round_trip_batch() -> None:
            nonlocal next_id
            client.sock.sendall(
                b"".join(
                    codec.Request(next_id + i, CLUSTER, PAYLOAD, TIMEOUT_MS).encode()
                    for i in range(batch)
                )
            )
            next_id += batch
            delivered = member.read(batch)
            member.sock.sendall(
                b"".join(codec.Reply(p.id, True, p.request).encode() for p in delivered)
            )
            client.read(batch)

        for _ in range(WARMUP_ROUNDS):
            round_trip_batch()
        figures = []
        for _ in range(windows):
            before = on_cpu_seconds(relay.proc.pid)
            for _ in range(rounds):
                round_trip_batch()
            spent = on_cpu_seconds(relay.proc.pid) - before
            figures.append(spent / (rounds * batch) * 1e6)
        return figures
    finally:
        relay.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="requests per batch (1, 8, 64)")
    parser.add_argument("--rounds", type=int, default=500, help="batches per window (500)")
    parser.add_argument("--windows", type=int, default=15, help="windows per batch size (15)")
    args = parser.parse_args(argv)
    report = _util.Report(_util.machine(), f"{args.windows} windows of {args.rounds} batches")
    for batch in args.batch or [1, 8, 64]:
        figures = measure(batch, args.rounds, args.windows)
        per_trip = f"batch {batch}: relay CPU per round trip"
        report.add(f"{per_trip}, min", min(figures), "us")
        report.add(f"{per_trip}, median", statistics.median(figures), "us")
        report.add(f"batch {batch}: load average after", os.getloadavg()[0], "1-min load")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
