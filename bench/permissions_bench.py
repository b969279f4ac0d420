"""What the relay's permissions cost: the uid look-up per connection, the check per message.

Run as ``python bench/permissions_bench.py`` (about 20 s; ``--connections N``,
1000 by default). In one process, no relay:

- the look-up: N loopback connections are opened (so /proc/net/tcp lists
  2N sockets besides the machine's own), then the owner of each is found
  alone with the socket diagnostics (netlink, the relay's way), then with
  /proc/net/tcp (its fallback): alone, one whole read per connection (for
  ``--table-samples`` of them), and all N in one read; then the user
  database once per uid, which the relay does once per uid and keeps;
- the check per message: the relay's fast path (passthrough.py) routes a
  batch of 64 requests with no permissions, and with the connection already
  cleared for the cluster (one set look-up per request); the first decision
  of a (connection, cluster), made on the router's path, is timed apart.

The round-trip rate with and without permissions, relay against relay, is
bench/relay_bench.py's (``--permissions``).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import _util

from iris import codec
from iris.relay.passthrough import route_leading
from iris.relay.peer_uid import Ends, OwnerFinder, owners_in_tables
from iris.relay.permissions import Action, Gate, Permissions, User
from iris.relay.router import Router

CLUSTER = "bench"
BATCH = 64


def open_connections(count: int) -> tuple[list[socket.socket], list[Ends]]:
    """``count`` loopback connections: every socket, and each connection's ends."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=count)
    sockets, ends = [listener], []
    for _ in range(count):
        client = socket.create_connection(listener.getsockname())
        accepted, address = listener.accept()
        sockets += [client, accepted]
        ends.append((address, accepted.getsockname()))
    return sockets, ends


def lookup_figures(report: _util.Report, count: int, table_samples: int) -> None:
    sockets, ends = open_connections(count)
    finder = OwnerFinder()
    try:
        with open("/proc/net/tcp") as table:
            lines = sum(1 for _ in table) - 1
        report.add(f"sockets in /proc/net/tcp with {count} connections open", lines, "lines")
        if finder.method == "sock_diag":
            alone = timed_alone(finder.owners, ends)
            report.add("sock_diag: one connection, median", statistics.median(alone), "us")
            report.add("sock_diag: one connection, max", max(alone), "us")
        else:
            report.errors["sock_diag"] = "no socket diagnostics (netlink) here"
        alone = timed_alone(owners_in_tables, ends[:table_samples])
        report.add("/proc/net/tcp: one connection alone, median", statistics.median(alone), "us")
        report.add("/proc/net/tcp: one connection alone, max", max(alone), "us")
        started = time.perf_counter()
        assert set(owners_in_tables(ends).values()) == {os.geteuid()}
        batch = time.perf_counter() - started
        report.add(f"/proc/net/tcp: all {count} in one read", batch * 1e3, "ms")
    finally:
        finder.close()
        for sock in sockets:
            sock.close()
    user = min(timeit.repeat(lambda: User.of(os.geteuid()), number=100, repeat=5)) / 100
    report.add("user name and groups of a uid (once per uid)", user * 1e6, "us")


def timed_alone(
    owners: Callable[[list[Ends]], dict[Ends, int | None]], ends: list[Ends]
) -> list[float]:
    """Microseconds to find the owner of each connection, one at a time."""
    times = []
    for pair in ends:
        started = time.perf_counter()
        owner = owners([pair])[pair]
        times.append((time.perf_counter() - started) * 1e6)
        assert owner == os.geteuid(), owner
    return times


class _Peer:
    """A connection as the router sees it, that drops what it is sent."""

    def __init__(self, user: User | None) -> None:
        self.name, self.cluster, self.closed, self.outstanding = "bench", None, False, 0
        self.requests: set[int] = set()
        self.topics: set[str] = set()
        self.tunnels: dict[int, object] = {}
        self.user = user
        self.cleared: set[bytes] | None = None if user is None else set()
        self.cleared_topics: set[str] | None = None if user is None else set()

    def send(self, data: bytes) -> None:
        pass

    def close(self, reason: str | None) -> None:
        self.closed = True


def check_figures(report: _util.Report, permissions: Permissions) -> None:
    stream = b"".join(
        codec.RequestPacket(i, CLUSTER, b"x" * 100, 10_000).encode() for i in range(BATCH)
    )
    per_request = {}
    for label, gate in (("no permissions", None), ("permissions, cleared", Gate(permissions))):
        router = Router(gate=gate)
        user = None if gate is None else User.of(os.geteuid())
        member, sender = _Peer(user), _Peer(user)
        router.handle(member, codec.Init(CLUSTER))  # type: ignore[arg-type]
        router.handle(sender, codec.Init(""))  # type: ignore[arg-type]
        router.handle(sender, codec.RequestPacket(0, CLUSTER, b"x", 10_000))  # type: ignore[arg-type]

        def batch(router: Router = router, sender: _Peer = sender) -> None:
            assert route_leading(router, sender, stream, codec.MAX_MESSAGE) == len(stream)  # type: ignore[arg-type]
            router._requests.clear()  # as if every request were answered
            sender.requests.clear()

        seconds = min(timeit.repeat(batch, number=200, repeat=15)) / 200 / BATCH
        per_request[label] = seconds
        report.add(f"fast path per request, {label}", seconds * 1e9, "ns")
    extra = per_request["permissions, cleared"] - per_request["no permissions"]
    report.add("fast path: the check's cost per request", extra * 1e9, "ns")
    user = User.of(os.geteuid())
    first = (
        min(
            timeit.repeat(
                lambda: permissions.allows(user, Action.SEND, CLUSTER), number=10_000, repeat=5
            )
        )
        / 10_000
    )
    report.add("first decision of a (connection, cluster)", first * 1e9, "ns")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="connections open (1000)")
    parser.add_argument(
        "--table-samples",
        type=int,
        default=200,
        help="connections looked up alone in /proc/net/tcp, each a whole read (200)",
    )
    args = parser.parse_args(argv)
    report = _util.Report(_util.machine(), f"{args.connections} connections")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "permissions.toml"
        path.write_text(
            'default = "closed"\n'
            f'[cluster.{CLUSTER}]\nserve = ["root"]\nsend = ["*"]\n'
            '[cluster."bench-*"]\nsend = ["root"]\n'
        )
        permissions = Permissions.load(path)
    lookup_figures(report, args.connections, args.table_samples)
    check_figures(report, permissions)
    report.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
