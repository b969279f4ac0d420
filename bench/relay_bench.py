"""The embedded relay's CPU per round trip at a fixed batch size.

Run as ``python bench/relay_bench.py`` (about 30 s; ``--batch N`` for other
batch sizes, ``--windows``, ``--rounds``). ``--permissions`` adds this
checkout's relay with a permissions file that checks every request, and
``--compare DIR`` the relay of another checkout; the relays run side by
side and take turns window by window, so the machine's load falls on all
alike. Each side also reports its round trips per second: with batch 64,
the rate at 64 requests in flight. A raw client sends BATCH requests
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
import pwd
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

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


class Side:
    """One relay under test, with its raw client and member."""

    def __init__(self, name: str, extra: Sequence[str] = (), checkout: str | None = None):
        self.name = name
        self.relay, port = _util.start_relay(extra=extra, checkout=checkout)
        try:
            self.client, self.member = RawPeer(port, ""), RawPeer(port, CLUSTER)
        except BaseException:
            self.relay.stop()
            raise
        self.next_id = 0
        self.cpu: list[float] = []  # us of relay CPU per round trip, per window
        self.rates: list[float] = []  # round trips per second, per window

    def round_trip_batch(self, batch: int) -> None:
        client, member = self.client, self.member
        client.sock.sendall(
            b"".join(
                codec.RequestPacket(self.next_id + i, CLUSTER, PAYLOAD, TIMEOUT_MS).encode()
                for i in range(batch)
            )
        )
        self.next_id += batch
        delivered = member.read(batch)
        member.sock.sendall(
            b"".join(codec.ReplyPacket(p.id, True, p.request).encode() for p in delivered)
        )
        client.read(batch)

    def window(self, batch: int, rounds: int) -> None:
        before, started = on_cpu_seconds(self.relay.proc.pid), time.perf_counter()
        for _ in range(rounds):
            self.round_trip_batch(batch)
        wall = time.perf_counter() - started
        spent = on_cpu_seconds(self.relay.proc.pid) - before
        self.cpu.append(spent / (rounds * batch) * 1e6)
        self.rates.append(rounds * batch / wall)

    def stop(self) -> None:
        self.relay.stop()


def permissions_file(directory: str) -> str:
    """A permissions file under which the bench's member and client may do what
    they do, and nothing else: every request is checked against it."""
    user = pwd.getpwuid(os.getuid()).pw_name
    path = os.path.join(directory, "permissions.toml")
    with open(path, "w") as file:
        file.write(f'default = "closed"\n[cluster.{CLUSTER}]\nserve = ["{user}"]\nsend = ["*"]\n')
    return path


def measure(batch: int, rounds: int, windows: int, sides: list[tuple[str, list[str], str | None]]):
    """Every side's figures, its windows taken in turn with the others'."""
    running: list[Side] = []
    try:
        for name, extra, checkout in sides:
            running.append(Side(name, extra, checkout))
        for side in running:
            for _ in range(WARMUP_ROUNDS):
                side.round_trip_batch(batch)
        for window in range(windows):
            # Alternate which side goes first, so none always follows the same neighbour.
            order = running if window % 2 == 0 else running[::-1]
            for side in order:
                side.window(batch, rounds)
        return running
    finally:
        for side in running:
            side.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, action="append", help="requests per batch (1, 8, 64)")
    parser.add_argument("--rounds", type=int, default=500, help="batches per window (500)")
    parser.add_argument("--windows", type=int, default=15, help="windows per batch size (15)")
    parser.add_argument(
        "--permissions",
        action="store_true",
        help="also run this checkout's relay with a permissions file that checks every request",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="also run the relay of the checkout DIR (repeatable); sides take turns by window",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        sides: list[tuple[str, list[str], str | None]] = [("this", [], None)]
        if args.permissions:
            sides.append(("this+permissions", ["--permissions", permissions_file(scratch)], None))
        sides += [
            (f"checkout {os.path.basename(os.path.normpath(d))}", [], d) for d in args.compare
        ]
        report = _util.Report(_util.machine(), f"{args.windows} windows of {args.rounds} batches")
        for batch in args.batch or [1, 8, 64]:
            for side in measure(batch, args.rounds, args.windows, sides):
                label = f"batch {batch}" if len(sides) == 1 else f"batch {batch}, {side.name}"
                per_trip = f"{label}: relay CPU per round trip"
                report.add(f"{per_trip}, min", min(side.cpu), "us")
                report.add(f"{per_trip}, median", statistics.median(side.cpu), "us")
                report.add(f"{label}: round trips, median", statistics.median(side.rates), "/s")
            report.add(f"batch {batch}: load average after", os.getloadavg()[0], "1-min load")
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
